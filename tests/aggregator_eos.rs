//! Exactly-once tests of `tally-aggregator` against a real Kafka broker.
//!
//! Needs `TALLY_TEST_BOOTSTRAP` (see `deploy/local/kafka.sh start`). Every test uses
//! its own random topic and group names. Input comes from `tally-producer`'s
//! deterministic generator, whose ground truth is computed independently of the
//! aggregator; each input partition ends with a gateway tick far in the future, so
//! every window and correction pane closes at a fixed input offset.
//!
//! Checked after every run, from read_committed reads of the outputs:
//! - Σ event counts and token sums of all rows per (window, dims) = the truth's counted
//!   events, on time and corrections split as the truth says;
//! - every row id appears once;
//! - usage.late holds exactly the too-late events and usage.dlq exactly the rejected
//!   records, with the expected reasons;
//! - the committed checkpoints' counters equal the truth per partition and conserve
//!   `consumed = counted + duplicates + too_late + rejected`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tally_aggregator::{
    AggregatorError, AggregatorSettings, Checkpoint, ExitReason, RunSummary, StartFrom,
};
use tally_core::codec::{decode_aggregate, encode_tick};
use tally_core::config::Config;
use tally_core::contracts::Contracts;
use tally_core::event::{TickOrigin, UsageTick};
use tally_core::partition::PartitionCounters;
use tally_core::window::WindowSize;
use tally_producer::{Generator, GeneratorConfig, GroundTruth, RecordClass};

const PARTITIONS: i32 = 4;
const WINDOW_MS: i64 = 10_000;
const MAX_OUT_OF_ORDERNESS_MS: i64 = 2_000;
const ALLOWED_LATENESS_MS: i64 = 5_000;
const CORRECTION_HORIZON_MS: i64 = 40_000;
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

const CONTRACTS: &str = r#"
[[price_book]]
version = "2024-01"
effective_from = "2024-01-01T00:00:00Z"
currency = "USD"
billable_statuses = ["succeeded"]

[price_book.models.atlas-large]
input = 2_500_000_000
cached_input = 1_250_000_000
output = 10_000_000_000
reasoning = 10_000_000_000

[price_book.models.atlas-mini]
input = 150_000_000
cached_input = 37_500_000
output = 600_000_000
reasoning = 600_000_000

[price_book.models.atlas-reasoning]
input = 15_000_000_000
cached_input = 7_500_000_000
output = 60_000_000_000
reasoning = 60_000_000_000

[price_book.models.atlas-embed]
input = 20_000_000
cached_input = 10_000_000
output = 0
reasoning = 0

[[share_rules]]
version = "2024-01"
effective_from = "2024-01-01T00:00:00Z"

[[share_rules.rules]]
cloud = "aws"
beneficiaries = [{ partner = "aws", basis_points = 2000 }]

[[share_rules.rules]]
cloud = "azure"
channel_partner = "contoso"
beneficiaries = [{ partner = "microsoft", basis_points = 2250 }, { partner = "contoso", basis_points = 500 }]
"#;

fn bootstrap() -> String {
    std::env::var("TALLY_TEST_BOOTSTRAP").unwrap_or_else(|_| {
        panic!(
            "TALLY_TEST_BOOTSTRAP is not set: start a broker with `deploy/local/kafka.sh start` and \
             `source /tmp/tally-run/kafka.env`"
        )
    })
}

fn suffix() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

fn client(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

/// Topics of one aggregator run (the input may be shared between runs).
#[derive(Debug, Clone)]
struct Outputs {
    aggregates: String,
    late: String,
    dlq: String,
}

impl Outputs {
    fn random() -> Outputs {
        let id = suffix();
        Outputs {
            aggregates: format!("agg-test-aggregates-{id}"),
            late: format!("agg-test-late-{id}"),
            dlq: format!("agg-test-dlq-{id}"),
        }
    }
}

fn create_topics(bootstrap: &str, names: &[&str]) {
    let admin: AdminClient<DefaultClientContext> =
        client(bootstrap).create().expect("admin client");
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let results = runtime
        .block_on(admin.create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ))
        .expect("create topics");
    for result in results {
        result.expect("topic created");
    }
}

/// A generated input topic and its ground truth.
struct Input {
    bootstrap: String,
    topic: String,
    truth: GroundTruth,
}

