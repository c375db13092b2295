//! Session state machine tests on a simulated clock.

use super::*;
use crate::message::Message;
use shardmq_protocol::mqtt::{decode, DecodeOptions, Packet};
use std::sync::Arc;

fn lim() -> SessionLimits {
    SessionLimits {
        max_inflight: 2,
        max_mqueue_len: 3,
        mqueue_store_qos0: true,
        retry_interval: Some(Duration::from_secs(10)),
        max_awaiting_rel: 2,
        await_rel_timeout: Some(Duration::from_secs(30)),
    }
}

fn msg(n: u64, qos: QoS) -> SharedMessage {
    Arc::new(Message {
        id: n,
        topic: "t".into(),
        payload: bytes::Bytes::from(n.to_string()),
        qos,
        retain: false,
    })
}

/// Delivers message `n` (not retained) at its own QoS.
fn deliver(
    s: &mut Session,
    n: u64,
    qos: QoS,
    now: Timestamp,
    lim: &SessionLimits,
    out: Option<&mut Sink>,
) -> Delivery {
    s.deliver(
        &msg(n, qos),
        qos,
        false,
        now,
        lim,
        out.map(Outbox::unlimited),
    )
}

fn packets(out: &mut Sink) -> Vec<Packet> {
    let out = out.bytes_mut().expect("an MQTT sink");
    let mut v = Vec::new();
    while let Some(p) = decode(out, &DecodeOptions::default()).unwrap() {
        v.push(p);
    }
    assert!(out.is_empty());
    v
}

