//! `tally export` and `tally export ack`: hourly marketplace usage files from the
//! billing store, and the ledger of what went out. tally makes no network call: an
//! uploader posts the files and hands the marketplace's answers back to `ack`.
//!
//! # What is exported
//!
//! Billable usage (row kind `billable`) of the tenants the mapping file names, served
//! by the marketplace's clouds, summed per (customer, dimension) and UTC hour from the
//! store's 15-minute roll-ups. A dimension counts one measure (a token kind or the
//! gross in micro-units) of one or more models, in units of `unit_size`.
//!
//! # When an hour is exported
//!
//! Hours are exported in order, each once. Hour `[H, H+1h)` is ready when
//! - the aggregator's liveness bound has passed for its end, that is `now ≥ H + 1h +
//!   bound` with `bound = window_ms + allowed_lateness_ms + idle_timeout_ms +
//!   2 × commit_interval_ms` from the configuration (`--now` overrides the clock), so
//!   every window of the hour has closed and its rows were emitted; and
//! - the sink has reached the last stable offset of every partition of the aggregates
//!   topic: for each partition the store's next offset is at least the high watermark
//!   minus one (the last offset of a transactional partition is a commit marker or a
//!   record of a still-open transaction, neither of which the sink can store). The
//!   binary checks this against the broker; `--skip-kafka-check` skips it when the
//!   broker is unreachable and says so in its output.
//!
//! # Quantities, carries and corrections
//!
//! Per (customer, dimension) the ledger keeps the total measure accounted so far and
//! the units exported so far. An exported hour's quantity is
//! `min(total ÷ unit_size − units exported, the marketplace's maximum)` in integer
//! arithmetic: a fraction of a unit stays in the total and is billed with a later hour
//! once whole units add up, and a quantity above the maximum (AWS: 2,147,483,647)
//! carries to the next hour. Nothing is rounded away and nothing is billed twice.
//!
//! No marketplace honours a changed or negative quantity for a record already sent,
//! so a sent hour is never sent again: usage that reaches the store after its hour
//! was exported (a correction pane, or an hour that was overdue) is added to the next
//! hour exported, listed under `carried` in the manifest with the hour it belongs to.
//!
//! Each run reads every billable roll-up line and the whole accounted table, so usage
//! of any age that reached the store after its hour (say, rows of an aggregator that
//! was down for longer than the correction horizon) is still carried, never lost. The
//! cost of a run therefore grows with the store's history; a bound would need the
//! aggregator's watermarks, not the wall clock.
//!
//! # Deadlines
//!
//! AWS rejects records 6 h or more after their hour, Azure after 24 h; GCP wants the
//! report within an hour of the interval's end. An hour that is ready only after its
//! deadline is recorded as `overdue` (never dropped): its usage is carried into the
//! next hour exported, and the manifest lists it under `overdue`.
//!
//! # The ledger
//!
//! `tally_export_ledger` holds one line per (marketplace, customer, dimension, hour):
//! the quantity and its status, `written` → `delivered` | `rejected`. It is written in
//! the same database transaction as the rest of the export's bookkeeping (the hours
//! exported, the measure accounted per usage hour, the carries), so a crash leaves
//! either all of an export or none of it. `tally export ack` moves lines to
//! `delivered` (AWS `Success` and `DuplicateRecord`, Azure `Accepted`, `Duplicate` or
//! an HTTP 409, GCP operations without a report error) or `rejected`.
//!
//! # Files
//!
//! Every run writes, under `--out DIR/<marketplace>/`, the request bodies of every hour
//! that still has `written` lines, rendered from the ledger alone (so a re-run writes
//! byte-identical files), at most 25 records per request, plus `manifest.json` (the
//! files, each hour's deadline, carried usage and overdue hours):
//! - AWS `BatchMeterUsage`: `{"ProductCode", "UsageRecords": [{"CustomerAWSAccountId",
//!   "Dimension", "Quantity", "Timestamp" (epoch seconds, on the hour), "LicenseArn"
//!   when the customer has one}]}`; zero quantities are sent when the customer had
//!   usage in the hour (AWS accepts 0).
//! - Azure `batchUsageEvent`: `{"request": [{"resourceId", "planId", "dimension",
//!   "quantity" (> 0), "effectiveStartTime"}]}`; an hour without a whole unit sends
//!   nothing for that key.
//! - GCP `services.report`: `{"operations": [{"operationId", "operationName",
//!   "consumerId", "startTime", "endTime", "metricValueSets": [{"metricName",
//!   "metricValues": [{"int64Value"}]}]}]}`, posted to `services/{service_name}:report`;
//!   once a key has been reported it is reported every exported hour (0 included), so
//!   its intervals are contiguous.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

