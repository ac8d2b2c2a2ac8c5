//! The semantics fingerprint: every setting and contract version that changes results.
//!
//! A partition's rows are a function of its input records, the settings below and the
//! contracts. If any of those changes between two runs over the same partition, a
//! restart would rebuild state under other rules than the ones its committed rows were
//! computed with: closed windows could be reopened and billed again, or the same usage
//! priced twice at different prices. So every checkpoint carries a [`Semantics`] value
//! in a compact [wire form](Semantics::to_wire), and a restart compares it with the
//! current one through [`check_restart`], which refuses to go on and names every
//! difference.
//!
//! # What is in it
//! - [`SEMANTICS_VERSION`]: bumped whenever the classification rules of the code change
//!   (what is rejected, too late, a duplicate, counted; how windows close; how rows are
//!   priced), so that a new build does not restart on state counted by other rules.
//! - Every setting that changes results, with its value: window, out-of-orderness,
//!   lateness, correction and dedupe horizons, every validation limit, and the input
//!   topic's partition count (routing decides which records are misrouted). The list is
//!   [`SETTINGS`]: a setting that changes results is added there with one line.
//!   Settings that change only timing (commit interval, idle timeout: ticks are written
//!   into the input and read back, so their effect is part of the input) are not in it.
//! - For the contracts, one entry per published version, price book and share rules
//!   apart: its `effective_from` and a [`ContentDigest`] of the canonical encoding of its
//!   parsed content (see [`crate::contracts`]). Reformatting the TOML changes nothing;
//!   editing a label, a price, a billable status, a rule or a basis point changes the
//!   digest.
//!
//! # Restart rules ([`check_restart`])
//! Refused, each named in the error: a different semantics version; any setting with
//! another value (or present on one side only); a published contract version edited or
//! removed; a new version whose `effective_from` is at or before the partition's largest
//! classified event time (it would reprice usage already billed). Accepted: a new
//! version whose `effective_from` lies after that time (contracts stay renegotiable
//! without downtime), and any new version on a partition that has classified nothing.
//! The way on after a refusal is in the error's text: restore the previous settings and
//! contracts, or re-aggregate the input under the new semantics with `tally replay` into
//! a separate output and reconcile. Starting a new consumer group with `--start-from`
//! would bill already billed usage again.
//!
//! # Use
//! At start: `Semantics::new(&config, &contracts)?` (then
//! [`Semantics::with_input_partitions`] with the partition count routing uses), which
//! fails before anything is counted if the fingerprint is too large. In every
//! checkpoint: [`Semantics::to_wire`]. At each assignment, before restoring a partition
//! from its checkpoint: [`Semantics::from_wire`] of the committed form, then
//! [`check_restart`] with the checkpoint's largest classified event time; on `Err` the
//! partition is not restored and the error (its `Display` names every change and the
//! way on) stops the aggregator.
//!
//! # Wire form
//! One line of printable ASCII without quotes or backslashes (so it embeds in JSON
//! unescaped), `;`-separated `key=value` fields:
//!
//! ```text
//! f=1;sv=1;al=30000;ch=21600000;dh=25200000;ea=300000;eb=604800000;ip=6;mt=100000000;oo=5000;w=60000;pb=1704067200000:3f1c…,1767225600000:9a0b…;sr=1704067200000:…
//! ```
//!
//! - `f`: the wire format version ([`WIRE_FORMAT_VERSION`]), always first;
//! - `sv`: the semantics version;
//! - one field per setting, by its short key from [`SETTINGS`], as a decimal integer;
//! - `pb` / `sr`: the price-book / share-rule versions in effective order, each
//!   `<effective_from ms>:<16 hex digits of its digest>`, comma-separated.
//!
//! Version labels are not carried (the digest covers them); errors name committed
//! versions by their start and current ones by label too. Keys other than the reserved
//! `f`, `sv`, `pb`, `sr` are settings, so a fingerprint written by a build with more
//! settings still parses, and the extra setting is reported as a change.
//!
//! # Size
//! Kafka caps offset-commit metadata at 4 096 bytes by default
//! (`offset.metadata.max.bytes`) and the checkpoint carries more than the fingerprint,
//! so the wire form may take at most [`MAX_WIRE_BYTES`] (2 048) bytes. The settings take
//! about 130 bytes and each contract version 31 bytes (13-digit start, 16-digit digest,
//! two separators), so about 60 versions fit. [`Semantics::new`] refuses a larger
//! fingerprint at start with [`SemanticsError::TooLarge`], before anything is counted.

use std::collections::BTreeMap;
use std::fmt;

use crate::config::Config;
use crate::contracts::{ContentDigest, ContractSection, Contracts, format_utc_timestamp};

/// Version of the classification rules. Bump it whenever a change to the code makes the
/// same input and settings give other rows, counters or side records (a new rejection
/// reason, another window-closing or too-late rule, another rounding), so that a restart
/// on state counted by the old rules is refused instead of mixing the two.
pub const SEMANTICS_VERSION: u32 = 1;

/// Version of the wire form written by [`Semantics::to_wire`].
pub const WIRE_FORMAT_VERSION: u32 = 1;

/// Largest wire form, in bytes: about half of Kafka's default 4 096-byte offset-commit
/// metadata cap, the rest being the checkpoint's own fields.
pub const MAX_WIRE_BYTES: usize = 2_048;

