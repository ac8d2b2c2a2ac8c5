//! Helpers of the operations tests: plain HTTP GETs of a process's listener,
//! `promtool check metrics`, `tally produce` / `tally sink` children with their
//! listener on, a temporary Prometheus server and its HTTP API, and the PromQL of the
//! dashboard and the alert rules.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// GET `http://<address><path>` over plain TCP (HTTP/1.0, so the server closes the
/// connection after the body). `None` when nothing answers (not started, or exited)
/// or the answer is cut off.
pub fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&address.parse().ok()?, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8(response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, body.to_owned()))
}

/// [`http_get`] that must answer 200; returns the body.
pub fn get_ok(address: &str, path: &str) -> String {
    match http_get(address, path) {
        Some((200, body)) => body,
        other => panic!("GET {address}{path}: expected 200, got {other:?}"),
    }
}

/// Runs `promtool check metrics` on an exposition; panics with promtool's findings on
/// any problem (lint warnings included: promtool exits non-zero on them).
pub fn promtool_check_metrics(what: &str, exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool not found: install Debian's prometheus package (deploy/local/test.sh does)",
        );
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool");
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && findings.trim().is_empty(),
        "promtool check metrics on the {what} scrape: {findings}"
    );
}

/// A child process of the `tally` binary; killed when dropped.
#[derive(Debug)]
pub struct TallyChild {
    pub child: Child,
    pub log_path: PathBuf,
}

impl TallyChild {
    /// Starts `tally <args> --config <config>`, logging to `<log_dir>/<name>.log`.
    pub fn spawn(args: &[&str], config: &Path, log_dir: &Path, name: &str) -> TallyChild {
        let log_path = log_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("TALLY_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn tally");
        TallyChild { child, log_path }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Whether the process exited (and how).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        super::eos::log_tail(&self.log_path, 30)
    }
}

impl Drop for TallyChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Percent-encodes a query parameter value.
pub fn percent_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// A Prometheus server on a free loopback port with a temporary data directory;
/// killed when dropped.
pub struct PrometheusServer {
    pub address: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Starts Debian's `prometheus` with `config` (YAML) and the rule files `rules`
    /// (copied next to it); waits until it is ready.
    pub fn start(config: &str, rules: &[(&str, &Path)]) -> PrometheusServer {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, source) in rules {
            std::fs::copy(source, dir.path().join(name)).expect("copy rules");
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let address = format!("127.0.0.1:{}", super::eos::free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect(
                "prometheus not found: install Debian's prometheus package \
                 (deploy/local/test.sh does)",
            );
        let mut server = PrometheusServer {
            address,
            child,
            _dir: dir,
        };
        let address = server.address.clone();
        let started = Instant::now();
        loop {
            if let Some((200, _)) = http_get(&address, "/-/ready") {
                break;
            }
            if let Some(status) = server.child.try_wait().expect("try_wait") {
                let log = std::fs::read_to_string(server._dir.path().join("prometheus.log"))
                    .unwrap_or_default();
                panic!("prometheus exited ({status}):\n{log}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "prometheus not ready within 30 s"
            );
            thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// GET an API path; the parsed JSON answer.
    pub fn api(&self, path_and_query: &str) -> serde_json::Value {
        let (status, body) = http_get(&self.address, path_and_query)
            .unwrap_or_else(|| panic!("prometheus did not answer {path_and_query}"));
        serde_json::from_str(&body).unwrap_or_else(|error| {
            panic!("{path_and_query}: {status} with a body that is not JSON ({error}): {body}")
        })
    }

    /// An instant query: the API's whole answer (`status`, `data` or `error`).
    pub fn query(&self, expression: &str) -> serde_json::Value {
        self.api(&format!(
            "/api/v1/query?query={}",
            percent_encode(expression)
        ))
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One query of a dashboard panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub panel: String,
    pub expression: String,
}

/// Every panel query of the provisioned dashboard, with the dashboard's variables
/// substituted: `$__rate_interval` and `$__range` by `interval` and `range`,
/// `$instance` (a multi-value variable with an `All` of `.*`) by `.*`.
pub fn dashboard_queries(interval: &str, range: &str) -> Vec<PanelQuery> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/dashboards/tally.json"))
        .expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expression = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", interval)
                .replace("$__range", range)
                .replace("$instance", ".*");
            assert!(
                !expression.contains('$'),
                "unsubstituted variable in {expression}"
            );
            queries.push(PanelQuery {
                panel: panel["title"].as_str().unwrap_or("untitled").to_owned(),
                expression,
            });
        }
    }
    assert!(!queries.is_empty(), "the dashboard has no queries");
    queries
}

/// `(alert name, expression)` of every rule in `deploy/prometheus/tally-alerts.yml`.
pub fn alert_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/tally-alerts.yml"))
        .expect("read the alert rules");
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("rules YAML");
    let mut alerts = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name").to_owned();
            let expression = rule["expr"].as_str().expect("expr").trim().to_owned();
            alerts.push((name, expression));
        }
    }
    assert!(!alerts.is_empty(), "no alert rules");
    alerts
}

/// Metric names an expression reads: `tally_*` identifiers outside strings, and `up`.
pub fn metric_names(expression: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut token = String::new();
    let mut in_string = false;
    for c in expression.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_string = !in_string;
            token.clear();
            continue;
        }
        if in_string {
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            token.push(c);
        } else {
            if token.starts_with("tally_") || (token == "up" && (c == '{' || c == ' ')) {
                names.insert(token.clone());
            }
            token.clear();
        }
    }
    names
}
