//! Restores run outside the rebalance callback: a member whose restore takes several
//! times `max.poll.interval.ms` stays in the group, and a partition revoked in the
//! middle of its restore has the restore cancelled and is restored once by its new
//! owner. A failed committed-offset fetch is retried, its third failure in a row stops
//! the member, and so does a restore thread that ends without a result. Real `tally aggregate` processes against a real Kafka broker; every
//! observation is a `/metrics` counter or the group's committed offsets, never log
//! text; the outputs equal the generator's ground truth.
//!
//! Needs `TALLY_TEST_BOOTSTRAP`.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::eos::{
    ChildConfig, EventTime, PacedInput, create_outputs, fresh_outputs, input_fully_committed,
    verify_against_truth, wait_until,
};
use support::group::Member;
use support::prometheus::counter;
use support::{TestTopics, rand_name};

const PARTITIONS: i32 = 2;
const OUTPUT_PARTITIONS: i32 = 2;
/// `max.poll.interval.ms` (and the session timeout, which librdkafka requires to be no
/// larger) of the members.
const MAX_POLL_INTERVAL_MS: u64 = 3_000;
/// The restore test hook: every restore of member `b` takes at least this long, four
/// times `max.poll.interval.ms`.
const RESTORE_MS: u64 = 12_000;
/// Bound of any single wait for progress.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound of a clean stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

const ASSIGNMENTS: &str = "tally_aggregator_partition_assignments_total";
const REVOCATIONS: &str = "tally_aggregator_partition_revocations_total";
const RESTORES: &str = "tally_aggregator_partition_restores_total";
const STARTED: &str = "tally_aggregator_partition_restores_started_total";
const RESTORED_RECORDS: &str = "tally_aggregator_restored_records_total";
const CANCELLED: &str = "tally_aggregator_partition_restores_cancelled_total";
const RESTORING: &str = "tally_aggregator_restoring_partitions";

