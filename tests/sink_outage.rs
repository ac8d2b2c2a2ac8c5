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

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use support::eos::{create_topics, free_port, kafka_client, read_committed};
use support::prometheus::{parse, scrape};
use support::sink::{
    RUN_TIMEOUT, SinkProcess, assert_store_equals, pg_fresh_database, pg_row_count, pg_snapshot,
    sink_config, wait_exit, wait_for_rows,
};
use support::{TestTopics, bootstrap, rand_name};
use tally_core::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use tally_core::codec::encode_aggregate;
use tally_core::event::{Cloud, TokenCounts};

const PARTITIONS: i32 = 2;
const ROWS: i64 = 3_000;
/// Longer than the sink's max.poll.interval.ms (6 s below).
const OUTAGE: Duration = Duration::from_secs(9);

fn row(index: i64) -> BillingAggregate {
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
    let base = rand_name("sink-outage");
    let topics = TestTopics {
        usage_events: format!("{base}.usage.events"),
        billing_aggregates: format!("{base}.billing.aggregates"),
        late: format!("{base}.usage.late"),
        dlq: format!("{base}.usage.dlq"),
    };
    create_topics(&bootstrap(), &[&topics.billing_aggregates], PARTITIONS);
    let producer: BaseProducer = kafka_client(&bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for index in 0..ROWS {
        let mut value = Vec::new();
        encode_aggregate(&row(index), &mut value);
        let partition = i32::try_from(index % i64::from(PARTITIONS)).expect("small");
        producer
            .send(
                BaseRecord::<[u8], [u8]>::to(&topics.billing_aggregates)
                    .partition(partition)
                    .payload(&value),
            )
            .expect("enqueue");
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
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
