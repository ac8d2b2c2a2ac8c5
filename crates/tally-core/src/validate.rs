//! Plausibility checks on decoded usage events and ticks.
//!
//! Bounds on event time are relative to the record's Kafka timestamp (the time the
//! gateway sent it), never to the wall clock, so a replay next month decides exactly as
//! the live run did. A tick's time is bounded the same way as an event's: a tick is
//! input like any other, and one far-future tick would otherwise close every window of
//! its partition and send all later usage to `usage.late`.
//!
//! # String limits
//! Every string that becomes a row dimension (`tenant_id`, `model`, `region`,
//! `channel_partner`) and `service_tier` is at most
//! [`ValidationLimits::max_dimension_bytes`] bytes; `request_id` at most
//! [`ValidationLimits::max_request_id_bytes`]; the `attributes` map at most
//! [`ValidationLimits::max_attribute_entries`] entries (as written on the wire, a
//! repeated key counting each time) and [`ValidationLimits::max_attributes_bytes`]
//! bytes of keys and values together. Over a limit the record is rejected
//! ([`DecodeError::FieldTooLong`], reason `field_too_long`). The limits keep long
//! strings out of the partition state (which holds dims strings for the whole
//! correction horizon) and bound the size of a billing row, which
//! [`crate::config::Config::check_contracts`] compares with the aggregates topic's
//! `max.message.bytes` at start. Lengths are UTF-8 bytes, as on the wire.
//!
//! The borrowed path ([`validate_event_ref`], the aggregator's hot path) checks the
//! attributes without iterating them whenever their whole encoding (lengths and
//! counts included) is within the byte limit, which is an upper bound of the bytes of
//! keys and values.

use std::collections::BTreeMap;

use crate::codec::{AttributesRef, DecodeError, UsageEventRef};
use crate::event::{Cloud, RequestStatus, TokenCounts, UsageEvent, UsageTick};

/// Limits applied to every usage event and tick after decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationLimits {
    /// Largest plausible count of one token kind in one request.
    pub max_tokens_per_kind: u64,
    /// How far event (or tick) time may lie ahead of the record's Kafka timestamp, ms.
    pub max_event_time_ahead_ms: i64,
    /// How far event (or tick) time may lie behind the record's Kafka timestamp, ms.
    pub max_event_time_behind_ms: i64,
    /// Longest `tenant_id`, `model`, `region`, `channel_partner` and `service_tier`,
    /// bytes.
    pub max_dimension_bytes: usize,
    /// Longest `request_id`, bytes.
    pub max_request_id_bytes: usize,
    /// Most entries in `attributes`.
    pub max_attribute_entries: usize,
    /// Most bytes of `attributes` keys and values together.
    pub max_attributes_bytes: usize,
}

impl ValidationLimits {
    /// Default for `max_tokens_per_kind`: 100 M tokens, far above any context window.
    pub const DEFAULT_MAX_TOKENS_PER_KIND: u64 = 100_000_000;
    /// Default for `max_event_time_ahead_ms`: 5 minutes of clock skew.
    pub const DEFAULT_MAX_EVENT_TIME_AHEAD_MS: i64 = 5 * 60 * 1000;
    /// Default for `max_event_time_behind_ms`: 7 days of gateway buffering.
    pub const DEFAULT_MAX_EVENT_TIME_BEHIND_MS: i64 = 7 * 24 * 3600 * 1000;
    /// Default for `max_dimension_bytes`: 256 bytes, far above real tenant ids, model
    /// names, regions and partner names, small enough that a row stays a few KiB.
    pub const DEFAULT_MAX_DIMENSION_BYTES: usize = 256;
    /// Default for `max_request_id_bytes`: 256 bytes (UUIDs, ULIDs and provider request
    /// ids are well under 100).
    pub const DEFAULT_MAX_REQUEST_ID_BYTES: usize = 256;
    /// Default for `max_attribute_entries`: 64 entries.
    pub const DEFAULT_MAX_ATTRIBUTE_ENTRIES: usize = 64;
    /// Default for `max_attributes_bytes`: 8 KiB of keys and values.
    pub const DEFAULT_MAX_ATTRIBUTES_BYTES: usize = 8 * 1024;
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits {
            max_tokens_per_kind: Self::DEFAULT_MAX_TOKENS_PER_KIND,
            max_event_time_ahead_ms: Self::DEFAULT_MAX_EVENT_TIME_AHEAD_MS,
            max_event_time_behind_ms: Self::DEFAULT_MAX_EVENT_TIME_BEHIND_MS,
            max_dimension_bytes: Self::DEFAULT_MAX_DIMENSION_BYTES,
            max_request_id_bytes: Self::DEFAULT_MAX_REQUEST_ID_BYTES,
            max_attribute_entries: Self::DEFAULT_MAX_ATTRIBUTE_ENTRIES,
            max_attributes_bytes: Self::DEFAULT_MAX_ATTRIBUTES_BYTES,
        }
    }
}

