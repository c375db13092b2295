//! Per-client limits in the engine: topic depth (`max_topic_levels`) for PUBLISH and
//! SUBSCRIBE, and subscriptions per session (`max_subscriptions`).

use super::*;

fn limited(levels: usize, subs: usize) -> Cluster {
    Cluster::with(2, |c| {
        c.max_topic_levels = levels;
        c.max_subscriptions = subs;
    })
}

#[test]
fn a_publish_deeper_than_max_topic_levels_closes_the_connection() {
    for owner in 0..2 {
        let mut cl = limited(3, 0);
        let id = id_owned_by(&format!("deep{owner}-"), owner, 2);
        let ok = cl.connect(0, &format!("{id}ok"), true);
        cl.publish(ok, "a/b/c", "x", QoS::AtLeastOnce, false, 1);
        assert_eq!(cl.recv(ok), vec![Packet::Puback(1)]);
        assert!(!cl.closing(ok));
        let c = cl.connect(0, &id, true);
        cl.publish(c, "a/b/c/d", "x", QoS::AtLeastOnce, false, 1);
        assert!(cl.closing(c), "owner {owner}");
        assert_eq!(cl.engines[0].metrics.topic_levels_exceeded, 1);
    }
}

#[test]
fn deep_filters_and_too_many_subscriptions_get_0x80() {
    let mut cl = limited(3, 2);
    let c = cl.connect(1, "subs", true);
    assert_eq!(
        cl.subscribe(
            c,
            &[("a/+/c", QoS::AtMostOnce), ("a/b/c/#", QoS::AtMostOnce)]
        ),
        vec![SubackCode::Granted(QoS::AtMostOnce), SubackCode::Failure]
    );
    assert_eq!(
        cl.subscribe(c, &[("x", QoS::AtLeastOnce), ("y", QoS::AtMostOnce)]),
        vec![SubackCode::Granted(QoS::AtLeastOnce), SubackCode::Failure],
        "the second subscription fills the session"
    );
    // Re-subscribing to a held filter is not a new one.
    assert_eq!(
        cl.subscribe(c, &[("x", QoS::AtMostOnce)]),
        vec![SubackCode::Granted(QoS::AtMostOnce)]
    );
    cl.send(
        c,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 9,
            filters: vec!["x".into()],
        }),
    );
    let _ = cl.recv(c);
    assert_eq!(
        cl.subscribe(c, &[("y", QoS::AtMostOnce)]),
        vec![SubackCode::Granted(QoS::AtMostOnce)]
    );
    assert_eq!(cl.engines[1].metrics.subscriptions_refused, 2);
    assert!(!cl.closing(c));
    // MQTT 3.1 has no failure code: disconnected.
    let (old, _) = cl.connect_with(0, "old", true, ProtocolLevel::V31, None);
    cl.send(
        old,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("a/b/c/d".into(), QoS::AtMostOnce)],
        }),
    );
    assert!(cl.closing(old));
}

/// `force_shutdown`: a subscriber that acknowledges nothing while a publisher floods is
/// disconnected once its queue passes the limit; another subscriber still gets every message.
#[test]
fn a_subscriber_that_falls_behind_is_shut_down() {
    for owner in 0..2 {
        let mut cl = Cluster::with(2, |c| {
            c.force_shutdown = Some((10, 1 << 20));
            c.limits.max_mqueue_len = 1000;
        });
        let slow = cl.connect(1, &id_owned_by(&format!("slow{owner}-"), owner, 2), true);
        cl.subscribe(slow, &[("t", QoS::AtLeastOnce)]);
        let fast = cl.connect(0, "fast", true);
        cl.subscribe(fast, &[("t", QoS::AtLeastOnce)]);
        let p = cl.connect(0, "pub", true);
        let mut got = 0;
        for i in 0..50u16 {
            cl.publish(p, "t", &format!("m{i}"), QoS::AtLeastOnce, false, i + 1);
            let _ = cl.recv(p);
            let out = cl.recv(fast);
            got += publishes(&out).len();
            ack_all(&mut cl, fast, &out);
        }
        assert_eq!(got, 50, "owner {owner}");
        assert!(cl.closing(slow), "owner {owner}");
        assert_eq!(cl.engines[1].metrics.force_shutdowns, 1);
        assert!(!cl.closing(fast));
    }
}
