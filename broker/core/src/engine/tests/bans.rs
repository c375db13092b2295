//! Bans and flapping detection in the engine: a client id's ban and its CONNECT count on its
//! owner shard, username and address bans on every shard, with the client id owned by the
//! connecting shard and by the other.

use super::*;
use crate::ban::{Ban, BanKind, FlappingPolicy};

fn refused(out: &[Packet]) -> bool {
    matches!(
        out.first(),
        Some(Packet::Connack(Connack {
            code: ConnectReturnCode::NotAuthorized,
            ..
        }))
    )
}

/// Connects `client_id` on `shard` with `username`; the packets that came back.
fn connect_as(
    cl: &mut Cluster,
    shard: usize,
    client_id: &str,
    username: Option<&str>,
) -> (Client, Vec<Packet>) {
    let c = cl.open(shard);
    cl.send(c, credentials_connect(client_id, username, None));
    let out = cl.recv(c);
    (c, out)
}

fn ban(kind: BanKind, who: &str, now: Timestamp, secs: u64) -> Ban {
    Ban {
        kind,
        who: who.into(),
        reason: "test".into(),
        by: "admin".into(),
        at: now,
        until: now.after(Duration::from_secs(secs)),
    }
}

/// As the runtime does: every shard is told, each keeps what is its own.
fn ban_everywhere(cl: &mut Cluster, b: Ban) -> usize {
    let now = cl.now;
    let closed = cl
        .engines
        .iter_mut()
        .map(|e| e.add_ban(b.clone(), now).unwrap())
        .sum();
    cl.settle();
    closed
}

#[test]
fn a_client_id_that_reconnects_too_often_is_banned_until_the_ban_ends() {
    for owner in 0..2 {
        let mut cl = Cluster::with(2, |c| {
            c.flapping = Some(FlappingPolicy {
                max_count: 3,
                window: Duration::from_secs(60),
                ban_time: Duration::from_secs(300),
            })
        });
        let id = id_owned_by(&format!("flap{owner}-"), owner, 2);
        for i in 0..3 {
            let c = cl.connect(i % 2, &id, true);
            cl.send(c, Packet::Disconnect);
            cl.drop_conn(c);
            cl.advance(Duration::from_secs(5));
        }
        let (_, out) = connect_as(&mut cl, 0, &id, None);
        assert!(
            refused(&out),
            "owner {owner}: the fourth within a minute: {out:?}"
        );
        assert_eq!(cl.engines[owner].metrics.flapping_bans, 1);
        assert_eq!(cl.engines[0].metrics.connects_banned, 1);
        let (_, out) = connect_as(&mut cl, 1, &id, None);
        assert!(refused(&out), "owner {owner}: banned from any shard");
        assert_eq!(cl.engines[owner].list_bans(cl.now).len(), 1);
        assert_eq!(
            cl.engines[1 - owner].list_bans(cl.now).len(),
            0,
            "kept by the owner"
        );
        // Another client id is not affected.
        cl.connect(0, &format!("{id}-other"), true);
        cl.advance(Duration::from_secs(301));
        assert!(cl.engines[owner].list_bans(cl.now).is_empty());
        cl.connect(1, &id, true);
    }
}

#[test]
fn a_banned_client_id_is_closed_and_refused_until_the_ban_is_lifted() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let id = id_owned_by(&format!("banned{owner}-"), owner, 2);
        let watcher = cl.connect(1, "ban-watcher", true);
        cl.subscribe(watcher, &[("will/#", QoS::AtMostOnce)]);
        let (c, _) = cl.connect_with(
            0,
            &id,
            false,
            ProtocolLevel::V311,
            Some(LastWill {
                topic: "will/b".into(),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::AtMostOnce,
                retain: false,
            }),
        );
        let now = cl.now;
        assert_eq!(
            ban_everywhere(&mut cl, ban(BanKind::ClientId, &id, now, 600)),
            1
        );
        assert!(
            cl.closing(c),
            "owner {owner}: the live connection is closed"
        );
        assert_eq!(
            publishes(&cl.recv(watcher)).len(),
            1,
            "its will is published"
        );
        let (_, out) = connect_as(&mut cl, 1, &id, None);
        assert!(refused(&out), "owner {owner}");
        let now = cl.now;
        let lifted: usize = cl
            .engines
            .iter_mut()
            .map(|e| usize::from(e.remove_ban(BanKind::ClientId, &id, now)))
            .sum();
        assert_eq!(lifted, 1, "one shard kept it");
        cl.connect(1, &id, false);
    }
}

#[test]
fn username_and_address_bans_apply_on_every_shard() {
    let mut cl = Cluster::new(2);
    let (alice, out) = connect_as(&mut cl, 1, "alice-1", Some("alice"));
    assert!(!refused(&out));
    let (bob, _) = connect_as(&mut cl, 0, "bob-1", Some("bob"));
    let now = cl.now;
    assert_eq!(
        ban_everywhere(&mut cl, ban(BanKind::Username, "alice", now, 60)),
        1
    );
    assert!(cl.closing(alice) && !cl.closing(bob));
    for shard in 0..2 {
        let (_, out) = connect_as(&mut cl, shard, &format!("alice-{shard}x"), Some("alice"));
        assert!(refused(&out), "shard {shard}");
    }
    // The clients connect from 127.0.0.1: a network ban takes every one still connected.
    let now = cl.now;
    assert_eq!(
        ban_everywhere(&mut cl, ban(BanKind::PeerHost, "127.0.0.0/8", now, 60)),
        1
    );
    assert!(cl.closing(bob));
    let (_, out) = connect_as(&mut cl, 0, "anyone", None);
    assert!(refused(&out));
    let now = cl.now;
    assert!(cl.engines[0]
        .add_ban(ban(BanKind::PeerHost, "no/such", now, 60), now)
        .is_err());
    // Both end on their own.
    cl.advance(Duration::from_secs(61));
    connect_as(&mut cl, 1, "alice-again", Some("alice"));
    let (_, out) = connect_as(&mut cl, 0, "anyone-again", None);
    assert!(!refused(&out));
    let banned: u64 = cl.engines.iter().map(|e| e.metrics.connects_banned).sum();
    assert_eq!(banned, 3);
}
