//! Properties of the per-partition pipeline, against an independent reference model.
//!
//! Inputs are arbitrary sequences of usage events with disorder, exact copies,
//! conflicting copies, events without a price and ticks (ahead of and behind the
//! watermark), always ending with a tick a day ahead. The reference model below
//! re-derives every decision from DESIGN.md with the simplest possible code (a linear
//! list instead of the dedupe set, no panes) and is compared with `PartitionState`:
//! - each record's classification and the watermark after it are the same;
//! - rows, summed per (window, dims, row kind) over correction sequences, equal the
//!   reference recount of counted events;
//! - conservation: consumed = counted + duplicates + too late + rejected;
//! - draining after every record and draining once at the end yield identical rows;
//!   so does aborting work after a snapshot and re-feeding from the snapshot;
//! - each row closes at the record the closing rules name, with exactly its pane's
//!   events (offsets, times, tokens), in (window, dims, row kind, sequence) order;
//! - no row id appears twice; sequences per key are 0 and/or 1, 2, … without gaps;
//! - every row is priced exactly by the version in force at its window start;
//! - events read borrowed from their encoded records (the aggregator's path) are
//!   decided exactly as the owned events are, with the same fingerprints.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use proptest::prelude::*;
use proptest::sample::Index;

use tally_core::aggregate::{BillingAggregate, Dims, RowKind};
use tally_core::codec::{DecodedRef, SchemaId, decode_record_ref, encode_usage_event};
use tally_core::contracts::{Contracts, PricingError, parse_utc_timestamp};
use tally_core::dedupe::{DedupeSet, payload_fingerprint, payload_fingerprint_ref};
use tally_core::event::{Cloud, EventId, RequestStatus, TokenCounts, UsageEvent};
use tally_core::money::round_half_even;
use tally_core::partition::{
    Classified, CountedAs, PartitionCounters, PartitionParams, PartitionState, RejectReason,
};
use tally_core::window::WindowSize;

const DEFAULT_CONTRACTS: &str = include_str!("../../../deploy/contracts/default.toml");
const WINDOW_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

fn contracts() -> Contracts {
    Contracts::load(DEFAULT_CONTRACTS, WindowSize::ONE_MINUTE).expect("default contracts")
}

fn ms(text: &str) -> i64 {
    parse_utc_timestamp(text).expect("valid timestamp")
}

// ---------------------------------------------------------------------------------
// Input generation.

#[derive(Debug, Clone)]
enum Record {
    Event(Box<UsageEvent>),
    Tick(i64),
}

#[derive(Debug, Clone)]
struct FreshSpec {
    back_ms: i64,
    advance_ms: i64,
    tenant: usize,
    model: usize,
    cloud: usize,
    partner: usize,
    region: usize,
    status: usize,
    ancient: bool,
    tokens: TokenCounts,
}

#[derive(Debug, Clone)]
enum Op {
    Fresh(FreshSpec),
    Copy(Index),
    Conflict(Index, u64, i64),
    Tick(i64),
}

fn fresh_spec() -> impl Strategy<Value = FreshSpec> {
    (
        (
            // Mostly on a 5-second grid, so times hit window and horizon boundaries exactly.
            prop_oneof![
                3 => (0i64..=4).prop_map(|k| k * 5_000),
                1 => (0i64..=80).prop_map(|k| k * 5_000),
                1 => 0i64..=400_000,
            ],
            prop_oneof![2 => (0i64..=2).prop_map(|k| k * 5_000), 1 => 0i64..=10_000],
        ),
        (
            0usize..3,
            0usize..20,
            0usize..20,
            0usize..3,
            0usize..2,
            0usize..4,
        ),
        prop::bool::weighted(0.03),
        (
            0u64..5_000_000,
            0u64..2_000_000,
            0u64..1_000_000,
            0u64..500_000,
        ),
    )
        .prop_map(
            |(
                (back_ms, advance_ms),
                (tenant, model, cloud, partner, region, status),
                ancient,
                tokens,
            )| {
                FreshSpec {
                    back_ms,
                    advance_ms,
                    tenant,
                    model,
                    cloud,
                    partner,
                    region,
                    status,
                    ancient,
                    tokens: TokenCounts {
                        input: tokens.0,
                        cached_input: tokens.1,
                        output: tokens.2,
                        reasoning: tokens.3,
                    },
                }
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => fresh_spec().prop_map(Op::Fresh),
        3 => any::<Index>().prop_map(Op::Copy),
        1 => (any::<Index>(), 1u64..1_000, prop_oneof![Just(0i64), -180_000i64..180_000])
            .prop_map(|(of, delta, shift)| Op::Conflict(of, delta, shift)),
        2 => prop_oneof![(-18i64..=48).prop_map(|k| k * 5_000), -90_000i64..=240_000]
            .prop_map(Op::Tick),
    ]
}

fn params_strategy() -> impl Strategy<Value = PartitionParams> {
    (
        prop::sample::select(vec![0i64, 30_000, 120_000]),
        prop::sample::select(vec![0i64, 1_000, 60_000]),
        prop::sample::select(vec![0i64, 45_000, 120_000, 300_000]),
        prop::sample::select(vec![0i64, 60_000]),
    )
        .prop_map(
            |(out_of_orderness, lateness, correction, extra)| PartitionParams {
                window: WindowSize::ONE_MINUTE,
                max_out_of_orderness_ms: out_of_orderness,
                allowed_lateness_ms: lateness,
                correction_horizon_ms: correction,
                dedupe_horizon_ms: lateness + correction + extra,
                source_topic: "usage.events".to_owned(),
                partition: 7,
            },
        )
}

const TENANTS: [&str; 3] = ["tenant-a", "tenant-b", "tenant-c"];
const REGIONS: [&str; 2] = ["eu-west-1", "us-east-1"];
const PARTNERS: [Option<&str>; 3] = [None, Some("northwind"), Some("fabrikam")];
const STATUSES: [RequestStatus; 4] = [
    RequestStatus::Succeeded,
    RequestStatus::Succeeded,
    RequestStatus::Failed,
    RequestStatus::Cancelled,
];

fn model_name(index: usize) -> &'static str {
    match index {
        0..=9 => "atlas-large",
        10..=18 => "atlas-mini",
        _ => "atlas-huge",
    }
}

