//! Cutting a hostile TCP byte stream into HJ 212 frames and junk.
//!
//! The standard's envelope (HJ 212-2017 §6.3, Table 2):
//!
//! ```text
//! "##" | LLLL | data segment (LLLL bytes) | CCCC | CR LF
//! ```
//!
//! Real streams bend every part of it: lengths with 1..3 digits or miscounted,
//! LF or CR alone or nothing as terminator, modem registration strings and NUL
//! padding between frames, frames cut short in transit and glued to the next
//! one, and (HJ 212-2025) raw SM4 ciphertext inside `CP=&&…&&` that may hold any
//! byte, `##`, `&&` and CR LF included. This layer only finds boundaries; it
//! never judges CRCs or fields except in one place (the early tail, below).
//!
//! Guarantees of [`cut`]:
//! * every byte ends up in exactly one item, so the concatenation of all items
//!   is the input and a good frame next to garbage is never lost;
//! * frames (and `truncated`/`oversize` junk) do not depend on how the stream
//!   was chunked. Junk that is emitted eagerly (`no_header`, `bad_length`,
//!   `padding`) may be split differently, and a run split at a read boundary
//!   may be labelled differently, but it covers the same bytes;
//! * no allocation, no clock, no I/O. Memory is bounded by
//!   [`FramerConfig::max_frame`] because nothing is ever held back longer.
//!
//! Accepted cost: `cut` is stateless, so a frame arriving one byte per read is
//! rescanned on every read (a `memchr` pass over at most `max_frame` bytes).

use memchr::{memchr_iter, memchr3_iter, memmem};

use super::crc;

/// Limits for [`cut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramerConfig {
    /// Cap on one frame's total bytes, `##` to terminator inclusive. The standard's
    /// largest frame is 1036 bytes, a 4-digit length allows 10 011; devices do
    /// exceed 1024, so the default leaves room for every declarable length.
    pub max_frame: usize,
    /// Longest junk item emitted at once for junk that is cut eagerly
    /// (`no_header`, `bad_length`, `padding`, `oversize`). A `truncated` item is one
    /// failed frame attempt and is kept whole, so it is bounded by `max_frame`.
    pub max_junk_item: usize,
}

impl Default for FramerConfig {
    fn default() -> Self {
        FramerConfig {
            max_frame: 10_240,
            max_junk_item: 4096,
        }
    }
}

/// One item at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A frame candidate: `##` through its terminator. Not yet validated.
    Frame {
        /// Bytes it takes from the front of the buffer.
        len: usize,
        /// How its end was found.
        info: FrameInfo,
    },
    /// Bytes that are not a frame.
    Junk {
        /// Bytes it takes from the front of the buffer.
        len: usize,
        /// Why they are junk.
        reason: JunkReason,
    },
}

impl Cut {
    /// Number of bytes this item consumes.
    pub fn len(&self) -> usize {
        match *self {
            Cut::Frame { len, .. } | Cut::Junk { len, .. } => len,
        }
    }

    /// Always false: [`cut`] never returns an empty item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a frame's end was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// What followed the 4 CRC characters.
    pub terminator: Terminator,
    /// True when the declared length landed on CRC + terminator; false when the
    /// end was found by scanning (miscounted or malformed length field).
    pub by_length: bool,
}

/// The bytes after the CRC that ended the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Terminator {
    /// CR LF, as the standard requires.
    CrLf,
    /// LF alone.
    Lf,
    /// CR alone.
    Cr,
    /// Nothing: the next frame, other bytes or the end of the stream followed.
    None,
}

impl Terminator {
    /// Stable short name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Terminator::CrLf => "crlf",
            Terminator::Lf => "lf",
            Terminator::Cr => "cr",
            Terminator::None => "none",
        }
    }
}

/// Why bytes were cut as junk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JunkReason {
    /// Bytes before any `##`.
    NoHeader,
    /// `##` not followed by a digit.
    BadLength,
    /// A frame start whose tail never came before the next frame start, or at EOF.
    Truncated,
    /// No tail within `max_frame` bytes of a frame start.
    Oversize,
    /// CR, LF, NUL or space between frames.
    Padding,
}

impl JunkReason {
    /// Every reason, in a fixed order (the order junk records list them in).
    pub const ALL: [JunkReason; 5] = [
        JunkReason::NoHeader,
        JunkReason::BadLength,
        JunkReason::Truncated,
        JunkReason::Oversize,
        JunkReason::Padding,
    ];

    /// Position of this reason in [`JunkReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Stable low-cardinality name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            JunkReason::NoHeader => "no_header",
            JunkReason::BadLength => "bad_length",
            JunkReason::Truncated => "truncated",
            JunkReason::Oversize => "oversize",
            JunkReason::Padding => "padding",
        }
    }
}

/// Examine the front of `buf`; return the next item and how many bytes it
/// consumes, or `None` if more bytes are needed. With `eof` true, never returns
/// `None` for a non-empty buffer.
///
/// An item is only returned once no later byte could change it, which is what
/// makes frame boundaries independent of read sizes.
pub fn cut(buf: &[u8], eof: bool, cfg: &FramerConfig) -> Option<Cut> {
    let lim = Limits::new(cfg);
    let first = *buf.first()?;
    if is_padding(first) {
        let run = buf
            .iter()
            .take(lim.junk)
            .take_while(|&&b| is_padding(b))
            .count();
        return Some(junk(run, JunkReason::Padding));
    }
    if first != b'#' {
        return Some(junk(junk_len(buf, 1, eof, lim.junk), JunkReason::NoHeader));
    }
    match buf.get(1) {
        // A lone trailing '#' may be the first half of "##": wait for it.
        None if !eof => None,
        None => Some(junk(1, JunkReason::NoHeader)),
        Some(&b'#') => frame_at(buf, eof, &lim),
        Some(_) => Some(junk(junk_len(buf, 1, eof, lim.junk), JunkReason::NoHeader)),
    }
}

