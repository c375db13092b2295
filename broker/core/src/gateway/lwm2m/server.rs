//! The LwM2M server (sans-IO): every endpoint of one UDP socket (or DTLS layer), their
//! registrations, and the CoAP exchanges that carry MQTT commands to them.
//!
//! **Registration.** `POST /rd?ep=…&lt=…&lwm2m=…&b=…` with the object list opens an engine
//! connection for the endpoint (client id = endpoint name, `proto_name` `LwM2M`), which
//! subscribes to its command topic; once the subscription is everywhere the gateway
//! publishes the register event and answers 2.01 with the registration's Location (an
//! opaque id, not the endpoint name, so that another host cannot guess it). Update (`POST` to
//! the location) refreshes the lifetime and follows a device that comes from a new address;
//! De-register (`DELETE`) ends it; a registration past its lifetime ends too.
//!
//! **Commands.** JSON on the command topic ([`super::command`]) becomes a confirmable CoAP
//! request, one at a time per endpoint (CoAP's NSTART of 1), the rest queued (bounded).
//! Unacknowledged requests are sent again after `ack_timeout`, doubling, `max_retransmit`
//! times, then answered 5.04. Replies come piggybacked or separately; large ones block by
//! block (Block2). Reads and observes ask for SenML CBOR (LwM2M 1.1) or TLV (1.0) and, on
//! 4.06, the other formats in turn (SenML JSON, TLV, no Accept), remembering per endpoint
//! what worked; writes pick the format the same way and try the next one on 4.15. Observe
//! notifications go to the notify topic with their sequence number.
//!
//! **Queue mode** (`b=UQ`, or `Q` in LwM2M 1.1): the device listens only for
//! `qmode_time_window` after it last sent something; commands that arrive later wait for its
//! next message (an Update, usually).
//!
//! Incoming confirmable requests are answered once: a retransmission gets the same answer
//! again from a bounded cache. Datagrams that are not CoAP are dropped and counted.

use super::coap::{self, code, Code};
use super::command::{self, Command, Op};
use super::registry::Registry;
use crate::engine::{ConnId, EndReason, Engine};
use crate::gateway::{Armed, Deadlines};
use crate::sink::Sink;
use crate::time::Timestamp;
use bytes::Bytes;
use serde_json::{json, Map, Value as Json};
use shardmq_protocol::lwm2m::coap_lite::{CoapOption, MessageClass, MessageType, Packet};
use shardmq_protocol::lwm2m::{self, format, link, Path};
use shardmq_protocol::mqtt::{
    Connack, Connect, ConnectReturnCode, Packet as Mqtt, ProtocolLevel, Publish, QoS, SubackCode,
    Subscribe,
};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long an answered confirmable request is remembered (RFC 7252's EXCHANGE_LIFETIME).
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// Answers remembered at most, all peers together (the oldest forgotten first).
const MAX_REMEMBERED: usize = 65_536;
/// A request payload larger than this goes block by block (Block1, RFC 7959), in blocks
/// of this size: what fits a datagram on any link LwM2M runs over.
const BLOCK1_SIZE: usize = 1024;

/// The MQTT topics of an endpoint (`%e`: its name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lwm2mTopics {
    /// Commands to the endpoint (`lwm2m/%e/command`).
    pub command: String,
    /// Responses to commands (`lwm2m/%e/response`).
    pub response: String,
    /// Observe notifications (`lwm2m/%e/notify`).
    pub notify: String,
    /// Register events (`lwm2m/%e/register`).
    pub register: String,
    /// Update events (`lwm2m/%e/update`).
    pub update: String,
}

/// The settings of the LwM2M gateway (`lwm2m.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lwm2mSettings {
    /// The engine listener number its endpoints are counted under.
    pub listener: u16,
    /// Shortest lifetime accepted (seconds).
    pub lifetime_min: u32,
    /// Longest lifetime accepted (seconds).
    pub lifetime_max: u32,
    /// How long a queue-mode device listens after it sent something.
    pub qmode_time_window: Duration,
    /// Observe the device's object instances once it registered.
    pub auto_observe: bool,
    /// The topics.
    pub topics: Lwm2mTopics,
    /// Publish an update event for every Update (else only for those with an object list).
    pub update_always: bool,
    /// CoAP ACK_TIMEOUT: the first wait for an acknowledgement.
    pub ack_timeout: Duration,
    /// CoAP MAX_RETRANSMIT.
    pub max_retransmit: u32,
    /// Endpoints registered (or registering) at once; more get 5.03.
    pub max_endpoints: usize,
    /// Commands waiting per endpoint (queue mode, or behind the one in flight).
    pub max_queued: usize,
    /// Largest reply assembled from blocks.
    pub max_payload: usize,
    /// Mixed into tokens and locations, so that they cannot be guessed (the runtime gives a
    /// random one).
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The engine has the CONNECT.
    Connecting,
    /// Accepted; the command topic's subscription is on its way.
    Subscribing,
    /// 2.01 sent.
    Registered,
}

/// The request a registration answers once the broker took the endpoint.
#[derive(Debug, Clone)]
struct RegisterReply {
    request: Packet,
}

/// A command to send (an MQTT one, or the gateway's own auto-observe).
#[derive(Debug, Clone)]
struct Job {
    cmd: Command,
}

/// The request in flight for an endpoint.
#[derive(Debug)]
struct Exchange {
    job: Job,
    token: Vec<u8>,
    msg_id: u16,
    datagram: Bytes,
    tries: u32,
    wait: Duration,
    due: Timestamp,
    /// The empty ACK came: the answer follows separately.
    acked: bool,
    /// The format asked (Accept) or sent (Content-Format), and those left to try.
    format: Option<u16>,
    untried: Vec<Option<u16>>,
    /// Blocks received so far.
    blocks: Vec<u8>,
    next_block: u32,
    /// The device accepted the observation (its first reply carried Observe).
    observing: bool,
    /// A payload sent block by block: all of it, the block size, the next block's number.
    upload: Option<(Vec<u8>, usize, u32)>,
}

#[derive(Debug, Clone)]
struct Observation {
    path: Path,
    original: Map<String, Json>,
}

#[derive(Debug)]
struct Endpoint {
    name: String,
    location: String,
    peer: SocketAddr,
    phase: Phase,
    reply: Option<RegisterReply>,
    lifetime: u32,
    version: String,
    binding: String,
    sms: Option<String>,
    queue: bool,
    /// The registration's `Q` parameter (LwM2M 1.1 queue mode, kept by Updates).
    q_param: bool,
    /// Path prefix on the device (empty for `/`).
    alternate: String,
    objects: Vec<Path>,
    expires_at: Timestamp,
    awake_until: Timestamp,
    waiting: VecDeque<Job>,
    active: Option<Exchange>,
    observes: HashMap<Vec<u8>, Observation>,
    /// The format reads last succeeded with (`Some(None)`: without Accept).
    read_format: Option<Option<u16>>,
    timer_at: Timestamp,
    quiet: bool,
}

