//! `tally replay`: the Kafka side (read checkpoints, warm up, re-aggregate, write).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tally_aggregator::kafka::client_config;
use tally_aggregator::record::{InputRecord, RecordRules, apply_record};
use tally_aggregator::{AggregatorSettings, Checkpoint};
use tally_core::aggregate::BillingAggregate;
use tally_core::codec::encode_aggregate;
use tally_core::config::Config;
use tally_core::contracts::Contracts;
use tally_core::partition::{PartitionParams, PartitionState};
use tally_core::semantics::{Semantics, check_restart};
use tally_core::timefmt::{format_utc_ms, parse_rfc3339_ms};
use tally_core::window::WindowSize;
use tally_sink::rows::{Position, StoredRow};
use tally_sink::{Batch, Store, StoreLocation};
use tracing::{info, warn};

use crate::decide::{
    CheckpointEntry, Horizons, WarmUp, choose_warm_up, choose_warm_up_at_offset,
    classification_changes, parse_offsets, row_in_offsets, row_in_range,
};
use crate::error::ReplayError;

/// How long a read may go without a record or a partition end.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of every metadata / watermark call.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// Rows buffered before they are written.
const WRITE_EVERY_ROWS: usize = 5_000;
/// Topic name stored as the rows' read position in a replay store.
const STORE_POSITION_TOPIC: &str = "tally.replay";

/// `tally replay` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Start of the range, event time (RFC 3339, on a window boundary): rows of windows
    /// starting at or after it.
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// End of the range, event time (RFC 3339, exclusive, on a window boundary): rows of
    /// windows ending at or before it.
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    /// The range as input offsets, `PARTITION:START-END,…` (END exclusive): rows made only
    /// of records in it. Partitions not listed are not replayed.
    #[arg(long, conflicts_with_all = ["from", "to", "from_timestamp", "to_timestamp"])]
    pub offsets: Option<String>,
    /// The range by broker (record) timestamp, RFC 3339: turned into the offsets of the
    /// first records stamped at or after it on every partition.
    #[arg(long, requires = "to_timestamp", conflicts_with_all = ["from", "to"])]
    pub from_timestamp: Option<String>,
    /// End of the broker-timestamp range (exclusive).
    #[arg(long, requires = "from_timestamp")]
    pub to_timestamp: Option<String>,
    /// Write the rows to this topic (created when missing; refused if it is any topic of
    /// the configuration).
    #[arg(long)]
    pub output_topic: Option<String>,
    /// Write the rows into this store (`sqlite:FILE` or a PostgreSQL URL whose database
    /// or `search_path` no sink writes; refused when the store holds sink offsets).
    #[arg(long)]
    pub database: Option<String>,
    /// What-if contracts (a renegotiated share, a price change); default: the
    /// configuration's. Refused when they would change which events are rejected.
    #[arg(long)]
    pub contracts: Option<PathBuf>,
    /// How often rows written to the output topic are committed (one transaction each).
    #[arg(long, default_value_t = 1_000)]
    pub commit_interval_ms: u64,
    /// Suffix of the output producer's transactional id `tally-replay-<id>`; default: the
    /// output topic's name, so a re-run into the same topic fences a stale one.
    #[arg(long)]
    pub replay_id: Option<String>,
}

/// Why a partition's read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The watermark passed range end + lateness + correction horizon + one window.
    Settled,
    /// The end offset fixed at start was reached.
    EndOffset,
}

/// What the replay did with one partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    /// Input partition.
    pub partition: i32,
    /// `checkpoint` or `start`.
    pub warm_up: &'static str,
    /// First offset read.
    pub start_offset: i64,
    /// The offsets range of the partition, for an offsets or broker-timestamp replay.
    pub range: Option<(i64, i64)>,
    /// The checkpoint's committed offset, when warming up from one.
    pub checkpoint_offset: Option<i64>,
    /// End offset fixed at start.
    pub end_offset: i64,
    /// Records read.
    pub records: u64,
    /// Rows emitted (windows in the range).
    pub rows: u64,
    /// Why reading ended.
    pub stop: Stop,
    /// The watermark when reading ended.
    pub watermark_ms: Option<i64>,
}

