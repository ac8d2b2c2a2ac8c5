//! The aggregator as a consumer group of real `tally aggregate` processes against a
//! real Kafka broker: rebalance churn, a fenced zombie, a fenced producer restarting in
//! process, idle-partition ticks, and the `/metrics` endpoint.
//!
//! Needs `TALLY_TEST_BOOTSTRAP`. Every test uses its own random topics and groups and
//! spawns the binary (`CARGO_BIN_EXE_tally`) with distinct instance ids; members
//! notice a dead peer within the 6 s session timeout and transactions time out after
//! 10 s. Progress is observed through the group's committed offsets, never through
//! sleeps alone, so the schedule adapts to a slow machine; every wait is bounded.
//! Each run is checked against the generator's independently computed ground truth
//! (see `support::eos::verify_against_truth`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tally_core::codec::{Decoded, decode_aggregate, decode_record};
use tally_core::event::TickOrigin;
use tally_core::validate::ValidationLimits;
use tally_gen::ClassFractions;

use rdkafka::producer::{BaseProducer, Producer};
use support::eos::{
    AggregatorProcess, ChildConfig, EventTime, PacedInput, committed_checkpoints, create_outputs,
    expected_dlq_reasons, free_port, fresh_outputs, input_fully_committed, kafka_client,
    produce_generated, read_committed, read_topic, verify_against_truth, wait_until,
};
use support::group::Member;
use support::prometheus::{Exposition, counter, log_events, parse, scrape, try_scrape};
use support::{TestTopics, rand_name};

const PARTITIONS: i32 = 6;
const OUTPUT_PARTITIONS: i32 = 4;
/// Bound of any single wait for progress.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound of a clean stop after SIGTERM (the final commit included).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).expect("ms fit i64"))
        .expect("clock after 1970")
}

/// Partitions rebuilt from their committed checkpoint.
const PARTITION_RESTORES: &str = "tally_aggregator_partition_restores_total";
/// Committed transactions (the commit-latency histogram's count).
const COMMITS: &str = "tally_aggregator_transaction_commit_seconds_count";
/// Aborted transactions.
const ABORTS: &str = "tally_aggregator_transactions_aborted_total";
/// In-process restarts after a fatal Kafka error.
const FATAL_RESTARTS: &str = "tally_aggregator_fatal_restarts_total";

