//! Assignment outside the rebalance callback: a newly assigned partition is *pending*
//! until its state is rebuilt, and only then owned.
//!
//! librdkafka runs the rebalance callback inside `poll`, and a member that does not
//! return to `poll` within `max.poll.interval.ms` leaves the group. A restore re-reads
//! up to the dedupe horizon's worth of input, and the stable committed-offset fetch
//! waits out a previous owner's open transaction (up to its transaction timeout), so
//! neither may run inside the callback. The callback therefore only:
//! 1. records each assigned partition as pending, with a cancellation flag;
//! 2. assigns it at a placeholder position (absolute offset 0, never fetched from) and
//!    pauses it, so the consumer delivers nothing of it;
//! 3. starts a helper thread that fetches the partitions' *stable* committed offsets
//!    and checkpoints with a consumer of its own (same group id and isolation, never
//!    subscribed, so it does not join the group).
//!
//! The loop keeps polling — owned partitions are processed and committed as usual, and
//! the member stays in the group — and between batches [`Engine::serve_pending`]
//! moves every pending partition on, as [`decide::pending_step`] says: once its offsets
//! arrive it checks the checkpoint's semantics and starts the re-read on a thread of
//! its own (not on the worker pool: a long re-read would hold a pool thread that the
//! loop's next batch waits for), or starts fresh at `--start-from`, or refuses; once
//! the re-read is done it seeks the group consumer to the committed offset `C`,
//! resumes the partition and owns it. A failed fetch is retried up to
//! [`decide::MAX_OFFSET_FETCH_ATTEMPTS`] times; a failed re-read (digest mismatch,
//! input deleted above the low water, stall) or a semantics change stops the process
//! with the same errors as before.
//!
//! **Commits while a partition is pending.** A pending partition is left out of the
//! offsets sent with each transaction. `TxnOffsetCommit` writes only the partitions it
//! lists, so the group's committed offset and checkpoint for a pending partition stay
//! exactly what its previous owner committed — the same as re-sending them unchanged,
//! without having to know them before the fetch returns (and a commit of the
//! partition's offset can never race ahead of its restore). Nothing of a pending
//! partition is processed, so it has nothing to add to a transaction or to abort.
//!
//! **Revocation.** A pending partition that is revoked (or lost) is forgotten: its
//! flag is raised, its re-read stops within one poll of its consumer and is dropped
//! (`tally_aggregator_partition_restores_cancelled_total`), and a fetch result that
//! arrives later is ignored (each pending partition carries a ticket). Shutdown
//! forgets every pending partition the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::health::Phase;
use tally_core::partition::PartitionState;
use tally_core::semantics::{Semantics, check_restart};
use tracing::{info, warn};

use super::partition::OwnedPartition;
use super::rebalance::AggregatorContext;
use super::{Engine, KAFKA_TIMEOUT, now_ms};

use crate::checkpoint::Checkpoint;
use crate::decide::{
    self, PendingFacts, PendingProgress, PendingStep, StartDecision, start_decision,
};
use crate::error::AggregatorError;
use crate::kafka::{RestoreContext, consumer_config};
use crate::metrics as m;
use crate::record::RecordRules;
use crate::restore::{RestoreControl, RestoreOutcome, Restored, rebuild_partition_with};

/// A committed offset and its metadata (the checkpoint), as fetched.
type Committed = (i64, String);

/// What the helper threads report to the loop.
pub(super) enum AssignEvent {
    /// The committed offsets of the listed (partition, ticket) pairs, or why the fetch
    /// failed.
    Offsets {
        tickets: Vec<(i32, u64)>,
        result: Result<Vec<(i32, Option<Committed>)>, KafkaError>,
    },
    /// A re-read ended.
    Restore {
        partition: i32,
        ticket: u64,
        result: Result<RestoreOutcome, AggregatorError>,
    },
}

/// The helpers' channel: the engine keeps both ends (so it never disconnects) and
/// hands clones of the sender to the threads.
pub(super) struct AssignChannel {
    pub(super) sender: Sender<AssignEvent>,
    pub(super) receiver: Receiver<AssignEvent>,
}

