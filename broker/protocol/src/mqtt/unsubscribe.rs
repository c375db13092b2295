//! UNSUBSCRIBE: packet id and a non-empty list of topic filters.

use super::error::DecodeError;
use super::fixed::{check_topic_filter, write_bytes, write_header, Reader};
use bytes::{BufMut, BytesMut};

/// An UNSUBSCRIBE packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// Topic filters, in packet order.
    pub filters: Vec<String>,
}

/// Reads an UNSUBSCRIBE body.
pub fn read(body: &[u8]) -> Result<Unsubscribe, DecodeError> {
    let mut r = Reader::new("UNSUBSCRIBE", body);
    let packet_id = r.packet_id()?;
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.str("topic filter")?;
        check_topic_filter(filter)?;
        filters.push(filter.to_owned());
    }
    if filters.is_empty() {
        return Err(DecodeError::EmptyUnsubscribe);
    }
    Ok(Unsubscribe { packet_id, filters })
}

/// Writes an UNSUBSCRIBE packet.
pub fn write(u: &Unsubscribe, out: &mut BytesMut) {
    let len = 2 + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>();
    write_header(0xA2, len, out);
    out.put_u16(u.packet_id);
    for f in &u.filters {
        write_bytes(f.as_bytes(), out);
    }
}
