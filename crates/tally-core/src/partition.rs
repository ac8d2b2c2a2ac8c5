//! The per-partition state machine the Kafka loop drives: classify, window, close, price.
//!
//! The loop feeds every record of one input partition, in offset order, to one
//! [`PartitionState`]: usage events to [`PartitionState::on_event`] (or, borrowed from
//! their record, [`PartitionState::on_event_ref`]), ticks to
//! [`PartitionState::on_tick`], records it rejected itself (undecodable, invalid,
//! misrouted) to [`PartitionState::on_rejected_record`]. It acts on the returned
//! [`Classified`] (too-late and rejected records go to their topics) and, at each
//! commit, takes the closed rows with [`PartitionState::drain_closed`].
//!
//! # Semantics (DESIGN.md, "Semantics")
//! Let `W` be the window size, `O` the max out-of-orderness, `L` the allowed lateness
//! and `C` the correction horizon; `end` is the end of the event's window.
//! - **Watermark**: the largest event time *counted* minus `O`, raised to a tick's time
//!   when a tick is read; it never goes backwards. Records that are not counted
//!   (rejected, too late, duplicates) do not move it: an uncounted record's time is not
//!   trusted to close windows. (A duplicate's time is its original's, already counted.)
//! - **Classification, in this order**:
//!   1. rejected — unknown cloud or status, a time with no representable window, no
//!      price in force at the window start, a model the version in force does not
//!      price, no share rules in force;
//!   2. too late — `end + L + C ≤ watermark`: no dedupe lookup, no state change;
//!   3. duplicate / conflicting duplicate — the id is remembered ([`crate::dedupe`]);
//!   4. counted — on time when `end + L > watermark` (or no watermark yet), else as a
//!      correction; the id is claimed in the same step (no "claimed but not counted").
//!
//!   A counted event that would push one of its pane's token sums above
//!   [`MAX_PANE_TOKENS_PER_KIND`] is rejected instead (reason `pane_token_limit`), so a
//!   row's amounts provably fit: Σ tokens × price ≤ 4 × 2⁴⁰ × 10¹⁵ < 4.4 × 10²⁷ exact
//!   units, i.e. < 4.4 × 10¹⁸ micro-units < `i64::MAX`, and × 10 000 basis points
//!   stays far inside `i128`.
//! - **Closing**: whenever the watermark moves, every on-time window with
//!   `end + L ≤ watermark` closes into one row per (window, dims, row kind) with
//!   correction sequence 0. All open correction panes close when the watermark crosses
//!   a window boundary (`floor(old / W) ≠ floor(new / W)`) and at every tick; each
//!   closed pane is one row with sequence 1, 2, … per (window, dims, row kind). The
//!   last sequence of each key is kept until `end + L + C ≤ watermark` (after which any
//!   event for the window is too late), so sequences never repeat.
//! - **Pricing** happens when rows are drained: the price-book and share-rule versions
//!   in force at the window start (contracts align `effective_from` to windows, so this
//!   is the version in force at every event time of the window). Non-billable statuses
//!   make `non_billable` rows: amounts 0, no shares.
//! - **Conservation**: `consumed = counted + duplicates + too_late + rejected`
//!   ([`PartitionCounters::is_conserved`]); `corrections ⊆ counted`,
//!   `conflicting_duplicates ⊆ duplicates`; ticks are counted apart.
//!
//! # Rows do not depend on when they are drained
//! Every decision above — classification, the watermark, which panes close and with
//! which sequence — is taken inside `on_event`/`on_tick`, as a function of the state and
//! the record only. Closed panes are appended to a queue in a fixed order (window, dims,
//! row kind, sequence within one step; steps in record order). `drain_closed` only reads
//! that queue and prices it with the contracts, a pure function. Hence the sequence of
//! rows obtained by concatenating all drains is the same whether the loop drains after
//! every record, once per commit, or once at the end: commit timing, batch boundaries
//! and restarts cannot change a row's content or id. `tests/pipeline_props.rs` checks
//! this with arbitrary inputs.
//!
//! # Copies
//! `PartitionState: Clone`. The clone is a deep copy (O(state): panes, dedupe set,
//! queued rows) and is exactly the state after the last record fed. The aggregator
//! does not copy the state at commits: after an abort it rebuilds a partition that
//! changed from its committed checkpoint (below), as after a restart.
//!
//! # Bounded restore
//! The aggregator keeps no copy of this state: after a crash, a rebalance or an abort
//! it rebuilds a partition's state by re-reading its input from a low-water offset `L`
//! up to the committed offset `C`. [`PartitionState::low_water`] gives `L` and the
//! [`Clock`] just before it (watermark, largest counted event time, last tick time);
//! [`PartitionState::resume`] starts a state at that clock, the records of `[L, C)`
//! are fed to it, and [`PartitionState::finish_restore`] takes the committed counters
//! and compares the rebuilt state's [`StateDigest`] with the committed one. The cost of
//! a restore is the live state's worth of input, not the partition's history.
//!
//! Let `F = max(dedupe_horizon, allowed_lateness + correction_horizon + W)`. Once the
//! watermark passes a window's `end + F`, nothing of the window is left: its ids
//! expired, its on-time panes closed, and a boundary crossing after `end + L + C` closed
//! its correction panes and dropped its correction sequences. Each window with live
//! state is *marked* with the offset of its first counted event and the clock before
//! it; the mark is forgotten at `end + F`. `L` is the smallest marked offset. Why
//! re-reading `[L, C)` rebuilds exactly the live state at `C`:
//! - windows whose first counted event lies at or after `L` (every window live at `C`)
//!   see all their records again, under the same watermark trajectory, so every
//!   classification, pane, correction sequence and remembered id is rebuilt;
//! - a window *straddling* `L` (counted events before it) is not live at `C`, so its
//!   rebuilt panes and rows are dropped by `C`. Its records after `L` can be decided
//!   differently only as duplicates of originals before `L`: an exact copy has its
//!   original's event time, not above the clock's largest counted event time, so
//!   counting it moves no watermark;
//! - a *conflicting* duplicate of an original before `L` could carry any event time
//!   and would be counted by the restore, moving the watermark. So each conflicting
//!   duplicate *pins* the oldest mark at its offset for as long as its own window is
//!   live; `L` is lowered until no pinned duplicate at or after `L` has its original
//!   before `L`. After its own window is forgotten the pin is not needed: a wrongly
//!   raised watermark only ever affects windows up to the duplicate's own.
//! - too-late and rejected records depend only on the watermark and the record.
//!
//! The one case the argument does not cover is `pane_token_limit` (a pane within 2⁴⁰
//! tokens of overflowing) in a window straddling `L` that also received exact copies of
//! events before `L`: the restore could decide one event differently. The committed
//! digest catches it, and the restore refuses rather than bill from another state.
//! `tests/pipeline_props.rs` restores at every commit point of arbitrary inputs and
//! checks the digest and every later decision and row.
//!
//! # Memory
//! [`PartitionState::approx_state_bytes`] estimates heap bytes from capacities: the
//! dedupe set (see [`crate::dedupe`]), each open pane (key and accumulator in its
//! window's hash table), the interned dims strings (each distinct string once per
//! partition, not once per pane) and queued rows. Measured with `TALLY_MEMORY_FULL=1 cargo
//! test -p tally-core --test pipeline_props -- --nocapture --test-threads=1 memory_per`:
//! - per remembered event id: 68.9 bytes estimated, 52.4 bytes of resident set
//!   (1 000 000 ids);
//! - per open key (one pane of short dims strings, in one window; panes are a hash map
//!   per window), every key with its own tenant string (so one interned string per
//!   key, the worst case): 228.9 bytes estimated; the resident set grew 278 bytes per
//!   key including the key's event id (≈ 52), so ≈ 226 bytes per pane (200 000 keys).
//!   Keys that share their strings, as a tenant's panes do, cost only their slot in
//!   the window's table.
//! - emptied tables kept for reuse: the last closed on-time window's (about one
//!   window's panes) and up to 16 closed correction tables; counted in the estimate,
//!   never copied by `Clone`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::mem::size_of;

