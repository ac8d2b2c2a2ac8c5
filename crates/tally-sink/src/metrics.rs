//! Metric names and HELP texts of the sink.
//!
//! Names follow `tally_sink_<name>_<unit>[_total]`. Labels come from small fixed sets:
//! `kind` (the retry kinds of [`crate::error::Retry`]: connection, serialization,
//! deadlock, busy, io) and `partition` (bounded by the aggregates topic's partition
//! count). Counters are updated once per committed batch. [`register_zero`] creates
//! every series with a fixed label set at 0 at start, so dashboards and alerts see them
//! before the first batch (the per-partition lag appears with the assignment).

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

/// Rows inserted into the store (new ids).
pub const ROWS_WRITTEN: &str = "tally_sink_rows_written_total";
/// Rows read again with an id and content already stored: no-ops.
pub const ROWS_IDENTICAL: &str = "tally_sink_rows_identical_total";
/// Database transactions committed (one per batch).
pub const BATCHES: &str = "tally_sink_batches_total";
/// Duration of one batch's database transaction, BEGIN to COMMIT.
pub const DB_TRANSACTION: &str = "tally_sink_db_transaction_seconds";
/// Retries of a batch after a transient database error, by `kind`.
pub const DB_RETRIES: &str = "tally_sink_db_retries_total";
/// Rows whose id was stored with other content: the sink stops on the first.
pub const CONFLICTS: &str = "tally_sink_conflicts_total";
/// High watermark minus the store's next offset, by `partition` (a transaction's
/// commit marker keeps an idle partition at 1 or more).
pub const LAG: &str = "tally_sink_consumer_lag_records";
/// Seconds since the store's offsets last advanced.
pub const LAST_COMMIT_AGE: &str = "tally_sink_last_commit_age_seconds";
/// 1 while the partitions are paused because the database is unavailable.
pub const PAUSED: &str = "tally_sink_paused";

/// Every `kind` of [`DB_RETRIES`]: the transient kinds of [`crate::error::Retry`] and
/// `other`.
pub const RETRY_KINDS: [&str; 7] = [
    "connection",
    "timeout",
    "serialization",
    "deadlock",
    "busy",
    "io",
    "other",
];

/// Creates every series with a fixed label set at 0 (call once, after installing a
/// recorder).
pub fn register_zero() {
    for name in [ROWS_WRITTEN, ROWS_IDENTICAL, BATCHES, CONFLICTS] {
        counter!(name).increment(0);
    }
    for kind in RETRY_KINDS {
        counter!(DB_RETRIES, "kind" => kind).increment(0);
    }
    gauge!(PAUSED).set(0.0);
    gauge!(LAST_COMMIT_AGE).set(0.0);
    let _ = histogram!(DB_TRANSACTION);
}

/// Buckets of the transaction-latency histogram, seconds.
pub const DB_TRANSACTION_SECONDS_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Registers HELP texts (call once, after installing a recorder).
pub fn describe() {
    describe_counter!(
        ROWS_WRITTEN,
        Unit::Count,
        "Billing rows inserted into the store (new ids)."
    );
    describe_counter!(
        ROWS_IDENTICAL,
        Unit::Count,
        "Billing rows read again with identical content: no-ops."
    );
    describe_counter!(
        BATCHES,
        Unit::Count,
        "Database transactions committed, one per batch of rows and offsets."
    );
    describe_histogram!(
        DB_TRANSACTION,
        Unit::Seconds,
        "Duration of one batch's database transaction, BEGIN to COMMIT."
    );
    describe_counter!(
        DB_RETRIES,
        Unit::Count,
        "Batch retries after a transient database error, by kind."
    );
    describe_counter!(
        CONFLICTS,
        Unit::Count,
        "Rows whose id is stored with different content; the sink stops."
    );
    describe_gauge!(
        LAG,
        Unit::Count,
        "High watermark minus the store's next offset, by partition."
    );
    describe_gauge!(
        LAST_COMMIT_AGE,
        Unit::Seconds,
        "Seconds since the store's offsets last advanced."
    );
    describe_gauge!(
        PAUSED,
        Unit::Count,
        "1 while consumption is paused because the database is unavailable."
    );
}
