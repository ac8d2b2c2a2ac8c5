//! tally-aggregator: consume usage.events, dedupe, window, price, and emit billing
//! aggregates in Kafka transactions.
//!
//! [`run`] is the whole process: one consumer in the group `aggregator.group_id`, one
//! transactional producer, and the [`PartitionState`](tally_core::partition::PartitionState)
//! of every owned partition. One blocking thread (librdkafka calls block; the binary
//! calls [`run`] from `spawn_blocking` or its own thread) polls the consumer, runs the
//! rebalance callbacks and every transaction call; the records themselves are
//! processed by per-partition tasks on a pool of `aggregator.worker_threads` threads.
//! Each input record goes through [`record::apply_record`]: decode → validate against
//! its Kafka timestamp → routing check → the state machine. Rejected records go to
//! usage.dlq and too-late events to usage.late, with their original bytes and key and
//! `tally.reason` / `tally.source.{topic,partition,offset}` headers.
//!
//! # Threads and partition tasks
//!
//! The loop polls a batch of records (up to 32 768, or what arrived within 10 ms), then
//! hands each partition's records of the batch, in offset order, to one task on the
//! worker pool together with `&mut` access to that partition's state; different
//! partitions run in parallel, and the loop waits for all of them before it polls or
//! commits again. A partition's state is therefore owned by exactly one task at a time
//! and never locked; nothing is shared between tasks except read-only settings and the
//! (thread-safe) producer they write side records through. Commits, aborts and
//! rebalances happen between batches on the loop's thread, so the checkpoint protocol
//! below is the same as with one thread. Restores run on threads of their own (one per
//! restoring partition, not the pool), while the loop keeps polling. A rebalance
//! callback can run inside a poll in the middle of collecting a batch; records polled
//! before it, for a partition it rewound or reassigned, are dropped from the batch (the
//! consumer was seeked back to where the state now is and delivers them again), while
//! records of untouched partitions are processed normally.
//!
//! # Checkpoints and exactly-once semantics
//!
//! **One transaction per commit interval.** The producer's `transactional.id` is
//! `tally-aggregator-<instance-id>` (KIP-447: one transactional producer per process,
//! fenced by a restarted process with the same id). Within a transaction the aggregator
//! writes the DLQ/late copies as it reads; at the commit it drains every closed row of
//! every owned partition to billing.aggregates (key = row id, timestamp = window end,
//! partition = murmur2(row id)), then `send_offsets_to_transaction` with, for every
//! owned partition, the next input offset and a [`checkpoint::Checkpoint`] in the
//! offset-commit metadata (low-water offset and the clock before it, cumulative
//! counters, a digest of the live state, the idle base, the semantics fingerprint) —
//! the same checkpoint also goes to the checkpoints topic — then
//! `commit_transaction`. Rows, side records, counters and offsets therefore become
//! visible to read_committed readers together or not at all. The group metadata is
//! fetched fresh for every commit, so a commit after a generation change is refused by
//! the broker instead of overwriting the new owner's offsets.
//!
//! **State is not written anywhere: the input is the changelog.** A partition's state
//! (open panes, the dedupe set, correction sequences, the watermark) at the committed
//! offset `C` is a function of the partition's clock at a low-water offset `L` and the
//! records of `[L, C)`, where `L` is the first counted offset of the oldest window that
//! still has live state (see "Bounded restore" in `tally_core::partition`). On
//! assignment the rebalance callback only records the partition and pauses it; outside
//! the callback the aggregator reads `C` and the checkpoint with `committed_offsets` on
//! a helper thread — for a read_committed consumer librdkafka asks for *stable*
//! offsets, so a previous owner's pending transaction resolves first — checks that the
//! checkpoint was built
//! under the same semantics (settings and contract versions; a new contract version
//! that starts after the partition's largest counted event time is not a change), and
//! re-reads `[L, C)` on a thread of its own with a separate read_committed consumer,
//! applying every record exactly as the live loop did and discarding the rows and side
//! records (they were committed with `C`). The rebuilt state must have the committed
//! digest; otherwise it cannot be trusted and the aggregator stops with an error rather
//! than bill from a wrong state. Only then is the group consumer seeked to `C` and the
//! partition resumed. Meanwhile the loop keeps polling (a paused partition delivers
//! nothing), so a restore longer than `max.poll.interval.ms` does not evict the member,
//! and the partition is left out of every commit's offsets: `TxnOffsetCommit` writes
//! only the partitions it lists, so its committed offset and checkpoint stay what the
//! previous owner committed, as if re-sent unchanged. A partition revoked during its
//! restore has the re-read cancelled (a flag checked before every record) and is
//! forgotten; its new owner restores it from the same checkpoint. Input deleted below
//! `L` (retention, `DeleteRecords`) is never needed;
//! input deleted at or above it makes the restore refuse by name. See [`restore`].
//!
//! **Aborts.** After any abort — an abortable transaction error, a failed commit, lost
//! partitions, the `--abort-every` test hook — the producer is flushed and the
//! transaction aborted, and every owned partition returns to its last commit: one that
//! processed nothing since keeps its state and is seeked to its committed offset; one
//! that did is paused and rebuilt from its committed checkpoint exactly as an assigned
//! partition is (re-read `[L, C)` on a helper thread, digest checked, then seeked to
//! `C` and resumed; counted in `tally_aggregator_partition_restores_total`), or, never
//! committed yet, starts again fresh at its start offset. No copy of the state is
//! taken at commits: at a long horizon the state is tens to hundreds of MiB, and
//! copying it at every commit cost more than rebuilding it on the rare abort. Since
//! state is a function of the records up to an offset, the next transaction redoes the
//! same work. If five transactions in a row abort (no commit in between, i.e. at the same
//! input offsets) the aggregator stops with an ERROR log and
//! `tally_aggregator_abort_loops_total` instead of looping. Aborts caused by the group
//! moving on (unknown member, illegal generation, rebalance in progress, coordinator
//! changes) do not count: they say nothing about the input, and under churn they would
//! stop healthy processes.
//!
//! **Failures covered.**
//! - *Crash or SIGKILL mid-transaction*: the open transaction is aborted by the broker
//!   (timeout) or fenced by the successor's `init_transactions`; the successor restores
//!   from `C`. Nothing after `C` was visible, nothing before it is redone.
//! - *Zombie* (a stalled process whose partitions moved): its commit fails because its
//!   group generation is stale, or its producer is fenced.
//! - *Fatal client errors* (producer fenced by a process with the same transactional
//!   id, fatal idempotence errors): the process drops its producer, its consumer and
//!   every partition's state, and after a back-off starts from scratch in the same
//!   process — new producer, new group member, state restored from the committed
//!   offsets as on any assignment. Three fatal errors with no commit in between stop
//!   the process with the error (`tally_aggregator_fatal_restarts_total` counts the
//!   restarts).
//! - *Rebalance*: before revoked partitions are released, the open transaction commits
//!   (with offsets for all owned partitions); partitions reported lost abort it instead.
//!   Revoked partitions still restoring had nothing processed: they are only forgotten.
//! - *Long restore*: the member keeps polling while it restores, so it is not evicted
//!   past `max.poll.interval.ms` and the group does not rebalance in a loop.
//! - *Restart with another instance id*: the new owner reads the same committed offsets;
//!   the old transactional id's open transaction times out before `committed_offsets`
//!   returns stable offsets.
//!
//! **Ticks.** A partition at its end gets a tick appended (inside the current
//! transaction) once `idle_timeout_ms` of wall time has passed since the later of the
//! last event that moved its watermark and the last tick read back — duplicates,
//! rejected and too-late records do not count — and only if the tick would close a
//! window or an open correction pane. Its time is the later of the largest counted
//! event time and the last tick time, plus the idle time that passed (never the wall
//! clock's absolute value). The idle base is committed in the checkpoint, so a restart
//! does not start the idle time over. The tick acts only when read back, so live runs,
//! restores and replays see the same ticks at the same offsets. Bounds (measured by
//! `tests/aggregator_liveness.rs`): an on-time event is in a committed row within
//! `window + allowed_lateness + idle_timeout + 2 × commit_interval` of its partition's
//! last counted event, a correction within `idle_timeout + 2 × commit_interval` of its
//! arrival after an idle period.
//!
//! **Shutdown.** SIGTERM commits the open transaction and leaves the group. Once it is
//! requested, running restores are cancelled, assignments that still arrive are not
//! taken (no restore starts; they are assigned paused, because librdkafka waits for
//! the assign call before a member can leave), the final transaction's calls end
//! within 3 s, and leaving the group gets at most 1 s more. Leaving can take much
//! longer than that: a member stopped in the middle of a rebalance has a `JoinGroup`
//! request that the coordinator holds until every member rejoined, and its
//! `LeaveGroup` waits behind it. Past the limit the process exits without it and the
//! group drops the member after `session.timeout.ms`. So a process exits within about
//! 4 s even when every member of the group stops at once in a rebalance that cannot
//! finish (about 1 s when its final commit is quick).
//!
//! **Start position.** A partition without a committed offset starts where
//! `--start-from` says; without it the aggregator refuses to start and names the
//! partition. The start offset is committed at the first commit, so later restarts
//! never need the flag. Committed offsets always win.
//!
//! **Costs and limits.** A restore re-reads `[L, C)`: about `(max(dedupe_horizon,
//! allowed_lateness + correction_horizon + window) + max_out_of_orderness)` of event
//! time's worth of input, plus up to `max_event_time_ahead_ms` when events stamped
//! ahead opened windows early, and further back only while a conflicting duplicate of
//! an older event pins it; never the partition's history (the kill soak measures it).
//! A restore runs outside the rebalance callback, so however long it takes it costs no
//! rebalance; the partition's input waits meanwhile. Snapshots at commit are deep
//! clones of the partitions that changed: O(state) per commit interval. Parallelism
//! within a process is bounded by the partitions present in a batch: librdkafka
//! delivers each partition's fetched data as one run, so a batch spans several
//! partitions only when fetch responses are smaller than a batch; beyond one process,
//! scale out with more processes in the group.
//!
//! # Layout
//!
//! One concern per file:
//! - [`kafka`]: the one client-config builder every Kafka client of tally starts from
//!   (the binary's commands too), the aggregator's producer, group-consumer and
//!   restore-consumer configs, and the client contexts;
//! - `engine/`: the Kafka loop — `mod.rs` (the engine, batches, ticks, gauges),
//!   `partition.rs` (an owned partition's live and committed state), `transaction.rs`
//!   (commit, abort, recover), `rebalance.rs` (the rebalance callback: record and
//!   pause assigned partitions, commit and forget revoked ones), `assign.rs` (pending
//!   partitions: committed-offset fetch and restore off the loop, then seek, resume and
//!   own), `run.rs`
//!   ([`run`], its incarnations and the poll loop);
//! - `decide.rs`: the loop's decisions (tick or not, abort or stop, restart, settled,
//!   where an assigned partition starts) as pure functions over observed facts, unit-
//!   and property-tested without a broker;
//! - `restore.rs`: re-reading `[L, C)` to rebuild a partition's state;
//! - [`record`], [`checkpoint`], [`metrics`], [`settings`], [`error`]: one record's
//!   path through the state machine, the checkpoint format, telemetry, configuration
//!   and errors.

pub mod checkpoint;
mod decide;
mod engine;
pub mod error;
pub mod kafka;
pub mod metrics;
pub mod record;
mod restore;
pub mod settings;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use engine::{ExitReason, RunSummary, run};
pub use error::AggregatorError;
pub use settings::{AggregateArgs, AggregatorSettings, StartFrom};
