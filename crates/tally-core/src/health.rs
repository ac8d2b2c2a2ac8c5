//! Liveness and readiness of a long-running process, as a few atomics.
//!
//! A process's loop holds a [`Health`] handle (cheap to clone; clones share the same
//! state) and reports to it: [`Health::beat`] once per iteration of its poll loop,
//! [`Health::set_phase`] when it moves between starting, restoring, running and
//! stopping, and [`Health::set_database_available`] when its database comes and goes.
//! The HTTP side reads it with [`Health::liveness`] and [`Health::readiness`] and
//! answers `/healthz` and `/readyz`. Nothing here does I/O or waits: every call is a
//! relaxed atomic load or store, cheap enough for a hot loop.
//!
//! - **Liveness** asks only whether the loop still turns: the last beat (or the
//!   handle's creation, before the first beat) lies within a bound. The bound is the
//!   caller's and must be longer than any single blocking call of the loop
//!   (`transaction.timeout.ms` for the aggregator), so a slow broker or database never
//!   makes a live process look dead; liveness never depends on Kafka or a database.
//! - **Readiness** is the [`Phase`]: ready only while [`Phase::Running`] and, for a
//!   process with a database, while that database is available.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting; for a consumer, joining its group and waiting for an assignment.
    Starting,
    /// Rebuilding the state of assigned partitions before processing them.
    Restoring,
    /// Assigned partitions are restored (or need none) and being processed.
    Running,
    /// Shutdown was requested: finishing the open work, leaving the group.
    Stopping,
}

impl Phase {
    /// Lowercase name, as `/readyz` reports it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Restoring => "restoring",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
        }
    }

    const fn code(self) -> u8 {
        match self {
            Phase::Starting => 0,
            Phase::Restoring => 1,
            Phase::Running => 2,
            Phase::Stopping => 3,
        }
    }

    const fn from_code(code: u8) -> Phase {
        match code {
            1 => Phase::Restoring,
            2 => Phase::Running,
            3 => Phase::Stopping,
            _ => Phase::Starting,
        }
    }
}

/// The answer to "is the loop alive?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// The last beat lies within the bound.
    pub alive: bool,
    /// Milliseconds since the last beat (since the handle's creation before the first).
    pub since_beat_ms: u64,
    /// The bound it was checked against, ms.
    pub bound_ms: u64,
}

/// The answer to "should this process get traffic / count as available?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Ready: running, and the database (if any) available.
    pub ready: bool,
    /// The phase.
    pub phase: Phase,
    /// Why not ready, in a few words; `None` when ready.
    pub reason: Option<&'static str>,
}

#[derive(Debug)]
struct Inner {
    created: Instant,
    /// Milliseconds after `created` of the last beat, plus one (0: no beat yet).
    last_beat: AtomicU64,
    phase: AtomicU8,
    database_available: AtomicBool,
}

/// A shared health handle; see the module docs.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// A handle in [`Phase::Starting`], no beat yet, database available.
    pub fn new() -> Health {
        Health {
            inner: Arc::new(Inner {
                created: Instant::now(),
                last_beat: AtomicU64::new(0),
                phase: AtomicU8::new(Phase::Starting.code()),
                database_available: AtomicBool::new(true),
            }),
        }
    }

    /// The loop turned: call once per poll-loop iteration.
    pub fn beat(&self) {
        let elapsed = u64::try_from(self.inner.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner
            .last_beat
            .store(elapsed.saturating_add(1), Ordering::Relaxed);
    }

    /// Moves to `phase`. [`Phase::Stopping`] is final: later calls do not leave it.
    pub fn set_phase(&self, phase: Phase) {
        let _ = self
            .inner
            .phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                (current != Phase::Stopping.code()).then_some(phase.code())
            });
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_code(self.inner.phase.load(Ordering::Acquire))
    }

    /// Whether the process's database answers (processes without one never call it).
    pub fn set_database_available(&self, available: bool) {
        self.inner
            .database_available
            .store(available, Ordering::Release);
    }

    /// Whether the last beat lies within `bound`.
    pub fn liveness(&self, bound: Duration) -> Liveness {
        self.liveness_at(self.inner.created.elapsed(), bound)
    }

    fn liveness_at(&self, now_since_created: Duration, bound: Duration) -> Liveness {
        let now = u64::try_from(now_since_created.as_millis()).unwrap_or(u64::MAX);
        let last = self
            .inner
            .last_beat
            .load(Ordering::Relaxed)
            .saturating_sub(1);
        let since_beat_ms = now.saturating_sub(last);
        let bound_ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        Liveness {
            alive: since_beat_ms <= bound_ms,
            since_beat_ms,
            bound_ms,
        }
    }

    /// Ready while running with the database (if any) available.
    pub fn readiness(&self) -> Readiness {
        let phase = self.phase();
        let reason = match phase {
            Phase::Starting => Some("starting up, not processing yet"),
            Phase::Restoring => Some("restoring partition state"),
            Phase::Stopping => Some("shutting down"),
            Phase::Running if !self.inner.database_available.load(Ordering::Acquire) => {
                Some("database unavailable")
            }
            Phase::Running => None,
        };
        Readiness {
            ready: reason.is_none(),
            phase,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_not_ready_and_becomes_ready_when_running() {
        let health = Health::new();
        assert_eq!(
            health.readiness(),
            Readiness {
                ready: false,
                phase: Phase::Starting,
                reason: Some("starting up, not processing yet"),
            }
        );
        health.set_phase(Phase::Restoring);
        assert!(!health.readiness().ready);
        assert_eq!(health.readiness().phase, Phase::Restoring);
        health.set_phase(Phase::Running);
        assert_eq!(
            health.readiness(),
            Readiness {
                ready: true,
                phase: Phase::Running,
                reason: None,
            }
        );
    }

    #[test]
    fn database_outage_makes_a_running_process_unready() {
        let health = Health::new();
        health.set_phase(Phase::Running);
        health.set_database_available(false);
        assert_eq!(health.readiness().reason, Some("database unavailable"));
        health.set_database_available(true);
        assert!(health.readiness().ready);
    }

    #[test]
    fn stopping_is_final() {
        let health = Health::new();
        let clone = health.clone();
        health.set_phase(Phase::Stopping);
        clone.set_phase(Phase::Running);
        assert_eq!(health.phase(), Phase::Stopping);
        assert_eq!(health.readiness().reason, Some("shutting down"));
    }

    #[test]
    fn liveness_measures_from_the_last_beat() {
        let health = Health::new();
        let bound = Duration::from_millis(1_000);
        // No beat yet: measured from creation.
        let at = health.liveness_at(Duration::from_millis(400), bound);
        assert_eq!((at.alive, at.since_beat_ms), (true, 400));
        let at = health.liveness_at(Duration::from_millis(1_001), bound);
        assert!(!at.alive);
        // A beat now (some ms after creation) resets the distance.
        health.beat();
        let beat_at = health.inner.last_beat.load(Ordering::Relaxed) - 1;
        let at = health.liveness_at(Duration::from_millis(beat_at + 1_000), bound);
        assert_eq!(
            (at.alive, at.since_beat_ms, at.bound_ms),
            (true, 1_000, 1_000)
        );
        let at = health.liveness_at(Duration::from_millis(beat_at + 1_001), bound);
        assert!(!at.alive);
    }
}
