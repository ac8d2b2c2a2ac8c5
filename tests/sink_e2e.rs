//! `tally sink` against a real broker and real databases.
//!
//! Needs `TALLY_TEST_BOOTSTRAP` and `TALLY_TEST_PG_URL` (deploy/local/test.sh starts
//! both). One generated input is aggregated once by the real `tally aggregate`
//! binary; the PostgreSQL and SQLite tests then each load its billing.aggregates
//! topic into their own store (their own database or file, their own group).
//!
//! Checked after every load, from a read_committed read of billing.aggregates and SQL
//! run by the test: the store holds exactly the topic's rows (ids, SHA-256 of the
//! record bytes, and the decoded fields), each once, and the 15-minute roll-ups and
//! share roll-ups equal the sums the test computes from the decoded records, the
//! generator's token truth per bucket and dims, and money recomputed from each row's
//! tokens and the contracts (tests/support/money.rs).
//!
//! The SQLite load then also checks what finance reads from that store against the
//! test's own arithmetic over the stored rows: `tally statement`, and `tally export`
//! for AWS, Azure and GCP (hour by hour, each with its own rules).

mod support;

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use support::TestTopics;
use support::eos::{
    ChildConfig, ReadRecord, create_outputs, free_port, fresh_outputs, produce_generated,
    read_committed, verify_against_truth,
};
use support::exports::Market;
use support::money::TruthContracts;
use support::prometheus::{parse, scrape};
use support::rand_name;
use support::sink::{
    EVENT_TIME, PARTITIONS, RUN_TIMEOUT, SinkProcess, assert_store_equals, pg_fresh_database,
    pg_row_count, pg_snapshot, sink_config, sqlite_row_count, sqlite_snapshot, wait_exit,
    wait_for_rows,
};
use support::sink_soak::{
    assert_rollup_money_recomputed, assert_rollups_equal_truth, stored_row_expected,
};

/// The aggregated input every load test reads.
struct Fixture {
    topics: TestTopics,
    truth: tally_gen::GroundTruth,
    records: Vec<ReadRecord>,
    dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let started = Instant::now();
        let input = produce_generated(
            &rand_name("sink-test-events"),
            EVENT_TIME.generator(8_000, 23, PARTITIONS),
            true,
        );
        let topics = fresh_outputs(&input.topic);
        create_outputs(&topics, PARTITIONS);
        let dir = tempfile::tempdir().expect("temp dir");
        let group = rand_name("sink-test-aggregator");
        let config = ChildConfig::new(&group, EVENT_TIME, PARTITIONS).write(
            dir.path(),
            "aggregate",
            &topics,
            PARTITIONS,
        );
        let mut aggregator = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([
                "aggregate",
                "--instance-id",
                &rand_name("sink-test"),
                "--start-from",
                "earliest",
                "--exit-after-idle-ms",
                "1500",
                "--config",
            ])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tally aggregate");
        let status = wait_exit(&mut aggregator, RUN_TIMEOUT);
        assert!(status.success(), "tally aggregate failed: {status}");
        // The topic's rows equal the generator's ground truth (the aggregator's own
        // check), so a store equal to the topic equals the truth too.
        verify_against_truth(&input, &topics, &group, PARTITIONS);
        let records = read_committed(
            &support::bootstrap(),
            &topics.billing_aggregates,
            PARTITIONS,
        );
        assert!(records.len() > 500, "too few rows: {}", records.len());
        eprintln!("fixture: {} rows in {:?}", records.len(), started.elapsed());
        Fixture {
            topics,
            truth: input.truth,
            records,
            dir,
        }
    })
}

