//! Avro binary decoding of tally's records, specialised to the catalogue's schemas.
//!
//! The writer schema is picked by the frame's schema id; each known writer schema has
//! its own field sequence here. Decoding yields domain types directly and never panics.
//!
//! Decisions:
//! - One field sequence per schema. Usage events are parsed once into the borrowed
//!   [`UsageEventRef`] (text as `&str` into the record, attributes as their validated
//!   encoding); [`decode_record`] copies that into the owned [`UsageEvent`]. Owned and
//!   borrowed decoding therefore accept and reject exactly the same records.
//! - Bounded work and memory: every length and block count is checked against the
//!   bytes that are left before it is used, so a forged length prefix yields
//!   [`DecodeError::Malformed`] instead of a large allocation or a long loop.
//! - Strict: a record must end exactly where its datum ends (else
//!   [`DecodeError::TrailingBytes`]), ints must fit 32 bits, varints 64 bits, and
//!   `event_id` must be a canonical UUID. Enum indexes the reader has no symbol for are
//!   [`DecodeError::UnknownEnumSymbol`]; the `unknown` symbols themselves decode (so any
//!   record the encoder writes reads back) and are rejected by [`crate::validate`].

use std::collections::BTreeMap;

use super::{HEADER_LEN, MAGIC_BYTE, SchemaId};
use crate::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};
use crate::event::{Cloud, EventId, RequestStatus, TickOrigin, TokenCounts, UsageEvent, UsageTick};

/// Why a record could not be turned into a valid domain value. Each variant maps to a
/// stable, low-cardinality [`reason`](DecodeError::reason) used in DLQ headers and metric labels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record has no value bytes.
    #[error("empty record value")]
    Empty,
    /// Fewer bytes than the 5-byte frame header.
    #[error("record value of {len} bytes is shorter than the 5-byte frame header")]
    TooShort {
        /// Length of the value.
        len: usize,
    },
    /// The first byte is not the Confluent magic byte 0.
    #[error("wrong magic byte {found:#04x}, expected 0x00")]
    BadMagic {
        /// The byte found.
        found: u8,
    },
    /// The schema id is not in the catalogue.
    #[error("unknown schema id {id}")]
    UnknownSchemaId {
        /// The id found.
        id: u32,
    },
    /// The schema id is known but not expected on this topic.
    #[error("schema id {id} is not expected here")]
    UnexpectedSchema {
        /// The id found.
        id: u32,
    },
    /// The datum does not follow its writer schema.
    #[error("malformed datum at field {field}: {problem}")]
    Malformed {
        /// The field being read.
        field: &'static str,
        /// What was wrong.
        problem: &'static str,
    },
    /// An enum index the reader has no symbol for, or the enum's default (unknown) symbol.
    #[error("unknown symbol in enum field {field}")]
    UnknownEnumSymbol {
        /// The field.
        field: &'static str,
    },
    /// A numeric field outside its allowed range (negative or absurd token counts).
    #[error("field {field} out of range: {value}")]
    FieldOutOfRange {
        /// The field.
        field: &'static str,
        /// The value found.
        value: i64,
    },
    /// A required text field is empty.
    #[error("field {field} is empty")]
    EmptyField {
        /// The field.
        field: &'static str,
    },
    /// `event_id` is not a canonical UUID.
    #[error("event_id is not a canonical uuid")]
    InvalidEventId,
    /// The record carries no Kafka timestamp, so its event time cannot be bounded.
    #[error("record has no kafka timestamp")]
    MissingTimestamp,
    /// Event time too far from the record's Kafka timestamp.
    #[error(
        "event time {occurred_at_ms} is too far from the record timestamp {kafka_timestamp_ms}"
    )]
    EventTimeOutOfBounds {
        /// Event time, ms.
        occurred_at_ms: i64,
        /// Kafka timestamp, ms.
        kafka_timestamp_ms: i64,
    },
    /// A tick's time too far from the record's Kafka timestamp (the same bounds as an
    /// event's time).
    #[error("tick time {tick_time_ms} is too far from the record timestamp {kafka_timestamp_ms}")]
    TickTimeOutOfBounds {
        /// Tick time, ms.
        tick_time_ms: i64,
        /// Kafka timestamp, ms.
        kafka_timestamp_ms: i64,
    },
    /// A text field (bytes) or the attributes map (bytes of keys and values, or
    /// entries) over its configured limit.
    #[error("field {field} has size {size}, over its limit of {limit}")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Its size: bytes, or entries for the attributes' entry limit.
        size: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// Bytes left after the datum ended.
    #[error("{count} trailing bytes after the datum")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
}

impl DecodeError {
    /// Every reason label, for pre-registering metrics.
    pub const REASONS: [&'static str; 15] = [
        "empty",
        "too_short",
        "bad_magic",
        "unknown_schema_id",
        "unexpected_schema",
        "malformed_datum",
        "unknown_enum_symbol",
        "field_out_of_range",
        "empty_field",
        "invalid_event_id",
        "missing_timestamp",
        "event_time_out_of_bounds",
        "tick_time_out_of_bounds",
        "field_too_long",
        "trailing_bytes",
    ];

