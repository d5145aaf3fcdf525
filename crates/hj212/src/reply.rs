//! Replies and requests the gateway sends, byte-exact per dialect.
//!
//! Reply shapes (HJ 212-2017 App. C; HJ/T 212-2005 App. C; 2025 digest §7.2):
//!
//! ```text
//! 2017/2025  QN=<qn>;ST=91;CN=9014;PW=<pw>;MN=<mn>;Flag=<ver<<2>;CP=&&&&
//! 2005 9014  ST=91;CN=9014;CP=&&QN=<qn>;CN=<cn>[;PNO=..;PNUM=..]&&   (no PW/MN/Flag)
//! 2005 9013  ST=91;CN=9013;PW=<pw>;MN=<mn>;CP=&&QN=<qn>&&
//! 2005 9011  ST=91;CN=9011;PW=<pw>;MN=<mn>;Flag=0;CP=&&QN=<qn>;QnRtn=<n>&&
//! 2005 9012  ST=91;CN=9012;PW=<pw>;MN=<mn>;CP=&&QN=<qn>;ExeRtn=<n>&&
//! ```
//!
//! Replies carry the device's version bits with A = D = 0 and are never
//! encrypted. Requests use Flag 5 (2017), 9 (2025) or 3 (2005, as every
//! request in HJ/T 212-2005 App. C does).

use bytes::{BufMut, Bytes, BytesMut};

use super::codes::{self, Dir, Exchange};
use super::cp::{Pair, ValueKind};
use super::crc;
use super::crypt::{self, Key};
use super::dialect::Dialect;
use super::finding::{Finding, Severity, code as fcode};
use super::frame::{CrcCheck, Ending, Frame, Options, decode};
use super::header::Header;
use super::span::Span;

/// Wraps a data segment in the envelope: `##`, 4-digit length, CRC, CR LF.
pub fn envelope(segment: &[u8]) -> Bytes {
    envelope_with_crc(segment, crc::hj212(segment))
}

/// Same as [`envelope`] with a caller-supplied CRC (used for encrypted
/// frames, whose CRC covers the plaintext).
pub fn envelope_with_crc(segment: &[u8], crc_value: u16) -> Bytes {
    let mut out = BytesMut::with_capacity(segment.len() + 12);
    out.put_slice(b"##");
    out.put_slice(format!("{:04}", segment.len()).as_bytes());
    out.put_slice(segment);
    out.put_slice(&crc::format_hex4(crc_value));
    out.put_slice(b"\r\n");
    out.freeze()
}

/// Which acknowledgement an inbound device frame needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// 9014 data reply, for uploads with the ack bit.
    Data,
    /// 9013 notify reply, for notifies (1013, 9015 heartbeat, 2005 2072, 2025 1001/1014).
    Notify,
}

/// Decides the acknowledgement for a frame a device sent.
///
/// Uploads are acked only when Flag bit 0 asks for it (HJ 212-2017 §6.3.2);
/// notifies are answered when bit 0 is set or the frame has no Flag at all
/// (2005 notifies carry none). Replies (9011..9014) are never answered, even
/// with the bit set (platforms send `9014 Flag=5` in the wild).
pub fn ack_kind(frame: &Frame) -> Option<AckKind> {
    let cn = frame.cn_num()?;
    let wants = frame.flag_bits().is_some_and(|b| b.ack_requested());
    let dialect = frame.dialect.unwrap_or(Dialect::V2017);
    match codes::command(dialect, Dir::Up, cn).map(|c| c.exchange) {
        Some(Exchange::Reply) => None,
        Some(Exchange::Notify) if wants || frame.flag.is_none() => Some(AckKind::Notify),
        Some(Exchange::Notify) => None,
        _ if (9011..=9014).contains(&cn) => None,
        _ if wants => Some(AckKind::Data),
        _ => None,
    }
}

/// Builds the acknowledgement for `frame`, if it needs one.
pub fn ack(frame: &Frame) -> Option<Bytes> {
    let (_, seg) = ack_segment(frame)?;
    Some(envelope(&seg.bytes))
}

