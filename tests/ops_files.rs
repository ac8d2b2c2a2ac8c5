//! The operations files under deploy/ checked against the code they describe.
//!
//! - Every metric the alert rules and the Grafana dashboard use is one the processes
//!   export: the aggregator's names come from `crates/tally-aggregator/src/metrics.rs`,
//!   the producer's from `crates/tally-producer/src/producer.rs`, the sink's from
//!   `deploy/sink-contract.txt` (the sink's side of the contract). `_bucket`, `_sum`
//!   and `_count` only on histograms; grouping labels from the documented label sets.
//! - Every alert has a summary, a description, a runbook link to an existing section
//!   of deploy/RUNBOOK.md, and unit tests where it fires and where it stays silent.
//! - The Dockerfile, the compose file and the Kubernetes manifests name only images,
//!   files, ports, environment variables, config fields, subcommands, flags and probe
//!   paths that exist: the config files they mount pass `tally config check`.
//!
//! Files only (and the `tally` binary for `config check` and `--help`): no broker.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;
use support::ops::{metric_names, repo};

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo().join(relative))
        .unwrap_or_else(|error| panic!("cannot read {relative}: {error}"))
}

fn yaml(relative: &str) -> Value {
    serde_yaml::from_str(&read(relative)).unwrap_or_else(|error| panic!("{relative}: {error}"))
}

fn yaml_documents(relative: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(relative))
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|error| panic!("{relative}: {error}"))
        })
        .filter(|value| !value.is_null())
        .collect()
}

use serde::Deserialize;

fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut current = value;
    for key in path {
        current = &current[*key];
    }
    current
        .as_str()
        .unwrap_or_else(|| panic!("no string at {path:?} in {value:?}"))
}

fn seq(value: &Value) -> &[Value] {
    value.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

// ---------------------------------------------------------------------------------
// Metric names
// ---------------------------------------------------------------------------------

/// Metric family name → type (`counter`, `gauge`, `histogram`).
fn exported_metrics() -> BTreeMap<String, String> {
    let mut metrics = BTreeMap::new();

    // The aggregator: `pub const NAME: &str = "tally_...";` and the describe_* calls.
    let source = read("crates/tally-aggregator/src/metrics.rs");
    let constants = string_constants(&source, "tally_aggregator_");
    for kind in ["counter", "gauge", "histogram"] {
        let marker = format!("describe_{kind}!(");
        for (index, _) in source.match_indices(&marker) {
            let rest = &source[index + marker.len()..];
            let constant: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let name = constants
                .get(&constant)
                .unwrap_or_else(|| panic!("describe_{kind}!({constant}) names no constant"));
            metrics.insert(name.clone(), kind.to_owned());
        }
    }
    for name in constants.values() {
        assert!(
            metrics.contains_key(name),
            "{name} has no HELP text (describe_*!)"
        );
    }

    // The producer library: `metric_names::NAME` in its describe_* calls.
    let producer = read("crates/tally-producer/src/producer.rs");
    let constants = string_constants(&producer, "tally_producer_");
    for kind in ["counter", "gauge", "histogram"] {
        let marker = format!("describe_{kind}!(");
        for (index, _) in producer.match_indices(&marker) {
            let rest = producer[index + marker.len()..].trim_start();
            let rest = rest.strip_prefix("metric_names::").unwrap_or(rest);
            let constant: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let name = constants
                .get(&constant)
                .unwrap_or_else(|| panic!("describe_{kind}!({constant}) names no constant"));
            metrics.insert(name.clone(), kind.to_owned());
        }
    }
    for name in constants.values() {
        assert!(
            metrics.contains_key(name),
            "{name} has no HELP text (describe_*!)"
        );
    }

    // The sink's contract.
    for line in sink_contract("metric") {
        let mut words = line.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            panic!("deploy/sink-contract.txt: bad metric line {line:?}");
        };
        assert!(name.starts_with("tally_sink_"), "{name}");
        assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
        metrics.insert(name.to_owned(), kind.to_owned());
    }
    metrics.insert("up".to_owned(), "gauge".to_owned());
    metrics
}

