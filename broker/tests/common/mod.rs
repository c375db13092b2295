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
    c.log.level = "warn".into();
    c
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

/// A raw MQTT client.
pub struct Raw {
    pub stream: TcpStream,
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
            buf: BytesMut::new(),
            level: ProtocolLevel::V311,
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
        let _ = self.stream.write_all(bytes);
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
            match self.stream.read(&mut chunk) {
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
