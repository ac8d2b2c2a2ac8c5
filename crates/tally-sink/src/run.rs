//! `tally sink`: the Kafka loop that feeds the store (see the crate docs for the
//! exactly-once design).
//!
//! The loop runs on the caller's thread: librdkafka's calls block, and so does the
//! store's API. The store lives in the consumer's context behind a mutex, because the
//! rebalance callback — which runs inside `poll` on the same thread — loads the
//! assigned partitions' offsets from it; the loop never holds the lock across `poll`.
//! The consumer uses the eager assignment protocol, so a rebalance revokes every
//! partition and the batch being collected is dropped as a whole.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tally_aggregator::kafka::{client_config, default_fetch_backoff, is_authentication_failure};
use tally_core::codec::decode_aggregate;
use tally_core::config::{Config, SinkConfig};
use tally_core::health::{Health, Phase};
use tracing::{debug, error, info, warn};

use crate::args::StoreArgs;
use crate::error::{Retry, SinkError};
use crate::metrics as m;
use crate::rows::{Position, StoredRow};
use crate::store::{Batch, OffsetAdvance, Store, StoreLocation};

/// How long one `poll` waits at most.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How often lag and age gauges are refreshed.
const GAUGE_REFRESH: Duration = Duration::from_secs(5);
/// First back-off after a transient database error; doubles up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Attempts to load offsets in the assignment callback before the sink stops.
const ASSIGN_LOAD_ATTEMPTS: u32 = 3;

/// Flags of `tally sink`.
#[derive(Debug, Clone, clap::Args)]
pub struct SinkArgs {
    /// The billing store (`--database`).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Consumer group of the sink instances (Kafka only balances partitions with it;
    /// offsets live in the store). Default: the config's `sink.group_id` (tally-sink).
    #[arg(long)]
    pub group_id: Option<String>,
    /// A batch is written once it holds this many rows... Default: the config's
    /// `sink.batch_max_rows` (20000).
    #[arg(long)]
    pub batch_max_rows: Option<usize>,
    /// ...or once its oldest row waited this long (rows reach the store within about
    /// this plus one transaction at low traffic). Default: the config's
    /// `sink.batch_max_age_ms` (1000).
    #[arg(long)]
    pub batch_max_age_ms: Option<u64>,
    /// Bound of every database round trip, ms; a slower answer counts as an outage.
    /// Default: the config's `sink.db_timeout_ms` (10000).
    #[arg(long)]
    pub db_timeout_ms: Option<u64>,
    /// Cap of the back-off between retries of a batch, ms. Default: the config's
    /// `sink.retry_max_backoff_ms` (5000).
    #[arg(long)]
    pub retry_max_backoff_ms: Option<u64>,
    /// Exit 0 once every assigned partition has been at its end, with nothing left to
    /// write, for this long (for tests and batch catch-up).
    #[arg(long)]
    pub exit_after_idle_ms: Option<u64>,
}

/// Everything [`run`] needs, validated.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    /// The validated configuration (Kafka client, topic names).
    pub config: Config,
    /// Where the store is.
    pub location: StoreLocation,
    /// Consumer group.
    pub group_id: String,
    /// Rows per batch at most.
    pub batch_max_rows: usize,
    /// Age of a batch's first row at which it is written.
    pub batch_max_age: Duration,
    /// Bound of every database round trip.
    pub db_timeout: Duration,
    /// Back-off cap.
    pub retry_max_backoff: Duration,
    /// See [`SinkArgs::exit_after_idle_ms`].
    pub exit_after_idle: Option<Duration>,
    /// Liveness and readiness, reported by the loop: a beat per poll, running once
    /// partitions are assigned with the store's offsets, the database unavailable
    /// while a batch waits out an outage; see `tally_core::health`.
    pub health: Health,
}

