//! The CP data area.
//!
//! Grammar (HJ 212-2017 §6.3.3; HJ/T 212-2005 §6.3.3):
//!
//! ```text
//! CP    = "CP=&&" [ group *( ";" group ) ] "&&"
//! group = pair *( "," pair )        ; "," separates items of one factor
//! pair  = key "=" value             ; key = name | code "-" suffix
//! ```
//!
//! There is no escaping; the only free text is `-Info=//…//` (2017 C.40 note 3),
//! which is scanned to its closing `//` before splitting. `,` and `;` are not
//! used consistently (the standard itself writes `BeginTime=…,EndTime=…`), so
//! both separate pairs. Trailing separators, empty CPs and spaces occur in the
//! field and are tolerated.

use nom::bytes::complete::{tag, take_till, take_until, take_while};
use nom::combinator::{not, verify};
use nom::sequence::{delimited, preceded};
use nom::{IResult, Parser};

use super::finding::{Finding, Severity, code};
use super::span::Span;

/// How a value will be rendered in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Plain decimal that is also valid JSON number syntax: written with the device's digits.
    Number,
    /// A decimal JSON would reject (`+1`, `.5`, `1.`, `007`): normalised.
    LooseNumber,
    /// Text (flags, times, ids, info, anything non-numeric).
    Text,
}

/// One `key=value` of the CP area.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    /// Whole key.
    pub key: Span,
    /// Factor code part (before the first `-`), for factor items.
    pub code: Option<Span>,
    /// Suffix part (after the first `-`), for factor items.
    pub suffix: Option<Span>,
    /// The value's exact text (for `//…//` info: the text between the slashes).
    pub value: Span,
    /// How the value renders.
    pub kind: ValueKind,
}

/// Suffixes whose values are text even when they look numeric (times, ids, flags).
///
/// Dispatched on the length first: the common suffixes (`Rtd`, `Avg`, `Min`,
/// `Max`, `Cou`, `ZsRtd`...) then cost one comparison of the length, and the
/// candidates of a length are compared as fixed-size arrays, not by `memcmp`.
fn text_suffix(s: &[u8]) -> bool {
    match s.len() {
        2 => s == b"SN",
        4 => s == b"Flag" || s == b"Info",
        5 => s == b"EFlag",
        10 => s == b"SampleTime" || s == b"SampleType" || s == b"ResultType",
        12 => s == b"CompleteTime",
        _ => false,
    }
}

/// Classifies numeric syntax: `-?(0|[1-9][0-9]*)(\.[0-9]+)?` is JSON-safe;
/// other decimals (sign, bare point, leading zeros) are loose numbers.
pub fn classify_number(v: &[u8]) -> ValueKind {
    let plus = v.first() == Some(&b'+');
    let body = match v.first() {
        Some(b'-' | b'+') => &v[1..],
        _ => v,
    };
    let (int, frac) = match body.iter().position(|&c| c == b'.') {
        Some(d) => (&body[..d], Some(&body[d + 1..])),
        None => (body, None),
    };
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let frac_len = frac.map_or(0, <[u8]>::len);
    if !digits(int) || !frac.is_none_or(digits) || int.len() + frac_len == 0 {
        return ValueKind::Text;
    }
    let leading_zero = int.len() > 1 && int[0] == b'0';
    if plus || int.is_empty() || frac == Some(&[][..]) || leading_zero {
        ValueKind::LooseNumber
    } else {
        ValueKind::Number
    }
}

/// nom on a complete CP area: the error carries no information because each
/// rule either cannot fail or fails in one way its caller turns into a finding.
/// nom types stay inside this module.
type Res<'a, O> = IResult<&'a [u8], O, ()>;

/// The separators between pairs, with the spaces around them.
///
/// Rule (HJ 212-2017 §6.3.3; digest §4.1):
/// `CP = "CP=&&" [ group *( ";" group ) ] "&&"` and `group = pair *( "," pair )`.
/// "`,` vs `;` is not used consistently … Parse both as pair separators";
/// "trailing `;` before `&&`, a space inside `&& &&`" occur and are tolerated.
fn separators(i: &[u8]) -> Res<'_, &[u8]> {
    take_while(|c| matches!(c, b' ' | b';' | b','))(i)
}

/// A key, up to its `=` (or up to a separator when the `=` is missing).
///
/// Rule (digest §4.1): `key = name | code "-" suffix`, e.g. `DataTime`,
/// `w01018-Rtd`, `SB1-RS`, `i11001-Info`; values cannot contain `;` `,` `=`.
fn key(i: &[u8]) -> Res<'_, &[u8]> {
    take_till(|c| matches!(c, b'=' | b';' | b','))(i)
}

/// Rule (digest §4.1): `pair = key "=" value` ("`=` joins name and value").
fn equals(i: &[u8]) -> Res<'_, &[u8]> {
    tag("=")(i)
}

