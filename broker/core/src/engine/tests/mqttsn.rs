//! The MQTT-SN gateway's state machine on the simulated cluster (gateway on shard 0): topic
//! registration both ways, QoS 0/1/2 flows, predefined and short topics, the will dialogue and
//! updates, keepalive, sleep and wake with buffered delivery, retransmission and loss, NAT
//! moves, QoS −1, limits and bad datagrams; client ids owned by the gateway's shard and by the
//! other one.

use super::*;
use crate::auth::{Anonymous, AuthPolicy};
use crate::gateway::mqttsn::{SnGateway, SnSettings};
use shardmq_protocol::mqttsn::{self as sn, rc, Message, Qos, Topic, WillTopic};
use std::collections::HashMap;

fn settings() -> SnSettings {
    SnSettings {
        listener: 1,
        gateway_id: 7,
        username: None,
        password: None,
        enable_qos3: false,
        predefined: vec![(1, "pre/one".into()), (5, "pre/five".into())],
        retry_interval: Duration::from_secs(10),
        max_retries: 3,
        max_clients: 100,
        max_registered_topics: 50,
        stats: true,
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn enc(m: &Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    sn::encode(m, &mut b);
    b.to_vec()
}

fn connect_msg(cid: &str, clean: bool, will: bool, duration: u16) -> Message {
    Message::Connect {
        will,
        clean_session: clean,
        protocol_id: 1,
        duration,
        client_id: cid.into(),
    }
}

fn publish_msg(topic: Topic, qos: Qos, msg_id: u16, data: &str) -> Message {
    Message::Publish {
        dup: false,
        qos,
        retain: false,
        topic,
        msg_id,
        data: Bytes::copy_from_slice(data.as_bytes()),
    }
}

fn subscribe_msg(topic: Topic, qos: Qos, msg_id: u16) -> Message {
    Message::Subscribe {
        dup: false,
        qos,
        msg_id,
        topic,
    }
}

struct Sn {
    gw: SnGateway,
    /// Datagrams received, by port, not yet looked at.
    inbox: HashMap<u16, Vec<Message>>,
}

impl Sn {
    fn new(cl: &mut Cluster, s: SnSettings) -> Sn {
        cl.engines[0].set_listener_protocol(
            1,
            crate::engine::ListenerProtocol {
                name: "MQTT-SN",
                version: 1,
                idle_timeout: Duration::from_secs(5),
            },
        );
        Sn {
            gw: SnGateway::new(s),
            inbox: HashMap::new(),
        }
    }

    fn settle(&mut self, cl: &mut Cluster) {
        for _ in 0..4 {
            cl.settle();
            self.gw.poll_all(&mut cl.engines[0], cl.now);
        }
        cl.settle();
        while let Some((to, d)) = self.gw.pop_datagram(&mut cl.engines[0]) {
            let m = sn::decode(&d).expect("the gateway sent a bad datagram");
            self.inbox.entry(to.port()).or_default().push(m);
        }
    }

    fn raw(&mut self, cl: &mut Cluster, port: u16, data: &[u8]) {
        self.gw
            .handle_datagram(&mut cl.engines[0], addr(port), data, cl.now);
        self.settle(cl);
    }

    fn send(&mut self, cl: &mut Cluster, port: u16, m: &Message) {
        self.raw(cl, port, &enc(m));
    }

    fn recv(&mut self, cl: &mut Cluster, port: u16) -> Vec<Message> {
        self.settle(cl);
        self.inbox.remove(&port).unwrap_or_default()
    }

    fn advance(&mut self, cl: &mut Cluster, d: Duration) {
        cl.advance(d);
        self.gw.tick(&mut cl.engines[0], cl.now);
        self.settle(cl);
    }

    fn connect(&mut self, cl: &mut Cluster, port: u16, cid: &str, clean: bool, duration: u16) {
        self.send(cl, port, &connect_msg(cid, clean, false, duration));
        assert_eq!(
            self.recv(cl, port),
            vec![Message::Connack { rc: rc::ACCEPTED }],
            "{cid}"
        );
    }

    /// REGISTER from the client: the id it gets.
    fn register(&mut self, cl: &mut Cluster, port: u16, name: &str) -> u16 {
        self.send(
            cl,
            port,
            &Message::Register {
                topic_id: 0,
                msg_id: 99,
                topic_name: name.into(),
            },
        );
        match self.recv(cl, port).as_slice() {
            [Message::Regack {
                topic_id,
                msg_id: 99,
                rc: rc::ACCEPTED,
            }] => *topic_id,
            other => panic!("REGISTER {name}: {other:?}"),
        }
    }

    fn subscribe(&mut self, cl: &mut Cluster, port: u16, topic: Topic, qos: Qos) -> Message {
        self.send(cl, port, &subscribe_msg(topic, qos, 7));
        let got = self.recv(cl, port);
        assert_eq!(got.len(), 1, "{got:?}");
        got.into_iter().next().unwrap()
    }
}

fn metric(cl: &Cluster, f: impl Fn(&crate::metrics::Metrics) -> u64) -> u64 {
    cl.engines.iter().map(|e| f(&e.metrics)).sum()
}

#[test]
fn clients_publish_and_subscribe_by_name_predefined_id_and_short_name() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut sn = Sn::new(&mut cl, settings());
        let cid = id_owned_by(&format!("sn{owner}-"), owner, 2);
        let watcher = steady(&mut cl, "watcher");
        cl.subscribe(
            watcher,
            &[("sn/up/#", QoS::ExactlyOnce), ("ab", QoS::AtMostOnce)],
        );
        sn.connect(&mut cl, 1000, &cid, true, 60);
        // Uplink: a registered id (numbered after the predefined ones), a short name.
        let up = sn.register(&mut cl, 1000, "sn/up/x");
        assert_eq!(up, 6);
        assert_eq!(
            sn.register(&mut cl, 1000, "sn/up/x"),
            6,
            "same name, same id"
        );
        sn.send(
            &mut cl,
            1000,
            &publish_msg(Topic::Id(up), Qos::AtLeastOnce, 10, "q1"),
        );
        assert_eq!(
            sn.recv(&mut cl, 1000),
            vec![Message::Puback {
                topic_id: up,
                msg_id: 10,
                rc: rc::ACCEPTED
            }]
        );
        sn.send(
            &mut cl,
            1000,
            &publish_msg(Topic::Short(*b"ab"), Qos::AtMostOnce, 0, "short"),
        );
        let got = publishes(&cl.recv(watcher));
        assert_eq!(
            got,
            vec![
                ("sn/up/x".into(), "q1".into(), QoS::AtLeastOnce, false),
                ("ab".into(), "short".into(), QoS::AtMostOnce, false)
            ],
            "owner {owner}"
        );
        // Downlink by name: REGISTER first, the PUBLISH only after the REGACK.
        assert_eq!(
            sn.subscribe(
                &mut cl,
                1000,
                Topic::Name("sn/dn/+".into()),
                Qos::AtLeastOnce
            ),
            Message::Suback {
                qos: Qos::AtLeastOnce,
                topic_id: 0,
                msg_id: 7,
                rc: rc::ACCEPTED
            }
        );
        let publisher = steady(&mut cl, "publisher");
        cl.publish(publisher, "sn/dn/a", "m1", QoS::AtLeastOnce, false, 1);
        let got = sn.recv(&mut cl, 1000);
        let [Message::Register {
            topic_id,
            msg_id,
            topic_name,
        }] = got.as_slice()
        else {
            panic!("{got:?}")
        };
        assert_eq!((topic_name.as_str(), *topic_id), ("sn/dn/a", 7));
        cl.publish(publisher, "sn/dn/a", "m2", QoS::AtMostOnce, false, 0);
        assert_eq!(sn.recv(&mut cl, 1000), vec![], "held until the REGACK");
        sn.send(
            &mut cl,
            1000,
            &Message::Regack {
                topic_id: 7,
                msg_id: *msg_id,
                rc: rc::ACCEPTED,
            },
        );
        let got = sn.recv(&mut cl, 1000);
        assert_eq!(got.len(), 2, "{got:?}");
        let Message::Publish {
            topic: Topic::Id(7),
            qos: Qos::AtLeastOnce,
            msg_id: m1,
            data,
            dup: false,
            ..
        } = &got[0]
        else {
            panic!("{got:?}")
        };
        assert_eq!(&data[..], b"m1");
        assert!(
            matches!(&got[1], Message::Publish { topic: Topic::Id(7), qos: Qos::AtMostOnce, data, .. } if &data[..] == b"m2")
        );
        sn.send(
            &mut cl,
            1000,
            &Message::Puback {
                topic_id: 7,
                msg_id: *m1,
                rc: rc::ACCEPTED,
            },
        );
        // Acknowledged: nothing is sent again.
        sn.advance(&mut cl, Duration::from_secs(11));
        assert_eq!(sn.recv(&mut cl, 1000), vec![]);
        // A predefined id and a short name downlink.
        assert_eq!(
            sn.subscribe(&mut cl, 1000, Topic::Predefined(5), Qos::AtMostOnce),
            Message::Suback {
                qos: Qos::AtMostOnce,
                topic_id: 5,
                msg_id: 7,
                rc: rc::ACCEPTED
            }
        );
        sn.subscribe(&mut cl, 1000, Topic::Short(*b"zz"), Qos::AtMostOnce);
        cl.publish(publisher, "pre/five", "p", QoS::AtMostOnce, false, 0);
        cl.publish(publisher, "zz", "s", QoS::AtMostOnce, false, 0);
        let got = sn.recv(&mut cl, 1000);
        let topics: Vec<Topic> = got
            .iter()
            .filter_map(|m| match m {
                Message::Publish { topic, .. } => Some(topic.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(topics, vec![Topic::Predefined(5), Topic::Short(*b"zz")]);
        // A predefined id uplink, also when sent as a normal id (clients that mix them up).
        cl.subscribe(watcher, &[("pre/#", QoS::AtMostOnce)]);
        sn.send(
            &mut cl,
            1000,
            &publish_msg(Topic::Predefined(1), Qos::AtMostOnce, 0, "a"),
        );
        sn.send(
            &mut cl,
            1000,
            &publish_msg(Topic::Id(1), Qos::AtMostOnce, 0, "b"),
        );
        let got = publishes(&cl.recv(watcher));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|(t, ..)| t == "pre/one"));
        // The client list names the protocol.
        let page = cl.engines[0].list_clients(
            &crate::engine::admin::ClientFilter::default(),
            crate::engine::admin::Window { skip: 0, take: 10 },
        );
        let me = page
            .items
            .iter()
            .find(|c| c.clientid == cid)
            .expect("listed");
        assert_eq!(me.proto_name, Some("MQTT-SN"));
        sn.send(&mut cl, 1000, &Message::Disconnect(None));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Disconnect(None)]);
        assert_eq!(sn.gw.client_count(), 0);
        assert_eq!(
            cl.engines[0].connection_count(),
            0,
            "the gateway's shard has none left"
        );
    }
}

