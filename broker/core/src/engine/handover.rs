//! The handover of a session moving between shards, and its two state machines: the old
//! holder's forwarding slot ([`ForwardSlot`]) and the new holder's arrival ([`Arrival`]).

use super::*;

/// The new holder's side of a move: the tail of it, kept off the common session path (boxed,
/// `None` once the session is all here).
///
/// Until the old holder is done forwarding, a message can reach the session two ways: through
/// the old holder (forwarded) or straight from the shard it was published on (direct), and the
/// direct copy of a later message may come first. So forwarded messages are delivered at once
/// and direct ones are held until the old holder's `ForwardDone`, then delivered unless they
/// were forwarded too. What each shard publishes reaches the old holder in order, and the old
/// holder forwards until it has heard from every shard after they all routed to this one: the
/// forwarded messages of one origin shard are a prefix of what it published (of what matches),
/// so a direct message was forwarded as well exactly when its sequence number is at most the
/// highest forwarded one of its origin. A direct copy can still be on its way after
/// `ForwardDone`; the arrival ends once every shard has answered a barrier sent then.
pub(super) struct Arrival {
    /// The shard still forwarding deliveries for this session.
    pub(super) upstream: usize,
    /// The registration epoch of the move, carried by every forward.
    pub(super) epoch: u64,
    pub(super) state: ArrivalState,
    /// Per origin shard, the highest sequence number of a message forwarded so far.
    forwarded: Vec<u64>,
    /// Direct deliveries (message, QoS, retain), held until the forwarding is done; at most
    /// `mqtt.max_mqueue_len`, the oldest dropped beyond. Empty once `Settling`.
    held: VecDeque<(SharedMessage, QoS, bool)>,
}

/// Where an arrival stands. Forwards are delivered in the first two states; what comes
/// directly is held in them and filtered in the third.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ArrivalState {
    /// This shard's routes for the session are on their way to every shard; the upstream
    /// forwards what still reaches it.
    Routing,
    /// Every shard routes here; the upstream was told to stop (`ReleaseForward`) and drains.
    Released,
    /// The upstream sent `ForwardDone`; the held messages were delivered. Direct copies of
    /// forwarded messages still on their way are dropped until a barrier sent then is
    /// answered, and the arrival ends.
    Settling,
}

/// What to do with a direct (not forwarded) delivery to an arriving session.
pub(super) enum Direct {
    /// Deliver it now.
    Deliver,
    /// It was forwarded already: drop it.
    Duplicate,
    /// Held until the forwarding is done; `true` when the oldest held one was dropped.
    Held(bool),
}

impl Arrival {
    /// A session arriving at `epoch` from `upstream`, in a cluster of `shards`.
    pub(super) fn new(upstream: usize, epoch: u64, shards: usize) -> Self {
        Arrival {
            upstream,
            epoch,
            state: ArrivalState::Routing,
            forwarded: vec![0; shards],
            held: VecDeque::new(),
        }
    }

    /// Whether forwards from `from` for `epoch` belong to this arrival.
    pub(super) fn accepts_forwards(&self, from: usize, epoch: u64) -> bool {
        self.epoch == epoch && self.upstream == from && self.state != ArrivalState::Settling
    }

    /// Records a forwarded (live, not retained) message.
    pub(super) fn forwarded(&mut self, msg: &Message) {
        let (origin, seq) = message_origin(msg.id);
        if let Some(top) = self.forwarded.get_mut(origin) {
            *top = (*top).max(seq);
        }
    }

    /// Decides about a direct delivery, holding it (at most `max_held`) while the upstream
    /// forwards.
    pub(super) fn direct(
        &mut self,
        msg: &SharedMessage,
        qos: QoS,
        retain: bool,
        max_held: usize,
    ) -> Direct {
        if self.state == ArrivalState::Settling {
            let (origin, seq) = message_origin(msg.id);
            let forwarded = self.forwarded.get(origin).is_some_and(|&top| seq <= top);
            return if !retain && forwarded {
                Direct::Duplicate
            } else {
                Direct::Deliver
            };
        }
        self.held.push_back((msg.clone(), qos, retain));
        let dropped = self.held.len() > max_held;
        if dropped {
            self.held.pop_front();
        }
        Direct::Held(dropped)
    }

    /// `Routing` → `Released`: whether the upstream must be told now.
    pub(super) fn release(&mut self) -> bool {
        let first = self.state == ArrivalState::Routing;
        if first {
            self.state = ArrivalState::Released;
        }
        first
    }

    /// `Released` → `Settling` on `ForwardDone`: the held messages, to deliver in order.
    pub(super) fn forward_done(&mut self) -> VecDeque<(SharedMessage, QoS, bool)> {
        if self.state != ArrivalState::Released {
            return VecDeque::new();
        }
        self.state = ArrivalState::Settling;
        std::mem::take(&mut self.held)
    }