fn generator_config(count: u64, seed: u64) -> GeneratorConfig {
    GeneratorConfig {
        seed,
        count,
        rate_per_sec: 400,
        partitions: u32::try_from(PARTITIONS).expect("small"),
        tenants: 60,
        window_ms: WINDOW_MS,
        max_out_of_orderness_ms: MAX_OUT_OF_ORDERNESS_MS,
        allowed_lateness_ms: ALLOWED_LATENESS_MS,
        correction_horizon_ms: CORRECTION_HORIZON_MS,
        ..GeneratorConfig::default()
    }
}

/// Creates an input topic, produces `count` generated records and a far-future gateway
/// tick to every partition.
fn produce_input(count: u64, seed: u64) -> Input {
    let bootstrap = bootstrap();
    let topic = format!("agg-test-events-{}", suffix());
    create_topics(&bootstrap, &[&topic]);
    let mut generator =
        Generator::new(generator_config(count, seed)).expect("valid generator config");
    let producer: BaseProducer = client(&bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .create()
        .expect("producer");
    let send = |record: BaseRecord<'_, [u8], [u8]>| {
        let mut record = record;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(_), returned)) => {
                    record = returned;
                    producer.poll(Duration::from_millis(20));
                }
                Err((error, _)) => panic!("produce failed: {error}"),
            }
        }
        producer.poll(Duration::ZERO);
    };
    while let Some(record) = generator.next_record() {
        let partition = i32::try_from(record.partition).expect("small");
        let mut out = BaseRecord::<[u8], [u8]>::to(&topic)
            .partition(partition)
            .payload(&record.value)
            .timestamp(record.timestamp_ms);
        if let Some(key) = record.key.as_deref() {
            out = out.key(key);
        }
        send(out);
    }
    let truth = generator.truth();
    assert!(truth.is_conserved());
    let last_send = truth.last_send_time_ms.expect("records were produced");
    let mut tick = Vec::new();
    encode_tick(
        &UsageTick {
            tick_time_ms: last_send + 24 * 3_600_000,
            origin: TickOrigin::Gateway,
        },
        &mut tick,
    );
    for partition in 0..PARTITIONS {
        send(
            BaseRecord::<[u8], [u8]>::to(&topic)
                .partition(partition)
                .payload(&tick),
        );
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("flush input");
    Input {
        bootstrap,
        topic,
        truth,
    }
}

fn settings(input: &Input, outputs: &Outputs, group: &str) -> AggregatorSettings {
    let mut config = Config::default();
    config.kafka.bootstrap_servers = input.bootstrap.clone();
    config
        .kafka
        .client
        .insert("session.timeout.ms".to_owned(), "6000".to_owned());
    config
        .kafka
        .client
        .insert("heartbeat.interval.ms".to_owned(), "1000".to_owned());
    config.topics.usage_events = input.topic.clone();
    config.topics.billing_aggregates = outputs.aggregates.clone();
    config.topics.late = outputs.late.clone();
    config.topics.dlq = outputs.dlq.clone();
    config.topics.partitions = PARTITIONS;
    config.topics.output_partitions = PARTITIONS;
    config.topics.replication_factor = 1;
    config.aggregator.group_id = group.to_owned();
    config.aggregator.window_ms = WINDOW_MS;
    config.aggregator.max_out_of_orderness_ms = MAX_OUT_OF_ORDERNESS_MS;
    config.aggregator.allowed_lateness_ms = ALLOWED_LATENESS_MS;
    config.aggregator.correction_horizon_ms = CORRECTION_HORIZON_MS;
    config.aggregator.dedupe_horizon_ms = ALLOWED_LATENESS_MS + CORRECTION_HORIZON_MS + WINDOW_MS;
    config.aggregator.idle_timeout_ms = 500;
    config.aggregator.commit_interval_ms = 200;
    config.aggregator.transaction_timeout_ms = 10_000;
    let window = WindowSize::new(WINDOW_MS).expect("window divides 15 minutes");
    let contracts = Contracts::load(CONTRACTS, window).expect("test contracts load");
    let mut settings = AggregatorSettings::new(config, contracts, format!("test-{}", suffix()));
    settings.start_from = Some(StartFrom::Earliest);
    settings.exit_after_idle = Some(Duration::from_millis(1_500));
    settings
}

