//! SenML (RFC 8428) as LwM2M 1.1 uses it — JSON (content format 110) and CBOR (112) — and the
//! OMA LwM2M JSON of LwM2M 1.0 (11543).
//!
//! SenML is a list of records; a record's path is its base name (`bn`, which carries over to
//! the records after it until another one) followed by its name (`n`). A value is a number
//! (`v`), a string (`vs`), a boolean (`vb`), bytes (`vd`, base64url in JSON, a byte string in
//! CBOR) or an object link (`vlo`, `"3:0"`). CBOR uses integer labels: `bn` −2, `bt` −3, `n` 0,
//! `v` 2, `vs` 3, `vb` 4, `t` 6, `vd` 8 (`vlo` keeps its text label).
//!
//! LwM2M JSON is one object: `bn` and a list `e` of entries with `n` and one of `v`, `sv`,
//! `bv`, `ov`.

use super::{base64, from_base64, malformed, FormatError, Path, Raw, Record, Value};
use bytes::Bytes;
use serde_json::{json, Map, Value as Json};

/// Records at most in one payload (a payload is at most a few blocks: this only bounds work on
/// hostile input).
const MAX_RECORDS: usize = 65_536;

fn path_of(format: &'static str, bn: &str, n: &str) -> Result<Path, FormatError> {
    let full = format!("{bn}{n}");
    Path::parse(&full).map_err(|_| malformed(format, format!("{full:?} is not an LwM2M path")))
}

fn objlnk(format: &'static str, s: &str) -> Result<Raw, FormatError> {
    let bad = || malformed(format, format!("{s:?} is not an object link"));
    let (o, i) = s.split_once(':').ok_or_else(bad)?;
    Ok(Raw::Objlnk(
        o.parse().map_err(|_| bad())?,
        i.parse().map_err(|_| bad())?,
    ))
}

fn json_number(n: &serde_json::Number) -> Raw {
    match n.as_i64() {
        Some(i) => Raw::Integer(i),
        None => Raw::Number(n.as_f64().unwrap_or(f64::NAN)),
    }
}

/// The labels a JSON format gives each kind of value.
struct Labels {
    number: &'static str,
    string: &'static str,
    boolean: &'static str,
    /// Base64 bytes (SenML only).
    bytes: Option<&'static str>,
    objlnk: &'static str,
}

const SENML_LABELS: Labels = Labels {
    number: "v",
    string: "vs",
    boolean: "vb",
    bytes: Some("vd"),
    objlnk: "vlo",
};

const LWM2M_JSON_LABELS: Labels = Labels {
    number: "v",
    string: "sv",
    boolean: "bv",
    bytes: None,
    objlnk: "ov",
};

/// The value of a JSON record (`None` when it has none), by the format's labels.
fn json_value(
    format: &'static str,
    r: &Map<String, Json>,
    l: &Labels,
) -> Result<Option<Raw>, FormatError> {
    let text = |key: &str, v: &Json| {
        v.as_str()
            .ok_or_else(|| malformed(format, format!("{key} is not a string")))
            .map(str::to_string)
    };
    if let Some(v) = r.get(l.number) {
        return match v {
            Json::Number(n) => Ok(Some(json_number(n))),
            _ => Err(malformed(format, format!("{} is not a number", l.number))),
        };
    }
    if let Some(v) = r.get(l.string) {
        return Ok(Some(Raw::String(text(l.string, v)?)));
    }
    if let Some(v) = r.get(l.boolean) {
        let b = v
            .as_bool()
            .ok_or_else(|| malformed(format, format!("{} is not a boolean", l.boolean)))?;
        return Ok(Some(Raw::Boolean(b)));
    }
    if let Some((key, v)) = l.bytes.and_then(|k| r.get(k).map(|v| (k, v))) {
        let b = from_base64(&text(key, v)?)
            .ok_or_else(|| malformed(format, format!("{key} is not base64")))?;
        return Ok(Some(Raw::Opaque(Bytes::from(b))));
    }
    match r.get(l.objlnk) {
        Some(v) => objlnk(format, &text(l.objlnk, v)?).map(Some),
        None => Ok(None),
    }
}