#[derive(Debug, Clone, Copy)]
enum Step {
    Start(&'static str),
    Term(&'static str),
    Kill(&'static str),
}

/// Three processes join and leave in rotation while the group works through 200k
/// events on 6 partitions: clean leaves (SIGTERM: commit, then leave) and crashes
/// (SIGKILL inside an open transaction, noticed after the session timeout) each force a
/// cooperative rebalance, and every newly assigned partition is restored from its
/// committed checkpoint. The outputs equal the ground truth exactly.
#[test]
fn rebalance_churn_keeps_totals_exact() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let event_time = EventTime::EOS;
    // A live stream of ~50 s: the churn happens while records arrive.
    let stream = PacedInput::start(
        &rand_name("group-churn-events"),
        event_time.generator(200_000, 23, PARTITIONS),
        true,
        4_000,
    );
    let outputs = fresh_outputs(&stream.topic);
    create_outputs(&outputs, OUTPUT_PARTITIONS);
    let group = rand_name("group-churn");
    let child = ChildConfig::new(&group, event_time, OUTPUT_PARTITIONS).live_stream();

    let schedule: [(i64, Step); 11] = [
        (0, Step::Start("a")),
        (6, Step::Start("b")),
        (12, Step::Start("c")),
        (20, Step::Term("a")),
        (28, Step::Start("a")),
        (36, Step::Kill("b")),
        (44, Step::Start("b")),
        (52, Step::Term("c")),
        (60, Step::Start("c")),
        (68, Step::Kill("a")),
        (76, Step::Start("a")),
    ];
    let total = stream.total_offsets();
    let instance_suffix = rand_name("");
    let mut running: BTreeMap<&'static str, Member> = BTreeMap::new();
    let mut finished: Vec<AggregatorProcess> = Vec::new();
    // Σ over members of their last scrape before they stopped.
    let mut restores = 0.0;
    let mut errors = 0.0;
    let mut last_scrape = |member: &mut Member| {
        let exposition = member.scrape_running();
        restores += counter(&exposition, PARTITION_RESTORES);
        errors += log_events(&exposition, "error");
    };
    let mut generation: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut done_steps = Vec::new();
    for (percent, step) in schedule {
        let target = total * percent / 100;
        wait_until(PROGRESS_TIMEOUT, &format!("{percent}% committed"), || {
            stream.committed(&group) >= target
        });
        let committed = stream.committed(&group);
        match step {
            Step::Start(name) => {
                let count = generation.entry(name).or_insert(0);
                *count += 1;
                let member = Member::spawn(
                    &child,
                    &outputs,
                    PARTITIONS,
                    dir.path(),
                    &format!("{name}-{count}"),
                    &format!("{name}{instance_suffix}"),
                    &[],
                );
                running.insert(name, member);
            }
            Step::Term(name) => {
                let mut member = running.remove(name).expect("the process runs");
                last_scrape(&mut member);
                member.terminate_cleanly(STOP_TIMEOUT);
                finished.push(member.process);
            }
            Step::Kill(name) => {
                let mut member = running.remove(name).expect("the process runs");
                last_scrape(&mut member);
                let mut process = member.process;
                process.kill();
                finished.push(process);
            }
        }
        done_steps.push(format!(
            "{step:?} at {committed}/{total} ({:?})",
            started.elapsed()
        ));
    }
    eprintln!("churn: {done_steps:#?}");
    let input = stream.finish();
    eprintln!("input: {} ({:?})", input.describe(), started.elapsed());
    wait_until(PROGRESS_TIMEOUT, "the whole input is committed", || {
        for (name, member) in running.iter_mut() {
            let process = &mut member.process;
            if let Some(status) = process.try_status() {
                panic!(
                    "{name} exited on its own ({status}); log:\n{}",
                    process.log_tail(40)
                );
            }
        }
        input_fully_committed(&input, &group)
    });
    for mut member in std::mem::take(&mut running).into_values() {
        last_scrape(&mut member);
        member.terminate_cleanly(STOP_TIMEOUT);
        finished.push(member.process);
    }
    eprintln!("all stopped ({:?})", started.elapsed());

    eprintln!(
        "{} members; restores {restores}, error log events {errors}",
        finished.len()
    );
    assert!(
        restores >= 6.0,
        "partitions moved between members and were restored ({restores} restores)"
    );
    assert_eq!(
        errors, 0.0,
        "no member logged an error (partition ends, rebalances and peers' kills are routine)"
    );

    verify_against_truth(&input, &outputs, &group, OUTPUT_PARTITIONS);
    eprintln!("verified ({:?})", started.elapsed());
}

/// Instance Z is stopped (SIGSTOP) with an open transaction for longer than the session
/// timeout; instance Y, with another transactional id, takes its partitions over and
/// makes progress; then Z resumes. Z's transaction cannot commit any more (its
/// generation is stale, its transaction timed out), so nothing Z wrote after the stop
/// becomes visible to read_committed readers, and the totals stay exact.
#[test]
fn zombie_is_fenced_and_its_writes_never_become_visible() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let event_time = EventTime::EOS;
    let stream = PacedInput::start(
        &rand_name("group-zombie-events"),
        event_time.generator(60_000, 29, PARTITIONS),
        true,
        3_000,
    );
    let outputs = fresh_outputs(&stream.topic);
    create_outputs(&outputs, OUTPUT_PARTITIONS);
    let group = rand_name("group-zombie");
    let mut zombie_config = ChildConfig::new(&group, event_time, OUTPUT_PARTITIONS).live_stream();
    // A long commit interval: Z is almost always inside an open transaction.
    zombie_config.commit_interval_ms = 4_000;
    let successor_config = ChildConfig::new(&group, event_time, OUTPUT_PARTITIONS).live_stream();

    let total = stream.total_offsets();
    let mut zombie = Member::spawn(
        &zombie_config,
        &outputs,
        PARTITIONS,
        dir.path(),
        "zombie",
        &rand_name("zombie"),
        &[],
    );
    wait_until(PROGRESS_TIMEOUT, "Z committed 10% of the input", || {
        assert!(
            zombie.process.try_status().is_none(),
            "Z exited early; log:\n{}",
            zombie.process.log_tail(40)
        );
        stream.committed(&group) >= total / 10
    });
    // Freeze Z 1.5 s after one of its commits: inside its next transaction, with work
    // written into it and the next commit (4 s interval) well ahead.
    let commits_seen = counter(&zombie.scrape_running(), COMMITS);
    wait_until(Duration::from_secs(30), "Z commits once more", || {
        counter(&zombie.scrape_running(), COMMITS) > commits_seen
    });
    thread::sleep(Duration::from_millis(1_500));
    let before_stop = zombie.scrape_running();
    zombie.process.signal("STOP");
    let stopped_at = stream.committed(&group);
    eprintln!(
        "Z stopped at {stopped_at}/{total} committed ({:?})",
        started.elapsed()
    );
    assert!(
        stopped_at < total,
        "Z was stopped in the middle of the input"
    );
    // Past the session timeout: the group expels Z.
    thread::sleep(Duration::from_secs(8));

    let mut successor = Member::spawn(
        &successor_config,
        &outputs,
        PARTITIONS,
        dir.path(),
        "successor",
        &rand_name("successor"),
        &[],
    );
    wait_until(PROGRESS_TIMEOUT, "Y took over and committed", || {
        assert!(
            successor.process.try_status().is_none(),
            "Y exited early; log:\n{}",
            successor.process.log_tail(40)
        );
        stream.committed(&group) > stopped_at + 1_000
    });
    eprintln!(
        "Y progressed to {} ({:?}); resuming Z",
        stream.committed(&group),
        started.elapsed()
    );
    zombie.process.signal("CONT");

    // Z's open transaction must fail (stale generation, fenced or timed-out producer):
    // an abort or a fatal restart, or an exit, before any further commit.
    let failures =
        |exposition: &Exposition| counter(exposition, ABORTS) + counter(exposition, FATAL_RESTARTS);
    let mut at_failure: Option<Option<Exposition>> = None;
    wait_until(
        Duration::from_secs(60),
        "Z reports its failed transaction",
        || match try_scrape(&zombie.metrics) {
            Some(exposition) if failures(&exposition) > failures(&before_stop) => {
                at_failure = Some(Some(exposition));
                true
            }
            Some(_) => false,
            None => {
                let exited = zombie.process.try_status().is_some();
                if exited {
                    at_failure = Some(None);
                }
                exited
            }
        },
    );
    assert!(
        counter(&before_stop, COMMITS) >= 1.0,
        "Z committed before the stop"
    );
    match at_failure.flatten() {
        Some(exposition) => {
            assert_eq!(
                counter(&exposition, COMMITS),
                counter(&before_stop, COMMITS),
                "Z committed nothing between its resume and its failure"
            );
            eprintln!(
                "Z after resume: aborts {} -> {}, fatal restarts {} -> {}",
                counter(&before_stop, ABORTS),
                counter(&exposition, ABORTS),
                counter(&before_stop, FATAL_RESTARTS),
                counter(&exposition, FATAL_RESTARTS)
            );
        }
        None => eprintln!("Z exited after its resume"),
    }

    let input = stream.finish();
    eprintln!("input: {}", input.describe());
    wait_until(PROGRESS_TIMEOUT, "the whole input is committed", || {
        assert!(
            successor.process.try_status().is_none(),
            "Y exited early; log:\n{}",
            successor.process.log_tail(40)
        );
        input_fully_committed(&input, &group)
    });
    let successor_errors = log_events(&successor.scrape_running(), "error");
    successor.terminate_cleanly(STOP_TIMEOUT);
    assert_eq!(successor_errors, 0.0, "Y logged no error");
    // Z either stopped on a fatal error or rejoined the group as a healthy member.
    let zombie_status = zombie.process.terminate(STOP_TIMEOUT);
    eprintln!("Z exited with {zombie_status} ({:?})", started.elapsed());

    verify_against_truth(&input, &outputs, &group, OUTPUT_PARTITIONS);
    // Z's aborted writes exist in the log but were never visible: read_uncommitted sees
    // more side records than read_committed, which matched the truth exactly above.
    let uncommitted_side = read_topic(&input.bootstrap, &outputs.late, OUTPUT_PARTITIONS, false)
        .len()
        + read_topic(&input.bootstrap, &outputs.dlq, OUTPUT_PARTITIONS, false).len();
    let committed_side = read_committed(&input.bootstrap, &outputs.late, OUTPUT_PARTITIONS).len()
        + read_committed(&input.bootstrap, &outputs.dlq, OUTPUT_PARTITIONS).len();
    eprintln!("side records: {uncommitted_side} written, {committed_side} committed");
    assert!(
        uncommitted_side > committed_side,
        "Z had written into its open transaction before the stop"
    );
}

/// Another producer initialises the aggregator's transactional id twice while it
/// works through a live stream: each time its producer is fenced (a fatal error), its
/// open transaction is aborted by the coordinator, and the process drops producer,
/// consumer and state and restores from the committed offsets without exiting. The
/// totals stay exact and `/metrics` counts both restarts.
#[test]
fn fenced_producer_restarts_in_process_from_the_committed_state() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let event_time = EventTime::EOS;
    let stream = PacedInput::start(
        &rand_name("group-fenced-events"),
        event_time.generator(60_000, 31, PARTITIONS),
        true,
        3_000,
    );
    let outputs = fresh_outputs(&stream.topic);
    create_outputs(&outputs, OUTPUT_PARTITIONS);
    let group = rand_name("group-fenced");
    let address = format!("127.0.0.1:{}", free_port());
    let mut config = ChildConfig::new(&group, event_time, OUTPUT_PARTITIONS).live_stream();
    config.commit_interval_ms = 1_000;
    config.metrics_listen = address.clone();
    let config = config.write(dir.path(), "fenced", &outputs, PARTITIONS);
    let instance = rand_name("fenced");
    let mut aggregator = AggregatorProcess::spawn(&config, &instance, dir.path(), "fenced", &[]);
    let total = stream.total_offsets();

