//! The whole pipeline against a secured broker: SASL_SSL with SCRAM-SHA-512, the way
//! managed Kafka clusters are run.
//!
//! Needs the SASL_SSL listener of `deploy/local/kafka.sh` (deploy/local/test.sh exports
//! `TALLY_TEST_SASL_BOOTSTRAP`, `TALLY_TEST_SASL_USER`, `TALLY_TEST_SASL_PASSWORD_FILE`
//! and `TALLY_TEST_SASL_CA`). The password reaches the processes as the Kubernetes
//! manifests hand it over: a mounted file named by `kafka.sasl_password_file`, never
//! in the config file or the environment.
//!
//! - `tally topics create`, `tally produce`, `tally aggregate` and `tally sink`
//!   (SQLite) run against the listener; the store's rows add up, per window and
//!   dimensions, to the token sums of the generator's ground truth.
//! - With a wrong password, or a CA that did not sign the broker's certificate, each
//!   command exits with code 78 (the cluster refused the credentials or the TLS
//!   handshake) within [`FAIL_FAST`], instead of librdkafka retrying forever.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::sink::wait_exit;
use support::{default_contracts_path, rand_name};

/// The exit code of a command whose Kafka login or TLS handshake was refused.
const EXIT_KAFKA_AUTHENTICATION: i32 = 78;
/// How soon a refused login must stop a command: one connection attempt and the
/// check's 2 s of grace take about 4 s (8 s with all eight commands starting at once
/// on a loaded 2-core machine); librdkafka alone would retry forever.
const FAIL_FAST: Duration = Duration::from_secs(15);
/// Bound of each step of the happy path.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Records the generator produces (every class: on time, out of order, corrections,
/// duplicates, too late, rejected).
const RECORDS: u64 = 3_000;
const PARTITIONS: i32 = 2;

/// The secured listener, from the environment deploy/local/test.sh exports.
struct Secured {
    bootstrap: String,
    user: String,
    password_file: PathBuf,
    ca: PathBuf,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests through deploy/local/test.sh, which starts \
             a real Kafka broker with a SASL_SSL listener"
        )
    })
}

fn secured() -> Secured {
    Secured {
        bootstrap: env("TALLY_TEST_SASL_BOOTSTRAP"),
        user: env("TALLY_TEST_SASL_USER"),
        password_file: PathBuf::from(env("TALLY_TEST_SASL_PASSWORD_FILE")),
        ca: PathBuf::from(env("TALLY_TEST_SASL_CA")),
    }
}

/// Writes a config for the secured listener; the password comes from `password_file`.
fn write_config(
    dir: &Path,
    name: &str,
    listener: &Secured,
    password_file: &Path,
    ca: &Path,
) -> PathBuf {
    let base = rand_name("sasl");
    let path = dir.join(format!("{name}.toml"));
    let body = format!(
        r#"[kafka]
bootstrap_servers = "{bootstrap}"
sasl_password_file = "{password_file}"

[kafka.client]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "{user}"
"ssl.ca.location" = "{ca}"

[topics]
usage_events = "{base}.usage.events"
billing_aggregates = "{base}.billing.aggregates"
late = "{base}.usage.late"
dlq = "{base}.usage.dlq"
checkpoints = "{base}.tally.checkpoints"
partitions = {PARTITIONS}
output_partitions = {PARTITIONS}
replication_factor = 1

[aggregator]
group_id = "{base}.aggregator"
contracts_path = "{contracts}"
window_ms = 1000
max_out_of_orderness_ms = 200
allowed_lateness_ms = 500
correction_horizon_ms = 4000
dedupe_horizon_ms = 6000
idle_timeout_ms = 300
commit_interval_ms = 200

[metrics]
listen = ""
"#,
        bootstrap = listener.bootstrap,
        password_file = password_file.display(),
        user = listener.user,
        ca = ca.display(),
        contracts = default_contracts_path().display(),
    );
    std::fs::write(&path, body).expect("write config");
    path
}