impl AssignChannel {
    pub(super) fn new() -> AssignChannel {
        let (sender, receiver) = std::sync::mpsc::channel();
        AssignChannel { sender, receiver }
    }
}

/// How far a pending partition got, with what it got.
enum Progress {
    FetchingOffsets {
        attempts: u32,
    },
    OffsetsFailed {
        attempts: u32,
        error: KafkaError,
    },
    OffsetsFetched {
        committed: Option<Committed>,
    },
    Restoring {
        committed_offset: i64,
        metadata: String,
        idle_base_ms: i64,
        thread: JoinHandle<()>,
    },
    Restored {
        restored: Box<Restored>,
        committed_offset: i64,
        metadata: String,
        idle_base_ms: i64,
    },
    RestoreFailed {
        error: AggregatorError,
    },
}

impl Progress {
    fn facts(&self) -> PendingProgress {
        match self {
            Progress::FetchingOffsets { .. } => PendingProgress::FetchingOffsets,
            Progress::OffsetsFailed { attempts, .. } => PendingProgress::OffsetsFailed {
                attempts: *attempts,
            },
            Progress::OffsetsFetched { .. } => PendingProgress::OffsetsFetched,
            Progress::Restoring { .. } => PendingProgress::Restoring,
            Progress::Restored { .. } => PendingProgress::Restored,
            Progress::RestoreFailed { .. } => PendingProgress::RestoreFailed,
        }
    }
}

/// A partition assigned to this member and paused until its state is rebuilt.
pub(super) struct PendingPartition {
    /// Identifies this assignment's helper results (a partition revoked and assigned
    /// again gets a new ticket; results for an old one are ignored).
    ticket: u64,
    progress: Progress,
    /// Raised when the partition is forgotten (on drop): its re-read stops.
    cancel: Arc<AtomicBool>,
}

impl Drop for PendingPartition {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

/// Slack over the transaction timeout for one committed-offset fetch attempt.
const OFFSETS_FETCH_SLACK: Duration = Duration::from_secs(10);

/// Fetches the stable committed offsets and checkpoints of `partitions` with a consumer
/// of the group that never joins it. librdkafka asks for stable offsets under
/// read_committed, so a previous owner's pending transaction resolves first; `timeout`
/// covers that wait (it runs off the loop, so waiting is harmless).
fn fetch_committed(
    settings_config: rdkafka::ClientConfig,
    topic: &str,
    partitions: &[(i32, u64)],
    timeout: Duration,
) -> Result<Vec<(i32, Option<Committed>)>, KafkaError> {
    let consumer: BaseConsumer<RestoreContext> =
        settings_config.create_with_context(RestoreContext)?;
    let mut query = TopicPartitionList::new();
    for (partition, _) in partitions {
        query.add_partition(topic, *partition);
    }
    let committed = consumer.committed_offsets(query, timeout)?;
    Ok(partitions
        .iter()
        .map(|(partition, _)| {
            let found =
                committed
                    .find_partition(topic, *partition)
                    .and_then(|element| match element.offset() {
                        Offset::Offset(offset) => Some((offset, element.metadata().to_owned())),
                        _ => None,
                    });
            (*partition, found)
        })
        .collect())
}

impl Engine {
    /// In the rebalance callback: records the newly assigned partitions as pending,
    /// sets their placeholder start position in `assignment` and starts the
    /// committed-offset fetch. The caller assigns and then pauses them.
    pub(super) fn on_assign(
        &mut self,
        assignment: &mut TopicPartitionList,
    ) -> Result<(), AggregatorError> {
        let topic = self.topic().to_owned();
        let partitions: Vec<i32> = assignment
            .elements()
            .iter()
            .map(|element| element.partition())
            .collect();
        let mut tickets = Vec::with_capacity(partitions.len());
        for &partition in &partitions {
            // Never fetched from: the partition is paused, and seeked to its start
            // before it is resumed. The placeholder is an absolute offset on purpose:
            // a logical one (END, BEGINNING, STORED) starts an offset lookup that can
            // complete after the seek and move the position back to its own result
            // (librdkafka issue #2256), which for END would skip input. An absolute
            // offset needs no lookup; and were a seek ever lost, fetching from 0 only
            // re-delivers records below the position, which the loop drops.
            assignment
                .set_partition_offset(&topic, partition, Offset::Offset(0))
                .map_err(|source| AggregatorError::Kafka {
                    operation: "set placeholder offset",
                    source,
                })?;
            let ticket = self.add_pending(partition, Progress::FetchingOffsets { attempts: 1 });
            tickets.push((partition, ticket));
        }
        m::count_assigned(partitions.len());
        m::set_restoring(self.pending_partitions.len());
        self.report_phase();
        info!(?partitions, "partitions assigned, paused until restored");
        self.spawn_offsets_fetch(tickets)
    }

