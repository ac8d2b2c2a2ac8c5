//! Usage events and ticks: the domain form of the records in `usage.events`.
//!
//! These types mirror `schemas/usage_event.v{1,2}.avsc` and `schemas/usage_tick.v1.avsc`.
//! The schema files are the source of the wire format; the codec in [`crate::codec`]
//! is checked against them by differential tests.

use std::collections::BTreeMap;
use std::fmt;

/// The cloud that served a request. Symbol order is the Avro enum's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cloud {
    /// A symbol this reader does not know (the enum's default). Rejected, never priced.
    Unknown,
    /// The vendor's own API.
    Openai,
    /// Microsoft Azure.
    Azure,
    /// Amazon Web Services.
    Aws,
    /// Google Cloud.
    Gcp,
    /// Oracle Cloud.
    Oracle,
}

impl Cloud {
    /// All symbols in Avro order.
    pub const ALL: [Cloud; 6] = [
        Cloud::Unknown,
        Cloud::Openai,
        Cloud::Azure,
        Cloud::Aws,
        Cloud::Gcp,
        Cloud::Oracle,
    ];

    /// The Avro symbol, also used as the metric label and in contracts.
    pub const fn as_str(self) -> &'static str {
        match self {
            Cloud::Unknown => "unknown",
            Cloud::Openai => "openai",
            Cloud::Azure => "azure",
            Cloud::Aws => "aws",
            Cloud::Gcp => "gcp",
            Cloud::Oracle => "oracle",
        }
    }

    /// Position of the symbol in the Avro enum.
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The symbol at `index`, if this reader knows it.
    pub fn from_index(index: u32) -> Option<Cloud> {
        Cloud::ALL.get(index as usize).copied()
    }

    /// Parses a symbol (as written in contracts and configs).
    pub fn from_symbol(symbol: &str) -> Option<Cloud> {
        Cloud::ALL
            .into_iter()
            .find(|cloud| cloud.as_str() == symbol)
    }
}

impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a request ended. The price book says which statuses are billable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestStatus {
    /// A symbol this reader does not know (the enum's default). Rejected.
    Unknown,
    /// The request completed.
    Succeeded,
    /// The request failed.
    Failed,
    /// The client cancelled the request.
    Cancelled,
}

impl RequestStatus {
    /// All symbols in Avro order.
    pub const ALL: [RequestStatus; 4] = [
        RequestStatus::Unknown,
        RequestStatus::Succeeded,
        RequestStatus::Failed,
        RequestStatus::Cancelled,
    ];

    /// The Avro symbol.
    pub const fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Unknown => "unknown",
            RequestStatus::Succeeded => "succeeded",
            RequestStatus::Failed => "failed",
            RequestStatus::Cancelled => "cancelled",
        }
    }

    /// Position of the symbol in the Avro enum.
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The symbol at `index`, if this reader knows it.
    pub fn from_index(index: u32) -> Option<RequestStatus> {
        RequestStatus::ALL.get(index as usize).copied()
    }

    /// Parses a symbol.
    pub fn from_symbol(symbol: &str) -> Option<RequestStatus> {
        RequestStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == symbol)
    }
}

impl fmt::Display for RequestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The idempotency key of a usage event: a UUID, held as 16 bytes so the dedupe set
/// stores ids exactly and compactly. On the wire it is the canonical 36-character text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub u128);

impl EventId {
    /// Parses the canonical hyphenated form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`
    /// (either case). Anything else is `None`.
    pub fn parse(text: &[u8]) -> Option<EventId> {
        if text.len() != 36 {
            return None;
        }
        let mut value: u128 = 0;
        for (position, &byte) in text.iter().enumerate() {
            if matches!(position, 8 | 13 | 18 | 23) {
                if byte != b'-' {
                    return None;
                }
                continue;
            }
            let nibble = match byte {
                b'0'..=b'9' => byte - b'0',
                b'a'..=b'f' => byte - b'a' + 10,
                b'A'..=b'F' => byte - b'A' + 10,
                _ => return None,
            };
            value = (value << 4) | u128::from(nibble);
        }
        Some(EventId(value))
    }