/// An acknowledgement's data segment with the positions of what it echoes, so
/// that [`ack_frame`] can describe it without parsing it back.
struct AckSegment {
    bytes: Vec<u8>,
    header: Header,
    /// Offset of the first byte after `CP=&&`.
    cp_body: usize,
    /// CP parameters as (key, value) spans.
    params: Vec<(Span, Span)>,
}

impl AckSegment {
    fn new(len: usize) -> Self {
        AckSegment {
            bytes: Vec::with_capacity(len),
            header: Header::default(),
            cp_body: 0,
            params: Vec::new(),
        }
    }
    fn push(&mut self, s: &str) {
        self.bytes.extend_from_slice(s.as_bytes());
    }
    /// `key=value`, returning the value's span.
    fn field(&mut self, key: &str, value: &str) -> Span {
        self.push(key);
        self.push("=");
        let start = self.bytes.len();
        self.push(value);
        Span::new(start, self.bytes.len())
    }
    fn open_cp(&mut self) {
        self.push("CP=&&");
        self.cp_body = self.bytes.len();
    }
    fn param(&mut self, key: &str, value: &str) {
        if !self.params.is_empty() {
            self.push(";");
        }
        let k = self.bytes.len();
        let v = self.field(key, value);
        self.params.push((Span::new(k, k + key.len()), v));
    }
}

fn ack_segment(frame: &Frame) -> Option<(AckKind, AckSegment)> {
    let kind = ack_kind(frame)?;
    let qn = frame.qn().unwrap_or("");
    let pw = frame.pw().unwrap_or("");
    let mn = frame.mn().unwrap_or("");
    // An unknown edition is answered with its own version bits.
    let reply_flag = match frame.dialect {
        Some(d) => d.reply_flag(),
        None => frame.flag.unwrap_or(0) & !3,
    };
    let mut s = AckSegment::new(qn.len() + pw.len() + mn.len() + 64);
    match (frame.dialect, kind) {
        (Some(Dialect::V2005), AckKind::Data) => {
            s.header.st = Some(s.field("ST", "91"));
            s.push(";");
            s.header.cn = Some(s.field("CN", "9014"));
            s.push(";");
            s.open_cp();
            if !qn.is_empty() {
                s.param("QN", qn);
            }
            s.param("CN", frame.cn().unwrap_or(""));
            if let (Some(pno), Some(pnum)) = (frame.pno(), frame.pnum()) {
                s.param("PNO", &pno.to_string());
                s.param("PNUM", &pnum.to_string());
            }
            s.push("&&");
        }
        (Some(Dialect::V2005), AckKind::Notify) => {
            s.header.st = Some(s.field("ST", "91"));
            s.push(";");
            s.header.cn = Some(s.field("CN", "9013"));
            s.push(";");
            s.header.pw = Some(s.field("PW", pw));
            s.push(";");
            s.header.mn = Some(s.field("MN", mn));
            s.push(";");
            s.open_cp();
            s.param("QN", qn);
            s.push("&&");
        }
        (_, kind) => {
            s.header.qn = Some(s.field("QN", qn));
            s.push(";");
            s.header.st = Some(s.field("ST", "91"));
            s.push(";");
            let cn = if kind == AckKind::Data {
                "9014"
            } else {
                "9013"
            };
            s.header.cn = Some(s.field("CN", cn));
            s.push(";");
            s.header.pw = Some(s.field("PW", pw));
            s.push(";");
            s.header.mn = Some(s.field("MN", mn));
            s.push(";");
            s.header.flag = Some(s.field("Flag", &reply_flag.to_string()));
            s.push(";");
            s.open_cp();
            s.push("&&");
        }
    }
    Some((kind, s))
}

