//! The transaction: one per commit interval. [`Engine::commit`] drains closed rows and
//! commits them with every owned partition's offset and checkpoint;
//! [`Engine::abort`] returns every partition to its last commit; a failed transaction
//! call is retried, aborted or ends the incarnation ([`Engine::recover`]). See the
//! crate docs, "Checkpoints and exactly-once semantics".

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::aggregate::BillingAggregate;
use tally_core::codec::encode_aggregate;
use tally_core::partition::PartitionState;
use tracing::{debug, error, info, warn};

use super::rebalance::AggregatorContext;
use super::{Engine, KAFKA_TIMEOUT, now_ms, send};
use crate::checkpoint::Checkpoint;
use crate::decide::{
    AbortVerdict, TransactionCall, TransactionErrorAction, TransactionErrorFacts, abort_verdict,
    transaction_error_action,
};
use crate::error::AggregatorError;
use crate::metrics::{self as m, PendingTotals};

/// Time limit of each transaction call once shutdown was requested, and no later than
/// the engine's stop deadline: the process exits within a few seconds of SIGTERM; a
/// final transaction that cannot commit in time is aborted and its input re-read by
/// the next owner.
const SHUTDOWN_CALL_TIMEOUT: Duration = Duration::from_millis(1_500);
/// The least time a call gets once the stop deadline has passed (an abort still has
/// to be sent).
const SHUTDOWN_CALL_MIN: Duration = Duration::from_millis(100);
/// Flush before an abort: bounded, since an aborting transaction may not drain.
const ABORT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a transaction ended with a commit or an abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CommitOutcome {
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

pub(super) fn classify(operation: &'static str, source: KafkaError) -> AggregatorError {
    if is_fatal(&source) {
        AggregatorError::Fatal { operation, source }
    } else {
        AggregatorError::Kafka { operation, source }
    }
}

pub(super) fn is_fatal(error: &KafkaError) -> bool {
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

/// What a transaction decision needs to know about a failed call.
fn error_facts(error: &KafkaError) -> TransactionErrorFacts {
    TransactionErrorFacts {
        fatal: is_fatal(error),
        group_membership: is_group_membership_error(error),
        retriable: is_retriable(error),
    }
}

fn is_retriable(error: &KafkaError) -> bool {
    matches!(error, KafkaError::Transaction(inner) if inner.is_retriable())
}

impl Engine {
    /// The time limit of a blocking transaction call now.
    pub(super) fn call_timeout(&self) -> Duration {
        match self.stop_deadline {
            Some(deadline) => deadline
                .saturating_duration_since(Instant::now())
                .clamp(SHUTDOWN_CALL_MIN, SHUTDOWN_CALL_TIMEOUT),
            None => KAFKA_TIMEOUT,
        }
    }

    pub(super) fn ensure_transaction(&mut self) -> Result<(), AggregatorError> {
        if !self.in_transaction {
            self.producer
                .begin_transaction()
                .map_err(|source| classify("begin transaction", source))?;
            self.in_transaction = true;
        }
        Ok(())
    }

    pub(super) fn produce_row(&mut self, row: &BillingAggregate) -> Result<(), AggregatorError> {
        self.buffer.clear();
        encode_aggregate(row, &mut self.buffer);
        let topic = &self.settings.config.topics.billing_aggregates;
        let out = BaseRecord::<[u8], [u8]>::to(topic)
            .key(row.id.as_bytes())
            .payload(&self.buffer)
            .timestamp(row.window_end_ms);
        self.send(out)
    }

    /// The offsets and checkpoints of every owned partition for the open transaction:
    /// partitions that processed records get a new checkpoint (low water, counters,
    /// digest, semantics), the others re-send their committed one unchanged.
    pub(super) fn offsets_with_checkpoints(
        &mut self,
    ) -> Result<TopicPartitionList, AggregatorError> {
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
    pub(super) fn commit(
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
            let action =
                transaction_error_action(error_facts(&error), TransactionCall::SendOffsets);
            return self.recover(consumer, "send offsets to transaction", action, error);
        }
        let mut retries = 0;
        loop {
            let Err(error) = self.producer.commit_transaction(self.call_timeout()) else {
                break;
            };
            match transaction_error_action(error_facts(&error), TransactionCall::Commit { retries })
            {
                TransactionErrorAction::RetryCommit => {
                    retries += 1;
                    warn!(error = %error, retries, "retrying commit");
                }
                action => return self.recover(consumer, "commit transaction", action, error),
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
                let live = owned.live.counters();
                m::publish_counter_delta(&owned.committed_counters, &live);
                self.summary.add_committed(&owned.committed_counters, &live);
                owned.committed_counters = live;
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

    pub(super) fn recover(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
        operation: &'static str,
        action: TransactionErrorAction,
        error: KafkaError,
    ) -> Result<CommitOutcome, AggregatorError> {
        let counts_towards_loop = match action {
            TransactionErrorAction::Fatal => {
                self.failed = true;
                error!(error = %error, operation, "fatal producer error");
                return Err(AggregatorError::Fatal {
                    operation,
                    source: error,
                });
            }
            TransactionErrorAction::Abort {
                counts_towards_loop,
            } => counts_towards_loop,
            // Out of in-place retries (the commit loop retries by itself): abort and
            // redo, counting towards the abort loop.
            TransactionErrorAction::RetryCommit => true,
        };
        warn!(error = %error, operation, counts_towards_loop, "transaction failed, aborting it");
        self.abort(consumer, counts_towards_loop)?;
        Ok(CommitOutcome::Aborted)
    }

    /// Aborts the open transaction and returns every owned partition to its last
    /// commit: state, tick bookkeeping, and the consumer's position.
    pub(super) fn abort(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
        counts_towards_loop: bool,
    ) -> Result<(), AggregatorError> {
        if self.in_transaction {
            let flush_limit = if self.stopping() {
                self.call_timeout()
            } else {
                ABORT_FLUSH_TIMEOUT
            };
            if let Err(error) = self.producer.flush(flush_limit) {
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
        let seek_limit = self.call_timeout();
        // Changed since their commit, with a checkpoint: rebuilt from it, as on an
        // assignment.
        let changed: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, owned)| owned.dirty && !owned.committed_metadata.is_empty())
            .map(|(partition, _)| *partition)
            .collect();
        let mut rebuild = Vec::with_capacity(changed.len());
        for partition in changed {
            if let Some(owned) = self.partitions.remove(&partition) {
                rebuild.push((partition, owned.committed_offset, owned.committed_metadata));
            }
        }
        for (partition, owned) in &mut self.partitions {
            if owned.dirty {
                // Never committed: its committed state is a fresh one.
                owned.live = PartitionState::new(self.settings.partition_params(*partition))?;
            }
            owned.rewind(epoch);
            consumer
                .seek(
                    &topic,
                    *partition,
                    Offset::Offset(owned.committed_offset),
                    Timeout::After(seek_limit),
                )
                .map_err(|source| AggregatorError::Kafka {
                    operation: "seek after abort",
                    source,
                })?;
        }
        self.rebuild_from_checkpoints(consumer, rebuild)?;
        match abort_verdict(self.consecutive_aborts, counts_towards_loop) {
            AbortVerdict::Redo { consecutive_aborts } => {
                self.consecutive_aborts = consecutive_aborts;
                Ok(())
            }
            AbortVerdict::AbortLoop { aborts } => {
                self.consecutive_aborts = aborts;
                self.failed = true;
                m::count_abort_loop();
                error!(
                    aborts,
                    "transactions keep aborting at the same input offsets"
                );
                Err(AggregatorError::AbortLoop { aborts })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn aborts_caused_by_a_rebalance_do_not_count_towards_the_abort_loop() {
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
