//! End-to-end MQTT behaviour against a real broker on free ports: raw bytes for the exact
//! protocol, rumqttc as an independent client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use common::*;
use shardmq::protocol::mqtt::{
    Connack, ConnectReturnCode, Packet, ProtocolLevel, Publish, QoS, SubackCode,
};
use std::io::Write;
use std::time::{Duration, Instant};

#[test]
fn qos_0_1_2_both_ways_and_downgrade_table() {
    let b = Broker::with_shards(2);
    let qs = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    let mut subs: Vec<Raw> = qs
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let mut s = Raw::ok(b.addr, &format!("sub{i}"));
            let (ack, _) = s.subscribe(&[("dg/t", *q)]);
            assert_eq!(ack.codes, vec![SubackCode::Granted(*q)]);
            s
        })
        .collect();
    let mut p = Raw::ok(b.addr, "pub");
    for (i, pq) in qs.iter().enumerate() {
        let pid = 100 + i as u16;
        p.publish("dg/t", format!("m{i}").as_bytes(), *pq, false, pid);
        match pq {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => assert_eq!(p.recv(), Some(Packet::Puback(pid))),
            QoS::ExactlyOnce => {
                assert_eq!(p.recv(), Some(Packet::Pubrec(pid)));
                p.send(&Packet::Pubrel(pid));
                assert_eq!(p.recv(), Some(Packet::Pubcomp(pid)));
            }
        }
        for (s, sq) in subs.iter_mut().zip(qs) {
            let got = s.next_publish();
            assert_eq!(
                got.qos,
                (*pq).min(sq),
                "publish {pq:?} to subscription {sq:?}"
            );
            assert_eq!(&got.payload[..], format!("m{i}").as_bytes());
            assert!(!got.retain);
            if got.qos == QoS::ExactlyOnce {
                assert_eq!(s.recv(), Some(Packet::Pubrel(got.packet_id)));
                s.send(&Packet::Pubcomp(got.packet_id));
            }
        }
    }
    for s in &mut subs {
        s.ping();
    }
}

#[test]
fn retained_set_replace_clear_and_wildcard_delivery() {
    let b = Broker::with_shards(2);
    let mut p = Raw::ok(b.addr, "pub");
    p.publish("ret/a", b"one", QoS::AtLeastOnce, true, 1);
    assert_eq!(p.recv(), Some(Packet::Puback(1)));
    p.publish("ret/a", b"two", QoS::AtLeastOnce, true, 2);
    assert_eq!(p.recv(), Some(Packet::Puback(2)));
    p.publish("ret/b/c", b"three", QoS::AtMostOnce, true, 0);
    p.publish("ret/d", b"four", QoS::AtMostOnce, true, 0);
    p.publish("ret/d", b"", QoS::AtMostOnce, true, 0); // clears ret/d
    p.ping();
    b.wait_metrics("3 retained stores", |m| m.retained_stored >= 4);

    let mut exact = Raw::ok(b.addr, "exact");
    let (_, early) = exact.subscribe(&[("ret/a", QoS::ExactlyOnce)]);
    let got = if let Some(Packet::Publish(p)) = early.into_iter().next() {
        p
    } else {
        exact.next_publish()
    };
    assert_eq!(
        (&got.payload[..], got.retain, got.qos),
        (&b"two"[..], true, QoS::AtLeastOnce)
    );

    let mut wild = Raw::ok(b.addr, "wild");
    let (_, early) = wild.subscribe(&[("ret/#", QoS::AtMostOnce)]);
    let mut payloads: Vec<Vec<u8>> = early
        .into_iter()
        .filter_map(|p| {
            if let Packet::Publish(p) = p {
                Some(p.payload.to_vec())
            } else {
                None
            }
        })
        .collect();
    while payloads.len() < 2 {
        let p = wild.next_publish();
        assert!(p.retain);
        payloads.push(p.payload.to_vec());
    }
    payloads.sort();
    assert_eq!(payloads, vec![b"three".to_vec(), b"two".to_vec()]);
    wild.expect_silence(Duration::from_millis(300));
    // A live message to an existing subscriber carries retain = 0.
    p.publish("ret/a", b"live", QoS::AtMostOnce, true, 0);
    let live = wild.next_publish();
    assert!(!live.retain && &live.payload[..] == b"live");
}

