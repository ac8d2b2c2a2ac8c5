//! The replay's decisions as pure functions: which checkpoint a partition warms up
//! from, when a partition has read enough, which rows lie in the range, and whether
//! what-if contracts keep the live run's classification.

use std::collections::{BTreeMap, BTreeSet};

use tally_aggregator::Checkpoint;
use tally_core::contracts::Contracts;

/// A record of the checkpoints topic: the checkpoint committed with input offset
/// `committed_offset` of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointEntry {
    /// The committed offset `C`.
    pub committed_offset: i64,
    /// The checkpoint committed with it.
    pub checkpoint: Checkpoint,
}

/// Where a partition's replay starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmUp {
    /// Re-read `[L, C)` from the checkpoint's low water into a state resumed at its
    /// clock, check the rebuilt state against its digest, then go on from `C`.
    FromCheckpoint(Box<CheckpointEntry>),
    /// No checkpoint is early enough: read the partition from offset 0.
    FromStart,
}

/// The event-time parameters the decisions need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizons {
    /// Window size, ms.
    pub window_ms: i64,
    /// Allowed lateness, ms.
    pub allowed_lateness_ms: i64,
    /// Correction horizon, ms.
    pub correction_horizon_ms: i64,
}

impl Horizons {
    /// The watermark at which no window ending at or before `to_ms` can change any more:
    /// every event for it is too late (`end + lateness + correction`), and one more
    /// window boundary was crossed after the last event that could open a correction
    /// pane for it, so that pane closed too.
    pub fn settled_watermark(&self, to_ms: i64) -> i64 {
        to_ms
            .saturating_add(self.allowed_lateness_ms)
            .saturating_add(self.correction_horizon_ms)
            .saturating_add(self.window_ms)
    }

    /// Whether a state whose watermark is `watermark_ms` has not closed any on-time
    /// pane of a window starting at or after `from_ms` (so no row of such a window was
    /// emitted before it): on-time panes close at `end + lateness ≤ watermark`, and
    /// correction panes exist only after that.
    pub fn before_range(&self, watermark_ms: Option<i64>, from_ms: i64) -> bool {
        watermark_ms.is_none_or(|watermark| {
            watermark
                < from_ms
                    .saturating_add(self.window_ms)
                    .saturating_add(self.allowed_lateness_ms)
        })
    }
}

/// The latest checkpoint (largest committed offset) whose state at `C` had closed no
/// row of a window in the range, or [`WarmUp::FromStart`] when there is none.
/// `entries` may come in any order.
pub fn choose_warm_up(entries: &[CheckpointEntry], from_ms: i64, horizons: &Horizons) -> WarmUp {
    entries
        .iter()
        .filter(|entry| horizons.before_range(entry.checkpoint.digest.clock.watermark_ms, from_ms))
        .max_by_key(|entry| entry.committed_offset)
        .map_or(WarmUp::FromStart, |entry| {
            WarmUp::FromCheckpoint(Box::new(entry.clone()))
        })
}

/// The latest checkpoint committed at or before `start_offset`, or [`WarmUp::FromStart`].
/// A row closed before that checkpoint holds only records before it, so every row made
/// of records at or after `start_offset` is decided from the live state.
pub fn choose_warm_up_at_offset(entries: &[CheckpointEntry], start_offset: i64) -> WarmUp {
    entries
        .iter()
        .filter(|entry| entry.committed_offset <= start_offset)
        .max_by_key(|entry| entry.committed_offset)
        .map_or(WarmUp::FromStart, |entry| {
            WarmUp::FromCheckpoint(Box::new(entry.clone()))
        })
}

/// Whether a row made of the records `[first, last]` lies in the offsets `[start, end)`.
pub fn row_in_offsets(first_offset: i64, last_offset: i64, start: i64, end: i64) -> bool {
    first_offset >= start && last_offset < end
}

/// Parses `P:START-END,…` (END exclusive) into offsets by partition.
pub fn parse_offsets(text: &str) -> Result<BTreeMap<i32, (i64, i64)>, String> {
    let mut ranges = BTreeMap::new();
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let parsed = part.split_once(':').and_then(|(partition, range)| {
            let (start, end) = range.split_once('-')?;
            Some((
                partition.trim().parse::<i32>().ok()?,
                start.trim().parse::<i64>().ok()?,
                end.trim().parse::<i64>().ok()?,
            ))
        });
        let Some((partition, start, end)) = parsed else {
            return Err(format!("{part:?} is not PARTITION:START-END"));
        };
        if partition < 0 || start < 0 || end <= start {
            return Err(format!(
                "{part:?}: need partition >= 0 and 0 <= START < END"
            ));
        }
        if ranges.insert(partition, (start, end)).is_some() {
            return Err(format!("partition {partition} is given twice"));
        }
    }
    if ranges.is_empty() {
        return Err("no partition range given".to_owned());
    }
    Ok(ranges)
}

