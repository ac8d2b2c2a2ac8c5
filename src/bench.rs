//! `tally bench`: the end-to-end benchmark harness against a real broker.
//!
//! 1. **Preload.** Creates fresh topics (per-run names) and produces `--events`
//!    generated records (every class) as fast as the producer takes them, then one
//!    gateway tick per partition a day later so every window closes.
//! 2. **Ceiling.** A plain rdkafka consumer in this process reads the whole input topic
//!    and only counts records: the rate no consumer of this topic on this machine beats.
//! 3. **Pipeline.** `tally aggregate` (exactly-once, `--start-from earliest`) and
//!    `tally sink` (into SQLite unless `--database` says) run as child processes of
//!    the same binary, started together. The aggregator is done when its committed
//!    `tally_aggregator_consumed_records_total` (scraped from its `/metrics`) reaches
//!    the preloaded count; the sink when its `tally_sink_rows_written_total` reaches
//!    the rows committed to billing.aggregates (counted read_committed once the
//!    aggregator exited). For each: wall seconds from the start, CPU seconds
//!    (utime + stime of `/proc/<pid>/stat`, every thread, librdkafka's included), events
//!    per second, events per second per CPU core (events / CPU seconds) and peak RSS
//!    (`VmHWM`).
//! 4. **Latency** (`--latency-seconds`, 0 skips it). On fresh topics, with a 10 s
//!    window, 2 s out-of-orderness and 5 s allowed lateness, new aggregator and sink
//!    children run while the generator sends `--latency-rate` records per second with
//!    current timestamps (`--start-time` now, simulated rate = real rate). For every
//!    on-time row (correction sequence 0) the bench records when a read_committed
//!    consumer of billing.aggregates saw it (event→row) and when it appeared in the
//!    SQLite store (event→store, polled every 100 ms), as time beyond the row's window
//!    end + allowed lateness: the part of the latency the pipeline adds to what the
//!    event-time semantics require. Traffic starts once the aggregator owns its
//!    partitions; rows that arrive after the traffic ended (closed by idle ticks) are
//!    left out. Preloaded data cannot measure this: its event times are in the past.
//!
//! Prints a table and, with `--json FILE`, writes the figures as JSON.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde::Serialize;
use tally_core::config::Config;
use tally_gen::generator::DEFAULT_START_TIME_MS;
use tally_gen::{GeneratorConfig, ProduceOptions};
use tally_producer::{ProducerOptions, UsageProducer};

use crate::demo::metric_sum;

/// How often the children are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The aggregator child exits after this much quiet once everything is committed.
const AGGREGATOR_IDLE_EXIT_MS: u64 = 2_000;
/// Event-time settings of the latency phase.
const LATENCY_WINDOW_MS: i64 = 10_000;
const LATENCY_OOO_MS: i64 = 2_000;
const LATENCY_LATENESS_MS: i64 = 5_000;
const LATENCY_HORIZON_MS: i64 = 40_000;

/// Flags of `tally bench`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    /// Bootstrap servers of the broker. Default: `TALLY_TEST_BOOTSTRAP` (the local
    /// broker of `deploy/local/kafka.sh`), else `kafka.bootstrap_servers`.
    #[arg(long, env = "TALLY_TEST_BOOTSTRAP")]
    pub(crate) broker: Option<String>,
    /// Events to preload and drain.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) events: u64,
    /// Partitions of the input (and output) topics.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub(crate) partitions: u32,
    /// Replication factor of the topics.
    #[arg(long, default_value_t = 1)]
    pub(crate) replication_factor: i32,
    /// Seconds of paced traffic for the latency phase (0 skips it).
    #[arg(long, default_value_t = 30)]
    pub(crate) latency_seconds: u64,
    /// Records per second of the latency phase.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) latency_rate: u64,
    /// The sink's store (as `tally sink --database`). Default: a SQLite file in `--dir`.
    #[arg(long)]
    pub(crate) database: Option<String>,
    /// Directory for the children's config, logs and SQLite stores. Default: a new
    /// directory under the system temp dir.
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Give up (and stop the children) after this many seconds per phase.
    #[arg(long, default_value_t = 900)]
    pub(crate) timeout_secs: u64,
    /// Keep the bench's topics on the broker (by default they are deleted at the end).
    #[arg(long)]
    pub(crate) keep_topics: bool,
}

