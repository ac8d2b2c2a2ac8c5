//! Deterministic synthetic traffic for `usage.events`, with its ground truth.
//!
//! The generator is pure: no Kafka, no clock, no I/O besides [`GroundTruth::write`]. It
//! yields [`GeneratedRecord`]s (key, value bytes, Kafka timestamp, partition, class) and
//! keeps, as it goes, the [`GroundTruth`] the pipeline must reproduce: how many records
//! are counted, duplicates, too late and rejected, and the token sums of every
//! (window, dims) the counted events fall into.
//!
//! # Determinism
//!
//! All randomness comes from one `ChaCha8Rng` seeded with [`GeneratorConfig::seed`]:
//! the same config gives the same records, byte for byte, on every run. Sampling uses
//! integer arithmetic only (an integer Zipf table for tenant volume, fixed-point
//! eighth-octave steps for log-normal-like token counts) so the bytes do not depend on
//! the platform's `libm` either. The first `n` records of a run, and the truth after
//! them, do not depend on [`GeneratorConfig::count`]; so a run stopped early still has
//! an exact truth ([`Generator::truth`]).
//!
//! # Clocks
//!
//! A simulated send clock starts at `start_time_ms` and advances by exactly
//! `1_000_000 / rate_per_sec` microseconds per record (computed as `i × 10⁶ / rate`,
//! so it never drifts). Each record's Kafka timestamp is its send time. A valid
//! event's time is never after its send time; lateness is the gap.
//!
//! # Classes, and how the generator keeps them exact
//!
//! The generator routes each record itself (`partition_for_key(key, partitions)`, the
//! producer's `murmur2_random`) and keeps, per partition, the largest event time of the
//! counted records so far `M_p`; the aggregator's watermark is `W_p = M_p − ooo`. It
//! places every record in a class using the aggregator's own parameters, always with a
//! margin of at least one window from any boundary, so the classification does not
//! depend on whether a boundary is inclusive:
//!
//! - **on time, in order**: event time = send time; the only class that advances `M_p`.
//! - **on time, out of order**: event time = `M_p − uniform(1, ooo/2)` ms, above `W_p`.
//! - **correction**: the window end `e` lies in the middle half of
//!   `[W_p − L − H + w, W_p − L − w]` (closed, inside the correction horizon). Needs
//!   `H ≥ 4w`; with a smaller horizon the class is disabled and its share is produced
//!   on time ([`GroundTruth::corrections_enabled`]).
//! - **too late**: `e ≤ W_p − L − H − 2w`, and event time at least an hour inside the
//!   7-day bound behind the Kafka timestamp (`ValidationLimits` default).
//! - **duplicate**: an exact re-send (same key, same bytes, new timestamp) of an
//!   earlier counted record of the same partition whose event time is still
//!   `≥ W_p − L − H/2`, picked from a bounded ring per partition. A share of them are
//!   **conflicting duplicates**: same `event_id`, different token counts. Both count
//!   as duplicates; the first occurrence wins.
//! - **rejected**: one of [`RejectKind`], keyed by the tenant (so it lands in that
//!   tenant's partition) except the misrouted kind, whose key is another tenant's id and
//!   whose partition is the one of that key.
//!
//! A class that cannot be placed for a record (a partition with no counted event yet,
//! an empty duplicate ring, a send clock too far ahead of the partition) falls back to
//! on time; the truth always records the class actually produced, and the identity
//! `produced = counted + duplicates + too_late + rejected` holds after every record.
//!
//! The generator writes no ticks. An aggregator's idle ticks in the middle of a run can
//! only move a watermark forward by the idle time; the one-window margins absorb ticks
//! smaller than a window.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tally_core::codec::{MAGIC_BYTE, SchemaId, encode_usage_event};
use tally_core::config::AggregatorConfig;
use tally_core::event::{Cloud, EventId, RequestStatus, TokenCounts, UsageEvent};
use tally_core::routing::partition_for_key;
use tally_core::validate::ValidationLimits;

/// Models the generator uses; the contracts price exactly these.
pub const MODELS: [&str; 4] = [
    "atlas-large",
    "atlas-mini",
    "atlas-reasoning",
    "atlas-embed",
];
/// Relative volume of each model in [`MODELS`].
const MODEL_WEIGHTS: [u32; 4] = [30, 45, 15, 10];

/// Clouds the generator uses (every known symbol; never `Cloud::Unknown` on valid events).
pub const CLOUDS: [Cloud; 5] = [
    Cloud::Openai,
    Cloud::Azure,
    Cloud::Aws,
    Cloud::Gcp,
    Cloud::Oracle,
];
/// Relative volume of each cloud in [`CLOUDS`].
const CLOUD_WEIGHTS: [u32; 5] = [40, 25, 20, 10, 5];

/// Channel partners the generator uses; most events have none.
pub const CHANNEL_PARTNERS: [&str; 3] = ["northwind", "contoso", "fabrikam"];
/// Relative volume of no partner, then each of [`CHANNEL_PARTNERS`].
const PARTNER_WEIGHTS: [u32; 4] = [85, 7, 5, 3];

/// Regions the generator uses, uniformly.
pub const REGIONS: [&str; 5] = [
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-southeast-2",
];

/// Request statuses the generator uses; most succeed.
pub const STATUSES: [RequestStatus; 3] = [
    RequestStatus::Succeeded,
    RequestStatus::Failed,
    RequestStatus::Cancelled,
];
/// Relative volume of each status in [`STATUSES`].
const STATUS_WEIGHTS: [u32; 3] = [94, 4, 2];

/// Gateways named in the `gateway` attribute.
const GATEWAYS: [&str; 4] = ["gw-1", "gw-2", "gw-3", "gw-4"];

/// Default start of the simulated clock: 2025-01-01T00:00:00Z. A fixed instant, never
/// `now()`, so a default run is reproducible.
pub const DEFAULT_START_TIME_MS: i64 = 1_735_689_600_000;

/// Counted records remembered per partition as duplicate candidates.
const DUPLICATE_RING_CAPACITY: usize = 64;
/// Attempts at finding an eligible duplicate candidate before falling back to on time.
const DUPLICATE_PICK_ATTEMPTS: u32 = 4;
/// Margin kept inside the 7-day event-time bound behind the Kafka timestamp.
const BEHIND_BOUND_MARGIN_MS: i64 = 3_600_000;
/// Spread of too-late event times below their upper bound.
const TOO_LATE_SPREAD_MS: i64 = 24 * 3_600_000;
/// Horizons (ooo + L + H + 4 windows) must leave this much of the 7-day bound free for
/// too-late events.
const TOO_LATE_ROOM_MS: i64 = 24 * 3_600_000;
/// Share of events that use their tenant's home cloud, partner and region, in percent.
const HOME_PROFILE_PERCENT: u32 = 90;
/// Share of (non-embedding) requests that hit the prompt cache, in percent.
const CACHE_HIT_PERCENT: u32 = 40;

const fn default_seed() -> u64 {
    42
}
const fn default_count() -> u64 {
    100_000
}
const fn default_start_time_ms() -> i64 {
    DEFAULT_START_TIME_MS
}
const fn default_rate_per_sec() -> u64 {
    1_000
}
const fn default_partitions() -> u32 {
    12
}
const fn default_tenants() -> u32 {
    200
}
/// The aggregator's default window ([`AggregatorConfig::default`]).
fn default_window_ms() -> i64 {
    AggregatorConfig::default().window_ms
}
/// The aggregator's default out-of-orderness ([`AggregatorConfig::default`]).
fn default_max_out_of_orderness_ms() -> i64 {
    AggregatorConfig::default().max_out_of_orderness_ms
}
/// The aggregator's default allowed lateness ([`AggregatorConfig::default`]).
fn default_allowed_lateness_ms() -> i64 {
    AggregatorConfig::default().allowed_lateness_ms
}
/// The aggregator's default correction horizon ([`AggregatorConfig::default`]).
fn default_correction_horizon_ms() -> i64 {
    AggregatorConfig::default().correction_horizon_ms
}
const fn default_schema_version() -> u8 {
    1
}

