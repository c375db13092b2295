//! The gateways' sans-IO state machines: each turns its protocol's frames into engine packets
//! for a connection with a packet sink, and the packets the engine has for it back into frames.
//! Their drivers (sockets, timers) live in the runtime, on the shard a profile pins them to.

pub mod lwm2m;
pub mod mqttsn;
pub mod tcp;

use crate::engine::ConnId;
use crate::time::Timestamp;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// A client of a gateway that keeps a deadline (a retransmission, an expiry).
pub(crate) trait Armed {
    /// The deadline its entry in [`Deadlines`] is armed for (`NEVER`: none).
    fn armed(&mut self) -> &mut Timestamp;
}

/// The deadlines of a gateway's clients: a heap with lazy deletion. A client is armed only
/// for a deadline earlier than the one it has; an entry that no longer matches its client's
/// armed time (re-armed, or the client gone) is skipped when it comes up, and the heap is
/// rebuilt from the clients once such entries outnumber the live ones, so it stays bounded.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    heap: BinaryHeap<Reverse<(Timestamp, u32, u32)>>,
}

impl Deadlines {
    /// Arms client `id` of `clients` for `due`, if earlier than what it has armed.
    pub(crate) fn arm<T: Armed>(
        &mut self,
        clients: &mut HashMap<ConnId, T>,
        id: ConnId,
        due: Timestamp,
    ) {
        let Some(c) = clients.get_mut(&id) else {
            return;
        };
        let armed = c.armed();
        if due < *armed {
            *armed = due;
            self.heap.push(Reverse((due, id.idx, id.gen)));
        }
        if self.heap.len() > 2 * clients.len() + 64 {
            self.heap = clients
                .iter_mut()
                .filter_map(|(id, c)| {
                    let t = *c.armed();
                    (t != Timestamp::NEVER).then_some(Reverse((t, id.idx, id.gen)))
                })
                .collect();
        }
    }

    /// The earliest deadline armed.
    pub(crate) fn next(&self) -> Option<Timestamp> {
        self.heap.peek().map(|Reverse((t, _, _))| *t)
    }

    /// The next client of `clients` whose deadline has come by `now` (disarmed: the caller
    /// arms it again for what it still has to do).
    pub(crate) fn pop_due<T: Armed>(
        &mut self,
        clients: &mut HashMap<ConnId, T>,
        now: Timestamp,
    ) -> Option<ConnId> {
        while let Some(Reverse((due, idx, gen))) = self.heap.peek().copied() {
            if due > now {
                return None;
            }
            self.heap.pop();
            let id = ConnId { idx, gen };
            if let Some(c) = clients.get_mut(&id) {
                let armed = c.armed();
                if *armed == due {
                    *armed = Timestamp::NEVER;
                    return Some(id);
                }
            }
        }
        None
    }

    /// Forgets every deadline.
    pub(crate) fn clear(&mut self) {
        self.heap.clear();
    }
}
