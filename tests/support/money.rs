//! The tests' own reading of the contracts file and their own billing arithmetic.
//!
//! A truth check that priced rows with tally-core's `price_for`, `shares_for` or
//! `round_half_even` would agree with any bug in them. So this module parses the
//! contracts TOML with the `toml` crate into its own structs, parses the timestamps
//! itself, looks up the version in force and the channel's rule itself, and computes
//! every amount in i128 with its own half-even division, exactly as DESIGN.md
//! ("Money") states it:
//!
//! - exact gross = Σ tokens × price (nano-units per million tokens), in units of 10⁻¹⁵;
//! - gross = half-even(exact / 10⁹) micro-units;
//! - each share = half-even(exact × basis points / 10¹³) micro-units;
//! - net = gross − Σ shares;
//! - a row of a status the price book does not bill has gross 0 and no shares.
//!
//! Only the row type and its Avro decoding come from tally-core.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use tally_core::aggregate::{BillingAggregate, RowKind};

/// The contracts file as the tests read it.
#[derive(Debug, Clone, Deserialize)]
pub struct TruthContracts {
    pub price_book: Vec<PriceBook>,
    pub share_rules: Vec<ShareRules>,
}

/// One price-book version.
#[derive(Debug, Clone, Deserialize)]
pub struct PriceBook {
    pub version: String,
    pub effective_from: String,
    pub currency: String,
    pub billable_statuses: Vec<String>,
    pub models: BTreeMap<String, Prices>,
}

/// Nano-units of the currency per million tokens, per token kind.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Prices {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    pub reasoning: u64,
}