    for (fencing, progress) in [(1, total / 10), (2, total / 2)] {
        wait_until(
            PROGRESS_TIMEOUT,
            "the aggregator committed part of the input",
            || {
                assert!(
                    aggregator.try_status().is_none(),
                    "the aggregator exited; log:\n{}",
                    aggregator.log_tail(40)
                );
                stream.committed(&group) >= progress
            },
        );
        let before = stream.committed(&group);
        // What a second process started with the same instance id does first.
        let imposter: BaseProducer = kafka_client(&stream.bootstrap)
            .set("transactional.id", format!("tally-aggregator-{instance}"))
            .create()
            .expect("imposter producer");
        imposter
            .init_transactions(Duration::from_secs(30))
            .expect("imposter fences the aggregator");
        drop(imposter);
        eprintln!(
            "fencing {fencing} at {before}/{total} committed ({:?})",
            started.elapsed()
        );
        wait_until(
            PROGRESS_TIMEOUT,
            "the aggregator restarted in process and committed again",
            || {
                assert!(
                    aggregator.try_status().is_none(),
                    "the aggregator exited instead of restarting; log:\n{}",
                    aggregator.log_tail(40)
                );
                counter(&parse(&scrape(&address)), FATAL_RESTARTS) >= f64::from(fencing)
                    && stream.committed(&group) > before
            },
        );
    }

