//! Property tests of the hand-written codec: round trips of every record type, and
//! robustness of the decoder against arbitrary, truncated and corrupted input.

mod codec_common;

use codec_common::{
    aggregate, encoded_aggregate, encoded_event, encoded_tick, header, sample_aggregate,
    sample_event, tick, usage_event,
};
use proptest::prelude::*;
use tally_core::codec::{
    DecodeError, Decoded, DecodedRef, HEADER_LEN, SchemaId, decode_aggregate, decode_record,
    decode_record_ref,
};

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

/// Decodes with both entry points of `usage.events` and the aggregate decoder, and
/// checks the two `usage.events` decoders agree. Returns the owned result.
fn decode_every_way(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let owned = decode_record(bytes);
    let borrowed = decode_record_ref(bytes).map(|decoded| decoded.to_decoded());
    assert_eq!(owned, borrowed, "owned and borrowed decoding disagree");
    if let Err(error) = decode_aggregate(bytes) {
        assert!(DecodeError::REASONS.contains(&error.reason()));
    }
    if let Err(error) = &owned {
        assert!(DecodeError::REASONS.contains(&error.reason()));
    }
    owned
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn usage_event_v2_round_trips(event in usage_event()) {
        let bytes = encoded_event(&event, SchemaId::UsageEventV2);
        prop_assert_eq!(&bytes[..HEADER_LEN], &header(2)[..]);
        prop_assert_eq!(decode_record(&bytes), Ok(Decoded::Usage(event)));
    }

    #[test]
    fn usage_event_v1_round_trips_without_service_tier(event in usage_event()) {
        let bytes = encoded_event(&event, SchemaId::UsageEventV1);
        prop_assert_eq!(&bytes[..HEADER_LEN], &header(1)[..]);
        let expected = tally_core::event::UsageEvent { service_tier: None, ..event };
        prop_assert_eq!(decode_record(&bytes), Ok(Decoded::Usage(expected)));
    }

    #[test]
    fn borrowed_decoding_sees_the_same_event(event in usage_event()) {
        let bytes = encoded_event(&event, SchemaId::UsageEventV2);
        let Ok(DecodedRef::Usage(borrowed)) = decode_record_ref(&bytes) else {
            panic!("a usage event decodes as usage");
        };
        prop_assert_eq!(borrowed.tenant_id, event.tenant_id.as_str());
        prop_assert_eq!(borrowed.attributes.len(), event.attributes.len());
        let attributes: Vec<(&str, &str)> = borrowed.attributes.iter().collect();
        let expected: Vec<(&str, &str)> =
            event.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        prop_assert_eq!(attributes, expected);
        prop_assert_eq!(borrowed.to_event(), event);
    }

    #[test]
    fn tick_round_trips(tick in tick()) {
        let bytes = encoded_tick(&tick);
        prop_assert_eq!(&bytes[..HEADER_LEN], &header(3)[..]);
        prop_assert_eq!(decode_record(&bytes), Ok(Decoded::Tick(tick)));
    }

    #[test]
    fn aggregate_round_trips(row in aggregate()) {
        let bytes = encoded_aggregate(&row);
        prop_assert_eq!(&bytes[..HEADER_LEN], &header(4)[..]);
        prop_assert_eq!(decode_aggregate(&bytes), Ok(row));
    }

    #[test]
    fn arbitrary_bytes_decode_or_fail_with_a_typed_error(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = decode_every_way(&bytes);
    }

    #[test]
    fn arbitrary_datum_after_a_valid_header_decodes_or_fails_typed(
        schema in prop::sample::select(SchemaId::ALL.to_vec()),
        datum in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = header(schema.id());
        bytes.extend_from_slice(&datum);
        let decoded = decode_every_way(&bytes);
        if let Err(error) = decoded {
            // The header is valid, so the datum is what failed.
            prop_assert!(
                !matches!(error.reason(), "empty" | "too_short" | "bad_magic" | "unknown_schema_id"),
                "{error}"
            );
        }
    }

    #[test]
    fn every_strict_prefix_of_a_record_is_rejected(
        event in usage_event(),
        row in aggregate(),
        schema in prop::sample::select(vec![SchemaId::UsageEventV1, SchemaId::UsageEventV2]),
    ) {
        let event_bytes = encoded_event(&event, schema);
        for len in 0..event_bytes.len() {
            let error = decode_every_way(&event_bytes[..len]).expect_err("a prefix is incomplete");
            prop_assert!(matches!(error.reason(), "empty" | "too_short" | "malformed_datum"), "{error}");
        }
        let row_bytes = encoded_aggregate(&row);
        for len in 0..row_bytes.len() {
            let error = decode_aggregate(&row_bytes[..len]).expect_err("a prefix is incomplete");
            prop_assert!(matches!(error.reason(), "empty" | "too_short" | "malformed_datum"), "{error}");
        }
    }

    #[test]
    fn bit_flips_in_valid_records_never_panic(
        schema in prop::sample::select(SchemaId::ALL.to_vec()),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0..8u8), 1..4),
    ) {
        let mut bytes = match schema {
            SchemaId::UsageEventV1 | SchemaId::UsageEventV2 => encoded_event(&sample_event(), schema),
            SchemaId::UsageTickV1 => encoded_tick(&tally_core::event::UsageTick {
                tick_time_ms: 1_767_225_600_000,
                origin: tally_core::event::TickOrigin::Aggregator,
            }),
            SchemaId::BillingAggregateV1 => encoded_aggregate(&sample_aggregate()),
        };
        for (index, bit) in flips {
            let position = index.index(bytes.len());
            bytes[position] ^= 1 << bit;
        }
        let _ = decode_every_way(&bytes);
    }
}

