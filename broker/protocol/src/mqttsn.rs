//! MQTT-SN v1.2 messages (sans-IO): one message per UDP datagram.
//!
//! A message is a length — one byte, or `0x01` and a big-endian `u16` when the message is 256
//! bytes or longer, counting itself — a type byte and the type's fields. Flags pack DUP (bit 7),
//! QoS (bits 6–5: 0, 1, 2, and `0b11` for QoS −1), RETAIN (4), WILL (3), CLEANSESSION (2) and
//! the topic id type (bits 1–0: normal id, predefined id, short name). An encapsulated message
//! (type `0xFE`, from a forwarder) carries a radius, the wireless node id and the message.
//!
//! [`decode`] takes a whole datagram and refuses one whose length field does not match it, a
//! reserved type or topic id type, and fields cut short; [`encode`] writes the short length
//! form when it fits.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Return codes (REGACK, PUBACK, SUBACK, CONNACK, WILL…RESP).
pub mod rc {
    /// Accepted.
    pub const ACCEPTED: u8 = 0x00;
    /// Rejected: congestion.
    pub const CONGESTION: u8 = 0x01;
    /// Rejected: invalid topic id.
    pub const INVALID_TOPIC_ID: u8 = 0x02;
    /// Rejected: not supported.
    pub const NOT_SUPPORTED: u8 = 0x03;
}

/// QoS of PUBLISH, SUBSCRIBE, SUBACK and the will: 0, 1, 2, or −1 (publish without a
/// connection, to a predefined id or short name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    /// At most once.
    AtMostOnce,
    /// At least once.
    AtLeastOnce,
    /// Exactly once.
    ExactlyOnce,
    /// QoS −1 (`0b11` in the flags).
    MinusOne,
}

impl Qos {
    fn bits(self) -> u8 {
        match self {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
            Qos::MinusOne => 3,
        }
    }

    fn from_bits(b: u8) -> Qos {
        match b & 3 {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            2 => Qos::ExactlyOnce,
            _ => Qos::MinusOne,
        }
    }
}

/// How a PUBLISH, SUBSCRIBE or UNSUBSCRIBE names its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// A topic name (or filter), in SUBSCRIBE and UNSUBSCRIBE only.
    Name(String),
    /// A normal topic id (REGISTER/REGACK).
    Id(u16),
    /// A predefined topic id.
    Predefined(u16),
    /// A two-character short topic name.
    Short([u8; 2]),
}

impl Topic {
    fn id_type(&self) -> u8 {
        match self {
            Topic::Name(_) | Topic::Id(_) => 0,
            Topic::Predefined(_) => 1,
            Topic::Short(_) => 2,
        }
    }
}

/// A will's topic with its QoS and retain flag (WILLTOPIC, WILLTOPICUPD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillTopic {
    /// QoS of the will.
    pub qos: Qos,
    /// Whether the will is retained.
    pub retain: bool,
    /// The topic.
    pub topic: String,
}

