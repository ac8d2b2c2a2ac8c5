//! Rows for the statement and export tests: described by the test, priced with the
//! tests' own contract arithmetic ([`super::money`]), and written through the store's
//! batch path as the sink writes them.

use std::time::Duration;

use tally_core::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use tally_core::codec::encode_aggregate;
use tally_core::event::{Cloud, TokenCounts};
use tally_sink::rows::{Position, StoredRow};
use tally_sink::{Batch, OffsetAdvance, Store, StoreLocation};

use super::money::TruthContracts;

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
/// 2026-02-01T00:00:00Z.
pub const FEB_2026_MS: i64 = 1_769_904_000_000;
/// The aggregates topic the rows are "read" from.
pub const TOPIC: &str = "finance-test.billing.aggregates";

/// What the test says a row is; the money comes from the contracts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSpec {
    pub window_start_ms: i64,
    pub tenant: String,
    pub model: String,
    pub cloud: Cloud,
    pub channel_partner: Option<String>,
    pub correction_seq: u32,
    /// input, cached input, output, reasoning.
    pub tokens: [u64; 4],
    pub billable: bool,
}

impl RowSpec {
    pub fn new(
        window_start_ms: i64,
        tenant: &str,
        model: &str,
        cloud: Cloud,
        channel_partner: Option<&str>,
        tokens: [u64; 4],
    ) -> RowSpec {
        RowSpec {
            window_start_ms,
            tenant: tenant.to_owned(),
            model: model.to_owned(),
            cloud,
            channel_partner: channel_partner.map(str::to_owned),
            correction_seq: 0,
            tokens,
            billable: true,
        }
    }

    pub fn id(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}|{}",
            self.window_start_ms,
            self.tenant,
            self.model,
            self.cloud.as_str(),
            self.channel_partner.as_deref().unwrap_or(""),
            self.correction_seq,
            self.billable
        )
    }

    /// The row the aggregator would emit, priced by the tests' arithmetic.
    pub fn row(&self, contracts: &TruthContracts) -> BillingAggregate {
        let amounts = contracts
            .expected(
                &self.model,
                self.cloud.as_str(),
                self.channel_partner.as_deref(),
                self.window_start_ms,
                self.tokens,
                self.billable,
            )
            .expect("priced by the contracts");
        BillingAggregate {
            id: self.id(),
            window_start_ms: self.window_start_ms,
            window_end_ms: self.window_start_ms + MINUTE_MS,
            dims: Dims {
                tenant_id: self.tenant.clone(),
                model: self.model.clone(),
                cloud: self.cloud,
                channel_partner: self.channel_partner.clone(),
                region: "r1".to_owned(),
            },
            row_kind: if self.billable {
                RowKind::Billable
            } else {
                RowKind::NonBillable
            },
            correction_seq: self.correction_seq,
            event_count: 3,
            tokens: TokenCounts {
                input: self.tokens[0],
                cached_input: self.tokens[1],
                output: self.tokens[2],
                reasoning: self.tokens[3],
            },
            currency: amounts.currency,
            gross_micros: amounts.gross_micros,
            shares: amounts
                .shares
                .iter()
                .map(|(beneficiary, basis_points, amount)| PartnerShare {
                    beneficiary: beneficiary.clone(),
                    basis_points: *basis_points,
                    amount_micros: *amount,
                })
                .collect(),
            net_micros: amounts.net_micros,
            price_book_version: amounts.price_book_version,
            share_rule_version: amounts.share_rule_version,
            source_topic: "usage.events".to_owned(),
            source_partition: 0,
            first_offset: 0,
            last_offset: 0,
            first_event_time_ms: self.window_start_ms,
            last_event_time_ms: self.window_start_ms,
        }
    }
}

/// Writes `specs` as one batch per partition (round-robin over `partitions`), after
/// the offsets already in the store. Returns the store's offsets after the batch.
pub fn write_rows(
    location: &StoreLocation,
    contracts: &TruthContracts,
    specs: &[RowSpec],
    partitions: i32,
) -> std::collections::BTreeMap<i32, i64> {
    write_rows_to(location, contracts, specs, partitions, TOPIC)
}

/// [`write_rows`] as if read from `topic`.
pub fn write_rows_to(
    location: &StoreLocation,
    contracts: &TruthContracts,
    specs: &[RowSpec],
    partitions: i32,
    topic: &str,
) -> std::collections::BTreeMap<i32, i64> {
    let mut store = Store::open(location, Duration::from_secs(30)).expect("open store");
    let mut offsets = store.load_offsets(topic).expect("offsets");
    for partition in 0..partitions {
        let expected = offsets.get(&partition).copied();
        let mut next = expected.unwrap_or(0);
        let mut rows = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            if i32::try_from(index).expect("small") % partitions != partition {
                continue;
            }
            let row = spec.row(contracts);
            let mut value = Vec::new();
            encode_aggregate(&row, &mut value);
            rows.push(StoredRow::new(
                row,
                &value,
                Position {
                    topic: topic.to_owned(),
                    partition,
                    offset: next,
                },
            ));
            // Every other offset is a transaction marker, as on the real topic.
            next += 2;
        }
        if rows.is_empty() {
            continue;
        }
        let count = rows.len() as u64;
        let outcome = store
            .write_batch(&Batch {
                rows,
                offsets: vec![OffsetAdvance {
                    topic: topic.to_owned(),
                    partition,
                    expected,
                    next,
                }],
            })
            .expect("write batch");
        assert_eq!(outcome.inserted, count, "every row is new");
        offsets.insert(partition, next);
    }
    offsets
}

/// A config for the binary: no metrics listener, the aggregator's timing explicit
/// (liveness bound = 60 000 + 30 000 + 10 000 + 2 × 1 000 = 102 000 ms).
pub fn finance_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("finance.toml");
    std::fs::write(
        &path,
        "[metrics]\nlisten = \"\"\n[aggregator]\nwindow_ms = 60000\nallowed_lateness_ms = 30000\nidle_timeout_ms = 10000\ncommit_interval_ms = 1000\n",
    )
    .expect("config");
    path
}

/// Runs the binary; panics with stderr on failure; stdout.
pub fn tally_ok(args: &[&str], config: &std::path::Path) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run tally");
    assert!(
        output.status.success(),
        "tally {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}