#[test]
fn will_published_on_abnormal_close_not_on_disconnect() {
    let b = Broker::with_shards(2);
    let mut watcher = Raw::ok(b.addr, "watcher");
    watcher.subscribe(&[("wills/#", QoS::AtLeastOnce)]);

    let (c, a) = Raw::connect_full(
        b.addr,
        connect_packet(
            "dies",
            true,
            ProtocolLevel::V311,
            60,
            Some(will("wills/dies", "bye", QoS::AtLeastOnce, false)),
        ),
    );
    assert_eq!(a.code, ConnectReturnCode::Accepted);
    drop(c); // socket closed without DISCONNECT
    let w = watcher.next_publish();
    assert_eq!(
        (w.topic.as_str(), &w.payload[..], w.qos),
        ("wills/dies", &b"bye"[..], QoS::AtLeastOnce)
    );

    let (mut c, _) = Raw::connect_full(
        b.addr,
        connect_packet(
            "polite",
            true,
            ProtocolLevel::V311,
            60,
            Some(will("wills/polite", "bye", QoS::AtMostOnce, false)),
        ),
    );
    c.send(&Packet::Disconnect);
    c.expect_closed();
    watcher.expect_silence(Duration::from_millis(500));

    // A protocol violation also publishes the will, with its retain flag.
    let (mut c, _) = Raw::connect_full(
        b.addr,
        connect_packet(
            "rude",
            true,
            ProtocolLevel::V311,
            60,
            Some(will("wills/rude", "x", QoS::AtMostOnce, true)),
        ),
    );
    c.send_raw(&[0x30, 0x03, 0x00, 0x01, b'#']);
    c.expect_closed();
    let w = watcher.next_publish();
    assert_eq!(w.topic.as_str(), "wills/rude");
    let mut late = Raw::ok(b.addr, "late");
    let (_, early) = late.subscribe(&[("wills/rude", QoS::AtMostOnce)]);
    let retained = if let Some(Packet::Publish(p)) = early.into_iter().next() {
        p
    } else {
        late.next_publish()
    };
    assert!(retained.retain, "will retain flag honoured");
}

#[test]
fn persistent_session_queues_offline_and_resends_on_reconnect() {
    let b = Broker::with_shards(2);
    let (mut s, a) = Raw::connect(b.addr, "durable", false);
    assert!(!a.session_present);
    s.subscribe(&[("dur/#", QoS::ExactlyOnce)]);
    let mut p = Raw::ok(b.addr, "pub");
    p.publish("dur/x", b"unacked", QoS::AtLeastOnce, false, 1);
    assert_eq!(p.recv(), Some(Packet::Puback(1)));
    // Received but not acknowledged, then the client vanishes.
    let Some(Packet::Publish(first)) = s.recv() else {
        panic!()
    };
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..3u16 {
        p.publish(
            "dur/x",
            format!("offline{i}").as_bytes(),
            QoS::AtLeastOnce,
            false,
            10 + i,
        );
        assert_eq!(p.recv(), Some(Packet::Puback(10 + i)));
    }
    let (mut s, a) = Raw::connect(b.addr, "durable", false);
    assert!(a.session_present);
    let again = s.next_publish();
    assert!(again.dup && again.packet_id == first.packet_id && &again.payload[..] == b"unacked");
    for i in 0..3 {
        let m = s.next_publish();
        assert_eq!(&m.payload[..], format!("offline{i}").as_bytes());
    }
    // Clean reconnect: no session.
    drop(s);
    let (_s, a) = Raw::connect(b.addr, "durable", true);
    assert!(!a.session_present);
}

