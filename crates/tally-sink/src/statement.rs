//! `tally statement`: a partner's revenue-share statement for one month, from the
//! billing store's rows.
//!
//! For beneficiary P and a local calendar month of `--tz`, every stored row whose
//! window starts in the month and that carries a share for P contributes to one line
//! per (cloud, channel partner, model, price-book version, share-rule version,
//! currency, P's basis points). Correction rows (correction sequence ≥ 1) are lines of
//! their own, per (window, correction sequence) as well, so a partner sees what changed
//! after a window first closed. Each line carries:
//! - `rows`: the rows summed;
//! - `gross_micros`: the channel's gross of those rows. A row's gross is counted once
//!   whatever the number of beneficiaries of its channel (the statement reads P's own
//!   share line of each row, never the others');
//! - `basis_points`: P's share in that channel under that share-rule version;
//! - `amount_micros`: the sum of P's per-row shares. Each row's share was rounded once,
//!   half-even, from the row's exact gross when the row was priced, so a line's amount
//!   is a sum of rounded row amounts, not the line's gross times the basis points.
//!
//! Totals (per currency) are the exact integer sums of the lines. Amounts are integer
//! micro-units (1 unit of the currency = 1,000,000); no floating point anywhere.
//!
//! # Reproducible
//!
//! The statement names what it covers: "rows committed up to offsets" followed by
//! every `topic:partition=next_offset` the sink had stored, read before the rows. Rows
//! read at or after those offsets are left out, so the output is a function of the
//! aggregates topic up to those offsets. `--as-of` with the same list regenerates the
//! statement byte for byte later, however many rows the store gained since. Nothing in
//! the output depends on when or where it was generated.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;

use crate::args::{DATABASE_HELP_AS_FOR_SINK, StoreArgs};
use crate::db::{Db, Value};
use crate::error::SinkError;

/// The amounts sentence every statement carries.
pub const STATEMENT_NOTE: &str = "amounts are integer micro-units of the currency (1 unit = 1000000); a line's amount is the sum of per-row shares, each rounded half-even once when the row was priced; totals are the sums of the lines";

/// Flags of `tally statement`.
#[derive(Debug, Clone, clap::Args)]
#[command(mut_arg("database", |arg| arg.help(DATABASE_HELP_AS_FOR_SINK)))]
pub struct StatementArgs {
    /// The billing store (`--database`).
    #[command(flatten)]
    pub store: StoreArgs,
    /// The beneficiary partner (as named in the share rules).
    #[arg(long)]
    pub partner: String,
    /// The month, `YYYY-MM`, in `--tz`.
    #[arg(long)]
    pub period: String,
    /// IANA time zone of the month.
    #[arg(long, default_value = "UTC")]
    pub tz: String,
    /// Output format: csv | json.
    #[arg(long, default_value = "csv")]
    pub format: StatementFormat,
    /// Write the statement here instead of standard output.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Regenerate as of these offsets (`topic:partition=offset,…`, as printed in a
    /// statement's "covers" line) instead of the store's current ones.
    #[arg(long)]
    pub as_of: Option<String>,
}

/// Output format of a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementFormat {
    /// `#` header lines, then comma-separated values.
    Csv,
    /// One JSON document.
    Json,
}

impl std::str::FromStr for StatementFormat {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "csv" => Ok(StatementFormat::Csv),
            "json" => Ok(StatementFormat::Json),
            other => Err(format!("{other:?} is not csv or json")),
        }
    }
}

/// Offsets a statement covers: per (topic, partition), the next offset not included.
pub type Coverage = BTreeMap<(String, i32), i64>;

