//! `Engine`: the broker logic of one shard, without I/O.
//!
//! The engine owns everything a shard knows: its connections' protocol state and outboxes, the
//! sessions it holds, its local subscription index, its replica of the route table, its
//! partition of the retained messages, the client-id registry entries it owns, and its counters.
//! The shard layer drives it:
//!
//! - connection events: [`Engine::open_conn`], [`Engine::handle_packet`],
//!   [`Engine::handle_decode_error`], [`Engine::conn_timeout`], [`Engine::conn_closed`];
//! - messages from other shards: [`Engine::handle_shard_msg`];
//! - session timers: [`Engine::poll_timeout`] and [`Engine::handle_timeout`];
//!
//! and drains it: each connection's outbox ([`Engine::conn_outbox`], woken through the waker the
//! driver registers) and the per-destination queues of [`ShardMsg`]s ([`Engine::take_outgoing`]).
//! Every call takes the current time; nothing here reads a clock or touches a socket.
//!
//! Flows (see docs/architecture.md for the pictures):
//! - **publish**: match the route replica → other shards (one `Deliver` each, batched), match the
//!   local index → local sessions (one copy per session at the highest QoS of its matching
//!   subscriptions, QoS = min(publish, subscription)).
//! - **subscribe**: add to the local index; a filter new to this shard becomes a route delta to
//!   every other shard; SUBACK waits until every shard has acknowledged the delta.
//! - **connect**: the owner shard of the client id (fixed-seed hash) serializes registrations:
//!   it answers directly when nobody holds the id, or asks the holder to close the old connection
//!   and hand the session over. A session moving between shards keeps being served: the old
//!   holder forwards deliveries that still reach it until every shard routes to the new holder,
//!   which drops duplicates by message id meanwhile.

use super::index::ClientIndex;
use super::message::{message_id, Message, MessageId, SharedMessage};
use super::metrics::Metrics;
use super::msgs::{ShardMsg, Ticket};
use super::retained::{RetainedLimits, RetainedStore, SetOutcome};
use super::route::{owner_shard, RouteTable, ShardSet};
use super::session::{Delivery, Session, SessionLimits};
use super::time::Timestamp;
use super::topic;
use super::trie::TopicTrie;
use crate::config::Config;
use crate::protocol::bytestr::ByteStr;
use crate::protocol::mqtt::{
    self, Connack, Connect, ConnectReturnCode, DecodeError, DecodeOptions, LastWill, Packet,
    ProtocolLevel, Publish, QoS, Suback, SubackCode, Subscribe, Unsubscribe,
};
use ahash::{AHashMap, AHashSet};
use bytes::{Bytes, BytesMut};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;
use tracing::debug;

/// What the engine needs from the configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This shard's index.
    pub shard: usize,
    /// Number of shards.
    pub shards: usize,
    /// Session limits.
    pub limits: SessionLimits,
    /// Retained partition limits.
    pub retained: RetainedLimits,
    /// `retainer.enable`.
    pub retainer_enabled: bool,
    /// `mqtt.max_packet_size`.
    pub max_packet_size: usize,
    /// `mqtt.max_clientid_len`.
    pub max_clientid_len: usize,
    /// `mqtt.v31_max_clientid_len`.
    pub v31_max_clientid_len: usize,
    /// `mqtt.idle_timeout`.
    pub idle_timeout: Duration,
    /// `mqtt.keepalive_multiplier`.
    pub keepalive_multiplier: f64,
    /// `mqtt.session_expiry_interval`; `None` = never.
    pub session_expiry: Option<Duration>,
    /// `shards.max_pending`.
    pub max_pending: usize,
    /// `shards.batch_size`.
    pub batch_size: usize,
    /// `shards.park_idle_after`: a connected client idle this long is parked; `None` = never.
    pub park_after: Option<Duration>,
}

impl EngineConfig {
    /// Derives the engine's view of `cfg` for shard `shard` of `shards`.
    pub fn from_config(cfg: &Config, shard: usize, shards: usize) -> Self {
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
                max_write_buffer: m.max_write_buffer.as_usize(),
            },
            retained: RetainedLimits {
                max_messages: per_partition,
                max_payload: cfg.retainer.max_payload_size.as_usize(),
                expiry: cfg.retainer.expiry_interval.enabled(),
            },
            retainer_enabled: cfg.retainer.enable,
            max_packet_size: m.max_packet_size.as_usize(),
            max_clientid_len: m.max_clientid_len,
            v31_max_clientid_len: m.v31_max_clientid_len,
            idle_timeout: m.idle_timeout.0,
            keepalive_multiplier: m.keepalive_multiplier,
            session_expiry: m.session_expiry_interval.enabled(),
            max_pending: cfg.shards.max_pending,
            batch_size: cfg.shards.batch_size,
            park_after: cfg.shards.park_idle_after.enabled(),
        }
    }
}

/// A connection of this shard (slab index plus generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    idx: u32,
    gen: u32,
}

impl ConnId {
    /// (slot, generation), to carry the id through a plain integer.
    pub fn parts(self) -> (u32, u32) {
        (self.idx, self.gen)
    }

