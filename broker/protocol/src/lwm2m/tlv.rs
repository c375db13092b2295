//! OMA TLV (content format 11542): the binary format of LwM2M 1.0.
//!
//! An entry is a type byte, an id (8 or 16 bits), a length (in the type byte's three low bits,
//! or in the 1, 2 or 3 bytes after the id) and a value. The type byte's bits 7–6 say what the
//! entry is: an object instance (its value: resource entries), a resource instance (a value),
//! a multiple resource (its value: resource instance entries) or a resource with a value; bit
//! 5 is set for a 16-bit id; bits 4–3 give the size of the length field. Values: integers
//! and times as big-endian two's complement in 1, 2, 4 or 8 bytes, unsigned integers in as
//! many unsigned, floats in 4 or 8 bytes, booleans in one byte (0 or 1), object links as two
//! 16-bit ids, strings and opaque as they are.

use super::{malformed, FormatError, Path, Raw, Record, ResourceType, Value};
use bytes::{BufMut, Bytes, BytesMut};

/// What a TLV entry is (bits 7–6 of its type byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An object instance: resource entries inside.
    ObjectInstance,
    /// A resource instance: a value.
    ResourceInstance,
    /// A multiple resource: resource instance entries inside.
    MultipleResource,
    /// A resource with a value.
    Resource,
}

/// One TLV entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    /// What it is.
    pub kind: Kind,
    /// Its id (instance, resource or resource instance id).
    pub id: u16,
    /// Its value (for resources and resource instances).
    pub value: Bytes,
    /// The entries inside (for object instances and multiple resources).
    pub children: Vec<Tlv>,
}

const FORMAT: &str = "TLV";

/// Decodes a TLV payload into its top-level entries (and theirs).
pub fn decode(b: &[u8]) -> Result<Vec<Tlv>, FormatError> {
    decode_level(b, 0)
}

fn decode_level(mut b: &[u8], depth: u8) -> Result<Vec<Tlv>, FormatError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let t = b[0];
        let kind = match t >> 6 {
            0 => Kind::ObjectInstance,
            1 => Kind::ResourceInstance,
            2 => Kind::MultipleResource,
            _ => Kind::Resource,
        };
        let id_len = if t & 0x20 != 0 { 2 } else { 1 };
        let len_len = usize::from(t >> 3 & 3);
        let header = 1 + id_len + len_len;
        if b.len() < header {
            return Err(malformed(FORMAT, "entry header cut short"));
        }
        let id = if id_len == 2 {
            u16::from_be_bytes([b[1], b[2]])
        } else {
            u16::from(b[1])
        };
        let len = if len_len == 0 {
            usize::from(t & 7)
        } else {
            b[1 + id_len..header]
                .iter()
                .fold(0usize, |n, &x| n << 8 | usize::from(x))
        };
        let body = b
            .get(header..header + len)
            .ok_or_else(|| malformed(FORMAT, format!("entry {id} longer than the payload")))?;
        let container = matches!(kind, Kind::ObjectInstance | Kind::MultipleResource);
        let children = if container {
            // Object instance > multiple resource > resource instance, at most.
            if depth >= 2 {
                return Err(malformed(FORMAT, "entries nested too deep"));
            }
            let inner = decode_level(body, depth + 1)?;
            let ok = inner.iter().all(|c| match kind {
                Kind::ObjectInstance => matches!(c.kind, Kind::Resource | Kind::MultipleResource),
                _ => c.kind == Kind::ResourceInstance,
            });
            if !ok {
                return Err(malformed(
                    FORMAT,
                    format!("entry {id}: an entry of the wrong kind inside"),
                ));
            }
            inner
        } else {
            Vec::new()
        };
        out.push(Tlv {
            kind,
            id,
            value: if container {
                Bytes::new()
            } else {
                Bytes::copy_from_slice(body)
            },
            children,
        });
        b = &b[header + len..];
    }
    Ok(out)
}

