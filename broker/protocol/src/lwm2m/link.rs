//! CoRE link format (RFC 6690, content format 40): a registration's object list and a
//! Discover's answer, read with coap-lite's link-format parser.
//!
//! A registration lists `</1/0>,</3/0>`; a link with `rt="oma.lwm2m"` names an alternate path
//! that prefixes the others (`</lwm2m>;rt="oma.lwm2m",</lwm2m/1/0>`) and every request the
//! server sends the device. Discover answers with the paths below the one asked and their
//! attributes (`</3/0>;pmin=10,</3/0/0>`).

use super::{malformed, FormatError, Path};
use coap_lite::link_format::LinkFormatParser;

/// Links at most in one payload (a bound on work for hostile input).
const MAX_LINKS: usize = 65_536;

/// One link: its target and attributes (values unquoted; an attribute without `=` has an
/// empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The URI reference between `<` and `>`.
    pub target: String,
    /// `key=value` pairs, in order.
    pub attrs: Vec<(String, String)>,
}

impl Link {
    /// The value of attribute `key`, if present.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The link as link-format text (`</3/0>;pmin=10`), values quoted where they need it.
    pub fn to_text(&self) -> String {
        let mut s = format!("<{}>", self.target);
        for (k, v) in &self.attrs {
            s.push(';');
            s.push_str(k);
            if !v.is_empty() {
                s.push('=');
                if v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
                {
                    s.push_str(v);
                } else {
                    s.push('"');
                    s.push_str(&v.replace('\\', "\\\\").replace('"', "\\\""));
                    s.push('"');
                }
            }
        }
        s
    }
}

/// Parses a link-format payload.
pub fn parse(text: &str) -> Result<Vec<Link>, FormatError> {
    let mut out = Vec::new();
    for item in LinkFormatParser::new(text) {
        let (target, attrs) = item.map_err(|_| malformed("link-format", "not <target>;attrs,…"))?;
        if out.len() >= MAX_LINKS {
            return Err(malformed("link-format", "too many links"));
        }
        out.push(Link {
            target: target.to_string(),
            attrs: attrs.map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        });
    }
    Ok(out)
}

/// What a registration's link list says: the alternate path (`/` when none) and the object
/// and object instance paths, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectList {
    /// Prefix of every path on the device (`/` by default).
    pub alternate_path: String,
    /// `/1`, `/1/0`, `/3/0`…
    pub objects: Vec<Path>,
    /// Object versions the device gave (`</3>;ver=1.1`).
    pub versions: Vec<(u16, String)>,
}

/// Reads a registration's (or update's) link list.
pub fn object_list(text: &str) -> Result<ObjectList, FormatError> {
    let links = parse(text)?;
    let mut alternate_path = String::from("/");
    for l in &links {
        if l.attr("rt") == Some("oma.lwm2m") {
            let t = l.target.trim_end_matches('/');
            alternate_path = if t.is_empty() { "/".into() } else { t.into() };
        }
    }
    let prefix = alternate_path.trim_end_matches('/');
    let mut objects = Vec::new();
    let mut versions = Vec::new();
    for l in &links {
        if l.attr("rt") == Some("oma.lwm2m") {
            continue;
        }
        let rest = l.target.strip_prefix(prefix).unwrap_or(&l.target);
        // Content-format hints and other non-object links (`</>;ct=110`) are skipped.
        let Ok(p) = Path::parse(rest) else {
            continue;
        };
        if p.depth() > 2 {
            return Err(malformed(
                "link-format",
                format!("{} is not an object or object instance", l.target),
            ));
        }
        if let Some(v) = l.attr("ver") {
            versions.push((p.object_id(), v.to_string()));
        }
        objects.push(p);
    }
    Ok(ObjectList {
        alternate_path,
        objects,
        versions,
    })
}