impl SinkSettings {
    /// The config's `[sink]` section with the flags of `args` over it, validated;
    /// errors name the flag, or the config field when no flag was given.
    pub fn from_args(config: Config, args: &SinkArgs) -> Result<SinkSettings, SinkError> {
        let location = args.store.location()?;
        let defaults = &config.sink;
        let sink = SinkConfig {
            group_id: args
                .group_id
                .clone()
                .unwrap_or_else(|| defaults.group_id.clone()),
            batch_max_rows: args.batch_max_rows.unwrap_or(defaults.batch_max_rows),
            batch_max_age_ms: args.batch_max_age_ms.unwrap_or(defaults.batch_max_age_ms),
            db_timeout_ms: args.db_timeout_ms.unwrap_or(defaults.db_timeout_ms),
            retry_max_backoff_ms: args
                .retry_max_backoff_ms
                .unwrap_or(defaults.retry_max_backoff_ms),
        };
        // An error names the flag when one was given, else the config field.
        let name = |field: &'static str| -> &'static str {
            let (flag, given, key) = match field {
                "group_id" => ("--group-id", args.group_id.is_some(), "sink.group_id"),
                "batch_max_rows" => (
                    "--batch-max-rows",
                    args.batch_max_rows.is_some(),
                    "sink.batch_max_rows",
                ),
                "batch_max_age_ms" => (
                    "--batch-max-age-ms",
                    args.batch_max_age_ms.is_some(),
                    "sink.batch_max_age_ms",
                ),
                "db_timeout_ms" => (
                    "--db-timeout-ms",
                    args.db_timeout_ms.is_some(),
                    "sink.db_timeout_ms",
                ),
                "retry_max_backoff_ms" => (
                    "--retry-max-backoff-ms",
                    args.retry_max_backoff_ms.is_some(),
                    "sink.retry_max_backoff_ms",
                ),
                _ => ("sink", false, "sink"),
            };
            if given { flag } else { key }
        };
        sink.validate_named(name)
            .map_err(|error| SinkError::Setting {
                field: error.field,
                problem: error.problem,
            })?;
        Ok(SinkSettings {
            config,
            location,
            group_id: sink.group_id,
            batch_max_rows: sink.batch_max_rows,
            batch_max_age: Duration::from_millis(sink.batch_max_age_ms),
            db_timeout: Duration::from_millis(sink.db_timeout_ms),
            retry_max_backoff: Duration::from_millis(sink.retry_max_backoff_ms),
            exit_after_idle: args.exit_after_idle_ms.map(Duration::from_millis),
            health: Health::new(),
        })
    }
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The shutdown flag was raised; the open batch was written first.
    Shutdown,
    /// Every partition sat at its end for the configured idle time.
    Idle,
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkSummary {
    /// Why it stopped.
    pub exit: ExitReason,
    /// Batches committed.
    pub batches: u64,
    /// Rows inserted.
    pub rows_inserted: u64,
    /// Rows that were already stored identically.
    pub rows_identical: u64,
    /// Retries after transient database errors.
    pub retries: u64,
}

/// State shared by the loop and the rebalance callback.
#[derive(Debug)]
struct Shared {
    store: Store,
    topic: String,
    /// Assigned partitions and the store's next offset for each (None: no row yet).
    owned: BTreeMap<i32, Option<i64>>,
    /// Bumped on every assignment change; a batch collected in an older epoch is dropped.
    epoch: u64,
    /// An error raised inside the callback, reported by the loop.
    deferred: Option<SinkError>,
    /// Running once an assignment was taken.
    health: Health,
}

struct SinkContext {
    shared: Mutex<Shared>,
}

impl SinkContext {
    fn lock(&self) -> Result<MutexGuard<'_, Shared>, SinkError> {
        self.shared
            .lock()
            .map_err(|_| SinkError::Store("sink state lock poisoned".to_owned()))
    }
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => error!(facility, message, "librdkafka"),
            RDKafkaLogLevel::Warning => warn!(facility, message, "librdkafka"),
            _ => debug!(facility, message, "librdkafka"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka also reports a partition's end here; the loop gets it from poll.
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            return;
        }
        warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for SinkContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let Ok(mut shared) = self.lock() else {
            return;
        };
        shared.epoch += 1;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let topic = shared.topic.clone();
                let mut loaded = None;
                let mut last_error = None;
                for attempt in 0..ASSIGN_LOAD_ATTEMPTS {
                    match shared.store.load_offsets(&topic) {
                        Ok(offsets) => {
                            loaded = Some(offsets);
                            break;
                        }
                        Err(error) => {
                            warn!(error = %error, attempt, "cannot load offsets for an assignment");
                            last_error = Some(error);
                            std::thread::sleep(FIRST_BACKOFF * 2_u32.pow(attempt));
                        }
                    }
                }
                let Some(offsets) = loaded else {
                    shared.deferred = last_error;
                    let _ = consumer.unassign();
                    return;
                };
                let mut assignment = TopicPartitionList::new();
                shared.owned.clear();
                for element in tpl.elements() {
                    let partition = element.partition();
                    let stored = offsets.get(&partition).copied();
                    let offset = stored.map_or(Offset::Beginning, Offset::Offset);
                    if let Err(source) =
                        assignment.add_partition_offset(element.topic(), partition, offset)
                    {
                        shared.deferred = Some(SinkError::Kafka {
                            operation: "build the assignment",
                            source,
                        });
                        return;
                    }
                    shared.owned.insert(partition, stored);
                }
                info!(partitions = ?shared.owned, "partitions assigned, seeking to the store's offsets");
                if let Err(source) = consumer.assign(&assignment) {
                    shared.deferred = Some(SinkError::Kafka {
                        operation: "assign",
                        source,
                    });
                } else {
                    shared.health.set_phase(Phase::Running);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!(partitions = tpl.count(), "partitions revoked");
                shared.owned.clear();
                if let Err(source) = consumer.unassign() {
                    shared.deferred = Some(SinkError::Kafka {
                        operation: "unassign",
                        source,
                    });
                }
            }
            other => {
                warn!(error = ?other, "rebalance error");
                shared.owned.clear();
                let _ = consumer.unassign();
            }
        }
    }
}

