//! The Kafka loop: one consumer, one transactional producer, the owned partitions.
//!
//! The loop runs on the caller's thread (librdkafka calls block). The [`Engine`] lives
//! in the consumer's context behind a mutex, because the rebalance callback — which
//! runs inside `poll` on the same thread — must commit, restore and drop partition
//! state; the loop never holds the lock across `poll`. Batches of polled records are
//! processed by per-partition tasks on the worker pool while the loop waits
//! ([`Engine::on_batch`]; see the crate docs).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rayon::iter::{IntoParallelRefIterator, IntoParallelRefMutIterator, ParallelIterator};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tally_core::aggregate::BillingAggregate;
use tally_core::codec::{encode_aggregate, encode_tick};
use tally_core::event::{TickOrigin, UsageTick};
use tally_core::partition::PartitionState;
use tally_core::validate::ValidationLimits;
use tracing::{debug, error, info, warn};

use crate::checkpoint::Checkpoint;
use crate::error::AggregatorError;
use crate::kafka::{
    ProducerCallbacks, consumer_config, log_client_error, log_librdkafka, producer_config,
};
use crate::metrics::{self as m, PendingTotals};
use crate::record::{InputRecord, RecordOutcome, RecordRules, TOO_LATE, apply_record, side_record};
use crate::restore::{Restored, rebuild_partition};
use crate::settings::{AggregatorSettings, StartFrom};
use tally_core::semantics::{Semantics, check_restart};

/// Timeout of blocking metadata and transaction calls.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// Time limit of each transaction call once shutdown was requested: the process exits
/// within a few seconds of SIGTERM; a final transaction that cannot commit in time is
/// aborted and its input re-read by the next owner.
const SHUTDOWN_CALL_TIMEOUT: Duration = Duration::from_millis(1_500);
/// Flush before an abort: bounded, since an aborting transaction may not drain.
const ABORT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Aborts in a row (without a commit in between, i.e. at the same input offsets)
/// after which the aggregator stops instead of looping.
const MAX_CONSECUTIVE_ABORTS: u32 = 5;
/// Retries of a retriable `commit_transaction` error.
const COMMIT_RETRIES: u32 = 3;
/// Records processed per batch at most (see `drive`).
const MAX_BATCH: usize = 32_768;
/// How long one `poll` waits.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// Fatal errors without a committed transaction in between after which [`run`] stops
/// instead of restarting.
pub(crate) const MAX_FATAL_RESTARTS: u32 = 3;
/// Back-off before the first restart after a fatal error; doubles each time.
const FATAL_RESTART_BACKOFF: Duration = Duration::from_millis(500);
/// How often lag and gauges are refreshed.
const GAUGE_REFRESH: Duration = Duration::from_secs(5);
/// Housekeeping (ticks, commit timer, exit check) at most this often while records flow.
const HOUSEKEEPING_EVERY: Duration = Duration::from_millis(10);

/// Why [`crate::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The shutdown flag was raised.
    Shutdown,
    /// Every owned partition settled for `--exit-after-idle-ms`.
    Idle,
}

/// What a run did (committed work only, except aborts and restores).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Why the run ended.
    pub exit: ExitReason,
    /// Transactions committed.
    pub transactions_committed: u64,
    /// Transactions aborted.
    pub transactions_aborted: u64,
    /// Billing rows in committed transactions.
    pub rows_emitted: u64,
    /// Ticks written in committed transactions.
    pub ticks_written: u64,
    /// Records re-read to rebuild state on assignment.
    pub records_restored: u64,
    /// Restarts from the committed state after a fatal Kafka error.
    pub fatal_restarts: u64,
    /// Batches whose records were processed as several partition tasks in parallel.
    pub parallel_batches: u64,
}

impl RunSummary {
    fn empty() -> RunSummary {
        RunSummary {
            exit: ExitReason::Shutdown,
            transactions_committed: 0,
            transactions_aborted: 0,
            rows_emitted: 0,
            ticks_written: 0,
            records_restored: 0,
            fatal_restarts: 0,
            parallel_batches: 0,
        }
    }

    /// Adds an incarnation's work.
    fn add(&mut self, other: &RunSummary) {
        self.transactions_committed += other.transactions_committed;
        self.transactions_aborted += other.transactions_aborted;
        self.rows_emitted += other.rows_emitted;
        self.ticks_written += other.ticks_written;
        self.records_restored += other.records_restored;
        self.fatal_restarts += other.fatal_restarts;
        self.parallel_batches += other.parallel_batches;
    }
}

/// One owned input partition.
struct OwnedPartition {
    /// State after the last record processed.
    live: PartitionState,
    /// State as of the last commit (restored on abort).
    committed: PartitionState,
    /// Offset after the last record processed.
    next_offset: i64,
    /// Offset committed last (the consumer is seeked here on abort).
    committed_offset: i64,
    /// The checkpoint committed with `committed_offset` (re-sent unchanged while the
    /// partition processes nothing).
    committed_metadata: String,
    /// The checkpoint of the open transaction, when the partition changed in it.
    pending_metadata: Option<String>,
    /// Records processed since the last commit.
    dirty: bool,
    /// The consumer reported the partition's end and no record came since.
    at_end: bool,
    /// When the last usage record was read (for `--exit-after-idle`).
    last_usage_at: Instant,
    /// Wall-clock ms when the last event that moved the watermark, or the last tick,
    /// was read: the base of the idle time. Committed in the checkpoint, so a restart
    /// does not restart the idle time.
    idle_base_ms: i64,
    /// `idle_base_ms` as of the last commit.
    committed_idle_base_ms: i64,
    /// A tick was written and has not been read back yet.
    tick_in_flight: bool,
    /// `tick_in_flight` as of the last commit.
    committed_tick_in_flight: bool,
    /// A tick was read after the last usage record.
    tick_read_since_usage: bool,
    /// The rebalance epoch in which the partition was assigned or last rewound:
    /// records polled in an earlier epoch are not applied.
    since_epoch: u64,
}

