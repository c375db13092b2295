//! Starting and stopping the shards.
//!
//! [`start`] checks what can fail before any thread starts (ports held by another process,
//! memlock), creates the cross-shard channels, spawns one glommio executor per entry of
//! `shards.cpus` pinned to that CPU, and waits until every shard reports its listeners bound.
//! Each shard then runs its engine, connection drivers, mesh tasks and timers until the
//! shutdown flag is raised; it closes its listeners and connections and exits.

use super::connection::ConnCtx;
use super::control::{self, Job, Mailbox};
use super::listener::{self, Gate};
use super::mesh::{self, MeshEnds};
use super::park::ParkingLot;
use super::stats::{Board, ShardStats};
use crate::admin::AdminServer;
use crate::auth::AuthChain;
use crate::config::{ByteSize, Config, TcpListenerConfig};
use crate::core::acl::{Acl, Permission};
use crate::core::engine::Engine;
use crate::core::metrics::Metrics;
use crate::core::session::OfflineQueues;
use crate::core::time::Timestamp;
use crate::gateway::GatewayCtl;
use crate::shard::clock;
use crate::shard::listener::Setup;
use crate::transport::tls::TlsSettings;
use crate::transport::ws::WsSettings;
use glommio::timer::sleep;
use glommio::{spawn_local, ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, info, warn};

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another process listens on the port.
    #[error("listener {name}: {addr} is already in use by another process")]
    PortInUse {
        /// Listener name.
        name: String,
        /// Address.
        addr: SocketAddr,
    },
    /// The address cannot be bound.
    #[error("listener {name}: cannot bind {addr}: {error}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: SocketAddr,
        /// OS error.
        error: std::io::Error,
    },
    /// RLIMIT_MEMLOCK is below what glommio needs.
    #[error("RLIMIT_MEMLOCK is {have} bytes; glommio locks `shards.io_memory` on each of {shards} shards, {need} bytes in all; raise it with `ulimit -l` or LimitMEMLOCK=, or lower `shards.io_memory`")]
    Memlock {
        /// Current soft limit.
        have: u64,
        /// Needed.
        need: u64,
        /// Shards.
        shards: usize,
    },
    /// A TLS listener's certificate, key or CA file cannot be used.
    #[error("{0}")]
    Tls(String),
    /// The password file (or another authentication backend) cannot be used.
    #[error("{0}")]
    Auth(String),
    /// A gateway's data cannot be used (an LwM2M object definition that does not parse).
    #[error("{0}")]
    Gateway(String),
    /// The admin API cannot listen.
    #[error("admin.bind: cannot listen on {addr}: {error}")]
    Admin {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        error: std::io::Error,
    },
    /// No MQTT listener is enabled.
    #[error("no listener is enabled (listener.tcp.*.enable)")]
    NoListener,
    /// A shard could not start.
    #[error("shard {shard} (CPU {cpu}) failed to start: {error}")]
    Shard {
        /// Shard index.
        shard: usize,
        /// CPU.
        cpu: usize,
        /// What went wrong.
        error: String,
    },
}

/// (shard, CPU, executor thread) of a running shard.
type ShardThread = (usize, usize, ExecutorJoinHandle<Result<(), String>>);

/// A running broker.
pub struct BrokerHandle {
    listeners: Vec<(String, SocketAddr)>,
    shutdown: Arc<AtomicBool>,
    joins: Vec<ShardThread>,
    shards: Shards,
    admin: Option<AdminServer>,
}

/// Re-reads the password file and the ACL file: on SIGHUP and through the admin API. Every
/// shard gets the new rules. Errors keep what was loaded before and say why.
pub fn reload_auth(shards: &Shards) -> Result<(), String> {
    if shards.auth.is_none() && shards.acl_file.is_none() {
        return Err(
            "nothing to reload: neither auth.password_file nor auth.acl_file is set".into(),
        );
    }
    let mut result = Ok(());
    if let Some(chain) = &shards.auth {
        result = chain.reload();
    }
    if let Some((path, nomatch)) = &shards.acl_file {
        match crate::auth::acl::load(path, *nomatch) {
            Ok(acl) => {
                info!(file = %path.display(), rules = acl.rules.len(), "access rules reloaded");
                // Every shard has the new rules when this returns.
                let acl = Arc::new(acl);
                let (done, applied) = mpsc::channel();
                let mut posted = 0;
                for m in shards.mailboxes.iter() {
                    let (acl, done) = (acl.clone(), done.clone());
                    let job: Job = Box::new(move |e, _| {
                        e.set_acl(Some(acl));
                        let _ = done.send(());
                    });
                    posted += usize::from(m.post(job).is_ok());
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                for _ in 0..posted {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if applied.recv_timeout(left).is_err() {
                        result =
                            result.and(Err("a shard did not take the new rules in time".into()));
                        break;
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "access rules not reloaded; keeping the previous ones");
                result = result.and(Err(e));
            }
        }
    }
    result
}

/// What threads outside the shards use to reach them: each shard's mailbox, the stats board,
/// and who the broker is. Cheap to clone.
#[derive(Clone)]
pub struct Shards {
    mailboxes: Arc<Vec<Arc<Mailbox>>>,
    board: Arc<Board>,
    mqtt: Arc<Vec<usize>>,
    node: Arc<str>,
    started: SystemTime,
    auth: Option<Arc<AuthChain>>,
    /// The ACL file and `acl_nomatch`, to read again on reload.
    acl_file: Option<(std::path::PathBuf, Permission)>,
    /// The gateways' lifecycles.
    gateways: Arc<Vec<Arc<GatewayCtl>>>,
}

impl Shards {
    /// Number of shards.
    pub fn len(&self) -> usize {
        self.mailboxes.len()
    }

    /// Whether there is no shard (never, for a started broker).
    pub fn is_empty(&self) -> bool {
        self.mailboxes.is_empty()
    }

    /// The shards that serve MQTT listeners.
    pub fn mqtt(&self) -> &[usize] {
        &self.mqtt
    }

    /// The gateways, running or not.
    pub fn gateways(&self) -> &[Arc<GatewayCtl>] {
        &self.gateways
    }

    /// The node name (`node.name`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// When the broker started.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// The stats board.
    pub fn board(&self) -> &Board {
        &self.board
    }

    /// Runs `f` on shard `shard` with its engine and returns its result; `None` when the
    /// shard has stopped (or does not exist).
    pub async fn ask<R: Send + 'static>(
        &self,
        shard: usize,
        f: impl FnOnce(&mut Engine, Timestamp) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |e, now| {
            let _ = tx.send(f(e, now));
        });
        self.mailboxes.get(shard)?.post(job).ok()?;
        rx.await.ok()
    }
}

