//! Row identity in the billing store, against a real broker: the same row again is a
//! no-op, the same id with other content stops the sink with the conflict error and
//! metric and leaves the store unchanged, and a record that is not a BillingAggregate
//! stops it with an error naming topic, partition and offset.
//!
//! The sink runs in this process (SQLite store in a temp dir) so the test can read its
//! metrics from an installed Prometheus recorder after it stopped.

mod support;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use support::eos::{create_topics, kafka_client};
use support::prometheus::parse;
use support::{bootstrap, rand_name};
use tally_core::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use tally_core::codec::encode_aggregate;
use tally_core::config::Config;
use tally_core::event::{Cloud, TokenCounts};
use tally_sink::run::ExitReason;
use tally_sink::{SinkArgs, SinkError, SinkSettings, SinkSummary, StoreArgs};

fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("install the metrics recorder")
    })
}

fn row(id: &str, minute: i64, gross_micros: i64) -> BillingAggregate {
    let share = gross_micros / 5;
    BillingAggregate {
        id: id.to_owned(),
        window_start_ms: 1_767_225_600_000 + minute * 60_000,
        window_end_ms: 1_767_225_600_000 + (minute + 1) * 60_000,
        dims: Dims {
            tenant_id: "tenant-a".to_owned(),
            model: "atlas-mini".to_owned(),
            cloud: Cloud::Aws,
            channel_partner: None,
            region: "us-east-1".to_owned(),
        },
        row_kind: RowKind::Billable,
        correction_seq: 0,
        event_count: 3,
        tokens: TokenCounts {
            input: 100,
            cached_input: 10,
            output: 50,
            reasoning: 0,
        },
        currency: "USD".to_owned(),
        gross_micros,
        shares: vec![PartnerShare {
            beneficiary: "aws".to_owned(),
            basis_points: 2000,
            amount_micros: share,
        }],
        net_micros: gross_micros - share,
        price_book_version: "2024-01".to_owned(),
        share_rule_version: "2024-01".to_owned(),
        source_topic: "usage.events".to_owned(),
        source_partition: 0,
        first_offset: minute * 10,
        last_offset: minute * 10 + 2,
        first_event_time_ms: 1_767_225_600_000 + minute * 60_000,
        last_event_time_ms: 1_767_225_600_000 + minute * 60_000 + 500,
    }
}

fn encoded(row: &BillingAggregate) -> Vec<u8> {
    let mut out = Vec::new();
    encode_aggregate(row, &mut out);
    out
}

