//! Fuzz target: the MQTT-SN decoder must never panic, whatever the datagram; whatever it
//! decodes must re-encode and decode to the same message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq::protocol::mqttsn::{decode, encode, Message, Topic};

/// Whether the codec writes `m` as it reads it (a PUBLISH carries ids, not names).
fn encodable(m: &Message) -> bool {
    match m {
        Message::Publish { topic: Topic::Name(_), .. } => false,
        Message::Encapsulated { inner, .. } => encodable(inner),
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(m) = decode(data) else { return };
    if !encodable(&m) {
        return;
    }
    let mut out = BytesMut::new();
    encode(&m, &mut out);
    assert_eq!(decode(&out).expect("re-encoded message decodes"), m);
});
