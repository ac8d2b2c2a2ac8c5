//! `tally replay` and `tally reconcile` against a billed store (real broker).
//!
//! One aggregator run and one sink run bill a small generated input into an SQLite
//! store; then, on that one setup:
//! - **isolation**: a replay into a store of its own leaves the production group's
//!   offsets, the production topics and the production store unchanged, and reconciles
//!   equal with the store and with the aggregates topic (exit 0);
//! - **reconcile**: a copy of the store with one amount changed, one row deleted and one
//!   row added is found to differ in exactly those three rows (exit 1); a missing source
//!   is an error (exit 2);
//! - **what-if**: a replay under contracts with one changed share rate reconciles with a
//!   per-partner difference equal to the test's own arithmetic (`support::money`);
//! - **refusals**: what-if contracts that no longer price a model the live run priced,
//!   and a range whose warm-up input was deleted, are refused (exit 3) and write nothing.
//!
//! The replay determinism checks run on the kill soak's output
//! (`tests/aggregator_kill.rs`, `support::replay::after_soak`).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use support::eos::{AggregatorProcess, ChildConfig, ChildLog, create_outputs, read_committed};
use support::kill::{EVENT_TIME, PARTITIONS, produce_input};
use support::money::TruthContracts;
use support::replay::{
    decoded, delete_records, production_state, reconcile, replay, row_set, rows_in_offsets,
    tally_command, window_span,
};
use support::sink::{
    SinkProcess, pg_fresh_database, sqlite_row_count, sqlite_snapshot, wait_for_rows,
};
use support::{TestTopics, default_contracts_path, rand_name};
use tally_core::aggregate::{BillingAggregate, RowKind};
use tally_core::timefmt::format_utc_ms;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The default contracts with the Azure owner's share at 2 100 bp instead of 2 000.
fn what_if_share(text: &str) -> String {
    let from =
        "cloud = \"azure\"\nbeneficiaries = [{ partner = \"microsoft\", basis_points = 2000 }]";
    assert!(
        text.contains(from),
        "the default contracts have the azure rule"
    );
    text.replace(
        from,
        "cloud = \"azure\"\nbeneficiaries = [{ partner = \"microsoft\", basis_points = 2100 }]",
    )
}

