//! `tally replay` / `tally reconcile` helpers, and the checks run on the kill soak's
//! live output ([`after_soak`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tally_core::aggregate::BillingAggregate;
use tally_core::codec::decode_aggregate;
use tally_core::timefmt::format_utc_ms;

use super::eos::{ReadRecord, committed_offsets_within, kafka_client, read_committed};
use super::{TestTopics, bootstrap, rand_name};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// A row as the billing contract compares it: (key, value, timestamp).
pub type RowTriple = (Vec<u8>, Vec<u8>, i64);

/// Exit code and stdout of one `tally` command.
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `tally --config <config> <args>` to its end.
pub fn tally_command(config: &Path, args: &[&str]) -> Outcome {
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .expect("run tally");
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `tally replay --from --to <extra>`; the summary JSON when it succeeded.
pub fn replay(
    config: &Path,
    from_ms: i64,
    to_ms: i64,
    extra: &[&str],
) -> (Outcome, Option<serde_json::Value>) {
    let from = format_utc_ms(from_ms);
    let to = format_utc_ms(to_ms);
    let mut args = vec!["replay", "--from", from.as_str(), "--to", to.as_str()];
    args.extend(extra);
    let outcome = tally_command(config, &args);
    let summary = serde_json::from_str(outcome.stdout.trim()).ok();
    (outcome, summary)
}

/// `tally reconcile --format json`: the exit code and the report.
pub fn reconcile(
    config: &Path,
    left: &str,
    right: &str,
    from_ms: i64,
    to_ms: i64,
) -> (i32, serde_json::Value) {
    let from = format_utc_ms(from_ms);
    let to = format_utc_ms(to_ms);
    let outcome = tally_command(
        config,
        &[
            "reconcile",
            "--left",
            left,
            "--right",
            right,
            "--from",
            &from,
            "--to",
            &to,
            "--format",
            "json",
        ],
    );
    let report = serde_json::from_str(&outcome.stdout).unwrap_or_else(|error| {
        panic!(
            "reconcile exited {} without a JSON report ({error}):\n{}",
            outcome.code, outcome.stderr
        )
    });
    (outcome.code, report)
}

/// The (key, value, timestamp) set of records.
pub fn row_set(records: &[ReadRecord]) -> BTreeSet<RowTriple> {
    records
        .iter()
        .map(|record| {
            (
                record.key.clone().unwrap_or_default(),
                record.value.clone(),
                record.timestamp_ms.unwrap_or(i64::MIN),
            )
        })
        .collect()
}

/// The decoded rows of records.
pub fn decoded(records: &[ReadRecord]) -> Vec<BillingAggregate> {
    records
        .iter()
        .map(|record| decode_aggregate(&record.value).expect("a BillingAggregate"))
        .collect()
}

/// What a replay must leave unchanged: the production group's committed offsets on the
/// input, and the low and high offsets of every production topic.
#[derive(Debug, PartialEq, Eq)]
pub struct ProductionState {
    pub committed: Vec<(i32, String)>,
    pub offsets: BTreeMap<String, Vec<(i64, i64)>>,
}

pub fn production_state(topics: &TestTopics, group: &str, partitions: i32) -> ProductionState {
    let bootstrap = bootstrap();
    let committed = committed_offsets_within(
        &bootstrap,
        group,
        &topics.usage_events,
        partitions,
        KAFKA_TIMEOUT,
    )
    .expect("committed offsets")
    .elements()
    .iter()
    .map(|element| (element.partition(), format!("{:?}", element.offset())))
    .collect();
    let consumer: BaseConsumer = kafka_client(&bootstrap)
        .set("group.id", rand_name("watermarks"))
        .create()
        .expect("client");
    let mut offsets = BTreeMap::new();
    for topic in [
        &topics.usage_events,
        &topics.billing_aggregates,
        &topics.late,
        &topics.dlq,
        &topics.checkpoints,
    ] {
        let metadata = consumer
            .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
            .expect("metadata");
        let count = metadata.topics()[0].partitions().len();
        let ends = (0..count)
            .map(|partition| {
                consumer
                    .fetch_watermarks(topic, partition as i32, KAFKA_TIMEOUT)
                    .expect("watermarks")
            })
            .collect();
        offsets.insert(topic.clone(), ends);
    }
    ProductionState { committed, offsets }
}

/// Deletes the records of `topic` below the given offsets (`DeleteRecords`).
pub fn delete_records(topic: &str, below: &[(i32, i64)]) {
    let admin: AdminClient<DefaultClientContext> =
        kafka_client(&bootstrap()).create().expect("admin client");
    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in below {
        offsets
            .add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .expect("offset");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime
        .block_on(admin.delete_records(
            &offsets,
            &AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT)),
        ))
        .expect("delete records");
    for element in result.elements() {
        assert!(
            element.error().is_ok(),
            "delete records of {}/{}: {:?}",
            element.topic(),
            element.partition(),
            element.error()
        );
    }
}

