//! The loop's decisions as pure functions over observed facts.
//!
//! The Kafka loop ([`crate::engine`]) observes facts — a partition is at its end, a
//! transaction call failed with a fatal error, an incarnation committed something — and
//! asks this module what to do. Each answer is a plain value (an enum with one variant
//! per action) that the loop acts on; nothing here does I/O, reads a clock or touches
//! Kafka, so every decision is unit- and property-tested without a broker:
//! - [`tick_decision`]: append a tick to an idle partition, and with which time;
//! - [`transaction_error_action`] and [`abort_verdict`]: retry a commit, abort and redo
//!   (counting towards the abort loop or not), stop on a fatal error or an abort loop;
//! - [`restart_decision`]: start a new incarnation after a fatal error, or stop;
//! - [`settlement`]: whether every owned partition settled (`--exit-after-idle`);
//! - [`start_decision`] and [`re_read_range`]: restore an assigned partition from
//!   `[low water, committed)`, start it fresh at `--start-from`, or refuse;
//! - [`pending_step`] and [`offsets_fetch_verdict`]: the next step of a partition that
//!   is assigned but not owned yet (its committed offset being fetched, its state being
//!   re-read outside the rebalance callback), and whether a failed committed-offset
//!   fetch is tried again.

use std::ops::Range;
use std::time::Duration;

use crate::settings::StartFrom;

/// Aborts in a row (without a commit in between, i.e. at the same input offsets)
/// after which the aggregator stops instead of looping.
pub(crate) const MAX_CONSECUTIVE_ABORTS: u32 = 5;
/// Retries of a retriable `commit_transaction` error.
pub(crate) const COMMIT_RETRIES: u32 = 3;
/// Fatal errors without a committed transaction in between after which [`crate::run`]
/// stops instead of restarting.
pub(crate) const MAX_FATAL_RESTARTS: u32 = 3;
/// Back-off before the first restart after a fatal error; doubles each time.
pub(crate) const FATAL_RESTART_BACKOFF: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------
// Ticks

/// What the loop knows about a partition when it considers appending a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TickFacts {
    /// The consumer reported the partition's end and no record came since.
    pub(crate) at_end: bool,
    /// A tick was written and has not been read back yet.
    pub(crate) tick_in_flight: bool,
    /// Wall-clock ms of the last event that moved the watermark, or the last tick read.
    pub(crate) idle_base_ms: i64,
    /// Wall-clock ms now.
    pub(crate) now_ms: i64,
    /// `aggregator.idle_timeout_ms`.
    pub(crate) idle_timeout_ms: i64,
    /// The partition's tick base: its largest counted event time or last tick time,
    /// whichever is later; none before the first counted event or tick.
    pub(crate) tick_base_ms: Option<i64>,
}

/// Whether to append a tick to a partition, and its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TickDecision {
    /// The partition may still have a backlog: no tick.
    NotAtEnd,
    /// A tick written earlier has not been read back yet: wait for it.
    InFlight,
    /// Less than the idle timeout passed since the idle base.
    NotIdleYet,
    /// The partition has no clock yet (nothing counted, no tick): nothing can close.
    NoClock,
    /// A tick at this time would close no window and no correction pane.
    ClosesNothing {
        /// The time the tick would have carried.
        tick_time_ms: i64,
    },
    /// Append a tick carrying this time.
    Write {
        /// The tick's time.
        tick_time_ms: i64,
    },
}

/// The wall-clock ms that passed since the idle base (never negative).
pub(crate) fn idle_ms(idle_base_ms: i64, now_ms: i64) -> i64 {
    now_ms.saturating_sub(idle_base_ms).max(0)
}

/// The time a tick written at `now_ms` carries: the tick base plus the idle time that
/// passed — never the wall clock's absolute value. None without a tick base.
pub(crate) fn tick_time_ms(
    tick_base_ms: Option<i64>,
    idle_base_ms: i64,
    now_ms: i64,
) -> Option<i64> {
    Some(tick_base_ms?.saturating_add(idle_ms(idle_base_ms, now_ms)))
}

/// Whether a tick written now would close nothing (`would_close` asks the state).
pub(crate) fn tick_is_noop(
    tick_base_ms: Option<i64>,
    idle_base_ms: i64,
    now_ms: i64,
    would_close: impl FnOnce(i64) -> bool,
) -> bool {
    tick_time_ms(tick_base_ms, idle_base_ms, now_ms).is_none_or(|tick| !would_close(tick))
}

