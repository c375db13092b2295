//! Configuration: plain data read by the runtime, its loading, and the engine's settings
//! derived from it ([`engine_config`]; the core crates never see this module).
//!
//! Layers, later ones winning: compiled defaults (the `Default` impls here, mirrored key by key
//! in `configs/default.toml`) → `--config FILE` (TOML) → `--profile NAME`
//! (`configs/profiles/NAME.toml`, or the copy compiled into the binary) → environment variables
//! `SHARDMQ_` + the key path with `__` between levels (`SHARDMQ_MQTT__MAX_INFLIGHT=64`).
//! Unknown keys and bad values are errors that name the key. Only [`load`] touches the file
//! system; everything else is plain data.

mod load;
pub mod values;

pub use gateway::{
    GatewaySlot, GatewaysConfig, Lwm2mConfig, Lwm2mTopicsConfig, MqttSnConfig, TcpGatewayConfig,
    TcpGwListenerConfig, TcpGwListeners, TcpGwSslListeners, TcpProtoConfig,
};
pub use load::{env_var, from_toml_str, load, LoadOptions, Loaded, ENV_PREFIX};
use serde::{Deserialize, Serialize};
use shardmq_core::engine::EngineConfig;
use shardmq_core::rate::RateLimit;
use shardmq_core::retained::RetainedLimits;
use shardmq_core::session::SessionLimits;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
pub use values::{ByteSize, Duration, Selection};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `node.*`
    pub node: NodeConfig,
    /// `log.*`
    pub log: LogConfig,
    /// `shards.*`: executors, placement, cross-shard channels.
    pub shards: ShardsConfig,
    /// `listener.*`
    pub listener: ListenersConfig,
    /// `mqtt.*`: protocol and session limits.
    pub mqtt: MqttConfig,
    /// `retainer.*`: retained messages.
    pub retainer: RetainerConfig,
    /// `sys.*`: the broker's `$SYS/` topics.
    pub sys: SysConfig,
    /// `admin.*`: the HTTP API (REST, Prometheus) that `shardmq ctl` talks to.
    pub admin: AdminConfig,
    /// `auth.*`: who may connect.
    pub auth: AuthConfig,
    /// `flapping.*`: banning client ids that reconnect too often.
    pub flapping: FlappingConfig,
    /// `gateway.*`: which gateways run, on which shard.
    pub gateway: GatewaysConfig,
    /// `tcp.*`: the private TCP gateway.
    pub tcp: TcpGatewayConfig,
    /// `lwm2m.*`: the LwM2M gateway.
    pub lwm2m: Lwm2mConfig,
}

/// The log levels a filter may name.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// `log.level`: a level, or a comma-separated list of directives `LEVEL` or `TARGET=LEVEL`
/// (`info,shardmq::shard=debug`) whose levels are all known. A bare word that is not a level
/// (`verbose`, `inf`) is refused: the tracing grammar would take it for a target and log
/// nothing else.
pub fn check_log_filter(s: &str) -> Result<(), String> {
    let expected = || {
        format!(
            "{s:?} is not a log level ({}) or a list of TARGET=LEVEL directives such as \"info,shardmq::shard=debug\"",
            LOG_LEVELS.join(", ")
        )
    };
    if s.trim().is_empty() {
        return Err(expected());
    }
    for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level,
            Some(_) => return Err(expected()),
            None => directive,
        };
        if !LOG_LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            return Err(expected());
        }
    }
    if tracing_subscriber::EnvFilter::try_new(s).is_err() {
        return Err(expected());
    }
    Ok(())
}

/// `mqtt.force_shutdown_policy`: `"MESSAGES|BYTES"` (`"8000|800MB"`), or `"off"`.
pub fn parse_force_shutdown(s: &str) -> Result<Option<(usize, usize)>, String> {
    let s = s.trim();
    if s.is_empty() || s == "off" {
        return Ok(None);
    }
    let (m, b) = s
        .split_once('|')
        .ok_or_else(|| format!("{s:?} is not MESSAGES|BYTES (like \"8000|800MB\") or \"off\""))?;
    let messages: usize = m
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{m:?} is not a positive number of messages"))?;
    let bytes = shardmq_protocol::units::parse_size(b.trim())?;
    if bytes.0 == 0 {
        return Err("the byte limit must be more than 0".into());
    }
    Ok(Some((messages, bytes.as_usize())))
}

/// `auth.allow_anonymous`: `true`, `false` or `"loopback"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllowAnonymous {
    /// Clients without credentials are let in from anywhere.
    True,
    /// Never.
    False,
    /// Only from 127.0.0.0/8 and ::1.
    #[default]
    Loopback,
}

impl Serialize for AllowAnonymous {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AllowAnonymous::True => s.serialize_bool(true),
            AllowAnonymous::False => s.serialize_bool(false),
            AllowAnonymous::Loopback => s.serialize_str("loopback"),
        }
    }
}

impl<'de> Deserialize<'de> for AllowAnonymous {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(AllowAnonymous::True),
            Raw::Bool(false) => Ok(AllowAnonymous::False),
            Raw::Text(t) => match t.as_str() {
                "true" => Ok(AllowAnonymous::True),
                "false" => Ok(AllowAnonymous::False),
                "loopback" => Ok(AllowAnonymous::Loopback),
                other => Err(serde::de::Error::custom(format!(
                    "{other:?} is not true, false or \"loopback\""
                ))),
            },
        }
    }
}

/// `auth.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Clients without credentials (no username, no password, no verified certificate): let
    /// in always, never, or only from a loopback address. Mosquitto: `allow_anonymous`; EMQX:
    /// `allow_anonymous`.
    pub allow_anonymous: AllowAnonymous,
    /// `username:hash` lines (`shardmq passwd` writes them; Mosquitto's `$7$` lines work too).
    /// Unset: credentials are not checked, and their clients count as anonymous. Mosquitto:
    /// `password_file`.
    pub password_file: Option<PathBuf>,
    /// How long a successful check is remembered (per shard), so a client reconnecting with
    /// the same credentials is not hashed again; "0s" = never.
    pub cache_ttl: Duration,
    /// Access rules (TOML `[[rule]]` tables, first match wins). Unset: every client may
    /// publish and subscribe anywhere but `$SYS/`. EMQX: `acl_file`.
    pub acl_file: Option<PathBuf>,
    /// What holds when no rule matches. EMQX: `acl_nomatch`.
    pub acl_nomatch: AclNomatch,
    /// What a denied PUBLISH or SUBSCRIBE costs the client: `ignore` (the PUBLISH is dropped,
    /// the subscription refused with 0x80) or `disconnect`. EMQX: `acl_deny_action`.
    pub acl_deny_action: AclDenyAction,
}

