//! The internal message: what a PUBLISH (or a will, or a gateway uplink) becomes inside the
//! broker, shared by every subscriber and shard it reaches.

use super::time::Timestamp;
use crate::protocol::bytestr::ByteStr;
use crate::protocol::mqtt::QoS;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Broker-wide unique message id: the origin shard in the top 8 bits, a per-shard counter in
/// the rest. Used to drop duplicates while a session moves between shards.
pub type MessageId = u64;

/// Builds a message id from its parts.
pub fn message_id(shard: usize, seq: u64) -> MessageId {
    ((shard as u64) << 56) | (seq & ((1 << 56) - 1))
}

/// The origin shard and per-shard sequence number of a message id.
pub fn message_origin(id: MessageId) -> (usize, u64) {
    ((id >> 56) as usize, id & ((1 << 56) - 1))
}

/// An application message. Topic and payload are shared buffers: a message reaching a
/// thousand subscribers on four shards is never copied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique id (see [`MessageId`]).
    pub id: MessageId,
    /// Topic name.
    pub topic: ByteStr,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// Whether it was published with the retain flag.
    pub retain: bool,
    /// MQTT 5 properties; `None` for 3.1/3.1.1 publishers.
    pub properties: Option<Box<Properties>>,
    /// Client id of the publisher (empty for messages the broker makes itself).
    pub publisher: ByteStr,
    /// When the broker received it.
    pub timestamp: Timestamp,
}

/// A message shared between subscribers, queues and shards.
pub type SharedMessage = Arc<Message>;

/// MQTT 5 publish properties, carried through the broker untouched by 3.1.1 paths.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Properties {
    /// Payload format indicator (true = UTF-8).
    pub payload_format_utf8: bool,
    /// Message expiry interval in seconds.
    pub message_expiry_interval: Option<u32>,
    /// Content type.
    pub content_type: Option<String>,
    /// Response topic.
    pub response_topic: Option<String>,
    /// Correlation data.
    pub correlation_data: Option<Bytes>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}
