//! Exactly-once of `tally aggregate` proved by killing real processes.
//!
//! Every test spawns the real binary (`CARGO_BIN_EXE_tally`) against the real broker
//! (`TALLY_TEST_BOOTSTRAP`) with its own random topics and groups, SIGKILLs or SIGTERMs
//! it at seeded random moments and restarts it with the same `--instance-id`, so the
//! new process's `init_transactions` fences the dead one and aborts its open
//! transaction. The input is preloaded by the producer library's deterministic
//! generator (on time, out of order, corrections, too late, duplicates, conflicting
//! duplicates, malformed and invalid records), whose ground truth is computed
//! independently of the aggregator, and ends on every partition with a gateway tick a
//! day in the future, so every window and correction pane closes at a fixed offset.
//!
//! The aggregator runs with `session.timeout.ms` = 6000 (through `[kafka.client]`) and
//! `aggregator.transaction_timeout_ms` = 10000; the long commit interval (5 s) is below
//! the transaction timeout minus the commit latency, so kills in that phase land inside
//! open transactions. Right after each kill, the test compares every output and input
//! partition's last stable offset with its high watermark: a difference is a
//! transaction the kill left open, counted as such.
//!
//! The tests of this file run one at a time (a lock), so kill timing is not distorted
//! by a sibling test on the same two cores. `TALLY_SOAK_EVENTS` and
//! `TALLY_SOAK_KILLS` override the soak's size.

mod support;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use support::TestTopics;
use support::eos::kafka_client;
use support::eos::{
    AggregatorProcess, ChildConfig, ChildLog, ReadRecord, create_outputs, free_port, log_tail,
    read_committed_within,
};
use support::kill::{
    ConcurrentReader, EVENT_TIME, OffsetProbe, PARTITION_RESTORES, PARTITIONS, RESTORED_RECORDS,
    TransactionProbe, Verification, load_contracts, produce_input, stable_committed,
    verify_against_truth,
};
use support::prometheus::{Exposition, counter, try_scrape};
use support::replay::delete_records;
use support::sink_soak::SinkSoak;
use tally_aggregator::Checkpoint;
use tally_core::codec::decode_aggregate;
use tally_gen::GroundTruth;

/// Default size of the soak: one million generated records.
const DEFAULT_SOAK_EVENTS: u64 = 1_000_000;
/// Default number of SIGKILLs in the soak.
const DEFAULT_SOAK_KILLS: usize = 12;
/// Commit interval of the short phase.
const SHORT_COMMIT_MS: u64 = 200;
/// Commit interval of the long phase: below transaction timeout (10 s) − commit latency.
const LONG_COMMIT_MS: u64 = 5_000;
/// Bound of one wait for committed progress after a restart.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound of a final run (read the rest, settle, exit).
const FINAL_RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound of the exit after SIGTERM.
const SIGTERM_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Small fetches, so a run over 100k records takes seconds and stops land mid-input.
/// One fetch of ≤ 4 KiB per partition, then 10 ms before the next: about 8k records/s.
/// Restores read with the same settings.
const SLOW_FETCHES: [(&str, &str); 3] = [
    ("max.partition.fetch.bytes", "4096"),
    ("queued.min.messages", "1"),
    ("fetch.queue.backoff.ms", "10"),
];

/// Records per input batch for fast reads.
const LARGE_BATCHES: u32 = 10_000;
/// Records per input batch where small fetches must slow the aggregator down.
const SMALL_BATCHES: u32 = 20;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// One aggregator deployment under test: its output topics, group, config file, log
/// and `/metrics` address (its processes run one at a time, so they share the port).
struct Deployment {
    bootstrap: String,
    topics: TestTopics,
    group: String,
    instance_id: String,
    config: PathBuf,
    log: PathBuf,
    metrics: String,
    /// Records re-read by the restores of every process so far, from each process's
    /// last scrape before it was killed or exited.
    restored_records: Cell<u64>,
}

