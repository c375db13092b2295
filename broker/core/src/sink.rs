//! The delivery seam: what a connection's outgoing packets become.
//!
//! Every connection has a [`Sink`], chosen when the connection is opened. Sessions and the
//! engine write into it through the same calls, whatever it is:
//!
//! - [`Sink::Mqtt`] encodes each packet straight into the connection's outbox, which the
//!   driver writes to the transport as it is (the hot path: no copy or allocation besides the
//!   encoding itself);
//! - [`Sink::Packets`] keeps typed packets (a delivery is a `Publish` with its topic, payload,
//!   QoS, retain and dup flags and packet id; its acknowledgements are `Pubrel`, `Puback`…,
//!   and replies are `Connack`, `Suback`…) for a gateway, whose state machine turns them into
//!   its own frames and feeds the answers back as packets.
//!
//! Both count what they hold in bytes (the MQTT encoding's length), so the write-buffer limits
//! of a connection and of a shard apply to gateway clients alike.

use crate::message::Message;
use bytes::BytesMut;
use shardmq_protocol::mqtt::{self, Packet, Publish, QoS};
use std::collections::VecDeque;

/// Where a connection's outgoing packets go.
#[derive(Debug)]
pub enum Sink {
    /// MQTT bytes for the transport.
    Mqtt(BytesMut),
    /// Typed packets for a gateway.
    Packets(Box<PacketQueue>),
}

/// Typed packets waiting for a gateway, with the bytes they count for.
#[derive(Debug, Default)]
pub struct PacketQueue {
    packets: VecDeque<Packet>,
    bytes: usize,
}

/// The length a packet counts for: its MQTT encoding's, give or take the length bytes.
fn counted_len(p: &Packet) -> usize {
    match p {
        Packet::Publish(p) => 7 + p.topic.len() + p.payload.len(),
        Packet::Suback(s) => 4 + s.codes.len(),
        _ => 4,
    }
}

/// What a session writes into: a [`Sink`], or one of its two kinds directly. The hot path
/// (one delivery to one subscriber) looks at the kind of the sink once and writes through the
/// kind's own implementation, so an MQTT delivery costs what encoding into a `BytesMut` costs.
pub trait SinkWrite {
    /// Bytes waiting.
    fn len(&self) -> usize;

    /// Whether nothing waits.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes `p`; returns the bytes it counts for.
    fn put(&mut self, p: &Packet) -> usize;

    /// Writes a PUBLISH of `msg`.
    fn publish(&mut self, dup: bool, qos: QoS, retain: bool, msg: &Message, packet_id: u16);
}

impl SinkWrite for BytesMut {
    #[inline(always)]
    fn len(&self) -> usize {
        BytesMut::len(self)
    }

    fn put(&mut self, p: &Packet) -> usize {
        let before = BytesMut::len(self);
        mqtt::encode(p, self);
        BytesMut::len(self) - before
    }

    #[inline(always)]
    fn publish(&mut self, dup: bool, qos: QoS, retain: bool, msg: &Message, packet_id: u16) {
        mqtt::encode_publish(
            dup,
            qos,
            retain,
            msg.topic.as_bytes(),
            packet_id,
            &msg.payload,
            self,
        )
    }
}

impl SinkWrite for PacketQueue {
    fn len(&self) -> usize {
        self.bytes
    }

    fn put(&mut self, p: &Packet) -> usize {
        let n = counted_len(p);
        self.packets.push_back(p.clone());
        self.bytes += n;
        n
    }

    fn publish(&mut self, dup: bool, qos: QoS, retain: bool, msg: &Message, packet_id: u16) {
        let p = Packet::Publish(Publish {
            dup,
            qos,
            retain,
            topic: msg.topic.clone(),
            packet_id,
            payload: msg.payload.clone(),
        });
        self.bytes += counted_len(&p);
        self.packets.push_back(p);
    }
}

impl SinkWrite for Sink {
    #[inline]
    fn len(&self) -> usize {
        match self {
            Sink::Mqtt(b) => SinkWrite::len(b),
            Sink::Packets(q) => q.len(),
        }
    }

    fn put(&mut self, p: &Packet) -> usize {
        match self {
            Sink::Mqtt(b) => b.put(p),
            Sink::Packets(q) => q.put(p),
        }
    }

    fn publish(&mut self, dup: bool, qos: QoS, retain: bool, msg: &Message, packet_id: u16) {
        match self {
            Sink::Mqtt(b) => SinkWrite::publish(b, dup, qos, retain, msg, packet_id),
            Sink::Packets(q) => q.publish(dup, qos, retain, msg, packet_id),
        }
    }
}

impl Sink {
    /// An empty MQTT outbox (it allocates with its first packet).
    pub fn mqtt() -> Self {
        Sink::Mqtt(BytesMut::new())
    }

    /// An empty queue of typed packets.
    pub fn packets() -> Self {
        Sink::Packets(Box::default())
    }

    /// Drops everything waiting; returns the bytes it counted for.
    pub fn clear(&mut self) -> usize {
        let n = SinkWrite::len(self);
        match self {
            Sink::Mqtt(b) => *b = BytesMut::new(),
            Sink::Packets(q) => **q = PacketQueue::default(),
        }
        n
    }

    /// The MQTT outbox, for the driver to write (`None` for a gateway's sink).
    pub fn bytes_mut(&mut self) -> Option<&mut BytesMut> {
        match self {
            Sink::Mqtt(b) => Some(b),
            Sink::Packets(_) => None,
        }
    }

    /// Takes the typed packets waiting and the bytes they counted for (`None` for MQTT).
    pub fn take_packets(&mut self) -> Option<(VecDeque<Packet>, usize)> {
        match self {
            Sink::Mqtt(_) => None,
            Sink::Packets(q) => {
                let q = std::mem::take(&mut **q);
                Some((q.packets, q.bytes))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg() -> Message {
        Message {
            id: 1,
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::AtLeastOnce,
            retain: false,
        }
    }

    #[test]
    fn an_mqtt_sink_holds_the_encoding() {
        let mut s = Sink::mqtt();
        s.publish(false, QoS::AtLeastOnce, true, &msg(), 7);
        let n = s.put(&Packet::Pubrel(7));
        assert_eq!(n, 4);
        let mut expected = BytesMut::new();
        mqtt::encode_publish(
            false,
            QoS::AtLeastOnce,
            true,
            b"a/b",
            7,
            b"hello",
            &mut expected,
        );
        mqtt::encode(&Packet::Pubrel(7), &mut expected);
        assert_eq!(s.bytes_mut().map(|b| b.clone()), Some(expected.clone()));
        assert_eq!(s.len(), expected.len());
        assert!(s.take_packets().is_none());
        assert_eq!(s.clear(), expected.len());
        assert!(s.is_empty());
    }

    #[test]
    fn a_packet_sink_holds_typed_packets_and_counts_them() {
        let mut s = Sink::packets();
        s.publish(true, QoS::ExactlyOnce, false, &msg(), 9);
        s.put(&Packet::Pubrel(9));
        assert_eq!(s.len(), 7 + 3 + 5 + 4);
        assert!(s.bytes_mut().is_none());
        let (packets, bytes) = s.take_packets().expect("typed");
        assert_eq!(bytes, 19);
        assert_eq!(
            Vec::from(packets),
            vec![
                Packet::Publish(Publish {
                    dup: true,
                    qos: QoS::ExactlyOnce,
                    retain: false,
                    topic: "a/b".into(),
                    packet_id: 9,
                    payload: Bytes::from_static(b"hello"),
                }),
                Packet::Pubrel(9),
            ]
        );
        assert!(s.is_empty());
    }
}
