//! Rebalances: the consumer context holds the [`Engine`], because librdkafka runs the
//! rebalance callback inside `poll`. Assigned partitions are restored from their
//! committed offset and checkpoint or started fresh; revoked partitions are committed
//! first (or aborted when lost).

use std::sync::{Mutex, MutexGuard};

use rayon::iter::{IntoParallelRefIterator, ParallelIterator};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tally_core::partition::PartitionState;
use tally_core::semantics::{Semantics, check_restart};
use tracing::{info, warn};

use super::partition::OwnedPartition;
use super::{Engine, KAFKA_TIMEOUT, now_ms};
use crate::checkpoint::Checkpoint;
use crate::decide::{StartDecision, start_decision};
use crate::error::AggregatorError;
use crate::kafka::{log_client_error, log_librdkafka};
use crate::metrics as m;
use crate::record::RecordRules;
use crate::restore::{Restored, rebuild_partition};
use crate::settings::StartFrom;

impl Engine {
    pub(super) fn resolve_start(
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
    pub(super) fn on_assign(
        &mut self,
        consumer: &BaseConsumer<AggregatorContext>,
        assignment: &mut TopicPartitionList,
    ) -> Result<(), AggregatorError> {
        // The stable committed-offset fetch below waits for the previous owner's open
        // transaction to end, which can take up to its transaction timeout. Our own open
        // transaction would time out meanwhile and the coordinator's epoch bump would
        // fence this producer, so commit it first.
        self.settings
            .health
            .set_phase(tally_core::health::Phase::Restoring);
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
        let mut refused = Vec::new();
        for element in committed.elements() {
            let partition = element.partition();
            let restore = match element.offset() {
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
                    Some((
                        partition,
                        checkpoint,
                        committed_offset,
                        element.metadata().to_owned(),
                    ))
                }
                _ => None,
            };
            match start_decision(restore, self.settings.start_from) {
                StartDecision::Restore(restore) => to_restore.push(restore),
                StartDecision::Fresh(start_from) => fresh.push((partition, start_from)),
                StartDecision::Refuse => refused.push(partition),
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
        if let Some(&partition) = refused.first() {
            return Err(AggregatorError::NoStartPosition {
                topic: topic.clone(),
                partition,
                group: self.settings.config.aggregator.group_id.clone(),
            });
        }
        for (partition, start_from) in fresh {
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
        self.settings
            .health
            .set_phase(tally_core::health::Phase::Running);
        Ok(())
    }

    /// Gives up revoked partitions: commits everything first (or, when the partitions
    /// were lost to another member, aborts, since their work may be redone there).
    pub(super) fn on_revoke(
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
    pub(super) engine: Mutex<Engine>,
    pub(super) deferred_error: Mutex<Option<AggregatorError>>,
}

impl AggregatorContext {
    pub(super) fn engine(&self) -> Result<MutexGuard<'_, Engine>, AggregatorError> {
        self.engine.lock().map_err(|_| AggregatorError::Poisoned)
    }

    pub(super) fn defer(&self, error: AggregatorError) {
        if let Ok(mut engine) = self.engine.lock() {
            engine.failed = true;
        }
        if let Ok(mut slot) = self.deferred_error.lock() {
            slot.get_or_insert(error);
        }
    }

    pub(super) fn take_deferred(&self) -> Option<AggregatorError> {
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
