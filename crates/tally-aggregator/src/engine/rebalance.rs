//! Rebalances: the consumer context holds the [`Engine`], because librdkafka runs the
//! rebalance callback inside `poll`. The callback does nothing that can take long:
//! assigned partitions are recorded as pending, assigned and paused, and restored or
//! started fresh by the loop outside the callback (see `assign.rs`); revoked partitions
//! that are still pending are forgotten (their restore cancelled), owned ones are
//! committed first (or aborted when lost).

use std::sync::{Mutex, MutexGuard};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{info, warn};

use super::{Engine, KAFKA_TIMEOUT};
use crate::error::AggregatorError;
use crate::kafka::{log_client_error, log_librdkafka};
use crate::metrics as m;
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
        m::count_revoked(revoked.len());
        // Pending partitions processed nothing: forgetting them is all there is to do.
        let revoked = self.forget_revoked(&revoked);
        if revoked.is_empty() {
            info!("pending partitions revoked");
            return Ok(());
        }
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
            // A failed commit aborts, which sends changed partitions to be rebuilt.
            self.forget_revoked(&revoked);
            outcome
        };
        info!(?revoked, "partitions revoked");
        result
    }
}

/// Gives the partitions of an assignment that is not taken an absolute placeholder
/// offset, so that assigning them starts no committed-offset lookup (which leaving the
/// group would wait for). They are paused and never fetched.
fn ignore_assignment(tpl: &mut TopicPartitionList) {
    if let Err(error) = tpl.set_all_offsets(Offset::Offset(0)) {
        warn!(%error, "cannot set placeholder offsets on an ignored assignment");
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
                    if engine.failed || engine.stopping() {
                        return Ok(false);
                    }
                    engine.on_assign(tpl).map(|()| true)
                });
                match result {
                    Ok(true) => {}
                    // Stopping (or failed): the partitions are not taken (no restore,
                    // no fetch); the group hands them to another member once this one
                    // leaves.
                    Ok(false) => {
                        info!(
                            partitions = tpl.count(),
                            "assignment ignored while stopping"
                        );
                        ignore_assignment(tpl);
                    }
                    Err(error) => {
                        self.defer(error);
                        ignore_assignment(tpl);
                    }
                }
                // The assign call is made for an ignored assignment too: librdkafka
                // waits for it before the member can leave the group. Paused, such
                // partitions are never fetched; they are revoked when the member leaves.
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                // Paused until restored: the loop seeks and resumes each one.
                let paused = assigned
                    .map_err(|source| AggregatorError::Kafka {
                        operation: "assign",
                        source,
                    })
                    .and_then(|()| {
                        consumer
                            .pause(tpl)
                            .map_err(|source| AggregatorError::Kafka {
                                operation: "pause assigned partitions",
                                source,
                            })
                    });
                if let Err(error) = paused {
                    self.defer(error);
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