#[test]
fn protocol_31_and_311() {
    let b = Broker::with_shards(1);
    let (mut old, a) = Raw::connect_full(
        b.addr,
        connect_packet("v31client", false, ProtocolLevel::V31, 30, None),
    );
    assert_eq!(
        a,
        Connack {
            session_present: false,
            code: ConnectReturnCode::Accepted
        }
    );
    old.subscribe(&[("v/+", QoS::AtLeastOnce)]);
    let mut new = Raw::ok(b.addr, "v311client");
    new.publish("v/1", b"hi", QoS::AtLeastOnce, false, 3);
    assert_eq!(new.recv(), Some(Packet::Puback(3)));
    assert_eq!(&old.next_publish().payload[..], b"hi");
    drop(old);
    std::thread::sleep(Duration::from_millis(100));
    let (_old, a) = Raw::connect_full(
        b.addr,
        connect_packet("v31client", false, ProtocolLevel::V31, 30, None),
    );
    assert!(!a.session_present, "3.1 CONNACK has no session-present bit");
    let (_, a) = Raw::connect_full(
        b.addr,
        connect_packet(
            "a23456789012345678901234",
            true,
            ProtocolLevel::V31,
            30,
            None,
        ),
    );
    assert_eq!(
        a.code,
        ConnectReturnCode::IdentifierRejected,
        "3.1 client ids are 1-23 characters"
    );
    let (mut c, a) = Raw::connect_full(
        b.addr,
        connect_packet("", false, ProtocolLevel::V311, 30, None),
    );
    assert_eq!(a.code, ConnectReturnCode::IdentifierRejected);
    c.expect_closed();
    let (_c, a) = Raw::connect_full(
        b.addr,
        connect_packet("", true, ProtocolLevel::V311, 30, None),
    );
    assert_eq!(
        a.code,
        ConnectReturnCode::Accepted,
        "3.1.1 empty id with clean session gets one"
    );
}

#[test]
fn keepalive_timeout_closes_and_publishes_will() {
    let b = Broker::with_shards(1);
    let mut watcher = Raw::ok(b.addr, "watcher");
    watcher.subscribe(&[("ka/#", QoS::AtMostOnce)]);
    let (mut c, _) = Raw::connect_full(
        b.addr,
        connect_packet(
            "sleepy",
            true,
            ProtocolLevel::V311,
            1,
            Some(will("ka/sleepy", "timeout", QoS::AtMostOnce, false)),
        ),
    );
    let start = Instant::now();
    c.expect_closed();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}, before 1.5 × keepalive"
    );
    assert_eq!(&watcher.next_publish().payload[..], b"timeout");
    b.wait_metrics("keepalive timeout counted", |m| m.keepalive_timeouts == 1);
    // Pinging keeps a connection alive past its keepalive.
    let (mut d, _) = Raw::connect_full(
        b.addr,
        connect_packet("awake", true, ProtocolLevel::V311, 1, None),
    );
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(600));
        d.ping();
    }
}

#[test]
fn connect_timeout_closes_silent_connections() {
    let mut cfg = config(1);
    cfg.mqtt.idle_timeout = shardmq::config::Duration::secs(1);
    let b = Broker::start(cfg);
    let mut c = Raw::open(b.addr);
    let start = Instant::now();
    assert!(c.expect_closed().is_empty());
    assert!(start.elapsed() >= Duration::from_millis(900));
    b.wait_metrics("connect timeout counted", |m| m.connect_timeouts == 1);
}

#[test]
fn dollar_topics_not_matched_by_first_level_wildcards() {
    // Any `$` topic ([MQTT-4.7.2-1]); clients may not publish into `$SYS/` itself (tests/sys.rs).
    let b = Broker::with_shards(2);
    let mut all = Raw::ok(b.addr, "all");
    all.subscribe(&[("#", QoS::AtMostOnce), ("+/status", QoS::AtMostOnce)]);
    let mut sys = Raw::ok(b.addr, "sys");
    sys.subscribe(&[("$app/#", QoS::AtMostOnce)]);
    let mut p = Raw::ok(b.addr, "p");
    p.publish("$app/status", b"s", QoS::AtMostOnce, false, 0);
    p.publish("plain/status", b"p", QoS::AtMostOnce, false, 0);
    assert_eq!(&sys.next_publish().payload[..], b"s");
    assert_eq!(
        &all.next_publish().payload[..],
        b"p",
        "only the non-$ topic reaches #"
    );
    all.expect_silence(Duration::from_millis(300));
}

#[test]
fn shared_subscription_filters_are_refused() {
    let b = Broker::with_shards(1);
    let mut c = Raw::ok(b.addr, "c");
    let (ack, _) = c.subscribe(&[
        ("$share/g/t", QoS::AtLeastOnce),
        ("$queue/t", QoS::AtMostOnce),
        ("t", QoS::AtLeastOnce),
    ]);
    assert_eq!(
        ack.codes,
        vec![
            SubackCode::Failure,
            SubackCode::Failure,
            SubackCode::Granted(QoS::AtLeastOnce)
        ]
    );
}

