//! Avro binary encoding of tally's records, specialised to the catalogue's schemas.
//!
//! Decisions:
//! - Encoders append to a caller-owned `Vec<u8>`, so a producer reuses one buffer and
//!   the hot path allocates nothing once the buffer has grown. Each encoder reserves
//!   the record's size up front (exact for the fixed parts, by length for text).
//! - Maps are written as one block in the domain type's (sorted) order, so the same
//!   value always encodes to the same bytes.
//! - The domain holds counts as `u64`/`u32` where the schema has `long`/`int`. A value
//!   beyond the wire type's range cannot come from a validated event or a decoded
//!   record; it is clamped to the wire type's maximum rather than wrapped, so it can
//!   never turn into a negative count on the wire.

use super::{HEADER_LEN, MAGIC_BYTE, SchemaId};
use crate::aggregate::BillingAggregate;
use crate::event::{EventId, UsageEvent, UsageTick};

/// Most bytes a varint-encoded `long` takes.
const MAX_LONG_LEN: usize = 10;

/// Appends the Confluent frame header for `schema`.
#[inline(always)]
fn put_header(out: &mut Vec<u8>, schema: SchemaId) {
    let [a, b, c, d] = schema.id().to_be_bytes();
    out.extend_from_slice(&[MAGIC_BYTE, a, b, c, d]);
}

/// Avro `long`/`int`: zig-zag, then base-128 varint. One-byte values (lengths, enum
/// indexes, union branches) take the inlined branch.
#[inline(always)]
pub(crate) fn put_long(out: &mut Vec<u8>, value: i64) {
    let zigzag = ((value << 1) ^ (value >> 63)) as u64;
    if zigzag < 0x80 {
        out.push(zigzag as u8);
    } else {
        put_varint_multi_byte(out, zigzag);
    }
}

#[inline(never)]
fn put_varint_multi_byte(out: &mut Vec<u8>, mut zigzag: u64) {
    let mut buffer = [0u8; MAX_LONG_LEN];
    let mut len = 0;
    while zigzag >= 0x80 {
        buffer[len] = (zigzag as u8 & 0x7f) | 0x80;
        zigzag >>= 7;
        len += 1;
    }
    buffer[len] = zigzag as u8;
    out.extend_from_slice(&buffer[..=len]);
}

/// Avro `bytes`/`string`: length as long, then the bytes.
#[inline(always)]
pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

/// Avro `["null","string"]`: branch index, then the string if present.
#[inline(always)]
fn put_optional_string(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => out.push(0),
        Some(text) => {
            // Branch 1 zig-zags to 2.
            out.push(2);
            put_bytes(out, text.as_bytes());
        }
    }
}

/// The canonical text of `id` (lowercase, hyphenated), two hex digits per byte.
#[inline]
fn event_id_text(id: EventId) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut position = 0;
    for (index, byte) in id.0.to_be_bytes().into_iter().enumerate() {
        if matches!(index, 4 | 6 | 8 | 10) {
            position += 1;
        }
        out[position] = HEX[usize::from(byte >> 4)];
        out[position + 1] = HEX[usize::from(byte & 0xf)];
        position += 2;
    }
    out
}

/// Token counts are u64 in the domain but `long` on the wire (see the module docs).
#[inline(always)]
fn long_from_u64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// `int` fields held as u32 in the domain (see the module docs).
#[inline(always)]
fn int_from_u32(value: u32) -> i64 {
    i64::from(i32::try_from(value).unwrap_or(i32::MAX))
}

/// Upper bound of the encoded size of a text field.
#[inline(always)]
fn text_size(text: &str) -> usize {
    MAX_LONG_LEN + text.len()
}

