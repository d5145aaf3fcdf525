//! Device-side frame building into a caller-owned, reused buffer.
//!
//! The load generator sends tens of thousands of frames per second from one
//! core, so nothing here allocates once the buffer has grown to frame size:
//! numbers and timestamps are written digit by digit instead of through
//! `format!`. Timestamps come in as unix milliseconds plus the device's UTC
//! offset (this module never reads a clock).

use std::ops::Range;

use super::crc;
use super::crypt::{self, Key};

/// The header of a device frame, in the order HJ 212 prints it.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    /// 17-digit QN, or `None` for 2005 uploads that carry none.
    pub qn: Option<&'a [u8]>,
    /// System type (`31` flue gas, `32` waste water, `91` replies).
    pub st: &'a str,
    /// Command number, printed with 4 digits.
    pub cn: u16,
    /// Access password.
    pub pw: &'a str,
    /// Device MN.
    pub mn: &'a str,
    /// Flag, or `None` (2005 uploads without ack).
    pub flag: Option<u8>,
    /// `(PNUM, PNO)` for split packets.
    pub split: Option<(u32, u32)>,
}

/// Appends a whole frame (`##` length, segment, CRC, CR LF) to `out` (which may
/// already hold earlier frames waiting to be written). `body` appends the CP area (what goes between `CP=&&` and
/// `&&`). With `key`, the CP area is SM4-encrypted after the CRC was computed
/// over the plaintext segment (HJ 212-2025 App. A.2, raw wire form).
///
/// Returns the byte range of the CP area inside `out`. Panics if the segment
/// exceeds the 4-digit length field (9999 bytes).
pub fn device_frame(
    out: &mut Vec<u8>,
    head: &Head<'_>,
    key: Option<&Key>,
    body: impl FnOnce(&mut Vec<u8>),
) -> Range<usize> {
    let start = out.len();
    out.extend_from_slice(b"##0000");
    if let Some(qn) = head.qn {
        out.extend_from_slice(b"QN=");
        out.extend_from_slice(qn);
        out.push(b';');
    }
    out.extend_from_slice(b"ST=");
    out.extend_from_slice(head.st.as_bytes());
    out.extend_from_slice(b";CN=");
    put_padded(out, u64::from(head.cn), 4);
    out.extend_from_slice(b";PW=");
    out.extend_from_slice(head.pw.as_bytes());
    out.extend_from_slice(b";MN=");
    out.extend_from_slice(head.mn.as_bytes());
    if let Some(flag) = head.flag {
        out.extend_from_slice(b";Flag=");
        put_uint(out, u64::from(flag));
    }
    if let Some((pnum, pno)) = head.split {
        out.extend_from_slice(b";PNUM=");
        put_uint(out, u64::from(pnum));
        out.extend_from_slice(b";PNO=");
        put_uint(out, u64::from(pno));
    }
    out.extend_from_slice(b";CP=&&");
    let cp_start = out.len();
    body(out);
    let cp_end = out.len();
    out.extend_from_slice(b"&&");
    let seg_len = out.len() - start - 6;
    assert!(seg_len <= 9999, "HJ 212 segment of {seg_len} bytes");
    let crc_value = crc::hj212(&out[start + 6..]);
    if let Some(k) = key {
        crypt::encrypt_in_place(k, &mut out[cp_start..cp_end]);
    }
    let mut len_digits = [0u8; 4];
    let mut n = seg_len;
    for d in len_digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out[start + 2..start + 6].copy_from_slice(&len_digits);
    out.extend_from_slice(&crc::format_hex4(crc_value));
    out.extend_from_slice(b"\r\n");
    cp_start..cp_end
}

/// Appends `n` in decimal.
pub fn put_uint(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal(n, &mut [0; 20]).as_bytes());
}

/// `n` in decimal, written into `buf` without allocating (frame and JSON writers).
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

/// Appends `n` zero-padded to `width` digits (more digits if it needs them).
pub fn put_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = 1;
    let mut m = n / 10;
    while m > 0 {
        digits += 1;
        m /= 10;
    }
    for _ in digits..width {
        out.push(b'0');
    }
    put_uint(out, n);
}

