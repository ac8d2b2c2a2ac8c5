//! Codec throughput on one core: encode and decode of a typical usage event, decode of a
//! billing row, and `apache-avro`'s generic decoder on the same bytes for comparison.
//!
//! Run with `cargo bench --bench codec`; criterion reports events/s as `elem/s`
//! (each iteration is one record). `cargo bench --bench codec -- --test` runs every
//! benchmark once as a smoke test.

#[path = "../crates/tally-core/tests/codec_common/mod.rs"]
mod codec_common;

use std::hint::black_box;
use std::time::Duration;

use codec_common::{encoded_event, sample_aggregate, sample_event};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tally_core::codec::catalogue::Catalogue;
use tally_core::codec::{
    HEADER_LEN, SchemaId, decode_aggregate, decode_record, decode_record_ref, encode_aggregate,
    encode_usage_event,
};
use tally_core::event::UsageEvent;

fn codec(c: &mut Criterion) {
    let event = sample_event();
    let event_without_partner = UsageEvent {
        channel_partner: None,
        ..sample_event()
    };
    let v1 = encoded_event(&event, SchemaId::UsageEventV1);
    let v1_without_partner = encoded_event(&event_without_partner, SchemaId::UsageEventV1);
    let v2 = encoded_event(&event, SchemaId::UsageEventV2);
    let mut aggregate = Vec::new();
    encode_aggregate(&sample_aggregate(), &mut aggregate);
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
