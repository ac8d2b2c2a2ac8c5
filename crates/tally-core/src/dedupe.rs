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
//! - **Memory.** Each id costs one 24-byte slot of a flat open-addressing table
//!   ([`table`]: 16-byte id as two `u64` halves + 8-byte fingerprint) at a load factor
//!   between 5/16 and 5/8, and 16 bytes in the expiry queue (a `Vec` per window end,
//!   amortised up to 2×): between about 54 and 109 bytes per id depending on where the
//!   table is in its growth cycle. The window end is not stored per id: the queue an
//!   id sits in says it. [`DedupeSet::approx_bytes`] computes this from the actual
//!   capacities. Measured (`TALLY_MEMORY_FULL=1 cargo test -p tally-core --release
//!   --test pipeline_props -- --nocapture --test-threads=1 memory_per`, 1 000 000
//!   random ids, 1 000 per window): see the README's state-size figures. Sizing:
//!   memory ≈ events/s × (dedupe horizon + window) × ~70 bytes; e.g. 10 000 events/s
//!   with a 1-hour horizon ≈ 2.6 GB across the partitions carrying it.
//! - **Speed.** At a busy partition's steady state the table is far larger than the
//!   caches, so what a lookup costs is the wait for its slot's cache line. The table
//!   keeps an id and its fingerprint in one line, [`DedupeSet::prefetch`] lets the
//!   caller ask for that line records ahead of the lookup (the aggregator's loops do),
//!   and `expire` prefetches ahead of its removals. `probe` looks an id up once: the
//!   partition state probes first and remembers a new id only once the event is
//!   counted, into the slot the probe found, without hashing or searching again.
//!   `expire` does nothing until the watermark reaches the first queued window's
//!   expiry, then removes exactly the ids that expire.

mod table;

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::mem::size_of;

use crate::codec::UsageEventRef;
use crate::event::{EventId, TokenCounts, UsageEvent};
use table::{IdKey, IdTable, Vacant};

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

fn id_key(id: EventId) -> IdKey {
    ((id.0 >> 64) as u64, id.0 as u64)
}

/// Ids ahead of the one being removed whose slots `expire` prefetches.
const EXPIRE_PREFETCH_AHEAD: usize = 8;

/// What [`DedupeSet::probe`] found.
#[derive(Debug)]
pub enum Probe<'a> {
    /// The id is remembered: [`Claim::Duplicate`] or [`Claim::ConflictingDuplicate`].
    Remembered(Claim),
    /// The id is not remembered.
    New(NewId<'a>),
}

/// A new id found by [`DedupeSet::probe`], with the table slot it would take.
#[derive(Debug)]
pub struct NewId<'a> {
    slot: Vacant<'a>,
    fingerprint: u64,
    expiry: &'a mut Expiry,
}

impl NewId<'_> {
    /// Remembers the id with its fingerprint, until `window_end_ms + horizon` is
    /// reached by the watermark.
    pub fn remember(self, window_end_ms: i64) {
        let key = self.slot.insert(self.fingerprint);
        self.expiry.push(key, window_end_ms);
    }
}

/// The remembered ids by the end of their window, for expiry in window order.
#[derive(Debug, Clone)]
struct Expiry {
    horizon_ms: i64,
    /// Invariant: an id is in [`DedupeSet`]'s table exactly when it is in one of these
    /// queues, under the window end it was claimed with (ids enter both in `remember`
    /// and leave both in `expire`). In increasing window-end order, one queue per end;
    /// almost every id joins the newest, which `push` tries first.
    queues: VecDeque<(i64, Vec<IdKey>)>,
    /// `first window end + horizon`: the smallest watermark at which `expire` forgets
    /// anything (`i64::MAX` when nothing is remembered).
    next_expiry_ms: i64,
    /// The capacity a queue for a newer window end than any queued starts with: a
    /// quarter more than the last expired queue held, so a window's queue is not
    /// reallocated on its way up. A queue for an older window end (a late first id)
    /// starts empty.
    queue_hint: usize,
}

impl Expiry {
    fn new(horizon_ms: i64) -> Expiry {
        Expiry {
            horizon_ms,
            queues: VecDeque::new(),
            next_expiry_ms: i64::MAX,
            queue_hint: 0,
        }
    }

    fn push(&mut self, key: IdKey, window_end_ms: i64) {
        if let Some((end_ms, queue)) = self.queues.back_mut()
            && *end_ms == window_end_ms
        {
            queue.push(key);
        } else {
            match self
                .queues
                .binary_search_by_key(&window_end_ms, |(end_ms, _)| *end_ms)
            {
                Ok(index) => self.queues[index].1.push(key),
                Err(index) => {
                    let newest = index == self.queues.len();
                    let capacity = if newest { self.queue_hint } else { 0 };
                    let mut queue = Vec::with_capacity(capacity);
                    queue.push(key);
                    self.queues.insert(index, (window_end_ms, queue));
                }
            }
        }
        self.next_expiry_ms = self
            .next_expiry_ms
            .min(window_end_ms.saturating_add(self.horizon_ms));
    }
}

