//! `ClientIndex`: client id → slot key in 8 bytes per entry.
//!
//! A map from client id to session slot would store the id again (a 32-byte `ByteStr` per
//! entry, plus the table's slack). The index stores only the slot key and 32 bits of the id's
//! hash; the id itself lives in the slot, and lookups compare against it through a closure.
//! Growing the table rehashes from the stored hash bits, never from the slots.

use ahash::RandomState;
use hashbrown::HashTable;

/// Client id → slot key, the ids kept by the caller's slots.
#[derive(Default)]
pub struct ClientIndex {
    table: HashTable<(u32, u32)>,
    state: RandomState,
}

/// The table's 64-bit hash from the stored 32 bits: the multiplication carries every input
/// bit into the top bits, which the table uses as tags.
fn spread(h: u32) -> u64 {
    u64::from(h).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(h)
}

impl ClientIndex {
    fn hash(&self, id: &[u8]) -> u32 {
        self.state.hash_one(id) as u32
    }

    /// The key stored for `id`; `is_id(key)` tells whether a slot holds `id`.
    pub fn get(&self, id: &[u8], is_id: impl Fn(u32) -> bool) -> Option<u32> {
        let h = self.hash(id);
        self.table
            .find(spread(h), |&(eh, k)| eh == h && is_id(k))
            .map(|&(_, k)| k)
    }

    /// Points `id` at `key`, replacing the entry of a slot that holds `id` (`is_id`).
    pub fn insert(&mut self, id: &[u8], key: u32, is_id: impl Fn(u32) -> bool) {
        let h = self.hash(id);
        match self
            .table
            .find_mut(spread(h), |&(eh, k)| eh == h && (k == key || is_id(k)))
        {
            Some(e) => e.1 = key,
            None => {
                self.table
                    .insert_unique(spread(h), (h, key), |&(eh, _)| spread(eh));
            }
        }
    }

    /// Removes the entry of `id` if it points at `key`; true if it did. Needs no slot, so it
    /// may run after the slot is gone.
    pub fn remove(&mut self, id: &[u8], key: u32) -> bool {
        let h = self.hash(id);
        match self
            .table
            .find_entry(spread(h), |&(eh, k)| eh == h && k == key)
        {
            Ok(e) => {
                e.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Behaves like a map from id to key, with ids kept in a side table as slots would.
        #[test]
        fn acts_like_a_map(ops in proptest::collection::vec((0u8..3, 0u8..40, 0u32..60), 1..400)) {
            let mut index = ClientIndex::default();
            let mut slots: HashMap<u32, String> = HashMap::new();
            let mut model: HashMap<String, u32> = HashMap::new();
            for (op, id, key) in ops {
                let id = format!("client-{id}");
                match op {
                    0 => {
                        // A slot takes `key` for `id` (a key is never shared by two live ids).
                        if slots.get(&key).is_some_and(|s| *s != id) {
                            continue;
                        }
                        slots.insert(key, id.clone());
                        index.insert(id.as_bytes(), key, |k| slots.get(&k) == Some(&id));
                        model.insert(id.clone(), key);
                    }
                    1 => {
                        let removed = index.remove(id.as_bytes(), key);
                        prop_assert_eq!(removed, model.get(&id) == Some(&key));
                        if removed {
                            model.remove(&id);
                        }
                    }
                    _ => {}
                }
                let got = index.get(id.as_bytes(), |k| slots.get(&k) == Some(&id));
                prop_assert_eq!(got, model.get(&id).copied());
                prop_assert_eq!(index.len(), model.len());
            }
        }
    }
}