/// Shares of each record class. The share not given to a named class is on time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassFractions {
    /// Share of on-time events sent out of order (of the on-time class, not of all records).
    #[serde(default = "ClassFractions::default_out_of_order")]
    pub out_of_order: f64,
    /// Share of records that are corrections to closed windows.
    #[serde(default = "ClassFractions::default_correction")]
    pub correction: f64,
    /// Share of records that are too late (beyond the correction horizon).
    #[serde(default = "ClassFractions::default_too_late")]
    pub too_late: f64,
    /// Share of records that re-send an earlier counted event.
    #[serde(default = "ClassFractions::default_duplicate")]
    pub duplicate: f64,
    /// Share of duplicates that carry a different payload under the same `event_id`
    /// (of the duplicate class, not of all records).
    #[serde(default = "ClassFractions::default_conflicting_duplicate")]
    pub conflicting_duplicate: f64,
    /// Share of records that are malformed or invalid.
    #[serde(default = "ClassFractions::default_rejected")]
    pub rejected: f64,
}

impl ClassFractions {
    const fn default_out_of_order() -> f64 {
        0.10
    }
    const fn default_correction() -> f64 {
        0.03
    }
    const fn default_too_late() -> f64 {
        0.02
    }
    const fn default_duplicate() -> f64 {
        0.03
    }
    const fn default_conflicting_duplicate() -> f64 {
        0.10
    }
    const fn default_rejected() -> f64 {
        0.02
    }

    /// The share of records left to the on-time class.
    pub fn on_time(&self) -> f64 {
        1.0 - (self.correction + self.too_late + self.duplicate + self.rejected)
    }
}

impl Default for ClassFractions {
    fn default() -> Self {
        ClassFractions {
            out_of_order: Self::default_out_of_order(),
            correction: Self::default_correction(),
            too_late: Self::default_too_late(),
            duplicate: Self::default_duplicate(),
            conflicting_duplicate: Self::default_conflicting_duplicate(),
            rejected: Self::default_rejected(),
        }
    }
}

/// Everything that decides a generated run. Echoed in the ground truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Seed of the random stream.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Number of records to produce (all classes together).
    #[serde(default = "default_count")]
    pub count: u64,
    /// Simulated send time of the first record, UTC ms.
    #[serde(default = "default_start_time_ms")]
    pub start_time_ms: i64,
    /// Simulated records per second of send time.
    #[serde(default = "default_rate_per_sec")]
    pub rate_per_sec: u64,
    /// Partition count of the target topic (routing is murmur2(key) mod this).
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Number of tenants, named `tenant-00000` up.
    #[serde(default = "default_tenants")]
    pub tenants: u32,
    /// The aggregator's window size, ms.
    #[serde(default = "default_window_ms")]
    pub window_ms: i64,
    /// The aggregator's allowed out-of-orderness (watermark = max event time − this), ms.
    #[serde(default = "default_max_out_of_orderness_ms")]
    pub max_out_of_orderness_ms: i64,
    /// The aggregator's allowed lateness after a window end, ms.
    #[serde(default = "default_allowed_lateness_ms")]
    pub allowed_lateness_ms: i64,
    /// The aggregator's correction horizon, ms.
    #[serde(default = "default_correction_horizon_ms")]
    pub correction_horizon_ms: i64,
    /// Shares of the record classes.
    #[serde(default)]
    pub fractions: ClassFractions,
    /// UsageEvent writer schema version for valid events: 1 or 2.
    #[serde(default = "default_schema_version")]
    pub schema_version: u8,
}

impl Default for GeneratorConfig {
    /// Every field's default; the event-time parameters are
    /// [`AggregatorConfig::default`]'s.
    fn default() -> Self {
        GeneratorConfig::for_aggregator(&AggregatorConfig::default())
    }
}

impl GeneratorConfig {
    /// The default config with the event-time parameters (window, out-of-orderness,
    /// allowed lateness, correction horizon) of `aggregator`, so the truth is what an
    /// aggregator with that config must reproduce.
    pub fn for_aggregator(aggregator: &AggregatorConfig) -> GeneratorConfig {
        GeneratorConfig {
            seed: default_seed(),
            count: default_count(),
            start_time_ms: default_start_time_ms(),
            rate_per_sec: default_rate_per_sec(),
            partitions: default_partitions(),
            tenants: default_tenants(),
            window_ms: aggregator.window_ms,
            max_out_of_orderness_ms: aggregator.max_out_of_orderness_ms,
            allowed_lateness_ms: aggregator.allowed_lateness_ms,
            correction_horizon_ms: aggregator.correction_horizon_ms,
            fractions: ClassFractions::default(),
            schema_version: default_schema_version(),
        }
    }
}

/// Why a [`GeneratorConfig`] cannot be used. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GeneratorConfigError {
    /// A count or rate that must be positive is zero.
    #[error("{field} must be greater than zero")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// A duration that must not be negative is.
    #[error("{field} must not be negative, got {value}")]
    Negative {
        /// The field.
        field: &'static str,
        /// The value given.
        value: i64,
    },
    /// A fraction outside `[0, 1]` (or not a number).
    #[error("{field} must be within [0, 1], got {value}")]
    FractionOutOfRange {
        /// The field.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// The class fractions leave a negative share for on time.
    #[error("correction + too_late + duplicate + rejected fractions sum to {sum}, more than 1")]
    FractionsExceedOne {
        /// Their sum.
        sum: f64,
    },
    /// The window does not divide 15 minutes (the aggregator's rule).
    #[error("window_ms {window_ms} must be positive and divide 15 minutes (900000 ms)")]
    WindowDoesNotDivideQuarterHour {
        /// The value given.
        window_ms: i64,
    },
    /// The horizons leave no room for too-late events inside the 7-day validation bound.
    #[error(
        "max_out_of_orderness_ms + allowed_lateness_ms + correction_horizon_ms + 4 windows = {span_ms} ms \
         must stay under {limit_ms} ms (the 7-day event-time bound minus a day for too-late events)"
    )]
    HorizonsTooLong {
        /// The sum of the horizons and margins.
        span_ms: i64,
        /// The largest allowed sum.
        limit_ms: i64,
    },
    /// Only UsageEvent v1 and v2 exist.
    #[error("schema_version must be 1 or 2, got {value}")]
    UnsupportedSchemaVersion {
        /// The value given.
        value: u8,
    },
    /// The simulated clock would leave the representable range.
    #[error("start_time_ms + count / rate_per_sec overflows the simulated clock")]
    ClockOverflow,
}

