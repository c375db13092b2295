//! Codec tests: byte layouts from the specification, every violation the decoder must refuse,
//! and property tests (encode → decode round trip; no panic on arbitrary bytes).

use super::*;
use proptest::prelude::*;

fn opts() -> DecodeOptions {
    DecodeOptions::default()
}

fn opts31() -> DecodeOptions {
    DecodeOptions {
        level: ProtocolLevel::V31,
        ..DecodeOptions::default()
    }
}

fn dec(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    decode_slice(bytes, &opts()).map(|o| {
        o.map(|(p, used)| {
            assert_eq!(used, bytes.len(), "packet did not use all bytes");
            p
        })
    })
}

fn err(bytes: &[u8]) -> DecodeError {
    dec(bytes).expect_err("decoder accepted an invalid packet")
}

/// The CONNECT example of MQTT 3.1.1 section 3.1.2.10, with client id "abc".
const CONNECT_311: &[u8] = &[
    0x10, 0x0F, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x03, b'a', b'b',
    b'c',
];

#[test]
fn connect_311_fixture() {
    let Some(Packet::Connect(c)) = dec(CONNECT_311).unwrap() else {
        panic!("not a CONNECT")
    };
    assert_eq!(c.level, ProtocolLevel::V311);
    assert_eq!(c.client_id, "abc");
    assert!(c.clean_session);
    assert_eq!(c.keep_alive, 60);
    assert!(c.will.is_none() && c.username.is_none() && c.password.is_none());
    assert_eq!(&encode_to_bytes(&Packet::Connect(c))[..], CONNECT_311);
}

#[test]
fn connect_31_fixture_with_will_and_credentials() {
    let mut b = vec![0x10, 0];
    b.extend_from_slice(&[0x00, 0x06]);
    b.extend_from_slice(b"MQIsdp");
    b.push(3);
    b.push(0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02); // user, pass, will retain, will qos1, will, clean
    b.extend_from_slice(&[0x00, 0x0A]);
    for s in [&b"cid"[..], b"w/t", b"bye", b"user", b"pw"] {
        b.extend_from_slice(&(s.len() as u16).to_be_bytes());
        b.extend_from_slice(s);
    }
    b[1] = (b.len() - 2) as u8;
    let Some(Packet::Connect(c)) = dec(&b).unwrap() else {
        panic!("not a CONNECT")
    };
    assert_eq!(c.level, ProtocolLevel::V31);
    let w = c.will.as_ref().unwrap();
    assert_eq!(
        (w.topic.as_str(), &w.payload[..], w.qos, w.retain),
        ("w/t", &b"bye"[..], QoS::AtLeastOnce, true)
    );
    assert_eq!(c.username.as_deref(), Some("user"));
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
    assert_eq!(&encode_to_bytes(&Packet::Connect(c))[..], &b[..]);
}

#[test]
fn fixed_size_packets_fixtures() {
    assert_eq!(dec(&[0xC0, 0]).unwrap(), Some(Packet::Pingreq));
    assert_eq!(dec(&[0xD0, 0]).unwrap(), Some(Packet::Pingresp));
    assert_eq!(dec(&[0xE0, 0]).unwrap(), Some(Packet::Disconnect));
    assert_eq!(
        dec(&[0x40, 2, 0x12, 0x34]).unwrap(),
        Some(Packet::Puback(0x1234))
    );
    assert_eq!(dec(&[0x50, 2, 0, 1]).unwrap(), Some(Packet::Pubrec(1)));
    assert_eq!(dec(&[0x62, 2, 0, 1]).unwrap(), Some(Packet::Pubrel(1)));
    assert_eq!(dec(&[0x70, 2, 0, 1]).unwrap(), Some(Packet::Pubcomp(1)));
    assert_eq!(dec(&[0xB0, 2, 0, 9]).unwrap(), Some(Packet::Unsuback(9)));
    assert_eq!(
        dec(&[0x20, 2, 1, 0]).unwrap(),
        Some(Packet::Connack(Connack {
            session_present: true,
            code: ConnectReturnCode::Accepted
        }))
    );
}

