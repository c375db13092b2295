//! Cross-shard behaviour on a 2-shard broker: takeover of a client id held by another shard,
//! and subscribe-then-publish from another shard without loss. The kernel spreads connections
//! over the shards (SO_REUSEPORT), so the tests open enough of them that both shards hold some,
//! and check that they did.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use shardmq::protocol::mqtt::{Packet, QoS};
use std::time::{Duration, Instant};

fn wait_both_shards_hold_connections(b: &Broker) {
    let start = Instant::now();
    loop {
        let stats = b.handle().stats();
        if stats.len() == 2 && stats.iter().all(|s| s.connections > 0) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "connections did not spread over both shards: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn two_shards() -> Broker {
    let b = Broker::with_shards(2);
    assert_eq!(
        b.handle().stats().len(),
        2,
        "this test needs a machine with 2 CPUs"
    );
    b
}

#[test]
fn takeover_of_a_client_id_held_by_another_shard() {
    let b = two_shards();
    let n = 16;
    let mut watcher = Raw::ok(b.addr, "watcher");
    watcher.subscribe(&[("tkw/#", QoS::AtLeastOnce)]);
    let mut olds: Vec<Raw> = (0..n)
        .map(|i| {
            let (mut c, _) = Raw::connect_full(
                b.addr,
                connect_packet(
                    &format!("tk{i}"),
                    false,
                    shardmq::protocol::mqtt::ProtocolLevel::V311,
                    60,
                    Some(will(&format!("tkw/{i}"), "taken", QoS::AtLeastOnce, false)),
                ),
            );
            c.subscribe(&[(&format!("tk/{i}"), QoS::AtLeastOnce)]);
            c
        })
        .collect();
    wait_both_shards_hold_connections(&b);
    let mut p = Raw::ok(b.addr, "tk-pub");
    let mut pid = 0u16;
    let mut publish = |p: &mut Raw, topic: &str, payload: &str| {
        pid += 1;
        p.publish(topic, payload.as_bytes(), QoS::AtLeastOnce, false, pid);
        assert_eq!(p.recv(), Some(Packet::Puback(pid)));
    };
    for (i, old) in olds.iter_mut().enumerate() {
        publish(&mut p, &format!("tk/{i}"), "inflight-a");
        publish(&mut p, &format!("tk/{i}"), "inflight-b");
        // Received, never acknowledged: these deliveries are in flight when the takeover comes.
        for _ in 0..2 {
            assert!(matches!(old.recv(), Some(Packet::Publish(_))));
        }
    }
    for (i, mut old) in olds.into_iter().enumerate() {
        let (mut new, ack) = Raw::connect(b.addr, &format!("tk{i}"), false);
        assert!(ack.session_present, "tk{i}: session present after takeover");
        old.expect_closed();
        let a = new.next_publish();
        let bb = new.next_publish();
        assert!(a.dup && bb.dup, "in-flight deliveries resent with DUP");
        assert_eq!(
            (&a.payload[..], &bb.payload[..]),
            (&b"inflight-a"[..], &b"inflight-b"[..])
        );
        publish(&mut p, &format!("tk/{i}"), "after");
        assert_eq!(
            &new.next_publish().payload[..],
            b"after",
            "tk{i}: subscription moved with the session"
        );
        let w = watcher.next_publish();
        assert_eq!(
            w.topic.to_string(),
            format!("tkw/{i}"),
            "takeover publishes the old connection's will"
        );
        new.send(&Packet::Disconnect);
    }
    b.wait_metrics("takeovers counted", |m| m.takeovers == n as u64);
    let moved = b.handle().metrics().sessions_moved;
    assert!(moved > 0, "no takeover crossed shards in {n} tries");
}

#[test]
fn subscribe_then_publish_from_any_shard_loses_nothing() {
    let b = two_shards();
    let mut pubs: Vec<Raw> = (0..8)
        .map(|i| Raw::ok(b.addr, &format!("sp-pub{i}")))
        .collect();
    wait_both_shards_hold_connections(&b);
    for round in 0..60 {
        let mut s = Raw::ok(b.addr, &format!("sp-sub{round}"));
        let topic = format!("sp/{round}");
        s.subscribe(&[(&topic, QoS::AtLeastOnce)]);
        // Right after SUBACK, every publisher (on both shards) publishes once.
        for (i, p) in pubs.iter_mut().enumerate() {
            p.publish(&topic, &[i as u8], QoS::AtMostOnce, false, 0);
        }
        let mut got: Vec<u8> = (0..pubs.len())
            .map(|_| s.next_publish().payload[0])
            .collect();
        got.sort();
        assert_eq!(
            got,
            (0..pubs.len() as u8).collect::<Vec<_>>(),
            "round {round}"
        );
    }
}

#[test]
fn fan_out_across_shards_reaches_every_subscriber_once() {
    let b = two_shards();
    let mut subs: Vec<Raw> = (0..24)
        .map(|i| {
            let mut s = Raw::ok(b.addr, &format!("fo-sub{i}"));
            s.subscribe(&[("fo/#", QoS::AtLeastOnce), ("fo/+", QoS::AtMostOnce)]);
            s
        })
        .collect();
    wait_both_shards_hold_connections(&b);
    let mut p = Raw::ok(b.addr, "fo-pub");
    for k in 0..20u8 {
        p.publish("fo/x", &[k], QoS::AtLeastOnce, false, k as u16 + 1);
    }
    for s in &mut subs {
        for k in 0..20u8 {
            let m = s.next_publish();
            assert_eq!(
                (m.payload[0], m.qos),
                (k, QoS::AtLeastOnce),
                "one copy per subscriber, highest QoS, in order"
            );
        }
        s.expect_silence(Duration::from_millis(50));
    }
}

/// A persistent subscriber moves to the other shard while a publisher keeps publishing QoS 1
/// messages: the new connection gets everything the old one did not acknowledge, in the order
/// it was published, nothing twice but DUP resends. Run with the client id owned by the shard
/// it moves to and by the one it leaves.
#[test]
fn a_session_moving_between_shards_keeps_the_publishers_order() {
    // Queues that keep every message the client is not there to take.
    let mut cfg = config(2);
    cfg.mqtt.max_mqueue_len = 100_000;
    let b = Broker::start(cfg);
    assert_eq!(b.handle().stats().len(), 2, "this test needs 2 CPUs");
    let mut known = b.accepted_when(0);
    for owned_by_new_shard in [true, false] {
        let (mut old, from) = b.open_located(&mut known);
        let to = 1 - from;
        let id = (0..)
            .map(|k| format!("mover-{owned_by_new_shard}-{k}"))
            .find(|id| {
                let owner = shardmq::core::route::owner_shard(id.as_bytes(), 2);
                (owner == to) == owned_by_new_shard
            })
            .unwrap();
        let topic = format!("move/{owned_by_new_shard}");
        old.handshake(&id, false, 60);
        old.subscribe(&[(&topic, QoS::AtLeastOnce)]);
        let (mut publ, _) = b.open_located(&mut known);
        publ.handshake(&format!("mover-pub-{owned_by_new_shard}"), true, 60);
        const N: u32 = 3000;
        let publishing = {
            let topic = topic.clone();
            std::thread::spawn(move || {
                for i in 1..=N {
                    let pid = (i % 65_535) as u16 + 1;
                    publ.publish(&topic, &i.to_be_bytes(), QoS::AtLeastOnce, false, pid);
                    assert_eq!(publ.recv(), Some(Packet::Puback(pid)));
                }
            })
        };
        // The old connection reads and acknowledges a while, then its client moves.
        let mut acked = 0u32;
        while acked < 200 {
            let m = old.next_publish();
            let k = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
            assert_eq!(k, acked + 1, "old connection in order");
            acked = k;
        }
        let new = loop {
            let (r, shard) = b.open_located(&mut known);
            if shard == to {
                break r;
            }
        };
        let mut new = new;
        new.send(&Packet::Connect(Box::new(connect_packet(
            &id,
            false,
            shardmq::protocol::mqtt::ProtocolLevel::V311,
            60,
            None,
        ))));
        match new.recv() {
            Some(Packet::Connack(a)) => assert!(a.session_present, "{a:?}"),
            other => panic!("{other:?}"),
        }
        old.drain_until_closed();
        let mut last = acked;
        while last < N {
            let m = new.next_publish();
            let k = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
            if m.dup && k <= last {
                continue; // a resend of what the old connection had and did not acknowledge
            }
            assert_eq!(k, last + 1, "in order after the move (dup {})", m.dup);
            last = k;
        }
        publishing.join().unwrap();
        new.expect_silence(Duration::from_millis(200));
        new.send(&Packet::Disconnect);
    }
    let m = b.handle().metrics();
    assert!(m.sessions_moved >= 2, "{m:?}");
}
