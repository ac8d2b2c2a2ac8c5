//! Row ids stay unique across the whole billing store although its key starts with
//! the window (`(window_start_ms, id)`, schema migration 3), in SQLite and in a real
//! PostgreSQL:
//! - a foreign row (its id is not tally's identity of its content) that reuses a
//!   stored row's id in another window is a conflict, and so is a derived row whose
//!   id a foreign row in another window took first;
//! - the same row again is a no-op, whichever path finds it (the foreign-id scan, the
//!   key, PostgreSQL's fallback from COPY to the staging table), and a batch that
//!   mixes new and known rows adds only the new ones to the roll-ups;
//! - migration 3 keeps a version-2 store's rows and shares and records its foreign ids.
//!
//! Expected roll-ups are sums of the gross amounts this file assigns to its rows.

mod support;

use std::time::Duration;

use tally_core::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use tally_core::codec::encode_aggregate;
use tally_core::event::{Cloud, TokenCounts};
use tally_core::identity::row_id_of;
use tally_sink::rows::{Position, StoredRow, digest_hex};
use tally_sink::{Batch, BatchOutcome, OffsetAdvance, SinkError, Store, StoreLocation};

const TOPIC: &str = "billing.aggregates";
const BASE_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00Z
const MINUTE_MS: i64 = 60_000;

/// A row at `minute` for `tenant` with `gross` micro-units and a 20 % share, id unset.
fn content(tenant: &str, minute: i64, gross: i64) -> BillingAggregate {
    let start = BASE_MS + minute * MINUTE_MS;
    BillingAggregate {
        id: String::new(),
        window_start_ms: start,
        window_end_ms: start + MINUTE_MS,
        dims: Dims {
            tenant_id: tenant.to_owned(),
            model: "atlas-mini".to_owned(),
            cloud: Cloud::Azure,
            channel_partner: None,
            region: "eu-west-1".to_owned(),
        },
        row_kind: RowKind::Billable,
        correction_seq: 0,
        event_count: 2,
        tokens: TokenCounts {
            input: 100,
            cached_input: 0,
            output: 40,
            reasoning: 0,
        },
        currency: "USD".to_owned(),
        gross_micros: gross,
        shares: vec![PartnerShare {
            beneficiary: "microsoft".to_owned(),
            basis_points: 2_000,
            amount_micros: gross / 5,
        }],
        net_micros: gross - gross / 5,
        price_book_version: "2026-01".to_owned(),
        share_rule_version: "2026-01".to_owned(),
        source_topic: "usage.events".to_owned(),
        source_partition: 0,
        first_offset: minute * 10,
        last_offset: minute * 10 + 1,
        first_event_time_ms: start,
        last_event_time_ms: start + 1_000,
    }
}

fn derived(tenant: &str, minute: i64, gross: i64) -> BillingAggregate {
    let mut row = content(tenant, minute, gross);
    row.id = row_id_of(&row);
    row
}

fn with_id(mut row: BillingAggregate, id: &str) -> BillingAggregate {
    row.id = id.to_owned();
    row
}

fn encoded(row: &BillingAggregate) -> Vec<u8> {
    let mut value = Vec::new();
    encode_aggregate(row, &mut value);
    value
}

/// Writes `rows` read at offsets `from..`, expecting the store's offset at `from`.
fn write(
    store: &mut Store,
    from: i64,
    rows: &[&BillingAggregate],
) -> Result<BatchOutcome, SinkError> {
    let stored = rows
        .iter()
        .zip(from..)
        .map(|(row, offset)| {
            StoredRow::new(
                (*row).clone(),
                &encoded(row),
                Position {
                    topic: TOPIC.to_owned(),
                    partition: 0,
                    offset,
                },
            )
        })
        .collect();
    let count = i64::try_from(rows.len()).expect("count");
    store.write_batch(&Batch {
        rows: stored,
        offsets: vec![OffsetAdvance {
            topic: TOPIC.to_owned(),
            partition: 0,
            expected: (from > 0).then_some(from),
            next: from + count,
        }],
    })
}

