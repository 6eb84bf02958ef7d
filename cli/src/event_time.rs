//! Event times: an RFC 3339 string, or a number of seconds (or another unit)
//! since the Unix epoch, read exactly to the nanosecond — a decimal number
//! is never rounded through a float, so a window boundary is exact.

use serde_json::value::RawValue;
use tiered_dedup::Timestamp;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::cli::TimeUnit;
use crate::json::string_content;

/// Why a time value was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TimeError {
    /// The value is `null`.
    Null,
    /// Anything else, with the reason.
    Bad(String),
}

/// The timestamp a raw JSON value stands for.
pub fn parse_event_time(raw: &RawValue, unit: TimeUnit) -> Result<Timestamp, TimeError> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => parse_rfc3339(&string_content(raw)).map_err(TimeError::Bad),
        Some(b'-' | b'0'..=b'9') => parse_number(text, unit).map_err(TimeError::Bad),
        Some(b'n') => Err(TimeError::Null),
        _ => Err(TimeError::Bad(format!(
            "`{}` is neither an RFC 3339 string nor a number of {}",
            shorten(text),
            unit_name(unit)
        ))),
    }
}

/// `2026-11-22T10:00:00.5+01:00` (any offset, `Z`, up to nanoseconds).
pub fn parse_rfc3339(s: &str) -> Result<Timestamp, String> {
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
        format!(
            "`{}` is not an RFC 3339 time ({e}; e.g. 2026-11-22T10:00:00Z)",
            shorten(s)
        )
    })?;
    let nanos = t.unix_timestamp_nanos();
    u64::try_from(nanos)
        .map(Timestamp::from_nanos)
        .map_err(|_| format!("`{s}` is outside 1970-01-01 ..= 2554-07-21"))
}

/// A JSON number of `unit`s since the epoch, exactly: the decimal digits are
/// scaled by powers of ten, and anything below a nanosecond is dropped.
pub fn parse_number(text: &str, unit: TimeUnit) -> Result<Timestamp, String> {
    let bad = || {
        format!(
            "`{}` is not a non-negative number of {}",
            shorten(text),
            unit_name(unit)
        )
    };
    let bytes = text.as_bytes();
    if bytes.first() == Some(&b'-') {
        // `-0` and `-0.0` are zero; anything else is before the epoch.
        if bytes[1..]
            .iter()
            .all(|&b| matches!(b, b'0' | b'.' | b'e' | b'E' | b'+' | b'-'))
        {
            return Ok(Timestamp::ZERO);
        }
        return Err(format!(
            "`{}` is before 1970-01-01 (negative)",
            shorten(text)
        ));
    }
    // Up to 38 significant digits in `mantissa`; `exp10` the power of ten
    // it is scaled by. Invariant: value = mantissa · 10^exp10, truncated.
    let mut mantissa: u128 = 0;
    let mut significant = 0u32;
    let mut exp10: i64 = 0;
    let mut i = 0;
    let mut seen_digit = false;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        push_digit(&mut mantissa, &mut significant, &mut exp10, bytes[i], false);
        seen_digit = true;
        i += 1;
    }
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            push_digit(&mut mantissa, &mut significant, &mut exp10, bytes[i], true);
            seen_digit = true;
            i += 1;
        }
    }
    if !seen_digit {
        return Err(bad());
    }
    if i < bytes.len() && matches!(bytes[i], b'e' | b'E') {
        i += 1;
        let negative = match bytes.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let start = i;
        let mut e: i64 = 0;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            e = (e * 10 + i64::from(bytes[i] - b'0')).min(1 << 40);
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        exp10 += if negative { -e } else { e };
    }
    if i != bytes.len() {
        return Err(bad());
    }
    let exp = exp10 + i64::from(unit.nanos_exponent());
    let nanos = if mantissa == 0 {
        0
    } else if exp >= 0 {
        u32::try_from(exp)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .and_then(|scale| mantissa.checked_mul(scale))
            .ok_or_else(|| too_late(text))?
    } else {
        u32::try_from(-exp)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .map_or(0, |scale| mantissa / scale)
    };
    u64::try_from(nanos)
        .map(Timestamp::from_nanos)
        .map_err(|_| too_late(text))
}

fn push_digit(mantissa: &mut u128, significant: &mut u32, exp10: &mut i64, d: u8, fraction: bool) {
    let d = u128::from(d - b'0');
    if *significant == 0 && d == 0 {
        // A leading zero: no significant digit yet.
        if fraction {
            *exp10 -= 1;
        }
        return;
    }
    if *significant < 38 {
        *mantissa = *mantissa * 10 + d;
        *significant += 1;
        if fraction {
            *exp10 -= 1;
        }
    } else if !fraction {
        // An integer digit past the 38th: the value is ten times larger (the
        // dropped digits only truncate).
        *exp10 += 1;
    }
}