/// Produces `values` to partition 0 of `topic`, in order.
fn produce(topic: &str, values: &[Vec<u8>]) {
    let producer: BaseProducer = kafka_client(&bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for value in values {
        producer
            .send(
                BaseRecord::<[u8], [u8]>::to(topic)
                    .partition(0)
                    .payload(value),
            )
            .expect("enqueue");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

fn settings(topic: &str, database: &str) -> SinkSettings {
    let mut config = Config::default();
    config.kafka.bootstrap_servers = bootstrap();
    config.topics.billing_aggregates = topic.to_owned();
    let args = SinkArgs {
        store: StoreArgs::new(database),
        group_id: Some(rand_name("sink-identity")),
        batch_max_rows: Some(100),
        batch_max_age_ms: Some(100),
        db_timeout_ms: Some(5_000),
        retry_max_backoff_ms: Some(1_000),
        exit_after_idle_ms: Some(800),
    };
    SinkSettings::from_args(config, &args).expect("valid settings")
}

/// Runs the sink in a thread until it stops by itself (bounded).
fn run_sink(settings: SinkSettings) -> Result<SinkSummary, SinkError> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&shutdown);
    let handle = std::thread::spawn(move || tally_sink::run(settings, flag));
    let started = std::time::Instant::now();
    while !handle.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the sink did not stop within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    handle.join().expect("sink thread panicked")
}

/// Everything the store holds, as text lines, read with the test's own SQL.
fn dump(path: &std::path::Path) -> Vec<String> {
    let connection = rusqlite::Connection::open(path).expect("open");
    let mut lines = Vec::new();
    for (table, order) in [
        ("tally_rows", "id"),
        ("tally_row_shares", "row_id, beneficiary"),
        ("tally_rollup_15m", "bucket_start_ms, tenant_id"),
        ("tally_rollup_share_15m", "bucket_start_ms, beneficiary"),
        ("tally_sink_offsets", "topic, kafka_partition"),
    ] {
        let mut statement = connection
            .prepare(&format!("SELECT * FROM {table} ORDER BY {order}"))
            .expect("select");
        let columns = statement.column_count();
        let rows = statement
            .query_map([], |row| {
                let mut cells = vec![table.to_owned()];
                for index in 0..columns {
                    let value: rusqlite::types::Value = row.get(index)?;
                    if table == "tally_sink_offsets" && index == 3 {
                        continue; // updated_at_ms: bookkeeping wall clock
                    }
                    cells.push(format!("{value:?}"));
                }
                Ok(cells.join("|"))
            })
            .expect("query");
        for line in rows {
            lines.push(line.expect("row"));
        }
    }
    lines
}

fn rollup_gross(path: &std::path::Path) -> (i64, i64, i64) {
    rusqlite::Connection::open(path)
        .expect("open")
        .query_row(
            "SELECT sum(row_count), sum(event_count), sum(gross_micros) FROM tally_rollup_15m",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .expect("sums")
}

#[test]
fn identical_rows_are_no_ops_and_a_conflicting_row_stops_the_sink_unchanged() {
    let handle = recorder();
    let topic = rand_name("sink-identity");
    create_topics(&bootstrap(), &[&topic], 1);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("billing.db");
    let database = format!("sqlite:{}", path.display());

    let rows = [
        row("row-a", 0, 1_000_000),
        row("row-b", 1, 2_000_000),
        row("row-c", 20, 500_000),
    ];
    let values: Vec<Vec<u8>> = rows.iter().map(encoded).collect();
    produce(&topic, &values);
    let summary = run_sink(settings(&topic, &database)).expect("first load");
    assert_eq!(summary.exit, ExitReason::Idle);
    assert_eq!(summary.rows_inserted, 3);
    // Rows a and b share the bucket starting at minute 0, c (minute 20) is in the next.
    assert_eq!(rollup_gross(&path), (3, 9, 3_500_000));

    // The same row b again (offset 3): a no-op, the offset moves on.
    produce(&topic, &values[1..2]);
    let summary = run_sink(settings(&topic, &database)).expect("identical row");
    assert_eq!(summary.rows_inserted, 0);
    assert_eq!(summary.rows_identical, 1);
    assert_eq!(rollup_gross(&path), (3, 9, 3_500_000), "roll-ups unchanged");
    let before = dump(&path);
    assert!(
        before.iter().any(|line| line.starts_with(&format!(
            "tally_sink_offsets|Text(\"{topic}\")|Integer(0)|Integer(4)"
        ))),
        "{before:?}"
    );

    // Row a with another gross (offset 4), then a new row (offset 5): the sink stops
    // at the conflict and stores neither.
    let mut changed = rows[0].clone();
    changed.gross_micros += 1;
    changed.net_micros += 1;
    produce(&topic, &[encoded(&changed), encoded(&row("row-d", 40, 7))]);
    let error = run_sink(settings(&topic, &database)).expect_err("conflict");
    match &error {
        SinkError::Conflict {
            id,
            topic: error_topic,
            partition,
            offset,
            ..
        } => {
            assert_eq!(id, "row-a");
            assert_eq!(error_topic, &topic);
            assert_eq!(*partition, 0);
            assert_eq!(*offset, 4);
        }
        other => panic!("expected a conflict, got {other}"),
    }
    let text = error.to_string();
    assert!(
        text.contains("row-a") && text.contains(&format!("{topic}/0@4")),
        "{text}"
    );
    assert_eq!(dump(&path), before, "the store is unchanged");
    let metrics = parse(&handle.render());
    assert_eq!(metrics.sum("tally_sink_conflicts_total"), Some(1.0));

    // A restart stops at the same record again: nothing is skipped.
    let error = run_sink(settings(&topic, &database)).expect_err("conflict again");
    assert!(
        matches!(error, SinkError::Conflict { offset: 4, .. }),
        "{error}"
    );
    assert_eq!(dump(&path), before);
}

#[test]
fn an_undecodable_record_stops_the_sink_naming_its_position() {
    let topic = rand_name("sink-undecodable");
    create_topics(&bootstrap(), &[&topic], 1);
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite:{}", dir.path().join("billing.db").display());
    produce(
        &topic,
        &[encoded(&row("row-a", 0, 5)), b"not an aggregate".to_vec()],
    );
    let error = run_sink(settings(&topic, &database)).expect_err("undecodable");
    match &error {
        SinkError::Undecodable {
            topic: error_topic,
            partition,
            offset,
            ..
        } => {
            assert_eq!(error_topic, &topic);
            assert_eq!((*partition, *offset), (0, 1));
        }
        other => panic!("expected an undecodable record, got {other}"),
    }
}
