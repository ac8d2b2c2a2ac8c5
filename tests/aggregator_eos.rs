//! Exactly-once tests of `tally-aggregator` against a real Kafka broker.
//!
//! Needs `TALLY_TEST_BOOTSTRAP` (see `deploy/local/kafka.sh start`). Every test uses
//! its own random topic and group names. Input comes from `tally-gen`'s
//! deterministic generator, whose ground truth is computed independently of the
//! aggregator; each input partition ends with a gateway tick far in the future, so
//! every window and correction pane closes at a fixed input offset.
//!
//! Checked after every run, from read_committed reads of the outputs:
//! - Σ event counts and token sums of all rows per (window, dims) = the truth's counted
//!   events, on time and corrections split as the truth says;
//! - every row id appears once;
//! - usage.late holds exactly the too-late events and usage.dlq exactly the rejected
//!   records, with the expected reasons;
//! - the committed checkpoints' counters equal the truth per partition and conserve
//!   `consumed = counted + duplicates + too_late + rejected`.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::TestTopics;
use support::eos::{
    EventTime, GeneratedInput, ProducerTuning, committed_checkpoints, committed_offset_sum,
    create_outputs, create_topics, fresh_outputs, produce_generated, produce_generated_with,
    produce_into, read_committed, verify_against_truth_with,
};
use support::money::TruthContracts;
use support::{bootstrap, rand_name};
use tally_aggregator::{AggregatorError, AggregatorSettings, ExitReason, RunSummary, StartFrom};
use tally_core::codec::decode_aggregate;
use tally_core::config::Config;
use tally_core::contracts::Contracts;
use tally_core::semantics::Change;
use tally_core::timefmt::format_utc_ms;
use tally_core::window::WindowSize;
use tally_gen::{Generator, RecordClass};

const PARTITIONS: i32 = 4;
const EVENT_TIME: EventTime = EventTime::EOS;
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

const CONTRACTS: &str = r#"
[[price_book]]
version = "2024-01"
effective_from = "2024-01-01T00:00:00Z"
currency = "USD"
billable_statuses = ["succeeded"]

[price_book.models.atlas-large]
input = 2_500_000_000
cached_input = 1_250_000_000
output = 10_000_000_000
reasoning = 10_000_000_000

[price_book.models.atlas-mini]
input = 150_000_000
cached_input = 37_500_000
output = 600_000_000
reasoning = 600_000_000

[price_book.models.atlas-reasoning]
input = 15_000_000_000
cached_input = 7_500_000_000
output = 60_000_000_000
reasoning = 60_000_000_000

[price_book.models.atlas-embed]
input = 20_000_000
cached_input = 10_000_000
output = 0
reasoning = 0

[[share_rules]]
version = "2024-01"
effective_from = "2024-01-01T00:00:00Z"

[[share_rules.rules]]
cloud = "aws"
beneficiaries = [{ partner = "aws", basis_points = 2000 }]

[[share_rules.rules]]
cloud = "azure"
channel_partner = "contoso"
beneficiaries = [{ partner = "microsoft", basis_points = 2250 }, { partner = "contoso", basis_points = 500 }]
"#;

/// Creates an input topic, produces `count` generated records and a far-future gateway
/// tick to every partition.
fn produce_input(count: u64, seed: u64) -> GeneratedInput {
    produce_generated(
        &rand_name("agg-test-events"),
        EVENT_TIME.generator(count, seed, PARTITIONS),
        true,
    )
}

/// [`produce_input`] in record batches of at most 50 records, so that
/// [`slow_fetches`] can slow a consumer down (a fetch never splits a batch).
fn produce_input_in_small_batches(count: u64, seed: u64) -> GeneratedInput {
    produce_generated_with(
        &rand_name("agg-test-events"),
        EVENT_TIME.generator(count, seed, PARTITIONS),
        true,
        ProducerTuning::batches(50),
    )
}

/// Fresh output topics over `input`, created.
fn new_outputs(input: &GeneratedInput) -> TestTopics {
    let outputs = fresh_outputs(&input.topic);
    create_outputs(&outputs, PARTITIONS);
    outputs
}

/// Checks one run's outputs against the truth (see
/// `support::eos::verify_against_truth`); returns the aggregate rows (key, value).
fn verify_run(
    input: &GeneratedInput,
    outputs: &TestTopics,
    group: &str,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let truth = &input.truth;
    assert!(truth.counted > 0 && truth.duplicates > 0 && truth.too_late > 0 && truth.rejected > 0);
    assert!(
        truth.counted_corrections > 0,
        "the input must exercise corrections"
    );
    verify_against_truth_with(
        input,
        outputs,
        group,
        PARTITIONS,
        &TruthContracts::parse(CONTRACTS),
    )
}

