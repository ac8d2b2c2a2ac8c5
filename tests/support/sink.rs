//! Helpers for the billing store's end-to-end tests: `tally sink` child processes, the
//! store's content read with the tests' own SQL (PostgreSQL and SQLite), and what a
//! store must hold for a set of billing.aggregates records.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use sha2::{Digest, Sha256};
use tally_core::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use tally_core::codec::decode_aggregate;
use tally_core::codec::encode_aggregate;
use tally_core::event::{Cloud, TokenCounts};

use super::TestTopics;
use super::eos::{ChildConfig, EventTime, ReadRecord, kafka_client};
use super::{bootstrap, rand_name};

/// Partitions of the sink tests' topics.
pub const PARTITIONS: i32 = 4;
/// Event-time parameters of the aggregator runs the sink tests read.
pub const EVENT_TIME: EventTime = EventTime::EOS;
/// Bound of one sink or aggregator child run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

pub fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            panic!("child did not exit within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A `tally sink` child; killed when dropped.
pub struct SinkProcess {
    pub child: Child,
}

impl SinkProcess {
    pub fn spawn(config: &Path, database: &str, group: &str, extra: &[&str]) -> SinkProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["sink", "--database", database, "--group-id", group])
            .args(extra)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tally sink");
        SinkProcess { child }
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The sink's config: the fixture's topics, metrics on `listen`, optional client settings.
pub fn sink_config(
    dir: &Path,
    name: &str,
    topics: &TestTopics,
    listen: &str,
    client: &[(&str, &str)],
) -> std::path::PathBuf {
    let mut config =
        ChildConfig::new("unused-aggregator-group", EVENT_TIME, PARTITIONS).with_client(client);
    config.metrics_listen = listen.to_owned();
    config.write(dir, name, topics, PARTITIONS)
}

/// A store's content as the test reads it with its own SQL.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// id → (digest, figures in column order below).
    pub rows: BTreeMap<String, (String, Vec<i64>, Vec<String>)>,
    pub rollups: BTreeMap<Vec<String>, Vec<i64>>,
    pub shares: BTreeMap<Vec<String>, i64>,
    pub row_shares: BTreeMap<(String, String), (i64, i64)>,
    pub offsets: BTreeMap<i64, i64>,
}

pub const ROW_INTS: &str = "window_start_ms, window_end_ms, correction_seq, event_count, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, gross_micros, net_micros, source_partition, first_offset, last_offset, first_event_time_ms, last_event_time_ms";
pub const ROW_TEXTS: &str = "tenant_id, model, cloud, coalesce(channel_partner, '-'), region, row_kind, currency, price_book_version, share_rule_version, source_topic";
pub const ROLLUP_INTS: &str = "row_count, event_count, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, gross_micros, net_micros";

/// What the test expects from the records alone.
pub fn expected(records: &[ReadRecord]) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for record in records {
        let row = decode_aggregate(&record.value).expect("an aggregate");
        let digest = hex_sha256(&record.value);
        let ints = vec![
            row.window_start_ms,
            row.window_end_ms,
            i64::from(row.correction_seq),
            row.event_count as i64,
            row.tokens.input as i64,
            row.tokens.cached_input as i64,
            row.tokens.output as i64,
            row.tokens.reasoning as i64,
            row.gross_micros,
            row.net_micros,
            i64::from(row.source_partition),
            row.first_offset,
            row.last_offset,
            row.first_event_time_ms,
            row.last_event_time_ms,
        ];
        let texts = vec![
            row.dims.tenant_id.clone(),
            row.dims.model.clone(),
            row.dims.cloud.as_str().to_owned(),
            row.dims
                .channel_partner
                .clone()
                .unwrap_or_else(|| "-".to_owned()),
            row.dims.region.clone(),
            row.row_kind.as_str().to_owned(),
            row.currency.clone(),
            row.price_book_version.clone(),
            row.share_rule_version.clone(),
            row.source_topic.clone(),
        ];
        assert!(
            snapshot
                .rows
                .insert(row.id.clone(), (digest, ints, texts))
                .is_none(),
            "row id {} twice in the topic",
            row.id
        );
        let key = rollup_key(&row);
        let sums = snapshot
            .rollups
            .entry(key.clone())
            .or_insert_with(|| vec![0; 8]);
        for (sum, value) in sums.iter_mut().zip([
            1,
            row.event_count as i64,
            row.tokens.input as i64,
            row.tokens.cached_input as i64,
            row.tokens.output as i64,
            row.tokens.reasoning as i64,
            row.gross_micros,
            row.net_micros,
        ]) {
            *sum += value;
        }
        for share in &row.shares {
            let mut share_key = key.clone();
            share_key.push(share.beneficiary.clone());
            *snapshot.shares.entry(share_key).or_insert(0) += share.amount_micros;
            snapshot.row_shares.insert(
                (row.id.clone(), share.beneficiary.clone()),
                (i64::from(share.basis_points), share.amount_micros),
            );
        }
        let next = snapshot
            .offsets
            .entry(i64::from(record.partition))
            .or_insert(0);
        *next = (*next).max(record.offset + 1);
    }
    snapshot
}