    /// Records `partition` as pending at `progress` under a new ticket (returned).
    fn add_pending(&mut self, partition: i32, progress: Progress) -> u64 {
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.pending_partitions.insert(
            partition,
            PendingPartition {
                ticket,
                progress,
                cancel: Arc::new(AtomicBool::new(false)),
            },
        );
        ticket
    }

    /// After an abort: `partitions` (dropped from the owned ones) become pending with
    /// their committed offset and checkpoint as if just fetched, and are paused; their
    /// state is re-read like any assigned partition's, then they are owned again.
    pub(super) fn rebuild_from_checkpoints(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
        partitions: Vec<(i32, i64, String)>,
    ) -> Result<(), AggregatorError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let topic = self.topic().to_owned();
        let mut pause = TopicPartitionList::new();
        for (partition, committed_offset, metadata) in partitions {
            pause.add_partition(&topic, partition);
            self.add_pending(
                partition,
                Progress::OffsetsFetched {
                    committed: Some((committed_offset, metadata)),
                },
            );
        }
        consumer
            .pause(&pause)
            .map_err(|source| AggregatorError::Kafka {
                operation: "pause partitions to rebuild after an abort",
                source,
            })?;
        m::set_restoring(self.pending_partitions.len());
        self.report_phase();
        info!(
            partitions = pause.count(),
            "rebuilding the state of partitions changed in the aborted transaction"
        );
        Ok(())
    }

    /// In the rebalance callback: forgets revoked partitions that are still pending
    /// (cancelling their re-read). Returns the revoked partitions this member owned.
    pub(super) fn forget_revoked(&mut self, revoked: &[i32]) -> Vec<i32> {
        let mut owned = Vec::with_capacity(revoked.len());
        for partition in revoked {
            let Some(pending) = self.pending_partitions.get(partition) else {
                owned.push(*partition);
                continue;
            };
            let step = decide::pending_step(PendingFacts {
                revoked: true,
                stopping: self.stopping(),
                progress: pending.progress.facts(),
            });
            debug_assert_eq!(step, PendingStep::Forget);
            self.forget(*partition);
        }
        m::set_restoring(self.pending_partitions.len());
        self.report_phase();
        owned
    }

    /// Forgets every pending partition (shutdown).
    pub(super) fn forget_all_pending(&mut self) {
        let partitions: Vec<i32> = self.pending_partitions.keys().copied().collect();
        for partition in partitions {
            self.forget(partition);
        }
        m::set_restoring(0);
    }

    /// Drops a pending partition, which raises its cancellation flag.
    fn forget(&mut self, partition: i32) {
        if let Some(pending) = self.pending_partitions.remove(&partition)
            && matches!(pending.progress, Progress::Restoring { .. })
        {
            m::count_restore_cancelled();
            info!(partition, "restore cancelled");
        }
    }