#[test]
fn qos2_both_ways() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut sn = Sn::new(&mut cl, settings());
        let cid = id_owned_by(&format!("q2-{owner}-"), owner, 2);
        let watcher = steady(&mut cl, "watcher");
        cl.subscribe(watcher, &[("up", QoS::ExactlyOnce)]);
        sn.connect(&mut cl, 1000, &cid, true, 60);
        let id = sn.register(&mut cl, 1000, "up");
        let p = publish_msg(Topic::Id(id), Qos::ExactlyOnce, 3, "x");
        sn.send(&mut cl, 1000, &p);
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Pubrec(3)]);
        // Sent again (our PUBREC lost): still once.
        sn.send(&mut cl, 1000, &p);
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Pubrec(3)]);
        sn.send(&mut cl, 1000, &Message::Pubrel(3));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Pubcomp(3)]);
        let got = cl.recv(watcher);
        assert_eq!(publishes(&got).len(), 1, "{got:?}");
        ack_all(&mut cl, watcher, &got);
        // Downlink (a name subscribed gets its id, even one of two characters).
        sn.subscribe(&mut cl, 1000, Topic::Name("dn".into()), Qos::ExactlyOnce);
        cl.publish(watcher, "dn", "y", QoS::ExactlyOnce, false, 9);
        let got = sn.recv(&mut cl, 1000);
        let [Message::Publish {
            msg_id,
            qos: Qos::ExactlyOnce,
            topic: Topic::Id(_),
            ..
        }] = got.as_slice()
        else {
            panic!("{got:?}")
        };
        let m = *msg_id;
        sn.send(&mut cl, 1000, &Message::Pubrec(m));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Pubrel(m)]);
        // PUBREL lost: the PUBREC again gets it again; then a retransmission.
        sn.send(&mut cl, 1000, &Message::Pubrec(m));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Pubrel(m)]);
        sn.advance(&mut cl, Duration::from_secs(10));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Pubrel(m)]);
        sn.send(&mut cl, 1000, &Message::Pubcomp(m));
        sn.advance(&mut cl, Duration::from_secs(30));
        assert_eq!(sn.recv(&mut cl, 1000), vec![], "complete");
    }
}

