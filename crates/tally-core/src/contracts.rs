//! Contracts: the versioned price book and revenue-share rules, loaded once at start.
//!
//! # File format
//! A TOML document (`deploy/contracts/default.toml` is the reference):
//!
//! ```toml
//! [[price_book]]
//! version = "2024-01"                       # unique among price-book versions
//! effective_from = "2024-01-01T00:00:00Z"   # RFC 3339, UTC, whole seconds, 'Z' only
//! currency = "USD"                          # ISO 4217; the same in every version
//! billable_statuses = ["succeeded"]         # other statuses are counted at amount 0
//!
//! [price_book.models.atlas-large]           # prices in nano-units per million tokens
//! input = 2_500_000_000                     # $2.50 / M
//! cached_input = 1_250_000_000
//! output = 10_000_000_000
//! reasoning = 10_000_000_000
//!
//! [[share_rules]]
//! version = "2024-01"
//! effective_from = "2024-01-01T00:00:00Z"
//!
//! [[share_rules.rules]]
//! cloud = "aws"                             # a cloud symbol of the UsageEvent schema
//! channel_partner = "northwind"             # optional
//! beneficiaries = [{ partner = "microsoft", basis_points = 2250 }]
//! ```
//!
//! `effective_from` is written as a strict `YYYY-MM-DDTHH:MM:SSZ` timestamp (no
//! fractional seconds, no offsets other than `Z`), parsed by [`parse_utc_timestamp`].
//!
//! # Versions and time
//! A version is in force from its `effective_from` (inclusive) until the next version's
//! `effective_from` (exclusive); before the first version nothing is in force. Versions
//! must be listed with strictly increasing `effective_from`, so ranges never overlap.
//!
//! Every `effective_from` must lie on a window boundary of the window size the
//! contracts are loaded with. That is what makes a lookup at any event time inside a
//! window return the same version as a lookup at the window's start: all events of a
//! window, on-time and corrections alike, are priced and attributed by one version, and
//! a row never mixes versions. The aggregator looks contracts up at the window start.
//!
//! # Validation (at load, every error names its entry)
//! - unknown fields anywhere are rejected (`deny_unknown_fields`), missing fields too;
//! - versions are non-empty and unique per section; `effective_from` strictly increasing
//!   and aligned to the window size;
//! - one currency (three upper-case letters) across all price-book versions;
//! - billable statuses are known, non-`unknown`, listed once, and at least one;
//! - every model of a version is fully priced (all four token kinds, each at most
//!   [`MAX_PRICE_NANOS_PER_MILLION`]); a model priced in a version must be priced in
//!   every later version, so usage of a model never moves to the DLQ at a renegotiation;
//! - share rules: known cloud symbols (never `unknown`), non-empty partner names,
//!   one rule per (cloud, channel partner), each beneficiary once with basis points > 0,
//!   Σ basis points ≤ 10 000;
//! - the first share-rule version takes effect no later than the first price-book
//!   version, so wherever a price is in force, share rules are in force too.
//!
//! # Share lookup
//! For (cloud, channel partner) the rule for exactly that pair wins; otherwise the rule
//! for (cloud, no partner); otherwise no shares (the whole gross is the vendor's net).
//!
//! # Digests
//! [`Contracts::version_digests`] lists every published version with its start and a
//! [`ContentDigest`] of a canonical encoding of its *parsed* content, so reformatting
//! the file (comments, key order, `2_500` vs `2500`) changes no digest while editing a
//! label, a price, a billable status, a rule or a basis point changes one. Checkpoints
//! keep these digests ([`crate::semantics`]), and a restart refuses contracts that
//! edit or remove a version already used.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::event::{Cloud, RequestStatus, TokenCounts};
use crate::money::{ExactAmount, MoneyError, NanosPerMillion};
use crate::window::WindowSize;

/// Largest accepted price: 10¹⁵ nanos per million tokens ($1 000 000 per million
/// tokens, i.e. one currency unit per token). Far above any real price, and low enough
/// that a row's amounts cannot overflow (see [`crate::partition`]).
pub const MAX_PRICE_NANOS_PER_MILLION: u64 = 1_000_000_000_000_000;

/// Basis points in 100 %.
pub const MAX_TOTAL_BASIS_POINTS: u32 = 10_000;