    let input = stream.finish();
    eprintln!("input: {}", input.describe());
    wait_until(PROGRESS_TIMEOUT, "the whole input is committed", || {
        assert!(
            aggregator.try_status().is_none(),
            "the aggregator exited; log:\n{}",
            aggregator.log_tail(40)
        );
        input_fully_committed(&input, &group)
    });
    let exposition = parse(&scrape(&address));
    assert_eq!(
        exposition.sum(FATAL_RESTARTS),
        Some(2.0),
        "both fencings restarted the aggregator once, and nothing else did"
    );
    let status = aggregator.terminate(STOP_TIMEOUT);
    assert!(
        status.success(),
        "exits 0 on SIGTERM ({status}); log:\n{}",
        aggregator.log_tail(40)
    );
    verify_against_truth(&input, &outputs, &group, OUTPUT_PARTITIONS);
    eprintln!("done in {:?}", started.elapsed());
}

/// Windows that close only in event time: 1 s windows, short horizons.
const TICK_TIME: EventTime = EventTime {
    window_ms: 1_000,
    max_out_of_orderness_ms: 200,
    allowed_lateness_ms: 200,
    correction_horizon_ms: 0,
};
const IDLE_TIMEOUT_MS: i64 = 1_500;

/// Runs one aggregator process until it exits by itself after idling; returns its
/// last scrape of `/metrics` (taken every 200 ms while it ran).
fn run_until_idle_exit(
    child: &ChildConfig,
    topics: &TestTopics,
    partitions: i32,
    dir: &Path,
    name: &str,
) -> Exposition {
    let mut member = Member::spawn(
        child,
        topics,
        partitions,
        dir,
        name,
        &rand_name(name),
        &["--exit-after-idle-ms", "4000"],
    );
    let started = Instant::now();
    let mut last = None;
    let status = loop {
        if let Some(status) = member.process.try_status() {
            break status;
        }
        assert!(
            started.elapsed() < PROGRESS_TIMEOUT,
            "{name} did not exit; log:\n{}",
            member.process.log_tail(40)
        );
        if let Some(exposition) = try_scrape(&member.metrics) {
            last = Some(exposition);
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "{name} exits 0 ({status}); log:\n{}",
        member.process.log_tail(40)
    );
    last.unwrap_or_else(|| panic!("{name} was never scraped"))
}

/// Input without any gateway tick: the last windows of every partition stay open until
/// the aggregator, idle at the partition's end for `idle_timeout_ms`, appends a tick
/// to the partition (origin aggregator, time = the partition's largest event time plus
/// the idle time that passed) and reads it back. A replay of the same input topic,
/// ticks included, with a new group and new outputs gives the identical rows.
#[test]
fn idle_partition_gets_a_tick_and_closes_its_windows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let partitions = 3;
    let mut generator = TICK_TIME.generator(3_000, 31, partitions);
    generator.fractions = ClassFractions {
        out_of_order: 0.0,
        correction: 0.0,
        too_late: 0.0,
        duplicate: 0.0,
        conflicting_duplicate: 0.0,
        rejected: 0.0,
    };
    let input = produce_generated(&rand_name("group-idle-events"), generator, false);
    eprintln!("input: {}", input.describe());
    let outputs = fresh_outputs(&input.topic);
    create_outputs(&outputs, OUTPUT_PARTITIONS);
    let group = rand_name("group-idle");
    let mut child = ChildConfig::new(&group, TICK_TIME, OUTPUT_PARTITIONS);
    child.idle_timeout_ms = IDLE_TIMEOUT_MS;

    let run_started_ms = now_ms();
    let live = run_until_idle_exit(&child, &outputs, partitions, dir.path(), "live");
    let run_ended_ms = now_ms();
    assert_eq!(log_events(&live, "error"), 0.0, "a clean run logs no error");

    // The ticks in the input: appended after each partition's usage records, by the
    // aggregator, at least the idle timeout ahead of the partition's clock.
    let records = read_committed(&input.bootstrap, &input.topic, partitions);
    let mut max_event: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    let mut ticks: BTreeMap<i32, Vec<(i64, i64, Option<i64>)>> = BTreeMap::new();
    for record in &records {
        match decode_record(&record.value).expect("input record decodes") {
            Decoded::Usage(event) => {
                let entry = max_event
                    .entry(record.partition)
                    .or_insert((i64::MIN, i64::MIN));
                entry.0 = entry.0.max(event.occurred_at_ms);
                entry.1 = entry.1.max(record.offset);
            }
            Decoded::Tick(tick) => {
                assert_eq!(
                    tick.origin,
                    TickOrigin::Aggregator,
                    "only the aggregator ticks"
                );
                ticks.entry(record.partition).or_default().push((
                    record.offset,
                    tick.tick_time_ms,
                    record.timestamp_ms,
                ));
            }
        }
    }
    let run_ms = run_ended_ms - run_started_ms;
    for partition in 0..partitions {
        let (max_event_ms, last_usage_offset) = max_event[&partition];
        let partition_ticks = ticks
            .get(&partition)
            .unwrap_or_else(|| panic!("partition {partition} got no tick"));
        let (first_offset, first_time, first_timestamp) = partition_ticks[0];
        assert!(
            first_offset > last_usage_offset,
            "the tick follows partition {partition}'s usage records"
        );
        let ahead = first_time - max_event_ms;
        assert!(
            (IDLE_TIMEOUT_MS..=run_ms).contains(&ahead),
            "partition {partition}: tick {ahead} ms past the largest event time, \
             expected between the idle timeout and the run's length ({run_ms} ms)"
        );
        assert_eq!(
            first_timestamp,
            Some(first_time - ValidationLimits::DEFAULT_MAX_EVENT_TIME_AHEAD_MS),
            "a tick's record timestamp is its time less the allowed skew"
        );
        let times: Vec<i64> = partition_ticks.iter().map(|tick| tick.1).collect();
        assert!(
            times.windows(2).all(|pair| pair[0] < pair[1]),
            "later ticks move the clock forward: {times:?}"
        );
    }
    let checkpoints = committed_checkpoints(&input.bootstrap, &group, &input.topic, partitions);
    for (partition, (_offset, checkpoint)) in &checkpoints {
        assert_eq!(
            checkpoint.counters.ticks,
            ticks[partition].len() as u64,
            "partition {partition} read back every tick written to it"
        );
    }

    // The last windows were emitted (only a tick can have closed them), exactly.
    let rows = verify_against_truth(&input, &outputs, &group, OUTPUT_PARTITIONS);
    let last_window = input
        .truth
        .windows
        .iter()
        .map(|window| window.window_start_ms)
        .max()
        .expect("windows");
    let emitted_windows: BTreeSet<i64> = rows
        .iter()
        .map(|(_, value)| decode_aggregate(value).expect("row").window_start_ms)
        .collect();
    assert!(
        emitted_windows.contains(&last_window),
        "the last window ({last_window}) was emitted"
    );

    // Replay: same input (the ticks are part of it now), new group and outputs.
    let replay_outputs = fresh_outputs(&input.topic);
    create_outputs(&replay_outputs, OUTPUT_PARTITIONS);
    let mut replay_child = ChildConfig::new(
        &rand_name("group-idle-replay"),
        TICK_TIME,
        OUTPUT_PARTITIONS,
    );
    replay_child.idle_timeout_ms = IDLE_TIMEOUT_MS;
    let replay = run_until_idle_exit(
        &replay_child,
        &replay_outputs,
        partitions,
        dir.path(),
        "replay",
    );
    assert_eq!(
        log_events(&replay, "error"),
        0.0,
        "a clean replay logs no error"
    );
    let mut replay_rows: Vec<(Vec<u8>, Vec<u8>)> = read_committed(
        &input.bootstrap,
        &replay_outputs.billing_aggregates,
        OUTPUT_PARTITIONS,
    )
    .into_iter()
    .map(|record| (record.key.unwrap_or_default(), record.value))
    .collect();
    replay_rows.sort();
    assert_eq!(rows.len(), replay_rows.len(), "replay row count");
    assert!(rows == replay_rows, "the replay emits the identical rows");
}

