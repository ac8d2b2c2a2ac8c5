//! The billing store: PostgreSQL or SQLite behind one blocking API.
//!
//! A batch is written in one database transaction, in this order:
//! 1. the consumed offsets, compare-and-set: `UPDATE … SET next_offset = new WHERE
//!    topic = … AND kafka_partition = … AND next_offset = expected`, or an insert that
//!    must not find a row for a partition the store has never seen. An instance that
//!    lost the partition (a zombie) expects an offset the new owner has moved past, so
//!    its transaction fails here before it writes anything;
//! 2. the id checks that the key `(window_start_ms, id)` cannot do alone (see
//!    [`crate::schema`]): derived ids against the stored foreign ids, foreign ids
//!    against every stored row;
//! 3. the rows, keyed `(window_start_ms, id)`, existing keys skipped; for every row not
//!    inserted the stored digest is compared with the record's: equal is a no-op,
//!    different is a [`SinkError::Conflict`] and the transaction is rolled back;
//! 4. the foreign ids of the inserted rows, their shares, and the roll-up upserts
//!    computed from the inserted rows only, in key order (so concurrent writers lock
//!    buckets in the same order).
//!
//! Then COMMIT. When a commit's outcome is unknown (the connection broke during it),
//! the caller re-reads the offsets with [`Store::load_offsets`] before going on: the
//! store's offsets say whether the batch is in.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::error::SinkError;
use crate::pg::PgStore;
use crate::rows::{RollupDelta, RollupKey, RollupSums, ShareKey, StoredRow};
use crate::sqlite::SqliteStore;

/// One partition's offset move in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetAdvance {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The store's next offset as this instance last saw it (None: no row yet).
    pub expected: Option<i64>,
    /// The next offset after this batch.
    pub next: i64,
}

/// Rows and the offsets they advance, written in one transaction.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Rows in read order.
    pub rows: Vec<StoredRow>,
    /// One entry per partition with rows in the batch, sorted by (topic, partition).
    pub offsets: Vec<OffsetAdvance>,
}

/// What a committed batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// Rows inserted (new ids).
    pub inserted: u64,
    /// Rows already stored with identical content (no-ops).
    pub identical: u64,
}

/// Where the store lives, parsed from `--database`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A PostgreSQL connection string (`postgres://…` or `postgresql://…`).
    Postgres(String),
    /// An SQLite database file (`sqlite:PATH`, or a plain path).
    Sqlite(String),
}

impl StoreLocation {
    /// Parses a location; the error names `field`.
    pub fn parse(field: &'static str, value: &str) -> Result<StoreLocation, SinkError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(SinkError::Setting {
                field,
                problem: "must not be empty".to_owned(),
            });
        }
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            return Ok(StoreLocation::Postgres(value.to_owned()));
        }
        let path = value.strip_prefix("sqlite:").unwrap_or(value);
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(SinkError::Setting {
                field,
                problem: "sqlite: needs a file path".to_owned(),
            });
        }
        Ok(StoreLocation::Sqlite(path.to_owned()))
    }
}

/// An open billing store with its schema migrated.
#[derive(Debug)]
pub enum Store {
    /// PostgreSQL (production).
    Postgres(PgStore),
    /// SQLite (embedded default; one writer per file).
    Sqlite(SqliteStore),
}

impl Store {
    /// Opens the store and applies missing migrations. `timeout` bounds every database
    /// round trip, so a server that stops answering is an error, not a hang.
    pub fn open(location: &StoreLocation, timeout: Duration) -> Result<Store, SinkError> {
        match location {
            StoreLocation::Postgres(url) => Ok(Store::Postgres(PgStore::open(url, timeout)?)),
            StoreLocation::Sqlite(path) => Ok(Store::Sqlite(SqliteStore::open(path, timeout)?)),
        }
    }

    /// Opens the store with only the first `version` schema migrations applied, for
    /// tests of a migration (they start from the schema before it). Not for
    /// production use: [`Store::open`] applies every migration.
    #[doc(hidden)]
    pub fn open_at_schema_version(
        location: &StoreLocation,
        timeout: Duration,
        version: usize,
    ) -> Result<Store, SinkError> {
        match location {
            StoreLocation::Postgres(url) => {
                Ok(Store::Postgres(PgStore::open_upto(url, timeout, version)?))
            }
            StoreLocation::Sqlite(path) => Ok(Store::Sqlite(SqliteStore::open_upto(
                path, timeout, version,
            )?)),
        }
    }

    /// The stored next offset of every partition of `topic`.
    pub fn load_offsets(&mut self, topic: &str) -> Result<BTreeMap<i32, i64>, SinkError> {
        match self {
            Store::Postgres(store) => store.load_offsets(topic),
            Store::Sqlite(store) => store.load_offsets(topic),
        }
    }

    /// Writes `batch` in one transaction (see the module docs).
    pub fn write_batch(&mut self, batch: &Batch) -> Result<BatchOutcome, SinkError> {
        let plan = BatchPlan::new(batch)?;
        match self {
            Store::Postgres(store) => store.write_batch(batch, &plan),
            Store::Sqlite(store) => store.write_batch(batch, &plan),
        }
    }

