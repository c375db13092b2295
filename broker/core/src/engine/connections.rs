//! Connections: opening, the packets and bytes a driver feeds in, back-pressure on outboxes
//! (limits, starved connections and their refill), parking, timeouts and every way a
//! connection ends.

use super::*;

impl Engine {
    // ---------------------------------------------------------------- connection inputs

    /// An MQTT connection from `peer` was accepted on `listener` (a number the runtime gives
    /// each of its listeners, counted by [`Engine::listener_connections`]). Its packets are
    /// encoded into an outbox the driver writes ([`Engine::conn_outbox`]).
    pub fn open_conn(&mut self, peer: SocketAddr, listener: u16, now: Timestamp) -> ConnId {
        self.open_conn_with(peer, listener, Sink::mqtt(), now)
    }

    /// A connection with the given sink: [`Sink::packets`] for a gateway client (keyed by
    /// whatever the gateway likes, a UDP peer's address for instance), which feeds the engine
    /// decoded packets ([`Engine::handle_packet`]) and takes typed ones back
    /// ([`Engine::take_packets`]). It is a connection like any other: session, routing,
    /// retained, will, takeover, keepalive and limits apply alike.
    pub fn open_conn_with(
        &mut self,
        peer: SocketAddr,
        listener: u16,
        sink: Sink,
        now: Timestamp,
    ) -> ConnId {
        self.now = now;
        let gen = self.next_gen();
        let l = usize::from(listener);
        if self.listener_conns.len() <= l {
            self.listener_conns.resize(l + 1, 0);
        }
        self.listener_conns[l] += 1;
        let idx = self.conns.insert(Conn {
            gen,
            outbox: sink,
            waker: None,
            close: false,
            abort: false,
            paused: false,
            starved: false,
            throttled: false,
            more_stalled: false,
            phase: ConnPhase::AwaitingConnect,
            level: ProtocolLevel::V311,
            listener,
            keepalive_ms: 0,
            last_rx: now,
            peer: Peer {
                ip: peer.ip(),
                port: peer.port(),
            },
            clean: true,
            timer_at: Timestamp::NEVER,
            last_io: now,
            park: false,
            parked: false,
            held: None,
            about: None,
        });
        self.metrics.connections_accepted += 1;
        let id = ConnId {
            idx: idx as u32,
            gen,
        };
        self.arm_conn(id);
        id
    }

    /// Arms the connection's timer for its current deadline if that is earlier than the one
    /// armed. A later deadline (traffic pushed it back) is found when the armed timer fires.
    pub(super) fn arm_conn(&mut self, id: ConnId) {
        let Some(deadline) = self.conn_status(id).and_then(|s| s.deadline) else {
            return;
        };
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if deadline < c.timer_at {
            c.timer_at = deadline;
            self.conn_timers.push(Reverse((deadline, id.idx, id.gen)));
            self.note_timer(deadline);
        }
    }

    /// How to decode this connection's input.
    pub fn decode_options(&self, id: ConnId) -> DecodeOptions {
        let (level, expect_connect) = self
            .conns
            .get(id.idx as usize)
            .map_or((ProtocolLevel::V311, false), |c| {
                (c.level, c.phase == ConnPhase::AwaitingConnect)
            });
        DecodeOptions {
            max_packet_size: self.cfg.max_packet_size,
            level,
            expect_connect,
        }
    }

    /// The bytes waiting to be written to this MQTT connection (`None` if it is gone or has
    /// a gateway's sink).
    pub fn conn_outbox(&mut self, id: ConnId) -> Option<&mut BytesMut> {
        conn_mut(&mut self.conns, id).and_then(|c| c.outbox.bytes_mut())
    }

    /// A gateway client's packets: takes what waits in its sink, as a driver writes an
    /// outbox; the room this makes lets deliveries held back for it in, and they are taken
    /// too. `None` if the connection is gone or is not a gateway's.
    pub fn take_packets(&mut self, id: ConnId, now: Timestamp) -> Option<VecDeque<Packet>> {
        let mut all: Option<VecDeque<Packet>> = None;
        loop {
            let (packets, counted) = conn_mut(&mut self.conns, id)?.outbox.take_packets()?;
            match &mut all {
                Some(all) => all.extend(packets),
                None => all = Some(packets),
            }
            if !self.conn_flushed(id, counted, now) {
                return all;
            }
        }
    }