/// One share-rule version.
#[derive(Debug, Clone, Deserialize)]
pub struct ShareRules {
    pub version: String,
    pub effective_from: String,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Who shares the revenue of a (cloud, optional channel partner) channel.
#[derive(Debug, Clone, Deserialize)]
pub struct Rule {
    pub cloud: String,
    pub channel_partner: Option<String>,
    pub beneficiaries: Vec<Beneficiary>,
}

/// A partner and its basis points.
#[derive(Debug, Clone, Deserialize)]
pub struct Beneficiary {
    pub partner: String,
    pub basis_points: u32,
}

/// Token sums of a row, in the order input, cached input, output, reasoning.
pub type Tokens = [u64; 4];

/// What a row must carry, computed by the test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedAmounts {
    pub price_book_version: String,
    pub share_rule_version: String,
    pub currency: String,
    pub gross_micros: i64,
    /// (beneficiary, basis points, micro-units), by beneficiary name.
    pub shares: Vec<(String, u32, i64)>,
    pub net_micros: i64,
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` into ms since the UNIX epoch (proleptic Gregorian
/// calendar, days from the civil date by Howard Hinnant's algorithm).
pub fn parse_utc_ms(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let shaped = bytes.len() == 20
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b'T'
        && bytes[13] == b':'
        && bytes[16] == b':'
        && bytes[19] == b'Z';
    if !shaped {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if !part.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1_000)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of ms since the UNIX epoch (the inverse of [`parse_utc_ms`]
/// for whole seconds).
pub fn format_utc_ms(ms: i64) -> String {
    let (year, month, day) = civil_from_days(ms.div_euclid(86_400_000));
    let seconds = ms.rem_euclid(86_400_000) / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let month_index = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `(year, month, day)` of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `numerator / denominator` rounded half to even (`denominator` > 0).
pub fn half_even(numerator: i128, denominator: i128) -> i128 {
    assert!(denominator > 0, "positive denominator");
    let quotient = numerator.div_euclid(denominator);
    let remainder = numerator.rem_euclid(denominator);
    let twice = remainder * 2;
    if twice > denominator || (twice == denominator && quotient % 2 != 0) {
        quotient + 1
    } else {
        quotient
    }
}

impl TruthContracts {
    /// Parses a contracts document.
    pub fn parse(text: &str) -> TruthContracts {
        let contracts: TruthContracts = toml::from_str(text).expect("contracts TOML");
        for book in &contracts.price_book {
            parse_utc_ms(&book.effective_from).expect("price-book effective_from");
        }
        for rules in &contracts.share_rules {
            parse_utc_ms(&rules.effective_from).expect("share-rule effective_from");
        }
        contracts
    }

    /// Reads and parses the contracts file at `path`.
    pub fn load(path: &Path) -> TruthContracts {
        TruthContracts::parse(&std::fs::read_to_string(path).expect("read contracts"))
    }

    /// The contracts file every end-to-end test runs the binary with.
    pub fn default_file() -> TruthContracts {
        TruthContracts::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/contracts/default.toml"),
        )
    }

    /// The price-book version in force at `time_ms`: the latest one starting at or before it.
    pub fn price_book_at(&self, time_ms: i64) -> Option<&PriceBook> {
        self.price_book
            .iter()
            .filter(|book| parse_utc_ms(&book.effective_from).is_some_and(|from| from <= time_ms))
            .max_by_key(|book| parse_utc_ms(&book.effective_from))
    }

    /// The share-rule version in force at `time_ms`.
    pub fn share_rules_at(&self, time_ms: i64) -> Option<&ShareRules> {
        self.share_rules
            .iter()
            .filter(|rules| parse_utc_ms(&rules.effective_from).is_some_and(|from| from <= time_ms))
            .max_by_key(|rules| parse_utc_ms(&rules.effective_from))
    }

    /// Whether usage of `status` at `time_ms` is billed.
    pub fn is_billable(&self, status: &str, time_ms: i64) -> bool {
        self.price_book_at(time_ms)
            .is_some_and(|book| book.billable_statuses.iter().any(|billed| billed == status))
    }

    /// The amounts of a row of `model` in the (cloud, channel partner) channel whose window
    /// starts at `window_start_ms`, with `tokens`; `billable` says the row's kind.
    pub fn expected(
        &self,
        model: &str,
        cloud: &str,
        channel_partner: Option<&str>,
        window_start_ms: i64,
        tokens: Tokens,
        billable: bool,
    ) -> Result<ExpectedAmounts, String> {
        let book = self
            .price_book_at(window_start_ms)
            .ok_or_else(|| format!("no price book in force at {window_start_ms}"))?;
        let prices = book
            .models
            .get(model)
            .ok_or_else(|| format!("model {model:?} has no price in {}", book.version))?;
        let rules = self
            .share_rules_at(window_start_ms)
            .ok_or_else(|| format!("no share rules in force at {window_start_ms}"))?;
        let exact_rule = channel_partner.and_then(|partner| {
            rules.rules.iter().find(|rule| {
                rule.cloud == cloud && rule.channel_partner.as_deref() == Some(partner)
            })
        });
        let rule = exact_rule.or_else(|| {
            rules
                .rules
                .iter()
                .find(|rule| rule.cloud == cloud && rule.channel_partner.is_none())
        });
        let (gross, mut shares) = if billable {
            let exact: i128 = i128::from(tokens[0]) * i128::from(prices.input)
                + i128::from(tokens[1]) * i128::from(prices.cached_input)
                + i128::from(tokens[2]) * i128::from(prices.output)
                + i128::from(tokens[3]) * i128::from(prices.reasoning);
            let gross = half_even(exact, 1_000_000_000);
            let shares: Vec<(String, u32, i64)> = rule
                .map(|rule| rule.beneficiaries.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|beneficiary| {
                    let amount = half_even(
                        exact * i128::from(beneficiary.basis_points),
                        1_000_000_000 * 10_000,
                    );
                    (
                        beneficiary.partner.clone(),
                        beneficiary.basis_points,
                        i64::try_from(amount).expect("a share fits i64"),
                    )
                })
                .collect();
            (i64::try_from(gross).expect("a gross fits i64"), shares)
        } else {
            (0, Vec::new())
        };
        shares.sort();
        let net = gross - shares.iter().map(|(_, _, amount)| amount).sum::<i64>();
        Ok(ExpectedAmounts {
            price_book_version: book.version.clone(),
            share_rule_version: rules.version.clone(),
            currency: book.currency.clone(),
            gross_micros: gross,
            shares,
            net_micros: net,
        })
    }

    /// Checks a row's versions, currency, gross, shares and net against [`Self::expected`]
    /// for the row's own token sums; the mismatch, if any.
    pub fn check_row(&self, row: &BillingAggregate) -> Option<String> {
        let tokens = [
            row.tokens.input,
            row.tokens.cached_input,
            row.tokens.output,
            row.tokens.reasoning,
        ];
        let expected = match self.expected(
            &row.dims.model,
            row.dims.cloud.as_str(),
            row.dims.channel_partner.as_deref(),
            row.window_start_ms,
            tokens,
            row.row_kind == RowKind::Billable,
        ) {
            Ok(expected) => expected,
            Err(problem) => return Some(format!("row {}: {problem}", row.id)),
        };
        let actual = ExpectedAmounts {
            price_book_version: row.price_book_version.clone(),
            share_rule_version: row.share_rule_version.clone(),
            currency: row.currency.clone(),
            gross_micros: row.gross_micros,
            shares: row
                .shares
                .iter()
                .map(|share| {
                    (
                        share.beneficiary.clone(),
                        share.basis_points,
                        share.amount_micros,
                    )
                })
                .collect(),
            net_micros: row.net_micros,
        };
        (actual != expected).then(|| format!("row {}: {actual:?}, recomputed {expected:?}", row.id))
    }
}
