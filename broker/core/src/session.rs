//! The MQTT session: subscriptions, the outbound inflight window, the message queue and the
//! inbound QoS 2 packet ids. Plain, serializable data with methods that take the time and an
//! optional connection outbox; no I/O, no clock.
//!
//! Outbound flow: a delivery goes straight to the connection when the window has room, the
//! queue is empty and the connection's [`Outbox`] is below its limit; otherwise a QoS 1/2
//! delivery goes into the queue (bounded, oldest dropped) and a QoS 0 one is dropped (a slow
//! consumer) unless it must wait behind queued ones. A QoS 1/2 delivery takes a packet id and
//! waits in the inflight window for PUBACK, or for PUBREC then (after our PUBREL) PUBCOMP.
//! Acknowledgements free the window and pull from the queue, so messages leave in the order
//! they arrived. On reconnect ([`Session::resume`]) the window is resent first (PUBLISH with
//! DUP, or PUBREL), then the queue drains; what does not fit below the outbox limit waits for
//! [`Session::refill`], called when the client has read enough. With `retry_interval` set, an
//! unacknowledged entry is resent the same way after that interval (or, if the outbox is full,
//! one interval later: the client is not reading the earlier copy either).
//!
//! Inbound QoS 2: a packet id is remembered from PUBLISH until PUBREL, so a resent PUBLISH is
//! acknowledged but not routed twice (exactly once).