/// `auth.acl_nomatch`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AclNomatch {
    /// Allowed.
    #[default]
    Allow,
    /// Denied.
    Deny,
}

/// `auth.acl_deny_action`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AclDenyAction {
    /// Drop the PUBLISH (acknowledged), refuse the subscription.
    #[default]
    Ignore,
    /// Close the connection.
    Disconnect,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: AllowAnonymous::Loopback,
            password_file: None,
            cache_ttl: Duration::secs(60),
            acl_file: None,
            acl_nomatch: AclNomatch::Allow,
            acl_deny_action: AclDenyAction::Ignore,
        }
    }
}

impl AuthConfig {
    /// The engine's policy.
    pub fn policy(&self) -> shardmq_core::auth::AuthPolicy {
        use shardmq_core::auth::Anonymous;
        shardmq_core::auth::AuthPolicy {
            anonymous: match self.allow_anonymous {
                AllowAnonymous::True => Anonymous::Allow,
                AllowAnonymous::False => Anonymous::Deny,
                AllowAnonymous::Loopback => Anonymous::Loopback,
            },
            verify_credentials: self.password_file.is_some(),
        }
    }

    /// `acl_nomatch` as the rules' permission.
    pub fn nomatch(&self) -> shardmq_core::acl::Permission {
        match self.acl_nomatch {
            AclNomatch::Allow => shardmq_core::acl::Permission::Allow,
            AclNomatch::Deny => shardmq_core::acl::Permission::Deny,
        }
    }
}

/// `admin.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Whether the admin API is started.
    pub enable: bool,
    /// Address of the admin API (REST under `/api/v1`, Prometheus at `/metrics`). A bind that
    /// is not a loopback address needs `username` and `password`, or `api_key`. EMQX:
    /// `dashboard.listeners.http.bind` (18083).
    #[serde(deserialize_with = "values::bind_addr")]
    pub bind: SocketAddr,
    /// Basic-auth user name; requests must carry it when `password` is set.
    pub username: Option<String>,
    /// Basic-auth password (at least 8 characters; no default).
    pub password: Option<String>,
    /// An API key, accepted as `Authorization: Bearer KEY` (at least 16 characters).
    pub api_key: Option<String>,
    /// How long a request waits for a shard's answer before failing with 503.
    pub request_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enable: true,
            bind: SocketAddr::from(([127, 0, 0, 1], 18083)),
            username: None,
            password: None,
            api_key: None,
            request_timeout: Duration::secs(5),
        }
    }
}

impl AdminConfig {
    /// Whether requests must authenticate: always on a non-loopback bind, and wherever
    /// credentials are configured.
    pub fn needs_credentials(&self) -> bool {
        !self.bind.ip().is_loopback() || self.password.is_some() || self.api_key.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.username.is_some() != self.password.is_some() {
            let missing = if self.username.is_some() {
                "admin.password"
            } else {
                "admin.username"
            };
            return Err(invalid(
                missing,
                "admin.username and admin.password go together",
            ));
        }
        if self
            .username
            .as_deref()
            .is_some_and(|u| u.is_empty() || u.contains(':'))
        {
            return Err(invalid(
                "admin.username",
                "must be non-empty and hold no ':'",
            ));
        }
        if self
            .password
            .as_deref()
            .is_some_and(|p| p.chars().count() < 8)
        {
            return Err(invalid("admin.password", "must be at least 8 characters"));
        }
        if self
            .api_key
            .as_deref()
            .is_some_and(|k| k.chars().count() < 16)
        {
            return Err(invalid("admin.api_key", "must be at least 16 characters"));
        }
        if self.enable
            && !self.bind.ip().is_loopback()
            && self.password.is_none()
            && self.api_key.is_none()
        {
            return Err(invalid(
                "admin.bind",
                format!(
                    "{} is not a loopback address: set admin.username and admin.password, or admin.api_key (there is no default password)",
                    self.bind
                ),
            ));
        }
        if self.request_timeout.enabled().is_none() {
            return Err(invalid("admin.request_timeout", "must be more than 0s"));
        }
        Ok(())
    }
}

/// `sys.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SysConfig {
    /// How often the `$SYS/broker/…` tree is published (retained); "0s" = never. EMQX:
    /// `broker.sys_interval`; Mosquitto: `sys_interval`.
    pub interval: Duration,
    /// Publish `$SYS/broker/clients/<clientid>/connected` and `/disconnected` (JSON, not
    /// retained) as clients come and go.
    pub client_events: bool,
}

impl Default for SysConfig {
    fn default() -> Self {
        SysConfig {
            interval: Duration::secs(60),
            client_events: true,
        }
    }
}

/// `flapping.*`: a client id that connects more than `max_count` times within `window` is
/// banned for `ban_time` (its CONNECTs get CONNACK 0x05). EMQX: `flapping_detect_policy =
/// "30, 1m, 5m"` and `zone.external.enable_flapping_detect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlappingConfig {
    /// Whether flapping client ids are banned.
    pub enable: bool,
    /// CONNECTs allowed within `window`; one more bans the client id.
    pub max_count: u32,
    /// The window CONNECTs are counted in.
    pub window: Duration,
    /// How long a flapping client id stays banned.
    pub ban_time: Duration,
}

impl Default for FlappingConfig {
    fn default() -> Self {
        FlappingConfig {
            enable: false,
            max_count: 30,
            window: Duration::secs(60),
            ban_time: Duration::secs(300),
        }
    }
}

impl FlappingConfig {
    /// The engine's policy (`None` when off).
    pub fn policy(&self) -> Option<shardmq_core::ban::FlappingPolicy> {
        self.enable.then_some(shardmq_core::ban::FlappingPolicy {
            max_count: self.max_count,
            window: self.window.0,
            ban_time: self.ban_time.0,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enable {
            return Ok(());
        }
        if self.max_count == 0 {
            return Err(invalid("flapping.max_count", "must be at least 1"));
        }
        if self.window.enabled().is_none() {
            return Err(invalid("flapping.window", "must be more than 0s"));
        }
        if self.ban_time.enabled().is_none() {
            return Err(invalid("flapping.ban_time", "must be more than 0s"));
        }
        Ok(())
    }
}

/// `node.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Node name, used in logs and (later) $SYS topics. EMQX: `node.name`.
    pub name: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: "shardmq@127.0.0.1".into(),
        }
    }
}

