//! Cross-shard channels: one bounded glommio `shared_channel` per ordered pair of shards,
//! carrying batches of [`ShardMsg`]. Created in the main thread before the executors start,
//! connected by each executor as it starts (all ends at once, since a connect waits for its
//! peer), and drained by one receiver task per peer. One flush task per peer, woken by the
//! first message queued for it, sends the engine's queued messages in batches.
//!
//! The choice of glommio's channel over crossbeam (with a doorbell) is measured in
//! `broker/benches/channels.rs`; the figures are in docs/benchmarks.md.

use crate::core::engine::Engine;
use crate::core::msgs::ShardMsg;
use crate::shard::clock;
use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::{spawn_local, Task};
use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::Poll;

/// A batch of messages from one shard to another.
pub type Batch = Vec<ShardMsg>;

/// The unconnected ends of one shard: a sender to and a receiver from every other shard.
pub struct MeshEnds {
    /// `senders[j]`: to shard j (`None` for itself).
    pub senders: Vec<Option<SharedSender<Batch>>>,
    /// `receivers[j]`: from shard j (`None` for itself).
    pub receivers: Vec<Option<SharedReceiver<Batch>>>,
}

/// Creates the channels of a full mesh of `shards` shards; element i goes to shard i.
pub fn full_mesh(shards: usize, capacity: usize) -> Vec<MeshEnds> {
    let mut ends: Vec<MeshEnds> = (0..shards)
        .map(|_| MeshEnds {
            senders: (0..shards).map(|_| None).collect(),
            receivers: (0..shards).map(|_| None).collect(),
        })
        .collect();
    for from in 0..shards {
        for to in 0..shards {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(capacity);
                ends[from].senders[to] = Some(tx);
                ends[to].receivers[from] = Some(rx);
            }
        }
    }
    ends
}

/// Connected ends, owned by the shard's executor.
pub struct Connected {
    senders: Vec<(usize, ConnectedSender<Batch>)>,
    receivers: Vec<(usize, ConnectedReceiver<Batch>)>,
}

/// Connects every end concurrently (each connect waits for the peer's).
pub async fn connect(ends: MeshEnds) -> Connected {
    let senders: Vec<(usize, Task<ConnectedSender<Batch>>)> = ends
        .senders
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, spawn_local(s.connect()))))
        .collect();
    let receivers: Vec<(usize, Task<ConnectedReceiver<Batch>>)> = ends
        .receivers
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| r.map(|r| (i, spawn_local(r.connect()))))
        .collect();
    let mut out = Connected {
        senders: Vec::new(),
        receivers: Vec::new(),
    };
    for (i, t) in senders {
        out.senders.push((i, t.await));
    }
    for (i, t) in receivers {
        out.receivers.push((i, t.await));
    }
    out
}

/// Spawns the receiver and flush tasks of this shard. They end when the peers hang up.
pub fn spawn_tasks(mesh: Connected, engine: Rc<RefCell<Engine>>) -> Vec<Task<()>> {
    let mut tasks = Vec::new();
    for (peer, rx) in mesh.receivers {
        let engine = engine.clone();
        tasks.push(spawn_local(async move {
            while let Some(batch) = rx.recv().await {
                let now = clock::now();
                let mut e = engine.borrow_mut();
                for msg in batch {
                    e.handle_shard_msg(peer, msg, now);
                }
            }
        }));
    }
    for (peer, tx) in mesh.senders {
        let engine = engine.clone();
        tasks.push(spawn_local(async move {
            loop {
                poll_fn(|cx| {
                    let mut e = engine.borrow_mut();
                    if e.has_outgoing(peer) {
                        Poll::Ready(())
                    } else {
                        e.set_outgoing_waker(peer, cx.waker());
                        Poll::Pending
                    }
                })
                .await;
                // Let the tasks that are ready run first, so the batch fills.
                futures_lite::future::yield_now().await;
                loop {
                    let batch = engine.borrow_mut().take_outgoing(peer);
                    if batch.is_empty() {
                        break;
                    }
                    if tx.send(batch).await.is_err() {
                        return;
                    }
                }
            }
        }));
    }
    tasks
}
