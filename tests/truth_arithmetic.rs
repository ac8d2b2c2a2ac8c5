//! The end-to-end tests' own billing arithmetic (`support/money.rs`) against amounts
//! computed by hand from `deploy/contracts/default.toml`. Pure: no broker.

#[path = "support/money.rs"]
mod money;

use money::{
    ExpectedAmounts, TruthContracts, civil_from_days, days_from_civil, format_utc_ms, half_even,
    parse_utc_ms,
};

/// 2024-01-01T00:00:00Z: the first versions (price book "2024-01", share rules "2024-01").
const JAN_2024_MS: i64 = 1_704_067_200_000;
/// 2026-02-01T00:00:00Z: share rules "2026-02" (AWS share 2500 bps) take effect.
const FEB_2026_MS: i64 = 1_769_904_000_000;

#[test]
fn timestamps_parse_to_known_epoch_milliseconds() {
    assert_eq!(parse_utc_ms("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(parse_utc_ms("2024-01-01T00:00:00Z"), Some(JAN_2024_MS));
    assert_eq!(parse_utc_ms("2026-02-01T00:00:00Z"), Some(FEB_2026_MS));
    // 2024 is a leap year: 2024-03-01 is 60 days after 2024-01-01.
    assert_eq!(
        parse_utc_ms("2024-03-01T00:00:01Z"),
        Some(JAN_2024_MS + 60 * 86_400_000 + 1_000)
    );
    assert_eq!(parse_utc_ms("2024-01-01T00:00:00+01:00"), None);
    assert_eq!(parse_utc_ms("2024-13-01T00:00:00Z"), None);
}

#[test]
fn civil_dates_convert_both_ways() {
    // Day counts from Python's datetime.date arithmetic.
    let cases = [
        ((1970, 1, 1), 0),
        ((1969, 12, 31), -1),
        ((2000, 3, 1), 11_017),
        ((2024, 2, 29), 19_782),
    ];
    for (date, days) in cases {
        assert_eq!(days_from_civil(date.0, date.1, date.2), days, "{date:?}");
        assert_eq!(civil_from_days(days), date, "{days}");
    }
    assert_eq!(format_utc_ms(1_772_963_970_000), "2026-03-08T09:59:30Z");
    assert_eq!(format_utc_ms(-1_000), "1969-12-31T23:59:59Z");
    assert_eq!(parse_utc_ms(&format_utc_ms(FEB_2026_MS)), Some(FEB_2026_MS));
}

#[test]
fn half_even_rounds_ties_to_the_even_neighbour() {
    assert_eq!(half_even(15, 10), 2);
    assert_eq!(half_even(25, 10), 2);
    assert_eq!(half_even(26, 10), 3);
    assert_eq!(half_even(24, 10), 2);
    assert_eq!(half_even(-15, 10), -2);
    assert_eq!(half_even(-25, 10), -2);
    assert_eq!(half_even(0, 7), 0);
}

fn amounts(
    contracts: &TruthContracts,
    model: &str,
    cloud: &str,
    partner: Option<&str>,
    time_ms: i64,
    tokens: [u64; 4],
) -> ExpectedAmounts {
    contracts
        .expected(model, cloud, partner, time_ms, tokens, true)
        .expect("priced")
}

#[test]
fn cached_input_at_three_point_seven_five_cents_per_million_is_exact() {
    let contracts = TruthContracts::default_file();
    // atlas-mini cached input: 37_500_000 nanos per million tokens = $0.0375 / M.
    let million = amounts(
        &contracts,
        "atlas-mini",
        "openai",
        None,
        JAN_2024_MS,
        [0, 1_000_000, 0, 0],
    );
    assert_eq!(million.gross_micros, 37_500, "$0.0375 exactly");
    assert_eq!(million.net_micros, 37_500, "openai has no share rule");
    assert!(million.shares.is_empty());
    // 40 tokens: 1.5 micro-units, a tie, rounds up to the even 2.
    let forty = amounts(
        &contracts,
        "atlas-mini",
        "openai",
        None,
        JAN_2024_MS,
        [0, 40, 0, 0],
    );
    assert_eq!(forty.gross_micros, 2);
    // 120 tokens: 4.5 micro-units, a tie, rounds down to the even 4.
    let hundred_twenty = amounts(
        &contracts,
        "atlas-mini",
        "openai",
        None,
        JAN_2024_MS,
        [0, 120, 0, 0],
    );
    assert_eq!(hundred_twenty.gross_micros, 4);
    // One token: 0.0375 micro-units round to 0.
    let one = amounts(
        &contracts,
        "atlas-mini",
        "openai",
        None,
        JAN_2024_MS,
        [0, 1, 0, 0],
    );
    assert_eq!(one.gross_micros, 0);
}

#[test]
fn two_beneficiaries_share_one_gross_with_half_even_ties() {
    let contracts = TruthContracts::default_file();
    // gcp + northwind: northwind 1000 bps, microsoft 2250 bps.
    // 1000 atlas-large input tokens at $2.50 / M: gross 2500 micro-units;
    // northwind 250, microsoft 562.5 -> 562 (tie to even), net 2500 - 812 = 1688.
    let large = amounts(
        &contracts,
        "atlas-large",
        "gcp",
        Some("northwind"),
        JAN_2024_MS,
        [1_000, 0, 0, 0],
    );
    assert_eq!(
        large,
        ExpectedAmounts {
            price_book_version: "2024-01".to_owned(),
            share_rule_version: "2024-01".to_owned(),
            currency: "USD".to_owned(),
            gross_micros: 2_500,
            shares: vec![
                ("microsoft".to_owned(), 2_250, 562),
                ("northwind".to_owned(), 1_000, 250),
            ],
            net_micros: 1_688,
        }
    );
    // 400 atlas-mini input tokens at $0.15 / M: gross 60; microsoft 13.5 -> 14 (tie to
    // even, upwards this time), northwind 6; net 40.
    let mini = amounts(
        &contracts,
        "atlas-mini",
        "gcp",
        Some("northwind"),
        JAN_2024_MS,
        [400, 0, 0, 0],
    );
    assert_eq!(mini.gross_micros, 60);
    assert_eq!(
        mini.shares,
        vec![
            ("microsoft".to_owned(), 2_250, 14),
            ("northwind".to_owned(), 1_000, 6),
        ]
    );
    assert_eq!(mini.net_micros, 40);
    // A partner without its own rule on gcp falls back to the cloud's rule.
    let fallback = amounts(
        &contracts,
        "atlas-large",
        "gcp",
        Some("fabrikam"),
        JAN_2024_MS,
        [1_000, 0, 0, 0],
    );
    assert_eq!(fallback.shares, vec![("microsoft".to_owned(), 2_250, 562)]);
}

#[test]
fn versions_in_force_follow_effective_from() {
    let contracts = TruthContracts::default_file();
    // aws: 2250 bps until 2026-02-01, 2500 bps from then; atlas-large input $2.00 / M
    // from 2026-01-01. 1M input tokens: gross 2_000_000 micro-units.
    let before = amounts(
        &contracts,
        "atlas-large",
        "aws",
        None,
        FEB_2026_MS - 60_000,
        [1_000_000, 0, 0, 0],
    );
    assert_eq!(
        (
            before.price_book_version.as_str(),
            before.share_rule_version.as_str()
        ),
        ("2026-01", "2024-01")
    );
    assert_eq!(
        before.shares,
        vec![("microsoft".to_owned(), 2_250, 450_000)]
    );
    let after = amounts(
        &contracts,
        "atlas-large",
        "aws",
        None,
        FEB_2026_MS,
        [1_000_000, 0, 0, 0],
    );
    assert_eq!(after.share_rule_version, "2026-02");
    assert_eq!(after.shares, vec![("microsoft".to_owned(), 2_500, 500_000)]);
    assert_eq!(after.net_micros, 1_500_000);
    // Every token kind is priced: 1 of each at atlas-reasoning 2024-01:
    // (15 + 7.5 + 60 + 60) micro-units = 142.5 -> 142.
    let kinds = amounts(
        &contracts,
        "atlas-reasoning",
        "openai",
        None,
        JAN_2024_MS,
        [1, 1, 1, 1],
    );
    assert_eq!(kinds.gross_micros, 142);
    // A non-billable row: amounts 0, no shares.
    let failed = contracts
        .expected(
            "atlas-large",
            "aws",
            None,
            JAN_2024_MS,
            [1_000, 0, 0, 0],
            false,
        )
        .expect("versions in force");
    assert_eq!((failed.gross_micros, failed.net_micros), (0, 0));
    assert!(failed.shares.is_empty());
    assert!(contracts.is_billable("succeeded", JAN_2024_MS));
    assert!(!contracts.is_billable("failed", JAN_2024_MS));
    assert!(
        contracts
            .expected(
                "atlas-large",
                "aws",
                None,
                JAN_2024_MS - 1,
                [1, 0, 0, 0],
                true
            )
            .is_err(),
        "nothing is in force before the first version"
    );
}
