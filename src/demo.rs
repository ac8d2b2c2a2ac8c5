//! `tally demo`: the whole pipeline in one process, with no services and no Java.
//!
//! It starts librdkafka's in-process mock cluster (or uses `--broker`), creates the
//! pipeline's topics, and runs together, each on its own blocking thread:
//! - the generator ([`tally_gen::produce_blocking`]), paced to `--count / --seconds`
//!   records per second of wall time, then one gateway tick per partition a day after
//!   the last record, so every window and correction pane closes at a fixed offset;
//! - the aggregator ([`tally_aggregator::run`], exactly-once transactions), started
//!   once and never restarted;
//! - the sink ([`tally_sink::run`]) into a fresh SQLite file.
//!
//! It serves `/metrics` (a free loopback port unless `--metrics-listen` says), shows
//! progress on stderr (one redrawn line on a terminal, a plain line every few seconds
//! otherwise), and ends with a report on stdout read back from the SQLite store:
//! tokens and revenue by cloud and channel partner, each beneficiary's share, the
//! conservation line, throughput, and where the files are. `--json FILE` writes the
//! same figures for machines (the CI test compares them with the generator's truth).
//!
//! # Why the numbers are trustworthy here, and what the mock cannot show
//!
//! librdkafka's mock cluster acknowledges transactional offset commits but stores
//! nothing, lets read_committed readers see open and aborted records, and trims each
//! partition to about 100 000 message sets or 5 MiB, oldest first. So the demo paces
//! the generator (lag stays a few thousand records), never restarts the aggregator
//! (a restart would need the committed offsets the mock does not keep), and takes
//! the conservation line from the aggregator's in-process counters of its committed
//! transactions ([`tally_aggregator::RunSummary::counters`]), not from the broker.
//! Exactly-once under crashes is proven by the real-broker tests, not by this demo.
//!
//! The demo's topics, groups and transactional id carry a per-run suffix, so
//! `--broker` runs never touch a production pipeline's names on a shared broker.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rdkafka::mocking::MockCluster;
use serde::Serialize;
use tally_aggregator::{AggregatorSettings, RunSummary, StartFrom};
use tally_core::config::Config;
use tally_core::contracts::Contracts;
use tally_core::event::{TickOrigin, UsageTick};
use tally_core::timefmt::format_utc_ms;
use tally_core::window::WindowSize;
use tally_gen::generator::DEFAULT_START_TIME_MS;
use tally_gen::{GeneratorConfig, GroundTruth, ProduceOptions};
use tally_producer::{ProducerOptions, UsageProducer};
use tally_sink::report::{self, Dimension, Format, Period, ReportArgs, ReportRequest};
use tally_sink::{SinkArgs, SinkSettings, StoreArgs, StoreLocation};
use tracing::warn;

/// The contracts the demo prices with, embedded so it runs from any directory.
pub(crate) const DEFAULT_CONTRACTS: &str = include_str!("../deploy/contracts/default.toml");

/// What the demo shows, and what it does not (on the mock cluster).
const WHAT_IT_SHOWS: &str = "this demo shows the whole pipeline wired together in one process on librdkafka's mock cluster; \
     exactly-once under SIGKILLs, rebalances and restarts is proven by the real-broker tests \
     (deploy/local/test.sh: Apache Kafka and PostgreSQL), not by the mock";
/// The same for a `--broker` run.
const WHAT_IT_SHOWS_ON_A_BROKER: &str = "this demo shows the whole pipeline wired together in one process on a real broker \
     (its topics stay there); exactly-once under SIGKILLs, rebalances and restarts is proven \
     by the real-broker tests (deploy/local/test.sh), which kill and restart processes";

/// The line for `broker` (`mock` or an address).
fn what_it_shows(broker: &str) -> &'static str {
    if broker == "mock" {
        WHAT_IT_SHOWS
    } else {
        WHAT_IT_SHOWS_ON_A_BROKER
    }
}