/// Why a contracts file was refused. Every variant but [`ContractsError::Syntax`]
/// names the entry, e.g. `price_book[1] (version "2026-01") models.atlas-large`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractsError {
    /// The text is not TOML, or its top level has unknown or mistyped keys.
    #[error("contracts file: {message}")]
    Syntax {
        /// The TOML parser's message.
        message: String,
    },
    /// An entry has an unknown field, lacks a field, or has a value of the wrong type.
    #[error("{entry}: {message}")]
    Shape {
        /// The entry.
        entry: String,
        /// The deserializer's message.
        message: String,
    },
    /// No price-book version at all.
    #[error("price_book: at least one version is required")]
    NoPriceBook,
    /// No share-rule version at all.
    #[error(
        "share_rules: at least one version is required (a version without rules means no shares)"
    )]
    NoShareRules,
    /// A version string is empty.
    #[error("{entry}: version must not be empty")]
    EmptyVersion {
        /// The entry.
        entry: String,
    },
    /// A version string is used twice in one section.
    #[error("{entry}: version {version:?} is used more than once")]
    DuplicateVersion {
        /// The entry.
        entry: String,
        /// The repeated version.
        version: String,
    },
    /// `effective_from` is not a strict `YYYY-MM-DDTHH:MM:SSZ` timestamp.
    #[error(
        "{entry}: effective_from {value:?} is not a UTC timestamp of the form YYYY-MM-DDTHH:MM:SSZ"
    )]
    BadTimestamp {
        /// The entry.
        entry: String,
        /// The text found.
        value: String,
    },
    /// `effective_from` does not lie on a window boundary.
    #[error("{entry}: effective_from {effective_from} is not aligned to the {window_ms} ms window")]
    Misaligned {
        /// The entry.
        entry: String,
        /// The timestamp, as written.
        effective_from: String,
        /// The window size.
        window_ms: i64,
    },
    /// `effective_from` is not later than the previous version's (ranges would overlap).
    #[error(
        "{entry}: effective_from {effective_from} must be later than the previous version's {previous}"
    )]
    NotIncreasing {
        /// The entry.
        entry: String,
        /// This version's timestamp.
        effective_from: String,
        /// The previous version's timestamp.
        previous: String,
    },
    /// The currency is not three upper-case ASCII letters.
    #[error("{entry}: currency {currency:?} is not an ISO 4217 code")]
    BadCurrency {
        /// The entry.
        entry: String,
        /// The currency found.
        currency: String,
    },
    /// The currency differs from the first version's.
    #[error("{entry}: currency {currency:?} differs from {expected:?} of price_book[0]")]
    CurrencyMismatch {
        /// The entry.
        entry: String,
        /// The currency found.
        currency: String,
        /// The first version's currency.
        expected: String,
    },
    /// A billable status is not a known request status.
    #[error("{entry}: billable status {status:?} is not a known request status")]
    UnknownStatus {
        /// The entry.
        entry: String,
        /// The status found.
        status: String,
    },
    /// A billable status is listed twice.
    #[error("{entry}: billable status {status:?} is listed more than once")]
    DuplicateStatus {
        /// The entry.
        entry: String,
        /// The status.
        status: String,
    },
    /// No billable status.
    #[error("{entry}: billable_statuses must list at least one status")]
    NoBillableStatuses {
        /// The entry.
        entry: String,
    },
    /// A version prices no model.
    #[error("{entry}: no models are priced")]
    NoModels {
        /// The entry.
        entry: String,
    },
    /// A model name is empty.
    #[error("{entry}: model name must not be empty")]
    EmptyModelName {
        /// The entry.
        entry: String,
    },
    /// A price is above [`MAX_PRICE_NANOS_PER_MILLION`].
    #[error("{entry}: {field} = {value} nanos per million tokens is above the maximum {max}")]
    PriceTooHigh {
        /// The entry.
        entry: String,
        /// The token kind.
        field: &'static str,
        /// The price found.
        value: u64,
        /// The maximum.
        max: u64,
    },
    /// A model priced by an earlier version is missing from a later one.
    #[error("{entry}: model {model:?} is priced in version {previous_version:?} but not here")]
    ModelDropped {
        /// The entry.
        entry: String,
        /// The model.
        model: String,
        /// The earlier version that priced it.
        previous_version: String,
    },
    /// A rule's cloud is not a known cloud symbol (or is `unknown`).
    #[error("{entry}: cloud {cloud:?} is not a known cloud")]
    UnknownCloud {
        /// The entry.
        entry: String,
        /// The symbol found.
        cloud: String,
    },
    /// A partner or channel partner name is empty.
    #[error("{entry}: partner names must not be empty")]
    EmptyPartner {
        /// The entry.
        entry: String,
    },
    /// Two rules of one version for the same (cloud, channel partner).
    #[error("{entry}: a rule for this (cloud, channel_partner) already exists in this version")]
    DuplicateRule {
        /// The entry.
        entry: String,
    },
    /// A beneficiary is listed twice in one rule.
    #[error("{entry}: beneficiary {partner:?} is listed more than once")]
    DuplicateBeneficiary {
        /// The entry.
        entry: String,
        /// The partner.
        partner: String,
    },
    /// A beneficiary with zero basis points.
    #[error("{entry}: beneficiary {partner:?} has 0 basis points")]
    ZeroBasisPoints {
        /// The entry.
        entry: String,
        /// The partner.
        partner: String,
    },
    /// The beneficiaries of a rule would receive more than the whole gross.
    #[error("{entry}: basis points add up to {total_bps}, more than 10000")]
    SharesOverWhole {
        /// The entry.
        entry: String,
        /// Σ basis points.
        total_bps: u64,
    },
    /// Prices would be in force at times no share rules cover.
    #[error(
        "{entry}: the first share-rule version takes effect at {share_rules_from}, after the first price-book version at {price_book_from}"
    )]
    ShareRulesStartLate {
        /// The entry (the first share-rule version).
        entry: String,
        /// The first share-rule version's timestamp.
        share_rules_from: String,
        /// The first price-book version's timestamp.
        price_book_from: String,
    },
}

