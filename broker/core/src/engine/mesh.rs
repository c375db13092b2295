//! Cross-shard traffic: the queues to each shard and their limits (stalling a connection's
//! packets when they are full), barriers and what waits for them, and the dispatch of every
//! message another shard sends.

use super::*;

impl Engine {
    /// Whether some cross-shard queue has no room for `need` more messages.
    pub(super) fn congested(&self, need: usize) -> bool {
        self.outgoing
            .iter()
            .any(|o| o.queue.len() + need > self.cfg.max_pending)
    }

    /// Holds `packet` back, and stops reading its connection, until the cross-shard queues
    /// are below half (`resume_stalled`).
    pub(super) fn stall(&mut self, id: ConnId, packet: Packet) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            c.paused = true;
            if self.resuming {
                // It was first in line and stays so.
                self.stalled.push_front((id, packet));
            } else {
                self.stalled.push_back((id, packet));
                self.metrics.backpressure_pauses += 1;
            }
        }
    }

    /// Whether every cross-shard queue is below half its bound.
    pub(super) fn queues_below_half(&self) -> bool {
        self.outgoing
            .iter()
            .all(|o| o.queue.len() < self.cfg.max_pending.div_ceil(2))
    }

    /// Publishes the wills and handles the packets held back by a full queue, in the order
    /// they came, while every queue stays below half.
    pub(super) fn resume_stalled(&mut self) {
        while self.queues_below_half() {
            let Some(msg) = self.stalled_wills.pop_front() else {
                break;
            };
            self.accept_will(msg);
        }
        let now = self.now;
        while self.stalled_wills.is_empty() && self.queues_below_half() {
            let Some((id, packet)) = self.stalled.pop_front() else {
                break;
            };
            let Some(c) = conn_mut(&mut self.conns, id).filter(|c| !c.close) else {
                continue;
            };
            // Held back by the broker, not by the client: keepalive restarts now.
            c.last_rx = now;
            c.wake();
            let later = c.more_stalled;
            let later = later && self.stalled.iter().any(|(other, _)| *other == id);
            if let Some(c) = conn_mut(&mut self.conns, id) {
                c.paused = later;
                c.more_stalled = later;
            }
            let waiting = self.stalled.len();
            self.resuming = true;
            self.dispatch_packet(id, packet);
            self.resuming = false;
            self.arm_conn(id);
            if self.stalled.len() > waiting {
                break;
            }
        }
    }

    /// Flushes route changes and, if there were none, sends an empty delta: once every shard
    /// has acknowledged the returned sequence number, everything they sent before has arrived.
    pub(super) fn barrier(&mut self) -> u64 {
        let before = self.route_seq;
        let seq = self.flush_routes();
        if seq == before && self.cfg.shards > 1 {
            self.broadcast_route(Vec::new(), Vec::new());
        }
        self.route_seq
    }

    pub(super) fn all_acked(&self, seq: u64) -> bool {
        self.acked
            .iter()
            .enumerate()
            .all(|(peer, &a)| peer == self.cfg.shard || a >= seq)
    }

    pub(super) fn add_waiter(&mut self, seq: u64, w: Waiter) {
        if self.waiters.is_empty() && self.all_acked(seq) {
            self.fire(w);
        } else {
            self.waiters.push_back((seq, w));
        }
    }

    pub(super) fn fire(&mut self, w: Waiter) {
        match w {
            Waiter::Suback {
                conn,
                suback,
                key,
                gen,
                granted,
            } => {
                if let Some(c) = conn_mut(&mut self.conns, conn) {
                    if !c.close {
                        self.metrics.packets_suback_sent += 1;
                        self.outbox_bytes += c.outbox.put(&Packet::Suback(suback));
                        c.wake();
                    }
                }
                if self.sessions.get(key).is_some_and(|s| s.gen() == gen) {
                    self.query_retained(key, granted);
                }
            }
            Waiter::Release { key, gen } => {
                let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
                    return;
                };
                if a.gen != gen {
                    return;
                }
                let Some(arrival) = a.arrival.as_deref_mut() else {
                    return;
                };
                if arrival.release() {
                    let (to, epoch) = (arrival.upstream, arrival.epoch);
                    let client_id = a.session.client_id.clone();
                    self.send(to, Control::ReleaseForward { client_id, epoch });
                }
            }
            Waiter::Barrier { key, gen } => self.on_forward_barrier(key, gen),
            Waiter::Arrived { key, gen } => self.on_arrived(key, gen),
        }
    }

    // ---------------------------------------------------------------- cross-shard

    pub(super) fn send(&mut self, shard: usize, msg: impl Into<ShardMsg>) {
        let msg = msg.into();
        if shard == self.cfg.shard {
            self.inbox.push_back(msg);
            return;
        }
        let out = &mut self.outgoing[shard];
        out.queue.push_back(msg);
        if out.queue.len() == 1 {
            if let Some(w) = out.waker.take() {
                w.wake();
            }
        }
    }

    pub(super) fn drain_inbox(&mut self) {
        while let Some(msg) = self.inbox.pop_front() {
            self.dispatch(self.cfg.shard, msg);
        }
        if !self.overloaded.is_empty() {
            self.shut_overloaded();
        }
    }

    /// Closes the connections a delivery found past `mqtt.force_shutdown_policy`.
    fn shut_overloaded(&mut self) {
        for id in std::mem::take(&mut self.overloaded) {
            let Some(c) = conn_mut(&mut self.conns, id).filter(|c| !c.close) else {
                continue;
            };
            self.metrics.force_shutdowns += 1;
            tracing::warn!(peer = %c.peer, client_id = client_of(&self.sessions, c), "too many deliveries wait for this client (mqtt.force_shutdown_policy); closing it");
            self.end_connection(id, true, EndReason::ForceShutdown);
        }
        // Ending a connection may have queued messages of its own (a will).
        while let Some(msg) = self.inbox.pop_front() {
            self.dispatch(self.cfg.shard, msg);
        }
    }

    /// Messages from shard `from`, in the order it sent them.
    pub fn handle_shard_msg(&mut self, from: usize, msg: ShardMsg, now: Timestamp) {
        self.now = now;
        self.dispatch(from, msg);
        self.drain_inbox();
    }

    pub(super) fn dispatch(&mut self, from: usize, msg: ShardMsg) {
        match msg {
            ShardMsg::Deliver(m) => {
                self.deliver_local(&m);
            }
            ShardMsg::RouteAck { seq } => self.on_route_ack(from, seq),
            ShardMsg::RetainedStored { conn } => self.on_retained_stored(conn),
            ShardMsg::Control(c) => self.dispatch_control(from, *c),
        }
    }

    /// The rarer messages from shard `from`.
    fn dispatch_control(&mut self, from: usize, msg: Control) {
        match msg {
            Control::Route { seq, add, remove } => {
                for f in add {
                    let (set, new) = self.routes.entry_or_insert_with(&f, ShardSet::default);
                    set.insert(from);
                    if new && self.local.get(&f).is_some() {
                        self.local_only_filters -= 1;
                    }
                }
                for f in remove {
                    if let Some(set) = self.routes.get_mut(&f) {
                        set.remove(from);
                        if set.is_empty() {
                            self.routes.remove(&f);
                            if self.local.get(&f).is_some() {
                                self.local_only_filters += 1;
                            }
                        }
                    }
                }
                self.send(from, ShardMsg::RouteAck { seq });
            }
            Control::Register {
                client_id,
                ticket,
                clean,
            } => self.on_register(client_id, ticket, clean),
            Control::ConnectDone { client_id, epoch } => self.on_connect_done(client_id, epoch),
            Control::Unregister { client_id, epoch } => self.on_unregister(client_id, epoch),
            Control::Banned { ticket } => self.on_banned(ticket),
            Control::Takeover {
                client_id,
                ticket,
                epoch,
                clean,
            } => self.on_takeover(client_id, ticket, epoch, clean),
            Control::Handover {
                client_id,
                ticket,
                epoch,
                session,
            } => {
                let handed = match session {
                    // The sender forwards what still reaches it until released.
                    Some(session) => Handed::Moved {
                        session,
                        upstream: Some(from),
                    },
                    None => Handed::Fresh,
                };
                self.finish_connect(client_id, ticket, epoch, handed);
            }
            Control::Forward {
                client_id,
                epoch,
                msg,
                qos,
                retain,
            } => self.on_forward(from, client_id, epoch, msg, qos, retain),
            Control::ReleaseForward { client_id, epoch } => self.on_release(client_id, epoch),
            Control::ForwardDone { client_id, epoch } => {
                self.on_forward_done(from, client_id, epoch)
            }
            Control::RetainedSet { msg, ack } => {
                self.store_retained(msg);
                if let Some(conn) = ack {
                    self.send(conn.shard(), ShardMsg::RetainedStored { conn });
                }
            }
            Control::RetainedQuery { session, filters } => {
                let msgs: Vec<(SharedMessage, QoS)> = filters
                    .iter()
                    .flat_map(|(filter, qos)| self.lookup_retained(filter, *qos))
                    .collect();
                if !msgs.is_empty() {
                    self.send(session.shard(), Control::RetainedReply { session, msgs });
                }
            }
            Control::RetainedReply { session, msgs } => self.deliver_retained(session, msgs),
        }
    }

    /// Shard `from` applied every route delta up to `seq`: fire what waited for it.
    fn on_route_ack(&mut self, from: usize, seq: u64) {
        self.acked[from] = self.acked[from].max(seq);
        while let Some((s, _)) = self.waiters.front() {
            if !self.all_acked(*s) {
                break;
            }
            if let Some((_, w)) = self.waiters.pop_front() {
                self.fire(w);
            }
        }
    }

    /// Whether messages wait for shard `dest`.
    pub fn has_outgoing(&self, dest: usize) -> bool {
        !self.outgoing[dest].queue.is_empty()
    }

    /// Registers the waker of the task that flushes messages for `dest`.
    pub fn set_outgoing_waker(&mut self, dest: usize, waker: &Waker) {
        self.outgoing[dest].waker = Some(waker.clone());
    }

    /// Takes the next batch (at most `shards.batch_size` messages) for shard `dest`. The room
    /// it makes goes to forwards waiting in a backlog, then, once every queue is below half,
    /// to the wills and packets held back.
    pub fn take_outgoing(&mut self, dest: usize) -> Vec<ShardMsg> {
        let q = &mut self.outgoing[dest].queue;
        let n = q.len().min(self.cfg.batch_size);
        let batch: Vec<ShardMsg> = q.drain(..n).collect();
        if !self.backlogged.is_empty() {
            self.flush_backlogs();
        }
        if !(self.stalled.is_empty() && self.stalled_wills.is_empty()) && self.queues_below_half() {
            self.resume_stalled();
            self.drain_inbox();
        }
        batch
    }

    /// Moves forwards from the forwarding slots' backlogs to their queues while there is room.
    pub(super) fn flush_backlogs(&mut self) {
        let keys = std::mem::take(&mut self.backlogged);
        for key in keys {
            let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) else {
                continue;
            };
            let out = &mut self.outgoing[f.to];
            let room = self.cfg.max_pending.saturating_sub(out.queue.len());
            let n = room.min(f.backlog.len());
            if n > 0 {
                let was_empty = out.queue.is_empty();
                out.queue.extend(f.backlog.drain(..n));
                if was_empty {
                    if let Some(w) = out.waker.take() {
                        w.wake();
                    }
                }
            }
            if f.backlog.is_empty() {
                self.try_finish_forwarding(key);
            } else {
                self.backlogged.push(key);
            }
        }
    }
}