#[test]
fn unknown_ids_wildcards_and_a_full_registry_are_refused() {
    let mut cl = Cluster::new(2);
    let mut sn = Sn::new(
        &mut cl,
        SnSettings {
            max_registered_topics: 2,
            ..settings()
        },
    );
    sn.connect(&mut cl, 1000, "refusals", true, 60);
    sn.send(
        &mut cl,
        1000,
        &publish_msg(Topic::Id(999), Qos::AtLeastOnce, 4, "x"),
    );
    sn.send(
        &mut cl,
        1000,
        &publish_msg(Topic::Id(998), Qos::AtMostOnce, 0, "x"),
    );
    sn.send(
        &mut cl,
        1000,
        &publish_msg(Topic::Short(*b"a+"), Qos::AtLeastOnce, 5, "x"),
    );
    assert_eq!(
        sn.recv(&mut cl, 1000),
        vec![
            Message::Puback {
                topic_id: 999,
                msg_id: 4,
                rc: rc::INVALID_TOPIC_ID
            },
            Message::Puback {
                topic_id: u16::from_be_bytes(*b"a+"),
                msg_id: 5,
                rc: rc::NOT_SUPPORTED
            }
        ]
    );
    sn.send(
        &mut cl,
        1000,
        &Message::Register {
            topic_id: 0,
            msg_id: 1,
            topic_name: "a/+".into(),
        },
    );
    assert_eq!(
        sn.recv(&mut cl, 1000),
        vec![Message::Regack {
            topic_id: 0,
            msg_id: 1,
            rc: rc::NOT_SUPPORTED
        }]
    );
    assert_eq!(
        sn.subscribe(&mut cl, 1000, Topic::Predefined(77), Qos::AtMostOnce),
        Message::Suback {
            qos: Qos::AtMostOnce,
            topic_id: 0,
            msg_id: 7,
            rc: rc::INVALID_TOPIC_ID
        }
    );
    sn.register(&mut cl, 1000, "one");
    sn.register(&mut cl, 1000, "two");
    sn.send(
        &mut cl,
        1000,
        &Message::Register {
            topic_id: 0,
            msg_id: 2,
            topic_name: "three".into(),
        },
    );
    assert_eq!(
        sn.recv(&mut cl, 1000),
        vec![Message::Regack {
            topic_id: 0,
            msg_id: 2,
            rc: rc::NOT_SUPPORTED
        }],
        "mqtt.sn.max_registered_topics"
    );
    assert_eq!(metric(&cl, |m| m.mqttsn_dropped), 3);
    assert_eq!(sn.gw.client_count(), 1, "refusals do not disconnect");
}

#[test]
fn the_will_dialogue_updates_and_a_protocol_error_publish_the_will() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut sn = Sn::new(&mut cl, settings());
        let cid = id_owned_by(&format!("will{owner}-"), owner, 2);
        let watcher = steady(&mut cl, "watcher");
        cl.subscribe(watcher, &[("sn/will/#", QoS::AtLeastOnce)]);
        sn.send(&mut cl, 1000, &connect_msg(&cid, true, true, 60));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::WillTopicReq]);
        // A resent CONNECT restarts the dialogue.
        sn.send(&mut cl, 1000, &connect_msg(&cid, true, true, 60));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::WillTopicReq]);
        sn.send(
            &mut cl,
            1000,
            &Message::WillTopic(Some(WillTopic {
                qos: Qos::AtLeastOnce,
                retain: false,
                topic: "sn/will/a".into(),
            })),
        );
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::WillMsgReq]);
        sn.send(
            &mut cl,
            1000,
            &Message::WillMsg(Bytes::from_static(b"gone")),
        );
        assert_eq!(
            sn.recv(&mut cl, 1000),
            vec![Message::Connack { rc: rc::ACCEPTED }]
        );
        sn.send(
            &mut cl,
            1000,
            &Message::WillMsgUpd(Bytes::from_static(b"gone2")),
        );
        assert_eq!(
            sn.recv(&mut cl, 1000),
            vec![Message::WillMsgResp(rc::ACCEPTED)]
        );
        sn.send(
            &mut cl,
            1000,
            &Message::WillTopicUpd(Some(WillTopic {
                qos: Qos::AtMostOnce,
                retain: false,
                topic: "sn/will/b".into(),
            })),
        );
        assert_eq!(
            sn.recv(&mut cl, 1000),
            vec![Message::WillTopicResp(rc::ACCEPTED)]
        );
        // A CONNACK from a client breaks the protocol: DISCONNECT, will published.
        sn.send(&mut cl, 1000, &Message::Connack { rc: 0 });
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Disconnect(None)]);
        assert_eq!(
            publishes(&cl.recv(watcher)),
            vec![("sn/will/b".into(), "gone2".into(), QoS::AtMostOnce, false)],
            "owner {owner}"
        );
        assert_eq!(metric(&cl, |m| m.protocol_errors), 1);
        assert_eq!(sn.gw.client_count(), 0);
        // An empty WILLTOPICUPD removes the will: a keepalive timeout publishes nothing.
        sn.send(&mut cl, 1001, &connect_msg(&cid, true, true, 10));
        sn.send(
            &mut cl,
            1001,
            &Message::WillTopic(Some(WillTopic {
                qos: Qos::AtMostOnce,
                retain: false,
                topic: "sn/will/c".into(),
            })),
        );
        sn.send(&mut cl, 1001, &Message::WillMsg(Bytes::from_static(b"x")));
        sn.send(&mut cl, 1001, &Message::WillTopicUpd(None));
        assert_eq!(
            sn.recv(&mut cl, 1001),
            vec![
                Message::WillTopicReq,
                Message::WillMsgReq,
                Message::Connack { rc: rc::ACCEPTED },
                Message::WillTopicResp(rc::ACCEPTED)
            ]
        );
        sn.advance(&mut cl, Duration::from_secs(16));
        assert_eq!(sn.recv(&mut cl, 1001), vec![Message::Disconnect(None)]);
        assert_eq!(publishes(&cl.recv(watcher)), vec![]);
        assert_eq!(sn.gw.client_count(), 0);
    }
}

