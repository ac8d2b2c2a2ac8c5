//! Metric names, HELP texts and the per-commit updates of the aggregator.
//!
//! Names follow `tally_aggregator_<name>_<unit>[_total]`. Labels come from small fixed
//! sets: `reason` (decode reasons, `misrouted`, the state machine's reasons), `kind`,
//! `cloud` (the schema's symbols), `partner` (the beneficiaries the contracts file
//! names), `partition` (bounded by the partition count). Record
//! counters are updated once per committed transaction from the committed counter
//! deltas, so they count committed work only (aborted work is not double counted) and
//! the hot path never calls a labelled macro.
//!
//! [`register_zero`] creates every series with a fixed label set at 0 when the process
//! starts, so dashboards and alerts see them before the first event: the unlabelled
//! counters, duplicates by kind, rejections by every reason, tokens and gross by every
//! known cloud, partner shares by every (cloud, beneficiary) the contracts name, the
//! state gauges and both histograms. Only the per-partition gauges appear later, with
//! the partitions' assignment.

use std::collections::BTreeMap;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use tally_core::aggregate::BillingAggregate;
use tally_core::codec::DecodeError;
use tally_core::contracts::Contracts;
use tally_core::event::Cloud;
use tally_core::partition::{PartitionCounters, RejectReason};

use crate::record::MISROUTED;

/// Usage records consumed and committed (ticks excluded).
pub const CONSUMED_RECORDS: &str = "tally_aggregator_consumed_records_total";
/// Billing rows written in committed transactions.
pub const EMITTED_ROWS: &str = "tally_aggregator_emitted_rows_total";
/// Events too late for a correction (written to usage.late).
pub const TOO_LATE_EVENTS: &str = "tally_aggregator_too_late_events_total";
/// Duplicate events dropped, by `kind` (exact | conflicting).
pub const DUPLICATE_EVENTS: &str = "tally_aggregator_duplicate_events_total";
/// Rejected records (written to usage.dlq), by `reason`.
pub const REJECTED_RECORDS: &str = "tally_aggregator_rejected_records_total";
/// Ticks appended to idle partitions.
pub const TICKS_WRITTEN: &str = "tally_aggregator_ticks_written_total";
/// Ticks read from the input.
pub const TICKS_READ: &str = "tally_aggregator_ticks_read_total";
/// Events counted as corrections to closed windows.
pub const CORRECTIONS: &str = "tally_aggregator_corrections_total";
/// Windows with an open pane, over owned partitions.
pub const OPEN_WINDOWS: &str = "tally_aggregator_open_windows";
/// Estimated state size, over owned partitions.
pub const STATE_BYTES: &str = "tally_aggregator_state_bytes";
/// Wall clock minus the partition's watermark, by `partition`.
pub const WATERMARK_DELAY: &str = "tally_aggregator_watermark_delay_seconds";
/// High watermark minus the next offset to process, by `partition`.
pub const CONSUMER_LAG: &str = "tally_aggregator_consumer_lag_records";
/// Time of send_offsets_to_transaction + commit_transaction.
pub const TRANSACTION_COMMIT: &str = "tally_aggregator_transaction_commit_seconds";
/// Per committed billing row: wall clock at its commit minus its window end (event
/// time to emit). Operational only: never part of a row.
pub const WINDOW_EMIT_LATENCY: &str = "tally_aggregator_window_emit_latency_seconds";
/// Transactions aborted (errors, lost partitions, the test hook).
pub const TRANSACTIONS_ABORTED: &str = "tally_aggregator_transactions_aborted_total";
/// Input records re-read to rebuild partition state after an assignment.
pub const RESTORED_RECORDS: &str = "tally_aggregator_restored_records_total";
/// Partitions whose state was rebuilt from their committed checkpoint after an
/// assignment, or after an abort for a partition changed in the aborted transaction
/// (partitions without a committed offset start fresh and are not counted).
pub const PARTITION_RESTORES: &str = "tally_aggregator_partition_restores_total";
/// Re-reads started (a partition's committed offset fetched and its checkpoint found):
/// each ends restored, cancelled or failed.
pub const RESTORES_STARTED: &str = "tally_aggregator_partition_restores_started_total";
/// Partitions the group assigned to this member (one per partition and rebalance that
/// added it): under a stable group it stays at the partitions first assigned.
pub const PARTITION_ASSIGNMENTS: &str = "tally_aggregator_partition_assignments_total";
/// Partitions the group took from this member (revoked or lost).
pub const PARTITION_REVOCATIONS: &str = "tally_aggregator_partition_revocations_total";
/// Partition restores cancelled because the partition was revoked (or the process
/// stopped) before its re-read finished.
pub const RESTORES_CANCELLED: &str = "tally_aggregator_partition_restores_cancelled_total";
/// Committed-offset fetches (of newly assigned partitions) that failed; each is
/// retried up to the third failure in a row, which stops the aggregator.
pub const OFFSET_FETCH_FAILURES: &str = "tally_aggregator_offset_fetch_failures_total";
/// Partitions assigned but not owned yet: their committed offset is being fetched or
/// their state re-read (they are paused meanwhile).
pub const RESTORING_PARTITIONS: &str = "tally_aggregator_restoring_partitions";
/// Tokens in committed billing rows, by `cloud` and `kind`.
pub const TOKENS: &str = "tally_aggregator_tokens_total";
/// Gross revenue in committed billing rows, micro-units of the currency, by `cloud`.
pub const GROSS_MICROS: &str = "tally_aggregator_gross_micros_total";
/// Revenue shares in committed billing rows, micro-units, by `cloud` and `partner` (the
/// beneficiary named by the contracts file, so the label set is the contracts').
pub const PARTNER_SHARE_MICROS: &str = "tally_aggregator_partner_share_micros_total";
/// The aggregator stopped because the same input kept aborting its transaction.
pub const ABORT_LOOPS: &str = "tally_aggregator_abort_loops_total";