/// The replay's summary (printed as JSON on stdout).
#[derive(Debug, Clone, Serialize)]
pub struct ReplaySummary {
    /// Event-time range start, UTC ms (an offsets range has none).
    pub from_ms: Option<i64>,
    /// Event-time range end, UTC ms.
    pub to_ms: Option<i64>,
    /// Rows emitted in all.
    pub rows: u64,
    /// Per partition.
    pub partitions: Vec<PartitionReport>,
}

/// The checkpoints topic's record (written by the aggregator in each transaction).
#[derive(Debug, Deserialize)]
struct CheckpointRecord {
    topic: String,
    partition: i32,
    offset: i64,
    checkpoint: String,
}

fn kafka(operation: &'static str) -> impl FnOnce(KafkaError) -> ReplayError {
    move |source| ReplayError::Kafka { operation, source }
}

fn refused(reason: String) -> ReplayError {
    ReplayError::Refused { reason }
}

/// Loads a contracts file for `config`'s window.
pub fn load_contracts(config: &Config, path: &std::path::Path) -> Result<Contracts, ReplayError> {
    let contracts_error = |problem: String| ReplayError::Contracts {
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|error| contracts_error(error.to_string()))?;
    let window =
        WindowSize::new(config.aggregator.window_ms).map_err(|error| ReplayError::Setting {
            field: "aggregator.window_ms",
            problem: error.to_string(),
        })?;
    Contracts::load(&text, window).map_err(|error| contracts_error(error.to_string()))
}

fn parse_time(field: &'static str, text: &str) -> Result<i64, ReplayError> {
    parse_rfc3339_ms(text).ok_or_else(|| ReplayError::Setting {
        field,
        problem: format!("{text:?} is not an RFC 3339 time"),
    })
}

/// The replay's outputs.
struct Outputs {
    topic: Option<(String, ThreadedProducer<DefaultProducerContext>)>,
    store: Option<Store>,
    in_transaction: bool,
    last_commit: Instant,
    commit_interval: Duration,
    pending: Vec<StoredRow>,
    buffer: Vec<u8>,
}

impl Outputs {
    fn write(&mut self, row: BillingAggregate) -> Result<(), ReplayError> {
        self.buffer.clear();
        encode_aggregate(&row, &mut self.buffer);
        if let Some((topic, producer)) = &self.topic {
            if !self.in_transaction {
                producer
                    .begin_transaction()
                    .map_err(kafka("begin a transaction"))?;
                self.in_transaction = true;
            }
            let record = BaseRecord::<[u8], [u8]>::to(topic)
                .key(row.id.as_bytes())
                .payload(&self.buffer)
                .timestamp(row.window_end_ms);
            let mut record = record;
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((source, _)) => {
                        return Err(ReplayError::Kafka {
                            operation: "produce a row",
                            source,
                        });
                    }
                }
            }
        }
        if self.store.is_some() {
            let position = Position {
                topic: STORE_POSITION_TOPIC.to_owned(),
                partition: row.source_partition,
                offset: row.last_offset,
            };
            let value = self.buffer.clone();
            self.pending.push(StoredRow::new(row, &value, position));
        }
        Ok(())
    }

    /// Commits the open transaction when the interval passed (or `force`), and writes
    /// buffered store rows when enough are pending (or `force`).
    fn flush(&mut self, force: bool) -> Result<(), ReplayError> {
        if let Some((_, producer)) = &self.topic
            && self.in_transaction
            && (force || self.last_commit.elapsed() >= self.commit_interval)
        {
            producer
                .commit_transaction(KAFKA_TIMEOUT)
                .map_err(kafka("commit a transaction"))?;
            self.in_transaction = false;
            self.last_commit = Instant::now();
        }
        if let Some(store) = &mut self.store
            && !self.pending.is_empty()
            && (force || self.pending.len() >= WRITE_EVERY_ROWS)
        {
            let batch = Batch {
                rows: std::mem::take(&mut self.pending),
                offsets: Vec::new(),
            };
            store.write_batch(&batch)?;
        }
        Ok(())
    }
}