impl Armed for Endpoint {
    fn armed(&mut self) -> &mut Timestamp {
        &mut self.timer_at
    }
}

impl Endpoint {
    fn info(&self) -> Json {
        let mut d = Map::new();
        d.insert("ep".into(), json!(self.name));
        d.insert("lt".into(), json!(self.lifetime));
        d.insert("lwm2m".into(), json!(self.version));
        d.insert("b".into(), json!(self.binding));
        if let Some(s) = &self.sms {
            d.insert("sms".into(), json!(s));
        }
        let alt = if self.alternate.is_empty() {
            "/"
        } else {
            &self.alternate
        };
        d.insert("alternatePath".into(), json!(alt));
        d.insert(
            "objectList".into(),
            json!(self.objects.iter().map(Path::to_string).collect::<Vec<_>>()),
        );
        Json::Object(d)
    }

    fn v11(&self) -> bool {
        self.version != "1.0"
    }

    /// Formats to ask a read in, most likely first.
    fn read_formats(&self) -> Vec<Option<u16>> {
        let first = if self.v11() {
            Some(format::SENML_CBOR)
        } else {
            Some(format::TLV)
        };
        let mut v = Vec::new();
        if let Some(f) = self.read_format {
            v.push(f);
        }
        for f in [first, Some(format::SENML_JSON), Some(format::TLV), None] {
            if !v.contains(&f) {
                v.push(f);
            }
        }
        v
    }

    /// Formats to write in, most likely first.
    fn write_formats(&self) -> Vec<Option<u16>> {
        let mut v = Vec::new();
        if let Some(Some(f)) = self.read_format {
            if f != format::TEXT && f != format::OPAQUE {
                v.push(Some(f));
            }
        }
        let order = if self.v11() {
            [format::SENML_CBOR, format::SENML_JSON, format::TLV]
        } else {
            [format::TLV, format::SENML_JSON, format::SENML_CBOR]
        };
        for f in order {
            if !v.contains(&Some(f)) {
                v.push(Some(f));
            }
        }
        v
    }

    fn uri(&self, p: &Path) -> Vec<String> {
        self.alternate
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .chain(p.ids().iter().map(u16::to_string))
            .collect()
    }
}

/// Every LwM2M endpoint of one socket.
#[derive(Debug)]
pub struct Lwm2mGateway {
    s: Lwm2mSettings,
    registry: Arc<Registry>,
    endpoints: HashMap<ConnId, Endpoint>,
    by_location: HashMap<String, ConnId>,
    by_name: HashMap<String, ConnId>,
    by_peer: HashMap<SocketAddr, ConnId>,
    by_token: HashMap<Vec<u8>, ConnId>,
    remembered: HashMap<(SocketAddr, u16), Option<Bytes>>,
    remembered_order: VecDeque<(Timestamp, SocketAddr, u16)>,
    timers: Deadlines,
    out: VecDeque<(SocketAddr, Bytes)>,
    opened: Vec<ConnId>,
    next_msg_id: u16,
    counter: u64,
}

fn expand(pattern: &str, ep: &str) -> String {
    pattern.replace("%e", ep)
}

impl Lwm2mGateway {
    /// A gateway with these settings and object definitions, and no endpoint.
    pub fn new(s: Lwm2mSettings, registry: Arc<Registry>) -> Lwm2mGateway {
        let next_msg_id = (s.seed >> 16) as u16;
        Lwm2mGateway {
            s,
            registry,
            endpoints: HashMap::new(),
            by_location: HashMap::new(),
            by_name: HashMap::new(),
            by_peer: HashMap::new(),
            by_token: HashMap::new(),
            remembered: HashMap::new(),
            remembered_order: VecDeque::new(),
            timers: Deadlines::default(),
            out: VecDeque::new(),
            opened: Vec::new(),
            next_msg_id,
            counter: 0,
        }
    }

