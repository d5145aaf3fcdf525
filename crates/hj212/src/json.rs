//! The frame JSON schema `hj212.frame.v1`, shared by `decode --json`,
//! `export --format jsonl` and the MQTT payloads.
//!
//! Numbers keep the device's digits (`12.50` stays `12.50`): serde_json is
//! built with `arbitrary_precision`, and values are never routed through f64.

use std::collections::HashMap;

use base64::Engine;
use serde_json::{Map, Value, json};

use super::cp::ValueKind;
use super::crc;
use super::frame::Frame;
use super::span::Span;
use super::time;

/// Schema identifier carried by every object.
pub const SCHEMA: &str = "hj212.frame.v1";

/// What a credential in CP is replaced with.
pub const REDACTED: &str = "<redacted>";

/// CP keys that carry credentials: 2005 `PW=` (set password, HJ/T 212-2005
/// App. C item 1), 2017 `NewPW` (1072), 2025 `NewSK` (1014 key push). They
/// never appear in the JSON document (the raw frame necessarily holds them).
pub fn is_secret(key: &[u8]) -> bool {
    matches!(key, b"PW" | b"NewPW" | b"NewSK")
}

/// Adds `raw` (when valid UTF-8) and `raw_b64` (always).
pub fn add_raw(obj: &mut Map<String, Value>, raw: &[u8]) {
    if let Ok(s) = std::str::from_utf8(raw) {
        obj.insert("raw".into(), Value::String(s.to_owned()));
    }
    obj.insert(
        "raw_b64".into(),
        Value::String(base64::engine::general_purpose::STANDARD.encode(raw)),
    );
}

/// The JSON object for a decoded frame. `include_raw` adds `raw`/`raw_b64`.
pub fn frame_json(f: &Frame, include_raw: bool) -> Map<String, Value> {
    let mut obj: Map<String, Value> =
        serde_json::from_str(&frame_doc(f)).expect("frame_doc writes valid JSON");
    if include_raw {
        add_raw(&mut obj, &f.raw);
    }
    obj
}