/// How often each shard publishes its [`ShardStats`].
const STATS_INTERVAL: Duration = Duration::from_millis(100);
/// Shortest time between two hand-backs of freed memory (`return_freed_memory`).
const COLLECT_INTERVAL: Duration = Duration::from_secs(1);

/// Returns the memory this thread freed to the OS. The allocator (mimalloc) hands freed pages
/// back only when the thread allocates again; a shard whose connections just went idle (parked,
/// their driver tasks and buffers freed) would otherwise keep them resident. A forced
/// collection also takes back blocks other threads freed (cross-shard messages); it walks the
/// whole heap, about 1 ms per 18,000 connections measured here, so it runs only when the shard
/// has settled.
fn return_freed_memory(shard: usize) {
    let started = Instant::now();
    // SAFETY: mi_collect has no preconditions; it only walks this thread's own heap.
    unsafe { libmimalloc_sys::mi_collect(true) }
    debug!(shard, took = ?started.elapsed(), "freed memory returned to the OS");
}
/// How long a shard waits for its connections to close at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The WebSocket upgrade's settings from a listener's configuration. Frames are capped at
/// `mqtt.max_packet_size` too: a larger frame would be buffered whole before the MQTT decoder
/// could refuse what it carries.
fn ws_settings(l: &crate::config::WsListenerConfig, max_packet_size: ByteSize) -> WsSettings {
    WsSettings {
        path: l.path.clone(),
        subprotocols: l.subprotocols.clone(),
        fail_if_no_subprotocol: l.fail_if_no_subprotocol,
        max_frame_size: l.max_frame_size.min(max_packet_size).as_usize(),
        handshake_timeout: l.handshake_timeout.0,
    }
}

/// A listener every MQTT shard binds: its name (`external`, or `ws.external` for
/// `listener.ws.external`, `ssl.external`, `wss.external`), its address, its socket settings,
/// and the handshakes its connections go through.
type ListenerSpec = (String, SocketAddr, TcpListenerConfig, Setup);

struct ShardCtx {
    shard: usize,
    shards: usize,
    cfg: Config,
    mqtt: bool,
    /// This shard publishes the `$SYS/` tree (the first MQTT shard).
    sys: bool,
    listeners: Vec<ListenerSpec>,
    ends: MeshEnds,
    shutdown: Arc<AtomicBool>,
    report: mpsc::Sender<Result<(), String>>,
    board: Arc<Board>,
    mailbox: Arc<Mailbox>,
    auth: Option<Arc<AuthChain>>,
    acl: Option<Arc<Acl>>,
    /// What each listener admits, by listener number, shared by every shard.
    gates: Arc<Vec<Arc<Gate>>>,
    /// The offline queues of all shards, against `mqtt.max_mqueue_bytes_total`.
    offline: Arc<OfflineQueues>,
    /// The TCP gateway's lifecycle (and its TLS settings), on the shard that hosts it.
    tcp_gateway: Option<(Arc<GatewayCtl>, Option<TlsSettings>)>,
    /// The MQTT-SN gateway's lifecycle, on the shard that hosts it.
    sn_gateway: Option<Arc<GatewayCtl>>,
    /// The LwM2M gateway's lifecycle and object definitions, on the shard that hosts it.
    lwm2m_gateway: Option<(
        Arc<GatewayCtl>,
        Arc<crate::core::gateway::lwm2m::registry::Registry>,
        Option<crate::gateway::dtls::DtlsSettings>,
    )>,
}

fn memlock_soft_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

/// The shard a thread belongs to, from its name (`shard3`, `shard3-park`).
fn shard_of_thread(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("shard")?;
    let digits = rest.split('-').next()?;
    digits.parse().ok()
}

/// Makes a panic on any shard's thread stop the whole process, with one line naming the
/// shard. A broker with a dead shard would run half-dead: the other shards would keep queueing
/// messages to it, and every SUBACK would wait forever for its route acknowledgement. A
/// supervisor (systemd `Restart=`) then starts it afresh. Panics on other threads go to the
/// hook that was there before.
fn abort_on_shard_panic() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let Some(shard) = thread.name().and_then(shard_of_thread) else {
                return previous(info);
            };
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            let at = info
                .location()
                .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
            eprintln!("shardmq: shard {shard} panicked{at}: {what}; aborting the broker");
            std::process::abort();
        }));
    });
}

/// The debug-only fault hook: `SHARDMQTEST_PANIC_SHARD=N` makes shard N panic
/// `SHARDMQTEST_PANIC_AFTER_MS` (default 500) milliseconds after it started. Release builds
/// ignore both.
fn debug_panic_after(shard: usize) -> Option<Duration> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let target: usize = std::env::var("SHARDMQTEST_PANIC_SHARD")
        .ok()?
        .parse()
        .ok()?;
    let after = std::env::var("SHARDMQTEST_PANIC_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    (target == shard).then(|| Duration::from_millis(after))
}