/// Runs a replay (blocking: call it from a blocking thread).
pub fn run(config: &Config, args: &ReplayArgs) -> Result<ReplaySummary, ReplayError> {
    let window_ms = config.aggregator.window_ms;
    let event_time = match (&args.from, &args.to) {
        (Some(from), Some(to)) => {
            let from_ms = parse_time("--from", from)?;
            let to_ms = parse_time("--to", to)?;
            if to_ms <= from_ms
                || from_ms.rem_euclid(window_ms) != 0
                || to_ms.rem_euclid(window_ms) != 0
            {
                return Err(ReplayError::Setting {
                    field: "--from/--to",
                    problem: format!(
                        "need from < to, both on a {window_ms} ms window boundary (aggregator.window_ms)"
                    ),
                });
            }
            Some((from_ms, to_ms))
        }
        _ => None,
    };
    let mut offsets = match &args.offsets {
        Some(text) => Some(parse_offsets(text).map_err(|problem| ReplayError::Setting {
            field: "--offsets",
            problem,
        })?),
        None => None,
    };
    let broker_time = match (&args.from_timestamp, &args.to_timestamp) {
        (Some(from), Some(to)) => {
            let from_ms = parse_time("--from-timestamp", from)?;
            let to_ms = parse_time("--to-timestamp", to)?;
            if to_ms <= from_ms {
                return Err(ReplayError::Setting {
                    field: "--from-timestamp/--to-timestamp",
                    problem: "need from < to".to_owned(),
                });
            }
            Some((from_ms, to_ms))
        }
        _ => None,
    };
    if event_time.is_none() && offsets.is_none() && broker_time.is_none() {
        return Err(ReplayError::Setting {
            field: "--from/--to",
            problem: "give a range: --from/--to, --offsets or --from-timestamp/--to-timestamp"
                .to_owned(),
        });
    }
    if args.commit_interval_ms == 0 {
        return Err(ReplayError::Setting {
            field: "--commit-interval-ms",
            problem: "must be positive".to_owned(),
        });
    }
    let topics = &config.topics;
    if args.output_topic.is_none() && args.database.is_none() {
        return Err(ReplayError::Setting {
            field: "--output-topic/--database",
            problem: "give at least one isolated output".to_owned(),
        });
    }
    if let Some(output) = &args.output_topic {
        let production = [
            &topics.usage_events,
            &topics.billing_aggregates,
            &topics.late,
            &topics.dlq,
            &topics.checkpoints,
        ];
        if output.trim().is_empty() || production.contains(&output) {
            return Err(refused(format!(
                "--output-topic {output:?} is a production topic of the configuration (or empty); replay writes only to a topic of its own"
            )));
        }
    }
    // Contracts: production (the live run's) and the replay's.
    let production_path = PathBuf::from(&config.aggregator.contracts_path);
    let production = load_contracts(config, &production_path)?;
    let contracts = match &args.contracts {
        Some(path) => {
            let what_if = load_contracts(config, path)?;
            let changes = classification_changes(&production, &what_if);
            if !changes.is_empty() {
                let list: Vec<String> = changes
                    .iter()
                    .map(|change| {
                        format!("from {}: {}", format_utc_ms(change.from_ms), change.what)
                    })
                    .collect();
                return Err(refused(format!(
                    "the what-if contracts {} would change which events are rejected or how they are classified, not only prices: {}",
                    path.display(),
                    list.join("; ")
                )));
            }
            what_if
        }
        None => production.clone(),
    };
    // The live aggregator's settings and checks, with the replay's contracts.
    let settings = AggregatorSettings::new(config.clone(), contracts.clone(), "replay");
    settings.validate().map_err(|error| ReplayError::Setting {
        field: "aggregator",
        problem: error.to_string(),
    })?;
    let base = client_config(&config.kafka);
    let partitions = input_partitions(&base, &topics.usage_events)?;
    let semantics = Semantics::new(config, &production)
        .map_err(|error| ReplayError::Setting {
            field: "aggregator.contracts_path",
            problem: error.to_string(),
        })?
        .with_input_partitions(partitions);
    if let Some((from_ms, to_ms)) = broker_time {
        offsets = Some(offsets_for_times(
            &base,
            &topics.usage_events,
            partitions,
            from_ms,
            to_ms,
        )?);
    }
    let checkpoints = read_checkpoints(&base, &topics.checkpoints, &topics.usage_events)?;
    let horizons = Horizons {
        window_ms,
        allowed_lateness_ms: config.aggregator.allowed_lateness_ms,
        correction_horizon_ms: config.aggregator.correction_horizon_ms,
    };

    // Decide every partition's start before writing anything, so a refusal writes nothing.
    let reader = replay_consumer(&base, config)?;
    let mut plans = Vec::new();
    for partition in 0..partitions {
        let entries = checkpoints
            .get(&partition)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let select = match (&offsets, event_time) {
            (Some(ranges), _) => match ranges.get(&partition) {
                Some(&(start, end)) => Select::Offsets { start, end },
                None => continue,
            },
            (None, Some((from_ms, to_ms))) => Select::Windows { from_ms, to_ms },
            (None, None) => continue,
        };
        let warm_up = match select {
            Select::Windows { from_ms, .. } => choose_warm_up(entries, from_ms, &horizons),
            Select::Offsets { start, .. } => choose_warm_up_at_offset(entries, start),
        };
        let (log_start, end_offset) = reader
            .fetch_watermarks(&topics.usage_events, partition, KAFKA_TIMEOUT)
            .map_err(kafka("fetch the input's offsets"))?;
        let start_offset = match &warm_up {
            WarmUp::FromCheckpoint(entry) => {
                let committed = Semantics::from_wire(&entry.checkpoint.semantics).map_err(|error| {
                    refused(format!(
                        "partition {partition}: the checkpoint at offset {} has an unreadable semantics fingerprint: {error}",
                        entry.committed_offset
                    ))
                })?;
                if let Err(change) = check_restart(
                    &committed,
                    &semantics,
                    entry.checkpoint.digest.clock.max_event_time_ms,
                ) {
                    return Err(refused(format!(
                        "partition {partition}: the checkpoint at offset {} was built under other semantics: {}",
                        entry.committed_offset,
                        change
                            .changes
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    )));
                }
                entry.checkpoint.low_water.offset
            }
            WarmUp::FromStart => 0,
        };
        if log_start > start_offset && start_offset < end_offset {
            return Err(refused(format!(
                "{}/{partition}: the warm-up needs input from offset {start_offset}, but the log starts at {log_start} (deleted by retention or DeleteRecords); the range cannot be re-derived exactly",
                topics.usage_events,
            )));
        }
        plans.push((partition, warm_up, start_offset, end_offset, select));
    }

    // Store: must not be a sink's. Opened (and created) only once nothing is refused.
    let store = match &args.database {
        Some(database) => {
            let location = StoreLocation::parse("--database", database)?;
            let mut store = Store::open(&location, Duration::from_secs(10))?;
            let offsets = store.load_offsets(&topics.billing_aggregates)?;
            if !offsets.is_empty() {
                return Err(refused(format!(
                    "--database holds the sink offsets of {} (it is a production store); replay into a store of its own",
                    topics.billing_aggregates
                )));
            }
            Some(store)
        }
        None => None,
    };

    let mut outputs = Outputs {
        topic: match &args.output_topic {
            Some(topic) => {
                create_topic(&base, topic, config)?;
                let replay_id = args.replay_id.clone().unwrap_or_else(|| topic.clone());
                let producer: ThreadedProducer<DefaultProducerContext> = base
                    .clone()
                    .set("transactional.id", format!("tally-replay-{replay_id}"))
                    .set("enable.idempotence", "true")
                    .set("partitioner", "murmur2_random")
                    .create()
                    .map_err(kafka("create the output producer"))?;
                producer
                    .init_transactions(KAFKA_TIMEOUT)
                    .map_err(kafka("init transactions"))?;
                Some((topic.clone(), producer))
            }
            None => None,
        },
        store,
        in_transaction: false,
        last_commit: Instant::now(),
        commit_interval: Duration::from_millis(args.commit_interval_ms),
        pending: Vec::new(),
        buffer: Vec::new(),
    };

    let limits = settings.limits();
    let rules = RecordRules {
        contracts: &contracts,
        limits: &limits,
        partition_count: u32::try_from(partitions).unwrap_or(0),
    };
    let mut reports = Vec::new();
    for (partition, warm_up, start_offset, end_offset, select) in plans {
        let params = settings.partition_params(partition);
        let report = replay_partition(
            &reader,
            &topics.usage_events,
            params,
            &rules,
            PartitionPlan {
                warm_up,
                start_offset,
                end_offset,
                select,
                horizons,
            },
            &mut outputs,
        )?;
        info!(
            partition,
            warm_up = report.warm_up,
            start_offset = report.start_offset,
            records = report.records,
            rows = report.rows,
            "partition replayed"
        );
        reports.push(report);
    }
    outputs.flush(true)?;
    Ok(ReplaySummary {
        from_ms: event_time.map(|(from_ms, _)| from_ms),
        to_ms: event_time.map(|(_, to_ms)| to_ms),
        rows: reports.iter().map(|report| report.rows).sum(),
        partitions: reports,
    })
}

