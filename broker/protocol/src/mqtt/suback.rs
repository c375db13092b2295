//! SUBACK: packet id and one return code per requested filter.

use super::error::DecodeError;
use super::fixed::{write_header, Reader};
use super::QoS;
use bytes::{BufMut, BytesMut};

/// One SUBACK return code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubackCode {
    /// Subscription accepted with this maximum QoS.
    Granted(QoS),
    /// 0x80 Failure (3.1.1 only; a 3.1 connection is closed instead).
    Failure,
}

/// A SUBACK packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suback {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: u16,
    /// Return codes, in the order of the SUBSCRIBE's filters.
    pub codes: Vec<SubackCode>,
}

/// Reads a SUBACK body.
pub fn read(body: &[u8]) -> Result<Suback, DecodeError> {
    let mut r = Reader::new("SUBACK", body);
    let packet_id = r.packet_id()?;
    let codes = r
        .rest()
        .iter()
        .map(|&c| match c {
            0x80 => Ok(SubackCode::Failure),
            c => QoS::from_u8(c)
                .map(SubackCode::Granted)
                .ok_or(DecodeError::InvalidSubackCode(c)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if codes.is_empty() {
        return Err(DecodeError::Truncated("SUBACK"));
    }
    Ok(Suback { packet_id, codes })
}

/// Writes a SUBACK packet.
pub fn write(s: &Suback, out: &mut BytesMut) {
    write_header(0x90, 2 + s.codes.len(), out);
    out.put_u16(s.packet_id);
    for c in &s.codes {
        out.put_u8(match c {
            SubackCode::Granted(q) => *q as u8,
            SubackCode::Failure => 0x80,
        });
    }
}
