//! The operator's requests on a simulated cluster: listings paged across shards, a client's
//! details, kicking (the client id owned by the shard holding the session, and by the other),
//! and publishing.

use super::*;
use crate::engine::admin::{ClientFilter, Page, PublishError, SubscriptionFilter, Window};

/// A whole listing as the admin layer pages it: shard after shard, `skip` carried over.
fn paged<T>(
    cl: &Cluster,
    page: usize,
    limit: usize,
    part: impl Fn(&Engine, Window) -> Page<T>,
) -> (usize, Vec<T>) {
    let mut skip = (page - 1) * limit;
    let mut items = Vec::new();
    let mut count = 0;
    for e in &cl.engines {
        let p = part(
            e,
            Window {
                skip,
                take: limit - items.len(),
            },
        );
        count += p.matched;
        skip = skip.saturating_sub(p.matched);
        items.extend(p.items);
    }
    (count, items)
}

#[test]
fn client_listing_pages_across_shards_and_filters() {
    let mut cl = Cluster::new(2);
    let mut ids = Vec::new();
    for i in 0..7 {
        let id = format!("dev-{i}");
        cl.connect(i % 2, &id, false);
        ids.push(id);
    }
    let other = cl.connect(1, "other", true);
    // dev-6 goes offline: its persistent session stays.
    let gone = cl.connect(0, "dev-6", false);
    cl.drop_conn(gone);
    let _ = other;

    let all = ClientFilter::default();
    let (count, first) = paged(&cl, 1, 3, |e, w| e.list_clients(&all, w));
    assert_eq!((count, first.len()), (8, 3));
    let mut seen: Vec<String> = Vec::new();
    for page in 1..=3 {
        let (_, items) = paged(&cl, page, 3, |e, w| e.list_clients(&all, w));
        seen.extend(items.into_iter().map(|c| c.clientid));
    }
    seen.sort();
    let mut want: Vec<String> = ids.clone();
    want.push("other".into());
    want.sort();
    assert_eq!(seen, want, "every client once, over the pages");

    let devs = ClientFilter {
        clientid_prefix: Some("dev-".into()),
        ..Default::default()
    };
    let (count, _) = paged(&cl, 1, 100, |e, w| e.list_clients(&devs, w));
    assert_eq!(count, 7);
    let offline = ClientFilter {
        connected: Some(false),
        ..Default::default()
    };
    let (count, items) = paged(&cl, 1, 100, |e, w| e.list_clients(&offline, w));
    assert_eq!(count, 1);
    assert_eq!(items[0].clientid, "dev-6");
    assert!(!items[0].connected && items[0].ipaddress.is_none());
    assert!(items[0].expires_at.is_some());
    let online = ClientFilter {
        connected: Some(true),
        ..Default::default()
    };
    let (count, items) = paged(&cl, 1, 100, |e, w| e.list_clients(&online, w));
    assert_eq!(count, 7);
    let c = items.iter().find(|c| c.clientid == "dev-1").unwrap();
    assert_eq!(
        (c.shard, c.proto_name, c.proto_ver, c.keepalive),
        (1, Some("MQTT"), Some(4), Some(10))
    );
    assert_eq!(c.ipaddress.as_deref(), Some("127.0.0.1"));
    assert!(c.expires_at.is_none());
    // Nobody here has a username.
    let named = ClientFilter {
        username_prefix: Some("a".into()),
        ..Default::default()
    };
    assert_eq!(paged(&cl, 1, 100, |e, w| e.list_clients(&named, w)).0, 0);
}

#[test]
fn details_subscriptions_and_routes_show_what_a_session_holds() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let id = id_owned_by("detail", owner, 2);
        let sub = cl.connect(0, &id, false);
        cl.subscribe(sub, &[("a/+", QoS::AtLeastOnce), ("b/#", QoS::AtMostOnce)]);
        let other = cl.connect(1, "other", true);
        cl.subscribe(other, &[("a/+", QoS::AtMostOnce)]);
        // Unacknowledged QoS 1 deliveries: 4 in flight (the window), 2 queued.
        let p = cl.connect(1, "pub", true);
        for i in 0..6 {
            cl.publish(p, "a/x", &format!("m{i}"), QoS::AtLeastOnce, false, i + 1);
        }
        let _ = cl.recv(sub);

        let holders: Vec<usize> = (0..2)
            .filter(|&s| cl.engines[s].client_detail(&id).is_some())
            .collect();
        assert_eq!(holders, vec![0], "the connection's shard holds the session");
        let d = cl.engines[0].client_detail(&id).unwrap();
        assert_eq!(d.info.subscriptions_cnt, 2);
        assert_eq!((d.info.inflight_cnt, d.info.mqueue_len), (4, 2));
        let subs: Vec<(&str, u8)> = d
            .subscriptions
            .iter()
            .map(|s| (s.topic.as_str(), s.qos))
            .collect();
        assert_eq!(subs, vec![("a/+", 1), ("b/#", 0)]);

        let mine = SubscriptionFilter {
            clientid: Some(id.clone()),
            topic: None,
        };
        let (count, _) = paged(&cl, 1, 10, |e, w| e.list_subscriptions(&mine, w));
        assert_eq!(count, 2);
        let on_a = SubscriptionFilter {
            clientid: None,
            topic: Some("a/+".into()),
        };
        let (count, items) = paged(&cl, 1, 10, |e, w| e.list_subscriptions(&on_a, w));
        assert_eq!(count, 2);
        let mut who: Vec<(String, usize)> =
            items.into_iter().map(|s| (s.clientid, s.shard)).collect();
        who.sort();
        let mut want = vec![(id.clone(), 0), ("other".to_string(), 1)];
        want.sort();
        assert_eq!(who, want);

        let (count, routes) = paged(&cl, 1, 10, |e, w| e.list_routes(None, w));
        assert_eq!(count, 3, "a/+ on both shards, b/# on shard 0: {routes:?}");
        let (count, routes) = paged(&cl, 1, 10, |e, w| e.list_routes(Some("b/#"), w));
        assert_eq!((count, routes[0].shard), (1, 0));
        // Paging by one.
        let (_, second) = paged(&cl, 2, 1, |e, w| e.list_routes(None, w));
        assert_eq!(second.len(), 1);
    }
}