use crate::args::{DATABASE_HELP_AS_FOR_SINK, StoreArgs};
use crate::db::{Db, Value};
use crate::error::SinkError;
use crate::mapping::{Mapping, Marketplace, Measure};
use crate::store::StoreLocation;

/// One hour in ms.
pub const HOUR_MS: i64 = 3_600_000;
/// Records per request at most (AWS and Azure accept 25; GCP gets the same).
pub const MAX_RECORDS_PER_REQUEST: usize = 25;
/// Advisory lock key serialising exports in PostgreSQL ("tallyx" in ASCII).
const EXPORT_LOCK: i64 = 0x74_61_6c_6c_79_78;

/// Flags of `tally export`.
#[derive(Debug, Clone, clap::Args)]
#[command(mut_arg("database", |arg| arg.help(DATABASE_HELP_AS_FOR_SINK)))]
pub struct ExportArgs {
    /// The billing store (`--database`).
    #[command(flatten)]
    pub store: StoreArgs,
    /// aws | azure | gcp (required).
    #[arg(long)]
    pub marketplace: Option<Marketplace>,
    /// The mapping file (TOML): tenants to customers, (model, measure) to dimensions
    /// (required).
    #[arg(long)]
    pub mapping: Option<PathBuf>,
    /// Directory for the request files, `DIR/<marketplace>/…` (required).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The clock (RFC 3339), for tests and back-fills; default: the system clock.
    #[arg(long)]
    pub now: Option<String>,
    /// Do not ask the broker whether the sink reached the end of every partition of
    /// the aggregates topic (offline use: the liveness bound alone decides).
    #[arg(long)]
    pub skip_kafka_check: bool,
}

/// Flags of `tally export ack`.
#[derive(Debug, Clone, clap::Args)]
#[command(mut_arg("database", |arg| arg.help(DATABASE_HELP_AS_FOR_SINK)))]
pub struct AckArgs {
    /// The billing store (`--database`).
    #[command(flatten)]
    pub store: StoreArgs,
    /// aws | azure | gcp.
    #[arg(long)]
    pub marketplace: Marketplace,
    /// The request file that was posted.
    #[arg(long)]
    pub request: PathBuf,
    /// The marketplace's response body (JSON); an empty file for a body-less answer.
    #[arg(long)]
    pub response: PathBuf,
    /// The HTTP status of the answer (Azure 409: every record was already accepted).
    #[arg(long)]
    pub http_status: Option<u16>,
}

/// Parses `--now`.
pub fn parse_now(value: &str) -> Result<i64, SinkError> {
    value
        .parse::<Timestamp>()
        .map(|instant| instant.as_millisecond())
        .map_err(|error| SinkError::Setting {
            field: "--now",
            problem: format!("{value:?} is not an RFC 3339 instant: {error}"),
        })
}

/// Whether every partition's stored next offset reached its high watermark minus one
/// (see the module docs); `high_watermarks` per partition.
pub fn caught_up(stored: &BTreeMap<i32, i64>, high_watermarks: &BTreeMap<i32, i64>) -> bool {
    high_watermarks.iter().all(|(partition, high)| {
        *high == 0 || stored.get(partition).is_some_and(|next| *next >= high - 1)
    })
}

/// What a run may export.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// The store.
    pub location: StoreLocation,
    /// The marketplace's validated mapping.
    pub mapping: Mapping,
    /// Output directory (files go to `<out>/<marketplace>/`).
    pub out: PathBuf,
    /// The clock, UTC ms.
    pub now_ms: i64,
    /// The aggregator's liveness bound, ms.
    pub liveness_ms: i64,
    /// Whether new hours may be exported (the sink reached the end of every partition,
    /// or the check was skipped). When false only the pending files are re-written.
    pub sink_caught_up: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportSummary {
    /// Whether new hours could be exported: the sink had reached the end of every
    /// partition (or the check was skipped).
    pub sink_caught_up: bool,
    /// Hours exported by this run.
    pub hours_exported: Vec<String>,
    /// Hours this run found past their deadline.
    pub hours_overdue: Vec<String>,
    /// Ledger lines written by this run.
    pub records_written: u64,
    /// Late usage this run carried into a later hour: (into hour, customer, dimension,
    /// usage hour, measure).
    pub carried: Vec<Carried>,
    /// Request files written (all pending hours).
    pub files: Vec<String>,
    /// The first hour not exported yet and when it is ready (RFC 3339), if any usage
    /// waits.
    pub next_ready_at: Option<String>,
}

/// Usage that arrived after its hour was exported (or its hour was overdue), carried
/// into a later hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Carried {
    /// The hour it was exported with.
    pub into_hour: String,
    /// Customer.
    pub customer: String,
    /// Dimension.
    pub dimension: String,
    /// The hour the usage belongs to.
    pub usage_hour: String,
    /// Measure carried (tokens or micro-units).
    pub amount: i64,
}

