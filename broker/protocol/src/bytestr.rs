//! `ByteStr`: an immutable UTF-8 string stored in a shared [`Bytes`] buffer.
//!
//! Topic names travel through the broker many times (routing, queues, re-encoding for each
//! subscriber). Keeping them as `Bytes` makes every copy a reference-count bump instead of an
//! allocation, while the type keeps the "valid UTF-8" fact that the decoder checked once.

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A UTF-8 string backed by [`Bytes`]; cloning it never copies the text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteStr(Bytes);

impl ByteStr {
    /// Wraps `bytes` after checking that they are valid UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(ByteStr(bytes))
    }

    /// Wraps `bytes` without checking them.
    ///
    /// # Safety
    /// `bytes` must be valid UTF-8 (for example, a slice the caller has just validated).
    pub unsafe fn from_utf8_unchecked(bytes: Bytes) -> Self {
        ByteStr(bytes)
    }

    /// Builds a `ByteStr` from a static string without copying.
    pub const fn from_static(s: &'static str) -> Self {
        ByteStr(Bytes::from_static(s.as_bytes()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checks or guarantees that the bytes are valid UTF-8, and the
        // buffer is immutable.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The raw bytes (valid UTF-8).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The underlying shared buffer.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for ByteStr {
    fn from(s: String) -> Self {
        ByteStr(Bytes::from(s))
    }
}

impl From<&str> for ByteStr {
    fn from(s: &str) -> Self {
        ByteStr(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl std::ops::Deref for ByteStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ByteStr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ByteStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(ByteStr::from)
    }
}
