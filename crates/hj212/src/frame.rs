//! One HJ 212 frame: envelope, header, CP, CRC, dialect, findings.
//!
//! Envelope (HJ 212-2017 §6.3.1, Table 2):
//!
//! ```text
//! "##" | LLLL | data segment (LLLL bytes, 0..1024) | CCCC | CR LF
//! ```
//!
//! LLLL counts bytes of the data segment only; CCCC is the CRC of the data
//! segment, 4 hex digits high byte first. [`decode`] takes the bytes the
//! framer cut (one candidate frame, exactly as received) and never fails:
//! everything it notices becomes a [`Finding`], and the raw bytes are kept
//! untouched for storage and pass-through.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, FixedOffset, Utc};

use super::cp::{self, Pair};
use super::crc::{self, CrcVariant};
use super::crypt::{self, Key, WireForm};
use super::dialect::{self, Dialect, FlagBits};
use super::finding::{Finding, Severity, code};
use super::header::{self, Header};
use super::time;

pub use super::span::Span;

/// How a device's CRC is judged (`[[device]] crc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CrcPolicy {
    /// Only the HJ 212 CRC is accepted.
    #[default]
    Strict,
    /// HJ 212 or CRC-16/MODBUS printed high byte first.
    Modbus,
    /// HJ 212 or CRC-16/MODBUS printed low byte first.
    Swapped,
    /// The CRC is recorded but not enforced.
    Any,
}

impl CrcPolicy {
    fn accepts(self, v: CrcVariant) -> bool {
        matches!(
            (self, v),
            (_, CrcVariant::Hj212)
                | (CrcPolicy::Any, _)
                | (CrcPolicy::Modbus, CrcVariant::Modbus)
                | (CrcPolicy::Swapped, CrcVariant::ModbusSwapped)
        )
    }
}

/// Per-device knowledge the decoder needs (from the device registry).
#[derive(Debug, Clone, Default)]
pub struct DeviceProfile {
    /// Dialect override (e.g. surface-water for a Flag-9 station).
    pub dialect: Option<Dialect>,
    /// CRC policy; `None` uses [`Options::crc`].
    pub crc: Option<CrcPolicy>,
    /// SM4 keys to try, current first (old and new during a key change).
    pub keys: Vec<Key>,
    /// Verdict on a CP that no key opens and that is not readable plaintext
    /// (only judged when `keys` is not empty).
    pub unencrypted: crypt::Unencrypted,
}

/// Looks devices up by MN. Implemented by the gateway's registry; `()` knows no device.
pub trait DeviceLookup {
    /// The profile for `mn`, if the device is known.
    fn profile(&self, mn: &str) -> Option<Arc<DeviceProfile>>;
}

impl DeviceLookup for () {
    fn profile(&self, _mn: &str) -> Option<Arc<DeviceProfile>> {
        None
    }
}

/// Decoder settings that do not depend on the device.
#[derive(Debug, Clone)]
pub struct Options {
    /// Receive time: the reference for timestamp checks.
    pub now: DateTime<Utc>,
    /// Device time zone (HJ 212 timestamps carry none; default UTC+8).
    pub tz: FixedOffset,
    /// DataTime may be ahead of `now` by this many seconds before `time.future`.
    pub future_tolerance_s: i64,
    /// DataTime older than this many seconds gives `time.stale` (unless RF=1).
    pub stale_after_s: i64,
    /// CRC policy for devices without their own.
    pub crc: CrcPolicy,
    /// Standard maximum data-segment length (1024); longer gives `frame.oversize`.
    pub max_segment: usize,
}

impl Options {
    /// Defaults: UTC+8, 5 min future tolerance, 48 h staleness, strict CRC.
    pub fn new(now: DateTime<Utc>) -> Options {
        Options {
            now,
            tz: time::beijing(),
            future_tolerance_s: 300,
            stale_after_s: 48 * 3600,
            crc: CrcPolicy::Strict,
            max_segment: 1024,
        }
    }
}

/// The CRC as declared and as computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrcCheck {
    /// The 4 hex digits as sent, if present.
    pub declared: Option<[u8; 4]>,
    /// The HJ 212 CRC of the (plaintext) data segment.
    pub computed: u16,
    /// Which algorithm the declared value matches.
    pub variant: CrcVariant,
}

/// How the frame ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// CR LF, as the standard requires.
    CrLf,
    /// LF only.
    Lf,
    /// CR only.
    Cr,
    /// Nothing after the CRC.
    None,
}

/// A decoded frame. Values are spans into [`Frame::segment`].
#[derive(Debug, Clone)]
pub struct Frame {
    /// The exact bytes received.
    pub raw: Bytes,
    /// The data segment in plaintext (decrypted for encrypted 2025 frames).
    pub segment: Bytes,
    /// Declared length, if the length field had digits.
    pub declared_len: Option<usize>,
    /// Terminator seen.
    pub ending: Ending,
    /// Header fields.
    pub header: Header,
    /// The CP area (between `CP=&&` and the closing `&&`).
    pub cp: Option<Span>,
    /// CP pairs in wire order.
    pub pairs: Vec<Pair>,
    /// Flag value, if present and numeric.
    pub flag: Option<u8>,
    /// Edition, if known.
    pub dialect: Option<Dialect>,
    /// Wire form of the ciphertext, for encrypted frames.
    pub encryption: Option<WireForm>,
    /// CRC result.
    pub crc: CrcCheck,
    /// DataTime (or SystemTime) in the device zone.
    pub data_time: Option<DateTime<FixedOffset>>,
    /// DataTime had 17 digits.
    pub data_time_ms: bool,
    /// QN taken from CP (2005 replies put it there) when the header has none.
    pub cp_qn: Option<Span>,
    /// Everything validation noticed.
    pub findings: Vec<Finding>,
}