/// Whether a row of window `[start, end)` is in the range `[from, to)`.
pub fn row_in_range(window_start_ms: i64, window_end_ms: i64, from_ms: i64, to_ms: i64) -> bool {
    window_start_ms >= from_ms && window_end_ms <= to_ms
}

/// A difference between the production and the what-if contracts that would change
/// which events are rejected or which kind of row they count in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassificationChange {
    /// From when (UTC ms) the difference holds.
    pub from_ms: i64,
    /// What differs.
    pub what: String,
}

/// The differences between `production` and `what_if` that change classification:
/// where a price book is in force, which models it prices, which request statuses it
/// bills (the row kind is part of the live state), and where share rules are in force.
/// Prices, shares, currencies and version labels may differ freely. Each contract
/// section is a step function of time that changes only at some version's
/// `effective_from`, so comparing at every start of either side, and just before the
/// earliest one, covers all times.
pub fn classification_changes(
    production: &Contracts,
    what_if: &Contracts,
) -> Vec<ClassificationChange> {
    let mut starts: BTreeSet<i64> = BTreeSet::new();
    for contracts in [production, what_if] {
        starts.extend(contracts.price_book().iter().map(|v| v.effective_from_ms()));
        starts.extend(
            contracts
                .share_rules()
                .iter()
                .map(|v| v.effective_from_ms()),
        );
    }
    if production.window() != what_if.window() {
        return vec![ClassificationChange {
            from_ms: i64::MIN,
            what: "the contracts were loaded for another window size".to_owned(),
        }];
    }
    let mut times: Vec<i64> = Vec::with_capacity(starts.len() + 1);
    if let Some(first) = starts.first() {
        times.push(first.saturating_sub(1));
    }
    times.extend(starts);
    let mut changes = Vec::new();
    for time_ms in times {
        let before = production.price_book_at(time_ms);
        let after = what_if.price_book_at(time_ms);
        match (before, after) {
            (Some(before), Some(after)) => {
                let before_models: BTreeSet<&str> = before.models().map(|(name, _)| name).collect();
                let after_models: BTreeSet<&str> = after.models().map(|(name, _)| name).collect();
                for model in before_models.difference(&after_models) {
                    changes.push(ClassificationChange {
                        from_ms: time_ms,
                        what: format!("model {model:?} is priced by the live contracts and not by the what-if ones (its events would be rejected)"),
                    });
                }
                for model in after_models.difference(&before_models) {
                    changes.push(ClassificationChange {
                        from_ms: time_ms,
                        what: format!("model {model:?} is priced by the what-if contracts and not by the live ones (its rejected events would be counted)"),
                    });
                }
                if before.billable_statuses() != after.billable_statuses() {
                    changes.push(ClassificationChange {
                        from_ms: time_ms,
                        what: format!(
                            "billable statuses {:?} -> {:?} (events would count in rows of another kind)",
                            before.billable_statuses(),
                            after.billable_statuses()
                        ),
                    });
                }
            }
            (Some(_), None) => changes.push(ClassificationChange {
                from_ms: time_ms,
                what: "no what-if price book is in force where a live one is (events would be rejected)".to_owned(),
            }),
            (None, Some(_)) => changes.push(ClassificationChange {
                from_ms: time_ms,
                what: "a what-if price book is in force where no live one is (rejected events would be counted)".to_owned(),
            }),
            (None, None) => {}
        }
        let rules_before = production.share_rules_at(time_ms).is_some();
        let rules_after = what_if.share_rules_at(time_ms).is_some();
        if rules_before != rules_after {
            changes.push(ClassificationChange {
                from_ms: time_ms,
                what: if rules_before {
                    "no what-if share rules are in force where live ones are (events would be rejected)".to_owned()
                } else {
                    "what-if share rules are in force where no live ones are (rejected events would be counted)".to_owned()
                },
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use tally_core::partition::{Clock, LowWater, PartitionCounters, StateDigest};
    use tally_core::test_fixtures::{ATLAS_MINI_PRICES, CONTRACTS, load};

    use super::*;

    const HORIZONS: Horizons = Horizons {
        window_ms: 60_000,
        allowed_lateness_ms: 5_000,
        correction_horizon_ms: 600_000,
    };

    fn entry(committed_offset: i64, watermark_ms: Option<i64>) -> CheckpointEntry {
        CheckpointEntry {
            committed_offset,
            checkpoint: Checkpoint {
                low_water: LowWater {
                    offset: committed_offset / 2,
                    clock: Clock::default(),
                },
                counters: PartitionCounters::default(),
                digest: StateDigest {
                    clock: Clock {
                        watermark_ms,
                        ..Clock::default()
                    },
                    ..StateDigest::default()
                },
                idle_base_ms: 0,
                semantics: String::new(),
            },
        }
    }

    fn chosen(warm_up: &WarmUp) -> Option<i64> {
        match warm_up {
            WarmUp::FromCheckpoint(entry) => Some(entry.committed_offset),
            WarmUp::FromStart => None,
        }
    }

    #[test]
    fn warms_up_from_the_latest_checkpoint_that_closed_nothing_in_the_range() {
        let from = 600_000;
        // The first window of the range, [600 000, 660 000), closes its on-time pane at
        // watermark 665 000: a checkpoint at 664 999 is still usable, 665 000 is not.
        let entries = vec![
            entry(300, Some(665_000)),
            entry(100, Some(100_000)),
            entry(200, Some(664_999)),
            entry(400, Some(900_000)),
        ];
        assert_eq!(
            chosen(&choose_warm_up(&entries, from, &HORIZONS)),
            Some(200)
        );
        assert_eq!(chosen(&choose_warm_up(&entries, 0, &HORIZONS)), None);
        assert_eq!(
            chosen(&choose_warm_up(&[entry(50, None)], 0, &HORIZONS)),
            Some(50),
            "a checkpoint before any watermark closed nothing"
        );
        assert_eq!(chosen(&choose_warm_up(&[], from, &HORIZONS)), None);
    }

    #[test]
    fn offset_ranges_warm_up_from_a_checkpoint_at_or_before_their_start() {
        let entries = vec![
            entry(100, Some(1)),
            entry(250, Some(2)),
            entry(200, Some(3)),
        ];
        assert_eq!(chosen(&choose_warm_up_at_offset(&entries, 249)), Some(200));
        assert_eq!(chosen(&choose_warm_up_at_offset(&entries, 250)), Some(250));
        assert_eq!(chosen(&choose_warm_up_at_offset(&entries, 99)), None);
        assert!(row_in_offsets(10, 19, 10, 20));
        assert!(!row_in_offsets(9, 12, 10, 20));
        assert!(!row_in_offsets(12, 20, 10, 20));
        assert_eq!(
            parse_offsets("0:10-20, 3:0-5").expect("valid"),
            [(0, (10, 20)), (3, (0, 5))].into_iter().collect()
        );
        for bad in ["", "0:20-10", "x:1-2", "0:1-2,0:3-4", "1:5"] {
            assert!(parse_offsets(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_until_the_last_correction_pane_of_the_range_closed() {
        // to + lateness + correction horizon + one window.
        assert_eq!(HORIZONS.settled_watermark(1_200_000), 1_865_000);
        assert!(row_in_range(600_000, 660_000, 600_000, 1_200_000));
        assert!(row_in_range(1_140_000, 1_200_000, 600_000, 1_200_000));
        assert!(!row_in_range(540_000, 600_000, 600_000, 1_200_000));
        assert!(!row_in_range(1_200_000, 1_260_000, 600_000, 1_200_000));
    }

    #[test]
    fn accepts_what_if_contracts_that_change_only_prices_and_shares() {
        let what_if = CONTRACTS
            .replace("basis_points = 2000", "basis_points = 2500")
            .replace("input = 1\n", "input = 4\n")
            .replace("version = \"2025-01\"", "version = \"what-if\"");
        assert_ne!(what_if, CONTRACTS);
        assert_eq!(
            classification_changes(&load(CONTRACTS), &load(&what_if)),
            vec![]
        );
    }

    #[test]
    fn refuses_what_if_contracts_that_change_which_events_are_rejected() {
        // 2025-01-01T00:00:00Z, when the fixture's first price book starts.
        const JAN_2025_MS: i64 = 1_735_689_600_000;
        let live = load(CONTRACTS);
        let no_mini = CONTRACTS.replace(ATLAS_MINI_PRICES, "");
        // atlas-mini now starts with the second price book.
        let changes = classification_changes(&live, &load(&no_mini));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(changes[0].what.contains("atlas-mini"));
        assert_eq!(changes[0].from_ms, JAN_2025_MS);

        let later = CONTRACTS.replacen("2025-01-01T00:00:00Z", "2025-01-15T00:00:00Z", 1);
        let changes = classification_changes(&live, &load(&later));
        assert_eq!(changes.len(), 1, "two weeks without prices: {changes:?}");
        assert_eq!(changes[0].from_ms, JAN_2025_MS);

        // The first price book's statuses only: one change, where it starts.
        let billed = CONTRACTS.replacen(
            "billable_statuses = [\"succeeded\"]",
            "billable_statuses = [\"succeeded\", \"failed\"]",
            1,
        );
        let changes = classification_changes(&live, &load(&billed));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].from_ms, JAN_2025_MS);
    }
}
