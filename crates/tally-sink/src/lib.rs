//! tally-sink: billing aggregates into the billing store, and reports from it.
//!
//! `tally sink` reads `billing.aggregates` with `isolation.level=read_committed` and
//! writes each row by its deterministic id into PostgreSQL (production) or SQLite (the
//! embedded default, one file). `tally report` sums the store's 15-minute roll-ups
//! into hours, days or months of any IANA time zone. `tally statement` ([`statement`])
//! writes a partner's monthly revenue-share statement from the rows, reproducible from
//! the offsets it names; `tally export` ([`export`], [`mapping`]) writes the hourly
//! marketplace request files and keeps their ledger in the store.
//!
//! # Exactly once into the store
//!
//! The store, not Kafka, owns the consumed offsets. Each batch writes its rows, the
//! roll-up changes of the rows it inserted, and the next offset of every partition it
//! read in **one database transaction** ([`store`]). On assignment the sink loads the
//! partitions' offsets from the store and seeks there (a partition the store has never
//! seen starts at its beginning); Kafka's group offsets are never committed or read.
//! So after any crash the store holds exactly the batches that committed, and reading
//! resumes right after them.
//!
//! Failure cases and what covers them:
//! - **Crash (SIGKILL) before or during COMMIT**: the transaction rolls back; the next
//!   instance loads the old offsets and re-reads the batch.
//! - **Connection lost during COMMIT** (outcome unknown): before a retry the sink
//!   re-reads the store's offsets; if they equal the batch's end, the batch is in.
//! - **Zombie** (an instance that lost its partitions while stopped): offsets are
//!   updated compare-and-set (`… WHERE next_offset = expected`, insert-if-absent for a
//!   new partition), so its transaction fails at the first offset, writes nothing, and
//!   the instance stops with [`SinkError::OffsetMismatch`].
//! - **The same row again** (a replayed or re-read record): its key `(window_start_ms,
//!   id)` exists (or, for a foreign id, the id scan finds it); the stored SHA-256 of the
//!   record's bytes equals the new one, so it is a no-op and roll-ups, updated only
//!   from inserted rows, do not change.
//! - **The same id with other content** (a foreign producer): [`SinkError::Conflict`]
//!   names the id, topic, partition and offset, `tally_sink_conflicts_total` counts
//!   it, the transaction rolls back and the sink exits non-zero without advancing.
//! - **A record that is not a BillingAggregate**: [`SinkError::Undecodable`] names
//!   topic, partition and offset; the sink stops (a billing store must not skip).
//! - **Database outage**: the batch is retried with capped exponential back-off,
//!   counted in `tally_sink_db_retries_total{kind}` and logged at WARN; offsets never
//!   advance without their rows. While it retries, the sink pauses its partitions and
//!   keeps polling, so the member stays in the group however long the outage lasts;
//!   after the batch commits it resumes where the batch ended. Every database round
//!   trip is bounded (`--db-timeout-ms`), so a server that stops answering is an
//!   outage, not a hang. An assignment while the database is down cannot load its
//!   offsets: the sink then stops with the error (its supervisor restarts it).
//! - **Rebalance**: a revocation drops the batch being collected (nothing of it is
//!   stored); the new owner re-reads it from the store's offsets.
//!
//! Roll-ups keep 15-minute UTC buckets ([`rows`]) because every real time zone's
//! offset is a multiple of 15 minutes: any zone's hours, days and months are exact
//! sums of buckets ([`report`]). Amounts are sums of per-row rounded micro-units.

pub mod args;
mod db;
pub mod error;
pub mod export;
pub mod mapping;
pub mod metrics;
mod pg;
pub mod report;
pub mod rows;
pub mod run;
mod schema;
mod sqlite;
pub mod statement;
pub mod store;

pub use args::StoreArgs;
pub use error::SinkError;
pub use pg::{APPLICATION_NAME, COMMIT_DELAY_ENV, PgStore};
pub use run::{SinkArgs, SinkSettings, SinkSummary, run};
pub use sqlite::SqliteStore;
pub use store::{Batch, BatchOutcome, OffsetAdvance, Store, StoreLocation};