    /// A stable snake_case reason, from a small fixed set (see [`Self::REASONS`]).
    pub const fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooShort { .. } => "too_short",
            DecodeError::BadMagic { .. } => "bad_magic",
            DecodeError::UnknownSchemaId { .. } => "unknown_schema_id",
            DecodeError::UnexpectedSchema { .. } => "unexpected_schema",
            DecodeError::Malformed { .. } => "malformed_datum",
            DecodeError::UnknownEnumSymbol { .. } => "unknown_enum_symbol",
            DecodeError::FieldOutOfRange { .. } => "field_out_of_range",
            DecodeError::EmptyField { .. } => "empty_field",
            DecodeError::InvalidEventId => "invalid_event_id",
            DecodeError::MissingTimestamp => "missing_timestamp",
            DecodeError::EventTimeOutOfBounds { .. } => "event_time_out_of_bounds",
            DecodeError::TickTimeOutOfBounds { .. } => "tick_time_out_of_bounds",
            DecodeError::FieldTooLong { .. } => "field_too_long",
            DecodeError::TrailingBytes { .. } => "trailing_bytes",
        }
    }
}

/// A record of `usage.events`: usage, or a watermark tick.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "usage is nearly every record: boxing it would add an allocation per event"
)]
pub enum Decoded {
    /// A usage event (from a v1 or v2 writer).
    Usage(UsageEvent),
    /// A watermark tick.
    Tick(UsageTick),
}

/// A record of `usage.events` borrowed from its bytes: see [`decode_record_ref`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "usage is nearly every record: boxing it would add an allocation per event"
)]
pub enum DecodedRef<'a> {
    /// A usage event (from a v1 or v2 writer).
    Usage(UsageEventRef<'a>),
    /// A watermark tick.
    Tick(UsageTick),
}

impl DecodedRef<'_> {
    /// The owned form.
    pub fn to_decoded(&self) -> Decoded {
        match self {
            DecodedRef::Usage(event) => Decoded::Usage(event.to_event()),
            DecodedRef::Tick(tick) => Decoded::Tick(*tick),
        }
    }
}

/// A usage event whose text fields borrow from the record bytes. Same fields and
/// meaning as [`UsageEvent`]; every string is already checked to be UTF-8 and the
/// attributes map is already checked to be well formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageEventRef<'a> {
    /// Idempotency key.
    pub event_id: EventId,
    /// The gateway's request id.
    pub request_id: &'a str,
    /// Event time, UTC milliseconds since the UNIX epoch.
    pub occurred_at_ms: i64,
    /// The billed customer; also the record key.
    pub tenant_id: &'a str,
    /// Model name as priced in the price book.
    pub model: &'a str,
    /// Serving cloud.
    pub cloud: Cloud,
    /// Channel partner the request came through, if any.
    pub channel_partner: Option<&'a str>,
    /// Serving region.
    pub region: &'a str,
    /// Token counts.
    pub tokens: TokenCounts,
    /// Request outcome.
    pub status: RequestStatus,
    /// Free-form attributes, in wire order.
    pub attributes: AttributesRef<'a>,
    /// Service tier (UsageEvent v2). Always `None` when read from a v1 record.
    pub service_tier: Option<&'a str>,
}

impl UsageEventRef<'_> {
    /// The owned form. Attributes are collected into a sorted map; if the wire map
    /// repeats a key, the last value wins.
    pub fn to_event(&self) -> UsageEvent {
        UsageEvent {
            event_id: self.event_id,
            request_id: self.request_id.to_owned(),
            occurred_at_ms: self.occurred_at_ms,
            tenant_id: self.tenant_id.to_owned(),
            model: self.model.to_owned(),
            cloud: self.cloud,
            channel_partner: self.channel_partner.map(str::to_owned),
            region: self.region.to_owned(),
            tokens: self.tokens,
            status: self.status,
            attributes: self.attributes.to_map(),
            service_tier: self.service_tier.map(str::to_owned),
        }
    }
}

/// The `attributes` map of a [`UsageEventRef`]: the validated Avro encoding of the map,
/// read again on iteration (no allocation).
#[derive(Debug, Clone, Copy)]
pub struct AttributesRef<'a> {
    /// The map's encoding: blocks and the terminating zero count.
    encoded: &'a [u8],
    /// `encoded` as text, when the decoder found it to be UTF-8 as a whole with every
    /// length and count a single ASCII byte: then every key and value is a slice of it
    /// and iteration needs no further UTF-8 check.
    text: Option<&'a str>,
    /// Number of entries on the wire.
    len: usize,
}

impl PartialEq for AttributesRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.encoded == other.encoded
    }
}

impl Eq for AttributesRef<'_> {}