fn cloud_of(index: usize) -> Cloud {
    match index {
        0..=6 => Cloud::Aws,
        7..=12 => Cloud::Gcp,
        13..=16 => Cloud::Openai,
        17..=18 => Cloud::Azure,
        _ => Cloud::Unknown,
    }
}

/// Turns ops into records. Event times start just before the 2026-01-01 price change,
/// so runs cross a contract boundary; the last record is a tick a day ahead.
fn build_records(ops: &[Op]) -> Vec<Record> {
    let mut clock = ms("2025-12-31T23:45:00Z");
    let ancient_base = ms("2023-06-01T00:00:00Z");
    let mut fresh: Vec<UsageEvent> = Vec::new();
    let mut records = Vec::new();
    for op in ops {
        match op {
            Op::Fresh(spec) => {
                clock += spec.advance_ms;
                let occurred_at_ms = if spec.ancient {
                    ancient_base + spec.back_ms
                } else {
                    clock - spec.back_ms
                };
                let id = 0x5eed_0000_0000_0000_0000_0000_0000_0000u128 + fresh.len() as u128;
                let event = UsageEvent {
                    event_id: EventId(id),
                    request_id: format!("req-{}", fresh.len()),
                    occurred_at_ms,
                    tenant_id: TENANTS[spec.tenant].to_owned(),
                    model: model_name(spec.model).to_owned(),
                    cloud: cloud_of(spec.cloud),
                    channel_partner: PARTNERS[spec.partner].map(str::to_owned),
                    region: REGIONS[spec.region].to_owned(),
                    tokens: spec.tokens,
                    status: STATUSES[spec.status],
                    attributes: BTreeMap::new(),
                    service_tier: None,
                };
                fresh.push(event.clone());
                records.push(Record::Event(Box::new(event)));
            }
            Op::Copy(of) => {
                if !fresh.is_empty() {
                    records.push(Record::Event(Box::new(
                        fresh[of.index(fresh.len())].clone(),
                    )));
                }
            }
            Op::Conflict(of, delta, shift_ms) => {
                if !fresh.is_empty() {
                    let mut event = fresh[of.index(fresh.len())].clone();
                    event.tokens.output += delta;
                    event.occurred_at_ms += shift_ms;
                    records.push(Record::Event(Box::new(event)));
                }
            }
            Op::Tick(ahead_ms) => records.push(Record::Tick(clock + ahead_ms)),
        }
    }
    records.push(Record::Tick(clock + DAY_MS));
    records
}

// ---------------------------------------------------------------------------------
// The reference model: DESIGN.md's rules, written as plainly as possible.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    OnTime(RowKind),
    Correction(RowKind),
    Duplicate,
    Conflicting,
    TooLate,
    Rejected(RejectReason),
}

type Key = (i64, Dims, RowKind);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Totals {
    events: u64,
    tokens: TokenCounts,
}

struct CountedEvent {
    index: usize,
    key: Key,
    on_time: bool,
    tokens: TokenCounts,
    occurred_at_ms: i64,
}

struct Reference {
    /// Per record: the expected classification (None for ticks).
    classes: Vec<Option<Expected>>,
    /// Per record: the watermark after it.
    watermarks: Vec<Option<i64>>,
    /// Counted events per (window start, dims, row kind).
    totals: BTreeMap<Key, Totals>,
    /// Every counted event, in record order.
    counted: Vec<CountedEvent>,
}

fn reference(records: &[Record], params: &PartitionParams, contracts: &Contracts) -> Reference {
    let lateness = params.allowed_lateness_ms;
    let correction = params.correction_horizon_ms;
    let dedupe = params.dedupe_horizon_ms;
    let mut watermark: Option<i64> = None;
    // (id, fingerprint, window end) of every counted event.
    let mut counted: Vec<(u128, u64, i64)> = Vec::new();
    let mut out = Reference {
        classes: Vec::new(),
        watermarks: Vec::new(),
        totals: BTreeMap::new(),
        counted: Vec::new(),
    };
    for (index, record) in records.iter().enumerate() {
        match record {
            Record::Tick(time) => {
                watermark = Some(watermark.map_or(*time, |w| w.max(*time)));
                out.classes.push(None);
            }
            Record::Event(event) => {
                let start = event.occurred_at_ms.div_euclid(WINDOW_MS) * WINDOW_MS;
                let end = start + WINDOW_MS;
                let fingerprint = payload_fingerprint(event);
                let class = 'decide: {
                    if event.cloud == Cloud::Unknown {
                        break 'decide Expected::Rejected(RejectReason::UnknownCloud);
                    }
                    let kind = match contracts.price_for(&event.model, start) {
                        Err(PricingError::NoPriceInForce { .. }) => {
                            break 'decide Expected::Rejected(RejectReason::NoPriceInForce);
                        }
                        Err(PricingError::UnknownModel { .. }) => {
                            break 'decide Expected::Rejected(RejectReason::UnknownModel);
                        }
                        Ok((book, _)) if book.is_billable(event.status) => RowKind::Billable,
                        Ok(_) => RowKind::NonBillable,
                    };
                    if let Some(w) = watermark
                        && end + lateness + correction <= w
                    {
                        break 'decide Expected::TooLate;
                    }
                    let remembered = counted.iter().find(|(id, _, remembered_end)| {
                        *id == event.event_id.0
                            && watermark.is_none_or(|w| remembered_end + dedupe > w)
                    });
                    if let Some((_, first_fingerprint, _)) = remembered {
                        break 'decide if *first_fingerprint == fingerprint {
                            Expected::Duplicate
                        } else {
                            Expected::Conflicting
                        };
                    }
                    counted.push((event.event_id.0, fingerprint, end));
                    let dims = Dims {
                        tenant_id: event.tenant_id.clone(),
                        model: event.model.clone(),
                        cloud: event.cloud,
                        channel_partner: event.channel_partner.clone(),
                        region: event.region.clone(),
                    };
                    let totals = out.totals.entry((start, dims.clone(), kind)).or_default();
                    totals.events += 1;
                    totals.tokens.add(&event.tokens);
                    let on_time = watermark.is_none_or(|w| end + lateness > w);
                    out.counted.push(CountedEvent {
                        index,
                        key: (start, dims, kind),
                        on_time,
                        tokens: event.tokens,
                        occurred_at_ms: event.occurred_at_ms,
                    });
                    let candidate = event.occurred_at_ms - params.max_out_of_orderness_ms;
                    watermark = Some(watermark.map_or(candidate, |w| w.max(candidate)));
                    if on_time {
                        Expected::OnTime(kind)
                    } else {
                        Expected::Correction(kind)
                    }
                };
                out.classes.push(Some(class));
            }
        }
        out.watermarks.push(watermark);
    }
    out
}