/// Why an event or row could not be priced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// No price-book version is in force at that time.
    #[error("no price-book version is in force at {time_ms} ms")]
    NoPriceInForce {
        /// The time looked up.
        time_ms: i64,
    },
    /// The version in force does not price the model.
    #[error("model {model:?} is not priced by price-book version {version:?}")]
    UnknownModel {
        /// The model.
        model: String,
        /// The version in force.
        version: String,
    },
}

/// The prices of one model, per token kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelPrice {
    /// Uncached input tokens.
    pub input: NanosPerMillion,
    /// Cached input tokens.
    pub cached_input: NanosPerMillion,
    /// Output tokens.
    pub output: NanosPerMillion,
    /// Reasoning tokens.
    pub reasoning: NanosPerMillion,
}

impl ModelPrice {
    /// Σ tokens × price over the four token kinds, exactly (units of 10⁻¹⁵ currency).
    pub fn exact_gross(&self, tokens: &TokenCounts) -> Result<ExactAmount, MoneyError> {
        ExactAmount::sum_of_lines([
            (tokens.input, self.input),
            (tokens.cached_input, self.cached_input),
            (tokens.output, self.output),
            (tokens.reasoning, self.reasoning),
        ])
    }
}

/// One published price-book version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceBookVersion {
    version: String,
    effective_from_ms: i64,
    currency: String,
    billable: [bool; RequestStatus::ALL.len()],
    models: BTreeMap<String, ModelPrice>,
}

impl PriceBookVersion {
    /// The version label.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Start of the version's range, UTC ms (inclusive).
    pub fn effective_from_ms(&self) -> i64 {
        self.effective_from_ms
    }

    /// ISO 4217 currency of its prices.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// Whether usage with this status is billed (otherwise it is counted at amount 0).
    pub fn is_billable(&self, status: RequestStatus) -> bool {
        self.billable
            .get(status.index() as usize)
            .copied()
            .unwrap_or(false)
    }

    /// The billable statuses, in schema order.
    pub fn billable_statuses(&self) -> Vec<RequestStatus> {
        RequestStatus::ALL
            .into_iter()
            .filter(|status| self.is_billable(*status))
            .collect()
    }

    /// The price of `model`, if this version prices it.
    pub fn model(&self, model: &str) -> Option<&ModelPrice> {
        self.models.get(model)
    }

    /// All priced models, sorted by name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &ModelPrice)> {
        self.models
            .iter()
            .map(|(name, price)| (name.as_str(), price))
    }
}

/// A beneficiary of a share rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Beneficiary {
    /// The partner receiving the share.
    pub partner: String,
    /// Its share of the gross, in 1/10 000 (1..=10 000).
    pub basis_points: u32,
}

/// One rule: who shares the revenue of a (cloud, optional channel partner) channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRule {
    /// The serving cloud.
    pub cloud: Cloud,
    /// The channel partner, or `None` for the cloud's fallback rule.
    pub channel_partner: Option<String>,
    /// Beneficiaries sorted by partner name; Σ basis points ≤ 10 000.
    pub beneficiaries: Vec<Beneficiary>,
}

