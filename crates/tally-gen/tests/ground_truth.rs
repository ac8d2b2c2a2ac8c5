//! The generator's ground truth against an independent recount.
//!
//! The recount never looks at the class tags to classify: it decodes every record with
//! tally-core's `decode_record` + `validate_event`, checks routing, simulates each
//! partition's watermark from the records alone and applies the pipeline's rules
//! (rejected → too late → duplicate → counted on time or as a correction). It does so
//! under both readings of every boundary (inclusive and exclusive) and requires them to
//! agree, which proves the generator keeps its margins.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use tally_core::codec::{Decoded, decode_record};
use tally_core::event::{EventId, RequestStatus};
use tally_core::routing::partition_for_key;
use tally_core::validate::{ValidationLimits, validate_event};
use tally_gen::generator::{
    CHANNEL_PARTNERS, CLOUDS, ClassFractions, GeneratedRecord, Generator, GeneratorConfig,
    GroundTruth, MODELS, RecordClass, RejectKind, TokenSums,
};

/// A class derived from the records alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Derived {
    OnTime,
    OutOfOrder,
    Correction,
    TooLate,
    Duplicate,
    ConflictingDuplicate,
    Rejected(&'static str),
}

type WindowKey = (i64, String, String, String, Option<String>, String);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct WindowSums {
    on_time: TokenSums,
    correction: TokenSums,
    by_status: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Recount {
    classes: Vec<Derived>,
    windows: BTreeMap<WindowKey, WindowSums>,
    last_event_time_by_partition: BTreeMap<u32, i64>,
}

impl Recount {
    fn count(&self, wanted: impl Fn(&Derived) -> bool) -> u64 {
        self.classes.iter().filter(|class| wanted(class)).count() as u64
    }
}

fn window_end(event_time_ms: i64, window_ms: i64) -> i64 {
    event_time_ms.div_euclid(window_ms) * window_ms + window_ms
}

fn recount(records: &[GeneratedRecord], config: &GeneratorConfig) -> Recount {
    let limits = ValidationLimits::default();
    let (w, ooo, lateness, horizon) = (
        config.window_ms,
        config.max_out_of_orderness_ms,
        config.allowed_lateness_ms,
        config.correction_horizon_ms,
    );
    let mut max_event_time: HashMap<u32, i64> = HashMap::new();
    let mut seen: HashMap<EventId, &[u8]> = HashMap::new();
    let mut result = Recount::default();
    for record in records {
        let Some(key) = record.key.as_deref() else {
            panic!("every generated record has a key");
        };
        assert_eq!(
            record.partition,
            partition_for_key(key, config.partitions),
            "partition = murmur2(key)"
        );
        let event = match decode_record(&record.value) {
            Ok(Decoded::Usage(event)) => event,
            Ok(Decoded::Tick(_)) => panic!("the generator writes no ticks"),
            Err(error) => {
                result.classes.push(Derived::Rejected(error.reason()));
                continue;
            }
        };
        if let Err(error) = validate_event(&event, Some(record.timestamp_ms), &limits) {
            result.classes.push(Derived::Rejected(error.reason()));
            continue;
        }
        if key != event.tenant_id.as_bytes() {
            result.classes.push(Derived::Rejected("misrouted"));
            continue;
        }
        assert!(
            event.occurred_at_ms <= record.timestamp_ms,
            "event time after send time"
        );
        let partition_max = max_event_time.get(&record.partition).copied();
        let watermark = partition_max.map(|max| max - ooo);
        let end = window_end(event.occurred_at_ms, w);
        let too_late_exclusive = watermark.is_some_and(|wm| end < wm - lateness - horizon);
        let too_late_inclusive = watermark.is_some_and(|wm| end <= wm - lateness - horizon);
        assert_eq!(
            too_late_exclusive, too_late_inclusive,
            "a record sits on the too-late boundary"
        );
        if too_late_exclusive {
            result.classes.push(Derived::TooLate);
            continue;
        }
        if let Some(first) = seen.get(&event.event_id) {
            let class = if *first == record.value.as_slice() {
                Derived::Duplicate
            } else {
                Derived::ConflictingDuplicate
            };
            result.classes.push(class);
            continue;
        }
        seen.insert(event.event_id, &record.value);
        let closed_exclusive = watermark.is_some_and(|wm| wm > end + lateness);
        let closed_inclusive = watermark.is_some_and(|wm| wm >= end + lateness);
        assert_eq!(
            closed_exclusive, closed_inclusive,
            "a record sits on the window-close boundary"
        );
        let class = if closed_exclusive {
            Derived::Correction
        } else if partition_max.is_some_and(|max| event.occurred_at_ms < max) {
            Derived::OutOfOrder
        } else {
            Derived::OnTime
        };
        result.classes.push(class);
        let start = end - w;
        let key = (
            start,
            event.tenant_id.clone(),
            event.model.clone(),
            event.cloud.as_str().to_owned(),
            event.channel_partner.clone(),
            event.region.clone(),
        );
        let sums = result.windows.entry(key).or_default();
        if class == Derived::Correction {
            sums.correction.add_event(&event.tokens);
        } else {
            sums.on_time.add_event(&event.tokens);
        }
        *sums
            .by_status
            .entry(event.status.as_str().to_owned())
            .or_default() += 1;
        let new_max =
            partition_max.map_or(event.occurred_at_ms, |max| max.max(event.occurred_at_ms));
        max_event_time.insert(record.partition, new_max);
        result
            .last_event_time_by_partition
            .insert(record.partition, new_max);
    }
    result
}

fn tag_as_derived(class: RecordClass) -> Derived {
    match class {
        RecordClass::OnTime => Derived::OnTime,
        RecordClass::OutOfOrder => Derived::OutOfOrder,
        RecordClass::Correction => Derived::Correction,
        RecordClass::TooLate => Derived::TooLate,
        RecordClass::Duplicate => Derived::Duplicate,
        RecordClass::ConflictingDuplicate => Derived::ConflictingDuplicate,
        RecordClass::Rejected(kind) => Derived::Rejected(kind.expected_reason()),
    }
}

fn generate(config: &GeneratorConfig) -> (Vec<GeneratedRecord>, GroundTruth) {
    let mut generator = Generator::new(config.clone()).expect("valid config");
    let records: Vec<GeneratedRecord> = generator.by_ref().collect();
    (records, generator.truth())
}

/// Checks the truth against the recount; returns the recount for further checks.
fn assert_truth_matches_recount(
    config: &GeneratorConfig,
) -> (Vec<GeneratedRecord>, GroundTruth, Recount) {
    let (records, truth) = generate(config);
    let recount = recount(&records, config);

    assert_eq!(truth.produced, records.len() as u64);
    assert!(
        truth.is_conserved(),
        "produced = counted + duplicates + too_late + rejected"
    );
    assert_eq!(
        truth.counted_on_time,
        recount.count(|class| matches!(class, Derived::OnTime | Derived::OutOfOrder)),
        "counted on time"
    );
    assert_eq!(
        truth.out_of_order,
        recount.count(|class| *class == Derived::OutOfOrder),
        "out of order"
    );
    assert_eq!(
        truth.counted_corrections,
        recount.count(|class| *class == Derived::Correction),
        "corrections"
    );
    assert_eq!(
        truth.too_late,
        recount.count(|class| *class == Derived::TooLate),
        "too late"
    );
    assert_eq!(
        truth.duplicates,
        recount.count(|class| matches!(class, Derived::Duplicate | Derived::ConflictingDuplicate)),
        "duplicates"
    );
    assert_eq!(
        truth.conflicting_duplicates,
        recount.count(|class| *class == Derived::ConflictingDuplicate),
        "conflicting duplicates"
    );
    assert_eq!(
        truth.rejected,
        recount.count(|class| matches!(class, Derived::Rejected(_))),
        "rejected"
    );

    let mut truth_by_reason: BTreeMap<&str, u64> = BTreeMap::new();
    for kind in RejectKind::ALL {
        *truth_by_reason.entry(kind.expected_reason()).or_default() +=
            truth.rejected_by_kind[kind.as_str()];
    }
    truth_by_reason.retain(|_, count| *count > 0);
    let mut recount_by_reason: BTreeMap<&str, u64> = BTreeMap::new();
    for class in &recount.classes {
        if let Derived::Rejected(reason) = class {
            *recount_by_reason.entry(reason).or_default() += 1;
        }
    }
    assert_eq!(truth_by_reason, recount_by_reason);

    let truth_windows: BTreeMap<WindowKey, WindowSums> = truth
        .windows
        .iter()
        .map(|window| {
            assert_eq!(
                window.window_end_ms - window.window_start_ms,
                config.window_ms
            );
            let key = (
                window.window_start_ms,
                window.tenant_id.clone(),
                window.model.clone(),
                window.cloud.clone(),
                window.channel_partner.clone(),
                window.region.clone(),
            );
            let mut by_status = window.by_status.clone();
            by_status.retain(|_, count| *count > 0);
            let sums = WindowSums {
                on_time: window.on_time,
                correction: window.correction,
                by_status,
            };
            (key, sums)
        })
        .collect();
    assert_eq!(
        truth_windows.len(),
        truth.windows.len(),
        "window entries are unique"
    );
    assert_eq!(truth_windows, recount.windows, "token sums per window key");

    for partition in &truth.per_partition {
        assert_eq!(
            partition.last_event_time_ms,
            recount
                .last_event_time_by_partition
                .get(&partition.partition)
                .copied(),
            "partition {} clock",
            partition.partition
        );
        assert_eq!(
            partition.records,
            partition.counted + partition.duplicates + partition.too_late + partition.rejected
        );
        let produced_here = records
            .iter()
            .filter(|record| record.partition == partition.partition)
            .count();
        assert_eq!(partition.records, produced_here as u64);
    }
    assert_eq!(
        truth.per_partition.iter().map(|p| p.records).sum::<u64>(),
        truth.produced
    );

    // The derivation from bytes agrees with the generator's tag on every record.
    for (index, (record, derived)) in records.iter().zip(&recount.classes).enumerate() {
        assert_eq!(tag_as_derived(record.class), *derived, "record {index}");
    }
    (records, truth, recount)
}

fn small_config(seed: u64) -> GeneratorConfig {
    GeneratorConfig {
        seed,
        count: 40_000,
        ..GeneratorConfig::default()
    }
}

#[test]
fn truth_matches_an_independent_recount_with_default_fractions() {
    let config = small_config(1);
    let (_, truth, _) = assert_truth_matches_recount(&config);
    assert!(truth.corrections_enabled);
    assert!(
        truth.counted_corrections > 0
            && truth.too_late > 0
            && truth.duplicates > 0
            && truth.rejected > 0
    );
    assert!(truth.conflicting_duplicates > 0 && truth.out_of_order > 0);
}

#[test]
fn truth_matches_recount_under_heavy_disorder_and_few_partitions() {
    let config = GeneratorConfig {
        seed: 9,
        count: 30_000,
        partitions: 3,
        tenants: 7,
        rate_per_sec: 50,
        window_ms: 10_000,
        max_out_of_orderness_ms: 20_000,
        allowed_lateness_ms: 0,
        correction_horizon_ms: 300_000,
        fractions: ClassFractions {
            out_of_order: 0.5,
            correction: 0.2,
            too_late: 0.15,
            duplicate: 0.2,
            conflicting_duplicate: 0.5,
            rejected: 0.2,
        },
        schema_version: 2,
        ..GeneratorConfig::default()
    };
    let (_, truth, _) = assert_truth_matches_recount(&config);
    assert!(
        truth.counted_corrections > 1_000,
        "corrections placed: {}",
        truth.counted_corrections
    );
    assert!(
        truth.too_late > 1_000,
        "too late placed: {}",
        truth.too_late
    );
}

#[test]
fn disables_corrections_when_the_horizon_is_shorter_than_four_windows() {
    let config = GeneratorConfig {
        seed: 3,
        count: 10_000,
        correction_horizon_ms: 120_000,
        allowed_lateness_ms: 0,
        max_out_of_orderness_ms: 0,
        ..GeneratorConfig::default()
    };
    let (_, truth, _) = assert_truth_matches_recount(&config);
    assert!(!truth.corrections_enabled);
    assert_eq!(truth.counted_corrections, 0);
    assert_eq!(
        truth.out_of_order, 0,
        "no out-of-order events without out-of-orderness"
    );
    assert!(truth.too_late > 0 && truth.duplicates > 0);
}

#[test]
fn class_fractions_follow_the_configuration() {
    let config = GeneratorConfig {
        seed: 5,
        count: 100_000,
        ..GeneratorConfig::default()
    };
    let (_, truth) = generate(&config);
    let fraction_of = |count: u64| count as f64 / truth.produced as f64;
    // Fallbacks to on time happen only while a partition has no history, so every
    // class lands close to its fraction.
    assert!(
        (fraction_of(truth.counted_corrections) - 0.03).abs() < 0.005,
        "corrections {}",
        fraction_of(truth.counted_corrections)
    );
    assert!(
        (fraction_of(truth.too_late) - 0.02).abs() < 0.005,
        "too late {}",
        fraction_of(truth.too_late)
    );
    assert!(
        (fraction_of(truth.duplicates) - 0.03).abs() < 0.005,
        "duplicates {}",
        fraction_of(truth.duplicates)
    );
    assert!(
        (fraction_of(truth.rejected) - 0.02).abs() < 0.005,
        "rejected {}",
        fraction_of(truth.rejected)
    );
    for kind in RejectKind::ALL {
        assert!(
            truth.rejected_by_kind[kind.as_str()] > 0,
            "kind {} produced",
            kind.as_str()
        );
    }
}

#[test]
fn same_seed_gives_identical_records_and_truth() {
    let (first, first_truth) = generate(&small_config(77));
    let (second, second_truth) = generate(&small_config(77));
    assert_eq!(first, second);
    assert_eq!(first_truth, second_truth);
    let (other, _) = generate(&small_config(78));
    assert_ne!(first, other);
    let differing = first
        .iter()
        .zip(&other)
        .filter(|(a, b)| a.value != b.value)
        .count();
    assert!(
        differing > first.len() * 9 / 10,
        "a different seed changes nearly every record"
    );
}

#[test]
fn a_prefix_run_has_the_prefix_truth() {
    let long = GeneratorConfig {
        count: 8_000,
        ..small_config(11)
    };
    let short = GeneratorConfig {
        count: 5_000,
        ..small_config(11)
    };
    let mut generator = Generator::new(long).expect("valid config");
    let prefix: Vec<GeneratedRecord> = generator.by_ref().take(5_000).collect();
    let stopped_truth = generator.truth();
    let (short_records, short_truth) = generate(&short);
    assert_eq!(prefix, short_records);
    assert!(!stopped_truth.complete && short_truth.complete);
    assert_eq!(stopped_truth.windows, short_truth.windows);
    assert_eq!(stopped_truth.produced, short_truth.produced);
    assert_eq!(stopped_truth.rejected_by_kind, short_truth.rejected_by_kind);
}

#[test]
fn send_clock_advances_at_the_simulated_rate() {
    let config = GeneratorConfig {
        count: 3_001,
        rate_per_sec: 3,
        ..small_config(2)
    };
    let (records, truth) = generate(&config);
    for pair in records.windows(2) {
        assert!(
            pair[0].timestamp_ms <= pair[1].timestamp_ms,
            "kafka timestamps never go back"
        );
    }
    assert_eq!(records[0].timestamp_ms, config.start_time_ms);
    assert_eq!(records[1].timestamp_ms, config.start_time_ms + 333);
    assert_eq!(records[3].timestamp_ms, config.start_time_ms + 1_000);
    assert_eq!(
        truth.last_send_time_ms,
        Some(config.start_time_ms + 1_000_000)
    );
}

#[test]
fn each_rejected_kind_fails_with_its_reason() {
    let config = GeneratorConfig {
        count: 20_000,
        fractions: ClassFractions {
            rejected: 0.5,
            ..ClassFractions::default()
        },
        ..small_config(4)
    };
    let (records, _) = generate(&config);
    let limits = ValidationLimits::default();
    let mut seen_kinds = BTreeMap::new();
    for record in &records {
        let RecordClass::Rejected(kind) = record.class else {
            continue;
        };
        *seen_kinds.entry(kind.as_str()).or_insert(0) += 1;
        let key = record.key.as_deref().expect("rejected records keep a key");
        let reason = match decode_record(&record.value) {
            Err(error) => error.reason(),
            Ok(Decoded::Tick(_)) => "tick",
            Ok(Decoded::Usage(event)) => {
                match validate_event(&event, Some(record.timestamp_ms), &limits) {
                    Err(error) => error.reason(),
                    Ok(()) if key != event.tenant_id.as_bytes() => "misrouted",
                    Ok(()) => "valid",
                }
            }
        };
        assert_eq!(reason, kind.expected_reason(), "kind {}", kind.as_str());
    }
    assert_eq!(
        seen_kinds.len(),
        RejectKind::ALL.len(),
        "every kind generated: {seen_kinds:?}"
    );
}

#[test]
fn valid_events_use_only_the_catalogue() {
    let (records, _) = generate(&small_config(6));
    for record in &records {
        let Ok(Decoded::Usage(event)) = decode_record(&record.value) else {
            continue;
        };
        if matches!(record.class, RecordClass::Rejected(_)) {
            continue;
        }
        assert!(MODELS.contains(&event.model.as_str()));
        assert!(CLOUDS.contains(&event.cloud));
        assert!(
            event
                .channel_partner
                .as_deref()
                .is_none_or(|p| CHANNEL_PARTNERS.contains(&p))
        );
        assert!(event.status != RequestStatus::Unknown);
        assert!(event.tenant_id.starts_with("tenant-") && event.tenant_id.len() == 12);
        let tokens = event.tokens;
        match event.model.as_str() {
            "atlas-embed" => assert_eq!(
                (tokens.output, tokens.reasoning, tokens.cached_input),
                (0, 0, 0)
            ),
            "atlas-reasoning" => {}
            _ => assert_eq!(tokens.reasoning, 0),
        }
        assert!(tokens.input + tokens.cached_input <= 20_000);
    }
}

#[test]
fn truth_round_trips_through_json() {
    let (_, truth) = generate(&GeneratorConfig {
        count: 2_000,
        ..small_config(8)
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("truth.json");
    truth.write(&path).expect("write truth");
    assert_eq!(GroundTruth::read(&path).expect("read truth"), truth);
    let text = std::fs::read_to_string(&path).expect("read text");
    for field in [
        "\"counted\"",
        "\"duplicates\"",
        "\"too_late\"",
        "\"rejected\"",
        "\"rejected_by_kind\"",
        "\"windows\"",
    ] {
        assert!(text.contains(field), "{field} in the truth file");
    }
}

fn arbitrary_config() -> impl Strategy<Value = GeneratorConfig> {
    (
        any::<u64>(),
        1_u32..8,
        1_u32..60,
        1_u64..5_000,
        prop::sample::select(vec![1_000_i64, 10_000, 60_000, 300_000]),
        0_i64..30_000,
        0_i64..180_000,
        0_i64..7_200_000,
        (
            0.0..0.2_f64,
            0.0..0.2_f64,
            0.0..0.2_f64,
            0.0..0.2_f64,
            0.0..1.0_f64,
            0.0..1.0_f64,
        ),
    )
        .prop_map(
            |(seed, partitions, tenants, rate, window, ooo, lateness, horizon, fractions)| {
                let (
                    correction,
                    too_late,
                    duplicate,
                    rejected,
                    out_of_order,
                    conflicting_duplicate,
                ) = fractions;
                GeneratorConfig {
                    seed,
                    count: 3_000,
                    rate_per_sec: rate,
                    partitions,
                    tenants,
                    window_ms: window,
                    max_out_of_orderness_ms: ooo,
                    allowed_lateness_ms: lateness,
                    correction_horizon_ms: horizon,
                    fractions: ClassFractions {
                        out_of_order,
                        correction,
                        too_late,
                        duplicate,
                        conflicting_duplicate,
                        rejected,
                    },
                    ..GeneratorConfig::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn truth_matches_recount_for_any_config(config in arbitrary_config()) {
        assert_truth_matches_recount(&config);
    }
}
