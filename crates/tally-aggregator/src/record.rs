//! One input record through decode → validate → route → state machine, as a pure step.
//!
//! [`apply_record`] is the single place where an input record changes a
//! [`PartitionState`]. The live loop and the restore path both call it, so a state
//! rebuilt by re-reading `[low_water, committed)` is the state the live loop had at the
//! commit: same function, same records, same order. It returns what the loop must write
//! (nothing, a too-late copy, a rejected copy) as a plain [`RecordOutcome`]; the restore
//! path ignores the outcome, because those writes were committed with the offsets.
//!
//! The order of checks is DESIGN.md's: decode (undecodable → rejected) → validate
//! against the record's Kafka timestamp → routing (the key must be the event's tenant
//! and the partition must be `murmur2(key) mod partitions`) → the state machine's own
//! classification (rejected, too late, duplicate, counted). Ticks are checked against
//! the record's Kafka timestamp with the same bounds as an event's time
//! ([`validate_tick`]); outside them a tick is a rejected record (reason
//! `tick_time_out_of_bounds`, or `missing_timestamp`): it goes to usage.dlq, counts as
//! consumed and rejected, and does not move the watermark. Ticks skip routing: they
//! carry no tenant.

use sha2::{Digest, Sha256};
use tally_core::codec::{DecodedRef, decode_record_ref, peek_event_id};
use tally_core::contracts::Contracts;
use tally_core::dedupe::payload_fingerprint_ref;
use tally_core::partition::{Classified, PartitionState};
use tally_core::routing::partition_for_key;
use tally_core::validate::{ValidationLimits, validate_event_ref, validate_tick};

/// Reason label of a record whose key or partition does not match its tenant.
pub const MISROUTED: &str = "misrouted";
/// Reason label of records sent to the late topic.
pub const TOO_LATE: &str = "too_late";

/// Header names written on usage.dlq and usage.late records.
pub mod headers {
    /// Why the record was diverted (a stable, low-cardinality label).
    pub const REASON: &str = "tally.reason";
    /// The input topic.
    pub const SOURCE_TOPIC: &str = "tally.source.topic";
    /// The input partition, decimal.
    pub const SOURCE_PARTITION: &str = "tally.source.partition";
    /// The input offset, decimal.
    pub const SOURCE_OFFSET: &str = "tally.source.offset";
    /// Present when the value was truncated: sha256 of the full original value, hex.
    pub const ORIGINAL_SHA256: &str = "tally.original.sha256";
    /// Present when the value was truncated: length of the full original value, decimal.
    pub const ORIGINAL_BYTES: &str = "tally.original.bytes";
}

/// What the loop must do after a record was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    /// A usage event that was counted or dropped as a duplicate: nothing to write now.
    Absorbed,
    /// A tick: the watermark moved to at least its time.
    Tick,
    /// Too late even for a correction: write the original bytes to usage.late.
    TooLate,
    /// Rejected: write the original bytes to usage.dlq with this reason.
    Rejected {
        /// Stable reason label (DecodeError::reason, `misrouted`, or RejectReason::as_str).
        reason: &'static str,
    },
}

/// An input record as the loop sees it.
#[derive(Debug, Clone, Copy)]
pub struct InputRecord<'a> {
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
    /// Record key.
    pub key: Option<&'a [u8]>,
    /// Record value (empty when the record has none).
    pub value: &'a [u8],
    /// Kafka timestamp, ms, if the record has one.
    pub timestamp_ms: Option<i64>,
}

/// What every record is checked against.
#[derive(Debug, Clone, Copy)]
pub struct RecordRules<'a> {
    /// Price book and share rules.
    pub contracts: &'a Contracts,
    /// Plausibility bounds.
    pub limits: &'a ValidationLimits,
    /// Partition count of the input topic (for the routing check).
    pub partition_count: u32,
}

