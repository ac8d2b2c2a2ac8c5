//! Billing store write throughput: rows/s through the sink's batch path
//! ([`tally_sink::Store::write_batch`]: offsets compare-and-set, rows (PostgreSQL:
//! binary COPY into a staging table, then `INSERT … SELECT … ON CONFLICT (id) DO
//! NOTHING RETURNING id`; SQLite: one prepared insert per row), shares, 15-minute
//! roll-up and share roll-up upserts, one transaction per batch) into SQLite and
//! PostgreSQL, with a store that already holds millions of rows.
//!
//! Before measuring, each store is preloaded with `TALLY_BENCH_PRELOAD_ROWS` rows
//! (default 10 000 000 under `cargo bench`, 10 000 under `cargo test --benches`) by
//! SQL alone (`generate_series` in PostgreSQL, a recursive CTE in SQLite) plus their
//! roll-ups, so the primary-key index is as large as a store's after weeks of traffic.
//! Preloaded ids are 32 hex digits spread evenly over the id space, in windows weeks
//! before the measured ones (they stand for the derived rows of earlier traffic; the
//! preload writes no foreign ids); the measured rows carry the aggregator's identity
//! ([`tally_core::identity::row_id_of`]), so they are derived rows, keyed by window first
//! like every row since the store's migration 3.
//!
//! Each iteration writes one batch of `TALLY_BENCH_BATCH_ROWS` (default 20 000, the
//! sink's `--batch-max-rows`) new rows (60 tenants × 4 models × 3 clouds, one-minute
//! windows, so a batch touches a few hundred roll-up lines), continuing the offsets of
//! the previous batch. Building the batch is not timed.
//!
//! The machine is shared, so besides criterion's wall-clock figures each case prints
//! rows per CPU second: the CPU the writing thread used (client encoding; for SQLite
//! the whole database work) plus, for PostgreSQL, the CPU of the sink session's server
//! process (found by its `application_name` in `pg_stat_activity`), both read from
//! `/proc` around every batch.
//!
//! `cargo bench --bench sink_store`; under `cargo test --benches` every case runs once.
//! Needs `TALLY_TEST_PG_URL` (deploy/local/postgres.sh start); the bench creates its own
//! database there and an SQLite file in a temp dir (`TALLY_BENCH_DIR` to put it
//! elsewhere), and prints the preload's duration. `TALLY_BENCH_PG_DATABASE=bench_…`
//! measures again in a database an earlier run preloaded (its name is printed), with
//! no preload, e.g. after changing a server setting.

use std::cell::Cell;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tally_core::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use tally_core::codec::encode_aggregate;
use tally_core::event::{Cloud, TokenCounts};
use tally_core::identity::row_id_of;
use tally_sink::rows::{Position, StoredRow};
use tally_sink::{Batch, OffsetAdvance, Store, StoreLocation};

/// Rows preloaded under `cargo bench` (the "≥ 10 M rows already in the store").
const BENCH_PRELOAD_ROWS: i64 = 10_000_000;
/// Rows preloaded under `cargo test --benches` (CI): the path runs, cheaply.
const TEST_PRELOAD_ROWS: i64 = 10_000;
/// Default rows per batch: the sink's `--batch-max-rows` default.
const DEFAULT_BATCH_ROWS: i64 = 20_000;
/// 16^15: preloaded ids are `i × (16^15 / n)` in 15 hex digits, then 17 zeros.
const ID_SPACE: i64 = 1_152_921_504_606_846_976;
const MODELS: [&str; 4] = [
    "atlas-large",
    "atlas-mini",
    "atlas-reasoning",
    "atlas-embed",
];
const CLOUDS: [Cloud; 3] = [Cloud::Aws, Cloud::Azure, Cloud::Gcp];

