//! The id table behind [`super::DedupeSet`]: open addressing with linear probing and
//! backward-shift deletion, one flat array of 24-byte slots.
//!
//! Why not `std`'s `HashMap`: its control bytes and its slots live in two separate
//! arrays, so at the steady state of a busy partition (millions of ids, far larger than
//! the caches) a lookup misses twice and an insertion writes a third line, and nothing
//! can ask for a slot's memory before it is probed. Here an id, its fingerprint and the
//! next few slots share one cache line, and [`IdTable::prefetch`] asks for that line
//! before the lookup (the aggregator's loops ask for the slot of the record a few
//! places ahead of the one they apply), so the miss overlaps the records in between
//! instead of stalling the dedupe lookup. `expire` prefetches a few ids ahead of each
//! removal for the same reason.
//!
//! A slot is empty when its id is all zero bits. The one id that is all zero bits, the
//! nil UUID, is kept beside the table, so every id and every 64-bit fingerprint is
//! stored exactly.
//!
//! A new table is written in full when it is allocated, never left to lazily zeroed
//! pages: a probe would read such a page first (mapping the kernel's shared zero
//! page) and the insertion then write it, and that copy-on-write fault flushes the
//! page's TLB entry on every CPU the process runs on. In the multi-threaded
//! aggregator those flushes cost about a sixth of its CPU in the end-to-end bench
//! while its tables grew.
//!
//! The hasher is foldhash with a per-process random seed, so ids chosen by a hostile
//! producer cannot be made to collide; the table is only probed, never iterated, so its
//! order (and thus the seed) cannot influence any output.

use std::hash::BuildHasher;
use std::mem::size_of;

use crate::prefetch::prefetch_read;

/// An event id as two 64-bit halves (high, low): 8-byte aligned, so a slot with its
/// fingerprint is 24 bytes where a `u128` key (16-byte aligned) would pad it to 32.
pub(super) type IdKey = (u64, u64);

/// One slot: the id's high and low halves and its fingerprint ([`HIGH`], [`LOW`],
/// [`FINGERPRINT`]); all zero when empty.
type Slot = [u64; 3];
const HIGH: usize = 0;
const LOW: usize = 1;
const FINGERPRINT: usize = 2;
const EMPTY: Slot = [0; 3];
/// The id stored beside the table (its slot would look empty).
const NIL: IdKey = (0, 0);

fn is_empty(slot: &Slot) -> bool {
    slot[HIGH] == 0 && slot[LOW] == 0
}

fn key_of(slot: &Slot) -> IdKey {
    (slot[HIGH], slot[LOW])
}

/// Largest load: slots used ≤ 5/8 of the table, where a probe for an id that is not
/// there reads about 3.7 slots on average (linear probing's `(1 + 1/(1 − α)²) / 2`);
/// the table doubles when it would pass this.
const MAX_LOAD_NUMERATOR: usize = 5;
const MAX_LOAD_DENOMINATOR: usize = 8;
const MIN_SLOTS: usize = 16;
/// Slots from the home slot on whose cache lines [`IdTable::prefetch`] asks for.
const PROBE_SLOTS_PREFETCHED: usize = 3;

/// An exact map from id to fingerprint.
#[derive(Debug, Clone, Default)]
pub(super) struct IdTable {
    /// A power of two long, or empty.
    slots: Vec<Slot>,
    /// Ids in `slots`.
    len: usize,
    /// The fingerprint of the nil id, when remembered.
    nil: Option<u64>,
    hasher: foldhash::fast::RandomState,
}

/// What [`IdTable::find`] found: the slot holding the id, or the empty slot that ends
/// its probe sequence (where it would be inserted).
enum Probe {
    Found(usize),
    Vacant(usize),
}

impl IdTable {
    pub(super) fn len(&self) -> usize {
        self.len + usize::from(self.nil.is_some())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0 && self.nil.is_none()
    }

