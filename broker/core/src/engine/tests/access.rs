//! The access rules on a simulated cluster: publish and subscribe denied and allowed (with
//! `%c`), with the publisher's client id owned by either shard; MQTT 3.1 clients and
//! `deny_action = disconnect`; a will the rules deny; new rules forgetting cached decisions.

use super::*;
use crate::acl::{Acl, Action, Pattern, Permission, Rule, Subject};

fn rules(rules: &[(Permission, Action, &[&str])], nomatch: Permission) -> Option<Arc<Acl>> {
    Some(Arc::new(Acl {
        rules: rules
            .iter()
            .map(|(permission, action, topics)| Rule {
                permission: *permission,
                action: *action,
                subject: Subject::All,
                topics: topics.iter().map(|t| Pattern::parse(t)).collect(),
            })
            .collect(),
        nomatch,
    }))
}

fn with_rules(cl: &mut Cluster, acl: Option<Arc<Acl>>) {
    for e in &mut cl.engines {
        e.set_acl(acl.clone());
    }
}

#[test]
fn publish_and_subscribe_follow_the_rules() {
    use Action::*;
    use Permission::*;
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        with_rules(
            &mut cl,
            rules(
                &[
                    (Deny, Subscribe, &["secret/#"]),
                    (Allow, Publish, &["devices/%c/#"]),
                    (Allow, Subscribe, &["devices/#", "secret"]),
                ],
                Deny,
            ),
        );
        let id = id_owned_by(&format!("acl{owner}-"), owner, 2);
        let sub = cl.connect(1, "watcher", true);
        assert_eq!(
            cl.subscribe(
                sub,
                &[
                    ("devices/#", QoS::AtLeastOnce),
                    ("secret/#", QoS::AtMostOnce),
                    ("other", QoS::AtMostOnce)
                ]
            ),
            vec![
                SubackCode::Granted(QoS::AtLeastOnce),
                SubackCode::Failure,
                SubackCode::Failure
            ]
        );
        let p = cl.connect(0, &id, true);
        cl.publish(
            p,
            &format!("devices/{id}/up"),
            "mine",
            QoS::AtLeastOnce,
            false,
            1,
        );
        assert_eq!(cl.recv(p), vec![Packet::Puback(1)]);
        cl.publish(
            p,
            "devices/someone-else/up",
            "theirs",
            QoS::AtLeastOnce,
            false,
            2,
        );
        assert_eq!(
            cl.recv(p),
            vec![Packet::Puback(2)],
            "denied, still acknowledged"
        );
        cl.publish(p, "devices/x/up", "qos2", QoS::ExactlyOnce, false, 3);
        assert_eq!(cl.recv(p), vec![Packet::Pubrec(3)]);
        cl.send(p, Packet::Pubrel(3));
        assert_eq!(cl.recv(p), vec![Packet::Pubcomp(3)]);
        let got = publishes(&cl.recv(sub));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1, "mine");
        assert!(!cl.closing(p));
        assert_eq!(cl.engines[0].metrics.acl_denied_publish, 2);
        assert_eq!(cl.engines[1].metrics.acl_denied_subscribe, 2);
    }
}

#[test]
fn denials_disconnect_31_clients_and_with_deny_action_disconnect() {
    let acl = rules(
        &[(Permission::Deny, Action::PubSub, &["no/#"])],
        Permission::Allow,
    );
    // MQTT 3.1 has no SUBACK failure code.
    let mut cl = Cluster::new(2);
    with_rules(&mut cl, acl.clone());
    let (c, _) = cl.connect_with(0, "old-client", true, ProtocolLevel::V31, None);
    cl.send(
        c,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("no/x".into(), QoS::AtMostOnce)],
        }),
    );
    assert!(cl.closing(c));
    // deny_action = disconnect, publish and subscribe.
    let mut cl = Cluster::with(2, |c| c.acl_deny_disconnect = true);
    with_rules(&mut cl, acl);
    let c = cl.connect(1, "strict-pub", true);
    cl.publish(c, "no/x", "x", QoS::AtLeastOnce, false, 1);
    assert!(cl.closing(c));
    let c = cl.connect(1, "strict-sub", true);
    cl.send(
        c,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![
                ("ok".into(), QoS::AtMostOnce),
                ("no/y".into(), QoS::AtMostOnce),
            ],
        }),
    );
    assert!(cl.closing(c));
}

#[test]
fn a_will_the_rules_deny_refuses_the_connect() {
    let mut cl = Cluster::new(2);
    with_rules(
        &mut cl,
        rules(
            &[(Permission::Deny, Action::Publish, &["t/will"])],
            Permission::Allow,
        ),
    );
    let (c, out) = cl.connect_with(1, "willing", true, ProtocolLevel::V311, will("t/will"));
    assert!(
        matches!(
            out.first(),
            Some(Packet::Connack(Connack {
                code: ConnectReturnCode::NotAuthorized,
                ..
            }))
        ),
        "{out:?}"
    );
    assert!(cl.closing(c));
    let (_, out) = cl.connect_with(1, "willing", true, ProtocolLevel::V311, will("t/other"));
    assert!(matches!(
        out.first(),
        Some(Packet::Connack(Connack {
            code: ConnectReturnCode::Accepted,
            ..
        }))
    ));
}

/// Decisions are cached per connection; new rules replace them at once.
#[test]
fn new_rules_forget_cached_decisions() {
    let mut cl = Cluster::new(1);
    let sub = cl.connect(0, "s", true);
    cl.subscribe(sub, &[("t", QoS::AtMostOnce)]);
    let p = cl.connect(0, "p", true);
    with_rules(
        &mut cl,
        rules(
            &[(Permission::Deny, Action::Publish, &["t"])],
            Permission::Allow,
        ),
    );
    cl.publish(p, "t", "1", QoS::AtMostOnce, false, 0);
    cl.publish(p, "t", "2", QoS::AtMostOnce, false, 0);
    assert!(publishes(&cl.recv(sub)).is_empty());
    with_rules(&mut cl, rules(&[], Permission::Allow));
    cl.publish(p, "t", "3", QoS::AtMostOnce, false, 0);
    assert_eq!(publishes(&cl.recv(sub)).len(), 1);
    with_rules(&mut cl, None);
    cl.publish(p, "t", "4", QoS::AtMostOnce, false, 0);
    assert_eq!(publishes(&cl.recv(sub)).len(), 1);
}
