//! The internal message: what a PUBLISH (or a will, or a gateway uplink) becomes inside the
//! broker, shared by every subscriber and shard it reaches.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shardmq_protocol::bytestr::ByteStr;
use shardmq_protocol::mqtt::QoS;
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
/// thousand subscribers on four shards is never copied. It holds only what deliveries read:
/// what a later protocol needs (MQTT 5 properties, the publisher for no-local) is added with
/// its first reader, and kept off the per-message path across cores (the origin shard is
/// already in the id; a publisher would be named by its slot there, not by a shared string
/// whose reference count every delivering core would write).
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
}

/// A message shared between subscribers, queues and shards.
pub type SharedMessage = Arc<Message>;