use crate::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use crate::codec::UsageEventRef;
use crate::contracts::{Contracts, PricingError};
use crate::dedupe::{Claim, DedupeSet, Probe, hash_buckets_for_capacity};
use crate::event::{Cloud, EventId, RequestStatus, TokenCounts, UsageEvent};
use crate::identity::{RowIdentity, row_id};
use crate::money::{MoneyError, RowAmounts};
use crate::window::{Window, WindowSize};

mod symbols;

use symbols::{Sym, Symbols};

/// Largest token sum of one kind in one pane: 2⁴⁰ ≈ 1.1 × 10¹² tokens.
pub const MAX_PANE_TOKENS_PER_KIND: u64 = 1 << 40;

/// The parameters of one partition's state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionParams {
    /// Window size.
    pub window: WindowSize,
    /// How far behind the largest counted event time the watermark trails, ms.
    pub max_out_of_orderness_ms: i64,
    /// How long after its end (in watermark time) a window stays open, ms.
    pub allowed_lateness_ms: i64,
    /// How long after closing a window accepts corrections, ms.
    pub correction_horizon_ms: i64,
    /// How long after its window's end an event id is remembered, ms.
    /// Must be at least `allowed_lateness_ms + correction_horizon_ms`.
    pub dedupe_horizon_ms: i64,
    /// Input topic name (part of every row's identity).
    pub source_topic: String,
    /// Input partition.
    pub partition: i32,
}

/// Why partition parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// A duration is negative.
    #[error("{field} must not be negative, got {value_ms} ms")]
    Negative {
        /// The parameter.
        field: &'static str,
        /// Its value.
        value_ms: i64,
    },
    /// `allowed_lateness + correction_horizon` overflows.
    #[error("allowed_lateness_ms + correction_horizon_ms overflows")]
    HorizonOverflow,
    /// The dedupe horizon is shorter than lateness plus correction horizon.
    #[error(
        "dedupe_horizon_ms {dedupe_horizon_ms} must be at least allowed_lateness_ms + correction_horizon_ms = {required_ms}"
    )]
    DedupeHorizonTooShort {
        /// The dedupe horizon given.
        dedupe_horizon_ms: i64,
        /// allowed lateness + correction horizon.
        required_ms: i64,
    },
    /// The source topic is empty.
    #[error("source_topic must not be empty")]
    EmptyTopic,
    /// The partition is negative.
    #[error("partition must not be negative, got {partition}")]
    NegativePartition {
        /// The partition given.
        partition: i32,
    },
}

impl PartitionParams {
    /// Checks the parameters across fields.
    pub fn validate(&self) -> Result<(), ParamsError> {
        let durations = [
            ("max_out_of_orderness_ms", self.max_out_of_orderness_ms),
            ("allowed_lateness_ms", self.allowed_lateness_ms),
            ("correction_horizon_ms", self.correction_horizon_ms),
            ("dedupe_horizon_ms", self.dedupe_horizon_ms),
        ];
        for (field, value_ms) in durations {
            if value_ms < 0 {
                return Err(ParamsError::Negative { field, value_ms });
            }
        }
        let required_ms = self
            .allowed_lateness_ms
            .checked_add(self.correction_horizon_ms)
            .ok_or(ParamsError::HorizonOverflow)?;
        if self.dedupe_horizon_ms < required_ms {
            return Err(ParamsError::DedupeHorizonTooShort {
                dedupe_horizon_ms: self.dedupe_horizon_ms,
                required_ms,
            });
        }
        if self.source_topic.is_empty() {
            return Err(ParamsError::EmptyTopic);
        }
        if self.partition < 0 {
            return Err(ParamsError::NegativePartition {
                partition: self.partition,
            });
        }
        Ok(())
    }
}

/// Why an event was rejected by the state machine (each maps to a stable label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The cloud is the schema's unknown symbol: never priced at 0.
    UnknownCloud,
    /// The status is the schema's unknown symbol.
    UnknownStatus,
    /// The event time's window is not representable in i64 milliseconds.
    EventTimeOutOfRange,
    /// No price-book version is in force at the window start.
    NoPriceInForce,
    /// The price-book version in force does not price the model.
    UnknownModel,
    /// No share-rule version is in force at the window start.
    NoShareRulesInForce,
    /// Counting the event would push a pane's token sum above [`MAX_PANE_TOKENS_PER_KIND`].
    PaneTokenLimit,
}

impl RejectReason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [RejectReason; 7] = [
        RejectReason::UnknownCloud,
        RejectReason::UnknownStatus,
        RejectReason::EventTimeOutOfRange,
        RejectReason::NoPriceInForce,
        RejectReason::UnknownModel,
        RejectReason::NoShareRulesInForce,
        RejectReason::PaneTokenLimit,
    ];

    /// Stable, low-cardinality label (DLQ header, metric label).
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownCloud => "unknown_cloud",
            RejectReason::UnknownStatus => "unknown_status",
            RejectReason::EventTimeOutOfRange => "event_time_out_of_range",
            RejectReason::NoPriceInForce => "no_price_in_force",
            RejectReason::UnknownModel => "unknown_model",
            RejectReason::NoShareRulesInForce => "no_share_rules_in_force",
            RejectReason::PaneTokenLimit => "pane_token_limit",
        }
    }
}

/// Which pane a counted event went into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CountedAs {
    /// The window is open: the on-time pane (row with correction sequence 0).
    OnTime,
    /// The window closed within the correction horizon: its open correction pane.
    Correction,
}

/// The decision about one usage event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Classified {
    /// Counted into a pane; the loop has nothing to write for it now.
    Counted {
        /// On time or as a correction.
        pane: CountedAs,
        /// The kind of row it will appear in.
        row_kind: RowKind,
    },
    /// Same id and payload as a remembered event: dropped, counted as a duplicate.
    Duplicate,
    /// Same id as a remembered event, different payload: dropped, counted as a
    /// (conflicting) duplicate.
    ConflictingDuplicate,
    /// Its window passed the correction horizon: the loop writes it to `usage.late`.
    TooLate,
    /// Invalid for pricing: the loop writes it to the DLQ with the reason.
    Rejected(RejectReason),
}

/// Cumulative per-partition counters (committed with the offsets by the loop).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PartitionCounters {
    /// Usage records fed (events and records rejected by the loop), ticks excluded.
    pub consumed: u64,
    /// Events counted, on time or as corrections.
    pub counted: u64,
    /// Of `counted`, those counted as corrections.
    pub corrections: u64,
    /// Duplicates, conflicting ones included.
    pub duplicates: u64,
    /// Of `duplicates`, those whose payload differed from the first occurrence.
    pub conflicting_duplicates: u64,
    /// Events too late even for a correction.
    pub too_late: u64,
    /// Rejected records (by the loop or by the state machine).
    pub rejected: u64,
    /// Ticks read.
    pub ticks: u64,
}

impl PartitionCounters {
    /// `consumed = counted + duplicates + too_late + rejected`.
    pub fn is_conserved(&self) -> bool {
        let accounted = u128::from(self.counted)
            + u128::from(self.duplicates)
            + u128::from(self.too_late)
            + u128::from(self.rejected);
        u128::from(self.consumed) == accounted
    }
}

/// The partition's event-time clock at one offset: besides the live windows, all that
/// classification at that offset depends on (see "Bounded restore" in the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Clock {
    /// The watermark, `None` before the first counted event or tick.
    pub watermark_ms: Option<i64>,
    /// The largest counted event time.
    pub max_event_time_ms: Option<i64>,
    /// The largest tick time read.
    pub last_tick_ms: Option<i64>,
}

/// A conflicting duplicate at offset `anchor` and the oldest mark when it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pin {
    anchor: i64,
    pinned: LowWater,
}

/// Where a restore may start: the offset `L` and the partition's clock just before the
/// record at `L` was read. Re-reading `[L, C)` from a state resumed at this clock gives
/// the live state at `C` (see "Bounded restore" in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LowWater {
    /// First offset to re-read.
    pub offset: i64,
    /// The clock before that offset.
    pub clock: Clock,
}

