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