/// `max_connections` counts every shard's connections of the listener together.
#[test]
fn max_connections_refuses_extra_connections() {
    let mut cfg = config(2);
    cfg.listener
        .tcp
        .get_mut("external")
        .unwrap()
        .max_connections = 3;
    let b = Broker::start(cfg);
    let _keep: Vec<Raw> = (0..3).map(|i| Raw::ok(b.addr, &format!("mc{i}"))).collect();
    let mut extra = Raw::open(b.addr);
    assert!(extra.expect_closed().is_empty());
    b.wait_metrics("refusal counted", |m| m.connections_refused == 1);
    drop(_keep);
    b.wait_metrics("slots freed", |m| m.connections_closed >= 3);
    Raw::ok(b.addr, "mc-again").ping();
}

#[test]
fn max_connections_counts_each_listener_apart() {
    let mut cfg = config(1);
    let mut internal = cfg.listener.tcp["external"].clone();
    internal.max_connections = 2;
    cfg.listener.tcp.insert("internal".into(), internal);
    let b = Broker::start(cfg);
    let internal = b.handle().addr("internal").expect("internal listener");
    // Connections on the other listener do not use up this one's allowance.
    let _busy: Vec<Raw> = (0..3)
        .map(|i| Raw::ok(b.addr, &format!("ext{i}")))
        .collect();
    let _keep: Vec<Raw> = (0..2)
        .map(|i| Raw::ok(internal, &format!("int{i}")))
        .collect();
    let mut extra = Raw::open(internal);
    assert!(extra.expect_closed().is_empty());
    b.wait_metrics("refusal counted", |m| m.connections_refused == 1);
    Raw::ok(b.addr, "ext-more").ping();
}

#[test]
fn unsubscribe_stops_delivery() {
    let b = Broker::with_shards(2);
    let mut s = Raw::ok(b.addr, "s");
    s.subscribe(&[("u/t", QoS::AtMostOnce)]);
    s.send(&Packet::Unsubscribe(shardmq::protocol::mqtt::Unsubscribe {
        packet_id: 4,
        filters: vec!["u/t".into()],
    }));
    assert_eq!(s.recv(), Some(Packet::Unsuback(4)));
    let mut p = Raw::ok(b.addr, "p");
    p.publish("u/t", b"x", QoS::AtMostOnce, false, 0);
    p.ping();
    s.expect_silence(Duration::from_millis(300));
}

/// One publisher's messages on one topic reach a subscriber in order, with the two clients on
/// different shards (and each client id owned by the other client's shard).
#[test]
fn messages_from_one_publisher_arrive_in_order() {
    let b = Broker::with_shards(2);
    assert_eq!(b.handle().stats().len(), 2, "this test needs 2 CPUs");
    let mut known = b.accepted_when(0);
    let (mut s, sub_shard) = b.open_located(&mut known);
    let p = loop {
        let (p, shard) = b.open_located(&mut known);
        if shard != sub_shard {
            break p;
        }
    };
    let owned_by = |shard: usize, prefix: &str| {
        (0..)
            .map(|k| format!("{prefix}{k}"))
            .find(|id| shardmq::core::route::owner_shard(id.as_bytes(), 2) == shard)
            .unwrap()
    };
    s.handshake(&owned_by(1 - sub_shard, "s"), true, 60);
    s.subscribe(&[("ord/#", QoS::AtLeastOnce)]);
    let mut p = p;
    p.handshake(&owned_by(sub_shard, "p"), true, 60);
    for i in 0..500u16 {
        p.publish(
            "ord/t",
            &i.to_be_bytes(),
            if i % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            },
            false,
            i + 1,
        );
    }
    for i in 0..500u16 {
        let m = s.next_publish();
        assert_eq!(&m.payload[..], &i.to_be_bytes());
    }
}

mod with_rumqttc {
    use super::*;
    use rumqttc::{Client, Event, Incoming, MqttOptions};

