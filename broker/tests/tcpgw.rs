//! The private TCP gateway against a real broker with two shards, over raw sockets in the
//! frames of ../shared/specs/protocols.md §1: CONNECT/CONNACK, data both ways with MQTT clients
//! (client ids owned by the gateway's shard and by the other), PING/PONG, the admin API's view,
//! bad version, credentials, idle and keepalive timeouts, bad frames, takeover, and force
//! shutdown of a device that stops reading.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use shardmq::protocol::mqtt::{Packet, QoS};
use shardmq::protocol::tcpgw::{self, Frame};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

struct Device {
    stream: TcpStream,
    buf: BytesMut,
}

impl Device {
    fn open(addr: SocketAddr) -> Device {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Device {
            stream,
            buf: BytesMut::new(),
        }
    }

    fn send(&mut self, f: &Frame) {
        let mut b = BytesMut::new();
        tcpgw::encode(f, &mut b);
        self.stream.write_all(&b).unwrap();
    }

    fn send_raw(&mut self, b: &[u8]) {
        self.stream.write_all(b).unwrap();
    }

    /// The next frame, `None` when the broker closed the connection.
    fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = tcpgw::decode(&mut self.buf, 1 << 16).unwrap() {
                return Some(f);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    panic!("no frame within {WAIT:?}")
                }
                Err(_) => return None,
            }
        }
    }

    fn expect_closed(&mut self) {
        let start = Instant::now();
        while let Some(f) = self.recv() {
            assert!(start.elapsed() < WAIT, "still open, last frame {f:?}");
        }
    }

    fn connect(addr: SocketAddr, cid: &str, keepalive: u8) -> (Device, Frame) {
        let mut d = Device::open(addr);
        d.send(&Frame::Connect {
            keepalive,
            client_id: cid.into(),
            username: None,
            password: None,
        });
        let ack = d.recv().expect("CONNACK");
        (d, ack)
    }

    fn ok(addr: SocketAddr, cid: &str) -> Device {
        let (d, ack) = Device::connect(addr, cid, 60);
        assert_eq!(
            ack,
            Frame::Connack {
                code: 0,
                message: "Connect Successfully".into()
            }
        );
        d
    }
}

fn gateway(b: &Broker) -> SocketAddr {
    b.handle()
        .addr("gateway.tcp")
        .expect("the TCP gateway listens")
}

#[test]
fn devices_exchange_data_with_mqtt_clients_wherever_their_id_is_owned() {
    let b = Broker::start(config(2));
    let shards = b.handle().shards().len();
    let gw = gateway(&b);
    for owner in 0..shards {
        let cid = id_owned_by(&format!("dev{owner}"), owner, shards);
        let mut watcher = Raw::ok(b.addr, &format!("watch{owner}"));
        watcher.subscribe(&[(format!("tcp/{cid}/up").as_str(), QoS::AtMostOnce)]);
        let mut events = Raw::ok(b.addr, &format!("events{owner}"));
        events.subscribe(&[(
            format!("$SYS/broker/clients/{cid}/connected").as_str(),
            QoS::AtMostOnce,
        )]);
        let mut d = Device::ok(gw, &cid);
        let event: serde_json::Value =
            serde_json::from_slice(&events.next_publish().payload).unwrap();
        assert_eq!(
            (event["proto_name"].as_str(), event["proto_ver"].as_u64()),
            (Some("tcp"), Some(1))
        );
        d.send(&Frame::Data(Bytes::from_static(b"temperature=21")));
        let up = watcher.next_publish();
        assert_eq!(&up.payload[..], b"temperature=21");
        assert!(!up.retain);
        let mut app = Raw::ok(b.addr, &format!("app{owner}"));
        app.publish(
            &format!("tcp/{cid}/dn"),
            b"reboot",
            QoS::AtLeastOnce,
            false,
            1,
        );
        assert_eq!(d.recv(), Some(Frame::Data(Bytes::from_static(b"reboot"))));
        d.send(&Frame::Ping);
        assert_eq!(d.recv(), Some(Frame::Pong));
        // The admin API lists the device with its protocol.
        let admin = b.handle().admin_addr().unwrap();
        let v = http(admin, "GET", &format!("/api/v1/clients/{cid}"), &[], "").json();
        assert_eq!(v["proto_name"], "tcp", "{v}");
        d.send(&Frame::Disconnect);
        d.expect_closed();
    }
    b.wait_metrics("frames counted", |m| {
        m.tcpgw_frames_received >= 8 && m.tcpgw_frames_sent >= 6
    });
}

