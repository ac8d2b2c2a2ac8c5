//! `tally export` and `tally export ack`: the request files equal what the test
//! computes from the rows it wrote, the mapping it wrote and the marketplaces' rules
//! (its own carry arithmetic); no request holds more than 25 records; quantities are
//! integers in the marketplace's range; a re-run writes the same bytes and never
//! exports an hour twice; a correction after its hour was exported lands in the next
//! open hour; an hour past its deadline is reported and its usage carried; the
//! uploader's answers move ledger lines to delivered or rejected.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use serde_json::Value as Json;
use support::exports::{Market, RecordKey, all_records, json_files};
use support::finance::{
    FEB_2026_MS, HOUR_MS, MINUTE_MS, RowSpec, finance_config, tally_ok, write_rows,
};
use support::money::{TruthContracts, format_utc_ms};
use tally_core::event::Cloud;
use tally_sink::StoreLocation;

/// The aggregator's liveness bound in the test config: 60 s + 30 s + 10 s + 2 × 1 s.
const LIVENESS_MS: i64 = 102_000;
/// The first hour of the run: 2026-02-01T10:00Z.
const H0: i64 = FEB_2026_MS + 10 * HOUR_MS;
const AWS_TENANTS: i64 = 30;
const BIG_OUTPUT: u64 = 3_000_000_000_000;

/// (model, measure index 0..=4 = input, cached, output, reasoning, gross) → (dimension, unit).
fn dimensions(market: Market) -> Vec<(&'static str, usize, &'static str, i64)> {
    match market {
        Market::Aws => vec![
            ("atlas-large", 0, "large_input_1k", 1_000),
            ("atlas-large", 1, "large_input_1k", 1_000),
            ("atlas-large", 2, "large_output_1k", 1_000),
            ("atlas-mini", 4, "mini_cents", 10_000),
        ],
        Market::Azure => vec![
            ("atlas-mini", 0, "mini_input_1k", 1_000),
            ("atlas-mini", 2, "mini_output_1m", 1_000_000),
        ],
        Market::Gcp => vec![("atlas-large", 2, "large_output_1k", 1_000)],
    }
}

/// tenant → (customer id, plan/licence).
fn customers(market: Market) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    match market {
        Market::Aws => {
            for n in 0..AWS_TENANTS {
                out.insert(
                    format!("aws-{n:02}"),
                    (format!("{:012}", 100_000_000_000 + n), String::new()),
                );
            }
            out.insert(
                "aws-big".to_owned(),
                (
                    "999999999999".to_owned(),
                    "arn:aws:license-manager::999999999999:license:l-1".to_owned(),
                ),
            );
        }
        Market::Azure => {
            for n in 0..3 {
                out.insert(format!("az-{n}"), (format!("res-{n}"), "gold".to_owned()));
            }
        }
        Market::Gcp => {
            for n in 0..2 {
                out.insert(format!("gc-{n}"), (format!("project:p{n}"), String::new()));
            }
        }
    }
    out
}

fn mapping_toml() -> String {
    let measures = [
        "input_tokens",
        "cached_input_tokens",
        "output_tokens",
        "reasoning_tokens",
        "gross_micros",
    ];
    let mut text = String::from(
        "[aws]\nproduct_code = \"prod-test\"\n[azure]\n[gcp]\nservice_name = \"atlas.endpoints.test.cloud.goog\"\n",
    );
    for market in [Market::Aws, Market::Azure, Market::Gcp] {
        let name = market.name();
        text.push_str(&format!("[{name}.customers]\n"));
        for (tenant, (id, plan)) in customers(market) {
            let entry = match market {
                Market::Aws if plan.is_empty() => format!("account_id = \"{id}\""),
                Market::Aws => format!("account_id = \"{id}\", license_arn = \"{plan}\""),
                Market::Azure => format!("resource_id = \"{id}\", plan_id = \"{plan}\""),
                Market::Gcp => format!("consumer_id = \"{id}\""),
            };
            text.push_str(&format!("{tenant} = {{ {entry} }}\n"));
        }
        for (model, measure, dimension, unit) in dimensions(market) {
            text.push_str(&format!(
                "[[{name}.dimensions]]\nmodel = \"{model}\"\nmeasure = \"{}\"\ndimension = \"{dimension}\"\nunit_size = {unit}\n",
                measures[measure]
            ));
        }
    }
    text
}

