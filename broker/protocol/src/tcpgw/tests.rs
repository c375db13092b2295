//! The TCP gateway codec against the examples of the protocol's description
//! (../shared/specs/protocols.md §1), its error cases, and a round-trip property.

use super::*;
use proptest::prelude::*;

fn one(bytes: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    decode_slice(bytes, 65_535)
}

#[test]
fn the_spec_examples_decode_and_encode_byte_for_byte() {
    let connect = [0x11, 0x00, 0x07, 0x3c, 0x00, 0x04, b'a', b'b', b'c', b'd'];
    let frame = Frame::Connect {
        keepalive: 60,
        client_id: "abcd".into(),
        username: None,
        password: None,
    };
    assert_eq!(one(&connect), Ok(Some((frame.clone(), connect.len()))));
    let mut out = BytesMut::new();
    encode(&frame, &mut out);
    assert_eq!(&out[..], &connect);

    let mut ok = vec![0x20, 0x00, 0x14];
    ok.extend_from_slice(b"Connect Successfully");
    let connack = Frame::Connack {
        code: code::ACCEPTED,
        message: "Connect Successfully".into(),
    };
    assert_eq!(one(&ok), Ok(Some((connack.clone(), ok.len()))));
    let mut out = BytesMut::new();
    encode(&connack, &mut out);
    assert_eq!(&out[..], &ok[..]);

    let failed = [0x21, 0x00, 0x00];
    assert_eq!(
        one(&failed),
        Ok(Some((
            Frame::Connack {
                code: code::AUTH_FAILED,
                message: String::new()
            },
            3
        )))
    );
    let data = [0x30, 0x00, 0x04, b'a', b'b', b'c', b'd'];
    assert_eq!(
        one(&data),
        Ok(Some((Frame::Data(Bytes::from_static(b"abcd")), 7)))
    );
    for (b, f) in [
        (0x40, Frame::Ping),
        (0x50, Frame::Pong),
        (0x60, Frame::Disconnect),
    ] {
        assert_eq!(one(&[b]), Ok(Some((f.clone(), 1))));
        let mut out = BytesMut::new();
        encode(&f, &mut out);
        assert_eq!(&out[..], &[b]);
    }
}

#[test]
fn credentials_follow_the_client_id() {
    let user = [
        0x11, 0x00, 0x0b, 0x00, 0x00, 0x03, b'c', b'i', b'd', 0x00, 0x03, b'b', b'o', b'b',
    ];
    let (f, _) = one(&user).unwrap().unwrap();
    assert_eq!(
        f,
        Frame::Connect {
            keepalive: 0,
            client_id: "cid".into(),
            username: Some("bob".into()),
            password: None
        }
    );
    let mut with_pass = user.to_vec();
    with_pass[2] = 0x10;
    with_pass.extend_from_slice(&[0x00, 0x03, b'p', b'w', b'd']);
    let (f, _) = one(&with_pass).unwrap().unwrap();
    assert!(matches!(f, Frame::Connect { password: Some(p), .. } if &p[..] == b"pwd"));
    // Anything after the password, or a string cut short, is malformed.
    let mut extra = with_pass.clone();
    extra[2] = 0x11;
    extra.push(0);
    assert!(matches!(
        one(&extra),
        Err(DecodeError::Malformed("CONNECT", _))
    ));
    let short = [0x11, 0x00, 0x03, 0x3c, 0x00, 0x04];
    assert!(matches!(
        one(&short),
        Err(DecodeError::Malformed("CONNECT", _))
    ));
    let empty = [0x11, 0x00, 0x00];
    assert!(matches!(
        one(&empty),
        Err(DecodeError::Malformed("CONNECT", _))
    ));
}

#[test]
fn bad_input_is_named() {
    assert_eq!(
        one(&[0x12, 0x00, 0x00]),
        Err(DecodeError::UnsupportedVersion(2))
    );
    assert_eq!(one(&[0x10]), Err(DecodeError::UnsupportedVersion(0)));
    for t in [0u8, 7, 8, 15] {
        assert_eq!(one(&[t << 4]), Err(DecodeError::UnknownType(t)));
    }
    // The length is checked before the body arrives.
    assert_eq!(
        decode_slice(&[0x30, 0x01, 0x00], 255),
        Err(DecodeError::TooLarge {
            kind: "DATATRANS",
            len: 256,
            max: 255
        })
    );
    assert_eq!(decode_slice(&[0x30, 0x00, 0xff], 255).unwrap(), None);
    // Flags of DATATRANS, PING and DISCONNECT are ignored.
    assert_eq!(one(&[0x4f]), Ok(Some((Frame::Ping, 1))));
    assert_eq!(
        one(&[0x34, 0x00, 0x01, 7]),
        Ok(Some((Frame::Data(Bytes::from_static(&[7])), 4)))
    );
}

#[test]
fn partial_frames_wait_for_more_bytes() {
    let data = [0x30, 0x00, 0x04, b'a', b'b', b'c', b'd', 0x40];
    for cut in 0..7 {
        assert_eq!(one(&data[..cut]), Ok(None), "{cut} bytes");
    }
    let mut buf = BytesMut::from(&data[..]);
    assert_eq!(
        decode(&mut buf, 100),
        Ok(Some(Frame::Data(Bytes::from_static(b"abcd"))))
    );
    assert_eq!(decode(&mut buf, 100), Ok(Some(Frame::Ping)));
    assert_eq!(decode(&mut buf, 100), Ok(None));
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u8>(),
            "[a-zA-Z0-9é/_-]{0,30}",
            proptest::option::of((
                "[a-z0-9]{0,12}",
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20))
            ))
        )
            .prop_map(|(keepalive, client_id, creds)| {
                let (username, password) = match creds {
                    Some((u, p)) => (Some(u), p.map(Bytes::from)),
                    None => (None, None),
                };
                Frame::Connect {
                    keepalive,
                    client_id,
                    username,
                    password,
                }
            }),
        (0u8..16, "[ -~]{0,40}").prop_map(|(code, message)| Frame::Connack { code, message }),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|d| Frame::Data(d.into())),
        Just(Frame::Ping),
        Just(Frame::Pong),
        Just(Frame::Disconnect),
    ]
}

proptest! {
    #[test]
    fn every_frame_round_trips(frames in proptest::collection::vec(arb_frame(), 1..8)) {
        let mut buf = BytesMut::new();
        for f in &frames {
            encode(f, &mut buf);
        }
        let mut back = Vec::new();
        while let Some(f) = decode(&mut buf, 65_535).unwrap() {
            back.push(f);
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(back, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode_slice(&bytes, 32);
    }
}
