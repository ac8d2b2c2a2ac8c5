//! PostgreSQL: batched writes on a private single-threaded runtime so the API blocks
//! like SQLite's and can be called from the sink's Kafka thread.
//!
//! A batch's rows go in with binary `COPY` (the cheapest way into PostgreSQL: no SQL
//! text, no array parameters, one stream) into a per-connection staging table,
//! `tally_rows_staging` (a temporary table shaped like `tally_rows`, without indexes,
//! emptied at every COMMIT), then `INSERT INTO tally_rows … SELECT … FROM
//! tally_rows_staging ON CONFLICT (id) DO NOTHING RETURNING id` moves them into the
//! store; COPY alone cannot skip existing ids. The ids not returned are compared
//! with their stored digests (equal: a no-op; different: a conflict). Shares and the
//! roll-up upserts are computed from the inserted rows only and sent as `unnest`
//! arrays, one statement per table, roll-up lines in key order.
//!
//! Every round trip is bounded by the store's timeout; on a timeout or a broken
//! connection the client is dropped and the next call reconnects. The transaction runs
//! at READ COMMITTED: the offset compare-and-set takes the offset row's lock, so a
//! second writer of the same partition waits for the first and then finds the offset
//! moved; roll-up upserts take bucket locks in key order, and deadlocks and
//! serialization failures that happen anyway are retried by the caller.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};
use tracing::debug;

use crate::error::SinkError;
use crate::rows::{RollupKey, RollupSums, ShareKey, StoredRow};
use crate::schema::{self, Dialect, MIGRATIONS, MIGRATIONS_TABLE, ROLLUP_KEY, ROW_COLUMNS};
use crate::store::{Batch, BatchOutcome, BatchPlan, now_ms};

/// Advisory lock key serialising migrations between instances ("tally" in ASCII).
const MIGRATION_LOCK: i64 = 0x74_61_6c_6c_79;

/// Runs `work` on `runtime`, bounded by `timeout`.
fn block<T>(
    runtime: &tokio::runtime::Runtime,
    timeout: Duration,
    operation: &'static str,
    work: impl Future<Output = Result<T, SinkError>>,
) -> Result<T, SinkError> {
    match runtime.block_on(async { tokio::time::timeout(timeout, work).await }) {
        Ok(result) => result,
        Err(_) => Err(SinkError::Timeout {
            operation,
            timeout_ms: timeout.as_millis(),
        }),
    }
}

/// Runs `$body` (a future using `$client`) with a connected client; see
/// [`PgStore::finish`].
macro_rules! with_client {
    ($store:ident, $operation:expr, |$client:ident| $body:expr) => {{
        $store.ensure_connected()?;
        let timeout = $store.timeout;
        let result = match $store.client.as_mut() {
            Some($client) => block(&$store.runtime, timeout, $operation, $body),
            None => Err(SinkError::Store("no postgresql client".to_owned())),
        };
        $store.finish(result)
    }};
}

/// A PostgreSQL billing store.
#[derive(Debug)]
pub struct PgStore {
    runtime: tokio::runtime::Runtime,
    url: String,
    timeout: Duration,
    client: Option<Client>,
    /// Whether the connection's staging table exists (it is created by the first
    /// batch that commits on a new connection).
    staging_ready: bool,
    /// Test hook: a pause after a batch's writes and before its COMMIT, from
    /// `TALLY_SINK_TEST_COMMIT_DELAY_MS` (see [`COMMIT_DELAY_ENV`]).
    commit_delay: Option<Duration>,
}

/// Test hook: milliseconds to wait between a batch's last write and its COMMIT, so a
/// crash test can kill the sink while a transaction is certainly open (the session is
/// then `idle in transaction` in `pg_stat_activity`). Unset or 0 in production.
pub const COMMIT_DELAY_ENV: &str = "TALLY_SINK_TEST_COMMIT_DELAY_MS";

/// `application_name` of the sink's sessions unless the connection string sets one.
pub const APPLICATION_NAME: &str = "tally-sink";

