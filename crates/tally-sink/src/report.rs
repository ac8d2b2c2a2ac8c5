//! `tally report`: hourly, daily or monthly totals in any IANA time zone, summed from
//! the store's 15-minute UTC roll-ups.
//!
//! Every real zone offset (DST included) is a multiple of 15 minutes, so each
//! 15-minute UTC bucket lies inside exactly one local hour, day and month of any zone:
//! a period's total is the exact sum of its buckets. Zone rules come from jiff's
//! bundled copy of the IANA database (the same answer on every machine, no system
//! tzdata needed). `--from` and `--to` are local times in the zone (a date means
//! midnight) or RFC 3339 instants; both must fall on a 15-minute boundary.
//!
//! Amounts are sums of per-row rounded micro-units (each row's gross, share and net
//! were rounded once, half-even, when the row was priced); the output says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{RoundMode, Timestamp, Unit, Zoned, ZonedRound};
use serde::Serialize;

use crate::args::{DATABASE_HELP_AS_FOR_SINK, StoreArgs};
use crate::error::SinkError;
use crate::rows::{BUCKET_MS, RollupKey, RollupSums};
use crate::store::{Store, StoreLocation};

/// The sentence every report carries.
pub const AMOUNTS_NOTE: &str =
    "amounts are sums of per-row rounded micro-units (1 unit of the currency = 1000000)";

/// Flags of `tally report`.
#[derive(Debug, Clone, clap::Args)]
#[command(mut_arg("database", |arg| arg.help(DATABASE_HELP_AS_FOR_SINK)))]
pub struct ReportArgs {
    /// The billing store (`--database`).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Start, inclusive: a local date (`2026-03-01`), local time (`2026-03-01T06:00`)
    /// or an RFC 3339 instant.
    #[arg(long)]
    pub from: String,
    /// End, exclusive; same forms as `--from`.
    #[arg(long)]
    pub to: String,
    /// IANA time zone of the periods and of local `--from`/`--to`.
    #[arg(long, default_value = "UTC")]
    pub tz: String,
    /// Period length: hour | day | month.
    #[arg(long, default_value = "day")]
    pub period: Period,
    /// Comma-separated grouping: tenant, model, cloud, channel_partner, region,
    /// row_kind, beneficiary (beneficiary reports revenue shares). Currency always
    /// groups.
    #[arg(long, value_delimiter = ',', default_value = "tenant")]
    pub by: Vec<Dimension>,
    /// Output format: table | csv | json.
    #[arg(long, default_value = "table")]
    pub format: Format,
}

/// Length of a report period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Local clock hours.
    Hour,
    /// Local calendar days (23, 24 or 25 hours).
    Day,
    /// Local calendar months.
    Month,
}

impl FromStr for Period {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "hour" => Ok(Period::Hour),
            "day" => Ok(Period::Day),
            "month" => Ok(Period::Month),
            other => Err(format!("{other:?} is not hour, day or month")),
        }
    }
}

/// A grouping dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// Tenant id.
    Tenant,
    /// Model.
    Model,
    /// Serving cloud.
    Cloud,
    /// Channel partner (empty for none).
    ChannelPartner,
    /// Region.
    Region,
    /// billable | non_billable.
    RowKind,
    /// Beneficiary of a revenue share (reports shares instead of usage).
    Beneficiary,
}

impl Dimension {
    /// The column name.
    pub const fn name(self) -> &'static str {
        match self {
            Dimension::Tenant => "tenant",
            Dimension::Model => "model",
            Dimension::Cloud => "cloud",
            Dimension::ChannelPartner => "channel_partner",
            Dimension::Region => "region",
            Dimension::RowKind => "row_kind",
            Dimension::Beneficiary => "beneficiary",
        }
    }

    fn of<'a>(self, key: &'a RollupKey, beneficiary: &'a str) -> &'a str {
        match self {
            Dimension::Tenant => &key.tenant_id,
            Dimension::Model => &key.model,
            Dimension::Cloud => &key.cloud,
            Dimension::ChannelPartner => &key.channel_partner,
            Dimension::Region => &key.region,
            Dimension::RowKind => &key.row_kind,
            Dimension::Beneficiary => beneficiary,
        }
    }
}