    fn client(b: &Broker, id: &str, clean: bool) -> (Client, rumqttc::Connection) {
        let mut o = MqttOptions::new(id, b.addr.ip().to_string(), b.addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(clean);
        Client::new(o, 100)
    }

    fn next_incoming(conn: &mut rumqttc::Connection) -> Incoming {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match conn.recv_timeout(left) {
                Ok(Ok(Event::Incoming(i))) => return i,
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => panic!("connection error: {e}"),
                Err(_) => panic!("nothing within {WAIT:?}"),
            }
        }
    }

    fn wait_for(conn: &mut rumqttc::Connection, f: impl Fn(&Incoming) -> bool) -> Incoming {
        loop {
            let i = next_incoming(conn);
            if f(&i) {
                return i;
            }
        }
    }

    #[test]
    fn rumqttc_round_trips_at_every_qos() {
        let b = Broker::with_shards(2);
        let (sub, mut sconn) = client(&b, "rs-sub", true);
        assert!(matches!(next_incoming(&mut sconn), Incoming::ConnAck(_)));
        sub.subscribe("rq/#", rumqttc::QoS::ExactlyOnce).unwrap();
        wait_for(&mut sconn, |i| matches!(i, Incoming::SubAck(_)));
        let (publ, mut pconn) = client(&b, "rs-pub", true);
        for (i, q) in [
            rumqttc::QoS::AtMostOnce,
            rumqttc::QoS::AtLeastOnce,
            rumqttc::QoS::ExactlyOnce,
        ]
        .into_iter()
        .enumerate()
        {
            publ.publish(format!("rq/{i}"), q, false, vec![i as u8; 10])
                .unwrap();
        }
        // Drive the publisher until its QoS 2 flow completes.
        wait_for(&mut pconn, |i| matches!(i, Incoming::PubComp(_)));
        let mut got = Vec::new();
        while got.len() < 3 {
            if let Incoming::Publish(p) = next_incoming(&mut sconn) {
                got.push((p.topic.clone(), p.qos, p.payload.len()));
            }
        }
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            vec![
                ("rq/0".into(), rumqttc::QoS::AtMostOnce, 10),
                ("rq/1".into(), rumqttc::QoS::AtLeastOnce, 10),
                ("rq/2".into(), rumqttc::QoS::ExactlyOnce, 10)
            ]
        );
    }

    #[test]
    fn rumqttc_downgrade_retained_and_will() {
        let b = Broker::with_shards(2);
        // Retained, set by rumqttc, delivered to a later rumqttc subscriber with retain = 1.
        let (publ, mut pconn) = client(&b, "rs-ret-pub", true);
        assert!(matches!(next_incoming(&mut pconn), Incoming::ConnAck(_)));
        publ.publish("rr/state", rumqttc::QoS::AtLeastOnce, true, "on")
            .unwrap();
        wait_for(&mut pconn, |i| matches!(i, Incoming::PubAck(_)));
        let (sub, mut sconn) = client(&b, "rs-ret-sub", true);
        assert!(matches!(next_incoming(&mut sconn), Incoming::ConnAck(_)));
        sub.subscribe("rr/#", rumqttc::QoS::AtMostOnce).unwrap();
        match wait_for(&mut sconn, |i| matches!(i, Incoming::Publish(_))) {
            Incoming::Publish(p) => {
                assert!(p.retain && &p.payload[..] == b"on");
                assert_eq!(
                    p.qos,
                    rumqttc::QoS::AtMostOnce,
                    "QoS 1 retained to a QoS 0 subscription is QoS 0"
                );
            }
            _ => unreachable!(),
        }
        // Downgrade: a QoS 2 publish reaches a QoS 0 subscription at QoS 0.
        publ.publish("rr/x", rumqttc::QoS::ExactlyOnce, false, "dg")
            .unwrap();
        wait_for(&mut pconn, |i| matches!(i, Incoming::PubComp(_)));
        match wait_for(&mut sconn, |i| matches!(i, Incoming::Publish(_))) {
            Incoming::Publish(p) => assert_eq!(
                (p.qos, p.retain, &p.payload[..]),
                (rumqttc::QoS::AtMostOnce, false, &b"dg"[..])
            ),
            _ => unreachable!(),
        }
        // Will: a rumqttc client that vanishes without DISCONNECT.
        let mut o = MqttOptions::new("rs-doomed", b.addr.ip().to_string(), b.addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_last_will(rumqttc::LastWill::new(
            "rr/will",
            "lost",
            rumqttc::QoS::AtLeastOnce,
            false,
        ));
        let (doomed, mut dconn) = Client::new(o, 10);
        assert!(matches!(next_incoming(&mut dconn), Incoming::ConnAck(_)));
        drop(doomed);
        drop(dconn);
        match wait_for(
            &mut sconn,
            |i| matches!(i, Incoming::Publish(p) if p.topic == "rr/will"),
        ) {
            Incoming::Publish(p) => assert_eq!(&p.payload[..], b"lost"),
            _ => unreachable!(),
        }
    }

    #[test]
    fn rumqttc_persistent_session_resumes() {
        let b = Broker::with_shards(2);
        {
            let (sub, mut conn) = client(&b, "rs-durable", false);
            assert!(matches!(next_incoming(&mut conn), Incoming::ConnAck(_)));
            sub.subscribe("rd/t", rumqttc::QoS::AtLeastOnce).unwrap();
            wait_for(&mut conn, |i| matches!(i, Incoming::SubAck(_)));
            sub.disconnect().unwrap();
            let _ = conn.recv_timeout(Duration::from_millis(200));
        }
        let mut p = Raw::ok(b.addr, "rs-raw-pub");
        p.publish("rd/t", b"while away", QoS::AtLeastOnce, false, 1);
        assert_eq!(p.recv(), Some(Packet::Puback(1)));
        let (_sub, mut conn) = client(&b, "rs-durable", false);
        match next_incoming(&mut conn) {
            Incoming::ConnAck(a) => assert!(a.session_present),
            other => panic!("{other:?}"),
        }
        match wait_for(&mut conn, |i| matches!(i, Incoming::Publish(_))) {
            Incoming::Publish(m) => assert_eq!(&m.payload[..], b"while away"),
            _ => unreachable!(),
        }
    }
}