/// How far after the last record the closing gateway tick lies: beyond every window,
/// lateness and correction horizon, so every pane closes.
const END_TICK_AFTER_MS: i64 = 24 * 3_600_000;
/// How often progress is sampled.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often a plain progress line is printed when stderr is not a terminal.
const PLAIN_LINE_EVERY: Duration = Duration::from_secs(5);
/// How long the aggregator and the sink may take to drain after the generator ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Flags of `tally demo`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DemoArgs {
    /// Usage records to generate (every class: on time, out of order, corrections,
    /// duplicates, too late, rejected).
    #[arg(long, default_value_t = 150_000)]
    pub(crate) count: u64,
    /// Wall-clock seconds the generator spreads them over (it holds count / seconds
    /// records per second, so lag stays far below the mock cluster's trim).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) seconds: u64,
    /// Simulated records per second of event time (the generator's `--rate`): with
    /// 1-minute windows, count / event-rate / 60 windows.
    #[arg(long, default_value_t = 250)]
    pub(crate) event_rate: u64,
    /// Seed of the generator: the same flags give the same records and the same report.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Partitions of usage.events (and of the output topics).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) partitions: u32,
    /// Tenants (Zipf-distributed volume).
    #[arg(long, default_value_t = 200)]
    pub(crate) tenants: u32,
    /// Run against this real broker (bootstrap servers) instead of the in-process mock
    /// cluster; topics, groups and the transactional id get a per-run suffix.
    #[arg(long)]
    pub(crate) broker: Option<String>,
    /// Replication factor of the topics created on `--broker`.
    #[arg(long, default_value_t = 1)]
    pub(crate) replication_factor: i32,
    /// Where `/metrics` is served (host:port). Default: a free port on 127.0.0.1.
    #[arg(long)]
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// Directory for the SQLite store and the sample reports (must not hold a
    /// billing.db yet). Default: a new directory under the system temp dir.
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Also write the report's figures as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

/// The demo's machine-readable result (`--json`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DemoResult {
    /// `mock` or the `--broker` address.
    pub(crate) broker: String,
    /// The generator's seed, count and simulated rate.
    pub(crate) generator: GeneratorSummary,
    /// The aggregator's committed counters: the conservation line.
    pub(crate) conservation: Conservation,
    /// Billing rows the aggregator committed.
    pub(crate) rows_emitted: u64,
    /// Rows the sink inserted into the store.
    pub(crate) rows_stored: u64,
    /// Usage by (cloud, channel partner), from the store.
    pub(crate) by_cloud_partner: Vec<UsageLine>,
    /// Revenue shares by beneficiary partner, from the store.
    pub(crate) shares: Vec<ShareLine>,
    /// Σ of `by_cloud_partner`.
    pub(crate) total: UsageLine,
    /// Wall time from the first record produced until the aggregator committed the
    /// last one, seconds.
    pub(crate) pipeline_seconds: f64,
    /// Records per second over `pipeline_seconds` (paced by the generator).
    pub(crate) events_per_second: f64,
    /// Whole run, seconds.
    pub(crate) wall_seconds: f64,
    /// The SQLite store.
    pub(crate) sqlite: PathBuf,
    /// A sample daily report (table).
    pub(crate) report_file: PathBuf,
    /// A sample partner share statement (CSV).
    pub(crate) shares_file: PathBuf,
    /// Where `/metrics` was served.
    pub(crate) metrics_address: String,
    /// Start of the reported range (UTC), for `tally report --from`.
    pub(crate) report_from: String,
    /// End of the reported range (UTC, exclusive), for `tally report --to`.
    pub(crate) report_to: String,
}

/// What the generator was asked for.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct GeneratorSummary {
    pub(crate) seed: u64,
    pub(crate) count: u64,
    pub(crate) event_rate: u64,
    pub(crate) partitions: u32,
    pub(crate) tenants: u32,
    pub(crate) produced: u64,
}

/// `in = counted + duplicates + too_late + rejected`.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Conservation {
    #[serde(rename = "in")]
    pub(crate) consumed: u64,
    pub(crate) counted: u64,
    pub(crate) corrections: u64,
    pub(crate) duplicates: u64,
    pub(crate) too_late: u64,
    pub(crate) rejected: u64,
    pub(crate) conserved: bool,
}

/// Usage of one (cloud, channel partner); `channel_partner` is empty for none.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct UsageLine {
    pub(crate) cloud: String,
    pub(crate) channel_partner: String,
    pub(crate) currency: String,
    pub(crate) rows: i64,
    pub(crate) events: i64,
    pub(crate) input_tokens: i64,
    pub(crate) cached_input_tokens: i64,
    pub(crate) output_tokens: i64,
    pub(crate) reasoning_tokens: i64,
    pub(crate) gross_micros: i64,
    pub(crate) net_micros: i64,
}

/// One beneficiary's revenue share.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ShareLine {
    pub(crate) beneficiary: String,
    pub(crate) currency: String,
    pub(crate) share_micros: i64,
    /// Share of the total gross, basis points (rounded down).
    pub(crate) basis_points_of_gross: i64,
}

