//! tally-sink: billing aggregates into the billing store and exports.
//!
//! Reads `billing.aggregates` with `isolation.level=read_committed` and writes rows
//! by their deterministic id into PostgreSQL (or SQLite, the embedded default): an
//! identical row written twice is a no-op, the same id with different content is a
//! conflict that stops the writer. Exports (partner statements, marketplace hourly
//! records, CSV/JSONL) and reconciliation build on the stored rows.
//!
//! The store, exports and reconciliation land with their own issue; the crate exists
//! now so the workspace has its final shape.
