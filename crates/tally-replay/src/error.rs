//! Errors of `tally replay` and `tally reconcile`.

use std::path::PathBuf;

/// Why a replay or a reconciliation could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A flag or setting is wrong; names it.
    #[error("{field}: {problem}")]
    Setting {
        /// The flag or config field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The replay refuses to run: its output would not equal what the live run computed
    /// (or would touch production). Nothing was written.
    #[error("replay refused: {reason}")]
    Refused {
        /// Why, naming topic, partition and offsets where they matter.
        reason: String,
    },
    /// A contracts file could not be read or loaded.
    #[error("contracts file {path}: {problem}")]
    Contracts {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// A Kafka call failed.
    #[error("kafka: cannot {operation}: {source}")]
    Kafka {
        /// What was being done.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The warm-up's rebuilt state differs from the checkpoint's digest.
    #[error(
        "partition {partition}: the state rebuilt from offset {low_water} differs from the checkpoint committed at offset {committed_offset}: {problem}"
    )]
    WarmUpMismatch {
        /// Input partition.
        partition: i32,
        /// Where the warm-up started.
        low_water: i64,
        /// The checkpoint's committed offset.
        committed_offset: i64,
        /// The mismatch.
        problem: String,
    },
    /// Reading stalled.
    #[error("{topic}/{partition}: no record for {seconds} s at offset {position}")]
    Stalled {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Position when it stalled.
        position: i64,
        /// Stall limit.
        seconds: u64,
    },
    /// A row could not be priced with the replay's contracts.
    #[error("partition {partition}: cannot price a row: {problem}")]
    Pricing {
        /// Input partition.
        partition: i32,
        /// The pricing error.
        problem: String,
    },
    /// The billing store failed.
    #[error(transparent)]
    Store(#[from] tally_sink::SinkError),
    /// A SQL query of a reconcile source failed.
    #[error("{source_name}: {problem}")]
    Source {
        /// The source as given.
        source_name: String,
        /// What went wrong.
        problem: String,
    },
    /// Output could not be written (stdout).
    #[error("cannot write the output: {0}")]
    Output(String),
}

impl ReplayError {
    /// Whether the error is a refusal (exit code 3 for `tally replay`).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ReplayError::Refused { .. })
    }
}
