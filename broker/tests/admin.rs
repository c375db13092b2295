//! The admin API against a real broker with two shards, over plain HTTP/1.1 bytes: every
//! endpoint, its errors, kicking a client whose id is owned by the shard it connected to and
//! by the other, the Prometheus exposition read by a parser, and access control.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use shardmq::protocol::mqtt::{Packet, ProtocolLevel, QoS};
use std::net::SocketAddr;

fn admin(b: &Broker) -> SocketAddr {
    b.handle().admin_addr().expect("the admin API runs")
}

fn get(b: &Broker, path: &str) -> HttpReply {
    http(admin(b), "GET", path, &[], "")
}

/// Waits until the stats board shows what `ok` wants (it is at most 100 ms old).
fn until(b: &Broker, path: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = get(b, path).json();
        if ok(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{path}: {v}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn status_stats_and_metrics_describe_the_broker() {
    let b = Broker::with_shards(2);
    let r = get(&b, "/api/v1/status");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["status"], "running");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["shards"], b.handle().shards().len());
    assert!(v["node"].as_str().unwrap().contains('@'));

    let mut p = Raw::ok(b.addr, "stats-pub");
    let mut s = Raw::ok(b.addr, "stats-sub");
    s.subscribe(&[("stats/#", QoS::AtLeastOnce)]);
    for n in 1..=5u16 {
        p.publish("stats/x", b"m", QoS::AtLeastOnce, false, n);
        assert_eq!(p.recv(), Some(Packet::Puback(n)));
    }
    let stats = until(&b, "/api/v1/stats", |v| v["connections.count"] == 2);
    assert_eq!(stats["subscriptions.count"], 1);
    assert_eq!(stats["topics.count"], 1);
    assert!(stats["connections.max"].as_u64().unwrap() >= 2);
    assert_eq!(
        stats["shards"].as_array().unwrap().len(),
        b.handle().shards().len()
    );
    let m = until(&b, "/api/v1/metrics", |v| {
        v["messages_qos1_received"].as_u64() >= Some(5)
    });
    assert!(m["packets_publish_received"].as_u64().unwrap() >= 5);
    let per_shard: u64 = (0..b.handle().shards().len())
        .map(|n| {
            get(&b, &format!("/api/v1/metrics?shard={n}")).json()["connections_accepted"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(per_shard, 2);
    assert_eq!(get(&b, "/api/v1/metrics?shard=99").status, 404);
    assert_eq!(get(&b, "/api/v1/metrics?shard=x").status, 400);
}

#[test]
fn clients_are_listed_paged_and_shown_wherever_their_id_is_owned() {
    let b = Broker::with_shards(2);
    let shards = b.handle().shards().len();
    let mut held = Vec::new();
    let mut ids = Vec::new();
    for owner in 0..shards {
        for i in 0..3 {
            let id = id_owned_by(&format!("list-{owner}-{i}-"), owner, shards);
            let mut c = Raw::ok(b.addr, &id);
            c.subscribe(&[("list/a", QoS::AtLeastOnce), ("list/b/#", QoS::AtMostOnce)]);
            held.push(c);
            ids.push(id);
        }
    }
    let all = get(&b, "/api/v1/clients?clientid_prefix=list-").json();
    assert_eq!(all["meta"]["count"], ids.len());
    let mut seen = Vec::new();
    for page in 1..=3 {
        let v = get(
            &b,
            &format!("/api/v1/clients?clientid_prefix=list-&limit=2&page={page}"),
        )
        .json();
        assert_eq!(v["meta"]["count"], ids.len());
        assert_eq!(v["data"].as_array().unwrap().len(), 2, "page {page}: {v}");
        seen.extend(
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["clientid"].as_str().unwrap().to_string()),
        );
    }
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want, "each client once over the pages");
    let past = get(&b, "/api/v1/clients?clientid_prefix=list-&limit=2&page=9").json();
    assert!(past["data"].as_array().unwrap().is_empty());

    for id in &ids {
        let r = get(&b, &format!("/api/v1/clients/{id}"));
        assert_eq!(r.status, 200, "{id}");
        let v = r.json();
        assert_eq!(v["clientid"], id.as_str());
        assert_eq!(v["connected"], true);
        assert_eq!(v["proto_ver"], 4);
        assert_eq!(v["ipaddress"], "127.0.0.1");
        let subs: Vec<&str> = v["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["topic"].as_str().unwrap())
            .collect();
        assert_eq!(subs, vec!["list/a", "list/b/#"]);
        let r = get(&b, &format!("/api/v1/clients/{id}/subscriptions"));
        assert_eq!(r.json().as_array().unwrap().len(), 2);
        let r = get(&b, &format!("/api/v1/subscriptions?clientid={id}"));
        assert_eq!(r.json()["meta"]["count"], 2);
    }
    let r = get(&b, "/api/v1/subscriptions?topic=list%2Fa");
    assert_eq!(r.json()["meta"]["count"], ids.len());
    let routes = get(&b, "/api/v1/routes?topic=list/b/%23").json();
    let route_shards: Vec<u64> = routes["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["shard"].as_u64().unwrap())
        .collect();
    assert!(!route_shards.is_empty() && route_shards.len() <= shards);

    // Unknown clients, bad paging.
    let r = get(&b, "/api/v1/clients/nobody-here");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "CLIENT_NOT_FOUND");
    assert_eq!(
        get(&b, "/api/v1/clients/nobody-here/subscriptions").status,
        404
    );
    assert_eq!(get(&b, "/api/v1/clients?page=0").status, 400);
    assert_eq!(get(&b, "/api/v1/clients?limit=100000").status, 400);
    assert_eq!(get(&b, "/api/v1/clients?connected=maybe").status, 400);
    drop(held);
}

/// A client id with `/` and a space is one path segment once percent-encoded.
#[test]
fn a_client_id_with_reserved_characters_is_reachable() {
    let b = Broker::with_shards(2);
    let _c = Raw::ok(b.addr, "room/7 sensor");
    let r = get(&b, "/api/v1/clients/room%2F7%20sensor");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["clientid"], "room/7 sensor");
}

#[test]
fn kick_closes_the_connection_and_ends_the_session_wherever_the_id_is_owned() {
    let b = Broker::with_shards(2);
    let shards = b.handle().shards().len();
    for owner in 0..shards {
        let id = id_owned_by(&format!("kick-{owner}-"), owner, shards);
        let mut watcher = Raw::ok(b.addr, &format!("kick-watcher-{owner}"));
        watcher.subscribe(&[("kick/will", QoS::AtLeastOnce)]);
        let (mut c, _) = Raw::connect_full(
            b.addr,
            connect_packet(
                &id,
                false,
                ProtocolLevel::V311,
                30,
                Some(will("kick/will", "gone", QoS::AtLeastOnce, false)),
            ),
        );
        c.subscribe(&[("kick/x", QoS::AtLeastOnce)]);
        let r = http(
            admin(&b),
            "DELETE",
            &format!("/api/v1/clients/{id}"),
            &[],
            "",
        );
        assert_eq!(r.status, 204, "{}", r.text());
        c.expect_closed();
        let w = watcher.next_publish();
        assert_eq!((&*w.topic, &w.payload[..]), ("kick/will", &b"gone"[..]));
        // The persistent session went too.
        assert_eq!(get(&b, &format!("/api/v1/clients/{id}")).status, 404);
        let (_again, connack) = Raw::connect(b.addr, &id, false);
        assert!(!connack.session_present, "owner {owner}");
        let r = http(admin(&b), "DELETE", "/api/v1/clients/nobody-here", &[], "");
        assert_eq!(r.status, 404);
    }
    b.wait_metrics("clients kicked", |m| m.clients_kicked >= 2);
}

#[test]
fn publish_reaches_subscribers_on_every_shard_and_refuses_bad_requests() {
    let b = Broker::with_shards(2);
    let shards = b.handle().shards().len();
    let mut subs: Vec<Raw> = (0..shards)
        .map(|owner| {
            let mut s = Raw::ok(
                b.addr,
                &id_owned_by(&format!("api-sub-{owner}-"), owner, shards),
            );
            s.subscribe(&[("api/+", QoS::AtLeastOnce)]);
            s
        })
        .collect();
    let a = admin(&b);
    let r = http(
        a,
        "POST",
        "/api/v1/publish",
        &[],
        r#"{"topic":"api/cmd","payload":"on","qos":1}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for s in &mut subs {
        let p = s.next_publish();
        assert_eq!(
            (&*p.topic, &p.payload[..], p.qos),
            ("api/cmd", &b"on"[..], QoS::AtLeastOnce)
        );
        s.send(&Packet::Puback(p.packet_id));
    }
    let r = http(
        a,
        "POST",
        "/api/v1/publish",
        &[],
        r#"{"topic":"api/raw","payload":"AAEC","encoding":"base64","retain":true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut late = Raw::ok(b.addr, "api-late");
    late.subscribe(&[("api/raw", QoS::AtMostOnce)]);
    let p = late.next_publish();
    assert_eq!((&p.payload[..], p.retain), (&[0u8, 1, 2][..], true));

    for (body, status) in [
        (r#"{"topic":"$SYS/broker/x","payload":"x"}"#, 400),
        (r#"{"topic":"a/#","payload":"x"}"#, 400),
        (r#"{"topic":"a","payload":"x","qos":3}"#, 400),
        (r#"{"topic":"a","payload":"!","encoding":"base64"}"#, 400),
        (r#"{"topic":"a","payload":"x","colour":"red"}"#, 400),
        ("not json", 400),
    ] {
        let r = http(a, "POST", "/api/v1/publish", &[], body);
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.json()["message"].as_str().is_some());
    }
}

#[test]
fn unknown_paths_and_methods_get_json_errors() {
    let b = Broker::with_shards(1);
    let r = get(&b, "/api/v1/nothing");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "NOT_FOUND");
    let r = http(admin(&b), "PUT", "/api/v1/clients", &[], "");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    let r = get(&b, "/api/v1/publish");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
}

#[test]
fn prometheus_exposition_parses_and_counts_per_shard() {
    let b = Broker::with_shards(2);
    let shards = b.handle().shards().len();
    let mut p = Raw::ok(b.addr, "prom-pub");
    for n in 1..=7u16 {
        p.publish("prom/x", b"m", QoS::AtLeastOnce, false, n);
        assert_eq!(p.recv(), Some(Packet::Puback(n)));
    }
    b.wait_metrics("7 publishes", |m| m.packets_publish_received >= 7);
    // The board is at most 100 ms behind the metrics the test reads.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = get(&b, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition");
    let samples = |name: &str| -> Vec<(String, f64)> {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| {
                let v = match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                    prometheus_parse::Value::Untyped(v) => v,
                    _ => panic!("{name}: not a plain value"),
                };
                (s.labels.get("shard").unwrap_or("").to_string(), v)
            })
            .collect()
    };
    let published = samples("shardmq_packets_publish_received_total");
    assert_eq!(published.len(), shards, "one sample per shard");
    assert_eq!(published.iter().map(|(_, v)| v).sum::<f64>(), 7.0);
    let mut labels: Vec<String> = published.into_iter().map(|(s, _)| s).collect();
    labels.sort();
    assert_eq!(
        labels,
        (0..shards).map(|s| s.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(
        samples("shardmq_connections")
            .iter()
            .map(|(_, v)| v)
            .sum::<f64>(),
        1.0
    );
    assert_eq!(
        samples("shardmq_shards"),
        vec![(String::new(), shards as f64)]
    );
    assert!(scrape.docs.contains_key("shardmq_bytes_received_total"));
    assert!(text.contains("# TYPE shardmq_bytes_received_total counter"));
    assert!(text.contains("# TYPE shardmq_connections gauge"));
}

/// A non-loopback bind needs credentials: configuration refuses it without, and requests
/// without them are refused with 401.
#[test]
fn a_non_loopback_admin_api_needs_credentials() {
    let mut cfg = config(1);
    cfg.admin.bind = "0.0.0.0:0".parse().unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("admin.bind") && err.contains("no default password"),
        "{err}"
    );

    cfg.admin.username = Some("ops".into());
    cfg.admin.password = Some("correct horse".into());
    cfg.admin.api_key = Some("k".repeat(32));
    let b = Broker::start(cfg);
    let port = admin(&b).port();
    let a: SocketAddr = ([127, 0, 0, 1], port).into();
    let r = http(a, "GET", "/api/v1/status", &[], "");
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    assert_eq!(r.json()["code"], "UNAUTHORIZED");
    assert_eq!(http(a, "GET", "/metrics", &[], "").status, 401);
    // ops:wrong, then ops:correct horse.
    let wrong = [("Authorization", "Basic b3BzOndyb25n")];
    assert_eq!(http(a, "GET", "/api/v1/status", &wrong, "").status, 401);
    let right = [("Authorization", "Basic b3BzOmNvcnJlY3QgaG9yc2U=")];
    assert_eq!(http(a, "GET", "/api/v1/status", &right, "").status, 200);
    let key = format!("Bearer {}", "k".repeat(32));
    let bearer = [("Authorization", key.as_str())];
    assert_eq!(http(a, "GET", "/api/v1/status", &bearer, "").status, 200);
    let bad_key = [("Authorization", "Bearer nope")];
    assert_eq!(http(a, "GET", "/api/v1/status", &bad_key, "").status, 401);
}

/// `/api/v1/banned`: a client id ban (the id owned by either shard) closes the client and
/// refuses it until lifted; username and address bans apply on every shard; the list shows
/// each ban once; bad requests get 400, unknown bans 404.
#[test]
fn bans_close_and_refuse_clients_until_lifted() {
    let b = Broker::with_shards(2);
    let shards = b.handle().shards().len();
    let post = |body: &str| http(admin(&b), "POST", "/api/v1/banned", &[], body);
    let refused = |c: shardmq::protocol::mqtt::Connack| {
        c.code == shardmq::protocol::mqtt::ConnectReturnCode::NotAuthorized
    };
    for owner in 0..shards {
        let id = id_owned_by(&format!("ban-{owner}-"), owner, shards);
        let mut c = Raw::ok(b.addr, &id);
        let r = post(&format!(
            r#"{{"as": "clientid", "who": "{id}", "reason": "testing", "duration": "1h"}}"#
        ));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(
            (v["as"].as_str(), v["closed"].as_u64()),
            (Some("clientid"), Some(1))
        );
        let until = v["until"].as_u64().unwrap();
        assert!(until >= v["at"].as_u64().unwrap() + 3599, "{v}");
        c.expect_closed();
        for _ in 0..2 {
            // Whichever shard the connection lands on.
            assert!(refused(Raw::connect(b.addr, &id, true).1), "owner {owner}");
        }
        let list = get(&b, "/api/v1/banned").json();
        assert_eq!(list["meta"]["count"], 1, "{list}");
        assert_eq!(list["data"][0]["who"], id.as_str());
        assert_eq!(list["data"][0]["by"], "admin");
        let path = format!("/api/v1/banned/clientid/{id}");
        assert_eq!(http(admin(&b), "DELETE", &path, &[], "").status, 204);
        assert_eq!(http(admin(&b), "DELETE", &path, &[], "").status, 404);
        Raw::ok(b.addr, &id).ping();
    }
    // A username ban, without end.
    let mut alice = Raw::connect_full(
        b.addr,
        shardmq::protocol::mqtt::Connect {
            username: Some("alice".into()),
            ..connect_packet("alice-1", true, ProtocolLevel::V311, 30, None)
        },
    )
    .0;
    let r = post(r#"{"as": "username", "who": "alice", "until": "infinity"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["until"].is_null());
    alice.expect_closed();
    let again = Raw::connect_full(
        b.addr,
        shardmq::protocol::mqtt::Connect {
            username: Some("alice".into()),
            ..connect_packet("alice-2", true, ProtocolLevel::V311, 30, None)
        },
    );
    assert!(refused(again.1));
    Raw::ok(b.addr, "not-alice").ping();
    // An address ban: every client here comes from 127.0.0.1.
    let mut bystander = Raw::ok(b.addr, "bystander");
    let r = post(r#"{"as": "peerhost", "who": "127.0.0.1", "duration": "10m"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    bystander.expect_closed();
    assert!(refused(Raw::connect(b.addr, "anyone", true).1));
    let list = get(&b, "/api/v1/banned").json();
    assert_eq!(list["meta"]["count"], 2, "each ban once: {list}");
    assert_eq!(
        http(
            admin(&b),
            "DELETE",
            "/api/v1/banned/peerhost/127.0.0.1",
            &[],
            ""
        )
        .status,
        204
    );
    Raw::ok(b.addr, "anyone").ping();
    for bad in [
        r#"{"as": "ip", "who": "x"}"#,
        r#"{"as": "peerhost", "who": "not-an-address"}"#,
        r#"{"as": "clientid", "who": "x", "until": 1}"#,
        r#"{"as": "clientid", "who": "x", "until": 99999999999, "duration": "1m"}"#,
        r#"{"as": "clientid", "who": ""}"#,
        r#"{"as": "clientid", "who": "x", "color": "red"}"#,
        "not json",
    ] {
        let r = post(bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.json()["message"].is_string());
    }
    let r = http(admin(&b), "PUT", "/api/v1/banned", &[], "");
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, POST")));
    b.wait_metrics("refusals counted", |m| m.connects_banned >= 6);
}