/// Encodes `event` as a framed UsageEvent record, appending to `out`.
///
/// `schema` must be [`SchemaId::UsageEventV1`] or [`SchemaId::UsageEventV2`]; v1 drops
/// `service_tier`. Any other id encodes as v2.
pub fn encode_usage_event(event: &UsageEvent, schema: SchemaId, out: &mut Vec<u8>) {
    let with_service_tier = schema != SchemaId::UsageEventV1;
    let schema = if with_service_tier {
        SchemaId::UsageEventV2
    } else {
        SchemaId::UsageEventV1
    };
    let optional_size = |text: &Option<String>| text.as_deref().map_or(1, text_size) + 1;
    let attributes_size: usize = event
        .attributes
        .iter()
        .map(|(key, value)| text_size(key) + text_size(value))
        .sum();
    out.reserve(
        HEADER_LEN
            + 37
            + text_size(&event.request_id)
            + text_size(&event.tenant_id)
            + text_size(&event.model)
            + text_size(&event.region)
            + optional_size(&event.channel_partner)
            + optional_size(&event.service_tier)
            + attributes_size
            + 8 * MAX_LONG_LEN,
    );
    put_header(out, schema);
    out.push(72); // 36, zig-zagged: the length of the canonical uuid text.
    out.extend_from_slice(&event_id_text(event.event_id));
    put_bytes(out, event.request_id.as_bytes());
    put_long(out, event.occurred_at_ms);
    put_bytes(out, event.tenant_id.as_bytes());
    put_bytes(out, event.model.as_bytes());
    put_long(out, i64::from(event.cloud.index()));
    put_optional_string(out, event.channel_partner.as_deref());
    put_bytes(out, event.region.as_bytes());
    put_long(out, long_from_u64(event.tokens.input));
    put_long(out, long_from_u64(event.tokens.cached_input));
    put_long(out, long_from_u64(event.tokens.output));
    put_long(out, long_from_u64(event.tokens.reasoning));
    put_long(out, i64::from(event.status.index()));
    if !event.attributes.is_empty() {
        put_long(out, event.attributes.len() as i64);
        for (key, value) in &event.attributes {
            put_bytes(out, key.as_bytes());
            put_bytes(out, value.as_bytes());
        }
    }
    out.push(0);
    if with_service_tier {
        put_optional_string(out, event.service_tier.as_deref());
    }
}

/// Encodes `tick` as a framed UsageTick record, appending to `out`.
pub fn encode_tick(tick: &UsageTick, out: &mut Vec<u8>) {
    put_header(out, SchemaId::UsageTickV1);
    put_long(out, tick.tick_time_ms);
    put_long(out, tick.origin as i64);
}

/// Encodes `row` as a framed BillingAggregate record, appending to `out`.
pub fn encode_aggregate(row: &BillingAggregate, out: &mut Vec<u8>) {
    put_header(out, SchemaId::BillingAggregateV1);
    put_bytes(out, row.id.as_bytes());
    put_long(out, row.window_start_ms);
    put_long(out, row.window_end_ms);
    put_bytes(out, row.dims.tenant_id.as_bytes());
    put_bytes(out, row.dims.model.as_bytes());
    put_long(out, i64::from(row.dims.cloud.index()));
    put_optional_string(out, row.dims.channel_partner.as_deref());
    put_bytes(out, row.dims.region.as_bytes());
    put_long(out, row.row_kind as i64);
    put_long(out, int_from_u32(row.correction_seq));
    put_long(out, long_from_u64(row.event_count));
    put_long(out, long_from_u64(row.tokens.input));
    put_long(out, long_from_u64(row.tokens.cached_input));
    put_long(out, long_from_u64(row.tokens.output));
    put_long(out, long_from_u64(row.tokens.reasoning));
    put_bytes(out, row.currency.as_bytes());
    put_long(out, row.gross_micros);
    if !row.shares.is_empty() {
        put_long(out, row.shares.len() as i64);
        for share in &row.shares {
            put_bytes(out, share.beneficiary.as_bytes());
            put_long(out, int_from_u32(share.basis_points));
            put_long(out, share.amount_micros);
        }
    }
    out.push(0);
    put_long(out, row.net_micros);
    put_bytes(out, row.price_book_version.as_bytes());
    put_bytes(out, row.share_rule_version.as_bytes());
    put_bytes(out, row.source_topic.as_bytes());
    put_long(out, i64::from(row.source_partition));
    put_long(out, row.first_offset);
    put_long(out, row.last_offset);
    put_long(out, row.first_event_time_ms);
    put_long(out, row.last_event_time_ms);
}

/// Most bytes a varint-encoded `int` takes.
const MAX_INT_LEN: usize = 5;