/// Each executor locks its I/O buffer (`shards.io_memory`): the memory lock limit must allow
/// all of them.
/// The LwM2M gateway's DTLS settings, when a certificate or PSK file is configured.
fn lwm2m_dtls(cfg: &Config) -> Result<Option<crate::gateway::dtls::DtlsSettings>, StartError> {
    let l = &cfg.lwm2m;
    let cert = match (&l.certfile, &l.keyfile) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    crate::gateway::dtls::DtlsSettings::load(cert, l.psk_file.as_deref(), l.max_endpoints)
        .map_err(|e| StartError::Tls(format!("lwm2m DTLS: {e}")))
}

/// The LwM2M object definitions of `lwm2m.xml_dir` (a warning when there are none: the
/// gateway then passes every value on untyped).
fn lwm2m_registry(
    cfg: &Config,
) -> Result<crate::core::gateway::lwm2m::registry::Registry, StartError> {
    let dir = &cfg.lwm2m.xml_dir;
    let r = crate::gateway::lwm2m::load_registry(dir).map_err(StartError::Gateway)?;
    if r.is_empty() && cfg.gateway.lwm2m.enable {
        warn!(xml_dir = %dir.display(), "lwm2m.xml_dir holds no object definitions: LwM2M values are passed on untyped");
    }
    Ok(r)
}

fn check_memlock(cfg: &Config, shards: usize) -> Result<(), StartError> {
    if let Some(have) = memlock_soft_limit() {
        let need = cfg.shards.io_memory.0 * shards as u64;
        if have < need {
            return Err(StartError::Memlock { have, need, shards });
        }
    }
    Ok(())
}

/// `shardmq --check`: what the start would refuse in `cfg` (already validated, its CPUs
/// checked) short of binding ports: the memory lock limit, the TLS certificates and keys,
/// the password and ACL files. Returns a one-line summary of what would run.
pub fn check(cfg: &Config) -> Result<String, StartError> {
    let cpus = cfg.shard_cpus();
    check_memlock(cfg, cpus.len())?;
    let mut listeners: Vec<String> = Vec::new();
    for (name, l) in cfg.listener.tcp.iter().filter(|(_, l)| l.enable) {
        listeners.push(format!("tcp.{name} {}", l.bind));
    }
    for (name, l) in cfg.listener.ws.iter().filter(|(_, l)| l.enable) {
        listeners.push(format!("ws.{name} {}", l.bind));
    }
    for (name, l) in cfg.listener.ssl.iter().filter(|(_, l)| l.enable) {
        if l.certfile.is_some() {
            TlsSettings::load(&format!("listener.ssl.{name}"), &l.tls())
                .map_err(StartError::Tls)?;
            listeners.push(format!("ssl.{name} {}", l.bind));
        }
    }
    for (name, l) in cfg.listener.wss.iter().filter(|(_, l)| l.enable) {
        if l.certfile.is_some() {
            TlsSettings::load(&format!("listener.wss.{name}"), &l.tls())
                .map_err(StartError::Tls)?;
            listeners.push(format!("wss.{name} {}", l.bind));
        }
    }
    if listeners.is_empty() {
        return Err(StartError::NoListener);
    }
    if cfg.gateway.tcp.enable {
        listeners.push(format!(
            "gateway.tcp {} (shard {})",
            cfg.tcp.listener.external.bind, cfg.gateway.tcp.shard
        ));
        let ssl = &cfg.tcp.listener.ssl.external;
        if ssl.enable && ssl.certfile.is_some() {
            TlsSettings::load("tcp.listener.ssl.external", &ssl.tls()).map_err(StartError::Tls)?;
            listeners.push(format!("gateway.tcp.ssl {}", ssl.bind));
        }
    }
    if cfg.gateway.mqttsn.enable {
        listeners.push(format!(
            "gateway.mqttsn udp {} (shard {})",
            cfg.mqtt.sn.bind_addr(),
            cfg.gateway.mqttsn.shard
        ));
    }
    if cfg.gateway.lwm2m.enable {
        let r = lwm2m_registry(cfg)?;
        if lwm2m_dtls(cfg)?.is_some() {
            listeners.push(format!("gateway.lwm2m.dtls udp {}", cfg.lwm2m.dtls_addr()));
        }
        listeners.push(format!(
            "gateway.lwm2m udp {} (shard {}, {} object definitions)",
            cfg.lwm2m.bind_addr(),
            cfg.gateway.lwm2m.shard,
            r.len()
        ));
    }
    AuthChain::from_config(&cfg.auth).map_err(StartError::Auth)?;
    if let Some(path) = &cfg.auth.acl_file {
        crate::auth::acl::load(path, cfg.auth.nomatch())
            .map_err(|e| StartError::Auth(format!("auth.acl_file: {e}")))?;
    }
    let admin = if cfg.admin.enable {
        format!("admin API {}", cfg.admin.bind)
    } else {
        "admin API off".into()
    };
    Ok(format!(
        "{} shards on CPUs {cpus:?}; listeners {}; {admin}",
        cpus.len(),
        listeners.join(", ")
    ))
}

/// Whether `bind` is free to listen on (port 0: a free port is picked and returned).
fn probe_listener(name: &str, bind: SocketAddr) -> Result<SocketAddr, StartError> {
    listener::probe(bind).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AddrInUse {
            StartError::PortInUse {
                name: name.to_string(),
                addr: bind,
            }
        } else {
            StartError::Bind {
                name: name.to_string(),
                addr: bind,
                error,
            }
        }
    })
}

