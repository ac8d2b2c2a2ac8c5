//! `tally demo` end to end: the built binary, no services, no Java on the PATH.
//!
//! The demo runs at a small size from an empty directory (its contracts are embedded)
//! and must exit 0. Its JSON report is then checked against the generator's ground
//! truth, which the test computes itself by running the same deterministic generator
//! in process:
//! - the conservation line (in, counted, corrections, duplicates, too late, rejected)
//!   equals the truth's counts;
//! - events and token sums by (cloud, channel partner) equal the truth's;
//! - the SQLite store's rows add up, per (window, dims, row kind), to the truth's
//!   events and tokens, and every row's gross, shares and net equal the tests' own
//!   pricing of its tokens ([`support::money`], not tally-core's arithmetic);
//! - revenue by (cloud, channel partner) and each beneficiary's share in the report
//!   equal the sums of those independently priced amounts.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::money::TruthContracts;
use support::sink::wait_exit;
use tally_gen::generator::DEFAULT_START_TIME_MS;
use tally_gen::{Generator, GeneratorConfig, GroundTruth};

const COUNT: u64 = 20_000;
const SECONDS: u64 = 4;
const EVENT_RATE: u64 = 100;
const SEED: u64 = 2_026;
const PARTITIONS: u32 = 3;
const TENANTS: u32 = 40;
/// The demo's own drain timeout is 120 s; this bounds the whole run.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// The PATH without any directory that holds `java` or `mvn`.
fn path_without_java() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let kept: Vec<&str> = path
        .split(':')
        .filter(|dir| {
            !dir.is_empty()
                && !["java", "javac", "mvn"]
                    .iter()
                    .any(|tool| Path::new(dir).join(tool).exists())
        })
        .collect();
    kept.join(":")
}

/// The truth of the records the demo generates with the test's flags, from the
/// generator run in this process (the aggregator's event-time parameters are the
/// config defaults, as the demo's are without a config file).
fn expected_truth() -> GroundTruth {
    let config = GeneratorConfig {
        seed: SEED,
        count: COUNT,
        start_time_ms: DEFAULT_START_TIME_MS,
        rate_per_sec: EVENT_RATE,
        partitions: PARTITIONS,
        tenants: TENANTS,
        ..GeneratorConfig::default()
    };
    let mut generator = Generator::new(config).expect("valid generator config");
    while generator.next_record().is_some() {}
    let truth = generator.truth();
    assert!(truth.is_conserved() && truth.complete);
    truth
}

fn int(value: &Value, field: &str) -> i64 {
    value[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} is an integer in {value}"))
}

/// Events and the four token sums.
type Tokens = [i64; 5];

fn add(sum: &mut Tokens, other: Tokens) {
    for (a, b) in sum.iter_mut().zip(other) {
        *a += b;
    }
}

/// (window start, tenant, model, cloud, channel partner or "", region, billable).
type RowKey = (i64, String, String, String, String, String, bool);

/// A row of the store as the test reads it with its own SQL.
struct StoredRow {
    id: String,
    key: RowKey,
    tokens: Tokens,
    gross: i64,
    net: i64,
}

/// Each row id's shares: (beneficiary, micro-units), sorted.
type RowShares = BTreeMap<String, Vec<(String, i64)>>;

fn read_rows(path: &Path) -> (Vec<StoredRow>, RowShares) {
    let connection = rusqlite::Connection::open(path).expect("open the demo's store");
    let mut statement = connection
        .prepare(
            "SELECT id, window_start_ms, tenant_id, model, cloud, coalesce(channel_partner, ''), \
             region, row_kind, event_count, input_tokens, cached_input_tokens, output_tokens, \
             reasoning_tokens, gross_micros, net_micros FROM tally_rows",
        )
        .expect("rows query");
    let rows = statement
        .query_map([], |row| {
            Ok(StoredRow {
                id: row.get(0)?,
                key: (
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                    row.get(6)?,
                    row.get::<_, String>(7)? == "billable",
                ),
                tokens: [
                    row.get(8)?,
                    row.get(9)?,
                    row.get(10)?,
                    row.get(11)?,
                    row.get(12)?,
                ],
                gross: row.get(13)?,
                net: row.get(14)?,
            })
        })
        .expect("rows")
        .collect::<Result<Vec<_>, _>>()
        .expect("rows decode");
    let mut shares = RowShares::new();
    let mut statement = connection
        .prepare("SELECT row_id, beneficiary, amount_micros FROM tally_row_shares")
        .expect("shares query");
    for share in statement
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })
        .expect("shares")
    {
        let (row_id, beneficiary, amount) = share.expect("share decodes");
        shares
            .entry(row_id)
            .or_default()
            .push((beneficiary, amount));
    }
    for list in shares.values_mut() {
        list.sort();
    }
    (rows, shares)
}

