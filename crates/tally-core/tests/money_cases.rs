//! Money, case by case: rounding, exact fractional prices, shares, contract changes and
//! what is never priced. Rows are produced by the real state machine with the shipped
//! contracts (`deploy/contracts/default.toml`).

use std::collections::BTreeMap;

use tally_core::aggregate::{BillingAggregate, RowKind};
use tally_core::contracts::{Contracts, parse_utc_timestamp};
use tally_core::dedupe::payload_fingerprint;
use tally_core::event::{Cloud, EventId, RequestStatus, TokenCounts, UsageEvent};
use tally_core::money::{ExactAmount, NanosPerMillion, RowAmounts, round_half_even};
use tally_core::partition::{Classified, PartitionParams, PartitionState, RejectReason};
use tally_core::window::WindowSize;

const DEFAULT_CONTRACTS: &str = include_str!("../../../deploy/contracts/default.toml");

fn contracts() -> Contracts {
    Contracts::load(DEFAULT_CONTRACTS, WindowSize::ONE_MINUTE).expect("default contracts")
}

fn ms(text: &str) -> i64 {
    parse_utc_timestamp(text).expect("valid timestamp")
}

/// A quiet time in the first price-book and share-rule versions.
fn t0() -> i64 {
    ms("2025-06-01T12:00:00Z")
}

fn tokens(input: u64, cached_input: u64, output: u64, reasoning: u64) -> TokenCounts {
    TokenCounts {
        input,
        cached_input,
        output,
        reasoning,
    }
}

fn event(
    id: u128,
    occurred_at_ms: i64,
    model: &str,
    cloud: Cloud,
    partner: Option<&str>,
) -> UsageEvent {
    UsageEvent {
        event_id: EventId(id),
        request_id: format!("req-{id}"),
        occurred_at_ms,
        tenant_id: "tenant-a".to_owned(),
        model: model.to_owned(),
        cloud,
        channel_partner: partner.map(str::to_owned),
        region: "eu-west-1".to_owned(),
        tokens: TokenCounts::default(),
        status: RequestStatus::Succeeded,
        attributes: BTreeMap::new(),
        service_tier: None,
    }
}

fn with_tokens(mut event: UsageEvent, counts: TokenCounts) -> UsageEvent {
    event.tokens = counts;
    event
}

fn new_state() -> PartitionState {
    PartitionState::new(PartitionParams {
        window: WindowSize::ONE_MINUTE,
        max_out_of_orderness_ms: 0,
        allowed_lateness_ms: 0,
        correction_horizon_ms: 0,
        dedupe_horizon_ms: 0,
        source_topic: "usage.events".to_owned(),
        partition: 0,
    })
    .expect("valid params")
}

/// Feeds `events` in order, then a tick a day later, and returns the classifications
/// and every row.
fn run(events: &[UsageEvent]) -> (Vec<Classified>, Vec<BillingAggregate>) {
    let contracts = contracts();
    let mut state = new_state();
    let mut classified = Vec::new();
    for (offset, event) in (0i64..).zip(events) {
        classified.push(state.on_event(offset, event, payload_fingerprint(event), &contracts));
    }
    let last = events.iter().map(|e| e.occurred_at_ms).max().unwrap_or(0);
    state.on_tick(last + 86_400_000);
    let rows = state.drain_closed(&contracts).expect("priced");
    assert!(state.counters().is_conserved());
    (classified, rows)
}

fn only_row(events: &[UsageEvent]) -> BillingAggregate {
    let (_, rows) = run(events);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    rows.into_iter().next().expect("one row")
}

fn round_half_up(numerator: i128, denominator: i128) -> i128 {
    (numerator + denominator / 2).div_euclid(denominator)
}

#[test]
fn exact_half_micro_rounds_to_even_where_half_up_would_not() {
    // atlas-large input before 2026: $2.50 / M. One token: exactly 2.5 micro-dollars.
    let exact = ExactAmount::of_tokens(1, NanosPerMillion(2_500_000_000)).expect("fits");
    assert_eq!(exact, ExactAmount(2_500_000_000));
    assert_eq!(round_half_even(exact.0, 1_000_000_000), Ok(2));
    assert_eq!(round_half_up(exact.0, 1_000_000_000), 3);

    let row = only_row(&[with_tokens(
        event(1, t0(), "atlas-large", Cloud::Openai, None),
        tokens(1, 0, 0, 0),
    )]);
    assert_eq!(row.gross_micros, 2);
    assert_eq!(row.net_micros, 2);

    // 3 tokens: 7.5 micro-dollars, the tie goes up to the even 8 (half-up agrees here).
    let row = only_row(&[with_tokens(
        event(1, t0(), "atlas-large", Cloud::Openai, None),
        tokens(3, 0, 0, 0),
    )]);
    assert_eq!(row.gross_micros, 8);
}