impl OwnedPartition {
    fn new(
        state: PartitionState,
        next_offset: i64,
        committed_metadata: String,
        idle_base_ms: i64,
        epoch: u64,
    ) -> OwnedPartition {
        let now = Instant::now();
        OwnedPartition {
            committed: state.clone(),
            live: state,
            next_offset,
            committed_offset: next_offset,
            committed_metadata,
            pending_metadata: None,
            dirty: false,
            at_end: false,
            last_usage_at: now,
            idle_base_ms,
            committed_idle_base_ms: idle_base_ms,
            tick_in_flight: false,
            committed_tick_in_flight: false,
            tick_read_since_usage: false,
            since_epoch: epoch,
        }
    }

    /// Back to the last commit.
    fn rewind(&mut self, epoch: u64) {
        self.since_epoch = epoch;
        self.live.clone_from(&self.committed);
        self.next_offset = self.committed_offset;
        self.pending_metadata = None;
        self.dirty = false;
        self.at_end = false;
        self.tick_in_flight = self.committed_tick_in_flight;
        self.idle_base_ms = self.committed_idle_base_ms;
        let now = Instant::now();
        self.last_usage_at = now;
    }

    /// The wall-clock ms that passed since the idle base.
    fn idle_ms(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.idle_base_ms).max(0)
    }

    /// The time a tick written at `now_ms` would carry, if the partition has a clock:
    /// the partition's tick base (largest counted event time or last tick time) plus
    /// the idle time that passed — never the wall clock's absolute value.
    fn tick_time_ms(&self, now_ms: i64) -> Option<i64> {
        Some(
            self.live
                .tick_base_ms()?
                .saturating_add(self.idle_ms(now_ms)),
        )
    }

    /// Whether a tick written at `now_ms` would close nothing.
    fn tick_is_noop(&self, now_ms: i64) -> bool {
        self.tick_time_ms(now_ms)
            .is_none_or(|tick| !self.live.tick_would_close(tick))
    }
}

/// A polled record and the rebalance epoch it was polled in.
struct Polled<'c> {
    message: BorrowedMessage<'c>,
    epoch: u64,
}

/// What the workers of one batch share (read only).
struct BatchContext<'a> {
    rules: RecordRules<'a>,
    producer: &'a BaseProducer<ProducerCallbacks>,
    source_topic: &'a str,
    late_topic: &'a str,
    dlq_topic: &'a str,
    max_value_bytes: usize,
    now: Instant,
    /// Wall-clock ms of the batch (the idle base of partitions whose watermark moved).
    now_ms: i64,
}

/// Applies one partition's records of a batch, in order, and writes their side
/// records. Returns the reasons of the rejected records.
fn process_partition(
    owned: &mut OwnedPartition,
    messages: &[&BorrowedMessage<'_>],
    context: &BatchContext<'_>,
) -> Result<Vec<&'static str>, AggregatorError> {
    let mut rejected = Vec::new();
    for message in messages {
        let record = InputRecord {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            value: message.payload().unwrap_or_default(),
            timestamp_ms: message.timestamp().to_millis(),
        };
        if record.offset < owned.next_offset {
            // Fetched before a seek back; the seek makes librdkafka drop these, but a
            // record below the position must never be applied twice.
            continue;
        }
        let watermark_before = owned.live.watermark();
        let outcome = apply_record(&mut owned.live, &context.rules, &record);
        if outcome == RecordOutcome::Tick || owned.live.watermark() != watermark_before {
            owned.idle_base_ms = context.now_ms;
        }
        owned.next_offset = record.offset + 1;
        owned.dirty = true;
        owned.at_end = false;
        if outcome == RecordOutcome::Tick {
            owned.tick_in_flight = false;
            owned.tick_read_since_usage = true;
        } else {
            owned.last_usage_at = context.now;
            owned.tick_read_since_usage = false;
        }
        match outcome {
            RecordOutcome::Absorbed | RecordOutcome::Tick => {}
            RecordOutcome::TooLate => {
                write_side(context, context.late_topic, &record, TOO_LATE)?;
            }
            RecordOutcome::Rejected { reason } => {
                rejected.push(reason);
                write_side(context, context.dlq_topic, &record, reason)?;
            }
        }
    }
    Ok(rejected)
}

/// Writes the original record to a side topic with the reason and source headers.
fn write_side(
    context: &BatchContext<'_>,
    topic: &str,
    record: &InputRecord<'_>,
    reason: &'static str,
) -> Result<(), AggregatorError> {
    let side = side_record(
        record,
        context.source_topic,
        reason,
        context.max_value_bytes,
    );
    let mut headers = OwnedHeaders::new_with_capacity(side.headers.len());
    for (name, value) in &side.headers {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    let mut out = BaseRecord::<[u8], [u8]>::to(topic)
        .payload(side.value)
        .headers(headers);
    if let Some(key) = record.key {
        out = out.key(key);
    }
    if let Some(timestamp) = record.timestamp_ms {
        out = out.timestamp(timestamp);
    }
    send(context.producer, out)
}

/// Enqueues a record, waiting while the local queue is full.
fn send<K, P>(
    producer: &BaseProducer<ProducerCallbacks>,
    mut record: BaseRecord<'_, K, P, ()>,
) -> Result<(), AggregatorError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                producer.poll(Duration::from_millis(50));
            }
            Err((source, _)) => return Err(classify("produce", source)),
        }
    }
}

/// Whether a transaction ended with a commit or an abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitOutcome {
    NothingToDo,
    Committed,
    Aborted,
}

/// A record of the checkpoints topic: one per input partition and transaction that
/// changed it, keyed `<topic>/<partition>` (so one input partition's checkpoints share
/// a partition, in commit order), written in the transaction that commits `offset`
/// with this checkpoint. Its timestamp is the producer's clock: checkpoints are
/// bookkeeping, not billing data.
#[derive(serde::Serialize)]
struct CheckpointRecord<'a> {
    /// The input topic.
    topic: &'a str,
    /// The input partition.
    partition: i32,
    /// The committed offset `C`.
    offset: i64,
    /// The checkpoint exactly as committed in the offset metadata.
    checkpoint: &'a str,
}

