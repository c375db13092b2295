//! Publish and retained: a PUBLISH or a will becomes a message, is routed to other shards and
//! delivered to local sessions ([`Deliverer`], the per-subscriber step), and stored in the
//! retained partition of its topic's owner; acknowledgements of deliveries.

use super::handover::Direct;
use super::*;

impl Engine {
    /// The other shards with subscribers matching `topic`.
    #[inline]
    pub(super) fn remote_routes(&self, topic: &str) -> ShardSet {
        let mut remote = ShardSet::EMPTY;
        self.routes
            .for_each_match(topic, |s| remote = remote.union(*s));
        remote
    }

    /// The shard that stores a retained message on `topic` if it is another one.
    #[inline]
    pub(super) fn remote_retain_owner(&self, retain: bool, topic: &str) -> Option<usize> {
        if !retain || !self.cfg.retainer_enabled {
            return None;
        }
        let owner = self.owner(topic.as_bytes());
        (owner != self.cfg.shard).then_some(owner)
    }

    /// Whether the queues to `remote` (and to the retained owner) have room for a message.
    pub(super) fn room_for(&self, remote: ShardSet, retain_owner: Option<usize>) -> bool {
        let bound = self.cfg.max_pending;
        remote.iter().all(|s| {
            let need = 1 + usize::from(retain_owner == Some(s));
            self.outgoing[s].queue.len() + need <= bound
        }) && retain_owner.is_none_or(|o| self.outgoing[o].queue.len() < bound)
    }

