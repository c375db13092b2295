//! Clients that do not read: the broker stops reading them, keeps its memory bounded, closes
//! them when it decides to within a bounded time whatever state they are in, and loses nothing
//! of the other clients'.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use shardmq::core::route::owner_shard;
use shardmq::protocol::mqtt::{Packet, QoS};
use std::time::{Duration, Instant};

/// A client id whose owner shard is (or is not) `shard`, of `shards`.
fn id_owned(prefix: &str, shard: usize, shards: usize, here: bool) -> String {
    (0..)
        .map(|k| format!("{prefix}-{k}"))
        .find(|id| (owner_shard(id.as_bytes(), shards) == shard) == here)
        .expect("ids spread over the shards")
}

/// A broker with 2 shards, a short close timeout, and small kernel send buffers (so what a
/// client does not read stays in the broker's outbox instead of the kernel's).
fn broker() -> Broker {
    let mut cfg = config(2);
    cfg.mqtt.close_timeout = shardmq::config::Duration::secs(1);
    cfg.listener.tcp.get_mut("external").unwrap().sndbuf = shardmq::config::ByteSize(16 << 10);
    cfg.shards.park_idle_after = shardmq::config::Duration::secs(0);
    let b = Broker::start(cfg);
    assert_eq!(b.handle().stats().len(), 2, "this test needs 2 CPUs");
    b
}

/// Opens a subscriber to `topic` that will not read (a small receive buffer), on a shard it
/// finds out, with a client id owned by that shard (`here`) or by the other one.
fn stuck_subscriber(
    b: &Broker,
    known: &mut Vec<u64>,
    here: bool,
    topic: &str,
    keep_alive: u16,
) -> (Raw, String) {
    let mut r = Raw::open_small(b.addr, 4096);
    let now = b.accepted_when(known.iter().sum::<u64>() + 1);
    let shard = (0..now.len()).find(|&i| now[i] > known[i]).unwrap();
    *known = now;
    let id = id_owned(topic, shard, 2, here);
    r.handshake(&id, true, keep_alive);
    r.subscribe(&[(topic, QoS::AtMostOnce)]);
    (r, id)
}

/// Publishes 16 KB QoS 0 messages to `topic` until the broker drops some for a slow consumer:
/// the subscriber's outbox is full.
fn flood_until_dropped(b: &Broker, publisher: &mut Raw, topic: &str) {
    let before = b.handle().metrics().dropped_slow_consumer;
    let payload = vec![b'x'; 16 * 1024];
    let start = Instant::now();
    while b.handle().metrics().dropped_slow_consumer == before {
        for _ in 0..64 {
            publisher.publish(topic, &payload, QoS::AtMostOnce, false, 0);
        }
        publisher.ping();
        assert!(
            start.elapsed() < WAIT,
            "the subscriber's outbox never filled"
        );
    }
}

/// Keepalive closes a subscriber that stopped reading (its outbox full, so its own packets are
/// not read either); its last bytes cannot be written, so the socket is reset after
/// `mqtt.close_timeout` and released.
#[test]
fn a_client_that_stops_reading_is_closed_and_released_within_bounds() {
    let b = broker();
    let mut publisher = Raw::ok(b.addr, "flooder-pub");
    let mut known = b.accepted_when(1);
    for here in [true, false] {
        let topic = format!("stuck/{here}");
        let (mut sub, id) = stuck_subscriber(&b, &mut known, here, &topic, 1);
        flood_until_dropped(&b, &mut publisher, &topic);
        let resets = b.handle().metrics().close_timeouts;
        // Keepalive 1 s × 1.5, then close_timeout 1 s: well within WAIT.
        b.wait_connections(1, WAIT);
        b.wait_metrics("keepalive close and reset", |m| {
            m.keepalive_timeouts >= 1 && m.close_timeouts > resets
        });
        sub.drain_until_closed();
        eprintln!(
            "{id} (owned {}) closed",
            if here { "here" } else { "elsewhere" }
        );
    }
    publisher.ping();
}