/// Decodes SenML JSON.
pub fn decode_json(payload: &[u8]) -> Result<Vec<Record>, FormatError> {
    const F: &str = "SenML JSON";
    let v: Json = serde_json::from_slice(payload).map_err(|e| malformed(F, e.to_string()))?;
    let Json::Array(items) = v else {
        return Err(malformed(F, "not an array of records"));
    };
    if items.len() > MAX_RECORDS {
        return Err(malformed(F, "too many records"));
    }
    let mut bn = String::new();
    let mut out = Vec::new();
    for item in &items {
        let Json::Object(r) = item else {
            return Err(malformed(F, "a record that is not an object"));
        };
        if let Some(b) = r.get("bn") {
            bn = b
                .as_str()
                .ok_or_else(|| malformed(F, "bn is not a string"))?
                .to_string();
        }
        let n = match r.get("n") {
            Some(n) => n
                .as_str()
                .ok_or_else(|| malformed(F, "n is not a string"))?,
            None => "",
        };
        let Some(value) = json_value(F, r, &SENML_LABELS)? else {
            // A record without a value (a base-name-only record, or a Read-Composite request).
            continue;
        };
        out.push(Record {
            path: path_of(F, &bn, n)?,
            value,
        });
    }
    Ok(out)
}

/// Decodes OMA LwM2M JSON (LwM2M 1.0).
pub fn decode_lwm2m_json(payload: &[u8]) -> Result<Vec<Record>, FormatError> {
    const F: &str = "LwM2M JSON";
    let v: Json = serde_json::from_slice(payload).map_err(|e| malformed(F, e.to_string()))?;
    let Json::Object(top) = v else {
        return Err(malformed(F, "not an object"));
    };
    let bn = match top.get("bn") {
        Some(b) => b
            .as_str()
            .ok_or_else(|| malformed(F, "bn is not a string"))?,
        None => "",
    };
    let Some(Json::Array(entries)) = top.get("e") else {
        return Err(malformed(F, "no e array"));
    };
    if entries.len() > MAX_RECORDS {
        return Err(malformed(F, "too many entries"));
    }
    let mut out = Vec::new();
    for e in entries {
        let Json::Object(r) = e else {
            return Err(malformed(F, "an entry that is not an object"));
        };
        let n = match r.get("n") {
            Some(n) => n
                .as_str()
                .ok_or_else(|| malformed(F, "n is not a string"))?,
            None => "",
        };
        let value = json_value(F, r, &LWM2M_JSON_LABELS)?
            .ok_or_else(|| malformed(F, "an entry without a value"))?;
        out.push(Record {
            path: path_of(F, bn, n)?,
            value,
        });
    }
    Ok(out)
}

/// Decodes SenML CBOR.
pub fn decode_cbor(payload: &[u8]) -> Result<Vec<Record>, FormatError> {
    const F: &str = "SenML CBOR";
    use minicbor::data::Type;
    let err = |e: minicbor::decode::Error| malformed(F, e.to_string());
    let mut d = minicbor::Decoder::new(payload);
    let n_records = d
        .array()
        .map_err(err)?
        .ok_or_else(|| malformed(F, "indefinite-length array"))?;
    if n_records > MAX_RECORDS as u64 {
        return Err(malformed(F, "too many records"));
    }
    let mut bn = String::new();
    let mut out = Vec::new();
    for _ in 0..n_records {
        let fields = d
            .map()
            .map_err(err)?
            .ok_or_else(|| malformed(F, "indefinite-length map"))?;
        let mut name = String::new();
        let mut value = None;
        for _ in 0..fields {
            let label = match d.datatype().map_err(err)? {
                Type::String => match d.str().map_err(err)? {
                    "vlo" => {
                        value = Some(objlnk(F, d.str().map_err(err)?)?);
                        continue;
                    }
                    _ => {
                        d.skip().map_err(err)?;
                        continue;
                    }
                },
                _ => d.i64().map_err(err)?,
            };
            match label {
                -2 => bn = d.str().map_err(err)?.to_string(),
                0 => name = d.str().map_err(err)?.to_string(),
                2 => {
                    value = Some(match d.datatype().map_err(err)? {
                        Type::U8
                        | Type::U16
                        | Type::U32
                        | Type::I8
                        | Type::I16
                        | Type::I32
                        | Type::I64 => Raw::Integer(d.i64().map_err(err)?),
                        Type::U64 => {
                            let u = d.u64().map_err(err)?;
                            i64::try_from(u).map_or(Raw::Number(u as f64), Raw::Integer)
                        }
                        Type::F16 | Type::F32 | Type::F64 => Raw::Number(d.f64().map_err(err)?),
                        other => return Err(malformed(F, format!("v is a {other}"))),
                    })
                }
                3 => value = Some(Raw::String(d.str().map_err(err)?.to_string())),
                4 => value = Some(Raw::Boolean(d.bool().map_err(err)?)),
                8 => value = Some(Raw::Opaque(Bytes::copy_from_slice(d.bytes().map_err(err)?))),
                _ => d.skip().map_err(err)?,
            }
        }
        if let Some(value) = value {
            out.push(Record {
                path: path_of(F, &bn, &name)?,
                value,
            });
        }
    }
    if d.position() != payload.len() {
        return Err(malformed(F, "bytes after the records"));
    }
    Ok(out)
}