/// Starts the broker described by `cfg` (already validated).
pub fn start(cfg: &Config) -> Result<BrokerHandle, StartError> {
    abort_on_shard_panic();
    let cpus = cfg.shard_cpus();
    let shards = cpus.len();
    let mqtt_shards = cfg.mqtt_shards();
    check_memlock(cfg, shards)?;
    let mut listeners: Vec<ListenerSpec> = Vec::new();
    let mut holders = Vec::new();
    let plain = cfg
        .listener
        .tcp
        .iter()
        .filter(|(_, l)| l.enable)
        .map(|(name, l)| (name.clone(), l.clone(), Setup::Plain));
    let ws = cfg
        .listener
        .ws
        .iter()
        .filter(|(_, l)| l.enable)
        .map(|(name, l)| {
            (
                format!("ws.{name}"),
                l.socket(),
                Setup::Ws(ws_settings(l, cfg.mqtt.max_packet_size)),
            )
        });
    let mut tls = Vec::new();
    // TLS listeners start once a certificate is configured; reading it is part of the start.
    for (name, l) in cfg.listener.ssl.iter().filter(|(_, l)| l.enable) {
        if l.certfile.is_some() {
            let settings = TlsSettings::load(&format!("listener.ssl.{name}"), &l.tls())
                .map_err(StartError::Tls)?;
            tls.push((format!("ssl.{name}"), l.socket(), Setup::Tls(settings)));
        }
    }
    for (name, l) in cfg.listener.wss.iter().filter(|(_, l)| l.enable) {
        if l.certfile.is_some() {
            let settings = TlsSettings::load(&format!("listener.wss.{name}"), &l.tls())
                .map_err(StartError::Tls)?;
            let ws = l.ws();
            tls.push((
                format!("wss.{name}"),
                ws.socket(),
                Setup::Wss(settings, ws_settings(&ws, cfg.mqtt.max_packet_size)),
            ));
        }
    }
    for (name, l, ws) in plain.chain(ws).chain(tls) {
        let addr = probe_listener(&name, l.bind)?;
        // Held (bound with SO_REUSEPORT, not listening) until the shards have bound it: no
        // other process probing for a free port can be given this one in the meantime.
        if let Ok(h) = listener::hold(addr) {
            holders.push(h);
        }
        listeners.push((name, addr, l, ws));
    }
    // The TCP gateway's listeners, bound by its shard alone (probed now when it starts with
    // the broker, so a port in use fails the start); the TLS one once a certificate is set.
    let ssl = &cfg.tcp.listener.ssl.external;
    let gw_tls = if ssl.enable && ssl.certfile.is_some() {
        Some(TlsSettings::load("tcp.listener.ssl.external", &ssl.tls()).map_err(StartError::Tls)?)
    } else {
        None
    };
    let mut gw_binds = vec![cfg.tcp.listener.external.bind];
    if gw_tls.is_some() {
        gw_binds.push(ssl.bind);
    }
    if cfg.gateway.tcp.enable {
        for (i, bind) in gw_binds.iter_mut().enumerate() {
            let name = if i == 0 {
                "gateway.tcp"
            } else {
                "gateway.tcp.ssl"
            };
            *bind = probe_listener(name, *bind)?;
            if let Ok(h) = listener::hold(*bind) {
                holders.push(h);
            }
        }
    }
    if listeners.is_empty() {
        return Err(StartError::NoListener);
    }
    // Bound before any shard starts, so a port in use fails the start at once.
    let admin_listener = if cfg.admin.enable {
        Some(
            std::net::TcpListener::bind(cfg.admin.bind).map_err(|error| StartError::Admin {
                addr: cfg.admin.bind,
                error,
            })?,
        )
    } else {
        None
    };
    let auth = AuthChain::from_config(&cfg.auth).map_err(StartError::Auth)?;
    let acl = match &cfg.auth.acl_file {
        Some(path) => {
            let acl = crate::auth::acl::load(path, cfg.auth.nomatch())
                .map_err(|e| StartError::Auth(format!("auth.acl_file: {e}")))?;
            info!(file = %path.display(), rules = acl.rules.len(), "access rules loaded");
            Some(Arc::new(acl))
        }
        None => None,
    };
    let mut gates: Vec<Arc<Gate>> = listeners
        .iter()
        .map(|(_, _, l, _)| Arc::new(Gate::new(l.max_connections, l.max_conn_rate)))
        .collect();
    // The gateway's gates come after the MQTT listeners' (their listener numbers).
    let gw = &cfg.tcp.listener.external;
    let gw_gates = [
        Arc::new(Gate::new(gw.max_connections, gw.max_conn_rate)),
        Arc::new(Gate::new(ssl.max_connections, ssl.max_conn_rate)),
    ];
    gates.extend(gw_gates.iter().cloned());
    // Then the MQTT-SN gateway's, which counts its clients itself.
    let sn_gate = Arc::new(Gate::new(usize::MAX, 0));
    gates.push(sn_gate.clone());
    // Then the LwM2M gateway's, which counts its endpoints itself.
    let lwm2m_gates = [
        Arc::new(Gate::new(usize::MAX, 0)),
        Arc::new(Gate::new(usize::MAX, 0)),
    ];
    gates.extend(lwm2m_gates.iter().cloned());
    let dtls = lwm2m_dtls(cfg)?;
    let mut lwm2m_binds = vec![cfg.lwm2m.bind_addr()];
    if dtls.is_some() {
        lwm2m_binds.push(cfg.lwm2m.dtls_addr());
    }
    let lwm2m_ctl = Arc::new(GatewayCtl::new(
        "lwm2m",
        cfg.gateway.lwm2m.shard,
        lwm2m_binds.clone(),
        lwm2m_gates[..lwm2m_binds.len()].to_vec(),
        cfg.gateway.lwm2m.enable,
    ));
    let registry = Arc::new(lwm2m_registry(cfg)?);
    let gates = Arc::new(gates);
    let sn_ctl = Arc::new(GatewayCtl::new(
        "mqttsn",
        cfg.gateway.mqttsn.shard,
        vec![cfg.mqtt.sn.bind_addr()],
        vec![sn_gate],
        cfg.gateway.mqttsn.enable,
    ));
    let tcp_ctl = Arc::new(GatewayCtl::new(
        "tcp",
        cfg.gateway.tcp.shard,
        gw_binds.clone(),
        gw_gates[..gw_binds.len()].to_vec(),
        cfg.gateway.tcp.enable,
    ));
    let offline = Arc::new(OfflineQueues::new(
        cfg.mqtt.max_mqueue_bytes_total.as_usize(),
    ));
    let shutdown = Arc::new(AtomicBool::new(false));
    let board = Arc::new(Board::new(shards));
    let mailboxes: Arc<Vec<Arc<Mailbox>>> =
        Arc::new((0..shards).map(|_| Arc::new(Mailbox::default())).collect());
    let mut joins = Vec::new();
    let mut reports = Vec::new();
    let mut failure = None;
    for (shard, ends) in mesh::full_mesh(shards, cfg.shards.channel_capacity)
        .into_iter()
        .enumerate()
    {
        let cpu = cpus[shard];
        let (tx, rx) = mpsc::channel();
        let ctx = ShardCtx {
            shard,
            shards,
            cfg: cfg.clone(),
            mqtt: mqtt_shards.contains(&shard),
            sys: mqtt_shards.first() == Some(&shard),
            listeners: listeners.clone(),
            ends,
            shutdown: shutdown.clone(),
            report: tx,
            board: board.clone(),
            mailbox: mailboxes[shard].clone(),
            auth: auth.clone(),
            acl: acl.clone(),
            gates: gates.clone(),
            offline: offline.clone(),
            tcp_gateway: (shard == cfg.gateway.tcp.shard)
                .then(|| (tcp_ctl.clone(), gw_tls.clone())),
            sn_gateway: (shard == cfg.gateway.mqttsn.shard).then(|| sn_ctl.clone()),
            lwm2m_gateway: (shard == cfg.gateway.lwm2m.shard)
                .then(|| (lwm2m_ctl.clone(), registry.clone(), dtls.clone())),
        };
        let mut builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard{shard}"))
            .io_memory(cfg.shards.io_memory.as_usize());
        if let Some(spin) = cfg.shards.spin_before_park.enabled() {
            builder = builder.spin_before_park(spin);
        }
        let spawned = builder.spawn(move || shard_main(ctx));
        match spawned {
            Ok(j) => {
                joins.push((shard, cpu, j));
                reports.push((shard, cpu, rx));
            }
            Err(e) => {
                failure = Some(StartError::Shard {
                    shard,
                    cpu,
                    error: e.to_string(),
                });
                break;
            }
        }
    }
    if failure.is_none() {
        for (shard, cpu, rx) in &reports {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    failure = Some(StartError::Shard {
                        shard: *shard,
                        cpu: *cpu,
                        error,
                    });
                    break;
                }
                Err(_) => {
                    failure = Some(StartError::Shard {
                        shard: *shard,
                        cpu: *cpu,
                        error: String::new(),
                    });
                    break;
                }
            }
        }
    }
    drop(holders);
    let mut names: Vec<(String, SocketAddr)> = listeners
        .iter()
        .map(|(n, a, _, _)| (n.clone(), *a))
        .collect();
    if cfg.gateway.tcp.enable {
        names.push(("gateway.tcp".into(), gw_binds[0]));
        if let Some(&tls) = gw_binds.get(1) {
            names.push(("gateway.tcp.ssl".into(), tls));
        }
    }
    if let crate::gateway::GatewayState::Running(a) = sn_ctl.state() {
        names.push(("gateway.mqttsn".into(), a[0]));
    }
    if let crate::gateway::GatewayState::Running(a) = lwm2m_ctl.state() {
        names.push(("gateway.lwm2m".into(), a[0]));
        if let Some(&d) = a.get(1) {
            names.push(("gateway.lwm2m.dtls".into(), d));
        }
    }
    let mut handle = BrokerHandle {
        listeners: names,
        shutdown,
        joins,
        shards: Shards {
            mailboxes,
            board,
            mqtt: Arc::new(mqtt_shards.clone()),
            node: cfg.node.name.as_str().into(),
            started: SystemTime::now(),
            auth,
            acl_file: cfg.auth.acl_file.clone().map(|p| (p, cfg.auth.nomatch())),
            gateways: Arc::new(vec![tcp_ctl, sn_ctl, lwm2m_ctl]),
        },
        admin: None,
    };
    if failure.is_none() {
        if let Some(l) = admin_listener {
            match AdminServer::start(
                l,
                &cfg.admin,
                cfg.mqtt.max_packet_size.as_usize(),
                handle.shards.clone(),
            ) {
                Ok(a) => handle.admin = Some(a),
                Err(error) => {
                    failure = Some(StartError::Admin {
                        addr: cfg.admin.bind,
                        error,
                    })
                }
            }
        }
    }
    if let Some(mut err) = failure {
        let results = handle.stop_collect();
        if let StartError::Shard { shard, error, .. } = &mut err {
            if error.is_empty() {
                *error = results
                    .into_iter()
                    .find(|(s, _)| s == shard)
                    .map(|(_, e)| e)
                    .unwrap_or_else(|| "the executor exited".into());
                if error.contains("memlock") || error.contains("Cannot allocate memory") {
                    error.push_str(" (check RLIMIT_MEMLOCK: ulimit -l)");
                }
            }
        }
        return Err(err);
    }
    for (name, addr, _, setup) in &listeners {
        let shards = mqtt_shards.len();
        match setup {
            Setup::Plain => info!(listener = %name, %addr, shards, "listening for MQTT over TCP"),
            Setup::Ws(ws) => {
                info!(listener = %name, %addr, path = %ws.path, shards, "listening for MQTT over WebSocket")
            }
            Setup::Tls(_) => info!(listener = %name, %addr, shards, "listening for MQTT over TLS"),
            Setup::Wss(_, ws) => {
                info!(listener = %name, %addr, path = %ws.path, shards, "listening for MQTT over WebSocket over TLS")
            }
        }
    }
    for ctl in handle.shards.gateways().iter() {
        let (listener, what) = match ctl.name {
            "mqttsn" => ("gateway.mqttsn", "listening for MQTT-SN over UDP"),
            "lwm2m" => ("gateway.lwm2m", "listening for LwM2M over CoAP (UDP)"),
            _ => continue,
        };
        if let crate::gateway::GatewayState::Running(addrs) = ctl.state() {
            let shard = ctl.shard;
            for (i, addr) in addrs.into_iter().enumerate() {
                match i {
                    0 => info!(listener, %addr, shard, "{what}"),
                    _ => {
                        info!(listener = "gateway.lwm2m.dtls", %addr, shard, "listening for LwM2M over CoAP over DTLS")
                    }
                }
            }
        }
    }
    if cfg.gateway.tcp.enable {
        let shard = cfg.gateway.tcp.shard;
        for (name, addr) in ["gateway.tcp", "gateway.tcp.ssl"].iter().zip(&gw_binds) {
            info!(listener = name, %addr, shard, "listening for the TCP gateway");
        }
    }
    log_access_policy(cfg, &listeners);
    if let Some(a) = &handle.admin {
        info!(addr = %a.addr(), "admin API listening (REST under /api/v1, Prometheus at /metrics)");
    }
    info!(shards, cpus = ?cpus, node = %cfg.node.name, "broker started");
    Ok(handle)
}