/// Runs the aggregator on a thread until it exits by itself (or the timeout).
fn run_aggregator(settings: AggregatorSettings) -> Result<RunSummary, AggregatorError> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&shutdown);
    let handle = thread::spawn(move || tally_aggregator::run(settings, flag));
    let started = Instant::now();
    while !handle.is_finished() {
        if started.elapsed() > RUN_TIMEOUT {
            shutdown.store(true, Ordering::SeqCst);
            let _ = handle.join();
            panic!("the aggregator did not settle within {RUN_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    handle.join().expect("aggregator thread panicked")
}

/// Runs the aggregator until its group has committed at least `offsets` input offsets
/// (summed over partitions), then raises the shutdown flag: a stop in mid-input.
fn run_aggregator_until_committed(
    settings: AggregatorSettings,
    group: &str,
    topic: &str,
    offsets: i64,
) -> Result<RunSummary, AggregatorError> {
    let bootstrap = settings.config.kafka.bootstrap_servers.clone();
    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&shutdown);
    let handle = thread::spawn(move || tally_aggregator::run(settings, flag));
    let started = Instant::now();
    while committed_offset_sum(&bootstrap, group, topic) < offsets && !handle.is_finished() {
        assert!(
            started.elapsed() < RUN_TIMEOUT,
            "no progress to {offsets} committed offsets"
        );
        thread::sleep(Duration::from_millis(10));
    }
    shutdown.store(true, Ordering::SeqCst);
    handle.join().expect("aggregator thread panicked")
}

/// One committed record of an output topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Committed {
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: BTreeMap<String, String>,
}

/// Reads every committed record of `topic` (read_committed, to the end of every partition).
fn read_committed(bootstrap: &str, topic: &str) -> Vec<Committed> {
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", format!("agg-test-reader-{}", suffix()))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("reader");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("offset");
    }
    consumer.assign(&assignment).expect("assign");
    let mut at_end = [false; PARTITIONS as usize];
    let mut records = Vec::new();
    let started = Instant::now();
    while !at_end.iter().all(|end| *end) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "reading {topic} timed out"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                at_end[usize::try_from(message.partition()).expect("partition")] = false;
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|header| {
                                let value = header
                                    .value
                                    .map(|bytes| String::from_utf8_lossy(bytes).into_owned());
                                (header.key.to_owned(), value.unwrap_or_default())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(Committed {
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers,
                });
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end[usize::try_from(partition).expect("partition")] = true;
            }
            Some(Err(error)) => panic!("reading {topic}: {error}"),
            None => {}
        }
    }
    records
}

/// The committed checkpoints of `group` on `topic`, by partition.
fn committed_checkpoints(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> BTreeMap<i32, (i64, Checkpoint)> {
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("checkpoint reader");
    let mut query = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        query.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(query, Duration::from_secs(30))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|element| {
            let Offset::Offset(offset) = element.offset() else {
                panic!("partition {} has no committed offset", element.partition());
            };
            let checkpoint =
                Checkpoint::from_metadata(element.metadata()).expect("tally checkpoint metadata");
            (element.partition(), (offset, checkpoint))
        })
        .collect()
}

/// Σ committed offsets of `group` on `topic` (partitions without one count 0).
fn committed_offset_sum(bootstrap: &str, group: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .create()
        .expect("offset reader");
    let mut query = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        query.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(query, Duration::from_secs(30))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|element| match element.offset() {
            Offset::Offset(offset) => offset,
            _ => 0,
        })
        .sum()
}

type DimsKey = (i64, String, String, String, Option<String>, String);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sums {
    events: u64,
    input: u64,
    cached_input: u64,
    output: u64,
    reasoning: u64,
}