/// Rows collected since the last write.
#[derive(Debug)]
struct Pending {
    rows: Vec<StoredRow>,
    /// Next offset per partition after the collected rows.
    next: BTreeMap<i32, i64>,
    started: Option<Instant>,
    epoch: u64,
}

impl Pending {
    fn new(epoch: u64) -> Pending {
        Pending {
            rows: Vec::new(),
            next: BTreeMap::new(),
            started: None,
            epoch,
        }
    }
}

/// Runs the sink until `shutdown` is raised, the idle exit fires, or an error stops it.
pub fn run(settings: SinkSettings, shutdown: Arc<AtomicBool>) -> Result<SinkSummary, SinkError> {
    let store = Store::open(&settings.location, settings.db_timeout)?;
    info!(store = ?kind(&settings.location), "billing store open, schema migrated");
    let topic = settings.config.topics.billing_aggregates.clone();
    let context = SinkContext {
        shared: Mutex::new(Shared {
            store,
            topic: topic.clone(),
            owned: BTreeMap::new(),
            epoch: 0,
            deferred: None,
            health: settings.health.clone(),
        }),
    };
    let consumer: BaseConsumer<SinkContext> = consumer_config(&settings)
        .create_with_context(context)
        .map_err(|source| SinkError::Kafka {
            operation: "create the consumer",
            source,
        })?;
    consumer
        .subscribe(&[topic.as_str()])
        .map_err(|source| SinkError::Kafka {
            operation: "subscribe",
            source,
        })?;
    let mut sink = Loop {
        settings: &settings,
        consumer: &consumer,
        topic,
        summary: SinkSummary {
            exit: ExitReason::Shutdown,
            batches: 0,
            rows_inserted: 0,
            rows_identical: 0,
            retries: 0,
        },
        pending: Pending::new(0),
        at_end: BTreeMap::new(),
        last_activity: Instant::now(),
        last_commit: Instant::now(),
        last_gauges: Instant::now(),
        paused: false,
    };
    let result = sink.drive(&shutdown);
    consumer.unsubscribe();
    result
}

fn kind(location: &StoreLocation) -> &'static str {
    match location {
        StoreLocation::Postgres(_) => "postgresql",
        StoreLocation::Sqlite(_) => "sqlite",
    }
}

