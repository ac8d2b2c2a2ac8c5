//! The exact dedupe set: which event ids a partition has already counted.
//!
//! Decisions written down here:
//! - **Exact.** Every remembered id is stored in full (16 bytes); there is no
//!   probabilistic structure, because a Bloom filter's false positive would drop
//!   billable usage.
//! - **First occurrence wins.** An id is remembered with a 64-bit fingerprint of its
//!   payload ([`payload_fingerprint`]); a later copy with the same fingerprint is a
//!   duplicate, one with a different fingerprint a conflicting duplicate. Neither is
//!   counted. A fingerprint collision can only turn a conflicting duplicate into a
//!   plain duplicate (both uncounted), never lose usage.
//! - **Expiry by watermark only.** An id is remembered with the end of its event time's
//!   window and forgotten once `window_end + dedupe_horizon ≤ watermark` — never by
//!   count or wall clock. With `dedupe_horizon ≥ allowed_lateness + correction_horizon`
//!   an exact copy of a remembered event is always either found here or too late (its
//!   window, the same as the original's, has then passed the correction horizon), so a
//!   copy is never counted twice. A conflicting copy with a *different* event time is
//!   recognised while the original's id is remembered.
//! - **Memory.** Each id costs one hash-map slot (16-byte id + 8-byte window end +
//!   8-byte fingerprint = 32 bytes, plus one control byte, at a load factor between
//!   7/16 and 7/8) and 16 bytes in the expiry queue (a `Vec` per window end, amortised
//!   up to 2×): between about 54 and 107 bytes per id depending on where the table is
//!   in its growth cycle. [`DedupeSet::approx_bytes`] computes this from the actual
//!   capacities. Measured (`cargo test -p tally-core --test pipeline_props -- --ignored
//!   --nocapture --test-threads=1 memory_per`, 1 000 000 random ids, 1 000 per window):
//!   approx_bytes = 85.6 bytes/id, resident set growth = 86.3 bytes/id. Sizing:
//!   memory ≈ events/s × (dedupe horizon + window) × ~90 bytes; e.g. 10 000 events/s
//!   with a 1-hour horizon ≈ 3.3 GB across the partitions carrying it.

use std::collections::{BTreeMap, HashMap};
use std::mem::size_of;

use crate::event::{EventId, UsageEvent};

/// What the set says about an event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Claim {
    /// Not remembered: the event is new (and is now remembered, for [`DedupeSet::claim`]).
    New,
    /// Remembered with the same payload fingerprint: a duplicate.
    Duplicate,
    /// Remembered with a different payload fingerprint: a conflicting duplicate.
    ConflictingDuplicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Remembered {
    window_end_ms: i64,
    fingerprint: u64,
}

/// An exact set of event ids expiring by watermark.
#[derive(Debug)]
pub struct DedupeSet {
    horizon_ms: i64,
    ids: HashMap<u128, Remembered>,
    /// Ids by the end of their window, for expiry in window order.
    expiry: BTreeMap<i64, Vec<u128>>,
}

/// `clone_from` reuses the id table's allocation: the aggregator snapshots its state at
/// every commit, and a fresh table of millions of ids (larger than malloc's mmap
/// threshold) costs a page fault per 4 KiB on top of the copy.
impl Clone for DedupeSet {
    fn clone(&self) -> DedupeSet {
        DedupeSet {
            horizon_ms: self.horizon_ms,
            ids: self.ids.clone(),
            expiry: self.expiry.clone(),
        }
    }

    fn clone_from(&mut self, source: &DedupeSet) {
        let DedupeSet {
            horizon_ms,
            ids,
            expiry,
        } = source;
        self.horizon_ms = *horizon_ms;
        self.ids.clone_from(ids);
        self.expiry.clone_from(expiry);
    }
}

impl DedupeSet {
    /// An empty set forgetting ids `horizon_ms` after their window ends (in watermark time).
    pub fn new(horizon_ms: i64) -> DedupeSet {
        DedupeSet {
            horizon_ms,
            ids: HashMap::new(),
            expiry: BTreeMap::new(),
        }
    }

    /// The horizon, ms.
    pub fn horizon_ms(&self) -> i64 {
        self.horizon_ms
    }

    /// Looks `id` up without remembering it.
    pub fn lookup(&self, id: EventId, fingerprint: u64) -> Claim {
        match self.ids.get(&id.0) {
            None => Claim::New,
            Some(remembered) if remembered.fingerprint == fingerprint => Claim::Duplicate,
            Some(_) => Claim::ConflictingDuplicate,
        }
    }

    /// Looks `id` up and, when new, remembers it with its window end and fingerprint.
    pub fn claim(&mut self, id: EventId, window_end_ms: i64, fingerprint: u64) -> Claim {
        let claim = self.lookup(id, fingerprint);
        if claim == Claim::New {
            self.ids.insert(
                id.0,
                Remembered {
                    window_end_ms,
                    fingerprint,
                },
            );
            self.expiry.entry(window_end_ms).or_default().push(id.0);
        }
        claim
    }

    /// Forgets every id whose window ended at least `horizon` before `watermark_ms`
    /// (`window_end + horizon ≤ watermark`). Returns how many were forgotten.
    pub fn expire(&mut self, watermark_ms: i64) -> usize {
        let mut forgotten = 0;
        while let Some(entry) = self.expiry.first_entry() {
            let window_end_ms = *entry.key();
            if window_end_ms.saturating_add(self.horizon_ms) > watermark_ms {
                break;
            }
            for id in entry.remove() {
                let matches = self
                    .ids
                    .get(&id)
                    .is_some_and(|remembered| remembered.window_end_ms == window_end_ms);
                if matches {
                    self.ids.remove(&id);
                    forgotten += 1;
                }
            }
        }
        forgotten
    }

