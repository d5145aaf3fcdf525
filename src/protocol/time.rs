//! Device timestamps: QN, DataTime, SystemTime.
//!
//! Rule (HJ 212-2017 Table 4): `DataTime`/`SystemTime` are N14 `YYYYMMDDhhmmss`;
//! QN is 17 digits `YYYYMMDDhhmmsszzz`. None carries a zone; in practice they
//! are Beijing local time (UTC+8), configurable per gateway. Many devices send
//! 17-digit DataTimes (milliseconds appended): parsed and flagged, not rejected.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};

/// Parses `YYYYMMDDhhmmss` or `YYYYMMDDhhmmsszzz` as local time in `tz`.
pub fn parse_local(text: &[u8], tz: FixedOffset) -> Option<DateTime<FixedOffset>> {
    if !(text.len() == 14 || text.len() == 17) || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| -> u32 {
        text[r]
            .iter()
            .fold(0u32, |a, &d| a * 10 + (d - b'0') as u32)
    };
    let date = NaiveDate::from_ymd_opt(n(0..4) as i32, n(4..6), n(6..8))?;
    let ms = if text.len() == 17 { n(14..17) } else { 0 };
    let naive: NaiveDateTime = date.and_hms_milli_opt(n(8..10), n(10..12), n(12..14), ms)?;
    tz.from_local_datetime(&naive).single()
}

/// Formats a local instant as `YYYYMMDDhhmmss` (for SystemTime, BeginTime...).
pub fn format_n14(t: DateTime<FixedOffset>) -> String {
    t.format("%Y%m%d%H%M%S").to_string()
}

/// Formats a QN: `YYYYMMDDhhmmsszzz` in the device's local time.
pub fn format_qn(t: DateTime<Utc>, tz: FixedOffset) -> String {
    t.with_timezone(&tz).format("%Y%m%d%H%M%S%3f").to_string()
}

/// RFC 3339 with the device offset; milliseconds only when the device sent them.
pub fn rfc3339(t: DateTime<FixedOffset>, with_ms: bool) -> String {
    if with_ms {
        t.format("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%:z").to_string()
    }
}

/// Beijing time, the default device zone.
pub fn beijing() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("valid offset")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let t = parse_local(b"20240601085857", beijing()).unwrap();
        assert_eq!(rfc3339(t, false), "2024-06-01T08:58:57+08:00");
        assert_eq!(
            t.with_timezone(&Utc).to_rfc3339(),
            "2024-06-01T00:58:57+00:00"
        );
        let t = parse_local(b"20160824003817000", beijing()).unwrap();
        assert_eq!(rfc3339(t, true), "2016-08-24T00:38:17.000+08:00");
        assert!(parse_local(b"20161324003817", beijing()).is_none());
        assert!(parse_local(b"2016082400381", beijing()).is_none());
        assert_eq!(format_n14(t), "20160824003817");
        let now = Utc.with_ymd_and_hms(2024, 6, 1, 0, 58, 57).unwrap();
        assert_eq!(format_qn(now, beijing()), "20240601085857000");
    }
}