#[test]
fn a_row_is_rounded_once_not_per_event() {
    // Three events of one token each: per-event rounding would give 3 × round(2.5) = 6;
    // the row's exact gross is 7.5 micro-dollars and rounds once, to 8.
    let events: Vec<UsageEvent> = (0..3)
        .map(|i| {
            with_tokens(
                event(
                    10 + i,
                    t0() + i64::try_from(i).expect("small") * 1000,
                    "atlas-large",
                    Cloud::Openai,
                    None,
                ),
                tokens(1, 0, 0, 0),
            )
        })
        .collect();
    let per_event_total: i128 = (0..3)
        .map(|_| round_half_even(2_500_000_000, 1_000_000_000).expect("ok"))
        .sum();
    assert_eq!(per_event_total, 6);
    let row = only_row(&events);
    assert_eq!(row.event_count, 3);
    assert_eq!(row.tokens.input, 3);
    assert_eq!(row.gross_micros, 8);
}

#[test]
fn fractional_price_of_0_0375_per_million_is_exact() {
    // atlas-mini cached input: $0.0375 / M = 37 500 000 nanos per million tokens.
    let price = NanosPerMillion(37_500_000);
    // One token costs $0.0000000375 = 37 500 000 units of 10⁻¹⁵ dollars, exactly.
    assert_eq!(
        ExactAmount::of_tokens(1, price),
        Ok(ExactAmount(37_500_000))
    );
    // A million tokens cost exactly $0.0375 = 37 500 micro-dollars.
    let row = only_row(&[with_tokens(
        event(1, t0(), "atlas-mini", Cloud::Openai, None),
        tokens(0, 1_000_000, 0, 0),
    )]);
    assert_eq!(row.gross_micros, 37_500);

    // 40 tokens: 1.5 micro-dollars exactly, a tie, rounds to the even 2.
    let row = only_row(&[with_tokens(
        event(2, t0(), "atlas-mini", Cloud::Openai, None),
        tokens(0, 40, 0, 0),
    )]);
    assert_eq!(row.gross_micros, 2);

    // 1 token: 0.0375 micro-dollars, rounds to 0 on its own row...
    let row = only_row(&[with_tokens(
        event(3, t0(), "atlas-mini", Cloud::Openai, None),
        tokens(0, 1, 0, 0),
    )]);
    assert_eq!(row.gross_micros, 0);

    // ...but 27 one-token events in one window are 1.0125 micro-dollars: 1, not 0.
    let events: Vec<UsageEvent> = (0..27u128)
        .map(|i| {
            with_tokens(
                event(
                    100 + i,
                    t0() + i64::try_from(i).expect("small"),
                    "atlas-mini",
                    Cloud::Openai,
                    None,
                ),
                tokens(0, 1, 0, 0),
            )
        })
        .collect();
    assert_eq!(only_row(&events).gross_micros, 1);
}

#[test]
fn all_token_kinds_are_priced_by_their_own_price() {
    // atlas-reasoning before 2026: 15 / 7.5 / 60 / 60 dollars per million.
    let row = only_row(&[with_tokens(
        event(1, t0(), "atlas-reasoning", Cloud::Openai, None),
        tokens(1_000, 2_000, 3_000, 4_000),
    )]);
    // 1000×15 + 2000×7.5 + 3000×60 + 4000×60 = 450 000 dollars per million tokens
    // → $0.45 = 450 000 micro-dollars.
    assert_eq!(row.gross_micros, 15_000 + 15_000 + 180_000 + 240_000);
}

