//! The fixed header, the remaining-length varint, and readers/writers for the primitive field
//! types (u8, u16, length-prefixed strings and binary data).

use super::error::DecodeError;
use bytes::{BufMut, BytesMut};

/// The largest value the four-byte remaining length can express.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// A complete fixed header found at the front of a buffer whose whole packet is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// Packet type and flags.
    pub first_byte: u8,
    /// Bytes used by the fixed header (2..=5).
    pub header_len: usize,
    /// Declared remaining length.
    pub remaining_len: usize,
}

impl FixedHeader {
    /// Length of the whole packet.
    pub fn total_len(&self) -> usize {
        self.header_len + self.remaining_len
    }

    /// Checks whether `buf` starts with a complete packet, without allocating. `Ok(None)`:
    /// more bytes are needed. The size limit is checked as soon as the length field is known, so
    /// an oversized packet is refused before any of it is buffered.
    pub fn check(buf: &[u8], max_packet_size: usize) -> Result<Option<FixedHeader>, DecodeError> {
        let Some(&first_byte) = buf.first() else {
            return Ok(None);
        };
        let kind = first_byte >> 4;
        if kind == 0 || kind == 15 {
            return Err(DecodeError::ReservedPacketType(kind));
        }
        let mut remaining_len = 0usize;
        let mut shift = 0;
        let mut i = 1;
        loop {
            if i > 4 {
                return Err(DecodeError::RemainingLengthTooLong);
            }
            let Some(&b) = buf.get(i) else {
                return Ok(None);
            };
            remaining_len |= ((b & 0x7F) as usize) << shift;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let header = FixedHeader {
            first_byte,
            header_len: i,
            remaining_len,
        };
        if header.total_len() > max_packet_size {
            return Err(DecodeError::PacketTooLarge {
                size: header.total_len(),
                max: max_packet_size,
            });
        }
        if buf.len() < header.total_len() {
            return Ok(None);
        }
        Ok(Some(header))
    }
}

/// Checks that the four flag bits equal the value the packet type requires.
pub fn expect_flags(packet: &'static str, flags: u8, expected: u8) -> Result<(), DecodeError> {
    if flags != expected {
        return Err(DecodeError::InvalidHeaderFlags { packet, flags });
    }
    Ok(())
}

/// SUBSCRIBE, UNSUBSCRIBE and PUBREL carry QoS 1 in their header. 3.1.1 requires exactly
/// `0b0010`; 3.1 (`relaxed`) also accepts the DUP bit its clients set on a resend.
pub fn expect_qos1_flags(
    packet: &'static str,
    flags: u8,
    relaxed: bool,
) -> Result<(), DecodeError> {
    let ok = if relaxed {
        flags & 0b0111 == 0b0010
    } else {
        flags == 0b0010
    };
    if !ok {
        return Err(DecodeError::InvalidHeaderFlags { packet, flags });
    }
    Ok(())
}

/// Appends the fixed header for a packet with `remaining_len` bytes after it.
pub fn write_header(first_byte: u8, remaining_len: usize, out: &mut BytesMut) {
    debug_assert!(remaining_len <= MAX_REMAINING_LENGTH);
    out.reserve(5 + remaining_len);
    out.put_u8(first_byte);
    let mut x = remaining_len;
    loop {
        let mut b = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if x == 0 {
            break;
        }
    }
}

/// Appends a length-prefixed string or binary field.
pub fn write_bytes(data: &[u8], out: &mut BytesMut) {
    debug_assert!(data.len() <= u16::MAX as usize);
    out.put_u16(data.len() as u16);
    out.put_slice(data);
}

/// A cursor over the variable header and payload of one packet.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    packet: &'static str,
}

impl<'a> Reader<'a> {
    /// Starts reading `buf`, the body of a `packet`.
    pub fn new(packet: &'static str, buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            packet,
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Offset of the cursor from the start of the body.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(DecodeError::Truncated(self.packet))?;
        self.pos += 1;
        Ok(b)
    }

    /// Reads a big-endian u16.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    /// Reads a non-zero packet identifier.
    pub fn packet_id(&mut self) -> Result<u16, DecodeError> {
        let id = self.u16()?;
        if id == 0 {
            return Err(DecodeError::ZeroPacketId(self.packet));
        }
        Ok(id)
    }

    /// Takes `n` raw bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated(self.packet));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Takes everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    /// Reads a length-prefixed binary field.
    pub fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// Reads a length-prefixed UTF-8 string without U+0000; `field` names it in errors.
    pub fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let raw = self.binary()?;
        utf8(raw, field)
    }

    /// Fails if bytes are left.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(DecodeError::TrailingBytes(self.packet, self.remaining()));
        }
        Ok(())
    }
}

/// Validates an MQTT UTF-8 string: well-formed and without U+0000.
pub fn utf8<'a>(raw: &'a [u8], field: &'static str) -> Result<&'a str, DecodeError> {
    let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8(field))?;
    if raw.contains(&0) {
        return Err(DecodeError::NullCharacter(field));
    }
    Ok(s)
}

/// Validates a topic name: non-empty, no wildcard characters. Inlined into the PUBLISH reader
/// (it is on every message's path).
#[inline]
pub fn check_topic_name(topic: &str) -> Result<(), DecodeError> {
    if topic.is_empty() {
        return Err(DecodeError::EmptyTopic("topic name"));
    }
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(DecodeError::WildcardInTopicName(topic.to_owned()));
    }
    Ok(())
}

/// Validates a topic filter: non-empty, `#` only as the whole last level, `+` only as a whole
/// level.
pub fn check_topic_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.is_empty() {
        return Err(DecodeError::EmptyTopic("topic filter"));
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(DecodeError::InvalidMultiLevelWildcard(filter.to_owned()));
        }
        if level.contains('+') && level != "+" {
            return Err(DecodeError::InvalidSingleLevelWildcard(filter.to_owned()));
        }
    }
    Ok(())
}
