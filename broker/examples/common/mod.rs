//! What the examples share: connecting a client straight through the engine.

use shardmq::core::engine::{ConnId, Engine};
use shardmq::core::time::Timestamp;
use shardmq::protocol::mqtt::{Connect, Packet, ProtocolLevel};
use std::net::SocketAddr;

/// Opens a connection from `peer` and hands the engine a clean 3.1.1 CONNECT for
/// `client_id` (keepalive 60 s); its CONNACK waits in the outbox.
pub fn connect(engine: &mut Engine, peer: SocketAddr, client_id: String, now: Timestamp) -> ConnId {
    let id = engine.open_conn(peer, 0, now);
    let connect = Connect {
        level: ProtocolLevel::V311,
        client_id,
        clean_session: true,
        keep_alive: 60,
        will: None,
        username: None,
        password: None,
    };
    engine.handle_packet(id, Packet::Connect(Box::new(connect)), now);
    id
}
