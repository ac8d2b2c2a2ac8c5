//! End-to-end aggregator throughput against the real broker, exactly-once on.
//!
//! 1. Creates random input and output topics and preloads `N` generated usage records
//!    (every record class) with `tally-gen` through the `tally-producer` library, then one far-future
//!    gateway tick per partition so every window closes. The producer is dropped
//!    before the measurement starts.
//! 2. Drains them with ONE aggregator, in process ([`tally_aggregator::run`] on a
//!    thread, `exit_after_idle`), transactional with a 1 s commit interval.
//! 3. Watches the group's committed offsets; once they cover the preloaded input, reads
//!    the wall time and the process CPU time (`/proc/self/stat` utime + stime: the
//!    aggregator's thread and its librdkafka threads, plus the watcher's one query per
//!    250 ms) since the aggregator started.
//!
//! Prints events/s of wall time (from the start, and from the first commit, which
//! excludes producer and group start-up), aggregator CPU seconds, and events/s per
//! CPU-core. Asserts that the drain completed: rows were emitted and the committed
//! checkpoints counted every record exactly as the generator's truth says.
//!
//! `cargo bench --bench e2e_throughput` preloads 2 000 000 records (override with
//! `TALLY_BENCH_EVENTS`); under `cargo test --benches` (no `--bench` argument) it
//! preloads 20 000, as a smoke test. Needs `TALLY_TEST_BOOTSTRAP`. Extra librdkafka
//! settings for the aggregator, for experiments: `TALLY_BENCH_CLIENT="key=value,..."`
//! (e.g. `fetch.queue.backoff.ms=1000`, librdkafka's default, to see the stall it
//! causes); `TALLY_BENCH_WORKER_THREADS=n` sets `aggregator.worker_threads`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use support::eos::{add_counters, create_topics, kafka_client};
use support::rand_name;
use tally_aggregator::{AggregatorSettings, Checkpoint, StartFrom};
use tally_core::config::Config;
use tally_core::contracts::Contracts;
use tally_core::event::{TickOrigin, UsageTick};
use tally_core::partition::PartitionCounters;
use tally_core::window::WindowSize;
use tally_gen::{GeneratorConfig, GroundTruth, ProduceOptions, produce_blocking};
use tally_producer::{ProducerOptions, UsageProducer};

const PARTITIONS: i32 = 6;
const FULL_EVENTS: u64 = 2_000_000;
const TEST_EVENTS: u64 = 20_000;
const COMMIT_INTERVAL_MS: u64 = 1_000;
const RUN_TIMEOUT: Duration = Duration::from_secs(900);
const WATCH_EVERY: Duration = Duration::from_millis(250);

fn bootstrap() -> String {
    match std::env::var("TALLY_TEST_BOOTSTRAP") {
        Ok(bootstrap) if !bootstrap.is_empty() => bootstrap,
        _ => {
            eprintln!(
                "e2e_throughput needs a real Kafka broker: set TALLY_TEST_BOOTSTRAP (run it \
                 through deploy/local/test.sh, or `deploy/local/kafka.sh start` and source the \
                 kafka.env it writes)"
            );
            std::process::exit(2);
        }
    }
}