/// A length or count prefix claiming far more data than the record holds must fail
/// at once, before any allocation or loop is sized by it.
#[test]
fn huge_length_and_count_prefixes_fail_without_allocating() {
    // Zig-zag varint of 2^61: a 2 EiB string.
    let huge = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40];
    let mut bytes = header(1);
    bytes.extend_from_slice(&huge);
    assert_eq!(
        decode_record(&bytes),
        Err(DecodeError::Malformed {
            field: "event_id",
            problem: "length runs past the datum"
        })
    );

    let event = sample_event();
    let valid = encoded_event(
        &tally_core::event::UsageEvent {
            attributes: Default::default(),
            ..event
        },
        SchemaId::UsageEventV1,
    );
    // The v1 datum ends with the empty attributes map: replace its zero count by 2^61.
    let mut bytes = valid[..valid.len() - 1].to_vec();
    bytes.extend_from_slice(&huge);
    assert_eq!(
        decode_record(&bytes),
        Err(DecodeError::Malformed {
            field: "attributes",
            problem: "block count exceeds the datum"
        })
    );

    // A row whose fields after `shares` all encode as single zero bytes: net_micros,
    // three empty strings, source_partition and four longs. The empty shares array's
    // zero count is then the tenth byte from the end.
    let mut row = sample_aggregate();
    row.shares.clear();
    row.net_micros = 0;
    row.price_book_version.clear();
    row.share_rule_version.clear();
    row.source_topic.clear();
    row.source_partition = 0;
    row.first_offset = 0;
    row.last_offset = 0;
    row.first_event_time_ms = 0;
    row.last_event_time_ms = 0;
    let valid = encoded_aggregate(&row);
    assert_eq!(decode_aggregate(&valid), Ok(row));
    assert_eq!(&valid[valid.len() - 10..], &[0u8; 10]);
    let mut bytes = valid[..valid.len() - 10].to_vec();
    bytes.extend_from_slice(&huge);
    bytes.extend_from_slice(&[0u8; 9]);
    assert_eq!(
        decode_aggregate(&bytes),
        Err(DecodeError::Malformed {
            field: "shares",
            problem: "block count exceeds the datum"
        })
    );
}
