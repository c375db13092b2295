//! The MQTT-SN v1.2 gateway's state machine (sans-IO): every client of one UDP socket, keyed by
//! the address it sends from (and, behind a forwarder, its wireless node id).
//!
//! A client is an engine connection with a packet sink, opened at its CONNECT: the CONNECT
//! (after the will dialogue, when its WILL flag asks for one) becomes an MQTT CONNECT with the
//! gateway's credentials (`mqtt.sn.username`/`password`: MQTT-SN has none of its own), its
//! duration as keepalive and its clean-session flag, so authentication, takeover, sessions,
//! wills, ACL and `$SYS` events treat it as any client. Its messages become engine packets and
//! the engine's packets become MQTT-SN messages:
//!
//! - topic ids: predefined ones (`[mqtt.sn.predefined]`), the ones this client registered
//!   (REGISTER, or a SUBSCRIBE by name; numbered above the predefined ones, forgotten when the
//!   client goes) and two-character short names. Before the first downlink PUBLISH on a name
//!   the client has no id for, the gateway REGISTERs one and holds that client's deliveries
//!   until the REGACK, as the specification asks (EMQX sent the PUBLISH right away).
//! - downlink QoS 1 and 2 keep the engine's packet id as MsgId and are sent again (DUP) every
//!   `retry_interval` until acknowledged; after `max_retries` the client is taken for lost:
//!   DISCONNECT, and its session ends as on a network error.
//! - sleep: DISCONNECT with a duration answers DISCONNECT and stops delivering; what arrives
//!   waits in the engine (under its write-buffer and queue limits, drops counted). A PINGREQ
//!   with the client id wakes it: what waited is sent, acknowledged, then PINGRESP, and it
//!   sleeps again. The sleep's duration is its keepalive: a client that outsleeps it is lost
//!   and its will published. A CONNECT ends the sleep.
//! - a CONNECT or a waking PINGREQ from a new address moves the client there (NAT).
//!
//! Bad datagrams are dropped and counted; a client that breaks the protocol gets DISCONNECT
//! and its connection ends as on a network error. The driver hands in datagrams
//! ([`SnGateway::handle_datagram`]), polls a client when the engine wakes its connection
//! ([`SnGateway::poll_conn`]) and on [`SnGateway::next_deadline`] ([`SnGateway::tick`]), and
//! sends what [`SnGateway::pop_datagram`] gives.

use super::{Armed, Deadlines};
use crate::engine::{ConnId, EndReason, Engine};
use crate::sink::Sink;
use crate::time::Timestamp;
use crate::topic::is_wildcard;
use bytes::{Bytes, BytesMut};
use shardmq_protocol::mqtt::{
    Connack, Connect, ConnectReturnCode, LastWill, Packet, ProtocolLevel, Publish, QoS, SubackCode,
    Subscribe, Unsubscribe,
};
use shardmq_protocol::mqttsn::{self as sn, rc, Message, Qos, Topic, WillTopic};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

/// The largest message the gateway sends (a UDP datagram's payload over IPv4).
pub const MAX_DATAGRAM: usize = 65_507;

/// The settings of the MQTT-SN gateway (`mqtt.sn.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnSettings {
    /// The engine listener number its clients are counted under.
    pub listener: u16,
    /// `mqtt.sn.gateway_id` (ADVERTISE, GWINFO).
    pub gateway_id: u8,
    /// `mqtt.sn.username`: the username every client connects with.
    pub username: Option<String>,
    /// `mqtt.sn.password`.
    pub password: Option<Bytes>,
    /// `mqtt.sn.enable_qos3`: publish QoS −1 messages (without a connection).
    pub enable_qos3: bool,
    /// `[mqtt.sn.predefined]`: topic id → name.
    pub predefined: Vec<(u16, String)>,
    /// `mqtt.sn.retry_interval` (T_retry): a downlink message or REGISTER not acknowledged
    /// within it is sent again.
    pub retry_interval: Duration,
    /// `mqtt.sn.max_retries` (N_retry): sends after the first before the client is lost.
    pub max_retries: u32,
    /// `mqtt.sn.max_clients`: clients known at once; further CONNECTs get CONNACK 0x01.
    pub max_clients: usize,
    /// `mqtt.sn.max_registered_topics`: topic ids one client may hold besides the predefined.
    pub max_registered_topics: usize,
    /// `mqtt.sn.enable_stats`: count datagrams in the metrics.
    pub stats: bool,
}

/// Where a client's datagrams come from: an address, and the wireless node id when a
/// forwarder encapsulates them (the answers are encapsulated for that node in turn).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnPeer {
    /// The UDP address.
    pub addr: SocketAddr,
    /// The wireless node id, behind a forwarder.
    pub node: Option<Bytes>,
}

impl SnPeer {
    /// A client that talks to the gateway directly.
    pub fn direct(addr: SocketAddr) -> SnPeer {
        SnPeer { addr, node: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    client_id: String,
    clean: bool,
    duration: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// WILLTOPICREQ sent.
    WillTopic(Pending),
    /// WILLMSGREQ sent.
    WillMsg(Pending, WillTopic),
    /// The engine has the CONNECT.
    Connecting,
    /// CONNACK 0 sent.
    Active,
    /// Asleep for this many seconds.
    Asleep(u16),
    /// Woken by a PINGREQ: delivering what waited, then PINGRESP and back to sleep.
    Awake(u16),
}

/// The acknowledgement a downlink message waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Puback,
    Pubrec,
    Pubcomp,
}

/// Something sent that waits for its acknowledgement.
#[derive(Debug)]
struct Resend {
    /// The datagram, DUP set when it is a PUBLISH.
    datagram: Bytes,
    tries: u32,
    due: Timestamp,
}

#[derive(Debug)]
struct Outgoing {
    publish: Publish,
    stage: Stage,
    resend: Resend,
}

#[derive(Debug)]
struct Registering {
    topic_id: u16,
    msg_id: u16,
    name: String,
    resend: Resend,
}

/// The topic ids one client registered.
#[derive(Debug, Default)]
struct Registry {
    by_id: HashMap<u16, String>,
    by_name: HashMap<String, u16>,
    next: u16,
}

#[derive(Debug)]
struct SnClient {
    conn: ConnId,
    peer: SnPeer,
    phase: Phase,
    client_id: String,
    /// The will's topic and message, as the client last gave them.
    will: Option<WillTopic>,
    will_msg: Bytes,
    topics: Registry,
    /// Deliveries held until a registration is acknowledged.
    waiting: VecDeque<Publish>,
    registering: Option<Registering>,
    next_reg_id: u16,
    /// Downlink QoS 1 and 2 messages by MsgId.
    inflight: HashMap<u16, Outgoing>,
    /// Uplink QoS 1 MsgId → the topic id its PUBACK names.
    up_topics: HashMap<u16, u16>,
    /// SUBSCRIBE MsgId → the topic id its SUBACK names.
    sub_ids: HashMap<u16, u16>,
    /// Downlink QoS 2 messages given up on, whose PUBREL the engine is answered itself.
    discarding: HashSet<u16>,
    /// In the gateway's client id index.
    indexed: bool,
    /// The gateway already said what it had to (DISCONNECT answered, CONNACK refused): no
    /// DISCONNECT when the connection ends.
    quiet: bool,
    timer_at: Timestamp,
}

/// The gateway's predefined topics, both ways.
#[derive(Debug, Default)]
struct Predefined {
    by_id: HashMap<u16, String>,
    by_name: HashMap<String, u16>,
    /// The first id a client registration gets.
    first_free: u16,
}

/// Datagrams to send.
#[derive(Debug, Default)]
struct Out {
    queue: VecDeque<(SocketAddr, Bytes)>,
}

impl Out {
    fn encode(peer: &SnPeer, m: &Message) -> Bytes {
        let mut b = BytesMut::new();
        match &peer.node {
            None => sn::encode(m, &mut b),
            Some(node) => sn::encode(
                &Message::Encapsulated {
                    radius: 0,
                    node_id: node.clone(),
                    inner: Box::new(m.clone()),
                },
                &mut b,
            ),
        }
        b.freeze()
    }

