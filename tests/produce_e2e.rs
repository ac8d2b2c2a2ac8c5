//! `tally topics create` + `tally produce` against the real broker, read back by a
//! plain consumer and checked against the generator's ground-truth file.
//!
//! The check is a recount from the bytes on the broker: decode, validate, check
//! routing, then classify with the pipeline's rules (rejected → too late → duplicate →
//! counted) using each partition's own watermark. It never looks at how the generator
//! labelled a record.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use support::{TestTopics, assert_success, bootstrap, tally, write_config};
use tally_core::codec::{Decoded, decode_record};
use tally_core::event::EventId;
use tally_core::routing::partition_for_key;
use tally_core::validate::{ValidationLimits, validate_event};
use tally_producer::GroundTruth;

const PARTITIONS: i32 = 4;
const EVENTS: u64 = 120_000;

/// (window start, tenant, model, cloud, partner, region)
type Key = (i64, String, String, String, Option<String>, String);

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Sums {
    events: u64,
    input: u64,
    cached_input: u64,
    output: u64,
    reasoning: u64,
}

#[derive(Debug, Default)]
struct Recount {
    records: u64,
    counted: u64,
    duplicates: u64,
    too_late: u64,
    rejected: u64,
    rejected_by_reason: BTreeMap<&'static str, u64>,
    counted_sums: BTreeMap<Key, Sums>,
}

struct Record {
    partition: i32,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    timestamp_ms: Option<i64>,
}

/// Reads every record of `topic` (all partitions, from the beginning) until `expected`
/// records arrived or a minute passed.
fn read_all(topic: &str, expected: u64) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", support::rand_name("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut records = Vec::new();
    while (records.len() as u64) < expected && Instant::now() < deadline {
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = result.expect("consume");
        records.push(Record {
            partition: message.partition(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            timestamp_ms: message.timestamp().to_millis(),
        });
    }
    records
}

fn recount(records: &[Record], truth: &GroundTruth) -> Recount {
    let config = &truth.config;
    let limits = ValidationLimits::default();
    let mut by_partition: BTreeMap<i32, Vec<&Record>> = BTreeMap::new();
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

fn truth_sums(truth: &GroundTruth) -> BTreeMap<Key, Sums> {
    truth
        .windows
        .iter()
        .map(|window| {
            let mut sums = Sums::default();
            for pane in [&window.on_time, &window.correction] {
                sums.events += pane.events;
                sums.input += pane.input_tokens;
                sums.cached_input += pane.cached_input_tokens;
                sums.output += pane.output_tokens;
                sums.reasoning += pane.reasoning_tokens;
            }
            let key = (
                window.window_start_ms,
                window.tenant_id.clone(),
                window.model.clone(),
                window.cloud.clone(),
                window.channel_partner.clone(),
                window.region.clone(),
            );
            (key, sums)
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

    let records = read_all(&topics.usage_events, truth.produced);
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
