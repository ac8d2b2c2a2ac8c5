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

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::partition::PartitionState;
use tracing::{debug, info};

use crate::checkpoint::Checkpoint;
use crate::decide::re_read_range;
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

/// A rebuilt partition state and how many records it took.
pub(crate) struct Restored {
    pub(crate) state: PartitionState,
    pub(crate) records: u64,
}

/// Re-reads `[checkpoint.low_water, committed_offset)` of `partition` into a fresh state.
pub(crate) fn rebuild_partition(
    settings: &AggregatorSettings,
    rules: &RecordRules<'_>,
    partition: i32,
    checkpoint: &Checkpoint,
    committed_offset: i64,
) -> Result<Restored, AggregatorError> {
    let topic = settings.config.topics.usage_events.as_str();
    let low_water = checkpoint.low_water.offset;
    let mut state = PartitionState::resume(
        settings.partition_params(partition),
        checkpoint.low_water.clock,
    )?;
    let mut records = 0_u64;
    let started = Instant::now();
    if re_read_range(low_water, committed_offset).is_some() {
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
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    last_progress = Instant::now();
                    if message.partition() != partition || message.offset() < next_offset {
                        continue;
                    }
                    if message.offset() >= committed_offset {
                        break;
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
    Ok(Restored { state, records })
}
