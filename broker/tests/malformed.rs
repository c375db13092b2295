//! Bad input: each malformed or out-of-order packet closes the offending connection (after a
//! CONNACK error code where the protocol has one), is counted, and leaves every other client
//! working.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use shardmq::core::route::owner_shard;
use shardmq::protocol::mqtt::{encode, ConnectReturnCode, Packet, Publish, QoS, Subscribe};
use std::time::Duration;

/// A CONNECT for client `id` (3.1.1, clean session, keepalive 60).
fn connect_bytes(id: &str) -> Vec<u8> {
    let mut b = vec![
        0x10, 0, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C,
    ];
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(id.as_bytes());
    b[1] = (b.len() - 2) as u8;
    b
}

/// A CONNECT with the given protocol name, level, flags and payload fields.
fn connect_with(name: &[u8], level: u8, flags: u8, fields: &[&[u8]]) -> Vec<u8> {
    let mut b = vec![0x10, 0];
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&[level, flags, 0x00, 0x3C]);
    for f in fields {
        b.extend_from_slice(&(f.len() as u16).to_be_bytes());
        b.extend_from_slice(f);
    }
    b[1] = (b.len() - 2) as u8;
    b
}

struct Case {
    name: &'static str,
    /// Send a valid CONNECT (and read its CONNACK) first.
    after_connect: bool,
    bytes: Vec<u8>,
    /// A CONNACK return code expected before the close.
    connack: Option<ConnectReturnCode>,
}

fn case(name: &'static str, after_connect: bool, bytes: Vec<u8>) -> Case {
    Case {
        name,
        after_connect,
        bytes,
        connack: None,
    }
}