impl FromStr for Dimension {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let all = [
            Dimension::Tenant,
            Dimension::Model,
            Dimension::Cloud,
            Dimension::ChannelPartner,
            Dimension::Region,
            Dimension::RowKind,
            Dimension::Beneficiary,
        ];
        let value = value.trim();
        all.into_iter()
            .find(|dimension| dimension.name() == value)
            .ok_or_else(|| {
                format!(
                    "{value:?} is not one of tenant, model, cloud, channel_partner, region, row_kind, beneficiary"
                )
            })
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned text columns.
    Table,
    /// Comma-separated values after a `#` note line.
    Csv,
    /// One JSON document.
    Json,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(format!("{other:?} is not table, csv or json")),
        }
    }
}

/// A validated report request.
#[derive(Debug, Clone)]
pub struct ReportRequest {
    /// Start, UTC ms, on a bucket boundary.
    pub from_ms: i64,
    /// End (exclusive), UTC ms, on a bucket boundary.
    pub to_ms: i64,
    /// The zone.
    pub tz: TimeZone,
    /// Its IANA name.
    pub tz_name: String,
    /// Period length.
    pub period: Period,
    /// Grouping, in the order given.
    pub by: Vec<Dimension>,
}

impl ReportRequest {
    /// Validates the flags; errors name the flag.
    pub fn from_args(args: &ReportArgs) -> Result<ReportRequest, SinkError> {
        let tz = TimeZone::get(&args.tz).map_err(|error| SinkError::Setting {
            field: "--tz",
            problem: format!("{:?} is not an IANA time zone: {error}", args.tz),
        })?;
        let from_ms = parse_instant("--from", &args.from, &tz)?;
        let to_ms = parse_instant("--to", &args.to, &tz)?;
        if to_ms <= from_ms {
            return Err(SinkError::Setting {
                field: "--to",
                problem: "must be after --from".to_owned(),
            });
        }
        let mut by = Vec::new();
        for dimension in &args.by {
            if !by.contains(dimension) {
                by.push(*dimension);
            }
        }
        Ok(ReportRequest {
            from_ms,
            to_ms,
            tz,
            tz_name: args.tz.clone(),
            period: args.period,
            by,
        })
    }

    fn shares(&self) -> bool {
        self.by.contains(&Dimension::Beneficiary)
    }
}

/// Parses a local date, a local date-time or an RFC 3339 instant into UTC ms.
fn parse_instant(field: &'static str, value: &str, tz: &TimeZone) -> Result<i64, SinkError> {
    let invalid = |problem: String| SinkError::Setting { field, problem };
    let timestamp = if let Ok(instant) = value.parse::<Timestamp>() {
        instant
    } else if let Ok(datetime) = value.parse::<jiff::civil::DateTime>() {
        datetime
            .to_zoned(tz.clone())
            .map_err(|error| invalid(format!("{value:?}: {error}")))?
            .timestamp()
    } else if let Ok(date) = value.parse::<jiff::civil::Date>() {
        date.to_zoned(tz.clone())
            .map_err(|error| invalid(format!("{value:?}: {error}")))?
            .timestamp()
    } else {
        return Err(invalid(format!(
            "{value:?} is not a date, a local date-time or an RFC 3339 instant"
        )));
    };
    let ms = timestamp.as_millisecond();
    if ms.rem_euclid(BUCKET_MS) != 0 {
        return Err(invalid(format!(
            "{value:?} is not on a 15-minute boundary (the store's resolution)"
        )));
    }
    Ok(ms)
}

/// Start of the local period holding `bucket_start_ms`.
fn period_start(request: &ReportRequest, bucket_start_ms: i64) -> Result<Zoned, SinkError> {
    let fail = |error: jiff::Error| SinkError::Store(format!("time zone arithmetic: {error}"));
    let instant = Timestamp::from_millisecond(bucket_start_ms).map_err(fail)?;
    let local = instant.to_zoned(request.tz.clone());
    match request.period {
        Period::Hour => local
            .round(
                ZonedRound::new()
                    .smallest(Unit::Hour)
                    .mode(RoundMode::Trunc),
            )
            .map_err(fail),
        Period::Day => local.start_of_day().map_err(fail),
        Period::Month => local
            .first_of_month()
            .and_then(|first| first.start_of_day())
            .map_err(fail),
    }
}

