//! `/healthz` and `/readyz` of `tally aggregate` and `tally sink` through start-up,
//! restore, running and shutdown (SIGTERM), against the real broker.
//!
//! Needs `TALLY_TEST_BOOTSTRAP`. A first aggregator aggregates a generated input and
//! exits, leaving checkpoints; a second one (the process under observation) must then
//! restore both partitions before it processes anything. A probe thread asks
//! `/readyz` and `/healthz` every few milliseconds from the moment the process is
//! spawned and records each change of answer, so the test sees the sequence the
//! process went through: nothing listening, 503 starting, 503 restoring, 200 running,
//! then after SIGTERM 503 stopping and nothing listening again after a clean exit. The
//! sink goes through starting, running and stopping the same way.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::eos::{
    ChildConfig, EventTime, committed_offset_sum, create_outputs, free_port, fresh_outputs,
    produce_generated,
};
use support::ops::{TallyChild, get_ok, http_get, wait_for};
use support::prometheus::parse;
use support::rand_name;

const PARTITIONS: i32 = 2;
/// Records of the input (all in the live state: the restore re-reads most of them).
const RECORDS: i64 = 30_000;

/// One observed answer of both endpoints: `(status, phase)` of `/readyz` (phase from
/// the JSON body) and the status of `/healthz`; `None` when nothing answered.
#[derive(Debug, Clone)]
struct Observed {
    ready: Option<(u16, String)>,
    live: Option<u16>,
    /// When this answer was first seen, ms after the probe started (not compared).
    at_ms: u128,
}

impl PartialEq for Observed {
    fn eq(&self, other: &Self) -> bool {
        self.ready == other.ready && self.live == other.live
    }
}

impl Eq for Observed {}

fn observe(address: &str, since: Instant) -> Observed {
    let ready = http_get(address, "/readyz").map(|(status, body)| {
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|error| panic!("/readyz body is not JSON ({error}): {body}"));
        let expected_status = if status == 200 { "ready" } else { "not ready" };
        assert_eq!(json["status"], expected_status, "{body}");
        if status != 200 {
            assert!(json["reason"].is_string(), "a 503 says why: {body}");
        }
        (
            status,
            json["phase"].as_str().unwrap_or_default().to_owned(),
        )
    });
    let live = http_get(address, "/healthz").map(|(status, body)| {
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|error| panic!("/healthz body is not JSON ({error}): {body}"));
        assert!(json["since_last_poll_ms"].is_u64(), "{body}");
        status
    });
    Observed {
        ready,
        live,
        at_ms: since.elapsed().as_millis(),
    }
}

/// Polls both endpoints of `address` every 5 ms on a thread, recording every change,
/// until stopped.
struct Probe {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Vec<Observed>>,
}

impl Probe {
    fn start(address: String) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // The first answer is taken before the process is spawned: nothing listens.
        let since = Instant::now();
        let mut seen = vec![observe(&address, since)];
        let handle = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !flag.load(Ordering::Acquire) && Instant::now() < deadline {
                let now = observe(&address, since);
                if seen.last() != Some(&now) {
                    seen.push(now);
                }
                thread::sleep(Duration::from_millis(5));
            }
            seen
        });
        Probe { stop, handle }
    }

    fn finish(self) -> Vec<Observed> {
        self.stop.store(true, Ordering::Release);
        self.handle.join().expect("probe thread")
    }
}

/// The `/readyz` phases in order of first appearance, `-` for nothing listening, with
/// repeats collapsed.
fn phases(seen: &[Observed]) -> Vec<String> {
    let mut phases: Vec<String> = Vec::new();
    let mut timeline = String::new();
    for observed in seen {
        let phase = match &observed.ready {
            None => "-".to_owned(),
            Some((status, phase)) => format!("{status} {phase}"),
        };
        if phases.last() != Some(&phase) {
            timeline.push_str(&format!(" {}ms:{phase}", observed.at_ms));
            phases.push(phase);
        }
    }
    eprintln!("timeline:{timeline}");
    phases
}