    /// Heap bytes of the slot array.
    pub(super) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Slot>()
    }

    fn home(&self, key: IdKey) -> usize {
        // Truncation on 32-bit targets keeps the low bits, which the mask uses.
        self.hasher.hash_one(key) as usize & (self.slots.len().wrapping_sub(1))
    }

    /// Asks the CPU to fetch the cache line of `key`'s home slot; no effect on the
    /// table.
    #[inline]
    pub(super) fn prefetch(&self, key: IdKey) {
        if !self.slots.is_empty() && key != NIL {
            let home = self.slots.as_ptr().wrapping_add(self.home(key));
            prefetch_read(home);
            // A probe that starts near the end of a line continues in the next one.
            prefetch_read(home.wrapping_add(PROBE_SLOTS_PREFETCHED - 1));
        }
    }

    fn find(&self, key: IdKey) -> Probe {
        let mask = self.slots.len() - 1;
        let mut index = self.home(key);
        loop {
            let slot = &self.slots[index];
            if is_empty(slot) {
                return Probe::Vacant(index);
            }
            if key_of(slot) == key {
                return Probe::Found(index);
            }
            index = (index + 1) & mask;
        }
    }

    /// The fingerprint `key` is remembered with, if it is.
    pub(super) fn get(&self, key: IdKey) -> Option<u64> {
        if key == NIL {
            return self.nil;
        }
        if self.len == 0 {
            return None;
        }
        match self.find(key) {
            Probe::Found(index) => Some(self.slots[index][FINGERPRINT]),
            Probe::Vacant(_) => None,
        }
    }

    /// Looks `key` up once: its fingerprint when remembered, else the place it would be
    /// remembered at ([`Vacant::insert`]). Makes room first, so the place stays valid;
    /// the table may thus grow by one id's worth even when `key` is found.
    pub(super) fn entry(&mut self, key: IdKey) -> Result<u64, Vacant<'_>> {
        if key == NIL {
            return match self.nil {
                Some(remembered) => Ok(remembered),
                None => Err(Vacant {
                    table: self,
                    key,
                    index: None,
                }),
            };
        }
        if (self.len + 1) * MAX_LOAD_DENOMINATOR > self.slots.len() * MAX_LOAD_NUMERATOR {
            self.grow();
        }
        match self.find(key) {
            Probe::Found(index) => Ok(self.slots[index][FINGERPRINT]),
            Probe::Vacant(index) => Err(Vacant {
                table: self,
                key,
                index: Some(index),
            }),
        }
    }

    /// Remembers `key` with `fingerprint` unless it is remembered already; returns the
    /// fingerprint it already had, else `None`.
    #[cfg(test)]
    fn insert_if_absent(&mut self, key: IdKey, fingerprint: u64) -> Option<u64> {
        match self.entry(key) {
            Ok(remembered) => Some(remembered),
            Err(vacant) => {
                vacant.insert(fingerprint);
                None
            }
        }
    }

    /// Forgets `key`; returns whether it was remembered. The slots after it that were
    /// displaced past the freed slot move back, so every probe sequence stays unbroken.
    pub(super) fn remove(&mut self, key: IdKey) -> bool {
        if key == NIL {
            return self.nil.take().is_some();
        }
        if self.len == 0 {
            return false;
        }
        let Probe::Found(mut hole) = self.find(key) else {
            return false;
        };
        let mask = self.slots.len() - 1;
        let mut next = hole;
        loop {
            next = (next + 1) & mask;
            let slot = self.slots[next];
            if is_empty(&slot) {
                break;
            }
            let home = self.home(key_of(&slot));
            // The slot may fill the hole when the hole lies on its probe path, i.e.
            // when its home is no later than the hole (cyclically, seen from `next`).
            if next.wrapping_sub(home) & mask >= next.wrapping_sub(hole) & mask {
                self.slots[hole] = slot;
                hole = next;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        true
    }

    fn grow(&mut self) {
        let new_len = (self.slots.len() * 2).max(MIN_SLOTS);
        // Written, not `vec![EMPTY; n]` (which would get lazily zeroed pages; see the
        // module docs).
        let mut slots = Vec::with_capacity(new_len);
        slots.resize(new_len, EMPTY);
        let old = std::mem::replace(&mut self.slots, slots);
        let mask = new_len - 1;
        for slot in old.into_iter().filter(|slot| !is_empty(slot)) {
            let mut index = self.home(key_of(&slot));
            while !is_empty(&self.slots[index]) {
                index = (index + 1) & mask;
            }
            self.slots[index] = slot;
        }
    }
}

/// Where [`IdTable::entry`] found an id missing: remembering it there needs no second
/// search.
#[derive(Debug)]
pub(super) struct Vacant<'a> {
    table: &'a mut IdTable,
    key: IdKey,
    /// The empty slot ending the key's probe sequence; `None` for the nil id.
    index: Option<usize>,
}

