//! What an operator asks of one shard: its part of the client, subscription and route
//! listings, one client's details, kicking a client out, publishing a message, and its part
//! of the banned list.
//!
//! A listing spans shards, and a shard may hold a million sessions, so each shard answers with
//! one page of its own part ([`Page`]): the entries from `skip` on, at most `take` of them, in
//! the order of its slots, and how many entries match in all. The admin layer asks the shards
//! in turn, carrying `skip` over from one to the next, so a page of the whole listing costs
//! one scan per shard and never more memory than the page.

use super::*;
use crate::ban::{Ban, BanKind};
use serde::Serialize;

/// Which clients a listing includes (all when every field is `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFilter {
    /// Client ids starting with this.
    pub clientid_prefix: Option<String>,
    /// Connected clients whose username starts with this.
    pub username_prefix: Option<String>,
    /// Only connected (`true`) or only disconnected, persistent (`false`) sessions.
    pub connected: Option<bool>,
}

/// Which subscriptions or routes a listing includes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionFilter {
    /// Of this client only.
    pub clientid: Option<String>,
    /// On this filter only (compared as written, not matched).
    pub topic: Option<String>,
}

/// Which part of a shard's listing to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Matching entries to pass over first.
    pub skip: usize,
    /// Entries to return at most.
    pub take: usize,
}

/// One shard's part of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page<T> {
    /// Entries matching the filter on this shard, in all.
    pub matched: usize,
    /// The entries of the window.
    pub items: Vec<T>,
}

impl<T> Page<T> {
    fn new() -> Self {
        Page {
            matched: 0,
            items: Vec::new(),
        }
    }

    /// Counts one more match and keeps it (built by `make`) if it falls in the window.
    fn offer(&mut self, w: Window, make: impl FnOnce() -> T) {
        if self.matched >= w.skip && self.items.len() < w.take {
            self.items.push(make());
        }
        self.matched += 1;
    }
}

/// A client as the admin API shows it: a session held by this shard and, when the client is
/// connected, its connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientInfo {
    /// Client id.
    pub clientid: String,
    /// Username of the connection (a disconnected session has none).
    pub username: Option<String>,
    /// Whether a connection is attached.
    pub connected: bool,
    /// The connection's peer address.
    pub ipaddress: Option<String>,
    /// The connection's peer port.
    pub port: Option<u16>,
    /// `MQTT` (3.1.1) or `MQIsdp` (3.1), when connected.
    pub proto_name: Option<&'static str>,
    /// 4 (3.1.1) or 3 (3.1), when connected.
    pub proto_ver: Option<u8>,
    /// Keepalive of the CONNECT in seconds, when connected.
    pub keepalive: Option<u32>,
    /// Clean session flag.
    pub clean_session: bool,
    /// The shard holding the session (and its connection).
    pub shard: usize,
    /// When the session was created (milliseconds since the Unix epoch).
    pub created_at: u64,
    /// When a disconnected session expires, if it does (milliseconds since the Unix epoch).
    pub expires_at: Option<u64>,
    /// Subscriptions.
    pub subscriptions_cnt: usize,
    /// Deliveries sent and not yet acknowledged.
    pub inflight_cnt: usize,
    /// Deliveries queued (no window room, or offline).
    pub mqueue_len: usize,
    /// Inbound QoS 2 messages waiting for PUBREL.
    pub awaiting_rel_cnt: usize,
}

/// One subscription of one client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionInfo {
    /// Client id.
    pub clientid: String,
    /// Topic filter.
    pub topic: String,
    /// Granted QoS.
    pub qos: u8,
    /// The shard holding the session.
    pub shard: usize,
}

/// A route: a filter some session of `shard` subscribes to (a message published on a
/// matching topic anywhere goes to that shard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteInfo {
    /// Topic filter.
    pub topic: String,
    /// The shard.
    pub shard: usize,
}

/// A client's details: [`ClientInfo`] and its subscriptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientDetail {
    /// The summary.
    #[serde(flatten)]
    pub info: ClientInfo,
    /// Its subscriptions, by filter.
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// Why a message could not be published for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Not a valid topic name.
    #[error("invalid topic name: {0}")]
    InvalidTopic(&'static str),
    /// `$SYS/` belongs to the broker.
    #[error("topics under $SYS/ are the broker's own")]
    SysTopic,
    /// Larger than `mqtt.max_packet_size` allows.
    #[error("payload of {0} bytes is larger than mqtt.max_packet_size allows")]
    TooLarge(usize),
}

/// Checks a topic name as MQTT does for PUBLISH: not empty, at most 65535 bytes, no wildcard
/// and no NUL.
pub fn check_topic_name(topic: &str) -> Result<(), PublishError> {
    if topic.is_empty() {
        return Err(PublishError::InvalidTopic("empty"));
    }
    if topic.len() > 65_535 {
        return Err(PublishError::InvalidTopic("longer than 65535 bytes"));
    }
    if topic.contains(['+', '#']) {
        return Err(PublishError::InvalidTopic("wildcards are for filters"));
    }
    if topic.contains('\0') {
        return Err(PublishError::InvalidTopic("holds a NUL character"));
    }
    Ok(())
}

