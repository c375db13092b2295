//! `TopicTrie<V>`: topic filters → values, matched against topic names.
//!
//! Filters without wildcards (most subscriptions in IoT: one device, one topic) live in a hash
//! map keyed by the whole filter, so matching them costs one hash of the topic and one
//! comparison. Filters with `+` or `#` live in a trie with one node per level: a node holds the
//! value of the filter that ends at it, the value of the filter that ends with `#` below it, its
//! exact-level children and its `+` child. Matching walks the topic's levels once, following the
//! exact child and the `+` child, and collects `#` values on the way, without allocating; it is
//! skipped while no wildcard filter is stored. Used for each shard's local subscription index
//! and its replica of the route table.

use super::topic::{is_wildcard, split_level};
use ahash::AHashMap;

/// A map from topic filters to values, matched against topic names.
#[derive(Debug, Clone)]
pub struct TopicTrie<V> {
    /// Filters without wildcards, by the whole filter.
    exact: AHashMap<Box<str>, V>,
    /// Filters with wildcards.
    root: Node<V>,
    /// Filters in `root`.
    wild: usize,
}

#[derive(Debug, Clone)]
struct Node<V> {
    children: AHashMap<Box<str>, Node<V>>,
    plus: Option<Box<Node<V>>>,
    /// The filter that ends exactly here.
    value: Option<V>,
    /// The filter `<path to here>/#` (at the root: `#`).
    hash: Option<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: AHashMap::new(),
            plus: None,
            value: None,
            hash: None,
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.value.is_none()
            && self.hash.is_none()
            && self.plus.is_none()
            && self.children.is_empty()
    }
}

impl<V> Default for TopicTrie<V> {
    fn default() -> Self {
        TopicTrie {
            exact: AHashMap::new(),
            root: Node::default(),
            wild: 0,
        }
    }
}

impl<V> TopicTrie<V> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of filters stored.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wild
    }

    /// Whether no filter is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of `filter`, inserting `make()` if absent. Returns the value and whether it
    /// was inserted.
    pub fn entry_or_insert_with(
        &mut self,
        filter: &str,
        make: impl FnOnce() -> V,
    ) -> (&mut V, bool) {
        if !is_wildcard(filter) {
            return match self.exact.entry(filter.into()) {
                std::collections::hash_map::Entry::Occupied(e) => (e.into_mut(), false),
                std::collections::hash_map::Entry::Vacant(e) => (e.insert(make()), true),
            };
        }
        let mut node = &mut self.root;
        let mut rest = Some(filter);
        let slot = loop {
            let Some(r) = rest else {
                break &mut node.value;
            };
            let (level, tail) = split_level(r);
            if level == "#" && tail.is_none() {
                break &mut node.hash;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
            rest = tail;
        };
        let inserted = slot.is_none();
        if inserted {
            self.wild += 1;
        }
        (slot.get_or_insert_with(make), inserted)
    }

    /// The value of `filter`.
    pub fn get(&self, filter: &str) -> Option<&V> {
        if !is_wildcard(filter) {
            return self.exact.get(filter);
        }
        let mut node = &self.root;
        let mut rest = Some(filter);
        loop {
            let Some(r) = rest else {
                return node.value.as_ref();
            };
            let (level, tail) = split_level(r);
            if level == "#" && tail.is_none() {
                return node.hash.as_ref();
            }
            node = if level == "+" {
                node.plus.as_deref()?
            } else {
                node.children.get(level)?
            };
            rest = tail;
        }
    }

    /// The value of `filter`, mutably.
    pub fn get_mut(&mut self, filter: &str) -> Option<&mut V> {
        if !is_wildcard(filter) {
            return self.exact.get_mut(filter);
        }
        let mut node = &mut self.root;
        let mut rest = Some(filter);
        loop {
            let Some(r) = rest else {
                return node.value.as_mut();
            };
            let (level, tail) = split_level(r);
            if level == "#" && tail.is_none() {
                return node.hash.as_mut();
            }
            node = if level == "+" {
                node.plus.as_deref_mut()?
            } else {
                node.children.get_mut(level)?
            };
            rest = tail;
        }
    }

    /// Removes `filter`, pruning nodes left empty.
    pub fn remove(&mut self, filter: &str) -> Option<V> {
        if !is_wildcard(filter) {
            return self.exact.remove(filter);
        }
        let v = remove_rec(&mut self.root, Some(filter));
        if v.is_some() {
            self.wild -= 1;
        }
        v
    }

    /// Calls `f` with the value of every filter that matches `topic`.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a V)) {
        if let Some(v) = self.exact.get(topic) {
            f(v);
        }
        if self.wild > 0 {
            let dollar = topic.starts_with('$');
            match_rec(&self.root, Some(topic), !dollar, &mut f);
        }
    }

    /// Calls `f` with every (filter, value) pair, in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(&str, &V)) {
        for (filter, v) in &self.exact {
            f(filter, v);
        }
        let mut path = String::new();
        walk(&self.root, true, &mut path, &mut f);
    }
}

