//! `ShardMsg`: everything one shard tells another. Plain data that crosses threads in batches
//! over one ordered channel per pair of shards, so messages between two shards keep their order.

use super::message::SharedMessage;
use super::session::Session;
use crate::protocol::bytestr::ByteStr;
use crate::protocol::mqtt::QoS;

/// A connection on a given shard, named across shards (slab index plus generation, so a reused
/// slot is never mistaken for the old one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// Shard that holds the connection or session.
    pub shard: usize,
    /// Slot index on that shard.
    pub idx: u32,
    /// Slot generation.
    pub gen: u32,
}

/// A message between shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// Match against the receiver's local subscriptions and deliver.
    Deliver(SharedMessage),
    /// The sender's first subscriber on `add` filters arrived and its last one on `remove`
    /// filters left. Answered with [`ShardMsg::RouteAck`] once applied. An empty delta is a
    /// barrier: its ack proves every earlier message from the receiver has arrived.
    Route {
        /// Sender's delta sequence number.
        seq: u64,
        /// Filters gained.
        add: Vec<ByteStr>,
        /// Filters lost.
        remove: Vec<ByteStr>,
    },
    /// The receiver's route delta `seq` (and every earlier one) is applied.
    RouteAck {
        /// Sequence number.
        seq: u64,
    },
    /// To the owner of `client_id`: a CONNECT for it arrived at `ticket`.
    Register {
        /// Client id.
        client_id: ByteStr,
        /// The connecting connection.
        ticket: Ticket,
        /// Clean session flag of the new CONNECT.
        clean: bool,
    },
    /// New holder → owner: the registration `epoch` is complete (for a session that moved:
    /// the old holder is done forwarding); the next waiting CONNECT for this client id may
    /// proceed.
    ConnectDone {
        /// Client id.
        client_id: ByteStr,
        /// Registration epoch.
        epoch: u64,
    },
    /// Owner → current holder: close the old connection and hand the session to `ticket`.
    Takeover {
        /// Client id.
        client_id: ByteStr,
        /// The connecting connection.
        ticket: Ticket,
        /// Registration epoch of the new holder.
        epoch: u64,
        /// Clean session flag of the new CONNECT.
        clean: bool,
    },
    /// To the connecting shard: the session (if one is kept) and the registration epoch.
    Handover {
        /// Client id.
        client_id: ByteStr,
        /// The connecting connection.
        ticket: Ticket,
        /// Registration epoch.
        epoch: u64,
        /// The session moving, if the old one is kept.
        session: Option<Box<Session>>,
        /// Whether the sender forwards deliveries that still reach it until released.
        forwarding: bool,
    },
    /// Holder → owner: the session is gone (if the registration is still `epoch`).
    Unregister {
        /// Client id.
        client_id: ByteStr,
        /// Registration epoch the holder had.
        epoch: u64,
    },
    /// A delivery for a session that moved: the old holder passes it on. Delivered only to
    /// the session that arrived with the move `epoch`.
    Forward {
        /// Client id.
        client_id: ByteStr,
        /// Registration epoch of the move.
        epoch: u64,
        /// The message.
        msg: SharedMessage,
        /// Delivery QoS computed by the forwarder.
        qos: QoS,
        /// Retain flag of the delivery (set for a retained message answering a subscription).
        retain: bool,
    },
    /// New holder → old holder: every shard now routes to the new holder; stop forwarding
    /// for the move `epoch` once nothing sent before can still arrive.
    ReleaseForward {
        /// Client id.
        client_id: ByteStr,
        /// Registration epoch of the move.
        epoch: u64,
    },
    /// Old holder → new holder: nothing more will be forwarded for the move `epoch`.
    ForwardDone {
        /// Client id.
        client_id: ByteStr,
        /// Registration epoch of the move.
        epoch: u64,
    },
    /// Store as the retained message of its topic (sent to the topic's owner shard), then
    /// answer [`ShardMsg::RetainedStored`] to `ack` if given.
    RetainedSet {
        /// The message.
        msg: SharedMessage,
        /// The publishing connection, whose acknowledgements wait for the store.
        ack: Option<Ticket>,
    },
    /// The retained message published on `conn` is stored: its PUBACK/PUBREC may go out.
    RetainedStored {
        /// The publishing connection.
        conn: Ticket,
    },
    /// Retained messages matching `filters` (with their granted QoS), for new subscriptions of
    /// `session`: one query per SUBSCRIBE and shard, whatever the number of filters.
    RetainedQuery {
        /// The subscribing session.
        session: Ticket,
        /// Filters subscribed, with the QoS granted.
        filters: Vec<(ByteStr, QoS)>,
    },
    /// The answer to a [`ShardMsg::RetainedQuery`].
    RetainedReply {
        /// The subscribing session.
        session: Ticket,
        /// Matching messages, each with the QoS to deliver it at.
        msgs: Vec<(SharedMessage, QoS)>,
    },
}

impl ShardMsg {
    /// Whether the overload policy may drop it (only QoS 0 deliveries).
    pub fn droppable(&self) -> bool {
        matches!(self, ShardMsg::Deliver(m) if m.qos == QoS::AtMostOnce)
    }
}