fn row(index: i64) -> BillingAggregate {
    let gross = 10_000 + (index * 7_919) % 1_000_000;
    // index % 60, index / 60 % 4 and index / 240 % 3 name 720 distinct dims per window.
    let cloud = CLOUDS[usize::try_from(index / 240 % 3).unwrap_or(0)];
    let shares = if cloud == Cloud::Aws {
        vec![PartnerShare {
            beneficiary: "aws".to_owned(),
            basis_points: 2000,
            amount_micros: gross / 5,
        }]
    } else {
        Vec::new()
    };
    let shared: i64 = shares.iter().map(|share| share.amount_micros).sum();
    // 60 × 4 × 3 dims per minute; windows advance one minute per 720 rows.
    let window_start_ms = 1_767_225_600_000 + (index / 720) * 60_000;
    let mut row = BillingAggregate {
        id: String::new(),
        window_start_ms,
        window_end_ms: window_start_ms + 60_000,
        dims: Dims {
            tenant_id: format!("tenant-{:03}", index % 60),
            model: MODELS[usize::try_from(index / 60 % 4).unwrap_or(0)].to_owned(),
            cloud,
            channel_partner: None,
            region: "us-east-1".to_owned(),
        },
        row_kind: RowKind::Billable,
        correction_seq: 0,
        event_count: 12,
        tokens: TokenCounts {
            input: 12_000,
            cached_input: 1_000,
            output: 4_000,
            reasoning: 500,
        },
        currency: "USD".to_owned(),
        gross_micros: gross,
        shares,
        net_micros: gross - shared,
        price_book_version: "2024-01".to_owned(),
        share_rule_version: "2024-01".to_owned(),
        source_topic: "usage.events".to_owned(),
        source_partition: i32::try_from(index % 6).unwrap_or(0),
        first_offset: index * 12,
        last_offset: index * 12 + 11,
        first_event_time_ms: window_start_ms,
        last_event_time_ms: window_start_ms + 59_000,
    };
    // The aggregator's identity of the row, as every row it writes carries.
    row.id = row_id_of(&row);
    row
}

fn batch(start: i64, count: i64) -> Batch {
    let rows = (start..start + count)
        .map(|index| {
            let row = row(index);
            let mut value = Vec::new();
            encode_aggregate(&row, &mut value);
            StoredRow::new(
                row,
                &value,
                Position {
                    topic: "billing.aggregates".to_owned(),
                    partition: 0,
                    offset: index,
                },
            )
        })
        .collect();
    Batch {
        rows,
        offsets: vec![OffsetAdvance {
            topic: "billing.aggregates".to_owned(),
            partition: 0,
            expected: (start > 0).then_some(start),
            next: start + count,
        }],
    }
}

