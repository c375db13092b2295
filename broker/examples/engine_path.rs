//! The engine's message path alone, deterministic: one shard, 10 publishers and 10 subscribers
//! in pairs (p2p, QoS 0, 16-byte payloads, the load generator's topics), PUBLISH bytes fed
//! eight at a time as a socket read would bring them, every subscriber's outbox taken after
//! each read. No sockets, no clock reads on the path, no other thread: run it under callgrind
//! twice with different message counts and the difference in instructions over the difference
//! in messages is the cost of one message through decode, routing, delivery and encode, with
//! the broker's allocator — repeatable to the instruction, for an A/B of a change.
//!
//! `cargo build --release -p shardmq --example engine_path`, then
//! `scripts/engine-path-instructions.sh` (which does both runs).

mod common;

use shardmq::config::{engine_config, Config};
use shardmq::core::engine::Engine;
use shardmq::core::time::Timestamp;
use shardmq::protocol::mqtt::{self, Packet, Publish, QoS, Subscribe};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PAIRS: usize = 10;
const PER_READ: usize = 8;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    // A fixed time: nothing on the path depends on it.
    let now = Timestamp(1_700_000_000_000);
    let mut engine = Engine::new(engine_config(&Config::default(), 0, 1), now);
    let peer = "127.0.0.1:40000".parse().expect("address");
    let topic = |i: usize| format!("bench/19ad0c0ffee/p2p/{i}");
    let subs: Vec<_> = (0..PAIRS)
        .map(|i| {
            let id = common::connect(&mut engine, peer, format!("bsub{i}"), now);
            let subscribe = Subscribe {
                packet_id: 1,
                filters: vec![(topic(i), QoS::AtMostOnce)],
            };
            engine.handle_packet(id, Packet::Subscribe(subscribe), now);
            id
        })
        .collect();
    let pubs: Vec<_> = (0..PAIRS)
        .map(|i| common::connect(&mut engine, peer, format!("bpub{i}"), now))
        .collect();
    // Each publisher's reads: PER_READ PUBLISH packets back to back.
    let reads: Vec<Vec<u8>> = (0..PAIRS)
        .map(|i| {
            let mut b = bytes::BytesMut::new();
            for _ in 0..PER_READ {
                mqtt::encode(
                    &Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtMostOnce,
                        retain: false,
                        topic: topic(i).as_str().into(),
                        packet_id: 0,
                        payload: bytes::Bytes::from_static(&[7u8; 16]),
                    }),
                    &mut b,
                );
            }
            b.to_vec()
        })
        .collect();
    let drain = |engine: &mut Engine| {
        for &s in &subs {
            let written = engine.conn_outbox(s).map_or(0, |o| {
                let len = o.len();
                o.clear();
                len
            });
            let _ = engine.conn_flushed(s, written, now);
        }
    };
    drain(&mut engine);
    let mut sent = 0;
    let mut round = 0;
    while sent < n {
        let p = round % PAIRS;
        let used = engine.handle_input(pubs[p], &reads[p], now).used;
        assert_eq!(used, reads[p].len(), "every packet read");
        sent += PER_READ;
        round += 1;
        drain(&mut engine);
    }
    let m = &engine.metrics;
    assert_eq!(m.messages_sent as usize, sent, "every message delivered");
    println!("{sent} messages");
}