/// The acknowledgement for `frame` (the bytes [`ack`] builds, in `raw`) as
/// [`decode`] reads it back, for the frame log.
///
/// Every ack is logged, so decoding our own bytes again would run the whole
/// decoder per inbound frame. When the fields the ack echoes are well-formed
/// (the common case: a 17-digit QN, a 6-character alphanumeric PW and an MN
/// of its edition's standard form) the frame is described directly: its
/// findings are then fixed per edition and kind. Anything odder is decoded,
/// so findings on unusual fields come from the one place that knows them.
/// Unit tests hold both paths to identical records over the fixtures.
pub fn ack_frame(frame: &Frame, opts: &Options) -> Option<Frame> {
    let (kind, seg) = ack_segment(frame)?;
    let raw = envelope(&seg.bytes);
    if !echoes_clean(frame, kind) || seg.bytes.len() > opts.max_segment {
        return Some(decode(raw, opts, &()));
    }
    let dialect = frame.dialect;
    let is_2005 = dialect == Some(Dialect::V2005);
    // In the decoder's order: Flag, MN, PW.
    let mut findings = Vec::new();
    if is_2005 {
        findings.push(Finding::new(
            fcode::FIELD_MISSING_FLAG,
            Severity::Info,
            "no Flag field; treated as 0 (no ack requested)",
        ));
    }
    if is_2005 && kind == AckKind::Data {
        findings.push(Finding::new(
            fcode::FIELD_MISSING_MN,
            Severity::Info,
            "no MN field",
        ));
        findings.push(Finding::new(
            fcode::FIELD_MISSING_PW,
            Severity::Warning,
            "no PW field",
        ));
    } else {
        let (mn, pw) = (frame.mn().unwrap_or(""), frame.pw().unwrap_or(""));
        let standard = if is_2005 {
            mn.len() == 14
        } else {
            mn.len() == 24
                && mn
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
        };
        if !standard {
            findings.push(Finding::new(
                fcode::FIELD_MALFORMED_MN,
                Severity::Info,
                format!(
                    "MN has {} characters; the {} edition specifies {}",
                    mn.len(),
                    dialect.map_or("?", Dialect::as_str),
                    if is_2005 { "14" } else { "24 hex" }
                ),
            ));
        }
        if pw.len() != 6 {
            findings.push(Finding::new(
                fcode::FIELD_MALFORMED_PW,
                Severity::Info,
                format!("PW has {} characters; the standard specifies 6", pw.len()),
            ));
        }
    }
    let computed = crc::hj212(&seg.bytes);
    let cp_end = seg.bytes.len() - 2;
    let pairs = seg
        .params
        .iter()
        .map(|&(key, value)| Pair {
            key,
            code: None,
            suffix: None,
            value,
            kind: ValueKind::Text,
        })
        .collect();
    let cp_qn = match seg.header.qn {
        Some(_) => None,
        None => seg.params.first().map(|p| p.1),
    };
    let declared_len = Some(seg.bytes.len());
    Some(Frame {
        raw,
        declared_len,
        ending: Ending::CrLf,
        header: seg.header,
        cp: Some(Span::new(seg.cp_body, cp_end)),
        pairs,
        flag: match dialect {
            Some(Dialect::V2005) => None,
            Some(d) => Some(d.reply_flag()),
            None => None,
        },
        dialect,
        encryption: None,
        crc: CrcCheck {
            declared: Some(crc::format_hex4(computed)),
            computed,
            variant: crc::CrcVariant::Hj212,
        },
        data_time: None,
        data_time_ms: false,
        cp_qn,
        findings,
        segment: Bytes::from(seg.bytes),
    })
}

/// True when [`ack_frame`] describes the ack of `frame` directly instead of
/// decoding it (exposed for the tests that hold both paths equal).
pub fn ack_is_direct(frame: &Frame, opts: &Options) -> bool {
    ack_segment(frame)
        .is_some_and(|(kind, seg)| echoes_clean(frame, kind) && seg.bytes.len() <= opts.max_segment)
}