/// The aggregator's state and its producer.
pub(crate) struct Engine {
    settings: AggregatorSettings,
    limits: ValidationLimits,
    producer: BaseProducer<ProducerCallbacks>,
    partition_count: u32,
    /// The semantics the rows depend on (settings, contract versions, partitions).
    semantics: Semantics,
    /// Its wire form, written into every checkpoint.
    semantics_wire: String,
    in_transaction: bool,
    partitions: BTreeMap<i32, OwnedPartition>,
    transactions_attempted: u64,
    consecutive_aborts: u32,
    pending: PendingTotals,
    summary: RunSummary,
    /// Set once the process must stop: callbacks then only unassign.
    failed: bool,
    /// Set once shutdown was requested: assignments are ignored (no restore starts)
    /// and transaction calls get [`SHUTDOWN_CALL_TIMEOUT`].
    stopping: bool,
    last_commit: Instant,
    last_gauges: Instant,
    buffer: Vec<u8>,
    /// Threads that process partitions in parallel (none: on the loop's thread).
    workers: Option<Arc<rayon::ThreadPool>>,
    /// Bumped whenever partitions are assigned or rewound (see [`Polled`]).
    epoch: Arc<AtomicU64>,
}

fn classify(operation: &'static str, source: KafkaError) -> AggregatorError {
    if is_fatal(&source) {
        AggregatorError::Fatal { operation, source }
    } else {
        AggregatorError::Kafka { operation, source }
    }
}

fn is_fatal(error: &KafkaError) -> bool {
    match error {
        KafkaError::Transaction(inner) => inner.is_fatal(),
        other => other.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal),
    }
}

/// Errors that say this member's view of the group is stale (a rebalance moved on
/// without it). The abort they cause is the group's doing, not the input's, so it does
/// not count towards the abort-loop limit.
fn is_group_membership_error(error: &KafkaError) -> bool {
    let code = match error {
        KafkaError::Transaction(inner) => Some(inner.code()),
        other => other.rdkafka_error_code(),
    };
    matches!(
        code,
        Some(
            RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
        )
    )
}