fn tokens(seed: i64) -> [u64; 4] {
    let seed = seed.unsigned_abs();
    [
        700 + (seed * 131) % 4_000,
        (seed * 17) % 900,
        300 + (seed * 71) % 2_500,
        0,
    ]
}

/// Usage in hour `hour` (index from H0) for every tenant of every marketplace, plus
/// rows no marketplace exports (other cloud, non-billable).
fn hour_specs(hour: i64, correction_seq: u32) -> Vec<RowSpec> {
    let start = H0 + hour * HOUR_MS;
    let mut specs = Vec::new();
    for n in 0..AWS_TENANTS {
        // Tenants take turns, so not every customer has usage every hour.
        if (n + hour) % 4 == 3 {
            continue;
        }
        let tenant = format!("aws-{n:02}");
        let minute = (n * 7 + hour) % 60;
        let mut spec = RowSpec::new(
            start + minute * MINUTE_MS,
            &tenant,
            "atlas-large",
            Cloud::Aws,
            None,
            tokens(n * 10 + hour),
        );
        spec.correction_seq = correction_seq;
        specs.push(spec.clone());
        spec.model = "atlas-mini".to_owned();
        spec.tokens = tokens(n * 10 + hour + 5);
        specs.push(spec.clone());
        // Served by another cloud: not AWS Marketplace usage.
        spec.cloud = Cloud::Gcp;
        specs.push(spec.clone());
        // Not billable: never exported.
        spec.cloud = Cloud::Aws;
        spec.model = "atlas-large".to_owned();
        spec.billable = false;
        spec.window_start_ms += MINUTE_MS;
        specs.push(spec);
    }
    for n in 0..3 {
        let mut spec = RowSpec::new(
            start + (n + 1) * MINUTE_MS,
            &format!("az-{n}"),
            "atlas-mini",
            Cloud::Azure,
            None,
            tokens(100 + n + hour),
        );
        spec.correction_seq = correction_seq;
        specs.push(spec);
    }
    for n in 0..2 {
        // gc-1 only has usage in the first hour.
        if n == 1 && hour > 0 {
            continue;
        }
        let mut spec = RowSpec::new(
            start + (n + 2) * MINUTE_MS,
            &format!("gc-{n}"),
            "atlas-large",
            Cloud::Gcp,
            None,
            tokens(200 + n + hour),
        );
        spec.correction_seq = correction_seq;
        specs.push(spec);
    }
    if hour == 0 && correction_seq == 0 {
        let mut big = RowSpec::new(
            start + 30 * MINUTE_MS,
            "aws-big",
            "atlas-large",
            Cloud::Aws,
            None,
            [0, 0, BIG_OUTPUT, 0],
        );
        big.correction_seq = 0;
        specs.push(big);
    }
    specs
}

/// The test's own model of the export rules for one marketplace.
#[derive(Debug, Default)]
struct Model {
    /// Hours already decided (exported or overdue).
    next_hour: Option<i64>,
    /// Per key: measure accounted so far, units exported so far, reported before.
    state: BTreeMap<(String, String), (i64, i64, bool)>,
    /// Expected ledger: (customer, dimension, hour) → quantity.
    ledger: BTreeMap<(String, String, i64), i64>,
    /// Overdue hours.
    overdue: Vec<i64>,
}

/// Measure per (customer, dimension) and hour of `specs` as `market` maps them.
fn measure_by_hour(
    market: Market,
    contracts: &TruthContracts,
    specs: &[RowSpec],
) -> BTreeMap<(String, String), BTreeMap<i64, i64>> {
    let customers = customers(market);
    let mut out: BTreeMap<(String, String), BTreeMap<i64, i64>> = BTreeMap::new();
    for spec in specs {
        if !spec.billable || spec.cloud != market.cloud() {
            continue;
        }
        let Some((customer, _)) = customers.get(&spec.tenant) else {
            continue;
        };
        for (model, measure, dimension, _) in dimensions(market) {
            if model != spec.model {
                continue;
            }
            let amount = if measure == 4 {
                spec.row(contracts).gross_micros
            } else {
                i64::try_from(spec.tokens[measure]).expect("fits")
            };
            *out.entry((customer.clone(), dimension.to_owned()))
                .or_default()
                .entry(spec.window_start_ms.div_euclid(HOUR_MS) * HOUR_MS)
                .or_insert(0) += amount;
        }
    }
    out
}

