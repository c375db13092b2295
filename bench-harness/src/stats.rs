//! Measurement: the header every benchmark payload starts with, latency histograms, and the
//! per-subscriber sequence tracking that counts lost and duplicated messages.

use ahash::{AHashMap, AHashSet};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Bytes at the start of every payload: publisher id (u32), sequence number (u32), send time
/// in nanoseconds since the run's epoch (u64), all big-endian.
pub const HEADER_LEN: usize = 16;

/// Writes the header into the first 16 bytes of `payload`.
pub fn write_header(payload: &mut [u8], publisher: u32, seq: u32, sent_ns: u64) {
    payload[0..4].copy_from_slice(&publisher.to_be_bytes());
    payload[4..8].copy_from_slice(&seq.to_be_bytes());
    payload[8..16].copy_from_slice(&sent_ns.to_be_bytes());
}

/// Reads (publisher, sequence, send time) from a payload.
pub fn read_header(payload: &[u8]) -> Option<(u32, u32, u64)> {
    let h = payload.get(..HEADER_LEN)?;
    Some((
        u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
        u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
    ))
}

/// A latency histogram in nanoseconds (1 ns to 10 min, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// (percentile, µs) points of the distribution, for plots.
    pub distribution: Vec<(f64, f64)>,
}

impl LatencySummary {
    /// Summarises `h` (nanoseconds).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        let distribution = [
            0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
        ]
        .iter()
        .map(|&p| (p, us(h.value_at_percentile(p))))
        .collect();
        LatencySummary {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            distribution,
        }
    }
}

/// Most sequence gaps remembered per publisher; beyond it, late arrivals count as duplicates.
const MAX_GAPS: usize = 100_000;

#[derive(Debug, Default, Clone)]
struct PublisherSeq {
    next: u32,
    missing: AHashSet<u32>,
}

/// What one subscriber saw, per publisher: unique messages, duplicates, and messages that
/// arrived after a later one (reordered).
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    per_publisher: AHashMap<u32, PublisherSeq>,
    /// Distinct messages received.
    pub unique: u64,
    /// Messages received more than once.
    pub duplicates: u64,
    /// Messages that arrived after a later one from the same publisher.
    pub reordered: u64,
}

impl SeqTracker {
    /// Records message `seq` of `publisher`.
    pub fn record(&mut self, publisher: u32, seq: u32) {
        let p = self.per_publisher.entry(publisher).or_default();
        if seq == p.next {
            p.next += 1;
            self.unique += 1;
        } else if seq > p.next {
            if p.missing.len() + (seq - p.next) as usize <= MAX_GAPS {
                p.missing.extend(p.next..seq);
            }
            p.next = seq + 1;
            self.unique += 1;
        } else if p.missing.remove(&seq) {
            self.unique += 1;
            self.reordered += 1;
        } else {
            self.duplicates += 1;
        }
    }
}

/// Loss and duplicate totals of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Messages the subscribers should have received.
    pub expected: u64,
    /// Distinct messages received.
    pub received: u64,
    /// `expected - received`.
    pub lost: u64,
    /// Copies received beyond the first.
    pub duplicates: u64,
    /// Messages that overtook an earlier one of the same publisher.
    pub reordered: u64,
    /// Every expected message arrived, none twice.
    pub exactly_once: bool,
}

impl Delivery {
    /// Adds up trackers against what was expected.
    pub fn from_trackers<'a>(
        expected: u64,
        trackers: impl IntoIterator<Item = &'a SeqTracker>,
    ) -> Self {
        let mut d = Delivery {
            expected,
            ..Default::default()
        };
        for t in trackers {
            d.received += t.unique;
            d.duplicates += t.duplicates;
            d.reordered += t.reordered;
        }
        d.lost = expected.saturating_sub(d.received);
        d.exactly_once = d.lost == 0 && d.duplicates == 0 && d.received == d.expected;
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut p = [0u8; 20];
        write_header(&mut p, 7, 99, 123_456_789);
        assert_eq!(read_header(&p), Some((7, 99, 123_456_789)));
        assert_eq!(read_header(&p[..15]), None);
    }

    #[test]
    fn tracker_counts_loss_duplicates_and_reordering() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 2, 2, 4, 3, 6, 1] {
            t.record(1, s);
        }
        t.record(2, 0);
        assert_eq!((t.unique, t.duplicates, t.reordered), (7, 2, 1));
        let d = Delivery::from_trackers(9, [&t]);
        assert_eq!((d.received, d.lost, d.duplicates), (7, 2, 2));
        assert!(!d.exactly_once);
        let mut ok = SeqTracker::default();
        (0..100).for_each(|s| ok.record(3, s));
        assert!(Delivery::from_trackers(100, [&ok]).exactly_once);
    }

    #[test]
    fn latency_summary_percentiles() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_us - 500.0).abs() < 1.0, "{}", s.p50_us);
        assert!((s.p99_us - 990.0).abs() < 1.5, "{}", s.p99_us);
        assert!((s.max_us - 1000.0).abs() < 1.0);
        assert_eq!(s.distribution.first().unwrap().0, 0.0);
        assert_eq!(
            LatencySummary::of(&new_histogram()),
            LatencySummary::default()
        );
    }
}
