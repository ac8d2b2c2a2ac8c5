//! Contracts: the shipped file validates, lookups follow effective dates, and every
//! validation error names the entry at fault.

use tally_core::contracts::{Contracts, ContractsError, PricingError, parse_utc_timestamp};
use tally_core::event::{Cloud, RequestStatus};
use tally_core::money::NanosPerMillion;
use tally_core::window::WindowSize;

const DEFAULT_CONTRACTS: &str = include_str!("../../../deploy/contracts/default.toml");

fn ms(text: &str) -> i64 {
    parse_utc_timestamp(text).expect("valid timestamp")
}

fn price_book(version: &str, effective_from: &str) -> String {
    format!(
        r#"
[[price_book]]
version = "{version}"
effective_from = "{effective_from}"
currency = "USD"
billable_statuses = ["succeeded"]

[price_book.models.atlas-large]
input = 2_500_000_000
cached_input = 1_250_000_000
output = 10_000_000_000
reasoning = 10_000_000_000
"#
    )
}

fn share_rules(version: &str, effective_from: &str, rules: &str) -> String {
    format!(
        r#"
[[share_rules]]
version = "{version}"
effective_from = "{effective_from}"
{rules}
"#
    )
}

const AWS_RULE: &str = r#"
[[share_rules.rules]]
cloud = "aws"
beneficiaries = [{ partner = "microsoft", basis_points = 2250 }]
"#;

fn load(text: &str) -> Result<Contracts, ContractsError> {
    Contracts::load(text, WindowSize::ONE_MINUTE)
}

fn valid_shares() -> String {
    share_rules("s1", "2024-01-01T00:00:00Z", AWS_RULE)
}

fn load_err(text: &str) -> ContractsError {
    match load(text) {
        Ok(_) => panic!("contracts unexpectedly valid:\n{text}"),
        Err(error) => error,
    }
}

#[test]
fn default_contracts_load_and_validate() {
    let contracts = load(DEFAULT_CONTRACTS).expect("default.toml is valid");
    assert_eq!(contracts.currency(), "USD");
    assert_eq!(contracts.price_book().len(), 2);
    assert_eq!(contracts.share_rules().len(), 2);
    for version in contracts.price_book() {
        let models: Vec<&str> = version.models().map(|(name, _)| name).collect();
        assert_eq!(
            models,
            [
                "atlas-embed",
                "atlas-large",
                "atlas-mini",
                "atlas-reasoning"
            ]
        );
        assert_eq!(version.billable_statuses(), [RequestStatus::Succeeded]);
        assert!(!version.is_billable(RequestStatus::Failed));
        assert!(!version.is_billable(RequestStatus::Cancelled));
        let mini = version.model("atlas-mini").expect("atlas-mini priced");
        assert_eq!(mini.cached_input, NanosPerMillion(37_500_000));
    }
}

#[test]
fn default_contracts_validate_for_every_window_size_up_to_fifteen_minutes() {
    for size_ms in [1_000, 60_000, 300_000, 900_000] {
        let window = WindowSize::new(size_ms).expect("valid size");
        Contracts::load(DEFAULT_CONTRACTS, window).expect("aligned to every window size");
    }
}

#[test]
fn default_contracts_renegotiate_atlas_large_at_2026() {
    let contracts = load(DEFAULT_CONTRACTS).expect("valid");
    let renegotiation = ms("2026-01-01T00:00:00Z");
    let (before, before_price) = contracts
        .price_for("atlas-large", renegotiation - 1)
        .expect("priced");
    let (after, after_price) = contracts
        .price_for("atlas-large", renegotiation)
        .expect("priced");
    assert_eq!(before.version(), "2024-01");
    assert_eq!(after.version(), "2026-01");
    assert!(after_price.input < before_price.input);
}