    pub(super) fn on_publish(&mut self, id: ConnId, key: usize, p: Publish) {
        let now = self.now;
        let remote = self.remote_routes(&p.topic);
        let retain_owner = self.remote_retain_owner(p.retain, &p.topic);
        // QoS 1/2 is held back, before it is acknowledged, until every queue it goes to has
        // room; QoS 0 is dropped where there is none.
        if p.qos != QoS::AtMostOnce && !self.room_for(remote, retain_owner) {
            return self.stall(id, Packet::Publish(p));
        }
        let route = match p.qos {
            QoS::AtMostOnce | QoS::AtLeastOnce => true,
            QoS::ExactlyOnce => {
                let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
                    return;
                };
                match a
                    .session
                    .on_inbound_qos2(p.packet_id, now, &self.cfg.limits)
                {
                    Ok(new) => {
                        let due = self.cfg.limits.await_rel_timeout.map(|t| now.after(t));
                        self.arm_new(key, due);
                        new
                    }
                    Err(_) => {
                        return self.violation(
                            id,
                            &format!(
                                "more than {} QoS 2 messages await PUBREL",
                                self.cfg.limits.max_awaiting_rel
                            ),
                        )
                    }
                }
            }
        };
        let remote_retain = route && p.qos != QoS::AtMostOnce && retain_owner.is_some();
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if remote_retain {
            c.held
                .get_or_insert_with(|| {
                    Box::new(HeldAcks {
                        waiting: 0,
                        acks: Vec::new(),
                    })
                })
                .waiting += 1;
        }
        let ack = match p.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(Packet::Puback(p.packet_id)),
            QoS::ExactlyOnce => Some(Packet::Pubrec(p.packet_id)),
        };
        if let Some(ack) = ack {
            match &mut c.held {
                Some(h) => h.acks.push(ack),
                None => {
                    self.metrics.count_sent(&ack);
                    self.outbox_bytes += c.outbox.put(&ack);
                    c.wake();
                }
            }
        }
        if route {
            self.metrics.count_message_in(p.qos);
            let msg = self.new_message(p.topic, p.payload, p.qos, p.retain);
            let ack = remote_retain.then_some(Ticket::new(self.cfg.shard, id));
            self.accept_message(msg, ack, remote, retain_owner);
        }
    }

    /// A retained store this connection waited for is done: release its held acknowledgements
    /// once none is left.
    pub(super) fn on_retained_stored(&mut self, conn: Ticket) {
        let id = conn.slot;
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        let Some(h) = &mut c.held else {
            return;
        };
        h.waiting = h.waiting.saturating_sub(1);
        if h.waiting == 0 {
            if let Some(h) = c.held.take() {
                for ack in &h.acks {
                    self.metrics.count_sent(ack);
                    self.outbox_bytes += c.outbox.put(ack);
                }
                c.wake();
            }
        }
    }

    pub(super) fn new_message(
        &mut self,
        topic: ByteStr,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> SharedMessage {
        self.msg_seq += 1;
        Arc::new(Message {
            id: message_id(self.cfg.shard, self.msg_seq),
            topic,
            payload,
            qos,
            retain,
        })
    }

    /// A message entering the broker: store it if retained (telling `ack` when the owner shard
    /// has it), then route it to the `remote` shards and the local subscribers. A QoS 0
    /// message is dropped (and counted) for a shard whose queue is full; for QoS 1/2 the
    /// caller made sure there is room.
    pub(super) fn accept_message(
        &mut self,
        msg: SharedMessage,
        ack: Option<Ticket>,
        remote: ShardSet,
        retain_owner: Option<usize>,
    ) {
        if msg.retain && self.cfg.retainer_enabled {
            match retain_owner {
                None => self.store_retained(msg.clone()),
                Some(owner) if self.outgoing[owner].queue.len() >= self.cfg.max_pending => {
                    self.metrics.dropped_overload += 1;
                }
                Some(owner) => self.send(
                    owner,
                    Control::RetainedSet {
                        msg: msg.clone(),
                        ack,
                    },
                ),
            }
        }
        for shard in remote.iter() {
            if self.outgoing[shard].queue.len() >= self.cfg.max_pending {
                self.metrics.dropped_overload += 1;
                continue;
            }
            self.send(shard, ShardMsg::Deliver(msg.clone()));
        }
        let local = self.deliver_local(&msg);
        // The broker's own `$SYS/` messages are not clients' messages lost.
        if remote.is_empty() && local == 0 && !crate::topic::is_sys(&msg.topic) {
            self.metrics.messages_no_subscribers += 1;
        }
    }

    pub(super) fn store_retained(&mut self, msg: SharedMessage) {
        match self.retained.set(msg, self.now) {
            SetOutcome::Stored | SetOutcome::Replaced => self.metrics.retained_stored += 1,
            SetOutcome::RefusedFull | SetOutcome::RefusedTooLarge => {
                self.metrics.retained_refused += 1
            }
            SetOutcome::Cleared | SetOutcome::NothingToClear => {}
        }
    }

    /// Publishes a message of the broker's own (`$SYS/…`) at QoS 0, routed and retained like
    /// any other; dropped, like any QoS 0 message, where the cross-shard queues have no room.
    pub fn publish_system(&mut self, topic: &str, payload: Bytes, retain: bool, now: Timestamp) {
        self.now = now;
        self.route_system(topic, payload, retain);
        self.drain_inbox();
    }

    /// [`Engine::publish_system`] from within the engine (the caller drains the inbox).
    pub(super) fn route_system(&mut self, topic: &str, payload: Bytes, retain: bool) {
        self.metrics.sys_published += 1;
        let msg = self.new_message(topic.into(), payload, QoS::AtMostOnce, retain);
        let remote = self.remote_routes(&msg.topic);
        let retain_owner = self.remote_retain_owner(msg.retain, &msg.topic);
        self.accept_message(msg, None, remote, retain_owner);
    }

    pub(super) fn publish_will(&mut self, will: LastWill) {
        self.metrics.wills_published += 1;
        let msg = self.new_message(will.topic, will.payload, will.qos, will.retain);
        self.publish_broker_message(msg);
    }

    /// Publishes a message no client sent (a will, an operator's), counted as received: QoS 1
    /// and 2 ones wait, in order, for room in the cross-shard queues.
    pub(super) fn publish_broker_message(&mut self, msg: SharedMessage) {
        if self.stalled_wills.is_empty() {
            self.accept_will(msg);
        } else {
            self.stalled_wills.push_back(msg);
        }
    }

    /// Publishes a will, or holds a QoS 1/2 one back (in order) until its queues have room.
    pub(super) fn accept_will(&mut self, msg: SharedMessage) {
        let remote = self.remote_routes(&msg.topic);
        let retain_owner = self.remote_retain_owner(msg.retain, &msg.topic);
        if msg.qos != QoS::AtMostOnce && !self.room_for(remote, retain_owner) {
            self.stalled_wills.push_front(msg);
            return;
        }
        self.metrics.count_message_in(msg.qos);
        self.accept_message(msg, None, remote, retain_owner);
    }

    /// Delivers to the local sessions whose subscriptions match; returns how many sessions.
    pub(super) fn deliver_local(&mut self, msg: &SharedMessage) -> usize {
        let mut matched = std::mem::take(&mut self.scratch);
        matched.clear();
        let mut filters = 0;
        self.local.for_each_match(&msg.topic, |subs| {
            filters += 1;
            matched.extend_from_slice(subs);
        });
        if filters > 1 {
            // One copy per session, at the highest QoS of its matching subscriptions.
            matched.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            matched.dedup_by_key(|e| e.0);
        }
        for &(key, sub_qos) in &matched {
            self.deliver_to_session(key, msg, msg.qos.min(sub_qos), false);
        }
        let n = matched.len();
        self.scratch = matched;
        n
    }

    /// A delivery for the session in slot `key`: written or queued, held while the session
    /// arrives from another shard, or passed on by a forwarding slot.
    pub(super) fn deliver_to_session(
        &mut self,
        key: usize,
        msg: &SharedMessage,
        qos: QoS,
        retain: bool,
    ) {
        match self.sessions.get_mut(key) {
            Some(SessionSlot::Active(a)) => match &mut a.arrival {
                // The common case, without a second look-up of the slot.
                None => {
                    let mut d = deliverer!(self);
                    if d.deliver(a, msg, qos, retain) {
                        self.arm_new(key, self.retry_due(self.now));
                    }
                }
                Some(arrival) => {
                    match arrival.direct(msg, qos, retain, self.cfg.limits.max_mqueue_len) {
                        Direct::Deliver => self.deliver_now(key, msg, qos, retain),
                        Direct::Duplicate => self.metrics.dropped_duplicates += 1,
                        Direct::Held(dropped) => {
                            self.metrics.dropped_queue_full += u64::from(dropped)
                        }
                    }
                }
            },
            Some(SessionSlot::Forwarding(f)) => {
                let forward = Control::Forward {
                    client_id: f.client_id.clone(),
                    epoch: f.epoch,
                    msg: msg.clone(),
                    qos,
                    retain,
                };
                self.forward(key, forward.into());
            }
            None => {}
        }
    }

    /// Delivers to the active session in slot `key` now.
    pub(super) fn deliver_now(&mut self, key: usize, msg: &SharedMessage, qos: QoS, retain: bool) {
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let mut d = deliverer!(self);
        if d.deliver(a, msg, qos, retain) {
            self.arm_new(key, self.retry_due(self.now));
        }
    }

    pub(super) fn on_ack(&mut self, id: ConnId, key: usize, pid: u16, kind: AckKind) {
        let now = self.now;
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        let lim = &self.cfg.limits;
        let before = c.outbox.len();
        let limit = outbox_limit(&self.cfg, self.outbox_bytes, before);
        let out = Outbox::new(&mut c.outbox, limit);
        let result = match kind {
            AckKind::Puback => a.session.on_puback(pid, now, lim, out),
            AckKind::Pubrec => a
                .session
                .on_pubrec(pid, now, out.sink)
                .map(|_| Written::default()),
            AckKind::Pubcomp => a.session.on_pubcomp(pid, now, lim, out),
        };
        let wrote = c.outbox.len() - before;
        self.outbox_bytes += wrote;
        if wrote > 0 {
            c.wake();
        }
        if a.session.wants_room(lim) {
            starve(c, id, before + wrote, &self.cfg, &mut self.starved);
        }
        match result {
            Ok(sent) => {
                if matches!(kind, AckKind::Pubrec) {
                    self.metrics.packets_pubrel_sent += 1;
                } else {
                    self.metrics.messages_acked += 1;
                }
                self.metrics.count_messages_out(sent);
                if !sent.is_empty() {
                    self.arm_new(key, self.retry_due(now));
                }
            }
            Err(_) => {
                self.metrics.unknown_acks += 1;
                debug!(client_id = %a.session.client_id, packet_id = pid, ?kind, "acknowledgement for an unknown packet id, ignored");
            }
        }
    }
}

