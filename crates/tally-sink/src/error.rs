//! Errors of the sink and the report.

use tally_core::codec::DecodeError;

/// Why the sink (or a report) stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The same row id was read again with different content.
    #[error(
        "conflicting row: id {id} read at {topic}/{partition}@{offset} differs from the stored row (digest {new_digest}, stored {stored_digest})"
    )]
    Conflict {
        /// The row id.
        id: String,
        /// Topic of the conflicting record.
        topic: String,
        /// Partition of the conflicting record.
        partition: i32,
        /// Offset of the conflicting record.
        offset: i64,
        /// Digest of the record read now.
        new_digest: String,
        /// Digest of the row already stored (or earlier in the same batch).
        stored_digest: String,
    },
    /// A record of the aggregates topic is not a BillingAggregate.
    #[error("cannot decode the record at {topic}/{partition}@{offset}")]
    Undecodable {
        /// Topic of the record.
        topic: String,
        /// Partition of the record.
        partition: i32,
        /// Offset of the record.
        offset: i64,
        /// What the decoder said.
        #[source]
        source: DecodeError,
    },
    /// The store's offset of a partition is not the one this instance expected: another
    /// instance owns the partition now (this one is a zombie), so the batch is dropped.
    #[error(
        "offset check failed for {topic}/{partition}: expected next offset {expected:?}, the store has {found:?}"
    )]
    OffsetMismatch {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// The next offset this instance expected (None: no row yet).
        expected: Option<i64>,
        /// What the store holds (None: no row).
        found: Option<i64>,
    },
    /// A value does not fit the store's signed 64-bit integers.
    #[error("{field} does not fit a signed 64-bit integer")]
    OutOfRange {
        /// The field.
        field: &'static str,
    },
    /// PostgreSQL failed.
    #[error("postgresql: {operation}")]
    Postgres {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// SQLite failed.
    #[error("sqlite: {operation}")]
    Sqlite {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database did not answer in time; the connection is dropped.
    #[error("database did not answer within {timeout_ms} ms: {operation}")]
    Timeout {
        /// What was being done.
        operation: &'static str,
        /// The bound, ms.
        timeout_ms: u128,
    },
    /// Kafka failed.
    #[error("kafka: {operation}")]
    Kafka {
        /// What was being done.
        operation: &'static str,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// A setting cannot work; names the flag or field.
    #[error("invalid setting `{field}`: {problem}")]
    Setting {
        /// The flag or config field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The store holds something this version cannot read.
    #[error("store: {0}")]
    Store(String),
}

/// How a database failure is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient: retry the batch after a back-off. The label is the `kind` of
    /// `tally_sink_db_retries_total`.
    Transient(&'static str),
    /// Not transient: stop.
    Fatal,
}

impl SinkError {
    /// Whether retrying the batch can succeed.
    pub fn retry(&self) -> Retry {
        match self {
            SinkError::Postgres { source, .. } => postgres_retry(source),
            SinkError::Sqlite { source, .. } => sqlite_retry(source),
            SinkError::Timeout { .. } => Retry::Transient("timeout"),
            _ => Retry::Fatal,
        }
    }
}

fn postgres_retry(error: &tokio_postgres::Error) -> Retry {
    use tokio_postgres::error::SqlState;
    if let Some(state) = error.code() {
        if *state == SqlState::T_R_SERIALIZATION_FAILURE {
            return Retry::Transient("serialization");
        }
        if *state == SqlState::T_R_DEADLOCK_DETECTED {
            return Retry::Transient("deadlock");
        }
        // Class 08 (connection exception), 57P01..57P03 (admin shutdown, crash
        // shutdown, cannot connect now), 53300 (too many connections).
        let code = state.code();
        if code.starts_with("08") || code.starts_with("57P") || code == "53300" {
            return Retry::Transient("connection");
        }
        return Retry::Fatal;
    }
    // No SQLSTATE: the connection broke, timed out or could not be opened.
    Retry::Transient("connection")
}

fn sqlite_retry(error: &rusqlite::Error) -> Retry {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            Retry::Transient("busy")
        }
        Some(rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::DiskFull) => {
            Retry::Transient("io")
        }
        _ => Retry::Fatal,
    }
}
