//! A PostgreSQL outage longer than the sink's `max.poll.interval.ms`: the sink
//! neither exits nor skips; it retries (counted), pauses its partitions while it keeps
//! polling, and after `postgres.sh resume` finishes with the store exact.
//!
//! Freezes the shared test server (SIGSTOP, `deploy/local/postgres.sh pause`), so it
//! lives in its own test binary: cargo runs test binaries one after another.

mod support;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::eos::{create_topics, free_port, read_committed};
use support::ops::http_get;
use support::prometheus::{parse, scrape};
use support::sink::{
    RUN_TIMEOUT, SinkProcess, assert_store_equals, pg_fresh_database, pg_row_count, pg_snapshot,
    produce_synthetic_rows, sink_config, wait_exit, wait_for_rows,
};
use support::{TestTopics, bootstrap, rand_name};

const PARTITIONS: i32 = 2;
const ROWS: i64 = 3_000;
/// Longer than the sink's max.poll.interval.ms (6 s below).
const OUTAGE: Duration = Duration::from_secs(9);

fn postgres_sh(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/postgres.sh");
    let status = Command::new(script)
        .arg(action)
        .status()
        .expect("run postgres.sh");
    assert!(status.success(), "postgres.sh {action} failed: {status}");
}

/// Resumes the server when dropped, so a failing assertion never leaves it frozen.
struct Paused;

impl Paused {
    fn start() -> Paused {
        postgres_sh("pause");
        Paused
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        postgres_sh("resume");
    }
}

#[test]
fn a_database_outage_longer_than_the_poll_interval_loses_and_skips_nothing() {
    let started = Instant::now();
    let topics = TestTopics::with_prefix("sink-outage");
    create_topics(&bootstrap(), &[&topics.billing_aggregates], PARTITIONS);
    produce_synthetic_rows(&topics.billing_aggregates, PARTITIONS, 0..ROWS);
    let records = read_committed(&bootstrap(), &topics.billing_aggregates, PARTITIONS);
    assert_eq!(records.len() as i64, ROWS);

    let url = pg_fresh_database();
    let dir = tempfile::tempdir().expect("temp dir");
    let listen = format!("127.0.0.1:{}", free_port());
    let config = sink_config(
        dir.path(),
        "sink-outage",
        &topics,
        &listen,
        &[
            ("max.poll.interval.ms", "6000"),
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "1000"),
            ("max.partition.fetch.bytes", "2048"),
            ("fetch.wait.max.ms", "20"),
            ("queued.min.messages", "1"),
            ("fetch.queue.backoff.ms", "20"),
        ],
    );
    let mut sink = SinkProcess::spawn(
        &config,
        &url,
        &rand_name("sink-outage"),
        &[
            "--batch-max-rows",
            "20",
            "--db-timeout-ms",
            "1000",
            "--retry-max-backoff-ms",
            "1000",
        ],
    );
    let progress_started = Instant::now();
    while pg_row_count(&url) == 0 {
        assert!(
            progress_started.elapsed() < RUN_TIMEOUT,
            "no rows stored before the outage"
        );
        thread::sleep(Duration::from_millis(20));
    }

    let at_pause;
    {
        let _paused = Paused::start();
        thread::sleep(OUTAGE);
        assert!(
            sink.child.try_wait().expect("wait").is_none(),
            "the sink exited during the outage"
        );
        let metrics = parse(&scrape(&listen));
        let retries = metrics.sum("tally_sink_db_retries_total").unwrap_or(0.0);
        assert!(retries >= 2.0, "retries during the outage: {retries}");
        assert_eq!(metrics.sum("tally_sink_paused"), Some(1.0), "paused");
        // Not ready without its database, but alive: liveness never asks the database.
        let (status, body) = http_get(&listen, "/readyz").expect("readyz answers");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("database unavailable"), "{body}");
        let (status, body) = http_get(&listen, "/healthz").expect("healthz answers");
        assert_eq!(status, 200, "{body}");
        at_pause = metrics.sum("tally_sink_rows_written_total").unwrap_or(0.0);
    }
    assert!(
        at_pause < ROWS as f64,
        "the outage must land mid-load: {at_pause} rows written before it"
    );

    wait_for_rows("after the outage", ROWS, || pg_row_count(&url), &mut sink);
    let metrics = parse(&scrape(&listen));
    assert_eq!(metrics.sum("tally_sink_paused"), Some(0.0), "resumed");
    assert_eq!(
        http_get(&listen, "/readyz").map(|(status, _)| status),
        Some(200),
        "ready again once the database answers"
    );
    assert_eq!(
        metrics.sum("tally_sink_conflicts_total").unwrap_or(0.0),
        0.0
    );
    let pid = sink.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let exit = wait_exit(&mut sink.child, Duration::from_secs(30));
    assert!(exit.success(), "sink exit: {exit}");
    assert_store_equals(&pg_snapshot(&url), &records);
    eprintln!(
        "outage test took {:?} ({at_pause} rows before the outage)",
        started.elapsed()
    );
}