/// Appends `s` as a JSON string literal. Scans bytes, not chars: everything
/// that needs escaping is ASCII, and UTF-8 continuation bytes never are.
fn push_str(out: &mut String, s: &str) {
    out.push('"');
    let b = s.as_bytes();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc = match c {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            c if c < 0x20 => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            out.push_str(&format!("\\u{c:04x}"));
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn push_opt(out: &mut String, key: &str, v: Option<&str>) {
    push_str(out, key);
    out.push(':');
    match v {
        Some(v) => push_str(out, v),
        None => out.push_str("null"),
    }
    out.push(',');
}

/// The frame's JSON object as text, without `raw`/`raw_b64` (the form the
/// frame log stores). Written directly rather than through a `Map`: this runs
/// for every frame at ingest.
pub fn frame_doc(f: &Frame) -> String {
    frame_doc_and_time(f).0
}

/// [`frame_doc`] and the RFC 3339 `data_time` it holds, for callers that store
/// both (the frame log has a `data_time` column): formatted once.
///
/// Runs for every frame at ingest, so it writes text directly, allocates little
/// and stays linear in the number of CP items (a test holds it to the plain
/// version it replaced, over every fixture and generated frames).
pub fn frame_doc_and_time(f: &Frame) -> (String, Option<String>) {
    let dt = data_time_text(f);
    let findings = f
        .findings
        .iter()
        .map(|x| (x.code, x.severity.as_str(), &*x.detail));
    let doc = write_doc(f, dt.as_deref(), findings);
    (doc, dt)
}

/// The frame's `DataTime` as the document's `data_time` (RFC 3339 with the
/// decoder's time zone), without the rest of the document.
pub fn data_time_text(f: &Frame) -> Option<String> {
    f.data_time.map(|t| time::rfc3339(t, f.data_time_ms))
}

/// Whether the frame log may keep only a frame's raw bytes, `data_time` and
/// findings, and leave its document to [`rebuild_frame_doc`].
///
/// Everything else in the document is a function of the wire bytes alone,
/// except what decryption adds: an encrypted frame's values and CRC judgement
/// need the device's keys, which rotate, so its document is stored.
pub fn doc_rebuildable(f: &Frame) -> bool {
    f.encryption.is_none()
}

/// The document [`frame_doc_and_time`] wrote for a frame received as `raw`, from
/// what the frame log keeps of it: `data_time` and the findings array as stored.
///
/// Of the decoder's options only the time zone (which `data_time` carries) and
/// the clock and policies (which only add findings, carried by `findings`) can
/// change a document, so decoding again with default options gives back every
/// other field. The findings are parsed and written by the same escaping as at
/// ingest (the stored array was written by serde_json, which escapes two control
/// characters differently); an array that does not parse is spliced as it is.
pub fn rebuild_frame_doc(raw: &[u8], data_time: Option<&str>, findings: &str) -> String {
    let f = decode_for_rebuild(raw);
    if findings == "[]" {
        return write_doc(&f, data_time, std::iter::empty());
    }
    match serde_json::from_str::<Vec<StoredFinding>>(findings) {
        Ok(list) => write_doc(
            &f,
            data_time,
            list.iter().map(|x| (&*x.code, &*x.severity, &*x.detail)),
        ),
        Err(_) => {
            let mut doc = write_doc(&f, data_time, std::iter::empty());
            if let Some(at) = doc.rfind("\"findings\":[]") {
                doc.replace_range(at + 11..at + 13, findings);
            }
            doc
        }
    }
}

/// `raw` decoded as [`rebuild_frame_doc`] decodes it: with default options, so
/// the frame's fields and values are those of the document it rebuilds (see
/// there). For consumers that want those values without the document's text.
pub fn decode_for_rebuild(raw: &[u8]) -> Frame {
    let epoch = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    super::frame::decode(
        bytes::Bytes::copy_from_slice(raw),
        &super::frame::Options::new(epoch),
        &(),
    )
}

/// One finding as the frame log's `findings` column holds it, borrowed from
/// the column's text where it has no escapes: checking the column of every
/// record a consumer reads back allocated three strings per finding.
#[derive(serde::Deserialize)]
struct StoredFinding<'a> {
    #[serde(borrow)]
    code: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    severity: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    detail: std::borrow::Cow<'a, str>,
}

/// Whether [`rebuild_frame_doc`] writes `findings` into the document itself
/// (an array of findings as the log stores them), rather than splicing the
/// text in as it is (anything else, which only an altered file holds). A
/// document rebuilt with findings it writes is this module's text throughout.
pub fn findings_rewritten(findings: &str) -> bool {
    findings == "[]" || serde_json::from_str::<Vec<StoredFinding>>(findings).is_ok()
}

/// The document of `f` with `dt` as its `data_time` and `findings` as
/// `(code, severity, detail)`.
fn write_doc<'a>(
    f: &Frame,
    dt: Option<&str>,
    findings: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
) -> String {
    let mut out = String::with_capacity(f.segment.len() * 2 + 256);
    out.push_str("{\"schema\":\"hj212.frame.v1\",\"kind\":\"frame\",");
    push_opt(&mut out, "dialect", f.dialect.map(|d| d.as_str()));
    push_opt(&mut out, "qn", f.qn());
    push_opt(&mut out, "st", f.st());
    push_opt(&mut out, "cn", f.cn());
    push_opt(&mut out, "mn", f.mn());
    push_num(&mut out, "\"flag\":", f.flag.map(u32::from));
    push_num(&mut out, "\"pnum\":", f.pnum());
    push_num(&mut out, "\"pno\":", f.pno());
    out.push_str(if f.rf() {
        "\"rf\":true,"
    } else {
        "\"rf\":false,"
    });
    push_opt(&mut out, "data_time", dt);
    push_opt(&mut out, "encryption", f.encryption.map(|e| e.as_str()));

    out.push_str("\"values\":{");
    let text = SegmentText::new(f);
    visit_values_in(
        f,
        &text,
        &mut DocValues {
            out: &mut out,
            factors: 0,
            first: true,
        },
    );
    out.push_str("},\"params\":{");
    let mut first = true;
    let last = last_index(
        f.pairs.iter().filter(|p| p.suffix.is_none()).count(),
        f.pairs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.suffix.is_none())
            .map(|(i, p)| (i, f.bytes(p.key))),
    );
    for (i, p) in f.pairs.iter().enumerate() {
        if p.suffix.is_some() {
            continue;
        }
        let key = f.bytes(p.key);
        let repeated_later = match &last {
            Some(last) => last[key] != i,
            None => f.pairs[i + 1..]
                .iter()
                .any(|q| q.suffix.is_none() && f.bytes(q.key) == key),
        };
        if repeated_later {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        push_str(&mut out, &text.piece(p.key));
        out.push(':');
        if is_secret(key) {
            push_str(&mut out, REDACTED);
        } else {
            push_str(&mut out, &text.piece(p.value));
        }
    }
    out.push_str("},\"findings\":[");
    for (i, (code, severity, detail)) in findings.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"code\":");
        push_str(&mut out, code);
        out.push_str(",\"severity\":");
        push_str(&mut out, severity);
        out.push_str(",\"detail\":");
        push_str(&mut out, detail);
        out.push('}');
    }
    out.push_str("],\"crc\":{\"declared\":");
    match f.crc.declared {
        Some(d) => push_str(&mut out, &lossy(&d)),
        None => out.push_str("null"),
    }
    out.push_str(",\"computed\":");
    push_str(&mut out, &lossy(&crc::format_hex4(f.crc.computed)));
    out.push_str(",\"variant\":");
    match f.crc.declared {
        Some(_) => push_str(&mut out, f.crc.variant.as_str()),
        None => out.push_str("null"),
    }
    out.push_str("}}");
    out
}

