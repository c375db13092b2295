//! MQTT over TLS and over WebSocket over TLS against a real broker: QoS 1 between a TLS (or
//! WSS) client and a TCP client, with the client id owned by either shard; client
//! certificates (accepted from the configured CA, refused from another CA or when missing);
//! handshakes that time out or are not TLS at all; certificate files that cannot be read.
//! Clients: rustls (under the raw client and under tungstenite) and rumqttc. Certificates come
//! from `scripts/gen-test-certs.sh`, made afresh for each run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use common::*;
use common::{test_certs as certs, tls_client_config as client_config};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use shardmq::config::{Config, PeerCertAsUsername, TlsVerify};
use shardmq::protocol::mqtt::{self, DecodeOptions, Packet, ProtocolLevel, QoS, Subscribe};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

/// `config(shards)` with the TLS and WSS listeners on free loopback ports.
fn tls_config(shards: usize) -> Config {
    let mut c = config(shards);
    let dir = certs();
    let ssl = c.listener.ssl.get_mut("external").unwrap();
    ssl.bind = "127.0.0.1:0".parse().unwrap();
    ssl.certfile = Some(dir.join("server.crt"));
    ssl.keyfile = Some(dir.join("server.key"));
    let wss = c.listener.wss.get_mut("external").unwrap();
    wss.bind = "127.0.0.1:0".parse().unwrap();
    wss.certfile = Some(dir.join("server.crt"));
    wss.keyfile = Some(dir.join("server.key"));
    c
}

/// `tls_config` whose TLS listener asks for client certificates from the test CA.
fn mutual_config(fail_if_no_peer_cert: bool) -> Config {
    let mut c = tls_config(2);
    let ssl = c.listener.ssl.get_mut("external").unwrap();
    ssl.verify = TlsVerify::VerifyPeer;
    ssl.cacertfile = Some(certs().join("ca.crt"));
    ssl.fail_if_no_peer_cert = fail_if_no_peer_cert;
    ssl.peer_cert_as_username = Some(PeerCertAsUsername::Cn);
    c
}

fn ssl_addr(b: &Broker) -> SocketAddr {
    b.handle().addr("ssl.external").expect("TLS listener")
}

/// Whether a CONNECT over TLS with `config` is answered with CONNACK 0 (`false`: the
/// handshake or the connection was refused).
fn connects(addr: SocketAddr, config: Arc<ClientConfig>, client_id: &str) -> bool {
    let mut r = Raw::open_tls(addr, config);
    r.send(&Packet::Connect(Box::new(connect_packet(
        client_id,
        true,
        ProtocolLevel::V311,
        30,
        None,
    ))));
    matches!(r.recv(), Some(Packet::Connack(a)) if a.code == mqtt::ConnectReturnCode::Accepted)
}

#[test]
fn qos1_round_trips_between_tls_and_tcp_clients_on_either_shard() {
    let b = Broker::start(tls_config(2));
    let tls = client_config("ca.crt", None);
    for round in 0..2 {
        let id = id_owned_by(&format!("tls-{round}"), round, 2);
        let mut s = Raw::open_tls(ssl_addr(&b), tls.clone());
        s.handshake(&id, true, 30);
        s.subscribe(&[(&format!("to/tls/{round}"), QoS::AtLeastOnce)]);
        let mut t = Raw::ok(b.addr, &id_owned_by(&format!("tcp-{round}"), 1 - round, 2));
        t.subscribe(&[(&format!("to/tcp/{round}"), QoS::AtLeastOnce)]);

        t.publish(
            &format!("to/tls/{round}"),
            b"over tcp",
            QoS::AtLeastOnce,
            false,
            5,
        );
        assert_eq!(t.recv(), Some(Packet::Puback(5)));
        let p = s.next_publish();
        assert_eq!(
            (&p.payload[..], p.qos),
            (&b"over tcp"[..], QoS::AtLeastOnce)
        );
        s.send(&Packet::Puback(p.packet_id));

        s.publish(
            &format!("to/tcp/{round}"),
            b"over tls",
            QoS::AtLeastOnce,
            false,
            9,
        );
        assert_eq!(s.recv(), Some(Packet::Puback(9)));
        assert_eq!(&t.next_publish().payload[..], b"over tls");
    }
}