/// One setting that changes results: its short wire key, its dotted config name and how
/// to read it from the config.
#[derive(Debug, Clone, Copy)]
pub struct SettingSpec {
    /// Key in the wire form (short: the fingerprint shares 4 KiB with the checkpoint).
    pub key: &'static str,
    /// Dotted path of the config field, as errors name it.
    pub name: &'static str,
    /// The value in the config.
    pub read: fn(&Config) -> i128,
}

const fn setting(key: &'static str, name: &'static str, read: fn(&Config) -> i128) -> SettingSpec {
    SettingSpec { key, name, read }
}

/// Every setting that changes results. A new one is one line here, with a key no other
/// line (nor `f`, `sv`, `pb`, `sr`) uses; keep the keys short.
#[rustfmt::skip]
pub const SETTINGS: &[SettingSpec] = &[
    setting("w", "aggregator.window_ms", |c| i128::from(c.aggregator.window_ms)),
    setting("oo", "aggregator.max_out_of_orderness_ms", |c| i128::from(c.aggregator.max_out_of_orderness_ms)),
    setting("al", "aggregator.allowed_lateness_ms", |c| i128::from(c.aggregator.allowed_lateness_ms)),
    setting("ch", "aggregator.correction_horizon_ms", |c| i128::from(c.aggregator.correction_horizon_ms)),
    setting("dh", "aggregator.dedupe_horizon_ms", |c| i128::from(c.aggregator.dedupe_horizon_ms)),
    setting("mt", "validation.max_tokens_per_kind", |c| i128::from(c.validation.max_tokens_per_kind)),
    setting("ea", "validation.max_event_time_ahead_ms", |c| i128::from(c.validation.max_event_time_ahead_ms)),
    setting("eb", "validation.max_event_time_behind_ms", |c| i128::from(c.validation.max_event_time_behind_ms)),
    setting("ds", "validation.max_dimension_bytes", |c| i128::from(c.validation.max_dimension_bytes)),
    setting("rq", "validation.max_request_id_bytes", |c| i128::from(c.validation.max_request_id_bytes)),
    setting("ae", "validation.max_attribute_entries", |c| i128::from(c.validation.max_attribute_entries)),
    setting("ab", "validation.max_attributes_bytes", |c| i128::from(c.validation.max_attributes_bytes)),
    setting("ip", "topics.partitions", |c| i128::from(c.topics.partitions)),
];

/// Wire key of the input topic's partition count.
const INPUT_PARTITIONS_KEY: &str = "ip";

/// Wire keys that are not settings.
const RESERVED_KEYS: [&str; 4] = ["f", "sv", "pb", "sr"];

/// One published contract version as a fingerprint holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractVersion {
    /// Start of the version's range, UTC ms; unique within its section.
    pub effective_from_ms: i64,
    /// Digest of its canonical content.
    pub digest: ContentDigest,
    /// Its label, when known (from the contracts file; the wire form does not carry it).
    pub label: Option<String>,
}

/// The semantics a partition was (or is about to be) counted with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Semantics {
    semantics_version: u32,
    /// Setting values by wire key.
    settings: BTreeMap<String, i128>,
    price_book: Vec<ContractVersion>,
    share_rules: Vec<ContractVersion>,
}