/// `mqtt.max_topic_levels` and `mqtt.max_subscriptions` against a real broker, with the
/// client id owned by either shard.
#[test]
fn topic_depth_and_subscription_count_are_limited() {
    let mut cfg = config(2);
    cfg.mqtt.max_topic_levels = 4;
    cfg.mqtt.max_subscriptions = 2;
    let b = Broker::start(cfg);
    let shards = b.handle().shards().len();
    for owner in 0..shards {
        let mut c = Raw::ok(
            b.addr,
            &id_owned_by(&format!("limits-{owner}-"), owner, shards),
        );
        let (ack, _) = c.subscribe(&[
            ("a/b/c/d", QoS::AtMostOnce),
            ("a/b/c/d/e", QoS::AtMostOnce),
            ("x/#", QoS::AtMostOnce),
            ("y", QoS::AtMostOnce),
        ]);
        assert_eq!(
            ack.codes,
            vec![
                SubackCode::Granted(QoS::AtMostOnce),
                SubackCode::Failure,
                SubackCode::Granted(QoS::AtMostOnce),
                SubackCode::Failure,
            ],
            "owner {owner}"
        );
        c.publish("a/b/c/d", b"ok", QoS::AtLeastOnce, false, 1);
        assert_eq!(c.recv(), Some(Packet::Puback(1)));
        c.publish("a/b/c/d/e", b"too deep", QoS::AtLeastOnce, false, 2);
        c.expect_closed();
    }
    b.wait_metrics("limits counted", |m| {
        m.topic_levels_exceeded >= 2 && m.subscriptions_refused >= 4
    });
}

/// `max_conn_rate`: at most a second's worth of new connections at once, all shards together;
/// the rest are closed right after accept and counted; later ones get in again.
#[test]
fn max_conn_rate_closes_connections_beyond_the_rate() {
    let mut cfg = config(2);
    cfg.listener.tcp.get_mut("external").unwrap().max_conn_rate = 5;
    let b = Broker::start(cfg);
    let started = Instant::now();
    let mut accepted = 0;
    let mut kept = Vec::new();
    for i in 0..20 {
        let mut r = Raw::open(b.addr);
        r.send(&Packet::Connect(Box::new(connect_packet(
            &format!("rate{i}"),
            true,
            ProtocolLevel::V311,
            30,
            None,
        ))));
        match r.recv() {
            Some(Packet::Connack(_)) => {
                accepted += 1;
                kept.push(r);
            }
            None => {}
            other => panic!("{other:?}"),
        }
    }
    // A burst of 5, plus what the bucket refilled meanwhile (5 a second).
    let allowance = 5 + (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        accepted >= 5 && accepted <= allowance,
        "{accepted} accepted, allowance {allowance}"
    );
    b.wait_metrics("rate limit counted", |m| {
        m.connections_rate_limited as usize == 20 - accepted
    });
    std::thread::sleep(Duration::from_millis(1100));
    Raw::ok(b.addr, "rate-later").ping();
}

