//! Zombie sinks: an instance that lost its partitions must not write.
//!
//! - At the store: two writers that both believe they own a partition at the same
//!   offset; the second's transaction fails on the offset check and stores nothing
//!   (PostgreSQL and SQLite).
//! - End to end: sink A is SIGSTOPped holding an open batch, sink B of the same group
//!   takes its partitions once A's session expires and stores the same rows; after
//!   SIGCONT, A's batch fails on the offset check and A exits non-zero (or, if
//!   librdkafka hands A the revocation first, A drops the batch); A writes nothing
//!   and the store equals the topic, every row once.

mod support;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::eos::{create_topics, read_committed};
use support::sink::{
    SinkProcess, assert_store_equals, pg_fresh_database, pg_row_count, pg_snapshot,
    produce_synthetic_rows, sink_config, synthetic_row, wait_exit, wait_for_rows,
};
use support::{TestTopics, bootstrap, rand_name};
use tally_core::codec::encode_aggregate;
use tally_sink::rows::{Position, StoredRow};
use tally_sink::{Batch, OffsetAdvance, SinkError, Store, StoreLocation};

fn batch(indexes: std::ops::Range<i64>, expected: Option<i64>) -> Batch {
    let rows = indexes
        .clone()
        .map(|index| {
            let row = synthetic_row(index);
            let mut value = Vec::new();
            encode_aggregate(&row, &mut value);
            StoredRow::new(
                row,
                &value,
                Position {
                    topic: "zombie-test".to_owned(),
                    partition: 0,
                    offset: index,
                },
            )
        })
        .collect();
    Batch {
        rows,
        offsets: vec![OffsetAdvance {
            topic: "zombie-test".to_owned(),
            partition: 0,
            expected,
            next: indexes.end,
        }],
    }
}

fn row_count(store: &mut Store) -> i64 {
    store
        .rollup_lines(i64::MIN, i64::MAX)
        .expect("roll-ups")
        .iter()
        .map(|(_, sums)| sums.rows)
        .sum()
}

fn fenced_at_the_store(location: &StoreLocation) {
    let mut owner = Store::open(location, Duration::from_secs(10)).expect("open");
    let mut zombie = Store::open(location, Duration::from_secs(10)).expect("open");
    // Both start the partition from nothing: the first insert wins, the second fails.
    owner
        .write_batch(&batch(0..10, None))
        .expect("owner's first batch");
    let error = zombie
        .write_batch(&batch(0..5, None))
        .expect_err("the zombie's insert of the offset must fail");
    assert!(
        matches!(
            error,
            SinkError::OffsetMismatch {
                expected: None,
                found: Some(10),
                ..
            }
        ),
        "{error}"
    );
    // Both believe the partition is at 10; the owner moves on, the zombie is fenced.
    owner
        .write_batch(&batch(10..20, Some(10)))
        .expect("owner's second batch");
    let error = zombie
        .write_batch(&batch(10..15, Some(10)))
        .expect_err("the zombie's update of the offset must fail");
    assert!(
        matches!(
            error,
            SinkError::OffsetMismatch {
                expected: Some(10),
                found: Some(20),
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        owner.load_offsets("zombie-test").expect("offsets").get(&0),
        Some(&20)
    );
    assert_eq!(row_count(&mut owner), 20, "rows 0..20, each once");
}

#[test]
fn a_zombie_writer_is_fenced_by_the_offset_check_in_postgres_and_sqlite() {
    fenced_at_the_store(&StoreLocation::Postgres(pg_fresh_database()));
    let dir = tempfile::tempdir().expect("temp dir");
    fenced_at_the_store(&StoreLocation::Sqlite(
        dir.path().join("billing.db").display().to_string(),
    ));
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

#[test]
fn a_stopped_sink_whose_partitions_moved_on_is_fenced_and_the_store_stays_exact() {
    const PARTITIONS: i32 = 2;
    const PHASE_ROWS: i64 = 500;
    let started = Instant::now();
    let topics = TestTopics::with_prefix("sink-zombie");
    create_topics(&bootstrap(), &[&topics.billing_aggregates], PARTITIONS);
    let url = pg_fresh_database();
    let dir = tempfile::tempdir().expect("temp dir");
    // A long max.poll.interval.ms: A loses its partitions only by its session expiring
    // while it is stopped, so after SIGCONT it first acts on its open batch.
    let config = sink_config(
        dir.path(),
        "sink-zombie",
        &topics,
        "",
        &[
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "500"),
            ("max.poll.interval.ms", "60000"),
        ],
    );
    let group = rand_name("sink-zombie");

    // Phase 1: A stores 500 rows.
    produce_synthetic_rows(&topics.billing_aggregates, PARTITIONS, 0..PHASE_ROWS);
    let mut a = SinkProcess::spawn(&config, &url, &group, &["--batch-max-age-ms", "4000"]);
    wait_for_rows("phase 1", PHASE_ROWS, || pg_row_count(&url), &mut a);

    // Phase 2: A reads 500 more into a batch that waits 4 s; it is stopped before.
    produce_synthetic_rows(
        &topics.billing_aggregates,
        PARTITIONS,
        PHASE_ROWS..2 * PHASE_ROWS,
    );
    thread::sleep(Duration::from_millis(1_500));
    signal(a.child.id(), "STOP");
    assert_eq!(
        pg_row_count(&url),
        PHASE_ROWS,
        "A wrote phase 2 before the stop"
    );

    // B takes the partitions over once A's session expires and stores phase 2.
    let mut b = SinkProcess::spawn(&config, &url, &group, &["--batch-max-age-ms", "300"]);
    wait_for_rows(
        "phase 2 by B",
        2 * PHASE_ROWS,
        || pg_row_count(&url),
        &mut b,
    );
    let before = pg_snapshot(&url);

    // A wakes up with its stale batch. Usually its poll returns first and the batch
    // fails on the offset check: A stops, having written nothing. If librdkafka hands
    // A the revocation first (it notices the expired session on its own clock), A
    // drops the batch and rejoins instead; that must not write either.
    signal(a.child.id(), "CONT");
    let until = Instant::now() + Duration::from_secs(5);
    let a_exit = loop {
        if let Some(status) = a.child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > until {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    if let Some(status) = a_exit {
        assert!(
            !status.success(),
            "a fenced zombie exits non-zero, A exited {status}"
        );
    }
    assert_eq!(pg_snapshot(&url), before, "the zombie wrote nothing");
    if a_exit.is_none() {
        signal(a.child.id(), "TERM");
        let exit = wait_exit(&mut a.child, Duration::from_secs(30));
        assert!(exit.success(), "A after SIGTERM: {exit}");
    }

    signal(b.child.id(), "TERM");
    let b_exit = wait_exit(&mut b.child, Duration::from_secs(30));
    assert!(b_exit.success(), "B after SIGTERM: {b_exit}");
    let records = read_committed(&bootstrap(), &topics.billing_aggregates, PARTITIONS);
    assert_eq!(records.len() as i64, 2 * PHASE_ROWS);
    assert_store_equals(&pg_snapshot(&url), &records);
    eprintln!(
        "zombie test took {:?}; A after SIGCONT: {}",
        started.elapsed(),
        a_exit.map_or("dropped its batch on the revocation".to_owned(), |status| {
            format!("fenced by the offset check, exited {status}")
        })
    );
}