/// Every case, with `id` as the client id of the CONNECTs that carry one.
fn cases(id: &str) -> Vec<Case> {
    let id = id.as_bytes();
    let mut v = vec![
        // Before CONNECT.
        case(
            "PUBLISH as first packet",
            false,
            vec![0x30, 0x03, 0x00, 0x01, b'a'],
        ),
        case(
            "SUBSCRIBE as first packet",
            false,
            vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ),
        case("PINGREQ as first packet", false, vec![0xC0, 0x00]),
        case("DISCONNECT as first packet", false, vec![0xE0, 0x00]),
        case("reserved packet type 0", false, vec![0x00, 0x00]),
        case("reserved packet type 15", false, vec![0xF0, 0x00]),
        case(
            "HTTP request instead of MQTT",
            false,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        case(
            "unknown protocol name",
            false,
            connect_with(b"HTTP", 4, 0x02, &[id]),
        ),
        Case {
            connack: Some(ConnectReturnCode::UnacceptableProtocolVersion),
            ..case("MQTT level 5", false, connect_with(b"MQTT", 5, 0x02, &[id]))
        },
        Case {
            connack: Some(ConnectReturnCode::UnacceptableProtocolVersion),
            ..case("MQTT level 3", false, connect_with(b"MQTT", 3, 0x02, &[id]))
        },
        Case {
            connack: Some(ConnectReturnCode::UnacceptableProtocolVersion),
            ..case(
                "MQIsdp level 4",
                false,
                connect_with(b"MQIsdp", 4, 0x02, &[id]),
            )
        },
        case(
            "CONNECT reserved flag",
            false,
            connect_with(b"MQTT", 4, 0x03, &[id]),
        ),
        case(
            "CONNECT will QoS 3",
            false,
            connect_with(b"MQTT", 4, 0x02 | 0x04 | 0x18, &[id, b"t", b"m"]),
        ),
        case(
            "CONNECT will QoS without will flag",
            false,
            connect_with(b"MQTT", 4, 0x02 | 0x08, &[id]),
        ),
        case(
            "CONNECT will retain without will flag",
            false,
            connect_with(b"MQTT", 4, 0x02 | 0x20, &[id]),
        ),
        case(
            "CONNECT password without user name",
            false,
            connect_with(b"MQTT", 4, 0x02 | 0x40, &[id, b"pw"]),
        ),
        case(
            "CONNECT trailing bytes",
            false,
            connect_with(b"MQTT", 4, 0x02, &[id, b"junk"]),
        ),
        case(
            "CONNECT missing user name",
            false,
            connect_with(b"MQTT", 4, 0x02 | 0x80, &[id]),
        ),
        case(
            "CONNECT client id invalid UTF-8",
            false,
            connect_with(b"MQTT", 4, 0x02, &[&[0xC3, 0x28]]),
        ),
        case(
            "CONNECT client id with U+0000",
            false,
            connect_with(b"MQTT", 4, 0x02, &[b"a\0b"]),
        ),
        case(
            "CONNECT will topic with wildcard",
            false,
            connect_with(b"MQTT", 4, 0x02 | 0x04, &[id, b"w/#", b"m"]),
        ),
        case("CONNECT header flags set", false, {
            let mut b = connect_with(b"MQTT", 4, 0x02, &[id]);
            b[0] = 0x12;
            b
        }),
        case(
            "remaining length over four bytes",
            false,
            vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        ),
        case(
            "packet larger than max_packet_size",
            false,
            vec![0x10, 0x80, 0x80, 0x80, 0x01],
        ),
        Case {
            connack: Some(ConnectReturnCode::IdentifierRejected),
            ..case(
                "empty client id without clean session",
                false,
                connect_with(b"MQTT", 4, 0x00, &[b""]),
            )
        },
        Case {
            connack: Some(ConnectReturnCode::IdentifierRejected),
            ..case(
                "3.1 client id over 23 characters",
                false,
                connect_with(b"MQIsdp", 3, 0x02, &[b"abcdefghijklmnopqrstuvwxyz"]),
            )
        },
        // After CONNECT.
        case("second CONNECT", true, connect_bytes("again")),
        case(
            "PUBLISH QoS 3",
            true,
            vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
        ),
        case(
            "PUBLISH QoS 0 with DUP",
            true,
            vec![0x38, 0x03, 0x00, 0x01, b'a'],
        ),
        case(
            "PUBLISH topic with +",
            true,
            vec![0x30, 0x04, 0x00, 0x02, b'a', b'+'],
        ),
        case(
            "PUBLISH topic with #",
            true,
            vec![0x30, 0x03, 0x00, 0x01, b'#'],
        ),
        case("PUBLISH empty topic", true, vec![0x30, 0x02, 0x00, 0x00]),
        case(
            "PUBLISH QoS 1 packet id 0",
            true,
            vec![0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00],
        ),
        case(
            "PUBLISH topic invalid UTF-8",
            true,
            vec![0x30, 0x04, 0x00, 0x02, 0xED, 0xA0],
        ),
        case(
            "PUBLISH topic with U+0000",
            true,
            vec![0x30, 0x03, 0x00, 0x01, 0x00],
        ),
        case(
            "PUBLISH topic length past the end",
            true,
            vec![0x30, 0x03, 0x00, 0x09, b'a'],
        ),
        case(
            "SUBSCRIBE header flags 0000",
            true,
            vec![0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ),
        case(
            "SUBSCRIBE without filters",
            true,
            vec![0x82, 0x02, 0x00, 0x01],
        ),
        case(
            "SUBSCRIBE requested QoS 3",
            true,
            vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03],
        ),
        case(
            "SUBSCRIBE reserved bits in QoS byte",
            true,
            vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x81],
        ),
        case(
            "SUBSCRIBE # not last",
            true,
            vec![0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'#', b'/', b'a', 0x00],
        ),
        case(
            "SUBSCRIBE + inside a level",
            true,
            vec![0x82, 0x07, 0x00, 0x01, 0x00, 0x02, b'a', b'+', 0x00],
        ),
        case(
            "SUBSCRIBE packet id 0",
            true,
            vec![0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00],
        ),
        case(
            "SUBSCRIBE truncated filter",
            true,
            vec![0x82, 0x05, 0x00, 0x01, 0x00, 0x05, b'a'],
        ),
        case(
            "UNSUBSCRIBE without filters",
            true,
            vec![0xA2, 0x02, 0x00, 0x01],
        ),
        case(
            "UNSUBSCRIBE header flags 0000",
            true,
            vec![0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
        ),
        case(
            "PUBREL header flags 0000",
            true,
            vec![0x60, 0x02, 0x00, 0x01],
        ),
        case(
            "PUBACK with three bytes",
            true,
            vec![0x40, 0x03, 0x00, 0x01, 0x00],
        ),
        case("PUBACK packet id 0", true, vec![0x40, 0x02, 0x00, 0x00]),
        case("PINGREQ with a body", true, vec![0xC0, 0x01, 0x00]),
        case("DISCONNECT header flags set", true, vec![0xE1, 0x00]),
        case("CONNACK from a client", true, vec![0x20, 0x02, 0x00, 0x00]),
        case(
            "SUBACK from a client",
            true,
            vec![0x90, 0x03, 0x00, 0x01, 0x00],
        ),
        case("UNSUBACK from a client", true, vec![0xB0, 0x02, 0x00, 0x01]),
        case("PINGRESP from a client", true, vec![0xD0, 0x00]),
    ];
    // Flood: more QoS 2 messages awaiting PUBREL than mqtt.max_awaiting_rel (100).
    let mut flood = Vec::new();
    for id in 1..=101u16 {
        flood.extend_from_slice(&[0x34, 0x05, 0x00, 0x01, b'f']);
        flood.extend_from_slice(&id.to_be_bytes());
    }
    v.push(case("QoS 2 flood past max_awaiting_rel", true, flood));
    v
}

/// Two clients that must keep working whatever the others send.
struct Witnesses {
    sub: Raw,
    publ: Raw,
    next: u16,
}

impl Witnesses {
    fn new(b: &Broker) -> Witnesses {
        let mut sub = Raw::ok(b.addr, "witness-sub");
        sub.subscribe(&[("witness", QoS::AtLeastOnce)]);
        let publ = Raw::ok(b.addr, "witness-pub");
        Witnesses { sub, publ, next: 0 }
    }

    /// One QoS 1 message from one witness to the other.
    fn still_work(&mut self, what: &str) {
        self.next += 1;
        let pid = self.next;
        self.publ
            .publish("witness", &pid.to_be_bytes(), QoS::AtLeastOnce, false, pid);
        assert_eq!(self.publ.recv(), Some(Packet::Puback(pid)), "{what}");
        assert_eq!(
            &self.sub.next_publish().payload[..],
            &pid.to_be_bytes(),
            "{what}"
        );
    }
}

/// Reads until the broker closes `r` (within `WAIT`) and checks what came before the close:
/// the case's CONNACK error code, or nothing but PUBRECs (after a CONNACK 0 if `accepted`).
fn assert_closed_as_expected(r: &mut Raw, c: &Case, accepted: bool, what: &str) {
    let mut seen = r.expect_closed();
    if accepted {
        assert!(
            matches!(seen.first(), Some(Packet::Connack(a)) if a.code == ConnectReturnCode::Accepted),
            "{what}: expected CONNACK 0 first, saw {seen:?}"
        );
        seen.remove(0);
    }
    match c.connack {
        Some(code) => assert!(
            matches!(seen.first(), Some(Packet::Connack(a)) if a.code == code && !a.session_present),
            "{what}: expected CONNACK {code:?}, saw {seen:?}"
        ),
        None => assert!(
            seen.iter().all(|p| matches!(p, Packet::Pubrec(_))),
            "{what}: unexpected reply before close: {seen:?}"
        ),
    }
}

#[test]
fn malformed_and_out_of_order_packets_close_only_the_offender() {
    let b = Broker::with_shards(2);
    let mut witnesses = Witnesses::new(&b);
    let all = cases("c");
    assert!(all.len() >= 40, "only {} cases", all.len());
    for (i, c) in all.iter().enumerate() {
        eprintln!("case {i}: {}", c.name);
        let mut r = Raw::open(b.addr);
        if c.after_connect {
            r.send_raw(&connect_bytes(&format!("bad{i}")));
            assert!(
                matches!(r.recv(), Some(Packet::Connack(a)) if a.code == ConnectReturnCode::Accepted),
                "{}",
                c.name
            );
        }
        r.send_raw(&c.bytes);
        assert_closed_as_expected(&mut r, c, false, c.name);
        witnesses.still_work(c.name);
    }
    let expected = all.len() as u64;
    b.wait_metrics("every bad input counted", |m| {
        m.malformed_packets + m.protocol_errors + m.connects_refused >= expected
    });
}

/// A client id whose owner shard is (or is not) `shard`, of 2.
fn id_owned(prefix: &str, shard: usize, here: bool) -> String {
    (0..)
        .map(|k| format!("{prefix}-{k}"))
        .find(|id| (owner_shard(id.as_bytes(), 2) == shard) == here)
        .expect("ids spread over both shards")
}

/// Every case again, with the CONNECT and the bad bytes in one `send` (so the bad bytes are
/// buffered while the CONNECT waits for the client id's owner), once with a client id owned by
/// the shard that accepted the connection and once with one owned by the other shard. The
/// broker must close the connection either way, at once.
#[test]
fn bad_bytes_behind_a_connect_close_the_connection_wherever_its_client_id_is_owned() {
    let b = Broker::with_shards(2);
    assert_eq!(b.handle().stats().len(), 2, "this test needs 2 CPUs");
    let mut witnesses = Witnesses::new(&b);
    let mut known = b.accepted_when(2);
    let mut ran = [0usize; 2];
    for (i, c) in cases("").iter().enumerate() {
        for here in [true, false] {
            let (mut r, shard) = b.open_located(&mut known);
            let id = id_owned(&format!("bad{i}"), shard, here);
            let what = format!(
                "{} (shard {shard}, client id owned by {})",
                c.name,
                if here { "it" } else { "the other shard" }
            );
            eprintln!("case {i}: {what}");
            // The case's own CONNECTs (before-CONNECT cases) carry the id as well.
            let case = &cases(&id)[i];
            let mut bytes = Vec::new();
            if case.after_connect {
                bytes.extend_from_slice(&connect_bytes(&id));
            }
            bytes.extend_from_slice(&case.bytes);
            r.send_raw(&bytes);
            assert_closed_as_expected(&mut r, case, case.after_connect, &what);
            witnesses.still_work(&what);
            ran[usize::from(here)] += 1;
        }
    }
    assert_eq!(ran[0], ran[1]);
}

#[test]
fn oversized_publish_is_refused_before_buffering() {
    let mut cfg = config(1);
    cfg.mqtt.max_packet_size = shardmq::config::ByteSize(1024);
    let b = Broker::start(cfg);
    let mut r = Raw::ok(b.addr, "big");
    // Declares 10 MB; only the header is sent: the broker must not wait for the rest.
    r.send_raw(&[0x30, 0x80, 0xDA, 0xC4, 0x04]);
    r.expect_closed();
    b.wait_metrics("oversize counted", |m| m.malformed_packets == 1);
    let mut ok = Raw::ok(b.addr, "small");
    ok.publish("t", &[0u8; 900], QoS::AtMostOnce, false, 0);
    ok.ping();
}

/// Valid packets (CONNECT, SUBSCRIBE, a QoS 1 PUBLISH to that subscription, PINGREQ) cut into
/// chunks of 1 to 5 bytes, so the parser meets every split point; in two of three connections
/// one byte after the CONNECT is corrupted. The broker answers an intact sequence in full,
/// answers or closes a corrupted one, and keeps serving everyone else.
#[test]
fn corrupted_packets_in_small_chunks_never_stall_the_shard() {
    let b = Broker::with_shards(2);
    let mut witnesses = Witnesses::new(&b);
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..60u16 {
        let id = format!("chunked{i}");
        let topic = format!("chunk/{i}");
        let mut bytes = connect_bytes(&id);
        let connect_len = bytes.len();
        let mut b2 = BytesMut::new();
        for p in [
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![(topic.clone(), QoS::AtLeastOnce)],
            }),
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic.as_str().into(),
                packet_id: 2,
                payload: Bytes::from(vec![i as u8; usize::from(i) * 7]),
            }),
            Packet::Pingreq,
        ] {
            encode(&p, &mut b2);
        }
        bytes.extend_from_slice(&b2);
        let corrupt = i % 3 != 0;
        if corrupt {
            let at = connect_len + (next() as usize) % (bytes.len() - connect_len);
            bytes[at] ^= (next() as u8) | 1;
        }
        let mut r = Raw::open(b.addr);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = (1 + next() as usize % 5).min(rest.len());
            r.send_raw(&rest[..n]);
            rest = &rest[n..];
        }
        let what = format!("connection {i} (corrupted: {corrupt})");
        if corrupt {
            // Answers, silence (a length now waits for more bytes) or a close: all fine.
            while let Some(Some(_)) = r.recv_within(Duration::from_millis(200)) {}
        } else {
            let mut kinds: Vec<&str> = (0..5)
                .map(|_| match r.recv() {
                    Some(Packet::Publish(p)) => {
                        assert_eq!(p.payload.len(), usize::from(i) * 7, "{what}");
                        r.send(&Packet::Puback(p.packet_id));
                        "PUBLISH"
                    }
                    Some(p) => p.name(),
                    None => panic!("{what}: closed"),
                })
                .collect();
            kinds.sort_unstable();
            assert_eq!(
                kinds,
                vec!["CONNACK", "PINGRESP", "PUBACK", "PUBLISH", "SUBACK"],
                "{what}"
            );
        }
        witnesses.still_work(&what);
    }
}