/// Restarts from the committed state after a fatal Kafka error (producer fenced, ...).
pub const FATAL_RESTARTS: &str = "tally_aggregator_fatal_restarts_total";

/// Buckets of the commit-latency histogram, seconds.
pub const COMMIT_SECONDS_BUCKETS: [f64; 10] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Buckets of the window-emit-latency histogram, seconds: from "closed right at the
/// window end" through the default allowed lateness (30 s) and correction horizon
/// (6 h) to a day; older rows (replays, backfills) land in `+Inf`.
pub const WINDOW_EMIT_SECONDS_BUCKETS: [f64; 14] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1_800.0, 3_600.0, 7_200.0, 21_600.0, 43_200.0,
    86_400.0,
];

/// Registers HELP texts (call once, after installing a recorder).
pub fn describe() {
    describe_counter!(
        CONSUMED_RECORDS,
        Unit::Count,
        "Usage records consumed in committed transactions (ticks excluded)."
    );
    describe_counter!(
        EMITTED_ROWS,
        Unit::Count,
        "Billing rows written in committed transactions."
    );
    describe_counter!(
        TOO_LATE_EVENTS,
        Unit::Count,
        "Events too late for a correction, written to usage.late."
    );
    describe_counter!(
        DUPLICATE_EVENTS,
        Unit::Count,
        "Duplicate events dropped, by kind (exact, conflicting)."
    );
    describe_counter!(
        REJECTED_RECORDS,
        Unit::Count,
        "Rejected records written to usage.dlq, by reason."
    );
    describe_counter!(
        TICKS_WRITTEN,
        Unit::Count,
        "Ticks appended to idle input partitions."
    );
    describe_counter!(TICKS_READ, Unit::Count, "Ticks read from the input.");
    describe_counter!(
        CORRECTIONS,
        Unit::Count,
        "Events counted as corrections to closed windows."
    );
    describe_gauge!(
        OPEN_WINDOWS,
        Unit::Count,
        "Windows with an open pane, over owned partitions."
    );
    describe_gauge!(
        STATE_BYTES,
        Unit::Bytes,
        "Estimated heap bytes of partition state."
    );
    describe_gauge!(
        WATERMARK_DELAY,
        Unit::Seconds,
        "Wall clock minus the partition watermark."
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "High watermark minus the next offset to process."
    );
    describe_histogram!(
        TRANSACTION_COMMIT,
        Unit::Seconds,
        "Latency of sending offsets and committing a transaction."
    );
    describe_histogram!(
        WINDOW_EMIT_LATENCY,
        Unit::Seconds,
        "Per committed billing row: wall clock at commit minus the window end."
    );
    describe_counter!(TRANSACTIONS_ABORTED, Unit::Count, "Transactions aborted.");
    describe_counter!(
        RESTORED_RECORDS,
        Unit::Count,
        "Input records re-read to rebuild partition state."
    );
    describe_counter!(
        PARTITION_RESTORES,
        Unit::Count,
        "Partitions whose state was rebuilt from their committed checkpoint (after an assignment or an abort)."
    );
    describe_counter!(
        RESTORES_STARTED,
        Unit::Count,
        "Partition re-reads started from a committed checkpoint (each ends restored, cancelled or failed)."
    );
    describe_counter!(
        PARTITION_ASSIGNMENTS,
        Unit::Count,
        "Partitions the consumer group assigned to this member."
    );
    describe_counter!(
        PARTITION_REVOCATIONS,
        Unit::Count,
        "Partitions the consumer group revoked from this member (or reported lost)."
    );
    describe_counter!(
        RESTORES_CANCELLED,
        Unit::Count,
        "Partition restores cancelled because the partition was revoked before the re-read finished."
    );
    describe_counter!(
        OFFSET_FETCH_FAILURES,
        Unit::Count,
        "Committed-offset fetches of newly assigned partitions that failed (retried up to the third failure in a row)."
    );
    describe_gauge!(
        RESTORING_PARTITIONS,
        Unit::Count,
        "Partitions assigned and paused while their committed offset is fetched or their state re-read."
    );
    describe_counter!(
        TOKENS,
        Unit::Count,
        "Tokens in committed billing rows, by cloud and token kind."
    );
    describe_counter!(
        GROSS_MICROS,
        Unit::Count,
        "Gross revenue in committed billing rows, micro-units, by cloud."
    );
    describe_counter!(
        PARTNER_SHARE_MICROS,
        Unit::Count,
        "Revenue shares in committed billing rows, micro-units, by cloud and beneficiary partner."
    );
    describe_counter!(
        FATAL_RESTARTS,
        Unit::Count,
        "Restarts from the committed state after a fatal Kafka error."
    );
    describe_counter!(
        ABORT_LOOPS,
        Unit::Count,
        "Stops because the same input kept aborting transactions."
    );
}

