//! The access rules ([`crate::acl`]) applied to a connection: a denied PUBLISH is
//! acknowledged and dropped (or its connection closed, with `acl_deny_disconnect`), a denied
//! subscription gets SUBACK 0x80 (an MQTT 3.1 client, which has no failure code, is
//! disconnected), and a CONNECT whose will could not be published is refused. Decisions are
//! cached per connection and forgotten when the rules change ([`Engine::set_acl`]).

use super::*;
use crate::acl::{Acl, Action, Permission, Who};

/// Decisions a connection remembers.
const ACL_CACHE: usize = 16;

impl Engine {
    /// Replaces the access rules (`None`: everything allowed); every cached decision is
    /// forgotten.
    pub fn set_acl(&mut self, acl: Option<Arc<Acl>>) {
        self.acl = acl;
        self.acl_gen = self.acl_gen.wrapping_add(1);
    }

    /// Whether connection `id`, attached to session `key`, may `action` on `topic`.
    pub(super) fn acl_allows(
        &mut self,
        id: ConnId,
        key: usize,
        action: Action,
        topic: &str,
    ) -> bool {
        // Disjoint fields: the rules and the session read, the connection written; nothing
        // cloned on the way to a cached decision.
        let Some(acl) = self.acl.as_deref() else {
            return true;
        };
        let Some(SessionSlot::Active(a)) = self.sessions.get(key) else {
            return false;
        };
        let client_id = &a.session.client_id;
        let gen = self.acl_gen;
        let Some(c) = conn_mut(&mut self.conns, id) else {
            return false;
        };
        if let Some(about) = c.about.as_deref().filter(|a| a.acl_gen == gen) {
            if let Some((_, _, allowed)) = about
                .acl_cache
                .iter()
                .find(|(a, t, _)| *a == action && &**t == topic)
            {
                return *allowed;
            }
        }
        let who = Who {
            client_id: client_id.as_str(),
            username: c.about.as_deref().and_then(|a| a.username.as_deref()),
            peer: c.peer.ip,
        };
        let allowed = acl.check(&who, action, topic) == Permission::Allow;
        let about = c.about_mut();
        if about.acl_gen != gen {
            about.acl_cache.clear();
            about.acl_gen = gen;
        }
        if about.acl_cache.len() >= ACL_CACHE {
            about.acl_cache.remove(0);
        }
        about.acl_cache.push((action, topic.into(), allowed));
        allowed
    }

    /// Whether a CONNECT's will may be published by this client.
    pub(super) fn will_allowed(
        &self,
        client_id: &str,
        username: Option<&str>,
        peer: IpAddr,
        topic: &str,
    ) -> bool {
        self.acl.as_ref().is_none_or(|acl| {
            let who = Who {
                client_id,
                username,
                peer,
            };
            acl.check(&who, Action::Publish, topic) == Permission::Allow
        })
    }

    /// A PUBLISH the rules deny: dropped and counted; acknowledged (so the client does not
    /// resend it forever), or its connection closed with `acl_deny_disconnect`.
    pub(super) fn deny_publish(&mut self, id: ConnId, p: &Publish) {
        self.metrics.acl_denied_publish += 1;
        if let Some(c) = conn_mut(&mut self.conns, id) {
            debug!(peer = %c.peer, client_id = client_of(&self.sessions, c), topic = &*p.topic, "PUBLISH denied by the access rules");
        }
        if self.cfg.acl_deny_disconnect {
            return self.end_connection(id, true, EndReason::NotAuthorized);
        }
        self.ack_dropped(id, p);
    }

    /// Acknowledges a PUBLISH that is not routed.
    pub(super) fn ack_dropped(&mut self, id: ConnId, p: &Publish) {
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.reply(id, &Packet::Puback(p.packet_id)),
            QoS::ExactlyOnce => self.reply(id, &Packet::Pubrec(p.packet_id)),
        }
    }
}
