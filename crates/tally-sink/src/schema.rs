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
//!   SHA-256 of the record's bytes (`digest`) and where it was read (`kafka_*`). Keyed
//!   by `(window_start_ms, id)` since migration 3 (see "Why the key starts with the
//!   window" below).
//! - `tally_row_shares`: the row's shares, one line per beneficiary, keyed by
//!   `(window_start_ms, row_id, beneficiary)`.
//! - `tally_foreign_row_ids`: the id and window of every stored row whose id is not
//!   tally's identity of its content (see below); empty for a store fed only by tally.
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

//!
//! ## Why the key starts with the window
//!
//! A row id is a hash, so a key of the id alone puts every insert at a random place
//! in an index that grows with the store: at 10 M rows each batch touched about one
//! index page per row, and writes ran at 22–24 k rows/s in both databases. Rows
//! arrive in window order (give or take the correction horizon), so a key that starts
//! with `window_start_ms` puts a batch's inserts next to each other at the index's
//! end, and the index also serves the window range queries (the separate window
//! index is gone).
//!
//! Ids stay unique across the whole store, not per window, without an index on the
//! id alone:
//! - tally's id is a hash of fields that include the window
//!   ([`tally_core::identity`]); a row whose id is that hash of its own content is
//!   *derived*. Two derived rows with the same id have the same window (short of a
//!   128-bit collision), so the key `(window_start_ms, id)` finds them;
//! - any other row is *foreign* (written by another producer, or by hand). Its id
//!   and window are also recorded in `tally_foreign_row_ids`. A derived row is
//!   checked against that table (empty unless foreign rows were written); a foreign
//!   row is checked against every stored row with its id, which reads the whole
//!   table: correct at any size, slow only for foreign rows in a large store;
//! - in PostgreSQL a batch takes `tally_foreign_row_ids` in `SHARE` mode, a batch
//!   with foreign rows in `SHARE ROW EXCLUSIVE` mode, so a foreign row and a row with
//!   the same id in another window are never written by two concurrent transactions
//!   that cannot see each other. SQLite has one writer at a time.

/// One migration's SQL: the same text for both databases, or one text each (when
/// SQLite has no `ALTER` for the change, it rebuilds the table).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Migration {
    /// One text, rendered per dialect.
    Shared(&'static str),
    /// A text per dialect.
    PerDialect {
        /// PostgreSQL's text.
        postgres: &'static str,
        /// SQLite's text.
        sqlite: &'static str,
    },
}

impl Migration {
    /// The migration's SQL for `dialect`, types filled in.
    pub(crate) fn sql(self, dialect: Dialect) -> String {
        match (self, dialect) {
            (Migration::Shared(sql), _)
            | (Migration::PerDialect { postgres: sql, .. }, Dialect::Postgres)
            | (Migration::PerDialect { sqlite: sql, .. }, Dialect::Sqlite) => render(sql, dialect),
        }
    }
}

/// Migrations in order; the index + 1 is the version recorded in `tally_migrations`.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration::Shared(V1),
    Migration::Shared(V2_EXPORTS),
    Migration::PerDialect {
        postgres: V3_WINDOW_KEYS_POSTGRES,
        sqlite: V3_WINDOW_KEYS_SQLITE,
    },
];

/// The version of [`V3_WINDOW_KEYS_POSTGRES`] / [`V3_WINDOW_KEYS_SQLITE`]: after it
/// runs, the store records the foreign ids of the rows it already holds
/// (`crate::store::foreign_rows_of`).
pub(crate) const WINDOW_KEYS_VERSION: i64 = 3;

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

/// Rows and shares keyed by window first; foreign ids in their own table.
const V3_WINDOW_KEYS_POSTGRES: &str = r"
ALTER TABLE tally_row_shares DROP CONSTRAINT tally_row_shares_row_id_fkey;
ALTER TABLE tally_row_shares ADD COLUMN window_start_ms BIGINT;
UPDATE tally_row_shares s SET window_start_ms = r.window_start_ms FROM tally_rows r WHERE r.id = s.row_id;
ALTER TABLE tally_row_shares ALTER COLUMN window_start_ms SET NOT NULL;
ALTER TABLE tally_row_shares DROP CONSTRAINT tally_row_shares_pkey;
ALTER TABLE tally_row_shares ADD PRIMARY KEY (window_start_ms, row_id, beneficiary);
ALTER TABLE tally_rows DROP CONSTRAINT tally_rows_pkey;
ALTER TABLE tally_rows ADD PRIMARY KEY (window_start_ms, id);
DROP INDEX tally_rows_window;
CREATE TABLE tally_foreign_row_ids (
    id TEXT PRIMARY KEY,
    window_start_ms BIGINT NOT NULL
);
";

/// SQLite cannot change a primary key in place: the two tables are rebuilt, same
/// columns in the same order (shares gain `window_start_ms` at the end, as in
/// PostgreSQL).
const V3_WINDOW_KEYS_SQLITE: &str = r"
CREATE TABLE tally_rows_v3 (
    id TEXT NOT NULL,
    digest TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    tenant_id TEXT NOT NULL,
    model TEXT NOT NULL,
    cloud TEXT NOT NULL,
    channel_partner TEXT,
    region TEXT NOT NULL,
    row_kind TEXT NOT NULL,
    correction_seq INTEGER NOT NULL,
    event_count INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    currency TEXT NOT NULL,
    gross_micros INTEGER NOT NULL,
    net_micros INTEGER NOT NULL,
    price_book_version TEXT NOT NULL,
    share_rule_version TEXT NOT NULL,
    source_topic TEXT NOT NULL,
    source_partition INTEGER NOT NULL,
    first_offset INTEGER NOT NULL,
    last_offset INTEGER NOT NULL,
    first_event_time_ms INTEGER NOT NULL,
    last_event_time_ms INTEGER NOT NULL,
    kafka_topic TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset INTEGER NOT NULL,
    PRIMARY KEY (window_start_ms, id)
) STRICT;
INSERT INTO tally_rows_v3 SELECT * FROM tally_rows ORDER BY window_start_ms, id;
CREATE TABLE tally_row_shares_v3 (
    row_id TEXT NOT NULL,
    beneficiary TEXT NOT NULL,
    basis_points INTEGER NOT NULL,
    amount_micros INTEGER NOT NULL,
    window_start_ms INTEGER NOT NULL,
    PRIMARY KEY (window_start_ms, row_id, beneficiary)
) STRICT;
INSERT INTO tally_row_shares_v3 (row_id, beneficiary, basis_points, amount_micros, window_start_ms)
    SELECT s.row_id, s.beneficiary, s.basis_points, s.amount_micros, r.window_start_ms
    FROM tally_row_shares s JOIN tally_rows r ON r.id = s.row_id;
DROP TABLE tally_row_shares;
DROP TABLE tally_rows;
ALTER TABLE tally_rows_v3 RENAME TO tally_rows;
ALTER TABLE tally_row_shares_v3 RENAME TO tally_row_shares;
CREATE TABLE tally_foreign_row_ids (
    id TEXT PRIMARY KEY,
    window_start_ms INTEGER NOT NULL
) STRICT;
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
            let texts = MIGRATIONS
                .iter()
                .map(|migration| migration.sql(dialect))
                .chain([render(MIGRATIONS_TABLE, dialect)]);
            for text in texts {
                assert!(!text.contains('{'), "{text}");
                for float in ["REAL", "DOUBLE", "FLOAT", "NUMERIC"] {
                    assert!(!text.contains(float), "{float} in {text}");
                }
            }
        }
        assert_eq!(ROW_COLUMNS.split(", ").count(), 30);
    }
}