/// A plain value: up to the next separator.
///
/// Rule (digest §4.1): "There is no escaping mechanism. Values cannot contain
/// `;` `,` `=` or `&&`."
fn value(i: &[u8]) -> Res<'_, &[u8]> {
    take_till(|c| c == b';' || c == b',')(i)
}

/// One more item of a comma list inside a value: `,` then text up to the next
/// separator that holds no `=` and is not blank (`PolId=a21026,a21002`).
///
/// Rule (digest §4.1): `group = pair *( "," pair )`; an item after `,` that
/// is not a `pair` breaks the grammar, but devices send such lists (alarm
/// uploads' `PolId`, `AlarmDesc` text), so it stays in the value it follows
/// (exact bytes, commas included) and the break is reported, not dropped.
fn list_item(i: &[u8]) -> Res<'_, &[u8]> {
    let (rest, item) = preceded(
        tag(","),
        verify(
            take_till(|c| matches!(c, b';' | b',' | b'=')),
            |t: &[u8]| t.iter().any(|&c| c != b' '),
        ),
    )
    .parse(i)?;
    not(tag("=")).parse(rest)?;
    Ok((rest, item))
}

/// The grammar finding for a comma-list item kept in the value before it.
fn list_item_kept(key: &[u8], item: &[u8]) -> Finding {
    Finding::new(
        code::CP_SYNTAX,
        Severity::Warning,
        format!(
            "CP token without '=': {:?}; kept in the value of {:?}",
            String::from_utf8_lossy(item),
            String::from_utf8_lossy(key)
        ),
    )
}

/// Log text: the one free-text value, which may contain `;` and `,`.
///
/// Rule (HJ 212-2017 C.40 note 3; digest §4.1): "The only free text is log
/// info, which must be enclosed in `//…//` … after `=//` scan to the closing
/// `//` before splitting on `;`/`,`."
fn info(i: &[u8]) -> Res<'_, &[u8]> {
    delimited(tag("//"), take_until("//"), tag("//")).parse(i)
}

/// Parses the pairs of `seg[start..end]` (the bytes between `CP=&&` and `&&`).
///
/// The hot path of decoding, so it is not written with the nom rules above but
/// walks the bytes once, doing in that walk what the rules do in turn: the
/// `separators` skip, the `key` scan (finding its first `-` as it goes, eight
/// bytes at a time), `equals`, and the `value` (with its `list_item`s) or
/// `info` rule. Built from the rules ([`parse_grammar`]) the same scan is
/// measurably slower (a second pass over every key for the dash, and nom's
/// per-byte predicates; see `benches/README.md`, issues 19 and 23), so the
/// rules are the specification and this loop the implementation;
/// unit tests hold the two to identical pairs and findings (the fixtures,
/// mutations of them, and random CP texts).
pub fn parse(seg: &[u8], start: usize, end: usize, findings: &mut Vec<Finding>) -> Vec<Pair> {
    let mut pairs = Vec::with_capacity((end - start) / 12 + 1);
    let mut seen = SeenKeys::default();
    let mut pos = start;
    // A key already scanned while looking past a value's `,` for a list item
    // (`list_item`): it was a key after all, and is not scanned twice.
    let mut pending: Option<KeyScan> = None;
    loop {
        let k = match pending.take() {
            Some(k) => k,
            None => {
                while pos < end && matches!(seg[pos], b' ' | b';' | b',') {
                    pos += 1;
                }
                if pos >= end {
                    break;
                }
                let k = scan_key(seg, pos, end);
                if k.stop == end {
                    findings.push(token_without_eq(&seg[k.tok..end]));
                    break;
                }
                if seg[k.stop] != b'=' {
                    findings.push(token_without_eq(&seg[k.tok..k.stop]));
                    pos = k.stop + 1;
                    continue;
                }
                k
            }
        };
        let (tok, eq) = (k.tok, k.stop);
        let key_end = trim_spaces(seg, tok, eq);
        let key = Span::new(tok, key_end);
        let info = seg[eq + 1..end].starts_with(b"//");
        let value = if info {
            // Info text: may contain ';' and ','; ends at the closing "//".
            let body = eq + 3;
            match memchr::memmem::find(&seg[body..end], b"//") {
                Some(i) => {
                    pos = body + i + 2;
                    Span::new(body, body + i)
                }
                None => {
                    findings.push(Finding::new(
                        code::CP_SYNTAX,
                        Severity::Warning,
                        "info text '//' not closed",
                    ));
                    pos = end;
                    Span::new(body, end)
                }
            }
        } else {
            pos = value_end(seg, eq + 1, end);
            // `list_item`, in the same pass as the next key's scan.
            while pos < end && seg[pos] == b',' {
                let mut t = pos + 1;
                while t < end && seg[t] == b' ' {
                    t += 1;
                }
                if t >= end || matches!(seg[t], b';' | b',') {
                    break;
                }
                let next = scan_key(seg, t, end);
                if next.stop < end && seg[next.stop] == b'=' {
                    pending = Some(next);
                    break;
                }
                findings.push(list_item_kept(&seg[key.range()], &seg[pos + 1..next.stop]));
                pos = next.stop;
            }
            Span::new(eq + 1, trim_spaces(seg, eq + 1, pos))
        };
        push_pair(
            seg,
            Scanned {
                tok,
                key,
                key_end,
                dash: k.dash,
                value,
                info,
            },
            &mut seen,
            &mut pairs,
            findings,
        );
    }
    pairs
}