/// Whether to tick a partition: only at its end, with no tick in flight, after the idle
/// timeout, and only if the state would close something at the tick's time
/// (`would_close` asks the state; it is called at most once).
pub(crate) fn tick_decision(
    facts: &TickFacts,
    would_close: impl FnOnce(i64) -> bool,
) -> TickDecision {
    if !facts.at_end {
        return TickDecision::NotAtEnd;
    }
    if facts.tick_in_flight {
        return TickDecision::InFlight;
    }
    if idle_ms(facts.idle_base_ms, facts.now_ms) < facts.idle_timeout_ms {
        return TickDecision::NotIdleYet;
    }
    let Some(tick_time_ms) = tick_time_ms(facts.tick_base_ms, facts.idle_base_ms, facts.now_ms)
    else {
        return TickDecision::NoClock;
    };
    if would_close(tick_time_ms) {
        TickDecision::Write { tick_time_ms }
    } else {
        TickDecision::ClosesNothing { tick_time_ms }
    }
}

// ---------------------------------------------------------------------------------
// Transaction errors and aborts

/// What librdkafka says about a failed transaction call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TransactionErrorFacts {
    /// The client cannot go on (fenced, fatal idempotence error).
    pub(crate) fatal: bool,
    /// The error says this member's view of the group is stale (unknown member,
    /// illegal generation, rebalance in progress, coordinator moved or loading).
    pub(crate) group_membership: bool,
    /// librdkafka says the same call may be retried.
    pub(crate) retriable: bool,
}

/// Which transaction call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransactionCall {
    /// `send_offsets_to_transaction`: never retried by itself.
    SendOffsets,
    /// `commit_transaction`, after this many retries of it.
    Commit {
        /// Retries of the commit already made.
        retries: u32,
    },
}

/// What to do with a failed transaction call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransactionErrorAction {
    /// Call `commit_transaction` again: a retriable error with retries left.
    RetryCommit,
    /// Abort, rewind every partition to its last commit and redo the work.
    Abort {
        /// Whether this abort counts towards [`MAX_CONSECUTIVE_ABORTS`]: aborts caused
        /// by the group moving on say nothing about the input and do not.
        counts_towards_loop: bool,
    },
    /// The client cannot go on: the incarnation ends with the error.
    Fatal,
}

/// What to do with a failed transaction call.
pub(crate) fn transaction_error_action(
    facts: TransactionErrorFacts,
    call: TransactionCall,
) -> TransactionErrorAction {
    if let TransactionCall::Commit { retries } = call
        && facts.retriable
        && retries < COMMIT_RETRIES
    {
        return TransactionErrorAction::RetryCommit;
    }
    if facts.fatal {
        return TransactionErrorAction::Fatal;
    }
    TransactionErrorAction::Abort {
        counts_towards_loop: !facts.group_membership,
    }
}

/// What follows an abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AbortVerdict {
    /// Redo the work from the last commit.
    Redo {
        /// Aborts in a row now.
        consecutive_aborts: u32,
    },
    /// [`MAX_CONSECUTIVE_ABORTS`] aborts in a row at the same input offsets: stop
    /// instead of looping.
    AbortLoop {
        /// Aborts in a row now.
        aborts: u32,
    },
}

/// What follows an abort, given the aborts in a row before it.
pub(crate) fn abort_verdict(consecutive_aborts: u32, counts_towards_loop: bool) -> AbortVerdict {
    if !counts_towards_loop {
        return AbortVerdict::Redo { consecutive_aborts };
    }
    let aborts = consecutive_aborts.saturating_add(1);
    if aborts >= MAX_CONSECUTIVE_ABORTS {
        AbortVerdict::AbortLoop { aborts }
    } else {
        AbortVerdict::Redo {
            consecutive_aborts: aborts,
        }
    }
}

// ---------------------------------------------------------------------------------
// Restarts after fatal errors

/// What [`crate::run`] knows when an incarnation ended with a fatal error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FatalFacts {
    /// Fatal errors in a row before this one (no commit in between).
    pub(crate) fatal_in_a_row: u32,
    /// The incarnation that failed committed at least one transaction.
    pub(crate) incarnation_committed: bool,
    /// Shutdown was requested.
    pub(crate) shutdown_requested: bool,
}

/// Restart after a fatal error, or stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RestartDecision {
    /// Start a new incarnation from the committed offsets after `backoff`.
    Restart {
        /// Fatal errors in a row, this one included.
        fatal_in_a_row: u32,
        /// How long to wait first.
        backoff: Duration,
    },
    /// More than [`MAX_FATAL_RESTARTS`] fatal errors in a row: stop with the error.
    TooManyRestarts {
        /// Restarts made before this error.
        restarts: u32,
    },
    /// Shutdown was requested: stop with the error rather than restart.
    ShuttingDown {
        /// Restarts made before this error.
        restarts: u32,
    },
}