impl Deployment {
    /// New output topics and group over the shared `input` topic.
    fn new(dir: &Path, input: &str, client: &[(&str, &str)]) -> Deployment {
        let bootstrap = support::bootstrap();
        let mut topics = TestTopics::random();
        topics.usage_events = input.to_owned();
        create_outputs(&topics, PARTITIONS);
        let group = support::rand_name("kill-group");
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut child = ChildConfig::new(&group, EVENT_TIME, PARTITIONS).with_client(client);
        child.metrics_listen = metrics.clone();
        let config = child.write(dir, &group, &topics, PARTITIONS);
        let log = dir.join(format!("{group}.log"));
        Deployment {
            bootstrap,
            topics,
            instance_id: support::rand_name("kill"),
            group,
            config,
            log,
            metrics,
            restored_records: Cell::new(0),
        }
    }

    /// The running process's `/metrics`, if it serves them yet.
    fn scrape(&self) -> Option<Exposition> {
        try_scrape(&self.metrics)
    }

    /// Adds the records re-read by a process that is about to stop, as `last` shows.
    fn add_restored(&self, last: Option<&Exposition>) {
        let records = last.map_or(0.0, |exposition| counter(exposition, RESTORED_RECORDS));
        self.restored_records
            .set(self.restored_records.get() + records as u64);
    }

    fn spawn(&self, commit_interval_ms: u64, exit_after_idle: bool) -> AggregatorProcess {
        let interval = commit_interval_ms.to_string();
        let mut args = vec!["--commit-interval-ms", interval.as_str()];
        if exit_after_idle {
            args.extend(["--exit-after-idle-ms", "2000"]);
        }
        AggregatorProcess::start(
            &self.config,
            &self.instance_id,
            &args,
            &self.log,
            ChildLog::JsonAppend,
        )
    }

    /// Runs until the aggregator exits by itself (idle); asserts exit status 0.
    fn run_to_end(&self, commit_interval_ms: u64) {
        let mut process = self.spawn(commit_interval_ms, true);
        let started = Instant::now();
        let mut last = None;
        let status = loop {
            if let Some(status) = process.try_status() {
                break status;
            }
            assert!(
                started.elapsed() < FINAL_RUN_TIMEOUT,
                "the final run did not exit within {FINAL_RUN_TIMEOUT:?}:\n{}",
                log_tail(&self.log, 30)
            );
            if let Some(exposition) = self.scrape() {
                last = Some(exposition);
            }
            thread::sleep(Duration::from_millis(200));
        };
        self.add_restored(last.as_ref());
        assert!(
            status.success(),
            "the final run failed ({status}):\n{}",
            log_tail(&self.log, 30)
        );
    }

    fn all_topics(&self) -> [&str; 4] {
        [
            &self.topics.billing_aggregates,
            &self.topics.late,
            &self.topics.dlq,
            &self.topics.usage_events,
        ]
    }

    fn verify(&self, truth: &GroundTruth) -> Verification {
        verify_against_truth(
            &self.bootstrap,
            &self.topics,
            &self.group,
            truth,
            &load_contracts(),
        )
    }
}

/// How a kill loop runs.
struct KillPlan {
    seed: u64,
    kills: usize,
}

/// What a kill loop did.
#[derive(Debug, Default)]
struct KillReport {
    kills: usize,
    /// Kills after which some partition's last stable offset lagged its high watermark:
    /// the kill left a transaction open (the successor's `init_transactions` aborts it).
    kills_with_open_transaction: usize,
    /// Kills that landed before the group had committed the whole input.
    kills_mid_input: usize,
    /// Kills with the 5 s commit interval, a random 0.5–4.5 s after the partitions were
    /// assigned (restored): inside the first transactions of that process.
    kills_long_phase: usize,
    /// Kills with the 200 ms commit interval, a random 0–200 ms after the process
    /// committed a random 10k–60k more input offsets.
    kills_after_progress: usize,
    /// Kills a random 0.3–6 s after the start whatever the process was doing (joining the
    /// group, restoring, processing).
    kills_blind: usize,
    /// Per kill: the input offsets committed so far (history) and the offsets the next
    /// restore re-reads (Σ committed − low water over the partitions, from the committed
    /// checkpoints).
    restores: Vec<RestoreCost>,
}

