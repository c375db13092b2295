//! Per-client limits in the engine: topic depth (`max_topic_levels`) for PUBLISH and
//! SUBSCRIBE, and subscriptions per session (`max_subscriptions`).

use super::*;

fn limited(levels: usize, subs: usize) -> Cluster {
    Cluster::with(2, |c| {
        c.max_topic_levels = levels;
        c.max_subscriptions = subs;
    })
}

#[test]
fn a_publish_deeper_than_max_topic_levels_closes_the_connection() {
    for owner in 0..2 {
        let mut cl = limited(3, 0);
        let id = id_owned_by(&format!("deep{owner}-"), owner, 2);
        let ok = cl.connect(0, &format!("{id}ok"), true);
        cl.publish(ok, "a/b/c", "x", QoS::AtLeastOnce, false, 1);
        assert_eq!(cl.recv(ok), vec![Packet::Puback(1)]);
        assert!(!cl.closing(ok));
        let c = cl.connect(0, &id, true);
        cl.publish(c, "a/b/c/d", "x", QoS::AtLeastOnce, false, 1);
        assert!(cl.closing(c), "owner {owner}");
        assert_eq!(cl.engines[0].metrics.topic_levels_exceeded, 1);
    }
}

#[test]
fn deep_filters_and_too_many_subscriptions_get_0x80() {
    let mut cl = limited(3, 2);
    let c = cl.connect(1, "subs", true);
    assert_eq!(
        cl.subscribe(
            c,
            &[("a/+/c", QoS::AtMostOnce), ("a/b/c/#", QoS::AtMostOnce)]
        ),
        vec![SubackCode::Granted(QoS::AtMostOnce), SubackCode::Failure]
    );
    assert_eq!(
        cl.subscribe(c, &[("x", QoS::AtLeastOnce), ("y", QoS::AtMostOnce)]),
        vec![SubackCode::Granted(QoS::AtLeastOnce), SubackCode::Failure],
        "the second subscription fills the session"
    );
    // Re-subscribing to a held filter is not a new one.
    assert_eq!(
        cl.subscribe(c, &[("x", QoS::AtMostOnce)]),
        vec![SubackCode::Granted(QoS::AtMostOnce)]
    );
    cl.send(
        c,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 9,
            filters: vec!["x".into()],
        }),
    );
    let _ = cl.recv(c);
    assert_eq!(
        cl.subscribe(c, &[("y", QoS::AtMostOnce)]),
        vec![SubackCode::Granted(QoS::AtMostOnce)]
    );
    assert_eq!(cl.engines[1].metrics.subscriptions_refused, 2);
    assert!(!cl.closing(c));
    // MQTT 3.1 has no failure code: disconnected.
    let (old, _) = cl.connect_with(0, "old", true, ProtocolLevel::V31, None);
    cl.send(
        old,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("a/b/c/d".into(), QoS::AtMostOnce)],
        }),
    );
    assert!(cl.closing(old));
}

/// `force_shutdown`: a subscriber that acknowledges nothing while a publisher floods is
/// disconnected once its queue passes the limit; another subscriber still gets every message.
#[test]
fn a_subscriber_that_falls_behind_is_shut_down() {
    for owner in 0..2 {
        let mut cl = Cluster::with(2, |c| {
            c.force_shutdown = Some((10, 1 << 20));
            c.limits.max_mqueue_len = 1000;
        });
        let slow = cl.connect(1, &id_owned_by(&format!("slow{owner}-"), owner, 2), true);
        cl.subscribe(slow, &[("t", QoS::AtLeastOnce)]);
        let fast = cl.connect(0, "fast", true);
        cl.subscribe(fast, &[("t", QoS::AtLeastOnce)]);
        let p = cl.connect(0, "pub", true);
        let mut got = 0;
        for i in 0..50u16 {
            cl.publish(p, "t", &format!("m{i}"), QoS::AtLeastOnce, false, i + 1);
            let _ = cl.recv(p);
            let out = cl.recv(fast);
            got += publishes(&out).len();
            ack_all(&mut cl, fast, &out);
        }
        assert_eq!(got, 50, "owner {owner}");
        assert!(cl.closing(slow), "owner {owner}");
        assert_eq!(cl.engines[1].metrics.force_shutdowns, 1);
        assert!(!cl.closing(fast));
    }
}