fn settings(input: &GeneratedInput, outputs: &TestTopics, group: &str) -> AggregatorSettings {
    let mut config = Config::default();
    config.kafka.bootstrap_servers = input.bootstrap.clone();
    config
        .kafka
        .client
        .insert("session.timeout.ms".to_owned(), "6000".to_owned());
    config
        .kafka
        .client
        .insert("heartbeat.interval.ms".to_owned(), "1000".to_owned());
    config.topics.usage_events = input.topic.clone();
    config.topics.billing_aggregates = outputs.billing_aggregates.clone();
    config.topics.late = outputs.late.clone();
    config.topics.dlq = outputs.dlq.clone();
    config.topics.checkpoints = outputs.checkpoints.clone();
    config.topics.partitions = PARTITIONS;
    config.topics.output_partitions = PARTITIONS;
    config.topics.replication_factor = 1;
    config.aggregator.group_id = group.to_owned();
    config.aggregator.window_ms = EVENT_TIME.window_ms;
    config.aggregator.max_out_of_orderness_ms = EVENT_TIME.max_out_of_orderness_ms;
    config.aggregator.allowed_lateness_ms = EVENT_TIME.allowed_lateness_ms;
    config.aggregator.correction_horizon_ms = EVENT_TIME.correction_horizon_ms;
    config.aggregator.dedupe_horizon_ms = EVENT_TIME.dedupe_horizon_ms();
    config.aggregator.idle_timeout_ms = 500;
    config.aggregator.commit_interval_ms = 200;
    config.aggregator.transaction_timeout_ms = 10_000;
    let window = WindowSize::new(EVENT_TIME.window_ms).expect("window divides 15 minutes");
    let contracts = Contracts::load(CONTRACTS, window).expect("test contracts load");
    let mut settings = AggregatorSettings::new(config, contracts, rand_name("test"));
    settings.start_from = Some(StartFrom::Earliest);
    settings.exit_after_idle = Some(Duration::from_millis(1_500));
    settings
}