/// One line of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportLine {
    /// Local start of the period, RFC 3339 with the offset in force then.
    pub period_start: String,
    /// Values of the `--by` dimensions, in order (beneficiary included when asked).
    pub dims: Vec<String>,
    /// ISO 4217 currency.
    pub currency: String,
    /// Usage figures (zero for share reports).
    pub sums: Sums,
    /// Share micro-units (only for `--by …,beneficiary`).
    pub share_micros: i64,
}

/// The additive figures of a line, as serialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Sums {
    /// Rows summed.
    pub rows: i64,
    /// Counted events.
    pub event_count: i64,
    /// Uncached input tokens.
    pub input_tokens: i64,
    /// Cached input tokens.
    pub cached_input_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Gross micro-units.
    pub gross_micros: i64,
    /// Net micro-units.
    pub net_micros: i64,
}

impl From<RollupSums> for Sums {
    fn from(sums: RollupSums) -> Self {
        Sums {
            rows: sums.rows,
            event_count: sums.event_count,
            input_tokens: sums.input_tokens,
            cached_input_tokens: sums.cached_input_tokens,
            output_tokens: sums.output_tokens,
            reasoning_tokens: sums.reasoning_tokens,
            gross_micros: sums.gross_micros,
            net_micros: sums.net_micros,
        }
    }
}

/// A computed report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// [`AMOUNTS_NOTE`].
    pub note: &'static str,
    /// IANA zone.
    pub tz: String,
    /// Start, RFC 3339 UTC.
    pub from: String,
    /// End (exclusive), RFC 3339 UTC.
    pub to: String,
    /// Period length.
    pub period: Period,
    /// Grouping.
    pub by: Vec<Dimension>,
    /// Lines in (period, dims, currency) order.
    pub lines: Vec<ReportLine>,
}

type GroupKey = (i64, Vec<String>, String);

/// Sums usage roll-up lines into the request's periods and groups.
pub fn usage_report(
    request: &ReportRequest,
    lines: &[(RollupKey, RollupSums)],
) -> Result<Report, SinkError> {
    let mut groups: BTreeMap<GroupKey, (String, RollupSums)> = BTreeMap::new();
    for (key, sums) in lines {
        let start = period_start(request, key.bucket_start_ms)?;
        let dims = request
            .by
            .iter()
            .map(|dimension| dimension.of(key, "").to_owned())
            .collect();
        let entry = groups
            .entry((
                start.timestamp().as_millisecond(),
                dims,
                key.currency.clone(),
            ))
            .or_insert_with(|| (start.to_string_rfc3339(), RollupSums::default()));
        entry.1.checked_add(sums)?;
    }
    Ok(report(
        request,
        groups
            .into_iter()
            .map(|((_, dims, currency), (period_start, sums))| ReportLine {
                period_start,
                dims,
                currency,
                sums: sums.into(),
                share_micros: 0,
            })
            .collect(),
    ))
}

/// Sums share roll-up lines into the request's periods and groups.
pub fn share_report(
    request: &ReportRequest,
    lines: &[(crate::rows::ShareKey, i64)],
) -> Result<Report, SinkError> {
    let mut groups: BTreeMap<GroupKey, (String, i64)> = BTreeMap::new();
    for (key, amount) in lines {
        let start = period_start(request, key.rollup.bucket_start_ms)?;
        let dims = request
            .by
            .iter()
            .map(|dimension| dimension.of(&key.rollup, &key.beneficiary).to_owned())
            .collect();
        let entry = groups
            .entry((
                start.timestamp().as_millisecond(),
                dims,
                key.rollup.currency.clone(),
            ))
            .or_insert_with(|| (start.to_string_rfc3339(), 0));
        entry.1 = entry.1.checked_add(*amount).ok_or(SinkError::OutOfRange {
            field: "share_micros",
        })?;
    }
    Ok(report(
        request,
        groups
            .into_iter()
            .map(|((_, dims, currency), (period_start, amount))| ReportLine {
                period_start,
                dims,
                currency,
                sums: Sums::default(),
                share_micros: amount,
            })
            .collect(),
    ))
}

trait Rfc3339 {
    fn to_string_rfc3339(&self) -> String;
}

