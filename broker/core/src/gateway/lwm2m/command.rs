//! The MQTT side of the LwM2M gateway: JSON commands on an endpoint's command topic, and the
//! JSON the gateway publishes (responses, notifications, register and update events), as EMQX
//! 4.x's emqx-lwm2m shaped them.
//!
//! A command is `{"reqID": …, "msgType": "read", "data": {"path": "/3/0/0"}}` (any other
//! top-level field is kept); its response is the command with `data` replaced by
//! `{"reqPath", "code", "codeMsg"[, "content"]}`. A command that cannot be understood gets
//! the same shape with code `4.00`, `codeMsg` `bad_request` and an `error` saying why.

use super::registry::Registry;
use serde_json::{json, Map, Value as Json};
use shardmq_protocol::lwm2m::{self, format, Path, Raw, Record, ResourceType, Value};

/// What a command asks.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// GET.
    Read(Path),
    /// GET with Accept: link-format.
    Discover(Path),
    /// PUT (replace) or POST (partial update of an instance) of values below `base`.
    Write {
        /// The path written.
        base: Path,
        /// The values.
        values: Vec<(Path, Value)>,
    },
    /// PUT with attributes in the query.
    WriteAttr {
        /// The path.
        path: Path,
        /// `pmin`, `pmax`, `gt`, `lt`, `st` and their values.
        attrs: Vec<(String, String)>,
    },
    /// POST with arguments.
    Execute {
        /// The resource.
        path: Path,
        /// Its arguments (text/plain), possibly empty.
        args: String,
    },
    /// POST on an object: new instances (or one whose id the device chooses).
    Create {
        /// The object.
        base: Path,
        /// The values, below `/o/i`.
        values: Vec<(Path, Value)>,
        /// The device chooses the instance id.
        any_instance: bool,
    },
    /// DELETE of an instance.
    Delete(Path),
    /// GET with Observe 0.
    Observe(Path),
    /// GET with Observe 1.
    CancelObserve(Path),
}

impl Op {
    /// The `msgType` of this operation.
    pub fn msg_type(&self) -> &'static str {
        match self {
            Op::Read(_) => "read",
            Op::Discover(_) => "discover",
            Op::Write { .. } => "write",
            Op::WriteAttr { .. } => "write-attr",
            Op::Execute { .. } => "execute",
            Op::Create { .. } => "create",
            Op::Delete(_) => "delete",
            Op::Observe(_) => "observe",
            Op::CancelObserve(_) => "cancel-observe",
        }
    }

    /// The path the request goes to (`reqPath`).
    pub fn path(&self) -> Path {
        match self {
            Op::Read(p)
            | Op::Discover(p)
            | Op::Delete(p)
            | Op::Observe(p)
            | Op::CancelObserve(p) => *p,
            Op::Write { base, .. } | Op::Create { base, .. } => *base,
            Op::WriteAttr { path, .. } | Op::Execute { path, .. } => *path,
        }
    }
}

/// A command: what it asks, and its JSON to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The command as it came (echoed in the response, `data` replaced).
    pub original: Map<String, Json>,
    /// What it asks.
    pub op: Op,
}

/// A command the gateway could not take: the error response to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal(pub Json);

fn refusal(original: &Map<String, Json>, why: impl Into<String>) -> Refusal {
    let mut out = Map::new();
    for k in ["reqID", "msgType"] {
        if let Some(v) = original.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    out.insert(
        "data".into(),
        json!({"code": "4.00", "codeMsg": "bad_request", "error": why.into()}),
    );
    Refusal(Json::Object(out))
}

fn path_field(data: &Map<String, Json>, key: &str) -> Result<Path, String> {
    let s = data
        .get(key)
        .and_then(Json::as_str)
        .ok_or_else(|| format!("data.{key} is missing or not a string"))?;
    Path::parse(s).map_err(|_| format!("data.{key} {s:?} is not an LwM2M path"))
}

/// The type and text of one value to write, typed by `type` or else by the registry.
fn write_value(
    item: &Map<String, Json>,
    path: &Path,
    registry: &Registry,
    hex: bool,
) -> Result<Value, String> {
    let ty = match item.get("type").and_then(Json::as_str) {
        Some(t) => ResourceType::parse(t).ok_or_else(|| format!("unknown type {t:?}"))?,
        None => registry
            .resource_type(path)
            .ok_or_else(|| format!("{path}: no type given and no definition"))?,
    };
    let text = match item.get("value") {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Number(n)) => n.to_string(),
        Some(Json::Bool(b)) => b.to_string(),
        _ => return Err(format!("{path}: value is missing")),
    };
    Value::from_text(ty, &text, hex).map_err(|e| format!("{path}: {e}"))
}