fn utc(ms: i64) -> String {
    Timestamp::from_millisecond(ms)
        .map(|instant| instant.to_string())
        .unwrap_or_default()
}

/// `2026-02-01T10Z` for file names.
fn hour_tag(ms: i64) -> String {
    let text = utc(ms);
    format!("{}Z", text.get(..13).unwrap_or(&text))
}

/// Measure per (customer, dimension, usage hour) from roll-up rows.
type Usage = BTreeMap<(String, String), BTreeMap<i64, i64>>;

/// Sums the mapped measures of the billable roll-up lines `(bucket, tenant, model,
/// cloud, [input, cached, output, reasoning, gross])` per key and hour.
pub fn usage_by_hour(
    mapping: &Mapping,
    lines: &[(i64, String, String, String, [i64; 5])],
) -> Result<Usage, SinkError> {
    let mut usage = Usage::new();
    for (bucket, tenant, model, cloud, values) in lines {
        let Some(customer) = mapping.customers.get(tenant) else {
            continue;
        };
        if !mapping.clouds.iter().any(|allowed| allowed == cloud) {
            continue;
        }
        for dimension in mapping.dimensions.iter().filter(|d| &d.model == model) {
            let amount = match dimension.measure {
                Measure::InputTokens => values[0],
                Measure::CachedInputTokens => values[1],
                Measure::OutputTokens => values[2],
                Measure::ReasoningTokens => values[3],
                Measure::GrossMicros => values[4],
            };
            let hour = bucket.div_euclid(HOUR_MS) * HOUR_MS;
            let slot = usage
                .entry((customer.id.clone(), dimension.name.clone()))
                .or_default()
                .entry(hour)
                .or_insert(0);
            *slot = slot.checked_add(amount).ok_or(SinkError::OutOfRange {
                field: "export measure",
            })?;
        }
    }
    Ok(usage)
}

/// Per-key carry state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Carry {
    unit_size: i64,
    amount_total: i64,
    exported_units: i64,
    seen: bool,
}

/// Runs an export: bookkeeping in one transaction, then the pending files.
pub fn run(request: &ExportRequest) -> Result<ExportSummary, SinkError> {
    let mut db = Db::open(&request.location, Duration::from_secs(30))?;
    db.begin_write()?;
    let result = bookkeep(&mut db, request);
    let mut summary = match result {
        Ok(summary) => {
            db.commit()?;
            summary
        }
        Err(error) => {
            db.rollback();
            return Err(error);
        }
    };
    summary.files = write_files(&mut db, request)?;
    Ok(summary)
}