impl GeneratorConfig {
    /// Checks every field and the relations between them.
    pub fn validate(&self) -> Result<(), GeneratorConfigError> {
        for (field, value) in [
            ("count", self.count),
            ("rate_per_sec", self.rate_per_sec),
            ("partitions", u64::from(self.partitions)),
            ("tenants", u64::from(self.tenants)),
        ] {
            if value == 0 {
                return Err(GeneratorConfigError::Zero { field });
            }
        }
        for (field, value) in [
            ("max_out_of_orderness_ms", self.max_out_of_orderness_ms),
            ("allowed_lateness_ms", self.allowed_lateness_ms),
            ("correction_horizon_ms", self.correction_horizon_ms),
        ] {
            if value < 0 {
                return Err(GeneratorConfigError::Negative { field, value });
            }
        }
        if self.window_ms <= 0 || 900_000 % self.window_ms != 0 {
            return Err(GeneratorConfigError::WindowDoesNotDivideQuarterHour {
                window_ms: self.window_ms,
            });
        }
        let fractions = &self.fractions;
        for (field, value) in [
            ("out_of_order", fractions.out_of_order),
            ("correction", fractions.correction),
            ("too_late", fractions.too_late),
            ("duplicate", fractions.duplicate),
            ("conflicting_duplicate", fractions.conflicting_duplicate),
            ("rejected", fractions.rejected),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(GeneratorConfigError::FractionOutOfRange { field, value });
            }
        }
        let sum =
            fractions.correction + fractions.too_late + fractions.duplicate + fractions.rejected;
        if sum > 1.0 + 1e-9 {
            return Err(GeneratorConfigError::FractionsExceedOne { sum });
        }
        let limit_ms = ValidationLimits::DEFAULT_MAX_EVENT_TIME_BEHIND_MS - TOO_LATE_ROOM_MS;
        let span_ms = self
            .max_out_of_orderness_ms
            .saturating_add(self.allowed_lateness_ms)
            .saturating_add(self.correction_horizon_ms)
            .saturating_add(self.window_ms.saturating_mul(4));
        if span_ms > limit_ms {
            return Err(GeneratorConfigError::HorizonsTooLong { span_ms, limit_ms });
        }
        if !matches!(self.schema_version, 1 | 2) {
            return Err(GeneratorConfigError::UnsupportedSchemaVersion {
                value: self.schema_version,
            });
        }
        let elapsed_us = i128::from(self.count) * 1_000_000 / i128::from(self.rate_per_sec);
        let end_ms = i128::from(self.start_time_ms) + elapsed_us / 1000;
        // Keep a week of room on both sides for event times below the send time.
        let room = i128::from(ValidationLimits::DEFAULT_MAX_EVENT_TIME_BEHIND_MS);
        if end_ms > i128::from(i64::MAX) - room
            || i128::from(self.start_time_ms) < i128::from(i64::MIN) + room
        {
            return Err(GeneratorConfigError::ClockOverflow);
        }
        Ok(())
    }

    /// Whether the correction horizon is wide enough for corrections with one-window
    /// margins on both sides (`H ≥ 4w`).
    pub fn corrections_possible(&self) -> bool {
        self.correction_horizon_ms >= 4 * self.window_ms
    }
}

/// What a malformed or invalid record is wrong with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectKind {
    /// Zero-length value.
    EmptyValue,
    /// A valid frame cut short inside the datum.
    TruncatedFrame,
    /// First byte is not the Confluent magic byte.
    BadMagic,
    /// Frame names a schema id not in the catalogue.
    UnknownSchemaId,
    /// Valid header, then bytes that are no UsageEvent.
    GarbageDatum,
    /// A token count below zero (hand-encoded: the domain type cannot hold it).
    NegativeTokens,
    /// A token count above `ValidationLimits::DEFAULT_MAX_TOKENS_PER_KIND`.
    AbsurdTokens,
    /// Event time more than the allowed skew ahead of the Kafka timestamp.
    EventTimeAhead,
    /// `event_id` is not a canonical UUID (hand-encoded).
    InvalidEventId,
    /// `cloud` is the enum's default symbol `unknown`.
    UnknownCloud,
    /// Record key is not the event's `tenant_id`.
    Misrouted,
}

impl RejectKind {
    /// Every kind, in declaration order (`kind as usize` is the position).
    pub const ALL: [RejectKind; 11] = [
        RejectKind::EmptyValue,
        RejectKind::TruncatedFrame,
        RejectKind::BadMagic,
        RejectKind::UnknownSchemaId,
        RejectKind::GarbageDatum,
        RejectKind::NegativeTokens,
        RejectKind::AbsurdTokens,
        RejectKind::EventTimeAhead,
        RejectKind::InvalidEventId,
        RejectKind::UnknownCloud,
        RejectKind::Misrouted,
    ];

    /// The kind's name in the ground truth.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectKind::EmptyValue => "empty_value",
            RejectKind::TruncatedFrame => "truncated_frame",
            RejectKind::BadMagic => "bad_magic",
            RejectKind::UnknownSchemaId => "unknown_schema_id",
            RejectKind::GarbageDatum => "garbage_datum",
            RejectKind::NegativeTokens => "negative_tokens",
            RejectKind::AbsurdTokens => "absurd_tokens",
            RejectKind::EventTimeAhead => "event_time_ahead",
            RejectKind::InvalidEventId => "invalid_event_id",
            RejectKind::UnknownCloud => "unknown_cloud",
            RejectKind::Misrouted => "misrouted",
        }
    }

    /// The rejection reason the pipeline reports: tally-core's `DecodeError::reason()`
    /// from `decode_record` + `validate_event`, or `misrouted` for the routing check.
    pub const fn expected_reason(self) -> &'static str {
        match self {
            RejectKind::EmptyValue => "empty",
            RejectKind::TruncatedFrame | RejectKind::GarbageDatum => "malformed_datum",
            RejectKind::BadMagic => "bad_magic",
            RejectKind::UnknownSchemaId => "unknown_schema_id",
            RejectKind::NegativeTokens | RejectKind::AbsurdTokens => "field_out_of_range",
            RejectKind::EventTimeAhead => "event_time_out_of_bounds",
            RejectKind::InvalidEventId => "invalid_event_id",
            RejectKind::UnknownCloud => "unknown_enum_symbol",
            RejectKind::Misrouted => "misrouted",
        }
    }
}

/// The class the generator placed a record in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordClass {
    /// Counted, on time, event time = send time (advances the partition's clock).
    OnTime,
    /// Counted, on time, event time below the partition's largest but above its watermark.
    OutOfOrder,
    /// Counted into the correction pane of a closed window.
    Correction,
    /// Beyond the correction horizon: goes to `usage.late`.
    TooLate,
    /// Exact re-send of an earlier counted record.
    Duplicate,
    /// Same `event_id` as an earlier counted record, different payload.
    ConflictingDuplicate,
    /// Malformed or invalid: goes to the DLQ.
    Rejected(RejectKind),
}

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedRecord {
    /// Record key: the tenant id (another tenant's for misrouted records).
    pub key: Option<Vec<u8>>,
    /// Record value: a framed UsageEvent, or malformed bytes.
    pub value: Vec<u8>,
    /// Kafka timestamp = simulated send time, UTC ms.
    pub timestamp_ms: i64,
    /// `partition_for_key(key, partitions)`.
    pub partition: u32,
    /// The class the generator placed it in.
    pub class: RecordClass,
}

/// Event count and token sums of a set of events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSums {
    /// Number of events.
    pub events: u64,
    /// Σ uncached input tokens.
    pub input_tokens: u64,
    /// Σ cached input tokens.
    pub cached_input_tokens: u64,
    /// Σ output tokens.
    pub output_tokens: u64,
    /// Σ reasoning tokens.
    pub reasoning_tokens: u64,
}

impl TokenSums {
    /// Adds one event's tokens.
    pub fn add_event(&mut self, tokens: &TokenCounts) {
        self.events += 1;
        self.input_tokens += tokens.input;
        self.cached_input_tokens += tokens.cached_input;
        self.output_tokens += tokens.output;
        self.reasoning_tokens += tokens.reasoning;
    }

