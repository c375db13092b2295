//! Fuzz target: arbitrary bytes from several connections of a 2-shard broker engine, exchanged
//! between the shards like the runtime does. Nothing may panic and every connection must end up
//! either open and well-formed or closed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardmq::config::{engine_config, Config};
use shardmq::core::engine::Engine;
use shardmq::core::time::Timestamp;
use shardmq::protocol::mqtt::decode_slice;

fuzz_target!(|data: &[u8]| {
    let cfg = Config::default();
    let now = Timestamp(1_000_000);
    let mut engines: Vec<Engine> = (0..2).map(|s| Engine::new(engine_config(&cfg, s, 2), now)).collect();
    let peer = "127.0.0.1:1".parse().unwrap();
    let conns: Vec<(usize, _)> = (0..4).map(|i| (i % 2, engines[i % 2].open_conn(peer, 0, now))).collect();
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); conns.len()];
    // Input: chunks of (connection selector, length, bytes).
    let mut rest = data;
    let mut t = now;
    while rest.len() >= 2 {
        let (sel, len) = (rest[0] as usize % conns.len(), rest[1] as usize);
        rest = &rest[2..];
        let take = len.min(rest.len());
        bufs[sel].extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        t = Timestamp(t.0 + 1000);
        let (shard, id) = conns[sel];
        let e = &mut engines[shard];
        let mut used = 0;
        while e.conn_status(id).is_some_and(|s| s.readable) {
            let opts = e.decode_options(id);
            match decode_slice(&bufs[sel][used..], &opts) {
                Ok(Some((p, n))) => {
                    used += n;
                    e.handle_packet(id, p, t);
                }
                Ok(None) => break,
                Err(err) => {
                    e.handle_decode_error(id, &err, t);
                    break;
                }
            }
        }
        bufs[sel].drain(..used);
        for from in 0..2 {
            let to = 1 - from;
            loop {
                let batch = engines[from].take_outgoing(to);
                if batch.is_empty() {
                    break;
                }
                for m in batch {
                    engines[to].handle_shard_msg(from, m, t);
                }
            }
        }
        for e in engines.iter_mut() {
            e.handle_timeout(t);
        }
        // The client of every odd input reads what it was sent (a driver writes it out).
        if len % 2 == 1 {
            let e = &mut engines[shard];
            let written = e.conn_outbox(id).map_or(0, |o| std::mem::take(o).len());
            let _ = e.conn_flushed(id, written, t);
        }
    }
});