/// What a row says about its pane, plus the record after which it became drainable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RowShape {
    emitted_after: usize,
    window_start_ms: i64,
    dims: Dims,
    row_kind: RowKind,
    correction_seq: u32,
    event_count: u64,
    tokens: (u64, u64, u64, u64),
    first_offset: i64,
    last_offset: i64,
    first_event_time_ms: i64,
    last_event_time_ms: i64,
}

fn shape_of(emitted_after: usize, row: &BillingAggregate) -> RowShape {
    RowShape {
        emitted_after,
        window_start_ms: row.window_start_ms,
        dims: row.dims.clone(),
        row_kind: row.row_kind,
        correction_seq: row.correction_seq,
        event_count: row.event_count,
        tokens: (
            row.tokens.input,
            row.tokens.cached_input,
            row.tokens.output,
            row.tokens.reasoning,
        ),
        first_offset: row.first_offset,
        last_offset: row.last_offset,
        first_event_time_ms: row.first_event_time_ms,
        last_event_time_ms: row.last_event_time_ms,
    }
}

/// The rows DESIGN.md's closing rules produce, derived from the reference's counted
/// events and watermarks: an on-time pane closes at the first record after which the
/// watermark reaches end + allowed lateness; a correction pane closes at the next tick
/// or the next record whose watermark lies in another window than the one before.
fn expected_rows(
    records: &[Record],
    expected: &Reference,
    params: &PartitionParams,
) -> Vec<RowShape> {
    let closes_corrections: Vec<bool> = (0..records.len())
        .map(|index| {
            let is_tick = matches!(records[index], Record::Tick(_));
            let before = if index == 0 {
                None
            } else {
                expected.watermarks[index - 1]
            };
            let after = expected.watermarks[index];
            let crossed = match (before, after) {
                (Some(before), Some(after)) => {
                    before.div_euclid(WINDOW_MS) != after.div_euclid(WINDOW_MS)
                }
                _ => false,
            };
            is_tick || crossed
        })
        .collect();
    // Group counted events by (key, closing record); sequences follow closing order.
    let mut panes: BTreeMap<(Key, usize, bool), Vec<&CountedEvent>> = BTreeMap::new();
    for event in &expected.counted {
        let (start, _, _) = &event.key;
        let close = if event.on_time {
            let due = start + WINDOW_MS + params.allowed_lateness_ms;
            (event.index..records.len())
                .find(|i| expected.watermarks[*i].is_some_and(|w| w >= due))
                .expect("the final tick closes every window")
        } else {
            (event.index + 1..records.len())
                .find(|i| closes_corrections[*i])
                .expect("the final tick closes every pane")
        };
        panes
            .entry((event.key.clone(), close, event.on_time))
            .or_default()
            .push(event);
    }
    let mut next_seq: BTreeMap<Key, u32> = BTreeMap::new();
    let mut shapes = Vec::new();
    for ((key, close, on_time), events) in panes {
        let correction_seq = if on_time {
            0
        } else {
            let seq = next_seq.entry(key.clone()).or_insert(0);
            *seq += 1;
            *seq
        };
        let mut tokens = TokenCounts::default();
        for event in &events {
            tokens.add(&event.tokens);
        }
        let (window_start_ms, dims, row_kind) = key;
        shapes.push(RowShape {
            emitted_after: close,
            window_start_ms,
            dims,
            row_kind,
            correction_seq,
            event_count: events.len() as u64,
            tokens: (
                tokens.input,
                tokens.cached_input,
                tokens.output,
                tokens.reasoning,
            ),
            first_offset: events
                .iter()
                .map(|e| e.index as i64)
                .min()
                .expect("non-empty"),
            last_offset: events
                .iter()
                .map(|e| e.index as i64)
                .max()
                .expect("non-empty"),
            first_event_time_ms: events
                .iter()
                .map(|e| e.occurred_at_ms)
                .min()
                .expect("non-empty"),
            last_event_time_ms: events
                .iter()
                .map(|e| e.occurred_at_ms)
                .max()
                .expect("non-empty"),
        });
    }
    shapes.sort();
    shapes
}