#[allow(clippy::too_many_lines)]
fn bookkeep(db: &mut Db, request: &ExportRequest) -> Result<ExportSummary, SinkError> {
    let mapping = &request.mapping;
    let market = mapping.marketplace.name();
    if db.is_postgres() {
        db.query(
            "SELECT pg_advisory_xact_lock($1)::text",
            &[Value::Int(EXPORT_LOCK)],
        )?;
    }
    let mut summary = ExportSummary {
        sink_caught_up: request.sink_caught_up,
        ..ExportSummary::default()
    };
    // The last hour whose liveness bound has passed.
    let last_ready_end = (request.now_ms - request.liveness_ms).div_euclid(HOUR_MS) * HOUR_MS;
    let processed: Option<i64> = db
        .query(
            "SELECT max(hour_start_ms) FROM tally_export_hours WHERE marketplace = $1",
            &[Value::from(market)],
        )?
        .first()
        .and_then(|row| row.first().cloned())
        .and_then(|value| value.int("hour_start_ms").ok());

    let mut lines = Vec::new();
    for row in db.query(
        "SELECT bucket_start_ms, tenant_id, model, cloud, input_tokens, cached_input_tokens, \
         output_tokens, reasoning_tokens, gross_micros FROM tally_rollup_15m \
         WHERE row_kind = 'billable' ORDER BY bucket_start_ms, tenant_id, model, cloud",
        &[],
    )? {
        lines.push((
            row[0].int("bucket_start_ms")?,
            row[1].text("tenant_id")?,
            row[2].text("model")?,
            row[3].text("cloud")?,
            [
                row[4].int("input_tokens")?,
                row[5].int("cached_input_tokens")?,
                row[6].int("output_tokens")?,
                row[7].int("reasoning_tokens")?,
                row[8].int("gross_micros")?,
            ],
        ));
    }
    let usage = usage_by_hour(mapping, &lines)?;

    // What is not accounted yet: usage − accounted, per key and usage hour.
    let mut accounted: BTreeMap<(String, String, i64), i64> = BTreeMap::new();
    for row in db.query(
        "SELECT customer, dimension, usage_hour_ms, amount FROM tally_export_accounted WHERE marketplace = $1",
        &[Value::from(market)],
    )? {
        accounted.insert(
            (
                row[0].text("customer")?,
                row[1].text("dimension")?,
                row[2].int("usage_hour_ms")?,
            ),
            row[3].int("amount")?,
        );
    }
    let mut open: BTreeMap<(String, String), BTreeMap<i64, i64>> = BTreeMap::new();
    for ((customer, dimension), hours) in &usage {
        for (&hour, &amount) in hours {
            let done = accounted
                .get(&(customer.clone(), dimension.clone(), hour))
                .copied()
                .unwrap_or(0);
            let diff = amount - done;
            if diff < 0 {
                return Err(SinkError::Store(format!(
                    "{market} usage of {customer}/{dimension} at {} fell below what was exported",
                    utc(hour)
                )));
            }
            if diff > 0 {
                open.entry((customer.clone(), dimension.clone()))
                    .or_default()
                    .insert(hour, diff);
            }
        }
    }

    let mut carries: BTreeMap<(String, String), Carry> = BTreeMap::new();
    for row in db.query(
        "SELECT customer, dimension, unit_size, amount_total, exported_units FROM tally_export_carry WHERE marketplace = $1",
        &[Value::from(market)],
    )? {
        let dimension = row[1].text("dimension")?;
        let unit_size = row[2].int("unit_size")?;
        if let Some(configured) = mapping.unit_size(&dimension)
            && configured != unit_size
        {
            return Err(SinkError::Setting {
                field: "--mapping",
                problem: format!(
                    "{market} dimension {dimension} was exported with unit_size {unit_size}; a unit size cannot change (use a new dimension)"
                ),
            });
        }
        carries.insert(
            (row[0].text("customer")?, dimension),
            Carry {
                unit_size,
                amount_total: row[3].int("amount_total")?,
                exported_units: row[4].int("exported_units")?,
                seen: true,
            },
        );
    }

    let first_open = open
        .values()
        .filter_map(|hours| hours.keys().next().copied())
        .min();
    let start = match (processed, first_open) {
        (Some(last), _) => last + HOUR_MS,
        (None, Some(first)) => first,
        (None, None) => return Ok(summary),
    };
    if !request.sink_caught_up {
        summary.next_ready_at = Some(utc(start + HOUR_MS + request.liveness_ms));
        return Ok(summary);
    }
    let plans: BTreeMap<&str, &str> = mapping
        .customers
        .values()
        .map(|customer| (customer.id.as_str(), customer.plan.as_str()))
        .collect();
    let now = crate::store::now_ms();
    let mut hour = start;
    while hour + HOUR_MS <= last_ready_end {
        if request.now_ms >= mapping.marketplace.deadline_ms(hour) {
            db.execute(
                "INSERT INTO tally_export_hours (marketplace, hour_start_ms, status, carried_into_ms) VALUES ($1, $2, 'overdue', -1)",
                &[Value::from(market), Value::Int(hour)],
            )?;
            summary.hours_overdue.push(utc(hour));
            hour += HOUR_MS;
            continue;
        }
        db.execute(
            "INSERT INTO tally_export_hours (marketplace, hour_start_ms, status, carried_into_ms) VALUES ($1, $2, 'exported', -1)",
            &[Value::from(market), Value::Int(hour)],
        )?;
        db.execute(
            "UPDATE tally_export_hours SET carried_into_ms = $1 WHERE marketplace = $2 AND status = 'overdue' AND carried_into_ms = -1",
            &[Value::Int(hour), Value::from(market)],
        )?;
        summary.hours_exported.push(utc(hour));
        let keys: BTreeSet<(String, String)> = open.keys().chain(carries.keys()).cloned().collect();
        for key in keys {
            let (customer, dimension) = &key;
            let Some(unit_size) = mapping.unit_size(dimension) else {
                continue;
            };
            let mut new_amount: i64 = 0;
            if let Some(hours) = open.get_mut(&key) {
                let due: Vec<i64> = hours.range(..=hour).map(|(h, _)| *h).collect();
                for usage_hour in due {
                    let amount = hours.remove(&usage_hour).unwrap_or(0);
                    new_amount = new_amount
                        .checked_add(amount)
                        .ok_or(SinkError::OutOfRange {
                            field: "export measure",
                        })?;
                    db.execute(
                        "INSERT INTO tally_export_accounted (marketplace, customer, dimension, usage_hour_ms, amount) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (marketplace, customer, dimension, usage_hour_ms) \
                         DO UPDATE SET amount = tally_export_accounted.amount + excluded.amount",
                        &[
                            Value::from(market),
                            Value::from(customer.as_str()),
                            Value::from(dimension.as_str()),
                            Value::Int(usage_hour),
                            Value::Int(amount),
                        ],
                    )?;
                    if usage_hour < hour {
                        db.execute(
                            "INSERT INTO tally_export_late (marketplace, hour_start_ms, customer, dimension, usage_hour_ms, amount) \
                             VALUES ($1, $2, $3, $4, $5, $6)",
                            &[
                                Value::from(market),
                                Value::Int(hour),
                                Value::from(customer.as_str()),
                                Value::from(dimension.as_str()),
                                Value::Int(usage_hour),
                                Value::Int(amount),
                            ],
                        )?;
                        summary.carried.push(Carried {
                            into_hour: utc(hour),
                            customer: customer.clone(),
                            dimension: dimension.clone(),
                            usage_hour: utc(usage_hour),
                            amount,
                        });
                    }
                }
            }
            let carry = carries.entry(key.clone()).or_insert(Carry {
                unit_size,
                amount_total: 0,
                exported_units: 0,
                seen: false,
            });
            let was_seen = carry.seen;
            carry.amount_total =
                carry
                    .amount_total
                    .checked_add(new_amount)
                    .ok_or(SinkError::OutOfRange {
                        field: "export measure",
                    })?;
            let available = carry.amount_total / unit_size - carry.exported_units;
            let quantity = available.clamp(0, mapping.marketplace.max_quantity());
            let emit = match mapping.marketplace {
                Marketplace::Aws => new_amount > 0 || quantity > 0,
                Marketplace::Azure => quantity > 0,
                Marketplace::Gcp => new_amount > 0 || quantity > 0 || was_seen,
            };
            if !emit && new_amount == 0 {
                continue;
            }
            if emit {
                carry.exported_units += quantity;
                let plan = plans.get(customer.as_str()).copied().unwrap_or_default();
                db.execute(
                    "INSERT INTO tally_export_ledger (marketplace, customer, dimension, hour_start_ms, plan, quantity, status, detail, updated_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, 'written', '', $7)",
                    &[
                        Value::from(market),
                        Value::from(customer.as_str()),
                        Value::from(dimension.as_str()),
                        Value::Int(hour),
                        Value::from(plan),
                        Value::Int(quantity),
                        Value::Int(now),
                    ],
                )?;
                summary.records_written += 1;
                carry.seen = true;
            }
            db.execute(
                "INSERT INTO tally_export_carry (marketplace, customer, dimension, unit_size, amount_total, exported_units) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (marketplace, customer, dimension) \
                 DO UPDATE SET amount_total = excluded.amount_total, exported_units = excluded.exported_units",
                &[
                    Value::from(market),
                    Value::from(customer.as_str()),
                    Value::from(dimension.as_str()),
                    Value::Int(carry.unit_size),
                    Value::Int(carry.amount_total),
                    Value::Int(carry.exported_units),
                ],
            )?;
        }
        hour += HOUR_MS;
    }
    let waiting = open.values().any(|hours| !hours.is_empty())
        || carries
            .values()
            .any(|carry| carry.amount_total / carry.unit_size > carry.exported_units);
    if waiting {
        summary.next_ready_at = Some(utc(hour + HOUR_MS + request.liveness_ms));
    }
    Ok(summary)
}