/// Says at start who may connect, and warns when anonymous clients are let in on a listener
/// that other hosts can reach.
fn log_access_policy(cfg: &Config, listeners: &[ListenerSpec]) {
    use crate::config::AllowAnonymous;
    let remote: Vec<&str> = listeners
        .iter()
        .filter(|(_, addr, _, _)| !addr.ip().is_loopback())
        .map(|(name, _, _, _)| name.as_str())
        .collect();
    match cfg.auth.allow_anonymous {
        AllowAnonymous::True if !remote.is_empty() => warn!(
            listeners = ?remote,
            "anonymous clients are let in from any address (auth.allow_anonymous = true) on listeners other hosts can reach"
        ),
        AllowAnonymous::Loopback if !remote.is_empty() && cfg.auth.password_file.is_none() => info!(
            "clients without credentials are let in from this host only (auth.allow_anonymous = \"loopback\"); for other hosts set auth.password_file (shardmq passwd) or auth.allow_anonymous"
        ),
        _ => {}
    }
}

impl BrokerHandle {
    /// Re-reads the password file (SIGHUP).
    pub fn reload_auth(&self) -> Result<(), String> {
        reload_auth(&self.shards)
    }

    /// (listener name, bound address) of every listener.
    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// The bound address of listener `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// The flag that stops the broker when raised.
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// The latest snapshot of every shard (at most 100 ms old).
    pub fn stats(&self) -> Vec<ShardStats> {
        self.shards.board.shards()
    }