    /// Between batches: applies what the helpers reported and moves every pending
    /// partition on (see the module docs).
    pub(super) fn serve_pending(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
    ) -> Result<(), AggregatorError> {
        while let Ok(event) = self.assign_channel.receiver.try_recv() {
            self.apply_event(event);
        }
        if self.pending_partitions.is_empty() {
            return Ok(());
        }
        // Partitions ready to be owned are resumed together after the loop, so ones that
        // became ready at once are fetched in the same requests (and processed in the
        // same batches).
        let mut ready: Vec<(i32, OwnedPartition)> = Vec::new();
        let partitions: Vec<i32> = self.pending_partitions.keys().copied().collect();
        for partition in partitions {
            let Some(pending) = self.pending_partitions.get_mut(&partition) else {
                continue;
            };
            // A restore thread that ended without reporting panicked.
            if let Progress::Restoring { thread, .. } = &pending.progress
                && thread.is_finished()
            {
                // Its report, if any, was sent before it finished: drain once more.
                while let Ok(event) = self.assign_channel.receiver.try_recv() {
                    self.apply_event(event);
                }
                if let Some(pending) = self.pending_partitions.get_mut(&partition)
                    && matches!(pending.progress, Progress::Restoring { .. })
                {
                    pending.progress = Progress::RestoreFailed {
                        error: AggregatorError::RestoreLost { partition },
                    };
                }
            }
            let stopping = self.stopping();
            let Some(pending) = self.pending_partitions.get_mut(&partition) else {
                continue;
            };
            let step = decide::pending_step(PendingFacts {
                revoked: false,
                stopping,
                progress: pending.progress.facts(),
            });
            match step {
                PendingStep::AwaitOffsets | PendingStep::AwaitRestore => {}
                PendingStep::RetryOffsets { attempt } => {
                    if let Progress::OffsetsFailed { error, .. } = &pending.progress {
                        warn!(partition, attempt, error = %error, "committed offset fetch failed, retrying");
                    }
                    pending.progress = Progress::FetchingOffsets { attempts: attempt };
                    let ticket = pending.ticket;
                    self.spawn_offsets_fetch(vec![(partition, ticket)])?;
                }
                PendingStep::FailOffsets => {
                    let Some(pending) = self.pending_partitions.remove(&partition) else {
                        continue;
                    };
                    if let Progress::OffsetsFailed { error, .. } = &pending.progress {
                        return Err(AggregatorError::Kafka {
                            operation: "fetch committed offsets",
                            source: error.clone(),
                        });
                    }
                }
                PendingStep::Start => {
                    if let Some(owned) = self.start_pending(consumer, partition)? {
                        ready.push((partition, owned));
                    }
                }
                PendingStep::Own => {
                    if let Some(owned) = self.own_restored(partition) {
                        ready.push((partition, owned));
                    }
                }
                PendingStep::Fail => {
                    let Some(mut pending) = self.pending_partitions.remove(&partition) else {
                        continue;
                    };
                    let progress = std::mem::replace(
                        &mut pending.progress,
                        Progress::FetchingOffsets { attempts: 0 },
                    );
                    if let Progress::RestoreFailed { error } = progress {
                        return Err(error);
                    }
                }
                PendingStep::Forget => self.forget(partition),
            }
        }
        self.take_ownership(consumer, ready)?;
        m::set_restoring(self.pending_partitions.len());
        self.report_phase();
        Ok(())
    }

    /// `/readyz`: restoring while any assigned partition awaits its restore, running
    /// once none does (after the first assignment; before it the process is starting).
    fn report_phase(&self) {
        let phase = if self.pending_partitions.is_empty() {
            Phase::Running
        } else {
            Phase::Restoring
        };
        self.settings.health.set_phase(phase);
    }