/// Renders coverage as `topic:partition=offset,…` (the `--as-of` form).
pub fn coverage_text(coverage: &Coverage) -> String {
    coverage
        .iter()
        .map(|((topic, partition), offset)| format!("{topic}:{partition}={offset}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses the `--as-of` form; errors name the flag.
pub fn parse_coverage(text: &str) -> Result<Coverage, SinkError> {
    let invalid = |problem: String| SinkError::Setting {
        field: "--as-of",
        problem,
    };
    let mut coverage = Coverage::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let (place, offset) = item
            .rsplit_once('=')
            .ok_or_else(|| invalid(format!("{item:?} is not topic:partition=offset")))?;
        let (topic, partition) = place
            .rsplit_once(':')
            .ok_or_else(|| invalid(format!("{item:?} is not topic:partition=offset")))?;
        let partition: i32 = partition
            .parse()
            .map_err(|_| invalid(format!("{item:?}: partition is not an integer")))?;
        let offset: i64 = offset
            .parse()
            .map_err(|_| invalid(format!("{item:?}: offset is not an integer")))?;
        if topic.is_empty() || partition < 0 || offset < 0 {
            return Err(invalid(format!("{item:?} is out of range")));
        }
        coverage.insert((topic.to_owned(), partition), offset);
    }
    Ok(coverage)
}

/// The UTC ms bounds `[start, end)` of month `period` (`YYYY-MM`) in `tz`.
pub fn month_bounds(period: &str, tz: &TimeZone) -> Result<(i64, i64), SinkError> {
    let invalid = |problem: String| SinkError::Setting {
        field: "--period",
        problem,
    };
    let date: jiff::civil::Date = format!("{period}-01")
        .parse()
        .map_err(|_| invalid(format!("{period:?} is not a month (YYYY-MM)")))?;
    if period.len() != 7 {
        return Err(invalid(format!("{period:?} is not a month (YYYY-MM)")));
    }
    let next = date
        .checked_add(jiff::Span::new().months(1))
        .map_err(|error| invalid(format!("{period:?}: {error}")))?;
    let start = date
        .to_zoned(tz.clone())
        .map_err(|error| invalid(format!("{period:?}: {error}")))?;
    let end = next
        .to_zoned(tz.clone())
        .map_err(|error| invalid(format!("{period:?}: {error}")))?;
    Ok((
        start.timestamp().as_millisecond(),
        end.timestamp().as_millisecond(),
    ))
}

/// Whether a line is regular usage or a correction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// Rows with correction sequence 0 (the window's first emission).
    Usage,
    /// One correction pane of one window.
    Correction,
}

/// One stored row as a statement reads it (P's share only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRow {
    /// Window start, UTC ms.
    pub window_start_ms: i64,
    /// Serving cloud.
    pub cloud: String,
    /// Channel partner, empty for none.
    pub channel_partner: String,
    /// Model.
    pub model: String,
    /// Price-book version.
    pub price_book_version: String,
    /// Share-rule version.
    pub share_rule_version: String,
    /// 0 for the first emission, 1, 2, … for corrections.
    pub correction_seq: i64,
    /// Currency.
    pub currency: String,
    /// The row's gross.
    pub gross_micros: i64,
    /// P's basis points.
    pub basis_points: i64,
    /// P's share of the row.
    pub amount_micros: i64,
    /// Where the sink read the row.
    pub kafka_topic: String,
    /// Partition it was read from.
    pub kafka_partition: i32,
    /// Offset it was read at.
    pub kafka_offset: i64,
}

/// One statement line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementLine {
    /// usage | correction.
    pub line: LineKind,
    /// Serving cloud.
    pub cloud: String,
    /// Channel partner (empty for none).
    pub channel_partner: String,
    /// Model.
    pub model: String,
    /// Price-book version.
    pub price_book_version: String,
    /// Share-rule version.
    pub share_rule_version: String,
    /// Corrections: the window's start, RFC 3339 UTC; empty for usage lines.
    pub window_start: String,
    /// Corrections: the correction sequence; 0 for usage lines.
    pub correction_seq: i64,
    /// Currency.
    pub currency: String,
    /// Rows summed.
    pub rows: i64,
    /// The channel's gross of those rows.
    pub gross_micros: i64,
    /// The partner's basis points.
    pub basis_points: i64,
    /// The partner's amount.
    pub amount_micros: i64,
}

/// Totals of one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementTotal {
    /// Currency.
    pub currency: String,
    /// Rows.
    pub rows: i64,
    /// Sum of the lines' gross.
    pub gross_micros: i64,
    /// Sum of the lines' amounts.
    pub amount_micros: i64,
}

