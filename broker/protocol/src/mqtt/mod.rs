//! MQTT 3.1 (protocol level 3, "MQIsdp") and 3.1.1 (level 4) packets, both directions.
//!
//! Layout: one file per packet family with its `read`/`write` functions, this file with the
//! shared types and the [`decode`]/[`encode`] entry points, [`fixed`] with the fixed header and
//! the primitive field readers, [`error`] with one variant per spec rule.
//!
//! The decoder is strict: fixed-header flags per type, a remaining length of at most four bytes
//! checked against `max_packet_size` before anything is buffered, well-formed UTF-8 without
//! U+0000, valid topic names and filters, non-zero packet identifiers, and no trailing bytes.
//! Protocol level 3 (3.1) accepts the QoS-1 header its spec gives SUBSCRIBE, UNSUBSCRIBE and
//! PUBREL with a DUP bit set on resend; level 4 requires exactly `0b0010`.

mod ack;
mod connack;
mod connect;
pub mod error;
pub mod fixed;
mod publish;
mod suback;
mod subscribe;
mod unsubscribe;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

pub use crate::bytestr::ByteStr;
pub use connack::{Connack, ConnectReturnCode};
pub use connect::{Connect, LastWill};
pub use error::DecodeError;
pub use publish::{write_parts as encode_publish, Publish};
pub use suback::{Suback, SubackCode};
pub use subscribe::Subscribe;
pub use unsubscribe::Unsubscribe;

/// Quality of service of a PUBLISH or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// Parses the two QoS bits; `None` for 3.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The protocol level a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProtocolLevel {
    /// MQTT 3.1, protocol name "MQIsdp", level 3.
    V31,
    /// MQTT 3.1.1, protocol name "MQTT", level 4.
    V311,
}

impl ProtocolLevel {
    /// The level byte on the wire.
    pub fn level(self) -> u8 {
        match self {
            ProtocolLevel::V31 => 3,
            ProtocolLevel::V311 => 4,
        }
    }

    /// The protocol name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ProtocolLevel::V31 => "MQIsdp",
            ProtocolLevel::V311 => "MQTT",
        }
    }
}

/// Every MQTT 3.1/3.1.1 control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (client → server).
    Connect(Box<Connect>),
    /// CONNACK (server → client).
    Connack(Connack),
    /// PUBLISH (both directions).
    Publish(Publish),
    /// PUBACK.
    Puback(u16),
    /// PUBREC.
    Pubrec(u16),
    /// PUBREL.
    Pubrel(u16),
    /// PUBCOMP.
    Pubcomp(u16),
    /// SUBSCRIBE (client → server).
    Subscribe(Subscribe),
    /// SUBACK (server → client).
    Suback(Suback),
    /// UNSUBSCRIBE (client → server).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (server → client).
    Unsuback(u16),
    /// PINGREQ.
    Pingreq,
    /// PINGRESP.
    Pingresp,
    /// DISCONNECT.
    Disconnect,
}

impl Packet {
    /// The packet type's name, for logs and counters.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::Connack(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::Puback(_) => "PUBACK",
            Packet::Pubrec(_) => "PUBREC",
            Packet::Pubrel(_) => "PUBREL",
            Packet::Pubcomp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::Suback(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::Unsuback(_) => "UNSUBACK",
            Packet::Pingreq => "PINGREQ",
            Packet::Pingresp => "PINGRESP",
            Packet::Disconnect => "DISCONNECT",
        }
    }
}

/// What the decoder needs to know about the connection it decodes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Largest whole packet accepted (fixed header included), `mqtt.max_packet_size`.
    pub max_packet_size: usize,
    /// Protocol level negotiated by CONNECT; before CONNECT, 3.1.1 rules apply.
    pub level: ProtocolLevel,
    /// The connection has not sent CONNECT yet: any other packet type is refused from its
    /// first byte, without waiting for the rest of it.
    pub expect_connect: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_packet_size: 1024 * 1024,
            level: ProtocolLevel::V311,
            expect_connect: false,
        }
    }
}

/// Decodes one packet from the front of `buf`, removing its bytes. `Ok(None)` means more bytes
/// are needed; the buffer is then left untouched.
pub fn decode(buf: &mut BytesMut, opts: &DecodeOptions) -> Result<Option<Packet>, DecodeError> {
    match decode_slice(buf, opts)? {
        Some((packet, used)) => {
            let _ = buf.split_to(used);
            Ok(Some(packet))
        }
        None => Ok(None),
    }
}