/// Why a fingerprint could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SemanticsError {
    /// The wire form would not fit the room the checkpoint leaves for it.
    #[error(
        "the semantics fingerprint takes {bytes} bytes ({versions} contract versions), more than the {limit} bytes a checkpoint leaves for it inside Kafka's 4096-byte offset metadata: the contracts file holds too many versions"
    )]
    TooLarge {
        /// Bytes the wire form takes (or the input's length, when parsing).
        bytes: usize,
        /// Contract versions in it (0 when parsing).
        versions: usize,
        /// [`MAX_WIRE_BYTES`].
        limit: usize,
    },
    /// The input does not start with a wire format version this build reads.
    #[error(
        "semantics fingerprint format {found:?} is not supported (expected f={WIRE_FORMAT_VERSION})"
    )]
    UnsupportedFormat {
        /// The first field found.
        found: String,
    },
    /// A required field is absent.
    #[error("semantics fingerprint lacks the field `{field}`")]
    Missing {
        /// The field's key.
        field: &'static str,
    },
    /// A field is not of the documented shape.
    #[error("semantics fingerprint field {field:?} is malformed: {problem}")]
    Malformed {
        /// The field as found (possibly truncated to 64 bytes).
        field: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

fn malformed(field: &str, problem: &'static str) -> SemanticsError {
    let mut end = field.len().min(64);
    while !field.is_char_boundary(end) {
        end -= 1;
    }
    SemanticsError::Malformed {
        field: field[..end].to_owned(),
        problem,
    }
}

impl Semantics {
    /// The semantics of `config` with `contracts` (which must be the contracts loaded
    /// for this config). Fails when the wire form would exceed [`MAX_WIRE_BYTES`].
    pub fn new(config: &Config, contracts: &Contracts) -> Result<Semantics, SemanticsError> {
        let settings = SETTINGS
            .iter()
            .map(|spec| (spec.key.to_owned(), (spec.read)(config)))
            .collect();
        let to_version = |digest: crate::contracts::VersionDigest| ContractVersion {
            effective_from_ms: digest.effective_from_ms,
            digest: digest.digest,
            label: Some(digest.version),
        };
        let mut price_book = Vec::new();
        let mut share_rules = Vec::new();
        for digest in contracts.version_digests() {
            match digest.section {
                ContractSection::PriceBook => price_book.push(to_version(digest)),
                ContractSection::ShareRules => share_rules.push(to_version(digest)),
            }
        }
        Semantics::from_parts(SEMANTICS_VERSION, settings, price_book, share_rules)
    }

    /// A fingerprint from its parts (settings by wire key). Checks what parsing checks:
    /// setting keys of the wire's shape and not reserved, versions strictly increasing
    /// by start within each section, and the size limit.
    pub fn from_parts(
        semantics_version: u32,
        settings: BTreeMap<String, i128>,
        price_book: Vec<ContractVersion>,
        share_rules: Vec<ContractVersion>,
    ) -> Result<Semantics, SemanticsError> {
        for key in settings.keys() {
            check_setting_key(key)?;
        }
        for (key, versions) in [("pb", &price_book), ("sr", &share_rules)] {
            let increasing = versions
                .windows(2)
                .all(|pair| pair[0].effective_from_ms < pair[1].effective_from_ms);
            if !increasing {
                return Err(malformed(
                    key,
                    "versions are not in strictly increasing order",
                ));
            }
        }
        let semantics = Semantics {
            semantics_version,
            settings,
            price_book,
            share_rules,
        };
        let bytes = semantics.to_wire().len();
        if bytes > MAX_WIRE_BYTES {
            return Err(SemanticsError::TooLarge {
                bytes,
                versions: semantics.price_book.len() + semantics.share_rules.len(),
                limit: MAX_WIRE_BYTES,
            });
        }
        Ok(semantics)
    }

    /// The same semantics with the input topic's partition count the aggregator routes
    /// with (from the topic's metadata, which wins over `topics.partitions` when the
    /// topic already exists).
    pub fn with_input_partitions(mut self, partitions: i32) -> Semantics {
        self.settings
            .insert(INPUT_PARTITIONS_KEY.to_owned(), i128::from(partitions));
        self
    }

    /// The classification-rules version it was built with.
    pub fn semantics_version(&self) -> u32 {
        self.semantics_version
    }

    /// Setting values by wire key (see [`SETTINGS`]).
    pub fn settings(&self) -> &BTreeMap<String, i128> {
        &self.settings
    }

    /// The versions of one contracts section, in effective order.
    pub fn versions(&self, section: ContractSection) -> &[ContractVersion] {
        match section {
            ContractSection::PriceBook => &self.price_book,
            ContractSection::ShareRules => &self.share_rules,
        }
    }

    /// The wire form (see the module docs); at most [`MAX_WIRE_BYTES`] bytes for any
    /// value built by [`Semantics::new`], [`Semantics::from_parts`] or
    /// [`Semantics::from_wire`].
    pub fn to_wire(&self) -> String {
        use fmt::Write as _;
        let mut out = format!("f={WIRE_FORMAT_VERSION};sv={}", self.semantics_version);
        for (key, value) in &self.settings {
            let _ = write!(out, ";{key}={value}");
        }
        for (key, versions) in [("pb", &self.price_book), ("sr", &self.share_rules)] {
            let _ = write!(out, ";{key}=");
            for (index, version) in versions.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{}:{}", version.effective_from_ms, version.digest);
            }
        }
        out
    }

    /// Parses a wire form; labels come back as `None`.
    pub fn from_wire(wire: &str) -> Result<Semantics, SemanticsError> {
        if wire.len() > MAX_WIRE_BYTES {
            return Err(SemanticsError::TooLarge {
                bytes: wire.len(),
                versions: 0,
                limit: MAX_WIRE_BYTES,
            });
        }
        let mut fields = wire.split(';');
        let first = fields.next().unwrap_or_default();
        if first != format!("f={WIRE_FORMAT_VERSION}") {
            return Err(SemanticsError::UnsupportedFormat {
                found: first.chars().take(16).collect(),
            });
        }
        let mut semantics_version = None;
        let mut settings = BTreeMap::new();
        let mut price_book = None;
        let mut share_rules = None;
        for field in fields {
            let Some((key, value)) = field.split_once('=') else {
                return Err(malformed(field, "expected key=value"));
            };
            let duplicate = match key {
                "f" => true,
                "sv" => {
                    let parsed = parse_integer(field, value)?;
                    let parsed = u32::try_from(parsed)
                        .map_err(|_| malformed(field, "the semantics version is not a u32"))?;
                    semantics_version.replace(parsed).is_some()
                }
                "pb" => price_book.replace(parse_versions(field, value)?).is_some(),
                "sr" => share_rules.replace(parse_versions(field, value)?).is_some(),
                setting => {
                    check_setting_key(setting)?;
                    let parsed = parse_integer(field, value)?;
                    settings.insert(setting.to_owned(), parsed).is_some()
                }
            };
            if duplicate {
                return Err(malformed(field, "the key appears more than once"));
            }
        }
        let semantics_version = semantics_version.ok_or(SemanticsError::Missing { field: "sv" })?;
        let price_book = price_book.ok_or(SemanticsError::Missing { field: "pb" })?;
        let share_rules = share_rules.ok_or(SemanticsError::Missing { field: "sr" })?;
        Semantics::from_parts(semantics_version, settings, price_book, share_rules)
    }
}

fn check_setting_key(key: &str) -> Result<(), SemanticsError> {
    let shaped = !key.is_empty()
        && key.len() <= 16
        && key
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_');
    if !shaped {
        return Err(malformed(
            key,
            "a setting key is 1 to 16 lower-case letters, digits or '_'",
        ));
    }
    if RESERVED_KEYS.contains(&key) {
        return Err(malformed(key, "a reserved key cannot be a setting"));
    }
    Ok(())
}

