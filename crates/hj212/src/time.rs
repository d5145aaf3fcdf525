//! Device timestamps: QN, DataTime, SystemTime.
//!
//! Rule (HJ 212-2017 Table 4): `DataTime`/`SystemTime` are N14 `YYYYMMDDhhmmss`;
//! QN is 17 digits `YYYYMMDDhhmmsszzz`. None carries a zone; in practice they
//! are Beijing local time (UTC+8), configurable per gateway. Many devices send
//! 17-digit DataTimes (milliseconds appended): parsed and flagged, not rejected.

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};

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
///
/// Written digit by digit (this runs for every frame at ingest); what the fast
/// path does not cover (years outside 0..=9999, leap seconds, offsets with
/// seconds) goes through chrono's formatter, which a test holds it equal to.
pub fn rfc3339(t: DateTime<FixedOffset>, with_ms: bool) -> String {
    let year = t.year();
    let offset = t.offset().local_minus_utc();
    if !(0..=9999).contains(&year) || t.nanosecond() >= 1_000_000_000 || offset % 60 != 0 {
        return rfc3339_chrono(t, with_ms);
    }
    let mut b = [0u8; 29];
    let mut n = 0;
    let mut put = |v: u32, digits: u32, sep: Option<u8>| {
        for d in (0..digits).rev() {
            b[n] = b'0' + (v / 10u32.pow(d) % 10) as u8;
            n += 1;
        }
        if let Some(c) = sep {
            b[n] = c;
            n += 1;
        }
    };
    put(year as u32, 4, Some(b'-'));
    put(t.month(), 2, Some(b'-'));
    put(t.day(), 2, Some(b'T'));
    put(t.hour(), 2, Some(b':'));
    put(t.minute(), 2, Some(b':'));
    if with_ms {
        put(t.second(), 2, Some(b'.'));
        put(t.nanosecond() / 1_000_000, 3, None);
    } else {
        put(t.second(), 2, None);
    }
    let minutes = offset.unsigned_abs() / 60;
    put(0, 0, Some(if offset < 0 { b'-' } else { b'+' }));
    put(minutes / 60, 2, Some(b':'));
    put(minutes % 60, 2, None);
    std::str::from_utf8(&b[..n]).expect("ASCII").to_owned()
}

/// [`rfc3339`] through chrono's formatter: the general case and the reference.
pub fn rfc3339_chrono(t: DateTime<FixedOffset>, with_ms: bool) -> String {
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
    fn rfc3339_matches_chrono_everywhere() {
        // A deterministic walk over instants (incl. sub-second), years at the
        // edges of the fast path and beyond, and offsets east and west, with
        // minutes and with seconds.
        let offsets = [
            0,
            8 * 3600,
            -5 * 3600,
            5 * 3600 + 1800,
            -1800,
            3600 + 7,
            -(14 * 3600),
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut cases = vec![
            DateTime::from_timestamp(-62_167_219_200, 0).unwrap(), // 0000-01-01
            DateTime::from_timestamp(253_402_300_799, 999_999_999).unwrap(), // 9999-12-31
            DateTime::from_timestamp(253_402_300_800, 0).unwrap(), // 10000-01-01
            DateTime::from_timestamp(-62_167_219_201, 0).unwrap(), // year -1
            DateTime::from_timestamp(1_483_228_799, 1_500_000_000).unwrap(), // leap second
        ];
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = (x % 4_102_444_800) as i64; // 1970..2100
            cases.push(DateTime::from_timestamp(secs, (x >> 33) as u32 % 1_000_000_000).unwrap());
        }
        for (i, t) in cases.iter().enumerate() {
            let tz = FixedOffset::east_opt(offsets[i % offsets.len()]).unwrap();
            let t = t.with_timezone(&tz);
            for ms in [false, true] {
                assert_eq!(rfc3339(t, ms), rfc3339_chrono(t, ms), "{t:?} ms={ms}");
            }
        }
    }

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
