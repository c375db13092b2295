//! `gateway.*` (which gateways run, on which shard), `tcp.*` (the private TCP gateway: the
//! seed document's `tcp.proto.*` and `tcp.listener.*` keys) and `mqtt.sn.*` (the MQTT-SN
//! gateway, the seed document's keys and a few of ShardMQ's) and `lwm2m.*` (the LwM2M gateway).

use super::{invalid, parse_force_shutdown, values, ByteSize, ConfigError, Duration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// `gateway.*`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaysConfig {
    /// `gateway.tcp.*`: the private TCP gateway.
    pub tcp: GatewaySlot,
    /// `gateway.mqttsn.*`: the MQTT-SN gateway (its settings are `mqtt.sn.*`).
    pub mqttsn: GatewaySlot,
    /// `gateway.lwm2m.*`: the LwM2M gateway (its settings are `lwm2m.*`).
    pub lwm2m: GatewaySlot,
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

/// `mqtt.sn.*`: the MQTT-SN gateway (EMQX's emqx-sn, `mqtt.sn.*` there too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSnConfig {
    /// UDP port. EMQX: `mqtt.sn.port`.
    pub port: u16,
    /// The IP address the socket binds (the seed's `mqtt.sn.port` has the port only).
    pub bind: IpAddr,
    /// Seconds between two ADVERTISE messages (and the duration they announce). EMQX:
    /// `mqtt.sn.advertise_duration`.
    pub advertise_duration: Duration,
    /// Where ADVERTISE goes: `IP:PORT` (a broadcast address such as `192.168.1.255:1884`, or
    /// a unicast one); `""` = never advertise (the default: a broadcast leaves the machine).
    pub advertise_address: String,
    /// The gateway id in ADVERTISE and GWINFO. EMQX: `mqtt.sn.gateway_id`.
    pub gateway_id: u8,
    /// The username every MQTT-SN client connects with (MQTT-SN has no credentials of its
    /// own); `""` = none. EMQX: `mqtt.sn.username`.
    pub username: String,
    /// The password that goes with it; `""` = none. EMQX: `mqtt.sn.password`.
    pub password: String,
    /// Publish QoS −1 messages (sent without a connection, to a predefined id or a short
    /// name). EMQX: `mqtt.sn.enable_qos3`.
    pub enable_qos3: bool,
    /// A client that starts a CONNECT (the will dialogue) must finish it within this time.
    /// EMQX: `mqtt.sn.idle_timeout`.
    pub idle_timeout: Duration,
    /// Count the gateway's datagrams in the metrics (`mqttsn_datagrams_*`). EMQX:
    /// `mqtt.sn.enable_stats`.
    pub enable_stats: bool,
    /// T_retry: a downlink QoS 1/2 message or REGISTER not acknowledged within it is sent
    /// again.
    pub retry_interval: Duration,
    /// N_retry: sends after the first before an unanswering client is taken for lost (its
    /// session ends as after a network error, will published).
    pub max_retries: u32,
    /// Clients known at once (connected, connecting or asleep); further CONNECTs get CONNACK
    /// 0x01 (congestion) and are counted.
    pub max_clients: usize,
    /// Topic ids one client may register (REGISTER, SUBSCRIBE by name, the gateway's own
    /// registrations); beyond it REGISTER gets 0x03 and SUBSCRIBE 0x02.
    pub max_registered_topics: usize,
    /// The socket's receive buffer (SO_RCVBUF): datagrams that arrive while it is full are
    /// lost. The kernel caps it at `net.core.rmem_max` (docs/tuning.md); "0" = the system's
    /// default.
    pub recbuf: ByteSize,
    /// Predefined topics: id (1–65534) → topic name. EMQX: `mqtt.sn.predefined.topic.N`.
    pub predefined: BTreeMap<String, String>,
}

impl Default for MqttSnConfig {
    fn default() -> Self {
        MqttSnConfig {
            port: 1884,
            bind: IpAddr::from([0, 0, 0, 0]),
            advertise_duration: Duration::secs(900),
            advertise_address: String::new(),
            gateway_id: 1,
            username: String::new(),
            password: String::new(),
            enable_qos3: false,
            idle_timeout: Duration::secs(30),
            enable_stats: false,
            retry_interval: Duration::secs(10),
            max_retries: 5,
            max_clients: 100_000,
            max_registered_topics: 1000,
            recbuf: ByteSize(4 << 20),
            predefined: BTreeMap::new(),
        }
    }
}

impl MqttSnConfig {
    /// The address the socket binds.
    pub fn bind_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// Where ADVERTISE goes, if anywhere.
    pub fn advertise_to(&self) -> Option<SocketAddr> {
        values::parse_bind(&self.advertise_address).ok()
    }