/// `const IDENT: &str = "<prefix>...";` → IDENT → value.
fn string_constants(source: &str, prefix: &str) -> BTreeMap<String, String> {
    let mut constants = BTreeMap::new();
    for line in source.lines() {
        let line = line.trim();
        let Some(rest) = line
            .strip_prefix("pub const ")
            .or_else(|| line.strip_prefix("const "))
        else {
            continue;
        };
        let Some((ident, value)) = rest.split_once(": &str = \"") else {
            continue;
        };
        let Some(value) = value.strip_suffix("\";") else {
            continue;
        };
        if value.starts_with(prefix) {
            constants.insert(ident.to_owned(), value.to_owned());
        }
    }
    assert!(!constants.is_empty(), "no {prefix}* constants found");
    constants
}

/// Lines of deploy/sink-contract.txt starting with `kind `, without it.
fn sink_contract(kind: &str) -> Vec<String> {
    read("deploy/sink-contract.txt")
        .lines()
        .filter_map(|line| line.strip_prefix(&format!("{kind} ")))
        .map(|rest| rest.trim().to_owned())
        .collect()
}

/// Labels the processes put on their series, plus Prometheus' own.
const KNOWN_LABELS: [&str; 8] = [
    "job",
    "instance",
    "partition",
    "reason",
    "kind",
    "cloud",
    "partner",
    "le",
];

/// Label names in `by (...)`, `on (...)`, `without (...)`, `ignoring (...)` clauses.
fn grouping_labels(expression: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for keyword in ["by", "on", "without", "ignoring"] {
        for pattern in [format!("{keyword} ("), format!("{keyword}(")] {
            for (index, _) in expression.match_indices(&pattern) {
                let before = expression[..index].chars().last();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue;
                }
                let rest = &expression[index + pattern.len()..];
                let inside = rest.split(')').next().unwrap_or("");
                labels.extend(
                    inside
                        .split(',')
                        .map(str::trim)
                        .filter(|label| !label.is_empty())
                        .map(str::to_owned),
                );
            }
        }
    }
    labels
}

/// Checks every metric and grouping label of `expression`; returns the families used.
fn check_expression(
    place: &str,
    expression: &str,
    exported: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    let names = metric_names(expression);
    assert!(!names.is_empty(), "{place}: no metric in {expression:?}");
    let mut families = BTreeSet::new();
    for name in names {
        if exported.contains_key(&name) {
            families.insert(name);
            continue;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or_else(|| panic!("{place}: {name} is not exported by any tally process"));
        assert_eq!(
            exported.get(family).map(String::as_str),
            Some("histogram"),
            "{place}: {name} needs {family} to be an exported histogram"
        );
        families.insert(family.to_owned());
    }
    if expression.contains("histogram_quantile") {
        assert!(
            expression.contains("_bucket") && grouping_labels(expression).contains("le"),
            "{place}: histogram_quantile over _bucket series grouped by le: {expression}"
        );
    }
    for label in grouping_labels(expression) {
        assert!(
            KNOWN_LABELS.contains(&label.as_str()),
            "{place}: label {label:?} is not one the processes export"
        );
    }
    families
}

#[test]
fn expression_scanner_finds_names_and_labels() {
    let expression = r#"histogram_quantile(0.99, sum by (le) (rate(tally_x_seconds_bucket{instance=~"tally_not_a_metric"}[5m]))) and on (job, instance) up == 0"#;
    assert_eq!(
        metric_names(expression),
        BTreeSet::from(["tally_x_seconds_bucket".to_owned(), "up".to_owned()])
    );
    assert_eq!(
        grouping_labels(expression),
        BTreeSet::from(["le".to_owned(), "job".to_owned(), "instance".to_owned()])
    );
}

// ---------------------------------------------------------------------------------
// Alert rules
// ---------------------------------------------------------------------------------

fn runbook_anchors() -> BTreeSet<String> {
    read("deploy/RUNBOOK.md")
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    'a'..='z' | '0'..='9' | '-' | '_' => Some(c),
                    ' ' => Some('-'),
                    _ => None,
                })
                .collect::<String>()
        })
        .collect()
}

