//! The checkpoint carried in each partition's offset-commit metadata.
//!
//! Every transaction commits, with the next input offset `C` of each owned partition, a
//! compact JSON string (Kafka caps offset metadata at `offset.metadata.max.bytes`,
//! 4 096 bytes by default; [`MAX_METADATA_BYTES`] keeps ours inside it):
//!
//! ```json
//! {"v":2,"lw":1200,"lc":[wm,max,tick],"c":[8 counters],"d":[wm,max,tick,ids,panes,keys,windows,content],"ib":1767225061000,"s":"…"}
//! ```
//!
//! - `v`: format version (2);
//! - `lw`: the low-water offset `L`: the first offset of the oldest window (or pinned
//!   conflicting duplicate) that still has live state (see "Bounded restore" in
//!   `tally_core::partition`). A restore re-reads `[L, C)`;
//! - `lc`: the partition's clock just before `L` (watermark, largest counted event
//!   time, last tick time; `null` where none): what re-reading cannot rebuild;
//! - `c`: the cumulative [`PartitionCounters`] as of `C` (consumed, counted,
//!   corrections, duplicates, conflicting duplicates, too late, rejected, ticks), so
//!   conservation can be checked from Kafka alone; a restore takes them as they are;
//! - `d`: the [`StateDigest`] of the live state at `C`: its clock, the remembered ids,
//!   open panes, correction keys and live windows, and a hash of their content. A
//!   restore must rebuild exactly this, or the aggregator refuses to go on;
//! - `ib`: the idle base, wall-clock ms when the last event that moved the watermark
//!   (or the last tick) was read: a restarted aggregator measures a partition's idle
//!   time from it rather than from its own start. It only decides *when* a tick is
//!   written, never what a row contains;
//! - `s`: the semantics fingerprint: every setting and contract version the rows
//!   depend on (a restart whose semantics differ refuses to start).
//!
//! The same checkpoint, with its partition and committed offset, is written in the same
//! transaction to the retained checkpoints topic, so a replay can start from any past
//! checkpoint instead of from offset 0.
//!
//! The counters survive restarts and aborts exactly (they commit atomically with the
//! offsets and the outputs), unlike Prometheus counters.

use serde::{Deserialize, Serialize};
use tally_core::partition::{Clock, LowWater, PartitionCounters, StateDigest};

/// The only metadata format version written.
pub const CHECKPOINT_VERSION: u32 = 2;

/// Largest metadata string written (Kafka's default `offset.metadata.max.bytes`).
pub const MAX_METADATA_BYTES: usize = 4_096;

/// A partition's committed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Where a restore starts, and the clock before it.
    pub low_water: LowWater,
    /// Cumulative counters as of the committed offset.
    pub counters: PartitionCounters,
    /// The live state as of the committed offset.
    pub digest: StateDigest,
    /// Wall-clock ms when the last event that moved the watermark, or the last tick,
    /// was read (the base of the idle time before a tick is written).
    pub idle_base_ms: i64,
    /// The semantics fingerprint the state was built under (its own wire form).
    pub semantics: String,
}

/// Why offset-commit metadata is not a checkpoint this aggregator can trust.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Empty metadata: the offset was committed by something other than tally.
    #[error("the committed offset carries no checkpoint metadata")]
    Missing,
    /// Not the expected JSON shape.
    #[error("checkpoint metadata is malformed: {problem}")]
    Malformed {
        /// What the parser said.
        problem: String,
    },
    /// A version this build does not read.
    #[error(
        "checkpoint metadata version {version} is not supported (expected {CHECKPOINT_VERSION}); \
         the group was committed by another release: re-aggregate into a new output"
    )]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// A negative low-water offset.
    #[error("checkpoint low-water offset {low_water} is negative")]
    NegativeLowWater {
        /// The value found.
        low_water: i64,
    },
    /// The checkpoint does not fit the offset metadata limit.
    #[error(
        "checkpoint metadata is {bytes} bytes, more than the {MAX_METADATA_BYTES} Kafka keeps \
         (the semantics fingerprint is too large: fewer contract versions)"
    )]
    TooLarge {
        /// Its size.
        bytes: usize,
    },
}