fn too_late(text: &str) -> String {
    format!("`{}` is after 2554-07-21 (too large)", shorten(text))
}

fn unit_name(unit: TimeUnit) -> &'static str {
    match unit {
        TimeUnit::S => "seconds",
        TimeUnit::Ms => "milliseconds",
        TimeUnit::Us => "microseconds",
        TimeUnit::Ns => "nanoseconds",
    }
}

/// At most 40 characters of a value, for messages.
fn shorten(s: &str) -> String {
    if s.chars().count() <= 40 {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(40).collect::<String>())
    }
}

/// An RFC 3339 rendering of a timestamp (UTC), for messages.
pub fn format_timestamp(t: Timestamp) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.as_nanos())).map_or_else(
        |_| format!("{} ns", t.as_nanos()),
        |dt| {
            dt.format(&Rfc3339)
                .unwrap_or_else(|_| format!("{} ns", t.as_nanos()))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(text: &str, unit: TimeUnit) -> Result<u64, String> {
        parse_number(text, unit).map(Timestamp::as_nanos)
    }

    #[test]
    fn numbers_are_exact_to_the_nanosecond() {
        assert_eq!(
            n("1700000000.123456789", TimeUnit::S),
            Ok(1_700_000_000_123_456_789)
        );
        assert_eq!(
            n("1700000000.1234567899", TimeUnit::S),
            Ok(1_700_000_000_123_456_789)
        );
        assert_eq!(n("1.7e9", TimeUnit::S), Ok(1_700_000_000_000_000_000));
        assert_eq!(n("17E+8", TimeUnit::S), Ok(1_700_000_000_000_000_000));
        assert_eq!(
            n("1700000000123", TimeUnit::Ms),
            Ok(1_700_000_000_123_000_000)
        );
        assert_eq!(
            n("1700000000123456", TimeUnit::Us),
            Ok(1_700_000_000_123_456_000)
        );
        assert_eq!(n("5", TimeUnit::Ns), Ok(5));
        assert_eq!(n("0.5", TimeUnit::Ns), Ok(0));
        assert_eq!(n("0", TimeUnit::S), Ok(0));
        assert_eq!(n("-0.0", TimeUnit::S), Ok(0));
        assert_eq!(n("0.000000001", TimeUnit::S), Ok(1));
        assert_eq!(n("1e-400", TimeUnit::S), Ok(0));
        assert!(n("-1", TimeUnit::S).unwrap_err().contains("negative"));
        assert!(n("1e30", TimeUnit::S).unwrap_err().contains("too large"));
        assert!(n("18446744073.709551616", TimeUnit::S).is_err());
        assert_eq!(n("18446744073.709551615", TimeUnit::S), Ok(u64::MAX));
        assert!(n("1.", TimeUnit::S).is_ok());
        assert!(n(".", TimeUnit::S).is_err());
        assert!(n("1e", TimeUnit::S).is_err());
        assert!(n("12x", TimeUnit::S).is_err());
        let long = format!("1{}", "0".repeat(60));
        assert!(n(&long, TimeUnit::Ns).is_err());
        let tiny = format!("0.{}1", "0".repeat(60));
        assert_eq!(n(&tiny, TimeUnit::S), Ok(0));
    }

    #[test]
    fn rfc3339_with_offsets_and_fractions() {
        let z = parse_rfc3339("2023-11-14T22:13:20Z").unwrap();
        assert_eq!(z.as_nanos(), 1_700_000_000_000_000_000);
        let off = parse_rfc3339("2023-11-14T23:13:20.000000001+01:00").unwrap();
        assert_eq!(off.as_nanos(), 1_700_000_000_000_000_001);
        assert!(parse_rfc3339("2023-11-14 22:13:20").is_err());
        assert!(parse_rfc3339("1969-12-31T23:59:59Z").is_err());
        assert_eq!(format_timestamp(z), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn raw_values_choose_the_encoding() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        assert_eq!(
            parse_event_time(&raw("\"1970-01-01T00:00:01Z\""), TimeUnit::S),
            Ok(Timestamp::from_secs(1))
        );
        assert_eq!(
            parse_event_time(&raw("1.5"), TimeUnit::S),
            Ok(Timestamp::from_millis(1500))
        );
        assert_eq!(
            parse_event_time(&raw("null"), TimeUnit::S),
            Err(TimeError::Null)
        );
        assert!(matches!(
            parse_event_time(&raw("true"), TimeUnit::S),
            Err(TimeError::Bad(_))
        ));
    }
}
