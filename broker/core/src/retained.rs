//! One shard's partition of the retained messages.
//!
//! Retained messages are partitioned across shards by a hash of their topic
//! ([`super::route::owner_shard`]): a PUBLISH with the retain flag is sent to the owner of its
//! topic, an exact-topic subscription asks that one shard, and a wildcard subscription asks
//! every shard. Each partition is a tree of topic levels walked with the subscription's filter.

use super::message::SharedMessage;
use super::time::Timestamp;
use super::topic::split_level;
use ahash::AHashMap;
use std::time::Duration;

/// Limits of a partition (from `retainer.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Most messages in this partition; 0 = unlimited.
    pub max_messages: u64,
    /// Largest payload stored.
    pub max_payload: usize,
    /// How long a message is kept; `None` = forever.
    pub expiry: Option<Duration>,
}

/// What [`RetainedStore::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetOutcome {
    /// A new topic was stored.
    Stored,
    /// An existing topic's message was replaced.
    Replaced,
    /// An empty payload cleared the topic.
    Cleared,
    /// An empty payload for a topic with nothing retained.
    NothingToClear,
    /// Not stored: the partition is full.
    RefusedFull,
    /// Not stored: the payload is larger than `retainer.max_payload_size`.
    RefusedTooLarge,
}

#[derive(Debug, Default)]
struct Node {
    children: AHashMap<Box<str>, Node>,
    msg: Option<(SharedMessage, Option<Timestamp>)>,
}

/// Topic → last retained message, for the topics this shard owns.
#[derive(Debug)]
pub struct RetainedStore {
    root: Node,
    count: u64,
    limits: RetainedLimits,
}

impl RetainedStore {
    /// An empty partition.
    pub fn new(limits: RetainedLimits) -> Self {
        RetainedStore {
            root: Node::default(),
            count: 0,
            limits,
        }
    }

    /// Messages stored (expired ones included until purged).
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Stores `msg` as the retained message of its topic, or clears the topic when the payload
    /// is empty.
    pub fn set(&mut self, msg: SharedMessage, now: Timestamp) -> SetOutcome {
        if msg.payload.is_empty() {
            return if remove_rec(&mut self.root, Some(msg.topic.as_str())) {
                self.count -= 1;
                SetOutcome::Cleared
            } else {
                SetOutcome::NothingToClear
            };
        }
        if msg.payload.len() > self.limits.max_payload {
            return SetOutcome::RefusedTooLarge;
        }
        let expires = self.limits.expiry.map(|d| now.after(d));
        let full = self.limits.max_messages != 0 && self.count >= self.limits.max_messages;
        let mut node = &mut self.root;
        let mut rest = Some(msg.topic.as_str());
        while let Some(r) = rest {
            let (level, tail) = split_level(r);
            if full && !node.children.contains_key(level) {
                return SetOutcome::RefusedFull;
            }
            node = node.children.entry(level.into()).or_default();
            rest = tail;
        }
        match &mut node.msg {
            Some(slot) => {
                *slot = (msg, expires);
                SetOutcome::Replaced
            }
            None if full => SetOutcome::RefusedFull,
            None => {
                node.msg = Some((msg, expires));
                self.count += 1;
                SetOutcome::Stored
            }
        }
    }

    /// Calls `f` for every unexpired retained message whose topic matches `filter`.
    pub fn lookup(&self, filter: &str, now: Timestamp, mut f: impl FnMut(&SharedMessage)) {
        lookup_rec(&self.root, Some(filter), true, now, &mut f);
    }

    /// Drops expired messages; returns how many.
    pub fn purge_expired(&mut self, now: Timestamp) -> u64 {
        if self.limits.expiry.is_none() {
            return 0;
        }
        let n = purge_rec(&mut self.root, now);
        self.count -= n;
        n
    }
}

fn live(
    entry: &Option<(SharedMessage, Option<Timestamp>)>,
    now: Timestamp,
) -> Option<&SharedMessage> {
    match entry {
        Some((m, exp)) if exp.is_none_or(|e| now < e) => Some(m),
        _ => None,
    }
}

fn lookup_rec(
    node: &Node,
    rest: Option<&str>,
    root: bool,
    now: Timestamp,
    f: &mut impl FnMut(&SharedMessage),
) {
    let Some(r) = rest else {
        if let Some(m) = live(&node.msg, now) {
            f(m);
        }
        return;
    };
    let (level, tail) = split_level(r);
    match level {
        "#" => {
            if let Some(m) = live(&node.msg, now) {
                f(m);
            }
            for (l, child) in &node.children {
                if !(root && l.starts_with('$')) {
                    all_rec(child, now, f);
                }
            }
        }
        "+" => {
            for (l, child) in &node.children {
                if !(root && l.starts_with('$')) {
                    lookup_rec(child, tail, false, now, f);
                }
            }
        }
        exact => {
            if let Some(child) = node.children.get(exact) {
                lookup_rec(child, tail, false, now, f);
            }
        }
    }
}