    /// The id of `parts`.
    pub fn from_parts(idx: u32, gen: u32) -> Self {
        ConnId { idx, gen }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnPhase {
    AwaitingConnect,
    /// CONNECT received; waiting for the owner shard (and maybe the old holder).
    Connecting,
    /// Attached to the session in this slot (a `u32` keeps the phase, and `Conn`, small).
    Connected(u32),
    Closed,
}

struct Conn {
    gen: u32,
    outbox: BytesMut,
    waker: Option<Waker>,
    close: bool,
    paused: bool,
    phase: ConnPhase,
    level: ProtocolLevel,
    /// Keepalive allowance (keepalive × multiplier) in milliseconds; 0 = none.
    keepalive_ms: u32,
    /// When the last packet arrived (before CONNECT: when the connection opened).
    last_rx: Timestamp,
    peer: Peer,
    clean: bool,
    will: Option<Box<LastWill>>,
    /// The deadline a timer is armed for in `conn_timers` (`NEVER`: none).
    timer_at: Timestamp,
    /// Last time bytes moved either way.
    last_io: Timestamp,
    /// The driver should park the connection (idle for `park_after`).
    park: bool,
    /// The socket is parked: no driver task; `waker` promotes it.
    parked: bool,
    /// Acknowledgements held back until retained messages this client published are stored
    /// on their owner shards (so a subscriber that comes after the PUBACK sees them).
    held: Option<Box<HeldAcks>>,
}

/// A peer address in 20 bytes (`SocketAddr` takes 32), kept for logs.
#[derive(Clone, Copy)]
struct Peer {
    ip: IpAddr,
    port: u16,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        SocketAddr::new(self.ip, self.port).fmt(f)
    }
}

struct HeldAcks {
    /// Retained stores not confirmed yet.
    waiting: u32,
    /// Acknowledgements written meanwhile, in order.
    bytes: BytesMut,
}

impl Conn {
    /// Whether the driver should read more input.
    fn readable(&self) -> bool {
        !self.close && !self.paused && self.phase != ConnPhase::Connecting
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

struct ActiveSession {
    gen: u32,
    session: Session,
    conn: Option<ConnId>,
    epoch: u64,
    /// Set while the shard this session moved from still forwards deliveries to it.
    arrival: Option<Box<Arrival>>,
    /// When the detached session expires (`NEVER`: not detached, or no expiry).
    expires_at: Timestamp,
    /// The deadline a timer is armed for in `timers` (`NEVER`: none).
    timer_at: Timestamp,
}

/// The tail of a move between shards, kept off the common session path.
struct Arrival {
    /// The shard still forwarding deliveries for this session.
    upstream: usize,
    /// Whether it was told to stop.
    released: bool,
    /// Ids delivered meanwhile, to drop the copies it forwards.
    dedup: AHashSet<MessageId>,
}

/// What stays behind when a session moves to another shard: its index entries, forwarding
/// what still matches, until the new holder releases it and a barrier proves nothing is left.
struct ForwardSlot {
    gen: u32,
    client_id: ByteStr,
    to: usize,
    filters: Vec<String>,
    upstream: Option<usize>,
    upstream_released: bool,
    released: bool,
    barrier_done: bool,
}

// Forwarding slots are rare and short-lived; boxing the common variant would cost an
// allocation per session.
#[allow(clippy::large_enum_variant)]
enum SessionSlot {
    Active(ActiveSession),
    Forwarding(ForwardSlot),
}

impl SessionSlot {
    fn gen(&self) -> u32 {
        match self {
            SessionSlot::Active(a) => a.gen,
            SessionSlot::Forwarding(f) => f.gen,
        }
    }
}

/// The owner's record of a client id (16 bytes: one per client id in the cluster).
struct Registration {
    epoch: u64,
    /// The shard holding the session; `NO_HOLDER` before the first connect is placed.
    holder: u32,
    /// A connect is being placed; later ones wait in `Engine::reg_waiting`.
    busy: bool,
}

const NO_HOLDER: u32 = u32::MAX;

enum Waiter {
    /// SUBACK once every shard has the new routes, then the retained messages of the granted
    /// filters: a client that sees either knows that publishes from anywhere reach it.
    Suback {
        conn: ConnId,
        packet: Bytes,
        key: usize,
        gen: u32,
        granted: Vec<(String, QoS)>,
    },
    Release {
        client_id: ByteStr,
        to: usize,
        key: usize,
        gen: u32,
    },
    Barrier {
        key: usize,
        gen: u32,
    },
}

enum Handed {
    Fresh,
    Local(usize),
    Moved {
        session: Box<Session>,
        dedup: Vec<MessageId>,
        upstream: Option<usize>,
    },
}

#[derive(Default)]
struct Outgoing {
    queue: VecDeque<ShardMsg>,
    waker: Option<Waker>,
}

/// What the driver of a connection needs to know after feeding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnStatus {
    /// Flush the outbox, then close the socket.
    pub close: bool,
    /// Whether to read more input now (false while connecting or paused by back-pressure).
    pub readable: bool,
    /// When [`Engine::conn_timeout`] must be called.
    pub deadline: Option<Timestamp>,
    /// The connection has been idle long enough to be parked (when nothing is left to do).
    pub park: bool,
}

/// The broker logic of one shard.
pub struct Engine {
    cfg: EngineConfig,
    conns: Slab<Conn>,
    sessions: Slab<SessionSlot>,
    next_gen: u32,
    /// Client id → key of its active session slot here.
    by_client: ClientIndex,
    forwarders: AHashMap<ByteStr, usize>,
    registry: AHashMap<ByteStr, Registration>,
    /// Connects waiting for a busy registration, in arrival order (never empty lists).
    reg_waiting: AHashMap<ByteStr, VecDeque<(Ticket, bool)>>,
    next_epoch: u64,
    local: TopicTrie<Vec<(usize, QoS)>>,
    routes: RouteTable,
    route_adds: Vec<ByteStr>,
    route_removes: Vec<ByteStr>,
    route_seq: u64,
    acked: Vec<u64>,
    waiters: VecDeque<(u64, Waiter)>,
    retained: RetainedStore,
    next_retained_purge: Timestamp,
    outgoing: Vec<Outgoing>,
    inbox: VecDeque<ShardMsg>,
    paused: Vec<ConnId>,
    timers: BinaryHeap<Reverse<(Timestamp, usize, u32)>>,
    /// CONNECT and keepalive deadlines: (deadline, connection slot, generation).
    conn_timers: BinaryHeap<Reverse<(Timestamp, u32, u32)>>,
    timer_waker: Option<Waker>,
    timer_wake_at: Timestamp,
    parked_count: usize,
    msg_seq: u64,
    client_seq: u64,
    started_at: Timestamp,
    scratch: Vec<(usize, QoS)>,
    now: Timestamp,
    /// This shard's counters.
    pub metrics: Metrics,
}

fn conn_mut(conns: &mut Slab<Conn>, id: ConnId) -> Option<&mut Conn> {
    conns.get_mut(id.idx as usize).filter(|c| c.gen == id.gen)
}

/// The session's connection, if it has one that is not closing.
fn attached(conns: &mut Slab<Conn>, id: Option<ConnId>) -> Option<&mut Conn> {
    id.and_then(|id| conn_mut(conns, id)).filter(|c| !c.close)
}

/// The client id of a connection attached to a session ("" before that).
fn client_of<'a>(sessions: &'a Slab<SessionSlot>, c: &Conn) -> &'a str {
    match c.phase {
        ConnPhase::Connected(key) => match sessions.get(key as usize) {
            Some(SessionSlot::Active(a)) => a.session.client_id.as_str(),
            _ => "",
        },
        _ => "",
    }
}

/// Whether slot `key` holds the active session of `client_id`.
fn slot_holds(sessions: &Slab<SessionSlot>, key: u32, client_id: &ByteStr) -> bool {
    matches!(sessions.get(key as usize), Some(SessionSlot::Active(a)) if a.session.client_id == *client_id)
}

fn push_pending(list: &mut Vec<ByteStr>, cancel: &mut Vec<ByteStr>, filter: &str) {
    if let Some(i) = cancel.iter().position(|f| f.as_str() == filter) {
        cancel.swap_remove(i);
    } else {
        list.push(ByteStr::from(filter));
    }
}

impl Engine {
    /// A new engine for shard `cfg.shard` of `cfg.shards`, started at `now`.
    pub fn new(cfg: EngineConfig, now: Timestamp) -> Self {
        let shards = cfg.shards;
        Engine {
            retained: RetainedStore::new(cfg.retained),
            cfg,
            conns: Slab::new(),
            sessions: Slab::new(),
            next_gen: 0,
            by_client: ClientIndex::default(),
            forwarders: AHashMap::new(),
            registry: AHashMap::new(),
            reg_waiting: AHashMap::new(),
            next_epoch: 0,
            local: TopicTrie::new(),
            routes: RouteTable::new(),
            route_adds: Vec::new(),
            route_removes: Vec::new(),
            route_seq: 0,
            acked: vec![0; shards],
            waiters: VecDeque::new(),
            next_retained_purge: now,
            outgoing: (0..shards).map(|_| Outgoing::default()).collect(),
            inbox: VecDeque::new(),
            paused: Vec::new(),
            timers: BinaryHeap::new(),
            conn_timers: BinaryHeap::new(),
            timer_waker: None,
            timer_wake_at: now,
            parked_count: 0,
            msg_seq: 0,
            client_seq: 0,
            started_at: now,
            scratch: Vec::new(),
            now,
            metrics: Metrics::default(),
        }
    }

    /// This shard's index.
    pub fn shard(&self) -> usize {
        self.cfg.shard
    }

    /// Connections open on this shard.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Sessions held by this shard (online and offline).
    pub fn session_count(&self) -> usize {
        self.by_client.len()
    }

    /// Distinct filters with local subscribers.
    pub fn local_filter_count(&self) -> usize {
        self.local.len()
    }

    /// Retained messages in this shard's partition.
    pub fn retained_count(&self) -> u64 {
        self.retained.len()
    }

    fn next_gen(&mut self) -> u32 {
        self.next_gen = self.next_gen.wrapping_add(1);
        self.next_gen
    }

    fn owner(&self, key: &[u8]) -> usize {
        owner_shard(key, self.cfg.shards)
    }

    // ---------------------------------------------------------------- connection inputs

    /// A transport connection was accepted.
    pub fn open_conn(&mut self, peer: SocketAddr, now: Timestamp) -> ConnId {
        self.now = now;
        let gen = self.next_gen();
        let idx = self.conns.insert(Conn {
            gen,
            outbox: BytesMut::new(),
            waker: None,
            close: false,
            paused: false,
            phase: ConnPhase::AwaitingConnect,
            level: ProtocolLevel::V311,
            keepalive_ms: 0,
            last_rx: now,
            peer: Peer {
                ip: peer.ip(),
                port: peer.port(),
            },
            clean: true,
            will: None,
            timer_at: Timestamp::NEVER,
            last_io: now,
            park: false,
            parked: false,
            held: None,
        });
        self.metrics.connections_accepted += 1;
        let id = ConnId {
            idx: idx as u32,
            gen,
        };
        self.arm_conn(id);
        id
    }

    /// Arms the connection's timer for its current deadline if that is earlier than the one
    /// armed. A later deadline (traffic pushed it back) is found when the armed timer fires.
    fn arm_conn(&mut self, id: ConnId) {
        let Some(deadline) = self.conn_status(id).and_then(|s| s.deadline) else {
            return;
        };
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if deadline < c.timer_at {
            c.timer_at = deadline;
            self.conn_timers.push(Reverse((deadline, id.idx, id.gen)));
            self.note_timer(deadline);
        }
    }

    /// Wakes the timer task if `at` is earlier than the time it sleeps until.
    fn note_timer(&mut self, at: Timestamp) {
        if at < self.timer_wake_at {
            self.timer_wake_at = at;
            if let Some(w) = self.timer_waker.take() {
                w.wake();
            }
        }
    }