/// Bytes of the varint encoding of a non-negative length.
const fn length_prefix_len(len: usize) -> usize {
    // Zig-zag doubles the value; each byte carries 7 bits.
    let mut zigzag = (len as u128) << 1;
    let mut bytes = 1;
    while zigzag >= 0x80 {
        zigzag >>= 7;
        bytes += 1;
    }
    bytes
}

/// Bytes of an Avro string of `len` bytes: length prefix and text.
const fn string_len(len: usize) -> usize {
    length_prefix_len(len).saturating_add(len)
}

/// The largest sizes of a BillingAggregate row's variable parts, from which
/// [`aggregate_encoded_len_bound`] computes the largest encoded row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AggregateSizeLimits {
    /// Longest tenant id, model, region and channel partner, bytes (each).
    pub dimension_bytes: usize,
    /// Longest currency code, bytes.
    pub currency_bytes: usize,
    /// Longest price-book version label, bytes.
    pub price_book_version_bytes: usize,
    /// Longest share-rule version label, bytes.
    pub share_rule_version_bytes: usize,
    /// The input topic's name, bytes.
    pub source_topic_bytes: usize,
    /// Largest encoded shares of one row, block count included: the largest
    /// [`shares_encoded_len`] over the share rules a row can be attributed by.
    pub shares_bytes: usize,
}

/// Encoded bytes of a row's shares (the block's count and entries, not the map's
/// terminating zero) when its beneficiaries have names of `beneficiary_name_bytes`
/// bytes, with the largest basis points and amounts: 0 for no beneficiary.
pub fn shares_encoded_len(beneficiary_name_bytes: impl IntoIterator<Item = usize>) -> usize {
    let mut count = 0_usize;
    let mut entries = 0_usize;
    for name_bytes in beneficiary_name_bytes {
        count += 1;
        entries = entries
            .saturating_add(string_len(name_bytes))
            .saturating_add(MAX_INT_LEN + MAX_LONG_LEN);
    }
    if count == 0 {
        return 0;
    }
    length_prefix_len(count).saturating_add(entries)
}

/// The largest framed BillingAggregate record [`encode_aggregate`] can write for rows
/// within `limits`: exact lengths for the text fields, the widest varint for every
/// number, one byte for each enum (their indexes are below 64). A row with every text
/// at its limit and every number at its widest encodes to exactly this length.
pub fn aggregate_encoded_len_bound(limits: &AggregateSizeLimits) -> usize {
    let dimension = string_len(limits.dimension_bytes);
    let texts = [
        string_len(2 * crate::identity::ROW_ID_BYTES), // id (hex)
        dimension,                                     // tenant_id
        dimension,                                     // model
        1 + dimension,                                 // channel_partner: branch, string
        dimension,                                     // region
        string_len(limits.currency_bytes),
        string_len(limits.price_book_version_bytes),
        string_len(limits.share_rule_version_bytes),
        string_len(limits.source_topic_bytes),
    ];
    // window start/end, event_count, 4 token sums, gross, net, first/last offset,
    // first/last event time.
    let longs = 13 * MAX_LONG_LEN;
    // correction_seq, source_partition.
    let ints = 2 * MAX_INT_LEN;
    // cloud, row_kind.
    let enums = 2;
    // The shares map's terminating zero count.
    let map_end = 1;
    texts
        .into_iter()
        .fold(
            HEADER_LEN + longs + ints + enums + map_end,
            usize::saturating_add,
        )
        .saturating_add(limits.shares_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_text_matches_the_canonical_form() {
        for value in [0, u128::MAX, 0x123e_4567_e89b_12d3_a456_4266_1417_4000] {
            assert_eq!(event_id_text(EventId(value)), EventId(value).to_text());
        }
    }

    #[test]
    fn varints_use_the_fewest_bytes() {
        for (value, expected) in [
            (0i64, &[0u8][..]),
            (-1, &[1]),
            (63, &[0x7e]),
            (64, &[0x80, 0x01]),
            (
                i64::MAX,
                &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
            (
                i64::MIN,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            put_long(&mut out, value);
            assert_eq!(out, expected, "{value}");
        }
    }
}
