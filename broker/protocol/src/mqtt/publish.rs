//! PUBLISH: flags in the fixed header, topic name, packet id for QoS > 0, payload.

use super::error::DecodeError;
use super::fixed::{check_topic_name, utf8, write_bytes, write_header, Reader};
use super::{ByteStr, QoS};
use bytes::{BufMut, Bytes, BytesMut};

/// A PUBLISH packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name (validated: non-empty, no wildcards).
    pub topic: ByteStr,
    /// Packet identifier; 0 for QoS 0.
    pub packet_id: u16,
    /// Application message.
    pub payload: Bytes,
}

/// Reads a PUBLISH body; `flags` are the low four bits of the fixed header.
pub fn read(flags: u8, body: &[u8]) -> Result<Publish, DecodeError> {
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::InvalidPublishQos)?;
    let retain = flags & 0x01 != 0;
    if qos == QoS::AtMostOnce && dup {
        return Err(DecodeError::DupWithQos0);
    }
    let mut r = Reader::new("PUBLISH", body);
    let topic_len = r.u16()? as usize;
    let topic_start = r.position();
    let topic = utf8(r.take(topic_len)?, "topic name")?;
    check_topic_name(topic)?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        r.packet_id()?
    };
    let payload_start = r.position();
    // Topic and payload get a buffer each. Slicing both out of one shared copy would save an
    // allocation but cost more: the first slice turns the copy into a reference-counted
    // buffer (a second allocation), and every slice and drop is then an atomic operation.
    // These two are never cloned on the way through the broker (the message is shared as a
    // whole), so each is freed with one plain `free`.
    // SAFETY: these are the bytes `utf8()` validated above, copied unchanged.
    let topic = unsafe {
        ByteStr::from_utf8_unchecked(Bytes::copy_from_slice(
            &body[topic_start..topic_start + topic_len],
        ))
    };
    let payload = Bytes::copy_from_slice(&body[payload_start..]);
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        payload,
    })
}

/// Writes a PUBLISH packet.
pub fn write(p: &Publish, out: &mut BytesMut) {
    write_parts(
        p.dup,
        p.qos,
        p.retain,
        p.topic.as_bytes(),
        p.packet_id,
        &p.payload,
        out,
    );
}

/// Writes a PUBLISH from its parts, so callers need not build a [`Publish`].
pub fn write_parts(
    dup: bool,
    qos: QoS,
    retain: bool,
    topic: &[u8],
    packet_id: u16,
    payload: &[u8],
    out: &mut BytesMut,
) {
    let id_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
    let len = 2 + topic.len() + id_len + payload.len();
    let first = 0x30 | ((dup as u8) << 3) | ((qos as u8) << 1) | retain as u8;
    write_header(first, len, out);
    write_bytes(topic, out);
    if qos != QoS::AtMostOnce {
        out.put_u16(packet_id);
    }
    out.put_slice(payload);
}