/// What a delivery to an active session touches besides the session: borrowed apart from the
/// session slots, so the hot path finds the slot once.
pub(super) struct Deliverer<'a> {
    pub(super) conns: &'a mut Slab<Conn>,
    pub(super) cfg: &'a EngineConfig,
    pub(super) outbox_bytes: &'a mut usize,
    pub(super) starved: &'a mut Vec<ConnId>,
    pub(super) overloaded: &'a mut Vec<ConnId>,
    pub(super) offline: &'a OfflineQueues,
    pub(super) metrics: &'a mut Metrics,
    pub(super) now: Timestamp,
}

impl Deliverer<'_> {
    /// Writes the delivery to the session's connection, or queues or drops it, and counts it.
    /// Returns whether a QoS 1/2 delivery was written (its retry timer must be armed). Inlined
    /// into its two callers: it is the per-subscriber step of every publish.
    #[inline(always)]
    pub(super) fn deliver(
        &mut self,
        a: &mut ActiveSession,
        msg: &SharedMessage,
        qos: QoS,
        retain: bool,
    ) -> bool {
        let lim = &self.cfg.limits;
        let (Some(id), Some(c)) = (a.conn, attached(self.conns, a.conn)) else {
            let size = crate::session::queued_size(msg);
            if !self.offline.reserve(size) {
                // `mqtt.max_mqueue_bytes_total`: offline queues together are full.
                self.metrics.dropped_queue_total += 1;
                return false;
            }
            let before = a.session.offline_bytes();
            let delivery = a
                .session
                .deliver::<Sink>(msg, qos, retain, self.now, lim, None);
            // Settles the reservation: what was queued, less what made room for it.
            self.offline.moved(before + size, a.session.offline_bytes());
            match delivery {
                Delivery::Queued { dropped_oldest } => {
                    self.metrics.dropped_queue_full += u64::from(dropped_oldest)
                }
                Delivery::DroppedQos0Offline => self.metrics.dropped_qos0_offline += 1,
                Delivery::Sent | Delivery::DroppedSlowConsumer => {}
            }
            return false;
        };
        // The kind of sink is looked at once, here; below it the MQTT kind is a `BytesMut`.
        let (delivery, before, after) = match &mut c.outbox {
            Sink::Mqtt(bytes) => deliver_into(
                self.cfg,
                *self.outbox_bytes,
                self.now,
                a,
                bytes,
                msg,
                qos,
                retain,
            ),
            Sink::Packets(queue) => deliver_into(
                self.cfg,
                *self.outbox_bytes,
                self.now,
                a,
                &mut **queue,
                msg,
                qos,
                retain,
            ),
        };
        match delivery {
            Delivery::Sent => {
                *self.outbox_bytes += after - before;
                self.metrics.count_message_out(qos);
                c.wake();
                return qos != QoS::AtMostOnce;
            }
            Delivery::Queued { dropped_oldest } => {
                self.metrics.dropped_queue_full += u64::from(dropped_oldest);
                if a.session.wants_room(lim) {
                    starve(c, id, before, self.cfg, self.starved);
                }
                // `mqtt.force_shutdown_policy`: too much waits for this client; the engine
                // closes the connection once the delivery is done (`shut_overloaded`).
                if let Some((max_msgs, max_bytes)) = self.cfg.force_shutdown {
                    if a.session.queue().len() > max_msgs
                        || a.session.queue_bytes() + before > max_bytes
                    {
                        self.overloaded.push(id);
                    }
                }
            }
            // The connection's own outbox was full, or the shard's outboxes together.
            Delivery::DroppedSlowConsumer if before >= self.cfg.max_write_buffer => {
                self.metrics.dropped_slow_consumer += 1;
            }
            Delivery::DroppedSlowConsumer => self.metrics.dropped_shard_write_buffer_full += 1,
            Delivery::DroppedQos0Offline => self.metrics.dropped_qos0_offline += 1,
        }
        false
    }
}

/// Offers a delivery to session `a` with `out` as its outbox (filled up to the limits, with
/// `total` bytes in all the shard's outboxes); returns what happened and the outbox's length
/// before and after.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn deliver_into<W: SinkWrite>(
    cfg: &EngineConfig,
    total: usize,
    now: Timestamp,
    a: &mut ActiveSession,
    out: &mut W,
    msg: &SharedMessage,
    qos: QoS,
    retain: bool,
) -> (Delivery, usize, usize) {
    let before = out.len();
    let limit = outbox_limit(cfg, total, before);
    let delivery = a.session.deliver(
        msg,
        qos,
        retain,
        now,
        &cfg.limits,
        Some(Outbox::new(&mut *out, limit)),
    );
    (delivery, before, out.len())
}