/// A takeover closes the old connection of a client that stopped reading; the new connection
/// is served at once and the old socket is released within `mqtt.close_timeout`.
#[test]
fn a_taken_over_connection_that_never_reads_is_released_within_bounds() {
    let b = broker();
    let mut publisher = Raw::ok(b.addr, "flooder-pub");
    let mut known = b.accepted_when(1);
    for here in [true, false] {
        let topic = format!("taken/{here}");
        let (mut old, id) = stuck_subscriber(&b, &mut known, here, &topic, 0);
        flood_until_dropped(&b, &mut publisher, &topic);
        let resets = b.handle().metrics().close_timeouts;
        let started = Instant::now();
        let (mut new, ack) = Raw::connect(b.addr, &id, true);
        known = b.accepted_when(known.iter().sum::<u64>() + 1);
        assert_eq!(
            ack.code,
            shardmq::protocol::mqtt::ConnectReturnCode::Accepted
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "CONNACK waited for the old socket"
        );
        new.ping();
        b.wait_metrics("old connection reset", |m| m.close_timeouts > resets);
        b.wait_connections(2, WAIT);
        old.drain_until_closed();
        new.send(&Packet::Disconnect);
        b.wait_connections(1, WAIT);
    }
    publisher.ping();
}

/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(30);
/// The most the broker's resident memory may grow during the flood: its outboxes and read
/// buffers, not the flood (a broker that kept reading would hold every PUBACK it wrote).
const RSS_GROWTH_BOUND: u64 = 48 << 20;
/// The most the flooder may get into the broker in all. The broker stops reading it once the
/// PUBACKs it could not write fill its outbox, after the kernel buffers on both ends took
/// theirs (with Linux's default autotuning, about 10 MB of PUBACKs, 2.5 million of them:
/// about 22 MB of these 9-byte PUBLISHes, plus the buffers on the way in). An unthrottled
/// flood of 30 s is hundreds of megabytes.
const FLOOD_BOUND: u64 = 64 << 20;
/// What the flooder may still get in during the last seconds, once throttled.
const FLOOD_TAIL_BOUND: u64 = 1 << 20;