    /// Roll-up lines with `from_ms <= bucket_start_ms < to_ms`.
    pub fn rollup_lines(
        &mut self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(RollupKey, RollupSums)>, SinkError> {
        match self {
            Store::Postgres(store) => store.rollup_lines(from_ms, to_ms),
            Store::Sqlite(store) => store.rollup_lines(from_ms, to_ms),
        }
    }

    /// Share roll-up lines with `from_ms <= bucket_start_ms < to_ms`.
    pub fn share_lines(
        &mut self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(ShareKey, i64)>, SinkError> {
        match self {
            Store::Postgres(store) => store.share_lines(from_ms, to_ms),
            Store::Sqlite(store) => store.share_lines(from_ms, to_ms),
        }
    }
}

/// The batch's rows with in-batch repeats resolved: the first occurrence of an id is
/// written, a later identical one is a no-op, a later different one a conflict.
#[derive(Debug)]
pub(crate) struct BatchPlan {
    /// Indexes into `batch.rows` of the first occurrence of each id.
    pub(crate) unique: Vec<usize>,
    /// Per entry of `unique`: whether the row's id is derived
    /// ([`crate::rows::id_is_derived`]).
    pub(crate) derived: Vec<bool>,
    /// Repeats within the batch with identical content.
    pub(crate) repeated: u64,
}

impl BatchPlan {
    pub(crate) fn new(batch: &Batch) -> Result<BatchPlan, SinkError> {
        let mut first: HashMap<&str, usize> = HashMap::with_capacity(batch.rows.len());
        let mut unique = Vec::with_capacity(batch.rows.len());
        let mut repeated = 0;
        for (index, stored) in batch.rows.iter().enumerate() {
            match first.get(stored.row.id.as_str()) {
                None => {
                    first.insert(stored.row.id.as_str(), index);
                    unique.push(index);
                }
                Some(&earlier) => {
                    let earlier = &batch.rows[earlier];
                    if earlier.digest != stored.digest {
                        return Err(conflict(stored, &earlier.digest));
                    }
                    repeated += 1;
                }
            }
        }
        let derived = unique
            .iter()
            .map(|&index| crate::rows::id_is_derived(&batch.rows[index].row))
            .collect();
        Ok(BatchPlan {
            unique,
            derived,
            repeated,
        })
    }

    /// The unique rows, each with whether its id is derived.
    pub(crate) fn rows<'a>(
        &'a self,
        batch: &'a Batch,
    ) -> impl Iterator<Item = (&'a StoredRow, bool)> + 'a {
        self.unique
            .iter()
            .zip(&self.derived)
            .map(|(&index, &derived)| (&batch.rows[index], derived))
    }

    /// Whether any unique row has a foreign id.
    pub(crate) fn has_foreign(&self) -> bool {
        self.derived.iter().any(|derived| !derived)
    }

    /// Checks the rows that were not inserted against the stored digests and returns
    /// the roll-up change of the inserted ones and the outcome.
    pub(crate) fn settle<'a>(
        &self,
        batch: &'a Batch,
        inserted: &dyn Fn(&str) -> bool,
        stored_digests: &HashMap<String, String>,
    ) -> Result<(RollupDelta, Vec<&'a StoredRow>, BatchOutcome), SinkError> {
        let mut delta = RollupDelta::default();
        let mut new_rows = Vec::new();
        let mut outcome = BatchOutcome {
            inserted: 0,
            identical: self.repeated,
        };
        for &index in &self.unique {
            let stored = &batch.rows[index];
            if inserted(&stored.row.id) {
                delta.add(&stored.row)?;
                new_rows.push(stored);
                outcome.inserted += 1;
                continue;
            }
            match stored_digests.get(&stored.row.id) {
                Some(digest) if *digest == stored.digest => outcome.identical += 1,
                Some(digest) => return Err(conflict(stored, digest)),
                None => {
                    return Err(SinkError::Store(format!(
                        "row {} was neither inserted nor found",
                        stored.row.id
                    )));
                }
            }
        }
        Ok((delta, new_rows, outcome))
    }
}

fn conflict(stored: &StoredRow, other_digest: &str) -> SinkError {
    SinkError::Conflict {
        id: stored.row.id.clone(),
        topic: stored.position.topic.clone(),
        partition: stored.position.partition,
        offset: stored.position.offset,
        new_digest: stored.digest.clone(),
        stored_digest: other_digest.to_owned(),
    }
}

/// Wall clock in ms for `updated_at_ms` (bookkeeping only, never part of a row).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_by_scheme() {
        assert_eq!(
            StoreLocation::parse("database", "postgres://u@127.0.0.1/db").expect("pg"),
            StoreLocation::Postgres("postgres://u@127.0.0.1/db".to_owned())
        );
        assert_eq!(
            StoreLocation::parse("database", "sqlite:/tmp/x.db").expect("sqlite"),
            StoreLocation::Sqlite("/tmp/x.db".to_owned())
        );
        assert_eq!(
            StoreLocation::parse("database", "billing.db").expect("path"),
            StoreLocation::Sqlite("billing.db".to_owned())
        );
        let error = StoreLocation::parse("database", " ").expect_err("empty");
        assert!(error.to_string().contains("`database`"));
    }
}