#[test]
fn publish_fixture_from_spec_3_3_2() {
    // Topic "a/b", packet id 10, QoS 1, payload "hi".
    let b = [
        0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i',
    ];
    let Some(Packet::Publish(p)) = dec(&b).unwrap() else {
        panic!()
    };
    assert_eq!(
        (p.topic.as_str(), p.packet_id, p.qos, &p.payload[..]),
        ("a/b", 10, QoS::AtLeastOnce, &b"hi"[..])
    );
    assert_eq!(&encode_to_bytes(&Packet::Publish(p))[..], &b[..]);
}

#[test]
fn subscribe_and_suback_fixtures_from_spec_3_8_and_3_9() {
    let b = [
        0x82, 0x0E, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x00, 0x03, b'c', b'/', b'd',
        0x02,
    ];
    let Some(Packet::Subscribe(s)) = dec(&b).unwrap() else {
        panic!()
    };
    assert_eq!(
        s.filters,
        vec![
            ("a/b".into(), QoS::AtLeastOnce),
            ("c/d".into(), QoS::ExactlyOnce)
        ]
    );
    let ack = [0x90, 0x05, 0x00, 0x01, 0x00, 0x02, 0x80];
    let Some(Packet::Suback(a)) = dec(&ack).unwrap() else {
        panic!()
    };
    assert_eq!(
        a.codes,
        vec![
            SubackCode::Granted(QoS::AtMostOnce),
            SubackCode::Granted(QoS::ExactlyOnce),
            SubackCode::Failure
        ]
    );
    let unsub = [
        0xA2, 0x0C, 0x00, 0x02, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x03, b'c', b'/', b'd',
    ];
    let Some(Packet::Unsubscribe(u)) = dec(&unsub).unwrap() else {
        panic!()
    };
    assert_eq!(u.filters, vec!["a/b".to_string(), "c/d".to_string()]);
}

#[test]
fn incomplete_input_needs_more_bytes() {
    for n in 0..CONNECT_311.len() {
        assert_eq!(
            dec_partial(&CONNECT_311[..n]),
            Ok(None),
            "prefix of {n} bytes"
        );
    }
}

fn dec_partial(b: &[u8]) -> Result<Option<Packet>, DecodeError> {
    decode_slice(b, &opts()).map(|o| o.map(|(p, _)| p))
}

