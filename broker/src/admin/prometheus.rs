//! `GET /metrics` in the Prometheus text exposition format (version 0.0.4): every counter of
//! [`crate::core::metrics::Metrics`] as `shardmq_<name>_total{shard="N"}`, each shard's
//! counts as gauges with the same label, and the broker-wide counts, peaks, uptime and build
//! as gauges without it. Prometheus sums over the label when asked for the whole broker.

use crate::core::metrics::DESCRIPTIONS;
use crate::shard::stats::{ShardStats, Snapshot};
use crate::shard::Shards;
use std::fmt::Write;
use std::time::SystemTime;

/// One metric family: its help and type lines, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Help text may hold any character but a backslash or a line break unescaped.
fn escape_help(s: &str) -> String {
    s.trim().replace('\\', "\\\\").replace('\n', "\\n")
}

/// A label value: backslash, double quote and line break escaped.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The per-shard gauges: (name, help, value of a shard).
type Gauge = (&'static str, &'static str, fn(&ShardStats) -> u64);

const SHARD_GAUGES: [Gauge; 6] = [
    ("connections", "Open connections.", |s| s.connections as u64),
    (
        "connections_parked",
        "Idle connections parked (no driver task).",
        |s| s.parked as u64,
    ),
    ("sessions", "Sessions held, online and offline.", |s| {
        s.sessions as u64
    }),
    (
        "subscriptions",
        "Subscriptions of the sessions held.",
        |s| s.subscriptions as u64,
    ),
    ("routes", "Filters with a subscriber on the shard.", |s| {
        s.local_filters as u64
    }),
    (
        "retained",
        "Retained messages in the shard's partition.",
        |s| s.retained,
    ),
];

/// The exposition of `snap`.
pub fn render(snap: &Snapshot, shards: &Shards) -> String {
    let mut out = String::with_capacity(32 * 1024);
    let per_shard: Vec<Vec<(&'static str, u64)>> =
        snap.shards.iter().map(|s| s.metrics.pairs()).collect();
    for (i, (name, help)) in DESCRIPTIONS.iter().enumerate() {
        let metric = format!("shardmq_{name}_total");
        family(&mut out, &metric, "counter", help);
        for (shard, pairs) in per_shard.iter().enumerate() {
            let _ = writeln!(out, "{metric}{{shard=\"{shard}\"}} {}", pairs[i].1);
        }
    }
    for (name, help, value) in SHARD_GAUGES {
        let metric = format!("shardmq_{name}");
        family(&mut out, &metric, "gauge", help);
        for (shard, s) in snap.shards.iter().enumerate() {
            let _ = writeln!(out, "{metric}{{shard=\"{shard}\"}} {}", value(s));
        }
    }
    family(
        &mut out,
        "shardmq_topics",
        "gauge",
        "Distinct topic filters subscribed to, broker-wide.",
    );
    let _ = writeln!(out, "shardmq_topics {}", snap.counts.topics);
    family(
        &mut out,
        "shardmq_mqueue_bytes",
        "gauge",
        "Topic and payload bytes queued for offline sessions, broker-wide.",
    );
    let _ = writeln!(out, "shardmq_mqueue_bytes {}", snap.counts.mqueue_bytes);
    for (name, peak) in snap.peaks.pairs() {
        let metric = format!("shardmq_{name}_max");
        family(
            &mut out,
            &metric,
            "gauge",
            &format!("Highest broker-wide count of {name} since the start."),
        );
        let _ = writeln!(out, "{metric} {peak}");
    }
    family(
        &mut out,
        "shardmq_uptime_seconds",
        "gauge",
        "Seconds since the broker started.",
    );
    let uptime = SystemTime::now()
        .duration_since(shards.started())
        .map_or(0, |d| d.as_secs());
    let _ = writeln!(out, "shardmq_uptime_seconds {uptime}");
    family(&mut out, "shardmq_shards", "gauge", "Shards (executors).");
    let _ = writeln!(out, "shardmq_shards {}", shards.len());
    family(
        &mut out,
        "shardmq_build_info",
        "gauge",
        "Always 1; the labels tell the version and the node.",
    );
    let _ = writeln!(
        out,
        "shardmq_build_info{{version=\"{}\",node=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        escape_label(shards.node())
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_help_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help(" x\\y\nz "), "x\\\\y\\nz");
    }
}
