//! LwM2M content formats: the specification's examples as fixtures (the Device object in TLV,
//! LwM2M JSON, SenML JSON and CBOR; multiple resources, object links, 16-bit ids), the
//! requests a gateway sends (writes, creates), link lists, round trips of every encoder
//! through its decoder, and hostile input never panicking.

use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    from_hex(&s).expect("hex fixture")
}

fn path(s: &str) -> Path {
    Path::parse(s).unwrap()
}

/// The Device object instance 0 of the specification's TLV example (resources 0–16).
const DEVICE_TLV: &str = "C800144F70656E204D6F62696C6520416C6C69616E6365
    C801164C69676874776569676874204D324D20436C69656E74 C80209333435303030313233 C303312E30
    86064100014101 05 88070842000ED842011388 870841007D42010384 C10964 C10A0F 830B410000
    C40D5182428F C60E2B30323A3030 C11055";

fn device_types(p: &Path) -> ResourceType {
    match p.resource_id() {
        Some(0 | 1 | 2 | 3 | 14 | 15 | 16) => ResourceType::String,
        Some(13) => ResourceType::Time,
        _ => ResourceType::Integer,
    }
}

fn typed(records: &[Record]) -> Vec<(String, Value)> {
    records
        .iter()
        .map(|r| {
            (
                r.path.to_string(),
                r.value.typed(device_types(&r.path)).unwrap(),
            )
        })
        .collect()
}

fn device_values() -> Vec<(String, Value)> {
    let s = |p: &str, v: &str| (p.to_string(), Value::String(v.into()));
    let i = |p: &str, v: i64| (p.to_string(), Value::Integer(v));
    vec![
        s("/3/0/0", "Open Mobile Alliance"),
        s("/3/0/1", "Lightweight M2M Client"),
        s("/3/0/2", "345000123"),
        s("/3/0/3", "1.0"),
        i("/3/0/6/0", 1),
        i("/3/0/6/1", 5),
        i("/3/0/7/0", 3800),
        i("/3/0/7/1", 5000),
        i("/3/0/8/0", 125),
        i("/3/0/8/1", 900),
        i("/3/0/9", 100),
        i("/3/0/10", 15),
        i("/3/0/11/0", 0),
        ("/3/0/13".into(), Value::Time(1_367_491_215)),
        s("/3/0/14", "+02:00"),
        s("/3/0/16", "U"),
    ]
}

#[test]
fn paths_parse_and_print() {
    assert_eq!(path("/3/0/1").to_string(), "/3/0/1");
    assert_eq!(path("3/0/").ids(), &[3, 0]);
    assert_eq!(path("/65535/1/2/3").depth(), 4);
    for bad in ["", "/", "/a", "/3//1", "/70000", "/1/2/3/4/5", "/-1"] {
        assert!(Path::parse(bad).is_err(), "{bad:?}");
    }
    assert!(path("/3").contains(&path("/3/0/1")));
    assert!(!path("/3/1").contains(&path("/3/0/1")));
    assert_eq!(path("/3/0/1").truncate(2), Some(path("/3/0")));
}

#[test]
fn tlv_device_object_instance_of_the_specification() {
    let b = hex(DEVICE_TLV);
    // Answering a read of /3/0: resources and multiple resources at the top.
    let records = decode(format::TLV, &path("/3/0"), &b).unwrap();
    assert_eq!(typed(&records), device_values());
    // The same wrapped in an object instance entry, answering a read of /3.
    let mut wrapped = hex("08 00 79");
    wrapped.extend_from_slice(&b);
    let records = decode(format::TLV, &path("/3"), &wrapped).unwrap();
    assert_eq!(typed(&records), device_values());
}

