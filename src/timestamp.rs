//! Timestamps as a Go-written database may hold them, and the one canonical form we write.
//!
//! Written form: `YYYY-MM-DD HH:MM:SS.ffffff` in UTC — it sorts correctly next to
//! `CURRENT_TIMESTAMP` values (`YYYY-MM-DD HH:MM:SS`) and SQLite's date functions read it.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

pub type Timestamp = DateTime<Utc>;

/// The canonical stored form. Written digit by digit: every serve formats several of these on
/// the /key path, where chrono's runtime format string (parse + `DelayedFormat`) showed in the
/// profile. Same text as `format("%Y-%m-%d %H:%M:%S%.6f")`, which years outside 0–9999 still use.
pub fn to_db(t: Timestamp) -> String {
    use chrono::{Datelike, Timelike};
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return t.format("%Y-%m-%d %H:%M:%S%.6f").to_string();
    }
    let nanos = t.nanosecond();
    // A leap second carries nanoseconds past 1e9 and prints as second 60, as chrono does.
    let fields = [
        (year as u32, 4),
        (t.month(), 2),
        (t.day(), 2),
        (t.hour(), 2),
        (t.minute(), 2),
        (t.second() + nanos / 1_000_000_000, 2),
        (nanos / 1_000 % 1_000_000, 6),
    ];
    let mut out = [0u8; 26];
    let mut at = 0;
    for (i, (value, width)) in fields.into_iter().enumerate() {
        if i > 0 {
            out[at] = b" -- ::."[i];
            at += 1;
        }
        let mut v = value;
        for slot in out[at..at + width].iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
        at += width;
    }
    // Only ASCII digits and separators were written.
    String::from_utf8_lossy(&out).into_owned()
}

/// The API form: RFC 3339 in UTC.
pub fn to_api(t: Timestamp) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Parses RFC 3339 only (what the admin API accepts).
pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Parses every form a Go-written or Rust-written row may hold:
/// `YYYY-MM-DD HH:MM:SS` (CURRENT_TIMESTAMP), RFC 3339 with `Z`/offset/fractions,
/// `2006-01-02 15:04:05.999999999-07:00` (Go's SQLite driver), Go's `time.String()` form
/// (`… +0000 UTC`, optionally with a monotonic `m=+…` suffix) and our own canonical form.
pub fn parse_db(s: &str) -> Option<Timestamp> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    // Go's time.String() may append a monotonic clock reading.
    let s = s.split(" m=").next().unwrap_or(s);
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    // Only the date/time separator at byte 10 ("UTC" holds a T too).
    let normalized = match s.as_bytes().get(10) {
        Some(b'T' | b't') => format!("{} {}", &s[..10], &s[11..]),
        _ => s.to_string(),
    };
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%.f%z",
        "%Y-%m-%d %H:%M:%S%.f %z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(&normalized, fmt) {
            return Some(t.with_timezone(&Utc));
        }
    }
    // `… +0000 UTC`: drop the zone abbreviation, keep the numeric offset.
    if let Some((head, _abbrev)) = normalized.rsplit_once(' ') {
        if let Ok(t) = DateTime::parse_from_str(head, "%Y-%m-%d %H:%M:%S%.f %z") {
            return Some(t.with_timezone(&Utc));
        }
    }
    let naive = normalized.trim_end_matches(['Z', 'z']);
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(naive, fmt) {
            return Some(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(naive, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Timestamp {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn reads_every_form_a_go_database_holds() {
        let want = at(2026, 1, 2, 3, 4, 5);
        for s in [
            "2026-01-02 03:04:05",
            "2026-01-02T03:04:05Z",
            "2026-01-02T05:04:05+02:00",
            "2026-01-02 03:04:05+00:00",
            "2026-01-01 20:04:05-07:00",
            "2026-01-02 03:04:05 +0000 UTC",
            "2026-01-02 03:04:05.000000",
            "2026-01-02T03:04:05",
        ] {
            assert_eq!(parse_db(s), Some(want), "{s}");
        }
        let frac = parse_db("2026-01-02 03:04:05.123456789-07:00").unwrap();
        assert_eq!(
            frac,
            at(2026, 1, 2, 10, 4, 5) + chrono::Duration::nanoseconds(123_456_789)
        );
        let rfc_frac = parse_db("2026-01-02T03:04:05.5Z").unwrap();
        assert_eq!(rfc_frac, want + chrono::Duration::milliseconds(500));
        let mono = parse_db("2026-01-02 03:04:05.1 +0000 UTC m=+0.000012").unwrap();
        assert_eq!(mono, want + chrono::Duration::milliseconds(100));
    }

    #[test]
    fn garbage_is_none() {
        for s in ["", "yesterday", "2026-13-01 00:00:00", "12345"] {
            assert_eq!(parse_db(s), None, "{s}");
        }
    }

    #[test]
    fn canonical_form_round_trips_and_sorts_with_current_timestamp() {
        let t = at(2026, 1, 2, 3, 4, 5) + chrono::Duration::microseconds(42);
        let s = to_db(t);
        assert_eq!(s, "2026-01-02 03:04:05.000042");
        assert_eq!(parse_db(&s), Some(t));
        assert!("2026-01-02 03:04:05" < s.as_str());
        assert!(s.as_str() < "2026-01-02 03:04:06");
    }

    #[test]
    fn canonical_form_matches_chronos_format_string() {
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 1_999_999))
            .unwrap()
            .and_utc();
        for t in [
            at(2026, 1, 2, 3, 4, 5) + chrono::Duration::nanoseconds(123_456_789),
            at(999, 12, 31, 23, 59, 59),
            at(10_000, 1, 1, 0, 0, 0),
            leap,
        ] {
            assert_eq!(to_db(t), t.format("%Y-%m-%d %H:%M:%S%.6f").to_string());
        }
    }

    #[test]
    fn api_form_is_rfc3339_utc() {
        assert_eq!(to_api(at(2026, 1, 2, 3, 4, 5)), "2026-01-02T03:04:05Z");
        assert_eq!(
            parse_rfc3339("2026-01-02T03:04:05Z"),
            Some(at(2026, 1, 2, 3, 4, 5))
        );
        assert_eq!(parse_rfc3339("next tuesday"), None);
    }
}