pub fn rollup_key(row: &BillingAggregate) -> Vec<String> {
    // 15 minutes = 900 000 ms; window starts are non-negative here.
    let bucket = row.window_start_ms - row.window_start_ms % 900_000;
    vec![
        bucket.to_string(),
        row.dims.tenant_id.clone(),
        row.dims.model.clone(),
        row.dims.cloud.as_str().to_owned(),
        row.dims.channel_partner.clone().unwrap_or_default(),
        row.dims.region.clone(),
        row.row_kind.as_str().to_owned(),
        row.currency.clone(),
    ]
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Compares a loaded store with the records, field by field, with a readable message.
pub fn assert_store_equals(actual: &Snapshot, records: &[ReadRecord]) {
    let expected = expected(records);
    assert_eq!(actual.rows.len(), expected.rows.len(), "row count");
    for (id, want) in &expected.rows {
        assert_eq!(actual.rows.get(id), Some(want), "row {id}");
    }
    assert_eq!(actual.row_shares, expected.row_shares, "row shares");
    assert_eq!(actual.rollups, expected.rollups, "15-minute roll-ups");
    assert_eq!(actual.shares, expected.shares, "share roll-ups");
    // The store's next offset of a partition is past its last row (a commit marker
    // may follow; it is not a row).
    for (partition, next) in &expected.offsets {
        assert_eq!(
            actual.offsets.get(partition),
            Some(next),
            "offset of partition {partition}"
        );
    }
}

// ---- PostgreSQL

pub fn pg_url() -> String {
    std::env::var("TALLY_TEST_PG_URL").expect(
        "TALLY_TEST_PG_URL is not set: run the tests through deploy/local/test.sh, \
         which starts a real PostgreSQL",
    )
}

pub fn pg_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A fresh database on the test server; returns its URL.
pub fn pg_fresh_database() -> String {
    pg_fresh_database_named("sink")
}

/// A fresh database on the test server named `<prefix>_<random>`; returns its URL.
pub fn pg_fresh_database_named(prefix: &str) -> String {
    let url = pg_url();
    let name = rand_name(prefix).replace('-', "_");
    pg_runtime().block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = driver.await;
    });
    let (base, _db) = url.rsplit_once('/').expect("a database in the URL");
    format!("{base}/{name}")
}