impl Frame {
    /// Text of a span (lossy for the rare non-UTF-8 byte, e.g. GBK info text).
    pub fn text(&self, s: Span) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.segment[s.range()])
    }
    /// Bytes of a span.
    pub fn bytes(&self, s: Span) -> &[u8] {
        &self.segment[s.range()]
    }
    fn field(&self, s: Option<Span>) -> Option<&str> {
        s.and_then(|s| std::str::from_utf8(&self.segment[s.range()]).ok())
    }
    /// QN: the header's, or for 2005 replies the one inside CP.
    pub fn qn(&self) -> Option<&str> {
        self.field(self.header.qn.or(self.cp_qn))
    }
    /// ST.
    pub fn st(&self) -> Option<&str> {
        self.field(self.header.st)
    }
    /// CN.
    pub fn cn(&self) -> Option<&str> {
        self.field(self.header.cn)
    }
    /// CN as a number, when it is 4 digits.
    pub fn cn_num(&self) -> Option<u16> {
        let cn = self.cn()?;
        if cn.len() == 4 { cn.parse().ok() } else { None }
    }
    /// MN.
    pub fn mn(&self) -> Option<&str> {
        self.field(self.header.mn)
    }
    /// PW (a credential: use for checks and replies, never log it).
    pub fn pw(&self) -> Option<&str> {
        self.field(self.header.pw)
    }
    /// PNUM.
    pub fn pnum(&self) -> Option<u32> {
        self.field(self.header.pnum)?.parse().ok()
    }
    /// PNO.
    pub fn pno(&self) -> Option<u32> {
        self.field(self.header.pno)?.parse().ok()
    }
    /// `RF=1` (re-sent data, 2025).
    pub fn rf(&self) -> bool {
        self.field(self.header.rf) == Some("1")
    }
    /// Flag bits, if Flag is present.
    pub fn flag_bits(&self) -> Option<FlagBits> {
        self.flag.map(FlagBits)
    }
    /// The value of a CP parameter (key without `-`), e.g. `QnRtn`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|p| p.code.is_none() && self.bytes(p.key) == key.as_bytes())
            .and_then(|p| std::str::from_utf8(self.bytes(p.value)).ok())
    }
    /// True when any finding is an error.
    pub fn has_error(&self) -> bool {
        super::finding::has_error(&self.findings)
    }
}

/// The CRC variant the document of an unencrypted frame received as `raw` names
/// (`crc.variant`), without decoding the rest: `None` when it declares no CRC.
///
/// The same rule as [`decode`]: the declared CRC is identified over the data
/// segment between the length field and the CRC field (HJ 212-2017 Table 2).
/// For audits over logs that keep such frames without their document.
pub fn crc_variant(raw: &[u8]) -> Option<CrcVariant> {
    let opts = Options::new(DateTime::<Utc>::UNIX_EPOCH);
    let env = envelope(raw, &opts, &mut Vec::new());
    let (declared, _) = env.declared_crc?;
    Some(crc::identify(&raw[env.seg_start..env.seg_end], declared).1)
}