    /// Registers the waker of the connection's driver task, woken when the outbox gains bytes,
    /// the connection must close, or reading may resume.
    pub fn set_conn_waker(&mut self, id: ConnId, waker: &Waker) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            match &c.waker {
                Some(w) if w.will_wake(waker) => {}
                _ => c.waker = Some(waker.clone()),
            }
        }
    }

    /// What the driver should do next; `None` once the connection is gone.
    pub fn conn_status(&self, id: ConnId) -> Option<ConnStatus> {
        let c = self
            .conns
            .get(id.idx as usize)
            .filter(|c| c.gen == id.gen)?;
        let deadline = match (self.timeout_deadline(c), self.park_deadline(c)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Some(ConnStatus {
            close: c.close,
            readable: c.readable(self.cfg.max_write_buffer),
            deadline,
            park: c.park && !c.close,
            reset: c.abort,
        })
    }

    /// Whether to read more input now (the `readable` of [`Engine::conn_status`], cheaper).
    pub fn conn_readable(&self, id: ConnId) -> bool {
        self.conns
            .get(id.idx as usize)
            .is_some_and(|c| c.gen == id.gen && c.readable(self.cfg.max_write_buffer))
    }

    /// When the connection times out: no CONNECT in time, no CONNACK in time, keepalive, or a
    /// close that takes too long. Not while the broker holds a packet of it back: the wait is
    /// the broker's, not the client's.
    pub(super) fn timeout_deadline(&self, c: &Conn) -> Option<Timestamp> {
        if c.close {
            return (!c.abort).then(|| c.last_rx.after(self.cfg.close_timeout));
        }
        if c.paused {
            return None;
        }
        if c.throttled {
            // Its input waits for us, not for the client: no keepalive until it is read.
            return c.about.as_ref().map(|a| a.resume_at);
        }
        let keepalive = (c.keepalive_ms > 0).then(|| {
            c.last_rx
                .after(Duration::from_millis(u64::from(c.keepalive_ms)))
        });
        match c.phase {
            ConnPhase::AwaitingConnect => Some(c.last_rx.after(self.idle_timeout(c))),
            // The owner shard answers a CONNECT within `idle_timeout` or the client is let go.
            ConnPhase::Connecting => {
                let limit = c.last_rx.after(self.idle_timeout(c));
                Some(keepalive.map_or(limit, |k| k.min(limit)))
            }
            ConnPhase::Connected(_) => keepalive,
            ConnPhase::Closed => None,
        }
    }

    /// `mqtt.idle_timeout`, or the gateway listener's own.
    fn idle_timeout(&self, c: &Conn) -> Duration {
        self.listener_protocol(c.listener)
            .map_or(self.cfg.idle_timeout, |p| p.idle_timeout)
    }

    /// What listener `listener` speaks, if it is a gateway's.
    pub(super) fn listener_protocol(&self, listener: u16) -> Option<&ListenerProtocol> {
        self.listener_protocols
            .get(usize::from(listener))
            .and_then(Option::as_ref)
    }

    /// The protocol name and version of a connection, as the admin API and events show them.
    pub(super) fn proto_of(&self, c: &Conn) -> (&'static str, u8) {
        match (self.listener_protocol(c.listener), c.level) {
            (Some(p), _) => (p.name, p.version),
            (None, ProtocolLevel::V31) => ("MQIsdp", 3),
            (None, ProtocolLevel::V311) => ("MQTT", 4),
        }
    }

    /// Declares listener `listener` a gateway's: its clients show with the gateway's protocol
    /// name and version, and identify themselves within its idle timeout.
    pub fn set_listener_protocol(&mut self, listener: u16, protocol: ListenerProtocol) {
        let l = usize::from(listener);
        if self.listener_protocols.len() <= l {
            self.listener_protocols.resize(l + 1, None);
        }
        self.listener_protocols[l] = Some(protocol);
    }

    /// A gateway closes one of its connections (its state machine found bad input, or the
    /// device fell too far behind): counted by `reason` (`ProtocolError`, `MalformedPacket`,
    /// `ForceShutdown`), the will published, the session detached as for a lost connection.
    pub fn close_conn(&mut self, id: ConnId, reason: EndReason, now: Timestamp) {
        self.now = now;
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if c.close {
            return;
        }
        match reason {
            EndReason::ProtocolError => self.metrics.protocol_errors += 1,
            EndReason::MalformedPacket => self.metrics.malformed_packets += 1,
            EndReason::ForceShutdown => self.metrics.force_shutdowns += 1,
            _ => {}
        }
        self.end_connection(id, reason != EndReason::Normal, reason);
        self.drain_inbox();
    }

    /// Closes every connection that came through `listener` (its gateway is unloaded): their
    /// sessions end as after a lost connection, wills published. Returns how many.
    pub fn close_listener_conns(&mut self, listener: u16, now: Timestamp) -> usize {
        self.now = now;
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.listener == listener && !c.close)
            .map(|(idx, c)| ConnId {
                idx: idx as u32,
                gen: c.gen,
            })
            .collect();
        for &id in &ids {
            self.end_connection(id, true, EndReason::Closed);
        }
        self.drain_inbox();
        ids.len()
    }

    /// When an idle, connected client should be parked.
    pub(super) fn park_deadline(&self, c: &Conn) -> Option<Timestamp> {
        let idle = matches!(c.phase, ConnPhase::Connected(_))
            && !c.close
            && !c.paused
            && !c.throttled
            && !c.park
            && !c.parked;
        self.cfg
            .park_after
            .filter(|_| idle)
            .map(|d| c.last_io.after(d))
    }

    /// The transport has authenticated the client as `username` (the CN of a verified TLS
    /// client certificate with `peer_cert_as_username`): that name is the connection's
    /// username, whatever its CONNECT says. Call before feeding the engine its input.
    pub fn set_conn_username(&mut self, id: ConnId, username: &str) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            let about = c.about_mut();
            about.username = Some(username.into());
            about.username_from_transport = true;
        }
    }

    /// The connection's username: the one its transport vouched for, else its CONNECT's.
    pub fn conn_username(&self, id: ConnId) -> Option<&str> {
        self.conns
            .get(id.idx as usize)
            .filter(|c| c.gen == id.gen)
            .and_then(|c| c.about.as_deref())
            .and_then(|a| a.username.as_deref())
    }

    /// The client id of a connected connection (`None` before its CONNECT is accepted).
    pub fn conn_client_id(&self, id: ConnId) -> Option<&str> {
        self.conns
            .get(id.idx as usize)
            .filter(|c| c.gen == id.gen)
            .map(|c| client_of(&self.sessions, c))
            .filter(|s| !s.is_empty())
    }

    /// A gateway heard from its client without a packet for the engine (an MQTT-SN REGACK,
    /// say): its keepalive starts over, as on any packet.
    pub fn conn_heard(&mut self, id: ConnId, now: Timestamp) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            if !c.close {
                c.last_rx = now;
            }
        }
    }

    /// A gateway gives a connected client a new keepalive of `secs` seconds from `now` (an
    /// MQTT-SN client going to sleep for that long, or waking): past it, times
    /// `keepalive_multiplier`, the connection ends as on any keepalive timeout (will
    /// published). 0 turns the keepalive off.
    pub fn set_conn_keepalive(&mut self, id: ConnId, secs: u16, now: Timestamp) {
        self.now = now;
        let ka = self.keepalive_ms(secs);
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if c.close {
            return;
        }
        c.keepalive_ms = ka;
        c.last_rx = now;
        self.arm_conn(id);
    }

    /// A gateway's client changes its will (MQTT-SN WILLTOPICUPD and WILLMSGUPD); `None`
    /// removes it. `false` (the will unchanged) when the access rules deny the client to
    /// publish on the new topic.
    pub fn set_conn_will(&mut self, id: ConnId, will: Option<LastWill>) -> bool {
        let Some(c) = self
            .conns
            .get(id.idx as usize)
            .filter(|c| c.gen == id.gen && !c.close)
        else {
            return false;
        };
        if let Some(w) = &will {
            let client_id = client_of(&self.sessions, c);
            let user = c.about.as_deref().and_then(|a| a.username.as_deref());
            if !self.will_allowed(client_id, user, c.peer.ip, &w.topic) {
                self.metrics.acl_denied_publish += 1;
                debug!(peer = %c.peer, client_id, topic = &*w.topic, "will topic denied by the access rules");
                return false;
            }
        }
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return false;
        };
        match will {
            Some(w) => c.about_mut().will = Some(w),
            None => {
                c.take_will();
            }
        }
        true
    }

    /// Bytes moved on the connection: it is not idle.
    pub fn note_io(&mut self, id: ConnId, now: Timestamp) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            c.last_io = now;
            // The park deadline only moves later, so an armed timer already covers it, unless
            // none is armed or the armed one is the later keepalive (after a park request).
            let rearm = self.cfg.park_after.is_some() && (c.park || c.timer_at == Timestamp::NEVER);
            c.park = false;
            if rearm {
                self.arm_conn(id);
            }
        }
    }

    /// The driver parked the socket; `waker` promotes it (a delivery, a close or shutdown
    /// wakes it, as it would wake a driver).
    pub fn conn_parked(&mut self, id: ConnId, waker: Waker) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            c.parked = true;
            c.park = false;
            c.waker = Some(waker);
            self.parked_count += 1;
            self.metrics.connections_parked += 1;
            if let ConnPhase::Connected(key) = c.phase {
                if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key as usize) {
                    a.session.shrink();
                }
            }
        }
    }

    /// A parked socket has a driver again.
    pub fn conn_promoted(&mut self, id: ConnId, now: Timestamp) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            if c.parked {
                c.parked = false;
                self.parked_count -= 1;
            }
            c.last_io = now;
            c.waker = None;
        }
        self.arm_conn(id);
    }

    /// Connections parked now.
    pub fn parked_count(&self) -> usize {
        self.parked_count
    }

    /// Counts bytes the driver read.
    pub fn count_received(&mut self, received: usize) {
        self.metrics.bytes_received += received as u64;
    }

    /// The driver wrote (and removed) the first `sent` bytes of the connection's outbox.
    /// Deliveries that waited for room follow, on this connection and, once the shard's
    /// outboxes are below three quarters of `shards.max_write_buffer`, on the others. Returns
    /// whether this connection's outbox got new bytes meanwhile (the driver writes them).
    pub fn conn_flushed(&mut self, id: ConnId, sent: usize, now: Timestamp) -> bool {
        if sent == 0 {
            return false;
        }
        self.now = now;
        self.metrics.bytes_sent += sent as u64;
        self.release_outbox_bytes(sent);
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return false;
        };
        // Bytes moved: not idle (`note_io`, done here without a second look-up).
        c.last_io = now;
        let rearm = self.cfg.park_after.is_some() && (c.park || c.timer_at == Timestamp::NEVER);
        c.park = false;
        let starved = c.starved;
        if rearm {
            self.arm_conn(id);
        }
        let mut refilled = starved && self.refill(id);
        if !self.starved.is_empty() && self.outbox_bytes < self.cfg.shard_write_buffer / 4 * 3 {
            self.refill_starved();
            refilled = conn_mut(&mut self.conns, id).is_some_and(|c| !c.outbox.is_empty());
        }
        refilled
    }

    pub(super) fn release_outbox_bytes(&mut self, n: usize) {
        debug_assert!(self.outbox_bytes >= n, "outbox accounting");
        self.outbox_bytes = self.outbox_bytes.saturating_sub(n);
    }

    /// Writes what the session of connection `id` holds back for room (resends, queued
    /// deliveries), as far as the outboxes have room now. Returns whether it wrote anything.
    pub(super) fn refill(&mut self, id: ConnId) -> bool {
        let now = self.now;
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return false;
        };
        c.starved = false;
        let ConnPhase::Connected(key) = c.phase else {
            return false;
        };
        if c.close {
            return false;
        }
        let key = key as usize;
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return false;
        };
        let before = c.outbox.len();
        let limit = outbox_limit(&self.cfg, self.outbox_bytes, before);
        let sent = a
            .session
            .refill(now, &self.cfg.limits, Outbox::new(&mut c.outbox, limit));
        let wrote = c.outbox.len() - before;
        self.outbox_bytes += wrote;
        if wrote > 0 {
            c.wake();
        }
        if a.session.wants_room(&self.cfg.limits) {
            starve(c, id, before + wrote, &self.cfg, &mut self.starved);
        }
        self.metrics.count_messages_out(sent);
        if !sent.is_empty() {
            self.arm_new(key, self.retry_due(now));
        }
        wrote > 0
    }

    /// Refills the connections that waited for the shard's outboxes to shrink, oldest first,
    /// while there is room.
    pub(super) fn refill_starved(&mut self) {
        let waiting = std::mem::take(&mut self.starved);
        let mut rest = waiting.into_iter();
        for id in rest.by_ref() {
            if self.outbox_bytes >= self.cfg.shard_write_buffer {
                break;
            }
            if let Some(c) = conn_mut(&mut self.conns, id) {
                // Still starved and its own outbox has room: the shard's limit held it back.
                if c.starved && c.outbox.len() < self.cfg.max_write_buffer {
                    self.refill(id);
                }
            }
        }
        // Those not reached keep their turn, ahead of any starved meanwhile.
        let mut kept: Vec<ConnId> = rest.collect();
        kept.append(&mut self.starved);
        self.starved = kept;
    }

    /// Bytes read from the connection: decodes and handles the complete packets at the front
    /// of `data` while the connection stays readable (a packet may change that: a CONNECT
    /// waits for its owner shard, a flood fills the outbox). Bad input closes the connection
    /// and uses all of `data`. What is left (an incomplete packet, or input not read yet) is
    /// for the caller to offer again, with more bytes after it.
    pub fn handle_input(&mut self, id: ConnId, data: &[u8], now: Timestamp) -> Input {
        let mut input = Input {
            used: 0,
            progressed: false,
        };
        while self.conn_readable(id) {
            let opts = self.decode_options(id);
            match mqtt::decode_slice(&data[input.used..], &opts) {
                Ok(Some((packet, n))) => {
                    input.used += n;
                    input.progressed = true;
                    let message = matches!(packet, Packet::Publish(_));
                    self.handle_packet(id, packet, now);
                    self.charge_input(id, message, n, now);
                }
                Ok(None) => break,
                Err(err) => {
                    self.handle_decode_error(id, &err, now);
                    input.used = data.len();
                    input.progressed = true;
                    break;
                }
            }
        }
        input
    }

    /// Charges a packet of `bytes` bytes read from connection `id` (a message when `message`)
    /// to its `mqtt.rate_limit`: a connection more than a second ahead of its rate is not
    /// read until it is back within it (TCP then pushes back on its client). Drivers that
    /// decode their own input (gateways) call it for each packet. Without a limit it costs one
    /// comparison.
    #[inline]
    pub fn charge_input(&mut self, id: ConnId, message: bool, bytes: usize, now: Timestamp) {
        if self.cfg.rate_limit.enabled() {
            self.charge_limited(id, message, bytes, now);
        }
    }

    fn charge_limited(&mut self, id: ConnId, message: bool, bytes: usize, now: Timestamp) {
        let lim = self.cfg.rate_limit;
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if c.close {
            return;
        }
        let about = c.about_mut();
        let Some(resume) = about.rate.charge(&lim, now, message, bytes) else {
            return;
        };
        about.resume_at = resume;
        c.throttled = true;
        self.metrics.connections_throttled += 1;
        debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), resume_in_ms = resume.0.saturating_sub(now.0), "inbound rate limit (mqtt.rate_limit), reading paused");
        self.arm_conn(id);
    }

    /// A decoded packet from the connection.
    pub fn handle_packet(&mut self, id: ConnId, packet: Packet, now: Timestamp) {
        self.now = now;
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if c.close {
            return;
        }
        c.last_rx = now;
        self.metrics.count_received(&packet);
        if c.paused {
            // The driver reads no more while a packet is held back; should it, this one
            // waits behind it, so the connection's packets keep their order.
            c.more_stalled = true;
            self.stalled.push_back((id, packet));
            return;
        }
        self.dispatch_packet(id, packet);
        self.drain_inbox();
    }

    /// Handles a packet of connection `id` (just received, or held back until now).
    #[inline]
    pub(super) fn dispatch_packet(&mut self, id: ConnId, packet: Packet) {
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        match (c.phase, packet) {
            (ConnPhase::AwaitingConnect, Packet::Connect(connect)) => {
                if self.congested(1) {
                    return self.stall(id, Packet::Connect(connect));
                }
                self.on_connect(id, *connect)
            }
            (ConnPhase::AwaitingConnect, p) => self.violation(
                id,
                &format!("[MQTT-3.1.0-1] first packet is {}, not CONNECT", p.name()),
            ),
            (ConnPhase::Connected(_), Packet::Connect(_)) => {
                self.violation(id, "[MQTT-3.1.0-2] second CONNECT on a connection")
            }
            (ConnPhase::Connected(key), p) => self.on_session_packet(id, key as usize, p),
            (ConnPhase::Connecting, p) => {
                // The driver stops reading while connecting; a packet here is a driver bug,
                // never something to trust.
                self.violation(id, &format!("{} before CONNACK", p.name()))
            }
            (ConnPhase::Closed, _) => {}
        }
    }

    /// Input that did not decode. Closes the connection (CONNACK 0x01 first for an
    /// unsupported protocol level).
    pub fn handle_decode_error(&mut self, id: ConnId, err: &DecodeError, now: Timestamp) {
        self.now = now;
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if c.close {
            return;
        }
        if let (ConnPhase::AwaitingConnect, DecodeError::UnsupportedProtocolLevel { .. }) =
            (c.phase, err)
        {
            self.metrics.connects_refused += 1;
            debug!(peer = %c.peer, error = %err, "refusing CONNECT");
            self.metrics.packets_connack_sent += 1;
            self.outbox_bytes += c.outbox.put(&Packet::Connack(Connack {
                session_present: false,
                code: ConnectReturnCode::UnacceptableProtocolVersion,
            }));
            c.start_close(now);
            self.arm_conn(id);
            return;
        }
        self.metrics.malformed_packets += 1;
        debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), error = %err, "malformed packet, closing");
        self.end_connection(id, true, EndReason::MalformedPacket);
        self.drain_inbox();
    }

    /// The connection's deadline passed (or may have): closes it on CONNECT or keepalive
    /// timeout, and gives up on a close that could not flush within `close_timeout`.
    pub fn conn_timeout(&mut self, id: ConnId, now: Timestamp) {
        self.now = now;
        let Some(c) = self.conns.get(id.idx as usize).filter(|c| c.gen == id.gen) else {
            return;
        };
        if c.close {
            if self.timeout_deadline(c).is_some_and(|d| d <= now) {
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    self.metrics.close_timeouts += 1;
                    debug!(peer = %c.peer, unsent = c.outbox.len(), "close timed out, resetting the connection");
                    let unsent = c.outbox.clear();
                    c.abort = true;
                    c.wake();
                    self.release_outbox_bytes(unsent);
                }
            }
            return;
        }
        if c.throttled {
            if c.about.as_ref().is_none_or(|a| a.resume_at <= now) {
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    c.throttled = false;
                    // The keepalive counts from when the connection is read again.
                    c.last_rx = now;
                    c.wake();
                }
            }
            return;
        }
        if self.timeout_deadline(c).is_none_or(|d| now < d) {
            if self.park_deadline(c).is_some_and(|d| d <= now) {
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    c.park = true;
                    c.wake();
                }
            }
            return;
        }
        let idle = self.idle_timeout(c);
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        if c.phase == ConnPhase::AwaitingConnect {
            self.metrics.connect_timeouts += 1;
            debug!(peer = %c.peer, "no CONNECT within idle_timeout, closing");
        } else if c.phase == ConnPhase::Connecting && c.last_rx.after(idle) <= now {
            self.metrics.connect_timeouts += 1;
            debug!(peer = %c.peer, "CONNECT not answered within idle_timeout, closing");
        } else {
            self.metrics.keepalive_timeouts += 1;
            debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), "keepalive timeout, closing");
        }
        self.end_connection(id, true, EndReason::KeepaliveTimeout);
        self.drain_inbox();
    }

    /// The transport is gone (peer closed, I/O error, or the driver finished closing). Frees
    /// the connection; a session still attached detaches and its will is published. Returns
    /// the number of the listener it came through (`None` if it was already gone).
    pub fn conn_closed(&mut self, id: ConnId, now: Timestamp) -> Option<u16> {
        self.now = now;
        conn_mut(&mut self.conns, id)?;
        self.detach_conn(id, true, EndReason::Closed);
        if !self.pending_auth.is_empty() {
            self.pending_auth.remove(&id.token());
        }
        let c = self.conns.remove(id.idx as usize);
        self.listener_conns[usize::from(c.listener)] -= 1;
        if c.parked {
            self.parked_count -= 1;
        }
        self.release_outbox_bytes(c.outbox.len());
        self.metrics.connections_closed += 1;
        self.drain_inbox();
        Some(c.listener)
    }

    /// Closes every connection (broker shutdown). Wills are not published.
    pub fn close_all(&mut self, now: Timestamp) {
        self.now = now;
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .map(|(idx, c)| ConnId {
                idx: idx as u32,
                gen: c.gen,
            })
            .collect();
        for id in ids {
            self.end_connection(id, false, EndReason::Shutdown);
        }
        self.drain_inbox();
    }

    pub(super) fn violation(&mut self, id: ConnId, what: &str) {
        self.metrics.protocol_errors += 1;
        if let Some(c) = conn_mut(&mut self.conns, id) {
            debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), "protocol error: {what}; closing");
        }
        self.end_connection(id, true, EndReason::ProtocolError);
    }

    /// Marks the connection closing (its close deadline armed); detaches its session
    /// (publishing the will when `will_allowed` and the client did not DISCONNECT).
    pub(super) fn end_connection(&mut self, id: ConnId, will_allowed: bool, reason: EndReason) {
        self.detach_conn(id, will_allowed, reason);
        self.arm_conn(id);
    }

    /// [`Engine::end_connection`] without arming the close deadline (the connection is gone).
    pub(super) fn detach_conn(&mut self, id: ConnId, will_allowed: bool, reason: EndReason) {
        self.client_event(id, Some(reason));
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return;
        };
        let phase = c.phase;
        c.start_close(self.now);
        let will = c.take_will().filter(|_| will_allowed);
        if let ConnPhase::Connected(key) = phase {
            self.detach(key as usize);
            if let Some(w) = will {
                self.publish_will(w);
            }
        }
    }

    pub(super) fn on_session_packet(&mut self, id: ConnId, key: usize, packet: Packet) {
        match packet {
            // `$SYS/` is the broker's: a client's message there is acknowledged as usual (3.1.1
            // has no refusal for it) and dropped.
            // A topic of `n` bytes has at most `n + 1` levels: short topics are not counted.
            Packet::Publish(p)
                if self.cfg.max_topic_levels > 0
                    && p.topic.len() >= self.cfg.max_topic_levels
                    && crate::topic::levels(&p.topic) > self.cfg.max_topic_levels =>
            {
                self.metrics.topic_levels_exceeded += 1;
                let what = format!(
                    "topic with {} levels, more than mqtt.max_topic_levels ({})",
                    crate::topic::levels(&p.topic),
                    self.cfg.max_topic_levels
                );
                self.violation(id, &what)
            }
            Packet::Publish(p) if crate::topic::is_sys(&p.topic) => {
                self.metrics.sys_publish_denied += 1;
                debug!(topic = &*p.topic, "PUBLISH into $SYS/ dropped");
                self.ack_dropped(id, &p);
            }
            Packet::Publish(p)
                if self.acl.is_some()
                    && !self.acl_allows(id, key, crate::acl::Action::Publish, &p.topic) =>
            {
                self.deny_publish(id, &p)
            }
            Packet::Publish(p) => self.on_publish(id, key, p),
            Packet::Puback(pid) => self.on_ack(id, key, pid, AckKind::Puback),
            Packet::Pubrec(pid) => self.on_ack(id, key, pid, AckKind::Pubrec),
            Packet::Pubcomp(pid) => self.on_ack(id, key, pid, AckKind::Pubcomp),
            Packet::Pubrel(pid) => {
                if let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) {
                    a.session.on_pubrel(pid);
                }
                self.reply(id, &Packet::Pubcomp(pid));
            }
            // A route delta and one retained query to each shard, at most.
            Packet::Subscribe(s) if self.congested(2) => self.stall(id, Packet::Subscribe(s)),
            Packet::Subscribe(s) => self.on_subscribe(id, key, s),
            Packet::Unsubscribe(u) if self.congested(1) => self.stall(id, Packet::Unsubscribe(u)),
            Packet::Unsubscribe(u) => self.on_unsubscribe(id, key, u),
            Packet::Pingreq => self.reply(id, &Packet::Pingresp),
            Packet::Disconnect => {
                if let Some(c) = conn_mut(&mut self.conns, id) {
                    c.take_will();
                }
                self.end_connection(id, false, EndReason::Normal);
            }
            p @ (Packet::Connack(_)
            | Packet::Suback(_)
            | Packet::Unsuback(_)
            | Packet::Pingresp
            | Packet::Connect(_)) => {
                self.violation(id, &format!("{} is a server-to-client packet", p.name()))
            }
        }
    }

    /// Writes `p` to the connection's outbox (a reply to the client's own packet: always).
    pub(super) fn reply(&mut self, id: ConnId, p: &Packet) {
        if let Some(c) = conn_mut(&mut self.conns, id) {
            self.metrics.count_sent(p);
            self.outbox_bytes += c.outbox.put(p);
            c.wake();
        }
    }
}