/// The benchmark's result (`--json`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BenchResult {
    pub(crate) broker: String,
    pub(crate) events: u64,
    pub(crate) partitions: u32,
    /// CPU cores of the machine (`available_parallelism`).
    pub(crate) machine_cores: usize,
    pub(crate) preload: Stage,
    pub(crate) ceiling: Stage,
    pub(crate) aggregator: Stage,
    pub(crate) sink: Stage,
    /// Rows the aggregator committed (and the sink stored).
    pub(crate) rows: u64,
    pub(crate) latency: Option<Latency>,
}

/// One measured stage.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Stage {
    /// Wall seconds.
    pub(crate) seconds: f64,
    /// Events (input records) per wall second.
    pub(crate) events_per_second: f64,
    /// CPU seconds (user + system) of the process doing the stage.
    pub(crate) cpu_seconds: f64,
    /// Events per CPU second: events/s per core.
    pub(crate) events_per_core_second: f64,
    /// Peak resident set (VmHWM), bytes; 0 when not measured.
    pub(crate) peak_rss_bytes: u64,
    /// For the aggregator: wall seconds from its first commit (which excludes process
    /// start, group join and transaction setup) to the last event committed.
    pub(crate) seconds_after_first_commit: Option<f64>,
}

impl Stage {
    fn new(events: u64, seconds: f64, cpu_seconds: f64, peak_rss_bytes: u64) -> Stage {
        let per = |divisor: f64| {
            if divisor > 0.0 {
                events as f64 / divisor
            } else {
                0.0
            }
        };
        Stage {
            seconds,
            events_per_second: per(seconds),
            cpu_seconds,
            events_per_core_second: per(cpu_seconds),
            peak_rss_bytes,
            seconds_after_first_commit: None,
        }
    }
}

/// The paced phase's latencies, ms beyond window end + allowed lateness.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latency {
    pub(crate) events: u64,
    pub(crate) rate_per_second: u64,
    pub(crate) window_ms: i64,
    pub(crate) allowed_lateness_ms: i64,
    pub(crate) event_to_row: Percentiles,
    pub(crate) event_to_store: Percentiles,
}

/// p50 / p99 / max of a set of samples, ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) samples: usize,
    pub(crate) p50_ms: i64,
    pub(crate) p99_ms: i64,
    pub(crate) max_ms: i64,
}

impl Percentiles {
    fn of(mut samples: Vec<i64>) -> Percentiles {
        samples.sort_unstable();
        let at = |percent: usize| -> i64 {
            if samples.is_empty() {
                return 0;
            }
            samples[(samples.len() - 1) * percent / 100]
        };
        Percentiles {
            samples: samples.len(),
            p50_ms: at(50),
            p99_ms: at(99),
            max_ms: samples.last().copied().unwrap_or(0),
        }
    }
}

