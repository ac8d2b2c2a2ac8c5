//! `tally topics create` + `tally produce` against the real broker, read back by a
//! plain consumer and checked against the generator's ground-truth file.
//!
//! The check is a recount from the bytes on the broker: decode, validate, check
//! routing, then classify with the pipeline's rules (rejected → too late → duplicate →
//! counted) using each partition's own watermark. It never looks at how the generator
//! labelled a record.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use support::eos::{DimsKey, ReadRecord, Sums, read_committed_within, truth_dims_key};
use support::{TestTopics, assert_success, bootstrap, tally, write_config};
use tally_core::codec::{Decoded, decode_record};
use tally_core::event::EventId;
use tally_core::routing::partition_for_key;
use tally_core::validate::{ValidationLimits, validate_event};
use tally_gen::GroundTruth;

const PARTITIONS: i32 = 4;
const EVENTS: u64 = 120_000;

#[derive(Debug, Default)]
struct Recount {
    records: u64,
    counted: u64,
    duplicates: u64,
    too_late: u64,
    rejected: u64,
    rejected_by_reason: BTreeMap<&'static str, u64>,
    counted_sums: BTreeMap<DimsKey, Sums>,
}

/// Reads every record of `topic` (all partitions, from the beginning, read_committed)
/// within a minute.
fn read_all(topic: &str) -> Vec<ReadRecord> {
    read_committed_within(&bootstrap(), topic, PARTITIONS, Duration::from_secs(60))
}

fn recount(records: &[ReadRecord], truth: &GroundTruth) -> Recount {
    let config = &truth.config;
    let limits = ValidationLimits::default();
    let mut by_partition: BTreeMap<i32, Vec<&ReadRecord>> = BTreeMap::new();
    for record in records {
        by_partition
            .entry(record.partition)
            .or_default()
            .push(record);
    }
    let mut result = Recount {
        records: records.len() as u64,
        ..Recount::default()
    };
    for records in by_partition.values() {
        let mut max_counted_event_time: Option<i64> = None;
        let mut seen: HashMap<EventId, ()> = HashMap::new();
        for record in records {
            let reject = |result: &mut Recount, reason: &'static str| {
                result.rejected += 1;
                *result.rejected_by_reason.entry(reason).or_default() += 1;
            };
            let event = match decode_record(&record.value) {
                Ok(Decoded::Usage(event)) => event,
                Ok(Decoded::Tick(_)) => panic!("the generator writes no ticks"),
                Err(error) => {
                    reject(&mut result, error.reason());
                    continue;
                }
            };
            if let Err(error) = validate_event(&event, record.timestamp_ms, &limits) {
                reject(&mut result, error.reason());
                continue;
            }
            let key = record.key.as_deref().unwrap_or_default();
            let routed = partition_for_key(key, PARTITIONS as u32) as i32 == record.partition;
            if key != event.tenant_id.as_bytes() || !routed {
                reject(&mut result, "misrouted");
                continue;
            }
            let window_start = event.occurred_at_ms.div_euclid(config.window_ms) * config.window_ms;
            let window_end = window_start + config.window_ms;
            let watermark = max_counted_event_time.map(|max| max - config.max_out_of_orderness_ms);
            if watermark.is_some_and(|watermark| {
                window_end + config.allowed_lateness_ms + config.correction_horizon_ms <= watermark
            }) {
                result.too_late += 1;
                continue;
            }
            if seen.insert(event.event_id, ()).is_some() {
                result.duplicates += 1;
                continue;
            }
            result.counted += 1;
            max_counted_event_time = Some(
                max_counted_event_time
                    .map_or(event.occurred_at_ms, |max| max.max(event.occurred_at_ms)),
            );
            let sums = result
                .counted_sums
                .entry((
                    window_start,
                    event.tenant_id.clone(),
                    event.model.clone(),
                    event.cloud.as_str().to_owned(),
                    event.channel_partner.clone(),
                    event.region.clone(),
                ))
                .or_default();
            sums.events += 1;
            sums.input += event.tokens.input;
            sums.cached_input += event.tokens.cached_input;
            sums.output += event.tokens.output;
            sums.reasoning += event.tokens.reasoning;
        }
    }
    result
}