    /// Number of remembered ids.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Estimated heap bytes, from the capacities actually allocated: hash-map buckets
    /// (slot + control byte each), expiry vectors, and B-tree entries.
    pub fn approx_bytes(&self) -> usize {
        let slot = size_of::<(u128, Remembered)>() + 1;
        let buckets = hash_buckets_for_capacity(self.ids.capacity());
        let map_bytes = buckets * slot;
        let queue_bytes: usize = self
            .expiry
            .values()
            .map(|ids| ids.capacity() * size_of::<u128>())
            .sum();
        // A B-tree entry costs its key and value plus about half again in node slack.
        let tree_bytes = self.expiry.len() * (size_of::<i64>() + size_of::<Vec<u128>>()) * 3 / 2;
        map_bytes + queue_bytes + tree_bytes
    }
}

/// Bucket count of a hashbrown table with `capacity` usable slots (7/8 load factor,
/// power-of-two buckets; small tables hold up to buckets − 1).
pub(crate) fn hash_buckets_for_capacity(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    if capacity < 8 {
        return (capacity + 1).next_power_of_two();
    }
    (capacity * 8 / 7).next_power_of_two()
}

/// A 64-bit fingerprint of an event's payload (every field), stable across releases and
/// platforms: FNV-1a over a length-prefixed encoding. Two copies of an event with the
/// same content have the same fingerprint whatever schema version carried them.
pub fn payload_fingerprint(event: &UsageEvent) -> u64 {
    let mut hash = Fnv1a::new();
    hash.bytes(&event.event_id.0.to_be_bytes());
    hash.str(&event.request_id);
    hash.bytes(&event.occurred_at_ms.to_be_bytes());
    hash.str(&event.tenant_id);
    hash.str(&event.model);
    hash.str(event.cloud.as_str());
    hash.optional_str(event.channel_partner.as_deref());
    hash.str(&event.region);
    hash.bytes(&event.tokens.input.to_be_bytes());
    hash.bytes(&event.tokens.cached_input.to_be_bytes());
    hash.bytes(&event.tokens.output.to_be_bytes());
    hash.bytes(&event.tokens.reasoning.to_be_bytes());
    hash.str(event.status.as_str());
    hash.bytes(&(event.attributes.len() as u64).to_be_bytes());
    for (key, value) in &event.attributes {
        hash.str(key);
        hash.str(value);
    }
    hash.optional_str(event.service_tier.as_deref());
    hash.finish()
}

struct Fnv1a(u64);

impl Fnv1a {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Fnv1a {
        Fnv1a(Self::OFFSET_BASIS)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    fn str(&mut self, text: &str) {
        self.bytes(&(text.len() as u64).to_be_bytes());
        self.bytes(text.as_bytes());
    }

    fn optional_str(&mut self, text: Option<&str>) {
        match text {
            None => self.bytes(&[0]),
            Some(text) => {
                self.bytes(&[1]);
                self.str(text);
            }
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_occurrence_wins_and_conflicts_are_told_apart() {
        let mut set = DedupeSet::new(60_000);
        assert_eq!(set.claim(EventId(1), 60_000, 11), Claim::New);
        assert_eq!(set.claim(EventId(1), 60_000, 11), Claim::Duplicate);
        assert_eq!(
            set.claim(EventId(1), 120_000, 12),
            Claim::ConflictingDuplicate
        );
        // The conflicting copy did not replace the original.
        assert_eq!(set.lookup(EventId(1), 11), Claim::Duplicate);
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn expires_only_when_window_end_plus_horizon_reaches_watermark() {
        let mut set = DedupeSet::new(60_000);
        set.claim(EventId(1), 60_000, 0);
        set.claim(EventId(2), 120_000, 0);
        assert_eq!(set.expire(119_999), 0);
        assert_eq!(set.expire(120_000), 1);
        assert_eq!(set.lookup(EventId(1), 0), Claim::New);
        assert_eq!(set.lookup(EventId(2), 0), Claim::Duplicate);
        assert_eq!(set.expire(180_000), 1);
        assert!(set.is_empty());
        assert_eq!(set.approx_bytes() > 0, set.ids.capacity() > 0);
    }

    #[test]
    fn clone_from_replaces_the_whole_set() {
        let mut source = DedupeSet::new(60_000);
        for id in 0..100u128 {
            source.claim(EventId(id), 60_000 * (1 + (id as i64 % 3)), id as u64);
        }
        let mut target = DedupeSet::new(5);
        for id in 50..500u128 {
            target.claim(EventId(id), 1_000, 0);
        }
        target.clone_from(&source);
        assert_eq!(target.horizon_ms(), 60_000);
        assert_eq!(target.len(), 100);
        assert_eq!(target.lookup(EventId(7), 7), Claim::Duplicate);
        assert_eq!(target.lookup(EventId(7), 8), Claim::ConflictingDuplicate);
        assert_eq!(target.lookup(EventId(300), 0), Claim::New);
        // Expiry follows the source's windows, not the target's old ones.
        assert_eq!(target.expire(120_000), source.clone().expire(120_000));
        assert_eq!(target.len(), source.len() - 34);
    }

    #[test]
    fn approx_bytes_grows_with_remembered_ids() {
        let mut set = DedupeSet::new(0);
        let empty = set.approx_bytes();
        for id in 0..1000u128 {
            set.claim(EventId(id), 60_000, 0);
        }
        let per_id = (set.approx_bytes() - empty) / 1000;
        assert!((48..=128).contains(&per_id), "{per_id} bytes per id");
    }
}