/// `log.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or a tracing directive
    /// list such as `info,shardmq::shard=debug`. `RUST_LOG`, when set, wins. EMQX: `log.level`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

/// `shards.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardsConfig {
    /// CPU ids, one shard (glommio executor) pinned to each; "all" = every CPU this process may
    /// run on.
    pub cpus: Selection,
    /// Indexes into `cpus` of the shards that bind the MQTT listeners; "all" = every shard.
    pub mqtt: Selection,
    /// Memory glommio registers with io_uring per shard. The broker does no DMA file I/O, so a
    /// small value keeps locked memory low.
    pub io_memory: ByteSize,
    /// Batches in flight per ordered pair of shards before the sender waits.
    pub channel_capacity: usize,
    /// Most messages in one cross-shard batch.
    pub batch_size: usize,
    /// Most messages of every kind waiting for one destination shard. A full queue drops QoS 0
    /// deliveries (counted), and holds back client input that would add to it (QoS 1/2
    /// PUBLISH, SUBSCRIBE, UNSUBSCRIBE, CONNECT) until the queues are below half.
    pub max_pending: usize,
    /// Bytes waiting to be written to all the connections of one shard together. Above it,
    /// QoS 0 deliveries are dropped (counted) and QoS 1/2 deliveries wait in their sessions'
    /// queues.
    pub max_write_buffer: ByteSize,
    /// Size of each shard's read scratch buffer.
    pub read_buffer: ByteSize,
    /// How long an idle shard busy-polls before it sleeps; "0s" sleeps at once. Spinning trades
    /// CPU for lower wake-up latency.
    pub spin_before_park: Duration,
    /// A connected client with no traffic for this long is parked: its socket waits in the
    /// shard's epoll set with no task and no buffers, and is promoted back on input or on a
    /// delivery. "0s" never parks.
    pub park_idle_after: Duration,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        ShardsConfig {
            cpus: Selection::All,
            mqtt: Selection::All,
            io_memory: ByteSize(512 << 10),
            channel_capacity: 256,
            batch_size: 256,
            max_pending: 65_536,
            max_write_buffer: ByteSize(256 << 20),
            read_buffer: ByteSize(64 << 10),
            spin_before_park: Duration::secs(0),
            park_idle_after: Duration::secs(2),
        }
    }
}

/// `listener.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenersConfig {
    /// `listener.tcp.<name>`: plain MQTT over TCP. The default has one, `external`.
    pub tcp: BTreeMap<String, TcpListenerConfig>,
    /// `listener.ws.<name>`: MQTT over WebSocket. The default has one, `external`.
    pub ws: BTreeMap<String, WsListenerConfig>,
    /// `listener.ssl.<name>`: MQTT over TLS. The default has one, `external`, which starts
    /// only once a certificate is configured.
    pub ssl: BTreeMap<String, SslListenerConfig>,
    /// `listener.wss.<name>`: MQTT over WebSocket over TLS. The default has one, `external`,
    /// which starts only once a certificate is configured.
    pub wss: BTreeMap<String, WssListenerConfig>,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        ListenersConfig {
            tcp: BTreeMap::from([("external".to_string(), TcpListenerConfig::default())]),
            ws: BTreeMap::from([("external".to_string(), WsListenerConfig::default())]),
            ssl: BTreeMap::from([("external".to_string(), SslListenerConfig::default())]),
            wss: BTreeMap::from([("external".to_string(), WssListenerConfig::default())]),
        }
    }
}

/// `verify`: whether a TLS listener asks clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TlsVerify {
    /// No client certificate is asked for.
    #[default]
    VerifyNone,
    /// A client certificate is asked for and, when given, must chain to `cacertfile`.
    VerifyPeer,
}

/// `peer_cert_as_username`: which part of a verified client certificate becomes the
/// connection's username (replacing the CONNECT's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerCertAsUsername {
    /// The subject's common name.
    Cn,
    /// The whole subject, as RFC 4514 writes it (`CN=device-7,O=Acme`).
    Dn,
}

/// The TLS keys a TLS or WSS listener has (`listener.ssl.<name>.*`, `listener.wss.<name>.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsOptions {
    /// PEM certificate chain of the server, leaf first.
    pub certfile: Option<PathBuf>,
    /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1).
    pub keyfile: Option<PathBuf>,
    /// PEM CA certificates that client certificates must chain to.
    pub cacertfile: Option<PathBuf>,
    /// Whether to ask clients for a certificate.
    pub verify: TlsVerify,
    /// With `verify_peer`: refuse a client that sends no certificate.
    pub fail_if_no_peer_cert: bool,
    /// TLS versions offered.
    pub versions: Vec<String>,
    /// How long the handshake may take.
    pub handshake_timeout: Duration,
    /// Which part of a verified client certificate becomes the username.
    pub peer_cert_as_username: Option<PeerCertAsUsername>,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions {
            certfile: None,
            keyfile: None,
            cacertfile: None,
            verify: TlsVerify::VerifyNone,
            fail_if_no_peer_cert: false,
            versions: vec!["tlsv1.2".into(), "tlsv1.3".into()],
            handshake_timeout: Duration::secs(15),
            peer_cert_as_username: None,
        }
    }
}

