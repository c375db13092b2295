//! The `$SYS/broker/…` topics against a real broker: published retained every `sys.interval`,
//! their counts rising with traffic, out of reach of `#`, and closed to clients' publishes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use shardmq::protocol::mqtt::{Packet, QoS};
use std::time::{Duration, Instant};

fn sys_broker() -> Broker {
    let mut cfg = config(2);
    cfg.sys.interval = shardmq::config::Duration::millis(200);
    Broker::start(cfg)
}

/// The next value published on `topic` (subscribed already) as a number.
fn next_value(c: &mut Raw, topic: &str) -> u64 {
    let p = c.next_publish();
    assert_eq!(&*p.topic, topic);
    std::str::from_utf8(&p.payload).unwrap().parse().unwrap()
}

#[test]
fn message_counts_rise_with_traffic() {
    let b = sys_broker();
    let topic = "$SYS/broker/metrics/messages/received";
    let mut watcher = Raw::ok(b.addr, "sys-watcher");
    watcher.subscribe(&[(topic, QoS::AtMostOnce)]);
    let before = next_value(&mut watcher, topic);
    // Publishers on both shards' client ids.
    for i in 0..3 {
        let mut p = Raw::ok(b.addr, &id_owned_by(&format!("sys-pub{i}"), i % 2, 2));
        for n in 0..10u16 {
            p.publish("sys/traffic", b"x", QoS::AtLeastOnce, false, n + 1);
            assert_eq!(p.recv(), Some(Packet::Puback(n + 1)), "publisher {i}");
        }
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let now = next_value(&mut watcher, topic);
        if now >= before + 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{topic} stayed at {now} (was {before})"
        );
    }
}

#[test]
fn the_tree_is_retained_and_wildcards_at_the_root_do_not_reach_it() {
    let b = sys_broker();
    // Retained: a late subscriber gets the version at once.
    std::thread::sleep(Duration::from_millis(400));
    let mut late = Raw::ok(b.addr, "sys-late");
    late.subscribe(&[("$SYS/broker/version", QoS::AtMostOnce)]);
    let p = late.next_publish();
    assert!(p.retain);
    assert!(std::str::from_utf8(&p.payload)
        .unwrap()
        .starts_with("ShardMQ "));
    // `#` matches no `$` topic.
    let mut all = Raw::ok(b.addr, "sys-all");
    all.subscribe(&[("#", QoS::AtMostOnce)]);
    all.expect_silence(Duration::from_millis(600));
    // `$SYS/#` does, per shard too.
    let mut sys = Raw::ok(b.addr, "sys-sys");
    sys.subscribe(&[("$SYS/broker/shards/+/connections", QoS::AtMostOnce)]);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        seen.insert(sys.next_publish().topic.to_string());
    }
    assert!(seen.contains("$SYS/broker/shards/0/connections"));
    assert!(seen.contains("$SYS/broker/shards/1/connections"));
}

#[test]
fn clients_may_not_publish_into_sys() {
    let mut cfg = config(2);
    cfg.sys.interval = shardmq::config::Duration::secs(0);
    cfg.sys.client_events = false;
    let b = Broker::start(cfg);
    let mut watcher = Raw::ok(b.addr, "sys-watch");
    watcher.subscribe(&[("$SYS/#", QoS::AtMostOnce)]);
    // From client ids owned by either shard, at every QoS: acknowledged, then dropped.
    for (i, qos) in [
        QoS::AtMostOnce,
        QoS::AtLeastOnce,
        QoS::ExactlyOnce,
        QoS::AtLeastOnce,
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = Raw::ok(b.addr, &id_owned_by(&format!("forger{i}"), i % 2, 2));
        f.publish("$SYS/broker/version", b"forged", qos, true, 7);
        match qos {
            QoS::AtMostOnce => f.ping(),
            QoS::AtLeastOnce => assert_eq!(f.recv(), Some(Packet::Puback(7))),
            QoS::ExactlyOnce => {
                assert_eq!(f.recv(), Some(Packet::Pubrec(7)));
                f.send(&Packet::Pubrel(7));
                assert_eq!(f.recv(), Some(Packet::Pubcomp(7)));
            }
        }
    }
    watcher.expect_silence(Duration::from_millis(500));
    b.wait_metrics("the forgeries counted", |m| m.sys_publish_denied == 4);
    // Nothing was retained either.
    let mut late = Raw::ok(b.addr, "sys-late-reader");
    late.subscribe(&[("$SYS/#", QoS::AtMostOnce)]);
    late.expect_silence(Duration::from_millis(300));
}

