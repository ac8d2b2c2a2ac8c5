//! Helpers for crash tests that run the real `tally aggregate` binary as child processes
//! against a real broker and kill it. The shared pieces (topics, generated input with
//! its ground truth, config files, the process guard, read_committed readers) live in
//! [`super::eos`]; this module adds what is specific to kills: the event-time
//! parameters and partition count of every kill test, the restore counters' names,
//! offset and transaction-state probes, a concurrent reader, and the
//! mismatch-collecting check of a run against the ground truth (row sums, row amounts
//! recomputed from the contracts by the tests' own arithmetic in [`super::money`],
//! side topics, checkpoints).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tally_aggregator::Checkpoint;
use tally_core::aggregate::RowKind;
use tally_core::codec::decode_aggregate;
use tally_core::partition::PartitionCounters;
use tally_gen::GroundTruth;

use super::TestTopics;
use super::eos::{
    DimsKey, EventTime, ProducerTuning, ReadRecord, Sums, add_counters, committed_offsets_retrying,
    committed_offsets_within, kafka_client, produce_generated_with, read_committed, row_dims_key,
    to_read_record, topic_reader, truth_dims_key,
};
use super::money::TruthContracts;

/// Partitions of every topic of a kill test.
pub const PARTITIONS: i32 = 4;
/// Event-time parameters shared by the generator and the aggregator config.
pub const EVENT_TIME: EventTime = EventTime::EOS;

/// The contracts file the aggregator runs with, read by the tests' own parser (see
/// [`super::money`]), so row amounts are recomputed without tally-core's pricing.
pub fn load_contracts() -> TruthContracts {
    TruthContracts::default_file()
}

/// Creates `topic` and preloads it with `count` generated records (every class) and,
/// last on every partition, a gateway tick a day after the last send time, so every
/// window and correction pane closes at a fixed input offset. Record batches hold at
/// most `batch_messages` records (see [`ProducerTuning::batches`]). Returns the ground
/// truth.
pub fn produce_input(topic: &str, count: u64, seed: u64, batch_messages: u32) -> GroundTruth {
    produce_generated_with(
        topic,
        EVENT_TIME.generator(count, seed, PARTITIONS),
        true,
        ProducerTuning::batches(batch_messages),
    )
    .truth
}

/// Partitions rebuilt from their committed checkpoint, as `/metrics` counts them.
pub const PARTITION_RESTORES: &str = "tally_aggregator_partition_restores_total";
/// Input records re-read by those restores.
pub const RESTORED_RECORDS: &str = "tally_aggregator_restored_records_total";

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
        let consumer: BaseConsumer = kafka_client(bootstrap)
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
        let committed = committed_offsets_retrying(&self.consumer, &query, Duration::from_secs(30))
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
    let committed = committed_offsets_within(bootstrap, group, topic, PARTITIONS, timeout)?;
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
            kafka_client(bootstrap)
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

    /// [`TransactionProbe::open`] until it finds none, for at most `within`.
    ///
    /// A commit (or abort) returns once the transaction coordinator has logged it; the
    /// coordinator writes the markers that move each partition's last stable offset
    /// right after, so a process that ended its transaction can exit before they land.
    /// An abandoned transaction stays open until the transaction timeout (10 s in the
    /// tests) and the coordinator's next check: `within` must stay well below that.
    pub fn open_after(&self, topics: &[&str], within: Duration) -> Vec<(String, i32, i64, i64)> {
        let started = std::time::Instant::now();
        loop {
            let open = self.open(topics);
            if open.is_empty() || started.elapsed() >= within {
                return open;
            }
            std::thread::sleep(Duration::from_millis(100));
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

/// A read_committed reader of one topic running on its own thread until stopped.
pub struct ConcurrentReader {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<ReadRecord>>>,
}

impl ConcurrentReader {
    /// Starts reading `topic` from the beginning.
    pub fn start(bootstrap: &str, topic: &str) -> ConcurrentReader {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let bootstrap = bootstrap.to_owned();
        let topic = topic.to_owned();
        let handle = thread::spawn(move || {
            let consumer = topic_reader(&bootstrap, &topic, PARTITIONS, true);
            let mut records = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(message)) => records.push(to_read_record(&message)),
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
    pub fn finish(mut self) -> Vec<ReadRecord> {
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

/// Checks a finished run's outputs against the ground truth; every discrepancy becomes
/// one entry of `mismatches` (the caller asserts it is empty and reports the figures).
///
/// - Σ rows (on time + corrections) per (window, dims) = the truth's counted events and
///   token sums, also split by row kind (billable = the price book's billable statuses);
/// - every row's versions, currency, gross, shares and net equal the tests' own
///   recomputation from its token sums and the contracts TOML
///   ([`TruthContracts::check_row`]); every row id appears once;
/// - usage.late / usage.dlq hold exactly `too_late` / `rejected` records, each source
///   (partition, offset) once, every one from the input topic;
/// - every partition's committed checkpoint conserves and equals the truth.
pub fn verify_against_truth(
    bootstrap: &str,
    topics: &TestTopics,
    group: &str,
    truth: &GroundTruth,
    contracts: &TruthContracts,
) -> Verification {
    let mut result = Verification::default();
    let mismatches = &mut result.mismatches;
    let rows = read_committed(bootstrap, &topics.billing_aggregates, PARTITIONS);
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
        if let Some(problem) = contracts.check_row(&row) {
            mismatches.push(problem);
        }
        if row.gross_micros != 0 {
            result.priced_rows += 1;
        }
        let key = row_dims_key(&row);
        per_key
            .entry(key.clone())
            .or_default()
            .add(Sums::of_row(&row));
        per_key_kind
            .entry((key, row.row_kind))
            .or_default()
            .add(Sums::of_row(&row));
    }
    for (id, count) in &ids {
        if *count > 1 {
            mismatches.push(format!("row id {id} appears {count} times"));
        }
    }

    let mut expected: BTreeMap<DimsKey, Sums> = BTreeMap::new();
    let mut expected_kind: BTreeMap<(DimsKey, RowKind), Sums> = BTreeMap::new();
    for window in &truth.windows {
        let key = truth_dims_key(window);
        let mut sums = Sums::of_truth(&window.on_time);
        sums.add(Sums::of_truth(&window.correction));
        if sums.events > 0 {
            expected.insert(key.clone(), sums);
        }
        for (status, panes) in &window.by_status_sums {
            let kind = if contracts.is_billable(status, window.window_start_ms) {
                RowKind::Billable
            } else {
                RowKind::NonBillable
            };
            let mut status_sums = Sums::of_truth(&panes.on_time);
            status_sums.add(Sums::of_truth(&panes.correction));
            if status_sums.events > 0 {
                expected_kind
                    .entry((key.clone(), kind))
                    .or_default()
                    .add(status_sums);
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
        let records = read_committed(bootstrap, topic, PARTITIONS);
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
        add_counters(&mut sum, &counters);
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