fn matches_expected(actual: Classified, expected: Expected) -> bool {
    match (actual, expected) {
        (
            Classified::Counted {
                pane: CountedAs::OnTime,
                row_kind,
            },
            Expected::OnTime(kind),
        ) => row_kind == kind,
        (
            Classified::Counted {
                pane: CountedAs::Correction,
                row_kind,
            },
            Expected::Correction(kind),
        ) => row_kind == kind,
        (Classified::Duplicate, Expected::Duplicate) => true,
        (Classified::ConflictingDuplicate, Expected::Conflicting) => true,
        (Classified::TooLate, Expected::TooLate) => true,
        (Classified::Rejected(reason), Expected::Rejected(expected)) => reason == expected,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------
// Driving the state machine.

struct Run {
    classes: Vec<Option<Classified>>,
    /// Per row (drained after every record): the record after which it was drained.
    emitted_after: Vec<usize>,
    watermarks: Vec<Option<i64>>,
    rows: Vec<BillingAggregate>,
    counters: PartitionCounters,
    final_state: PartitionState,
}

fn feed(
    state: &mut PartitionState,
    offset: i64,
    record: &Record,
    contracts: &Contracts,
) -> Option<Classified> {
    match record {
        Record::Event(event) => {
            Some(state.on_event(offset, event, payload_fingerprint(event), contracts))
        }
        Record::Tick(time) => {
            state.on_tick(*time);
            None
        }
    }
}

fn run(
    records: &[Record],
    params: &PartitionParams,
    contracts: &Contracts,
    drain_every_record: bool,
) -> Run {
    let mut state = PartitionState::new(params.clone()).expect("valid params");
    let mut classes = Vec::new();
    let mut watermarks = Vec::new();
    let mut rows = Vec::new();
    let mut emitted_after = Vec::new();
    for (index, record) in records.iter().enumerate() {
        let offset = i64::try_from(index).expect("small");
        classes.push(feed(&mut state, offset, record, contracts));
        watermarks.push(state.watermark());
        if drain_every_record {
            let drained = state.drain_closed(contracts).expect("priced");
            emitted_after.extend(std::iter::repeat_n(index, drained.len()));
            rows.extend(drained);
        }
    }
    rows.extend(state.drain_closed(contracts).expect("priced"));
    Run {
        classes,
        emitted_after,
        watermarks,
        rows,
        counters: state.counters(),
        final_state: state,
    }
}

/// Feeds `records[..cut]` and commits (drains, snapshots); feeds `abandoned` more
/// records and aborts (drops their rows, restores the snapshot); then feeds the rest.
fn run_with_abort(
    records: &[Record],
    params: &PartitionParams,
    contracts: &Contracts,
    cut: usize,
    abandoned: usize,
) -> Vec<BillingAggregate> {
    let mut state = PartitionState::new(params.clone()).expect("valid params");
    let mut committed_rows = Vec::new();
    for (offset, record) in (0i64..).zip(&records[..cut]) {
        feed(&mut state, offset, record, contracts);
    }
    committed_rows.extend(state.drain_closed(contracts).expect("priced"));
    let snapshot = state.clone();
    let abandoned_end = (cut + abandoned).min(records.len());
    for (offset, record) in (i64::try_from(cut).expect("small")..).zip(&records[cut..abandoned_end])
    {
        feed(&mut state, offset, record, contracts);
    }
    let _aborted_rows = state.drain_closed(contracts).expect("priced");
    state = snapshot;
    for (offset, record) in (i64::try_from(cut).expect("small")..).zip(&records[cut..]) {
        feed(&mut state, offset, record, contracts);
    }
    committed_rows.extend(state.drain_closed(contracts).expect("priced"));
    committed_rows
}

/// The row's amounts, recomputed from its tokens with plain integer arithmetic.
fn check_pricing(row: &BillingAggregate, contracts: &Contracts) {
    let (book, price) = contracts
        .price_for(&row.dims.model, row.window_start_ms)
        .expect("counted rows are priced");
    let (rules, beneficiaries) = contracts
        .shares_for(
            row.dims.cloud,
            row.dims.channel_partner.as_deref(),
            row.window_start_ms,
        )
        .expect("share rules in force");
    assert_eq!(row.price_book_version, book.version());
    assert_eq!(row.share_rule_version, rules.version());
    assert_eq!(row.currency, "USD");
    match row.row_kind {
        RowKind::NonBillable => {
            assert_eq!((row.gross_micros, row.net_micros), (0, 0));
            assert!(row.shares.is_empty());
        }
        RowKind::Billable => {
            let exact = i128::from(row.tokens.input) * i128::from(price.input.0)
                + i128::from(row.tokens.cached_input) * i128::from(price.cached_input.0)
                + i128::from(row.tokens.output) * i128::from(price.output.0)
                + i128::from(row.tokens.reasoning) * i128::from(price.reasoning.0);
            let gross = round_half_even(exact, 1_000_000_000).expect("positive denominator");
            assert_eq!(i128::from(row.gross_micros), gross);
            assert_eq!(row.shares.len(), beneficiaries.len());
            let mut shares_total = 0i64;
            for (share, beneficiary) in row.shares.iter().zip(beneficiaries) {
                assert_eq!(share.beneficiary, beneficiary.partner);
                assert_eq!(share.basis_points, beneficiary.basis_points);
                let expected = round_half_even(
                    exact * i128::from(beneficiary.basis_points),
                    10_000_000_000_000,
                )
                .expect("positive denominator");
                assert_eq!(i128::from(share.amount_micros), expected);
                shares_total += share.amount_micros;
            }
            assert_eq!(row.net_micros, row.gross_micros - shares_total);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn state_machine_agrees_with_reference_model(
        params in params_strategy(),
        ops in prop::collection::vec(op(), 1..160),
    ) {
        let contracts = contracts();
        let records = build_records(&ops);
        let expected = reference(&records, &params, &contracts);
        let actual = run(&records, &params, &contracts, false);

        // Classification and watermark, record by record.
        for (index, (class, want)) in actual.classes.iter().zip(&expected.classes).enumerate() {
            match (class, want) {
                (None, None) => {}
                (Some(class), Some(want)) => prop_assert!(
                    matches_expected(*class, *want),
                    "record {index}: got {class:?}, expected {want:?}"
                ),
                _ => prop_assert!(false, "record {index}: tick/event mismatch"),
            }
        }
        prop_assert_eq!(&actual.watermarks, &expected.watermarks);
        for pair in actual.watermarks.windows(2) {
            prop_assert!(pair[0] <= pair[1], "watermark went backwards: {:?}", pair);
        }

        // Rows summed over correction sequences equal the recount.
        let mut summed: BTreeMap<Key, Totals> = BTreeMap::new();
        for row in &actual.rows {
            prop_assert_eq!(row.window_end_ms - row.window_start_ms, WINDOW_MS);
            prop_assert!(row.window_start_ms <= row.first_event_time_ms);
            prop_assert!(row.first_event_time_ms <= row.last_event_time_ms);
            prop_assert!(row.last_event_time_ms < row.window_end_ms);
            prop_assert!(row.first_offset <= row.last_offset);
            prop_assert!(row.event_count > 0);
            let totals = summed
                .entry((row.window_start_ms, row.dims.clone(), row.row_kind))
                .or_default();
            totals.events += row.event_count;
            totals.tokens.add(&row.tokens);
        }
        prop_assert_eq!(&summed, &expected.totals);

        // Conservation, and the counters match the reference's tallies.
        let counters = actual.counters;
        prop_assert!(counters.is_conserved(), "{:?}", counters);
        let count = |pred: &dyn Fn(&Expected) -> bool| {
            expected.classes.iter().flatten().filter(|c| pred(c)).count() as u64
        };
        prop_assert_eq!(counters.counted, count(&|c| matches!(c, Expected::OnTime(_) | Expected::Correction(_))));
        prop_assert_eq!(counters.corrections, count(&|c| matches!(c, Expected::Correction(_))));
        prop_assert_eq!(counters.duplicates, count(&|c| matches!(c, Expected::Duplicate | Expected::Conflicting)));
        prop_assert_eq!(counters.conflicting_duplicates, count(&|c| matches!(c, Expected::Conflicting)));
        prop_assert_eq!(counters.too_late, count(&|c| matches!(c, Expected::TooLate)));
        prop_assert_eq!(counters.rejected, count(&|c| matches!(c, Expected::Rejected(_))));
        prop_assert_eq!(counters.consumed, expected.classes.iter().flatten().count() as u64);
        prop_assert_eq!(counters.ticks, expected.classes.iter().filter(|c| c.is_none()).count() as u64);

        // The final tick, a day ahead, closed everything and let every id expire.
        prop_assert_eq!(actual.final_state.open_panes(), 0);
        prop_assert_eq!(actual.final_state.open_windows(), 0);
        prop_assert_eq!(actual.final_state.closed_pending(), 0);
        prop_assert_eq!(actual.final_state.remembered_ids(), 0);
    }

    #[test]
    fn rows_do_not_depend_on_when_they_are_drained(
        params in params_strategy(),
        ops in prop::collection::vec(op(), 1..160),
        cut in any::<Index>(),
        abandoned in 0usize..40,
    ) {
        let contracts = contracts();
        let records = build_records(&ops);
        let once = run(&records, &params, &contracts, false);
        let every = run(&records, &params, &contracts, true);
        prop_assert_eq!(&once.rows, &every.rows);
        prop_assert_eq!(&once.classes, &every.classes);

        let cut = cut.index(records.len() + 1);
        let after_abort = run_with_abort(&records, &params, &contracts, cut, abandoned);
        prop_assert_eq!(&once.rows, &after_abort);
    }

    #[test]
    fn borrowed_records_are_decided_exactly_like_owned_events(
        params in params_strategy(),
        ops in prop::collection::vec(op(), 1..160),
    ) {
        let contracts = contracts();
        let records = build_records(&ops);
        let owned = run(&records, &params, &contracts, false);
        let mut state = PartitionState::new(params.clone()).expect("valid params");
        let mut classes = Vec::new();
        let mut watermarks = Vec::new();
        let mut bytes = Vec::new();
        for (offset, record) in (0i64..).zip(&records) {
            match record {
                Record::Event(event) => {
                    bytes.clear();
                    encode_usage_event(event, SchemaId::UsageEventV2, &mut bytes);
                    let Ok(DecodedRef::Usage(borrowed)) = decode_record_ref(&bytes) else {
                        panic!("an encoded event decodes");
                    };
                    let fingerprint = payload_fingerprint_ref(&borrowed);
                    prop_assert_eq!(fingerprint, payload_fingerprint(event));
                    classes.push(Some(state.on_event_ref(offset, &borrowed, fingerprint, &contracts)));
                }
                Record::Tick(time) => {
                    state.on_tick(*time);
                    classes.push(None);
                }
            }
            watermarks.push(state.watermark());
        }
        let rows = state.drain_closed(&contracts).expect("priced");
        prop_assert_eq!(&classes, &owned.classes);
        prop_assert_eq!(&watermarks, &owned.watermarks);
        prop_assert_eq!(&rows, &owned.rows);
        prop_assert_eq!(state.counters(), owned.counters);
    }

    #[test]
    fn rows_close_exactly_when_and_with_what_the_rules_say(
        params in params_strategy(),
        ops in prop::collection::vec(op(), 1..160),
    ) {
        // Each row closes at the record DESIGN.md's closing rules name, with exactly the
        // events they assign to its pane, in (window, dims, kind, sequence) order.
        let contracts = contracts();
        let records = build_records(&ops);
        let expected = reference(&records, &params, &contracts);
        let every = run(&records, &params, &contracts, true);
        let shapes: Vec<RowShape> = every
            .emitted_after
            .iter()
            .zip(&every.rows)
            .map(|(index, row)| shape_of(*index, row))
            .collect();
        prop_assert_eq!(shapes, expected_rows(&records, &expected, &params));
    }

    #[test]
    fn row_ids_are_unique_and_sequences_have_no_gaps(
        params in params_strategy(),
        ops in prop::collection::vec(op(), 1..160),
    ) {
        let contracts = contracts();
        let records = build_records(&ops);
        let actual = run(&records, &params, &contracts, false);
        let mut ids = HashSet::new();
        let mut sequences: BTreeMap<Key, BTreeSet<u32>> = BTreeMap::new();
        for row in &actual.rows {
            prop_assert!(ids.insert(row.id.clone()), "row id {} emitted twice", row.id);
            let fresh = sequences
                .entry((row.window_start_ms, row.dims.clone(), row.row_kind))
                .or_default()
                .insert(row.correction_seq);
            prop_assert!(fresh, "sequence repeated");
            check_pricing(row, &contracts);
        }
        for (key, seqs) in &sequences {
            let corrections: Vec<u32> = seqs.iter().copied().filter(|s| *s > 0).collect();
            let expected: Vec<u32> = (1..=u32::try_from(corrections.len()).expect("small")).collect();
            prop_assert_eq!(&corrections, &expected, "gap in correction sequences of {:?}", key);
        }
        // Within the rows closed in one step the order is (window, dims, kind); overall,
        // on-time rows come out in window order.
        let on_time: Vec<(i64, &Dims, RowKind)> = actual
            .rows
            .iter()
            .filter(|r| r.correction_seq == 0)
            .map(|r| (r.window_start_ms, &r.dims, r.row_kind))
            .collect();
        let mut sorted = on_time.clone();
        sorted.sort();
        prop_assert_eq!(on_time, sorted);
    }

    #[test]
    fn windows_contain_their_times_and_are_aligned(
        t in -4_000_000_000_000i64..4_000_000_000_000,
        size in prop::sample::select(vec![1i64, 250, 1_000, 60_000, 300_000, 900_000]),
    ) {
        let size = WindowSize::new(size).expect("divides 15 minutes");
        let window = size.window_of(t).expect("representable");
        prop_assert!(window.start_ms <= t && t < window.end_ms);
        prop_assert_eq!(window.end_ms - window.start_ms, size.as_ms());
        prop_assert_eq!(window.start_ms.rem_euclid(size.as_ms()), 0);
        prop_assert_eq!(window.start_ms.rem_euclid(900_000) % size.as_ms(), 0);
    }

    #[test]
    fn half_even_is_nearest_with_ties_to_even(
        numerator in any::<i64>().prop_map(i128::from),
        denominator in 1i128..10_000_000_000_000,
    ) {
        let rounded = round_half_even(numerator, denominator).expect("positive denominator");
        // |numerator − rounded × denominator| ≤ denominator / 2, exactly.
        let error = numerator - rounded * denominator;
        prop_assert!(2 * error.abs() <= denominator);
        if 2 * error.abs() == denominator {
            prop_assert_eq!(rounded.rem_euclid(2), 0);
        }
    }

    #[test]
    fn dedupe_set_remembers_exactly_until_expiry(
        claims in prop::collection::vec((0u128..20, 0i64..10, 0u64..3), 1..200),
        watermarks in prop::collection::vec(0i64..12, 1..20),
        horizon in 0i64..3,
    ) {
        let mut set = DedupeSet::new(horizon * WINDOW_MS);
        let mut naive: Vec<(u128, i64, u64)> = Vec::new();
        let mut watermark = i64::MIN;
        for (step, (id, window, fingerprint)) in claims.iter().enumerate() {
            if let Some(w) = watermarks.get(step % watermarks.len()) {
                watermark = watermark.max(w * WINDOW_MS);
                set.expire(watermark);
                naive.retain(|(_, end, _)| end + horizon * WINDOW_MS > watermark);
            }
            let end = (window + 1) * WINDOW_MS;
            let claim = set.claim(EventId(*id), end, *fingerprint);
            let found = naive.iter().find(|(naive_id, _, _)| naive_id == id);
            match found {
                None => {
                    prop_assert_eq!(claim, tally_core::dedupe::Claim::New);
                    naive.push((*id, end, *fingerprint));
                }
                Some((_, _, first)) if first == fingerprint => {
                    prop_assert_eq!(claim, tally_core::dedupe::Claim::Duplicate);
                }
                Some(_) => prop_assert_eq!(claim, tally_core::dedupe::Claim::ConflictingDuplicate),
            }
            prop_assert_eq!(set.len(), naive.len());
        }
    }
}

// ---------------------------------------------------------------------------------
// Targeted cases the random inputs reach only rarely.

fn simple_event(id: u128, occurred_at_ms: i64) -> UsageEvent {
    UsageEvent {
        event_id: EventId(id),
        request_id: format!("req-{id}"),
        occurred_at_ms,
        tenant_id: "tenant-a".to_owned(),
        model: "atlas-large".to_owned(),
        cloud: Cloud::Aws,
        channel_partner: None,
        region: "eu-west-1".to_owned(),
        tokens: TokenCounts {
            input: 1_000,
            ..TokenCounts::default()
        },
        status: RequestStatus::Succeeded,
        attributes: BTreeMap::new(),
        service_tier: None,
    }
}

fn params(lateness: i64, correction: i64) -> PartitionParams {
    PartitionParams {
        window: WindowSize::ONE_MINUTE,
        max_out_of_orderness_ms: 0,
        allowed_lateness_ms: lateness,
        correction_horizon_ms: correction,
        dedupe_horizon_ms: lateness + correction,
        source_topic: "usage.events".to_owned(),
        partition: 0,
    }
}

#[test]
fn corrections_close_at_the_next_boundary_or_tick_with_rising_sequences() {
    let contracts = contracts();
    let base = ms("2025-06-01T12:00:00Z");
    let mut state = PartitionState::new(params(0, 10 * WINDOW_MS)).expect("valid");
    let feed = |state: &mut PartitionState, offset: i64, id: u128, t: i64| {
        let event = simple_event(id, t);
        state.on_event(offset, &event, payload_fingerprint(&event), &contracts)
    };
    assert!(matches!(
        feed(&mut state, 0, 1, base),
        Classified::Counted {
            pane: CountedAs::OnTime,
            ..
        }
    ));
    // Watermark to base + 1 min: window [base, base+1min) closes on time.
    feed(&mut state, 1, 2, base + WINDOW_MS);
    let rows = state.drain_closed(&contracts).expect("priced");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].correction_seq, 0);

    // A late event for the closed window: a correction pane, not closed yet.
    assert!(matches!(
        feed(&mut state, 2, 3, base + 5),
        Classified::Counted {
            pane: CountedAs::Correction,
            ..
        }
    ));
    feed(&mut state, 3, 4, base + WINDOW_MS + 10); // same watermark window: no boundary crossed
    assert!(state.drain_closed(&contracts).expect("priced").is_empty());
    // A tick closes every open correction pane even without moving the watermark.
    state.on_tick(base);
    let rows = state.drain_closed(&contracts).expect("priced");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].correction_seq,
            rows[0].event_count,
            rows[0].first_offset
        ),
        (1, 1, 2)
    );

    // Another correction for the same window closes when the watermark crosses a boundary.
    feed(&mut state, 4, 5, base + 7);
    feed(&mut state, 5, 6, base + 2 * WINDOW_MS);
    let rows = state.drain_closed(&contracts).expect("priced");
    let seqs: Vec<(i64, u32)> = rows
        .iter()
        .map(|r| (r.window_start_ms, r.correction_seq))
        .collect();
    assert_eq!(seqs, [(base, 2), (base + WINDOW_MS, 0)]);
    assert_eq!(state.counters().corrections, 2);
}

