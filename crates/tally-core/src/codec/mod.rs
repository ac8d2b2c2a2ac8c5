//! The wire format: Confluent framing around Avro binary datums.
//!
//! A record value is `0x00` (magic byte), the writer schema's id as a big-endian `u32`,
//! then the Avro binary encoding of the datum under that schema. Without a Schema
//! Registry the ids are fixed by `schemas/catalogue.json` (see [`SchemaId`]).
//!
//! The encoder and decoder here are written for the known writer schemas rather than
//! interpreting a schema at run time: that is what makes them fast enough for the hot
//! path. They are checked byte for byte against `apache-avro` driven by the `.avsc`
//! files (differential property tests), and `apache-avro` stays the tool for parsing
//! schemas and checking compatibility ([`catalogue`]).
//!
//! Decoding never panics: every malformed input yields a typed [`DecodeError`].

pub mod catalogue;
mod decode;
mod encode;

pub use decode::{
    AttributesIter, AttributesRef, DecodeError, Decoded, DecodedRef, UsageEventRef,
    decode_aggregate, decode_record, decode_record_ref, peek_event_id,
};
pub use encode::{
    AggregateSizeLimits, aggregate_encoded_len_bound, encode_aggregate, encode_tick,
    encode_usage_event, shares_encoded_len,
};

/// The magic byte that starts every Confluent-framed record.
pub const MAGIC_BYTE: u8 = 0;

/// Length of the Confluent frame header: magic byte + u32 schema id.
pub const HEADER_LEN: usize = 5;

/// Schema ids fixed by `schemas/catalogue.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchemaId {
    /// `tally.UsageEvent` version 1.
    UsageEventV1 = 1,
    /// `tally.UsageEvent` version 2 (adds `service_tier`).
    UsageEventV2 = 2,
    /// `tally.UsageTick` version 1.
    UsageTickV1 = 3,
    /// `tally.BillingAggregate` version 1.
    BillingAggregateV1 = 4,
}

impl SchemaId {
    /// Every id in the catalogue.
    pub const ALL: [SchemaId; 4] = [
        SchemaId::UsageEventV1,
        SchemaId::UsageEventV2,
        SchemaId::UsageTickV1,
        SchemaId::BillingAggregateV1,
    ];

    /// The numeric id written in the frame header.
    pub const fn id(self) -> u32 {
        self as u32
    }

    /// The catalogue entry for a numeric id.
    pub fn from_id(id: u32) -> Option<SchemaId> {
        SchemaId::ALL.into_iter().find(|schema| schema.id() == id)
    }
}