    /// Registers the waker of the shard's timer task, which sleeps until `wake_at` unless a
    /// timer is armed for earlier.
    pub fn set_timer_waker(&mut self, waker: &Waker, wake_at: Timestamp) {
        self.timer_wake_at = wake_at;
        self.timer_waker = Some(waker.clone());
    }

    /// How to decode this connection's input.
    pub fn decode_options(&self, id: ConnId) -> DecodeOptions {
        let (level, expect_connect) = self
            .conns
            .get(id.idx as usize)
            .map_or((ProtocolLevel::V311, false), |c| {
                (c.level, c.phase == ConnPhase::AwaitingConnect)
            });
        DecodeOptions {
            max_packet_size: self.cfg.max_packet_size,
            level,
            expect_connect,
        }
    }

    /// The bytes waiting to be written to this connection.
    pub fn conn_outbox(&mut self, id: ConnId) -> Option<&mut BytesMut> {
        conn_mut(&mut self.conns, id).map(|c| &mut c.outbox)
    }

    /// Registers the waker of the connection's driver task, woken when the outbox gains bytes,
    /// the connection must close, or reading may resume.
    pub fn set_conn_waker(&mut self, id: ConnId, waker: &Waker) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            match &c.waker {
                Some(w) if w.will_wake(waker) => {}
                _ => c.waker = Some(waker.clone()),
            }
        }
    }

    /// What the driver should do next; `None` once the connection is gone.
    pub fn conn_status(&self, id: ConnId) -> Option<ConnStatus> {
        let c = self
            .conns
            .get(id.idx as usize)
            .filter(|c| c.gen == id.gen)?;
        let deadline = match (self.timeout_deadline(c), self.park_deadline(c)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Some(ConnStatus {
            close: c.close,
            readable: c.readable(),
            deadline,
            park: c.park && !c.close,
        })
    }

    /// Whether to read more input now (the `readable` of [`Engine::conn_status`], cheaper).
    pub fn conn_readable(&self, id: ConnId) -> bool {
        self.conns
            .get(id.idx as usize)
            .is_some_and(|c| c.gen == id.gen && c.readable())
    }

    /// When the connection times out: no CONNECT in time, or keepalive.
    fn timeout_deadline(&self, c: &Conn) -> Option<Timestamp> {
        match c.phase {
            ConnPhase::AwaitingConnect => Some(c.last_rx.after(self.cfg.idle_timeout)),
            ConnPhase::Connecting | ConnPhase::Connected(_) => (c.keepalive_ms > 0).then(|| {
                c.last_rx
                    .after(Duration::from_millis(u64::from(c.keepalive_ms)))
            }),
            ConnPhase::Closed => None,
        }
    }

    /// When an idle, connected client should be parked.
    fn park_deadline(&self, c: &Conn) -> Option<Timestamp> {
        let idle = matches!(c.phase, ConnPhase::Connected(_))
            && !c.close
            && !c.paused
            && !c.park
            && !c.parked;
        self.cfg
            .park_after
            .filter(|_| idle)
            .map(|d| c.last_io.after(d))
    }

    /// Bytes moved on the connection: it is not idle.
    pub fn note_io(&mut self, id: ConnId, now: Timestamp) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            c.last_io = now;
            // The park deadline only moves later, so an armed timer already covers it, unless
            // none is armed or the armed one is the later keepalive (after a park request).
            let rearm = self.cfg.park_after.is_some() && (c.park || c.timer_at == Timestamp::NEVER);
            c.park = false;
            if rearm {
                self.arm_conn(id);
            }
        }
    }

    /// The driver parked the socket; `waker` promotes it (a delivery, a close or shutdown
    /// wakes it, as it would wake a driver).
    pub fn conn_parked(&mut self, id: ConnId, waker: Waker) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            c.parked = true;
            c.park = false;
            c.waker = Some(waker);
            self.parked_count += 1;
            self.metrics.connections_parked += 1;
            if let ConnPhase::Connected(key) = c.phase {
                if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key as usize) {
                    a.session.shrink();
                }
            }
        }
    }

    /// A parked socket has a driver again.
    pub fn conn_promoted(&mut self, id: ConnId, now: Timestamp) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            if c.parked {
                c.parked = false;
                self.parked_count -= 1;
            }
            c.last_io = now;
            c.waker = None;
        }
        self.arm_conn(id);
    }

    /// Connections parked now.
    pub fn parked_count(&self) -> usize {
        self.parked_count
    }

    /// Counts bytes moved by the driver.
    pub fn count_io(&mut self, received: usize, sent: usize) {
        self.metrics.bytes_received += received as u64;
        self.metrics.bytes_sent += sent as u64;
    }

    /// A decoded packet from the connection.
    pub fn handle_packet(&mut self, id: ConnId, packet: Packet, now: Timestamp) {
        self.now = now;
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if c.close {
            return;
        }
        c.last_rx = now;
        self.metrics.packets_received += 1;
        match (c.phase, packet) {
            (ConnPhase::AwaitingConnect, Packet::Connect(connect)) => self.on_connect(id, *connect),
            (ConnPhase::AwaitingConnect, p) => self.violation(
                id,
                &format!("[MQTT-3.1.0-1] first packet is {}, not CONNECT", p.name()),
            ),
            (ConnPhase::Connected(_), Packet::Connect(_)) => {
                self.violation(id, "[MQTT-3.1.0-2] second CONNECT on a connection")
            }
            (ConnPhase::Connected(key), p) => self.on_session_packet(id, key as usize, p),
            (ConnPhase::Connecting, p) => {
                // The driver stops reading while connecting; a packet here is a driver bug,
                // never something to trust.
                self.violation(id, &format!("{} before CONNACK", p.name()))
            }
            (ConnPhase::Closed, _) => {}
        }
        self.drain_inbox();
    }

    /// Input that did not decode. Closes the connection (CONNACK 0x01 first for an
    /// unsupported protocol level).
    pub fn handle_decode_error(&mut self, id: ConnId, err: &DecodeError, now: Timestamp) {
        self.now = now;
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if c.close {
            return;
        }
        if let (ConnPhase::AwaitingConnect, DecodeError::UnsupportedProtocolLevel { .. }) =
            (c.phase, err)
        {
            self.metrics.connects_refused += 1;
            debug!(peer = %c.peer, error = %err, "refusing CONNECT");
            mqtt::encode(
                &Packet::Connack(Connack {
                    session_present: false,
                    code: ConnectReturnCode::UnacceptableProtocolVersion,
                }),
                &mut c.outbox,
            );
            c.close = true;
            c.phase = ConnPhase::Closed;
            c.wake();
            return;
        }
        self.metrics.malformed_packets += 1;
        debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), error = %err, "malformed packet, closing");
        self.end_connection(id, true);
        self.drain_inbox();
    }

    /// The connection's deadline passed (or may have): closes it on CONNECT or keepalive
    /// timeout.
    pub fn conn_timeout(&mut self, id: ConnId, now: Timestamp) {
        self.now = now;
        let Some(c) = self.conns.get(id.idx as usize).filter(|c| c.gen == id.gen) else {
            return;
        };
        if c.close {
            return;
        }
        if self.timeout_deadline(c).is_none_or(|d| now < d) {
            if self.park_deadline(c).is_some_and(|d| d <= now) {
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    c.park = true;
                    c.wake();
                }
            }
            return;
        }
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if c.phase == ConnPhase::AwaitingConnect {
            self.metrics.connect_timeouts += 1;
            debug!(peer = %c.peer, "no CONNECT within idle_timeout, closing");
        } else {
            self.metrics.keepalive_timeouts += 1;
            debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), "keepalive timeout, closing");
        }
        self.end_connection(id, true);
        self.drain_inbox();
    }

    /// The transport is gone (peer closed, I/O error, or the driver finished closing). Frees
    /// the connection; a session still attached detaches and its will is published.
    pub fn conn_closed(&mut self, id: ConnId, now: Timestamp) {
        self.now = now;
        if conn_mut(&mut self.conns, id).is_none() {
            return;
        }
        self.end_connection(id, true);
        if self.conns.remove(id.idx as usize).parked {
            self.parked_count -= 1;
        }
        self.metrics.connections_closed += 1;
        self.drain_inbox();
    }

    /// Closes every connection (broker shutdown). Wills are not published.
    pub fn close_all(&mut self, now: Timestamp) {
        self.now = now;
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .map(|(idx, c)| ConnId {
                idx: idx as u32,
                gen: c.gen,
            })
            .collect();
        for id in ids {
            self.end_connection(id, false);
        }
        self.drain_inbox();
    }

    fn violation(&mut self, id: ConnId, what: &str) {
        self.metrics.protocol_errors += 1;
        if let Some(c) = conn_mut(&mut self.conns, id) {
            debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), "protocol error: {what}; closing");
        }
        self.end_connection(id, true);
    }

    /// Marks the connection closing; detaches its session (publishing the will when
    /// `will_allowed` and the client did not DISCONNECT).
    fn end_connection(&mut self, id: ConnId, will_allowed: bool) {
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        c.close = true;
        c.wake();
        let phase = std::mem::replace(&mut c.phase, ConnPhase::Closed);
        let will = c.will.take().filter(|_| will_allowed);
        if let ConnPhase::Connected(key) = phase {
            let client_id = match self.sessions.get(key as usize) {
                Some(SessionSlot::Active(a)) => a.session.client_id.clone(),
                _ => ByteStr::default(),
            };
            self.detach(key as usize);
            if let Some(w) = will {
                self.publish_will(&client_id, *w);
            }
        }
    }

    fn refuse(&mut self, id: ConnId, code: ConnectReturnCode) {
        self.metrics.connects_refused += 1;
        if let Some(c) = conn_mut(&mut self.conns, id) {
            debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), ?code, "refusing CONNECT");
            mqtt::encode(
                &Packet::Connack(Connack {
                    session_present: false,
                    code,
                }),
                &mut c.outbox,
            );
            c.close = true;
            c.phase = ConnPhase::Closed;
            c.will = None;
            c.wake();
        }
    }

    fn on_connect(&mut self, id: ConnId, connect: Connect) {
        let Connect {
            level,
            client_id,
            clean_session,
            keep_alive,
            will,
            ..
        } = connect;
        let limit = match level {
            ProtocolLevel::V31 => self.cfg.v31_max_clientid_len,
            ProtocolLevel::V311 => self.cfg.max_clientid_len,
        };
        let client_id = if client_id.is_empty() {
            if level == ProtocolLevel::V311 && clean_session {
                self.client_seq += 1;
                format!(
                    "shardmq-{:x}-{}-{}",
                    self.started_at.0, self.cfg.shard, self.client_seq
                )
            } else {
                // [MQTT-3.1.3-8]: an empty id needs clean session (and 3.1 has no empty ids).
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    c.level = level;
                }
                return self.refuse(id, ConnectReturnCode::IdentifierRejected);
            }
        } else if client_id.chars().count() > limit {
            if let Some(c) = conn_mut(&mut self.conns, id) {
                c.level = level;
            }
            return self.refuse(id, ConnectReturnCode::IdentifierRejected);
        } else {
            client_id
        };
        let client_id = ByteStr::from(client_id);
        // Whole milliseconds, at least 1 for a non-zero keepalive, saturating at u32::MAX.
        let ka = if keep_alive == 0 {
            0
        } else {
            (f64::from(keep_alive) * self.cfg.keepalive_multiplier * 1000.0)
                .clamp(1.0, f64::from(u32::MAX)) as u32
        };
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        c.level = level;
        c.clean = clean_session;
        c.will = will.map(Box::new);
        c.keepalive_ms = ka;
        c.phase = ConnPhase::Connecting;
        self.arm_conn(id);
        let ticket = Ticket {
            shard: self.cfg.shard,
            idx: id.idx,
            gen: id.gen,
        };
        let owner = self.owner(client_id.as_bytes());
        self.send(
            owner,
            ShardMsg::Register {
                client_id,
                ticket,
                clean: clean_session,
            },
        );
    }

    fn on_session_packet(&mut self, id: ConnId, key: usize, packet: Packet) {
        match packet {
            Packet::Publish(p) => self.on_publish(id, key, p),
            Packet::Puback(pid) => self.on_ack(id, key, pid, AckKind::Puback),
            Packet::Pubrec(pid) => self.on_ack(id, key, pid, AckKind::Pubrec),
            Packet::Pubcomp(pid) => self.on_ack(id, key, pid, AckKind::Pubcomp),
            Packet::Pubrel(pid) => {
                if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) {
                    a.session.on_pubrel(pid);
                }
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    mqtt::encode(&Packet::Pubcomp(pid), &mut c.outbox);
                    c.wake();
                }
            }
            Packet::Subscribe(s) => self.on_subscribe(id, key, s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(id, key, u),
            Packet::Pingreq => {
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    mqtt::encode(&Packet::Pingresp, &mut c.outbox);
                    c.wake();
                }
            }
            Packet::Disconnect => {
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    c.will = None;
                }
                self.end_connection(id, false);
            }
            p @ (Packet::Connack(_)
            | Packet::Suback(_)
            | Packet::Unsuback(_)
            | Packet::Pingresp
            | Packet::Connect(_)) => {
                self.violation(id, &format!("{} is a server-to-client packet", p.name()))
            }
        }
    }

    fn on_publish(&mut self, id: ConnId, key: usize, p: Publish) {
        let now = self.now;
        let route = match p.qos {
            QoS::AtMostOnce | QoS::AtLeastOnce => true,
            QoS::ExactlyOnce => {
                let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
                    return;
                };
                match a
                    .session
                    .on_inbound_qos2(p.packet_id, now, &self.cfg.limits)
                {
                    Ok(new) => {
                        let due = self.cfg.limits.await_rel_timeout.map(|t| now.after(t));
                        self.arm_new(key, due);
                        new
                    }
                    Err(_) => {
                        return self.violation(
                            id,
                            &format!(
                                "more than {} QoS 2 messages await PUBREL",
                                self.cfg.limits.max_awaiting_rel
                            ),
                        )
                    }
                }
            }
        };
        let remote_retain = route
            && p.retain
            && p.qos != QoS::AtMostOnce
            && self.cfg.retainer_enabled
            && self.owner(p.topic.as_bytes()) != self.cfg.shard;
        let publisher = match self.sessions.get(key) {
            Some(SessionSlot::Active(a)) => a.session.client_id.clone(),
            _ => ByteStr::default(),
        };
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if remote_retain {
            c.held
                .get_or_insert_with(|| {
                    Box::new(HeldAcks {
                        waiting: 0,
                        bytes: BytesMut::new(),
                    })
                })
                .waiting += 1;
        }
        let out = match &mut c.held {
            Some(h) => &mut h.bytes,
            None => &mut c.outbox,
        };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => mqtt::encode(&Packet::Puback(p.packet_id), out),
            QoS::ExactlyOnce => mqtt::encode(&Packet::Pubrec(p.packet_id), out),
        }
        if p.qos != QoS::AtMostOnce && c.held.is_none() {
            c.wake();
        }
        if route {
            let msg = self.new_message(p.topic, p.payload, p.qos, p.retain, publisher);
            let ack = remote_retain.then_some(Ticket {
                shard: self.cfg.shard,
                idx: id.idx,
                gen: id.gen,
            });
            self.accept_message(msg, Some(id), ack);
        }
    }

    /// A retained store this connection waited for is done: release its held acknowledgements
    /// once none is left.
    fn on_retained_stored(&mut self, conn: Ticket) {
        let id = ConnId {
            idx: conn.idx,
            gen: conn.gen,
        };
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        let Some(h) = &mut c.held else {
            return;
        };
        h.waiting = h.waiting.saturating_sub(1);
        if h.waiting == 0 {
            if let Some(h) = c.held.take() {
                c.outbox.extend_from_slice(&h.bytes);
                c.wake();
            }
        }
    }

    fn new_message(
        &mut self,
        topic: ByteStr,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        publisher: ByteStr,
    ) -> SharedMessage {
        self.msg_seq += 1;
        Arc::new(Message {
            id: message_id(self.cfg.shard, self.msg_seq),
            topic,
            payload,
            qos,
            retain,
            properties: None,
            publisher,
            timestamp: self.now,
        })
    }

    /// A message entering the broker: store it if retained (telling `ack` when the owner shard
    /// has it), then route it.
    fn accept_message(&mut self, msg: SharedMessage, origin: Option<ConnId>, ack: Option<Ticket>) {
        self.metrics.messages_received += 1;
        if msg.retain && self.cfg.retainer_enabled {
            let owner = self.owner(msg.topic.as_bytes());
            if owner == self.cfg.shard {
                self.store_retained(msg.clone());
            } else {
                self.send(
                    owner,
                    ShardMsg::RetainedSet {
                        msg: msg.clone(),
                        ack,
                    },
                );
            }
        }
        self.publish(msg, origin);
    }

    fn store_retained(&mut self, msg: SharedMessage) {
        match self.retained.set(msg, self.now) {
            SetOutcome::Stored | SetOutcome::Replaced => self.metrics.retained_stored += 1,
            SetOutcome::RefusedFull | SetOutcome::RefusedTooLarge => {
                self.metrics.retained_refused += 1
            }
            SetOutcome::Cleared | SetOutcome::NothingToClear => {}
        }
    }

    fn publish_will(&mut self, client_id: &ByteStr, will: LastWill) {
        self.metrics.wills_published += 1;
        let msg = self.new_message(
            will.topic,
            will.payload,
            will.qos,
            will.retain,
            client_id.clone(),
        );
        self.accept_message(msg, None, None);
    }

    fn publish(&mut self, msg: SharedMessage, origin: Option<ConnId>) {
        let mut remote = ShardSet::EMPTY;
        self.routes
            .for_each_match(&msg.topic, |s| remote = remote.union(*s));
        for shard in remote.iter() {
            self.send_delivery(shard, &msg, origin);
        }
        let local = self.deliver_local(&msg);
        if remote.is_empty() && local == 0 {
            self.metrics.messages_no_subscribers += 1;
        }
    }

    fn send_delivery(&mut self, shard: usize, msg: &SharedMessage, origin: Option<ConnId>) {
        if self.outgoing[shard].queue.len() >= self.cfg.max_pending {
            if msg.qos == QoS::AtMostOnce {
                self.metrics.dropped_overload += 1;
                return;
            }
            if let Some(id) = origin {
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    if !c.paused {
                        c.paused = true;
                        self.paused.push(id);
                        self.metrics.backpressure_pauses += 1;
                    }
                }
            }
        }
        self.send(shard, ShardMsg::Deliver(msg.clone()));
    }

    /// Delivers to the local sessions whose subscriptions match; returns how many sessions.
    fn deliver_local(&mut self, msg: &SharedMessage) -> usize {
        let mut matched = std::mem::take(&mut self.scratch);
        matched.clear();
        let mut filters = 0;
        self.local.for_each_match(&msg.topic, |subs| {
            filters += 1;
            matched.extend_from_slice(subs);
        });
        if filters > 1 {
            // One copy per session, at the highest QoS of its matching subscriptions.
            matched.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            matched.dedup_by_key(|e| e.0);
        }
        for &(key, sub_qos) in &matched {
            self.deliver_to_session(key, msg, msg.qos.min(sub_qos), false);
        }
        let n = matched.len();
        self.scratch = matched;
        n
    }

    fn deliver_to_session(&mut self, key: usize, msg: &SharedMessage, qos: QoS, retain: bool) {
        let now = self.now;
        match self.sessions.get_mut(key) {
            Some(SessionSlot::Active(a)) => {
                if let Some(arrival) = &mut a.arrival {
                    if !arrival.dedup.insert(msg.id) {
                        self.metrics.dropped_duplicates += 1;
                        return;
                    }
                }
                let conn = attached(&mut self.conns, a.conn);
                let (outcome, conn) = match conn {
                    Some(c) => (
                        a.session.deliver(
                            msg,
                            qos,
                            retain,
                            now,
                            &self.cfg.limits,
                            Some(&mut c.outbox),
                        ),
                        Some(c),
                    ),
                    None => (
                        a.session
                            .deliver(msg, qos, retain, now, &self.cfg.limits, None),
                        None,
                    ),
                };
                match outcome {
                    Delivery::Sent => {
                        self.metrics.messages_sent += 1;
                        if let Some(c) = conn {
                            c.wake();
                        }
                        if qos != QoS::AtMostOnce {
                            self.arm_new(key, self.retry_due(now));
                        }
                    }
                    Delivery::Queued { dropped_oldest } => {
                        self.metrics.dropped_queue_full += dropped_oldest as u64;
                    }
                    Delivery::DroppedQos0Offline => self.metrics.dropped_qos0_offline += 1,
                    Delivery::DroppedSlowConsumer => self.metrics.dropped_slow_consumer += 1,
                }
            }
            Some(SessionSlot::Forwarding(f)) => {
                let to = f.to;
                let client_id = f.client_id.clone();
                self.send(
                    to,
                    ShardMsg::Forward {
                        client_id,
                        msg: msg.clone(),
                        qos,
                    },
                );
            }
            None => {}
        }
    }

    fn on_ack(&mut self, id: ConnId, key: usize, pid: u16, kind: AckKind) {
        let now = self.now;
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        let lim = &self.cfg.limits;
        let result = match kind {
            AckKind::Puback => a.session.on_puback(pid, now, lim, &mut c.outbox),
            AckKind::Pubrec => a.session.on_pubrec(pid, now, &mut c.outbox).map(|_| 0),
            AckKind::Pubcomp => a.session.on_pubcomp(pid, now, lim, &mut c.outbox),
        };
        match result {
            Ok(sent) => {
                self.metrics.messages_sent += sent as u64;
                if !c.outbox.is_empty() {
                    c.wake();
                }
                if sent > 0 {
                    self.arm_new(key, self.retry_due(now));
                }
            }
            Err(_) => {
                self.metrics.unknown_acks += 1;
                debug!(client_id = %a.session.client_id, packet_id = pid, ?kind, "acknowledgement for an unknown packet id, ignored");
            }
        }
    }

    fn on_subscribe(&mut self, id: ConnId, key: usize, sub: Subscribe) {
        let level = conn_mut(&mut self.conns, id).map_or(ProtocolLevel::V311, |c| c.level);
        if level == ProtocolLevel::V31 {
            if let Some((f, _)) = sub.filters.iter().find(|(f, _)| topic::is_shared(f)) {
                return self.violation(
                    id,
                    &format!("subscription to {f:?} refused; MQTT 3.1 has no SUBACK failure code"),
                );
            }
        }
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut granted = Vec::with_capacity(sub.filters.len());
        for (filter, qos) in sub.filters {
            if topic::is_shared(&filter) {
                codes.push(SubackCode::Failure);
                continue;
            }
            let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
                return;
            };
            a.session.subscriptions.insert(filter.clone(), qos);
            self.add_local_sub(&filter, key, qos);
            codes.push(SubackCode::Granted(qos));
            granted.push((filter, qos));
        }
        let seq = self.flush_routes();
        let mut packet = BytesMut::new();
        mqtt::encode(
            &Packet::Suback(Suback {
                packet_id: sub.packet_id,
                codes,
            }),
            &mut packet,
        );
        let Some(gen) = self.sessions.get(key).map(SessionSlot::gen) else {
            return;
        };
        self.add_waiter(
            seq,
            Waiter::Suback {
                conn: id,
                packet: packet.freeze(),
                key,
                gen,
                granted,
            },
        );
    }

    fn on_unsubscribe(&mut self, id: ConnId, key: usize, unsub: Unsubscribe) {
        for filter in &unsub.filters {
            let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
                return;
            };
            if a.session.subscriptions.remove(filter).is_some() {
                self.remove_local_sub(filter, key);
            }
        }
        self.flush_routes();
        if let Some(c) = conn_mut(&mut self.conns, id) {
            mqtt::encode(&Packet::Unsuback(unsub.packet_id), &mut c.outbox);
            c.wake();
        }
    }

    fn query_retained(&mut self, key: usize, filter: &str, qos: QoS) {
        if !self.cfg.retainer_enabled {
            return;
        }
        let Some(gen) = self.sessions.get(key).map(SessionSlot::gen) else {
            return;
        };
        let ticket = Ticket {
            shard: self.cfg.shard,
            idx: key as u32,
            gen,
        };
        let targets: Vec<usize> = if topic::is_wildcard(filter) {
            (0..self.cfg.shards).collect()
        } else {
            vec![self.owner(filter.as_bytes())]
        };
        for t in targets {
            if t == self.cfg.shard {
                let msgs = self.lookup_retained(filter);
                self.deliver_retained(ticket, qos, msgs);
            } else {
                self.send(
                    t,
                    ShardMsg::RetainedQuery {
                        session: ticket,
                        filter: ByteStr::from(filter),
                        qos,
                    },
                );
            }
        }
    }

    fn lookup_retained(&self, filter: &str) -> Vec<SharedMessage> {
        let mut msgs = Vec::new();
        self.retained
            .lookup(filter, self.now, |m| msgs.push(m.clone()));
        msgs
    }

    fn deliver_retained(&mut self, ticket: Ticket, qos: QoS, msgs: Vec<SharedMessage>) {
        let key = ticket.idx as usize;
        if !matches!(self.sessions.get(key), Some(SessionSlot::Active(a)) if a.gen == ticket.gen) {
            return;
        }
        for m in msgs {
            self.deliver_to_session(key, &m, m.qos.min(qos), true);
        }
    }

    // ---------------------------------------------------------------- local index and routes

    fn add_local_sub(&mut self, filter: &str, key: usize, qos: QoS) {
        let (subs, new_filter) = self.local.entry_or_insert_with(filter, Vec::new);
        match subs.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = qos,
            None => subs.push((key, qos)),
        }
        if new_filter {
            push_pending(&mut self.route_adds, &mut self.route_removes, filter);
        }
    }

    fn remove_local_sub(&mut self, filter: &str, key: usize) {
        let Some(subs) = self.local.get_mut(filter) else {
            return;
        };
        subs.retain(|(k, _)| *k != key);
        if subs.is_empty() {
            self.local.remove(filter);
            push_pending(&mut self.route_removes, &mut self.route_adds, filter);
        }
    }

    /// Sends pending route changes to every other shard; returns the sequence number whose
    /// acknowledgement by all proves the changes are applied everywhere.
    fn flush_routes(&mut self) -> u64 {
        if self.route_adds.is_empty() && self.route_removes.is_empty() {
            return self.route_seq;
        }
        let add = std::mem::take(&mut self.route_adds);
        let remove = std::mem::take(&mut self.route_removes);
        if self.cfg.shards > 1 {
            self.broadcast_route(add, remove);
        }
        self.route_seq
    }

    fn broadcast_route(&mut self, add: Vec<ByteStr>, remove: Vec<ByteStr>) {
        self.route_seq += 1;
        let seq = self.route_seq;
        for peer in 0..self.cfg.shards {
            if peer != self.cfg.shard {
                self.send(
                    peer,
                    ShardMsg::Route {
                        seq,
                        add: add.clone(),
                        remove: remove.clone(),
                    },
                );
            }
        }
    }

    /// Flushes route changes and, if there were none, sends an empty delta: once every shard
    /// has acknowledged the returned sequence number, everything they sent before has arrived.
    fn barrier(&mut self) -> u64 {
        let before = self.route_seq;
        let seq = self.flush_routes();
        if seq == before && self.cfg.shards > 1 {
            self.broadcast_route(Vec::new(), Vec::new());
        }
        self.route_seq
    }

    fn all_acked(&self, seq: u64) -> bool {
        self.acked
            .iter()
            .enumerate()
            .all(|(peer, &a)| peer == self.cfg.shard || a >= seq)
    }

    fn add_waiter(&mut self, seq: u64, w: Waiter) {
        if self.waiters.is_empty() && self.all_acked(seq) {
            self.fire(w);
        } else {
            self.waiters.push_back((seq, w));
        }
    }

    fn fire(&mut self, w: Waiter) {
        match w {
            Waiter::Suback {
                conn,
                packet,
                key,
                gen,
                granted,
            } => {
                if let Some(c) = conn_mut(&mut self.conns, conn) {
                    if !c.close {
                        c.outbox.extend_from_slice(&packet);
                        c.wake();
                    }
                }
                if self.sessions.get(key).is_some_and(|s| s.gen() == gen) {
                    for (filter, qos) in granted {
                        self.query_retained(key, &filter, qos);
                    }
                }
            }
            Waiter::Release {
                client_id,
                to,
                key,
                gen,
            } => {
                if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) {
                    if a.gen == gen {
                        match &mut a.arrival {
                            Some(arrival) if !arrival.released => arrival.released = true,
                            _ => return,
                        }
                    }
                } else if let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) {
                    if f.gen == gen {
                        if f.upstream_released {
                            return;
                        }
                        f.upstream_released = true;
                    }
                }
                self.send(to, ShardMsg::ReleaseForward { client_id });
            }
            Waiter::Barrier { key, gen } => {
                if let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) {
                    if f.gen == gen {
                        f.barrier_done = true;
                        self.try_finish_forwarding(key);
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- sessions

    /// The key of the active session of `client_id` on this shard.
    fn local_session(&self, client_id: &ByteStr) -> Option<usize> {
        self.by_client
            .get(client_id.as_bytes(), |k| {
                slot_holds(&self.sessions, k, client_id)
            })
            .map(|k| k as usize)
    }

    fn new_session(&mut self, client_id: ByteStr, clean: bool, epoch: u64) -> usize {
        let session = Session::new(client_id, clean, self.now);
        self.add_active(session, epoch, None).0
    }

    /// Puts `session` in a new active slot indexed by its client id; returns (key, gen).
    fn add_active(
        &mut self,
        session: Session,
        epoch: u64,
        arrival: Option<Box<Arrival>>,
    ) -> (usize, u32) {
        let gen = self.next_gen();
        let client_id = session.client_id.clone();
        let key = self.sessions.insert(SessionSlot::Active(ActiveSession {
            gen,
            session,
            conn: None,
            epoch,
            arrival,
            expires_at: Timestamp::NEVER,
            timer_at: Timestamp::NEVER,
        }));
        let sessions = &self.sessions;
        self.by_client
            .insert(client_id.as_bytes(), key as u32, |k| {
                slot_holds(sessions, k, &client_id)
            });
        (key, gen)
    }

    fn install_session(
        &mut self,
        session: Session,
        epoch: u64,
        dedup: Vec<MessageId>,
        upstream: Option<usize>,
    ) -> usize {
        let client_id = session.client_id.clone();
        let subs: Vec<(String, QoS)> = session
            .subscriptions
            .iter()
            .map(|(f, q)| (f.clone(), *q))
            .collect();
        let arrival = upstream.map(|upstream| {
            Box::new(Arrival {
                upstream,
                released: false,
                dedup: dedup.into_iter().collect(),
            })
        });
        let (key, gen) = self.add_active(session, epoch, arrival);
        for (f, q) in subs {
            self.add_local_sub(&f, key, q);
        }
        let seq = self.flush_routes();
        if let Some(to) = upstream {
            self.add_waiter(
                seq,
                Waiter::Release {
                    client_id,
                    to,
                    key,
                    gen,
                },
            );
        }
        key
    }

    /// Frees a session: its subscriptions leave the index; `unregister` tells the owner.
    fn discard_session(&mut self, key: usize, unregister: bool) {
        let Some(SessionSlot::Active(_)) = self.sessions.get(key) else {
            return;
        };
        let SessionSlot::Active(a) = self.sessions.remove(key) else {
            return;
        };
        let client_id = a.session.client_id.clone();
        self.by_client.remove(client_id.as_bytes(), key as u32);
        for f in a.session.subscriptions.keys() {
            self.remove_local_sub(f, key);
        }
        self.flush_routes();
        if unregister {
            let owner = self.owner(client_id.as_bytes());
            self.send(
                owner,
                ShardMsg::Unregister {
                    client_id: client_id.clone(),
                    epoch: a.epoch,
                },
            );
        }
        if let Some(arrival) = a.arrival.filter(|x| !x.released) {
            self.send(arrival.upstream, ShardMsg::ReleaseForward { client_id });
        }
    }

    /// The session's connection ended.
    fn detach(&mut self, key: usize) {
        let now = self.now;
        let expiry = self.cfg.session_expiry;
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        a.conn = None;
        if a.session.clean_session {
            self.discard_session(key, true);
        } else {
            a.session.shrink();
            a.expires_at = expiry.map_or(Timestamp::NEVER, |d| now.after(d));
            self.arm(key);
        }
    }

    fn attach(&mut self, key: usize, id: ConnId, present: bool) {
        let now = self.now;
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        a.conn = Some(id);
        a.expires_at = Timestamp::NEVER;
        c.phase = ConnPhase::Connected(key as u32);
        mqtt::encode(
            &Packet::Connack(Connack {
                session_present: present && c.level == ProtocolLevel::V311,
                code: ConnectReturnCode::Accepted,
            }),
            &mut c.outbox,
        );
        let sent = a.session.resume(now, &self.cfg.limits, &mut c.outbox);
        debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), session_present = present, "connected");
        c.wake();
        self.metrics.messages_sent += sent as u64;
        self.metrics.connects_accepted += 1;
        self.arm(key);
        self.arm_conn(id);
    }

    /// Completes a CONNECT at this (the connecting) shard.
    fn finish_connect(&mut self, client_id: ByteStr, ticket: Ticket, epoch: u64, handed: Handed) {
        let owner = self.owner(client_id.as_bytes());
        self.send(
            owner,
            ShardMsg::ConnectDone {
                client_id: client_id.clone(),
                epoch,
            },
        );
        let id = ConnId {
            idx: ticket.idx,
            gen: ticket.gen,
        };
        let live = conn_mut(&mut self.conns, id)
            .filter(|c| c.phase == ConnPhase::Connecting && !c.close)
            .map(|c| c.clean);
        let Some(clean) = live else {
            // The client went away while we waited: keep a persistent session offline.
            match handed {
                Handed::Fresh => self.send(owner, ShardMsg::Unregister { client_id, epoch }),
                Handed::Local(key) => {
                    if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) {
                        a.epoch = epoch;
                        if a.session.clean_session {
                            self.discard_session(key, true);
                        }
                    }
                }
                Handed::Moved {
                    session,
                    dedup,
                    upstream,
                } => {
                    let key = self.install_session(*session, epoch, dedup, upstream);
                    self.detach(key);
                }
            }
            return;
        };
        let (key, present) = match handed {
            Handed::Fresh => (self.new_session(client_id, clean, epoch), false),
            Handed::Local(key) => {
                let keep = matches!(self.sessions.get(key), Some(SessionSlot::Active(a)) if !a.session.clean_session);
                if clean || !keep {
                    self.discard_session(key, false);
                    (self.new_session(client_id, clean, epoch), false)
                } else {
                    if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) {
                        a.epoch = epoch;
                    }
                    (key, true)
                }
            }
            Handed::Moved {
                session,
                dedup,
                upstream,
            } => {
                if clean {
                    if let Some(up) = upstream {
                        self.send(
                            up,
                            ShardMsg::ReleaseForward {
                                client_id: client_id.clone(),
                            },
                        );
                    }
                    (self.new_session(client_id, clean, epoch), false)
                } else {
                    (self.install_session(*session, epoch, dedup, upstream), true)
                }
            }
        };
        self.attach(key, id, present);
    }

    /// At the holder: close the old connection and give the session to `ticket`.
    fn on_takeover(&mut self, client_id: ByteStr, ticket: Ticket, epoch: u64, clean: bool) {
        let Some(key) = self.local_session(&client_id) else {
            return self.reply_fresh(client_id, ticket, epoch);
        };
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return self.reply_fresh(client_id, ticket, epoch);
        };
        if let Some(old) = a.conn.take() {
            self.metrics.takeovers += 1;
            if let Some(c) = conn_mut(&mut self.conns, old) {
                debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), "taken over by a new connection");
                c.close = true;
                c.phase = ConnPhase::Closed;
                let will = c.will.take();
                c.wake();
                if let Some(w) = will {
                    self.publish_will(&client_id, *w);
                }
            }
        }
        if ticket.shard == self.cfg.shard {
            return self.finish_connect(client_id, ticket, epoch, Handed::Local(key));
        }
        let persistent = matches!(self.sessions.get(key), Some(SessionSlot::Active(a)) if !a.session.clean_session);
        if clean || !persistent {
            self.discard_session(key, false);
            return self.reply_fresh(client_id, ticket, epoch);
        }
        let Some(SessionSlot::Active(a)) = self.sessions.get(key) else {
            return;
        };
        // Keep the slot (and its index entries) as a forwarder under the same key.
        let forwarder = SessionSlot::Forwarding(ForwardSlot {
            gen: a.gen,
            client_id: client_id.clone(),
            to: ticket.shard,
            filters: a.session.subscriptions.keys().cloned().collect(),
            upstream: a.arrival.as_ref().map(|x| x.upstream),
            upstream_released: a.arrival.as_ref().is_none_or(|x| x.released),
            released: false,
            barrier_done: false,
        });
        let SessionSlot::Active(a) = std::mem::replace(&mut self.sessions[key], forwarder) else {
            return;
        };
        self.by_client.remove(client_id.as_bytes(), key as u32);
        self.forwarders.insert(client_id.clone(), key);
        self.metrics.sessions_moved += 1;
        let dedup = a
            .arrival
            .map(|x| x.dedup.into_iter().collect())
            .unwrap_or_default();
        self.send(
            ticket.shard,
            ShardMsg::Handover {
                client_id,
                ticket,
                epoch,
                session: Some(Box::new(a.session)),
                dedup,
                forwarding: true,
            },
        );
    }

    fn reply_fresh(&mut self, client_id: ByteStr, ticket: Ticket, epoch: u64) {
        self.send(
            ticket.shard,
            ShardMsg::Handover {
                client_id,
                ticket,
                epoch,
                session: None,
                dedup: Vec::new(),
                forwarding: false,
            },
        );
    }

    fn on_release(&mut self, client_id: ByteStr) {
        let Some(&key) = self.forwarders.get(&client_id) else {
            return;
        };
        let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) else {
            return;
        };
        if f.released {
            return;
        }
        f.released = true;
        let gen = f.gen;
        let filters = std::mem::take(&mut f.filters);
        let upstream = (!f.upstream_released).then_some(f.upstream).flatten();
        if upstream.is_some() {
            f.upstream_released = true;
        }
        if let Some(up) = upstream {
            self.send(up, ShardMsg::ReleaseForward { client_id });
        }
        for filter in &filters {
            self.remove_local_sub(filter, key);
        }
        let seq = self.barrier();
        self.add_waiter(seq, Waiter::Barrier { key, gen });
    }

    fn try_finish_forwarding(&mut self, key: usize) {
        let Some(SessionSlot::Forwarding(f)) = self.sessions.get(key) else {
            return;
        };
        if !(f.released && f.barrier_done && f.upstream.is_none()) {
            return;
        }
        let SessionSlot::Forwarding(f) = self.sessions.remove(key) else {
            return;
        };
        self.forwarders.remove(&f.client_id);
        self.send(
            f.to,
            ShardMsg::ForwardDone {
                client_id: f.client_id,
            },
        );
    }

    fn on_forward(&mut self, from: usize, client_id: ByteStr, msg: SharedMessage, qos: QoS) {
        if let Some(&key) = self.forwarders.get(&client_id) {
            if let Some(SessionSlot::Forwarding(f)) = self.sessions.get(key) {
                if f.upstream == Some(from) {
                    let to = f.to;
                    return self.send(
                        to,
                        ShardMsg::Forward {
                            client_id,
                            msg,
                            qos,
                        },
                    );
                }
            }
        }
        if let Some(key) = self.local_session(&client_id) {
            self.deliver_to_session(key, &msg, qos, false);
        }
    }

    fn on_forward_done(&mut self, from: usize, client_id: ByteStr) {
        if let Some(&key) = self.forwarders.get(&client_id) {
            if let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) {
                if f.upstream == Some(from) {
                    f.upstream = None;
                    return self.try_finish_forwarding(key);
                }
            }
        }
        if let Some(key) = self.local_session(&client_id) {
            if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) {
                if a.arrival.as_ref().is_some_and(|x| x.upstream == from) {
                    a.arrival = None;
                }
            }
        }
    }

    // ---------------------------------------------------------------- registry (owner side)

    fn on_register(&mut self, client_id: ByteStr, ticket: Ticket, clean: bool) {
        let reg = self
            .registry
            .entry(client_id.clone())
            .or_insert(Registration {
                epoch: 0,
                holder: NO_HOLDER,
                busy: false,
            });
        if reg.busy {
            self.reg_waiting
                .entry(client_id)
                .or_default()
                .push_back((ticket, clean));
            return;
        }
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        reg.busy = true;
        reg.epoch = epoch;
        let previous = std::mem::replace(&mut reg.holder, ticket.shard as u32);
        match (previous != NO_HOLDER).then_some(previous as usize) {
            None => self.reply_fresh(client_id, ticket, epoch),
            Some(holder) => self.send(
                holder,
                ShardMsg::Takeover {
                    client_id,
                    ticket,
                    epoch,
                    clean,
                },
            ),
        }
    }

    fn on_connect_done(&mut self, client_id: ByteStr, epoch: u64) {
        let Some(reg) = self.registry.get_mut(&client_id) else {
            return;
        };
        if reg.epoch != epoch {
            return;
        }
        reg.busy = false;
        let Some(queue) = self.reg_waiting.get_mut(&client_id) else {
            return;
        };
        let next = queue.pop_front();
        if queue.is_empty() {
            self.reg_waiting.remove(&client_id);
        }
        if let Some((ticket, clean)) = next {
            self.on_register(client_id, ticket, clean);
        }
    }

    fn on_unregister(&mut self, client_id: ByteStr, epoch: u64) {
        if let Some(reg) = self.registry.get(&client_id) {
            if reg.epoch == epoch && !reg.busy && !self.reg_waiting.contains_key(&client_id) {
                self.registry.remove(&client_id);
            }
        }
    }

    // ---------------------------------------------------------------- timers

    /// Schedules the session's next timer if it is earlier than the one already set.
    fn arm(&mut self, key: usize) {
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let session_due = a.session.next_deadline(a.conn.is_some(), &self.cfg.limits);
        self.arm_at(key, session_due.unwrap_or(Timestamp::NEVER));
    }

    /// When a delivery sent now is due for a resend (`None` when resends are off).
    fn retry_due(&self, now: Timestamp) -> Option<Timestamp> {
        self.cfg.limits.retry_interval.map(|r| now.after(r))
    }

    /// Arms session `key` for a deadline it has just gained (`now` plus its interval). Every
    /// deadline the session already has is earlier or equal, so a timer is needed only when
    /// none is armed at or before `due`: one comparison per message instead of
    /// [`Engine::arm`]'s walk over the whole inflight window (which the timer handler still
    /// does when the timer fires).
    fn arm_new(&mut self, key: usize, due: Option<Timestamp>) {
        if let Some(due) = due {
            self.arm_at(key, due);
        }
    }

    /// Arms session `key`'s timer for `due` (or its expiry, if earlier) unless one is already
    /// armed at or before it.
    fn arm_at(&mut self, key: usize, due: Timestamp) {
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let due = due.min(a.expires_at);
        // `timer_at` is at most NEVER, so a NEVER `due` (nothing to do) arms nothing.
        if due < a.timer_at {
            a.timer_at = due;
            self.timers.push(Reverse((due, key, a.gen)));
            self.note_timer(due);
        }
    }

    /// The earliest time [`Engine::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let sessions = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let conns = self.conn_timers.peek().map(|Reverse((t, _, _))| *t);
        let t = match (sessions, conns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.cfg.retained.expiry.is_some() && !self.retained.is_empty() {
            Some(t.map_or(self.next_retained_purge, |t| {
                t.min(self.next_retained_purge)
            }))
        } else {
            t
        }
    }

    /// Runs due session timers: retries, inbound QoS 2 expiry, session expiry, retained expiry.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.now = now;
        while let Some(Reverse((due, idx, gen))) = self.conn_timers.peek().copied() {
            if due > now {
                break;
            }
            self.conn_timers.pop();
            let id = ConnId { idx, gen };
            let Some(c) = conn_mut(&mut self.conns, id) else {
                continue;
            };
            if c.timer_at != due {
                continue;
            }
            c.timer_at = Timestamp::NEVER;
            self.conn_timeout(id, now);
            self.arm_conn(id);
        }
        while let Some(Reverse((due, key, gen))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
                continue;
            };
            if a.gen != gen || a.timer_at != due {
                continue;
            }
            a.timer_at = Timestamp::NEVER;
            if a.conn.is_none() && a.expires_at <= now {
                self.metrics.sessions_expired += 1;
                debug!(client_id = %a.session.client_id, "session expired");
                self.discard_session(key, true);
                continue;
            }
            let conn = attached(&mut self.conns, a.conn);
            let (resent, expired) = match conn {
                Some(c) => {
                    let r = a
                        .session
                        .on_timeout(now, &self.cfg.limits, Some(&mut c.outbox));
                    if r.0 > 0 {
                        c.wake();
                    }
                    r
                }
                None => a.session.on_timeout(now, &self.cfg.limits, None),
            };
            self.metrics.retries += resent as u64;
            self.metrics.awaiting_rel_expired += expired as u64;
            self.arm(key);
        }
        if self.cfg.retained.expiry.is_some() && now >= self.next_retained_purge {
            self.retained.purge_expired(now);
            self.next_retained_purge = now.after(Duration::from_secs(1));
        }
        self.drain_inbox();
    }

    // ---------------------------------------------------------------- cross-shard

    fn send(&mut self, shard: usize, msg: ShardMsg) {
        if shard == self.cfg.shard {
            self.inbox.push_back(msg);
            return;
        }
        let out = &mut self.outgoing[shard];
        out.queue.push_back(msg);
        if out.queue.len() == 1 {
            if let Some(w) = out.waker.take() {
                w.wake();
            }
        }
    }

    fn drain_inbox(&mut self) {
        while let Some(msg) = self.inbox.pop_front() {
            self.dispatch(self.cfg.shard, msg);
        }
    }

    /// Messages from shard `from`, in the order it sent them.
    pub fn handle_shard_msg(&mut self, from: usize, msg: ShardMsg, now: Timestamp) {
        self.now = now;
        self.dispatch(from, msg);
        self.drain_inbox();
    }

    fn dispatch(&mut self, from: usize, msg: ShardMsg) {
        match msg {
            ShardMsg::Deliver(m) => {
                self.deliver_local(&m);
            }
            ShardMsg::Route { seq, add, remove } => {
                for f in add {
                    self.routes
                        .entry_or_insert_with(&f, ShardSet::default)
                        .0
                        .insert(from);
                }
                for f in remove {
                    if let Some(set) = self.routes.get_mut(&f) {
                        set.remove(from);
                        if set.is_empty() {
                            self.routes.remove(&f);
                        }
                    }
                }
                self.send(from, ShardMsg::RouteAck { seq });
            }
            ShardMsg::RouteAck { seq } => {
                self.acked[from] = self.acked[from].max(seq);
                while let Some((s, _)) = self.waiters.front() {
                    if !self.all_acked(*s) {
                        break;
                    }
                    if let Some((_, w)) = self.waiters.pop_front() {
                        self.fire(w);
                    }
                }
            }
            ShardMsg::Register {
                client_id,
                ticket,
                clean,
            } => self.on_register(client_id, ticket, clean),
            ShardMsg::ConnectDone { client_id, epoch } => self.on_connect_done(client_id, epoch),
            ShardMsg::Unregister { client_id, epoch } => self.on_unregister(client_id, epoch),
            ShardMsg::Takeover {
                client_id,
                ticket,
                epoch,
                clean,
            } => self.on_takeover(client_id, ticket, epoch, clean),
            ShardMsg::Handover {
                client_id,
                ticket,
                epoch,
                session,
                dedup,
                forwarding,
            } => {
                let handed = match session {
                    Some(session) => Handed::Moved {
                        session,
                        dedup,
                        upstream: forwarding.then_some(from),
                    },
                    None => Handed::Fresh,
                };
                self.finish_connect(client_id, ticket, epoch, handed);
            }
            ShardMsg::Forward {
                client_id,
                msg,
                qos,
            } => self.on_forward(from, client_id, msg, qos),
            ShardMsg::ReleaseForward { client_id } => self.on_release(client_id),
            ShardMsg::ForwardDone { client_id } => self.on_forward_done(from, client_id),
            ShardMsg::RetainedSet { msg, ack } => {
                self.store_retained(msg);
                if let Some(conn) = ack {
                    self.send(conn.shard, ShardMsg::RetainedStored { conn });
                }
            }
            ShardMsg::RetainedStored { conn } => self.on_retained_stored(conn),
            ShardMsg::RetainedQuery {
                session,
                filter,
                qos,
            } => {
                let msgs = self.lookup_retained(&filter);
                if !msgs.is_empty() {
                    self.send(
                        session.shard,
                        ShardMsg::RetainedReply { session, qos, msgs },
                    );
                }
            }
            ShardMsg::RetainedReply { session, qos, msgs } => {
                self.deliver_retained(session, qos, msgs)
            }
        }
    }

    /// Whether messages wait for shard `dest`.
    pub fn has_outgoing(&self, dest: usize) -> bool {
        !self.outgoing[dest].queue.is_empty()
    }

    /// Registers the waker of the task that flushes messages for `dest`.
    pub fn set_outgoing_waker(&mut self, dest: usize, waker: &Waker) {
        self.outgoing[dest].waker = Some(waker.clone());
    }

    /// Takes the next batch (at most `shards.batch_size` messages) for shard `dest`, and
    /// resumes connections paused by back-pressure once every queue is below half its limit.
    pub fn take_outgoing(&mut self, dest: usize) -> Vec<ShardMsg> {
        let q = &mut self.outgoing[dest].queue;
        let n = q.len().min(self.cfg.batch_size);
        let batch: Vec<ShardMsg> = q.drain(..n).collect();
        if !self.paused.is_empty()
            && self
                .outgoing
                .iter()
                .all(|o| o.queue.len() < self.cfg.max_pending / 2)
        {
            for id in std::mem::take(&mut self.paused) {
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    c.paused = false;
                    c.wake();
                }
            }
        }
        batch
    }
}

#[derive(Debug, Clone, Copy)]
enum AckKind {
    Puback,
    Pubrec,
    Pubcomp,
}

#[cfg(test)]
mod tests;