#[test]
fn too_late_events_skip_the_dedupe_lookup_and_change_nothing() {
    let contracts = contracts();
    let base = ms("2025-06-01T12:00:00Z");
    let mut state = PartitionState::new(params(0, WINDOW_MS)).expect("valid");
    let first = simple_event(1, base);
    state.on_event(0, &first, payload_fingerprint(&first), &contracts);
    state.on_tick(base + 3 * WINDOW_MS);
    let before = state.approx_state_bytes();
    // An exact copy of a counted event whose window is past the horizon: too late, not
    // a duplicate (the lookup is not made).
    assert_eq!(
        state.on_event(1, &first, payload_fingerprint(&first), &contracts),
        Classified::TooLate
    );
    assert_eq!(state.counters().duplicates, 0);
    assert_eq!(state.counters().too_late, 1);
    assert_eq!(state.approx_state_bytes(), before);
    assert!(state.counters().is_conserved());
}

#[test]
fn loop_rejections_and_ticks_keep_conservation() {
    let mut state = PartitionState::new(params(0, 0)).expect("valid");
    state.on_rejected_record();
    state.on_tick(5);
    let counters = state.counters();
    assert_eq!(
        (counters.consumed, counters.rejected, counters.ticks),
        (1, 1, 1)
    );
    assert!(counters.is_conserved());
    assert_eq!(state.watermark(), Some(5));
    state.on_tick(1);
    assert_eq!(
        state.watermark(),
        Some(5),
        "a tick never lowers the watermark"
    );
}

