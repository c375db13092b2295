//! Who may publish and subscribe where: the access rules (`auth.acl_file`), checked in order,
//! the first that matches deciding, as EMQX's acl.conf does.
//!
//! A rule has a permission (allow or deny), an action (publish, subscribe or both), topic
//! patterns, and at most one subject (a username, a client id, or a network); a rule without
//! a subject applies to every client. Topic patterns are filters: `%u` and `%c` stand for the
//! client's username and client id (a rule naming `%u` does not apply to a client without
//! one), and `eq F` matches the filter `F` only as written. A published topic matches a
//! pattern as MQTT matches topics to filters; a subscribed filter matches a pattern when every
//! topic it can match is matched by the pattern (`a/#` covers `a/+`, not the other way round).
//! When no rule matches, `nomatch` decides.

use crate::topic::split_level;
use std::net::IpAddr;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
}

/// What a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// PUBLISH (and wills).
    Publish,
    /// SUBSCRIBE.
    Subscribe,
    /// Both.
    PubSub,
}

impl Action {
    fn covers(self, asked: Action) -> bool {
        self == Action::PubSub || self == asked
    }
}

/// An IP network (`10.0.0.0/8`, `::1/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses `ADDR/PREFIX` or a single address.
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or a network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.trim()
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length is 0 to {max}"))?
        };
        Ok(IpNet { addr, prefix })
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Whom a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// Every client.
    All,
    /// Clients with this username.
    User(String),
    /// The client with this id.
    ClientId(String),
    /// Clients connecting from this network.
    Net(IpNet),
}

/// A topic pattern of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// A filter, with `%u` and `%c` expanded per client.
    Filter(String),
    /// This filter only, as written (`eq …`).
    Eq(String),
}

impl Pattern {
    /// Parses `eq F` or a filter.
    pub fn parse(s: &str) -> Pattern {
        match s.strip_prefix("eq ") {
            Some(f) => Pattern::Eq(f.trim_start().to_string()),
            None => Pattern::Filter(s.to_string()),
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Allow or deny.
    pub permission: Permission,
    /// Publish, subscribe or both.
    pub action: Action,
    /// Whom.
    pub subject: Subject,
    /// Where.
    pub topics: Vec<Pattern>,
}

/// The client asking.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// Client id.
    pub client_id: &'a str,
    /// Username, if any.
    pub username: Option<&'a str>,
    /// Address.
    pub peer: IpAddr,
}

/// The rules, and what holds when none matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    /// In order.
    pub rules: Vec<Rule>,
    /// `auth.acl_nomatch`.
    pub nomatch: Permission,
}

impl Default for Acl {
    /// No rule: everything allowed.
    fn default() -> Self {
        Acl {
            rules: Vec::new(),
            nomatch: Permission::Allow,
        }
    }
}

impl Acl {
    /// Whether `who` may `action` (publish or subscribe) on `topic` (a topic name for
    /// publish, a filter for subscribe).
    pub fn check(&self, who: &Who<'_>, action: Action, topic: &str) -> Permission {
        for rule in &self.rules {
            if !rule.action.covers(action) || !applies(&rule.subject, who) {
                continue;
            }
            if rule
                .topics
                .iter()
                .any(|p| pattern_matches(p, who, action, topic))
            {
                return rule.permission;
            }
        }
        self.nomatch
    }
}

fn applies(subject: &Subject, who: &Who<'_>) -> bool {
    match subject {
        Subject::All => true,
        Subject::User(u) => who.username == Some(u.as_str()),
        Subject::ClientId(c) => who.client_id == c,
        Subject::Net(n) => n.contains(who.peer),
    }
}

/// `pattern` with `%u` and `%c` replaced; `None` when it needs a username the client lacks.
fn expand(pattern: &str, who: &Who<'_>) -> Option<String> {
    if !pattern.contains('%') {
        return Some(pattern.to_string());
    }
    if pattern.contains("%u") && who.username.is_none() {
        return None;
    }
    Some(
        pattern
            .replace("%u", who.username.unwrap_or(""))
            .replace("%c", who.client_id),
    )
}

fn pattern_matches(p: &Pattern, who: &Who<'_>, action: Action, topic: &str) -> bool {
    match p {
        Pattern::Eq(f) => f == topic,
        Pattern::Filter(f) => {
            let Some(f) = expand(f, who) else {
                return false;
            };
            match action {
                Action::Subscribe => covers(&f, topic),
                _ => crate::topic::matches(&f, topic),
            }
        }
    }
}