/// Kicking ends the connection (will published, reason `kicked`) and the session, persistent
/// or not, wherever the client id is owned; the id is free again.
#[test]
fn kick_ends_the_connection_and_the_session() {
    for owner in 0..2 {
        for clean in [true, false] {
            let mut cl = Cluster::with(2, |c| c.client_events = true);
            let watcher = cl.connect(1, "watcher", true);
            cl.subscribe(
                watcher,
                &[
                    ("will/#", QoS::AtLeastOnce),
                    ("$SYS/broker/clients/+/disconnected", QoS::AtMostOnce),
                ],
            );
            let _ = cl.recv(watcher);
            let id = id_owned_by(&format!("kick{}", u8::from(clean)), owner, 2);
            let (c, out) = cl.connect_with(0, &id, clean, ProtocolLevel::V311, will("will/x"));
            assert!(matches!(out.first(), Some(Packet::Connack(_))));
            cl.subscribe(c, &[("t", QoS::AtLeastOnce)]);
            let _ = cl.recv(watcher);

            let now = cl.now;
            let kicked: Vec<bool> = cl.engines.iter_mut().map(|e| e.kick(&id, now)).collect();
            assert_eq!(kicked, vec![true, false], "owner {owner}, clean {clean}");
            cl.settle();
            assert!(cl.closing(c));
            let got = publishes(&cl.recv(watcher));
            assert!(
                got.iter().any(|(t, b, _, _)| t == "will/x" && b == "gone"),
                "{got:?}"
            );
            assert!(
                got.iter()
                    .any(|(t, b, _, _)| t.ends_with("/disconnected") && b.contains("\"kicked\"")),
                "{got:?}"
            );
            for e in &cl.engines {
                assert!(e.client_detail(&id).is_none());
                assert!(!e.registry.contains_key(&ByteStr::from(id.as_str())));
            }
            assert_eq!(cl.engines[0].local_filter_count(), 0, "its routes are gone");
            // A second kick finds nobody; the id connects afresh.
            assert!(cl.engines.iter_mut().all(|e| !e.kick(&id, now)));
            let (_, out) = cl.connect_with(1, &id, false, ProtocolLevel::V311, None);
            assert!(
                matches!(
                    out.first(),
                    Some(Packet::Connack(Connack {
                        session_present: false,
                        code: ConnectReturnCode::Accepted
                    }))
                ),
                "{out:?}"
            );
            assert_eq!(cl.engines[0].metrics.clients_kicked, 1);
        }
    }
}

/// An offline persistent session is discarded by a kick, with no event (nobody was
/// connected); what it queued goes with it.
#[test]
fn kick_discards_an_offline_session() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let id = id_owned_by("offline", owner, 2);
        let c = cl.connect(1, &id, false);
        cl.subscribe(c, &[("t", QoS::AtLeastOnce)]);
        cl.drop_conn(c);
        let p = cl.connect(0, "pub", true);
        cl.publish(p, "t", "queued", QoS::AtLeastOnce, false, 1);
        assert_eq!(cl.engines[1].session_queue_len(&id), 1);
        let now = cl.now;
        assert!(cl.engines[1].kick(&id, now));
        cl.settle();
        assert_eq!(cl.engines[1].session_count(), 0);
        let (c, out) = cl.connect_with(0, &id, false, ProtocolLevel::V311, None);
        assert!(
            matches!(
                out.first(),
                Some(Packet::Connack(Connack {
                    session_present: false,
                    ..
                }))
            ),
            "{out:?}"
        );
        assert!(publishes(&cl.recv(c)).is_empty());
    }
}

