//! `/metrics` of `tally produce`, `tally aggregate` and `tally sink` after a known run,
//! against the real broker.
//!
//! Needs `TALLY_TEST_BOOTSTRAP` and promtool (deploy/local/test.sh provides both). A
//! generated input (its ground truth written by `tally produce --truth`) goes through
//! the real binaries: produce, aggregate, sink into SQLite. Each process's scrape must
//! pass `promtool check metrics`, carry HELP and TYPE for every family, have exactly
//! the label sets the code promises (every fixed label value present from the start),
//! and report the run's figures: the producer's from the truth's record count, the
//! aggregator's from the truth's classes and token sums and from the rows read back
//! from billing.aggregates, the sink's from the rows in the store.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::eos::{
    ChildConfig, EventTime, create_outputs, create_topics, expected_dlq_reasons, free_port,
    fresh_outputs, read_committed,
};
use support::ops::{TallyChild, get_ok, promtool_check_metrics, wait_for};
use support::prometheus::{Exposition, parse};
use support::sink::sqlite_row_count;
use support::{bootstrap, rand_name};
use tally_core::codec::decode_aggregate;
use tally_gen::GroundTruth;

const PARTITIONS: i32 = 2;
const RECORDS: u64 = 4_000;
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Every family has HELP and TYPE, and every sample belongs to a typed family.
fn assert_described(what: &str, exposition: &Exposition) {
    for sample in &exposition.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = sample.name.strip_suffix(suffix)?;
                (exposition.types.get(base).map(String::as_str) == Some("histogram"))
                    .then_some(base)
            })
            .unwrap_or(&sample.name);
        assert!(
            exposition.types.contains_key(family),
            "{what}: {} has no TYPE",
            sample.name
        );
        assert!(
            exposition
                .help
                .get(family)
                .is_some_and(|help| !help.is_empty()),
            "{what}: {family} has no HELP"
        );
    }
}

/// The label sets of `name` (label names only, `le` excluded).
fn label_names(exposition: &Exposition, name: &str) -> BTreeSet<Vec<String>> {
    exposition
        .samples_named(name)
        .map(|sample| {
            sample
                .labels
                .keys()
                .filter(|key| *key != "le")
                .cloned()
                .collect()
        })
        .collect()
}

/// Values of `label` among the samples of `name`.
fn label_values(exposition: &Exposition, name: &str, label: &str) -> BTreeSet<String> {
    exposition
        .samples_named(name)
        .filter_map(|sample| sample.labels.get(label).cloned())
        .collect()
}

/// The one unlabelled sample of `name`.
fn value(exposition: &Exposition, name: &str) -> f64 {
    let samples: Vec<_> = exposition.samples_named(name).collect();
    assert_eq!(samples.len(), 1, "{name}: one sample expected: {samples:?}");
    samples[0].value
}

/// The sample of `name` with exactly `labels`.
fn value_with(exposition: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    exposition
        .samples_named(name)
        .find(|sample| sample.labels == wanted)
        .unwrap_or_else(|| panic!("{name}{wanted:?} missing"))
        .value
}

fn kind(exposition: &Exposition, name: &str) -> String {
    exposition
        .types
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} has no TYPE"))
}

/// Histogram `name`: explicit buckets (`le` values), their count equal to `_count`.
fn assert_histogram(exposition: &Exposition, name: &str, buckets: &[f64], count: f64) {
    assert_eq!(kind(exposition, name), "histogram", "{name}");
    let bucket = format!("{name}_bucket");
    let mut les: Vec<f64> = exposition
        .samples_named(&bucket)
        .map(|sample| {
            let le = &sample.labels["le"];
            if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("numeric le")
            }
        })
        .collect();
    les.sort_by(f64::total_cmp);
    let mut expected: Vec<f64> = buckets.to_vec();
    expected.push(f64::INFINITY);
    assert_eq!(les, expected, "{name}: buckets");
    assert_eq!(value(exposition, &format!("{name}_count")), count, "{name}");
    assert_eq!(
        value_with(exposition, &bucket, &[("le", "+Inf")]),
        count,
        "{name}: +Inf bucket"
    );
}

fn scrape(address: &str) -> (String, Exposition) {
    let text = get_ok(address, "/metrics");
    let exposition = parse(&text);
    (text, exposition)
}