/// What the document's `values` object holds, in its order, for a reader that
/// wants the values without the JSON text (see [`visit_values`]).
pub trait ValuesVisitor {
    /// A factor's object begins; `code` is its key.
    fn factor(&mut self, code: &str);
    /// One entry of the current factor: the suffix, how the document writes
    /// the value (`Number` as is, `LooseNumber` through [`normalise_number`],
    /// `Text` as a string) and the value's text.
    fn value(&mut self, suffix: &str, kind: ValueKind, text: &str);
    /// The current factor's object ends.
    fn end_factor(&mut self);
}

/// Walks the CP items of `f` in the shape the document's `values` object gives
/// them, the one place that shape is decided: factor code -> suffix -> value,
/// codes in first-seen order, each code's items in frame order, a suffix
/// repeated within a code kept at its last occurrence only (the duplicate is a
/// finding). Codes, suffixes and values are read as [`lossy`] text, so two
/// codes that differ only in invalid UTF-8 give two factors with the same key,
/// as in the document.
pub fn visit_values<V: ValuesVisitor>(f: &Frame, v: &mut V) {
    visit_values_in(f, &SegmentText::new(f), v);
}

/// [`visit_values`] with the frame's text already validated.
fn visit_values_in<V: ValuesVisitor>(f: &Frame, text: &SegmentText<'_>, v: &mut V) {
    // Items are ranked by their code's first appearance and sorted, which keeps
    // each code's items in frame order.
    let mut codes: Vec<&[u8]> = Vec::new();
    // Past a few codes they are looked up by hash: a scan per item is
    // quadratic in a hostile CP of ~1,700 codes (see `last_index`).
    let mut rank_of: Option<HashMap<&[u8], usize>> = None;
    let mut items: Vec<(usize, usize)> = Vec::with_capacity(f.pairs.len());
    for (i, p) in f.pairs.iter().enumerate() {
        if let (Some(c), Some(_)) = (p.code, p.suffix) {
            let c = f.bytes(c);
            // A code's items are usually adjacent: try the last code first.
            let rank = if codes.last() == Some(&c) {
                codes.len() - 1
            } else if let Some(index) = &mut rank_of {
                *index.entry(c).or_insert_with(|| {
                    codes.push(c);
                    codes.len() - 1
                })
            } else if let Some(r) = codes.iter().position(|k| *k == c) {
                r
            } else {
                codes.push(c);
                if codes.len() > SCAN_MAX {
                    rank_of = Some(codes.iter().enumerate().map(|(r, k)| (*k, r)).collect());
                }
                codes.len() - 1
            };
            items.push((rank, i));
        }
    }
    items.sort_unstable();
    let suffix_span = |i: usize| f.pairs[i].suffix.expect("an item has a suffix");
    let suffix = |i: usize| f.bytes(suffix_span(i));
    for group in items.chunk_by(|a, b| a.0 == b.0) {
        // The group's first item is the code's first appearance (`codes`).
        let code = f.pairs[group[0].1].code.expect("an item has a code");
        v.factor(&text.piece(code));
        let last = last_index(
            group.len(),
            group.iter().enumerate().map(|(j, &(_, i))| (j, suffix(i))),
        );
        for (j, &(_, i)) in group.iter().enumerate() {
            let sfx = suffix(i);
            let repeated_later = match &last {
                Some(last) => last[sfx] != j,
                None => group[j + 1..].iter().any(|&(_, k)| suffix(k) == sfx),
            };
            if repeated_later {
                continue;
            }
            let p = &f.pairs[i];
            v.value(&text.piece(suffix_span(i)), p.kind, &text.piece(p.value));
        }
        v.end_factor();
    }
}

/// [`visit_values`] writing the document's `values` entries.
struct DocValues<'o> {
    out: &'o mut String,
    factors: usize,
    first: bool,
}

impl ValuesVisitor for DocValues<'_> {
    fn factor(&mut self, code: &str) {
        if self.factors > 0 {
            self.out.push(',');
        }
        self.factors += 1;
        self.first = true;
        push_str(self.out, code);
        self.out.push_str(":{");
    }

    fn value(&mut self, suffix: &str, kind: ValueKind, text: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        push_str(self.out, suffix);
        self.out.push(':');
        match kind {
            ValueKind::Number => self.out.push_str(text),
            ValueKind::LooseNumber => push_normalised(self.out, text),
            ValueKind::Text => push_str(self.out, text),
        }
    }

    fn end_factor(&mut self) {
        self.out.push('}');
    }
}

/// Keys looked up by scanning at most this many: a CP holds a few dozen items,
/// and a scan of so few beats hashing them (at most ~2,000 short comparisons
/// per frame).
const SCAN_MAX: usize = 64;