/// Restart after a fatal error, or stop. A commit in the failed incarnation resets
/// the count; the back-off doubles with each error in a row.
pub(crate) fn restart_decision(facts: FatalFacts) -> RestartDecision {
    let before = if facts.incarnation_committed {
        0
    } else {
        facts.fatal_in_a_row
    };
    let fatal_in_a_row = before.saturating_add(1);
    if fatal_in_a_row > MAX_FATAL_RESTARTS {
        return RestartDecision::TooManyRestarts { restarts: before };
    }
    if facts.shutdown_requested {
        return RestartDecision::ShuttingDown { restarts: before };
    }
    let factor = 1_u32.checked_shl(fatal_in_a_row - 1).unwrap_or(u32::MAX);
    RestartDecision::Restart {
        fatal_in_a_row,
        backoff: FATAL_RESTART_BACKOFF.saturating_mul(factor),
    }
}

// ---------------------------------------------------------------------------------
// Settled (`--exit-after-idle`)

/// What the loop knows about one owned partition when checking whether it settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SettleFacts {
    /// The consumer reported the partition's end and no record came since.
    pub(crate) at_end: bool,
    /// Records were processed since the last commit.
    pub(crate) dirty: bool,
    /// A tick was written and has not been read back yet.
    pub(crate) tick_in_flight: bool,
    /// Time since the last usage record was read.
    pub(crate) since_last_usage: Duration,
    /// A tick was read after the last usage record.
    pub(crate) tick_read_since_usage: bool,
    /// A tick written now would close nothing ([`tick_is_noop`]).
    pub(crate) tick_is_noop: bool,
}

/// Whether one partition settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PartitionSettlement {
    /// At its end, committed, quiet, and no tick needed or its tick read back.
    Settled,
    /// The partition may still have a backlog.
    NotAtEnd,
    /// Records processed since the last commit.
    Uncommitted,
    /// A tick was written and not read back yet.
    TickInFlight,
    /// A usage record was read less than the quiet time ago.
    RecentUsage,
    /// A tick would still close something.
    TickDue,
}

/// Whether one partition settled for `quiet`.
pub(crate) fn partition_settlement(facts: &SettleFacts, quiet: Duration) -> PartitionSettlement {
    if !facts.at_end {
        PartitionSettlement::NotAtEnd
    } else if facts.dirty {
        PartitionSettlement::Uncommitted
    } else if facts.tick_in_flight {
        PartitionSettlement::TickInFlight
    } else if facts.since_last_usage < quiet {
        PartitionSettlement::RecentUsage
    } else if !facts.tick_read_since_usage && !facts.tick_is_noop {
        PartitionSettlement::TickDue
    } else {
        PartitionSettlement::Settled
    }
}

/// Whether the process settled (and `--exit-after-idle` may exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Every owned partition settled and nothing is uncommitted: exit.
    Settled,
    /// No partition is owned yet.
    NothingOwned,
    /// A transaction is open.
    TransactionOpen,
    /// At least one partition has not settled.
    Busy,
}

/// Whether the process settled, from the open transaction and each partition's state.
pub(crate) fn settlement(
    in_transaction: bool,
    partitions: impl IntoIterator<Item = PartitionSettlement>,
) -> Settlement {
    let mut owned = 0_usize;
    let mut busy = false;
    for partition in partitions {
        owned += 1;
        busy |= partition != PartitionSettlement::Settled;
    }
    if owned == 0 {
        Settlement::NothingOwned
    } else if in_transaction {
        Settlement::TransactionOpen
    } else if busy {
        Settlement::Busy
    } else {
        Settlement::Settled
    }
}

// ---------------------------------------------------------------------------------
// Start of an assigned partition

/// Where an assigned partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartDecision<C> {
    /// Resume at the committed offset `C` with state rebuilt from the checkpoint's low
    /// water `L` and the records of `[L, C)` ([`re_read_range`]).
    Restore(C),
    /// No committed offset: start with an empty state where `--start-from` says.
    Fresh(StartFrom),
    /// No committed offset and no `--start-from`: refuse, naming the partition.
    Refuse,
}

/// Where an assigned partition starts, given its committed offset and checkpoint (if
/// any) and `--start-from`: committed offsets always win.
pub(crate) fn start_decision<C>(
    committed: Option<C>,
    start_from: Option<StartFrom>,
) -> StartDecision<C> {
    match (committed, start_from) {
        (Some(committed), _) => StartDecision::Restore(committed),
        (None, Some(start_from)) => StartDecision::Fresh(start_from),
        (None, None) => StartDecision::Refuse,
    }
}

/// The offsets a restore re-reads: `[low_water, committed_offset)`, none when empty.
pub(crate) fn re_read_range(low_water: i64, committed_offset: i64) -> Option<Range<i64>> {
    (committed_offset > low_water).then_some(low_water..committed_offset)
}

// ---------------------------------------------------------------------------------
// Assigned partitions on their way to being owned (restore outside the callback)