/// Process CPU time (user + system) so far: every thread, librdkafka's included.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // Fields after the command name (which may contain spaces) start at field 3.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| -> u64 { fields[index].parse().expect("numeric stat field") };
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the command name.
    let total = ticks(11) + ticks(12);
    Duration::from_secs_f64(total as f64 / clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

struct Topics {
    events: String,
    aggregates: String,
    late: String,
    dlq: String,
    checkpoints: String,
}

fn generator_config(count: u64) -> GeneratorConfig {
    let defaults = Config::default().aggregator;
    GeneratorConfig {
        seed: 11,
        count,
        rate_per_sec: 5_000,
        partitions: u32::try_from(PARTITIONS).expect("small"),
        tenants: 200,
        window_ms: defaults.window_ms,
        max_out_of_orderness_ms: defaults.max_out_of_orderness_ms,
        allowed_lateness_ms: defaults.allowed_lateness_ms,
        correction_horizon_ms: defaults.correction_horizon_ms,
        ..GeneratorConfig::default()
    }
}

/// Preloads `count` records and a far-future tick per partition; returns the truth.
fn preload(bootstrap: &str, topic: &str, count: u64) -> GroundTruth {
    let producer = UsageProducer::new(&kafka_client(bootstrap), ProducerOptions::new(topic))
        .expect("usage producer");
    let options = ProduceOptions {
        progress_interval: Duration::from_secs(5),
        ..ProduceOptions::default()
    };
    let truth = produce_blocking(generator_config(count), &producer, &options, |report| {
        if report.finished {
            println!(
                "preload: {} records in {:.1} s ({:.0} records/s)",
                report.produced,
                report.elapsed.as_secs_f64(),
                report.records_per_sec()
            );
        }
    })
    .expect("preload");
    let last_send = truth.last_send_time_ms.expect("records were produced");
    let tick_time_ms = last_send + 24 * 3_600_000;
    for partition in 0..PARTITIONS {
        producer
            .send_tick(
                partition,
                &UsageTick {
                    tick_time_ms,
                    origin: TickOrigin::Gateway,
                },
                tick_time_ms,
            )
            .expect("enqueue tick");
    }
    producer
        .flush_blocking(Duration::from_secs(120))
        .expect("flush ticks");
    truth
}

fn settings(bootstrap: &str, topics: &Topics, group: &str) -> AggregatorSettings {
    let mut config = Config::default();
    config.kafka.bootstrap_servers = bootstrap.to_owned();
    config
        .kafka
        .client
        .insert("session.timeout.ms".to_owned(), "10000".to_owned());
    // Extra librdkafka settings for experiments: `TALLY_BENCH_CLIENT="key=value,key=value"`.
    if let Ok(extra) = std::env::var("TALLY_BENCH_CLIENT") {
        for pair in extra.split(',').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').expect("TALLY_BENCH_CLIENT: key=value");
            config.kafka.client.insert(key.to_owned(), value.to_owned());
        }
    }
    config.topics.usage_events = topics.events.clone();
    config.topics.billing_aggregates = topics.aggregates.clone();
    config.topics.late = topics.late.clone();
    config.topics.dlq = topics.dlq.clone();
    config.topics.checkpoints = topics.checkpoints.clone();
    config.topics.partitions = PARTITIONS;
    config.topics.output_partitions = PARTITIONS;
    config.topics.replication_factor = 1;
    config.aggregator.group_id = group.to_owned();
    config.aggregator.idle_timeout_ms = 1_000;
    config.aggregator.commit_interval_ms = i64::try_from(COMMIT_INTERVAL_MS).expect("small");
    // Worker threads of the aggregator (default: one per core), for experiments.
    if let Ok(threads) = std::env::var("TALLY_BENCH_WORKER_THREADS") {
        config.aggregator.worker_threads = threads
            .parse()
            .expect("TALLY_BENCH_WORKER_THREADS: a thread count");
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/contracts/default.toml");
    let text = std::fs::read_to_string(&path).expect("read the default contracts");
    let window = WindowSize::new(config.aggregator.window_ms).expect("default window");
    let contracts = Contracts::load(&text, window).expect("default contracts load");
    let mut settings = AggregatorSettings::new(config, contracts, rand_name("bench"));
    settings.start_from = Some(StartFrom::Earliest);
    settings.exit_after_idle = Some(Duration::from_millis(2_000));
    settings
}

/// Sum of the input's high watermarks: the offsets the aggregator must commit.
fn input_end(consumer: &BaseConsumer, topic: &str) -> i64 {
    (0..PARTITIONS)
        .map(|partition| {
            consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(30))
                .expect("watermarks")
                .1
        })
        .sum()
}

fn committed(consumer: &BaseConsumer, topic: &str) -> BTreeMap<i32, (i64, Option<Checkpoint>)> {
    let mut query = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        query.add_partition(topic, partition);
    }
    let Ok(found) = consumer.committed_offsets(query, Duration::from_secs(30)) else {
        return BTreeMap::new();
    };
    found
        .elements()
        .iter()
        .map(|element| {
            let offset = match element.offset() {
                Offset::Offset(offset) => offset,
                _ => 0,
            };
            let checkpoint = Checkpoint::from_metadata(element.metadata()).ok();
            (element.partition(), (offset, checkpoint))
        })
        .collect()
}