/// Token kinds of [`TOKENS`]' `kind` label.
const TOKEN_KINDS: [&str; 4] = ["input", "cached_input", "output", "reasoning"];

/// Every `reason` of [`REJECTED_RECORDS`]: decode and validation reasons, `misrouted`,
/// the state machine's reasons.
pub fn rejected_reasons() -> impl Iterator<Item = &'static str> {
    DecodeError::REASONS
        .into_iter()
        .chain([MISROUTED])
        .chain(RejectReason::ALL.map(RejectReason::as_str))
}

/// Creates every series with a fixed label set at 0 (see the module docs). Call once,
/// after installing a recorder, with the contracts the aggregator runs with.
pub fn register_zero(contracts: &Contracts) {
    for name in [
        CONSUMED_RECORDS,
        EMITTED_ROWS,
        TOO_LATE_EVENTS,
        TICKS_WRITTEN,
        TICKS_READ,
        CORRECTIONS,
        TRANSACTIONS_ABORTED,
        RESTORED_RECORDS,
        PARTITION_RESTORES,
        RESTORES_STARTED,
        OFFSET_FETCH_FAILURES,
        ABORT_LOOPS,
        FATAL_RESTARTS,
    ] {
        counter!(name).increment(0);
    }
    for kind in ["exact", "conflicting"] {
        counter!(DUPLICATE_EVENTS, "kind" => kind).increment(0);
    }
    for reason in rejected_reasons() {
        counter!(REJECTED_RECORDS, "reason" => reason).increment(0);
    }
    for cloud in Cloud::ALL
        .into_iter()
        .filter(|cloud| *cloud != Cloud::Unknown)
    {
        for kind in TOKEN_KINDS {
            counter!(TOKENS, "cloud" => cloud.as_str(), "kind" => kind).increment(0);
        }
        counter!(GROSS_MICROS, "cloud" => cloud.as_str()).increment(0);
    }
    for version in contracts.share_rules() {
        for rule in version.rules() {
            for beneficiary in &rule.beneficiaries {
                counter!(
                    PARTNER_SHARE_MICROS,
                    "cloud" => rule.cloud.as_str(),
                    "partner" => beneficiary.partner.clone()
                )
                .increment(0);
            }
        }
    }
    gauge!(OPEN_WINDOWS).set(0.0);
    gauge!(STATE_BYTES).set(0.0);
    // A histogram handle creates its series; it renders with zero counts until the
    // first sample.
    let _ = histogram!(TRANSACTION_COMMIT);
    let _ = histogram!(WINDOW_EMIT_LATENCY);
}