/// A gateway's client gets retained messages when it subscribes and has its will published
/// when its connection is lost, like an MQTT client, with the client id owned by either
/// shard; its traffic is counted as any client's.
#[test]
fn a_gateway_client_gets_retained_messages_and_leaves_a_will() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let p = cl.connect(1, "mqtt-pub", true);
        cl.publish(p, "g/kept", "retained", QoS::AtLeastOnce, true, 1);
        let watcher = cl.connect(1, "watcher", true);
        cl.subscribe(watcher, &[("gw/will", QoS::AtLeastOnce)]);
        let g = cl.open_gateway(0);
        let id = id_owned_by("gwr", owner, 2);
        cl.send(
            g,
            Packet::Connect(Box::new(Connect {
                level: ProtocolLevel::V311,
                client_id: id.as_str().into(),
                clean_session: true,
                keep_alive: 10,
                will: will("gw/will"),
                username: None,
                password: None,
            })),
        );
        assert!(matches!(
            cl.recv(g).first(),
            Some(Packet::Connack(Connack {
                code: ConnectReturnCode::Accepted,
                ..
            }))
        ));
        cl.send(
            g,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![("g/#".into(), QoS::AtLeastOnce)],
            }),
        );
        let got = cl.recv(g);
        assert!(
            got.iter().any(|p| matches!(p, Packet::Publish(p)
                if p.topic.as_str() == "g/kept" && p.retain && &p.payload[..] == b"retained")),
            "owner {owner}: {got:?}"
        );
        let received = cl.engines[0].metrics.packets_subscribe_received;
        assert_eq!(received, 1, "its packets are counted");
        // Lost without DISCONNECT: the will goes out.
        cl.drop_conn(g);
        assert_eq!(
            publishes(&cl.recv(watcher)),
            [("gw/will".into(), "gone".into(), QoS::AtLeastOnce, false)],
            "owner {owner}"
        );
        assert_eq!(cl.engines[0].metrics.wills_published, 1);
    }
}

/// Direct deliveries held for a session still arriving from another shard (while the forwarded
/// ones are on their way) are capped at `max_mqueue_len`, the oldest dropped and counted.
#[test]
fn messages_held_for_an_arriving_session_are_capped() {
    let mut cl = Cluster::with(3, |c| c.limits.max_mqueue_len = 5);
    let (_, p, newc) = move_with_m1_forwarded(&mut cl);
    while cl.deliver_one(2, 0) {}
    let before = cl.engines[2].metrics.dropped_queue_full;
    for i in 2..=20u16 {
        cl.publish_unsettled(p, "o/t", &format!("m{i}"), QoS::AtLeastOnce, i);
        while cl.deliver_one(0, 2) {}
    }
    assert_eq!(
        cl.engines[2].metrics.dropped_queue_full - before,
        14,
        "19 held, 5 kept"
    );
    cl.settle();
    assert!(!cl.closing(newc));
}

/// PUBLISH packets as a client's socket would carry them, one after another.
fn publish_bytes(topic: &str, payloads: impl Iterator<Item = String>) -> Vec<u8> {
    let mut out = BytesMut::new();
    for p in payloads {
        shardmq_protocol::mqtt::encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: topic.into(),
                packet_id: 0,
                payload: Bytes::from(p),
            }),
            &mut out,
        );
    }
    out.to_vec()
}

/// `rate_limit.messages_per_sec`: a second's worth is read at once, then the connection is
/// read at its rate; every message arrives, in order, and the publisher is never closed.
#[test]
fn a_publisher_past_its_message_rate_is_read_at_that_rate() {
    for owner in 0..2 {
        let mut cl = Cluster::with(2, |c| c.rate_limit.messages_per_sec = 10);
        let sub = cl.connect(1, "rate-sub", true);
        cl.subscribe(sub, &[("r", QoS::AtMostOnce)]);
        let p = cl.connect(0, &id_owned_by(&format!("rate{owner}-"), owner, 2), true);
        let data = publish_bytes("r", (0..30).map(|i| format!("m{i}")));
        let start = cl.now;
        let mut used = cl.engines[0].handle_input(p.id, &data, cl.now).used;
        cl.settle();
        assert!(used < data.len(), "owner {owner}: all read at once");
        assert!(!cl.engines[0].conn_readable(p.id));
        let mut got = publishes(&cl.recv(sub)).len();
        assert_eq!(
            got, 11,
            "owner {owner}: a second's worth, and the one past it"
        );
        let deadline = cl.engines[0].conn_status(p.id).unwrap().deadline;
        assert_eq!(deadline, Some(start.after(Duration::from_millis(100))));
        let mut order = Vec::new();
        while used < data.len() {
            cl.advance(Duration::from_millis(50));
            if cl.engines[0].conn_readable(p.id) {
                used += cl.engines[0].handle_input(p.id, &data[used..], cl.now).used;
                cl.settle();
            }
            let out = cl.recv(sub);
            got += publishes(&out).len();
            order.extend(publishes(&out).into_iter().map(|m| m.1));
        }
        assert_eq!(got, 30, "owner {owner}");
        assert_eq!(order.first().map(String::as_str), Some("m11"));
        assert_eq!(order.last().map(String::as_str), Some("m29"));
        // 19 messages past the first second's 11, at 10 per second.
        let took = cl.now.since(start);
        assert!(
            took >= Duration::from_millis(1800) && took <= Duration::from_millis(2000),
            "owner {owner}: {took:?}"
        );
        assert!(!cl.closing(p));
        assert!(cl.engines[0].metrics.connections_throttled >= 19);
    }
}

