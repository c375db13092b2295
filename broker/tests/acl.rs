//! The ACL file against a real broker: the documented rule shape, SUBACK 0x80 for a denied
//! filter, denied publishes acknowledged and not delivered, placeholders with a username from
//! the password file, a `$SYS/` publish refused whatever the rules say, and a reload through
//! the admin API changing decisions on every shard.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use shardmq::auth::password::set_user;
use shardmq::protocol::mqtt::{Connect, Packet, ProtocolLevel, QoS, SubackCode};
use std::time::Duration;

const RULES: &str = r##"
[[rule]]
permission = "deny"
action = "subscribe"
topics = ["test/nosubscribe"]

[[rule]]
permission = "allow"
action = "pubsub"
topics = ["users/%u/#"]

[[rule]]
permission = "allow"
action = "publish"
topics = ["#"]
user = "admin"

[[rule]]
permission = "deny"
action = "pubsub"
topics = ["users/#"]

[[rule]]
permission = "deny"
action = "publish"
topics = ["locked/#"]
"##;

fn login(b: &Broker, client_id: &str, user: &str, password: &str) -> Raw {
    let (r, ack) = Raw::connect_full(
        b.addr,
        Connect {
            level: ProtocolLevel::V311,
            client_id: client_id.into(),
            clean_session: true,
            keep_alive: 30,
            will: None,
            username: Some(user.into()),
            password: Some(bytes::Bytes::copy_from_slice(password.as_bytes())),
        },
    );
    assert_eq!(
        ack.code,
        shardmq::protocol::mqtt::ConnectReturnCode::Accepted
    );
    r
}

#[test]
fn the_rules_decide_on_every_shard_and_reload() {
    let dir = temp_dir("acl-rules");
    let passwd = dir.join("passwd");
    set_user(&passwd, "alice", Some("alice-pass")).unwrap();
    set_user(&passwd, "admin", Some("admin-pass")).unwrap();
    let acl = dir.join("acl.toml");
    std::fs::write(&acl, RULES).unwrap();
    let mut cfg = config(2);
    cfg.auth.password_file = Some(passwd);
    cfg.auth.acl_file = Some(acl.clone());
    let b = Broker::start(cfg);
    let shards = b.handle().shards().len();

    for owner in 0..shards {
        let id = |p: &str| id_owned_by(&format!("{p}-{owner}-"), owner, shards);
        let mut alice = login(&b, &id("alice"), "alice", "alice-pass");
        let (ack, _) = alice.subscribe(&[
            ("users/alice/#", QoS::AtLeastOnce),
            ("test/nosubscribe", QoS::AtMostOnce),
            ("users/bob/#", QoS::AtMostOnce),
            ("public/#", QoS::AtMostOnce),
        ]);
        assert_eq!(
            ack.codes,
            vec![
                SubackCode::Granted(QoS::AtLeastOnce),
                SubackCode::Failure,
                SubackCode::Failure,
                SubackCode::Granted(QoS::AtMostOnce),
            ],
            "owner {owner}"
        );
        // Anonymous (loopback) publisher: may not publish under users/ or locked/.
        let mut anon = Raw::ok(b.addr, &id("anon"));
        anon.publish("users/alice/inbox", b"sneaky", QoS::AtLeastOnce, false, 1);
        assert_eq!(
            anon.recv(),
            Some(Packet::Puback(1)),
            "acknowledged though denied"
        );
        anon.publish("public/news", b"hello", QoS::AtLeastOnce, false, 2);
        assert_eq!(anon.recv(), Some(Packet::Puback(2)));
        let p = alice.next_publish();
        assert_eq!((&*p.topic, &p.payload[..]), ("public/news", &b"hello"[..]));
        // The admin user may publish anywhere, into alice's tree too.
        let mut admin = login(&b, &id("admin"), "admin", "admin-pass");
        admin.publish(
            "users/alice/inbox",
            b"from admin",
            QoS::AtLeastOnce,
            false,
            1,
        );
        assert_eq!(admin.recv(), Some(Packet::Puback(1)));
        let p = alice.next_publish();
        assert_eq!(&p.payload[..], b"from admin");
        alice.send(&Packet::Puback(p.packet_id));
        // Never into $SYS/, whatever the rules say.
        admin.publish("$SYS/broker/x", b"0", QoS::AtLeastOnce, false, 2);
        assert_eq!(admin.recv(), Some(Packet::Puback(2)));
        alice.expect_silence(Duration::from_millis(100));
    }
    b.wait_metrics("denials counted", |m| {
        m.acl_denied_publish >= 2 && m.acl_denied_subscribe >= 4 && m.sys_publish_denied >= 2
    });

    // New rules: locked/ opens, public/ closes; read by every shard at once.
    std::fs::write(
        &acl,
        "[[rule]]\npermission = \"deny\"\naction = \"publish\"\ntopics = [\"public/#\"]\n",
    )
    .unwrap();
    let r = b.reload_over_api();
    assert_eq!(r.status, 200, "{}", r.text());
    for owner in 0..shards {
        let id = |p: &str| id_owned_by(&format!("{p}-re{owner}-"), owner, shards);
        let mut s = Raw::ok(b.addr, &id("sub"));
        s.subscribe(&[("public/#", QoS::AtMostOnce), ("locked/#", QoS::AtMostOnce)]);
        let mut p = Raw::ok(b.addr, &id("pub"));
        p.publish("public/x", b"closed", QoS::AtLeastOnce, false, 1);
        assert_eq!(p.recv(), Some(Packet::Puback(1)));
        p.publish("locked/x", b"open", QoS::AtLeastOnce, false, 2);
        assert_eq!(p.recv(), Some(Packet::Puback(2)));
        let got = s.next_publish();
        assert_eq!(&got.payload[..], b"open", "owner {owner}");
    }
    // A broken file is refused; the rules stay.
    std::fs::write(&acl, "[[rule]]\npermission = \"perhaps\"\n").unwrap();
    let r = b.reload_over_api();
    assert_eq!(r.status, 422);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_broken_acl_file_stops_the_start_naming_the_rule() {
    let dir = temp_dir("acl-broken");
    let acl = dir.join("acl.toml");
    std::fs::write(
        &acl,
        "[[rule]]\npermission = \"allow\"\naction = \"publish\"\ntopics = [\"a\"]\n[[rule]]\npermission = \"allow\"\naction = \"write\"\ntopics = [\"a\"]\n",
    )
    .unwrap();
    let mut cfg = config(1);
    cfg.auth.acl_file = Some(acl);
    let err = shardmq::shard::start(&cfg)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("auth.acl_file") && err.contains("rule 2"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
