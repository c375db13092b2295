//! The harness against a real ShardMQ on free ports: a short pubsub run at QoS 1 and at QoS 2
//! where every message must arrive exactly once, and the JSON report must say so; and QoS 1
//! runs over each transport (TLS, WebSocket, WSS).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shardmq::config::{available_cpus, Config, Selection};
use std::process::Command;

fn broker() -> (shardmq::shard::BrokerHandle, std::net::SocketAddr) {
    let mut c = Config::default();
    c.shards.cpus = Selection::List(available_cpus().into_iter().take(2).collect());
    c.listener.tcp.get_mut("external").unwrap().bind = "127.0.0.1:0".parse().unwrap();
    c.admin.enable = false;
    c.gateway.tcp.enable = false;
    c.gateway.mqttsn.enable = false;
    c.gateway.lwm2m.enable = false;
    c.listener.ws.get_mut("external").unwrap().enable = false;
    let h = shardmq::shard::start(&c).expect("broker starts");
    let addr = h.addr("external").unwrap();
    (h, addr)
}

fn run(addr: std::net::SocketAddr, args: &[&str]) -> serde_json::Value {
    let out = std::env::temp_dir().join(format!(
        "shardmq-bench-test-{}-{}.json",
        std::process::id(),
        args.join("_").replace('/', "")
    ));
    let status = Command::new(env!("CARGO_BIN_EXE_shardmq-bench"))
        .arg("pubsub")
        .args([
            "--broker",
            &addr.to_string(),
            "--broker-name",
            "shardmq",
            "--quiet",
            "--threads",
            "2",
        ])
        .args(["--duration", "2s", "--warmup", "1s", "--drain", "10s"])
        .args(args)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(out);
    v
}

fn assert_exactly_once(v: &serde_json::Value) {
    let d = &v["outcome"]["delivery"];
    assert_eq!(d["exactly_once"], true, "{v:#}");
    assert_eq!(d["lost"], 0);
    assert_eq!(d["duplicates"], 0);
    assert!(d["expected"].as_u64().unwrap() > 0);
    assert_eq!(d["expected"], d["received"]);
    assert_eq!(v["outcome"]["errors"], 0);
    assert!(v["outcome"]["latency"]["count"].as_u64().unwrap() > 0);
    assert!(v["outcome"]["rate_out"].as_f64().unwrap() > 0.0);
}

#[test]
fn qos1_and_qos2_runs_deliver_exactly_once_and_say_so() {
    let (h, addr) = broker();
    let v = run(
        addr,
        &[
            "--publishers",
            "8",
            "--subscribers",
            "8",
            "--pattern",
            "p2p",
            "--qos",
            "1",
            "--rate",
            "500",
        ],
    );
    assert_exactly_once(&v);
    assert_eq!(v["scenario"]["qos"], 1);
    let v = run(
        addr,
        &[
            "--publishers",
            "3",
            "--subscribers",
            "6",
            "--pattern",
            "fanout",
            "--qos",
            "2",
            "--rate",
            "300",
            "--payload",
            "1KB",
        ],
    );
    assert_exactly_once(&v);
    let v = run(
        addr,
        &[
            "--publishers",
            "6",
            "--subscribers",
            "2",
            "--pattern",
            "fanin",
            "--qos",
            "2",
            "--rate",
            "200",
        ],
    );
    assert_exactly_once(&v);
    h.stop().unwrap();
}

#[test]
fn every_transport_delivers_exactly_once() {
    let certs = std::env::temp_dir().join(format!("shardmq-bench-certs-{}", std::process::id()));
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gen-test-certs.sh");
    assert!(Command::new("bash")
        .arg(script)
        .arg(&certs)
        .status()
        .unwrap()
        .success());
    let mut c = Config::default();
    c.shards.cpus = Selection::List(available_cpus().into_iter().take(2).collect());
    c.listener.tcp.get_mut("external").unwrap().bind = "127.0.0.1:0".parse().unwrap();
    c.admin.enable = false;
    c.gateway.tcp.enable = false;
    c.gateway.mqttsn.enable = false;
    c.gateway.lwm2m.enable = false;
    c.listener.ws.get_mut("external").unwrap().bind = "127.0.0.1:0".parse().unwrap();
    let ssl = c.listener.ssl.get_mut("external").unwrap();
    ssl.bind = "127.0.0.1:0".parse().unwrap();
    ssl.certfile = Some(certs.join("server.crt"));
    ssl.keyfile = Some(certs.join("server.key"));
    let wss = c.listener.wss.get_mut("external").unwrap();
    wss.bind = "127.0.0.1:0".parse().unwrap();
    wss.certfile = Some(certs.join("server.crt"));
    wss.keyfile = Some(certs.join("server.key"));
    let h = shardmq::shard::start(&c).expect("broker starts");
    let cafile = certs.join("ca.crt");
    for (transport, listener) in [
        ("tls", "ssl.external"),
        ("ws", "ws.external"),
        ("wss", "wss.external"),
    ] {
        let v = run(
            h.addr(listener).unwrap(),
            &[
                "--transport",
                transport,
                "--cafile",
                cafile.to_str().unwrap(),
                "--publishers",
                "4",
                "--subscribers",
                "4",
                "--qos",
                "1",
                "--rate",
                "300",
            ],
        );
        assert_exactly_once(&v);
        assert_eq!(v["transport"], transport);
    }
    h.stop().unwrap();
}