#[test]
fn keepalive_ends_a_silent_client_and_publishes_its_will() {
    let mut cl = Cluster::new(2);
    let mut sn = Sn::new(&mut cl, settings());
    let watcher = steady(&mut cl, "watcher");
    cl.subscribe(watcher, &[("w", QoS::AtMostOnce)]);
    sn.send(&mut cl, 1000, &connect_msg("ka", true, true, 10));
    sn.send(
        &mut cl,
        1000,
        &Message::WillTopic(Some(WillTopic {
            qos: Qos::AtMostOnce,
            retain: false,
            topic: "w".into(),
        })),
    );
    sn.send(
        &mut cl,
        1000,
        &Message::WillMsg(Bytes::from_static(b"lost")),
    );
    sn.recv(&mut cl, 1000);
    // PINGREQ within 10 s × 1.5 keeps it.
    sn.advance(&mut cl, Duration::from_secs(14));
    sn.send(&mut cl, 1000, &Message::Pingreq(None));
    assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Pingresp]);
    sn.advance(&mut cl, Duration::from_secs(14));
    assert_eq!(sn.gw.client_count(), 1);
    sn.advance(&mut cl, Duration::from_secs(2));
    assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Disconnect(None)]);
    assert_eq!(
        publishes(&cl.recv(watcher)),
        vec![("w".into(), "lost".into(), QoS::AtMostOnce, false)]
    );
    assert_eq!(sn.gw.client_count(), 0);
    // A CONNECT whose will dialogue never ends: the gateway's idle timeout (5 s here).
    sn.send(&mut cl, 1001, &connect_msg("idle", true, true, 10));
    assert_eq!(sn.recv(&mut cl, 1001), vec![Message::WillTopicReq]);
    sn.advance(&mut cl, Duration::from_secs(6));
    assert_eq!(sn.gw.client_count(), 0);
}

#[test]
fn a_sleeping_client_gets_what_waited_when_it_wakes_and_is_lost_if_it_oversleeps() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut sn = Sn::new(&mut cl, settings());
        let cid = id_owned_by(&format!("sleepy{owner}-"), owner, 2);
        let watcher = steady(&mut cl, "watcher");
        cl.subscribe(watcher, &[("will", QoS::AtMostOnce)]);
        sn.send(&mut cl, 1000, &connect_msg(&cid, true, true, 10));
        sn.send(
            &mut cl,
            1000,
            &Message::WillTopic(Some(WillTopic {
                qos: Qos::AtMostOnce,
                retain: false,
                topic: "will".into(),
            })),
        );
        sn.send(&mut cl, 1000, &Message::WillMsg(Bytes::from_static(b"zzz")));
        sn.recv(&mut cl, 1000);
        let Message::Suback { topic_id, .. } =
            sn.subscribe(&mut cl, 1000, Topic::Name("news".into()), Qos::AtLeastOnce)
        else {
            panic!()
        };
        sn.send(&mut cl, 1000, &Message::Disconnect(Some(60)));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Disconnect(None)]);
        // Asleep: nothing is sent; its keepalive (10 s) no longer applies.
        for i in 0..3 {
            cl.publish(
                watcher,
                "news",
                &format!("n{i}"),
                QoS::AtLeastOnce,
                false,
                1 + i,
            );
        }
        cl.publish(watcher, "news", "n3", QoS::AtMostOnce, false, 0);
        sn.advance(&mut cl, Duration::from_secs(30));
        assert_eq!(sn.recv(&mut cl, 1000), vec![]);
        // A PINGREQ without the client id does not wake it.
        sn.send(&mut cl, 1000, &Message::Pingreq(None));
        assert_eq!(sn.recv(&mut cl, 1000), vec![]);
        // With it: what waited, and PINGRESP once all is acknowledged.
        sn.send(&mut cl, 1000, &Message::Pingreq(Some(cid.clone())));
        let got = sn.recv(&mut cl, 1000);
        let data: Vec<(Vec<u8>, u16, Qos)> = got
            .iter()
            .filter_map(|m| match m {
                Message::Publish {
                    data,
                    msg_id,
                    qos,
                    topic,
                    ..
                } => {
                    assert_eq!(*topic, Topic::Id(topic_id));
                    Some((data.to_vec(), *msg_id, *qos))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            data.iter().map(|(d, ..)| d.clone()).collect::<Vec<_>>(),
            vec![
                b"n0".to_vec(),
                b"n1".to_vec(),
                b"n2".to_vec(),
                b"n3".to_vec()
            ],
            "owner {owner}: {got:?}"
        );
        assert_eq!(got.len(), 4, "no PINGRESP before the acks: {got:?}");
        for (_, msg_id, qos) in &data {
            if *qos == Qos::AtLeastOnce {
                sn.send(
                    &mut cl,
                    1000,
                    &Message::Puback {
                        topic_id,
                        msg_id: *msg_id,
                        rc: rc::ACCEPTED,
                    },
                );
            }
        }
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Pingresp]);
        // Asleep again; a wake with nothing waiting is just PINGRESP.
        sn.advance(&mut cl, Duration::from_secs(80));
        sn.send(&mut cl, 1000, &Message::Pingreq(Some(cid.clone())));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Pingresp]);
        assert_eq!(publishes(&cl.recv(watcher)), vec![]);
        // Oversleeping (60 s × 1.5) loses it: the will is published.
        sn.advance(&mut cl, Duration::from_secs(91));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Disconnect(None)]);
        assert_eq!(
            publishes(&cl.recv(watcher)),
            vec![("will".into(), "zzz".into(), QoS::AtMostOnce, false)],
            "owner {owner}"
        );
        assert_eq!(sn.gw.client_count(), 0);
    }
}