    /// The held messages, when the arrival is abandoned.
    pub(super) fn into_held(self) -> VecDeque<(SharedMessage, QoS, bool)> {
        self.held
    }
}

/// What stays behind when a session moves to another shard: its index entries, forwarding
/// what still matches, until the new holder releases it and a barrier proves nothing is left.
pub(super) struct ForwardSlot {
    pub(super) gen: u32,
    pub(super) client_id: ByteStr,
    /// The registration epoch of the move.
    pub(super) epoch: u64,
    /// The new holder.
    pub(super) to: usize,
    pub(super) state: ForwardState,
    /// Forwards waiting for room in the queue to `to` (bounded like a session's queue).
    pub(super) backlog: VecDeque<ShardMsg>,
}

/// Where a forwarding slot stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ForwardState {
    /// Forwarding what matches its filters, until the new holder releases it.
    Forwarding { filters: Vec<String> },
    /// Released; still forwarding until every shard has answered a barrier sent after the
    /// release, which proves that what they published before routing to the new holder has
    /// arrived here.
    Draining { filters: Vec<String> },
    /// The barrier is answered and the filters left the index; forwarded messages still wait
    /// for room in the queue to the new holder, then `ForwardDone` follows them.
    Flushing,
}

impl ForwardSlot {
    /// `Forwarding` → `Draining` on `ReleaseForward`: whether this was the first release.
    fn release(&mut self) -> bool {
        match std::mem::replace(&mut self.state, ForwardState::Flushing) {
            ForwardState::Forwarding { filters } => {
                self.state = ForwardState::Draining { filters };
                true
            }
            other => {
                self.state = other;
                false
            }
        }
    }

    /// `Draining` → `Flushing` when the barrier is answered: the filters to take out of the
    /// index (`None` in any other state).
    fn drained(&mut self) -> Option<Vec<String>> {
        match std::mem::replace(&mut self.state, ForwardState::Flushing) {
            ForwardState::Draining { filters } => Some(filters),
            other => {
                self.state = other;
                None
            }
        }
    }

    /// Whether the slot is done: flushing with nothing left to send.
    fn finished(&self) -> bool {
        self.state == ForwardState::Flushing && self.backlog.is_empty()
    }
}