fn is_retriable(error: &KafkaError) -> bool {
    matches!(error, KafkaError::Transaction(inner) if inner.is_retriable())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

impl Engine {
    /// The time limit of a blocking transaction call now.
    fn call_timeout(&self) -> Duration {
        if self.stopping {
            SHUTDOWN_CALL_TIMEOUT
        } else {
            KAFKA_TIMEOUT
        }
    }

    fn topic(&self) -> &str {
        &self.settings.config.topics.usage_events
    }

    /// Starts a new rebalance epoch and returns it.
    fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn ensure_transaction(&mut self) -> Result<(), AggregatorError> {
        if !self.in_transaction {
            self.producer
                .begin_transaction()
                .map_err(|source| classify("begin transaction", source))?;
            self.in_transaction = true;
        }
        Ok(())
    }

    fn send<K, P>(&self, record: BaseRecord<'_, K, P, ()>) -> Result<(), AggregatorError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        send(&self.producer, record)
    }

    /// Processes a batch of polled records: each partition's records in offset order
    /// on one thread, different partitions in parallel on the worker pool. Records
    /// polled before their partition was rewound or reassigned (a rebalance callback
    /// ran inside a later poll of the same batch) are skipped: the consumer was seeked
    /// back and delivers them again.
    fn on_batch(&mut self, batch: &[Polled<'_>], now: Instant) -> Result<(), AggregatorError> {
        let mut groups: BTreeMap<i32, Vec<&BorrowedMessage<'_>>> = BTreeMap::new();
        for polled in batch {
            let partition = polled.message.partition();
            let Some(owned) = self.partitions.get(&partition) else {
                continue;
            };
            if polled.epoch < owned.since_epoch {
                continue;
            }
            groups.entry(partition).or_default().push(&polled.message);
        }
        if groups.is_empty() {
            return Ok(());
        }
        // Side records are written from the worker threads, inside this transaction.
        self.ensure_transaction()?;
        let context = BatchContext {
            rules: RecordRules {
                contracts: &self.settings.contracts,
                limits: &self.limits,
                partition_count: self.partition_count,
            },
            producer: &self.producer,
            source_topic: &self.settings.config.topics.usage_events,
            late_topic: &self.settings.config.topics.late,
            dlq_topic: &self.settings.config.topics.dlq,
            max_value_bytes: usize::try_from(self.settings.config.topics.max_message_bytes)
                .unwrap_or(0),
            now,
            now_ms: now_ms(),
        };
        let mut work: Vec<(&mut OwnedPartition, Vec<&BorrowedMessage<'_>>)> = self
            .partitions
            .iter_mut()
            .filter_map(|(partition, owned)| Some((owned, groups.remove(partition)?)))
            .collect();
        let results: Vec<Result<Vec<&'static str>, AggregatorError>> = match &self.workers {
            Some(pool) if work.len() > 1 => {
                self.summary.parallel_batches += 1;
                pool.install(|| {
                    work.par_iter_mut()
                        .map(|(owned, messages)| process_partition(owned, messages, &context))
                        .collect()
                })
            }
            _ => work
                .iter_mut()
                .map(|(owned, messages)| process_partition(owned, messages, &context))
                .collect(),
        };
        for result in results {
            for reason in result? {
                self.pending.add_rejected(reason);
            }
        }
        Ok(())
    }

    fn produce_row(&mut self, row: &BillingAggregate) -> Result<(), AggregatorError> {
        self.buffer.clear();
        encode_aggregate(row, &mut self.buffer);
        let topic = &self.settings.config.topics.billing_aggregates;
        let out = BaseRecord::<[u8], [u8]>::to(topic)
            .key(row.id.as_bytes())
            .payload(&self.buffer)
            .timestamp(row.window_end_ms);
        self.send(out)
    }

    fn on_eof(&mut self, partition: i32) {
        if let Some(owned) = self.partitions.get_mut(&partition) {
            owned.at_end = true;
        }
    }

    /// After a poll that waited and got nothing: every owned partition is at its end
    /// (librdkafka prefetches, so a partition with a backlog keeps the queue filled).
    /// librdkafka reports a partition's end itself only when a fetch returns nothing,
    /// which never happens while records (duplicates, junk) trickle in faster than
    /// `fetch.wait.max.ms`. A tick written a little early is harmless: it is appended
    /// after whatever backlog the partition still has and acts only when read back.
    fn on_quiet(&mut self) {
        for owned in self.partitions.values_mut() {
            owned.at_end = true;
        }
    }

    /// Appends a tick to every partition idle at its end for the idle timeout.
    fn write_idle_ticks(&mut self) -> Result<(), AggregatorError> {
        let idle_timeout_ms = self.settings.config.aggregator.idle_timeout_ms;
        let now = now_ms();
        let due: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter(|(_, owned)| {
                owned.at_end && !owned.tick_in_flight && owned.idle_ms(now) >= idle_timeout_ms
            })
            .filter_map(|(partition, owned)| {
                let tick_time_ms = owned.tick_time_ms(now)?;
                owned
                    .live
                    .tick_would_close(tick_time_ms)
                    .then_some((*partition, tick_time_ms))
            })
            .collect();
        for (partition, tick_time_ms) in due {
            self.ensure_transaction()?;
            self.buffer.clear();
            encode_tick(
                &UsageTick {
                    tick_time_ms,
                    origin: TickOrigin::Aggregator,
                },
                &mut self.buffer,
            );
            let out = BaseRecord::<[u8], [u8]>::to(&self.settings.config.topics.usage_events)
                .partition(partition)
                .payload(&self.buffer)
                .timestamp(tick_time_ms);
            self.send(out)?;
            self.pending.add_tick_written();
            if let Some(owned) = self.partitions.get_mut(&partition) {
                owned.tick_in_flight = true;
                owned.dirty = true;
            }
            debug!(partition, tick_time_ms, "tick written to an idle partition");
        }
        Ok(())
    }

    /// The offsets and checkpoints of every owned partition for the open transaction:
    /// partitions that processed records get a new checkpoint (low water, counters,
    /// digest, semantics), the others re-send their committed one unchanged.
    fn offsets_with_checkpoints(&mut self) -> Result<TopicPartitionList, AggregatorError> {
        let topic = self.settings.config.topics.usage_events.clone();
        let mut offsets = TopicPartitionList::with_capacity(self.partitions.len());
        for (partition, owned) in &mut self.partitions {
            let metadata = if owned.dirty || owned.committed_metadata.is_empty() {
                let checkpoint = Checkpoint {
                    low_water: owned.live.low_water(owned.next_offset),
                    counters: owned.live.counters(),
                    digest: owned.live.digest(),
                    idle_base_ms: owned.idle_base_ms,
                    semantics: self.semantics_wire.clone(),
                };
                let metadata =
                    checkpoint
                        .to_metadata()
                        .map_err(|source| AggregatorError::BadCheckpoint {
                            partition: *partition,
                            offset: owned.next_offset,
                            source,
                        })?;
                let record = CheckpointRecord {
                    topic: &topic,
                    partition: *partition,
                    offset: owned.next_offset,
                    checkpoint: &metadata,
                };
                let key = format!("{topic}/{partition}");
                let value = serde_json::to_vec(&record).map_err(|error| {
                    AggregatorError::Settings(format!("cannot encode a checkpoint record: {error}"))
                })?;
                send(
                    &self.producer,
                    BaseRecord::<str, [u8]>::to(&self.settings.config.topics.checkpoints)
                        .key(key.as_str())
                        .payload(value.as_slice()),
                )?;
                owned.pending_metadata.insert(metadata).clone()
            } else {
                owned.committed_metadata.clone()
            };
            let mut element = offsets.add_partition(&topic, *partition);
            element
                .set_offset(Offset::Offset(owned.next_offset))
                .map_err(|source| AggregatorError::Kafka {
                    operation: "build offsets",
                    source,
                })?;
            element.set_metadata(metadata);
        }
        Ok(offsets)
    }

    /// Drains closed rows and commits them with the offsets and checkpoints of every
    /// owned partition, in one transaction.
    fn commit(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
    ) -> Result<CommitOutcome, AggregatorError> {
        self.last_commit = Instant::now();
        let mut rows = Vec::new();
        for owned in self.partitions.values_mut() {
            rows.extend(owned.live.drain_closed(&self.settings.contracts)?);
        }
        if !rows.is_empty() {
            self.ensure_transaction()?;
            for row in &rows {
                self.pending.add_row(row);
                self.produce_row(row)?;
            }
        }
        let dirty = self.in_transaction || self.partitions.values().any(|owned| owned.dirty);
        if !dirty {
            return Ok(CommitOutcome::NothingToDo);
        }
        self.ensure_transaction()?;
        self.transactions_attempted += 1;
        if self.settings.abort_every.is_some_and(|every| {
            self.transactions_attempted
                .is_multiple_of(u64::from(every.get()))
        }) {
            info!(
                transaction = self.transactions_attempted,
                "aborting the transaction (--abort-every)"
            );
            self.abort(consumer, true)?;
            return Ok(CommitOutcome::Aborted);
        }
        let offsets = self.offsets_with_checkpoints()?;
        let Some(group) = consumer.group_metadata() else {
            warn!("no consumer group metadata yet, aborting the transaction");
            self.abort(consumer, true)?;
            return Ok(CommitOutcome::Aborted);
        };
        let started = Instant::now();
        if let Err(error) =
            self.producer
                .send_offsets_to_transaction(&offsets, &group, self.call_timeout())
        {
            return self.recover(consumer, "send offsets to transaction", error);
        }
        let mut retries = 0;
        loop {
            match self.producer.commit_transaction(self.call_timeout()) {
                Ok(()) => break,
                Err(error) if is_retriable(&error) && retries < COMMIT_RETRIES => {
                    retries += 1;
                    warn!(error = %error, retries, "retrying commit");
                }
                Err(error) => return self.recover(consumer, "commit transaction", error),
            }
        }
        m::record_commit_seconds(started.elapsed().as_secs_f64());
        m::record_emit_latency(&rows, now_ms());
        self.in_transaction = false;
        self.consecutive_aborts = 0;
        self.pending.publish();
        self.summary.transactions_committed += 1;
        self.summary.rows_emitted += self.pending.rows();
        self.summary.ticks_written += self.pending.ticks_written();
        self.pending = PendingTotals::default();
        for owned in self.partitions.values_mut() {
            if owned.dirty {
                m::publish_counter_delta(&owned.committed.counters(), &owned.live.counters());
                // Reuses the snapshot's allocations (see PartitionState's Clone).
                owned.committed.clone_from(&owned.live);
            }
            owned.committed_offset = owned.next_offset;
            if let Some(metadata) = owned.pending_metadata.take() {
                owned.committed_metadata = metadata;
            }
            owned.committed_tick_in_flight = owned.tick_in_flight;
            owned.committed_idle_base_ms = owned.idle_base_ms;
            owned.dirty = false;
        }
        debug!(rows = rows.len(), "transaction committed");
        Ok(CommitOutcome::Committed)
    }

    fn recover(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
        operation: &'static str,
        error: KafkaError,
    ) -> Result<CommitOutcome, AggregatorError> {
        if is_fatal(&error) {
            self.failed = true;
            error!(error = %error, operation, "fatal producer error");
            return Err(AggregatorError::Fatal {
                operation,
                source: error,
            });
        }
        let counts_towards_loop = !is_group_membership_error(&error);
        warn!(error = %error, operation, counts_towards_loop, "transaction failed, aborting it");
        self.abort(consumer, counts_towards_loop)?;
        Ok(CommitOutcome::Aborted)
    }

    /// Aborts the open transaction and returns every owned partition to its last
    /// commit: state, tick bookkeeping, and the consumer's position.
    fn abort(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
        counts_towards_loop: bool,
    ) -> Result<(), AggregatorError> {
        if self.in_transaction {
            if let Err(error) = self.producer.flush(ABORT_FLUSH_TIMEOUT) {
                debug!(error = %error, "flush before abort failed");
            }
            if let Err(source) = self.producer.abort_transaction(self.call_timeout()) {
                self.failed = true;
                return Err(classify("abort transaction", source));
            }
            self.in_transaction = false;
        }
        m::count_abort();
        self.summary.transactions_aborted += 1;
        self.pending = PendingTotals::default();
        let topic = self.settings.config.topics.usage_events.clone();
        let epoch = self.next_epoch();
        for (partition, owned) in &mut self.partitions {
            owned.rewind(epoch);
            consumer
                .seek(
                    &topic,
                    *partition,
                    Offset::Offset(owned.committed_offset),
                    Timeout::After(KAFKA_TIMEOUT),
                )
                .map_err(|source| AggregatorError::Kafka {
                    operation: "seek after abort",
                    source,
                })?;
        }
        if counts_towards_loop {
            self.consecutive_aborts += 1;
            if self.consecutive_aborts >= MAX_CONSECUTIVE_ABORTS {
                self.failed = true;
                m::count_abort_loop();
                error!(
                    aborts = self.consecutive_aborts,
                    "transactions keep aborting at the same input offsets"
                );
                return Err(AggregatorError::AbortLoop {
                    aborts: self.consecutive_aborts,
                });
            }
        }
        Ok(())
    }

    /// Whether every owned partition sat at its end for `quiet` after its last usage
    /// record, with its tick read back (or none needed) and everything committed.
    fn all_settled(&self, quiet: Duration) -> bool {
        !self.partitions.is_empty()
            && !self.in_transaction
            && self.partitions.values().all(|owned| {
                owned.at_end
                    && !owned.dirty
                    && !owned.tick_in_flight
                    && owned.last_usage_at.elapsed() >= quiet
                    && (owned.tick_read_since_usage || owned.tick_is_noop(now_ms()))
            })
    }

    fn refresh_gauges(&mut self, consumer: &BaseConsumer<AggregatorContext>) {
        if self.last_gauges.elapsed() < GAUGE_REFRESH {
            return;
        }
        self.last_gauges = Instant::now();
        let now = now_ms();
        let mut open_windows = 0;
        let mut state_bytes = 0;
        for (partition, owned) in &self.partitions {
            open_windows += owned.live.open_windows();
            state_bytes += owned.live.approx_state_bytes();
            let lag = consumer
                .fetch_watermarks(self.topic(), *partition, Duration::from_secs(1))
                .ok()
                .map(|(_low, high)| high - owned.next_offset);
            let delay = owned
                .live
                .watermark()
                .map(|watermark| now.saturating_sub(watermark) as f64 / 1000.0);
            m::set_partition(*partition, delay, lag);
        }
        m::set_state(open_windows, state_bytes);
    }

    fn resolve_start(
        &self,
        consumer: &BaseConsumer<AggregatorContext>,
        partition: i32,
        start_from: StartFrom,
    ) -> Result<i64, AggregatorError> {
        let topic = self.topic();
        let watermarks = || {
            consumer
                .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
                .map_err(|source| AggregatorError::Kafka {
                    operation: "fetch watermarks",
                    source,
                })
        };
        match start_from {
            StartFrom::Earliest => Ok(watermarks()?.0),
            StartFrom::Latest => Ok(watermarks()?.1),
            StartFrom::Timestamp(time_ms) => {
                let mut query = TopicPartitionList::new();
                query
                    .add_partition_offset(topic, partition, Offset::Offset(time_ms))
                    .map_err(|source| AggregatorError::Kafka {
                        operation: "offsets for times",
                        source,
                    })?;
                let found = consumer
                    .offsets_for_times(query, KAFKA_TIMEOUT)
                    .map_err(|source| AggregatorError::Kafka {
                        operation: "offsets for times",
                        source,
                    })?;
                match found
                    .find_partition(topic, partition)
                    .map(|element| element.offset())
                {
                    Some(Offset::Offset(offset)) => Ok(offset),
                    // No record at or after the time: start at the end.
                    _ => Ok(watermarks()?.1),
                }
            }
        }
    }

    /// Takes ownership of newly assigned partitions: restores or starts each one and
    /// writes its start offset into `assignment`.
    fn on_assign(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
        assignment: &mut TopicPartitionList,
    ) -> Result<(), AggregatorError> {
        // The stable committed-offset fetch below waits for the previous owner's open
        // transaction to end, which can take up to its transaction timeout. Our own open
        // transaction would time out meanwhile and the coordinator's epoch bump would
        // fence this producer, so commit it first.
        if self.in_transaction {
            self.commit(consumer)?;
        }
        let topic = self.topic().to_owned();
        let mut query = TopicPartitionList::new();
        for element in assignment.elements() {
            query.add_partition(element.topic(), element.partition());
        }
        let committed = consumer
            .committed_offsets(query, KAFKA_TIMEOUT)
            .map_err(|source| AggregatorError::Kafka {
                operation: "fetch committed offsets",
                source,
            })?;
        // Read every checkpoint first, then rebuild the partitions that have one, in
        // parallel on the worker pool: a restore re-reads the partition's history.
        let mut to_restore = Vec::new();
        let mut fresh = Vec::new();
        for element in committed.elements() {
            let partition = element.partition();
            match element.offset() {
                Offset::Offset(committed_offset) => {
                    let checkpoint =
                        Checkpoint::from_metadata(element.metadata()).map_err(|source| {
                            AggregatorError::BadCheckpoint {
                                partition,
                                offset: committed_offset,
                                source,
                            }
                        })?;
                    let committed_semantics = Semantics::from_wire(&checkpoint.semantics)?;
                    check_restart(
                        &committed_semantics,
                        &self.semantics,
                        checkpoint.digest.clock.max_event_time_ms,
                    )
                    .map_err(|change| AggregatorError::SemanticsChanged {
                        partition,
                        source: Box::new(change),
                    })?;
                    to_restore.push((
                        partition,
                        checkpoint,
                        committed_offset,
                        element.metadata().to_owned(),
                    ));
                }
                _ => fresh.push(partition),
            }
        }
        let rules = RecordRules {
            contracts: &self.settings.contracts,
            limits: &self.limits,
            partition_count: self.partition_count,
        };
        let settings = &self.settings;
        let rebuild =
            |(partition, checkpoint, committed_offset, _): &(i32, Checkpoint, i64, String)| {
                rebuild_partition(settings, &rules, *partition, checkpoint, *committed_offset)
            };
        let rebuilt: Vec<Result<Restored, AggregatorError>> = match &self.workers {
            Some(pool) if to_restore.len() > 1 => {
                pool.install(|| to_restore.par_iter().map(rebuild).collect())
            }
            _ => to_restore.iter().map(rebuild).collect(),
        };
        let mut owned_partitions = Vec::with_capacity(to_restore.len() + fresh.len());
        for ((partition, checkpoint, committed_offset, metadata), restored) in
            to_restore.into_iter().zip(rebuilt)
        {
            let restored = restored?;
            m::count_restored(restored.records);
            self.summary.records_restored += restored.records;
            let owned = OwnedPartition::new(
                restored.state,
                committed_offset,
                metadata,
                checkpoint.idle_base_ms,
                self.next_epoch(),
            );
            owned_partitions.push((partition, owned));
        }
        for partition in fresh {
            let Some(start_from) = self.settings.start_from else {
                return Err(AggregatorError::NoStartPosition {
                    topic: topic.clone(),
                    partition,
                    group: self.settings.config.aggregator.group_id.clone(),
                });
            };
            let start = self.resolve_start(consumer, partition, start_from)?;
            info!(
                partition,
                start,
                ?start_from,
                "partition has no committed offset, starting fresh"
            );
            let state = PartitionState::new(self.settings.partition_params(partition))?;
            let mut owned =
                OwnedPartition::new(state, start, String::new(), now_ms(), self.next_epoch());
            // Commit the start position at the next commit, so a restart never needs
            // --start-from again.
            owned.dirty = true;
            owned_partitions.push((partition, owned));
        }
        for (partition, owned) in owned_partitions {
            assignment
                .set_partition_offset(&topic, partition, Offset::Offset(owned.next_offset))
                .map_err(|source| AggregatorError::Kafka {
                    operation: "set start offset",
                    source,
                })?;
            info!(partition, offset = owned.next_offset, "partition assigned");
            self.partitions.insert(partition, owned);
        }
        Ok(())
    }

    /// Gives up revoked partitions: commits everything first (or, when the partitions
    /// were lost to another member, aborts, since their work may be redone there).
    fn on_revoke(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
        revoked: &TopicPartitionList,
    ) -> Result<(), AggregatorError> {
        let revoked: Vec<i32> = revoked
            .elements()
            .iter()
            .map(|element| element.partition())
            .collect();
        if self.failed {
            for partition in &revoked {
                self.partitions.remove(partition);
            }
            return Ok(());
        }
        let result = if consumer.assignment_lost() {
            warn!(?revoked, "partitions lost, aborting the open transaction");
            for partition in &revoked {
                self.partitions.remove(partition);
            }
            self.abort(consumer, false)
        } else {
            let outcome = self.commit(consumer).map(|_| ());
            for partition in &revoked {
                self.partitions.remove(partition);
            }
            outcome
        };
        info!(?revoked, "partitions revoked");
        result
    }
}

/// The consumer context: the engine, and errors raised inside callbacks.
pub(crate) struct AggregatorContext {
    engine: Mutex<Engine>,
    deferred_error: Mutex<Option<AggregatorError>>,
}

impl AggregatorContext {
    fn engine(&self) -> Result<MutexGuard<'_, Engine>, AggregatorError> {
        self.engine.lock().map_err(|_| AggregatorError::Poisoned)
    }

    fn defer(&self, error: AggregatorError) {
        if let Ok(mut engine) = self.engine.lock() {
            engine.failed = true;
        }
        if let Ok(mut slot) = self.deferred_error.lock() {
            slot.get_or_insert(error);
        }
    }

    fn take_deferred(&self) -> Option<AggregatorError> {
        self.deferred_error
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
    }
}

impl ClientContext for AggregatorContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka("consumer", level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error("consumer", &error, reason);
    }
}