/// The sink's consumer: the shared client config ([`client_config`]: `kafka.client`,
/// the password of `kafka.sasl_password_file`, `bootstrap.servers`), then the settings
/// the sink needs for correctness, which the pass-through map cannot weaken.
fn consumer_config(settings: &SinkSettings) -> ClientConfig {
    let mut config = client_config(&settings.config.kafka);
    config
        .set("group.id", &settings.group_id)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range")
        .set("group.protocol", "classic")
        .set("enable.partition.eof", "true");
    default_fetch_backoff(&mut config);
    config
}

struct Loop<'a> {
    settings: &'a SinkSettings,
    consumer: &'a BaseConsumer<SinkContext>,
    topic: String,
    summary: SinkSummary,
    pending: Pending,
    /// Partitions that reported their end since their last record.
    at_end: BTreeMap<i32, bool>,
    last_activity: Instant,
    last_commit: Instant,
    last_gauges: Instant,
    paused: bool,
}

impl Loop<'_> {
    fn shared(&self) -> Result<MutexGuard<'_, Shared>, SinkError> {
        self.consumer.context().lock()
    }

    fn drive(&mut self, shutdown: &AtomicBool) -> Result<SinkSummary, SinkError> {
        loop {
            if shutdown.load(Ordering::Acquire) {
                self.flush(shutdown)?;
                self.summary.exit = ExitReason::Shutdown;
                return Ok(self.summary);
            }
            let timeout = match self.pending.started {
                Some(started) => self
                    .settings
                    .batch_max_age
                    .saturating_sub(started.elapsed())
                    .min(POLL_TIMEOUT),
                None => POLL_TIMEOUT,
            };
            self.settings.health.beat();
            let polled = self.consumer.poll(timeout);
            self.check_deferred()?;
            match polled {
                Some(Ok(message)) => self.on_message(&message)?,
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    self.at_end.insert(partition, true);
                    self.last_activity = Instant::now();
                }
                Some(Err(error)) if is_authentication_failure(&error) => {
                    // librdkafka would retry a refused login forever; no retry fixes it.
                    return Err(SinkError::Kafka {
                        operation: "authenticate",
                        source: error,
                    });
                }
                Some(Err(error)) => warn!(error = %error, "consumer error"),
                None => {}
            }
            let full = self.pending.rows.len() >= self.settings.batch_max_rows;
            let old = self
                .pending
                .started
                .is_some_and(|started| started.elapsed() >= self.settings.batch_max_age);
            if full || old {
                self.flush(shutdown)?;
            }
            if self.last_gauges.elapsed() >= GAUGE_REFRESH {
                self.refresh_gauges();
            }
            if let Some(idle) = self.settings.exit_after_idle
                && self.pending.rows.is_empty()
                && self.is_settled()
                && self.last_activity.elapsed() >= idle
            {
                self.summary.exit = ExitReason::Idle;
                return Ok(self.summary);
            }
        }
    }

    fn check_deferred(&self) -> Result<(), SinkError> {
        match self.shared()?.deferred.take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Every owned partition reported its end since its last record.
    fn is_settled(&self) -> bool {
        let Ok(shared) = self.shared() else {
            return false;
        };
        !shared.owned.is_empty()
            && shared
                .owned
                .keys()
                .all(|partition| self.at_end.get(partition).copied().unwrap_or(false))
    }

    fn on_message(&mut self, message: &BorrowedMessage<'_>) -> Result<(), SinkError> {
        let partition = message.partition();
        let offset = message.offset();
        let (epoch, expected) = {
            let shared = self.shared()?;
            (shared.epoch, shared.owned.get(&partition).copied())
        };
        if epoch != self.pending.epoch {
            if !self.pending.rows.is_empty() {
                info!(
                    rows = self.pending.rows.len(),
                    "assignment changed, dropping the uncommitted batch"
                );
            }
            self.pending = Pending::new(epoch);
        }
        let Some(expected) = expected else {
            debug!(
                partition,
                offset, "record of a partition not owned, skipped"
            );
            return Ok(());
        };
        let floor = self
            .pending
            .next
            .get(&partition)
            .copied()
            .or(expected)
            .unwrap_or(0);
        if offset < floor {
            debug!(
                partition,
                offset, floor, "record before the resume offset, skipped"
            );
            return Ok(());
        }
        let value = message.payload().unwrap_or_default();
        let row = decode_aggregate(value).map_err(|source| SinkError::Undecodable {
            topic: message.topic().to_owned(),
            partition,
            offset,
            source,
        })?;
        self.pending.rows.push(StoredRow::new(
            row,
            value,
            Position {
                topic: message.topic().to_owned(),
                partition,
                offset,
            },
        ));
        self.pending.next.insert(partition, offset + 1);
        self.pending.started.get_or_insert_with(Instant::now);
        self.at_end.insert(partition, false);
        self.last_activity = Instant::now();
        Ok(())
    }

    /// The batch of the pending rows against the offsets the store holds.
    fn batch(&mut self) -> Result<Option<Batch>, SinkError> {
        if self.pending.rows.is_empty() {
            return Ok(None);
        }
        let shared = self.shared()?;
        if shared.epoch != self.pending.epoch {
            drop(shared);
            info!(
                rows = self.pending.rows.len(),
                "assignment changed, dropping the uncommitted batch"
            );
            self.pending = Pending::new(self.pending.epoch);
            return Ok(None);
        }
        let offsets = self
            .pending
            .next
            .iter()
            .map(|(&partition, &next)| OffsetAdvance {
                topic: self.topic.clone(),
                partition,
                expected: shared.owned.get(&partition).copied().flatten(),
                next,
            })
            .collect();
        drop(shared);
        Ok(Some(Batch {
            rows: std::mem::take(&mut self.pending.rows),
            offsets,
        }))
    }

    /// Writes the pending rows; on a transient error retries with back-off, pausing
    /// the partitions and polling meanwhile.
    fn flush(&mut self, shutdown: &AtomicBool) -> Result<(), SinkError> {
        let Some(batch) = self.batch()? else {
            return Ok(());
        };
        let epoch = self.pending.epoch;
        let mut backoff = FIRST_BACKOFF;
        let mut attempted = false;
        loop {
            if self.shared()?.epoch != epoch {
                info!(
                    rows = batch.rows.len(),
                    "assignment changed during the retries, dropping the uncommitted batch"
                );
                self.resume_if_paused();
                return Ok(());
            }
            if attempted {
                // The previous attempt may have committed (connection lost during
                // COMMIT): the store's offsets say.
                match self.batch_state(&batch) {
                    Ok(BatchState::Committed) => {
                        info!("the previous attempt committed, moving on");
                        self.committed(&batch, 0, 0);
                        return Ok(());
                    }
                    Ok(BatchState::NotCommitted) => {}
                    Err(error) if matches!(error.retry(), Retry::Transient(_)) => {
                        if self.wait_out(&error, &mut backoff, shutdown)? {
                            return Ok(());
                        }
                        continue;
                    }
                    Err(error) => return Err(error),
                }
            }
            attempted = true;
            let started = Instant::now();
            let result = self.shared()?.store.write_batch(&batch);
            match result {
                Ok(outcome) => {
                    histogram!(m::DB_TRANSACTION).record(started.elapsed().as_secs_f64());
                    self.committed(&batch, outcome.inserted, outcome.identical);
                    return Ok(());
                }
                Err(error) => match error.retry() {
                    Retry::Transient(_) => {
                        if self.wait_out(&error, &mut backoff, shutdown)? {
                            return Ok(());
                        }
                    }
                    Retry::Fatal => {
                        if matches!(error, SinkError::Conflict { .. }) {
                            counter!(m::CONFLICTS).increment(1);
                        }
                        return Err(error);
                    }
                },
            }
        }
    }

    fn batch_state(&mut self, batch: &Batch) -> Result<BatchState, SinkError> {
        let stored = self.shared()?.store.load_offsets(&self.topic)?;
        let committed = batch
            .offsets
            .iter()
            .all(|advance| stored.get(&advance.partition) == Some(&advance.next));
        if committed {
            return Ok(BatchState::Committed);
        }
        for advance in &batch.offsets {
            let found = stored.get(&advance.partition).copied();
            if found != advance.expected {
                return Err(SinkError::OffsetMismatch {
                    topic: advance.topic.clone(),
                    partition: advance.partition,
                    expected: advance.expected,
                    found,
                });
            }
        }
        Ok(BatchState::NotCommitted)
    }

    /// Counts and logs a transient error, pauses the partitions, and polls through the
    /// back-off so the member stays in the group. Returns true when shutdown was
    /// requested: the batch is then abandoned (nothing of it is stored).
    fn wait_out(
        &mut self,
        error: &SinkError,
        backoff: &mut Duration,
        shutdown: &AtomicBool,
    ) -> Result<bool, SinkError> {
        let kind = match error.retry() {
            Retry::Transient(kind) => kind,
            Retry::Fatal => "other",
        };
        counter!(m::DB_RETRIES, "kind" => kind).increment(1);
        self.summary.retries += 1;
        warn!(error = %error, kind, backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "database unavailable, retrying the batch");
        if !self.paused {
            let assignment = self
                .consumer
                .assignment()
                .map_err(|source| SinkError::Kafka {
                    operation: "read the assignment",
                    source,
                })?;
            self.consumer
                .pause(&assignment)
                .map_err(|source| SinkError::Kafka {
                    operation: "pause",
                    source,
                })?;
            self.paused = true;
            gauge!(m::PAUSED).set(1.0);
            self.settings.health.set_database_available(false);
        }
        let until = Instant::now() + *backoff;
        while Instant::now() < until {
            if shutdown.load(Ordering::Acquire) {
                warn!("shutdown during a database outage, the open batch is not stored");
                return Ok(true);
            }
            // Paused partitions deliver nothing new; a record already queued is kept
            // for the next batch.
            self.settings.health.beat();
            if let Some(Ok(message)) = self.consumer.poll(POLL_TIMEOUT) {
                self.on_message(&message)?;
            }
            self.check_deferred()?;
        }
        *backoff = (*backoff * 2).min(self.settings.retry_max_backoff);
        Ok(false)
    }

    fn resume_if_paused(&mut self) {
        if !self.paused {
            return;
        }
        match self.consumer.assignment() {
            Ok(assignment) => {
                if let Err(error) = self.consumer.resume(&assignment) {
                    warn!(error = %error, "resume failed");
                }
            }
            Err(error) => warn!(error = %error, "cannot read the assignment to resume"),
        }
        self.paused = false;
        gauge!(m::PAUSED).set(0.0);
        self.settings.health.set_database_available(true);
        info!("database available again, consumption resumed");
    }

    fn committed(&mut self, batch: &Batch, inserted: u64, identical: u64) {
        counter!(m::BATCHES).increment(1);
        counter!(m::ROWS_WRITTEN).increment(inserted);
        counter!(m::ROWS_IDENTICAL).increment(identical);
        self.summary.batches += 1;
        self.summary.rows_inserted += inserted;
        self.summary.rows_identical += identical;
        self.last_commit = Instant::now();
        if let Ok(mut shared) = self.shared() {
            for advance in &batch.offsets {
                if let Some(slot) = shared.owned.get_mut(&advance.partition) {
                    *slot = Some(advance.next);
                }
            }
        }
        // Rows polled during a retry stay pending; their partitions' floors move on.
        let next = std::mem::take(&mut self.pending.next);
        self.pending.next = next
            .into_iter()
            .filter(|(partition, next)| {
                batch
                    .offsets
                    .iter()
                    .all(|advance| advance.partition != *partition || advance.next < *next)
            })
            .collect();
        if self.pending.rows.is_empty() {
            self.pending.started = None;
        } else {
            self.pending.started = Some(Instant::now());
        }
        self.resume_if_paused();
        debug!(
            rows = batch.rows.len(),
            inserted, identical, "batch committed"
        );
    }

    fn refresh_gauges(&mut self) {
        self.last_gauges = Instant::now();
        gauge!(m::LAST_COMMIT_AGE).set(self.last_commit.elapsed().as_secs_f64());
        let owned: Vec<(i32, Option<i64>)> = match self.shared() {
            Ok(shared) => shared.owned.iter().map(|(p, o)| (*p, *o)).collect(),
            Err(_) => return,
        };
        for (partition, stored) in owned {
            if let Ok((_low, high)) =
                self.consumer
                    .fetch_watermarks(&self.topic, partition, Duration::from_secs(1))
                && high >= 0
            {
                let lag = high - stored.unwrap_or(0);
                gauge!(m::LAG, "partition" => partition.to_string()).set(lag.max(0) as f64);
            }
        }
    }
}