/// Where each key of `keys` (at most `n` of them, each with its position) last
/// occurs, when `n` is more than [`SCAN_MAX`]; `None` for fewer, which the
/// caller scans. Keeping only a key's last occurrence by scanning the ones
/// after it is quadratic, and a hostile 10 KiB CP of ~1,700 distinct keys made
/// that milliseconds of CPU per frame; this is linear, with std's randomly
/// keyed hasher so that no chosen set of keys collides.
fn last_index<'k>(
    n: usize,
    keys: impl Iterator<Item = (usize, &'k [u8])>,
) -> Option<HashMap<&'k [u8], usize>> {
    (n > SCAN_MAX).then(|| keys.map(|(i, k)| (k, i)).collect())
}

/// A frame's data segment as text, validated once: [`SegmentText::piece`]
/// cuts a key, code, suffix or value from it with two boundary checks, where
/// [`lossy`] per piece paid a UTF-8 validation call for each of the ~60
/// pieces of a frame (on the sessions for the document, on the detector for
/// every frame it reads back).
struct SegmentText<'f> {
    segment: &'f [u8],
    text: Option<&'f str>,
}

impl<'f> SegmentText<'f> {
    fn new(f: &'f Frame) -> SegmentText<'f> {
        SegmentText {
            segment: &f.segment,
            text: std::str::from_utf8(&f.segment).ok(),
        }
    }

    /// The span's bytes as [`lossy`] gives them: a piece of a UTF-8 segment
    /// that starts and ends on character boundaries is UTF-8 itself.
    fn piece(&self, s: Span) -> std::borrow::Cow<'f, str> {
        match self.text.and_then(|t| t.get(s.range())) {
            Some(t) => std::borrow::Cow::Borrowed(t),
            None => lossy(&self.segment[s.range()]),
        }
    }
}

/// `b` as text: borrowed when it is UTF-8 (checked on the fast path), with
/// U+FFFD for invalid sequences otherwise, as [`String::from_utf8_lossy`].
fn lossy(b: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(b),
    }
}

/// `key` (already quoted, with its colon), the number or `null`, and a comma.
fn push_num(out: &mut String, key: &str, v: Option<u32>) {
    out.push_str(key);
    match v {
        Some(v) => push_u32(out, v),
        None => out.push_str("null"),
    }
    out.push(',');
}

fn push_u32(out: &mut String, v: u32) {
    out.push_str(super::build::decimal(u64::from(v), &mut [0; 20]));
}

/// Appends a loose number's text (`+5`, `007.50`) as the document writes it:
/// JSON number syntax, no `+`, no leading zeros (`5`, `7.50`).
pub fn normalise_number(out: &mut String, v: &str) {
    push_normalised(out, v);
}

/// Normalises a loose decimal (`+1`, `.5`, `1.`, `007`) to JSON number syntax,
/// written straight into `out`.
fn push_normalised(out: &mut String, v: &str) {
    let (sign, body) = match v.as_bytes().first() {
        Some(b'-') => ("-", &v[1..]),
        Some(b'+') => ("", &v[1..]),
        _ => ("", v),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let int = int.trim_start_matches('0');
    out.push_str(sign);
    out.push_str(if int.is_empty() { "0" } else { int });
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
}

/// The JSON object for bytes that are not a frame (one junk item).
pub fn junk_json(bytes: &[u8], reason: &str, include_raw: bool) -> Map<String, Value> {
    let len = bytes.len() as u64;
    junk_run_json(&[(reason, 1, len)], &[], include_raw.then_some(bytes))
}

/// One junk item inside a junk record: where it starts in the record's bytes,
/// how long it is, and why it is junk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JunkPiece {
    /// Offset in the record's raw bytes.
    pub at: usize,
    /// Length in bytes.
    pub len: usize,
    /// The framer's reason (`JunkReason::as_str`).
    pub reason: &'static str,
}

