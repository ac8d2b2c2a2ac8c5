//! Differential tests against `apache-avro` driven by the `.avsc` files: the hand-written
//! codec must agree with the reference implementation in both directions, and schema
//! evolution between UsageEvent v1 and v2 must work both ways. Also checks the
//! catalogue itself.

mod codec_common;

use std::path::Path;

use apache_avro::types::Value;
use apache_avro::{Schema, from_avro_datum, to_avro_datum};
use codec_common::{
    UuidForm, aggregate, aggregate_value, assert_same_record, encoded_aggregate, encoded_event,
    encoded_tick, header, tick, tick_value, usage_event, usage_event_value,
};
use proptest::prelude::*;
use tally_core::codec::Decoded;
use tally_core::codec::catalogue::{Catalogue, CatalogueError};
use tally_core::codec::{HEADER_LEN, SchemaId, decode_aggregate, decode_record};
use tally_core::event::UsageEvent;

fn catalogue() -> Catalogue {
    Catalogue::embedded().expect("the embedded catalogue parses")
}

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

/// Decodes our framed record's datum with `apache-avro`, checking the whole datum is consumed.
fn reference_decode(writer: &Schema, framed: &[u8], reader: Option<&Schema>) -> Value {
    let mut datum = &framed[HEADER_LEN..];
    let value = from_avro_datum(writer, &mut datum, reader).expect("apache-avro decodes our datum");
    assert!(
        datum.is_empty(),
        "{} bytes left after the datum",
        datum.len()
    );
    value
}

/// Encodes `value` with `apache-avro` and frames it with our header.
fn reference_encode(schema_id: SchemaId, schema: &Schema, value: Value) -> Vec<u8> {
    let mut framed = header(schema_id.id());
    framed.extend(to_avro_datum(schema, value).expect("apache-avro encodes the value"));
    framed
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn apache_avro_reads_our_usage_events(event in usage_event()) {
        let catalogue = catalogue();
        for schema_id in [SchemaId::UsageEventV1, SchemaId::UsageEventV2] {
            let framed = encoded_event(&event, schema_id);
            let value = reference_decode(catalogue.schema(schema_id), &framed, None);
            assert_same_record(&value, &usage_event_value(&event, schema_id, UuidForm::Uuid));
        }
    }

    #[test]
    fn we_read_apache_avro_usage_events(event in usage_event()) {
        let catalogue = catalogue();
        for schema_id in [SchemaId::UsageEventV1, SchemaId::UsageEventV2] {
            let schema = catalogue.schema(schema_id);
            for uuid in [UuidForm::Uuid, UuidForm::UpperCaseText] {
                let framed = reference_encode(schema_id, schema, usage_event_value(&event, schema_id, uuid));
                let expected = match schema_id {
                    SchemaId::UsageEventV1 => UsageEvent { service_tier: None, ..event.clone() },
                    _ => event.clone(),
                };
                prop_assert_eq!(decode_record(&framed), Ok(Decoded::Usage(expected)));
                // With at most one attribute the map's order is fixed, and with a
                // lowercase uuid the two encoders must agree byte for byte.
                if event.attributes.len() <= 1 && matches!(uuid, UuidForm::Uuid) {
                    prop_assert_eq!(&framed, &encoded_event(&event, schema_id));
                }
            }
        }
    }

    #[test]
    fn ticks_agree_with_apache_avro_both_ways(tick in tick()) {
        let catalogue = catalogue();
        let schema = catalogue.schema(SchemaId::UsageTickV1);
        let ours = encoded_tick(&tick);
        assert_same_record(&reference_decode(schema, &ours, None), &tick_value(&tick));
        let theirs = reference_encode(SchemaId::UsageTickV1, schema, tick_value(&tick));
        prop_assert_eq!(&theirs, &ours);
        prop_assert_eq!(decode_record(&theirs), Ok(Decoded::Tick(tick)));
    }

    #[test]
    fn aggregates_agree_with_apache_avro_both_ways(row in aggregate()) {
        let catalogue = catalogue();
        let schema = catalogue.schema(SchemaId::BillingAggregateV1);
        let ours = encoded_aggregate(&row);
        assert_same_record(&reference_decode(schema, &ours, None), &aggregate_value(&row));
        let theirs = reference_encode(SchemaId::BillingAggregateV1, schema, aggregate_value(&row));
        prop_assert_eq!(&theirs, &ours);
        prop_assert_eq!(decode_aggregate(&theirs), Ok(row));
    }

    #[test]
    fn v2_records_read_with_the_v1_reader_schema_drop_service_tier(event in usage_event()) {
        let catalogue = catalogue();
        let framed = encoded_event(&event, SchemaId::UsageEventV2);
        let value = reference_decode(
            catalogue.schema(SchemaId::UsageEventV2),
            &framed,
            Some(catalogue.schema(SchemaId::UsageEventV1)),
        );
        assert_same_record(&value, &usage_event_value(&event, SchemaId::UsageEventV1, UuidForm::Uuid));
        prop_assert_eq!(decode_record(&framed), Ok(Decoded::Usage(event)));
    }

    #[test]
    fn v1_records_read_with_the_v2_reader_schema_default_service_tier_to_null(event in usage_event()) {
        let catalogue = catalogue();
        let framed = encoded_event(&event, SchemaId::UsageEventV1);
        let value = reference_decode(
            catalogue.schema(SchemaId::UsageEventV1),
            &framed,
            Some(catalogue.schema(SchemaId::UsageEventV2)),
        );
        let without_tier = UsageEvent { service_tier: None, ..event };
        assert_same_record(&value, &usage_event_value(&without_tier, SchemaId::UsageEventV2, UuidForm::Uuid));
        prop_assert_eq!(decode_record(&framed), Ok(Decoded::Usage(without_tier)));
    }
}