    /// Counters summed over shards.
    pub fn metrics(&self) -> Metrics {
        self.shards.board.snapshot().metrics()
    }

    /// What reaches the shards from other threads.
    pub fn shards(&self) -> &Shards {
        &self.shards
    }

    /// The address the admin API listens on, if it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr())
    }

    /// Stops the broker and waits for every shard; errors name the shards that failed.
    pub fn stop(self) -> Result<(), String> {
        let errors: Vec<String> = self
            .stop_collect()
            .into_iter()
            .map(|(shard, e)| format!("shard {shard}: {e}"))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Waits until the shutdown flag is raised (by a signal handler or another thread), then
    /// stops.
    pub fn wait(self) -> Result<(), String> {
        while !self.shutdown.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop()
    }

    fn stop_collect(mut self) -> Vec<(usize, String)> {
        // The API first: no request waits on a shard that is stopping.
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        self.shutdown.store(true, Ordering::Release);
        let mut errors = Vec::new();
        for (shard, _, j) in self.joins {
            match j.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push((shard, e)),
                Err(e) => errors.push((shard, e.to_string())),
            }
        }
        for (name, addr) in &self.listeners {
            wait_port_released(name, *addr);
        }
        errors
    }
}

/// Waits (at most a second) until nothing listens on `addr` any more, so that a supervisor
/// restarting the broker the moment it exits finds the port free.
fn wait_port_released(name: &str, addr: SocketAddr) {
    let started = Instant::now();
    while listener::probe(addr).is_err() {
        if started.elapsed() > Duration::from_secs(1) {
            warn!(listener = %name, %addr, "the port is still in use after shutdown");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

async fn wait_for_shutdown(flag: &AtomicBool) {
    while !flag.load(Ordering::Acquire) {
        sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the engine's timers: sleeps until the earliest deadline (at most a second), or until
/// the engine arms an earlier one and wakes it.
async fn run_timers(engine: Rc<RefCell<Engine>>) {
    let mut sleeper: Option<(Timestamp, glommio::timer::Timer)> = None;
    std::future::poll_fn(|cx| loop {
        let now = clock::now();
        let mut e = engine.borrow_mut();
        if e.poll_timeout().is_some_and(|t| t <= now) {
            e.handle_timeout(now);
        }
        let wake_at = e
            .poll_timeout()
            .map_or(now.after(Duration::from_secs(1)), |t| {
                t.min(now.after(Duration::from_secs(1)))
            });
        e.set_timer_waker(cx.waker(), wake_at);
        drop(e);
        if sleeper.as_ref().is_none_or(|(at, _)| *at != wake_at) {
            let wait = wake_at.since(now) + Duration::from_millis(1);
            sleeper = Some((wake_at, glommio::timer::Timer::new(wait)));
        }
        let Some((_, timer)) = sleeper.as_mut() else {
            continue;
        };
        if std::pin::Pin::new(timer).poll(cx).is_pending() {
            return std::task::Poll::<()>::Pending;
        }
        sleeper = None;
    })
    .await
}

async fn shard_main(ctx: ShardCtx) -> Result<(), String> {
    let ShardCtx {
        shard,
        shards,
        cfg,
        mqtt,
        sys,
        listeners,
        ends,
        shutdown,
        report,
        board,
        mailbox,
        auth,
        acl,
        gates,
        offline,
        tcp_gateway,
        sn_gateway,
        lwm2m_gateway,
    } = ctx;
    // Whatever way this function ends, the mailbox stops taking requests.
    struct CloseOnDrop(Arc<Mailbox>);
    impl Drop for CloseOnDrop {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _mailbox_guard = CloseOnDrop(mailbox.clone());
    let connected = futures_lite::future::or(async { Some(mesh::connect(ends).await) }, async {
        wait_for_shutdown(&shutdown).await;
        None
    })
    .await;
    let Some(connected) = connected else {
        return Ok(());
    };
    let engine = Rc::new(RefCell::new(Engine::new(
        crate::config::engine_config(&cfg, shard, shards),
        clock::now(),
    )));
    engine.borrow_mut().set_acl(acl);
    engine.borrow_mut().share_offline_queues(offline);
    let ctx = Rc::new(ConnCtx {
        engine: engine.clone(),
        scratch: RefCell::new(vec![0u8; cfg.shards.read_buffer.as_usize()]),
        parking: RefCell::new(None),
        gates: gates.to_vec(),
    });
    let mut park_task = None;
    if cfg.shards.park_idle_after.enabled().is_some() {
        match ParkingLot::start(ctx.clone(), shutdown.clone()) {
            Ok((lot, task)) => {
                *ctx.parking.borrow_mut() = Some(lot);
                park_task = Some(task);
            }
            Err(e) => {
                let msg = format!("cannot create the parking epoll set: {e}");
                let _ = report.send(Err(msg.clone()));
                return Err(msg);
            }
        }
    }
    let mesh_tasks = mesh::spawn_tasks(connected, engine.clone());
    let timer_task = spawn_local(run_timers(engine.clone()));
    let control_task = spawn_local(control::serve(mailbox, engine.clone()));
    let auth_task = auth.map(|chain| {
        spawn_local(crate::auth::serve(
            engine.clone(),
            chain,
            cfg.auth.cache_ttl.0,
        ))
    });
    let sys_task = cfg.sys.interval.enabled().filter(|_| sys).map(|every| {
        spawn_local(super::sys::run(
            engine.clone(),
            board.clone(),
            every,
            cfg.node.name.clone(),
        ))
    });
    let fault_task = debug_panic_after(shard).map(|after| {
        spawn_local(async move {
            sleep(after).await;
            panic!("fault injected by SHARDMQTEST_PANIC_SHARD");
        })
    });
    let publish_stats = {
        let engine = engine.clone();
        let board = board.clone();
        move || {
            let e = engine.borrow();
            board.publish(
                shard,
                ShardStats {
                    metrics: e.metrics.clone(),
                    connections: e.connection_count(),
                    sessions: e.session_count(),
                    subscriptions: e.subscription_count(),
                    local_filters: e.local_filter_count(),
                    topics: e.topic_count(),
                    retained: e.retained_count(),
                    parked: e.parked_count(),
                    mqueue_bytes: e.offline_queues().bytes() as u64,
                },
            );
            drop(e);
            // One shard keeps the peaks of the broker-wide counts up to date.
            if sys {
                board.snapshot();
            }
        }
    };
    let stats_task = spawn_local({
        let publish_stats = publish_stats.clone();
        let engine = engine.clone();
        async move {
            let mut last_shape = (0, 0);
            let mut dirty = false;
            let mut last_collect = Instant::now();
            loop {
                sleep(STATS_INTERVAL).await;
                publish_stats();
                let shape = {
                    let e = engine.borrow();
                    (e.connection_count(), e.parked_count())
                };
                // Hand freed memory back once connections stop coming, going or parking (one
                // quiet tick after a change), at most once per COLLECT_INTERVAL. Under steady
                // churn nothing is collected: new connections reuse what old ones freed.
                if shape != last_shape {
                    last_shape = shape;
                    dirty = true;
                } else if dirty && last_collect.elapsed() >= COLLECT_INTERVAL {
                    return_freed_memory(shard);
                    last_collect = Instant::now();
                    dirty = false;
                }
            }
        }
    });
    let mut accept_tasks = Vec::new();
    // A second descriptor of every listening socket, to stop it listening at shutdown.
    let mut listening: Vec<OwnedFd> = Vec::new();
    if mqtt {
        for (number, (name, addr, lcfg, ws)) in listeners.iter().enumerate() {
            match listener::bind(*addr, lcfg.backlog) {
                Ok((l, fd)) => {
                    listening.push(fd);
                    accept_tasks.push(listener::spawn_accept(
                        name.clone(),
                        number as u16,
                        l,
                        lcfg.clone(),
                        Rc::new(ws.clone()),
                        ctx.clone(),
                    ))
                }
                Err(e) => {
                    let msg = format!("listener {name}: cannot bind {addr}: {e}");
                    let _ = report.send(Err(msg.clone()));
                    return Err(msg);
                }
            }
        }
    }
    let mut gateway_task = None;
    if let Some((ctl, tls)) = tcp_gateway {
        use crate::gateway::tcp as tcpgw;
        // Its listener numbers follow the MQTT listeners' (their gates' indexes): plain, TLS.
        let number = listeners.len() as u16;
        for n in [number, number + 1] {
            engine
                .borrow_mut()
                .set_listener_protocol(n, tcpgw::protocol(&cfg.tcp));
        }
        let gw = Rc::new(tcpgw::GwCtx::new(ctx.clone(), &cfg.tcp));
        let tls = tls.map(Rc::new);
        let mut running = None;
        if ctl.wanted() {
            match tcpgw::bind_all(&ctl, number, &cfg.tcp, &gw, tls.as_ref()) {
                Ok((r, addrs)) => {
                    running = Some(r);
                    ctl.settle(crate::gateway::GatewayState::Running(addrs));
                }
                Err(e) => {
                    let msg = format!("listener gateway.tcp: {e}");
                    let _ = report.send(Err(msg.clone()));
                    return Err(msg);
                }
            }
        }
        gateway_task = Some(spawn_local(tcpgw::supervise(
            ctl,
            number,
            cfg.tcp.clone(),
            gw,
            tls,
            running,
        )));
    }
    let mut sn_task = None;
    let mut sn_ctx = None;
    if let Some(ctl) = sn_gateway {
        use crate::gateway::{mqttsn, udp};
        // Its listener number follows the TCP gateway's two.
        let number = listeners.len() as u16 + 2;
        engine
            .borrow_mut()
            .set_listener_protocol(number, mqttsn::protocol(&cfg.mqtt.sn));
        let sn = Rc::new(mqttsn::ctx(
            ctx.clone(),
            &cfg.mqtt.sn,
            number,
            ctl.gates[0].clone(),
        ));
        let mut socks = vec![udp::Socket::new(sn.clone(), ctl.binds[0])];
        if ctl.wanted() {
            match udp::bind_all(&mut socks) {
                Ok(addrs) => ctl.settle(crate::gateway::GatewayState::Running(addrs)),
                Err(e) => {
                    let msg = format!("listener gateway.mqttsn: {e}");
                    let _ = report.send(Err(msg.clone()));
                    return Err(msg);
                }
            }
        }
        sn_task = Some(spawn_local(udp::supervise(ctl, socks)));
        sn_ctx = Some(sn);
    }
    let mut lwm2m_task = None;
    let mut lwm2m_ctx = None;
    if let Some((ctl, registry, dtls)) = lwm2m_gateway {
        use crate::gateway::{lwm2m, udp};
        // Its listener number follows the MQTT-SN gateway's.
        let number = listeners.len() as u16 + 3;
        engine
            .borrow_mut()
            .set_listener_protocol(number, lwm2m::protocol());
        let gw = Rc::new(lwm2m::ctx(
            ctx.clone(),
            &cfg.lwm2m,
            registry.clone(),
            number,
            ctl.gates[0].clone(),
        ));
        let mut socks = vec![udp::Socket::new(gw.clone(), ctl.binds[0])];
        if let Some(dtls) = dtls {
            // CoAP over DTLS: a second gateway on its own socket and listener number.
            let d = Rc::new(
                lwm2m::ctx(
                    ctx.clone(),
                    &cfg.lwm2m,
                    registry.clone(),
                    number + 1,
                    ctl.gates[1].clone(),
                )
                .with_dtls(crate::gateway::dtls::DtlsLayer::new(dtls)),
            );
            engine
                .borrow_mut()
                .set_listener_protocol(number + 1, lwm2m::protocol());
            socks.push(udp::Socket::new(d, ctl.binds[1]));
        }
        if ctl.wanted() {
            match udp::bind_all(&mut socks) {
                Ok(addrs) => ctl.settle(crate::gateway::GatewayState::Running(addrs)),
                Err(e) => {
                    let msg = format!("listener gateway.lwm2m: {e}");
                    let _ = report.send(Err(msg.clone()));
                    return Err(msg);
                }
            }
        }
        let ctxs: Vec<_> = socks.iter().map(|s| s.ctx().clone()).collect();
        lwm2m_task = Some(spawn_local(udp::supervise(ctl, socks)));
        lwm2m_ctx = Some(ctxs);
    }
    let _ = report.send(Ok(()));
    wait_for_shutdown(&shutdown).await;
    drop(accept_tasks);
    drop(gateway_task);
    drop(sn_task);
    drop(lwm2m_task);
    listening.into_iter().for_each(listener::stop_listening);
    engine.borrow_mut().close_all(clock::now());
    if let Some(sn) = sn_ctx.take() {
        sn.forget_all();
    }
    for gw in lwm2m_ctx.take().into_iter().flatten() {
        gw.forget_all();
    }
    let started = Instant::now();
    while engine.borrow().connection_count() > 0 && started.elapsed() < DRAIN_TIMEOUT {
        sleep(Duration::from_millis(10)).await;
    }
    publish_stats();
    drop(stats_task);
    drop(control_task);
    drop(auth_task);
    drop(sys_task);
    drop(timer_task);
    drop(fault_task);
    drop(mesh_tasks);
    drop(park_task);
    ctx.parking.borrow_mut().take();
    Ok(())
}
