//! Deterministic row identity.
//!
//! A row's id is the lowercase hex of the first 16 bytes of SHA-256 over an unambiguous
//! encoding of everything that names the row: source topic and partition, window,
//! dims, price-book and share-rule versions, row kind and correction sequence. It is a
//! pure function of those fields, so replaying the same input with the same contracts
//! yields the same ids, and two different rows cannot share an id short of a 128-bit
//! hash collision.
//!
//! Encoding (version-tagged so a future change cannot collide with today's ids):
//! - the tag `tally.row_id.v1`, length-prefixed like every string;
//! - strings: length as big-endian `u64`, then the UTF-8 bytes;
//! - optional strings: `0x00` for none, `0x01` then the string;
//! - integers: fixed-width big-endian;
//! - the cloud and the row kind by their schema symbols (text), so reordering an enum
//!   never changes an id.

use sha2::{Digest, Sha256};

use crate::aggregate::{BillingAggregate, Dims, RowKind};
use crate::window::Window;

/// Everything that names one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowIdentity<'a> {
    /// Input topic.
    pub source_topic: &'a str,
    /// Input partition.
    pub source_partition: i32,
    /// The row's window.
    pub window: Window,
    /// The row's dims.
    pub dims: &'a Dims,
    /// Price-book version that priced the row.
    pub price_book_version: &'a str,
    /// Share-rule version that attributed the row.
    pub share_rule_version: &'a str,
    /// Billable or not.
    pub row_kind: RowKind,
    /// 0 on time, 1, 2, ... for corrections.
    pub correction_seq: u32,
}

/// Length of an id in bytes before hex encoding.
pub const ROW_ID_BYTES: usize = 16;

/// The row id: hex of the first [`ROW_ID_BYTES`] bytes of SHA-256 over the encoding.
pub fn row_id(identity: &RowIdentity<'_>) -> String {
    let mut hasher = Sha256::new();
    write_str(&mut hasher, "tally.row_id.v1");
    write_str(&mut hasher, identity.source_topic);
    hasher.update(identity.source_partition.to_be_bytes());
    hasher.update(identity.window.start_ms.to_be_bytes());
    hasher.update(identity.window.end_ms.to_be_bytes());
    write_str(&mut hasher, &identity.dims.tenant_id);
    write_str(&mut hasher, &identity.dims.model);
    write_str(&mut hasher, identity.dims.cloud.as_str());
    write_optional_str(&mut hasher, identity.dims.channel_partner.as_deref());
    write_str(&mut hasher, &identity.dims.region);
    write_str(&mut hasher, identity.price_book_version);
    write_str(&mut hasher, identity.share_rule_version);
    write_str(&mut hasher, identity.row_kind.as_str());
    hasher.update(identity.correction_seq.to_be_bytes());
    let digest = hasher.finalize();
    hex::encode(&digest[..ROW_ID_BYTES])
}

/// The id that `row`'s own naming fields give ([`row_id`] of its identity): what the
/// aggregator puts in `row.id`.
pub fn row_id_of(row: &BillingAggregate) -> String {
    row_id(&RowIdentity {
        source_topic: &row.source_topic,
        source_partition: row.source_partition,
        window: Window {
            start_ms: row.window_start_ms,
            end_ms: row.window_end_ms,
        },
        dims: &row.dims,
        price_book_version: &row.price_book_version,
        share_rule_version: &row.share_rule_version,
        row_kind: row.row_kind,
        correction_seq: row.correction_seq,
    })
}

fn write_str(hasher: &mut Sha256, text: &str) {
    hasher.update((text.len() as u64).to_be_bytes());
    hasher.update(text.as_bytes());
}

fn write_optional_str(hasher: &mut Sha256, text: Option<&str>) {
    match text {
        None => hasher.update([0u8]),
        Some(text) => {
            hasher.update([1u8]);
            write_str(hasher, text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Cloud;

    fn dims(tenant: &str, partner: Option<&str>, region: &str) -> Dims {
        Dims {
            tenant_id: tenant.to_owned(),
            model: "atlas-large".to_owned(),
            cloud: Cloud::Aws,
            channel_partner: partner.map(str::to_owned),
            region: region.to_owned(),
        }
    }

    fn identity<'a>(dims: &'a Dims, seq: u32) -> RowIdentity<'a> {
        RowIdentity {
            source_topic: "usage.events",
            source_partition: 3,
            window: Window {
                start_ms: 60_000,
                end_ms: 120_000,
            },
            dims,
            price_book_version: "2024-01",
            share_rule_version: "2024-01",
            row_kind: RowKind::Billable,
            correction_seq: seq,
        }
    }

    #[test]
    fn id_is_32_hex_chars_and_deterministic() {
        let dims = dims("t1", None, "us-east-1");
        let first = row_id(&identity(&dims, 0));
        assert_eq!(first.len(), 32);
        assert!(first.bytes().all(|byte| byte.is_ascii_hexdigit()));
        assert_eq!(first, row_id(&identity(&dims, 0)));
    }

    #[test]
    fn id_is_the_lowercase_hex_of_the_first_16_digest_bytes() {
        // SHA-256 of the encoding in the module docs, computed independently.
        let dims = dims("t1", Some("p"), "us-east-1");
        assert_eq!(
            row_id(&identity(&dims, 2)),
            "ad1358f80c06da05b510830fb53ec0b8"
        );
    }

    #[test]
    fn every_field_changes_the_id() {
        let base_dims = dims("t1", None, "us-east-1");
        let base = row_id(&identity(&base_dims, 0));
        let other_dims = dims("t1", Some(""), "us-east-1");
        assert_ne!(
            base,
            row_id(&identity(&other_dims, 0)),
            "none vs empty partner"
        );
        assert_ne!(base, row_id(&identity(&base_dims, 1)));
        let mut changed = identity(&base_dims, 0);
        changed.source_partition = 4;
        assert_ne!(base, row_id(&changed));
        let mut changed = identity(&base_dims, 0);
        changed.row_kind = RowKind::NonBillable;
        assert_ne!(base, row_id(&changed));
        let mut changed = identity(&base_dims, 0);
        changed.price_book_version = "2026-01";
        assert_ne!(base, row_id(&changed));
        let mut changed = identity(&base_dims, 0);
        changed.share_rule_version = "2026-02";
        assert_ne!(base, row_id(&changed));
        let mut changed = identity(&base_dims, 0);
        changed.window = Window {
            start_ms: 120_000,
            end_ms: 180_000,
        };
        assert_ne!(base, row_id(&changed));
    }

    #[test]
    fn length_prefixes_keep_field_boundaries_apart() {
        let split_one = dims("ab", None, "c");
        let split_two = dims("a", None, "bc");
        let mut one = identity(&split_one, 0);
        let mut two = identity(&split_two, 0);
        // Move text between adjacent string fields: ids must differ.
        one.price_book_version = "x";
        one.share_rule_version = "yz";
        two.price_book_version = "xy";
        two.share_rule_version = "z";
        assert_ne!(row_id(&one), row_id(&two));
    }
}