#[test]
fn a_connect_ends_the_sleep_and_keeps_what_waited() {
    let mut cl = Cluster::new(2);
    let mut sn = Sn::new(&mut cl, settings());
    let publisher = steady(&mut cl, "publisher");
    sn.connect(&mut cl, 1000, "nap", false, 60);
    sn.subscribe(&mut cl, 1000, Topic::Short(*b"nn"), Qos::AtLeastOnce);
    sn.send(&mut cl, 1000, &Message::Disconnect(Some(100)));
    sn.recv(&mut cl, 1000);
    cl.publish(publisher, "nn", "while asleep", QoS::AtLeastOnce, false, 1);
    assert_eq!(sn.recv(&mut cl, 1000), vec![]);
    // From another address (NAT), persistent: the client moves, what waited follows.
    sn.send(&mut cl, 2000, &connect_msg("nap", false, false, 60));
    let got = sn.recv(&mut cl, 2000);
    assert!(
        matches!(got.as_slice(), [Message::Connack { rc: rc::ACCEPTED }, Message::Publish { data, .. }] if &data[..] == b"while asleep"),
        "{got:?}"
    );
    assert_eq!(sn.gw.client_count(), 1);
}

#[test]
fn a_sleeping_client_that_wakes_from_a_new_address_is_followed() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut sn = Sn::new(&mut cl, settings());
        let cid = id_owned_by(&format!("nat{owner}-"), owner, 2);
        let publisher = steady(&mut cl, "publisher");
        sn.connect(&mut cl, 1000, &cid, true, 60);
        sn.subscribe(&mut cl, 1000, Topic::Short(*b"tt"), Qos::AtMostOnce);
        sn.send(&mut cl, 1000, &Message::Disconnect(Some(100)));
        sn.recv(&mut cl, 1000);
        cl.publish(publisher, "tt", "hi", QoS::AtMostOnce, false, 0);
        sn.send(&mut cl, 3000, &Message::Pingreq(Some(cid.clone())));
        let got = sn.recv(&mut cl, 3000);
        assert!(
            matches!(got.as_slice(), [Message::Publish { data, .. }, Message::Pingresp] if &data[..] == b"hi"),
            "owner {owner}: {got:?}"
        );
        assert_eq!(sn.recv(&mut cl, 1000), vec![]);
        // The new address is the client's now.
        sn.send(&mut cl, 3000, &Message::Disconnect(None));
        assert_eq!(sn.recv(&mut cl, 3000), vec![Message::Disconnect(None)]);
        assert_eq!(sn.gw.client_count(), 0);
    }
}

#[test]
fn unacknowledged_sends_are_repeated_then_the_client_is_lost() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut sn = Sn::new(&mut cl, settings());
        let cid = id_owned_by(&format!("deaf{owner}-"), owner, 2);
        let publisher = steady(&mut cl, "publisher");
        cl.subscribe(publisher, &[("lost", QoS::AtMostOnce)]);
        sn.send(&mut cl, 1000, &connect_msg(&cid, true, true, 600));
        sn.send(
            &mut cl,
            1000,
            &Message::WillTopic(Some(WillTopic {
                qos: Qos::AtMostOnce,
                retain: false,
                topic: "lost".into(),
            })),
        );
        sn.send(
            &mut cl,
            1000,
            &Message::WillMsg(Bytes::from_static(b"deaf")),
        );
        sn.recv(&mut cl, 1000);
        sn.subscribe(
            &mut cl,
            1000,
            Topic::Name("long/#".into()),
            Qos::AtLeastOnce,
        );
        cl.publish(publisher, "long/name", "m", QoS::AtLeastOnce, false, 1);
        // The REGISTER is sent again until acknowledged.
        let first = sn.recv(&mut cl, 1000);
        let [Message::Register {
            msg_id, topic_id, ..
        }] = first.as_slice()
        else {
            panic!("{first:?}")
        };
        sn.advance(&mut cl, Duration::from_secs(10));
        assert_eq!(sn.recv(&mut cl, 1000), first, "REGISTER again");
        sn.send(
            &mut cl,
            1000,
            &Message::Regack {
                topic_id: *topic_id,
                msg_id: *msg_id,
                rc: rc::ACCEPTED,
            },
        );
        let got = sn.recv(&mut cl, 1000);
        assert!(matches!(
            got.as_slice(),
            [Message::Publish { dup: false, .. }]
        ));
        // The PUBLISH three times more, DUP set, then the client is taken for lost.
        for _ in 0..3 {
            sn.advance(&mut cl, Duration::from_secs(10));
            let got = sn.recv(&mut cl, 1000);
            assert!(
                matches!(got.as_slice(), [Message::Publish { dup: true, .. }]),
                "{got:?}"
            );
        }
        sn.advance(&mut cl, Duration::from_secs(10));
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Disconnect(None)]);
        assert_eq!(
            publishes(&cl.recv(publisher)),
            vec![("lost".into(), "deaf".into(), QoS::AtMostOnce, false)],
            "owner {owner}"
        );
        assert_eq!(metric(&cl, |m| m.mqttsn_retransmits), 4);
        assert_eq!(metric(&cl, |m| m.mqttsn_retries_exhausted), 1);
        assert_eq!(sn.gw.client_count(), 0);
    }
}

