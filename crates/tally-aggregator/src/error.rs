//! Why the aggregator stopped.

use std::path::PathBuf;

use rdkafka::error::KafkaError;
use tally_core::contracts::ContractsError;
use tally_core::partition::{DigestMismatch, ParamsError, RowPricingError};
use tally_core::semantics::{SemanticsChange, SemanticsError};

use crate::checkpoint::CheckpointError;

/// Errors that stop the aggregator. None of them loses or duplicates data: whatever
/// was not committed is re-read by the next owner of the partition.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// Settings that cannot work.
    #[error("invalid aggregator settings: {0}")]
    Settings(String),
    /// The contracts file cannot be read.
    #[error("cannot read the contracts file {path}")]
    ContractsFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The contracts file is invalid.
    #[error("invalid contracts file {path}")]
    Contracts {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ContractsError,
    },
    /// Partition parameters refused by the state machine.
    #[error("invalid partition parameters")]
    Params(#[from] ParamsError),
    /// A Kafka call failed.
    #[error("kafka {operation} failed")]
    Kafka {
        /// What was being done.
        operation: &'static str,
        /// The client error.
        #[source]
        source: KafkaError,
    },
    /// A client hit a fatal error (e.g. the producer was fenced by a newer instance with
    /// the same transactional id): [`crate::run`] drops producer, consumer and state and
    /// restores from Kafka, and returns this error only when it keeps happening.
    #[error("fatal producer error during {operation}")]
    Fatal {
        /// What was being done.
        operation: &'static str,
        /// The client error.
        #[source]
        source: KafkaError,
    },
    /// The input topic does not exist.
    #[error("input topic {topic} does not exist (create it with `tally topics create`)")]
    MissingTopic {
        /// The topic.
        topic: String,
    },
    /// A partition has no committed offset and no `--start-from` was given.
    #[error(
        "partition {topic}/{partition} has no committed offset for group {group}; refusing to guess where to \
         start: pass --start-from earliest|latest|<epoch ms>"
    )]
    NoStartPosition {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The consumer group.
        group: String,
    },
    /// The committed offset's metadata is not a checkpoint this aggregator wrote.
    #[error("partition {partition}: committed offset {offset} cannot be restored")]
    BadCheckpoint {
        /// The partition.
        partition: i32,
        /// The committed offset.
        offset: i64,
        /// Why.
        #[source]
        source: CheckpointError,
    },
    /// Re-reading the input did not rebuild the committed state: it cannot be trusted.
    #[error(
        "partition {partition}: re-reading offsets [{low_water}, {committed_offset}) did not rebuild the \
         committed state; refusing to bill from another state"
    )]
    RestoreMismatch {
        /// The partition.
        partition: i32,
        /// Low-water offset re-read from.
        low_water: i64,
        /// Committed offset re-read up to.
        committed_offset: i64,
        /// What differs.
        #[source]
        source: Box<DigestMismatch>,
    },
    /// The semantics fingerprint cannot be built (too many contract versions) or a
    /// committed one cannot be read.
    #[error("semantics fingerprint")]
    Semantics(#[from] SemanticsError),
    /// A partition's committed state was built under other settings or contracts.
    #[error("partition {partition}: the committed state was built under other semantics")]
    SemanticsChanged {
        /// The partition.
        partition: i32,
        /// What changed, and how to go on.
        #[source]
        source: Box<SemanticsChange>,
    },
    /// Input the restore needs was deleted (retention or `DeleteRecords`).
    #[error(
        "partition {topic}/{partition}: the restore must re-read from offset {low_water} but the log now starts \
         at {log_start} (input deleted by retention or DeleteRecords); the state at committed offset \
         {committed_offset} cannot be rebuilt: re-aggregate what remains into a new output"
    )]
    RestoreInputDeleted {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The low-water offset.
        low_water: i64,
        /// The log start offset found.
        log_start: i64,
        /// The committed offset.
        committed_offset: i64,
    },
    /// Re-reading the input stalled.
    #[error(
        "partition {partition}: re-reading the input stalled at offset {position} before {committed_offset}"
    )]
    RestoreStalled {
        /// The partition.
        partition: i32,
        /// Next offset expected.
        position: i64,
        /// The committed offset to reach.
        committed_offset: i64,
    },
    /// Closed rows could not be priced.
    #[error("closed rows could not be priced")]
    Pricing(#[from] RowPricingError),
    /// The same input kept aborting transactions.
    #[error(
        "{aborts} transactions in a row aborted at the same input offsets; stopping instead of looping"
    )]
    AbortLoop {
        /// How many in a row.
        aborts: u32,
    },
    /// The consumer group rebalance failed.
    #[error("rebalance failed")]
    Rebalance(#[source] KafkaError),
    /// A helper thread (committed-offset fetch, partition restore) could not start.
    #[error("cannot start the {what} thread")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A partition restore thread ended without a result (it panicked).
    #[error("partition {partition}: the restore thread ended without a result")]
    RestoreLost {
        /// The partition.
        partition: i32,
    },
    /// An internal lock was poisoned by a panic.
    #[error("aggregator state lock poisoned")]
    Poisoned,
}