use super::message::SharedMessage;
use super::time::Timestamp;
use crate::sink::{Sink, SinkWrite};
use serde::{Deserialize, Serialize};
use shardmq_protocol::bytestr::ByteStr;
use shardmq_protocol::mqtt::{self, QoS};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Session limits (from `mqtt.*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionLimits {
    /// Inflight window size.
    pub max_inflight: usize,
    /// Queue length.
    pub max_mqueue_len: usize,
    /// Queue QoS 0 for offline sessions.
    pub mqueue_store_qos0: bool,
    /// Resend interval for unacknowledged deliveries; `None` = only on reconnect.
    pub retry_interval: Option<Duration>,
    /// Inbound QoS 2 ids awaiting PUBREL.
    pub max_awaiting_rel: usize,
    /// How long an inbound QoS 2 id may wait for PUBREL.
    pub await_rel_timeout: Option<Duration>,
}

/// The attached connection's sink (its outbox), and how far a session may fill it: deliveries
/// and resends are written while it holds fewer than `limit` bytes (one message may take it
/// past the limit; the next waits). Replies to the client's own packets (PUBREL) are always
/// written.
pub struct Outbox<'a, W: SinkWrite = Sink> {
    /// What waits to go to the connection.
    pub sink: &'a mut W,
    /// The fill limit.
    pub limit: usize,
}

impl<'a, W: SinkWrite> Outbox<'a, W> {
    /// `sink`, filled up to `limit`.
    pub fn new(sink: &'a mut W, limit: usize) -> Self {
        Outbox { sink, limit }
    }

    /// `sink`, with no limit.
    pub fn unlimited(sink: &'a mut W) -> Self {
        Outbox {
            sink,
            limit: usize::MAX,
        }
    }

    fn has_room(&self) -> bool {
        self.sink.len() < self.limit
    }
}

/// Where an inflight delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// One delivery in the inflight window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InflightEntry {
    /// Packet id.
    pub packet_id: u16,
    /// The message.
    pub msg: SharedMessage,
    /// QoS of this delivery (1 or 2).
    pub qos: QoS,
    /// Retain flag of this delivery.
    pub retain: bool,
    /// Where the handshake stands.
    pub phase: Phase,
    /// When it was last sent.
    pub sent_at: Timestamp,
    /// [`Flows::allocated`] when its packet id was taken.
    #[serde(default)]
    pub alloc: u64,
}

/// A queued delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Queued {
    /// The message.
    pub msg: SharedMessage,
    /// QoS of this delivery.
    pub qos: QoS,
    /// Retain flag of this delivery.
    pub retain: bool,
}

/// What happened to a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the connection's outbox.
    Sent,
    /// Queued; `dropped_oldest` when the queue was full and lost its oldest message.
    Queued {
        /// The queue overflowed.
        dropped_oldest: bool,
    },
    /// QoS 0 for an offline session with `mqueue_store_qos0 = false`.
    DroppedQos0Offline,
    /// QoS 0 to a connection whose outbox is at its limit.
    DroppedSlowConsumer,
}

/// An acknowledgement that matches no inflight delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownPacketId(pub u16);

/// Too many inbound QoS 2 messages wait for PUBREL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwaitingRelFull;

/// PUBLISH packets written to a client, by QoS (resends after a reconnect included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written(pub [u32; 3]);

impl Written {
    /// One more at `qos`.
    #[inline]
    pub fn add(&mut self, qos: QoS) {
        self.0[qos as usize] += 1;
    }

    /// All QoS together.
    pub fn total(self) -> usize {
        self.0.iter().map(|&n| n as usize).sum()
    }

    /// Whether none was written.
    pub fn is_empty(self) -> bool {
        self.0 == [0; 3]
    }

    fn merge(&mut self, o: Written) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
    }
}

/// An MQTT session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Client id.
    pub client_id: ByteStr,
    /// Clean session flag of the CONNECT that created it.
    pub clean_session: bool,
    /// Topic filter → granted QoS.
    pub subscriptions: BTreeMap<String, QoS>,
    /// Delivery state, allocated by the first delivery that must be remembered (queued, or
    /// waiting for an acknowledgement) and freed by [`Session::shrink`] once empty, so an idle
    /// session does not carry it.
    pub flows: Option<Box<Flows>>,
    /// Last packet id used.
    pub last_packet_id: u16,
    /// When the session was created.
    pub created_at: Timestamp,
}

/// A session's deliveries in progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Flows {
    /// Outbound deliveries waiting for acknowledgement, in send order.
    pub inflight: VecDeque<InflightEntry>,
    /// Deliveries waiting for window room or for the client to come back.
    pub queue: VecDeque<Queued>,
    /// Inbound QoS 2 packet ids waiting for PUBREL, with their arrival time.
    pub awaiting_rel: BTreeMap<u16, Timestamp>,
    /// Packet ids tried so far (taken or skipped as in use), counting from when these flows
    /// were created; see [`Flows::next_packet_id`]. State read back without it starts far
    /// ahead of its entries' (0), so their ids are searched until they are gone.
    #[serde(default = "unknown_allocations")]
    pub allocated: u64,
    /// How many entries at the back of `inflight` are still to be resent on the current
    /// connection (after a reconnect, while its outbox had no room). New deliveries wait
    /// behind them.
    #[serde(default)]
    pub unsent: usize,
    /// Topic and payload bytes of the messages in `queue`.
    #[serde(default)]
    pub queue_bytes: usize,
    /// Of `queue_bytes`, what counts against the broker-wide cap on offline queues
    /// ([`OfflineQueues`]): all of it while the session is offline, nothing while a
    /// connection is attached.
    #[serde(default)]
    pub offline_bytes: usize,
}

/// What all offline sessions of the broker hold in their queues together, against
/// `mqtt.max_mqueue_bytes_total`: one counter that every shard shares, touched when a message
/// is queued for an offline session and when a session goes offline, comes back or is freed
/// (never per delivery to a connected client).
#[derive(Debug, Default)]
pub struct OfflineQueues {
    cap: usize,
    bytes: std::sync::atomic::AtomicUsize,
}

impl OfflineQueues {
    /// A counter with the cap `cap` bytes (0 = no cap).
    pub fn new(cap: usize) -> Self {
        OfflineQueues {
            cap,
            bytes: Default::default(),
        }
    }

    /// Topic and payload bytes queued for offline sessions now, all shards together.
    pub fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reserves `size` bytes for a message about to be queued, if they fit under the cap:
    /// check and add are one atomic step, so shards queueing at the same time never pass the
    /// cap together. The queueing then settles the count with [`OfflineQueues::moved`] from
    /// the share plus `size`.
    pub fn reserve(&self, size: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.cap == 0 {
            self.bytes.fetch_add(size, Relaxed);
            return true;
        }
        self.bytes
            .fetch_update(Relaxed, Relaxed, |b| {
                b.checked_add(size).filter(|&n| n <= self.cap)
            })
            .is_ok()
    }

    /// A session's share went from `before` to `after` bytes.
    pub fn moved(&self, before: usize, after: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        if after > before {
            self.bytes.fetch_add(after - before, Relaxed);
        } else if before > after {
            // Never below zero, whatever order the shards' updates come in.
            let _ = self
                .bytes
                .fetch_update(Relaxed, Relaxed, |b| Some(b.saturating_sub(before - after)));
        }
    }
}

/// What a queued delivery weighs for `mqtt.force_shutdown_policy`.
pub(crate) fn queued_size(msg: &SharedMessage) -> usize {
    msg.topic.len() + msg.payload.len()
}

fn unknown_allocations() -> u64 {
    1 << 62
}

static NO_INFLIGHT: VecDeque<InflightEntry> = VecDeque::new();
static NO_QUEUE: VecDeque<Queued> = VecDeque::new();
static NO_AWAITING_REL: BTreeMap<u16, Timestamp> = BTreeMap::new();

impl Session {
    /// A new, empty session.
    pub fn new(client_id: ByteStr, clean_session: bool, now: Timestamp) -> Self {
        Session {
            client_id,
            clean_session,
            subscriptions: BTreeMap::new(),
            flows: None,
            last_packet_id: 0,
            created_at: now,
        }
    }

    /// Outbound deliveries waiting for acknowledgement, in send order.
    pub fn inflight(&self) -> &VecDeque<InflightEntry> {
        self.flows.as_ref().map_or(&NO_INFLIGHT, |f| &f.inflight)
    }

    /// Deliveries waiting for window room or for the client to come back.
    pub fn queue(&self) -> &VecDeque<Queued> {
        self.flows.as_ref().map_or(&NO_QUEUE, |f| &f.queue)
    }

    /// Topic and payload bytes of the queued deliveries.
    pub fn queue_bytes(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.queue_bytes)
    }

    /// Of the queued bytes, those counted against the cap on offline queues.
    pub fn offline_bytes(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.offline_bytes)
    }

    /// The session goes offline (all its queue counts against the cap on offline queues) or
    /// a connection attaches (none of it does). Returns its share before and after.
    pub fn set_offline(&mut self, offline: bool) -> (usize, usize) {
        let Some(f) = self.flows.as_deref_mut() else {
            return (0, 0);
        };
        let before = f.offline_bytes;
        f.offline_bytes = if offline { f.queue_bytes } else { 0 };
        (before, f.offline_bytes)
    }

    /// Inbound QoS 2 packet ids waiting for PUBREL, with their arrival time.
    pub fn awaiting_rel(&self) -> &BTreeMap<u16, Timestamp> {
        self.flows
            .as_ref()
            .map_or(&NO_AWAITING_REL, |f| &f.awaiting_rel)
    }

    fn flows_mut(&mut self) -> &mut Flows {
        self.flows.get_or_insert_with(Box::default)
    }

    /// Frees the delivery state if nothing is in progress (called when the client goes idle).
    pub fn shrink(&mut self) {
        if self.flows.as_ref().is_some_and(|f| {
            f.inflight.is_empty() && f.queue.is_empty() && f.awaiting_rel.is_empty()
        }) {
            self.flows = None;
        }
    }

    /// Offers a delivery. `out` is the outbox of the attached connection, `None` when offline.
    pub fn deliver<W: SinkWrite>(
        &mut self,
        msg: &SharedMessage,
        qos: QoS,
        retain: bool,
        now: Timestamp,
        lim: &SessionLimits,
        out: Option<Outbox<'_, W>>,
    ) -> Delivery {
        let Some(out) = out else {
            if qos == QoS::AtMostOnce && !lim.mqueue_store_qos0 {
                return Delivery::DroppedQos0Offline;
            }
            return self.enqueue(msg, qos, retain, lim, true);
        };
        if self
            .flows
            .as_ref()
            .is_some_and(|f| !f.queue.is_empty() || f.unsent > 0)
        {
            return self.enqueue(msg, qos, retain, lim, false);
        }
        if qos == QoS::AtMostOnce {
            if !out.has_room() {
                return Delivery::DroppedSlowConsumer;
            }
            out.sink.publish(false, qos, retain, msg, 0);
            return Delivery::Sent;
        }
        if self.inflight().len() < lim.max_inflight && out.has_room() {
            let f = self.flows.get_or_insert_with(Box::default);
            f.send_new(
                &mut self.last_packet_id,
                msg.clone(),
                qos,
                retain,
                now,
                out.sink,
            );
            Delivery::Sent
        } else {
            self.enqueue(msg, qos, retain, lim, false)
        }
    }

    /// Whether resends or queued deliveries wait only for room in the outbox (not for the
    /// client to acknowledge): the caller should [`Session::refill`] once there is room.
    pub fn wants_room(&self, lim: &SessionLimits) -> bool {
        self.flows.as_ref().is_some_and(|f| {
            f.unsent > 0
                || f.queue.front().is_some_and(|q| {
                    q.qos == QoS::AtMostOnce || f.inflight.len() < lim.max_inflight
                })
        })
    }

    fn enqueue(
        &mut self,
        msg: &SharedMessage,
        qos: QoS,
        retain: bool,
        lim: &SessionLimits,
        offline: bool,
    ) -> Delivery {
        let f = self.flows_mut();
        let dropped_oldest = f.queue.len() >= lim.max_mqueue_len;
        if dropped_oldest {
            if let Some(old) = f.queue.pop_front() {
                let size = queued_size(&old.msg);
                f.queue_bytes = f.queue_bytes.saturating_sub(size);
                if offline {
                    f.offline_bytes = f.offline_bytes.saturating_sub(size);
                }
            }
        }
        f.queue_bytes += queued_size(msg);
        if offline {
            f.offline_bytes += queued_size(msg);
        }
        f.queue.push_back(Queued {
            msg: msg.clone(),
            qos,
            retain,
        });
        Delivery::Queued { dropped_oldest }
    }

    /// Writes what waits for room while the outbox has it: the rest of the window's resends,
    /// then queued deliveries while the window has room. Returns the PUBLISH packets written.
    pub fn refill<W: SinkWrite>(
        &mut self,
        now: Timestamp,
        lim: &SessionLimits,
        mut out: Outbox<'_, W>,
    ) -> Written {
        match self.flows.as_deref_mut() {
            Some(f) => f.refill(&mut self.last_packet_id, now, lim, &mut out),
            None => Written::default(),
        }
    }

    /// A connection attached: resend the window (DUP / PUBREL), then drain the queue, as far
    /// as the outbox has room. Returns the PUBLISH packets written.
    pub fn resume<W: SinkWrite>(
        &mut self,
        now: Timestamp,
        lim: &SessionLimits,
        out: Outbox<'_, W>,
    ) -> Written {
        if let Some(f) = self.flows.as_deref_mut() {
            f.unsent = f.inflight.len();
        }
        self.refill(now, lim, out)
    }

    /// PUBACK for a QoS 1 delivery. Frees its slot and refills (count returned).
    pub fn on_puback<W: SinkWrite>(
        &mut self,
        id: u16,
        now: Timestamp,
        lim: &SessionLimits,
        out: Outbox<'_, W>,
    ) -> Result<Written, UnknownPacketId> {
        self.complete(id, |e| e.qos == QoS::AtLeastOnce, now, lim, out)
    }

    /// PUBREC for a QoS 2 delivery: answer PUBREL and wait for PUBCOMP.
    pub fn on_pubrec<W: SinkWrite>(
        &mut self,
        id: u16,
        now: Timestamp,
        out: &mut W,
    ) -> Result<(), UnknownPacketId> {
        let e = self
            .flows
            .as_deref_mut()
            .ok_or(UnknownPacketId(id))?
            .inflight
            .iter_mut()
            .find(|e| e.packet_id == id && e.qos == QoS::ExactlyOnce)
            .ok_or(UnknownPacketId(id))?;
        e.phase = Phase::Released;
        e.sent_at = now;
        out.put(&mqtt::Packet::Pubrel(id));
        Ok(())
    }

    /// PUBCOMP for a QoS 2 delivery. Frees its slot and refills (count returned).
    pub fn on_pubcomp<W: SinkWrite>(
        &mut self,
        id: u16,
        now: Timestamp,
        lim: &SessionLimits,
        out: Outbox<'_, W>,
    ) -> Result<Written, UnknownPacketId> {
        self.complete(id, |e| e.phase == Phase::Released, now, lim, out)
    }

    /// Removes the inflight entry `id` if `expected` holds for it, then refills.
    fn complete<W: SinkWrite>(
        &mut self,
        id: u16,
        expected: impl Fn(&InflightEntry) -> bool,
        now: Timestamp,
        lim: &SessionLimits,
        mut out: Outbox<'_, W>,
    ) -> Result<Written, UnknownPacketId> {
        let f = self.flows.as_deref_mut().ok_or(UnknownPacketId(id))?;
        let pos = f
            .inflight
            .iter()
            .position(|e| e.packet_id == id && expected(e))
            .ok_or(UnknownPacketId(id))?;
        f.inflight.remove(pos);
        if pos >= f.inflight.len() + 1 - f.unsent {
            // An entry still to be resent: the client had it from an earlier connection.
            f.unsent -= 1;
        }
        Ok(f.refill(&mut self.last_packet_id, now, lim, &mut out))
    }

    /// An inbound QoS 2 PUBLISH: `Ok(true)` if it is new and must be routed, `Ok(false)` if it
    /// is a resend of one not yet released.
    pub fn on_inbound_qos2(
        &mut self,
        id: u16,
        now: Timestamp,
        lim: &SessionLimits,
    ) -> Result<bool, AwaitingRelFull> {
        let rel = self.awaiting_rel();
        if rel.contains_key(&id) {
            return Ok(false);
        }
        if rel.len() >= lim.max_awaiting_rel {
            return Err(AwaitingRelFull);
        }
        self.flows_mut().awaiting_rel.insert(id, now);
        Ok(true)
    }

    /// PUBREL from the client: forget the id. The caller answers PUBCOMP either way.
    pub fn on_pubrel(&mut self, id: u16) -> bool {
        self.flows
            .as_deref_mut()
            .is_some_and(|f| f.awaiting_rel.remove(&id).is_some())
    }

    /// The next time [`Session::on_timeout`] has work: a retry (only when `online`) or an
    /// inbound QoS 2 id expiring. Entries still to be resent after a reconnect wait for
    /// [`Session::refill`], not for a timer.
    pub fn next_deadline(&self, online: bool, lim: &SessionLimits) -> Option<Timestamp> {
        let retry = match (lim.retry_interval, self.flows.as_deref()) {
            (Some(r), Some(f)) if online => f
                .inflight
                .iter()
                .take(f.inflight.len() - f.unsent)
                .map(|e| e.sent_at.after(r))
                .min(),
            _ => None,
        };
        let rel = lim
            .await_rel_timeout
            .and_then(|t| self.awaiting_rel().values().map(|at| at.after(t)).min());
        match (retry, rel) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Resends what is due (when `out` is given) and forgets expired inbound QoS 2 ids. A due
    /// resend that finds the outbox at its limit is put off by one more interval. Returns
    /// (deliveries resent, QoS 2 ids expired).
    pub fn on_timeout<W: SinkWrite>(
        &mut self,
        now: Timestamp,
        lim: &SessionLimits,
        out: Option<Outbox<'_, W>>,
    ) -> (usize, usize) {
        let Some(f) = self.flows.as_deref_mut() else {
            return (0, 0);
        };
        let mut resent = 0;
        if let (Some(r), Some(out)) = (lim.retry_interval, out) {
            let sent = f.inflight.len() - f.unsent;
            for e in f.inflight.iter_mut().take(sent) {
                if e.sent_at.after(r) <= now {
                    if out.has_room() {
                        Flows::resend(e, now, out.sink);
                        resent += 1;
                    } else {
                        e.sent_at = now;
                    }
                }
            }
        }
        let mut expired = 0;
        if let Some(t) = lim.await_rel_timeout {
            f.awaiting_rel.retain(|_, at| {
                let keep = at.after(t) > now;
                expired += (!keep) as usize;
                keep
            });
        }
        (resent, expired)
    }
}

impl Flows {
    /// The next free packet id after `last`. Ids are tried in order (1..=65535, then 1
    /// again) and the inflight window is in the order they were taken, so a candidate can
    /// only still be in use once the oldest delivery in flight has seen the whole id space go
    /// by since it took its id. Until then (always, for any sane client) no search is needed;
    /// after that the window is searched for each candidate.
    fn next_packet_id(&mut self, last: &mut u16) -> u16 {
        const IDS: u64 = u16::MAX as u64;
        loop {
            let may_be_used = self
                .inflight
                .front()
                .is_some_and(|f| self.allocated - f.alloc >= IDS - 1);
            *last = last.wrapping_add(1).max(1);
            self.allocated += 1;
            let id = *last;
            if !may_be_used || !self.inflight.iter().any(|e| e.packet_id == id) {
                return id;
            }
        }
    }

    fn send_new<W: SinkWrite>(
        &mut self,
        last: &mut u16,
        msg: SharedMessage,
        qos: QoS,
        retain: bool,
        now: Timestamp,
        out: &mut W,
    ) {
        let packet_id = self.next_packet_id(last);
        let alloc = self.allocated;
        out.publish(false, qos, retain, &msg, packet_id);
        self.inflight.push_back(InflightEntry {
            packet_id,
            msg,
            qos,
            retain,
            phase: Phase::Published,
            sent_at: now,
            alloc,
        });
    }

    /// Resends the window's entries still unsent on this connection, then drains the queue,
    /// while the outbox has room. Returns the PUBLISH packets written.
    fn refill<W: SinkWrite>(
        &mut self,
        last: &mut u16,
        now: Timestamp,
        lim: &SessionLimits,
        out: &mut Outbox<'_, W>,
    ) -> Written {
        let mut sent = Written::default();
        while self.unsent > 0 && out.has_room() {
            let i = self.inflight.len() - self.unsent;
            let e = &mut self.inflight[i];
            Flows::resend(e, now, out.sink);
            if e.phase == Phase::Published {
                sent.add(e.qos);
            }
            self.unsent -= 1;
        }
        if self.unsent > 0 {
            return sent;
        }
        sent.merge(self.drain(last, now, lim, out));
        sent
    }

    fn drain<W: SinkWrite>(
        &mut self,
        last: &mut u16,
        now: Timestamp,
        lim: &SessionLimits,
        out: &mut Outbox<'_, W>,
    ) -> Written {
        let mut sent = Written::default();
        while let Some(front) = self.queue.front() {
            if !out.has_room()
                || (front.qos != QoS::AtMostOnce && self.inflight.len() >= lim.max_inflight)
            {
                break;
            }
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            self.queue_bytes = self.queue_bytes.saturating_sub(queued_size(&q.msg));
            if q.qos == QoS::AtMostOnce {
                out.sink.publish(false, q.qos, q.retain, &q.msg, 0);
            } else {
                self.send_new(last, q.msg, q.qos, q.retain, now, out.sink);
            }
            sent.add(q.qos);
        }
        sent
    }

    fn resend<W: SinkWrite>(entry: &mut InflightEntry, now: Timestamp, out: &mut W) {
        match entry.phase {
            Phase::Published => {
                out.publish(true, entry.qos, entry.retain, &entry.msg, entry.packet_id)
            }
            Phase::Released => {
                out.put(&mqtt::Packet::Pubrel(entry.packet_id));
            }
        }
        entry.sent_at = now;
    }
}

#[cfg(test)]
mod tests;
