//! Results: what a run measured (JSON, with every parameter), the one-screen summary, and the
//! side-by-side comparison of several brokers.

use crate::scenario::Scenario;
use crate::stats::{Delivery, LatencySummary};
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// One second of a pubsub run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since publishing started.
    pub t: f64,
    /// Messages published in that second.
    pub sent: u64,
    /// Messages received in that second.
    pub received: u64,
    /// 99th percentile latency of that second (µs).
    pub p99_us: f64,
    /// Whether the second belongs to the measurement (not the warm-up).
    pub measured: bool,
}

/// What a pubsub run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PubsubResult {
    /// Length of the measurement window.
    pub measured_secs: f64,
    /// Messages published in the window.
    pub sent: u64,
    /// Messages received in the window.
    pub received: u64,
    /// Messages per second in.
    pub rate_in: f64,
    /// Messages per second out.
    pub rate_out: f64,
    /// Per-second figures, warm-up included.
    pub series: Vec<Second>,
    /// End-to-end latency over the window.
    pub latency: LatencySummary,
    /// CONNACK latency.
    pub connack: LatencySummary,
    /// Loss and duplicates over the whole run.
    pub delivery: Delivery,
    /// Errors seen by clients.
    pub errors: u64,
    /// The first few of them.
    pub error_samples: Vec<String>,
    /// The broker's highest resident memory seen during the run, sampled every second (with
    /// `--pid`).
    #[serde(default)]
    pub broker_rss_peak: Option<u64>,
}

/// What a conn run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnResult {
    /// Connections asked for.
    pub connections: usize,
    /// Connections that got CONNACK 0.
    pub opened: usize,
    /// Connections that failed.
    pub failed: usize,
    /// Time until every connection was answered.
    pub connect_secs: f64,
    /// Connections per second.
    pub connect_rate: f64,
    /// CONNACK latency.
    pub connack: LatencySummary,
    /// Broker RSS before connecting (bytes).
    pub rss_before: Option<u64>,
    /// Broker RSS 3 s after the last CONNACK (bytes).
    pub rss_after: Option<u64>,
    /// RSS growth per connection (bytes).
    pub rss_per_connection: Option<f64>,
    /// Errors seen.
    pub errors: u64,
    /// The first few of them.
    pub error_samples: Vec<String>,
}

/// Outcome of one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Outcome {
    /// A pubsub run.
    Pubsub(PubsubResult),
    /// A conn run.
    Conn(ConnResult),
}

/// One scenario run against one broker, with everything needed to reproduce it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// "shardmq-bench".
    pub tool: String,
    /// Harness version.
    pub version: String,
    /// Broker name.
    pub broker: String,
    /// Broker address.
    pub addr: String,
    /// What the connections travelled over (reports from before it was recorded: TCP).
    #[serde(default)]
    pub transport: crate::transport::Kind,
    /// Broker pid, if known.
    pub pid: Option<u32>,
    /// Scenario parameters.
    pub scenario: Scenario,
    /// Load-generator threads.
    pub threads: usize,
    /// CPUs the load generator was pinned to.
    pub cpus: Option<Vec<usize>>,
    /// Start time (Unix seconds).
    pub started_at: u64,
    /// What was measured.
    pub outcome: Outcome,
}

fn num(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// The one-screen summary of several reports.
pub fn summary(reports: &[Report]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:<12} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6} {:>5} {:>6} {:>7}",
        "scenario",
        "broker",
        "in/s",
        "out/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "lost",
        "dups",
        "once",
        "errors",
        "RSS MB"
    );
    for r in reports {
        match &r.outcome {
            Outcome::Pubsub(p) => {
                let _ = writeln!(
                    s,
                    "{:<22} {:<12} {:>10} {:>10} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>7} {:>6} {:>5} {:>6} {:>7}",
                    r.scenario.name(),
                    r.broker,
                    num(p.rate_in),
                    num(p.rate_out),
                    p.latency.p50_us,
                    p.latency.p99_us,
                    p.latency.p999_us,
                    p.latency.max_us,
                    p.delivery.lost,
                    p.delivery.duplicates,
                    if p.delivery.exactly_once { "yes" } else { "no" },
                    p.errors,
                    p.broker_rss_peak
                        .map_or("n/a".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0))
                );
            }
            Outcome::Conn(c) => {
                let rss = c
                    .rss_per_connection
                    .map_or("n/a".to_string(), |b| format!("{:.0} B/conn", b));
                let _ = writeln!(
                    s,
                    "{:<22} {:<12} {:>10} conn/s  opened {}/{}  CONNACK p50 {:.0} µs p99 {:.0} µs  RSS {}  errors {}",
                    r.scenario.name(),
                    r.broker,
                    num(c.connect_rate),
                    c.opened,
                    c.connections,
                    c.connack.p50_us,
                    c.connack.p99_us,
                    rss,
                    c.errors
                );
            }
        }
    }
    s
}

