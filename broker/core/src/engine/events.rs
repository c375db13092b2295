//! Client presence events: `$SYS/broker/clients/<clientid>/connected` when a CONNECT is
//! accepted and `/disconnected` when that connection ends, with a JSON body, not retained,
//! published at QoS 0 by the connection's shard (`sys.client_events`).
//!
//! In the topic the client id is one level: `/`, `+`, `#` and `%` in it are percent-encoded
//! (`%2F`, `%2B`, `%23`, `%25`), as a topic name may hold no wildcard and a level no `/`; the
//! body carries the client id as it is.

use super::*;
use serde::Serialize;

/// Why a connected client's connection ended (the `reason` of its `disconnected` event and
/// of its log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The client sent DISCONNECT.
    Normal,
    /// The client closed the connection, or it failed, without DISCONNECT.
    Closed,
    /// Nothing arrived within the keepalive allowance.
    KeepaliveTimeout,
    /// The client broke the protocol.
    ProtocolError,
    /// A packet did not decode.
    MalformedPacket,
    /// Another connection took over the client id.
    Takeover,
    /// The broker is stopping.
    Shutdown,
    /// An operator kicked the client out (admin API, `shardmq ctl clients kick`).
    Kicked,
    /// The access rules denied what it did (`auth.acl_deny_action = "disconnect"`, or a
    /// subscription denied to an MQTT 3.1 client).
    NotAuthorized,
    /// Too many deliveries waited for it (`mqtt.force_shutdown_policy`).
    ForceShutdown,
    /// An operator banned its client id, username or address.
    Banned,
}

impl EndReason {
    /// The reason as the event and the log write it.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Normal => "normal",
            EndReason::Closed => "closed",
            EndReason::KeepaliveTimeout => "keepalive_timeout",
            EndReason::ProtocolError => "protocol_error",
            EndReason::MalformedPacket => "malformed_packet",
            EndReason::Takeover => "takeover",
            EndReason::Shutdown => "shutdown",
            EndReason::Kicked => "kicked",
            EndReason::NotAuthorized => "not_authorized",
            EndReason::ForceShutdown => "force_shutdown",
            EndReason::Banned => "banned",
        }
    }
}

#[derive(Serialize)]
struct Event<'a> {
    clientid: &'a str,
    username: Option<&'a str>,
    ipaddress: String,
    port: u16,
    proto_name: &'static str,
    proto_ver: u8,
    keepalive: u32,
    clean_session: bool,
    shard: usize,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<EndReason>,
}

/// The client id as one topic level.
fn topic_level(client_id: &str) -> std::borrow::Cow<'_, str> {
    if !client_id.contains(['/', '+', '#', '%']) {
        return client_id.into();
    }
    let mut out = String::with_capacity(client_id.len() + 6);
    for ch in client_id.chars() {
        match ch {
            '/' => out.push_str("%2F"),
            '+' => out.push_str("%2B"),
            '#' => out.push_str("%23"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out.into()
}

impl Engine {
    /// Publishes the `connected` event of connection `id` (`reason: None`) or its
    /// `disconnected` one, if it is a connected client and events are on.
    /// The end is also logged, at info level, whether events are on or not.
    pub(super) fn client_event(&mut self, id: ConnId, reason: Option<EndReason>) {
        let Some(c) = self.conns.get(id.idx as usize).filter(|c| c.gen == id.gen) else {
            return;
        };
        if !matches!(c.phase, ConnPhase::Connected(_)) {
            return;
        }
        let client_id = client_of(&self.sessions, c);
        if let Some(reason) = reason {
            tracing::info!(client_id, peer = %c.peer, shard = self.cfg.shard, reason = reason.as_str(), "client disconnected");
        }
        if !self.cfg.client_events {
            return;
        }
        let (proto_name, proto_ver) = self.proto_of(c);
        let keepalive = self.keepalive_secs(c);
        let event = Event {
            clientid: client_id,
            username: c.about.as_deref().and_then(|a| a.username.as_deref()),
            ipaddress: c.peer.ip.to_string(),
            port: c.peer.port,
            proto_name,
            proto_ver,
            keepalive,
            clean_session: c.clean,
            shard: self.cfg.shard,
            ts: self.now.0,
            reason,
        };
        let Ok(body) = serde_json::to_vec(&event) else {
            return;
        };
        let what = if reason.is_some() {
            "disconnected"
        } else {
            "connected"
        };
        let topic = format!("$SYS/broker/clients/{}/{what}", topic_level(client_id));
        self.route_system(&topic, Bytes::from(body), false);
    }
}

#[cfg(test)]
mod tests {
    use super::topic_level;

    #[test]
    fn a_client_id_is_one_topic_level() {
        assert_eq!(topic_level("sensor-7"), "sensor-7");
        assert_eq!(topic_level("a/b+c#d%e"), "a%2Fb%2Bc%23d%25e");
    }
}