/// An exact set of event ids expiring by watermark.
#[derive(Debug, Clone)]
pub struct DedupeSet {
    /// Remembered id → payload fingerprint.
    ids: IdTable,
    /// Ids by the end of their window.
    expiry: Expiry,
}

impl DedupeSet {
    /// An empty set forgetting ids `horizon_ms` after their window ends (in watermark time).
    pub fn new(horizon_ms: i64) -> DedupeSet {
        DedupeSet {
            ids: IdTable::default(),
            expiry: Expiry::new(horizon_ms),
        }
    }

    /// The horizon, ms.
    pub fn horizon_ms(&self) -> i64 {
        self.expiry.horizon_ms
    }

    /// Asks the CPU to fetch the memory a lookup of `id` will read first. A hint: no
    /// effect on the set. Worth calling well before the lookup, when other work comes
    /// in between.
    #[inline]
    pub fn prefetch(&self, id: EventId) {
        self.ids.prefetch(id_key(id));
    }

    /// Looks `id` up without remembering it.
    pub fn lookup(&self, id: EventId, fingerprint: u64) -> Claim {
        match self.ids.get(id_key(id)) {
            None => Claim::New,
            Some(remembered) if remembered == fingerprint => Claim::Duplicate,
            Some(_) => Claim::ConflictingDuplicate,
        }
    }

    /// Looks `id` up and, when new, remembers it with its window end and fingerprint.
    pub fn claim(&mut self, id: EventId, window_end_ms: i64, fingerprint: u64) -> Claim {
        match self.probe(id, fingerprint) {
            Probe::Remembered(claim) => claim,
            Probe::New(new) => {
                new.remember(window_end_ms);
                Claim::New
            }
        }
    }

    /// Looks `id` up once; a new id is remembered only if [`NewId::remember`] is called
    /// (dropping the [`NewId`] leaves the set as it was).
    pub fn probe(&mut self, id: EventId, fingerprint: u64) -> Probe<'_> {
        match self.ids.entry(id_key(id)) {
            Ok(remembered) if remembered == fingerprint => Probe::Remembered(Claim::Duplicate),
            Ok(_) => Probe::Remembered(Claim::ConflictingDuplicate),
            Err(slot) => Probe::New(NewId {
                slot,
                fingerprint,
                expiry: &mut self.expiry,
            }),
        }
    }

    /// Forgets every id whose window ended at least `horizon` before `watermark_ms`
    /// (`window_end + horizon ≤ watermark`). Returns how many were forgotten. O(1)
    /// unless a window's ids expire, then O(ids forgotten).
    pub fn expire(&mut self, watermark_ms: i64) -> usize {
        let expiry = &mut self.expiry;
        if watermark_ms < expiry.next_expiry_ms {
            return 0;
        }
        let mut forgotten = 0;
        while let Some(&(end_ms, _)) = expiry.queues.front() {
            let expires_at_ms = end_ms.saturating_add(expiry.horizon_ms);
            if expires_at_ms > watermark_ms {
                expiry.next_expiry_ms = expires_at_ms;
                return forgotten;
            }
            let Some((_, queue)) = expiry.queues.pop_front() else {
                break;
            };
            expiry.queue_hint = queue.len().saturating_add(queue.len() / 4);
            for (index, key) in queue.iter().enumerate() {
                if let Some(ahead) = queue.get(index + EXPIRE_PREFETCH_AHEAD) {
                    self.ids.prefetch(*ahead);
                }
                // Always present (see the invariant on `Expiry::queues`).
                if self.ids.remove(*key) {
                    forgotten += 1;
                }
            }
        }
        expiry.next_expiry_ms = i64::MAX;
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

    /// Estimated heap bytes, from the capacities actually allocated: table slots,
    /// expiry vectors, and the queue list.
    pub fn approx_bytes(&self) -> usize {
        let map_bytes = self.ids.heap_bytes();
        let queue_bytes: usize = self
            .expiry
            .queues
            .iter()
            .map(|(_, ids)| ids.capacity() * size_of::<IdKey>())
            .sum();
        let list_bytes = self.expiry.queues.capacity() * size_of::<(i64, Vec<IdKey>)>();
        map_bytes + queue_bytes + list_bytes
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

/// A 64-bit fingerprint of an event's payload (every field): foldhash (quality variant,
/// fixed seed) over a length-prefixed encoding of the fields, attributes in key order.
/// Two copies of an event with the same content have the same fingerprint whatever
/// schema version carried them and in whatever order their attributes were written.
///
/// Deterministic for a given build (no random seed), so every process of one release
/// decides alike; *not* stable across releases (the hash function may change with the
/// `foldhash` version). That is enough: fingerprints are never persisted or exchanged,
/// because dedupe state is always rebuilt from the input by the binary that uses it.
pub fn payload_fingerprint(event: &UsageEvent) -> u64 {
    let fields = PayloadFields {
        event_id: event.event_id,
        request_id: &event.request_id,
        occurred_at_ms: event.occurred_at_ms,
        tenant_id: &event.tenant_id,
        model: &event.model,
        cloud: event.cloud.as_str(),
        channel_partner: event.channel_partner.as_deref(),
        region: &event.region,
        tokens: event.tokens,
        status: event.status.as_str(),
        service_tier: event.service_tier.as_deref(),
    };
    // A `BTreeMap`: already in key order, keys unique.
    fields.fingerprint(
        event.attributes.len(),
        event
            .attributes
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str())),
    )
}

