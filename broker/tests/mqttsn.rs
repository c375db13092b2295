//! The MQTT-SN gateway against a real broker with two shards, over UDP datagrams: messages
//! both ways with MQTT clients (client ids owned by the gateway's shard and by the other),
//! `$SYS` events and the admin API's view, sleep and wake, keepalive and will, retransmission
//! and loss, bad datagrams, SEARCHGW and ADVERTISE (to a loopback address), and unloading and
//! loading through the admin API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use shardmq::protocol::mqtt::QoS;
use shardmq::protocol::mqttsn::{self as sn, rc, Message, Qos, Topic, WillTopic};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

struct SnClient {
    sock: UdpSocket,
}

impl SnClient {
    fn open(gw: SocketAddr) -> SnClient {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(gw).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        SnClient { sock }
    }

    fn send(&self, m: &Message) {
        let mut b = BytesMut::new();
        sn::encode(m, &mut b);
        self.sock.send(&b).unwrap();
    }

    fn recv_within(&self, d: Duration) -> Option<Message> {
        self.sock.set_read_timeout(Some(d)).unwrap();
        let mut buf = [0u8; 65_536];
        let got = match self.sock.recv(&mut buf) {
            Ok(n) => Some(sn::decode(&buf[..n]).expect("the gateway sent a bad datagram")),
            Err(_) => None,
        };
        self.sock.set_read_timeout(Some(WAIT)).unwrap();
        got
    }

    fn recv(&self) -> Message {
        self.recv_within(WAIT)
            .unwrap_or_else(|| panic!("no datagram within {WAIT:?}"))
    }

    fn connect(gw: SocketAddr, cid: &str, duration: u16) -> SnClient {
        let c = SnClient::open(gw);
        c.send(&Message::Connect {
            will: false,
            clean_session: true,
            protocol_id: 1,
            duration,
            client_id: cid.into(),
        });
        assert_eq!(c.recv(), Message::Connack { rc: rc::ACCEPTED }, "{cid}");
        c
    }

    fn connect_with_will(
        gw: SocketAddr,
        cid: &str,
        duration: u16,
        topic: &str,
        msg: &str,
    ) -> SnClient {
        let c = SnClient::open(gw);
        c.send(&Message::Connect {
            will: true,
            clean_session: true,
            protocol_id: 1,
            duration,
            client_id: cid.into(),
        });
        assert_eq!(c.recv(), Message::WillTopicReq);
        c.send(&Message::WillTopic(Some(WillTopic {
            qos: Qos::AtMostOnce,
            retain: false,
            topic: topic.into(),
        })));
        assert_eq!(c.recv(), Message::WillMsgReq);
        c.send(&Message::WillMsg(Bytes::copy_from_slice(msg.as_bytes())));
        assert_eq!(c.recv(), Message::Connack { rc: rc::ACCEPTED });
        c
    }

    fn register(&self, name: &str) -> u16 {
        self.send(&Message::Register {
            topic_id: 0,
            msg_id: 1,
            topic_name: name.into(),
        });
        match self.recv() {
            Message::Regack {
                topic_id,
                rc: rc::ACCEPTED,
                ..
            } => topic_id,
            other => panic!("{other:?}"),
        }
    }

    fn subscribe(&self, name: &str, qos: Qos) -> Message {
        self.send(&Message::Subscribe {
            dup: false,
            qos,
            msg_id: 2,
            topic: Topic::Name(name.into()),
        });
        self.recv()
    }
}

fn gateway(b: &Broker) -> SocketAddr {
    b.handle()
        .addr("gateway.mqttsn")
        .expect("the MQTT-SN gateway listens")
}