#[test]
fn postgres_store_equals_the_topic_and_rollups_equal_the_rows() {
    let fixture = fixture();
    let started = Instant::now();
    let url = pg_fresh_database();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let config = sink_config(fixture.dir.path(), "sink-pg", &fixture.topics, &listen, &[]);
    let mut sink = SinkProcess::spawn(&config, &url, &rand_name("sink-pg"), &[]);
    let expected_rows = fixture.records.len() as i64;
    wait_for_rows("postgres", expected_rows, || pg_row_count(&url), &mut sink);

    let metrics = parse(&scrape(&listen));
    assert_eq!(
        metrics.sum("tally_sink_rows_written_total"),
        Some(expected_rows as f64),
        "rows written"
    );
    let batches = metrics
        .sum("tally_sink_batches_total")
        .expect("batches counted");
    assert!(batches >= 1.0);
    assert_eq!(
        metrics.sum("tally_sink_db_transaction_seconds_count"),
        Some(batches),
        "one latency sample per committed batch"
    );
    assert_eq!(
        metrics.sum("tally_sink_conflicts_total").unwrap_or(0.0),
        0.0
    );
    assert!(metrics.help.contains_key("tally_sink_rows_written_total"));

    // SIGTERM: the open batch (none) is written and the process exits 0.
    let pid = sink.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = wait_exit(&mut sink.child, Duration::from_secs(30));
    assert!(exit.success(), "sink exit after SIGTERM: {exit}");

    assert_store_matches_everything(&pg_snapshot(&url), fixture);

    // A second sink of another group over the same store reads everything again
    // from the store's offsets: nothing to do, nothing changes.
    let before = pg_snapshot(&url);
    let mut again = SinkProcess::spawn(
        &config_without_metrics(fixture),
        &url,
        &rand_name("sink-pg-2"),
        &["--exit-after-idle-ms", "1000"],
    );
    let exit = wait_exit(&mut again.child, RUN_TIMEOUT);
    assert!(exit.success(), "second sink: {exit}");
    assert_eq!(
        pg_snapshot(&url),
        before,
        "a restart from the store's offsets changes nothing"
    );
    eprintln!("postgres test took {:?}", started.elapsed());
}

fn config_without_metrics(fixture: &Fixture) -> std::path::PathBuf {
    sink_config(fixture.dir.path(), "sink-quiet", &fixture.topics, "", &[])
}

#[test]
fn sqlite_store_survives_a_sigkill_mid_run() {
    let fixture = fixture();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("billing.db");
    let database = format!("sqlite:{}", path.display());
    // Small fetches and small batches: the load takes seconds, so the kill lands in it.
    let config = sink_config(
        dir.path(),
        "sink-sqlite",
        &fixture.topics,
        "",
        &[
            ("max.partition.fetch.bytes", "2048"),
            ("fetch.wait.max.ms", "20"),
            ("queued.min.messages", "1"),
            ("fetch.queue.backoff.ms", "20"),
        ],
    );
    let group = rand_name("sink-sqlite");
    let total = fixture.records.len() as i64;
    let mut sink = SinkProcess::spawn(&config, &database, &group, &["--batch-max-rows", "5"]);
    let kill_started = Instant::now();
    let mut at_kill = 0;
    while at_kill < total / 10 {
        at_kill = sqlite_row_count(&path);
        assert!(
            sink.child.try_wait().expect("wait").is_none(),
            "the sink exited before the kill"
        );
        assert!(
            kill_started.elapsed() < RUN_TIMEOUT,
            "no progress: {at_kill} rows"
        );
        thread::sleep(Duration::from_millis(5));
    }
    sink.child.kill().expect("SIGKILL");
    let _ = sink.child.wait();
    let after_kill = sqlite_row_count(&path);
    assert!(
        after_kill < total,
        "the kill must land mid-run: {after_kill} of {total} rows stored"
    );
    eprintln!("killed at {after_kill} of {total} rows");

    let mut restarted = SinkProcess::spawn(
        &config_without_metrics(fixture),
        &database,
        &group,
        &["--exit-after-idle-ms", "1000"],
    );
    let exit = wait_exit(&mut restarted.child, RUN_TIMEOUT);
    assert!(exit.success(), "restarted sink: {exit}");
    assert_store_matches_everything(&sqlite_snapshot(&path), fixture);
    eprintln!("sqlite test took {:?}", started.elapsed());
}

/// The store equals the topic, and its roll-ups equal the generator's truth and the
/// recomputed money.
fn assert_store_matches_everything(snapshot: &support::sink::Snapshot, fixture: &Fixture) {
    assert_store_equals(snapshot, &fixture.records);
    assert_rollups_equal_truth(snapshot, &fixture.truth);
    assert_rollup_money_recomputed(snapshot, &TruthContracts::default_file());
}