impl<'a> AttributesRef<'a> {
    /// Number of entries on the wire (a repeated key counts each time).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the map's encoding (block counts, lengths, keys and values): an upper
    /// bound of [`Self::text_bytes`], known without reading the entries.
    pub fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    /// Bytes of every key and value on the wire, added up (a repeated key counts each
    /// time).
    pub fn text_bytes(&self) -> usize {
        self.iter()
            .map(|(key, value)| key.len() + value.len())
            .sum()
    }

    /// The entries as an owned sorted map; if the wire map repeats a key, the last
    /// value wins.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        // Inserting one by one: `collect` would first buffer the entries in a Vec.
        let mut map = BTreeMap::new();
        for (key, value) in self.iter() {
            map.insert(key.to_owned(), value.to_owned());
        }
        map
    }

    /// The entries in wire order.
    pub fn iter(&self) -> AttributesIter<'a> {
        AttributesIter {
            reader: Reader::new(self.encoded),
            text: self.text,
            left_in_block: 0,
        }
    }
}

impl<'a> IntoIterator for AttributesRef<'a> {
    type Item = (&'a str, &'a str);
    type IntoIter = AttributesIter<'a>;

    fn into_iter(self) -> AttributesIter<'a> {
        self.iter()
    }
}

/// Iterator over the entries of an [`AttributesRef`].
#[derive(Debug, Clone)]
pub struct AttributesIter<'a> {
    reader: Reader<'a>,
    text: Option<&'a str>,
    left_in_block: u64,
}

impl<'a> AttributesIter<'a> {
    /// The next key or value.
    #[inline]
    fn next_str(&mut self) -> Option<&'a str> {
        match self.text {
            Some(text) => {
                let range = self.reader.byte_range("attributes").ok()?;
                text.get(range)
            }
            None => self.reader.str("attributes").ok(),
        }
    }
}

impl<'a> Iterator for AttributesIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        // The bytes were validated by the decoder, so none of the reads below fail;
        // if they did, iteration would simply end.
        if self.left_in_block == 0 {
            self.left_in_block = self.reader.block_count("attributes").ok()?;
            if self.left_in_block == 0 {
                return None;
            }
        }
        self.left_in_block -= 1;
        let key = self.next_str()?;
        let value = self.next_str()?;
        Some((key, value))
    }
}

/// Reads the frame header and returns the schema and the datum bytes.
#[inline]
fn split_frame(bytes: &[u8]) -> Result<(SchemaId, &[u8]), DecodeError> {
    let Some((header, datum)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(if bytes.is_empty() {
            DecodeError::Empty
        } else {
            DecodeError::TooShort { len: bytes.len() }
        });
    };
    let [magic, id @ ..] = *header;
    if magic != MAGIC_BYTE {
        return Err(DecodeError::BadMagic { found: magic });
    }
    let id = u32::from_be_bytes(id);
    let schema = SchemaId::from_id(id).ok_or(DecodeError::UnknownSchemaId { id })?;
    Ok((schema, datum))
}

/// Decodes a record of `usage.events` (UsageEvent v1/v2 or UsageTick v1).
pub fn decode_record(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    decode_record_ref(bytes).map(|decoded| decoded.to_decoded())
}

/// Decodes a record of `usage.events` without copying its text: the hot path for
/// consumers that only keep a few fields. Accepts and rejects exactly the records
/// [`decode_record`] does.
#[inline(always)]
pub fn decode_record_ref(bytes: &[u8]) -> Result<DecodedRef<'_>, DecodeError> {
    let (schema, datum) = split_frame(bytes)?;
    let mut reader = Reader::new(datum);
    let decoded = match schema {
        SchemaId::UsageEventV1 => DecodedRef::Usage(read_usage_event(&mut reader, false)?),
        SchemaId::UsageEventV2 => DecodedRef::Usage(read_usage_event(&mut reader, true)?),
        SchemaId::UsageTickV1 => DecodedRef::Tick(read_tick(&mut reader)?),
        SchemaId::BillingAggregateV1 => {
            return Err(DecodeError::UnexpectedSchema { id: schema.id() });
        }
    };
    reader.finish()?;
    Ok(decoded)
}

/// The event id of a usage-event record, read without decoding the rest: `None` for
/// anything else (a tick, another schema, a malformed id). For looking ahead only
/// (see `tally_aggregator::record::prefetch_record`); what counts is
/// [`decode_record_ref`]'s full decode.
pub fn peek_event_id(bytes: &[u8]) -> Option<EventId> {
    let (schema, datum) = split_frame(bytes).ok()?;
    match schema {
        SchemaId::UsageEventV1 | SchemaId::UsageEventV2 => {
            parse_event_id(Reader::new(datum).bytes("event_id").ok()?)
        }
        SchemaId::UsageTickV1 | SchemaId::BillingAggregateV1 => None,
    }
}

/// Decodes a record of `billing.aggregates`.
pub fn decode_aggregate(bytes: &[u8]) -> Result<BillingAggregate, DecodeError> {
    let (schema, datum) = split_frame(bytes)?;
    if schema != SchemaId::BillingAggregateV1 {
        return Err(DecodeError::UnexpectedSchema { id: schema.id() });
    }
    let mut reader = Reader::new(datum);
    let row = read_aggregate(&mut reader)?;
    reader.finish()?;
    Ok(row)
}

