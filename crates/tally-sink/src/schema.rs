//! The billing store's schema: one text for PostgreSQL and SQLite, embedded in the
//! binary and applied at start.
//!
//! `{INT}` is the 64-bit integer type (`BIGINT` in PostgreSQL, `INTEGER` in SQLite)
//! and `{STRICT}` makes SQLite tables `STRICT`: SQLite turns an overflowing integer
//! sum into a REAL, which a STRICT INTEGER column refuses, so roll-up sums are checked
//! in both databases (PostgreSQL's BIGINT arithmetic raises on overflow). Money is
//! integer micro-units everywhere; there is no floating-point column.
//!
//! Tables:
//! - `tally_rows`: one row per BillingAggregate id, every field of the record, the
//!   SHA-256 of the record's bytes (`digest`) and where it was read (`kafka_*`).
//! - `tally_row_shares`: the row's shares, one line per beneficiary.
//! - `tally_sink_offsets`: per (topic, partition) the next offset to read; written in
//!   the same transaction as the rows.
//! - `tally_rollup_15m`: per 15-minute UTC bucket and (tenant, model, cloud, channel
//!   partner (empty for none), region, row kind, currency): rows, events, the four token
//!   sums, gross and net micro-units.
//! - `tally_rollup_share_15m`: the same key plus the beneficiary: share micro-units.
//! - `tally_export_*` (migration 2, see `crate::export`): per marketplace the hours
//!   exported or overdue, the measure accounted per (customer, dimension, usage hour),
//!   the carry per (customer, dimension), usage carried into a later hour, and the
//!   ledger per (customer, dimension, hour): quantity and `written` → `delivered` |
//!   `rejected`.

/// Migrations in order; the index + 1 is the version recorded in `tally_migrations`.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2_EXPORTS];

const V1: &str = r"
CREATE TABLE tally_rows (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    window_start_ms {INT} NOT NULL,
    window_end_ms {INT} NOT NULL,
    tenant_id TEXT NOT NULL,
    model TEXT NOT NULL,
    cloud TEXT NOT NULL,
    channel_partner TEXT,
    region TEXT NOT NULL,
    row_kind TEXT NOT NULL,
    correction_seq {INT} NOT NULL,
    event_count {INT} NOT NULL,
    input_tokens {INT} NOT NULL,
    cached_input_tokens {INT} NOT NULL,
    output_tokens {INT} NOT NULL,
    reasoning_tokens {INT} NOT NULL,
    currency TEXT NOT NULL,
    gross_micros {INT} NOT NULL,
    net_micros {INT} NOT NULL,
    price_book_version TEXT NOT NULL,
    share_rule_version TEXT NOT NULL,
    source_topic TEXT NOT NULL,
    source_partition {INT} NOT NULL,
    first_offset {INT} NOT NULL,
    last_offset {INT} NOT NULL,
    first_event_time_ms {INT} NOT NULL,
    last_event_time_ms {INT} NOT NULL,
    kafka_topic TEXT NOT NULL,
    kafka_partition {INT} NOT NULL,
    kafka_offset {INT} NOT NULL
){STRICT};
CREATE INDEX tally_rows_window ON tally_rows (window_start_ms);
CREATE TABLE tally_row_shares (
    row_id TEXT NOT NULL REFERENCES tally_rows (id),
    beneficiary TEXT NOT NULL,
    basis_points {INT} NOT NULL,
    amount_micros {INT} NOT NULL,
    PRIMARY KEY (row_id, beneficiary)
){STRICT};
CREATE TABLE tally_sink_offsets (
    topic TEXT NOT NULL,
    kafka_partition {INT} NOT NULL,
    next_offset {INT} NOT NULL,
    updated_at_ms {INT} NOT NULL,
    PRIMARY KEY (topic, kafka_partition)
){STRICT};
CREATE TABLE tally_rollup_15m (
    bucket_start_ms {INT} NOT NULL,
    tenant_id TEXT NOT NULL,
    model TEXT NOT NULL,
    cloud TEXT NOT NULL,
    channel_partner TEXT NOT NULL,
    region TEXT NOT NULL,
    row_kind TEXT NOT NULL,
    currency TEXT NOT NULL,
    row_count {INT} NOT NULL,
    event_count {INT} NOT NULL,
    input_tokens {INT} NOT NULL,
    cached_input_tokens {INT} NOT NULL,
    output_tokens {INT} NOT NULL,
    reasoning_tokens {INT} NOT NULL,
    gross_micros {INT} NOT NULL,
    net_micros {INT} NOT NULL,
    PRIMARY KEY (bucket_start_ms, tenant_id, model, cloud, channel_partner, region, row_kind, currency)
){STRICT};
CREATE TABLE tally_rollup_share_15m (
    bucket_start_ms {INT} NOT NULL,
    tenant_id TEXT NOT NULL,
    model TEXT NOT NULL,
    cloud TEXT NOT NULL,
    channel_partner TEXT NOT NULL,
    region TEXT NOT NULL,
    row_kind TEXT NOT NULL,
    currency TEXT NOT NULL,
    beneficiary TEXT NOT NULL,
    amount_micros {INT} NOT NULL,
    PRIMARY KEY (bucket_start_ms, tenant_id, model, cloud, channel_partner, region, row_kind, currency, beneficiary)
){STRICT};
";