/// Decodes one packet from the front of `buf` without consuming it: returns the packet and the
/// number of bytes it used. PUBLISH copies its topic and its payload, each into a new buffer of
/// its own, so that a queued message never pins the (larger) read buffer it arrived in.
pub fn decode_slice(
    buf: &[u8],
    opts: &DecodeOptions,
) -> Result<Option<(Packet, usize)>, DecodeError> {
    if let (true, Some(&first)) = (opts.expect_connect, buf.first()) {
        if first >> 4 != 1 {
            return Err(DecodeError::NotConnect(first >> 4));
        }
    }
    let Some(header) = fixed::FixedHeader::check(buf, opts.max_packet_size)? else {
        return Ok(None);
    };
    let body = &buf[header.header_len..header.total_len()];
    let packet = read_body(header.first_byte, body, opts)?;
    Ok(Some((packet, header.total_len())))
}

fn read_body(first: u8, body: &[u8], opts: &DecodeOptions) -> Result<Packet, DecodeError> {
    let flags = first & 0x0F;
    let relaxed = opts.level == ProtocolLevel::V31;
    match first >> 4 {
        1 => {
            fixed::expect_flags("CONNECT", flags, 0)?;
            connect::read(body).map(|c| Packet::Connect(Box::new(c)))
        }
        2 => {
            fixed::expect_flags("CONNACK", flags, 0)?;
            connack::read(body).map(Packet::Connack)
        }
        3 => publish::read(flags, body).map(Packet::Publish),
        4 => {
            fixed::expect_flags("PUBACK", flags, 0)?;
            ack::read("PUBACK", body).map(Packet::Puback)
        }
        5 => {
            fixed::expect_flags("PUBREC", flags, 0)?;
            ack::read("PUBREC", body).map(Packet::Pubrec)
        }
        6 => {
            fixed::expect_qos1_flags("PUBREL", flags, relaxed)?;
            ack::read("PUBREL", body).map(Packet::Pubrel)
        }
        7 => {
            fixed::expect_flags("PUBCOMP", flags, 0)?;
            ack::read("PUBCOMP", body).map(Packet::Pubcomp)
        }
        8 => {
            fixed::expect_qos1_flags("SUBSCRIBE", flags, relaxed)?;
            subscribe::read(body).map(Packet::Subscribe)
        }
        9 => {
            fixed::expect_flags("SUBACK", flags, 0)?;
            suback::read(body).map(Packet::Suback)
        }
        10 => {
            fixed::expect_qos1_flags("UNSUBSCRIBE", flags, relaxed)?;
            unsubscribe::read(body).map(Packet::Unsubscribe)
        }
        11 => {
            fixed::expect_flags("UNSUBACK", flags, 0)?;
            ack::read("UNSUBACK", body).map(Packet::Unsuback)
        }
        12 => empty("PINGREQ", flags, body).map(|_| Packet::Pingreq),
        13 => empty("PINGRESP", flags, body).map(|_| Packet::Pingresp),
        14 => empty("DISCONNECT", flags, body).map(|_| Packet::Disconnect),
        t => Err(DecodeError::ReservedPacketType(t)),
    }
}

fn empty(name: &'static str, flags: u8, body: &[u8]) -> Result<(), DecodeError> {
    fixed::expect_flags(name, flags, 0)?;
    if !body.is_empty() {
        return Err(DecodeError::TrailingBytes(name, body.len()));
    }
    Ok(())
}

/// Appends the encoding of `packet` to `out`.
pub fn encode(packet: &Packet, out: &mut BytesMut) {
    match packet {
        Packet::Connect(c) => connect::write(c, out),
        Packet::Connack(c) => connack::write(c, out),
        Packet::Publish(p) => publish::write(p, out),
        Packet::Puback(id) => ack::write(0x40, *id, out),
        Packet::Pubrec(id) => ack::write(0x50, *id, out),
        Packet::Pubrel(id) => ack::write(0x62, *id, out),
        Packet::Pubcomp(id) => ack::write(0x70, *id, out),
        Packet::Subscribe(s) => subscribe::write(s, out),
        Packet::Suback(s) => suback::write(s, out),
        Packet::Unsubscribe(u) => unsubscribe::write(u, out),
        Packet::Unsuback(id) => ack::write(0xB0, *id, out),
        Packet::Pingreq => out.extend_from_slice(&[0xC0, 0]),
        Packet::Pingresp => out.extend_from_slice(&[0xD0, 0]),
        Packet::Disconnect => out.extend_from_slice(&[0xE0, 0]),
    }
}

/// Encodes `packet` into a new buffer.
pub fn encode_to_bytes(packet: &Packet) -> Bytes {
    let mut out = BytesMut::new();
    encode(packet, &mut out);
    out.freeze()
}

#[cfg(test)]
mod tests;
