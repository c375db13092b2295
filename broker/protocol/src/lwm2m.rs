//! LwM2M data (sans-IO): paths, resource values and the content formats devices use for them.
//!
//! A device's objects are addressed `/object/instance/resource/resource-instance` ([`Path`]).
//! A reply or a notification carries one or more resource values in one of the formats below,
//! which [`decode`] turns into [`Record`]s (a path and a [`Raw`] value); [`encode`] does the
//! reverse for writes and creates. Formats that carry bytes without their meaning (TLV,
//! opaque) give [`Raw::Bytes`], which the object registry's type for the resource makes a
//! [`Value`] ([`Raw::typed`]); the others carry their own type.
//!
//! | format | number | module |
//! |---|---|---|
//! | text/plain (a single resource) | 0 | here |
//! | link-format (Discover, registration) | 40 | [`link`] |
//! | opaque (a single resource) | 42 | here |
//! | SenML JSON | 110 | [`senml`] |
//! | SenML CBOR | 112 | [`senml`] |
//! | OMA TLV | 11542 | [`tlv`] |
//! | OMA LwM2M JSON (1.0) | 11543 | [`senml`] |
//!
//! Every decoder refuses input that does not follow its format with a [`FormatError`] naming
//! what was wrong, and never panics or allocates beyond what the input holds.

pub mod link;
pub mod senml;
pub mod tlv;

/// The CoAP codec the gateway builds on (so the crates above use the same version).
pub use coap_lite;

use bytes::Bytes;
use std::fmt;
use thiserror::Error;

/// Content-Format numbers (CoAP's registry).
pub mod format {
    /// text/plain; charset=utf-8.
    pub const TEXT: u16 = 0;
    /// application/link-format.
    pub const LINK: u16 = 40;
    /// application/octet-stream.
    pub const OPAQUE: u16 = 42;
    /// application/senml+json.
    pub const SENML_JSON: u16 = 110;
    /// application/senml+cbor.
    pub const SENML_CBOR: u16 = 112;
    /// application/vnd.oma.lwm2m+tlv.
    pub const TLV: u16 = 11542;
    /// application/vnd.oma.lwm2m+json.
    pub const LWM2M_JSON: u16 = 11543;

    /// The format's name, as responses show it.
    pub fn name(f: u16) -> &'static str {
        match f {
            TEXT => "text",
            LINK => "link",
            OPAQUE => "opaque",
            SENML_JSON => "senml+json",
            SENML_CBOR => "senml+cbor",
            TLV => "tlv",
            LWM2M_JSON => "json",
            _ => "unknown",
        }
    }
}

/// Why content did not decode (or a value could not be encoded).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// The bytes break the format's rules.
    #[error("{format}: {what}")]
    Malformed {
        /// The format.
        format: &'static str,
        /// What is wrong.
        what: String,
    },
    /// A path that is not `/o[/i[/r[/ri]]]` with 16-bit numbers.
    #[error("bad path {0:?}")]
    Path(String),
    /// A content format this module does not know.
    #[error("unsupported content format {0}")]
    Unsupported(u16),
    /// The value does not fit the type, or the format cannot carry it here.
    #[error("{0}")]
    Value(String),
}

pub(crate) fn malformed(format: &'static str, what: impl Into<String>) -> FormatError {
    FormatError::Malformed {
        format,
        what: what.into(),
    }
}

/// An LwM2M path: an object, and optionally an instance, a resource and a resource instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Path {
    /// The ids; those past `len` are 0, so equal paths compare equal.
    ids: [u16; 4],
    len: u8,
}

impl Path {
    /// `/object`.
    pub fn object(o: u16) -> Path {
        Path {
            ids: [o, 0, 0, 0],
            len: 1,
        }
    }

    /// The path of these ids (one to four of them).
    pub fn from_ids(ids: &[u16]) -> Option<Path> {
        if ids.is_empty() || ids.len() > 4 {
            return None;
        }
        let mut p = Path {
            ids: [0; 4],
            len: ids.len() as u8,
        };
        p.ids[..ids.len()].copy_from_slice(ids);
        Some(p)
    }