fn conflict_id(result: Result<BatchOutcome, SinkError>) -> String {
    match result {
        Err(SinkError::Conflict { id, .. }) => id,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

/// What the checks read back: (rows, sorted foreign ids, Σ gross of the roll-ups,
/// Σ share roll-ups, shares whose window differs from their row's, next offset).
#[derive(Debug, PartialEq, Eq)]
struct Readback {
    rows: i64,
    foreign_ids: Vec<String>,
    rollup_gross: i64,
    rollup_shares: i64,
    misplaced_shares: i64,
    next_offset: i64,
}

const READBACK: [&str; 6] = [
    "SELECT count(*) FROM tally_rows",
    "SELECT id FROM tally_foreign_row_ids ORDER BY id",
    "SELECT coalesce(sum(gross_micros), 0) FROM tally_rollup_15m",
    "SELECT coalesce(sum(amount_micros), 0) FROM tally_rollup_share_15m",
    "SELECT count(*) FROM tally_row_shares s JOIN tally_rows r ON r.id = s.row_id \
     WHERE r.window_start_ms <> s.window_start_ms",
    "SELECT coalesce(max(next_offset), 0) FROM tally_sink_offsets",
];

fn readback(location: &StoreLocation) -> Readback {
    match location {
        StoreLocation::Sqlite(path) => {
            let db = rusqlite::Connection::open(path).expect("open sqlite");
            let int = |sql: &str| {
                db.query_row(sql, [], |row| row.get::<_, i64>(0))
                    .expect(sql)
            };
            let mut ids = db.prepare(READBACK[1]).expect("prepare");
            let foreign_ids = ids
                .query_map([], |row| row.get::<_, String>(0))
                .expect("query")
                .collect::<Result<Vec<_>, _>>()
                .expect("ids");
            Readback {
                rows: int(READBACK[0]),
                foreign_ids,
                rollup_gross: int(READBACK[2]),
                rollup_shares: int(READBACK[3]),
                misplaced_shares: int(READBACK[4]),
                next_offset: int(READBACK[5]),
            }
        }
        StoreLocation::Postgres(url) => support::sink::pg_runtime().block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            let driver = tokio::spawn(connection);
            let mut ints = Vec::new();
            for sql in [
                READBACK[0],
                READBACK[2],
                READBACK[3],
                READBACK[4],
                READBACK[5],
            ] {
                let row = client.query_one(sql, &[]).await.expect(sql);
                // sum() of bigint is numeric in PostgreSQL: read it as text.
                let value = match row.try_get::<_, i64>(0) {
                    Ok(value) => value,
                    Err(_) => {
                        let cast = client
                            .query_one(&format!("SELECT ({sql})::bigint"), &[])
                            .await
                            .expect(sql);
                        cast.get(0)
                    }
                };
                ints.push(value);
            }
            let foreign_ids = client
                .query(READBACK[1], &[])
                .await
                .expect("ids")
                .iter()
                .map(|row| row.get::<_, String>(0))
                .collect();
            drop(client);
            let _ = driver.await;
            Readback {
                rows: ints[0],
                foreign_ids,
                rollup_gross: ints[1],
                rollup_shares: ints[2],
                misplaced_shares: ints[3],
                next_offset: ints[4],
            }
        }),
    }
}

fn ids_stay_unique_across_windows(location: &StoreLocation) {
    let mut store = Store::open(location, Duration::from_secs(30)).expect("open the store");
    let d1 = derived("tenant-a", 0, 1_000_000);
    let d2 = derived("tenant-b", 1, 2_000_000);
    let f1 = with_id(content("tenant-c", 0, 300_000), "foreign-1");
    let outcome = write(&mut store, 0, &[&d1, &d2, &f1]).expect("first batch");
    assert_eq!((outcome.inserted, outcome.identical), (3, 0));
    let after_first = Readback {
        rows: 3,
        foreign_ids: vec!["foreign-1".to_owned()],
        rollup_gross: 3_300_000,
        rollup_shares: 200_000 + 400_000 + 60_000,
        misplaced_shares: 0,
        next_offset: 3,
    };
    assert_eq!(readback(location), after_first);

    // A foreign row reusing d1's id five minutes later: a conflict, nothing written.
    let f2 = with_id(content("tenant-a", 5, 1_000_000), &d1.id);
    assert_eq!(conflict_id(write(&mut store, 3, &[&f2])), d1.id);
    assert_eq!(readback(location), after_first, "the store is unchanged");

    // A foreign row takes the id of a derived row not stored yet, two minutes away
    // from that row's window; the derived row then conflicts with it.
    let d3 = derived("tenant-d", 7, 700_000);
    let f3 = with_id(content("tenant-e", 9, 900_000), &d3.id);
    let outcome = write(&mut store, 3, &[&f3]).expect("a new foreign row");
    assert_eq!((outcome.inserted, outcome.identical), (1, 0));
    assert_eq!(conflict_id(write(&mut store, 4, &[&d3])), d3.id);

    // The same rows again: no-ops (f1 found by the id scan, d2 by its key).
    let outcome = write(&mut store, 4, &[&f1, &d2]).expect("identical rows");
    assert_eq!((outcome.inserted, outcome.identical), (0, 2));

    // New and known rows in one batch: only the new ones reach the roll-ups.
    let d4 = derived("tenant-a", 20, 40_000);
    let d5 = derived("tenant-f", 21, 50_000);
    let outcome = write(&mut store, 6, &[&d4, &d1, &d5]).expect("a mixed batch");
    assert_eq!((outcome.inserted, outcome.identical), (2, 1));

    // d4's key with other content: a conflict.
    let mut changed = d4.clone();
    changed.gross_micros += 1;
    changed.net_micros += 1;
    assert_eq!(conflict_id(write(&mut store, 9, &[&changed])), d4.id);

    let mut foreign_ids = vec!["foreign-1".to_owned(), d3.id.clone()];
    foreign_ids.sort();
    assert_eq!(
        readback(location),
        Readback {
            rows: 6,
            foreign_ids,
            rollup_gross: 3_300_000 + 900_000 + 40_000 + 50_000,
            rollup_shares: 660_000 + 180_000 + 8_000 + 10_000,
            misplaced_shares: 0,
            next_offset: 9,
        }
    );
}

