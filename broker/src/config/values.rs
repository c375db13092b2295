//! The value grammar of the configuration: durations and sizes (from
//! [`shardmq_protocol::units`]) and selections ("all" or a list of integers).

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

pub use shardmq_protocol::units::{parse_duration, parse_size, ByteSize, Duration};

/// A selection written as the string "all" or as a list of integers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Selection {
    /// Every available item.
    #[default]
    All,
    /// Exactly these.
    List(Vec<usize>),
}

impl Serialize for Selection {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Selection::All => s.serialize_str("all"),
            Selection::List(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Selection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Selection;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"all\" or a list of integers")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Selection, E> {
                if v.trim() == "all" {
                    Ok(Selection::All)
                } else {
                    Err(E::custom(format!(
                        "expected \"all\" or a list, found {v:?}"
                    )))
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Selection, A::Error> {
                let mut out = Vec::new();
                while let Some(x) = seq.next_element::<usize>()? {
                    out.push(x);
                }
                Ok(Selection::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads a listening address: `IP:PORT` (`0.0.0.0:1883`, `[::]:1883`) or `HOST:PORT` with a
/// host name the system resolves (`localhost:1883`: its first address). A bad value is named
/// in the error.
pub fn bind_addr<'de, D: Deserializer<'de>>(d: D) -> Result<std::net::SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_bind(&s).map_err(de::Error::custom)
}

/// The address `s` names (see [`bind_addr`]).
pub fn parse_bind(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let s = s.trim();
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let shape =
        || format!("{s:?} is not HOST:PORT (such as 0.0.0.0:1883, [::]:1883 or localhost:1883)");
    let (host, port) = s.rsplit_once(':').ok_or_else(shape)?;
    let port: u16 = port.parse().map_err(|_| shape())?;
    if host.is_empty() || host.contains(['[', ']', ' ']) {
        return Err(shape());
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{s:?}: cannot resolve {host:?} ({e})"))?
        .next()
        .ok_or_else(|| format!("{s:?}: {host:?} has no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_addresses_take_ips_and_local_names() {
        assert_eq!(parse_bind("0.0.0.0:1883").unwrap().port(), 1883);
        assert!(parse_bind("[::1]:8883").unwrap().ip().is_loopback());
        assert!(parse_bind("localhost:1883").unwrap().ip().is_loopback());
        for bad in [
            "localhost",
            "1883",
            ":1883",
            "localhost:port",
            "not an address",
            "a:99999",
        ] {
            let e = parse_bind(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