/// One MQTT-SN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Gateway → all: it is there, and its next ADVERTISE is due in `duration` seconds.
    Advertise {
        /// Gateway id.
        gw_id: u8,
        /// Seconds to the next ADVERTISE.
        duration: u16,
    },
    /// Client → all: looking for a gateway within `radius` hops.
    SearchGw {
        /// Broadcast radius.
        radius: u8,
    },
    /// The answer to SEARCHGW.
    GwInfo {
        /// Gateway id.
        gw_id: u8,
        /// The gateway's address (only when a client answers for it).
        gw_add: Bytes,
    },
    /// Client → gateway: opens the session.
    Connect {
        /// The will dialogue follows (WILL flag).
        will: bool,
        /// Start afresh (CLEANSESSION flag).
        clean_session: bool,
        /// Protocol id (1).
        protocol_id: u8,
        /// Keepalive in seconds.
        duration: u16,
        /// Client id.
        client_id: String,
    },
    /// The answer to CONNECT.
    Connack {
        /// Return code.
        rc: u8,
    },
    /// Gateway → client: send the will topic.
    WillTopicReq,
    /// The will topic; `None` (an empty message) means no will.
    WillTopic(Option<WillTopic>),
    /// Gateway → client: send the will message.
    WillMsgReq,
    /// The will message.
    WillMsg(Bytes),
    /// Either way: the id a topic name gets.
    Register {
        /// The id (0 from a client: the gateway assigns it).
        topic_id: u16,
        /// Message id.
        msg_id: u16,
        /// The topic name.
        topic_name: String,
    },
    /// The answer to REGISTER.
    Regack {
        /// The id.
        topic_id: u16,
        /// Message id.
        msg_id: u16,
        /// Return code.
        rc: u8,
    },
    /// A message, either way.
    Publish {
        /// DUP.
        dup: bool,
        /// QoS.
        qos: Qos,
        /// RETAIN.
        retain: bool,
        /// Its topic (an id of some kind, or a short name; never a full name).
        topic: Topic,
        /// Message id (0 at QoS 0 and −1).
        msg_id: u16,
        /// The payload.
        data: Bytes,
    },
    /// QoS 1 acknowledgement, or a refusal (rc).
    Puback {
        /// The topic id of the PUBLISH.
        topic_id: u16,
        /// Message id.
        msg_id: u16,
        /// Return code.
        rc: u8,
    },
    /// QoS 2: received.
    Pubrec(u16),
    /// QoS 2: released.
    Pubrel(u16),
    /// QoS 2: complete.
    Pubcomp(u16),
    /// Client → gateway.
    Subscribe {
        /// DUP.
        dup: bool,
        /// The QoS asked for.
        qos: Qos,
        /// Message id.
        msg_id: u16,
        /// A name (wildcards allowed), a predefined id or a short name.
        topic: Topic,
    },
    /// The answer to SUBSCRIBE.
    Suback {
        /// The QoS granted.
        qos: Qos,
        /// The id of the subscribed name (0 for wildcards and short names).
        topic_id: u16,
        /// Message id.
        msg_id: u16,
        /// Return code.
        rc: u8,
    },
    /// Client → gateway.
    Unsubscribe {
        /// Message id.
        msg_id: u16,
        /// A name, a predefined id or a short name.
        topic: Topic,
    },
    /// The answer to UNSUBSCRIBE.
    Unsuback(u16),
    /// Keepalive; a sleeping client sends its client id to wake.
    Pingreq(Option<String>),
    /// The answer to PINGREQ.
    Pingresp,
    /// Either way; from a client, with a duration: going to sleep for that many seconds.
    Disconnect(Option<u16>),
    /// Client → gateway: a new will topic (`None`: no will).
    WillTopicUpd(Option<WillTopic>),
    /// The answer to WILLTOPICUPD.
    WillTopicResp(u8),
    /// Client → gateway: a new will message.
    WillMsgUpd(Bytes),
    /// The answer to WILLMSGUPD.
    WillMsgResp(u8),
    /// A message a forwarder relays, with the wireless node it came from.
    Encapsulated {
        /// Broadcast radius (bits 1–0 of the control byte).
        radius: u8,
        /// The wireless node's id.
        node_id: Bytes,
        /// The message.
        inner: Box<Message>,
    },
}

/// Every message type: its code and name.
const TYPES: [(u8, &str); 28] = [
    (0x00, "ADVERTISE"),
    (0x01, "SEARCHGW"),
    (0x02, "GWINFO"),
    (0x04, "CONNECT"),
    (0x05, "CONNACK"),
    (0x06, "WILLTOPICREQ"),
    (0x07, "WILLTOPIC"),
    (0x08, "WILLMSGREQ"),
    (0x09, "WILLMSG"),
    (0x0A, "REGISTER"),
    (0x0B, "REGACK"),
    (0x0C, "PUBLISH"),
    (0x0D, "PUBACK"),
    (0x0E, "PUBCOMP"),
    (0x0F, "PUBREC"),
    (0x10, "PUBREL"),
    (0x12, "SUBSCRIBE"),
    (0x13, "SUBACK"),
    (0x14, "UNSUBSCRIBE"),
    (0x15, "UNSUBACK"),
    (0x16, "PINGREQ"),
    (0x17, "PINGRESP"),
    (0x18, "DISCONNECT"),
    (0x1A, "WILLTOPICUPD"),
    (0x1B, "WILLTOPICRESP"),
    (0x1C, "WILLMSGUPD"),
    (0x1D, "WILLMSGRESP"),
    (0xFE, "ENCAPSULATED"),
];

/// The name of message type `kind`, if it is one.
fn type_name(kind: u8) -> Option<&'static str> {
    TYPES.iter().find(|(k, _)| *k == kind).map(|(_, n)| *n)
}

