//! Cross-shard channel micro-benchmark: which channel carries messages between two glommio
//! executors (pinned to different CPUs) fastest?
//!
//! - `glommio-per-msg`: glommio `shared_channel`, one message per send.
//! - `glommio-batch`: glommio `shared_channel` of `Vec` batches (what the broker does).
//! - `crossbeam-per-msg`: crossbeam bounded channel, one message per send, a glommio
//!   `shared_channel` of capacity 1 as a doorbell rung only when the consumer sleeps.
//! - `crossbeam-batch`: the same carrying `Vec` batches.
//!
//! Run: `cargo bench -p shardmq --bench channels` (figures go to docs/benchmarks.md).

use glommio::channels::shared_channel;
use glommio::{LocalExecutorBuilder, Placement};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stand-in for a shared message (`Arc<Message>`); each send carries a fresh one, as each
/// publish does.
type Msg = Arc<[u8; 64]>;

const MESSAGES: usize = 4_000_000;
const BATCH: usize = 256;

fn cpus() -> (usize, usize) {
    let c = shardmq::config::available_cpus();
    (c[0], *c.get(1).unwrap_or(&c[0]))
}

fn run_async<P, C, PF, CF>(name: &str, producer: P, consumer: C)
where
    P: FnOnce() -> PF + Send + 'static,
    C: FnOnce() -> CF + Send + 'static,
    PF: std::future::Future<Output = ()> + 'static,
    CF: std::future::Future<Output = ()> + 'static,
{
    let (a, b) = cpus();
    let start = Instant::now();
    let p = LocalExecutorBuilder::new(Placement::Fixed(a)).spawn(producer);
    let c = LocalExecutorBuilder::new(Placement::Fixed(b)).spawn(consumer);
    p.expect("spawn producer").join().expect("producer");
    c.expect("spawn consumer").join().expect("consumer");
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<20} {:>8.1} ns/msg {:>8.2} M msg/s",
        secs * 1e9 / MESSAGES as f64,
        MESSAGES as f64 / secs / 1e6
    );
}

fn glommio_per_msg() {
    let (tx, rx) = shared_channel::new_bounded::<Msg>(BATCH * 64);
    run_async(
        "glommio-per-msg",
        move || async move {
            let tx = tx.connect().await;
            let m: Msg = Arc::new([7; 64]);
            for _ in 0..MESSAGES {
                tx.send(Arc::new(*m)).await.expect("send");
            }
        },
        move || async move {
            let rx = rx.connect().await;
            let mut n = 0;
            while n < MESSAGES {
                rx.recv().await.expect("recv");
                n += 1;
            }
        },
    );
}

fn glommio_batch() {
    let (tx, rx) = shared_channel::new_bounded::<Vec<Msg>>(64);
    run_async(
        "glommio-batch",
        move || async move {
            let tx = tx.connect().await;
            let m: Msg = Arc::new([7; 64]);
            for _ in 0..MESSAGES / BATCH {
                let batch: Vec<Msg> = (0..BATCH).map(|_| Arc::new(*m)).collect();
                tx.send(batch).await.expect("send");
            }
        },
        move || async move {
            let rx = rx.connect().await;
            let mut n = 0;
            while n < MESSAGES {
                n += rx.recv().await.expect("recv").len();
            }
        },
    );
}

/// crossbeam queue + doorbell: the consumer sets `sleeping` before waiting on the doorbell;
/// the producer rings it only then.
fn crossbeam<T: Send + 'static>(
    name: &str,
    per_send: usize,
    make: fn(&Msg, usize) -> T,
    count: fn(&T) -> usize,
) {
    let (tx, rx) = crossbeam_channel::bounded::<T>(if per_send == 1 { BATCH * 64 } else { 64 });
    let (bell_tx, bell_rx) = shared_channel::new_bounded::<()>(1);
    let sleeping = Arc::new(AtomicBool::new(false));
    let s2 = sleeping.clone();
    run_async(
        name,
        move || async move {
            let bell = bell_tx.connect().await;
            let m: Msg = Arc::new([7; 64]);
            for _ in 0..MESSAGES / per_send {
                let mut item = make(&m, per_send);
                loop {
                    match tx.try_send(item) {
                        Ok(()) => break,
                        Err(crossbeam_channel::TrySendError::Full(back)) => {
                            item = back;
                            futures_lite::future::yield_now().await;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                if sleeping.swap(false, Ordering::AcqRel) {
                    let _ = bell.try_send(());
                }
            }
            // Wake the consumer one last time in case it went to sleep.
            let _ = bell.try_send(());
        },
        move || async move {
            let bell = bell_rx.connect().await;
            let mut n = 0;
            while n < MESSAGES {
                match rx.try_recv() {
                    Ok(item) => n += count(&item),
                    Err(_) => {
                        s2.store(true, Ordering::Release);
                        if rx.is_empty() {
                            bell.recv().await;
                        }
                        s2.store(false, Ordering::Release);
                    }
                }
            }
        },
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "{MESSAGES} messages (Arc<[u8; 64]>) between executors on CPUs {:?}, batches of {BATCH}",
        cpus()
    );
    glommio_per_msg();
    glommio_batch();
    crossbeam::<Msg>("crossbeam-per-msg", 1, |m, _| Arc::new(**m), |_| 1);
    crossbeam::<Vec<Msg>>(
        "crossbeam-batch",
        BATCH,
        |m, n| (0..n).map(|_| Arc::new(**m)).collect(),
        |v| v.len(),
    );
}