/// `mqtt.rate_limit`: a publisher that sends faster than its rate is read at that rate (a
/// second's worth at once): every message arrives in order, it takes at least as long as the
/// rate says, and the publisher stays connected. Messages per second with the publisher's
/// client id owned by either shard, then bytes per second.
#[test]
fn a_publisher_past_its_rate_limit_is_read_at_its_rate() {
    let mut cfg = config(2);
    cfg.mqtt.rate_limit.messages_in = 50;
    cfg.mqtt.rate_limit.bytes_in = shardmq::config::ByteSize(20 << 10);
    let b = Broker::start(cfg);
    let shards = b.handle().shards().len();
    // (owner shard, messages, payload): 150 small messages are 2 s past the burst of 50 a
    // second; 60 of 1 KB are 2 s past the burst of 20 KB a second.
    let runs = (0..shards)
        .map(|owner| (owner, 150usize, 8usize))
        .chain([(0, 60, 1024)]);
    for (run, (owner, count, size)) in runs.enumerate() {
        let topic = format!("rl/{run}");
        let mut sub = Raw::ok(b.addr, &format!("rl-sub{run}"));
        sub.subscribe(&[(topic.as_str(), QoS::AtMostOnce)]);
        let mut p = Raw::ok(b.addr, &id_owned_by(&format!("rl-pub{run}"), owner, shards));
        let mut burst = BytesMut::new();
        for i in 0..count {
            let mut payload = vec![b'.'; size];
            payload[..4].copy_from_slice(&(i as u32).to_be_bytes());
            shardmq::protocol::mqtt::encode(
                &Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtMostOnce,
                    retain: false,
                    topic: topic.as_str().into(),
                    packet_id: 0,
                    payload: payload.into(),
                }),
                &mut burst,
            );
        }
        shardmq::protocol::mqtt::encode(&Packet::Pingreq, &mut burst);
        let started = Instant::now();
        p.stream.write_all(&burst).unwrap();
        for i in 0..count {
            let m = sub.next_publish();
            assert_eq!(&m.payload[..4], &(i as u32).to_be_bytes(), "run {run}");
        }
        assert_eq!(
            p.recv(),
            Some(Packet::Pingresp),
            "run {run}: still connected"
        );
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1500), "run {run}: {took:?}");
    }
    b.wait_metrics("throttling counted", |m| m.connections_throttled >= 3);
}