/// A partner statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Statement {
    /// The beneficiary.
    pub partner: String,
    /// `YYYY-MM`.
    pub period: String,
    /// IANA zone of the month.
    pub tz: String,
    /// Month start, RFC 3339 UTC.
    pub from: String,
    /// Month end (exclusive), RFC 3339 UTC.
    pub to: String,
    /// "rows committed up to offsets …".
    pub covers: String,
    /// [`STATEMENT_NOTE`].
    pub note: &'static str,
    /// Usage lines, then correction lines.
    pub lines: Vec<StatementLine>,
    /// One per currency.
    pub totals: Vec<StatementTotal>,
}

type LineKey = (
    LineKind,
    i64,
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
);

fn utc(ms: i64) -> String {
    Timestamp::from_millisecond(ms)
        .map(|instant| instant.to_string())
        .unwrap_or_default()
}

/// Builds the statement from P's share rows (pure: no I/O).
pub fn compute(
    partner: &str,
    period: &str,
    tz_name: &str,
    bounds: (i64, i64),
    coverage: &Coverage,
    rows: &[ShareRow],
) -> Result<Statement, SinkError> {
    let overflow = |field: &'static str| SinkError::OutOfRange { field };
    let mut lines: BTreeMap<LineKey, (i64, i64, i64)> = BTreeMap::new();
    for row in rows {
        if row.window_start_ms < bounds.0 || row.window_start_ms >= bounds.1 {
            continue;
        }
        let covered = coverage
            .get(&(row.kafka_topic.clone(), row.kafka_partition))
            .is_some_and(|next| row.kafka_offset < *next);
        if !covered {
            continue;
        }
        let (kind, window, seq) = if row.correction_seq == 0 {
            (LineKind::Usage, 0, 0)
        } else {
            (
                LineKind::Correction,
                row.window_start_ms,
                row.correction_seq,
            )
        };
        let key = (
            kind,
            window,
            seq,
            row.cloud.clone(),
            row.channel_partner.clone(),
            row.model.clone(),
            row.price_book_version.clone(),
            row.share_rule_version.clone(),
            row.currency.clone(),
            row.basis_points,
        );
        let entry = lines.entry(key).or_insert((0, 0, 0));
        entry.0 = entry.0.checked_add(1).ok_or(overflow("rows"))?;
        entry.1 = entry
            .1
            .checked_add(row.gross_micros)
            .ok_or(overflow("gross_micros"))?;
        entry.2 = entry
            .2
            .checked_add(row.amount_micros)
            .ok_or(overflow("amount_micros"))?;
    }
    let mut totals: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    let mut out = Vec::with_capacity(lines.len());
    for (key, (count, gross, amount)) in lines {
        let (kind, window, seq, cloud, channel_partner, model, price, share, currency, bps) = key;
        let total = totals.entry(currency.clone()).or_insert((0, 0, 0));
        total.0 = total.0.checked_add(count).ok_or(overflow("rows"))?;
        total.1 = total.1.checked_add(gross).ok_or(overflow("gross_micros"))?;
        total.2 = total
            .2
            .checked_add(amount)
            .ok_or(overflow("amount_micros"))?;
        out.push(StatementLine {
            line: kind,
            cloud,
            channel_partner,
            model,
            price_book_version: price,
            share_rule_version: share,
            window_start: if kind == LineKind::Correction {
                utc(window)
            } else {
                String::new()
            },
            correction_seq: seq,
            currency,
            rows: count,
            gross_micros: gross,
            basis_points: bps,
            amount_micros: amount,
        });
    }
    Ok(Statement {
        partner: partner.to_owned(),
        period: period.to_owned(),
        tz: tz_name.to_owned(),
        from: utc(bounds.0),
        to: utc(bounds.1),
        covers: format!(
            "rows committed up to offsets {}",
            if coverage.is_empty() {
                "(none)".to_owned()
            } else {
                coverage_text(coverage)
            }
        ),
        note: STATEMENT_NOTE,
        lines: out,
        totals: totals
            .into_iter()
            .map(|(currency, (rows, gross, amount))| StatementTotal {
                currency,
                rows,
                gross_micros: gross,
                amount_micros: amount,
            })
            .collect(),
    })
}

