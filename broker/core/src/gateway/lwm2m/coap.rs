//! CoAP (RFC 7252) messages as the LwM2M gateway uses them, on coap-lite's `Packet`: checks
//! coap-lite leaves to its user, and the few messages the gateway builds (requests, responses,
//! empty ACK and RST), with codes as their `c.dd` numbers and names.

use shardmq_protocol::lwm2m::coap_lite::{CoapOption, MessageClass, MessageType, Packet};

/// A code's class and detail in one byte (`2.05` is `0x45`).
pub type Code = u8;

/// Codes the gateway uses.
pub mod code {
    use super::Code;
    /// GET.
    pub const GET: Code = 0x01;
    /// POST.
    pub const POST: Code = 0x02;
    /// PUT.
    pub const PUT: Code = 0x03;
    /// DELETE.
    pub const DELETE: Code = 0x04;
    /// 2.01 Created.
    pub const CREATED: Code = 0x41;
    /// 2.02 Deleted.
    pub const DELETED: Code = 0x42;
    /// 2.04 Changed.
    pub const CHANGED: Code = 0x44;
    /// 2.05 Content.
    pub const CONTENT: Code = 0x45;
    /// 2.31 Continue.
    pub const CONTINUE: Code = 0x5F;
    /// 4.00 Bad Request.
    pub const BAD_REQUEST: Code = 0x80;
    /// 4.03 Forbidden.
    pub const FORBIDDEN: Code = 0x83;
    /// 4.04 Not Found.
    pub const NOT_FOUND: Code = 0x84;
    /// 4.05 Method Not Allowed.
    pub const METHOD_NOT_ALLOWED: Code = 0x85;
    /// 4.06 Not Acceptable.
    pub const NOT_ACCEPTABLE: Code = 0x86;
    /// 4.12 Precondition Failed.
    pub const PRECONDITION_FAILED: Code = 0x8C;
    /// 4.13 Request Entity Too Large.
    pub const TOO_LARGE: Code = 0x8D;
    /// 5.00 Internal Server Error.
    pub const INTERNAL_ERROR: Code = 0xA0;
    /// 5.03 Service Unavailable.
    pub const UNAVAILABLE: Code = 0xA3;
    /// 5.04 Gateway Timeout.
    pub const GATEWAY_TIMEOUT: Code = 0xA4;
}

/// `2.05`.
pub fn code_text(c: Code) -> String {
    format!("{}.{:02}", c >> 5, c & 0x1F)
}

/// The name MQTT applications see (`content`, `not_found`…).
pub fn code_name(c: Code) -> &'static str {
    match c {
        code::CREATED => "created",
        code::DELETED => "deleted",
        0x43 => "valid",
        code::CHANGED => "changed",
        code::CONTENT => "content",
        code::CONTINUE => "continue",
        code::BAD_REQUEST => "bad_request",
        0x81 => "unauthorized",
        0x82 => "bad_option",
        code::FORBIDDEN => "forbidden",
        code::NOT_FOUND => "not_found",
        code::METHOD_NOT_ALLOWED => "method_not_allowed",
        code::NOT_ACCEPTABLE => "not_acceptable",
        0x88 => "request_entity_incomplete",
        0x89 => "conflict",
        code::PRECONDITION_FAILED => "precondition_failed",
        code::TOO_LARGE => "request_entity_too_large",
        0x8F => "unsupported_content_format",
        code::INTERNAL_ERROR => "internal_server_error",
        0xA1 => "not_implemented",
        0xA2 => "bad_gateway",
        code::UNAVAILABLE => "service_unavailable",
        code::GATEWAY_TIMEOUT => "gateway_timeout",
        _ => "unknown",
    }
}

/// The message's code byte.
pub fn code_of(p: &Packet) -> Code {
    u8::from(p.header.code)
}

/// Reads a datagram, refusing what coap-lite lets through but RFC 7252 does not: a version
/// other than 1, an Empty message with a token, options or a payload, a token longer than 8
/// bytes, a payload marker with no payload.
pub fn parse(datagram: &[u8]) -> Result<Packet, String> {
    if datagram.len() < 4 {
        return Err("shorter than a CoAP header".into());
    }
    if datagram[0] >> 6 != 1 {
        return Err(format!("CoAP version {}", datagram[0] >> 6));
    }
    if marker_without_payload(datagram) {
        return Err("payload marker without a payload".into());
    }
    let p = Packet::from_bytes(datagram).map_err(|e| format!("{e:?}"))?;
    if p.get_token().len() > 8 {
        return Err("token longer than 8 bytes".into());
    }
    if p.header.code == MessageClass::Empty
        && (!p.get_token().is_empty() || p.options().len() > 0 || !p.payload.is_empty())
    {
        return Err("an Empty message with a token, options or a payload".into());
    }
    Ok(p)
}

/// Whether the options end in a payload marker with nothing after it (RFC 7252 §3: a
/// message format error), found by walking the options (a payload or option value may end in
/// 0xFF legitimately).
fn marker_without_payload(d: &[u8]) -> bool {
    let mut i = 4 + usize::from(d[0] & 0x0F);
    while i < d.len() {
        let b = d[i];
        if b == 0xFF {
            return i + 1 == d.len();
        }
        let ext = |nibble: u8| match nibble {
            13 => 1,
            14 => 2,
            _ => 0,
        };
        let (delta, len) = (b >> 4, b & 0x0F);
        if delta == 15 || len == 15 {
            // Malformed: coap-lite refuses it.
            return false;
        }
        let mut j = i + 1 + ext(delta);
        let value_len = match len {
            13 => d.get(j).map(|&x| usize::from(x) + 13),
            14 => d
                .get(j..j + 2)
                .map(|x| usize::from(u16::from_be_bytes([x[0], x[1]])) + 269),
            n => Some(usize::from(n)),
        };
        let Some(value_len) = value_len else {
            return false;
        };
        j += ext(len);
        i = j + value_len;
    }
    false
}

