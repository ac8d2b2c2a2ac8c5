//! tally-replay: re-derive billing aggregates from the input, and compare two sets of
//! aggregates.
//!
//! # `tally replay`
//!
//! Re-aggregates a range of `usage.events` with the live aggregator's own per-record
//! code ([`tally_aggregator::record::apply_record`] on a
//! [`tally_core::partition::PartitionState`], with the aggregator's partition parameters
//! and validation limits), into an isolated output, and emits the rows whose windows
//! lie in `[--from, --to)` (event time, window-aligned) — or, with `--offsets` (or
//! `--from-timestamp`/`--to-timestamp`, broker timestamps turned into offsets), the rows
//! made only of input records inside each partition's offsets. An offsets range warms up
//! from the latest checkpoint committed at or before its start (a row closed before it
//! holds only earlier records) and reads until the watermark passes the window of the
//! range's largest counted event time + lateness + correction horizon + one window.
//!
//! **Isolation.** Output goes to `--output-topic` (refused when it is any topic of the
//! configuration; created with `topics.output_partitions` when missing; written by a
//! transactional producer `tally-replay-<--replay-id or the topic>` committing every
//! `--commit-interval-ms`) and/or to `--database` (an SQLite file or PostgreSQL URL,
//! refused when the store holds a sink's offsets of `topics.billing_aggregates`, i.e.
//! when it is a production store). The input is read by a group-less read_committed
//! consumer (assign only, never commits); the replay writes no ticks, no side records
//! and no checkpoints, and never touches the aggregator's group.
//!
//! **Warm-up.** Rows of a window are exact only if the state the window started in is
//! the live one. Per partition the replay reads every committed checkpoint of the
//! checkpoints topic (`topics.checkpoints`: the aggregator writes `{"topic",
//! "partition", "offset", "checkpoint"}` in the same transaction as the offsets, so each
//! record carries its committed offset `C`) and takes the latest one whose watermark
//! at `C` had closed no on-time pane of a window in the range (`watermark < from +
//! window + allowed_lateness`; correction panes only exist after that). It re-reads
//! `[L, C)` from the checkpoint's low water into a state resumed at the checkpoint's
//! clock and checks the rebuilt state against the checkpoint's digest — exactly the
//! aggregator's restore — so from `C` on the replay's state is the live one, and every
//! row of a window in the range is decided from it. Without such a checkpoint it reads
//! from offset 0. When the input it needs was deleted (retention, `DeleteRecords`) it
//! refuses and names the partition and offsets. A checkpoint built under other semantics
//! (`tally_core::semantics::check_restart` against the configuration's settings and
//! contracts) is refused too.
//!
//! **End.** Each partition is read until its watermark reaches `to + allowed_lateness +
//! correction_horizon + window` (every event for a window in the range is then too
//! late, and a window boundary was crossed after the last possible correction, so its
//! pane closed), or up to the end offset fixed when the replay started. Windows still
//! open at the end offset are not emitted (the live aggregator had not closed them
//! either, unless a tick written later does).
//!
//! **What-if contracts.** `--contracts FILE` prices and attributes the rows with another
//! contract set: changed prices, shares, currencies and version labels are fine. A set
//! that would change classification is refused ([`decide::classification_changes`]):
//! a model priced on one side only, a price book or share rules in force on one side
//! only, other billable statuses (they change the kind of row an event counts in, which
//! is part of the live state the warm-up checks).
//!
//! **Determinism.** For the same input and contracts the rows equal the live
//! aggregator's as a set of (key, value, timestamp): a row's content and id are a
//! function of the partition's records and the contracts only (see
//! `tally_core::partition`), and the replay applies the same records in the same order.
//! Only the order and the output partition of rows may differ.
//!
//! # `tally reconcile`
//!
//! See [`reconcile`]: compares two sets of rows for a period — topics, stores or replay
//! outputs — by their natural key, and reports matching, mismatching, missing and extra
//! rows with token and amount differences, and totals by cloud, partner and tenant.

pub mod decide;
pub mod error;
pub mod reconcile;
pub mod replay;

pub use error::ReplayError;
pub use reconcile::{ReconcileArgs, ReconcileReport};
pub use replay::{ReplayArgs, ReplaySummary};