impl Model {
    /// One export run at `now` over everything in the store (`specs`).
    fn run(&mut self, market: Market, contracts: &TruthContracts, specs: &[RowSpec], now: i64) {
        let usage = measure_by_hour(market, contracts, specs);
        let unit_of: BTreeMap<&str, i64> = dimensions(market)
            .into_iter()
            .map(|(_, _, dimension, unit)| (dimension, unit))
            .collect();
        let first = usage
            .values()
            .filter_map(|hours| hours.keys().next().copied())
            .min()
            .expect("usage");
        let mut hour = self.next_hour.unwrap_or(first);
        while hour + HOUR_MS + LIVENESS_MS <= now {
            if now >= hour + market.deadline_after_start_ms() {
                self.overdue.push(hour);
                hour += HOUR_MS;
                continue;
            }
            let keys: BTreeSet<(String, String)> =
                usage.keys().chain(self.state.keys()).cloned().collect();
            for key in keys {
                let through: i64 = usage
                    .get(&key)
                    .map(|hours| hours.range(..=hour).map(|(_, amount)| amount).sum())
                    .unwrap_or(0);
                let state = self.state.entry(key.clone()).or_insert((0, 0, false));
                let new = through - state.0;
                assert!(new >= 0);
                state.0 = through;
                let unit = unit_of[key.1.as_str()];
                let quantity = (through / unit - state.1).min(market.max());
                let emit = match market {
                    Market::Aws => new > 0 || quantity > 0,
                    Market::Azure => quantity > 0,
                    Market::Gcp => new > 0 || quantity > 0 || state.2,
                };
                if emit {
                    state.1 += quantity;
                    state.2 = true;
                    self.ledger
                        .insert((key.0.clone(), key.1.clone(), hour), quantity);
                }
            }
            hour += HOUR_MS;
        }
        self.next_hour = Some(hour);
    }
}

fn export(
    database: &str,
    market: Market,
    out: &Path,
    now: i64,
    config: &Path,
    mapping: &Path,
) -> Json {
    let now_text = format_utc_ms(now);
    let text = tally_ok(
        &[
            "export",
            "--database",
            database,
            "--marketplace",
            market.name(),
            "--mapping",
            &mapping.display().to_string(),
            "--out",
            &out.display().to_string(),
            "--now",
            &now_text,
            "--skip-kafka-check",
        ],
        config,
    );
    let json_start = text.find('{').expect("a summary");
    serde_json::from_str(&text[json_start..]).expect("summary json")
}

/// The records of every request file: (customer, dimension, hour) → quantity, each
/// request and record checked (see `support::exports::request_records`).
fn records(out: &Path, market: Market) -> BTreeMap<RecordKey, i64> {
    let plans = customers(market)
        .into_values()
        .collect::<BTreeMap<String, String>>();
    all_records(out, market, "prod-test", |customer| plans[customer].clone())
}

fn manifest(out: &Path, market: Market) -> Json {
    let bytes = std::fs::read(out.join(market.name()).join("manifest.json")).expect("manifest");
    serde_json::from_slice(&bytes).expect("manifest json")
}

#[test]
fn aws_exports_carry_correct_defer_and_acknowledge_exactly_in_sqlite() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite:{}", dir.path().join("billing.db").display());
    aws_flow(&database, dir.path());
    eprintln!("aws export test (sqlite) took {:?}", started.elapsed());
}

#[test]
fn aws_exports_carry_correct_defer_and_acknowledge_exactly_in_postgres() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let database = support::sink::pg_fresh_database_named("export");
    aws_flow(&database, dir.path());
    eprintln!("aws export test (postgres) took {:?}", started.elapsed());
}