    /// The predefined topics by id.
    pub fn predefined_topics(&self) -> Result<Vec<(u16, String)>, ConfigError> {
        let mut v = Vec::new();
        for (id, name) in &self.predefined {
            let key = format!("mqtt.sn.predefined.{id}");
            let n: u16 = id
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..0xFFFF).contains(n))
                .ok_or_else(|| invalid(&key, "the topic id must be a number from 1 to 65534"))?;
            if name.is_empty() || name.contains(['+', '#', '\0']) {
                return Err(invalid(&key, format!("{name:?} is not a topic name")));
            }
            if v.iter().any(|(_, other)| other == name) {
                return Err(invalid(&key, format!("{name:?} has another id already")));
            }
            v.push((n, name.clone()));
        }
        Ok(v)
    }

    /// Checks the values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.predefined_topics()?;
        if !self.advertise_address.trim().is_empty() {
            values::parse_bind(&self.advertise_address)
                .map_err(|e| invalid("mqtt.sn.advertise_address", e))?;
            if self.advertise_duration.enabled().is_none()
                || self.advertise_duration.0.as_secs() > u64::from(u16::MAX)
            {
                return Err(invalid(
                    "mqtt.sn.advertise_duration",
                    "must be between 1s and 65535s",
                ));
            }
        }
        if self.idle_timeout.enabled().is_none() {
            return Err(invalid("mqtt.sn.idle_timeout", "must be more than 0s"));
        }
        if self.retry_interval.enabled().is_none() {
            return Err(invalid("mqtt.sn.retry_interval", "must be more than 0s"));
        }
        if self.max_clients == 0 {
            return Err(invalid("mqtt.sn.max_clients", "must be at least 1"));
        }
        if self.max_registered_topics == 0 {
            return Err(invalid(
                "mqtt.sn.max_registered_topics",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// `lwm2m.topics.*`: the MQTT topics of an endpoint (`%e`: its name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lwm2mTopicsConfig {
    /// Commands to the endpoint. EMQX: `lwm2m.topics.command`.
    pub command: String,
    /// Responses to commands. EMQX: `lwm2m.topics.response`.
    pub response: String,
    /// Observe notifications. EMQX: `lwm2m.topics.notify`.
    pub notify: String,
    /// Register events. EMQX: `lwm2m.topics.register`.
    pub register: String,
    /// Update events. EMQX: `lwm2m.topics.update`.
    pub update: String,
}

impl Default for Lwm2mTopicsConfig {
    fn default() -> Self {
        Lwm2mTopicsConfig {
            command: "lwm2m/%e/command".into(),
            response: "lwm2m/%e/response".into(),
            notify: "lwm2m/%e/notify".into(),
            register: "lwm2m/%e/register".into(),
            update: "lwm2m/%e/update".into(),
        }
    }
}

/// `lwm2m.*`: the LwM2M gateway (EMQX's emqx-lwm2m).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lwm2mConfig {
    /// UDP port of CoAP. EMQX: `lwm2m.port`.
    pub port: u16,
    /// The IP address the sockets bind.
    pub bind: IpAddr,
    /// Where the object definitions are: every `.xml` file in it (relative to the working
    /// directory). EMQX: `lwm2m.xml_dir`.
    pub xml_dir: PathBuf,
    /// Shortest lifetime a device may register with. EMQX: `lwm2m.lifetime_min`.
    pub lifetime_min: Duration,
    /// Longest lifetime. EMQX: `lwm2m.lifetime_max`.
    pub lifetime_max: Duration,
    /// How long a queue-mode device listens after it sent something. EMQX:
    /// `lwm2m.qmode_time_window`.
    pub qmode_time_window: Duration,
    /// Observe every object instance a device registers. EMQX: `lwm2m.auto_observe`.
    pub auto_observe: bool,
    /// When an Update publishes an update event: `contains_object_list` (EMQX's default) or
    /// `always`. EMQX 5: `update_msg_publish_condition`.
    pub update_msg_publish_condition: String,
    /// The MQTT topics.
    pub topics: Lwm2mTopicsConfig,
    /// CoAP's ACK_TIMEOUT: the first wait for a device's acknowledgement (then doubling).
    pub ack_timeout: Duration,
    /// CoAP's MAX_RETRANSMIT: sends after the first before a command is answered 5.04.
    pub max_retransmit: u32,
    /// Endpoints registered at once; more get 5.03.
    pub max_endpoints: usize,
    /// Commands waiting per endpoint (queue mode, or behind the one in flight); more are
    /// answered 5.03.
    pub max_queued: usize,
    /// Largest reply assembled from blocks (Block2).
    pub max_payload: ByteSize,
    /// SO_RCVBUF of the sockets (capped by `net.core.rmem_max`); "0" = the system's default.
    pub recbuf: ByteSize,
    /// UDP port of CoAP over DTLS; it listens once `certfile` or `psk_file` is set. EMQX:
    /// `lwm2m.bind.dtls`.
    pub dtls_port: u16,
    /// The DTLS certificate (PEM; its key must be ECDSA P-256 or P-384). EMQX:
    /// `lwm2m.certfile`.
    pub certfile: Option<PathBuf>,
    /// Its private key (PEM). EMQX: `lwm2m.keyfile`.
    pub keyfile: Option<PathBuf>,
    /// Pre-shared keys, one `identity:hexkey` per line; the identity a device proves becomes
    /// its username.
    pub psk_file: Option<PathBuf>,
}

impl Default for Lwm2mConfig {
    fn default() -> Self {
        Lwm2mConfig {
            port: 5683,
            bind: IpAddr::from([0, 0, 0, 0]),
            xml_dir: PathBuf::from("configs/lwm2m_xml"),
            lifetime_min: Duration::secs(1),
            lifetime_max: Duration::secs(86_400),
            qmode_time_window: Duration::secs(22),
            auto_observe: false,
            update_msg_publish_condition: "contains_object_list".into(),
            topics: Lwm2mTopicsConfig::default(),
            ack_timeout: Duration::secs(2),
            max_retransmit: 4,
            max_endpoints: 100_000,
            max_queued: 100,
            max_payload: ByteSize(64 << 10),
            recbuf: ByteSize(4 << 20),
            dtls_port: 5684,
            certfile: None,
            keyfile: None,
            psk_file: None,
        }
    }
}

impl Lwm2mConfig {
    /// Whether CoAP over DTLS listens (a certificate or a PSK file is set).
    pub fn dtls(&self) -> bool {
        self.certfile.is_some() || self.psk_file.is_some()
    }

    /// The address the DTLS socket binds.
    pub fn dtls_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.dtls_port)
    }

    /// The address the CoAP socket binds.
    pub fn bind_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// Checks the values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let secs = |d: Duration| d.0.as_secs();
        if secs(self.lifetime_min) == 0 || secs(self.lifetime_min) > secs(self.lifetime_max) {
            return Err(invalid(
                "lwm2m.lifetime_min",
                "must be at least 1s and at most lwm2m.lifetime_max",
            ));
        }
        if secs(self.lifetime_max) > u64::from(u32::MAX) {
            return Err(invalid("lwm2m.lifetime_max", "must be at most 4294967295s"));
        }
        if !matches!(
            self.update_msg_publish_condition.as_str(),
            "contains_object_list" | "always"
        ) {
            return Err(invalid(
                "lwm2m.update_msg_publish_condition",
                format!(
                    "{:?} is not contains_object_list or always",
                    self.update_msg_publish_condition
                ),
            ));
        }
        let t = &self.topics;
        for (key, topic) in [
            ("lwm2m.topics.command", &t.command),
            ("lwm2m.topics.response", &t.response),
            ("lwm2m.topics.notify", &t.notify),
            ("lwm2m.topics.register", &t.register),
            ("lwm2m.topics.update", &t.update),
        ] {
            let probe = topic.replace("%e", "e");
            let wild = probe.contains(['+', '#']);
            if probe.is_empty() || (wild && key != "lwm2m.topics.command") {
                return Err(invalid(key, format!("{topic:?} is not a topic name")));
            }
        }
        if self.ack_timeout.enabled().is_none() {
            return Err(invalid("lwm2m.ack_timeout", "must be more than 0s"));
        }
        if self.max_retransmit > 10 {
            return Err(invalid("lwm2m.max_retransmit", "must be at most 10"));
        }
        for (key, v) in [
            ("lwm2m.max_endpoints", self.max_endpoints),
            ("lwm2m.max_queued", self.max_queued),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.max_payload.0 < 16 {
            return Err(invalid("lwm2m.max_payload", "must be at least 16B"));
        }
        match (&self.certfile, &self.keyfile) {
            (Some(_), None) => {
                return Err(invalid("lwm2m.keyfile", "is needed with lwm2m.certfile"))
            }
            (None, Some(_)) => {
                return Err(invalid("lwm2m.certfile", "is needed with lwm2m.keyfile"))
            }
            _ => {}
        }
        if self.dtls() && self.dtls_port == self.port && self.dtls_port != 0 {
            return Err(invalid("lwm2m.dtls_port", "must differ from lwm2m.port"));
        }
        Ok(())
    }
}
