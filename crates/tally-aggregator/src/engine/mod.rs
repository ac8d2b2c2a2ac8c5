//! The Kafka loop: one consumer, one transactional producer, the owned partitions.
//!
//! The loop runs on the caller's thread (librdkafka calls block). The [`Engine`] lives
//! in the consumer's context behind a mutex, because the rebalance callback — which
//! runs inside `poll` on the same thread — must commit and drop partition state and
//! record new assignments; the loop never holds the lock across `poll`. Restores run
//! on threads of their own while the loop keeps polling (`assign.rs`). Batches of polled records are
//! processed by per-partition tasks on the worker pool while the loop waits
//! ([`Engine::on_batch`]; see the crate docs).
//!
//! One concern per file:
//! - this file: the [`Engine`] (the owned partitions, the producer, the bookkeeping of
//!   the open transaction) and batch processing, ticks and gauges;
//! - `partition.rs`: [`OwnedPartition`], one owned input partition's live and
//!   committed state;
//! - `transaction.rs`: the transaction — commit with offsets and checkpoints, abort,
//!   recover from a failed call;
//! - `rebalance.rs`: the consumer context and its rebalance callback — record and
//!   pause assigned partitions, commit (or abort) and forget revoked ones;
//! - `assign.rs`: pending partitions — the committed-offset fetch and the restore,
//!   off the loop and outside the callback, then seek, resume and own;
//! - `run.rs`: [`run`], its incarnations and the poll loop (`drive`).
//!
//! The loop's decisions (tick or not, abort or stop, restart, settled, where a partition
//! starts) are pure functions in [`crate::decide`]; Kafka clients and their configs are
//! built in [`crate::kafka`].

mod assign;
mod partition;
mod rebalance;
mod run;
mod transaction;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rayon::iter::{IntoParallelRefMutIterator, ParallelIterator};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord};
use tally_core::codec::encode_tick;
use tally_core::event::{TickOrigin, UsageTick};
use tally_core::semantics::Semantics;
use tally_core::validate::ValidationLimits;
use tracing::debug;

use crate::decide::{self, Settlement, TickDecision};
use crate::error::AggregatorError;
use crate::kafka::ProducerCallbacks;
use crate::metrics::{self as m, PendingTotals};
use crate::record::{
    InputRecord, PREFETCH_AHEAD, RecordOutcome, RecordRules, TOO_LATE, apply_record,
    prefetch_record, side_record,
};
use crate::settings::AggregatorSettings;

use assign::{AssignChannel, PendingPartition};
use partition::OwnedPartition;
use rebalance::AggregatorContext;
pub use run::{ExitReason, RunSummary, run};
use transaction::classify;