/// Whether every topic `filter` matches is matched by `rule`, level by level: `#` in the rule
/// covers the rest, `+` in the rule covers any one level (a `+` of the filter too), and a
/// literal level only itself.
pub fn covers(rule: &str, filter: &str) -> bool {
    let (mut r, mut f) = (Some(rule), Some(filter));
    loop {
        match (r, f) {
            (None, None) => return true,
            (Some(rr), ff) => {
                let (rl, rrest) = split_level(rr);
                if rl == "#" {
                    return true;
                }
                let Some(ff) = ff else {
                    return false;
                };
                let (fl, frest) = split_level(ff);
                if fl == "#" {
                    return false;
                }
                if rl != "+" && rl != fl {
                    return false;
                }
                r = rrest;
                f = frest;
            }
            (None, Some(_)) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who<'a>(client_id: &'a str, username: Option<&'a str>, peer: &str) -> Who<'a> {
        Who {
            client_id,
            username,
            peer: peer.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        }
    }

    fn rule(permission: Permission, action: Action, subject: Subject, topics: &[&str]) -> Rule {
        Rule {
            permission,
            action,
            subject,
            topics: topics.iter().map(|t| Pattern::parse(t)).collect(),
        }
    }

    #[test]
    fn covering_filters() {
        for (rule, filter, want) in [
            ("a/#", "a/+", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("a/+", "a/#", false),
            ("a/b", "a/+", false),
            ("a/b", "a/b", true),
            ("#", "anything/#", true),
            ("+/x", "y/x", true),
            ("a/+", "a/b/c", false),
            ("a/b/c", "a/b", false),
        ] {
            assert_eq!(covers(rule, filter), want, "{rule} covers {filter}");
        }
    }

    #[test]
    fn first_match_wins_with_subjects_and_placeholders() {
        use Action::*;
        use Permission::*;
        let acl = Acl {
            rules: vec![
                rule(Allow, Subscribe, Subject::All, &["$SYS/#"]),
                rule(Deny, Subscribe, Subject::All, &["eq #"]),
                rule(Allow, PubSub, Subject::All, &["devices/%c/#", "users/%u/#"]),
                rule(Allow, Publish, Subject::User("admin".into()), &["#"]),
                rule(
                    Allow,
                    Subscribe,
                    Subject::Net(IpNet::parse("10.0.0.0/8").unwrap()),
                    &["telemetry/#"],
                ),
                rule(
                    Allow,
                    Subscribe,
                    Subject::ClientId("dash".into()),
                    &["telemetry/+/temp"],
                ),
            ],
            nomatch: Deny,
        };
        let alice = who("dev-1", Some("alice"), "192.168.1.5");
        assert_eq!(acl.check(&alice, Publish, "devices/dev-1/up"), Allow);
        assert_eq!(acl.check(&alice, Publish, "devices/dev-2/up"), Deny);
        assert_eq!(acl.check(&alice, Subscribe, "users/alice/#"), Allow);
        assert_eq!(acl.check(&alice, Subscribe, "users/+/inbox"), Deny);
        assert_eq!(
            acl.check(&alice, Subscribe, "#"),
            Deny,
            "eq # denies the literal #"
        );
        assert_eq!(acl.check(&alice, Subscribe, "$SYS/broker/uptime"), Allow);
        let anon = who("dev-9", None, "10.1.2.3");
        assert_eq!(
            acl.check(&anon, Publish, "users//x"),
            Deny,
            "%u needs a username"
        );
        assert_eq!(acl.check(&anon, Subscribe, "telemetry/+/temp"), Allow);
        assert_eq!(acl.check(&alice, Subscribe, "telemetry/+/temp"), Deny);
        let dash = who("dash", None, "192.168.1.9");
        assert_eq!(acl.check(&dash, Subscribe, "telemetry/+/temp"), Allow);
        assert_eq!(acl.check(&dash, Subscribe, "telemetry/#"), Deny);
        let admin = who("x", Some("admin"), "192.168.1.1");
        assert_eq!(acl.check(&admin, Publish, "any/where"), Allow);
        assert_eq!(acl.check(&admin, Subscribe, "any/where"), Deny);
        assert_eq!(Acl::default().check(&admin, Subscribe, "x"), Allow);
    }

    #[test]
    fn networks() {
        let n = IpNet::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.255.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(IpNet::parse("::1")
            .unwrap()
            .contains("::1".parse().unwrap()));
        assert!(IpNet::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("ten").is_err());
    }
}
