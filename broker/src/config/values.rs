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