/// Timeout of blocking metadata and transaction calls.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// How often lag and gauges are refreshed.
const GAUGE_REFRESH: Duration = Duration::from_secs(5);
/// How often a quiet partition's position is compared with its high watermark.
const END_CHECK_EVERY: Duration = Duration::from_millis(250);
/// Time limit of that comparison's `ListOffsets` request.
const END_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

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
    for (index, message) in messages.iter().enumerate() {
        if let Some(ahead) = messages.get(index + PREFETCH_AHEAD) {
            prefetch_record(&owned.live, ahead.payload().unwrap_or_default());
        }
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
    /// Partitions assigned and paused, not owned yet (see `assign.rs`): never in a
    /// transaction's offsets.
    pending_partitions: BTreeMap<i32, PendingPartition>,
    /// Reports of the committed-offset fetch and restore threads.
    assign_channel: AssignChannel,
    /// The last ticket handed to a pending partition.
    next_ticket: u64,
    transactions_attempted: u64,
    consecutive_aborts: u32,
    pending: PendingTotals,
    summary: RunSummary,
    /// Set once the process must stop: callbacks then only unassign.
    failed: bool,
    /// Set once shutdown was requested, to the time by which the final transaction's
    /// calls must be over: assignments are then ignored (no restore starts), pending
    /// partitions are forgotten and transaction calls are time-limited (see
    /// [`Engine::call_timeout`]).
    stop_deadline: Option<Instant>,
    last_commit: Instant,
    last_gauges: Instant,
    buffer: Vec<u8>,
    /// Threads that process partitions in parallel (none: on the loop's thread).
    workers: Option<Arc<rayon::ThreadPool>>,
    /// Bumped whenever partitions are assigned or rewound (see [`Polled`]).
    epoch: Arc<AtomicU64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

impl Engine {
    /// Whether shutdown was requested.
    fn stopping(&self) -> bool {
        self.stop_deadline.is_some()
    }

    fn topic(&self) -> &str {
        &self.settings.config.topics.usage_events
    }

    /// Starts a new rebalance epoch and returns it.
    fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst) + 1
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

    fn on_eof(&mut self, partition: i32) {
        if let Some(owned) = self.partitions.get_mut(&partition) {
            owned.at_end = true;
        }
    }

    /// After a poll that waited and got nothing: checks the partitions not known to be
    /// at their end against their high watermark (a `ListOffsets` request, at most every
    /// [`END_CHECK_EVERY`] per partition, only while the consumer has nothing to hand
    /// out). librdkafka reports a partition's end only when a fetch returns nothing,
    /// which never happens while records — duplicates, junk — trickle in faster than
    /// `fetch.wait.max.ms`; without this such a partition would never get a tick. One
    /// offset of slack covers the commit marker after the last record of a transaction
    /// (the aggregator's own ticks are written in transactions).
    fn on_quiet(&mut self, consumer: &BaseConsumer<AggregatorContext>) {
        let topic = self.settings.config.topics.usage_events.clone();
        let now = Instant::now();
        for (partition, owned) in &mut self.partitions {
            if owned.at_end
                || owned
                    .end_checked_at
                    .is_some_and(|checked| now.saturating_duration_since(checked) < END_CHECK_EVERY)
            {
                continue;
            }
            owned.end_checked_at = Some(now);
            match consumer.fetch_watermarks(&topic, *partition, END_CHECK_TIMEOUT) {
                Ok((_low, high)) => {
                    if high <= owned.next_offset.saturating_add(1) {
                        owned.at_end = true;
                    }
                }
                Err(error) => debug!(partition, error = %error, "high watermark check failed"),
            }
        }
    }

    /// Appends a tick to every partition idle at its end for the idle timeout.
    fn write_idle_ticks(&mut self) -> Result<(), AggregatorError> {
        let idle_timeout_ms = self.settings.config.aggregator.idle_timeout_ms;
        let now = now_ms();
        let due: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter_map(|(partition, owned)| {
                let facts = owned.tick_facts(now, idle_timeout_ms);
                match decide::tick_decision(&facts, |tick| owned.live.tick_would_close(tick)) {
                    TickDecision::Write { tick_time_ms } => Some((*partition, tick_time_ms)),
                    TickDecision::NotAtEnd
                    | TickDecision::InFlight
                    | TickDecision::NotIdleYet
                    | TickDecision::NoClock
                    | TickDecision::ClosesNothing { .. } => None,
                }
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
            // Stamped `max_event_time_ahead_ms` before its time: the tick stays within
            // the bound it is checked against when read back, and its timestamp is no
            // further ahead of the broker's clock than the events that set the
            // partition's clock (a gateway may stamp events up to the input topic's
            // `message.timestamp.after.max.ms` ahead, with event times that much more
            // again; a tick stamped with its own time could then be refused by the
            // broker and abort the transaction).
            let timestamp_ms = tick_time_ms.saturating_sub(self.limits.max_event_time_ahead_ms);
            let out = BaseRecord::<[u8], [u8]>::to(&self.settings.config.topics.usage_events)
                .partition(partition)
                .payload(&self.buffer)
                .timestamp(timestamp_ms);
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

    /// Whether every owned partition sat at its end for `quiet` after its last usage
    /// record, with its tick read back (or none needed) and everything committed.
    fn all_settled(&self, quiet: Duration) -> bool {
        if !self.pending_partitions.is_empty() {
            return false;
        }
        let now = now_ms();
        let partitions = self
            .partitions
            .values()
            .map(|owned| decide::partition_settlement(&owned.settle_facts(now), quiet));
        decide::settlement(self.in_transaction, partitions) == Settlement::Settled
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
        m::set_restoring(self.pending_partitions.len());
    }
}
