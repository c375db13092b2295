//! Helpers shared by the integration tests: a real broker started in-process on free loopback
//! ports, and a raw-bytes MQTT client built on the broker's own codec (so tests can send
//! exactly the bytes they mean, valid or not).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use shardmq::config::{available_cpus, Config, Selection};
use shardmq::protocol::mqtt::{
    decode, encode, Connack, Connect, ConnectReturnCode, DecodeOptions, LastWill, Packet,
    ProtocolLevel, Publish, QoS, Suback, Subscribe,
};
use shardmq::shard::BrokerHandle;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long a test waits for something it expects before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// A configuration on 127.0.0.1 port 0 with `shards` shards (as many distinct CPUs as this
/// machine has, reused round-robin is not allowed, so at most that many).
pub fn config(shards: usize) -> Config {
    let cpus = available_cpus();
    let mut c = Config::default();
    c.shards.cpus = Selection::List(
        cpus.iter()
            .copied()
            .cycle()
            .take(shards.min(cpus.len()))
            .collect(),
    );
    c.listener.tcp.get_mut("external").unwrap().bind = "127.0.0.1:0".parse().unwrap();
    c.listener.ws.get_mut("external").unwrap().bind = "127.0.0.1:0".parse().unwrap();
    c.admin.bind = "127.0.0.1:0".parse().unwrap();
    c.tcp.listener.external.bind = "127.0.0.1:0".parse().unwrap();
    c.mqtt.sn.bind = [127, 0, 0, 1].into();
    c.mqtt.sn.port = 0;
    c.lwm2m.bind = [127, 0, 0, 1].into();
    c.lwm2m.port = 0;
    c.lwm2m.xml_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lwm2m_xml");
    c.log.level = "warn".into();
    c
}

/// A fresh directory for test `name`'s files (this process's own).
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("shardmq-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An HTTP response: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to its end: enough
/// of a client to check the admin API from outside, in the bytes a client sends.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpReply {
    let mut s = TcpStream::connect(addr).expect("admin API reachable");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete header");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = unchunk(&body);
    }
    HttpReply {
        status,
        headers,
        body,
    }
}

fn unchunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16)
                .unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A broker running in this process.
pub struct Broker {
    pub handle: Option<BrokerHandle>,
    pub addr: SocketAddr,
}

impl Broker {
    pub fn start(cfg: Config) -> Broker {
        cfg.validate().expect("test config is valid");
        let handle = shardmq::shard::start(&cfg).expect("broker starts");
        let addr = handle.addr("external").expect("external listener");
        Broker {
            handle: Some(handle),
            addr,
        }
    }

    pub fn with_shards(n: usize) -> Broker {
        Self::start(config(n))
    }

    pub fn handle(&self) -> &BrokerHandle {
        self.handle.as_ref().unwrap()
    }

    /// `POST /api/v1/auth/reload` on the admin API: re-reads the password and ACL files.
    pub fn reload_over_api(&self) -> HttpReply {
        let admin = self.handle().admin_addr().expect("the admin API runs");
        http(admin, "POST", "/api/v1/auth/reload", &[], "")
    }