/// Feeds one record to its partition's state and says what to write for it.
pub fn apply_record(
    state: &mut PartitionState,
    rules: &RecordRules<'_>,
    record: &InputRecord<'_>,
) -> RecordOutcome {
    // Borrowed all the way: no string is copied unless the event opens a new pane.
    let event = match decode_record_ref(record.value) {
        Err(error) => {
            state.on_rejected_record();
            return RecordOutcome::Rejected {
                reason: error.reason(),
            };
        }
        Ok(DecodedRef::Tick(tick)) => {
            if let Err(error) = validate_tick(&tick, record.timestamp_ms, rules.limits) {
                state.on_rejected_record();
                return RecordOutcome::Rejected {
                    reason: error.reason(),
                };
            }
            state.on_tick(tick.tick_time_ms);
            return RecordOutcome::Tick;
        }
        Ok(DecodedRef::Usage(event)) => event,
    };
    if let Err(error) = validate_event_ref(&event, record.timestamp_ms, rules.limits) {
        state.on_rejected_record();
        return RecordOutcome::Rejected {
            reason: error.reason(),
        };
    }
    if !is_routed_correctly(record, event.tenant_id, rules.partition_count) {
        state.on_rejected_record();
        return RecordOutcome::Rejected { reason: MISROUTED };
    }
    let fingerprint = payload_fingerprint_ref(&event);
    match state.on_event_ref(record.offset, &event, fingerprint, rules.contracts) {
        Classified::Counted { .. } | Classified::Duplicate | Classified::ConflictingDuplicate => {
            RecordOutcome::Absorbed
        }
        Classified::TooLate => RecordOutcome::TooLate,
        Classified::Rejected(reason) => RecordOutcome::Rejected {
            reason: reason.as_str(),
        },
    }
}

/// How many records ahead of the one being applied the loops call
/// [`prefetch_record`]: far enough that the fetch completes while the records in
/// between are applied (about a microsecond each), near enough that the line is still
/// cached when its record comes.
pub const PREFETCH_AHEAD: usize = 8;

/// Starts fetching the memory that applying the record with `value` will wait for
/// (its event id's dedupe slot), without changing anything. The loops call it for the
/// record [`PREFETCH_AHEAD`] places ahead of the one they apply: at a busy partition's
/// steady state the dedupe table is far larger than the caches, and the wait for its
/// slot is the largest single cost of a record (`benches/hot_path.rs`).
#[inline]
pub fn prefetch_record(state: &PartitionState, value: &[u8]) {
    if let Some(event_id) = peek_event_id(value) {
        state.prefetch(event_id);
    }
}

fn is_routed_correctly(record: &InputRecord<'_>, tenant_id: &str, partition_count: u32) -> bool {
    let Some(key) = record.key else {
        return false;
    };
    if key != tenant_id.as_bytes() {
        return false;
    }
    u32::try_from(record.partition)
        .is_ok_and(|partition| partition_for_key(key, partition_count) == partition)
}

/// A diverted record's value and headers, ready to produce to usage.dlq or usage.late.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideRecord<'a> {
    /// The original value, or its first `max_value_bytes` bytes when it is larger.
    pub value: &'a [u8],
    /// `(name, value)` headers in write order.
    pub headers: Vec<(&'static str, String)>,
}

/// Builds the side-topic copy of `record`. A value longer than `max_value_bytes` is
/// truncated to that length, with its full length and sha256 in headers, so the
/// record still fits the side topic and the original can be matched later.
pub fn side_record<'a>(
    record: &InputRecord<'a>,
    source_topic: &str,
    reason: &'static str,
    max_value_bytes: usize,
) -> SideRecord<'a> {
    let mut headers = vec![
        (headers::REASON, reason.to_owned()),
        (headers::SOURCE_TOPIC, source_topic.to_owned()),
        (headers::SOURCE_PARTITION, record.partition.to_string()),
        (headers::SOURCE_OFFSET, record.offset.to_string()),
    ];
    let value = if record.value.len() > max_value_bytes {
        let digest = Sha256::digest(record.value);
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        headers.push((headers::ORIGINAL_SHA256, hex));
        headers.push((headers::ORIGINAL_BYTES, record.value.len().to_string()));
        &record.value[..max_value_bytes]
    } else {
        record.value
    };
    SideRecord { value, headers }
}

