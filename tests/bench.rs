//! `tally bench` end to end at a small size against the real broker: it exits 0 and
//! writes well-formed JSON with every stage (the figures themselves are not asserted:
//! they depend on the machine). Needs `TALLY_TEST_BOOTSTRAP` (deploy/local/test.sh).

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::bootstrap;
use support::sink::wait_exit;

/// Preload, ceiling, drain and a 20 s paced phase take about 35 s on the 2-core
/// development machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

fn number(value: &Value, path: &str) -> f64 {
    let mut current = value;
    for part in path.split('.') {
        current = &current[part];
    }
    current
        .as_f64()
        .unwrap_or_else(|| panic!("{path} is a number in {value}"))
}

#[test]
fn bench_runs_end_to_end_and_writes_its_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "bench",
            "--broker",
            &bootstrap(),
            "--events",
            "20000",
            "--partitions",
            "3",
            "--latency-seconds",
            "20",
            "--latency-rate",
            "500",
            "--timeout-secs",
            "180",
        ])
        .arg("--dir")
        .arg(dir.path().join("work"))
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tally bench");
    let status = wait_exit(&mut child, RUN_TIMEOUT);
    let output = child.wait_with_output().expect("bench output");
    assert!(
        status.success(),
        "tally bench failed ({status}):\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("tally bench took {:?}", started.elapsed());

    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the bench wrote its JSON"))
            .expect("the JSON parses");
    assert_eq!(number(&result, "events"), 20_000.0);
    assert_eq!(number(&result, "partitions"), 3.0);
    for stage in ["preload", "ceiling", "aggregator", "sink"] {
        for field in [
            "seconds",
            "events_per_second",
            "cpu_seconds",
            "events_per_core_second",
            "peak_rss_bytes",
        ] {
            let value = number(&result, &format!("{stage}.{field}"));
            assert!(
                value.is_finite() && value >= 0.0,
                "{stage}.{field} = {value}"
            );
        }
    }
    assert!(number(&result, "rows") >= 1.0, "the drain stored rows");
    for figures in ["event_to_row", "event_to_store"] {
        for field in ["samples", "p50_ms", "p99_ms", "max_ms"] {
            let value = number(&result, &format!("latency.{figures}.{field}"));
            assert!(value.is_finite(), "latency.{figures}.{field} = {value}");
        }
    }
}