/// The default contracts without any price for `model`.
fn without_model(text: &str, model: &str) -> String {
    let header = format!("[price_book.models.{model}]");
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.trim() == header {
            skipping = true;
            continue;
        }
        if skipping && (line.trim().is_empty() || line.starts_with('[')) {
            skipping = false;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(!out.contains(&header));
    out
}

fn tokens(row: &BillingAggregate) -> [u64; 4] {
    [
        row.tokens.input,
        row.tokens.cached_input,
        row.tokens.output,
        row.tokens.reasoning,
    ]
}

/// Share of `partner` in `row` under `contracts`, by the tests' own arithmetic.
fn share_of(contracts: &TruthContracts, row: &BillingAggregate, partner: &str) -> i64 {
    let expected = contracts
        .expected(
            &row.dims.model,
            row.dims.cloud.as_str(),
            row.dims.channel_partner.as_deref(),
            row.window_start_ms,
            tokens(row),
            row.row_kind == RowKind::Billable,
        )
        .expect("priced");
    expected
        .shares
        .iter()
        .filter(|(name, _, _)| name == partner)
        .map(|(_, _, amount)| amount)
        .sum()
}

/// `tally replay <args>` without an event-time range.
fn replay_offsets(
    config: &Path,
    args: &[&str],
) -> (support::replay::Outcome, Option<serde_json::Value>) {
    let mut all = vec!["replay"];
    all.extend(args);
    let outcome = tally_command(config, &all);
    let summary = serde_json::from_str(outcome.stdout.trim()).ok();
    (outcome, summary)
}

fn copy_store(from: &Path, to: &Path) {
    let connection = rusqlite::Connection::open(from).expect("open store");
    connection
        .execute("VACUUM INTO ?1", [to.to_str().expect("utf-8 path")])
        .expect("copy the store");
}

fn count(report: &serde_json::Value, field: &str) -> u64 {
    report["rows"][field].as_u64().expect("a count")
}

#[test]
fn replay_is_isolated_and_reconcile_finds_exactly_what_changed() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let input = rand_name("replay-events");
    produce_input(&input, 20_000, 9, 500);
    let mut topics = TestTopics::random();
    topics.usage_events = input.clone();
    create_outputs(&topics, PARTITIONS);
    let group = rand_name("replay-group");
    let config = ChildConfig::new(&group, EVENT_TIME, PARTITIONS).write(
        dir.path(),
        &group,
        &topics,
        PARTITIONS,
    );
    let mut aggregator = AggregatorProcess::start(
        &config,
        &rand_name("replay"),
        &[
            "--commit-interval-ms",
            "200",
            "--exit-after-idle-ms",
            "2000",
        ],
        &dir.path().join("aggregator.log"),
        ChildLog::JsonAppend,
    );
    let status = aggregator
        .wait_timeout(RUN_TIMEOUT)
        .expect("the aggregator exits");
    assert!(status.success(), "aggregator: {}", aggregator.log_tail(30));
    let live = read_committed(
        &support::bootstrap(),
        &topics.billing_aggregates,
        PARTITIONS,
    );
    let live_rows = decoded(&live);
    let (from_ms, to_ms) = window_span(&live_rows);

    let store = dir.path().join("billing.db");
    let production = format!("sqlite:{}", store.display());
    {
        let mut sink = SinkProcess::spawn(&config, &production, &rand_name("sink"), &[]);
        wait_for_rows(
            "production store",
            live.len() as i64,
            || sqlite_row_count(&store),
            &mut sink,
        );
    }
    let billed_at = started.elapsed();

    // Isolation: a replay into its own store changes nothing of production.
    let store_before = sqlite_snapshot(&store);
    let kafka_before = production_state(&topics, &group, PARTITIONS);
    let replayed_store = dir.path().join("replay.db");
    let replayed = format!("sqlite:{}", replayed_store.display());
    let replay_started = Instant::now();
    let (outcome, summary) = replay(&config, from_ms, to_ms, &["--database", &replayed]);
    let replay_took = replay_started.elapsed();
    assert_eq!(outcome.code, 0, "replay failed:\n{}", outcome.stderr);
    assert_eq!(
        summary.expect("summary")["rows"].as_u64(),
        Some(live.len() as u64)
    );
    assert_eq!(production_state(&topics, &group, PARTITIONS), kafka_before);
    assert!(
        sqlite_snapshot(&store) == store_before,
        "the production store changed"
    );
    // Replaying into the production store itself is refused.
    let (outcome, _) = replay(&config, from_ms, to_ms, &["--database", &production]);
    assert_eq!(outcome.code, 3, "{}", outcome.stderr);
    let (outcome, _) = replay(
        &config,
        from_ms,
        to_ms,
        &["--output-topic", &topics.billing_aggregates],
    );
    assert_eq!(outcome.code, 3, "{}", outcome.stderr);
    assert!(
        sqlite_snapshot(&store) == store_before,
        "the production store changed"
    );
    assert_eq!(production_state(&topics, &group, PARTITIONS), kafka_before);

    // An offsets range from the middle of every partition (warm-up from a checkpoint at or
    // before its start): exactly the live rows made only of records in it.
    let ranges: BTreeMap<i32, (i64, i64)> = kafka_before.offsets[&topics.usage_events]
        .iter()
        .enumerate()
        .map(|(partition, (_, high))| (partition as i32, (high / 3, high * 2 / 3)))
        .collect();
    let offsets_arg: Vec<String> = ranges
        .iter()
        .map(|(partition, (start, end))| format!("{partition}:{start}-{end}"))
        .collect();
    let offsets_topic = rand_name("replay-offsets");
    let (outcome, summary) = replay_offsets(
        &config,
        &[
            "--offsets",
            &offsets_arg.join(","),
            "--output-topic",
            &offsets_topic,
        ],
    );
    assert_eq!(
        outcome.code, 0,
        "offsets replay failed:\n{}",
        outcome.stderr
    );
    // Whether a partition warms up from a checkpoint or from offset 0 depends on how many
    // transactions the aggregator needed for this small input; the kill soak checks the
    // checkpoint warm-up (support::replay::after_soak).
    let warm_ups: Vec<String> = summary.expect("summary")["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|report| format!("{}@{}", report["warm_up"], report["start_offset"]))
        .collect();
    let expected = rows_in_offsets(&live, &ranges);
    assert!(!expected.is_empty());
    let replayed_offsets = read_committed(&support::bootstrap(), &offsets_topic, PARTITIONS);
    assert!(
        row_set(&replayed_offsets) == row_set(&expected),
        "offsets replay: {} rows, expected {}",
        replayed_offsets.len(),
        expected.len()
    );

    // A broker-timestamp range covering every record: all the live rows.
    let by_time_store = dir.path().join("by-time.db");
    let by_time = format!("sqlite:{}", by_time_store.display());
    let (outcome, _) = replay_offsets(
        &config,
        &[
            "--from-timestamp",
            "2000-01-01T00:00:00Z",
            "--to-timestamp",
            "2100-01-01T00:00:00Z",
            "--database",
            &by_time,
        ],
    );
    assert_eq!(
        outcome.code, 0,
        "broker-time replay failed:\n{}",
        outcome.stderr
    );
    let (code, report) = reconcile(&config, &production, &by_time, from_ms, to_ms);
    assert_eq!(code, 0, "{report}");

    // A replay into a PostgreSQL database of its own reconciles equal with the SQLite store.
    let pg_replay = pg_fresh_database();
    let (outcome, _) = replay(&config, from_ms, to_ms, &["--database", &pg_replay]);
    assert_eq!(
        outcome.code, 0,
        "replay into PostgreSQL failed:\n{}",
        outcome.stderr
    );
    let (code, report) = reconcile(&config, &production, &pg_replay, from_ms, to_ms);
    assert_eq!(code, 0, "{report}");
    assert_eq!(count(&report, "matching"), live.len() as u64);

    // Equal sides: exit 0.
    let (code, report) = reconcile(&config, &production, &replayed, from_ms, to_ms);
    assert_eq!(code, 0, "{report}");
    assert_eq!(count(&report, "matching"), live.len() as u64);
    let aggregates = format!("topic:{}", topics.billing_aggregates);
    let (code, report) = reconcile(&config, &aggregates, &replayed, from_ms, to_ms);
    assert_eq!(code, 0, "{report}");

    // Tampered copy: one amount changed, one row deleted, one row added.
    let tampered_store = dir.path().join("tampered.db");
    copy_store(&store, &tampered_store);
    let tampered = format!("sqlite:{}", tampered_store.display());
    let mut billable = live_rows
        .iter()
        .filter(|row| row.row_kind == RowKind::Billable && row.gross_micros > 0);
    let changed = billable.next().expect("a billable row");
    let deleted = billable.next().expect("another billable row");
    {
        let connection = rusqlite::Connection::open(&tampered_store).expect("open copy");
        connection
            .execute(
                "UPDATE tally_rows SET gross_micros = gross_micros + 7 WHERE id = ?1",
                [&changed.id],
            )
            .expect("tamper");
        connection
            .execute(
                "DELETE FROM tally_row_shares WHERE row_id = ?1",
                [&deleted.id],
            )
            .expect("delete shares");
        connection
            .execute("DELETE FROM tally_rows WHERE id = ?1", [&deleted.id])
            .expect("delete row");
        connection
            .execute(
                "INSERT INTO tally_rows SELECT 'extra-row', digest, window_start_ms, window_end_ms, \
                 tenant_id, model, cloud, channel_partner, region, row_kind, 99, event_count, \
                 input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, currency, \
                 gross_micros, net_micros, price_book_version, share_rule_version, source_topic, \
                 source_partition, first_offset, last_offset, first_event_time_ms, \
                 last_event_time_ms, kafka_topic, kafka_partition, kafka_offset \
                 FROM tally_rows WHERE id = ?1",
                [&changed.id],
            )
            .expect("add a row");
    }
    let (code, report) = reconcile(&config, &production, &tampered, from_ms, to_ms);
    assert_eq!(code, 1);
    assert_eq!(count(&report, "mismatching"), 1);
    assert_eq!(count(&report, "missing"), 1);
    assert_eq!(count(&report, "extra"), 1);
    assert_eq!(count(&report, "matching"), live.len() as u64 - 2);
    let differences = report["differences"].as_array().expect("differences");
    assert_eq!(differences.len(), 3);
    for difference in differences {
        match difference["status"].as_str() {
            Some("mismatching") => {
                assert_eq!(difference["left"]["id"], changed.id.as_str());
                assert_eq!(difference["gross_difference_micros"], 7);
                assert_eq!(difference["net_difference_micros"], 0);
            }
            Some("missing") => {
                assert_eq!(difference["left"]["id"], deleted.id.as_str());
                assert_eq!(difference["gross_difference_micros"], -deleted.gross_micros);
            }
            Some("extra") => {
                assert_eq!(difference["right"]["id"], "extra-row");
                assert_eq!(difference["key"]["correction_seq"], 99);
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    let (from, to) = (format_utc_ms(from_ms), format_utc_ms(to_ms));
    let table = tally_command(
        &config,
        &[
            "reconcile",
            "--left",
            &production,
            "--right",
            &tampered,
            "--from",
            &from,
            "--to",
            &to,
        ],
    );
    assert_eq!(table.code, 1);
    eprintln!("reconcile of the tampered store:\n{}", table.stdout);
    let missing_topic = format!("topic:{}", rand_name("no-such-topic"));
    let failed = tally_command(
        &config,
        &[
            "reconcile",
            "--left",
            &production,
            "--right",
            &missing_topic,
            "--from",
            &from,
            "--to",
            &to,
        ],
    );
    assert_eq!(failed.code, 2, "a missing source is an error");

    // What-if: one changed share rate.
    let default_text =
        std::fs::read_to_string(default_contracts_path()).expect("default contracts");
    let what_if_text = what_if_share(&default_text);
    let what_if_path = dir.path().join("what-if.toml");
    std::fs::write(&what_if_path, &what_if_text).expect("write what-if contracts");
    let what_if_store = dir.path().join("what-if.db");
    let what_if = format!("sqlite:{}", what_if_store.display());
    let (outcome, _) = replay(
        &config,
        from_ms,
        to_ms,
        &[
            "--database",
            &what_if,
            "--contracts",
            what_if_path.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        outcome.code, 0,
        "what-if replay failed:\n{}",
        outcome.stderr
    );
    let (code, report) = reconcile(&config, &production, &what_if, from_ms, to_ms);
    assert_eq!(code, 1, "a changed share differs");
    assert_eq!(count(&report, "missing"), 0);
    assert_eq!(count(&report, "extra"), 0);
    let live_contracts = TruthContracts::parse(&default_text);
    let new_contracts = TruthContracts::parse(&what_if_text);
    let expected_difference: i64 = live_rows
        .iter()
        .map(|row| {
            share_of(&new_contracts, row, "microsoft") - share_of(&live_contracts, row, "microsoft")
        })
        .sum();
    assert!(expected_difference > 0, "azure rows were billed");
    let partners = report["by_partner"].as_array().expect("by partner");
    for partner in partners {
        let difference = partner["difference"]["share_micros"].as_i64().expect("i64");
        if partner["name"] == "microsoft" {
            assert_eq!(difference, expected_difference, "{partner}");
        } else {
            assert_eq!(difference, 0, "{partner}");
        }
    }
    assert!(
        partners
            .iter()
            .any(|partner| partner["name"] == "microsoft")
    );

    // Refusal: what-if contracts that no longer price a model the live run priced.
    assert!(
        live_rows
            .iter()
            .any(|row| row.dims.model == "atlas-embed" && row.row_kind == RowKind::Billable),
        "the live run priced atlas-embed"
    );
    let unpriced_path = dir.path().join("unpriced.toml");
    std::fs::write(&unpriced_path, without_model(&default_text, "atlas-embed"))
        .expect("write contracts");
    let refused_store = dir.path().join("refused.db");
    let (outcome, _) = replay(
        &config,
        from_ms,
        to_ms,
        &[
            "--database",
            &format!("sqlite:{}", refused_store.display()),
            "--contracts",
            unpriced_path.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(outcome.code, 3, "{}", outcome.stderr);
    assert!(!refused_store.exists(), "a refused replay writes nothing");

    // Refusal: a mid-range replay under another out-of-orderness than the checkpoints'.
    let other = support::eos::EventTime {
        max_out_of_orderness_ms: EVENT_TIME.max_out_of_orderness_ms + 1_000,
        ..EVENT_TIME
    };
    let other_config =
        ChildConfig::new(&group, other, PARTITIONS).write(dir.path(), "other", &topics, PARTITIONS);
    // An offsets range at partition 0's end: its warm-up is the last checkpoint, which the
    // aggregator always commits.
    let end = kafka_before.offsets[&topics.usage_events][0].1;
    let other_store = dir.path().join("other.db");
    let (outcome, _) = replay_offsets(
        &other_config,
        &[
            "--offsets",
            &format!("0:{end}-{}", end + 1),
            "--database",
            &format!("sqlite:{}", other_store.display()),
        ],
    );
    assert_eq!(outcome.code, 3, "{}", outcome.stderr);
    assert!(!other_store.exists(), "a refused replay writes nothing");

    // Refusal: the warm-up input of the first windows was deleted.
    delete_records(&input, &[(0, 10)]);
    let output = rand_name("replay-refused");
    let (outcome, _) = replay(&config, from_ms, to_ms, &["--output-topic", &output]);
    assert_eq!(outcome.code, 3, "{}", outcome.stderr);
    eprintln!(
        "replay/reconcile: {} rows; billed in {billed_at:?}, a whole replay took {replay_took:?}; offsets replay warm-ups {warm_ups:?}; wall time {:?}",
        live.len(),
        started.elapsed()
    );
}