/// [`payload_fingerprint`] of a borrowed event: equal to the fingerprint of its owned
/// form ([`UsageEventRef::to_event`]), without allocating when the wire attributes are
/// in strictly increasing key order (as [`crate::codec`] writes them).
pub fn payload_fingerprint_ref(event: &UsageEventRef<'_>) -> u64 {
    let fields = PayloadFields {
        event_id: event.event_id,
        request_id: event.request_id,
        occurred_at_ms: event.occurred_at_ms,
        tenant_id: event.tenant_id,
        model: event.model,
        cloud: event.cloud.as_str(),
        channel_partner: event.channel_partner,
        region: event.region,
        tokens: event.tokens,
        status: event.status.as_str(),
        service_tier: event.service_tier,
    };
    let attributes = event.attributes;
    let mut previous: Option<&str> = None;
    let in_key_order = attributes.iter().all(|(key, _)| {
        let increasing = previous.is_none_or(|previous| previous < key);
        previous = Some(key);
        increasing
    });
    if in_key_order {
        return fields.fingerprint(attributes.len(), attributes.iter());
    }
    // As `to_map` would have it: sorted by key, the last value of a repeated key wins.
    let mut entries: Vec<(&str, &str)> = attributes.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut unique: Vec<(&str, &str)> = Vec::with_capacity(entries.len());
    for entry in entries {
        match unique.last_mut() {
            Some(last) if last.0 == entry.0 => *last = entry,
            _ => unique.push(entry),
        }
    }
    fields.fingerprint(unique.len(), unique.into_iter())
}

/// The fields of an event that its fingerprint covers, borrowed from either form.
struct PayloadFields<'a> {
    event_id: EventId,
    request_id: &'a str,
    occurred_at_ms: i64,
    tenant_id: &'a str,
    model: &'a str,
    cloud: &'a str,
    channel_partner: Option<&'a str>,
    region: &'a str,
    tokens: TokenCounts,
    status: &'a str,
    service_tier: Option<&'a str>,
}

