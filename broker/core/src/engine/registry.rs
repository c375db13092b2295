//! The client-id registry and the sessions held here: CONNECT, the owner shard's registration
//! of each client id (epochs, one connect placed at a time), and attaching, detaching, creating
//! and discarding sessions.

use super::*;
use crate::auth::{AuthOutcome, AuthRequest, AuthStep};
use crate::ban::{Ban, BanKind};

/// The CONNACK code of a refusal.
fn connack_code(outcome: AuthOutcome) -> ConnectReturnCode {
    match outcome {
        AuthOutcome::BadCredentials => ConnectReturnCode::BadUsernameOrPassword,
        AuthOutcome::Allow | AuthOutcome::NotAuthorized => ConnectReturnCode::NotAuthorized,
    }
}

impl Engine {
    pub(super) fn refuse(&mut self, id: ConnId, code: ConnectReturnCode) {
        self.metrics.connects_refused += 1;
        if let Some(c) = conn_mut(&mut self.conns, id) {
            debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), ?code, "refusing CONNECT");
            self.metrics.packets_connack_sent += 1;
            self.outbox_bytes += c.outbox.put(&Packet::Connack(Connack {
                session_present: false,
                code,
            }));
            c.start_close(self.now);
            c.take_will();
            self.arm_conn(id);
        }
    }

    /// The allowance of a keepalive of `secs` seconds (times `keepalive_multiplier`), in
    /// whole milliseconds: at least 1 for a non-zero keepalive, saturating at `u32::MAX`.
    pub(super) fn keepalive_ms(&self, secs: u16) -> u32 {
        if secs == 0 {
            0
        } else {
            (f64::from(secs) * self.cfg.keepalive_multiplier * 1000.0)
                .clamp(1.0, f64::from(u32::MAX)) as u32
        }
    }

    pub(super) fn on_connect(&mut self, id: ConnId, connect: Connect) {
        let Connect {
            level,
            client_id,
            clean_session,
            keep_alive,
            will,
            username,
            password,
        } = connect;
        let limit = match level {
            ProtocolLevel::V31 => self.cfg.v31_max_clientid_len,
            ProtocolLevel::V311 => self.cfg.max_clientid_len,
        };
        let client_id = if client_id.is_empty() {
            if level == ProtocolLevel::V311 && clean_session {
                self.client_seq += 1;
                format!(
                    "shardmq-{:x}-{}-{}",
                    self.started_at.0, self.cfg.shard, self.client_seq
                )
            } else {
                // [MQTT-3.1.3-8]: an empty id needs clean session (and 3.1 has no empty ids).
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    c.level = level;
                }
                return self.refuse(id, ConnectReturnCode::IdentifierRejected);
            }
        } else if client_id.chars().count() > limit {
            if let Some(c) = conn_mut(&mut self.conns, id) {
                c.level = level;
            }
            return self.refuse(id, ConnectReturnCode::IdentifierRejected);
        } else {
            client_id
        };
        let client_id = ByteStr::from(client_id);
        let ka = self.keepalive_ms(keep_alive);
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        c.level = level;
        c.clean = clean_session;
        let from_transport = c.about.as_ref().is_some_and(|a| a.username_from_transport);
        let credentials = username.is_some() || password.is_some();
        if !self.bans.is_empty() {
            // Address and username bans are on every shard; client id bans on the owner.
            let now = self.now;
            let user = if from_transport {
                c.about.as_deref().and_then(|a| a.username.as_deref())
            } else {
                username.as_deref()
            };
            if self.bans.bans_peer(c.peer.ip, now)
                || user.is_some_and(|u| self.bans.bans(BanKind::Username, u, now))
            {
                self.metrics.connects_banned += 1;
                debug!(peer = %c.peer, client_id = %client_id, "CONNECT refused: banned");
                return self.refuse(id, ConnectReturnCode::NotAuthorized);
            }
        }
        if let Some(w) = &will {
            let name: Option<String> = if from_transport {
                c.about
                    .as_deref()
                    .and_then(|a| a.username.as_deref())
                    .map(str::to_string)
            } else {
                username.clone()
            };
            let peer = c.peer.ip;
            if !self.will_allowed(client_id.as_str(), name.as_deref(), peer, &w.topic) {
                self.metrics.acl_denied_publish += 1;
                debug!(%peer, client_id = %client_id, topic = &*w.topic, "will topic denied by the access rules");
                return self.refuse(id, ConnectReturnCode::NotAuthorized);
            }
        }
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        let step = self.cfg.auth.step(c.peer.ip, from_transport, credentials);
        if let AuthStep::Refuse(outcome) = step {
            self.metrics.auth_refused += 1;
            debug!(peer = %c.peer, client_id = %client_id, "anonymous client refused (auth.allow_anonymous)");
            return self.refuse(id, connack_code(outcome));
        }
        let request = (step == AuthStep::Check).then(|| AuthRequest {
            conn: id,
            client_id: client_id.as_str().to_string(),
            username: username.clone(),
            password,
            peer: c.peer.ip,
            listener: c.listener,
        });
        if will.is_some() || (username.is_some() && !from_transport) {
            let about = c.about_mut();
            about.will = will;
            if !from_transport {
                about.username = username.map(String::into_boxed_str);
            }
        }
        c.keepalive_ms = ka;
        c.phase = ConnPhase::Connecting;
        self.arm_conn(id);
        if let Some(request) = request {
            // Registered once the runtime has checked the credentials (`auth_done`).
            self.pending_auth
                .insert(id.token(), (client_id, clean_session));
            self.auth_requests.push(request);
            if let Some(w) = self.auth_waker.take() {
                w.wake();
            }
            return;
        }
        self.register(id, client_id, clean_session);
    }

    /// Asks the owner shard of `client_id` to place the connection `id` (its CONNECT
    /// accepted so far).
    fn register(&mut self, id: ConnId, client_id: ByteStr, clean_session: bool) {
        let ticket = Ticket::new(self.cfg.shard, id);
        let owner = self.owner(client_id.as_bytes());
        self.send(
            owner,
            Control::Register {
                client_id,
                ticket,
                clean: clean_session,
            },
        );
    }

    /// Credentials the runtime should check ([`Engine::auth_done`] answers each), oldest
    /// first.
    pub fn take_auth_requests(&mut self) -> Vec<AuthRequest> {
        std::mem::take(&mut self.auth_requests)
    }

    /// Wakes `waker` when a check is requested (now, if one waits).
    pub fn set_auth_waker(&mut self, waker: &Waker) {
        if self.auth_requests.is_empty() {
            self.auth_waker = Some(waker.clone());
        } else {
            waker.wake_by_ref();
        }
    }

    /// The runtime's answer to an [`AuthRequest`]: the CONNECT proceeds (to the owner shard
    /// of its client id) or is refused with CONNACK 0x04 or 0x05. A connection gone meanwhile
    /// is forgotten.
    pub fn auth_done(&mut self, id: ConnId, outcome: AuthOutcome, now: Timestamp) {
        self.now = now;
        let Some((client_id, clean)) = self.pending_auth.remove(&id.token()) else {
            return;
        };
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if c.close || c.phase != ConnPhase::Connecting {
            return;
        }
        if outcome == AuthOutcome::Allow {
            self.metrics.auth_succeeded += 1;
            self.register(id, client_id, clean);
        } else {
            self.metrics.auth_refused += 1;
            debug!(peer = %c.peer, client_id = %client_id, ?outcome, "credentials refused");
            self.refuse(id, connack_code(outcome));
        }
        self.drain_inbox();
    }

    // ---------------------------------------------------------------- sessions

    /// The key of the active session of `client_id` on this shard.
    pub(super) fn local_session(&self, client_id: &ByteStr) -> Option<usize> {
        self.by_client
            .get(client_id.as_bytes(), |k| {
                slot_holds(&self.sessions, k, client_id)
            })
            .map(|k| k as usize)
    }

    pub(super) fn new_session(&mut self, client_id: ByteStr, clean: bool, epoch: u64) -> usize {
        let session = Session::new(client_id, clean, self.now);
        self.add_active(session, epoch, None).0
    }

    /// Puts `session` in a new active slot indexed by its client id; returns (key, gen).
    pub(super) fn add_active(
        &mut self,
        session: Session,
        epoch: u64,
        arrival: Option<Box<Arrival>>,
    ) -> (usize, u32) {
        let gen = self.next_gen();
        let client_id = session.client_id.clone();
        let key = self.sessions.insert(SessionSlot::Active(ActiveSession {
            gen,
            session,
            conn: None,
            epoch,
            arrival,
            expires_at: Timestamp::NEVER,
            timer_at: Timestamp::NEVER,
        }));
        let sessions = &self.sessions;
        self.by_client
            .insert(client_id.as_bytes(), key as u32, |k| {
                slot_holds(sessions, k, &client_id)
            });
        (key, gen)
    }

    /// Puts a session that moved here in a slot and indexes its subscriptions; with an
    /// `upstream` still forwarding, the session holds direct deliveries until it is done, and
    /// the upstream is released once every shard routes to this one.
    pub(super) fn install_session(
        &mut self,
        session: Session,
        epoch: u64,
        upstream: Option<usize>,
    ) -> usize {
        let subs: Vec<(String, QoS)> = session
            .subscriptions
            .iter()
            .map(|(f, q)| (f.clone(), *q))
            .collect();
        let shards = self.cfg.shards;
        let arrival = upstream.map(|upstream| Box::new(Arrival::new(upstream, epoch, shards)));
        let (key, gen) = self.add_active(session, epoch, arrival);
        for (f, q) in subs {
            self.add_local_sub(&f, key, q);
        }
        let seq = self.flush_routes();
        if upstream.is_some() {
            self.add_waiter(seq, Waiter::Release { key, gen });
        }
        key
    }

    /// Frees a session: its subscriptions leave the index; `unregister` tells the owner.
    pub(super) fn discard_session(&mut self, key: usize, unregister: bool) {
        let Some(SessionSlot::Active(_)) = self.sessions.get(key) else {
            return;
        };
        let SessionSlot::Active(a) = self.sessions.remove(key) else {
            return;
        };
        self.offline.moved(a.session.offline_bytes(), 0);
        let client_id = a.session.client_id.clone();
        self.by_client.remove(client_id.as_bytes(), key as u32);
        for f in a.session.subscriptions.keys() {
            self.remove_local_sub(f, key);
        }
        self.flush_routes();
        let owner = self.owner(client_id.as_bytes());
        if let Some(arrival) = a.arrival {
            // The upstream's forwards now find no session of their epoch and are dropped; the
            // registration it kept busy is free.
            if arrival.state == ArrivalState::Routing {
                self.send(
                    arrival.upstream,
                    Control::ReleaseForward {
                        client_id: client_id.clone(),
                        epoch: arrival.epoch,
                    },
                );
            }
            let epoch = arrival.epoch;
            self.metrics.dropped_queue_full += arrival.into_held().len() as u64;
            self.send(
                owner,
                Control::ConnectDone {
                    client_id: client_id.clone(),
                    epoch,
                },
            );
        }
        if unregister {
            self.send(
                owner,
                Control::Unregister {
                    client_id,
                    epoch: a.epoch,
                },
            );
        }
    }

    /// The session's connection ended.
    pub(super) fn detach(&mut self, key: usize) {
        let now = self.now;
        let expiry = self.cfg.session_expiry;
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        a.conn = None;
        if a.session.clean_session {
            self.discard_session(key, true);
        } else {
            let (before, after) = a.session.set_offline(true);
            self.offline.moved(before, after);
            a.session.shrink();
            a.expires_at = expiry.map_or(Timestamp::NEVER, |d| now.after(d));
            self.arm(key);
        }
    }

    pub(super) fn attach(&mut self, key: usize, id: ConnId, present: bool) {
        let now = self.now;
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        a.conn = Some(id);
        a.expires_at = Timestamp::NEVER;
        let (before, after) = a.session.set_offline(false);
        self.offline.moved(before, after);
        c.phase = ConnPhase::Connected(key as u32);
        let before = c.outbox.len();
        self.metrics.packets_connack_sent += 1;
        c.outbox.put(&Packet::Connack(Connack {
            session_present: present && c.level == ProtocolLevel::V311,
            code: ConnectReturnCode::Accepted,
        }));
        let limit = outbox_limit(&self.cfg, self.outbox_bytes, c.outbox.len());
        let lim = &self.cfg.limits;
        let sent = a
            .session
            .resume(now, lim, Outbox::new(&mut c.outbox, limit));
        let len = c.outbox.len();
        self.outbox_bytes += len - before;
        if a.session.wants_room(lim) {
            starve(c, id, len, &self.cfg, &mut self.starved);
        }
        tracing::info!(client_id = client_of(&self.sessions, c), peer = %c.peer, shard = self.cfg.shard, session_present = present, "client connected");
        c.wake();
        self.metrics.count_messages_out(sent);
        self.metrics.connects_accepted += 1;
        self.client_event(id, None);
        self.arm(key);
        self.arm_conn(id);
    }

    /// Completes a CONNECT at this (the connecting) shard and tells the owner, which lets the
    /// next CONNECT for the client id proceed; for a session still arriving from another shard,
    /// only once the forwarding is done (`ForwardDone`), so a session never moves on before
    /// it has fully arrived.
    pub(super) fn finish_connect(
        &mut self,
        client_id: ByteStr,
        ticket: Ticket,
        epoch: u64,
        handed: Handed,
    ) {
        let owner = self.owner(client_id.as_bytes());
        let id = ticket.slot;
        let live = conn_mut(&mut self.conns, id)
            .filter(|c| c.phase == ConnPhase::Connecting && !c.close)
            .map(|c| c.clean);
        let arriving = matches!(
            &handed,
            Handed::Moved {
                upstream: Some(_),
                ..
            }
        ) && live != Some(true);
        if !arriving {
            self.send(
                owner,
                Control::ConnectDone {
                    client_id: client_id.clone(),
                    epoch,
                },
            );
        }
        let Some(clean) = live else {
            // The client went away while we waited: keep a persistent session offline.
            match handed {
                Handed::Fresh => self.send(owner, Control::Unregister { client_id, epoch }),
                Handed::Local(key) => {
                    if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) {
                        a.epoch = epoch;
                        if a.session.clean_session {
                            self.discard_session(key, true);
                        }
                    }
                }
                Handed::Moved { session, upstream } => {
                    let key = self.install_session(*session, epoch, upstream);
                    self.detach(key);
                }
            }
            return;
        };
        let (key, present) = match handed {
            Handed::Fresh => (self.new_session(client_id, clean, epoch), false),
            Handed::Local(key) => {
                let keep = matches!(self.sessions.get(key), Some(SessionSlot::Active(a)) if !a.session.clean_session);
                if clean || !keep {
                    self.discard_session(key, false);
                    (self.new_session(client_id, clean, epoch), false)
                } else {
                    if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) {
                        a.epoch = epoch;
                    }
                    (key, true)
                }
            }
            Handed::Moved { session, upstream } => {
                if clean {
                    // The client asked for a clean start: the session that moved is dropped.
                    self.offline.moved(session.offline_bytes(), 0);
                    if let Some(up) = upstream {
                        self.send(
                            up,
                            Control::ReleaseForward {
                                client_id: client_id.clone(),
                                epoch,
                            },
                        );
                    }
                    (self.new_session(client_id, clean, epoch), false)
                } else {
                    (self.install_session(*session, epoch, upstream), true)
                }
            }
        };
        self.attach(key, id, present);
    }

    // ---------------------------------------------------------------- registry (owner side)

    /// A CONNECT for a client id this shard owns: refused if the client id is banned, or
    /// banned now for reconnecting too often (`flapping.*`); otherwise placed.
    pub(super) fn on_register(&mut self, client_id: ByteStr, ticket: Ticket, clean: bool) {
        let now = self.now;
        if self.bans.bans(BanKind::ClientId, client_id.as_str(), now) {
            return self.send(ticket.shard(), Control::Banned { ticket });
        }
        if let Some(policy) = self.cfg.flapping {
            if self.flapping.connect(&policy, client_id.as_str(), now) {
                self.metrics.flapping_bans += 1;
                tracing::warn!(client_id = %client_id, max_count = policy.max_count, window = ?policy.window, ban_time = ?policy.ban_time, "client id reconnects too often (flapping.*): banned");
                self.bans.purge(now);
                let _ = self.bans.add(Ban {
                    kind: BanKind::ClientId,
                    who: client_id.as_str().to_string(),
                    reason: format!(
                        "more than {} connects within {}s",
                        policy.max_count,
                        policy.window.as_secs()
                    ),
                    by: "flapping".into(),
                    at: now,
                    until: now.after(policy.ban_time),
                });
                return self.send(ticket.shard(), Control::Banned { ticket });
            }
        }
        self.place(client_id, ticket, clean);
    }

    /// The owner's answer: the client id is banned.
    pub(super) fn on_banned(&mut self, ticket: Ticket) {
        let id = ticket.slot;
        let connecting = self
            .conns
            .get(id.idx as usize)
            .is_some_and(|c| c.gen == id.gen && c.phase == ConnPhase::Connecting && !c.close);
        if connecting {
            self.metrics.connects_banned += 1;
            self.refuse(id, ConnectReturnCode::NotAuthorized);
        }
    }

    /// Places a CONNECT for a client id this shard owns: after the one in progress, if any.
    fn place(&mut self, client_id: ByteStr, ticket: Ticket, clean: bool) {
        let reg = self
            .registry
            .entry(client_id.clone())
            .or_insert(Registration {
                epoch: 0,
                holder: NO_HOLDER,
                busy: false,
            });
        if reg.busy {
            self.reg_waiting
                .entry(client_id)
                .or_default()
                .push_back((ticket, clean));
            return;
        }
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        reg.busy = true;
        reg.epoch = epoch;
        let previous = std::mem::replace(&mut reg.holder, ticket.shard() as u32);
        match (previous != NO_HOLDER).then_some(previous as usize) {
            None => self.reply_fresh(client_id, ticket, epoch),
            Some(holder) => self.send(
                holder,
                Control::Takeover {
                    client_id,
                    ticket,
                    epoch,
                    clean,
                },
            ),
        }
    }

    pub(super) fn on_connect_done(&mut self, client_id: ByteStr, epoch: u64) {
        let Some(reg) = self.registry.get_mut(&client_id) else {
            return;
        };
        if reg.epoch != epoch {
            return;
        }
        reg.busy = false;
        loop {
            let Some(queue) = self.reg_waiting.get_mut(&client_id) else {
                return;
            };
            let next = queue.pop_front();
            if queue.is_empty() {
                self.reg_waiting.remove(&client_id);
            }
            let Some((ticket, clean)) = next else {
                return;
            };
            // Counted for flapping when it arrived; a ban made meanwhile applies.
            if self
                .bans
                .bans(BanKind::ClientId, client_id.as_str(), self.now)
            {
                self.send(ticket.shard(), Control::Banned { ticket });
                continue;
            }
            return self.place(client_id, ticket, clean);
        }
    }

    pub(super) fn on_unregister(&mut self, client_id: ByteStr, epoch: u64) {
        if let Some(reg) = self.registry.get(&client_id) {
            if reg.epoch == epoch && !reg.busy && !self.reg_waiting.contains_key(&client_id) {
                self.registry.remove(&client_id);
            }
        }
    }
}
