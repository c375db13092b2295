//! Scenarios: what load to generate. Each is a subcommand with flags and can also be written
//! in a TOML file (`bench-harness/scenarios/*.toml`) as a list of `[[scenario]]` tables.

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use shardmq_protocol::units::{ByteSize, Duration};

/// Which publishers reach which subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Publisher i → subscriber i (`bench/<run>/p2p/<i>`); as many subscribers as publishers.
    P2p,
    /// Every publisher → every subscriber, one topic (`bench/<run>/fanout`).
    Fanout,
    /// Publisher i on `bench/<run>/fanin/<i>` → every subscriber on `bench/<run>/fanin/+`.
    Fanin,
}

/// `conn`: open connections at a target rate and hold them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct ConnScenario {
    /// Name used in reports.
    #[arg(long, default_value = "conn")]
    #[serde(default = "default_conn_name")]
    pub name: String,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connections opened per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub rate: f64,
    /// How long to hold them after the last CONNACK.
    #[arg(long, default_value = "5s")]
    #[serde(default = "default_hold")]
    pub hold: Duration,
    /// Keepalive (seconds) sent in CONNECT; the harness pings at half of it.
    #[arg(long, default_value_t = 60)]
    #[serde(default = "default_keepalive")]
    pub keepalive: u16,
}

/// `pubsub`: publishers and subscribers exchanging timestamped, numbered messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct PubsubScenario {
    /// Name used in reports.
    #[arg(long, default_value = "pubsub")]
    #[serde(default = "default_pubsub_name")]
    pub name: String,
    /// Publisher connections.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Subscriber connections (p2p: must equal publishers).
    #[arg(long, default_value_t = 1)]
    pub subscribers: usize,
    /// Topic pattern.
    #[arg(long, value_enum, default_value = "p2p")]
    pub pattern: Pattern,
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub qos: u8,
    /// Payload size (at least 16 bytes: publisher, sequence number, send time).
    #[arg(long, default_value = "16")]
    #[serde(default = "default_payload")]
    pub payload: ByteSize,
    /// Messages per second per publisher; 0 = as fast as the broker takes them (closed loop).
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub rate: f64,
    /// Closed loop (rate 0): messages per publisher on their way to subscribers at once
    /// (published, not yet received by every subscriber). Also bounds unacknowledged
    /// publishes at QoS 1/2.
    #[arg(long, default_value_t = 16)]
    #[serde(default = "default_inflight")]
    pub inflight: usize,
    /// Measured time (the run takes the warm-up before it, plus set-up and drain).
    #[arg(long, default_value = "10s")]
    #[serde(default = "default_duration")]
    pub duration: Duration,
    /// Publishing before the measured time, not counted (buffers, TCP windows and the
    /// broker's caches settle).
    #[arg(long, default_value = "2s")]
    #[serde(default = "default_warmup")]
    pub warmup: Duration,
    /// Longest wait for messages still in flight after publishers stop.
    #[arg(long, default_value = "5s")]
    #[serde(default = "default_drain")]
    pub drain: Duration,
    /// Keepalive (seconds) sent in CONNECT.
    #[arg(long, default_value_t = 60)]
    #[serde(default = "default_keepalive")]
    pub keepalive: u16,
    /// Talk to a raw forwarder (`shardmq-bench forwarder`) instead of an MQTT broker: no
    /// CONNECT/SUBSCRIBE handshake, p2p and QoS 0 only.
    #[arg(long)]
    #[serde(default)]
    pub raw: bool,
    /// Through ShardMQ's private TCP gateway: `up` makes the publishers devices (their
    /// DATATRANS frames reach MQTT subscribers on `tcp/<device>/up`), `down` the subscribers
    /// (MQTT publishers send on `tcp/<device>/dn`). p2p, QoS 0.
    #[arg(long, value_enum)]
    #[serde(default)]
    pub tcpgw: Option<GatewayDirection>,
    /// The TCP gateway's port, on the broker's host.
    #[arg(long, default_value_t = 8090)]
    #[serde(default = "default_tcpgw_port")]
    pub tcpgw_port: u16,
    /// Through ShardMQ's MQTT-SN gateway on this UDP port of the broker's host: the
    /// publishers are MQTT-SN clients (CONNECT, REGISTER their topic, PUBLISH by topic id) and
    /// the subscribers MQTT clients. p2p, QoS 0 or 1; at QoS 1 each publisher waits for the
    /// PUBACK of one message before the next (as MQTT-SN clients do) and sends it again after
    /// a second without one.
    #[arg(long)]
    #[serde(default)]
    pub mqttsn_port: Option<u16>,
}

/// Which side of a `--tcpgw` run the devices are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GatewayDirection {
    /// Devices publish (uplink).
    Up,
    /// Devices receive (downlink).
    Down,
}

fn default_tcpgw_port() -> u16 {
    8090
}

fn default_conn_name() -> String {
    "conn".into()
}
fn default_pubsub_name() -> String {
    "pubsub".into()
}
fn default_hold() -> Duration {
    Duration::secs(5)
}
fn default_keepalive() -> u16 {
    60
}
fn default_payload() -> ByteSize {
    ByteSize(16)
}
fn default_inflight() -> usize {
    16
}
fn default_duration() -> Duration {
    Duration::secs(10)
}
fn default_warmup() -> Duration {
    Duration::secs(2)
}
fn default_drain() -> Duration {
    Duration::secs(5)
}