/// Declares a listener's configuration struct: its own keys with their defaults, then the TLS
/// keys of [`TlsOptions`] (serde cannot flatten them in while refusing unknown keys), with
/// `Default` and `tls()` to read the TLS keys back.
macro_rules! tls_listener {
    ($(#[$meta:meta])* pub struct $name:ident {
        $($(#[$fmeta:meta])* pub $field:ident: $ty:ty = $default:expr,)*
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// PEM certificate chain of the server, leaf first; the listener starts only when
            /// it is set. EMQX: `certfile`.
            pub certfile: Option<PathBuf>,
            /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1). EMQX: `keyfile`.
            pub keyfile: Option<PathBuf>,
            /// PEM CA certificates that client certificates must chain to (with
            /// `verify_peer`). EMQX: `cacertfile`.
            pub cacertfile: Option<PathBuf>,
            /// `verify_none` (default) or `verify_peer`. EMQX: `verify`.
            pub verify: TlsVerify,
            /// With `verify_peer`: refuse a client that sends no certificate. EMQX:
            /// `fail_if_no_peer_cert`.
            pub fail_if_no_peer_cert: bool,
            /// TLS versions offered: `tlsv1.2`, `tlsv1.3`. EMQX: `tls_versions`.
            pub versions: Vec<String>,
            /// The handshake (TLS, and for WSS the HTTP upgrade too) must be done within
            /// this time, or the socket is closed.
            pub handshake_timeout: Duration,
            /// `cn` or `dn`: that part of a verified client certificate replaces the
            /// CONNECT's username. EMQX: `peer_cert_as_username`.
            pub peer_cert_as_username: Option<PeerCertAsUsername>,
        }

        impl Default for $name {
            fn default() -> Self {
                let tls = TlsOptions::default();
                $name {
                    $($field: $default,)*
                    certfile: tls.certfile,
                    keyfile: tls.keyfile,
                    cacertfile: tls.cacertfile,
                    verify: tls.verify,
                    fail_if_no_peer_cert: tls.fail_if_no_peer_cert,
                    versions: tls.versions,
                    handshake_timeout: tls.handshake_timeout,
                    peer_cert_as_username: tls.peer_cert_as_username,
                }
            }
        }

        impl $name {
            /// Its TLS keys.
            pub fn tls(&self) -> TlsOptions {
                TlsOptions {
                    certfile: self.certfile.clone(),
                    keyfile: self.keyfile.clone(),
                    cacertfile: self.cacertfile.clone(),
                    verify: self.verify,
                    fail_if_no_peer_cert: self.fail_if_no_peer_cert,
                    versions: self.versions.clone(),
                    handshake_timeout: self.handshake_timeout,
                    peer_cert_as_username: self.peer_cert_as_username,
                }
            }
        }
    };
}

tls_listener! {
    /// `listener.ssl.<name>.*`: MQTT over TLS.
    pub struct SslListenerConfig {
        /// Whether the listener is started (once `certfile` is set).
        pub enable: bool = true,
        /// Address to listen on. EMQX: `listener.ssl.external`.
        #[serde(deserialize_with = "values::bind_addr")]
        pub bind: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8883)),
        /// Listen backlog. EMQX: `listener.ssl.external.backlog`.
        pub backlog: u32 = 1024,
        /// Connections this listener holds open at once, all shards together (handshakes in
        /// progress included); further ones are closed and counted. EMQX:
        /// `listener.ssl.external.max_connections`.
        pub max_connections: usize = 1_000_000,
        /// New connections accepted per second, all shards together (a burst of one second's
        /// worth); further ones are closed right after accept and counted; 0 = no limit.
        /// EMQX: `listener.ssl.external.max_conn_rate`.
        pub max_conn_rate: u32 = 0,
        /// TCP_NODELAY on accepted sockets. EMQX: `listener.ssl.external.nodelay`.
        pub nodelay: bool = true,
        /// SO_SNDBUF of accepted sockets; "0" leaves the kernel's autotuning.
        pub sndbuf: ByteSize = ByteSize(0),
        /// SO_RCVBUF of accepted sockets; "0" leaves the kernel's autotuning.
        pub recbuf: ByteSize = ByteSize(0),
    }
}

impl SslListenerConfig {
    /// The socket settings, shared with plain TCP listeners.
    pub fn socket(&self) -> TcpListenerConfig {
        TcpListenerConfig {
            enable: self.enable,
            bind: self.bind,
            backlog: self.backlog,
            max_connections: self.max_connections,
            max_conn_rate: self.max_conn_rate,
            nodelay: self.nodelay,
            sndbuf: self.sndbuf,
            recbuf: self.recbuf,
        }
    }
}

tls_listener! {
    /// `listener.wss.<name>.*`: MQTT over WebSocket over TLS.
    pub struct WssListenerConfig {
        /// Whether the listener is started (once `certfile` is set).
        pub enable: bool = true,
        /// Address to listen on. EMQX: `listener.wss.external`.
        #[serde(deserialize_with = "values::bind_addr")]
        pub bind: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8084)),
        /// The HTTP path that upgrades to MQTT; other paths get 404. EMQX:
        /// `listener.wss.external.mqtt_path`.
        pub path: String = "/mqtt".into(),
        /// Largest WebSocket frame (and message) accepted. EMQX:
        /// `listener.wss.external.max_frame_size`.
        pub max_frame_size: ByteSize = ByteSize(1 << 20),
        /// `Sec-WebSocket-Protocol` values accepted, in order. EMQX:
        /// `listener.wss.external.supported_subprotocols`.
        pub subprotocols: Vec<String> = vec!["mqtt".into(), "mqttv3.1".into(), "mqttv3.1.1".into()],
        /// Refuse (HTTP 400) a client that offers none of `subprotocols`.
        pub fail_if_no_subprotocol: bool = false,
        /// Listen backlog.
        pub backlog: u32 = 1024,
        /// Connections this listener holds open at once, all shards together (handshakes and
        /// upgrades in progress included).
        pub max_connections: usize = 1_000_000,
        /// New connections accepted per second, all shards together; 0 = no limit.
        pub max_conn_rate: u32 = 0,
        /// TCP_NODELAY on accepted sockets.
        pub nodelay: bool = true,
        /// SO_SNDBUF of accepted sockets; "0" leaves the kernel's autotuning.
        pub sndbuf: ByteSize = ByteSize(0),
        /// SO_RCVBUF of accepted sockets; "0" leaves the kernel's autotuning.
        pub recbuf: ByteSize = ByteSize(0),
    }
}

tls_listener! {
    /// `tcp.listener.ssl.external.*`: the TCP gateway over TLS (started once `certfile` is
    /// set).
    pub struct TcpGwSslListenerConfig {
        /// Whether the listener is started (once `certfile` is set).
        pub enable: bool = true,
        /// Address devices connect to. EMQX: `tcp.listener.ssl.external`.
        #[serde(deserialize_with = "values::bind_addr")]
        pub bind: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8091)),
        /// Accept operations kept in flight on the gateway's shard.
        pub acceptors: usize = 8,
        /// Devices connected at once over TLS (handshakes in progress included).
        pub max_connections: usize = 1_024_000,
        /// New connections accepted per second; 0 = no limit.
        pub max_conn_rate: u32 = 1000,
        /// Listen backlog.
        pub backlog: u32 = 1024,
        /// TCP_NODELAY on accepted sockets.
        pub nodelay: bool = true,
    }
}