#[test]
fn alert_rules_use_exported_metrics_and_link_the_runbook() {
    let exported = exported_metrics();
    let anchors = runbook_anchors();
    let rules = yaml("deploy/prometheus/tally-alerts.yml");
    let mut alerts = BTreeSet::new();
    for group in seq(&rules["groups"]) {
        for rule in seq(&group["rules"]) {
            let alert = str_at(rule, &["alert"]);
            assert!(alerts.insert(alert.to_owned()), "{alert} defined twice");
            check_expression(alert, str_at(rule, &["expr"]), &exported);
            let severity = str_at(rule, &["labels", "severity"]);
            assert!(["warning", "critical"].contains(&severity), "{alert}");
            for key in ["summary", "description"] {
                assert!(
                    !str_at(rule, &["annotations", key]).trim().is_empty(),
                    "{alert}: empty {key}"
                );
            }
            let url = str_at(rule, &["annotations", "runbook_url"]);
            let anchor = url
                .strip_prefix("deploy/RUNBOOK.md#")
                .unwrap_or_else(|| panic!("{alert}: runbook_url {url:?}"));
            assert_eq!(anchor, alert.to_lowercase(), "{alert}: anchor");
            assert!(
                anchors.contains(anchor),
                "{alert}: no RUNBOOK section {anchor}"
            );
        }
    }
    // The alerts this slice promises.
    for expected in [
        "TallyProcessDown",
        "TallyConsumerLagGrowing",
        "TallyWatermarkStalled",
        "TallyNoCommit",
        "TallyTransactionsAborting",
        "TallyOffsetFetchFailing",
        "TallyAggregatorRestarting",
        "TallyRejectedRateHigh",
        "TallyTooLateRateHigh",
        "TallyRestoreVolumeHigh",
        "TallySinkStalled",
        "TallySinkConflict",
        "TallyDatabaseErrors",
    ] {
        assert!(alerts.contains(expected), "missing alert {expected}");
    }

    // promtool unit tests: each alert fires in one case and is silent in another.
    let tests = yaml("deploy/prometheus/tally-alerts.test.yml");
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for test in seq(&tests["tests"]) {
        for case in seq(&test["alert_rule_test"]) {
            let name = str_at(case, &["alertname"]).to_owned();
            assert!(alerts.contains(&name), "test of unknown alert {name}");
            if seq(&case["exp_alerts"]).is_empty() {
                silent.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    assert_eq!(fires, alerts, "alerts without a firing test case");
    assert_eq!(silent, alerts, "alerts without a silent test case");
}

// ---------------------------------------------------------------------------------
// Grafana
// ---------------------------------------------------------------------------------

#[test]
fn dashboard_panels_plot_exported_metrics() {
    let exported = exported_metrics();
    let text = read("deploy/grafana/dashboards/tally.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut used = BTreeSet::new();
    let mut ids = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("title");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expression = target["expr"].as_str().expect("expr");
            used.extend(check_expression(title, expression, &exported));
            let legend = target["legendFormat"].as_str().unwrap_or("");
            for label in legend.split("{{").skip(1) {
                let label = label.split("}}").next().unwrap_or("").trim();
                assert!(
                    KNOWN_LABELS.contains(&label),
                    "{title}: legend label {label}"
                );
            }
        }
    }
    // What the dashboard promises to show.
    for family in [
        "tally_aggregator_consumed_records_total",
        "tally_aggregator_emitted_rows_total",
        "tally_aggregator_consumer_lag_records",
        "tally_aggregator_watermark_delay_seconds",
        "tally_aggregator_too_late_events_total",
        "tally_aggregator_duplicate_events_total",
        "tally_aggregator_rejected_records_total",
        "tally_aggregator_transaction_commit_seconds",
        "tally_aggregator_window_emit_latency_seconds",
        "tally_aggregator_restored_records_total",
        "tally_aggregator_tokens_total",
        "tally_aggregator_gross_micros_total",
        "tally_aggregator_partner_share_micros_total",
        "tally_sink_rows_written_total",
        "tally_sink_db_transaction_seconds",
    ] {
        assert!(used.contains(family), "no panel plots {family}");
    }

    // Provisioning: the provider's folder is where compose mounts the dashboards.
    let provider = yaml("deploy/grafana/provisioning/dashboards/tally.yml");
    let path = str_at(&seq(&provider["providers"])[0], &["options", "path"]);
    let compose = compose();
    let grafana_mounts = mounts(&compose["services"]["grafana"]);
    assert_eq!(
        grafana_mounts.get(path).map(String::as_str),
        Some("../grafana/dashboards"),
        "grafana mounts: {grafana_mounts:?}"
    );
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        str_at(&seq(&datasources["datasources"])[0], &["url"]),
        "http://prometheus:9090"
    );
}

/// Every panel query with the dashboard's variables substituted, in the order of
/// the panels.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = read("deploy/grafana/dashboards/tally.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expression = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$instance", ".*");
            let name = format!(
                "panel_{}_{}",
                panel["id"],
                target["refId"].as_str().unwrap_or("A")
            );
            queries.push((name, expression));
        }
    }
    queries
}

