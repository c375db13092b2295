//! Durations and sizes as people write them in configuration and scenario files: durations
//! ("500ms", "30s", "2h" or an integer of seconds; "0s" disables an interval) and sizes ("64KB",
//! "1MB" — binary multiples — or an integer of bytes). A text grammar, parsed and printed
//! here so that the broker's configuration and the load generator's scenarios read alike.

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A duration written as "500ms", "30s", "5m", "2h", "1d" or an integer number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Whole seconds.
    pub const fn secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }

    /// Milliseconds.
    pub const fn millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }

    /// `None` when zero ("0s" disables an interval).
    pub fn enabled(self) -> Option<std::time::Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }

    /// As milliseconds, saturating.
    pub fn as_millis(self) -> u64 {
        self.0.as_millis().min(u64::MAX as u128) as u64
    }
}

/// Parses the duration grammar.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. \"500ms\", \"30s\", \"2h\""))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?}: use ms, s, m, h or d"
            ))
        }
    }
    .ok_or_else(|| format!("duration {s:?} is too large"))?;
    Ok(Duration::millis(ms))
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.as_millis();
        if ms == 0 {
            write!(f, "0s")
        } else if ms % 86_400_000 == 0 {
            write!(f, "{}d", ms / 86_400_000)
        } else if ms % 3_600_000 == 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms % 60_000 == 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a duration such as \"500ms\", \"30s\", \"2h\" or an integer of seconds",
                )
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                v.checked_mul(1000)
                    .map(Duration::millis)
                    .ok_or_else(|| E::custom("duration too large"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a duration cannot be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                parse_duration(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s)
    }
}

/// A size in bytes written as "64KB", "1MB", "1GB" (binary multiples) or an integer of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// As `usize`, saturating.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

/// Parses the size grammar.
pub fn parse_size(s: &str) -> Result<ByteSize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. \"64KB\", \"1MB\" or bytes"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" | "K" | "KIB" => 1 << 10,
        "MB" | "M" | "MIB" => 1 << 20,
        "GB" | "G" | "GIB" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {s:?}: use B, KB, MB or GB"
            ))
        }
    };
    n.checked_mul(mult)
        .map(ByteSize)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b != 0 && b % (1 << 30) == 0 {
            write!(f, "{}GB", b >> 30)
        } else if b != 0 && b % (1 << 20) == 0 {
            write!(f, "{}MB", b >> 20)
        } else if b != 0 && b % (1 << 10) == 0 {
            write!(f, "{}KB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64KB\", \"1MB\" or an integer of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::secs(30));
        assert_eq!(parse_duration("30").unwrap(), Duration::secs(30));
        assert_eq!(parse_duration("2h").unwrap(), Duration::secs(7200));
        assert_eq!(parse_duration("5m").unwrap(), Duration::secs(300));
        assert_eq!(parse_duration("0s").unwrap().enabled(), None);
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("s").is_err());
        for d in ["500ms", "30s", "2h", "5m", "1d", "0s", "1500ms"] {
            assert_eq!(parse_duration(d).unwrap().to_string(), d);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KB").unwrap(), ByteSize(65536));
        assert_eq!(parse_size("1MB").unwrap(), ByteSize(1_048_576));
        assert_eq!(parse_size("1000").unwrap(), ByteSize(1000));
        assert_eq!(parse_size("2gb").unwrap(), ByteSize(2 << 30));
        assert!(parse_size("1TB").is_err());
        assert!(parse_size("lots").is_err());
        for s in ["64KB", "1MB", "1000B", "3GB"] {
            assert_eq!(parse_size(s).unwrap().to_string(), s);
        }
    }
}