/// One published share-rule version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRuleVersion {
    version: String,
    effective_from_ms: i64,
    rules: Vec<ShareRule>,
}

impl ShareRuleVersion {
    /// The version label.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Start of the version's range, UTC ms (inclusive).
    pub fn effective_from_ms(&self) -> i64 {
        self.effective_from_ms
    }

    /// The rules, sorted by (cloud, channel partner).
    pub fn rules(&self) -> &[ShareRule] {
        &self.rules
    }

    /// The beneficiaries for a channel: the exact (cloud, partner) rule, else the
    /// (cloud, no partner) rule, else none.
    pub fn beneficiaries_for(&self, cloud: Cloud, channel_partner: Option<&str>) -> &[Beneficiary] {
        if let Some(partner) = channel_partner {
            let exact = self.rules.iter().find(|rule| {
                rule.cloud == cloud && rule.channel_partner.as_deref() == Some(partner)
            });
            if let Some(rule) = exact {
                return &rule.beneficiaries;
            }
        }
        let fallback = self
            .rules
            .iter()
            .find(|rule| rule.cloud == cloud && rule.channel_partner.is_none());
        match fallback {
            Some(rule) => &rule.beneficiaries,
            None => &[],
        }
    }
}

/// The validated contracts: price-book and share-rule versions in effective order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contracts {
    window: WindowSize,
    currency: String,
    price_book: Vec<PriceBookVersion>,
    share_rules: Vec<ShareRuleVersion>,
}

impl Contracts {
    /// Parses and validates a contracts document; every `effective_from` must be a
    /// boundary of `window`.
    pub fn load(toml_text: &str, window: WindowSize) -> Result<Contracts, ContractsError> {
        let raw: RawFile = toml::from_str(toml_text).map_err(|error| ContractsError::Syntax {
            message: error.to_string(),
        })?;
        if raw.price_book.is_empty() {
            return Err(ContractsError::NoPriceBook);
        }
        if raw.share_rules.is_empty() {
            return Err(ContractsError::NoShareRules);
        }
        let price_book = load_price_book(raw.price_book, window)?;
        let share_rules = load_share_rules(raw.share_rules, window)?;
        let (Some(first_prices), Some(first_shares)) = (price_book.first(), share_rules.first())
        else {
            return Err(ContractsError::NoPriceBook);
        };
        if first_shares.effective_from_ms > first_prices.effective_from_ms {
            return Err(ContractsError::ShareRulesStartLate {
                entry: entry_name("share_rules", 0, Some(&first_shares.version)),
                share_rules_from: format_utc_timestamp(first_shares.effective_from_ms),
                price_book_from: format_utc_timestamp(first_prices.effective_from_ms),
            });
        }
        let currency = first_prices.currency.clone();
        Ok(Contracts {
            window,
            currency,
            price_book,
            share_rules,
        })
    }

    /// The window size the contracts were validated against.
    pub fn window(&self) -> WindowSize {
        self.window
    }

    /// The one currency of all prices.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// Price-book versions in effective order.
    pub fn price_book(&self) -> &[PriceBookVersion] {
        &self.price_book
    }

    /// Share-rule versions in effective order.
    pub fn share_rules(&self) -> &[ShareRuleVersion] {
        &self.share_rules
    }

    /// The price-book version in force at `time_ms`.
    pub fn price_book_at(&self, time_ms: i64) -> Option<&PriceBookVersion> {
        version_in_force(&self.price_book, time_ms, |version| {
            version.effective_from_ms
        })
    }

    /// The share-rule version in force at `time_ms`.
    pub fn share_rules_at(&self, time_ms: i64) -> Option<&ShareRuleVersion> {
        version_in_force(&self.share_rules, time_ms, |version| {
            version.effective_from_ms
        })
    }

    /// The version in force at `time_ms` and its price for `model`.
    pub fn price_for(
        &self,
        model: &str,
        time_ms: i64,
    ) -> Result<(&PriceBookVersion, &ModelPrice), PricingError> {
        let Some(version) = self.price_book_at(time_ms) else {
            return Err(PricingError::NoPriceInForce { time_ms });
        };
        match version.model(model) {
            Some(price) => Ok((version, price)),
            None => Err(PricingError::UnknownModel {
                model: model.to_owned(),
                version: version.version.clone(),
            }),
        }
    }

