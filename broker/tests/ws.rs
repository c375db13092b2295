//! MQTT over WebSocket against a real broker: the HTTP upgrade (path, subprotocols), binary
//! frames carrying any cut of the packet stream, text frames refused, and QoS 1 between a
//! WebSocket client and a TCP client on another shard. The client side is tungstenite's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use common::*;
use shardmq::protocol::mqtt::{self, DecodeOptions, Packet, ProtocolLevel, QoS, Subscribe};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

struct WsClient {
    ws: WebSocket<TcpStream>,
    buf: BytesMut,
    protocol: Option<String>,
}

/// Opens `ws://addr{path}` offering `protocols`; the HTTP status on refusal.
fn open(addr: SocketAddr, path: &str, protocols: &[&str]) -> Result<WsClient, u16> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    if !protocols.is_empty() {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            protocols.join(", ").parse().unwrap(),
        );
    }
    match tungstenite::client(req, tcp) {
        Ok((ws, resp)) => Ok(WsClient {
            ws,
            buf: BytesMut::new(),
            protocol: resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_string()),
        }),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Err(resp.status().as_u16())
        }
        Err(e) => panic!("handshake: {e:?}"),
    }
}

/// Sends an upgrade request by hand and returns the response head (status line and
/// headers, lower-cased), for what a strict client would refuse to look at.
fn raw_upgrade(addr: SocketAddr, path: &str, protocols: &str) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if !protocols.is_empty() {
        req.push_str(&format!("Sec-WebSocket-Protocol: {protocols}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

fn ws_addr(b: &Broker) -> SocketAddr {
    b.handle().addr("ws.external").expect("WebSocket listener")
}

impl WsClient {
    fn send_bytes(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).unwrap();
    }

    fn send(&mut self, p: &Packet) {
        self.send_bytes(mqtt::encode_to_bytes(p).to_vec());
    }

    /// The next packet, reading frames as needed.
    fn recv(&mut self) -> Packet {
        loop {
            let opts = DecodeOptions {
                expect_connect: false,
                ..DecodeOptions::default()
            };
            if let Some(p) = mqtt::decode(&mut self.buf, &opts).unwrap() {
                return p;
            }
            match self.ws.read().unwrap() {
                Message::Binary(b) => self.buf.extend_from_slice(&b),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    }

    fn connect(&mut self, client_id: &str) {
        let c = connect_packet(client_id, true, ProtocolLevel::V311, 30, None);
        self.send(&Packet::Connect(Box::new(c)));
        assert!(
            matches!(self.recv(), Packet::Connack(c) if c.code == mqtt::ConnectReturnCode::Accepted)
        );
    }
}

#[test]
fn qos1_round_trips_between_websocket_and_tcp_clients_on_either_shard() {
    let b = Broker::with_shards(2);
    // One client id owned by each shard: whichever shard accepts, one is local, one remote.
    for round in 0..2 {
        let id = (0..)
            .map(|i| format!("ws-{round}-{i}"))
            .find(|id| shardmq::core::route::owner_shard(id.as_bytes(), 2) == round)
            .unwrap();
        let mut w = open(ws_addr(&b), "/mqtt", &["mqtt"]).unwrap();
        assert_eq!(w.protocol.as_deref(), Some("mqtt"));
        w.connect(&id);
        w.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(format!("to/ws/{round}"), QoS::AtLeastOnce)],
        }));
        assert!(matches!(w.recv(), Packet::Suback(_)));
        let mut t = Raw::ok(b.addr, &format!("tcp-{round}"));
        t.subscribe(&[(&format!("to/tcp/{round}"), QoS::AtLeastOnce)]);
        // TCP -> WebSocket.
        t.publish(
            &format!("to/ws/{round}"),
            b"over tcp",
            QoS::AtLeastOnce,
            false,
            5,
        );
        assert_eq!(t.recv(), Some(Packet::Puback(5)));
        match w.recv() {
            Packet::Publish(p) => {
                assert_eq!(
                    (&p.payload[..], p.qos),
                    (&b"over tcp"[..], QoS::AtLeastOnce)
                );
                w.send(&Packet::Puback(p.packet_id));
            }
            other => panic!("{other:?}"),
        }
        // WebSocket -> TCP.
        w.send(&Packet::Publish(mqtt::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: format!("to/tcp/{round}").as_str().into(),
            packet_id: 9,
            payload: bytes::Bytes::from_static(b"over ws"),
        }));
        assert_eq!(w.recv(), Packet::Puback(9));
        let p = t.next_publish();
        assert_eq!(&p.payload[..], b"over ws");
    }
}

#[test]
fn packets_may_span_frames_and_share_them() {
    let b = Broker::with_shards(1);
    let mut w = open(ws_addr(&b), "/mqtt", &["mqttv3.1.1"]).unwrap();
    assert_eq!(w.protocol.as_deref(), Some("mqttv3.1.1"));
    let connect = mqtt::encode_to_bytes(&Packet::Connect(Box::new(connect_packet(
        "split",
        true,
        ProtocolLevel::V311,
        30,
        None,
    ))));
    let (a, rest) = connect.split_at(5);
    w.send_bytes(a.to_vec());
    w.send_bytes(rest.to_vec());
    assert!(matches!(w.recv(), Packet::Connack(_)));
    let mut two = mqtt::encode_to_bytes(&Packet::Subscribe(Subscribe {
        packet_id: 3,
        filters: vec![("s/#".into(), QoS::AtMostOnce)],
    }))
    .to_vec();
    two.extend_from_slice(&mqtt::encode_to_bytes(&Packet::Pingreq));
    w.send_bytes(two);
    assert!(matches!(w.recv(), Packet::Suback(s) if s.packet_id == 3));
    assert_eq!(w.recv(), Packet::Pingresp);
}

