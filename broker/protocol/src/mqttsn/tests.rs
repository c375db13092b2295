//! The MQTT-SN codec against messages laid out by hand from the v1.2 specification, its error
//! cases, and a round-trip property over every message type.

use super::*;
use proptest::prelude::*;

fn round(bytes: &[u8], m: Message) {
    assert_eq!(decode(bytes), Ok(m.clone()), "{bytes:02x?}");
    let mut out = BytesMut::new();
    encode(&m, &mut out);
    assert_eq!(&out[..], bytes, "{m:?}");
}

#[test]
fn messages_of_the_specification_decode_and_encode_byte_for_byte() {
    round(&[0x03, 0x01, 0x00], Message::SearchGw { radius: 0 });
    round(
        &[0x03, 0x02, 0x01],
        Message::GwInfo {
            gw_id: 1,
            gw_add: Bytes::new(),
        },
    );
    round(
        &[0x05, 0x00, 0x01, 0x03, 0x84],
        Message::Advertise {
            gw_id: 1,
            duration: 900,
        },
    );
    round(
        &[0x09, 0x04, 0x04, 0x01, 0x00, 0x3c, b's', b'n', b'1'],
        Message::Connect {
            will: false,
            clean_session: true,
            protocol_id: 1,
            duration: 60,
            client_id: "sn1".into(),
        },
    );
    round(&[0x03, 0x05, 0x00], Message::Connack { rc: rc::ACCEPTED });
    round(&[0x02, 0x06], Message::WillTopicReq);
    round(&[0x02, 0x07], Message::WillTopic(None));
    round(
        &[0x06, 0x07, 0x30, b'w', b'/', b't'],
        Message::WillTopic(Some(WillTopic {
            qos: Qos::AtLeastOnce,
            retain: true,
            topic: "w/t".into(),
        })),
    );
    round(
        &[0x09, 0x0a, 0x00, 0x00, 0x00, 0x01, b'a', b'/', b'b'],
        Message::Register {
            topic_id: 0,
            msg_id: 1,
            topic_name: "a/b".into(),
        },
    );
    round(
        &[0x07, 0x0b, 0x00, 0x05, 0x00, 0x01, 0x00],
        Message::Regack {
            topic_id: 5,
            msg_id: 1,
            rc: 0,
        },
    );
    round(
        &[0x09, 0x0c, 0x20, 0x00, 0x01, 0x00, 0x02, b'h', b'i'],
        Message::Publish {
            dup: false,
            qos: Qos::AtLeastOnce,
            retain: false,
            topic: Topic::Id(1),
            msg_id: 2,
            data: Bytes::from_static(b"hi"),
        },
    );
    // QoS −1 to a short topic name.
    round(
        &[0x09, 0x0c, 0x62, b'a', b'b', 0x00, 0x00, b'h', b'i'],
        Message::Publish {
            dup: false,
            qos: Qos::MinusOne,
            retain: false,
            topic: Topic::Short(*b"ab"),
            msg_id: 0,
            data: Bytes::from_static(b"hi"),
        },
    );
    round(
        &[0x08, 0x12, 0x20, 0x00, 0x03, b'a', b'/', b'#'],
        Message::Subscribe {
            dup: false,
            qos: Qos::AtLeastOnce,
            msg_id: 3,
            topic: Topic::Name("a/#".into()),
        },
    );
    round(
        &[0x07, 0x12, 0x41, 0x00, 0x04, 0x00, 0x07],
        Message::Subscribe {
            dup: false,
            qos: Qos::ExactlyOnce,
            msg_id: 4,
            topic: Topic::Predefined(7),
        },
    );
    round(
        &[0x08, 0x13, 0x20, 0x00, 0x05, 0x00, 0x03, 0x00],
        Message::Suback {
            qos: Qos::AtLeastOnce,
            topic_id: 5,
            msg_id: 3,
            rc: 0,
        },
    );
    round(&[0x04, 0x18, 0x00, 0x1e], Message::Disconnect(Some(30)));
    round(&[0x02, 0x18], Message::Disconnect(None));
    round(
        &[0x05, 0x16, b's', b'n', b'1'],
        Message::Pingreq(Some("sn1".into())),
    );
    round(&[0x02, 0x16], Message::Pingreq(None));
    round(&[0x02, 0x17], Message::Pingresp);
    round(&[0x04, 0x0e, 0x00, 0x09], Message::Pubcomp(9));
    round(&[0x04, 0x0f, 0x00, 0x09], Message::Pubrec(9));
    round(&[0x04, 0x10, 0x00, 0x09], Message::Pubrel(9));
    round(&[0x04, 0x15, 0x00, 0x09], Message::Unsuback(9));
    round(&[0x03, 0x1d, 0x00], Message::WillMsgResp(0));
    // A forwarder's encapsulation of a PINGRESP for node "ab".
    round(
        &[0x05, 0xfe, 0x01, b'a', b'b', 0x02, 0x17],
        Message::Encapsulated {
            radius: 1,
            node_id: Bytes::from_static(b"ab"),
            inner: Box::new(Message::Pingresp),
        },
    );
}

