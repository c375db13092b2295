//! Time as the core sees it: milliseconds since the Unix epoch, passed in by the caller.
//!
//! The core never reads a clock. The shard layer passes the current time into every
//! `handle_*` call; tests pass a simulated time. Timestamps are plain integers so that session
//! state stays serializable.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Milliseconds since the Unix epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Later than any real time: "not set" for deadlines, without the space of an `Option`.
    pub const NEVER: Timestamp = Timestamp(u64::MAX);

    /// The timestamp `d` later (saturating).
    pub fn after(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(d.as_millis().min(u64::MAX as u128) as u64),
        )
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// The current wall-clock time. Only the shard layer calls this, several times per
    /// message, so it reads the kernel's coarse clock (`CLOCK_REALTIME_COARSE`: updated every
    /// scheduler tick, 1–4 ms, read without the time-stamp counter), which is plenty for
    /// deadlines counted in seconds and costs a fraction of a precise read.
    pub fn now() -> Timestamp {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we pass and has no other effect.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
            return Timestamp(ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000);
        }
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(d.as_millis() as u64)
    }
}