/// Label names a tally metric may carry (plus the histogram's `le`; `level` is the
/// log level of `tally_log_events_total`).
const ALLOWED_LABELS: [&str; 9] = [
    "level",
    "reason",
    "topic",
    "partition",
    "cloud",
    "partner",
    "kind",
    "model",
    "le",
];

/// Required metric families and their types (DESIGN.md, "Metrics").
const REQUIRED: [(&str, &str); 13] = [
    ("tally_aggregator_consumed_records_total", "counter"),
    ("tally_aggregator_emitted_rows_total", "counter"),
    ("tally_aggregator_too_late_events_total", "counter"),
    ("tally_aggregator_duplicate_events_total", "counter"),
    ("tally_aggregator_rejected_records_total", "counter"),
    ("tally_aggregator_ticks_read_total", "counter"),
    ("tally_aggregator_ticks_written_total", "counter"),
    ("tally_aggregator_consumer_lag_records", "gauge"),
    ("tally_aggregator_watermark_delay_seconds", "gauge"),
    ("tally_aggregator_transaction_commit_seconds", "histogram"),
    ("tally_aggregator_window_emit_latency_seconds", "histogram"),
    ("tally_aggregator_open_windows", "gauge"),
    ("tally_aggregator_state_bytes", "gauge"),
];

fn metric(exposition: &Exposition, name: &str) -> f64 {
    exposition
        .sum(name)
        .unwrap_or_else(|| panic!("{name} is missing"))
}