    /// Writes the canonical lowercase hyphenated form.
    pub fn to_text(self) -> [u8; 36] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; 36];
        let mut nibble_index = 0;
        for (position, slot) in out.iter_mut().enumerate() {
            if matches!(position, 8 | 13 | 18 | 23) {
                continue;
            }
            let shift = 124 - 4 * nibble_index;
            *slot = HEX[((self.0 >> shift) & 0xf) as usize];
            nibble_index += 1;
        }
        out
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.to_text();
        // The canonical form is ASCII by construction.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

/// Token counts of one request (or sums over many). Non-negative by construction:
/// the codec rejects negative counts on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TokenCounts {
    /// Uncached prompt tokens.
    pub input: u64,
    /// Prompt tokens served from the prompt cache.
    pub cached_input: u64,
    /// Completion tokens, excluding reasoning tokens.
    pub output: u64,
    /// Reasoning tokens.
    pub reasoning: u64,
}

impl TokenCounts {
    /// Adds `other` into `self`, saturating (sums of validated events cannot reach u64::MAX
    /// in practice; saturation keeps the arithmetic total without panicking).
    pub fn add(&mut self, other: &TokenCounts) {
        self.input = self.input.saturating_add(other.input);
        self.cached_input = self.cached_input.saturating_add(other.cached_input);
        self.output = self.output.saturating_add(other.output);
        self.reasoning = self.reasoning.saturating_add(other.reasoning);
    }

    /// Sum over all token kinds.
    pub fn total(&self) -> u64 {
        self.input
            .saturating_add(self.cached_input)
            .saturating_add(self.output)
            .saturating_add(self.reasoning)
    }
}

/// One metered API request (UsageEvent v1/v2 in domain form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    /// Idempotency key.
    pub event_id: EventId,
    /// The gateway's request id.
    pub request_id: String,
    /// Event time, UTC milliseconds since the UNIX epoch.
    pub occurred_at_ms: i64,
    /// The billed customer; also the record key.
    pub tenant_id: String,
    /// Model name as priced in the price book.
    pub model: String,
    /// Serving cloud.
    pub cloud: Cloud,
    /// Channel partner the request came through, if any.
    pub channel_partner: Option<String>,
    /// Serving region.
    pub region: String,
    /// Token counts.
    pub tokens: TokenCounts,
    /// Request outcome.
    pub status: RequestStatus,
    /// Free-form attributes, sorted by key (Avro maps are unordered; sorting makes
    /// encoding deterministic).
    pub attributes: BTreeMap<String, String>,
    /// Service tier (UsageEvent v2). Always `None` when read from a v1 record.
    pub service_tier: Option<String>,
}

/// Who wrote a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TickOrigin {
    /// A gateway (or any producer other than the aggregator).
    Gateway,
    /// An aggregator, for a partition that went idle.
    Aggregator,
}

impl TickOrigin {
    /// The Avro symbol.
    pub const fn as_str(self) -> &'static str {
        match self {
            TickOrigin::Gateway => "gateway",
            TickOrigin::Aggregator => "aggregator",
        }
    }
}

/// A watermark tick: advances its partition's watermark to `tick_time_ms` when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UsageTick {
    /// Event time the partition has reached, UTC ms.
    pub tick_time_ms: i64,
    /// Who wrote it.
    pub origin: TickOrigin,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_round_trips_canonical_text() {
        let text = b"123e4567-e89b-12d3-a456-426614174000";
        let id = EventId::parse(text).expect("canonical uuid");
        assert_eq!(&id.to_text(), text);
        assert_eq!(id.to_string(), "123e4567-e89b-12d3-a456-426614174000");
    }

    #[test]
    fn event_id_rejects_non_canonical_text() {
        assert!(EventId::parse(b"123e4567e89b12d3a456426614174000").is_none());
        assert!(EventId::parse(b"123e4567-e89b-12d3-a456-42661417400g").is_none());
        assert!(EventId::parse(b"").is_none());
    }

    #[test]
    fn enum_symbols_follow_schema_order() {
        assert_eq!(Cloud::from_index(3), Some(Cloud::Aws));
        assert_eq!(Cloud::from_index(6), None);
        assert_eq!(
            RequestStatus::from_symbol("cancelled"),
            Some(RequestStatus::Cancelled)
        );
    }
}
