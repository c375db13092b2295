//! The shards' figures as the rest of the process sees them: each shard publishes a snapshot
//! of its counters and sizes ([`ShardStats`]) every 100 ms into the [`Board`], where `$SYS/`,
//! the admin API and Prometheus read them. The board also keeps the peaks of the broker-wide
//! counts ([`Counts`]) since the start.

use crate::core::metrics::Metrics;
use serde::Serialize;
use std::sync::Mutex;

/// A snapshot of one shard's counters and sizes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardStats {
    /// Counters.
    pub metrics: Metrics,
    /// Open connections.
    pub connections: usize,
    /// Sessions held.
    pub sessions: usize,
    /// Subscriptions of the sessions held.
    pub subscriptions: usize,
    /// Filters in the local index (this shard's routes).
    pub local_filters: usize,
    /// Distinct filters subscribed to anywhere, as this shard knows them.
    pub topics: usize,
    /// Retained messages in this shard's partition.
    pub retained: u64,
    /// Connections parked (idle, no driver task).
    pub parked: usize,
    /// Topic and payload bytes queued for offline sessions, all shards together (the shared
    /// counter of `mqtt.max_mqueue_bytes_total`, as this shard read it).
    pub mqueue_bytes: u64,
}

/// The broker-wide counts, summed over shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Open connections.
    pub connections: u64,
    /// Sessions, online and offline.
    pub sessions: u64,
    /// Subscriptions.
    pub subscriptions: u64,
    /// Distinct topic filters subscribed to.
    pub topics: u64,
    /// (filter, shard) routes: a filter counts once per shard with a subscriber to it.
    pub routes: u64,
    /// Retained messages.
    pub retained: u64,
    /// Parked connections.
    pub parked: u64,
    /// Topic and payload bytes queued for offline sessions.
    pub mqueue_bytes: u64,
}

impl Counts {
    /// The counts of the shards' snapshots `stats`.
    pub fn of(stats: &[ShardStats]) -> Counts {
        let sum = |f: &dyn Fn(&ShardStats) -> u64| stats.iter().map(f).sum::<u64>();
        Counts {
            connections: sum(&|s| s.connections as u64),
            sessions: sum(&|s| s.sessions as u64),
            subscriptions: sum(&|s| s.subscriptions as u64),
            // Every shard knows every filter; the freshest view is the largest.
            topics: stats.iter().map(|s| s.topics as u64).max().unwrap_or(0),
            routes: sum(&|s| s.local_filters as u64),
            retained: sum(&|s| s.retained),
            parked: sum(&|s| s.parked as u64),
            // One counter for all shards: the freshest reading is the latest published.
            mqueue_bytes: stats.iter().map(|s| s.mqueue_bytes).max().unwrap_or(0),
        }
    }

    /// Each count the larger of the two.
    pub fn max(self, o: Counts) -> Counts {
        Counts {
            connections: self.connections.max(o.connections),
            sessions: self.sessions.max(o.sessions),
            subscriptions: self.subscriptions.max(o.subscriptions),
            topics: self.topics.max(o.topics),
            routes: self.routes.max(o.routes),
            retained: self.retained.max(o.retained),
            parked: self.parked.max(o.parked),
            mqueue_bytes: self.mqueue_bytes.max(o.mqueue_bytes),
        }
    }

    /// (name, value) pairs, in declaration order.
    pub fn pairs(&self) -> [(&'static str, u64); 8] {
        [
            ("connections", self.connections),
            ("sessions", self.sessions),
            ("subscriptions", self.subscriptions),
            ("topics", self.topics),
            ("routes", self.routes),
            ("retained", self.retained),
            ("parked", self.parked),
            ("mqueue_bytes", self.mqueue_bytes),
        ]
    }
}

/// Everything the board knows at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Each shard's latest snapshot (at most 100 ms old).
    pub shards: Vec<ShardStats>,
    /// Their counts.
    pub counts: Counts,
    /// The peaks of the counts since the start.
    pub peaks: Counts,
}

impl Snapshot {
    /// The counters summed over shards.
    pub fn metrics(&self) -> Metrics {
        let mut total = Metrics::default();
        for s in &self.shards {
            total.merge(&s.metrics);
        }
        total
    }
}

/// Where the shards publish their snapshots.
pub struct Board {
    shards: Vec<Mutex<ShardStats>>,
    peaks: Mutex<Counts>,
}

impl Board {
    /// A board for `shards` shards, all at zero.
    pub fn new(shards: usize) -> Board {
        Board {
            shards: (0..shards)
                .map(|_| Mutex::new(ShardStats::default()))
                .collect(),
            peaks: Mutex::new(Counts::default()),
        }
    }

    /// Replaces shard `shard`'s snapshot.
    pub fn publish(&self, shard: usize, stats: ShardStats) {
        if let Some(m) = self.shards.get(shard) {
            *m.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        }
    }

    /// The shards' latest snapshots.
    pub fn shards(&self) -> Vec<ShardStats> {
        self.shards
            .iter()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// The snapshots, their counts and the peaks (which these counts raise if they are new
    /// highs).
    pub fn snapshot(&self) -> Snapshot {
        let shards = self.shards();
        let counts = Counts::of(&shards);
        let mut peaks = self.peaks.lock().unwrap_or_else(|e| e.into_inner());
        *peaks = peaks.max(counts);
        Snapshot {
            shards,
            counts,
            peaks: *peaks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_the_shards_and_peaks_stay() {
        let board = Board::new(2);
        let s = |connections, topics| ShardStats {
            connections,
            topics,
            local_filters: 2,
            ..ShardStats::default()
        };
        board.publish(0, s(3, 4));
        board.publish(1, s(4, 5));
        let snap = board.snapshot();
        assert_eq!(
            (
                snap.counts.connections,
                snap.counts.topics,
                snap.counts.routes
            ),
            (7, 5, 4)
        );
        board.publish(0, s(0, 5));
        let snap = board.snapshot();
        assert_eq!((snap.counts.connections, snap.peaks.connections), (4, 7));
    }
}