impl<'a> PayloadFields<'a> {
    /// `attributes` must be in strictly increasing key order and `attribute_count` long.
    fn fingerprint(
        &self,
        attribute_count: usize,
        attributes: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> u64 {
        let mut hash = Fingerprinter(foldhash::quality::FixedState::default().build_hasher());
        hash.0.write_u128(self.event_id.0);
        hash.str(self.request_id);
        hash.0.write_i64(self.occurred_at_ms);
        hash.str(self.tenant_id);
        hash.str(self.model);
        hash.str(self.cloud);
        hash.optional_str(self.channel_partner);
        hash.str(self.region);
        hash.0.write_u64(self.tokens.input);
        hash.0.write_u64(self.tokens.cached_input);
        hash.0.write_u64(self.tokens.output);
        hash.0.write_u64(self.tokens.reasoning);
        hash.str(self.status);
        hash.0.write_u64(attribute_count as u64);
        for (key, value) in attributes {
            hash.str(key);
            hash.str(value);
        }
        hash.optional_str(self.service_tier);
        hash.0.finish()
    }
}

/// Length-prefixed writes, so that field boundaries are part of what is hashed.
struct Fingerprinter(foldhash::quality::FoldHasher<'static>);

impl Fingerprinter {
    fn str(&mut self, text: &str) {
        self.0.write_u64(text.len() as u64);
        self.0.write(text.as_bytes());
    }

    fn optional_str(&mut self, text: Option<&str>) {
        match text {
            None => self.0.write_u8(0),
            Some(text) => {
                self.0.write_u8(1);
                self.str(text);
            }
        }
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
        assert_eq!(set.approx_bytes() > 0, set.ids.heap_bytes() > 0);
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

    fn event_with_attributes() -> UsageEvent {
        UsageEvent {
            event_id: EventId(0x0123_4567_89ab_4def_8123_4567_89ab_cdef),
            request_id: "req-1".to_owned(),
            occurred_at_ms: 1_735_689_600_000,
            tenant_id: "tenant-1".to_owned(),
            model: "atlas-large".to_owned(),
            cloud: crate::event::Cloud::Aws,
            channel_partner: Some("partner".to_owned()),
            region: "us-east-1".to_owned(),
            tokens: TokenCounts {
                input: 10,
                cached_input: 1,
                output: 5,
                reasoning: 2,
            },
            status: crate::event::RequestStatus::Succeeded,
            attributes: [("a", "1"), ("b", "2")]
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
            service_tier: None,
        }
    }

    fn encoded(event: &UsageEvent) -> Vec<u8> {
        let mut bytes = Vec::new();
        crate::codec::encode_usage_event(event, crate::codec::SchemaId::UsageEventV1, &mut bytes);
        bytes
    }

    /// `bytes` with the encoded attribute map `{a: 1, b: 2}` replaced by `map`.
    fn with_wire_map(bytes: &[u8], map: &[u8]) -> Vec<u8> {
        let sorted = [4, 2, b'a', 2, b'1', 2, b'b', 2, b'2', 0];
        let at = bytes
            .windows(sorted.len())
            .position(|window| window == sorted)
            .expect("the sorted map is in the encoding");
        [&bytes[..at], map, &bytes[at + sorted.len()..]].concat()
    }

    fn borrowed_fingerprint(bytes: &[u8]) -> (u64, UsageEvent) {
        match crate::codec::decode_record_ref(bytes).expect("decodes") {
            crate::codec::DecodedRef::Usage(event) => {
                (payload_fingerprint_ref(&event), event.to_event())
            }
            crate::codec::DecodedRef::Tick(_) => panic!("not a tick"),
        }
    }

    #[test]
    fn borrowed_fingerprint_equals_owned_whatever_the_wire_attribute_order() {
        let event = event_with_attributes();
        let sorted = encoded(&event);
        let unsorted = with_wire_map(&sorted, &[4, 2, b'b', 2, b'2', 2, b'a', 2, b'1', 0]);
        // `b` repeated: the last value wins, as in the owned map.
        let repeated = with_wire_map(
            &sorted,
            &[6, 2, b'b', 2, b'x', 2, b'a', 2, b'1', 2, b'b', 2, b'2', 0],
        );
        for bytes in [&sorted, &unsorted, &repeated] {
            let (fingerprint, owned) = borrowed_fingerprint(bytes);
            assert_eq!(owned, event);
            assert_eq!(fingerprint, payload_fingerprint(&event));
        }
        // A different last value is a different payload.
        let other = with_wire_map(
            &sorted,
            &[6, 2, b'b', 2, b'2', 2, b'a', 2, b'1', 2, b'b', 2, b'x', 0],
        );
        assert_ne!(borrowed_fingerprint(&other).0, payload_fingerprint(&event));
    }

    #[test]
    fn fingerprint_changes_with_every_field_and_with_field_boundaries() {
        let base = event_with_attributes();
        let print = payload_fingerprint(&base);
        assert_eq!(print, payload_fingerprint(&base.clone()));
        let variants: &[fn(&mut UsageEvent)] = &[
            |e| e.event_id = EventId(e.event_id.0 ^ 1),
            |e| e.request_id.push('x'),
            |e| e.occurred_at_ms += 1,
            |e| e.tenant_id.push('x'),
            |e| e.model.push('x'),
            |e| e.cloud = crate::event::Cloud::Gcp,
            |e| e.channel_partner = None,
            |e| e.region.push('x'),
            |e| e.tokens.input += 1,
            |e| e.tokens.cached_input += 1,
            |e| e.tokens.output += 1,
            |e| e.tokens.reasoning += 1,
            |e| e.status = crate::event::RequestStatus::Failed,
            |e| {
                e.attributes.insert("c".to_owned(), String::new());
            },
            |e| e.service_tier = Some(String::new()),
            // The same bytes split differently between two adjacent fields.
            |e| {
                e.tenant_id = "tenant-1a".to_owned();
                e.model = "tlas-large".to_owned();
            },
        ];
        for (index, change) in variants.iter().enumerate() {
            let mut event = base.clone();
            change(&mut event);
            assert_ne!(payload_fingerprint(&event), print, "variant {index}");
        }
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