/// Runs the benchmark.
pub(crate) async fn run(base: Config, args: &BenchArgs) -> anyhow::Result<()> {
    let broker = args
        .broker
        .clone()
        .unwrap_or_else(|| base.kafka.bootstrap_servers.clone());
    let run_id = crate::demo::run_suffix();
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("tally-bench-{run_id}")),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    let contracts_path = dir.join("contracts.toml");
    std::fs::write(&contracts_path, crate::demo::DEFAULT_CONTRACTS)
        .with_context(|| format!("cannot write {}", contracts_path.display()))?;
    let timeout = Duration::from_secs(args.timeout_secs);

    // 1. Preload.
    let config = bench_config(
        base.clone(),
        args,
        &broker,
        &format!("tally-bench-{run_id}"),
        &contracts_path,
    )?;
    crate::topics::create_all(&config).await?;
    let mut created = vec![config.clone()];
    eprintln!(
        "tally bench: preloading {} events into {} ({} partitions)",
        args.events, config.topics.usage_events, args.partitions
    );
    let generator_config = GeneratorConfig {
        seed: 42,
        count: args.events,
        start_time_ms: DEFAULT_START_TIME_MS,
        partitions: args.partitions,
        ..GeneratorConfig::for_aggregator(&config.aggregator)
    };
    let preload = {
        let producer = UsageProducer::new(
            &crate::kafka::client_config(&config.kafka),
            ProducerOptions::new(config.topics.usage_events.clone()),
        )
        .context("cannot create the producer")?;
        let cpu_before = cpu_seconds("self").unwrap_or(0.0);
        let started = Instant::now();
        let generator_config = generator_config.clone();
        tokio::task::spawn_blocking(move || {
            crate::demo::generate(
                &generator_config,
                &producer,
                &ProduceOptions::default(),
                &AtomicU64::new(0),
            )
        })
        .await
        .context("generator thread failed")??;
        Stage::new(
            args.events,
            started.elapsed().as_secs_f64(),
            cpu_seconds("self").unwrap_or(0.0) - cpu_before,
            0,
        )
    };

    // 2. Ceiling: a plain consumer that only counts.
    eprintln!("tally bench: ceiling (a plain consumer counting records)");
    let ceiling = {
        let client = crate::kafka::client_config(&config.kafka);
        let topic = config.topics.usage_events.clone();
        let partitions = args.partitions;
        let cpu_before = cpu_seconds("self").unwrap_or(0.0);
        let (records, seconds) = tokio::task::spawn_blocking(move || {
            count_records(
                &client,
                &topic,
                partitions,
                &run_id_group("ceiling"),
                timeout,
            )
        })
        .await
        .context("ceiling thread failed")??;
        Stage::new(
            records,
            seconds,
            cpu_seconds("self").unwrap_or(0.0) - cpu_before,
            0,
        )
    };

    // 3. The aggregator and the sink as child processes.
    eprintln!("tally bench: tally aggregate and tally sink (child processes)");
    let database = args
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite:{}", dir.join("bench-billing.db").display()));
    let pipeline = Pipeline::start(&config, &dir, "drain", &database, &run_id, true)?;
    let (aggregator, sink, rows) = tokio::task::spawn_blocking({
        let config = config.clone();
        let events = args.events;
        let partitions = args.partitions;
        move || drain(pipeline, &config, events, partitions, timeout)
    })
    .await
    .context("pipeline thread failed")??;

    // 4. Latency with current timestamps.
    let latency = if args.latency_seconds > 0 {
        eprintln!(
            "tally bench: latency, {} events/s for {} s with current timestamps",
            args.latency_rate, args.latency_seconds
        );
        let mut config = bench_config(
            base,
            args,
            &broker,
            &format!("tally-bench-{run_id}-latency"),
            &contracts_path,
        )?;
        config.aggregator.window_ms = LATENCY_WINDOW_MS;
        config.aggregator.max_out_of_orderness_ms = LATENCY_OOO_MS;
        config.aggregator.allowed_lateness_ms = LATENCY_LATENESS_MS;
        config.aggregator.correction_horizon_ms = LATENCY_HORIZON_MS;
        config.aggregator.dedupe_horizon_ms = LATENCY_LATENESS_MS + LATENCY_HORIZON_MS;
        config
            .validate()
            .context("the latency phase's configuration is invalid")?;
        crate::topics::create_all(&config).await?;
        created.push(config.clone());
        let sqlite = dir.join("latency-billing.db");
        let database = format!("sqlite:{}", sqlite.display());
        let pipeline = Pipeline::start(&config, &dir, "latency", &database, &run_id, false)?;
        let args = args.clone();
        Some(
            tokio::task::spawn_blocking(move || {
                measure_latency(pipeline, &config, &args, &sqlite, timeout)
            })
            .await
            .context("latency thread failed")??,
        )
    } else {
        None
    };

    let result = BenchResult {
        broker,
        events: args.events,
        partitions: args.partitions,
        machine_cores: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        preload,
        ceiling,
        aggregator,
        sink,
        rows,
        latency,
    };
    if !args.keep_topics {
        for config in &created {
            delete_topics(config).await?;
        }
    }
    print!("{}", render(&result));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&result)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn run_id_group(stage: &str) -> String {
    format!("tally-bench-{stage}-{}", crate::demo::run_suffix())
}