/// Runs the demo; `base` is the loaded config (its aggregator settings apply).
pub(crate) async fn run(base: Config, args: &DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let run_id = run_suffix();
    let (cluster, bootstrap) = match &args.broker {
        Some(bootstrap) => (None, bootstrap.clone()),
        None => {
            let cluster = MockCluster::new(1).context("cannot start the mock cluster")?;
            let bootstrap = cluster.bootstrap_servers();
            (Some(cluster), bootstrap)
        }
    };
    let config = demo_config(base, args, &bootstrap, &run_id)?;
    let window = WindowSize::new(config.aggregator.window_ms)
        .map_err(|error| anyhow::anyhow!("aggregator.window_ms: {error}"))?;
    let contracts =
        Contracts::load(DEFAULT_CONTRACTS, window).context("the embedded contracts are invalid")?;

    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("tally-demo-{run_id}")),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    let sqlite = dir.join("billing.db");
    if sqlite.exists() {
        bail!(
            "{} exists already: give --dir an empty directory",
            sqlite.display()
        );
    }

    let (metrics, metrics_address) = serve_metrics(args.metrics_listen)?;
    let broker_label = if cluster.is_some() {
        "mock".to_owned()
    } else {
        bootstrap.clone()
    };
    eprintln!("tally demo: {}", what_it_shows(&broker_label));
    eprintln!(
        "tally demo: broker {broker_label}, metrics on http://{metrics_address}/metrics, store {}",
        sqlite.display()
    );

    match &cluster {
        Some(cluster) => {
            for spec in crate::topics::specs(&config) {
                cluster
                    .create_topic(&spec.name, spec.partitions, 1)
                    .with_context(|| format!("cannot create topic {} on the mock", spec.name))?;
            }
        }
        None => {
            crate::topics::create_all(&config).await?;
        }
    }

    // The aggregator, started once.
    let mut settings = AggregatorSettings::new(config.clone(), contracts, format!("demo-{run_id}"));
    settings.start_from = Some(StartFrom::Earliest);
    let aggregator_stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&aggregator_stop);
    let mut aggregator = tokio::task::spawn_blocking(move || tally_aggregator::run(settings, flag));

    // The sink into a fresh SQLite file.
    let sink_args = SinkArgs {
        store: StoreArgs::new(format!("sqlite:{}", sqlite.display())),
        group_id: Some(format!("tally-demo-sink-{run_id}")),
        batch_max_rows: Some(5_000),
        batch_max_age_ms: Some(500),
        db_timeout_ms: Some(10_000),
        retry_max_backoff_ms: Some(5_000),
        exit_after_idle_ms: None,
    };
    let sink_settings =
        SinkSettings::from_args(config.clone(), &sink_args).context("cannot start the sink")?;
    let sink_stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&sink_stop);
    let mut sink = tokio::task::spawn_blocking(move || tally_sink::run(sink_settings, flag));

    // The generator, paced, then the closing ticks.
    let generator_config = GeneratorConfig {
        seed: args.seed,
        count: args.count,
        start_time_ms: DEFAULT_START_TIME_MS,
        rate_per_sec: args.event_rate,
        partitions: args.partitions,
        tenants: args.tenants,
        ..GeneratorConfig::for_aggregator(&config.aggregator)
    };
    generator_config
        .validate()
        .context("invalid generator flags")?;
    let producer = UsageProducer::new(
        &crate::kafka::client_config(&config.kafka),
        ProducerOptions::new(config.topics.usage_events.clone()),
    )
    .context("cannot create the producer")?;
    let produced = Arc::new(AtomicU64::new(0));
    let produced_by_generator = Arc::clone(&produced);
    let real_rate = (args.count / args.seconds).max(1);
    let options = ProduceOptions {
        real_rate_per_sec: std::num::NonZeroU64::new(real_rate),
        progress_interval: Duration::from_millis(200),
        ..ProduceOptions::default()
    };
    let mut generator = tokio::task::spawn_blocking(move || {
        generate(
            &generator_config,
            &producer,
            &options,
            &produced_by_generator,
        )
    });

    let progress = Progress::new(args.count);
    let mut truth: Option<GroundTruth> = None;
    let mut produce_started: Option<Instant> = None;
    let mut drained_at: Option<Instant> = None;
    let mut summary: Option<RunSummary> = None;
    let mut deadline: Option<Instant> = None;
    loop {
        tokio::time::sleep(PROGRESS_EVERY).await;
        metrics.run_upkeep();
        let text = metrics.render();
        let sample = Sample::read(&text, produced.load(Ordering::Relaxed));
        if produce_started.is_none() && sample.produced > 0 {
            produce_started = Some(Instant::now());
        }
        progress.show(&sample, started.elapsed(), false);

        if truth.is_none() && generator.is_finished() {
            let generated = (&mut generator)
                .await
                .context("generator thread failed")?
                .context("producing failed")?;
            deadline = Some(Instant::now() + DRAIN_TIMEOUT);
            truth = Some(generated);
        }
        if summary.is_none() && aggregator.is_finished() {
            let result = (&mut aggregator)
                .await
                .context("aggregator thread failed")?;
            match result {
                Ok(_) => bail!("the aggregator stopped before the demo asked it to"),
                Err(error) => return Err(error).context("the aggregator failed"),
            }
        }
        if sink.is_finished() {
            let result = (&mut sink).await.context("sink thread failed")?;
            match result {
                Ok(_) => bail!("the sink stopped before the demo asked it to"),
                Err(error) => return Err(error).context("the sink failed"),
            }
        }
        if let Some(truth) = &truth
            && drained_at.is_none()
            && sample.consumed >= truth.produced
            && sample.gateway_ticks_read() >= u64::from(args.partitions)
            && sample.open_windows == 0
        {
            // Every record is committed and the closing ticks (read in committed
            // transactions, which drained the rows they closed) closed every pane: the
            // shutdown commits what is open and returns the committed counters. The
            // open-windows gauge alone is not enough: it is refreshed every few seconds
            // and reads 0 before the first partition is restored.
            drained_at = Some(Instant::now());
            aggregator_stop.store(true, Ordering::Release);
            let finished = (&mut aggregator)
                .await
                .context("aggregator thread failed")?
                .context("the aggregator failed")?;
            summary = Some(finished);
        }
        if let Some(finished) = &summary
            && sample.rows_stored >= finished.rows_emitted
        {
            break;
        }
        if deadline.is_some_and(|deadline| Instant::now() > deadline) {
            bail!(
                "the pipeline did not drain within {}s of the last record: consumed {} of {}, \
                 {} open windows, {} rows emitted, {} stored",
                DRAIN_TIMEOUT.as_secs(),
                sample.consumed,
                truth.as_ref().map_or(0, |truth| truth.produced),
                sample.open_windows,
                sample.rows_emitted,
                sample.rows_stored
            );
        }
    }
    sink_stop.store(true, Ordering::Release);
    let sink_summary = (&mut sink)
        .await
        .context("sink thread failed")?
        .context("the sink failed")?;
    let final_sample = Sample::read(&metrics.render(), produced.load(Ordering::Relaxed));
    progress.show(&final_sample, started.elapsed(), true);

    let (Some(truth), Some(summary)) = (truth, summary) else {
        bail!("the demo ended without the generator's and the aggregator's results");
    };
    let pipeline_seconds = match (produce_started, drained_at) {
        (Some(from), Some(to)) => to.duration_since(from).as_secs_f64(),
        _ => 0.0,
    };
    let location = StoreArgs::new(format!("sqlite:{}", sqlite.display())).location()?;
    let (report_from, report_to) = report_range(&truth);
    let (by_cloud_partner, shares, report_file, shares_file) =
        read_store(location, &report_from, &report_to, &dir).await?;
    let counters = summary.counters;
    let conservation = Conservation {
        consumed: counters.consumed,
        counted: counters.counted,
        corrections: counters.corrections,
        duplicates: counters.duplicates,
        too_late: counters.too_late,
        rejected: counters.rejected,
        conserved: counters.is_conserved() && counters.consumed == truth.produced,
    };
    let mut total = UsageLine::default();
    for line in &by_cloud_partner {
        add_usage(&mut total, line);
    }
    let result = DemoResult {
        broker: broker_label,
        generator: GeneratorSummary {
            seed: args.seed,
            count: args.count,
            event_rate: args.event_rate,
            partitions: args.partitions,
            tenants: args.tenants,
            produced: truth.produced,
        },
        conservation,
        rows_emitted: summary.rows_emitted,
        rows_stored: sink_summary.rows_inserted,
        total,
        by_cloud_partner,
        shares,
        pipeline_seconds,
        events_per_second: if pipeline_seconds > 0.0 {
            truth.produced as f64 / pipeline_seconds
        } else {
            0.0
        },
        wall_seconds: started.elapsed().as_secs_f64(),
        sqlite,
        report_file,
        shares_file,
        metrics_address: metrics_address.to_string(),
        report_from,
        report_to,
    };
    print!("{}", render(&result));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&result)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    drop(cluster);
    if u64::try_from(result.total.events).ok() != Some(result.conservation.counted) {
        bail!(
            "the store holds {} events, the aggregator counted {}",
            result.total.events,
            result.conservation.counted
        );
    }
    if !result.conservation.conserved {
        bail!("the counters do not conserve: {:?}", result.conservation);
    }
    if result.rows_stored != result.rows_emitted {
        bail!(
            "the store holds {} rows, the aggregator committed {}",
            result.rows_stored,
            result.rows_emitted
        );
    }
    Ok(())
}

