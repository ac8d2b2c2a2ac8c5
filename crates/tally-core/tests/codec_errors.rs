//! One test per way a record can be rejected, by the decoder or by `validate_event`:
//! each asserts the exact `DecodeError` variant and its stable `reason()` label.
//!
//! Records are built here with a small independent Avro writer, field by field, so a
//! test can corrupt exactly one field.

mod codec_common;

use codec_common::{encoded_aggregate, encoded_event, header, sample_aggregate, sample_event};
use tally_core::codec::{
    DecodeError, Decoded, SchemaId, decode_aggregate, decode_record, encode_tick,
};
use tally_core::event::{Cloud, RequestStatus, TickOrigin, UsageEvent, UsageTick};
use tally_core::validate::{ValidationLimits, validate_event};

/// Avro long.
fn long(value: i64) -> Vec<u8> {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    let mut out = Vec::new();
    while zigzag >= 0x80 {
        out.push((zigzag as u8 & 0x7f) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
    out
}

/// Avro string/bytes.
fn bytes(value: &[u8]) -> Vec<u8> {
    let mut out = long(value.len() as i64);
    out.extend_from_slice(value);
    out
}

/// The fields of a valid UsageEvent v1 datum, in schema order.
fn usage_fields() -> Vec<(&'static str, Vec<u8>)> {
    let mut attributes = long(1);
    attributes.extend(bytes(b"api"));
    attributes.extend(bytes(b"chat"));
    attributes.extend(long(0));
    let mut partner = long(1);
    partner.extend(bytes(b"northwind"));
    vec![
        ("event_id", bytes(b"5f0c2a91-7d3e-4b8a-9c1f-0e6d42b7a913")),
        ("request_id", bytes(b"req_8Hq2LmZ0pX4vN7tR1sWc")),
        ("occurred_at", long(1_767_225_600_123)),
        ("tenant_id", bytes(b"tenant-00042")),
        ("model", bytes(b"atlas-large")),
        ("cloud", long(3)),
        ("channel_partner", partner),
        ("region", bytes(b"us-east-1")),
        ("input_tokens", long(1_843)),
        ("cached_input_tokens", long(512)),
        ("output_tokens", long(617)),
        ("reasoning_tokens", long(128)),
        ("status", long(1)),
        ("attributes", attributes),
    ]
}

/// A framed UsageEvent v1 record with `field` replaced by `replacement`.
fn usage_record_with(field: &str, replacement: Vec<u8>) -> Vec<u8> {
    let mut record = header(SchemaId::UsageEventV1.id());
    let mut replaced = false;
    for (name, encoded) in usage_fields() {
        if name == field {
            record.extend_from_slice(&replacement);
            replaced = true;
        } else {
            record.extend(encoded);
        }
    }
    assert!(replaced, "no field {field}");
    record
}

/// A framed BillingAggregate record whose `correction_seq` is `replacement`. The field's
/// position is found by encoding two rows that differ only there.
fn aggregate_record_with_correction_seq(replacement: Vec<u8>) -> Vec<u8> {
    let mut row = sample_aggregate();
    row.correction_seq = 0;
    let zero = encoded_aggregate(&row);
    row.correction_seq = 1;
    let one = encoded_aggregate(&row);
    let position = zero
        .iter()
        .zip(&one)
        .position(|(a, b)| a != b)
        .expect("the rows differ");
    let mut record = zero[..position].to_vec();
    record.extend(replacement);
    record.extend_from_slice(&zero[position + 1..]);
    record
}

fn assert_rejected(result: Result<Decoded, DecodeError>, expected: DecodeError, reason: &str) {
    let error = result.expect_err("the record is rejected");
    assert_eq!(error, expected);
    assert_eq!(error.reason(), reason);
    assert!(DecodeError::REASONS.contains(&reason));
}

fn malformed(field: &'static str, problem: &'static str) -> DecodeError {
    DecodeError::Malformed { field, problem }
}

#[test]
fn the_hand_built_record_is_valid() {
    let decoded = decode_record(&usage_record_with("status", long(1))).expect("valid record");
    let expected = UsageEvent {
        service_tier: None,
        ..sample_event()
    };
    assert_eq!(decoded, Decoded::Usage(expected));
}

#[test]
fn rejects_an_empty_record_value() {
    assert_rejected(decode_record(&[]), DecodeError::Empty, "empty");
    assert_eq!(decode_aggregate(&[]), Err(DecodeError::Empty));
}

#[test]
fn rejects_a_record_shorter_than_the_frame_header() {
    assert_rejected(
        decode_record(&[0, 0, 0, 1]),
        DecodeError::TooShort { len: 4 },
        "too_short",
    );
    assert_eq!(
        decode_aggregate(&[0]),
        Err(DecodeError::TooShort { len: 1 })
    );
}

#[test]
fn rejects_a_wrong_magic_byte() {
    let mut record = encoded_event(&sample_event(), SchemaId::UsageEventV1);
    record[0] = b'{';
    assert_rejected(
        decode_record(&record),
        DecodeError::BadMagic { found: b'{' },
        "bad_magic",
    );
}

#[test]
fn rejects_a_schema_id_outside_the_catalogue() {
    for id in [0, 5, 99, u32::MAX] {
        let mut record = header(id);
        record.extend_from_slice(&[0; 8]);
        assert_rejected(
            decode_record(&record),
            DecodeError::UnknownSchemaId { id },
            "unknown_schema_id",
        );
    }
}

#[test]
fn rejects_aggregates_on_usage_events_and_usage_on_aggregates() {
    assert_rejected(
        decode_record(&encoded_aggregate(&sample_aggregate())),
        DecodeError::UnexpectedSchema { id: 4 },
        "unexpected_schema",
    );
    let error = decode_aggregate(&encoded_event(&sample_event(), SchemaId::UsageEventV2))
        .expect_err("not an aggregate");
    assert_eq!(error, DecodeError::UnexpectedSchema { id: 2 });
    assert_eq!(error.reason(), "unexpected_schema");
    let mut tick = Vec::new();
    encode_tick(
        &UsageTick {
            tick_time_ms: 0,
            origin: TickOrigin::Gateway,
        },
        &mut tick,
    );
    assert_eq!(
        decode_aggregate(&tick),
        Err(DecodeError::UnexpectedSchema { id: 3 })
    );
}

#[test]
fn rejects_a_datum_truncated_inside_a_number() {
    let record = encoded_event(&sample_event(), SchemaId::UsageEventV1);
    assert_rejected(
        decode_record(&record[..record.len() - 1]),
        malformed("attributes", "datum ends inside a number"),
        "malformed_datum",
    );
    // Cut inside the multi-byte occurred_at varint.
    let mut record = usage_record_with("occurred_at", long(1_767_225_600_123));
    let cut = header(1).len()
        + bytes(b"5f0c2a91-7d3e-4b8a-9c1f-0e6d42b7a913").len()
        + bytes(b"req_8Hq2LmZ0pX4vN7tR1sWc").len()
        + 3;
    record.truncate(cut);
    assert_rejected(
        decode_record(&record),
        malformed("occurred_at", "datum ends inside a number"),
        "malformed_datum",
    );
}

#[test]
fn rejects_a_datum_truncated_inside_a_string() {
    let mut record = header(1);
    record.extend(long(36));
    record.extend_from_slice(b"5f0c2a91-7d3e");
    assert_rejected(
        decode_record(&record),
        malformed("event_id", "length runs past the datum"),
        "malformed_datum",
    );
}

#[test]
fn rejects_a_string_that_is_not_utf8() {
    assert_rejected(
        decode_record(&usage_record_with("request_id", bytes(&[b'r', 0xff, 0xfe]))),
        malformed("request_id", "string is not utf-8"),
        "malformed_datum",
    );
    // An overlong encoding of '/' is not UTF-8 either.
    assert_rejected(
        decode_record(&usage_record_with("region", bytes(&[0xc0, 0xaf]))),
        malformed("region", "string is not utf-8"),
        "malformed_datum",
    );
}

#[test]
fn rejects_a_union_branch_the_schema_does_not_have() {
    for branch in [2, -1, 1_000] {
        assert_rejected(
            decode_record(&usage_record_with("channel_partner", long(branch))),
            malformed("channel_partner", "union branch out of range"),
            "malformed_datum",
        );
    }
}

#[test]
fn rejects_a_varint_that_overflows_64_bits() {
    let mut ten_bytes = vec![0xff; 9];
    ten_bytes.push(0x02);
    assert_rejected(
        decode_record(&usage_record_with("occurred_at", ten_bytes)),
        malformed("occurred_at", "varint overflows 64 bits"),
        "malformed_datum",
    );
    let mut eleven_bytes = vec![0xff; 10];
    eleven_bytes.push(0x01);
    assert_rejected(
        decode_record(&usage_record_with("input_tokens", eleven_bytes)),
        malformed("input_tokens", "varint overflows 64 bits"),
        "malformed_datum",
    );
}

#[test]
fn rejects_a_negative_length() {
    assert_rejected(
        decode_record(&usage_record_with("tenant_id", long(-3))),
        malformed("tenant_id", "negative length"),
        "malformed_datum",
    );
}

#[test]
fn rejects_a_negative_enum_index() {
    assert_rejected(
        decode_record(&usage_record_with("cloud", long(-1))),
        malformed("cloud", "enum index out of range"),
        "malformed_datum",
    );
}

#[test]
fn rejects_an_int_outside_32_bits() {
    assert_eq!(
        decode_aggregate(&aggregate_record_with_correction_seq(long(
            i64::from(i32::MAX) + 1
        ))),
        Err(malformed("correction_seq", "int out of 32-bit range"))
    );
}

#[test]
fn rejects_enum_indexes_the_reader_has_no_symbol_for() {
    assert_rejected(
        decode_record(&usage_record_with("cloud", long(6))),
        DecodeError::UnknownEnumSymbol { field: "cloud" },
        "unknown_enum_symbol",
    );
    assert_rejected(
        decode_record(&usage_record_with("status", long(4))),
        DecodeError::UnknownEnumSymbol { field: "status" },
        "unknown_enum_symbol",
    );
    let mut tick = header(3);
    tick.extend(long(1_767_225_600_000));
    tick.extend(long(2));
    assert_rejected(
        decode_record(&tick),
        DecodeError::UnknownEnumSymbol { field: "origin" },
        "unknown_enum_symbol",
    );
}

#[test]
fn rejects_negative_token_counts() {
    assert_rejected(
        decode_record(&usage_record_with("input_tokens", long(-1))),
        DecodeError::FieldOutOfRange {
            field: "input_tokens",
            value: -1,
        },
        "field_out_of_range",
    );
    assert_rejected(
        decode_record(&usage_record_with("reasoning_tokens", long(i64::MIN))),
        DecodeError::FieldOutOfRange {
            field: "reasoning_tokens",
            value: i64::MIN,
        },
        "field_out_of_range",
    );
}

#[test]
fn rejects_a_negative_correction_sequence() {
    let error = decode_aggregate(&aggregate_record_with_correction_seq(long(-1)))
        .expect_err("negative correction_seq");
    assert_eq!(
        error,
        DecodeError::FieldOutOfRange {
            field: "correction_seq",
            value: -1
        }
    );
    assert_eq!(error.reason(), "field_out_of_range");
}

#[test]
fn rejects_an_event_id_that_is_not_a_canonical_uuid() {
    for text in [
        &b"not-a-uuid"[..],
        b"5f0c2a917d3e4b8a9c1f0e6d42b7a913",
        b"5f0c2a91-7d3e-4b8a-9c1f-0e6d42b7a91g",
        b"{5f0c2a91-7d3e-4b8a-9c1f-0e6d42b7a91}",
        b"",
    ] {
        assert_rejected(
            decode_record(&usage_record_with("event_id", bytes(text))),
            DecodeError::InvalidEventId,
            "invalid_event_id",
        );
    }
}

#[test]
fn rejects_bytes_after_the_datum() {
    let mut record = encoded_event(&sample_event(), SchemaId::UsageEventV1);
    record.push(0);
    assert_rejected(
        decode_record(&record),
        DecodeError::TrailingBytes { count: 1 },
        "trailing_bytes",
    );
    let mut row = encoded_aggregate(&sample_aggregate());
    row.extend_from_slice(&[1, 2, 3]);
    assert_eq!(
        decode_aggregate(&row),
        Err(DecodeError::TrailingBytes { count: 3 })
    );
}

#[test]
fn rejects_a_v2_datum_labelled_as_v1() {
    // The v2 datum's service_tier (here "priority": branch byte, length, 8 bytes) is
    // left over when it is read as v1.
    let mut record = encoded_event(&sample_event(), SchemaId::UsageEventV2);
    record[4] = 1;
    assert_rejected(
        decode_record(&record),
        DecodeError::TrailingBytes { count: 10 },
        "trailing_bytes",
    );
}

#[test]
fn decodes_the_unknown_symbols_and_leaves_them_to_validation() {
    let record = usage_record_with("cloud", long(0));
    let Ok(Decoded::Usage(event)) = decode_record(&record) else {
        panic!("index 0 is a symbol of the schema");
    };
    assert_eq!(event.cloud, Cloud::Unknown);
    assert_eq!(
        validate_event(
            &event,
            Some(event.occurred_at_ms),
            &ValidationLimits::default()
        ),
        Err(DecodeError::UnknownEnumSymbol { field: "cloud" })
    );
}

const SENT_AT_MS: i64 = 1_767_225_600_000;

fn assert_invalid(
    event: &UsageEvent,
    kafka_timestamp_ms: Option<i64>,
    expected: DecodeError,
    reason: &str,
) {
    let error = validate_event(event, kafka_timestamp_ms, &ValidationLimits::default())
        .expect_err("the event is invalid");
    assert_eq!(error, expected);
    assert_eq!(error.reason(), reason);
}

fn event_at(occurred_at_ms: i64) -> UsageEvent {
    UsageEvent {
        occurred_at_ms,
        ..sample_event()
    }
}

#[test]
fn validation_accepts_a_plausible_event() {
    let limits = ValidationLimits::default();
    assert_eq!(
        validate_event(&event_at(SENT_AT_MS), Some(SENT_AT_MS), &limits),
        Ok(())
    );
    let mut at_limit = event_at(SENT_AT_MS);
    at_limit.tokens.output = limits.max_tokens_per_kind;
    assert_eq!(validate_event(&at_limit, Some(SENT_AT_MS), &limits), Ok(()));
}

#[test]
fn validation_rejects_absurd_token_counts() {
    let mut event = event_at(SENT_AT_MS);
    event.tokens.output = ValidationLimits::DEFAULT_MAX_TOKENS_PER_KIND + 1;
    assert_invalid(
        &event,
        Some(SENT_AT_MS),
        DecodeError::FieldOutOfRange {
            field: "output_tokens",
            value: 100_000_001,
        },
        "field_out_of_range",
    );
    let mut event = event_at(SENT_AT_MS);
    event.tokens.cached_input = u64::MAX;
    assert_invalid(
        &event,
        Some(SENT_AT_MS),
        DecodeError::FieldOutOfRange {
            field: "cached_input_tokens",
            value: i64::MAX,
        },
        "field_out_of_range",
    );
}

#[test]
fn validation_rejects_the_unknown_cloud_and_status() {
    let event = UsageEvent {
        cloud: Cloud::Unknown,
        ..event_at(SENT_AT_MS)
    };
    assert_invalid(
        &event,
        Some(SENT_AT_MS),
        DecodeError::UnknownEnumSymbol { field: "cloud" },
        "unknown_enum_symbol",
    );
    let event = UsageEvent {
        status: RequestStatus::Unknown,
        ..event_at(SENT_AT_MS)
    };
    assert_invalid(
        &event,
        Some(SENT_AT_MS),
        DecodeError::UnknownEnumSymbol { field: "status" },
        "unknown_enum_symbol",
    );
}

#[test]
fn validation_rejects_an_empty_tenant_or_model() {
    let event = UsageEvent {
        tenant_id: String::new(),
        ..event_at(SENT_AT_MS)
    };
    assert_invalid(
        &event,
        Some(SENT_AT_MS),
        DecodeError::EmptyField { field: "tenant_id" },
        "empty_field",
    );
    let event = UsageEvent {
        model: String::new(),
        ..event_at(SENT_AT_MS)
    };
    assert_invalid(
        &event,
        Some(SENT_AT_MS),
        DecodeError::EmptyField { field: "model" },
        "empty_field",
    );
}

#[test]
fn validation_rejects_a_record_without_kafka_timestamp() {
    assert_invalid(
        &event_at(SENT_AT_MS),
        None,
        DecodeError::MissingTimestamp,
        "missing_timestamp",
    );
}

#[test]
fn validation_bounds_event_time_ahead_of_the_kafka_timestamp() {
    let limits = ValidationLimits::default();
    let at_limit = SENT_AT_MS + limits.max_event_time_ahead_ms;
    assert_eq!(
        validate_event(&event_at(at_limit), Some(SENT_AT_MS), &limits),
        Ok(())
    );
    assert_invalid(
        &event_at(at_limit + 1),
        Some(SENT_AT_MS),
        DecodeError::EventTimeOutOfBounds {
            occurred_at_ms: at_limit + 1,
            kafka_timestamp_ms: SENT_AT_MS,
        },
        "event_time_out_of_bounds",
    );
}

#[test]
fn validation_bounds_event_time_behind_the_kafka_timestamp() {
    let limits = ValidationLimits::default();
    let at_limit = SENT_AT_MS - limits.max_event_time_behind_ms;
    assert_eq!(
        validate_event(&event_at(at_limit), Some(SENT_AT_MS), &limits),
        Ok(())
    );
    assert_invalid(
        &event_at(at_limit - 1),
        Some(SENT_AT_MS),
        DecodeError::EventTimeOutOfBounds {
            occurred_at_ms: at_limit - 1,
            kafka_timestamp_ms: SENT_AT_MS,
        },
        "event_time_out_of_bounds",
    );
}

#[test]
fn validation_rejects_extreme_event_times_without_overflow() {
    for (occurred_at_ms, sent_at_ms) in [
        (i64::MIN, SENT_AT_MS),
        (i64::MAX, SENT_AT_MS),
        (i64::MIN, i64::MAX),
        (i64::MAX, i64::MIN),
    ] {
        assert_invalid(
            &event_at(occurred_at_ms),
            Some(sent_at_ms),
            DecodeError::EventTimeOutOfBounds {
                occurred_at_ms,
                kafka_timestamp_ms: sent_at_ms,
            },
            "event_time_out_of_bounds",
        );
    }
}