/// The config with the degenerate values a caller could set made safe: every
/// junk item must take at least one byte, and a frame needs room for `##`.
struct Limits {
    frame: usize,
    junk: usize,
}

impl Limits {
    fn new(cfg: &FramerConfig) -> Self {
        Limits {
            frame: cfg.max_frame.max(3),
            junk: cfg.max_junk_item.max(1),
        }
    }
}

fn junk(len: usize, reason: JunkReason) -> Cut {
    Cut::Junk { len, reason }
}

fn frame(len: usize, terminator: Terminator, by_length: bool) -> Cut {
    Cut::Frame {
        len,
        info: FrameInfo {
            terminator,
            by_length,
        },
    }
}

/// Runs of these between frames are DTU/modem padding, not data.
fn is_padding(b: u8) -> bool {
    matches!(b, b'\r' | b'\n' | 0 | b' ')
}

/// Length of eagerly emitted junk: everything before the next `##` at or after
/// `from`, capped at `cap`. A trailing lone `#` is kept back (unless at EOF)
/// because it may be the first half of the next header.
fn junk_len(buf: &[u8], from: usize, eof: bool, cap: usize) -> usize {
    // Looking one byte past `cap` finds a "##" that starts at cap - 1.
    let window = buf.len().min(cap + 1);
    if let Some(p) = buf.get(from..window).and_then(|w| memmem::find(w, b"##")) {
        return from + p;
    }
    if buf.len() > cap {
        return cap;
    }
    if !eof && buf.len() > from && buf[buf.len() - 1] == b'#' {
        return buf.len() - 1;
    }
    buf.len()
}

/// A frame start `"##" | LLLL | …` at the front of `buf`.
///
/// `LLLL` is normally 4 digits; devices also send 1..3 (`##81QN=`, `##453QN=`,
/// `##9ST=`). Either way the digits are the declared length and the data
/// segment starts right after them. The end is decided in this order, which is
/// what keeps the result independent of chunking:
/// 1. an early tail (see [`early_tail`]),
/// 2. the declared length landing on a valid tail ([`tail_by_length`]),
/// 3. a scan for the first tail or next frame start ([`scan_tail`]).
fn frame_at(buf: &[u8], eof: bool, lim: &Limits) -> Option<Cut> {
    let need_more = || {
        if eof {
            Some(junk(buf.len(), JunkReason::Truncated))
        } else {
            None
        }
    };
    let Some(&c) = buf.get(2) else {
        return need_more();
    };
    if !c.is_ascii_digit() {
        return Some(junk(junk_len(buf, 1, eof, lim.junk), JunkReason::BadLength));
    }
    let mut digits = 1;
    while digits < 4 {
        match buf.get(2 + digits) {
            Some(d) if d.is_ascii_digit() => digits += 1,
            Some(_) => break,
            None => return need_more(),
        }
    }
    let start = 2 + digits;
    let declared = buf[2..start]
        .iter()
        .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
    let crc_at = start + declared;

    match early_tail(buf, start, crc_at, eof, lim) {
        Decision::Found(cut) => return Some(cut),
        Decision::NeedMore => return None,
        Decision::Absent => {}
    }
    match tail_by_length(buf, start, crc_at, eof, lim) {
        Decision::Found(cut) => return Some(cut),
        Decision::NeedMore => return None,
        Decision::Absent => {}
    }
    scan_tail(buf, start, eof, lim)
}

/// Outcome of one rule for a frame start.
enum Decision {
    Found(Cut),
    /// The answer depends on bytes not yet received.
    NeedMore,
    /// The rule does not apply; try the next one.
    Absent,
}

/// Rule 1, the early tail: the first `&&` CCCC (CR) LF whose segment ends before
/// the declared one, with no other frame start (`##` digit) before it, and
/// either whose CRC matches (HJ 212, MODBUS or swapped MODBUS) or which is
/// directly followed by the next frame start.
///
/// Why: a device whose length field is miscounted upwards sends one frame and
/// waits for its ack; waiting for bytes up to its declared end would stall it.
/// Why always, even when the declared end is already buffered: otherwise the
/// item would depend on how much had arrived. This keeps away from SM4
/// ciphertext: a false tail there needs `&&`, 4 hex digits, LF and then a
/// matching CRC or `##` and a digit at one spot (below 2^-50 per byte; an
/// accepted risk). Stopping at the next
/// frame start keeps a truncated frame from borrowing the next frame's tail,
/// which the 256-valued HJ 212 CRC would match 1 time in 256.
fn early_tail(buf: &[u8], start: usize, crc_at: usize, eof: bool, lim: &Limits) -> Decision {
    // A qualifying LF sits at most at crc_at + 4 and must end a frame within the cap.
    let horizon = (crc_at + 5).min(lim.frame);
    let visible = buf.len().min(horizon);
    let mut next_start: Option<Option<usize>> = None;
    let mut candidates = 0;
    if visible > start {
        for lf in memchr_iter(b'\n', &buf[start..visible]).map(|i| start + i) {
            let (seg_end, terminator) = if lf >= 1 && buf[lf - 1] == b'\r' {
                (lf.wrapping_sub(5), Terminator::CrLf)
            } else {
                (lf.wrapping_sub(4), Terminator::Lf)
            };
            if lf < start + 6 || seg_end < start + 2 || seg_end >= crc_at {
                continue;
            }
            if &buf[seg_end - 2..seg_end] != b"&&" {
                continue;
            }
            let Some(declared) = crc::parse_hex4(&buf[seg_end..seg_end + 4]) else {
                continue;
            };
            if candidates == EARLY_TAIL_CANDIDATES {
                return Decision::Absent;
            }
            candidates += 1;
            let ns = *next_start.get_or_insert_with(|| next_frame_start(buf, start));
            if ns.is_some_and(|h| h < seg_end - 2) {
                // Every later candidate lies behind that frame start too.
                return Decision::Absent;
            }
            let segment = &buf[start..seg_end];
            if crc::identify(segment, declared).1 != crc::CrcVariant::Unknown {
                return Decision::Found(frame(lf + 1, terminator, false));
            }
            // A line-ended tail followed at once by the next frame start is a
            // frame cut short in transit (`xy-real-092`); the good frame after it
            // must not wait for the first one's declared end.
            match (buf.get(lf + 1), buf.get(lf + 2), buf.get(lf + 3)) {
                (Some(b'#'), Some(b'#'), Some(d)) if d.is_ascii_digit() => {
                    return Decision::Found(frame(lf + 1, terminator, false));
                }
                (None, _, _) | (Some(b'#'), None, _) | (Some(b'#'), Some(b'#'), None) if !eof => {
                    return Decision::NeedMore;
                }
                _ => {}
            }
        }
    }
    if eof || buf.len() >= horizon {
        return Decision::Absent;
    }
    // Not all candidates have arrived; a frame start already seen rules them out.
    let ns = next_start.unwrap_or_else(|| next_frame_start(buf, start));
    if ns.is_some() {
        Decision::Absent
    } else {
        Decision::NeedMore
    }
}