fn truth_sums(truth: &GroundTruth) -> BTreeMap<DimsKey, Sums> {
    truth
        .windows
        .iter()
        .map(|window| {
            let mut sums = Sums::of_truth(&window.on_time);
            sums.add(Sums::of_truth(&window.correction));
            (truth_dims_key(window), sums)
        })
        .collect()
}

#[test]
fn produced_topic_matches_the_ground_truth() {
    let dir = tempfile::tempdir().expect("temp dir");
    let topics = TestTopics::random();
    let config = write_config(dir.path(), &topics, PARTITIONS, "");
    assert_success(&tally(&["topics", "create"], &config), "topics create");

    let truth_path = dir.path().join("truth.json");
    let count = EVENTS.to_string();
    let output = tally(
        &[
            "produce",
            "--count",
            &count,
            "--seed",
            "20261126",
            "--truth",
            truth_path.to_str().expect("utf-8 path"),
        ],
        &config,
    );
    assert_success(&output, "tally produce");
    let truth = GroundTruth::read(&truth_path).expect("ground truth");
    assert!(truth.complete);
    assert_eq!(truth.produced, EVENTS);
    assert!(
        truth.is_conserved(),
        "produced = counted + duplicates + too late + rejected"
    );
    assert!(
        truth.counted_corrections > 0
            && truth.duplicates > 0
            && truth.too_late > 0
            && truth.rejected > 0
    );

    let records = read_all(&topics.usage_events);
    assert_eq!(
        records.len() as u64,
        truth.produced,
        "every produced record is on the broker"
    );
    let recount = recount(&records, &truth);

    assert_eq!(recount.records, truth.produced);
    assert_eq!(recount.counted, truth.counted, "distinct counted events");
    assert_eq!(recount.duplicates, truth.duplicates, "duplicates");
    assert_eq!(recount.too_late, truth.too_late, "too late");
    assert_eq!(
        recount.rejected, truth.rejected,
        "malformed or invalid records"
    );
    assert_eq!(
        recount.counted + recount.duplicates + recount.too_late + recount.rejected,
        recount.records
    );
    assert_eq!(
        recount.counted_sums,
        truth_sums(&truth),
        "token sums per (window, dims)"
    );
    for partition in &truth.per_partition {
        let on_broker = records
            .iter()
            .filter(|record| record.partition == partition.partition as i32)
            .count();
        assert_eq!(
            on_broker as u64, partition.records,
            "records in partition {}",
            partition.partition
        );
    }
}

/// `tally produce` takes the aggregator's event-time parameters from the loaded config
/// file (so its truth is what that aggregator must reproduce); a flag wins over it.
#[test]
fn produce_takes_event_time_parameters_from_the_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let topics = TestTopics::random();
    let config = write_config(dir.path(), &topics, PARTITIONS, "");
    let text = std::fs::read_to_string(&config).expect("read config");
    let text = text.replacen(
        "[aggregator]\n",
        "[aggregator]\nwindow_ms = 300000\nmax_out_of_orderness_ms = 10000\n\
         allowed_lateness_ms = 45000\ncorrection_horizon_ms = 7200000\n",
        1,
    );
    std::fs::write(&config, text).expect("write config");
    assert_success(&tally(&["topics", "create"], &config), "topics create");

    let produce = |truth_name: &str, flags: &[&str]| {
        let truth_path = dir.path().join(truth_name);
        let mut args = vec![
            "produce",
            "--count",
            "50",
            "--truth",
            truth_path.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(flags);
        assert_success(&tally(&args, &config), "tally produce");
        let truth = GroundTruth::read(&truth_path).expect("ground truth");
        let config = truth.config;
        (
            config.partitions,
            config.window_ms,
            config.max_out_of_orderness_ms,
            config.allowed_lateness_ms,
            config.correction_horizon_ms,
        )
    };
    assert_eq!(
        produce("from-file.json", &[]),
        (PARTITIONS as u32, 300_000, 10_000, 45_000, 7_200_000)
    );
    assert_eq!(
        produce("flag.json", &["--allowed-lateness-ms", "20000"]),
        (PARTITIONS as u32, 300_000, 10_000, 20_000, 7_200_000)
    );
}