    /// Parses `/3/0/1` (a trailing `/` allowed, the leading one optional).
    pub fn parse(s: &str) -> Result<Path, FormatError> {
        let bad = || FormatError::Path(s.to_string());
        let t = s.strip_prefix('/').unwrap_or(s);
        let t = t.strip_suffix('/').unwrap_or(t);
        if t.is_empty() {
            return Err(bad());
        }
        let mut ids = Vec::with_capacity(4);
        for part in t.split('/') {
            if part.is_empty() || part.len() > 5 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            ids.push(part.parse::<u16>().map_err(|_| bad())?);
        }
        Path::from_ids(&ids).ok_or_else(bad)
    }

    /// Its ids.
    pub fn ids(&self) -> &[u16] {
        &self.ids[..usize::from(self.len)]
    }

    /// How many ids it has (1: object … 4: resource instance).
    pub fn depth(&self) -> usize {
        usize::from(self.len)
    }

    /// The object id.
    pub fn object_id(&self) -> u16 {
        self.ids[0]
    }

    /// The instance id, if the path has one.
    pub fn instance_id(&self) -> Option<u16> {
        (self.len >= 2).then_some(self.ids[1])
    }

    /// The resource id, if the path has one.
    pub fn resource_id(&self) -> Option<u16> {
        (self.len >= 3).then_some(self.ids[2])
    }

    /// This path with `id` appended (`None` past a resource instance).
    pub fn child(&self, id: u16) -> Option<Path> {
        if self.len >= 4 {
            return None;
        }
        let mut p = *self;
        p.ids[usize::from(self.len)] = id;
        p.len += 1;
        Some(p)
    }

    /// The first `depth` ids of this path (`None` if it is shorter, or `depth` is 0).
    pub fn truncate(&self, depth: usize) -> Option<Path> {
        Path::from_ids(self.ids().get(..depth)?)
    }

    /// Whether `other` is this path or below it.
    pub fn contains(&self, other: &Path) -> bool {
        other.depth() >= self.depth() && other.ids[..self.depth()] == *self.ids()
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for id in self.ids() {
            write!(f, "/{id}")?;
        }
        Ok(())
    }
}

/// A resource's data type, as the object definitions name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceType {
    /// UTF-8 text.
    String,
    /// A signed integer (up to 64 bits).
    Integer,
    /// An unsigned integer (LwM2M 1.1).
    UnsignedInteger,
    /// A floating-point number.
    Float,
    /// true or false.
    Boolean,
    /// Bytes.
    Opaque,
    /// Seconds since the Unix epoch (a signed integer).
    Time,
    /// A link to an object instance (`object:instance`).
    Objlnk,
    /// A CoRE link (LwM2M 1.1): link-format text.
    Corelnk,
    /// No value (an executable resource).
    None,
}

impl ResourceType {
    /// The type named by a definition's `<Type>` (or a write command's `type`), any case.
    pub fn parse(s: &str) -> Option<ResourceType> {
        let s = s.trim();
        let t = |n: &str| s.eq_ignore_ascii_case(n);
        Some(if t("String") {
            ResourceType::String
        } else if t("Integer") {
            ResourceType::Integer
        } else if t("Unsigned Integer") || t("UnsignedInteger") {
            ResourceType::UnsignedInteger
        } else if t("Float") {
            ResourceType::Float
        } else if t("Boolean") {
            ResourceType::Boolean
        } else if t("Opaque") {
            ResourceType::Opaque
        } else if t("Time") {
            ResourceType::Time
        } else if t("Objlnk") {
            ResourceType::Objlnk
        } else if t("Corelnk") {
            ResourceType::Corelnk
        } else if s.is_empty() || t("none") {
            ResourceType::None
        } else {
            return None;
        })
    }

    /// Its name in the definitions.
    pub fn name(self) -> &'static str {
        match self {
            ResourceType::String => "String",
            ResourceType::Integer => "Integer",
            ResourceType::UnsignedInteger => "Unsigned Integer",
            ResourceType::Float => "Float",
            ResourceType::Boolean => "Boolean",
            ResourceType::Opaque => "Opaque",
            ResourceType::Time => "Time",
            ResourceType::Objlnk => "Objlnk",
            ResourceType::Corelnk => "Corelnk",
            ResourceType::None => "none",
        }
    }
}

/// A typed resource value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text.
    String(String),
    /// A signed integer.
    Integer(i64),
    /// An unsigned integer.
    Unsigned(u64),
    /// A float.
    Float(f64),
    /// A boolean.
    Boolean(bool),
    /// Bytes.
    Opaque(Bytes),
    /// Seconds since the epoch.
    Time(i64),
    /// `object:instance`.
    Objlnk(u16, u16),
}

