//! The broker's `$SYS/broker/…` topics, published (retained, QoS 0) by the first MQTT shard
//! every `sys.interval`, from the snapshots every shard publishes (`ShardStats`, at most
//! 100 ms old): who the broker is, its counts (with their peaks since start), its counters,
//! and each shard's own figures under `$SYS/broker/shards/<n>/`.
//!
//! Clients subscribe to them like any topic (`$SYS/#`; a filter starting with a wildcard does
//! not match `$` topics, as MQTT requires); the engine drops what clients publish into `$SYS/`.

use super::stats::{Board, Snapshot};
use crate::core::engine::Engine;
use crate::core::time::Timestamp;
use crate::shard::clock;
use bytes::Bytes;
use glommio::timer::sleep;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// What the tree remembers between publications: when the broker started.
pub struct SysTree {
    started: Timestamp,
    node: String,
}

impl SysTree {
    /// A tree for the broker `node`, started at `started`.
    pub fn new(node: &str, started: Timestamp) -> SysTree {
        SysTree {
            started,
            node: node.to_string(),
        }
    }

    /// The `(topic, payload)` pairs for the board's snapshot `snap` at `now`.
    pub fn topics(&self, snap: &Snapshot, now: Timestamp) -> Vec<(String, String)> {
        let stats = &snap.shards;
        let mut out = Vec::new();
        let mut put = |topic: String, value: String| out.push((topic, value));
        let b = "$SYS/broker";
        put(
            format!("{b}/version"),
            format!("ShardMQ {}", env!("CARGO_PKG_VERSION")),
        );
        put(
            format!("{b}/sysdescr"),
            format!(
                "ShardMQ MQTT broker, node {}, {} shards",
                self.node,
                stats.len()
            ),
        );
        put(
            format!("{b}/uptime"),
            format!("{} seconds", now.since(self.started).as_secs()),
        );
        let wall = std::time::UNIX_EPOCH + Duration::from_millis(now.0);
        put(
            format!("{b}/datetime"),
            humantime::format_rfc3339_seconds(wall).to_string(),
        );

        for ((name, count), (_, peak)) in snap.counts.pairs().into_iter().zip(snap.peaks.pairs()) {
            put(format!("{b}/stats/{name}/count"), count.to_string());
            put(format!("{b}/stats/{name}/max"), peak.to_string());
        }

        let m = snap.metrics();
        let dropped = m.dropped_queue_full
            + m.dropped_qos0_offline
            + m.dropped_queue_total
            + m.dropped_slow_consumer
            + m.dropped_shard_write_buffer_full
            + m.dropped_overload
            + m.dropped_duplicates
            + m.dropped_stale_forwards
            + m.sys_publish_denied
            + m.acl_denied_publish;
        for (name, value) in [
            ("bytes/received", m.bytes_received),
            ("bytes/sent", m.bytes_sent),
            ("packets/received", m.packets_received),
            ("packets/sent", m.packets_sent()),
            ("packets/connect/received", m.packets_connect_received),
            ("packets/publish/received", m.packets_publish_received),
            ("packets/puback/received", m.packets_puback_received),
            ("packets/pubrec/received", m.packets_pubrec_received),
            ("packets/pubrel/received", m.packets_pubrel_received),
            ("packets/pubcomp/received", m.packets_pubcomp_received),
            ("packets/subscribe/received", m.packets_subscribe_received),
            (
                "packets/unsubscribe/received",
                m.packets_unsubscribe_received,
            ),
            ("packets/pingreq/received", m.packets_pingreq_received),
            ("packets/disconnect/received", m.packets_disconnect_received),
            ("packets/connack/sent", m.packets_connack_sent),
            ("packets/publish/sent", m.messages_sent),
            ("packets/puback/sent", m.packets_puback_sent),
            ("packets/pubrec/sent", m.packets_pubrec_sent),
            ("packets/pubrel/sent", m.packets_pubrel_sent),
            ("packets/pubcomp/sent", m.packets_pubcomp_sent),
            ("packets/suback/sent", m.packets_suback_sent),
            ("packets/unsuback/sent", m.packets_unsuback_sent),
            ("packets/pingresp/sent", m.packets_pingresp_sent),
            ("messages/received", m.messages_received),
            ("messages/qos0/received", m.messages_qos0_received),
            ("messages/qos1/received", m.messages_qos1_received),
            ("messages/qos2/received", m.messages_qos2_received),
            ("messages/sent", m.messages_sent),
            ("messages/qos0/sent", m.messages_qos0_sent),
            ("messages/qos1/sent", m.messages_qos1_sent),
            ("messages/qos2/sent", m.messages_qos2_sent),
            ("messages/acked", m.messages_acked),
            ("messages/dropped", dropped),
            ("messages/no_subscribers", m.messages_no_subscribers),
            ("messages/retained", m.retained_stored),
            ("messages/wills", m.wills_published),
        ] {
            put(format!("{b}/metrics/{name}"), value.to_string());
        }
        // Every counter by its own name too (docs/operations.md lists them).
        for (name, value) in m.pairs() {
            put(format!("{b}/metrics/counters/{name}"), value.to_string());
        }

        for (n, s) in stats.iter().enumerate() {
            for (name, value) in [
                ("connections", s.connections as u64),
                ("parked", s.parked as u64),
                ("sessions", s.sessions as u64),
                ("subscriptions", s.subscriptions as u64),
                ("routes", s.local_filters as u64),
                ("retained", s.retained),
                ("messages/received", s.metrics.messages_received),
                ("messages/sent", s.metrics.messages_sent),
                ("bytes/received", s.metrics.bytes_received),
                ("bytes/sent", s.metrics.bytes_sent),
            ] {
                put(format!("{b}/shards/{n}/{name}"), value.to_string());
            }
        }
        out
    }
}