fn starts_with(value: Option<&str>, prefix: &Option<String>) -> bool {
    match prefix {
        None => true,
        Some(p) => value.is_some_and(|v| v.starts_with(p.as_str())),
    }
}

impl Engine {
    /// The summary of the active session in slot `a`.
    fn client_info(&self, a: &ActiveSession) -> ClientInfo {
        let s = &a.session;
        let conn = a
            .conn
            .and_then(|id| self.conns.get(id.idx as usize).filter(|c| c.gen == id.gen))
            .filter(|c| matches!(c.phase, ConnPhase::Connected(_)));
        let (proto_name, proto_ver) = match conn.map(|c| self.proto_of(c)) {
            Some((name, ver)) => (Some(name), Some(ver)),
            None => (None, None),
        };
        ClientInfo {
            clientid: s.client_id.as_str().to_string(),
            username: conn
                .and_then(|c| c.about.as_deref())
                .and_then(|a| a.username.as_deref())
                .map(str::to_string),
            connected: conn.is_some(),
            ipaddress: conn.map(|c| c.peer.ip.to_string()),
            port: conn.map(|c| c.peer.port),
            proto_name,
            proto_ver,
            keepalive: conn.map(|c| self.keepalive_secs(c)),
            clean_session: s.clean_session,
            shard: self.cfg.shard,
            created_at: s.created_at.0,
            expires_at: (conn.is_none() && a.expires_at != Timestamp::NEVER)
                .then_some(a.expires_at.0),
            subscriptions_cnt: s.subscriptions.len(),
            inflight_cnt: s.inflight().len(),
            mqueue_len: s.queue().len(),
            awaiting_rel_cnt: s.awaiting_rel().len(),
        }
    }

    /// The keepalive a connection's CONNECT asked for, in seconds (the engine keeps the
    /// allowance: keepalive × multiplier, in milliseconds).
    pub(super) fn keepalive_secs(&self, c: &Conn) -> u32 {
        (f64::from(c.keepalive_ms) / (self.cfg.keepalive_multiplier * 1000.0)).round() as u32
    }

    fn active_sessions(&self) -> impl Iterator<Item = &ActiveSession> {
        self.sessions.iter().filter_map(|(_, slot)| match slot {
            SessionSlot::Active(a) => Some(a),
            SessionSlot::Forwarding(_) => None,
        })
    }

    /// This shard's part of the client listing.
    pub fn list_clients(&self, filter: &ClientFilter, window: Window) -> Page<ClientInfo> {
        let mut page = Page::new();
        for a in self.active_sessions() {
            if !starts_with(Some(a.session.client_id.as_str()), &filter.clientid_prefix) {
                continue;
            }
            let conn = a.conn.and_then(|id| {
                self.conns
                    .get(id.idx as usize)
                    .filter(|c| c.gen == id.gen && matches!(c.phase, ConnPhase::Connected(_)))
            });
            if filter.connected.is_some_and(|want| want != conn.is_some()) {
                continue;
            }
            if filter.username_prefix.is_some() {
                let username = conn
                    .and_then(|c| c.about.as_deref())
                    .and_then(|a| a.username.as_deref());
                if !starts_with(username, &filter.username_prefix) {
                    continue;
                }
            }
            page.offer(window, || self.client_info(a));
        }
        page
    }

    /// The client `client_id`, if this shard holds its session.
    pub fn client_detail(&self, client_id: &str) -> Option<ClientDetail> {
        let key = self.local_session(&ByteStr::from(client_id))?;
        let Some(SessionSlot::Active(a)) = self.sessions.get(key) else {
            return None;
        };
        Some(ClientDetail {
            info: self.client_info(a),
            subscriptions: a
                .session
                .subscriptions
                .iter()
                .map(|(topic, qos)| SubscriptionInfo {
                    clientid: client_id.to_string(),
                    topic: topic.clone(),
                    qos: *qos as u8,
                    shard: self.cfg.shard,
                })
                .collect(),
        })
    }

    /// This shard's part of the subscription listing.
    pub fn list_subscriptions(
        &self,
        filter: &SubscriptionFilter,
        window: Window,
    ) -> Page<SubscriptionInfo> {
        let mut page = Page::new();
        for a in self.active_sessions() {
            let client_id = a.session.client_id.as_str();
            if filter.clientid.as_deref().is_some_and(|c| c != client_id) {
                continue;
            }
            for (topic, qos) in &a.session.subscriptions {
                if filter.topic.as_ref().is_some_and(|t| t != topic) {
                    continue;
                }
                page.offer(window, || SubscriptionInfo {
                    clientid: client_id.to_string(),
                    topic: topic.clone(),
                    qos: *qos as u8,
                    shard: self.cfg.shard,
                });
            }
        }
        page
    }

