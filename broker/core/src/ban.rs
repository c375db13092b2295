//! Bans and flapping detection.
//!
//! A ban refuses the CONNECTs of a client id, a username or a peer address (one address or a
//! network) until it expires: CONNACK 0x05, as for a client the rules do not authorize. Bans
//! are added by the operator (admin API, `shardmq ctl banned`) or by flapping detection: a
//! client id that connects more than `max_count` times within `window` is banned for
//! `ban_time`.
//!
//! A client id's ban lives on its owner shard, which sees every CONNECT for it (flapping is
//! counted there too); username and address bans are copied to every shard, which checks them
//! where the CONNECT arrives. Bans are kept in memory: a restart forgets them.

use crate::acl::IpNet;
use crate::time::Timestamp;
use ahash::AHashMap;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::time::Duration;

/// What a ban matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BanKind {
    /// A client id.
    ClientId,
    /// A username.
    Username,
    /// A peer address or network (EMQX's `peerhost`).
    PeerHost,
}

impl BanKind {
    /// The kind's name in the admin API and `shardmq ctl` (EMQX's `as`).
    pub fn as_str(self) -> &'static str {
        match self {
            BanKind::ClientId => "clientid",
            BanKind::Username => "username",
            BanKind::PeerHost => "peerhost",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Result<BanKind, String> {
        match s {
            "clientid" => Ok(BanKind::ClientId),
            "username" => Ok(BanKind::Username),
            "peerhost" => Ok(BanKind::PeerHost),
            _ => Err(format!("{s:?} is not one of clientid, username, peerhost")),
        }
    }
}

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// What it matches.
    #[serde(rename = "as")]
    pub kind: BanKind,
    /// The client id, the username, or the address or network (`10.0.0.0/8`).
    pub who: String,
    /// Why (free text).
    pub reason: String,
    /// Who banned it: `"flapping"`, or the operator's name for it (`"admin"`).
    pub by: String,
    /// When it was made.
    pub at: Timestamp,
    /// When it ends (`Timestamp::NEVER`: never).
    pub until: Timestamp,
}

impl Ban {
    /// Checks the ban's value (a peer host must be an address or a network).
    pub fn validate(&self) -> Result<(), String> {
        if self.who.is_empty() {
            return Err("`who` is empty".into());
        }
        if self.kind == BanKind::PeerHost {
            IpNet::parse(&self.who)?;
        }
        Ok(())
    }

    fn live(&self, now: Timestamp) -> bool {
        self.until > now
    }
}

/// A shard's bans.
#[derive(Debug, Default)]
pub struct BanList {
    bans: AHashMap<(BanKind, Box<str>), Ban>,
    /// Address bans, parsed (few: checked one by one).
    nets: Vec<(IpNet, Timestamp)>,
}

impl BanList {
    /// Adds or replaces a ban (an invalid peer host is refused).
    pub fn add(&mut self, ban: Ban) -> Result<(), String> {
        ban.validate()?;
        self.bans.insert((ban.kind, ban.who.as_str().into()), ban);
        self.index_nets();
        Ok(())
    }

    /// Lifts a ban; whether there was one (live).
    pub fn remove(&mut self, kind: BanKind, who: &str, now: Timestamp) -> bool {
        let found = self
            .bans
            .remove(&(kind, who.into()))
            .is_some_and(|b| b.live(now));
        if kind == BanKind::PeerHost {
            self.index_nets();
        }
        found
    }

    /// Whether any ban is in force (cheap: most brokers have none).
    pub fn is_empty(&self) -> bool {
        self.bans.is_empty()
    }

    /// Whether `who` is banned as `kind` at `now`.
    pub fn bans(&self, kind: BanKind, who: &str, now: Timestamp) -> bool {
        !self.bans.is_empty()
            && self
                .bans
                .get(&(kind, who.into()))
                .is_some_and(|b| b.live(now))
    }

    /// Whether the address `ip` is in a banned network at `now`.
    pub fn bans_peer(&self, ip: IpAddr, now: Timestamp) -> bool {
        self.nets
            .iter()
            .any(|(net, until)| *until > now && net.contains(ip))
    }

    /// The bans in force at `now`.
    pub fn list(&self, now: Timestamp) -> Vec<Ban> {
        let mut v: Vec<Ban> = self
            .bans
            .values()
            .filter(|b| b.live(now))
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.kind.as_str(), &a.who).cmp(&(b.kind.as_str(), &b.who)));
        v
    }

    /// Forgets the bans that ended by `now`.
    pub fn purge(&mut self, now: Timestamp) {
        let before = self.bans.len();
        self.bans.retain(|_, b| b.live(now));
        if self.bans.len() != before {
            self.index_nets();
        }
    }

    fn index_nets(&mut self) {
        self.nets = self
            .bans
            .values()
            .filter(|b| b.kind == BanKind::PeerHost)
            .filter_map(|b| IpNet::parse(&b.who).ok().map(|n| (n, b.until)))
            .collect();
    }
}

