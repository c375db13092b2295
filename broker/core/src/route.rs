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

/// The shard that owns `key` among `shards` shards. Every shard computes the same answer, and
/// so does every build of any version: the hash is spelled out here (FNV-1a over the bytes,
/// then the splitmix64 finalizer to spread them), not borrowed from a hasher whose output may
/// change with its version or the CPU features it was compiled for.
pub fn owner_shard(key: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % shards as u64) as usize
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

    /// Owners are fixed by the hash: these are the owners of `client-0` … `client-11`. A
    /// change here places client ids and retained topics on other shards, so it must be a
    /// deliberate one.
    #[test]
    fn owners_are_fixed() {
        let golden: [(usize, [usize; 12]); 4] = [
            (2, [1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1]),
            (3, [0, 1, 1, 1, 2, 0, 2, 0, 2, 2, 1, 2]),
            (4, [3, 2, 1, 0, 1, 2, 2, 3, 3, 2, 2, 3]),
            (16, [11, 2, 9, 4, 5, 10, 2, 7, 3, 6, 10, 3]),
        ];
        for (shards, owners) in golden {
            for (i, want) in owners.into_iter().enumerate() {
                let key = format!("client-{i}");
                assert_eq!(
                    owner_shard(key.as_bytes(), shards),
                    want,
                    "{key} of {shards}"
                );
            }
        }
        assert_eq!(owner_shard(b"anything", 1), 0);
    }

    #[test]
    fn owners_spread() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[owner_shard(format!("client-{i}").as_bytes(), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