/// Starts member `name` (its log and config named after it, a random instance id).
fn spawn_member(
    child: &ChildConfig,
    topics: &TestTopics,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> Member {
    Member::spawn(
        child,
        topics,
        PARTITIONS,
        dir,
        name,
        &rand_name(name),
        extra,
    )
}

/// `a` consumes the first part of a live stream from scratch and leaves (SIGTERM:
/// commit, leave). `b` joins alone and gets both partitions; its restores take 12 s,
/// four times `max.poll.interval.ms`. While `b` restores, `c` joins: the cooperative
/// rebalance moves one partition from `b` to `c`, `b`'s restore of it is cancelled and
/// `c` restores it. `b` finishes restoring the other partition 12 s after it started
/// and is never evicted: each member saw exactly the rebalances the joins caused (`b`:
/// two partitions assigned, one revoked; `c`: one assigned, none revoked), each
/// partition was restored exactly once, and the outputs are exact.
#[test]
fn a_restore_longer_than_max_poll_interval_keeps_the_member_and_a_revoke_cancels_it() {
    let test_started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let event_time = EventTime::EOS;
    // ~10 s of live input: it keeps arriving while `b` restores.
    let stream = PacedInput::start(
        &rand_name("restore-events"),
        event_time.generator(8_000, 37, PARTITIONS),
        true,
        800,
    );
    let outputs = fresh_outputs(&stream.topic);
    create_outputs(&outputs, OUTPUT_PARTITIONS);
    let group = rand_name("restore-group");
    let interval = MAX_POLL_INTERVAL_MS.to_string();
    let child = ChildConfig::new(&group, event_time, OUTPUT_PARTITIONS)
        .live_stream()
        .with_client(&[
            ("session.timeout.ms", interval.as_str()),
            ("heartbeat.interval.ms", "500"),
            ("max.poll.interval.ms", interval.as_str()),
        ]);

    let mut a = spawn_member(&child, &outputs, dir.path(), "a", &[]);
    let total = stream.total_offsets();
    wait_until(PROGRESS_TIMEOUT, "a quarter of the input committed", || {
        stream.committed(&group) >= total / 4
    });
    assert_eq!(a.counter(RESTORES), 0.0, "a started both partitions fresh");
    a.terminate_cleanly(STOP_TIMEOUT);

    let restore_ms = RESTORE_MS.to_string();
    let mut b = spawn_member(
        &child,
        &outputs,
        dir.path(),
        "b",
        &["--restore-min-duration-ms", &restore_ms],
    );
    // The gauge counts partitions still fetching their committed offset (a fetch that
    // waits out `a`'s last transaction markers on a loaded machine); only a started
    // re-read can be cancelled, so wait for both to start.
    wait_until(PROGRESS_TIMEOUT, "b was assigned both partitions", || {
        counter(&b.scrape_running(), RESTORING) == 2.0
    });
    let b_assigned = Instant::now();
    wait_until(PROGRESS_TIMEOUT, "b restores both partitions", || {
        counter(&b.scrape_running(), STARTED) == 2.0
    });
    eprintln!(
        "b's re-reads started {:?} after the gauge showed both partitions",
        b_assigned.elapsed()
    );
    let b_restoring_since = Instant::now();
    let mut c = spawn_member(&child, &outputs, dir.path(), "c", &[]);
    wait_until(PROGRESS_TIMEOUT, "c restored its partition", || {
        c.counter(RESTORES) >= 1.0
    });
    assert_eq!(
        b.counter(CANCELLED),
        1.0,
        "b's restore of the partition that moved to c was cancelled"
    );
    wait_until(
        PROGRESS_TIMEOUT,
        "b restored its remaining partition",
        || b.counter(RESTORES) >= 1.0,
    );
    let b_restore = b_restoring_since.elapsed();
    eprintln!("b's restore took {b_restore:?}");
    assert!(
        b_restore >= Duration::from_millis(3 * MAX_POLL_INTERVAL_MS),
        "the restore outlasted max.poll.interval.ms several times over ({b_restore:?})"
    );

    let input = stream.finish();
    wait_until(PROGRESS_TIMEOUT, "the whole input committed", || {
        input_fully_committed(&input, &group)
    });
    let b_metrics = b.scrape_running();
    let c_metrics = c.scrape_running();
    let b_counts = [
        counter(&b_metrics, ASSIGNMENTS),
        counter(&b_metrics, REVOCATIONS),
        counter(&b_metrics, STARTED),
        counter(&b_metrics, RESTORES),
        counter(&b_metrics, CANCELLED),
    ];
    let c_counts = [
        counter(&c_metrics, ASSIGNMENTS),
        counter(&c_metrics, REVOCATIONS),
        counter(&c_metrics, STARTED),
        counter(&c_metrics, RESTORES),
        counter(&c_metrics, CANCELLED),
    ];
    eprintln!("assigned, revoked, started, restored, cancelled: b {b_counts:?}, c {c_counts:?}");
    assert_eq!(
        b_counts,
        [2.0, 1.0, 2.0, 1.0, 1.0],
        "b: both partitions assigned once, one moved to c mid-restore, no eviction"
    );
    assert_eq!(
        c_counts,
        [1.0, 0.0, 1.0, 1.0, 0.0],
        "c: one partition assigned and restored, nothing revoked"
    );
    assert!(
        counter(&b_metrics, RESTORED_RECORDS) > 0.0 && counter(&c_metrics, RESTORED_RECORDS) > 0.0,
        "both restores re-read input"
    );
    b.terminate_cleanly(STOP_TIMEOUT);
    c.terminate_cleanly(STOP_TIMEOUT);
    verify_against_truth(&input, &outputs, &group, OUTPUT_PARTITIONS);
    eprintln!("wall time {:?}", test_started.elapsed());
}

/// Committed-offset fetches that fail are retried: with the first two fetches of the
/// process failing (the test hook `--fail-offset-fetches`), a member still owns both
/// partitions and commits the whole input exactly. Three failures in a row of one
/// partition's fetch stop the member with exit status 1, and so does a restore thread
/// that ends without a result (`--panic-restores`); neither moves the group's
/// committed offsets, and a member without hooks then finds nothing left to do.
#[test]
fn failed_offset_fetches_are_retried_then_stop_the_member_as_does_a_lost_restore() {
    const FETCH_FAILURES: &str = "tally_aggregator_offset_fetch_failures_total";
    const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
    let test_started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let event_time = EventTime::EOS;
    let stream = PacedInput::start(
        &rand_name("fetch-events"),
        event_time.generator(3_000, 41, PARTITIONS),
        true,
        3_000,
    );
    let outputs = fresh_outputs(&stream.topic);
    create_outputs(&outputs, OUTPUT_PARTITIONS);
    let group = rand_name("fetch-group");
    let child = ChildConfig::new(&group, event_time, OUTPUT_PARTITIONS).live_stream();

    let mut a = spawn_member(
        &child,
        &outputs,
        dir.path(),
        "a",
        &["--fail-offset-fetches", "2"],
    );
    let input = stream.finish();
    wait_until(PROGRESS_TIMEOUT, "the whole input committed", || {
        input_fully_committed(&input, &group)
    });
    assert_eq!(
        a.counter(FETCH_FAILURES),
        2.0,
        "both injected failures were met and retried"
    );
    a.terminate_cleanly(STOP_TIMEOUT);
    verify_against_truth(&input, &outputs, &group, OUTPUT_PARTITIONS);

    for (name, hook) in [
        ("b", ["--fail-offset-fetches", "100"].as_slice()),
        ("c", ["--panic-restores"].as_slice()),
    ] {
        let mut member = spawn_member(&child, &outputs, dir.path(), name, hook);
        let status = member
            .process
            .wait_timeout(EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("{name} ({hook:?}) did not stop"));
        assert_eq!(
            status.code(),
            Some(1),
            "{name} ({hook:?}) stops with an error; log:\n{}",
            member.process.log_tail(20)
        );
        assert!(
            input_fully_committed(&input, &group),
            "{name} left the committed offsets alone"
        );
    }

    let mut d = spawn_member(&child, &outputs, dir.path(), "d", &[]);
    wait_until(PROGRESS_TIMEOUT, "d restored both partitions", || {
        d.counter(RESTORES) >= 2.0
    });
    d.terminate_cleanly(STOP_TIMEOUT);
    verify_against_truth(&input, &outputs, &group, OUTPUT_PARTITIONS);
    eprintln!("wall time {:?}", test_started.elapsed());
}
