//! Real-broker helpers for aggregator tests: topics, generated input and its ground
//! truth, read_committed reads, committed checkpoints, the comparison with the truth,
//! and `tally aggregate` child processes.
//!
//! Everything is parametrised by the partition count and the event-time parameters, so
//! tests with different shapes share one verification. The ground truth comes from
//! `tally-gen`'s generator and is computed independently of the aggregator.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tally_aggregator::Checkpoint;
use tally_core::aggregate::BillingAggregate;
use tally_core::codec::{decode_aggregate, encode_tick};
use tally_core::event::{TickOrigin, UsageTick};
use tally_core::partition::PartitionCounters;
use tally_gen::generator::{TokenSums, WindowTruth};
use tally_gen::{Generator, GeneratorConfig, GroundTruth};

use super::money::TruthContracts;
use super::{TestTopics, bootstrap, rand_name};

/// How long a read of a whole topic may take before the test fails.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The event-time parameters of one test (the generator and the aggregator share them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTime {
    pub window_ms: i64,
    pub max_out_of_orderness_ms: i64,
    pub allowed_lateness_ms: i64,
    pub correction_horizon_ms: i64,
}

impl EventTime {
    /// The parameters of the exactly-once tests: 10 s windows with corrections.
    pub const EOS: EventTime = EventTime {
        window_ms: 10_000,
        max_out_of_orderness_ms: 2_000,
        allowed_lateness_ms: 5_000,
        correction_horizon_ms: 40_000,
    };

    /// The smallest dedupe horizon the aggregator accepts, plus a window.
    pub fn dedupe_horizon_ms(&self) -> i64 {
        self.allowed_lateness_ms + self.correction_horizon_ms + self.window_ms
    }

    /// A generator config for these parameters (other fields default).
    pub fn generator(&self, count: u64, seed: u64, partitions: i32) -> GeneratorConfig {
        GeneratorConfig {
            seed,
            count,
            rate_per_sec: 400,
            partitions: u32::try_from(partitions).expect("positive partition count"),
            tenants: 60,
            window_ms: self.window_ms,
            max_out_of_orderness_ms: self.max_out_of_orderness_ms,
            allowed_lateness_ms: self.allowed_lateness_ms,
            correction_horizon_ms: self.correction_horizon_ms,
            ..GeneratorConfig::default()
        }
    }
}