#[test]
fn clients_exchange_messages_with_mqtt_clients_wherever_their_id_is_owned() {
    let b = Broker::start(config(2));
    let shards = b.handle().shards().len();
    let gw = gateway(&b);
    for owner in 0..shards {
        let cid = id_owned_by(&format!("sn{owner}-"), owner, shards);
        let mut watcher = Raw::ok(b.addr, &format!("watch{owner}"));
        watcher.subscribe(&[("sn/up/#", QoS::AtLeastOnce)]);
        let mut events = Raw::ok(b.addr, &format!("events{owner}"));
        events.subscribe(&[(
            format!("$SYS/broker/clients/{cid}/connected").as_str(),
            QoS::AtMostOnce,
        )]);
        let c = SnClient::connect(gw, &cid, 60);
        let event: serde_json::Value =
            serde_json::from_slice(&events.next_publish().payload).unwrap();
        assert_eq!(
            (event["proto_name"].as_str(), event["proto_ver"].as_u64()),
            (Some("MQTT-SN"), Some(1))
        );
        // Uplink at QoS 1 on a registered id.
        let id = c.register("sn/up/temp");
        c.send(&Message::Publish {
            dup: false,
            qos: Qos::AtLeastOnce,
            retain: false,
            topic: Topic::Id(id),
            msg_id: 5,
            data: Bytes::from_static(b"21.5"),
        });
        assert_eq!(
            c.recv(),
            Message::Puback {
                topic_id: id,
                msg_id: 5,
                rc: rc::ACCEPTED
            }
        );
        let up = watcher.next_publish();
        assert_eq!((&*up.topic, &up.payload[..]), ("sn/up/temp", &b"21.5"[..]));
        // Downlink on a wildcard: the gateway REGISTERs the name, the PUBLISH follows the
        // REGACK, its PUBACK completes the delivery.
        assert!(matches!(
            c.subscribe("sn/dn/#", Qos::AtLeastOnce),
            Message::Suback {
                rc: rc::ACCEPTED,
                qos: Qos::AtLeastOnce,
                ..
            }
        ));
        let mut app = Raw::ok(b.addr, &format!("app{owner}"));
        app.publish("sn/dn/cmd", b"reboot", QoS::AtLeastOnce, false, 1);
        let Message::Register {
            topic_id,
            msg_id,
            topic_name,
        } = c.recv()
        else {
            panic!("REGISTER first")
        };
        assert_eq!(topic_name, "sn/dn/cmd");
        c.send(&Message::Regack {
            topic_id,
            msg_id,
            rc: rc::ACCEPTED,
        });
        let Message::Publish {
            topic,
            msg_id,
            data,
            qos: Qos::AtLeastOnce,
            ..
        } = c.recv()
        else {
            panic!("PUBLISH after the REGACK")
        };
        assert_eq!((topic, &data[..]), (Topic::Id(topic_id), &b"reboot"[..]));
        c.send(&Message::Puback {
            topic_id,
            msg_id,
            rc: rc::ACCEPTED,
        });
        c.send(&Message::Pingreq(None));
        assert_eq!(c.recv(), Message::Pingresp);
        // The admin API lists it with its protocol.
        let admin = b.handle().admin_addr().unwrap();
        let v = http(admin, "GET", &format!("/api/v1/clients/{cid}"), &[], "").json();
        assert_eq!(v["proto_name"], "MQTT-SN", "{v}");
        c.send(&Message::Disconnect(None));
        assert_eq!(c.recv(), Message::Disconnect(None));
    }
    b.wait_metrics("the client list empties", |m| m.connections_closed >= 2);
}

