//! Engine tests: a simulated cluster of shards stepped by hand on a simulated clock, so every
//! cross-shard interleaving can be tried without threads or sockets.

use super::*;
use ahash::AHashSet;
use proptest::prelude::*;
use shardmq_protocol::mqtt::{decode, Connect, DecodeError, Publish};

/// The boxed part of a message between shards, if it has one.
fn control(m: &ShardMsg) -> Option<&Control> {
    match m {
        ShardMsg::Control(c) => Some(c),
        _ => None,
    }
}

struct Cluster {
    engines: Vec<Engine>,
    now: Timestamp,
    /// Messages in flight between shards: (from, to) → FIFO.
    wires: AHashMap<(usize, usize), VecDeque<ShardMsg>>,
    /// Messages a wire takes before the sender must wait (a channel's capacity).
    wire_capacity: usize,
}

#[derive(Debug, Clone, Copy)]
struct Client {
    shard: usize,
    id: ConnId,
}

fn peer() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

/// The broker's default settings (`configs/default.toml`), except a small window and queue
/// and no timed resends, which the tests below rely on.
fn config(shards: usize, shard: usize) -> EngineConfig {
    EngineConfig {
        shard,
        shards,
        limits: SessionLimits {
            max_inflight: 4,
            max_mqueue_len: 100,
            mqueue_store_qos0: true,
            retry_interval: None,
            max_awaiting_rel: 100,
            await_rel_timeout: Some(Duration::from_secs(300)),
        },
        retained: RetainedLimits {
            max_messages: 0,
            max_payload: 1 << 20,
            expiry: None,
        },
        retainer_enabled: true,
        max_packet_size: 1 << 20,
        max_clientid_len: 65_535,
        v31_max_clientid_len: 23,
        max_topic_levels: 128,
        max_subscriptions: 0,
        force_shutdown: None,
        max_mqueue_bytes_total: 0,
        flapping: None,
        rate_limit: crate::rate::RateLimit::default(),
        idle_timeout: Duration::from_secs(15),
        keepalive_multiplier: 1.5,
        close_timeout: Duration::from_secs(5),
        session_expiry: Some(Duration::from_secs(7200)),
        max_pending: 65_536,
        max_write_buffer: 256 << 10,
        shard_write_buffer: 256 << 20,
        batch_size: 256,
        park_after: Some(Duration::from_secs(2)),
        client_events: false,
        auth: crate::auth::AuthPolicy::default(),
        acl_deny_disconnect: false,
    }
}

impl Cluster {
    fn new(shards: usize) -> Self {
        Self::with(shards, |_| {})
    }

    fn with(shards: usize, tweak: impl Fn(&mut EngineConfig)) -> Self {
        let now = Timestamp(1_000_000);
        let mut offline = None;
        let engines = (0..shards)
            .map(|s| {
                let mut c = config(shards, s);
                tweak(&mut c);
                let mut e = Engine::new(c, now);
                // One counter of offline queues for all shards, as the runtime makes it.
                let shared = offline.get_or_insert_with(|| e.offline.clone());
                e.share_offline_queues(shared.clone());
                e
            })
            .collect();
        Cluster {
            engines,
            now,
            wires: AHashMap::new(),
            wire_capacity: usize::MAX,
        }
    }

    /// Moves queued outgoing messages onto their wires, in batches, while the wires have room.
    fn collect(&mut self) {
        for from in 0..self.engines.len() {
            for to in 0..self.engines.len() {
                if from == to {
                    continue;
                }
                loop {
                    if self.wires.get(&(from, to)).map_or(0, |w| w.len()) >= self.wire_capacity {
                        break;
                    }
                    let batch = self.engines[from].take_outgoing(to);
                    if batch.is_empty() {
                        break;
                    }
                    self.wires.entry((from, to)).or_default().extend(batch);
                }
            }
        }
    }

    /// Delivers one message from the wire (from, to), if any.
    fn deliver_one(&mut self, from: usize, to: usize) -> bool {
        self.collect();
        let Some(msg) = self.wires.get_mut(&(from, to)).and_then(|w| w.pop_front()) else {
            return false;
        };
        self.engines[to].handle_shard_msg(from, msg, self.now);
        true
    }

    /// Checks what must hold between steps: each engine's count of outbox bytes is right,
    /// and so are its counts of subscriptions and distinct filters.
    fn check(&self) {
        for e in &self.engines {
            let mut subs = 0;
            let mut filters = AHashSet::new();
            e.local.for_each(|f, s| {
                subs += s.len();
                filters.insert(f.to_string());
            });
            e.routes.for_each(|f, _| {
                filters.insert(f.to_string());
            });
            assert_eq!(e.subscription_count(), subs, "shard {}", e.cfg.shard);
            assert_eq!(e.topic_count(), filters.len(), "shard {}", e.cfg.shard);
            let sum: usize = e.conns.iter().map(|(_, c)| c.outbox.len()).sum();
            assert_eq!(
                sum, e.outbox_bytes,
                "outbox accounting of shard {}",
                e.cfg.shard
            );
        }
        // The shared count of offline queue bytes is the sum of every session's share,
        // wherever the session is: in a slot, or moving between shards.
        let moving = |m: &ShardMsg| match control(m) {
            Some(Control::Handover {
                session: Some(s), ..
            }) => s.offline_bytes(),
            _ => 0,
        };
        let mut shares = 0;
        for e in &self.engines {
            for (_, slot) in e.sessions.iter() {
                if let SessionSlot::Active(a) = slot {
                    assert!(
                        a.session.offline_bytes() <= a.session.queue_bytes(),
                        "a share is part of the queue"
                    );
                    match a
                        .conn
                        .and_then(|id| e.conns.get(id.idx as usize).filter(|c| c.gen == id.gen))
                    {
                        None => assert_eq!(a.session.offline_bytes(), a.session.queue_bytes()),
                        // Only a closing connection's session may queue as offline.
                        Some(c) if !c.close => assert_eq!(a.session.offline_bytes(), 0),
                        Some(_) => {}
                    }
                    shares += a.session.offline_bytes();
                }
            }
            shares += e.inbox.iter().map(moving).sum::<usize>();
            for o in &e.outgoing {
                shares += o.queue.iter().map(moving).sum::<usize>();
            }
        }
        shares += self.wires.values().flatten().map(moving).sum::<usize>();
        if let Some(e) = self.engines.first() {
            assert_eq!(e.offline.bytes(), shares, "offline queue accounting");
        }
    }

    /// Asserts that no engine queues more than `bound` application messages for a shard.
    fn assert_data_bound(&self, bound: usize) {
        for e in &self.engines {
            for (to, o) in e.outgoing.iter().enumerate() {
                let data = o
                    .queue
                    .iter()
                    .filter(|m| {
                        matches!(m, ShardMsg::Deliver(_))
                            || matches!(
                                control(m),
                                Some(Control::Forward { .. } | Control::RetainedSet { .. })
                            )
                    })
                    .count();
                assert!(
                    data <= bound,
                    "shard {} queues {data} messages for shard {to} (bound {bound})",
                    e.cfg.shard
                );
            }
        }
    }

    /// Runs until no message is in flight, except that a message for which `hold(from, to,
    /// msg)` is true stays on its wire, with everything behind it.
    fn settle_holding(&mut self, hold: impl Fn(usize, usize, &ShardMsg) -> bool) {
        loop {
            self.collect();
            let mut progress = false;
            let pairs: Vec<(usize, usize)> = self.wires.keys().copied().collect();
            for (from, to) in pairs {
                while let Some(front) = self.wires.get(&(from, to)).and_then(|w| w.front()) {
                    if hold(from, to, front) {
                        break;
                    }
                    self.deliver_one(from, to);
                    progress = true;
                }
            }
            if !progress {
                self.check();
                return;
            }
        }
    }

    /// Runs until no message is in flight.
    fn settle(&mut self) {
        loop {
            self.collect();
            let pairs: Vec<(usize, usize)> = self
                .wires
                .iter()
                .filter(|(_, w)| !w.is_empty())
                .map(|(k, _)| *k)
                .collect();
            if pairs.is_empty() {
                self.check();
                return;
            }
            for (from, to) in pairs {
                while self.deliver_one(from, to) {}
            }
        }
    }

    fn open(&mut self, shard: usize) -> Client {
        let id = self.engines[shard].open_conn(peer(), 0, self.now);
        Client { shard, id }
    }

    /// A gateway's client: typed packets both ways.
    fn open_gateway(&mut self, shard: usize) -> Client {
        let id = self.engines[shard].open_conn_with(peer(), 1, Sink::packets(), self.now);
        Client { shard, id }
    }