/// A key scanned from `tok` up to `stop` (its `=`, a `;` or `,`, or the end),
/// with its first `-`.
#[derive(Clone, Copy)]
struct KeyScan {
    tok: usize,
    stop: usize,
    dash: Option<usize>,
}

/// The scans read the CP eight bytes at a time as one `u64` (SWAR): a key or
/// value is some 3 to 12 bytes, where a loop per byte paid a compare and a
/// branch per byte and a SIMD search (`memchr3`) its setup per call.
const ONES: u64 = 0x0101_0101_0101_0101;
/// The high bit of every byte.
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The word of the eight bytes at `seg[pos..]`, first byte lowest; `None`
/// when fewer than eight remain.
#[inline(always)]
fn word(seg: &[u8], pos: usize) -> Option<u64> {
    let w: [u8; 8] = seg.get(pos..pos + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(w))
}

/// The bytes of `w` equal to `b`, as their high bits. Only the lowest set bit
/// is exact (a borrow out of a matching byte can set the bit of the byte
/// above it), so callers take the lowest only: of a union of such masks the
/// lowest set bit is still the first byte matching any of them.
#[inline(always)]
fn bytes_equal(w: u64, b: u8) -> u64 {
    let x = w ^ (ONES * u64::from(b));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// `stops` with the bytes from `avail` on marked as well, when fewer than
/// eight bytes of the word are before the end: the end stops a scan too, and
/// the bytes after it are not the CP's.
#[inline(always)]
fn with_end(stops: u64, avail: usize) -> u64 {
    if avail < 8 {
        stops | HIGHS << (8 * avail)
    } else {
        stops
    }
}

/// The `key` rule: from `tok` up to the first `=`, `;` or `,` (or `end`),
/// with the key's first `-` taken in the same pass.
#[inline(always)]
fn scan_key(seg: &[u8], tok: usize, end: usize) -> KeyScan {
    let mut dash = None;
    let mut pos = tok;
    while pos < end {
        let Some(w) = word(seg, pos) else {
            // The last bytes of the segment, one at a time.
            while pos < end && !matches!(seg[pos], b'=' | b';' | b',') {
                if seg[pos] == b'-' && dash.is_none() {
                    dash = Some(pos);
                }
                pos += 1;
            }
            break;
        };
        let stops = with_end(
            bytes_equal(w, b'=') | bytes_equal(w, b';') | bytes_equal(w, b','),
            end - pos,
        );
        let first_stop = (stops.trailing_zeros() / 8) as usize;
        if dash.is_none() {
            let dashes = bytes_equal(w, b'-');
            let first_dash = (dashes.trailing_zeros() / 8) as usize;
            if first_dash < first_stop {
                dash = Some(pos + first_dash);
            }
        }
        if first_stop < 8 {
            pos += first_stop;
            break;
        }
        pos += 8;
    }
    KeyScan {
        tok,
        stop: pos,
        dash,
    }
}

/// The `value` rule: from `pos` up to the first `;` or `,`, or `end`.
#[inline(always)]
fn value_end(seg: &[u8], mut pos: usize, end: usize) -> usize {
    while pos < end {
        let Some(w) = word(seg, pos) else {
            while pos < end && seg[pos] != b';' && seg[pos] != b',' {
                pos += 1;
            }
            break;
        };
        let stops = with_end(bytes_equal(w, b';') | bytes_equal(w, b','), end - pos);
        if stops != 0 {
            return pos + (stops.trailing_zeros() / 8) as usize;
        }
        pos += 8;
    }
    pos
}

/// [`parse`] written with the grammar rules: the same pairs and findings
/// (unit-tested), slower. The executable form of the grammar, for tests and
/// benches.
#[doc(hidden)]
pub fn parse_grammar(
    seg: &[u8],
    start: usize,
    end: usize,
    findings: &mut Vec<Finding>,
) -> Vec<Pair> {
    let mut pairs = Vec::with_capacity((end - start) / 12 + 1);
    let mut seen = SeenKeys::default();
    let at = |rest: &[u8]| end - rest.len();
    let mut input = &seg[start..end];
    // `separators`, `key` and `value` take zero or more bytes: they cannot
    // fail, hence the `else { break }` arms that never run.
    while let Ok((i, _)) = separators(input) {
        if i.is_empty() {
            break;
        }
        let tok = at(i);
        let Ok((after_key, raw_key)) = key(i) else {
            break;
        };
        let Ok((v_in, _)) = equals(after_key) else {
            findings.push(token_without_eq(raw_key));
            match after_key.split_first() {
                Some((_, next)) => input = next,
                None => break,
            }
            continue;
        };
        let eq = tok + raw_key.len();
        let dash = raw_key.iter().position(|&c| c == b'-').map(|k| tok + k);
        let key_end = trim_spaces(seg, tok, eq);
        let key = Span::new(tok, key_end);
        let is_info = v_in.starts_with(b"//");
        let value = if is_info {
            let body = eq + 3;
            match info(v_in) {
                Ok((next, text)) => {
                    input = next;
                    Span::new(body, body + text.len())
                }
                Err(_) => {
                    findings.push(Finding::new(
                        code::CP_SYNTAX,
                        Severity::Warning,
                        "info text '//' not closed",
                    ));
                    input = &[];
                    Span::new(body, end)
                }
            }
        } else {
            let Ok((mut next, _)) = value(v_in) else {
                break;
            };
            while let Ok((rest, item)) = list_item(next) {
                findings.push(list_item_kept(&seg[key.range()], item));
                next = rest;
            }
            input = next;
            Span::new(eq + 1, trim_spaces(seg, eq + 1, at(next)))
        };
        push_pair(
            seg,
            Scanned {
                tok,
                key,
                key_end,
                dash,
                value,
                info: is_info,
            },
            &mut seen,
            &mut pairs,
            findings,
        );
    }
    pairs
}

/// `end` moved back over trailing spaces, not before `start`: keys and values
/// are stored without the padding some loggers put before `=`, `;` or `,`.
#[inline(always)]
fn trim_spaces(seg: &[u8], start: usize, mut end: usize) -> usize {
    while end > start && seg[end - 1] == b' ' {
        end -= 1;
    }
    end
}

/// One key/value token as a scan found it: where the key starts and ends, its
/// first `-`, the value's span and whether it is `//` text.
struct Scanned {
    tok: usize,
    key: Span,
    key_end: usize,
    dash: Option<usize>,
    value: Span,
    info: bool,
}

/// What [`parse`] and [`parse_grammar`] do with each token once scanned: the
/// empty-key and duplicate-key findings, the factor code and suffix split, the
/// number classification. One body for both, so the grammar and the fast path
/// cannot drift apart here; inlined, as it sits in the hottest loop.
#[inline(always)]
fn push_pair<'a>(
    seg: &'a [u8],
    t: Scanned,
    seen: &mut SeenKeys<'a>,
    pairs: &mut Vec<Pair>,
    findings: &mut Vec<Finding>,
) {
    let Scanned {
        tok,
        key,
        key_end,
        dash,
        value,
        info,
    } = t;
    let kb = &seg[key.range()];
    if kb.is_empty() {
        findings.push(Finding::new(
            code::CP_SYNTAX,
            Severity::Warning,
            "empty CP key",
        ));
        return;
    }
    // Hashed as kept, without the spaces before its `=`: `a=1;a =2` repeats `a`.
    if seen.repeat(seg, pairs, kb, key_hash(kb)) {
        findings.push(Finding::new(
            code::CP_DUPLICATE,
            Severity::Warning,
            format!(
                "CP key {:?} repeated; the last value wins",
                String::from_utf8_lossy(kb)
            ),
        ));
    }
    // Split at the FIRST '-': standard suffixes never contain '-', and a
    // key like `a21026-i22004-Info` is factor a21026, item `i22004-Info`.
    let (code_span, suffix) = match dash {
        Some(d) if d > tok && d + 1 < key_end => {
            (Some(Span::new(tok, d)), Some(Span::new(d + 1, key_end)))
        }
        _ => (None, None),
    };
    let kind = match suffix {
        Some(s) if !info && !text_suffix(&seg[s.range()]) => classify_number(&seg[value.range()]),
        _ => ValueKind::Text,
    };
    if kind == ValueKind::LooseNumber {
        findings.push(Finding::new(
            code::VALUE_FORMAT,
            Severity::Info,
            format!(
                "{}={} is not a plain decimal; normalised",
                String::from_utf8_lossy(kb),
                String::from_utf8_lossy(&seg[value.range()])
            ),
        ));
    }
    pairs.push(Pair {
        key,
        code: code_span,
        suffix,
        value,
        kind,
    });
}