/// Publishes the tree through `engine` every `interval`, the first time as soon as every shard
/// has published a snapshot.
pub async fn run(engine: Rc<RefCell<Engine>>, board: Arc<Board>, interval: Duration, node: String) {
    let tree = SysTree::new(&node, clock::now());
    // The shards publish their first snapshot 100 ms after they start.
    sleep(Duration::from_millis(250)).await;
    loop {
        let now = clock::now();
        let topics = tree.topics(&board.snapshot(), now);
        {
            let mut e = engine.borrow_mut();
            for (topic, value) in topics {
                e.publish_system(&topic, Bytes::from(value), true, now);
            }
        }
        sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::shard::stats::ShardStats;

    #[test]
    fn the_tree_sums_the_shards_and_keeps_the_peaks() {
        let tree = SysTree::new("n@h", Timestamp(1_000_000));
        let board = Board::new(2);
        let topics = |a: &ShardStats, b: &ShardStats, now| {
            board.publish(0, a.clone());
            board.publish(1, b.clone());
            tree.topics(&board.snapshot(), now)
        };
        let mut a = ShardStats {
            connections: 3,
            ..ShardStats::default()
        };
        a.metrics.messages_received = 5;
        a.metrics.dropped_queue_full = 1;
        a.metrics.sys_publish_denied = 2;
        let b = ShardStats {
            connections: 4,
            ..ShardStats::default()
        };
        let get = |t: &[(String, String)], k: &str| {
            t.iter()
                .find(|(topic, _)| topic == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no {k}"))
        };
        let t = topics(&a, &b, Timestamp(1_061_500));
        assert_eq!(get(&t, "$SYS/broker/uptime"), "61 seconds");
        assert_eq!(get(&t, "$SYS/broker/datetime"), "1970-01-01T00:17:41Z");
        assert_eq!(get(&t, "$SYS/broker/stats/connections/count"), "7");
        assert_eq!(get(&t, "$SYS/broker/metrics/messages/received"), "5");
        assert_eq!(get(&t, "$SYS/broker/metrics/messages/dropped"), "3");
        assert_eq!(get(&t, "$SYS/broker/shards/1/connections"), "4");
        a.connections = 0;
        let t = topics(&a, &b, Timestamp(1_062_000));
        assert_eq!(get(&t, "$SYS/broker/stats/connections/count"), "4");
        assert_eq!(get(&t, "$SYS/broker/stats/connections/max"), "7");
        assert!(t.iter().all(|(topic, _)| topic.starts_with("$SYS/broker/")));
    }
}