/// What the restore after one kill costs, from the committed checkpoints.
#[derive(Debug, Clone, Copy)]
struct RestoreCost {
    /// Σ committed offsets over the partitions.
    history: i64,
    /// Σ (committed offset − low water): the input the next restore re-reads.
    reread: i64,
}

/// The restore cost of the checkpoints `probe` sees committed now.
fn restore_cost(probe: &OffsetProbe) -> RestoreCost {
    let mut cost = RestoreCost {
        history: 0,
        reread: 0,
    };
    for (partition, committed) in probe.committed() {
        let Some((offset, metadata)) = committed else {
            continue;
        };
        let checkpoint = Checkpoint::from_metadata(&metadata)
            .unwrap_or_else(|error| panic!("partition {partition}: {error}"));
        assert!(checkpoint.low_water.offset <= offset);
        cost.history += offset;
        cost.reread += offset - checkpoint.low_water.offset;
    }
    cost
}

/// The committed checkpoints after the soak: every one parses, and the largest stays
/// inside Kafka's default offset-metadata cap (`offset.metadata.max.bytes`, which the
/// aggregator's own writer also enforces). Prints their sizes for the record.
fn assert_checkpoint_size(deployment: &Deployment) {
    let probe = OffsetProbe::new(
        &deployment.bootstrap,
        &deployment.group,
        &deployment.topics.usage_events,
    );
    let sizes: Vec<usize> = probe
        .committed()
        .into_values()
        .map(|entry| {
            let (_, metadata) = entry.expect("every partition has a committed offset");
            Checkpoint::from_metadata(&metadata).expect("tally checkpoint metadata");
            metadata.len()
        })
        .collect();
    let largest = sizes.iter().copied().max().unwrap_or_default();
    eprintln!("committed checkpoints: {sizes:?} bytes of offset metadata");
    assert!(
        largest <= tally_aggregator::checkpoint::MAX_METADATA_BYTES,
        "a checkpoint of {largest} bytes exceeds the offset-metadata cap"
    );
}