/// The demo's config: the loaded one with the demo's broker, per-run topic and group
/// names, partitions and no metrics listener of its own (the demo serves one).
fn demo_config(
    mut config: Config,
    args: &DemoArgs,
    bootstrap: &str,
    run_id: &str,
) -> anyhow::Result<Config> {
    config.kafka.bootstrap_servers = bootstrap.to_owned();
    let prefix = format!("tally-demo-{run_id}");
    config.topics.usage_events = format!("{prefix}.usage.events");
    config.topics.billing_aggregates = format!("{prefix}.billing.aggregates");
    config.topics.late = format!("{prefix}.usage.late");
    config.topics.dlq = format!("{prefix}.usage.dlq");
    config.topics.checkpoints = format!("{prefix}.tally.checkpoints");
    let partitions = i32::try_from(args.partitions).context("--partitions is too large")?;
    config.topics.partitions = partitions;
    config.topics.output_partitions = partitions;
    config.topics.replication_factor = if args.broker.is_some() {
        args.replication_factor
    } else {
        1
    };
    config.aggregator.group_id = format!("{prefix}-aggregator");
    config.metrics.listen = String::new();
    config
        .validate()
        .context("the demo's configuration is invalid")?;
    Ok(config)
}

/// A suffix no other run uses: time and process id.
pub(crate) fn run_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 40);
    format!("{mixed:016x}")
}

