//! Fuzz target: the MQTT decoder must never panic, whatever the bytes, the protocol level or
//! the size limit; whatever it decodes must re-encode and decode to the same packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq::protocol::mqtt::{decode, encode, DecodeOptions, ProtocolLevel};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else { return };
    let opts = DecodeOptions {
        max_packet_size: if mode & 1 == 0 { 1 << 20 } else { 64 },
        level: if mode & 2 == 0 { ProtocolLevel::V311 } else { ProtocolLevel::V31 },
        expect_connect: mode & 4 != 0,
    };
    let mut buf = BytesMut::from(input);
    while let Ok(Some(packet)) = decode(&mut buf, &opts) {
        let mut again = BytesMut::new();
        encode(&packet, &mut again);
        let relaxed = DecodeOptions { max_packet_size: usize::MAX, expect_connect: false, ..opts };
        let back = decode(&mut again, &relaxed).expect("re-encoded packet decodes").expect("complete");
        assert_eq!(back, packet);
    }
});