/// What the summary's columns mean, as a literal (for `--help`, built with `concat!`).
macro_rules! legend {
    () => {
        "\
in/s, out/s: messages published and received per second in the measured time (warm-up excluded)
p50 … max µs: publish-to-receive latency of the messages sent in the measured time
lost: messages a subscriber should have received and never did; dups: received more than once
once: yes when every expected message arrived exactly once (nothing lost, nothing duplicated)
errors: connection and protocol errors seen by the clients
RSS MB: the broker's highest resident memory during the run (with --pid; n/a without)
conn rows: connections opened per second, CONNACK latency, broker memory per connection (--pid)
"
    };
}
pub(crate) use legend;

/// What the summary's columns mean (printed under it, and in `--help`).
pub const LEGEND: &str = legend!();

/// The headline figure of a report: messages/s out for pubsub, bytes per connection for conn.
pub fn headline(r: &Report) -> Option<f64> {
    match &r.outcome {
        Outcome::Pubsub(p) => Some(p.rate_out),
        Outcome::Conn(c) => c.rss_per_connection,
    }
}

/// A row of the comparison: name, how to read it from a report, whether higher is better.
type Metric = (&'static str, Box<dyn Fn(&Report) -> Option<f64>>, bool);

/// A markdown table comparing brokers per scenario, with the ratio of the first broker to
/// each other one (throughput: higher is better; memory per connection: lower is better).
pub fn comparison_markdown(reports: &[Report]) -> String {
    let mut brokers: Vec<&str> = Vec::new();
    let mut scenarios: Vec<&str> = Vec::new();
    for r in reports {
        if !brokers.contains(&r.broker.as_str()) {
            brokers.push(&r.broker);
        }
        if !scenarios.contains(&r.scenario.name()) {
            scenarios.push(r.scenario.name());
        }
    }
    let mut s = String::new();
    let _ = write!(s, "| scenario | metric |");
    for b in &brokers {
        let _ = write!(s, " {b} |");
    }
    for b in brokers.iter().skip(1) {
        let _ = write!(s, " {} / {b} |", brokers[0]);
    }
    let _ = writeln!(s);
    let _ = write!(s, "|---|---|");
    for _ in 0..brokers.len() * 2 - 1 {
        let _ = write!(s, "---|");
    }
    let _ = writeln!(s);
    for sc in &scenarios {
        let find = |b: &str| {
            reports
                .iter()
                .find(|r| r.broker == b && r.scenario.name() == *sc)
        };
        let Some(first) = find(brokers[0]) else {
            continue;
        };
        let rows: Vec<Metric> = match &first.outcome {
            Outcome::Pubsub(_) => vec![
                ("msgs/s out", Box::new(headline), true),
                ("p50 µs", Box::new(|r: &Report| lat(r, |l| l.p50_us)), false),
                ("p99 µs", Box::new(|r: &Report| lat(r, |l| l.p99_us)), false),
                (
                    "lost",
                    Box::new(|r: &Report| match &r.outcome {
                        Outcome::Pubsub(p) => Some(p.delivery.lost as f64),
                        _ => None,
                    }),
                    false,
                ),
            ],
            Outcome::Conn(_) => vec![
                ("RSS B/conn", Box::new(headline), false),
                (
                    "conn/s",
                    Box::new(|r: &Report| match &r.outcome {
                        Outcome::Conn(c) => Some(c.connect_rate),
                        _ => None,
                    }),
                    true,
                ),
            ],
        };
        for (metric, f, higher_better) in rows {
            let _ = write!(s, "| {sc} | {metric} |");
            let vals: Vec<Option<f64>> = brokers.iter().map(|b| find(b).and_then(&f)).collect();
            for v in &vals {
                let _ = write!(s, " {} |", v.map_or("–".into(), num));
            }
            for v in vals.iter().skip(1) {
                let ratio = match (vals[0], v) {
                    (Some(a), Some(b)) if metric != "lost" && a > 0.0 && *b > 0.0 => {
                        let r = if higher_better { a / b } else { b / a };
                        format!("{r:.2}×")
                    }
                    _ => "–".into(),
                };
                let _ = write!(s, " {ratio} |");
            }
            let _ = writeln!(s);
        }
    }
    s
}

fn lat(r: &Report, f: impl Fn(&LatencySummary) -> f64) -> Option<f64> {
    match &r.outcome {
        Outcome::Pubsub(p) if p.latency.count > 0 => Some(f(&p.latency)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{ConnScenario, Pattern, PubsubScenario};
    use shardmq_protocol::units::{ByteSize, Duration};

    fn pubsub(broker: &str, rate: f64, p99: f64) -> Report {
        Report {
            tool: "shardmq-bench".into(),
            version: "0".into(),
            broker: broker.into(),
            addr: "127.0.0.1:1".into(),
            transport: crate::transport::Kind::Tcp,
            pid: None,
            scenario: Scenario::Pubsub(PubsubScenario {
                name: "p2p".into(),
                publishers: 1,
                subscribers: 1,
                pattern: Pattern::P2p,
                qos: 0,
                payload: ByteSize(16),
                rate: 0.0,
                inflight: 16,
                duration: Duration::secs(1),
                warmup: Duration::secs(0),
                drain: Duration::secs(1),
                keepalive: 60,
                raw: false,
                tcpgw: None,
                tcpgw_port: 8090,
                mqttsn_port: None,
            }),
            threads: 1,
            cpus: None,
            started_at: 0,
            outcome: Outcome::Pubsub(PubsubResult {
                measured_secs: 1.0,
                sent: rate as u64,
                received: rate as u64,
                rate_in: rate,
                rate_out: rate,
                series: vec![],
                latency: LatencySummary {
                    count: 1,
                    p99_us: p99,
                    ..Default::default()
                },
                connack: LatencySummary::default(),
                delivery: Delivery {
                    expected: 10,
                    received: 10,
                    ..Default::default()
                },
                errors: 0,
                error_samples: vec![],
                broker_rss_peak: None,
            }),
        }
    }

    #[test]
    fn comparison_shows_ratios() {
        let md = comparison_markdown(&[
            pubsub("shardmq", 300_000.0, 100.0),
            pubsub("mosquitto", 100_000.0, 400.0),
        ]);
        assert!(md.contains("| shardmq / mosquitto |"), "{md}");
        assert!(
            md.contains("| p2p | msgs/s out | 300.0k | 100.0k | 3.00× |"),
            "{md}"
        );
        assert!(md.contains("| p2p | p99 µs | 100 | 400 | 4.00× |"), "{md}");
    }

    #[test]
    fn summary_and_json_round_trip() {
        let mut r = pubsub("shardmq", 1234.0, 5.0);
        assert!(summary(&[r.clone()]).contains("shardmq"));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), r);
        r.scenario = Scenario::Conn(ConnScenario {
            name: "c".into(),
            connections: 1,
            rate: 0.0,
            hold: Duration::secs(1),
            keepalive: 60,
        });
        r.outcome = Outcome::Conn(ConnResult {
            connections: 1,
            opened: 1,
            failed: 0,
            connect_secs: 0.1,
            connect_rate: 10.0,
            connack: LatencySummary::default(),
            rss_before: Some(1),
            rss_after: Some(1001),
            rss_per_connection: Some(1000.0),
            errors: 0,
            error_samples: vec![],
        });
        assert!(summary(&[r]).contains("1000 B/conn"));
    }
}