/// One ledger line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LedgerLine {
    customer: String,
    dimension: String,
    hour_start_ms: i64,
    plan: String,
    quantity: i64,
}

/// Deterministic GCP operation id (a UUID-shaped SHA-256 prefix of the key).
fn operation_id(customer: &str, dimension: &str, hour_start_ms: i64) -> String {
    let digest = hex::encode(Sha256::digest(
        format!("tally/gcp/{customer}/{dimension}/{hour_start_ms}").as_bytes(),
    ));
    format!(
        "{}-{}-{}-{}-{}",
        &digest[0..8],
        &digest[8..12],
        &digest[12..16],
        &digest[16..20],
        &digest[20..32]
    )
}

/// The request body of `lines` (≤ 25) of one hour.
fn request_body(marketplace: Marketplace, product: &str, lines: &[LedgerLine]) -> Json {
    match marketplace {
        Marketplace::Aws => {
            let records: Vec<Json> = lines
                .iter()
                .map(|line| {
                    let mut record = json!({
                        "CustomerAWSAccountId": line.customer,
                        "Dimension": line.dimension,
                        "Quantity": line.quantity,
                        "Timestamp": line.hour_start_ms / 1000,
                    });
                    if !line.plan.is_empty()
                        && let Some(object) = record.as_object_mut()
                    {
                        object.insert("LicenseArn".to_owned(), Json::from(line.plan.clone()));
                    }
                    record
                })
                .collect();
            json!({ "ProductCode": product, "UsageRecords": records })
        }
        Marketplace::Azure => {
            let events: Vec<Json> = lines
                .iter()
                .map(|line| {
                    json!({
                        "resourceId": line.customer,
                        "planId": line.plan,
                        "dimension": line.dimension,
                        "quantity": line.quantity,
                        "effectiveStartTime": utc(line.hour_start_ms),
                    })
                })
                .collect();
            json!({ "request": events })
        }
        Marketplace::Gcp => {
            let operations: Vec<Json> = lines
                .iter()
                .map(|line| {
                    json!({
                        "operationId": operation_id(&line.customer, &line.dimension, line.hour_start_ms),
                        "operationName": "tally/usage",
                        "consumerId": line.customer,
                        "startTime": utc(line.hour_start_ms),
                        "endTime": utc(line.hour_start_ms + HOUR_MS),
                        "metricValueSets": [{
                            "metricName": line.dimension,
                            "metricValues": [{ "int64Value": line.quantity.to_string() }],
                        }],
                    })
                })
                .collect();
            json!({ "operations": operations })
        }
    }
}