/// A hash of a key for [`SeenKeys`]' Bloom filter, in constant time: its
/// length and its first and last eight bytes (all of a key of up to 16, which
/// every standard key is). Two keys that differ only in the middle of a longer
/// one collide, which costs a scan of the keys so far, not a wrong answer.
#[inline(always)]
fn key_hash(kb: &[u8]) -> u64 {
    let n = kb.len();
    let u64_at = |i: usize| u64::from_le_bytes(kb[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u64::from(u32::from_le_bytes(kb[i..i + 4].try_into().expect("4")));
    // Overlapping loads at both ends cover every byte of a key of up to 16.
    let (head, tail) = match n {
        8.. => (u64_at(0), u64_at(n - 8)),
        4..8 => (u32_at(0), u32_at(n - 4)),
        1..4 => (
            u64::from(kb[0]) | u64::from(kb[n / 2]) << 8,
            u64::from(kb[n - 1]),
        ),
        0 => (0, 0),
    };
    (head ^ tail.rotate_left(29) ^ n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The keys a CP area has had so far, to tell a repeated key.
///
/// A 256-bit Bloom filter (two bits per key) keeps the usual CP of a few dozen
/// keys linear: only a probable repeat pays for a scan of the earlier keys.
/// Past [`SeenKeys::SMALL`] keys the filter is mostly ones and every key would
/// pay for that scan, quadratic in a hostile CP of ~1,700 distinct keys (one
/// 10 KiB frame cost milliseconds); from there a hash set of the keys, with
/// std's randomly keyed hasher so that no chosen set of keys collides, takes
/// over.
#[derive(Default)]
struct SeenKeys<'a> {
    bloom: [u64; 4],
    set: Option<std::collections::HashSet<&'a [u8]>>,
}

impl<'a> SeenKeys<'a> {
    /// Keys kept by the Bloom filter alone.
    const SMALL: usize = 64;

    /// Whether `kb` (hashed `h` by [`key_hash`]) is the key of one of
    /// `pairs`, the pairs of `seg` so far; then records it.
    #[inline(always)]
    fn repeat(&mut self, seg: &'a [u8], pairs: &[Pair], kb: &'a [u8], h: u64) -> bool {
        if pairs.len() >= Self::SMALL {
            return self.repeat_in_set(seg, pairs, kb);
        }
        let (b1, b2) = ((h >> 56) as usize, ((h >> 48) & 255) as usize);
        let bloom = &mut self.bloom;
        let probable =
            bloom[b1 >> 6] & (1 << (b1 & 63)) != 0 && bloom[b2 >> 6] & (1 << (b2 & 63)) != 0;
        bloom[b1 >> 6] |= 1 << (b1 & 63);
        bloom[b2 >> 6] |= 1 << (b2 & 63);
        probable && pairs.iter().any(|p| &seg[p.key.range()] == kb)
    }

    /// [`SeenKeys::repeat`] past [`SeenKeys::SMALL`] keys; out of line, as the
    /// usual CP never gets here.
    #[cold]
    #[inline(never)]
    fn repeat_in_set(&mut self, seg: &'a [u8], pairs: &[Pair], kb: &'a [u8]) -> bool {
        let set = self
            .set
            .get_or_insert_with(|| pairs.iter().map(|p| &seg[p.key.range()]).collect());
        !set.insert(kb)
    }
}

fn token_without_eq(tok: &[u8]) -> Finding {
    Finding::new(
        code::CP_SYNTAX,
        Severity::Warning,
        format!("CP token without '=': {:?}", String::from_utf8_lossy(tok)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(seg: &[u8], pairs: &[Pair]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|p| {
                (
                    String::from_utf8_lossy(&seg[p.key.range()]).into_owned(),
                    String::from_utf8_lossy(&seg[p.value.range()]).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn separators_info_and_spaces() {
        let seg = "DataTime=20160801085857;PolId=w01018,i11001-Info=//清洗;管路,x//; LA-Rtd=50.1;;"
            .as_bytes();
        let mut f = Vec::new();
        let p = parse(seg, 0, seg.len(), &mut f);
        let got = kv(seg, &p);
        assert_eq!(got[0], ("DataTime".into(), "20160801085857".into()));
        assert_eq!(got[1], ("PolId".into(), "w01018".into()));
        assert_eq!(got[2], ("i11001-Info".into(), "清洗;管路,x".into()));
        assert_eq!(got[3], ("LA-Rtd".into(), "50.1".into()));
        assert_eq!(p.len(), 4);
        assert!(f.is_empty(), "{f:?}");
        assert_eq!(p[3].kind, ValueKind::Number);
        assert_eq!(p[2].kind, ValueKind::Text);
    }

    #[test]
    fn numbers() {
        assert_eq!(classify_number(b"12.50"), ValueKind::Number);
        assert_eq!(classify_number(b"-130.7116"), ValueKind::Number);
        assert_eq!(classify_number(b"0"), ValueKind::Number);
        assert_eq!(classify_number(b"0.5"), ValueKind::Number);
        assert_eq!(classify_number(b"+1"), ValueKind::LooseNumber);
        assert_eq!(classify_number(b".5"), ValueKind::LooseNumber);
        assert_eq!(classify_number(b"1."), ValueKind::LooseNumber);
        assert_eq!(classify_number(b"007"), ValueKind::LooseNumber);
        assert_eq!(classify_number(b"N"), ValueKind::Text);
        assert_eq!(classify_number(b""), ValueKind::Text);
        assert_eq!(classify_number(b"-"), ValueKind::Text);
        assert_eq!(classify_number(b"1e5"), ValueKind::Text);
    }

    /// The fast path and the grammar agree on pairs and findings: on every
    /// CP area of the fixtures, and on byte-mutated slices of them that hit the
    /// grammar's corners (missing `=`, empty keys, unclosed `//`, repeats).
    #[test]
    fn fast_path_matches_grammar() {
        fn both(seg: &[u8], start: usize, end: usize) {
            let (mut f1, mut f2) = (Vec::new(), Vec::new());
            let fast = parse(seg, start, end, &mut f1);
            let spec = parse_grammar(seg, start, end, &mut f2);
            assert_eq!(
                (format!("{fast:?}"), format!("{f1:?}")),
                (format!("{spec:?}"), format!("{f2:?}")),
                "{:?}",
                String::from_utf8_lossy(&seg[start..end])
            );
        }
        let alphabet = b"==;;,, //-aA0.+&\xe6";
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rng = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as usize
        };
        for frame in crate::fixture_frames() {
            let Some(body) = memchr::memmem::find(&frame, b"CP=&&").map(|i| i + 5) else {
                continue;
            };
            let end = memchr::memmem::rfind(&frame, b"&&").filter(|&e| e >= body);
            both(&frame, body, end.unwrap_or(body));
            for _ in 0..100 {
                let mut seg = frame.clone();
                for _ in 0..1 + rng() % 6 {
                    let at = rng() % seg.len();
                    seg[at] = alphabet[rng() % alphabet.len()];
                }
                let start = rng() % (seg.len() + 1);
                let end = start + rng() % (seg.len() - start + 1);
                both(&seg, start, end);
            }
        }
    }

    /// A small xorshift generator: the property tests are deterministic.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as usize
        }
        fn pick<'a>(&mut self, from: &[&'a [u8]]) -> &'a [u8] {
            from[self.next() % from.len()]
        }
    }

    /// The fast scan and the grammar on `seg[start..end]`: identical pairs
    /// (spans, code and suffix splits, kinds) and findings.
    fn same_as_grammar(seg: &[u8], start: usize, end: usize) {
        let (mut f1, mut f2) = (Vec::new(), Vec::new());
        let fast = parse(seg, start, end, &mut f1);
        let spec = parse_grammar(seg, start, end, &mut f2);
        assert_eq!(
            (format!("{fast:?}"), format!("{f1:?}")),
            (format!("{spec:?}"), format!("{f2:?}")),
            "{:?} [{start}..{end}]",
            String::from_utf8_lossy(seg)
        );
    }

    /// A random CP text built from the grammar's pieces and its corners: keys
    /// plain and `code-suffix` (with second dashes, spaces, empty), values of
    /// every kind, `//` info with separators inside (closed or not), comma
    /// lists, missing `=`, runs of separators, repeats, multi-byte text;
    /// up to a few hundred bytes.
    fn random_cp(rng: &mut Rng) -> Vec<u8> {
        let keys: &[&[u8]] = &[
            b"DataTime",
            b"a21026-Rtd",
            b"a21026-Flag",
            b"w01018-Avg",
            b"a34004-ZsRtd",
            b"SB1-RS",
            b"i11001-Info",
            b"a21026-i22004-Info",
            b"-Rtd",
            b"a21026-",
            b"PolId",
            b"Q",
            b"",
            b" ",
            b"LA-Rtd ",
            b"x-y-z",
            "浓度-Rtd".as_bytes(),
        ];
        let values: &[&[u8]] = &[
            b"20240601085857",
            b"12.50",
            b"-130.7116",
            b"0",
            b"+1",
            b".5",
            b"1.",
            b"007",
            b"N",
            b"",
            b" 3.2 ",
            b"1e5",
            b"//a;b,c//",
            b"//open;",
            b"////",
            b"a21026,a21002",
            b"1,x",
            b"2,,s",
            b"a=b",
            "超标,浓度高".as_bytes(),
        ];
        let seps: &[&[u8]] = &[b";", b",", b";;", b" ; ", b", ", b"", b";,"];
        let mut out = Vec::new();
        for _ in 0..rng.next() % 24 {
            out.extend_from_slice(rng.pick(keys));
            match rng.next() % 12 {
                0 => {}
                1 => out.extend_from_slice(b" ="),
                _ => out.push(b'='),
            }
            out.extend_from_slice(rng.pick(values));
            out.extend_from_slice(rng.pick(seps));
        }
        out
    }

    /// Property test: on thousands of random CP texts at random offsets of
    /// their segment, on byte-mutated (replaced, inserted, deleted) and
    /// truncated copies of them, and on noise over the structural bytes, the
    /// fast scan and the grammar agree.
    #[test]
    fn fast_path_matches_grammar_on_random_texts() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let alphabet = b"==;;,, //-aA0.+&\xe6\x00\xff";
        for round in 0..4000 {
            let mut text = random_cp(&mut rng);
            // A random prefix before `start`; bytes after `end` that would
            // change the answer if the scan read them.
            let pad = rng.next() % 70;
            let mut seg: Vec<u8> = (0..pad)
                .map(|_| alphabet[rng.next() % alphabet.len()])
                .collect();
            let start = seg.len();
            seg.append(&mut text);
            let end = seg.len();
            seg.extend_from_slice(b"&&;,=-");
            same_as_grammar(&seg, start, end);
            // Mutations: replace, insert and delete bytes; cut anywhere.
            let mut m = seg.clone();
            for _ in 0..1 + rng.next() % 8 {
                let at = rng.next() % m.len();
                let c = alphabet[rng.next() % alphabet.len()];
                match rng.next() % 3 {
                    0 => m[at] = c,
                    1 => m.insert(at, c),
                    _ => {
                        m.remove(at);
                    }
                }
            }
            let a = rng.next() % (m.len() + 1);
            let b = a + rng.next() % (m.len() - a + 1);
            same_as_grammar(&m, a, b);
            // Pure noise over the structural alphabet, now and then.
            if round % 4 == 0 {
                let noise: Vec<u8> = (0..rng.next() % 300)
                    .map(|_| alphabet[rng.next() % alphabet.len()])
                    .collect();
                same_as_grammar(&noise, 0, noise.len());
            }
        }
    }

    /// Comma lists inside a value (alarm uploads' `PolId`, Chinese `AlarmDesc`)
    /// stay in that value byte for byte; each extra item is still reported.
    #[test]
    fn comma_list_items_stay_in_their_value() {
        let seg = "DataTime=20240601085857;PolId=a21026,a21002, a21003;AlarmDesc=超标,浓度高,持续;a21026-Rtd=1,x,a21026-Flag=N;Q=1,;R=2,,s"
            .as_bytes();
        for parse in [parse, parse_grammar] {
            let mut f = Vec::new();
            let p = parse(seg, 0, seg.len(), &mut f);
            let got = kv(seg, &p);
            assert_eq!(got[1], ("PolId".into(), "a21026,a21002, a21003".into()));
            assert_eq!(got[2], ("AlarmDesc".into(), "超标,浓度高,持续".into()));
            assert_eq!(got[3], ("a21026-Rtd".into(), "1,x".into()));
            assert_eq!(p[3].kind, ValueKind::Text);
            assert_eq!(got[4], ("a21026-Flag".into(), "N".into()));
            // A trailing comma is a separator; an item after an empty one is not
            // part of a list and stays a bare token.
            assert_eq!(got[5], ("Q".into(), "1".into()));
            assert_eq!(got[6], ("R".into(), "2".into()));
            assert_eq!(p.len(), 7);
            let details: Vec<_> = f.iter().map(|f| (f.code, &*f.detail)).collect();
            assert_eq!(
                details,
                [
                    (
                        code::CP_SYNTAX,
                        "CP token without '=': \"a21002\"; kept in the value of \"PolId\""
                    ),
                    (
                        code::CP_SYNTAX,
                        "CP token without '=': \" a21003\"; kept in the value of \"PolId\""
                    ),
                    (
                        code::CP_SYNTAX,
                        "CP token without '=': \"浓度高\"; kept in the value of \"AlarmDesc\""
                    ),
                    (
                        code::CP_SYNTAX,
                        "CP token without '=': \"持续\"; kept in the value of \"AlarmDesc\""
                    ),
                    (
                        code::CP_SYNTAX,
                        "CP token without '=': \"x\"; kept in the value of \"a21026-Rtd\""
                    ),
                    (code::CP_SYNTAX, "CP token without '=': \"s\""),
                ]
            );
        }
    }

    #[test]
    fn double_hyphen_and_duplicates() {
        let seg = b"a21026-i22004-Info=1;a21026-Rtd=1,a21026-Rtd=2;=3;junk";
        let mut f = Vec::new();
        let p = parse(seg, 0, seg.len(), &mut f);
        assert_eq!(&seg[p[0].code.unwrap().range()], b"a21026");
        assert_eq!(&seg[p[0].suffix.unwrap().range()], b"i22004-Info");
        let codes: Vec<_> = f.iter().map(|f| f.code).collect();
        assert_eq!(
            codes,
            [code::CP_DUPLICATE, code::CP_SYNTAX, code::CP_SYNTAX]
        );
    }

    /// Past [`SeenKeys::SMALL`] keys the repeats are found by a hash set: the
    /// duplicate findings must still be exactly the keys seen before, in order,
    /// for CP areas of every size around and far past the switch (a 10 KiB
    /// frame holds ~1,700 keys), with repeats early, late and across it.
    #[test]
    fn repeated_keys_are_found_in_cp_areas_of_any_size() {
        let mut x: u32 = 7;
        for n in [1, 2, 30, 62, 63, 64, 65, 66, 100, 300, 1700] {
            for distinct in [n / 3 + 1, n] {
                let mut seg = Vec::new();
                for k in 0..n {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    if k > 0 {
                        seg.push(b';');
                    }
                    let key = (x >> 8) as usize % distinct;
                    // Some written with spaces before the `=`: the same key.
                    let pad = if x & 0x300 == 0 { " " } else { "" };
                    if key % 2 == 0 {
                        seg.extend_from_slice(format!("k{key}{pad}=1").as_bytes());
                    } else {
                        seg.extend_from_slice(format!("a{key}-Rtd{pad}=1").as_bytes());
                    }
                }
                let mut found = Vec::new();
                let pairs = parse(&seg, 0, seg.len(), &mut found);
                let mut seen = std::collections::HashSet::new();
                let expected: Vec<String> = pairs
                    .iter()
                    .filter(|p| !seen.insert(&seg[p.key.range()]))
                    .map(|p| {
                        format!(
                            "CP key {:?} repeated; the last value wins",
                            String::from_utf8_lossy(&seg[p.key.range()])
                        )
                    })
                    .collect();
                let got: Vec<String> = found
                    .iter()
                    .filter(|f| f.code == code::CP_DUPLICATE)
                    .map(|f| f.detail.to_string())
                    .collect();
                assert_eq!(pairs.len(), n);
                assert_eq!(got, expected, "n {n}, distinct {distinct}");
                let mut grammar = Vec::new();
                parse_grammar(&seg, 0, seg.len(), &mut grammar);
                assert_eq!(format!("{found:?}"), format!("{grammar:?}"));
            }
        }
    }

    /// Keys that collide in `key_hash` (same length, same first and last eight
    /// bytes) are still different keys: the Bloom filter's hit is only a
    /// reason to compare, never a repeat by itself.
    #[test]
    fn keys_that_share_a_hash_are_not_repeats() {
        let (a, b) = (b"aaaaaaaaXbbbbbbbb", b"aaaaaaaaYbbbbbbbb");
        assert_eq!(key_hash(a), key_hash(b));
        let seg = b"aaaaaaaaXbbbbbbbb=1;aaaaaaaaYbbbbbbbb=2;aaaaaaaaXbbbbbbbb=3";
        for parse in [parse, parse_grammar] {
            let mut findings = Vec::new();
            let pairs = parse(seg, 0, seg.len(), &mut findings);
            assert_eq!(pairs.len(), 3);
            let repeats: Vec<_> = findings
                .iter()
                .filter(|f| f.code == code::CP_DUPLICATE)
                .collect();
            // Only the true repeat, the third key.
            assert_eq!(repeats.len(), 1, "{findings:?}");
            assert!(repeats[0].detail.contains("aaaaaaaaXbbbbbbbb"));
        }
    }

    /// A key written with spaces before its `=` is the same key: `a=1;a =2`
    /// repeats `a`, with few keys (the Bloom filter, which hashed the spaced
    /// form and missed it) as with many (the hash set).
    #[test]
    fn a_key_with_spaces_before_its_equals_sign_is_a_repeat() {
        for before in [0, 10, 70] {
            let mut seg = Vec::new();
            for k in 0..before {
                seg.extend_from_slice(format!("k{k}=1;").as_bytes());
            }
            seg.extend_from_slice(b"a=1;b-Rtd=2;a  =3;b-Rtd =4");
            let mut found = Vec::new();
            let pairs = parse(&seg, 0, seg.len(), &mut found);
            assert_eq!(pairs.len(), before + 4);
            let repeats: Vec<&str> = found
                .iter()
                .filter(|f| f.code == code::CP_DUPLICATE)
                .map(|f| &*f.detail)
                .collect();
            assert_eq!(
                repeats,
                [
                    "CP key \"a\" repeated; the last value wins",
                    "CP key \"b-Rtd\" repeated; the last value wins"
                ],
                "{before} keys before"
            );
        }
    }
}