/// Reads a UsageEvent datum: [`read_usage_event_fast`], and when that declines, the
/// field-by-field [`read_usage_event_exact`] from the same position.
#[inline(always)]
fn read_usage_event<'a>(
    reader: &mut Reader<'a>,
    with_service_tier: bool,
) -> Result<UsageEventRef<'a>, DecodeError> {
    let start = reader.pos;
    if let Some(event) = read_usage_event_fast(reader, with_service_tier) {
        return Ok(event);
    }
    reader.pos = start;
    read_usage_event_exact(reader, with_service_tier)
}

/// The common case, with fewer UTF-8 checks: text fields are first read as byte ranges,
/// then checked in three spans (request_id; tenant_id to region; attributes to the end)
/// with one `from_utf8` each, every field being a slice of its checked span. Returns
/// `None` (and leaves the reader anywhere) for anything unusual: any malformed or
/// invalid field, a span that is not UTF-8 as a whole, a length or count in the
/// attributes that is not a single byte. Whenever it returns an event,
/// [`read_usage_event_exact`] returns the same one, which the unit tests check.
#[inline(always)]
fn read_usage_event_fast<'a>(
    reader: &mut Reader<'a>,
    with_service_tier: bool,
) -> Option<UsageEventRef<'a>> {
    let bytes = reader.bytes;
    let event_id = parse_event_id(reader.bytes("event_id").ok()?)?;
    let request_id = std::str::from_utf8(reader.bytes("request_id").ok()?).ok()?;
    let occurred_at_ms = reader.long("occurred_at").ok()?;
    let dims_start = reader.pos;
    let tenant_id = reader.byte_range("tenant_id").ok()?;
    let model = reader.byte_range("model").ok()?;
    let cloud = Cloud::from_index(reader.enum_index("cloud").ok()?)?;
    let channel_partner = match reader.long("channel_partner").ok()? {
        0 => None,
        1 => Some(reader.byte_range("channel_partner").ok()?),
        _ => return None,
    };
    let region = reader.byte_range("region").ok()?;
    let dims = std::str::from_utf8(bytes.get(dims_start..reader.pos)?).ok()?;
    let dims_text =
        |range: std::ops::Range<usize>| dims.get(range.start - dims_start..range.end - dims_start);
    let tokens = TokenCounts {
        input: reader.token_count("input_tokens").ok()?,
        cached_input: reader.token_count("cached_input_tokens").ok()?,
        output: reader.token_count("output_tokens").ok()?,
        reasoning: reader.token_count("reasoning_tokens").ok()?,
    };
    let status = RequestStatus::from_index(reader.enum_index("status").ok()?)?;
    let attributes_start = reader.pos;
    let mut attribute_count = 0usize;
    loop {
        // Single-byte, non-negative counts only: larger maps take the exact path.
        let count = *bytes.get(reader.pos)?;
        if count >= 0x80 || count & 1 == 1 {
            return None;
        }
        reader.pos += 1;
        if count == 0 {
            break;
        }
        for _ in 0..count / 2 {
            for _ in 0..2 {
                if *bytes.get(reader.pos)? >= 0x80 {
                    return None;
                }
                reader.byte_range("attributes").ok()?;
            }
            attribute_count += 1;
        }
    }
    let attributes_end = reader.pos;
    let service_tier = if with_service_tier {
        match reader.long("service_tier").ok()? {
            0 => None,
            1 => Some(reader.byte_range("service_tier").ok()?),
            _ => return None,
        }
    } else {
        None
    };
    let tail = std::str::from_utf8(bytes.get(attributes_start..reader.pos)?).ok()?;
    let service_tier = match service_tier {
        None => None,
        Some(range) => {
            Some(tail.get(range.start - attributes_start..range.end - attributes_start)?)
        }
    };
    Some(UsageEventRef {
        event_id,
        request_id,
        occurred_at_ms,
        tenant_id: dims_text(tenant_id)?,
        model: dims_text(model)?,
        cloud,
        channel_partner: match channel_partner {
            None => None,
            Some(range) => Some(dims_text(range)?),
        },
        region: dims_text(region)?,
        tokens,
        status,
        attributes: AttributesRef {
            encoded: bytes.get(attributes_start..attributes_end)?,
            text: Some(tail.get(..attributes_end - attributes_start)?),
            len: attribute_count,
        },
        service_tier,
    })
}