/// Which rows of a partition are emitted.
#[derive(Debug, Clone, Copy)]
enum Select {
    /// Rows of windows inside `[from, to)`.
    Windows { from_ms: i64, to_ms: i64 },
    /// Rows made only of records in `[start, end)`.
    Offsets { start: i64, end: i64 },
}

impl Select {
    fn contains(&self, row: &BillingAggregate) -> bool {
        match *self {
            Select::Windows { from_ms, to_ms } => {
                row_in_range(row.window_start_ms, row.window_end_ms, from_ms, to_ms)
            }
            Select::Offsets { start, end } => {
                row_in_offsets(row.first_offset, row.last_offset, start, end)
            }
        }
    }
}

struct PartitionPlan {
    warm_up: WarmUp,
    start_offset: i64,
    end_offset: i64,
    select: Select,
    horizons: Horizons,
}

fn replay_partition(
    reader: &BaseConsumer,
    topic: &str,
    params: PartitionParams,
    rules: &RecordRules<'_>,
    plan: PartitionPlan,
    outputs: &mut Outputs,
) -> Result<PartitionReport, ReplayError> {
    let partition = params.partition;
    let setting = |error: tally_core::partition::ParamsError| ReplayError::Setting {
        field: "aggregator",
        problem: error.to_string(),
    };
    let (mut state, mut pending_restore) = match &plan.warm_up {
        WarmUp::FromCheckpoint(entry) => (
            PartitionState::resume(params, entry.checkpoint.low_water.clock).map_err(setting)?,
            Some(entry.as_ref().clone()),
        ),
        WarmUp::FromStart => (PartitionState::new(params).map_err(setting)?, None),
    };
    let mut report = PartitionReport {
        partition,
        warm_up: if pending_restore.is_some() {
            "checkpoint"
        } else {
            "start"
        },
        start_offset: plan.start_offset,
        range: match plan.select {
            Select::Offsets { start, end } => Some((start, end)),
            Select::Windows { .. } => None,
        },
        checkpoint_offset: pending_restore.as_ref().map(|entry| entry.committed_offset),
        end_offset: plan.end_offset,
        records: 0,
        rows: 0,
        stop: Stop::EndOffset,
        watermark_ms: None,
    };
    let mut next_offset = plan.start_offset;
    // The watermark after which no emitted row can change: known from the start for an
    // event-time range; for an offsets range, once the range's last record was read (the
    // rows holding its records lie in windows up to its largest counted event time's).
    let mut settled_watermark_ms = match plan.select {
        Select::Windows { to_ms, .. } => Some(plan.horizons.settled_watermark(to_ms)),
        Select::Offsets { .. } => None,
    };
    if next_offset < plan.end_offset {
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(plan.start_offset))
            .map_err(kafka("assign the input"))?;
        reader
            .assign(&assignment)
            .map_err(kafka("assign the input"))?;
        let mut last_progress = Instant::now();
        loop {
            match reader.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    last_progress = Instant::now();
                    if message.partition() != partition || message.offset() < next_offset {
                        continue;
                    }
                    if message.offset() >= plan.end_offset {
                        break;
                    }
                    if let Some(entry) = &pending_restore
                        && message.offset() >= entry.committed_offset
                    {
                        finish_warm_up(&mut state, entry)?;
                        pending_restore = None;
                    }
                    let record = InputRecord {
                        partition,
                        offset: message.offset(),
                        key: message.key(),
                        value: message.payload().unwrap_or_default(),
                        timestamp_ms: message.timestamp().to_millis(),
                    };
                    // Side records (too late, rejected) went to the live run's side topics;
                    // the replay re-derives rows only.
                    let _ = apply_record(&mut state, rules, &record);
                    next_offset = message.offset() + 1;
                    report.records += 1;
                    if pending_restore.is_none() {
                        if state.closed_pending() > 0 {
                            emit(&mut state, rules.contracts, &plan, outputs, &mut report)?;
                        }
                        if let Select::Offsets { end, .. } = plan.select
                            && settled_watermark_ms.is_none()
                            && next_offset >= end
                        {
                            let window_ms = plan.horizons.window_ms;
                            let last_window_end =
                                state.clock().max_event_time_ms.map_or(i64::MIN, |time| {
                                    time.div_euclid(window_ms) * window_ms + window_ms
                                });
                            settled_watermark_ms =
                                Some(plan.horizons.settled_watermark(last_window_end));
                        }
                        if state.watermark().is_some_and(|watermark| {
                            settled_watermark_ms.is_some_and(|settled| watermark >= settled)
                        }) {
                            report.stop = Stop::Settled;
                            break;
                        }
                    } else if state.closed_pending() >= 4_096 {
                        // Closed before the checkpoint: not in the range (see decide.rs).
                        state.discard_closed();
                    }
                    if next_offset >= plan.end_offset {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(eof))) if eof == partition => {
                    let position = reader
                        .position()
                        .ok()
                        .and_then(|list| {
                            list.find_partition(topic, partition)
                                .and_then(|element| element.offset().to_raw())
                        })
                        .unwrap_or(next_offset);
                    if position >= plan.end_offset {
                        break;
                    }
                }
                Some(Err(source)) => {
                    return Err(ReplayError::Kafka {
                        operation: "read the input",
                        source,
                    });
                }
                None => {}
            }
            outputs.flush(false)?;
            if last_progress.elapsed() > STALL_TIMEOUT {
                return Err(ReplayError::Stalled {
                    topic: topic.to_owned(),
                    partition,
                    position: next_offset,
                    seconds: STALL_TIMEOUT.as_secs(),
                });
            }
        }
        reader.unassign().map_err(kafka("unassign the input"))?;
    }
    if let Some(entry) = &pending_restore {
        finish_warm_up(&mut state, entry)?;
    }
    emit(&mut state, rules.contracts, &plan, outputs, &mut report)?;
    report.watermark_ms = state.watermark();
    if report.stop == Stop::EndOffset && state.open_windows() > 0 {
        warn!(
            partition,
            open_windows = state.open_windows(),
            "input ended before every window closed: their rows are not emitted"
        );
    }
    Ok(report)
}

