//! The private TCP gateway's frames (EMQX's emqx-tcp protocol, version 1).
//!
//! A frame is a header byte, `type << 4 | flags`, then for CONNECT, CONNACK and DATATRANS a
//! big-endian `u16` length and that many bytes of body; PING, PONG and DISCONNECT are the
//! header byte alone. A string is a `u16` length and its bytes.
//!
//! | frame | type | direction | body |
//! |---|---|---|---|
//! | CONNECT | 1 | device → broker | flags = version (1); keepalive `u8` seconds, client id, optional username, optional password |
//! | CONNACK | 2 | broker → device | flags = code (0 accepted, 1 authentication failed, 2 unsupported version); a message |
//! | DATATRANS | 3 | both | the raw data |
//! | PING / PONG | 4 / 5 | device → broker / back | — |
//! | DISCONNECT | 6 | device → broker | — |
//!
//! Types 0 and 7–15 are reserved. The decoder checks a frame's declared length against the
//! limit before it buffers anything, and answers "not enough bytes yet" with `Ok(None)`.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// The protocol version this codec speaks (CONNECT's flags).
pub const VERSION: u8 = 1;

/// CONNACK codes.
pub mod code {
    /// Connected.
    pub const ACCEPTED: u8 = 0;
    /// Authentication failed (or the client is not authorized).
    pub const AUTH_FAILED: u8 = 1;
    /// The CONNECT's version is not 1.
    pub const ILLEGAL_VERSION: u8 = 2;
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Device → broker: opens the session.
    Connect {
        /// Seconds without a frame before the broker closes the connection; 0 = never.
        keepalive: u8,
        /// Client id (UTF-8).
        client_id: String,
        /// Username (UTF-8), if given.
        username: Option<String>,
        /// Password (bytes), if given; only after a username.
        password: Option<Bytes>,
    },
    /// Broker → device: the answer to CONNECT.
    Connack {
        /// [`code`]: 0 accepted, 1 authentication failed, 2 unsupported version.
        code: u8,
        /// Free text (clients must not depend on it).
        message: String,
    },
    /// Raw data, either way.
    Data(Bytes),
    /// Device → broker: keepalive.
    Ping,
    /// Broker → device: the answer to PING.
    Pong,
    /// Device → broker: closing.
    Disconnect,
}

impl Frame {
    /// The frame's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Connect { .. } => "CONNECT",
            Frame::Connack { .. } => "CONNACK",
            Frame::Data(_) => "DATATRANS",
            Frame::Ping => "PING",
            Frame::Pong => "PONG",
            Frame::Disconnect => "DISCONNECT",
        }
    }
}

/// Input that is not a frame of this protocol.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// A CONNECT whose flags (the version) are not 1: answer CONNACK 2, then close.
    #[error("CONNECT version {0}, expected 1")]
    UnsupportedVersion(u8),
    /// Types 0 and 7–15 are reserved.
    #[error("reserved frame type {0}")]
    UnknownType(u8),
    /// A body longer than the limit (checked before buffering).
    #[error("{kind} of {len} bytes exceeds max_packet_size {max}")]
    TooLarge {
        /// The frame.
        kind: &'static str,
        /// Its declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A body that does not hold what its frame needs, or holds more.
    #[error("malformed {0}: {1}")]
    Malformed(&'static str, &'static str),
}