/// SIGKILLs the aggregator `plan.kills` times, restarting it with the same instance id.
/// Odd kills run with the long commit interval, even ones with the short one; one kill
/// in four is blind (see [`KillReport`]); the first two never are.
///
/// The input moves on only in the short-interval phases, and they are placed by
/// committed progress, never by time alone, so a slow or fast machine shifts them in
/// time but not along the input: short kill `k` of `n` waits until the committed
/// offsets reach `(k + 1) / (n + 2)` of the input (at least 5 000 past where it
/// started), then lands within one short commit interval. Long-interval kills land
/// after the assignment and before their first commit (0.5–4.5 s of a 5 s interval),
/// blind ones at a random time. The restores therefore see histories spread over the
/// input, early and late, whatever the speed.
fn kill_loop(deployment: &Deployment, plan: &KillPlan, total_offsets: i64) -> KillReport {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let probe = OffsetProbe::new(
        &deployment.bootstrap,
        &deployment.group,
        &deployment.topics.usage_events,
    );
    let transactions = TransactionProbe::new(&deployment.bootstrap);
    let mut report = KillReport::default();
    for kill in 0..plan.kills {
        let long = kill % 2 == 1;
        let interval = if long {
            LONG_COMMIT_MS
        } else {
            SHORT_COMMIT_MS
        };
        let before = probe.sum();
        // Partitions with a checkpoint are restored at assignment; the others start
        // fresh at the same moment.
        let with_checkpoint = probe
            .committed()
            .values()
            .filter(|entry| entry.is_some())
            .count();
        let mut process = deployment.spawn(interval, false);
        let blind = rng.random_range(0..4) == 0 && kill >= 2;
        let target = progress_target(kill, plan.kills, total_offsets).max(before + 5_000);
        let progressed = || {
            let committed = probe.sum();
            committed >= total_offsets || committed >= target
        };
        let started = Instant::now();
        let wait_for = |done: &dyn Fn() -> bool, process: &mut AggregatorProcess, what: &str| {
            while !done() {
                assert!(
                    process.try_status().is_none(),
                    "the aggregator exited before kill {kill}:\n{}",
                    log_tail(&deployment.log, 30)
                );
                assert!(
                    started.elapsed() < PROGRESS_TIMEOUT,
                    "no {what} within {PROGRESS_TIMEOUT:?} before kill {kill}:\n{}",
                    log_tail(&deployment.log, 30)
                );
                thread::sleep(Duration::from_millis(20));
            }
        };
        let delay = if blind {
            report.kills_blind += 1;
            rng.random_range(300..6_000)
        } else if long {
            report.kills_long_phase += 1;
            let assigned = || {
                deployment.scrape().is_some_and(|exposition| {
                    counter(&exposition, PARTITION_RESTORES) >= with_checkpoint as f64
                })
            };
            wait_for(&assigned, &mut process, "assignment");
            // Within the first commit interval: no commit moves the input on, so a fast
            // machine cannot run through the input in one long transaction.
            rng.random_range(500..4_500)
        } else {
            report.kills_after_progress += 1;
            wait_for(&progressed, &mut process, "committed progress");
            rng.random_range(0..200)
        };
        thread::sleep(Duration::from_millis(delay));
        assert!(
            process.try_status().is_none(),
            "the aggregator died by itself before kill {kill}:\n{}",
            log_tail(&deployment.log, 30)
        );
        let committed_at_kill = probe.sum();
        deployment.add_restored(deployment.scrape().as_ref());
        process.kill();
        let open = transactions.open(&deployment.all_topics());
        report.restores.push(restore_cost(&probe));
        report.kills += 1;
        report.kills_with_open_transaction += usize::from(!open.is_empty());
        report.kills_mid_input += usize::from(committed_at_kill < total_offsets);
        eprintln!(
            "kill {kill} after {:?}: commit interval {interval} ms, {}, committed offsets \
             {committed_at_kill}/{total_offsets}, partitions with an open transaction: {}",
            started.elapsed(),
            if blind {
                "blind"
            } else if long {
                "after assignment"
            } else {
                "after progress"
            },
            open.len()
        );
    }
    report
}

/// Where kill `kill` of `kills` lands along the input: `(kill + 1) / (kills + 2)` of
/// its offsets.
fn progress_target(kill: usize, kills: usize, total_offsets: i64) -> i64 {
    let share = i64::try_from(kill + 1).expect("few kills");
    let parts = i64::try_from(kills + 2).expect("few kills");
    total_offsets * share / parts
}

/// Total offsets of the input a group commits at the end: records plus one gateway tick
/// per partition (aggregator ticks come after those and are not counted here).
fn input_offsets(truth: &GroundTruth) -> i64 {
    i64::try_from(truth.produced).expect("small") + i64::from(PARTITIONS)
}

fn assert_exact(what: &str, verification: &Verification, deployment: &Deployment) {
    assert!(
        verification.mismatches.is_empty(),
        "{what}: {} mismatches:\n{}\nlog tail:\n{}",
        verification.mismatches.len(),
        verification.mismatches.join("\n"),
        log_tail(&deployment.log, 20)
    );
}

fn describe(truth: &GroundTruth) -> String {
    format!(
        "produced {} counted {} (corrections {}, out of order {}) duplicates {} (conflicting {}) \
         too_late {} rejected {}",
        truth.produced,
        truth.counted,
        truth.counted_corrections,
        truth.out_of_order,
        truth.duplicates,
        truth.conflicting_duplicates,
        truth.too_late,
        truth.rejected
    )
}