/// The base name and names of values on `base`: the base path with a trailing `/`, and each
/// value's path below it.
fn names(base: &Path, values: &[(Path, Value)]) -> (String, Vec<String>) {
    let bn = format!("{base}/");
    let names = values
        .iter()
        .map(|(p, _)| {
            p.ids()[base.depth().min(p.depth())..]
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    (bn, names)
}

/// Encodes values as SenML JSON.
pub fn encode_json(base: &Path, values: &[(Path, Value)]) -> Vec<u8> {
    let (bn, names) = names(base, values);
    let records: Vec<Json> = values
        .iter()
        .zip(names)
        .enumerate()
        .map(|(i, ((_, v), n))| {
            let mut r = Map::new();
            if i == 0 {
                r.insert("bn".into(), json!(bn));
            }
            r.insert("n".into(), json!(n));
            let (k, val) = match v {
                Value::String(s) => ("vs", json!(s)),
                Value::Integer(x) | Value::Time(x) => ("v", json!(x)),
                Value::Unsigned(x) => ("v", json!(x)),
                Value::Float(x) => ("v", json!(x)),
                Value::Boolean(b) => ("vb", json!(b)),
                Value::Opaque(b) => ("vd", json!(base64(b))),
                Value::Objlnk(o, i) => ("vlo", json!(format!("{o}:{i}"))),
            };
            r.insert(k.into(), val);
            Json::Object(r)
        })
        .collect();
    serde_json::to_vec(&Json::Array(records)).unwrap_or_default()
}

/// Encodes values as OMA LwM2M JSON.
pub fn encode_lwm2m_json(base: &Path, values: &[(Path, Value)]) -> Vec<u8> {
    let (bn, names) = names(base, values);
    let e: Vec<Json> = values
        .iter()
        .zip(names)
        .map(|((_, v), n)| match v {
            Value::String(s) => json!({"n": n, "sv": s}),
            Value::Integer(x) | Value::Time(x) => json!({"n": n, "v": x}),
            Value::Unsigned(x) => json!({"n": n, "v": x}),
            Value::Float(x) => json!({"n": n, "v": x}),
            Value::Boolean(b) => json!({"n": n, "bv": b}),
            Value::Opaque(b) => json!({"n": n, "sv": base64(b)}),
            Value::Objlnk(o, i) => json!({"n": n, "ov": format!("{o}:{i}")}),
        })
        .collect();
    serde_json::to_vec(&json!({"bn": bn, "e": e})).unwrap_or_default()
}

/// Encodes values as SenML CBOR.
pub fn encode_cbor(base: &Path, values: &[(Path, Value)]) -> Vec<u8> {
    let (bn, names) = names(base, values);
    let mut buf = Vec::new();
    let mut e = minicbor::Encoder::new(&mut buf);
    // Writing into a Vec cannot fail.
    let _ = e.array(values.len() as u64);
    for (i, ((_, v), n)) in values.iter().zip(names).enumerate() {
        let _ = e.map(if i == 0 { 3 } else { 2 });
        if i == 0 {
            let _ = e.i64(-2).and_then(|e| e.str(&bn));
        }
        let _ = e.i64(0).and_then(|e| e.str(&n));
        let _ = match v {
            Value::String(s) => e.i64(3).and_then(|e| e.str(s)),
            Value::Integer(x) | Value::Time(x) => e.i64(2).and_then(|e| e.i64(*x)),
            Value::Unsigned(x) => e.i64(2).and_then(|e| e.u64(*x)),
            Value::Float(x) => e.i64(2).and_then(|e| e.f64(*x)),
            Value::Boolean(b) => e.i64(4).and_then(|e| e.bool(*b)),
            Value::Opaque(b) => e.i64(8).and_then(|e| e.bytes(b)),
            Value::Objlnk(o, i) => e.str("vlo").and_then(|e| e.str(&format!("{o}:{i}"))),
        };
    }
    buf
}