#[test]
fn sqlite_store_equals_the_topic_in_one_uninterrupted_run() {
    let fixture = fixture();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("billing.db");
    let database = format!("sqlite:{}", path.display());
    let mut sink = SinkProcess::spawn(
        &config_without_metrics(fixture),
        &database,
        &rand_name("sink-sqlite-happy"),
        &["--exit-after-idle-ms", "1000"],
    );
    let exit = wait_exit(&mut sink.child, RUN_TIMEOUT);
    assert!(exit.success(), "sink: {exit}");
    assert_store_matches_everything(&sqlite_snapshot(&path), fixture);
    let foreign: i64 = rusqlite::Connection::open(&path)
        .and_then(|db| {
            db.query_row("SELECT count(*) FROM tally_foreign_row_ids", [], |row| {
                row.get(0)
            })
        })
        .expect("count foreign ids");
    assert_eq!(
        foreign, 0,
        "every row the aggregator wrote has a derived id"
    );
    assert_statement_matches_contracts(&database, &sqlite_snapshot(&path));
    for market in [Market::Aws, Market::Azure, Market::Gcp] {
        assert_export_matches_rows(&database, &sqlite_snapshot(&path), market);
    }
    eprintln!("sqlite happy path took {:?}", started.elapsed());
}

/// `tally statement` over a generated run: for the beneficiary with the most rows, each
/// CSV line (usage per channel, model, versions, currency and basis points;
/// corrections per window and sequence) equals the sums the test computes from the
/// stored rows' token sums and the contracts with its own arithmetic
/// (tests/support/money.rs), and a re-run writes the same bytes.
fn assert_statement_matches_contracts(database: &str, snapshot: &support::sink::Snapshot) {
    use std::collections::BTreeMap;
    use support::money::{civil_from_days, days_from_civil, format_utc_ms};

    let contracts = TruthContracts::default_file();
    // (beneficiary, line key) → (rows, gross, amount); keys as the CSV's first 9 cells.
    /// A statement's lines: key cells → (rows, gross, amount).
    type Lines = BTreeMap<Vec<String>, (i64, i64, i64)>;
    let mut lines: BTreeMap<String, Lines> = BTreeMap::new();
    let first_window = snapshot
        .rows
        .values()
        .map(|(_, ints, _)| ints[0])
        .min()
        .expect("rows");
    let (year, month, _) = civil_from_days(first_window.div_euclid(86_400_000));
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let from = days_from_civil(year, month, 1) * 86_400_000;
    let to = days_from_civil(next_year, next_month, 1) * 86_400_000;
    for (_digest, ints, texts) in snapshot.rows.values() {
        if ints[0] < from || ints[0] >= to {
            continue;
        }
        let channel_partner = (texts[3] != "-").then_some(texts[3].as_str());
        let expected = stored_row_expected(&contracts, ints, texts).expect("priced");
        for (beneficiary, basis_points, amount) in &expected.shares {
            let correction = ints[2] > 0;
            let key = vec![
                if correction { "correction" } else { "usage" }.to_owned(),
                texts[2].clone(),
                channel_partner.unwrap_or_default().to_owned(),
                texts[1].clone(),
                expected.price_book_version.clone(),
                expected.share_rule_version.clone(),
                if correction {
                    format_utc_ms(ints[0])
                } else {
                    String::new()
                },
                ints[2].to_string(),
                expected.currency.clone(),
                basis_points.to_string(),
            ];
            let line = lines
                .entry(beneficiary.clone())
                .or_default()
                .entry(key)
                .or_default();
            line.0 += 1;
            line.1 += expected.gross_micros;
            line.2 += amount;
        }
    }
    let (partner, want) = lines
        .iter()
        .max_by_key(|(_, lines)| lines.values().map(|line| line.0).sum::<i64>())
        .expect("a beneficiary with shares in the generated run");
    let period = format!("{year:04}-{month:02}");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("quiet.toml");
    std::fs::write(&config, "[metrics]\nlisten = \"\"\n").expect("config");
    let run = |name: &str| {
        let out = dir.path().join(name);
        let output = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["statement", "--database", database, "--partner", partner])
            .args([
                "--period", &period, "--tz", "UTC", "--format", "csv", "--out",
            ])
            .arg(&out)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run tally statement");
        assert!(
            output.status.success(),
            "tally statement: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::read(&out).expect("statement file")
    };
    let first = run("first.csv");
    assert_eq!(run("again.csv"), first, "a re-run writes the same bytes");
    let text = String::from_utf8(first).expect("utf-8");
    let mut got: BTreeMap<Vec<String>, (i64, i64, i64)> = BTreeMap::new();
    let mut totals: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')).skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), 13, "{line}");
        let number = |index: usize| -> i64 { cells[index].parse().expect(line) };
        if cells[0] == "total" {
            totals.insert(cells[8].to_owned(), (number(9), number(10), number(12)));
            continue;
        }
        let mut key: Vec<String> = cells[..9].iter().map(|cell| (*cell).to_owned()).collect();
        key.push(cells[11].to_owned());
        assert!(
            got.insert(key, (number(9), number(10), number(12)))
                .is_none(),
            "one line per key: {line}"
        );
    }
    assert_eq!(&got, want, "statement lines for {partner} in {period}");
    let mut want_totals: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for (key, (rows, gross, amount)) in want {
        let total = want_totals.entry(key[8].clone()).or_default();
        total.0 += rows;
        total.1 += gross;
        total.2 += amount;
    }
    assert_eq!(
        totals, want_totals,
        "statement totals for {partner} in {period}"
    );
    let corrections = got.keys().filter(|key| key[0] == "correction").count();
    assert!(corrections > 0, "the generated run has corrections: {text}");
    eprintln!(
        "statement for {partner} in {period}: {} lines ({corrections} corrections), \
         totals {totals:?}; first and last lines:\n{}",
        got.len(),
        text.lines()
            .take(7)
            .chain(
                text.lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
            )
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// `tally export` over a generated run, hour by hour as each hour passes the liveness
/// bound (GCP takes an hour only until two hours after its start): every tenant of the
/// market's cloud mapped to a customer, output tokens per 1 000 and input tokens per
/// 100 000 of every model as dimensions. The request files hold exactly the records the
/// test computes from the stored rows with the market's rules (whole units, the
/// fraction carried to the next hour; AWS sends a record for every hour with usage or
/// units, Azure positive quantities only, GCP a consumer's metric every hour once it
/// reported it, 0 included), no request holds more than 25 records, quantities are
/// integers in the market's range, and a re-run writes byte-identical files (the hours
/// are in the store's ledger: the same requests again, never new ones).
fn assert_export_matches_rows(database: &str, snapshot: &support::sink::Snapshot, market: Market) {
    use std::collections::{BTreeMap, BTreeSet};
    use support::exports::{all_records, request_files};
    use support::finance::{HOUR_MS, finance_config};
    use support::money::format_utc_ms;
    /// The liveness bound of `finance_config`: 60 s + 30 s + 10 s + 2 × 1 s.
    const LIVENESS_MS: i64 = 102_000;
    const MEASURES: [(&str, usize, i64); 2] = [("output_1k", 6, 1_000), ("input_100k", 4, 100_000)];
    let name = market.name();

    let rows: Vec<&(String, Vec<i64>, Vec<String>)> = snapshot
        .rows
        .values()
        .filter(|(_, _, texts)| texts[2] == name && texts[5] == "billable")
        .collect();
    let tenants: BTreeSet<&str> = rows.iter().map(|(_, _, texts)| texts[0].as_str()).collect();
    let models: BTreeSet<&str> = rows.iter().map(|(_, _, texts)| texts[1].as_str()).collect();
    let customer = |tenant: &str| {
        let index = tenants
            .iter()
            .position(|known| *known == tenant)
            .expect("tenant");
        match market {
            Market::Aws => format!("{:012}", 100_000_000_000_u64 + index as u64),
            Market::Azure => format!("res-{index}"),
            Market::Gcp => format!("project:p{index}"),
        }
    };
    let mut mapping = match market {
        Market::Aws => String::from("[aws]\nproduct_code = \"prod-gen\"\n[aws.customers]\n"),
        Market::Azure => String::from("[azure]\n[azure.customers]\n"),
        Market::Gcp => String::from(
            "[gcp]\nservice_name = \"atlas.endpoints.gen.cloud.goog\"\n[gcp.customers]\n",
        ),
    };
    for tenant in &tenants {
        let entry = match market {
            Market::Aws => format!("account_id = \"{}\"", customer(tenant)),
            Market::Azure => {
                format!("resource_id = \"{}\", plan_id = \"gold\"", customer(tenant))
            }
            Market::Gcp => format!("consumer_id = \"{}\"", customer(tenant)),
        };
        mapping.push_str(&format!("\"{tenant}\" = {{ {entry} }}\n"));
    }
    for model in &models {
        for (suffix, column, unit) in MEASURES {
            let measure = if column == 6 {
                "output_tokens"
            } else {
                "input_tokens"
            };
            mapping.push_str(&format!(
                "[[{name}.dimensions]]\nmodel = \"{model}\"\nmeasure = \"{measure}\"\n\
                 dimension = \"{model}_{suffix}\"\nunit_size = {unit}\n"
            ));
        }
    }
    // Measure per (customer, dimension) and hour, from the stored rows.
    let mut usage: BTreeMap<(String, String), BTreeMap<i64, i64>> = BTreeMap::new();
    for (_, ints, texts) in &rows {
        for (suffix, column, _) in MEASURES {
            *usage
                .entry((customer(&texts[0]), format!("{}_{suffix}", texts[1])))
                .or_default()
                .entry(ints[0].div_euclid(HOUR_MS) * HOUR_MS)
                .or_default() += ints[column];
        }
    }
    let unit_of = |dimension: &str| {
        MEASURES
            .iter()
            .find(|(suffix, _, _)| dimension.ends_with(suffix))
            .map(|(_, _, unit)| *unit)
            .expect("unit")
    };
    let first_hour = usage
        .values()
        .filter_map(|hours| hours.keys().next().copied())
        .min();
    let last_hour = usage
        .values()
        .filter_map(|hours| hours.keys().last().copied())
        .max();
    let (Some(first_hour), Some(last_hour)) = (first_hour, last_hour) else {
        panic!("the generated run has {name} usage");
    };
    let mut want: BTreeMap<(String, String, i64), i64> = BTreeMap::new();
    for ((customer, dimension), hours) in &usage {
        let (mut through, mut exported, mut reported) = (0_i64, 0_i64, false);
        let mut hour = first_hour;
        while hour <= last_hour {
            let new = hours.get(&hour).copied().unwrap_or(0);
            through += new;
            let quantity = through / unit_of(dimension) - exported;
            let emit = match market {
                Market::Aws => new > 0 || quantity > 0,
                Market::Azure => quantity > 0,
                Market::Gcp => new > 0 || quantity > 0 || reported,
            };
            if emit {
                exported += quantity;
                reported = true;
                want.insert((customer.clone(), dimension.clone(), hour), quantity);
            }
            hour += HOUR_MS;
        }
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let mapping_path = dir.path().join("mapping.toml");
    std::fs::write(&mapping_path, mapping).expect("mapping");
    let config = finance_config(dir.path());
    let export = |out: &std::path::Path, now: i64| {
        let output = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["export", "--database", database, "--marketplace", name])
            .arg("--mapping")
            .arg(&mapping_path)
            .arg("--out")
            .arg(out)
            .args([
                "--now",
                &format_utc_ms(now),
                "--skip-kafka-check",
                "--config",
            ])
            .arg(&config)
            .output()
            .expect("run tally export");
        assert!(
            output.status.success(),
            "tally export: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    // (customer, dimension, hour) → quantity of every request file; name → bytes.
    let read = |out: &std::path::Path| {
        let plan = if market == Market::Azure { "gold" } else { "" };
        let got = all_records(out, market, "prod-gen", |_| plan.to_owned());
        (got, request_files(out, market))
    };
    let out = dir.path().join("hourly");
    let mut now = first_hour;
    let mut hour = first_hour;
    while hour <= last_hour {
        now = hour + HOUR_MS + LIVENESS_MS;
        export(&out, now);
        hour += HOUR_MS;
    }
    let (got, first_bytes) = read(&out);
    assert_eq!(got, want, "{name} records of the generated run");
    let again = dir.path().join("again");
    export(&again, now);
    let (_, again_bytes) = read(&again);
    assert_eq!(again_bytes, first_bytes, "a re-run writes the same files");
    eprintln!(
        "{name} export of the generated run: {} records over {} hours",
        got.len(),
        (last_hour - first_hour) / HOUR_MS + 1
    );
}