#[test]
fn subprotocols_are_negotiated_and_paths_checked() {
    let b = Broker::with_shards(1);
    let addr = ws_addr(&b);
    // The first accepted one the client offers is echoed.
    let w = open(addr, "/mqtt", &["foo", "mqttv3.1", "mqtt"]).unwrap();
    assert_eq!(w.protocol.as_deref(), Some("mqttv3.1"));
    // None accepted (or none offered) is let in without one by default.
    let head = raw_upgrade(addr, "/mqtt", "foo");
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("sec-websocket-protocol"), "{head}");
    assert_eq!(open(addr, "/mqtt", &[]).unwrap().protocol, None);
    assert_eq!(open(addr, "/elsewhere", &["mqtt"]).err(), Some(404));
    b.wait_metrics("refusal counted", |m| m.ws_handshake_failures >= 1);

    let mut cfg = config(1);
    cfg.listener
        .ws
        .get_mut("external")
        .unwrap()
        .fail_if_no_subprotocol = true;
    let strict = Broker::start(cfg);
    let addr = ws_addr(&strict);
    assert!(raw_upgrade(addr, "/mqtt", "foo").starts_with("http/1.1 400"));
    assert_eq!(open(addr, "/mqtt", &[]).err(), Some(400));
    assert!(open(addr, "/mqtt", &["mqtt"]).is_ok());
}

#[test]
fn a_text_frame_closes_the_connection_with_1003() {
    let b = Broker::with_shards(1);
    let mut w = open(ws_addr(&b), "/mqtt", &["mqtt"]).unwrap();
    w.connect("texter");
    w.ws.send(Message::Text("hello".into())).unwrap();
    loop {
        match w.ws.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(frame.code, CloseCode::Unsupported);
                break;
            }
            Ok(Message::Close(None)) => panic!("closed without a code"),
            Ok(_) => {}
            Err(e) => panic!("no close frame before the end: {e}"),
        }
    }
    b.wait_metrics("the violation counted", |m| {
        m.transport_violations == 1 && m.connections_closed >= 1
    });
}

#[test]
fn a_silent_upgrade_times_out() {
    let mut cfg = config(1);
    cfg.listener
        .ws
        .get_mut("external")
        .unwrap()
        .handshake_timeout = shardmq::config::Duration::millis(300);
    let b = Broker::start(cfg);
    let mut s = TcpStream::connect(ws_addr(&b)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::Read;
    let mut buf = [0u8; 16];
    // Nothing sent: the broker closes the socket after the handshake timeout.
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    b.wait_metrics("timeout counted", |m| m.ws_handshake_failures == 1);
}

#[test]
fn a_frame_above_max_frame_size_closes_with_1009() {
    let mut cfg = config(1);
    cfg.listener.ws.get_mut("external").unwrap().max_frame_size = shardmq::config::ByteSize(64);
    frame_of_200_bytes_closes_with_1009(cfg);
    // mqtt.max_packet_size caps frames too, whatever max_frame_size says.
    let mut cfg = config(1);
    cfg.mqtt.max_packet_size = shardmq::config::ByteSize(64);
    frame_of_200_bytes_closes_with_1009(cfg);
}

fn frame_of_200_bytes_closes_with_1009(cfg: shardmq::config::Config) {
    let b = Broker::start(cfg);
    let mut w = open(ws_addr(&b), "/mqtt", &["mqtt"]).unwrap();
    w.connect("big");
    w.send_bytes(vec![0u8; 200]);
    loop {
        match w.ws.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(frame.code, CloseCode::Size);
                break;
            }
            Ok(Message::Close(None)) => panic!("closed without a code"),
            Ok(_) => {}
            Err(e) => panic!("no close frame before the end: {e}"),
        }
    }
    b.wait_metrics("the violation counted", |m| m.transport_violations == 1);
}

#[test]
fn a_large_delivery_arrives_whole_across_frames() {
    let b = Broker::with_shards(2);
    let mut w = open(ws_addr(&b), "/mqtt", &["mqtt"]).unwrap();
    w.connect("big-reader");
    w.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![("big/+".into(), QoS::AtLeastOnce)],
    }));
    assert!(matches!(w.recv(), Packet::Suback(_)));
    // Larger than one outgoing frame (64 KB): the broker splits it, the client joins it.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut t = Raw::ok(b.addr, "big-writer");
    t.publish("big/1", &payload, QoS::AtLeastOnce, false, 2);
    assert_eq!(t.recv(), Some(Packet::Puback(2)));
    match w.recv() {
        Packet::Publish(p) => assert!(p.payload[..] == payload[..], "payload changed"),
        other => panic!("{other:?}"),
    }
}
