//! Helpers for crash tests that run the real `tally aggregate` binary as child processes
//! against a real broker and kill it: input generation with a ground truth, config
//! files, a process guard that never leaves a child behind, read_committed readers,
//! transaction-state probes, and the full check of a run against the ground truth
//! (row sums, row amounts recomputed from the contracts, side topics, checkpoints).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tally_aggregator::Checkpoint;
use tally_core::aggregate::{BillingAggregate, RowKind};
use tally_core::codec::{decode_aggregate, encode_tick};
use tally_core::contracts::Contracts;
use tally_core::event::{TickOrigin, UsageTick};
use tally_core::money::round_half_even;
use tally_core::partition::PartitionCounters;
use tally_core::window::WindowSize;
use tally_producer::generator::TokenSums;
use tally_producer::{Generator, GeneratorConfig, GroundTruth};

use super::TestTopics;

/// Partitions of every topic of a kill test.
pub const PARTITIONS: i32 = 4;
/// Event-time parameters shared by the generator and the aggregator config.
pub const WINDOW_MS: i64 = 10_000;
/// Allowed out-of-orderness, ms.
pub const MAX_OUT_OF_ORDERNESS_MS: i64 = 2_000;
/// Allowed lateness, ms.
pub const ALLOWED_LATENESS_MS: i64 = 5_000;
/// Correction horizon, ms.
pub const CORRECTION_HORIZON_MS: i64 = 40_000;
/// `transaction.timeout.ms` of the aggregator under test.
pub const TRANSACTION_TIMEOUT_MS: i64 = 10_000;
/// `session.timeout.ms` of the aggregator under test (the broker's minimum).
pub const SESSION_TIMEOUT_MS: i64 = 6_000;

/// The contracts file the aggregator runs with.
pub fn contracts_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/contracts/default.toml")
}

/// The contracts, loaded the way the aggregator loads them.
pub fn load_contracts() -> Contracts {
    let text = std::fs::read_to_string(contracts_path()).expect("read contracts");
    Contracts::load(&text, WindowSize::new(WINDOW_MS).expect("window")).expect("contracts load")
}

