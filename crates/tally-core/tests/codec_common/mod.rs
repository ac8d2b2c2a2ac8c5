//! Shared generators and `apache-avro` value builders for the codec tests.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};

use apache_avro::types::Value;
use proptest::prelude::*;
use tally_core::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use tally_core::codec::{SchemaId, encode_aggregate, encode_tick, encode_usage_event};
use tally_core::event::{
    Cloud, EventId, RequestStatus, TickOrigin, TokenCounts, UsageEvent, UsageTick,
};

/// Any text, unicode and control characters included.
pub fn text() -> impl Strategy<Value = String> {
    "(?s).{0,24}"
}

/// A count a `long` can carry.
pub fn count() -> impl Strategy<Value = u64> {
    prop_oneof![0..=1_000_000u64, 0..=i64::MAX as u64]
}

pub fn tokens() -> impl Strategy<Value = TokenCounts> {
    (count(), count(), count(), count()).prop_map(|(input, cached_input, output, reasoning)| {
        TokenCounts {
            input,
            cached_input,
            output,
            reasoning,
        }
    })
}

pub fn cloud() -> impl Strategy<Value = Cloud> {
    prop::sample::select(Cloud::ALL.to_vec())
}

pub fn status() -> impl Strategy<Value = RequestStatus> {
    prop::sample::select(RequestStatus::ALL.to_vec())
}

/// Any valid usage event.
pub fn usage_event() -> impl Strategy<Value = UsageEvent> {
    (
        (any::<u128>(), text(), any::<i64>(), text(), text(), cloud()),
        (
            prop::option::of(text()),
            text(),
            tokens(),
            status(),
            prop::collection::btree_map(text(), text(), 0..4),
            prop::option::of(text()),
        ),
    )
        .prop_map(
            |(
                (event_id, request_id, occurred_at_ms, tenant_id, model, cloud),
                (channel_partner, region, tokens, status, attributes, service_tier),
            )| UsageEvent {
                event_id: EventId(event_id),
                request_id,
                occurred_at_ms,
                tenant_id,
                model,
                cloud,
                channel_partner,
                region,
                tokens,
                status,
                attributes,
                service_tier,
            },
        )
}

pub fn tick() -> impl Strategy<Value = UsageTick> {
    (
        any::<i64>(),
        prop::sample::select(vec![TickOrigin::Gateway, TickOrigin::Aggregator]),
    )
        .prop_map(|(tick_time_ms, origin)| UsageTick {
            tick_time_ms,
            origin,
        })
}

/// An `int` a u32 domain field can carry.
pub fn non_negative_int() -> impl Strategy<Value = u32> {
    0..=i32::MAX as u32
}

pub fn share() -> impl Strategy<Value = PartnerShare> {
    (text(), non_negative_int(), any::<i64>()).prop_map(
        |(beneficiary, basis_points, amount_micros)| PartnerShare {
            beneficiary,
            basis_points,
            amount_micros,
        },
    )
}

/// Any valid billing row.
pub fn aggregate() -> impl Strategy<Value = BillingAggregate> {
    (
        (
            text(),
            any::<i64>(),
            any::<i64>(),
            (text(), text(), cloud(), prop::option::of(text()), text()),
            prop::sample::select(vec![RowKind::Billable, RowKind::NonBillable]),
            non_negative_int(),
            count(),
        ),
        (
            tokens(),
            text(),
            any::<i64>(),
            prop::collection::vec(share(), 0..4),
            any::<i64>(),
            text(),
            text(),
        ),
        (
            text(),
            any::<i32>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
        ),
    )
        .prop_map(
            |(
                (id, window_start_ms, window_end_ms, dims, row_kind, correction_seq, event_count),
                (
                    tokens,
                    currency,
                    gross_micros,
                    shares,
                    net_micros,
                    price_book_version,
                    share_rule_version,
                ),
                (
                    source_topic,
                    source_partition,
                    first_offset,
                    last_offset,
                    first_event_time_ms,
                    last_event_time_ms,
                ),
            )| {
                let (tenant_id, model, cloud, channel_partner, region) = dims;
                BillingAggregate {
                    id,
                    window_start_ms,
                    window_end_ms,
                    dims: Dims {
                        tenant_id,
                        model,
                        cloud,
                        channel_partner,
                        region,
                    },
                    row_kind,
                    correction_seq,
                    event_count,
                    tokens,
                    currency,
                    gross_micros,
                    shares,
                    net_micros,
                    price_book_version,
                    share_rule_version,
                    source_topic,
                    source_partition,
                    first_offset,
                    last_offset,
                    first_event_time_ms,
                    last_event_time_ms,
                }
            },
        )
}