/// Reads the store's offsets and then P's share rows of `[from_ms, to_ms)`.
fn read(
    db: &mut Db,
    partner: &str,
    bounds: (i64, i64),
) -> Result<(Coverage, Vec<ShareRow>), SinkError> {
    let mut coverage = Coverage::new();
    for row in db.query(
        "SELECT topic, kafka_partition, next_offset FROM tally_sink_offsets ORDER BY topic, kafka_partition",
        &[],
    )? {
        let partition = i32::try_from(row[1].int("kafka_partition")?)
            .map_err(|_| SinkError::OutOfRange { field: "kafka_partition" })?;
        coverage.insert((row[0].text("topic")?, partition), row[2].int("next_offset")?);
    }
    let rows = db.query(
        "SELECT r.window_start_ms, r.cloud, r.channel_partner, r.model, r.price_book_version, \
         r.share_rule_version, r.correction_seq, r.currency, r.gross_micros, s.basis_points, \
         s.amount_micros, r.kafka_topic, r.kafka_partition, r.kafka_offset \
         FROM tally_rows r JOIN tally_row_shares s \
         ON s.window_start_ms = r.window_start_ms AND s.row_id = r.id \
         WHERE s.beneficiary = $1 AND r.window_start_ms >= $2 AND r.window_start_ms < $3 \
         ORDER BY r.id",
        &[
            Value::from(partner),
            Value::Int(bounds.0),
            Value::Int(bounds.1),
        ],
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(ShareRow {
            window_start_ms: row[0].int("window_start_ms")?,
            cloud: row[1].text("cloud")?,
            channel_partner: row[2].text("channel_partner")?,
            model: row[3].text("model")?,
            price_book_version: row[4].text("price_book_version")?,
            share_rule_version: row[5].text("share_rule_version")?,
            correction_seq: row[6].int("correction_seq")?,
            currency: row[7].text("currency")?,
            gross_micros: row[8].int("gross_micros")?,
            basis_points: row[9].int("basis_points")?,
            amount_micros: row[10].int("amount_micros")?,
            kafka_topic: row[11].text("kafka_topic")?,
            kafka_partition: i32::try_from(row[12].int("kafka_partition")?).map_err(|_| {
                SinkError::OutOfRange {
                    field: "kafka_partition",
                }
            })?,
            kafka_offset: row[13].int("kafka_offset")?,
        });
    }
    Ok((coverage, out))
}

/// Validates the flags, reads the store and builds the statement.
pub fn build(args: &StatementArgs) -> Result<Statement, SinkError> {
    if args.partner.trim().is_empty() {
        return Err(SinkError::Setting {
            field: "--partner",
            problem: "must not be empty".to_owned(),
        });
    }
    let tz = TimeZone::get(&args.tz).map_err(|error| SinkError::Setting {
        field: "--tz",
        problem: format!("{:?} is not an IANA time zone: {error}", args.tz),
    })?;
    let bounds = month_bounds(&args.period, &tz)?;
    let as_of = args.as_of.as_deref().map(parse_coverage).transpose()?;
    let location = args.store.location()?;
    let mut db = Db::open(&location, Duration::from_secs(30))?;
    db.begin_read()?;
    let read = read(&mut db, &args.partner, bounds);
    db.rollback();
    let (stored, rows) = read?;
    let coverage = as_of.unwrap_or(stored);
    compute(
        &args.partner,
        &args.period,
        &args.tz,
        bounds,
        &coverage,
        &rows,
    )
}

