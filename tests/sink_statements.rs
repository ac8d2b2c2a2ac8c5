//! `tally statement`: a partner's monthly statement equals what the test computes from
//! the rows it wrote and the contracts (its own arithmetic, [`support::money`]); totals
//! are the sums of the lines; a channel with two beneficiaries counts its gross once;
//! corrections are lines of their own; the statement regenerates byte for byte from
//! the offsets it names, in SQLite and PostgreSQL alike.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use support::finance::{
    FEB_2026_MS, HOUR_MS, MINUTE_MS, RowSpec, TOPIC, finance_config, tally_ok, write_rows,
};
use support::money::{TruthContracts, format_utc_ms};
use support::sink::pg_fresh_database_named;
use tally_core::event::Cloud;
use tally_sink::StoreLocation;

const DAY_MS: i64 = 86_400_000;
/// Asia/Kolkata is UTC+5:30 all year (no DST).
const KOLKATA_MS: i64 = 5 * HOUR_MS + 30 * MINUTE_MS;

const CHANNELS: [(Cloud, Option<&str>); 6] = [
    (Cloud::Aws, None),
    (Cloud::Gcp, Some("northwind")),
    (Cloud::Gcp, None),
    (Cloud::Azure, None),
    (Cloud::Openai, None),
    (Cloud::Oracle, Some("contoso")),
];
const MODELS: [&str; 3] = ["atlas-large", "atlas-mini", "atlas-reasoning"];

fn tokens(i: u64) -> [u64; 4] {
    [
        1_000 + (i * 37) % 5_000,
        (i * 11) % 700,
        200 + (i * 53) % 3_000,
        (i % 4) * 100,
    ]
}

/// February 2026 usage, rows near the month's edges, corrections and non-billable rows.
fn first_specs() -> Vec<RowSpec> {
    let mut specs = Vec::new();
    for i in 0..240_u64 {
        let index = usize::try_from(i).expect("small");
        let (cloud, partner) = CHANNELS[index % CHANNELS.len()];
        let start = FEB_2026_MS
            + i64::try_from(i).expect("small") * 2 * HOUR_MS
            + i64::try_from(i % 60).expect("small") * MINUTE_MS;
        let mut spec = RowSpec::new(
            start,
            &format!("t-{:02}", i % 5),
            MODELS[index % MODELS.len()],
            cloud,
            partner,
            tokens(i),
        );
        spec.billable = i % 17 != 5;
        specs.push(spec);
    }
    // Edges: in Kolkata's February but UTC's January (share rules 2024-01), and in
    // UTC's February but Kolkata's March.
    for (offset, (cloud, partner)) in CHANNELS.iter().enumerate() {
        let offset = i64::try_from(offset).expect("small");
        specs.push(RowSpec::new(
            FEB_2026_MS - 4 * HOUR_MS + offset * MINUTE_MS,
            "t-edge",
            "atlas-large",
            *cloud,
            *partner,
            tokens(900 + offset.unsigned_abs()),
        ));
        specs.push(RowSpec::new(
            FEB_2026_MS + 28 * DAY_MS - 3 * HOUR_MS + offset * MINUTE_MS,
            "t-edge",
            "atlas-mini",
            *cloud,
            *partner,
            tokens(950 + offset.unsigned_abs()),
        ));
    }
    // Correction panes of earlier windows: sequence 1 for twelve, 2 for four.
    for i in 0..12_usize {
        let mut correction = specs[i * 7].clone();
        correction.correction_seq = 1;
        correction.billable = true;
        correction.tokens = tokens(500 + i as u64);
        specs.push(correction.clone());
        if i < 4 {
            correction.correction_seq = 2;
            correction.tokens = tokens(700 + i as u64);
            specs.push(correction);
        }
    }
    specs
}

/// More February usage, written after the first statement.
fn later_specs() -> Vec<RowSpec> {
    (0..30_u64)
        .map(|i| {
            let index = usize::try_from(i).expect("small");
            let (cloud, partner) = CHANNELS[index % CHANNELS.len()];
            RowSpec::new(
                FEB_2026_MS + 10 * DAY_MS + i64::try_from(i).expect("small") * 5 * MINUTE_MS + 30,
                "t-late",
                "atlas-mini",
                cloud,
                partner,
                tokens(2_000 + i),
            )
        })
        .collect()
}

/// (kind, window start RFC 3339 or "", seq, cloud, partner, model, price, share,
/// currency, basis points).
type Key = (
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
);
/// (rows, gross, amount) per line.
type Lines = BTreeMap<Key, (i64, i64, i64)>;