fn publish(p: &Packet) -> (u16, bool, String) {
    match p {
        Packet::Publish(p) => (
            p.packet_id,
            p.dup,
            String::from_utf8_lossy(&p.payload).into_owned(),
        ),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[test]
fn qos1_window_queue_and_order() {
    let l = lim();
    let mut s = Session::new("c".into(), false, Timestamp(0));
    let mut out = Sink::mqtt();
    let now = Timestamp(0);
    for n in 1..=4 {
        deliver(&mut s, n, QoS::AtLeastOnce, now, &l, Some(&mut out));
    }
    let sent: Vec<_> = packets(&mut out).iter().map(publish).collect();
    assert_eq!(sent, vec![(1, false, "1".into()), (2, false, "2".into())]);
    assert_eq!(s.queue().len(), 2);
    // QoS 0 behind a non-empty queue waits its turn (per-topic order).
    deliver(&mut s, 5, QoS::AtMostOnce, now, &l, Some(&mut out));
    assert!(out.is_empty());
    assert_eq!(
        s.on_puback(1, now, &l, Outbox::unlimited(&mut out))
            .map(Written::total),
        Ok(1)
    );
    assert_eq!(
        packets(&mut out).iter().map(publish).collect::<Vec<_>>(),
        vec![(3, false, "3".into())]
    );
    assert_eq!(
        s.on_puback(2, now, &l, Outbox::unlimited(&mut out)),
        Ok(Written([1, 1, 0])),
        "4 at QoS 1, 5 at QoS 0"
    );
    let p = packets(&mut out);
    assert_eq!(publish(&p[0]), (4, false, "4".into()));
    assert_eq!(publish(&p[1]), (0, false, "5".into()));
    assert_eq!(
        s.on_puback(2, now, &l, Outbox::unlimited(&mut out)),
        Err(UnknownPacketId(2))
    );
}

#[test]
fn queue_drops_oldest_when_full() {
    let l = lim();
    let mut s = Session::new("c".into(), false, Timestamp(0));
    for n in 1..=3 {
        assert_eq!(
            deliver(&mut s, n, QoS::AtLeastOnce, Timestamp(0), &l, None),
            Delivery::Queued {
                dropped_oldest: false
            }
        );
    }
    assert_eq!(
        deliver(&mut s, 4, QoS::AtLeastOnce, Timestamp(0), &l, None),
        Delivery::Queued {
            dropped_oldest: true
        }
    );
    let ids: Vec<u64> = s.queue().iter().map(|q| q.msg.id).collect();
    assert_eq!(ids, vec![2, 3, 4]);
    let mut l0 = l;
    l0.mqueue_store_qos0 = false;
    assert_eq!(
        deliver(&mut s, 5, QoS::AtMostOnce, Timestamp(0), &l0, None),
        Delivery::DroppedQos0Offline
    );
}

#[test]
fn qos2_outbound_handshake_and_resume_after_reconnect() {
    let l = lim();
    let mut s = Session::new("c".into(), false, Timestamp(0));
    let mut out = Sink::mqtt();
    deliver(
        &mut s,
        1,
        QoS::ExactlyOnce,
        Timestamp(0),
        &l,
        Some(&mut out),
    );
    s.deliver(
        &msg(2, QoS::ExactlyOnce),
        QoS::ExactlyOnce,
        true,
        Timestamp(0),
        &l,
        Some(Outbox::unlimited(&mut out)),
    );
    packets(&mut out);
    s.on_pubrec(1, Timestamp(1), &mut out).unwrap();
    assert_eq!(packets(&mut out), vec![Packet::Pubrel(1)]);
    // The connection drops; on reconnect: PUBREL for 1, PUBLISH DUP for 2 (retain kept).
    assert_eq!(
        s.resume(Timestamp(2), &l, Outbox::unlimited(&mut out)),
        Written([0, 0, 1])
    );
    let p = packets(&mut out);
    assert_eq!(p[0], Packet::Pubrel(1));
    let Packet::Publish(ref p2) = p[1] else {
        panic!()
    };
    assert!(p2.dup && p2.retain && p2.packet_id == 2);
    assert_eq!(
        s.on_pubcomp(2, Timestamp(3), &l, Outbox::unlimited(&mut out)),
        Err(UnknownPacketId(2)),
        "PUBCOMP before PUBREC"
    );
    assert_eq!(
        s.on_pubcomp(1, Timestamp(3), &l, Outbox::unlimited(&mut out)),
        Ok(Written::default())
    );
    assert_eq!(s.inflight().len(), 1);
}

#[test]
fn retry_interval_resends_with_dup() {
    let l = lim();
    let mut s = Session::new("c".into(), false, Timestamp(0));
    let mut out = Sink::mqtt();
    deliver(
        &mut s,
        1,
        QoS::AtLeastOnce,
        Timestamp(1_000),
        &l,
        Some(&mut out),
    );
    packets(&mut out);
    assert_eq!(s.next_deadline(true, &l), Some(Timestamp(11_000)));
    assert_eq!(s.next_deadline(false, &l), None);
    assert_eq!(
        s.on_timeout(Timestamp(10_999), &l, Some(Outbox::unlimited(&mut out))),
        (0, 0)
    );
    assert!(out.is_empty());
    assert_eq!(
        s.on_timeout(Timestamp(11_000), &l, Some(Outbox::unlimited(&mut out))),
        (1, 0)
    );
    assert_eq!(publish(&packets(&mut out)[0]), (1, true, "1".into()));
    assert_eq!(s.next_deadline(true, &l), Some(Timestamp(21_000)));
    let mut no_retry = l;
    no_retry.retry_interval = None;
    assert_eq!(s.next_deadline(true, &no_retry), None);
}

#[test]
fn inbound_qos2_exactly_once_and_limits() {
    let l = lim();
    let mut s = Session::new("c".into(), false, Timestamp(0));
    assert_eq!(s.on_inbound_qos2(7, Timestamp(0), &l), Ok(true));
    assert_eq!(
        s.on_inbound_qos2(7, Timestamp(1), &l),
        Ok(false),
        "resend is not routed again"
    );
    assert_eq!(s.on_inbound_qos2(8, Timestamp(2), &l), Ok(true));
    assert_eq!(s.on_inbound_qos2(9, Timestamp(2), &l), Err(AwaitingRelFull));
    assert!(s.on_pubrel(7));
    assert!(!s.on_pubrel(7));
    assert_eq!(
        s.on_inbound_qos2(7, Timestamp(3), &l),
        Ok(true),
        "id reusable after PUBREL"
    );
    assert_eq!(s.next_deadline(false, &l), Some(Timestamp(30_002)));
    assert_eq!(s.on_timeout::<Sink>(Timestamp(30_002), &l, None), (0, 1));
    assert_eq!(s.awaiting_rel().len(), 1);
}

#[test]
fn packet_ids_skip_those_in_flight_and_wrap() {
    let l = SessionLimits {
        max_inflight: 3,
        ..lim()
    };
    let mut s = Session::new("c".into(), false, Timestamp(0));
    s.last_packet_id = 65_534;
    let mut out = Sink::mqtt();
    for n in 0..3 {
        deliver(
            &mut s,
            n,
            QoS::AtLeastOnce,
            Timestamp(0),
            &l,
            Some(&mut out),
        );
    }
    let ids: Vec<u16> = s.inflight().iter().map(|e| e.packet_id).collect();
    assert_eq!(ids, vec![65_535, 1, 2]);
}

#[test]
fn a_delivery_stuck_in_flight_keeps_its_id_through_a_wrap() {
    let l = lim();
    let t = Timestamp(0);
    let mut s = Session::new("c".into(), false, t);
    let mut out = Sink::mqtt();
    // Message 0 takes id 1 and is never acknowledged.
    deliver(&mut s, 0, QoS::AtLeastOnce, t, &l, Some(&mut out));
    let mut seen = std::collections::HashSet::new();
    for n in 1..=70_000u64 {
        deliver(&mut s, n, QoS::AtLeastOnce, t, &l, Some(&mut out));
        let id = s.inflight().back().unwrap().packet_id;
        assert_ne!(id, 1, "message {n} took the id still in flight");
        seen.insert(id);
        s.on_puback(id, t, &l, Outbox::unlimited(&mut out)).unwrap();
        out.clear();
    }
    assert_eq!(seen.len(), 65_534, "every other id was used");
    assert_eq!(s.inflight().len(), 1);
}

#[test]
fn slow_consumer_drops_qos0() {
    let l = lim();
    let mut s = Session::new("c".into(), true, Timestamp(0));
    let mut out = Sink::Mqtt(bytes::BytesMut::from(&[0u8; 10][..]));
    let t = Timestamp(0);
    assert_eq!(
        s.deliver(
            &msg(1, QoS::AtMostOnce),
            QoS::AtMostOnce,
            false,
            t,
            &l,
            Some(Outbox::new(&mut out, 10))
        ),
        Delivery::DroppedSlowConsumer
    );
}

#[test]
fn session_state_serializes() {
    let l = lim();
    let mut s = Session::new("c".into(), false, Timestamp(0));
    s.subscriptions.insert("a/#".into(), QoS::ExactlyOnce);
    deliver(&mut s, 1, QoS::AtLeastOnce, Timestamp(0), &l, None);
    let json = serde_json::to_string(&s).unwrap();
    let back: Session = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}

#[test]
fn delivery_state_is_allocated_on_demand_and_freed_when_idle() {
    let l = lim();
    let mut s = Session::new("c".into(), false, Timestamp(0));
    let mut out = Sink::mqtt();
    // QoS 0 to a connected client needs no state.
    deliver(&mut s, 1, QoS::AtMostOnce, Timestamp(0), &l, Some(&mut out));
    assert!(s.flows.is_none());
    // A QoS 1 delivery waits for its PUBACK: state exists, and shrinking keeps it.
    deliver(
        &mut s,
        2,
        QoS::AtLeastOnce,
        Timestamp(0),
        &l,
        Some(&mut out),
    );
    let pid = s.inflight()[0].packet_id;
    s.shrink();
    assert_eq!(s.inflight().len(), 1, "shrink keeps pending deliveries");
    s.on_puback(pid, Timestamp(1), &l, Outbox::unlimited(&mut out))
        .unwrap();
    assert!(s.flows.is_some());
    s.shrink();
    assert!(s.flows.is_none(), "nothing pending: freed");
    // Packet ids keep counting after the state was freed.
    deliver(
        &mut s,
        3,
        QoS::AtLeastOnce,
        Timestamp(2),
        &l,
        Some(&mut out),
    );
    assert_eq!(s.inflight()[0].packet_id, pid + 1);
    // Inbound QoS 2 ids are state too.
    let mut s = Session::new("d".into(), false, Timestamp(0));
    assert_eq!(s.on_inbound_qos2(5, Timestamp(0), &l), Ok(true));
    s.shrink();
    assert_eq!(s.awaiting_rel().len(), 1);
    assert!(s.on_pubrel(5));
    s.shrink();
    assert!(s.flows.is_none());
}

#[test]
fn a_full_outbox_queues_qos1_and_drops_qos0_until_refilled() {
    let l = SessionLimits {
        max_inflight: 10,
        ..lim()
    };
    let t = Timestamp(0);
    let mut s = Session::new("c".into(), false, t);
    let mut out = Sink::mqtt();
    // Each PUBLISH of message n (one-digit payload) takes 8 bytes: room for two under 12.
    for n in 1..=3 {
        s.deliver(
            &msg(n, QoS::AtLeastOnce),
            QoS::AtLeastOnce,
            false,
            t,
            &l,
            Some(Outbox::new(&mut out, 12)),
        );
    }
    assert_eq!(s.inflight().len(), 2);
    assert_eq!(s.queue().len(), 1);
    assert!(
        s.wants_room(&l),
        "the window has room: only the outbox holds it back"
    );
    let written: Vec<_> = packets(&mut out).iter().map(publish).collect();
    assert_eq!(
        written,
        vec![(1, false, "1".into()), (2, false, "2".into())]
    );
    // The client read everything: the queue follows, in order.
    assert_eq!(s.refill(t, &l, Outbox::new(&mut out, 12)).total(), 1);
    assert_eq!(publish(&packets(&mut out)[0]), (3, false, "3".into()));
    assert!(!s.wants_room(&l));
    // QoS 0 to a full outbox is dropped, not queued.
    let mut full = Sink::Mqtt(bytes::BytesMut::from(&[0u8; 12][..]));
    assert_eq!(
        s.deliver(
            &msg(4, QoS::AtMostOnce),
            QoS::AtMostOnce,
            false,
            t,
            &l,
            Some(Outbox::new(&mut full, 12))
        ),
        Delivery::DroppedSlowConsumer
    );
    assert!(s.queue().is_empty());
}

#[test]
fn resume_resends_the_window_as_far_as_the_outbox_allows() {
    let l = SessionLimits {
        max_inflight: 10,
        ..lim()
    };
    let t = Timestamp(0);
    let mut s = Session::new("c".into(), false, t);
    for n in 1..=4 {
        deliver(&mut s, n, QoS::AtLeastOnce, t, &l, Some(&mut Sink::mqtt()));
    }
    deliver(&mut s, 5, QoS::AtLeastOnce, t, &l, None);
    assert_eq!((s.inflight().len(), s.queue().len()), (4, 1));
    // Reconnect with room for two resends.
    let mut out = Sink::mqtt();
    assert_eq!(
        s.resume(Timestamp(1), &l, Outbox::new(&mut out, 12))
            .total(),
        2
    );
    let resent: Vec<_> = packets(&mut out).iter().map(publish).collect();
    assert_eq!(resent, vec![(1, true, "1".into()), (2, true, "2".into())]);
    // A new delivery waits behind the resends still due.
    deliver(&mut s, 6, QoS::AtLeastOnce, t, &l, Some(&mut out));
    assert!(out.is_empty());
    // The client acknowledges 4 (from before the reconnect) and 1; retries skip unsent 3.
    s.on_puback(4, t, &l, Outbox::new(&mut out, 0)).unwrap();
    s.on_puback(1, t, &l, Outbox::new(&mut out, 0)).unwrap();
    assert!(out.is_empty());
    assert_eq!(
        s.next_deadline(true, &l),
        Some(Timestamp(1).after(Duration::from_secs(10))),
        "only the resent entry (2) has a retry"
    );
    // Room again: 3 is resent, then the queue drains in order.
    assert_eq!(s.refill(t, &l, Outbox::unlimited(&mut out)).total(), 3);
    let rest: Vec<_> = packets(&mut out).iter().map(publish).collect();
    assert_eq!(
        rest,
        vec![
            (3, true, "3".into()),
            (5, false, "5".into()),
            (6, false, "6".into())
        ]
    );
}

#[test]
fn a_retry_that_finds_the_outbox_full_waits_another_interval() {
    let l = lim();
    let mut s = Session::new("c".into(), false, Timestamp(0));
    deliver(
        &mut s,
        1,
        QoS::AtLeastOnce,
        Timestamp(0),
        &l,
        Some(&mut Sink::mqtt()),
    );
    let mut full = Sink::Mqtt(bytes::BytesMut::from(&[0u8; 4][..]));
    assert_eq!(
        s.on_timeout(Timestamp(10_000), &l, Some(Outbox::new(&mut full, 4))),
        (0, 0)
    );
    assert_eq!(full.len(), 4, "nothing written");
    assert_eq!(s.next_deadline(true, &l), Some(Timestamp(20_000)));
}

/// `mqtt.max_mqueue_bytes_total`: shards reserving at the same time never pass the cap
/// together, and a reservation settled by what was queued leaves the exact count.
#[test]
fn offline_reservations_never_pass_the_cap_together() {
    let q = std::sync::Arc::new(OfflineQueues::new(10 * 1024));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let q = q.clone();
            std::thread::spawn(move || (0..100).filter(|_| q.reserve(1024)).count())
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(admitted, 10);
    assert_eq!(q.bytes(), 10 * 1024);
    // A reservation whose message was not queued (QoS 0 offline) is given back.
    q.moved(10 * 1024, 9 * 1024);
    assert!(q.reserve(1024));
    assert!(!q.reserve(1));
}