fn env_rows(name: &str, default: i64) -> i64 {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// Rows to preload: 10 M under `cargo bench`, 10 k under `cargo test --benches`.
fn preload_rows() -> i64 {
    let bench_mode = std::env::args().any(|arg| arg == "--bench");
    env_rows(
        "TALLY_BENCH_PRELOAD_ROWS",
        if bench_mode {
            BENCH_PRELOAD_ROWS
        } else {
            TEST_PRELOAD_ROWS
        },
    )
}

fn batch_rows() -> i64 {
    env_rows("TALLY_BENCH_BATCH_ROWS", DEFAULT_BATCH_ROWS)
}

/// The preload's rows as SQL expressions of `i` (0-based) and `w` (window start),
/// in `tally_rows`' column order; `id` is `i × (16^15 / n)` as 15 hex digits and 17
/// zeros, so ids ascend with `i` and spread over the whole 32-hex-digit id space.
/// Windows lie weeks before the measured rows' windows.
fn preload_columns(id: &str, text_i: &str) -> String {
    format!(
        "{id}, {id}, w, w + 60000, 'tenant-' || {text_i}, 'atlas-mini', 'gcp', NULL, \
         'us-east-1', 'billable', 0, 12, 12000, 1000, 4000, 500, 'USD', 10000 + (i * 7919) % 1000000, \
         10000 + (i * 7919) % 1000000, '2024-01', '2024-01', 'usage.events', i % 6, i * 12, \
         i * 12 + 11, w, w + 59000, 'billing.aggregates', 1, i"
    )
}

/// Roll-ups of the preloaded rows (so that table is as large as the rows imply).
const PRELOAD_ROLLUPS: &str = "INSERT INTO tally_rollup_15m (bucket_start_ms, tenant_id, model, \
     cloud, channel_partner, region, row_kind, currency, row_count, event_count, input_tokens, \
     cached_input_tokens, output_tokens, reasoning_tokens, gross_micros, net_micros) \
     SELECT window_start_ms - window_start_ms % 900000, tenant_id, model, cloud, '', region, \
     row_kind, currency, count(*), sum(event_count), sum(input_tokens), sum(cached_input_tokens), \
     sum(output_tokens), sum(reasoning_tokens), sum(gross_micros), sum(net_micros) \
     FROM tally_rows GROUP BY 1, 2, 3, 4, 5, 6, 7, 8";

/// CPU time of a thread or process from its `/proc/…/stat` (utime + stime), in clock
/// ticks; None where /proc is not there.
fn cpu_ticks(stat_path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// Rows, wall time and CPU ticks (writer thread, database server process) so far.
#[derive(Default)]
struct Tally {
    rows: i64,
    wall: Duration,
    client_ticks: u64,
    server_ticks: u64,
}

fn bench_store(c: &mut Criterion, name: &str, location: &StoreLocation) {
    let mut store = Store::open(location, Duration::from_secs(60)).expect("open the store");
    // The store's own session is the newest tally-sink session of the database.
    let server_stat = newest_sink_session(location).map(|pid| format!("/proc/{pid}/stat"));
    let rows_per_batch = batch_rows();
    // A reused store continues after the rows an earlier run wrote.
    let written = store
        .load_offsets("billing.aggregates")
        .expect("load offsets")
        .get(&0)
        .copied()
        .unwrap_or(0);
    let next = Cell::new(written);
    let tally = std::cell::RefCell::new(Tally::default());
    let mut group = c.benchmark_group("sink_store");
    group.throughput(Throughput::Elements(
        u64::try_from(rows_per_batch).unwrap_or(0),
    ));
    group.sample_size(10);
    group.bench_function(name, |bencher| {
        bencher.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let start = next.get();
                let rows = batch(start, rows_per_batch);
                let client_before = cpu_ticks("/proc/thread-self/stat").unwrap_or(0);
                let server_before = server_stat.as_deref().and_then(cpu_ticks).unwrap_or(0);
                let began = Instant::now();
                let outcome = store.write_batch(&rows).expect("write a batch");
                let elapsed = began.elapsed();
                total += elapsed;
                let mut sums = tally.borrow_mut();
                sums.rows += rows_per_batch;
                sums.wall += elapsed;
                sums.client_ticks +=
                    cpu_ticks("/proc/thread-self/stat").unwrap_or(0) - client_before;
                sums.server_ticks +=
                    server_stat.as_deref().and_then(cpu_ticks).unwrap_or(0) - server_before;
                assert_eq!(outcome.inserted, u64::try_from(rows_per_batch).unwrap_or(0));
                next.set(start + rows_per_batch);
            }
            total
        });
    });
    group.finish();
    let sums = tally.into_inner();
    let hz = clock_ticks_per_second() as f64;
    let client_s = sums.client_ticks as f64 / hz;
    let server_s = sums.server_ticks as f64 / hz;
    let rows = sums.rows as f64;
    eprintln!(
        "{name}: {} rows in {:?} of batches ({:.0} rows/s wall); CPU: writer thread {client_s:.2} s, \
         database server {server_s:.2} s, {:.0} rows per CPU second",
        sums.rows,
        sums.wall,
        rows / sums.wall.as_secs_f64().max(f64::MIN_POSITIVE),
        rows / (client_s + server_s).max(f64::MIN_POSITIVE),
    );
}

/// The server pid of the newest `tally-sink` session on a PostgreSQL location.
fn newest_sink_session(location: &StoreLocation) -> Option<u32> {
    let StoreLocation::Postgres(url) = location else {
        return None;
    };
    let database = url.rsplit_once('/')?.1.to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .ok()?;
        let driver = tokio::spawn(connection);
        let pid = client
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2 \
                 ORDER BY backend_start DESC LIMIT 1",
                &[&database, &tally_sink::APPLICATION_NAME],
            )
            .await
            .ok()
            .flatten()
            .map(|row| row.get::<_, i32>(0));
        drop(client);
        let _ = driver.await;
        u32::try_from(pid?).ok()
    })
}