#[cfg(test)]
mod tests {
    use tally_core::codec::{SchemaId, encode_tick, encode_usage_event};
    use tally_core::event::{
        Cloud, EventId, RequestStatus, TickOrigin, TokenCounts, UsageEvent, UsageTick,
    };
    use tally_core::partition::PartitionParams;
    use tally_core::window::WindowSize;

    use super::*;

    const CONTRACTS: &str = r#"
[[price_book]]
version = "2025-01"
effective_from = "2025-01-01T00:00:00Z"
currency = "USD"
billable_statuses = ["succeeded"]

[price_book.models.atlas-large]
input = 2_500_000_000
cached_input = 1_250_000_000
output = 10_000_000_000
reasoning = 10_000_000_000

[[share_rules]]
version = "2025-01"
effective_from = "2025-01-01T00:00:00Z"
"#;
    const T0: i64 = 1_735_689_600_000;
    const PARTITIONS: u32 = 4;

    fn contracts() -> Contracts {
        Contracts::load(CONTRACTS, WindowSize::ONE_MINUTE).expect("test contracts load")
    }

    fn state(partition: i32) -> PartitionState {
        PartitionState::new(PartitionParams {
            window: WindowSize::ONE_MINUTE,
            max_out_of_orderness_ms: 1_000,
            allowed_lateness_ms: 1_000,
            correction_horizon_ms: 60_000,
            dedupe_horizon_ms: 120_000,
            source_topic: "usage.events".to_owned(),
            partition,
        })
        .expect("valid params")
    }

    fn event(id: u128, tenant: &str, occurred_at_ms: i64) -> UsageEvent {
        UsageEvent {
            event_id: EventId(id),
            request_id: format!("req-{id}"),
            occurred_at_ms,
            tenant_id: tenant.to_owned(),
            model: "atlas-large".to_owned(),
            cloud: Cloud::Aws,
            channel_partner: None,
            region: "us-east-1".to_owned(),
            tokens: TokenCounts {
                input: 10,
                cached_input: 0,
                output: 5,
                reasoning: 0,
            },
            status: RequestStatus::Succeeded,
            attributes: Default::default(),
            service_tier: None,
        }
    }

    fn encoded(event: &UsageEvent) -> Vec<u8> {
        let mut out = Vec::new();
        encode_usage_event(event, SchemaId::UsageEventV1, &mut out);
        out
    }

    fn home_partition(tenant: &str) -> i32 {
        i32::try_from(partition_for_key(tenant.as_bytes(), PARTITIONS)).expect("small")
    }

    fn apply(
        state: &mut PartitionState,
        offset: i64,
        key: &[u8],
        value: &[u8],
        ts: i64,
    ) -> RecordOutcome {
        let contracts = contracts();
        let limits = ValidationLimits::default();
        let rules = RecordRules {
            contracts: &contracts,
            limits: &limits,
            partition_count: PARTITIONS,
        };
        let record = InputRecord {
            partition: state.params().partition,
            offset,
            key: Some(key),
            value,
            timestamp_ms: Some(ts),
        };
        apply_record(state, &rules, &record)
    }

    #[test]
    fn counts_a_valid_routed_event_and_drops_its_duplicate() {
        let tenant = "tenant-00001";
        let mut state = state(home_partition(tenant));
        let bytes = encoded(&event(1, tenant, T0));
        assert_eq!(
            apply(&mut state, 0, tenant.as_bytes(), &bytes, T0),
            RecordOutcome::Absorbed
        );
        assert_eq!(
            apply(&mut state, 1, tenant.as_bytes(), &bytes, T0),
            RecordOutcome::Absorbed
        );
        let counters = state.counters();
        assert_eq!(
            (counters.consumed, counters.counted, counters.duplicates),
            (2, 1, 1)
        );
    }

