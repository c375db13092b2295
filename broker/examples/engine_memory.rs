//! Heap held by the sans-IO engine per idle connected client: opens N connections on a
//! one-shard engine, connects each with a distinct client id (clean session, keepalive 60 s),
//! and prints the live heap growth per client, counted by a wrapping global allocator.
//!
//! `cargo run --release -p shardmq --example engine_memory -- 10000`
//!
//! This is the engine's share of a connection's memory; sockets, driver tasks and parking
//! come on top (see docs/benchmarks.md, memory per connection).

mod common;

use shardmq::config::{engine_config, Config};
use shardmq::core::engine::Engine;
use shardmq::shard::clock;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static COUNT: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        COUNT.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let now = clock::now();
    let mut engine = Engine::new(engine_config(&Config::default(), 0, 1), now);
    let peer = "127.0.0.1:40000".parse().expect("address");
    let (before, count_before) = (LIVE.load(Ordering::Relaxed), COUNT.load(Ordering::Relaxed));
    for i in 0..n {
        let id = common::connect(&mut engine, peer, format!("bench-conn-{i}"), now);
        if let Some(out) = engine.conn_outbox(id) {
            out.clear();
        }
        engine.note_io(id, now);
    }
    let grown = LIVE.load(Ordering::Relaxed) - before;
    let allocs = COUNT.load(Ordering::Relaxed) - count_before;
    println!(
        "{n} clients: {} bytes live ({:.1} per client), {allocs} allocations ({:.2} per client)",
        grown,
        grown as f64 / n as f64,
        allocs as f64 / n as f64
    );
}