fn aws_flow(database: &str, dir: &Path) {
    let config = finance_config(dir);
    let mapping = dir.join("mapping.toml");
    std::fs::write(&mapping, mapping_toml()).expect("mapping");
    let location = StoreLocation::parse("database", database).expect("location");
    let contracts = TruthContracts::default_file();
    let market = Market::Aws;
    let mut model = Model::default();

    // Hours 10, 11 and 12 of 2026-02-01.
    let mut store: Vec<RowSpec> = (0..3).flat_map(|hour| hour_specs(hour, 0)).collect();
    write_rows(&location, &contracts, &store, 2);

    // One second before hour 10's liveness bound passes: nothing is exported.
    let early = export(
        database,
        market,
        &dir.join("early"),
        H0 + HOUR_MS + LIVENESS_MS - 1_000,
        &config,
        &mapping,
    );
    assert_eq!(early["hours_exported"], serde_json::json!([]));

    let now1 = H0 + 3 * HOUR_MS + LIVENESS_MS;
    let first = export(database, market, &dir.join("a"), now1, &config, &mapping);
    model.run(market, &contracts, &store, now1);
    assert_eq!(first["hours_exported"].as_array().expect("hours").len(), 3);
    let got = records(&dir.join("a"), market);
    assert_eq!(got, model.ledger, "first export");
    // The 3 × 10¹² output tokens of one row are 3 × 10⁹ units: the first hour carries
    // the Int32 maximum and the rest goes to the next hour.
    let big = ("999999999999".to_owned(), "large_output_1k".to_owned());
    assert_eq!(got[&(big.0.clone(), big.1.clone(), H0)], 2_147_483_647);
    assert_eq!(
        got[&(big.0.clone(), big.1.clone(), H0 + HOUR_MS)],
        3_000_000_000 - 2_147_483_647
    );
    assert!(
        json_files(&dir.join("a"), market).len() > 4,
        "more than 25 records per hour make several requests"
    );

    // A re-run writes the same bytes and exports nothing new.
    let again = export(database, market, &dir.join("b"), now1, &config, &mapping);
    assert_eq!(again["hours_exported"], serde_json::json!([]));
    assert_eq!(again["records_written"], 0);
    assert_eq!(
        json_files(&dir.join("a"), market),
        json_files(&dir.join("b"), market)
    );

    // Corrections of hour 10 arrive after it was exported, with usage of hour 13.
    let corrections = hour_specs(0, 1);
    let hour13 = hour_specs(3, 0);
    write_rows(&location, &contracts, &corrections, 2);
    write_rows(&location, &contracts, &hour13, 2);
    store.extend(corrections.iter().cloned());
    store.extend(hour13);
    let now2 = H0 + 4 * HOUR_MS + LIVENESS_MS;
    let second = export(database, market, &dir.join("c"), now2, &config, &mapping);
    model.run(market, &contracts, &store, now2);
    assert_eq!(
        second["hours_exported"],
        serde_json::json!([format_utc_ms(H0 + 3 * HOUR_MS)])
    );
    assert_eq!(
        records(&dir.join("c"), market),
        model.ledger,
        "after corrections"
    );
    // The files of hours 10-12 did not change: no hour is exported twice.
    let before = json_files(&dir.join("a"), market);
    let after = json_files(&dir.join("c"), market);
    for (name, bytes) in &before {
        if name != "manifest.json" {
            assert_eq!(after.get(name), Some(bytes), "{name} unchanged");
        }
    }
    // The manifest says which usage of hour 10 went into hour 13.
    let carried_expected = measure_by_hour(market, &contracts, &corrections);
    let manifest_c = manifest(&dir.join("c"), market);
    let mut carried_got = BTreeMap::new();
    for entry in manifest_c["carried"].as_array().expect("carried") {
        assert_eq!(entry["into_hour"], format_utc_ms(H0 + 3 * HOUR_MS));
        assert_eq!(entry["usage_hour"], format_utc_ms(H0));
        carried_got.insert(
            (
                entry["customer"].as_str().expect("customer").to_owned(),
                entry["dimension"].as_str().expect("dimension").to_owned(),
            ),
            entry["amount"].as_i64().expect("amount"),
        );
    }
    let carried_want: BTreeMap<(String, String), i64> = carried_expected
        .into_iter()
        .map(|(key, hours)| (key, hours.values().sum()))
        .collect();
    assert!(!carried_want.is_empty());
    assert_eq!(carried_got, carried_want);

    // Hour 14's usage becomes ready only after its 6 h deadline: it is reported as
    // overdue and carried into hour 15, which is exported.
    let hour14 = hour_specs(4, 0);
    write_rows(&location, &contracts, &hour14, 2);
    store.extend(hour14);
    let now3 = H0 + 4 * HOUR_MS + 6 * HOUR_MS + MINUTE_MS;
    let third = export(database, market, &dir.join("d"), now3, &config, &mapping);
    model.run(market, &contracts, &store, now3);
    assert_eq!(model.overdue, vec![H0 + 4 * HOUR_MS]);
    assert_eq!(
        third["hours_overdue"],
        serde_json::json!([format_utc_ms(H0 + 4 * HOUR_MS)])
    );
    assert_eq!(
        records(&dir.join("d"), market),
        model.ledger,
        "after an overdue hour"
    );
    let overdue = &manifest(&dir.join("d"), market)["overdue"];
    assert_eq!(
        overdue,
        &serde_json::json!([{ "hour": format_utc_ms(H0 + 4 * HOUR_MS), "carried_into": format_utc_ms(H0 + 5 * HOUR_MS) }])
    );

    // The uploader posts hour 10's first request: one DuplicateRecord (delivered), one
    // CustomerNotSubscribed (rejected), the rest Success.
    let d = dir.join("d");
    let request_path = d
        .join("aws")
        .join(format!("{}Z-00.json", &format_utc_ms(H0)[..13]));
    let request: Json =
        serde_json::from_slice(&std::fs::read(&request_path).expect("request")).expect("json");
    let sent = request["UsageRecords"].as_array().expect("records").clone();
    let results: Vec<Json> = sent
        .iter()
        .enumerate()
        .map(|(index, record)| {
            let status = match index {
                0 => "DuplicateRecord",
                1 => "CustomerNotSubscribed",
                _ => "Success",
            };
            serde_json::json!({ "UsageRecord": record, "MeteringRecordId": format!("m-{index}"), "Status": status })
        })
        .collect();
    let response_path = dir.join("response.json");
    std::fs::write(
        &response_path,
        serde_json::json!({ "Results": results, "UnprocessedRecords": [] }).to_string(),
    )
    .expect("response");
    let ack = |request: &Path, response: &Path| -> Json {
        let text = tally_ok(
            &[
                "export",
                "ack",
                "--database",
                database,
                "--marketplace",
                "aws",
                "--request",
                &request.display().to_string(),
                "--response",
                &response.display().to_string(),
            ],
            &config,
        );
        serde_json::from_str(&text).expect("ack summary")
    };
    let summary = ack(&request_path, &response_path);
    let sent_count = i64::try_from(sent.len()).expect("small");
    assert_eq!(summary["delivered"], sent_count - 1);
    assert_eq!(summary["rejected"], 1);
    assert_eq!(summary["unknown"], 0);
    // Acknowledging every request of hour 10 removes the hour from the next run's files.
    for (name, _) in json_files(&d, market) {
        if !name.starts_with(&format_utc_ms(H0)[..13]) {
            continue;
        }
        let path = d.join("aws").join(&name);
        let body: Json =
            serde_json::from_slice(&std::fs::read(&path).expect("request")).expect("json");
        let results: Vec<Json> = body["UsageRecords"]
            .as_array()
            .expect("records")
            .iter()
            .map(|record| serde_json::json!({ "UsageRecord": record, "Status": "Success" }))
            .collect();
        std::fs::write(
            &response_path,
            serde_json::json!({ "Results": results }).to_string(),
        )
        .expect("response");
        ack(&path, &response_path);
    }
    export(database, market, &dir.join("e"), now3, &config, &mapping);
    let left = json_files(&dir.join("e"), market);
    assert!(
        left.keys()
            .all(|name| !name.starts_with(&format_utc_ms(H0)[..13])),
        "{left:?}"
    );
    assert!(
        left.keys()
            .any(|name| name.starts_with(&format_utc_ms(H0 + HOUR_MS)[..13]))
    );
}