    /// Adds another sum.
    pub fn add(&mut self, other: &TokenSums) {
        self.events += other.events;
        self.input_tokens += other.input_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.output_tokens += other.output_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
    }
}

/// Sums of one status within a window entry, split by pane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaneSums {
    /// Events counted on time.
    pub on_time: TokenSums,
    /// Events counted as corrections.
    pub correction: TokenSums,
}

/// The counted events of one (window, dims).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowTruth {
    /// Window start, inclusive, UTC ms.
    pub window_start_ms: i64,
    /// Window end, exclusive, UTC ms.
    pub window_end_ms: i64,
    /// Tenant.
    pub tenant_id: String,
    /// Model.
    pub model: String,
    /// Cloud symbol.
    pub cloud: String,
    /// Channel partner, if any.
    pub channel_partner: Option<String>,
    /// Region.
    pub region: String,
    /// Events counted on time (in order or not).
    pub on_time: TokenSums,
    /// Events counted as corrections to the closed window.
    pub correction: TokenSums,
    /// Counted events per status (`succeeded`, `failed`, `cancelled`), both panes.
    pub by_status: BTreeMap<String, u64>,
    /// Token sums per status and pane, for statuses with events (the price book
    /// decides which statuses are billable).
    pub by_status_sums: BTreeMap<String, PaneSums>,
}

/// Per-partition figures of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionTruth {
    /// Partition number.
    pub partition: u32,
    /// Records produced to it.
    pub records: u64,
    /// Of which counted.
    pub counted: u64,
    /// Of which duplicates (conflicting included).
    pub duplicates: u64,
    /// Of which too late.
    pub too_late: u64,
    /// Of which rejected.
    pub rejected: u64,
    /// Largest event time of its counted events (the aggregator's watermark + ooo).
    pub last_event_time_ms: Option<i64>,
    /// Kafka timestamp of its last record.
    pub last_send_time_ms: Option<i64>,
}

/// What the pipeline must find in the generated records.
///
/// Identity: `produced == counted + duplicates + too_late + rejected`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroundTruth {
    /// The config that generated the records.
    pub config: GeneratorConfig,
    /// Whether all `config.count` records were generated (false for a run stopped early;
    /// the truth then covers exactly the records produced).
    pub complete: bool,
    /// Whether the correction class was enabled (`H ≥ 4w`).
    pub corrections_enabled: bool,
    /// Records produced.
    pub produced: u64,
    /// Distinct valid events counted (on time + corrections).
    pub counted: u64,
    /// Of `counted`, on time (in order or not).
    pub counted_on_time: u64,
    /// Of `counted_on_time`, sent out of order.
    pub out_of_order: u64,
    /// Of `counted`, corrections to closed windows.
    pub counted_corrections: u64,
    /// Re-sent events (conflicting ones included).
    pub duplicates: u64,
    /// Of `duplicates`, those with the same id but a different payload.
    pub conflicting_duplicates: u64,
    /// Events beyond the correction horizon.
    pub too_late: u64,
    /// Malformed or invalid records.
    pub rejected: u64,
    /// `rejected` by [`RejectKind::as_str`].
    pub rejected_by_kind: BTreeMap<String, u64>,
    /// Kafka timestamp of the first record, if any.
    pub first_send_time_ms: Option<i64>,
    /// Kafka timestamp of the last record, if any.
    pub last_send_time_ms: Option<i64>,
    /// Per-partition figures, by partition number.
    pub per_partition: Vec<PartitionTruth>,
    /// Counted events by (window, dims), sorted by window start, then tenant, model,
    /// cloud, partner, region as text.
    pub windows: Vec<WindowTruth>,
}

impl GroundTruth {
    /// Whether `produced == counted + duplicates + too_late + rejected`.
    pub fn is_conserved(&self) -> bool {
        self.produced == self.counted + self.duplicates + self.too_late + self.rejected
    }

    /// Token sums over every window and pane.
    pub fn total_counted_sums(&self) -> TokenSums {
        let mut total = TokenSums::default();
        for window in &self.windows {
            total.add(&window.on_time);
            total.add(&window.correction);
        }
        total
    }

    /// Writes the truth as pretty JSON.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let file = std::fs::File::create(path)?;
        let mut writer = std::io::BufWriter::new(file);
        serde_json::to_writer_pretty(&mut writer, self)?;
        std::io::Write::write_all(&mut writer, b"\n")?;
        std::io::Write::flush(&mut writer)
    }

    /// Reads a truth written by [`GroundTruth::write`].
    pub fn read(path: &Path) -> std::io::Result<GroundTruth> {
        let file = std::fs::File::open(path)?;
        Ok(serde_json::from_reader(std::io::BufReader::new(file))?)
    }
}

/// A tenant and its usual serving profile.
#[derive(Debug, Clone)]
struct Tenant {
    id: String,
    partition: u32,
    home_cloud: u8,
    home_partner: u8,
    home_region: u8,
}

/// Indices of an event's dims in the catalogue consts; `partner` 0 is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct DimIndex {
    tenant: u32,
    model: u8,
    cloud: u8,
    partner: u8,
    region: u8,
    status: u8,
}

/// Window accumulator, keyed by (window start, dims without status).
#[derive(Debug, Clone, Default)]
struct WindowAccumulator {
    /// Indexed by the status' position in [`STATUSES`].
    by_status: [PaneSums; 3],
}

/// Per-partition generator state.
#[derive(Debug, Clone, Default)]
struct PartitionState {
    /// Largest event time of a counted event, `M_p`.
    max_event_time_ms: Option<i64>,
    /// Recent counted events, duplicate candidates.
    ring: Vec<UsageEvent>,
    /// Next slot to overwrite once the ring is full.
    ring_next: usize,
    truth: PartitionTruth,
}

impl PartitionState {
    fn watermark_ms(&self, max_out_of_orderness_ms: i64) -> Option<i64> {
        self.max_event_time_ms
            .map(|max| max - max_out_of_orderness_ms)
    }

    fn remember(&mut self, event: UsageEvent) {
        if self.ring.len() < DUPLICATE_RING_CAPACITY {
            self.ring.push(event);
        } else {
            self.ring[self.ring_next] = event;
            self.ring_next = (self.ring_next + 1) % DUPLICATE_RING_CAPACITY;
        }
    }
}

/// Class drawn before placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Planned {
    OnTime,
    Correction,
    TooLate,
    Duplicate,
    Rejected,
}

/// Cumulative class thresholds over `u32` draws.
#[derive(Debug, Clone, Copy)]
struct Thresholds {
    correction: u64,
    too_late: u64,
    duplicate: u64,
    rejected: u64,
    out_of_order: u64,
    conflicting: u64,
}

/// `fraction` of the `u32` range, as a threshold for `next_u32() < threshold`.
fn threshold(fraction: f64) -> u64 {
    const SCALE: f64 = 4_294_967_296.0;
    (fraction.clamp(0.0, 1.0) * SCALE) as u64
}

impl Thresholds {
    fn new(fractions: &ClassFractions) -> Thresholds {
        let correction = threshold(fractions.correction);
        let too_late = correction + threshold(fractions.too_late);
        let duplicate = too_late + threshold(fractions.duplicate);
        let rejected = duplicate + threshold(fractions.rejected);
        Thresholds {
            correction,
            too_late,
            duplicate,
            rejected,
            out_of_order: threshold(fractions.out_of_order),
            conflicting: threshold(fractions.conflicting_duplicate),
        }
    }

