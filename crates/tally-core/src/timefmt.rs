//! Timestamps as text, via the `time` crate: RFC 3339 in, UTC milliseconds out.
//!
//! Two readers: [`parse_rfc3339_ms`] takes any RFC 3339 time (fractions, offsets; for
//! command lines), [`parse_strict_utc_ms`] only the `YYYY-MM-DDTHH:MM:SSZ` form that
//! contracts use, so an effective date can be read one way only.

use time::format_description::FormatItem;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

const STRICT_UTC: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
const UTC_MILLIS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

fn to_ms(time: OffsetDateTime) -> Option<i64> {
    i64::try_from(time.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

/// Parses RFC 3339 (`2025-01-01T02:00:00.25+02:00`) into UTC milliseconds since the
/// epoch; sub-millisecond digits are truncated toward the past.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    OffsetDateTime::parse(text, &Rfc3339).ok().and_then(to_ms)
}

/// Parses exactly `YYYY-MM-DDTHH:MM:SSZ` (four-digit year, no fraction, no other
/// offset, no leap second) into UTC milliseconds since the epoch.
pub fn parse_strict_utc_ms(text: &str) -> Option<i64> {
    if text.len() != 20 || !text.as_bytes()[0].is_ascii_digit() {
        return None;
    }
    PrimitiveDateTime::parse(text, STRICT_UTC)
        .ok()
        .map(PrimitiveDateTime::assume_utc)
        .and_then(to_ms)
}

/// Formats UTC milliseconds as `YYYY-MM-DDTHH:MM:SSZ`, with `.mmm` before the `Z`
/// when the time is not a whole second. Times outside the years the `time` crate
/// represents are written as raw milliseconds.
pub fn format_utc_ms(time_ms: i64) -> String {
    let Ok(time) = OffsetDateTime::from_unix_timestamp_nanos(i128::from(time_ms) * 1_000_000)
    else {
        return format!("{time_ms} ms");
    };
    let format = if time_ms.rem_euclid(1000) == 0 {
        STRICT_UTC
    } else {
        UTC_MILLIS
    };
    time.format(format)
        .unwrap_or_else(|_| format!("{time_ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rfc3339_with_offsets_and_fractions() {
        assert_eq!(
            parse_rfc3339_ms("2025-01-01T00:00:00Z"),
            Some(1_735_689_600_000)
        );
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00.25Z"), Some(250));
        assert_eq!(
            parse_rfc3339_ms("2025-01-01T02:00:00+02:00"),
            Some(1_735_689_600_000)
        );
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59.9995Z"), Some(-1));
        assert_eq!(parse_rfc3339_ms("2025-02-29T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    #[test]
    fn strict_form_accepts_only_whole_utc_seconds() {
        assert_eq!(parse_strict_utc_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_strict_utc_ms("2026-01-01T00:00:00Z"),
            Some(1_767_225_600_000)
        );
        assert_eq!(
            parse_strict_utc_ms("2024-02-29T12:30:15Z"),
            Some(1_709_209_815_000)
        );
        assert_eq!(parse_strict_utc_ms("1969-12-31T23:59:59Z"), Some(-1000));
        for text in [
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00.000Z",
            "2026-01-01T00:00:00+00:00",
            "2026-01-01 00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:60:00Z",
            "2026-01-01T00:00:60Z",
            "+026-01-01T00:00:00Z",
            "",
        ] {
            assert_eq!(parse_strict_utc_ms(text), None, "{text}");
        }
    }

    #[test]
    fn formats_back_what_it_reads() {
        for text in [
            "1970-01-01T00:00:00Z",
            "2024-02-29T12:30:15Z",
            "1969-12-31T23:59:59Z",
        ] {
            let ms = parse_strict_utc_ms(text).expect("valid");
            assert_eq!(format_utc_ms(ms), text);
        }
        assert_eq!(format_utc_ms(1), "1970-01-01T00:00:00.001Z");
    }
}