/// Encodes a message (the gateway's own: always valid).
pub fn encode(p: &Packet) -> Vec<u8> {
    p.to_bytes_with_limit(usize::MAX).unwrap_or_default()
}

/// The Uri-Path segments.
pub fn uri_path(p: &Packet) -> Vec<String> {
    p.get_option(CoapOption::UriPath)
        .map(|l| {
            l.iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The Uri-Query parameters, `key=value` split (a key alone has an empty value).
pub fn uri_query(p: &Packet) -> Vec<(String, String)> {
    p.get_option(CoapOption::UriQuery)
        .map(|l| {
            l.iter()
                .map(|q| {
                    let q = String::from_utf8_lossy(q);
                    match q.split_once('=') {
                        Some((k, v)) => (k.to_string(), v.to_string()),
                        None => (q.into_owned(), String::new()),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A uint option's value (big-endian, at most 4 bytes), `None` if absent or longer.
pub fn uint_option(p: &Packet, o: CoapOption) -> Option<u32> {
    let v = p.get_first_option(o)?;
    (v.len() <= 4).then(|| v.iter().fold(0u32, |n, &b| n << 8 | u32::from(b)))
}

/// A uint in the fewest bytes (0 in none).
pub fn uint_bytes(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|&&x| x == 0).count();
    b[skip..].to_vec()
}

/// The answer to request `req` (piggybacked on the ACK of a confirmable one), same token.
pub fn response(req: &Packet, code: Code) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(match req.header.get_type() {
        MessageType::Confirmable => MessageType::Acknowledgement,
        _ => MessageType::NonConfirmable,
    });
    p.header.message_id = req.header.message_id;
    p.header.code = MessageClass::from(code);
    p.set_token(req.get_token().to_vec());
    p
}

/// An empty ACK or RST for message `id`.
pub fn empty(kind: MessageType, id: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(kind);
    p.header.message_id = id;
    p.header.code = MessageClass::Empty;
    p
}

/// A confirmable request.
pub fn request(code: Code, id: u16, token: &[u8], path: &[String]) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.message_id = id;
    p.header.code = MessageClass::from(code);
    p.set_token(token.to_vec());
    for seg in path {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p
}

/// Sets a uint option (replacing any).
pub fn set_uint(p: &mut Packet, o: CoapOption, v: u32) {
    p.clear_option(o);
    p.add_option(o, uint_bytes(v));
}

/// A Block2 option's (number, more, size).
pub fn block2(p: &Packet) -> Option<(u32, bool, usize)> {
    block_option(p, CoapOption::Block2)
}

/// A block option's (number, more, size).
pub fn block_option(p: &Packet, o: CoapOption) -> Option<(u32, bool, usize)> {
    let v = uint_option(p, o)?;
    let szx = v & 7;
    (szx < 7).then(|| (v >> 4, v & 8 != 0, 16usize << szx))
}

/// The value of a block option for block `num` of `size` bytes (without the "more" bit).
pub fn block2_value(num: u32, size: usize) -> u32 {
    let szx = (size.max(16).trailing_zeros() - 4).min(6);
    num << 4 | szx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_as_lwm2m_names_them() {
        assert_eq!(code_text(code::CONTENT), "2.05");
        assert_eq!(code_text(code::NOT_ACCEPTABLE), "4.06");
        assert_eq!(code_name(code::CHANGED), "changed");
        assert_eq!(code_text(code::GATEWAY_TIMEOUT), "5.04");
    }

    #[test]
    fn parse_refuses_what_rfc_7252_refuses() {
        let mut ok = request(code::GET, 7, &[1, 2], &["3".into(), "0".into()]);
        ok.add_option(CoapOption::UriQuery, b"a=b".to_vec());
        let b = encode(&ok);
        let back = parse(&b).unwrap();
        assert_eq!(uri_path(&back), ["3", "0"]);
        assert_eq!(uri_query(&back), [("a".to_string(), "b".to_string())]);
        let mut v2 = b.clone();
        v2[0] = (v2[0] & 0x3F) | 0x80;
        assert!(parse(&v2).is_err(), "version 2");
        assert!(parse(&[0x40, 0, 0]).is_err(), "short");
        assert!(parse(&[0x41, 0x00, 0, 1, 9]).is_err(), "empty with a token");
        let mut marker = b.clone();
        marker.push(0xFF);
        assert!(parse(&marker).is_err(), "marker without payload");
        assert!(parse(&encode(&empty(MessageType::Reset, 3))).is_ok());
        // A payload, or an option value, that ends in 0xFF is no marker.
        let mut p = response(&request(code::GET, 1, &[9], &[]), code::CONTENT);
        p.payload = vec![0xC1, 0x09, 0xFF];
        assert_eq!(parse(&encode(&p)).unwrap().payload, vec![0xC1, 0x09, 0xFF]);
        let mut o = request(code::GET, 1, &[0xFF], &["a".into()]);
        o.add_option(CoapOption::UriQuery, vec![b'x', 0xFF]);
        assert!(parse(&encode(&o)).is_ok());
    }

    #[test]
    fn uints_and_blocks() {
        assert_eq!(uint_bytes(0), Vec::<u8>::new());
        assert_eq!(uint_bytes(300), vec![1, 44]);
        let mut p = response(&request(code::GET, 1, &[], &[]), code::CONTENT);
        set_uint(&mut p, CoapOption::Block2, block2_value(3, 512) | 8);
        assert_eq!(block2(&p), Some((3, true, 512)));
        assert_eq!(block2_value(0, 1024), 6);
    }
}