/// Installs the Prometheus recorder, serves it on `listen` (or a free loopback port)
/// and returns its handle, which the progress display reads.
fn serve_metrics(listen: Option<SocketAddr>) -> anyhow::Result<(PrometheusHandle, SocketAddr)> {
    let address = match listen {
        Some(address) => address,
        None => {
            let probe =
                TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
            probe.local_addr()?
        }
    };
    let histograms: [(&str, &[f64]); 3] = [
        (
            tally_aggregator::metrics::TRANSACTION_COMMIT,
            &tally_aggregator::metrics::COMMIT_SECONDS_BUCKETS,
        ),
        (
            tally_aggregator::metrics::WINDOW_EMIT_LATENCY,
            &tally_aggregator::metrics::WINDOW_EMIT_SECONDS_BUCKETS,
        ),
        (
            tally_sink::metrics::DB_TRANSACTION,
            &tally_sink::metrics::DB_TRANSACTION_SECONDS_BUCKETS,
        ),
    ];
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in histograms {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .with_context(|| format!("invalid buckets for {name}"))?;
    }
    let (recorder, exporter) = builder
        .with_http_listener(address)
        .build()
        .with_context(|| format!("cannot serve metrics on {address}"))?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("a metrics recorder is installed already")?;
    tokio::spawn(async move {
        if let Err(error) = exporter.await {
            warn!(error = ?error, "metrics endpoint stopped");
        }
    });
    tally_aggregator::metrics::describe();
    tally_sink::metrics::describe();
    tally_producer::producer::describe_metrics();
    Ok((handle, address))
}

/// Produces the generated records, then the closing gateway tick on every partition.
pub(crate) fn generate(
    config: &GeneratorConfig,
    producer: &UsageProducer,
    options: &ProduceOptions,
    produced: &AtomicU64,
) -> anyhow::Result<GroundTruth> {
    let truth = tally_gen::produce_blocking(config.clone(), producer, options, |report| {
        produced.store(report.produced, Ordering::Relaxed);
    })?;
    let last_send_ms = truth.last_send_time_ms.unwrap_or(config.start_time_ms);
    let tick_time_ms = last_send_ms.saturating_add(END_TICK_AFTER_MS);
    let tick = UsageTick {
        tick_time_ms,
        origin: TickOrigin::Gateway,
    };
    let partitions = i32::try_from(config.partitions).context("partition count overflows")?;
    for partition in 0..partitions {
        // A tick's time is bounded by its Kafka timestamp like an event's: it is sent
        // when it says it is.
        producer.send_tick(partition, &tick, tick_time_ms)?;
    }
    producer.flush_blocking(options.flush_timeout)?;
    Ok(truth)
}

/// Figures read from `/metrics` for the progress display and the drain check.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    produced: u64,
    consumed: u64,
    lag: u64,
    open_windows: u64,
    rows_emitted: u64,
    rows_stored: u64,
    ticks_read: u64,
    ticks_written: u64,
}