/// `rate_limit.bytes_per_sec`: a connection not read for longer than its keepalive because
/// of its rate is not closed for it; the keepalive counts from when it is read again.
#[test]
fn a_throttled_connection_is_not_closed_for_keepalive() {
    let mut cl = Cluster::with(2, |c| c.rate_limit.bytes_per_sec = 100);
    let p = cl.connect(0, "bytes", true);
    // About 3,000 bytes: 29 s past the burst; the keepalive allowance is 15 s.
    let data = publish_bytes("b", std::iter::once("x".repeat(2990)));
    let data = [data.clone(), data].concat();
    let first = cl.engines[0].handle_input(p.id, &data, cl.now).used;
    assert!(first < data.len() && !cl.engines[0].conn_readable(p.id));
    cl.advance(Duration::from_secs(20));
    assert!(!cl.closing(p), "closed while not read");
    assert!(!cl.engines[0].conn_readable(p.id));
    cl.advance(Duration::from_secs(10));
    assert!(cl.engines[0].conn_readable(p.id));
    assert_eq!(
        cl.engines[0]
            .handle_input(p.id, &data[first..], cl.now)
            .used,
        data.len() - first
    );
    // Throttled again by the second packet, then let go: 16 s of silence after that ends it.
    cl.advance(Duration::from_secs(31));
    assert!(!cl.closing(p));
    cl.advance(Duration::from_secs(16));
    assert!(cl.closing(p), "keepalive applies again once read");
    assert_eq!(cl.engines[0].metrics.keepalive_timeouts, 1);
}

/// `max_mqueue_bytes_total`: offline sessions on both shards share one cap; past it, their
/// new messages are dropped and counted while connected subscribers get everything; a
/// session that comes back frees its share and gets what it kept.
#[test]
fn offline_queues_together_are_capped() {
    for owner in 0..2 {
        // Topic "q" and a 19-byte payload weigh 20 bytes: the cap holds five.
        let mut cl = Cluster::with(2, |c| c.max_mqueue_bytes_total = 100);
        let ids: Vec<String> = (0..2)
            .map(|s| id_owned_by(&format!("off{owner}{s}-"), owner, 2))
            .collect();
        for (shard, id) in ids.iter().enumerate() {
            let c = cl.connect(shard, id, false);
            cl.subscribe(c, &[("q", QoS::AtLeastOnce)]);
            cl.send(c, Packet::Disconnect);
            cl.drop_conn(c);
        }
        let online = cl.connect(1, "online", true);
        cl.subscribe(online, &[("q", QoS::AtMostOnce)]);
        let p = cl.connect(0, "offline-pub", true);
        for i in 0..4u16 {
            cl.publish(p, "q", &format!("{i:019}"), QoS::AtLeastOnce, false, i + 1);
        }
        // Two sessions × four messages: the first five fit, the other three are dropped.
        let dropped: u64 = cl
            .engines
            .iter()
            .map(|e| e.metrics.dropped_queue_total)
            .sum();
        assert_eq!(dropped, 3, "owner {owner}");
        assert_eq!(cl.engines[0].offline_queues().bytes(), 100);
        assert_eq!(
            publishes(&cl.recv(online)).len(),
            4,
            "connected clients lose nothing"
        );
        // The first comes back (on the other shard): it gets what it kept, and its share is
        // free again for the other session.
        let back = cl.open(1);
        let kept = publishes(&cl.connect_opened(back, &ids[0], false)).len();
        assert!((1..=4).contains(&kept), "owner {owner}: {kept}");
        assert_eq!(cl.engines[0].offline_queues().bytes(), (5 - kept) * 20);
        cl.publish(p, "q", &format!("{:019}", 9), QoS::AtLeastOnce, false, 9);
        assert_eq!(
            cl.engines
                .iter()
                .map(|e| e.metrics.dropped_queue_total)
                .sum::<u64>(),
            3,
            "owner {owner}: room again"
        );
        // The other session expires: its share goes with it.
        cl.advance(Duration::from_secs(7201));
        assert_eq!(cl.engines[0].offline_queues().bytes(), 0, "owner {owner}");
    }
}