    /// This shard's part of the route listing: the filters its sessions subscribe to.
    pub fn list_routes(&self, topic: Option<&str>, window: Window) -> Page<RouteInfo> {
        let mut page = Page::new();
        self.local.for_each(|filter, subs| {
            if subs.is_empty() || topic.is_some_and(|t| t != filter) {
                return;
            }
            page.offer(window, || RouteInfo {
                topic: filter.to_string(),
                shard: self.cfg.shard,
            });
        });
        page
    }

    /// Kicks the client `client_id` out, if this shard holds its session: its connection is
    /// closed (its will published, as for any connection lost without DISCONNECT; a
    /// `disconnected` event with reason `kicked`) and its session discarded, persistent or
    /// not. Returns whether this shard held it.
    pub fn kick(&mut self, client_id: &str, now: Timestamp) -> bool {
        self.now = now;
        let client_id = ByteStr::from(client_id);
        let Some(key) = self.local_session(&client_id) else {
            return false;
        };
        let conn = match self.sessions.get(key) {
            Some(SessionSlot::Active(a)) => a.conn,
            _ => return false,
        };
        self.metrics.clients_kicked += 1;
        debug!(
            client_id = client_id.as_str(),
            "client kicked by the operator"
        );
        if let Some(id) = conn {
            self.end_connection(id, true, EndReason::Kicked);
        }
        // A clean session went with its connection; a persistent one stays until now.
        if let Some(key) = self.local_session(&client_id) {
            self.discard_session(key, true);
        }
        self.drain_inbox();
        true
    }

    /// Adds a ban (see [`crate::ban`]): a client id ban is kept if this shard owns the client
    /// id, a username or address ban on every shard. Either way the connections of this shard
    /// that it matches are closed (their sessions stay, as a persistent one would after a
    /// lost connection). Returns how many were closed; an invalid address is refused.
    pub fn add_ban(&mut self, ban: Ban, now: Timestamp) -> Result<usize, String> {
        self.now = now;
        ban.validate()?;
        let net = match ban.kind {
            BanKind::PeerHost => Some(crate::acl::IpNet::parse(&ban.who)?),
            _ => None,
        };
        let matching: Vec<ConnId> = match ban.kind {
            BanKind::ClientId => {
                let client_id = ByteStr::from(ban.who.as_str());
                self.local_session(&client_id)
                    .and_then(|k| match self.sessions.get(k) {
                        Some(SessionSlot::Active(a)) => a.conn,
                        _ => None,
                    })
                    .into_iter()
                    .collect()
            }
            BanKind::Username | BanKind::PeerHost => self
                .conns
                .iter()
                .filter(|(_, c)| !c.close)
                .filter(|(_, c)| match net {
                    Some(net) => net.contains(c.peer.ip),
                    None => c
                        .about
                        .as_deref()
                        .and_then(|a| a.username.as_deref())
                        .is_some_and(|u| u == ban.who),
                })
                .map(|(idx, c)| ConnId {
                    idx: idx as u32,
                    gen: c.gen,
                })
                .collect(),
        };
        let keep =
            ban.kind != BanKind::ClientId || self.owner(ban.who.as_bytes()) == self.cfg.shard;
        if keep && ban.until > now {
            tracing::info!(kind = ban.kind.as_str(), who = %ban.who, by = %ban.by, until_ms = ban.until.0, "ban added");
            self.bans.purge(now);
            self.bans.add(ban)?;
        }
        for &id in &matching {
            self.end_connection(id, true, EndReason::Banned);
        }
        self.drain_inbox();
        Ok(matching.len())
    }

    /// Lifts a ban; whether this shard had it in force.
    pub fn remove_ban(&mut self, kind: BanKind, who: &str, now: Timestamp) -> bool {
        let found = self.bans.remove(kind, who, now);
        if found {
            tracing::info!(kind = kind.as_str(), who, "ban lifted");
        }
        found
    }

    /// The bans in force on this shard.
    pub fn list_bans(&self, now: Timestamp) -> Vec<Ban> {
        self.bans.list(now)
    }

    /// Publishes a message for the operator, routed and retained as a client's would be.
    /// QoS 1 and 2 messages wait, in order, for room in the cross-shard queues rather than be
    /// dropped.
    pub fn publish_admin(
        &mut self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        now: Timestamp,
    ) -> Result<(), PublishError> {
        check_topic_name(topic)?;
        if topic::is_sys(topic) {
            return Err(PublishError::SysTopic);
        }
        // The PUBLISH packet a subscriber gets must fit: fixed header, topic, packet id.
        if payload.len() + topic.len() + 2 + 2 + 5 > self.cfg.max_packet_size {
            return Err(PublishError::TooLarge(payload.len()));
        }
        self.now = now;
        self.metrics.admin_published += 1;
        let msg = self.new_message(topic.into(), payload, qos, retain);
        self.publish_broker_message(msg);
        self.drain_inbox();
        Ok(())
    }
}