/// Attempts at fetching a pending partition's committed offset before the aggregator
/// stops with the error. Each attempt waits up to the transaction timeout plus a
/// margin (at least the Kafka call timeout), long enough for a previous owner's open
/// transaction to resolve.
pub(crate) const MAX_OFFSET_FETCH_ATTEMPTS: u32 = 3;

/// Where a partition assigned to this member, and paused, is on its way to being
/// owned. Nothing of it is processed or committed until it is owned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingProgress {
    /// Its stable committed offset and checkpoint are being fetched off the loop.
    FetchingOffsets,
    /// That fetch failed, after this many attempts.
    OffsetsFailed {
        /// Attempts made so far.
        attempts: u32,
    },
    /// The committed offset and checkpoint (or the lack of one) are known.
    OffsetsFetched,
    /// Its state is being re-read from the input off the loop.
    Restoring,
    /// The re-read rebuilt the committed state.
    Restored,
    /// The re-read failed (digest mismatch, input deleted, stalled, Kafka error).
    RestoreFailed,
}

/// What the loop knows about one pending partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingFacts {
    /// The group took the partition away (revoked or lost).
    pub(crate) revoked: bool,
    /// Shutdown was requested.
    pub(crate) stopping: bool,
    /// How far it got.
    pub(crate) progress: PendingProgress,
}

/// The next step for a pending partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingStep {
    /// Revoked, or shutting down: cancel its fetch or re-read and forget it (nothing
    /// of it was processed, so nothing is committed or aborted for it).
    Forget,
    /// The committed-offset fetch runs: keep polling, the partition stays paused.
    AwaitOffsets,
    /// The committed-offset fetch failed: fetch again, attempt `attempt`.
    RetryOffsets {
        /// The attempt about to be made (2 for the first retry).
        attempt: u32,
    },
    /// The committed-offset fetch failed [`MAX_OFFSET_FETCH_ATTEMPTS`] times: stop.
    FailOffsets,
    /// Check the checkpoint's semantics and start where [`start_decision`] says:
    /// begin the re-read, start fresh, or refuse.
    Start,
    /// The re-read runs: keep polling, the partition stays paused.
    AwaitRestore,
    /// Own the rebuilt state: seek the consumer to the committed offset and resume.
    Own,
    /// The re-read failed: the process stops with its error.
    Fail,
}

/// Whether a failed committed-offset fetch is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OffsetsFetchVerdict {
    /// Fetch again; this is the attempt's number.
    Retry {
        /// The attempt about to be made.
        attempt: u32,
    },
    /// Out of attempts: stop with the error.
    GiveUp,
}

/// Whether a committed-offset fetch that failed `attempts` times is tried again.
pub(crate) fn offsets_fetch_verdict(attempts: u32) -> OffsetsFetchVerdict {
    if attempts >= MAX_OFFSET_FETCH_ATTEMPTS {
        OffsetsFetchVerdict::GiveUp
    } else {
        OffsetsFetchVerdict::Retry {
            attempt: attempts.saturating_add(1),
        }
    }
}

/// The next step for a pending partition. Revocation and shutdown win over anything
/// the partition reached: a rebuilt state that is no longer ours is dropped, and a
/// failure of a partition we no longer own stops nothing (its new owner restores it
/// and meets the same failure if it is one of the input).
pub(crate) fn pending_step(facts: PendingFacts) -> PendingStep {
    if facts.revoked || facts.stopping {
        return PendingStep::Forget;
    }
    match facts.progress {
        PendingProgress::FetchingOffsets => PendingStep::AwaitOffsets,
        PendingProgress::OffsetsFailed { attempts } => match offsets_fetch_verdict(attempts) {
            OffsetsFetchVerdict::Retry { attempt } => PendingStep::RetryOffsets { attempt },
            OffsetsFetchVerdict::GiveUp => PendingStep::FailOffsets,
        },
        PendingProgress::OffsetsFetched => PendingStep::Start,
        PendingProgress::Restoring => PendingStep::AwaitRestore,
        PendingProgress::Restored => PendingStep::Own,
        PendingProgress::RestoreFailed => PendingStep::Fail,
    }
}