impl Value {
    /// Parses the text form of a value of type `ty` (what a write command carries, and
    /// text/plain): numbers in decimal, booleans `true`/`false`/`1`/`0`, objlnk `o:i`, opaque
    /// bytes as given (`hex` decodes hexadecimal instead).
    pub fn from_text(ty: ResourceType, s: &str, hex: bool) -> Result<Value, FormatError> {
        let bad = || FormatError::Value(format!("{s:?} is not a valid {}", ty.name()));
        let t = s.trim();
        Ok(match ty {
            ResourceType::String | ResourceType::Corelnk => Value::String(s.to_string()),
            ResourceType::Integer => Value::Integer(t.parse().map_err(|_| bad())?),
            ResourceType::Time => Value::Time(t.parse().map_err(|_| bad())?),
            ResourceType::UnsignedInteger => Value::Unsigned(t.parse().map_err(|_| bad())?),
            ResourceType::Float => {
                let f: f64 = t.parse().map_err(|_| bad())?;
                if !f.is_finite() {
                    return Err(bad());
                }
                Value::Float(f)
            }
            ResourceType::Boolean => match t {
                "true" | "1" => Value::Boolean(true),
                "false" | "0" => Value::Boolean(false),
                _ => return Err(bad()),
            },
            ResourceType::Objlnk => {
                let (o, i) = t.split_once(':').ok_or_else(bad)?;
                Value::Objlnk(o.parse().map_err(|_| bad())?, i.parse().map_err(|_| bad())?)
            }
            ResourceType::Opaque if hex => Value::Opaque(Bytes::from(from_hex(t).ok_or_else(bad)?)),
            ResourceType::Opaque => Value::Opaque(Bytes::copy_from_slice(s.as_bytes())),
            ResourceType::None => {
                return Err(FormatError::Value("an executable has no value".into()))
            }
        })
    }

    /// The type this value has.
    pub fn resource_type(&self) -> ResourceType {
        match self {
            Value::String(_) => ResourceType::String,
            Value::Integer(_) => ResourceType::Integer,
            Value::Unsigned(_) => ResourceType::UnsignedInteger,
            Value::Float(_) => ResourceType::Float,
            Value::Boolean(_) => ResourceType::Boolean,
            Value::Opaque(_) => ResourceType::Opaque,
            Value::Time(_) => ResourceType::Time,
            Value::Objlnk(..) => ResourceType::Objlnk,
        }
    }

    /// The text form (text/plain, and what MQTT applications see): opaque as base64.
    pub fn to_text(&self) -> String {
        match self {
            Value::String(s) => s.clone(),
            Value::Integer(i) | Value::Time(i) => i.to_string(),
            Value::Unsigned(u) => u.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Boolean(b) => b.to_string(),
            Value::Opaque(b) => base64(b),
            Value::Objlnk(o, i) => format!("{o}:{i}"),
        }
    }
}

/// A value as a format carries it, before the resource's type is known.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    /// Bytes whose meaning the resource's type gives (TLV, opaque).
    Bytes(Bytes),
    /// Text whose meaning the resource's type gives (text/plain).
    Text(String),
    /// A number (SenML `v`, LwM2M JSON `v`).
    Number(f64),
    /// An integer number (SenML CBOR integers; JSON numbers without fraction or exponent).
    Integer(i64),
    /// A string (`vs`, `sv`).
    String(String),
    /// A boolean (`vb`, `bv`).
    Boolean(bool),
    /// Bytes (`vd`).
    Opaque(Bytes),
    /// An object link (`vlo`, `ov`).
    Objlnk(u16, u16),
}

impl Raw {
    /// The value as type `ty` says, or `None` when the data does not fit that type.
    pub fn typed(&self, ty: ResourceType) -> Option<Value> {
        use ResourceType as T;
        Some(match (self, ty) {
            (Raw::Bytes(b), _) => tlv::value(b, ty)?,
            (Raw::Text(s), _) => Value::from_text(ty, s, false).ok()?,
            (Raw::Integer(i), T::Integer) => Value::Integer(*i),
            (Raw::Integer(i), T::Time) => Value::Time(*i),
            (Raw::Integer(i), T::UnsignedInteger) => Value::Unsigned(u64::try_from(*i).ok()?),
            (Raw::Integer(i), T::Float) => Value::Float(*i as f64),
            (Raw::Number(f), T::Float) => Value::Float(*f),
            (Raw::Number(f), T::Integer | T::Time | T::UnsignedInteger)
                if f.fract() == 0.0 && f.abs() < 9.0e15 =>
            {
                return Raw::Integer(*f as i64).typed(ty)
            }
            (Raw::String(s), T::String | T::Corelnk) => Value::String(s.clone()),
            (Raw::Boolean(b), T::Boolean) => Value::Boolean(*b),
            (Raw::Opaque(b), T::Opaque) => Value::Opaque(b.clone()),
            (Raw::Objlnk(o, i), T::Objlnk) => Value::Objlnk(*o, *i),
            _ => return None,
        })
    }