/// The loaded config with the bench's broker, topic names, group and contracts file.
fn bench_config(
    mut config: Config,
    args: &BenchArgs,
    broker: &str,
    prefix: &str,
    contracts: &Path,
) -> anyhow::Result<Config> {
    config.kafka.bootstrap_servers = broker.to_owned();
    config.topics.usage_events = format!("{prefix}.usage.events");
    config.topics.billing_aggregates = format!("{prefix}.billing.aggregates");
    config.topics.late = format!("{prefix}.usage.late");
    config.topics.dlq = format!("{prefix}.usage.dlq");
    config.topics.checkpoints = format!("{prefix}.tally.checkpoints");
    let partitions = i32::try_from(args.partitions).context("--partitions is too large")?;
    config.topics.partitions = partitions;
    config.topics.output_partitions = partitions;
    config.topics.replication_factor = args.replication_factor;
    config.aggregator.group_id = format!("{prefix}-aggregator");
    config.aggregator.contracts_path = contracts.display().to_string();
    config.metrics.listen = String::new();
    config
        .validate()
        .context("the bench's configuration is invalid")?;
    Ok(config)
}

/// Deletes the pipeline topics of `config` (the bench's own, per-run names).
async fn delete_topics(config: &Config) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = crate::kafka::client_config(&config.kafka)
        .create()
        .context("cannot create the kafka admin client")?;
    let names: Vec<String> = crate::topics::specs(config)
        .into_iter()
        .map(|spec| spec.name)
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin
        .delete_topics(&names, &options)
        .await
        .context("delete topics request failed")?
    {
        if let Err((topic, code)) = result {
            tracing::warn!(topic, error = %code, "cannot delete a bench topic");
        }
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> anyhow::Result<SocketAddr> {
    let probe = TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
    Ok(probe.local_addr()?)
}

/// A child process of this binary with its metrics address.
struct Process {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
    peak_rss_bytes: u64,
}

impl Process {
    fn spawn(
        name: &'static str,
        config: &Config,
        dir: &Path,
        phase: &str,
        args: &[String],
    ) -> anyhow::Result<Process> {
        let metrics = free_port()?;
        let mut config = config.clone();
        config.metrics.listen = metrics.to_string();
        let config_path = dir.join(format!("{phase}-{name}.toml"));
        std::fs::write(&config_path, toml::to_string(&config)?)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log = dir.join(format!("{phase}-{name}.log"));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let exe = std::env::current_exe().context("cannot find this binary")?;
        let child = Command::new(exe)
            .arg("--config")
            .arg(&config_path)
            .args(["--log-format", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start tally {name}"))?;
        Ok(Process {
            child,
            metrics,
            log,
            peak_rss_bytes: 0,
        })
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// CPU seconds so far, and the peak RSS seen (kept after the process exits).
    fn sample(&mut self) -> Option<f64> {
        let pid = self.pid();
        if let Some(rss) = peak_rss_bytes(&pid) {
            self.peak_rss_bytes = self.peak_rss_bytes.max(rss);
        }
        cpu_seconds(&pid)
    }

    fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    fn scrape(&self, name: &str) -> Option<f64> {
        scrape(self.metrics).map(|text| metric_sum(&text, name))
    }

    /// Asks the process to finish (SIGTERM) and waits for it.
    fn terminate(&mut self, timeout: Duration) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The aggregator and sink children of one phase.
struct Pipeline {
    aggregator: Process,
    sink: Process,
    started: Instant,
}

impl Pipeline {
    fn start(
        config: &Config,
        dir: &Path,
        phase: &str,
        database: &str,
        run_id: &str,
        exit_when_idle: bool,
    ) -> anyhow::Result<Pipeline> {
        let started = Instant::now();
        let mut aggregate = vec![
            "aggregate".to_owned(),
            "--instance-id".to_owned(),
            format!("bench-{phase}-{run_id}"),
            "--start-from".to_owned(),
            "earliest".to_owned(),
        ];
        if exit_when_idle {
            aggregate.push("--exit-after-idle-ms".to_owned());
            aggregate.push(AGGREGATOR_IDLE_EXIT_MS.to_string());
        }
        let aggregator = Process::spawn("aggregate", config, dir, phase, &aggregate)?;
        let sink = Process::spawn(
            "sink",
            config,
            dir,
            phase,
            &[
                "sink".to_owned(),
                "--database".to_owned(),
                database.to_owned(),
                "--group-id".to_owned(),
                format!("tally-bench-sink-{phase}-{run_id}"),
            ],
        )?;
        Ok(Pipeline {
            aggregator,
            sink,
            started,
        })
    }
}

/// Phase 3: waits until the aggregator committed every event and the sink stored
/// every row; returns both stages and the row count.
fn drain(
    mut pipeline: Pipeline,
    config: &Config,
    events: u64,
    partitions: u32,
    timeout: Duration,
) -> anyhow::Result<(Stage, Stage, u64)> {
    let deadline = pipeline.started + timeout;
    let mut aggregator_stage: Option<Stage> = None;
    let mut first_commit: Option<Instant> = None;
    let mut rows: Option<u64> = None;
    loop {
        std::thread::sleep(SAMPLE_EVERY);
        if Instant::now() > deadline {
            bail!(
                "the pipeline did not finish within {}s; aggregator log:\n{}\nsink log:\n{}",
                timeout.as_secs(),
                pipeline.aggregator.log_tail(),
                pipeline.sink.log_tail()
            );
        }
        let aggregator_cpu = pipeline.aggregator.sample();
        let sink_cpu = pipeline.sink.sample();
        if let Some(status) = pipeline.sink.exited()? {
            bail!(
                "tally sink exited early ({status}):\n{}",
                pipeline.sink.log_tail()
            );
        }
        if aggregator_stage.is_none() {
            let consumed = pipeline
                .aggregator
                .scrape(tally_aggregator::metrics::CONSUMED_RECORDS);
            if first_commit.is_none() && consumed.is_some_and(|consumed| consumed > 0.0) {
                first_commit = Some(Instant::now());
            }
            if consumed.is_some_and(|consumed| consumed >= events as f64) {
                let mut stage = Stage::new(
                    events,
                    pipeline.started.elapsed().as_secs_f64(),
                    aggregator_cpu.unwrap_or(0.0),
                    pipeline.aggregator.peak_rss_bytes,
                );
                stage.seconds_after_first_commit =
                    first_commit.map(|first| first.elapsed().as_secs_f64());
                aggregator_stage = Some(stage);
            } else if let Some(status) = pipeline.aggregator.exited()? {
                bail!(
                    "tally aggregate exited ({status}) before committing every event:\n{}",
                    pipeline.aggregator.log_tail()
                );
            }
            continue;
        }
        if rows.is_none() {
            if let Some(status) = pipeline.aggregator.exited()? {
                if !status.success() {
                    bail!(
                        "tally aggregate failed ({status}):\n{}",
                        pipeline.aggregator.log_tail()
                    );
                }
                let client = crate::kafka::client_config(&config.kafka);
                rows = Some(count_committed(
                    &client,
                    &config.topics.billing_aggregates,
                    partitions,
                    Duration::from_secs(60),
                )?);
            }
            continue;
        }
        let expected = rows.unwrap_or(0);
        let written = pipeline
            .sink
            .scrape(tally_sink::metrics::ROWS_WRITTEN)
            .unwrap_or(0.0);
        if written >= expected as f64 {
            let sink_stage = Stage::new(
                events,
                pipeline.started.elapsed().as_secs_f64(),
                sink_cpu.unwrap_or(0.0),
                pipeline.sink.peak_rss_bytes,
            );
            pipeline.sink.terminate(Duration::from_secs(30));
            let aggregator_stage = aggregator_stage.unwrap_or_default();
            return Ok((aggregator_stage, sink_stage, expected));
        }
    }
}

/// Phase 4: paced traffic with current timestamps; latencies of on-time rows.
fn measure_latency(
    mut pipeline: Pipeline,
    config: &Config,
    args: &BenchArgs,
    sqlite: &Path,
    timeout: Duration,
) -> anyhow::Result<Latency> {
    // Traffic starts once the aggregator owns its partitions (its per-partition lag
    // gauges exist) and the sink serves its metrics, so no row waits for a group join.
    let ready_by = Instant::now() + Duration::from_secs(60);
    loop {
        let aggregator_ready = scrape(pipeline.aggregator.metrics).is_some_and(|text| {
            text.contains(&format!("{}{{", tally_aggregator::metrics::CONSUMER_LAG))
        });
        if aggregator_ready && scrape(pipeline.sink.metrics).is_some() {
            break;
        }
        if Instant::now() > ready_by {
            bail!(
                "the latency phase's aggregator did not get its partitions within 60 s:\n{}",
                pipeline.aggregator.log_tail()
            );
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let lateness = config.aggregator.allowed_lateness_ms;
    let start_ms = now_ms();
    // The first window started before the traffic; its rows count too.
    let measured_from_ms = start_ms.div_euclid(LATENCY_WINDOW_MS) * LATENCY_WINDOW_MS;

    let row_reader = {
        let stop = Arc::clone(&stop);
        let mut client = crate::kafka::client_config(&config.kafka);
        client
            .set("group.id", run_id_group("latency-reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed");
        let topic = config.topics.billing_aggregates.clone();
        let partitions = args.partitions;
        std::thread::spawn(move || -> anyhow::Result<Vec<i64>> {
            let consumer: BaseConsumer = client.create()?;
            consumer.assign(&assignment(&topic, partitions)?)?;
            let mut samples = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let seen_ms = now_ms();
                let message = message?;
                let Ok(row) =
                    tally_core::codec::decode_aggregate(message.payload().unwrap_or_default())
                else {
                    continue;
                };
                if row.correction_seq == 0 && row.window_start_ms >= measured_from_ms {
                    samples.push(seen_ms - (row.window_end_ms + lateness));
                }
            }
            Ok(samples)
        })
    };
    let store_reader = {
        let stop = Arc::clone(&stop);
        let sqlite = sqlite.to_owned();
        std::thread::spawn(move || -> anyhow::Result<Vec<i64>> {
            let mut samples = Vec::new();
            let mut last_rowid: i64 = 0;
            let mut connection: Option<rusqlite::Connection> = None;
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
                if connection.is_none() && sqlite.exists() {
                    let opened = rusqlite::Connection::open_with_flags(
                        &sqlite,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                    )?;
                    opened.busy_timeout(Duration::from_secs(5))?;
                    connection = Some(opened);
                }
                let Some(connection) = &connection else {
                    continue;
                };
                let seen_ms = now_ms();
                let Ok(mut statement) = connection.prepare_cached(
                    "SELECT rowid, window_start_ms, window_end_ms FROM tally_rows \
                     WHERE rowid > ?1 AND correction_seq = 0 ORDER BY rowid",
                ) else {
                    // The sink has not created its tables yet.
                    continue;
                };
                let rows = statement
                    .query_map([last_rowid], |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            row.get::<_, i64>(1)?,
                            row.get::<_, i64>(2)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                for (rowid, window_start_ms, window_end_ms) in rows {
                    last_rowid = last_rowid.max(rowid);
                    if window_start_ms >= measured_from_ms {
                        samples.push(seen_ms - (window_end_ms + lateness));
                    }
                }
            }
            Ok(samples)
        })
    };

    let count = args.latency_rate.saturating_mul(args.latency_seconds);
    let generator_config = GeneratorConfig {
        seed: 7,
        count,
        start_time_ms: start_ms,
        rate_per_sec: args.latency_rate,
        partitions: args.partitions,
        tenants: 50,
        ..GeneratorConfig::for_aggregator(&config.aggregator)
    };
    let producer = UsageProducer::new(
        &crate::kafka::client_config(&config.kafka),
        ProducerOptions::new(config.topics.usage_events.clone()),
    )
    .context("cannot create the producer")?;
    let options = ProduceOptions {
        real_rate_per_sec: std::num::NonZeroU64::new(args.latency_rate),
        ..ProduceOptions::default()
    };
    let produced = tally_gen::produce_blocking(generator_config, &producer, &options, |_| {});
    // Rows that arrive after the traffic ended were closed by idle ticks: not counted.
    stop.store(true, Ordering::Release);
    let row_samples = row_reader
        .join()
        .map_err(|_| anyhow::anyhow!("the row reader panicked"))??;
    let store_samples = store_reader
        .join()
        .map_err(|_| anyhow::anyhow!("the store reader panicked"))??;
    pipeline
        .aggregator
        .terminate(timeout.min(Duration::from_secs(60)));
    pipeline.sink.terminate(Duration::from_secs(30));
    let truth = produced.context("producing the paced traffic failed")?;
    if row_samples.is_empty() {
        bail!(
            "no on-time row was committed while the traffic ran ({} records in {} s): \
             raise --latency-seconds; aggregator log:\n{}",
            truth.produced,
            args.latency_seconds,
            pipeline.aggregator.log_tail()
        );
    }
    Ok(Latency {
        events: truth.produced,
        rate_per_second: args.latency_rate,
        window_ms: config.aggregator.window_ms,
        allowed_lateness_ms: lateness,
        event_to_row: Percentiles::of(row_samples),
        event_to_store: Percentiles::of(store_samples),
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

fn assignment(topic: &str, partitions: u32) -> anyhow::Result<TopicPartitionList> {
    let mut list = TopicPartitionList::new();
    for partition in 0..i32::try_from(partitions)? {
        list.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    Ok(list)
}

/// Reads `topic` from the beginning to the high watermarks fixed at the start,
/// counting records; returns the count and the wall seconds of the read.
fn count_records(
    client: &ClientConfig,
    topic: &str,
    partitions: u32,
    group: &str,
    timeout: Duration,
) -> anyhow::Result<(u64, f64)> {
    let mut client = client.clone();
    client
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.queue.backoff.ms", "10");
    let consumer: BaseConsumer = client.create()?;
    let mut ends = Vec::new();
    for partition in 0..i32::try_from(partitions)? {
        let (_, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(30))?;
        ends.push(high);
    }
    consumer.assign(&assignment(topic, partitions)?)?;
    let started = Instant::now();
    let mut records = 0_u64;
    let mut reached = vec![false; ends.len()];
    for (index, end) in ends.iter().enumerate() {
        reached[index] = *end <= 0;
    }
    while !reached.iter().all(|done| *done) {
        if started.elapsed() > timeout {
            bail!("the counting consumer did not reach the end of {topic}");
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        records += 1;
        let index = usize::try_from(message.partition())?;
        if message.offset() + 1 >= ends[index] {
            reached[index] = true;
        }
    }
    Ok((records, started.elapsed().as_secs_f64()))
}

/// Counts the committed records of `topic` (read_committed, beginning to end).
fn count_committed(
    client: &ClientConfig,
    topic: &str,
    partitions: u32,
    timeout: Duration,
) -> anyhow::Result<u64> {
    let mut client = client.clone();
    client
        .set("group.id", run_id_group("rows"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer<QuietEof> = client.create_with_context(QuietEof)?;
    consumer.assign(&assignment(topic, partitions)?)?;
    let started = Instant::now();
    let mut records = 0_u64;
    let mut at_end = std::collections::BTreeSet::new();
    while at_end.len() < partitions as usize {
        if started.elapsed() > timeout {
            bail!("reading {topic} did not reach its end");
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(_)) => records += 1,
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
            }
            Some(Err(error)) => return Err(error.into()),
        }
    }
    Ok(records)
}

/// A consumer context that leaves partition ends to `poll`: librdkafka also reports
/// each one as a client error, which the default context would log as an ERROR.
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            return;
        }
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for QuietEof {}

/// User + system CPU seconds of `pid` (`self` for this process).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3;
    // utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse::<f64>().ok())
            .unwrap_or(100.0)
    })
}

/// Peak resident set (`VmHWM`) of `pid`, bytes.
fn peak_rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// GET /metrics with a plain HTTP/1.0 request.
fn scrape(address: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some(body.to_owned())
}

/// The human-readable table.
fn render(result: &BenchResult) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ntally bench: {} events, {} partitions, broker {}, {} CPU cores on this machine\n",
        result.events, result.partitions, result.broker, result.machine_cores
    );
    let _ = writeln!(
        out,
        "| stage | events | seconds | events/s | CPU s | events/s per core | peak RSS |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let rss = |bytes: u64| {
        if bytes == 0 {
            "-".to_owned()
        } else {
            format!("{} MiB", bytes / (1024 * 1024))
        }
    };
    for (name, stage) in [
        ("preload (generator, in process)", &result.preload),
        ("ceiling: plain consumer counting records", &result.ceiling),
        ("tally aggregate (exactly-once)", &result.aggregator),
        ("tally sink (to the last row stored)", &result.sink),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {} | {:.1} | {:.0} | {:.1} | {:.0} | {} |",
            result.events,
            stage.seconds,
            stage.events_per_second,
            stage.cpu_seconds,
            stage.events_per_core_second,
            rss(stage.peak_rss_bytes)
        );
    }
    if let Some(seconds) = result.aggregator.seconds_after_first_commit {
        let _ = writeln!(
            out,
            "\naggregator from its first commit to the last event committed: {seconds:.1} s"
        );
    }
    let _ = writeln!(
        out,
        "rows committed by the aggregator and stored by the sink: {}",
        result.rows
    );
    if let Some(latency) = &result.latency {
        let _ = writeln!(
            out,
            "latency at {} events/s with current timestamps ({} ms windows), ms beyond window end + {} ms lateness:",
            latency.rate_per_second, latency.window_ms, latency.allowed_lateness_ms
        );
        for (name, figures) in [
            (
                "event→row (committed to billing.aggregates)",
                &latency.event_to_row,
            ),
            ("event→store (in the SQLite store)", &latency.event_to_store),
        ] {
            let _ = writeln!(
                out,
                "  {name}: p50 {} ms, p99 {} ms, max {} ms ({} rows)",
                figures.p50_ms, figures.p99_ms, figures.max_ms, figures.samples
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks_of_the_sorted_samples() {
        let figures = Percentiles::of((1..=100).rev().collect());
        assert_eq!(
            (
                figures.samples,
                figures.p50_ms,
                figures.p99_ms,
                figures.max_ms
            ),
            (100, 50, 99, 100)
        );
        let empty = Percentiles::of(Vec::new());
        assert_eq!((empty.samples, empty.p50_ms), (0, 0));
    }

    #[test]
    fn reads_cpu_and_peak_rss_of_this_process() {
        assert!(cpu_seconds("self").is_some_and(|seconds| seconds >= 0.0));
        assert!(peak_rss_bytes("self").is_some_and(|bytes| bytes > 0));
    }
}