/// Business totals of the rows of one transaction, applied when it commits.
#[derive(Debug, Clone, Default)]
pub(crate) struct PendingTotals {
    /// Per cloud index: input, cached input, output, reasoning tokens; gross micros.
    by_cloud: BTreeMap<u32, ([u64; 4], i64)>,
    /// Per cloud index and beneficiary: share micros.
    shares: BTreeMap<(u32, String), i64>,
    /// Rejected records by reason.
    rejected: BTreeMap<&'static str, u64>,
    rows: u64,
    ticks_written: u64,
}

impl PendingTotals {
    pub(crate) fn add_row(&mut self, row: &BillingAggregate) {
        self.rows += 1;
        let entry = self.by_cloud.entry(row.dims.cloud.index()).or_default();
        let tokens = [
            row.tokens.input,
            row.tokens.cached_input,
            row.tokens.output,
            row.tokens.reasoning,
        ];
        for (sum, add) in entry.0.iter_mut().zip(tokens) {
            *sum = sum.saturating_add(add);
        }
        entry.1 = entry.1.saturating_add(row.gross_micros);
        for share in &row.shares {
            let key = (row.dims.cloud.index(), share.beneficiary.clone());
            let sum = self.shares.entry(key).or_default();
            *sum = sum.saturating_add(share.amount_micros);
        }
    }

    pub(crate) fn add_rejected(&mut self, reason: &'static str) {
        *self.rejected.entry(reason).or_default() += 1;
    }

    pub(crate) fn add_tick_written(&mut self) {
        self.ticks_written += 1;
    }

    pub(crate) fn rows(&self) -> u64 {
        self.rows
    }

    pub(crate) fn ticks_written(&self) -> u64 {
        self.ticks_written
    }

    /// Publishes the totals of a committed transaction.
    pub(crate) fn publish(&self) {
        counter!(EMITTED_ROWS).increment(self.rows);
        counter!(TICKS_WRITTEN).increment(self.ticks_written);
        for (reason, count) in &self.rejected {
            counter!(REJECTED_RECORDS, "reason" => *reason).increment(*count);
        }
        for (cloud_index, (tokens, gross)) in &self.by_cloud {
            let cloud = Cloud::from_index(*cloud_index).map_or("unknown", Cloud::as_str);
            for (kind, count) in TOKEN_KINDS.into_iter().zip(tokens) {
                counter!(TOKENS, "cloud" => cloud, "kind" => kind).increment(*count);
            }
            counter!(GROSS_MICROS, "cloud" => cloud).increment(u64::try_from(*gross).unwrap_or(0));
        }
        for ((cloud_index, partner), micros) in &self.shares {
            let cloud = Cloud::from_index(*cloud_index).map_or("unknown", Cloud::as_str);
            counter!(PARTNER_SHARE_MICROS, "cloud" => cloud, "partner" => partner.clone())
                .increment(u64::try_from(*micros).unwrap_or(0));
        }
    }
}