/// A decimal integer in canonical form: no sign but `-`, no leading zeros, no `-0`.
fn parse_integer(field: &str, text: &str) -> Result<i128, SemanticsError> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|byte| byte.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0";
    if !canonical {
        return Err(malformed(field, "not a canonical decimal integer"));
    }
    text.parse::<i128>()
        .map_err(|_| malformed(field, "the integer is out of range"))
}

fn parse_versions(field: &str, text: &str) -> Result<Vec<ContractVersion>, SemanticsError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut versions = Vec::new();
    for entry in text.split(',') {
        let Some((from, digest)) = entry.split_once(':') else {
            return Err(malformed(
                field,
                "a version is <effective_from ms>:<16 hex digits>",
            ));
        };
        let effective_from_ms = i64::try_from(parse_integer(field, from)?)
            .map_err(|_| malformed(field, "effective_from does not fit i64 ms"))?;
        let hex_shaped = digest.len() == 16
            && digest
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
        let parsed = u64::from_str_radix(digest, 16).ok().filter(|_| hex_shaped);
        let Some(digest) = parsed else {
            return Err(malformed(field, "a digest is 16 lower-case hex digits"));
        };
        versions.push(ContractVersion {
            effective_from_ms,
            digest: ContentDigest(digest),
            label: None,
        });
    }
    Ok(versions)
}

/// One difference that makes a restart unsafe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The build's classification rules differ from the checkpoint's.
    SemanticsVersion {
        /// Version in the checkpoint.
        committed: u32,
        /// Version of this build.
        current: u32,
    },
    /// A setting has another value, or exists on one side only (another build).
    Setting {
        /// Dotted config name, or the wire key of a setting this build does not know.
        name: String,
        /// Value in the checkpoint.
        committed: Option<i128>,
        /// Value now.
        current: Option<i128>,
    },
    /// A published version's content changed.
    VersionEdited {
        /// Its section.
        section: ContractSection,
        /// Its start.
        effective_from_ms: i64,
        /// Its current label.
        label: Option<String>,
    },
    /// A published version is no longer in the contracts.
    VersionRemoved {
        /// Its section.
        section: ContractSection,
        /// Its start.
        effective_from_ms: i64,
    },
    /// A new version starts at or before the largest event time already classified:
    /// it would reprice usage that was billed under the previous version.
    VersionStartsInClassifiedTime {
        /// Its section.
        section: ContractSection,
        /// Its start.
        effective_from_ms: i64,
        /// Its label.
        label: Option<String>,
        /// The partition's largest classified event time.
        max_event_time_ms: i64,
    },
}

fn setting_name(key: &str) -> String {
    match SETTINGS.iter().find(|spec| spec.key == key) {
        Some(spec) => spec.name.to_owned(),
        None => format!("setting `{key}` (unknown to this build)"),
    }
}

fn version_name(section: ContractSection, effective_from_ms: i64, label: Option<&str>) -> String {
    let from = format_utc_timestamp(effective_from_ms);
    match label {
        Some(label) => format!("{section} version {label:?} (effective_from {from})"),
        None => format!("{section} version with effective_from {from}"),
    }
}

fn show(value: Option<i128>) -> String {
    value.map_or_else(|| "(absent)".to_owned(), |value| value.to_string())
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::SemanticsVersion { committed, current } => write!(
                f,
                "semantics version {committed} -> {current} (the classification rules of this build differ)"
            ),
            Change::Setting {
                name,
                committed,
                current,
            } => write!(f, "{name} {} -> {}", show(*committed), show(*current)),
            Change::VersionEdited {
                section,
                effective_from_ms,
                label,
            } => write!(
                f,
                "{} was edited (published versions are immutable)",
                version_name(*section, *effective_from_ms, label.as_deref())
            ),
            Change::VersionRemoved {
                section,
                effective_from_ms,
            } => write!(
                f,
                "{} was removed",
                version_name(*section, *effective_from_ms, None)
            ),
            Change::VersionStartsInClassifiedTime {
                section,
                effective_from_ms,
                label,
                max_event_time_ms,
            } => write!(
                f,
                "new {} starts at or before {}, the largest event time this partition has already counted",
                version_name(*section, *effective_from_ms, label.as_deref()),
                format_utc_timestamp(*max_event_time_ms)
            ),
        }
    }
}

/// A restart whose semantics differ from the committed checkpoint's: every difference,
/// and how to go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SemanticsChange {
    /// Every difference found, settings first, then contract versions by section and
    /// start.
    pub changes: Vec<Change>,
}

impl fmt::Display for SemanticsChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the semantics differ from the committed checkpoint's: ")?;
        for (index, change) in self.changes.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{change}")?;
        }
        f.write_str(
            ". Restarting would recount already billed usage under other rules. To go on, \
             either restore the previous settings and contracts, or re-aggregate the input \
             under the new semantics with `tally replay` into a separate output topic or \
             store and reconcile it against what was billed; a new consumer group with \
             --start-from would bill already billed usage again",
        )
    }
}

impl std::error::Error for SemanticsChange {}