#[test]
fn long_messages_use_the_three_byte_length() {
    let data = Bytes::from(vec![7u8; 300]);
    let m = Message::Publish {
        dup: true,
        qos: Qos::AtMostOnce,
        retain: true,
        topic: Topic::Predefined(1),
        msg_id: 0,
        data,
    };
    let mut out = BytesMut::new();
    encode(&m, &mut out);
    assert_eq!(&out[..4], &[0x01, 0x01, 0x35, 0x0c], "309 bytes");
    assert_eq!(out.len(), 309);
    assert_eq!(decode(&out), Ok(m));
}

#[test]
fn bad_datagrams_are_named() {
    assert!(matches!(decode(&[]), Err(DecodeError::Length { .. })));
    assert!(matches!(
        decode(&[0x05, 0x17]),
        Err(DecodeError::Length {
            declared: 5,
            actual: 2
        })
    ));
    assert!(matches!(
        decode(&[0x01, 0x17]),
        Err(DecodeError::Length { .. })
    ));
    for t in [0x03u8, 0x11, 0x19, 0x1e, 0xfd, 0xff] {
        assert_eq!(decode(&[0x02, t]), Err(DecodeError::UnknownType(t)));
    }
    assert_eq!(
        decode(&[0x07, 0x0c, 0x03, 0x00, 0x01, 0x00, 0x00]),
        Err(DecodeError::TopicIdType("PUBLISH"))
    );
    assert!(matches!(
        decode(&[0x03, 0x0b, 0x00]),
        Err(DecodeError::Malformed("REGACK", _))
    ));
    assert!(matches!(
        decode(&[0x04, 0x05, 0x00, 0x00]),
        Err(DecodeError::Malformed("CONNACK", "bytes left over"))
    ));
    assert!(matches!(
        decode(&[0x05, 0x04, 0x04, 0x01, 0x00]),
        Err(DecodeError::Malformed("CONNECT", _))
    ));
    // A non-UTF-8 client id.
    assert!(matches!(
        decode(&[0x07, 0x04, 0x04, 0x01, 0x00, 0x3c, 0xff]),
        Err(DecodeError::Malformed("CONNECT", _))
    ));
    // Encapsulation inside encapsulation.
    assert!(decode(&[0x03, 0xfe, 0x00, 0x03, 0xfe, 0x00, 0x02, 0x17]).is_err());
}

fn arb_qos() -> impl Strategy<Value = Qos> {
    prop_oneof![
        Just(Qos::AtMostOnce),
        Just(Qos::AtLeastOnce),
        Just(Qos::ExactlyOnce),
        Just(Qos::MinusOne)
    ]
}

fn arb_id_topic() -> impl Strategy<Value = Topic> {
    prop_oneof![
        any::<u16>().prop_map(Topic::Id),
        any::<u16>().prop_map(Topic::Predefined),
        any::<[u8; 2]>().prop_map(Topic::Short),
    ]
}

fn arb_sub_topic() -> impl Strategy<Value = Topic> {
    prop_oneof![
        "[a-z/+#]{0,20}".prop_map(Topic::Name),
        any::<u16>().prop_map(Topic::Predefined),
        any::<[u8; 2]>().prop_map(Topic::Short),
    ]
}