#[test]
fn tlv_sixteen_bit_ids_object_links_and_instances() {
    // ACL object: two instances, a resource instance with the 16-bit id 310.
    let acl = hex("08000EC10001C101008302417F07C1037F080212C10003C101008702417F0761013601C1037F");
    let records = decode(format::TLV, &path("/2"), &acl).unwrap();
    let paths: Vec<String> = records.iter().map(|r| r.path.to_string()).collect();
    assert_eq!(
        paths,
        [
            "/2/0/0",
            "/2/0/1",
            "/2/0/2/127",
            "/2/0/3",
            "/2/2/0",
            "/2/2/1",
            "/2/2/2/127",
            "/2/2/2/310",
            "/2/2/3"
        ]
    );
    assert_eq!(
        records[7].value.typed(ResourceType::Integer),
        Some(Value::Integer(1))
    );
    // Object links in a multiple resource.
    let links = hex("88000C440000420000440100420001C8010D38363133383030373535353030C40212345678");
    let records = decode(format::TLV, &path("/66/0"), &links).unwrap();
    assert_eq!(records[0].path.to_string(), "/66/0/0/0");
    assert_eq!(
        records[0].value.typed(ResourceType::Objlnk),
        Some(Value::Objlnk(0x42, 0))
    );
    assert_eq!(
        records[1].value.typed(ResourceType::Objlnk),
        Some(Value::Objlnk(0x42, 1))
    );
}

#[test]
fn tlv_writes_as_the_gateway_sends_them() {
    let enc = |base: &str, v: &[(&str, Value)]| {
        let values: Vec<(Path, Value)> = v.iter().map(|(p, v)| (path(p), v.clone())).collect();
        encode(format::TLV, &path(base), &values).unwrap()
    };
    // One resource: an integer in the fewest bytes of two's complement.
    assert_eq!(
        enc("/3/0/13", &[("/3/0/13", Value::Integer(12345))]),
        hex("C20D3039")
    );
    assert_eq!(
        enc("/1/0/1", &[("/1/0/1", Value::Integer(200))]),
        hex("C2010 0C8")
    );
    assert_eq!(
        enc("/1/0/1", &[("/1/0/1", Value::Integer(-1))]),
        hex("C101FF")
    );
    // A batch on an instance: resources and a multiple resource.
    assert_eq!(
        enc(
            "/3/0",
            &[
                ("/3/0/13", Value::Integer(12345)),
                ("/3/0/14", Value::String("87x".into())),
                ("/3/0/6/0", Value::Integer(1)),
            ]
        ),
        hex("C20D3039 C30E383778 8306410001")
    );
    // Object links in a multiple resource.
    assert_eq!(
        enc(
            "/3/0/22",
            &[
                ("/3/0/22/0", Value::Objlnk(1, 2)),
                ("/3/0/22/1", Value::Objlnk(1, 4))
            ]
        ),
        hex("88160C 440000010002 440100010004")
    );
    // A create on an object: wrapped in object instance entries.
    assert_eq!(
        enc("/5", &[("/5/0/1", Value::String("x".into()))]),
        hex("0300 C10178")
    );
}

#[test]
fn tlv_refuses_what_does_not_fit() {
    for bad in [
        "C8",             // header cut short
        "C80114AB",       // longer than the payload
        "080003C10001FF", // an instance whose insides overrun it
        "0800 03 410001", // a resource instance directly in an object instance
        "8600 03 C10001", // a resource in a multiple resource
    ] {
        let b = hex(bad);
        assert!(tlv::decode(&b).is_err(), "{bad}");
    }
    // Types: an integer of 3 bytes, a boolean 2, an objlnk 3 do not fit.
    assert_eq!(tlv::value(&[1, 2, 3], ResourceType::Integer), None);
    assert_eq!(tlv::value(&[2], ResourceType::Boolean), None);
    assert_eq!(tlv::value(&[0, 1, 2], ResourceType::Objlnk), None);
    assert_eq!(
        tlv::value(&[0xFF, 0xFF], ResourceType::UnsignedInteger),
        Some(Value::Unsigned(65535))
    );
    assert_eq!(
        tlv::value(&hex("40C81C8000000000"), ResourceType::Float),
        Some(Value::Float(12345.0))
    );
}

