//! The checkpoint carried in each partition's offset-commit metadata.
//!
//! Every transaction commits, with the next input offset of each owned partition, a
//! compact JSON string (Kafka limits offset metadata to 4 KB by default; ours is under
//! 200 bytes):
//!
//! ```json
//! {"v":1,"lw":1200,"c":[consumed,counted,corrections,duplicates,conflicting,too_late,rejected,ticks]}
//! ```
//!
//! - `v`: format version (1);
//! - `lw`: the low-water offset, the first offset this group ever consumed for the
//!   partition. Restore rebuilds the partition's state by re-reading `[lw, committed)`;
//! - `c`: the partition's cumulative [`PartitionCounters`] as of the committed offset,
//!   so conservation (`consumed = counted + duplicates + too_late + rejected`) can be
//!   checked from Kafka alone, and a restore can prove it rebuilt the same state.
//!
//! The counters survive restarts and aborts exactly (they commit atomically with the
//! offsets and the outputs), unlike Prometheus counters.

use serde::{Deserialize, Serialize};
use tally_core::partition::PartitionCounters;

/// The only metadata format version written.
pub const CHECKPOINT_VERSION: u32 = 1;

/// A partition's committed checkpoint: low-water offset and cumulative counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// First offset this group consumed for the partition.
    pub low_water: i64,
    /// Cumulative counters as of the committed offset.
    pub counters: PartitionCounters,
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
        "checkpoint metadata version {version} is not supported (expected {CHECKPOINT_VERSION})"
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
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    v: u32,
    lw: i64,
    c: [u64; 8],
}

impl Checkpoint {
    /// The metadata string committed with the offset.
    pub fn to_metadata(&self) -> String {
        let c = self.counters;
        let wire = Wire {
            v: CHECKPOINT_VERSION,
            lw: self.low_water,
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
        };
        // Serialising a struct of integers cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses committed offset metadata.
    pub fn from_metadata(metadata: &str) -> Result<Checkpoint, CheckpointError> {
        if metadata.is_empty() {
            return Err(CheckpointError::Missing);
        }
        let wire: Wire =
            serde_json::from_str(metadata).map_err(|error| CheckpointError::Malformed {
                problem: error.to_string(),
            })?;
        if wire.v != CHECKPOINT_VERSION {
            return Err(CheckpointError::UnsupportedVersion { version: wire.v });
        }
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
        Ok(Checkpoint {
            low_water: wire.lw,
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            low_water: 1200,
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
        }
    }

    #[test]
    fn round_trips_through_metadata() {
        let checkpoint = sample();
        let metadata = checkpoint.to_metadata();
        assert_eq!(metadata, r#"{"v":1,"lw":1200,"c":[100,90,3,4,1,2,4,7]}"#);
        assert_eq!(Checkpoint::from_metadata(&metadata), Ok(checkpoint));
    }

    #[test]
    fn largest_metadata_fits_kafka_limit() {
        let max = Checkpoint {
            low_water: i64::MAX,
            counters: PartitionCounters {
                consumed: u64::MAX,
                counted: u64::MAX,
                corrections: u64::MAX,
                duplicates: u64::MAX,
                conflicting_duplicates: u64::MAX,
                too_late: u64::MAX,
                rejected: u64::MAX,
                ticks: u64::MAX,
            },
        };
        assert!(max.to_metadata().len() < 4096);
        assert_eq!(Checkpoint::from_metadata(&max.to_metadata()), Ok(max));
    }

    #[test]
    fn refuses_empty_foreign_and_future_metadata() {
        assert_eq!(Checkpoint::from_metadata(""), Err(CheckpointError::Missing));
        assert!(matches!(
            Checkpoint::from_metadata("committed by a java app"),
            Err(CheckpointError::Malformed { .. })
        ));
        assert!(matches!(
            Checkpoint::from_metadata(r#"{"v":1,"lw":0,"c":[1,2,3]}"#),
            Err(CheckpointError::Malformed { .. })
        ));
        assert_eq!(
            Checkpoint::from_metadata(r#"{"v":2,"lw":0,"c":[0,0,0,0,0,0,0,0]}"#),
            Err(CheckpointError::UnsupportedVersion { version: 2 })
        );
        assert_eq!(
            Checkpoint::from_metadata(r#"{"v":1,"lw":-5,"c":[0,0,0,0,0,0,0,0]}"#),
            Err(CheckpointError::NegativeLowWater { low_water: -5 })
        );
    }
}