#[test]
fn demo_without_java_reports_the_generators_truth() {
    let dir = tempfile::tempdir().expect("temp dir");
    let work = dir.path().join("elsewhere");
    std::fs::create_dir_all(&work).expect("working dir");
    let out = dir.path().join("demo");
    let json = dir.path().join("demo.json");
    let path = path_without_java();
    for tool in ["java", "mvn"] {
        assert!(
            !path
                .split(':')
                .any(|dir| Path::new(dir).join(tool).exists()),
            "{tool} is still on the PATH"
        );
    }

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "demo",
            "--count",
            &COUNT.to_string(),
            "--seconds",
            &SECONDS.to_string(),
            "--event-rate",
            &EVENT_RATE.to_string(),
            "--seed",
            &SEED.to_string(),
            "--partitions",
            &PARTITIONS.to_string(),
            "--tenants",
            &TENANTS.to_string(),
        ])
        .arg("--dir")
        .arg(&out)
        .arg("--json")
        .arg(&json)
        .current_dir(&work)
        .env_clear()
        .env("PATH", &path)
        .env("HOME", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tally demo");
    let status = wait_exit(&mut child, RUN_TIMEOUT);
    let output = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        status.success(),
        "tally demo failed ({status}):\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    eprintln!("tally demo took {:?}", started.elapsed());

    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the demo wrote its JSON"))
            .expect("the JSON parses");
    let truth = expected_truth();

    // Conservation, from the aggregator's committed counters.
    let conservation = &result["conservation"];
    assert_eq!(
        [
            int(conservation, "in"),
            int(conservation, "counted"),
            int(conservation, "corrections"),
            int(conservation, "duplicates"),
            int(conservation, "too_late"),
            int(conservation, "rejected"),
        ],
        [
            truth.produced,
            truth.counted,
            truth.counted_corrections,
            truth.duplicates,
            truth.too_late,
            truth.rejected,
        ]
        .map(|count| i64::try_from(count).expect("small")),
        "conservation line"
    );
    assert_eq!(conservation["conserved"], Value::Bool(true));
    assert!(
        truth.counted_corrections > 0
            && truth.duplicates > 0
            && truth.too_late > 0
            && truth.rejected > 0,
        "the run exercises every record class"
    );

    // Events and tokens by (cloud, channel partner).
    let mut truth_by_channel: BTreeMap<(String, String), Tokens> = BTreeMap::new();
    let contracts = TruthContracts::default_file();
    let mut truth_by_row: BTreeMap<RowKey, Tokens> = BTreeMap::new();
    for window in &truth.windows {
        let partner = window.channel_partner.clone().unwrap_or_default();
        for (status, panes) in &window.by_status_sums {
            for pane in [&panes.on_time, &panes.correction] {
                if pane.events == 0 {
                    continue;
                }
                let tokens = [
                    pane.events,
                    pane.input_tokens,
                    pane.cached_input_tokens,
                    pane.output_tokens,
                    pane.reasoning_tokens,
                ]
                .map(|value| i64::try_from(value).expect("small"));
                add(
                    truth_by_channel
                        .entry((window.cloud.clone(), partner.clone()))
                        .or_default(),
                    tokens,
                );
                let key = (
                    window.window_start_ms,
                    window.tenant_id.clone(),
                    window.model.clone(),
                    window.cloud.clone(),
                    partner.clone(),
                    window.region.clone(),
                    contracts.is_billable(status, window.window_start_ms),
                );
                add(truth_by_row.entry(key).or_default(), tokens);
            }
        }
    }
    let lines = result["by_cloud_partner"]
        .as_array()
        .expect("by_cloud_partner is a list");
    let mut reported: BTreeMap<(String, String), Tokens> = BTreeMap::new();
    let mut reported_money: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for line in lines {
        let key = (
            line["cloud"].as_str().expect("cloud").to_owned(),
            line["channel_partner"]
                .as_str()
                .expect("channel_partner")
                .to_owned(),
        );
        reported.insert(
            key.clone(),
            [
                int(line, "events"),
                int(line, "input_tokens"),
                int(line, "cached_input_tokens"),
                int(line, "output_tokens"),
                int(line, "reasoning_tokens"),
            ],
        );
        reported_money.insert(key, (int(line, "gross_micros"), int(line, "net_micros")));
    }
    assert_eq!(
        reported, truth_by_channel,
        "events and tokens by (cloud, channel partner)"
    );

    // The store's rows: tokens per (window, dims, kind) as the truth says, every
    // amount as the tests' own pricing says.
    let sqlite = PathBuf::from(result["sqlite"].as_str().expect("sqlite path"));
    assert!(sqlite.starts_with(&out), "the store is in --dir");
    let (rows, row_shares) = read_rows(&sqlite);
    assert_eq!(
        i64::try_from(rows.len()).expect("small"),
        int(&result, "rows_stored")
    );
    assert_eq!(int(&result, "rows_stored"), int(&result, "rows_emitted"));
    let mut stored_by_row: BTreeMap<RowKey, Tokens> = BTreeMap::new();
    let mut expected_money: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    let mut expected_shares: BTreeMap<String, i64> = BTreeMap::new();
    let mut priced_with_shares = 0_usize;
    for row in &rows {
        add(
            stored_by_row.entry(row.key.clone()).or_default(),
            row.tokens,
        );
        let (window_start, _, model, cloud, partner, _, billable) = &row.key;
        let tokens = [row.tokens[1], row.tokens[2], row.tokens[3], row.tokens[4]]
            .map(|value| u64::try_from(value).expect("non-negative tokens"));
        let expected = contracts
            .expected(
                model,
                cloud,
                (!partner.is_empty()).then_some(partner.as_str()),
                *window_start,
                tokens,
                *billable,
            )
            .expect("the contracts price every stored row");
        let shares: Vec<(String, i64)> = expected
            .shares
            .iter()
            .map(|(beneficiary, _, amount)| (beneficiary.clone(), *amount))
            .collect();
        assert_eq!(
            (
                row.gross,
                row.net,
                row_shares.get(&row.id).cloned().unwrap_or_default()
            ),
            (expected.gross_micros, expected.net_micros, shares.clone()),
            "row {} amounts",
            row.id
        );
        if !shares.is_empty() && expected.gross_micros > 0 {
            priced_with_shares += 1;
        }
        let money = expected_money
            .entry((cloud.clone(), partner.clone()))
            .or_default();
        money.0 += expected.gross_micros;
        money.1 += expected.net_micros;
        for (beneficiary, amount) in shares {
            *expected_shares.entry(beneficiary).or_default() += amount;
        }
    }
    assert_eq!(
        stored_by_row, truth_by_row,
        "store sums per (window, dims, row kind)"
    );
    assert!(priced_with_shares > 0, "some rows carry partner shares");
    assert_eq!(
        reported_money, expected_money,
        "gross and net by (cloud, channel partner)"
    );
    let reported_shares: BTreeMap<String, i64> = result["shares"]
        .as_array()
        .expect("shares is a list")
        .iter()
        .map(|share| {
            (
                share["beneficiary"]
                    .as_str()
                    .expect("beneficiary")
                    .to_owned(),
                int(share, "share_micros"),
            )
        })
        .collect();
    assert_eq!(reported_shares, expected_shares, "shares by beneficiary");

    // The sample files exist and the report says what the demo is.
    for field in ["report_file", "shares_file"] {
        let file = PathBuf::from(result[field].as_str().expect(field));
        assert!(
            std::fs::metadata(&file).is_ok_and(|meta| meta.len() > 0),
            "{field} {} was written",
            file.display()
        );
    }
}
