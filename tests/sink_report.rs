//! `tally report` sums the store's 15-minute UTC buckets into local days and months
//! of any IANA zone exactly, DST changes included.
//!
//! One-minute rows over 2026-03-06..10 (America/St_Johns moves from −3:30 to −2:30 on
//! 03-08) and 2026-03-27..04-01 12:00 UTC (Europe/Berlin moves from +1 to +2 on
//! 03-29; April starts in every zone) are written through the store's own batch path
//! into SQLite and PostgreSQL; the expected per-day and per-month sums come from the
//! one-minute rows and offsets hard-coded below (not from a time-zone library).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::money::{civil_from_days, days_from_civil};
use support::sink::pg_fresh_database_named;
use tally_core::aggregate::{BillingAggregate, Dims, RowKind};
use tally_core::codec::encode_aggregate;
use tally_core::event::{Cloud, TokenCounts};
use tally_sink::rows::{Position, StoredRow};
use tally_sink::{Batch, OffsetAdvance, Store, StoreLocation};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// [start, end) UTC ms of the two ranges of one-minute rows.
const RANGES: [(i64, i64); 2] = [
    (1_772_755_200_000, 1_773_100_800_000), // 2026-03-06T00:00Z .. 2026-03-10T00:00Z
    (1_774_569_600_000, 1_775_044_800_000), // 2026-03-27T00:00Z .. 2026-04-01T12:00Z
];
/// 2026-03-08T05:30Z: St. John's 02:00 NST becomes 03:00 NDT.
const ST_JOHNS_DST_MS: i64 = 1_772_947_800_000;
/// 2026-03-29T01:00Z: Berlin 02:00 CET becomes 03:00 CEST.
const BERLIN_DST_MS: i64 = 1_774_746_000_000;

/// The zone's UTC offset at `utc_ms`, hard-coded for these dates.
fn offset_ms(zone: &str, utc_ms: i64) -> i64 {
    match zone {
        "UTC" => 0,
        "Asia/Kolkata" => 5 * HOUR_MS + 30 * MINUTE_MS,
        "Asia/Kathmandu" => 5 * HOUR_MS + 45 * MINUTE_MS,
        "America/St_Johns" if utc_ms < ST_JOHNS_DST_MS => -(3 * HOUR_MS + 30 * MINUTE_MS),
        "America/St_Johns" => -(2 * HOUR_MS + 30 * MINUTE_MS),
        "Europe/Berlin" if utc_ms < BERLIN_DST_MS => HOUR_MS,
        "Europe/Berlin" => 2 * HOUR_MS,
        other => panic!("no hard-coded offsets for {other}"),
    }
}

const ZONES: [&str; 5] = [
    "UTC",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/St_Johns",
    "Europe/Berlin",
];

fn local_day(zone: &str, utc_ms: i64) -> String {
    let (year, month, day) = civil_from_days((utc_ms + offset_ms(zone, utc_ms)).div_euclid(DAY_MS));
    format!("{year:04}-{month:02}-{day:02}")
}

fn minute_gross(minute: i64) -> i64 {
    1_000 + (minute * 7_919) % 100_000
}

fn minute_events(minute: i64) -> i64 {
    1 + minute % 5
}

fn row(start_ms: i64) -> BillingAggregate {
    let minute = start_ms / MINUTE_MS;
    BillingAggregate {
        id: format!("tz-{minute}"),
        window_start_ms: start_ms,
        window_end_ms: start_ms + MINUTE_MS,
        dims: Dims {
            tenant_id: "tenant-tz".to_owned(),
            model: "atlas-mini".to_owned(),
            cloud: Cloud::Gcp,
            channel_partner: None,
            region: "europe-west3".to_owned(),
        },
        row_kind: RowKind::Billable,
        correction_seq: 0,
        event_count: u64::try_from(minute_events(minute)).expect("positive"),
        tokens: TokenCounts {
            input: 10,
            cached_input: 0,
            output: 5,
            reasoning: 0,
        },
        currency: "USD".to_owned(),
        gross_micros: minute_gross(minute),
        shares: Vec::new(),
        net_micros: minute_gross(minute),
        price_book_version: "2024-01".to_owned(),
        share_rule_version: "2024-01".to_owned(),
        source_topic: "usage.events".to_owned(),
        source_partition: 0,
        first_offset: minute,
        last_offset: minute,
        first_event_time_ms: start_ms,
        last_event_time_ms: start_ms,
    }
}

fn minutes() -> impl Iterator<Item = i64> {
    RANGES
        .into_iter()
        .flat_map(|(start, end)| (start..end).step_by(60_000))
}

/// Writes every one-minute row through the store's batch path, 1 000 per batch.
fn fill(location: &StoreLocation) {
    let mut store = Store::open(location, Duration::from_secs(30)).expect("open store");
    let all: Vec<i64> = minutes().collect();
    let mut expected = None;
    for (chunk_index, chunk) in all.chunks(1_000).enumerate() {
        let base = i64::try_from(chunk_index * 1_000).expect("small");
        let rows: Vec<StoredRow> = chunk
            .iter()
            .enumerate()
            .map(|(index, start)| {
                let row = row(*start);
                let mut value = Vec::new();
                encode_aggregate(&row, &mut value);
                let offset = base + i64::try_from(index).expect("small");
                StoredRow::new(
                    row,
                    &value,
                    Position {
                        topic: "tz-test".to_owned(),
                        partition: 0,
                        offset,
                    },
                )
            })
            .collect();
        let next = base + i64::try_from(rows.len()).expect("small");
        let outcome = store
            .write_batch(&Batch {
                rows,
                offsets: vec![OffsetAdvance {
                    topic: "tz-test".to_owned(),
                    partition: 0,
                    expected,
                    next,
                }],
            })
            .expect("write batch");
        assert_eq!(outcome.inserted, chunk.len() as u64);
        expected = Some(next);
    }
}