/// Decodes one frame as cut by the framer. Never fails; problems are findings.
pub fn decode(raw: Bytes, opts: &Options, devices: &dyn DeviceLookup) -> Frame {
    let mut findings = Vec::new();
    let env = envelope(&raw, opts, &mut findings);
    // Borrowed from `raw`, which the frame keeps: one more reference to the
    // shared buffer (`Bytes::slice`) is an atomic increment and decrement.
    let seg = &raw[env.seg_start..env.seg_end];
    let cp_start = header::find_cp(seg, &mut findings);
    let header_end = cp_start.map_or(seg.len(), |c| c.key);
    let hdr = header::parse(seg, header_end, &mut findings);
    let mn_text = hdr
        .mn
        .and_then(|s| std::str::from_utf8(&seg[s.range()]).ok())
        .unwrap_or("");
    let profile = if mn_text.is_empty() {
        None
    } else {
        devices.profile(mn_text)
    };
    let policy = profile.as_ref().and_then(|p| p.crc).unwrap_or(opts.crc);

    // The plaintext segment, when decryption or a wrapper replaces the wire's.
    let mut plain: Option<Bytes> = None;
    let mut encryption = None;
    let mut cp_span = None;
    let mut crc_check = None;
    if let Some(cps) = cp_start {
        encryption = crypt::sniff(&seg[cps.body..]);
        match encryption {
            None => {
                let cp = plain_cp(seg, cps, &mut findings);
                cp_span = Some(cp);
                if let Some(p) = profile.as_ref().filter(|p| !p.keys.is_empty()) {
                    let declared = env.declared_crc.map(|d| d.0);
                    let accepts = |v| policy.accepts(v);
                    if let Some(w) =
                        crypt::judge_plain_cp(seg, cp, p, declared, accepts, &mut findings)
                    {
                        if w.crc_over_wire {
                            crc_check =
                                Some(check_crc(seg, env.declared_crc, policy, &mut findings));
                        }
                        plain = Some(Bytes::from(w.plain));
                        cp_span = Some(w.cp);
                        encryption = Some(WireForm::Wrapper);
                    }
                }
            }
            Some(form) => {
                let keys: &[Key] = profile.as_ref().map_or(&[], |p| &p.keys);
                match encrypted_cp(
                    seg,
                    cps,
                    form,
                    keys,
                    env.declared_crc,
                    policy,
                    &mut findings,
                ) {
                    Some((text, cp)) => {
                        plain = Some(Bytes::from(text));
                        cp_span = Some(cp);
                    }
                    // The CRC is over plaintext we do not have: it cannot be judged.
                    None => {
                        crc_check = Some(CrcCheck {
                            declared: env.declared_crc.map(|d| d.1),
                            computed: crc::hj212(seg),
                            variant: CrcVariant::Unknown,
                        })
                    }
                }
            }
        }
    } else {
        findings.push(Finding::new(
            code::CP_MISSING,
            Severity::Error,
            "no CP= in the data segment",
        ));
    }

    let segment = plain.unwrap_or_else(|| raw.slice(env.seg_start..env.seg_end));
    let crc_check =
        crc_check.unwrap_or_else(|| check_crc(&segment, env.declared_crc, policy, &mut findings));

    if let Some(cp) = cp_span {
        if cp.end() - cp.start() > 950 {
            findings.push(Finding::new(
                code::CP_OVERSIZE,
                Severity::Info,
                format!(
                    "CP area of {} bytes exceeds the standard's 950",
                    cp.end() - cp.start()
                ),
            ));
        }
    }
    let pairs = cp_span.map_or_else(Vec::new, |cp| {
        cp::parse(&segment, cp.start(), cp.end(), &mut findings)
    });

    let mut frame = Frame {
        raw,
        segment,
        declared_len: env.declared_len,
        ending: env.ending,
        header: hdr,
        cp: cp_span,
        pairs,
        flag: None,
        dialect: None,
        encryption,
        crc: crc_check,
        data_time: None,
        data_time_ms: false,
        cp_qn: None,
        findings,
    };
    validate(&mut frame, opts, profile.as_ref().and_then(|p| p.dialect));
    frame
}

/// Where the data segment of a frame lies, and what its envelope declared.
struct Envelope {
    ending: Ending,
    declared_len: Option<usize>,
    /// The CRC field's value and its four characters as sent.
    declared_crc: Option<(u16, [u8; 4])>,
    seg_start: usize,
    seg_end: usize,
}

/// The envelope around the data segment: `##`, the length field, the CRC field
/// and the terminator, with their findings.
///
/// Rule (HJ 212-2017 Table 2; digest §1): `"##" | LLLL | <data segment, LLLL
/// bytes> | CCCC | CR LF`: the length is "4 ASCII decimal digits", the CRC "4
/// hex digits of the CRC-16 of the data segment only (not
/// header/length/trailer)", and "the length does not include `##`, itself, the
/// CRC or CRLF".
fn envelope(b: &[u8], opts: &Options, findings: &mut Vec<Finding>) -> Envelope {
    let (body_end, ending) = terminator(b, findings);
    let (seg_start, declared_len) = length_field(b, body_end, findings);
    let tail = &b[body_end.saturating_sub(4).max(seg_start)..body_end];
    let (seg_end, declared_crc) = match (tail.len() == 4).then(|| crc::parse_hex4(tail)).flatten() {
        Some(v) => (
            body_end - 4,
            Some((v, [tail[0], tail[1], tail[2], tail[3]])),
        ),
        None => {
            findings.push(Finding::new(
                code::CRC_MISSING,
                Severity::Error,
                "no 4-hex-digit CRC after the data segment",
            ));
            (body_end, None)
        }
    };
    let seg_start = seg_start.min(seg_end);
    let mut seg_end = seg_end;
    // Vendor extension between data and CRC (seen: `…&&#G1010…30&3180`): the
    // declared length ends exactly on the CP's `&&` and the CRC covers only
    // that much. Accept that reading only when the CRC confirms it.
    if let (Some(l), Some((d, _))) = (declared_len, declared_crc) {
        let short = seg_start + l;
        if short + 2 <= seg_end
            && short < seg_end
            && b[seg_start..short].ends_with(b"&&")
            && crc::identify(&b[seg_start..short], d).1 != CrcVariant::Unknown
            && crc::identify(&b[seg_start..seg_end], d).1 == CrcVariant::Unknown
        {
            findings.push(Finding::new(
                code::FRAME_EXTENSION,
                Severity::Warning,
                format!(
                    "{} bytes between the data segment and the CRC: {:?}",
                    seg_end - short,
                    String::from_utf8_lossy(&b[short..seg_end])
                ),
            ));
            seg_end = short;
        }
    }
    let wire_len = seg_end - seg_start;
    if let Some(d) = declared_len {
        if d != wire_len {
            findings.push(Finding::new(
                code::LENGTH_MISMATCH,
                Severity::Warning,
                format!("declared length {d}, data segment has {wire_len} bytes"),
            ));
            if let Some(chars) = counts_characters(&b[seg_start..seg_end], d) {
                findings.push(Finding::new(
                    code::LENGTH_CHARACTERS,
                    Severity::Warning,
                    format!(
                        "length field {} counts characters; the data segment is {wire_len} bytes ({chars} characters)",
                        String::from_utf8_lossy(&b[2.min(seg_start)..seg_start])
                    ),
                ));
            }
        }
    }
    if wire_len > opts.max_segment {
        findings.push(Finding::new(
            code::FRAME_OVERSIZE,
            Severity::Warning,
            format!(
                "data segment of {wire_len} bytes exceeds the standard's {}",
                opts.max_segment
            ),
        ));
    }
    Envelope {
        ending,
        declared_len,
        declared_crc,
        seg_start,
        seg_end,
    }
}