/// Checks a decoded event against `limits`, given the record's Kafka timestamp in ms
/// (`None` when the record has none: then the time bounds cannot be checked and the
/// record is rejected, because its window could not be decided reproducibly).
pub fn validate_event(
    event: &UsageEvent,
    kafka_timestamp_ms: Option<i64>,
    limits: &ValidationLimits,
) -> Result<(), DecodeError> {
    validate_fields(
        &Checked {
            tokens: event.tokens,
            cloud: event.cloud,
            status: event.status,
            request_id: &event.request_id,
            tenant_id: &event.tenant_id,
            model: &event.model,
            channel_partner: event.channel_partner.as_deref(),
            region: &event.region,
            service_tier: event.service_tier.as_deref(),
            attributes: Attributes::Owned(&event.attributes),
            occurred_at_ms: event.occurred_at_ms,
        },
        kafka_timestamp_ms,
        limits,
    )
}

/// [`validate_event`] for an event borrowed from its record: the same checks, the same
/// errors (except that a wire map repeating a key counts each entry, where the owned
/// map kept only the last).
pub fn validate_event_ref(
    event: &UsageEventRef<'_>,
    kafka_timestamp_ms: Option<i64>,
    limits: &ValidationLimits,
) -> Result<(), DecodeError> {
    validate_fields(
        &Checked {
            tokens: event.tokens,
            cloud: event.cloud,
            status: event.status,
            request_id: event.request_id,
            tenant_id: event.tenant_id,
            model: event.model,
            channel_partner: event.channel_partner,
            region: event.region,
            service_tier: event.service_tier,
            attributes: Attributes::Wire(event.attributes),
            occurred_at_ms: event.occurred_at_ms,
        },
        kafka_timestamp_ms,
        limits,
    )
}

/// Checks a tick's time against the record's Kafka timestamp, exactly as an event's
/// time is checked ([`DecodeError::TickTimeOutOfBounds`] outside the bounds,
/// [`DecodeError::MissingTimestamp`] without a timestamp). A tick outside the bounds
/// is a rejected record: it goes to the DLQ and does not move the watermark.
pub fn validate_tick(
    tick: &UsageTick,
    kafka_timestamp_ms: Option<i64>,
    limits: &ValidationLimits,
) -> Result<(), DecodeError> {
    let Some(sent_at_ms) = kafka_timestamp_ms else {
        return Err(DecodeError::MissingTimestamp);
    };
    if !is_within_time_bounds(tick.tick_time_ms, sent_at_ms, limits) {
        return Err(DecodeError::TickTimeOutOfBounds {
            tick_time_ms: tick.tick_time_ms,
            kafka_timestamp_ms: sent_at_ms,
        });
    }
    Ok(())
}

/// Whether `time_ms` lies within `[sent_at − behind, sent_at + ahead]`.
#[inline(always)]
fn is_within_time_bounds(time_ms: i64, sent_at_ms: i64, limits: &ValidationLimits) -> bool {
    let skew_ms = time_ms.saturating_sub(sent_at_ms);
    skew_ms <= limits.max_event_time_ahead_ms
        && skew_ms.saturating_neg() <= limits.max_event_time_behind_ms
}