/// Runs the aggregator on a thread until it exits by itself (or the timeout).
fn run_aggregator(settings: AggregatorSettings) -> Result<RunSummary, AggregatorError> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&shutdown);
    let handle = thread::spawn(move || tally_aggregator::run(settings, flag));
    let started = Instant::now();
    while !handle.is_finished() {
        if started.elapsed() > RUN_TIMEOUT {
            shutdown.store(true, Ordering::SeqCst);
            let _ = handle.join();
            panic!("the aggregator did not settle within {RUN_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    handle.join().expect("aggregator thread panicked")
}

/// Runs the aggregator until its group has committed at least `offsets` input offsets
/// (summed over partitions), then raises the shutdown flag: a stop in mid-input.
fn run_aggregator_until_committed(
    settings: AggregatorSettings,
    group: &str,
    topic: &str,
    offsets: i64,
) -> Result<RunSummary, AggregatorError> {
    let bootstrap = settings.config.kafka.bootstrap_servers.clone();
    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&shutdown);
    let handle = thread::spawn(move || tally_aggregator::run(settings, flag));
    let started = Instant::now();
    while committed_offset_sum(&bootstrap, group, topic, PARTITIONS) < offsets
        && !handle.is_finished()
    {
        assert!(
            started.elapsed() < RUN_TIMEOUT,
            "no progress to {offsets} committed offsets"
        );
        thread::sleep(Duration::from_millis(10));
    }
    shutdown.store(true, Ordering::SeqCst);
    handle.join().expect("aggregator thread panicked")
}

/// Small fetches, and a 1 ms pause before a partition is fetched again while its
/// prefetch queue holds anything: over input in small record batches the aggregator
/// then takes seconds over 20 000 records, so stops and aborts land in the
/// middle of it.
fn slow_fetches(settings: &mut AggregatorSettings) {
    let client = &mut settings.config.kafka.client;
    client.insert("max.partition.fetch.bytes".to_owned(), "4096".to_owned());
    client.insert("fetch.wait.max.ms".to_owned(), "20".to_owned());
    client.insert("queued.min.messages".to_owned(), "1".to_owned());
    client.insert("fetch.queue.backoff.ms".to_owned(), "1".to_owned());
}

#[test]
fn aggregates_equal_ground_truth_and_counters_conserve() {
    let input = produce_input(30_000, 7);
    eprintln!("input: {}", input.describe());
    let outputs = new_outputs(&input);
    let group = rand_name("agg-test-group");
    let summary = run_aggregator(settings(&input, &outputs, &group)).expect("aggregator run");
    eprintln!("summary: {summary:?}");
    assert_eq!(summary.exit, ExitReason::Idle);
    assert!(summary.rows_emitted > 0);
    assert_eq!(summary.transactions_aborted, 0);
    let rows = verify_run(&input, &outputs, &group);
    assert_eq!(rows.len() as u64, summary.rows_emitted);
}

#[test]
fn aborted_transactions_and_restarts_change_nothing() {
    let input = produce_input_in_small_batches(20_000, 11);
    eprintln!("input: {}", input.describe());

    // Uninterrupted reference run.
    let reference = new_outputs(&input);
    let reference_group = rand_name("agg-test-group");
    run_aggregator(settings(&input, &reference, &reference_group)).expect("reference run");
    let reference_rows = verify_run(&input, &reference, &reference_group);

    // Every third transaction aborted.
    let aborting = new_outputs(&input);
    let aborting_group = rand_name("agg-test-group");
    let mut abort_settings = settings(&input, &aborting, &aborting_group);
    abort_settings.abort_every = std::num::NonZeroU32::new(3);
    // Many small transactions, so many of them abort.
    abort_settings.commit_interval = Duration::from_millis(20);
    slow_fetches(&mut abort_settings);
    let summary = run_aggregator(abort_settings).expect("aborting run");
    eprintln!("aborting run: {summary:?}");
    assert!(
        summary.transactions_aborted > 0,
        "the hook aborted transactions"
    );
    assert!(
        summary.records_restored > 0,
        "partitions changed in aborted transactions were rebuilt from their checkpoints"
    );
    let aborting_rows = verify_run(&input, &aborting, &aborting_group);
    assert_eq!(
        aborting_rows, reference_rows,
        "rows with aborts equal the uninterrupted rows"
    );

    // Stopped and restarted several times: each restart restores from the checkpoint.
    let restarted = new_outputs(&input);
    let restarted_group = rand_name("agg-test-group");
    let mut base = settings(&input, &restarted, &restarted_group);
    base.commit_interval = Duration::from_millis(50);
    slow_fetches(&mut base);
    let mut restored = 0;
    let mut committed_offsets = Vec::new();
    let total = i64::try_from(input.truth.produced).expect("small") + i64::from(PARTITIONS);
    for percent in [20_i64, 45, 70] {
        let summary = run_aggregator_until_committed(
            base.clone(),
            &restarted_group,
            &input.topic,
            total * percent / 100,
        )
        .expect("partial run");
        restored += summary.records_restored;
        committed_offsets.push(committed_offset_sum(
            &input.bootstrap,
            &restarted_group,
            &input.topic,
            PARTITIONS,
        ));
    }
    eprintln!("committed offsets after each stop: {committed_offsets:?}");
    assert!(
        committed_offsets[0] < total,
        "the first stop landed in the middle of the input: {committed_offsets:?} of {total}"
    );
    let mut last = base.clone();
    // Committed offsets win: no start position is needed any more.
    last.start_from = None;
    let summary = run_aggregator(last).expect("final run");
    restored += summary.records_restored;
    eprintln!("restarted runs restored {restored} records");
    assert!(restored > 0, "restarts re-read input to rebuild state");
    let restarted_rows = verify_run(&input, &restarted, &restarted_group);
    assert_eq!(
        restarted_rows, reference_rows,
        "rows with restarts equal the uninterrupted rows"
    );
}

/// Partition tasks on several worker threads decide exactly what one thread decides:
/// the same rows, byte for byte. The input is preloaded, so the first fetches bring
/// every partition's records at once and batches span partitions: the parallel path
/// really runs.
#[test]
fn worker_threads_change_nothing() {
    let input = produce_input(20_000, 13);
    eprintln!("input: {}", input.describe());
    let mut rows = Vec::new();
    for threads in [1_u32, 4] {
        let outputs = new_outputs(&input);
        let group = rand_name("agg-test-group");
        let mut run_settings = settings(&input, &outputs, &group);
        run_settings.config.aggregator.worker_threads = threads;
        let summary = run_aggregator(run_settings).expect("aggregator run");
        eprintln!("{threads} worker threads: {summary:?}");
        if threads == 1 {
            assert_eq!(summary.parallel_batches, 0, "one thread never forks");
        } else {
            assert!(
                summary.parallel_batches > 0,
                "batches were processed as parallel partition tasks"
            );
        }
        rows.push(verify_run(&input, &outputs, &group));
    }
    assert_eq!(rows[0], rows[1], "rows are identical with 1 and 4 threads");
}

#[test]
fn refuses_to_start_a_new_group_without_a_start_position() {
    let bootstrap = bootstrap();
    let topic = rand_name("agg-test-events");
    let outputs = fresh_outputs(&topic);
    create_topics(
        &bootstrap,
        &[
            &topic,
            &outputs.billing_aggregates,
            &outputs.late,
            &outputs.dlq,
        ],
        PARTITIONS,
    );
    let input = GeneratedInput {
        bootstrap,
        topic: topic.clone(),
        partitions: PARTITIONS,
        truth: Generator::new(EVENT_TIME.generator(1, 1, PARTITIONS))
            .expect("config")
            .truth(),
        end_tick: false,
    };
    let mut settings = settings(&input, &outputs, &rand_name("agg-test-group"));
    settings.start_from = None;
    let error =
        run_aggregator(settings).expect_err("a new group without --start-from must not start");
    let message = error.to_string();
    assert!(
        matches!(error, AggregatorError::NoStartPosition { .. }),
        "{message}"
    );
    assert!(message.contains(&topic), "{message}");
    assert!(message.contains("--start-from"), "{message}");
}

/// Keeps `RecordClass` in use: the generator's classes are what the truth counts.
#[test]
fn generator_produces_every_class_for_these_parameters() {
    let mut generator =
        Generator::new(EVENT_TIME.generator(20_000, 11, PARTITIONS)).expect("config");
    let mut seen = BTreeMap::new();
    while let Some(record) = generator.next_record() {
        let name = match record.class {
            RecordClass::OnTime | RecordClass::OutOfOrder => "on_time",
            RecordClass::Correction => "correction",
            RecordClass::TooLate => "too_late",
            RecordClass::Duplicate | RecordClass::ConflictingDuplicate => "duplicate",
            RecordClass::Rejected(_) => "rejected",
        };
        *seen.entry(name).or_insert(0_u64) += 1;
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
}

/// Runs the aggregator with `settings` and returns the changes it refused to restart
/// under (it must refuse).
fn refused_changes(settings: AggregatorSettings) -> Vec<Change> {
    match run_aggregator(settings) {
        Err(AggregatorError::SemanticsChanged { source, .. }) => source.changes,
        other => panic!("expected a refusal for changed semantics, got {other:?}"),
    }
}

/// `settings` with another contracts text.
fn with_contracts(mut settings: AggregatorSettings, text: &str) -> AggregatorSettings {
    let window = WindowSize::new(settings.config.aggregator.window_ms).expect("window");
    settings.contracts = Contracts::load(text, window).expect("test contracts load");
    settings
}

/// The test contracts plus a price-book version `label` from `effective_from_ms` with
/// every price doubled.
fn contracts_with_new_version(label: &str, effective_from_ms: i64) -> String {
    let book_start = CONTRACTS.find("[[price_book]]").expect("a price book");
    let rules_start = CONTRACTS.find("[[share_rules]]").expect("share rules");
    let mut book = CONTRACTS[book_start..rules_start]
        .replace("version = \"2024-01\"", &format!("version = \"{label}\""))
        .replace(
            "effective_from = \"2024-01-01T00:00:00Z\"",
            &format!("effective_from = \"{}\"", format_utc_ms(effective_from_ms)),
        );
    for (from, to) in [
        ("= 2_500_000_000", "= 5_000_000_000"),
        ("= 150_000_000", "= 300_000_000"),
        ("= 20_000_000", "= 40_000_000"),
    ] {
        book = book.replace(from, to);
    }
    format!("{CONTRACTS}\n{book}")
}

/// A restart whose settings or published contracts differ from those the committed
/// checkpoints were built under is refused, naming each change; so is a new contract
/// version starting at or before a partition's largest counted event time. A version
/// starting after it is accepted, and rows from its start on carry it.
#[test]
fn restarts_under_other_semantics_are_refused_and_later_versions_accepted() {
    let input = produce_input(6_000, 17);
    let outputs = new_outputs(&input);
    let group = rand_name("agg-test-semantics");
    let first = run_aggregator(settings(&input, &outputs, &group)).expect("first run");
    assert_eq!(first.exit, ExitReason::Idle);
    let checkpoints = committed_checkpoints(&input.bootstrap, &group, &input.topic, PARTITIONS);
    assert_eq!(checkpoints.len(), PARTITIONS as usize);
    let max_event_ms = checkpoints
        .values()
        .filter_map(|(_, checkpoint)| checkpoint.digest.clock.max_event_time_ms)
        .max()
        .expect("events were counted");
    let max_watermark_ms = checkpoints
        .values()
        .filter_map(|(_, checkpoint)| checkpoint.digest.clock.watermark_ms)
        .max()
        .expect("watermarks");
    let window_ms = EVENT_TIME.window_ms;

    let setting_changed = |changes: &[Change], name: &str| {
        changes
            .iter()
            .any(|change| matches!(change, Change::Setting { name: found, .. } if found == name))
    };
    let mut changed = settings(&input, &outputs, &group);
    changed.config.aggregator.window_ms = 5_000;
    let changes = refused_changes(with_contracts(changed, CONTRACTS));
    assert!(
        setting_changed(&changes, "aggregator.window_ms"),
        "{changes:?}"
    );

    let mut changed = settings(&input, &outputs, &group);
    changed.config.aggregator.allowed_lateness_ms += 1_000;
    changed.config.aggregator.dedupe_horizon_ms += 1_000;
    let changes = refused_changes(changed);
    assert!(
        setting_changed(&changes, "aggregator.allowed_lateness_ms"),
        "{changes:?}"
    );

    let mut changed = settings(&input, &outputs, &group);
    changed.config.validation.max_event_time_ahead_ms += 1;
    let changes = refused_changes(changed);
    assert!(
        setting_changed(&changes, "validation.max_event_time_ahead_ms"),
        "{changes:?}"
    );

    let mut changed = settings(&input, &outputs, &group);
    changed.config.validation.max_dimension_bytes -= 1;
    let changes = refused_changes(changed);
    assert!(
        setting_changed(&changes, "validation.max_dimension_bytes"),
        "{changes:?}"
    );

    // A published version edited in place.
    let edited = CONTRACTS.replace("basis_points = 2000", "basis_points = 2100");
    let changes = refused_changes(with_contracts(settings(&input, &outputs, &group), &edited));
    assert!(
        changes
            .iter()
            .any(|change| matches!(change, Change::VersionEdited { .. })),
        "{changes:?}"
    );

    // A new version starting inside already counted event time.
    let inside = max_event_ms.div_euclid(window_ms) * window_ms;
    let changes = refused_changes(with_contracts(
        settings(&input, &outputs, &group),
        &contracts_with_new_version("2099-inside", inside),
    ));
    assert!(
        changes.iter().any(|change| matches!(
            change,
            Change::VersionStartsInClassifiedTime { effective_from_ms, .. } if *effective_from_ms == inside
        )),
        "{changes:?}"
    );

    // A new version after every partition's largest counted event time: accepted. New
    // input after the first run's final ticks is priced by it from its start on.
    let next_from = (max_watermark_ms + 3_600_000).div_euclid(window_ms) * window_ms;
    assert!(next_from > max_event_ms);
    let mut later = EVENT_TIME.generator(3_000, 18, PARTITIONS);
    // 3 000 events at 400 per second: 7.5 s of send time across `next_from`.
    later.start_time_ms = next_from - 3_000;
    let _second = produce_into(&input.topic, later, true, None, ProducerTuning::DEFAULT);
    let accepted = with_contracts(
        settings(&input, &outputs, &group),
        &contracts_with_new_version("2099-next", next_from),
    );
    let second_run = run_aggregator(accepted).expect("a later version is accepted");
    assert_eq!(second_run.exit, ExitReason::Idle);
    let rows: Vec<_> = read_committed(&input.bootstrap, &outputs.billing_aggregates, PARTITIONS)
        .iter()
        .map(|record| decode_aggregate(&record.value).expect("rows decode"))
        .collect();
    let (mut old, mut new) = (0, 0);
    for row in &rows {
        if row.window_start_ms >= next_from {
            assert_eq!(row.price_book_version, "2099-next", "{row:?}");
            new += 1;
        } else {
            assert_eq!(row.price_book_version, "2024-01", "{row:?}");
            old += 1;
        }
    }
    eprintln!("rows under the first version {old}, under the later one {new}");
    assert!(old > 0 && new > 0);
}