/// The digest's wire form: the clock (watermark, largest counted event time, last
/// tick), then remembered ids, open panes, correction keys, live windows, content hash.
type DigestWire = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    u64,
    u64,
    u64,
    u64,
    u64,
);

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    v: u32,
    lw: i64,
    lc: [Option<i64>; 3],
    c: [u64; 8],
    d: DigestWire,
    ib: i64,
    s: String,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

fn clock_wire(clock: &Clock) -> [Option<i64>; 3] {
    [
        clock.watermark_ms,
        clock.max_event_time_ms,
        clock.last_tick_ms,
    ]
}

fn clock_from_wire([watermark_ms, max_event_time_ms, last_tick_ms]: [Option<i64>; 3]) -> Clock {
    Clock {
        watermark_ms,
        max_event_time_ms,
        last_tick_ms,
    }
}

impl Checkpoint {
    /// The metadata string committed with the offset. Fails when it would not fit
    /// Kafka's offset metadata limit.
    pub fn to_metadata(&self) -> Result<String, CheckpointError> {
        let c = self.counters;
        let d = &self.digest;
        let wire = Wire {
            v: CHECKPOINT_VERSION,
            lw: self.low_water.offset,
            lc: clock_wire(&self.low_water.clock),
            c: [
                c.consumed,
                c.counted,
                c.corrections,
                c.duplicates,
                c.conflicting_duplicates,
                c.too_late,
                c.rejected,
                c.ticks,
            ],
            d: (
                d.clock.watermark_ms,
                d.clock.max_event_time_ms,
                d.clock.last_tick_ms,
                d.remembered_ids,
                d.open_panes,
                d.correction_keys,
                d.live_windows,
                d.content,
            ),
            ib: self.idle_base_ms,
            s: self.semantics.clone(),
        };
        let text = serde_json::to_string(&wire).map_err(|error| CheckpointError::Malformed {
            problem: error.to_string(),
        })?;
        if text.len() > MAX_METADATA_BYTES {
            return Err(CheckpointError::TooLarge { bytes: text.len() });
        }
        Ok(text)
    }