pub fn pg_snapshot(url: &str) -> Snapshot {
    pg_runtime().block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let driver = tokio::spawn(connection);
        let mut snapshot = Snapshot::default();
        for row in client
            .query(&format!("SELECT id, digest, {ROW_INTS}, {ROW_TEXTS} FROM tally_rows"), &[])
            .await
            .expect("rows")
        {
            let ints = (2..17).map(|index| row.get::<_, i64>(index)).collect();
            let texts = (17..27).map(|index| row.get::<_, String>(index)).collect();
            snapshot
                .rows
                .insert(row.get(0), (row.get(1), ints, texts));
        }
        for row in client
            .query("SELECT row_id, beneficiary, basis_points, amount_micros FROM tally_row_shares", &[])
            .await
            .expect("row shares")
        {
            snapshot
                .row_shares
                .insert((row.get(0), row.get(1)), (row.get(2), row.get(3)));
        }
        for row in client
            .query(&format!("SELECT bucket_start_ms::text, tenant_id, model, cloud, channel_partner, region, row_kind, currency, {ROLLUP_INTS} FROM tally_rollup_15m"), &[])
            .await
            .expect("roll-ups")
        {
            let key = (0..8).map(|index| row.get::<_, String>(index)).collect();
            let sums = (8..16).map(|index| row.get::<_, i64>(index)).collect();
            snapshot.rollups.insert(key, sums);
        }
        for row in client
            .query("SELECT bucket_start_ms::text, tenant_id, model, cloud, channel_partner, region, row_kind, currency, beneficiary, amount_micros FROM tally_rollup_share_15m", &[])
            .await
            .expect("share roll-ups")
        {
            let key = (0..9).map(|index| row.get::<_, String>(index)).collect();
            snapshot.shares.insert(key, row.get(9));
        }
        for row in client
            .query("SELECT kafka_partition, next_offset FROM tally_sink_offsets", &[])
            .await
            .expect("offsets")
        {
            snapshot.offsets.insert(row.get(0), row.get(1));
        }
        drop(client);
        let _ = driver.await;
        snapshot
    })
}

pub fn pg_row_count(url: &str) -> i64 {
    pg_runtime().block_on(async {
        let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        else {
            return 0;
        };
        let driver = tokio::spawn(connection);
        let count = client
            .query_one("SELECT count(*) FROM tally_rows", &[])
            .await
            .map_or(0, |row| row.get::<_, i64>(0));
        drop(client);
        let _ = driver.await;
        count
    })
}

// ---- SQLite

pub fn sqlite_snapshot(path: &Path) -> Snapshot {
    let connection = rusqlite::Connection::open(path).expect("open sqlite");
    let mut snapshot = Snapshot::default();
    let mut statement = connection
        .prepare(&format!(
            "SELECT id, digest, {ROW_INTS}, {ROW_TEXTS} FROM tally_rows"
        ))
        .expect("rows");
    let rows = statement
        .query_map([], |row| {
            let ints = (2..17)
                .map(|index| row.get::<_, i64>(index))
                .collect::<Result<Vec<_>, _>>()?;
            let texts = (17..27)
                .map(|index| row.get::<_, String>(index))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((
                row.get::<_, String>(0)?,
                (row.get::<_, String>(1)?, ints, texts),
            ))
        })
        .expect("rows");
    for row in rows {
        let (id, value) = row.expect("row");
        snapshot.rows.insert(id, value);
    }
    let mut statement = connection
        .prepare("SELECT row_id, beneficiary, basis_points, amount_micros FROM tally_row_shares")
        .expect("row shares");
    for row in statement
        .query_map([], |row| {
            Ok(((row.get(0)?, row.get(1)?), (row.get(2)?, row.get(3)?)))
        })
        .expect("row shares")
    {
        let (key, value) = row.expect("row share");
        snapshot.row_shares.insert(key, value);
    }
    let mut statement = connection
        .prepare(&format!("SELECT CAST(bucket_start_ms AS TEXT), tenant_id, model, cloud, channel_partner, region, row_kind, currency, {ROLLUP_INTS} FROM tally_rollup_15m"))
        .expect("roll-ups");
    for row in statement
        .query_map([], |row| {
            let key = (0..8)
                .map(|index| row.get::<_, String>(index))
                .collect::<Result<Vec<_>, _>>()?;
            let sums = (8..16)
                .map(|index| row.get::<_, i64>(index))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((key, sums))
        })
        .expect("roll-ups")
    {
        let (key, sums) = row.expect("roll-up");
        snapshot.rollups.insert(key, sums);
    }
    let mut statement = connection
        .prepare("SELECT CAST(bucket_start_ms AS TEXT), tenant_id, model, cloud, channel_partner, region, row_kind, currency, beneficiary, amount_micros FROM tally_rollup_share_15m")
        .expect("share roll-ups");
    for row in statement
        .query_map([], |row| {
            let key = (0..9)
                .map(|index| row.get::<_, String>(index))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((key, row.get::<_, i64>(9)?))
        })
        .expect("share roll-ups")
    {
        let (key, amount) = row.expect("share roll-up");
        snapshot.shares.insert(key, amount);
    }
    let mut statement = connection
        .prepare("SELECT kafka_partition, next_offset FROM tally_sink_offsets")
        .expect("offsets");
    for row in statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .expect("offsets")
    {
        let (partition, next) = row.expect("offset");
        snapshot.offsets.insert(partition, next);
    }
    snapshot
}