/// Writes the request files of every hour with `written` lines, and the manifest.
fn write_files(db: &mut Db, request: &ExportRequest) -> Result<Vec<String>, SinkError> {
    let mapping = &request.mapping;
    let market = mapping.marketplace.name();
    let rows = db.query(
        "SELECT customer, dimension, hour_start_ms, plan, quantity FROM tally_export_ledger \
         WHERE marketplace = $1 AND hour_start_ms IN \
         (SELECT hour_start_ms FROM tally_export_ledger WHERE marketplace = $1 AND status = 'written') \
         ORDER BY hour_start_ms, customer, dimension",
        &[Value::from(market)],
    )?;
    let mut hours: BTreeMap<i64, Vec<LedgerLine>> = BTreeMap::new();
    for row in rows {
        let line = LedgerLine {
            customer: row[0].text("customer")?,
            dimension: row[1].text("dimension")?,
            hour_start_ms: row[2].int("hour_start_ms")?,
            plan: row[3].text("plan")?,
            quantity: row[4].int("quantity")?,
        };
        hours.entry(line.hour_start_ms).or_default().push(line);
    }
    let dir = request.out.join(market);
    std::fs::create_dir_all(&dir).map_err(|error| SinkError::Setting {
        field: "--out",
        problem: format!("cannot create {}: {error}", dir.display()),
    })?;
    let mut files = Vec::new();
    let mut manifest_requests = Vec::new();
    let mut manifest_carried = Vec::new();
    let mut manifest_overdue = Vec::new();
    for (&hour, lines) in &hours {
        for (index, chunk) in lines.chunks(MAX_RECORDS_PER_REQUEST).enumerate() {
            let name = format!("{}-{index:02}.json", hour_tag(hour));
            let body = request_body(mapping.marketplace, &mapping.product, chunk);
            write_json(&dir.join(&name), &body)?;
            manifest_requests.push(json!({
                "file": name,
                "hour": utc(hour),
                "deadline": utc(mapping.marketplace.deadline_ms(hour)),
                "records": chunk.len(),
            }));
            files.push(format!("{market}/{name}"));
        }
        for row in db.query(
            "SELECT customer, dimension, usage_hour_ms, amount FROM tally_export_late \
             WHERE marketplace = $1 AND hour_start_ms = $2 ORDER BY customer, dimension, usage_hour_ms",
            &[Value::from(market), Value::Int(hour)],
        )? {
            manifest_carried.push(json!({
                "into_hour": utc(hour),
                "customer": row[0].text("customer")?,
                "dimension": row[1].text("dimension")?,
                "usage_hour": utc(row[2].int("usage_hour_ms")?),
                "amount": row[3].int("amount")?,
            }));
        }
        for row in db.query(
            "SELECT hour_start_ms FROM tally_export_hours WHERE marketplace = $1 AND status = 'overdue' \
             AND carried_into_ms = $2 ORDER BY hour_start_ms",
            &[Value::from(market), Value::Int(hour)],
        )? {
            manifest_overdue.push(json!({
                "hour": utc(row[0].int("hour_start_ms")?),
                "carried_into": utc(hour),
            }));
        }
    }
    for row in db.query(
        "SELECT hour_start_ms FROM tally_export_hours WHERE marketplace = $1 AND status = 'overdue' \
         AND carried_into_ms = -1 ORDER BY hour_start_ms",
        &[Value::from(market)],
    )? {
        manifest_overdue.push(json!({
            "hour": utc(row[0].int("hour_start_ms")?),
            "carried_into": Json::Null,
        }));
    }
    let manifest = json!({
        "marketplace": market,
        "product": mapping.product,
        "note": "request bodies of every hour with records not yet acknowledged; quantities are whole units of each dimension, fractions carry to later hours",
        "requests": manifest_requests,
        "carried": manifest_carried,
        "overdue": manifest_overdue,
    });
    write_json(&dir.join("manifest.json"), &manifest)?;
    Ok(files)
}