#[test]
fn a_refused_register_drops_its_deliveries_and_an_unknown_id_is_registered_again() {
    let mut cl = Cluster::new(2);
    let mut sn = Sn::new(&mut cl, settings());
    let publisher = steady(&mut cl, "publisher");
    sn.connect(&mut cl, 1000, "picky", true, 60);
    sn.subscribe(&mut cl, 1000, Topic::Name("a/#".into()), Qos::AtLeastOnce);
    cl.publish(publisher, "a/no", "x", QoS::AtLeastOnce, false, 1);
    let got = sn.recv(&mut cl, 1000);
    let [Message::Register {
        msg_id, topic_id, ..
    }] = got.as_slice()
    else {
        panic!("{got:?}")
    };
    sn.send(
        &mut cl,
        1000,
        &Message::Regack {
            topic_id: *topic_id,
            msg_id: *msg_id,
            rc: rc::NOT_SUPPORTED,
        },
    );
    assert_eq!(sn.recv(&mut cl, 1000), vec![]);
    assert_eq!(metric(&cl, |m| m.mqttsn_undeliverable), 1);
    // The engine was answered: nothing more for that message.
    sn.advance(&mut cl, Duration::from_secs(60));
    assert_eq!(sn.recv(&mut cl, 1000), vec![]);
    // A PUBACK "invalid topic id": the gateway registers the name again, then resends.
    cl.publish(publisher, "a/yes", "y", QoS::AtLeastOnce, false, 2);
    let got = sn.recv(&mut cl, 1000);
    let [Message::Register {
        msg_id, topic_id, ..
    }] = got.as_slice()
    else {
        panic!("{got:?}")
    };
    let id = *topic_id;
    sn.send(
        &mut cl,
        1000,
        &Message::Regack {
            topic_id: id,
            msg_id: *msg_id,
            rc: rc::ACCEPTED,
        },
    );
    let got = sn.recv(&mut cl, 1000);
    let [Message::Publish { msg_id: m, .. }] = got.as_slice() else {
        panic!("{got:?}")
    };
    sn.send(
        &mut cl,
        1000,
        &Message::Puback {
            topic_id: id,
            msg_id: *m,
            rc: rc::INVALID_TOPIC_ID,
        },
    );
    let got = sn.recv(&mut cl, 1000);
    assert!(
        matches!(got.as_slice(), [Message::Register { topic_name, .. }] if topic_name == "a/yes"),
        "{got:?}"
    );
}

#[test]
fn a_second_clean_connect_starts_over_and_credentials_come_from_the_gateway() {
    let mut cl = Cluster::new(2);
    let mut sn = Sn::new(&mut cl, settings());
    sn.connect(&mut cl, 1000, "again", true, 60);
    let id = sn.register(&mut cl, 1000, "x/y");
    sn.connect(&mut cl, 1000, "again", true, 60);
    sn.send(
        &mut cl,
        1000,
        &publish_msg(Topic::Id(id), Qos::AtLeastOnce, 1, "x"),
    );
    assert_eq!(
        sn.recv(&mut cl, 1000),
        vec![Message::Puback {
            topic_id: id,
            msg_id: 1,
            rc: rc::INVALID_TOPIC_ID
        }],
        "its ids were forgotten"
    );
    assert_eq!(sn.gw.client_count(), 1);
    assert_eq!(cl.engines[0].connection_count(), 1);
    // Anonymous clients refused, and no gateway credentials: CONNACK 0x03.
    for owner in 0..2 {
        let mut cl = Cluster::with(2, |c| {
            c.auth = AuthPolicy {
                anonymous: Anonymous::Deny,
                verify_credentials: false,
            }
        });
        let mut sn = Sn::new(&mut cl, settings());
        let cid = id_owned_by(&format!("anon{owner}-"), owner, 2);
        sn.send(&mut cl, 1000, &connect_msg(&cid, true, false, 60));
        assert_eq!(
            sn.recv(&mut cl, 1000),
            vec![Message::Connack {
                rc: rc::NOT_SUPPORTED
            }]
        );
        assert_eq!(sn.gw.client_count(), 0);
    }
    // Every client connects with mqtt.sn.username.
    let mut cl = Cluster::new(2);
    let mut sn = Sn::new(
        &mut cl,
        SnSettings {
            username: Some("sn-gateway".into()),
            ..settings()
        },
    );
    sn.connect(&mut cl, 1000, "named", true, 60);
    let page = cl.engines[0].list_clients(
        &crate::engine::admin::ClientFilter::default(),
        crate::engine::admin::Window { skip: 0, take: 10 },
    );
    assert_eq!(page.items[0].username.as_deref(), Some("sn-gateway"));
}

