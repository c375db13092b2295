//! The load generator's MQTT client side: packets it sends (built with the broker's codec) and a
//! light parser for what it receives (PUBLISH is read in place, without copying the payload).

use bytes::{Buf, BytesMut};
use shardmq_protocol::mqtt::fixed::FixedHeader;
use shardmq_protocol::mqtt::{
    self, Connect, DecodeOptions, Packet, ProtocolLevel, QoS, SubackCode, Subscribe,
};

/// What arrived from the broker, as much as the harness needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A PUBLISH: its QoS, packet id and payload header (publisher, sequence, send time).
    Publish {
        /// QoS.
        qos: QoS,
        /// Packet id (0 at QoS 0).
        packet_id: u16,
        /// The benchmark header, if the payload has one.
        header: Option<(u32, u32, u64)>,
    },
    /// CONNACK with its return code.
    Connack(u8),
    /// SUBACK: whether every filter was granted.
    Suback(bool),
    /// PUBACK.
    Puback(u16),
    /// PUBREC.
    Pubrec(u16),
    /// PUBREL.
    Pubrel(u16),
    /// PUBCOMP.
    Pubcomp(u16),
    /// PINGRESP.
    Pingresp,
    /// Anything else (the harness ignores it).
    Other,
}

/// Takes the next complete packet off `buf`.
pub fn next_incoming(buf: &mut BytesMut) -> Result<Option<Incoming>, String> {
    let Some(h) = FixedHeader::check(buf, usize::MAX).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let body = &buf[h.header_len..h.total_len()];
    let incoming = if h.first_byte >> 4 == 3 {
        let qos = QoS::from_u8((h.first_byte >> 1) & 3).ok_or("PUBLISH with QoS 3")?;
        let topic_len = body
            .get(..2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            .ok_or("truncated PUBLISH")?;
        let mut at = 2 + topic_len;
        let packet_id = if qos == QoS::AtMostOnce {
            0
        } else {
            let b = body.get(at..at + 2).ok_or("truncated PUBLISH")?;
            at += 2;
            u16::from_be_bytes([b[0], b[1]])
        };
        let header = body.get(at..).and_then(crate::stats::read_header);
        Incoming::Publish {
            qos,
            packet_id,
            header,
        }
    } else {
        let opts = DecodeOptions {
            max_packet_size: usize::MAX,
            level: ProtocolLevel::V311,
            expect_connect: false,
        };
        match mqtt::decode_slice(&buf[..h.total_len()], &opts).map_err(|e| e.to_string())? {
            Some((Packet::Connack(c), _)) => Incoming::Connack(c.code as u8),
            Some((Packet::Suback(s), _)) => {
                Incoming::Suback(s.codes.iter().all(|c| *c != SubackCode::Failure))
            }
            Some((Packet::Puback(id), _)) => Incoming::Puback(id),
            Some((Packet::Pubrec(id), _)) => Incoming::Pubrec(id),
            Some((Packet::Pubrel(id), _)) => Incoming::Pubrel(id),
            Some((Packet::Pubcomp(id), _)) => Incoming::Pubcomp(id),
            Some((Packet::Pingresp, _)) => Incoming::Pingresp,
            _ => Incoming::Other,
        }
    };
    buf.advance(h.total_len());
    Ok(Some(incoming))
}

/// A CONNECT (3.1.1, clean session) for `client_id`.
pub fn connect_packet(client_id: &str, keep_alive: u16) -> BytesMut {
    let mut b = BytesMut::new();
    mqtt::encode(
        &Packet::Connect(Box::new(Connect {
            level: ProtocolLevel::V311,
            client_id: client_id.into(),
            clean_session: true,
            keep_alive,
            will: None,
            username: None,
            password: None,
        })),
        &mut b,
    );
    b
}

/// A SUBSCRIBE for one filter.
pub fn subscribe_packet(filter: &str, qos: QoS) -> BytesMut {
    let mut b = BytesMut::new();
    mqtt::encode(
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(filter.into(), qos)],
        }),
        &mut b,
    );
    b
}

/// Appends an acknowledgement packet.
pub fn ack(packet: Packet, out: &mut BytesMut) {
    mqtt::encode(&packet, out);
}

/// The TCP gateway's frames for devices (`--tcpgw`): what arrives, read into the same
/// [`Incoming`] as MQTT (a DATATRANS is a QoS 0 publish of its payload).
pub fn next_device_incoming(buf: &mut BytesMut) -> Result<Option<Incoming>, String> {
    use shardmq_protocol::tcpgw::{decode, Frame};
    Ok(decode(buf, usize::from(u16::MAX))
        .map_err(|e| e.to_string())?
        .map(|f| match f {
            Frame::Connack { code, .. } => Incoming::Connack(code),
            Frame::Data(payload) => Incoming::Publish {
                qos: QoS::AtMostOnce,
                packet_id: 0,
                header: crate::stats::read_header(&payload),
            },
            Frame::Pong => Incoming::Pingresp,
            _ => Incoming::Other,
        }))
}

/// A device's CONNECT to the TCP gateway.
pub fn device_connect_frame(client_id: &str, keepalive: u16) -> BytesMut {
    let mut out = BytesMut::new();
    shardmq_protocol::tcpgw::encode(
        &shardmq_protocol::tcpgw::Frame::Connect {
            keepalive: keepalive.min(255) as u8,
            client_id: client_id.into(),
            username: None,
            password: None,
        },
        &mut out,
    );
    out
}

/// A device's DATATRANS carrying `payload`.
pub fn device_data_frame(payload: &[u8], out: &mut BytesMut) {
    use bytes::BufMut;
    out.put_u8(0x30);
    out.put_u16(payload.len().min(usize::from(u16::MAX)) as u16);
    out.put_slice(&payload[..payload.len().min(usize::from(u16::MAX))]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmq_protocol::mqtt::encode_publish;

    #[test]
    fn parses_publish_in_place_and_acks() {
        let mut payload = [0u8; 32];
        crate::stats::write_header(&mut payload, 3, 4, 5);
        let mut b = BytesMut::new();
        encode_publish(false, QoS::AtLeastOnce, false, b"t/1", 9, &payload, &mut b);
        ack(Packet::Pubcomp(7), &mut b);
        b.extend_from_slice(&[0x30]); // start of the next packet
        assert_eq!(
            next_incoming(&mut b).unwrap(),
            Some(Incoming::Publish {
                qos: QoS::AtLeastOnce,
                packet_id: 9,
                header: Some((3, 4, 5))
            })
        );
        assert_eq!(next_incoming(&mut b).unwrap(), Some(Incoming::Pubcomp(7)));
        assert_eq!(next_incoming(&mut b).unwrap(), None);
        assert_eq!(b.len(), 1);
    }
}