fn write_json(path: &Path, body: &Json) -> Result<(), SinkError> {
    let mut text = serde_json::to_string_pretty(body)
        .map_err(|error| SinkError::Store(format!("cannot render json: {error}")))?;
    text.push('\n');
    let partial = path.with_extension("partial");
    std::fs::write(&partial, &text)
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|error| SinkError::Setting {
            field: "--out",
            problem: format!("cannot write {}: {error}", path.display()),
        })
}

/// What an acknowledgement did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AckSummary {
    /// Lines now delivered.
    pub delivered: u64,
    /// Lines now rejected.
    pub rejected: u64,
    /// Records of the request the answer says nothing about (still written).
    pub unanswered: u64,
    /// Answers naming no ledger line.
    pub unknown: u64,
}

/// Outcome of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Delivered(String),
    Rejected(String),
}

/// A record's ledger key from the request body: (customer, dimension, hour).
type RecordKey = (String, String, i64);

fn parse_time(field: &'static str, value: &Json) -> Result<i64, SinkError> {
    let text = value.as_str().unwrap_or_default();
    text.parse::<Timestamp>()
        .map(|instant| instant.as_millisecond())
        .map_err(|_| SinkError::Setting {
            field,
            problem: format!("{text:?} is not an RFC 3339 time"),
        })
}

fn text_of(value: &Json, key: &str) -> String {
    value
        .get(key)
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The ledger keys of a request body.
fn request_keys(marketplace: Marketplace, body: &Json) -> Result<Vec<RecordKey>, SinkError> {
    let bad = |problem: &str| SinkError::Setting {
        field: "--request",
        problem: problem.to_owned(),
    };
    let mut keys = Vec::new();
    match marketplace {
        Marketplace::Aws => {
            for record in body
                .get("UsageRecords")
                .and_then(Json::as_array)
                .ok_or_else(|| bad("no UsageRecords"))?
            {
                keys.push(aws_key(record)?);
            }
        }
        Marketplace::Azure => {
            for event in body
                .get("request")
                .and_then(Json::as_array)
                .ok_or_else(|| bad("no request array"))?
            {
                keys.push(azure_key("--request", event)?);
            }
        }
        Marketplace::Gcp => {
            for operation in body
                .get("operations")
                .and_then(Json::as_array)
                .ok_or_else(|| bad("no operations"))?
            {
                let metric = operation
                    .get("metricValueSets")
                    .and_then(|sets| sets.get(0))
                    .map(|set| text_of(set, "metricName"))
                    .unwrap_or_default();
                keys.push((
                    text_of(operation, "consumerId"),
                    metric,
                    parse_time(
                        "--request",
                        operation.get("startTime").unwrap_or(&Json::Null),
                    )?,
                ));
            }
        }
    }
    Ok(keys)
}

fn aws_key(record: &Json) -> Result<RecordKey, SinkError> {
    let seconds = record
        .get("Timestamp")
        .and_then(Json::as_i64)
        .ok_or_else(|| SinkError::Setting {
            field: "--response",
            problem: "a usage record has no integer Timestamp".to_owned(),
        })?;
    Ok((
        text_of(record, "CustomerAWSAccountId"),
        text_of(record, "Dimension"),
        seconds * 1000,
    ))
}

fn azure_key(field: &'static str, event: &Json) -> Result<RecordKey, SinkError> {
    Ok((
        text_of(event, "resourceId"),
        text_of(event, "dimension"),
        parse_time(
            field,
            event.get("effectiveStartTime").unwrap_or(&Json::Null),
        )?,
    ))
}

/// Outcomes per key from a marketplace's answer to `request`.
fn outcomes(
    marketplace: Marketplace,
    request_keys: &[RecordKey],
    response: &Json,
    http_status: Option<u16>,
) -> Result<BTreeMap<RecordKey, Outcome>, SinkError> {
    let mut out = BTreeMap::new();
    if marketplace == Marketplace::Azure && http_status == Some(409) {
        for key in request_keys {
            out.insert(key.clone(), Outcome::Delivered("409".to_owned()));
        }
        return Ok(out);
    }
    match marketplace {
        Marketplace::Aws => {
            for result in response
                .get("Results")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                let status = text_of(result, "Status");
                let key = aws_key(result.get("UsageRecord").unwrap_or(&Json::Null))?;
                let outcome = match status.as_str() {
                    "Success" | "DuplicateRecord" => Outcome::Delivered(status),
                    _ => Outcome::Rejected(status),
                };
                out.insert(key, outcome);
            }
        }
        Marketplace::Azure => {
            for result in response
                .get("result")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                let status = text_of(result, "status");
                let key = azure_key("--response", result)?;
                match status.as_str() {
                    "Accepted" | "Duplicate" => {
                        out.insert(key, Outcome::Delivered(status));
                    }
                    // A server-side error: the record stays written, to be re-sent.
                    "Error" | "" => {}
                    _ => {
                        out.insert(key, Outcome::Rejected(status));
                    }
                }
            }
        }
        Marketplace::Gcp => {
            let mut errors: BTreeMap<String, String> = BTreeMap::new();
            for error in response
                .get("reportErrors")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                let message = error
                    .get("status")
                    .map(|status| text_of(status, "message"))
                    .unwrap_or_default();
                errors.insert(text_of(error, "operationId"), message);
            }
            if http_status.is_none_or(|status| status == 200) {
                for key in request_keys {
                    let id = operation_id(&key.0, &key.1, key.2);
                    let outcome = match errors.get(&id) {
                        Some(message) => Outcome::Rejected(message.clone()),
                        None => Outcome::Delivered("ok".to_owned()),
                    };
                    out.insert(key.clone(), outcome);
                }
            }
        }
    }
    Ok(out)
}