/// The character count of a UTF-8 `segment` when the declared length `d` is
/// that count (Unicode scalars, or UTF-16 units as .NET's `string.Length`
/// gives) rather than the byte count the standard means (HJ 212-2017 §6.3:
/// Chinese text is UTF-8 and the length counts its bytes). Some senders count
/// characters (digest §2.4); naming that exactly tells the vendor what to fix.
fn counts_characters(segment: &[u8], d: usize) -> Option<usize> {
    let text = std::str::from_utf8(segment).ok()?;
    let chars = text.chars().count();
    if chars == segment.len() {
        return None;
    }
    (chars == d || text.encode_utf16().count() == d).then_some(chars)
}

/// The terminator: where the frame's body ends, and how it was terminated.
fn terminator(b: &[u8], findings: &mut Vec<Finding>) -> (usize, Ending) {
    let (body_end, ending) = if b.ends_with(b"\r\n") {
        (b.len() - 2, Ending::CrLf)
    } else if b.ends_with(b"\n") {
        (b.len() - 1, Ending::Lf)
    } else if b.ends_with(b"\r") {
        (b.len() - 1, Ending::Cr)
    } else {
        (b.len(), Ending::None)
    };
    match ending {
        Ending::CrLf => {}
        Ending::Lf | Ending::Cr => findings.push(Finding::new(
            code::TERMINATOR_NONSTANDARD,
            Severity::Info,
            if ending == Ending::Lf {
                "frame ends with LF only"
            } else {
                "frame ends with CR only"
            },
        )),
        Ending::None => findings.push(Finding::new(
            code::TERMINATOR_MISSING,
            Severity::Info,
            "frame has no CR LF terminator",
        )),
    }
    (body_end, ending)
}

/// `##` then up to 4 length digits: where the data segment starts, and the
/// declared length if any digits were there.
fn length_field(b: &[u8], body_end: usize, findings: &mut Vec<Finding>) -> (usize, Option<usize>) {
    if !b.starts_with(b"##") {
        findings.push(Finding::new(
            code::FRAME_HEADER,
            Severity::Error,
            "frame does not start with ##",
        ));
        return (0, None);
    }
    let digits = b[2..body_end.max(2)]
        .iter()
        .take(4)
        .take_while(|c| c.is_ascii_digit())
        .count();
    let declared_len = (digits > 0).then(|| {
        b[2..2 + digits]
            .iter()
            .fold(0usize, |a, &d| a * 10 + (d - b'0') as usize)
    });
    if digits != 4 {
        findings.push(Finding::new(
            code::LENGTH_MALFORMED,
            Severity::Warning,
            format!("length field has {digits} digits, the standard requires 4"),
        ));
    }
    (2 + digits, declared_len)
}

/// A plain CP: it ends at the LAST `&&` of the segment; bytes after it are a
/// vendor extension (seen: `&&#G1010…&` before the CRC).
fn plain_cp(seg: &[u8], cps: header::CpStart, findings: &mut Vec<Finding>) -> Span {
    let body = &seg[cps.body..];
    let close = if body.ends_with(b"&&") {
        Some(seg.len() - 2)
    } else {
        memchr::memmem::rfind(body, b"&&").map(|i| cps.body + i)
    };
    match close {
        Some(c) if cps.opened => {
            if c + 2 < seg.len() {
                findings.push(Finding::new(
                    code::CP_TRAILING,
                    Severity::Warning,
                    format!(
                        "{} bytes after the closing && of CP: {:?}",
                        seg.len() - c - 2,
                        String::from_utf8_lossy(&seg[c + 2..])
                    ),
                ));
            }
            Span::new(cps.body, c)
        }
        _ => {
            findings.push(Finding::new(
                code::CP_SYNTAX,
                Severity::Warning,
                "CP area is not closed by &&",
            ));
            Span::new(cps.body, seg.len())
        }
    }
}

/// An SM4-encrypted CP (HJ 212-2025): the plaintext segment and its CP span,
/// or `None` (with the finding) when no configured key opens it.
fn encrypted_cp(
    seg: &[u8],
    cps: header::CpStart,
    form: crypt::WireForm,
    keys: &[Key],
    declared_crc: Option<(u16, [u8; 4])>,
    policy: CrcPolicy,
    findings: &mut Vec<Finding>,
) -> Option<(Vec<u8>, Span)> {
    if keys.is_empty() {
        findings.push(Finding::new(
            code::DECRYPT_NOKEY,
            Severity::Error,
            format!(
                "CP is SM4-encrypted ({}) and no key is configured for this MN",
                form.as_str()
            ),
        ));
        return None;
    }
    match decrypt(seg, cps.body, form, keys, declared_crc.map(|d| d.0), policy) {
        Some((plain, close)) => Some((plain, Span::new(cps.body, close))),
        None => {
            findings.push(Finding::new(
                code::DECRYPT_FAILED,
                Severity::Error,
                format!(
                    "no configured key ({}) decrypts the CP to a frame matching its CRC",
                    keys.len()
                ),
            ));
            None
        }
    }
}