#[test]
fn params_require_dedupe_horizon_to_cover_lateness_and_corrections() {
    let mut bad = params(60_000, 120_000);
    bad.dedupe_horizon_ms = 179_999;
    assert!(PartitionState::new(bad).is_err());
    let mut negative = params(0, 0);
    negative.max_out_of_orderness_ms = -1;
    assert!(PartitionState::new(negative).is_err());
    assert!(PartitionState::new(params(60_000, 120_000)).is_ok());
}

// ---------------------------------------------------------------------------------
// Memory per remembered id and per open key. In CI they run at a small size and check
// the state's own size estimate; for the figures the README quotes, run at full size:
// `TALLY_MEMORY_FULL=1 cargo test -p tally-core --release --test pipeline_props -- --nocapture memory_per`

/// `full` under `TALLY_MEMORY_FULL=1`, else a tenth of it.
fn memory_size(full: usize) -> usize {
    if std::env::var_os("TALLY_MEMORY_FULL").is_some() {
        full
    } else {
        full / 10
    }
}

fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[test]
fn memory_per_remembered_id() {
    let ids = memory_size(1_000_000) as u128;
    let rss_before = resident_bytes();
    let mut set = DedupeSet::new(0);
    for id in 0..ids {
        // 1 000 ids per 1-minute window, as at ~17 events/s.
        let window_end = (1 + (id / 1_000) as i64) * WINDOW_MS;
        set.claim(
            EventId(id.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)),
            window_end,
            0,
        );
    }
    let rss_after = resident_bytes();
    assert_eq!(set.len() as u128, ids);
    let estimate = set.approx_bytes() as f64 / ids as f64;
    println!(
        "dedupe: {} ids, approx_bytes {} = {estimate:.1} bytes/id",
        set.len(),
        set.approx_bytes()
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "dedupe: resident set grew {} bytes = {:.1} bytes/id",
            after - before,
            (after - before) as f64 / ids as f64
        );
    }
    assert!(estimate > 32.0 && estimate < 128.0);
}