/// Prometheus 2.42's parser accepts every panel query: they are written as recording
/// rules and checked with `promtool check rules` (deploy/local/test.sh installs
/// Debian's prometheus package, which has promtool).
#[test]
fn dashboard_queries_parse_as_promql() {
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (name, expression) in dashboard_queries() {
        assert!(
            !expression.contains('$'),
            "{name}: unsubstituted variable in {expression}"
        );
        let quoted = serde_json::to_string(&expression).expect("quote");
        rules.push_str(&format!(
            "      - record: dashboard:{name}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, rules).expect("write rules");
    let output = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect(
            "promtool not found: install Debian's prometheus package (deploy/local/test.sh does)",
        );
    assert!(
        output.status.success(),
        "promtool rejected a dashboard query: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------------
// Config, CLI
// ---------------------------------------------------------------------------------

fn tally(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .current_dir(repo())
        .args(args)
        .env_remove("TALLY_CONFIG")
        .output()
        .expect("run tally")
}

/// Dotted paths of every config field (from the defaults `config check` prints) and
/// the sink's contract fields.
fn config_fields() -> BTreeSet<String> {
    let output = tally(&["config", "check"]);
    assert!(output.status.success());
    let printed: toml::Table =
        toml::from_str(&String::from_utf8_lossy(&output.stdout)).expect("printed config");
    let mut fields = BTreeSet::new();
    for (section, table) in &printed {
        for field in table.as_table().expect("section").keys() {
            fields.insert(format!("{section}.{field}"));
        }
    }
    // Optional fields print only when set.
    fields.insert("kafka.sasl_password_file".to_owned());
    fields.extend(sink_contract("config"));
    fields
}

/// Checks an environment variable a deploy file sets: a `TALLY_<SECTION>__<FIELD>`
/// override of an existing field, or one the CLI declares with `env = "..."`.
fn check_env_var(place: &str, name: &str, fields: &BTreeSet<String>) {
    if !name.starts_with("TALLY_") {
        return;
    }
    if let Some(path) = name
        .strip_prefix("TALLY_")
        .filter(|rest| rest.contains("__"))
    {
        let dotted = path.to_lowercase().replace("__", ".");
        assert!(
            fields.contains(&dotted),
            "{place}: {name} overrides no config field ({dotted})"
        );
        return;
    }
    let declared = format!("env = \"{name}\"");
    let sources = [
        read("src/main.rs"),
        read("crates/tally-aggregator/src/settings.rs"),
        read("crates/tally-sink/src/run.rs"),
        read("crates/tally-sink/src/args.rs"),
    ];
    assert!(
        sources.iter().any(|source| source.contains(&declared)),
        "{place}: {name} is not read by tally"
    );
}

/// Checks a `tally` command line from a deploy file: the subcommand exists (or is the
/// sink's contract) and every `--flag` is in its `--help`.
fn check_command(place: &str, args: &[String]) {
    let subcommand = args
        .first()
        .unwrap_or_else(|| panic!("{place}: no subcommand"));
    if sink_contract("command").contains(subcommand) {
        return;
    }
    let mut help_args: Vec<&str> = args
        .iter()
        .take_while(|arg| !arg.starts_with('-'))
        .map(String::as_str)
        .collect();
    help_args.push("--help");
    let help = tally(&help_args);
    assert!(help.status.success(), "{place}: tally {help_args:?} failed");
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|arg| arg.starts_with("--")) {
        let flag = flag.split('=').next().unwrap_or(flag);
        assert!(
            text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
            "{place}: tally {subcommand} has no {flag}"
        );
    }
}

/// `config check` of a config file, with environment overrides.
fn check_config_file(place: &str, body: &str, env: &[(&str, &Path)]) -> toml::Table {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tally.toml");
    std::fs::write(&path, body).expect("write config");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .current_dir(repo())
        .args(["config", "check", "--config"])
        .arg(&path);
    // The deploy files name the contracts where the image puts them; `config check`
    // loads them, so point it at the same file in the repository.
    command.env(
        "TALLY_AGGREGATOR__CONTRACTS_PATH",
        repo().join("deploy/contracts/default.toml"),
    );
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run tally");
    assert!(
        output.status.success(),
        "{place}: config check failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    toml::from_str(body).expect("toml")
}

fn metrics_port(config: &toml::Table) -> u16 {
    let listen = config["metrics"]["listen"]
        .as_str()
        .expect("metrics.listen");
    listen
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("metrics.listen port")
}

// ---------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------

/// The runtime stage: COPY destinations → repository sources, USER, EXPOSE, WORKDIR.
struct Image {
    copies: Vec<(String, String)>,
    user: String,
    exposed: Vec<u16>,
    workdir: String,
    entrypoint: String,
}

fn dockerfile() -> Image {
    let text = read("deploy/docker/Dockerfile");
    let stages: Vec<&str> = text.split("\nFROM ").collect();
    assert!(stages.len() >= 3, "a multi-stage build");
    let runtime = stages[stages.len() - 1];
    let mut image = Image {
        copies: Vec::new(),
        user: String::new(),
        exposed: Vec::new(),
        workdir: String::new(),
        entrypoint: String::new(),
    };
    for line in runtime.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["COPY", from, source, destination] if from.starts_with("--from=") => {
                assert!(
                    stages[1..stages.len() - 1]
                        .iter()
                        .any(|stage| stage.contains(&format!("cp target/release/tally {source}"))),
                    "the build stage puts the binary at {source}"
                );
                image
                    .copies
                    .push(((*destination).to_owned(), "<binary>".to_owned()));
            }
            ["COPY", source, destination] => {
                assert!(
                    repo().join(source).exists(),
                    "Dockerfile copies {source}, which does not exist"
                );
                image
                    .copies
                    .push(((*destination).to_owned(), (*source).to_owned()));
            }
            ["USER", user] => (*user).clone_into(&mut image.user),
            ["EXPOSE", port] => image.exposed.push(port.parse().expect("port")),
            ["WORKDIR", dir] => (*dir).clone_into(&mut image.workdir),
            ["ENTRYPOINT", ..] => line.clone_into(&mut image.entrypoint),
            _ => {}
        }
    }
    // The build stage copies what cargo needs.
    for line in text.lines() {
        if let ["COPY", source, _] = line.split_whitespace().collect::<Vec<_>>().as_slice() {
            assert!(repo().join(source).exists(), "COPY {source}");
        }
    }
    image
}

impl Image {
    /// The repository file an absolute (or WORKDIR-relative) path in the image comes
    /// from, if a COPY put it there.
    fn source_of(&self, path: &str) -> Option<PathBuf> {
        let absolute = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("{}/{path}", self.workdir)
        };
        self.copies.iter().find_map(|(destination, source)| {
            let rest = absolute.strip_prefix(destination.as_str())?;
            if source == "<binary>" {
                return rest.is_empty().then(|| PathBuf::from("<binary>"));
            }
            Some(repo().join(source).join(rest.trim_start_matches('/')))
        })
    }
}

#[test]
fn dockerfile_builds_a_non_root_image_with_binary_contracts_and_schemas() {
    let image = dockerfile();
    assert!(
        !image.user.is_empty() && !image.user.starts_with("0") && !image.user.starts_with("root"),
        "runtime user {:?}",
        image.user
    );
    assert!(image.entrypoint.contains("/usr/local/bin/tally"));
    assert_eq!(
        image.source_of("/usr/local/bin/tally"),
        Some(PathBuf::from("<binary>"))
    );
    let default_contracts = image
        .source_of("deploy/contracts/default.toml")
        .expect("default contracts_path inside the image");
    assert!(
        default_contracts.is_file(),
        "{}",
        default_contracts.display()
    );
    let catalogue = image
        .source_of("/opt/tally/schemas/catalogue.json")
        .expect("schemas in the image");
    assert!(catalogue.is_file());
    assert_eq!(image.exposed, vec![9464]);
    assert!(read("deploy/docker/Dockerfile").contains("TALLY_METRICS__LISTEN=0.0.0.0:9464"));
    assert!(read(".dockerignore").lines().any(|line| line == "target"));
}

// ---------------------------------------------------------------------------------
// Compose
// ---------------------------------------------------------------------------------

fn compose() -> Value {
    yaml("deploy/compose/docker-compose.yml")
}

/// Container path → host path of a service's bind mounts.
fn mounts(service: &Value) -> BTreeMap<String, String> {
    seq(&service["volumes"])
        .iter()
        .map(|volume| {
            let spec = volume.as_str().expect("short volume syntax");
            let mut parts = spec.split(':');
            let host = parts.next().unwrap_or_default().to_owned();
            let container = parts.next().unwrap_or_default().to_owned();
            (container, host)
        })
        .collect()
}

/// A service's fields after the `<<: *tally` merge (serde_yaml keeps `<<` as a key).
fn merged(service: &Value) -> serde_yaml::Mapping {
    let mut map = serde_yaml::Mapping::new();
    let own = service.as_mapping().expect("service mapping");
    if let Some(base) = own.get("<<").and_then(Value::as_mapping) {
        for (key, value) in base {
            map.insert(key.clone(), value.clone());
        }
    }
    for (key, value) in own {
        if key.as_str() == Some("<<") {
            continue;
        }
        if key.as_str() == Some("environment") {
            map.insert(key.clone(), Value::Mapping(merged_env(value)));
        } else {
            map.insert(key.clone(), value.clone());
        }
    }
    map
}

fn merged_env(environment: &Value) -> serde_yaml::Mapping {
    let mut env = serde_yaml::Mapping::new();
    if let Some(own) = environment.as_mapping() {
        if let Some(base) = own.get("<<").and_then(Value::as_mapping) {
            env.extend(base.clone());
        }
        for (key, value) in own {
            if key.as_str() != Some("<<") {
                env.insert(key.clone(), value.clone());
            }
        }
    }
    env
}

#[test]
fn compose_names_only_what_exists() {
    let compose = compose();
    let compose_dir = repo().join("deploy/compose");
    let fields = config_fields();
    let image = dockerfile();
    let services = compose["services"].as_mapping().expect("services");
    let version = env!("CARGO_PKG_VERSION");
    let mut tally_services = BTreeSet::new();

    for (name, service) in services {
        let name = name.as_str().expect("service name");
        let service = Value::Mapping(merged(service));
        let image_name = str_at(&service, &["image"]);
        assert!(
            !image_name.ends_with(":latest") && image_name.contains(':'),
            "{name}: pin the image tag ({image_name})"
        );
        for (container, host) in mounts(&service) {
            let host_path = compose_dir.join(&host);
            assert!(host_path.exists(), "{name}: mounts missing {host}");
            assert!(container.starts_with('/'), "{name}: {container}");
        }
        if service["build"].is_null() {
            continue;
        }
        tally_services.insert(name.to_owned());
        assert_eq!(image_name, format!("tally:{version}"), "{name}");
        let context = compose_dir.join(str_at(&service, &["build", "context"]));
        assert_eq!(
            context.canonicalize().expect("context"),
            repo().canonicalize().expect("repo"),
            "{name}: build context is the repository root"
        );
        assert!(
            context
                .join(str_at(&service, &["build", "dockerfile"]))
                .is_file()
        );
        let environment = service["environment"].as_mapping().expect("environment");
        for key in environment.keys() {
            check_env_var(name, key.as_str().expect("env name"), &fields);
        }
        let command: Vec<String> = seq(&service["command"])
            .iter()
            .map(|arg| arg.as_str().expect("arg").to_owned())
            .collect();
        check_command(name, &command);

        // The config file it names is mounted, valid, and points inside the image.
        let config_path = str_at(&service, &["environment", "TALLY_CONFIG"]);
        let host = mounts(&service)
            .get(config_path)
            .cloned()
            .unwrap_or_else(|| panic!("{name}: {config_path} is not mounted"));
        let body = std::fs::read_to_string(compose_dir.join(host)).expect("config");
        let config = check_config_file(name, &body, &[]);
        assert_eq!(metrics_port(&config), 9464);
        let contracts = config["aggregator"]["contracts_path"]
            .as_str()
            .expect("contracts_path");
        let source = image
            .source_of(contracts)
            .unwrap_or_else(|| panic!("{name}: {contracts} is not in the image"));
        assert!(source.is_file(), "{}", source.display());
    }
    for expected in ["topics", "generator", "aggregator", "sink"] {
        assert!(tally_services.contains(expected), "no {expected} service");
    }
    for expected in ["kafka", "postgres", "prometheus", "grafana"] {
        assert!(services.contains_key(expected), "no {expected} service");
    }
    assert!(str_at(&compose, &["services", "kafka", "image"]).starts_with("apache/kafka:"));

    // Prometheus scrapes the tally services on the metrics port and loads the rules.
    let prometheus = yaml("deploy/compose/prometheus.yml");
    let mut jobs = BTreeSet::new();
    for job in seq(&prometheus["scrape_configs"]) {
        jobs.insert(str_at(job, &["job_name"]).to_owned());
        for config in seq(&job["static_configs"]) {
            for target in seq(&config["targets"]) {
                let (host, port) = target
                    .as_str()
                    .and_then(|t| t.split_once(':'))
                    .expect("host:port");
                assert!(tally_services.contains(host), "scrape target {host}");
                assert_eq!(port, "9464");
            }
        }
    }
    assert_eq!(
        jobs,
        BTreeSet::from(["tally-aggregator", "tally-sink", "tally-producer"].map(str::to_owned))
    );
    let prometheus_mounts = mounts(&compose["services"]["prometheus"]);
    for rule_file in seq(&prometheus["rule_files"]) {
        let rule_file = rule_file.as_str().expect("rule file");
        assert_eq!(
            prometheus_mounts.get(rule_file).map(String::as_str),
            Some("../prometheus/tally-alerts.yml")
        );
    }
}

// ---------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------

fn k8s_objects() -> Vec<Value> {
    let kustomization = yaml("deploy/k8s/kustomization.yaml");
    let listed: BTreeSet<String> = seq(&kustomization["resources"])
        .iter()
        .map(|file| file.as_str().expect("file").to_owned())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(repo().join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|file| file.ends_with(".yaml") && file != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization lists every manifest");
    listed
        .iter()
        .flat_map(|file| yaml_documents(&format!("deploy/k8s/{file}")))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn kubernetes_manifests_name_only_what_exists() {
    let objects = k8s_objects();
    let fields = config_fields();
    let version = env!("CARGO_PKG_VERSION");

    // The config map's config is valid (the password file path is the Secret's mount,
    // replaced here by a temp file) and its contracts are the repository's.
    let config_map = find(&objects, "ConfigMap", "tally-config");
    let config_body = str_at(config_map, &["data", "tally.toml"]);
    let secret_dir = tempfile::tempdir().expect("temp dir");
    let password_file = secret_dir.path().join("sasl-password");
    std::fs::write(&password_file, "test\n").expect("write");
    let config = check_config_file(
        "tally-config",
        config_body,
        &[("TALLY_KAFKA__SASL_PASSWORD_FILE", &password_file)],
    );
    let contracts_map = find(&objects, "ConfigMap", "tally-contracts");
    assert_eq!(
        str_at(contracts_map, &["data", "contracts.toml"]),
        read("deploy/contracts/default.toml"),
        "the contracts ConfigMap must equal deploy/contracts/default.toml"
    );
    assert!(config["kafka"]["client"].get("sasl.password").is_none());
    let port = metrics_port(&config);
    let partitions = config["topics"]["partitions"]
        .as_integer()
        .expect("partitions");

    let aggregator = find(&objects, "StatefulSet", "tally-aggregator");
    assert_eq!(
        str_at(aggregator, &["spec", "podManagementPolicy"]),
        "Parallel"
    );
    let replicas = aggregator["spec"]["replicas"].as_i64().expect("replicas");
    assert!(
        (1..=partitions).contains(&replicas),
        "replicas {replicas} ≤ partitions {partitions}"
    );
    let sink = find(&objects, "Deployment", "tally-sink");

    for (workload, subcommand) in [(aggregator, "aggregate"), (sink, "sink")] {
        let name = str_at(workload, &["metadata", "name"]);
        let pod = &workload["spec"]["template"];
        let labels = &pod["metadata"]["labels"];
        assert_eq!(
            &workload["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            &labels["app.kubernetes.io/name"]
        );
        let annotations = &pod["metadata"]["annotations"];
        assert_eq!(str_at(annotations, &["prometheus.io/scrape"]), "true");
        assert_eq!(
            str_at(annotations, &["prometheus.io/port"]),
            port.to_string()
        );
        assert_eq!(str_at(annotations, &["prometheus.io/path"]), "/metrics");
        let containers = seq(&pod["spec"]["containers"]);
        assert_eq!(containers.len(), 1);
        let container = &containers[0];
        assert_eq!(str_at(container, &["image"]), format!("tally:{version}"));
        let args: Vec<String> = seq(&container["args"])
            .iter()
            .map(|arg| arg.as_str().expect("arg").to_owned())
            .collect();
        assert_eq!(args.first().map(String::as_str), Some(subcommand));
        check_command(name, &args);
        let container_ports = seq(&container["ports"]);
        assert_eq!(str_at(&container_ports[0], &["name"]), "metrics");
        assert_eq!(
            container_ports[0]["containerPort"].as_u64(),
            Some(u64::from(port))
        );
        assert_eq!(
            str_at(container, &["livenessProbe", "httpGet", "path"]),
            "/healthz"
        );
        assert_eq!(
            str_at(container, &["readinessProbe", "httpGet", "path"]),
            "/readyz"
        );
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(str_at(container, &[probe, "httpGet", "port"]), "metrics");
        }
        assert!(
            !container["resources"]["requests"]["cpu"].is_null(),
            "{name}"
        );
        assert!(
            !container["resources"]["requests"]["memory"].is_null(),
            "{name}"
        );
        assert_eq!(
            pod["spec"]["securityContext"]["runAsNonRoot"],
            Value::Bool(true)
        );

        // Environment: real variables; secrets that exist.
        let mut env = BTreeMap::new();
        for variable in seq(&container["env"]) {
            let key = str_at(variable, &["name"]).to_owned();
            check_env_var(name, &key, &fields);
            if let Some(secret) = variable["valueFrom"]["secretKeyRef"].as_mapping() {
                let secret_name = secret["name"].as_str().expect("secret name");
                let secret_key = secret["key"].as_str().expect("secret key");
                let object = find(&objects, "Secret", secret_name);
                assert!(
                    !object["stringData"][secret_key].is_null(),
                    "{secret_name}.{secret_key}"
                );
            }
            env.insert(key, variable.clone());
        }

        // Mounts: the config file, the contracts file and the password file the config
        // names are where the ConfigMaps and the Secret are mounted.
        let volumes: BTreeMap<&str, &Value> = seq(&pod["spec"]["volumes"])
            .iter()
            .map(|volume| (str_at(volume, &["name"]), volume))
            .collect();
        let resolve = |path: &str| -> (String, String) {
            for mount in seq(&container["volumeMounts"]) {
                let mount_path = str_at(mount, &["mountPath"]);
                let volume = volumes[str_at(mount, &["name"])];
                let (kind, object_name) = if let Some(name) = volume["configMap"]["name"].as_str() {
                    ("ConfigMap", name)
                } else {
                    ("Secret", str_at(volume, &["secret", "secretName"]))
                };
                let key = if let Some(sub_path) = mount["subPath"].as_str() {
                    (path == mount_path).then(|| sub_path.to_owned())
                } else {
                    path.strip_prefix(&format!("{mount_path}/"))
                        .map(str::to_owned)
                };
                if let Some(key) = key {
                    let object = find(&objects, kind, object_name);
                    let data = if kind == "Secret" {
                        "stringData"
                    } else {
                        "data"
                    };
                    assert!(
                        !object[data][key.as_str()].is_null(),
                        "{kind} {object_name} has no {key}"
                    );
                    return (object_name.to_owned(), key);
                }
            }
            panic!("{name}: nothing mounted at {path}");
        };
        let config_path = str_at(&env["TALLY_CONFIG"], &["value"]);
        assert_eq!(
            resolve(config_path),
            ("tally-config".to_owned(), "tally.toml".to_owned())
        );
        let contracts_path = config["aggregator"]["contracts_path"]
            .as_str()
            .expect("path");
        assert_eq!(
            resolve(contracts_path),
            ("tally-contracts".to_owned(), "contracts.toml".to_owned())
        );
        let password_path = config["kafka"]["sasl_password_file"]
            .as_str()
            .expect("path");
        assert_eq!(
            resolve(password_path),
            ("tally-kafka".to_owned(), "sasl-password".to_owned())
        );

        // A PodDisruptionBudget selects the pods.
        let budget = find(&objects, "PodDisruptionBudget", name);
        assert_eq!(
            &budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            &labels["app.kubernetes.io/name"]
        );
    }

    // --instance-id comes from the pod's ordinal.
    let container = &seq(&aggregator["spec"]["template"]["spec"]["containers"])[0];
    let instance = seq(&container["env"])
        .iter()
        .find(|variable| variable["name"] == "TALLY_INSTANCE_ID")
        .expect("TALLY_INSTANCE_ID");
    assert_eq!(
        str_at(instance, &["valueFrom", "fieldRef", "fieldPath"]),
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );
    assert!(
        read("crates/tally-aggregator/src/settings.rs").contains("env = \"TALLY_INSTANCE_ID\""),
        "--instance-id reads TALLY_INSTANCE_ID"
    );

    // The probe paths are documented as required endpoints.
    let runbook = read("deploy/RUNBOOK.md");
    assert!(runbook.contains("/healthz") && runbook.contains("/readyz"));
}