/// Checks one run's outputs against the truth; returns the aggregate rows (key, value).
fn verify_run(input: &Input, outputs: &Outputs, group: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let truth = &input.truth;
    assert!(truth.counted > 0 && truth.duplicates > 0 && truth.too_late > 0 && truth.rejected > 0);
    assert!(
        truth.counted_corrections > 0,
        "the input must exercise corrections"
    );

    // (1) Rows: unique ids, sums per (window, dims) equal the truth.
    let rows = read_committed(&input.bootstrap, &outputs.aggregates);
    let mut ids = BTreeMap::new();
    let mut per_key: BTreeMap<DimsKey, (Sums, Sums)> = BTreeMap::new();
    for record in &rows {
        let row = decode_aggregate(&record.value).expect("aggregate decodes");
        assert_eq!(
            record.key.as_deref(),
            Some(row.id.as_bytes()),
            "row key is its id"
        );
        *ids.entry(row.id.clone()).or_insert(0_u32) += 1;
        let key = (
            row.window_start_ms,
            row.dims.tenant_id.clone(),
            row.dims.model.clone(),
            row.dims.cloud.as_str().to_owned(),
            row.dims.channel_partner.clone(),
            row.dims.region.clone(),
        );
        let entry = per_key.entry(key).or_default();
        let sums = if row.correction_seq == 0 {
            &mut entry.0
        } else {
            &mut entry.1
        };
        sums.events += row.event_count;
        sums.input += row.tokens.input;
        sums.cached_input += row.tokens.cached_input;
        sums.output += row.tokens.output;
        sums.reasoning += row.tokens.reasoning;
    }
    let duplicated: Vec<_> = ids.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        duplicated.is_empty(),
        "row ids written more than once: {duplicated:?}"
    );

    let mut expected: BTreeMap<DimsKey, (Sums, Sums)> = BTreeMap::new();
    for window in &truth.windows {
        let key = (
            window.window_start_ms,
            window.tenant_id.clone(),
            window.model.clone(),
            window.cloud.clone(),
            window.channel_partner.clone(),
            window.region.clone(),
        );
        let convert = |sums: &tally_producer::generator::TokenSums| Sums {
            events: sums.events,
            input: sums.input_tokens,
            cached_input: sums.cached_input_tokens,
            output: sums.output_tokens,
            reasoning: sums.reasoning_tokens,
        };
        expected.insert(key, (convert(&window.on_time), convert(&window.correction)));
    }
    let total = |map: &BTreeMap<DimsKey, (Sums, Sums)>, pick: fn(&(Sums, Sums)) -> Sums| {
        map.values()
            .map(pick)
            .fold(Sums::default(), |mut acc, sums| {
                acc.events += sums.events;
                acc.input += sums.input;
                acc.cached_input += sums.cached_input;
                acc.output += sums.output;
                acc.reasoning += sums.reasoning;
                acc
            })
    };
    assert_eq!(
        total(&per_key, |pair| pair.0),
        total(&expected, |pair| pair.0),
        "on-time totals"
    );
    assert_eq!(
        total(&per_key, |pair| pair.1),
        total(&expected, |pair| pair.1),
        "correction totals"
    );
    let combined = |map: &BTreeMap<DimsKey, (Sums, Sums)>| -> BTreeMap<DimsKey, Sums> {
        map.iter()
            .map(|(key, (on_time, correction))| {
                (
                    key.clone(),
                    Sums {
                        events: on_time.events + correction.events,
                        input: on_time.input + correction.input,
                        cached_input: on_time.cached_input + correction.cached_input,
                        output: on_time.output + correction.output,
                        reasoning: on_time.reasoning + correction.reasoning,
                    },
                )
            })
            .filter(|(_, sums)| sums.events > 0)
            .collect()
    };
    assert_eq!(
        combined(&per_key),
        combined(&expected),
        "sums per (window, dims)"
    );

    // Side topics: exactly the too-late and rejected records, with their reasons.
    let late = read_committed(&input.bootstrap, &outputs.late);
    assert_eq!(late.len() as u64, truth.too_late, "usage.late count");
    assert!(
        late.iter().all(
            |record| record.headers.get("tally.reason").map(String::as_str) == Some("too_late")
        )
    );
    let dlq = read_committed(&input.bootstrap, &outputs.dlq);
    assert_eq!(dlq.len() as u64, truth.rejected, "usage.dlq count");
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for record in &dlq {
        assert_eq!(record.headers.get("tally.source.topic"), Some(&input.topic));
        assert!(record.headers.contains_key("tally.source.partition"));
        assert!(record.headers.contains_key("tally.source.offset"));
        *reasons
            .entry(
                record
                    .headers
                    .get("tally.reason")
                    .cloned()
                    .unwrap_or_default(),
            )
            .or_default() += 1;
    }
    let mut expected_reasons: BTreeMap<String, u64> = BTreeMap::new();
    for kind in tally_producer::RejectKind::ALL {
        let count = truth
            .rejected_by_kind
            .get(kind.as_str())
            .copied()
            .unwrap_or(0);
        if count > 0 {
            *expected_reasons
                .entry(kind.expected_reason().to_owned())
                .or_default() += count;
        }
    }
    assert_eq!(reasons, expected_reasons, "dlq reasons");

    // Committed counters: equal to the truth per partition, conserved.
    let checkpoints = committed_checkpoints(&input.bootstrap, group, &input.topic);
    assert_eq!(checkpoints.len(), PARTITIONS as usize);
    let mut sum = PartitionCounters::default();
    for (partition, (_offset, checkpoint)) in &checkpoints {
        let counters = checkpoint.counters;
        assert!(
            counters.is_conserved(),
            "partition {partition} counters conserve: {counters:?}"
        );
        let expected = truth
            .per_partition
            .iter()
            .find(|figures| i64::from(figures.partition) == i64::from(*partition))
            .expect("truth has the partition");
        assert_eq!(
            (
                counters.consumed,
                counters.counted,
                counters.duplicates,
                counters.too_late,
                counters.rejected
            ),
            (
                expected.records,
                expected.counted,
                expected.duplicates,
                expected.too_late,
                expected.rejected
            ),
            "partition {partition} counters"
        );
        assert!(
            counters.ticks >= 1,
            "the gateway tick was read on partition {partition}"
        );
        sum.consumed += counters.consumed;
        sum.counted += counters.counted;
        sum.corrections += counters.corrections;
        sum.duplicates += counters.duplicates;
        sum.conflicting_duplicates += counters.conflicting_duplicates;
        sum.too_late += counters.too_late;
        sum.rejected += counters.rejected;
    }
    assert_eq!(sum.consumed, truth.produced);
    assert_eq!(sum.counted, truth.counted);
    assert_eq!(sum.corrections, truth.counted_corrections);
    assert_eq!(sum.duplicates, truth.duplicates);
    assert_eq!(sum.conflicting_duplicates, truth.conflicting_duplicates);

    let mut multiset: Vec<(Vec<u8>, Vec<u8>)> = rows
        .into_iter()
        .map(|record| (record.key.unwrap_or_default(), record.value))
        .collect();
    multiset.sort();
    multiset
}

