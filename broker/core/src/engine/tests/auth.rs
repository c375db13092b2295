//! Authentication in the engine: anonymous clients by policy, credentials handed to the
//! runtime and the CONNECT resumed or refused by its answer — with the client id owned by the
//! accepting shard and by the other — and connections that go away while checked.

use super::*;
use crate::auth::{Anonymous, AuthOutcome, AuthPolicy};

fn checked(anonymous: Anonymous) -> Cluster {
    Cluster::with(2, |c| {
        c.auth = AuthPolicy {
            anonymous,
            verify_credentials: true,
        }
    })
}

fn connack(out: &[Packet]) -> Option<ConnectReturnCode> {
    out.iter().find_map(|p| match p {
        Packet::Connack(c) => Some(c.code),
        _ => None,
    })
}

#[test]
fn credentials_wait_for_the_check_and_its_answer_decides() {
    for owner in 0..2 {
        for (outcome, want) in [
            (AuthOutcome::Allow, ConnectReturnCode::Accepted),
            (
                AuthOutcome::BadCredentials,
                ConnectReturnCode::BadUsernameOrPassword,
            ),
            (AuthOutcome::NotAuthorized, ConnectReturnCode::NotAuthorized),
        ] {
            let mut cl = checked(Anonymous::Deny);
            let id = id_owned_by(&format!("auth{owner}"), owner, 2);
            let c = cl.open(0);
            cl.send(c, credentials_connect(&id, Some("alice"), Some("pw")));
            assert!(cl.recv(c).is_empty(), "no CONNACK before the check");
            let status = cl.engines[0].conn_status(c.id).unwrap();
            assert!(!status.readable, "not read while checked");
            let reqs = cl.engines[0].take_auth_requests();
            assert_eq!(reqs.len(), 1);
            let r = &reqs[0];
            assert_eq!(
                (
                    r.client_id.as_str(),
                    r.username.as_deref(),
                    r.password.as_deref()
                ),
                (id.as_str(), Some("alice"), Some(&b"pw"[..]))
            );
            assert!(cl.engines[0].take_auth_requests().is_empty());
            let now = cl.now;
            cl.engines[0].auth_done(c.id, outcome, now);
            cl.settle();
            assert_eq!(
                connack(&cl.recv(c)),
                Some(want),
                "owner {owner}, {outcome:?}"
            );
            assert_eq!(cl.closing(c), outcome != AuthOutcome::Allow);
            if outcome == AuthOutcome::Allow {
                assert_eq!(cl.engines[0].metrics.auth_succeeded, 1);
                assert_eq!(
                    cl.engines[0]
                        .client_detail(&id)
                        .unwrap()
                        .info
                        .username
                        .as_deref(),
                    Some("alice")
                );
            } else {
                assert_eq!(cl.engines[0].metrics.auth_refused, 1);
            }
        }
    }
}

#[test]
fn anonymous_clients_follow_the_policy() {
    let remote: SocketAddr = "10.0.0.7:5000".parse().unwrap();
    for (anonymous, from_remote, want) in [
        (Anonymous::Loopback, false, ConnectReturnCode::Accepted),
        (Anonymous::Loopback, true, ConnectReturnCode::NotAuthorized),
        (Anonymous::Deny, false, ConnectReturnCode::NotAuthorized),
        (Anonymous::Allow, true, ConnectReturnCode::Accepted),
    ] {
        let mut cl = checked(anonymous);
        let now = cl.now;
        let id = if from_remote {
            cl.engines[1].open_conn(remote, 0, now)
        } else {
            cl.engines[1].open_conn(peer(), 0, now)
        };
        let c = Client { shard: 1, id };
        cl.send(c, credentials_connect("anon", None, None));
        assert_eq!(
            connack(&cl.recv(c)),
            Some(want),
            "{anonymous:?} remote={from_remote}"
        );
        assert!(
            cl.engines[1].take_auth_requests().is_empty(),
            "nothing to check"
        );
    }
    // Without a backend, credentials cannot be checked: their client is anonymous.
    let mut cl = Cluster::with(2, |c| {
        c.auth = AuthPolicy {
            anonymous: Anonymous::Loopback,
            verify_credentials: false,
        }
    });
    let now = cl.now;
    let c = Client {
        shard: 0,
        id: cl.engines[0].open_conn(remote, 0, now),
    };
    cl.send(c, credentials_connect("creds", Some("alice"), Some("pw")));
    assert_eq!(connack(&cl.recv(c)), Some(ConnectReturnCode::NotAuthorized));
}

#[test]
fn a_connection_gone_during_the_check_is_forgotten() {
    let mut cl = checked(Anonymous::Deny);
    let c = cl.open(1);
    cl.send(c, credentials_connect("gone", Some("bob"), Some("pw")));
    let reqs = cl.engines[1].take_auth_requests();
    cl.drop_conn(c);
    assert!(cl.engines[1].pending_auth.is_empty());
    let now = cl.now;
    cl.engines[1].auth_done(reqs[0].conn, AuthOutcome::Allow, now);
    cl.settle();
    assert_eq!(cl.engines[1].session_count(), 0);
    assert!(cl.engines.iter().all(|e| e.registry.is_empty()));
    // A slot reused by a new connection is not confused with the old one.
    let d = cl.open(1);
    cl.send(d, credentials_connect("next", Some("bob"), Some("pw")));
    let now = cl.now;
    cl.engines[1].auth_done(reqs[0].conn, AuthOutcome::Allow, now);
    assert!(
        cl.recv(d).is_empty(),
        "the old answer is not the new connection's"
    );
    let reqs = cl.engines[1].take_auth_requests();
    cl.engines[1].auth_done(reqs[0].conn, AuthOutcome::Allow, now);
    cl.settle();
    assert_eq!(connack(&cl.recv(d)), Some(ConnectReturnCode::Accepted));
}

/// A CONNECT waiting for its check is still bound by `idle_timeout`.
#[test]
fn a_check_that_never_answers_times_out() {
    let mut cl = checked(Anonymous::Deny);
    let c = cl.open(0);
    cl.send(c, credentials_connect("slow", Some("bob"), Some("pw")));
    cl.advance(Duration::from_secs(16));
    assert!(cl.closing(c));
}
