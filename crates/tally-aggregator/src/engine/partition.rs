//! One owned input partition: its live state, the checkpoint and counters as of the
//! last commit, and the tick and idle bookkeeping.
//!
//! No copy of the state is kept at commits: the state is tens to hundreds of MiB at a
//! long horizon, and copying it at every commit cost the loop more than rebuilding it
//! on the rare abort. An abort rewinds a partition that processed nothing since its
//! commit in place ([`OwnedPartition::rewind`]); one that did is rebuilt from its
//! committed checkpoint, as on an assignment (see `transaction.rs`).

use std::time::Instant;

use tally_core::partition::{PartitionCounters, PartitionState};

use crate::decide::{self, SettleFacts, TickFacts};

/// One owned input partition.
pub(super) struct OwnedPartition {
    /// State after the last record processed.
    pub(super) live: PartitionState,
    /// The state's counters as of the last commit (the metrics publish the difference).
    pub(super) committed_counters: PartitionCounters,
    /// Offset after the last record processed.
    pub(super) next_offset: i64,
    /// Offset committed last (the consumer is seeked here on abort).
    pub(super) committed_offset: i64,
    /// The checkpoint committed with `committed_offset` (re-sent unchanged while the
    /// partition processes nothing).
    pub(super) committed_metadata: String,
    /// The checkpoint of the open transaction, when the partition changed in it.
    pub(super) pending_metadata: Option<String>,
    /// Records processed since the last commit.
    pub(super) dirty: bool,
    /// The partition's end was reached (reported by the consumer, or found by comparing
    /// the position with the high watermark) and no record came since.
    pub(super) at_end: bool,
    /// When the high watermark was last compared with the position.
    pub(super) end_checked_at: Option<Instant>,
    /// When the last usage record was read (for `--exit-after-idle`).
    pub(super) last_usage_at: Instant,
    /// Wall-clock ms when the last event that moved the watermark, or the last tick,
    /// was read: the base of the idle time. Committed in the checkpoint, so a restart
    /// does not restart the idle time.
    pub(super) idle_base_ms: i64,
    /// `idle_base_ms` as of the last commit.
    pub(super) committed_idle_base_ms: i64,
    /// A tick was written and has not been read back yet.
    pub(super) tick_in_flight: bool,
    /// `tick_in_flight` as of the last commit.
    pub(super) committed_tick_in_flight: bool,
    /// A tick was read after the last usage record.
    pub(super) tick_read_since_usage: bool,
    /// The rebalance epoch in which the partition was assigned or last rewound:
    /// records polled in an earlier epoch are not applied.
    pub(super) since_epoch: u64,
}

impl OwnedPartition {
    pub(super) fn new(
        state: PartitionState,
        next_offset: i64,
        committed_metadata: String,
        idle_base_ms: i64,
        epoch: u64,
    ) -> OwnedPartition {
        let now = Instant::now();
        OwnedPartition {
            committed_counters: state.counters(),
            live: state,
            next_offset,
            committed_offset: next_offset,
            committed_metadata,
            pending_metadata: None,
            dirty: false,
            at_end: false,
            end_checked_at: None,
            last_usage_at: now,
            idle_base_ms,
            committed_idle_base_ms: idle_base_ms,
            tick_in_flight: false,
            committed_tick_in_flight: false,
            tick_read_since_usage: false,
            since_epoch: epoch,
        }
    }

    /// Back to the last commit, for a partition whose live state is its committed state
    /// (nothing processed since, or the state replaced by the committed one).
    pub(super) fn rewind(&mut self, epoch: u64) {
        debug_assert_eq!(self.live.counters(), self.committed_counters);
        self.since_epoch = epoch;
        self.next_offset = self.committed_offset;
        self.pending_metadata = None;
        self.dirty = false;
        self.at_end = false;
        self.tick_in_flight = self.committed_tick_in_flight;
        self.idle_base_ms = self.committed_idle_base_ms;
        let now = Instant::now();
        self.last_usage_at = now;
    }

    /// What a tick decision needs to know about this partition at `now_ms`.
    pub(super) fn tick_facts(&self, now_ms: i64, idle_timeout_ms: i64) -> TickFacts {
        TickFacts {
            at_end: self.at_end,
            tick_in_flight: self.tick_in_flight,
            idle_base_ms: self.idle_base_ms,
            now_ms,
            idle_timeout_ms,
            tick_base_ms: self.live.tick_base_ms(),
        }
    }

    /// What the settled check needs to know about this partition at `now_ms`.
    pub(super) fn settle_facts(&self, now_ms: i64) -> SettleFacts {
        SettleFacts {
            at_end: self.at_end,
            dirty: self.dirty,
            tick_in_flight: self.tick_in_flight,
            since_last_usage: self.last_usage_at.elapsed(),
            tick_read_since_usage: self.tick_read_since_usage,
            tick_is_noop: decide::tick_is_noop(
                self.live.tick_base_ms(),
                self.idle_base_ms,
                now_ms,
                |tick| self.live.tick_would_close(tick),
            ),
        }
    }
}