#[test]
fn limits_bad_datagrams_discovery_and_qos_minus_one() {
    let mut cl = Cluster::new(2);
    let mut sn = Sn::new(
        &mut cl,
        SnSettings {
            max_clients: 2,
            ..settings()
        },
    );
    sn.connect(&mut cl, 1000, "c1", true, 60);
    sn.connect(&mut cl, 1001, "c2", true, 60);
    sn.send(&mut cl, 1002, &connect_msg("c3", true, false, 60));
    assert_eq!(
        sn.recv(&mut cl, 1002),
        vec![Message::Connack { rc: rc::CONGESTION }]
    );
    assert_eq!(metric(&cl, |m| m.mqttsn_clients_refused), 1);
    // Malformed: a length that disagrees, a reserved type, too short; dropped and counted.
    for bad in [&[0x05, 0x04, 0x00][..], &[0x02, 0x03], &[0x01]] {
        sn.raw(&mut cl, 1000, bad);
    }
    assert_eq!(metric(&cl, |m| m.mqttsn_bad_datagrams), 3);
    assert_eq!(sn.recv(&mut cl, 1000), vec![]);
    assert_eq!(sn.gw.client_count(), 2, "a bad datagram ends no client");
    // A session message from an unknown address: DISCONNECT.
    sn.send(&mut cl, 1003, &Message::Pingreq(None));
    assert_eq!(sn.recv(&mut cl, 1003), vec![Message::Disconnect(None)]);
    // SEARCHGW → GWINFO with the gateway id.
    sn.send(&mut cl, 1004, &Message::SearchGw { radius: 1 });
    assert_eq!(
        sn.recv(&mut cl, 1004),
        vec![Message::GwInfo {
            gw_id: 7,
            gw_add: Bytes::new()
        }]
    );
    // QoS -1: dropped while mqtt.sn.enable_qos3 is off.
    let watcher = steady(&mut cl, "watcher");
    cl.subscribe(
        watcher,
        &[("pre/one", QoS::AtMostOnce), ("qq", QoS::AtMostOnce)],
    );
    let minus = |topic| publish_msg(topic, Qos::MinusOne, 0, "m1");
    sn.send(&mut cl, 1005, &minus(Topic::Predefined(1)));
    assert_eq!(publishes(&cl.recv(watcher)), vec![]);
    let mut sn = Sn::new(
        &mut cl,
        SnSettings {
            enable_qos3: true,
            ..settings()
        },
    );
    sn.send(&mut cl, 1005, &minus(Topic::Predefined(1)));
    sn.send(&mut cl, 1005, &minus(Topic::Short(*b"qq")));
    sn.send(&mut cl, 1005, &minus(Topic::Predefined(3)));
    assert_eq!(
        publishes(&cl.recv(watcher)),
        vec![
            ("pre/one".into(), "m1".into(), QoS::AtMostOnce, false),
            ("qq".into(), "m1".into(), QoS::AtMostOnce, false)
        ]
    );
    assert_eq!(metric(&cl, |m| m.mqttsn_qos_minus_one), 2);
    assert_eq!(sn.recv(&mut cl, 1005), vec![], "QoS -1 is never answered");
    // Encapsulated messages are answered encapsulated for their node.
    let node = Bytes::from_static(b"\x12\x34");
    sn.send(
        &mut cl,
        1006,
        &Message::Encapsulated {
            radius: 1,
            node_id: node.clone(),
            inner: Box::new(connect_msg("behind-fwd", true, false, 60)),
        },
    );
    assert_eq!(
        sn.recv(&mut cl, 1006),
        vec![Message::Encapsulated {
            radius: 0,
            node_id: node,
            inner: Box::new(Message::Connack { rc: rc::ACCEPTED })
        }]
    );
}

#[test]
fn unloading_closes_every_client_and_publishes_wills() {
    let mut cl = Cluster::new(2);
    let mut sn = Sn::new(&mut cl, settings());
    let watcher = steady(&mut cl, "watcher");
    cl.subscribe(watcher, &[("bye", QoS::AtMostOnce)]);
    sn.send(&mut cl, 1000, &connect_msg("u1", true, true, 60));
    sn.send(
        &mut cl,
        1000,
        &Message::WillTopic(Some(WillTopic {
            qos: Qos::AtMostOnce,
            retain: false,
            topic: "bye".into(),
        })),
    );
    sn.send(&mut cl, 1000, &Message::WillMsg(Bytes::from_static(b"u1")));
    sn.connect(&mut cl, 1001, "u2", true, 60);
    sn.recv(&mut cl, 1000);
    assert_eq!(sn.gw.close_all(&mut cl.engines[0], cl.now), 2);
    assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Disconnect(None)]);
    assert_eq!(sn.recv(&mut cl, 1001), vec![Message::Disconnect(None)]);
    assert_eq!(
        publishes(&cl.recv(watcher)),
        vec![("bye".into(), "u1".into(), QoS::AtMostOnce, false)]
    );
    assert_eq!(cl.engines[0].connection_count(), 0);
}