    /// Connects an opened client; returns what came back.
    fn connect_opened(&mut self, c: Client, client_id: &str, clean: bool) -> Vec<Packet> {
        self.send(
            c,
            Packet::Connect(Box::new(Connect {
                level: ProtocolLevel::V311,
                client_id: client_id.into(),
                clean_session: clean,
                keep_alive: 10,
                will: None,
                username: None,
                password: None,
            })),
        );
        self.recv(c)
    }

    /// A CONNECT (3.1.1, no will, no credentials) from an opened client, left on the wires.
    fn connect_unsettled(&mut self, c: Client, client_id: &str, clean: bool, keep_alive: u16) {
        self.input(
            c,
            Packet::Connect(Box::new(Connect {
                level: ProtocolLevel::V311,
                client_id: client_id.into(),
                clean_session: clean,
                keep_alive,
                will: None,
                username: None,
                password: None,
            })),
        );
    }

    fn input(&mut self, c: Client, p: Packet) {
        self.engines[c.shard].handle_packet(c.id, p, self.now);
    }

    fn send(&mut self, c: Client, p: Packet) {
        self.input(c, p);
        self.settle();
    }

    fn connect_with(
        &mut self,
        shard: usize,
        client_id: &str,
        clean: bool,
        level: ProtocolLevel,
        will: Option<LastWill>,
    ) -> (Client, Vec<Packet>) {
        let c = self.open(shard);
        self.send(
            c,
            Packet::Connect(Box::new(Connect {
                level,
                client_id: client_id.into(),
                clean_session: clean,
                keep_alive: 10,
                will,
                username: None,
                password: None,
            })),
        );
        let out = self.recv(c);
        (c, out)
    }

    fn connect(&mut self, shard: usize, client_id: &str, clean: bool) -> Client {
        let (c, out) = self.connect_with(shard, client_id, clean, ProtocolLevel::V311, None);
        assert!(
            matches!(
                out.first(),
                Some(Packet::Connack(Connack {
                    code: ConnectReturnCode::Accepted,
                    ..
                }))
            ),
            "{client_id}: {out:?}"
        );
        c
    }

    /// What the engine wrote to the client, read as a driver would (and acknowledged to the
    /// engine as written).
    fn recv(&mut self, c: Client) -> Vec<Packet> {
        if let Some(packets) = self.engines[c.shard].take_packets(c.id, self.now) {
            return packets.into();
        }
        let opts = self.engines[c.shard].decode_options(c.id);
        let Some(out) = self.engines[c.shard].conn_outbox(c.id) else {
            return Vec::new();
        };
        let before = out.len();
        let mut v = Vec::new();
        while let Some(p) = decode(out, &opts).expect("engine wrote an invalid packet") {
            v.push(p);
        }
        let written = before - out.len();
        let _ = self.engines[c.shard].conn_flushed(c.id, written, self.now);
        v
    }

    fn closing(&self, c: Client) -> bool {
        self.engines[c.shard]
            .conn_status(c.id)
            .is_none_or(|s| s.close)
    }

    fn drop_conn(&mut self, c: Client) {
        self.engines[c.shard].conn_closed(c.id, self.now);
        self.settle();
    }

    fn subscribe(&mut self, c: Client, filters: &[(&str, QoS)]) -> Vec<SubackCode> {
        self.send(
            c,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: filters.iter().map(|(f, q)| (f.to_string(), *q)).collect(),
            }),
        );
        let out = self.recv(c);
        let suback = out.iter().find_map(|p| match p {
            Packet::Suback(s) => Some(s.codes.clone()),
            _ => None,
        });
        suback.expect("no SUBACK")
    }

    fn publish(&mut self, c: Client, topic: &str, payload: &str, qos: QoS, retain: bool, pid: u16) {
        self.send(
            c,
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain,
                topic: topic.into(),
                packet_id: pid,
                payload: Bytes::copy_from_slice(payload.as_bytes()),
            }),
        );
    }

    /// A PUBLISH from `c`, left on the wires.
    fn publish_unsettled(&mut self, c: Client, topic: &str, payload: &str, qos: QoS, pid: u16) {
        self.input(
            c,
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain: false,
                topic: topic.into(),
                packet_id: pid,
                payload: Bytes::copy_from_slice(payload.as_bytes()),
            }),
        );
    }

    fn advance(&mut self, d: Duration) {
        self.now = self.now.after(d);
        for e in &mut self.engines {
            e.handle_timeout(self.now);
        }
        self.settle();
    }
}

fn publishes(packets: &[Packet]) -> Vec<(String, String, QoS, bool)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((
                p.topic.to_string(),
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.qos,
                p.retain,
            )),
            _ => None,
        })
        .collect()
}

fn ack_all(cl: &mut Cluster, c: Client, packets: &[Packet]) {
    acknowledge(cl, c, packets);
    cl.settle();
}

/// Answers the PUBLISH and PUBREL packets as a client would, leaving the wires alone.
fn acknowledge(cl: &mut Cluster, c: Client, packets: &[Packet]) {
    for p in packets {
        if let Packet::Publish(p) = p {
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => cl.input(c, Packet::Puback(p.packet_id)),
                QoS::ExactlyOnce => cl.input(c, Packet::Pubrec(p.packet_id)),
            }
        }
        if let Packet::Pubrel(id) = p {
            cl.input(c, Packet::Pubcomp(*id));
        }
    }
}

#[test]
fn qos_downgrade_table() {
    // Delivered QoS = min(publish QoS, subscription QoS), every combination.
    let mut cl = Cluster::new(1);
    let p = cl.connect(0, "pub", true);
    let qs = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    let subs: Vec<Client> = qs
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let c = cl.connect(0, &format!("sub{i}"), true);
            assert_eq!(cl.subscribe(c, &[("t", *q)]), vec![SubackCode::Granted(*q)]);
            c
        })
        .collect();
    for (pid, pq) in qs.iter().enumerate() {
        cl.publish(p, "t", "x", *pq, false, pid as u16 + 1);
        let acks = cl.recv(p);
        match pq {
            QoS::AtMostOnce => assert!(acks.is_empty()),
            QoS::AtLeastOnce => assert_eq!(acks, vec![Packet::Puback(2)]),
            QoS::ExactlyOnce => assert_eq!(acks, vec![Packet::Pubrec(3)]),
        }
        for (s, sq) in subs.iter().zip(qs) {
            let got = cl.recv(*s);
            assert_eq!(
                publishes(&got),
                vec![("t".into(), "x".into(), (*pq).min(sq), false)],
                "pub {pq:?} sub {sq:?}"
            );
            ack_all(&mut cl, *s, &got);
        }
    }
}

#[test]
fn qos2_inbound_is_routed_once() {
    let mut cl = Cluster::new(1);
    let p = cl.connect(0, "pub", true);
    let s = cl.connect(0, "sub", true);
    cl.subscribe(s, &[("t", QoS::ExactlyOnce)]);
    cl.publish(p, "t", "once", QoS::ExactlyOnce, false, 9);
    cl.send(
        p,
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: "t".into(),
            packet_id: 9,
            payload: Bytes::from_static(b"once"),
        }),
    );
    assert_eq!(cl.recv(p), vec![Packet::Pubrec(9), Packet::Pubrec(9)]);
    cl.send(p, Packet::Pubrel(9));
    assert_eq!(cl.recv(p), vec![Packet::Pubcomp(9)]);
    let got = cl.recv(s);
    assert_eq!(publishes(&got).len(), 1);
    // Outbound QoS 2: PUBREC → PUBREL → PUBCOMP.
    let Packet::Publish(pp) = &got[0] else {
        panic!()
    };
    cl.send(s, Packet::Pubrec(pp.packet_id));
    assert_eq!(cl.recv(s), vec![Packet::Pubrel(pp.packet_id)]);
    cl.send(s, Packet::Pubcomp(pp.packet_id));
    assert!(cl.recv(s).is_empty());
}

#[test]
fn overlapping_subscriptions_get_one_copy_at_highest_qos() {
    let mut cl = Cluster::new(1);
    let s = cl.connect(0, "sub", true);
    cl.subscribe(
        s,
        &[
            ("a/+", QoS::AtMostOnce),
            ("a/#", QoS::ExactlyOnce),
            ("a/b", QoS::AtLeastOnce),
        ],
    );
    let p = cl.connect(0, "pub", true);
    cl.publish(p, "a/b", "x", QoS::ExactlyOnce, false, 1);
    assert_eq!(
        publishes(&cl.recv(s)),
        vec![("a/b".into(), "x".into(), QoS::ExactlyOnce, false)]
    );
}