/// Applies a marketplace's answer to the request file it answers.
pub fn ack(
    location: &StoreLocation,
    marketplace: Marketplace,
    request_body: &Json,
    response: &Json,
    http_status: Option<u16>,
) -> Result<AckSummary, SinkError> {
    let keys = request_keys(marketplace, request_body)?;
    let outcomes = outcomes(marketplace, &keys, response, http_status)?;
    let market = marketplace.name();
    let mut db = Db::open(location, Duration::from_secs(30))?;
    db.begin_write()?;
    let mut summary = AckSummary::default();
    let applied = (|| -> Result<(), SinkError> {
        let now = crate::store::now_ms();
        for key in &keys {
            if !outcomes.contains_key(key) {
                summary.unanswered += 1;
            }
        }
        for ((customer, dimension, hour), outcome) in &outcomes {
            let (status, detail, from) = match outcome {
                Outcome::Delivered(detail) => {
                    ("delivered", detail, "status IN ('written', 'rejected')")
                }
                Outcome::Rejected(detail) => ("rejected", detail, "status = 'written'"),
            };
            let changed = db.execute(
                &format!(
                    "UPDATE tally_export_ledger SET status = $1, detail = $2, updated_at_ms = $3 \
                     WHERE marketplace = $4 AND customer = $5 AND dimension = $6 AND hour_start_ms = $7 AND {from}"
                ),
                &[
                    Value::from(status),
                    Value::from(detail.as_str()),
                    Value::Int(now),
                    Value::from(market),
                    Value::from(customer.as_str()),
                    Value::from(dimension.as_str()),
                    Value::Int(*hour),
                ],
            )?;
            let exists = changed > 0
                || !db
                    .query(
                        "SELECT status FROM tally_export_ledger WHERE marketplace = $1 AND customer = $2 \
                         AND dimension = $3 AND hour_start_ms = $4",
                        &[
                            Value::from(market),
                            Value::from(customer.as_str()),
                            Value::from(dimension.as_str()),
                            Value::Int(*hour),
                        ],
                    )?
                    .is_empty();
            if !exists {
                summary.unknown += 1;
            } else if status == "delivered" {
                summary.delivered += 1;
            } else {
                summary.rejected += 1;
            }
        }
        Ok(())
    })();
    match applied {
        Ok(()) => db.commit()?,
        Err(error) => {
            db.rollback();
            return Err(error);
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_means_at_most_the_last_offset_left() {
        let high: BTreeMap<i32, i64> = [(0, 10), (1, 0)].into_iter().collect();
        let at = |next: i64| -> BTreeMap<i32, i64> { [(0, next)].into_iter().collect() };
        // Offset 9 is a commit marker or a record of an open transaction.
        assert!(caught_up(&at(9), &high));
        assert!(caught_up(&at(10), &high));
        assert!(!caught_up(&at(8), &high));
        // A partition with records and no stored offset is behind; an empty one is not.
        assert!(!caught_up(&BTreeMap::new(), &high));
        let empty: BTreeMap<i32, i64> = [(0, 0)].into_iter().collect();
        assert!(caught_up(&BTreeMap::new(), &empty));
    }

    #[test]
    fn operation_ids_are_uuid_shaped_and_stable() {
        let id = operation_id("project:a", "m", 0);
        assert_eq!(id.len(), 36);
        assert_eq!(id, operation_id("project:a", "m", 0));
        assert_ne!(id, operation_id("project:a", "m", HOUR_MS));
    }

    #[test]
    fn hour_tags_name_files_without_colons() {
        assert_eq!(hour_tag(1_769_940_000_000), "2026-02-01T10Z");
    }
}