/// One client floods QoS 1 PUBLISHes for 30 s and never reads its PUBACKs, while another pair
/// exchanges QoS 1 messages. The broker stops reading the flooder (TCP pushes back on it), its
/// memory stays bounded, and the pair loses nothing.
#[test]
fn a_qos1_flood_that_never_reads_is_throttled_and_others_lose_nothing() {
    use common::process::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let mut child = spawn_broker("127.0.0.1:0");
    let (addr, _log) = listen_addr(&mut child);
    let pid = child.id();
    let baseline = rss(pid);
    let stop = Arc::new(AtomicBool::new(false));

    // A subscriber that reads the flood's messages, so the broker routes them.
    let mut watcher = Raw::ok(addr, "flood-watcher");
    watcher.subscribe(&[("f/#", QoS::AtMostOnce)]);
    let watching = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(Some(_)) = watcher.recv_within(Duration::from_millis(100)) {
                    n += 1;
                }
            }
            n
        })
    };

    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flooding = {
        let stop = stop.clone();
        let written = written.clone();
        std::thread::spawn(move || {
            let mut f = Raw::open(addr);
            f.handshake("flooder", true, 0);
            f.stream
                .set_write_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut batch = Vec::new();
            for i in 0..256u16 {
                let mut b = bytes::BytesMut::new();
                shardmq::protocol::mqtt::encode(
                    &Packet::Publish(shardmq::protocol::mqtt::Publish {
                        dup: false,
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        topic: "f/x".into(),
                        packet_id: i + 1,
                        payload: bytes::Bytes::new(),
                    }),
                    &mut b,
                );
                batch.extend_from_slice(&b);
            }
            let mut rest: &[u8] = &[];
            while !stop.load(Ordering::Relaxed) {
                if rest.is_empty() {
                    rest = &batch;
                }
                match f.stream.write(rest) {
                    Ok(n) => {
                        written.fetch_add(n as u64, Ordering::Relaxed);
                        rest = &rest[n..];
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            f
        })
    };

    let mut sub = Raw::ok(addr, "pair-sub");
    sub.subscribe(&[("pair/t", QoS::AtLeastOnce)]);
    let mut publ = Raw::ok(addr, "pair-pub");
    let started = Instant::now();
    let mut peak = baseline;
    let mut exchanged = 0u32;
    let mut tail_from = None;
    while started.elapsed() < FLOOD {
        if tail_from.is_none() && started.elapsed() >= FLOOD - Duration::from_secs(5) {
            tail_from = Some(written.load(Ordering::Relaxed));
        }
        exchanged += 1;
        let pid16 = (exchanged % 65_535) as u16 + 1;
        publ.publish(
            "pair/t",
            &exchanged.to_be_bytes(),
            QoS::AtLeastOnce,
            false,
            pid16,
        );
        assert_eq!(
            publ.recv(),
            Some(Packet::Puback(pid16)),
            "message {exchanged}"
        );
        let got = sub.next_publish();
        assert_eq!(
            &got.payload[..],
            &exchanged.to_be_bytes(),
            "in order, nothing lost"
        );
        if exchanged % 50 == 0 {
            peak = peak.max(rss(pid));
        }
    }
    peak = peak.max(rss(pid));
    stop.store(true, Ordering::Relaxed);
    let _flooder = flooding.join().unwrap();
    let flooded = written.load(Ordering::Relaxed);
    let tail = flooded - tail_from.unwrap_or(0);
    let watched = watching.join().unwrap();
    eprintln!(
        "pair exchanged {exchanged}; flooder got {flooded} bytes in, {tail} in the last 5 s; \
         watcher read {watched}; RSS {} MB -> peak {} MB",
        baseline >> 20,
        peak >> 20
    );
    assert!(exchanged >= 100, "the pair made progress: {exchanged}");
    assert!(
        flooded <= FLOOD_BOUND,
        "the flooder was not throttled: {flooded} bytes in {FLOOD:?}"
    );
    assert!(
        tail <= FLOOD_TAIL_BOUND,
        "the flooder still got {tail} bytes in during the last 5 s"
    );
    assert!(
        peak - baseline <= RSS_GROWTH_BOUND,
        "RSS grew by {} MB (bound {} MB)",
        (peak - baseline) >> 20,
        RSS_GROWTH_BOUND >> 20
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

/// A subscriber that reads slowly and sends nothing meanwhile: QoS 1 deliveries that do not
/// fit its outbox wait in its session and follow as it reads, in order, with nothing lost.
#[test]
fn deliveries_held_back_for_room_follow_as_the_client_reads() {
    let mut cfg = config(2);
    cfg.mqtt.max_inflight = 1000;
    cfg.mqtt.max_mqueue_len = 1000;
    cfg.listener.tcp.get_mut("external").unwrap().sndbuf = shardmq::config::ByteSize(16 << 10);
    let b = Broker::start(cfg);
    let mut known = b.accepted_when(0);
    for here in [true, false] {
        let topic = format!("slow/{here}");
        let (mut sub, _) = stuck_subscriber(&b, &mut known, here, &topic, 60);
        sub.send(&Packet::Subscribe(shardmq::protocol::mqtt::Subscribe {
            packet_id: 2,
            filters: vec![(topic.clone(), QoS::AtLeastOnce)],
        }));
        match sub.recv() {
            Some(Packet::Suback(_)) => {}
            other => panic!("{other:?}"),
        }
        let mut publ = Raw::ok(b.addr, &format!("slow-pub-{here}"));
        known = b.accepted_when(known.iter().sum::<u64>() + 1);
        const N: u32 = 300;
        let payload = vec![0u8; 16 * 1024];
        for i in 1..=N {
            let mut p = payload.clone();
            p[..4].copy_from_slice(&i.to_be_bytes());
            publ.publish(&topic, &p, QoS::AtLeastOnce, false, (i % 60_000) as u16 + 1);
        }
        publ.ping();
        // Everything is published and acknowledged; the subscriber now reads it all without
        // sending a thing until the end.
        let mut got = Vec::new();
        while got.len() < N as usize {
            match sub.recv() {
                Some(Packet::Publish(p)) => got.push((
                    p.packet_id,
                    u32::from_be_bytes(p.payload[..4].try_into().unwrap()),
                )),
                other => panic!("after {} messages: {other:?}", got.len()),
            }
        }
        assert!(
            got.iter().map(|g| g.1).eq(1..=N),
            "in order, each once: {:?}",
            &got[..10]
        );
        for (pid, _) in got {
            sub.send(&Packet::Puback(pid));
        }
        sub.ping();
        let m = b.handle().metrics();
        assert_eq!(m.dropped_queue_full + m.dropped_slow_consumer, 0, "{m:?}");
    }
}

/// Payload of the messages of the force-shutdown flood.
const SHUTDOWN_PAYLOAD: usize = 16 << 10;
/// Messages in that flood: 96 MB in all, which a subscriber that never reads would hold (its
/// queue is allowed a million messages) without the policy.
const SHUTDOWN_FLOOD: u16 = 6_000;
/// The most the broker's resident memory may grow meanwhile: the policy's 8 MB for the stuck
/// subscriber, outboxes and read buffers, allocator slack.
const SHUTDOWN_RSS_BOUND: u64 = 40 << 20;

/// `mqtt.force_shutdown_policy`: a subscriber that stops reading while a publisher floods QoS 1
/// messages is disconnected once 8 MB wait for it, another subscriber receives every message
/// in order, and the broker's resident memory stays far below the flood, with the stuck
/// subscriber's client id owned by either shard. The broker runs as its own process, so its
/// RSS is its own.
#[test]
fn force_shutdown_keeps_the_brokers_memory_bounded() {
    use common::process::*;

    let mut child = spawn_broker_with(
        "127.0.0.1:0",
        &[
            ("SHARDMQ_SHARDS__CPUS", "[0,1]"),
            ("SHARDMQ_MQTT__FORCE_SHUTDOWN_POLICY", "1000000|8MB"),
            ("SHARDMQ_MQTT__MAX_MQUEUE_LEN", "1000000"),
        ],
    );
    let (addr, _log) = listen_addr(&mut child);
    let pid = child.id();
    let payload = vec![0x5au8; SHUTDOWN_PAYLOAD];
    for owner in 0..2 {
        let topic = format!("big/{owner}");
        let mut stuck = Raw::open(addr);
        stuck.handshake(&id_owned(&format!("stuck{owner}"), owner, 2, true), true, 0);
        stuck.subscribe(&[(topic.as_str(), QoS::AtLeastOnce)]);
        let mut reader = Raw::ok(addr, &format!("reader{owner}"));
        reader.subscribe(&[(topic.as_str(), QoS::AtLeastOnce)]);
        let mut publ = Raw::ok(addr, &format!("big-pub{owner}"));
        let baseline = rss(pid);
        let mut peak = baseline;
        for i in 1..=SHUTDOWN_FLOOD {
            publ.publish(&topic, &payload, QoS::AtLeastOnce, false, i);
            assert_eq!(publ.recv(), Some(Packet::Puback(i)), "owner {owner}");
            let m = reader.next_publish();
            assert_eq!(
                m.payload.len(),
                SHUTDOWN_PAYLOAD,
                "owner {owner}, message {i}"
            );
            if i % 100 == 0 {
                peak = peak.max(rss(pid));
            }
        }
        peak = peak.max(rss(pid));
        eprintln!(
            "owner {owner}: RSS {} MB -> peak {} MB over a {} MB flood",
            baseline >> 20,
            peak >> 20,
            (usize::from(SHUTDOWN_FLOOD) * SHUTDOWN_PAYLOAD) >> 20
        );
        stuck.drain_until_closed();
        assert!(
            peak.saturating_sub(baseline) <= SHUTDOWN_RSS_BOUND,
            "owner {owner}: RSS grew by {} MB (bound {} MB)",
            (peak - baseline) >> 20,
            SHUTDOWN_RSS_BOUND >> 20
        );
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}
