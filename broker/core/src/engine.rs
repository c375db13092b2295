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
use super::msgs::{Control, ShardMsg, SlotId, Ticket};
use super::retained::{RetainedLimits, RetainedStore, SetOutcome};
use super::route::{owner_shard, RouteTable, ShardSet};
use super::session::{Delivery, OfflineQueues, Outbox, Session, SessionLimits, Written};
use super::sink::{Sink, SinkWrite};
use super::time::Timestamp;
use super::topic;
use super::trie::TopicTrie;
use ahash::AHashMap;
use bytes::{Bytes, BytesMut};
use shardmq_protocol::bytestr::ByteStr;
use shardmq_protocol::mqtt::{
    self, Connack, Connect, ConnectReturnCode, DecodeError, DecodeOptions, LastWill, Packet,
    ProtocolLevel, Publish, QoS, Suback, SubackCode, Subscribe, Unsubscribe,
};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;
use tracing::debug;

mod access;
pub mod admin;
mod connections;
mod events;
mod handover;
mod mesh;
mod publish;
mod registry;
mod subscribe;
mod timers;

use handover::{Arrival, ArrivalState, ForwardSlot};

/// The [`publish::Deliverer`] of `$engine`, borrowing its fields apart from the session slots
/// (a macro, so that a session slot may stay borrowed beside it).
macro_rules! deliverer {
    ($engine:ident) => {
        Deliverer {
            conns: &mut $engine.conns,
            cfg: &$engine.cfg,
            outbox_bytes: &mut $engine.outbox_bytes,
            starved: &mut $engine.starved,
            overloaded: &mut $engine.overloaded,
            offline: &$engine.offline,
            metrics: &mut $engine.metrics,
            now: $engine.now,
        }
    };
}
use deliverer;

/// What the engine needs from the configuration: plain values, which the runtime derives from
/// the loaded configuration (the core never reads it).
#[derive(Debug, Clone, PartialEq)]
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
    /// `mqtt.max_topic_levels`; 0 = any depth.
    pub max_topic_levels: usize,
    /// `mqtt.max_subscriptions` per session; 0 = no limit.
    pub max_subscriptions: usize,
    /// `mqtt.force_shutdown_policy`: a connected client with more queued deliveries than
    /// the first, or more queued and unwritten bytes than the second, is disconnected.
    pub force_shutdown: Option<(usize, usize)>,
    /// `mqtt.max_mqueue_bytes_total`: topic and payload bytes queued for offline sessions,
    /// all shards together ([`Engine::share_offline_queues`]); 0 = no cap.
    pub max_mqueue_bytes_total: usize,
    /// `flapping.*`: a client id that reconnects too often is banned; `None` = off.
    pub flapping: Option<crate::ban::FlappingPolicy>,
    /// `mqtt.rate_limit.*`: inbound messages and bytes per second per connection.
    pub rate_limit: crate::rate::RateLimit,
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
    /// `sys.client_events`: publish `$SYS/broker/clients/<id>/connected` and `/disconnected`.
    pub client_events: bool,
    /// `auth.*`: who may connect without a check, and whether credentials are checked.
    pub auth: crate::auth::AuthPolicy,
    /// `auth.acl_deny_action = "disconnect"`: a denied PUBLISH or SUBSCRIBE closes the
    /// connection (else a PUBLISH is dropped, a subscription refused).
    pub acl_deny_disconnect: bool,
}

pub use events::EndReason;

/// A gateway listener's protocol, as the admin API and `$SYS` events name its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerProtocol {
    /// `proto_name` (`tcp` for the TCP gateway).
    pub name: &'static str,
    /// `proto_ver`.
    pub version: u8,
    /// How long a connection of this listener may take to identify itself (its CONNECT),
    /// instead of `mqtt.idle_timeout`.
    pub idle_timeout: Duration,
}

/// A connection of this shard (its slot in the connection slab).
pub type ConnId = SlotId;

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
    /// What waits to go out (MQTT bytes, or typed packets for a gateway).
    outbox: Sink,
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
    /// Not read until `About::resume_at`: ahead of its `mqtt.rate_limit`.
    throttled: bool,
    /// More than one of its packets waits in `Engine::stalled`.
    more_stalled: bool,
    phase: ConnPhase,
    level: ProtocolLevel,
    /// The runtime's number for the listener that accepted it.
    listener: u16,
    /// Keepalive allowance (keepalive × multiplier) in milliseconds; 0 = none.
    keepalive_ms: u32,
    /// When the last packet arrived (before CONNECT: when the connection opened).
    last_rx: Timestamp,
    peer: Peer,
    clean: bool,
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
    /// The will and the username, when there are any (boxed: most connections have neither,
    /// and every byte of `Conn` is paid per connection).
    about: Option<Box<About>>,
}

/// What a connection may carry beside its state.
#[derive(Debug, Default)]
struct About {
    will: Option<LastWill>,
    /// Its CONNECT's username, or the name its transport vouched for (a verified TLS client
    /// certificate, [`Engine::set_conn_username`]), which then wins.
    username: Option<Box<str>>,
    /// `username` came from the transport; CONNECT does not replace it.
    username_from_transport: bool,
    /// Recent access decisions: (action, topic, allowed), valid for rules `acl_gen`.
    acl_cache: Vec<(crate::acl::Action, Box<str>, bool)>,
    acl_gen: u32,
    /// Its position against `mqtt.rate_limit`, and when a throttled connection is read again.
    rate: crate::rate::Buckets,
    resume_at: Timestamp,
}