/// The attributes of either form of an event.
enum Attributes<'a> {
    Owned(&'a BTreeMap<String, String>),
    Wire(AttributesRef<'a>),
}

impl Attributes<'_> {
    /// Checks the entry count, then the bytes of keys and values.
    #[inline(always)]
    fn check(&self, limits: &ValidationLimits) -> Result<(), DecodeError> {
        let entries = match self {
            Attributes::Owned(map) => map.len(),
            Attributes::Wire(wire) => wire.len(),
        };
        if entries > limits.max_attribute_entries {
            return Err(DecodeError::FieldTooLong {
                field: "attributes",
                size: entries,
                limit: limits.max_attribute_entries,
            });
        }
        let text_bytes = match self {
            // The encoding holds every key and value plus their lengths: when it fits,
            // the text does, and nothing needs to be read.
            Attributes::Wire(wire) if wire.encoded_len() <= limits.max_attributes_bytes => {
                return Ok(());
            }
            Attributes::Wire(wire) => wire.text_bytes(),
            Attributes::Owned(map) => map.iter().map(|(key, value)| key.len() + value.len()).sum(),
        };
        if text_bytes > limits.max_attributes_bytes {
            return Err(DecodeError::FieldTooLong {
                field: "attributes",
                size: text_bytes,
                limit: limits.max_attributes_bytes,
            });
        }
        Ok(())
    }
}

/// The fields the checks read, from either form of an event.
struct Checked<'a> {
    tokens: TokenCounts,
    cloud: Cloud,
    status: RequestStatus,
    request_id: &'a str,
    tenant_id: &'a str,
    model: &'a str,
    channel_partner: Option<&'a str>,
    region: &'a str,
    service_tier: Option<&'a str>,
    attributes: Attributes<'a>,
    occurred_at_ms: i64,
}

/// `Err(FieldTooLong)` when `text` is longer than `limit` bytes.
#[inline(always)]
fn check_len(field: &'static str, text: &str, limit: usize) -> Result<(), DecodeError> {
    if text.len() > limit {
        return Err(DecodeError::FieldTooLong {
            field,
            size: text.len(),
            limit,
        });
    }
    Ok(())
}

