//! Bad configuration fails at start, with a message that names the field.

use std::path::Path;
use std::process::{Command, Output};

fn tally_config_check(file_body: &str, env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tally.toml");
    std::fs::write(&path, file_body).expect("write config");
    run_check(&path, env)
}

fn run_check(path: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command.args(["config", "check", "--config"]).arg(path);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run tally")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn example_config_is_valid_and_complete() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tally.example.toml");
    let output = run_check(&example, &[]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("window_ms = 60000"), "printed: {printed}");
}

#[test]
fn unknown_field_is_named() {
    let output = tally_config_check("[aggregator]\nwindow_msec = 60000\n", &[]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("window_msec"), "stderr: {message}");
    assert!(message.contains("aggregator"), "stderr: {message}");
}

#[test]
fn wrong_type_is_named() {
    let output = tally_config_check("[topics]\npartitions = \"six\"\n", &[]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("topics.partitions"), "stderr: {message}");
}

#[test]
fn impossible_value_is_named() {
    let output = tally_config_check("[aggregator]\nwindow_ms = 420000\n", &[]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("aggregator.window_ms"),
        "stderr: {message}"
    );
    assert!(message.contains("divide 15 minutes"), "stderr: {message}");
}

#[test]
fn too_many_worker_threads_is_named() {
    let output = tally_config_check("[aggregator]\nworker_threads = 100000\n", &[]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("aggregator.worker_threads"),
        "stderr: {message}"
    );
}

#[test]
fn environment_override_is_validated_and_named() {
    let output = tally_config_check("", &[("TALLY_AGGREGATOR__DEDUPE_HORIZON_MS", "1000")]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("aggregator.dedupe_horizon_ms"),
        "stderr: {message}"
    );
}

#[test]
fn environment_override_applies() {
    let output = tally_config_check("", &[("TALLY_KAFKA__BOOTSTRAP_SERVERS", "broker-7:9093")]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("broker-7:9093"));
}

#[test]
fn missing_file_is_reported() {
    let output = run_check(Path::new("/nonexistent/tally.toml"), &[]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("/nonexistent/tally.toml"));
}

#[test]
fn example_config_check_prints_the_derived_bounds() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tally.example.toml");
    let output = run_check(&example, &[]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("max_dimension_bytes = 256"),
        "printed: {printed}"
    );
    // 1 h + 5 min + 1 min, computed here from the example's values.
    let output_bound = 3_600_000 + 300_000 + 60_000;
    assert!(
        printed.contains(&format!("usage.dlq: {output_bound}")),
        "printed: {printed}"
    );
}

#[test]
fn dimension_limit_that_lets_a_row_outgrow_the_aggregates_topic_is_named() {
    // Four dimensions of 300 000 bytes do not fit a 1 MiB record.
    let output = tally_config_check("[validation]\nmax_dimension_bytes = 300000\n", &[]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("topics.max_message_bytes"),
        "stderr: {message}"
    );
    assert!(
        message.contains("validation.max_dimension_bytes"),
        "stderr: {message}"
    );
}

#[test]
fn dimension_limit_shorter_than_a_priced_model_is_named() {
    // The default contracts price "atlas-reasoning" (15 bytes).
    let output = tally_config_check("[validation]\nmax_dimension_bytes = 8\n", &[]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("validation.max_dimension_bytes"),
        "stderr: {message}"
    );
}

#[test]
fn unknown_validation_field_is_named() {
    let output = tally_config_check("[validation]\nmax_region_bytes = 10\n", &[]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("max_region_bytes"), "stderr: {message}");
}