impl Conn {
    /// Takes the will away (published, or discarded on a clean DISCONNECT).
    fn take_will(&mut self) -> Option<LastWill> {
        self.about.as_mut().and_then(|a| a.will.take())
    }

    fn about_mut(&mut self) -> &mut About {
        self.about.get_or_insert_with(Box::default)
    }
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
    /// Acknowledgements due meanwhile, in order.
    acks: Vec<Packet>,
}

impl Conn {
    /// Whether the driver should read more input: not while connecting, while a packet waits
    /// for room in the cross-shard queues, or while the client has not read what it was sent
    /// (so TCP pushes back on a client that floods without reading).
    fn readable(&self, max_write_buffer: usize) -> bool {
        !self.close
            && !self.paused
            && !self.throttled
            && self.phase != ConnPhase::Connecting
            && self.outbox.len() + self.held.as_ref().map_or(0, |h| 4 * h.acks.len())
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
        suback: Suback,
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

/// What [`Engine::handle_input`] did with the bytes it was offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// Bytes used from the front; the rest waits for more input or for the connection to be
    /// readable again.
    pub used: usize,
    /// A packet was handled or bad input met: the connection's state may have changed.
    pub progressed: bool,
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
    /// Open connections per listener number.
    listener_conns: Vec<u32>,
    /// What a listener speaks, when it is not MQTT (a gateway's), by listener number.
    listener_protocols: Vec<Option<ListenerProtocol>>,
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
    /// Subscriptions in `local` (session, filter pairs).
    subscriptions: usize,
    /// Filters in `local` that `routes` does not hold (no other shard subscribes to them).
    local_only_filters: usize,
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
    /// Connections past `force_shutdown`, to close once the current delivery is done.
    overloaded: Vec<ConnId>,
    /// What offline sessions hold in their queues, all shards together.
    offline: Arc<OfflineQueues>,
    /// Bans in force here: the client ids this shard owns, every username and address ban.
    bans: crate::ban::BanList,
    /// Recent CONNECTs of the client ids this shard owns (`flapping.*`).
    flapping: crate::ban::Flapping,
    /// Forwarding slots with forwards waiting for room in a queue.
    backlogged: Vec<usize>,
    timers: BinaryHeap<Reverse<(Timestamp, usize, u32)>>,
    /// CONNECT and keepalive deadlines: (deadline, connection slot, generation).
    conn_timers: BinaryHeap<Reverse<(Timestamp, u32, u32)>>,
    timer_waker: Option<Waker>,
    timer_wake_at: Timestamp,
    parked_count: usize,
    /// The access rules (`None`: everything allowed) and their generation.
    acl: Option<Arc<crate::acl::Acl>>,
    acl_gen: u32,
    /// CONNECTs waiting for their credentials' check: connection token → (client id, clean).
    pending_auth: AHashMap<u64, (ByteStr, bool)>,
    /// Checks for the runtime to run.
    auth_requests: Vec<crate::auth::AuthRequest>,
    auth_waker: Option<Waker>,
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
        let offline = Arc::new(OfflineQueues::new(cfg.max_mqueue_bytes_total));
        Engine {
            retained: RetainedStore::new(cfg.retained),
            cfg,
            conns: Slab::new(),
            listener_conns: Vec::new(),
            listener_protocols: Vec::new(),
            sessions: Slab::new(),
            next_gen: 0,
            by_client: ClientIndex::default(),
            forwarders: AHashMap::new(),
            registry: AHashMap::new(),
            reg_waiting: AHashMap::new(),
            next_epoch: 0,
            local: TopicTrie::new(),
            subscriptions: 0,
            local_only_filters: 0,
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
            overloaded: Vec::new(),
            offline,
            bans: Default::default(),
            flapping: Default::default(),
            backlogged: Vec::new(),
            timers: BinaryHeap::new(),
            conn_timers: BinaryHeap::new(),
            timer_waker: None,
            timer_wake_at: now,
            parked_count: 0,
            acl: None,
            acl_gen: 0,
            pending_auth: AHashMap::new(),
            auth_requests: Vec::new(),
            auth_waker: None,
            msg_seq: 0,
            client_seq: 0,
            started_at: now,
            scratch: Vec::new(),
            now,
            metrics: Metrics::default(),
        }
    }

    /// Makes this engine count its offline queues in `offline`, which the other shards share
    /// (call before the first connection; each engine starts with a counter of its own).
    pub fn share_offline_queues(&mut self, offline: Arc<OfflineQueues>) {
        self.offline = offline;
    }

    /// What offline sessions hold in their queues, all shards together.
    pub fn offline_queues(&self) -> &OfflineQueues {
        &self.offline
    }

    /// This shard's index.
    pub fn shard(&self) -> usize {
        self.cfg.shard
    }

    /// Connections open on this shard.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Connections open on this shard that came through `listener` (see
    /// [`Engine::open_conn`]).
    pub fn listener_connections(&self, listener: u16) -> usize {
        self.listener_conns
            .get(usize::from(listener))
            .map_or(0, |&n| n as usize)
    }

    /// Sessions held by this shard (online and offline).
    pub fn session_count(&self) -> usize {
        self.by_client.len()
    }

    /// Distinct filters with local subscribers.
    pub fn local_filter_count(&self) -> usize {
        self.local.len()
    }

    /// Subscriptions of the sessions held here.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions
    }

    /// Distinct filters subscribed to anywhere, as this shard's route replica knows them.
    pub fn topic_count(&self) -> usize {
        self.routes.len() + self.local_only_filters
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