    fn plan(&self, draw: u32) -> Planned {
        let draw = u64::from(draw);
        if draw < self.correction {
            Planned::Correction
        } else if draw < self.too_late {
            Planned::TooLate
        } else if draw < self.duplicate {
            Planned::Duplicate
        } else if draw < self.rejected {
            Planned::Rejected
        } else {
            Planned::OnTime
        }
    }
}

/// Log-normal-like token ranges of a model.
#[derive(Debug, Clone, Copy)]
struct TokenProfile {
    prompt: Spread,
    output: Option<Spread>,
    reasoning: Option<Spread>,
    cacheable: bool,
}

/// A bell-shaped distribution over `[low, high]` on a log scale, in eighth octaves.
#[derive(Debug, Clone, Copy)]
struct Spread {
    low: u64,
    high: u64,
    steps: u32,
}

/// `2^(k/8)` for `k = 0..8`, in Q16 fixed point.
const EIGHTH_OCTAVE_Q16: [u64; 8] = [
    65_536, 71_468, 77_936, 84_990, 92_682, 101_070, 110_218, 120_194,
];

/// `low × 2^(step/8)`, in integers.
fn scaled(low: u64, step: u32) -> u64 {
    let whole = (low << (step / 8)).saturating_mul(EIGHTH_OCTAVE_Q16[(step % 8) as usize]);
    whole >> 16
}

impl Spread {
    fn new(low: u64, high: u64) -> Spread {
        let mut steps = 0;
        while scaled(low, steps + 1) <= high {
            steps += 1;
        }
        Spread { low, high, steps }
    }

    /// The sum of three uniform steps gives the bell; a uniform offset inside the step
    /// fills the gaps between step values.
    fn sample(&self, rng: &mut ChaCha8Rng) -> u64 {
        let third = self.steps / 3;
        let step = rng.random_range(0..=third)
            + rng.random_range(0..=third)
            + rng.random_range(0..=(self.steps - 2 * third));
        let base = scaled(self.low, step);
        let gap = scaled(self.low, step + 1).saturating_sub(base).max(1);
        (base + rng.random_range(0..gap)).clamp(self.low, self.high)
    }
}

fn token_profiles() -> [TokenProfile; 4] {
    [
        // atlas-large
        TokenProfile {
            prompt: Spread::new(200, 20_000),
            output: Some(Spread::new(50, 2_000)),
            reasoning: None,
            cacheable: true,
        },
        // atlas-mini
        TokenProfile {
            prompt: Spread::new(100, 8_000),
            output: Some(Spread::new(20, 1_000)),
            reasoning: None,
            cacheable: true,
        },
        // atlas-reasoning
        TokenProfile {
            prompt: Spread::new(200, 20_000),
            output: Some(Spread::new(50, 2_000)),
            reasoning: Some(Spread::new(100, 16_000)),
            cacheable: true,
        },
        // atlas-embed: no output, no cache
        TokenProfile {
            prompt: Spread::new(10, 8_000),
            output: None,
            reasoning: None,
            cacheable: false,
        },
    ]
}

fn pick_weighted(rng: &mut ChaCha8Rng, weights: &[u32]) -> u8 {
    let total: u32 = weights.iter().sum();
    let mut draw = rng.random_range(0..total);
    for (index, &weight) in weights.iter().enumerate() {
        if draw < weight {
            return index as u8;
        }
        draw -= weight;
    }
    (weights.len() - 1) as u8
}

/// A random version-4 UUID.
fn random_event_id(rng: &mut ChaCha8Rng) -> EventId {
    let bits: u128 = rng.random();
    let versioned = (bits & !(0xf_u128 << 76)) | (0x4_u128 << 76);
    EventId((versioned & !(0x3_u128 << 62)) | (0x2_u128 << 62))
}

fn window_end_ms(event_time_ms: i64, window_ms: i64) -> i64 {
    event_time_ms.div_euclid(window_ms) * window_ms + window_ms
}

fn window_start_ms(event_time_ms: i64, window_ms: i64) -> i64 {
    event_time_ms.div_euclid(window_ms) * window_ms
}

/// The deterministic traffic generator. Iterate it for records; ask for the truth at
/// any point.
#[derive(Debug, Clone)]
pub struct Generator {
    config: GeneratorConfig,
    schema: SchemaId,
    rng: ChaCha8Rng,
    thresholds: Thresholds,
    corrections_enabled: bool,
    /// Cumulative integer Zipf weights (`2^40 / rank`).
    tenant_cumulative: Vec<u64>,
    tenants: Vec<Tenant>,
    profiles: [TokenProfile; 4],
    partitions: Vec<PartitionState>,
    next_index: u64,
    first_send_time_ms: Option<i64>,
    last_send_time_ms: Option<i64>,
    counted_on_time: u64,
    out_of_order: u64,
    counted_corrections: u64,
    duplicates: u64,
    conflicting_duplicates: u64,
    too_late: u64,
    rejected_by_kind: [u64; RejectKind::ALL.len()],
    windows: BTreeMap<(i64, DimIndex), WindowAccumulator>,
}

