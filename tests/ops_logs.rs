//! Log output for machines: no ANSI colour codes when stderr is not a terminal,
//! `--log-format json` (or `TALLY_LOG_FORMAT=json`) writes one JSON object per line,
//! and a broker that refuses connections is a WARN, not an ERROR.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const ESC: u8 = 0x1b;

fn tally() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command
        .env_remove("TALLY_LOG_FORMAT")
        .env_remove("NO_COLOR");
    command
}

fn has_ansi(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|pair| pair == [ESC, b'['])
}

/// Every non-empty line parsed as a JSON object (panics naming the line otherwise).
fn json_lines(bytes: &[u8]) -> Vec<serde_json::Map<String, serde_json::Value>> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(
            |line| match serde_json::from_str::<serde_json::Value>(line) {
                Ok(serde_json::Value::Object(object)) => object,
                other => panic!("not a JSON object line: {line:?} ({other:?})"),
            },
        )
        .collect()
}

fn field<'a>(line: &'a serde_json::Map<String, serde_json::Value>, key: &str) -> &'a str {
    line.get(key).and_then(|value| value.as_str()).unwrap_or("")
}

/// `tally config check` with a missing config file: exits 1 after one ERROR line.
fn failing_config_check(configure: impl FnOnce(&mut Command)) -> Output {
    let mut command = tally();
    command.args(["config", "check", "--config", "/nonexistent/tally.toml"]);
    configure(&mut command);
    command.output().expect("run tally")
}

#[test]
fn piped_text_logs_and_output_carry_no_colour_codes() {
    let failed = failing_config_check(|_| {});
    assert_eq!(failed.status.code(), Some(1));
    assert!(!failed.stderr.is_empty(), "expected a log line on stderr");
    assert!(
        !has_ansi(&failed.stderr),
        "stderr: {:?}",
        String::from_utf8_lossy(&failed.stderr)
    );

    let ok = tally()
        .args(["config", "check"])
        .output()
        .expect("run tally");
    assert!(ok.status.success());
    assert!(!has_ansi(&ok.stdout) && !has_ansi(&ok.stderr));
}

#[test]
fn json_log_format_writes_one_object_per_line_by_flag_or_env() {
    let by_flag = failing_config_check(|command| {
        command.args(["--log-format", "json"]);
    });
    let by_env = failing_config_check(|command| {
        command.env("TALLY_LOG_FORMAT", "json");
    });
    let by_env_any_case = failing_config_check(|command| {
        command.env("TALLY_LOG_FORMAT", "JSON");
    });
    for output in [by_flag, by_env, by_env_any_case] {
        assert_eq!(output.status.code(), Some(1));
        assert!(!has_ansi(&output.stderr));
        let lines = json_lines(&output.stderr);
        assert_eq!(lines.len(), 1, "one error line expected: {lines:?}");
        assert_eq!(field(&lines[0], "level"), "ERROR");
        assert_eq!(field(&lines[0], "target"), "tally");
        assert!(lines[0].contains_key("timestamp"));
        assert!(lines[0].contains_key("error"), "fields are top-level keys");
    }
}

#[test]
fn unknown_log_format_is_refused() {
    let output = tally()
        .args(["--log-format", "xml", "config", "check"])
        .output()
        .expect("run tally");
    assert_eq!(output.status.code(), Some(2), "clap's usage error");
}

/// A port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[test]
fn refused_broker_connections_are_warnings_not_errors() {
    let mut child = tally()
        .args(["--log-format", "json", "produce", "--count", "10"])
        .env(
            "TALLY_KAFKA__BOOTSTRAP_SERVERS",
            format!("127.0.0.1:{}", closed_port()),
        )
        .env("TALLY_METRICS__LISTEN", "")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tally produce");
    // librdkafka retries the bootstrap connection every few hundred ms; two seconds
    // give several refused attempts.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = Vec::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_end(&mut stderr)
        .expect("read stderr");

    assert!(!has_ansi(&stderr));
    let lines = json_lines(&stderr);
    let refused = lines
        .iter()
        .filter(|line| field(line, "target") == "librdkafka" && field(line, "facility") == "FAIL")
        .collect::<Vec<_>>();
    assert!(
        !refused.is_empty(),
        "expected librdkafka connection failures: {lines:?}"
    );
    assert!(refused.iter().all(|line| field(line, "level") == "WARN"));
    let errors = lines
        .iter()
        .filter(|line| field(line, "level") == "ERROR")
        .collect::<Vec<_>>();
    assert!(errors.is_empty(), "no ERROR expected: {errors:?}");
}