    /// The value by its own shape, for a resource without a definition (or whose data does
    /// not fit its type): bytes as base64, numbers and strings as they are.
    pub fn untyped(&self) -> Value {
        match self {
            Raw::Bytes(b) | Raw::Opaque(b) => Value::Opaque(b.clone()),
            Raw::Text(s) | Raw::String(s) => Value::String(s.clone()),
            Raw::Number(f) => Value::Float(*f),
            Raw::Integer(i) => Value::Integer(*i),
            Raw::Boolean(b) => Value::Boolean(*b),
            Raw::Objlnk(o, i) => Value::Objlnk(*o, *i),
        }
    }
}

/// One resource (or resource instance) value of a payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Where it is.
    pub path: Path,
    /// What it is.
    pub value: Raw,
}

/// Decodes a payload of content format `format` that answers a request on `base`.
pub fn decode(format: u16, base: &Path, payload: &[u8]) -> Result<Vec<Record>, FormatError> {
    match format {
        format::TEXT => {
            let s = std::str::from_utf8(payload).map_err(|_| malformed("text", "not UTF-8"))?;
            single(base, Raw::Text(s.to_string()))
        }
        format::OPAQUE => single(base, Raw::Bytes(Bytes::copy_from_slice(payload))),
        format::TLV => tlv::records(base, payload),
        format::SENML_JSON => senml::decode_json(payload),
        format::SENML_CBOR => senml::decode_cbor(payload),
        format::LWM2M_JSON => senml::decode_lwm2m_json(payload),
        other => Err(FormatError::Unsupported(other)),
    }
}

fn single(base: &Path, value: Raw) -> Result<Vec<Record>, FormatError> {
    if base.depth() < 3 {
        return Err(FormatError::Value(format!(
            "a single value answers a resource, not {base}"
        )));
    }
    Ok(vec![Record { path: *base, value }])
}

/// Encodes values for a write or a create on `base` in content format `format` (TLV,
/// SenML JSON, SenML CBOR, LwM2M JSON; text/plain and opaque for one resource).
pub fn encode(format: u16, base: &Path, values: &[(Path, Value)]) -> Result<Vec<u8>, FormatError> {
    match format {
        format::TLV => tlv::encode_records(base, values),
        format::SENML_JSON => Ok(senml::encode_json(base, values)),
        format::SENML_CBOR => Ok(senml::encode_cbor(base, values)),
        format::LWM2M_JSON => Ok(senml::encode_lwm2m_json(base, values)),
        format::TEXT | format::OPAQUE => match values {
            [(p, v)] if p == base && base.depth() >= 3 => Ok(match (format, v) {
                (format::OPAQUE, Value::Opaque(b)) => b.to_vec(),
                (format::OPAQUE, _) => {
                    return Err(FormatError::Value(
                        "opaque carries opaque values only".into(),
                    ))
                }
                (_, Value::Opaque(_)) => {
                    return Err(FormatError::Value(
                        "text/plain does not carry opaque".into(),
                    ))
                }
                _ => v.to_text().into_bytes(),
            }),
            _ => Err(FormatError::Value(format!(
                "{} carries one resource value",
                format::name(format)
            ))),
        },
        other => Err(FormatError::Unsupported(other)),
    }
}

/// Standard base64 with padding (opaque values in JSON).
pub fn base64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Decodes base64, standard or URL-safe (SenML's `vd`), with or without padding.
pub fn from_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    use base64::Engine;
    let t = s.trim_end_matches('=');
    STANDARD_NO_PAD
        .decode(t)
        .or_else(|_| URL_SAFE_NO_PAD.decode(t))
        .ok()
}

/// Decodes hexadecimal (an even number of digits, any case).
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests;