/// The smallest window start and largest window end of `rows`.
pub fn window_span(rows: &[BillingAggregate]) -> (i64, i64) {
    let from = rows
        .iter()
        .map(|row| row.window_start_ms)
        .min()
        .expect("rows");
    let to = rows
        .iter()
        .map(|row| row.window_end_ms)
        .max()
        .expect("rows");
    (from, to)
}

/// Checks on the kill soak's live output, reusing its run instead of a new one:
/// - a one-process replay of the whole range, with another commit interval than any of
///   the soak's processes, writes exactly the live rows as (key, value, timestamp);
/// - the production group's offsets and the production topics are unchanged by it;
/// - a replay of a sub-range in the middle warms up from a checkpoint (not offset 0) on
///   every partition and writes exactly the live rows of the windows in the range.
pub fn after_soak(
    config: &Path,
    topics: &TestTopics,
    group: &str,
    partitions: i32,
    window_ms: i64,
) {
    let started = Instant::now();
    let bootstrap = bootstrap();
    let live = read_committed(&bootstrap, &topics.billing_aggregates, partitions);
    let live_rows = decoded(&live);
    let (from_ms, to_ms) = window_span(&live_rows);

    let before = production_state(topics, group, partitions);
    let output = rand_name("replay-soak");
    let (outcome, summary) = replay(
        config,
        from_ms,
        to_ms,
        &["--output-topic", &output, "--commit-interval-ms", "700"],
    );
    assert_eq!(outcome.code, 0, "replay failed:\n{}", outcome.stderr);
    let summary = summary.expect("replay summary");
    let replayed = read_committed(&bootstrap, &output, partitions);
    assert_eq!(replayed.len(), live.len(), "replay row count");
    assert!(
        row_set(&replayed) == row_set(&live),
        "the replay's rows differ from the live rows as (key, value, timestamp)"
    );
    assert_eq!(summary["rows"].as_u64(), Some(live.len() as u64));
    let after = production_state(topics, group, partitions);
    assert_eq!(
        before, after,
        "a replay changed production offsets or topics"
    );
    let full_at = started.elapsed();

    // A sub-range of 20 windows starting at 3/5 of the span.
    let sub_from = from_ms + ((to_ms - from_ms) * 3 / 5) / window_ms * window_ms;
    let sub_to = sub_from + 20 * window_ms;
    let output = rand_name("replay-soak-sub");
    let (outcome, summary) = replay(config, sub_from, sub_to, &["--output-topic", &output]);
    assert_eq!(
        outcome.code, 0,
        "sub-range replay failed:\n{}",
        outcome.stderr
    );
    let summary = summary.expect("replay summary");
    let reports = summary["partitions"].as_array().expect("partitions");
    assert_eq!(reports.len(), partitions as usize);
    for report in reports {
        assert_eq!(report["warm_up"], "checkpoint", "{report}");
        assert!(report["start_offset"].as_i64() > Some(0), "{report}");
    }
    let expected: Vec<ReadRecord> = live
        .iter()
        .zip(&live_rows)
        .filter(|(_, row)| row.window_start_ms >= sub_from && row.window_end_ms <= sub_to)
        .map(|(record, _)| record.clone())
        .collect();
    assert!(!expected.is_empty(), "the sub-range holds live rows");
    let replayed = read_committed(&bootstrap, &output, partitions);
    assert!(
        row_set(&replayed) == row_set(&expected),
        "the sub-range replay differs from the live rows of its windows ({} vs {} rows)",
        replayed.len(),
        expected.len()
    );
    eprintln!(
        "replay after the soak: {} rows replayed whole and equal ({full_at:?}); sub-range of {} rows from checkpoints {:?} equal; {:?} in all",
        live.len(),
        expected.len(),
        reports
            .iter()
            .map(|report| (
                report["start_offset"].as_i64(),
                report["checkpoint_offset"].as_i64()
            ))
            .collect::<Vec<_>>(),
        started.elapsed()
    );
}

/// The records of `records` (a topic's read) whose rows are made only of input records
/// in the offsets of their input partition in `ranges`.
pub fn rows_in_offsets(
    records: &[ReadRecord],
    ranges: &BTreeMap<i32, (i64, i64)>,
) -> Vec<ReadRecord> {
    records
        .iter()
        .filter(|record| {
            let row = decode_aggregate(&record.value).expect("a BillingAggregate");
            ranges
                .get(&row.source_partition)
                .is_some_and(|(start, end)| row.first_offset >= *start && row.last_offset < *end)
        })
        .cloned()
        .collect()
}
