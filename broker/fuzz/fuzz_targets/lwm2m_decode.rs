//! Fuzz target: the LwM2M content-format decoders (TLV, SenML JSON and CBOR, LwM2M JSON,
//! text, opaque) and the link-format reader must never panic, whatever the payload (its first
//! byte picks the format); TLV entries that decode must re-encode to bytes that decode to the
//! same entries.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq::protocol::lwm2m::{decode, format, link, tlv, Path};

const FORMATS: [u16; 6] = [
    format::TEXT,
    format::OPAQUE,
    format::TLV,
    format::SENML_JSON,
    format::SENML_CBOR,
    format::LWM2M_JSON,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let base = match pick >> 4 & 3 {
        0 => Path::parse("/3").unwrap(),
        1 => Path::parse("/3/0").unwrap(),
        2 => Path::parse("/3/0/7").unwrap(),
        _ => Path::parse("/3/0/7/1").unwrap(),
    };
    let _ = decode(FORMATS[usize::from(pick) % FORMATS.len()], &base, payload);
    if let Ok(entries) = tlv::decode(payload) {
        let mut out = BytesMut::new();
        tlv::encode(&entries, &mut out);
        assert_eq!(tlv::decode(&out).expect("re-encoded TLV decodes"), entries);
    }
    if let Ok(text) = std::str::from_utf8(payload) {
        let _ = link::parse(text);
        let _ = link::object_list(text);
    }
});
