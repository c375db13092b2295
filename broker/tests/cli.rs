//! The `shardmq` binary: configuration printing and errors, start failures with one clear line,
//! the logged listen address, and graceful shutdown on SIGTERM/SIGINT.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::process::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn print_config_shows_the_effective_configuration() {
    let out = bin()
        .args(["--print-config"])
        .env("SHARDMQ_MQTT__MAX_INFLIGHT", "77")
        .env("SHARDMQ_LISTENER__TCP__EXTERNAL__BIND", "127.0.0.1:11883")
        .env("SHARDMQ_LISTENER__WS__EXTERNAL__BIND", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed = shardmq::config::from_toml_str(&text).expect("printed config parses back");
    assert_eq!(parsed.mqtt.max_inflight, 77);
    assert_eq!(
        parsed.listener.tcp["external"].bind.to_string(),
        "127.0.0.1:11883"
    );
}

#[test]
fn bad_configuration_exits_with_one_line_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("shardmq-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[mqtt]\nretry_interval = \"soon\"\n").unwrap();
    let out = bin().arg("--config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("mqtt.retry_interval"), "{err}");

    let out = bin().env("SHARDMQ_MQTT__NOPE", "1").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));

    let out = bin()
        .args(["--profile", "no-such-profile"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn shipped_profile_loads_by_name() {
    let out = bin()
        .args(["--profile", "dev-2core", "--print-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = shardmq::config::from_toml_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(cfg.shards.channel_capacity, 64);
}

#[test]
fn port_zero_logs_the_real_port_and_sigterm_stops_within_5s() {
    let mut child = spawn_broker("127.0.0.1:0");
    let (addr, _log) = listen_addr(&mut child);
    assert_ne!(addr.port(), 0);
    let mut c = common::Raw::ok(addr, "cli-client");
    c.ping();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(
        c.expect_closed().is_empty(),
        "connections closed at shutdown"
    );
}

#[test]
fn sigint_stops_gracefully() {
    let mut child = spawn_broker("127.0.0.1:0");
    let (_addr, _log) = listen_addr(&mut child);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
}

#[test]
fn a_port_held_by_another_process_fails_the_start() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let out = bin()
        .env(
            "SHARDMQ_LISTENER__TCP__EXTERNAL__BIND",
            format!("127.0.0.1:{port}"),
        )
        .env("SHARDMQ_LISTENER__WS__EXTERNAL__BIND", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("already in use"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_port_held_by_a_reuseport_listener_is_refused_too() {
    // Another broker (glommio style) listening with SO_REUSEPORT must not be silently shared.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_port(true).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(16).unwrap();
    let port = sock.local_addr().unwrap().as_socket().unwrap().port();
    let out = bin()
        .env(
            "SHARDMQ_LISTENER__TCP__EXTERNAL__BIND",
            format!("127.0.0.1:{port}"),
        )
        .env("SHARDMQ_LISTENER__WS__EXTERNAL__BIND", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in use"));
}

#[test]
fn too_little_memlock_fails_with_a_clear_line() {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -l 64 && exec {}",
            env!("CARGO_BIN_EXE_shardmq")
        ))
        .env("SHARDMQ_LISTENER__TCP__EXTERNAL__BIND", "127.0.0.1:0")
        .env("SHARDMQ_LISTENER__WS__EXTERNAL__BIND", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("RLIMIT_MEMLOCK"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn an_io_memory_above_the_memlock_limit_fails_naming_the_key() {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -l 4096 && exec {}",
            env!("CARGO_BIN_EXE_shardmq")
        ))
        .env("SHARDMQ_LISTENER__TCP__EXTERNAL__BIND", "127.0.0.1:0")
        .env("SHARDMQ_LISTENER__WS__EXTERNAL__BIND", "127.0.0.1:0")
        .env("SHARDMQ_SHARDS__CPUS", "[0]")
        .env("SHARDMQ_SHARDS__IO_MEMORY", "8MB")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("shards.io_memory"), "{err}");
    assert!(err.contains("8388608 bytes in all"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 48 && exec {}",
            env!("CARGO_BIN_EXE_shardmq")
        ))
        .env("SHARDMQ_LISTENER__TCP__EXTERNAL__BIND", "127.0.0.1:0")
        .env("SHARDMQ_LISTENER__WS__EXTERNAL__BIND", "127.0.0.1:0")
        .env("SHARDMQ_ADMIN__BIND", "127.0.0.1:0")
        .env("SHARDMQ_SHARDS__CPUS", "[0]")
        .env("SHARDMQ_LOG__LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, mut log) = listen_addr(&mut child);
    // More connections than the broker has descriptors for: accept hits EMFILE.
    let flood: Vec<std::net::TcpStream> = (0..80)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    let mut line = String::new();
    let start = Instant::now();
    loop {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "broker exited");
        if line.contains("accept failed") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no accept error logged"
        );
    }
    drop(flood);
    // Once descriptors are free again, new clients are served.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = common::Raw::open(addr);
        c.send(&shardmq::protocol::mqtt::Packet::Connect(Box::new(
            common::connect_packet(
                "after-emfile",
                true,
                shardmq::protocol::mqtt::ProtocolLevel::V311,
                30,
                None,
            ),
        )));
        if let Some(Some(shardmq::protocol::mqtt::Packet::Connack(a))) =
            c.recv_within(Duration::from_secs(2))
        {
            assert_eq!(a.code, shardmq::protocol::mqtt::ConnectReturnCode::Accepted);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "broker did not recover from EMFILE"
        );
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
}

/// A supervisor restarts the broker the moment it exits: the new start must find the port
/// free every time (the old process closes its listening sockets before it exits).
#[test]
fn an_immediate_restart_on_the_same_port_always_starts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bind = format!("127.0.0.1:{port}");
    for round in 0..50 {
        let mut child = spawn_broker(&bind);
        let mut log = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if log.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("round {round}: the broker did not start ({status}): {seen}");
            }
            seen.push_str(&line);
            if line.contains("listening for MQTT") {
                break;
            }
        }
        if round % 2 == 0 {
            let mut c = common::Raw::ok(bind.parse().unwrap(), "restart");
            c.ping();
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_exit(&mut child, Duration::from_secs(5));
        assert!(status.success(), "round {round}: {status:?}");
        assert!(
            std::net::TcpStream::connect(&bind).is_err(),
            "round {round}: the port still accepts connections after the broker exited"
        );
    }
}

/// A panic on one shard stops the whole broker with one line naming the shard (debug builds
/// have a fault hook that makes a shard panic), rather than leaving it running half-dead.
#[test]
fn a_panic_on_a_shard_stops_the_broker_with_a_line_naming_it() {
    let shards = shardmq::config::available_cpus().len().min(2);
    let target = shards - 1;
    let mut child = bin()
        .env("SHARDMQ_LISTENER__TCP__EXTERNAL__BIND", "127.0.0.1:0")
        .env("SHARDMQ_LISTENER__WS__EXTERNAL__BIND", "127.0.0.1:0")
        .env("SHARDMQ_LOG__LEVEL", "info")
        .env("SHARDMQTEST_PANIC_SHARD", target.to_string())
        .env("SHARDMQTEST_PANIC_AFTER_MS", "1000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, mut log) = listen_addr(&mut child);
    let mut c = common::Raw::ok(addr, "before-the-panic");
    c.ping();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(!status.success(), "{status:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut log, &mut rest).unwrap();
    let lines: Vec<&str> = rest
        .lines()
        .filter(|l| l.contains(&format!("shard {target} panicked")))
        .collect();
    assert_eq!(lines.len(), 1, "{rest}");
    assert!(lines[0].contains("SHARDMQTEST_PANIC_SHARD"), "{rest}");
    assert!(c.expect_closed().is_empty(), "the clients' connections end");
}

#[test]
fn clients_coming_and_going_are_logged_at_info() {
    let mut child = spawn_broker("127.0.0.1:0");
    let (addr, mut log) = listen_addr(&mut child);
    let mut c = common::Raw::ok(addr, "logged-client");
    c.send(&shardmq::protocol::mqtt::Packet::Disconnect);
    let mut seen = Vec::new();
    let mut line = String::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("client disconnected"))
    {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "log ended: {seen:?}");
        if line.contains("logged-client") {
            seen.push(line.clone());
        }
    }
    let connected = seen
        .iter()
        .find(|l| l.contains("client connected"))
        .expect("connect line");
    assert!(
        connected.contains("INFO") && connected.contains("shard="),
        "{connected}"
    );
    let gone = seen.last().unwrap();
    assert!(
        gone.contains("INFO") && gone.contains("reason=\"normal\""),
        "{gone}"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
}

/// Reads the log until the admin API's line and returns its address.
fn admin_addr(log: &mut BufReader<std::process::ChildStderr>) -> std::net::SocketAddr {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "no admin API line");
        if line.contains("admin API listening") {
            let addr = line.split("addr=").nth(1).unwrap();
            return addr.split_whitespace().next().unwrap().parse().unwrap();
        }
    }
}

/// `shardmq ctl` against a running broker: status, the client list and one client, its
/// subscriptions, routes, metrics, publish and kick, tables and JSON; then, with the broker
/// gone, one line and a non-zero exit.
#[test]
fn ctl_talks_to_a_running_broker() {
    let mut child = spawn_broker("127.0.0.1:0");
    let (addr, mut log) = listen_addr(&mut child);
    let admin = admin_addr(&mut log);
    let url = format!("http://{admin}");
    let ctl = |args: &[&str]| -> std::process::Output {
        bin()
            .arg("ctl")
            .arg("--url")
            .arg(&url)
            .args(args)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| -> String {
        let out = ctl(args);
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    let status = ok(&["status"]);
    assert!(
        status.contains("is running") && status.contains("shards"),
        "{status}"
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&["--json", "status"])).unwrap();
    assert_eq!(v["status"], "running");

    let mut sub = common::Raw::ok(addr, "ctl-sub");
    sub.subscribe(&[("ctl/+", shardmq::protocol::mqtt::QoS::AtLeastOnce)]);
    let list = ok(&["clients", "list"]);
    assert!(list.starts_with("CLIENTID"), "{list}");
    assert!(
        list.contains("ctl-sub") && list.contains("1 of 1 clients"),
        "{list}"
    );
    let show = ok(&["clients", "show", "ctl-sub"]);
    assert!(show.contains("ctl/+"), "{show}");
    let subs = ok(&["subscriptions", "list", "--client", "ctl-sub"]);
    assert!(subs.contains("ctl/+") && subs.contains("1 of 1"), "{subs}");
    let routes = ok(&["routes", "list"]);
    assert!(routes.contains("ctl/+"), "{routes}");
    let metrics = ok(&["metrics"]);
    assert!(metrics.contains("connections_accepted"), "{metrics}");
    let stats = ok(&["stats"]);
    assert!(stats.contains("connections.count"), "{stats}");

    ok(&["publish", "ctl/x", "from ctl", "--qos", "1"]);
    let p = sub.next_publish();
    assert_eq!((&*p.topic, &p.payload[..]), ("ctl/x", &b"from ctl"[..]));
    sub.send(&shardmq::protocol::mqtt::Packet::Puback(p.packet_id));

    let missing = ctl(&["clients", "show", "nobody"]);
    assert!(!missing.status.success());
    let err = String::from_utf8(missing.stderr).unwrap();
    assert!(err.contains("no client") && err.contains("404"), "{err}");

    assert!(ok(&["clients", "kick", "ctl-sub"]).contains("kicked"));
    sub.expect_closed();

    let mut target = common::Raw::ok(addr, "ctl-banned");
    let added = ok(&[
        "banned",
        "add",
        "clientid",
        "ctl-banned",
        "--duration",
        "1h",
        "--reason",
        "test",
    ]);
    assert!(
        added.contains("banned until") && added.contains("1 connections closed"),
        "{added}"
    );
    target.expect_closed();
    let listed = ok(&["banned", "list"]);
    assert!(
        listed.starts_with("AS") && listed.contains("ctl-banned") && listed.contains("1 bans"),
        "{listed}"
    );
    let (_, refused) = common::Raw::connect(addr, "ctl-banned", true);
    assert_eq!(
        refused.code,
        shardmq::protocol::mqtt::ConnectReturnCode::NotAuthorized
    );
    assert!(ok(&["banned", "del", "clientid", "ctl-banned"]).contains("no longer banned"));
    common::Raw::ok(addr, "ctl-banned").ping();
    let gone = ctl(&["banned", "del", "clientid", "ctl-banned"]);
    assert!(!gone.status.success());

    let gateways = ok(&["gateways", "list"]);
    assert!(
        gateways.starts_with("NAME") && gateways.contains("tcp") && gateways.contains("running"),
        "{gateways}"
    );
    assert!(ok(&["gateways", "unload", "tcp"]).contains("gateway tcp stopped"));
    assert!(ok(&["gateways", "list"]).contains("stopped"));
    assert!(ok(&["gateways", "load", "tcp"]).contains("gateway tcp running"));
    let list = ok(&["gateways", "list"]);
    assert!(list.contains("mqttsn") && list.contains("lwm2m"), "{list}");
    assert!(ok(&["gateways", "unload", "lwm2m"]).contains("gateway lwm2m stopped"));
    assert!(ok(&["gateways", "load", "lwm2m"]).contains("gateway lwm2m running"));
    let unknown = ctl(&["gateways", "load", "coap"]);
    assert!(!unknown.status.success());

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
    let down = ctl(&["status"]);
    assert_eq!(down.status.code(), Some(1));
    let err = String::from_utf8(down.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("is the broker running"), "{err}");
}

#[test]
fn an_admin_port_in_use_fails_the_start_naming_the_key() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = bin()
        .env("SHARDMQ_LISTENER__TCP__EXTERNAL__BIND", "127.0.0.1:0")
        .env("SHARDMQ_LISTENER__WS__EXTERNAL__BIND", "127.0.0.1:0")
        .env(
            "SHARDMQ_ADMIN__BIND",
            holder.local_addr().unwrap().to_string(),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("admin.bind"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// `shardmq passwd`: adds a user from --password and from standard input, changes one,
/// removes one; the broker then checks against the file.
#[test]
fn passwd_writes_a_file_the_broker_reads() {
    let dir = std::env::temp_dir().join(format!("shardmq-cli-passwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("passwd");
    let _ = std::fs::remove_file(&file);
    let out = bin()
        .args(["passwd"])
        .arg(&file)
        .args(["alice", "--password", "first-secret"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("alice added"));
    // From standard input (scripts), then changed.
    for (user, pass) in [("bob", "piped-secret"), ("alice", "second-secret")] {
        let mut child = bin()
            .arg("passwd")
            .arg(&file)
            .arg(user)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        writeln!(child.stdin.take().unwrap(), "{pass}").unwrap();
        assert!(child.wait().unwrap().success());
    }
    let out = bin()
        .arg("passwd")
        .arg(&file)
        .args(["bob", "-D"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("bob removed"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("alice:$argon2id$"), "{text}");
    let out = bin()
        .arg("passwd")
        .arg(&file)
        .args(["bob", "-D"])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let mut cfg = common::config(1);
    cfg.auth.password_file = Some(file.clone());
    cfg.auth.allow_anonymous = shardmq::config::AllowAnonymous::False;
    let b = common::Broker::start(cfg);
    let connect = |pass: &str| {
        let c = shardmq::protocol::mqtt::Connect {
            level: shardmq::protocol::mqtt::ProtocolLevel::V311,
            client_id: "passwd-cli".into(),
            clean_session: true,
            keep_alive: 30,
            will: None,
            username: Some("alice".into()),
            password: Some(bytes::Bytes::copy_from_slice(pass.as_bytes())),
        };
        common::Raw::connect_full(b.addr, c).1.code
    };
    use shardmq::protocol::mqtt::ConnectReturnCode;
    assert_eq!(connect("second-secret"), ConnectReturnCode::Accepted);
    assert_eq!(
        connect("first-secret"),
        ConnectReturnCode::BadUsernameOrPassword
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs the binary with `args` and `env`; (exit code, stdout, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = bin().args(args).envs(env.iter().copied()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Arguments, environment, and the error line expected.
type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, String);

/// Each configuration mistake a new user makes is one line on stderr that says what is wrong
/// and where it came from, and the exit code is 2.
#[test]
fn configuration_errors_are_one_line_saying_where_they_came_from() {
    let dir = common::temp_dir("cfg-errors");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let typo = write("typo.toml", "[mqtt]\nmax_infligt = 3\n");
    let syntax = write("syntax.toml", "[mqtt]\nmax_inflight = = 3\n");
    let badbind = write(
        "bind.toml",
        "[listener.tcp.external]\nbind = \"localhost1883\"\n",
    );
    let level = "\"verbose\" is not a log level (off, error, warn, info, debug, trace) or a list of TARGET=LEVEL directives such as \"info,shardmq::shard=debug\"";
    let cases: Vec<Case> = vec![
        (
            vec!["--print-config"],
            vec![("SHARDMQ_LOG__LEVEL", "verbose")],
            format!("invalid value for `log.level` (from environment variable SHARDMQ_LOG__LEVEL): {level}"),
        ),
        (
            vec!["--print-config"],
            vec![("SHARDMQ_MQTT__MAX_INFLIGT", "3")],
            "unknown key `mqtt.max_infligt` (from environment variable SHARDMQ_MQTT__MAX_INFLIGT); did you mean `mqtt.max_inflight` (SHARDMQ_MQTT__MAX_INFLIGHT)?".into(),
        ),
        (
            vec!["-c", &typo],
            vec![],
            format!("unknown key `mqtt.max_infligt` (from config file {typo}); did you mean `mqtt.max_inflight`?"),
        ),
        (
            vec!["--config", &syntax],
            vec![],
            format!("{syntax}:2:16: invalid TOML: invalid string; expected `\"`, `'`"),
        ),
        (
            vec!["--config", &badbind],
            vec![],
            format!("invalid value for `listener.tcp.external.bind` (from config file {badbind}): \"localhost1883\" is not HOST:PORT (such as 0.0.0.0:1883, [::]:1883 or localhost:1883)"),
        ),
        (
            vec!["--print-config"],
            vec![("SHARDMQ_MQTT__MAX_INFLIGHT", "many")],
            "invalid value for `mqtt.max_inflight` (from environment variable SHARDMQ_MQTT__MAX_INFLIGHT): invalid type: found string \"many\", expected a whole number".into(),
        ),
        (
            vec!["--port", "1883", "--bind", "nowhere"],
            vec![],
            "invalid value for `listener.tcp.external.bind` (from --bind): \"nowhere\" is not HOST:PORT (such as 0.0.0.0:1883, [::]:1883 or localhost:1883)".into(),
        ),
    ];
    for (args, env, want) in cases {
        let (code, _, err) = run(&args, &env);
        assert_eq!(
            err.trim_end(),
            format!("shardmq: configuration error: {want}"),
            "{args:?} {env:?}"
        );
        assert_eq!(code, 2, "{args:?} {env:?}");
    }
    // A level list with known levels is fine; a word that is not a level is not.
    assert_eq!(
        run(
            &["--print-config"],
            &[("SHARDMQ_LOG__LEVEL", "warn,shardmq::shard=debug")]
        )
        .0,
        0
    );
    assert_eq!(
        run(&["--print-config"], &[("SHARDMQ_LOG__LEVEL", "inf")]).0,
        2
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `SHARDMQ_CONFIG` names the file, a stray `SHARDMQ_*` variable is a warning, `localhost`
/// is an address, and a profile for a bigger machine prints here but fails `--check`.
#[test]
fn the_environment_the_check_and_profiles_for_other_hosts() {
    let dir = common::temp_dir("cfg-env");
    let file = dir.join("local.toml");
    std::fs::write(
        &file,
        "[listener.tcp.external]\nbind = \"localhost:11883\"\n",
    )
    .unwrap();
    let (code, out, err) = run(
        &["--print-config"],
        &[
            ("SHARDMQ_CONFIG", file.to_str().unwrap()),
            ("SHARDMQ_STRAY", "1"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err.trim_end(),
        "shardmq: warning: ignoring environment variable SHARDMQ_STRAY: not a configuration key (keys are SHARDMQ_<SECTION>__<KEY>, such as SHARDMQ_MQTT__MAX_INFLIGHT)"
    );
    let cfg = shardmq::config::from_toml_str(&out).unwrap();
    assert!(cfg.listener.tcp["external"].bind.ip().is_loopback());
    assert_eq!(cfg.listener.tcp["external"].bind.port(), 11883);

    let (code, out, err) = run(&["--check"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("configuration OK for this host: "), "{out}");
    assert!(out.contains("tcp.external 0.0.0.0:1883"), "{out}");

    let (code, out, _) = run(&["--profile", "baremetal-16core", "--print-config"], &[]);
    assert_eq!(code, 0, "printing needs no CPUs");
    assert!(out.contains("[shards]"));
    let fits = (0..16).all(|c| shardmq::config::available_cpus().contains(&c));
    let (code, _, err) = run(&["--profile", "baremetal-16core", "--check"], &[]);
    if fits {
        assert_eq!(code, 0, "{err}");
    } else {
        assert_eq!(code, 2);
        assert!(
            err.starts_with("shardmq: configuration error: invalid value for `shards.cpus` (from built-in profile baremetal-16core): CPU "),
            "{err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1);
    }
    let missing = dir.join("missing-passwd");
    let (code, _, err) = run(
        &["--check"],
        &[("SHARDMQ_AUTH__PASSWORD_FILE", missing.to_str().unwrap())],
    );
    assert_eq!(code, 2);
    assert!(err.contains("auth.password_file"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `-p` and `--bind` set the default MQTT listener, as with mosquitto; `--version` names the
/// commit and features; `--help` shows the environment form and where the keys are listed.
#[test]
fn port_and_bind_flags_version_and_help() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = bin()
        .args(["-p", &port.to_string(), "--bind", "127.0.0.1"])
        .env("SHARDMQ_LISTENER__WS__EXTERNAL__BIND", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, _log) = listen_addr(&mut child);
    assert_eq!(addr, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    common::Raw::ok(addr, "flag-port").ping();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());

    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("shardmq 0."), "{out}");
    assert!(
        out.contains("commit:") && out.contains("features:") && out.contains("rustc"),
        "{out}"
    );
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for want in [
        "SHARDMQ_MQTT__MAX_INFLIGHT",
        "docs/configuration.md",
        "--port",
        "--check",
    ] {
        assert!(out.contains(want), "--help lacks {want}: {out}");
    }
}
