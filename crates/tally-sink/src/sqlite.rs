//! SQLite: the embedded default store, one file, one writer.
//!
//! WAL mode (readers such as `tally report` do not block the writer), `busy_timeout`
//! set to the store's timeout, `synchronous=NORMAL` (in WAL mode a process crash loses
//! nothing committed; a power loss may lose the last transactions, but rows and offsets
//! are lost together, so the sink re-reads them from Kafka). Tables are `STRICT`, so
//! an overflowing integer sum is an error (see [`crate::schema`]). One sink instance
//! should own every partition of a file; a second one is fenced by the offset
//! compare-and-set all the same.
//!
//! Throughput: one transaction per batch with cached prepared statements, rows in key
//! order (`(window_start_ms, id)`, see [`crate::schema`]), so a batch's inserts share
//! the pages at the end of the key's index. A new file gets [`PAGE_SIZE`]-byte pages
//! (a row is about 330 bytes; larger pages mean fewer page splits and fewer b-tree
//! pages written per batch: 146 k rows/s against 110 k with 4 KiB pages at 10 M
//! stored rows). The writer keeps [`CACHE_SIZE_KIB`] of
//! pages and checkpoints the WAL every [`WAL_AUTOCHECKPOINT_PAGES`] pages instead of
//! every 1 000 (each checkpoint syncs the file).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::error::SinkError;
use crate::rows::{IDENTITY_COLUMNS, RollupKey, RollupSums, ShareKey, StoredIdentity};
use crate::schema::{
    self, Dialect, MIGRATIONS, MIGRATIONS_TABLE, ROLLUP_KEY, ROW_COLUMNS, WINDOW_KEYS_VERSION,
};
use crate::store::{Batch, BatchOutcome, BatchPlan, now_ms};

/// Page size of a new file, bytes (SQLite's default is 4 096).
pub(crate) const PAGE_SIZE: i64 = 16_384;
/// Page cache of the writer's connection, KiB (SQLite's default is 2 000 KiB).
pub(crate) const CACHE_SIZE_KIB: i64 = 64 * 1024;
/// WAL pages between automatic checkpoints (SQLite's default is 1 000 pages, 4 MiB).
pub(crate) const WAL_AUTOCHECKPOINT_PAGES: i64 = 16_384;

/// Foreign ids looked up per scan of `tally_rows` (one bound parameter each).
const FOREIGN_ID_CHUNK: usize = 1_000;

/// Migration 3: records the foreign ids of the rows stored before it.
fn record_foreign_ids(tx: &rusqlite::Transaction<'_>) -> Result<(), SinkError> {
    let mut read = tx
        .prepare(&format!("SELECT {IDENTITY_COLUMNS} FROM tally_rows"))
        .map_err(lite("read row identities"))?;
    let identities = read
        .query_map([], |row| {
            Ok(StoredIdentity {
                id: row.get(0)?,
                window_start_ms: row.get(1)?,
                window_end_ms: row.get(2)?,
                tenant_id: row.get(3)?,
                model: row.get(4)?,
                cloud: row.get(5)?,
                channel_partner: row.get(6)?,
                region: row.get(7)?,
                price_book_version: row.get(8)?,
                share_rule_version: row.get(9)?,
                row_kind: row.get(10)?,
                correction_seq: row.get(11)?,
                source_topic: row.get(12)?,
                source_partition: row.get(13)?,
            })
        })
        .map_err(lite("read row identities"))?;
    let mut record = tx
        .prepare("INSERT INTO tally_foreign_row_ids (id, window_start_ms) VALUES (?1, ?2)")
        .map_err(lite("record a foreign id"))?;
    for identity in identities {
        let identity = identity.map_err(lite("read row identities"))?;
        if !identity.is_derived() {
            record
                .execute(params![identity.id, identity.window_start_ms])
                .map_err(lite("record a foreign id"))?;
        }
    }
    Ok(())
}