/// The JSON object for a junk record: consecutive junk items of one session
/// stored as one record. `reasons` holds (reason, items, bytes) per reason
/// present; `pieces` the first items in order (the caller bounds how many). One
/// finding per reason, so the object's size is bounded by the number of
/// reasons and pieces, not by the number of items. A record of a single item
/// reads exactly as [`junk_json`] always did; several add `items`, `pieces`
/// and `pieces_omitted`.
pub fn junk_run_json(
    reasons: &[(&str, u64, u64)],
    pieces: &[JunkPiece],
    raw: Option<&[u8]>,
) -> Map<String, Value> {
    let items: u64 = reasons.iter().map(|r| r.1).sum();
    let mut obj = Map::new();
    obj.insert("schema".into(), SCHEMA.into());
    obj.insert("kind".into(), "junk".into());
    obj.insert("dialect".into(), Value::Null);
    let findings: Vec<Value> = reasons
        .iter()
        .map(|&(reason, n, bytes)| {
            let detail = if n == 1 {
                format!("{bytes} bytes that are not an HJ 212 frame ({reason})")
            } else {
                format!("{bytes} bytes in {n} items that are not an HJ 212 frame ({reason})")
            };
            json!({"code": format!("junk.{reason}"), "severity": "error", "detail": detail})
        })
        .collect();
    obj.insert("findings".into(), Value::Array(findings));
    if items > 1 {
        obj.insert("items".into(), items.into());
        let listed: Vec<Value> = pieces
            .iter()
            .map(|p| json!({"at": p.at, "len": p.len, "reason": p.reason}))
            .collect();
        obj.insert("pieces".into(), Value::Array(listed));
        obj.insert(
            "pieces_omitted".into(),
            items.saturating_sub(pieces.len() as u64).into(),
        );
    }
    if let Some(bytes) = raw {
        add_raw(&mut obj, bytes);
    }
    obj
}