#[test]
fn bad_frames_versions_and_timeouts_close_the_connection() {
    let mut cfg = config(2);
    cfg.tcp.proto.idle_timeout = shardmq::config::Duration::secs(1);
    cfg.tcp.proto.max_packet_size = shardmq::config::ByteSize(100);
    let b = Broker::start(cfg);
    let gw = gateway(&b);
    // CONNECT with version 2: CONNACK 2, closed.
    let mut d = Device::open(gw);
    d.send_raw(&[0x12, 0x00, 0x07, 0x3c, 0x00, 0x04, b'a', b'b', b'c', b'd']);
    assert!(matches!(d.recv(), Some(Frame::Connack { code: 2, .. })));
    d.expect_closed();
    // A first frame other than CONNECT; a reserved type; an oversized DATATRANS; a second
    // CONNECT.
    let mut d = Device::open(gw);
    d.send(&Frame::Ping);
    d.expect_closed();
    let mut d = Device::ok(gw, "reserved");
    d.send_raw(&[0x90]);
    d.expect_closed();
    let mut d = Device::ok(gw, "oversized");
    d.send(&Frame::Data(Bytes::from(vec![0u8; 101])));
    d.expect_closed();
    let mut d = Device::ok(gw, "twice");
    d.send(&Frame::Connect {
        keepalive: 60,
        client_id: "twice".into(),
        username: None,
        password: None,
    });
    d.expect_closed();
    // No CONNECT within tcp.proto.idle_timeout (1 s).
    let started = Instant::now();
    let mut idle = Device::open(gw);
    idle.expect_closed();
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Keepalive 1 s (× 1.5): silence ends the connection, PINGs keep it.
    let (mut ka, _) = Device::connect(gw, "ka", 1);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        ka.send(&Frame::Ping);
        assert_eq!(ka.recv(), Some(Frame::Pong));
    }
    let started = Instant::now();
    ka.expect_closed();
    assert!(started.elapsed() >= Duration::from_millis(1000));
    b.wait_metrics("errors counted", |m| {
        m.malformed_packets >= 2 && m.protocol_errors >= 3 && m.keepalive_timeouts >= 1
    });
}

#[test]
fn credentials_go_through_the_brokers_authentication() {
    let dir = temp_dir("tcpgw-auth");
    let file = dir.join("passwd");
    shardmq::auth::password::set_user(&file, "meter", Some("s3cret-pass")).unwrap();
    let mut cfg = config(2);
    cfg.auth.password_file = Some(file);
    cfg.auth.allow_anonymous = shardmq::config::AllowAnonymous::False;
    let b = Broker::start(cfg);
    let gw = gateway(&b);
    let (mut anon, ack) = Device::connect(gw, "anon", 60);
    assert!(matches!(ack, Frame::Connack { code: 1, .. }), "{ack:?}");
    anon.expect_closed();
    let mut bad = Device::open(gw);
    bad.send(&Frame::Connect {
        keepalive: 60,
        client_id: "m1".into(),
        username: Some("meter".into()),
        password: Some(Bytes::from_static(b"wrong")),
    });
    assert!(matches!(bad.recv(), Some(Frame::Connack { code: 1, .. })));
    bad.expect_closed();
    let mut good = Device::open(gw);
    good.send(&Frame::Connect {
        keepalive: 60,
        client_id: "m1".into(),
        username: Some("meter".into()),
        password: Some(Bytes::from_static(b"s3cret-pass")),
    });
    assert!(matches!(good.recv(), Some(Frame::Connack { code: 0, .. })));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_same_client_id_takes_over_and_a_device_that_stops_reading_is_shut_down() {
    let mut cfg = config(2);
    cfg.tcp.proto.force_shutdown_policy = "50|1MB".into();
    let b = Broker::start(cfg);
    let shards = b.handle().shards().len();
    let gw = gateway(&b);
    for owner in 0..shards {
        let cid = id_owned_by(&format!("take{owner}"), owner, shards);
        let mut first = Device::ok(gw, &cid);
        let mut second = Device::ok(gw, &cid);
        first.expect_closed();
        let mut app = Raw::ok(b.addr, &format!("takeapp{owner}"));
        app.publish(
            &format!("tcp/{cid}/dn"),
            b"to-second",
            QoS::AtMostOnce,
            false,
            0,
        );
        assert_eq!(
            second.recv(),
            Some(Frame::Data(Bytes::from_static(b"to-second")))
        );
    }
    // A device that never reads: the kernel's buffers fill, then the gateway's; past 50
    // frames it is disconnected, while another device gets everything.
    let slow_id = "slow-dev";
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&gw.into()).unwrap();
    let mut slow = Device {
        stream: socket.into(),
        buf: BytesMut::new(),
    };
    slow.stream.set_read_timeout(Some(WAIT)).unwrap();
    slow.send(&Frame::Connect {
        keepalive: 0,
        client_id: slow_id.into(),
        username: None,
        password: None,
    });
    assert!(matches!(slow.recv(), Some(Frame::Connack { code: 0, .. })));
    let mut app = Raw::ok(b.addr, "flooder");
    let payload = vec![7u8; 2048];
    for i in 1..=2000u16 {
        app.publish(
            &format!("tcp/{slow_id}/dn"),
            &payload,
            QoS::AtLeastOnce,
            false,
            i,
        );
        assert_eq!(app.recv(), Some(Packet::Puback(i)));
    }
    b.wait_metrics("device shut down", |m| m.force_shutdowns >= 1);
    // What it had not read is there, then the end.
    let start = Instant::now();
    while slow.recv().is_some() {
        assert!(start.elapsed() < WAIT);
    }
}