    fn send(&mut self, peer: &SnPeer, m: &Message) {
        let d = Self::encode(peer, m);
        self.queue.push_back((peer.addr, d));
    }
}

/// What a client's handlers work with.
struct Cx<'a> {
    e: &'a mut Engine,
    s: &'a SnSettings,
    pre: &'a Predefined,
    out: &'a mut Out,
    now: Timestamp,
}

/// Every MQTT-SN client of one socket.
#[derive(Debug)]
pub struct SnGateway {
    s: SnSettings,
    pre: Predefined,
    clients: HashMap<ConnId, SnClient>,
    by_peer: HashMap<SnPeer, ConnId>,
    by_client_id: HashMap<String, ConnId>,
    timers: Deadlines,
    out: Out,
    opened: Vec<ConnId>,
}

fn qos_to_mqtt(q: Qos) -> QoS {
    match q {
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
        Qos::AtMostOnce | Qos::MinusOne => QoS::AtMostOnce,
    }
}

fn qos_to_sn(q: QoS) -> Qos {
    match q {
        QoS::AtMostOnce => Qos::AtMostOnce,
        QoS::AtLeastOnce => Qos::AtLeastOnce,
        QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

/// A short topic name as a string (`None` if it is not UTF-8).
fn short_name(b: [u8; 2]) -> Option<String> {
    std::str::from_utf8(&b).ok().map(str::to_string)
}

/// The 16 bits a short name takes where a topic id goes (PUBACK).
fn short_id(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

impl SnGateway {
    /// A gateway with these settings and no client.
    pub fn new(s: SnSettings) -> SnGateway {
        let mut pre = Predefined::default();
        for (id, name) in &s.predefined {
            pre.by_id.insert(*id, name.clone());
            pre.by_name.insert(name.clone(), *id);
        }
        pre.first_free = s
            .predefined
            .iter()
            .map(|(id, _)| *id)
            .max()
            .map_or(1, |m| m.saturating_add(1));
        SnGateway {
            s,
            pre,
            clients: HashMap::new(),
            by_peer: HashMap::new(),
            by_client_id: HashMap::new(),
            timers: Deadlines::default(),
            out: Out::default(),
            opened: Vec::new(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &SnSettings {
        &self.s
    }

    /// Clients known (connected, connecting or asleep).
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// The connection of the client at `peer`, if one is known there.
    pub fn conn_at(&self, peer: &SnPeer) -> Option<ConnId> {
        self.by_peer.get(peer).copied()
    }

    /// Connections opened since the last call (the driver registers its waker on each).
    pub fn take_opened(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.opened)
    }

    /// The next datagram to send: (address, bytes).
    pub fn pop_datagram(&mut self, e: &mut Engine) -> Option<(SocketAddr, Bytes)> {
        let d = self.out.queue.pop_front()?;
        if self.s.stats {
            e.metrics.mqttsn_datagrams_sent += 1;
        }
        Some(d)
    }

    /// The ADVERTISE the gateway broadcasts: its id and the seconds to the next one.
    pub fn advertise(&self, duration: u16) -> Bytes {
        Out::encode(
            &SnPeer::direct(SocketAddr::from(([0, 0, 0, 0], 0))),
            &Message::Advertise {
                gw_id: self.s.gateway_id,
                duration,
            },
        )
    }

    /// When [`SnGateway::tick`] has work: a retransmission falls due.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.timers.next()
    }

    /// A datagram from `from`.
    pub fn handle_datagram(
        &mut self,
        e: &mut Engine,
        from: SocketAddr,
        data: &[u8],
        now: Timestamp,
    ) {
        if self.s.stats {
            e.metrics.mqttsn_datagrams_received += 1;
        }
        let m = match sn::decode(data) {
            Ok(m) => m,
            Err(err) => {
                e.metrics.mqttsn_bad_datagrams += 1;
                tracing::debug!(%from, error = %err, "bad MQTT-SN datagram, dropped");
                return;
            }
        };
        let (peer, m) = match m {
            Message::Encapsulated { node_id, inner, .. } => {
                if matches!(*inner, Message::Encapsulated { .. }) {
                    e.metrics.mqttsn_bad_datagrams += 1;
                    tracing::debug!(%from, "MQTT-SN encapsulation within encapsulation, dropped");
                    return;
                }
                (
                    SnPeer {
                        addr: from,
                        node: Some(node_id),
                    },
                    *inner,
                )
            }
            m => (SnPeer::direct(from), m),
        };
        self.handle_message(e, peer, m, now);
    }

    fn handle_message(&mut self, e: &mut Engine, peer: SnPeer, m: Message, now: Timestamp) {
        match m {
            Message::SearchGw { .. } => {
                let gwinfo = Message::GwInfo {
                    gw_id: self.s.gateway_id,
                    gw_add: Bytes::new(),
                };
                self.out.send(&peer, &gwinfo);
            }
            // Other gateways', or a client answering for us: nothing to do.
            Message::Advertise { .. } | Message::GwInfo { .. } => {}
            Message::Connect {
                will,
                clean_session,
                duration,
                client_id,
                ..
            } => self.on_connect(
                e,
                peer,
                Pending {
                    client_id,
                    clean: clean_session,
                    duration,
                },
                will,
                now,
            ),
            Message::Publish {
                qos: Qos::MinusOne,
                retain,
                topic,
                data,
                ..
            } if !self.by_peer.contains_key(&peer) => {
                self.publish_minus_one(e, &peer, topic, retain, data, now)
            }
            Message::Pingreq(Some(cid)) => {
                let here = self.by_peer.get(&peer).copied();
                match (here, self.by_client_id.get(&cid).copied()) {
                    // A sleeping client's address changed (NAT): its client id tells who it is.
                    (_, Some(owner)) if here != Some(owner) => {
                        self.move_client(owner, peer);
                        self.on_client_message(e, owner, Message::Pingreq(Some(cid)), now);
                    }
                    (Some(id), _) | (None, Some(id)) => {
                        self.on_client_message(e, id, Message::Pingreq(Some(cid)), now)
                    }
                    (None, None) => self.unknown(e, &peer, "PINGREQ for an unknown client id"),
                }
            }
            m => match self.by_peer.get(&peer).copied() {
                Some(id) => self.on_client_message(e, id, m, now),
                None => self.unknown(e, &peer, m.name()),
            },
        }
    }

    /// A session message from an address without a client: dropped, and DISCONNECT tells the
    /// sender to CONNECT (two bytes, never more than what came).
    fn unknown(&mut self, e: &mut Engine, peer: &SnPeer, what: &str) {
        e.metrics.mqttsn_dropped += 1;
        tracing::debug!(peer = %peer.addr, what, "MQTT-SN message from an address without a client, dropped");
        self.out.send(peer, &Message::Disconnect(None));
    }

    fn publish_minus_one(
        &mut self,
        e: &mut Engine,
        peer: &SnPeer,
        topic: Topic,
        retain: bool,
        data: Bytes,
        now: Timestamp,
    ) {
        if !self.s.enable_qos3 {
            e.metrics.mqttsn_dropped += 1;
            tracing::debug!(peer = %peer.addr, "MQTT-SN QoS -1 PUBLISH dropped (mqtt.sn.enable_qos3 is off)");
            return;
        }
        let name = match topic {
            Topic::Predefined(id) | Topic::Id(id) => self.pre.by_id.get(&id).cloned(),
            Topic::Short(b) => short_name(b).filter(|n| !is_wildcard(n)),
            Topic::Name(_) => None,
        };
        let Some(name) = name else {
            e.metrics.mqttsn_dropped += 1;
            tracing::debug!(peer = %peer.addr, "MQTT-SN QoS -1 PUBLISH to an unknown topic, dropped");
            return;
        };
        match e.publish_admin(&name, data, QoS::AtMostOnce, retain, now) {
            Ok(()) => e.metrics.mqttsn_qos_minus_one += 1,
            Err(err) => {
                e.metrics.mqttsn_dropped += 1;
                tracing::debug!(peer = %peer.addr, topic = %name, error = %err, "MQTT-SN QoS -1 PUBLISH refused");
            }
        }
    }

    fn move_client(&mut self, id: ConnId, peer: SnPeer) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        tracing::debug!(client_id = %c.client_id, from = %c.peer.addr, to = %peer.addr, "MQTT-SN client moved to a new address");
        if self.by_peer.get(&c.peer) == Some(&id) {
            self.by_peer.remove(&c.peer);
        }
        // A client that was at the new address is no longer reached there; its keepalive
        // ends it.
        self.by_peer.insert(peer.clone(), id);
        c.peer = peer;
    }

    fn on_connect(&mut self, e: &mut Engine, peer: SnPeer, p: Pending, will: bool, now: Timestamp) {
        if p.client_id.is_empty() {
            // Its id is how a sleeping client wakes: it must have one.
            e.metrics.connects_refused += 1;
            tracing::debug!(peer = %peer.addr, "MQTT-SN CONNECT without a client id, refused");
            self.out.send(
                &peer,
                &Message::Connack {
                    rc: rc::NOT_SUPPORTED,
                },
            );
            return;
        }
        let here = self.by_peer.get(&peer).copied();
        let known = here.or_else(|| self.by_client_id.get(&p.client_id).copied());
        if let Some(id) = known {
            let c = &self.clients[&id];
            let same = c.client_id == p.client_id;
            match &c.phase {
                // The CONNACK is on its way: a resent CONNECT.
                Phase::Connecting if same && here == Some(id) => return,
                Phase::WillTopic(_) | Phase::WillMsg(..) if here == Some(id) => {
                    return self.start_dialogue(e, id, p, will, now);
                }
                Phase::Active | Phase::Asleep(_) | Phase::Awake(_) if same && !p.clean && !will => {
                    // Resumes where it was, with its ids and what waits for it.
                    if here != Some(id) {
                        self.move_client(id, peer);
                    }
                    let c = self.clients.get_mut(&id).expect("known");
                    c.phase = Phase::Active;
                    e.set_conn_keepalive(id, p.duration, now);
                    self.out
                        .send(&c.peer, &Message::Connack { rc: rc::ACCEPTED });
                    self.resend_all(e, id, now);
                    return self.poll_client(e, id, now);
                }
                _ => {
                    // Starts over: the old connection goes quietly, the new one finds the
                    // session as a clean or persistent reconnect would. The same client
                    // leaves no will; another one at its address (the old one is gone) does.
                    self.clients.get_mut(&id).expect("known").quiet = true;
                    let reason = if same {
                        EndReason::Normal
                    } else {
                        EndReason::Closed
                    };
                    e.close_conn(id, reason, now);
                    self.finish(e, id, now);
                }
            }
        }
        if self.clients.len() >= self.s.max_clients {
            e.metrics.mqttsn_clients_refused += 1;
            tracing::warn!(peer = %peer.addr, max = self.s.max_clients, "MQTT-SN CONNECT refused: mqtt.sn.max_clients clients known");
            self.out
                .send(&peer, &Message::Connack { rc: rc::CONGESTION });
            return;
        }
        let id = e.open_conn_with(peer.addr, self.s.listener, Sink::packets(), now);
        self.opened.push(id);
        self.by_peer.insert(peer.clone(), id);
        self.clients.insert(
            id,
            SnClient {
                conn: id,
                peer,
                phase: Phase::Connecting,
                client_id: p.client_id.clone(),
                will: None,
                will_msg: Bytes::new(),
                topics: Registry {
                    next: self.pre.first_free,
                    ..Registry::default()
                },
                waiting: VecDeque::new(),
                registering: None,
                next_reg_id: 0,
                inflight: HashMap::new(),
                up_topics: HashMap::new(),
                sub_ids: HashMap::new(),
                discarding: HashSet::new(),
                indexed: false,
                quiet: false,
                timer_at: Timestamp::NEVER,
            },
        );
        self.start_dialogue(e, id, p, will, now);
    }

    /// The will dialogue when `will`, else the CONNECT to the engine.
    fn start_dialogue(
        &mut self,
        e: &mut Engine,
        id: ConnId,
        p: Pending,
        will: bool,
        now: Timestamp,
    ) {
        let c = self.clients.get_mut(&id).expect("known");
        c.client_id = p.client_id.clone();
        if will {
            c.phase = Phase::WillTopic(p);
            self.out.send(&c.peer, &Message::WillTopicReq);
            return;
        }
        self.connect_engine(e, id, p, None, now);
    }

    fn connect_engine(
        &mut self,
        e: &mut Engine,
        id: ConnId,
        p: Pending,
        will: Option<LastWill>,
        now: Timestamp,
    ) {
        let c = self.clients.get_mut(&id).expect("known");
        c.phase = Phase::Connecting;
        let connect = Connect {
            level: ProtocolLevel::V311,
            client_id: p.client_id,
            clean_session: p.clean,
            keep_alive: p.duration,
            will,
            username: self.s.username.clone(),
            password: self.s.password.clone(),
        };
        e.handle_packet(id, Packet::Connect(Box::new(connect)), now);
        self.poll_client(e, id, now);
    }

    fn on_client_message(&mut self, e: &mut Engine, id: ConnId, m: Message, now: Timestamp) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let mut cx = Cx {
            e,
            s: &self.s,
            pre: &self.pre,
            out: &mut self.out,
            now,
        };
        let after = c.on_message(&mut cx, m);
        match after {
            After::Continue => self.poll_client(e, id, now),
            After::Connect(p, will) => self.connect_engine(e, id, p, will, now),
            After::Close(reason) => {
                e.close_conn(id, reason, now);
                self.finish(e, id, now);
            }
            After::Gone => self.finish(e, id, now),
        }
    }

    /// The engine woke connection `id`: takes what it has for the client.
    pub fn poll_conn(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        if self.clients.contains_key(&id) {
            self.poll_client(e, id, now);
        }
    }

    /// Polls every client (for a driver without per-connection wakers, and tests).
    pub fn poll_all(&mut self, e: &mut Engine, now: Timestamp) {
        let ids: Vec<ConnId> = self.clients.keys().copied().collect();
        for id in ids {
            self.poll_client(e, id, now);
        }
    }

    fn poll_client(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let mut cx = Cx {
            e,
            s: &self.s,
            pre: &self.pre,
            out: &mut self.out,
            now,
        };
        if !matches!(c.phase, Phase::Asleep(_)) {
            if let Some(packets) = cx.e.take_packets(id, now) {
                for p in packets {
                    c.on_engine(&mut cx, p);
                }
            }
        }
        if let Phase::Awake(secs) = c.phase {
            if c.delivered_all() {
                c.phase = Phase::Asleep(secs);
                cx.e.set_conn_keepalive(id, secs, now);
                cx.out.send(&c.peer, &Message::Pingresp);
            }
        }
        if c.phase == Phase::Active && !c.indexed {
            c.indexed = true;
            if let Some(old) = self.by_client_id.insert(c.client_id.clone(), id) {
                if old != id {
                    tracing::debug!(client_id = %c.client_id, "MQTT-SN client id now on another connection");
                }
            }
        }
        let closed = e.conn_status(id).is_none_or(|s| s.close);
        if closed {
            return self.finish(e, id, now);
        }
        self.arm(id);
    }

    /// Schedules the client's next retransmission if earlier than the one armed.
    fn arm(&mut self, id: ConnId) {
        let Some(due) = self.clients.get(&id).and_then(SnClient::next_due) else {
            return;
        };
        self.timers.arm(&mut self.clients, id, due);
    }

    /// Runs the retransmissions due at `now`.
    pub fn tick(&mut self, e: &mut Engine, now: Timestamp) {
        while let Some(id) = self.timers.pop_due(&mut self.clients, now) {
            let Some(c) = self.clients.get_mut(&id) else {
                continue;
            };
            let mut cx = Cx {
                e,
                s: &self.s,
                pre: &self.pre,
                out: &mut self.out,
                now,
            };
            if c.on_timer(&mut cx) {
                e.metrics.mqttsn_retries_exhausted += 1;
                tracing::debug!(client_id = %c.client_id, peer = %c.peer.addr, "MQTT-SN client does not acknowledge (mqtt.sn.max_retries), taken for lost");
                e.close_conn(id, EndReason::Closed, now);
                self.finish(e, id, now);
                continue;
            }
            self.arm(id);
        }
    }

    fn resend_all(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let mut cx = Cx {
            e,
            s: &self.s,
            pre: &self.pre,
            out: &mut self.out,
            now,
        };
        c.resend_all(&mut cx);
    }

    /// The client's connection ended (or is ending): DISCONNECT unless already said, the
    /// client forgotten, the engine told.
    fn finish(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        let Some(c) = self.clients.remove(&id) else {
            return;
        };
        if !c.quiet {
            self.out.send(&c.peer, &Message::Disconnect(None));
        }
        if self.by_peer.get(&c.peer) == Some(&id) {
            self.by_peer.remove(&c.peer);
        }
        if self.by_client_id.get(&c.client_id) == Some(&id) {
            self.by_client_id.remove(&c.client_id);
        }
        e.conn_closed(id, now);
    }

    /// The gateway stops (unloaded): every client gets DISCONNECT and its session ends as
    /// after a network error (wills published). Returns how many there were.
    pub fn close_all(&mut self, e: &mut Engine, now: Timestamp) -> usize {
        let ids: Vec<ConnId> = self.clients.keys().copied().collect();
        for &id in &ids {
            e.close_conn(id, EndReason::Closed, now);
            self.finish(e, id, now);
        }
        self.timers.clear();
        ids.len()
    }

    /// The broker stops: the engine closed every connection; forgets them without a word.
    pub fn forget_all(&mut self, e: &mut Engine, now: Timestamp) {
        for (id, _) in self.clients.drain() {
            e.conn_closed(id, now);
        }
        self.by_peer.clear();
        self.by_client_id.clear();
        self.timers.clear();
    }
}

/// What the gateway does after a client's message.
enum After {
    Continue,
    /// The will dialogue is over: CONNECT the engine.
    Connect(Pending, Option<LastWill>),
    /// The gateway closes the connection for this reason.
    Close(EndReason),
    /// The engine ended the connection (the client's DISCONNECT).
    Gone,
}

impl Armed for SnClient {
    fn armed(&mut self) -> &mut Timestamp {
        &mut self.timer_at
    }
}

impl Registry {
    fn name(&self, id: u16) -> Option<&String> {
        self.by_id.get(&id)
    }

    /// The id of `name`, registering it if it has none; `None` when the registry is full.
    fn register(&mut self, name: &str, max: usize) -> Option<u16> {
        if let Some(&id) = self.by_name.get(name) {
            return Some(id);
        }
        let id = self.reserve(max)?;
        self.by_id.insert(id, name.to_string());
        self.by_name.insert(name.to_string(), id);
        Some(id)
    }

    fn forget(&mut self, id: u16) {
        if let Some(name) = self.by_id.remove(&id) {
            self.by_name.remove(&name);
        }
    }
}

impl Resend {
    fn new(datagram: Bytes, cx: &Cx<'_>) -> Resend {
        Resend {
            datagram,
            tries: 0,
            due: cx.now.after(cx.s.retry_interval),
        }
    }
}

impl SnClient {
    fn send(&self, cx: &mut Cx<'_>, m: &Message) {
        cx.out.send(&self.peer, m);
    }

    /// Sends a datagram kept for resending.
    fn send_kept(&self, cx: &mut Cx<'_>, m: &Message) -> Bytes {
        let d = Out::encode(&self.peer, m);
        cx.out.queue.push_back((self.peer.addr, d.clone()));
        d
    }

    fn violation(&mut self, what: &str) -> After {
        tracing::debug!(client_id = %self.client_id, peer = %self.peer.addr, what, "MQTT-SN protocol error, disconnecting");
        After::Close(EndReason::ProtocolError)
    }

    /// Feeds the engine a packet from the client if it reads the connection now; otherwise
    /// the message is dropped (counted), as UDP would lose it: the client sends it again.
    fn feed(&self, cx: &mut Cx<'_>, p: Packet) -> bool {
        if !cx.e.conn_readable(self.conn) {
            cx.e.metrics.mqttsn_dropped += 1;
            tracing::debug!(client_id = %self.client_id, "MQTT-SN message dropped: the client's input is held back");
            return false;
        }
        cx.e.handle_packet(self.conn, p, cx.now);
        true
    }

    /// An acknowledgement for the engine (never held back: it frees, it does not add).
    fn ack(&self, cx: &mut Cx<'_>, p: Packet) {
        cx.e.handle_packet(self.conn, p, cx.now);
    }

    fn on_message(&mut self, cx: &mut Cx<'_>, m: Message) -> After {
        let connected = matches!(self.phase, Phase::Active | Phase::Awake(_));
        match (&self.phase, m) {
            (Phase::WillTopic(p), Message::WillTopic(None)) => {
                cx.e.conn_heard(self.conn, cx.now);
                After::Connect(p.clone(), None)
            }
            (Phase::WillTopic(p), Message::WillTopic(Some(t))) => {
                cx.e.conn_heard(self.conn, cx.now);
                self.phase = Phase::WillMsg(p.clone(), t);
                self.send(cx, &Message::WillMsgReq);
                After::Continue
            }
            (Phase::WillMsg(..), Message::WillTopic(_)) => {
                // Our WILLMSGREQ was lost.
                self.send(cx, &Message::WillMsgReq);
                After::Continue
            }
            (Phase::WillMsg(p, t), Message::WillMsg(data)) => {
                let will = LastWill {
                    topic: t.topic.as_str().into(),
                    payload: data.clone(),
                    qos: qos_to_mqtt(t.qos),
                    retain: t.retain,
                };
                let p = p.clone();
                self.will = Some(t.clone());
                self.will_msg = data;
                After::Connect(p, Some(will))
            }
            (Phase::WillTopic(_) | Phase::WillMsg(..), m) => {
                self.violation(&format!("{} during the will dialogue", m.name()))
            }
            // The engine does not read a connection it is connecting; the client will send
            // again once it has its CONNACK.
            (Phase::Connecting, _) => {
                cx.e.metrics.mqttsn_dropped += 1;
                After::Continue
            }
            (_, Message::Disconnect(Some(secs))) if secs > 0 => {
                self.send(cx, &Message::Disconnect(None));
                self.phase = Phase::Asleep(secs);
                cx.e.set_conn_keepalive(self.conn, secs, cx.now);
                tracing::debug!(client_id = %self.client_id, secs, "MQTT-SN client asleep");
                After::Continue
            }
            (_, Message::Disconnect(_)) => {
                self.send(cx, &Message::Disconnect(None));
                self.quiet = true;
                cx.e.handle_packet(self.conn, Packet::Disconnect, cx.now);
                After::Gone
            }
            (Phase::Asleep(secs), Message::Pingreq(Some(cid))) if cid == self.client_id => {
                let secs = *secs;
                self.phase = Phase::Awake(secs);
                cx.e.set_conn_keepalive(self.conn, secs, cx.now);
                self.resend_all(cx);
                After::Continue
            }
            (Phase::Asleep(_) | Phase::Awake(_), Message::Pingreq(_)) => {
                // Without its client id a sleeping client's PINGREQ is not a wake-up; awake,
                // the PINGRESP comes once it has what waited.
                cx.e.conn_heard(self.conn, cx.now);
                After::Continue
            }
            (Phase::Asleep(_), m) => self.violation(&format!("{} while asleep", m.name())),
            (_, Message::Pingreq(_)) => {
                self.feed(cx, Packet::Pingreq);
                After::Continue
            }
            (
                _,
                Message::Register {
                    msg_id, topic_name, ..
                },
            ) => {
                cx.e.conn_heard(self.conn, cx.now);
                let (topic_id, code) = if topic_name.is_empty() || is_wildcard(&topic_name) {
                    (0, rc::NOT_SUPPORTED)
                } else if let Some(&id) = cx.pre.by_name.get(&topic_name) {
                    (id, rc::ACCEPTED)
                } else {
                    match self
                        .topics
                        .register(&topic_name, cx.s.max_registered_topics)
                    {
                        Some(id) => (id, rc::ACCEPTED),
                        None => (0, rc::NOT_SUPPORTED),
                    }
                };
                self.send(
                    cx,
                    &Message::Regack {
                        topic_id,
                        msg_id,
                        rc: code,
                    },
                );
                After::Continue
            }
            (
                _,
                Message::Regack {
                    topic_id,
                    msg_id,
                    rc: code,
                },
            ) => {
                cx.e.conn_heard(self.conn, cx.now);
                self.on_regack(cx, topic_id, msg_id, code);
                After::Continue
            }
            (
                _,
                Message::Publish {
                    qos,
                    retain,
                    topic,
                    msg_id,
                    data,
                    dup,
                },
            ) => self.on_publish(cx, dup, qos, retain, topic, msg_id, data),
            (
                _,
                Message::Puback {
                    msg_id, rc: code, ..
                },
            ) => {
                self.on_puback(cx, msg_id, code);
                After::Continue
            }
            (_, Message::Pubrec(msg_id)) => {
                match self.inflight.get(&msg_id).map(|o| o.stage) {
                    Some(Stage::Pubrec) => self.ack(cx, Packet::Pubrec(msg_id)),
                    Some(Stage::Pubcomp) => {
                        // Our PUBREL was lost.
                        self.send(cx, &Message::Pubrel(msg_id));
                        cx.e.conn_heard(self.conn, cx.now);
                    }
                    _ => cx.e.conn_heard(self.conn, cx.now),
                }
                After::Continue
            }
            (_, Message::Pubcomp(msg_id)) => {
                if self
                    .inflight
                    .get(&msg_id)
                    .is_some_and(|o| o.stage == Stage::Pubcomp)
                {
                    self.inflight.remove(&msg_id);
                    self.ack(cx, Packet::Pubcomp(msg_id));
                } else {
                    cx.e.conn_heard(self.conn, cx.now);
                }
                After::Continue
            }
            (_, Message::Pubrel(msg_id)) => {
                self.ack(cx, Packet::Pubrel(msg_id));
                After::Continue
            }
            (
                _,
                Message::Subscribe {
                    qos, msg_id, topic, ..
                },
            ) => {
                self.on_subscribe(cx, qos, msg_id, topic);
                After::Continue
            }
            (_, Message::Unsubscribe { msg_id, topic }) => {
                let name = match topic {
                    Topic::Name(n) => Some(n),
                    Topic::Predefined(id) | Topic::Id(id) => cx.pre.by_id.get(&id).cloned(),
                    Topic::Short(b) => short_name(b),
                };
                match name {
                    Some(n) => {
                        self.feed(
                            cx,
                            Packet::Unsubscribe(Unsubscribe {
                                packet_id: msg_id,
                                filters: vec![n],
                            }),
                        );
                    }
                    None => self.send(cx, &Message::Unsuback(msg_id)),
                }
                After::Continue
            }
            (_, Message::WillTopicUpd(t)) if connected => {
                cx.e.conn_heard(self.conn, cx.now);
                let code = match &t {
                    None => {
                        cx.e.set_conn_will(self.conn, None);
                        rc::ACCEPTED
                    }
                    Some(t) => {
                        let will = LastWill {
                            topic: t.topic.as_str().into(),
                            payload: self.will_msg.clone(),
                            qos: qos_to_mqtt(t.qos),
                            retain: t.retain,
                        };
                        if cx.e.set_conn_will(self.conn, Some(will)) {
                            rc::ACCEPTED
                        } else {
                            rc::NOT_SUPPORTED
                        }
                    }
                };
                if code == rc::ACCEPTED {
                    self.will = t;
                }
                self.send(cx, &Message::WillTopicResp(code));
                After::Continue
            }
            (_, Message::WillMsgUpd(data)) if connected => {
                cx.e.conn_heard(self.conn, cx.now);
                self.will_msg = data;
                if let Some(t) = &self.will {
                    let will = LastWill {
                        topic: t.topic.as_str().into(),
                        payload: self.will_msg.clone(),
                        qos: qos_to_mqtt(t.qos),
                        retain: t.retain,
                    };
                    cx.e.set_conn_will(self.conn, Some(will));
                }
                self.send(cx, &Message::WillMsgResp(rc::ACCEPTED));
                After::Continue
            }
            // A WILLTOPIC or WILLMSG the client resent after the dialogue: ours arrived.
            (_, Message::WillTopic(_) | Message::WillMsg(_)) => {
                cx.e.conn_heard(self.conn, cx.now);
                After::Continue
            }
            (_, m) => self.violation(&format!("{} from a client", m.name())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_publish(
        &mut self,
        cx: &mut Cx<'_>,
        dup: bool,
        qos: Qos,
        retain: bool,
        topic: Topic,
        msg_id: u16,
        data: Bytes,
    ) -> After {
        let qos = qos_to_mqtt(qos);
        let (name, topic_id) = match topic {
            // A normal id may also be a predefined one (clients that do not tell them apart).
            Topic::Id(id) => (
                self.topics
                    .name(id)
                    .or_else(|| cx.pre.by_id.get(&id))
                    .cloned(),
                id,
            ),
            Topic::Predefined(id) => (cx.pre.by_id.get(&id).cloned(), id),
            Topic::Short(b) => match short_name(b) {
                Some(n) if !is_wildcard(&n) => (Some(n), short_id(b)),
                _ => {
                    if qos != QoS::AtMostOnce {
                        self.send(
                            cx,
                            &Message::Puback {
                                topic_id: short_id(b),
                                msg_id,
                                rc: rc::NOT_SUPPORTED,
                            },
                        );
                    }
                    cx.e.metrics.mqttsn_dropped += 1;
                    return After::Continue;
                }
            },
            Topic::Name(_) => return self.violation("PUBLISH with a topic name"),
        };
        let Some(name) = name else {
            cx.e.metrics.mqttsn_dropped += 1;
            tracing::debug!(client_id = %self.client_id, topic_id, "MQTT-SN PUBLISH to an unknown topic id");
            if qos != QoS::AtMostOnce {
                self.send(
                    cx,
                    &Message::Puback {
                        topic_id,
                        msg_id,
                        rc: rc::INVALID_TOPIC_ID,
                    },
                );
            }
            return After::Continue;
        };
        if qos != QoS::AtMostOnce && msg_id == 0 {
            return self.violation("QoS 1 or 2 PUBLISH with MsgId 0");
        }
        if qos == QoS::AtLeastOnce {
            self.up_topics.insert(msg_id, topic_id);
        }
        let publish = Publish {
            dup,
            qos,
            retain,
            topic: name.as_str().into(),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { msg_id },
            payload: data,
        };
        let n = publish.payload.len() + name.len();
        if self.feed(cx, Packet::Publish(publish)) {
            cx.e.charge_input(self.conn, true, n, cx.now);
        } else {
            self.up_topics.remove(&msg_id);
        }
        After::Continue
    }

    fn on_subscribe(&mut self, cx: &mut Cx<'_>, qos: Qos, msg_id: u16, topic: Topic) {
        let refuse = |c: &Self, cx: &mut Cx<'_>, code| {
            c.send(
                cx,
                &Message::Suback {
                    qos: Qos::AtMostOnce,
                    topic_id: 0,
                    msg_id,
                    rc: code,
                },
            )
        };
        let (name, topic_id) = match topic {
            Topic::Name(n) if n.is_empty() => return refuse(self, cx, rc::NOT_SUPPORTED),
            Topic::Name(n) if is_wildcard(&n) => (n, 0),
            Topic::Name(n) => match cx.pre.by_name.get(&n) {
                Some(&id) => (n, id),
                None => match self.topics.register(&n, cx.s.max_registered_topics) {
                    Some(id) => (n, id),
                    None => return refuse(self, cx, rc::INVALID_TOPIC_ID),
                },
            },
            Topic::Predefined(id) | Topic::Id(id) => match cx.pre.by_id.get(&id) {
                Some(n) => (n.clone(), id),
                None => return refuse(self, cx, rc::INVALID_TOPIC_ID),
            },
            Topic::Short(b) => match short_name(b) {
                Some(n) => (n, 0),
                None => return refuse(self, cx, rc::NOT_SUPPORTED),
            },
        };
        self.sub_ids.insert(msg_id, topic_id);
        let sent = self.feed(
            cx,
            Packet::Subscribe(Subscribe {
                packet_id: msg_id,
                filters: vec![(name, qos_to_mqtt(qos))],
            }),
        );
        if !sent {
            self.sub_ids.remove(&msg_id);
        }
    }

    fn on_regack(&mut self, cx: &mut Cx<'_>, topic_id: u16, msg_id: u16, code: u8) {
        let Some(r) = &mut self.registering else {
            return;
        };
        if r.msg_id != msg_id {
            return;
        }
        match code {
            rc::ACCEPTED => {
                let r = self.registering.take().expect("registering");
                // The id is ours to give; a client that answers another is taken at its word.
                let id = if topic_id == 0 { r.topic_id } else { topic_id };
                self.topics.by_id.insert(id, r.name.clone());
                self.topics.by_name.insert(r.name, id);
            }
            rc::CONGESTION => {
                // Later: the retransmission timer sends it again.
                r.resend.due = cx.now.after(cx.s.retry_interval);
                return;
            }
            _ => {
                let r = self.registering.take().expect("registering");
                tracing::debug!(client_id = %self.client_id, topic = %r.name, code, "MQTT-SN client refused the gateway's REGISTER; its deliveries on that topic are dropped");
                let waiting = std::mem::take(&mut self.waiting);
                for p in waiting {
                    if *p.topic == *r.name {
                        self.discard(cx, p);
                    } else {
                        self.waiting.push_back(p);
                    }
                }
            }
        }
        self.flush_waiting(cx);
    }

    fn on_puback(&mut self, cx: &mut Cx<'_>, msg_id: u16, code: u8) {
        let Some(o) = self.inflight.get_mut(&msg_id) else {
            cx.e.conn_heard(self.conn, cx.now);
            return;
        };
        if o.stage == Stage::Pubcomp {
            cx.e.conn_heard(self.conn, cx.now);
            return;
        }
        match code {
            rc::ACCEPTED if o.stage == Stage::Puback => {
                self.inflight.remove(&msg_id);
                self.ack(cx, Packet::Puback(msg_id));
            }
            rc::CONGESTION => {
                o.resend.due = cx.now.after(cx.s.retry_interval);
                cx.e.conn_heard(self.conn, cx.now);
            }
            rc::INVALID_TOPIC_ID => {
                // The client does not know the id: register the name again, then resend.
                cx.e.conn_heard(self.conn, cx.now);
                let o = self.inflight.remove(&msg_id).expect("inflight");
                let name = o.publish.topic.to_string();
                match self.topics.by_name.get(&name).copied() {
                    Some(id) => {
                        self.topics.forget(id);
                        let mut p = o.publish;
                        p.dup = true;
                        self.waiting.push_front(p);
                        if self.registering.is_none() {
                            self.flush_waiting(cx);
                        }
                    }
                    None => self.discard(cx, o.publish),
                }
            }
            _ => {
                cx.e.conn_heard(self.conn, cx.now);
                let o = self.inflight.remove(&msg_id).expect("inflight");
                self.discard(cx, o.publish);
            }
        }
    }

    /// A delivery the client cannot be given: counted, and acknowledged to the engine so its
    /// window moves on.
    fn discard(&mut self, cx: &mut Cx<'_>, p: Publish) {
        cx.e.metrics.mqttsn_undeliverable += 1;
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.ack(cx, Packet::Puback(p.packet_id)),
            QoS::ExactlyOnce => {
                self.discarding.insert(p.packet_id);
                self.ack(cx, Packet::Pubrec(p.packet_id));
            }
        }
    }

    /// A packet the engine has for the client.
    fn on_engine(&mut self, cx: &mut Cx<'_>, p: Packet) {
        match p {
            Packet::Connack(Connack {
                code: ConnectReturnCode::Accepted,
                ..
            }) if self.phase == Phase::Connecting => {
                self.phase = Phase::Active;
                self.send(cx, &Message::Connack { rc: rc::ACCEPTED });
            }
            Packet::Connack(c) => {
                tracing::debug!(client_id = %self.client_id, code = ?c.code, "MQTT-SN client refused");
                let code = match c.code {
                    ConnectReturnCode::ServerUnavailable => rc::CONGESTION,
                    _ => rc::NOT_SUPPORTED,
                };
                self.quiet = true;
                self.send(cx, &Message::Connack { rc: code });
            }
            Packet::Publish(p) => self.deliver(cx, p),
            Packet::Puback(pid) => {
                let topic_id = self.up_topics.remove(&pid).unwrap_or(0);
                self.send(
                    cx,
                    &Message::Puback {
                        topic_id,
                        msg_id: pid,
                        rc: rc::ACCEPTED,
                    },
                );
            }
            Packet::Pubrec(pid) => self.send(cx, &Message::Pubrec(pid)),
            Packet::Pubcomp(pid) => self.send(cx, &Message::Pubcomp(pid)),
            Packet::Pubrel(pid) => {
                if self.discarding.remove(&pid) {
                    return self.ack(cx, Packet::Pubcomp(pid));
                }
                if self
                    .inflight
                    .get(&pid)
                    .is_some_and(|o| o.stage == Stage::Pubcomp)
                {
                    // The session resending a PUBREL the gateway already resends.
                    return;
                }
                let d = self.send_kept(cx, &Message::Pubrel(pid));
                let resend = Resend::new(d, cx);
                match self.inflight.get_mut(&pid) {
                    Some(o) => {
                        o.stage = Stage::Pubcomp;
                        o.resend = resend;
                    }
                    None => {
                        // A PUBREL the session resends after a reconnect.
                        self.inflight.insert(
                            pid,
                            Outgoing {
                                publish: Publish {
                                    dup: false,
                                    qos: QoS::ExactlyOnce,
                                    retain: false,
                                    topic: "".into(),
                                    packet_id: pid,
                                    payload: Bytes::new(),
                                },
                                stage: Stage::Pubcomp,
                                resend,
                            },
                        );
                    }
                }
            }
            Packet::Suback(s) => {
                let topic_id = self.sub_ids.remove(&s.packet_id).unwrap_or(0);
                let (qos, code) = match s.codes.first() {
                    Some(SubackCode::Granted(q)) => (qos_to_sn(*q), rc::ACCEPTED),
                    _ => (Qos::AtMostOnce, rc::NOT_SUPPORTED),
                };
                self.send(
                    cx,
                    &Message::Suback {
                        qos,
                        topic_id,
                        msg_id: s.packet_id,
                        rc: code,
                    },
                );
            }
            Packet::Unsuback(pid) => self.send(cx, &Message::Unsuback(pid)),
            Packet::Pingresp => self.send(cx, &Message::Pingresp),
            _ => {}
        }
    }

    /// A delivery from the engine: sent, or held behind a registration.
    fn deliver(&mut self, cx: &mut Cx<'_>, p: Publish) {
        if self.registering.is_some() || !self.waiting.is_empty() {
            return self.waiting.push_back(p);
        }
        if let Err(p) = self.try_send(cx, p) {
            self.waiting.push_front(p);
        }
    }

    /// Sends the deliveries held while nothing is being registered.
    fn flush_waiting(&mut self, cx: &mut Cx<'_>) {
        while self.registering.is_none() {
            let Some(p) = self.waiting.pop_front() else {
                return;
            };
            if let Err(p) = self.try_send(cx, p) {
                self.waiting.push_front(p);
                return;
            }
        }
    }

    /// Sends `p`, or starts registering its topic and gives it back.
    fn try_send(&mut self, cx: &mut Cx<'_>, p: Publish) -> Result<(), Publish> {
        if p.qos != QoS::AtMostOnce && self.inflight.contains_key(&p.packet_id) {
            // The session resending (`mqtt.retry_interval`) what the gateway is already
            // resending on its own clock, whose count of tries must go on.
            return Ok(());
        }
        let name: &str = &p.topic;
        let topic = if let Some(&id) = cx.pre.by_name.get(name) {
            Topic::Predefined(id)
        } else if let Some(&id) = self.topics.by_name.get(name) {
            Topic::Id(id)
        } else if name.len() == 2 {
            let b = name.as_bytes();
            Topic::Short([b[0], b[1]])
        } else {
            let Some(topic_id) = self.topics.reserve(cx.s.max_registered_topics) else {
                tracing::debug!(client_id = %self.client_id, topic = name, "MQTT-SN client's topic registry full (mqtt.sn.max_registered_topics): delivery dropped");
                self.discard(cx, p);
                return Ok(());
            };
            self.next_reg_id = self.next_reg_id.wrapping_add(1).max(1);
            let msg_id = self.next_reg_id;
            let name = name.to_string();
            let d = self.send_kept(
                cx,
                &Message::Register {
                    topic_id,
                    msg_id,
                    topic_name: name.clone(),
                },
            );
            self.registering = Some(Registering {
                topic_id,
                msg_id,
                name,
                resend: Resend::new(d, cx),
            });
            return Err(p);
        };
        let m = Message::Publish {
            dup: p.dup,
            qos: qos_to_sn(p.qos),
            retain: p.retain,
            topic,
            msg_id: p.packet_id,
            data: p.payload.clone(),
        };
        let d = Out::encode(&self.peer, &m);
        if d.len() > MAX_DATAGRAM {
            tracing::debug!(client_id = %self.client_id, bytes = d.len(), "delivery too large for an MQTT-SN datagram, dropped");
            self.discard(cx, p);
            return Ok(());
        }
        cx.out.queue.push_back((self.peer.addr, d));
        if p.qos != QoS::AtMostOnce {
            // Resent with DUP set.
            let mut again = m;
            if let Message::Publish { dup, .. } = &mut again {
                *dup = true;
            }
            let resend = Resend::new(Out::encode(&self.peer, &again), cx);
            let stage = match p.qos {
                QoS::AtLeastOnce => Stage::Puback,
                _ => Stage::Pubrec,
            };
            self.inflight.insert(
                p.packet_id,
                Outgoing {
                    publish: p,
                    stage,
                    resend,
                },
            );
        }
        Ok(())
    }

    /// Nothing waits for the client nor for its acknowledgement.
    fn delivered_all(&self) -> bool {
        self.inflight.is_empty() && self.registering.is_none() && self.waiting.is_empty()
    }

    fn next_due(&self) -> Option<Timestamp> {
        let reg = self.registering.as_ref().map(|r| r.resend.due);
        let inflight = self.inflight.values().map(|o| o.resend.due).min();
        match (reg, inflight) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sends again what is due; `true` when something has gone unanswered too often.
    fn on_timer(&mut self, cx: &mut Cx<'_>) -> bool {
        let now = cx.now;
        let retry = cx.s.retry_interval;
        if matches!(self.phase, Phase::Asleep(_)) {
            // Nothing reaches a sleeping client: try again once it wakes.
            for r in self.resends_mut() {
                if r.due <= now {
                    r.due = now.after(retry);
                }
            }
            return false;
        }
        let max = cx.s.max_retries;
        let mut sent = Vec::new();
        let mut lost = false;
        for r in self.resends_mut() {
            if r.due > now {
                continue;
            }
            if r.tries >= max {
                lost = true;
                break;
            }
            r.tries += 1;
            r.due = now.after(retry);
            sent.push(r.datagram.clone());
        }
        if lost {
            return true;
        }
        cx.e.metrics.mqttsn_retransmits += sent.len() as u64;
        for d in sent {
            cx.out.queue.push_back((self.peer.addr, d));
        }
        false
    }

    /// Sends again everything unacknowledged now (a sleeping client woke, or reconnected).
    fn resend_all(&mut self, cx: &mut Cx<'_>) {
        let due = cx.now.after(cx.s.retry_interval);
        let mut sent = Vec::new();
        for r in self.resends_mut() {
            r.due = due;
            sent.push(r.datagram.clone());
        }
        cx.e.metrics.mqttsn_retransmits += sent.len() as u64;
        for d in sent {
            cx.out.queue.push_back((self.peer.addr, d));
        }
    }

    fn resends_mut(&mut self) -> impl Iterator<Item = &mut Resend> {
        self.registering
            .iter_mut()
            .map(|r| &mut r.resend)
            .chain(self.inflight.values_mut().map(|o| &mut o.resend))
    }
}

impl Registry {
    /// An id for a registration the gateway starts, unless the registry is full.
    fn reserve(&mut self, max: usize) -> Option<u16> {
        if self.by_id.len() >= max || self.next == 0xFFFF || self.next == 0 {
            return None;
        }
        self.next += 1;
        Some(self.next - 1)
    }
}