fn assert_all_classes(truth: &GroundTruth) {
    assert!(
        truth.counted_corrections > 0
            && truth.out_of_order > 0
            && truth.duplicates > 0
            && truth.conflicting_duplicates > 0
            && truth.too_late > 0
            && truth.rejected > 0,
        "the input must exercise every class: {}",
        describe(truth)
    );
}

/// Checks what a read_committed reader saw while the kills ran: nothing that is not in
/// the final read (no aborted record was ever visible), no row id twice. Returns how
/// many rows it saw.
fn assert_concurrent_view(seen: &[ReadRecord], final_rows: &[(Vec<u8>, Vec<u8>)]) -> usize {
    let final_set: BTreeSet<&(Vec<u8>, Vec<u8>)> = final_rows.iter().collect();
    let mut ids: BTreeMap<String, u32> = BTreeMap::new();
    let mut vanished = Vec::new();
    for record in seen {
        let pair = (record.key.clone().unwrap_or_default(), record.value.clone());
        if !final_set.contains(&pair) {
            vanished.push(format!("{}:{}", record.partition, record.offset));
        }
        let row = decode_aggregate(&record.value).expect("a visible row decodes");
        *ids.entry(row.id).or_default() += 1;
    }
    let repeated: Vec<_> = ids.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        vanished.is_empty(),
        "{} records seen by the concurrent read_committed reader are not in the final read \
         (aborted records were visible), e.g. {:?}",
        vanished.len(),
        &vanished[..vanished.len().min(10)]
    );
    assert!(
        repeated.is_empty(),
        "the concurrent reader saw row ids more than once: {:?}",
        &repeated[..repeated.len().min(10)]
    );
    seen.len()
}

#[test]
fn crash_soak_with_sigkills_matches_ground_truth() {
    let _serial = serial();
    let started = Instant::now();
    let events: u64 = env_number("TALLY_SOAK_EVENTS", DEFAULT_SOAK_EVENTS);
    let kills: usize = env_number("TALLY_SOAK_KILLS", DEFAULT_SOAK_KILLS);
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = support::bootstrap();
    let input = support::rand_name("kill-soak-events");
    let truth = produce_input(&input, events, 20_251_126, LARGE_BATCHES);
    assert_all_classes(&truth);
    let produced_at = started.elapsed();
    eprintln!("soak input ({produced_at:?}): {}", describe(&truth));

    let deployment = Deployment::new(dir.path(), &input, &[]);
    let reader = ConcurrentReader::start(&bootstrap, &deployment.topics.billing_aggregates);
    // The sink loads the output into PostgreSQL meanwhile and is killed too.
    let sink = SinkSoak::start(dir.path(), &deployment.topics, 0x51c4);
    let plan = KillPlan {
        seed: 0x50a4,
        kills,
    };
    let report = kill_loop(&deployment, &plan, input_offsets(&truth));
    let killed_at = started.elapsed();
    deployment.run_to_end(SHORT_COMMIT_MS);
    let seen = reader.finish();
    let finished_at = started.elapsed();

    let verification = deployment.verify(&truth);
    let restored = deployment.restored_records.get();
    eprintln!(
        "soak: {events} events, {report:?}, restored records {restored}, rows {} (priced {}), \
         concurrent reader saw {} rows, mismatches {}; produce {produced_at:?}, kill loop until \
         {killed_at:?}, final run until {finished_at:?}, wall time {:?}",
        verification.rows,
        verification.priced_rows,
        seen.len(),
        verification.mismatches.len(),
        started.elapsed()
    );
    assert_exact("soak", &verification, &deployment);
    assert_eq!(report.kills, kills);
    assert!(
        report.kills_mid_input >= kills / 2,
        "most kills must land before the input is committed: {report:?}"
    );
    assert!(
        report.kills_with_open_transaction > 0,
        "some kills must leave a transaction open: {report:?}"
    );
    assert!(restored > 0, "restarts re-read input to rebuild state");
    assert_concurrent_view(&seen, &verification.multiset);
    let sink_began = Instant::now();
    sink.finish(&bootstrap, &deployment.topics, &truth, &load_contracts());
    eprintln!(
        "soak: sink catch-up and checks took {:?}",
        sink_began.elapsed()
    );
    assert_restore_is_bounded(&report.restores);
    assert_checkpoint_size(&deployment);
    support::replay::after_soak(
        &deployment.config,
        &deployment.topics,
        &deployment.group,
        PARTITIONS,
        EVENT_TIME.window_ms,
    );
}