#[test]
fn suback_waits_for_every_shard_and_cross_shard_delivery_works() {
    let mut cl = Cluster::new(3);
    let s = cl.connect(0, "sub", true);
    cl.input(
        s,
        Packet::Subscribe(Subscribe {
            packet_id: 5,
            filters: vec![("x/#".into(), QoS::AtLeastOnce)],
        }),
    );
    assert!(
        cl.recv(s).is_empty(),
        "SUBACK before the route reached the other shards"
    );
    // Shard 1 applies and acks; shard 2 not yet.
    assert!(cl.deliver_one(0, 1));
    assert!(cl.deliver_one(1, 0));
    assert!(cl.recv(s).is_empty());
    assert!(cl.deliver_one(0, 2));
    assert!(cl.deliver_one(2, 0));
    assert_eq!(
        cl.recv(s),
        vec![Packet::Suback(Suback {
            packet_id: 5,
            codes: vec![SubackCode::Granted(QoS::AtLeastOnce)]
        })]
    );
    // A publish on any shard after SUBACK reaches the subscriber.
    for shard in 0..3 {
        let p = cl.connect(shard, &format!("pub{shard}"), true);
        cl.publish(p, "x/y", &shard.to_string(), QoS::AtLeastOnce, false, 1);
        let got = cl.recv(s);
        assert_eq!(
            publishes(&got),
            vec![("x/y".into(), shard.to_string(), QoS::AtLeastOnce, false)]
        );
        ack_all(&mut cl, s, &got);
    }
    // Unsubscribe removes the route everywhere.
    cl.send(
        s,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 6,
            filters: vec!["x/#".into()],
        }),
    );
    assert_eq!(cl.recv(s), vec![Packet::Unsuback(6)]);
    for e in &cl.engines {
        assert!(e.routes.is_empty() && e.local.is_empty());
    }
}

#[test]
fn shared_subscriptions_are_refused() {
    let mut cl = Cluster::new(1);
    let s = cl.connect(0, "sub", true);
    assert_eq!(
        cl.subscribe(
            s,
            &[("$share/g/t", QoS::AtLeastOnce), ("t", QoS::AtMostOnce)]
        ),
        vec![SubackCode::Failure, SubackCode::Granted(QoS::AtMostOnce)]
    );
    let (c31, _) = cl.connect_with(0, "old", true, ProtocolLevel::V31, None);
    cl.send(
        c31,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("$queue/t".into(), QoS::AtMostOnce)],
        }),
    );
    assert!(
        cl.closing(c31),
        "3.1 has no SUBACK failure: the connection closes"
    );
}

#[test]
fn sys_topics_are_not_matched_by_wildcards() {
    let mut cl = Cluster::new(2);
    let all = cl.connect(0, "all", true);
    cl.subscribe(all, &[("#", QoS::AtMostOnce), ("+/x", QoS::AtMostOnce)]);
    let sys = cl.connect(1, "sys", true);
    cl.subscribe(sys, &[("$SYS/#", QoS::AtMostOnce)]);
    // The broker's own messages, from either shard, reach `$SYS/#` and not the wildcards.
    for shard in 0..2 {
        let now = cl.now;
        cl.engines[shard].publish_system("$SYS/x", Bytes::from_static(b"s"), false, now);
        cl.settle();
        assert!(publishes(&cl.recv(all)).is_empty());
        assert_eq!(publishes(&cl.recv(sys)).len(), 1, "from shard {shard}");
    }
    // A client's PUBLISH into `$SYS/` is dropped and counted.
    let p = cl.connect(1, "p", true);
    cl.publish(p, "$SYS/x", "forged", QoS::AtMostOnce, false, 0);
    assert!(publishes(&cl.recv(sys)).is_empty());
    assert_eq!(cl.engines[1].metrics.sys_publish_denied, 1);
}

#[test]
fn retained_set_replace_clear_and_wildcards_across_shards() {
    let mut cl = Cluster::new(3);
    let p = cl.connect(1, "p", true);
    for (i, t) in ["r/a", "r/b", "r/c/d", "q"].iter().enumerate() {
        cl.publish(p, t, &format!("v{i}"), QoS::AtLeastOnce, true, i as u16 + 1);
    }
    cl.publish(p, "r/a", "v9", QoS::AtMostOnce, true, 0);
    cl.publish(p, "r/b", "", QoS::AtMostOnce, true, 0);
    let total: u64 = cl.engines.iter().map(|e| e.retained_count()).sum();
    assert_eq!(total, 3);
    let s = cl.connect(2, "s", true);
    cl.send(
        s,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("r/#".into(), QoS::ExactlyOnce)],
        }),
    );
    let mut got = publishes(&cl.recv(s));
    got.sort();
    assert_eq!(
        got,
        vec![
            ("r/a".into(), "v9".into(), QoS::AtMostOnce, true),
            ("r/c/d".into(), "v2".into(), QoS::AtLeastOnce, true)
        ]
    );
    let s2 = cl.connect(0, "s2", true);
    cl.send(
        s2,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("q".into(), QoS::AtMostOnce)],
        }),
    );
    assert_eq!(
        publishes(&cl.recv(s2)),
        vec![("q".into(), "v3".into(), QoS::AtMostOnce, true)]
    );
    // Live deliveries to existing subscribers carry retain = 0.
    cl.publish(p, "q", "live", QoS::AtMostOnce, true, 0);
    assert_eq!(
        publishes(&cl.recv(s2)),
        vec![("q".into(), "live".into(), QoS::AtMostOnce, false)]
    );
}

fn will(topic: &str) -> Option<LastWill> {
    Some(LastWill {
        topic: topic.into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
    })
}

#[test]
fn will_on_abnormal_close_not_on_disconnect() {
    let mut cl = Cluster::new(2);
    let w = cl.connect(1, "watcher", true);
    cl.subscribe(w, &[("will/#", QoS::AtLeastOnce)]);
    let (a, _) = cl.connect_with(0, "a", true, ProtocolLevel::V311, will("will/a"));
    cl.drop_conn(a);
    assert_eq!(
        publishes(&cl.recv(w)).len(),
        1,
        "socket closed without DISCONNECT: will"
    );
    let (b, _) = cl.connect_with(0, "b", true, ProtocolLevel::V311, will("will/b"));
    cl.send(b, Packet::Disconnect);
    assert!(cl.closing(b));
    cl.drop_conn(b);
    let got = cl.recv(w);
    ack_all(&mut cl, w, &got);
    assert!(
        publishes(&got).iter().all(|(t, ..)| t != "will/b"),
        "DISCONNECT discards the will"
    );
    let (c, _) = cl.connect_with(0, "c", true, ProtocolLevel::V311, will("will/c"));
    cl.send(
        c,
        Packet::Connack(Connack {
            session_present: false,
            code: ConnectReturnCode::Accepted,
        }),
    );
    assert!(cl.closing(c));
    assert_eq!(
        publishes(&cl.recv(w))
            .iter()
            .filter(|(t, ..)| t == "will/c")
            .count(),
        1,
        "protocol violation: will"
    );
    let (d, _) = cl.connect_with(0, "d", true, ProtocolLevel::V311, will("will/d"));
    let _ = cl.connect(1, "d", true);
    assert!(cl.closing(d));
    assert_eq!(
        publishes(&cl.recv(w))
            .iter()
            .filter(|(t, ..)| t == "will/d")
            .count(),
        1,
        "takeover: will"
    );
}

#[test]
fn connect_timeout_and_keepalive_expire() {
    let mut cl = Cluster::new(1);
    let idle = cl.open(0);
    let c = cl.connect(0, "ka", true);
    cl.advance(Duration::from_secs(10));
    cl.send(c, Packet::Pingreq);
    assert_eq!(cl.recv(c), vec![Packet::Pingresp]);
    cl.engines[0].conn_timeout(idle.id, cl.now);
    assert!(!cl.closing(idle), "15s idle_timeout not reached");
    cl.advance(Duration::from_secs(5));
    cl.engines[0].conn_timeout(idle.id, cl.now);
    assert!(cl.closing(idle));
    assert_eq!(cl.engines[0].metrics.connect_timeouts, 1);
    // PINGREQ came at +10s: the deadline is +25s.
    cl.advance(Duration::from_millis(9_999));
    cl.engines[0].conn_timeout(c.id, cl.now);
    assert!(!cl.closing(c), "PINGREQ reset the keepalive");
    cl.advance(Duration::from_millis(1));
    cl.engines[0].conn_timeout(c.id, cl.now);
    assert!(cl.closing(c));
    assert_eq!(cl.engines[0].metrics.keepalive_timeouts, 1);
}