fn pg(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
    move |source| SinkError::Postgres { operation, source }
}

impl PgStore {
    /// Connects and migrates.
    pub fn open(url: &str, timeout: Duration) -> Result<PgStore, SinkError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| SinkError::Store(format!("cannot start a runtime: {error}")))?;
        let mut store = PgStore {
            runtime,
            url: url.to_owned(),
            timeout,
            client: None,
            staging_ready: false,
            commit_delay: commit_delay_from_env(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Connects when there is no live client.
    fn ensure_connected(&mut self) -> Result<(), SinkError> {
        if self
            .client
            .as_ref()
            .is_some_and(|client| !client.is_closed())
        {
            return Ok(());
        }
        let timeout = self.timeout;
        let url = self.url.clone();
        let connected = self.runtime.block_on(async move {
            let mut config: tokio_postgres::Config =
                url.parse().map_err(pg("parse the connection string"))?;
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(timeout);
            }
            config.keepalives(true);
            if config.get_application_name().is_none() {
                config.application_name(APPLICATION_NAME);
            }
            let connect = config.connect(NoTls);
            match tokio::time::timeout(timeout, connect).await {
                Ok(result) => result.map_err(pg("connect")),
                Err(_) => Err(SinkError::Timeout {
                    operation: "connect",
                    timeout_ms: timeout.as_millis(),
                }),
            }
        });
        let (client, connection) = connected?;
        self.runtime.spawn(async move {
            if let Err(error) = connection.await {
                debug!(error = %error, "postgresql connection closed");
            }
        });
        self.client = Some(client);
        self.staging_ready = false;
        Ok(())
    }

    /// Drops the client after a timeout or a connection error, so the next call
    /// reconnects.
    fn finish<T>(&mut self, result: Result<T, SinkError>) -> Result<T, SinkError> {
        if let Err(error) = &result
            && matches!(
                error.retry(),
                crate::error::Retry::Transient("connection" | "timeout")
            )
        {
            self.client = None;
        }
        result
    }

    fn migrate(&mut self) -> Result<(), SinkError> {
        with_client!(self, "migrate", |client| async {
            let tx = client.transaction().await.map_err(pg("begin"))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(pg("lock migrations"))?;
            tx.batch_execute(&schema::render(MIGRATIONS_TABLE, Dialect::Postgres))
                .await
                .map_err(pg("create the migrations table"))?;
            let applied: Option<i64> = tx
                .query_one("SELECT max(version) FROM tally_migrations", &[])
                .await
                .map_err(pg("read the schema version"))?
                .get(0);
            let applied = applied.unwrap_or(0);
            let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
            if applied > known {
                return Err(SinkError::Store(format!(
                    "schema version {applied} is newer than this binary's {known}"
                )));
            }
            for (index, sql) in MIGRATIONS.iter().enumerate() {
                let version = i64::try_from(index).unwrap_or(i64::MAX) + 1;
                if version <= applied {
                    continue;
                }
                tx.batch_execute(&schema::render(sql, Dialect::Postgres))
                    .await
                    .map_err(pg("apply a migration"))?;
                tx.execute(
                    "INSERT INTO tally_migrations (version, applied_at_ms) VALUES ($1, $2)",
                    &[&version, &now_ms()],
                )
                .await
                .map_err(pg("record a migration"))?;
            }
            tx.commit().await.map_err(pg("commit migrations"))
        })
    }

    pub(crate) fn load_offsets(&mut self, topic: &str) -> Result<BTreeMap<i32, i64>, SinkError> {
        let topic = topic.to_owned();
        with_client!(self, "load offsets", |client| async {
            let rows = client
                .query(
                    "SELECT kafka_partition, next_offset FROM tally_sink_offsets WHERE topic = $1",
                    &[&topic],
                )
                .await
                .map_err(pg("load offsets"))?;
            let mut offsets = BTreeMap::new();
            for row in rows {
                let partition: i64 = row.get(0);
                let partition = i32::try_from(partition)
                    .map_err(|_| SinkError::Store(format!("partition {partition} out of range")))?;
                offsets.insert(partition, row.get::<_, i64>(1));
            }
            Ok(offsets)
        })
    }

    pub(crate) fn write_batch(
        &mut self,
        batch: &Batch,
        plan: &BatchPlan,
    ) -> Result<BatchOutcome, SinkError> {
        self.ensure_connected()?;
        let options = WriteOptions {
            create_staging: !self.staging_ready,
            commit_delay: self.commit_delay,
        };
        let outcome = with_client!(self, "write a batch", |client| write(
            client, batch, plan, options
        ))?;
        self.staging_ready = true;
        Ok(outcome)
    }

    pub(crate) fn rollup_lines(
        &mut self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(RollupKey, RollupSums)>, SinkError> {
        with_client!(self, "read roll-ups", |client| async {
            let sql = format!(
                "SELECT {ROLLUP_KEY}, row_count, event_count, input_tokens, cached_input_tokens, \
                 output_tokens, reasoning_tokens, gross_micros, net_micros FROM tally_rollup_15m \
                 WHERE bucket_start_ms >= $1 AND bucket_start_ms < $2 ORDER BY {ROLLUP_KEY}"
            );
            let rows = client
                .query(&sql, &[&from_ms, &to_ms])
                .await
                .map_err(pg("read roll-ups"))?;
            Ok(rows
                .iter()
                .map(|row| {
                    (
                        rollup_key(row),
                        RollupSums {
                            rows: row.get(8),
                            event_count: row.get(9),
                            input_tokens: row.get(10),
                            cached_input_tokens: row.get(11),
                            output_tokens: row.get(12),
                            reasoning_tokens: row.get(13),
                            gross_micros: row.get(14),
                            net_micros: row.get(15),
                        },
                    )
                })
                .collect())
        })
    }

    pub(crate) fn share_lines(
        &mut self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(ShareKey, i64)>, SinkError> {
        with_client!(self, "read share roll-ups", |client| async {
            let sql = format!(
                "SELECT {ROLLUP_KEY}, beneficiary, amount_micros FROM tally_rollup_share_15m \
                 WHERE bucket_start_ms >= $1 AND bucket_start_ms < $2 ORDER BY {ROLLUP_KEY}, beneficiary"
            );
            let rows = client
                .query(&sql, &[&from_ms, &to_ms])
                .await
                .map_err(pg("read share roll-ups"))?;
            Ok(rows
                .iter()
                .map(|row| {
                    (
                        ShareKey {
                            rollup: rollup_key(row),
                            beneficiary: row.get(8),
                        },
                        row.get(9),
                    )
                })
                .collect())
        })
    }
}

fn rollup_key(row: &tokio_postgres::Row) -> RollupKey {
    RollupKey {
        bucket_start_ms: row.get(0),
        tenant_id: row.get(1),
        model: row.get(2),
        cloud: row.get(3),
        channel_partner: row.get(4),
        region: row.get(5),
        row_kind: row.get(6),
        currency: row.get(7),
    }
}

/// Reads the commit-delay test hook ([`COMMIT_DELAY_ENV`]); unset, empty, 0 or not a
/// number: none.
fn commit_delay_from_env() -> Option<Duration> {
    let millis: u64 = std::env::var(COMMIT_DELAY_ENV).ok()?.trim().parse().ok()?;
    (millis > 0).then(|| Duration::from_millis(millis))
}

/// Per-batch choices of [`write`].
#[derive(Debug, Clone, Copy)]
struct WriteOptions {
    /// Create the connection's staging table first (a new connection).
    create_staging: bool,
    /// Test hook: wait this long before COMMIT.
    commit_delay: Option<Duration>,
}

/// The staging table: `tally_rows`' columns without its keys and indexes, private to
/// the session, emptied at every COMMIT (a rolled-back batch's rows go with the
/// rollback).
const CREATE_STAGING: &str = "CREATE TEMPORARY TABLE IF NOT EXISTS tally_rows_staging \
     (LIKE tally_rows INCLUDING DEFAULTS) ON COMMIT DELETE ROWS";

/// Column types of `tally_rows` in [`ROW_COLUMNS`] order, for binary COPY.
const ROW_COPY_TYPES: [Type; 30] = [
    Type::TEXT, // id
    Type::TEXT, // digest
    Type::INT8, // window_start_ms
    Type::INT8, // window_end_ms
    Type::TEXT, // tenant_id
    Type::TEXT, // model
    Type::TEXT, // cloud
    Type::TEXT, // channel_partner
    Type::TEXT, // region
    Type::TEXT, // row_kind
    Type::INT8, // correction_seq
    Type::INT8, // event_count
    Type::INT8, // input_tokens
    Type::INT8, // cached_input_tokens
    Type::INT8, // output_tokens
    Type::INT8, // reasoning_tokens
    Type::TEXT, // currency
    Type::INT8, // gross_micros
    Type::INT8, // net_micros
    Type::TEXT, // price_book_version
    Type::TEXT, // share_rule_version
    Type::TEXT, // source_topic
    Type::INT8, // source_partition
    Type::INT8, // first_offset
    Type::INT8, // last_offset
    Type::INT8, // first_event_time_ms
    Type::INT8, // last_event_time_ms
    Type::TEXT, // kafka_topic
    Type::INT8, // kafka_partition
    Type::INT8, // kafka_offset
];

/// Streams the rows into `tally_rows_staging` with binary COPY; returns the rows
/// copied.
async fn copy_rows(
    tx: &tokio_postgres::Transaction<'_>,
    rows: impl Iterator<Item = &StoredRow>,
) -> Result<u64, SinkError> {
    use crate::rows::to_i64;
    let sink = tx
        .copy_in(&format!(
            "COPY tally_rows_staging ({ROW_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .map_err(pg("copy rows"))?;
    let writer = BinaryCopyInWriter::new(sink, &ROW_COPY_TYPES);
    let mut writer = std::pin::pin!(writer);
    for stored in rows {
        let row = &stored.row;
        let cloud = row.dims.cloud.as_str();
        let channel_partner = row.dims.channel_partner.as_deref();
        let row_kind = row.row_kind.as_str();
        let correction_seq = i64::from(row.correction_seq);
        let event_count = to_i64("event_count", row.event_count)?;
        let input_tokens = to_i64("input_tokens", row.tokens.input)?;
        let cached_input_tokens = to_i64("cached_input_tokens", row.tokens.cached_input)?;
        let output_tokens = to_i64("output_tokens", row.tokens.output)?;
        let reasoning_tokens = to_i64("reasoning_tokens", row.tokens.reasoning)?;
        let source_partition = i64::from(row.source_partition);
        let kafka_partition = i64::from(stored.position.partition);
        writer
            .as_mut()
            .write(&[
                &row.id,
                &stored.digest,
                &row.window_start_ms,
                &row.window_end_ms,
                &row.dims.tenant_id,
                &row.dims.model,
                &cloud,
                &channel_partner,
                &row.dims.region,
                &row_kind,
                &correction_seq,
                &event_count,
                &input_tokens,
                &cached_input_tokens,
                &output_tokens,
                &reasoning_tokens,
                &row.currency,
                &row.gross_micros,
                &row.net_micros,
                &row.price_book_version,
                &row.share_rule_version,
                &row.source_topic,
                &source_partition,
                &row.first_offset,
                &row.last_offset,
                &row.first_event_time_ms,
                &row.last_event_time_ms,
                &stored.position.topic,
                &kafka_partition,
                &stored.position.offset,
            ])
            .await
            .map_err(pg("copy rows"))?;
    }
    writer.as_mut().finish().await.map_err(pg("copy rows"))
}

/// `unnest($1::t1[], $2::t2[], …)` for the given element types.
fn unnest(types: &[&str]) -> String {
    let arrays: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(index, ty)| format!("${}::{ty}[]", index + 1))
        .collect();
    format!("unnest({})", arrays.join(", "))
}

const KEY_TYPES: [&str; 8] = [
    "bigint", "text", "text", "text", "text", "text", "text", "text",
];

async fn write(
    client: &mut Client,
    batch: &Batch,
    plan: &BatchPlan,
    options: WriteOptions,
) -> Result<BatchOutcome, SinkError> {
    let tx = client.transaction().await.map_err(pg("begin"))?;
    let now = now_ms();

    // 1. Offsets, compare-and-set.
    for advance in &batch.offsets {
        let partition = i64::from(advance.partition);
        let changed = match advance.expected {
            Some(expected) => tx
                .execute(
                    "UPDATE tally_sink_offsets SET next_offset = $1, updated_at_ms = $2 \
                     WHERE topic = $3 AND kafka_partition = $4 AND next_offset = $5",
                    &[&advance.next, &now, &advance.topic, &partition, &expected],
                )
                .await
                .map_err(pg("advance an offset"))?,
            None => tx
                .execute(
                    "INSERT INTO tally_sink_offsets (topic, kafka_partition, next_offset, updated_at_ms) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (topic, kafka_partition) DO NOTHING",
                    &[&advance.topic, &partition, &advance.next, &now],
                )
                .await
                .map_err(pg("insert an offset"))?,
        };
        if changed != 1 {
            let found = tx
                .query_opt(
                    "SELECT next_offset FROM tally_sink_offsets WHERE topic = $1 AND kafka_partition = $2",
                    &[&advance.topic, &partition],
                )
                .await
                .map_err(pg("read an offset"))?
                .map(|row| row.get::<_, i64>(0));
            return Err(SinkError::OffsetMismatch {
                topic: advance.topic.clone(),
                partition: advance.partition,
                expected: advance.expected,
                found,
            });
        }
    }

    // 2. Rows: COPY into the staging table, then into the store, skipping known ids.
    if options.create_staging {
        tx.batch_execute(CREATE_STAGING)
            .await
            .map_err(pg("create the staging table"))?;
    }
    copy_rows(&tx, plan.unique.iter().map(|&index| &batch.rows[index])).await?;
    let returned = tx
        .query(
            &format!(
                "INSERT INTO tally_rows ({ROW_COLUMNS}) SELECT {ROW_COLUMNS} FROM tally_rows_staging \
                 ON CONFLICT (id) DO NOTHING RETURNING id"
            ),
            &[],
        )
        .await
        .map_err(pg("insert rows"))?;
    let inserted: HashSet<String> = returned.iter().map(|row| row.get(0)).collect();
    let missing: Vec<&str> = plan
        .unique
        .iter()
        .map(|&index| batch.rows[index].row.id.as_str())
        .filter(|id| !inserted.contains(*id))
        .collect();
    let mut stored_digests = HashMap::new();
    if !missing.is_empty() {
        let rows = tx
            .query(
                "SELECT id, digest FROM tally_rows WHERE id = ANY($1)",
                &[&missing],
            )
            .await
            .map_err(pg("read stored digests"))?;
        for row in rows {
            stored_digests.insert(row.get::<_, String>(0), row.get::<_, String>(1));
        }
    }
    let (delta, new_rows, outcome) =
        plan.settle(batch, &|id| inserted.contains(id), &stored_digests)?;

    // 3. Shares of the inserted rows, then the roll-ups in key order.
    let mut share_row: Vec<&str> = Vec::new();
    let mut share_beneficiary: Vec<&str> = Vec::new();
    let mut share_bps: Vec<i64> = Vec::new();
    let mut share_amount: Vec<i64> = Vec::new();
    for stored in &new_rows {
        for share in &stored.row.shares {
            share_row.push(&stored.row.id);
            share_beneficiary.push(&share.beneficiary);
            share_bps.push(i64::from(share.basis_points));
            share_amount.push(share.amount_micros);
        }
    }
    if !share_row.is_empty() {
        let sql = format!(
            "INSERT INTO tally_row_shares (row_id, beneficiary, basis_points, amount_micros) SELECT * FROM {}",
            unnest(&["text", "text", "bigint", "bigint"])
        );
        tx.execute(
            &sql,
            &[&share_row, &share_beneficiary, &share_bps, &share_amount],
        )
        .await
        .map_err(pg("insert shares"))?;
    }
    if !delta.lines.is_empty() {
        let mut key = KeyColumns::default();
        let mut sums: [Vec<i64>; 8] = Default::default();
        for (line_key, line) in &delta.lines {
            key.push(line_key);
            for (column, value) in sums.iter_mut().zip([
                line.rows,
                line.event_count,
                line.input_tokens,
                line.cached_input_tokens,
                line.output_tokens,
                line.reasoning_tokens,
                line.gross_micros,
                line.net_micros,
            ]) {
                column.push(value);
            }
        }
        let mut types: Vec<&str> = KEY_TYPES.to_vec();
        types.extend(["bigint"; 8]);
        let sql = format!(
            "INSERT INTO tally_rollup_15m ({ROLLUP_KEY}, row_count, event_count, input_tokens, \
             cached_input_tokens, output_tokens, reasoning_tokens, gross_micros, net_micros) \
             SELECT * FROM {} ON CONFLICT ({ROLLUP_KEY}) DO UPDATE SET \
             row_count = tally_rollup_15m.row_count + EXCLUDED.row_count, \
             event_count = tally_rollup_15m.event_count + EXCLUDED.event_count, \
             input_tokens = tally_rollup_15m.input_tokens + EXCLUDED.input_tokens, \
             cached_input_tokens = tally_rollup_15m.cached_input_tokens + EXCLUDED.cached_input_tokens, \
             output_tokens = tally_rollup_15m.output_tokens + EXCLUDED.output_tokens, \
             reasoning_tokens = tally_rollup_15m.reasoning_tokens + EXCLUDED.reasoning_tokens, \
             gross_micros = tally_rollup_15m.gross_micros + EXCLUDED.gross_micros, \
             net_micros = tally_rollup_15m.net_micros + EXCLUDED.net_micros",
            unnest(&types)
        );
        let mut params = key.params();
        for column in &sums {
            params.push(column);
        }
        tx.execute(&sql, &params)
            .await
            .map_err(pg("upsert roll-ups"))?;
    }
    if !delta.shares.is_empty() {
        let mut key = KeyColumns::default();
        let mut beneficiary: Vec<&str> = Vec::new();
        let mut amount: Vec<i64> = Vec::new();
        for (share_key, value) in &delta.shares {
            key.push(&share_key.rollup);
            beneficiary.push(&share_key.beneficiary);
            amount.push(*value);
        }
        let mut types: Vec<&str> = KEY_TYPES.to_vec();
        types.extend(["text", "bigint"]);
        let sql = format!(
            "INSERT INTO tally_rollup_share_15m ({ROLLUP_KEY}, beneficiary, amount_micros) \
             SELECT * FROM {} ON CONFLICT ({ROLLUP_KEY}, beneficiary) DO UPDATE SET \
             amount_micros = tally_rollup_share_15m.amount_micros + EXCLUDED.amount_micros",
            unnest(&types)
        );
        let mut params = key.params();
        params.push(&beneficiary);
        params.push(&amount);
        tx.execute(&sql, &params)
            .await
            .map_err(pg("upsert share roll-ups"))?;
    }
    if let Some(delay) = options.commit_delay {
        tokio::time::sleep(delay).await;
    }
    tx.commit().await.map_err(pg("commit"))?;
    Ok(outcome)
}

#[derive(Default)]
struct KeyColumns<'a> {
    bucket: Vec<i64>,
    text: [Vec<&'a str>; 7],
}

impl<'a> KeyColumns<'a> {
    fn push(&mut self, key: &'a RollupKey) {
        self.bucket.push(key.bucket_start_ms);
        for (column, value) in self.text.iter_mut().zip([
            key.tenant_id.as_str(),
            &key.model,
            &key.cloud,
            &key.channel_partner,
            &key.region,
            &key.row_kind,
            &key.currency,
        ]) {
            column.push(value);
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&self.bucket];
        for column in &self.text {
            params.push(column);
        }
        params
    }
}