/// Appends `v` with exactly `decimals` fraction digits (rounded half away
/// from zero), e.g. `12.50`. Non-finite values are written as `0`.
pub fn put_fixed(out: &mut Vec<u8>, v: f64, decimals: u8) {
    const POW: [u64; 7] = [1, 10, 100, 1000, 10_000, 100_000, 1_000_000];
    if !v.is_finite() {
        out.push(b'0');
        return;
    }
    let scale = POW[usize::from(decimals.min(6))];
    let scaled = (v.abs() * scale as f64).round() as u64;
    if v < 0.0 && scaled != 0 {
        out.push(b'-');
    }
    put_uint(out, scaled / scale);
    if decimals > 0 {
        out.push(b'.');
        put_padded(out, scaled % scale, usize::from(decimals.min(6)));
    }
}

/// A civil date and time (device-local).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    /// Year.
    pub year: i32,
    /// Month 1..=12.
    pub month: u32,
    /// Day 1..=31.
    pub day: u32,
    /// Hour 0..=23.
    pub hour: u32,
    /// Minute.
    pub minute: u32,
    /// Second.
    pub second: u32,
    /// Millisecond.
    pub milli: u32,
}

impl Civil {
    /// The local civil time of `unix_ms` at UTC offset `offset_s`.
    pub fn from_unix_ms(unix_ms: i64, offset_s: i32) -> Civil {
        let local = unix_ms + i64::from(offset_s) * 1000;
        let milli = local.rem_euclid(1000) as u32;
        let secs = local.div_euclid(1000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        // Days to civil date, proleptic Gregorian (H. Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Civil {
            year,
            month,
            day,
            hour: sod / 3600,
            minute: (sod / 60) % 60,
            second: sod % 60,
            milli,
        }
    }

    /// Appends `YYYYMMDDhhmmss` (DataTime, SystemTime, BeginTime).
    pub fn put_n14(&self, out: &mut Vec<u8>) {
        put_padded(out, self.year.max(0) as u64, 4);
        for v in [self.month, self.day, self.hour, self.minute, self.second] {
            put_padded(out, u64::from(v), 2);
        }
    }

    /// Appends `YYYYMMDDhhmmsszzz` (QN).
    pub fn put_qn(&self, out: &mut Vec<u8>) {
        self.put_n14(out);
        put_padded(out, u64::from(self.milli), 3);
    }

    /// The QN as a fixed array.
    pub fn qn(&self) -> [u8; 17] {
        let mut v = Vec::with_capacity(17);
        self.put_qn(&mut v);
        let mut a = [0u8; 17];
        a.copy_from_slice(&v);
        a
    }
}