#[test]
fn rumqttc_over_tls_exchanges_qos1_messages_with_a_tcp_client() {
    use rumqttc::{Client, Event, Incoming, MqttOptions, TlsConfiguration, Transport};
    let b = Broker::start(tls_config(2));
    let addr = ssl_addr(&b);
    let mut o = MqttOptions::new("rumqttc-tls", "localhost", addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: std::fs::read(certs().join("ca.crt")).unwrap(),
        alpn: None,
        client_auth: None,
    }));
    let (client, mut conn) = Client::new(o, 10);
    client
        .subscribe("tls/in", rumqttc::QoS::AtLeastOnce)
        .unwrap();
    let mut tcp = Raw::ok(b.addr, "tcp-peer");
    tcp.subscribe(&[("tls/out", QoS::AtLeastOnce)]);
    let mut published = false;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(std::time::Instant::now() < deadline, "no message over TLS");
        match conn.recv_timeout(WAIT) {
            Ok(Ok(Event::Incoming(Incoming::SubAck(_)))) if !published => {
                published = true;
                tcp.publish("tls/in", b"to rumqttc", QoS::AtLeastOnce, false, 3);
                assert_eq!(tcp.recv(), Some(Packet::Puback(3)));
            }
            Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                assert_eq!(&p.payload[..], b"to rumqttc");
                assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
                break;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("rumqttc: {e}"),
            Err(_) => panic!("nothing from rumqttc within {WAIT:?}"),
        }
    }
    client
        .publish("tls/out", rumqttc::QoS::AtLeastOnce, false, "from rumqttc")
        .unwrap();
    // rumqttc sends from its event loop: run it until the broker acknowledges.
    loop {
        match conn.recv_timeout(WAIT) {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("rumqttc: {e}"),
            Err(_) => panic!("no PUBACK for rumqttc within {WAIT:?}"),
        }
    }
    assert_eq!(&tcp.next_publish().payload[..], b"from rumqttc");
}

#[test]
fn mqtt_over_wss_round_trips_with_a_tcp_client_on_either_shard() {
    let b = Broker::start(tls_config(2));
    let addr = b.handle().addr("wss.external").expect("WSS listener");
    for round in 0..2 {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = ClientConnection::new(client_config("ca.crt", None), name).unwrap();
        let mut req = format!("wss://localhost:{}/mqtt", addr.port())
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
        let (mut ws, resp) = tungstenite::client(req, StreamOwned::new(tls, tcp)).unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
        let send = |ws: &mut tungstenite::WebSocket<_>, p: &Packet| {
            ws.send(Message::Binary(mqtt::encode_to_bytes(p).to_vec().into()))
                .unwrap()
        };
        let mut buf = BytesMut::new();
        let mut recv =
            |ws: &mut tungstenite::WebSocket<StreamOwned<ClientConnection, TcpStream>>| loop {
                let opts = DecodeOptions {
                    expect_connect: false,
                    ..DecodeOptions::default()
                };
                if let Some(p) = mqtt::decode(&mut buf, &opts).unwrap() {
                    return p;
                }
                match ws.read().unwrap() {
                    Message::Binary(b) => buf.extend_from_slice(&b),
                    Message::Ping(_) | Message::Pong(_) => {}
                    other => panic!("expected a binary frame, got {other:?}"),
                }
            };
        let id = id_owned_by(&format!("wss-{round}"), round, 2);
        let c = connect_packet(&id, true, ProtocolLevel::V311, 30, None);
        send(&mut ws, &Packet::Connect(Box::new(c)));
        assert!(matches!(recv(&mut ws), Packet::Connack(_)));
        send(
            &mut ws,
            &Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![(format!("to/wss/{round}"), QoS::AtLeastOnce)],
            }),
        );
        assert!(matches!(recv(&mut ws), Packet::Suback(_)));
        let mut t = Raw::ok(b.addr, &format!("tcp-{round}"));
        t.publish(
            &format!("to/wss/{round}"),
            b"over tcp",
            QoS::AtLeastOnce,
            false,
            5,
        );
        assert_eq!(t.recv(), Some(Packet::Puback(5)));
        match recv(&mut ws) {
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], b"over tcp");
                send(&mut ws, &Packet::Puback(p.packet_id));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn client_certificates_from_the_configured_ca_are_accepted_and_others_refused() {
    let b = Broker::start(mutual_config(true));
    let addr = ssl_addr(&b);
    assert!(connects(
        addr,
        client_config("ca.crt", Some("client")),
        "device-7"
    ));
    assert!(!connects(
        addr,
        client_config("ca.crt", Some("other-client")),
        "intruder"
    ));
    assert!(!connects(addr, client_config("ca.crt", None), "anonymous"));
    b.wait_metrics("both refusals counted", |m| m.tls_handshake_failures == 2);
    // A server the client does not trust is refused by the client, and counted here too.
    assert!(!connects(
        addr,
        client_config("other-ca.crt", Some("client")),
        "x"
    ));
    b.wait_metrics("the client's refusal counted", |m| {
        m.tls_handshake_failures == 3
    });

    // Without fail_if_no_peer_cert a client may come without one, but not with a bad one.
    let lenient = Broker::start(mutual_config(false));
    let addr = ssl_addr(&lenient);
    assert!(connects(addr, client_config("ca.crt", None), "anonymous"));
    assert!(connects(
        addr,
        client_config("ca.crt", Some("client")),
        "device-7"
    ));
    assert!(!connects(
        addr,
        client_config("ca.crt", Some("other-client")),
        "intruder"
    ));
}

