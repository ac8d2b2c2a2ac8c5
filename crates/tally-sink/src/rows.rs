//! Rows as the store keeps them, and the roll-up arithmetic. Pure logic, no I/O.
//!
//! A stored row is a decoded `BillingAggregate` plus where it was read (topic,
//! partition, offset) and the SHA-256 digest of the record's value bytes. Two records
//! with the same id are the same row exactly when their digests are equal (the
//! encoding is deterministic: maps sorted, no emitted-at fields).
//!
//! Roll-ups keep 15-minute UTC buckets: the aggregator's window divides 15 minutes,
//! so a row lies in exactly one bucket, and every real time zone's offset is a
//! multiple of 15 minutes, so any zone's hours, days and months are sums of whole
//! buckets. Sums are checked `i64` arithmetic: an overflow is an error, never a wrap.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use tally_core::aggregate::{BillingAggregate, Dims, RowKind};
use tally_core::event::Cloud;
use tally_core::identity::{ROW_ID_BYTES, RowIdentity, row_id, row_id_of};
use tally_core::window::Window;

use crate::error::SinkError;

/// Length of a roll-up bucket: 15 minutes in milliseconds.
pub const BUCKET_MS: i64 = 15 * 60 * 1000;

/// Where a record was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Topic of the record.
    pub topic: String,
    /// Partition of the record.
    pub partition: i32,
    /// Offset of the record.
    pub offset: i64,
}

/// One row ready for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// The decoded row.
    pub row: BillingAggregate,
    /// Lower-case hex SHA-256 of the record's value bytes.
    pub digest: String,
    /// Where the row was read.
    pub position: Position,
}

impl StoredRow {
    /// A row decoded from `value`, read at `position`.
    pub fn new(row: BillingAggregate, value: &[u8], position: Position) -> StoredRow {
        StoredRow {
            row,
            digest: digest_hex(value),
            position,
        }
    }
}

/// Whether `row.id` is tally's identity of the row's own content
/// ([`tally_core::identity::row_id_of`]): true for every row the aggregator or a replay
/// writes, false for a row another producer made up. See [`crate::schema`] for what
/// the store does with the difference.
pub fn id_is_derived(row: &BillingAggregate) -> bool {
    row.id.len() == 2 * ROW_ID_BYTES && row.id == row_id_of(row)
}

/// The columns of a stored row that its identity is computed from, in the order of
/// [`IDENTITY_COLUMNS`]; read back by migration 3 to find the foreign rows of a store
/// written before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredIdentity {
    pub(crate) id: String,
    pub(crate) window_start_ms: i64,
    pub(crate) window_end_ms: i64,
    pub(crate) tenant_id: String,
    pub(crate) model: String,
    pub(crate) cloud: String,
    pub(crate) channel_partner: Option<String>,
    pub(crate) region: String,
    pub(crate) price_book_version: String,
    pub(crate) share_rule_version: String,
    pub(crate) row_kind: String,
    pub(crate) correction_seq: i64,
    pub(crate) source_topic: String,
    pub(crate) source_partition: i64,
}

/// `tally_rows` columns of a [`StoredIdentity`], in its field order.
pub(crate) const IDENTITY_COLUMNS: &str = "id, window_start_ms, window_end_ms, tenant_id, model, \
     cloud, channel_partner, region, price_book_version, share_rule_version, row_kind, \
     correction_seq, source_topic, source_partition";