impl Message {
    /// The message's type code.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Advertise { .. } => 0x00,
            Message::SearchGw { .. } => 0x01,
            Message::GwInfo { .. } => 0x02,
            Message::Connect { .. } => 0x04,
            Message::Connack { .. } => 0x05,
            Message::WillTopicReq => 0x06,
            Message::WillTopic(_) => 0x07,
            Message::WillMsgReq => 0x08,
            Message::WillMsg(_) => 0x09,
            Message::Register { .. } => 0x0A,
            Message::Regack { .. } => 0x0B,
            Message::Publish { .. } => 0x0C,
            Message::Puback { .. } => 0x0D,
            Message::Pubcomp(_) => 0x0E,
            Message::Pubrec(_) => 0x0F,
            Message::Pubrel(_) => 0x10,
            Message::Subscribe { .. } => 0x12,
            Message::Suback { .. } => 0x13,
            Message::Unsubscribe { .. } => 0x14,
            Message::Unsuback(_) => 0x15,
            Message::Pingreq(_) => 0x16,
            Message::Pingresp => 0x17,
            Message::Disconnect(_) => 0x18,
            Message::WillTopicUpd(_) => 0x1A,
            Message::WillTopicResp(_) => 0x1B,
            Message::WillMsgUpd(_) => 0x1C,
            Message::WillMsgResp(_) => 0x1D,
            Message::Encapsulated { .. } => 0xFE,
        }
    }

    /// The message's name, for logs.
    pub fn name(&self) -> &'static str {
        type_name(self.kind()).unwrap_or("?")
    }
}

/// A datagram that is not an MQTT-SN v1.2 message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The length field disagrees with the datagram.
    #[error("length field {declared} but the datagram has {actual} bytes")]
    Length {
        /// What the length field says.
        declared: usize,
        /// The datagram's size.
        actual: usize,
    },
    /// A type the specification reserves.
    #[error("reserved message type 0x{0:02x}")]
    UnknownType(u8),
    /// A field missing, or bytes left over.
    #[error("malformed {0}: {1}")]
    Malformed(&'static str, &'static str),
    /// Topic id type `0b11` (reserved).
    #[error("{0}: reserved topic id type")]
    TopicIdType(&'static str),
}

/// Reads fields off a message body.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&v, rest) = self
            .b
            .split_first()
            .ok_or(DecodeError::Malformed(self.what, "cut short"))?;
        self.b = rest;
        Ok(v)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let hi = self.u8()?;
        let lo = self.u8()?;
        Ok(u16::from_be_bytes([hi, lo]))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }

    fn text(&mut self, why: &'static str) -> Result<String, DecodeError> {
        let what = self.what;
        String::from_utf8(self.rest().to_vec()).map_err(|_| DecodeError::Malformed(what, why))
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(self.what, "bytes left over"))
        }
    }
}

/// Decodes one datagram.
pub fn decode(datagram: &[u8]) -> Result<Message, DecodeError> {
    let (declared, header) = match datagram {
        [0x01, hi, lo, ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), 3),
        [len, ..] => (usize::from(*len), 1),
        [] => {
            return Err(DecodeError::Length {
                declared: 0,
                actual: 0,
            })
        }
    };
    let length = DecodeError::Length {
        declared,
        actual: datagram.len(),
    };
    let Some(&kind) = datagram.get(header).filter(|_| declared > header) else {
        return Err(length);
    };
    if kind == 0xFE {
        // The encapsulation's length covers its own header (length, type, control, node
        // id); the message it carries follows, with its own length, to the datagram's end.
        let what = "ENCAPSULATED";
        if declared < header + 2 || declared > datagram.len() {
            return Err(length);
        }
        let ctrl = datagram[header + 1];
        let inner = decode(&datagram[declared..])?;
        if matches!(inner, Message::Encapsulated { .. }) {
            return Err(DecodeError::Malformed(what, "nested encapsulation"));
        }
        return Ok(Message::Encapsulated {
            radius: ctrl & 3,
            node_id: Bytes::copy_from_slice(&datagram[header + 2..declared]),
            inner: Box::new(inner),
        });
    }
    if declared != datagram.len() {
        return Err(length);
    }
    decode_body(kind, &datagram[header + 1..])
}

fn will_topic(r: &mut Reader<'_>) -> Result<Option<WillTopic>, DecodeError> {
    if r.b.is_empty() {
        return Ok(None);
    }
    let flags = r.u8()?;
    Ok(Some(WillTopic {
        qos: Qos::from_bits(flags >> 5),
        retain: flags & 0x10 != 0,
        topic: r.text("will topic is not UTF-8")?,
    }))
}