fn remove_rec<V>(node: &mut Node<V>, rest: Option<&str>) -> Option<V> {
    let Some(r) = rest else {
        return node.value.take();
    };
    let (level, tail) = split_level(r);
    if level == "#" && tail.is_none() {
        return node.hash.take();
    }
    if level == "+" {
        let child = node.plus.as_deref_mut()?;
        let v = remove_rec(child, tail);
        if child.is_empty() {
            node.plus = None;
        }
        v
    } else {
        let child = node.children.get_mut(level)?;
        let v = remove_rec(child, tail);
        if child.is_empty() {
            node.children.remove(level);
        }
        v
    }
}

fn match_rec<'a, V>(
    node: &'a Node<V>,
    rest: Option<&str>,
    wildcards_ok: bool,
    f: &mut impl FnMut(&'a V),
) {
    if wildcards_ok {
        if let Some(v) = &node.hash {
            f(v);
        }
    }
    let Some(r) = rest else {
        if let Some(v) = &node.value {
            f(v);
        }
        return;
    };
    let (level, tail) = split_level(r);
    if let Some(child) = node.children.get(level) {
        match_rec(child, tail, true, f);
    }
    if wildcards_ok {
        if let Some(plus) = &node.plus {
            match_rec(plus, tail, true, f);
        }
    }
}