/// Whether a scrape shows the settled run: every record counted, every partition's
/// lag and watermark delay reported, lag zero.
fn settled(exposition: &Exposition, produced: u64) -> bool {
    let lags: Vec<f64> = exposition
        .samples_named("tally_aggregator_consumer_lag_records")
        .map(|sample| sample.value)
        .collect();
    exposition.sum("tally_aggregator_consumed_records_total") == Some(produced as f64)
        && lags.len() == PARTITIONS as usize
        && lags.iter().all(|lag| *lag == 0.0)
        && exposition
            .samples_named("tally_aggregator_watermark_delay_seconds")
            .count()
            == PARTITIONS as usize
        && exposition.sum("tally_aggregator_open_windows").is_some()
}

/// The `/metrics` endpoint of a finished run reports every metric DESIGN.md requires,
/// with HELP and TYPE, bounded labels only, and counters equal to the run's truth.
#[test]
fn metrics_endpoint_reports_the_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let event_time = EventTime::EOS;
    let input = produce_generated(
        &rand_name("group-metrics-events"),
        event_time.generator(20_000, 37, PARTITIONS),
        true,
    );
    eprintln!("input: {}", input.describe());
    let outputs = fresh_outputs(&input.topic);
    create_outputs(&outputs, OUTPUT_PARTITIONS);
    let group = rand_name("group-metrics");
    let address = format!("127.0.0.1:{}", free_port());
    let mut child = ChildConfig::new(&group, event_time, OUTPUT_PARTITIONS);
    child.metrics_listen = address.clone();
    let config = child.write(dir.path(), "metrics", &outputs, PARTITIONS);
    let run_started_ms = now_ms();
    let mut process =
        AggregatorProcess::spawn(&config, &rand_name("metrics"), dir.path(), "metrics", &[]);
    wait_until(PROGRESS_TIMEOUT, "the whole input is committed", || {
        assert!(
            process.try_status().is_none(),
            "the aggregator exited early; log:\n{}",
            process.log_tail(40)
        );
        input_fully_committed(&input, &group)
    });

    // Poll until the gauges caught up and two scrapes in a row agree.
    let truth = &input.truth;
    let started = Instant::now();
    let mut previous: Option<Exposition> = None;
    let exposition = loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the metrics did not settle; last scrape:\n{previous:#?}"
        );
        let current = parse(&scrape(&address));
        if settled(&current, truth.produced)
            && previous.as_ref().is_some_and(|before| {
                REQUIRED.iter().all(|(name, _)| {
                    before.sum(name) == current.sum(name)
                        && before.sum(&format!("{name}_count"))
                            == current.sum(&format!("{name}_count"))
                })
            })
        {
            break current;
        }
        previous = Some(current);
        thread::sleep(Duration::from_millis(1_000));
    };
    let scraped_ms = now_ms();

    // Every required family, with HELP and TYPE.
    for (name, kind) in REQUIRED {
        assert_eq!(
            exposition.types.get(name).map(String::as_str),
            Some(kind),
            "TYPE of {name}"
        );
        assert!(
            exposition
                .help
                .get(name)
                .is_some_and(|help| !help.is_empty()),
            "HELP of {name}"
        );
    }
    // Bounded labels only: small fixed sets, no tenant ids.
    for sample in &exposition.samples {
        if !sample.name.starts_with("tally_") {
            continue;
        }
        for (label, value) in &sample.labels {
            assert!(
                ALLOWED_LABELS.contains(&label.as_str()),
                "{} carries label {label}",
                sample.name
            );
            assert!(
                !value.contains("tenant"),
                "{} carries a tenant id: {value}",
                sample.name
            );
            if label == "partition" {
                let partition: i32 = value.parse().expect("numeric partition label");
                assert!((0..PARTITIONS).contains(&partition));
            }
        }
    }

    // The counters equal the run.
    let rows = read_committed(
        &input.bootstrap,
        &outputs.billing_aggregates,
        OUTPUT_PARTITIONS,
    );
    let checkpoints = committed_checkpoints(&input.bootstrap, &group, &input.topic, PARTITIONS);
    let ticks_read: u64 = checkpoints
        .values()
        .map(|(_, checkpoint)| checkpoint.counters.ticks)
        .sum();
    assert_eq!(
        metric(&exposition, "tally_aggregator_consumed_records_total"),
        truth.produced as f64
    );
    assert_eq!(
        metric(&exposition, "tally_aggregator_too_late_events_total"),
        truth.too_late as f64
    );
    assert_eq!(
        metric(&exposition, "tally_aggregator_rejected_records_total"),
        truth.rejected as f64
    );
    let mut rejected_by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for sample in exposition.samples_named("tally_aggregator_rejected_records_total") {
        if sample.value > 0.0 {
            rejected_by_reason.insert(sample.labels["reason"].clone(), sample.value as u64);
        }
    }
    assert_eq!(
        rejected_by_reason,
        expected_dlq_reasons(truth),
        "rejected by reason"
    );
    assert_eq!(
        metric(&exposition, "tally_aggregator_duplicate_events_total"),
        truth.duplicates as f64
    );
    assert_eq!(
        exposition.sum_where(
            "tally_aggregator_duplicate_events_total",
            "kind",
            "conflicting"
        ),
        truth.conflicting_duplicates as f64
    );
    assert_eq!(
        metric(&exposition, "tally_aggregator_corrections_total"),
        truth.counted_corrections as f64
    );
    assert_eq!(
        metric(&exposition, "tally_aggregator_emitted_rows_total"),
        rows.len() as f64
    );
    assert_eq!(
        metric(&exposition, "tally_aggregator_ticks_read_total"),
        ticks_read as f64
    );
    assert_eq!(
        exposition.sum_where("tally_aggregator_tokens_total", "kind", "input"),
        truth.total_counted_sums().input_tokens as f64,
        "input tokens"
    );
    // Revenue by cloud and partner shares by (cloud, beneficiary) equal the rows'.
    let mut gross_by_cloud: BTreeMap<String, i64> = BTreeMap::new();
    let mut shares: BTreeMap<(String, String), i64> = BTreeMap::new();
    for record in &rows {
        let row = decode_aggregate(&record.value).expect("row");
        let cloud = row.dims.cloud.as_str().to_owned();
        *gross_by_cloud.entry(cloud.clone()).or_default() += row.gross_micros;
        for share in &row.shares {
            *shares
                .entry((cloud.clone(), share.beneficiary.clone()))
                .or_default() += share.amount_micros;
        }
    }
    assert!(
        !shares.is_empty(),
        "the run priced rows with partner shares"
    );
    for (cloud, gross) in &gross_by_cloud {
        assert_eq!(
            exposition.sum_where("tally_aggregator_gross_micros_total", "cloud", cloud),
            *gross as f64,
            "gross micros of {cloud}"
        );
    }
    // Every (cloud, beneficiary) of the contracts exists from the start; those without
    // a share in this run stay at 0.
    let scraped_shares: BTreeMap<(String, String), i64> = exposition
        .samples_named("tally_aggregator_partner_share_micros_total")
        .filter(|sample| sample.value > 0.0)
        .map(|sample| {
            (
                (
                    sample.labels["cloud"].clone(),
                    sample.labels["partner"].clone(),
                ),
                sample.value as i64,
            )
        })
        .collect();
    assert_eq!(
        scraped_shares, shares,
        "partner shares by cloud and partner"
    );
    assert_eq!(metric(&exposition, "tally_aggregator_open_windows"), 0.0);
    assert!(
        metric(
            &exposition,
            "tally_aggregator_transaction_commit_seconds_count"
        ) >= 1.0
    );

    // One emit-latency observation per row: commit time − window end, so the sum lies
    // between Σ(run start − end) and Σ(scrape − end).
    let latency_count = metric(
        &exposition,
        "tally_aggregator_window_emit_latency_seconds_count",
    );
    assert_eq!(
        latency_count,
        rows.len() as f64,
        "one latency per emitted row"
    );
    let window_end_sum: i128 = rows
        .iter()
        .map(|record| i128::from(decode_aggregate(&record.value).expect("row").window_end_ms))
        .sum();
    let row_count = i128::try_from(rows.len()).expect("small");
    let lower = (i128::from(run_started_ms) * row_count - window_end_sum) as f64 / 1000.0;
    let upper = (i128::from(scraped_ms) * row_count - window_end_sum) as f64 / 1000.0;
    let latency_sum = metric(
        &exposition,
        "tally_aggregator_window_emit_latency_seconds_sum",
    );
    assert!(
        latency_sum >= lower * (1.0 - 1e-9) && latency_sum <= upper * (1.0 + 1e-9),
        "emit latency sum {latency_sum} outside [{lower}, {upper}]"
    );
    assert_eq!(
        exposition.sum_where(
            "tally_aggregator_window_emit_latency_seconds_bucket",
            "le",
            "+Inf"
        ),
        latency_count
    );

    let errors = log_events(&parse(&scrape(&address)), "error");
    let status = process.terminate(STOP_TIMEOUT);
    assert!(status.success(), "exits 0 on SIGTERM ({status})");
    assert_eq!(errors, 0.0, "a clean run logs no error");
}

