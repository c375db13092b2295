//! Parked connections (`shards.park_idle_after`): an idle client gives up its driver task and
//! waits in the shard's epoll set; deliveries, its own packets, keepalive, takeover, peer close
//! and shutdown all still work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use shardmq::protocol::mqtt::{Packet, ProtocolLevel, QoS};
use std::time::{Duration, Instant};

fn broker() -> Broker {
    let mut cfg = config(2);
    cfg.shards.park_idle_after = shardmq::config::Duration::millis(200);
    Broker::start(cfg)
}

fn parked(b: &Broker) -> usize {
    b.handle().stats().iter().map(|s| s.parked).sum()
}

fn wait_park_events(b: &Broker, at_least: u64) {
    b.wait_metrics("park events", |m| m.connections_parked >= at_least);
}

fn wait_parked(b: &Broker, at_least: usize) {
    let start = Instant::now();
    while parked(b) < at_least {
        assert!(
            start.elapsed() < WAIT,
            "only {} parked, expected {at_least}",
            parked(b)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn parked_subscribers_receive_deliveries_and_answer_pings() {
    let b = broker();
    let mut subs: Vec<Raw> = (0..40)
        .map(|i| {
            let mut s = Raw::ok(b.addr, &format!("park-sub{i}"));
            s.subscribe(&[("park/all", QoS::AtLeastOnce)]);
            s
        })
        .collect();
    wait_parked(&b, 40);
    let mut p = Raw::ok(b.addr, "park-pub");
    for round in 0..3u8 {
        let parks_before = b.handle().metrics().connections_parked;
        p.publish(
            "park/all",
            &[round],
            QoS::AtLeastOnce,
            false,
            u16::from(round) + 1,
        );
        assert_eq!(p.recv(), Some(Packet::Puback(u16::from(round) + 1)));
        for s in &mut subs {
            assert_eq!(s.next_publish().payload[0], round);
        }
        // Every subscriber was promoted to deliver; let them all park again.
        wait_park_events(&b, parks_before + 40);
    }
    for s in &mut subs {
        s.ping();
    }
}

#[test]
fn keepalive_still_applies_to_parked_connections() {
    let b = broker();
    let mut watcher = Raw::ok(b.addr, "park-watcher");
    watcher.subscribe(&[("park/will", QoS::AtMostOnce)]);
    let (mut c, _) = Raw::connect_full(
        b.addr,
        connect_packet(
            "park-sleepy",
            true,
            ProtocolLevel::V311,
            1,
            Some(will("park/will", "gone", QoS::AtMostOnce, false)),
        ),
    );
    let start = Instant::now();
    assert!(c.expect_closed().is_empty());
    assert!(start.elapsed() >= Duration::from_millis(1400));
    assert_eq!(&watcher.next_publish().payload[..], b"gone");
}

#[test]
fn peer_close_and_takeover_of_parked_connections() {
    let b = broker();
    let mut watcher = Raw::ok(b.addr, "park-watcher2");
    watcher.subscribe(&[("park/w/#", QoS::AtMostOnce)]);
    let (dying, _) = Raw::connect_full(
        b.addr,
        connect_packet(
            "park-dies",
            true,
            ProtocolLevel::V311,
            60,
            Some(will("park/w/dies", "x", QoS::AtMostOnce, false)),
        ),
    );
    let (mut taken, _) = Raw::connect_full(
        b.addr,
        connect_packet(
            "park-taken",
            false,
            ProtocolLevel::V311,
            60,
            Some(will("park/w/taken", "y", QoS::AtMostOnce, false)),
        ),
    );
    taken.subscribe(&[("park/t", QoS::AtLeastOnce)]);
    wait_parked(&b, 3);
    drop(dying);
    assert_eq!(watcher.next_publish().topic.as_str(), "park/w/dies");
    let (mut again, ack) = Raw::connect(b.addr, "park-taken", false);
    assert!(ack.session_present);
    taken.expect_closed();
    assert_eq!(watcher.next_publish().topic.as_str(), "park/w/taken");
    let mut p = Raw::ok(b.addr, "park-pub2");
    p.publish("park/t", b"moved", QoS::AtLeastOnce, false, 1);
    assert_eq!(&again.next_publish().payload[..], b"moved");
}

#[test]
fn shutdown_closes_parked_connections() {
    let mut b = broker();
    let mut clients: Vec<Raw> = (0..30)
        .map(|i| Raw::ok(b.addr, &format!("park-c{i}")))
        .collect();
    wait_parked(&b, 30);
    let start = Instant::now();
    b.handle.take().unwrap().stop().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    for c in &mut clients {
        assert!(c.expect_closed().is_empty());
    }
}