fn sqlite(c: &mut Criterion) {
    let dir = match std::env::var("TALLY_BENCH_DIR") {
        Ok(path) => tempfile::tempdir_in(path).expect("temp dir"),
        Err(_) => tempfile::tempdir().expect("temp dir"),
    };
    let path = dir.path().join("bench.db");
    let location = StoreLocation::Sqlite(path.display().to_string());
    // Migrate through the store, then preload with SQL.
    drop(Store::open(&location, Duration::from_secs(60)).expect("open the store"));
    let preload = preload_rows();
    let began = Instant::now();
    let connection = rusqlite::Connection::open(&path).expect("open sqlite");
    connection
        .execute_batch(&format!(
            "PRAGMA synchronous = OFF; BEGIN; \
             WITH RECURSIVE g(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM g WHERE i + 1 < {preload}) \
             INSERT INTO tally_rows SELECT {} FROM (SELECT i, 1700000000000 + (i / 720) * 60000 AS w FROM g); \
             {PRELOAD_ROLLUPS}; COMMIT; ANALYZE;",
            preload_columns(
                &format!("printf('%015x', i * {}) || '00000000000000000'", ID_SPACE / preload.max(1)),
                "(i % 60)"
            )
        ))
        .expect("preload sqlite");
    drop(connection);
    eprintln!("sqlite: preloaded {preload} rows in {:?}", began.elapsed());
    bench_store(c, "sqlite", &location);
}

fn postgres(c: &mut Criterion) {
    let url = match std::env::var("TALLY_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "sink_store needs PostgreSQL: set TALLY_TEST_PG_URL (deploy/local/postgres.sh start)"
        ),
    };
    // TALLY_BENCH_PG_DATABASE names a database an earlier run preloaded (it printed
    // the name) to measure again without the preload, e.g. after a server setting.
    let reuse = std::env::var("TALLY_BENCH_PG_DATABASE").ok();
    let suffix: u64 = rand::random();
    let name = reuse
        .clone()
        .unwrap_or_else(|| format!("bench_{suffix:016x}"));
    let (base, _) = url.rsplit_once('/').expect("a database in the URL");
    let bench_url = format!("{base}/{name}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let execute = |url: &str, sql: &str| {
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            let driver = tokio::spawn(connection);
            client.batch_execute(sql).await.expect(sql);
            drop(client);
            let _ = driver.await;
        });
    };
    let location = StoreLocation::Postgres(bench_url.clone());
    if reuse.is_some() {
        eprintln!("postgres: measuring in the existing database {name}");
        bench_store(c, "postgres", &location);
        return;
    }
    execute(&url, &format!("CREATE DATABASE {name}"));
    drop(Store::open(&location, Duration::from_secs(60)).expect("open the store"));
    let preload = preload_rows();
    let began = Instant::now();
    execute(
        &bench_url,
        &format!(
            "INSERT INTO tally_rows SELECT {} FROM (SELECT i, 1700000000000 + (i / 720) * 60000 AS w \
             FROM generate_series(0::bigint, {preload} - 1) AS i) AS g; {PRELOAD_ROLLUPS}",
            preload_columns(
                &format!(
                    "lpad(to_hex(i * {}), 15, '0') || '00000000000000000'",
                    ID_SPACE / preload.max(1)
                ),
                "(i % 60)::text"
            )
        ),
    );
    // VACUUM runs outside a transaction block: one statement per call.
    execute(&bench_url, "VACUUM ANALYZE tally_rows");
    execute(&bench_url, "VACUUM ANALYZE tally_rollup_15m");
    eprintln!(
        "postgres: preloaded {preload} rows into database {name} in {:?}",
        began.elapsed()
    );
    bench_store(c, "postgres", &location);
}

criterion_group!(benches, sqlite, postgres);
criterion_main!(benches);