#[test]
fn client_id_rules() {
    let mut cl = Cluster::new(1);
    let (_, out) = cl.connect_with(0, "", true, ProtocolLevel::V311, None);
    assert!(matches!(
        out[0],
        Packet::Connack(Connack {
            code: ConnectReturnCode::Accepted,
            ..
        })
    ));
    let (c, out) = cl.connect_with(0, "", false, ProtocolLevel::V311, None);
    assert_eq!(
        out,
        vec![Packet::Connack(Connack {
            session_present: false,
            code: ConnectReturnCode::IdentifierRejected
        })]
    );
    assert!(cl.closing(c));
    let (_, out) = cl.connect_with(0, "", true, ProtocolLevel::V31, None);
    assert_eq!(
        out,
        vec![Packet::Connack(Connack {
            session_present: false,
            code: ConnectReturnCode::IdentifierRejected
        })]
    );
    let (_, out) = cl.connect_with(
        0,
        "a23456789012345678901234",
        true,
        ProtocolLevel::V31,
        None,
    );
    assert_eq!(
        out,
        vec![Packet::Connack(Connack {
            session_present: false,
            code: ConnectReturnCode::IdentifierRejected
        })]
    );
    let (_, out) = cl.connect_with(
        0,
        "a2345678901234567890123",
        false,
        ProtocolLevel::V31,
        None,
    );
    assert!(matches!(
        out[0],
        Packet::Connack(Connack {
            code: ConnectReturnCode::Accepted,
            session_present: false
        })
    ));
    let (_, out) = cl.connect_with(
        0,
        "a2345678901234567890123",
        false,
        ProtocolLevel::V31,
        None,
    );
    assert!(
        matches!(
            out[0],
            Packet::Connack(Connack {
                code: ConnectReturnCode::Accepted,
                session_present: false
            })
        ),
        "3.1 has no session-present bit"
    );
}

#[test]
fn persistent_session_queues_offline_and_resends_on_reconnect() {
    let mut cl = Cluster::new(2);
    let s = cl.connect(0, "dev", false);
    cl.subscribe(s, &[("d/#", QoS::ExactlyOnce)]);
    let p = cl.connect(1, "p", true);
    cl.publish(p, "d/1", "inflight", QoS::AtLeastOnce, false, 1);
    let got = cl.recv(s);
    assert_eq!(publishes(&got).len(), 1); // not acknowledged
    cl.drop_conn(s);
    for i in 0..3 {
        cl.publish(
            p,
            "d/1",
            &format!("q{i}"),
            QoS::from_u8(i as u8).unwrap(),
            false,
            10 + i,
        );
    }
    let s2 = cl.open(1);
    cl.send(
        s2,
        Packet::Connect(Box::new(Connect {
            level: ProtocolLevel::V311,
            client_id: "dev".into(),
            clean_session: false,
            keep_alive: 0,
            will: None,
            username: None,
            password: None,
        })),
    );
    let out = cl.recv(s2);
    assert_eq!(
        out[0],
        Packet::Connack(Connack {
            session_present: true,
            code: ConnectReturnCode::Accepted
        })
    );
    let Packet::Publish(first) = &out[1] else {
        panic!("{out:?}")
    };
    assert!(first.dup && &first.payload[..] == b"inflight");
    let rest: Vec<String> = publishes(&out[2..]).into_iter().map(|p| p.1).collect();
    assert_eq!(rest, vec!["q0", "q1", "q2"]);
    // The subscriptions moved with the session.
    ack_all(&mut cl, s2, &out);
    cl.publish(p, "d/2", "after", QoS::AtLeastOnce, false, 20);
    assert_eq!(publishes(&cl.recv(s2)).len(), 1);
    assert!(
        cl.engines[0].local.is_empty() && cl.engines[0].forwarders.is_empty(),
        "old holder cleaned up"
    );
    // A clean reconnect discards it.
    let s3 = cl.open(0);
    cl.send(
        s3,
        Packet::Connect(Box::new(Connect {
            level: ProtocolLevel::V311,
            client_id: "dev".into(),
            clean_session: true,
            keep_alive: 0,
            will: None,
            username: None,
            password: None,
        })),
    );
    assert_eq!(
        cl.recv(s3)[0],
        Packet::Connack(Connack {
            session_present: false,
            code: ConnectReturnCode::Accepted
        })
    );
    assert!(cl.closing(s2));
    cl.publish(p, "d/3", "gone", QoS::AtLeastOnce, false, 21);
    assert!(publishes(&cl.recv(s3)).is_empty());
}

#[test]
fn offline_sessions_expire() {
    let mut cl = Cluster::with(1, |c| c.session_expiry = Some(Duration::from_secs(60)));
    let s = cl.connect(0, "dev", false);
    cl.subscribe(s, &[("t", QoS::AtLeastOnce)]);
    cl.drop_conn(s);
    assert_eq!(cl.engines[0].session_count(), 1);
    cl.advance(Duration::from_secs(59));
    assert_eq!(cl.engines[0].session_count(), 1);
    cl.advance(Duration::from_secs(1));
    assert_eq!(cl.engines[0].session_count(), 0);
    assert_eq!(cl.engines[0].metrics.sessions_expired, 1);
    assert!(cl.engines[0].registry.is_empty());
    assert!(cl.engines[0].local.is_empty());
}

#[test]
fn clean_sessions_leave_nothing_behind() {
    let mut cl = Cluster::new(3);
    for i in 0..20 {
        let c = cl.connect(i % 3, &format!("c{i}"), true);
        cl.subscribe(
            c,
            &[
                ("a/#", QoS::AtLeastOnce),
                (&format!("own/{i}"), QoS::AtMostOnce),
            ],
        );
        cl.drop_conn(c);
    }
    for e in &cl.engines {
        assert_eq!(e.session_count(), 0);
        assert!(
            e.registry.is_empty()
                && e.local.is_empty()
                && e.routes.is_empty()
                && e.sessions.is_empty()
                && e.conns.is_empty()
        );
    }
}

#[test]
fn concurrent_connects_with_one_client_id_leave_one_winner() {
    let mut cl = Cluster::new(3);
    let clients: Vec<Client> = (0..3).map(|s| cl.open(s)).collect();
    for c in &clients {
        cl.input(
            *c,
            Packet::Connect(Box::new(Connect {
                level: ProtocolLevel::V311,
                client_id: "same".into(),
                clean_session: false,
                keep_alive: 0,
                will: None,
                username: None,
                password: None,
            })),
        );
    }
    cl.settle();
    let alive: Vec<_> = clients.iter().filter(|c| !cl.closing(**c)).collect();
    assert_eq!(alive.len(), 1);
    let total: usize = cl.engines.iter().map(|e| e.session_count()).sum();
    assert_eq!(total, 1);
}

#[test]
fn retry_interval_resends_on_simulated_clock() {
    let mut cl = Cluster::with(1, |c| {
        c.limits.retry_interval = Some(Duration::from_secs(5))
    });
    let s = cl.connect(0, "s", true);
    cl.subscribe(s, &[("t", QoS::AtLeastOnce)]);
    let p = cl.connect(0, "p", true);
    cl.publish(p, "t", "x", QoS::AtLeastOnce, false, 1);
    let Packet::Publish(first) = cl.recv(s).remove(0) else {
        panic!()
    };
    cl.advance(Duration::from_millis(4_999));
    assert!(cl.recv(s).is_empty());
    cl.advance(Duration::from_millis(1));
    let Packet::Publish(again) = cl.recv(s).remove(0) else {
        panic!()
    };
    assert!(again.dup && again.packet_id == first.packet_id);
    cl.send(s, Packet::Puback(first.packet_id));
    cl.advance(Duration::from_secs(10));
    assert!(cl.recv(s).is_empty());
}

fn publish_packet(topic: &str, payload: &[u8], qos: QoS, pid: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { pid },
        payload: Bytes::copy_from_slice(payload),
    })
}