/// The statement the test expects for `partner` over `[from, to)`.
fn expected(
    contracts: &TruthContracts,
    specs: &[RowSpec],
    partner: &str,
    from: i64,
    to: i64,
) -> Lines {
    let mut lines = Lines::new();
    for spec in specs {
        if spec.window_start_ms < from || spec.window_start_ms >= to {
            continue;
        }
        let amounts = contracts
            .expected(
                &spec.model,
                spec.cloud.as_str(),
                spec.channel_partner.as_deref(),
                spec.window_start_ms,
                spec.tokens,
                spec.billable,
            )
            .expect("priced");
        let Some((_, bps, amount)) = amounts.shares.iter().find(|(who, _, _)| who == partner)
        else {
            continue;
        };
        let correction = spec.correction_seq > 0;
        let key = (
            if correction { "correction" } else { "usage" }.to_owned(),
            if correction {
                format_utc_ms(spec.window_start_ms)
            } else {
                String::new()
            },
            i64::from(spec.correction_seq),
            spec.cloud.as_str().to_owned(),
            spec.channel_partner.clone().unwrap_or_default(),
            spec.model.clone(),
            amounts.price_book_version.clone(),
            amounts.share_rule_version.clone(),
            amounts.currency.clone(),
            i64::from(*bps),
        );
        let entry = lines.entry(key).or_insert((0, 0, 0));
        entry.0 += 1;
        entry.1 += amounts.gross_micros;
        entry.2 += amount;
    }
    lines
}

fn statement_json(database: &str, partner: &str, tz: &str, config: &Path) -> serde_json::Value {
    let text = tally_ok(
        &[
            "statement",
            "--database",
            database,
            "--partner",
            partner,
            "--period",
            "2026-02",
            "--tz",
            tz,
            "--format",
            "json",
        ],
        config,
    );
    serde_json::from_str(&text).expect("statement json")
}

fn lines_of(statement: &serde_json::Value) -> Lines {
    let mut lines = Lines::new();
    let mut seen_correction = false;
    for line in statement["lines"].as_array().expect("lines") {
        let text = |name: &str| line[name].as_str().expect(name).to_owned();
        let int = |name: &str| line[name].as_i64().expect(name);
        let kind = text("line");
        if kind == "correction" {
            seen_correction = true;
        } else {
            assert!(!seen_correction, "usage lines come before corrections");
        }
        let key = (
            kind,
            text("window_start"),
            int("correction_seq"),
            text("cloud"),
            text("channel_partner"),
            text("model"),
            text("price_book_version"),
            text("share_rule_version"),
            text("currency"),
            int("basis_points"),
        );
        let figures = (int("rows"), int("gross_micros"), int("amount_micros"));
        assert!(lines.insert(key, figures).is_none(), "a line appears twice");
    }
    lines
}

fn check_statement(
    contracts: &TruthContracts,
    specs: &[RowSpec],
    database: &str,
    config: &Path,
    covers: &str,
) {
    for (partner, tz, from) in [
        ("microsoft", "UTC", FEB_2026_MS),
        ("microsoft", "Asia/Kolkata", FEB_2026_MS - KOLKATA_MS),
        ("northwind", "UTC", FEB_2026_MS),
        ("contoso", "Asia/Kolkata", FEB_2026_MS - KOLKATA_MS),
    ] {
        let to = from + 28 * DAY_MS;
        let statement = statement_json(database, partner, tz, config);
        let want = expected(contracts, specs, partner, from, to);
        assert!(!want.is_empty(), "{partner} has lines");
        assert!(
            want.keys().any(|key| key.0 == "correction"),
            "{partner} has corrections"
        );
        assert_eq!(lines_of(&statement), want, "{partner} in {tz}");
        let totals = statement["totals"].as_array().expect("totals");
        assert_eq!(totals.len(), 1, "one currency");
        let sum = want.values().fold((0, 0, 0), |acc, line| {
            (acc.0 + line.0, acc.1 + line.1, acc.2 + line.2)
        });
        assert_eq!(
            (
                totals[0]["rows"].as_i64().expect("rows"),
                totals[0]["gross_micros"].as_i64().expect("gross"),
                totals[0]["amount_micros"].as_i64().expect("amount")
            ),
            sum,
            "{partner} totals are the sums of the lines"
        );
        assert_eq!(statement["covers"].as_str(), Some(covers));
    }
    // microsoft and northwind share the gcp/northwind channel: each statement carries
    // that channel's gross once, and it is the gross of the channel's rows.
    let microsoft = expected(
        contracts,
        specs,
        "microsoft",
        FEB_2026_MS,
        FEB_2026_MS + 28 * DAY_MS,
    );
    let northwind = expected(
        contracts,
        specs,
        "northwind",
        FEB_2026_MS,
        FEB_2026_MS + 28 * DAY_MS,
    );
    let channel_gross = |lines: &Lines| -> i64 {
        lines
            .iter()
            .filter(|(key, _)| key.3 == "gcp" && key.4 == "northwind")
            .map(|(_, figures)| figures.1)
            .sum()
    };
    let rows_gross: i64 = specs
        .iter()
        .filter(|spec| {
            spec.cloud == Cloud::Gcp
                && spec.channel_partner.as_deref() == Some("northwind")
                && spec.billable
                && spec.window_start_ms >= FEB_2026_MS
                && spec.window_start_ms < FEB_2026_MS + 28 * DAY_MS
        })
        .map(|spec| spec.row(contracts).gross_micros)
        .sum();
    assert_eq!(channel_gross(&microsoft), rows_gross);
    assert_eq!(channel_gross(&northwind), rows_gross);
}