/// A typical gateway event.
pub fn sample_event() -> UsageEvent {
    UsageEvent {
        event_id: EventId(0x5f0c_2a91_7d3e_4b8a_9c1f_0e6d_42b7_a913),
        request_id: "req_8Hq2LmZ0pX4vN7tR1sWc".to_owned(),
        occurred_at_ms: 1_767_225_600_123,
        tenant_id: "tenant-00042".to_owned(),
        model: "atlas-large".to_owned(),
        cloud: Cloud::Aws,
        channel_partner: Some("northwind".to_owned()),
        region: "us-east-1".to_owned(),
        tokens: TokenCounts {
            input: 1_843,
            cached_input: 512,
            output: 617,
            reasoning: 128,
        },
        status: RequestStatus::Succeeded,
        attributes: BTreeMap::from([("api".to_owned(), "chat".to_owned())]),
        service_tier: Some("priority".to_owned()),
    }
}

/// A typical billing row.
pub fn sample_aggregate() -> BillingAggregate {
    BillingAggregate {
        id: "3f9a0c6e1b2d4e5f8a7b6c5d4e3f2a1b".to_owned(),
        window_start_ms: 1_767_225_600_000,
        window_end_ms: 1_767_225_660_000,
        dims: Dims {
            tenant_id: "tenant-00042".to_owned(),
            model: "atlas-large".to_owned(),
            cloud: Cloud::Aws,
            channel_partner: Some("northwind".to_owned()),
            region: "us-east-1".to_owned(),
        },
        row_kind: RowKind::Billable,
        correction_seq: 1,
        event_count: 1_204,
        tokens: TokenCounts {
            input: 2_219_000,
            cached_input: 616_448,
            output: 742_868,
            reasoning: 154_112,
        },
        currency: "USD".to_owned(),
        gross_micros: 18_422_117,
        shares: vec![PartnerShare {
            beneficiary: "northwind".to_owned(),
            basis_points: 2_000,
            amount_micros: 3_684_423,
        }],
        net_micros: 14_737_694,
        price_book_version: "2026-01-01".to_owned(),
        share_rule_version: "2026-01-01".to_owned(),
        source_topic: "usage.events".to_owned(),
        source_partition: 7,
        first_offset: 1_048_576,
        last_offset: 1_049_779,
        first_event_time_ms: 1_767_225_600_004,
        last_event_time_ms: 1_767_225_659_998,
    }
}

pub fn encoded_event(event: &UsageEvent, schema: SchemaId) -> Vec<u8> {
    let mut out = Vec::new();
    encode_usage_event(event, schema, &mut out);
    out
}

pub fn encoded_tick(tick: &UsageTick) -> Vec<u8> {
    let mut out = Vec::new();
    encode_tick(tick, &mut out);
    out
}

pub fn encoded_aggregate(row: &BillingAggregate) -> Vec<u8> {
    let mut out = Vec::new();
    encode_aggregate(row, &mut out);
    out
}

/// The Confluent header for `schema`.
pub fn header(schema_id: u32) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&schema_id.to_be_bytes());
    out
}

fn enum_value(index: u32, symbol: &str) -> Value {
    Value::Enum(index, symbol.to_owned())
}

fn optional_string(value: Option<&str>) -> Value {
    match value {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(text) => Value::Union(1, Box::new(Value::String(text.to_owned()))),
    }
}

fn long(value: u64) -> Value {
    Value::Long(i64::try_from(value).expect("generated counts fit a long"))
}

fn int(value: u32) -> Value {
    Value::Int(i32::try_from(value).expect("generated ints fit an int"))
}

/// How an `event_id` is given to `apache-avro`.
#[derive(Debug, Clone, Copy)]
pub enum UuidForm {
    /// `Value::Uuid`, what `apache-avro` decodes a `uuid` string into.
    Uuid,
    /// `Value::String` of the canonical text in upper case.
    UpperCaseText,
}

/// `event` as the `apache-avro` record of the UsageEvent schema `schema`, fields in
/// `.avsc` order.
pub fn usage_event_value(event: &UsageEvent, schema: SchemaId, uuid: UuidForm) -> Value {
    let event_id = match uuid {
        UuidForm::Uuid => Value::Uuid(apache_avro::Uuid::from_u128(event.event_id.0)),
        UuidForm::UpperCaseText => Value::String(event.event_id.to_string().to_uppercase()),
    };
    let mut fields = vec![
        ("event_id".to_owned(), event_id),
        (
            "request_id".to_owned(),
            Value::String(event.request_id.clone()),
        ),
        (
            "occurred_at".to_owned(),
            Value::TimestampMillis(event.occurred_at_ms),
        ),
        (
            "tenant_id".to_owned(),
            Value::String(event.tenant_id.clone()),
        ),
        ("model".to_owned(), Value::String(event.model.clone())),
        (
            "cloud".to_owned(),
            enum_value(event.cloud.index(), event.cloud.as_str()),
        ),
        (
            "channel_partner".to_owned(),
            optional_string(event.channel_partner.as_deref()),
        ),
        ("region".to_owned(), Value::String(event.region.clone())),
        ("input_tokens".to_owned(), long(event.tokens.input)),
        (
            "cached_input_tokens".to_owned(),
            long(event.tokens.cached_input),
        ),
        ("output_tokens".to_owned(), long(event.tokens.output)),
        ("reasoning_tokens".to_owned(), long(event.tokens.reasoning)),
        (
            "status".to_owned(),
            enum_value(event.status.index(), event.status.as_str()),
        ),
        (
            "attributes".to_owned(),
            Value::Map(
                event
                    .attributes
                    .iter()
                    .map(|(key, value)| (key.clone(), Value::String(value.clone())))
                    .collect::<HashMap<_, _>>(),
            ),
        ),
    ];
    if schema == SchemaId::UsageEventV2 {
        fields.push((
            "service_tier".to_owned(),
            optional_string(event.service_tier.as_deref()),
        ));
    }
    Value::Record(fields)
}