/// Renders a statement.
pub fn render(statement: &Statement, format: StatementFormat) -> Result<String, SinkError> {
    let mut out = String::new();
    match format {
        StatementFormat::Json => {
            out = serde_json::to_string_pretty(statement)
                .map_err(|error| SinkError::Store(format!("cannot render json: {error}")))?;
            out.push('\n');
        }
        StatementFormat::Csv => {
            let _ = writeln!(out, "# partner statement: {}", statement.partner);
            let _ = writeln!(
                out,
                "# period: {} in {} [{}, {})",
                statement.period, statement.tz, statement.from, statement.to
            );
            let _ = writeln!(out, "# covers: {}", statement.covers);
            let _ = writeln!(out, "# {}", statement.note);
            let _ = writeln!(
                out,
                "line,cloud,channel_partner,model,price_book_version,share_rule_version,window_start,correction_seq,currency,rows,gross_micros,basis_points,amount_micros"
            );
            for line in &statement.lines {
                let cells = [
                    match line.line {
                        LineKind::Usage => "usage".to_owned(),
                        LineKind::Correction => "correction".to_owned(),
                    },
                    line.cloud.clone(),
                    line.channel_partner.clone(),
                    line.model.clone(),
                    line.price_book_version.clone(),
                    line.share_rule_version.clone(),
                    line.window_start.clone(),
                    line.correction_seq.to_string(),
                    line.currency.clone(),
                    line.rows.to_string(),
                    line.gross_micros.to_string(),
                    line.basis_points.to_string(),
                    line.amount_micros.to_string(),
                ];
                let cells: Vec<String> = cells.iter().map(|cell| csv_cell(cell)).collect();
                let _ = writeln!(out, "{}", cells.join(","));
            }
            for total in &statement.totals {
                let _ = writeln!(
                    out,
                    "total,,,,,,,,{},{},{},,{}",
                    csv_cell(&total.currency),
                    total.rows,
                    total.gross_micros,
                    total.amount_micros
                );
            }
        }
    }
    Ok(out)
}

fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '#']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share_row(window: i64, seq: i64, gross: i64, amount: i64, offset: i64) -> ShareRow {
        ShareRow {
            window_start_ms: window,
            cloud: "gcp".to_owned(),
            channel_partner: "northwind".to_owned(),
            model: "m".to_owned(),
            price_book_version: "p1".to_owned(),
            share_rule_version: "s1".to_owned(),
            correction_seq: seq,
            currency: "USD".to_owned(),
            gross_micros: gross,
            basis_points: 1000,
            amount_micros: amount,
            kafka_topic: "agg".to_owned(),
            kafka_partition: 0,
            kafka_offset: offset,
        }
    }

    #[test]
    fn coverage_round_trips_through_its_text() {
        let text = "a.b:0=10,a.b:1=0,c:3=7";
        assert_eq!(coverage_text(&parse_coverage(text).expect("parse")), text);
        let error = parse_coverage("a.b=10").expect_err("no partition");
        assert!(error.to_string().contains("--as-of"), "{error}");
    }

    #[test]
    fn february_2026_in_kolkata_starts_at_1830_utc_the_day_before() {
        let tz = TimeZone::get("Asia/Kolkata").expect("zone");
        let (from, to) = month_bounds("2026-02", &tz).expect("bounds");
        // 2026-01-31T18:30Z and 2026-02-28T18:30Z.
        assert_eq!(from, 1_769_884_200_000);
        assert_eq!(to, 1_772_303_400_000);
        assert!(month_bounds("2026-2", &tz).is_err());
    }

    #[test]
    fn corrections_are_lines_of_their_own_and_totals_add_the_lines() {
        let coverage: Coverage = [(("agg".to_owned(), 0), 4)].into_iter().collect();
        let rows = vec![
            share_row(0, 0, 100, 10, 0),
            share_row(60_000, 0, 201, 20, 1),
            share_row(0, 1, 7, 1, 2),
            share_row(0, 0, 999, 99, 9), // past the coverage: left out
        ];
        let statement = compute(
            "northwind",
            "1970-01",
            "UTC",
            (0, 3_600_000),
            &coverage,
            &rows,
        )
        .expect("statement");
        let got: Vec<(LineKind, i64, i64, i64)> = statement
            .lines
            .iter()
            .map(|line| (line.line, line.rows, line.gross_micros, line.amount_micros))
            .collect();
        assert_eq!(
            got,
            vec![
                (LineKind::Usage, 2, 301, 30),
                (LineKind::Correction, 1, 7, 1)
            ]
        );
        assert_eq!(statement.totals[0].amount_micros, 31);
        assert_eq!(statement.totals[0].gross_micros, 308);
        assert_eq!(statement.covers, "rows committed up to offsets agg:0=4");
    }
}