    /// Parses committed offset metadata.
    pub fn from_metadata(metadata: &str) -> Result<Checkpoint, CheckpointError> {
        if metadata.is_empty() {
            return Err(CheckpointError::Missing);
        }
        let malformed = |error: serde_json::Error| CheckpointError::Malformed {
            problem: error.to_string(),
        };
        let version: VersionOnly = serde_json::from_str(metadata).map_err(malformed)?;
        if version.v != CHECKPOINT_VERSION {
            return Err(CheckpointError::UnsupportedVersion { version: version.v });
        }
        let wire: Wire = serde_json::from_str(metadata).map_err(malformed)?;
        if wire.lw < 0 {
            return Err(CheckpointError::NegativeLowWater { low_water: wire.lw });
        }
        let [
            consumed,
            counted,
            corrections,
            duplicates,
            conflicting_duplicates,
            too_late,
            rejected,
            ticks,
        ] = wire.c;
        let (watermark_ms, max_event_time_ms, last_tick_ms, ids, panes, keys, windows, content) =
            wire.d;
        Ok(Checkpoint {
            low_water: LowWater {
                offset: wire.lw,
                clock: clock_from_wire(wire.lc),
            },
            counters: PartitionCounters {
                consumed,
                counted,
                corrections,
                duplicates,
                conflicting_duplicates,
                too_late,
                rejected,
                ticks,
            },
            digest: StateDigest {
                clock: Clock {
                    watermark_ms,
                    max_event_time_ms,
                    last_tick_ms,
                },
                remembered_ids: ids,
                open_panes: panes,
                correction_keys: keys,
                live_windows: windows,
                content,
            },
            idle_base_ms: wire.ib,
            semantics: wire.s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            low_water: LowWater {
                offset: 1200,
                clock: Clock {
                    watermark_ms: Some(1_767_225_000_000),
                    max_event_time_ms: Some(1_767_225_005_000),
                    last_tick_ms: None,
                },
            },
            counters: PartitionCounters {
                consumed: 100,
                counted: 90,
                corrections: 3,
                duplicates: 4,
                conflicting_duplicates: 1,
                too_late: 2,
                rejected: 4,
                ticks: 7,
            },
            digest: StateDigest {
                clock: Clock {
                    watermark_ms: Some(1_767_225_060_000),
                    max_event_time_ms: Some(1_767_225_065_000),
                    last_tick_ms: Some(1_767_225_001_000),
                },
                remembered_ids: 80,
                open_panes: 12,
                correction_keys: 2,
                live_windows: 3,
                content: u64::MAX - 5,
            },
            idle_base_ms: 1_767_225_061_000,
            semantics: "w60000".to_owned(),
        }
    }

    #[test]
    fn round_trips_through_metadata() {
        let checkpoint = sample();
        let metadata = checkpoint.to_metadata().expect("fits");
        assert_eq!(
            metadata,
            r#"{"v":2,"lw":1200,"lc":[1767225000000,1767225005000,null],"c":[100,90,3,4,1,2,4,7],"d":[1767225060000,1767225065000,1767225001000,80,12,2,3,18446744073709551610],"ib":1767225061000,"s":"w60000"}"#
        );
        assert_eq!(Checkpoint::from_metadata(&metadata), Ok(checkpoint));
    }

    #[test]
    fn largest_numbers_fit_with_room_for_the_semantics() {
        let mut max = sample();
        max.low_water.offset = i64::MAX;
        max.low_water.clock = Clock {
            watermark_ms: Some(i64::MIN),
            max_event_time_ms: Some(i64::MIN),
            last_tick_ms: Some(i64::MIN),
        };
        max.counters = PartitionCounters {
            consumed: u64::MAX,
            counted: u64::MAX,
            corrections: u64::MAX,
            duplicates: u64::MAX,
            conflicting_duplicates: u64::MAX,
            too_late: u64::MAX,
            rejected: u64::MAX,
            ticks: u64::MAX,
        };
        max.digest.clock = max.low_water.clock;
        max.digest.remembered_ids = u64::MAX;
        max.digest.open_panes = u64::MAX;
        max.digest.correction_keys = u64::MAX;
        max.digest.live_windows = u64::MAX;
        max.idle_base_ms = i64::MIN;
        max.semantics = String::new();
        let without_semantics = max.to_metadata().expect("fits").len();
        assert!(without_semantics < 700, "{without_semantics} bytes");
        max.semantics = "x".repeat(MAX_METADATA_BYTES - without_semantics);
        let metadata = max.to_metadata().expect("fits exactly");
        assert_eq!(metadata.len(), MAX_METADATA_BYTES);
        assert_eq!(Checkpoint::from_metadata(&metadata), Ok(max.clone()));
        max.semantics.push('x');
        assert_eq!(
            max.to_metadata(),
            Err(CheckpointError::TooLarge {
                bytes: MAX_METADATA_BYTES + 1
            })
        );
    }

    #[test]
    fn refuses_empty_foreign_old_and_future_metadata() {
        assert_eq!(Checkpoint::from_metadata(""), Err(CheckpointError::Missing));
        assert!(matches!(
            Checkpoint::from_metadata("committed by a java app"),
            Err(CheckpointError::Malformed { .. })
        ));
        assert_eq!(
            Checkpoint::from_metadata(r#"{"v":1,"lw":0,"c":[0,0,0,0,0,0,0,0]}"#),
            Err(CheckpointError::UnsupportedVersion { version: 1 })
        );
        assert_eq!(
            Checkpoint::from_metadata(r#"{"v":3}"#),
            Err(CheckpointError::UnsupportedVersion { version: 3 })
        );
        let mut metadata = sample().to_metadata().expect("fits");
        metadata = metadata.replace(r#""lw":1200"#, r#""lw":-5"#);
        assert_eq!(
            Checkpoint::from_metadata(&metadata),
            Err(CheckpointError::NegativeLowWater { low_water: -5 })
        );
        let truncated = sample()
            .to_metadata()
            .expect("fits")
            .replace(r#","s":"w60000""#, "");
        assert!(matches!(
            Checkpoint::from_metadata(&truncated),
            Err(CheckpointError::Malformed { .. })
        ));
    }
}