pub fn tick_value(tick: &UsageTick) -> Value {
    let origin = match tick.origin {
        TickOrigin::Gateway => 0,
        TickOrigin::Aggregator => 1,
    };
    Value::Record(vec![
        (
            "tick_time".to_owned(),
            Value::TimestampMillis(tick.tick_time_ms),
        ),
        (
            "origin".to_owned(),
            enum_value(origin, tick.origin.as_str()),
        ),
    ])
}

pub fn aggregate_value(row: &BillingAggregate) -> Value {
    let row_kind = match row.row_kind {
        RowKind::Billable => 0,
        RowKind::NonBillable => 1,
    };
    let shares = row
        .shares
        .iter()
        .map(|share| {
            Value::Record(vec![
                (
                    "beneficiary".to_owned(),
                    Value::String(share.beneficiary.clone()),
                ),
                ("basis_points".to_owned(), int(share.basis_points)),
                ("amount_micros".to_owned(), Value::Long(share.amount_micros)),
            ])
        })
        .collect();
    Value::Record(vec![
        ("id".to_owned(), Value::String(row.id.clone())),
        (
            "window_start".to_owned(),
            Value::TimestampMillis(row.window_start_ms),
        ),
        (
            "window_end".to_owned(),
            Value::TimestampMillis(row.window_end_ms),
        ),
        (
            "tenant_id".to_owned(),
            Value::String(row.dims.tenant_id.clone()),
        ),
        ("model".to_owned(), Value::String(row.dims.model.clone())),
        (
            "cloud".to_owned(),
            enum_value(row.dims.cloud.index(), row.dims.cloud.as_str()),
        ),
        (
            "channel_partner".to_owned(),
            optional_string(row.dims.channel_partner.as_deref()),
        ),
        ("region".to_owned(), Value::String(row.dims.region.clone())),
        (
            "row_kind".to_owned(),
            enum_value(row_kind, row.row_kind.as_str()),
        ),
        ("correction_seq".to_owned(), int(row.correction_seq)),
        ("event_count".to_owned(), long(row.event_count)),
        ("input_tokens".to_owned(), long(row.tokens.input)),
        (
            "cached_input_tokens".to_owned(),
            long(row.tokens.cached_input),
        ),
        ("output_tokens".to_owned(), long(row.tokens.output)),
        ("reasoning_tokens".to_owned(), long(row.tokens.reasoning)),
        ("currency".to_owned(), Value::String(row.currency.clone())),
        ("gross_micros".to_owned(), Value::Long(row.gross_micros)),
        ("shares".to_owned(), Value::Array(shares)),
        ("net_micros".to_owned(), Value::Long(row.net_micros)),
        (
            "price_book_version".to_owned(),
            Value::String(row.price_book_version.clone()),
        ),
        (
            "share_rule_version".to_owned(),
            Value::String(row.share_rule_version.clone()),
        ),
        (
            "source_topic".to_owned(),
            Value::String(row.source_topic.clone()),
        ),
        (
            "source_partition".to_owned(),
            Value::Int(row.source_partition),
        ),
        ("first_offset".to_owned(), Value::Long(row.first_offset)),
        ("last_offset".to_owned(), Value::Long(row.last_offset)),
        (
            "first_event_time".to_owned(),
            Value::TimestampMillis(row.first_event_time_ms),
        ),
        (
            "last_event_time".to_owned(),
            Value::TimestampMillis(row.last_event_time_ms),
        ),
    ])
}

/// Asserts two records have the same fields in the same order, naming the first field
/// that differs.
pub fn assert_same_record(actual: &Value, expected: &Value) {
    let (Value::Record(actual_fields), Value::Record(expected_fields)) = (actual, expected) else {
        panic!("expected records, got {actual:?} and {expected:?}");
    };
    let actual_names: Vec<_> = actual_fields.iter().map(|(name, _)| name).collect();
    let expected_names: Vec<_> = expected_fields.iter().map(|(name, _)| name).collect();
    assert_eq!(actual_names, expected_names, "field names");
    for ((name, actual_value), (_, expected_value)) in actual_fields.iter().zip(expected_fields) {
        assert_eq!(actual_value, expected_value, "field {name}");
    }
}