impl Engine {
    /// At the holder: close the old connection and give the session to `ticket`.
    pub(super) fn on_takeover(
        &mut self,
        client_id: ByteStr,
        ticket: Ticket,
        epoch: u64,
        clean: bool,
    ) {
        let Some(key) = self.local_session(&client_id) else {
            return self.reply_fresh(client_id, ticket, epoch);
        };
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return self.reply_fresh(client_id, ticket, epoch);
        };
        if let Some(old) = a.conn.take() {
            self.metrics.takeovers += 1;
            self.client_event(old, Some(EndReason::Takeover));
            if let Some(c) = conn_mut(&mut self.conns, old) {
                debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), "taken over by a new connection");
                c.start_close(self.now);
                let will = c.take_will();
                self.arm_conn(old);
                if let Some(w) = will {
                    self.publish_will(w);
                }
            }
        }
        if ticket.shard() == self.cfg.shard {
            return self.finish_connect(client_id, ticket, epoch, Handed::Local(key));
        }
        let persistent = matches!(self.sessions.get(key), Some(SessionSlot::Active(a)) if !a.session.clean_session);
        if clean || !persistent {
            self.discard_session(key, false);
            return self.reply_fresh(client_id, ticket, epoch);
        }
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        if let Some(arrival) = a.arrival.take() {
            // Not reached: the owner lets no CONNECT for this id through before the arrival is
            // done. Should it happen, the held deliveries go with the session.
            let before = a.session.offline_bytes();
            for (m, q, r) in arrival.into_held() {
                a.session
                    .deliver::<Sink>(&m, q, r, self.now, &self.cfg.limits, None);
            }
            self.offline.moved(before, a.session.offline_bytes());
        }
        // Keep the slot (and its index entries) as a forwarder under the same key.
        let forwarder = SessionSlot::Forwarding(Box::new(ForwardSlot {
            gen: a.gen,
            client_id: client_id.clone(),
            epoch,
            to: ticket.shard(),
            state: ForwardState::Forwarding {
                filters: a.session.subscriptions.keys().cloned().collect(),
            },
            backlog: VecDeque::new(),
        }));
        let SessionSlot::Active(a) = std::mem::replace(&mut self.sessions[key], forwarder) else {
            return;
        };
        self.by_client.remove(client_id.as_bytes(), key as u32);
        self.forwarders.insert((client_id.clone(), epoch), key);
        self.metrics.sessions_moved += 1;
        self.hand_over(client_id, ticket, epoch, Some(Box::new(a.session)));
    }

    /// Tells the connecting shard that nobody keeps a session for it.
    pub(super) fn reply_fresh(&mut self, client_id: ByteStr, ticket: Ticket, epoch: u64) {
        self.hand_over(client_id, ticket, epoch, None);
    }

    /// Sends the connecting shard the session (this shard then forwards what still reaches
    /// it), or none.
    fn hand_over(
        &mut self,
        client_id: ByteStr,
        ticket: Ticket,
        epoch: u64,
        session: Option<Box<Session>>,
    ) {
        let msg = Control::Handover {
            client_id,
            ticket,
            epoch,
            session,
        };
        self.send(ticket.shard(), msg);
    }

    /// A forwarding slot passes `forward` on, or keeps it while the queue to the new holder
    /// is full (at most `mqtt.max_mqueue_len`, the oldest dropped beyond).
    pub(super) fn forward(&mut self, key: usize, forward: ShardMsg) {
        let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) else {
            return;
        };
        let to = f.to;
        if f.backlog.is_empty() && self.outgoing[to].queue.len() < self.cfg.max_pending {
            return self.send(to, forward);
        }
        f.backlog.push_back(forward);
        if f.backlog.len() > self.cfg.limits.max_mqueue_len {
            f.backlog.pop_front();
            self.metrics.dropped_queue_full += 1;
        }
        if !self.backlogged.contains(&key) {
            self.backlogged.push(key);
        }
    }

    /// The new holder routes everywhere: keep forwarding until a barrier proves that what
    /// every shard sent here before routing to the new holder has arrived.
    pub(super) fn on_release(&mut self, client_id: ByteStr, epoch: u64) {
        let Some(&key) = self.forwarders.get(&(client_id, epoch)) else {
            return;
        };
        let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) else {
            return;
        };
        if !f.release() {
            return;
        }
        let gen = f.gen;
        let seq = self.barrier();
        self.add_waiter(seq, Waiter::Barrier { key, gen });
    }

    /// The barrier after a release is answered by every shard: nothing more can match the
    /// forwarding slot's filters on its way here. It leaves the index and, once its backlog
    /// is sent, tells the new holder.
    pub(super) fn on_forward_barrier(&mut self, key: usize, gen: u32) {
        let Some(SessionSlot::Forwarding(f)) = self.sessions.get_mut(key) else {
            return;
        };
        if f.gen != gen {
            return;
        }
        let Some(filters) = f.drained() else {
            return;
        };
        for filter in &filters {
            self.remove_local_sub(filter, key);
        }
        self.flush_routes();
        self.try_finish_forwarding(key);
    }

    /// Frees a flushing forwarding slot whose backlog is sent, with `ForwardDone` behind the
    /// last forward.
    pub(super) fn try_finish_forwarding(&mut self, key: usize) {
        let Some(SessionSlot::Forwarding(f)) = self.sessions.get(key) else {
            return;
        };
        if !f.finished() {
            return;
        }
        let SessionSlot::Forwarding(f) = self.sessions.remove(key) else {
            return;
        };
        self.forwarders.remove(&(f.client_id.clone(), f.epoch));
        self.send(
            f.to,
            Control::ForwardDone {
                client_id: f.client_id,
                epoch: f.epoch,
            },
        );
    }

    /// The arriving session of `client_id` whose move has `epoch`, forwarded from `from`.
    pub(super) fn arriving_session(
        &self,
        from: usize,
        client_id: &ByteStr,
        epoch: u64,
    ) -> Option<usize> {
        let key = self.local_session(client_id)?;
        match self.sessions.get(key) {
            Some(SessionSlot::Active(a))
                if a.arrival
                    .as_ref()
                    .is_some_and(|x| x.accepts_forwards(from, epoch)) =>
            {
                Some(key)
            }
            _ => None,
        }
    }

    pub(super) fn on_forward(
        &mut self,
        from: usize,
        client_id: ByteStr,
        epoch: u64,
        msg: SharedMessage,
        qos: QoS,
        retain: bool,
    ) {
        let Some(key) = self.arriving_session(from, &client_id, epoch) else {
            // For a session that is gone (its client came back with a clean session): drop.
            self.metrics.dropped_stale_forwards += 1;
            return;
        };
        if !retain {
            if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) {
                if let Some(arrival) = &mut a.arrival {
                    arrival.forwarded(&msg);
                }
            }
        }
        self.deliver_now(key, &msg, qos, retain);
    }

    /// The upstream forwarded everything: deliver the held direct messages it did not, then
    /// wait for a barrier to drop the direct copies still on their way.
    pub(super) fn on_forward_done(&mut self, from: usize, client_id: ByteStr, epoch: u64) {
        let Some(key) = self.arriving_session(from, &client_id, epoch) else {
            return;
        };
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let gen = a.gen;
        let Some(arrival) = &mut a.arrival else {
            return;
        };
        let held = arrival.forward_done();
        for (msg, qos, retain) in held {
            self.deliver_to_session(key, &msg, qos, retain);
        }
        let seq = self.barrier();
        self.add_waiter(seq, Waiter::Arrived { key, gen });
    }

    /// Every direct copy sent before the forwarding ended has arrived: the session is all here,
    /// and the next CONNECT for its client id may go ahead.
    pub(super) fn on_arrived(&mut self, key: usize, gen: u32) {
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        if a.gen != gen
            || !a
                .arrival
                .as_ref()
                .is_some_and(|x| x.state == ArrivalState::Settling)
        {
            return;
        }
        let Some(arrival) = a.arrival.take() else {
            return;
        };
        let client_id = a.session.client_id.clone();
        let owner = self.owner(client_id.as_bytes());
        self.send(
            owner,
            Control::ConnectDone {
                client_id,
                epoch: arrival.epoch,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(origin: usize, seq: u64) -> SharedMessage {
        Arc::new(Message {
            id: message_id(origin, seq),
            topic: "t".into(),
            payload: Bytes::new(),
            qos: QoS::AtLeastOnce,
            retain: false,
        })
    }

    #[test]
    fn an_arrival_holds_direct_messages_until_forward_done_then_filters_them() {
        let mut a = Arrival::new(1, 7, 3);
        assert!(a.accepts_forwards(1, 7));
        assert!(!a.accepts_forwards(2, 7), "only its upstream");
        assert!(!a.accepts_forwards(1, 6), "only its epoch");
        a.forwarded(&msg(0, 5));
        let q = QoS::AtLeastOnce;
        assert!(matches!(
            a.direct(&msg(0, 6), q, false, 10),
            Direct::Held(false)
        ));
        // ForwardDone before the release is not possible; it changes nothing.
        assert!(a.forward_done().is_empty());
        assert_eq!(a.state, ArrivalState::Routing);
        assert!(a.release());
        assert!(!a.release(), "released once");
        assert!(matches!(
            a.direct(&msg(2, 1), q, false, 10),
            Direct::Held(false)
        ));
        let held = a.forward_done();
        assert_eq!(a.state, ArrivalState::Settling);
        let ids: Vec<_> = held.iter().map(|(m, _, _)| m.id).collect();
        assert_eq!(
            ids,
            [message_id(0, 6), message_id(2, 1)],
            "in arrival order"
        );
        assert!(
            !a.accepts_forwards(1, 7),
            "nothing is forwarded after ForwardDone"
        );
        assert!(matches!(
            a.direct(&msg(0, 5), q, false, 10),
            Direct::Duplicate
        ));
        assert!(matches!(
            a.direct(&msg(0, 6), q, false, 10),
            Direct::Deliver
        ));
        assert!(
            matches!(a.direct(&msg(0, 5), q, true, 10), Direct::Deliver),
            "a retained answer is never a duplicate of a live message"
        );
    }

    #[test]
    fn an_arrival_holds_at_most_the_queue_limit() {
        let mut a = Arrival::new(0, 1, 2);
        let q = QoS::AtMostOnce;
        assert!(matches!(
            a.direct(&msg(1, 1), q, false, 2),
            Direct::Held(false)
        ));
        assert!(matches!(
            a.direct(&msg(1, 2), q, false, 2),
            Direct::Held(false)
        ));
        assert!(matches!(
            a.direct(&msg(1, 3), q, false, 2),
            Direct::Held(true)
        ));
        let ids: Vec<_> = a.into_held().iter().map(|(m, _, _)| m.id).collect();
        assert_eq!(
            ids,
            [message_id(1, 2), message_id(1, 3)],
            "the oldest dropped"
        );
    }

    #[test]
    fn a_forwarding_slot_goes_forwarding_draining_flushing() {
        let mut f = ForwardSlot {
            gen: 1,
            client_id: "c".into(),
            epoch: 3,
            to: 2,
            state: ForwardState::Forwarding {
                filters: vec!["a/#".into()],
            },
            backlog: VecDeque::new(),
        };
        assert_eq!(f.drained(), None, "no barrier before the release");
        assert!(!f.finished());
        assert!(f.release());
        assert!(!f.release(), "released once");
        assert!(!f.finished());
        assert_eq!(f.drained(), Some(vec!["a/#".to_string()]));
        assert_eq!(f.drained(), None, "drained once");
        f.backlog.push_back(ShardMsg::RouteAck { seq: 1 });
        assert!(!f.finished(), "not while forwards wait");
        f.backlog.clear();
        assert!(f.finished());
    }
}