#[test]
fn probes_follow_start_up_restore_running_and_shutdown() {
    let started = Instant::now();
    // A checkpointed input with live state: no end tick and no idle tick, so windows
    // and the dedupe set stay open and a restart must re-read input to rebuild them.
    let event_time = EventTime::EOS;
    let input = produce_generated(
        &rand_name("ops-health-events"),
        event_time.generator(RECORDS as u64, 77, PARTITIONS),
        false,
    );
    let topics = fresh_outputs(&input.topic);
    create_outputs(&topics, PARTITIONS);
    let dir = tempfile::tempdir().expect("temp dir");
    let group = rand_name("ops-health");
    let quiet = ChildConfig::new(&group, event_time, PARTITIONS).live_stream();
    let first_config = quiet.write(dir.path(), "first", &topics, PARTITIONS);
    let mut first = TallyChild::spawn(
        &[
            "aggregate",
            "--instance-id",
            &rand_name("ops-health-first"),
            "--start-from",
            "earliest",
        ],
        &first_config,
        dir.path(),
        "first",
    );
    wait_for(Duration::from_secs(90), "the input committed", || {
        if let Some(status) = first.try_exit() {
            panic!("first aggregator exited ({status}):\n{}", first.log_tail());
        }
        (committed_offset_sum(&input.bootstrap, &group, &input.topic, PARTITIONS) == RECORDS)
            .then_some(())
    });
    first.terminate();
    let status = wait_for(
        Duration::from_secs(30),
        "the first aggregator to exit",
        || first.try_exit(),
    );
    assert!(status.success(), "first aggregator: {status}");
    eprintln!(
        "input aggregated and checkpointed after {:?}",
        started.elapsed()
    );

    // The observed aggregator: restores both partitions, then runs.
    let mut observed = quiet.clone();
    observed.metrics_listen = format!("127.0.0.1:{}", free_port());
    let address = observed.metrics_listen.clone();
    let config = observed.write(dir.path(), "observed", &topics, PARTITIONS);
    let probe = Probe::start(address.clone());
    let mut aggregator = TallyChild::spawn(
        &[
            "aggregate",
            "--instance-id",
            &rand_name("ops-health-second"),
        ],
        &config,
        dir.path(),
        "observed",
    );
    let running_at = wait_for(Duration::from_secs(60), "the aggregator to run", || {
        if let Some(status) = aggregator.try_exit() {
            panic!(
                "tally aggregate exited ({status}):\n{}",
                aggregator.log_tail()
            );
        }
        matches!(http_get(&address, "/readyz"), Some((200, _))).then(Instant::now)
    });
    // Running a while: still ready and alive.
    thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        observe(&address, Instant::now())
            .ready
            .map(|(status, _)| status),
        Some(200)
    );
    let metrics = parse(&get_ok(&address, "/metrics"));
    assert_eq!(
        metrics.sum("tally_aggregator_partition_restores_total"),
        Some(f64::from(PARTITIONS)),
        "both partitions were restored from their checkpoints"
    );
    assert!(
        metrics
            .sum("tally_aggregator_restored_records_total")
            .unwrap_or(0.0)
            > 0.0
    );
    aggregator.terminate();
    let status = wait_for(Duration::from_secs(30), "the aggregator to exit", || {
        aggregator.try_exit()
    });
    assert!(status.success(), "exit after SIGTERM: {status}");
    thread::sleep(Duration::from_millis(100));
    let seen = probe.finish();
    let sequence = phases(&seen);
    eprintln!(
        "aggregator probes: {sequence:?}; ready {:?} after the test started",
        running_at.duration_since(started)
    );
    assert_eq!(
        sequence,
        [
            "-",
            "503 starting",
            "503 restoring",
            "200 running",
            "503 stopping",
            "-"
        ],
        "aggregator /readyz transitions"
    );
    assert!(
        seen.iter()
            .all(|observed| observed.live.is_none_or(|status| status == 200)),
        "/healthz is 200 whenever the process answers: {seen:?}"
    );

    // The sink: starting until its partitions are assigned, then running; stopping
    // after SIGTERM.
    let mut sink_config = quiet.clone();
    sink_config.metrics_listen = format!("127.0.0.1:{}", free_port());
    let sink_address = sink_config.metrics_listen.clone();
    let sink_file = sink_config.write(dir.path(), "sink", &topics, PARTITIONS);
    let database = format!("sqlite:{}", dir.path().join("billing.db").display());
    let probe = Probe::start(sink_address.clone());
    let mut sink = TallyChild::spawn(
        &[
            "sink",
            "--database",
            &database,
            "--group-id",
            &rand_name("ops-health-sink"),
        ],
        &sink_file,
        dir.path(),
        "sink",
    );
    wait_for(Duration::from_secs(60), "the sink to run", || {
        if let Some(status) = sink.try_exit() {
            panic!("tally sink exited ({status}):\n{}", sink.log_tail());
        }
        matches!(http_get(&sink_address, "/readyz"), Some((200, _))).then_some(())
    });
    thread::sleep(Duration::from_millis(500));
    sink.terminate();
    let status = wait_for(Duration::from_secs(30), "the sink to exit", || {
        sink.try_exit()
    });
    assert!(status.success(), "sink exit after SIGTERM: {status}");
    thread::sleep(Duration::from_millis(100));
    let seen = probe.finish();
    let sequence = phases(&seen);
    eprintln!("sink probes: {sequence:?}");
    assert_eq!(
        sequence,
        ["-", "503 starting", "200 running", "503 stopping", "-"],
        "sink /readyz transitions"
    );
    assert!(
        seen.iter()
            .all(|observed| observed.live.is_none_or(|status| status == 200)),
        "/healthz is 200 whenever the sink answers: {seen:?}"
    );
    eprintln!("done in {:?}", started.elapsed());
}