/// The session's own resends (`mqtt.retry_interval`, shorter here than the gateway's) are not
/// sent on top of the gateway's and do not restart its count of tries.
#[test]
fn the_sessions_resends_do_not_restart_the_gateways_count() {
    let mut cl = Cluster::with(2, |c| {
        c.limits.retry_interval = Some(Duration::from_secs(4))
    });
    let mut sn = Sn::new(&mut cl, settings());
    let publisher = steady(&mut cl, "publisher");
    sn.connect(&mut cl, 1000, "deaf", true, 600);
    sn.subscribe(&mut cl, 1000, Topic::Short(*b"ab"), Qos::AtLeastOnce);
    cl.publish(publisher, "ab", "m", QoS::AtLeastOnce, false, 1);
    assert_eq!(sn.recv(&mut cl, 1000).len(), 1);
    let mut resent = 0;
    for _ in 0..20 {
        sn.advance(&mut cl, Duration::from_secs(2));
        for m in sn.recv(&mut cl, 1000) {
            match m {
                Message::Publish { dup: true, .. } => resent += 1,
                Message::Disconnect(None) => {
                    assert_eq!(resent, 3, "max_retries, on the gateway's clock");
                    assert_eq!(sn.gw.client_count(), 0);
                    return;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    panic!("never given up on ({resent} resends)");
}

#[test]
fn unsubscribe_by_name_predefined_id_and_short_name() {
    let mut cl = Cluster::new(2);
    let mut sn = Sn::new(&mut cl, settings());
    let publisher = steady(&mut cl, "publisher");
    sn.connect(&mut cl, 1000, "unsub", true, 60);
    sn.subscribe(&mut cl, 1000, Topic::Name("u/#".into()), Qos::AtMostOnce);
    sn.subscribe(&mut cl, 1000, Topic::Predefined(1), Qos::AtMostOnce);
    sn.subscribe(&mut cl, 1000, Topic::Short(*b"uu"), Qos::AtMostOnce);
    for (i, topic) in [
        Topic::Name("u/#".into()),
        Topic::Predefined(1),
        Topic::Short(*b"uu"),
        // Unknown: answered all the same.
        Topic::Predefined(99),
    ]
    .into_iter()
    .enumerate()
    {
        let msg_id = 20 + i as u16;
        sn.send(&mut cl, 1000, &Message::Unsubscribe { msg_id, topic });
        assert_eq!(sn.recv(&mut cl, 1000), vec![Message::Unsuback(msg_id)]);
    }
    for t in ["uu", "u/x", "pre/one"] {
        cl.publish(publisher, t, "x", QoS::AtMostOnce, false, 0);
    }
    assert_eq!(sn.recv(&mut cl, 1000), vec![], "no subscription left");
}

/// The access rules see an MQTT-SN client under its client id: a denied publish is dropped
/// (acknowledged), a denied subscription is SUBACK 3; ids owned by either shard.
#[test]
fn the_access_rules_apply_to_mqttsn_clients() {
    use crate::acl::{Acl, Action, Pattern, Permission, Rule, Subject};
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let acl = Some(std::sync::Arc::new(Acl {
            rules: vec![
                Rule {
                    permission: Permission::Allow,
                    action: Action::Publish,
                    subject: Subject::All,
                    topics: vec![Pattern::parse("sensors/%c")],
                },
                Rule {
                    permission: Permission::Allow,
                    action: Action::Subscribe,
                    subject: Subject::All,
                    topics: vec![Pattern::parse("sensors/#")],
                },
            ],
            nomatch: Permission::Deny,
        }));
        for e in &mut cl.engines {
            e.set_acl(acl.clone());
        }
        let mut sn = Sn::new(&mut cl, settings());
        let cid = id_owned_by(&format!("acl{owner}-"), owner, 2);
        let watcher = steady(&mut cl, "watcher");
        cl.subscribe(watcher, &[("sensors/#", QoS::AtMostOnce)]);
        sn.connect(&mut cl, 1000, &cid, true, 60);
        let mine = sn.register(&mut cl, 1000, &format!("sensors/{cid}"));
        let other = sn.register(&mut cl, 1000, "sensors/someone-else");
        for (id, msg_id) in [(mine, 1), (other, 2)] {
            sn.send(
                &mut cl,
                1000,
                &publish_msg(Topic::Id(id), Qos::AtLeastOnce, msg_id, "t"),
            );
            assert_eq!(
                sn.recv(&mut cl, 1000),
                vec![Message::Puback {
                    topic_id: id,
                    msg_id,
                    rc: rc::ACCEPTED
                }]
            );
        }
        let got = publishes(&cl.recv(watcher));
        assert_eq!(
            got,
            vec![(format!("sensors/{cid}"), "t".into(), QoS::AtMostOnce, false)],
            "owner {owner}"
        );
        assert!(matches!(
            sn.subscribe(&mut cl, 1000, Topic::Name("secret".into()), Qos::AtMostOnce),
            Message::Suback {
                rc: rc::NOT_SUPPORTED,
                ..
            }
        ));
        assert_eq!(metric(&cl, |m| m.acl_denied_publish), 1);
    }
}

/// A clean CONNECT from a new address replaces the client (its will not published: it is the
/// same device), and an MQTT-SN CONNECT takes over a client id an MQTT client holds on the
/// other shard; ids owned by either shard.
#[test]
fn connects_from_elsewhere_take_over_wherever_the_id_is_owned() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut sn = Sn::new(&mut cl, settings());
        let cid = id_owned_by(&format!("move{owner}-"), owner, 2);
        let watcher = steady(&mut cl, "watcher");
        cl.subscribe(
            watcher,
            &[("gone", QoS::AtMostOnce), ("mv", QoS::AtMostOnce)],
        );
        sn.send(&mut cl, 1000, &connect_msg(&cid, false, true, 60));
        sn.send(
            &mut cl,
            1000,
            &Message::WillTopic(Some(WillTopic {
                qos: Qos::AtMostOnce,
                retain: false,
                topic: "gone".into(),
            })),
        );
        sn.send(&mut cl, 1000, &Message::WillMsg(Bytes::from_static(b"w")));
        sn.recv(&mut cl, 1000);
        sn.connect(&mut cl, 2000, &cid, true, 60);
        assert_eq!(sn.gw.client_count(), 1, "owner {owner}");
        sn.send(
            &mut cl,
            2000,
            &publish_msg(Topic::Short(*b"mv"), Qos::AtMostOnce, 0, "from 2000"),
        );
        assert_eq!(
            publishes(&cl.recv(watcher)),
            vec![("mv".into(), "from 2000".into(), QoS::AtMostOnce, false)],
            "no will, and the new address publishes"
        );
        // An MQTT client on the other shard had the id: the MQTT-SN CONNECT takes it over.
        let other = 1 - owner;
        let mqtt_cid = id_owned_by(&format!("held{owner}-"), owner, 2);
        let held = cl.open(other);
        cl.connect_unsettled(held, &mqtt_cid, true, 0);
        cl.settle();
        cl.recv(held);
        sn.connect(&mut cl, 3000, &mqtt_cid, true, 60);
        assert!(
            cl.closing(held),
            "owner {owner}: the MQTT client was taken over"
        );
    }
}