impl Rfc3339 for Zoned {
    fn to_string_rfc3339(&self) -> String {
        self.timestamp()
            .display_with_offset(self.offset())
            .to_string()
    }
}

fn report(request: &ReportRequest, lines: Vec<ReportLine>) -> Report {
    let utc = |ms: i64| {
        Timestamp::from_millisecond(ms)
            .map(|instant| instant.to_string())
            .unwrap_or_default()
    };
    Report {
        note: AMOUNTS_NOTE,
        tz: request.tz_name.clone(),
        from: utc(request.from_ms),
        to: utc(request.to_ms),
        period: request.period,
        by: request.by.clone(),
        lines,
    }
}

/// Reads the store and computes the report.
pub fn build(location: &StoreLocation, request: &ReportRequest) -> Result<Report, SinkError> {
    if let StoreLocation::Sqlite(path) = location
        && !std::path::Path::new(path).exists()
    {
        return Err(SinkError::Setting {
            field: crate::args::DATABASE_FLAG,
            problem: format!("no SQLite store at {path}"),
        });
    }
    let mut store = Store::open(location, Duration::from_secs(30))?;
    if request.shares() {
        let lines = store.share_lines(request.from_ms, request.to_ms)?;
        share_report(request, &lines)
    } else {
        let lines = store.rollup_lines(request.from_ms, request.to_ms)?;
        usage_report(request, &lines)
    }
}

/// `micros` as a decimal amount with six places.
pub fn format_micros(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let magnitude = micros.unsigned_abs();
    format!(
        "{sign}{}.{:06}",
        magnitude / 1_000_000,
        magnitude % 1_000_000
    )
}

/// Renders `report` in `format`.
pub fn render(report: &Report, format: Format) -> Result<String, SinkError> {
    let shares = report.by.contains(&Dimension::Beneficiary);
    let mut header: Vec<String> = vec!["period_start".to_owned()];
    header.extend(
        report
            .by
            .iter()
            .map(|dimension| dimension.name().to_owned()),
    );
    header.push("currency".to_owned());
    if shares {
        header.push("share_micros".to_owned());
    } else {
        for name in [
            "rows",
            "events",
            "input_tokens",
            "cached_input_tokens",
            "output_tokens",
            "reasoning_tokens",
            "gross_micros",
            "net_micros",
        ] {
            header.push(name.to_owned());
        }
    }
    let cells = |line: &ReportLine| -> Vec<String> {
        let mut cells = vec![line.period_start.clone()];
        cells.extend(line.dims.iter().cloned());
        cells.push(line.currency.clone());
        if shares {
            cells.push(line.share_micros.to_string());
        } else {
            let sums = &line.sums;
            for value in [
                sums.rows,
                sums.event_count,
                sums.input_tokens,
                sums.cached_input_tokens,
                sums.output_tokens,
                sums.reasoning_tokens,
                sums.gross_micros,
                sums.net_micros,
            ] {
                cells.push(value.to_string());
            }
        }
        cells
    };
    let mut out = String::new();
    match format {
        Format::Json => {
            out = serde_json::to_string_pretty(report)
                .map_err(|error| SinkError::Store(format!("cannot render json: {error}")))?;
            out.push('\n');
        }
        Format::Csv => {
            let _ = writeln!(out, "# {}", report.note);
            let _ = writeln!(out, "{}", header.join(","));
            for line in &report.lines {
                let row: Vec<String> = cells(line).iter().map(|cell| csv_cell(cell)).collect();
                let _ = writeln!(out, "{}", row.join(","));
            }
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = report.lines.iter().map(cells).collect();
            let mut widths: Vec<usize> = header.iter().map(String::len).collect();
            for row in &rows {
                for (width, cell) in widths.iter_mut().zip(row) {
                    *width = (*width).max(cell.len());
                }
            }
            let _ = writeln!(
                out,
                "{} report in {} from {} to {}; {}",
                match report.period {
                    Period::Hour => "hourly",
                    Period::Day => "daily",
                    Period::Month => "monthly",
                },
                report.tz,
                report.from,
                report.to,
                report.note
            );
            for row in std::iter::once(&header).chain(&rows) {
                let padded: Vec<String> = row
                    .iter()
                    .zip(&widths)
                    .map(|(cell, width)| format!("{cell:<width$}"))
                    .collect();
                let _ = writeln!(out, "{}", padded.join("  ").trim_end());
            }
        }
    }
    Ok(out)
}

fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(tz: &str, from: &str, to: &str, period: Period) -> ReportRequest {
        ReportRequest::from_args(&ReportArgs {
            store: StoreArgs::new(""),
            from: from.to_owned(),
            to: to.to_owned(),
            tz: tz.to_owned(),
            period,
            by: vec![Dimension::Tenant],
            format: Format::Json,
        })
        .expect("valid request")
    }

    fn key(bucket_start_ms: i64) -> RollupKey {
        RollupKey {
            bucket_start_ms,
            tenant_id: "t".to_owned(),
            model: "m".to_owned(),
            cloud: "aws".to_owned(),
            channel_partner: String::new(),
            region: "r".to_owned(),
            row_kind: "billable".to_owned(),
            currency: "USD".to_owned(),
        }
    }

    fn sums(gross: i64) -> RollupSums {
        RollupSums {
            rows: 1,
            gross_micros: gross,
            ..RollupSums::default()
        }
    }

    #[test]
    fn kolkata_days_start_at_1830_utc() {
        // 2026-01-01T00:00+05:30 = 2025-12-31T18:30Z = 1767205800000 ms.
        let request = request("Asia/Kolkata", "2026-01-01", "2026-01-03", Period::Day);
        assert_eq!(request.from_ms, 1_767_205_800_000);
        let day_two = 1_767_205_800_000 + 86_400_000;
        let lines = vec![
            (key(1_767_205_800_000), sums(5)),
            (key(day_two - BUCKET_MS), sums(7)),
            (key(day_two), sums(11)),
        ];
        let report = usage_report(&request, &lines).expect("report");
        let got: Vec<(String, i64)> = report
            .lines
            .iter()
            .map(|line| (line.period_start.clone(), line.sums.gross_micros))
            .collect();
        assert_eq!(
            got,
            vec![
                ("2026-01-01T00:00:00+05:30".to_owned(), 12),
                ("2026-01-02T00:00:00+05:30".to_owned(), 11)
            ]
        );
    }

    #[test]
    fn bounds_off_the_quarter_hour_name_the_flag() {
        let error = ReportRequest::from_args(&ReportArgs {
            store: StoreArgs::new(""),
            from: "2026-01-01T00:10:00Z".to_owned(),
            to: "2026-01-02".to_owned(),
            tz: "UTC".to_owned(),
            period: Period::Day,
            by: vec![],
            format: Format::Csv,
        })
        .expect_err("10 past is not a bucket boundary");
        assert!(error.to_string().contains("--from"), "{error}");
    }

    #[test]
    fn unknown_zone_names_the_flag() {
        let error = ReportRequest::from_args(&ReportArgs {
            store: StoreArgs::new(""),
            from: "2026-01-01".to_owned(),
            to: "2026-01-02".to_owned(),
            tz: "Mars/Olympus".to_owned(),
            period: Period::Day,
            by: vec![],
            format: Format::Csv,
        })
        .expect_err("no such zone");
        assert!(error.to_string().contains("--tz"), "{error}");
    }

    #[test]
    fn micros_format_with_six_places() {
        assert_eq!(format_micros(0), "0.000000");
        assert_eq!(format_micros(1_234_567), "1.234567");
        assert_eq!(format_micros(-5), "-0.000005");
    }

    #[test]
    fn csv_starts_with_the_amounts_note() {
        let request = request("UTC", "2026-01-01", "2026-01-02", Period::Hour);
        let report = usage_report(&request, &[(key(request.from_ms), sums(3))]).expect("report");
        let csv = render(&report, Format::Csv).expect("csv");
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some(format!("# {AMOUNTS_NOTE}").as_str()));
        assert_eq!(
            lines.next(),
            Some(
                "period_start,tenant,currency,rows,events,input_tokens,cached_input_tokens,output_tokens,reasoning_tokens,gross_micros,net_micros"
            )
        );
        assert_eq!(
            lines.next(),
            Some("2026-01-01T00:00:00+00:00,t,USD,1,0,0,0,0,0,3,0")
        );
    }
}
