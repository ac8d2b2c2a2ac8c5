//! [`run`]: incarnations after fatal errors, and the poll loop (`drive`) that collects
//! batches, hands them to the [`Engine`] and runs housekeeping (ticks, commits,
//! gauges, the exit check) between them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use tally_core::partition::PartitionCounters;
use tally_core::semantics::Semantics;
use tracing::{debug, error, info, warn};

use super::assign::AssignChannel;
use super::rebalance::AggregatorContext;
use super::transaction::{CommitOutcome, classify, is_fatal};
use super::{Engine, KAFKA_TIMEOUT, Polled};
use crate::decide::{FatalFacts, RestartDecision, restart_decision};
use crate::error::AggregatorError;
use crate::kafka::{
    ProducerCallbacks, consumer_config, is_authentication_failure, producer_config,
};
use crate::metrics::{self as m, PendingTotals};
use crate::settings::AggregatorSettings;

/// Records processed per batch at most (see `drive`).
const MAX_BATCH: usize = 32_768;
/// How long one `poll` waits.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// Housekeeping (ticks, commit timer, exit check) at most this often while records flow.
const HOUSEKEEPING_EVERY: Duration = Duration::from_millis(10);
/// Once the loop sees the shutdown flag, the final transaction's calls (the commit,
/// or the abort that replaces it) must be over within this time.
const STOP_TRANSACTION_BUDGET: Duration = Duration::from_millis(3_000);
/// Leaving the group at shutdown takes at most this long, and ends at most this long
/// after the final transaction's deadline (it gets at least [`LEAVE_MIN`]). A member
/// leaves in well under a second unless its `JoinGroup` is held (see `leave_group`).
const STOP_LEAVE_BUDGET: Duration = Duration::from_millis(1_000);
/// The least time leaving the group gets.
const LEAVE_MIN: Duration = Duration::from_millis(500);
/// Time limit of leaving the group when the incarnation ends for another reason (an
/// idle exit, an error before a restart).
const LEAVE_LIMIT: Duration = Duration::from_secs(10);

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
    /// Record counters of the committed transactions, summed over partitions: what
    /// this run consumed, counted, dropped as duplicates, routed as too late and
    /// rejected (conserving, like every checkpoint's counters). Work a previous
    /// process committed is not included.
    pub counters: PartitionCounters,
}

impl RunSummary {
    pub(super) fn empty() -> RunSummary {
        RunSummary {
            exit: ExitReason::Shutdown,
            transactions_committed: 0,
            transactions_aborted: 0,
            rows_emitted: 0,
            ticks_written: 0,
            records_restored: 0,
            fatal_restarts: 0,
            parallel_batches: 0,
            counters: PartitionCounters::default(),
        }
    }

    /// Adds an incarnation's work.
    pub(super) fn add(&mut self, other: &RunSummary) {
        self.transactions_committed += other.transactions_committed;
        self.transactions_aborted += other.transactions_aborted;
        self.rows_emitted += other.rows_emitted;
        self.ticks_written += other.ticks_written;
        self.records_restored += other.records_restored;
        self.fatal_restarts += other.fatal_restarts;
        self.parallel_batches += other.parallel_batches;
        add_counters(&mut self.counters, &other.counters);
    }

    /// Adds one partition's committed progress (`after` − `before`) to
    /// [`RunSummary::counters`].
    pub(super) fn add_committed(&mut self, before: &PartitionCounters, after: &PartitionCounters) {
        let delta = |a: u64, b: u64| b.saturating_sub(a);
        let progress = PartitionCounters {
            consumed: delta(before.consumed, after.consumed),
            counted: delta(before.counted, after.counted),
            corrections: delta(before.corrections, after.corrections),
            duplicates: delta(before.duplicates, after.duplicates),
            conflicting_duplicates: delta(
                before.conflicting_duplicates,
                after.conflicting_duplicates,
            ),
            too_late: delta(before.too_late, after.too_late),
            rejected: delta(before.rejected, after.rejected),
            ticks: delta(before.ticks, after.ticks),
        };
        add_counters(&mut self.counters, &progress);
    }
}