/// The CRC of the (plaintext) segment against the declared one, judged by policy.
fn check_crc(
    segment: &[u8],
    declared_crc: Option<(u16, [u8; 4])>,
    policy: CrcPolicy,
    findings: &mut Vec<Finding>,
) -> CrcCheck {
    let (computed, variant) = match declared_crc {
        Some((d, _)) => crc::identify(segment, d),
        None => (crc::hj212(segment), CrcVariant::Unknown),
    };
    if let Some((d, text)) = declared_crc {
        judge_crc(d, text, computed, variant, policy, findings);
    }
    CrcCheck {
        declared: declared_crc.map(|d| d.1),
        computed,
        variant,
    }
}

fn judge_crc(
    declared: u16,
    text: [u8; 4],
    computed: u16,
    variant: CrcVariant,
    policy: CrcPolicy,
    findings: &mut Vec<Finding>,
) {
    let shown = String::from_utf8_lossy(&text).into_owned();
    if variant == CrcVariant::Hj212 {
        if text.iter().any(u8::is_ascii_lowercase) {
            findings.push(Finding::new(
                code::CRC_LOWERCASE,
                Severity::Info,
                format!("CRC {shown} in lower case"),
            ));
        }
        return;
    }
    let accepted = policy.accepts(variant);
    let variant_code = match variant {
        CrcVariant::Modbus => Some(code::CRC_VARIANT_MODBUS),
        CrcVariant::ModbusSwapped => Some(code::CRC_VARIANT_MODBUS_SWAPPED),
        _ => None,
    };
    let _ = declared;
    let computed_s = String::from_utf8_lossy(&crc::format_hex4(computed)).into_owned();
    if let Some(vc) = variant_code {
        findings.push(Finding::new(
            vc,
            if accepted {
                Severity::Info
            } else {
                Severity::Warning
            },
            format!(
                "declared CRC {shown} is {} (HJ 212 CRC would be {computed_s})",
                variant.as_str()
            ),
        ));
    }
    if !accepted {
        findings.push(Finding::new(
            code::CRC_MISMATCH,
            if policy == CrcPolicy::Any {
                Severity::Warning
            } else {
                Severity::Error
            },
            format!(
                "declared {shown}, computed {computed_s} ({})",
                variant.as_str()
            ),
        ));
    } else if variant == CrcVariant::Unknown {
        findings.push(Finding::new(
            code::CRC_MISMATCH,
            Severity::Warning,
            format!("declared {shown}, computed {computed_s}; not enforced (crc = any)"),
        ));
    }
}

/// Tries each key; returns the plaintext segment and the offset of its closing `&&`.
///
/// A wrong key passes the 256-valued HJ 212 CRC one time in 256, so the
/// plaintext must also look like CP text (printable, with `=`).
fn decrypt(
    seg: &[u8],
    body: usize,
    form: WireForm,
    keys: &[Key],
    declared: Option<u16>,
    policy: CrcPolicy,
) -> Option<(Vec<u8>, usize)> {
    let declared = declared?;
    // Raw form: length-framed, the CP is everything up to the final "&&";
    // never search for delimiters inside ciphertext.
    let (cipher, tail, after): (Vec<u8>, &[u8], &[u8]) = match form {
        WireForm::Raw => {
            if !seg.ends_with(b"&&") || seg.len() < body + 2 {
                return None;
            }
            let cp = &seg[body..seg.len() - 2];
            let full = cp.len() / 16 * 16;
            (cp[..full].to_vec(), &cp[full..], b"&&")
        }
        // The wrapper is opened by `crypt::open_wrapper`, never here.
        WireForm::Text | WireForm::Wrapper => {
            let rest = &seg[body..];
            let close = memchr::memmem::rfind(rest, b"&&")?;
            let (bytes, tail) = crypt::parse_text_form(&rest[..close])?;
            if bytes.len() % 16 != 0 {
                return None;
            }
            (bytes, tail, &rest[close..])
        }
    };
    for key in keys {
        let mut plain_cp = cipher.clone();
        crypt::decrypt_in_place(key, &mut plain_cp);
        if plain_cp.iter().any(|&c| c < 0x20 || c == 0x7F)
            || !plain_cp.is_empty() && !plain_cp.contains(&b'=') && !tail.contains(&b'=')
        {
            continue;
        }
        let mut plain = Vec::with_capacity(body + plain_cp.len() + tail.len() + after.len());
        plain.extend_from_slice(&seg[..body]);
        plain.extend_from_slice(&plain_cp);
        plain.extend_from_slice(tail);
        let close = plain.len();
        plain.extend_from_slice(after);
        let (_, variant) = crc::identify(&plain, declared);
        if variant != CrcVariant::Unknown && policy.accepts(variant) || variant == CrcVariant::Hj212
        {
            return Some((plain, close));
        }
    }
    None
}