#[test]
fn ids_stay_unique_across_windows_in_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let location = StoreLocation::Sqlite(dir.path().join("billing.db").display().to_string());
    ids_stay_unique_across_windows(&location);
}

#[test]
fn ids_stay_unique_across_windows_in_postgres() {
    let location = StoreLocation::Postgres(support::sink::pg_fresh_database());
    ids_stay_unique_across_windows(&location);
}

/// An `INSERT` of `row` into the version-2 `tally_rows` and its shares, as literal
/// SQL both databases accept.
fn v2_insert(row: &BillingAggregate, offset: i64) -> String {
    let text = |value: &str| format!("'{}'", value.replace('\'', "''"));
    let mut sql = format!(
        "INSERT INTO tally_rows VALUES ({}, {}, {}, {}, {}, {}, {}, NULL, {}, {}, {}, {}, {}, {}, {}, {}, \
         {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, 0, {});",
        text(&row.id),
        text(&digest_hex(&encoded(row))),
        row.window_start_ms,
        row.window_end_ms,
        text(&row.dims.tenant_id),
        text(&row.dims.model),
        text(row.dims.cloud.as_str()),
        text(&row.dims.region),
        text(row.row_kind.as_str()),
        row.correction_seq,
        row.event_count,
        row.tokens.input,
        row.tokens.cached_input,
        row.tokens.output,
        row.tokens.reasoning,
        text(&row.currency),
        row.gross_micros,
        row.net_micros,
        text(&row.price_book_version),
        text(&row.share_rule_version),
        text(&row.source_topic),
        row.source_partition,
        row.first_offset,
        row.last_offset,
        row.first_event_time_ms,
        row.last_event_time_ms,
        text(TOPIC),
        offset,
    );
    for share in &row.shares {
        sql.push_str(&format!(
            "INSERT INTO tally_row_shares (row_id, beneficiary, basis_points, amount_micros) \
             VALUES ({}, {}, {}, {});",
            text(&row.id),
            text(&share.beneficiary),
            share.basis_points,
            share.amount_micros
        ));
    }
    sql
}

fn execute(location: &StoreLocation, sql: &str) {
    match location {
        StoreLocation::Sqlite(path) => rusqlite::Connection::open(path)
            .expect("open sqlite")
            .execute_batch(sql)
            .expect(sql),
        StoreLocation::Postgres(url) => support::sink::pg_runtime().block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            let driver = tokio::spawn(connection);
            client.batch_execute(sql).await.expect(sql);
            drop(client);
            let _ = driver.await;
        }),
    }
}

fn migration_3_keeps_rows_and_records_foreign_ids(location: &StoreLocation) {
    drop(
        Store::open_at_schema_version(location, Duration::from_secs(30), 2)
            .expect("a version-2 store"),
    );
    let legacy_derived = derived("tenant-a", 3, 500_000);
    let legacy_foreign = with_id(content("tenant-b", 4, 600_000), "legacy-1");
    execute(
        location,
        &format!(
            "{}{}",
            v2_insert(&legacy_derived, 0),
            v2_insert(&legacy_foreign, 1)
        ),
    );
    let mut store = Store::open(location, Duration::from_secs(30)).expect("migrate to 3");
    let readback_now = readback(location);
    assert_eq!(readback_now.rows, 2);
    assert_eq!(readback_now.foreign_ids, vec!["legacy-1".to_owned()]);
    assert_eq!(readback_now.misplaced_shares, 0);

    // The migrated store checks ids like a new one.
    let reuse = with_id(content("tenant-c", 30, 1), &legacy_derived.id);
    assert_eq!(
        conflict_id(write(&mut store, 0, &[&reuse])),
        legacy_derived.id
    );
    let outcome = write(&mut store, 0, &[&legacy_derived, &legacy_foreign]).expect("same rows");
    assert_eq!((outcome.inserted, outcome.identical), (0, 2));
}

#[test]
fn migration_3_keeps_rows_and_records_foreign_ids_in_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let location = StoreLocation::Sqlite(dir.path().join("billing.db").display().to_string());
    migration_3_keeps_rows_and_records_foreign_ids(&location);
}

#[test]
fn migration_3_keeps_rows_and_records_foreign_ids_in_postgres() {
    let location = StoreLocation::Postgres(support::sink::pg_fresh_database());
    migration_3_keeps_rows_and_records_foreign_ids(&location);
}