// Declared after the macro, which it uses.
mod gateway;

impl WssListenerConfig {
    /// The WebSocket settings (the handshake timeout covers TLS and the upgrade together).
    pub fn ws(&self) -> WsListenerConfig {
        WsListenerConfig {
            enable: self.enable,
            bind: self.bind,
            path: self.path.clone(),
            max_frame_size: self.max_frame_size,
            subprotocols: self.subprotocols.clone(),
            fail_if_no_subprotocol: self.fail_if_no_subprotocol,
            handshake_timeout: self.handshake_timeout,
            backlog: self.backlog,
            max_connections: self.max_connections,
            max_conn_rate: self.max_conn_rate,
            nodelay: self.nodelay,
            sndbuf: self.sndbuf,
            recbuf: self.recbuf,
        }
    }
}

/// `listener.ws.<name>.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsListenerConfig {
    /// Whether the listener is started.
    pub enable: bool,
    /// Address to listen on. EMQX: `listener.ws.external`.
    #[serde(deserialize_with = "values::bind_addr")]
    pub bind: SocketAddr,
    /// The HTTP path that upgrades to MQTT; other paths get 404. EMQX:
    /// `listener.ws.external.mqtt_path`.
    pub path: String,
    /// Largest WebSocket frame (and message) accepted; a larger one closes the connection
    /// (1009). EMQX: `listener.ws.external.max_frame_size`.
    pub max_frame_size: ByteSize,
    /// `Sec-WebSocket-Protocol` values accepted, in order; the first one the client offers
    /// is echoed. EMQX: `listener.ws.external.supported_subprotocols`.
    pub subprotocols: Vec<String>,
    /// Refuse (HTTP 400) a client that offers none of `subprotocols`. EMQX:
    /// `listener.ws.external.fail_if_no_subprotocol`.
    pub fail_if_no_subprotocol: bool,
    /// The HTTP upgrade must be done within this time, or the socket is closed.
    pub handshake_timeout: Duration,
    /// Listen backlog. EMQX: `listener.ws.external.backlog`.
    pub backlog: u32,
    /// Connections this listener holds open at once, all shards together (upgrades in
    /// progress included); further ones are closed and counted. EMQX:
    /// `listener.ws.external.max_connections`.
    pub max_connections: usize,
    /// New connections accepted per second, all shards together; 0 = no limit. EMQX:
    /// `listener.ws.external.max_conn_rate`.
    pub max_conn_rate: u32,
    /// TCP_NODELAY on accepted sockets. EMQX: `listener.ws.external.nodelay`.
    pub nodelay: bool,
    /// SO_SNDBUF of accepted sockets; "0" leaves the kernel's autotuning.
    pub sndbuf: ByteSize,
    /// SO_RCVBUF of accepted sockets; "0" leaves the kernel's autotuning.
    pub recbuf: ByteSize,
}

impl Default for WsListenerConfig {
    fn default() -> Self {
        WsListenerConfig {
            enable: true,
            bind: SocketAddr::from(([0, 0, 0, 0], 8083)),
            path: "/mqtt".into(),
            max_frame_size: ByteSize(1 << 20),
            subprotocols: vec!["mqtt".into(), "mqttv3.1".into(), "mqttv3.1.1".into()],
            fail_if_no_subprotocol: false,
            handshake_timeout: Duration::secs(15),
            backlog: 1024,
            max_connections: 1_000_000,
            max_conn_rate: 0,
            nodelay: true,
            sndbuf: ByteSize(0),
            recbuf: ByteSize(0),
        }
    }
}

impl WsListenerConfig {
    /// The socket settings, shared with plain TCP listeners.
    pub fn socket(&self) -> TcpListenerConfig {
        TcpListenerConfig {
            enable: self.enable,
            bind: self.bind,
            backlog: self.backlog,
            max_connections: self.max_connections,
            max_conn_rate: self.max_conn_rate,
            nodelay: self.nodelay,
            sndbuf: self.sndbuf,
            recbuf: self.recbuf,
        }
    }
}

impl TlsOptions {
    /// Checks what can be checked without reading the files (which the start does).
    fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        if self.versions.is_empty() {
            return Err(invalid(&key("versions"), "needs at least one version"));
        }
        if let Some(v) = self
            .versions
            .iter()
            .find(|v| !matches!(v.as_str(), "tlsv1.2" | "tlsv1.3"))
        {
            return Err(invalid(
                &key("versions"),
                format!("{v:?} is not supported (tlsv1.2, tlsv1.3)"),
            ));
        }
        if self.certfile.is_some() && self.keyfile.is_none() {
            return Err(invalid(&key("keyfile"), "must be set with certfile"));
        }
        if self.verify == TlsVerify::VerifyPeer && self.cacertfile.is_none() {
            return Err(invalid(
                &key("cacertfile"),
                "must be set with verify = \"verify_peer\"",
            ));
        }
        if self.fail_if_no_peer_cert && self.verify != TlsVerify::VerifyPeer {
            return Err(invalid(
                &key("fail_if_no_peer_cert"),
                "needs verify = \"verify_peer\"",
            ));
        }
        if self.peer_cert_as_username.is_some() && self.verify != TlsVerify::VerifyPeer {
            return Err(invalid(
                &key("peer_cert_as_username"),
                "needs verify = \"verify_peer\" (only a verified certificate names a user)",
            ));
        }
        if self.handshake_timeout.0.is_zero() {
            return Err(invalid(&key("handshake_timeout"), "must be more than 0s"));
        }
        Ok(())
    }
}

/// `listener.tcp.<name>.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpListenerConfig {
    /// Whether the listener is started.
    pub enable: bool,
    /// Address to listen on; port 0 picks a free port (the log shows the real one).
    /// EMQX: `listener.tcp.external`.
    #[serde(deserialize_with = "values::bind_addr")]
    pub bind: SocketAddr,
    /// Listen backlog. EMQX: `listener.tcp.external.backlog`.
    pub backlog: u32,
    /// Connections this listener holds open at once, all shards together; further ones are
    /// closed at once and counted. EMQX: `listener.tcp.external.max_connections`.
    pub max_connections: usize,
    /// New connections accepted per second, all shards together (a burst of one second's
    /// worth); further ones are closed right after accept and counted; 0 = no limit. EMQX:
    /// `listener.tcp.external.max_conn_rate`.
    pub max_conn_rate: u32,
    /// TCP_NODELAY on accepted sockets. EMQX: `listener.tcp.external.nodelay`.
    pub nodelay: bool,
    /// SO_SNDBUF of accepted sockets; "0" leaves the kernel's autotuning (`net.ipv4.tcp_wmem`).
    /// EMQX: `listener.tcp.external.sndbuf`.
    pub sndbuf: ByteSize,
    /// SO_RCVBUF of accepted sockets; "0" leaves the kernel's autotuning (`net.ipv4.tcp_rmem`).
    /// EMQX: `listener.tcp.external.recbuf`.
    pub recbuf: ByteSize,
}

