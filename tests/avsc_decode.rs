//! Records written by the generator decode with the published `.avsc` files alone:
//! what a consumer in another language would do with `schemas/`, no Rust types.

use std::collections::BTreeMap;
use std::path::Path;

use apache_avro::Schema;
use apache_avro::types::Value;
use tally_core::codec::{Decoded, decode_record};
use tally_gen::{Generator, GeneratorConfig, RecordClass};

/// The `.avsc` file for a schema id, found through `schemas/catalogue.json`.
fn schema_for_id(id: u32) -> Schema {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let catalogue: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("catalogue.json")).expect("catalogue"),
    )
    .expect("json");
    let entry = catalogue["schemas"]
        .as_array()
        .expect("schemas array")
        .iter()
        .find(|entry| entry["id"].as_u64() == Some(u64::from(id)))
        .expect("id in catalogue");
    let file = entry["file"].as_str().expect("file name");
    Schema::parse_str(&std::fs::read_to_string(dir.join(file)).expect("avsc")).expect("valid avsc")
}

fn field<'a>(fields: &'a [(String, Value)], name: &str) -> &'a Value {
    &fields
        .iter()
        .find(|(field, _)| field == name)
        .unwrap_or_else(|| panic!("field {name}"))
        .1
}

fn long(value: &Value) -> i64 {
    match value {
        Value::Long(number) | Value::TimestampMillis(number) => *number,
        other => panic!("not a long: {other:?}"),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Uuid(uuid) => uuid.to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

#[test]
fn generated_records_decode_with_the_published_schema_files() {
    for schema_version in [1u8, 2] {
        let config = GeneratorConfig {
            count: 3_000,
            schema_version,
            ..GeneratorConfig::default()
        };
        let mut checked = 0;
        let mut schemas = BTreeMap::new();
        for record in Generator::new(config).expect("generator") {
            if matches!(record.class, RecordClass::Rejected(_)) {
                continue;
            }
            let id = u32::from_be_bytes([
                record.value[1],
                record.value[2],
                record.value[3],
                record.value[4],
            ]);
            assert_eq!(record.value[0], 0, "confluent magic byte");
            assert_eq!(
                id,
                u32::from(schema_version),
                "usage events carry their version's id"
            );
            let schema = schemas.entry(id).or_insert_with(|| schema_for_id(id));
            let mut datum = &record.value[5..];
            let value = apache_avro::from_avro_datum(schema, &mut datum, None)
                .expect("decodes with the .avsc");
            assert!(datum.is_empty(), "the whole datum is consumed");
            let Value::Record(fields) = value else {
                panic!("a record")
            };
            let Ok(Decoded::Usage(event)) = decode_record(&record.value) else {
                panic!("valid usage event")
            };
            assert_eq!(text(field(&fields, "event_id")), event.event_id.to_string());
            assert_eq!(text(field(&fields, "tenant_id")), event.tenant_id);
            assert_eq!(text(field(&fields, "model")), event.model);
            assert_eq!(long(field(&fields, "occurred_at")), event.occurred_at_ms);
            assert_eq!(
                long(field(&fields, "input_tokens")),
                event.tokens.input as i64
            );
            assert_eq!(
                long(field(&fields, "cached_input_tokens")),
                event.tokens.cached_input as i64
            );
            assert_eq!(
                long(field(&fields, "output_tokens")),
                event.tokens.output as i64
            );
            assert_eq!(
                long(field(&fields, "reasoning_tokens")),
                event.tokens.reasoning as i64
            );
            match field(&fields, "cloud") {
                Value::Enum(_, symbol) => assert_eq!(symbol, event.cloud.as_str()),
                other => panic!("cloud is an enum: {other:?}"),
            }
            checked += 1;
        }
        assert!(checked > 2_500, "checked {checked} records");
    }
}