/// Restores cost the live state, not the history: with history at least 20 dedupe
/// horizons long, the input re-read by a restore late in the run is at most 1.1 × what
/// a restore re-read early (history of 3–8 horizons).
fn assert_restore_is_bounded(restores: &[RestoreCost]) {
    // Offsets per dedupe horizon: the generator's records per second of event time.
    let rate_per_sec =
        i64::try_from(EVENT_TIME.generator(0, 0, PARTITIONS).rate_per_sec).expect("a small rate");
    let horizon_offsets = EVENT_TIME.dedupe_horizon_ms() * rate_per_sec / 1_000;
    eprintln!("restore cost by kill (dedupe horizon ≈ {horizon_offsets} offsets):");
    eprintln!("  {:>10} {:>8} {:>10}", "history", "× horizon", "re-read");
    for cost in restores {
        eprintln!(
            "  {:>10} {:>8.1} {:>10}",
            cost.history,
            cost.history as f64 / horizon_offsets as f64,
            cost.reread
        );
    }
    let early = restores
        .iter()
        .filter(|cost| (3 * horizon_offsets..=8 * horizon_offsets).contains(&cost.history))
        .map(|cost| cost.reread)
        .max();
    let late = restores
        .iter()
        .filter(|cost| cost.history >= 20 * horizon_offsets)
        .map(|cost| cost.reread)
        .max();
    let (Some(early), Some(late)) = (early, late) else {
        panic!(
            "the kills must land both early (3–8 horizons) and late (≥ 20 horizons): {restores:?}"
        );
    };
    assert!(
        late * 10 <= early * 11,
        "a late restore re-read {late} offsets, more than 1.1 × an early one ({early})"
    );
}

#[test]
fn same_input_gives_identical_rows_across_commit_intervals_and_kills() {
    let _serial = serial();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let input = support::rand_name("kill-same-events");
    let truth = produce_input(&input, 100_000, 77, SMALL_BATCHES);
    assert_all_classes(&truth);
    eprintln!("input: {}", describe(&truth));

    let short = Deployment::new(dir.path(), &input, &[]);
    short.run_to_end(SHORT_COMMIT_MS);
    let short_rows = short.verify(&truth);
    assert_exact("200 ms commits", &short_rows, &short);

    let long = Deployment::new(dir.path(), &input, &[]);
    long.run_to_end(LONG_COMMIT_MS);
    let long_rows = long.verify(&truth);
    assert_exact("5 s commits", &long_rows, &long);

    let killed = Deployment::new(dir.path(), &input, &SLOW_FETCHES);
    let plan = KillPlan {
        seed: 0x5a4e,
        kills: 4,
    };
    let report = kill_loop(&killed, &plan, input_offsets(&truth));
    killed.run_to_end(SHORT_COMMIT_MS);
    let killed_rows = killed.verify(&truth);
    assert_exact("killed run", &killed_rows, &killed);
    let restored = killed.restored_records.get();
    eprintln!(
        "rows: {} / {} / {}; kills {report:?}; restored {restored}; wall time {:?}",
        short_rows.rows,
        long_rows.rows,
        killed_rows.rows,
        started.elapsed()
    );
    assert!(report.kills_mid_input >= 3, "kills mid-input: {report:?}");
    assert!(
        short_rows.multiset == long_rows.multiset,
        "200 ms and 5 s commit intervals gave different rows"
    );
    assert!(
        short_rows.multiset == killed_rows.multiset,
        "the killed run gave different rows than the uninterrupted one"
    );
}