/// A full queue to another shard: QoS 0 is dropped and counted; a QoS 1 PUBLISH, a SUBSCRIBE
/// and a CONNECT are held back (not acknowledged, their connections not read) and a QoS 1 will
/// waits, so no queue ever holds more than `max_pending`; all of them go ahead, in order, once
/// the queues are below half.
#[test]
fn cross_shard_queues_are_bounded_for_every_message_kind() {
    let mut cl = Cluster::with(2, |c| c.max_pending = 4);
    let s = cl.connect(1, "s", true);
    cl.subscribe(s, &[("t/#", QoS::AtLeastOnce)]);
    let p = cl.connect(0, "p", true);
    let (doomed, _) = cl.connect_with(
        0,
        "doomed",
        true,
        ProtocolLevel::V311,
        Some(LastWill {
            topic: "t/will".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
        }),
    );
    let other = cl.connect(0, "other", true);
    for i in 0..6u8 {
        cl.input(p, publish_packet("t/0", &[i], QoS::AtMostOnce, 0));
        cl.assert_data_bound(4);
    }
    assert_eq!(cl.engines[0].metrics.dropped_overload, 2);
    cl.input(p, publish_packet("t/1", b"q1", QoS::AtLeastOnce, 7));
    assert!(
        !cl.engines[0].conn_readable(p.id),
        "QoS 1 publisher held back"
    );
    assert!(cl.recv(p).is_empty(), "not acknowledged while held back");
    cl.engines[0].conn_closed(doomed.id, cl.now);
    cl.input(
        other,
        Packet::Subscribe(Subscribe {
            packet_id: 3,
            filters: vec![("x".into(), QoS::AtMostOnce)],
        }),
    );
    assert!(
        !cl.engines[0].conn_readable(other.id),
        "SUBSCRIBE held back"
    );
    let late = cl.open(0);
    cl.connect_unsettled(late, "late", true, 0);
    cl.assert_data_bound(4);
    assert!(
        cl.engines[0].outgoing[1].queue.len() <= 4,
        "nothing else was queued"
    );
    cl.settle();
    assert_eq!(cl.recv(p), vec![Packet::Puback(7)]);
    assert!(
        cl.engines[0].conn_readable(p.id),
        "resumed once the queue drained"
    );
    assert!(matches!(cl.recv(other)[..], [Packet::Suback(_)]));
    assert!(matches!(cl.recv(late).first(), Some(Packet::Connack(_))));
    let got = cl.recv(s);
    ack_all(&mut cl, s, &got);
    let payloads: Vec<String> = publishes(&got).into_iter().map(|p| p.1).collect();
    assert_eq!(
        payloads,
        vec!["\0", "\u{1}", "\u{2}", "\u{3}", "gone", "q1"],
        "the queued QoS 0 messages, then the will and the held-back PUBLISH"
    );
}

#[test]
fn a_close_that_cannot_flush_is_reset_after_close_timeout() {
    let mut cl = Cluster::new(1);
    let c = cl.connect(0, "slow", true);
    cl.subscribe(c, &[("t", QoS::AtMostOnce)]);
    let p = cl.connect(0, "p", true);
    cl.publish(p, "t", "never read", QoS::AtMostOnce, false, 0);
    cl.engines[0].handle_decode_error(c.id, &DecodeError::InvalidPublishQos, cl.now);
    let status = |cl: &Cluster| cl.engines[0].conn_status(c.id).unwrap();
    assert!(status(&cl).close && !status(&cl).reset);
    assert_eq!(
        status(&cl).deadline,
        Some(cl.now.after(Duration::from_secs(5)))
    );
    cl.advance(Duration::from_millis(4_999));
    assert!(!status(&cl).reset);
    cl.advance(Duration::from_millis(1));
    assert!(status(&cl).reset, "reset after mqtt.close_timeout");
    assert_eq!(status(&cl).deadline, None);
    assert_eq!(cl.engines[0].metrics.close_timeouts, 1);
    assert!(cl.engines[0]
        .conn_outbox(c.id)
        .is_some_and(|o| o.is_empty()));
    cl.check();
}

#[test]
fn a_connect_the_owner_never_answers_times_out() {
    let mut cl = Cluster::new(2);
    let id = (0..100)
        .map(|i| format!("far{i}"))
        .find(|id| owner_shard(id.as_bytes(), 2) == 1)
        .unwrap();
    let c = cl.open(0);
    cl.connect_unsettled(c, &id, true, 0);
    // The owner (shard 1) does not answer: its messages stay on the wire.
    let now = cl.now.after(Duration::from_secs(15));
    cl.now = now;
    cl.engines[0].handle_timeout(now);
    assert!(cl.closing(c), "no CONNACK within mqtt.idle_timeout");
    assert_eq!(cl.engines[0].metrics.connect_timeouts, 1);
    cl.drop_conn(c);
    cl.settle();
    for e in &cl.engines {
        assert_eq!(e.session_count(), 0);
        assert!(e.registry.is_empty());
    }
}

/// A client that does not read: QoS 0 to it is dropped and QoS 1 queued once its outbox holds
/// `mqtt.max_write_buffer`, it is not read meanwhile, and reading resumes (and the queue
/// follows) once it has read.
#[test]
fn a_full_outbox_stops_reading_and_holds_deliveries_back() {
    let mut cl = Cluster::with(1, |c| c.max_write_buffer = 1024);
    let s = cl.connect(0, "s", true);
    cl.subscribe(s, &[("t", QoS::AtLeastOnce)]);
    let p = cl.connect(0, "p", true);
    for i in 0..4 {
        cl.publish(p, "t", &format!("{i:0>300}"), QoS::AtMostOnce, false, 0);
    }
    assert!(
        !cl.engines[0].conn_readable(s.id),
        "outbox over the limit: not read"
    );
    cl.publish(p, "t", "dropped", QoS::AtMostOnce, false, 0);
    cl.publish(p, "t", "queued", QoS::AtLeastOnce, false, 9);
    assert_eq!(cl.engines[0].metrics.dropped_slow_consumer, 1);
    let first = cl.recv(s);
    assert_eq!(publishes(&first).len(), 4);
    assert!(cl.engines[0].conn_readable(s.id));
    // Reading what was written makes room: the queued delivery follows.
    let rest: Vec<String> = publishes(&cl.recv(s)).into_iter().map(|p| p.1).collect();
    assert_eq!(rest, vec!["queued"]);
    cl.check();
}

/// Past `shards.max_write_buffer` for all connections together, QoS 0 is dropped (counted
/// apart from slow consumers) and QoS 1 waits in the session queue, until the outboxes are
/// below three quarters of it.
#[test]
fn the_shard_write_buffer_limit_holds_deliveries_back() {
    let mut cl = Cluster::with(1, |c| {
        c.max_write_buffer = 4096;
        c.shard_write_buffer = 2048;
    });
    let subs: Vec<Client> = (0..4)
        .map(|i| {
            let c = cl.connect(0, &format!("s{i}"), true);
            cl.subscribe(c, &[("t", QoS::AtLeastOnce)]);
            c
        })
        .collect();
    let p = cl.connect(0, "p", true);
    let big = "x".repeat(1000);
    cl.publish(p, "t", &big, QoS::AtLeastOnce, false, 1);
    // Three outboxes of ~1 KB each take the shard past its limit; the fourth waits.
    assert_eq!(cl.engines[0].session_queue_len("s3"), 1);
    cl.publish(p, "t", "small", QoS::AtMostOnce, false, 0);
    assert_eq!(cl.engines[0].metrics.dropped_shard_write_buffer_full, 3);
    assert_eq!(cl.engines[0].metrics.dropped_slow_consumer, 0);
    // s0 reads: still above 3/4 of the limit. s1 reads: below; s3's deliveries follow.
    assert_eq!(publishes(&cl.recv(subs[0])).len(), 1);
    assert_eq!(cl.engines[0].session_queue_len("s3"), 2);
    assert_eq!(publishes(&cl.recv(subs[1])).len(), 1);
    assert_eq!(cl.engines[0].session_queue_len("s3"), 0);
    let got: Vec<String> = publishes(&cl.recv(subs[3]))
        .into_iter()
        .map(|p| p.1)
        .collect();
    assert_eq!(got, vec![big, "small".to_string()]);
    cl.check();
}

