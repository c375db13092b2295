//! The LwM2M gateway against a real broker with two shards, over UDP with CoAP messages built
//! here: registration and the register event, a read through an MQTT command with the value
//! typed by the shipped object definitions (endpoint names owned by the gateway's shard and by
//! the other), `$SYS` events and the admin API's view, de-registration, and unloading and
//! loading through the admin API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use shardmq::protocol::lwm2m::coap_lite::{CoapOption, MessageClass, MessageType, Packet};
use shardmq::protocol::mqtt::QoS;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

struct Device {
    sock: UdpSocket,
    next_id: u16,
}

impl Device {
    fn open(gw: SocketAddr) -> Device {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(gw).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        Device { sock, next_id: 1 }
    }

    fn send(&self, p: &Packet) {
        self.sock.send(&p.to_bytes().unwrap()).unwrap();
    }

    fn recv(&self) -> Packet {
        let mut buf = [0u8; 2048];
        let n = self
            .sock
            .recv(&mut buf)
            .expect("a CoAP message within the wait");
        Packet::from_bytes(&buf[..n]).unwrap()
    }

    fn request(&mut self, code: u8, path: &[&str], query: &[&str], payload: &[u8]) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.message_id = self.next_id;
        p.header.code = MessageClass::from(code);
        p.set_token(vec![0xAB, self.next_id as u8]);
        self.next_id += 1;
        for s in path {
            p.add_option(CoapOption::UriPath, s.as_bytes().to_vec());
        }
        for q in query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        p.payload = payload.to_vec();
        p
    }

    /// Registers; returns the location.
    fn register(&mut self, ep: &str) -> Vec<String> {
        let req = self.request(
            0x02,
            &["rd"],
            &[&format!("ep={ep}"), "lt=300", "lwm2m=1.0", "b=U"],
            b"</1/0>,</3/0>",
        );
        self.send(&req);
        let ack = self.recv();
        assert_eq!(u8::from(ack.header.code), 0x41, "2.01 Created: {ack:?}");
        ack.get_option(CoapOption::LocationPath)
            .unwrap()
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }
}

fn gateway(b: &Broker) -> SocketAddr {
    b.handle()
        .addr("gateway.lwm2m")
        .expect("the LwM2M gateway listens")
}

#[test]
fn a_device_registers_and_is_read_through_mqtt_wherever_its_name_is_owned() {
    let b = Broker::start(config(2));
    let shards = b.handle().shards().len();
    let gw = gateway(&b);
    for owner in 0..shards {
        let ep = id_owned_by(&format!("lw{owner}-"), owner, shards);
        let mut app = Raw::ok(b.addr, &format!("app{owner}"));
        app.subscribe(&[
            (format!("lwm2m/{ep}/register").as_str(), QoS::AtMostOnce),
            (format!("lwm2m/{ep}/response").as_str(), QoS::AtMostOnce),
        ]);
        let mut events = Raw::ok(b.addr, &format!("events{owner}"));
        events.subscribe(&[(
            format!("$SYS/broker/clients/{ep}/connected").as_str(),
            QoS::AtMostOnce,
        )]);
        let mut dev = Device::open(gw);
        let loc = dev.register(&ep);
        assert_eq!(loc[0], "rd");
        let event: serde_json::Value =
            serde_json::from_slice(&events.next_publish().payload).unwrap();
        assert_eq!(event["proto_name"], "LwM2M");
        let reg: serde_json::Value = serde_json::from_slice(&app.next_publish().payload).unwrap();
        assert_eq!(
            reg["data"]["objectList"],
            serde_json::json!(["/1/0", "/3/0"])
        );
        // A read command: the device gets GET /3/0/13 and answers in TLV; the response is
        // typed as the shipped Device object says (Time).
        app.publish(
            &format!("lwm2m/{ep}/command"),
            br#"{"reqID":3,"msgType":"read","data":{"path":"/3/0/13"}}"#,
            QoS::AtMostOnce,
            false,
            0,
        );
        let get = dev.recv();
        assert_eq!(u8::from(get.header.code), 0x01);
        let mut reply = Packet::new();
        reply.header.set_type(MessageType::Acknowledgement);
        reply.header.message_id = get.header.message_id;
        reply.header.code = MessageClass::from(0x45);
        reply.set_token(get.get_token().to_vec());
        reply.add_option(CoapOption::ContentFormat, vec![0x2D, 0x16]);
        reply.payload = vec![0xC4, 0x0D, 0x51, 0x82, 0x42, 0x8F];
        dev.send(&reply);
        let resp: serde_json::Value = serde_json::from_slice(&app.next_publish().payload).unwrap();
        assert_eq!(
            resp,
            serde_json::json!({"reqID": 3, "msgType": "read", "data": {"reqPath": "/3/0/13", "code": "2.05", "codeMsg": "content", "content": [{"path": "/3/0/13", "value": 1367491215}]}})
        );
        let admin = b.handle().admin_addr().unwrap();
        let v = http(admin, "GET", &format!("/api/v1/clients/{ep}"), &[], "").json();
        assert_eq!(v["proto_name"], "LwM2M", "{v}");
        // De-register.
        let del = dev.request(0x04, &[&loc[0], &loc[1]], &[], b"");
        dev.send(&del);
        assert_eq!(u8::from(dev.recv().header.code), 0x42);
    }
    b.wait_metrics("registrations counted", |m| m.lwm2m_registrations == 2);
}