impl ConsumerContext for AggregatorContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let result = self.engine().and_then(|mut engine| {
                    if engine.failed || engine.stopping {
                        return Ok(false);
                    }
                    engine.on_assign(consumer, tpl).map(|()| true)
                });
                match result {
                    // Stopping: the partitions are not taken (no restore, no fetch);
                    // the group hands them to another member once this one leaves.
                    Ok(false) => {
                        info!(
                            partitions = tpl.count(),
                            "assignment ignored while stopping"
                        );
                    }
                    Ok(true) => {
                        let assigned = if cooperative {
                            consumer.incremental_assign(tpl)
                        } else {
                            consumer.assign(tpl)
                        };
                        if let Err(source) = assigned {
                            self.defer(AggregatorError::Kafka {
                                operation: "assign",
                                source,
                            });
                        }
                    }
                    Err(error) => self.defer(error),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let result = self
                    .engine()
                    .and_then(|mut engine| engine.on_revoke(consumer, tpl));
                if let Err(error) = result {
                    self.defer(error);
                }
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(source) = unassigned {
                    self.defer(AggregatorError::Kafka {
                        operation: "unassign",
                        source,
                    });
                }
            }
            other => {
                let code = RDKafkaErrorCode::from(other);
                self.defer(AggregatorError::Rebalance(KafkaError::Rebalance(code)));
                if let Err(source) = consumer.unassign() {
                    warn!(error = %source, "unassign after a rebalance error failed");
                }
            }
        }
    }
}