/// A `tally` command with the config; stdout and stderr go to `log` (a file, so a
/// chatty child never blocks on a full pipe).
fn tally(args: &[&str], config: &Path, log: &Path) -> Command {
    let file = std::fs::File::create(log).expect("create log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(args)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .env_remove("TALLY_KAFKA__BOOTSTRAP_SERVERS")
        .stdout(Stdio::from(file.try_clone().expect("clone log file")))
        .stderr(Stdio::from(file));
    command
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves none behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A child's output so far, for failure messages.
fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Runs a command to its end within `timeout`; returns its status, how long it took
/// and its output.
fn run_bounded(
    mut command: Command,
    log: &Path,
    timeout: Duration,
) -> (ExitStatus, Duration, String) {
    let started = Instant::now();
    let mut child = command.spawn().expect("spawn tally");
    let status = wait_exit(&mut child, timeout);
    (status, started.elapsed(), log_text(log))
}

fn assert_ok(what: &str, result: &(ExitStatus, Duration, String)) {
    let (status, took, stderr) = result;
    assert!(
        status.success(),
        "{what} failed ({status}) after {took:?}:\n{stderr}"
    );
    eprintln!("{what}: {took:?}");
}

/// Token sums of one (window, dims) key: events, input, cached input, output, reasoning.
type Sums = [u64; 5];
type Key = (i64, String, String, String, Option<String>, String);

/// The generator's counted events by (window, dims), on-time and correction panes
/// together, from the truth file it wrote.
fn truth_sums(path: &Path) -> (u64, BTreeMap<Key, Sums>) {
    let truth: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("read truth")).expect("truth JSON");
    let mut sums: BTreeMap<Key, Sums> = BTreeMap::new();
    for window in truth["windows"].as_array().expect("windows") {
        let text = |field: &str| window[field].as_str().expect("text field").to_owned();
        let key = (
            window["window_start_ms"].as_i64().expect("window start"),
            text("tenant_id"),
            text("model"),
            text("cloud"),
            window["channel_partner"].as_str().map(str::to_owned),
            text("region"),
        );
        let entry = sums.entry(key).or_default();
        for pane in ["on_time", "correction"] {
            let pane = &window[pane];
            for (slot, field) in [
                "events",
                "input_tokens",
                "cached_input_tokens",
                "output_tokens",
                "reasoning_tokens",
            ]
            .iter()
            .enumerate()
            {
                entry[slot] += pane[*field].as_u64().expect("token sum");
            }
        }
    }
    (truth["counted"].as_u64().expect("counted"), sums)
}

/// The store's rows summed by (window, dims), with SQL run by the test.
fn store_sums(path: &Path) -> BTreeMap<Key, Sums> {
    let connection = rusqlite::Connection::open(path).expect("open store");
    let mut statement = connection
        .prepare(
            "SELECT window_start_ms, tenant_id, model, cloud, channel_partner, region, \
             event_count, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens \
             FROM tally_rows",
        )
        .expect("prepare");
    let mut sums: BTreeMap<Key, Sums> = BTreeMap::new();
    let rows = statement
        .query_map([], |row| {
            let key: Key = (
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
            );
            let mut figures = [0_u64; 5];
            for (slot, figure) in figures.iter_mut().enumerate() {
                *figure = u64::try_from(row.get::<_, i64>(6 + slot)?).expect("non-negative");
            }
            Ok((key, figures))
        })
        .expect("query");
    for row in rows {
        let (key, figures) = row.expect("row");
        let entry = sums.entry(key).or_default();
        for (total, figure) in entry.iter_mut().zip(figures) {
            *total += figure;
        }
    }
    sums
}

/// Events counted in the store so far (0 before the sink created its tables).
fn stored_events(path: &Path) -> u64 {
    let Ok(connection) = rusqlite::Connection::open(path) else {
        return 0;
    };
    connection
        .query_row(
            "SELECT coalesce(sum(event_count), 0) FROM tally_rows",
            [],
            |row| row.get::<_, i64>(0),
        )
        .map_or(0, |events| u64::try_from(events).unwrap_or(0))
}

#[test]
fn pipeline_runs_over_sasl_ssl_with_the_password_from_a_mounted_file() {
    let started = Instant::now();
    let listener = secured();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        "secured",
        &listener,
        &listener.password_file,
        &listener.ca,
    );

    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let created = run_bounded(
        tally(&["topics", "create"], &config, &log("topics")),
        &log("topics"),
        STEP_TIMEOUT,
    );
    assert_ok("tally topics create", &created);

    let truth_path = dir.path().join("truth.json");
    let truth_arg = truth_path.display().to_string();
    let count = RECORDS.to_string();
    let produced = run_bounded(
        tally(
            &[
                "produce", "--count", &count, "--seed", "7", "--truth", &truth_arg,
            ],
            &config,
            &log("produce"),
        ),
        &log("produce"),
        STEP_TIMEOUT,
    );
    assert_ok("tally produce", &produced);
    let (counted, expected) = truth_sums(&truth_path);
    assert!(
        counted > RECORDS / 2,
        "the generator counted {counted} events"
    );

    let store = dir.path().join("billing.db");
    let database = format!("sqlite:{}", store.display());
    let mut sink = Running(
        tally(
            &[
                "sink",
                "--database",
                &database,
                "--group-id",
                &rand_name("sasl-sink"),
            ],
            &config,
            &log("sink"),
        )
        .spawn()
        .expect("spawn tally sink"),
    );
    let aggregated = run_bounded(
        tally(
            &[
                "aggregate",
                "--instance-id",
                &rand_name("sasl"),
                "--start-from",
                "earliest",
                "--exit-after-idle-ms",
                "1500",
            ],
            &config,
            &log("aggregate"),
        ),
        &log("aggregate"),
        STEP_TIMEOUT,
    );
    assert_ok("tally aggregate", &aggregated);

    // Every counted event reaches the store (bounded wait), then SIGTERM stops the sink.
    let waiting = Instant::now();
    while stored_events(&store) < counted && waiting.elapsed() < STEP_TIMEOUT {
        thread::sleep(Duration::from_millis(100));
    }
    let pid = sink.0.id().to_string();
    let signalled = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(signalled.success());
    let status = wait_exit(&mut sink.0, Duration::from_secs(20));
    assert!(
        status.success(),
        "tally sink exit {status}:\n{}",
        log_text(&log("sink"))
    );
    eprintln!("rows in the store after {:?}", waiting.elapsed());

    let stored = store_sums(&store);
    assert_eq!(
        stored.values().map(|sums| sums[0]).sum::<u64>(),
        counted,
        "events in the store against the truth's counted events"
    );
    assert_eq!(
        stored, expected,
        "token sums per (window, dims) against the truth"
    );
    eprintln!("secured pipeline test took {:?}", started.elapsed());
}