/// A persistent subscriber is taken over from one shard to another while publishers on every
/// shard keep publishing, under random interleavings of the cross-shard wires: every message
/// reaches the client (old connection or new), each publisher's messages arrive in the order it
/// sent them, and the new connection never gets one twice except as a DUP resend of a delivery
/// the old one did not acknowledge. With a small `max_pending`, no queue ever holds more
/// application messages than that.
fn takeover_under_load(
    seed_steps: Vec<(u8, u8)>,
    from_shard: usize,
    to_shard: usize,
    max_pending: usize,
) {
    assert_ne!(from_shard, to_shard, "a move between two shards");
    let small = max_pending < 100;
    let mut cl = Cluster::with(3, |c| {
        c.max_pending = max_pending;
        if small {
            c.batch_size = 2;
        }
    });
    if small {
        // Slow channels: the engines' own queues fill up.
        cl.wire_capacity = 2;
    }
    let old = cl.connect(from_shard, "mover", false);
    cl.subscribe(old, &[("load/#", QoS::AtLeastOnce)]);
    let pubs: Vec<Client> = (0..3)
        .map(|s| cl.connect(s, &format!("pub{s}"), true))
        .collect();
    // Each publisher's PUBLISHes not yet read by the broker (a driver reads only while the
    // connection is readable). Message n (from 1) comes from publisher (n - 1) % 3.
    let mut unread: Vec<VecDeque<Packet>> = vec![VecDeque::new(); 3];
    let mut n = 0u32;
    let mut publish_some = |unread: &mut Vec<VecDeque<Packet>>, k: usize| {
        for _ in 0..k {
            n += 1;
            unread[(n as usize - 1) % 3].push_back(Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "load/x".into(),
                packet_id: (n % 60_000) as u16 + 1,
                payload: Bytes::from(n.to_string()),
            }));
        }
    };
    let feed = |cl: &mut Cluster, unread: &mut Vec<VecDeque<Packet>>| {
        for (i, q) in unread.iter_mut().enumerate() {
            let c = pubs[i];
            while cl.engines[c.shard].conn_readable(c.id) {
                let Some(p) = q.pop_front() else { break };
                cl.input(c, p);
                cl.assert_data_bound(max_pending);
            }
        }
    };
    publish_some(&mut unread, 6);
    feed(&mut cl, &mut unread);
    let newc = cl.open(to_shard);
    cl.connect_unsettled(newc, "mover", false, 0);
    let mut seen_old: Vec<u32> = Vec::new();
    for (a, b) in seed_steps {
        let (from, to) = (a as usize % 3, b as usize % 3);
        if from != to {
            cl.deliver_one(from, to);
            cl.assert_data_bound(max_pending);
        }
        if a % 4 == 0 {
            publish_some(&mut unread, 1);
        }
        feed(&mut cl, &mut unread);
        // The old client acknowledges what it gets until it is closed.
        if !cl.closing(old) {
            let got = cl.recv(old);
            acknowledge(&mut cl, old, &got);
            seen_old.extend(publishes(&got).iter().map(|p| p.1.parse::<u32>().unwrap()));
        }
    }
    let total = n;
    while unread.iter().any(|q| !q.is_empty()) {
        cl.settle();
        feed(&mut cl, &mut unread);
    }
    cl.settle();
    if !cl.closing(old) {
        seen_old.extend(
            publishes(&cl.recv(old))
                .iter()
                .map(|p| p.1.parse::<u32>().unwrap()),
        );
    }
    let mut seen_new: Vec<(u32, bool)> = Vec::new();
    loop {
        let got = cl.recv(newc);
        if got.is_empty() {
            break;
        }
        for p in &got {
            if let Packet::Publish(p) = p {
                let k = String::from_utf8_lossy(&p.payload).parse::<u32>().unwrap();
                seen_new.push((k, p.dup));
            }
        }
        ack_all(&mut cl, newc, &got);
    }
    // Per publisher: what the old connection read, then what the new one got, without the
    // DUP resends of what the old one had read, is strictly increasing (in order, once).
    let old_set: AHashSet<u32> = seen_old.iter().copied().collect();
    let mut last = [0u32; 3];
    let mut got_all = AHashSet::new();
    let sequence = seen_old.iter().map(|&k| (k, false)).chain(
        seen_new
            .iter()
            .copied()
            .filter(|&(k, dup)| !(dup && old_set.contains(&k))),
    );
    for (k, dup) in sequence {
        let publisher = (k as usize - 1) % 3;
        assert!(
            k > last[publisher],
            "message {k} (dup {dup}) of publisher {publisher} after {}: old {seen_old:?}, new {seen_new:?}",
            last[publisher]
        );
        last[publisher] = k;
        got_all.insert(k);
    }
    for k in 1..=total {
        assert!(
            got_all.contains(&k),
            "message {k} of {total} lost (old {seen_old:?}, new {seen_new:?})"
        );
    }
    for e in &cl.engines {
        assert!(e.forwarders.is_empty(), "forwarder left behind");
        assert!(
            e.registry.values().all(|r| !r.busy),
            "registration left busy"
        );
        assert!(e.stalled.is_empty() && e.backlogged.is_empty());
        for (_, slot) in e.sessions.iter() {
            if let SessionSlot::Active(a) = slot {
                assert!(a.arrival.is_none(), "arrival never completed");
            }
        }
    }
}

#[test]
fn takeover_moves_session_without_loss_in_order() {
    takeover_under_load(vec![], 0, 1, 65_536);
    takeover_under_load(
        (0..200u8).map(|i| (i, i.wrapping_mul(7))).collect(),
        2,
        0,
        65_536,
    );
    takeover_under_load(
        (0..200u8).map(|i| (i, i.wrapping_mul(5))).collect(),
        1,
        2,
        3,
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn takeover_random_interleavings(
        steps in prop::collection::vec((any::<u8>(), any::<u8>()), 0..160),
        from in 0usize..3,
        offset in 1usize..3,
        small_queues in any::<bool>(),
    ) {
        takeover_under_load(steps, from, (from + offset) % 3, if small_queues { 4 } else { 65_536 });
    }
}

/// Client `mv` (persistent, subscribed to `o/#`) moves from shard 1 to shard 2 while shard 0
/// does not yet route to shard 2 (shard 2's route to it is held back), and the first message,
/// `m1` from a publisher on shard 0, waits on the wire from shard 1 to shard 2 as a forward.
/// Returns (the old connection, the publisher, the new connection).
fn move_with_m1_forwarded(cl: &mut Cluster) -> (Client, Client, Client) {
    let old = cl.connect(1, "mv", false);
    cl.subscribe(old, &[("o/#", QoS::AtLeastOnce)]);
    let p = cl.connect(0, "p", true);
    let newc = cl.open(2);
    cl.connect_unsettled(newc, "mv", false, 0);
    let route_to_0 = |from: usize, to: usize, m: &ShardMsg| {
        from == 2 && to == 0 && matches!(control(m), Some(Control::Route { .. }))
    };
    cl.settle_holding(route_to_0);
    cl.publish_unsettled(p, "o/t", "m1", QoS::AtLeastOnce, 1);
    cl.settle_holding(|from, to, m| {
        route_to_0(from, to, m)
            || (from == 1 && to == 2 && matches!(control(m), Some(Control::Forward { .. })))
    });
    (old, p, newc)
}

/// The case: a publisher on shard 0, a session moving from shard 1 to shard 2. The
/// first message goes through shard 1 (shard 0 does not route to shard 2 yet) and is forwarded;
/// the second goes to shard 2 directly and gets there first. The new holder must still deliver
/// them in order.
#[test]
fn a_direct_message_does_not_overtake_a_forwarded_one() {
    let mut cl = Cluster::new(3);
    let (old, p, newc) = move_with_m1_forwarded(&mut cl);
    assert!(cl.closing(old), "taken over");
    // Shard 0 learns that shard 2 subscribes; m2 goes there directly, and arrives first.
    while cl.deliver_one(2, 0) {}
    cl.publish_unsettled(p, "o/t", "m2", QoS::AtLeastOnce, 2);
    while cl.deliver_one(0, 2) {}
    cl.settle();
    let got: Vec<String> = publishes(&cl.recv(newc)).into_iter().map(|p| p.1).collect();
    assert_eq!(got, vec!["m1", "m2"]);
    assert_eq!(
        cl.engines[2].metrics.dropped_duplicates, 1,
        "m2 came both ways"
    );
}

/// While shard 1 still forwards for a session that moved to shard 2, its client reconnects on
/// shard 2 with a clean session: the fresh session must get nothing of the old one's.
#[test]
fn a_clean_reconnect_during_forwarding_receives_nothing_of_the_old_session() {
    let mut cl = Cluster::new(3);
    let old = cl.connect(1, "mv", false);
    cl.subscribe(old, &[("old/#", QoS::AtLeastOnce)]);
    let p = cl.connect(0, "p", true);
    let moved = cl.open(2);
    cl.connect_unsettled(moved, "mv", false, 0);
    let release = |_: usize, _: usize, m: &ShardMsg| {
        matches!(control(m), Some(Control::ReleaseForward { .. }))
    };
    cl.settle_holding(release);
    assert!(!cl.closing(moved));
    let fresh = cl.open(2);
    cl.connect_unsettled(fresh, "mv", true, 0);
    cl.settle_holding(release);
    // Shard 0 still routes old/# to shard 1, which forwards.
    cl.publish_unsettled(p, "old/x", "for the old session", QoS::AtLeastOnce, 1);
    cl.settle();
    let got = cl.recv(fresh);
    assert!(
        matches!(got.first(), Some(Packet::Connack(a)) if !a.session_present),
        "{got:?}"
    );
    assert!(publishes(&got).is_empty(), "fresh session got {got:?}");
    // The move completed first: the message reached the session it was for.
    assert_eq!(publishes(&cl.recv(moved)).len(), 1);
    assert!(cl.closing(moved));
}

#[test]
fn a_forward_for_another_epoch_is_dropped() {
    let mut cl = Cluster::new(2);
    let c = cl.connect(1, "c", false);
    cl.subscribe(c, &[("t", QoS::AtLeastOnce)]);
    let msg = Arc::new(Message {
        id: message_id(0, 1),
        topic: "t".into(),
        payload: Bytes::from_static(b"stale"),
        qos: QoS::AtLeastOnce,
        retain: false,
    });
    let now = cl.now;
    cl.engines[1].handle_shard_msg(
        0,
        Control::Forward {
            client_id: "c".into(),
            epoch: 999,
            msg,
            qos: QoS::AtLeastOnce,
            retain: false,
        }
        .into(),
        now,
    );
    assert!(publishes(&cl.recv(c)).is_empty());
    assert_eq!(cl.engines[1].metrics.dropped_stale_forwards, 1);
}

#[test]
fn puback_of_a_retained_publish_waits_until_its_owner_shard_stored_it() {
    let mut cl = Cluster::new(2);
    let p = cl.connect(0, "p", true);
    // A topic owned by shard 1, published on shard 0.
    let topic = (0..100)
        .map(|i| format!("ret/{i}"))
        .find(|t| owner_shard(t.as_bytes(), 2) == 1)
        .unwrap();
    cl.input(
        p,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: topic.as_str().into(),
            packet_id: 7,
            payload: Bytes::from_static(b"v"),
        }),
    );
    // A later, non-retained publish on the same connection: its PUBACK must not overtake.
    cl.input(
        p,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "plain".into(),
            packet_id: 8,
            payload: Bytes::new(),
        }),
    );
    assert!(
        cl.recv(p).is_empty(),
        "PUBACK before the owner stored the retained message"
    );
    cl.settle();
    assert_eq!(cl.recv(p), vec![Packet::Puback(7), Packet::Puback(8)]);
    // A subscriber arriving after the PUBACK gets it.
    let s = cl.connect(0, "s", true);
    cl.send(
        s,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(topic.clone(), QoS::AtLeastOnce)],
        }),
    );
    assert_eq!(
        publishes(&cl.recv(s)),
        vec![(topic, "v".to_string(), QoS::AtLeastOnce, true)]
    );
}