/// Whether a partition checkpointed under `committed` may go on under `current`.
///
/// `max_event_time_ms` is the largest event time the partition has classified with the
/// contracts as of the checkpoint: its largest counted event time, and, if the
/// checkpoint tracks it, the largest event time rejected because no price was in force
/// (a new version covering that time would turn such a rejection into a count). `None`
/// when it has classified nothing, so any new version is accepted.
pub fn check_restart(
    committed: &Semantics,
    current: &Semantics,
    max_event_time_ms: Option<i64>,
) -> Result<(), SemanticsChange> {
    let mut changes = Vec::new();
    if committed.semantics_version != current.semantics_version {
        changes.push(Change::SemanticsVersion {
            committed: committed.semantics_version,
            current: current.semantics_version,
        });
    }
    // Settings in the order of SETTINGS, then keys this build does not know.
    let mut keys: Vec<&str> = SETTINGS.iter().map(|spec| spec.key).collect();
    for key in committed.settings.keys().chain(current.settings.keys()) {
        if !keys.contains(&key.as_str()) {
            keys.push(key);
        }
    }
    for key in keys {
        let old = committed.settings.get(key).copied();
        let new = current.settings.get(key).copied();
        if old != new {
            changes.push(Change::Setting {
                name: setting_name(key),
                committed: old,
                current: new,
            });
        }
    }
    for section in [ContractSection::PriceBook, ContractSection::ShareRules] {
        let old: BTreeMap<i64, &ContractVersion> = committed
            .versions(section)
            .iter()
            .map(|version| (version.effective_from_ms, version))
            .collect();
        let new: BTreeMap<i64, &ContractVersion> = current
            .versions(section)
            .iter()
            .map(|version| (version.effective_from_ms, version))
            .collect();
        let mut starts: Vec<i64> = old.keys().chain(new.keys()).copied().collect();
        starts.sort_unstable();
        starts.dedup();
        for effective_from_ms in starts {
            match (old.get(&effective_from_ms), new.get(&effective_from_ms)) {
                (Some(before), Some(now)) => {
                    if before.digest != now.digest {
                        changes.push(Change::VersionEdited {
                            section,
                            effective_from_ms,
                            label: now.label.clone(),
                        });
                    }
                }
                (Some(_), None) => changes.push(Change::VersionRemoved {
                    section,
                    effective_from_ms,
                }),
                (None, Some(now)) => {
                    if let Some(max_event_time_ms) = max_event_time_ms
                        && effective_from_ms <= max_event_time_ms
                    {
                        changes.push(Change::VersionStartsInClassifiedTime {
                            section,
                            effective_from_ms,
                            label: now.label.clone(),
                            max_event_time_ms,
                        });
                    }
                }
                (None, None) => {}
            }
        }
    }
    if changes.is_empty() {
        Ok(())
    } else {
        Err(SemanticsChange { changes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::WindowSize;
    use proptest::prelude::*;

    const CONTRACTS: &str = r#"
[[price_book]]
version = "2024-01"
effective_from = "2024-01-01T00:00:00Z"
currency = "USD"
billable_statuses = ["succeeded"]

[price_book.models.m]
input = 2_500_000_000
cached_input = 1_250_000_000
output = 10_000_000_000
reasoning = 10_000_000_000

[[share_rules]]
version = "2024-01"
effective_from = "2024-01-01T00:00:00Z"

[[share_rules.rules]]
cloud = "aws"
beneficiaries = [{ partner = "p", basis_points = 2000 }]
"#;

    /// The same content as [`CONTRACTS`], written differently: other key order, number
    /// spelling, inline tables, comments.
    const CONTRACTS_REFORMATTED: &str = r#"
# reformatted
[[share_rules]]
effective_from = "2024-01-01T00:00:00Z"
version = "2024-01"
rules = [ { beneficiaries = [ { basis_points = 2000, partner = "p" } ], cloud = "aws" } ]

[[price_book]]
billable_statuses = [ "succeeded" ]
currency = "USD"
effective_from = "2024-01-01T00:00:00Z"
models = { m = { reasoning = 10000000000, output = 10000000000, cached_input = 1250000000, input = 2500000000 } }
version = "2024-01"
"#;

    /// 2024-01-01T00:00:00Z.
    const JAN_2024_MS: i64 = 1_704_067_200_000;
    /// 2024-02-01T00:00:00Z.
    const FEB_2024_MS: i64 = 1_706_745_600_000;

    fn contracts(text: &str) -> Contracts {
        Contracts::load(text, WindowSize::new(60_000).expect("window")).expect("contracts")
    }

    fn semantics(config: &Config, text: &str) -> Semantics {
        Semantics::new(config, &contracts(text)).expect("semantics")
    }

    fn base() -> Semantics {
        semantics(&Config::default(), CONTRACTS)
    }

    /// [`CONTRACTS`] with a second price-book version starting at `from`.
    fn with_new_price_book(from: &str) -> String {
        format!(
            r#"{CONTRACTS}
[[price_book]]
version = "next"
effective_from = "{from}"
currency = "USD"
billable_statuses = ["succeeded"]

[price_book.models.m]
input = 2_000_000_000
cached_input = 1_250_000_000
output = 10_000_000_000
reasoning = 10_000_000_000
"#
        )
    }

    fn changes(committed: &Semantics, current: &Semantics, max: Option<i64>) -> Vec<Change> {
        check_restart(committed, current, max)
            .expect_err("a change")
            .changes
    }

    #[test]
    fn identical_semantics_restart() {
        assert_eq!(check_restart(&base(), &base(), Some(FEB_2024_MS)), Ok(()));
        assert_eq!(check_restart(&base(), &base(), None), Ok(()));
    }

    /// The canonical encoding is part of the checkpoint format: these digests were
    /// computed outside the crate (Python's hashlib over the documented encoding), so a
    /// change of the encoding fails here instead of refusing every restart.
    #[test]
    fn digests_of_the_canonical_encoding_are_stable() {
        let wire = base().to_wire();
        assert!(
            wire.ends_with(";pb=1704067200000:0b89f62e25af0089;sr=1704067200000:24fca80aa6d5a11f"),
            "{wire}"
        );
    }

    #[test]
    fn reformatted_contracts_are_not_a_change() {
        let reformatted = semantics(&Config::default(), CONTRACTS_REFORMATTED);
        assert_eq!(reformatted.to_wire(), base().to_wire());
        assert_eq!(
            check_restart(&base(), &reformatted, Some(FEB_2024_MS)),
            Ok(())
        );
    }

    type ConfigEdit = fn(&mut Config);

    #[test]
    fn each_changed_setting_is_named_with_old_and_new_value() {
        let cases: [(&str, ConfigEdit); 13] = [
            ("aggregator.window_ms", |c| c.aggregator.window_ms = 30_000),
            ("aggregator.max_out_of_orderness_ms", |c| {
                c.aggregator.max_out_of_orderness_ms += 1
            }),
            ("aggregator.allowed_lateness_ms", |c| {
                c.aggregator.allowed_lateness_ms += 1
            }),
            ("aggregator.correction_horizon_ms", |c| {
                c.aggregator.correction_horizon_ms += 1
            }),
            ("aggregator.dedupe_horizon_ms", |c| {
                c.aggregator.dedupe_horizon_ms += 1
            }),
            ("validation.max_tokens_per_kind", |c| {
                c.validation.max_tokens_per_kind += 1
            }),
            ("validation.max_event_time_ahead_ms", |c| {
                c.validation.max_event_time_ahead_ms += 1
            }),
            ("validation.max_event_time_behind_ms", |c| {
                c.validation.max_event_time_behind_ms += 1
            }),
            ("validation.max_dimension_bytes", |c| {
                c.validation.max_dimension_bytes += 1
            }),
            ("validation.max_request_id_bytes", |c| {
                c.validation.max_request_id_bytes += 1
            }),
            ("validation.max_attribute_entries", |c| {
                c.validation.max_attribute_entries += 1
            }),
            ("validation.max_attributes_bytes", |c| {
                c.validation.max_attributes_bytes += 1
            }),
            ("topics.partitions", |c| c.topics.partitions = 12),
        ];
        assert_eq!(cases.len(), SETTINGS.len(), "every setting has a case");
        for (name, change) in cases {
            let mut config = Config::default();
            let before = SETTINGS
                .iter()
                .find(|spec| spec.name == name)
                .map(|spec| (spec.read)(&config))
                .expect("a known setting");
            change(&mut config);
            let after = SETTINGS
                .iter()
                .find(|spec| spec.name == name)
                .map(|spec| (spec.read)(&config))
                .expect("a known setting");
            let found = changes(&base(), &semantics(&config, CONTRACTS), None);
            assert_eq!(
                found,
                vec![Change::Setting {
                    name: name.to_owned(),
                    committed: Some(before),
                    current: Some(after),
                }],
                "{name}"
            );
        }
    }

    #[test]
    fn window_change_message_names_the_values_and_the_way_on() {
        let mut config = Config::default();
        config.aggregator.window_ms = 30_000;
        let error = check_restart(&base(), &semantics(&config, CONTRACTS), None)
            .expect_err("window changed");
        let text = error.to_string();
        assert!(
            text.contains("aggregator.window_ms 60000 -> 30000"),
            "{text}"
        );
        assert!(text.contains("tally replay"), "{text}");
        assert!(text.contains("--start-from"), "{text}");
    }

    #[test]
    fn the_partition_count_routed_with_is_compared() {
        let six = base().with_input_partitions(6);
        assert_eq!(
            check_restart(&base(), &six, None),
            Ok(()),
            "the default is 6"
        );
        assert_eq!(
            changes(&six, &base().with_input_partitions(8), None),
            vec![Change::Setting {
                name: "topics.partitions".to_owned(),
                committed: Some(6),
                current: Some(8),
            }]
        );
    }

    #[test]
    fn another_semantics_version_is_a_change() {
        let mut committed = base();
        committed.semantics_version = SEMANTICS_VERSION + 1;
        assert_eq!(
            changes(&committed, &base(), None),
            vec![Change::SemanticsVersion {
                committed: SEMANTICS_VERSION + 1,
                current: SEMANTICS_VERSION,
            }]
        );
    }

    #[test]
    fn a_setting_known_to_one_build_only_is_a_change() {
        let mut committed = base();
        committed.settings.insert("zz".to_owned(), 256);
        assert_eq!(
            changes(&committed, &base(), None),
            vec![Change::Setting {
                name: "setting `zz` (unknown to this build)".to_owned(),
                committed: Some(256),
                current: None,
            }]
        );
    }

    #[test]
    fn an_edited_price_is_a_change() {
        let edited = CONTRACTS.replace("input = 2_500_000_000", "input = 2_500_000_001");
        assert_ne!(edited, CONTRACTS);
        assert_eq!(
            changes(&base(), &semantics(&Config::default(), &edited), None),
            vec![Change::VersionEdited {
                section: ContractSection::PriceBook,
                effective_from_ms: JAN_2024_MS,
                label: Some("2024-01".to_owned()),
            }]
        );
    }

    #[test]
    fn an_edited_basis_point_is_a_change() {
        let edited = CONTRACTS.replace("basis_points = 2000", "basis_points = 2001");
        assert_eq!(
            changes(&base(), &semantics(&Config::default(), &edited), None),
            vec![Change::VersionEdited {
                section: ContractSection::ShareRules,
                effective_from_ms: JAN_2024_MS,
                label: Some("2024-01".to_owned()),
            }]
        );
    }

    #[test]
    fn an_edited_billable_status_or_label_is_a_change() {
        for edited in [
            CONTRACTS.replace(
                r#"billable_statuses = ["succeeded"]"#,
                r#"billable_statuses = ["succeeded", "failed"]"#,
            ),
            CONTRACTS.replacen(r#"version = "2024-01""#, r#"version = "v1""#, 1),
        ] {
            let found = changes(&base(), &semantics(&Config::default(), &edited), None);
            assert!(
                matches!(
                    found.as_slice(),
                    [Change::VersionEdited {
                        section: ContractSection::PriceBook,
                        effective_from_ms: JAN_2024_MS,
                        ..
                    }]
                ),
                "{found:?}"
            );
        }
    }

    #[test]
    fn a_removed_version_is_a_change() {
        let committed = semantics(
            &Config::default(),
            &with_new_price_book("2024-03-01T00:00:00Z"),
        );
        let found = changes(&committed, &base(), Some(FEB_2024_MS));
        let march_ms = FEB_2024_MS + 29 * 86_400_000;
        assert_eq!(
            found,
            vec![Change::VersionRemoved {
                section: ContractSection::PriceBook,
                effective_from_ms: march_ms,
            }]
        );
        assert!(
            found[0]
                .to_string()
                .contains("effective_from 2024-03-01T00:00:00Z"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn a_new_version_after_the_largest_event_time_is_accepted() {
        let current = semantics(
            &Config::default(),
            &with_new_price_book("2024-02-01T00:00:00Z"),
        );
        assert_eq!(
            check_restart(&base(), &current, Some(FEB_2024_MS - 1)),
            Ok(())
        );
        assert_eq!(check_restart(&base(), &current, None), Ok(()));
    }

    #[test]
    fn a_new_version_at_or_before_the_largest_event_time_is_a_change() {
        let current = semantics(
            &Config::default(),
            &with_new_price_book("2024-02-01T00:00:00Z"),
        );
        for max in [FEB_2024_MS, FEB_2024_MS + 1, FEB_2024_MS + 86_400_000] {
            let found = changes(&base(), &current, Some(max));
            assert_eq!(
                found,
                vec![Change::VersionStartsInClassifiedTime {
                    section: ContractSection::PriceBook,
                    effective_from_ms: FEB_2024_MS,
                    label: Some("next".to_owned()),
                    max_event_time_ms: max,
                }]
            );
        }
    }

    #[test]
    fn every_change_is_listed_at_once() {
        let mut config = Config::default();
        config.aggregator.allowed_lateness_ms = 1_000;
        config.validation.max_tokens_per_kind = 7;
        let edited = with_new_price_book("2024-02-01T00:00:00Z")
            .replace("basis_points = 2000", "basis_points = 2500");
        let error = check_restart(&base(), &semantics(&config, &edited), Some(FEB_2024_MS))
            .expect_err("changes");
        assert_eq!(error.changes.len(), 4, "{error}");
        let text = error.to_string();
        for needle in [
            "aggregator.allowed_lateness_ms 30000 -> 1000",
            "validation.max_tokens_per_kind 100000000 -> 7",
            "share_rules version \"2024-01\" (effective_from 2024-01-01T00:00:00Z) was edited",
            "new price_book version \"next\" (effective_from 2024-02-01T00:00:00Z) starts at or before 2024-02-01T00:00:00Z",
        ] {
            assert!(text.contains(needle), "{needle:?} in {text}");
        }
    }

    #[test]
    fn wire_form_round_trips_and_is_small() {
        let original = semantics(
            &Config::default(),
            &with_new_price_book("2024-02-01T00:00:00Z"),
        );
        let wire = original.to_wire();
        assert!(wire.starts_with("f=1;sv=1;"), "{wire}");
        assert!(
            wire.bytes()
                .all(|byte| byte.is_ascii_graphic() && byte != b'"' && byte != b'\\'),
            "{wire}"
        );
        let parsed = Semantics::from_wire(&wire).expect("parses");
        assert_eq!(parsed.to_wire(), wire);
        assert_eq!(check_restart(&parsed, &original, Some(i64::MAX)), Ok(()));
        assert!(wire.len() < 300, "{} bytes: {wire}", wire.len());
    }

    #[test]
    fn setting_keys_are_unique_and_not_reserved() {
        for (index, spec) in SETTINGS.iter().enumerate() {
            assert_eq!(check_setting_key(spec.key), Ok(()), "{}", spec.name);
            assert!(
                SETTINGS[..index]
                    .iter()
                    .all(|other| other.key != spec.key && other.name != spec.name),
                "{} is listed twice",
                spec.key
            );
        }
    }

    /// A contracts file with `count` price-book versions, one a day.
    fn many_versions(count: usize) -> String {
        let mut text = String::from(CONTRACTS);
        for day in 1..count {
            let from = format_utc_timestamp(JAN_2024_MS + day as i64 * 86_400_000);
            text.push_str(&format!(
                "\n[[price_book]]\nversion = \"v{day}\"\neffective_from = \"{from}\"\n\
                 currency = \"USD\"\nbillable_statuses = [\"succeeded\"]\n\
                 [price_book.models.m]\ninput = {day}\ncached_input = 1\noutput = 1\nreasoning = 1\n"
            ));
        }
        text
    }

    #[test]
    fn forty_versions_fit_and_too_many_fail_at_start() {
        let forty = Semantics::new(&Config::default(), &contracts(&many_versions(40)))
            .expect("40 versions fit");
        assert!(forty.to_wire().len() <= 2_000, "{}", forty.to_wire().len());
        let error = Semantics::new(&Config::default(), &contracts(&many_versions(100)))
            .expect_err("100 versions do not fit");
        assert!(
            matches!(
                error,
                SemanticsError::TooLarge {
                    versions: 101,
                    limit: MAX_WIRE_BYTES,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn malformed_wire_forms_are_rejected_with_a_typed_error() {
        let good = base().to_wire();
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "unsupported"),
            ("f=2;sv=1;pb=;sr=".to_owned(), "unsupported"),
            ("{\"v\":1}".to_owned(), "unsupported"),
            ("f=1;pb=;sr=".to_owned(), "missing"),
            ("f=1;sv=1;sr=".to_owned(), "missing"),
            ("f=1;sv=1;pb=".to_owned(), "missing"),
            ("f=1;sv=1;pb=;sr=;w".to_owned(), "malformed"),
            ("f=1;sv=1;pb=;sr=;w=01".to_owned(), "malformed"),
            ("f=1;sv=1;pb=;sr=;w=-0".to_owned(), "malformed"),
            ("f=1;sv=1;pb=;sr=;w=+1".to_owned(), "malformed"),
            ("f=1;sv=1;pb=;sr=;w=1;w=1".to_owned(), "malformed"),
            ("f=1;sv=1;sv=1;pb=;sr=".to_owned(), "malformed"),
            ("f=1;sv=-1;pb=;sr=".to_owned(), "malformed"),
            ("f=1;sv=1;pb=;sr=;W=1".to_owned(), "malformed"),
            ("f=1;sv=1;pb=;sr=;f=1".to_owned(), "malformed"),
            ("f=1;sv=1;pb=1;sr=".to_owned(), "malformed"),
            ("f=1;sv=1;pb=1:00000000000000zz;sr=".to_owned(), "malformed"),
            ("f=1;sv=1;pb=1:00000000000000AB;sr=".to_owned(), "malformed"),
            ("f=1;sv=1;pb=1:000000000000000;sr=".to_owned(), "malformed"),
            (
                "f=1;sv=1;pb=2:0000000000000000,1:0000000000000000;sr=".to_owned(),
                "malformed",
            ),
            (
                "f=1;sv=1;pb=1:0000000000000000,1:0000000000000000;sr=".to_owned(),
                "malformed",
            ),
            ("f=1;sv=1;pb=;sr=,".to_owned(), "malformed"),
            (format!("{good};"), "malformed"),
            (format!("{good}{}", "0".repeat(MAX_WIRE_BYTES)), "too large"),
        ];
        for (wire, expected) in cases {
            let error = Semantics::from_wire(&wire).expect_err(&wire);
            let kind = match error {
                SemanticsError::UnsupportedFormat { .. } => "unsupported",
                SemanticsError::Missing { .. } => "missing",
                SemanticsError::Malformed { .. } => "malformed",
                SemanticsError::TooLarge { .. } => "too large",
            };
            assert_eq!(kind, expected, "{wire:?}: {error}");
        }
        let minimal = Semantics::from_wire("f=1;sv=1;pb=;sr=").expect("minimal");
        assert!(minimal.settings().is_empty());
    }

    fn arbitrary_versions() -> impl Strategy<Value = Vec<ContractVersion>> {
        proptest::collection::btree_map(any::<i64>(), any::<u64>(), 0..16).prop_map(|map| {
            map.into_iter()
                .map(|(effective_from_ms, digest)| ContractVersion {
                    effective_from_ms,
                    digest: ContentDigest(digest),
                    label: None,
                })
                .collect()
        })
    }

    fn arbitrary_semantics() -> impl Strategy<Value = Semantics> {
        let keys: Vec<&'static str> = SETTINGS
            .iter()
            .map(|spec| spec.key)
            .chain(["x", "new_limit"])
            .collect();
        (
            any::<u32>(),
            proptest::collection::btree_map(proptest::sample::select(keys), any::<i128>(), 0..8),
            arbitrary_versions(),
            arbitrary_versions(),
        )
            .prop_map(|(version, settings, price_book, share_rules)| {
                let settings = settings
                    .into_iter()
                    .map(|(key, value)| (key.to_owned(), value))
                    .collect();
                Semantics::from_parts(version, settings, price_book, share_rules)
                    .expect("32 versions and 8 settings fit")
            })
    }

    proptest! {
        #[test]
        fn wire_form_round_trips(semantics in arbitrary_semantics()) {
            let wire = semantics.to_wire();
            prop_assert!(wire.len() <= MAX_WIRE_BYTES);
            prop_assert_eq!(Semantics::from_wire(&wire), Ok(semantics));
        }

        #[test]
        fn the_same_semantics_always_restart(
            semantics in arbitrary_semantics(),
            max in proptest::option::of(any::<i64>()),
        ) {
            prop_assert_eq!(check_restart(&semantics, &semantics, max), Ok(()));
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(text in "[a-z0-9=;:,f-]{0,80}") {
            let _ = Semantics::from_wire(&text);
        }
    }
}