/// Reads a UsageEvent datum field by field, reporting the first problem in field order.
#[inline(never)]
fn read_usage_event_exact<'a>(
    reader: &mut Reader<'a>,
    with_service_tier: bool,
) -> Result<UsageEventRef<'a>, DecodeError> {
    let event_id = parse_event_id(reader.bytes("event_id")?).ok_or(DecodeError::InvalidEventId)?;
    let request_id = reader.str("request_id")?;
    let occurred_at_ms = reader.long("occurred_at")?;
    let tenant_id = reader.str("tenant_id")?;
    let model = reader.str("model")?;
    let cloud = Cloud::from_index(reader.enum_index("cloud")?)
        .ok_or(DecodeError::UnknownEnumSymbol { field: "cloud" })?;
    let channel_partner = reader.optional_str("channel_partner")?;
    let region = reader.str("region")?;
    let tokens = TokenCounts {
        input: reader.token_count("input_tokens")?,
        cached_input: reader.token_count("cached_input_tokens")?,
        output: reader.token_count("output_tokens")?,
        reasoning: reader.token_count("reasoning_tokens")?,
    };
    let status = RequestStatus::from_index(reader.enum_index("status")?)
        .ok_or(DecodeError::UnknownEnumSymbol { field: "status" })?;
    let attributes_start = reader.pos;
    let mut attribute_count = 0usize;
    reader.blocks("attributes", |reader| {
        reader.str("attributes")?;
        reader.str("attributes")?;
        attribute_count += 1;
        Ok(())
    })?;
    let attributes = AttributesRef {
        encoded: &reader.bytes[attributes_start..reader.pos],
        text: None,
        len: attribute_count,
    };
    let service_tier = if with_service_tier {
        reader.optional_str("service_tier")?
    } else {
        None
    };
    Ok(UsageEventRef {
        event_id,
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
    })
}

fn read_tick(reader: &mut Reader<'_>) -> Result<UsageTick, DecodeError> {
    let tick_time_ms = reader.long("tick_time")?;
    let origin = match reader.enum_index("origin")? {
        0 => TickOrigin::Gateway,
        1 => TickOrigin::Aggregator,
        _ => return Err(DecodeError::UnknownEnumSymbol { field: "origin" }),
    };
    Ok(UsageTick {
        tick_time_ms,
        origin,
    })
}

fn read_aggregate(reader: &mut Reader<'_>) -> Result<BillingAggregate, DecodeError> {
    let id = reader.string("id")?;
    let window_start_ms = reader.long("window_start")?;
    let window_end_ms = reader.long("window_end")?;
    let tenant_id = reader.string("tenant_id")?;
    let model = reader.string("model")?;
    let cloud = Cloud::from_index(reader.enum_index("cloud")?)
        .ok_or(DecodeError::UnknownEnumSymbol { field: "cloud" })?;
    let channel_partner = reader.optional_str("channel_partner")?.map(str::to_owned);
    let region = reader.string("region")?;
    let row_kind = RowKind::from_index(reader.enum_index("row_kind")?)
        .ok_or(DecodeError::UnknownEnumSymbol { field: "row_kind" })?;
    let correction_seq = reader.non_negative_int("correction_seq")?;
    let event_count = reader.token_count("event_count")?;
    let tokens = TokenCounts {
        input: reader.token_count("input_tokens")?,
        cached_input: reader.token_count("cached_input_tokens")?,
        output: reader.token_count("output_tokens")?,
        reasoning: reader.token_count("reasoning_tokens")?,
    };
    let currency = reader.string("currency")?;
    let gross_micros = reader.long("gross_micros")?;
    let mut shares = Vec::new();
    reader.blocks("shares", |reader| {
        let beneficiary = reader.string("shares.beneficiary")?;
        let basis_points = reader.non_negative_int("shares.basis_points")?;
        let amount_micros = reader.long("shares.amount_micros")?;
        shares.push(PartnerShare {
            beneficiary,
            basis_points,
            amount_micros,
        });
        Ok(())
    })?;
    let net_micros = reader.long("net_micros")?;
    let price_book_version = reader.string("price_book_version")?;
    let share_rule_version = reader.string("share_rule_version")?;
    let source_topic = reader.string("source_topic")?;
    let source_partition = reader.int("source_partition")?;
    let first_offset = reader.long("first_offset")?;
    let last_offset = reader.long("last_offset")?;
    let first_event_time_ms = reader.long("first_event_time")?;
    let last_event_time_ms = reader.long("last_event_time")?;
    Ok(BillingAggregate {
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
    })
}

/// Value of each ASCII hex digit (either case); `INVALID_HEX` for every other byte.
const HEX_VALUE: [u8; 256] = {
    let mut table = [INVALID_HEX; 256];
    let mut index = 0;
    while index < 10 {
        table[b'0' as usize + index] = index as u8;
        index += 1;
    }
    let mut index = 0;
    while index < 6 {
        table[b'a' as usize + index] = 10 + index as u8;
        table[b'A' as usize + index] = 10 + index as u8;
        index += 1;
    }
    table
};

/// Marks a byte that is not a hex digit in [`HEX_VALUE`].
const INVALID_HEX: u8 = 0xff;

/// Offsets of the 16 digit pairs in the canonical `8-4-4-4-12` uuid text.
const UUID_PAIR_OFFSETS: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];

