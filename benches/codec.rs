//! Codec throughput on one core: encode and decode of a typical usage event, decode of a
//! billing row, and `apache-avro`'s generic decoder on the same bytes for comparison.
//!
//! Run with `cargo bench --bench codec`; criterion reports events/s as `elem/s`
//! (each iteration is one record). `cargo bench --bench codec -- --test` runs every
//! benchmark once as a smoke test.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tally_core::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use tally_core::codec::catalogue::Catalogue;
use tally_core::codec::{
    HEADER_LEN, SchemaId, decode_aggregate, decode_record, decode_record_ref, encode_aggregate,
    encode_usage_event,
};
use tally_core::event::{Cloud, EventId, RequestStatus, TokenCounts, UsageEvent};

/// A typical gateway event: uuid id, `req_` + 20 characters, one attribute.
fn typical_event(channel_partner: Option<&str>) -> UsageEvent {
    UsageEvent {
        event_id: EventId(0x5f0c_2a91_7d3e_4b8a_9c1f_0e6d_42b7_a913),
        request_id: "req_8Hq2LmZ0pX4vN7tR1sWc".to_owned(),
        occurred_at_ms: 1_767_225_600_123,
        tenant_id: "tenant-00042".to_owned(),
        model: "atlas-large".to_owned(),
        cloud: Cloud::Aws,
        channel_partner: channel_partner.map(str::to_owned),
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

/// A typical billing row with one partner share.
fn typical_aggregate() -> BillingAggregate {
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
        correction_seq: 0,
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

fn framed_event(event: &UsageEvent, schema: SchemaId) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_usage_event(event, schema, &mut bytes);
    bytes
}

fn codec(c: &mut Criterion) {
    let event = typical_event(Some("northwind"));
    let event_without_partner = typical_event(None);
    let v1 = framed_event(&event, SchemaId::UsageEventV1);
    let v1_without_partner = framed_event(&event_without_partner, SchemaId::UsageEventV1);
    let v2 = framed_event(&event, SchemaId::UsageEventV2);
    let mut aggregate = Vec::new();
    encode_aggregate(&typical_aggregate(), &mut aggregate);
    println!(
        "framed sizes: usage_event_v1 {} bytes (without partner {}), usage_event_v2 {} bytes, aggregate {} bytes",
        v1.len(),
        v1_without_partner.len(),
        v2.len(),
        aggregate.len()
    );

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(256);
    group.bench_function("usage_event_v1", |b| {
        b.iter(|| {
            out.clear();
            encode_usage_event(black_box(&event), SchemaId::UsageEventV1, &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("usage_event_v2", |b| {
        b.iter(|| {
            out.clear();
            encode_usage_event(black_box(&event), SchemaId::UsageEventV2, &mut out);
            black_box(out.len())
        })
    });
    group.finish();

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("usage_event_v1", |b| {
        b.iter(|| decode_record(black_box(&v1)))
    });
    group.bench_function("usage_event_v1_no_partner", |b| {
        b.iter(|| decode_record(black_box(&v1_without_partner)))
    });
    group.bench_function("usage_event_v2", |b| {
        b.iter(|| decode_record(black_box(&v2)))
    });
    group.bench_function("usage_event_v1_ref", |b| {
        b.iter(|| decode_record_ref(black_box(&v1)))
    });
    group.bench_function("aggregate", |b| {
        b.iter(|| decode_aggregate(black_box(&aggregate)))
    });
    group.finish();

    let catalogue = Catalogue::embedded().expect("embedded catalogue parses");
    let writer_schema = catalogue.schema(SchemaId::UsageEventV1);
    let mut group = c.benchmark_group("apache_avro");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_value", |b| {
        b.iter(|| {
            apache_avro::from_avro_datum(writer_schema, &mut black_box(&v1[HEADER_LEN..]), None)
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = codec
}
criterion_main!(benches);