    #[test]
    fn rejects_undecodable_invalid_and_misrouted_records_with_stable_reasons() {
        let tenant = "tenant-00001";
        let mut state = state(home_partition(tenant));
        assert_eq!(
            apply(&mut state, 0, tenant.as_bytes(), &[], T0),
            RecordOutcome::Rejected { reason: "empty" }
        );
        assert_eq!(
            apply(&mut state, 1, tenant.as_bytes(), &[7, 0, 0, 0, 1, 2], T0),
            RecordOutcome::Rejected {
                reason: "bad_magic"
            }
        );
        // Event time an hour ahead of the Kafka timestamp.
        let ahead = encoded(&event(2, tenant, T0 + 3_600_000));
        assert_eq!(
            apply(&mut state, 2, tenant.as_bytes(), &ahead, T0),
            RecordOutcome::Rejected {
                reason: "event_time_out_of_bounds"
            }
        );
        // Keyed by another tenant.
        let valid = encoded(&event(3, tenant, T0));
        assert_eq!(
            apply(&mut state, 3, b"tenant-00002", &valid, T0),
            RecordOutcome::Rejected { reason: MISROUTED }
        );
        let counters = state.counters();
        assert_eq!(
            (counters.consumed, counters.rejected, counters.counted),
            (4, 4, 0)
        );
        assert!(counters.is_conserved());
    }

    #[test]
    fn rejects_a_correctly_keyed_event_on_the_wrong_partition() {
        let tenant = "tenant-00001";
        let wrong = (home_partition(tenant) + 1) % 4;
        let mut state = state(wrong);
        let bytes = encoded(&event(1, tenant, T0));
        assert_eq!(
            apply(&mut state, 0, tenant.as_bytes(), &bytes, T0),
            RecordOutcome::Rejected { reason: MISROUTED }
        );
    }

    #[test]
    fn sends_events_behind_the_correction_horizon_to_late_and_reads_ticks() {
        let tenant = "tenant-00001";
        let mut state = state(home_partition(tenant));
        let mut tick = Vec::new();
        encode_tick(
            &UsageTick {
                tick_time_ms: T0 + 3_600_000,
                origin: TickOrigin::Gateway,
            },
            &mut tick,
        );
        assert_eq!(
            apply(&mut state, 0, b"", &tick, T0 + 3_600_000),
            RecordOutcome::Tick
        );
        let old = encoded(&event(5, tenant, T0));
        assert_eq!(
            apply(&mut state, 1, tenant.as_bytes(), &old, T0 + 3_600_000),
            RecordOutcome::TooLate
        );
        let counters = state.counters();
        assert_eq!(
            (counters.ticks, counters.too_late, counters.consumed),
            (1, 1, 1)
        );
    }

    fn tick_record(tick_time_ms: i64, origin: TickOrigin) -> Vec<u8> {
        let mut tick = Vec::new();
        encode_tick(
            &UsageTick {
                tick_time_ms,
                origin,
            },
            &mut tick,
        );
        tick
    }

    #[test]
    fn rejects_a_far_future_tick_without_moving_the_watermark() {
        let tenant = "tenant-00001";
        let mut state = state(home_partition(tenant));
        let first = encoded(&event(1, tenant, T0));
        assert_eq!(
            apply(&mut state, 0, tenant.as_bytes(), &first, T0),
            RecordOutcome::Absorbed
        );
        let watermark = state.watermark();
        // Ten years after its record timestamp.
        let ten_years_ms = 10 * 365 * 24 * 3_600_000_i64;
        let far = tick_record(T0 + ten_years_ms, TickOrigin::Gateway);
        assert_eq!(
            apply(&mut state, 1, b"", &far, T0),
            RecordOutcome::Rejected {
                reason: "tick_time_out_of_bounds"
            }
        );
        // One millisecond past the allowed skew is rejected too; at the skew it is a tick.
        let ahead = ValidationLimits::default().max_event_time_ahead_ms;
        let just_over = tick_record(T0 + ahead + 1, TickOrigin::Gateway);
        assert_eq!(
            apply(&mut state, 2, b"", &just_over, T0),
            RecordOutcome::Rejected {
                reason: "tick_time_out_of_bounds"
            }
        );
        assert_eq!(state.watermark(), watermark, "rejected ticks move nothing");
        // The next event of the same window is still counted, not too late.
        let second = encoded(&event(2, tenant, T0 + 1_000));
        assert_eq!(
            apply(&mut state, 3, tenant.as_bytes(), &second, T0 + 1_000),
            RecordOutcome::Absorbed
        );
        let at_skew = tick_record(T0 + 1_000 + ahead, TickOrigin::Gateway);
        assert_eq!(
            apply(&mut state, 4, b"", &at_skew, T0 + 1_000),
            RecordOutcome::Tick
        );
        let counters = state.counters();
        assert_eq!(
            (
                counters.consumed,
                counters.counted,
                counters.rejected,
                counters.ticks
            ),
            (4, 2, 2, 1)
        );
        assert!(counters.is_conserved());
    }