    /// Connections accepted so far by each shard, once the stats show `total` in all (stats
    /// are published every 100 ms).
    pub fn accepted_when(&self, total: u64) -> Vec<u64> {
        let start = Instant::now();
        loop {
            let per_shard: Vec<u64> = self
                .handle()
                .stats()
                .iter()
                .map(|s| s.metrics.connections_accepted)
                .collect();
            if per_shard.iter().sum::<u64>() >= total {
                return per_shard;
            }
            assert!(
                start.elapsed() < WAIT,
                "stats show {per_shard:?} accepted, expected {total} in all"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Opens a connection and tells which shard accepted it. `known` holds the accepts of each
    /// shard so far (every connection to this broker must be counted in it, as
    /// [`Broker::accepted_when`] returns it); it is updated with this one.
    pub fn open_located(&self, known: &mut Vec<u64>) -> (Raw, usize) {
        let r = Raw::open(self.addr);
        let now = self.accepted_when(known.iter().sum::<u64>() + 1);
        let shard = (0..now.len())
            .find(|&i| now[i] > known[i])
            .expect("one shard's count moved");
        *known = now;
        (r, shard)
    }

    /// Open connections over all shards (from the stats, at most 100 ms old).
    pub fn connections(&self) -> usize {
        self.handle().stats().iter().map(|s| s.connections).sum()
    }

    /// Waits until the broker has `n` connections open.
    pub fn wait_connections(&self, n: usize, within: Duration) {
        let start = Instant::now();
        while self.connections() != n {
            assert!(
                start.elapsed() < within,
                "{} connections open after {within:?}, expected {n}",
                self.connections()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `f` holds for the summed counters.
    pub fn wait_metrics(&self, what: &str, f: impl Fn(&shardmq::core::metrics::Metrics) -> bool) {
        let start = Instant::now();
        loop {
            let m = self.handle().metrics();
            if f(&m) {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}: {m:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.stop();
        }
    }
}

/// A raw MQTT client, over plain TCP or TLS.
pub struct Raw {
    pub stream: TcpStream,
    /// The TLS session over `stream`, for a TLS client ([`Raw::open_tls`]).
    pub tls: Option<rustls::ClientConnection>,
    buf: BytesMut,
    pub level: ProtocolLevel,
}

impl Raw {
    pub fn open(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect to broker");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            tls: None,
            buf: BytesMut::new(),
            level: ProtocolLevel::V311,
        }
    }

    /// Opens a TLS connection (as `localhost`); the handshake runs with the first read or write.
    pub fn open_tls(addr: SocketAddr, config: std::sync::Arc<rustls::ClientConfig>) -> Raw {
        let mut r = Raw::open(addr);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        r.tls = Some(rustls::ClientConnection::new(config, name).unwrap());
        r
    }

    /// Reads from the connection (through TLS for a TLS client).
    pub fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.tls {
            Some(tls) => rustls::Stream::new(tls, &mut self.stream).read(buf),
            None => self.stream.read(buf),
        }
    }

    /// Opens a connection whose socket has a receive buffer of (about) `rcvbuf` bytes, so a
    /// client that does not read makes the broker's side fill up soon.
    pub fn open_small(addr: SocketAddr, rcvbuf: usize) -> Raw {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        sock.set_recv_buffer_size(rcvbuf).unwrap();
        sock.connect(&addr.into()).expect("connect to broker");
        let stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            tls: None,
            buf: BytesMut::new(),
            level: ProtocolLevel::V311,
        }
    }

    /// Sends CONNECT (3.1.1, the given keepalive) and expects CONNACK 0.
    pub fn handshake(&mut self, client_id: &str, clean: bool, keep_alive: u16) {
        self.send(&Packet::Connect(Box::new(connect_packet(
            client_id,
            clean,
            ProtocolLevel::V311,
            keep_alive,
            None,
        ))));
        match self.recv() {
            Some(Packet::Connack(a)) if a.code == ConnectReturnCode::Accepted => {}
            other => panic!("expected CONNACK 0, got {other:?}"),
        }
    }

    /// Opens a connection and completes CONNECT/CONNACK.
    pub fn connect(addr: SocketAddr, client_id: &str, clean: bool) -> (Raw, Connack) {
        Self::connect_full(
            addr,
            connect_packet(client_id, clean, ProtocolLevel::V311, 60, None),
        )
    }

    pub fn connect_full(addr: SocketAddr, c: Connect) -> (Raw, Connack) {
        let mut r = Raw::open(addr);
        r.level = c.level;
        r.send(&Packet::Connect(Box::new(c)));
        match r.recv() {
            Some(Packet::Connack(a)) => (r, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects and asserts acceptance.
    pub fn ok(addr: SocketAddr, client_id: &str) -> Raw {
        let (r, a) = Self::connect(addr, client_id, true);
        assert_eq!(a.code, ConnectReturnCode::Accepted);
        r
    }

    pub fn send(&mut self, p: &Packet) {
        let mut b = BytesMut::new();
        encode(p, &mut b);
        self.send_raw(&b);
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        // A broker that already closed may reset the connection; the read side reports it.
        let _ = match &mut self.tls {
            Some(tls) => rustls::Stream::new(tls, &mut self.stream).write_all(bytes),
            None => self.stream.write_all(bytes),
        };
    }

    /// The next packet, `None` if the broker closed the connection. Fails on timeout.
    pub fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT)
            .unwrap_or_else(|| panic!("no packet within {WAIT:?}"))
    }

    /// `Some(packet or None=closed)`, or `None` if nothing arrived within `d`.
    pub fn recv_within(&mut self, d: Duration) -> Option<Option<Packet>> {
        let opts = DecodeOptions {
            max_packet_size: usize::MAX,
            level: self.level,
            expect_connect: false,
        };
        let deadline = Instant::now() + d;
        loop {
            if let Some(p) = decode(&mut self.buf, &opts).expect("broker sent an invalid packet") {
                return Some(Some(p));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.read(&mut chunk) {
                Ok(0) => return Some(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    return None
                }
                Err(_) => return Some(None),
            }
        }
    }

    /// Asserts that nothing arrives within `d`.
    pub fn expect_silence(&mut self, d: Duration) {
        if let Some(p) = self.recv_within(d) {
            panic!("expected nothing, got {p:?}");
        }
    }

    /// Reads until the broker closes the connection; returns the packets seen before.
    pub fn expect_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_within(left) {
                Some(Some(p)) => seen.push(p),
                Some(None) => return seen,
                None => panic!("connection still open after {WAIT:?} (saw {seen:?})"),
            }
        }
    }

    /// Reads (and discards) until the broker closes or resets the connection; fails if it is
    /// still open after `WAIT`.
    pub fn drain_until_closed(&mut self) {
        let deadline = Instant::now() + WAIT;
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "connection still open after {WAIT:?}");
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.read(&mut chunk) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(_) => return,
            }
        }
    }

    /// SUBSCRIBE and wait for the SUBACK (other packets before it are returned too).
    pub fn subscribe(&mut self, filters: &[(&str, QoS)]) -> (Suback, Vec<Packet>) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: filters.iter().map(|(f, q)| (f.to_string(), *q)).collect(),
        }));
        let mut other = Vec::new();
        loop {
            match self.recv() {
                Some(Packet::Suback(s)) => return (s, other),
                Some(p) => other.push(p),
                None => panic!("closed while waiting for SUBACK"),
            }
        }
    }

    pub fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool, packet_id: u16) {
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: topic.into(),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
            payload: Bytes::copy_from_slice(payload),
        }));
    }

    /// The next PUBLISH (acknowledging QoS 1/2 ones as a client would).
    pub fn next_publish(&mut self) -> Publish {
        loop {
            match self.recv() {
                Some(Packet::Publish(p)) => {
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => self.send(&Packet::Puback(p.packet_id)),
                        QoS::ExactlyOnce => self.send(&Packet::Pubrec(p.packet_id)),
                    }
                    return p;
                }
                Some(Packet::Pubrel(id)) => self.send(&Packet::Pubcomp(id)),
                Some(other) => panic!("expected PUBLISH, got {other:?}"),
                None => panic!("closed while waiting for PUBLISH"),
            }
        }
    }

    /// PINGREQ → PINGRESP round trip, proving the connection still works.
    pub fn ping(&mut self) {
        self.send(&Packet::Pingreq);
        loop {
            match self.recv() {
                Some(Packet::Pingresp) => return,
                Some(Packet::Pubrel(id)) => self.send(&Packet::Pubcomp(id)),
                Some(_) => {}
                None => panic!("closed while waiting for PINGRESP"),
            }
        }
    }
}