/// Only this many `&&` CCCC (CR) LF shapes after a header are tried as early
/// tails. Real frames have one at most (their own); without a bound a crafted
/// run of them would cost a CRC over the segment each, on every read.
const EARLY_TAIL_CANDIDATES: usize = 4;

/// Position of the first complete `##` digit at or after `from`.
fn next_frame_start(buf: &[u8], from: usize) -> Option<usize> {
    let hay = buf.get(from..)?;
    memmem::find_iter(hay, b"##")
        .map(|i| from + i)
        .find(|&h| buf.get(h + 2).is_some_and(u8::is_ascii_digit))
}

/// Rule 2: the declared length lands on the tail. At `crc_at` there must be 4 hex
/// digits (either case), then CR LF, LF or CR; or, when the segment ends in
/// `&&`, anything else (`##` of a glued frame, trailing spaces, the end of the
/// stream) and the frame has no terminator.
///
/// When this holds the frame is trusted as is and never scanned inside: raw
/// SM4 ciphertext in CP (HJ 212-2025) may contain `##`, `&&` and CR LF.
fn tail_by_length(buf: &[u8], start: usize, crc_at: usize, eof: bool, lim: &Limits) -> Decision {
    if crc_at + 4 > lim.frame {
        return Decision::Absent;
    }
    let got = buf.len().min(crc_at + 4);
    if got > crc_at && !buf[crc_at..got].iter().all(u8::is_ascii_hexdigit) {
        return Decision::Absent;
    }
    if got < crc_at + 4 {
        return if eof {
            Decision::Absent
        } else {
            Decision::NeedMore
        };
    }
    let closed = crc_at >= start + 2 && &buf[crc_at - 2..crc_at] == b"&&";
    match terminator_at(buf, crc_at + 4, eof, lim.frame) {
        Term::Ends(len, t) => Decision::Found(frame(len, t, true)),
        Term::NeedMore => Decision::NeedMore,
        Term::Other if closed => Decision::Found(frame(crc_at + 4, Terminator::None, true)),
        Term::Other if unclosed_tail_holds(buf, start, crc_at) => {
            Decision::Found(frame(crc_at + 4, Terminator::None, true))
        }
        Term::Other | Term::TooLong => Decision::Absent,
    }
}

/// Whether a segment that does not end in `&&` (a sender that appends fields
/// after CP, `…&&;Flag=0` then `3740`) and is followed by neither CR nor LF is
/// still a frame: its CRC must match (HJ 212 or a MODBUS variant) and no frame
/// start (`##` digit) may lie inside it.
///
/// Why both: without the `&&` and the terminator only the CRC vouches for
/// the declared end, and the HJ 212 CRC takes 256 values, so a truncated frame
/// whose declared length reaches into the next one would swallow that good
/// frame about once in a thousand; a `##` digit inside rules that out. Raw
/// SM4 ciphertext (which may hold `##`) always ends in `&&`, so it never
/// needs this path.
fn unclosed_tail_holds(buf: &[u8], start: usize, crc_at: usize) -> bool {
    let Some(declared) = crc::parse_hex4(&buf[crc_at..crc_at + 4]) else {
        return false;
    };
    next_frame_start(&buf[..crc_at], start).is_none()
        && crc::identify(&buf[start..crc_at], declared).1 != crc::CrcVariant::Unknown
}

/// What follows a CRC that ends at `at`.
enum Term {
    /// CR LF, LF or CR; the frame is `len` bytes.
    Ends(usize, Terminator),
    /// The next byte decides.
    NeedMore,
    /// A CR/LF terminator that would carry the frame past the cap.
    TooLong,
    /// Something else, or the end of the stream.
    Other,
}

fn terminator_at(buf: &[u8], at: usize, eof: bool, max: usize) -> Term {
    let within = |len: usize, t: Terminator| {
        if len <= max {
            Term::Ends(len, t)
        } else {
            Term::TooLong
        }
    };
    match buf.get(at) {
        None if eof => Term::Other,
        None => Term::NeedMore,
        Some(b'\n') => within(at + 1, Terminator::Lf),
        Some(b'\r') => match buf.get(at + 1) {
            Some(b'\n') => within(at + 2, Terminator::CrLf),
            None if !eof => Term::NeedMore,
            _ => within(at + 1, Terminator::Cr),
        },
        Some(_) => Term::Other,
    }
}