#[test]
fn wrong_password_or_unknown_ca_stops_every_command_fast_with_its_exit_code() {
    let started = Instant::now();
    let listener = secured();
    let dir = tempfile::tempdir().expect("temp dir");
    let wrong_password = dir.path().join("sasl-password");
    std::fs::write(&wrong_password, "not-the-password\n").expect("write password file");
    let bad_login = write_config(
        dir.path(),
        "wrong-password",
        &listener,
        &wrong_password,
        &listener.ca,
    );
    // A CA that did not sign the broker's certificate: the TLS handshake fails first.
    let other_ca = dir.path().join("other-ca.pem");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .args(["-days", "1", "-subj", "/CN=not the broker's CA"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(made.success(), "openssl could not make a CA");
    let bad_ca = write_config(
        dir.path(),
        "unknown-ca",
        &listener,
        &listener.password_file,
        &other_ca,
    );

    let store = format!("sqlite:{}", dir.path().join("billing.db").display());
    let commands: [&[&str]; 4] = [
        &["topics", "create"],
        &["produce", "--count", "100"],
        &[
            "aggregate",
            "--instance-id",
            "sasl-refused",
            "--start-from",
            "earliest",
        ],
        &["sink", "--database", &store],
    ];
    // All eight at once: each must stop on its own within the bound.
    let cases = [(&bad_login, "wrong-password"), (&bad_ca, "unknown-ca")];
    let mut running: Vec<(String, PathBuf, Instant, Running)> = Vec::new();
    for (config, case) in cases {
        for args in commands {
            let what = format!("{}-{case}", args[0]);
            let log = dir.path().join(format!("{what}.log"));
            let child = Running(tally(args, config, &log).spawn().expect("spawn tally"));
            running.push((what, log, Instant::now(), child));
        }
    }
    for (what, log, spawned, mut child) in running {
        let status = wait_exit(&mut child.0, FAIL_FAST + Duration::from_secs(5));
        let took = spawned.elapsed();
        assert_eq!(
            status.code(),
            Some(EXIT_KAFKA_AUTHENTICATION),
            "{what}: exit {status} after {took:?}:\n{}",
            log_text(&log)
        );
        assert!(took < FAIL_FAST, "{what} took {took:?} to stop");
        eprintln!("{what}: exit {EXIT_KAFKA_AUTHENTICATION} after {took:?}");
    }
    eprintln!("refused-login test took {:?}", started.elapsed());
}