/// Encodes entries.
pub fn encode(entries: &[Tlv], out: &mut BytesMut) {
    for e in entries {
        let mut inner = BytesMut::new();
        let body: &[u8] = match e.kind {
            Kind::ObjectInstance | Kind::MultipleResource => {
                encode(&e.children, &mut inner);
                &inner
            }
            _ => &e.value,
        };
        let mut t = match e.kind {
            Kind::ObjectInstance => 0x00,
            Kind::ResourceInstance => 0x40,
            Kind::MultipleResource => 0x80,
            Kind::Resource => 0xC0,
        };
        if e.id > 0xFF {
            t |= 0x20;
        }
        let len = body.len();
        let len_bytes: usize = match len {
            0..=7 => {
                t |= len as u8;
                0
            }
            8..=0xFF => 1,
            0x100..=0xFFFF => 2,
            _ => 3,
        };
        t |= (len_bytes as u8) << 3;
        out.put_u8(t);
        if e.id > 0xFF {
            out.put_u16(e.id);
        } else {
            out.put_u8(e.id as u8);
        }
        for i in (0..len_bytes).rev() {
            out.put_u8((len >> (8 * i)) as u8);
        }
        out.put_slice(body);
    }
}

/// The records of a TLV payload answering a request on `base`: resources and resource
/// instances with their paths (object instances and multiple resources give their insides).
pub fn records(base: &Path, payload: &[u8]) -> Result<Vec<Record>, FormatError> {
    let entries = decode(payload)?;
    let mut out = Vec::new();
    let bad_base = || FormatError::Value(format!("TLV entries do not fit the path {base}"));
    for e in &entries {
        match e.kind {
            Kind::ObjectInstance => {
                let object = base.truncate(1).ok_or_else(bad_base)?;
                let inst = object.child(e.id).ok_or_else(bad_base)?;
                flatten_resources(&inst, &e.children, &mut out)?;
            }
            Kind::Resource | Kind::MultipleResource => {
                let inst = base.truncate(2).ok_or_else(bad_base)?;
                flatten_resources(&inst, std::slice::from_ref(e), &mut out)?;
            }
            Kind::ResourceInstance => {
                let res = base.truncate(3).ok_or_else(bad_base)?;
                out.push(Record {
                    path: res.child(e.id).ok_or_else(bad_base)?,
                    value: Raw::Bytes(e.value.clone()),
                });
            }
        }
    }
    Ok(out)
}