pub fn sqlite_row_count(path: &Path) -> i64 {
    rusqlite::Connection::open(path)
        .and_then(|connection| {
            connection.query_row("SELECT count(*) FROM tally_rows", [], |row| row.get(0))
        })
        .unwrap_or(0)
}

pub fn wait_for_rows(what: &str, expected: i64, count: impl Fn() -> i64, sink: &mut SinkProcess) {
    let started = Instant::now();
    loop {
        let stored = count();
        if stored == expected {
            return;
        }
        assert!(
            stored < expected,
            "{what}: {stored} rows stored, more than {expected}"
        );
        if let Some(status) = sink.child.try_wait().expect("wait") {
            panic!("{what}: the sink exited ({status}) with {stored} of {expected} rows");
        }
        assert!(
            started.elapsed() < RUN_TIMEOUT,
            "{what}: {stored} of {expected} rows after {RUN_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A synthetic row: distinct id, one minute per index, a share for microsoft.
pub fn synthetic_row(index: i64) -> BillingAggregate {
    let gross = 1_000 + index * 37;
    let share = gross / 4;
    BillingAggregate {
        id: format!("outage-{index:06}"),
        window_start_ms: 1_767_225_600_000 + index * 60_000,
        window_end_ms: 1_767_225_600_000 + (index + 1) * 60_000,
        dims: Dims {
            tenant_id: format!("tenant-{}", index % 7),
            model: "atlas-large".to_owned(),
            cloud: Cloud::Azure,
            channel_partner: Some("contoso".to_owned()),
            region: "westeurope".to_owned(),
        },
        row_kind: RowKind::Billable,
        correction_seq: 0,
        event_count: 2,
        tokens: TokenCounts {
            input: 40,
            cached_input: 4,
            output: 20,
            reasoning: 2,
        },
        currency: "EUR".to_owned(),
        gross_micros: gross,
        shares: vec![PartnerShare {
            beneficiary: "microsoft".to_owned(),
            basis_points: 2500,
            amount_micros: share,
        }],
        net_micros: gross - share,
        price_book_version: "2024-01".to_owned(),
        share_rule_version: "2024-01".to_owned(),
        source_topic: "usage.events".to_owned(),
        source_partition: 0,
        first_offset: index,
        last_offset: index,
        first_event_time_ms: 1_767_225_600_000 + index * 60_000,
        last_event_time_ms: 1_767_225_600_000 + index * 60_000,
    }
}

/// Produces the synthetic rows `indexes` round-robin over `partitions` partitions of
/// `topic`.
pub fn produce_synthetic_rows(topic: &str, partitions: i32, indexes: std::ops::Range<i64>) {
    let producer: BaseProducer = kafka_client(&bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for index in indexes {
        let mut value = Vec::new();
        encode_aggregate(&synthetic_row(index), &mut value);
        let partition = i32::try_from(index % i64::from(partitions)).expect("small");
        producer
            .send(
                BaseRecord::<[u8], [u8]>::to(topic)
                    .partition(partition)
                    .payload(&value),
            )
            .expect("enqueue");
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}