/// (rows, events, gross) per local period key.
type Totals = BTreeMap<String, (i64, i64, i64)>;

fn expected_totals(zone: &str, period_of: impl Fn(&str) -> String) -> Totals {
    let mut totals = Totals::new();
    for start in minutes() {
        let minute = start / MINUTE_MS;
        let entry = totals
            .entry(period_of(&local_day(zone, start)))
            .or_insert((0, 0, 0));
        entry.0 += 1;
        entry.1 += minute_events(minute);
        entry.2 += minute_gross(minute);
    }
    totals
}

/// Runs `tally report` in JSON and returns its totals by the period start's first
/// `key_len` characters, checking each period start's UTC offset against the table.
fn reported(database: &str, zone: &str, period: &str, key_len: usize, config: &Path) -> Totals {
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "report",
            "--database",
            database,
            "--from",
            "2026-03-06T00:00:00Z",
            "--to",
            "2026-04-01T12:00:00Z",
            "--tz",
            zone,
            "--period",
            period,
            "--by",
            "tenant,cloud",
            "--format",
            "json",
            "--config",
        ])
        .arg(config)
        .output()
        .expect("run tally report");
    assert!(
        output.status.success(),
        "tally report failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert!(
        report["note"]
            .as_str()
            .is_some_and(|note| note.contains("sums of per-row rounded micro-units")),
        "{report}"
    );
    let mut totals = Totals::new();
    for line in report["lines"].as_array().expect("lines") {
        let start = line["period_start"].as_str().expect("period start");
        assert_eq!(line["dims"], serde_json::json!(["tenant-tz", "gcp"]));
        let sums = &line["sums"];
        let figures = (
            sums["rows"].as_i64().expect("rows"),
            sums["event_count"].as_i64().expect("events"),
            sums["gross_micros"].as_i64().expect("gross"),
        );
        assert!(
            totals
                .insert(start[..key_len].to_owned(), figures)
                .is_none(),
            "period {start} twice"
        );
        // The period starts at local midnight; its offset is the one in force then.
        let offset = start.get(19..).expect("an offset");
        // No zone here changes its offset near midnight, so the offset in force at
        // the wall-clock midnight is the one at that instant read as UTC, shifted.
        let year = start[0..4].parse::<i64>().expect("year");
        let month = start[5..7].parse::<i64>().expect("month");
        let day = start[8..10].parse::<i64>().expect("day");
        if period == "month" {
            assert_eq!(day, 1, "{start} starts a month");
        }
        let midnight = days_from_civil(year, month, day) * DAY_MS;
        let expected_offset = offset_ms(zone, midnight - offset_ms(zone, midnight));
        assert_eq!(
            offset,
            format_offset(expected_offset),
            "offset of {start} in {zone}"
        );
    }
    totals
}

fn format_offset(offset_ms: i64) -> String {
    let sign = if offset_ms < 0 { '-' } else { '+' };
    let minutes = offset_ms.abs() / MINUTE_MS;
    format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60)
}

fn check_all_zones(database: &str, config: &Path) {
    for zone in ZONES {
        let days = reported(database, zone, "day", 10, config);
        assert_eq!(days, expected_totals(zone, str::to_owned), "days in {zone}");
        let months = reported(database, zone, "month", 7, config);
        assert_eq!(
            months,
            expected_totals(zone, |day| day[..7].to_owned()),
            "months in {zone}"
        );
    }
    // The DST days are 23 hours long: 1 380 one-minute rows.
    let berlin = reported(database, "Europe/Berlin", "day", 10, config);
    assert_eq!(berlin.get("2026-03-29").map(|totals| totals.0), Some(1_380));
    let st_johns = reported(database, "America/St_Johns", "day", 10, config);
    assert_eq!(
        st_johns.get("2026-03-08").map(|totals| totals.0),
        Some(1_380)
    );
}

fn empty_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("report.toml");
    std::fs::write(&path, "[metrics]\nlisten = \"\"\n").expect("config");
    path
}

#[test]
fn daily_and_monthly_rollups_are_exact_in_five_zones_across_dst_in_sqlite() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite:{}", dir.path().join("billing.db").display());
    fill(&StoreLocation::parse("database", &database).expect("location"));
    check_all_zones(&database, &empty_config(dir.path()));
    eprintln!("sqlite time-zone test took {:?}", started.elapsed());
}

#[test]
fn daily_and_monthly_rollups_are_exact_in_five_zones_across_dst_in_postgres() {
    let started = Instant::now();
    let database = pg_fresh_database_named("report");
    fill(&StoreLocation::parse("database", &database).expect("location"));
    let dir = tempfile::tempdir().expect("temp dir");
    check_all_zones(&database, &empty_config(dir.path()));
    eprintln!("postgres time-zone test took {:?}", started.elapsed());
}