enum BatchState {
    Committed,
    NotCommitted,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(database: &str) -> SinkArgs {
        SinkArgs {
            store: StoreArgs::new(database),
            group_id: None,
            batch_max_rows: None,
            batch_max_age_ms: None,
            db_timeout_ms: None,
            retry_max_backoff_ms: None,
            exit_after_idle_ms: None,
        }
    }

    fn setting_field(result: Result<SinkSettings, SinkError>) -> &'static str {
        match result {
            Err(SinkError::Setting { field, .. }) => field,
            other => panic!("expected a setting error, got {other:?}"),
        }
    }

    #[test]
    fn sink_section_applies_when_no_flag_is_given() {
        let mut config = Config::default();
        config.sink.group_id = "billing-sink".to_owned();
        config.sink.batch_max_rows = 250;
        config.sink.batch_max_age_ms = 300;
        config.sink.db_timeout_ms = 2_000;
        config.sink.retry_max_backoff_ms = 700;
        let settings = SinkSettings::from_args(config, &args("sqlite:x.db")).expect("valid");
        assert_eq!(settings.group_id, "billing-sink");
        assert_eq!(settings.batch_max_rows, 250);
        assert_eq!(settings.batch_max_age, Duration::from_millis(300));
        assert_eq!(settings.db_timeout, Duration::from_millis(2_000));
        assert_eq!(settings.retry_max_backoff, Duration::from_millis(700));
    }

    #[test]
    fn flags_override_the_sink_section() {
        let mut config = Config::default();
        config.sink.batch_max_rows = 250;
        config.sink.group_id = "billing-sink".to_owned();
        let mut given = args("sqlite:x.db");
        given.batch_max_rows = Some(40);
        given.db_timeout_ms = Some(900);
        let settings = SinkSettings::from_args(config, &given).expect("valid");
        assert_eq!(settings.batch_max_rows, 40);
        assert_eq!(settings.db_timeout, Duration::from_millis(900));
        assert_eq!(settings.group_id, "billing-sink");
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let settings =
            SinkSettings::from_args(Config::default(), &args("sqlite:x.db")).expect("valid");
        assert_eq!(settings.group_id, "tally-sink");
        assert_eq!(settings.batch_max_rows, 20_000);
        assert_eq!(settings.batch_max_age, Duration::from_millis(1_000));
        assert_eq!(settings.db_timeout, Duration::from_millis(10_000));
        assert_eq!(settings.retry_max_backoff, Duration::from_millis(5_000));
    }

    #[test]
    fn an_impossible_value_names_the_flag_or_the_config_field_that_set_it() {
        let mut config = Config::default();
        config.sink.batch_max_rows = 0;
        assert_eq!(
            setting_field(SinkSettings::from_args(
                config.clone(),
                &args("sqlite:x.db")
            )),
            "sink.batch_max_rows"
        );
        let mut given = args("sqlite:x.db");
        given.batch_max_rows = Some(2_000_000);
        assert_eq!(
            setting_field(SinkSettings::from_args(Config::default(), &given)),
            "--batch-max-rows"
        );
        // A valid flag over an impossible config value is fine: the flag wins.
        given.batch_max_rows = Some(10);
        assert!(SinkSettings::from_args(config, &given).is_ok());

        let mut config = Config::default();
        config.sink.db_timeout_ms = 5;
        assert_eq!(
            setting_field(SinkSettings::from_args(config, &args("sqlite:x.db"))),
            "sink.db_timeout_ms"
        );
        let mut given = args("sqlite:x.db");
        given.group_id = Some(String::new());
        assert_eq!(
            setting_field(SinkSettings::from_args(Config::default(), &given)),
            "--group-id"
        );
    }
}