/// Rule 3, the length did not land: scan from the data segment for the first
/// `&&` CCCC followed by CR LF, LF, CR, `##` or the end of the stream, or CCCC
/// CR LF; but stop
/// at the next frame start (`##` digit): the bytes before it are a truncated
/// frame, and the next frame gets its own chance. Nothing within `max_frame`
/// gives `oversize` junk up to the next `##`, and the scan resumes there.
fn scan_tail(buf: &[u8], start: usize, eof: bool, lim: &Limits) -> Option<Cut> {
    let window = buf.len().min(lim.frame);
    let hay = buf.get(start..window).unwrap_or_default();
    for p in memchr3_iter(b'#', b'&', b'\n', hay).map(|i| start + i) {
        if buf[p] == b'\n' {
            // CCCC CR LF without "&&": vendor extensions between the data and
            // the CRC (`…&&#G1010…&3180`). Plain-text segments hold no CR LF, so a
            // hex-ended line is the digest's recommended fallback (§7.1).
            if p >= start + 5
                && buf[p - 1] == b'\r'
                && buf[p - 5..p - 1].iter().all(u8::is_ascii_hexdigit)
            {
                return Some(frame(p + 1, Terminator::CrLf, false));
            }
            continue;
        }
        if buf[p] == b'#' {
            match (buf.get(p + 1), buf.get(p + 2)) {
                (Some(b'#'), Some(d)) if d.is_ascii_digit() => {
                    return Some(junk(p, JunkReason::Truncated));
                }
                (None, _) | (Some(b'#'), None) if !eof => return None,
                _ => continue,
            }
        }
        match tail_at(buf, p, eof, lim.frame) {
            Decision::Found(cut) => return Some(cut),
            Decision::NeedMore => return None,
            Decision::Absent => {}
        }
    }
    if buf.len() > lim.frame {
        // Resume at the next "##" so a header inside the rejected run is not lost.
        let cap = lim.junk.min(lim.frame).max(2);
        return Some(junk(junk_len(buf, 2, true, cap), JunkReason::Oversize));
    }
    if eof {
        Some(junk(buf.len(), JunkReason::Truncated))
    } else {
        None
    }
}