fn validate_fields(
    event: &Checked<'_>,
    kafka_timestamp_ms: Option<i64>,
    limits: &ValidationLimits,
) -> Result<(), DecodeError> {
    let token_fields = [
        ("input_tokens", event.tokens.input),
        ("cached_input_tokens", event.tokens.cached_input),
        ("output_tokens", event.tokens.output),
        ("reasoning_tokens", event.tokens.reasoning),
    ];
    for (field, value) in token_fields {
        if value > limits.max_tokens_per_kind {
            return Err(DecodeError::FieldOutOfRange {
                field,
                value: i64::try_from(value).unwrap_or(i64::MAX),
            });
        }
    }
    if event.cloud == Cloud::Unknown {
        return Err(DecodeError::UnknownEnumSymbol { field: "cloud" });
    }
    if event.status == RequestStatus::Unknown {
        return Err(DecodeError::UnknownEnumSymbol { field: "status" });
    }
    if event.tenant_id.is_empty() {
        return Err(DecodeError::EmptyField { field: "tenant_id" });
    }
    if event.model.is_empty() {
        return Err(DecodeError::EmptyField { field: "model" });
    }
    let dimension_limit = limits.max_dimension_bytes;
    check_len("request_id", event.request_id, limits.max_request_id_bytes)?;
    check_len("tenant_id", event.tenant_id, dimension_limit)?;
    check_len("model", event.model, dimension_limit)?;
    if let Some(partner) = event.channel_partner {
        check_len("channel_partner", partner, dimension_limit)?;
    }
    check_len("region", event.region, dimension_limit)?;
    event.attributes.check(limits)?;
    if let Some(tier) = event.service_tier {
        check_len("service_tier", tier, dimension_limit)?;
    }
    let Some(sent_at_ms) = kafka_timestamp_ms else {
        return Err(DecodeError::MissingTimestamp);
    };
    if !is_within_time_bounds(event.occurred_at_ms, sent_at_ms, limits) {
        return Err(DecodeError::EventTimeOutOfBounds {
            occurred_at_ms: event.occurred_at_ms,
            kafka_timestamp_ms: sent_at_ms,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{DecodedRef, SchemaId, decode_record_ref, encode_usage_event};
    use crate::event::{EventId, TickOrigin};

    const SENT_AT: i64 = 1_735_689_600_000;

    fn event() -> UsageEvent {
        UsageEvent {
            event_id: EventId(7),
            request_id: "req-7".to_owned(),
            occurred_at_ms: SENT_AT,
            tenant_id: "tenant-1".to_owned(),
            model: "atlas-large".to_owned(),
            cloud: Cloud::Aws,
            channel_partner: Some("partner-1".to_owned()),
            region: "us-east-1".to_owned(),
            tokens: TokenCounts {
                input: 10,
                cached_input: 0,
                output: 5,
                reasoning: 0,
            },
            status: RequestStatus::Succeeded,
            attributes: BTreeMap::from([("gateway".to_owned(), "gw-1".to_owned())]),
            service_tier: Some("default".to_owned()),
        }
    }

    /// Validates `event` both ways (owned, and borrowed from its v2 encoding) and
    /// checks that they agree.
    fn check(event: &UsageEvent, limits: &ValidationLimits) -> Result<(), DecodeError> {
        let owned = validate_event(event, Some(SENT_AT), limits);
        let mut bytes = Vec::new();
        encode_usage_event(event, SchemaId::UsageEventV2, &mut bytes);
        let Ok(DecodedRef::Usage(borrowed)) = decode_record_ref(&bytes) else {
            panic!("the event decodes");
        };
        assert_eq!(
            validate_event_ref(&borrowed, Some(SENT_AT), limits),
            owned,
            "owned and borrowed validation agree"
        );
        owned
    }

    /// `Ok` at `limit` bytes, `field_too_long` naming `field` at `limit + 1`.
    fn assert_limit(field: &'static str, limit: usize, set: impl Fn(&mut UsageEvent, String)) {
        let limits = ValidationLimits::default();
        let mut at_limit = event();
        // A two-byte character first, so bytes (not characters) are what is counted.
        set(&mut at_limit, format!("é{}", "x".repeat(limit - 2)));
        assert_eq!(check(&at_limit, &limits), Ok(()), "{field} at its limit");
        let mut over = event();
        set(&mut over, format!("é{}", "x".repeat(limit - 1)));
        let error = check(&over, &limits).expect_err("one byte over the limit");
        assert_eq!(
            error,
            DecodeError::FieldTooLong {
                field,
                size: limit + 1,
                limit,
            }
        );
        assert_eq!(error.reason(), "field_too_long");
    }

    #[test]
    fn the_sample_event_is_valid() {
        assert_eq!(check(&event(), &ValidationLimits::default()), Ok(()));
    }

    #[test]
    fn every_dimension_is_limited_to_256_bytes_by_default() {
        assert_eq!(ValidationLimits::default().max_dimension_bytes, 256);
        assert_limit("tenant_id", 256, |event, text| event.tenant_id = text);
        assert_limit("model", 256, |event, text| event.model = text);
        assert_limit("region", 256, |event, text| event.region = text);
        assert_limit("channel_partner", 256, |event, text| {
            event.channel_partner = Some(text);
        });
        assert_limit("service_tier", 256, |event, text| {
            event.service_tier = Some(text);
        });
    }

    #[test]
    fn request_id_is_limited_to_256_bytes_by_default() {
        assert_limit("request_id", 256, |event, text| event.request_id = text);
    }

    #[test]
    fn a_configured_dimension_limit_applies() {
        let limits = ValidationLimits {
            max_dimension_bytes: 8,
            ..ValidationLimits::default()
        };
        let mut event = event();
        event.tenant_id = "12345678".to_owned();
        event.region = "r".to_owned();
        event.model = "m".to_owned();
        event.channel_partner = None;
        event.service_tier = None;
        assert_eq!(check(&event, &limits), Ok(()));
        event.tenant_id.push('9');
        assert_eq!(
            check(&event, &limits),
            Err(DecodeError::FieldTooLong {
                field: "tenant_id",
                size: 9,
                limit: 8
            })
        );
    }

    #[test]
    fn attributes_are_limited_in_entries() {
        let limits = ValidationLimits::default();
        let mut event = event();
        event.attributes = (0..64)
            .map(|i| (format!("k{i:02}"), "v".to_owned()))
            .collect();
        assert_eq!(check(&event, &limits), Ok(()));
        event.attributes.insert("k64".to_owned(), "v".to_owned());
        let error = check(&event, &limits).expect_err("65 entries");
        assert_eq!(
            error,
            DecodeError::FieldTooLong {
                field: "attributes",
                size: 65,
                limit: 64
            }
        );
        assert_eq!(error.reason(), "field_too_long");
    }

    #[test]
    fn attributes_are_limited_in_bytes_of_keys_and_values() {
        let limits = ValidationLimits::default();
        assert_eq!(limits.max_attributes_bytes, 8192);
        let mut event = event();
        // Two entries: 1 + 4095 and 2 + 4094 bytes = 8192 exactly. Their encoding is
        // longer than 8192 bytes (length prefixes), so the borrowed path must count.
        event.attributes = BTreeMap::from([
            ("a".to_owned(), "x".repeat(4095)),
            ("bb".to_owned(), "y".repeat(4094)),
        ]);
        assert_eq!(check(&event, &limits), Ok(()));
        event.attributes.insert("bb".to_owned(), "y".repeat(4095));
        assert_eq!(
            check(&event, &limits),
            Err(DecodeError::FieldTooLong {
                field: "attributes",
                size: 8193,
                limit: 8192
            })
        );
    }

    #[test]
    fn repeated_wire_keys_count_each_time_on_the_borrowed_path() {
        // Hand-built v1 datum whose attributes block repeats the key "k" twice.
        let limits = ValidationLimits {
            max_attribute_entries: 1,
            ..ValidationLimits::default()
        };
        let mut plain = event();
        plain.attributes = BTreeMap::from([("k".to_owned(), "1".to_owned())]);
        let mut bytes = Vec::new();
        encode_usage_event(&plain, SchemaId::UsageEventV1, &mut bytes);
        // The map is the last thing of a v1 record: count 1 (zig-zag 2), "k", "1", 0.
        let tail = [2, 2, b'k', 2, b'1', 0];
        assert!(bytes.ends_with(&tail));
        bytes.truncate(bytes.len() - tail.len());
        bytes.extend_from_slice(&[4, 2, b'k', 2, b'1', 2, b'k', 2, b'2', 0]);
        let Ok(DecodedRef::Usage(borrowed)) = decode_record_ref(&bytes) else {
            panic!("the event decodes");
        };
        assert_eq!(borrowed.attributes.len(), 2);
        assert_eq!(
            validate_event_ref(&borrowed, Some(SENT_AT), &limits),
            Err(DecodeError::FieldTooLong {
                field: "attributes",
                size: 2,
                limit: 1
            })
        );
    }

    fn tick(tick_time_ms: i64) -> UsageTick {
        UsageTick {
            tick_time_ms,
            origin: TickOrigin::Gateway,
        }
    }

    #[test]
    fn a_tick_is_bounded_against_its_record_timestamp_like_an_event() {
        let limits = ValidationLimits::default();
        let ahead = limits.max_event_time_ahead_ms;
        let behind = limits.max_event_time_behind_ms;
        for time in [SENT_AT, SENT_AT + ahead, SENT_AT - behind] {
            assert_eq!(validate_tick(&tick(time), Some(SENT_AT), &limits), Ok(()));
        }
        let ten_years_ms = 10 * 365 * 24 * 3_600_000_i64;
        for time in [
            SENT_AT + ahead + 1,
            SENT_AT - behind - 1,
            SENT_AT + ten_years_ms,
            i64::MAX,
            i64::MIN,
        ] {
            let error =
                validate_tick(&tick(time), Some(SENT_AT), &limits).expect_err("outside the bounds");
            assert_eq!(
                error,
                DecodeError::TickTimeOutOfBounds {
                    tick_time_ms: time,
                    kafka_timestamp_ms: SENT_AT
                }
            );
            assert_eq!(error.reason(), "tick_time_out_of_bounds");
        }
        // The same bounds as an event's time.
        let mut event = event();
        event.occurred_at_ms = SENT_AT + ahead + 1;
        assert_eq!(
            check(&event, &limits).map_err(|error| error.reason()),
            Err("event_time_out_of_bounds")
        );
    }

    #[test]
    fn a_tick_without_a_timestamp_is_rejected() {
        assert_eq!(
            validate_tick(&tick(SENT_AT), None, &ValidationLimits::default()),
            Err(DecodeError::MissingTimestamp)
        );
    }
}
