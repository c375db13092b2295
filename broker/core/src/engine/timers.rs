//! Timers: session retries and expiries, connection deadlines (CONNECT, keepalive, close,
//! park), and the wake-up time the runtime sleeps until.

use super::*;

impl Engine {
    /// Wakes the timer task if `at` is earlier than the time it sleeps until.
    pub(super) fn note_timer(&mut self, at: Timestamp) {
        if at < self.timer_wake_at {
            self.timer_wake_at = at;
            if let Some(w) = self.timer_waker.take() {
                w.wake();
            }
        }
    }

    /// Registers the waker of the shard's timer task, which sleeps until `wake_at` unless a
    /// timer is armed for earlier.
    pub fn set_timer_waker(&mut self, waker: &Waker, wake_at: Timestamp) {
        self.timer_wake_at = wake_at;
        self.timer_waker = Some(waker.clone());
    }

    // ---------------------------------------------------------------- timers

    /// Schedules the session's next timer if it is earlier than the one already set.
    pub(super) fn arm(&mut self, key: usize) {
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let session_due = a.session.next_deadline(a.conn.is_some(), &self.cfg.limits);
        self.arm_at(key, session_due.unwrap_or(Timestamp::NEVER));
    }

    /// When a delivery sent now is due for a resend (`None` when resends are off).
    pub(super) fn retry_due(&self, now: Timestamp) -> Option<Timestamp> {
        self.cfg.limits.retry_interval.map(|r| now.after(r))
    }

    /// Arms session `key` for a deadline it has just gained (`now` plus its interval). Every
    /// deadline the session already has is earlier or equal, so a timer is needed only when
    /// none is armed at or before `due`: one comparison per message instead of
    /// [`Engine::arm`]'s walk over the whole inflight window (which the timer handler still
    /// does when the timer fires).
    pub(super) fn arm_new(&mut self, key: usize, due: Option<Timestamp>) {
        if let Some(due) = due {
            self.arm_at(key, due);
        }
    }

    /// Arms session `key`'s timer for `due` (or its expiry, if earlier) unless one is already
    /// armed at or before it.
    pub(super) fn arm_at(&mut self, key: usize, due: Timestamp) {
        let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
            return;
        };
        let due = due.min(a.expires_at);
        // `timer_at` is at most NEVER, so a NEVER `due` (nothing to do) arms nothing.
        if due < a.timer_at {
            a.timer_at = due;
            self.timers.push(Reverse((due, key, a.gen)));
            self.note_timer(due);
        }
    }

    /// The earliest time [`Engine::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let sessions = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let conns = self.conn_timers.peek().map(|Reverse((t, _, _))| *t);
        let t = match (sessions, conns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.cfg.retained.expiry.is_some() && !self.retained.is_empty() {
            Some(t.map_or(self.next_retained_purge, |t| {
                t.min(self.next_retained_purge)
            }))
        } else {
            t
        }
    }

    /// Runs due session timers: retries, inbound QoS 2 expiry, session expiry, retained expiry.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.now = now;
        while let Some(Reverse((due, idx, gen))) = self.conn_timers.peek().copied() {
            if due > now {
                break;
            }
            self.conn_timers.pop();
            let id = ConnId { idx, gen };
            let Some(c) = conn_mut(&mut self.conns, id) else {
                continue;
            };
            if c.timer_at != due {
                continue;
            }
            c.timer_at = Timestamp::NEVER;
            self.conn_timeout(id, now);
            self.arm_conn(id);
        }
        while let Some(Reverse((due, key, gen))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            let Some(SessionSlot::Active(a)) = self.sessions.get_mut(key) else {
                continue;
            };
            if a.gen != gen || a.timer_at != due {
                continue;
            }
            a.timer_at = Timestamp::NEVER;
            if a.conn.is_none() && a.expires_at <= now {
                self.metrics.sessions_expired += 1;
                debug!(client_id = %a.session.client_id, "session expired");
                self.discard_session(key, true);
                continue;
            }
            let conn = attached(&mut self.conns, a.conn);
            let (resent, expired) = match conn {
                Some(c) => {
                    let before = c.outbox.len();
                    let limit = outbox_limit(&self.cfg, self.outbox_bytes, before);
                    let r = a.session.on_timeout(
                        now,
                        &self.cfg.limits,
                        Some(Outbox::new(&mut c.outbox, limit)),
                    );
                    self.outbox_bytes += c.outbox.len() - before;
                    if r.0 > 0 {
                        c.wake();
                    }
                    r
                }
                None => a.session.on_timeout::<Sink>(now, &self.cfg.limits, None),
            };
            self.metrics.retries += resent as u64;
            self.metrics.awaiting_rel_expired += expired as u64;
            self.arm(key);
        }
        if self.cfg.retained.expiry.is_some() && now >= self.next_retained_purge {
            self.retained.purge_expired(now);
            self.next_retained_purge = now.after(Duration::from_secs(1));
        }
        self.drain_inbox();
    }
}