fn main() {
    let test_mode = !std::env::args().any(|arg| arg == "--bench");
    let count = std::env::var("TALLY_BENCH_EVENTS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(if test_mode { TEST_EVENTS } else { FULL_EVENTS });
    let bootstrap = bootstrap();
    let id = rand_name("bench");
    let topics = Topics {
        events: format!("{id}-events"),
        aggregates: format!("{id}-aggregates"),
        late: format!("{id}-late"),
        dlq: format!("{id}-dlq"),
        checkpoints: format!("{id}-checkpoints"),
    };
    create_topics(
        &bootstrap,
        &[
            &topics.events,
            &topics.aggregates,
            &topics.late,
            &topics.dlq,
            &topics.checkpoints,
        ],
        PARTITIONS,
    );
    let truth = preload(&bootstrap, &topics.events, count);
    assert!(truth.is_conserved());

    let group = format!("{id}-group");
    let watcher: BaseConsumer = kafka_client(&bootstrap)
        .set("group.id", &group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("watcher");
    let target = input_end(&watcher, &topics.events);

    let settings = settings(&bootstrap, &topics, &group);
    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&shutdown);
    let cpu_start = process_cpu();
    let started = Instant::now();
    let handle = thread::spawn(move || tally_aggregator::run(settings, flag));

    let mut first_commit: Option<(Instant, i64)> = None;
    let done = loop {
        if started.elapsed() >= RUN_TIMEOUT {
            shutdown.store(true, Ordering::SeqCst);
            let _ = handle.join();
            panic!("the aggregator did not drain {count} records within {RUN_TIMEOUT:?}");
        }
        // Read before the offsets: a run that ended is judged on the offsets it left,
        // not on whether this loop saw them before the thread ended.
        let finished = handle.is_finished();
        let sum: i64 = committed(&watcher, &topics.events)
            .values()
            .map(|(offset, _)| offset)
            .sum();
        if sum > 0 && first_commit.is_none() {
            first_commit = Some((Instant::now(), sum));
        }
        if sum >= target {
            break Some((started.elapsed(), process_cpu() - cpu_start, Instant::now()));
        }
        if finished {
            break None;
        }
        thread::sleep(WATCH_EVERY);
    };
    let summary = match handle.join() {
        Ok(Ok(summary)) => summary,
        Ok(Err(error)) => panic!("the aggregator failed: {error}"),
        Err(_) => panic!("the aggregator thread panicked"),
    };
    let total_cpu = process_cpu() - cpu_start;
    let total_wall = started.elapsed();
    let Some((wall, cpu, done_at)) = done else {
        panic!("the aggregator exited before committing the whole input: {summary:?}");
    };

    // The drain completed, exactly as the truth says.
    let checkpoints = committed(&watcher, &topics.events);
    let mut counters = PartitionCounters::default();
    for (partition, (_, checkpoint)) in &checkpoints {
        let checkpoint = checkpoint
            .as_ref()
            .unwrap_or_else(|| panic!("partition {partition} has no tally checkpoint"));
        assert!(checkpoint.counters.is_conserved());
        add_counters(&mut counters, &checkpoint.counters);
    }
    assert_eq!(checkpoints.len(), PARTITIONS as usize);
    assert_eq!(counters.consumed, truth.produced, "consumed = produced");
    assert_eq!(counters.counted, truth.counted, "counted");
    assert_eq!(counters.duplicates, truth.duplicates, "duplicates");
    assert_eq!(counters.too_late, truth.too_late, "too late");
    assert_eq!(counters.rejected, truth.rejected, "rejected");
    assert!(summary.rows_emitted > 0, "no rows emitted: {summary:?}");

    let events = count as f64;
    let cpu_s = cpu.as_secs_f64();
    println!(
        "e2e: {count} records, {PARTITIONS} partitions, commit interval {COMMIT_INTERVAL_MS} ms, \
         exactly-once; {} rows, {} transactions committed ({} aborted)",
        summary.rows_emitted, summary.transactions_committed, summary.transactions_aborted
    );
    println!(
        "e2e: input committed after {:.2} s wall: {:.0} events/s (wall, from start)",
        wall.as_secs_f64(),
        events / wall.as_secs_f64()
    );
    if let Some((at, offsets)) = first_commit {
        let span = done_at.duration_since(at).as_secs_f64();
        if span > 0.0 && offsets < target {
            println!(
                "e2e: from the first commit ({:.2} s, {offsets} offsets): {:.0} events/s (wall)",
                at.duration_since(started).as_secs_f64(),
                (target - offsets) as f64 / span
            );
        }
    }
    println!(
        "e2e: aggregator CPU {cpu_s:.2} s ({:.0}% of one core): {:.0} events/s per CPU-core",
        100.0 * cpu_s / wall.as_secs_f64(),
        events / cpu_s
    );
    println!(
        "e2e: until exit (idle wait included): {:.2} s wall, {:.2} s CPU",
        total_wall.as_secs_f64(),
        total_cpu.as_secs_f64()
    );
}