/// A plain client config for the broker.
pub fn kafka_client(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

/// Creates `names` with `partitions` partitions each (replication 1).
pub fn create_topics(bootstrap: &str, names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        kafka_client(bootstrap).create().expect("admin client");
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
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

/// Fresh output topic names for a run over `input_topic`.
pub fn fresh_outputs(input_topic: &str) -> TestTopics {
    TestTopics {
        usage_events: input_topic.to_owned(),
        ..TestTopics::random()
    }
}

/// Creates the output topics of `topics` (aggregates, late, dlq, checkpoints).
pub fn create_outputs(topics: &TestTopics, partitions: i32) {
    create_topics(
        &bootstrap(),
        &[
            &topics.billing_aggregates,
            &topics.late,
            &topics.dlq,
            &topics.checkpoints,
        ],
        partitions,
    );
}

/// A generated input topic and its ground truth.
#[derive(Debug, Clone)]
pub struct GeneratedInput {
    pub bootstrap: String,
    pub topic: String,
    pub partitions: i32,
    pub truth: GroundTruth,
    /// Whether every partition ends with a far-future gateway tick.
    pub end_tick: bool,
}

impl GeneratedInput {
    /// One line with the truth's class counts.
    pub fn describe(&self) -> String {
        let truth = &self.truth;
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

    /// The truth's figures of one partition.
    pub fn partition_truth(&self, partition: i32) -> &tally_gen::generator::PartitionTruth {
        self.truth
            .per_partition
            .iter()
            .find(|figures| i64::from(figures.partition) == i64::from(partition))
            .expect("the truth has every partition")
    }
}

/// Creates `topic` with `config.partitions` partitions and produces the generated
/// records into it; with `end_tick`, then a gateway tick 24 h past the last send time
/// to every partition, so every window and correction pane closes at a fixed offset.
pub fn produce_generated(topic: &str, config: GeneratorConfig, end_tick: bool) -> GeneratedInput {
    produce_generated_with(topic, config, end_tick, ProducerTuning::DEFAULT)
}

/// [`produce_generated`] with explicit producer settings.
pub fn produce_generated_with(
    topic: &str,
    config: GeneratorConfig,
    end_tick: bool,
    tuning: ProducerTuning,
) -> GeneratedInput {
    let partitions = i32::try_from(config.partitions).expect("small partition count");
    create_topics(&bootstrap(), &[topic], partitions);
    produce_into(topic, config, end_tick, None, tuning)
}

/// Producer settings for generated input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerTuning {
    /// `batch.num.messages` (with room for 500 000 queued messages); `None` keeps
    /// librdkafka's defaults.
    pub batch_messages: Option<u32>,
    /// Bound of the final flush.
    pub flush_timeout: Duration,
}

impl ProducerTuning {
    /// librdkafka's batching, a 60 s flush.
    pub const DEFAULT: ProducerTuning = ProducerTuning {
        batch_messages: None,
        flush_timeout: Duration::from_secs(60),
    };

    /// Record batches of at most `batch_messages` records and a 120 s flush. A
    /// consumer's `max.partition.fetch.bytes` cannot split a batch, so small batches are
    /// what lets small fetches slow a consumer down.
    pub fn batches(batch_messages: u32) -> ProducerTuning {
        ProducerTuning {
            batch_messages: Some(batch_messages),
            flush_timeout: Duration::from_secs(120),
        }
    }
}

/// Input produced on a thread at a bounded rate while aggregators run: a live stream.
/// The records (and the truth) are those of [`produce_generated`]; only the wall-clock
/// pace differs, and the records carry their generated timestamps either way.
#[derive(Debug)]
pub struct PacedInput {
    pub bootstrap: String,
    pub topic: String,
    pub partitions: i32,
    /// Records to produce, the end ticks excluded.
    pub count: u64,
    pub end_tick: bool,
    handle: thread::JoinHandle<GeneratedInput>,
}

impl PacedInput {
    /// Creates `topic` and starts producing about `records_per_sec` records a second.
    pub fn start(
        topic: &str,
        config: GeneratorConfig,
        end_tick: bool,
        records_per_sec: u64,
    ) -> PacedInput {
        let partitions = i32::try_from(config.partitions).expect("small partition count");
        let bootstrap = bootstrap();
        create_topics(&bootstrap, &[topic], partitions);
        let count = config.count;
        let name = topic.to_owned();
        let handle = thread::spawn(move || {
            produce_into(
                &name,
                config,
                end_tick,
                Some(records_per_sec),
                ProducerTuning::DEFAULT,
            )
        });
        PacedInput {
            bootstrap,
            topic: topic.to_owned(),
            partitions,
            count,
            end_tick,
            handle,
        }
    }

    /// Input offsets to commit once everything is produced (end ticks included).
    pub fn total_offsets(&self) -> i64 {
        let ticks = if self.end_tick { self.partitions } else { 0 };
        i64::try_from(self.count).expect("small") + i64::from(ticks)
    }

    /// Whether the producer is still producing (records still arrive).
    pub fn producing(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Σ committed offsets of `group` on the input.
    pub fn committed(&self, group: &str) -> i64 {
        committed_offset_sum(&self.bootstrap, group, &self.topic, self.partitions)
    }

    /// Waits for the producer to finish; the input and its truth.
    pub fn finish(self) -> GeneratedInput {
        let input = self.handle.join().expect("input producer panicked");
        assert_eq!(
            input.truth.produced, self.count,
            "every record was produced"
        );
        input
    }
}

pub fn produce_into(
    topic: &str,
    config: GeneratorConfig,
    end_tick: bool,
    records_per_sec: Option<u64>,
    tuning: ProducerTuning,
) -> GeneratedInput {
    let bootstrap = bootstrap();
    let partitions = i32::try_from(config.partitions).expect("small partition count");
    let mut generator = Generator::new(config).expect("valid generator config");
    let mut producer_config = kafka_client(&bootstrap);
    producer_config
        .set("enable.idempotence", "true")
        .set("linger.ms", "20");
    if let Some(batch_messages) = tuning.batch_messages {
        producer_config
            .set("queue.buffering.max.messages", "500000")
            .set("batch.num.messages", batch_messages.to_string());
    }
    let producer: BaseProducer = producer_config.create().expect("producer");
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
    let started = Instant::now();
    let mut sent = 0_u64;
    while let Some(record) = generator.next_record() {
        let partition = i32::try_from(record.partition).expect("small");
        let mut out = BaseRecord::<[u8], [u8]>::to(topic)
            .partition(partition)
            .payload(&record.value)
            .timestamp(record.timestamp_ms);
        if let Some(key) = record.key.as_deref() {
            out = out.key(key);
        }
        send(out);
        sent += 1;
        if let Some(rate) = records_per_sec
            && sent.is_multiple_of(100)
        {
            let due = Duration::from_micros(sent * 1_000_000 / rate.max(1));
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                thread::sleep(ahead);
            }
        }
    }
    let truth = generator.truth();
    assert!(truth.is_conserved(), "the generator's truth conserves");
    if end_tick {
        let last_send = truth.last_send_time_ms.expect("records were produced");
        let tick_time_ms = last_send + 24 * 3_600_000;
        let mut tick = Vec::new();
        encode_tick(
            &UsageTick {
                tick_time_ms,
                origin: TickOrigin::Gateway,
            },
            &mut tick,
        );
        for partition in 0..partitions {
            // A tick's time is bounded against its record timestamp like an event's,
            // so the tick is sent when it says it is (a day after the last record).
            send(
                BaseRecord::<[u8], [u8]>::to(topic)
                    .partition(partition)
                    .payload(&tick)
                    .timestamp(tick_time_ms),
            );
        }
    }
    producer.flush(tuning.flush_timeout).expect("flush input");
    GeneratedInput {
        bootstrap,
        topic: topic.to_owned(),
        partitions,
        truth,
        end_tick,
    }
}

/// One record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub timestamp_ms: Option<i64>,
    pub headers: BTreeMap<String, String>,
}

/// A group-less consumer of every partition of `topic` from the beginning, reporting
/// the end of each partition; `read_committed` or `read_uncommitted`.
pub fn topic_reader(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    read_committed: bool,
) -> BaseConsumer {
    let consumer: BaseConsumer = kafka_client(bootstrap)
        .set("group.id", rand_name("reader"))
        .set(
            "isolation.level",
            if read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("reader");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("offset");
    }
    consumer.assign(&assignment).expect("assign");
    consumer
}

/// A consumed message as a [`ReadRecord`] (header values as lossy UTF-8).
pub fn to_read_record(message: &BorrowedMessage<'_>) -> ReadRecord {
    let mut headers = BTreeMap::new();
    if let Some(list) = message.headers() {
        for header in list.iter() {
            headers.insert(
                header.key.to_owned(),
                String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
            );
        }
    }
    ReadRecord {
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().unwrap_or_default().to_vec(),
        timestamp_ms: message.timestamp().to_millis(),
        headers,
    }
}

/// Reads every record of `topic` from the beginning to the end of every partition,
/// `read_committed` or `read_uncommitted`, within [`READ_TIMEOUT`].
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    read_committed: bool,
) -> Vec<ReadRecord> {
    read_topic_within(bootstrap, topic, partitions, read_committed, READ_TIMEOUT)
}