/// An SQLite billing store.
#[derive(Debug)]
pub struct SqliteStore {
    connection: Connection,
}

fn lite(operation: &'static str) -> impl FnOnce(rusqlite::Error) -> SinkError {
    move |source| SinkError::Sqlite { operation, source }
}

impl SqliteStore {
    /// Opens (or creates) the file and migrates.
    pub fn open(path: &str, timeout: Duration) -> Result<SqliteStore, SinkError> {
        SqliteStore::open_upto(path, timeout, MIGRATIONS.len())
    }

    /// Opens the store with only the first `upto` migrations applied (tests of a
    /// migration start from the schema before it).
    pub(crate) fn open_upto(
        path: &str,
        timeout: Duration,
        upto: usize,
    ) -> Result<SqliteStore, SinkError> {
        let connection = Connection::open(path).map_err(lite("open"))?;
        connection
            .busy_timeout(timeout)
            .map_err(lite("set busy_timeout"))?;
        // Takes effect only in a new file (before its first table).
        connection
            .pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(lite("set page_size"))?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(lite("set journal_mode"))?;
        connection
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(lite("set synchronous"))?;
        connection
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(lite("set foreign_keys"))?;
        connection
            .pragma_update(None, "cache_size", -CACHE_SIZE_KIB)
            .map_err(lite("set cache_size"))?;
        connection
            .pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
            .map_err(lite("set wal_autocheckpoint"))?;
        let mut store = SqliteStore { connection };
        store.migrate(upto)?;
        Ok(store)
    }

    /// Applies the missing migrations among the first `upto`.
    pub(crate) fn migrate(&mut self, upto: usize) -> Result<(), SinkError> {
        let tx = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(lite("begin"))?;
        tx.execute_batch(&schema::render(MIGRATIONS_TABLE, Dialect::Sqlite))
            .map_err(lite("create the migrations table"))?;
        let applied: Option<i64> = tx
            .query_row("SELECT max(version) FROM tally_migrations", [], |row| {
                row.get(0)
            })
            .map_err(lite("read the schema version"))?;
        let applied = applied.unwrap_or(0);
        let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
        if applied > known {
            return Err(SinkError::Store(format!(
                "schema version {applied} is newer than this binary's {known}"
            )));
        }
        for (index, migration) in MIGRATIONS.iter().take(upto).enumerate() {
            let version = i64::try_from(index).unwrap_or(i64::MAX) + 1;
            if version <= applied {
                continue;
            }
            tx.execute_batch(&migration.sql(Dialect::Sqlite))
                .map_err(lite("apply a migration"))?;
            if version == WINDOW_KEYS_VERSION {
                record_foreign_ids(&tx)?;
            }
            tx.execute(
                "INSERT INTO tally_migrations (version, applied_at_ms) VALUES (?1, ?2)",
                params![version, now_ms()],
            )
            .map_err(lite("record a migration"))?;
        }
        tx.commit().map_err(lite("commit migrations"))
    }