/// How long a paced re-read (the `--restore-min-duration-ms` test hook) must have run
/// before it applies the record at `offset` of `range`: the same fraction of
/// `min_duration_ms` as of the range lies before the offset, so the whole re-read
/// takes at least `min_duration_ms`, evenly spread (and cancellable throughout).
pub(crate) fn paced_due_ms(range: &Range<i64>, offset: i64, min_duration_ms: u64) -> u64 {
    let length = i128::from(range.end.saturating_sub(range.start));
    if length <= 0 {
        return 0;
    }
    let done = i128::from(offset.clamp(range.start, range.end) - range.start);
    let due = i128::from(min_duration_ms) * done / length;
    u64::try_from(due).unwrap_or(min_duration_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tick_facts() -> TickFacts {
        TickFacts {
            at_end: true,
            tick_in_flight: false,
            idle_base_ms: 1_000_000,
            now_ms: 1_030_000,
            idle_timeout_ms: 30_000,
            tick_base_ms: Some(500_000),
        }
    }

    #[test]
    fn an_idle_partition_at_its_end_gets_a_tick_at_its_base_plus_the_idle_time() {
        // 30 s idle on top of event time 500 s.
        assert_eq!(
            tick_decision(&tick_facts(), |_| true),
            TickDecision::Write {
                tick_time_ms: 530_000
            }
        );
    }

    #[test]
    fn no_tick_before_the_end_while_one_is_in_flight_or_before_the_idle_timeout() {
        let not_at_end = TickFacts {
            at_end: false,
            ..tick_facts()
        };
        assert_eq!(tick_decision(&not_at_end, |_| true), TickDecision::NotAtEnd);
        let in_flight = TickFacts {
            tick_in_flight: true,
            ..tick_facts()
        };
        assert_eq!(tick_decision(&in_flight, |_| true), TickDecision::InFlight);
        let early = TickFacts {
            now_ms: 1_029_999,
            ..tick_facts()
        };
        assert_eq!(tick_decision(&early, |_| true), TickDecision::NotIdleYet);
    }

    #[test]
    fn no_tick_without_a_clock_or_when_it_would_close_nothing() {
        let no_clock = TickFacts {
            tick_base_ms: None,
            ..tick_facts()
        };
        assert_eq!(tick_decision(&no_clock, |_| true), TickDecision::NoClock);
        assert_eq!(
            tick_decision(&tick_facts(), |_| false),
            TickDecision::ClosesNothing {
                tick_time_ms: 530_000
            }
        );
        assert!(tick_is_noop(Some(500_000), 1_000_000, 1_030_000, |_| false));
        assert!(tick_is_noop(None, 1_000_000, 1_030_000, |_| true));
        assert!(!tick_is_noop(Some(500_000), 1_000_000, 1_030_000, |_| true));
    }

    #[test]
    fn a_clock_that_went_back_counts_as_no_idle_time() {
        assert_eq!(idle_ms(2_000, 1_000), 0);
        assert_eq!(tick_time_ms(Some(7), 2_000, 1_000), Some(7));
    }

    proptest! {
        #[test]
        fn a_written_tick_never_goes_below_its_base_and_waited_the_idle_timeout(
            at_end: bool,
            tick_in_flight: bool,
            idle_base_ms in -1_000_000_000_i64..1_000_000_000,
            elapsed in -1_000_000_i64..1_000_000_000,
            idle_timeout_ms in 0_i64..10_000_000,
            tick_base_ms in proptest::option::of(-1_000_000_000_i64..1_000_000_000),
            closes: bool,
        ) {
            let facts = TickFacts {
                at_end,
                tick_in_flight,
                idle_base_ms,
                now_ms: idle_base_ms + elapsed,
                idle_timeout_ms,
                tick_base_ms,
            };
            match tick_decision(&facts, |_| closes) {
                TickDecision::Write { tick_time_ms } => {
                    prop_assert!(at_end && !tick_in_flight && closes);
                    prop_assert!(elapsed >= idle_timeout_ms);
                    prop_assert_eq!(Some(tick_time_ms), tick_base_ms.map(|base| base + elapsed));
                }
                TickDecision::ClosesNothing { tick_time_ms } => {
                    prop_assert!(!closes);
                    prop_assert_eq!(Some(tick_time_ms), tick_base_ms.map(|base| base + elapsed));
                }
                TickDecision::NotAtEnd => prop_assert!(!at_end),
                TickDecision::InFlight => prop_assert!(at_end && tick_in_flight),
                TickDecision::NotIdleYet => prop_assert!(elapsed.max(0) < idle_timeout_ms),
                TickDecision::NoClock => prop_assert!(tick_base_ms.is_none()),
            }
        }
    }

    const PLAIN: TransactionErrorFacts = TransactionErrorFacts {
        fatal: false,
        group_membership: false,
        retriable: false,
    };

    #[test]
    fn a_retriable_commit_error_is_retried_three_times_then_aborted() {
        let retriable = TransactionErrorFacts {
            retriable: true,
            ..PLAIN
        };
        for retries in 0..3 {
            assert_eq!(
                transaction_error_action(retriable, TransactionCall::Commit { retries }),
                TransactionErrorAction::RetryCommit
            );
        }
        assert_eq!(
            transaction_error_action(retriable, TransactionCall::Commit { retries: 3 }),
            TransactionErrorAction::Abort {
                counts_towards_loop: true
            }
        );
        assert_eq!(
            transaction_error_action(retriable, TransactionCall::SendOffsets),
            TransactionErrorAction::Abort {
                counts_towards_loop: true
            }
        );
    }

    #[test]
    fn fatal_errors_end_the_incarnation_and_group_errors_abort_without_counting() {
        let fatal = TransactionErrorFacts {
            fatal: true,
            ..PLAIN
        };
        assert_eq!(
            transaction_error_action(fatal, TransactionCall::SendOffsets),
            TransactionErrorAction::Fatal
        );
        assert_eq!(
            transaction_error_action(fatal, TransactionCall::Commit { retries: 0 }),
            TransactionErrorAction::Fatal
        );
        let group = TransactionErrorFacts {
            group_membership: true,
            ..PLAIN
        };
        assert_eq!(
            transaction_error_action(group, TransactionCall::Commit { retries: 0 }),
            TransactionErrorAction::Abort {
                counts_towards_loop: false
            }
        );
    }

    #[test]
    fn the_fifth_counted_abort_in_a_row_is_an_abort_loop() {
        let mut aborts = 0;
        for expected in 1..=4 {
            match abort_verdict(aborts, true) {
                AbortVerdict::Redo { consecutive_aborts } => {
                    assert_eq!(consecutive_aborts, expected);
                    aborts = consecutive_aborts;
                }
                other => panic!("abort {expected} stopped: {other:?}"),
            }
        }
        // Aborts caused by the group do not move the count, however many.
        for _ in 0..100 {
            assert_eq!(
                abort_verdict(aborts, false),
                AbortVerdict::Redo {
                    consecutive_aborts: 4
                }
            );
        }
        assert_eq!(
            abort_verdict(aborts, true),
            AbortVerdict::AbortLoop { aborts: 5 }
        );
    }

    proptest! {
        #[test]
        fn the_abort_loop_stops_exactly_at_the_fifth_counted_abort(
            counted in proptest::collection::vec(any::<bool>(), 0..40),
        ) {
            let mut consecutive = 0;
            let mut counted_so_far = 0_u32;
            for counts in counted {
                counted_so_far += u32::from(counts);
                match abort_verdict(consecutive, counts) {
                    AbortVerdict::Redo { consecutive_aborts } => {
                        prop_assert!(counted_so_far < 5);
                        prop_assert_eq!(consecutive_aborts, counted_so_far);
                        consecutive = consecutive_aborts;
                    }
                    AbortVerdict::AbortLoop { aborts } => {
                        prop_assert!(counts);
                        prop_assert_eq!(counted_so_far, 5);
                        prop_assert_eq!(aborts, 5);
                        break;
                    }
                }
            }
        }

        #[test]
        fn only_fatal_errors_end_the_incarnation_and_only_commits_retry_in_place(
            fatal: bool,
            group_membership: bool,
            retriable: bool,
            retries in proptest::option::of(0_u32..10),
        ) {
            let facts = TransactionErrorFacts { fatal, group_membership, retriable };
            let call = retries.map_or(TransactionCall::SendOffsets, |retries| TransactionCall::Commit { retries });
            match transaction_error_action(facts, call) {
                TransactionErrorAction::RetryCommit => {
                    prop_assert!(retriable && retries.is_some_and(|retries| retries < 3));
                }
                TransactionErrorAction::Fatal => prop_assert!(fatal),
                TransactionErrorAction::Abort { counts_towards_loop } => {
                    prop_assert!(!fatal);
                    prop_assert_eq!(counts_towards_loop, !group_membership);
                }
            }
        }
    }

    #[test]
    fn fatal_errors_restart_with_a_doubling_back_off_until_the_fourth_in_a_row() {
        let mut fatal_in_a_row = 0;
        for (expected, backoff_ms) in [(1, 500), (2, 1_000), (3, 2_000)] {
            let decision = restart_decision(FatalFacts {
                fatal_in_a_row,
                incarnation_committed: false,
                shutdown_requested: false,
            });
            assert_eq!(
                decision,
                RestartDecision::Restart {
                    fatal_in_a_row: expected,
                    backoff: Duration::from_millis(backoff_ms),
                }
            );
            fatal_in_a_row = expected;
        }
        assert_eq!(
            restart_decision(FatalFacts {
                fatal_in_a_row: 3,
                incarnation_committed: false,
                shutdown_requested: false,
            }),
            RestartDecision::TooManyRestarts { restarts: 3 }
        );
        // A commit in the failed incarnation starts the count over.
        assert_eq!(
            restart_decision(FatalFacts {
                fatal_in_a_row: 3,
                incarnation_committed: true,
                shutdown_requested: false,
            }),
            RestartDecision::Restart {
                fatal_in_a_row: 1,
                backoff: Duration::from_millis(500),
            }
        );
        assert_eq!(
            restart_decision(FatalFacts {
                fatal_in_a_row: 1,
                incarnation_committed: false,
                shutdown_requested: true,
            }),
            RestartDecision::ShuttingDown { restarts: 1 }
        );
    }

    proptest! {
        #[test]
        fn restarts_are_bounded_and_never_happen_during_shutdown(
            fatal_in_a_row in 0_u32..1_000,
            incarnation_committed: bool,
            shutdown_requested: bool,
        ) {
            let facts = FatalFacts { fatal_in_a_row, incarnation_committed, shutdown_requested };
            match restart_decision(facts) {
                RestartDecision::Restart { fatal_in_a_row: now, backoff } => {
                    prop_assert!(!shutdown_requested);
                    prop_assert!((1..=3).contains(&now));
                    prop_assert_eq!(backoff, Duration::from_millis(500 << (now - 1)));
                }
                RestartDecision::TooManyRestarts { restarts } => {
                    prop_assert!(!incarnation_committed && fatal_in_a_row >= 3);
                    prop_assert_eq!(restarts, fatal_in_a_row);
                }
                RestartDecision::ShuttingDown { .. } => prop_assert!(shutdown_requested),
            }
        }
    }

    fn settled_facts() -> SettleFacts {
        SettleFacts {
            at_end: true,
            dirty: false,
            tick_in_flight: false,
            since_last_usage: Duration::from_secs(5),
            tick_read_since_usage: false,
            tick_is_noop: true,
        }
    }

    #[test]
    fn a_partition_settles_only_at_its_end_committed_quiet_and_with_no_tick_due() {
        let quiet = Duration::from_secs(5);
        let cases = [
            (settled_facts(), PartitionSettlement::Settled),
            (
                SettleFacts {
                    at_end: false,
                    ..settled_facts()
                },
                PartitionSettlement::NotAtEnd,
            ),
            (
                SettleFacts {
                    dirty: true,
                    ..settled_facts()
                },
                PartitionSettlement::Uncommitted,
            ),
            (
                SettleFacts {
                    tick_in_flight: true,
                    ..settled_facts()
                },
                PartitionSettlement::TickInFlight,
            ),
            (
                SettleFacts {
                    since_last_usage: Duration::from_millis(4_999),
                    ..settled_facts()
                },
                PartitionSettlement::RecentUsage,
            ),
            (
                SettleFacts {
                    tick_is_noop: false,
                    ..settled_facts()
                },
                PartitionSettlement::TickDue,
            ),
            (
                SettleFacts {
                    tick_is_noop: false,
                    tick_read_since_usage: true,
                    ..settled_facts()
                },
                PartitionSettlement::Settled,
            ),
        ];
        for (facts, expected) in cases {
            assert_eq!(partition_settlement(&facts, quiet), expected, "{facts:?}");
        }
    }

    #[test]
    fn the_process_settles_when_it_owns_partitions_all_settled_and_no_transaction() {
        use PartitionSettlement::{NotAtEnd, Settled};
        assert_eq!(settlement(false, []), Settlement::NothingOwned);
        assert_eq!(settlement(true, []), Settlement::NothingOwned);
        assert_eq!(settlement(true, [Settled]), Settlement::TransactionOpen);
        assert_eq!(settlement(false, [Settled, NotAtEnd]), Settlement::Busy);
        assert_eq!(settlement(false, [Settled, Settled]), Settlement::Settled);
    }

    #[test]
    fn committed_offsets_win_and_a_partition_without_one_needs_start_from() {
        assert_eq!(
            start_decision(Some((120, 100)), Some(StartFrom::Latest)),
            StartDecision::Restore((120, 100))
        );
        assert_eq!(
            start_decision(Some((120, 100)), None),
            StartDecision::Restore((120, 100))
        );
        assert_eq!(
            start_decision(None::<(i64, i64)>, Some(StartFrom::Timestamp(7))),
            StartDecision::Fresh(StartFrom::Timestamp(7))
        );
        assert_eq!(
            start_decision(None::<(i64, i64)>, None),
            StartDecision::Refuse
        );
    }

    #[test]
    fn a_restore_re_reads_from_the_low_water_to_the_committed_offset() {
        assert_eq!(re_read_range(100, 120), Some(100..120));
        assert_eq!(re_read_range(120, 120), None);
        assert_eq!(re_read_range(130, 120), None);
    }

    fn pending(progress: PendingProgress) -> PendingFacts {
        PendingFacts {
            revoked: false,
            stopping: false,
            progress,
        }
    }

    #[test]
    fn a_pending_partition_waits_for_its_offsets_then_its_re_read_then_is_owned() {
        let cases = [
            (PendingProgress::FetchingOffsets, PendingStep::AwaitOffsets),
            (PendingProgress::OffsetsFetched, PendingStep::Start),
            (PendingProgress::Restoring, PendingStep::AwaitRestore),
            (PendingProgress::Restored, PendingStep::Own),
            (PendingProgress::RestoreFailed, PendingStep::Fail),
        ];
        for (progress, expected) in cases {
            assert_eq!(pending_step(pending(progress)), expected, "{progress:?}");
        }
    }

    #[test]
    fn a_failed_offset_fetch_is_tried_three_times_in_all_then_stops() {
        assert_eq!(
            pending_step(pending(PendingProgress::OffsetsFailed { attempts: 1 })),
            PendingStep::RetryOffsets { attempt: 2 }
        );
        assert_eq!(
            pending_step(pending(PendingProgress::OffsetsFailed { attempts: 2 })),
            PendingStep::RetryOffsets { attempt: 3 }
        );
        assert_eq!(
            pending_step(pending(PendingProgress::OffsetsFailed { attempts: 3 })),
            PendingStep::FailOffsets
        );
        assert_eq!(offsets_fetch_verdict(7), OffsetsFetchVerdict::GiveUp);
    }

    #[test]
    fn a_revoked_partition_is_forgotten_whatever_it_reached_even_a_failure() {
        let all = [
            PendingProgress::FetchingOffsets,
            PendingProgress::OffsetsFailed { attempts: 3 },
            PendingProgress::OffsetsFetched,
            PendingProgress::Restoring,
            PendingProgress::Restored,
            PendingProgress::RestoreFailed,
        ];
        for progress in all {
            let revoked = PendingFacts {
                revoked: true,
                ..pending(progress)
            };
            assert_eq!(pending_step(revoked), PendingStep::Forget, "{progress:?}");
            let stopping = PendingFacts {
                stopping: true,
                ..pending(progress)
            };
            assert_eq!(pending_step(stopping), PendingStep::Forget, "{progress:?}");
        }
    }

    #[test]
    fn a_paced_re_read_spreads_its_minimum_duration_over_the_range() {
        // 10 s over offsets [100, 200): offset 150 is due at 5 s, the end at 10 s.
        assert_eq!(paced_due_ms(&(100..200), 100, 10_000), 0);
        assert_eq!(paced_due_ms(&(100..200), 150, 10_000), 5_000);
        assert_eq!(paced_due_ms(&(100..200), 199, 10_000), 9_900);
        assert_eq!(paced_due_ms(&(100..200), 250, 10_000), 10_000);
        assert_eq!(paced_due_ms(&(100..200), 50, 10_000), 0);
        assert_eq!(paced_due_ms(&(100..100), 100, 10_000), 0);
    }

    proptest! {
        #[test]
        fn only_an_unrevoked_partition_with_its_state_rebuilt_is_owned(
            revoked: bool,
            stopping: bool,
            which in 0_u8..6,
            attempts in 0_u32..10,
        ) {
            let progress = match which {
                0 => PendingProgress::FetchingOffsets,
                1 => PendingProgress::OffsetsFailed { attempts },
                2 => PendingProgress::OffsetsFetched,
                3 => PendingProgress::Restoring,
                4 => PendingProgress::Restored,
                _ => PendingProgress::RestoreFailed,
            };
            let step = pending_step(PendingFacts { revoked, stopping, progress });
            match step {
                PendingStep::Own => {
                    prop_assert!(!revoked && !stopping);
                    prop_assert_eq!(progress, PendingProgress::Restored);
                }
                PendingStep::Forget => prop_assert!(revoked || stopping),
                PendingStep::RetryOffsets { attempt } => {
                    prop_assert!(attempts < MAX_OFFSET_FETCH_ATTEMPTS);
                    prop_assert_eq!(attempt, attempts + 1);
                }
                PendingStep::FailOffsets => prop_assert!(attempts >= MAX_OFFSET_FETCH_ATTEMPTS),
                PendingStep::Fail => prop_assert_eq!(progress, PendingProgress::RestoreFailed),
                PendingStep::AwaitOffsets | PendingStep::AwaitRestore | PendingStep::Start => {
                    prop_assert!(!revoked && !stopping);
                }
            }
        }

        #[test]
        fn a_paced_re_read_is_due_monotonically_and_never_past_its_minimum(
            start in -1_000_i64..1_000_000,
            length in 0_i64..1_000_000,
            a in 0_i64..1_000_000,
            b in 0_i64..1_000_000,
            min_duration_ms in 0_u64..100_000,
        ) {
            let range = start..start + length;
            let (low, high) = (start + a.min(b), start + a.max(b));
            let due_low = paced_due_ms(&range, low, min_duration_ms);
            let due_high = paced_due_ms(&range, high, min_duration_ms);
            prop_assert!(due_low <= due_high);
            prop_assert!(due_high <= min_duration_ms);
        }
    }
}