/// A check of the live state, committed with each checkpoint and compared after a
/// restore: the clock, the sizes of every part of the state, and an order-independent
/// hash of the open panes (window, offsets, counts, token sums), the correction
/// sequences and the window marks. Stable across releases (its hash is defined here,
/// not by a hashing crate), because it is persisted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StateDigest {
    /// The clock.
    pub clock: Clock,
    /// Remembered event ids.
    pub remembered_ids: u64,
    /// Open on-time and correction panes.
    pub open_panes: u64,
    /// Keys whose last correction sequence is kept.
    pub correction_keys: u64,
    /// Windows with live state (see [`PartitionState::low_water`]).
    pub live_windows: u64,
    /// Wrapping sum of a 64-bit mix of every pane, sequence and window mark.
    pub content: u64,
}

/// Why closed rows could not be priced (only possible when `drain_closed` is given
/// contracts other than those the events were classified with).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowPricingError {
    /// No price, or an unknown model, at the window start.
    #[error(transparent)]
    Pricing(#[from] PricingError),
    /// No share-rule version in force at the window start.
    #[error("no share-rule version is in force at {time_ms} ms")]
    NoShareRulesInForce {
        /// The window start.
        time_ms: i64,
    },
    /// An amount does not fit.
    #[error(transparent)]
    Money(#[from] MoneyError),
}

/// The channel partner of a key without one.
const NO_PARTNER: Sym = Sym::MAX;

/// A pane key: the dims as symbols of the partition's [`Symbols`], and the row kind.
/// Twenty bytes, `Copy`, compared and hashed in the table slot; the strings are read
/// back from the symbols only when the pane's row is ordered and built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PaneKey {
    tenant: Sym,
    model: Sym,
    /// [`NO_PARTNER`] for none.
    partner: Sym,
    region: Sym,
    cloud: Cloud,
    row_kind: RowKind,
}

impl Hash for PaneKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Every field, packed into three writes.
        state.write_u64(u64::from(self.tenant) | (u64::from(self.model) << 32));
        state.write_u64(u64::from(self.partner) | (u64::from(self.region) << 32));
        state.write_u16(u16::from(self.cloud as u8) | (u16::from(self.row_kind as u8) << 8));
    }
}

impl PaneKey {
    /// The symbols the key holds.
    fn symbols(&self) -> impl Iterator<Item = Sym> {
        let partner = (self.partner != NO_PARTNER).then_some(self.partner);
        [self.tenant, self.model, self.region]
            .into_iter()
            .chain(partner)
    }
}

/// The open panes of one window. A hash map of small integer keys: the pane of every
/// counted event is looked up here (on the hot path, `benches/hot_path.rs`). Iteration
/// order does not matter: closed panes are sorted by their dims strings before they are
/// queued, so the hasher is foldhash with a per-process random seed (its order, like
/// the symbol numbers, is never observable).
type Panes = HashMap<PaneKey, PaneAcc, foldhash::fast::RandomState>;

/// Last correction sequence per key of one window.
type Sequences = HashMap<PaneKey, u32, foldhash::fast::RandomState>;

/// The fields of a usage event the state machine reads, borrowed from an owned
/// [`UsageEvent`] or from a record ([`UsageEventRef`]), so both forms take the same path.
#[derive(Debug, Clone, Copy)]
struct EventFields<'a> {
    event_id: EventId,
    occurred_at_ms: i64,
    tenant_id: &'a str,
    model: &'a str,
    cloud: Cloud,
    channel_partner: Option<&'a str>,
    region: &'a str,
    tokens: TokenCounts,
    status: RequestStatus,
}

impl<'a> From<&'a UsageEvent> for EventFields<'a> {
    fn from(event: &'a UsageEvent) -> EventFields<'a> {
        EventFields {
            event_id: event.event_id,
            occurred_at_ms: event.occurred_at_ms,
            tenant_id: &event.tenant_id,
            model: &event.model,
            cloud: event.cloud,
            channel_partner: event.channel_partner.as_deref(),
            region: &event.region,
            tokens: event.tokens,
            status: event.status,
        }
    }
}

impl<'a> From<&UsageEventRef<'a>> for EventFields<'a> {
    fn from(event: &UsageEventRef<'a>) -> EventFields<'a> {
        EventFields {
            event_id: event.event_id,
            occurred_at_ms: event.occurred_at_ms,
            tenant_id: event.tenant_id,
            model: event.model,
            cloud: event.cloud,
            channel_partner: event.channel_partner,
            region: event.region,
            tokens: event.tokens,
            status: event.status,
        }
    }
}

/// Sums of one pane.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PaneAcc {
    event_count: u64,
    tokens: TokenCounts,
    first_offset: i64,
    last_offset: i64,
    first_event_time_ms: i64,
    last_event_time_ms: i64,
}

impl PaneAcc {
    fn first(offset: i64, event: &EventFields<'_>) -> PaneAcc {
        PaneAcc {
            event_count: 1,
            tokens: event.tokens,
            first_offset: offset,
            last_offset: offset,
            first_event_time_ms: event.occurred_at_ms,
            last_event_time_ms: event.occurred_at_ms,
        }
    }

    /// Whether adding `tokens` keeps every kind within [`MAX_PANE_TOKENS_PER_KIND`].
    fn fits(&self, tokens: &TokenCounts) -> bool {
        let pairs = [
            (self.tokens.input, tokens.input),
            (self.tokens.cached_input, tokens.cached_input),
            (self.tokens.output, tokens.output),
            (self.tokens.reasoning, tokens.reasoning),
        ];
        pairs.into_iter().all(|(sum, add)| {
            sum.checked_add(add)
                .is_some_and(|total| total <= MAX_PANE_TOKENS_PER_KIND)
        })
    }

    fn add(&mut self, offset: i64, event: &EventFields<'_>) {
        self.event_count += 1;
        // `fits` was checked: no kind exceeds 2⁴⁰, so these additions are exact.
        self.tokens.add(&event.tokens);
        self.first_offset = self.first_offset.min(offset);
        self.last_offset = self.last_offset.max(offset);
        self.first_event_time_ms = self.first_event_time_ms.min(event.occurred_at_ms);
        self.last_event_time_ms = self.last_event_time_ms.max(event.occurred_at_ms);
    }
}

fn tokens_fit_alone(tokens: &TokenCounts) -> bool {
    [
        tokens.input,
        tokens.cached_input,
        tokens.output,
        tokens.reasoning,
    ]
    .into_iter()
    .all(|count| count <= MAX_PANE_TOKENS_PER_KIND)
}

/// The key of an event's pane when all its dims strings are interned (else no pane
/// holds them, and the pane is new).
#[inline]
fn known_key(symbols: &Symbols, event: &EventFields<'_>, row_kind: RowKind) -> Option<PaneKey> {
    Some(PaneKey {
        tenant: symbols.get(event.tenant_id)?,
        model: symbols.get(event.model)?,
        partner: match event.channel_partner {
            None => NO_PARTNER,
            Some(partner) => symbols.get(partner)?,
        },
        region: symbols.get(event.region)?,
        cloud: event.cloud,
        row_kind,
    })
}

/// Panes closed in one step from which they are sorted by symbol ranks rather than by
/// comparing texts (ranking costs a sort of the symbols).
const RANKED_SORT_MIN_PANES: usize = 256;

/// Orders two keys' dims as [`Dims`] orders the strings: tenant, model, cloud, channel
/// partner (none first), region.
fn cmp_dims(symbols: &Symbols, a: &PaneKey, b: &PaneKey) -> Ordering {
    let partner = |key: &PaneKey| (key.partner != NO_PARTNER).then(|| symbols.text(key.partner));
    symbols
        .text(a.tenant)
        .cmp(symbols.text(b.tenant))
        .then_with(|| symbols.text(a.model).cmp(symbols.text(b.model)))
        .then_with(|| a.cloud.cmp(&b.cloud))
        .then_with(|| partner(a).cmp(&partner(b)))
        .then_with(|| symbols.text(a.region).cmp(symbols.text(b.region)))
}