    pub(crate) fn load_offsets(&mut self, topic: &str) -> Result<BTreeMap<i32, i64>, SinkError> {
        let mut statement = self
            .connection
            .prepare_cached(
                "SELECT kafka_partition, next_offset FROM tally_sink_offsets WHERE topic = ?1",
            )
            .map_err(lite("load offsets"))?;
        let rows = statement
            .query_map([topic], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
            })
            .map_err(lite("load offsets"))?;
        let mut offsets = BTreeMap::new();
        for row in rows {
            let (partition, next) = row.map_err(lite("load offsets"))?;
            let partition = i32::try_from(partition)
                .map_err(|_| SinkError::Store(format!("partition {partition} out of range")))?;
            offsets.insert(partition, next);
        }
        Ok(offsets)
    }

    pub(crate) fn write_batch(
        &mut self,
        batch: &Batch,
        plan: &BatchPlan,
    ) -> Result<BatchOutcome, SinkError> {
        use crate::rows::to_i64;
        let tx = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(lite("begin"))?;
        let now = now_ms();
        for advance in &batch.offsets {
            let changed = match advance.expected {
                Some(expected) => tx
                    .prepare_cached(
                        "UPDATE tally_sink_offsets SET next_offset = ?1, updated_at_ms = ?2 \
                         WHERE topic = ?3 AND kafka_partition = ?4 AND next_offset = ?5",
                    )
                    .and_then(|mut statement| {
                        statement.execute(params![
                            advance.next,
                            now,
                            advance.topic,
                            advance.partition,
                            expected
                        ])
                    })
                    .map_err(lite("advance an offset"))?,
                None => tx
                    .prepare_cached(
                        "INSERT INTO tally_sink_offsets (topic, kafka_partition, next_offset, updated_at_ms) \
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (topic, kafka_partition) DO NOTHING",
                    )
                    .and_then(|mut statement| {
                        statement.execute(params![advance.topic, advance.partition, advance.next, now])
                    })
                    .map_err(lite("insert an offset"))?,
            };
            if changed != 1 {
                let found: Option<i64> = tx
                    .query_row(
                        "SELECT next_offset FROM tally_sink_offsets WHERE topic = ?1 AND kafka_partition = ?2",
                        params![advance.topic, advance.partition],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(lite("read an offset"))?;
                return Err(SinkError::OffsetMismatch {
                    topic: advance.topic.clone(),
                    partition: advance.partition,
                    expected: advance.expected,
                    found,
                });
            }
        }

        // 2. Ids the key (window_start_ms, id) cannot check alone (crate::schema).
        let mut stored_digests: HashMap<String, String> = HashMap::new();
        let foreign_stored: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM tally_foreign_row_ids)",
                [],
                |row| row.get(0),
            )
            .map_err(lite("read the foreign ids"))?;
        if foreign_stored {
            let mut lookup = tx
                .prepare_cached(
                    "SELECT r.digest FROM tally_foreign_row_ids f JOIN tally_rows r \
                     ON r.window_start_ms = f.window_start_ms AND r.id = f.id WHERE f.id = ?1",
                )
                .map_err(lite("prepare the foreign id read"))?;
            for (stored, _) in plan.rows(batch).filter(|(_, derived)| *derived) {
                if let Some(found) = lookup
                    .query_row([&stored.row.id], |row| row.get::<_, String>(0))
                    .optional()
                    .map_err(lite("read the foreign ids"))?
                {
                    stored_digests.insert(stored.row.id.clone(), found);
                }
            }
        }
        if plan.has_foreign() {
            // No index on the id alone: one scan of the rows per chunk of ids.
            let foreign: Vec<&str> = plan
                .rows(batch)
                .filter(|(_, derived)| !derived)
                .map(|(stored, _)| stored.row.id.as_str())
                .collect();
            for chunk in foreign.chunks(FOREIGN_ID_CHUNK) {
                let placeholders = vec!["?"; chunk.len()].join(", ");
                let mut scan = tx
                    .prepare_cached(&format!(
                        "SELECT id, digest FROM tally_rows WHERE id IN ({placeholders})"
                    ))
                    .map_err(lite("prepare the id scan"))?;
                let found = scan
                    .query_map(rusqlite::params_from_iter(chunk), |row| {
                        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                    })
                    .map_err(lite("scan for ids"))?;
                for pair in found {
                    let (id, digest) = pair.map_err(lite("scan for ids"))?;
                    stored_digests.insert(id, digest);
                }
            }
        }

        // 3. The rows not found above, in key order.
        let mut inserted: HashSet<String> = HashSet::new();
        {
            let placeholders: Vec<String> = (1..=30).map(|index| format!("?{index}")).collect();
            let mut insert = tx
                .prepare_cached(&format!(
                    "INSERT INTO tally_rows ({ROW_COLUMNS}) VALUES ({}) \
                     ON CONFLICT (window_start_ms, id) DO NOTHING",
                    placeholders.join(", ")
                ))
                .map_err(lite("prepare the row insert"))?;
            let mut digest = tx
                .prepare_cached(
                    "SELECT digest FROM tally_rows WHERE window_start_ms = ?1 AND id = ?2",
                )
                .map_err(lite("prepare the digest read"))?;
            let mut foreign_id = tx
                .prepare_cached(
                    "INSERT INTO tally_foreign_row_ids (id, window_start_ms) VALUES (?1, ?2)",
                )
                .map_err(lite("prepare the foreign id insert"))?;
            let mut in_key_order: Vec<(&crate::rows::StoredRow, bool)> = plan
                .rows(batch)
                .filter(|(stored, _)| !stored_digests.contains_key(&stored.row.id))
                .collect();
            in_key_order.sort_unstable_by(|(a, _), (b, _)| {
                (a.row.window_start_ms, &a.row.id).cmp(&(b.row.window_start_ms, &b.row.id))
            });
            for (stored, derived) in in_key_order {
                let row = &stored.row;
                let changed = insert
                    .execute(params![
                        row.id,
                        stored.digest,
                        row.window_start_ms,
                        row.window_end_ms,
                        row.dims.tenant_id,
                        row.dims.model,
                        row.dims.cloud.as_str(),
                        row.dims.channel_partner,
                        row.dims.region,
                        row.row_kind.as_str(),
                        i64::from(row.correction_seq),
                        to_i64("event_count", row.event_count)?,
                        to_i64("input_tokens", row.tokens.input)?,
                        to_i64("cached_input_tokens", row.tokens.cached_input)?,
                        to_i64("output_tokens", row.tokens.output)?,
                        to_i64("reasoning_tokens", row.tokens.reasoning)?,
                        row.currency,
                        row.gross_micros,
                        row.net_micros,
                        row.price_book_version,
                        row.share_rule_version,
                        row.source_topic,
                        row.source_partition,
                        row.first_offset,
                        row.last_offset,
                        row.first_event_time_ms,
                        row.last_event_time_ms,
                        stored.position.topic,
                        stored.position.partition,
                        stored.position.offset,
                    ])
                    .map_err(lite("insert a row"))?;
                if changed == 1 {
                    if !derived {
                        foreign_id
                            .execute(params![row.id, row.window_start_ms])
                            .map_err(lite("record a foreign id"))?;
                    }
                    inserted.insert(row.id.clone());
                } else {
                    let existing: String = digest
                        .query_row(params![row.window_start_ms, row.id], |found| found.get(0))
                        .map_err(lite("read a stored digest"))?;
                    stored_digests.insert(row.id.clone(), existing);
                }
            }
        }
        let (delta, new_rows, outcome) =
            plan.settle(batch, &|id| inserted.contains(id), &stored_digests)?;
        {
            let mut share = tx
                .prepare_cached(
                    "INSERT INTO tally_row_shares (row_id, beneficiary, basis_points, amount_micros, \
                     window_start_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(lite("prepare the share insert"))?;
            for stored in &new_rows {
                for line in &stored.row.shares {
                    share
                        .execute(params![
                            stored.row.id,
                            line.beneficiary,
                            i64::from(line.basis_points),
                            line.amount_micros,
                            stored.row.window_start_ms
                        ])
                        .map_err(lite("insert a share"))?;
                }
            }
            let mut rollup = tx
                .prepare_cached(&format!(
                    "INSERT INTO tally_rollup_15m ({ROLLUP_KEY}, row_count, event_count, input_tokens, \
                     cached_input_tokens, output_tokens, reasoning_tokens, gross_micros, net_micros) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) \
                     ON CONFLICT ({ROLLUP_KEY}) DO UPDATE SET \
                     row_count = row_count + excluded.row_count, \
                     event_count = event_count + excluded.event_count, \
                     input_tokens = input_tokens + excluded.input_tokens, \
                     cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens, \
                     output_tokens = output_tokens + excluded.output_tokens, \
                     reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens, \
                     gross_micros = gross_micros + excluded.gross_micros, \
                     net_micros = net_micros + excluded.net_micros"
                ))
                .map_err(lite("prepare the roll-up upsert"))?;
            for (key, sums) in &delta.lines {
                rollup
                    .execute(params![
                        key.bucket_start_ms,
                        key.tenant_id,
                        key.model,
                        key.cloud,
                        key.channel_partner,
                        key.region,
                        key.row_kind,
                        key.currency,
                        sums.rows,
                        sums.event_count,
                        sums.input_tokens,
                        sums.cached_input_tokens,
                        sums.output_tokens,
                        sums.reasoning_tokens,
                        sums.gross_micros,
                        sums.net_micros,
                    ])
                    .map_err(lite("upsert a roll-up"))?;
            }
            let mut share_rollup = tx
                .prepare_cached(&format!(
                    "INSERT INTO tally_rollup_share_15m ({ROLLUP_KEY}, beneficiary, amount_micros) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                     ON CONFLICT ({ROLLUP_KEY}, beneficiary) DO UPDATE SET \
                     amount_micros = amount_micros + excluded.amount_micros"
                ))
                .map_err(lite("prepare the share roll-up upsert"))?;
            for (key, amount) in &delta.shares {
                let line = &key.rollup;
                share_rollup
                    .execute(params![
                        line.bucket_start_ms,
                        line.tenant_id,
                        line.model,
                        line.cloud,
                        line.channel_partner,
                        line.region,
                        line.row_kind,
                        line.currency,
                        key.beneficiary,
                        amount,
                    ])
                    .map_err(lite("upsert a share roll-up"))?;
            }
        }
        tx.commit().map_err(lite("commit"))?;
        Ok(outcome)
    }

    pub(crate) fn rollup_lines(
        &mut self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(RollupKey, RollupSums)>, SinkError> {
        let mut statement = self
            .connection
            .prepare_cached(&format!(
                "SELECT {ROLLUP_KEY}, row_count, event_count, input_tokens, cached_input_tokens, \
                 output_tokens, reasoning_tokens, gross_micros, net_micros FROM tally_rollup_15m \
                 WHERE bucket_start_ms >= ?1 AND bucket_start_ms < ?2 ORDER BY {ROLLUP_KEY}"
            ))
            .map_err(lite("read roll-ups"))?;
        let rows = statement
            .query_map([from_ms, to_ms], |row| {
                Ok((
                    rollup_key(row)?,
                    RollupSums {
                        rows: row.get(8)?,
                        event_count: row.get(9)?,
                        input_tokens: row.get(10)?,
                        cached_input_tokens: row.get(11)?,
                        output_tokens: row.get(12)?,
                        reasoning_tokens: row.get(13)?,
                        gross_micros: row.get(14)?,
                        net_micros: row.get(15)?,
                    },
                ))
            })
            .map_err(lite("read roll-ups"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(lite("read roll-ups"))
    }

    pub(crate) fn share_lines(
        &mut self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(ShareKey, i64)>, SinkError> {
        let mut statement = self
            .connection
            .prepare_cached(&format!(
                "SELECT {ROLLUP_KEY}, beneficiary, amount_micros FROM tally_rollup_share_15m \
                 WHERE bucket_start_ms >= ?1 AND bucket_start_ms < ?2 ORDER BY {ROLLUP_KEY}, beneficiary"
            ))
            .map_err(lite("read share roll-ups"))?;
        let rows = statement
            .query_map([from_ms, to_ms], |row| {
                Ok((
                    ShareKey {
                        rollup: rollup_key(row)?,
                        beneficiary: row.get(8)?,
                    },
                    row.get(9)?,
                ))
            })
            .map_err(lite("read share roll-ups"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(lite("read share roll-ups"))
    }
}

fn rollup_key(row: &rusqlite::Row<'_>) -> rusqlite::Result<RollupKey> {
    Ok(RollupKey {
        bucket_start_ms: row.get(0)?,
        tenant_id: row.get(1)?,
        model: row.get(2)?,
        cloud: row.get(3)?,
        channel_partner: row.get(4)?,
        region: row.get(5)?,
        row_kind: row.get(6)?,
        currency: row.get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use tally_core::aggregate::{BillingAggregate, Dims, RowKind};
    use tally_core::event::{Cloud, TokenCounts};

    use super::*;
    use crate::rows::{Position, StoredRow};
    use crate::store::{OffsetAdvance, Store, StoreLocation};

    fn stored(id: &str, offset: i64, gross_micros: i64) -> StoredRow {
        let row = BillingAggregate {
            id: id.to_owned(),
            window_start_ms: 0,
            window_end_ms: 60_000,
            dims: Dims {
                tenant_id: "t".to_owned(),
                model: "m".to_owned(),
                cloud: Cloud::Aws,
                channel_partner: None,
                region: "r".to_owned(),
            },
            row_kind: RowKind::Billable,
            correction_seq: 0,
            event_count: 1,
            tokens: TokenCounts::default(),
            currency: "USD".to_owned(),
            gross_micros,
            shares: Vec::new(),
            net_micros: gross_micros,
            price_book_version: "p".to_owned(),
            share_rule_version: "s".to_owned(),
            source_topic: "in".to_owned(),
            source_partition: 0,
            first_offset: 0,
            last_offset: 0,
            first_event_time_ms: 0,
            last_event_time_ms: 0,
        };
        let bytes = format!("{id}/{gross_micros}");
        StoredRow::new(
            row,
            bytes.as_bytes(),
            Position {
                topic: "aggregates".to_owned(),
                partition: 0,
                offset,
            },
        )
    }

    fn batch(rows: Vec<StoredRow>, expected: Option<i64>, next: i64) -> Batch {
        Batch {
            rows,
            offsets: vec![OffsetAdvance {
                topic: "aggregates".to_owned(),
                partition: 0,
                expected,
                next,
            }],
        }
    }

    #[test]
    fn an_overflowing_rollup_sum_fails_the_batch_and_stores_nothing_of_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let location = StoreLocation::Sqlite(dir.path().join("s.db").display().to_string());
        let mut store = Store::open(&location, Duration::from_secs(5)).expect("open");
        store
            .write_batch(&batch(vec![stored("a", 0, i64::MAX)], None, 1))
            .expect("first batch");
        let error = store
            .write_batch(&batch(vec![stored("b", 1, 1)], Some(1), 2))
            .expect_err("the bucket's gross would overflow");
        assert!(matches!(error, SinkError::Sqlite { .. }), "{error}");
        assert_eq!(
            store.load_offsets("aggregates").expect("offsets").get(&0),
            Some(&1),
            "the failed batch did not advance the offset"
        );
        let lines = store.rollup_lines(i64::MIN, i64::MAX).expect("roll-ups");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].1.gross_micros, i64::MAX);
        assert_eq!(lines[0].1.rows, 1);
    }

    #[test]
    fn reopening_a_migrated_file_keeps_its_rows() {
        let dir = tempfile::tempdir().expect("temp dir");
        let location = StoreLocation::Sqlite(dir.path().join("s.db").display().to_string());
        let mut store = Store::open(&location, Duration::from_secs(5)).expect("open");
        store
            .write_batch(&batch(vec![stored("a", 0, 7)], None, 1))
            .expect("batch");
        drop(store);
        let mut store = Store::open(&location, Duration::from_secs(5)).expect("reopen");
        assert_eq!(
            store.load_offsets("aggregates").expect("offsets").get(&0),
            Some(&1)
        );
    }
}
