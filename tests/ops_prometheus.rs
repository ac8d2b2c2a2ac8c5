//! The dashboard and the alert rules against a real Prometheus scraping a running
//! pipeline.
//!
//! Needs `TALLY_TEST_BOOTSTRAP` and Debian's `prometheus` package (the server and
//! promtool; deploy/local/test.sh installs it). Prometheus 2.42 runs on a free
//! loopback port with a temporary data directory, scraping every second the jobs the
//! deploy files name (`tally-producer`, `tally-aggregator`, `tally-sink`) and
//! evaluating `deploy/prometheus/tally-alerts.yml` every second, while `tally produce`
//! sends a paced run stamped with the current time, `tally aggregate` aggregates it and
//! `tally sink` stores it in SQLite. Then, through Prometheus's HTTP API:
//! - every metric a dashboard panel or an alert names has a series;
//! - every panel query (dashboard variables substituted) and every alert expression
//!   evaluates without error;
//! - the traffic and latency panels return data;
//! - every rule was evaluated without error, and no alert is firing (the restart alert,
//!   which has no `for`, would fire at once on the fixed-label series every process
//!   creates at 0 if it matched them).

mod support;

use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::eos::{
    ChildConfig, EventTime, create_outputs, create_topics, free_port, fresh_outputs,
};
use support::ops::{
    PrometheusServer, TallyChild, alert_expressions, dashboard_queries, http_get, metric_names,
    repo, wait_for,
};
use support::{bootstrap, rand_name};

const PARTITIONS: i32 = 2;
/// Records per second of the paced run, and its length.
const RATE: u64 = 250;
const RUN_SECS: u64 = 12;

/// Panels that must show data after a healthy run: traffic and latency.
const PANELS_WITH_DATA: [&str; 7] = [
    "Throughput in",
    "Throughput out",
    "Sink rows and batches",
    "Transaction commit latency",
    "Window emit latency",
    "Sink transaction latency",
    "Producer delivery latency",
];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .expect("clock after 1970")
}

/// The result vector of a successful instant query (panics with the error otherwise).
fn result_of(
    prometheus: &PrometheusServer,
    what: &str,
    expression: &str,
) -> Vec<serde_json::Value> {
    let answer = prometheus.query(expression);
    assert_eq!(
        answer["status"], "success",
        "{what}: {expression} failed: {answer}"
    );
    match answer["data"]["resultType"].as_str() {
        Some("vector") => answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        Some("scalar") => vec![answer["data"]["result"].clone()],
        other => panic!("{what}: unexpected result type {other:?}: {answer}"),
    }
}

/// Whether a vector has a sample whose value is a number (not NaN).
fn has_number(result: &[serde_json::Value]) -> bool {
    result.iter().any(|sample| {
        sample["value"][1]
            .as_str()
            .and_then(|value| value.parse::<f64>().ok())
            .is_some_and(|value| !value.is_nan())
    })
}

#[test]
fn dashboard_and_alerts_work_against_a_real_prometheus() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let input_topic = rand_name("ops-prom-events");
    create_topics(&bootstrap(), &[&input_topic], PARTITIONS);
    let topics = fresh_outputs(&input_topic);
    create_outputs(&topics, PARTITIONS);
    // A live stream: the input's own pace closes windows, no idle ticks mid-run.
    let base = ChildConfig::new(&rand_name("ops-prom"), EventTime::EOS, PARTITIONS);
    let mut configs = Vec::new();
    for name in ["produce", "aggregate", "sink"] {
        let mut config = base.clone();
        config.metrics_listen = format!("127.0.0.1:{}", free_port());
        let file = config.write(dir.path(), name, &topics, PARTITIONS);
        configs.push((config.metrics_listen, file));
    }
    let [
        (producer_address, producer_file),
        (aggregator_address, aggregator_file),
        (sink_address, sink_file),
    ] = <[_; 3]>::try_from(configs).expect("three configs");

    let scrape_config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - tally-alerts.yml
scrape_configs:
  - job_name: tally-producer
    static_configs: [{{targets: ["{producer_address}"]}}]
  - job_name: tally-aggregator
    static_configs: [{{targets: ["{aggregator_address}"]}}]
  - job_name: tally-sink
    static_configs: [{{targets: ["{sink_address}"]}}]