/// Parses `YYYYMMDDhhmmss` (14 digits) into unix seconds at UTC offset `offset_s`.
pub fn parse_n14(text: &[u8], offset_s: i32) -> Option<i64> {
    if text.len() != 14 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |r: Range<usize>| {
        text[r]
            .iter()
            .fold(0i64, |a, &c| a * 10 + i64::from(c - b'0'))
    };
    let (y, mo, d, h, mi, s) = (
        num(0..4),
        num(4..6),
        num(6..8),
        num(8..10),
        num(10..12),
        num(12..14),
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Civil to days (inverse of the algorithm above).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy.rem_euclid(400);
    let mp = if mo > 2 { mo - 3 } else { mo + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s - i64::from(offset_s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Options, decode};
    use bytes::Bytes;
    use chrono::TimeZone;

    #[test]
    fn numbers() {
        let mut v = Vec::new();
        put_fixed(&mut v, 12.345, 2);
        v.push(b' ');
        put_fixed(&mut v, -0.004, 2);
        v.push(b' ');
        put_fixed(&mut v, -1.5, 1);
        v.push(b' ');
        put_fixed(&mut v, 7.0, 0);
        v.push(b' ');
        put_padded(&mut v, 42, 4);
        assert_eq!(v, b"12.35 0.00 -1.5 7 0042");
    }

    #[test]
    fn civil_round_trip() {
        // 2024-06-01T00:58:57.223Z is 08:58:57.223 in Beijing.
        let ms = chrono::Utc
            .with_ymd_and_hms(2024, 6, 1, 0, 58, 57)
            .unwrap()
            .timestamp_millis()
            + 223;
        let c = Civil::from_unix_ms(ms, 8 * 3600);
        assert_eq!(&c.qn(), b"20240601085857223");
        assert_eq!(parse_n14(b"20240601085857", 8 * 3600), Some(ms / 1000));
        for ms in [0i64, 951_782_400_000, 1_709_164_800_000, 4_102_444_799_000] {
            let c = Civil::from_unix_ms(ms, 0);
            let mut t = Vec::new();
            c.put_n14(&mut t);
            let chrono_text = chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .format("%Y%m%d%H%M%S")
                .to_string();
            assert_eq!(t, chrono_text.as_bytes());
            assert_eq!(parse_n14(&t, 0), Some(ms / 1000));
        }
    }

    /// The digest's 9.2 A upload, rebuilt byte for byte.
    #[test]
    fn rebuilds_the_standard_upload() {
        let mut out = Vec::new();
        device_frame(
            &mut out,
            &Head {
                qn: Some(b"20240601085857223"),
                st: "31",
                cn: 2011,
                pw: "123456",
                mn: "010000A8900016F000169DC0",
                flag: Some(5),
                split: None,
            },
            None,
            |b| {
                b.extend_from_slice(b"DataTime=20240601085857;a21026-Rtd=12.5,a21026-ZsRtd=15.1,a21026-Flag=N;a21002-Rtd=35.2,a21002-ZsRtd=42.6,a21002-Flag=N;a34013-Rtd=3.1,a34013-Flag=N;a19001-Rtd=9.8,a19001-Flag=N;a00000-Rtd=28.15,a00000-Flag=N")
            },
        );
        assert_eq!(&out[..], &b"##0295QN=20240601085857223;ST=31;CN=2011;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&DataTime=20240601085857;a21026-Rtd=12.5,a21026-ZsRtd=15.1,a21026-Flag=N;a21002-Rtd=35.2,a21002-ZsRtd=42.6,a21002-Flag=N;a34013-Rtd=3.1,a34013-Flag=N;a19001-Rtd=9.8,a19001-Flag=N;a00000-Rtd=28.15,a00000-Flag=N&&3E80\r\n"[..]);
    }

    /// An encrypted 2025 frame decodes with the key and matches the standard's CRC rule.
    #[test]
    fn encrypted_frame_decodes() {
        let key = [0x30u8; 16];
        let mut out = Vec::new();
        let cp = device_frame(
            &mut out,
            &Head {
                qn: Some(b"20240520210700000"),
                st: "31",
                cn: 2051,
                pw: "123456",
                mn: "010000A8900016F000169DC0",
                flag: Some(9),
                split: None,
            },
            Some(&key),
            |b| {
                b.extend_from_slice(b"DataTime=20240520210600;a01011-Min=1.35,a01011-Avg=1.35,a01011-Max=1.35,a01011-Flag=N;a01012-Min=9.3,a01012-Avg=9.3,a01012-Max=9.3,a01012-Flag=N;a01014-Min=3.20,a01014-Avg=3.211,a01014-Max=3.212,a01014-Flag=N")
            },
        );
        assert_eq!(cp.len(), 208);
        assert_eq!(crypt::sniff(&out[cp]), Some(crypt::WireForm::Raw));
        let now = chrono::Utc.with_ymd_and_hms(2024, 5, 20, 13, 8, 0).unwrap();
        let f = decode(
            Bytes::from(out),
            &Options::new(now),
            &crate::ExampleKeyLookup,
        );
        assert!(!f.has_error(), "{:?}", f.findings);
        assert_eq!(f.encryption, Some(crypt::WireForm::Raw));
        assert_eq!(f.param("DataTime"), Some("20240520210600"));
    }
}