#[test]
fn two_beneficiaries_share_one_gross_counted_once() {
    let usage = tokens(1_000_000, 0, 0, 0); // atlas-large: $2.50
    let via_northwind = only_row(&[with_tokens(
        event(1, t0(), "atlas-large", Cloud::Gcp, Some("northwind")),
        usage,
    )]);
    let direct = only_row(&[with_tokens(
        event(2, t0(), "atlas-large", Cloud::Openai, None),
        usage,
    )]);

    // The gross is the same usage's gross: the channel does not double it.
    assert_eq!(via_northwind.gross_micros, direct.gross_micros);
    assert_eq!(via_northwind.gross_micros, 2_500_000);
    let shares: Vec<(&str, u32, i64)> = via_northwind
        .shares
        .iter()
        .map(|s| (s.beneficiary.as_str(), s.basis_points, s.amount_micros))
        .collect();
    assert_eq!(
        shares,
        [("microsoft", 2250, 562_500), ("northwind", 1000, 250_000)]
    );
    assert_eq!(via_northwind.net_micros, 2_500_000 - 562_500 - 250_000);
    // The vendor's own API has no rule: no shares, net = gross.
    assert!(direct.shares.is_empty());
    assert_eq!(direct.net_micros, direct.gross_micros);
}

#[test]
fn each_share_rounds_half_even_from_the_exact_gross() {
    // 2 tokens of atlas-large input: exact gross 5.0 micro-dollars.
    let row = only_row(&[with_tokens(
        event(1, t0(), "atlas-large", Cloud::Gcp, Some("northwind")),
        tokens(2, 0, 0, 0),
    )]);
    assert_eq!(row.gross_micros, 5);
    // microsoft 22.5 % of 5.0 = 1.125 → 1; northwind 10 % of 5.0 = 0.5 → 0 (tie to even).
    let amounts: Vec<i64> = row.shares.iter().map(|s| s.amount_micros).collect();
    assert_eq!(amounts, [1, 0]);
    assert_eq!(row.net_micros, 4);

    // 3 tokens: exact 7.5 → gross 8; microsoft 1.6875 → 2; northwind 0.75 → 1.
    let row = only_row(&[with_tokens(
        event(2, t0(), "atlas-large", Cloud::Gcp, Some("northwind")),
        tokens(3, 0, 0, 0),
    )]);
    assert_eq!(row.gross_micros, 8);
    let amounts: Vec<i64> = row.shares.iter().map(|s| s.amount_micros).collect();
    assert_eq!(amounts, [2, 1]);
    assert_eq!(row.net_micros, 5);
}

#[test]
fn net_is_gross_minus_shares_even_when_rounding_makes_it_negative() {
    // Exact gross 1.4 micro-units split 50/50: gross rounds to 1, each share (0.7) to 1.
    let amounts =
        RowAmounts::from_exact(ExactAmount(1_400_000_000), &[5_000, 5_000]).expect("fits");
    assert_eq!(amounts.gross_micros, 1);
    assert_eq!(amounts.share_micros, [1, 1]);
    assert_eq!(amounts.net_micros, -1);
    assert_eq!(
        amounts.net_micros + amounts.share_micros.iter().sum::<i64>(),
        amounts.gross_micros
    );
}

#[test]
fn a_contract_change_splits_rows_by_version() {
    let change = ms("2026-01-01T00:00:00Z");
    let usage = tokens(1_000_000, 0, 0, 0);
    let (_, rows) = run(&[
        with_tokens(event(1, change - 1, "atlas-large", Cloud::Aws, None), usage),
        with_tokens(event(2, change, "atlas-large", Cloud::Aws, None), usage),
    ]);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let (before, after) = (&rows[0], &rows[1]);
    assert_eq!(before.window_end_ms, change);
    assert_eq!(after.window_start_ms, change);
    assert_eq!(before.price_book_version, "2024-01");
    assert_eq!(after.price_book_version, "2026-01");
    assert_eq!(before.gross_micros, 2_500_000); // $2.50 / M
    assert_eq!(after.gross_micros, 2_000_000); // $2.00 / M
    // The AWS share rule changed later (2026-02-01): both rows use 22.5 %.
    assert_eq!(before.shares[0].amount_micros, 562_500);
    assert_eq!(after.shares[0].amount_micros, 450_000);
    assert_eq!(before.share_rule_version, after.share_rule_version);
    assert_ne!(before.id, after.id);

    // At the share-rule change the price book is unchanged but the share moves to 25 %.
    let share_change = ms("2026-02-01T00:00:00Z");
    let (_, rows) = run(&[
        with_tokens(
            event(3, share_change - 1, "atlas-large", Cloud::Aws, None),
            usage,
        ),
        with_tokens(
            event(4, share_change, "atlas-large", Cloud::Aws, None),
            usage,
        ),
    ]);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].share_rule_version, "2024-01");
    assert_eq!(rows[1].share_rule_version, "2026-02");
    assert_eq!(rows[0].shares[0].amount_micros, 450_000);
    assert_eq!(rows[1].shares[0].amount_micros, 500_000);
}

