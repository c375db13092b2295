//! SUBSCRIBE: packet id and a non-empty list of (topic filter, requested QoS).

use super::error::DecodeError;
use super::fixed::{check_topic_filter, write_bytes, write_header, Reader};
use super::QoS;
use bytes::{BufMut, BytesMut};

/// A SUBSCRIBE packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// Topic filters with their requested QoS, in packet order.
    pub filters: Vec<(String, QoS)>,
}

/// Reads a SUBSCRIBE body.
pub fn read(body: &[u8]) -> Result<Subscribe, DecodeError> {
    let mut r = Reader::new("SUBSCRIBE", body);
    let packet_id = r.packet_id()?;
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.str("topic filter")?;
        check_topic_filter(filter)?;
        let q = r.u8()?;
        let qos = if q & 0xFC != 0 { None } else { QoS::from_u8(q) }
            .ok_or(DecodeError::InvalidRequestedQos(q))?;
        filters.push((filter.to_owned(), qos));
    }
    if filters.is_empty() {
        return Err(DecodeError::EmptySubscribe);
    }
    Ok(Subscribe { packet_id, filters })
}

/// Writes a SUBSCRIBE packet.
pub fn write(s: &Subscribe, out: &mut BytesMut) {
    let len = 2 + s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
    write_header(0x82, len, out);
    out.put_u16(s.packet_id);
    for (f, q) in &s.filters {
        write_bytes(f.as_bytes(), out);
        out.put_u8(*q as u8);
    }
}