#[test]
fn sigterm_commits_and_exits_zero_then_restart_continues_exactly() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = support::bootstrap();
    let input = support::rand_name("kill-term-events");
    let test_started = Instant::now();
    let truth = produce_input(&input, 100_000, 91, SMALL_BATCHES);
    assert_all_classes(&truth);
    eprintln!("input produced in {:?}", test_started.elapsed());
    let total = input_offsets(&truth);
    let deployment = Deployment::new(dir.path(), &input, &SLOW_FETCHES);
    let probe = OffsetProbe::new(&bootstrap, &deployment.group, &input);

    // A long commit interval: at the SIGTERM a transaction is open with work in it.
    let mut process = deployment.spawn(LONG_COMMIT_MS, false);
    let started = Instant::now();
    while probe.sum() == 0 {
        assert!(
            process.try_status().is_none(),
            "{}",
            log_tail(&deployment.log, 30)
        );
        assert!(started.elapsed() < PROGRESS_TIMEOUT, "no first commit");
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(2_500));
    let before_term = probe.sum();
    let terminated_at = Instant::now();
    process.signal("TERM");
    let status = process
        .wait_timeout(SIGTERM_EXIT_TIMEOUT)
        .unwrap_or_else(|| {
            panic!(
                "no exit within {SIGTERM_EXIT_TIMEOUT:?} of SIGTERM:\n{}",
                log_tail(&deployment.log, 30)
            )
        });
    let exit_after = terminated_at.elapsed();
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        log_tail(&deployment.log, 30)
    );

    // No transaction left open: the last stable offset is the high watermark everywhere,
    // and a read_committed reader reaches the end of billing.aggregates at once.
    // The transaction markers land just after the commit returns: allow them 3 s.
    let open = TransactionProbe::new(&bootstrap)
        .open_after(&deployment.all_topics(), Duration::from_secs(3));
    assert!(open.is_empty(), "transactions left open: {open:?}");
    let rows_after_term = read_committed_within(
        &bootstrap,
        &deployment.topics.billing_aggregates,
        PARTITIONS,
        Duration::from_secs(15),
    );
    let committed = stable_committed(
        &bootstrap,
        &deployment.group,
        &input,
        Duration::from_secs(5),
    )
    .expect("the committed offsets are stable at once: no pending transactional commit");
    assert!(
        committed.values().all(Option::is_some),
        "every partition has a committed offset: {committed:?}"
    );
    let after_term = probe.sum();
    eprintln!(
        "SIGTERM: exit {status} after {exit_after:?}; committed offsets {before_term} before, \
         {after_term} after, of {total}; {} rows committed",
        rows_after_term.len()
    );
    assert!(
        after_term > before_term,
        "the shutdown committed the open transaction's work"
    );
    assert!(after_term < total, "the SIGTERM landed mid-input");

    // Retention: delete each partition's input below its committed low water. A clone
    // of the group's checkpoints (its own group and outputs) keeps them for later.
    let committed = probe.committed();
    let low_waters: BTreeMap<i32, (i64, i64)> = committed
        .iter()
        .map(|(partition, entry)| {
            let (offset, metadata) = entry.clone().expect("every partition committed");
            let checkpoint = Checkpoint::from_metadata(&metadata).expect("a tally checkpoint");
            (*partition, (checkpoint.low_water.offset, offset))
        })
        .collect();
    let clone = Deployment::new(dir.path(), &input, &SLOW_FETCHES);
    commit_offsets(&bootstrap, &clone.group, &input, &committed);
    let deleted: i64 = low_waters.values().map(|(low, _)| low).sum();
    assert!(
        deleted > 0,
        "input lies below the low water: {low_waters:?}"
    );
    let below: Vec<(i32, i64)> = low_waters
        .iter()
        .map(|(partition, (low, _))| (*partition, *low))
        .collect();
    delete_records(&input, &below);
    eprintln!("deleted {deleted} input offsets below the low waters {low_waters:?}");

    deployment.run_to_end(SHORT_COMMIT_MS);
    let verification = deployment.verify(&truth);
    eprintln!(
        "after the restart: {} rows, {} mismatches, wall time {:?}",
        verification.rows,
        verification.mismatches.len(),
        test_started.elapsed()
    );
    assert_exact("after SIGTERM and restart", &verification, &deployment);
    let final_set: BTreeSet<(Vec<u8>, Vec<u8>)> = verification.multiset.iter().cloned().collect();
    assert!(
        rows_after_term.iter().all(|record| final_set
            .contains(&(record.key.clone().unwrap_or_default(), record.value.clone()))),
        "rows committed at the SIGTERM are part of the final result"
    );

    // Input deleted above a low water: the clone's restore of that partition refuses,
    // the process exits with an error, and the clone's committed offsets stay put.
    let (&partition, &(low, _)) = low_waters
        .iter()
        .find(|(_, (low, offset))| low < offset)
        .expect("a partition with live state at the SIGTERM");
    delete_records(&input, &[(partition, low + 1)]);
    let mut refused = clone.spawn(SHORT_COMMIT_MS, false);
    let status = refused
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the restore did not refuse:\n{}", log_tail(&clone.log, 30)));
    assert!(!status.success(), "the restore refused: {status}");
    let clone_probe = OffsetProbe::new(&bootstrap, &clone.group, &input);
    assert_eq!(clone_probe.committed(), committed, "nothing was committed");
}