impl StoredIdentity {
    /// Whether the stored id is tally's identity of these columns; a value no
    /// BillingAggregate can hold (an unknown cloud, a negative sequence) is foreign.
    pub(crate) fn is_derived(&self) -> bool {
        let cloud = Cloud::from_symbol(&self.cloud);
        let row_kind = match self.row_kind.as_str() {
            "billable" => Some(RowKind::Billable),
            "non_billable" => Some(RowKind::NonBillable),
            _ => None,
        };
        let (Some(cloud), Some(row_kind), Ok(correction_seq), Ok(source_partition)) = (
            cloud,
            row_kind,
            u32::try_from(self.correction_seq),
            i32::try_from(self.source_partition),
        ) else {
            return false;
        };
        let dims = Dims {
            tenant_id: self.tenant_id.clone(),
            model: self.model.clone(),
            cloud,
            channel_partner: self.channel_partner.clone(),
            region: self.region.clone(),
        };
        self.id
            == row_id(&RowIdentity {
                source_topic: &self.source_topic,
                source_partition,
                window: Window {
                    start_ms: self.window_start_ms,
                    end_ms: self.window_end_ms,
                },
                dims: &dims,
                price_book_version: &self.price_book_version,
                share_rule_version: &self.share_rule_version,
                row_kind,
                correction_seq,
            })
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn digest_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Start of the 15-minute UTC bucket holding `time_ms`.
pub const fn bucket_start_ms(time_ms: i64) -> i64 {
    time_ms.div_euclid(BUCKET_MS) * BUCKET_MS
}

/// Converts a u64 count to the store's signed 64-bit integer, naming the field.
pub fn to_i64(field: &'static str, value: u64) -> Result<i64, SinkError> {
    i64::try_from(value).map_err(|_| SinkError::OutOfRange { field })
}

/// Key of a roll-up line: bucket and dims, in the order the store upserts them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RollupKey {
    /// Start of the 15-minute UTC bucket, ms.
    pub bucket_start_ms: i64,
    /// Billed customer.
    pub tenant_id: String,
    /// Model.
    pub model: String,
    /// Serving cloud (Avro symbol).
    pub cloud: String,
    /// Channel partner; empty when the row has none.
    pub channel_partner: String,
    /// Region.
    pub region: String,
    /// `billable` or `non_billable`.
    pub row_kind: String,
    /// ISO 4217 currency.
    pub currency: String,
}

impl RollupKey {
    /// The key of `row`.
    pub fn of(row: &BillingAggregate) -> RollupKey {
        RollupKey {
            bucket_start_ms: bucket_start_ms(row.window_start_ms),
            tenant_id: row.dims.tenant_id.clone(),
            model: row.dims.model.clone(),
            cloud: row.dims.cloud.as_str().to_owned(),
            channel_partner: row.dims.channel_partner.clone().unwrap_or_default(),
            region: row.dims.region.clone(),
            row_kind: row.row_kind.as_str().to_owned(),
            currency: row.currency.clone(),
        }
    }
}

/// Additive figures of a roll-up line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RollupSums {
    /// Rows added into the line.
    pub rows: i64,
    /// Counted events.
    pub event_count: i64,
    /// Uncached input tokens.
    pub input_tokens: i64,
    /// Cached input tokens.
    pub cached_input_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Gross, micro-units (sum of per-row rounded amounts).
    pub gross_micros: i64,
    /// Net, micro-units.
    pub net_micros: i64,
}

impl RollupSums {
    /// The figures of one row.
    pub fn of(row: &BillingAggregate) -> Result<RollupSums, SinkError> {
        Ok(RollupSums {
            rows: 1,
            event_count: to_i64("event_count", row.event_count)?,
            input_tokens: to_i64("input_tokens", row.tokens.input)?,
            cached_input_tokens: to_i64("cached_input_tokens", row.tokens.cached_input)?,
            output_tokens: to_i64("output_tokens", row.tokens.output)?,
            reasoning_tokens: to_i64("reasoning_tokens", row.tokens.reasoning)?,
            gross_micros: row.gross_micros,
            net_micros: row.net_micros,
        })
    }

    /// Adds `other`, failing on overflow.
    pub fn checked_add(&mut self, other: &RollupSums) -> Result<(), SinkError> {
        fn add(field: &'static str, a: i64, b: i64) -> Result<i64, SinkError> {
            a.checked_add(b).ok_or(SinkError::OutOfRange { field })
        }
        self.rows = add("rows", self.rows, other.rows)?;
        self.event_count = add("event_count", self.event_count, other.event_count)?;
        self.input_tokens = add("input_tokens", self.input_tokens, other.input_tokens)?;
        self.cached_input_tokens = add(
            "cached_input_tokens",
            self.cached_input_tokens,
            other.cached_input_tokens,
        )?;
        self.output_tokens = add("output_tokens", self.output_tokens, other.output_tokens)?;
        self.reasoning_tokens = add(
            "reasoning_tokens",
            self.reasoning_tokens,
            other.reasoning_tokens,
        )?;
        self.gross_micros = add("gross_micros", self.gross_micros, other.gross_micros)?;
        self.net_micros = add("net_micros", self.net_micros, other.net_micros)?;
        Ok(())
    }
}

/// Key of a share roll-up line: a roll-up key and the beneficiary.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShareKey {
    /// The row's roll-up key.
    pub rollup: RollupKey,
    /// Partner receiving the share.
    pub beneficiary: String,
}

/// The roll-up changes of a set of inserted rows, in key order (the order the store
/// upserts them in, so concurrent writers lock buckets in the same order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupDelta {
    /// Usage and money per bucket and dims.
    pub lines: BTreeMap<RollupKey, RollupSums>,
    /// Share amounts per bucket, dims and beneficiary, micro-units.
    pub shares: BTreeMap<ShareKey, i64>,
}