impl Sample {
    fn read(text: &str, produced: u64) -> Sample {
        let value = |name: &str| metric_sum(text, name).max(0.0) as u64;
        Sample {
            produced,
            consumed: value(tally_aggregator::metrics::CONSUMED_RECORDS),
            lag: value(tally_aggregator::metrics::CONSUMER_LAG),
            open_windows: value(tally_aggregator::metrics::OPEN_WINDOWS),
            rows_emitted: value(tally_aggregator::metrics::EMITTED_ROWS),
            rows_stored: value(tally_sink::metrics::ROWS_WRITTEN),
            ticks_read: value(tally_aggregator::metrics::TICKS_READ),
            ticks_written: value(tally_aggregator::metrics::TICKS_WRITTEN),
        }
    }

    /// Committed ticks read that the aggregator did not write itself: at most the
    /// gateway ticks read (a tick the aggregator wrote counts as written before it is
    /// read back), so reaching the partition count means every closing tick was read.
    fn gateway_ticks_read(&self) -> u64 {
        self.ticks_read.saturating_sub(self.ticks_written)
    }
}

/// Σ over every series of `name` in a Prometheus text exposition.
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            line.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

/// Progress on stderr: a redrawn line on a terminal, plain lines otherwise.
struct Progress {
    total: u64,
    terminal: bool,
    last_plain: std::sync::Mutex<Option<Instant>>,
    /// Recent (time, consumed) samples: the aggregator's counters move once per
    /// commit, so the rate is taken over the last few seconds.
    recent: std::sync::Mutex<std::collections::VecDeque<(Instant, u64)>>,
}

/// Span of the events/s figure.
const RATE_SPAN: Duration = Duration::from_secs(3);