/// `flapping.*`: when a client id that keeps reconnecting is banned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlappingPolicy {
    /// CONNECTs allowed within `window`; one more bans the client id.
    pub max_count: u32,
    /// The window the CONNECTs are counted in.
    pub window: Duration,
    /// How long the ban lasts.
    pub ban_time: Duration,
}

/// The owner shard's count of recent CONNECTs per client id.
#[derive(Debug, Default)]
pub struct Flapping {
    /// Client id → (CONNECTs in the current window, when the window began).
    counts: AHashMap<Box<str>, (u32, Timestamp)>,
    next_purge: Timestamp,
}

impl Flapping {
    /// Counts a CONNECT for `client_id` at `now`; true when it is one too many.
    pub fn connect(&mut self, policy: &FlappingPolicy, client_id: &str, now: Timestamp) -> bool {
        if now >= self.next_purge {
            // Windows that ended say nothing any more: forget them, once per window.
            self.counts
                .retain(|_, (_, start)| start.after(policy.window) > now);
            self.next_purge = now.after(policy.window);
        }
        let entry = self.counts.entry(client_id.into()).or_insert((0, now));
        if entry.1.after(policy.window) <= now {
            *entry = (0, now);
        }
        entry.0 += 1;
        if entry.0 > policy.max_count {
            self.counts.remove(client_id);
            return true;
        }
        false
    }

    /// Client ids counted now.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Whether no client id is counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(kind: BanKind, who: &str, until: u64) -> Ban {
        Ban {
            kind,
            who: who.into(),
            reason: String::new(),
            by: "test".into(),
            at: Timestamp(0),
            until: Timestamp(until),
        }
    }

    #[test]
    fn bans_match_their_kind_until_they_end() {
        let mut l = BanList::default();
        l.add(ban(BanKind::ClientId, "c1", 100)).unwrap();
        l.add(ban(BanKind::Username, "u1", u64::MAX)).unwrap();
        l.add(ban(BanKind::PeerHost, "10.1.0.0/16", 100)).unwrap();
        assert!(l.bans(BanKind::ClientId, "c1", Timestamp(99)));
        assert!(!l.bans(BanKind::ClientId, "c1", Timestamp(100)), "ended");
        assert!(
            !l.bans(BanKind::Username, "c1", Timestamp(0)),
            "another kind"
        );
        assert!(l.bans(BanKind::Username, "u1", Timestamp(1 << 60)));
        assert!(l.bans_peer("10.1.2.3".parse().unwrap(), Timestamp(5)));
        assert!(l.bans_peer("::ffff:10.1.2.3".parse().unwrap(), Timestamp(5)));
        assert!(!l.bans_peer("10.2.0.1".parse().unwrap(), Timestamp(5)));
        assert_eq!(l.list(Timestamp(5)).len(), 3);
        assert_eq!(l.list(Timestamp(100)).len(), 1);
        l.purge(Timestamp(100));
        assert!(!l.bans_peer("10.1.2.3".parse().unwrap(), Timestamp(5)));
        assert!(l.remove(BanKind::Username, "u1", Timestamp(200)));
        assert!(!l.remove(BanKind::Username, "u1", Timestamp(200)));
        assert!(l.is_empty());
        assert!(l.add(ban(BanKind::PeerHost, "not-an-address", 1)).is_err());
        assert!(l.add(ban(BanKind::ClientId, "", 1)).is_err());
        assert_eq!(BanKind::parse("peerhost"), Ok(BanKind::PeerHost));
        assert!(BanKind::parse("ip").is_err());
    }

    #[test]
    fn more_connects_than_max_count_within_the_window_flap() {
        let p = FlappingPolicy {
            max_count: 3,
            window: Duration::from_secs(60),
            ban_time: Duration::from_secs(300),
        };
        let mut f = Flapping::default();
        let t = |s: u64| Timestamp(1_000_000 + s * 1000);
        for s in 0..3 {
            assert!(!f.connect(&p, "c", t(s)));
        }
        assert!(f.connect(&p, "c", t(10)), "the fourth within a minute");
        // Counting starts again after a ban, and a window that ended starts a new one.
        for s in [11, 12, 13] {
            assert!(!f.connect(&p, "c", t(s)));
        }
        assert!(!f.connect(&p, "c", t(72)), "a new window");
        assert!(!f.connect(&p, "other", t(72)));
        // Client ids whose window ended are forgotten.
        assert!(!f.connect(&p, "x", t(200)));
        assert_eq!(f.len(), 1);
    }
}