/// The ack of `frame` echoes only fields whose decode is known: an edition
/// whose reply names itself, a 17-digit QN, and (where echoed) a PW and an MN
/// of 1 to 32 letters, digits, `-`, `_` or `.` (the MN and PW length findings
/// are reproduced; anything else is left to the decoder).
fn echoes_clean(frame: &Frame, kind: AckKind) -> bool {
    let qn_ok = frame
        .qn()
        .is_some_and(|q| q.len() == 17 && q.bytes().all(|c| c.is_ascii_digit()));
    let plain = |v: Option<&str>| {
        v.is_some_and(|v| {
            (1..=32).contains(&v.len())
                && v.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        })
    };
    match (frame.dialect, kind) {
        (Some(Dialect::V2005), AckKind::Data) => qn_ok && frame.cn_num().is_some(),
        (Some(Dialect::V2005 | Dialect::V2017 | Dialect::V2025), _) => {
            qn_ok && plain(frame.pw()) && plain(frame.mn())
        }
        _ => false,
    }
}

/// Addressing for frames the gateway originates towards a device.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The device's dialect.
    pub dialect: Dialect,
    /// Device ST (for requests; replies use 91).
    pub st: &'a str,
    /// Device password.
    pub pw: &'a str,
    /// Device MN.
    pub mn: &'a str,
}

/// 9011 request reply with `QnRtn` (e.g. 2 = rejected when a device is offline).
pub fn qn_rtn(t: Target<'_>, qn: &str, code: u16) -> Bytes {
    let seg = match t.dialect {
        Dialect::V2005 => format!(
            "ST=91;CN=9011;PW={};MN={};Flag=0;CP=&&QN={qn};QnRtn={code}&&",
            t.pw, t.mn
        ),
        d => format!(
            "QN={qn};ST=91;CN=9011;PW={};MN={};Flag={};CP=&&QnRtn={code}&&",
            t.pw,
            t.mn,
            d.reply_flag()
        ),
    };
    envelope(seg.as_bytes())
}

/// 9012 execution result with `ExeRtn`.
pub fn exe_rtn(t: Target<'_>, qn: &str, code: u16) -> Bytes {
    let seg = match t.dialect {
        Dialect::V2005 => format!(
            "ST=91;CN=9012;PW={};MN={};CP=&&QN={qn};ExeRtn={code}&&",
            t.pw, t.mn
        ),
        d => format!(
            "QN={qn};ST=91;CN=9012;PW={};MN={};Flag={};CP=&&ExeRtn={code}&&",
            t.pw,
            t.mn,
            d.reply_flag()
        ),
    };
    envelope(seg.as_bytes())
}

/// A platform-to-device request with an arbitrary CP body (`cp` is what goes
/// between `CP=&&` and `&&`).
pub fn request(t: Target<'_>, qn: &str, cn: u16, cp: &str) -> Bytes {
    let seg = format!(
        "QN={qn};ST={};CN={cn:04};PW={};MN={};Flag={};CP=&&{cp}&&",
        t.st,
        t.pw,
        t.mn,
        t.dialect.request_flag()
    );
    envelope(seg.as_bytes())
}

/// 1011: get the field time (`PolId` selects an instrument's clock).
pub fn get_time(t: Target<'_>, qn: &str, pol_id: Option<&str>) -> Bytes {
    let cp = pol_id.map(|p| format!("PolId={p}")).unwrap_or_default();
    request(t, qn, 1011, &cp)
}

/// 1012: set the field time; `system_time` is `YYYYMMDDhhmmss` device-local.
pub fn set_time(t: Target<'_>, qn: &str, system_time: &str, pol_id: Option<&str>) -> Bytes {
    let cp = match pol_id {
        Some(p) => format!("PolId={p};SystemTime={system_time}"),
        None => format!("SystemTime={system_time}"),
    };
    request(t, qn, 1012, &cp)
}

/// 1061: get the real-time upload interval.
pub fn get_rtd_interval(t: Target<'_>, qn: &str) -> Bytes {
    request(t, qn, 1061, "")
}