/// `mqtt.max_mqueue_bytes_total`: offline sessions on both shards (client ids owned by each)
/// share one cap; messages past it are dropped and counted, the admin API shows what is
/// held, and the sessions get what was kept when they come back.
#[test]
fn offline_queues_past_their_total_cap_drop_new_messages() {
    let mut cfg = config(2);
    cfg.mqtt.max_mqueue_bytes_total = shardmq::config::ByteSize(10 << 10);
    let b = Broker::start(cfg);
    let shards = b.handle().shards().len();
    let admin = b.handle().admin_addr().expect("admin API");
    let mqueue_bytes = || -> u64 {
        let v = http(admin, "GET", "/api/v1/stats", &[], "").json();
        v["mqueue_bytes.count"]
            .as_u64()
            .expect("mqueue_bytes.count")
    };
    let ids: Vec<String> = (0..shards)
        .map(|owner| id_owned_by("capped", owner, shards))
        .collect();
    for id in &ids {
        let (mut c, _) = Raw::connect(b.addr, id, false);
        c.subscribe(&[("cap/t", QoS::AtLeastOnce)]);
        c.send(&Packet::Disconnect);
        c.expect_closed();
    }
    let mut p = Raw::ok(b.addr, "cap-pub");
    let n = 20u16;
    for i in 1..=n {
        p.publish("cap/t", &[b'c'; 1019], QoS::AtLeastOnce, false, i);
        assert_eq!(p.recv(), Some(Packet::Puback(i)));
    }
    // Topic and payload weigh 1,024 bytes: ten fit, of the sessions' 40 deliveries.
    let offered = u64::from(n) * shards as u64;
    b.wait_metrics("drops counted", |m| m.dropped_queue_total == offered - 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mqueue_bytes() != 10 * 1024 {
        assert!(Instant::now() < deadline, "stats: {} bytes", mqueue_bytes());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut kept = 0;
    for id in &ids {
        let (mut c, ack) = Raw::connect(b.addr, id, false);
        assert!(ack.session_present);
        while let Some(Some(Packet::Publish(m))) = c.recv_within(Duration::from_millis(500)) {
            assert_eq!(m.payload.len(), 1019);
            c.send(&Packet::Puback(m.packet_id));
            kept += 1;
        }
    }
    assert_eq!(kept, 10, "what was queued arrives");
    let deadline = Instant::now() + Duration::from_secs(10);
    while mqueue_bytes() != 0 {
        assert!(Instant::now() < deadline, "stats: {} bytes", mqueue_bytes());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `flapping.*`: a client id that connects more than `max_count` times within the window is
/// refused (CONNACK 0x05) until the ban ends, with the id owned by either shard; other
/// client ids are not affected.
#[test]
fn a_flapping_client_id_is_banned_until_the_ban_ends() {
    let mut cfg = config(2);
    cfg.flapping.enable = true;
    cfg.flapping.max_count = 3;
    cfg.flapping.ban_time = shardmq::config::Duration::secs(2);
    let b = Broker::start(cfg);
    let shards = b.handle().shards().len();
    for owner in 0..shards {
        let id = id_owned_by(&format!("flapper{owner}"), owner, shards);
        for _ in 0..3 {
            let mut c = Raw::ok(b.addr, &id);
            c.send(&Packet::Disconnect);
            c.expect_closed();
        }
        let banned_at = Instant::now();
        let (_, ack) = Raw::connect(b.addr, &id, true);
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "owner {owner}");
        Raw::ok(b.addr, &format!("{id}-steady")).ping();
        // Refused for as long as the ban lasts, then let in.
        loop {
            let (mut c, ack) = Raw::connect(b.addr, &id, true);
            if ack.code == ConnectReturnCode::Accepted {
                assert!(
                    banned_at.elapsed() >= Duration::from_millis(1900),
                    "owner {owner}"
                );
                c.ping();
                break;
            }
            assert!(
                banned_at.elapsed() < Duration::from_secs(10),
                "owner {owner}: still banned"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    b.wait_metrics("bans counted", |m| m.flapping_bans >= 2);
}

/// `mqtt.force_shutdown_policy`: a subscriber that stops reading while a publisher floods is
/// disconnected; a subscriber that reads gets every message. Its client id is owned by either
/// shard.
#[test]
fn a_subscriber_that_stops_reading_is_shut_down_and_others_lose_nothing() {
    let mut cfg = config(2);
    cfg.mqtt.force_shutdown_policy = "50|1MB".into();
    cfg.mqtt.max_mqueue_len = 100_000;
    let b = Broker::start(cfg);
    let shards = b.handle().shards().len();
    for owner in 0..shards {
        let topic = format!("flood/{owner}");
        let mut slow = Raw::ok(
            b.addr,
            &id_owned_by(&format!("slow-{owner}-"), owner, shards),
        );
        slow.subscribe(&[(topic.as_str(), QoS::AtLeastOnce)]);
        let mut fast = Raw::ok(b.addr, &format!("fast-{owner}"));
        fast.subscribe(&[(topic.as_str(), QoS::AtLeastOnce)]);
        let mut p = Raw::ok(b.addr, &format!("flooder-{owner}"));
        let n = 300u16;
        for i in 1..=n {
            p.publish(&topic, &[7u8; 1000], QoS::AtLeastOnce, false, i);
            assert_eq!(p.recv(), Some(Packet::Puback(i)));
            let m = fast.next_publish();
            fast.send(&Packet::Puback(m.packet_id));
        }
        // The slow one never acknowledged: its window filled, then its queue passed 50.
        slow.drain_until_closed();
    }
    b.wait_metrics("shut down twice", |m| m.force_shutdowns >= 2);
}
