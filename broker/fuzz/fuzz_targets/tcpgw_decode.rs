//! Fuzz target: the TCP gateway's frame decoder must never panic, whatever the bytes or the
//! size limit; whatever it decodes must re-encode and decode to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq::protocol::tcpgw::{decode, encode, Frame};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else { return };
    let max = if mode & 1 == 0 { 65_535 } else { 16 };
    let mut buf = BytesMut::from(input);
    while let Ok(Some(frame)) = decode(&mut buf, max) {
        // A password without a username is not a frame the codec writes.
        if matches!(&frame, Frame::Connect { username: None, password: Some(_), .. }) {
            continue;
        }
        let mut again = BytesMut::new();
        encode(&frame, &mut again);
        let back = decode(&mut again, 65_535).expect("re-encoded frame decodes").expect("complete");
        assert_eq!(back, frame);
    }
});