    #[test]
    fn a_tick_stamped_with_its_own_time_is_read() {
        // How the aggregator writes its ticks: record timestamp = tick time.
        let mut state = state(0);
        let time = T0 + 123_456;
        assert_eq!(
            apply(
                &mut state,
                0,
                b"",
                &tick_record(time, TickOrigin::Aggregator),
                time
            ),
            RecordOutcome::Tick
        );
        assert_eq!(state.watermark(), Some(time));
    }

    #[test]
    fn rejects_a_tick_without_a_timestamp() {
        let contracts = contracts();
        let limits = ValidationLimits::default();
        let rules = RecordRules {
            contracts: &contracts,
            limits: &limits,
            partition_count: PARTITIONS,
        };
        let value = tick_record(T0, TickOrigin::Gateway);
        let record = InputRecord {
            partition: 0,
            offset: 0,
            key: None,
            value: &value,
            timestamp_ms: None,
        };
        let mut state = state(0);
        assert_eq!(
            apply_record(&mut state, &rules, &record),
            RecordOutcome::Rejected {
                reason: "missing_timestamp"
            }
        );
        assert_eq!(state.watermark(), None);
    }

    #[test]
    fn rejects_a_dimension_over_its_limit_as_field_too_long() {
        let tenant = "tenant-00001";
        let mut state = state(home_partition(tenant));
        let limit = ValidationLimits::default().max_dimension_bytes;
        let mut at_limit = event(1, tenant, T0);
        at_limit.region = "r".repeat(limit);
        assert_eq!(
            apply(&mut state, 0, tenant.as_bytes(), &encoded(&at_limit), T0),
            RecordOutcome::Absorbed
        );
        let mut over = event(2, tenant, T0);
        over.region = "r".repeat(limit + 1);
        assert_eq!(
            apply(&mut state, 1, tenant.as_bytes(), &encoded(&over), T0),
            RecordOutcome::Rejected {
                reason: "field_too_long"
            }
        );
        let counters = state.counters();
        assert_eq!((counters.counted, counters.rejected), (1, 1));
    }

    #[test]
    fn truncates_oversized_side_records_and_keeps_their_digest() {
        let value = vec![0xab_u8; 100];
        let record = InputRecord {
            partition: 2,
            offset: 41,
            key: None,
            value: &value,
            timestamp_ms: None,
        };
        let fits = side_record(&record, "usage.events", "empty", 100);
        assert_eq!(fits.value.len(), 100);
        assert_eq!(fits.headers.len(), 4);
        assert!(
            fits.headers
                .contains(&(headers::SOURCE_OFFSET, "41".to_owned()))
        );
        assert!(
            fits.headers
                .contains(&(headers::SOURCE_PARTITION, "2".to_owned()))
        );

        let cut = side_record(&record, "usage.events", "malformed_datum", 10);
        assert_eq!(cut.value, &value[..10]);
        let digest = Sha256::digest(&value);
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        assert!(cut.headers.contains(&(headers::ORIGINAL_SHA256, hex)));
        assert!(
            cut.headers
                .contains(&(headers::ORIGINAL_BYTES, "100".to_owned()))
        );
        assert!(
            cut.headers
                .contains(&(headers::REASON, "malformed_datum".to_owned()))
        );
    }
}