#[test]
fn default_contracts_attribute_channels_as_written() {
    let contracts = load(DEFAULT_CONTRACTS).expect("valid");
    let t = ms("2025-06-01T00:00:00Z");
    let (version, northwind) = contracts
        .shares_for(Cloud::Gcp, Some("northwind"), t)
        .expect("share rules in force");
    assert_eq!(version.version(), "2024-01");
    let northwind: Vec<(&str, u32)> = northwind
        .iter()
        .map(|b| (b.partner.as_str(), b.basis_points))
        .collect();
    assert_eq!(
        northwind,
        [("microsoft", 2250), ("northwind", 1000)],
        "sorted by partner"
    );

    // A partner without its own rule falls back to the cloud's rule.
    let (_, fabrikam) = contracts
        .shares_for(Cloud::Gcp, Some("fabrikam"), t)
        .expect("in force");
    assert_eq!(fabrikam.len(), 1);
    assert_eq!(fabrikam[0].basis_points, 2250);

    // The vendor's own API has no rule: no shares.
    let (_, openai) = contracts
        .shares_for(Cloud::Openai, None, t)
        .expect("in force");
    assert!(openai.is_empty());

    // The AWS share was renegotiated on 2026-02-01.
    let (_, aws_before) = contracts
        .shares_for(Cloud::Aws, None, ms("2026-01-31T23:59:00Z"))
        .expect("in force");
    let (version, aws_after) = contracts
        .shares_for(Cloud::Aws, None, ms("2026-02-01T00:00:00Z"))
        .expect("in force");
    assert_eq!(aws_before[0].basis_points, 2250);
    assert_eq!(aws_after[0].basis_points, 2500);
    assert_eq!(version.version(), "2026-02");
}

#[test]
fn lookups_before_the_first_version_or_for_unknown_models_fail() {
    let contracts = load(DEFAULT_CONTRACTS).expect("valid");
    let before_everything = ms("2023-12-31T23:59:00Z");
    assert_eq!(
        contracts.price_for("atlas-large", before_everything),
        Err(PricingError::NoPriceInForce {
            time_ms: before_everything
        })
    );
    assert!(
        contracts
            .shares_for(Cloud::Aws, None, before_everything)
            .is_none()
    );
    assert_eq!(
        contracts.price_for("atlas-huge", ms("2026-03-01T00:00:00Z")),
        Err(PricingError::UnknownModel {
            model: "atlas-huge".to_owned(),
            version: "2026-01".to_owned()
        })
    );
}