/// A scanned tail `&&` CCCC terminator starting at `amp`.
fn tail_at(buf: &[u8], amp: usize, eof: bool, max: usize) -> Decision {
    let need = |ok: bool| {
        if ok && !eof {
            Decision::NeedMore
        } else {
            Decision::Absent
        }
    };
    let got = buf.len().min(amp + 6);
    let shape_ok = buf[amp..got].iter().enumerate().all(|(i, b)| match i {
        0 | 1 => *b == b'&',
        _ => b.is_ascii_hexdigit(),
    });
    if !shape_ok {
        return Decision::Absent;
    }
    if got < amp + 6 {
        return need(true);
    }
    let end = amp + 6;
    match terminator_at(buf, end, eof, max) {
        Term::Ends(len, t) => Decision::Found(frame(len, t, false)),
        Term::NeedMore => Decision::NeedMore,
        Term::TooLong => Decision::Absent,
        // The end of the stream right after the CRC closes the frame.
        Term::Other if buf.len() == end && end <= max => {
            Decision::Found(frame(end, Terminator::None, false))
        }
        Term::Other if buf.len() == end => Decision::Absent,
        Term::Other => match (buf[end], buf.get(end + 1)) {
            (b'#', Some(b'#')) if end <= max => {
                Decision::Found(frame(end, Terminator::None, false))
            }
            (b'#', None) => need(true),
            _ => Decision::Absent,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One item with its offset in the stream, in a form comparable across
    /// chunkings: eagerly cut junk (`no_header`, `bad_length`, `padding`) is
    /// merged into one run, because where a read ended may split it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Norm {
        Frame(usize, usize, FrameInfo),
        Junk(usize, usize, Option<JunkReason>),
    }

    /// Feeds `stream` in pieces of the given sizes (the rest in one piece),
    /// drains after each, then at EOF. Asserts byte conservation.
    fn feed(stream: &[u8], sizes: &[usize], cfg: &FramerConfig) -> Vec<(usize, Cut)> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut offset = 0;
        let mut fed = 0;
        let mut drain = |buf: &mut Vec<u8>, eof: bool, out: &mut Vec<(usize, Cut)>| {
            while !buf.is_empty() {
                let Some(item) = cut(buf, eof, cfg) else {
                    assert!(!eof, "None at eof with {} bytes", buf.len());
                    break;
                };
                assert!(!item.is_empty() && item.len() <= buf.len(), "{item:?}");
                out.push((offset, item));
                offset += item.len();
                buf.drain(..item.len());
            }
        };
        for &n in sizes {
            let n = n.min(stream.len() - fed);
            buf.extend_from_slice(&stream[fed..fed + n]);
            fed += n;
            drain(&mut buf, false, &mut out);
        }
        buf.extend_from_slice(&stream[fed..]);
        drain(&mut buf, false, &mut out);
        drain(&mut buf, true, &mut out);
        assert_eq!(offset, stream.len(), "every byte in exactly one item");
        out
    }

    fn norm(items: &[(usize, Cut)]) -> Vec<Norm> {
        let mut out: Vec<Norm> = Vec::new();
        for &(at, item) in items {
            match item {
                Cut::Frame { len, info } => out.push(Norm::Frame(at, len, info)),
                Cut::Junk { len, reason } => {
                    let eager = matches!(
                        reason,
                        JunkReason::NoHeader | JunkReason::BadLength | JunkReason::Padding
                    );
                    if eager {
                        if let Some(Norm::Junk(_, l, None)) = out.last_mut() {
                            *l += len;
                            continue;
                        }
                        out.push(Norm::Junk(at, len, None));
                    } else {
                        out.push(Norm::Junk(at, len, Some(reason)));
                    }
                }
            }
        }
        out
    }

    fn whole(stream: &[u8]) -> Vec<Cut> {
        feed(stream, &[], &FramerConfig::default())
            .into_iter()
            .map(|(_, c)| c)
            .collect()
    }

    fn f(len: usize, terminator: Terminator, by_length: bool) -> Cut {
        frame(len, terminator, by_length)
    }

    struct Fixture {
        id: String,
        frame: Vec<u8>,
        valid: bool,
    }

    fn fixtures() -> Vec<Fixture> {
        let path = crate::FIXTURE_FRAMES;
        let text = std::fs::read_to_string(path).expect("fixtures/frames.jsonl");
        text.lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).expect("json line");
                Fixture {
                    id: v["id"].as_str().expect("id").to_owned(),
                    frame: v["frame"].as_str().expect("frame").as_bytes().to_vec(),
                    valid: v["valid"].as_bool().expect("valid"),
                }
            })
            .collect()
    }

    fn fixture(id: &str) -> Vec<u8> {
        fixtures()
            .into_iter()
            .find(|f| f.id == id)
            .unwrap_or_else(|| panic!("no fixture {id}"))
            .frame
    }

    #[test]
    fn corpus_is_complete() {
        let all = fixtures();
        assert_eq!(all.len(), 252);
        assert!(all.iter().filter(|f| f.valid).count() > 50);
    }

    /// Every fixture, whole versus split at every point and byte by byte.
    #[test]
    fn every_fixture_same_items_at_every_split() {
        let cfg = FramerConfig::default();
        for fx in fixtures() {
            let want = norm(&feed(&fx.frame, &[], &cfg));
            for k in 1..fx.frame.len() {
                assert_eq!(
                    norm(&feed(&fx.frame, &[k], &cfg)),
                    want,
                    "{} split at {k}",
                    fx.id
                );
            }
            let ones = vec![1; fx.frame.len()];
            assert_eq!(
                norm(&feed(&fx.frame, &ones, &cfg)),
                want,
                "{} byte by byte",
                fx.id
            );
        }
    }

    #[test]
    fn every_valid_fixture_is_one_frame_by_length() {
        for fx in fixtures().into_iter().filter(|f| f.valid) {
            assert_eq!(
                whole(&fx.frame),
                [f(fx.frame.len(), Terminator::CrLf, true)],
                "{}",
                fx.id
            );
        }
    }

    /// D1: the first 5 bytes give nothing, the rest gives exactly the frame.
    #[test]
    fn d1_frame_in_two_pushes() {
        let cfg = FramerConfig::default();
        for fx in fixtures().into_iter().filter(|f| f.valid) {
            assert_eq!(cut(&fx.frame[..5], false, &cfg), None, "{}", fx.id);
            let want = Some(f(fx.frame.len(), Terminator::CrLf, true));
            assert_eq!(cut(&fx.frame, false, &cfg), want, "{}", fx.id);
            assert_eq!(
                cut(&fx.frame[..fx.frame.len() - 1], false, &cfg),
                None,
                "{}",
                fx.id
            );
        }
    }

    /// D2: four frames glued with no separator and one final CR LF.
    #[test]
    fn d2_glued_without_separator() {
        let items = whole(&fixture("fs-039"));
        let none = f(823, Terminator::None, true);
        assert_eq!(items, [none, none, none, f(825, Terminator::CrLf, true)]);
    }

    /// A frame from the crate's builder, with `extra` appended to its data
    /// segment after the CP (`;Flag=0`, as one serializer does), the length
    /// and CRC recomputed over the longer segment, and no terminator.
    fn built_unclosed(mn: &str, extra: &[u8]) -> Vec<u8> {
        let head = crate::build::Head {
            qn: Some(b"20201222115733219"),
            st: "32",
            cn: 2011,
            pw: "123456",
            mn,
            flag: Some(5),
            split: None,
        };
        let mut std = Vec::new();
        crate::build::device_frame(&mut std, &head, None, |o| {
            o.extend_from_slice(b"DataTime=20201222115700;w01018-Rtd=12.5,w01018-Flag=N")
        });
        let seg = [&std[6..std.len() - 6], extra].concat();
        let mut out = b"##".to_vec();
        crate::build::put_padded(&mut out, seg.len() as u64, 4);
        out.extend_from_slice(&seg);
        out.extend_from_slice(&crc::format_hex4(crc::hj212(&seg)));
        out
    }

    /// Every way of chunking `stream`: each single split point, and one byte
    /// per read.
    fn every_split(stream: &[u8]) -> Vec<Vec<Norm>> {
        let cfg = FramerConfig::default();
        let mut all: Vec<_> = (0..=stream.len())
            .map(|i| norm(&feed(stream, &[i], &cfg)))
            .collect();
        all.push(norm(&feed(stream, &vec![1; stream.len()], &cfg)));
        all
    }

    /// Frames without CR LF glued to the next one, whose declared length and
    /// CRC both hold, are frames (no terminator) however the stream is chunked,
    /// also when the segment does not end in `&&` (issue 22, `issue-002`).
    #[test]
    fn glued_without_crlf_length_and_crc_hold() {
        let unclosed = built_unclosed("ABCDEFG", b";Flag=0");
        let closed = built_unclosed("ABCDEFG", b"");
        assert!(closed[..closed.len() - 4].ends_with(b"&&"));
        let mut good = Vec::new();
        crate::build::device_frame(
            &mut good,
            &crate::build::Head {
                qn: Some(b"20201222115800000"),
                st: "32",
                cn: 2011,
                pw: "123456",
                mn: "ABCDEFG",
                flag: Some(5),
                split: None,
            },
            None,
            |o| o.extend_from_slice(b"DataTime=20201222115800;w01018-Rtd=13.0,w01018-Flag=N"),
        );
        let stream = [unclosed.as_slice(), &closed, &unclosed, &good].concat();
        let (a, b) = (unclosed.len(), closed.len());
        let none = FrameInfo {
            terminator: Terminator::None,
            by_length: true,
        };
        let want = vec![
            Norm::Frame(0, a, none),
            Norm::Frame(a, b, none),
            Norm::Frame(a + b, a, none),
            Norm::Frame(
                2 * a + b,
                good.len(),
                FrameInfo {
                    terminator: Terminator::CrLf,
                    by_length: true,
                },
            ),
        ];
        for got in every_split(&stream) {
            assert_eq!(got, want);
        }
        // Last in the stream, closed by the end of it.
        assert_eq!(whole(&unclosed), [f(a, Terminator::None, true)]);
        // The real example: a serializer that put Flag after CP.
        let issue = fixture("issue-002");
        assert_eq!(whole(&issue), [f(issue.len(), Terminator::None, true)]);
    }

    /// A near miss (the CRC does not hold, or the segment would contain the
    /// next frame's start) stays junk, and the good frame after it is found
    /// at every split.
    #[test]
    fn glued_without_crlf_near_miss_is_junk() {
        let good = fixture("std-001");
        let mut wrong = built_unclosed("ABCDEFG", b";Flag=0");
        let n = wrong.len();
        wrong[n - 1] = if wrong[n - 1] == b'0' { b'1' } else { b'0' };
        let stream = [wrong.as_slice(), &good].concat();
        let want = vec![
            Norm::Junk(0, n, Some(JunkReason::Truncated)),
            Norm::Frame(
                n,
                good.len(),
                FrameInfo {
                    terminator: Terminator::CrLf,
                    by_length: true,
                },
            ),
        ];
        for got in every_split(&stream) {
            assert_eq!(got, want);
        }
        assert_eq!(
            whole(&wrong),
            [Cut::Junk {
                len: n,
                reason: JunkReason::Truncated
            }]
        );
    }

    /// D3: three CR LF frames in one read.
    #[test]
    fn d3_three_frames_one_read() {
        assert_eq!(
            whole(&fixture("fs-040")),
            [f(905, Terminator::CrLf, true); 3]
        );
    }

    /// D4: DTU junk (`##test…`), a line starting mid-frame, and stray bytes
    /// spliced after a frame; a good frame after each survives byte-exact.
    #[test]
    fn d4_resync_after_junk() {
        let good = fixture("std-001");
        for id in ["xy-real-093", "xy-real-094", "xy-real-095"] {
            let junk = fixture(id);
            assert_eq!(
                whole(&junk),
                [Cut::Junk {
                    len: junk.len(),
                    reason: JunkReason::BadLength
                }]
            );
            let stream = [junk.as_slice(), &good].concat();
            assert_eq!(
                whole(&stream),
                [
                    Cut::Junk {
                        len: junk.len(),
                        reason: JunkReason::BadLength
                    },
                    f(good.len(), Terminator::CrLf, true)
                ],
                "{id}"
            );
        }
        let mid = fixture("xy-real-091");
        assert_eq!(
            whole(&mid),
            [Cut::Junk {
                len: 32,
                reason: JunkReason::NoHeader
            }]
        );

        // xy-real-090: "…&&47C0\r\n2BC0\r\n" is one frame then 6 junk bytes.
        let spliced = fixture("xy-real-090");
        assert_eq!(
            whole(&spliced),
            [
                f(676, Terminator::CrLf, true),
                Cut::Junk {
                    len: 6,
                    reason: JunkReason::NoHeader
                }
            ]
        );
        assert_eq!(&spliced[676..], b"2BC0\r\n");
        assert!(spliced[..676].ends_with(b"&&47C0\r\n"));
    }

    /// D5: a radiation-monitor record that also starts with "##0" is refused
    /// cleanly, each record on its own.
    #[test]
    fn d5_foreign_protocol() {
        let t = Cut::Junk {
            len: 52,
            reason: JunkReason::Truncated,
        };
        assert_eq!(whole(&fixture("fs-036")), [t, t]);
    }

    /// xy-real-092 is a frame whose head was lost: "##0293" declares far more
    /// than follows. The good frame after it must come out at once, not after
    /// 293 bytes have arrived.
    #[test]
    fn truncated_frame_does_not_swallow_or_stall_the_next() {
        let cfg = FramerConfig::default();
        let cut_short = fixture("xy-real-092");
        let good = fixture("xy-001");
        let stream = [cut_short.as_slice(), &good].concat();
        assert_eq!(
            cut(&stream, false, &cfg),
            Some(f(27, Terminator::CrLf, false))
        );
        assert_eq!(
            cut(&stream[27..], false, &cfg),
            Some(f(good.len(), Terminator::CrLf, true))
        );

        // Cut inside the data segment, no tail at all: the bytes up to the next
        // frame start are truncated junk. Without EOF this waits for the declared
        // end, because a length that lands on a tail is trusted (ciphertext).
        let stream = [&cut_short[..19], good.as_slice()].concat();
        assert_eq!(cut(&stream, false, &cfg), None);
        assert_eq!(
            whole(&stream),
            [
                Cut::Junk {
                    len: 19,
                    reason: JunkReason::Truncated
                },
                f(good.len(), Terminator::CrLf, true)
            ]
        );
        // Once the declared end has arrived and is no tail, resync at once.
        let pad = vec![b'x'; 400];
        let stream = [&cut_short[..19], good.as_slice(), &good, &pad].concat();
        assert_eq!(
            cut(&stream, false, &cfg),
            Some(Cut::Junk {
                len: 19,
                reason: JunkReason::Truncated
            })
        );
    }

    #[test]
    fn header_corrupt_found_by_tail_scan() {
        assert_eq!(
            whole(&fixture("xy-real-089")),
            [f(228, Terminator::CrLf, false)]
        );
        assert_eq!(
            whole(&fixture("xy-real-096")),
            [f(424, Terminator::CrLf, false)]
        );
    }

    #[test]
    fn short_length_fields() {
        let cfg = FramerConfig::default();
        // "##81": two digits, and 81 is right.
        for id in ["scair-004", "scair-005"] {
            assert_eq!(
                whole(&fixture(id)),
                [
                    f(89, Terminator::None, true),
                    Cut::Junk {
                        len: 2,
                        reason: JunkReason::Padding
                    }
                ],
                "{id}"
            );
        }
        // "##453", no terminator: at EOF a frame; before EOF the next byte may be CR.
        let fs013 = fixture("fs-013");
        assert_eq!(whole(&fs013), [f(462, Terminator::None, true)]);
        assert_eq!(cut(&fs013, false, &cfg), None);
        let mut next = fs013.clone();
        next.extend_from_slice(b"##");
        assert_eq!(
            cut(&next, false, &cfg),
            Some(f(462, Terminator::None, true))
        );
        // "##9ST=": one digit, wrong; found by the tail scan.
        assert_eq!(
            whole(&fixture("xy-real-089")),
            [f(228, Terminator::CrLf, false)]
        );
    }

    #[test]
    fn terminators() {
        assert_eq!(whole(&fixture("xy-004")), [f(150, Terminator::Lf, true)]);
        assert_eq!(whole(&fixture("fs-025")), [f(98, Terminator::Lf, true)]);
        assert_eq!(whole(&fixture("xy-007")), [f(168, Terminator::Lf, false)]);
        assert_eq!(whole(&fixture("zbl-002")), [f(97, Terminator::None, true)]);
        // CR alone, then a glued frame.
        let std = fixture("std-001");
        let cr_only = [&std[..std.len() - 1], std.as_slice()].concat();
        assert_eq!(
            whole(&cr_only),
            [
                f(std.len() - 1, Terminator::Cr, true),
                f(std.len(), Terminator::CrLf, true)
            ]
        );
        let cfg = FramerConfig::default();
        assert_eq!(
            cut(&std[..std.len() - 1], false, &cfg),
            None,
            "CR may be followed by LF"
        );
    }

    #[test]
    fn trailing_bytes_after_crc() {
        // The CR LF was written as the 4 characters \ r \ n.
        assert_eq!(
            whole(&fixture("jinuxx-004")),
            [
                f(463, Terminator::None, true),
                Cut::Junk {
                    len: 4,
                    reason: JunkReason::NoHeader
                }
            ]
        );
        assert_eq!(
            whole(&fixture("scair-002")),
            [
                f(131, Terminator::None, true),
                Cut::Junk {
                    len: 2,
                    reason: JunkReason::Padding
                }
            ]
        );
    }

    #[test]
    fn vendor_extension_before_crc_is_one_frame() {
        assert_eq!(
            whole(&fixture("xy-real-083")),
            [f(416, Terminator::CrLf, false)]
        );
        assert_eq!(
            whole(&fixture("xy-real-088")),
            [f(130, Terminator::CrLf, false)]
        );
    }

    /// (`issue-002` used to be here: its length and CRC hold, so it is a frame;
    /// see `glued_without_crlf_length_and_crc_hold`.)
    #[test]
    fn no_tail_is_truncated_at_eof() {
        for (id, len) in [("scair-003", 129), ("fs-037", 186)] {
            assert_eq!(
                whole(&fixture(id)),
                [Cut::Junk {
                    len,
                    reason: JunkReason::Truncated
                }],
                "{id}"
            );
        }
    }

    /// A miscounted length with a CRC that matches is emitted as soon as its
    /// tail is in, without waiting for the declared end.
    #[test]
    fn early_tail_with_matching_crc() {
        let cfg = FramerConfig::default();
        for (id, declared) in [
            ("std-001", "0150"),
            ("hcu-001", "0999"),
            ("tony-004", "0900"),
        ] {
            let mut fx = fixture(id);
            fx[2..6].copy_from_slice(declared.as_bytes());
            assert_eq!(
                cut(&fx, false, &cfg),
                Some(f(fx.len(), Terminator::CrLf, false)),
                "{id}"
            );
        }
        // Same with a CRC that matches nothing: wait for the declared end.
        let mut fx = fixture("xy-003");
        fx[2..6].copy_from_slice(b"0150");
        assert_eq!(cut(&fx, false, &cfg), None);
    }

    /// Past the first few tail shapes no CRC is tried: the cost per read stays
    /// bounded however many a crafted frame holds.
    #[test]
    fn early_tail_candidates_are_bounded() {
        let cfg = FramerConfig::default();
        let crafted = |shapes: usize| {
            let mut seg = b"x&&0000\r\n".repeat(shapes);
            seg.extend_from_slice(b"CP=&&&&");
            let mut fr = b"##0900".to_vec();
            fr.extend_from_slice(&seg);
            fr.extend_from_slice(&crc::format_hex4(crc::hj212(&seg)));
            fr.extend_from_slice(b"\r\n");
            fr
        };
        assert_eq!(crc::identify(b"x&&", 0).1, crc::CrcVariant::Unknown);
        let fewer = crafted(EARLY_TAIL_CANDIDATES - 1);
        assert_eq!(
            cut(&fewer, false, &cfg),
            Some(f(fewer.len(), Terminator::CrLf, false))
        );
        assert_eq!(cut(&crafted(EARLY_TAIL_CANDIDATES), false, &cfg), None);
    }

    /// HJ 212-2025 raw SM4 ciphertext in CP may hold "##0", "&&", CR and LF;
    /// a declared length that lands on a tail is trusted and not scanned.
    #[test]
    fn ciphertext_framed_by_length() {
        let mut seg = b"QN=20260101080000123;ST=31;CN=2011;PW=123456;MN=X;Flag=9;CP=&&".to_vec();
        seg.extend_from_slice(&[0x00, 0xE4, b'#', b'#', b'0', b'1', b'\r', b'\n', 0xFF]);
        seg.extend_from_slice(b"&&ABCD\r\n\x80\r&&7\n\r");
        seg.extend_from_slice(b"&&");
        let mut fr = format!("##{:04}", seg.len()).into_bytes();
        fr.extend_from_slice(&seg);
        fr.extend_from_slice(b"2200\r\n");
        let std = fixture("std-001");
        let stream = [fr.as_slice(), &std].concat();
        let want = [
            f(fr.len(), Terminator::CrLf, true),
            f(std.len(), Terminator::CrLf, true),
        ];
        assert_eq!(whole(&stream), want);
        let cfg = FramerConfig::default();
        let expect = norm(&feed(&stream, &[], &cfg));
        for k in 1..stream.len() {
            assert_eq!(norm(&feed(&stream, &[k], &cfg)), expect, "split at {k}");
        }
    }

    #[test]
    fn junk_is_eager_and_bounded() {
        let cfg = FramerConfig::default();
        let j = |len, reason| Some(Cut::Junk { len, reason });
        assert_eq!(cut(b"AT+CSQ\r\n", false, &cfg), j(8, JunkReason::NoHeader));
        assert_eq!(cut(b"abc#", false, &cfg), j(3, JunkReason::NoHeader));
        assert_eq!(cut(b"#", false, &cfg), None);
        assert_eq!(cut(b"#", true, &cfg), j(1, JunkReason::NoHeader));
        assert_eq!(cut(b"#a##0", false, &cfg), j(2, JunkReason::NoHeader));
        assert_eq!(cut(b"##", false, &cfg), None);
        assert_eq!(cut(b"##", true, &cfg), j(2, JunkReason::Truncated));
        assert_eq!(cut(b"###0101", false, &cfg), j(1, JunkReason::BadLength));
        assert_eq!(
            cut(b"\0\0 \r\n\r\nX", false, &cfg),
            j(7, JunkReason::Padding)
        );
        assert_eq!(
            cut(&[b'x'; 5000], false, &cfg),
            j(4096, JunkReason::NoHeader)
        );
        assert_eq!(cut(&[0u8; 5000], false, &cfg), j(4096, JunkReason::Padding));
        // A header straddling the junk cap is not split.
        let mut s = vec![b'x'; 4095];
        s.extend_from_slice(b"##0101");
        assert_eq!(cut(&s, false, &cfg), j(4095, JunkReason::NoHeader));
    }

    #[test]
    fn padding_between_frames() {
        let std = fixture("std-001");
        let stream = [std.as_slice(), b"\0\0  \r\n", &std].concat();
        assert_eq!(
            whole(&stream),
            [
                f(std.len(), Terminator::CrLf, true),
                Cut::Junk {
                    len: 6,
                    reason: JunkReason::Padding
                },
                f(std.len(), Terminator::CrLf, true)
            ]
        );
    }

    #[test]
    fn oversize_resyncs_at_next_header() {
        let cfg = FramerConfig {
            max_frame: 200,
            max_junk_item: 64,
        };
        let std = fixture("std-001");
        let stream = [b"##0500".as_slice(), &[b'a'; 300], b"##x", &std].concat();
        let items = feed(&stream, &[], &cfg);
        assert_eq!(
            items[0].1,
            Cut::Junk {
                len: 64,
                reason: JunkReason::Oversize
            }
        );
        let last = items.last().expect("items").1;
        assert_eq!(last, f(std.len(), Terminator::CrLf, true));
        assert!(
            items[1..items.len() - 1]
                .iter()
                .all(|(_, c)| matches!(c, Cut::Junk { .. }))
        );
        // The next "##" inside the rejected run bounds the oversize item.
        let stream = [b"##0500".as_slice(), &[b'a'; 10], b"##x", &[b'a'; 300]].concat();
        assert_eq!(
            cut(&stream, false, &cfg),
            Some(Cut::Junk {
                len: 16,
                reason: JunkReason::Oversize
            })
        );
        // Exactly at the cap nothing is decided yet.
        assert_eq!(cut(&stream[..200], false, &cfg), None);
    }

    #[test]
    fn reason_names() {
        let names: Vec<_> = [
            JunkReason::NoHeader,
            JunkReason::BadLength,
            JunkReason::Truncated,
            JunkReason::Oversize,
            JunkReason::Padding,
        ]
        .iter()
        .map(JunkReason::as_str)
        .collect();
        assert_eq!(
            names,
            [
                "no_header",
                "bad_length",
                "truncated",
                "oversize",
                "padding"
            ]
        );
    }
}