#[test]
fn idle_connections_are_asked_to_park_and_traffic_defers_it() {
    let mut cl = Cluster::with(1, |c| c.park_after = Some(Duration::from_secs(2)));
    let c = cl.connect(0, "idle", true);
    let status = |cl: &Cluster| cl.engines[0].conn_status(c.id).unwrap();
    assert!(!status(&cl).park);
    cl.advance(Duration::from_millis(1_500));
    cl.engines[0].note_io(c.id, cl.now);
    cl.advance(Duration::from_millis(1_500));
    assert!(!status(&cl).park, "traffic moved the park deadline");
    cl.advance(Duration::from_millis(600));
    assert!(status(&cl).park);
    // Parked: deliveries wake the parking waker; promotion clears the state.
    cl.engines[0].conn_parked(c.id, std::task::Waker::noop().clone());
    assert_eq!(cl.engines[0].parked_count(), 1);
    assert!(!status(&cl).park);
    cl.engines[0].conn_promoted(c.id, cl.now);
    assert_eq!(cl.engines[0].parked_count(), 0);
    // An unconnected socket is never parked; keepalive still closes a parked one.
    cl.engines[0].conn_parked(c.id, std::task::Waker::noop().clone());
    let raw = cl.open(0);
    cl.advance(Duration::from_secs(10));
    assert!(!status_of(&cl, raw).park);
    cl.advance(Duration::from_secs(2));
    assert!(
        cl.closing(c),
        "keepalive (15 s) closed the parked connection"
    );
}

fn status_of(cl: &Cluster, c: Client) -> ConnStatus {
    cl.engines[c.shard].conn_status(c.id).unwrap()
}

#[test]
fn parking_frees_an_idle_sessions_delivery_state() {
    let mut cl = Cluster::new(1);
    let sub = cl.connect(0, "sub", false);
    cl.subscribe(sub, &[("t", QoS::AtLeastOnce)]);
    let publisher = cl.connect(0, "pub", true);
    cl.publish(publisher, "t", "m", QoS::AtLeastOnce, false, 1);
    let got = cl.recv(sub);
    let flows_of = |cl: &Cluster| {
        let e = &cl.engines[0];
        let ConnPhase::Connected(key) = e.conns[sub.id.idx as usize].phase else {
            panic!("not connected");
        };
        match &e.sessions[key as usize] {
            SessionSlot::Active(a) => a.session.flows.is_some(),
            SessionSlot::Forwarding(_) => panic!("moved"),
        }
    };
    assert!(flows_of(&cl), "a QoS 1 delivery in flight has state");
    ack_all(&mut cl, sub, &got);
    cl.settle();
    cl.engines[0].conn_parked(sub.id, std::task::Waker::noop().clone());
    assert!(!flows_of(&cl), "parked with nothing pending: state freed");
    // A delivery to the parked client allocates it again and is not lost.
    cl.publish(publisher, "t", "again", QoS::AtLeastOnce, false, 2);
    let again = cl.recv(sub);
    assert!(
        again
            .iter()
            .any(|p| matches!(p, Packet::Publish(p) if &p.payload[..] == b"again")),
        "{again:?}"
    );
    assert!(flows_of(&cl));
}

#[test]
fn retained_messages_follow_the_suback_once_every_shard_has_the_route() {
    let mut cl = Cluster::new(2);
    let publisher = cl.connect(1, "pub", true);
    for topic in ["r/0", "r/1", "r/2", "r/3"] {
        cl.publish(publisher, topic, topic, QoS::AtMostOnce, true, 0);
    }
    let sub = cl.connect(0, "sub", true);
    cl.input(
        sub,
        Packet::Subscribe(Subscribe {
            packet_id: 9,
            filters: vec![("r/+".to_string(), QoS::AtMostOnce)],
        }),
    );
    // Shard 1 has not acknowledged the route yet: neither the SUBACK nor any retained message
    // (some are stored on shard 0 itself) may reach the client.
    assert_eq!(cl.recv(sub), Vec::new());
    cl.settle();
    let got = cl.recv(sub);
    assert!(matches!(got.first(), Some(Packet::Suback(_))), "{got:?}");
    let retained: Vec<_> = got[1..]
        .iter()
        .map(|p| match p {
            Packet::Publish(p) if p.retain => p.topic.to_string(),
            other => panic!("expected a retained PUBLISH, got {other:?}"),
        })
        .collect();
    assert_eq!(retained.len(), 4, "{retained:?}");
}

/// An idle client costs a connection slot and a session slot (docs/architecture.md, memory per
/// connection): they must not grow unnoticed.
#[test]
fn connection_and_session_slots_stay_small() {
    assert!(
        std::mem::size_of::<Conn>() <= 136,
        "{}",
        std::mem::size_of::<Conn>()
    );
    assert!(
        std::mem::size_of::<SessionSlot>() <= 128,
        "{}",
        std::mem::size_of::<SessionSlot>()
    );
}

/// A client id whose owner is `shard` of `shards`.
/// A clean 3.1.1 CONNECT with these credentials.
pub(super) fn credentials_connect(
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Packet {
    Packet::Connect(Box::new(Connect {
        level: ProtocolLevel::V311,
        client_id: client_id.into(),
        clean_session: true,
        keep_alive: 10,
        will: None,
        username: username.map(str::to_string),
        password: password.map(|p| Bytes::copy_from_slice(p.as_bytes())),
    }))
}

/// An MQTT client on shard 1 without keepalive (the simulated clock runs for minutes).
fn steady(cl: &mut Cluster, cid: &str) -> Client {
    let c = cl.open(1);
    cl.connect_unsettled(c, cid, true, 0);
    cl.settle();
    cl.recv(c);
    c
}

pub(super) fn id_owned_by(prefix: &str, shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|id| owner_shard(id.as_bytes(), shards) == shard)
        .expect("some id hashes to every shard")
}

