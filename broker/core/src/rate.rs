//! Per-connection inbound rate limits (`mqtt.rate_limit.messages_in` and `bytes_in`).
//!
//! Each limit is a generic cell rate algorithm: one "theoretical arrival time" per limit,
//! pushed forward by the cost of every packet read (1/rate seconds per message, n/rate per
//! n bytes). A connection may run up to one second ahead of its rate (the burst); further
//! ahead, it is not read again until it is back within that second. Times are in
//! microseconds so that rates far above 1000/s keep their precision, and the state is two
//! integers per connection.

use crate::time::Timestamp;

/// The allowance of one second ahead of the rate.
const BURST_US: u64 = 1_000_000;

/// Inbound limits per connection; 0 = no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// PUBLISH packets per second.
    pub messages_per_sec: u32,
    /// Bytes per second (whole packets).
    pub bytes_per_sec: u64,
}

impl RateLimit {
    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.messages_per_sec > 0 || self.bytes_per_sec > 0
    }
}

/// One connection's position against its limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Buckets {
    messages_tat: u64,
    bytes_tat: u64,
}

impl Buckets {
    /// Charges a packet of `bytes` bytes (a message when `message`) read at `now`. Returns
    /// when reading may resume if the connection is now more than a second ahead of a rate.
    pub fn charge(
        &mut self,
        lim: &RateLimit,
        now: Timestamp,
        message: bool,
        bytes: usize,
    ) -> Option<Timestamp> {
        let now_us = now.0.saturating_mul(1000);
        let mut resume = 0;
        if message && lim.messages_per_sec > 0 {
            let cost = 1_000_000 / u64::from(lim.messages_per_sec);
            resume = resume.max(advance(&mut self.messages_tat, now_us, cost.max(1)));
        }
        if lim.bytes_per_sec > 0 {
            let cost = (bytes as u128 * 1_000_000 / u128::from(lim.bytes_per_sec))
                .min(u128::from(u64::MAX)) as u64;
            resume = resume.max(advance(&mut self.bytes_tat, now_us, cost));
        }
        // Resume at the first whole millisecond when the connection is within its burst.
        (resume > now_us).then(|| Timestamp(resume.div_ceil(1000)))
    }
}

/// Pushes `tat` forward by `cost` from `now` (a cell that has fallen behind starts from
/// now); returns the time from which the next packet conforms.
fn advance(tat: &mut u64, now: u64, cost: u64) -> u64 {
    *tat = (*tat).max(now).saturating_add(cost);
    tat.saturating_sub(BURST_US)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(messages: u32, bytes: u64) -> RateLimit {
        RateLimit {
            messages_per_sec: messages,
            bytes_per_sec: bytes,
        }
    }

    #[test]
    fn a_second_of_messages_passes_then_reading_waits_for_the_rate() {
        let l = lim(10, 0);
        let mut b = Buckets::default();
        let t0 = Timestamp(1_000_000);
        for i in 0..10 {
            assert_eq!(b.charge(&l, t0, true, 100), None, "message {i}");
        }
        // The 11th puts the connection 1.1 s ahead: wait 100 ms.
        assert_eq!(b.charge(&l, t0, true, 100), Some(Timestamp(1_000_100)));
        // Other packets (PINGREQ, acks) are not messages.
        assert_eq!(b.charge(&l, t0, false, 2), None);
    }

    #[test]
    fn bytes_are_charged_for_every_packet() {
        let l = lim(0, 1000);
        let mut b = Buckets::default();
        let t0 = Timestamp(5_000);
        assert_eq!(b.charge(&l, t0, false, 600), None);
        assert_eq!(b.charge(&l, t0, false, 400), None);
        // 1500 bytes in at once: 0.5 s past the burst.
        assert_eq!(b.charge(&l, t0, true, 500), Some(Timestamp(5_500)));
        // Half a second later it conforms again, and a quiet connection regains its burst.
        assert_eq!(b.charge(&l, Timestamp(5_500), false, 0), None);
        let mut quiet = b;
        assert_eq!(quiet.charge(&l, Timestamp(60_000), false, 1000), None);
    }

    #[test]
    fn a_packet_larger_than_a_second_is_read_then_paid_for() {
        let l = lim(0, 100);
        let mut b = Buckets::default();
        assert_eq!(
            b.charge(&l, Timestamp(0), true, 1000),
            Some(Timestamp(9_000))
        );
    }

    #[test]
    fn the_slower_of_both_limits_wins_and_high_rates_keep_precision() {
        let l = lim(100_000, 1_000_000);
        let mut b = Buckets::default();
        let t0 = Timestamp(0);
        let mut waited = None;
        for _ in 0..200_000 {
            waited = waited.or(b.charge(&l, t0, true, 10));
        }
        // 200,000 messages at 100,000/s: one second past the burst; 2 MB at 1 MB/s likewise.
        assert_eq!(b.charge(&l, t0, false, 0), Some(Timestamp(1000)));
        assert_eq!(waited, Some(Timestamp(1)));
        assert!(!lim(0, 0).enabled());
    }
}
