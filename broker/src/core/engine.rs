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
use super::message::{message_id, message_origin, Message, SharedMessage};
use super::metrics::Metrics;
use super::msgs::{ShardMsg, Ticket};
use super::retained::{RetainedLimits, RetainedStore, SetOutcome};
use super::route::{owner_shard, RouteTable, ShardSet};
use super::session::{Delivery, Outbox, Session, SessionLimits};
use super::time::Timestamp;
use super::topic;
use super::trie::TopicTrie;
use crate::config::Config;
use crate::protocol::bytestr::ByteStr;
use crate::protocol::mqtt::{
    self, Connack, Connect, ConnectReturnCode, DecodeError, DecodeOptions, LastWill, Packet,
    ProtocolLevel, Publish, QoS, Suback, SubackCode, Subscribe, Unsubscribe,
};
use ahash::AHashMap;
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
    /// `mqtt.close_timeout`: how long a closing connection may take to write its last bytes.
    pub close_timeout: Duration,
    /// `mqtt.session_expiry_interval`; `None` = never.
    pub session_expiry: Option<Duration>,
    /// `shards.max_pending`: messages of every kind queued for one destination shard.
    pub max_pending: usize,
    /// `mqtt.max_write_buffer`: bytes waiting to be written to one connection.
    pub max_write_buffer: usize,
    /// `shards.max_write_buffer`: bytes waiting to be written to all connections together.
    pub shard_write_buffer: usize,
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
            close_timeout: m.close_timeout.0,
            session_expiry: m.session_expiry_interval.enabled(),
            max_pending: cfg.shards.max_pending,
            max_write_buffer: m.max_write_buffer.as_usize(),
            shard_write_buffer: cfg.shards.max_write_buffer.as_usize(),
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
    /// Flush the outbox, then close. `last_rx` then holds when the close began.
    close: bool,
    /// The close took longer than `close_timeout`: the outbox was dropped, reset the socket.
    abort: bool,
    /// Not read: a packet it sent waits in `Engine::stalled` for room in the cross-shard
    /// queues.
    paused: bool,
    /// Deliveries or resends wait for room in the outbox (`Engine::refill`).
    starved: bool,
    /// More than one of its packets waits in `Engine::stalled`.
    more_stalled: bool,
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
    /// Whether the driver should read more input: not while connecting, while a packet waits
    /// for room in the cross-shard queues, or while the client has not read what it was sent
    /// (so TCP pushes back on a client that floods without reading).
    fn readable(&self, max_write_buffer: usize) -> bool {
        !self.close
            && !self.paused
            && self.phase != ConnPhase::Connecting
            && self.outbox.len() + self.held.as_ref().map_or(0, |h| h.bytes.len())
                < max_write_buffer
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Starts closing: the driver flushes what is written, then closes the socket, within
    /// `close_timeout` of `now` (after it, the outbox is dropped and the socket reset).
    fn start_close(&mut self, now: Timestamp) {
        if !self.close {
            self.close = true;
            self.last_rx = now;
        }
        self.phase = ConnPhase::Closed;
        self.wake();
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
///
/// Until the old holder is done forwarding, a message can reach the session two ways: through
/// the old holder (forwarded) or straight from the shard it was published on (direct), and the
/// direct copy of a later message may come first. So forwarded messages are delivered at once
/// and direct ones are held until the old holder's `ForwardDone`, then delivered unless they
/// were forwarded too. What each shard publishes reaches the old holder in order, and the old
/// holder forwards until it has heard from every shard after they all routed to this one: the
/// forwarded messages of one origin shard are a prefix of what it published (of what matches),
/// so a direct message was forwarded as well exactly when its sequence number is at most the
/// highest forwarded one of its origin. A direct copy can still be on its way after
/// `ForwardDone`; the arrival ends once every shard has answered a barrier sent then.
struct Arrival {
    /// The shard still forwarding deliveries for this session.
    upstream: usize,
    /// The registration epoch of the move, carried by every forward.
    epoch: u64,
    /// Whether the upstream was told to stop.
    released: bool,
    /// `ForwardDone` came: nothing is held any more, direct copies of forwarded messages that
    /// are still on their way are dropped until the barrier sent then is answered.
    done: bool,
    /// Per origin shard, the highest sequence number of a message forwarded so far.
    forwarded: Vec<u64>,
    /// Direct deliveries (message, QoS, retain), held until the forwarding is done; at most
    /// `mqtt.max_mqueue_len`, the oldest dropped beyond.
    held: VecDeque<(SharedMessage, QoS, bool)>,
}

impl Arrival {
    /// Whether the (live, not retained) message `msg` was forwarded too.
    fn was_forwarded(&self, msg: &Message) -> bool {
        let (origin, seq) = message_origin(msg.id);
        self.forwarded.get(origin).is_some_and(|&top| seq <= top)
    }
}

/// Where a forwarding slot stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ForwardState {
    /// Forwarding what matches its filters, until the new holder releases it.
    Forwarding,
    /// Released; still forwarding until every shard has answered a barrier sent after the
    /// release, which proves that what they published before routing to the new holder has
    /// arrived here.
    Draining,
    /// The barrier is answered; forwarded messages still wait for room in the queue to the
    /// new holder, then `ForwardDone` follows them.
    Flushing,
}

/// What stays behind when a session moves to another shard: its index entries, forwarding
/// what still matches, until the new holder releases it and a barrier proves nothing is left.
struct ForwardSlot {
    gen: u32,
    client_id: ByteStr,
    /// The registration epoch of the move.
    epoch: u64,
    to: usize,
    filters: Vec<String>,
    state: ForwardState,
    /// Forwards waiting for room in the queue to `to` (bounded like a session's queue).
    backlog: VecDeque<ShardMsg>,
}

enum SessionSlot {
    Active(ActiveSession),
    /// Forwarding slots are rare and short-lived: boxed, so they do not grow every slot.
    Forwarding(Box<ForwardSlot>),
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
    /// The new holder's routes are everywhere: release the old holder.
    Release { key: usize, gen: u32 },
    /// A forwarding slot's barrier after its release.
    Barrier { key: usize, gen: u32 },
    /// An arriving session's barrier after `ForwardDone`.
    Arrived { key: usize, gen: u32 },
}

enum Handed {
    Fresh,
    Local(usize),
    Moved {
        session: Box<Session>,
        /// The shard forwarding deliveries until released.
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
    /// With `close`: the close timed out and the outbox was dropped; reset the connection
    /// instead of closing it gracefully.
    pub reset: bool,
}

/// The broker logic of one shard.
pub struct Engine {
    cfg: EngineConfig,
    conns: Slab<Conn>,
    sessions: Slab<SessionSlot>,
    next_gen: u32,
    /// Client id → key of its active session slot here.
    by_client: ClientIndex,
    /// (client id, move epoch) → key of its forwarding slot here.
    forwarders: AHashMap<(ByteStr, u64), usize>,
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
    /// Packets held back, in arrival order, until the cross-shard queues are below half.
    stalled: VecDeque<(ConnId, Packet)>,
    /// Wills (QoS 1/2) held back the same way.
    stalled_wills: VecDeque<SharedMessage>,
    /// Set while `resume_stalled` handles a held-back packet.
    resuming: bool,
    /// Bytes in every connection's outbox together.
    outbox_bytes: usize,
    /// Connections with deliveries waiting for room under `shard_write_buffer`.
    starved: Vec<ConnId>,
    /// Forwarding slots with forwards waiting for room in a queue.
    backlogged: Vec<usize>,
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

/// How far a session may fill an outbox holding `len` bytes: the connection's own limit, and
/// what is left of the shard's when `total` bytes wait in all outboxes.
fn outbox_limit(cfg: &EngineConfig, total: usize, len: usize) -> usize {
    cfg.max_write_buffer
        .min(len + cfg.shard_write_buffer.saturating_sub(total))
}

/// Connection `c` (`id`), whose outbox now holds `len` bytes, has deliveries waiting for room.
/// It is refilled when its driver writes; if the shard's limit held it back while its own
/// outbox had room, also when the shard's outboxes shrink (`starved`).
fn starve(c: &mut Conn, id: ConnId, len: usize, cfg: &EngineConfig, starved: &mut Vec<ConnId>) {
    if c.starved {
        return;
    }
    c.starved = true;
    if len < cfg.max_write_buffer {
        starved.push(id);
    }
}

/// What a delivery to an active session touches besides the session: borrowed apart from the
/// session slots, so the hot path finds the slot once.
struct Deliverer<'a> {
    conns: &'a mut Slab<Conn>,
    cfg: &'a EngineConfig,
    outbox_bytes: &'a mut usize,
    starved: &'a mut Vec<ConnId>,
    metrics: &'a mut Metrics,
    now: Timestamp,
}

impl Deliverer<'_> {
    /// Writes the delivery to the session's connection, or queues or drops it, and counts it.
    /// Returns whether a QoS 1/2 delivery was written (its retry timer must be armed). Inlined
    /// into its two callers: it is the per-subscriber step of every publish.
    #[inline(always)]
    fn deliver(
        &mut self,
        a: &mut ActiveSession,
        msg: &SharedMessage,
        qos: QoS,
        retain: bool,
    ) -> bool {
        let lim = &self.cfg.limits;
        let (Some(id), Some(c)) = (a.conn, attached(self.conns, a.conn)) else {
            match a.session.deliver(msg, qos, retain, self.now, lim, None) {
                Delivery::Queued { dropped_oldest } => {
                    self.metrics.dropped_queue_full += u64::from(dropped_oldest)
                }
                Delivery::DroppedQos0Offline => self.metrics.dropped_qos0_offline += 1,
                Delivery::Sent | Delivery::DroppedSlowConsumer => {}
            }
            return false;
        };
        let before = c.outbox.len();
        let limit = outbox_limit(self.cfg, *self.outbox_bytes, before);
        let out = Outbox::new(&mut c.outbox, limit);
        match a
            .session
            .deliver(msg, qos, retain, self.now, lim, Some(out))
        {
            Delivery::Sent => {
                *self.outbox_bytes += c.outbox.len() - before;
                self.metrics.messages_sent += 1;
                c.wake();
                return qos != QoS::AtMostOnce;
            }
            Delivery::Queued { dropped_oldest } => {
                self.metrics.dropped_queue_full += u64::from(dropped_oldest);
                if a.session.wants_room(lim) {
                    starve(c, id, before, self.cfg, self.starved);
                }
            }
            // The connection's own outbox was full, or the shard's outboxes together.
            Delivery::DroppedSlowConsumer if before >= self.cfg.max_write_buffer => {
                self.metrics.dropped_slow_consumer += 1;
            }
            Delivery::DroppedSlowConsumer => self.metrics.dropped_shard_write_buffer_full += 1,
            Delivery::DroppedQos0Offline => self.metrics.dropped_qos0_offline += 1,
        }
        false
    }
}

/// Encodes `p` at the end of `out`; returns the bytes added.
fn put(out: &mut BytesMut, p: &Packet) -> usize {
    let before = out.len();
    mqtt::encode(p, out);
    out.len() - before
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
            stalled: VecDeque::new(),
            stalled_wills: VecDeque::new(),
            resuming: false,
            outbox_bytes: 0,
            starved: Vec::new(),
            backlogged: Vec::new(),
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
            abort: false,
            paused: false,
            starved: false,
            more_stalled: false,
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
            readable: c.readable(self.cfg.max_write_buffer),
            deadline,
            park: c.park && !c.close,
            reset: c.abort,
        })
    }

    /// Whether to read more input now (the `readable` of [`Engine::conn_status`], cheaper).
    pub fn conn_readable(&self, id: ConnId) -> bool {
        self.conns
            .get(id.idx as usize)
            .is_some_and(|c| c.gen == id.gen && c.readable(self.cfg.max_write_buffer))
    }

    /// When the connection times out: no CONNECT in time, no CONNACK in time, keepalive, or a
    /// close that takes too long. Not while the broker holds a packet of it back: the wait is
    /// the broker's, not the client's.
    fn timeout_deadline(&self, c: &Conn) -> Option<Timestamp> {
        if c.close {
            return (!c.abort).then(|| c.last_rx.after(self.cfg.close_timeout));
        }
        if c.paused {
            return None;
        }
        let keepalive = (c.keepalive_ms > 0).then(|| {
            c.last_rx
                .after(Duration::from_millis(u64::from(c.keepalive_ms)))
        });
        match c.phase {
            ConnPhase::AwaitingConnect => Some(c.last_rx.after(self.cfg.idle_timeout)),
            // The owner shard answers a CONNECT within `idle_timeout` or the client is let go.
            ConnPhase::Connecting => {
                let limit = c.last_rx.after(self.cfg.idle_timeout);
                Some(keepalive.map_or(limit, |k| k.min(limit)))
            }
            ConnPhase::Connected(_) => keepalive,
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

    /// Counts bytes the driver read.
    pub fn count_received(&mut self, received: usize) {
        self.metrics.bytes_received += received as u64;
    }

    /// The driver wrote (and removed) the first `sent` bytes of the connection's outbox.
    /// Deliveries that waited for room follow, on this connection and, once the shard's
    /// outboxes are below three quarters of `shards.max_write_buffer`, on the others. Returns
    /// whether this connection's outbox got new bytes meanwhile (the driver writes them).
    pub fn conn_flushed(&mut self, id: ConnId, sent: usize, now: Timestamp) -> bool {
        if sent == 0 {
            return false;
        }
        self.now = now;
        self.metrics.bytes_sent += sent as u64;
        self.release_outbox_bytes(sent);
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return false;
        };
        // Bytes moved: not idle (`note_io`, done here without a second look-up).
        c.last_io = now;
        let rearm = self.cfg.park_after.is_some() && (c.park || c.timer_at == Timestamp::NEVER);
        c.park = false;
        let starved = c.starved;
        if rearm {
            self.arm_conn(id);
        }
        let mut refilled = starved && self.refill(id);
        if !self.starved.is_empty() && self.outbox_bytes < self.cfg.shard_write_buffer / 4 * 3 {
            self.refill_starved();
            refilled = conn_mut(&mut self.conns, id).is_some_and(|c| !c.outbox.is_empty());
        }
        refilled
    }

    fn release_outbox_bytes(&mut self, n: usize) {
        debug_assert!(self.outbox_bytes >= n, "outbox accounting");
        self.outbox_bytes = self.outbox_bytes.saturating_sub(n);
    }

    /// Writes what the session of connection `id` holds back for room (resends, queued
    /// deliveries), as far as the outboxes have room now. Returns whether it wrote anything.
    fn refill(&mut self, id: ConnId) -> bool {
        let now = self.now;
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return false;
        };
        c.starved = false;
        let ConnPhase::Connected(key) = c.phase else {
            return false;
        };
        if c.close {
            return false;
        }
        let key = key as usize;
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return false;
        };
        let before = c.outbox.len();
        let limit = outbox_limit(&self.cfg, self.outbox_bytes, before);
        let sent = a
            .session
            .refill(now, &self.cfg.limits, Outbox::new(&mut c.outbox, limit));
        let wrote = c.outbox.len() - before;
        self.outbox_bytes += wrote;
        if wrote > 0 {
            c.wake();
        }
        if a.session.wants_room(&self.cfg.limits) {
            starve(c, id, before + wrote, &self.cfg, &mut self.starved);
        }
        self.metrics.messages_sent += sent as u64;
        if sent > 0 {
            self.arm_new(key, self.retry_due(now));
        }
        wrote > 0
    }

    /// Refills the connections that waited for the shard's outboxes to shrink, oldest first,
    /// while there is room.
    fn refill_starved(&mut self) {
        let waiting = std::mem::take(&mut self.starved);
        let mut rest = waiting.into_iter();
        for id in rest.by_ref() {
            if self.outbox_bytes >= self.cfg.shard_write_buffer {
                break;
            }
            if let Some(c) = conn_mut(&mut self.conns, id) {
                // Still starved and its own outbox has room: the shard's limit held it back.
                if c.starved && c.outbox.len() < self.cfg.max_write_buffer {
                    self.refill(id);
                }
            }
        }
        // Those not reached keep their turn, ahead of any starved meanwhile.
        let mut kept: Vec<ConnId> = rest.collect();
        kept.append(&mut self.starved);
        self.starved = kept;
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
        if c.paused {
            // The driver reads no more while a packet is held back; should it, this one
            // waits behind it, so the connection's packets keep their order.
            c.more_stalled = true;
            self.stalled.push_back((id, packet));
            return;
        }
        self.dispatch_packet(id, packet);
        self.drain_inbox();
    }

    /// Handles a packet of connection `id` (just received, or held back until now).
    #[inline]
    fn dispatch_packet(&mut self, id: ConnId, packet: Packet) {
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        match (c.phase, packet) {
            (ConnPhase::AwaitingConnect, Packet::Connect(connect)) => {
                if self.congested(1) {
                    return self.stall(id, Packet::Connect(connect));
                }
                self.on_connect(id, *connect)
            }
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
    }

    /// Whether some cross-shard queue has no room for `need` more messages.
    fn congested(&self, need: usize) -> bool {
        self.outgoing
            .iter()
            .any(|o| o.queue.len() + need > self.cfg.max_pending)
    }

    /// Holds `packet` back, and stops reading its connection, until the cross-shard queues
    /// are below half (`resume_stalled`).
    fn stall(&mut self, id: ConnId, packet: Packet) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            c.paused = true;
            if self.resuming {
                // It was first in line and stays so.
                self.stalled.push_front((id, packet));
            } else {
                self.stalled.push_back((id, packet));
                self.metrics.backpressure_pauses += 1;
            }
        }
    }

    /// Whether every cross-shard queue is below half its bound.
    fn queues_below_half(&self) -> bool {
        self.outgoing
            .iter()
            .all(|o| o.queue.len() < self.cfg.max_pending.div_ceil(2))
    }

    /// Publishes the wills and handles the packets held back by a full queue, in the order
    /// they came, while every queue stays below half.
    fn resume_stalled(&mut self) {
        while self.queues_below_half() {
            let Some(msg) = self.stalled_wills.pop_front() else {
                break;
            };
            self.accept_will(msg);
        }
        let now = self.now;
        while self.stalled_wills.is_empty() && self.queues_below_half() {
            let Some((id, packet)) = self.stalled.pop_front() else {
                break;
            };
            let Some(c) = conn_mut(&mut self.conns, id).filter(|c| !c.close) else {
                continue;
            };
            // Held back by the broker, not by the client: keepalive restarts now.
            c.last_rx = now;
            c.wake();
            let later = c.more_stalled;
            let later = later && self.stalled.iter().any(|(other, _)| *other == id);
            if let Some(c) = conn_mut(&mut self.conns, id) {
                c.paused = later;
                c.more_stalled = later;
            }
            let waiting = self.stalled.len();
            self.resuming = true;
            self.dispatch_packet(id, packet);
            self.resuming = false;
            self.arm_conn(id);
            if self.stalled.len() > waiting {
                break;
            }
        }
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
            self.outbox_bytes += put(
                &mut c.outbox,
                &Packet::Connack(Connack {
                    session_present: false,
                    code: ConnectReturnCode::UnacceptableProtocolVersion,
                }),
            );
            c.start_close(now);
            self.arm_conn(id);
            return;
        }
        self.metrics.malformed_packets += 1;
        debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), error = %err, "malformed packet, closing");
        self.end_connection(id, true);
        self.drain_inbox();
    }

    /// The connection's deadline passed (or may have): closes it on CONNECT or keepalive
    /// timeout, and gives up on a close that could not flush within `close_timeout`.
    pub fn conn_timeout(&mut self, id: ConnId, now: Timestamp) {
        self.now = now;
        let Some(c) = self.conns.get(id.idx as usize).filter(|c| c.gen == id.gen) else {
            return;
        };
        if c.close {
            if self.timeout_deadline(c).is_some_and(|d| d <= now) {
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    self.metrics.close_timeouts += 1;
                    debug!(peer = %c.peer, unsent = c.outbox.len(), "close timed out, resetting the connection");
                    let unsent = std::mem::take(&mut c.outbox).len();
                    c.abort = true;
                    c.wake();
                    self.release_outbox_bytes(unsent);
                }
            }
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
        } else if c.phase == ConnPhase::Connecting && c.last_rx.after(self.cfg.idle_timeout) <= now
        {
            self.metrics.connect_timeouts += 1;
            debug!(peer = %c.peer, "CONNECT not answered within idle_timeout, closing");
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
        self.detach_conn(id, true);
        let c = self.conns.remove(id.idx as usize);
        if c.parked {
            self.parked_count -= 1;
        }
        self.release_outbox_bytes(c.outbox.len());
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

    /// Marks the connection closing (its close deadline armed); detaches its session
    /// (publishing the will when `will_allowed` and the client did not DISCONNECT).
    fn end_connection(&mut self, id: ConnId, will_allowed: bool) {
        self.detach_conn(id, will_allowed);
        self.arm_conn(id);
    }

    /// [`Engine::end_connection`] without arming the close deadline (the connection is gone).
    fn detach_conn(&mut self, id: ConnId, will_allowed: bool) {
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        let phase = c.phase;
        c.start_close(self.now);
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
            self.outbox_bytes += put(
                &mut c.outbox,
                &Packet::Connack(Connack {
                    session_present: false,
                    code,
                }),
            );
            c.start_close(self.now);
            c.will = None;
            self.arm_conn(id);
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
                self.reply(id, &Packet::Pubcomp(pid));
            }
            // A route delta and one retained query to each shard, at most.
            Packet::Subscribe(s) if self.congested(2) => self.stall(id, Packet::Subscribe(s)),
            Packet::Subscribe(s) => self.on_subscribe(id, key, s),
            Packet::Unsubscribe(u) if self.congested(1) => self.stall(id, Packet::Unsubscribe(u)),
            Packet::Unsubscribe(u) => self.on_unsubscribe(id, key, u),
            Packet::Pingreq => self.reply(id, &Packet::Pingresp),
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

    /// Writes `p` to the connection's outbox (a reply to the client's own packet: always).
    fn reply(&mut self, id: ConnId, p: &Packet) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            self.outbox_bytes += put(&mut c.outbox, p);
            c.wake();
        }
    }

    /// The other shards with subscribers matching `topic`.
    #[inline]
    fn remote_routes(&self, topic: &str) -> ShardSet {
        let mut remote = ShardSet::EMPTY;
        self.routes
            .for_each_match(topic, |s| remote = remote.union(*s));
        remote
    }

    /// The shard that stores a retained message on `topic` if it is another one.
    #[inline]
    fn remote_retain_owner(&self, retain: bool, topic: &str) -> Option<usize> {
        if !retain || !self.cfg.retainer_enabled {
            return None;
        }
        let owner = self.owner(topic.as_bytes());
        (owner != self.cfg.shard).then_some(owner)
    }

    /// Whether the queues to `remote` (and to the retained owner) have room for a message.
    fn room_for(&self, remote: ShardSet, retain_owner: Option<usize>) -> bool {
        let bound = self.cfg.max_pending;
        remote.iter().all(|s| {
            let need = 1 + usize::from(retain_owner == Some(s));
            self.outgoing[s].queue.len() + need <= bound
        }) && retain_owner.is_none_or(|o| self.outgoing[o].queue.len() < bound)
    }

    fn on_publish(&mut self, id: ConnId, key: usize, p: Publish) {
        let now = self.now;
        let remote = self.remote_routes(&p.topic);
        let retain_owner = self.remote_retain_owner(p.retain, &p.topic);
        // QoS 1/2 is held back, before it is acknowledged, until every queue it goes to has
        // room; QoS 0 is dropped where there is none.
        if p.qos != QoS::AtMostOnce && !self.room_for(remote, retain_owner) {
            return self.stall(id, Packet::Publish(p));
        }
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
        let remote_retain = route && p.qos != QoS::AtMostOnce && retain_owner.is_some();
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
        let ack = match p.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(Packet::Puback(p.packet_id)),
            QoS::ExactlyOnce => Some(Packet::Pubrec(p.packet_id)),
        };
        if let Some(ack) = ack {
            match &mut c.held {
                Some(h) => {
                    put(&mut h.bytes, &ack);
                }
                None => {
                    self.outbox_bytes += put(&mut c.outbox, &ack);
                    c.wake();
                }
            }
        }
        if route {
            let msg = self.new_message(p.topic, p.payload, p.qos, p.retain, publisher);
            let ack = remote_retain.then_some(Ticket {
                shard: self.cfg.shard,
                idx: id.idx,
                gen: id.gen,
            });
            self.accept_message(msg, ack, remote, retain_owner);
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
                self.outbox_bytes += h.bytes.len();
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
    /// has it), then route it to the `remote` shards and the local subscribers. A QoS 0
    /// message is dropped (and counted) for a shard whose queue is full; for QoS 1/2 the
    /// caller made sure there is room.
    fn accept_message(
        &mut self,
        msg: SharedMessage,
        ack: Option<Ticket>,
        remote: ShardSet,
        retain_owner: Option<usize>,
    ) {
        self.metrics.messages_received += 1;
        if msg.retain && self.cfg.retainer_enabled {
            match retain_owner {
                None => self.store_retained(msg.clone()),
                Some(owner) if self.outgoing[owner].queue.len() >= self.cfg.max_pending => {
                    self.metrics.dropped_overload += 1;
                }
                Some(owner) => self.send(
                    owner,
                    ShardMsg::RetainedSet {
                        msg: msg.clone(),
                        ack,
                    },
                ),
            }
        }
        for shard in remote.iter() {
            if self.outgoing[shard].queue.len() >= self.cfg.max_pending {
                self.metrics.dropped_overload += 1;
                continue;
            }
            self.send(shard, ShardMsg::Deliver(msg.clone()));
        }
        let local = self.deliver_local(&msg);
        if remote.is_empty() && local == 0 {
            self.metrics.messages_no_subscribers += 1;
        }
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
        if self.stalled_wills.is_empty() {
            self.accept_will(msg);
        } else {
            self.stalled_wills.push_back(msg);
        }
    }

    /// Publishes a will, or holds a QoS 1/2 one back (in order) until its queues have room.
    fn accept_will(&mut self, msg: SharedMessage) {
        let remote = self.remote_routes(&msg.topic);
        let retain_owner = self.remote_retain_owner(msg.retain, &msg.topic);
        if msg.qos != QoS::AtMostOnce && !self.room_for(remote, retain_owner) {
            self.stalled_wills.push_front(msg);
            return;
        }
        self.accept_message(msg, None, remote, retain_owner);
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

    /// A delivery for the session in slot `key`: written or queued, held while the session
    /// arrives from another shard, or passed on by a forwarding slot.
    fn deliver_to_session(&mut self, key: usize, msg: &SharedMessage, qos: QoS, retain: bool) {
        match self.sessions.get_mut(key) {
            Some(SessionSlot::Active(a)) => match &mut a.arrival {
                // The common case, without a second look-up of the slot.
                None => {
                    let mut d = Deliverer {
                        conns: &mut self.conns,
                        cfg: &self.cfg,
                        outbox_bytes: &mut self.outbox_bytes,
                        starved: &mut self.starved,
                        metrics: &mut self.metrics,
                        now: self.now,
                    };
                    if d.deliver(a, msg, qos, retain) {
                        self.arm_new(key, self.retry_due(self.now));
                    }
                }
                Some(arrival) if arrival.done => {
                    if !retain && arrival.was_forwarded(msg) {
                        self.metrics.dropped_duplicates += 1;
                    } else {
                        self.deliver_now(key, msg, qos, retain);
                    }
                }
                Some(arrival) => {
                    arrival.held.push_back((msg.clone(), qos, retain));
                    if arrival.held.len() > self.cfg.limits.max_mqueue_len {
                        arrival.held.pop_front();
                        self.metrics.dropped_queue_full += 1;
                    }
                }
            },
            Some(SessionSlot::Forwarding(f)) => {
                let forward = ShardMsg::Forward {
                    client_id: f.client_id.clone(),
                    epoch: f.epoch,
                    msg: msg.clone(),
                    qos,
                    retain,
                };
                self.forward(key, forward);
            }
            None => {}
        }
    }

    /// Delivers to the active session in slot `key` now.
    fn deliver_now(&mut self, key: usize, msg: &SharedMessage, qos: QoS, retain: bool) {
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let mut d = Deliverer {
            conns: &mut self.conns,
            cfg: &self.cfg,
            outbox_bytes: &mut self.outbox_bytes,
            starved: &mut self.starved,
            metrics: &mut self.metrics,
            now: self.now,
        };
        if d.deliver(a, msg, qos, retain) {
            self.arm_new(key, self.retry_due(self.now));
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
        let before = c.outbox.len();
        let limit = outbox_limit(&self.cfg, self.outbox_bytes, before);
        let out = Outbox::new(&mut c.outbox, limit);
        let result = match kind {
            AckKind::Puback => a.session.on_puback(pid, now, lim, out),
            AckKind::Pubrec => a.session.on_pubrec(pid, now, out.bytes).map(|_| 0),
            AckKind::Pubcomp => a.session.on_pubcomp(pid, now, lim, out),
        };
        let wrote = c.outbox.len() - before;
        self.outbox_bytes += wrote;
        if wrote > 0 {
            c.wake();
        }
        if a.session.wants_room(lim) {
            starve(c, id, before + wrote, &self.cfg, &mut self.starved);
        }
        match result {
            Ok(sent) => {
                self.metrics.messages_sent += sent as u64;
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
        self.reply(id, &Packet::Unsuback(unsub.packet_id));
    }

    /// Asks the retained partitions for what matches the newly `granted` filters of session
    /// `key`: this shard's own partition at once, every other shard concerned with one
    /// `RetainedQuery` for all the filters (the owner of an exact filter, every shard for a
    /// wildcard), so a SUBSCRIBE adds at most one message to each queue.
    fn query_retained(&mut self, key: usize, granted: Vec<(String, QoS)>) {
        if !self.cfg.retainer_enabled || granted.is_empty() {
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
        let mut remote: Vec<Vec<(ByteStr, QoS)>> = vec![Vec::new(); self.cfg.shards];
        for (filter, qos) in granted {
            let wildcard = topic::is_wildcard(&filter);
            let owner = self.owner(filter.as_bytes());
            if wildcard || owner == self.cfg.shard {
                let msgs = self.lookup_retained(&filter, qos);
                self.deliver_retained(ticket, msgs);
            }
            for (t, list) in remote.iter_mut().enumerate() {
                if t != self.cfg.shard && (wildcard || t == owner) {
                    list.push((ByteStr::from(filter.as_str()), qos));
                }
            }
        }
        for (t, filters) in remote.into_iter().enumerate() {
            if !filters.is_empty() {
                self.send(
                    t,
                    ShardMsg::RetainedQuery {
                        session: ticket,
                        filters,
                    },
                );
            }
        }
    }

    /// The retained messages of this partition matching `filter`, each with the QoS it is
    /// delivered at under a subscription granted `qos`.
    fn lookup_retained(&self, filter: &str, qos: QoS) -> Vec<(SharedMessage, QoS)> {
        let mut msgs = Vec::new();
        self.retained
            .lookup(filter, self.now, |m| msgs.push((m.clone(), m.qos.min(qos))));
        msgs
    }

    /// Retained messages for new subscriptions of the session in slot `ticket` (passed on if
    /// the session has moved since).
    fn deliver_retained(&mut self, ticket: Ticket, msgs: Vec<(SharedMessage, QoS)>) {
        let key = ticket.idx as usize;
        if self.sessions.get(key).is_none_or(|s| s.gen() != ticket.gen) {
            return;
        }
        for (m, qos) in msgs {
            self.deliver_to_session(key, &m, qos, true);
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
                        self.outbox_bytes += packet.len();
                        c.wake();
                    }
                }
                if self.sessions.get(key).is_some_and(|s| s.gen() == gen) {
                    self.query_retained(key, granted);
                }
            }
            Waiter::Release { key, gen } => {
                let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
                    return;
                };
                match &mut a.arrival {
                    Some(arrival) if a.gen == gen && !arrival.released => {
                        arrival.released = true;
                        let (to, epoch) = (arrival.upstream, arrival.epoch);
                        let client_id = a.session.client_id.clone();
                        self.send(to, ShardMsg::ReleaseForward { client_id, epoch });
                    }
                    _ => {}
                }
            }
            Waiter::Barrier { key, gen } => self.on_forward_barrier(key, gen),
            Waiter::Arrived { key, gen } => self.on_arrived(key, gen),
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

    /// Puts a session that moved here in a slot and indexes its subscriptions; with an
    /// `upstream` still forwarding, the session holds direct deliveries until it is done, and
    /// the upstream is released once every shard routes to this one.
    fn install_session(&mut self, session: Session, epoch: u64, upstream: Option<usize>) -> usize {
        let subs: Vec<(String, QoS)> = session
            .subscriptions
            .iter()
            .map(|(f, q)| (f.clone(), *q))
            .collect();
        let arrival = upstream.map(|upstream| {
            Box::new(Arrival {
                upstream,
                epoch,
                released: false,
                done: false,
                forwarded: vec![0; self.cfg.shards],
                held: VecDeque::new(),
            })
        });
        let (key, gen) = self.add_active(session, epoch, arrival);
        for (f, q) in subs {
            self.add_local_sub(&f, key, q);
        }
        let seq = self.flush_routes();
        if upstream.is_some() {
            self.add_waiter(seq, Waiter::Release { key, gen });
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
        let owner = self.owner(client_id.as_bytes());
        if let Some(arrival) = a.arrival {
            // The upstream's forwards now find no session of their epoch and are dropped; the
            // registration it kept busy is free.
            if !arrival.released {
                self.send(
                    arrival.upstream,
                    ShardMsg::ReleaseForward {
                        client_id: client_id.clone(),
                        epoch: arrival.epoch,
                    },
                );
            }
            self.metrics.dropped_queue_full += arrival.held.len() as u64;
            self.send(
                owner,
                ShardMsg::ConnectDone {
                    client_id: client_id.clone(),
                    epoch: arrival.epoch,
                },
            );
        }
        if unregister {
            self.send(
                owner,
                ShardMsg::Unregister {
                    client_id,
                    epoch: a.epoch,
                },
            );
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
        let before = c.outbox.len();
        mqtt::encode(
            &Packet::Connack(Connack {
                session_present: present && c.level == ProtocolLevel::V311,
                code: ConnectReturnCode::Accepted,
            }),
            &mut c.outbox,
        );
        let limit = outbox_limit(&self.cfg, self.outbox_bytes, c.outbox.len());
        let lim = &self.cfg.limits;
        let sent = a
            .session
            .resume(now, lim, Outbox::new(&mut c.outbox, limit));
        let len = c.outbox.len();
        self.outbox_bytes += len - before;
        if a.session.wants_room(lim) {
            starve(c, id, len, &self.cfg, &mut self.starved);
        }
        debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), session_present = present, "connected");
        c.wake();
        self.metrics.messages_sent += sent as u64;
        self.metrics.connects_accepted += 1;
        self.arm(key);
        self.arm_conn(id);
    }

    /// Completes a CONNECT at this (the connecting) shard and tells the owner, which lets the
    /// next CONNECT for the client id proceed; for a session still arriving from another shard,
    /// only once the forwarding is done (`ForwardDone`), so a session never moves on before
    /// it has fully arrived.
    fn finish_connect(&mut self, client_id: ByteStr, ticket: Ticket, epoch: u64, handed: Handed) {
        let owner = self.owner(client_id.as_bytes());
        let id = ConnId {
            idx: ticket.idx,
            gen: ticket.gen,
        };
        let live = conn_mut(&mut self.conns, id)
            .filter(|c| c.phase == ConnPhase::Connecting && !c.close)
            .map(|c| c.clean);
        let arriving = matches!(
            &handed,
            Handed::Moved {
                upstream: Some(_),
                ..
            }
        ) && live != Some(true);
        if !arriving {
            self.send(
                owner,
                ShardMsg::ConnectDone {
                    client_id: client_id.clone(),
                    epoch,
                },
            );
        }
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
                Handed::Moved { session, upstream } => {
                    let key = self.install_session(*session, epoch, upstream);
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
            Handed::Moved { session, upstream } => {
                if clean {
                    if let Some(up) = upstream {
                        self.send(
                            up,
                            ShardMsg::ReleaseForward {
                                client_id: client_id.clone(),
                                epoch,
                            },
                        );
                    }
                    (self.new_session(client_id, clean, epoch), false)
                } else {
                    (self.install_session(*session, epoch, upstream), true)
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
                c.start_close(self.now);
                let will = c.will.take();
                self.arm_conn(old);
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
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        if let Some(arrival) = a.arrival.take() {
            // Not reached: the owner lets no CONNECT for this id through before the arrival is
            // done. Should it happen, the held deliveries go with the session.
            for (m, q, r) in arrival.held {
                a.session
                    .deliver(&m, q, r, self.now, &self.cfg.limits, None);
            }
        }
        // Keep the slot (and its index entries) as a forwarder under the same key.
        let forwarder = SessionSlot::Forwarding(Box::new(ForwardSlot {
            gen: a.gen,
            client_id: client_id.clone(),
            epoch,
            to: ticket.shard,
            filters: a.session.subscriptions.keys().cloned().collect(),
            state: ForwardState::Forwarding,
            backlog: VecDeque::new(),
        }));
        let SessionSlot::Active(a) = std::mem::replace(&mut self.sessions[key], forwarder) else {
            return;
        };
        self.by_client.remove(client_id.as_bytes(), key as u32);
        self.forwarders.insert((client_id.clone(), epoch), key);
        self.metrics.sessions_moved += 1;
        self.send(
            ticket.shard,
            ShardMsg::Handover {
                client_id,
                ticket,
                epoch,
                session: Some(Box::new(a.session)),
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
                forwarding: false,
            },
        );
    }

    /// A forwarding slot passes `forward` on, or keeps it while the queue to the new holder
    /// is full (at most `mqtt.max_mqueue_len`, the oldest dropped beyond).
    fn forward(&mut self, key: usize, forward: ShardMsg) {
        let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) else {
            return;
        };
        let to = f.to;
        if f.backlog.is_empty() && self.outgoing[to].queue.len() < self.cfg.max_pending {
            return self.send(to, forward);
        }
        f.backlog.push_back(forward);
        if f.backlog.len() > self.cfg.limits.max_mqueue_len {
            f.backlog.pop_front();
            self.metrics.dropped_queue_full += 1;
        }
        if !self.backlogged.contains(&key) {
            self.backlogged.push(key);
        }
    }

    /// The new holder routes everywhere: keep forwarding until a barrier proves that what
    /// every shard sent here before routing to the new holder has arrived.
    fn on_release(&mut self, client_id: ByteStr, epoch: u64) {
        let Some(&key) = self.forwarders.get(&(client_id, epoch)) else {
            return;
        };
        let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) else {
            return;
        };
        if f.state != ForwardState::Forwarding {
            return;
        }
        f.state = ForwardState::Draining;
        let gen = f.gen;
        let seq = self.barrier();
        self.add_waiter(seq, Waiter::Barrier { key, gen });
    }

    /// The barrier after a release is answered by every shard: nothing more can match the
    /// forwarding slot's filters on its way here. It leaves the index and, once its backlog
    /// is sent, tells the new holder.
    fn on_forward_barrier(&mut self, key: usize, gen: u32) {
        let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) else {
            return;
        };
        if f.gen != gen || f.state != ForwardState::Draining {
            return;
        }
        f.state = ForwardState::Flushing;
        let filters = std::mem::take(&mut f.filters);
        for filter in &filters {
            self.remove_local_sub(filter, key);
        }
        self.flush_routes();
        self.try_finish_forwarding(key);
    }

    /// Frees a flushing forwarding slot whose backlog is sent, with `ForwardDone` behind the
    /// last forward.
    fn try_finish_forwarding(&mut self, key: usize) {
        let Some(SessionSlot::Forwarding(f)) = self.sessions.get(key) else {
            return;
        };
        if f.state != ForwardState::Flushing || !f.backlog.is_empty() {
            return;
        }
        let SessionSlot::Forwarding(f) = self.sessions.remove(key) else {
            return;
        };
        self.forwarders.remove(&(f.client_id.clone(), f.epoch));
        self.send(
            f.to,
            ShardMsg::ForwardDone {
                client_id: f.client_id,
                epoch: f.epoch,
            },
        );
    }

    /// The arriving session of `client_id` whose move has `epoch`, forwarded from `from`.
    fn arriving_session(&self, from: usize, client_id: &ByteStr, epoch: u64) -> Option<usize> {
        let key = self.local_session(client_id)?;
        match self.sessions.get(key) {
            Some(SessionSlot::Active(a))
                if a.arrival
                    .as_ref()
                    .is_some_and(|x| x.epoch == epoch && x.upstream == from && !x.done) =>
            {
                Some(key)
            }
            _ => None,
        }
    }

    fn on_forward(
        &mut self,
        from: usize,
        client_id: ByteStr,
        epoch: u64,
        msg: SharedMessage,
        qos: QoS,
        retain: bool,
    ) {
        let Some(key) = self.arriving_session(from, &client_id, epoch) else {
            // For a session that is gone (its client came back with a clean session): drop.
            self.metrics.dropped_stale_forwards += 1;
            return;
        };
        if !retain {
            if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) {
                if let Some(arrival) = &mut a.arrival {
                    let (origin, seq) = message_origin(msg.id);
                    if let Some(top) = arrival.forwarded.get_mut(origin) {
                        *top = (*top).max(seq);
                    }
                }
            }
        }
        self.deliver_now(key, &msg, qos, retain);
    }

    /// The upstream forwarded everything: deliver the held direct messages it did not, then
    /// wait for a barrier to drop the direct copies still on their way.
    fn on_forward_done(&mut self, from: usize, client_id: ByteStr, epoch: u64) {
        let Some(key) = self.arriving_session(from, &client_id, epoch) else {
            return;
        };
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let gen = a.gen;
        let Some(arrival) = &mut a.arrival else {
            return;
        };
        arrival.done = true;
        let held = std::mem::take(&mut arrival.held);
        for (msg, qos, retain) in held {
            self.deliver_to_session(key, &msg, qos, retain);
        }
        let seq = self.barrier();
        self.add_waiter(seq, Waiter::Arrived { key, gen });
    }

    /// Every direct copy sent before the forwarding ended has arrived: the session is all here,
    /// and the next CONNECT for its client id may go ahead.
    fn on_arrived(&mut self, key: usize, gen: u32) {
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        if a.gen != gen || !a.arrival.as_ref().is_some_and(|x| x.done) {
            return;
        }
        let Some(arrival) = a.arrival.take() else {
            return;
        };
        let client_id = a.session.client_id.clone();
        let owner = self.owner(client_id.as_bytes());
        self.send(
            owner,
            ShardMsg::ConnectDone {
                client_id,
                epoch: arrival.epoch,
            },
        );
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
                    let before = c.outbox.len();
                    let limit = outbox_limit(&self.cfg, self.outbox_bytes, before);
                    let r = a.session.on_timeout(
                        now,
                        &self.cfg.limits,
                        Some(Outbox::new(&mut c.outbox, limit)),
                    );
                    self.outbox_bytes += c.outbox.len() - before;
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
                forwarding,
            } => {
                let handed = match session {
                    Some(session) => Handed::Moved {
                        session,
                        upstream: forwarding.then_some(from),
                    },
                    None => Handed::Fresh,
                };
                self.finish_connect(client_id, ticket, epoch, handed);
            }
            ShardMsg::Forward {
                client_id,
                epoch,
                msg,
                qos,
                retain,
            } => self.on_forward(from, client_id, epoch, msg, qos, retain),
            ShardMsg::ReleaseForward { client_id, epoch } => self.on_release(client_id, epoch),
            ShardMsg::ForwardDone { client_id, epoch } => {
                self.on_forward_done(from, client_id, epoch)
            }
            ShardMsg::RetainedSet { msg, ack } => {
                self.store_retained(msg);
                if let Some(conn) = ack {
                    self.send(conn.shard, ShardMsg::RetainedStored { conn });
                }
            }
            ShardMsg::RetainedStored { conn } => self.on_retained_stored(conn),
            ShardMsg::RetainedQuery { session, filters } => {
                let msgs: Vec<(SharedMessage, QoS)> = filters
                    .iter()
                    .flat_map(|(filter, qos)| self.lookup_retained(filter, *qos))
                    .collect();
                if !msgs.is_empty() {
                    self.send(session.shard, ShardMsg::RetainedReply { session, msgs });
                }
            }
            ShardMsg::RetainedReply { session, msgs } => self.deliver_retained(session, msgs),
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

    /// Takes the next batch (at most `shards.batch_size` messages) for shard `dest`. The room
    /// it makes goes to forwards waiting in a backlog, then, once every queue is below half,
    /// to the wills and packets held back.
    pub fn take_outgoing(&mut self, dest: usize) -> Vec<ShardMsg> {
        let q = &mut self.outgoing[dest].queue;
        let n = q.len().min(self.cfg.batch_size);
        let batch: Vec<ShardMsg> = q.drain(..n).collect();
        if !self.backlogged.is_empty() {
            self.flush_backlogs();
        }
        if !(self.stalled.is_empty() && self.stalled_wills.is_empty()) && self.queues_below_half() {
            self.resume_stalled();
            self.drain_inbox();
        }
        batch
    }

    /// Moves forwards from the forwarding slots' backlogs to their queues while there is room.
    fn flush_backlogs(&mut self) {
        let keys = std::mem::take(&mut self.backlogged);
        for key in keys {
            let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) else {
                continue;
            };
            let out = &mut self.outgoing[f.to];
            let room = self.cfg.max_pending.saturating_sub(out.queue.len());
            let n = room.min(f.backlog.len());
            if n > 0 {
                let was_empty = out.queue.is_empty();
                out.queue.extend(f.backlog.drain(..n));
                if was_empty {
                    if let Some(w) = out.waker.take() {
                        w.wake();
                    }
                }
            }
            if f.backlog.is_empty() {
                self.try_finish_forwarding(key);
            } else {
                self.backlogged.push(key);
            }
        }
    }
}

#[cfg(test)]
impl Engine {
    /// Deliveries queued in the session of `client_id` here (tests).
    fn session_queue_len(&self, client_id: &str) -> usize {
        self.local_session(&ByteStr::from(client_id))
            .and_then(|k| match self.sessions.get(k) {
                Some(SessionSlot::Active(a)) => Some(a.session.queue().len()),
                _ => None,
            })
            .unwrap_or(0)
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