/// A content item's path: absolute, or relative to `base`.
fn content_path(item: &Map<String, Json>, base: &Path) -> Result<Path, String> {
    let s = item
        .get("path")
        .and_then(Json::as_str)
        .ok_or("a content item without path")?;
    let full = if s.starts_with('/') {
        Path::parse(s)
    } else {
        Path::parse(&format!("{base}/{s}"))
    }
    .map_err(|_| format!("content path {s:?} is not an LwM2M path"))?;
    if !base.contains(&full) {
        return Err(format!("content path {full} is not below {base}"));
    }
    Ok(full)
}

/// Reads a command.
pub fn parse(payload: &[u8], registry: &Registry) -> Result<Command, Refusal> {
    let empty = Map::new();
    let v: Json =
        serde_json::from_slice(payload).map_err(|e| refusal(&empty, format!("not JSON: {e}")))?;
    let Json::Object(original) = v else {
        return Err(refusal(&empty, "not a JSON object"));
    };
    let op = parse_op(&original, registry).map_err(|why| refusal(&original, why))?;
    Ok(Command { original, op })
}

fn parse_op(c: &Map<String, Json>, registry: &Registry) -> Result<Op, String> {
    let msg_type = c
        .get("msgType")
        .and_then(Json::as_str)
        .ok_or("msgType is missing or not a string")?;
    let no_data = Map::new();
    let data = match c.get("data") {
        Some(Json::Object(d)) => d,
        None => &no_data,
        Some(_) => return Err("data is not an object".into()),
    };
    let hex = c.get("encoding").and_then(Json::as_str) == Some("hex");
    Ok(match msg_type {
        "read" => Op::Read(path_field(data, "path")?),
        "discover" => Op::Discover(path_field(data, "path")?),
        "observe" => Op::Observe(path_field(data, "path")?),
        "cancel-observe" => Op::CancelObserve(path_field(data, "path")?),
        "delete" => {
            let p = path_field(data, "path")?;
            if p.depth() != 2 {
                return Err(format!("delete takes an object instance, not {p}"));
            }
            Op::Delete(p)
        }
        "execute" => {
            let path = path_field(data, "path")?;
            if path.depth() != 3 {
                return Err(format!("execute takes a resource, not {path}"));
            }
            let args = match data.get("args") {
                None | Some(Json::Null) => String::new(),
                Some(Json::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            Op::Execute { path, args }
        }
        "write-attr" => {
            let path = path_field(data, "path")?;
            let mut attrs = Vec::new();
            for k in ["pmin", "pmax", "gt", "lt", "st"] {
                match data.get(k) {
                    None | Some(Json::Null) => {}
                    Some(Json::String(s)) if !s.is_empty() => attrs.push((k.into(), s.clone())),
                    Some(Json::String(_)) => {}
                    Some(Json::Number(n)) => attrs.push((k.into(), n.to_string())),
                    Some(_) => return Err(format!("{k} is not a number")),
                }
            }
            for (k, v) in &attrs {
                if v.parse::<f64>().is_err() {
                    return Err(format!("{k} {v:?} is not a number"));
                }
            }
            if attrs.is_empty() {
                // A PUT without attributes would be a Write of nothing.
                return Err("write-attr needs one of pmin, pmax, gt, lt, st".into());
            }
            Op::WriteAttr { path, attrs }
        }
        "write" => {
            if data.contains_key("basePath") {
                let base = path_field(data, "basePath")?;
                if base.depth() < 2 {
                    return Err(format!(
                        "a batch write goes to an instance or a resource, not {base}"
                    ));
                }
                let items = data
                    .get("content")
                    .and_then(Json::as_array)
                    .ok_or("data.content is missing or not a list")?;
                if items.is_empty() {
                    return Err("data.content is empty".into());
                }
                let mut values = Vec::new();
                for item in items {
                    let item = item
                        .as_object()
                        .ok_or("a content item that is not an object")?;
                    let p = content_path(item, &base)?;
                    if p.depth() < 3 {
                        return Err(format!("content path {p} is not a resource"));
                    }
                    values.push((p, write_value(item, &p, registry, hex)?));
                }
                Op::Write { base, values }
            } else {
                let path = path_field(data, "path")?;
                if path.depth() < 3 {
                    return Err(format!(
                        "write takes a resource (or basePath and content), not {path}"
                    ));
                }
                let v = write_value(data, &path, registry, hex)?;
                Op::Write {
                    base: path,
                    values: vec![(path, v)],
                }
            }
        }
        "create" => {
            let base = path_field(data, "basePath")?;
            if base.depth() != 1 {
                return Err(format!("create takes an object, not {base}"));
            }
            let items = data
                .get("content")
                .and_then(Json::as_array)
                .ok_or("data.content is missing or not a list")?;
            let mut values = Vec::new();
            let mut any_instance = false;
            for item in items {
                let item = item
                    .as_object()
                    .ok_or("a content item that is not an object")?;
                let raw = item.get("path").and_then(Json::as_str).unwrap_or("");
                // A bare resource id leaves the instance id to the device.
                let p = if !raw.starts_with('/') && !raw.contains('/') && !raw.is_empty() {
                    any_instance = true;
                    Path::parse(&format!("{base}/0/{raw}"))
                        .map_err(|_| format!("content path {raw:?}"))?
                } else {
                    content_path(item, &base)?
                };
                if p.depth() < 3 {
                    return Err(format!("content path {p} is not a resource"));
                }
                values.push((p, write_value(item, &p, registry, hex)?));
            }
            Op::Create {
                base,
                values,
                any_instance,
            }
        }
        other => return Err(format!("unknown msgType {other:?}")),
    })
}

/// The JSON of a typed value.
pub fn value_json(v: &Value) -> Json {
    match v {
        Value::String(s) => json!(s),
        Value::Integer(i) | Value::Time(i) => json!(i),
        Value::Unsigned(u) => json!(u),
        Value::Float(f) => json!(f),
        Value::Boolean(b) => json!(b),
        Value::Opaque(b) => json!(lwm2m::base64(b)),
        Value::Objlnk(o, i) => json!(format!("{o}:{i}")),
    }
}

/// The `content` of a read: each record typed by its definition; one without a definition
/// (or whose data does not fit it) passed on as it came, with the format it came in (bytes
/// as base64, `"encoding": "base64"`).
pub fn content_json(records: &[Record], registry: &Registry, fmt: u16) -> Json {
    let items: Vec<Json> = records
        .iter()
        .map(|r| {
            let typed = registry
                .resource_type(&r.path)
                .and_then(|ty| r.value.typed(ty));
            match typed {
                Some(v) => json!({"path": r.path.to_string(), "value": value_json(&v)}),
                None => {
                    let mut m = Map::new();
                    m.insert("path".into(), json!(r.path.to_string()));
                    m.insert("value".into(), value_json(&r.value.untyped()));
                    if matches!(r.value, Raw::Bytes(_) | Raw::Opaque(_)) {
                        m.insert("encoding".into(), json!("base64"));
                    }
                    m.insert("format".into(), json!(format::name(fmt)));
                    Json::Object(m)
                }
            }
        })
        .collect();
    Json::Array(items)
}

/// The response to `original` (its `data` replaced).
pub fn response(original: &Map<String, Json>, msg_type: Option<&str>, data: Json) -> Json {
    let mut out = original.clone();
    if let Some(t) = msg_type {
        out.insert("msgType".into(), json!(t));
    }
    out.insert("data".into(), data);
    Json::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        let mut r = Registry::new();
        r.load_str(
            "<LWM2M><Object><Name>Device</Name><ObjectID>3</ObjectID><Resources>\
             <Item ID=\"13\"><Name>Current Time</Name><Type>Time</Type></Item>\
             <Item ID=\"0\"><Name>Manufacturer</Name><Type>String</Type></Item>\
             </Resources></Object></LWM2M>",
        )
        .unwrap();
        r
    }

    fn op(s: &str) -> Result<Op, Json> {
        parse(s.as_bytes(), &reg()).map(|c| c.op).map_err(|r| r.0)
    }

    #[test]
    fn commands_of_every_type() {
        let p = |s| Path::parse(s).unwrap();
        assert_eq!(
            op(r#"{"reqID":1,"msgType":"read","data":{"path":"/3/0/0"}}"#),
            Ok(Op::Read(p("/3/0/0")))
        );
        assert_eq!(
            op(r#"{"msgType":"discover","data":{"path":"/3/0"}}"#),
            Ok(Op::Discover(p("/3/0")))
        );
        assert_eq!(
            op(r#"{"msgType":"write","data":{"path":"/3/0/13","type":"Integer","value":"12345"}}"#),
            Ok(Op::Write {
                base: p("/3/0/13"),
                values: vec![(p("/3/0/13"), Value::Integer(12345))]
            })
        );
        // The type from the definition when the command gives none.
        assert_eq!(
            op(r#"{"msgType":"write","data":{"path":"/3/0/13","value":7}}"#),
            Ok(Op::Write {
                base: p("/3/0/13"),
                values: vec![(p("/3/0/13"), Value::Time(7))]
            })
        );
        assert_eq!(
            op(
                r#"{"msgType":"write","data":{"basePath":"/3/0","content":[{"path":"/3/0/13","type":"Integer","value":"1"},{"path":"14","type":"String","value":"x"}]}}"#
            ),
            Ok(Op::Write {
                base: p("/3/0"),
                values: vec![
                    (p("/3/0/13"), Value::Integer(1)),
                    (p("/3/0/14"), Value::String("x".into()))
                ]
            })
        );
        assert_eq!(
            op(
                r#"{"msgType":"write","encoding":"hex","data":{"path":"/5/0/0","type":"Opaque","value":"0aff"}}"#
            ),
            Ok(Op::Write {
                base: p("/5/0/0"),
                values: vec![(
                    p("/5/0/0"),
                    Value::Opaque(bytes::Bytes::from_static(&[10, 255]))
                )]
            })
        );
        assert_eq!(
            op(
                r#"{"msgType":"write-attr","data":{"path":"/3303/0/5700","pmin":"5","pmax":60,"gt":""}}"#
            ),
            Ok(Op::WriteAttr {
                path: p("/3303/0/5700"),
                attrs: vec![("pmin".into(), "5".into()), ("pmax".into(), "60".into())]
            })
        );
        assert_eq!(
            op(r#"{"msgType":"execute","data":{"path":"/3/0/4","args":""}}"#),
            Ok(Op::Execute {
                path: p("/3/0/4"),
                args: String::new()
            })
        );
        assert_eq!(
            op(
                r#"{"msgType":"create","data":{"basePath":"/3303","content":[{"path":"1/5700","type":"Float","value":"20.5"}]}}"#
            ),
            Ok(Op::Create {
                base: p("/3303"),
                values: vec![(p("/3303/1/5700"), Value::Float(20.5))],
                any_instance: false
            })
        );
        assert_eq!(
            op(r#"{"msgType":"delete","data":{"path":"/3303/1"}}"#),
            Ok(Op::Delete(p("/3303/1")))
        );
        assert_eq!(
            op(r#"{"msgType":"observe","data":{"path":"/3/0/13"}}"#),
            Ok(Op::Observe(p("/3/0/13")))
        );
        assert_eq!(
            op(r#"{"msgType":"cancel-observe","data":{"path":"/3/0/13"}}"#),
            Ok(Op::CancelObserve(p("/3/0/13")))
        );
    }

    #[test]
    fn malformed_commands_get_a_reason_not_silence() {
        for (cmd, says) in [
            ("not json", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"reqID":5}"#, "msgType"),
            (
                r#"{"reqID":5,"msgType":"reboot","data":{}}"#,
                "unknown msgType",
            ),
            (
                r#"{"reqID":5,"msgType":"read","data":{"path":"/x"}}"#,
                "not an LwM2M path",
            ),
            (
                r#"{"reqID":5,"msgType":"write","data":{"path":"/3/0/13","type":"Integer","value":"ten"}}"#,
                "not a valid Integer",
            ),
            (
                r#"{"reqID":5,"msgType":"write","data":{"path":"/9/0/1","value":"1"}}"#,
                "no type given",
            ),
            (
                r#"{"reqID":5,"msgType":"delete","data":{"path":"/3"}}"#,
                "object instance",
            ),
            (
                r#"{"reqID":5,"msgType":"write","data":{"basePath":"/3/0","content":[{"path":"/4/0/1","type":"String","value":"x"}]}}"#,
                "not below",
            ),
        ] {
            let r = op(cmd).unwrap_err();
            assert_eq!(r["data"]["code"], "4.00", "{cmd}");
            assert!(
                r["data"]["error"].as_str().unwrap().contains(says),
                "{cmd}: {r}"
            );
            if cmd.contains("reqID") {
                assert_eq!(r["reqID"], 5);
            }
        }
    }

    #[test]
    fn content_is_typed_by_definitions_and_passes_the_rest_on() {
        let records = vec![
            Record {
                path: Path::parse("/3/0/0").unwrap(),
                value: Raw::Bytes(bytes::Bytes::from_static(b"ACME")),
            },
            Record {
                path: Path::parse("/3/0/13").unwrap(),
                value: Raw::Bytes(bytes::Bytes::from_static(&[0x51, 0x82, 0x42, 0x8F])),
            },
            Record {
                path: Path::parse("/9999/0/1").unwrap(),
                value: Raw::Bytes(bytes::Bytes::from_static(&[1, 2])),
            },
        ];
        let c = content_json(&records, &reg(), format::TLV);
        assert_eq!(
            c,
            json!([
                {"path": "/3/0/0", "value": "ACME"},
                {"path": "/3/0/13", "value": 1367491215},
                {"path": "/9999/0/1", "value": "AQI=", "encoding": "base64", "format": "tlv"}
            ])
        );
    }
}