#[test]
fn embedded_catalogue_passes_its_check() {
    catalogue().check().expect("catalogue check");
}

#[test]
fn catalogue_ids_and_names_match_schema_ids() {
    let catalogue = catalogue();
    let ids: Vec<u32> = catalogue.entries().map(|entry| entry.id).collect();
    let expected: Vec<u32> = SchemaId::ALL.iter().map(|schema| schema.id()).collect();
    assert_eq!(ids, expected);
    for schema_id in SchemaId::ALL {
        let entry = catalogue.entry(schema_id);
        assert_eq!(entry.id, schema_id.id());
        assert_eq!(entry.name, schema_id.full_name());
        let parsed = catalogue.schema(schema_id).name().expect("a named record");
        assert_eq!(parsed.fullname(None), schema_id.full_name());
    }
    assert_eq!(catalogue.entry(SchemaId::UsageEventV1).version, 1);
    assert_eq!(catalogue.entry(SchemaId::UsageEventV2).version, 2);
}

fn schemas_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas"))
}

#[test]
fn catalogue_loaded_from_the_directory_equals_the_embedded_one() {
    let loaded = Catalogue::load(schemas_dir()).expect("schemas/ loads");
    loaded.check().expect("catalogue check");
    let embedded = catalogue();
    for schema_id in SchemaId::ALL {
        assert_eq!(loaded.entry(schema_id), embedded.entry(schema_id));
        assert_eq!(loaded.schema(schema_id), embedded.schema(schema_id));
    }
}

/// Copies `schemas/` into a fresh directory, applies `edit` to one file, and loads it.
fn load_edited(
    test: &str,
    file: &str,
    edit: impl Fn(String) -> String,
) -> Result<Catalogue, CatalogueError> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("codec_catalogue_{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    for entry in std::fs::read_dir(schemas_dir()).expect("schemas/") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let mut text = std::fs::read_to_string(&path).expect("schema file");
        if name == file {
            text = edit(text);
        }
        std::fs::write(dir.join(&name), text).expect("write schema copy");
    }
    Catalogue::load(&dir)
}

#[test]
fn check_rejects_a_catalogue_entry_whose_file_has_another_name() {
    let catalogue = load_edited("swapped", "catalogue.json", |text| {
        text.replacen("\"usage_event.v1.avsc\"", "\"usage_tick.v1.avsc\"", 1)
    })
    .expect("still loads");
    let error = catalogue.check().expect_err("name mismatch");
    assert!(
        matches!(&error, CatalogueError::NameMismatch { id: 1, found, .. } if found == "tally.UsageTick"),
        "{error:?}"
    );
    assert!(error.to_string().contains("usage_tick.v1.avsc"), "{error}");
}

#[test]
fn check_rejects_an_id_this_build_does_not_know() {
    let catalogue = load_edited("unknown_id", "catalogue.json", |text| {
        text.replacen(
            "\"schemas\": [",
            "\"schemas\": [{\"id\": 9, \"subject\": \"s\", \"name\": \"tally.UsageTick\", \"version\": 2, \"file\": \"usage_tick.v1.avsc\"},",
            1,
        )
    })
    .expect("still loads");
    let error = catalogue.check().expect_err("unknown id");
    assert!(
        matches!(error, CatalogueError::UnknownId { id: 9, .. }),
        "{error:?}"
    );
}

#[test]
fn check_rejects_a_v2_that_v1_readers_cannot_read() {
    // A v2 whose service_tier has no default cannot read v1 data.
    let catalogue = load_edited("incompatible", "usage_event.v2.avsc", |text| {
        let mut value: serde_json::Value = serde_json::from_str(&text).expect("json");
        let fields = value["fields"].as_array_mut().expect("fields");
        let tier = fields.last_mut().expect("service_tier");
        tier.as_object_mut().expect("field").remove("default");
        value.to_string()
    })
    .expect("still loads");
    let error = catalogue.check().expect_err("incompatible");
    assert!(
        matches!(&error, CatalogueError::Incompatible { writer_file, reader_file, .. }
            if writer_file == "usage_event.v1.avsc" && reader_file == "usage_event.v2.avsc"),
        "{error:?}"
    );
}

#[test]
fn load_names_the_file_that_does_not_parse() {
    let error = load_edited("bad_avsc", "usage_tick.v1.avsc", |_| {
        "{\"type\": \"record\"".to_owned()
    })
    .expect_err("invalid schema");
    assert!(
        matches!(&error, CatalogueError::Schema { file, .. } if file == "usage_tick.v1.avsc"),
        "{error:?}"
    );

    let error = load_edited("missing_id", "catalogue.json", |text| {
        text.replace("\"id\": 4", "\"id\": 5")
    })
    .expect_err("no entry for id 4");
    assert!(
        matches!(
            error,
            CatalogueError::MissingId {
                schema: SchemaId::BillingAggregateV1
            }
        ),
        "{error:?}"
    );

    let error = Catalogue::load(Path::new("/nonexistent/schemas")).expect_err("no directory");
    assert!(
        matches!(&error, CatalogueError::Read { path, .. } if path.ends_with("catalogue.json")),
        "{error:?}"
    );
}