fn client(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

/// Creates `names` with [`PARTITIONS`] partitions each.
pub fn create_topics(bootstrap: &str, names: &[&str]) {
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

/// Creates the three output topics of `topics` (the input is created by [`produce_input`]).
pub fn create_outputs(bootstrap: &str, topics: &TestTopics) {
    create_topics(
        bootstrap,
        &[&topics.billing_aggregates, &topics.late, &topics.dlq],
    );
}

/// Generator parameters matching the aggregator config of [`write_aggregator_config`].
pub fn generator_config(count: u64, seed: u64) -> GeneratorConfig {
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

/// Creates `topic` and preloads it with `count` generated records (every class) and,
/// last on every partition, a gateway tick a day after the last send time, so every
/// window and correction pane closes at a fixed input offset. Record batches hold at
/// most `batch_messages` records: a consumer's `max.partition.fetch.bytes` cannot split a
/// batch, so small batches are what lets small fetches slow a consumer down. Returns the
/// ground truth.
pub fn produce_input(
    bootstrap: &str,
    topic: &str,
    count: u64,
    seed: u64,
    batch_messages: u32,
) -> GroundTruth {
    create_topics(bootstrap, &[topic]);
    let mut generator =
        Generator::new(generator_config(count, seed)).expect("valid generator config");
    let producer: BaseProducer = client(bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "500000")
        .set("batch.num.messages", batch_messages.to_string())
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
        let mut out = BaseRecord::<[u8], [u8]>::to(topic)
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
            BaseRecord::<[u8], [u8]>::to(topic)
                .partition(partition)
                .payload(&tick),
        );
    }
    producer
        .flush(Duration::from_secs(120))
        .expect("flush input");
    truth
}

/// Writes the aggregator's config file: the test's topics and group, the event-time
/// parameters of [`generator_config`], `transaction_timeout_ms` =
/// [`TRANSACTION_TIMEOUT_MS`] and `session.timeout.ms` = [`SESSION_TIMEOUT_MS`] (passed
/// to librdkafka through `[kafka.client]`), plus `client` entries.
pub fn write_aggregator_config(
    dir: &Path,
    topics: &TestTopics,
    group: &str,
    client: &[(&str, &str)],
) -> PathBuf {
    let path = dir.join(format!("{group}.toml"));
    let mut client_lines = format!(
        "\"session.timeout.ms\" = \"{SESSION_TIMEOUT_MS}\"\n\"heartbeat.interval.ms\" = \"1000\"\n"
    );
    for (key, value) in client {
        client_lines.push_str(&format!("\"{key}\" = \"{value}\"\n"));
    }
    let body = format!(
        r#"[kafka]
bootstrap_servers = "{bootstrap}"

[kafka.client]
{client_lines}
[topics]
usage_events = "{events}"
billing_aggregates = "{aggregates}"
late = "{late}"
dlq = "{dlq}"
partitions = {PARTITIONS}
output_partitions = {PARTITIONS}
replication_factor = 1

[aggregator]
group_id = "{group}"
window_ms = {WINDOW_MS}
max_out_of_orderness_ms = {MAX_OUT_OF_ORDERNESS_MS}
allowed_lateness_ms = {ALLOWED_LATENESS_MS}
correction_horizon_ms = {CORRECTION_HORIZON_MS}
dedupe_horizon_ms = {dedupe}
idle_timeout_ms = 500
commit_interval_ms = 200
transaction_timeout_ms = {TRANSACTION_TIMEOUT_MS}
contracts_path = "{contracts}"

[metrics]
listen = ""
"#,
        bootstrap = super::bootstrap(),
        events = topics.usage_events,
        aggregates = topics.billing_aggregates,
        late = topics.late,
        dlq = topics.dlq,
        dedupe = ALLOWED_LATENESS_MS + CORRECTION_HORIZON_MS + WINDOW_MS,
        contracts = contracts_path().display(),
    );
    std::fs::write(&path, body).expect("write config");
    path
}

/// A running `tally aggregate` child process. Dropping it SIGKILLs the child, so a
/// failing test never leaves one behind.
pub struct AggregatorProcess {
    child: Option<Child>,
    /// Where its stdout and stderr (JSON log lines) go.
    pub log: PathBuf,
}

impl AggregatorProcess {
    /// Starts `tally aggregate --config <config> --instance-id <instance_id> <extra>`,
    /// logging JSON lines to `log` (appended).
    pub fn spawn(config: &Path, instance_id: &str, extra: &[String], log: &Path) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log");
        let err = out.try_clone().expect("clone log handle");
        let child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("aggregate")
            .arg("--config")
            .arg(config)
            .arg("--instance-id")
            .arg(instance_id)
            .args(extra)
            .env("TALLY_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn tally aggregate");
        AggregatorProcess {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// SIGKILL (`Child::kill`) and reap. Returns whether the child was still running.
    pub fn sigkill(&mut self) -> bool {
        let mut child = self.child.take().expect("child");
        let running = child.try_wait().expect("try_wait").is_none();
        let _ = child.kill();
        child.wait().expect("reap killed child");
        running
    }

    /// Sends SIGTERM with `kill -TERM <pid>`.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// The exit status if the child has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .expect("child")
            .try_wait()
            .expect("try_wait")
    }

    /// Waits for the child to exit, at most `timeout`; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AggregatorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Records re-read to restore state, summed over the "partition state restored" log
/// lines of `log`.
pub fn restored_records_in_log(log: &Path) -> u64 {
    let Ok(file) = File::open(log) else {
        return 0;
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
        .filter(|entry| {
            entry["fields"]["message"].as_str() == Some("partition state restored from the input")
        })
        .filter_map(|entry| entry["fields"]["records"].as_u64())
        .sum()
}

/// How many log lines of `log` carry the message `message`.
pub fn count_log_messages(log: &Path, message: &str) -> usize {
    let Ok(file) = File::open(log) else {
        return 0;
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
        .filter(|entry| entry["fields"]["message"].as_str() == Some(message))
        .count()
}

/// The last lines of a log, for failure messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Reads committed offsets of a group without joining it.
pub struct OffsetProbe {
    consumer: BaseConsumer,
    topic: String,
}

impl OffsetProbe {
    /// A probe of `group`'s offsets on `topic`. It reads with read_uncommitted, so
    /// librdkafka does not ask for *stable* offsets: the answer is the last committed
    /// offsets at once, instead of waiting for a pending transactional offset commit
    /// (which after a SIGKILL lasts until the transaction times out or is fenced).
    pub fn new(bootstrap: &str, group: &str, topic: &str) -> OffsetProbe {
        let consumer: BaseConsumer = client(bootstrap)
            .set("group.id", group)
            .set("isolation.level", "read_uncommitted")
            .set("enable.auto.commit", "false")
            .create()
            .expect("offset probe");
        OffsetProbe {
            consumer,
            topic: topic.to_owned(),
        }
    }

    /// Committed offsets by partition (`None`: no commit yet).
    pub fn committed(&self) -> BTreeMap<i32, Option<(i64, String)>> {
        let mut query = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            query.add_partition(&self.topic, partition);
        }
        let committed = self
            .consumer
            .committed_offsets(query, Duration::from_secs(30))
            .expect("committed offsets");
        committed
            .elements()
            .iter()
            .map(|element| {
                let value = match element.offset() {
                    Offset::Offset(offset) => Some((offset, element.metadata().to_owned())),
                    _ => None,
                };
                (element.partition(), value)
            })
            .collect()
    }

    /// Σ committed offsets (partitions without one count 0).
    pub fn sum(&self) -> i64 {
        self.committed()
            .values()
            .map(|entry| entry.as_ref().map_or(0, |(offset, _)| *offset))
            .sum()
    }

    /// The committed checkpoints by partition; panics when one is missing.
    pub fn checkpoints(&self) -> BTreeMap<i32, (i64, Checkpoint)> {
        self.committed()
            .into_iter()
            .map(|(partition, entry)| {
                let (offset, metadata) = entry
                    .unwrap_or_else(|| panic!("partition {partition} has no committed offset"));
                let checkpoint =
                    Checkpoint::from_metadata(&metadata).expect("tally checkpoint metadata");
                (partition, (offset, checkpoint))
            })
            .collect()
    }
}

/// The group's *stable* committed offsets (read_committed: librdkafka asks the broker
/// to wait for pending transactional offset commits), or the error when they are not
/// stable within `timeout`.
pub fn stable_committed(
    bootstrap: &str,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<BTreeMap<i32, Option<i64>>, KafkaError> {
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("stable offset reader");
    let mut query = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        query.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(query, timeout)?;
    Ok(committed
        .elements()
        .iter()
        .map(|element| {
            let offset = match element.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            };
            (element.partition(), offset)
        })
        .collect())
}

/// Compares the last stable offset (what a read_committed reader may read up to) with
/// the high watermark of every partition of `topics`.
pub struct TransactionProbe {
    committed: BaseConsumer,
    uncommitted: BaseConsumer,
}

impl TransactionProbe {
    /// Two group-less clients, one per isolation level.
    pub fn new(bootstrap: &str) -> TransactionProbe {
        let make = |isolation: &str| -> BaseConsumer {
            client(bootstrap)
                .set("group.id", super::rand_name("kill-probe"))
                .set("isolation.level", isolation)
                .set("enable.auto.commit", "false")
                .create()
                .expect("probe client")
        };
        TransactionProbe {
            committed: make("read_committed"),
            uncommitted: make("read_uncommitted"),
        }
    }

    /// The (topic, partition, last stable offset, high watermark) of every partition
    /// whose last stable offset lags its high watermark: an open transaction.
    pub fn open(&self, topics: &[&str]) -> Vec<(String, i32, i64, i64)> {
        let mut open = Vec::new();
        for topic in topics {
            for partition in 0..PARTITIONS {
                let (_, stable) = self
                    .committed
                    .fetch_watermarks(topic, partition, Duration::from_secs(30))
                    .expect("last stable offset");
                let (_, high) = self
                    .uncommitted
                    .fetch_watermarks(topic, partition, Duration::from_secs(30))
                    .expect("high watermark");
                if stable < high {
                    open.push(((*topic).to_owned(), partition, stable, high));
                }
            }
        }
        open
    }
}

/// One record of an output topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutputRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

fn to_output(message: &rdkafka::message::BorrowedMessage<'_>) -> OutputRecord {
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
    OutputRecord {
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
    }
}

fn committed_reader(bootstrap: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", super::rand_name("kill-reader"))
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
    consumer
}

/// Reads every committed record of `topic` (read_committed, to the end of every
/// partition), within `timeout`.
pub fn read_committed(bootstrap: &str, topic: &str, timeout: Duration) -> Vec<OutputRecord> {
    let consumer = committed_reader(bootstrap, topic);
    let mut at_end = [false; PARTITIONS as usize];
    let mut records = Vec::new();
    let started = Instant::now();
    while !at_end.iter().all(|end| *end) {
        assert!(
            started.elapsed() < timeout,
            "reading {topic} did not reach the end of every partition within {timeout:?} \
             (at end: {at_end:?}): is a transaction left open?"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                at_end[usize::try_from(message.partition()).expect("partition")] = false;
                records.push(to_output(&message));
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

/// A read_committed reader of one topic running on its own thread until stopped.
pub struct ConcurrentReader {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<OutputRecord>>>,
}

impl ConcurrentReader {
    /// Starts reading `topic` from the beginning.
    pub fn start(bootstrap: &str, topic: &str) -> ConcurrentReader {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let bootstrap = bootstrap.to_owned();
        let topic = topic.to_owned();
        let handle = thread::spawn(move || {
            let consumer = committed_reader(&bootstrap, &topic);
            let mut records = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(message)) => records.push(to_output(&message)),
                    Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                    Some(Err(error)) => panic!("concurrent reader of {topic}: {error}"),
                }
            }
            records
        });
        ConcurrentReader {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the reader and returns everything it saw.
    pub fn finish(mut self) -> Vec<OutputRecord> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("handle")
            .join()
            .expect("reader thread")
    }
}

impl Drop for ConcurrentReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// (window start, tenant, model, cloud, channel partner, region).
pub type DimsKey = (i64, String, String, String, Option<String>, String);

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
    fn add(&mut self, other: &Sums) {
        self.events += other.events;
        self.input += other.input;
        self.cached_input += other.cached_input;
        self.output += other.output;
        self.reasoning += other.reasoning;
    }

    fn of_truth(sums: &TokenSums) -> Sums {
        Sums {
            events: sums.events,
            input: sums.input_tokens,
            cached_input: sums.cached_input_tokens,
            output: sums.output_tokens,
            reasoning: sums.reasoning_tokens,
        }
    }

    fn of_row(row: &BillingAggregate) -> Sums {
        Sums {
            events: row.event_count,
            input: row.tokens.input,
            cached_input: row.tokens.cached_input,
            output: row.tokens.output,
            reasoning: row.tokens.reasoning,
        }
    }
}

/// What [`verify_against_truth`] found.
#[derive(Debug, Default)]
pub struct Verification {
    /// Rows read from billing.aggregates.
    pub rows: usize,
    /// Of which billable with a non-zero gross.
    pub priced_rows: usize,
    /// Human-readable mismatches (empty when the run is exact).
    pub mismatches: Vec<String>,
    /// The rows as a sorted multiset of (key, value bytes).
    pub multiset: Vec<(Vec<u8>, Vec<u8>)>,
    /// Σ committed counters over partitions.
    pub counters: PartitionCounters,
}

/// A row's amounts recomputed independently: exact gross = Σ tokens × price in i128,
/// gross = half-even(exact / 10⁹), each share = half-even(exact × bps / 10¹³),
/// net = gross − Σ shares. Returns the mismatch, if any.
pub fn check_row_amounts(row: &BillingAggregate, contracts: &Contracts) -> Option<String> {
    let (book, price) = match contracts.price_for(&row.dims.model, row.window_start_ms) {
        Ok(found) => found,
        Err(error) => return Some(format!("row {}: {error}", row.id)),
    };
    let Some((rules, beneficiaries)) = contracts.shares_for(
        row.dims.cloud,
        row.dims.channel_partner.as_deref(),
        row.window_start_ms,
    ) else {
        return Some(format!("row {}: no share rules in force", row.id));
    };
    if row.price_book_version != book.version() || row.share_rule_version != rules.version() {
        return Some(format!(
            "row {}: versions {}/{} but {}/{} are in force",
            row.id,
            row.price_book_version,
            row.share_rule_version,
            book.version(),
            rules.version()
        ));
    }
    if row.currency != book.currency() {
        return Some(format!("row {}: currency {}", row.id, row.currency));
    }
    let (gross, shares): (i64, Vec<(String, u32, i64)>) = match row.row_kind {
        RowKind::NonBillable => (0, Vec::new()),
        RowKind::Billable => {
            let exact: i128 = i128::from(row.tokens.input) * i128::from(price.input.0)
                + i128::from(row.tokens.cached_input) * i128::from(price.cached_input.0)
                + i128::from(row.tokens.output) * i128::from(price.output.0)
                + i128::from(row.tokens.reasoning) * i128::from(price.reasoning.0);
            let gross = round_half_even(exact, 1_000_000_000).expect("gross rounds");
            let shares = beneficiaries
                .iter()
                .map(|beneficiary| {
                    let share = round_half_even(
                        exact * i128::from(beneficiary.basis_points),
                        1_000_000_000 * 10_000,
                    )
                    .expect("share rounds");
                    (
                        beneficiary.partner.clone(),
                        beneficiary.basis_points,
                        i64::try_from(share).expect("share fits"),
                    )
                })
                .collect();
            (i64::try_from(gross).expect("gross fits"), shares)
        }
    };
    let net = gross - shares.iter().map(|(_, _, amount)| amount).sum::<i64>();
    let actual: Vec<(String, u32, i64)> = row
        .shares
        .iter()
        .map(|share| {
            (
                share.beneficiary.clone(),
                share.basis_points,
                share.amount_micros,
            )
        })
        .collect();
    if row.gross_micros != gross || actual != shares || row.net_micros != net {
        return Some(format!(
            "row {}: gross {} shares {:?} net {} but recomputed gross {} shares {:?} net {}",
            row.id, row.gross_micros, actual, row.net_micros, gross, shares, net
        ));
    }
    None
}

fn dims_key(window_start_ms: i64, row: &BillingAggregate) -> DimsKey {
    (
        window_start_ms,
        row.dims.tenant_id.clone(),
        row.dims.model.clone(),
        row.dims.cloud.as_str().to_owned(),
        row.dims.channel_partner.clone(),
        row.dims.region.clone(),
    )
}

/// Checks a finished run's outputs against the ground truth; every discrepancy becomes
/// one entry of `mismatches` (the caller asserts it is empty and reports the figures).
///
/// - Σ rows (on time + corrections) per (window, dims) = the truth's counted events and
///   token sums, also split by row kind (billable = the price book's billable statuses);
/// - every row's amounts equal [`check_row_amounts`]; every row id appears once;
/// - usage.late / usage.dlq hold exactly `too_late` / `rejected` records, each source
///   (partition, offset) once, every one from the input topic;
/// - every partition's committed checkpoint conserves and equals the truth.
pub fn verify_against_truth(
    bootstrap: &str,
    topics: &TestTopics,
    group: &str,
    truth: &GroundTruth,
    contracts: &Contracts,
) -> Verification {
    let mut result = Verification::default();
    let mismatches = &mut result.mismatches;
    let timeout = Duration::from_secs(120);

    let rows = read_committed(bootstrap, &topics.billing_aggregates, timeout);
    result.rows = rows.len();
    let mut ids: BTreeMap<String, u32> = BTreeMap::new();
    let mut per_key: BTreeMap<DimsKey, Sums> = BTreeMap::new();
    let mut per_key_kind: BTreeMap<(DimsKey, RowKind), Sums> = BTreeMap::new();
    for record in &rows {
        let row = match decode_aggregate(&record.value) {
            Ok(row) => row,
            Err(error) => {
                mismatches.push(format!(
                    "row at {}:{}: {error}",
                    record.partition, record.offset
                ));
                continue;
            }
        };
        if record.key.as_deref() != Some(row.id.as_bytes()) {
            mismatches.push(format!("row {}: key is not its id", row.id));
        }
        *ids.entry(row.id.clone()).or_default() += 1;
        if let Some(problem) = check_row_amounts(&row, contracts) {
            mismatches.push(problem);
        }
        if row.gross_micros != 0 {
            result.priced_rows += 1;
        }
        let key = dims_key(row.window_start_ms, &row);
        per_key
            .entry(key.clone())
            .or_default()
            .add(&Sums::of_row(&row));
        per_key_kind
            .entry((key, row.row_kind))
            .or_default()
            .add(&Sums::of_row(&row));
    }
    for (id, count) in &ids {
        if *count > 1 {
            mismatches.push(format!("row id {id} appears {count} times"));
        }
    }

    let billable_statuses: BTreeSet<String> = contracts
        .price_book_at(truth.first_send_time_ms.unwrap_or(0))
        .expect("price book in force")
        .billable_statuses()
        .into_iter()
        .map(|status| status.as_str().to_owned())
        .collect();
    let mut expected: BTreeMap<DimsKey, Sums> = BTreeMap::new();
    let mut expected_kind: BTreeMap<(DimsKey, RowKind), Sums> = BTreeMap::new();
    for window in &truth.windows {
        let key = (
            window.window_start_ms,
            window.tenant_id.clone(),
            window.model.clone(),
            window.cloud.clone(),
            window.channel_partner.clone(),
            window.region.clone(),
        );
        let mut sums = Sums::of_truth(&window.on_time);
        sums.add(&Sums::of_truth(&window.correction));
        if sums.events > 0 {
            expected.insert(key.clone(), sums);
        }
        for (status, panes) in &window.by_status_sums {
            let kind = if billable_statuses.contains(status) {
                RowKind::Billable
            } else {
                RowKind::NonBillable
            };
            let mut status_sums = Sums::of_truth(&panes.on_time);
            status_sums.add(&Sums::of_truth(&panes.correction));
            if status_sums.events > 0 {
                expected_kind
                    .entry((key.clone(), kind))
                    .or_default()
                    .add(&status_sums);
            }
        }
    }
    compare_maps("sums per (window, dims)", &per_key, &expected, mismatches);
    compare_maps(
        "sums per (window, dims, row kind)",
        &per_key_kind,
        &expected_kind,
        mismatches,
    );

    for (name, topic, expected_count, reason) in [
        ("usage.late", &topics.late, truth.too_late, Some("too_late")),
        ("usage.dlq", &topics.dlq, truth.rejected, None),
    ] {
        let records = read_committed(bootstrap, topic, timeout);
        if records.len() as u64 != expected_count {
            mismatches.push(format!(
                "{name}: {} records, the truth has {expected_count}",
                records.len()
            ));
        }
        let mut sources: BTreeMap<(String, String), u32> = BTreeMap::new();
        for record in &records {
            if record.headers.get("tally.source.topic") != Some(&topics.usage_events) {
                mismatches.push(format!("{name}: record from another topic"));
            }
            if let Some(reason) = reason
                && record.headers.get("tally.reason").map(String::as_str) != Some(reason)
            {
                mismatches.push(format!(
                    "{name}: reason {:?}",
                    record.headers.get("tally.reason")
                ));
            }
            let source = (
                record
                    .headers
                    .get("tally.source.partition")
                    .cloned()
                    .unwrap_or_default(),
                record
                    .headers
                    .get("tally.source.offset")
                    .cloned()
                    .unwrap_or_default(),
            );
            *sources.entry(source).or_default() += 1;
        }
        let repeated = sources.values().filter(|count| **count > 1).count();
        if repeated > 0 {
            mismatches.push(format!(
                "{name}: {repeated} source offsets written more than once"
            ));
        }
    }

    let probe = OffsetProbe::new(bootstrap, group, &topics.usage_events);
    let checkpoints = probe.checkpoints();
    if checkpoints.len() != PARTITIONS as usize {
        mismatches.push(format!("{} checkpoints", checkpoints.len()));
    }
    let mut sum = PartitionCounters::default();
    for (partition, (_offset, checkpoint)) in &checkpoints {
        let counters = checkpoint.counters;
        if !counters.is_conserved() {
            mismatches.push(format!(
                "partition {partition} does not conserve: {counters:?}"
            ));
        }
        let figures = truth
            .per_partition
            .iter()
            .find(|figures| i64::from(figures.partition) == i64::from(*partition))
            .expect("truth has the partition");
        let got = (
            counters.consumed,
            counters.counted,
            counters.duplicates,
            counters.too_late,
            counters.rejected,
        );
        let want = (
            figures.records,
            figures.counted,
            figures.duplicates,
            figures.too_late,
            figures.rejected,
        );
        if got != want {
            mismatches.push(format!(
                "partition {partition} counters (consumed, counted, duplicates, too_late, \
                 rejected) {got:?}, truth {want:?}"
            ));
        }
        if counters.ticks == 0 {
            mismatches.push(format!("partition {partition} never read the gateway tick"));
        }
        sum.consumed += counters.consumed;
        sum.counted += counters.counted;
        sum.corrections += counters.corrections;
        sum.duplicates += counters.duplicates;
        sum.conflicting_duplicates += counters.conflicting_duplicates;
        sum.too_late += counters.too_late;
        sum.rejected += counters.rejected;
        sum.ticks += counters.ticks;
    }
    let got = (
        sum.consumed,
        sum.counted,
        sum.corrections,
        sum.duplicates,
        sum.conflicting_duplicates,
        sum.too_late,
        sum.rejected,
    );
    let want = (
        truth.produced,
        truth.counted,
        truth.counted_corrections,
        truth.duplicates,
        truth.conflicting_duplicates,
        truth.too_late,
        truth.rejected,
    );
    if got != want {
        mismatches.push(format!("total counters {got:?}, truth {want:?}"));
    }
    result.counters = sum;

    let mut multiset: Vec<(Vec<u8>, Vec<u8>)> = rows
        .into_iter()
        .map(|record| (record.key.unwrap_or_default(), record.value))
        .collect();
    multiset.sort();
    result.multiset = multiset;
    result
}

fn compare_maps<K: Ord + std::fmt::Debug>(
    what: &str,
    actual: &BTreeMap<K, Sums>,
    expected: &BTreeMap<K, Sums>,
    mismatches: &mut Vec<String>,
) {
    let mut differing = 0_usize;
    let mut first = None;
    let keys: BTreeSet<&K> = actual.keys().chain(expected.keys()).collect();
    for key in keys {
        let got = actual.get(key).copied().unwrap_or_default();
        let want = expected.get(key).copied().unwrap_or_default();
        if got != want {
            differing += 1;
            first.get_or_insert_with(|| format!("{key:?}: got {got:?}, truth {want:?}"));
        }
    }
    if let Some(first) = first {
        mismatches.push(format!("{what}: {differing} keys differ, e.g. {first}"));
    }
}