/// Commits `committed` (offsets and metadata) for `group` on `topic`, as a group-less
/// consumer: a copy of another group's checkpoints.
fn commit_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
    committed: &BTreeMap<i32, Option<(i64, String)>>,
) {
    let consumer: BaseConsumer = kafka_client(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut offsets = TopicPartitionList::new();
    for (partition, entry) in committed {
        let (offset, metadata) = entry.clone().expect("committed");
        let mut element = offsets.add_partition(topic, *partition);
        element.set_offset(Offset::Offset(offset)).expect("offset");
        element.set_metadata(metadata);
    }
    consumer
        .commit(&offsets, CommitMode::Sync)
        .expect("commit a copy of the checkpoints");
}

#[test]
fn read_committed_reader_running_throughout_sees_nothing_that_disappears() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = support::bootstrap();
    let input = support::rand_name("kill-reader-events");
    let test_started = Instant::now();
    let truth = produce_input(&input, 80_000, 5, SMALL_BATCHES);
    assert_all_classes(&truth);
    eprintln!("input produced in {:?}", test_started.elapsed());
    let deployment = Deployment::new(dir.path(), &input, &SLOW_FETCHES);
    let reader = ConcurrentReader::start(&bootstrap, &deployment.topics.billing_aggregates);
    let plan = KillPlan {
        seed: 0x7ead,
        kills: 4,
    };
    let report = kill_loop(&deployment, &plan, input_offsets(&truth));
    deployment.run_to_end(SHORT_COMMIT_MS);
    let seen = reader.finish();
    let verification = deployment.verify(&truth);
    assert_exact("reader test", &verification, &deployment);
    eprintln!(
        "concurrent reader saw {} rows of {}; kills {report:?}; restored {}; mismatches {}; \
         wall time {:?}",
        seen.len(),
        verification.rows,
        deployment.restored_records.get(),
        verification.mismatches.len(),
        test_started.elapsed()
    );
    assert!(
        report.kills_with_open_transaction > 0,
        "kills left transactions open: {report:?}"
    );
    assert!(
        !seen.is_empty(),
        "the reader saw committed rows during the run"
    );
    assert_concurrent_view(&seen, &verification.multiset);
}