fn add_counters(sum: &mut PartitionCounters, add: &PartitionCounters) {
    sum.consumed += add.consumed;
    sum.counted += add.counted;
    sum.corrections += add.corrections;
    sum.duplicates += add.duplicates;
    sum.conflicting_duplicates += add.conflicting_duplicates;
    sum.too_late += add.too_late;
    sum.rejected += add.rejected;
    sum.ticks += add.ticks;
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
        let decision = restart_decision(FatalFacts {
            fatal_in_a_row,
            incarnation_committed: summary.transactions_committed > 0,
            shutdown_requested: shutdown.load(Ordering::SeqCst),
        });
        let backoff = match decision {
            RestartDecision::Restart {
                fatal_in_a_row: in_a_row,
                backoff,
            } => {
                fatal_in_a_row = in_a_row;
                backoff
            }
            RestartDecision::TooManyRestarts { restarts }
            | RestartDecision::ShuttingDown { restarts } => {
                error!(error = %source, operation, restarts, "fatal kafka error, stopping");
                return Err(AggregatorError::Fatal { operation, source });
            }
        };
        m::count_fatal_restart();
        total.fatal_restarts += 1;
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
    let stop_deadline = match context.engine.lock() {
        Ok(mut engine) => {
            if result.is_err() {
                engine.failed = true;
            }
            engine.stop_deadline
        }
        Err(_) => None,
    };
    // Leaves the group; the revoke callback finds nothing left to commit (or, after
    // an error, only unassigns).
    let leave_limit = stop_deadline.map_or(LEAVE_LIMIT, |deadline| {
        (deadline + STOP_LEAVE_BUDGET)
            .saturating_duration_since(Instant::now())
            .clamp(LEAVE_MIN, STOP_LEAVE_BUDGET)
    });
    leave_group(consumer, leave_limit);
    let summary = match context.engine() {
        Ok(engine) => engine.summary.clone(),
        Err(error) => return (Err(error), RunSummary::empty()),
    };
    (result, summary)
}

/// Closes the consumer (the revoke callback runs, the member leaves the group), giving
/// up after `limit`.
///
/// Leaving can take far longer than any of tally's calls: a member that stops in the
/// middle of a rebalance has a `JoinGroup` request outstanding, which the coordinator
/// answers only once every member has rejoined, and its `LeaveGroup` request waits
/// behind it on the same connection. librdkafka's close waits for the answer without
/// a limit, and so would dropping the consumer. So the consumer is dropped on a thread
/// of its own; once `limit` has passed, the caller goes on (at shutdown: the process
/// exits), and the group drops the member after `session.timeout.ms`. Nothing is lost
/// either way: the final transaction was committed or aborted before the close.
fn leave_group(consumer: BaseConsumer<AggregatorContext>, limit: Duration) {
    let started = Instant::now();
    let (left_tx, left_rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("tally-leave-group".to_owned())
        .spawn(move || {
            drop(consumer);
            // The receiver is gone when the limit passed first.
            let _ = left_tx.send(());
        });
    if let Err(error) = spawned {
        warn!(%error, "cannot start a thread to leave the group; left it without a time limit");
        return;
    }
    match left_rx.recv_timeout(limit) {
        Ok(()) => debug!(
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "left the group"
        ),
        Err(_) => warn!(
            limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            "leaving the group did not finish in time; going on without it \
             (the group drops this member after its session timeout)"
        ),
    }
}

/// Creates the producer (fencing any earlier producer with the same transactional id)
/// and the consumer, and subscribes.
fn start_incarnation(
    settings: AggregatorSettings,
    workers: Option<Arc<rayon::ThreadPool>>,
) -> Result<(BaseConsumer<AggregatorContext>, Arc<AggregatorContext>), AggregatorError> {
    settings
        .health
        .set_phase(tally_core::health::Phase::Starting);
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
        pending_partitions: BTreeMap::new(),
        assign_channel: AssignChannel::new(),
        next_ticket: 0,
        transactions_attempted: 0,
        consecutive_aborts: 0,
        pending: PendingTotals::default(),
        summary: RunSummary::empty(),
        failed: false,
        stop_deadline: None,
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
            let mut engine = context.engine()?;
            engine.stop_deadline = Some(Instant::now() + STOP_TRANSACTION_BUDGET);
            engine.forget_all_pending();
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
                    // librdkafka would retry a refused login forever; no retry fixes it.
                    if is_authentication_failure(&error) {
                        return Err(AggregatorError::Kafka {
                            operation: "authenticate",
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
        engine.settings.health.beat();
        let processed = engine.on_batch(&batch, now);
        batch.clear();
        processed?;
        engine.serve_pending(consumer)?;
        if let Some(partition) = end_reached {
            engine.on_eof(partition);
        }
        if quiet {
            engine.on_quiet(consumer);
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