#[test]
fn every_process_serves_described_bounded_metrics_that_match_the_run() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let input_topic = rand_name("ops-metrics-events");
    create_topics(&bootstrap(), &[&input_topic], PARTITIONS);
    let topics = fresh_outputs(&input_topic);
    create_outputs(&topics, PARTITIONS);
    let group = rand_name("ops-metrics");
    let listen = |config: &ChildConfig| {
        let mut config = config.clone();
        config.metrics_listen = format!("127.0.0.1:{}", free_port());
        config
    };
    let base = ChildConfig::new(&group, EventTime::EOS, PARTITIONS);

    // --- producer: the run, then its final counts while it lingers.
    let producer_config = listen(&base);
    let producer_file = producer_config.write(dir.path(), "produce", &topics, PARTITIONS);
    let truth_path = dir.path().join("truth.json");
    let truth_arg = truth_path.display().to_string();
    let count = RECORDS.to_string();
    let producer = TallyChild::spawn(
        &[
            "produce",
            "--count",
            &count,
            "--seed",
            "1010",
            "--tenants",
            "40",
            "--truth",
            &truth_arg,
            "--metrics-linger-ms",
            "60000",
        ],
        &producer_file,
        dir.path(),
        "produce",
    );
    let mut producer = producer;
    let truth = wait_for(RUN_TIMEOUT, "the ground truth", || {
        if let Some(status) = producer.try_exit() {
            panic!("tally produce exited ({status}):\n{}", producer.log_tail());
        }
        GroundTruth::read(&truth_path).ok()
    });
    assert_eq!(truth.produced, RECORDS);
    let (text, metrics) = scrape(&producer_config.metrics_listen);
    promtool_check_metrics("producer", &text);
    assert_described("producer", &metrics);
    let produced = RECORDS as f64;
    assert_eq!(
        kind(&metrics, "tally_producer_records_enqueued_total"),
        "counter"
    );
    assert_eq!(
        value(&metrics, "tally_producer_records_enqueued_total"),
        produced
    );
    assert_eq!(
        value(&metrics, "tally_producer_records_delivered_total"),
        produced
    );
    assert_eq!(
        value(&metrics, "tally_producer_queue_full_waits_total"),
        0.0
    );
    assert_eq!(kind(&metrics, "tally_producer_queue_records"), "gauge");
    assert_eq!(value(&metrics, "tally_producer_queue_records"), 0.0);
    let reasons: BTreeSet<String> = [
        "timed_out",
        "purged",
        "too_large",
        "unknown_topic",
        "not_authorized",
        "fatal",
        "other",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(
        label_values(&metrics, "tally_producer_delivery_failures_total", "reason"),
        reasons,
        "every failure reason exists at 0"
    );
    assert_eq!(
        label_names(&metrics, "tally_producer_delivery_failures_total"),
        BTreeSet::from([vec!["reason".to_owned()]])
    );
    assert_eq!(
        metrics.sum("tally_producer_delivery_failures_total"),
        Some(0.0)
    );
    assert_histogram(
        &metrics,
        "tally_producer_delivery_latency_seconds",
        &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
        ],
        produced,
    );
    assert_eq!(
        value_with(&metrics, "tally_log_events_total", &[("level", "error")]),
        0.0
    );
    drop(producer);
    eprintln!("producer checked after {:?}", started.elapsed());

    // --- aggregator: until every usage record is consumed and every window closed.
    let aggregator_config = listen(&base);
    let aggregator_file = aggregator_config.write(dir.path(), "aggregate", &topics, PARTITIONS);
    let mut aggregator = TallyChild::spawn(
        &[
            "aggregate",
            "--instance-id",
            &rand_name("ops-metrics"),
            "--start-from",
            "earliest",
        ],
        &aggregator_file,
        dir.path(),
        "aggregate",
    );
    let address = aggregator_config.metrics_listen.clone();
    let mut previous_rows = -1.0;
    let (text, metrics) = wait_for(RUN_TIMEOUT, "the aggregator to finish the input", || {
        if let Some(status) = aggregator.try_exit() {
            panic!(
                "tally aggregate exited ({status}):\n{}",
                aggregator.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(700));
        let (text, metrics) = scrape(&address);
        let consumed = value(&metrics, "tally_aggregator_consumed_records_total");
        let open = value(&metrics, "tally_aggregator_open_windows");
        let rows = value(&metrics, "tally_aggregator_emitted_rows_total");
        let lag_series = metrics
            .samples_named("tally_aggregator_consumer_lag_records")
            .count();
        let done = consumed == produced
            && open == 0.0
            && rows > 0.0
            && rows == previous_rows
            && lag_series == PARTITIONS as usize;
        previous_rows = rows;
        done.then_some((text, metrics))
    });
    promtool_check_metrics("aggregator", &text);
    assert_described("aggregator", &metrics);
    let rows = read_committed(&bootstrap(), &topics.billing_aggregates, PARTITIONS);
    let decoded: Vec<_> = rows
        .iter()
        .map(|record| decode_aggregate(&record.value).expect("a billing row"))
        .collect();
    assert_eq!(
        value(&metrics, "tally_aggregator_emitted_rows_total"),
        decoded.len() as f64,
        "rows emitted = rows in billing.aggregates"
    );
    assert_eq!(
        value(&metrics, "tally_aggregator_too_late_events_total"),
        truth.too_late as f64
    );
    assert_eq!(
        value(&metrics, "tally_aggregator_corrections_total"),
        truth.counted_corrections as f64
    );
    assert_eq!(
        value_with(
            &metrics,
            "tally_aggregator_duplicate_events_total",
            &[("kind", "conflicting")]
        ),
        truth.conflicting_duplicates as f64
    );
    assert_eq!(
        value_with(
            &metrics,
            "tally_aggregator_duplicate_events_total",
            &[("kind", "exact")]
        ),
        (truth.duplicates - truth.conflicting_duplicates) as f64
    );
    // Rejections: every reason label exists; the truth's reasons carry its counts.
    let expected_rejected = expected_dlq_reasons(&truth);
    let reasons = label_values(
        &metrics,
        "tally_aggregator_rejected_records_total",
        "reason",
    );
    assert!(reasons.len() >= 20, "every reason exists at 0: {reasons:?}");
    for reason in &reasons {
        let expected = expected_rejected.get(reason).copied().unwrap_or(0);
        assert_eq!(
            value_with(
                &metrics,
                "tally_aggregator_rejected_records_total",
                &[("reason", reason)]
            ),
            expected as f64,
            "rejected {reason}"
        );
    }
    assert!(
        expected_rejected
            .keys()
            .all(|reason| reasons.contains(reason))
    );
    // Tokens by cloud and kind equal the truth's counted sums; every known cloud and
    // kind exists.
    let mut truth_tokens: BTreeMap<(String, &str), u64> = BTreeMap::new();
    for window in &truth.windows {
        for pane in [&window.on_time, &window.correction] {
            for (kind, tokens) in [
                ("input", pane.input_tokens),
                ("cached_input", pane.cached_input_tokens),
                ("output", pane.output_tokens),
                ("reasoning", pane.reasoning_tokens),
            ] {
                *truth_tokens
                    .entry((window.cloud.clone(), kind))
                    .or_default() += tokens;
            }
        }
    }
    let clouds = label_values(&metrics, "tally_aggregator_tokens_total", "cloud");
    assert_eq!(
        clouds,
        ["openai", "azure", "aws", "gcp", "oracle"]
            .map(str::to_owned)
            .into()
    );
    for cloud in &clouds {
        for kind in ["input", "cached_input", "output", "reasoning"] {
            let expected = truth_tokens
                .get(&(cloud.clone(), kind))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                value_with(
                    &metrics,
                    "tally_aggregator_tokens_total",
                    &[("cloud", cloud), ("kind", kind)]
                ),
                expected as f64,
                "{cloud} {kind} tokens"
            );
        }
    }
    // Gross and shares equal the sums of the rows read back.
    let mut gross: BTreeMap<String, i64> = BTreeMap::new();
    let mut shares: BTreeMap<(String, String), i64> = BTreeMap::new();
    for row in &decoded {
        *gross.entry(row.dims.cloud.as_str().to_owned()).or_default() += row.gross_micros;
        for share in &row.shares {
            *shares
                .entry((
                    row.dims.cloud.as_str().to_owned(),
                    share.beneficiary.clone(),
                ))
                .or_default() += share.amount_micros;
        }
    }
    for cloud in &clouds {
        assert_eq!(
            value_with(
                &metrics,
                "tally_aggregator_gross_micros_total",
                &[("cloud", cloud)]
            ),
            gross.get(cloud).copied().unwrap_or(0) as f64,
            "gross {cloud}"
        );
    }
    assert_eq!(
        label_names(&metrics, "tally_aggregator_partner_share_micros_total"),
        BTreeSet::from([vec!["cloud".to_owned(), "partner".to_owned()]])
    );
    for sample in metrics.samples_named("tally_aggregator_partner_share_micros_total") {
        let key = (
            sample.labels["cloud"].clone(),
            sample.labels["partner"].clone(),
        );
        assert_eq!(
            sample.value,
            shares.get(&key).copied().unwrap_or(0) as f64,
            "share {key:?}"
        );
    }
    assert!(
        shares.keys().all(|(cloud, partner)| {
            metrics
                .samples_named("tally_aggregator_partner_share_micros_total")
                .any(|sample| {
                    sample.labels["cloud"] == *cloud && sample.labels["partner"] == *partner
                })
        }),
        "every share in the rows has its series"
    );
    // Per-partition gauges, labelled by partition only.
    for name in [
        "tally_aggregator_consumer_lag_records",
        "tally_aggregator_watermark_delay_seconds",
    ] {
        assert_eq!(kind(&metrics, name), "gauge");
        assert_eq!(
            label_values(&metrics, name, "partition"),
            ["0", "1"].map(str::to_owned).into(),
            "{name}"
        );
        assert_eq!(
            label_names(&metrics, name),
            BTreeSet::from([vec!["partition".to_owned()]])
        );
    }
    for name in [
        "tally_aggregator_transactions_aborted_total",
        "tally_aggregator_fatal_restarts_total",
        "tally_aggregator_abort_loops_total",
        "tally_aggregator_partition_restores_total",
        "tally_aggregator_partition_restores_started_total",
        "tally_aggregator_restored_records_total",
        "tally_aggregator_offset_fetch_failures_total",
    ] {
        assert_eq!(value(&metrics, name), 0.0, "{name} exists at 0");
    }
    assert_eq!(
        value(&metrics, "tally_aggregator_ticks_read_total"),
        value(&metrics, "tally_aggregator_ticks_written_total"),
        "every tick written was read back"
    );
    let commits = value(
        &metrics,
        "tally_aggregator_transaction_commit_seconds_count",
    );
    assert!(commits >= 1.0);
    assert_histogram(
        &metrics,
        "tally_aggregator_transaction_commit_seconds",
        &tally_aggregator::metrics::COMMIT_SECONDS_BUCKETS,
        commits,
    );
    assert_histogram(
        &metrics,
        "tally_aggregator_window_emit_latency_seconds",
        &tally_aggregator::metrics::WINDOW_EMIT_SECONDS_BUCKETS,
        decoded.len() as f64,
    );
    assert_eq!(
        value_with(&metrics, "tally_log_events_total", &[("level", "error")]),
        0.0
    );
    eprintln!("aggregator checked after {:?}", started.elapsed());

    // --- sink: every row into SQLite.
    let sink_config = listen(&base);
    let sink_file = sink_config.write(dir.path(), "sink", &topics, PARTITIONS);
    let database = dir.path().join("billing.db");
    let database_arg = format!("sqlite:{}", database.display());
    let sink_group = rand_name("ops-metrics-sink");
    let mut sink = TallyChild::spawn(
        &[
            "sink",
            "--database",
            &database_arg,
            "--group-id",
            &sink_group,
        ],
        &sink_file,
        dir.path(),
        "sink",
    );
    let address = sink_config.metrics_listen.clone();
    let (text, metrics) = wait_for(RUN_TIMEOUT, "the sink to store every row", || {
        if let Some(status) = sink.try_exit() {
            panic!("tally sink exited ({status}):\n{}", sink.log_tail());
        }
        if sqlite_row_count(&database) != decoded.len() as i64 {
            return None;
        }
        let (text, metrics) = scrape(&address);
        (metrics
            .samples_named("tally_sink_consumer_lag_records")
            .count()
            == PARTITIONS as usize
            && value(&metrics, "tally_sink_rows_written_total") == decoded.len() as f64)
            .then_some((text, metrics))
    });
    promtool_check_metrics("sink", &text);
    assert_described("sink", &metrics);
    assert_eq!(value(&metrics, "tally_sink_rows_identical_total"), 0.0);
    assert_eq!(value(&metrics, "tally_sink_conflicts_total"), 0.0);
    assert_eq!(value(&metrics, "tally_sink_paused"), 0.0);
    assert_eq!(
        label_values(&metrics, "tally_sink_db_retries_total", "kind"),
        [
            "connection",
            "timeout",
            "serialization",
            "deadlock",
            "busy",
            "io",
            "other"
        ]
        .map(str::to_owned)
        .into()
    );
    assert_eq!(metrics.sum("tally_sink_db_retries_total"), Some(0.0));
    let batches = value(&metrics, "tally_sink_batches_total");
    assert!(batches >= 1.0);
    assert_histogram(
        &metrics,
        "tally_sink_db_transaction_seconds",
        &tally_sink::metrics::DB_TRANSACTION_SECONDS_BUCKETS,
        batches,
    );
    assert_eq!(
        label_values(&metrics, "tally_sink_consumer_lag_records", "partition"),
        ["0", "1"].map(str::to_owned).into()
    );
    assert_eq!(
        value_with(&metrics, "tally_log_events_total", &[("level", "error")]),
        0.0
    );
    sink.terminate();
    aggregator.terminate();
    for (name, child) in [("sink", &mut sink), ("aggregator", &mut aggregator)] {
        let status = wait_for(Duration::from_secs(30), "a clean exit", || child.try_exit());
        assert!(status.success(), "{name} exit after SIGTERM: {status}");
    }
    eprintln!("done in {:?}", started.elapsed());
}
