//! Plausibility checks on decoded usage events.
//!
//! Bounds on event time are relative to the record's Kafka timestamp (the time the
//! gateway sent it), never to the wall clock, so a replay next month decides exactly as
//! the live run did.

use crate::codec::{DecodeError, UsageEventRef};
use crate::event::{Cloud, RequestStatus, TokenCounts, UsageEvent};

/// Limits applied to every usage event after decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationLimits {
    /// Largest plausible count of one token kind in one request.
    pub max_tokens_per_kind: u64,
    /// How far event time may lie ahead of the record's Kafka timestamp, ms.
    pub max_event_time_ahead_ms: i64,
    /// How far event time may lie behind the record's Kafka timestamp, ms.
    pub max_event_time_behind_ms: i64,
}

impl ValidationLimits {
    /// Default for `max_tokens_per_kind`: 100 M tokens, far above any context window.
    pub const DEFAULT_MAX_TOKENS_PER_KIND: u64 = 100_000_000;
    /// Default for `max_event_time_ahead_ms`: 5 minutes of clock skew.
    pub const DEFAULT_MAX_EVENT_TIME_AHEAD_MS: i64 = 5 * 60 * 1000;
    /// Default for `max_event_time_behind_ms`: 7 days of gateway buffering.
    pub const DEFAULT_MAX_EVENT_TIME_BEHIND_MS: i64 = 7 * 24 * 3600 * 1000;
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits {
            max_tokens_per_kind: Self::DEFAULT_MAX_TOKENS_PER_KIND,
            max_event_time_ahead_ms: Self::DEFAULT_MAX_EVENT_TIME_AHEAD_MS,
            max_event_time_behind_ms: Self::DEFAULT_MAX_EVENT_TIME_BEHIND_MS,
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
            tenant_id: &event.tenant_id,
            model: &event.model,
            occurred_at_ms: event.occurred_at_ms,
        },
        kafka_timestamp_ms,
        limits,
    )
}

/// [`validate_event`] for an event borrowed from its record: the same checks, the same
/// errors.
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
            tenant_id: event.tenant_id,
            model: event.model,
            occurred_at_ms: event.occurred_at_ms,
        },
        kafka_timestamp_ms,
        limits,
    )
}

/// The fields the checks read, from either form of an event.
struct Checked<'a> {
    tokens: TokenCounts,
    cloud: Cloud,
    status: RequestStatus,
    tenant_id: &'a str,
    model: &'a str,
    occurred_at_ms: i64,
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
    let Some(sent_at_ms) = kafka_timestamp_ms else {
        return Err(DecodeError::MissingTimestamp);
    };
    let skew_ms = event.occurred_at_ms.saturating_sub(sent_at_ms);
    if skew_ms > limits.max_event_time_ahead_ms
        || skew_ms.saturating_neg() > limits.max_event_time_behind_ms
    {
        return Err(DecodeError::EventTimeOutOfBounds {
            occurred_at_ms: event.occurred_at_ms,
            kafka_timestamp_ms: sent_at_ms,
        });
    }
    Ok(())
}