/// [`EventId::parse`] by table lookup, one byte of the id per step: the canonical
/// hyphenated form in either case, anything else `None`. The decoder's hot path.
#[inline]
fn parse_event_id(text: &[u8]) -> Option<EventId> {
    let text: &[u8; 36] = text.try_into().ok()?;
    if text[8] != b'-' || text[13] != b'-' || text[18] != b'-' || text[23] != b'-' {
        return None;
    }
    let mut bytes = [0u8; 16];
    let mut invalid = 0u8;
    for (byte, offset) in bytes.iter_mut().zip(UUID_PAIR_OFFSETS) {
        let high = HEX_VALUE[usize::from(text[offset])];
        let low = HEX_VALUE[usize::from(text[offset + 1])];
        // A digit is at most 0x0f: any bit above marks an invalid byte.
        invalid |= high | low;
        *byte = (high << 4) | (low & 0x0f);
    }
    if invalid & 0xf0 != 0 {
        return None;
    }
    Some(EventId(u128::from_be_bytes(bytes)))
}

/// Undoes Avro's zig-zag mapping of signed to unsigned.
#[inline(always)]
const fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// A cursor over an Avro binary datum. Every read is bounds-checked.
#[derive(Debug, Clone)]
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0 }
    }

    /// Avro `long`: base-128 varint of the zig-zag value, at most 10 bytes. The
    /// one-byte case (lengths, enum indexes, union branches, small counts) is inlined;
    /// longer numbers take [`Self::long_multi_byte`].
    #[inline(always)]
    fn long(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        if let Some(&byte) = self.bytes.get(self.pos)
            && byte < 0x80
        {
            self.pos += 1;
            return Ok(unzigzag(u64::from(byte)));
        }
        self.long_multi_byte(field)
    }

    /// A varint of any length. With ten bytes left (the longest varint) the loop runs
    /// over a fixed-size array without per-byte bounds checks; near the end of the
    /// datum it checks every byte.
    #[inline]
    fn long_multi_byte(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        const OVERFLOW: &str = "varint overflows 64 bits";
        if let Some(window) = self.bytes.get(self.pos..self.pos.saturating_add(10))
            && let Ok(window) = <&[u8; 10]>::try_from(window)
        {
            let mut value: u64 = 0;
            for (index, &byte) in window.iter().enumerate() {
                value |= u64::from(byte & 0x7f) << (7 * index);
                if byte < 0x80 {
                    // The tenth byte holds bit 63 only.
                    if index == 9 && byte > 1 {
                        break;
                    }
                    self.pos += index + 1;
                    return Ok(unzigzag(value));
                }
            }
            return Err(DecodeError::Malformed {
                field,
                problem: OVERFLOW,
            });
        }
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let Some(&byte) = self.bytes.get(self.pos) else {
                return Err(DecodeError::Malformed {
                    field,
                    problem: "datum ends inside a number",
                });
            };
            self.pos += 1;
            // The tenth byte holds bit 63 only: anything more overflows 64 bits
            // (this also rejects an eleventh byte, which would need a continuation bit).
            if shift == 63 && byte > 1 {
                return Err(DecodeError::Malformed {
                    field,
                    problem: OVERFLOW,
                });
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(unzigzag(value));
            }
            shift += 7;
        }
    }

    /// Avro `int`: a long that must fit 32 bits.
    fn int(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        let value = self.long(field)?;
        i32::try_from(value).map_err(|_| DecodeError::Malformed {
            field,
            problem: "int out of 32-bit range",
        })
    }

    fn non_negative_int(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let value = self.int(field)?;
        u32::try_from(value).map_err(|_| DecodeError::FieldOutOfRange {
            field,
            value: i64::from(value),
        })
    }

    /// A token count: a long that must not be negative.
    #[inline(always)]
    fn token_count(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let value = self.long(field)?;
        u64::try_from(value).map_err(|_| DecodeError::FieldOutOfRange { field, value })
    }

    #[inline(always)]
    fn enum_index(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let value = self.long(field)?;
        u32::try_from(value).map_err(|_| DecodeError::Malformed {
            field,
            problem: "enum index out of range",
        })
    }

    #[inline(always)]
    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.long(field)?;
        let Ok(len) = usize::try_from(len) else {
            return Err(DecodeError::Malformed {
                field,
                problem: "negative length",
            });
        };
        // Checked against what is left before any use, so a huge length prefix costs
        // nothing: no allocation is ever sized from the wire.
        let Some(slice) = self.bytes.get(self.pos..).and_then(|rest| rest.get(..len)) else {
            return Err(DecodeError::Malformed {
                field,
                problem: "length runs past the datum",
            });
        };
        self.pos += len;
        Ok(slice)
    }

    /// A `bytes`/`string` value as its position in the datum.
    #[inline(always)]
    fn byte_range(&mut self, field: &'static str) -> Result<std::ops::Range<usize>, DecodeError> {
        let len = self.bytes(field)?.len();
        Ok(self.pos - len..self.pos)
    }

    #[inline(always)]
    fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let bytes = self.bytes(field)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::Malformed {
            field,
            problem: "string is not utf-8",
        })
    }

    #[inline]
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        self.str(field).map(str::to_owned)
    }

    /// Avro `["null","string"]`.
    #[inline(always)]
    fn optional_str(&mut self, field: &'static str) -> Result<Option<&'a str>, DecodeError> {
        match self.long(field)? {
            0 => Ok(None),
            1 => self.str(field).map(Some),
            _ => Err(DecodeError::Malformed {
                field,
                problem: "union branch out of range",
            }),
        }
    }

    /// Reads the item count of the next array/map block (0 ends the array or map). A
    /// negative count is followed by the block's byte size, which is read and ignored.
    /// Every item takes at least one byte, so a count above the bytes left is
    /// malformed; checking it here bounds every loop over items by the input size.
    #[inline(always)]
    fn block_count(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let count = self.long(field)?;
        let count = if count < 0 {
            let _block_size = self.long(field)?;
            count.unsigned_abs()
        } else {
            count.unsigned_abs()
        };
        let remaining = self.bytes.len() - self.pos;
        if count > remaining as u64 {
            return Err(DecodeError::Malformed {
                field,
                problem: "block count exceeds the datum",
            });
        }
        Ok(count)
    }

    /// Reads Avro array/map blocks, calling `item` once per element.
    #[inline(always)]
    fn blocks(
        &mut self,
        field: &'static str,
        mut item: impl FnMut(&mut Self) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        loop {
            let count = self.block_count(field)?;
            if count == 0 {
                return Ok(());
            }
            for _ in 0..count {
                item(self)?;
            }
        }
    }

    fn finish(&self) -> Result<(), DecodeError> {
        let count = self.bytes.len() - self.pos;
        if count == 0 {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { count })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_fast_path_agrees_with_event_id_parse() {
        let mut cases: Vec<Vec<u8>> = vec![
            b"123e4567-e89b-12d3-a456-426614174000".to_vec(),
            b"FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF".to_vec(),
            b"00000000-0000-0000-0000-000000000000".to_vec(),
            b"123e4567e89b12d3a456426614174000".to_vec(),
            b"123e4567-e89b-12d3-a456-42661417400".to_vec(),
            b"".to_vec(),
        ];
        // Every byte value at every position of a valid id.
        let valid = b"5f0c2a91-7d3e-4b8a-9c1f-0e6d42b7a913";
        for position in 0..valid.len() {
            for byte in 0..=u8::MAX {
                let mut text = valid.to_vec();
                text[position] = byte;
                cases.push(text);
            }
        }
        for text in cases {
            assert_eq!(parse_event_id(&text), EventId::parse(&text), "{text:?}");
        }
    }

    #[test]
    fn peeked_event_id_is_the_decoded_one_or_none() {
        use crate::codec::{encode_tick, encode_usage_event};
        use crate::event::{Cloud, RequestStatus, TickOrigin, TokenCounts, UsageEvent, UsageTick};
        let event = UsageEvent {
            event_id: EventId(0x5f0c_2a91_7d3e_4b8a_9c1f_0e6d_42b7_a913),
            request_id: "req".to_owned(),
            occurred_at_ms: 1_735_689_600_000,
            tenant_id: "tenant".to_owned(),
            model: "atlas-large".to_owned(),
            cloud: Cloud::Aws,
            channel_partner: None,
            region: "us-east-1".to_owned(),
            tokens: TokenCounts::default(),
            status: RequestStatus::Succeeded,
            attributes: Default::default(),
            service_tier: Some("flex".to_owned()),
        };
        for schema in [SchemaId::UsageEventV1, SchemaId::UsageEventV2] {
            let mut bytes = Vec::new();
            encode_usage_event(&event, schema, &mut bytes);
            assert_eq!(peek_event_id(&bytes), Some(event.event_id));
            // Any prefix either still holds the whole id or gives none.
            for len in 0..bytes.len() {
                let peeked = peek_event_id(&bytes[..len]);
                assert!(peeked.is_none() || peeked == Some(event.event_id), "{len}");
            }
            // A malformed id gives none.
            let mut bad = bytes.clone();
            bad[HEADER_LEN + 1 + 8] = b'x';
            assert_eq!(peek_event_id(&bad), None);
        }
        let mut tick = Vec::new();
        encode_tick(
            &UsageTick {
                tick_time_ms: 1,
                origin: TickOrigin::Gateway,
            },
            &mut tick,
        );
        assert_eq!(peek_event_id(&tick), None);
        assert_eq!(peek_event_id(&[]), None);
    }

    /// A long read: the value and the position after it.
    type LongRead = Result<(i64, usize), DecodeError>;

    /// Reads one long from `bytes`, then from `bytes` followed by ten bytes of padding,
    /// so both the bounds-checked and the fixed-window paths are exercised.
    fn read_long_both_ways(bytes: &[u8]) -> [LongRead; 2] {
        let mut padded = bytes.to_vec();
        padded.extend_from_slice(&[0; 10]);
        [bytes, &padded[..]].map(|input| {
            let mut reader = Reader::new(input);
            reader.long("n").map(|value| (value, reader.pos))
        })
    }

    #[test]
    fn varint_paths_agree_near_and_far_from_the_end() {
        let overflow = Err(DecodeError::Malformed {
            field: "n",
            problem: "varint overflows 64 bits",
        });
        let cases: [(&[u8], LongRead); 7] = [
            (&[0x02], Ok((1, 1))),
            (&[0x80, 0x01], Ok((64, 2))),
            (
                &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
                Ok((i64::MAX, 10)),
            ),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
                Ok((i64::MIN, 10)),
            ),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                overflow.clone(),
            ),
            (
                &[
                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x81, 0x00,
                ],
                overflow,
            ),
            // A non-minimal encoding of 0 is still a valid varint.
            (&[0x80, 0x80, 0x00], Ok((0, 3))),
        ];
        for (bytes, expected) in cases {
            let [near_end, far_from_end] = read_long_both_ways(bytes);
            assert_eq!(near_end, expected, "{bytes:02x?}");
            assert_eq!(far_from_end, expected, "{bytes:02x?} padded");
        }
        let [truncated, _] = read_long_both_ways(&[0x80, 0x80]);
        assert_eq!(
            truncated,
            Err(DecodeError::Malformed {
                field: "n",
                problem: "datum ends inside a number"
            })
        );
    }

    fn event(text: &str, attributes: &[(&str, &str)], tier: Option<&str>) -> UsageEvent {
        UsageEvent {
            event_id: EventId(0x5f0c_2a91_7d3e_4b8a_9c1f_0e6d_42b7_a913),
            request_id: format!("req_{text}"),
            occurred_at_ms: 1_767_225_600_123,
            tenant_id: format!("tenant-{text}"),
            model: "atlas-large".to_owned(),
            cloud: Cloud::Aws,
            channel_partner: Some(format!("partner-{text}")),
            region: "us-east-1".to_owned(),
            tokens: TokenCounts {
                input: 1_843,
                cached_input: 0,
                output: 617,
                reasoning: 1 << 40,
            },
            status: RequestStatus::Succeeded,
            attributes: attributes
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            service_tier: tier.map(str::to_owned),
        }
    }

    fn fast_and_exact(
        datum: &[u8],
        with_service_tier: bool,
    ) -> (
        Option<UsageEventRef<'_>>,
        Result<UsageEventRef<'_>, DecodeError>,
    ) {
        let mut fast_reader = Reader::new(datum);
        let fast = read_usage_event_fast(&mut fast_reader, with_service_tier);
        let mut exact_reader = Reader::new(datum);
        let exact = read_usage_event_exact(&mut exact_reader, with_service_tier);
        if fast.is_some() {
            assert_eq!(
                fast_reader.pos, exact_reader.pos,
                "both paths end at the same byte"
            );
        }
        (fast, exact)
    }

    #[test]
    fn fast_usage_path_takes_typical_events_and_agrees_with_the_exact_path() {
        let long_text = "x".repeat(70);
        let events = [
            (event("00042", &[("api", "chat")], Some("priority")), true),
            (
                event("ünïcødé-€", &[("k", "v"), ("ключ", "значение")], None),
                true,
            ),
            (event("00042", &[], None), true),
            // A 70-byte value has a two-byte length: the fast path declines.
            (event("00042", &[("api", &long_text)], None), false),
            (event(&long_text, &[], None), false),
        ];
        for (event, fast_expected) in events {
            for schema in [SchemaId::UsageEventV1, SchemaId::UsageEventV2] {
                let mut framed = Vec::new();
                super::super::encode_usage_event(&event, schema, &mut framed);
                let datum = &framed[HEADER_LEN..];
                let with_service_tier = schema == SchemaId::UsageEventV2;
                let (fast, exact) = fast_and_exact(datum, with_service_tier);
                let exact = exact.expect("a valid datum");
                assert_eq!(fast.is_some(), fast_expected, "{event:?}");
                if let Some(fast) = fast {
                    assert_eq!(fast, exact);
                    assert_eq!(fast.to_event(), exact.to_event());
                    assert_eq!(
                        fast.attributes.iter().collect::<Vec<_>>(),
                        exact.attributes.iter().collect::<Vec<_>>()
                    );
                }
                // Every single-byte corruption: whenever the fast path accepts, the
                // exact path accepts the same event.
                for position in 0..datum.len() {
                    for byte in [
                        0x00,
                        0x01,
                        0x02,
                        0x7f,
                        0x80,
                        0xc3,
                        0xe2,
                        0xff,
                        datum[position] ^ 0x02,
                    ] {
                        let mut corrupted = datum.to_vec();
                        corrupted[position] = byte;
                        let (fast, exact) = fast_and_exact(&corrupted, with_service_tier);
                        if let Some(fast) = fast {
                            let exact =
                                exact.expect("the exact path accepts what the fast path accepts");
                            assert_eq!(fast, exact);
                            assert_eq!(fast.to_event(), exact.to_event());
                        }
                    }
                }
            }
        }
    }
}
