//! Billing store write throughput: rows/s through the sink's batch path
//! ([`tally_sink::Store::write_batch`]: offsets compare-and-set, rows with
//! `ON CONFLICT (id) DO NOTHING`, shares, 15-minute roll-up and share roll-up upserts,
//! one transaction per batch) into SQLite and PostgreSQL.
//!
//! Each iteration writes one batch of 5 000 new rows (60 tenants × 4 models × 3 clouds,
//! one-minute windows, so a batch touches a few hundred roll-up lines), continuing the
//! offsets of the previous batch. Building the batch is not timed. The store grows over
//! the run; the figures are for a store of at most a few million rows (the 10 M-row
//! figure is later work).
//!
//! `cargo bench --bench sink_store`; under `cargo test --benches` every case runs once.
//! Needs `TALLY_TEST_PG_URL` (deploy/local/postgres.sh start); the bench creates its own
//! database there and an SQLite file in a temp dir.

use std::cell::Cell;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tally_core::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use tally_core::codec::encode_aggregate;
use tally_core::event::{Cloud, TokenCounts};
use tally_sink::rows::{Position, StoredRow};
use tally_sink::{Batch, OffsetAdvance, Store, StoreLocation};

const BATCH_ROWS: i64 = 5_000;
const MODELS: [&str; 4] = [
    "atlas-large",
    "atlas-mini",
    "atlas-reasoning",
    "atlas-embed",
];
const CLOUDS: [Cloud; 3] = [Cloud::Aws, Cloud::Azure, Cloud::Gcp];

fn row(index: i64) -> BillingAggregate {
    let gross = 10_000 + (index * 7_919) % 1_000_000;
    let cloud = CLOUDS[usize::try_from(index % 3).unwrap_or(0)];
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
    BillingAggregate {
        id: format!("bench-{index:012}"),
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
    }
}

fn batch(start: i64) -> Batch {
    let rows = (start..start + BATCH_ROWS)
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
            next: start + BATCH_ROWS,
        }],
    }
}

fn bench_store(c: &mut Criterion, name: &str, location: &StoreLocation) {
    let mut store = Store::open(location, Duration::from_secs(60)).expect("open the store");
    let next = Cell::new(0_i64);
    let mut group = c.benchmark_group("sink_store");
    group.throughput(Throughput::Elements(u64::try_from(BATCH_ROWS).unwrap_or(0)));
    group.sample_size(10);
    group.bench_function(name, |bencher| {
        bencher.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let start = next.get();
                let rows = batch(start);
                let began = Instant::now();
                let outcome = store.write_batch(&rows).expect("write a batch");
                total += began.elapsed();
                assert_eq!(outcome.inserted, u64::try_from(BATCH_ROWS).unwrap_or(0));
                next.set(start + BATCH_ROWS);
            }
            total
        });
    });
    group.finish();
}

fn sqlite(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let location = StoreLocation::Sqlite(dir.path().join("bench.db").display().to_string());
    bench_store(c, "sqlite_5000_row_batches", &location);
}

fn postgres(c: &mut Criterion) {
    let url = match std::env::var("TALLY_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "sink_store needs PostgreSQL: set TALLY_TEST_PG_URL (deploy/local/postgres.sh start)"
        ),
    };
    let suffix: u64 = rand::random();
    let name = format!("bench_{suffix:016x}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
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
    let (base, _) = url.rsplit_once('/').expect("a database in the URL");
    bench_store(
        c,
        "postgres_5000_row_batches",
        &StoreLocation::Postgres(format!("{base}/{name}")),
    );
}

criterion_group!(benches, sqlite, postgres);
criterion_main!(benches);