fn walk<V>(node: &Node<V>, root: bool, path: &mut String, f: &mut impl FnMut(&str, &V)) {
    let len = path.len();
    if let Some(v) = &node.value {
        f(path, v);
    }
    if let Some(v) = &node.hash {
        if !root {
            path.push('/');
        }
        path.push('#');
        f(path, v);
        path.truncate(len);
    }
    let children = node.children.iter().map(|(l, c)| (&**l, c));
    for (level, child) in children.chain(node.plus.as_deref().map(|p| ("+", p))) {
        if !root {
            path.push('/');
        }
        path.push_str(level);
        walk(child, false, path, f);
        path.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use proptest::prelude::*;

    fn matched(t: &TopicTrie<String>, topic: &str) -> Vec<String> {
        let mut v = Vec::new();
        t.for_each_match(topic, |f| v.push(f.clone()));
        v.sort();
        v
    }

    const FILTERS: &[&str] = &[
        "#",
        "+",
        "+/+",
        "/+",
        "a",
        "a/#",
        "a/+",
        "a/b",
        "a/b/c",
        "a/+/c",
        "+/b/#",
        "$SYS/#",
        "$SYS/+/x",
        "$SYS/broker/x",
        "+/monitor/Clients",
        "sport/tennis/player1/#",
        "sport/+",
        "",
        "a//c",
    ];

    #[test]
    fn spec_table() {
        let mut t = TopicTrie::new();
        for f in FILTERS.iter().filter(|f| !f.is_empty()) {
            t.entry_or_insert_with(f, || f.to_string());
        }
        assert_eq!(matched(&t, "a"), vec!["#", "+", "a", "a/#"]);
        assert_eq!(
            matched(&t, "a/b"),
            vec!["#", "+/+", "+/b/#", "a/#", "a/+", "a/b"]
        );
        assert_eq!(
            matched(&t, "$SYS/broker/x"),
            vec!["$SYS/#", "$SYS/+/x", "$SYS/broker/x"]
        );
        assert_eq!(matched(&t, "$SYS/monitor/Clients"), vec!["$SYS/#"]);
        assert_eq!(matched(&t, "/finance"), vec!["#", "+/+", "/+"]);
        assert_eq!(
            matched(&t, "sport/tennis/player1"),
            vec!["#", "sport/tennis/player1/#"]
        );
        assert_eq!(matched(&t, "sport"), vec!["#", "+"]);
    }

    #[test]
    fn insert_remove_prunes() {
        let mut t = TopicTrie::new();
        for f in ["a/b/c", "a/+/c", "a/#", "#", "+"] {
            assert!(t.entry_or_insert_with(f, || 1).1);
            assert!(!t.entry_or_insert_with(f, || 2).1);
        }
        assert_eq!(t.len(), 5);
        assert_eq!(t.get("a/+/c"), Some(&1));
        *t.get_mut("a/#").unwrap() = 7;
        assert_eq!(t.get("a/#"), Some(&7));
        for f in ["a/b/c", "a/+/c", "a/#", "#", "+"] {
            assert!(t.remove(f).is_some());
            assert!(t.remove(f).is_none());
        }
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "nodes were not pruned");
    }

    #[test]
    fn exact_filters_without_a_trie() {
        let mut t = TopicTrie::new();
        t.entry_or_insert_with("a/b", || 1);
        t.entry_or_insert_with("$SYS/x", || 2);
        assert_eq!((t.len(), t.wild), (2, 0));
        assert!(t.root.is_empty(), "exact filters went into the trie");
        let mut seen = Vec::new();
        t.for_each_match("a/b", |v| seen.push(*v));
        t.for_each_match("$SYS/x", |v| seen.push(*v));
        t.for_each_match("a", |v| seen.push(*v));
        assert_eq!(seen, vec![1, 2]);
        t.entry_or_insert_with("a/+", || 3);
        assert_eq!((t.len(), t.wild), (3, 1));
        assert_eq!(t.remove("a/b"), Some(1));
        assert_eq!(t.remove("a/+"), Some(3));
        assert_eq!((t.len(), t.wild), (1, 0));
    }

    #[test]
    fn for_each_lists_filters() {
        let mut t = TopicTrie::new();
        for f in FILTERS.iter().filter(|f| !f.is_empty()) {
            t.entry_or_insert_with(f, || ());
        }
        let mut all = Vec::new();
        t.for_each(|f, _| all.push(f.to_string()));
        all.sort();
        let mut expected: Vec<String> = FILTERS
            .iter()
            .filter(|f| !f.is_empty())
            .map(|s| s.to_string())
            .collect();
        expected.sort();
        assert_eq!(all, expected);
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof!["[ab$]{0,2}", Just("+".to_string())]
    }

    proptest! {
        /// The trie agrees with the reference matcher on random filters and topics.
        #[test]
        fn agrees_with_reference(filters in prop::collection::vec((prop::collection::vec(level(), 1..4), any::<bool>()), 1..20),
                                 topics in prop::collection::vec(prop::collection::vec("[ab$]{0,2}", 1..5), 1..20)) {
            let mut t = TopicTrie::new();
            let filters: Vec<String> = filters.into_iter().map(|(ls, hash)| {
                let mut f = ls.join("/");
                if hash { f.push_str("/#"); }
                f
            }).collect();
            for f in &filters {
                t.entry_or_insert_with(f, || f.clone());
            }
            for topic in topics {
                let topic = topic.join("/");
                if topic.is_empty() { continue; }
                let mut expected: Vec<String> = filters.iter().filter(|f| matches(f, &topic)).cloned().collect();
                expected.sort();
                expected.dedup();
                prop_assert_eq!(matched(&t, &topic), expected, "topic {}", topic);
            }
        }
    }
}