#[test]
fn lwm2m_json_senml_json_and_senml_cbor_of_the_specification() {
    let lwm2m_json = br#"{"bn":"/3/0/","e":[{"n":"0","sv":"Open Mobile Alliance"},{"n":"6/0","v":1},{"n":"13","v":1367491215},{"n":"16","sv":"U"},{"n":"99","bv":true},{"n":"98","ov":"66:1"}]}"#;
    let r = decode(format::LWM2M_JSON, &path("/3/0"), lwm2m_json).unwrap();
    assert_eq!(
        r.iter()
            .map(|r| (r.path.to_string(), r.value.clone()))
            .collect::<Vec<_>>(),
        vec![
            ("/3/0/0".into(), Raw::String("Open Mobile Alliance".into())),
            ("/3/0/6/0".into(), Raw::Integer(1)),
            ("/3/0/13".into(), Raw::Integer(1_367_491_215)),
            ("/3/0/16".into(), Raw::String("U".into())),
            ("/3/0/99".into(), Raw::Boolean(true)),
            ("/3/0/98".into(), Raw::Objlnk(66, 1)),
        ]
    );
    let senml = br#"[{"bn":"/3/0/","n":"0","vs":"Open Mobile Alliance"},{"n":"6/0","v":1},{"n":"13","v":1367491215},{"n":"9","v":12.5},{"bn":"/4/0/","n":"1","vd":"AQI"},{"n":"2","vlo":"66:0"}]"#;
    let r = decode(format::SENML_JSON, &path("/3/0"), senml).unwrap();
    assert_eq!(
        r.iter()
            .map(|r| (r.path.to_string(), r.value.clone()))
            .collect::<Vec<_>>(),
        vec![
            ("/3/0/0".into(), Raw::String("Open Mobile Alliance".into())),
            ("/3/0/6/0".into(), Raw::Integer(1)),
            ("/3/0/13".into(), Raw::Integer(1_367_491_215)),
            ("/3/0/9".into(), Raw::Number(12.5)),
            ("/4/0/1".into(), Raw::Opaque(Bytes::from_static(&[1, 2]))),
            ("/4/0/2".into(), Raw::Objlnk(66, 0)),
        ]
    );
    assert_eq!(
        r[2].value.typed(ResourceType::Time),
        Some(Value::Time(1_367_491_215))
    );
    let cbor = hex("81 A2 21 66 2F332F302F30 03 74 4F70656E204D6F62696C6520416C6C69616E6365");
    let r = decode(format::SENML_CBOR, &path("/3/0/0"), &cbor).unwrap();
    assert_eq!(r[0].path.to_string(), "/3/0/0");
    assert_eq!(r[0].value, Raw::String("Open Mobile Alliance".into()));
    // A float, a negative time label skipped, a half-precision float.
    let cbor = hex(
        "82 A3 21 64 2F37322F 00 63 312F32 02 FB4036666666666666 A3 00 63 312F33 06 24 02 F93E00",
    );
    let r = decode(format::SENML_CBOR, &path("/72"), &cbor).unwrap();
    assert_eq!(r[0].path.to_string(), "/72/1/2");
    assert_eq!(r[0].value, Raw::Number(22.4));
    assert_eq!(r[1].path.to_string(), "/72/1/3");
    assert_eq!(r[1].value, Raw::Number(1.5));
}

#[test]
fn text_and_opaque_carry_one_resource() {
    let r = decode(format::TEXT, &path("/3/0/9"), b"87").unwrap();
    assert_eq!(
        r[0].value.typed(ResourceType::Integer),
        Some(Value::Integer(87))
    );
    assert_eq!(r[0].value.typed(ResourceType::Boolean), None);
    assert!(decode(format::TEXT, &path("/3/0"), b"87").is_err());
    let r = decode(format::OPAQUE, &path("/5/0/0"), &[0, 255]).unwrap();
    assert_eq!(r[0].value.untyped().to_text(), "AP8=");
    assert_eq!(
        encode(
            format::TEXT,
            &path("/3/0/9"),
            &[(path("/3/0/9"), Value::Boolean(true))]
        )
        .unwrap(),
        b"true"
    );
    assert!(decode(12345, &path("/3/0/9"), b"").is_err());
}