/// Decodes the frame at the front of `buf`: `Ok(Some((frame, bytes used)))`, `Ok(None)` when
/// more bytes are needed. DATATRANS bodies (and any body) above `max_packet_size` are refused
/// from the length field, before they are buffered.
pub fn decode_slice(
    buf: &[u8],
    max_packet_size: usize,
) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(&hdr) = buf.first() else {
        return Ok(None);
    };
    let (kind, flags) = (hdr >> 4, hdr & 0x0f);
    let name = match kind {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "DATATRANS",
        4 => return Ok(Some((Frame::Ping, 1))),
        5 => return Ok(Some((Frame::Pong, 1))),
        6 => return Ok(Some((Frame::Disconnect, 1))),
        other => return Err(DecodeError::UnknownType(other)),
    };
    if kind == 1 && flags != VERSION {
        return Err(DecodeError::UnsupportedVersion(flags));
    }
    let Some(len) = buf
        .get(1..3)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return Ok(None);
    };
    if len > max_packet_size {
        return Err(DecodeError::TooLarge {
            kind: name,
            len,
            max: max_packet_size,
        });
    }
    let Some(body) = buf.get(3..3 + len) else {
        return Ok(None);
    };
    let frame = match kind {
        1 => decode_connect(body)?,
        2 => Frame::Connack {
            code: flags,
            message: String::from_utf8(body.to_vec())
                .map_err(|_| DecodeError::Malformed(name, "message is not UTF-8"))?,
        },
        _ => Frame::Data(Bytes::copy_from_slice(body)),
    };
    Ok(Some((frame, 3 + len)))
}

/// Decodes the frame at the front of `buf` and removes it (see [`decode_slice`]).
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Frame>, DecodeError> {
    Ok(decode_slice(buf, max_packet_size)?.map(|(frame, used)| {
        let _ = buf.split_to(used);
        frame
    }))
}

/// A string at the front of `body`, and the rest.
fn string<'a>(body: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), DecodeError> {
    let malformed = |why| DecodeError::Malformed("CONNECT", why);
    let len = body
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or_else(|| malformed(what))?;
    let s = body.get(2..2 + len).ok_or_else(|| malformed(what))?;
    Ok((s, &body[2 + len..]))
}

fn utf8(b: &[u8], why: &'static str) -> Result<String, DecodeError> {
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Malformed("CONNECT", why))
}

fn decode_connect(body: &[u8]) -> Result<Frame, DecodeError> {
    let (&keepalive, rest) = body
        .split_first()
        .ok_or(DecodeError::Malformed("CONNECT", "no keepalive"))?;
    let (cid, rest) = string(rest, "client id cut short")?;
    let client_id = utf8(cid, "client id is not UTF-8")?;
    let (username, rest) = if rest.is_empty() {
        (None, rest)
    } else {
        let (u, rest) = string(rest, "username cut short")?;
        (Some(utf8(u, "username is not UTF-8")?), rest)
    };
    let (password, rest) = if rest.is_empty() {
        (None, rest)
    } else {
        let (p, rest) = string(rest, "password cut short")?;
        (Some(Bytes::copy_from_slice(p)), rest)
    };
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(
            "CONNECT",
            "bytes after the password",
        ));
    }
    Ok(Frame::Connect {
        keepalive,
        client_id,
        username,
        password,
    })
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    out.put_u16(s.len().min(usize::from(u16::MAX)) as u16);
    out.put_slice(&s[..s.len().min(usize::from(u16::MAX))]);
}

/// Appends `frame` to `out`. Bodies are cut at 65,535 bytes (what the length field holds);
/// the caller keeps data within `max_packet_size`.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Connect {
            keepalive,
            client_id,
            username,
            password,
        } => {
            let mut body = BytesMut::new();
            body.put_u8(*keepalive);
            put_str(&mut body, client_id.as_bytes());
            if let Some(u) = username {
                put_str(&mut body, u.as_bytes());
                if let Some(p) = password {
                    put_str(&mut body, p);
                }
            }
            out.put_u8(0x10 | VERSION);
            put_str(out, &body);
        }
        Frame::Connack { code, message } => {
            out.put_u8(0x20 | (code & 0x0f));
            put_str(out, message.as_bytes());
        }
        Frame::Data(data) => {
            out.put_u8(0x30);
            put_str(out, data);
        }
        Frame::Ping => out.put_u8(0x40),
        Frame::Pong => out.put_u8(0x50),
        Frame::Disconnect => out.put_u8(0x60),
    }
}

#[cfg(test)]
mod tests;