    /// Records a helper's report on its pending partition, if that partition is still
    /// pending under the same ticket (else the report is stale and dropped).
    fn apply_event(&mut self, event: AssignEvent) {
        match event {
            AssignEvent::Offsets { tickets, result } => {
                if result.is_err() {
                    m::count_offset_fetch_failure();
                }
                for (partition, ticket) in tickets {
                    let Some(pending) = self.pending_partitions.get_mut(&partition) else {
                        continue;
                    };
                    let Progress::FetchingOffsets { attempts } = pending.progress else {
                        continue;
                    };
                    if pending.ticket != ticket {
                        continue;
                    }
                    pending.progress = match &result {
                        Ok(found) => Progress::OffsetsFetched {
                            committed: found
                                .iter()
                                .find(|(candidate, _)| *candidate == partition)
                                .and_then(|(_, committed)| committed.clone()),
                        },
                        Err(error) => Progress::OffsetsFailed {
                            attempts,
                            error: error.clone(),
                        },
                    };
                }
            }
            AssignEvent::Restore {
                partition,
                ticket,
                result,
            } => {
                let Some(pending) = self.pending_partitions.get_mut(&partition) else {
                    return;
                };
                if pending.ticket != ticket {
                    return;
                }
                let progress = std::mem::replace(
                    &mut pending.progress,
                    Progress::FetchingOffsets { attempts: 0 },
                );
                pending.progress = match (progress, result) {
                    (
                        Progress::Restoring {
                            committed_offset,
                            metadata,
                            idle_base_ms,
                            ..
                        },
                        Ok(RestoreOutcome::Restored(restored)),
                    ) => Progress::Restored {
                        restored,
                        committed_offset,
                        metadata,
                        idle_base_ms,
                    },
                    (_, Err(error)) => Progress::RestoreFailed { error },
                    // Only a forgotten partition's re-read is cancelled, and a forgotten
                    // partition is no longer pending.
                    (_, Ok(RestoreOutcome::Cancelled)) => Progress::RestoreFailed {
                        error: AggregatorError::RestoreLost { partition },
                    },
                    (other, Ok(RestoreOutcome::Restored(_))) => other,
                };
            }
        }
    }