"#
    );
    let rules = repo().join("deploy/prometheus/tally-alerts.yml");
    let prometheus = PrometheusServer::start(&scrape_config, &[("tally-alerts.yml", &rules)]);
    eprintln!("prometheus ready after {:?}", started.elapsed());

    let mut aggregator = TallyChild::spawn(
        &[
            "aggregate",
            "--instance-id",
            &rand_name("ops-prom"),
            "--start-from",
            "earliest",
        ],
        &aggregator_file,
        dir.path(),
        "aggregate",
    );
    let database = format!("sqlite:{}", dir.path().join("billing.db").display());
    let mut sink = TallyChild::spawn(
        &[
            "sink",
            "--database",
            &database,
            "--group-id",
            &rand_name("ops-prom-sink"),
        ],
        &sink_file,
        dir.path(),
        "sink",
    );
    // Current timestamps: the simulated send time starts now and advances at the
    // real pace.
    let rate = RATE.to_string();
    let count = (RATE * RUN_SECS).to_string();
    let start_time = now_ms().to_string();
    let mut producer = TallyChild::spawn(
        &[
            "produce",
            "--count",
            &count,
            "--rate",
            &rate,
            "--real-rate",
            &rate,
            "--start-time",
            &start_time,
            "--tenants",
            "40",
            "--metrics-linger-ms",
            "60000",
        ],
        &producer_file,
        dir.path(),
        "produce",
    );
    // The run, plus a few scrapes after the last record.
    let run_end = Instant::now() + Duration::from_secs(RUN_SECS + 1);
    while Instant::now() < run_end {
        for (name, child) in [
            ("produce", &mut producer),
            ("aggregate", &mut aggregator),
            ("sink", &mut sink),
        ] {
            if let Some(status) = child.try_exit() {
                panic!("tally {name} exited ({status}):\n{}", child.log_tail());
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    // Every job up, and the run's rows emitted and stored within the panels' window
    // (the last windows close once idle ticks pass their end and lateness).
    wait_for(Duration::from_secs(30), "rows emitted and stored", || {
        let up = result_of(&prometheus, "up", "up == 1");
        let emitted = result_of(
            &prometheus,
            "emitted",
            "increase(tally_aggregator_window_emit_latency_seconds_count[30s]) > 0",
        );
        let stored = result_of(
            &prometheus,
            "stored",
            "increase(tally_sink_db_transaction_seconds_count[30s]) > 0",
        );
        (up.len() == 3 && !emitted.is_empty() && !stored.is_empty()).then_some(())
    });
    eprintln!("run done after {:?}", started.elapsed());

    // Every metric named by a panel or an alert has a series.
    let panels = dashboard_queries("1m", "5m");
    let alerts = alert_expressions();
    let mut names = BTreeSet::new();
    for panel in &panels {
        names.extend(metric_names(&panel.expression));
    }
    for (_, expression) in &alerts {
        names.extend(metric_names(expression));
    }
    assert!(names.len() > 20, "too few metric names found: {names:?}");
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| result_of(&prometheus, "series", &format!("count({name})")).is_empty())
        .collect();
    assert!(missing.is_empty(), "metrics without a series: {missing:?}");
    eprintln!(
        "{} metric names, {} panel queries, {} alert expressions",
        names.len(),
        panels.len(),
        alerts.len()
    );

    // Every panel query evaluates; traffic and latency panels return data.
    for panel in &panels {
        let result = result_of(&prometheus, &panel.panel, &panel.expression);
        if PANELS_WITH_DATA.contains(&panel.panel.as_str()) {
            assert!(
                has_number(&result),
                "panel {:?} returned no data for {}: {result:?}",
                panel.panel,
                panel.expression
            );
        }
    }
    for title in PANELS_WITH_DATA {
        assert!(
            panels.iter().any(|panel| panel.panel == title),
            "the dashboard has no panel {title:?}"
        );
    }
    // Every alert expression evaluates. (Whether one matches is the rule manager's
    // business below: an expression with a `for` may match a moment without firing.)
    for (alert, expression) in &alerts {
        let result = result_of(&prometheus, alert, expression);
        if !result.is_empty() {
            eprintln!("{alert} matches now: {result:?}");
        }
    }
    // The rule manager evaluated every rule without error; nothing fires.
    let rules = prometheus.api("/api/v1/rules");
    let mut evaluated = 0;
    for group in rules["data"]["groups"].as_array().expect("rule groups") {
        for rule in group["rules"].as_array().expect("rules") {
            assert_eq!(rule["health"], "ok", "rule {}: {rule}", rule["name"]);
            evaluated += 1;
        }
    }
    assert_eq!(evaluated, alerts.len(), "every alert rule loaded");
    let alerts_now = prometheus.api("/api/v1/alerts");
    let (firing, pending): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) = alerts_now["data"]
        ["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .partition(|alert| alert["state"] == "firing");
    if !pending.is_empty() {
        eprintln!("alerts pending: {pending:?}");
    }
    assert!(
        firing.is_empty(),
        "alerts firing after a healthy run: {firing:?}"
    );
    assert!(
        matches!(http_get(&aggregator_address, "/readyz"), Some((200, _))),
        "the aggregator is ready at the end of the run"
    );

    for (name, child) in [("sink", &mut sink), ("aggregate", &mut aggregator)] {
        child.terminate();
        let status = wait_for(Duration::from_secs(30), "a clean exit", || child.try_exit());
        assert!(
            status.success(),
            "tally {name} exit after SIGTERM: {status}"
        );
    }
    eprintln!("done in {:?}", started.elapsed());
}
