//! Decode errors. Each variant names the rule of the MQTT 3.1.1 specification it enforces, so a
//! log line tells an operator exactly what the client did wrong.

use thiserror::Error;

/// Why a byte stream is not a valid MQTT packet. Every one of these closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Packet type 0 or 15.
    #[error("[MQTT-2.2.1] reserved control packet type {0}")]
    ReservedPacketType(u8),
    /// Fixed-header flags differ from the value the packet type requires.
    #[error("[MQTT-2.2.2-2] invalid fixed header flags {flags:#06b} for {packet}")]
    InvalidHeaderFlags {
        /// Packet type name.
        packet: &'static str,
        /// The four flag bits received.
        flags: u8,
    },
    /// The remaining-length field uses more than four bytes.
    #[error("[MQTT-2.2.3] remaining length field longer than four bytes")]
    RemainingLengthTooLong,
    /// The first packet of a connection is not CONNECT.
    #[error("[MQTT-3.1.0-1] the first packet must be CONNECT, not packet type {0}")]
    NotConnect(u8),
    /// The packet is larger than `mqtt.max_packet_size`; detected before buffering it.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge {
        /// Declared size of the whole packet.
        size: usize,
        /// Configured limit.
        max: usize,
    },
    /// The variable header or payload ended before a field was complete.
    #[error("[MQTT-2.2.3] {0} truncated: remaining length shorter than its contents")]
    Truncated(&'static str),
    /// Bytes left over after the last field of a packet.
    #[error("[MQTT-2.2.3] {0} has {1} unexpected trailing bytes")]
    TrailingBytes(&'static str, usize),
    /// A string is not well-formed UTF-8.
    #[error("[MQTT-1.5.3-1] {0} is not well-formed UTF-8")]
    InvalidUtf8(&'static str),
    /// A string contains U+0000.
    #[error("[MQTT-1.5.3-2] {0} contains the null character U+0000")]
    NullCharacter(&'static str),
    /// A packet identifier of zero where one is required.
    #[error("[MQTT-2.3.1-1] {0} carries packet identifier 0")]
    ZeroPacketId(&'static str),
    /// CONNECT with a protocol name other than "MQTT" or "MQIsdp".
    #[error("[MQTT-3.1.2-1] unknown protocol name {0:?}")]
    InvalidProtocolName(String),
    /// CONNECT with a known protocol name but a level the broker does not speak; the broker
    /// answers CONNACK 0x01 before closing.
    #[error("[MQTT-3.1.2-2] unsupported protocol level {level} for protocol name {name:?}")]
    UnsupportedProtocolLevel {
        /// Protocol name sent by the client.
        name: String,
        /// Protocol level sent by the client.
        level: u8,
    },
    /// CONNECT flags bit 0 is set.
    #[error("[MQTT-3.1.2-3] CONNECT reserved flag is set")]
    ConnectReservedFlag,
    /// Will QoS or will retain set without the will flag.
    #[error("[MQTT-3.1.2-13] will QoS or will retain set while the will flag is 0")]
    WillFlagsWithoutWill,
    /// Will QoS of 3.
    #[error("[MQTT-3.1.2-14] will QoS 3 is invalid")]
    InvalidWillQos,
    /// Password flag set without the user name flag.
    #[error("[MQTT-3.1.2-22] password flag set while the user name flag is 0")]
    PasswordWithoutUsername,
    /// PUBLISH with QoS 3.
    #[error("[MQTT-3.3.1-4] PUBLISH with QoS 3")]
    InvalidPublishQos,
    /// PUBLISH with QoS 0 and DUP set.
    #[error("[MQTT-3.3.1-2] PUBLISH with QoS 0 has the DUP flag set")]
    DupWithQos0,
    /// A topic name containing `+` or `#`.
    #[error("[MQTT-3.3.2-2] topic name {0:?} contains a wildcard character")]
    WildcardInTopicName(String),
    /// An empty topic name or filter.
    #[error("[MQTT-4.7.3-1] {0} is empty")]
    EmptyTopic(&'static str),
    /// `#` not alone in the last level of a filter.
    #[error("[MQTT-4.7.1-2] topic filter {0:?} uses '#' outside the last level")]
    InvalidMultiLevelWildcard(String),
    /// `+` not alone in its level.
    #[error("[MQTT-4.7.1-3] topic filter {0:?} uses '+' inside a level")]
    InvalidSingleLevelWildcard(String),
    /// SUBSCRIBE without any topic filter.
    #[error("[MQTT-3.8.3-3] SUBSCRIBE carries no topic filter")]
    EmptySubscribe,
    /// UNSUBSCRIBE without any topic filter.
    #[error("[MQTT-3.10.3-2] UNSUBSCRIBE carries no topic filter")]
    EmptyUnsubscribe,
    /// Requested QoS byte with reserved bits or QoS 3.
    #[error("[MQTT-3.8.3-4] SUBSCRIBE requested QoS byte {0:#04x} is invalid")]
    InvalidRequestedQos(u8),
    /// CONNACK with reserved acknowledge flags or an unknown return code.
    #[error("[MQTT-3.2.2-1] CONNACK byte {0:#04x} is invalid")]
    InvalidConnack(u8),
    /// SUBACK with a return code other than 0, 1, 2 or 0x80.
    #[error("[MQTT-3.9.3-2] SUBACK return code {0:#04x} is invalid")]
    InvalidSubackCode(u8),
}

impl DecodeError {
    /// A short stable name for counters and logs (`malformed.<kind>`).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::PacketTooLarge { .. } => "packet_too_large",
            DecodeError::UnsupportedProtocolLevel { .. } => "unsupported_protocol_level",
            DecodeError::InvalidProtocolName(_) => "invalid_protocol_name",
            _ => "malformed_packet",
        }
    }
}