/// The delivery seam: a gateway's client is a session like any other, and receives typed
/// packets (deliveries with their packet ids, PUBREL, replies) instead of MQTT bytes. With
/// its client id owned by the accepting shard, and by the other one.
#[test]
fn a_gateway_client_gets_typed_packets_with_its_id_owned_anywhere() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let id = id_owned_by("gw", owner, 2);
        let g = cl.open_gateway(0);
        let out = cl.connect_opened(g, &id, true);
        assert!(
            matches!(
                out.as_slice(),
                [Packet::Connack(Connack {
                    code: ConnectReturnCode::Accepted,
                    session_present: false
                })]
            ),
            "owner {owner}: {out:?}"
        );
        assert_eq!(
            cl.subscribe(g, &[("g/#", QoS::ExactlyOnce)]),
            [SubackCode::Granted(QoS::ExactlyOnce)]
        );
        let p = cl.connect(1, "mqtt-pub", true);
        cl.publish(p, "g/1", "one", QoS::AtLeastOnce, false, 1);
        cl.publish(p, "g/2", "two", QoS::ExactlyOnce, true, 2);
        let got = cl.recv(g);
        let (one, two) = match got.as_slice() {
            [Packet::Publish(a), Packet::Publish(b)] => (a.clone(), b.clone()),
            other => panic!("owner {owner}: {other:?}"),
        };
        assert_eq!(
            (one.topic.as_str(), &one.payload[..], one.qos),
            ("g/1", &b"one"[..], QoS::AtLeastOnce)
        );
        assert_eq!(
            (two.topic.as_str(), &two.payload[..], two.qos),
            ("g/2", &b"two"[..], QoS::ExactlyOnce)
        );
        assert!(!one.dup && !two.retain, "a live delivery is not retained");
        assert_ne!(one.packet_id, two.packet_id);
        cl.send(g, Packet::Puback(one.packet_id));
        cl.send(g, Packet::Pubrec(two.packet_id));
        assert_eq!(cl.recv(g), [Packet::Pubrel(two.packet_id)]);
        cl.send(g, Packet::Pubcomp(two.packet_id));
        // Its own publishes reach MQTT subscribers, with the replies a client expects.
        let s = cl.connect(1, "mqtt-sub", true);
        cl.subscribe(s, &[("up/#", QoS::AtLeastOnce)]);
        cl.publish(g, "up/x", "from the gateway", QoS::AtLeastOnce, false, 7);
        assert_eq!(cl.recv(g), [Packet::Puback(7)]);
        assert_eq!(
            publishes(&cl.recv(s)),
            [(
                "up/x".into(),
                "from the gateway".into(),
                QoS::AtLeastOnce,
                false
            )]
        );
        assert_eq!(
            cl.engines[0].listener_connections(1),
            1,
            "counted under its listener"
        );
        cl.check();
    }
}

/// A gateway client and an MQTT client with one client id take each other's session over,
/// across shards, and the queued deliveries follow in order.
#[test]
fn a_session_moves_between_a_gateway_client_and_an_mqtt_client() {
    let mut cl = Cluster::new(2);
    let id = id_owned_by("mv", 1, 2);
    let g = cl.open_gateway(0);
    cl.connect_opened(g, &id, false);
    cl.subscribe(g, &[("m/t", QoS::AtLeastOnce)]);
    let p = cl.connect(0, "p", true);
    cl.publish(p, "m/t", "a", QoS::AtLeastOnce, false, 1);
    // The gateway does not acknowledge: "a" stays in flight.
    let first = cl.recv(g);
    assert_eq!(
        publishes(&first),
        [("m/t".into(), "a".into(), QoS::AtLeastOnce, false)]
    );
    let (m, out) = cl.connect_with(1, &id, false, ProtocolLevel::V311, None);
    assert!(
        matches!(
            out.first(),
            Some(Packet::Connack(Connack {
                session_present: true,
                ..
            }))
        ),
        "{out:?}"
    );
    assert!(cl.closing(g), "the gateway's connection was taken over");
    cl.publish(p, "m/t", "b", QoS::AtLeastOnce, false, 2);
    let mut got = publishes(&out[1..]);
    got.extend(publishes(&cl.recv(m)));
    assert_eq!(
        got.iter().map(|g| g.1.as_str()).collect::<Vec<_>>(),
        ["a", "b"],
        "the unacknowledged delivery is resent, then the next one"
    );
    // And back to a gateway client on the other shard.
    let g2 = cl.open_gateway(0);
    let out = cl.connect_opened(g2, &id, false);
    assert!(matches!(
        out.first(),
        Some(Packet::Connack(Connack {
            session_present: true,
            ..
        }))
    ));
    assert!(cl.closing(m));
    cl.check();
}

/// The CONNECT's username is the connection's, unless the transport vouched for another (a
/// verified client certificate's CN): that one stays, whichever shard owns the client id.
#[test]
fn a_username_from_the_transport_wins_over_the_connects() {
    for owner in 0..2 {
        let mut w = Cluster::new(2);
        let client_id = id_owned_by("cert", owner, 2);
        let c = w.open(0);
        w.engines[0].set_conn_username(c.id, "device-7");
        let mut connect = Connect {
            level: ProtocolLevel::V311,
            client_id: client_id.clone(),
            clean_session: true,
            keep_alive: 10,
            will: None,
            username: Some("someone-else".into()),
            password: None,
        };
        w.send(c, Packet::Connect(Box::new(connect.clone())));
        assert!(matches!(w.recv(c).first(), Some(Packet::Connack(_))));
        assert_eq!(w.engines[0].conn_username(c.id), Some("device-7"));

        let plain = w.open(0);
        assert_eq!(w.engines[0].conn_username(plain.id), None);
        connect.client_id = format!("{client_id}-plain");
        w.send(plain, Packet::Connect(Box::new(connect)));
        assert!(matches!(w.recv(plain).first(), Some(Packet::Connack(_))));
        assert_eq!(w.engines[0].conn_username(plain.id), Some("someone-else"));
    }
}

/// `$SYS/broker/clients/<id>/connected|disconnected`: published by the connection's shard,
/// whichever shard owns the client id, with the reason the connection ended.
#[test]
fn client_events_tell_who_came_and_why_they_left() {
    let mut cl = Cluster::with(2, |c| c.client_events = true);
    let watcher = cl.connect(1, "watcher", true);
    cl.subscribe(watcher, &[("$SYS/broker/clients/+/+", QoS::AtMostOnce)]);
    let _ = cl.recv(watcher);
    let event = |cl: &mut Cluster| -> (String, serde_json::Value) {
        let got = publishes(&cl.recv(watcher));
        assert_eq!(got.len(), 1, "{got:?}");
        let (topic, body, _, retain) = got.into_iter().next().unwrap();
        assert!(!retain);
        (topic, serde_json::from_str(&body).unwrap())
    };
    for owner in 0..2 {
        let id = id_owned_by(&format!("ev{owner}"), owner, 2);
        // Connected, then a clean DISCONNECT.
        let c = cl.connect(0, &id, true);
        let (topic, v) = event(&mut cl);
        assert_eq!(topic, format!("$SYS/broker/clients/{id}/connected"));
        assert_eq!(v["clientid"], id.as_str());
        assert_eq!(v["proto_name"], "MQTT");
        assert_eq!(v["proto_ver"], 4);
        assert_eq!(v["keepalive"], 10);
        assert_eq!(v["clean_session"], true);
        assert_eq!(v["shard"], 0);
        assert_eq!(v["ts"], cl.now.0);
        assert!(v.get("reason").is_none());
        cl.send(c, Packet::Disconnect);
        let (topic, v) = event(&mut cl);
        assert_eq!(topic, format!("$SYS/broker/clients/{id}/disconnected"));
        assert_eq!(v["reason"], "normal");

        // Taken over from the other shard: the old connection's shard tells.
        let old = cl.connect(0, &id, false);
        let _ = event(&mut cl);
        let new = cl.connect(1, &id, false);
        let got: Vec<(String, serde_json::Value)> = publishes(&cl.recv(watcher))
            .into_iter()
            .map(|(t, b, _, _)| (t, serde_json::from_str(&b).unwrap()))
            .collect();
        let gone = got
            .iter()
            .find(|(t, _)| t.ends_with("/disconnected"))
            .expect("a disconnected event");
        assert_eq!(
            (gone.1["reason"].as_str(), gone.1["shard"].as_u64()),
            (Some("takeover"), Some(0))
        );
        let came = got
            .iter()
            .find(|(t, _)| t.ends_with("/connected"))
            .expect("a connected event");
        assert_eq!(came.1["shard"], 1);
        assert!(cl.closing(old));

        // Silent past the keepalive allowance (10 s × 1.5); the watcher pings meanwhile.
        cl.send(watcher, Packet::Pingreq);
        cl.advance(Duration::from_secs(8));
        cl.send(watcher, Packet::Pingreq);
        cl.advance(Duration::from_secs(8));
        let got = publishes(&cl.recv(watcher));
        assert!(
            got.iter()
                .any(|(t, b, _, _)| t.ends_with("/disconnected")
                    && b.contains("\"keepalive_timeout\"")),
            "{got:?}"
        );
        let _ = new;
    }
}

mod access;
mod admin;
mod auth;
mod bans;
mod limits;
mod lwm2m;
mod mqttsn;
mod tcpgw;