/// Field, dialect and timestamp checks (HJ 212-2017 Table 3 and Table 4) after
/// the frame is cut into its parts: each a finding on the frame, none of them
/// changing a byte.
fn validate(f: &mut Frame, opts: &Options, dialect_override: Option<Dialect>) {
    let mut out = std::mem::take(&mut f.findings);
    // Moved out and back rather than cloned (an atomic increment and decrement
    // of the shared buffer's count): the checks read the segment as `seg`,
    // never through `f`.
    let seg = std::mem::take(&mut f.segment);
    flag_and_dialect(f, &seg, dialect_override, &mut out);
    let is_2005 = f.dialect == Some(Dialect::V2005);
    check_qn(f, &seg, is_2005, &mut out);
    check_st(f, &seg, &mut out);
    check_cn(f, &seg, &mut out);
    check_mn(f, &seg, is_2005, &mut out);
    check_pw(f, &seg, &mut out);
    check_packet_and_rf(f, &seg, &mut out);
    device_time(f, &seg, opts, &mut out);
    f.segment = seg;
    f.findings = out;
}

/// The bytes of a header field, if the frame has it.
fn field(seg: &[u8], s: Option<Span>) -> Option<&[u8]> {
    s.map(|s| &seg[s.range()])
}

/// Flag (an integer 0..255), the QN a 2005 reply carries in CP, and the
/// dialect: from Flag's version bits, else inferred (HJ 212-2017 Table 3;
/// digest §3.2).
fn flag_and_dialect(
    f: &mut Frame,
    seg: &[u8],
    dialect_override: Option<Dialect>,
    out: &mut Vec<Finding>,
) {
    let get = |s: Option<Span>| field(seg, s);
    // Flag: integer 0..255.
    if let Some(v) = get(f.header.flag) {
        match std::str::from_utf8(v)
            .ok()
            .and_then(|t| t.parse::<u8>().ok())
        {
            Some(n) => f.flag = Some(n),
            None => out.push(Finding::new(
                code::FIELD_MALFORMED_FLAG,
                Severity::Warning,
                format!(
                    "Flag={:?} is not an integer 0..255",
                    String::from_utf8_lossy(v)
                ),
            )),
        }
    }
    // 2005 replies put the answered QN inside CP (HJ/T 212-2005 App. C).
    if f.header.qn.is_none() {
        f.cp_qn = f
            .pairs
            .iter()
            .find(|p| p.code.is_none() && &seg[p.key.range()] == b"QN")
            .map(|p| p.value);
    }
    let first_factor = f.pairs.iter().find_map(|p| p.code).map(|s| &seg[s.range()]);
    let mn = get(f.header.mn).unwrap_or(b"");
    let cls = dialect::classify(
        f.flag,
        &dialect::Hints {
            has_qn: f.header.qn.is_some(),
            has_rf: f.header.rf.is_some(),
            mn,
            first_factor,
        },
        dialect_override,
    );
    f.dialect = cls.dialect;
    let is_2005 = f.dialect == Some(Dialect::V2005);
    if f.flag.is_some() && f.dialect.is_none() {
        out.push(Finding::new(
            code::FLAG_VERSION_UNKNOWN,
            Severity::Warning,
            format!(
                "Flag version bits {} name no known edition",
                f.flag.unwrap_or(0) >> 2
            ),
        ));
    }
    if f.header.flag.is_none() {
        out.push(Finding::new(
            code::FIELD_MISSING_FLAG,
            if is_2005 {
                Severity::Info
            } else {
                Severity::Warning
            },
            "no Flag field; treated as 0 (no ack requested)",
        ));
    }
    if cls.guessed && dialect_override.is_none() && !is_2005 {
        out.push(Finding::new(
            code::DIALECT_GUESSED,
            Severity::Info,
            format!(
                "dialect {} inferred without Flag version bits",
                f.dialect.map_or("?", Dialect::as_str)
            ),
        ));
    }
}

/// QN: 17 digits `YYYYMMDDhhmmsszzz` (HJ 212-2017 Table 3); optional in 2005.
fn check_qn(f: &Frame, seg: &[u8], is_2005: bool, out: &mut Vec<Finding>) {
    let get = |s: Option<Span>| field(seg, s);
    match get(f.header.qn) {
        None if f.cp_qn.is_none() => out.push(Finding::new(
            code::FIELD_MISSING_QN,
            if is_2005 {
                Severity::Info
            } else {
                Severity::Warning
            },
            "no QN field",
        )),
        Some(q) if !(q.len() == 17 && q.iter().all(u8::is_ascii_digit)) => out.push(Finding::new(
            code::FIELD_MALFORMED_QN,
            Severity::Warning,
            format!(
                "QN={:?} is not 17 digits YYYYMMDDhhmmsszzz",
                String::from_utf8_lossy(q)
            ),
        )),
        _ => {}
    }
}

/// ST: the system code, 1..3 characters of `0-9A-Z` (HJ 212-2017 §6.6.1).
fn check_st(f: &Frame, seg: &[u8], out: &mut Vec<Finding>) {
    let get = |s: Option<Span>| field(seg, s);
    match get(f.header.st) {
        None => out.push(Finding::new(
            code::FIELD_MISSING_ST,
            Severity::Warning,
            "no ST field",
        )),
        Some(s)
            if s.is_empty()
                || s.len() > 3
                || !s
                    .iter()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()) =>
        {
            out.push(Finding::new(
                code::FIELD_MALFORMED_ST,
                Severity::Warning,
                format!(
                    "ST={:?} is not 1..3 characters of 0-9A-Z",
                    String::from_utf8_lossy(s)
                ),
            ))
        }
        _ => {}
    }
}