impl Generator {
    /// Validates `config` and prepares a run.
    pub fn new(config: GeneratorConfig) -> Result<Generator, GeneratorConfigError> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut tenant_cumulative = Vec::with_capacity(config.tenants as usize);
        let mut tenants = Vec::with_capacity(config.tenants as usize);
        let mut cumulative = 0_u64;
        for rank in 0..config.tenants {
            cumulative += (1_u64 << 40) / (u64::from(rank) + 1);
            tenant_cumulative.push(cumulative);
            let id = format!("tenant-{rank:05}");
            let partition = partition_for_key(id.as_bytes(), config.partitions);
            tenants.push(Tenant {
                id,
                partition,
                home_cloud: pick_weighted(&mut rng, &CLOUD_WEIGHTS),
                home_partner: pick_weighted(&mut rng, &PARTNER_WEIGHTS),
                home_region: rng.random_range(0..REGIONS.len() as u32) as u8,
            });
        }
        let partitions = (0..config.partitions)
            .map(|partition| PartitionState {
                truth: PartitionTruth {
                    partition,
                    ..PartitionTruth::default()
                },
                ..PartitionState::default()
            })
            .collect();
        let schema = if config.schema_version == 2 {
            SchemaId::UsageEventV2
        } else {
            SchemaId::UsageEventV1
        };
        Ok(Generator {
            schema,
            thresholds: Thresholds::new(&config.fractions),
            corrections_enabled: config.corrections_possible(),
            rng,
            tenant_cumulative,
            tenants,
            profiles: token_profiles(),
            partitions,
            next_index: 0,
            first_send_time_ms: None,
            last_send_time_ms: None,
            counted_on_time: 0,
            out_of_order: 0,
            counted_corrections: 0,
            duplicates: 0,
            conflicting_duplicates: 0,
            too_late: 0,
            rejected_by_kind: [0; RejectKind::ALL.len()],
            windows: BTreeMap::new(),
            config,
        })
    }

    /// The run's config.
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// Records generated so far.
    pub fn produced(&self) -> u64 {
        self.next_index
    }

    /// Simulated send time of record `index`, UTC ms.
    pub fn send_time_ms(&self, index: u64) -> i64 {
        let elapsed_us = i128::from(index) * 1_000_000 / i128::from(self.config.rate_per_sec);
        // In range: validate() bounded start + count / rate.
        (i128::from(self.config.start_time_ms) * 1000 + elapsed_us).div_euclid(1000) as i64
    }

    /// The next record, or `None` after `config.count` records.
    pub fn next_record(&mut self) -> Option<GeneratedRecord> {
        if self.next_index >= self.config.count {
            return None;
        }
        let send_ms = self.send_time_ms(self.next_index);
        self.next_index += 1;
        self.first_send_time_ms.get_or_insert(send_ms);
        self.last_send_time_ms = Some(send_ms);

        let tenant = self.pick_tenant();
        let planned = self.thresholds.plan(self.rng.next_u32());
        let placed = match planned {
            Planned::OnTime => None,
            Planned::Correction => self.correction(tenant, send_ms),
            Planned::TooLate => self.too_late(tenant, send_ms),
            Planned::Duplicate => self.duplicate(tenant, send_ms),
            Planned::Rejected => Some(self.rejected(tenant, send_ms)),
        };
        let record = match placed {
            Some(record) => record,
            None => self.on_time(tenant, send_ms),
        };
        let partition = &mut self.partitions[record.partition as usize];
        partition.truth.records += 1;
        partition.truth.last_send_time_ms = Some(send_ms);
        debug_assert!(
            self.conserved(),
            "produced = counted + duplicates + too_late + rejected"
        );
        Some(record)
    }

    fn rejected_total(&self) -> u64 {
        self.rejected_by_kind.iter().sum()
    }

    fn conserved(&self) -> bool {
        self.next_index
            == self.counted_on_time
                + self.counted_corrections
                + self.duplicates
                + self.too_late
                + self.rejected_total()
    }

    fn pick_tenant(&mut self) -> usize {
        let total = self.tenant_cumulative.last().copied().unwrap_or(1);
        let draw = self.rng.random_range(0..total);
        self.tenant_cumulative
            .partition_point(|&cumulative| cumulative <= draw)
    }

    /// A fresh valid event for `tenant` at `occurred_at_ms`, with its dim indices.
    fn make_event(&mut self, tenant: usize, occurred_at_ms: i64) -> (UsageEvent, DimIndex) {
        let rng = &mut self.rng;
        let home = &self.tenants[tenant];
        let (cloud, partner, region) = if rng.random_range(0..100) < HOME_PROFILE_PERCENT {
            (home.home_cloud, home.home_partner, home.home_region)
        } else {
            (
                pick_weighted(rng, &CLOUD_WEIGHTS),
                pick_weighted(rng, &PARTNER_WEIGHTS),
                rng.random_range(0..REGIONS.len() as u32) as u8,
            )
        };
        let model = pick_weighted(rng, &MODEL_WEIGHTS);
        let status = pick_weighted(rng, &STATUS_WEIGHTS);
        let profile = &self.profiles[model as usize];
        let prompt = profile.prompt.sample(rng);
        let cached_input = if profile.cacheable && rng.random_range(0..100) < CACHE_HIT_PERCENT {
            prompt * u64::from(rng.random_range(10..=80_u32)) / 100
        } else {
            0
        };
        let mut output = profile.output.map_or(0, |spread| spread.sample(rng));
        let mut reasoning = profile.reasoning.map_or(0, |spread| spread.sample(rng));
        match STATUSES[status as usize] {
            RequestStatus::Failed => {
                output = 0;
                reasoning = 0;
            }
            RequestStatus::Cancelled => {
                output /= 4;
                reasoning /= 2;
            }
            _ => {}
        }
        let event_id = random_event_id(rng);
        let request_id = format!("req-{:016x}", rng.next_u64());
        let gateway = GATEWAYS[rng.random_range(0..GATEWAYS.len() as u32) as usize];
        let service_tier = if self.schema == SchemaId::UsageEventV2 {
            Some(
                if rng.random_range(0..10) == 0 {
                    "priority"
                } else {
                    "standard"
                }
                .to_owned(),
            )
        } else {
            None
        };
        let event = UsageEvent {
            event_id,
            request_id,
            occurred_at_ms,
            tenant_id: home.id.clone(),
            model: MODELS[model as usize].to_owned(),
            cloud: CLOUDS[cloud as usize],
            channel_partner: partner
                .checked_sub(1)
                .map(|index| CHANNEL_PARTNERS[index as usize].to_owned()),
            region: REGIONS[region as usize].to_owned(),
            tokens: TokenCounts {
                input: prompt - cached_input,
                cached_input,
                output,
                reasoning,
            },
            status: STATUSES[status as usize],
            attributes: BTreeMap::from([("gateway".to_owned(), gateway.to_owned())]),
            service_tier,
        };
        let dims = DimIndex {
            tenant: tenant as u32,
            model,
            cloud,
            partner,
            region,
            status,
        };
        (event, dims)
    }

    fn encode(&self, event: &UsageEvent) -> Vec<u8> {
        let mut value = Vec::with_capacity(160);
        encode_usage_event(event, self.schema, &mut value);
        value
    }

    /// Books a counted event into its window and partition, and remembers it for
    /// duplicates. Returns the record.
    fn count(
        &mut self,
        event: UsageEvent,
        dims: DimIndex,
        class: RecordClass,
        send_ms: i64,
    ) -> GeneratedRecord {
        let value = self.encode(&event);
        let window_start = window_start_ms(event.occurred_at_ms, self.config.window_ms);
        let mut status_dims = dims;
        status_dims.status = 0;
        let accumulator = self.windows.entry((window_start, status_dims)).or_default();
        let panes = &mut accumulator.by_status[dims.status as usize];
        if class == RecordClass::Correction {
            panes.correction.add_event(&event.tokens);
            self.counted_corrections += 1;
        } else {
            panes.on_time.add_event(&event.tokens);
            self.counted_on_time += 1;
            if class == RecordClass::OutOfOrder {
                self.out_of_order += 1;
            }
        }
        let tenant = &self.tenants[dims.tenant as usize];
        let key = tenant.id.as_bytes().to_vec();
        let partition_index = tenant.partition;
        let partition = &mut self.partitions[partition_index as usize];
        partition.truth.counted += 1;
        if partition
            .max_event_time_ms
            .is_none_or(|max| event.occurred_at_ms > max)
        {
            partition.max_event_time_ms = Some(event.occurred_at_ms);
            partition.truth.last_event_time_ms = Some(event.occurred_at_ms);
        }
        partition.remember(event);
        GeneratedRecord {
            key: Some(key),
            value,
            timestamp_ms: send_ms,
            partition: partition_index,
            class,
        }
    }

    fn on_time(&mut self, tenant: usize, send_ms: i64) -> GeneratedRecord {
        let partition = self.tenants[tenant].partition as usize;
        let half_ooo = self.config.max_out_of_orderness_ms / 2;
        let mut occurred_at_ms = send_ms;
        let mut class = RecordClass::OnTime;
        if let Some(max) = self.partitions[partition].max_event_time_ms
            && half_ooo > 0
            && u64::from(self.rng.next_u32()) < self.thresholds.out_of_order
        {
            occurred_at_ms = max - self.rng.random_range(1..=half_ooo);
            class = RecordClass::OutOfOrder;
        }
        debug_assert!(occurred_at_ms <= send_ms);
        let (event, dims) = self.make_event(tenant, occurred_at_ms);
        self.count(event, dims, class, send_ms)
    }

    fn correction(&mut self, tenant: usize, send_ms: i64) -> Option<GeneratedRecord> {
        if !self.corrections_enabled {
            return None;
        }
        let config = &self.config;
        let window = config.window_ms;
        let partition = self.tenants[tenant].partition as usize;
        let watermark = self.partitions[partition].watermark_ms(config.max_out_of_orderness_ms)?;
        // Window ends in [low, high] are closed and inside the correction horizon with a
        // window of margin on each side; use the middle half of that range.
        let low = watermark - config.allowed_lateness_ms - config.correction_horizon_ms + window;
        let high = watermark - config.allowed_lateness_ms - window;
        let quarter = (high - low) / 4;
        let (middle_low, middle_high) = (low + quarter, high - quarter);
        // An event time in [middle_low, middle_high − w] has its window end in
        // (middle_low, middle_high].
        let latest = middle_high - window;
        if latest < middle_low {
            return None;
        }
        let occurred_at_ms = self.rng.random_range(middle_low..=latest);
        debug_assert!((low..=high).contains(&window_end_ms(occurred_at_ms, window)));
        if send_ms - occurred_at_ms
            > ValidationLimits::DEFAULT_MAX_EVENT_TIME_BEHIND_MS - BEHIND_BOUND_MARGIN_MS
        {
            return None;
        }
        let (event, dims) = self.make_event(tenant, occurred_at_ms);
        Some(self.count(event, dims, RecordClass::Correction, send_ms))
    }

    fn too_late(&mut self, tenant: usize, send_ms: i64) -> Option<GeneratedRecord> {
        let config = &self.config;
        let window = config.window_ms;
        let partition = self.tenants[tenant].partition;
        let watermark =
            self.partitions[partition as usize].watermark_ms(config.max_out_of_orderness_ms)?;
        // Event time ≤ W − L − H − 3w puts the window end at ≤ W − L − H − 2w.
        let latest =
            watermark - config.allowed_lateness_ms - config.correction_horizon_ms - 3 * window;
        let earliest = (latest - TOO_LATE_SPREAD_MS).max(
            send_ms - ValidationLimits::DEFAULT_MAX_EVENT_TIME_BEHIND_MS + BEHIND_BOUND_MARGIN_MS,
        );
        if earliest > latest {
            return None;
        }
        let occurred_at_ms = self.rng.random_range(earliest..=latest);
        debug_assert!(
            window_end_ms(occurred_at_ms, window)
                <= watermark
                    - self.config.allowed_lateness_ms
                    - self.config.correction_horizon_ms
                    - 2 * window
        );
        let (event, _) = self.make_event(tenant, occurred_at_ms);
        let value = self.encode(&event);
        self.too_late += 1;
        self.partitions[partition as usize].truth.too_late += 1;
        Some(GeneratedRecord {
            key: Some(event.tenant_id.into_bytes()),
            value,
            timestamp_ms: send_ms,
            partition,
            class: RecordClass::TooLate,
        })
    }

    fn duplicate(&mut self, tenant: usize, send_ms: i64) -> Option<GeneratedRecord> {
        let config = &self.config;
        let partition = self.tenants[tenant].partition;
        let state = &self.partitions[partition as usize];
        let watermark = state.watermark_ms(config.max_out_of_orderness_ms)?;
        if state.ring.is_empty() {
            return None;
        }
        let oldest_allowed =
            (watermark - config.allowed_lateness_ms - config.correction_horizon_ms / 2).max(
                send_ms - ValidationLimits::DEFAULT_MAX_EVENT_TIME_BEHIND_MS
                    + BEHIND_BOUND_MARGIN_MS,
            );
        let ring_len = state.ring.len() as u32;
        let mut original = None;
        for _ in 0..DUPLICATE_PICK_ATTEMPTS {
            let slot = self.rng.random_range(0..ring_len) as usize;
            let candidate = &self.partitions[partition as usize].ring[slot];
            if candidate.occurred_at_ms >= oldest_allowed {
                original = Some(slot);
                break;
            }
        }
        let slot = original?;
        let conflicting = u64::from(self.rng.next_u32()) < self.thresholds.conflicting;
        let mut event = self.partitions[partition as usize].ring[slot].clone();
        let class = if conflicting {
            event.tokens.input += 1 + self.rng.random_range(0..100_u64);
            self.conflicting_duplicates += 1;
            RecordClass::ConflictingDuplicate
        } else {
            RecordClass::Duplicate
        };
        debug_assert!(event.occurred_at_ms <= send_ms);
        let value = self.encode(&event);
        self.duplicates += 1;
        self.partitions[partition as usize].truth.duplicates += 1;
        Some(GeneratedRecord {
            key: Some(event.tenant_id.into_bytes()),
            value,
            timestamp_ms: send_ms,
            partition,
            class,
        })
    }

    fn rejected(&mut self, tenant: usize, send_ms: i64) -> GeneratedRecord {
        let kind = RejectKind::ALL[self.rng.random_range(0..RejectKind::ALL.len() as u32) as usize];
        let (mut event, _) = self.make_event(tenant, send_ms);
        let mut key = event.tenant_id.clone().into_bytes();
        let value = match kind {
            RejectKind::EmptyValue => Vec::new(),
            RejectKind::TruncatedFrame => {
                let mut value = self.encode(&event);
                let cut = self
                    .rng
                    .random_range(tally_core::codec::HEADER_LEN + 1..value.len());
                value.truncate(cut);
                value
            }
            RejectKind::BadMagic => {
                let mut value = self.encode(&event);
                value[0] = self.rng.random_range(1..=u8::MAX);
                value
            }
            RejectKind::UnknownSchemaId => {
                let mut value = self.encode(&event);
                let id: u32 = self.rng.random_range(1_000..1_000_000);
                value[1..5].copy_from_slice(&id.to_be_bytes());
                value
            }
            RejectKind::GarbageDatum => {
                // A string length (the event_id's) longer than the bytes that follow.
                let garbage_len = self.rng.random_range(8..40_u32);
                let claimed_len = i64::from(garbage_len) + self.rng.random_range(1..60_i64);
                let mut value = vec![MAGIC_BYTE];
                value.extend_from_slice(&self.schema.id().to_be_bytes());
                put_long(&mut value, claimed_len);
                for _ in 0..garbage_len {
                    value.push(self.rng.random());
                }
                value
            }
            RejectKind::NegativeTokens => {
                let mut raw = RawUsageEvent::from_event(&event);
                let field = self.rng.random_range(0..4_u32) as usize;
                raw.tokens[field] = -self.rng.random_range(1..10_000_i64);
                raw.encode()
            }
            RejectKind::AbsurdTokens => {
                let absurd = ValidationLimits::DEFAULT_MAX_TOKENS_PER_KIND
                    + self.rng.random_range(1..1_000_000_000_000_u64);
                match self.rng.random_range(0..4_u32) {
                    0 => event.tokens.input = absurd,
                    1 => event.tokens.cached_input = absurd,
                    2 => event.tokens.output = absurd,
                    _ => event.tokens.reasoning = absurd,
                }
                self.encode(&event)
            }
            RejectKind::EventTimeAhead => {
                event.occurred_at_ms = send_ms
                    + ValidationLimits::DEFAULT_MAX_EVENT_TIME_AHEAD_MS
                    + self.rng.random_range(1_000..3_600_000_i64);
                self.encode(&event)
            }
            RejectKind::InvalidEventId => {
                let mut raw = RawUsageEvent::from_event(&event);
                // The 32 hex digits without hyphens: a uuid, but not the canonical form.
                let text: Vec<u8> = event
                    .event_id
                    .to_text()
                    .iter()
                    .copied()
                    .filter(|&b| b != b'-')
                    .collect();
                raw.event_id = text;
                raw.encode()
            }
            RejectKind::UnknownCloud => {
                event.cloud = Cloud::Unknown;
                self.encode(&event)
            }
            RejectKind::Misrouted => {
                let tenants = self.config.tenants as usize;
                key = if tenants > 1 {
                    let other =
                        (tenant + 1 + self.rng.random_range(0..(tenants - 1) as u32) as usize)
                            % tenants;
                    self.tenants[other].id.clone().into_bytes()
                } else {
                    format!("{}-elsewhere", event.tenant_id).into_bytes()
                };
                self.encode(&event)
            }
        };
        let partition = partition_for_key(&key, self.config.partitions);
        self.rejected_by_kind[kind as usize] += 1;
        self.partitions[partition as usize].truth.rejected += 1;
        GeneratedRecord {
            key: Some(key),
            value,
            timestamp_ms: send_ms,
            partition,
            class: RecordClass::Rejected(kind),
        }
    }

    /// The truth for the records generated so far.
    pub fn truth(&self) -> GroundTruth {
        let mut windows: Vec<WindowTruth> = self
            .windows
            .iter()
            .map(|((window_start, dims), accumulator)| {
                let mut on_time = TokenSums::default();
                let mut correction = TokenSums::default();
                let mut by_status = BTreeMap::new();
                let mut by_status_sums = BTreeMap::new();
                for (status, panes) in STATUSES.iter().zip(accumulator.by_status.iter()) {
                    on_time.add(&panes.on_time);
                    correction.add(&panes.correction);
                    let events = panes.on_time.events + panes.correction.events;
                    by_status.insert(status.as_str().to_owned(), events);
                    if events > 0 {
                        by_status_sums.insert(status.as_str().to_owned(), *panes);
                    }
                }
                WindowTruth {
                    window_start_ms: *window_start,
                    window_end_ms: window_start + self.config.window_ms,
                    tenant_id: self.tenants[dims.tenant as usize].id.clone(),
                    model: MODELS[dims.model as usize].to_owned(),
                    cloud: CLOUDS[dims.cloud as usize].as_str().to_owned(),
                    channel_partner: dims
                        .partner
                        .checked_sub(1)
                        .map(|i| CHANNEL_PARTNERS[i as usize].to_owned()),
                    region: REGIONS[dims.region as usize].to_owned(),
                    on_time,
                    correction,
                    by_status,
                    by_status_sums,
                }
            })
            .collect();
        windows.sort_by(|a, b| {
            (
                a.window_start_ms,
                &a.tenant_id,
                &a.model,
                &a.cloud,
                &a.channel_partner,
                &a.region,
            )
                .cmp(&(
                    b.window_start_ms,
                    &b.tenant_id,
                    &b.model,
                    &b.cloud,
                    &b.channel_partner,
                    &b.region,
                ))
        });
        let rejected_by_kind = RejectKind::ALL
            .iter()
            .zip(self.rejected_by_kind.iter())
            .map(|(kind, count)| (kind.as_str().to_owned(), *count))
            .collect();
        let truth = GroundTruth {
            config: self.config.clone(),
            complete: self.next_index >= self.config.count,
            corrections_enabled: self.corrections_enabled,
            produced: self.next_index,
            counted: self.counted_on_time + self.counted_corrections,
            counted_on_time: self.counted_on_time,
            out_of_order: self.out_of_order,
            counted_corrections: self.counted_corrections,
            duplicates: self.duplicates,
            conflicting_duplicates: self.conflicting_duplicates,
            too_late: self.too_late,
            rejected: self.rejected_total(),
            rejected_by_kind,
            first_send_time_ms: self.first_send_time_ms,
            last_send_time_ms: self.last_send_time_ms,
            per_partition: self.partitions.iter().map(|state| state.truth).collect(),
            windows,
        };
        debug_assert!(
            truth.is_conserved(),
            "produced = counted + duplicates + too_late + rejected"
        );
        truth
    }
}