/// 1062: set the real-time upload interval in seconds.
pub fn set_rtd_interval(t: Target<'_>, qn: &str, seconds: u32) -> Bytes {
    request(t, qn, 1062, &format!("RtdInterval={seconds}"))
}

/// 2051 / 2061 / 2031 history fetch. 2005 separates the window with `,`
/// (HJ/T 212-2005 App. C item 6), later editions with `;`.
pub fn history(t: Target<'_>, qn: &str, cn: u16, begin: &str, end: &str) -> Bytes {
    let sep = if t.dialect == Dialect::V2005 {
        ','
    } else {
        ';'
    };
    request(t, qn, cn, &format!("BeginTime={begin}{sep}EndTime={end}"))
}

/// 1014 key push (2025): `SKCreateTime;NewSK`, CP encrypted under the device's
/// current key, CRC over the plaintext (2025 App. A.2).
pub fn key_push(
    t: Target<'_>,
    qn: &str,
    sk_create_time: &str,
    new_key_text: &str,
    current: &Key,
) -> Bytes {
    let cp = format!("SKCreateTime={sk_create_time};NewSK={new_key_text}");
    request_encrypted(t, qn, 1014, &cp, current)
}

/// A request whose CP travels encrypted under `key` (2025: 1014, and 3020 for
/// devices that expect it); the CRC covers the plaintext (2025 App. A.2).
pub fn request_encrypted(t: Target<'_>, qn: &str, cn: u16, cp: &str, key: &Key) -> Bytes {
    let head = format!(
        "QN={qn};ST={};CN={cn:04};PW={};MN={};Flag={};CP=&&",
        t.st,
        t.pw,
        t.mn,
        t.dialect.request_flag()
    );
    let mut plain = Vec::with_capacity(head.len() + cp.len() + 2);
    plain.extend_from_slice(head.as_bytes());
    plain.extend_from_slice(cp.as_bytes());
    plain.extend_from_slice(b"&&");
    let crc_value = crc::hj212(&plain);
    let mut wire = plain;
    crypt::encrypt_in_place(key, &mut wire[head.len()..head.len() + cp.len()]);
    envelope_with_crc(&wire, crc_value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Options, decode};
    use chrono::TimeZone;

    fn dec(b: &[u8]) -> Frame {
        let now = chrono::Utc.with_ymd_and_hms(2024, 6, 1, 1, 0, 0).unwrap();
        decode(Bytes::copy_from_slice(b), &Options::new(now), &())
    }

    const MN17: &str = "010000A8900016F000169DC0";

    /// Digest §9.2 A: the 2017 upload and its 9014.
    #[test]
    fn ack_2017_upload() {
        let up = b"##0295QN=20240601085857223;ST=31;CN=2011;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&DataTime=20240601085857;a21026-Rtd=12.5,a21026-ZsRtd=15.1,a21026-Flag=N;a21002-Rtd=35.2,a21002-ZsRtd=42.6,a21002-Flag=N;a34013-Rtd=3.1,a34013-Flag=N;a19001-Rtd=9.8,a19001-Flag=N;a00000-Rtd=28.15,a00000-Flag=N&&3E80\r\n";
        let f = dec(up);
        assert!(!f.has_error(), "{:?}", f.findings);
        assert_eq!(
            &ack(&f).unwrap()[..],
            b"##0087QN=20240601085857223;ST=91;CN=9014;PW=123456;MN=010000A8900016F000169DC0;Flag=4;CP=&&&&24C0\r\n"
        );
    }

    /// Digest §9.2 C: 1013 is a notify, answered with 9013.
    #[test]
    fn notify_1013() {
        let f = dec(b"##0087QN=20240601091500100;ST=32;CN=1013;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&&&A441\r\n");
        assert_eq!(
            &ack(&f).unwrap()[..],
            b"##0087QN=20240601091500100;ST=91;CN=9013;PW=123456;MN=010000A8900016F000169DC0;Flag=4;CP=&&&&B681\r\n"
        );
    }

    /// 2025 digest §8.4: heartbeat 9015 answered with a Flag=8 9013.
    #[test]
    fn heartbeat_2025() {
        let f = dec(b"##0087QN=20260101080000123;ST=31;CN=9015;PW=123456;MN=010000A8900016F000169DC0;Flag=9;CP=&&&&F3C1\r\n");
        assert_eq!(
            &ack(&f).unwrap()[..],
            b"##0087QN=20260101080000123;ST=91;CN=9013;PW=123456;MN=010000A8900016F000169DC0;Flag=8;CP=&&&&3600\r\n"
        );
    }

    #[test]
    fn replies_and_no_ack_uploads_get_nothing() {
        // 9014 with the ack bit set (seen from platforms): never answered.
        let f = dec(b"##0087QN=20160801085857223;ST=91;CN=9014;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&&&3240\r\n");
        assert_eq!(ack(&f), None);
        // 2005 upload without Flag: no ack requested.
        let f = dec(b"##0136ST=32;CN=2011;PW=123456;MN=88888880000001;CP=&&DataTime=20040516010101;B01-Rtd=36.91;011-Rtd=231.0,011-Flag=N;060-Rtd=1.803,060-Flag=N&&0D80\r\n");
        assert_eq!(ack(&f), None);
    }

    /// Our own 2005 data ack carries no MN (App. C); decoding it, as the
    /// session does to log it, must not call that an error.
    #[test]
    fn ack_2005_decodes_without_error() {
        let up = dec(b"##0136ST=32;CN=2051;PW=123456;MN=88888880000001;Flag=1;CP=&&DataTime=20040516010101;B01-Rtd=36.91;011-Rtd=231.0,011-Flag=N;060-Rtd=1.803,060-Flag=N&&0000\r\n");
        let a = ack(&up).expect("ack bit set");
        let f = dec(&a);
        assert_eq!(f.cn(), Some("9014"));
        assert!(!f.has_error(), "{:?}", f.findings);
        assert!(
            f.findings
                .iter()
                .any(|x| x.code == crate::finding::code::FIELD_MISSING_MN
                    && x.severity == crate::finding::Severity::Info)
        );
    }

    #[test]
    fn replies_2005_and_2017_byte_exact() {
        let t05 = Target {
            dialect: Dialect::V2005,
            st: "32",
            pw: "123456",
            mn: "88888880000001",
        };
        // Digest §9.2 E.
        assert_eq!(
            &qn_rtn(t05, "20040516010101001", 1)[..],
            b"##0084ST=91;CN=9011;PW=123456;MN=88888880000001;Flag=0;CP=&&QN=20040516010101001;QnRtn=1&&7200\r\n"
        );
        assert_eq!(
            &exe_rtn(t05, "20040516010101001", 1)[..],
            b"##0078ST=91;CN=9012;PW=123456;MN=88888880000001;CP=&&QN=20040516010101001;ExeRtn=1&&C601\r\n"
        );
        assert_eq!(
            &set_rtd_interval(t05, "20040516010101001", 30)[..],
            b"##0091QN=20040516010101001;ST=32;CN=1062;PW=123456;MN=88888880000001;Flag=3;CP=&&RtdInterval=30&&5140\r\n"
        );
        assert_eq!(
            &history(t05, "20040516010101001", 2051, "20040506111000", "20040506151000")[..],
            b"##0124QN=20040516010101001;ST=32;CN=2051;PW=123456;MN=88888880000001;Flag=3;CP=&&BeginTime=20040506111000,EndTime=20040506151000&&6B80\r\n"
        );
        let t17 = Target {
            dialect: Dialect::V2017,
            st: "32",
            pw: "123456",
            mn: MN17,
        };
        assert_eq!(
            &set_rtd_interval(t17, "20240601090000001", 60)[..],
            b"##0101QN=20240601090000001;ST=32;CN=1062;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&RtdInterval=60&&6600\r\n"
        );
        assert_eq!(
            &set_time(t17, "20240601091501234", "20240601091501", None)[..],
            b"##0112QN=20240601091501234;ST=32;CN=1012;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&SystemTime=20240601091501&&CAC1\r\n"
        );
        assert_eq!(
            &history(t17, "20240601100000001", 2061, "20240601080000", "20240601080000")[..],
            b"##0134QN=20240601100000001;ST=32;CN=2061;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&BeginTime=20240601080000;EndTime=20240601080000&&B681\r\n"
        );
        assert_eq!(
            &qn_rtn(t17, "20160801085857223", 1)[..],
            b"##0094QN=20160801085857223;ST=91;CN=9011;PW=123456;MN=010000A8900016F000169DC0;Flag=4;CP=&&QnRtn=1&&1B00\r\n"
        );
        assert_eq!(
            &exe_rtn(t17, "20160801085857223", 1)[..],
            b"##0095QN=20160801085857223;ST=91;CN=9012;PW=123456;MN=010000A8900016F000169DC0;Flag=4;CP=&&ExeRtn=1&&6240\r\n"
        );
        let t25 = Target {
            dialect: Dialect::V2025,
            st: "32",
            pw: "123456",
            mn: MN17,
        };
        assert_eq!(
            &get_time(t25, "20240601085857223", None)[..],
            b"##0087QN=20240601085857223;ST=32;CN=1011;PW=123456;MN=010000A8900016F000169DC0;Flag=9;CP=&&&&2200\r\n"
        );
    }

    /// Every builder's output decodes cleanly and keeps its CN and QN.
    #[test]
    fn round_trips() {
        let key = [0x30u8; 16];
        for d in [Dialect::V2005, Dialect::V2017, Dialect::V2025] {
            let t = Target {
                dialect: d,
                st: "31",
                pw: "123456",
                mn: MN17,
            };
            let q = "20240601085857223";
            let cases: Vec<(Bytes, &str)> = vec![
                (qn_rtn(t, q, 2), "9011"),
                (exe_rtn(t, q, 1), "9012"),
                (get_time(t, q, Some("w01018")), "1011"),
                (set_time(t, q, "20240601085857", None), "1012"),
                (get_rtd_interval(t, q), "1061"),
                (set_rtd_interval(t, q, 30), "1062"),
                (
                    history(t, q, 2051, "20240601080000", "20240601090000"),
                    "2051",
                ),
                (
                    history(t, q, 2061, "20240601080000", "20240601090000"),
                    "2061",
                ),
                (
                    history(t, q, 2031, "20240601000000", "20240601000000"),
                    "2031",
                ),
            ];
            for (bytes, cn) in cases {
                let f = dec(&bytes);
                assert!(!f.has_error(), "{d:?} {cn}: {:?}", f.findings);
                assert_eq!(f.cn(), Some(cn));
                assert_eq!(f.qn(), Some(q), "{d:?} {cn}");
                assert_eq!(f.dialect, Some(d));
            }
        }
        // 1014 key push is encrypted and decodes with the device key.
        let t = Target {
            dialect: Dialect::V2025,
            st: "31",
            pw: "123456",
            mn: MN17,
        };
        let bytes = key_push(
            t,
            "20240601085857223",
            "20240601085857223",
            "0123456789ABCDEF",
            &key,
        );
        assert!(
            bytes.windows(7).all(|w| w != b"NewSK=0"),
            "CP must be encrypted"
        );
        let now = chrono::Utc.with_ymd_and_hms(2024, 6, 1, 1, 0, 0).unwrap();
        let f = decode(bytes, &Options::new(now), &crate::ExampleKeyLookup);
        assert!(!f.has_error(), "{:?}", f.findings);
        assert_eq!(f.param("NewSK"), Some("0123456789ABCDEF"));
        let doc = crate::json::frame_doc(&f);
        assert!(
            doc.contains(r#""NewSK":"<redacted>""#) && !doc.contains("0123456789ABCDEF"),
            "{doc}"
        );
    }
}