/// Marketplace exports: written in one transaction per `tally export` run.
const V2_EXPORTS: &str = r"
CREATE TABLE tally_export_hours (
    marketplace TEXT NOT NULL,
    hour_start_ms {INT} NOT NULL,
    status TEXT NOT NULL,
    carried_into_ms {INT} NOT NULL,
    PRIMARY KEY (marketplace, hour_start_ms)
){STRICT};
CREATE TABLE tally_export_accounted (
    marketplace TEXT NOT NULL,
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    usage_hour_ms {INT} NOT NULL,
    amount {INT} NOT NULL,
    PRIMARY KEY (marketplace, customer, dimension, usage_hour_ms)
){STRICT};
CREATE TABLE tally_export_carry (
    marketplace TEXT NOT NULL,
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    unit_size {INT} NOT NULL,
    amount_total {INT} NOT NULL,
    exported_units {INT} NOT NULL,
    PRIMARY KEY (marketplace, customer, dimension)
){STRICT};
CREATE TABLE tally_export_late (
    marketplace TEXT NOT NULL,
    hour_start_ms {INT} NOT NULL,
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    usage_hour_ms {INT} NOT NULL,
    amount {INT} NOT NULL,
    PRIMARY KEY (marketplace, hour_start_ms, customer, dimension, usage_hour_ms)
){STRICT};
CREATE TABLE tally_export_ledger (
    marketplace TEXT NOT NULL,
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour_start_ms {INT} NOT NULL,
    plan TEXT NOT NULL,
    quantity {INT} NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    updated_at_ms {INT} NOT NULL,
    PRIMARY KEY (marketplace, customer, dimension, hour_start_ms)
){STRICT};
";

/// The migration table itself (created before any migration runs).
pub(crate) const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS tally_migrations (
    version {INT} PRIMARY KEY,
    applied_at_ms {INT} NOT NULL
){STRICT}";

/// SQL dialect of the schema text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

/// `sql` with the dialect's types filled in.
pub(crate) fn render(sql: &str, dialect: Dialect) -> String {
    let (int, strict) = match dialect {
        Dialect::Postgres => ("BIGINT", ""),
        Dialect::Sqlite => ("INTEGER", " STRICT"),
    };
    sql.replace("{INT}", int).replace("{STRICT}", strict)
}

/// Columns of `tally_rows`, in order.
pub(crate) const ROW_COLUMNS: &str = "id, digest, window_start_ms, window_end_ms, tenant_id, model, cloud, channel_partner, region, row_kind, correction_seq, event_count, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, currency, gross_micros, net_micros, price_book_version, share_rule_version, source_topic, source_partition, first_offset, last_offset, first_event_time_ms, last_event_time_ms, kafka_topic, kafka_partition, kafka_offset";

/// Key columns of the roll-ups, in key order.
pub(crate) const ROLLUP_KEY: &str =
    "bucket_start_ms, tenant_id, model, cloud, channel_partner, region, row_kind, currency";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_schema_has_no_placeholders_and_no_float_columns() {
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            for sql in MIGRATIONS.iter().chain([&MIGRATIONS_TABLE]) {
                let text = render(sql, dialect);
                assert!(!text.contains('{'), "{text}");
                for float in ["REAL", "DOUBLE", "FLOAT", "NUMERIC"] {
                    assert!(!text.contains(float), "{float} in {text}");
                }
            }
        }
        assert_eq!(ROW_COLUMNS.split(", ").count(), 30);
    }
}