#[test]
fn a_sleeping_client_is_woken_with_what_waited_and_a_silent_one_leaves_its_will() {
    let b = Broker::start(config(2));
    let gw = gateway(&b);
    let shards = b.handle().shards().len();
    for owner in 0..shards {
        let cid = id_owned_by(&format!("sleep{owner}-"), owner, shards);
        let mut app = Raw::ok(b.addr, &format!("app{owner}"));
        app.subscribe(&[(format!("will/{cid}").as_str(), QoS::AtMostOnce)]);
        let c = SnClient::connect_with_will(gw, &cid, 60, &format!("will/{cid}"), "gone");
        assert!(matches!(
            c.subscribe("zz", Qos::AtMostOnce),
            Message::Suback {
                rc: rc::ACCEPTED,
                ..
            }
        ));
        c.send(&Message::Disconnect(Some(30)));
        assert_eq!(c.recv(), Message::Disconnect(None));
        app.publish("zz", b"one", QoS::AtMostOnce, false, 0);
        app.publish("zz", b"two", QoS::AtMostOnce, false, 0);
        assert_eq!(c.recv_within(Duration::from_millis(300)), None, "asleep");
        c.send(&Message::Pingreq(Some(cid.clone())));
        let mut got = Vec::new();
        loop {
            match c.recv() {
                Message::Publish { data, .. } => got.push(data),
                Message::Pingresp => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            got,
            vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")]
        );
        // Connected again with a 1 s keepalive and then silent: lost after 1.5 s, will out.
        c.send(&Message::Connect {
            will: false,
            clean_session: false,
            protocol_id: 1,
            duration: 1,
            client_id: cid.clone(),
        });
        assert_eq!(c.recv(), Message::Connack { rc: rc::ACCEPTED });
        let started = Instant::now();
        assert_eq!(c.recv(), Message::Disconnect(None));
        assert!(started.elapsed() >= Duration::from_millis(1400));
        let will = app.next_publish();
        assert_eq!(&will.payload[..], b"gone");
    }
}

#[test]
fn unacknowledged_messages_are_resent_then_the_client_is_lost() {
    let mut cfg = config(2);
    cfg.mqtt.sn.retry_interval = shardmq::config::Duration::millis(300);
    cfg.mqtt.sn.max_retries = 2;
    let b = Broker::start(cfg);
    let gw = gateway(&b);
    let c = SnClient::connect(gw, "deaf", 600);
    c.subscribe("ab", Qos::AtLeastOnce);
    let mut app = Raw::ok(b.addr, "app");
    app.publish("ab", b"m", QoS::AtLeastOnce, false, 1);
    let first = c.recv();
    assert!(
        matches!(first, Message::Publish { dup: false, .. }),
        "{first:?}"
    );
    for _ in 0..2 {
        let again = c.recv();
        assert!(
            matches!(again, Message::Publish { dup: true, .. }),
            "{again:?}"
        );
    }
    assert_eq!(c.recv(), Message::Disconnect(None));
    b.wait_metrics("counted", |m| {
        m.mqttsn_retransmits >= 2 && m.mqttsn_retries_exhausted == 1
    });
}

#[test]
fn bad_datagrams_discovery_and_advertise() {
    let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
    listener.set_read_timeout(Some(WAIT)).unwrap();
    let mut cfg = config(2);
    cfg.mqtt.sn.gateway_id = 9;
    cfg.mqtt.sn.advertise_address = listener.local_addr().unwrap().to_string();
    cfg.mqtt.sn.advertise_duration = shardmq::config::Duration::secs(1);
    let b = Broker::start(cfg);
    let gw = gateway(&b);
    // ADVERTISE arrives at the configured (loopback) address, again after its duration.
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        let (n, from) = listener.recv_from(&mut buf).unwrap();
        assert_eq!(from, gw);
        assert_eq!(
            sn::decode(&buf[..n]).unwrap(),
            Message::Advertise {
                gw_id: 9,
                duration: 1
            }
        );
    }
    let c = SnClient::open(gw);
    c.send(&Message::SearchGw { radius: 0 });
    assert_eq!(
        c.recv(),
        Message::GwInfo {
            gw_id: 9,
            gw_add: Bytes::new()
        }
    );
    // Malformed: counted, no answer; a session message without a CONNECT: DISCONNECT.
    for bad in [&[0x09, 0x0c][..], &[0x02, 0x11], &[0x00]] {
        c.sock.send(bad).unwrap();
    }
    assert_eq!(c.recv_within(Duration::from_millis(300)), None);
    b.wait_metrics("bad datagrams counted", |m| m.mqttsn_bad_datagrams == 3);
    c.send(&Message::Pingreq(None));
    assert_eq!(c.recv(), Message::Disconnect(None));
    // The gateway goes on serving.
    SnClient::connect(gw, "after-garbage", 60);
}

#[test]
fn unload_and_load_through_the_admin_api() {
    let b = Broker::start(config(2));
    let admin = b.handle().admin_addr().unwrap();
    let gw = gateway(&b);
    let list = http(admin, "GET", "/api/v1/gateways", &[], "").json();
    let sn = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "mqttsn")
        .cloned()
        .expect("listed");
    assert_eq!(sn["state"], "running", "{list}");
    assert_eq!(sn["bind"], gw.to_string());
    let mut app = Raw::ok(b.addr, "app");
    app.subscribe(&[("bye", QoS::AtMostOnce)]);
    let c = SnClient::connect_with_will(gw, "unloaded", 60, "bye", "unloaded");
    let deadline = Instant::now() + WAIT;
    let count = || {
        http(admin, "GET", "/api/v1/gateways", &[], "").json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == "mqttsn")
            .unwrap()["connections"]
            .as_u64()
    };
    while count() != Some(1) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = http(admin, "POST", "/api/v1/gateways/mqttsn/unload", &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "stopped");
    assert_eq!(c.recv(), Message::Disconnect(None));
    assert_eq!(&app.next_publish().payload[..], b"unloaded");
    assert_eq!(count(), Some(0));
    // Nothing answers on the port any more.
    c.send(&Message::SearchGw { radius: 0 });
    assert_eq!(c.recv_within(Duration::from_millis(300)), None);
    let r = http(admin, "POST", "/api/v1/gateways/mqttsn/load", &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["bind"], gw.to_string(), "the same port again");
    SnClient::connect(gw, "reloaded", 60);
}
