//! Authentication against a real broker: anonymous clients by `auth.allow_anonymous`, a
//! password file (written by `shardmq passwd`'s code and by the real `mosquitto_passwd`),
//! the CONNACK codes of 3.1.1, client ids owned by either shard, an independent client
//! (rumqttc), and reloading the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use shardmq::auth::password::set_user;
use shardmq::config::AllowAnonymous;
use shardmq::protocol::mqtt::{Connect, ConnectReturnCode, ProtocolLevel};
use std::path::PathBuf;

fn with_credentials(client_id: &str, user: Option<&str>, password: Option<&str>) -> Connect {
    Connect {
        level: ProtocolLevel::V311,
        client_id: client_id.into(),
        clean_session: true,
        keep_alive: 30,
        will: None,
        username: user.map(str::to_string),
        password: password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes())),
    }
}

fn code(
    b: &Broker,
    client_id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> ConnectReturnCode {
    let (mut c, ack) = Raw::connect_full(b.addr, with_credentials(client_id, user, password));
    if ack.code != ConnectReturnCode::Accepted {
        // Refused: the broker closes the connection after its CONNACK.
        c.expect_closed();
    }
    ack.code
}

fn broker_with(passwd: Option<PathBuf>, anonymous: AllowAnonymous) -> Broker {
    let mut cfg = config(2);
    cfg.auth.password_file = passwd;
    cfg.auth.allow_anonymous = anonymous;
    Broker::start(cfg)
}

#[test]
fn passwords_are_checked_wherever_the_client_id_is_owned() {
    let dir = temp_dir("auth-check");
    let file = dir.join("passwd");
    set_user(&file, "alice", Some("wonderland")).unwrap();
    set_user(&file, "bob", Some("builder-1")).unwrap();
    let b = broker_with(Some(file), AllowAnonymous::False);
    let shards = b.handle().shards().len();
    for owner in 0..shards {
        let id = |p: &str| id_owned_by(&format!("{p}-{owner}-"), owner, shards);
        assert_eq!(
            code(&b, &id("good"), Some("alice"), Some("wonderland")),
            ConnectReturnCode::Accepted
        );
        assert_eq!(
            code(&b, &id("bob"), Some("bob"), Some("builder-1")),
            ConnectReturnCode::Accepted
        );
        assert_eq!(
            code(&b, &id("wrong"), Some("alice"), Some("Wonderland")),
            ConnectReturnCode::BadUsernameOrPassword
        );
        assert_eq!(
            code(&b, &id("nobody"), Some("mallory"), Some("x")),
            ConnectReturnCode::BadUsernameOrPassword
        );
        assert_eq!(
            code(&b, &id("nopass"), Some("alice"), None),
            ConnectReturnCode::BadUsernameOrPassword
        );
        assert_eq!(
            code(&b, &id("anon"), None, None),
            ConnectReturnCode::NotAuthorized
        );
    }
    b.wait_metrics("auth counted", |m| {
        m.auth_succeeded >= 2 && m.auth_refused >= 8
    });
    // The connection's username is the one checked.
    let _c = Raw::connect_full(
        b.addr,
        with_credentials("shown", Some("alice"), Some("wonderland")),
    );
    let v = http(
        b.handle().admin_addr().unwrap(),
        "GET",
        "/api/v1/clients/shown",
        &[],
        "",
    )
    .json();
    assert_eq!(v["username"], "alice");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn anonymous_clients_on_loopback_by_default_and_never_when_refused() {
    let b = broker_with(None, AllowAnonymous::Loopback);
    assert_eq!(code(&b, "anon-lo", None, None), ConnectReturnCode::Accepted);
    // No password file: credentials cannot be checked; on loopback the client is let in.
    assert_eq!(
        code(&b, "creds-lo", Some("x"), Some("y")),
        ConnectReturnCode::Accepted
    );
    drop(b);
    let b = broker_with(None, AllowAnonymous::False);
    assert_eq!(
        code(&b, "anon-no", None, None),
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        code(&b, "creds-no", Some("x"), Some("y")),
        ConnectReturnCode::NotAuthorized
    );
}

/// A file written by Mosquitto's own tool works as it is.
#[test]
fn a_mosquitto_passwd_file_works() {
    let dir = temp_dir("auth-mosquitto");
    let file = dir.join("passwd");
    std::fs::write(&file, "").unwrap();
    let status = std::process::Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(&file)
        .args(["carol", "from-mosquitto"])
        .status()
        .expect("mosquitto_passwd (package mosquitto) is installed: scripts/install-test-deps.sh");
    assert!(status.success());
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains("carol:$7$"));
    let b = broker_with(Some(file), AllowAnonymous::False);
    assert_eq!(
        code(&b, "m1", Some("carol"), Some("from-mosquitto")),
        ConnectReturnCode::Accepted
    );
    assert_eq!(
        code(&b, "m2", Some("carol"), Some("from-mosquittO")),
        ConnectReturnCode::BadUsernameOrPassword
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A reload reads the file again: a changed password works at once, the old one no longer
/// (the cache of successes is dropped); a broken file keeps what was loaded.
#[test]
fn reload_reads_the_file_again() {
    let dir = temp_dir("auth-reload");
    let file = dir.join("passwd");
    set_user(&file, "dave", Some("first-pass")).unwrap();
    let b = broker_with(Some(file.clone()), AllowAnonymous::False);
    assert_eq!(
        code(&b, "r1", Some("dave"), Some("first-pass")),
        ConnectReturnCode::Accepted
    );
    set_user(&file, "dave", Some("second-pass")).unwrap();
    // Not yet reloaded: the old password still works (and is cached).
    assert_eq!(
        code(&b, "r2", Some("dave"), Some("first-pass")),
        ConnectReturnCode::Accepted
    );
    b.handle().reload_auth().unwrap();
    assert_eq!(
        code(&b, "r3", Some("dave"), Some("first-pass")),
        ConnectReturnCode::BadUsernameOrPassword
    );
    assert_eq!(
        code(&b, "r4", Some("dave"), Some("second-pass")),
        ConnectReturnCode::Accepted
    );
    // Through the admin API, with a broken file: refused, the users stay.
    std::fs::write(&file, "dave:plaintext\n").unwrap();
    let r = b.reload_over_api();
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("line 1"));
    assert_eq!(
        code(&b, "r5", Some("dave"), Some("second-pass")),
        ConnectReturnCode::Accepted
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unreadable_password_file_stops_the_start() {
    let mut cfg = config(1);
    cfg.auth.password_file = Some("/nonexistent/shardmq-passwd".into());
    let err = shardmq::shard::start(&cfg)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("auth.password_file") && err.contains("/nonexistent/shardmq-passwd"),
        "{err}"
    );
}

/// rumqttc, an independent client, with and without the right password.
#[test]
fn rumqttc_connects_with_credentials() {
    let dir = temp_dir("auth-rumqttc");
    let file = dir.join("passwd");
    set_user(&file, "erin", Some("rumqttc-pass")).unwrap();
    let b = broker_with(Some(file), AllowAnonymous::False);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let attempt = |password: &str| -> Result<rumqttc::ConnectReturnCode, String> {
        let mut o = rumqttc::MqttOptions::new("rumqttc-auth", "127.0.0.1", b.addr.port());
        o.set_credentials("erin", password);
        let (_client, mut ev) = rumqttc::AsyncClient::new(o, 10);
        rt.block_on(async {
            let polled = tokio::time::timeout(WAIT, ev.poll())
                .await
                .map_err(|e| e.to_string())?;
            match polled {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => Ok(a.code),
                Ok(other) => Err(format!("{other:?}")),
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => Ok(code),
                Err(e) => Err(e.to_string()),
            }
        })
    };
    assert_eq!(
        attempt("rumqttc-pass"),
        Ok(rumqttc::ConnectReturnCode::Success)
    );
    assert_eq!(
        attempt("nope"),
        Ok(rumqttc::ConnectReturnCode::BadUserNamePassword)
    );
    let _ = std::fs::remove_dir_all(dir);
}