#[test]
fn memory_per_open_key() {
    let keys = memory_size(200_000);
    let contracts = contracts();
    let base = ms("2025-06-01T12:00:00Z");
    let mut params = params(DAY_MS, 0);
    params.dedupe_horizon_ms = DAY_MS;
    let mut state = PartitionState::new(params).expect("valid");
    let rss_before = resident_bytes();
    for key in 0..keys {
        let mut event = simple_event(key as u128, base + (key % 60) as i64 * 1_000);
        event.tenant_id = format!("tenant-{key:08}");
        event.region = "us-east-1".to_owned();
        state.on_event(key as i64, &event, payload_fingerprint(&event), &contracts);
    }
    let rss_after = resident_bytes();
    let total = state.approx_state_bytes();
    let mut ids_only = DedupeSet::new(DAY_MS);
    for key in 0..keys {
        ids_only.claim(EventId(key as u128), base + WINDOW_MS, 0);
    }
    let per_key = (total - ids_only.approx_bytes()) as f64 / keys as f64;
    println!(
        "partition: {} open panes in {} windows, approx_state_bytes {total}; {per_key:.1} bytes per open key (dedupe excluded)",
        state.open_panes(),
        state.open_windows()
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "partition: resident set grew {} bytes = {:.1} bytes per key (pane + its event id)",
            after - before,
            (after - before) as f64 / keys as f64
        );
    }
    assert_eq!(state.open_panes(), keys);
}