impl Progress {
    fn new(total: u64) -> Progress {
        Progress {
            total,
            terminal: std::io::stderr().is_terminal(),
            last_plain: std::sync::Mutex::new(None),
            recent: std::sync::Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// Events/s over the last [`RATE_SPAN`].
    fn rate(&self, consumed: u64) -> f64 {
        let Ok(mut recent) = self.recent.lock() else {
            return 0.0;
        };
        let now = Instant::now();
        recent.push_back((now, consumed));
        while recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_SPAN)
        {
            recent.pop_front();
        }
        match recent.front() {
            Some((at, before)) if now.duration_since(*at) > Duration::ZERO => {
                consumed.saturating_sub(*before) as f64 / now.duration_since(*at).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    fn show(&self, sample: &Sample, elapsed: Duration, last: bool) {
        let rate = self.rate(sample.consumed);
        let line = format!(
            "{:>5.1}s produced {}/{} · aggregated {} ({:.0} events/s) · lag {} · windows closed (rows) {} · stored {}",
            elapsed.as_secs_f64(),
            sample.produced,
            self.total,
            sample.consumed,
            rate,
            sample.lag,
            sample.rows_emitted,
            sample.rows_stored,
        );
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let width = 24_usize;
            let done = (sample.consumed.min(self.total) * width as u64)
                .checked_div(self.total)
                .map_or(width, |done| usize::try_from(done).unwrap_or(width));
            let bar = format!("[{}{}]", "#".repeat(done), ".".repeat(width - done));
            let _ = write!(stderr, "\r\x1b[K{bar} {line}");
            if last {
                let _ = writeln!(stderr);
            }
        } else if let Ok(mut previous) = self.last_plain.lock() {
            let due = previous.is_none_or(|at| at.elapsed() >= PLAIN_LINE_EVERY);
            if due || last {
                let _ = writeln!(stderr, "progress: {line}");
                *previous = Some(Instant::now());
            }
        }
    }
}

/// Whole UTC days around every window the run counted events in (corrections reach
/// up to the correction horizon before the first record's send time).
fn report_range(truth: &GroundTruth) -> (String, String) {
    const DAY_MS: i64 = 86_400_000;
    let first = truth
        .windows
        .iter()
        .map(|window| window.window_start_ms)
        .min()
        .unwrap_or(DEFAULT_START_TIME_MS);
    let last = truth
        .windows
        .iter()
        .map(|window| window.window_end_ms)
        .max()
        .unwrap_or(first);
    (
        format_utc_ms(first.div_euclid(DAY_MS) * DAY_MS),
        format_utc_ms((last.saturating_sub(1).div_euclid(DAY_MS) + 1) * DAY_MS),
    )
}

/// Reads the report's figures back from the store and writes the sample files.
async fn read_store(
    location: StoreLocation,
    from: &str,
    to: &str,
    dir: &Path,
) -> anyhow::Result<(Vec<UsageLine>, Vec<ShareLine>, PathBuf, PathBuf)> {
    let request = |period: Period, by: Vec<Dimension>| -> anyhow::Result<ReportRequest> {
        Ok(ReportRequest::from_args(&ReportArgs {
            store: StoreArgs::new(""),
            from: from.to_owned(),
            to: to.to_owned(),
            tz: "UTC".to_owned(),
            period,
            by,
            format: Format::Table,
        })?)
    };
    let usage = request(
        Period::Month,
        vec![Dimension::Cloud, Dimension::ChannelPartner],
    )?;
    let shares = request(Period::Month, vec![Dimension::Beneficiary])?;
    let daily = request(
        Period::Day,
        vec![Dimension::Cloud, Dimension::ChannelPartner],
    )?;
    let statement = request(
        Period::Month,
        vec![Dimension::Beneficiary, Dimension::Cloud],
    )?;
    let report_file = dir.join("report-daily-by-cloud-partner.txt");
    let shares_file = dir.join("partner-share-statement.csv");
    let (usage, shares, daily_text, statement_text) = tokio::task::spawn_blocking({
        let location = location.clone();
        move || -> Result<_, tally_sink::SinkError> {
            let usage = report::build(&location, &usage)?;
            let shares = report::build(&location, &shares)?;
            let daily = report::render(&report::build(&location, &daily)?, Format::Table)?;
            let statement = report::render(&report::build(&location, &statement)?, Format::Csv)?;
            Ok((usage, shares, daily, statement))
        }
    })
    .await
    .context("report thread failed")??;
    std::fs::write(&report_file, daily_text)
        .with_context(|| format!("cannot write {}", report_file.display()))?;
    std::fs::write(&shares_file, statement_text)
        .with_context(|| format!("cannot write {}", shares_file.display()))?;

    let mut by_key: BTreeMap<(String, String, String), UsageLine> = BTreeMap::new();
    for line in &usage.lines {
        let cloud = line.dims.first().cloned().unwrap_or_default();
        let partner = line.dims.get(1).cloned().unwrap_or_default();
        let entry = by_key
            .entry((cloud.clone(), partner.clone(), line.currency.clone()))
            .or_insert_with(|| UsageLine {
                cloud,
                channel_partner: partner,
                currency: line.currency.clone(),
                ..UsageLine::default()
            });
        let sums = line.sums;
        entry.rows += sums.rows;
        entry.events += sums.event_count;
        entry.input_tokens += sums.input_tokens;
        entry.cached_input_tokens += sums.cached_input_tokens;
        entry.output_tokens += sums.output_tokens;
        entry.reasoning_tokens += sums.reasoning_tokens;
        entry.gross_micros += sums.gross_micros;
        entry.net_micros += sums.net_micros;
    }
    let usage_lines: Vec<UsageLine> = by_key.into_values().collect();
    let gross: i64 = usage_lines.iter().map(|line| line.gross_micros).sum();
    let mut by_beneficiary: BTreeMap<(String, String), i64> = BTreeMap::new();
    for line in &shares.lines {
        let beneficiary = line.dims.first().cloned().unwrap_or_default();
        *by_beneficiary
            .entry((beneficiary, line.currency.clone()))
            .or_default() += line.share_micros;
    }
    let share_lines = by_beneficiary
        .into_iter()
        .map(|((beneficiary, currency), share_micros)| ShareLine {
            beneficiary,
            currency,
            share_micros,
            basis_points_of_gross: if gross > 0 {
                i64::try_from(i128::from(share_micros) * 10_000 / i128::from(gross)).unwrap_or(0)
            } else {
                0
            },
        })
        .collect();
    Ok((usage_lines, share_lines, report_file, shares_file))
}

fn add_usage(total: &mut UsageLine, line: &UsageLine) {
    total.rows += line.rows;
    total.events += line.events;
    total.input_tokens += line.input_tokens;
    total.cached_input_tokens += line.cached_input_tokens;
    total.output_tokens += line.output_tokens;
    total.reasoning_tokens += line.reasoning_tokens;
    total.gross_micros += line.gross_micros;
    total.net_micros += line.net_micros;
    if total.currency.is_empty() {
        total.currency.clone_from(&line.currency);
    }
}

/// `1234567` → `1,234,567`.
fn grouped(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    if value < 0 { format!("-{out}") } else { out }
}

/// Micro-units as currency units with two decimals, rounded half away from zero for
/// display only (the JSON keeps exact micro-units).
fn money(micros: i64) -> String {
    let cents = (i128::from(micros).abs() + 5_000) / 10_000;
    let sign = if micros < 0 && cents > 0 { "-" } else { "" };
    let whole = i64::try_from(cents / 100).unwrap_or(i64::MAX);
    format!("{sign}{}.{:02}", grouped(whole), cents % 100)
}

/// The human-readable report.
fn render(result: &DemoResult) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let currency = &result.total.currency;
    let _ = writeln!(
        out,
        "\ntally demo: {} records (seed {}, {} partitions, {} tenants) through generator → aggregator (exactly-once) → sink (SQLite), broker {}",
        grouped(result.generator.produced as i64),
        result.generator.seed,
        result.generator.partitions,
        result.generator.tenants,
        result.broker
    );
    let _ = writeln!(
        out,
        "\nusage and revenue by cloud and channel partner ({currency})"
    );
    let _ = writeln!(
        out,
        "  {:<8} {:<10} {:>9} {:>15} {:>13} {:>13} {:>13} {:>15} {:>15}",
        "cloud",
        "partner",
        "events",
        "input tokens",
        "cached input",
        "output",
        "reasoning",
        "gross",
        "net"
    );
    let row = |out: &mut String, line: &UsageLine, cloud: &str, partner: &str| {
        let _ = writeln!(
            out,
            "  {:<8} {:<10} {:>9} {:>15} {:>13} {:>13} {:>13} {:>15} {:>15}",
            cloud,
            partner,
            grouped(line.events),
            grouped(line.input_tokens),
            grouped(line.cached_input_tokens),
            grouped(line.output_tokens),
            grouped(line.reasoning_tokens),
            money(line.gross_micros),
            money(line.net_micros)
        );
    };
    for line in &result.by_cloud_partner {
        let partner = if line.channel_partner.is_empty() {
            "-"
        } else {
            &line.channel_partner
        };
        row(&mut out, line, &line.cloud, partner);
    }
    row(&mut out, &result.total, "total", "");
    let _ = writeln!(out, "\nrevenue shares by partner (share of total gross)");
    for share in &result.shares {
        let _ = writeln!(
            out,
            "  {:<12} {:>15} {}  {:>3}.{:02} %",
            share.beneficiary,
            money(share.share_micros),
            share.currency,
            share.basis_points_of_gross / 100,
            share.basis_points_of_gross % 100
        );
    }
    let c = &result.conservation;
    let _ = writeln!(
        out,
        "\nconservation: in {} = counted {} (of which {} corrections) + duplicates {} + too late {} + rejected {}  [{}]",
        grouped(c.consumed as i64),
        grouped(c.counted as i64),
        grouped(c.corrections as i64),
        grouped(c.duplicates as i64),
        grouped(c.too_late as i64),
        grouped(c.rejected as i64),
        if c.conserved { "ok" } else { "MISMATCH" }
    );
    let _ = writeln!(
        out,
        "rows: {} committed by the aggregator, {} stored by the sink",
        grouped(result.rows_emitted as i64),
        grouped(result.rows_stored as i64)
    );
    let _ = writeln!(
        out,
        "throughput: {:.0} events/s over {:.1} s (paced by the generator; `tally bench` measures capacity); whole run {:.1} s",
        result.events_per_second, result.pipeline_seconds, result.wall_seconds
    );
    let _ = writeln!(
        out,
        "\nSQLite store:            {}",
        result.sqlite.display()
    );
    let _ = writeln!(
        out,
        "daily report:            {}",
        result.report_file.display()
    );
    let _ = writeln!(
        out,
        "partner share statement: {}",
        result.shares_file.display()
    );
    let _ = writeln!(
        out,
        "more reports:            tally report --database sqlite:{} --from {} --to {} --by tenant,cloud",
        result.sqlite.display(),
        result.report_from,
        result.report_to
    );
    let _ = writeln!(out, "\n{}.", what_it_shows(&result.broker));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_series_of_a_metric_and_nothing_else() {
        let text = "# HELP tally_aggregator_consumer_lag_records lag\n\
                    tally_aggregator_consumer_lag_records{partition=\"0\"} 3\n\
                    tally_aggregator_consumer_lag_records{partition=\"1\"} 4\n\
                    tally_aggregator_consumer_lag_records_other 100\n\
                    tally_aggregator_open_windows 7\n";
        assert_eq!(
            metric_sum(text, "tally_aggregator_consumer_lag_records"),
            7.0
        );
        assert_eq!(metric_sum(text, "tally_aggregator_open_windows"), 7.0);
        assert_eq!(metric_sum(text, "tally_missing"), 0.0);
    }

    #[test]
    fn formats_groups_and_money() {
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(-1_000), "-1,000");
        assert_eq!(grouped(12), "12");
        assert_eq!(money(1_234_565_000), "1,234.57");
        assert_eq!(money(4_999), "0.00");
        assert_eq!(money(-15_000), "-0.02");
    }

    #[test]
    fn the_embedded_contracts_load() {
        let window = WindowSize::new(60_000).expect("a valid window");
        assert!(Contracts::load(DEFAULT_CONTRACTS, window).is_ok());
    }
}