/// One scenario of a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Scenario {
    /// See [`ConnScenario`].
    Conn(ConnScenario),
    /// See [`PubsubScenario`].
    Pubsub(PubsubScenario),
}

impl Scenario {
    /// Its name.
    pub fn name(&self) -> &str {
        match self {
            Scenario::Conn(c) => &c.name,
            Scenario::Pubsub(p) => &p.name,
        }
    }

    /// Checks values that parse but cannot run.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Scenario::Conn(c) => {
                if c.connections == 0 {
                    return Err(format!("{}: connections must be at least 1", c.name));
                }
                if c.rate < 0.0 || !c.rate.is_finite() {
                    return Err(format!("{}: rate must be ≥ 0", c.name));
                }
            }
            Scenario::Pubsub(p) => {
                let fail = |m: &str| Err(format!("{}: {m}", p.name));
                if p.publishers == 0 || p.subscribers == 0 {
                    return fail("needs at least one publisher and one subscriber");
                }
                if p.pattern == Pattern::P2p && p.publishers != p.subscribers {
                    return fail("p2p needs as many subscribers as publishers");
                }
                if p.tcpgw.is_some() && (p.pattern != Pattern::P2p || p.qos != 0 || p.raw) {
                    return fail("--tcpgw runs p2p at QoS 0 (the gateway's data is QoS 0)");
                }
                if p.tcpgw.is_some() && p.payload.0 > 65_535 {
                    return fail("--tcpgw payloads are at most 65535 bytes (one DATATRANS)");
                }
                if p.mqttsn_port.is_some()
                    && (p.pattern != Pattern::P2p || p.qos > 1 || p.raw || p.tcpgw.is_some())
                {
                    return fail("--mqttsn-port runs p2p at QoS 0 or 1, without --raw or --tcpgw");
                }
                if p.mqttsn_port.is_some() && p.payload.0 > 60_000 {
                    return fail("--mqttsn-port payloads are at most 60000 bytes (one datagram)");
                }
                if p.qos > 2 {
                    return fail("qos must be 0, 1 or 2");
                }
                if p.payload.0 < crate::stats::HEADER_LEN as u64 {
                    return fail("payload must be at least 16 bytes");
                }
                if p.payload.0 > 256 << 20 {
                    return fail("payload must be at most 256MB");
                }
                if p.rate < 0.0 || !p.rate.is_finite() {
                    return fail("rate must be ≥ 0");
                }
                if p.inflight == 0 || p.inflight > 65_000 {
                    return fail("inflight must be between 1 and 65000");
                }
                if p.duration.enabled().is_none() {
                    return fail("duration must be more than 0s");
                }
                if p.raw && (p.pattern != Pattern::P2p || p.qos != 0) {
                    return fail("raw (forwarder) mode is p2p at QoS 0 only");
                }
            }
        }
        Ok(())
    }
}

/// A scenario file: `[[scenario]]` tables with `kind = "conn"` or `kind = "pubsub"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// The scenarios, run in order.
    pub scenario: Vec<Scenario>,
}

/// Parses and validates a scenario file.
pub fn parse_file(text: &str) -> Result<Vec<Scenario>, String> {
    let f: ScenarioFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if f.scenario.is_empty() {
        return Err("no [[scenario]] in the file".into());
    }
    for s in &f.scenario {
        s.validate()?;
    }
    Ok(f.scenario)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds_with_defaults() {
        let s = parse_file(
            r#"
            [[scenario]]
            kind = "pubsub"
            name = "p2p-qos1"
            publishers = 10
            subscribers = 10
            pattern = "p2p"
            qos = 1
            payload = "1KB"
            duration = "3s"

            [[scenario]]
            kind = "conn"
            connections = 500
            rate = 1000.0
            "#,
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        let Scenario::Pubsub(p) = &s[0] else { panic!() };
        assert_eq!(
            (p.publishers, p.qos, p.payload, p.duration),
            (10, 1, ByteSize(1024), Duration::secs(3))
        );
        assert_eq!(
            (p.inflight, p.warmup, p.rate, p.raw),
            (16, Duration::secs(2), 0.0, false)
        );
        let Scenario::Conn(c) = &s[1] else { panic!() };
        assert_eq!(
            (c.name.as_str(), c.connections, c.keepalive),
            ("conn", 500, 60)
        );
    }

    #[test]
    fn refuses_impossible_scenarios() {
        for (bad, why) in [
            ("kind = \"pubsub\"\npublishers = 2\nsubscribers = 3\npattern = \"p2p\"", "p2p"),
            ("kind = \"pubsub\"\npublishers = 1\nsubscribers = 1\npattern = \"fanout\"\nqos = 3", "qos"),
            ("kind = \"pubsub\"\npublishers = 1\nsubscribers = 1\npattern = \"p2p\"\npayload = 8", "16 bytes"),
            ("kind = \"pubsub\"\npublishers = 1\nsubscribers = 1\npattern = \"fanin\"\nraw = true", "raw"),
            ("kind = \"pubsub\"\npublishers = 1\nsubscribers = 1\npattern = \"p2p\"\nbogus = 1", "bogus"),
            ("kind = \"conn\"\nconnections = 0", "connections"),
            ("kind = \"carrier-pigeon\"", "carrier-pigeon"),
        ] {
            let e = parse_file(&format!("[[scenario]]\n{bad}\n")).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(parse_file("scenario = []").is_err());
    }

    #[test]
    fn shipped_scenario_files_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                parse_file(&std::fs::read_to_string(&path).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n > 0);
    }
}