/// A pane that closed and waits to be priced and drained.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClosedPane {
    window: Window,
    key: PaneKey,
    correction_seq: u32,
    acc: PaneAcc,
}

/// The state of one input partition. See the module docs. `Clone` is a deep copy,
/// without the spare tables.
#[derive(Debug, Clone)]
pub struct PartitionState {
    params: PartitionParams,
    /// allowed_lateness + correction_horizon (checked at construction).
    too_late_after_ms: i64,
    max_event_time_ms: Option<i64>,
    watermark_ms: Option<i64>,
    last_tick_ms: Option<i64>,
    /// `max(dedupe_horizon, allowed_lateness + correction_horizon + window)`: once the
    /// watermark passes a window's end + this, nothing of the window is left (ids
    /// expired, panes closed, correction sequences dropped).
    forget_after_ms: i64,
    /// Every window with live state, by window start: the offset of its first counted
    /// event and the clock before it (the candidates for the low-water offset).
    marks: BTreeMap<i64, LowWater>,
    /// The start of the window marked last (skips the map lookup for runs of events
    /// in one window; no effect on decisions).
    last_marked_window_ms: i64,
    /// Conflicting duplicates that a restore must not re-read without their original,
    /// by the end of the duplicate's own window, in offset order. Of consecutive pins
    /// of one window end that hold the same low water only the last (largest offset)
    /// is kept: it satisfies [`PartitionState::low_water`]'s condition whenever an
    /// earlier one does, with the same effect, so the set stays as small as the number
    /// of distinct low waters instead of one entry per duplicate.
    pins: BTreeMap<i64, Vec<Pin>>,
    /// On-time panes of open windows, by window start.
    on_time: BTreeMap<i64, Panes>,
    /// Open correction panes of closed windows, by window start.
    corrections: BTreeMap<i64, Panes>,
    /// Last correction sequence emitted per key, for windows still within the horizon.
    last_correction_seq: BTreeMap<i64, Sequences>,
    /// The dims strings of every key above and of the queued closed panes.
    symbols: Symbols,
    dedupe: DedupeSet,
    closed: Vec<ClosedPane>,
    counters: PartitionCounters,
    /// Pane count of the last on-time window that closed: the capacity a new window's
    /// table starts with, so it does not rehash its way up (no effect on decisions).
    on_time_panes_hint: usize,
    /// Emptied pane tables kept for windows to come (no effect on decisions): that of
    /// the last on-time window that closed, and up to [`SPARE_CORRECTION_TABLES`] of
    /// the correction panes closed last. A window's table is megabytes at scale; a
    /// new one cost a large malloc and a page fault per 4 KiB, and a correction table
    /// grew from empty through every power of two. Not state: a copy starts without
    /// them.
    spare_panes: SparePanes,
}

/// See [`PartitionState`]'s `spare_panes`.
#[derive(Debug, Default)]
struct SparePanes {
    on_time: Option<Panes>,
    corrections: Vec<Panes>,
}

/// Not state: a copy starts without spares.
impl Clone for SparePanes {
    fn clone(&self) -> SparePanes {
        SparePanes::default()
    }
}

/// At most this many emptied correction tables are kept (one per window of the
/// correction horizon is enough at the horizons in use).
const SPARE_CORRECTION_TABLES: usize = 16;