#[test]
fn clients_coming_and_going_are_announced() {
    let b = Broker::with_shards(2);
    let mut watcher = Raw::ok(b.addr, "presence-watcher");
    watcher.subscribe(&[("$SYS/broker/clients/#", QoS::AtMostOnce)]);
    for owner in 0..2 {
        let id = id_owned_by(&format!("presence{owner}"), owner, 2);
        let mut c = connect_packet(
            &id,
            true,
            shardmq::protocol::mqtt::ProtocolLevel::V311,
            42,
            None,
        );
        c.username = Some("alice".into());
        let (client, ack) = Raw::connect_full(b.addr, c);
        assert_eq!(
            ack.code,
            shardmq::protocol::mqtt::ConnectReturnCode::Accepted
        );
        let p = watcher.next_publish();
        assert_eq!(&*p.topic, format!("$SYS/broker/clients/{id}/connected"));
        assert!(!p.retain);
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(v["clientid"], id.as_str());
        assert_eq!(v["username"], "alice");
        assert_eq!(v["ipaddress"], "127.0.0.1");
        assert_eq!(v["keepalive"], 42);
        assert_eq!(v["proto_ver"], 4);
        assert!(v["shard"].as_u64().unwrap() < 2);
        assert!(v["ts"].as_u64().unwrap() > 1_700_000_000_000);
        // Gone without DISCONNECT.
        drop(client);
        let p = watcher.next_publish();
        assert_eq!(&*p.topic, format!("$SYS/broker/clients/{id}/disconnected"));
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(v["reason"], "closed");
    }
}

#[test]
fn packets_are_counted_by_type_both_ways() {
    let b = Broker::with_shards(2);
    let mut s = Raw::ok(b.addr, &id_owned_by("typed-sub", 1, 2));
    s.subscribe(&[("typed/#", QoS::ExactlyOnce)]);
    let mut p = Raw::ok(b.addr, &id_owned_by("typed-pub", 0, 2));
    p.publish("typed/1", b"a", QoS::AtLeastOnce, false, 1);
    assert_eq!(p.recv(), Some(Packet::Puback(1)));
    p.publish("typed/2", b"b", QoS::ExactlyOnce, false, 2);
    assert_eq!(p.recv(), Some(Packet::Pubrec(2)));
    p.send(&Packet::Pubrel(2));
    assert_eq!(p.recv(), Some(Packet::Pubcomp(2)));
    p.ping();
    // The subscriber gets them at QoS 1 and 2 and completes both flows (next_publish sends
    // the PUBACK and the PUBREC).
    let first = s.next_publish();
    assert_eq!(first.qos, QoS::AtLeastOnce);
    let second = s.next_publish();
    assert_eq!(second.qos, QoS::ExactlyOnce);
    assert_eq!(s.recv(), Some(Packet::Pubrel(second.packet_id)));
    s.send(&Packet::Pubcomp(second.packet_id));
    s.ping();
    b.wait_metrics("every type counted", |m| {
        m.packets_connect_received == 2
            && m.packets_connack_sent == 2
            && m.packets_subscribe_received == 1
            && m.packets_suback_sent == 1
            && m.packets_publish_received == 2
            && m.packets_puback_sent == 1
            && m.packets_pubrec_sent == 1
            && m.packets_pubrel_received == 1
            && m.packets_pubcomp_sent == 1
            && m.packets_puback_received == 1
            && m.packets_pubrec_received == 1
            && m.packets_pubrel_sent == 1
            && m.packets_pubcomp_received == 1
            && m.packets_pingreq_received == 2
            && m.packets_pingresp_sent == 2
            && m.messages_qos1_received == 1
            && m.messages_qos2_received == 1
            && m.messages_sent == 2
            && m.packets_sent() == 2 + 1 + 1 + 1 + 1 + 1 + 2 + 2
    });
}