    /// The share-rule version in force at `time_ms` and the beneficiaries of the channel
    /// (exact rule, else the cloud's fallback, else none). `None` only before the first
    /// share-rule version, which validation places no later than the first price.
    pub fn shares_for(
        &self,
        cloud: Cloud,
        channel_partner: Option<&str>,
        time_ms: i64,
    ) -> Option<(&ShareRuleVersion, &[Beneficiary])> {
        let version = self.share_rules_at(time_ms)?;
        Some((version, version.beneficiaries_for(cloud, channel_partner)))
    }
}

// ---------------------------------------------------------------------------------
// Per-version digests: what a checkpoint remembers of the contracts it counted with.

/// The two versioned sections of a contracts file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContractSection {
    /// `[[price_book]]`.
    PriceBook,
    /// `[[share_rules]]`.
    ShareRules,
}

impl ContractSection {
    /// The section's name in the contracts file.
    pub const fn as_str(self) -> &'static str {
        match self {
            ContractSection::PriceBook => "price_book",
            ContractSection::ShareRules => "share_rules",
        }
    }
}

impl std::fmt::Display for ContractSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first 64 bits of the SHA-256 of a version's canonical encoding, shown as 16
/// lower-case hex digits. Equal digests mean equal parsed content (label, start,
/// currency, billable statuses, every price; or every rule and basis point), whatever
/// the TOML's layout, comments, key order or number spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentDigest(pub u64);

impl ContentDigest {
    /// Digest of `canonical` bytes.
    pub fn of(canonical: &[u8]) -> ContentDigest {
        use sha2::Digest as _;
        let hash = sha2::Sha256::digest(canonical);
        let mut first = [0_u8; 8];
        first.copy_from_slice(&hash[..8]);
        ContentDigest(u64::from_be_bytes(first))
    }
}

impl std::fmt::Display for ContentDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One published version, reduced to what a restart compares: its section, label,
/// start and content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VersionDigest {
    /// Price book or share rules.
    pub section: ContractSection,
    /// The version label.
    pub version: String,
    /// Start of the version's range, UTC ms.
    pub effective_from_ms: i64,
    /// Digest of [`PriceBookVersion::canonical_bytes`] or
    /// [`ShareRuleVersion::canonical_bytes`].
    pub digest: ContentDigest,
}

/// Writes length-prefixed fields, so that the encoding is injective: no two different
/// contents give the same bytes, whatever characters names contain.
struct CanonicalWriter {
    bytes: Vec<u8>,
}

impl CanonicalWriter {
    fn new(section: ContractSection) -> CanonicalWriter {
        let mut writer = CanonicalWriter { bytes: Vec::new() };
        writer.text("tally-contracts-canonical-v1");
        writer.text(section.as_str());
        writer
    }

    fn text(&mut self, value: &str) {
        self.bytes
            .extend_from_slice(&(value.len() as u64).to_be_bytes());
        self.bytes.extend_from_slice(value.as_bytes());
    }

    fn number(&mut self, value: i128) {
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }
}

impl PriceBookVersion {
    /// The canonical encoding of this version's parsed content: label, start,
    /// currency, billable statuses (schema order), then every model by name with its
    /// four prices. Every field is length-prefixed or fixed-width, big-endian. This
    /// encoding is part of the checkpoint format: change it only with the semantics
    /// version.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut writer = CanonicalWriter::new(ContractSection::PriceBook);
        writer.text(&self.version);
        writer.number(i128::from(self.effective_from_ms));
        writer.text(&self.currency);
        let billable = self.billable_statuses();
        writer.number(billable.len() as i128);
        for status in billable {
            writer.text(status.as_str());
        }
        writer.number(self.models.len() as i128);
        for (name, price) in &self.models {
            writer.text(name);
            for value in [
                price.input,
                price.cached_input,
                price.output,
                price.reasoning,
            ] {
                writer.number(i128::from(value.0));
            }
        }
        writer.bytes
    }

    /// This version's [`VersionDigest`].
    pub fn digest(&self) -> VersionDigest {
        VersionDigest {
            section: ContractSection::PriceBook,
            version: self.version.clone(),
            effective_from_ms: self.effective_from_ms,
            digest: ContentDigest::of(&self.canonical_bytes()),
        }
    }
}

