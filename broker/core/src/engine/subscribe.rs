//! Subscribe and routes: the local subscription index, route deltas to the other shards (a
//! SUBACK waits for all of them), and the retained messages a new subscription receives.

use super::*;

impl Engine {
    pub(super) fn on_subscribe(&mut self, id: ConnId, key: usize, sub: Subscribe) {
        let level = conn_mut(&mut self.conns, id).map_or(ProtocolLevel::V311, |c| c.level);
        if level == ProtocolLevel::V31 {
            if let Some((f, _)) = sub.filters.iter().find(|(f, _)| topic::is_shared(f)) {
                return self.violation(
                    id,
                    &format!("subscription to {f:?} refused; MQTT 3.1 has no SUBACK failure code"),
                );
            }
        }
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut granted = Vec::with_capacity(sub.filters.len());
        for (filter, qos) in sub.filters {
            if topic::is_shared(&filter) {
                codes.push(SubackCode::Failure);
                continue;
            }
            let max_levels = self.cfg.max_topic_levels;
            let deep = max_levels > 0 && topic::levels(&filter) > max_levels;
            let full = self.cfg.max_subscriptions > 0
                && matches!(self.sessions.get(key), Some(SessionSlot::Active(a))
                    if a.session.subscriptions.len() >= self.cfg.max_subscriptions
                        && !a.session.subscriptions.contains_key(&filter));
            if deep || full {
                self.metrics.subscriptions_refused += 1;
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), filter = %filter, deep, full, "subscription refused (mqtt.max_topic_levels or mqtt.max_subscriptions)");
                }
                if level == ProtocolLevel::V31 {
                    return self.violation(
                        id,
                        "subscription refused (too deep, or too many); MQTT 3.1 has no SUBACK failure code",
                    );
                }
                codes.push(SubackCode::Failure);
                continue;
            }
            if self.acl.is_some()
                && !self.acl_allows(id, key, crate::acl::Action::Subscribe, &filter)
            {
                self.metrics.acl_denied_subscribe += 1;
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), filter = %filter, "subscription denied by the access rules");
                }
                if level == ProtocolLevel::V31 || self.cfg.acl_deny_disconnect {
                    return self.end_connection(id, true, EndReason::NotAuthorized);
                }
                codes.push(SubackCode::Failure);
                continue;
            }
            let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
                return;
            };
            a.session.subscriptions.insert(filter.clone(), qos);
            self.add_local_sub(&filter, key, qos);
            codes.push(SubackCode::Granted(qos));
            granted.push((filter, qos));
        }
        let seq = self.flush_routes();
        let suback = Suback {
            packet_id: sub.packet_id,
            codes,
        };
        let Some(gen) = self.sessions.get(key).map(SessionSlot::gen) else {
            return;
        };
        self.add_waiter(
            seq,
            Waiter::Suback {
                conn: id,
                suback,
                key,
                gen,
                granted,
            },
        );
    }

    pub(super) fn on_unsubscribe(&mut self, id: ConnId, key: usize, unsub: Unsubscribe) {
        for filter in &unsub.filters {
            let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
                return;
            };
            if a.session.subscriptions.remove(filter).is_some() {
                self.remove_local_sub(filter, key);
            }
        }
        self.flush_routes();
        self.reply(id, &Packet::Unsuback(unsub.packet_id));
    }

    /// Asks the retained partitions for what matches the newly `granted` filters of session
    /// `key`: this shard's own partition at once, every other shard concerned with one
    /// `RetainedQuery` for all the filters (the owner of an exact filter, every shard for a
    /// wildcard), so a SUBSCRIBE adds at most one message to each queue.
    pub(super) fn query_retained(&mut self, key: usize, granted: Vec<(String, QoS)>) {
        if !self.cfg.retainer_enabled || granted.is_empty() {
            return;
        }
        let Some(gen) = self.sessions.get(key).map(SessionSlot::gen) else {
            return;
        };
        let ticket = Ticket::new(
            self.cfg.shard,
            SlotId {
                idx: key as u32,
                gen,
            },
        );
        let mut remote: Vec<Vec<(ByteStr, QoS)>> = vec![Vec::new(); self.cfg.shards];
        for (filter, qos) in granted {
            let wildcard = topic::is_wildcard(&filter);
            let owner = self.owner(filter.as_bytes());
            if wildcard || owner == self.cfg.shard {
                let msgs = self.lookup_retained(&filter, qos);
                self.deliver_retained(ticket, msgs);
            }
            for (t, list) in remote.iter_mut().enumerate() {
                if t != self.cfg.shard && (wildcard || t == owner) {
                    list.push((ByteStr::from(filter.as_str()), qos));
                }
            }
        }
        for (t, filters) in remote.into_iter().enumerate() {
            if !filters.is_empty() {
                self.send(
                    t,
                    Control::RetainedQuery {
                        session: ticket,
                        filters,
                    },
                );
            }
        }
    }

    /// The retained messages of this partition matching `filter`, each with the QoS it is
    /// delivered at under a subscription granted `qos`.
    pub(super) fn lookup_retained(&self, filter: &str, qos: QoS) -> Vec<(SharedMessage, QoS)> {
        let mut msgs = Vec::new();
        self.retained
            .lookup(filter, self.now, |m| msgs.push((m.clone(), m.qos.min(qos))));
        msgs
    }

    /// Retained messages for new subscriptions of the session in slot `ticket` (passed on if
    /// the session has moved since).
    pub(super) fn deliver_retained(&mut self, ticket: Ticket, msgs: Vec<(SharedMessage, QoS)>) {
        let key = ticket.slot.idx as usize;
        if self
            .sessions
            .get(key)
            .is_none_or(|s| s.gen() != ticket.slot.gen)
        {
            return;
        }
        for (m, qos) in msgs {
            self.deliver_to_session(key, &m, qos, true);
        }
    }

    // ---------------------------------------------------------------- local index and routes

    pub(super) fn add_local_sub(&mut self, filter: &str, key: usize, qos: QoS) {
        let (subs, new_filter) = self.local.entry_or_insert_with(filter, Vec::new);
        match subs.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = qos,
            None => {
                subs.push((key, qos));
                self.subscriptions += 1;
            }
        }
        if new_filter {
            if self.routes.get(filter).is_none() {
                self.local_only_filters += 1;
            }
            push_pending(&mut self.route_adds, &mut self.route_removes, filter);
        }
    }

    pub(super) fn remove_local_sub(&mut self, filter: &str, key: usize) {
        let Some(subs) = self.local.get_mut(filter) else {
            return;
        };
        let before = subs.len();
        subs.retain(|(k, _)| *k != key);
        self.subscriptions -= before - subs.len();
        if subs.is_empty() {
            self.local.remove(filter);
            if self.routes.get(filter).is_none() {
                self.local_only_filters -= 1;
            }
            push_pending(&mut self.route_removes, &mut self.route_adds, filter);
        }
    }

    /// Sends pending route changes to every other shard; returns the sequence number whose
    /// acknowledgement by all proves the changes are applied everywhere.
    pub(super) fn flush_routes(&mut self) -> u64 {
        if self.route_adds.is_empty() && self.route_removes.is_empty() {
            return self.route_seq;
        }
        let add = std::mem::take(&mut self.route_adds);
        let remove = std::mem::take(&mut self.route_removes);
        if self.cfg.shards > 1 {
            self.broadcast_route(add, remove);
        }
        self.route_seq
    }

    pub(super) fn broadcast_route(&mut self, add: Vec<ByteStr>, remove: Vec<ByteStr>) {
        self.route_seq += 1;
        let seq = self.route_seq;
        for peer in 0..self.cfg.shards {
            if peer != self.cfg.shard {
                self.send(
                    peer,
                    Control::Route {
                        seq,
                        add: add.clone(),
                        remove: remove.clone(),
                    },
                );
            }
        }
    }
}