fn flatten_resources(
    inst: &Path,
    entries: &[Tlv],
    out: &mut Vec<Record>,
) -> Result<(), FormatError> {
    for r in entries {
        let Some(res) = inst.child(r.id) else {
            return Err(FormatError::Value(format!("no resource below {inst}")));
        };
        match r.kind {
            Kind::Resource => out.push(Record {
                path: res,
                value: Raw::Bytes(r.value.clone()),
            }),
            _ => {
                for ri in &r.children {
                    out.push(Record {
                        path: res
                            .child(ri.id)
                            .expect("a resource path has room for one more"),
                        value: Raw::Bytes(ri.value.clone()),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The bytes of `v` in a TLV entry.
pub fn value_bytes(v: &Value) -> Bytes {
    let mut b = BytesMut::new();
    match v {
        Value::String(s) => b.put_slice(s.as_bytes()),
        Value::Integer(i) | Value::Time(i) => {
            let i = *i;
            if i8::try_from(i).is_ok() {
                b.put_i8(i as i8)
            } else if i16::try_from(i).is_ok() {
                b.put_i16(i as i16)
            } else if i32::try_from(i).is_ok() {
                b.put_i32(i as i32)
            } else {
                b.put_i64(i)
            }
        }
        Value::Unsigned(u) => {
            let u = *u;
            if u <= 0xFF {
                b.put_u8(u as u8)
            } else if u <= 0xFFFF {
                b.put_u16(u as u16)
            } else if u <= 0xFFFF_FFFF {
                b.put_u32(u as u32)
            } else {
                b.put_u64(u)
            }
        }
        Value::Float(f) => {
            let f = *f;
            if f64::from(f as f32) == f {
                b.put_f32(f as f32)
            } else {
                b.put_f64(f)
            }
        }
        Value::Boolean(x) => b.put_u8(u8::from(*x)),
        Value::Opaque(o) => b.put_slice(o),
        Value::Objlnk(o, i) => {
            b.put_u16(*o);
            b.put_u16(*i);
        }
    }
    b.freeze()
}

/// The value of TLV bytes as a resource of type `ty`, `None` when they do not fit it.
pub fn value(b: &[u8], ty: ResourceType) -> Option<Value> {
    let signed = |b: &[u8]| -> Option<i64> {
        Some(match b.len() {
            1 => i64::from(b[0] as i8),
            2 => i64::from(i16::from_be_bytes([b[0], b[1]])),
            4 => i64::from(i32::from_be_bytes(b.try_into().ok()?)),
            8 => i64::from_be_bytes(b.try_into().ok()?),
            _ => return None,
        })
    };
    Some(match ty {
        ResourceType::String | ResourceType::Corelnk => {
            Value::String(std::str::from_utf8(b).ok()?.to_string())
        }
        ResourceType::Integer => Value::Integer(signed(b)?),
        ResourceType::Time => Value::Time(signed(b)?),
        ResourceType::UnsignedInteger => {
            if !matches!(b.len(), 1 | 2 | 4 | 8) {
                return None;
            }
            Value::Unsigned(b.iter().fold(0u64, |n, &x| n << 8 | u64::from(x)))
        }
        ResourceType::Float => Value::Float(match b.len() {
            4 => f64::from(f32::from_be_bytes(b.try_into().ok()?)),
            8 => f64::from_be_bytes(b.try_into().ok()?),
            _ => return None,
        }),
        ResourceType::Boolean => match b {
            [0] => Value::Boolean(false),
            [1] => Value::Boolean(true),
            _ => return None,
        },
        ResourceType::Opaque => Value::Opaque(Bytes::copy_from_slice(b)),
        ResourceType::Objlnk => match b {
            [a, c, d, e] => {
                Value::Objlnk(u16::from_be_bytes([*a, *c]), u16::from_be_bytes([*d, *e]))
            }
            _ => return None,
        },
        ResourceType::None => return None,
    })
}

/// Encodes values for a write or create on `base` (an object: values grouped in object
/// instance entries; an object instance: resource entries; a resource: its value or its
/// instances).
pub fn encode_records(base: &Path, values: &[(Path, Value)]) -> Result<Vec<u8>, FormatError> {
    let mut out = BytesMut::new();
    let outside = |p: &Path| FormatError::Value(format!("{p} is not below {base}"));
    for (p, _) in values {
        if !base.contains(p) || p.depth() < 3 {
            return Err(outside(p));
        }
    }
    // Resources of one instance, in order: (instance path, entries).
    let mut instances: Vec<(Path, Vec<Tlv>)> = Vec::new();
    for (p, v) in values {
        let inst = p.truncate(2).expect("depth checked");
        let res_id = p.resource_id().expect("depth checked");
        let entries = match instances.iter_mut().find(|(i, _)| *i == inst) {
            Some((_, e)) => e,
            None => {
                instances.push((inst, Vec::new()));
                &mut instances.last_mut().expect("just pushed").1
            }
        };
        match p.depth() {
            3 => entries.push(Tlv {
                kind: Kind::Resource,
                id: res_id,
                value: value_bytes(v),
                children: Vec::new(),
            }),
            _ => {
                let ri = Tlv {
                    kind: Kind::ResourceInstance,
                    id: p.ids()[3],
                    value: value_bytes(v),
                    children: Vec::new(),
                };
                match entries
                    .iter_mut()
                    .find(|e| e.kind == Kind::MultipleResource && e.id == res_id)
                {
                    Some(m) => m.children.push(ri),
                    None => entries.push(Tlv {
                        kind: Kind::MultipleResource,
                        id: res_id,
                        value: Bytes::new(),
                        children: vec![ri],
                    }),
                }
            }
        }
    }
    match base.depth() {
        1 => {
            let wrapped: Vec<Tlv> = instances
                .into_iter()
                .map(|(inst, children)| Tlv {
                    kind: Kind::ObjectInstance,
                    id: inst.instance_id().expect("an instance path"),
                    value: Bytes::new(),
                    children,
                })
                .collect();
            encode(&wrapped, &mut out);
        }
        4 => {
            // One resource instance (LwM2M 1.1): the bare entry.
            for (_, entries) in &instances {
                for m in entries {
                    encode(&m.children, &mut out);
                }
            }
        }
        _ => {
            for (_, entries) in &instances {
                encode(entries, &mut out);
            }
        }
    }
    Ok(out.to_vec())
}
