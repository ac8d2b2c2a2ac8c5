//! `tally sink` against a real broker and real databases.
//!
//! Needs `TALLY_TEST_BOOTSTRAP` and `TALLY_TEST_PG_URL` (deploy/local/test.sh starts
//! both). One generated input is aggregated once by the real `tally aggregate`
//! binary; the PostgreSQL and SQLite tests then each load its billing.aggregates
//! topic into their own store (their own database or file, their own group).
//!
//! Checked after every load, from a read_committed read of billing.aggregates and SQL
//! run by the test: the store holds exactly the topic's rows (ids, SHA-256 of the
//! record bytes, and the decoded fields), each once, and the 15-minute roll-ups and
//! share roll-ups equal the sums the test computes from the decoded records.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::TestTopics;
use support::eos::{
    ChildConfig, EventTime, ReadRecord, create_outputs, free_port, fresh_outputs,
    produce_generated, read_committed,
};
use support::prometheus::{parse, scrape};
use support::rand_name;
use tally_core::aggregate::BillingAggregate;
use tally_core::codec::decode_aggregate;

const PARTITIONS: i32 = 4;
const EVENT_TIME: EventTime = EventTime::EOS;
/// Bound of one sink or aggregator child run.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The aggregated input every load test reads.
struct Fixture {
    topics: TestTopics,
    records: Vec<ReadRecord>,
    dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let started = Instant::now();
        let input = produce_generated(
            &rand_name("sink-test-events"),
            EVENT_TIME.generator(8_000, 23, PARTITIONS),
            true,
        );
        let topics = fresh_outputs(&input.topic);
        create_outputs(&topics, PARTITIONS);
        let dir = tempfile::tempdir().expect("temp dir");
        let group = rand_name("sink-test-aggregator");
        let config = ChildConfig::new(&group, EVENT_TIME, PARTITIONS).write(
            dir.path(),
            "aggregate",
            &topics,
            PARTITIONS,
        );
        let mut aggregator = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([
                "aggregate",
                "--instance-id",
                &rand_name("sink-test"),
                "--start-from",
                "earliest",
                "--exit-after-idle-ms",
                "1500",
                "--config",
            ])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tally aggregate");
        let status = wait_exit(&mut aggregator, RUN_TIMEOUT);
        assert!(status.success(), "tally aggregate failed: {status}");
        let records = read_committed(
            &support::bootstrap(),
            &topics.billing_aggregates,
            PARTITIONS,
        );
        assert!(records.len() > 500, "too few rows: {}", records.len());
        eprintln!("fixture: {} rows in {:?}", records.len(), started.elapsed());
        Fixture {
            topics,
            records,
            dir,
        }
    })
}

fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
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
struct SinkProcess {
    child: Child,
}