#[test]
fn rejects_duplicate_effective_from_naming_the_entry() {
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        + &price_book("v2", "2024-01-01T00:00:00Z")
        + &valid_shares();
    let error = load_err(&text);
    assert!(
        matches!(error, ContractsError::NotIncreasing { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with(r#"price_book[1] (version "v2"): "#),
        "{error}"
    );
}

#[test]
fn rejects_overlapping_versions_listed_out_of_order() {
    let text = price_book("v1", "2025-01-01T00:00:00Z")
        + &price_book("v2", "2024-06-01T00:00:00Z")
        + &share_rules("s1", "2024-01-01T00:00:00Z", AWS_RULE);
    let error = load_err(&text);
    assert!(
        matches!(error, ContractsError::NotIncreasing { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains(r#"price_book[1] (version "v2")"#),
        "{error}"
    );
    assert!(
        error.to_string().contains("2025-01-01T00:00:00Z"),
        "{error}"
    );
}

#[test]
fn rejects_misaligned_effective_from_naming_the_entry() {
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        + &price_book("v2", "2026-01-01T00:00:30Z")
        + &valid_shares();
    let error = load_err(&text);
    assert_eq!(
        error,
        ContractsError::Misaligned {
            entry: r#"price_book[1] (version "v2")"#.to_owned(),
            effective_from: "2026-01-01T00:00:30Z".to_owned(),
            window_ms: 60_000,
        }
    );
    // The same file is fine with a one-second window.
    let one_second = WindowSize::new(1_000).expect("valid");
    assert!(Contracts::load(&text, one_second).is_ok());
}

#[test]
fn rejects_share_rule_versions_misaligned_to_the_configured_window() {
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        + &share_rules("s1", "2024-01-01T00:00:00Z", AWS_RULE)
        + &share_rules("s2", "2025-01-01T00:07:00Z", AWS_RULE);
    assert!(load(&text).is_ok(), "aligned to one-minute windows");
    let five_minutes = WindowSize::new(300_000).expect("valid");
    let error = match Contracts::load(&text, five_minutes) {
        Ok(_) => panic!("00:07 is not a five-minute boundary"),
        Err(error) => error,
    };
    assert!(
        matches!(
            error,
            ContractsError::Misaligned {
                window_ms: 300_000,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with(r#"share_rules[1] (version "s2")"#),
        "{error}"
    );
}

#[test]
fn rejects_shares_over_the_whole_gross_naming_the_rule() {
    let rules = r#"
[[share_rules.rules]]
cloud = "gcp"
channel_partner = "northwind"
beneficiaries = [
  { partner = "northwind", basis_points = 6000 },
  { partner = "microsoft", basis_points = 4001 },
]
"#;
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        + &share_rules("s1", "2024-01-01T00:00:00Z", rules);
    let error = load_err(&text);
    assert_eq!(
        error,
        ContractsError::SharesOverWhole {
            entry: r#"share_rules[0] (version "s1") rules[0] (cloud "gcp", channel_partner "northwind")"#
                .to_owned(),
            total_bps: 10_001,
        }
    );
}

#[test]
fn accepts_shares_adding_up_to_exactly_the_whole() {
    let rules = r#"
[[share_rules.rules]]
cloud = "gcp"
beneficiaries = [
  { partner = "northwind", basis_points = 6000 },
  { partner = "microsoft", basis_points = 4000 },
]
"#;
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        + &share_rules("s1", "2024-01-01T00:00:00Z", rules);
    assert!(load(&text).is_ok());
}

#[test]
fn rejects_zero_and_duplicate_beneficiaries() {
    let zero = r#"
[[share_rules.rules]]
cloud = "aws"
beneficiaries = [{ partner = "microsoft", basis_points = 0 }]
"#;
    let text =
        price_book("v1", "2024-01-01T00:00:00Z") + &share_rules("s1", "2024-01-01T00:00:00Z", zero);
    let error = load_err(&text);
    assert!(
        matches!(error, ContractsError::ZeroBasisPoints { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().starts_with(
            r#"share_rules[0] (version "s1") rules[0] (cloud "aws") beneficiaries[0]"#
        ),
        "{error}"
    );

    let twice = r#"
[[share_rules.rules]]
cloud = "aws"
beneficiaries = [
  { partner = "microsoft", basis_points = 100 },
  { partner = "microsoft", basis_points = 200 },
]
"#;
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        + &share_rules("s1", "2024-01-01T00:00:00Z", twice);
    let error = load_err(&text);
    assert!(
        matches!(error, ContractsError::DuplicateBeneficiary { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("beneficiaries[1]"), "{error}");
}

#[test]
fn rejects_unknown_field_in_a_model_naming_the_model() {
    let text = price_book("v1", "2024-01-01T00:00:00Z").replace(
        "reasoning = 10_000_000_000",
        "reasoning = 10_000_000_000\nreasoning_cached = 1",
    ) + &valid_shares();
    let error = load_err(&text);
    let ContractsError::Shape { entry, message } = &error else {
        panic!("expected a shape error, got {error:?}");
    };
    assert_eq!(entry, r#"price_book[0] (version "v1") models.atlas-large"#);
    assert!(
        message.contains("unknown field `reasoning_cached`"),
        "{message}"
    );
}

#[test]
fn rejects_incompletely_priced_model_naming_the_model() {
    let text = price_book("v1", "2024-01-01T00:00:00Z").replace("reasoning = 10_000_000_000\n", "")
        + &valid_shares();
    let error = load_err(&text);
    let ContractsError::Shape { entry, message } = &error else {
        panic!("expected a shape error, got {error:?}");
    };
    assert_eq!(entry, r#"price_book[0] (version "v1") models.atlas-large"#);
    assert!(message.contains("missing field `reasoning`"), "{message}");
}

#[test]
fn rejects_unknown_field_in_a_version_and_at_top_level() {
    let text = price_book("v1", "2024-01-01T00:00:00Z").replace(
        "currency = \"USD\"",
        "currency = \"USD\"\nvalid_until = \"2030-01-01T00:00:00Z\"",
    ) + &valid_shares();
    let error = load_err(&text);
    let ContractsError::Shape { entry, message } = &error else {
        panic!("expected a shape error, got {error:?}");
    };
    assert_eq!(entry, r#"price_book[0] (version "v1")"#);
    assert!(message.contains("unknown field `valid_until`"), "{message}");

    let text =
        "discounts = []\n".to_owned() + &price_book("v1", "2024-01-01T00:00:00Z") + &valid_shares();
    let error = load_err(&text);
    assert!(matches!(error, ContractsError::Syntax { .. }), "{error:?}");
    assert!(error.to_string().contains("discounts"), "{error}");
}

#[test]
fn rejects_unknown_cloud_symbols_including_the_default_symbol() {
    for cloud in ["ibm", "unknown", "AWS"] {
        let rule = format!(
            "[[share_rules.rules]]\ncloud = \"{cloud}\"\nbeneficiaries = [{{ partner = \"p\", basis_points = 1 }}]\n"
        );
        let text = price_book("v1", "2024-01-01T00:00:00Z")
            + &share_rules("s1", "2024-01-01T00:00:00Z", &rule);
        let error = load_err(&text);
        assert_eq!(
            error,
            ContractsError::UnknownCloud {
                entry: format!(r#"share_rules[0] (version "s1") rules[0] (cloud "{cloud}")"#),
                cloud: cloud.to_owned(),
            }
        );
    }
}

#[test]
fn rejects_duplicate_cloud_partner_rules() {
    let rules = r#"
[[share_rules.rules]]
cloud = "gcp"
channel_partner = "northwind"
beneficiaries = [{ partner = "northwind", basis_points = 1000 }]

[[share_rules.rules]]
cloud = "gcp"
beneficiaries = [{ partner = "microsoft", basis_points = 2000 }]

[[share_rules.rules]]
cloud = "gcp"
channel_partner = "northwind"
beneficiaries = [{ partner = "microsoft", basis_points = 2000 }]
"#;
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        + &share_rules("s1", "2024-01-01T00:00:00Z", rules);
    let error = load_err(&text);
    assert_eq!(
        error,
        ContractsError::DuplicateRule {
            entry: r#"share_rules[0] (version "s1") rules[2]"#.to_owned()
        }
    );
}

#[test]
fn rejects_duplicate_version_labels() {
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        + &price_book("v1", "2025-01-01T00:00:00Z")
        + &valid_shares();
    let error = load_err(&text);
    assert_eq!(
        error,
        ContractsError::DuplicateVersion {
            entry: r#"price_book[1] (version "v1")"#.to_owned(),
            version: "v1".to_owned()
        }
    );
}

#[test]
fn rejects_currency_changes_and_non_iso_codes() {
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        + &price_book("v2", "2025-01-01T00:00:00Z").replace("\"USD\"", "\"EUR\"")
        + &valid_shares();
    let error = load_err(&text);
    assert!(
        matches!(error, ContractsError::CurrencyMismatch { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with(r#"price_book[1] (version "v2")"#),
        "{error}"
    );

    let text =
        price_book("v1", "2024-01-01T00:00:00Z").replace("\"USD\"", "\"usd\"") + &valid_shares();
    assert!(matches!(
        load_err(&text),
        ContractsError::BadCurrency { .. }
    ));
}

#[test]
fn rejects_unknown_or_repeated_billable_statuses() {
    for (statuses, expect_duplicate) in [
        (r#"["succeeded", "refunded"]"#, false),
        (r#"["unknown"]"#, false),
        (r#"["succeeded", "succeeded"]"#, true),
    ] {
        let text = price_book("v1", "2024-01-01T00:00:00Z").replace(r#"["succeeded"]"#, statuses)
            + &valid_shares();
        let error = load_err(&text);
        if expect_duplicate {
            assert!(
                matches!(error, ContractsError::DuplicateStatus { .. }),
                "{error:?}"
            );
        } else {
            assert!(
                matches!(error, ContractsError::UnknownStatus { .. }),
                "{error:?}"
            );
        }
        assert!(
            error
                .to_string()
                .starts_with(r#"price_book[0] (version "v1")"#),
            "{error}"
        );
    }
}

#[test]
fn rejects_a_model_dropped_by_a_later_version() {
    let second = price_book("v2", "2025-01-01T00:00:00Z").replace("atlas-large", "atlas-mini");
    let text = price_book("v1", "2024-01-01T00:00:00Z") + &second + &valid_shares();
    let error = load_err(&text);
    assert_eq!(
        error,
        ContractsError::ModelDropped {
            entry: r#"price_book[1] (version "v2")"#.to_owned(),
            model: "atlas-large".to_owned(),
            previous_version: "v1".to_owned(),
        }
    );
}

#[test]
fn rejects_absurd_prices_naming_model_and_token_kind() {
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        .replace("output = 10_000_000_000", "output = 1_000_000_000_000_001")
        + &valid_shares();
    let error = load_err(&text);
    assert!(
        matches!(
            error,
            ContractsError::PriceTooHigh {
                field: "output",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with(r#"price_book[0] (version "v1") models.atlas-large: output"#),
        "{error}"
    );
}

#[test]
fn rejects_loose_timestamps_naming_the_entry() {
    let text = price_book("v1", "2024-01-01 00:00:00") + &valid_shares();
    let error = load_err(&text);
    assert_eq!(
        error,
        ContractsError::BadTimestamp {
            entry: r#"price_book[0] (version "v1")"#.to_owned(),
            value: "2024-01-01 00:00:00".to_owned(),
        }
    );
}

#[test]
fn rejects_prices_in_force_without_share_rules() {
    let text = price_book("v1", "2024-01-01T00:00:00Z")
        + &share_rules("s1", "2024-02-01T00:00:00Z", AWS_RULE);
    let error = load_err(&text);
    assert!(
        matches!(error, ContractsError::ShareRulesStartLate { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with(r#"share_rules[0] (version "s1")"#),
        "{error}"
    );

    let error = load_err(&price_book("v1", "2024-01-01T00:00:00Z"));
    assert_eq!(error, ContractsError::NoShareRules);
    let error = load_err(&valid_shares());
    assert_eq!(error, ContractsError::NoPriceBook);
}

#[test]
fn a_share_rule_version_without_rules_means_no_shares() {
    let text =
        price_book("v1", "2024-01-01T00:00:00Z") + &share_rules("s1", "2024-01-01T00:00:00Z", "");
    let contracts = load(&text).expect("valid");
    let (version, beneficiaries) = contracts
        .shares_for(Cloud::Aws, None, ms("2024-06-01T00:00:00Z"))
        .expect("in force");
    assert_eq!(version.version(), "s1");
    assert!(beneficiaries.is_empty());
}

#[test]
fn rejects_text_that_is_not_toml() {
    let error = load_err("[[price_book]\nversion = ");
    assert!(matches!(error, ContractsError::Syntax { .. }), "{error:?}");
}