/// Publishes the counter deltas of one partition between two commits.
pub(crate) fn publish_counter_delta(before: &PartitionCounters, after: &PartitionCounters) {
    let delta = |a: u64, b: u64| b.saturating_sub(a);
    counter!(CONSUMED_RECORDS).increment(delta(before.consumed, after.consumed));
    counter!(TOO_LATE_EVENTS).increment(delta(before.too_late, after.too_late));
    counter!(CORRECTIONS).increment(delta(before.corrections, after.corrections));
    counter!(TICKS_READ).increment(delta(before.ticks, after.ticks));
    let conflicting = delta(before.conflicting_duplicates, after.conflicting_duplicates);
    let duplicates = delta(before.duplicates, after.duplicates);
    counter!(DUPLICATE_EVENTS, "kind" => "exact").increment(duplicates.saturating_sub(conflicting));
    counter!(DUPLICATE_EVENTS, "kind" => "conflicting").increment(conflicting);
}

/// Records one commit's latency.
pub(crate) fn record_commit_seconds(seconds: f64) {
    histogram!(TRANSACTION_COMMIT).record(seconds);
}

/// Records the event-time-to-emit latency of every row of one committed transaction:
/// `commit_time_ms` minus the row's window end, clamped at 0. One histogram handle per
/// commit, no label.
pub(crate) fn record_emit_latency(rows: &[BillingAggregate], commit_time_ms: i64) {
    if rows.is_empty() {
        return;
    }
    let latency = histogram!(WINDOW_EMIT_LATENCY);
    for row in rows {
        let millis = commit_time_ms.saturating_sub(row.window_end_ms).max(0);
        latency.record(millis as f64 / 1000.0);
    }
}

/// Counts an aborted transaction.
pub(crate) fn count_abort() {
    counter!(TRANSACTIONS_ABORTED).increment(1);
}

/// Counts one partition restore and the records it re-read.
pub(crate) fn count_restored(records: u64) {
    counter!(PARTITION_RESTORES).increment(1);
    counter!(RESTORED_RECORDS).increment(records);
}

/// Counts a re-read started.
pub(crate) fn count_restore_started() {
    counter!(RESTORES_STARTED).increment(1);
}

/// Counts partitions assigned to this member.
pub(crate) fn count_assigned(partitions: usize) {
    counter!(PARTITION_ASSIGNMENTS).increment(partitions as u64);
}

/// Counts partitions revoked from this member.
pub(crate) fn count_revoked(partitions: usize) {
    counter!(PARTITION_REVOCATIONS).increment(partitions as u64);
}

/// Counts a failed committed-offset fetch.
pub(crate) fn count_offset_fetch_failure() {
    counter!(OFFSET_FETCH_FAILURES).increment(1);
}

/// Counts a restore cancelled by a revocation.
pub(crate) fn count_restore_cancelled() {
    counter!(RESTORES_CANCELLED).increment(1);
}

/// Sets the number of partitions assigned but not owned yet.
pub(crate) fn set_restoring(partitions: usize) {
    gauge!(RESTORING_PARTITIONS).set(partitions as f64);
}

/// Counts a stop caused by an abort loop.
pub(crate) fn count_abort_loop() {
    counter!(ABORT_LOOPS).increment(1);
}

/// Counts a restart after a fatal error.
pub(crate) fn count_fatal_restart() {
    counter!(FATAL_RESTARTS).increment(1);
}

/// Sets the state gauges.
pub(crate) fn set_state(open_windows: usize, state_bytes: usize) {
    gauge!(OPEN_WINDOWS).set(open_windows as f64);
    gauge!(STATE_BYTES).set(state_bytes as f64);
}

/// Sets one partition's watermark delay and lag gauges.
pub(crate) fn set_partition(
    partition: i32,
    watermark_delay_seconds: Option<f64>,
    lag_records: Option<i64>,
) {
    let label = partition.to_string();
    if let Some(delay) = watermark_delay_seconds {
        gauge!(WATERMARK_DELAY, "partition" => label.clone()).set(delay);
    }
    if let Some(lag) = lag_records {
        gauge!(CONSUMER_LAG, "partition" => label).set(lag.max(0) as f64);
    }
}