fn all_rec(node: &Node, now: Timestamp, f: &mut impl FnMut(&SharedMessage)) {
    if let Some(m) = live(&node.msg, now) {
        f(m);
    }
    for child in node.children.values() {
        all_rec(child, now, f);
    }
}

fn remove_rec(node: &mut Node, rest: Option<&str>) -> bool {
    let Some(r) = rest else {
        return node.msg.take().is_some();
    };
    let (level, tail) = split_level(r);
    let Some(child) = node.children.get_mut(level) else {
        return false;
    };
    let removed = remove_rec(child, tail);
    if child.msg.is_none() && child.children.is_empty() {
        node.children.remove(level);
    }
    removed
}

fn purge_rec(node: &mut Node, now: Timestamp) -> u64 {
    let mut n = 0;
    if matches!(&node.msg, Some((_, Some(exp))) if now >= *exp) {
        node.msg = None;
        n += 1;
    }
    node.children.retain(|_, child| {
        n += purge_rec(child, now);
        child.msg.is_some() || !child.children.is_empty()
    });
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use shardmq_protocol::mqtt::QoS;
    use std::sync::Arc;

    fn msg(topic: &str, payload: &str) -> SharedMessage {
        Arc::new(Message {
            id: 0,
            topic: topic.into(),
            payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: true,
        })
    }

    fn store(max: u64, expiry: Option<Duration>) -> RetainedStore {
        RetainedStore::new(RetainedLimits {
            max_messages: max,
            max_payload: 10,
            expiry,
        })
    }

    fn found(s: &RetainedStore, filter: &str, now: u64) -> Vec<String> {
        let mut v = Vec::new();
        s.lookup(filter, Timestamp(now), |m| {
            v.push(format!(
                "{}={}",
                m.topic,
                String::from_utf8_lossy(&m.payload)
            ))
        });
        v.sort();
        v
    }

    #[test]
    fn set_replace_clear_and_wildcards() {
        let mut s = store(0, None);
        let now = Timestamp(0);
        assert_eq!(s.set(msg("a/b", "1"), now), SetOutcome::Stored);
        assert_eq!(s.set(msg("a/b", "2"), now), SetOutcome::Replaced);
        assert_eq!(s.set(msg("a", "3"), now), SetOutcome::Stored);
        assert_eq!(s.set(msg("a/c/d", "4"), now), SetOutcome::Stored);
        assert_eq!(s.set(msg("$SYS/x", "5"), now), SetOutcome::Stored);
        assert_eq!(found(&s, "a/b", 0), vec!["a/b=2"]);
        assert_eq!(found(&s, "a/+", 0), vec!["a/b=2"]);
        assert_eq!(found(&s, "a/#", 0), vec!["a/b=2", "a/c/d=4", "a=3"]);
        assert_eq!(found(&s, "#", 0), vec!["a/b=2", "a/c/d=4", "a=3"]);
        assert_eq!(found(&s, "+/+", 0), vec!["a/b=2"]);
        assert_eq!(found(&s, "$SYS/#", 0), vec!["$SYS/x=5"]);
        assert_eq!(s.set(msg("a/b", ""), now), SetOutcome::Cleared);
        assert_eq!(s.set(msg("a/b", ""), now), SetOutcome::NothingToClear);
        assert_eq!(found(&s, "a/#", 0), vec!["a/c/d=4", "a=3"]);
        assert_eq!(s.len(), 3);
        assert_eq!(
            s.set(msg("big", "01234567890"), now),
            SetOutcome::RefusedTooLarge
        );
    }

    #[test]
    fn limit_and_expiry() {
        let mut s = store(2, Some(Duration::from_secs(10)));
        assert_eq!(s.set(msg("a", "1"), Timestamp(0)), SetOutcome::Stored);
        assert_eq!(s.set(msg("b", "1"), Timestamp(0)), SetOutcome::Stored);
        assert_eq!(s.set(msg("c", "1"), Timestamp(0)), SetOutcome::RefusedFull);
        assert_eq!(s.set(msg("a", "2"), Timestamp(5_000)), SetOutcome::Replaced);
        assert_eq!(found(&s, "#", 9_999), vec!["a=2", "b=1"]);
        assert_eq!(found(&s, "#", 10_000), vec!["a=2"]);
        assert_eq!(s.purge_expired(Timestamp(10_000)), 1);
        assert_eq!(s.len(), 1);
        assert_eq!(s.purge_expired(Timestamp(15_000)), 1);
        assert!(s.is_empty());
        assert!(s.root.children.is_empty());
    }
}
