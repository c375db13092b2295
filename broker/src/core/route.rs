//! The route table replica and shard placement by hash.
//!
//! Each shard keeps a [`RouteTable`]: topic filter → set of *other* shards with at least one
//! local subscriber on it. A shard announces a filter (a route delta) only when its first local
//! subscriber arrives or its last one leaves. [`owner_shard`] places client ids (session
//! registry) and topics (retained partition) on shards with a fixed-seed hash, so that every
//! shard computes the same owner.

use super::trie::TopicTrie;

/// A set of shard indexes (at most 128 shards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ShardSet(u128);

impl ShardSet {
    /// The empty set.
    pub const EMPTY: ShardSet = ShardSet(0);

    /// Adds `shard`.
    pub fn insert(&mut self, shard: usize) {
        self.0 |= 1u128 << shard;
    }

    /// Removes `shard`.
    pub fn remove(&mut self, shard: usize) {
        self.0 &= !(1u128 << shard);
    }

    /// Whether `shard` is in the set.
    pub fn contains(self, shard: usize) -> bool {
        self.0 & (1u128 << shard) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Union.
    pub fn union(self, other: ShardSet) -> ShardSet {
        ShardSet(self.0 | other.0)
    }

    /// The members, ascending.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(i)
        })
    }
}

/// Filter → other shards subscribed to it.
pub type RouteTable = TopicTrie<ShardSet>;

/// The shard that owns `key` among `shards` shards. Every shard of a process computes the same
/// answer (fixed seeds).
pub fn owner_shard(key: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let state = ahash::RandomState::with_seeds(
        0x5348_4152_444d_5131,
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
    );
    (state.hash_one(key) % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_set() {
        let mut s = ShardSet::EMPTY;
        s.insert(0);
        s.insert(127);
        s.insert(5);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 5, 127]);
        s.remove(5);
        assert!(!s.contains(5) && s.contains(127));
    }

    #[test]
    fn owners_spread_and_agree() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let k = format!("client-{i}");
            let o = owner_shard(k.as_bytes(), 4);
            assert_eq!(o, owner_shard(k.as_bytes(), 4));
            counts[o] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
