//! CONNACK: session-present flag and return code.

use super::error::DecodeError;
use super::fixed::Reader;
use bytes::{BufMut, BytesMut};

/// The CONNACK return codes shared by 3.1 and 3.1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnectReturnCode {
    /// 0x00 Connection accepted.
    Accepted = 0,
    /// 0x01 Unacceptable protocol version.
    UnacceptableProtocolVersion = 1,
    /// 0x02 Identifier rejected.
    IdentifierRejected = 2,
    /// 0x03 Server unavailable.
    ServerUnavailable = 3,
    /// 0x04 Bad user name or password.
    BadUsernameOrPassword = 4,
    /// 0x05 Not authorized.
    NotAuthorized = 5,
}

/// A CONNACK packet. Under 3.1 the session-present bit does not exist and must be false.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connack {
    /// Session present (3.1.1 only).
    pub session_present: bool,
    /// Return code.
    pub code: ConnectReturnCode,
}

/// Reads a CONNACK body.
pub fn read(body: &[u8]) -> Result<Connack, DecodeError> {
    let mut r = Reader::new("CONNACK", body);
    let ack_flags = r.u8()?;
    if ack_flags & 0xFE != 0 {
        return Err(DecodeError::InvalidConnack(ack_flags));
    }
    let code = r.u8()?;
    r.finish()?;
    let code = match code {
        0 => ConnectReturnCode::Accepted,
        1 => ConnectReturnCode::UnacceptableProtocolVersion,
        2 => ConnectReturnCode::IdentifierRejected,
        3 => ConnectReturnCode::ServerUnavailable,
        4 => ConnectReturnCode::BadUsernameOrPassword,
        5 => ConnectReturnCode::NotAuthorized,
        other => return Err(DecodeError::InvalidConnack(other)),
    };
    Ok(Connack {
        session_present: ack_flags == 1,
        code,
    })
}

/// Writes a CONNACK packet.
pub fn write(c: &Connack, out: &mut BytesMut) {
    out.reserve(4);
    out.put_u8(0x20);
    out.put_u8(2);
    out.put_u8(c.session_present as u8);
    out.put_u8(c.code as u8);
}
