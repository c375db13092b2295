//! `ShardMsg`: everything one shard tells another. Plain data that crosses threads in batches
//! over one ordered channel per pair of shards, so messages between two shards keep their order.

use super::message::SharedMessage;
use super::session::Session;
use shardmq_protocol::bytestr::ByteStr;
use shardmq_protocol::mqtt::QoS;

/// A slot of one shard's slab, named with its generation so that a reused slot is never
/// mistaken for the old one. The one id type of slots: a connection's id
/// ([`crate::engine::ConnId`]), the slot named to another shard (in a [`Ticket`]), and the
/// token a parked socket is filed under ([`SlotId::token`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotId {
    /// Slot index.
    pub idx: u32,
    /// Slot generation.
    pub gen: u32,
}

impl SlotId {
    /// The id as one integer (index in the high half).
    pub fn token(self) -> u64 {
        (u64::from(self.idx) << 32) | u64::from(self.gen)
    }

    /// The id of a [`SlotId::token`].
    pub fn from_token(token: u64) -> Self {
        SlotId {
            idx: (token >> 32) as u32,
            gen: token as u32,
        }
    }
}

/// A connection or session slot on a given shard, named across shards (12 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    shard: u32,
    /// The slot on that shard.
    pub slot: SlotId,
}

impl Ticket {
    /// Slot `slot` of shard `shard`.
    pub fn new(shard: usize, slot: SlotId) -> Self {
        Ticket {
            shard: shard as u32,
            slot,
        }
    }

    /// The shard that holds the connection or session.
    pub fn shard(self) -> usize {
        self.shard as usize
    }
}

/// A message between shards: 16 bytes, so that a batch of deliveries is a compact array.
/// What every message carries inline is at most a pointer or a ticket; the rare kinds
/// ([`Control`]) are boxed.
#[derive(Debug)]
pub enum ShardMsg {
    /// Match against the receiver's local subscriptions and deliver.
    Deliver(SharedMessage),
    /// The receiver's route delta `seq` (and every earlier one) is applied.
    RouteAck {
        /// Sequence number.
        seq: u64,
    },
    /// The retained message published on `conn` is stored: its PUBACK/PUBREC may go out.
    RetainedStored {
        /// The publishing connection.
        conn: Ticket,
    },
    /// Everything else, boxed.
    Control(Box<Control>),
}

impl From<Control> for ShardMsg {
    fn from(c: Control) -> Self {
        ShardMsg::Control(Box::new(c))
    }
}

/// The rarer messages between shards: routes, the client-id registry, handovers, retained
/// stores and queries.
#[derive(Debug)]
pub enum Control {
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
        /// The session moving, if the old one is kept; the sender then forwards deliveries
        /// that still reach it until released.
        session: Option<Box<Session>>,
    },
    /// Owner → connecting shard: the client id is banned; refuse the CONNECT at `ticket`.
    Banned {
        /// The connecting connection.
        ticket: Ticket,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_between_shards_is_two_words() {
        assert_eq!(std::mem::size_of::<ShardMsg>(), 16);
        assert_eq!(std::mem::size_of::<Ticket>(), 12);
    }

    #[test]
    fn slot_ids_round_trip_through_tokens() {
        for (idx, gen) in [(0, 0), (1, 2), (u32::MAX, 7), (3, u32::MAX)] {
            let id = SlotId { idx, gen };
            assert_eq!(SlotId::from_token(id.token()), id);
        }
        assert_ne!(
            SlotId { idx: 1, gen: 2 }.token(),
            SlotId { idx: 2, gen: 1 }.token()
        );
    }
}
