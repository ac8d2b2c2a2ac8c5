//! Rebuilding a partition's state from the input ("the input is the changelog").
//!
//! On assignment, a partition with committed offset `C` and a checkpoint whose low
//! water is `L` gets its state back by re-reading `[L, C)` with a separate, group-less,
//! read_committed consumer and feeding every record, through [`apply_record`], to a
//! state resumed at the checkpoint's clock before `L` ([`PartitionState::resume`]) —
//! exactly what the live loop did. Rows closed on the way and too-late/rejected copies
//! are discarded: they were committed together with `C`. The rebuilt state must have
//! the committed digest ([`PartitionState::finish_restore`]), or it cannot be trusted
//! and the aggregator stops. `L` is the first offset of the oldest window that still
//! has live state (see "Bounded restore" in `tally_core::partition`), so a restore
//! re-reads about the dedupe horizon's worth of input, whatever the partition's
//! history, and works after retention deleted older input. Input deleted at or above
//! `L` makes the restore refuse ([`AggregatorError::RestoreInputDeleted`]).
//!
//! Stopping: a record at offset `≥ C` ends the re-read (it is not applied). The last
//! data offset below `C` may be smaller than `C − 1` (transaction markers occupy
//! offsets and are never delivered), so reaching the partition's end also ends it:
//! `C` was committed after its records were visible to a read_committed reader, so the
//! last stable offset is at least `C` and the end lies at or past it.
//!
//! Where it runs: never inside the rebalance callback. The engine pauses a newly
//! assigned partition, fetches its stable committed offset on a helper thread and runs
//! [`rebuild_partition_with`] on a thread of its own, while the loop keeps polling the
//! group consumer (see `engine/assign.rs`). The re-read checks a cancellation flag
//! before every record and while it waits: when the partition is revoked meanwhile the
//! engine raises the flag and the re-read ends with [`RestoreOutcome::Cancelled`]
//! within one poll (200 ms), its consumer closed and its state dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::partition::PartitionState;
use tracing::{debug, info};

use crate::checkpoint::Checkpoint;
use crate::decide::{paced_due_ms, re_read_range};
use crate::error::AggregatorError;
use crate::kafka::{RestoreContext, restore_config};
use crate::record::{InputRecord, RecordRules, apply_record};
use crate::settings::AggregatorSettings;

/// How long the re-read may go without a record or an end-of-partition event.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the log-start lookup may take.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(30);
/// Closed rows kept before they are drained (and dropped) during a re-read.
const DRAIN_EVERY_ROWS: usize = 4_096;

/// Longest single sleep of a paced re-read, so a cancellation is seen promptly.
const PACE_STEP: Duration = Duration::from_millis(50);

/// A rebuilt partition state and how many records it took.
pub(crate) struct Restored {
    pub(crate) state: PartitionState,
    pub(crate) records: u64,
}

/// How a re-read ended when it did not fail.
pub(crate) enum RestoreOutcome {
    /// The committed state, rebuilt and checked against the checkpoint's digest.
    Restored(Box<Restored>),
    /// The cancellation flag was raised (the partition was revoked or the process is
    /// stopping): nothing was rebuilt.
    Cancelled,
}

/// What steers a re-read from outside.
pub(crate) struct RestoreControl<'a> {
    /// Raised by the engine when the partition is no longer ours: the re-read stops.
    pub(crate) cancel: &'a AtomicBool,
    /// Test hook (`--restore-min-duration-ms`): the re-read takes at least this long.
    pub(crate) min_duration: Option<Duration>,
}

impl RestoreControl<'_> {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Waits until a paced re-read is due to apply `offset` of `range` (no wait without
    /// the hook). Returns false if cancelled meanwhile.
    fn wait_for_pace(&self, range: &std::ops::Range<i64>, offset: i64, started: Instant) -> bool {
        let Some(min_duration) = self.min_duration else {
            return !self.cancelled();
        };
        let min_ms = u64::try_from(min_duration.as_millis()).unwrap_or(u64::MAX);
        let due = Duration::from_millis(paced_due_ms(range, offset, min_ms));
        loop {
            if self.cancelled() {
                return false;
            }
            let elapsed = started.elapsed();
            if elapsed >= due {
                return true;
            }
            std::thread::sleep((due - elapsed).min(PACE_STEP));
        }
    }
}