#[test]
fn azure_and_gcp_exports_follow_their_rules() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = finance_config(dir.path());
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(&mapping, mapping_toml()).expect("mapping");
    let database = format!("sqlite:{}", dir.path().join("billing.db").display());
    let location = StoreLocation::parse("database", &database).expect("location");
    let contracts = TruthContracts::default_file();
    let store: Vec<RowSpec> = (0..4).flat_map(|hour| hour_specs(hour, 0)).collect();
    write_rows(&location, &contracts, &store, 3);
    // Exported hour by hour, as soon as each hour is ready (GCP wants each report
    // within an hour of the interval's end).
    let mut now = 0;
    for market in [Market::Azure, Market::Gcp] {
        let mut model = Model::default();
        let out = dir.path().join(market.name());
        for hour in 1..=4 {
            now = H0 + hour * HOUR_MS + LIVENESS_MS;
            model.run(market, &contracts, &store, now);
            let summary = export(&database, market, &out, now, &config, &mapping);
            assert_eq!(summary["hours_overdue"], serde_json::json!([]));
        }
        let got = records(&out, market);
        assert!(!got.is_empty());
        assert_eq!(got, model.ledger, "{}", market.name());
        let again = dir.path().join(format!("{}-again", market.name()));
        export(&database, market, &again, now, &config, &mapping);
        assert_eq!(
            json_files(&out, market),
            json_files(&again, market),
            "{} re-run",
            market.name()
        );
    }
    // Acknowledgements: an Azure HTTP 409 (already accepted) delivers the whole
    // request; a GCP report error rejects its operation and delivers the others.
    let ack = |market: Market, request: &Path, response: &str, status: Option<&str>| -> Json {
        let response_path = dir.path().join("answer.json");
        std::fs::write(&response_path, response).expect("answer");
        let mut args = vec![
            "export".to_owned(),
            "ack".to_owned(),
            "--database".to_owned(),
            database.clone(),
            "--marketplace".to_owned(),
            market.name().to_owned(),
            "--request".to_owned(),
            request.display().to_string(),
            "--response".to_owned(),
            response_path.display().to_string(),
        ];
        if let Some(status) = status {
            args.extend(["--http-status".to_owned(), status.to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&tally_ok(&args, &config)).expect("ack summary")
    };
    let azure_request = dir
        .path()
        .join("azure")
        .join("azure")
        .join(format!("{}Z-00.json", &format_utc_ms(H0)[..13]));
    let azure_body: Json =
        serde_json::from_slice(&std::fs::read(&azure_request).expect("azure request"))
            .expect("json");
    let events = azure_body["request"].as_array().expect("events").len();
    let azure_ack = ack(Market::Azure, &azure_request, "", Some("409"));
    assert_eq!(azure_ack["delivered"], events);
    assert_eq!(azure_ack["rejected"], 0);
    let gcp_request = dir
        .path()
        .join("gcp")
        .join("gcp")
        .join(format!("{}Z-00.json", &format_utc_ms(H0)[..13]));
    let gcp_body: Json =
        serde_json::from_slice(&std::fs::read(&gcp_request).expect("gcp request")).expect("json");
    let operations = gcp_body["operations"].as_array().expect("operations");
    let failed = operations[0]["operationId"].as_str().expect("operation id");
    let gcp_ack = ack(
        Market::Gcp,
        &gcp_request,
        &serde_json::json!({ "reportErrors": [{ "operationId": failed, "status": { "code": 3, "message": "invalid metric" } }] }).to_string(),
        None,
    );
    assert_eq!(gcp_ack["rejected"], 1);
    assert_eq!(gcp_ack["delivered"], operations.len() - 1);

    // GCP: once reported, a consumer's metric is reported every hour (0 included), so
    // its intervals are contiguous.
    let gcp = records(&dir.path().join("gcp"), Market::Gcp);
    let mut hours: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for (customer, metric, hour) in gcp.keys() {
        hours
            .entry((customer.clone(), metric.clone()))
            .or_default()
            .push(*hour);
    }
    for (key, list) in hours {
        assert_eq!(
            list,
            (0..4).map(|h| H0 + h * HOUR_MS).collect::<Vec<_>>(),
            "{key:?}"
        );
    }
    assert_eq!(
        gcp[&(
            "project:p1".to_owned(),
            "large_output_1k".to_owned(),
            H0 + 3 * HOUR_MS
        )],
        0,
        "a quiet hour reports 0"
    );
    eprintln!("azure and gcp export test took {:?}", started.elapsed());
}

#[test]
fn a_mapping_error_names_the_entry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = finance_config(dir.path());
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(
        &mapping,
        mapping_toml().replacen("unit_size = 1000\n", "unit_size = 0\n", 1),
    )
    .expect("mapping");
    let database = format!("sqlite:{}", dir.path().join("billing.db").display());
    write_rows(
        &StoreLocation::parse("database", &database).expect("location"),
        &TruthContracts::default_file(),
        &hour_specs(0, 0)[..2],
        1,
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "export",
            "--database",
            &database,
            "--marketplace",
            "aws",
            "--mapping",
        ])
        .arg(&mapping)
        .arg("--out")
        .arg(dir.path().join("out"))
        .args(["--skip-kafka-check", "--config"])
        .arg(&config)
        .output()
        .expect("run tally");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("aws.dimensions[0]"), "{stderr}");
}