#[test]
fn non_billable_statuses_count_at_zero_in_rows_of_their_own() {
    let usage = tokens(1_000_000, 0, 0, 0);
    let mut failed = with_tokens(event(2, t0(), "atlas-large", Cloud::Aws, None), usage);
    failed.status = RequestStatus::Failed;
    let mut cancelled = with_tokens(event(3, t0() + 1, "atlas-large", Cloud::Aws, None), usage);
    cancelled.status = RequestStatus::Cancelled;
    let succeeded = with_tokens(event(1, t0() + 2, "atlas-large", Cloud::Aws, None), usage);
    let (classified, rows) = run(&[failed, cancelled, succeeded]);
    assert!(
        classified
            .iter()
            .all(|c| matches!(c, Classified::Counted { .. }))
    );
    assert_eq!(rows.len(), 2);
    let billable = &rows[0];
    let non_billable = &rows[1];
    assert_eq!(billable.row_kind, RowKind::Billable);
    assert_eq!(billable.event_count, 1);
    assert_eq!(billable.gross_micros, 2_500_000);
    assert_eq!(non_billable.row_kind, RowKind::NonBillable);
    assert_eq!(non_billable.event_count, 2);
    assert_eq!(non_billable.tokens.input, 2_000_000);
    assert_eq!(non_billable.gross_micros, 0);
    assert_eq!(non_billable.net_micros, 0);
    assert!(non_billable.shares.is_empty());
    assert_ne!(billable.id, non_billable.id);
}

#[test]
fn unpriced_usage_is_rejected_never_priced_at_zero() {
    let usage = tokens(1_000, 0, 0, 0);
    let unknown_model = with_tokens(event(1, t0(), "atlas-huge", Cloud::Aws, None), usage);
    let before_any_price = with_tokens(
        event(
            2,
            ms("2023-06-01T00:00:00Z"),
            "atlas-large",
            Cloud::Aws,
            None,
        ),
        usage,
    );
    let unknown_cloud = with_tokens(event(3, t0(), "atlas-large", Cloud::Unknown, None), usage);
    let (classified, rows) = run(&[unknown_model, before_any_price, unknown_cloud]);
    assert_eq!(
        classified,
        [
            Classified::Rejected(RejectReason::UnknownModel),
            Classified::Rejected(RejectReason::NoPriceInForce),
            Classified::Rejected(RejectReason::UnknownCloud),
        ]
    );
    assert!(rows.is_empty());
}

#[test]
fn a_cloud_without_any_rule_has_no_shares() {
    // oracle has a rule only for the contoso channel: direct oracle usage has no shares.
    let usage = tokens(1_000_000, 0, 0, 0);
    let row = only_row(&[with_tokens(
        event(1, t0(), "atlas-large", Cloud::Oracle, None),
        usage,
    )]);
    assert!(row.shares.is_empty());
    assert_eq!(row.net_micros, row.gross_micros);
    let row = only_row(&[with_tokens(
        event(2, t0(), "atlas-large", Cloud::Oracle, Some("contoso")),
        usage,
    )]);
    assert_eq!(row.shares.len(), 1);
    assert_eq!(row.shares[0].amount_micros, 375_000);
}

#[test]
fn amounts_that_do_not_fit_are_errors() {
    let huge = ExactAmount(i128::MAX / 2);
    assert!(RowAmounts::from_exact(huge, &[]).is_err());
    assert!(RowAmounts::from_exact(ExactAmount(i128::MAX / 1_000), &[10_000]).is_err());
    assert!(ExactAmount::of_tokens(u64::MAX, NanosPerMillion(u64::MAX)).is_err());
    let max_price = NanosPerMillion(1_000_000_000_000_000);
    assert!(ExactAmount::sum_of_lines([(u64::MAX, max_price); 4]).is_ok());
}
