//! CONNECT: protocol name/level, flags, keepalive, client id, will, credentials.

use super::error::DecodeError;
use super::fixed::{check_topic_name, write_bytes, write_header, Reader};
use super::{ByteStr, ProtocolLevel, QoS};
use bytes::{BufMut, Bytes, BytesMut};

/// A CONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level, from the name/level pair.
    pub level: ProtocolLevel,
    /// Client identifier (may be empty).
    pub client_id: String,
    /// Clean session flag.
    pub clean_session: bool,
    /// Keepalive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// Will message, if the will flag is set.
    pub will: Option<LastWill>,
    /// User name, if its flag is set.
    pub username: Option<String>,
    /// Password, if its flag is set.
    pub password: Option<Bytes>,
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LastWill {
    /// Topic the will is published on.
    pub topic: ByteStr,
    /// Will payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will retain flag.
    pub retain: bool,
}

const FLAG_USERNAME: u8 = 0x80;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_WILL_QOS: u8 = 0x18;
const FLAG_WILL: u8 = 0x04;
const FLAG_CLEAN: u8 = 0x02;
const FLAG_RESERVED: u8 = 0x01;

/// Reads a CONNECT body.
pub fn read(body: &[u8]) -> Result<Connect, DecodeError> {
    let mut r = Reader::new("CONNECT", body);
    let name = r.binary()?;
    let level_byte = r.u8()?;
    let level = match (name, level_byte) {
        (b"MQTT", 4) => ProtocolLevel::V311,
        (b"MQIsdp", 3) => ProtocolLevel::V31,
        (b"MQTT", _) | (b"MQIsdp", _) => {
            return Err(DecodeError::UnsupportedProtocolLevel {
                name: String::from_utf8_lossy(name).into_owned(),
                level: level_byte,
            })
        }
        _ => {
            return Err(DecodeError::InvalidProtocolName(
                String::from_utf8_lossy(name).into_owned(),
            ))
        }
    };
    let flags = r.u8()?;
    if flags & FLAG_RESERVED != 0 {
        return Err(DecodeError::ConnectReservedFlag);
    }
    let keep_alive = r.u16()?;
    let client_id = r.str("client identifier")?.to_owned();
    let will_qos_bits = (flags & FLAG_WILL_QOS) >> 3;
    let will = if flags & FLAG_WILL != 0 {
        let qos = QoS::from_u8(will_qos_bits).ok_or(DecodeError::InvalidWillQos)?;
        let topic = r.str("will topic")?;
        check_topic_name(topic)?;
        let topic = ByteStr::from(topic);
        let payload = Bytes::copy_from_slice(r.binary()?);
        Some(LastWill {
            topic,
            payload,
            qos,
            retain: flags & FLAG_WILL_RETAIN != 0,
        })
    } else {
        if will_qos_bits != 0 || flags & FLAG_WILL_RETAIN != 0 {
            return Err(DecodeError::WillFlagsWithoutWill);
        }
        None
    };
    if flags & FLAG_PASSWORD != 0 && flags & FLAG_USERNAME == 0 {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let username = if flags & FLAG_USERNAME != 0 {
        Some(r.str("user name")?.to_owned())
    } else {
        None
    };
    let password = if flags & FLAG_PASSWORD != 0 {
        Some(Bytes::copy_from_slice(r.binary()?))
    } else {
        None
    };
    r.finish()?;
    Ok(Connect {
        level,
        client_id,
        clean_session: flags & FLAG_CLEAN != 0,
        keep_alive,
        will,
        username,
        password,
    })
}

/// Writes a CONNECT packet.
pub fn write(c: &Connect, out: &mut BytesMut) {
    let name = c.level.name().as_bytes();
    let mut len = 2 + name.len() + 1 + 1 + 2 + 2 + c.client_id.len();
    let mut flags = 0u8;
    if c.clean_session {
        flags |= FLAG_CLEAN;
    }
    if let Some(w) = &c.will {
        flags |= FLAG_WILL | ((w.qos as u8) << 3);
        if w.retain {
            flags |= FLAG_WILL_RETAIN;
        }
        len += 2 + w.topic.len() + 2 + w.payload.len();
    }
    if let Some(u) = &c.username {
        flags |= FLAG_USERNAME;
        len += 2 + u.len();
    }
    if let Some(p) = &c.password {
        flags |= FLAG_PASSWORD;
        len += 2 + p.len();
    }
    write_header(0x10, len, out);
    write_bytes(name, out);
    out.put_u8(c.level.level());
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    write_bytes(c.client_id.as_bytes(), out);
    if let Some(w) = &c.will {
        write_bytes(w.topic.as_bytes(), out);
        write_bytes(&w.payload, out);
    }
    if let Some(u) = &c.username {
        write_bytes(u.as_bytes(), out);
    }
    if let Some(p) = &c.password {
        write_bytes(p, out);
    }
}