#[test]
fn new_hours_wait_until_the_sink_reached_the_end_of_the_aggregates_topic() {
    let started = Instant::now();
    let bootstrap = support::bootstrap();
    let topic = support::rand_name("export-check");
    support::eos::create_topics(&bootstrap, &[&topic], 2);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("kafka.toml");
    std::fs::write(
        &config,
        format!(
            "[metrics]\nlisten = \"\"\n[kafka]\nbootstrap_servers = \"{bootstrap}\"\n[topics]\nbilling_aggregates = \"{topic}\"\n[aggregator]\nwindow_ms = 60000\nallowed_lateness_ms = 30000\nidle_timeout_ms = 10000\ncommit_interval_ms = 1000\n"
        ),
    )
    .expect("config");
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(&mapping, mapping_toml()).expect("mapping");
    let database = format!("sqlite:{}", dir.path().join("billing.db").display());
    let location = StoreLocation::parse("database", &database).expect("location");
    let contracts = TruthContracts::default_file();
    let run = |now: i64| -> Json {
        let text = tally_ok(
            &[
                "export",
                "--database",
                &database,
                "--marketplace",
                "aws",
                "--mapping",
                &mapping.display().to_string(),
                "--out",
                &dir.path().join("out").display().to_string(),
                "--now",
                &format_utc_ms(now),
            ],
            &config,
        );
        serde_json::from_str(&text[text.find('{').expect("summary")..]).expect("json")
    };
    // Four records per partition on the topic (high watermark 4); the store holds two
    // rows per partition, read at offsets 0 and 2, and next offset 4: caught up.
    support::sink::produce_synthetic_rows(&topic, 2, 0..8);
    let specs: Vec<RowSpec> = hour_specs(0, 0).into_iter().take(4).collect();
    let offsets = support::finance::write_rows_to(&location, &contracts, &specs, 2, &topic);
    assert_eq!(offsets.values().copied().collect::<Vec<_>>(), vec![4, 4]);
    let now = H0 + HOUR_MS + LIVENESS_MS;
    let first = run(now);
    assert_eq!(first["sink_caught_up"], true);
    assert_eq!(
        first["hours_exported"],
        serde_json::json!([format_utc_ms(H0)])
    );
    // Two more records on partition 0 the sink has not stored: the next hour waits.
    support::sink::produce_synthetic_rows(&topic, 1, 8..10);
    let later = run(now + HOUR_MS);
    assert_eq!(later["sink_caught_up"], false);
    assert_eq!(later["hours_exported"], serde_json::json!([]));
    eprintln!("export kafka check test took {:?}", started.elapsed());
}