/// A client id that shard `shard` of `shards` owns.
pub fn id_owned_by(prefix: &str, shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| shardmq::core::route::owner_shard(id.as_bytes(), shards) == shard)
        .unwrap()
}

pub fn connect_packet(
    client_id: &str,
    clean: bool,
    level: ProtocolLevel,
    keep_alive: u16,
    will: Option<LastWill>,
) -> Connect {
    Connect {
        level,
        client_id: client_id.into(),
        clean_session: clean,
        keep_alive,
        will,
        username: None,
        password: None,
    }
}

pub fn will(topic: &str, payload: &str, qos: QoS, retain: bool) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos,
        retain,
    }
}

/// The `shardmq` binary as a child process.
pub mod process {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, ChildStderr, Command, Stdio};
    use std::time::{Duration, Instant};

    /// The broker binary, with no `SHARDMQ_*` or `RUST_LOG` from the test's environment, and
    /// its admin API on a free port (tests run in parallel).
    pub fn bin() -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_shardmq"));
        c.env_remove("RUST_LOG");
        for (k, _) in std::env::vars() {
            if k.starts_with("SHARDMQ") {
                c.env_remove(k);
            }
        }
        c.env("SHARDMQ_ADMIN__BIND", "127.0.0.1:0");
        c.env("SHARDMQ_TCP__LISTENER__EXTERNAL__BIND", "127.0.0.1:0");
        c.env("SHARDMQ_MQTT__SN__BIND", "127.0.0.1");
        c.env("SHARDMQ_MQTT__SN__PORT", "0");
        c.env("SHARDMQ_LWM2M__BIND", "127.0.0.1");
        c.env("SHARDMQ_LWM2M__PORT", "0");
        c
    }

    /// Starts the broker on `bind`, logging at info to a pipe.
    pub fn spawn_broker(bind: &str) -> Child {
        spawn_broker_with(bind, &[])
    }

    /// [`spawn_broker`] with more settings in its environment.
    pub fn spawn_broker_with(bind: &str, env: &[(&str, &str)]) -> Child {
        bin()
            .envs(env.iter().copied())
            .env("SHARDMQ_LISTENER__TCP__EXTERNAL__BIND", bind)
            .env("SHARDMQ_LISTENER__WS__EXTERNAL__BIND", "127.0.0.1:0")
            .env("SHARDMQ_LOG__LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Reads the log until the listen line and returns the address it names.
    pub fn listen_addr(child: &mut Child) -> (std::net::SocketAddr, BufReader<ChildStderr>) {
        let mut r = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                r.read_line(&mut line).unwrap() > 0,
                "broker exited before listening"
            );
            if line.contains("listening for MQTT") {
                let addr = line
                    .split("addr=")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap();
                return (addr.parse().unwrap(), r);
            }
        }
    }

    /// Waits for the child to exit (killing it and failing after `within`).
    pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > within {
                let _ = child.kill();
                panic!("broker did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of process `pid`, in bytes.
    pub fn rss(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }
}

/// The test certificates, made once per test binary.
pub fn test_certs() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("shardmq-tls-tests-{}", std::process::id()));
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gen-test-certs.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg(&dir)
            .output()
            .expect("run scripts/gen-test-certs.sh");
        assert!(
            out.status.success(),
            "gen-test-certs.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// A TLS client configuration trusting `ca` (a file in the certificate directory), presenting
/// the certificate `client` (`client` or `other-client`) if given.
pub fn tls_client_config(ca: &str, client: Option<&str>) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let dir = test_certs();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.join(ca)).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain =
                rustls::pki_types::CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key")))
                    .unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    std::sync::Arc::new(config)
}