#[test]
fn registration_and_discover_links() {
    let l = link::object_list(r#"</lwm2m>;rt="oma.lwm2m",</lwm2m/1/0>,</lwm2m/3/0>,</lwm2m/5>"#)
        .unwrap();
    assert_eq!(l.alternate_path, "/lwm2m");
    assert_eq!(
        l.objects.iter().map(Path::to_string).collect::<Vec<_>>(),
        ["/1/0", "/3/0", "/5"]
    );
    let l = link::object_list("</>;ct=110, </1>;ver=1.1,</1/0>,</3/0>,</3303/0>").unwrap();
    assert_eq!(l.alternate_path, "/");
    assert_eq!(l.objects.len(), 4);
    assert_eq!(l.versions, vec![(1, "1.1".to_string())]);
    let d = link::parse(r#"</3/0>;pmin=10;title="a, b",</3/0/0>,</3/0/1>"#).unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(d[0].attr("pmin"), Some("10"));
    assert_eq!(d[0].attr("title"), Some("a, b"));
    assert_eq!(d[0].to_text(), r#"</3/0>;pmin=10;title="a, b""#);
    assert!(link::parse("3/0>").is_err());
    assert!(
        link::object_list("</3/0/1>").is_err(),
        "a resource is not an object"
    );
}

#[test]
fn base64_and_hex() {
    assert_eq!(base64(b"hello"), "aGVsbG8=");
    assert_eq!(from_base64("aGVsbG8").unwrap(), b"hello");
    assert_eq!(from_base64("-_8").unwrap(), vec![0xFB, 0xFF]);
    assert_eq!(from_hex("0aFF"), Some(vec![10, 255]));
    assert_eq!(from_hex("0"), None);
}

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        ".{0,20}".prop_map(Value::String),
        // JSON numbers are exact to 2^53 (SenML says so); TLV and CBOR carry all 64 bits.
        (-(1i64 << 53)..(1i64 << 53)).prop_map(Value::Integer),
        (0u64..(1u64 << 53)).prop_map(Value::Unsigned),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::Float),
        any::<bool>().prop_map(Value::Boolean),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|b| Value::Opaque(Bytes::from(b))),
        (-(1i64 << 53)..(1i64 << 53)).prop_map(Value::Time),
        (any::<u16>(), any::<u16>()).prop_map(|(o, i)| Value::Objlnk(o, i)),
    ]
}

fn arb_values() -> impl Strategy<Value = Vec<(Path, Value)>> {
    proptest::collection::btree_map(
        (0u16..3, 0u16..300, proptest::option::of(0u16..300)),
        arb_value(),
        1..8,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|((i, r, ri), v)| {
                let p = Path::from_ids(&[9, i, r]).unwrap();
                (ri.map_or(p, |ri| p.child(ri).unwrap()), v)
            })
            .collect::<Vec<_>>()
    })
    .prop_filter("a resource and its instances do not mix", |v| {
        v.iter().all(|(p, _)| {
            v.iter()
                .all(|(q, _)| !(p.depth() == 3 && q.depth() == 4 && p.contains(q)))
        })
    })
}

proptest! {
    /// Every encoder's output decodes to the same values, typed by the values' own types.
    #[test]
    fn every_format_round_trips(values in arb_values()) {
        let base = path("/9");
        for f in [format::TLV, format::SENML_JSON, format::SENML_CBOR, format::LWM2M_JSON] {
            let bytes = encode(f, &base, &values).unwrap();
            let back = decode(f, &base, &bytes).unwrap();
            let mut want = values.clone();
            want.sort_by_key(|(p, _)| *p);
            let mut got: Vec<(Path, Value)> = back
                .iter()
                .map(|r| {
                    let ty = want.iter().find(|(p, _)| *p == r.path).unwrap().1.resource_type();
                    let v = match (&r.value, ty) {
                        // LwM2M JSON has no bytes: they travel as base64 text.
                        (Raw::String(s), ResourceType::Opaque) => Value::Opaque(Bytes::from(from_base64(s).unwrap())),
                        (raw, ty) => raw.typed(ty).unwrap_or_else(|| panic!("{raw:?} as {ty:?} in {}", format::name(f))),
                    };
                    (r.path, v)
                })
                .collect();
            got.sort_by_key(|(p, _)| *p);
            prop_assert_eq!(got, want, "format {}", format::name(f));
        }
    }

    /// Hostile bytes in any format: an error or records, never a panic.
    #[test]
    fn decoders_survive_any_bytes(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        for f in [format::TEXT, format::OPAQUE, format::TLV, format::SENML_JSON, format::SENML_CBOR, format::LWM2M_JSON] {
            let _ = decode(f, &path("/3/0/1"), &b);
        }
        let _ = link::parse(&String::from_utf8_lossy(&b));
        let _ = link::object_list(&String::from_utf8_lossy(&b));
    }
}