fn csv(database: &str, config: &Path, out: &Path, as_of: Option<&str>) -> Vec<u8> {
    let mut args = vec![
        "statement",
        "--database",
        database,
        "--partner",
        "microsoft",
        "--period",
        "2026-02",
        "--tz",
        "Asia/Kolkata",
        "--format",
        "csv",
        "--out",
    ];
    let out_text = out.display().to_string();
    args.push(&out_text);
    if let Some(as_of) = as_of {
        args.extend(["--as-of", as_of]);
    }
    tally_ok(&args, config);
    std::fs::read(out).expect("statement file")
}

fn covers(offsets: &BTreeMap<i32, i64>) -> String {
    let list: Vec<String> = offsets
        .iter()
        .map(|(partition, next)| format!("{TOPIC}:{partition}={next}"))
        .collect();
    format!("rows committed up to offsets {}", list.join(","))
}

/// Checks one store; returns the first CSV statement's bytes.
fn run_on(database: &str, dir: &Path) -> Vec<u8> {
    let contracts = TruthContracts::default_file();
    let config = finance_config(dir);
    let location = StoreLocation::parse("database", database).expect("location");
    let specs = first_specs();
    let offsets = write_rows(&location, &contracts, &specs, 2);
    let covered = covers(&offsets);
    check_statement(&contracts, &specs, database, &config, &covered);

    let first = csv(database, &config, &dir.join("first.csv"), None);
    let again = csv(database, &config, &dir.join("again.csv"), None);
    assert_eq!(first, again, "a re-run writes the same bytes");
    let text = String::from_utf8(first.clone()).expect("utf-8");
    assert!(text.contains(&format!("# covers: {covered}\n")), "{text}");
    // The total line is the sum of the line amounts.
    let mut sum = 0_i64;
    let mut total = None;
    for line in text.lines().filter(|line| !line.starts_with('#')).skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        let amount: i64 = cells[12].parse().expect("amount");
        if cells[0] == "total" {
            total = Some(amount);
        } else {
            sum += amount;
        }
    }
    assert_eq!(total, Some(sum));

    // More rows arrive; the statement as of the first offsets is unchanged, byte for byte.
    let more = later_specs();
    write_rows(&location, &contracts, &more, 2);
    let as_of = covered
        .strip_prefix("rows committed up to offsets ")
        .expect("prefix");
    let regenerated = csv(database, &config, &dir.join("as-of.csv"), Some(as_of));
    assert_eq!(regenerated, first, "--as-of regenerates the statement");
    let current = csv(database, &config, &dir.join("current.csv"), None);
    assert_ne!(
        current, first,
        "the current statement includes the new rows"
    );
    let mut all = specs;
    all.extend(more);
    let now = statement_json(database, "microsoft", "UTC", &config);
    assert_eq!(
        lines_of(&now),
        expected(
            &contracts,
            &all,
            "microsoft",
            FEB_2026_MS,
            FEB_2026_MS + 28 * DAY_MS
        )
    );
    first
}

#[test]
fn statements_equal_the_contracts_arithmetic_and_regenerate_byte_for_byte() {
    let started = Instant::now();
    let sqlite_dir = tempfile::tempdir().expect("temp dir");
    let sqlite = format!("sqlite:{}", sqlite_dir.path().join("billing.db").display());
    let from_sqlite = run_on(&sqlite, sqlite_dir.path());

    let pg_dir = tempfile::tempdir().expect("temp dir");
    let postgres = pg_fresh_database_named("statement");
    let from_postgres = run_on(&postgres, pg_dir.path());
    assert_eq!(
        from_postgres, from_sqlite,
        "PostgreSQL and SQLite give the same statement for the same rows"
    );
    eprintln!("statement test took {:?}", started.elapsed());
}

#[test]
fn a_bad_period_or_zone_names_the_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = finance_config(dir.path());
    let database = format!("sqlite:{}", dir.path().join("billing.db").display());
    let location = StoreLocation::parse("database", &database).expect("location");
    write_rows(
        &location,
        &TruthContracts::default_file(),
        &first_specs()[..3],
        1,
    );
    for (flag, args) in [
        ("--period", ["--period", "2026-13", "--tz", "UTC"]),
        ("--tz", ["--period", "2026-02", "--tz", "Mars/Olympus"]),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([
                "statement",
                "--database",
                &database,
                "--partner",
                "microsoft",
            ])
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run tally");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag), "{stderr}");
    }
}