fn finish_warm_up(state: &mut PartitionState, entry: &CheckpointEntry) -> Result<(), ReplayError> {
    state
        .finish_restore(entry.checkpoint.counters, &entry.checkpoint.digest)
        .map_err(|mismatch| ReplayError::WarmUpMismatch {
            partition: state.params().partition,
            low_water: entry.checkpoint.low_water.offset,
            committed_offset: entry.committed_offset,
            problem: format!("{mismatch:?}"),
        })
}

fn emit(
    state: &mut PartitionState,
    contracts: &Contracts,
    plan: &PartitionPlan,
    outputs: &mut Outputs,
    report: &mut PartitionReport,
) -> Result<(), ReplayError> {
    let partition = state.params().partition;
    let rows = state
        .drain_closed(contracts)
        .map_err(|error| ReplayError::Pricing {
            partition,
            problem: error.to_string(),
        })?;
    for row in rows {
        if plan.select.contains(&row) {
            report.rows += 1;
            outputs.write(row)?;
        }
    }
    outputs.flush(false)
}

/// A group-less read_committed consumer (assign only, never commits).
fn replay_consumer(base: &ClientConfig, config: &Config) -> Result<BaseConsumer, ReplayError> {
    base.clone()
        .set("group.id", format!("{}.replay", config.aggregator.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .map_err(kafka("create the replay consumer"))
}

fn input_partitions(base: &ClientConfig, topic: &str) -> Result<i32, ReplayError> {
    let consumer: BaseConsumer = base
        .clone()
        .create()
        .map_err(kafka("create a metadata client"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(kafka("fetch the input's metadata"))?;
    let count = metadata
        .topics()
        .iter()
        .find(|found| found.name() == topic && found.error().is_none())
        .map_or(0, |found| found.partitions().len());
    if count == 0 {
        return Err(ReplayError::Setting {
            field: "topics.usage_events",
            problem: format!("topic {topic:?} does not exist"),
        });
    }
    i32::try_from(count).map_err(|_| ReplayError::Setting {
        field: "topics.usage_events",
        problem: "too many partitions".to_owned(),
    })
}

/// Every committed checkpoint of `input` in the checkpoints topic, by input partition,
/// read up to the end offsets of when it starts.
fn read_checkpoints(
    base: &ClientConfig,
    checkpoints_topic: &str,
    input: &str,
) -> Result<BTreeMap<i32, Vec<CheckpointEntry>>, ReplayError> {
    let mut found: BTreeMap<i32, Vec<CheckpointEntry>> = BTreeMap::new();
    let consumer: BaseConsumer = base
        .clone()
        .set("group.id", "tally-replay-checkpoints")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(kafka("create the checkpoints reader"))?;
    let metadata = consumer
        .fetch_metadata(Some(checkpoints_topic), KAFKA_TIMEOUT)
        .map_err(kafka("fetch the checkpoints topic's metadata"))?;
    let Some(topic) = metadata
        .topics()
        .iter()
        .find(|topic| topic.name() == checkpoints_topic && topic.error().is_none())
    else {
        warn!(
            topic = checkpoints_topic,
            "no checkpoints topic: replays warm up from offset 0"
        );
        return Ok(found);
    };
    let mut assignment = TopicPartitionList::new();
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for partition in topic.partitions() {
        let id = partition.id();
        let (low, high) = consumer
            .fetch_watermarks(checkpoints_topic, id, KAFKA_TIMEOUT)
            .map_err(kafka("fetch the checkpoints topic's offsets"))?;
        if high > low {
            ends.insert(id, high);
            assignment
                .add_partition_offset(checkpoints_topic, id, Offset::Offset(low))
                .map_err(kafka("assign the checkpoints topic"))?;
        }
    }
    if ends.is_empty() {
        return Ok(found);
    }
    consumer
        .assign(&assignment)
        .map_err(kafka("assign the checkpoints topic"))?;
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                if let Some(value) = message.payload()
                    && let Ok(record) = serde_json::from_slice::<CheckpointRecord>(value)
                    && record.topic == input
                {
                    match Checkpoint::from_metadata(&record.checkpoint) {
                        Ok(checkpoint) => {
                            found
                                .entry(record.partition)
                                .or_default()
                                .push(CheckpointEntry {
                                    committed_offset: record.offset,
                                    checkpoint,
                                })
                        }
                        Err(error) => warn!(
                            partition = record.partition,
                            offset = record.offset,
                            error = %error,
                            "checkpoint skipped"
                        ),
                    }
                }
                if ends
                    .get(&message.partition())
                    .is_some_and(|end| message.offset() + 1 >= *end)
                {
                    ends.remove(&message.partition());
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                ends.remove(&partition);
            }
            Some(Err(source)) => {
                return Err(ReplayError::Kafka {
                    operation: "read the checkpoints topic",
                    source,
                });
            }
            None => {}
        }
        if last_progress.elapsed() > STALL_TIMEOUT {
            return Err(ReplayError::Stalled {
                topic: checkpoints_topic.to_owned(),
                partition: ends.keys().next().copied().unwrap_or_default(),
                position: -1,
                seconds: STALL_TIMEOUT.as_secs(),
            });
        }
    }
    Ok(found)
}

/// Creates the output topic when missing (partitions and replication from the config).
fn create_topic(base: &ClientConfig, topic: &str, config: &Config) -> Result<(), ReplayError> {
    let admin: AdminClient<DefaultClientContext> =
        base.create().map_err(kafka("create an admin client"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| ReplayError::Output(format!("cannot start a runtime: {error}")))?;
    let new_topic = NewTopic::new(
        topic,
        config.topics.output_partitions,
        TopicReplication::Fixed(config.topics.replication_factor),
    );
    let options = AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT));
    let results = runtime
        .block_on(admin.create_topics([&new_topic], &options))
        .map_err(kafka("create the output topic"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(ReplayError::Kafka {
                    operation: "create the output topic",
                    source: KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}

/// The offsets of the first records stamped at or after `from_ms` and `to_ms` on every
/// partition (the end offset when none is).
fn offsets_for_times(
    base: &ClientConfig,
    topic: &str,
    partitions: i32,
    from_ms: i64,
    to_ms: i64,
) -> Result<BTreeMap<i32, (i64, i64)>, ReplayError> {
    let consumer: BaseConsumer = base
        .clone()
        .set("group.id", "tally-replay-times")
        .create()
        .map_err(kafka("create a lookup client"))?;
    let lookup = |time_ms: i64| -> Result<BTreeMap<i32, i64>, ReplayError> {
        let mut query = TopicPartitionList::new();
        for partition in 0..partitions {
            query
                .add_partition_offset(topic, partition, Offset::Offset(time_ms))
                .map_err(kafka("look up offsets by time"))?;
        }
        let found = consumer
            .offsets_for_times(query, KAFKA_TIMEOUT)
            .map_err(kafka("look up offsets by time"))?;
        let mut offsets = BTreeMap::new();
        for element in found.elements() {
            let offset = match element.offset() {
                Offset::Offset(offset) => offset,
                _ => {
                    consumer
                        .fetch_watermarks(topic, element.partition(), KAFKA_TIMEOUT)
                        .map_err(kafka("fetch the input's offsets"))?
                        .1
                }
            };
            offsets.insert(element.partition(), offset);
        }
        Ok(offsets)
    };
    let starts = lookup(from_ms)?;
    let ends = lookup(to_ms)?;
    Ok(starts
        .into_iter()
        .filter_map(|(partition, start)| {
            let end = ends.get(&partition).copied()?;
            (end > start).then_some((partition, (start, end)))
        })
        .collect())
}