#[test]
fn remaining_length_boundaries() {
    let mut out = BytesMut::new();
    for (len, bytes) in [
        (0usize, 1usize),
        (127, 1),
        (128, 2),
        (16_383, 2),
        (16_384, 3),
        (2_097_151, 3),
        (2_097_152, 4),
        (268_435_455, 4),
    ] {
        out.clear();
        fixed::write_header(0x30, len, &mut out);
        assert_eq!(out.len(), 1 + bytes, "length {len}");
        let h = fixed::FixedHeader::check(&out, usize::MAX).unwrap();
        if len == 0 {
            assert_eq!(h.unwrap().remaining_len, 0);
        } else {
            assert_eq!(h, None);
        }
    }
    assert_eq!(
        err(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
        DecodeError::RemainingLengthTooLong
    );
}

#[test]
fn size_limit_checked_before_buffering() {
    let o = DecodeOptions {
        max_packet_size: 100,
        ..opts()
    };
    // Only the header of a 1000-byte packet has arrived: already refused.
    assert!(matches!(
        decode_slice(&[0x30, 0xE8, 0x07], &o),
        Err(DecodeError::PacketTooLarge {
            size: 1003,
            max: 100
        })
    ));
}

/// Every rule the decoder enforces, one malformed packet each.
#[test]
fn violations_are_refused_with_their_rule() {
    use DecodeError as E;
    type Check = fn(&DecodeError) -> bool;
    let cases: Vec<(&[u8], Check)> = vec![
        (&[0x00, 0x00], |e| matches!(e, E::ReservedPacketType(0))),
        (&[0xF0, 0x00], |e| matches!(e, E::ReservedPacketType(15))),
        (&[0xC1, 0x00], |e| matches!(e, E::InvalidHeaderFlags { .. })),
        (&[0xE2, 0x00], |e| matches!(e, E::InvalidHeaderFlags { .. })),
        (&[0xC0, 0x01, 0x00], |e| matches!(e, E::TrailingBytes(..))),
        (&[0x40, 0x02, 0x00, 0x00], |e| {
            matches!(e, E::ZeroPacketId(_))
        }),
        (&[0x40, 0x01, 0x00], |e| matches!(e, E::Truncated(_))),
        (&[0x40, 0x03, 0x00, 0x01, 0x00], |e| {
            matches!(e, E::TrailingBytes(..))
        }),
        (&[0x60, 0x02, 0x00, 0x01], |e| {
            matches!(e, E::InvalidHeaderFlags { .. })
        }),
        (&[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00], |e| {
            matches!(e, E::InvalidHeaderFlags { .. })
        }),
        (&[0x82, 0x02, 0x00, 0x01], |e| {
            matches!(e, E::EmptySubscribe)
        }),
        (&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03], |e| {
            matches!(e, E::InvalidRequestedQos(3))
        }),
        (&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x41], |e| {
            matches!(e, E::InvalidRequestedQos(0x41))
        }),
        (
            &[0x82, 0x07, 0x00, 0x01, 0x00, 0x02, b'a', b'#', 0x00],
            |e| matches!(e, E::InvalidMultiLevelWildcard(_)),
        ),
        (
            &[
                0x82, 0x09, 0x00, 0x01, 0x00, 0x04, b'#', b'/', b'a', b'b', 0x00,
            ],
            |e| matches!(e, E::InvalidMultiLevelWildcard(_)),
        ),
        (
            &[0x82, 0x07, 0x00, 0x01, 0x00, 0x02, b'a', b'+', 0x00],
            |e| matches!(e, E::InvalidSingleLevelWildcard(_)),
        ),
        (&[0x82, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00], |e| {
            matches!(e, E::EmptyTopic(_))
        }),
        (&[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00], |e| {
            matches!(e, E::ZeroPacketId(_))
        }),
        (&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, 0xFF, 0x00], |e| {
            matches!(e, E::InvalidUtf8(_))
        }),
        (&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00], |e| {
            matches!(e, E::NullCharacter(_))
        }),
        (&[0xA2, 0x02, 0x00, 0x01], |e| {
            matches!(e, E::EmptyUnsubscribe)
        }),
        (&[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], |e| {
            matches!(e, E::InvalidHeaderFlags { .. })
        }),
        (&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01], |e| {
            matches!(e, E::InvalidPublishQos)
        }),
        (&[0x38, 0x03, 0x00, 0x01, b'a'], |e| {
            matches!(e, E::DupWithQos0)
        }),
        (&[0x30, 0x03, 0x00, 0x01, b'+'], |e| {
            matches!(e, E::WildcardInTopicName(_))
        }),
        (&[0x30, 0x04, 0x00, 0x02, b'a', b'#'], |e| {
            matches!(e, E::WildcardInTopicName(_))
        }),
        (&[0x30, 0x02, 0x00, 0x00], |e| matches!(e, E::EmptyTopic(_))),
        (&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00], |e| {
            matches!(e, E::ZeroPacketId(_))
        }),
        (&[0x32, 0x04, 0x00, 0x01, b'a', 0x00], |e| {
            matches!(e, E::Truncated(_))
        }),
        (&[0x30, 0x03, 0x00, 0x05, b'a'], |e| {
            matches!(e, E::Truncated(_))
        }),
        (&[0x30, 0x04, 0x00, 0x02, 0xC3, 0x28], |e| {
            matches!(e, E::InvalidUtf8(_))
        }),
        (&[0x30, 0x03, 0x00, 0x01, 0x00], |e| {
            matches!(e, E::NullCharacter(_))
        }),
        (&[0x20, 0x02, 0x02, 0x00], |e| {
            matches!(e, E::InvalidConnack(2))
        }),
        (&[0x20, 0x02, 0x00, 0x06], |e| {
            matches!(e, E::InvalidConnack(6))
        }),
        (&[0x90, 0x03, 0x00, 0x01, 0x03], |e| {
            matches!(e, E::InvalidSubackCode(3))
        }),
        (&[0x11, 0x00], |e| matches!(e, E::InvalidHeaderFlags { .. })),
    ];
    for (bytes, check) in cases {
        let e = err(bytes);
        assert!(check(&e), "{bytes:02x?} gave {e:?}");
    }
}

fn connect_with(name: &[u8], level: u8, flags: u8, payload: &[&[u8]]) -> Vec<u8> {
    let mut b = vec![0x10, 0];
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(name);
    b.push(level);
    b.push(flags);
    b.extend_from_slice(&[0, 60]);
    for s in payload {
        b.extend_from_slice(&(s.len() as u16).to_be_bytes());
        b.extend_from_slice(s);
    }
    b[1] = (b.len() - 2) as u8;
    b
}