// ---------------------------------------------------------------------------------
// Bounded restore: a state rebuilt from the low-water offset is the live state.

/// What the live loop commits at offset `c`: the low water, the counters and the digest.
struct CommitPoint {
    low_water: tally_core::partition::LowWater,
    counters: PartitionCounters,
    digest: tally_core::partition::StateDigest,
}

/// Rebuilds the state at `commit` from `records[low_water..commit]`, as the aggregator's
/// restore does, and checks it against the committed digest.
fn restore_at(
    records: &[Record],
    params: &PartitionParams,
    contracts: &Contracts,
    commit: usize,
    point: &CommitPoint,
) -> Result<PartitionState, String> {
    let mut state = PartitionState::resume(params.clone(), point.low_water.clock)
        .map_err(|error| error.to_string())?;
    let from = usize::try_from(point.low_water.offset).map_err(|error| error.to_string())?;
    if from > commit {
        return Err(format!("low water {from} beyond the commit {commit}"));
    }
    for (offset, record) in (point.low_water.offset..).zip(&records[from..commit]) {
        feed(&mut state, offset, record, contracts);
        // The restore drains as it goes; rows it closes are dropped.
        let _ = state
            .drain_closed(contracts)
            .map_err(|error| error.to_string())?;
    }
    state
        .finish_restore(point.counters, &point.digest)
        .map_err(|error| error.to_string())?;
    Ok(state)
}

/// Feeds `records[from..]` to `state` and returns every classification and row.
fn continue_from(
    state: &mut PartitionState,
    records: &[Record],
    from: usize,
    contracts: &Contracts,
) -> (
    Vec<Option<Classified>>,
    Vec<BillingAggregate>,
    PartitionCounters,
) {
    let mut classes = Vec::new();
    let mut rows = Vec::new();
    for (offset, record) in (i64::try_from(from).expect("small")..).zip(&records[from..]) {
        classes.push(feed(state, offset, record, contracts));
        rows.extend(state.drain_closed(contracts).expect("priced"));
    }
    (classes, rows, state.counters())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    /// At every commit point of arbitrary inputs (duplicates near expiry, conflicting
    /// duplicates with other times, too-late events, corrections, ticks), restoring from
    /// the committed low water gives the committed digest; from three of them the
    /// restored state then decides every later record and emits every later row exactly
    /// as the live state does. The low water never decreases.
    #[test]
    fn restore_from_the_low_water_continues_like_the_live_state(
        params in params_strategy(),
        ops in prop::collection::vec(op(), 1..200),
        continued in prop::collection::vec(any::<Index>(), 3),
    ) {
        let contracts = contracts();
        let records = build_records(&ops);
        let mut live = PartitionState::new(params.clone()).expect("valid params");
        let mut points = Vec::with_capacity(records.len() + 1);
        let mut live_classes = Vec::new();
        let mut live_rows: Vec<Vec<BillingAggregate>> = Vec::new();
        for commit in 0..=records.len() {
            let next = i64::try_from(commit).expect("small");
            let _ = live.drain_closed(&contracts).expect("priced");
            points.push(CommitPoint {
                low_water: live.low_water(next),
                counters: live.counters(),
                digest: live.digest(),
            });
            if let Some(record) = records.get(commit) {
                live_classes.push(feed(&mut live, next, record, &contracts));
                live_rows.push(live.drain_closed(&contracts).expect("priced"));
            }
        }
        let mut previous_low = 0;
        for (commit, point) in points.iter().enumerate() {
            prop_assert!(point.low_water.offset >= previous_low, "low water went back at {}", commit);
            previous_low = point.low_water.offset;
            let restored = restore_at(&records, &params, &contracts, commit, point);
            prop_assert!(restored.is_ok(), "restore at {}: {:?}", commit, restored.err());
        }
        for index in &continued {
            let commit = index.index(points.len());
            let mut restored = restore_at(&records, &params, &contracts, commit, &points[commit])
                .expect("restores (checked above)");
            let (classes, rows, counters) = continue_from(&mut restored, &records, commit, &contracts);
            prop_assert_eq!(&classes[..], &live_classes[commit..], "classes after a restore at {}", commit);
            let expected_rows: Vec<BillingAggregate> = live_rows[commit..].iter().flatten().cloned().collect();
            prop_assert_eq!(rows, expected_rows, "rows after a restore at {}", commit);
            prop_assert_eq!(counters, live.counters());
        }
        // The final tick, a day ahead, leaves nothing live: the low water is the end.
        let end = points.last().expect("at least one point");
        prop_assert_eq!(end.low_water.offset, i64::try_from(records.len()).expect("small"));
    }
}
