//! PUBACK, PUBREC, PUBREL, PUBCOMP and UNSUBACK: a packet identifier and nothing else.

use super::error::DecodeError;
use super::fixed::Reader;
use bytes::{BufMut, BytesMut};

/// Reads the two-byte packet identifier that is the whole body.
pub fn read(packet: &'static str, body: &[u8]) -> Result<u16, DecodeError> {
    let mut r = Reader::new(packet, body);
    let id = r.packet_id()?;
    r.finish()?;
    Ok(id)
}

/// Writes `first_byte`, length 2 and the identifier.
pub fn write(first_byte: u8, packet_id: u16, out: &mut BytesMut) {
    out.reserve(4);
    out.put_u8(first_byte);
    out.put_u8(2);
    out.put_u16(packet_id);
}