#[test]
fn connect_violations() {
    use DecodeError as E;
    assert!(matches!(
        err(&connect_with(b"MQTT", 5, 2, &[b"a"])),
        E::UnsupportedProtocolLevel { level: 5, .. }
    ));
    assert!(matches!(
        err(&connect_with(b"MQTT", 3, 2, &[b"a"])),
        E::UnsupportedProtocolLevel { level: 3, .. }
    ));
    assert!(matches!(
        err(&connect_with(b"MQIsdp", 4, 2, &[b"a"])),
        E::UnsupportedProtocolLevel { level: 4, .. }
    ));
    assert!(matches!(
        err(&connect_with(b"HTTP", 4, 2, &[b"a"])),
        E::InvalidProtocolName(_)
    ));
    assert_eq!(
        err(&connect_with(b"MQTT", 4, 3, &[b"a"])),
        E::ConnectReservedFlag
    );
    assert_eq!(
        err(&connect_with(b"MQTT", 4, 0x02 | 0x08, &[b"a"])),
        E::WillFlagsWithoutWill
    );
    assert_eq!(
        err(&connect_with(b"MQTT", 4, 0x02 | 0x20, &[b"a"])),
        E::WillFlagsWithoutWill
    );
    assert_eq!(
        err(&connect_with(
            b"MQTT",
            4,
            0x02 | 0x04 | 0x18,
            &[b"a", b"t", b"m"]
        )),
        E::InvalidWillQos
    );
    assert_eq!(
        err(&connect_with(b"MQTT", 4, 0x02 | 0x40, &[b"a", b"p"])),
        E::PasswordWithoutUsername
    );
    assert!(matches!(
        err(&connect_with(
            b"MQTT",
            4,
            0x02 | 0x04,
            &[b"a", b"t/#", b"m"]
        )),
        E::WildcardInTopicName(_)
    ));
    assert!(matches!(
        err(&connect_with(b"MQTT", 4, 0x02 | 0x80, &[b"a"])),
        E::Truncated(_)
    ));
    assert!(matches!(
        err(&connect_with(b"MQTT", 4, 0x02, &[b"a", b"extra"])),
        E::TrailingBytes(..)
    ));
    assert!(matches!(
        err(&connect_with(b"MQTT", 4, 0x02, &[b"a\0"])),
        E::NullCharacter(_)
    ));
}

#[test]
fn v31_accepts_qos1_headers_with_dup() {
    let b = [0x8A, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00];
    assert!(decode_slice(&b, &opts31()).unwrap().is_some());
    assert!(decode_slice(&b, &opts()).is_err());
    assert!(decode_slice(&[0x6A, 0x02, 0x00, 0x01], &opts31())
        .unwrap()
        .is_some());
    assert!(decode_slice(&[0x83, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00], &opts31()).is_err());
}

#[test]
fn non_connect_first_packet_refused_from_its_first_byte() {
    let o = DecodeOptions {
        expect_connect: true,
        ..opts()
    };
    assert_eq!(
        decode_slice(b"GET / HTTP/1.1", &o),
        Err(DecodeError::NotConnect(4))
    );
    assert_eq!(decode_slice(&[0x10], &o), Ok(None));
}

#[test]
fn decode_consumes_exactly_one_packet() {
    let mut buf = BytesMut::from(&[0xC0, 0x00, 0xE0, 0x00, 0x40][..]);
    assert_eq!(decode(&mut buf, &opts()).unwrap(), Some(Packet::Pingreq));
    assert_eq!(decode(&mut buf, &opts()).unwrap(), Some(Packet::Disconnect));
    assert_eq!(decode(&mut buf, &opts()).unwrap(), None);
    assert_eq!(&buf[..], &[0x40]);
}

fn arb_qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn arb_topic() -> impl Strategy<Value = String> {
    "[a-z0-9$ /é]{1,20}".prop_filter("no wildcard", |s| !s.is_empty())
}

fn arb_filter() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop_oneof!["[a-z0-9]{0,5}", Just("+".to_string())], 1..5),
        any::<bool>(),
    )
        .prop_map(|(levels, hash)| {
            let mut f = levels.join("/");
            if hash {
                f.push_str("/#");
            }
            f
        })
        .prop_filter("a filter is not empty", |f| !f.is_empty())
}

