//! Time as the core sees it: milliseconds since the Unix epoch, passed in by the caller.
//!
//! The core never reads a clock (the crate has no way to: no libc, no `SystemTime`). The
//! runtime passes the current time into every `handle_*` call; tests pass a simulated time. Timestamps are plain integers so that session
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
}