impl ShareRuleVersion {
    /// The canonical encoding of this version's parsed content: label, start, then
    /// every rule in (cloud, channel partner) order with its beneficiaries by partner
    /// name and their basis points. Fields are length-prefixed or fixed-width,
    /// big-endian. Part of the checkpoint format, like
    /// [`PriceBookVersion::canonical_bytes`].
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut writer = CanonicalWriter::new(ContractSection::ShareRules);
        writer.text(&self.version);
        writer.number(i128::from(self.effective_from_ms));
        writer.number(self.rules.len() as i128);
        for rule in &self.rules {
            writer.text(rule.cloud.as_str());
            match &rule.channel_partner {
                Some(partner) => {
                    writer.number(1);
                    writer.text(partner);
                }
                None => writer.number(0),
            }
            writer.number(rule.beneficiaries.len() as i128);
            for beneficiary in &rule.beneficiaries {
                writer.text(&beneficiary.partner);
                writer.number(i128::from(beneficiary.basis_points));
            }
        }
        writer.bytes
    }

    /// This version's [`VersionDigest`].
    pub fn digest(&self) -> VersionDigest {
        VersionDigest {
            section: ContractSection::ShareRules,
            version: self.version.clone(),
            effective_from_ms: self.effective_from_ms,
            digest: ContentDigest::of(&self.canonical_bytes()),
        }
    }
}

impl Contracts {
    /// Every published version with its start and content digest: price-book versions
    /// in effective order, then share-rule versions in effective order.
    pub fn version_digests(&self) -> Vec<VersionDigest> {
        self.price_book
            .iter()
            .map(PriceBookVersion::digest)
            .chain(self.share_rules.iter().map(ShareRuleVersion::digest))
            .collect()
    }
}

fn version_in_force<T>(
    versions: &[T],
    time_ms: i64,
    effective_from: impl Fn(&T) -> i64,
) -> Option<&T> {
    let in_force_count = versions.partition_point(|version| effective_from(version) <= time_ms);
    let index = in_force_count.checked_sub(1)?;
    versions.get(index)
}