fn count_classes(input: &Input) -> String {
    let truth = &input.truth;
    format!(
        "produced {} counted {} (corrections {}) duplicates {} too_late {} rejected {}",
        truth.produced,
        truth.counted,
        truth.counted_corrections,
        truth.duplicates,
        truth.too_late,
        truth.rejected
    )
}

/// Small fetches: the aggregator then takes seconds over the input, so stops and aborts
/// land in the middle of it.
fn slow_fetches(settings: &mut AggregatorSettings) {
    let client = &mut settings.config.kafka.client;
    client.insert("max.partition.fetch.bytes".to_owned(), "4096".to_owned());
    client.insert("fetch.wait.max.ms".to_owned(), "20".to_owned());
}

#[test]
fn aggregates_equal_ground_truth_and_counters_conserve() {
    let input = produce_input(30_000, 7);
    eprintln!("input: {}", count_classes(&input));
    let outputs = Outputs::random();
    create_topics(
        &input.bootstrap,
        &[&outputs.aggregates, &outputs.late, &outputs.dlq],
    );
    let group = format!("agg-test-group-{}", suffix());
    let summary = run_aggregator(settings(&input, &outputs, &group)).expect("aggregator run");
    eprintln!("summary: {summary:?}");
    assert_eq!(summary.exit, ExitReason::Idle);
    assert!(summary.rows_emitted > 0);
    assert_eq!(summary.transactions_aborted, 0);
    let rows = verify_run(&input, &outputs, &group);
    assert_eq!(rows.len() as u64, summary.rows_emitted);
}