/// Re-reads `[checkpoint.low_water, committed_offset)` of `partition` into a fresh state.
/// Cannot be cancelled: see [`rebuild_partition_with`].
#[allow(dead_code)] // the entry point for callers that run a restore to its end
pub(crate) fn rebuild_partition(
    settings: &AggregatorSettings,
    rules: &RecordRules<'_>,
    partition: i32,
    checkpoint: &Checkpoint,
    committed_offset: i64,
) -> Result<Restored, AggregatorError> {
    let never = AtomicBool::new(false);
    let control = RestoreControl {
        cancel: &never,
        min_duration: None,
    };
    match rebuild_partition_with(
        settings,
        rules,
        partition,
        checkpoint,
        committed_offset,
        &control,
    )? {
        RestoreOutcome::Restored(restored) => Ok(*restored),
        // The flag is never raised.
        RestoreOutcome::Cancelled => Err(AggregatorError::RestoreStalled {
            partition,
            position: checkpoint.low_water.offset,
            committed_offset,
        }),
    }
}

/// [`rebuild_partition`], stopping early when `control.cancel` is raised.
pub(crate) fn rebuild_partition_with(
    settings: &AggregatorSettings,
    rules: &RecordRules<'_>,
    partition: i32,
    checkpoint: &Checkpoint,
    committed_offset: i64,
    control: &RestoreControl<'_>,
) -> Result<RestoreOutcome, AggregatorError> {
    let topic = settings.config.topics.usage_events.as_str();
    let low_water = checkpoint.low_water.offset;
    let mut state = PartitionState::resume(
        settings.partition_params(partition),
        checkpoint.low_water.clock,
    )?;
    let mut records = 0_u64;
    let started = Instant::now();
    if let Some(range) = re_read_range(low_water, committed_offset) {
        let consumer: BaseConsumer<RestoreContext> = restore_config(settings)
            .create_with_context(RestoreContext)
            .map_err(|source| AggregatorError::Kafka {
                operation: "create restore consumer",
                source,
            })?;
        let (log_start, _high) = consumer
            .fetch_watermarks(topic, partition, WATERMARKS_TIMEOUT)
            .map_err(|source| AggregatorError::Kafka {
                operation: "fetch the input's log start",
                source,
            })?;
        if log_start > low_water {
            return Err(AggregatorError::RestoreInputDeleted {
                topic: topic.to_owned(),
                partition,
                low_water,
                log_start,
                committed_offset,
            });
        }
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(low_water))
            .map_err(|source| AggregatorError::Kafka {
                operation: "assign restore consumer",
                source,
            })?;
        consumer
            .assign(&assignment)
            .map_err(|source| AggregatorError::Kafka {
                operation: "assign restore consumer",
                source,
            })?;
        let mut next_offset = low_water;
        let mut last_progress = Instant::now();
        loop {
            settings.health.beat();
            if control.cancelled() {
                return Ok(RestoreOutcome::Cancelled);
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    last_progress = Instant::now();
                    if message.partition() != partition || message.offset() < next_offset {
                        continue;
                    }
                    if message.offset() >= committed_offset {
                        break;
                    }
                    if !control.wait_for_pace(&range, message.offset(), started) {
                        return Ok(RestoreOutcome::Cancelled);
                    }
                    let record = InputRecord {
                        partition,
                        offset: message.offset(),
                        key: message.key(),
                        value: message.payload().unwrap_or_default(),
                        timestamp_ms: message.timestamp().to_millis(),
                    };
                    // Outcomes are ignored: their writes were committed with the offsets.
                    let _ = apply_record(&mut state, rules, &record);
                    next_offset = message.offset() + 1;
                    records += 1;
                    if state.closed_pending() >= DRAIN_EVERY_ROWS {
                        // Rows closed before `C` were committed; they are only dropped.
                        state.discard_closed();
                    }
                }
                Some(Err(KafkaError::PartitionEOF(eof_partition)))
                    if eof_partition == partition =>
                {
                    debug!(
                        partition,
                        next_offset, committed_offset, "restore reached the partition end"
                    );
                    break;
                }
                Some(Err(source)) => {
                    return Err(AggregatorError::Kafka {
                        operation: "re-read input",
                        source,
                    });
                }
                None => {}
            }
            if last_progress.elapsed() > STALL_TIMEOUT {
                return Err(AggregatorError::RestoreStalled {
                    partition,
                    position: next_offset,
                    committed_offset,
                });
            }
        }
    }
    // A paced re-read of a range whose last records are transaction markers.
    if !control.wait_for_pace(&(low_water..committed_offset), committed_offset, started) {
        return Ok(RestoreOutcome::Cancelled);
    }
    if let Err(source) = state.finish_restore(checkpoint.counters, &checkpoint.digest) {
        return Err(AggregatorError::RestoreMismatch {
            partition,
            low_water,
            committed_offset,
            source,
        });
    }
    info!(
        partition,
        low_water,
        committed_offset,
        records,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "partition state restored from the input"
    );
    Ok(RestoreOutcome::Restored(Box::new(Restored {
        state,
        records,
    })))
}