impl Default for TcpListenerConfig {
    fn default() -> Self {
        TcpListenerConfig {
            enable: true,
            bind: SocketAddr::from(([0, 0, 0, 0], 1883)),
            backlog: 1024,
            max_connections: 1_000_000,
            max_conn_rate: 0,
            nodelay: true,
            sndbuf: ByteSize(0),
            recbuf: ByteSize(0),
        }
    }
}

/// `mqtt.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Largest packet accepted, checked before it is buffered. EMQX: `mqtt.max_packet_size`.
    pub max_packet_size: ByteSize,
    /// Longest client id accepted under 3.1.1. EMQX: `mqtt.max_clientid_len`.
    pub max_clientid_len: usize,
    /// Longest client id accepted under 3.1, whose spec says 23; raise it to relax the rule.
    pub v31_max_clientid_len: usize,
    /// Most levels in a topic name or filter: a deeper PUBLISH topic closes the connection, a
    /// deeper filter gets SUBACK 0x80; 0 = any depth. EMQX: `mqtt.max_topic_levels`.
    pub max_topic_levels: usize,
    /// Most subscriptions one session holds; a SUBSCRIBE for a new filter beyond it gets
    /// 0x80 for that filter; 0 = no limit. EMQX: `mqtt.max_subscriptions`.
    pub max_subscriptions: usize,
    /// `"MESSAGES|BYTES"`: a connected client with more deliveries queued for it than
    /// MESSAGES, or more queued and unwritten bytes than BYTES, is disconnected (logged and
    /// counted), so one slow subscriber cannot hold the broker's memory; `"off"` = never.
    /// EMQX: `force_shutdown_policy` (the seed document's `8000|800MB`).
    pub force_shutdown_policy: String,
    /// `mqtt.rate_limit.*`: inbound limits per connection, enforced by not reading it.
    pub rate_limit: RateLimitConfig,
    /// Topic and payload bytes all offline sessions together may hold in their queues;
    /// beyond it, messages for offline sessions are dropped and counted
    /// (`dropped_queue_total`); "0" = no cap.
    pub max_mqueue_bytes_total: ByteSize,
    /// A connection that sends no CONNECT within this time is closed. EMQX: `mqtt.idle_timeout`.
    pub idle_timeout: Duration,
    /// No packet for `keepalive_multiplier` × keepalive closes the connection.
    pub keepalive_multiplier: f64,
    /// Unacknowledged QoS 1/2 deliveries per session. EMQX: `zone.external.max_inflight`.
    pub max_inflight: usize,
    /// Inbound QoS 2 packet ids waiting for PUBREL per session; more closes the connection.
    /// EMQX: `zone.external.max_awaiting_rel`.
    pub max_awaiting_rel: usize,
    /// An inbound QoS 2 packet id waiting for PUBREL longer than this is forgotten.
    /// EMQX: `zone.external.await_rel_timeout`.
    pub await_rel_timeout: Duration,
    /// Unacknowledged deliveries are resent (DUP) after this; "0s" resends only on reconnect.
    /// EMQX: `zone.external.retry_interval`.
    pub retry_interval: Duration,
    /// Messages queued per session while the inflight window is full or the client is offline;
    /// the oldest is dropped (and counted) beyond it. EMQX: `zone.external.max_mqueue_len`.
    pub max_mqueue_len: usize,
    /// Whether QoS 0 messages are queued for offline persistent sessions.
    /// EMQX: `zone.external.mqueue_store_qos0`.
    pub mqueue_store_qos0: bool,
    /// An offline persistent session is freed after this. EMQX:
    /// `zone.external.session_expiry_interval`.
    pub session_expiry_interval: Duration,
    /// Bytes waiting to be written to one connection. Above it, QoS 0 deliveries to it are
    /// dropped and counted (a slow consumer), QoS 1/2 deliveries wait in its session's queue,
    /// and the connection is not read until its client has read enough.
    pub max_write_buffer: ByteSize,
    /// How long a connection the broker is closing may take to write its last bytes (a CONNACK
    /// refusal, say) before its socket is reset.
    pub close_timeout: Duration,
    /// `mqtt.sn.*`: the MQTT-SN gateway.
    pub sn: MqttSnConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_packet_size: ByteSize(1 << 20),
            max_clientid_len: 65_535,
            v31_max_clientid_len: 23,
            max_topic_levels: 128,
            max_subscriptions: 0,
            force_shutdown_policy: "8000|800MB".into(),
            rate_limit: RateLimitConfig::default(),
            max_mqueue_bytes_total: ByteSize(1 << 30),
            idle_timeout: Duration::secs(15),
            keepalive_multiplier: 1.5,
            max_inflight: 32,
            max_awaiting_rel: 100,
            await_rel_timeout: Duration::secs(300),
            retry_interval: Duration::secs(30),
            max_mqueue_len: 1000,
            mqueue_store_qos0: true,
            session_expiry_interval: Duration::secs(7200),
            max_write_buffer: ByteSize(256 << 10),
            close_timeout: Duration::secs(5),
            sn: MqttSnConfig::default(),
        }
    }
}

/// `mqtt.rate_limit.*`: a connection more than a second ahead of either rate is not read
/// until it is back within it, so TCP pushes back on its client. Off by default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// PUBLISH packets read per second per connection; 0 = no limit. EMQX:
    /// `zone.external.rate_limit.conn_messages_in`.
    pub messages_in: u32,
    /// Bytes read per second per connection; "0" = no limit. EMQX:
    /// `zone.external.rate_limit.conn_bytes_in`.
    pub bytes_in: ByteSize,
}