impl RollupDelta {
    /// Adds one inserted row.
    pub fn add(&mut self, row: &BillingAggregate) -> Result<(), SinkError> {
        let key = RollupKey::of(row);
        let sums = RollupSums::of(row)?;
        self.lines
            .entry(key.clone())
            .or_default()
            .checked_add(&sums)?;
        for share in &row.shares {
            let amount = self
                .shares
                .entry(ShareKey {
                    rollup: key.clone(),
                    beneficiary: share.beneficiary.clone(),
                })
                .or_insert(0);
            *amount = amount
                .checked_add(share.amount_micros)
                .ok_or(SinkError::OutOfRange {
                    field: "share amount_micros",
                })?;
        }
        Ok(())
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use tally_core::aggregate::{Dims, PartnerShare, RowKind};
    use tally_core::event::{Cloud, TokenCounts};

    use super::*;

    fn row(id: &str, window_start_ms: i64, gross: i64, shares: &[(&str, i64)]) -> BillingAggregate {
        let shares: Vec<PartnerShare> = shares
            .iter()
            .map(|(beneficiary, amount)| PartnerShare {
                beneficiary: (*beneficiary).to_owned(),
                basis_points: 2000,
                amount_micros: *amount,
            })
            .collect();
        let shared: i64 = shares.iter().map(|share| share.amount_micros).sum();
        BillingAggregate {
            id: id.to_owned(),
            window_start_ms,
            window_end_ms: window_start_ms + 60_000,
            dims: Dims {
                tenant_id: "t1".to_owned(),
                model: "m".to_owned(),
                cloud: Cloud::Aws,
                channel_partner: None,
                region: "us-east-1".to_owned(),
            },
            row_kind: RowKind::Billable,
            correction_seq: 0,
            event_count: 2,
            tokens: TokenCounts {
                input: 10,
                cached_input: 1,
                output: 5,
                reasoning: 0,
            },
            currency: "USD".to_owned(),
            gross_micros: gross,
            shares,
            net_micros: gross - shared,
            price_book_version: "p".to_owned(),
            share_rule_version: "s".to_owned(),
            source_topic: "in".to_owned(),
            source_partition: 0,
            first_offset: 0,
            last_offset: 1,
            first_event_time_ms: window_start_ms,
            last_event_time_ms: window_start_ms + 1,
        }
    }

    #[test]
    fn buckets_are_fifteen_utc_minutes_also_before_the_epoch() {
        assert_eq!(bucket_start_ms(0), 0);
        assert_eq!(bucket_start_ms(899_999), 0);
        assert_eq!(bucket_start_ms(900_000), 900_000);
        assert_eq!(bucket_start_ms(-1), -900_000);
    }

    #[test]
    fn rows_in_one_bucket_add_and_other_buckets_stay_apart() {
        let mut delta = RollupDelta::default();
        delta
            .add(&row("a", 0, 1_000, &[("aws", 200)]))
            .expect("add");
        delta
            .add(&row("b", 840_000, 3_000, &[("aws", 600)]))
            .expect("add");
        delta.add(&row("c", 900_000, 7, &[])).expect("add");
        assert_eq!(delta.lines.len(), 2);
        let first = delta.lines.values().next().expect("first bucket");
        assert_eq!(first.rows, 2);
        assert_eq!(first.event_count, 4);
        assert_eq!(first.input_tokens, 20);
        assert_eq!(first.gross_micros, 4_000);
        assert_eq!(first.net_micros, 3_200);
        assert_eq!(
            delta.shares.values().copied().collect::<Vec<_>>(),
            vec![800]
        );
    }

    #[test]
    fn overflowing_sums_are_errors() {
        let mut delta = RollupDelta::default();
        delta.add(&row("a", 0, i64::MAX, &[])).expect("add");
        let error = delta.add(&row("b", 0, 1, &[])).expect_err("overflow");
        assert!(matches!(
            error,
            SinkError::OutOfRange {
                field: "gross_micros"
            }
        ));
    }

    #[test]
    fn token_counts_beyond_i64_are_errors() {
        let mut big = row("a", 0, 0, &[]);
        big.tokens.output = u64::MAX;
        assert!(matches!(
            RollupSums::of(&big),
            Err(SinkError::OutOfRange {
                field: "output_tokens"
            })
        ));
    }

    #[test]
    fn digest_is_sha256_hex() {
        // SHA-256("abc") from FIPS 180-2, appendix B.1.
        assert_eq!(
            digest_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