/// With stderr a pipe, a run says what it will do (warm-up included) and prints a progress
/// line every few seconds instead of redrawing one; `--pid` puts the broker's peak RSS in the
/// report and the table, whose columns are explained under it.
#[test]
fn piped_progress_lines_and_the_brokers_rss() {
    let (h, addr) = broker();
    let out = Command::new(env!("CARGO_BIN_EXE_shardmq-bench"))
        .arg("pubsub")
        .args(["--broker", &addr.to_string(), "--broker-name", "shardmq"])
        .args(["--threads", "1", "--publishers", "2", "--subscribers", "2"])
        .args([
            "--rate",
            "100",
            "--duration",
            "8s",
            "--warmup",
            "2s",
            "--drain",
            "5s",
        ])
        // The broker runs in this test's process.
        .args(["--pid", &std::process::id().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines[0].contains("2 s of warm-up") && lines[0].contains("8 s measured"),
        "{err}"
    );
    let progress: Vec<&&str> = lines.iter().filter(|l| l.contains("/10s")).collect();
    // Every 5 s of a 10 s run: at the first second, then about every fifth.
    assert!(
        (2..=3).contains(&progress.len()),
        "progress lines: {progress:?}"
    );
    assert!(
        !err.contains('\r') && !err.contains("\x1b["),
        "no terminal codes: {err:?}"
    );
    assert!(progress[0].contains("warm-up"), "{err}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("RSS MB"), "{table}");
    let row = table.lines().nth(1).unwrap();
    let rss: f64 = row.split_whitespace().last().unwrap().parse().expect(row);
    assert!(rss > 1.0, "{row}");
    assert!(table.contains("once: yes when every expected message arrived exactly once"));
    drop(h);
}

/// `--tcpgw up` and `--tcpgw down`: devices of the private TCP gateway as the publishers or
/// the subscribers of a p2p run, every message delivered once.
#[test]
fn tcp_gateway_runs_deliver_every_message_both_ways() {
    let mut c = Config::default();
    c.shards.cpus = Selection::List(available_cpus().into_iter().take(2).collect());
    c.listener.tcp.get_mut("external").unwrap().bind = "127.0.0.1:0".parse().unwrap();
    c.listener.ws.get_mut("external").unwrap().enable = false;
    c.admin.enable = false;
    c.tcp.listener.external.bind = "127.0.0.1:0".parse().unwrap();
    c.tcp.listener.external.max_conn_rate = 0;
    c.gateway.mqttsn.enable = false;
    c.gateway.lwm2m.enable = false;
    let h = shardmq::shard::start(&c).expect("broker starts");
    let addr = h.addr("external").unwrap();
    let gw = h.addr("gateway.tcp").unwrap();
    for dir in ["up", "down"] {
        let v = run(
            addr,
            &[
                "--tcpgw",
                dir,
                "--tcpgw-port",
                &gw.port().to_string(),
                "--publishers",
                "4",
                "--subscribers",
                "4",
            ],
        );
        assert_exactly_once(&v);
        assert_eq!(v["scenario"]["tcpgw"], dir);
    }
    drop(h);
}

/// `--mqttsn-port`: MQTT-SN clients over UDP as the publishers of a p2p run, at QoS 0 and 1,
/// every message delivered once.
#[test]
fn mqttsn_runs_deliver_every_message() {
    let mut c = Config::default();
    c.shards.cpus = Selection::List(available_cpus().into_iter().take(2).collect());
    c.listener.tcp.get_mut("external").unwrap().bind = "127.0.0.1:0".parse().unwrap();
    c.listener.ws.get_mut("external").unwrap().enable = false;
    c.admin.enable = false;
    c.gateway.tcp.enable = false;
    c.mqtt.sn.bind = [127, 0, 0, 1].into();
    c.mqtt.sn.port = 0;
    c.gateway.lwm2m.enable = false;
    let h = shardmq::shard::start(&c).expect("broker starts");
    let addr = h.addr("external").unwrap();
    let gw = h.addr("gateway.mqttsn").unwrap();
    for qos in ["0", "1"] {
        let v = run(
            addr,
            &[
                "--mqttsn-port",
                &gw.port().to_string(),
                "--qos",
                qos,
                "--publishers",
                "4",
                "--subscribers",
                "4",
            ],
        );
        assert_exactly_once(&v);
        assert_eq!(v["scenario"]["mqttsn_port"], gw.port());
    }
    drop(h);
}