/// `/api/v1/gateways`: the list shows the gateway; unloading closes its listener and its
/// devices (their wills published, as after a network error); loading binds again, on the same
/// port; a port taken meanwhile makes the load fail with the reason.
#[test]
fn unload_and_load_through_the_admin_api() {
    let b = Broker::start(config(2));
    let admin = b.handle().admin_addr().unwrap();
    let gw = gateway(&b);
    let list = http(admin, "GET", "/api/v1/gateways", &[], "").json();
    assert_eq!(list["data"][0]["name"], "tcp", "{list}");
    assert_eq!(list["data"][0]["state"], "running");
    assert_eq!(list["data"][0]["bind"], gw.to_string());
    let mut d = Device::ok(gw, "unloaded-dev");
    let deadline = Instant::now() + WAIT;
    while http(admin, "GET", "/api/v1/gateways", &[], "").json()["data"][0]["connections"] != 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = http(admin, "POST", "/api/v1/gateways/tcp/unload", &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "stopped");
    d.expect_closed();
    assert!(TcpStream::connect(gw).is_err(), "the listener is closed");
    let r = http(admin, "POST", "/api/v1/gateways/tcp/load", &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    Device::ok(gw, "reloaded-dev");
    // Loading a running gateway changes nothing; unknown names and actions are refused.
    assert_eq!(
        http(admin, "POST", "/api/v1/gateways/tcp/load", &[], "").status,
        200
    );
    assert_eq!(
        http(admin, "POST", "/api/v1/gateways/coap/load", &[], "").status,
        404
    );
    assert_eq!(
        http(admin, "POST", "/api/v1/gateways/tcp/restart", &[], "").status,
        400
    );
    // A port another process took while the gateway was down: the load fails, saying why.
    assert_eq!(
        http(admin, "POST", "/api/v1/gateways/tcp/unload", &[], "").status,
        200
    );
    let squatter = std::net::TcpListener::bind(gw).unwrap();
    let r = http(admin, "POST", "/api/v1/gateways/tcp/load", &[], "");
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("cannot bind"));
    assert_eq!(
        http(admin, "GET", "/api/v1/gateways", &[], "").json()["data"][0]["state"],
        "failed"
    );
    drop(squatter);
    assert_eq!(
        http(admin, "POST", "/api/v1/gateways/tcp/load", &[], "").status,
        200
    );
    Device::ok(gw, "after-failure");
}

/// `tcp.listener.ssl.external`: devices over TLS, authenticated as any client; a client that
/// does not speak TLS is refused and counted; the gateways list shows the TLS address.
#[test]
fn devices_connect_over_tls() {
    let mut cfg = config(2);
    let dir = test_certs();
    let ssl = &mut cfg.tcp.listener.ssl.external;
    ssl.bind = "127.0.0.1:0".parse().unwrap();
    ssl.certfile = Some(dir.join("server.crt"));
    ssl.keyfile = Some(dir.join("server.key"));
    let b = Broker::start(cfg);
    let tls_addr = b
        .handle()
        .addr("gateway.tcp.ssl")
        .expect("the TLS gateway listens");
    let mut watcher = Raw::ok(b.addr, "tls-watch");
    watcher.subscribe(&[("tcp/tls-dev/up", QoS::AtMostOnce)]);
    let tcp = TcpStream::connect(tls_addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let conn = rustls::ClientConnection::new(
        tls_client_config("ca.crt", None),
        rustls::pki_types::ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut out = BytesMut::new();
    tcpgw::encode(
        &Frame::Connect {
            keepalive: 60,
            client_id: "tls-dev".into(),
            username: None,
            password: None,
        },
        &mut out,
    );
    tcpgw::encode(&Frame::Data(Bytes::from_static(b"over tls")), &mut out);
    s.write_all(&out).unwrap();
    let mut buf = BytesMut::new();
    let ack = loop {
        if let Some(f) = tcpgw::decode(&mut buf, 1 << 16).unwrap() {
            break f;
        }
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before CONNACK");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert!(matches!(ack, Frame::Connack { code: 0, .. }), "{ack:?}");
    assert_eq!(&watcher.next_publish().payload[..], b"over tls");
    // Plain bytes on the TLS port.
    let mut plain = Device::open(tls_addr);
    plain.send_raw(&[0x11, 0x00, 0x07, 0x3c, 0x00, 0x04, b'a', b'b', b'c', b'd']);
    // The broker answers with a TLS alert, not a frame, and closes.
    let mut sink = Vec::new();
    let _ = plain.stream.read_to_end(&mut sink);
    b.wait_metrics("handshake failure counted", |m| {
        m.tls_handshake_failures >= 1
    });
    let admin = b.handle().admin_addr().unwrap();
    let v = http(admin, "GET", "/api/v1/gateways", &[], "").json();
    assert_eq!(v["data"][0]["tls_bind"], tls_addr.to_string(), "{v}");
}