// ---------------------------------------------------------------------------------
// Raw shapes, deserialized entry by entry so that errors can name the entry.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    price_book: Vec<toml::Table>,
    #[serde(default)]
    share_rules: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPriceBook {
    version: String,
    effective_from: String,
    currency: String,
    billable_statuses: Vec<String>,
    models: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelPrice {
    input: u64,
    cached_input: u64,
    output: u64,
    reasoning: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShareRules {
    version: String,
    effective_from: String,
    #[serde(default)]
    rules: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    cloud: String,
    #[serde(default)]
    channel_partner: Option<String>,
    beneficiaries: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBeneficiary {
    partner: String,
    basis_points: u32,
}

fn entry_name(section: &str, index: usize, version: Option<&str>) -> String {
    match version {
        Some(version) => format!("{section}[{index}] (version {version:?})"),
        None => format!("{section}[{index}]"),
    }
}

fn deserialize_entry<T: serde::de::DeserializeOwned>(
    table: toml::Table,
    entry: &str,
) -> Result<T, ContractsError> {
    toml::Value::Table(table)
        .try_into()
        .map_err(|error: toml::de::Error| ContractsError::Shape {
            entry: entry.to_owned(),
            message: error.message().to_owned(),
        })
}

fn version_label(table: &toml::Table) -> Option<String> {
    table
        .get("version")
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
}

/// Checks the fields every versioned entry shares; returns its `effective_from` in ms.
fn check_version_header(
    entry: &str,
    version: &str,
    effective_from: &str,
    seen_versions: &mut BTreeSet<String>,
    previous_from_ms: Option<i64>,
    window: WindowSize,
) -> Result<i64, ContractsError> {
    if version.is_empty() {
        return Err(ContractsError::EmptyVersion {
            entry: entry.to_owned(),
        });
    }
    if !seen_versions.insert(version.to_owned()) {
        return Err(ContractsError::DuplicateVersion {
            entry: entry.to_owned(),
            version: version.to_owned(),
        });
    }
    let Some(effective_from_ms) = parse_utc_timestamp(effective_from) else {
        return Err(ContractsError::BadTimestamp {
            entry: entry.to_owned(),
            value: effective_from.to_owned(),
        });
    };
    if !window.is_aligned(effective_from_ms) {
        return Err(ContractsError::Misaligned {
            entry: entry.to_owned(),
            effective_from: effective_from.to_owned(),
            window_ms: window.as_ms(),
        });
    }
    if let Some(previous) = previous_from_ms
        && effective_from_ms <= previous
    {
        return Err(ContractsError::NotIncreasing {
            entry: entry.to_owned(),
            effective_from: effective_from.to_owned(),
            previous: format_utc_timestamp(previous),
        });
    }
    Ok(effective_from_ms)
}

fn load_price_book(
    tables: Vec<toml::Table>,
    window: WindowSize,
) -> Result<Vec<PriceBookVersion>, ContractsError> {
    let mut versions: Vec<PriceBookVersion> = Vec::with_capacity(tables.len());
    let mut seen_versions = BTreeSet::new();
    for (index, table) in tables.into_iter().enumerate() {
        let label = version_label(&table);
        let entry = entry_name("price_book", index, label.as_deref());
        let raw: RawPriceBook = deserialize_entry(table, &entry)?;
        let previous = versions.last();
        let effective_from_ms = check_version_header(
            &entry,
            &raw.version,
            &raw.effective_from,
            &mut seen_versions,
            previous.map(|version| version.effective_from_ms),
            window,
        )?;

        let currency_is_code =
            raw.currency.len() == 3 && raw.currency.bytes().all(|byte| byte.is_ascii_uppercase());
        if !currency_is_code {
            return Err(ContractsError::BadCurrency {
                entry,
                currency: raw.currency,
            });
        }
        if let Some(first) = versions.first()
            && first.currency != raw.currency
        {
            return Err(ContractsError::CurrencyMismatch {
                entry,
                currency: raw.currency,
                expected: first.currency.clone(),
            });
        }

        let mut billable = [false; RequestStatus::ALL.len()];
        for status_text in &raw.billable_statuses {
            let status = RequestStatus::from_symbol(status_text)
                .filter(|status| *status != RequestStatus::Unknown);
            let Some(status) = status else {
                return Err(ContractsError::UnknownStatus {
                    entry,
                    status: status_text.clone(),
                });
            };
            let Some(slot) = billable.get_mut(status.index() as usize) else {
                return Err(ContractsError::UnknownStatus {
                    entry,
                    status: status_text.clone(),
                });
            };
            if *slot {
                return Err(ContractsError::DuplicateStatus {
                    entry,
                    status: status_text.clone(),
                });
            }
            *slot = true;
        }
        if raw.billable_statuses.is_empty() {
            return Err(ContractsError::NoBillableStatuses { entry });
        }

        if raw.models.is_empty() {
            return Err(ContractsError::NoModels { entry });
        }
        let mut models = BTreeMap::new();
        for (name, value) in raw.models {
            let model_entry = format!("{entry} models.{name}");
            if name.is_empty() {
                return Err(ContractsError::EmptyModelName { entry: model_entry });
            }
            let table = match value {
                toml::Value::Table(table) => table,
                other => {
                    return Err(ContractsError::Shape {
                        entry: model_entry,
                        message: format!(
                            "expected a table of prices, found a {}",
                            other.type_str()
                        ),
                    });
                }
            };
            let price: RawModelPrice = deserialize_entry(table, &model_entry)?;
            let fields = [
                ("input", price.input),
                ("cached_input", price.cached_input),
                ("output", price.output),
                ("reasoning", price.reasoning),
            ];
            for (field, value) in fields {
                if value > MAX_PRICE_NANOS_PER_MILLION {
                    return Err(ContractsError::PriceTooHigh {
                        entry: model_entry,
                        field,
                        value,
                        max: MAX_PRICE_NANOS_PER_MILLION,
                    });
                }
            }
            models.insert(
                name,
                ModelPrice {
                    input: NanosPerMillion(price.input),
                    cached_input: NanosPerMillion(price.cached_input),
                    output: NanosPerMillion(price.output),
                    reasoning: NanosPerMillion(price.reasoning),
                },
            );
        }
        if let Some(previous) = versions.last() {
            for model in previous.models.keys() {
                if !models.contains_key(model) {
                    return Err(ContractsError::ModelDropped {
                        entry,
                        model: model.clone(),
                        previous_version: previous.version.clone(),
                    });
                }
            }
        }

        versions.push(PriceBookVersion {
            version: raw.version,
            effective_from_ms,
            currency: raw.currency,
            billable,
            models,
        });
    }
    Ok(versions)
}

fn load_share_rules(
    tables: Vec<toml::Table>,
    window: WindowSize,
) -> Result<Vec<ShareRuleVersion>, ContractsError> {
    let mut versions: Vec<ShareRuleVersion> = Vec::with_capacity(tables.len());
    let mut seen_versions = BTreeSet::new();
    for (index, table) in tables.into_iter().enumerate() {
        let label = version_label(&table);
        let entry = entry_name("share_rules", index, label.as_deref());
        let raw: RawShareRules = deserialize_entry(table, &entry)?;
        let effective_from_ms = check_version_header(
            &entry,
            &raw.version,
            &raw.effective_from,
            &mut seen_versions,
            versions.last().map(|version| version.effective_from_ms),
            window,
        )?;

        let mut rules: Vec<ShareRule> = Vec::with_capacity(raw.rules.len());
        for (rule_index, rule_table) in raw.rules.into_iter().enumerate() {
            let rule_entry = format!("{entry} rules[{rule_index}]");
            let rule = load_rule(rule_table, &rule_entry)?;
            let duplicate = rules.iter().any(|existing| {
                existing.cloud == rule.cloud && existing.channel_partner == rule.channel_partner
            });
            if duplicate {
                return Err(ContractsError::DuplicateRule { entry: rule_entry });
            }
            rules.push(rule);
        }
        rules.sort_by(|a, b| (a.cloud, &a.channel_partner).cmp(&(b.cloud, &b.channel_partner)));

        versions.push(ShareRuleVersion {
            version: raw.version,
            effective_from_ms,
            rules,
        });
    }
    Ok(versions)
}

fn load_rule(table: toml::Table, rule_entry: &str) -> Result<ShareRule, ContractsError> {
    let raw: RawRule = deserialize_entry(table, rule_entry)?;
    let entry = match &raw.channel_partner {
        Some(partner) => format!(
            "{rule_entry} (cloud {:?}, channel_partner {partner:?})",
            raw.cloud
        ),
        None => format!("{rule_entry} (cloud {:?})", raw.cloud),
    };
    let cloud = Cloud::from_symbol(&raw.cloud).filter(|cloud| *cloud != Cloud::Unknown);
    let Some(cloud) = cloud else {
        return Err(ContractsError::UnknownCloud {
            entry,
            cloud: raw.cloud,
        });
    };
    if raw.channel_partner.as_deref() == Some("") {
        return Err(ContractsError::EmptyPartner { entry });
    }
    let mut beneficiaries: Vec<Beneficiary> = Vec::with_capacity(raw.beneficiaries.len());
    let mut total_bps: u64 = 0;
    for (beneficiary_index, beneficiary_table) in raw.beneficiaries.into_iter().enumerate() {
        let beneficiary_entry = format!("{entry} beneficiaries[{beneficiary_index}]");
        let beneficiary: RawBeneficiary = deserialize_entry(beneficiary_table, &beneficiary_entry)?;
        if beneficiary.partner.is_empty() {
            return Err(ContractsError::EmptyPartner {
                entry: beneficiary_entry,
            });
        }
        if beneficiary.basis_points == 0 {
            return Err(ContractsError::ZeroBasisPoints {
                entry: beneficiary_entry,
                partner: beneficiary.partner,
            });
        }
        if beneficiaries
            .iter()
            .any(|existing| existing.partner == beneficiary.partner)
        {
            return Err(ContractsError::DuplicateBeneficiary {
                entry: beneficiary_entry,
                partner: beneficiary.partner,
            });
        }
        total_bps += u64::from(beneficiary.basis_points);
        beneficiaries.push(Beneficiary {
            partner: beneficiary.partner,
            basis_points: beneficiary.basis_points,
        });
    }
    if total_bps > u64::from(MAX_TOTAL_BASIS_POINTS) {
        return Err(ContractsError::SharesOverWhole { entry, total_bps });
    }
    beneficiaries.sort_by(|a, b| a.partner.cmp(&b.partner));
    Ok(ShareRule {
        cloud,
        channel_partner: raw.channel_partner,
        beneficiaries,
    })
}

// ---------------------------------------------------------------------------------
// Timestamps.

/// Parses a strict `YYYY-MM-DDTHH:MM:SSZ` UTC timestamp (no fractions, no other
/// offsets) into milliseconds since the UNIX epoch.
pub fn parse_utc_timestamp(text: &str) -> Option<i64> {
    crate::timefmt::parse_strict_utc_ms(text)
}

/// Formats UTC milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (with `.mmm`
/// when the time is not a whole second).
pub fn format_utc_timestamp(time_ms: i64) -> String {
    crate::timefmt::format_utc_ms(time_ms)
}