#[test]
fn the_cn_of_a_verified_certificate_names_the_user() {
    let name = |which| {
        let pem = std::fs::read(certs().join("client.crt")).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        shardmq::transport::tls::peer_name(&der, which)
    };
    assert_eq!(name(PeerCertAsUsername::Cn).as_deref(), Some("device-7"));
    assert_eq!(
        name(PeerCertAsUsername::Dn).as_deref(),
        Some("CN=device-7,O=ShardMQ tests")
    );
}

#[test]
fn a_silent_client_or_one_that_does_not_speak_tls_is_let_go() {
    let mut cfg = tls_config(1);
    cfg.listener
        .ssl
        .get_mut("external")
        .unwrap()
        .handshake_timeout = shardmq::config::Duration::millis(300);
    let b = Broker::start(cfg);
    let addr = ssl_addr(&b);
    let mut buf = [0u8; 64];
    // Nothing sent: closed after the handshake timeout.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    b.wait_metrics("the timeout counted", |m| m.tls_handshake_failures == 1);
    // Plain MQTT on the TLS port: an alert at most, then the end.
    let mut r = Raw::open(addr);
    r.send(&Packet::Connect(Box::new(connect_packet(
        "plain",
        true,
        ProtocolLevel::V311,
        30,
        None,
    ))));
    let mut total = 0;
    loop {
        match r.stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
        assert!(total < 64, "more than an alert came back");
    }
    b.wait_metrics("the refusal counted", |m| m.tls_handshake_failures == 2);
    // The TCP listener is unaffected.
    Raw::ok(b.addr, "still-here");
}

#[test]
fn an_unreadable_certificate_is_a_start_error_naming_the_key_and_the_file() {
    let mut cfg = tls_config(1);
    cfg.listener.ssl.get_mut("external").unwrap().certfile =
        Some(PathBuf::from("/nonexistent/server.crt"));
    cfg.validate().unwrap();
    let err = shardmq::shard::start(&cfg)
        .err()
        .expect("start fails")
        .to_string();
    assert!(
        err.contains("listener.ssl.external.certfile") && err.contains("/nonexistent/server.crt"),
        "{err}"
    );

    let mut cfg = tls_config(1);
    cfg.listener.wss.get_mut("external").unwrap().keyfile = Some(certs().join("client.key"));
    let err = shardmq::shard::start(&cfg)
        .err()
        .expect("start fails")
        .to_string();
    assert!(err.contains("listener.wss.external.keyfile"), "{err}");
}

#[test]
fn handshakes_in_progress_count_against_max_connections() {
    let mut cfg = tls_config(1);
    cfg.listener
        .ssl
        .get_mut("external")
        .unwrap()
        .max_connections = 2;
    let b = Broker::start(cfg);
    let addr = ssl_addr(&b);
    // Two silent clients hold the listener's two places while their handshakes wait.
    let silent: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut buf = [0u8; 16];
    let mut third = TcpStream::connect(addr).unwrap();
    third.set_read_timeout(Some(WAIT)).unwrap();
    let started = std::time::Instant::now();
    // Closed at once, not after the 15 s handshake timeout.
    assert_eq!(third.read(&mut buf).unwrap_or(0), 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    b.wait_metrics("the refusal counted", |m| m.connections_refused == 1);
    // A place frees when a silent client goes.
    drop(silent);
    let deadline = std::time::Instant::now() + WAIT;
    while !connects(addr, client_config("ca.crt", None), "after-the-flood") {
        assert!(std::time::Instant::now() < deadline, "no place freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}