/// Structurally well-formed JSON text: one object or array opening with `open`,
/// brackets balanced and matched, strings closed with valid escapes and no raw
/// control characters, only whitespace around it, and nothing outside strings
/// but JSON's punctuation, number characters and the letters of its literals.
/// Not a full parse (`{"a":}` passes): a linear scan without allocation, for
/// checking text our own serializers wrote (the frame log's `validate`).
pub fn well_formed(text: &[u8], open: u8) -> bool {
    let start = text
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(text.len());
    if text.get(start) != Some(&open) {
        return false;
    }
    // Open brackets as a bit stack (1 = object), as deep as serde_json's own limit.
    let (mut stack, mut depth) = (0u128, 0u32);
    let mut i = start;
    while i < text.len() {
        let c = text[i];
        i += 1;
        match c {
            b'{' | b'[' => {
                if depth == 128 {
                    return false;
                }
                stack = (stack << 1) | u128::from(c == b'{');
                depth += 1;
            }
            b'}' | b']' => {
                if depth == 0 || (stack & 1 == 1) != (c == b'}') {
                    return false;
                }
                stack >>= 1;
                depth -= 1;
                if depth == 0 {
                    return text[i..].iter().all(u8::is_ascii_whitespace);
                }
            }
            b'"' => loop {
                // Plain string bytes in one tight pass; then the quote, escape or error.
                while text
                    .get(i)
                    .is_some_and(|&b| b >= 0x20 && b != b'"' && b != b'\\')
                {
                    i += 1;
                }
                match text.get(i) {
                    None => return false,
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => match text.get(i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                        Some(b'u')
                            if text.len() >= i + 6
                                && text[i + 2..i + 6].iter().all(u8::is_ascii_hexdigit) =>
                        {
                            i += 6
                        }
                        _ => return false,
                    },
                    Some(&b) if b < 0x20 => return false,
                    Some(_) => i += 1,
                }
            },
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' | b'-' | b'+' | b'.' | b'0'..=b'9' => {}
            // The letters of true, false, null and exponents.
            b'a' | b'e' | b'f' | b'l' | b'n' | b'r' | b's' | b't' | b'u' | b'E' => {}
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod well_formed_tests {
    use super::well_formed;

    #[test]
    fn accepts_our_documents_and_rejects_broken_ones() {
        for ok in [
            "{}",
            " []",
            r#"{"a":[1,-2.5e+3,true,false,null],"b":{"c":"x\"y\\z\u00e9\n"}} "#,
            "{\"t\":\"\u{4e2d}\u{6587}\"}",
        ] {
            let open = ok.trim_start().as_bytes()[0];
            assert!(well_formed(ok.as_bytes(), open), "{ok}");
        }
        for (bad, open) in [
            ("", b'{'),
            ("[1]", b'{'),
            ("{}", b'['),
            ("{\"a\":", b'{'),
            ("{\"a\":\"x}", b'{'),
            ("{\"a\":[1}", b'{'),
            ("{}{}", b'{'),
            ("{} x", b'{'),
            ("{\"a\":\"\\u12\"}", b'{'),
            ("{\"a\":\"\\q\"}", b'{'),
            ("{\"a\":\"line\nbreak\"}", b'{'),
            ("{\"a\":x}", b'{'),
            ("{\"a\":1]", b'{'),
        ] {
            assert!(!well_formed(bad.as_bytes(), open), "{bad:?}");
        }
        let deep = "[".repeat(129) + &"]".repeat(129);
        assert!(!well_formed(deep.as_bytes(), b'['));
        let ok = "[".repeat(128) + &"]".repeat(128);
        assert!(well_formed(ok.as_bytes(), b'['));
    }
}

/// The plain implementation the ingest path was optimised from (tests only).
#[cfg(test)]
mod reference {
    use super::*;

    /// Normalises a loose decimal (`+1`, `.5`, `1.`, `007`) to JSON number syntax.
    fn normalise(v: &str) -> String {
        let (sign, body) = match v.as_bytes().first() {
            Some(b'-') => ("-", &v[1..]),
            Some(b'+') => ("", &v[1..]),
            _ => ("", v),
        };
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        let int = int.trim_start_matches('0');
        let int = if int.is_empty() { "0" } else { int };
        if frac.is_empty() {
            format!("{sign}{int}")
        } else {
            format!("{sign}{int}.{frac}")
        }
    }

    /// The straightforward version `frame_doc_and_time` replaced: the reference it
    /// must match byte for byte.
    pub(super) fn reference_doc_and_time(f: &Frame) -> (String, Option<String>) {
        let mut out = String::with_capacity(f.segment.len() * 2 + 256);
        out.push_str("{\"schema\":\"hj212.frame.v1\",\"kind\":\"frame\",");
        push_opt(&mut out, "dialect", f.dialect.map(|d| d.as_str()));
        push_opt(&mut out, "qn", f.qn());
        push_opt(&mut out, "st", f.st());
        push_opt(&mut out, "cn", f.cn());
        push_opt(&mut out, "mn", f.mn());
        let num = |out: &mut String, key: &str, v: Option<u32>| {
            out.push_str(&format!("\"{key}\":"));
            match v {
                Some(v) => out.push_str(&v.to_string()),
                None => out.push_str("null"),
            }
            out.push(',');
        };
        num(&mut out, "flag", f.flag.map(u32::from));
        num(&mut out, "pnum", f.pnum());
        num(&mut out, "pno", f.pno());
        out.push_str(if f.rf() {
            "\"rf\":true,"
        } else {
            "\"rf\":false,"
        });
        let dt = f.data_time.map(|t| time::rfc3339_chrono(t, f.data_time_ms));
        push_opt(&mut out, "data_time", dt.as_deref());
        push_opt(&mut out, "encryption", f.encryption.map(|e| e.as_str()));

        // values: factor code -> suffix -> value, codes in first-seen order; a
        // repeated key keeps its last value (the duplicate is a finding).
        out.push_str("\"values\":{");
        let mut codes: Vec<&[u8]> = Vec::new();
        for p in &f.pairs {
            if let (Some(c), Some(_)) = (p.code, p.suffix) {
                let c = f.bytes(c);
                if !codes.contains(&c) {
                    codes.push(c);
                }
            }
        }
        for (ci, code) in codes.iter().enumerate() {
            if ci > 0 {
                out.push(',');
            }
            push_str(&mut out, &String::from_utf8_lossy(code));
            out.push_str(":{");
            let mut first = true;
            let mine: Vec<_> = f
                .pairs
                .iter()
                .filter(|p| p.suffix.is_some() && p.code.map(|c| f.bytes(c)) == Some(*code))
                .collect();
            for (i, p) in mine.iter().enumerate() {
                let suffix = f.bytes(p.suffix.expect("filtered"));
                if mine[i + 1..]
                    .iter()
                    .any(|q| f.bytes(q.suffix.expect("filtered")) == suffix)
                {
                    continue;
                }
                if !first {
                    out.push(',');
                }
                first = false;
                push_str(&mut out, &String::from_utf8_lossy(suffix));
                out.push(':');
                let text = f.text(p.value);
                match p.kind {
                    ValueKind::Number => out.push_str(&text),
                    ValueKind::LooseNumber => out.push_str(&normalise(&text)),
                    ValueKind::Text => push_str(&mut out, &text),
                }
            }
            out.push('}');
        }
        out.push_str("},\"params\":{");
        let params: Vec<_> = f.pairs.iter().filter(|p| p.suffix.is_none()).collect();
        let mut first = true;
        for (i, p) in params.iter().enumerate() {
            let key = f.bytes(p.key);
            if params[i + 1..].iter().any(|q| f.bytes(q.key) == key) {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            push_str(&mut out, &String::from_utf8_lossy(key));
            out.push(':');
            if is_secret(key) {
                push_str(&mut out, REDACTED);
            } else {
                push_str(&mut out, &f.text(p.value));
            }
        }
        out.push_str("},\"findings\":[");
        for (i, x) in f.findings.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"code\":");
            push_str(&mut out, x.code);
            out.push_str(",\"severity\":");
            push_str(&mut out, x.severity.as_str());
            out.push_str(",\"detail\":");
            push_str(&mut out, &x.detail);
            out.push('}');
        }
        out.push_str("],\"crc\":{\"declared\":");
        match f.crc.declared {
            Some(d) => push_str(&mut out, &String::from_utf8_lossy(&d)),
            None => out.push_str("null"),
        }
        out.push_str(",\"computed\":");
        push_str(
            &mut out,
            &String::from_utf8_lossy(&crc::format_hex4(f.crc.computed)),
        );
        out.push_str(",\"variant\":");
        match f.crc.declared {
            Some(_) => push_str(&mut out, f.crc.variant.as_str()),
            None => out.push_str("null"),
        }
        out.push_str("}}");
        (out, dt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Options, decode};
    use bytes::Bytes;
    use chrono::TimeZone;

    /// Every fixture frame, and generated frames with what the fast path special-
    /// cases (repeated codes and suffixes, interleaved codes, loose numbers, text
    /// values, invalid UTF-8, escapes, secrets, repeated params), give the same
    /// document as the reference implementation.
    #[test]
    fn documents_equal_the_reference() {
        let now = chrono::Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let check = |raw: Vec<u8>| {
            let f = decode(Bytes::from(raw), &Options::new(now), &());
            assert_eq!(
                frame_doc_and_time(&f),
                reference::reference_doc_and_time(&f),
                "{:?}",
                String::from_utf8_lossy(&f.raw)
            );
        };
        let corpus = crate::fixture_frames();
        assert!(corpus.len() > 50, "{} fixtures", corpus.len());
        for raw in corpus {
            check(raw);
        }
        let items: [&[u8]; 16] = [
            b"a01-Rtd=1.5",
            b"a02-Rtd=+007.",
            b"a01-Flag=N",
            b"a01-Rtd=2.5",
            b"a03-Avg=.5",
            b"a02-Info=x\"y",
            b"a\xff-Rtd=3",
            b"a01-\xfe=4",
            b"PW=secret",
            b"DataTime=20260601080000",
            b"DataTime=20260601080500000",
            b"Note=a\tb",
            b"a04-SampleTime=20260601080000",
            b"a02-Rtd=-1e3",
            b"a05-Rtd=",
            b"x=\x01",
        ];
        let mut x: u32 = 12345;
        for _ in 0..3000 {
            let mut cp = Vec::new();
            let len = (x % 9) as usize;
            for k in 0..len {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if k > 0 {
                    cp.push(if x & 0x100 == 0 { b';' } else { b',' });
                }
                cp.extend_from_slice(items[(x >> 16) as usize % items.len()]);
            }
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let mut body =
                b"QN=20260601080000000;ST=22;CN=2011;PW=123456;MN=MN1;Flag=4;CP=&&".to_vec();
            body.extend_from_slice(&cp);
            body.extend_from_slice(b"&&");
            let crc = crate::crc::format_hex4(crate::crc::hj212(&body));
            let mut raw = format!("##{:04}", body.len()).into_bytes();
            raw.extend_from_slice(&body);
            raw.extend_from_slice(&crc);
            raw.extend_from_slice(b"\r\n");
            check(raw);
        }
    }

    /// CP areas past the scan limit ([`SCAN_MAX`]): many codes, many suffixes of
    /// one code, many parameters, each with repeats, give the reference's
    /// document, where the hash lookups take over from the scans.
    #[test]
    fn large_cp_areas_equal_the_reference() {
        let now = chrono::Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let mut x: u32 = 99;
        for n in [63, 64, 65, 66, 130, 200, 600] {
            for shape in 0..4 {
                let mut cp = Vec::new();
                for k in 0..n {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    let r = (x >> 8) as usize % (n / 2 + 1);
                    if k > 0 {
                        cp.push(if x & 0x100 == 0 { b';' } else { b',' });
                    }
                    let item = match shape {
                        // Many codes, a few suffixes each.
                        0 => format!("c{r}-S{}={k}", r % 3),
                        // One code, many suffixes.
                        1 => format!("a01-S{r}={k}"),
                        // Many parameters.
                        2 => format!("P{r}={k}"),
                        // All three, with invalid UTF-8 among the codes.
                        _ => match k % 3 {
                            0 => format!("c{r}-Rtd={k}"),
                            1 => format!("a01-S{r}=+0{k}"),
                            _ => format!("P{r}=v{k}"),
                        },
                    };
                    cp.extend_from_slice(item.as_bytes());
                    if shape == 3 && r % 7 == 0 {
                        cp.extend_from_slice(b";\xff");
                        cp.extend_from_slice(format!("{}-Rtd=1", r % 5).as_bytes());
                    }
                }
                let mut body =
                    b"QN=20260601080000000;ST=22;CN=2011;PW=123456;MN=MN1;Flag=4;CP=&&".to_vec();
                body.extend_from_slice(&cp);
                body.extend_from_slice(b"&&");
                let raw = crate::reply::envelope(&body).to_vec();
                let f = decode(Bytes::from(raw), &Options::new(now), &());
                assert_eq!(
                    frame_doc_and_time(&f),
                    reference::reference_doc_and_time(&f),
                    "n {n}, shape {shape}"
                );
            }
        }
    }

    /// What the frame log keeps of a frame without encryption (raw bytes,
    /// `data_time`, the findings array) gives back the document written at
    /// ingest, byte for byte: over every fixture, under another time zone and
    /// clock, under every CRC policy, and with findings whose text serde_json
    /// escapes differently from this module (backspace, form feed).
    #[test]
    fn rebuilt_documents_equal_the_ingest_documents() {
        let now = chrono::Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let mut checked = 0;
        for raw in crate::fixture_frames() {
            for (tz_h, crc) in [
                (8, crate::CrcPolicy::Strict),
                (-5, crate::CrcPolicy::Any),
                (0, crate::CrcPolicy::Modbus),
                (3, crate::CrcPolicy::Swapped),
            ] {
                let mut opts = Options::new(now);
                opts.tz = chrono::FixedOffset::east_opt(tz_h * 3600).unwrap();
                opts.crc = crc;
                let mut f = decode(Bytes::from(raw.clone()), &opts, &());
                f.findings.push(crate::Finding::new(
                    "auth.password",
                    crate::Severity::Error,
                    "odd \u{8} \u{c} \u{1f} \"text\" \\ 中文",
                ));
                let (doc, dt) = frame_doc_and_time(&f);
                if !doc_rebuildable(&f) {
                    continue;
                }
                let stored = serde_json::to_string(&f.findings).unwrap();
                assert_eq!(
                    rebuild_frame_doc(&f.raw, dt.as_deref(), &stored),
                    doc,
                    "{:?}",
                    String::from_utf8_lossy(&f.raw)
                );
                checked += 1;
            }
        }
        assert!(checked > 200, "{checked} documents checked");
    }

    /// A findings array that does not parse as findings (only an altered file
    /// holds one) is kept as it is rather than lost.
    #[test]
    fn a_findings_array_of_another_shape_is_spliced_as_stored() {
        let raw = b"##0101QN=20240601085857223;ST=31;CN=2011;PW=123456;MN=MN1;Flag=4;CP=&&DataTime=20240601085857;a01-Rtd=1.5&&";
        let mut raw = raw.to_vec();
        let body = raw[6..].to_vec();
        raw.truncate(2);
        raw.extend_from_slice(format!("{:04}", body.len()).as_bytes());
        raw.extend_from_slice(&body);
        raw.extend_from_slice(&crate::crc::format_hex4(crate::crc::hj212(&body)));
        raw.extend_from_slice(b"\r\n");
        let doc = rebuild_frame_doc(&raw, None, r#"[1,"two"]"#);
        let v: Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["findings"], json!([1, "two"]));
        assert_eq!(v["values"]["a01"]["Rtd"], json!(1.5));
        assert_eq!(v["crc"]["variant"], "hj212");
        assert_eq!(
            crate::frame::crc_variant(&raw),
            Some(crate::crc::CrcVariant::Hj212)
        );
    }

    #[test]
    fn exact_digits_and_shape() {
        let raw = b"##0295QN=20240601085857223;ST=31;CN=2011;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&DataTime=20240601085857;a21026-Rtd=12.5,a21026-ZsRtd=15.1,a21026-Flag=N;a21002-Rtd=35.2,a21002-ZsRtd=42.6,a21002-Flag=N;a34013-Rtd=3.1,a34013-Flag=N;a19001-Rtd=9.8,a19001-Flag=N;a00000-Rtd=28.15,a00000-Flag=N&&3E80\r\n";
        let now = chrono::Utc.with_ymd_and_hms(2024, 6, 1, 1, 0, 0).unwrap();
        let f = decode(Bytes::from_static(raw), &Options::new(now), &());
        let v = Value::Object(frame_json(&f, true));
        let text = serde_json::to_string(&v).unwrap();
        assert!(
            text.contains(r#""a21026":{"Rtd":12.5,"ZsRtd":15.1,"Flag":"N"}"#),
            "{text}"
        );
        assert!(text.contains(r#""a00000":{"Rtd":28.15,"Flag":"N"}"#));
        assert_eq!(v["dialect"], "2017");
        assert_eq!(v["data_time"], "2024-06-01T08:58:57+08:00");
        assert_eq!(v["params"]["DataTime"], "20240601085857");
        assert_eq!(v["crc"]["variant"], "hj212");
        assert_eq!(v["raw"].as_str().unwrap().as_bytes(), raw);
        assert!(v.get("pw").is_none());
        let n: Value = serde_json::from_str(r#"{"x":12.50}"#).unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), r#"{"x":12.50}"#);
        let normalise = |v: &str| {
            let mut out = String::new();
            push_normalised(&mut out, v);
            out
        };
        assert_eq!(normalise("+1.5"), "1.5");
        assert_eq!(normalise("007"), "7");
        assert_eq!(normalise(".5"), "0.5");
        assert_eq!(normalise("-1."), "-1");
        assert_eq!(normalise("-007.50"), "-7.50");
    }
}