fn input_partition_count(
    producer: &BaseProducer<ProducerCallbacks>,
    topic: &str,
) -> Result<u32, AggregatorError> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(|source| AggregatorError::Kafka {
            operation: "fetch input metadata",
            source,
        })?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|candidate| candidate.name() == topic && candidate.error().is_none())
        .map_or(0, |found| found.partitions().len());
    match u32::try_from(partitions) {
        Ok(count) if count > 0 => Ok(count),
        _ => Err(AggregatorError::MissingTopic {
            topic: topic.to_owned(),
        }),
    }
}

/// Runs the aggregator until `shutdown` is raised (or, with `exit_after_idle`, until
/// every partition settled). Blocking: call it on a dedicated thread.
///
/// A fatal Kafka error (the producer fenced by another process with the same
/// transactional id, a fatal idempotence error) ends one *incarnation*: its producer,
/// consumer and every partition's state are dropped, and after a back-off a new
/// incarnation starts from scratch — a new producer (`init_transactions` fences what
/// is left of the old one), a new group member, and every assigned partition restored
/// from its committed offset and checkpoint. Nothing the failed incarnation had not
/// committed is kept. After three fatal errors without a committed
/// transaction in between, the error is returned instead (e.g. two processes started
/// with the same `--instance-id` keep fencing each other).
pub fn run(
    settings: AggregatorSettings,
    shutdown: Arc<AtomicBool>,
) -> Result<RunSummary, AggregatorError> {
    settings.validate()?;
    let workers = worker_pool(settings.worker_threads())?;
    let mut total = RunSummary::empty();
    let mut fatal_in_a_row: u32 = 0;
    loop {
        let (result, summary) = run_incarnation(settings.clone(), workers.clone(), &shutdown);
        total.add(&summary);
        let (operation, source) = match result {
            Ok(exit) => {
                total.exit = exit;
                info!(?total, "aggregator stopped");
                return Ok(total);
            }
            Err(AggregatorError::Fatal { operation, source }) => (operation, source),
            Err(error) => return Err(error),
        };
        if summary.transactions_committed > 0 {
            fatal_in_a_row = 0;
        }
        fatal_in_a_row += 1;
        if fatal_in_a_row > MAX_FATAL_RESTARTS || shutdown.load(Ordering::SeqCst) {
            error!(
                error = %source,
                operation,
                restarts = fatal_in_a_row - 1,
                "fatal kafka error, stopping"
            );
            return Err(AggregatorError::Fatal { operation, source });
        }
        m::count_fatal_restart();
        total.fatal_restarts += 1;
        let backoff = FATAL_RESTART_BACKOFF * 2_u32.pow(fatal_in_a_row - 1);
        error!(
            error = %source,
            operation,
            restart = fatal_in_a_row,
            backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
            "fatal kafka error, dropped the producer, the consumer and all partition state; \
             restarting from the committed offsets"
        );
        let deadline = Instant::now() + backoff;
        while Instant::now() < deadline {
            if shutdown.load(Ordering::SeqCst) {
                total.exit = ExitReason::Shutdown;
                info!(?total, "aggregator stopped");
                return Ok(total);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The pool that processes partitions in parallel; none for one thread (the loop's).
fn worker_pool(threads: usize) -> Result<Option<Arc<rayon::ThreadPool>>, AggregatorError> {
    if threads <= 1 {
        return Ok(None);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|index| format!("tally-worker-{index}"))
        .build()
        .map_err(|error| {
            AggregatorError::Settings(format!("cannot start {threads} worker threads: {error}"))
        })?;
    info!(threads, "partition worker threads started");
    Ok(Some(Arc::new(pool)))
}

/// One incarnation: a producer, a consumer and the partitions they own, from an empty
/// state until an exit or an error. Returns what it committed either way.
fn run_incarnation(
    settings: AggregatorSettings,
    workers: Option<Arc<rayon::ThreadPool>>,
    shutdown: &AtomicBool,
) -> (Result<ExitReason, AggregatorError>, RunSummary) {
    let (consumer, context) = match start_incarnation(settings, workers) {
        Ok(started) => started,
        Err(error) => return (Err(error), RunSummary::empty()),
    };
    let result = drive(&consumer, &context, shutdown);
    let result = match result {
        Ok(exit) => finish(&consumer, &context).map(|()| exit),
        Err(error) => Err(error),
    };
    if result.is_err()
        && let Ok(mut engine) = context.engine.lock()
    {
        engine.failed = true;
    }
    // Leaves the group; the revoke callback finds nothing left to commit (or, after
    // an error, only unassigns).
    drop(consumer);
    let summary = match context.engine() {
        Ok(engine) => engine.summary.clone(),
        Err(error) => return (Err(error), RunSummary::empty()),
    };
    (result, summary)
}

/// Creates the producer (fencing any earlier producer with the same transactional id)
/// and the consumer, and subscribes.
fn start_incarnation(
    settings: AggregatorSettings,
    workers: Option<Arc<rayon::ThreadPool>>,
) -> Result<(BaseConsumer<AggregatorContext>, Arc<AggregatorContext>), AggregatorError> {
    let producer: BaseProducer<ProducerCallbacks> = producer_config(&settings)
        .create_with_context(ProducerCallbacks::new())
        .map_err(|source| AggregatorError::Kafka {
            operation: "create producer",
            source,
        })?;
    producer
        .init_transactions(KAFKA_TIMEOUT)
        .map_err(|source| classify("init transactions", source))?;
    let topic = settings.config.topics.usage_events.clone();
    let partition_count = input_partition_count(&producer, &topic)?;
    let routed_partitions = i32::try_from(partition_count).map_err(|_| {
        AggregatorError::Settings(format!("input topic {topic} has too many partitions"))
    })?;
    let semantics = Semantics::new(&settings.config, &settings.contracts)?
        .with_input_partitions(routed_partitions);
    info!(
        transactional_id = %settings.transactional_id(),
        group = %settings.config.aggregator.group_id,
        %topic,
        partition_count,
        "aggregator starting"
    );
    let consumer_settings = consumer_config(&settings);
    let now = Instant::now();
    let engine = Engine {
        limits: settings.limits(),
        settings,
        producer,
        partition_count,
        semantics_wire: semantics.to_wire(),
        semantics,
        in_transaction: false,
        partitions: BTreeMap::new(),
        transactions_attempted: 0,
        consecutive_aborts: 0,
        pending: PendingTotals::default(),
        summary: RunSummary::empty(),
        failed: false,
        stopping: false,
        last_commit: now,
        last_gauges: now,
        buffer: Vec::with_capacity(1024),
        workers,
        epoch: Arc::new(AtomicU64::new(0)),
    };
    let context = AggregatorContext {
        engine: Mutex::new(engine),
        deferred_error: Mutex::new(None),
    };
    let consumer: BaseConsumer<AggregatorContext> = consumer_settings
        .create_with_context(context)
        .map_err(|source| AggregatorError::Kafka {
            operation: "create consumer",
            source,
        })?;
    let context = Arc::clone(consumer.context());
    consumer
        .subscribe(&[topic.as_str()])
        .map_err(|source| AggregatorError::Kafka {
            operation: "subscribe",
            source,
        })?;
    Ok((consumer, context))
}

/// The final commit before leaving the group.
fn finish(
    consumer: &BaseConsumer<AggregatorContext>,
    context: &AggregatorContext,
) -> Result<(), AggregatorError> {
    let mut engine = context.engine()?;
    match engine.commit(consumer)? {
        CommitOutcome::Aborted => {
            warn!("the final transaction aborted; its input is re-read by the next owner")
        }
        CommitOutcome::Committed | CommitOutcome::NothingToDo => {}
    }
    Ok(())
}

fn drive(
    consumer: &BaseConsumer<AggregatorContext>,
    context: &AggregatorContext,
    shutdown: &AtomicBool,
) -> Result<ExitReason, AggregatorError> {
    let (commit_interval, exit_after_idle) = {
        let engine = context.engine()?;
        (
            engine.settings.commit_interval,
            engine.settings.exit_after_idle,
        )
    };
    let epoch = Arc::clone(&context.engine()?.epoch);
    let mut batch: Vec<Polled<'_>> = Vec::with_capacity(MAX_BATCH);
    let mut last_housekeeping = Instant::now();
    loop {
        if shutdown.load(Ordering::SeqCst) {
            info!("shutdown requested");
            context.engine()?.stopping = true;
            return Ok(ExitReason::Shutdown);
        }
        // Collect a batch: wait for the first record, then take what is buffered, up to
        // MAX_BATCH records or the housekeeping interval. Rebalance callbacks run inside
        // these polls; `epoch` tells which records were polled before them.
        let mut quiet = false;
        let mut end_reached = None;
        let mut timeout = POLL_TIMEOUT;
        let collect_until = Instant::now() + HOUSEKEEPING_EVERY;
        while batch.len() < MAX_BATCH {
            match consumer.poll(timeout) {
                None => {
                    quiet = true;
                    break;
                }
                Some(Ok(message)) => batch.push(Polled {
                    message,
                    epoch: epoch.load(Ordering::SeqCst),
                }),
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    end_reached = Some(partition);
                    quiet = true;
                    break;
                }
                Some(Err(error)) => {
                    if is_fatal(&error) {
                        return Err(AggregatorError::Fatal {
                            operation: "consume",
                            source: error,
                        });
                    }
                    warn!(error = %error, "consumer error");
                    break;
                }
            }
            timeout = Duration::ZERO;
            if batch.len().is_multiple_of(64) && Instant::now() >= collect_until {
                break;
            }
        }
        let now = Instant::now();
        if let Some(error) = context.take_deferred() {
            return Err(error);
        }
        let mut engine = context.engine()?;
        let processed = engine.on_batch(&batch, now);
        batch.clear();
        processed?;
        if let Some(partition) = end_reached {
            engine.on_eof(partition);
        }
        if quiet {
            engine.on_quiet();
        }
        if !quiet && now.saturating_duration_since(last_housekeeping) < HOUSEKEEPING_EVERY {
            continue;
        }
        last_housekeeping = now;
        engine.producer.poll(Duration::ZERO);
        engine.write_idle_ticks()?;
        if engine.last_commit.elapsed() >= commit_interval {
            engine.commit(consumer)?;
        }
        engine.refresh_gauges(consumer);
        if exit_after_idle.is_some_and(|quiet_for| engine.all_settled(quiet_for)) {
            info!("every partition settled, exiting");
            return Ok(ExitReason::Idle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aborts_caused_by_a_rebalance_do_not_count_towards_the_abort_loop() {
        assert!(is_group_membership_error(&KafkaError::ConsumerCommit(
            RDKafkaErrorCode::IllegalGeneration
        )));
        assert!(is_group_membership_error(&KafkaError::ConsumerCommit(
            RDKafkaErrorCode::RebalanceInProgress
        )));
        assert!(!is_group_membership_error(&KafkaError::ConsumerCommit(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(!is_group_membership_error(&KafkaError::Global(
            RDKafkaErrorCode::InvalidRecord
        )));
    }
}
