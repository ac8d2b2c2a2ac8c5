//! Billing aggregates: the rows tally emits (`schemas/billing_aggregate.v1.avsc`).

use crate::event::{Cloud, TokenCounts};

/// The billing dimensions of a row. Ordered so rows can be emitted in (window, dims) order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dims {
    /// The billed customer.
    pub tenant_id: String,
    /// Model name.
    pub model: String,
    /// Serving cloud.
    pub cloud: Cloud,
    /// Channel partner, if any.
    pub channel_partner: Option<String>,
    /// Serving region.
    pub region: String,
}

/// Whether a row carries billable usage. Symbol order is the Avro enum's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RowKind {
    /// Usage whose status the price book bills.
    Billable = 0,
    /// Usage whose status the price book does not bill: counted, amounts 0.
    NonBillable = 1,
}

impl RowKind {
    /// The Avro symbol.
    pub const fn as_str(self) -> &'static str {
        match self {
            RowKind::Billable => "billable",
            RowKind::NonBillable => "non_billable",
        }
    }

    /// The symbol at `index`.
    pub fn from_index(index: u32) -> Option<RowKind> {
        match index {
            0 => Some(RowKind::Billable),
            1 => Some(RowKind::NonBillable),
            _ => None,
        }
    }
}

/// One beneficiary's share of a row's gross.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartnerShare {
    /// Partner receiving the share.
    pub beneficiary: String,
    /// Share of gross in 1/10000.
    pub basis_points: u32,
    /// half-even(exact gross × basis_points / 10 000), micro-units.
    pub amount_micros: i64,
}

/// One billing row (BillingAggregate v1 in domain form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingAggregate {
    /// Deterministic identity (see [`crate::identity`]).
    pub id: String,
    /// Window start, inclusive, UTC ms.
    pub window_start_ms: i64,
    /// Window end, exclusive, UTC ms.
    pub window_end_ms: i64,
    /// Billing dimensions.
    pub dims: Dims,
    /// Billable or not.
    pub row_kind: RowKind,
    /// 0 for the on-time row, 1, 2, ... for corrections.
    pub correction_seq: u32,
    /// Number of counted events.
    pub event_count: u64,
    /// Token sums.
    pub tokens: TokenCounts,
    /// ISO 4217 currency of the amounts.
    pub currency: String,
    /// Gross in micro-units.
    pub gross_micros: i64,
    /// Shares, sorted by beneficiary.
    pub shares: Vec<PartnerShare>,
    /// gross − Σ shares, micro-units.
    pub net_micros: i64,
    /// Price-book version that priced the row.
    pub price_book_version: String,
    /// Share-rule version that attributed the row.
    pub share_rule_version: String,
    /// Input topic.
    pub source_topic: String,
    /// Input partition.
    pub source_partition: i32,
    /// Smallest input offset counted.
    pub first_offset: i64,
    /// Largest input offset counted.
    pub last_offset: i64,
    /// Earliest event time counted, UTC ms.
    pub first_event_time_ms: i64,
    /// Latest event time counted, UTC ms.
    pub last_event_time_ms: i64,
}