    /// Endpoints registered or registering.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Connections opened since the last call (the driver registers its waker on each).
    pub fn take_opened(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.opened)
    }

    /// The next datagram to send.
    pub fn pop_datagram(&mut self, e: &mut Engine) -> Option<(SocketAddr, Bytes)> {
        let d = self.out.pop_front()?;
        e.metrics.lwm2m_datagrams_sent += 1;
        Some(d)
    }

    /// When [`Lwm2mGateway::tick`] has work.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.timers.next()
    }

    /// The address the endpoint named `name` is reached at, if registered.
    pub fn endpoint_peer(&self, name: &str) -> Option<SocketAddr> {
        let id = self.by_name.get(name)?;
        self.endpoints.get(id).map(|ep| ep.peer)
    }

    fn msg_id(&mut self) -> u16 {
        self.next_msg_id = self.next_msg_id.wrapping_add(1);
        self.next_msg_id
    }

    /// 8 bytes no other host can predict without the seed.
    fn unique(&mut self) -> u64 {
        self.counter += 1;
        // SplitMix64 of the seeded counter.
        let mut z = self
            .s
            .seed
            .wrapping_add(self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn send(&mut self, to: SocketAddr, p: &Packet) -> Bytes {
        let d = Bytes::from(coap::encode(p));
        self.out.push_back((to, d.clone()));
        d
    }

    /// Sends `reply` to the confirmable request `req` from `from` and remembers it for the
    /// request's retransmissions.
    fn answer(&mut self, from: SocketAddr, req: &Packet, reply: &Packet, now: Timestamp) {
        let d = self.send(from, reply);
        if req.header.get_type() == MessageType::Confirmable {
            self.remember(from, req.header.message_id, Some(d), now);
        }
    }

    fn remember(&mut self, from: SocketAddr, id: u16, reply: Option<Bytes>, now: Timestamp) {
        if self.remembered.insert((from, id), reply).is_none() {
            self.remembered_order.push_back((now, from, id));
        }
        while self.remembered_order.len() > MAX_REMEMBERED
            || self
                .remembered_order
                .front()
                .is_some_and(|(t, ..)| now.since(*t) > EXCHANGE_LIFETIME)
        {
            if let Some((_, f, i)) = self.remembered_order.pop_front() {
                self.remembered.remove(&(f, i));
            }
        }
    }

    /// A datagram from `from`; `vouched` is the identity its DTLS session authenticated (a
    /// PSK identity or a certificate's name), which becomes the endpoint's username.
    pub fn handle_datagram(
        &mut self,
        e: &mut Engine,
        from: SocketAddr,
        data: &[u8],
        vouched: Option<&str>,
        now: Timestamp,
    ) {
        e.metrics.lwm2m_datagrams_received += 1;
        let p = match coap::parse(data) {
            Ok(p) => p,
            Err(why) => {
                e.metrics.lwm2m_bad_datagrams += 1;
                tracing::debug!(%from, why, "not a CoAP message, dropped");
                return;
            }
        };
        let kind = p.header.get_type();
        let c = coap::code_of(&p);
        match (kind, p.header.code) {
            // A CoAP ping: RST.
            (MessageType::Confirmable, MessageClass::Empty) => {
                let rst = coap::empty(MessageType::Reset, p.header.message_id);
                self.send(from, &rst);
            }
            (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Request(_)) => {
                if kind == MessageType::Confirmable {
                    match self.remembered.get(&(from, p.header.message_id)) {
                        Some(Some(reply)) => {
                            let reply = reply.clone();
                            self.out.push_back((from, reply));
                            return;
                        }
                        // Still being answered (a registration waits for the broker).
                        Some(None) => return,
                        None => {}
                    }
                }
                self.on_request(e, from, &p, c, vouched, now);
            }
            (MessageType::Acknowledgement, MessageClass::Empty) => {
                self.on_empty_ack(e, from, p.header.message_id, now);
            }
            (MessageType::Reset, _) => self.on_reset(e, from, p.header.message_id, now),
            (_, MessageClass::Response(_)) => self.on_response(e, from, &p, now),
            _ => {
                e.metrics.lwm2m_bad_datagrams += 1;
                tracing::debug!(%from, code = c, "CoAP message of no use to a server, dropped");
            }
        }
    }

    fn on_request(
        &mut self,
        e: &mut Engine,
        from: SocketAddr,
        req: &Packet,
        method: Code,
        vouched: Option<&str>,
        now: Timestamp,
    ) {
        let path = coap::uri_path(req);
        let refuse = |gw: &mut Self, e: &mut Engine, c: Code, why: &str| {
            tracing::debug!(%from, code = %coap::code_text(c), why, "LwM2M request refused");
            if path.first().is_some_and(|s| s == "rd") && method == code::POST && path.len() == 1 {
                e.metrics.lwm2m_registrations_refused += 1;
            }
            let reply = coap::response(req, c);
            gw.answer(from, req, &reply, now);
        };
        match (method, path.as_slice()) {
            (code::POST, [rd]) if rd == "rd" => self.register(e, from, req, vouched, now),
            (code::POST, [rd, loc]) if rd == "rd" => match self.by_location.get(loc).copied() {
                Some(id) => self.update(e, id, from, req, now),
                None => refuse(self, e, code::NOT_FOUND, "no such registration"),
            },
            (code::DELETE, [rd, loc]) if rd == "rd" => match self.by_location.get(loc).copied() {
                Some(id) => {
                    let reply = coap::response(req, code::DELETED);
                    self.answer(from, req, &reply, now);
                    if let Some(ep) = self.endpoints.get_mut(&id) {
                        ep.quiet = true;
                        tracing::debug!(endpoint = %ep.name, "LwM2M endpoint de-registered");
                    }
                    e.handle_packet(id, Mqtt::Disconnect, now);
                    self.finish(e, id, now);
                }
                None => refuse(self, e, code::NOT_FOUND, "no such registration"),
            },
            (_, [rd, ..]) if rd == "rd" => refuse(
                self,
                e,
                code::METHOD_NOT_ALLOWED,
                "not a registration method",
            ),
            _ => refuse(self, e, code::NOT_FOUND, "the server has no such resource"),
        }
    }

    fn register(
        &mut self,
        e: &mut Engine,
        from: SocketAddr,
        req: &Packet,
        vouched: Option<&str>,
        now: Timestamp,
    ) {
        let refuse = |gw: &mut Self, e: &mut Engine, c: Code, why: String| {
            e.metrics.lwm2m_registrations_refused += 1;
            tracing::debug!(%from, code = %coap::code_text(c), why, "LwM2M registration refused");
            let reply = coap::response(req, c);
            gw.answer(from, req, &reply, now);
        };
        let q = coap::uri_query(req);
        let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let Some(name) = get("ep").filter(|s| !s.is_empty()) else {
            return refuse(self, e, code::BAD_REQUEST, "no endpoint name (ep)".into());
        };
        let version = get("lwm2m").unwrap_or_else(|| "1.0".into());
        if !(version == "1" || version.starts_with("1.")) {
            return refuse(
                self,
                e,
                code::PRECONDITION_FAILED,
                format!("LwM2M version {version:?}"),
            );
        }
        let lifetime = match get("lt") {
            None => 86_400,
            Some(s) => match s.parse::<u32>() {
                Ok(v) => v,
                Err(_) => return refuse(self, e, code::BAD_REQUEST, format!("lifetime {s:?}")),
            },
        };
        if lifetime < self.s.lifetime_min || lifetime > self.s.lifetime_max {
            return refuse(
                self,
                e,
                code::BAD_REQUEST,
                format!(
                    "lifetime {lifetime} s outside {}..={} (lwm2m.lifetime_min/max)",
                    self.s.lifetime_min, self.s.lifetime_max
                ),
            );
        }
        let binding = get("b").unwrap_or_else(|| "U".into());
        let q_param = q.iter().any(|(k, _)| k == "Q");
        let queue = binding.contains('Q') || q_param;
        let text = String::from_utf8_lossy(&req.payload);
        let list = match link::object_list(&text) {
            Ok(l) => l,
            Err(err) => return refuse(self, e, code::BAD_REQUEST, format!("object list: {err}")),
        };
        // A device registering again (it rebooted) replaces its registration once the broker
        // accepts the new one: the engine's takeover of the client id ends the old session.
        if self.endpoints.len() >= self.s.max_endpoints {
            return refuse(
                self,
                e,
                code::UNAVAILABLE,
                format!("{} endpoints (lwm2m.max_endpoints)", self.s.max_endpoints),
            );
        }
        let id = e.open_conn_with(from, self.s.listener, Sink::packets(), now);
        if let Some(user) = vouched {
            e.set_conn_username(id, user);
        }
        self.opened.push(id);
        let location = format!("{:016x}", self.unique());
        let alternate = list.alternate_path.trim_end_matches('/').to_string();
        let ep = Endpoint {
            name: name.clone(),
            location: location.clone(),
            peer: from,
            phase: Phase::Connecting,
            reply: Some(RegisterReply {
                request: req.clone(),
            }),
            lifetime,
            version: if version == "1" {
                "1.0".into()
            } else {
                version
            },
            binding,
            sms: get("sms"),
            queue,
            q_param,
            alternate,
            objects: list.objects,
            expires_at: now.after(Duration::from_secs(u64::from(lifetime))),
            awake_until: now.after(self.s.qmode_time_window),
            waiting: VecDeque::new(),
            active: None,
            observes: HashMap::new(),
            read_format: None,
            timer_at: Timestamp::NEVER,
            quiet: false,
        };
        self.endpoints.insert(id, ep);
        self.by_location.insert(location, id);
        self.by_peer.insert(from, id);
        if req.header.get_type() == MessageType::Confirmable {
            // Retransmissions wait for the answer.
            self.remember(from, req.header.message_id, None, now);
        }
        let connect = Connect {
            level: ProtocolLevel::V311,
            client_id: name,
            clean_session: true,
            keep_alive: 0,
            will: None,
            username: None,
            password: None,
        };
        e.handle_packet(id, Mqtt::Connect(Box::new(connect)), now);
        self.poll_endpoint(e, id, now);
    }

    fn update(
        &mut self,
        e: &mut Engine,
        id: ConnId,
        from: SocketAddr,
        req: &Packet,
        now: Timestamp,
    ) {
        let q = coap::uri_query(req);
        let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let (min, max) = (self.s.lifetime_min, self.s.lifetime_max);
        let lifetime = match get("lt").map(|s| s.parse::<u32>()) {
            None => None,
            Some(Ok(v)) if (min..=max).contains(&v) => Some(v),
            Some(_) => {
                let reply = coap::response(req, code::BAD_REQUEST);
                return self.answer(from, req, &reply, now);
            }
        };
        let list = if req.payload.is_empty() {
            None
        } else {
            match link::object_list(&String::from_utf8_lossy(&req.payload)) {
                Ok(l) => Some(l),
                Err(_) => {
                    let reply = coap::response(req, code::BAD_REQUEST);
                    return self.answer(from, req, &reply, now);
                }
            }
        };
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        if ep.peer != from {
            tracing::debug!(endpoint = %ep.name, old = %ep.peer, new = %from, "LwM2M endpoint moved to a new address");
            if self.by_peer.get(&ep.peer) == Some(&id) {
                self.by_peer.remove(&ep.peer);
            }
            ep.peer = from;
            self.by_peer.insert(from, id);
        }
        if let Some(lt) = lifetime {
            ep.lifetime = lt;
        }
        if let Some(b) = get("b") {
            ep.queue = b.contains('Q') || ep.q_param;
            ep.binding = b;
        }
        if let Some(s) = get("sms") {
            ep.sms = Some(s);
        }
        let listed = list.is_some();
        if let Some(l) = list {
            ep.objects = l.objects;
            ep.alternate = l.alternate_path.trim_end_matches('/').to_string();
        }
        ep.expires_at = now.after(Duration::from_secs(u64::from(ep.lifetime)));
        let (topic, info) = (expand(&self.s.topics.update, &ep.name), ep.info());
        let registered = ep.phase == Phase::Registered;
        let reply = coap::response(req, code::CHANGED);
        self.answer(from, req, &reply, now);
        if registered && (listed || self.s.update_always) {
            self.publish(
                e,
                id,
                &topic,
                &json!({"msgType": "update", "data": info}),
                now,
            );
        }
        self.heard(e, id, now);
    }

    /// The device sent something: a queue-mode device listens again for a while.
    fn heard(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        if let Some(ep) = self.endpoints.get_mut(&id) {
            ep.awake_until = now.after(self.s.qmode_time_window);
        }
        self.start_next(e, id, now);
        self.arm(id);
    }

    /// The device acknowledged a request and will answer separately: no more resends (but a
    /// bound on the wait), and the command published back with `msgType` `ack` (as EMQX did),
    /// so the application knows the device has it.
    fn on_empty_ack(&mut self, e: &mut Engine, from: SocketAddr, msg_id: u16, now: Timestamp) {
        let Some(id) = self.endpoint_at(from) else {
            return;
        };
        let mut ack = None;
        if let Some(ep) = self.endpoints.get_mut(&id) {
            if let Some(x) = ep
                .active
                .as_mut()
                .filter(|x| x.msg_id == msg_id && !x.acked)
            {
                x.acked = true;
                x.due = now.after(self.s.ack_timeout * (1 << self.s.max_retransmit.min(6)));
                let data = json!({"reqPath": x.job.cmd.op.path().to_string()});
                ack = Some((
                    expand(&self.s.topics.response, &ep.name),
                    command::response(&x.job.cmd.original, Some("ack"), data),
                ));
            }
        }
        if let Some((topic, msg)) = ack {
            self.publish(e, id, &topic, &msg, now);
        }
        self.arm(id);
    }

    fn endpoint_at(&self, from: SocketAddr) -> Option<ConnId> {
        self.by_peer.get(&from).copied()
    }

    fn on_reset(&mut self, e: &mut Engine, from: SocketAddr, msg_id: u16, now: Timestamp) {
        let Some(id) = self.endpoint_at(from) else {
            return;
        };
        let active = self
            .endpoints
            .get(&id)
            .and_then(|ep| ep.active.as_ref())
            .is_some_and(|x| x.msg_id == msg_id);
        if active {
            self.complete(
                e,
                id,
                Some(code::INTERNAL_ERROR),
                None,
                Some("the device reset the request"),
                now,
            );
        }
    }

    fn on_response(&mut self, e: &mut Engine, from: SocketAddr, p: &Packet, now: Timestamp) {
        let token = p.get_token().to_vec();
        let con = p.header.get_type() == MessageType::Confirmable;
        if con && self.remembered.contains_key(&(from, p.header.message_id)) {
            // A retransmitted separate response or notification (our ACK was lost): handled
            // already, acknowledged again.
            let ack = coap::empty(MessageType::Acknowledgement, p.header.message_id);
            self.send(from, &ack);
            return;
        }
        let Some(id) = self.by_token.get(&token).copied() else {
            if con {
                // Nobody asked: a notification of an observation we no longer hold.
                let rst = coap::empty(MessageType::Reset, p.header.message_id);
                self.send(from, &rst);
            }
            return;
        };
        if con {
            let ack = coap::empty(MessageType::Acknowledgement, p.header.message_id);
            self.send(from, &ack);
            self.remember(from, p.header.message_id, None, now);
        }
        let is_active = self
            .endpoints
            .get(&id)
            .and_then(|ep| ep.active.as_ref())
            .is_some_and(|x| x.token == token);
        if is_active {
            self.on_reply(e, id, p, now);
        } else {
            self.on_notification(e, id, p, now);
        }
        self.heard(e, id, now);
    }

    /// The reply to the request in flight.
    fn on_reply(&mut self, e: &mut Engine, id: ConnId, p: &Packet, now: Timestamp) {
        let c = coap::code_of(p);
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        let Some(x) = ep.active.as_mut() else {
            return;
        };
        if p.header.get_type() == MessageType::Acknowledgement && p.header.message_id != x.msg_id {
            // The answer to an earlier send of this exchange (a block asked for again): stale.
            return;
        }
        if x.blocks.is_empty() && p.get_first_option(CoapOption::Observe).is_some() {
            x.observing = true;
        }
        let negotiable = matches!(
            (&x.job.cmd.op, c),
            (Op::Read(_) | Op::Observe(_), code::NOT_ACCEPTABLE)
                | (Op::Write { .. } | Op::Create { .. }, 0x8F)
        );
        if negotiable && !x.untried.is_empty() {
            // 4.06 / 4.15: the device does not speak that format; the next one.
            let mut rest = std::mem::take(&mut x.untried);
            let next = rest.remove(0);
            tracing::debug!(endpoint = %ep.name, tried = ?x.format.map(format::name), next = ?next.map(format::name), "LwM2M device refused the format; trying another");
            let job = ep.active.take().expect("active").job;
            self.by_token.remove(p.get_token());
            self.send_job(e, id, job, Some((next, rest)), now);
            return self.start_next(e, id, now);
        }
        if c == code::CONTINUE {
            // The device took a block of ours: the next (at the size it asks, if smaller).
            if let Some((body, size, next)) = x.upload.as_mut() {
                if let Some((_, _, theirs)) = coap::block_option(p, CoapOption::Block1) {
                    if theirs < *size {
                        *next = (*next * *size as u32) / theirs as u32;
                        *size = theirs;
                    }
                }
                let from = *next as usize * *size;
                if from < body.len() {
                    let to = (from + *size).min(body.len());
                    let more = if to < body.len() { 8 } else { 0 };
                    let value = coap::block2_value(*next, *size) | more;
                    let chunk = body[from..to].to_vec();
                    *next += 1;
                    let req = self.request_for(id, None).map(|mut r| {
                        coap::set_uint(&mut r, CoapOption::Block1, value);
                        r.payload = chunk;
                        r
                    });
                    return self.resend_with(id, req, now);
                }
            }
        }
        if let Some((num, more, size)) = coap::block2(p) {
            if c == code::CONTENT && num != x.next_block {
                // A block we did not ask for (a duplicate): not the end of the transfer.
                return;
            }
            if c == code::CONTENT {
                if x.blocks.len() + p.payload.len() > self.s.max_payload {
                    return self.complete(
                        e,
                        id,
                        Some(code::TOO_LARGE),
                        None,
                        Some("the reply is larger than lwm2m.max_payload"),
                        now,
                    );
                }
                x.blocks.extend_from_slice(&p.payload);
                if more {
                    x.next_block = num + 1;
                    // The same request for the next block.
                    let req = self.request_for(id, Some(coap::block2_value(num + 1, size)));
                    return self.resend_with(id, req, now);
                }
                let body = std::mem::take(&mut x.blocks);
                let mut whole = p.clone();
                whole.payload = body;
                return self.complete(e, id, Some(c), Some(&whole), None, now);
            }
        }
        self.complete(e, id, Some(c), Some(p), None, now);
    }

    /// Ends the request in flight with `code` (or a reason when the device gave none),
    /// publishes the response and starts the next.
    fn complete(
        &mut self,
        e: &mut Engine,
        id: ConnId,
        c: Option<Code>,
        reply: Option<&Packet>,
        error: Option<&str>,
        now: Timestamp,
    ) {
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        let Some(x) = ep.active.take() else {
            return;
        };
        let op = &x.job.cmd.op;
        let c = c.unwrap_or(code::GATEWAY_TIMEOUT);
        let mut data = Map::new();
        data.insert("reqPath".into(), json!(op.path().to_string()));
        data.insert("code".into(), json!(coap::code_text(c)));
        data.insert("codeMsg".into(), json!(coap::code_name(c)));
        if let Some(err) = error {
            data.insert("error".into(), json!(err));
        }
        let ok = c >> 5 == 2;
        let mut observed = false;
        if let (true, Some(p)) = (ok, reply) {
            match op {
                Op::Read(path) | Op::Observe(path) => {
                    let fmt = coap::uint_option(p, CoapOption::ContentFormat)
                        .and_then(|f| u16::try_from(f).ok())
                        .unwrap_or(format::TEXT);
                    ep.read_format = Some(x.format);
                    match lwm2m::decode(fmt, path, &p.payload) {
                        Ok(records) => {
                            data.insert(
                                "content".into(),
                                command::content_json(&records, &self.registry, fmt),
                            );
                        }
                        Err(err) => {
                            data.insert(
                                "error".into(),
                                json!(format!("the reply did not decode: {err}")),
                            );
                            data.insert("payload".into(), json!(lwm2m::base64(&p.payload)));
                        }
                    }
                    if matches!(op, Op::Observe(_)) && x.observing {
                        observed = true;
                    }
                }
                Op::Discover(_) => {
                    let text = String::from_utf8_lossy(&p.payload);
                    match link::parse(&text) {
                        Ok(links) => {
                            data.insert(
                                "content".into(),
                                json!(links.iter().map(link::Link::to_text).collect::<Vec<_>>()),
                            );
                        }
                        Err(err) => {
                            data.insert("error".into(), json!(err.to_string()));
                        }
                    }
                }
                Op::Create { .. } => {
                    if let Some(loc) = p.get_option(CoapOption::LocationPath) {
                        let segs: Vec<String> = loc
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect();
                        data.insert("location".into(), json!(format!("/{}", segs.join("/"))));
                    }
                }
                Op::Write { .. } => ep.read_format = ep.read_format.or(Some(x.format)),
                _ => {}
            }
        }
        let original = x.job.cmd.original.clone();
        let topic = expand(&self.s.topics.response, &ep.name);
        if observed {
            // The device keeps one observation per path (RFC 7641): older ones are gone.
            let path = op.path();
            let stale: Vec<Vec<u8>> = ep
                .observes
                .iter()
                .filter(|(_, o)| o.path == path)
                .map(|(t, _)| t.clone())
                .collect();
            for t in stale {
                ep.observes.remove(&t);
                self.by_token.remove(&t);
            }
            ep.observes.insert(
                x.token.clone(),
                Observation {
                    path: op.path(),
                    original: original.clone(),
                },
            );
        } else {
            self.by_token.remove(&x.token);
        }
        if matches!(op, Op::CancelObserve(_)) {
            self.by_token.remove(&x.token);
        }
        if c == code::GATEWAY_TIMEOUT {
            e.metrics.lwm2m_timeouts += 1;
        }
        let msg = command::response(&original, None, Json::Object(data));
        self.publish(e, id, &topic, &msg, now);
        self.start_next(e, id, now);
    }

    fn on_notification(&mut self, e: &mut Engine, id: ConnId, p: &Packet, now: Timestamp) {
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        let Some(obs) = ep.observes.get(p.get_token()).cloned() else {
            return;
        };
        let c = coap::code_of(p);
        let mut data = Map::new();
        data.insert("reqPath".into(), json!(obs.path.to_string()));
        data.insert("code".into(), json!(coap::code_text(c)));
        data.insert("codeMsg".into(), json!(coap::code_name(c)));
        let fmt = coap::uint_option(p, CoapOption::ContentFormat)
            .and_then(|f| u16::try_from(f).ok())
            .unwrap_or(format::TEXT);
        match lwm2m::decode(fmt, &obs.path, &p.payload) {
            Ok(records) => {
                data.insert(
                    "content".into(),
                    command::content_json(&records, &self.registry, fmt),
                );
            }
            Err(err) => {
                data.insert(
                    "error".into(),
                    json!(format!("the notification did not decode: {err}")),
                );
            }
        }
        if c >> 5 != 2 {
            // An error ends the observation (RFC 7641).
            ep.observes.remove(p.get_token());
            self.by_token.remove(p.get_token());
        }
        let seq = coap::uint_option(p, CoapOption::Observe).unwrap_or(0);
        let mut msg = obs.original.clone();
        msg.insert("msgType".into(), json!("notify"));
        msg.insert("seqNum".into(), json!(seq));
        msg.insert("data".into(), Json::Object(data));
        let topic = expand(&self.s.topics.notify, &ep.name);
        e.metrics.lwm2m_notifications += 1;
        self.publish(e, id, &topic, &Json::Object(msg), now);
    }

    /// Publishes `msg` from the endpoint's connection (QoS 0), unless its input is held back.
    fn publish(&mut self, e: &mut Engine, id: ConnId, topic: &str, msg: &Json, now: Timestamp) {
        if !e.conn_readable(id) {
            e.metrics.lwm2m_dropped += 1;
            tracing::debug!(
                topic,
                "LwM2M publication dropped: the endpoint's input is held back"
            );
            return;
        }
        let payload = Bytes::from(serde_json::to_vec(msg).unwrap_or_default());
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: 0,
            payload,
        };
        e.handle_packet(id, Mqtt::Publish(publish), now);
    }

    /// The engine woke connection `id`.
    pub fn poll_conn(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        if self.endpoints.contains_key(&id) {
            self.poll_endpoint(e, id, now);
        }
    }

    /// Polls every endpoint (for a driver without per-connection wakers, and tests).
    pub fn poll_all(&mut self, e: &mut Engine, now: Timestamp) {
        let ids: Vec<ConnId> = self.endpoints.keys().copied().collect();
        for id in ids {
            self.poll_endpoint(e, id, now);
        }
    }

    fn poll_endpoint(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        if let Some(packets) = e.take_packets(id, now) {
            for p in packets {
                self.on_engine(e, id, p, now);
            }
        }
        if e.conn_status(id).is_none_or(|s| s.close) {
            return self.finish(e, id, now);
        }
        self.arm(id);
    }

    fn on_engine(&mut self, e: &mut Engine, id: ConnId, p: Mqtt, now: Timestamp) {
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        match p {
            Mqtt::Connack(Connack {
                code: ConnectReturnCode::Accepted,
                ..
            }) if ep.phase == Phase::Connecting => {
                ep.phase = Phase::Subscribing;
                let topic = expand(&self.s.topics.command, &ep.name);
                let subscribe = Subscribe {
                    packet_id: 1,
                    filters: vec![(topic, QoS::AtMostOnce)],
                };
                e.handle_packet(id, Mqtt::Subscribe(subscribe), now);
            }
            Mqtt::Connack(c) => {
                tracing::debug!(endpoint = %ep.name, code = ?c.code, "LwM2M registration refused by the broker");
                e.metrics.lwm2m_registrations_refused += 1;
                ep.quiet = true;
                let refusal = match c.code {
                    ConnectReturnCode::ServerUnavailable => code::UNAVAILABLE,
                    _ => code::FORBIDDEN,
                };
                if let Some(r) = ep.reply.take() {
                    let peer = ep.peer;
                    let reply = coap::response(&r.request, refusal);
                    self.answer(peer, &r.request, &reply, now);
                }
            }
            Mqtt::Suback(s) if ep.phase == Phase::Subscribing => {
                if !matches!(s.codes.first(), Some(SubackCode::Granted(_))) {
                    tracing::warn!(endpoint = %ep.name, "LwM2M endpoint may not subscribe to its command topic (access rules)");
                }
                ep.phase = Phase::Registered;
                self.by_name.insert(ep.name.clone(), id);
                e.metrics.lwm2m_registrations += 1;
                tracing::debug!(endpoint = %ep.name, lifetime = ep.lifetime, queue = ep.queue, "LwM2M endpoint registered");
                let topic = expand(&self.s.topics.register, &ep.name);
                let event = json!({"msgType": "register", "data": ep.info()});
                let peer = ep.peer;
                let location = ep.location.clone();
                let auto: Vec<Path> = if self.s.auto_observe {
                    ep.objects
                        .iter()
                        .filter(|p| p.object_id() != 0 && p.depth() == 2)
                        .copied()
                        .collect()
                } else {
                    Vec::new()
                };
                if let Some(r) = ep.reply.take() {
                    let mut reply = coap::response(&r.request, code::CREATED);
                    reply.add_option(CoapOption::LocationPath, b"rd".to_vec());
                    reply.add_option(CoapOption::LocationPath, location.into_bytes());
                    self.answer(peer, &r.request, &reply, now);
                }
                self.publish(e, id, &topic, &event, now);
                for path in auto {
                    let mut original = Map::new();
                    original.insert("msgType".into(), json!("observe"));
                    original.insert("data".into(), json!({"path": path.to_string()}));
                    self.enqueue(
                        e,
                        id,
                        Job {
                            cmd: Command {
                                original,
                                op: Op::Observe(path),
                            },
                        },
                        now,
                    );
                }
            }
            Mqtt::Publish(p) if ep.phase == Phase::Registered => {
                e.metrics.lwm2m_commands += 1;
                match command::parse(&p.payload, &self.registry) {
                    Ok(cmd) => self.enqueue(e, id, Job { cmd }, now),
                    Err(refusal) => {
                        e.metrics.lwm2m_bad_commands += 1;
                        let topic = expand(&self.s.topics.response, &ep.name);
                        self.publish(e, id, &topic, &refusal.0, now);
                    }
                }
            }
            _ => {}
        }
    }

    fn enqueue(&mut self, e: &mut Engine, id: ConnId, job: Job, now: Timestamp) {
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        if ep.waiting.len() >= self.s.max_queued {
            e.metrics.lwm2m_dropped += 1;
            let topic = expand(&self.s.topics.response, &ep.name);
            let data = json!({
                "reqPath": job.cmd.op.path().to_string(),
                "code": "5.03",
                "codeMsg": "service_unavailable",
                "error": format!("{} commands wait for this endpoint already (lwm2m.max_queued)", self.s.max_queued),
            });
            let msg = command::response(&job.cmd.original, None, data);
            return self.publish(e, id, &topic, &msg, now);
        }
        ep.waiting.push_back(job);
        self.start_next(e, id, now);
    }

    /// Sends the next waiting command if nothing is in flight and the device listens.
    /// (A loop, not recursion: commands answered without a request follow one another.)
    fn start_next(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        loop {
            let Some(ep) = self.endpoints.get_mut(&id) else {
                return;
            };
            if ep.active.is_some() || ep.phase != Phase::Registered {
                return;
            }
            if ep.queue && now >= ep.awake_until {
                return;
            }
            let Some(job) = ep.waiting.pop_front() else {
                return;
            };
            self.send_job(e, id, job, None, now);
        }
    }

    /// Sends `job` (`retry`: the format to use now and those left, after a refusal).
    fn send_job(
        &mut self,
        e: &mut Engine,
        id: ConnId,
        job: Job,
        retry: Option<(Option<u16>, Vec<Option<u16>>)>,
        now: Timestamp,
    ) {
        let Some(ep) = self.endpoints.get(&id) else {
            return;
        };
        let op = job.cmd.op.clone();
        let (mut untried, first) = match &op {
            Op::Read(_) | Op::Observe(_) => {
                let all = ep.read_formats();
                (all[1..].to_vec(), all[0])
            }
            Op::Write { .. } | Op::Create { .. } => {
                let all = ep.write_formats();
                (all[1..].to_vec(), all[0])
            }
            _ => (Vec::new(), None),
        };
        let format = match retry {
            Some((f, rest)) => {
                untried = rest;
                f
            }
            None => first,
        };
        // CancelObserve reuses the observation's token (RFC 7641).
        let mut token = None;
        if let Op::CancelObserve(path) = &op {
            let ep = self.endpoints.get_mut(&id).expect("checked");
            let found = ep
                .observes
                .iter()
                .find(|(_, o)| o.path == *path)
                .map(|(t, _)| t.clone());
            match found {
                Some(t) => {
                    ep.observes.remove(&t);
                    token = Some(t);
                }
                None => {
                    let topic = expand(&self.s.topics.response, &ep.name);
                    let data = json!({"reqPath": path.to_string(), "code": "4.04", "codeMsg": "not_found", "error": "the path is not observed"});
                    let msg = command::response(&job.cmd.original, None, data);
                    // The caller goes on with the next command.
                    return self.publish(e, id, &topic, &msg, now);
                }
            }
        }
        let token = token.unwrap_or_else(|| self.unique().to_be_bytes().to_vec());
        let msg_id = self.msg_id();
        let ep = self.endpoints.get(&id).expect("checked");
        let mut req = match &op {
            Op::Read(p) | Op::Observe(p) | Op::CancelObserve(p) | Op::Discover(p) => {
                coap::request(code::GET, msg_id, &token, &ep.uri(p))
            }
            Op::Write { base, values } => {
                let method = if base.depth() == 2 {
                    code::POST
                } else {
                    code::PUT
                };
                let mut r = coap::request(method, msg_id, &token, &ep.uri(base));
                match body(format, base, values) {
                    Ok((f, b)) => {
                        coap::set_uint(&mut r, CoapOption::ContentFormat, u32::from(f));
                        r.payload = b;
                    }
                    Err(why) => return self.refuse_job(e, id, job, &why, now),
                }
                r
            }
            Op::Create {
                base,
                values,
                any_instance,
            } => {
                let mut r = coap::request(code::POST, msg_id, &token, &ep.uri(base));
                let enc_base = if *any_instance {
                    base.child(0).expect("an object path")
                } else {
                    *base
                };
                match body(format, &enc_base, values) {
                    Ok((f, b)) => {
                        coap::set_uint(&mut r, CoapOption::ContentFormat, u32::from(f));
                        r.payload = b;
                    }
                    Err(why) => return self.refuse_job(e, id, job, &why, now),
                }
                r
            }
            Op::WriteAttr { path, attrs } => {
                let mut r = coap::request(code::PUT, msg_id, &token, &ep.uri(path));
                for (k, v) in attrs {
                    r.add_option(CoapOption::UriQuery, format!("{k}={v}").into_bytes());
                }
                r
            }
            Op::Execute { path, args } => {
                let mut r = coap::request(code::POST, msg_id, &token, &ep.uri(path));
                if !args.is_empty() {
                    coap::set_uint(&mut r, CoapOption::ContentFormat, u32::from(format::TEXT));
                    r.payload = args.clone().into_bytes();
                }
                r
            }
            Op::Delete(p) => coap::request(code::DELETE, msg_id, &token, &ep.uri(p)),
        };
        match &op {
            Op::Read(_) | Op::Observe(_) => {
                if let Some(f) = format {
                    coap::set_uint(&mut req, CoapOption::Accept, u32::from(f));
                }
            }
            Op::Discover(_) => {
                coap::set_uint(&mut req, CoapOption::Accept, u32::from(format::LINK))
            }
            _ => {}
        }
        match &op {
            Op::Observe(_) => coap::set_uint(&mut req, CoapOption::Observe, 0),
            Op::CancelObserve(_) => coap::set_uint(&mut req, CoapOption::Observe, 1),
            _ => {}
        }
        // Too large for one datagram: the first block, the rest after each 2.31 Continue.
        let mut upload = None;
        if req.payload.len() > BLOCK1_SIZE {
            let body = std::mem::take(&mut req.payload);
            req.payload = body[..BLOCK1_SIZE].to_vec();
            coap::set_uint(
                &mut req,
                CoapOption::Block1,
                coap::block2_value(0, BLOCK1_SIZE) | 8,
            );
            upload = Some((body, BLOCK1_SIZE, 1));
        }
        let peer = ep.peer;
        let datagram = self.send(peer, &req);
        self.by_token.insert(token.clone(), id);
        let wait = self.s.ack_timeout;
        let ep = self.endpoints.get_mut(&id).expect("checked");
        ep.active = Some(Exchange {
            job,
            token,
            msg_id,
            datagram,
            tries: 0,
            wait,
            due: now.after(wait),
            acked: false,
            format,
            untried,
            blocks: Vec::new(),
            next_block: 0,
            observing: false,
            upload,
        });
        self.arm(id);
    }

    /// A command the gateway cannot send after all (its values do not fit any format).
    fn refuse_job(&mut self, e: &mut Engine, id: ConnId, job: Job, why: &str, now: Timestamp) {
        let Some(ep) = self.endpoints.get(&id) else {
            return;
        };
        let topic = expand(&self.s.topics.response, &ep.name);
        let data = json!({"reqPath": job.cmd.op.path().to_string(), "code": "4.00", "codeMsg": "bad_request", "error": why});
        let msg = command::response(&job.cmd.original, None, data);
        // The caller goes on with the next command.
        self.publish(e, id, &topic, &msg, now);
    }

    /// The request in flight again, for its next block.
    fn request_for(&mut self, id: ConnId, block2: Option<u32>) -> Option<Packet> {
        let msg_id = self.msg_id();
        let ep = self.endpoints.get(&id)?;
        let x = ep.active.as_ref()?;
        let mut req = coap::parse(&x.datagram).ok()?;
        req.header.message_id = msg_id;
        req.clear_option(CoapOption::Observe);
        if let Some(b) = block2 {
            coap::set_uint(&mut req, CoapOption::Block2, b);
        }
        Some(req)
    }

    fn resend_with(&mut self, id: ConnId, req: Option<Packet>, now: Timestamp) {
        let Some(req) = req else {
            return;
        };
        let Some(peer) = self.endpoints.get(&id).map(|ep| ep.peer) else {
            return;
        };
        let datagram = self.send(peer, &req);
        let wait = self.s.ack_timeout;
        if let Some(x) = self
            .endpoints
            .get_mut(&id)
            .and_then(|ep| ep.active.as_mut())
        {
            x.msg_id = req.header.message_id;
            x.datagram = datagram;
            x.tries = 0;
            x.wait = wait;
            x.due = now.after(wait);
            x.acked = false;
        }
        self.arm(id);
    }

    fn arm(&mut self, id: ConnId) {
        let Some(ep) = self.endpoints.get(&id) else {
            return;
        };
        let due = ep
            .active
            .as_ref()
            .map_or(ep.expires_at, |x| x.due.min(ep.expires_at));
        self.timers.arm(&mut self.endpoints, id, due);
    }

    /// Runs what is due at `now`: retransmissions, give-ups, expired registrations.
    pub fn tick(&mut self, e: &mut Engine, now: Timestamp) {
        while let Some(id) = self.timers.pop_due(&mut self.endpoints, now) {
            let Some(ep) = self.endpoints.get_mut(&id) else {
                continue;
            };
            if ep.expires_at <= now {
                e.metrics.lwm2m_registrations_expired += 1;
                tracing::debug!(endpoint = %ep.name, lifetime = ep.lifetime, "LwM2M registration expired");
                ep.quiet = true;
                e.close_conn(id, EndReason::KeepaliveTimeout, now);
                self.finish(e, id, now);
                continue;
            }
            let peer = ep.peer;
            let mut resend = None;
            let mut give_up = false;
            if let Some(x) = ep.active.as_mut().filter(|x| x.due <= now) {
                if x.acked || x.tries >= self.s.max_retransmit {
                    give_up = true;
                } else {
                    x.tries += 1;
                    x.wait *= 2;
                    x.due = now.after(x.wait);
                    resend = Some(x.datagram.clone());
                }
            }
            if let Some(d) = resend {
                e.metrics.lwm2m_retransmits += 1;
                self.out.push_back((peer, d));
            }
            if give_up {
                self.complete(e, id, None, None, Some("no answer from the device"), now);
            }
            self.arm(id);
        }
    }

    /// The endpoint's connection ended (or is ending): forgotten, the engine told.
    fn finish(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        let Some(mut ep) = self.endpoints.remove(&id) else {
            return;
        };
        if let Some(r) = ep.reply.take() {
            // Ended before the broker took it (a timeout, a takeover): the device may try again.
            let reply = coap::response(&r.request, code::UNAVAILABLE);
            self.answer(ep.peer, &r.request, &reply, now);
        }
        if self.by_location.get(&ep.location) == Some(&id) {
            self.by_location.remove(&ep.location);
        }
        if self.by_name.get(&ep.name) == Some(&id) {
            self.by_name.remove(&ep.name);
        }
        if self.by_peer.get(&ep.peer) == Some(&id) {
            self.by_peer.remove(&ep.peer);
        }
        if let Some(x) = &ep.active {
            self.by_token.remove(&x.token);
        }
        for t in ep.observes.keys() {
            self.by_token.remove(t);
        }
        e.conn_closed(id, now);
    }

    /// The gateway stops (unloaded): every endpoint's session ends as after a network error.
    pub fn close_all(&mut self, e: &mut Engine, now: Timestamp) -> usize {
        let ids: Vec<ConnId> = self.endpoints.keys().copied().collect();
        for &id in &ids {
            e.close_conn(id, EndReason::Closed, now);
            self.finish(e, id, now);
        }
        self.timers.clear();
        ids.len()
    }

    /// The broker stops: the engine closed every connection; forgets them.
    pub fn forget_all(&mut self, e: &mut Engine, now: Timestamp) {
        for (id, _) in self.endpoints.drain() {
            e.conn_closed(id, now);
        }
        self.by_location.clear();
        self.by_name.clear();
        self.by_peer.clear();
        self.by_token.clear();
        self.timers.clear();
    }
}

/// The payload of a write or create on `base` in `format` (TLV when none is given).
fn body(
    format: Option<u16>,
    base: &Path,
    values: &[(Path, lwm2m::Value)],
) -> Result<(u16, Vec<u8>), String> {
    let f = format.unwrap_or(format::TLV);
    lwm2m::encode(f, base, values)
        .map(|b| (f, b))
        .map_err(|e| e.to_string())
}
