//! `gateway.*` (which gateways run, on which shard) and `tcp.*` (the private TCP gateway:
//! the seed document's `tcp.proto.*` and `tcp.listener.*` keys).

use super::{invalid, parse_force_shutdown, values, ByteSize, ConfigError, Duration};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// `gateway.*`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaysConfig {
    /// `gateway.tcp.*`: the private TCP gateway.
    pub tcp: GatewaySlot,
}

/// Whether a gateway runs, and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySlot {
    /// Started with the broker (`shardmq ctl gateways load|unload` change it at runtime).
    pub enable: bool,
    /// The shard that hosts it (an index into `shards.cpus`; profiles set it).
    pub shard: usize,
}

impl Default for GatewaySlot {
    fn default() -> Self {
        GatewaySlot {
            enable: true,
            shard: 0,
        }
    }
}

/// `tcp.*`: the private TCP gateway (EMQX's emqx-tcp).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpGatewayConfig {
    /// `tcp.proto.*`: the protocol's settings.
    pub proto: TcpProtoConfig,
    /// `tcp.listener.*`: where devices connect.
    pub listener: TcpGwListeners,
}

/// `tcp.proto.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpProtoConfig {
    /// A device that sends no CONNECT within this time is closed. EMQX:
    /// `tcp.proto.idle_timeout`.
    pub idle_timeout: Duration,
    /// Where a device's DATATRANS frames are published (`%c` client id, `%u` username).
    pub up_topic: String,
    /// What a device receives (subscribed at QoS 0 when it connects).
    pub dn_topic: String,
    /// Largest DATATRANS accepted from a device (at most 65535, what the frame holds).
    pub max_packet_size: ByteSize,
    /// Count the gateway's frames and bytes in the broker's metrics (`tcpgw_*`).
    pub enable_stats: bool,
    /// `"FRAMES|BYTES"`: after a connection has moved that many frames or bytes, its buffers
    /// are given back (a busy device keeps none it does not use); `"off"` = never.
    pub force_gc_policy: String,
    /// `"FRAMES|BYTES"`: a device with more frames or bytes waiting for it is disconnected
    /// (logged and counted); `"off"` = never.
    pub force_shutdown_policy: String,
}

impl Default for TcpProtoConfig {
    fn default() -> Self {
        TcpProtoConfig {
            idle_timeout: Duration::secs(15),
            up_topic: "tcp/%c/up".into(),
            dn_topic: "tcp/%c/dn".into(),
            max_packet_size: ByteSize(65_535),
            enable_stats: true,
            force_gc_policy: "1000|1MB".into(),
            force_shutdown_policy: "8000|800MB".into(),
        }
    }
}

/// `tcp.listener.*`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpGwListeners {
    /// `tcp.listener.external.*`
    pub external: TcpGwListenerConfig,
    /// `tcp.listener.ssl.*`
    pub ssl: TcpGwSslListeners,
}

/// `tcp.listener.ssl.*`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpGwSslListeners {
    /// `tcp.listener.ssl.external.*`
    pub external: super::TcpGwSslListenerConfig,
}

/// `tcp.listener.external.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpGwListenerConfig {
    /// Address devices connect to. EMQX: `tcp.listener.external` (TOML cannot hold a value
    /// beside sub-keys, hence `.bind`).
    #[serde(deserialize_with = "values::bind_addr")]
    pub bind: SocketAddr,
    /// Accept operations kept in flight on the gateway's shard at once (one shard runs the
    /// gateway; several outstanding accepts let a burst of devices in per ring round-trip).
    /// EMQX: `tcp.listener.external.acceptors`.
    pub acceptors: usize,
    /// Devices connected at once; further ones are closed at accept and counted.
    pub max_connections: usize,
    /// New connections accepted per second (a burst of one second's worth); 0 = no limit.
    pub max_conn_rate: u32,
    /// Listen backlog.
    pub backlog: u32,
    /// TCP_NODELAY on accepted sockets.
    pub nodelay: bool,
}

impl Default for TcpGwListenerConfig {
    fn default() -> Self {
        TcpGwListenerConfig {
            bind: SocketAddr::from(([0, 0, 0, 0], 8090)),
            acceptors: 8,
            max_connections: 1_024_000,
            max_conn_rate: 1000,
            backlog: 1024,
            nodelay: true,
        }
    }
}

impl TcpGatewayConfig {
    /// Checks the values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.proto;
        if p.idle_timeout.enabled().is_none() {
            return Err(invalid("tcp.proto.idle_timeout", "must be more than 0s"));
        }
        for (key, topic) in [
            ("tcp.proto.up_topic", &p.up_topic),
            ("tcp.proto.dn_topic", &p.dn_topic),
        ] {
            let probe = topic.replace("%c", "c").replace("%u", "u");
            if probe.is_empty() || probe.contains(['+', '#']) && key.ends_with("up_topic") {
                return Err(invalid(key, format!("{topic:?} is not a topic name")));
            }
        }
        if p.max_packet_size.0 == 0 || p.max_packet_size.0 > 65_535 {
            return Err(invalid(
                "tcp.proto.max_packet_size",
                "must be between 1B and 65535B",
            ));
        }
        parse_force_shutdown(&p.force_gc_policy)
            .map_err(|e| invalid("tcp.proto.force_gc_policy", e))?;
        parse_force_shutdown(&p.force_shutdown_policy)
            .map_err(|e| invalid("tcp.proto.force_shutdown_policy", e))?;
        let l = &self.listener.external;
        if l.acceptors == 0 || l.acceptors > 1024 {
            return Err(invalid(
                "tcp.listener.external.acceptors",
                "must be between 1 and 1024",
            ));
        }
        if l.max_connections == 0 {
            return Err(invalid(
                "tcp.listener.external.max_connections",
                "must be at least 1",
            ));
        }
        let s = &self.listener.ssl.external;
        if s.acceptors == 0 || s.acceptors > 1024 {
            return Err(invalid(
                "tcp.listener.ssl.external.acceptors",
                "must be between 1 and 1024",
            ));
        }
        if s.max_connections == 0 {
            return Err(invalid(
                "tcp.listener.ssl.external.max_connections",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