#[test]
fn prometheus_parser_reads_help_type_labels_and_values() {
    let text = "# HELP a_total Things.\n# TYPE a_total counter\n\
                a_total{reason=\"x\\\"y\",kind=\"k\"} 3\nb 1.5\nc_bucket{le=\"+Inf\"} 2\n";
    let parsed = parse(text);
    assert_eq!(parsed.help["a_total"], "Things.");
    assert_eq!(parsed.types["a_total"], "counter");
    assert_eq!(parsed.samples[0].labels["reason"], "x\"y");
    assert_eq!(parsed.samples[0].labels["kind"], "k");
    assert_eq!(parsed.sum("a_total"), Some(3.0));
    assert_eq!(parsed.sum("b"), Some(1.5));
    assert_eq!(parsed.sum("missing"), None);
    assert_eq!(parsed.sum_where("c_bucket", "le", "+Inf"), 2.0);
}

/// The partitions a member owns or restores (assigned minus revoked).
fn assigned_now(member: &mut Member) -> f64 {
    let exposition = member.scrape_running();
    counter(&exposition, "tally_aggregator_partition_assignments_total")
        - counter(&exposition, "tally_aggregator_partition_revocations_total")
}

/// Three members SIGTERMed at the same moment, while records arrive and while their
/// rebalance cannot finish, each exit 0 within 5 s; two restarted members then finish
/// the input exactly.
///
/// A, B and Z share the partitions; Z is frozen (SIGSTOP) and C joins. The coordinator
/// holds the `JoinGroup` requests of A, B and C until Z rejoins or its session (12 s
/// here) times out, and a member's `LeaveGroup` waits behind its own `JoinGroup` on
/// the coordinator's connection. A, B and C are SIGTERMed 4 s after C started: a
/// member whose exit waits for its leave exits at the earliest ~7 s after the SIGTERM.
/// Assignments that reach a stopping member are not restored, and its transaction
/// calls are time-limited.
#[test]
fn three_members_sigtermed_at_once_each_exit_within_five_seconds() {
    const STOP_WITHIN: Duration = Duration::from_secs(5);
    const SESSION_TIMEOUT_MS: &str = "12000";
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let event_time = EventTime::EOS;
    let stream = PacedInput::start(
        &rand_name("group-stop-events"),
        event_time.generator(60_000, 31, PARTITIONS),
        true,
        // 30 s of input: the SIGTERMs land while records arrive, however slowly the
        // members start on a loaded machine.
        2_000,
    );
    let outputs = fresh_outputs(&stream.topic);
    create_outputs(&outputs, OUTPUT_PARTITIONS);
    let group = rand_name("group-stop");
    let child = ChildConfig::new(&group, event_time, OUTPUT_PARTITIONS)
        .live_stream()
        .with_client(&[("session.timeout.ms", SESSION_TIMEOUT_MS)]);
    let suffix = rand_name("");
    let spawn = |name: &str| {
        Member::spawn(
            &child,
            &outputs,
            PARTITIONS,
            dir.path(),
            name,
            &format!("{name}{suffix}"),
            &[],
        )
    };
    let mut members: Vec<Member> = ["a", "b", "z"].into_iter().map(spawn).collect();
    wait_until(PROGRESS_TIMEOUT, "A, B and Z share the partitions", || {
        let owned: Vec<f64> = members.iter_mut().map(assigned_now).collect();
        owned.iter().all(|count| *count > 0.0) && owned.iter().sum::<f64>() == f64::from(PARTITIONS)
    });
    wait_until(PROGRESS_TIMEOUT, "the group's first commit", || {
        stream.committed(&group) > 0
    });
    // Read before the freeze: a committed-offset query can wait for the rebalance.
    let committed_before = stream.committed(&group);
    let mut frozen_member = members.pop().expect("z");
    frozen_member.process.signal("STOP");
    let frozen = Instant::now();
    members.push(spawn("c"));
    assert!(members[2].scrape().is_some(), "C runs");
    // C's JoinGroup starts the rebalance; A and B rejoin at their next heartbeat (1 s).
    thread::sleep(Duration::from_secs(4));
    let producing_at_term = stream.producing();
    let term_sent = Instant::now();
    for member in &mut members {
        member.process.signal("TERM");
    }
    let term_after_freeze = term_sent.duration_since(frozen);
    assert!(
        term_after_freeze < Duration::from_secs(7),
        "the SIGTERMs came well inside Z's session timeout ({term_after_freeze:?} after the freeze)"
    );
    for member in &mut members {
        let status = member.process.wait_timeout(STOP_WITHIN).unwrap_or_else(|| {
            panic!(
                "{} still runs {STOP_WITHIN:?} after SIGTERM; log:\n{}",
                member.process.instance_id,
                member.process.log_tail(40)
            )
        });
        assert!(
            status.success(),
            "{} exits 0 on SIGTERM ({status}); log:\n{}",
            member.process.instance_id,
            member.process.log_tail(40)
        );
    }
    let total = stream.total_offsets();
    eprintln!(
        "A, B and C exited {:?} after SIGTERM, sent {term_after_freeze:?} after Z was frozen, \
         at {committed_before}/{total} committed before the freeze ({:?})",
        term_sent.elapsed(),
        started.elapsed()
    );
    assert!(
        producing_at_term,
        "the SIGTERMs landed while records still arrived"
    );
    frozen_member.process.kill();

    let mut restarted: Vec<Member> = ["d", "e"].into_iter().map(spawn).collect();
    let input = stream.finish();
    wait_until(PROGRESS_TIMEOUT, "the whole input is committed", || {
        for member in &mut restarted {
            if let Some(status) = member.process.try_status() {
                panic!(
                    "{} exited on its own ({status}); log:\n{}",
                    member.process.instance_id,
                    member.process.log_tail(40)
                );
            }
        }
        input_fully_committed(&input, &group)
    });
    for member in &mut restarted {
        member.terminate_cleanly(STOP_TIMEOUT);
    }
    verify_against_truth(&input, &outputs, &group, OUTPUT_PARTITIONS);
    eprintln!("verified ({:?})", started.elapsed());
}