/// CN: the command code, 4 digits (HJ 212-2017 Table 3).
fn check_cn(f: &Frame, seg: &[u8], out: &mut Vec<Finding>) {
    let get = |s: Option<Span>| field(seg, s);
    match get(f.header.cn) {
        None => out.push(Finding::new(
            code::FIELD_MISSING_CN,
            Severity::Error,
            "no CN field",
        )),
        Some(c) if !(c.len() == 4 && c.iter().all(u8::is_ascii_digit)) => out.push(Finding::new(
            code::FIELD_MALFORMED_CN,
            Severity::Error,
            format!("CN={:?} is not 4 digits", String::from_utf8_lossy(c)),
        )),
        _ => {}
    }
}

/// MN: the device's identity; 14 characters in 2005, 24 hex digits later
/// (digest §3.4).
fn check_mn(f: &Frame, seg: &[u8], is_2005: bool, out: &mut Vec<Finding>) {
    let get = |s: Option<Span>| field(seg, s);
    // HJ/T 212-2005 App. C: the platform's data ack is
    // `ST=91;CN=9014;CP=&&QN=<qn>;CN=<cn>&&`, with no PW, MN or Flag, so a
    // missing MN there is the standard form, not an error.
    let ack_2005 =
        get(f.header.st) == Some(b"91".as_slice()) && get(f.header.cn) == Some(b"9014".as_slice());
    match get(f.header.mn) {
        None => out.push(Finding::new(
            code::FIELD_MISSING_MN,
            if ack_2005 {
                Severity::Info
            } else {
                Severity::Error
            },
            "no MN field",
        )),
        Some(m)
            if m.is_empty()
                || m.len() > 32
                || !m
                    .iter()
                    .all(|c| c.is_ascii_graphic() && !b";,=&".contains(c)) =>
        {
            out.push(Finding::new(
                code::FIELD_MALFORMED_MN,
                Severity::Error,
                format!(
                    "MN={:?} is empty, longer than 32 or has separators",
                    String::from_utf8_lossy(m)
                ),
            ))
        }
        Some(m) => {
            let standard = match f.dialect {
                Some(Dialect::V2005) => m.len() == 14,
                Some(_) => {
                    m.len() == 24
                        && m.iter()
                            .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
                }
                None => true,
            };
            if !standard {
                out.push(Finding::new(
                    code::FIELD_MALFORMED_MN,
                    Severity::Info,
                    format!(
                        "MN has {} characters; the {} edition specifies {}",
                        m.len(),
                        f.dialect.map_or("?", Dialect::as_str),
                        if is_2005 { "14" } else { "24 hex" }
                    ),
                ));
            }
        }
    }
}

/// PW: 6 characters (HJ 212-2017 Table 3).
fn check_pw(f: &Frame, seg: &[u8], out: &mut Vec<Finding>) {
    let get = |s: Option<Span>| field(seg, s);
    match get(f.header.pw) {
        None => out.push(Finding::new(
            code::FIELD_MISSING_PW,
            Severity::Warning,
            "no PW field",
        )),
        // The value itself is a credential: never put it in a finding.
        Some(p) if p.len() != 6 => out.push(Finding::new(
            code::FIELD_MALFORMED_PW,
            Severity::Info,
            format!("PW has {} characters; the standard specifies 6", p.len()),
        )),
        _ => {}
    }
}

/// PNUM/PNO: both present with 1 <= PNO <= PNUM (digest §3.5); RF, which the
/// 2025 edition defines only as `RF=1`.
fn check_packet_and_rf(f: &Frame, seg: &[u8], out: &mut Vec<Finding>) {
    let get = |s: Option<Span>| field(seg, s);
    let pnum = get(f.header.pnum);
    let pno = get(f.header.pno);
    if pnum.is_some() || pno.is_some() {
        let num =
            |v: Option<&[u8]>| v.and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok());
        match (num(pnum), num(pno)) {
            (Some(n), Some(i)) if i >= 1 && i <= n => {}
            (n, i) => out.push(Finding::new(
                code::FIELD_MALFORMED_PACKET,
                Severity::Warning,
                format!("PNUM={n:?} PNO={i:?}: both must be present with 1 <= PNO <= PNUM"),
            )),
        }
    }
    if let Some(rf) = get(f.header.rf) {
        if rf != b"1" {
            out.push(Finding::new(
                code::FIELD_UNKNOWN,
                Severity::Warning,
                format!(
                    "RF={:?}; the 2025 edition only defines RF=1",
                    String::from_utf8_lossy(rf)
                ),
            ));
        }
    }
}