#[test]
fn the_operator_publishes_like_a_client() {
    let mut cl = Cluster::new(2);
    let sub = cl.connect(1, "sub", true);
    cl.subscribe(sub, &[("cmd/#", QoS::AtLeastOnce)]);
    let now = cl.now;
    cl.engines[0]
        .publish_admin(
            "cmd/a",
            Bytes::from_static(b"on"),
            QoS::AtLeastOnce,
            false,
            now,
        )
        .unwrap();
    cl.engines[0]
        .publish_admin(
            "cmd/r",
            Bytes::from_static(b"kept"),
            QoS::AtMostOnce,
            true,
            now,
        )
        .unwrap();
    cl.settle();
    let got = publishes(&cl.recv(sub));
    assert_eq!(
        got,
        vec![
            ("cmd/a".into(), "on".into(), QoS::AtLeastOnce, false),
            ("cmd/r".into(), "kept".into(), QoS::AtMostOnce, false)
        ]
    );
    let m = &cl.engines[1].metrics;
    assert_eq!(
        (
            m.messages_sent,
            m.messages_qos0_sent,
            m.messages_qos1_sent,
            m.messages_qos2_sent
        ),
        (2, 1, 1, 0)
    );
    cl.send(sub, Packet::Puback(1));
    assert_eq!(cl.engines[1].metrics.messages_acked, 1);
    // Retained: a later subscriber on the other shard gets it.
    let late = cl.connect(0, "late", true);
    cl.send(
        late,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("cmd/r".into(), QoS::AtMostOnce)],
        }),
    );
    let got = publishes(&cl.recv(late));
    assert_eq!(
        got,
        vec![("cmd/r".into(), "kept".into(), QoS::AtMostOnce, true)]
    );
    assert_eq!(cl.engines[0].metrics.admin_published, 2);
    assert_eq!(cl.engines[0].metrics.messages_qos1_received, 1);

    let e = &mut cl.engines[0];
    let b = || Bytes::from_static(b"x");
    assert_eq!(
        e.publish_admin("$SYS/broker/x", b(), QoS::AtMostOnce, false, now),
        Err(PublishError::SysTopic)
    );
    assert!(matches!(
        e.publish_admin("a/+", b(), QoS::AtMostOnce, false, now),
        Err(PublishError::InvalidTopic(_))
    ));
    assert!(matches!(
        e.publish_admin("", b(), QoS::AtMostOnce, false, now),
        Err(PublishError::InvalidTopic(_))
    ));
    let big = Bytes::from(vec![0u8; 1 << 20]);
    assert!(matches!(
        e.publish_admin("t", big, QoS::AtMostOnce, false, now),
        Err(PublishError::TooLarge(_))
    ));
}

/// A kick that lands while another connection takes the client id over: whichever comes
/// first, the new connection is accepted, nothing is left half-registered, and the id can be
/// kicked and connected again.
#[test]
fn kick_racing_a_takeover_leaves_the_registry_sound() {
    for owner in 0..2 {
        for new_shard in 0..2 {
            let mut cl = Cluster::new(2);
            let id = id_owned_by(&format!("race{new_shard}"), owner, 2);
            let old = cl.connect(0, &id, false);
            cl.subscribe(old, &[("t", QoS::AtLeastOnce)]);
            let new = cl.open(new_shard);
            cl.connect_unsettled(new, &id, false, 10);
            // The takeover is on the wires; the operator kicks meanwhile.
            let now = cl.now;
            let kicked = cl
                .engines
                .iter_mut()
                .map(|e| e.kick(&id, now))
                .filter(|&k| k)
                .count();
            assert_eq!(kicked, 1, "owner {owner}, new on {new_shard}");
            cl.settle();
            let out = cl.recv(new);
            assert!(cl.closing(old));
            let holders = (0..2)
                .filter(|&s| cl.engines[s].client_detail(&id).is_some())
                .count();
            if cl.closing(new) {
                // The takeover finished first (all on one shard): the kick ended the new
                // connection and its session.
                assert_eq!(holders, 0, "owner {owner}, new on {new_shard}: {out:?}");
            } else {
                // The kick came first: the new connection starts afresh.
                assert!(
                    matches!(
                        out.first(),
                        Some(Packet::Connack(Connack {
                            code: ConnectReturnCode::Accepted,
                            session_present: false
                        }))
                    ),
                    "owner {owner}, new on {new_shard}: {out:?}"
                );
                assert_eq!(holders, 1);
                let now = cl.now;
                let kicked: Vec<bool> = cl.engines.iter_mut().map(|e| e.kick(&id, now)).collect();
                assert_eq!(kicked.iter().filter(|&&k| k).count(), 1);
                cl.settle();
            }
            // The id works as usual afterwards.
            cl.connect(1 - new_shard, &id, false);
            for e in &cl.engines {
                assert!(e.reg_waiting.is_empty());
            }
        }
    }
}