impl SinkProcess {
    fn spawn(config: &Path, database: &str, group: &str, extra: &[&str]) -> SinkProcess {
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
fn sink_config(
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
struct Snapshot {
    /// id → (digest, figures in column order below).
    rows: BTreeMap<String, (String, Vec<i64>, Vec<String>)>,
    rollups: BTreeMap<Vec<String>, Vec<i64>>,
    shares: BTreeMap<Vec<String>, i64>,
    row_shares: BTreeMap<(String, String), (i64, i64)>,
    offsets: BTreeMap<i64, i64>,
}

const ROW_INTS: &str = "window_start_ms, window_end_ms, correction_seq, event_count, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, gross_micros, net_micros, source_partition, first_offset, last_offset, first_event_time_ms, last_event_time_ms";
const ROW_TEXTS: &str = "tenant_id, model, cloud, coalesce(channel_partner, '-'), region, row_kind, currency, price_book_version, share_rule_version, source_topic";
const ROLLUP_INTS: &str = "row_count, event_count, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, gross_micros, net_micros";

/// What the test expects from the records alone.
fn expected(records: &[ReadRecord]) -> Snapshot {
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

fn rollup_key(row: &BillingAggregate) -> Vec<String> {
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

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Compares a loaded store with the records, field by field, with a readable message.
fn assert_store_equals(actual: &Snapshot, records: &[ReadRecord]) {
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

fn pg_url() -> String {
    std::env::var("TALLY_TEST_PG_URL").expect(
        "TALLY_TEST_PG_URL is not set: run the tests through deploy/local/test.sh, \
         which starts a real PostgreSQL",
    )
}

fn pg_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A fresh database on the test server; returns its URL.
fn pg_fresh_database() -> String {
    let url = pg_url();
    let name = rand_name("sink").replace('-', "_");
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

fn pg_snapshot(url: &str) -> Snapshot {
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

fn pg_row_count(url: &str) -> i64 {
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

fn sqlite_snapshot(path: &Path) -> Snapshot {
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

fn sqlite_row_count(path: &Path) -> i64 {
    rusqlite::Connection::open(path)
        .and_then(|connection| {
            connection.query_row("SELECT count(*) FROM tally_rows", [], |row| row.get(0))
        })
        .unwrap_or(0)
}

fn wait_for_rows(what: &str, expected: i64, count: impl Fn() -> i64, sink: &mut SinkProcess) {
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

#[test]
fn postgres_store_equals_the_topic_and_rollups_equal_the_rows() {
    let fixture = fixture();
    let started = Instant::now();
    let url = pg_fresh_database();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let config = sink_config(fixture.dir.path(), "sink-pg", &fixture.topics, &listen, &[]);
    let mut sink = SinkProcess::spawn(&config, &url, &rand_name("sink-pg"), &[]);
    let expected_rows = fixture.records.len() as i64;
    wait_for_rows("postgres", expected_rows, || pg_row_count(&url), &mut sink);

    let metrics = parse(&scrape(&listen));
    assert_eq!(
        metrics.sum("tally_sink_rows_written_total"),
        Some(expected_rows as f64),
        "rows written"
    );
    let batches = metrics
        .sum("tally_sink_batches_total")
        .expect("batches counted");
    assert!(batches >= 1.0);
    assert_eq!(
        metrics.sum("tally_sink_db_transaction_seconds_count"),
        Some(batches),
        "one latency sample per committed batch"
    );
    assert_eq!(
        metrics.sum("tally_sink_conflicts_total").unwrap_or(0.0),
        0.0
    );
    assert!(metrics.help.contains_key("tally_sink_rows_written_total"));

    // SIGTERM: the open batch (none) is written and the process exits 0.
    let pid = sink.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = wait_exit(&mut sink.child, Duration::from_secs(30));
    assert!(exit.success(), "sink exit after SIGTERM: {exit}");

    assert_store_equals(&pg_snapshot(&url), &fixture.records);

    // A second sink of another group over the same store reads everything again
    // from the store's offsets: nothing to do, nothing changes.
    let before = pg_snapshot(&url);
    let mut again = SinkProcess::spawn(
        &config_without_metrics(fixture),
        &url,
        &rand_name("sink-pg-2"),
        &["--exit-after-idle-ms", "1000"],
    );
    let exit = wait_exit(&mut again.child, RUN_TIMEOUT);
    assert!(exit.success(), "second sink: {exit}");
    assert_eq!(
        pg_snapshot(&url),
        before,
        "a restart from the store's offsets changes nothing"
    );
    eprintln!("postgres test took {:?}", started.elapsed());
}

fn config_without_metrics(fixture: &Fixture) -> std::path::PathBuf {
    sink_config(fixture.dir.path(), "sink-quiet", &fixture.topics, "", &[])
}

#[test]
fn sqlite_store_survives_a_sigkill_mid_run() {
    let fixture = fixture();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("billing.db");
    let database = format!("sqlite:{}", path.display());
    // Small fetches and small batches: the load takes seconds, so the kill lands in it.
    let config = sink_config(
        dir.path(),
        "sink-sqlite",
        &fixture.topics,
        "",
        &[
            ("max.partition.fetch.bytes", "2048"),
            ("fetch.wait.max.ms", "20"),
            ("queued.min.messages", "1"),
            ("fetch.queue.backoff.ms", "20"),
        ],
    );
    let group = rand_name("sink-sqlite");
    let total = fixture.records.len() as i64;
    let mut sink = SinkProcess::spawn(&config, &database, &group, &["--batch-max-rows", "20"]);
    let kill_started = Instant::now();
    let mut at_kill = 0;
    while at_kill < total / 4 {
        at_kill = sqlite_row_count(&path);
        assert!(
            sink.child.try_wait().expect("wait").is_none(),
            "the sink exited before the kill"
        );
        assert!(
            kill_started.elapsed() < RUN_TIMEOUT,
            "no progress: {at_kill} rows"
        );
        thread::sleep(Duration::from_millis(5));
    }
    sink.child.kill().expect("SIGKILL");
    let _ = sink.child.wait();
    let after_kill = sqlite_row_count(&path);
    assert!(
        after_kill < total,
        "the kill must land mid-run: {after_kill} of {total} rows stored"
    );
    eprintln!("killed at {after_kill} of {total} rows");

    let mut restarted = SinkProcess::spawn(
        &config_without_metrics(fixture),
        &database,
        &group,
        &["--exit-after-idle-ms", "1000"],
    );
    let exit = wait_exit(&mut restarted.child, RUN_TIMEOUT);
    assert!(exit.success(), "restarted sink: {exit}");
    assert_store_equals(&sqlite_snapshot(&path), &fixture.records);
    eprintln!("sqlite test took {:?}", started.elapsed());
}