/// DataTime (uploads) or SystemTime (1011 replies), device-local time against
/// the receive time.
fn device_time(f: &mut Frame, seg: &[u8], opts: &Options, out: &mut Vec<Finding>) {
    let time_pair = f
        .pairs
        .iter()
        .rev()
        .find(|p| p.code.is_none() && &seg[p.key.range()] == b"DataTime")
        .or_else(|| {
            f.pairs
                .iter()
                .rev()
                .find(|p| p.code.is_none() && &seg[p.key.range()] == b"SystemTime")
        });
    if let Some(p) = time_pair {
        let v = &seg[p.value.range()];
        match time::parse_local(v, opts.tz) {
            None => out.push(Finding::new(
                code::TIME_MALFORMED,
                Severity::Warning,
                format!(
                    "{}={:?} is not a valid YYYYMMDDhhmmss",
                    String::from_utf8_lossy(&seg[p.key.range()]),
                    String::from_utf8_lossy(v)
                ),
            )),
            Some(t) => {
                f.data_time = Some(t);
                f.data_time_ms = v.len() == 17;
                if f.data_time_ms {
                    out.push(Finding::new(
                        code::TIME_PRECISION,
                        Severity::Info,
                        "DataTime has milliseconds (17 digits)",
                    ));
                }
                let delta = (t.with_timezone(&Utc) - opts.now).num_seconds();
                if delta > opts.future_tolerance_s {
                    out.push(Finding::new(
                        code::TIME_FUTURE,
                        Severity::Warning,
                        format!(
                            "{} is {delta} s ahead of the receive time",
                            time::rfc3339(t, f.data_time_ms)
                        ),
                    ));
                } else if -delta > opts.stale_after_s && field(seg, f.header.rf) != Some(b"1") {
                    out.push(Finding::new(
                        code::TIME_STALE,
                        Severity::Warning,
                        format!(
                            "{} is {} s older than the receive time",
                            time::rfc3339(t, f.data_time_ms),
                            -delta
                        ),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::Value;

    use super::*;
    use crate::build::{Head, device_frame};

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 6, 1, 1, 0, 0).unwrap()
    }

    fn head(cn: u16) -> Head<'static> {
        Head {
            qn: Some(b"20240601085857223"),
            st: "31",
            cn,
            pw: "123456",
            mn: "010000A8900016F000169DC0",
            flag: Some(5),
            split: None,
        }
    }

    fn built(cn: u16, cp: &str) -> Vec<u8> {
        let mut out = Vec::new();
        device_frame(&mut out, &head(cn), None, |o| {
            o.extend_from_slice(cp.as_bytes())
        });
        out
    }

    fn codes(f: &Frame) -> Vec<&'static str> {
        f.findings.iter().map(|f| f.code).collect()
    }

    /// A log upload whose length field counts the Chinese text's characters
    /// (the CRC still over the bytes) is named as such, with both counts.
    #[test]
    fn length_counted_in_characters() {
        let mut raw = built(
            3020,
            "DataTime=20240601085857;i11001-Info=//清洗管路,反吹完成//",
        );
        let seg = &raw[6..raw.len() - 6];
        let bytes = seg.len();
        let chars = std::str::from_utf8(seg).unwrap().chars().count();
        assert!(chars < bytes);
        let field = format!("{chars:04}");
        raw[2..6].copy_from_slice(field.as_bytes());
        let f = decode(Bytes::from(raw), &Options::new(now()), &());
        assert_eq!(
            codes(&f),
            [code::LENGTH_MISMATCH, code::LENGTH_CHARACTERS],
            "{:?}",
            f.findings
        );
        assert_eq!(
            f.findings[1].detail,
            format!(
                "length field {field} counts characters; the data segment is {bytes} bytes ({chars} characters)"
            )
        );
        assert_eq!(f.findings[1].severity, f.findings[0].severity);

        // Any other miscount of the same frame is only a mismatch.
        let mut raw = built(
            3020,
            "DataTime=20240601085857;i11001-Info=//清洗管路,反吹完成//",
        );
        let other = format!("{:04}", chars + 1);
        raw[2..6].copy_from_slice(other.as_bytes());
        let f = decode(Bytes::from(raw), &Options::new(now()), &());
        assert_eq!(codes(&f), [code::LENGTH_MISMATCH]);

        // ASCII has as many characters as bytes: nothing to tell apart.
        let mut raw = built(2011, "DataTime=20240601085857;a21026-Rtd=12.5");
        raw[5] += 1;
        let f = decode(Bytes::from(raw), &Options::new(now()), &());
        assert_eq!(codes(&f), [code::LENGTH_MISMATCH]);
    }

    /// An alarm upload's comma list of factor ids and a Chinese description
    /// with commas reach the JSON whole, with the grammar findings kept.
    #[test]
    fn comma_lists_reach_the_json_whole() {
        let raw = built(
            2072,
            "DataTime=20240601085857;PolId=a21026,a21002,a21003;AlarmDesc=超标,持续10分钟;AlarmType=1",
        );
        let f = decode(Bytes::from(raw), &Options::new(now()), &());
        let v = Value::Object(crate::json::frame_json(&f, false));
        assert_eq!(v["params"]["PolId"], "a21026,a21002,a21003");
        assert_eq!(v["params"]["AlarmDesc"], "超标,持续10分钟");
        assert_eq!(v["params"]["AlarmType"], "1");
        assert_eq!(
            codes(&f),
            [code::CP_SYNTAX, code::CP_SYNTAX, code::CP_SYNTAX],
            "{:?}",
            f.findings
        );
    }

    /// The frame the framer now takes without CR LF (`issue-002`: Flag put
    /// after CP, glued to the CRC) decodes with its length and CRC holding and
    /// only the missing terminator and the bytes after CP reported.
    #[test]
    fn unclosed_frame_without_terminator() {
        let issue = b"##0108QN=20201222115733219;ST=32;CN=1012;PW=123456;MN=ABCDEFG;CP=&&SystemTime=20201222115733;PolId=w01018&&;Flag=03740";
        let f = decode(Bytes::from_static(issue), &Options::new(now()), &());
        let c = codes(&f);
        assert!(c.contains(&code::TERMINATOR_MISSING), "{c:?}");
        for bad in [code::LENGTH_MISMATCH, code::CRC_MISMATCH, code::CRC_MISSING] {
            assert!(!c.contains(&bad), "{c:?}");
        }
    }
}