/// `retainer.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetainerConfig {
    /// Whether retained messages are stored; when off, the retain flag is ignored.
    pub enable: bool,
    /// A retained message is dropped this long after it was stored; "0s" = never.
    /// EMQX: `retainer.expiry_interval`.
    pub expiry_interval: Duration,
    /// Most retained messages kept (0 = unlimited); a new topic beyond it is not stored
    /// (replacing an existing one still works). EMQX: `retainer.max_retained_messages`.
    pub max_retained_messages: u64,
    /// Retained messages with a larger payload are delivered but not stored.
    /// EMQX: `retainer.max_payload_size`.
    pub max_payload_size: ByteSize,
}

impl Default for RetainerConfig {
    fn default() -> Self {
        RetainerConfig {
            enable: true,
            expiry_interval: Duration::secs(0),
            max_retained_messages: 0,
            max_payload_size: ByteSize(1 << 20),
        }
    }
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key that no section has: where it came from, and the closest known key.
    #[error("unknown key `{key}`{origin}{hint}")]
    UnknownKey {
        /// Key path.
        key: String,
        /// ` (from …)`: the file, profile or environment variable; empty for the defaults.
        origin: String,
        /// `; did you mean …?`, or empty.
        hint: String,
    },
    /// A TOML file that does not parse.
    #[error("{file}:{line}:{column}: invalid TOML: {message}")]
    Syntax {
        /// The file as the user named it (or the profile).
        file: String,
        /// Line, from 1.
        line: usize,
        /// Column, from 1.
        column: usize,
        /// What the parser expected.
        message: String,
    },
    /// Several errors, one line.
    #[error("{0}")]
    Figment(String),
    /// A file named on the command line does not exist or cannot be read.
    #[error("config file {0}: {1}")]
    File(PathBuf, String),
    /// `--profile NAME` names no file and no built-in profile.
    #[error("unknown profile {0:?}: no {1} and no built-in profile of that name")]
    UnknownProfile(String, PathBuf),
    /// A value that does not parse, or parses but is not usable.
    #[error("invalid value for `{key}`{origin}: {reason}")]
    Invalid {
        /// Key path.
        key: String,
        /// Why.
        reason: String,
        /// ` (from …)`: the file, profile or environment variable; empty for the defaults.
        origin: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
        origin: String::new(),
    }
}

/// The profiles shipped with the broker, used when `configs/profiles/NAME.toml` is not found.
pub const BUILTIN_PROFILES: &[(&str, &str)] = &[
    (
        "dev-2core",
        include_str!("../../../configs/profiles/dev-2core.toml"),
    ),
    (
        "baremetal-16core",
        include_str!("../../../configs/profiles/baremetal-16core.toml"),
    ),
];

/// The documented default configuration file, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../../../configs/default.toml");

/// CPUs this process may run on.
pub fn available_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bitmask that sched_getaffinity fills for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect();
            if !cpus.is_empty() {
                return cpus;
            }
        }
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..n).collect()
}

/// The most shards a broker runs (the width of the route table's shard sets).
pub const MAX_SHARDS: usize = 128;

impl Config {
    /// CPU ids of the shards, in shard order.
    pub fn shard_cpus(&self) -> Vec<usize> {
        match &self.shards.cpus {
            Selection::All => available_cpus().into_iter().take(MAX_SHARDS).collect(),
            Selection::List(v) => v.clone(),
        }
    }

    /// Indexes of the shards that bind MQTT listeners.
    pub fn mqtt_shards(&self) -> Vec<usize> {
        match &self.shards.mqtt {
            Selection::All => (0..self.shard_cpus().len()).collect(),
            Selection::List(v) => v.clone(),
        }
    }