/// [`read_topic`] within `timeout`.
pub fn read_topic_within(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    read_committed: bool,
    timeout: Duration,
) -> Vec<ReadRecord> {
    let consumer = topic_reader(bootstrap, topic, partitions, read_committed);
    let mut at_end = vec![false; usize::try_from(partitions).expect("partitions")];
    let mut records = Vec::new();
    let started = Instant::now();
    while !at_end.iter().all(|done| *done) {
        assert!(
            started.elapsed() < timeout,
            "reading {topic} did not reach the end of every partition within {timeout:?} \
             (at end: {at_end:?}): is a transaction left open?"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                at_end[usize::try_from(message.partition()).expect("partition")] = false;
                records.push(to_read_record(&message));
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

/// Reads every committed record of `topic`.
pub fn read_committed(bootstrap: &str, topic: &str, partitions: i32) -> Vec<ReadRecord> {
    read_topic(bootstrap, topic, partitions, true)
}

/// Reads every committed record of `topic` within `timeout`.
pub fn read_committed_within(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Vec<ReadRecord> {
    read_topic_within(bootstrap, topic, partitions, true, timeout)
}

/// The committed offsets of `group` on `topic`, read without joining the group with
/// read_committed: librdkafka asks the broker for *stable* offsets, so a pending
/// transactional offset commit makes this wait (the error when it lasts past `timeout`).
pub fn committed_offsets_within(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> KafkaResult<TopicPartitionList> {
    let consumer: BaseConsumer = kafka_client(bootstrap)
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("offset reader");
    let mut query = TopicPartitionList::new();
    for partition in 0..partitions {
        query.add_partition(topic, partition);
    }
    committed_offsets_retrying(&consumer, &query, timeout)
}

/// `committed_offsets`, retried while the group's coordinator is moving or loading
/// (right after the broker starts, `__consumer_offsets` is still being created), up to
/// `timeout` in all.
pub fn committed_offsets_retrying(
    consumer: &BaseConsumer,
    query: &TopicPartitionList,
    timeout: Duration,
) -> KafkaResult<TopicPartitionList> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match consumer.committed_offsets(query.clone(), left) {
            Err(error)
                if Instant::now() < deadline
                    && matches!(
                        error.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::NotCoordinator
                                | RDKafkaErrorCode::CoordinatorLoadInProgress
                                | RDKafkaErrorCode::CoordinatorNotAvailable
                        )
                    ) =>
            {
                thread::sleep(Duration::from_millis(100));
            }
            result => return result,
        }
    }
}

fn committed_elements(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> TopicPartitionList {
    committed_offsets_within(bootstrap, group, topic, partitions, Duration::from_secs(30))
        .expect("committed offsets")
}

/// The committed offsets and checkpoints of `group` on `topic`, by partition
/// (partitions without a committed offset are absent).
pub fn committed_checkpoints(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, (i64, Checkpoint)> {
    committed_elements(bootstrap, group, topic, partitions)
        .elements()
        .iter()
        .filter_map(|element| {
            let Offset::Offset(offset) = element.offset() else {
                return None;
            };
            let checkpoint =
                Checkpoint::from_metadata(element.metadata()).expect("tally checkpoint metadata");
            Some((element.partition(), (offset, checkpoint)))
        })
        .collect()
}

/// Σ committed offsets of `group` on `topic` (partitions without one count 0).
pub fn committed_offset_sum(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    committed_elements(bootstrap, group, topic, partitions)
        .elements()
        .iter()
        .map(|element| match element.offset() {
            Offset::Offset(offset) => offset,
            _ => 0,
        })
        .sum()
}

/// Whether `group` has committed the whole input: every partition's checkpoint counts
/// all of the partition's records and at least one tick.
pub fn input_fully_committed(input: &GeneratedInput, group: &str) -> bool {
    let checkpoints =
        committed_checkpoints(&input.bootstrap, group, &input.topic, input.partitions);
    (0..input.partitions).all(|partition| {
        checkpoints.get(&partition).is_some_and(|(_, checkpoint)| {
            checkpoint.counters.consumed == input.partition_truth(partition).records
                && checkpoint.counters.ticks >= 1
        })
    })
}

/// Polls `done` every 200 ms until it holds; panics after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting until {what}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// (window start, tenant, model, cloud, channel partner, region).
pub type DimsKey = (i64, String, String, String, Option<String>, String);

/// The (window, dims) key of an output row.
pub fn row_dims_key(row: &BillingAggregate) -> DimsKey {
    (
        row.window_start_ms,
        row.dims.tenant_id.clone(),
        row.dims.model.clone(),
        row.dims.cloud.as_str().to_owned(),
        row.dims.channel_partner.clone(),
        row.dims.region.clone(),
    )
}

/// The (window, dims) key of a window of the ground truth.
pub fn truth_dims_key(window: &WindowTruth) -> DimsKey {
    (
        window.window_start_ms,
        window.tenant_id.clone(),
        window.model.clone(),
        window.cloud.clone(),
        window.channel_partner.clone(),
        window.region.clone(),
    )
}

/// Counted events and token sums.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sums {
    pub events: u64,
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    pub reasoning: u64,
}

impl Sums {
    /// Adds `other` field by field.
    pub fn add(&mut self, other: Sums) {
        self.events += other.events;
        self.input += other.input;
        self.cached_input += other.cached_input;
        self.output += other.output;
        self.reasoning += other.reasoning;
    }

    /// The sums of one pane of the ground truth.
    pub fn of_truth(sums: &TokenSums) -> Sums {
        Sums {
            events: sums.events,
            input: sums.input_tokens,
            cached_input: sums.cached_input_tokens,
            output: sums.output_tokens,
            reasoning: sums.reasoning_tokens,
        }
    }

    /// The sums of one output row.
    pub fn of_row(row: &BillingAggregate) -> Sums {
        Sums {
            events: row.event_count,
            input: row.tokens.input,
            cached_input: row.tokens.cached_input,
            output: row.tokens.output,
            reasoning: row.tokens.reasoning,
        }
    }
}

/// Checks a run's committed outputs and checkpoints against the ground truth and
/// returns the aggregate rows as a sorted multiset of (key, value):
/// - every row id appears once and is the record key;
/// - every row's versions, currency, gross, shares and net equal the tests' own
///   recomputation from the row's token sums and the contracts TOML
///   ([`super::money`]), and some rows carry partner shares;
/// - Σ event counts and token sums per (window, dims) equal the truth, on time and
///   corrections split as the truth says;
/// - usage.late holds exactly the too-late events and usage.dlq exactly the rejected
///   records, with the expected reasons and source headers;
/// - the committed checkpoints' counters equal the truth per partition and conserve.
///
/// The binary runs with `deploy/contracts/default.toml` (see `ChildConfig::write`); runs
/// with other contracts use [`verify_against_truth_with`].
pub fn verify_against_truth(
    input: &GeneratedInput,
    outputs: &TestTopics,
    group: &str,
    output_partitions: i32,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    verify_against_truth_with(
        input,
        outputs,
        group,
        output_partitions,
        &TruthContracts::default_file(),
    )
}

/// [`verify_against_truth`] for a run priced by `contracts`.
pub fn verify_against_truth_with(
    input: &GeneratedInput,
    outputs: &TestTopics,
    group: &str,
    output_partitions: i32,
    contracts: &TruthContracts,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let truth = &input.truth;
    let rows = read_committed(
        &input.bootstrap,
        &outputs.billing_aggregates,
        output_partitions,
    );
    let mut money_mismatches: Vec<String> = Vec::new();
    let mut priced_rows = 0_usize;
    let mut ids: BTreeMap<String, u32> = BTreeMap::new();
    let mut per_key: BTreeMap<DimsKey, (Sums, Sums)> = BTreeMap::new();
    for record in &rows {
        let row = decode_aggregate(&record.value).expect("aggregate decodes");
        assert_eq!(
            record.key.as_deref(),
            Some(row.id.as_bytes()),
            "row key is its id"
        );
        *ids.entry(row.id.clone()).or_insert(0) += 1;
        if let Some(problem) = contracts.check_row(&row) {
            money_mismatches.push(problem);
        }
        if row.gross_micros != 0 && !row.shares.is_empty() {
            priced_rows += 1;
        }
        let entry = per_key.entry(row_dims_key(&row)).or_default();
        let sums = if row.correction_seq == 0 {
            &mut entry.0
        } else {
            &mut entry.1
        };
        sums.add(Sums::of_row(&row));
    }
    assert!(
        money_mismatches.is_empty(),
        "{} of {} rows carry other amounts than the contracts give for their token sums, \
         e.g.:\n{}",
        money_mismatches.len(),
        rows.len(),
        money_mismatches[..money_mismatches.len().min(5)].join("\n")
    );
    assert!(
        priced_rows > 0,
        "the run priced rows with partner shares (the money check checked something)"
    );
    let duplicated: Vec<_> = ids.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        duplicated.is_empty(),
        "row ids written more than once: {duplicated:?}"
    );

    let mut expected: BTreeMap<DimsKey, (Sums, Sums)> = BTreeMap::new();
    for window in &truth.windows {
        expected.insert(
            truth_dims_key(window),
            (
                Sums::of_truth(&window.on_time),
                Sums::of_truth(&window.correction),
            ),
        );
    }
    let total = |map: &BTreeMap<DimsKey, (Sums, Sums)>, pick: fn(&(Sums, Sums)) -> Sums| {
        map.values()
            .map(pick)
            .fold(Sums::default(), |mut acc, sums| {
                acc.add(sums);
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
                let mut sums = *on_time;
                sums.add(*correction);
                (key.clone(), sums)
            })
            .filter(|(_, sums)| sums.events > 0)
            .collect()
    };
    assert_eq!(
        combined(&per_key),
        combined(&expected),
        "sums per (window, dims)"
    );

    let late = read_committed(&input.bootstrap, &outputs.late, output_partitions);
    assert_eq!(late.len() as u64, truth.too_late, "usage.late count");
    assert!(
        late.iter().all(
            |record| record.headers.get("tally.reason").map(String::as_str) == Some("too_late")
        ),
        "every usage.late record has reason too_late"
    );
    let dlq = read_committed(&input.bootstrap, &outputs.dlq, output_partitions);
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
    assert_eq!(reasons, expected_dlq_reasons(truth), "dlq reasons");
    // Each rejected / too-late input record appears once (by source offset).
    for (name, records) in [("usage.late", &late), ("usage.dlq", &dlq)] {
        let mut sources = BTreeMap::new();
        for record in records.iter() {
            let source = (
                record.headers.get("tally.source.partition").cloned(),
                record.headers.get("tally.source.offset").cloned(),
            );
            *sources.entry(source).or_insert(0_u32) += 1;
        }
        assert_eq!(
            sources.len(),
            records.len(),
            "{name} holds every source record once"
        );
    }

    let checkpoints =
        committed_checkpoints(&input.bootstrap, group, &input.topic, input.partitions);
    assert_eq!(
        checkpoints.len(),
        usize::try_from(input.partitions).expect("partitions"),
        "every partition has a checkpoint"
    );
    let mut sum = PartitionCounters::default();
    for (partition, (_offset, checkpoint)) in &checkpoints {
        let counters = checkpoint.counters;
        assert!(
            counters.is_conserved(),
            "partition {partition} counters conserve: {counters:?}"
        );
        let expected = input.partition_truth(*partition);
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
            "a tick was read on partition {partition}"
        );
        add_counters(&mut sum, &counters);
    }
    assert_eq!(sum.consumed, truth.produced);
    assert_eq!(sum.counted, truth.counted);
    assert_eq!(sum.corrections, truth.counted_corrections);
    assert_eq!(sum.duplicates, truth.duplicates);
    assert_eq!(sum.conflicting_duplicates, truth.conflicting_duplicates);
    assert_eq!(sum.too_late, truth.too_late);
    assert_eq!(sum.rejected, truth.rejected);

    let mut multiset: Vec<(Vec<u8>, Vec<u8>)> = rows
        .into_iter()
        .map(|record| (record.key.unwrap_or_default(), record.value))
        .collect();
    multiset.sort();
    multiset
}

/// Adds every counter of `counters` to `sum`.
pub fn add_counters(sum: &mut PartitionCounters, counters: &PartitionCounters) {
    sum.consumed += counters.consumed;
    sum.counted += counters.counted;
    sum.corrections += counters.corrections;
    sum.duplicates += counters.duplicates;
    sum.conflicting_duplicates += counters.conflicting_duplicates;
    sum.too_late += counters.too_late;
    sum.rejected += counters.rejected;
    sum.ticks += counters.ticks;
}

/// The DLQ reasons the truth's rejected records must carry, with their counts.
pub fn expected_dlq_reasons(truth: &GroundTruth) -> BTreeMap<String, u64> {
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for kind in tally_gen::RejectKind::ALL {
        let count = truth
            .rejected_by_kind
            .get(kind.as_str())
            .copied()
            .unwrap_or(0);
        if count > 0 {
            *expected
                .entry(kind.expected_reason().to_owned())
                .or_default() += count;
        }
    }
    expected
}

/// What an aggregator child process runs with, beyond the topics and the group.
#[derive(Debug, Clone)]
pub struct ChildConfig {
    pub group: String,
    pub event_time: EventTime,
    pub idle_timeout_ms: i64,
    pub commit_interval_ms: i64,
    pub transaction_timeout_ms: i64,
    pub output_partitions: i32,
    /// `metrics.listen`; empty disables the endpoint.
    pub metrics_listen: String,
    /// Extra librdkafka settings (`kafka.client`).
    pub client: BTreeMap<String, String>,
}

impl ChildConfig {
    /// A group member that notices a dead peer within 6 s and whose transactions time
    /// out after 10 s.
    pub fn new(group: &str, event_time: EventTime, output_partitions: i32) -> ChildConfig {
        let mut client = BTreeMap::new();
        client.insert("session.timeout.ms".to_owned(), "6000".to_owned());
        client.insert("heartbeat.interval.ms".to_owned(), "1000".to_owned());
        ChildConfig {
            group: group.to_owned(),
            event_time,
            idle_timeout_ms: 500,
            commit_interval_ms: 200,
            transaction_timeout_ms: 10_000,
            output_partitions,
            metrics_listen: String::new(),
            client,
        }
    }

    /// For input produced while the group runs: no aggregator tick mid-stream (a
    /// pause of the producer must not move the watermark, or the classification would
    /// differ from the generator's truth); the input's own end ticks close the windows.
    pub fn live_stream(mut self) -> ChildConfig {
        self.idle_timeout_ms = 120_000;
        self
    }

    /// Adds librdkafka settings (`kafka.client`).
    pub fn with_client(mut self, entries: &[(&str, &str)]) -> ChildConfig {
        for (key, value) in entries {
            self.client.insert((*key).to_owned(), (*value).to_owned());
        }
        self
    }

    /// Writes the config file `dir/<name>.toml`.
    pub fn write(&self, dir: &Path, name: &str, topics: &TestTopics, partitions: i32) -> PathBuf {
        let path = dir.join(format!("{name}.toml"));
        let contracts = super::default_contracts_path();
        let client: String = self
            .client
            .iter()
            .map(|(key, value)| format!("{key:?} = {value:?}\n"))
            .collect();
        let event_time = self.event_time;
        let body = format!(
            r#"[kafka]
bootstrap_servers = "{bootstrap}"

[kafka.client]
{client}
[topics]
usage_events = "{events}"
billing_aggregates = "{aggregates}"
late = "{late}"
dlq = "{dlq}"
checkpoints = "{checkpoints}"
partitions = {partitions}
output_partitions = {output_partitions}
replication_factor = 1

[aggregator]
group_id = "{group}"
contracts_path = "{contracts}"
window_ms = {window_ms}
max_out_of_orderness_ms = {max_out_of_orderness_ms}
allowed_lateness_ms = {allowed_lateness_ms}
correction_horizon_ms = {correction_horizon_ms}
dedupe_horizon_ms = {dedupe_horizon_ms}
idle_timeout_ms = {idle_timeout_ms}
commit_interval_ms = {commit_interval_ms}
transaction_timeout_ms = {transaction_timeout_ms}

[metrics]
listen = "{listen}"
"#,
            bootstrap = bootstrap(),
            events = topics.usage_events,
            aggregates = topics.billing_aggregates,
            late = topics.late,
            dlq = topics.dlq,
            checkpoints = topics.checkpoints,
            output_partitions = self.output_partitions,
            group = self.group,
            contracts = contracts.display(),
            window_ms = event_time.window_ms,
            max_out_of_orderness_ms = event_time.max_out_of_orderness_ms,
            allowed_lateness_ms = event_time.allowed_lateness_ms,
            correction_horizon_ms = event_time.correction_horizon_ms,
            dedupe_horizon_ms = event_time.dedupe_horizon_ms(),
            idle_timeout_ms = self.idle_timeout_ms,
            commit_interval_ms = self.commit_interval_ms,
            transaction_timeout_ms = self.transaction_timeout_ms,
            listen = self.metrics_listen,
        );
        std::fs::write(&path, body).expect("write config");
        path
    }
}

/// How a `tally aggregate` child process logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildLog<'a> {
    /// Text lines (`NO_COLOR`) with this `RUST_LOG` filter, into a new file.
    Text { filter: &'a str },
    /// JSON lines (`TALLY_LOG_FORMAT=json`, `RUST_LOG=info`) appended to the file, so
    /// the restarts of one deployment share one log.
    JsonAppend,
}

/// A `tally aggregate` child process; killed (SIGKILL) when dropped while running, so
/// a failing test leaves no process behind.
#[derive(Debug)]
pub struct AggregatorProcess {
    pub instance_id: String,
    pub log_path: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl AggregatorProcess {
    /// Starts `tally aggregate --config <config> --instance-id <instance_id>
    /// --start-from earliest <extra>`; stdout and stderr go to `<log_dir>/<log_name>.log`.
    pub fn spawn(
        config: &Path,
        instance_id: &str,
        log_dir: &Path,
        log_name: &str,
        extra: &[&str],
    ) -> AggregatorProcess {
        AggregatorProcess::spawn_with_log_filter(
            config,
            instance_id,
            log_dir,
            log_name,
            extra,
            "info",
        )
    }

    /// [`AggregatorProcess::spawn`] with a `RUST_LOG` filter.
    pub fn spawn_with_log_filter(
        config: &Path,
        instance_id: &str,
        log_dir: &Path,
        log_name: &str,
        extra: &[&str],
        log_filter: &str,
    ) -> AggregatorProcess {
        AggregatorProcess::start(
            config,
            instance_id,
            extra,
            &log_dir.join(format!("{log_name}.log")),
            ChildLog::Text { filter: log_filter },
        )
    }

    /// Starts `tally aggregate --config <config> --instance-id <instance_id>
    /// --start-from earliest <extra>`; stdout and stderr go to `log_path` as `log` says.
    pub fn start(
        config: &Path,
        instance_id: &str,
        extra: &[&str],
        log_path: &Path,
        log: ChildLog<'_>,
    ) -> AggregatorProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
        command
            .arg("aggregate")
            .arg("--config")
            .arg(config)
            .args(["--instance-id", instance_id, "--start-from", "earliest"])
            .args(extra);
        let file = match log {
            ChildLog::Text { filter } => {
                command
                    .env("RUST_LOG", filter)
                    .env("NO_COLOR", "1")
                    .env_remove("TALLY_LOG_FORMAT");
                File::create(log_path).expect("create log file")
            }
            ChildLog::JsonAppend => {
                command
                    .env("TALLY_LOG_FORMAT", "json")
                    .env("RUST_LOG", "info");
                File::options()
                    .create(true)
                    .append(true)
                    .open(log_path)
                    .expect("open log")
            }
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("spawn tally aggregate");
        AggregatorProcess {
            instance_id: instance_id.to_owned(),
            log_path: log_path.to_owned(),
            child,
            status: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// The exit status, if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if started.elapsed() >= timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit; panics (after SIGKILL) if
    /// the process does not stop in time.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.try_status() {
            return status;
        }
        self.signal("TERM");
        match self.wait_timeout(timeout) {
            Some(status) => status,
            None => {
                self.kill();
                panic!(
                    "{} did not stop within {timeout:?} of SIGTERM; log:\n{}",
                    self.instance_id,
                    self.log_tail(40)
                );
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = Some(self.child.wait().expect("wait after kill"));
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }
}

impl Drop for AggregatorProcess {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            // A stopped process only dies of SIGKILL; continue it anyway.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.pid().to_string())
                .status();
            self.kill();
        }
    }
}

/// The last `lines` lines of the log file `log`, for failure messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}