fn arb_will() -> impl Strategy<Value = Option<WillTopic>> {
    proptest::option::of(
        (arb_qos(), any::<bool>(), "[a-z/]{0,20}").prop_map(|(qos, retain, topic)| WillTopic {
            qos,
            retain,
            topic,
        }),
    )
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u8>(), any::<u16>())
            .prop_map(|(gw_id, duration)| Message::Advertise { gw_id, duration }),
        any::<u8>().prop_map(|radius| Message::SearchGw { radius }),
        (any::<u8>(), bytes(8)).prop_map(|(gw_id, gw_add)| Message::GwInfo { gw_id, gw_add }),
        (
            any::<bool>(),
            any::<bool>(),
            any::<u8>(),
            any::<u16>(),
            "[a-zA-Z0-9]{0,23}"
        )
            .prop_map(|(will, clean_session, protocol_id, duration, client_id)| {
                Message::Connect {
                    will,
                    clean_session,
                    protocol_id,
                    duration,
                    client_id,
                }
            }),
        any::<u8>().prop_map(|rc| Message::Connack { rc }),
        Just(Message::WillTopicReq),
        arb_will().prop_map(Message::WillTopic),
        Just(Message::WillMsgReq),
        bytes(40).prop_map(Message::WillMsg),
        (any::<u16>(), any::<u16>(), "[a-z/]{0,30}").prop_map(|(topic_id, msg_id, topic_name)| {
            Message::Register {
                topic_id,
                msg_id,
                topic_name,
            }
        }),
        (any::<u16>(), any::<u16>(), any::<u8>()).prop_map(|(topic_id, msg_id, rc)| {
            Message::Regack {
                topic_id,
                msg_id,
                rc,
            }
        }),
        (
            any::<bool>(),
            arb_qos(),
            any::<bool>(),
            arb_id_topic(),
            any::<u16>(),
            bytes(400)
        )
            .prop_map(|(dup, qos, retain, topic, msg_id, data)| Message::Publish {
                dup,
                qos,
                retain,
                topic,
                msg_id,
                data
            }),
        (any::<u16>(), any::<u16>(), any::<u8>()).prop_map(|(topic_id, msg_id, rc)| {
            Message::Puback {
                topic_id,
                msg_id,
                rc,
            }
        }),
        any::<u16>().prop_map(Message::Pubrec),
        any::<u16>().prop_map(Message::Pubrel),
        any::<u16>().prop_map(Message::Pubcomp),
        (any::<bool>(), arb_qos(), any::<u16>(), arb_sub_topic()).prop_map(
            |(dup, qos, msg_id, topic)| {
                Message::Subscribe {
                    dup,
                    qos,
                    msg_id,
                    topic,
                }
            }
        ),
        (arb_qos(), any::<u16>(), any::<u16>(), any::<u8>()).prop_map(
            |(qos, topic_id, msg_id, rc)| {
                Message::Suback {
                    qos,
                    topic_id,
                    msg_id,
                    rc,
                }
            }
        ),
        (any::<u16>(), arb_sub_topic())
            .prop_map(|(msg_id, topic)| Message::Unsubscribe { msg_id, topic }),
        any::<u16>().prop_map(Message::Unsuback),
        proptest::option::of("[a-z0-9]{1,23}").prop_map(Message::Pingreq),
        Just(Message::Pingresp),
        proptest::option::of(any::<u16>()).prop_map(Message::Disconnect),
        arb_will().prop_map(Message::WillTopicUpd),
        any::<u8>().prop_map(Message::WillTopicResp),
        bytes(40).prop_map(Message::WillMsgUpd),
        any::<u8>().prop_map(Message::WillMsgResp),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(m in arb_message(), node in proptest::option::of((0u8..4, bytes(6)))) {
        let m = match node {
            Some((radius, node_id)) => Message::Encapsulated { radius, node_id, inner: Box::new(m) },
            None => m,
        };
        let mut out = BytesMut::new();
        encode(&m, &mut out);
        prop_assert_eq!(decode(&out), Ok(m));
    }

    #[test]
    fn arbitrary_datagrams_never_panic(d in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode(&d);
    }
}