    /// Offsets known: checks the checkpoint's semantics and starts the re-read, or
    /// starts the partition fresh (returned, to be owned), or refuses.
    fn start_pending(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
        partition: i32,
    ) -> Result<Option<OwnedPartition>, AggregatorError> {
        let Some(pending) = self.pending_partitions.get_mut(&partition) else {
            return Ok(None);
        };
        let Progress::OffsetsFetched { committed } = &mut pending.progress else {
            return Ok(None);
        };
        let restore = match committed.take() {
            Some((committed_offset, metadata)) => {
                let checkpoint = Checkpoint::from_metadata(&metadata).map_err(|source| {
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
                Some((checkpoint, committed_offset, metadata))
            }
            None => None,
        };
        match start_decision(restore, self.settings.start_from) {
            StartDecision::Restore((checkpoint, committed_offset, metadata)) => {
                let idle_base_ms = checkpoint.idle_base_ms;
                let thread = self.spawn_restore(partition, checkpoint, committed_offset)?;
                m::count_restore_started();
                if let Some(pending) = self.pending_partitions.get_mut(&partition) {
                    pending.progress = Progress::Restoring {
                        committed_offset,
                        metadata,
                        idle_base_ms,
                        thread,
                    };
                }
                Ok(None)
            }
            StartDecision::Fresh(start_from) => {
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
                // Commit the start position at the next commit, so a restart never
                // needs --start-from again.
                owned.dirty = true;
                Ok(Some(owned))
            }
            StartDecision::Refuse => Err(AggregatorError::NoStartPosition {
                topic: self.topic().to_owned(),
                partition,
                group: self.settings.config.aggregator.group_id.clone(),
            }),
        }
    }

    /// The re-read finished: the partition's state, owned from its committed offset on.
    fn own_restored(&mut self, partition: i32) -> Option<OwnedPartition> {
        let mut pending = self.pending_partitions.remove(&partition)?;
        let progress = std::mem::replace(
            &mut pending.progress,
            Progress::FetchingOffsets { attempts: 0 },
        );
        let Progress::Restored {
            restored,
            committed_offset,
            metadata,
            idle_base_ms,
        } = progress
        else {
            return None;
        };
        m::count_restored(restored.records);
        self.summary.records_restored += restored.records;
        Some(OwnedPartition::new(
            restored.state,
            committed_offset,
            metadata,
            idle_base_ms,
            self.next_epoch(),
        ))
    }

    /// Seeks the group consumer to each partition's start, resumes them all at once
    /// and owns them.
    fn take_ownership(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
        ready: Vec<(i32, OwnedPartition)>,
    ) -> Result<(), AggregatorError> {
        if ready.is_empty() {
            return Ok(());
        }
        let topic = self.topic().to_owned();
        let mut resume = TopicPartitionList::new();
        for (partition, owned) in &ready {
            consumer
                .seek(
                    &topic,
                    *partition,
                    Offset::Offset(owned.next_offset),
                    Timeout::After(KAFKA_TIMEOUT),
                )
                .map_err(|source| AggregatorError::Kafka {
                    operation: "seek to the start offset",
                    source,
                })?;
            resume.add_partition(&topic, *partition);
        }
        consumer
            .resume(&resume)
            .map_err(|source| AggregatorError::Kafka {
                operation: "resume partitions",
                source,
            })?;
        for (partition, owned) in ready {
            info!(partition, offset = owned.next_offset, "partition owned");
            self.pending_partitions.remove(&partition);
            self.partitions.insert(partition, owned);
        }
        Ok(())
    }

    fn spawn_offsets_fetch(&self, tickets: Vec<(i32, u64)>) -> Result<(), AggregatorError> {
        let config = consumer_config(&self.settings);
        let topic = self.topic().to_owned();
        let sender = self.assign_channel.sender.clone();
        // A previous owner's open transaction resolves within its transaction timeout
        // (tally's own setting, assuming the group runs one configuration).
        let timeout = KAFKA_TIMEOUT.max(
            self.settings
                .transaction_timeout()
                .saturating_add(OFFSETS_FETCH_SLACK),
        );
        let injected_failures = Arc::clone(&self.settings.fail_offset_fetches);
        std::thread::Builder::new()
            .name("tally-offsets".to_owned())
            .spawn(move || {
                // The `--fail-offset-fetches` test hook takes one of its failures, if any.
                let injected = injected_failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                        left.checked_sub(1)
                    })
                    .is_ok();
                let result = if injected {
                    Err(KafkaError::MetadataFetch(RDKafkaErrorCode::RequestTimedOut))
                } else {
                    fetch_committed(config, &topic, &tickets, timeout)
                };
                // The engine may be gone (the incarnation ended): nothing to report to.
                let _ = sender.send(AssignEvent::Offsets { tickets, result });
            })
            .map(|_| ())
            .map_err(|source| AggregatorError::Thread {
                what: "committed-offset fetch",
                source,
            })
    }

    fn spawn_restore(
        &self,
        partition: i32,
        checkpoint: Checkpoint,
        committed_offset: i64,
    ) -> Result<JoinHandle<()>, AggregatorError> {
        let Some(pending) = self.pending_partitions.get(&partition) else {
            return Err(AggregatorError::RestoreLost { partition });
        };
        let ticket = pending.ticket;
        let cancel = Arc::clone(&pending.cancel);
        let settings = self.settings.clone();
        let limits = self.limits;
        let partition_count = self.partition_count;
        let sender = self.assign_channel.sender.clone();
        std::thread::Builder::new()
            .name(format!("tally-restore-{partition}"))
            .spawn(move || {
                assert!(
                    !settings.panic_restores,
                    "the --panic-restores test hook ends the restore thread"
                );
                let rules = RecordRules {
                    contracts: &settings.contracts,
                    limits: &limits,
                    partition_count,
                };
                let control = RestoreControl {
                    cancel: &cancel,
                    min_duration: settings.restore_min_duration,
                };
                let result = rebuild_partition_with(
                    &settings,
                    &rules,
                    partition,
                    &checkpoint,
                    committed_offset,
                    &control,
                );
                let _ = sender.send(AssignEvent::Restore {
                    partition,
                    ticket,
                    result,
                });
            })
            .map_err(|source| AggregatorError::Thread {
                what: "partition restore",
                source,
            })
    }
}