fn arb_packet() -> impl Strategy<Value = Packet> {
    let id = 1u16..;
    prop_oneof![
        (
            any::<bool>(),
            "[a-zA-Z0-9]{0,23}",
            any::<u16>(),
            proptest::option::of((arb_topic(), any::<Vec<u8>>(), arb_qos(), any::<bool>())),
            proptest::option::of(("[a-z]{0,10}", proptest::option::of(any::<Vec<u8>>()))),
            any::<bool>()
        )
            .prop_map(|(v31, client_id, keep_alive, will, creds, clean)| {
                let (username, password) = match creds {
                    Some((u, p)) => (Some(u), p.map(Bytes::from)),
                    None => (None, None),
                };
                Packet::Connect(Box::new(Connect {
                    level: if v31 {
                        ProtocolLevel::V31
                    } else {
                        ProtocolLevel::V311
                    },
                    client_id,
                    clean_session: clean,
                    keep_alive,
                    will: will.map(|(t, p, qos, retain)| LastWill {
                        topic: t.into(),
                        payload: p.into(),
                        qos,
                        retain,
                    }),
                    username,
                    password,
                }))
            }),
        (any::<bool>(), 0u8..6).prop_map(|(sp, c)| Packet::Connack(Connack {
            session_present: sp,
            code: match c {
                0 => ConnectReturnCode::Accepted,
                1 => ConnectReturnCode::UnacceptableProtocolVersion,
                2 => ConnectReturnCode::IdentifierRejected,
                3 => ConnectReturnCode::ServerUnavailable,
                4 => ConnectReturnCode::BadUsernameOrPassword,
                _ => ConnectReturnCode::NotAuthorized,
            }
        })),
        (
            arb_qos(),
            any::<bool>(),
            any::<bool>(),
            arb_topic(),
            1u16..,
            prop::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(
                |(qos, dup, retain, topic, pid, payload)| Packet::Publish(Publish {
                    dup: dup && qos != QoS::AtMostOnce,
                    qos,
                    retain,
                    topic: topic.into(),
                    packet_id: if qos == QoS::AtMostOnce { 0 } else { pid },
                    payload: payload.into()
                })
            ),
        id.clone().prop_map(Packet::Puback),
        id.clone().prop_map(Packet::Pubrec),
        id.clone().prop_map(Packet::Pubrel),
        id.clone().prop_map(Packet::Pubcomp),
        id.clone().prop_map(Packet::Unsuback),
        (
            id.clone(),
            prop::collection::vec((arb_filter(), arb_qos()), 1..5)
        )
            .prop_map(|(packet_id, filters)| Packet::Subscribe(Subscribe { packet_id, filters })),
        (
            id.clone(),
            prop::collection::vec(
                prop_oneof![
                    arb_qos().prop_map(SubackCode::Granted),
                    Just(SubackCode::Failure)
                ],
                1..5
            )
        )
            .prop_map(|(packet_id, codes)| Packet::Suback(Suback { packet_id, codes })),
        (id, prop::collection::vec(arb_filter(), 1..5)).prop_map(|(packet_id, filters)| {
            Packet::Unsubscribe(Unsubscribe { packet_id, filters })
        }),
        Just(Packet::Pingreq),
        Just(Packet::Pingresp),
        Just(Packet::Disconnect),
    ]
}

proptest! {
    #[test]
    fn round_trip(p in arb_packet()) {
        let bytes = encode_to_bytes(&p);
        let (back, used) = decode_slice(&bytes, &opts()).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, p);
    }

    #[test]
    fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), v31 in any::<bool>(), max in 2usize..600) {
        let o = DecodeOptions { max_packet_size: max, level: if v31 { ProtocolLevel::V31 } else { ProtocolLevel::V311 }, expect_connect: max % 2 == 0 };
        let mut buf = BytesMut::from(&bytes[..]);
        // Keep decoding until the input is exhausted, an error occurs or more bytes are needed.
        while let Ok(Some(_)) = decode(&mut buf, &o) {}
    }

    #[test]
    fn split_input_decodes_the_same(p in arb_packet(), cut in 0usize..64) {
        let bytes = encode_to_bytes(&p);
        let cut = cut.min(bytes.len());
        if cut < bytes.len() {
            prop_assert_eq!(decode_slice(&bytes[..cut], &opts()).unwrap(), None);
        }
        prop_assert!(decode_slice(&bytes, &opts()).unwrap().is_some());
    }
}