impl PartitionState {
    /// A fresh partition state (no watermark, nothing open, counters at 0).
    pub fn new(params: PartitionParams) -> Result<PartitionState, ParamsError> {
        params.validate()?;
        let too_late_after_ms = params
            .allowed_lateness_ms
            .checked_add(params.correction_horizon_ms)
            .ok_or(ParamsError::HorizonOverflow)?;
        let forget_after_ms = too_late_after_ms
            .checked_add(params.window.as_ms())
            .ok_or(ParamsError::HorizonOverflow)?
            .max(params.dedupe_horizon_ms);
        let dedupe = DedupeSet::new(params.dedupe_horizon_ms);
        Ok(PartitionState {
            params,
            too_late_after_ms,
            max_event_time_ms: None,
            watermark_ms: None,
            last_tick_ms: None,
            forget_after_ms,
            marks: BTreeMap::new(),
            last_marked_window_ms: i64::MIN,
            pins: BTreeMap::new(),
            on_time: BTreeMap::new(),
            corrections: BTreeMap::new(),
            last_correction_seq: BTreeMap::new(),
            symbols: Symbols::default(),
            dedupe,
            closed: Vec::new(),
            counters: PartitionCounters::default(),
            on_time_panes_hint: 0,
            spare_panes: SparePanes::default(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &PartitionParams {
        &self.params
    }

    /// Classifies one usage event at `offset` and, if counted, adds it to its pane.
    /// `payload_fingerprint` tells a duplicate from a conflicting duplicate
    /// (normally [`crate::dedupe::payload_fingerprint`] of the event).
    pub fn on_event(
        &mut self,
        offset: i64,
        event: &UsageEvent,
        payload_fingerprint: u64,
        contracts: &Contracts,
    ) -> Classified {
        self.on_fields(offset, event.into(), payload_fingerprint, contracts)
    }

    /// Asks the CPU to fetch the memory that classifying an event with `event_id` will
    /// read first (its dedupe slot). A hint with no effect on the state: the loops call
    /// it for the record a few places ahead of the one they apply
    /// (`tally_aggregator::record::prefetch_record`), so the fetch overlaps the records
    /// in between.
    #[inline]
    pub fn prefetch(&self, event_id: EventId) {
        self.dedupe.prefetch(event_id);
    }

    /// [`PartitionState::on_event`] for an event borrowed from its record: the same
    /// decision and state change, with strings copied only when a new pane opens.
    /// `payload_fingerprint` is normally [`crate::dedupe::payload_fingerprint_ref`],
    /// which equals the owned form's fingerprint.
    pub fn on_event_ref(
        &mut self,
        offset: i64,
        event: &UsageEventRef<'_>,
        payload_fingerprint: u64,
        contracts: &Contracts,
    ) -> Classified {
        self.on_fields(offset, event.into(), payload_fingerprint, contracts)
    }

    fn on_fields(
        &mut self,
        offset: i64,
        event: EventFields<'_>,
        payload_fingerprint: u64,
        contracts: &Contracts,
    ) -> Classified {
        self.counters.consumed += 1;
        let classified = self.classify_and_count(offset, &event, payload_fingerprint, contracts);
        match classified {
            Classified::Counted { pane, .. } => {
                self.counters.counted += 1;
                if self.symbols.collection_due() {
                    self.collect_symbols();
                }
                if pane == CountedAs::Correction {
                    self.counters.corrections += 1;
                }
                self.max_event_time_ms = Some(match self.max_event_time_ms {
                    Some(max) => max.max(event.occurred_at_ms),
                    None => event.occurred_at_ms,
                });
                let candidate = event
                    .occurred_at_ms
                    .saturating_sub(self.params.max_out_of_orderness_ms);
                self.advance_watermark(candidate, false);
            }
            Classified::Duplicate => self.counters.duplicates += 1,
            Classified::ConflictingDuplicate => {
                self.counters.duplicates += 1;
                self.counters.conflicting_duplicates += 1;
            }
            Classified::TooLate => self.counters.too_late += 1,
            Classified::Rejected(_) => self.counters.rejected += 1,
        }
        classified
    }

    fn classify_and_count(
        &mut self,
        offset: i64,
        event: &EventFields<'_>,
        payload_fingerprint: u64,
        contracts: &Contracts,
    ) -> Classified {
        // 1. Rejected.
        if event.cloud == Cloud::Unknown {
            return Classified::Rejected(RejectReason::UnknownCloud);
        }
        if event.status == RequestStatus::Unknown {
            return Classified::Rejected(RejectReason::UnknownStatus);
        }
        let Some(window) = self.params.window.window_of(event.occurred_at_ms) else {
            return Classified::Rejected(RejectReason::EventTimeOutOfRange);
        };
        let price_book = match contracts.price_for(event.model, window.start_ms) {
            Ok((version, _price)) => version,
            Err(PricingError::NoPriceInForce { .. }) => {
                return Classified::Rejected(RejectReason::NoPriceInForce);
            }
            Err(PricingError::UnknownModel { .. }) => {
                return Classified::Rejected(RejectReason::UnknownModel);
            }
        };
        if contracts.share_rules_at(window.start_ms).is_none() {
            return Classified::Rejected(RejectReason::NoShareRulesInForce);
        }
        let row_kind = if price_book.is_billable(event.status) {
            RowKind::Billable
        } else {
            RowKind::NonBillable
        };

        // 2. Too late (no dedupe lookup).
        let pane = match self.watermark_ms {
            None => CountedAs::OnTime,
            Some(watermark) => {
                if window.end_ms.saturating_add(self.too_late_after_ms) <= watermark {
                    return Classified::TooLate;
                }
                if window
                    .end_ms
                    .saturating_add(self.params.allowed_lateness_ms)
                    <= watermark
                {
                    CountedAs::Correction
                } else {
                    CountedAs::OnTime
                }
            }
        };

        // 3. Duplicate. A new id is remembered below, once the event is counted.
        let new_id = match self.dedupe.probe(event.event_id, payload_fingerprint) {
            Probe::New(new_id) => new_id,
            Probe::Remembered(Claim::Duplicate) => return Classified::Duplicate,
            Probe::Remembered(_) => {
                self.pin(window.end_ms, offset);
                return Classified::ConflictingDuplicate;
            }
        };

        // 4. Counted: claim the id and add to the pane in one step.
        let panes = match pane {
            CountedAs::OnTime => {
                let hint = self.on_time_panes_hint;
                let spare = &mut self.spare_panes.on_time;
                self.on_time.entry(window.start_ms).or_insert_with(|| {
                    spare.take().unwrap_or_else(|| {
                        Panes::with_capacity_and_hasher(hint, Default::default())
                    })
                })
            }
            CountedAs::Correction => {
                let spare = &mut self.spare_panes.corrections;
                self.corrections
                    .entry(window.start_ms)
                    .or_insert_with(|| spare.pop().unwrap_or_default())
            }
        };
        let known = known_key(&self.symbols, event, row_kind);
        if let Some(acc) = known.and_then(|key| panes.get_mut(&key)) {
            if !acc.fits(&event.tokens) {
                return Classified::Rejected(RejectReason::PaneTokenLimit);
            }
            acc.add(offset, event);
        } else {
            if !tokens_fit_alone(&event.tokens) {
                // The new id is left unremembered (`new_id` is not used again).
                if panes.is_empty() {
                    self.forget_empty_window(pane, window.start_ms);
                }
                return Classified::Rejected(RejectReason::PaneTokenLimit);
            }
            let key = match known {
                Some(key) => key,
                None => PaneKey {
                    tenant: self.symbols.intern(event.tenant_id),
                    model: self.symbols.intern(event.model),
                    partner: event
                        .channel_partner
                        .map_or(NO_PARTNER, |partner| self.symbols.intern(partner)),
                    region: self.symbols.intern(event.region),
                    cloud: event.cloud,
                    row_kind,
                },
            };
            panes.insert(key, PaneAcc::first(offset, event));
        }
        new_id.remember(window.end_ms);
        if window.start_ms != self.last_marked_window_ms {
            self.mark(window.start_ms, offset);
        }
        Classified::Counted { pane, row_kind }
    }

    /// The clock now (before the record being classified changes it).
    pub fn clock(&self) -> Clock {
        Clock {
            watermark_ms: self.watermark_ms,
            max_event_time_ms: self.max_event_time_ms,
            last_tick_ms: self.last_tick_ms,
        }
    }

    /// Records the first counted event of a window that has no live state yet.
    fn mark(&mut self, window_start_ms: i64, offset: i64) {
        let clock = self.clock();
        self.marks
            .entry(window_start_ms)
            .or_insert(LowWater { offset, clock });
        self.last_marked_window_ms = window_start_ms;
    }

    /// Pins the current low water of the windows for a conflicting duplicate at
    /// `offset` whose own window ends at `window_end_ms`.
    fn pin(&mut self, window_end_ms: i64, offset: i64) {
        // The original is remembered, so its window is marked: the oldest mark is at or
        // before the original's offset.
        if let Some(oldest) = self.marks.values().min_by_key(|mark| mark.offset).copied() {
            let pins = self.pins.entry(window_end_ms).or_default();
            match pins.last_mut() {
                Some(last) if last.pinned == oldest => last.anchor = offset,
                _ => pins.push(Pin {
                    anchor: offset,
                    pinned: oldest,
                }),
            }
        }
    }

    fn forget_empty_window(&mut self, pane: CountedAs, window_start_ms: i64) {
        let panes = match pane {
            CountedAs::OnTime => &mut self.on_time,
            CountedAs::Correction => &mut self.corrections,
        };
        if panes.get(&window_start_ms).is_some_and(Panes::is_empty) {
            panes.remove(&window_start_ms);
        }
    }

    /// Reads a tick: raises the watermark to `tick_time_ms` (never lowers it) and
    /// closes every open correction pane.
    pub fn on_tick(&mut self, tick_time_ms: i64) {
        self.counters.ticks += 1;
        self.last_tick_ms = Some(
            self.last_tick_ms
                .map_or(tick_time_ms, |last| last.max(tick_time_ms)),
        );
        self.advance_watermark(tick_time_ms, true);
    }

    /// Counts a usage record the loop rejected before it reached the state machine
    /// (undecodable, invalid, misrouted), so conservation holds over all records.
    pub fn on_rejected_record(&mut self) {
        self.counters.consumed += 1;
        self.counters.rejected += 1;
    }

    fn advance_watermark(&mut self, candidate_ms: i64, at_tick: bool) {
        let old = self.watermark_ms;
        let new = match old {
            Some(old) => old.max(candidate_ms),
            None => candidate_ms,
        };
        if old == Some(new) && !at_tick {
            // Nothing can close or expire at a watermark already reached: every window
            // and id due at it was handled when it was first reached, and what was
            // counted since is, by classification, not due.
            return;
        }
        self.watermark_ms = Some(new);
        let window = self.params.window;
        let crossed_boundary = old.is_some_and(|old| window.index_of(old) != window.index_of(new));
        // Panes closed in this step are appended here, then sorted in place.
        let first_new = self.closed.len();

        // On-time windows whose end + allowed lateness the watermark reached.
        while let Some(entry) = self.on_time.first_entry() {
            let start_ms = *entry.key();
            let end_ms = start_ms.saturating_add(window.as_ms());
            if end_ms.saturating_add(self.params.allowed_lateness_ms) > new {
                break;
            }
            let bounds = Window { start_ms, end_ms };
            let mut panes = entry.remove();
            self.on_time_panes_hint = panes.len();
            self.closed.reserve(panes.len());
            for (key, acc) in panes.drain() {
                self.closed.push(ClosedPane {
                    window: bounds,
                    key,
                    correction_seq: 0,
                    acc,
                });
            }
            if self.spare_panes.on_time.is_none() {
                self.spare_panes.on_time = Some(panes);
            }
        }

        if crossed_boundary || at_tick {
            let open_corrections = std::mem::take(&mut self.corrections);
            for (start_ms, mut panes) in open_corrections {
                let bounds = Window {
                    start_ms,
                    end_ms: start_ms.saturating_add(window.as_ms()),
                };
                let sequences = self.last_correction_seq.entry(start_ms).or_default();
                for (key, acc) in panes.drain() {
                    let sequence = sequences.entry(key).or_insert(0);
                    *sequence += 1;
                    self.closed.push(ClosedPane {
                        window: bounds,
                        key,
                        correction_seq: *sequence,
                        acc,
                    });
                }
                if self.spare_panes.corrections.len() < SPARE_CORRECTION_TABLES {
                    self.spare_panes.corrections.push(panes);
                }
            }
            // Windows past the correction horizon can get no more events: their
            // sequences are no longer needed (no correction pane is open now).
            while let Some(entry) = self.last_correction_seq.first_entry() {
                let end_ms = entry.key().saturating_add(window.as_ms());
                if end_ms.saturating_add(self.too_late_after_ms) > new {
                    break;
                }
                entry.remove();
            }
        }

        self.dedupe.expire(new);
        self.forget_windows(new);

        // No two panes closed in one step share (window, dims, row kind, sequence) (a
        // window is either on time or in corrections, and each holds one pane per key),
        // so an unstable sort yields the one order there is: that of the strings, as
        // `Dims` orders them. Many panes are sorted by the ranks of their symbols'
        // texts (the same order, in integer comparisons), a few by the texts.
        let step = &mut self.closed[first_new..];
        if step.len() >= RANKED_SORT_MIN_PANES {
            let ranks = self.symbols.ranks();
            let rank = |sym: Sym| ranks.get(sym as usize).copied().unwrap_or(0);
            step.sort_unstable_by_key(|pane| {
                let key = &pane.key;
                let partner = match key.partner {
                    NO_PARTNER => 0,
                    partner => u64::from(rank(partner)) + 1,
                };
                (
                    pane.window.start_ms,
                    rank(key.tenant),
                    rank(key.model),
                    key.cloud,
                    partner,
                    rank(key.region),
                    key.row_kind,
                    pane.correction_seq,
                )
            });
        } else {
            let symbols = &self.symbols;
            step.sort_unstable_by(|a, b| {
                a.window
                    .start_ms
                    .cmp(&b.window.start_ms)
                    .then_with(|| cmp_dims(symbols, &a.key, &b.key))
                    .then_with(|| a.key.row_kind.cmp(&b.key.row_kind))
                    .then_with(|| a.correction_seq.cmp(&b.correction_seq))
            });
        }
    }

    /// Forgets the marks of windows with nothing left at `watermark_ms`, and the pins
    /// of conflicting duplicates whose own window has nothing left.
    fn forget_windows(&mut self, watermark_ms: i64) {
        let window_ms = self.params.window.as_ms();
        let forget_after_ms = self.forget_after_ms;
        let gone =
            |window_end_ms: i64| window_end_ms.saturating_add(forget_after_ms) <= watermark_ms;
        while let Some(entry) = self.marks.first_entry() {
            if !gone(entry.key().saturating_add(window_ms)) {
                break;
            }
            debug_assert!(!self.on_time.contains_key(entry.key()));
            debug_assert!(!self.corrections.contains_key(entry.key()));
            debug_assert!(!self.last_correction_seq.contains_key(entry.key()));
            entry.remove();
        }
        while let Some(entry) = self.pins.first_entry() {
            if !gone(*entry.key()) {
                break;
            }
            entry.remove();
        }
    }

    /// Frees the symbols no key holds any more (see [`symbols`]).
    fn collect_symbols(&mut self) {
        let open = self
            .on_time
            .values()
            .chain(self.corrections.values())
            .flat_map(|panes| panes.keys());
        let sequenced = self
            .last_correction_seq
            .values()
            .flat_map(|sequences| sequences.keys());
        let queued = self.closed.iter().map(|pane| &pane.key);
        let live: Vec<Sym> = open
            .chain(sequenced)
            .chain(queued)
            .flat_map(PaneKey::symbols)
            .collect();
        self.symbols.retain(live);
    }

    /// Prices and returns the rows of every pane closed since the last drain, in
    /// closing order ((window, dims, row kind) within one step). On error nothing is
    /// drained.
    pub fn drain_closed(
        &mut self,
        contracts: &Contracts,
    ) -> Result<Vec<BillingAggregate>, RowPricingError> {
        let mut rows = Vec::with_capacity(self.closed.len());
        for pane in &self.closed {
            rows.push(self.price_pane(pane, contracts)?);
        }
        self.closed.clear();
        Ok(rows)
    }

    fn price_pane(
        &self,
        pane: &ClosedPane,
        contracts: &Contracts,
    ) -> Result<BillingAggregate, RowPricingError> {
        let time_ms = pane.window.start_ms;
        let key = &pane.key;
        let symbols = &self.symbols;
        let dims = Dims {
            tenant_id: symbols.text(key.tenant).to_owned(),
            model: symbols.text(key.model).to_owned(),
            cloud: key.cloud,
            channel_partner: (key.partner != NO_PARTNER)
                .then(|| symbols.text(key.partner).to_owned()),
            region: symbols.text(key.region).to_owned(),
        };
        let (price_book, model_price) = contracts.price_for(&dims.model, time_ms)?;
        let Some((share_rules, beneficiaries)) =
            contracts.shares_for(dims.cloud, dims.channel_partner.as_deref(), time_ms)
        else {
            return Err(RowPricingError::NoShareRulesInForce { time_ms });
        };
        let (gross_micros, shares, net_micros) = match key.row_kind {
            RowKind::NonBillable => (0, Vec::new(), 0),
            RowKind::Billable => {
                let exact = model_price.exact_gross(&pane.acc.tokens)?;
                let basis_points: Vec<u32> = beneficiaries
                    .iter()
                    .map(|beneficiary| beneficiary.basis_points)
                    .collect();
                let amounts = RowAmounts::from_exact(exact, &basis_points)?;
                let shares = beneficiaries
                    .iter()
                    .zip(amounts.share_micros)
                    .map(|(beneficiary, amount_micros)| PartnerShare {
                        beneficiary: beneficiary.partner.clone(),
                        basis_points: beneficiary.basis_points,
                        amount_micros,
                    })
                    .collect();
                (amounts.gross_micros, shares, amounts.net_micros)
            }
        };
        let id = row_id(&RowIdentity {
            source_topic: &self.params.source_topic,
            source_partition: self.params.partition,
            window: pane.window,
            dims: &dims,
            price_book_version: price_book.version(),
            share_rule_version: share_rules.version(),
            row_kind: key.row_kind,
            correction_seq: pane.correction_seq,
        });
        Ok(BillingAggregate {
            id,
            window_start_ms: pane.window.start_ms,
            window_end_ms: pane.window.end_ms,
            dims,
            row_kind: key.row_kind,
            correction_seq: pane.correction_seq,
            event_count: pane.acc.event_count,
            tokens: pane.acc.tokens,
            currency: price_book.currency().to_owned(),
            gross_micros,
            shares,
            net_micros,
            price_book_version: price_book.version().to_owned(),
            share_rule_version: share_rules.version().to_owned(),
            source_topic: self.params.source_topic.clone(),
            source_partition: self.params.partition,
            first_offset: pane.acc.first_offset,
            last_offset: pane.acc.last_offset,
            first_event_time_ms: pane.acc.first_event_time_ms,
            last_event_time_ms: pane.acc.last_event_time_ms,
        })
    }

    /// The watermark, or `None` before the first counted event or tick.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark_ms
    }

    /// The low-water offset for a checkpoint at `next_offset` (the committed offset):
    /// the first offset a restore must re-read, with the clock before it. It is the
    /// first counted offset of the oldest window that still has live state, lowered to
    /// the pinned low water of every conflicting duplicate at or after it whose window
    /// is still live; `next_offset` itself when nothing is live. Never decreases from
    /// one checkpoint to the next. See "Bounded restore" in the module docs.
    pub fn low_water(&self, next_offset: i64) -> LowWater {
        let mut low = LowWater {
            offset: next_offset,
            clock: self.clock(),
        };
        for mark in self.marks.values() {
            if mark.offset < low.offset {
                low = *mark;
            }
        }
        loop {
            let mut lowered = false;
            for pin in self.pins.values().flatten() {
                if pin.anchor >= low.offset && pin.pinned.offset < low.offset {
                    low = pin.pinned;
                    lowered = true;
                }
            }
            if !lowered {
                return low;
            }
        }
    }

    /// The base of the partition's tick clock: the later of the largest counted event
    /// time and the last tick time (`None` before either).
    pub fn tick_base_ms(&self) -> Option<i64> {
        match (self.max_event_time_ms, self.last_tick_ms) {
            (Some(event), Some(tick)) => Some(event.max(tick)),
            (event, tick) => event.or(tick),
        }
    }

    /// Whether a tick at `tick_time_ms` would close anything: an open correction pane
    /// (every tick closes them) or an on-time window whose end + allowed lateness it
    /// reaches. A tick that closes nothing is not worth writing.
    pub fn tick_would_close(&self, tick_time_ms: i64) -> bool {
        if !self.corrections.is_empty() {
            return true;
        }
        self.on_time.keys().next().is_some_and(|&start_ms| {
            start_ms
                .saturating_add(self.params.window.as_ms())
                .saturating_add(self.params.allowed_lateness_ms)
                <= tick_time_ms
        })
    }

    /// Drops the closed rows without pricing them (a restore re-closes rows that were
    /// committed before).
    pub fn discard_closed(&mut self) {
        self.closed.clear();
    }

    /// The check of the live state committed with a checkpoint (see [`StateDigest`]).
    /// O(open panes + live windows).
    pub fn digest(&self) -> StateDigest {
        let mut content = 0u64;
        for (tag, windows) in [(1u64, &self.on_time), (2, &self.corrections)] {
            for (&start_ms, panes) in windows {
                for (key, acc) in panes {
                    let parts = [
                        tag,
                        start_ms as u64,
                        key.cloud as u64 | (key.row_kind as u64) << 8,
                        acc.event_count,
                        acc.first_offset as u64,
                        acc.last_offset as u64,
                        acc.first_event_time_ms as u64,
                        acc.last_event_time_ms as u64,
                        acc.tokens.input,
                        acc.tokens.cached_input,
                        acc.tokens.output,
                        acc.tokens.reasoning,
                    ];
                    content = content.wrapping_add(mix_all(&parts));
                }
            }
        }
        for (&start_ms, sequences) in &self.last_correction_seq {
            for (key, &sequence) in sequences {
                let parts = [
                    3,
                    start_ms as u64,
                    key.cloud as u64 | (key.row_kind as u64) << 8,
                    u64::from(sequence),
                ];
                content = content.wrapping_add(mix_all(&parts));
            }
        }
        for (&start_ms, mark) in &self.marks {
            let parts = [4, start_ms as u64, mark.offset as u64];
            content = content.wrapping_add(mix_all(&parts));
        }
        let correction_keys: usize = self.last_correction_seq.values().map(HashMap::len).sum();
        StateDigest {
            clock: self.clock(),
            remembered_ids: self.dedupe.len() as u64,
            open_panes: self.open_panes() as u64,
            correction_keys: correction_keys as u64,
            live_windows: self.marks.len() as u64,
            content,
        }
    }

    /// A state to restore into: nothing live, the clock of a [`LowWater`], and counters
    /// at 0. Feed it the records from the low-water offset up to the committed offset,
    /// then call [`PartitionState::finish_restore`].
    pub fn resume(params: PartitionParams, clock: Clock) -> Result<PartitionState, ParamsError> {
        let mut state = PartitionState::new(params)?;
        state.watermark_ms = clock.watermark_ms;
        state.max_event_time_ms = clock.max_event_time_ms;
        state.last_tick_ms = clock.last_tick_ms;
        Ok(state)
    }

    /// Ends a restore: drops the rows closed while re-reading (they were committed
    /// before), takes the committed cumulative counters, and checks the rebuilt state
    /// against the committed digest.
    pub fn finish_restore(
        &mut self,
        committed_counters: PartitionCounters,
        committed_digest: &StateDigest,
    ) -> Result<(), Box<DigestMismatch>> {
        self.closed.clear();
        self.counters = committed_counters;
        let rebuilt = self.digest();
        if rebuilt != *committed_digest {
            return Err(Box::new(DigestMismatch {
                committed: *committed_digest,
                rebuilt,
            }));
        }
        Ok(())
    }

    /// Cumulative counters.
    pub fn counters(&self) -> PartitionCounters {
        self.counters
    }

    /// Windows with an open on-time pane or an open correction pane.
    pub fn open_windows(&self) -> usize {
        // A window is either open (on-time panes) or closed (correction panes), never both.
        self.on_time.len() + self.corrections.len()
    }

    /// Open panes, on-time and correction.
    pub fn open_panes(&self) -> usize {
        let on_time: usize = self.on_time.values().map(Panes::len).sum();
        let corrections: usize = self.corrections.values().map(Panes::len).sum();
        on_time + corrections
    }

    /// Closed rows waiting for [`PartitionState::drain_closed`].
    pub fn closed_pending(&self) -> usize {
        self.closed.len()
    }

    /// Remembered event ids.
    pub fn remembered_ids(&self) -> usize {
        self.dedupe.len()
    }

    /// Estimated heap bytes of the state (see the module docs): capacities, with hash
    /// tables at their bucket count (slot + control byte each), B-tree entries counted
    /// at twice their size (nodes filled in key order run about half full) and each
    /// interned string at its allocator chunk.
    pub fn approx_state_bytes(&self) -> usize {
        let pane_slot = size_of::<(PaneKey, PaneAcc)>() + 1;
        let window_entry = (size_of::<i64>() + size_of::<Panes>()) * 2;
        let mut bytes = self.dedupe.approx_bytes() + self.symbols.approx_bytes();
        for panes in self.on_time.values().chain(self.corrections.values()) {
            bytes += window_entry + hash_buckets_for_capacity(panes.capacity()) * pane_slot;
        }
        let spares = &self.spare_panes;
        for spare in spares.on_time.iter().chain(&spares.corrections) {
            bytes += hash_buckets_for_capacity(spare.capacity()) * pane_slot;
        }
        let seq_window_entry = (size_of::<i64>() + size_of::<Sequences>()) * 2;
        let seq_slot = size_of::<(PaneKey, u32)>() + 1;
        for sequences in self.last_correction_seq.values() {
            bytes += seq_window_entry + hash_buckets_for_capacity(sequences.capacity()) * seq_slot;
        }
        bytes += self.closed.capacity() * size_of::<ClosedPane>();
        bytes
    }
}

/// A restored state that differs from the committed one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the state rebuilt from the input differs from the committed one: committed {committed:?}, rebuilt {rebuilt:?}"
)]
pub struct DigestMismatch {
    /// The digest committed with the checkpoint.
    pub committed: StateDigest,
    /// The digest of the rebuilt state.
    pub rebuilt: StateDigest,
}

/// splitmix64's finaliser: a fixed, well-mixing 64-bit permutation.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An order-dependent hash of `parts` (a chain of [`mix64`]).
fn mix_all(parts: &[u64]) -> u64 {
    let mut hash = 0x9e37_79b9_7f4a_7c15u64;
    for part in parts.iter() {
        hash = mix64(hash ^ *part);
    }
    hash
}

/// Bytes an allocation of `capacity` bytes occupies: nothing when empty, else the
/// capacity plus an 8-byte header rounded up to 16, at least 32 (glibc malloc chunks).
fn allocation_bytes(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    (capacity + 8).next_multiple_of(16).max(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(tenant: &str, model: &str, cloud: Cloud, partner: Option<&str>, region: &str) -> Dims {
        Dims {
            tenant_id: tenant.to_owned(),
            model: model.to_owned(),
            cloud,
            channel_partner: partner.map(str::to_owned),
            region: region.to_owned(),
        }
    }

    fn intern(symbols: &mut Symbols, dims: &Dims, row_kind: RowKind) -> PaneKey {
        PaneKey {
            tenant: symbols.intern(&dims.tenant_id),
            model: symbols.intern(&dims.model),
            partner: dims
                .channel_partner
                .as_deref()
                .map_or(NO_PARTNER, |partner| symbols.intern(partner)),
            region: symbols.intern(&dims.region),
            cloud: dims.cloud,
            row_kind,
        }
    }

    const CONTRACTS: &str = r#"
[[price_book]]
version = "2025-01"
effective_from = "2025-01-01T00:00:00Z"
currency = "USD"
billable_statuses = ["succeeded"]

[price_book.models.m]
input = 1_000_000_000
cached_input = 500_000_000
output = 2_000_000_000
reasoning = 2_000_000_000

[[share_rules]]
version = "2025-01"
effective_from = "2025-01-01T00:00:00Z"
"#;
    const T0: i64 = 1_735_689_600_000;

    fn params() -> PartitionParams {
        PartitionParams {
            window: WindowSize::ONE_MINUTE,
            max_out_of_orderness_ms: 1_000,
            allowed_lateness_ms: 1_000,
            correction_horizon_ms: 120_000,
            dedupe_horizon_ms: 121_000,
            source_topic: "usage.events".to_owned(),
            partition: 0,
        }
    }

    fn usage(id: u128, tenant: &str, occurred_at_ms: i64) -> UsageEvent {
        UsageEvent {
            event_id: crate::event::EventId(id),
            request_id: format!("req-{id}"),
            occurred_at_ms,
            tenant_id: tenant.to_owned(),
            model: "m".to_owned(),
            cloud: Cloud::Aws,
            channel_partner: None,
            region: "r".to_owned(),
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

    #[test]
    fn clone_from_yields_a_state_that_continues_like_the_source() {
        let contracts =
            Contracts::load(CONTRACTS, WindowSize::ONE_MINUTE).expect("test contracts load");
        let mut source = PartitionState::new(params()).expect("valid params");
        for id in 0..50u128 {
            let time = T0 + i64::try_from(id).expect("small") * 3_000;
            let tenant = format!("t{}", id % 4);
            source.on_event(
                i64::try_from(id).expect("small"),
                &usage(id, &tenant, time),
                0,
                &contracts,
            );
        }
        // A target with unrelated content and a different partition.
        let mut target = PartitionState::new(PartitionParams {
            partition: 3,
            ..params()
        })
        .expect("valid params");
        for id in 1_000..1_200u128 {
            target.on_event(0, &usage(id, "other", T0 + 600_000), 0, &contracts);
        }
        target.clone_from(&source);
        let mut copy = source.clone();
        for state in [&source, &target, &copy] {
            assert_eq!(state.counters(), source.counters());
            assert_eq!(state.remembered_ids(), source.remembered_ids());
            assert_eq!(state.open_panes(), source.open_panes());
            assert_eq!(state.watermark(), source.watermark());
            assert_eq!(state.params(), source.params());
        }
        // The same later records (a duplicate, a new event, a tick) give the same rows.
        let mut rows = Vec::new();
        for state in [&mut source, &mut target, &mut copy] {
            state.on_event(50, &usage(7, "t3", T0 + 21_000), 0, &contracts);
            state.on_event(51, &usage(60, "t1", T0 + 160_000), 0, &contracts);
            state.on_tick(T0 + 3_600_000);
            rows.push(state.drain_closed(&contracts).expect("rows price"));
        }
        assert!(!rows[0].is_empty());
        assert_eq!(rows[0], rows[1]);
        assert_eq!(rows[0], rows[2]);
        assert_eq!(target.counters().duplicates, 1);
    }

    #[test]
    fn symbol_keys_sort_like_their_dims_strings_both_ways() {
        let all = [
            dims("a", "m", Cloud::Aws, None, "r"),
            dims("a", "m", Cloud::Aws, Some("p"), "r"),
            dims("a", "m", Cloud::Aws, Some("p"), "q"),
            dims("a", "m", Cloud::Gcp, None, "r"),
            dims("a", "m", Cloud::Azure, Some(""), "r"),
            dims("a", "n", Cloud::Aws, None, "r"),
            dims("ab", "m", Cloud::Aws, None, "r"),
            dims("b", "", Cloud::Aws, None, ""),
            dims("é", "m", Cloud::Aws, Some("r"), "a"),
            dims("m", "a", Cloud::Aws, Some("b"), "é"),
        ];
        let mut symbols = Symbols::default();
        // Intern in an order unrelated to the texts' order.
        let mut keys = Vec::new();
        for dims in all.iter().rev() {
            for row_kind in [RowKind::NonBillable, RowKind::Billable] {
                keys.push((dims, row_kind, intern(&mut symbols, dims, row_kind)));
            }
        }
        let acc = PaneAcc::first(0, &EventFields::from(&usage(1, "t", 0)));
        let mut expected = keys.clone();
        expected.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let expected: Vec<PaneKey> = expected.iter().map(|(_, _, key)| *key).collect();
        for (left_dims, left_kind, left) in &keys {
            for (right_dims, right_kind, right) in &keys {
                assert_eq!(
                    cmp_dims(&symbols, left, right).then(left_kind.cmp(right_kind)),
                    (left_dims, left_kind).cmp(&(right_dims, right_kind))
                );
                assert_eq!(
                    left == right,
                    (left_dims, left_kind) == (right_dims, right_kind)
                );
            }
        }
        // Both sorts of `advance_watermark`: by texts (few panes), by ranks (many).
        for windows in [1, RANKED_SORT_MIN_PANES.div_ceil(keys.len())] {
            let mut state = PartitionState::new(params()).expect("valid params");
            state.symbols = symbols.clone();
            for index in (0..windows).rev() {
                let start_ms = i64::try_from(index).expect("small") * 60_000;
                let panes = keys.iter().map(|(_, _, key)| (*key, acc.clone())).collect();
                state.on_time.insert(start_ms, panes);
            }
            state.on_tick(T0);
            let sorted: Vec<(i64, PaneKey)> = state
                .closed
                .iter()
                .map(|pane| (pane.window.start_ms, pane.key))
                .collect();
            let expected: Vec<(i64, PaneKey)> = (0..windows)
                .flat_map(|index| {
                    let start_ms = i64::try_from(index).expect("small") * 60_000;
                    expected.iter().map(move |key| (start_ms, *key))
                })
                .collect();
            assert_eq!(sorted, expected, "{windows} windows");
        }
    }

    #[test]
    fn collecting_symbols_at_any_point_changes_no_row() {
        let contracts =
            Contracts::load(CONTRACTS, WindowSize::ONE_MINUTE).expect("test contracts load");
        let mut plain = PartitionState::new(params()).expect("valid params");
        let mut collecting = plain.clone();
        let mut rows = [Vec::new(), Vec::new()];
        for id in 0..2_000u128 {
            let step = i64::try_from(id).expect("small");
            // Mostly forward in time, every seventh event 70 s back (a correction once
            // its window closed), tenants and regions churning.
            let time = T0 + step * 700 - if id % 7 == 0 { 70_000 } else { 0 };
            let mut event = usage(id, &format!("t{}", (id * 31) % 97), time);
            event.region = format!("r{}", id / 150);
            if id % 5 == 0 {
                event.channel_partner = Some(format!("p{}", id % 3));
            }
            let print = crate::dedupe::payload_fingerprint(&event);
            let offset = step;
            let decided = [
                plain.on_event(offset, &event, print, &contracts),
                collecting.on_event(offset, &event, print, &contracts),
            ];
            assert_eq!(decided[0], decided[1]);
            collecting.collect_symbols();
            if id % 100 == 0 {
                for (state, rows) in [&mut plain, &mut collecting].into_iter().zip(&mut rows) {
                    rows.extend(state.drain_closed(&contracts).expect("rows price"));
                }
                collecting.collect_symbols();
            }
        }
        for (state, rows) in [&mut plain, &mut collecting].into_iter().zip(&mut rows) {
            state.on_tick(T0 + 3_600_000);
            rows.extend(state.drain_closed(&contracts).expect("rows price"));
        }
        assert!(rows[0].iter().any(|row| row.correction_seq > 0));
        assert!(rows[0].iter().any(|row| row.dims.channel_partner.is_some()));
        assert_eq!(rows[0], rows[1]);
        collecting.collect_symbols();
        assert!(collecting.symbols.len() < plain.symbols.len());
        assert_eq!(collecting.symbols.len(), 0);
    }
}