#[test]
fn aborted_transactions_and_restarts_change_nothing() {
    let input = produce_input(20_000, 11);
    eprintln!("input: {}", count_classes(&input));

    // Uninterrupted reference run.
    let reference = Outputs::random();
    create_topics(
        &input.bootstrap,
        &[&reference.aggregates, &reference.late, &reference.dlq],
    );
    let reference_group = format!("agg-test-group-{}", suffix());
    run_aggregator(settings(&input, &reference, &reference_group)).expect("reference run");
    let reference_rows = verify_run(&input, &reference, &reference_group);

    // Every third transaction aborted.
    let aborting = Outputs::random();
    create_topics(
        &input.bootstrap,
        &[&aborting.aggregates, &aborting.late, &aborting.dlq],
    );
    let aborting_group = format!("agg-test-group-{}", suffix());
    let mut abort_settings = settings(&input, &aborting, &aborting_group);
    abort_settings.abort_every = std::num::NonZeroU32::new(3);
    // Many small transactions, so many of them abort.
    abort_settings.commit_interval = Duration::from_millis(20);
    slow_fetches(&mut abort_settings);
    let summary = run_aggregator(abort_settings).expect("aborting run");
    eprintln!("aborting run: {summary:?}");
    assert!(
        summary.transactions_aborted > 0,
        "the hook aborted transactions"
    );
    let aborting_rows = verify_run(&input, &aborting, &aborting_group);
    assert_eq!(
        aborting_rows, reference_rows,
        "rows with aborts equal the uninterrupted rows"
    );

    // Stopped and restarted several times: each restart restores from the checkpoint.
    let restarted = Outputs::random();
    create_topics(
        &input.bootstrap,
        &[&restarted.aggregates, &restarted.late, &restarted.dlq],
    );
    let restarted_group = format!("agg-test-group-{}", suffix());
    let mut base = settings(&input, &restarted, &restarted_group);
    base.commit_interval = Duration::from_millis(50);
    slow_fetches(&mut base);
    let mut restored = 0;
    let mut committed_offsets = Vec::new();
    let total = i64::try_from(input.truth.produced).expect("small") + i64::from(PARTITIONS);
    for percent in [20_i64, 45, 70] {
        let summary = run_aggregator_until_committed(
            base.clone(),
            &restarted_group,
            &input.topic,
            total * percent / 100,
        )
        .expect("partial run");
        restored += summary.records_restored;
        committed_offsets.push(committed_offset_sum(
            &input.bootstrap,
            &restarted_group,
            &input.topic,
        ));
    }
    eprintln!("committed offsets after each stop: {committed_offsets:?}");
    let mut last = base.clone();
    // Committed offsets win: no start position is needed any more.
    last.start_from = None;
    let summary = run_aggregator(last).expect("final run");
    restored += summary.records_restored;
    eprintln!("restarted runs restored {restored} records");
    assert!(restored > 0, "restarts re-read input to rebuild state");
    let restarted_rows = verify_run(&input, &restarted, &restarted_group);
    assert_eq!(
        restarted_rows, reference_rows,
        "rows with restarts equal the uninterrupted rows"
    );
}

#[test]
fn refuses_to_start_a_new_group_without_a_start_position() {
    let bootstrap = bootstrap();
    let topic = format!("agg-test-events-{}", suffix());
    let outputs = Outputs::random();
    create_topics(
        &bootstrap,
        &[&topic, &outputs.aggregates, &outputs.late, &outputs.dlq],
    );
    let input = Input {
        bootstrap,
        topic: topic.clone(),
        truth: Generator::new(generator_config(1, 1))
            .expect("config")
            .truth(),
    };
    let mut settings = settings(&input, &outputs, &format!("agg-test-group-{}", suffix()));
    settings.start_from = None;
    let error =
        run_aggregator(settings).expect_err("a new group without --start-from must not start");
    let message = error.to_string();
    assert!(
        matches!(error, AggregatorError::NoStartPosition { .. }),
        "{message}"
    );
    assert!(message.contains(&topic), "{message}");
    assert!(message.contains("--start-from"), "{message}");
}

/// Keeps `RecordClass` in use: the generator's classes are what the truth counts.
#[test]
fn generator_produces_every_class_for_these_parameters() {
    let mut generator = Generator::new(generator_config(20_000, 11)).expect("config");
    let mut seen = BTreeMap::new();
    while let Some(record) = generator.next_record() {
        let name = match record.class {
            RecordClass::OnTime | RecordClass::OutOfOrder => "on_time",
            RecordClass::Correction => "correction",
            RecordClass::TooLate => "too_late",
            RecordClass::Duplicate | RecordClass::ConflictingDuplicate => "duplicate",
            RecordClass::Rejected(_) => "rejected",
        };
        *seen.entry(name).or_insert(0_u64) += 1;
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
}