#[test]
fn unload_and_load_through_the_admin_api() {
    let b = Broker::start(config(2));
    let admin = b.handle().admin_addr().unwrap();
    let gw = gateway(&b);
    let mut dev = Device::open(gw);
    dev.register("unloaded-dev");
    let r = http(admin, "POST", "/api/v1/gateways/lwm2m/unload", &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "stopped");
    // Nothing answers on the port.
    let req = dev.request(0x02, &["rd"], &["ep=x"], b"</3/0>");
    dev.send(&req);
    dev.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(dev.sock.recv(&mut buf).is_err());
    let r = http(admin, "POST", "/api/v1/gateways/lwm2m/load", &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["bind"], gw.to_string(), "the same port again");
    let mut dev = Device::open(gw);
    dev.register("reloaded-dev");
}

/// A device over DTLS with a pre-shared key, as a dimpl client (independent of the broker's
/// server side): the handshake, a registration whose PSK identity becomes the endpoint's
/// username, a read through MQTT; a wrong key is refused.
#[test]
fn a_device_over_dtls_with_a_pre_shared_key() {
    use dimpl::{Config, Dtls, Output, PskResolver};
    use std::sync::Arc;
    use std::time::Instant;

    struct Key(Vec<u8>);
    impl PskResolver for Key {
        fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
            Some(self.0.clone())
        }
    }

    let dir = temp_dir("lwm2m-dtls");
    let psk = dir.join("lwm2m.psk");
    std::fs::write(
        &psk,
        "# identity:hexkey\nsensor-psk:000102030405060708090a0b0c0d0e0f\n",
    )
    .unwrap();
    let mut cfg = config(2);
    cfg.lwm2m.psk_file = Some(psk);
    cfg.lwm2m.dtls_port = 0;
    let b = Broker::start(cfg);
    let dtls_addr = b.handle().addr("gateway.lwm2m.dtls").expect("DTLS listens");

    /// Runs a client handshake; the session, or None if refused.
    fn handshake(sock: &UdpSocket, key: &[u8]) -> Option<Dtls> {
        let config = Config::builder()
            .with_psk_client(b"sensor-psk".to_vec(), Arc::new(Key(key.to_vec())))
            .build()
            .unwrap();
        let mut d = Dtls::new_12_psk(Arc::new(config), Instant::now());
        d.set_active(true);
        d.handle_timeout(Instant::now()).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut rx = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            loop {
                match d.poll_output(&mut buf) {
                    Output::Packet(p) => {
                        sock.send(p).unwrap();
                    }
                    Output::Connected => return Some(d),
                    Output::Timeout(_) => break,
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            match sock.recv(&mut rx) {
                Ok(n) => {
                    if d.handle_timeout(Instant::now()).is_err()
                        || d.handle_packet(&rx[..n]).is_err()
                    {
                        return None;
                    }
                }
                Err(_) => {
                    if d.handle_timeout(Instant::now()).is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Sends a CoAP message in the session and returns the next CoAP message received.
    fn exchange(sock: &UdpSocket, d: &mut Dtls, p: Option<&Packet>) -> Packet {
        if let Some(p) = p {
            d.send_application_data(&p.to_bytes().unwrap()).unwrap();
        }
        let mut buf = vec![0u8; 4096];
        let mut rx = [0u8; 4096];
        loop {
            let mut got = None;
            loop {
                match d.poll_output(&mut buf) {
                    Output::Packet(x) => {
                        sock.send(x).unwrap();
                    }
                    Output::ApplicationData(a) => got = Some(a.to_vec()),
                    Output::Timeout(_) => break,
                    _ => {}
                }
            }
            if let Some(a) = got {
                return Packet::from_bytes(&a).unwrap();
            }
            sock.set_read_timeout(Some(WAIT)).unwrap();
            let n = sock.recv(&mut rx).expect("a DTLS record within the wait");
            d.handle_timeout(Instant::now()).unwrap();
            d.handle_packet(&rx[..n]).unwrap();
        }
    }

    // A wrong key: no session.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(dtls_addr).unwrap();
    assert!(
        handshake(&sock, &[9; 16]).is_none(),
        "a wrong key is refused"
    );

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(dtls_addr).unwrap();
    let mut d = handshake(&sock, &(0u8..16).collect::<Vec<_>>()).expect("the handshake completes");
    let mut app = Raw::ok(b.addr, "dtls-app");
    app.subscribe(&[("lwm2m/dtls-dev/response", QoS::AtMostOnce)]);
    let mut dev = Device::open(dtls_addr);
    let reg = dev.request(0x02, &["rd"], &["ep=dtls-dev", "lt=300"], b"</3/0>");
    let ack = exchange(&sock, &mut d, Some(&reg));
    assert_eq!(u8::from(ack.header.code), 0x41, "2.01 over DTLS");
    let admin = b.handle().admin_addr().unwrap();
    let v = http(admin, "GET", "/api/v1/clients/dtls-dev", &[], "").json();
    assert_eq!(
        v["username"], "sensor-psk",
        "the PSK identity names the user: {v}"
    );
    app.publish(
        "lwm2m/dtls-dev/command",
        br#"{"reqID":1,"msgType":"read","data":{"path":"/3/0/0"}}"#,
        QoS::AtMostOnce,
        false,
        0,
    );
    let get = exchange(&sock, &mut d, None);
    assert_eq!(u8::from(get.header.code), 0x01);
    let mut reply = Packet::new();
    reply.header.set_type(MessageType::Acknowledgement);
    reply.header.message_id = get.header.message_id;
    reply.header.code = MessageClass::from(0x45);
    reply.set_token(get.get_token().to_vec());
    reply.add_option(CoapOption::ContentFormat, vec![]);
    reply.payload = b"ACME".to_vec();
    d.send_application_data(&reply.to_bytes().unwrap()).unwrap();
    let mut buf = vec![0u8; 4096];
    while let Output::Packet(x) = d.poll_output(&mut buf) {
        sock.send(x).unwrap();
    }
    let resp: serde_json::Value = serde_json::from_slice(&app.next_publish().payload).unwrap();
    assert_eq!(resp["data"]["content"][0]["value"], "ACME", "{resp}");
    b.wait_metrics("the refused handshake counted", |m| {
        m.tls_handshake_failures >= 1
    });
}
