//! The harness against a real ShardMQ on free ports: a short pubsub run at QoS 1 and at QoS 2
//! where every message must arrive exactly once, and the JSON report must say so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shardmq::config::{available_cpus, Config, Selection};
use std::process::Command;

fn broker() -> (shardmq::shard::BrokerHandle, std::net::SocketAddr) {
    let mut c = Config::default();
    c.shards.cpus = Selection::List(available_cpus().into_iter().take(2).collect());
    c.listener.tcp.get_mut("external").unwrap().bind = "127.0.0.1:0".parse().unwrap();
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