impl Vacant<'_> {
    /// Remembers the id with `fingerprint`; returns the id.
    pub(super) fn insert(self, fingerprint: u64) -> IdKey {
        let Vacant { table, key, index } = self;
        match index {
            Some(index) => {
                table.slots[index] = [key.0, key.1, fingerprint];
                table.len += 1;
            }
            None => table.nil = Some(fingerprint),
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u64),
        Remove(u8),
        Get(u8),
        /// An [`IdTable::entry`] whose vacant place is dropped, not filled.
        Probe(u8),
    }

    /// Keys from a small set (the nil id among them), and ids that share their low or
    /// high half, so probe sequences collide, wrap around and shift back often.
    fn key(small: u8) -> IdKey {
        (u64::from(small % 7), u64::from(small))
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), any::<u64>()).prop_map(|(k, f)| Op::Insert(k, f)),
            any::<u8>().prop_map(Op::Remove),
            any::<u8>().prop_map(Op::Get),
            any::<u8>().prop_map(Op::Probe),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// The table behaves as a map from id to fingerprint under any sequence of
        /// insertions, removals, lookups and abandoned probes, across growth.
        #[test]
        fn behaves_as_a_map(ops in prop::collection::vec(op(), 0..600)) {
            let mut table = IdTable::default();
            let mut model: HashMap<IdKey, u64> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, f) => {
                        let had = model.get(&key(k)).copied();
                        if had.is_none() {
                            model.insert(key(k), f);
                        }
                        prop_assert_eq!(table.insert_if_absent(key(k), f), had);
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(table.remove(key(k)), model.remove(&key(k)).is_some());
                    }
                    Op::Get(k) => prop_assert_eq!(table.get(key(k)), model.get(&key(k)).copied()),
                    Op::Probe(k) => {
                        let found = table.entry(key(k)).ok();
                        prop_assert_eq!(found, model.get(&key(k)).copied());
                    }
                }
                prop_assert_eq!(table.len(), model.len());
            }
            for k in 0..=u8::MAX {
                prop_assert_eq!(table.get(key(k)), model.get(&key(k)).copied());
            }
            let copy = table.clone();
            for k in 0..=u8::MAX {
                prop_assert_eq!(copy.get(key(k)), model.get(&key(k)).copied());
            }
        }
    }

    #[test]
    fn a_full_cycle_of_many_ids_leaves_an_empty_table() {
        let mut table = IdTable::default();
        let ids: Vec<IdKey> = (0..100_000u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i))
            .collect();
        for &id in &ids {
            assert_eq!(table.insert_if_absent(id, id.1), None);
        }
        assert_eq!(table.len(), ids.len());
        assert!(table.slots.len() * MAX_LOAD_NUMERATOR >= ids.len() * MAX_LOAD_DENOMINATOR);
        for &id in ids.iter().step_by(2) {
            assert!(table.remove(id));
        }
        for (index, &id) in ids.iter().enumerate() {
            assert_eq!(table.get(id).is_some(), index % 2 == 1);
        }
        for &id in ids.iter().skip(1).step_by(2) {
            assert!(table.remove(id));
        }
        assert_eq!(table.len(), 0);
        assert!(table.slots.iter().all(is_empty));
    }
}