    /// Checks the values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.name.trim().is_empty() {
            return Err(invalid("node.name", "must not be empty"));
        }
        check_log_filter(&self.log.level).map_err(|e| invalid("log.level", e))?;
        let cpus = self.shard_cpus();
        if cpus.is_empty() {
            return Err(invalid("shards.cpus", "needs at least one CPU"));
        }
        if cpus.len() > MAX_SHARDS {
            return Err(invalid(
                "shards.cpus",
                format!("at most {MAX_SHARDS} shards"),
            ));
        }
        for (i, c) in cpus.iter().enumerate() {
            if cpus[..i].contains(c) {
                return Err(invalid("shards.cpus", format!("CPU {c} is listed twice")));
            }
        }
        let mqtt = self.mqtt_shards();
        if mqtt.is_empty() {
            return Err(invalid("shards.mqtt", "needs at least one shard"));
        }
        for s in &mqtt {
            if *s >= cpus.len() {
                return Err(invalid(
                    "shards.mqtt",
                    format!("shard index {s} does not exist ({} shards)", cpus.len()),
                ));
            }
        }
        let s = &self.shards;
        for (key, v) in [
            ("shards.channel_capacity", s.channel_capacity),
            ("shards.batch_size", s.batch_size),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if s.max_pending < 16 {
            return Err(invalid("shards.max_pending", "must be at least 16"));
        }
        if s.max_write_buffer.0 < 1024 {
            return Err(invalid("shards.max_write_buffer", "must be at least 1KB"));
        }
        if s.read_buffer.0 < 1024 {
            return Err(invalid("shards.read_buffer", "must be at least 1KB"));
        }
        if s.io_memory.0 < 64 << 10 {
            return Err(invalid("shards.io_memory", "must be at least 64KB"));
        }
        let wss = self
            .listener
            .wss
            .iter()
            .map(|(name, l)| (format!("listener.wss.{name}"), l.ws(), Some(l.tls())));
        let ssl = self
            .listener
            .ssl
            .iter()
            .map(|(name, l)| (format!("listener.ssl.{name}"), l.socket(), l.tls()));
        for (prefix, l, tls) in ssl {
            if l.backlog == 0 {
                return Err(invalid(&format!("{prefix}.backlog"), "must be at least 1"));
            }
            if l.max_connections == 0 {
                return Err(invalid(
                    &format!("{prefix}.max_connections"),
                    "must be at least 1",
                ));
            }
            tls.validate(&prefix)?;
        }
        let ws = self
            .listener
            .ws
            .iter()
            .map(|(name, l)| (format!("listener.ws.{name}"), l.clone(), None));
        for (prefix, l, tls) in ws.chain(wss) {
            if let Some(tls) = tls {
                tls.validate(&prefix)?;
            }
            let key = |k: &str| format!("{prefix}.{k}");
            if !l.path.starts_with('/') {
                return Err(invalid(&key("path"), "must start with /"));
            }
            if l.max_frame_size.0 < 16 {
                return Err(invalid(&key("max_frame_size"), "must be at least 16B"));
            }
            if l.subprotocols
                .iter()
                .any(|p| p.trim().is_empty() || p.contains(','))
            {
                return Err(invalid(
                    &key("subprotocols"),
                    "names must be non-empty, without commas",
                ));
            }
            if l.backlog == 0 {
                return Err(invalid(&key("backlog"), "must be at least 1"));
            }
            if l.max_connections == 0 {
                return Err(invalid(&key("max_connections"), "must be at least 1"));
            }
        }
        for (name, l) in &self.listener.tcp {
            if l.backlog == 0 {
                return Err(invalid(
                    &format!("listener.tcp.{name}.backlog"),
                    "must be at least 1",
                ));
            }
            if l.max_connections == 0 {
                return Err(invalid(
                    &format!("listener.tcp.{name}.max_connections"),
                    "must be at least 1",
                ));
            }
        }
        let m = &self.mqtt;
        if m.max_packet_size.0 < 16 || m.max_packet_size.0 > 268_435_460 {
            return Err(invalid(
                "mqtt.max_packet_size",
                "must be between 16B and 256MB",
            ));
        }
        if m.max_inflight == 0 || m.max_inflight > 65_535 {
            return Err(invalid("mqtt.max_inflight", "must be between 1 and 65535"));
        }
        if m.max_clientid_len == 0 || m.max_clientid_len > 65_535 {
            return Err(invalid(
                "mqtt.max_clientid_len",
                "must be between 1 and 65535",
            ));
        }
        if m.v31_max_clientid_len == 0 || m.v31_max_clientid_len > 65_535 {
            return Err(invalid(
                "mqtt.v31_max_clientid_len",
                "must be between 1 and 65535",
            ));
        }
        if !(m.keepalive_multiplier.is_finite() && m.keepalive_multiplier >= 1.0) {
            return Err(invalid(
                "mqtt.keepalive_multiplier",
                "must be a number ≥ 1.0",
            ));
        }
        if m.idle_timeout.enabled().is_none() {
            return Err(invalid("mqtt.idle_timeout", "must be more than 0s"));
        }
        if m.max_awaiting_rel == 0 {
            return Err(invalid("mqtt.max_awaiting_rel", "must be at least 1"));
        }
        if m.max_mqueue_len == 0 {
            return Err(invalid("mqtt.max_mqueue_len", "must be at least 1"));
        }
        if m.max_write_buffer.0 < 1024 {
            return Err(invalid("mqtt.max_write_buffer", "must be at least 1KB"));
        }
        if m.close_timeout.enabled().is_none() {
            return Err(invalid("mqtt.close_timeout", "must be more than 0s"));
        }
        parse_force_shutdown(&m.force_shutdown_policy)
            .map_err(|e| invalid("mqtt.force_shutdown_policy", e))?;
        self.flapping.validate()?;
        self.tcp.validate()?;
        self.mqtt.sn.validate()?;
        self.lwm2m.validate()?;
        self.admin.validate()
    }

    /// Checks what depends on this machine: every CPU in `shards.cpus` must be available.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        let shards = self.shard_cpus().len();
        for (key, shard) in [
            ("gateway.tcp.shard", self.gateway.tcp.shard),
            ("gateway.mqttsn.shard", self.gateway.mqttsn.shard),
            ("gateway.lwm2m.shard", self.gateway.lwm2m.shard),
        ] {
            if shard >= shards {
                return Err(invalid(
                    key,
                    format!(
                        "shard {shard} does not exist: this configuration runs {shards} shards (0 to {})",
                        shards.saturating_sub(1)
                    ),
                ));
            }
        }
        let available = available_cpus();
        for c in self.shard_cpus() {
            if !available.contains(&c) {
                return Err(invalid(
                    "shards.cpus",
                    format!("CPU {c} is not available to this process (available: {available:?})"),
                ));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML (`shardmq --print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// The engine's settings for shard `shard` of `shards`, derived from the loaded configuration.
pub fn engine_config(cfg: &Config, shard: usize, shards: usize) -> EngineConfig {
    let m = &cfg.mqtt;
    let per_partition = if cfg.retainer.max_retained_messages == 0 {
        0
    } else {
        cfg.retainer.max_retained_messages.div_ceil(shards as u64)
    };
    EngineConfig {
        shard,
        shards,
        limits: SessionLimits {
            max_inflight: m.max_inflight,
            max_mqueue_len: m.max_mqueue_len,
            mqueue_store_qos0: m.mqueue_store_qos0,
            retry_interval: m.retry_interval.enabled(),
            max_awaiting_rel: m.max_awaiting_rel,
            await_rel_timeout: m.await_rel_timeout.enabled(),
        },
        retained: RetainedLimits {
            max_messages: per_partition,
            max_payload: cfg.retainer.max_payload_size.as_usize(),
            expiry: cfg.retainer.expiry_interval.enabled(),
        },
        retainer_enabled: cfg.retainer.enable,
        max_packet_size: m.max_packet_size.as_usize(),
        max_clientid_len: m.max_clientid_len,
        max_topic_levels: m.max_topic_levels,
        max_subscriptions: m.max_subscriptions,
        force_shutdown: parse_force_shutdown(&m.force_shutdown_policy).unwrap_or(None),
        max_mqueue_bytes_total: m.max_mqueue_bytes_total.as_usize(),
        flapping: cfg.flapping.policy(),
        rate_limit: RateLimit {
            messages_per_sec: m.rate_limit.messages_in,
            bytes_per_sec: m.rate_limit.bytes_in.0,
        },
        v31_max_clientid_len: m.v31_max_clientid_len,
        idle_timeout: m.idle_timeout.0,
        keepalive_multiplier: m.keepalive_multiplier,
        close_timeout: m.close_timeout.0,
        session_expiry: m.session_expiry_interval.enabled(),
        max_pending: cfg.shards.max_pending,
        max_write_buffer: m.max_write_buffer.as_usize(),
        shard_write_buffer: cfg.shards.max_write_buffer.as_usize(),
        batch_size: cfg.shards.batch_size,
        park_after: cfg.shards.park_idle_after.enabled(),
        client_events: cfg.sys.client_events,
        auth: cfg.auth.policy(),
        acl_deny_disconnect: cfg.auth.acl_deny_action == AclDenyAction::Disconnect,
    }
}

#[cfg(test)]
mod tests;