impl Iterator for Generator {
    type Item = GeneratedRecord;

    fn next(&mut self) -> Option<GeneratedRecord> {
        self.next_record()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.config.count - self.next_index).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

/// Avro `long`: zig-zag, then base-128 varint.
fn put_long(out: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8 & 0x7f) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

/// A UsageEvent v1 with wire-level fields the domain type cannot hold (a non-canonical
/// `event_id`, negative token counts), written with the `usage_event.v1.avsc` layout.
#[derive(Debug, Clone)]
struct RawUsageEvent<'a> {
    event_id: Vec<u8>,
    event: &'a UsageEvent,
    /// input, cached_input, output, reasoning.
    tokens: [i64; 4],
}

impl<'a> RawUsageEvent<'a> {
    fn from_event(event: &'a UsageEvent) -> RawUsageEvent<'a> {
        let as_long = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        RawUsageEvent {
            event_id: event.event_id.to_text().to_vec(),
            event,
            tokens: [
                as_long(event.tokens.input),
                as_long(event.tokens.cached_input),
                as_long(event.tokens.output),
                as_long(event.tokens.reasoning),
            ],
        }
    }

    fn encode(&self) -> Vec<u8> {
        let event = self.event;
        let mut out = Vec::with_capacity(160);
        out.push(MAGIC_BYTE);
        out.extend_from_slice(&SchemaId::UsageEventV1.id().to_be_bytes());
        put_bytes(&mut out, &self.event_id);
        put_bytes(&mut out, event.request_id.as_bytes());
        put_long(&mut out, event.occurred_at_ms);
        put_bytes(&mut out, event.tenant_id.as_bytes());
        put_bytes(&mut out, event.model.as_bytes());
        put_long(&mut out, i64::from(event.cloud.index()));
        match &event.channel_partner {
            None => put_long(&mut out, 0),
            Some(partner) => {
                put_long(&mut out, 1);
                put_bytes(&mut out, partner.as_bytes());
            }
        }
        put_bytes(&mut out, event.region.as_bytes());
        for count in self.tokens {
            put_long(&mut out, count);
        }
        put_long(&mut out, i64::from(event.status.index()));
        if !event.attributes.is_empty() {
            put_long(&mut out, event.attributes.len() as i64);
            for (key, value) in &event.attributes {
                put_bytes(&mut out, key.as_bytes());
                put_bytes(&mut out, value.as_bytes());
            }
        }
        put_long(&mut out, 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_encoder_matches_the_codec_for_valid_events() {
        let mut generator = Generator::new(GeneratorConfig::default()).expect("valid config");
        for _ in 0..50 {
            let (event, _) = generator.make_event(3, DEFAULT_START_TIME_MS);
            let mut expected = Vec::new();
            encode_usage_event(&event, SchemaId::UsageEventV1, &mut expected);
            assert_eq!(RawUsageEvent::from_event(&event).encode(), expected);
        }
    }

    #[test]
    fn spread_samples_stay_within_bounds_and_vary() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let spread = Spread::new(200, 20_000);
        let samples: Vec<u64> = (0..10_000).map(|_| spread.sample(&mut rng)).collect();
        assert!(samples.iter().all(|&s| (200..=20_000).contains(&s)));
        let below_2k = samples.iter().filter(|&&s| s < 2_000).count();
        assert!(
            below_2k > 2_000 && below_2k < 8_000,
            "bell shape around the log-midpoint: {below_2k}"
        );
    }

    #[test]
    fn zipf_table_favours_low_ranks() {
        let mut generator = Generator::new(GeneratorConfig::default()).expect("valid config");
        let mut hits = vec![0_u32; 200];
        for _ in 0..100_000 {
            hits[generator.pick_tenant()] += 1;
        }
        assert!(
            hits[0] > 5 * hits[20],
            "rank 1 is much heavier than rank 21"
        );
        assert!(hits[0] > hits[1] && hits[1] > hits[3]);
    }

    #[test]
    fn window_bounds_align_to_the_epoch() {
        assert_eq!(window_start_ms(119_999, 60_000), 60_000);
        assert_eq!(window_end_ms(120_000, 60_000), 180_000);
        assert_eq!(window_start_ms(-1, 60_000), -60_000);
    }
}