/// The topic of a PUBLISH (ids or a short name) or of SUBSCRIBE/UNSUBSCRIBE (`by_name`: a
/// normal type means a name).
fn topic(r: &mut Reader<'_>, id_type: u8, by_name: bool) -> Result<Topic, DecodeError> {
    Ok(match id_type & 3 {
        0 if by_name => Topic::Name(r.text("topic name is not UTF-8")?),
        0 => Topic::Id(r.u16()?),
        1 => Topic::Predefined(r.u16()?),
        2 => Topic::Short([r.u8()?, r.u8()?]),
        _ => return Err(DecodeError::TopicIdType(r.what)),
    })
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Message, DecodeError> {
    let name = type_name(kind)
        .filter(|_| kind != 0xFE)
        .ok_or(DecodeError::UnknownType(kind))?;
    let mut r = Reader {
        b: body,
        what: name,
    };
    let m = match kind {
        0x00 => Message::Advertise {
            gw_id: r.u8()?,
            duration: r.u16()?,
        },
        0x01 => Message::SearchGw { radius: r.u8()? },
        0x02 => Message::GwInfo {
            gw_id: r.u8()?,
            gw_add: Bytes::copy_from_slice(r.rest()),
        },
        0x04 => {
            let flags = r.u8()?;
            let protocol_id = r.u8()?;
            let duration = r.u16()?;
            Message::Connect {
                will: flags & 0x08 != 0,
                clean_session: flags & 0x04 != 0,
                protocol_id,
                duration,
                client_id: r.text("client id is not UTF-8")?,
            }
        }
        0x05 => Message::Connack { rc: r.u8()? },
        0x06 => Message::WillTopicReq,
        0x07 => Message::WillTopic(will_topic(&mut r)?),
        0x08 => Message::WillMsgReq,
        0x09 => Message::WillMsg(Bytes::copy_from_slice(r.rest())),
        0x0A => Message::Register {
            topic_id: r.u16()?,
            msg_id: r.u16()?,
            topic_name: r.text("topic name is not UTF-8")?,
        },
        0x0B => Message::Regack {
            topic_id: r.u16()?,
            msg_id: r.u16()?,
            rc: r.u8()?,
        },
        0x0C => {
            let flags = r.u8()?;
            let topic = topic(&mut r, flags, false)?;
            Message::Publish {
                dup: flags & 0x80 != 0,
                qos: Qos::from_bits(flags >> 5),
                retain: flags & 0x10 != 0,
                topic,
                msg_id: r.u16()?,
                data: Bytes::copy_from_slice(r.rest()),
            }
        }
        0x0D => Message::Puback {
            topic_id: r.u16()?,
            msg_id: r.u16()?,
            rc: r.u8()?,
        },
        0x0E => Message::Pubcomp(r.u16()?),
        0x0F => Message::Pubrec(r.u16()?),
        0x10 => Message::Pubrel(r.u16()?),
        0x12 => {
            let flags = r.u8()?;
            let msg_id = r.u16()?;
            Message::Subscribe {
                dup: flags & 0x80 != 0,
                qos: Qos::from_bits(flags >> 5),
                msg_id,
                topic: topic(&mut r, flags, true)?,
            }
        }
        0x13 => {
            let flags = r.u8()?;
            Message::Suback {
                qos: Qos::from_bits(flags >> 5),
                topic_id: r.u16()?,
                msg_id: r.u16()?,
                rc: r.u8()?,
            }
        }
        0x14 => {
            let flags = r.u8()?;
            let msg_id = r.u16()?;
            Message::Unsubscribe {
                msg_id,
                topic: topic(&mut r, flags, true)?,
            }
        }
        0x15 => Message::Unsuback(r.u16()?),
        0x16 => {
            let id = r.text("client id is not UTF-8")?;
            Message::Pingreq((!id.is_empty()).then_some(id))
        }
        0x17 => Message::Pingresp,
        0x18 => Message::Disconnect(if r.b.is_empty() { None } else { Some(r.u16()?) }),
        0x1A => Message::WillTopicUpd(will_topic(&mut r)?),
        0x1B => Message::WillTopicResp(r.u8()?),
        0x1C => Message::WillMsgUpd(Bytes::copy_from_slice(r.rest())),
        _ => Message::WillMsgResp(r.u8()?),
    };
    r.end()?;
    Ok(m)
}

fn put_topic(body: &mut BytesMut, t: &Topic) {
    match t {
        Topic::Name(n) => body.put_slice(n.as_bytes()),
        Topic::Id(id) | Topic::Predefined(id) => body.put_u16(*id),
        Topic::Short(s) => body.put_slice(s),
    }
}

/// Appends `m` to `out` (the short length form when the message is under 256 bytes).
pub fn encode(m: &Message, out: &mut BytesMut) {
    let mut body = BytesMut::new();
    match m {
        Message::Advertise { gw_id, duration } => {
            body.put_u8(*gw_id);
            body.put_u16(*duration);
        }
        Message::SearchGw { radius } => body.put_u8(*radius),
        Message::GwInfo { gw_id, gw_add } => {
            body.put_u8(*gw_id);
            body.put_slice(gw_add);
        }
        Message::Connect {
            will,
            clean_session,
            protocol_id,
            duration,
            client_id,
        } => {
            body.put_u8(if *will { 0x08 } else { 0 } | if *clean_session { 0x04 } else { 0 });
            body.put_u8(*protocol_id);
            body.put_u16(*duration);
            body.put_slice(client_id.as_bytes());
        }
        Message::Connack { rc } | Message::WillTopicResp(rc) | Message::WillMsgResp(rc) => {
            body.put_u8(*rc)
        }
        Message::WillTopicReq | Message::WillMsgReq | Message::Pingresp => {}
        Message::WillTopic(w) | Message::WillTopicUpd(w) => {
            if let Some(w) = w {
                body.put_u8((w.qos.bits() << 5) | if w.retain { 0x10 } else { 0 });
                body.put_slice(w.topic.as_bytes());
            }
        }
        Message::WillMsg(m) | Message::WillMsgUpd(m) => body.put_slice(m),
        Message::Register {
            topic_id,
            msg_id,
            topic_name,
        } => {
            body.put_u16(*topic_id);
            body.put_u16(*msg_id);
            body.put_slice(topic_name.as_bytes());
        }
        Message::Regack {
            topic_id,
            msg_id,
            rc,
        }
        | Message::Puback {
            topic_id,
            msg_id,
            rc,
        } => {
            body.put_u16(*topic_id);
            body.put_u16(*msg_id);
            body.put_u8(*rc);
        }
        Message::Publish {
            dup,
            qos,
            retain,
            topic,
            msg_id,
            data,
        } => {
            body.put_u8(
                if *dup { 0x80 } else { 0 }
                    | (qos.bits() << 5)
                    | if *retain { 0x10 } else { 0 }
                    | topic.id_type(),
            );
            match topic {
                // A PUBLISH carries ids; a name has none to send.
                Topic::Name(_) => body.put_u16(0),
                t => put_topic(&mut body, t),
            }
            body.put_u16(*msg_id);
            body.put_slice(data);
        }
        Message::Pubcomp(id)
        | Message::Pubrec(id)
        | Message::Pubrel(id)
        | Message::Unsuback(id) => body.put_u16(*id),
        Message::Subscribe {
            dup,
            qos,
            msg_id,
            topic,
        } => {
            body.put_u8(if *dup { 0x80 } else { 0 } | (qos.bits() << 5) | topic.id_type());
            body.put_u16(*msg_id);
            put_topic(&mut body, topic);
        }
        Message::Suback {
            qos,
            topic_id,
            msg_id,
            rc,
        } => {
            body.put_u8(qos.bits() << 5);
            body.put_u16(*topic_id);
            body.put_u16(*msg_id);
            body.put_u8(*rc);
        }
        Message::Unsubscribe { msg_id, topic } => {
            body.put_u8(topic.id_type());
            body.put_u16(*msg_id);
            put_topic(&mut body, topic);
        }
        Message::Pingreq(id) => {
            if let Some(id) = id {
                body.put_slice(id.as_bytes());
            }
        }
        Message::Disconnect(d) => {
            if let Some(d) = d {
                body.put_u16(*d);
            }
        }
        Message::Encapsulated {
            radius,
            node_id,
            inner,
        } => {
            put_len(out, 3 + node_id.len());
            out.put_u8(0xFE);
            out.put_u8(radius & 3);
            out.put_slice(node_id);
            return encode(inner, out);
        }
    }
    put_len(out, 2 + body.len());
    out.put_u8(m.kind());
    out.put_slice(&body);
}

/// The length field for a message of `n` bytes after the length field of the short form.
fn put_len(out: &mut BytesMut, n: usize) {
    if n < 256 {
        out.put_u8(n as u8);
    } else {
        out.put_u8(0x01);
        out.put_u16((n + 2).min(usize::from(u16::MAX)) as u16);
    }
}

#[cfg(test)]
mod tests;
