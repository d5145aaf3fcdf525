//! The data-segment header: `key=value;` tokens up to `CP=`.
//!
//! Rule (HJ 212-2017 §6.3.2, Table 3): `QN=…;ST=…;CN=…;PW=…;MN=…;Flag=…;
//! [PNUM=…;PNO=…;]CP=&&…&&`, fields separated by `;`. HJ 212-2025 adds an
//! optional `RF=1` before CP. Real devices reorder fields, drop QN/Flag (2005),
//! write `FLAG=`, repeat keys and leave stray separators, so parsing is by
//! key, never by position; oddities become findings.

use nom::bytes::complete::{tag, take_till, take_while};
use nom::combinator::rest;
use nom::sequence::separated_pair;
use nom::{IResult, Parser};

use super::finding::{Finding, Severity, code};
use super::span::Span;

/// Header field positions within the data segment.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// `QN` request code.
    pub qn: Option<Span>,
    /// `ST` system code.
    pub st: Option<Span>,
    /// `CN` command code.
    pub cn: Option<Span>,
    /// `PW` password (a credential: never printed or published on its own).
    pub pw: Option<Span>,
    /// `MN` device id.
    pub mn: Option<Span>,
    /// `Flag`.
    pub flag: Option<Span>,
    /// `PNUM` total packets.
    pub pnum: Option<Span>,
    /// `PNO` packet number.
    pub pno: Option<Span>,
    /// `RF` re-sent marker (2025).
    pub rf: Option<Span>,
}

/// Where the CP area starts.
#[derive(Debug, Clone, Copy)]
pub struct CpStart {
    /// Offset of `CP=`.
    pub key: usize,
    /// Offset of the first byte after `CP=&&` (or after `CP=` when `&&` is missing).
    pub body: usize,
    /// `CP=` was followed by `&&`.
    pub opened: bool,
}

/// Finds the `CP=` token. `CP=&&` is searched first: header values cannot
/// contain it. A `CP=` glued to the previous value (`Flag=5CP=&&`, a typo in
/// the standard's own C.19) is accepted with a finding.
pub fn find_cp(seg: &[u8], findings: &mut Vec<Finding>) -> Option<CpStart> {
    let (key, opened) = match find_from(seg, b"CP=&&") {
        Some(p) => (p, true),
        None => (find_from(seg, b"CP=")?, false),
    };
    if key > 0 && seg[key - 1] != b';' {
        findings.push(Finding::new(
            code::HEADER_SYNTAX,
            Severity::Warning,
            "CP= is not preceded by ';'",
        ));
    }
    Some(CpStart {
        key,
        body: key + if opened { 5 } else { 3 },
        opened,
    })
}

/// First occurrence of `needle` (which starts with `C`). A `memchr` walk over
/// the few `C`s of a header beats building a substring searcher per frame.
fn find_from(seg: &[u8], needle: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(needle[0], &seg[from..]) {
        let p = from + i;
        if seg[p..].starts_with(needle) {
            return Some(p);
        }
        from = p + 1;
    }
    None
}

/// nom on a complete segment: nothing is streamed, and the error carries no
/// information because every rule below either cannot fail or fails in one way
/// that its caller turns into a finding. nom types stay inside this module.
type Res<'a, O> = IResult<&'a [u8], O, ()>;

/// The header's field separator.
///
/// Rule (HJ 212-2017 Table 3, digest §3.1): "Fields are separated by `;`".
fn separator(i: &[u8]) -> Res<'_, &[u8]> {
    tag(";")(i)
}

/// One header token: everything up to the next separator.
///
/// Rule (digest §3.1, §7): the data segment is
/// `QN=…;ST=…;CN=…;PW=…;MN=…;Flag=…;[PNUM=…;PNO=…;]CP=&&…&&`; 2025 adds
/// `[RF=1;]` before CP (HJ 212-2025 Fig. 4). Real devices reorder fields, so
/// "parse the header as `key=value` tokens until `CP=`".
fn token(i: &[u8]) -> Res<'_, &[u8]> {
    take_till(|c| c == b';')(i)
}

/// Leading junk of a token: spaces, and the stray commas of `;,MN=` seen in the
/// field (the standard's own C.22 writes `QN=…534,ST=`). Not in the standard.
fn padding(i: &[u8]) -> Res<'_, &[u8]> {
    take_while(|c| c == b' ' || c == b',')(i)
}

/// A field: `key "=" value`, split at the first `=`.
///
/// Rule (HJ 212-2017 Table 3): each field is written `name=value`, e.g.
/// `QN=20160801085857223`, `Flag=5`; header values contain no `=`.
fn field(i: &[u8]) -> Res<'_, (&[u8], &[u8])> {
    separated_pair(take_till(|c| c == b'='), tag("="), rest).parse(i)
}

/// Parses header tokens in `seg[..end]`.
///
/// Decoding runs this for every frame, so it does what the rules above do
/// (`token`, `separator`, `padding`, `field`) with plain loops: nom's input
/// calls were not inlined (`take_from` alone was 2.8 % of the decode profile,
/// the header ~8 %; `benches/README.md`, issue 23). [`parse_grammar`] is the
/// same parser written with the rules; a unit test holds the two to identical
/// headers and findings.
pub fn parse(seg: &[u8], end: usize, findings: &mut Vec<Finding>) -> Header {
    let mut h = Header::default();
    let mut at = 0;
    loop {
        let input = &seg[at..end];
        let (len, terminated) = match memchr::memchr(b';', input) {
            Some(i) => (i, true),
            None => (input.len(), false),
        };
        let tok = &input[..len];
        let pad = tok
            .iter()
            .position(|&c| c != b' ' && c != b',')
            .unwrap_or(len);
        let body = trim_end_spaces(&tok[pad..]);
        let kv = body
            .iter()
            .position(|&c| c == b'=')
            .map(|e| (&body[..e], &body[e + 1..]));
        record(at, &tok[..pad], body, kv, terminated, &mut h, findings);
        if !terminated {
            return h;
        }
        at += len + 1;
    }
}

/// [`parse`] written with the grammar rules: the same header and findings
/// (unit-tested), slower. The executable form of the grammar, for tests.
#[doc(hidden)]
pub fn parse_grammar(seg: &[u8], end: usize, findings: &mut Vec<Finding>) -> Header {
    let mut h = Header::default();
    let mut input = &seg[..end];
    loop {
        let at = end - input.len();
        // `token` takes zero or more bytes: it cannot fail.
        let Ok((after, tok)) = token(input) else {
            return h;
        };
        let terminated = separator(after).ok().map(|(next, _)| next);
        // `padding` takes zero or more bytes: it cannot fail.
        if let Ok((body, pad)) = padding(tok) {
            let body = trim_end_spaces(body);
            let kv = field(body).ok().map(|(_, kv)| kv);
            record(at, pad, body, kv, terminated.is_some(), &mut h, findings);
        }
        match terminated {
            Some(next) => input = next,
            None => return h,
        }
    }
}

/// Records one token found at offset `at` of the segment into `h`: its
/// leading `pad`, its `body` without the padding and trailing spaces, and that
/// body split at its first `=` (`None`: no `=`). `terminated`: a `;` follows
/// the token (an empty token is only worth a finding then). One body for
/// [`parse`] and [`parse_grammar`], so they cannot drift apart here.
#[inline(always)]
fn record(
    at: usize,
    pad: &[u8],
    body: &[u8],
    kv: Option<(&[u8], &[u8])>,
    terminated: bool,
    h: &mut Header,
    findings: &mut Vec<Finding>,
) {
    for _ in pad.iter().filter(|&&c| c == b',') {
        findings.push(Finding::new(
            code::HEADER_SYNTAX,
            Severity::Warning,
            "stray ',' in header",
        ));
    }
    let start = at + pad.len();
    if body.is_empty() {
        if terminated {
            findings.push(Finding::new(
                code::HEADER_SYNTAX,
                Severity::Info,
                "empty header token",
            ));
        }
        return;
    }
    let Some((key, value)) = kv else {
        findings.push(Finding::new(
            code::HEADER_SYNTAX,
            Severity::Warning,
            format!(
                "header token without '=': {:?}",
                String::from_utf8_lossy(body)
            ),
        ));
        return;
    };
    let value_start = start + key.len() + 1;
    let value = Span::new(value_start, value_start + value.len());
    let Some(slot) = slot(h, key, findings) else {
        return;
    };
    if slot.is_some() {
        findings.push(Finding::new(
            code::FIELD_DUPLICATE,
            Severity::Warning,
            format!(
                "header key {:?} repeated; the last value wins",
                String::from_utf8_lossy(key)
            ),
        ));
    }
    *slot = Some(value);
}

/// `b` without trailing spaces (only spaces: the standard knows no tabs).
fn trim_end_spaces(b: &[u8]) -> &[u8] {
    let keep = b.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
    &b[..keep]
}

/// The field of `h` that `key` names, matched exactly first and then ignoring
/// case (`FLAG=` is common) with a finding; `None` for an unknown key.
fn slot<'h>(
    h: &'h mut Header,
    key: &[u8],
    findings: &mut Vec<Finding>,
) -> Option<&'h mut Option<Span>> {
    match key {
        b"QN" => return Some(&mut h.qn),
        b"ST" => return Some(&mut h.st),
        b"CN" => return Some(&mut h.cn),
        b"PW" => return Some(&mut h.pw),
        b"MN" => return Some(&mut h.mn),
        b"Flag" => return Some(&mut h.flag),
        b"PNUM" => return Some(&mut h.pnum),
        b"PNO" => return Some(&mut h.pno),
        b"RF" => return Some(&mut h.rf),
        _ => {}
    }
    let canon = match key.to_ascii_uppercase().as_slice() {
        b"QN" => Some(&mut h.qn),
        b"ST" => Some(&mut h.st),
        b"CN" => Some(&mut h.cn),
        b"PW" => Some(&mut h.pw),
        b"MN" => Some(&mut h.mn),
        b"FLAG" => Some(&mut h.flag),
        b"PNUM" => Some(&mut h.pnum),
        b"PNO" => Some(&mut h.pno),
        b"RF" => Some(&mut h.rf),
        _ => None,
    };
    let name = String::from_utf8_lossy(key);
    match canon {
        Some(slot) => {
            findings.push(Finding::new(
                code::FIELD_CASE,
                Severity::Info,
                format!("header key {name:?} in non-standard case"),
            ));
            Some(slot)
        }
        None => {
            findings.push(Finding::new(
                code::FIELD_UNKNOWN,
                Severity::Info,
                format!("unknown header key {name:?}"),
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(seg: &[u8], s: Option<Span>) -> Option<&str> {
        s.map(|s| std::str::from_utf8(&seg[s.range()]).unwrap())
    }

    #[test]
    fn order_independent_with_quirks() {
        let seg = b"ST=32;CN=2011;PW=123456;,MN=88888881234567;FLAG=0;QN=1;QN=2;X=1;CP=&&&&";
        let mut f = Vec::new();
        let cp = find_cp(seg, &mut f).unwrap();
        let h = parse(seg, cp.key, &mut f);
        assert_eq!(text(seg, h.mn), Some("88888881234567"));
        assert_eq!(text(seg, h.flag), Some("0"));
        assert_eq!(text(seg, h.qn), Some("2"));
        let codes: Vec<_> = f.iter().map(|f| f.code).collect();
        assert_eq!(
            codes,
            [
                code::HEADER_SYNTAX,
                code::FIELD_CASE,
                code::FIELD_DUPLICATE,
                code::FIELD_UNKNOWN
            ]
        );
    }

    /// The loop and the grammar agree on headers and findings: on every
    /// fixture's header, and on byte-mutated copies of them that hit the
    /// corners (stray commas and spaces, empty tokens, missing `=`, odd case,
    /// unknown and repeated keys).
    #[test]
    fn fast_path_matches_grammar() {
        fn both(seg: &[u8], end: usize) {
            let (mut f1, mut f2) = (Vec::new(), Vec::new());
            let fast = parse(seg, end, &mut f1);
            let spec = parse_grammar(seg, end, &mut f2);
            assert_eq!(
                (format!("{fast:?}"), format!("{f1:?}")),
                (format!("{spec:?}"), format!("{f2:?}")),
                "{:?}",
                String::from_utf8_lossy(&seg[..end])
            );
        }
        let alphabet = b";;,, ==QNfFlagPNO\xe6";
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rng = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as usize
        };
        for frame in crate::fixture_frames() {
            let seg = &frame[frame.len().min(6)..];
            let end = memchr::memmem::find(seg, b"CP=").unwrap_or(seg.len());
            both(seg, end);
            for _ in 0..200 {
                let mut m = seg[..end].to_vec();
                for _ in 0..1 + rng() % 6 {
                    let c = alphabet[rng() % alphabet.len()];
                    match (rng() % 3, m.is_empty()) {
                        (0, false) => {
                            let at = rng() % m.len();
                            m[at] = c;
                        }
                        (1, false) => {
                            m.remove(rng() % m.len());
                        }
                        _ => m.insert(rng() % (m.len() + 1), c),
                    }
                }
                both(&m, rng() % (m.len() + 1));
            }
        }
    }

    #[test]
    fn glued_cp() {
        let seg = b"QN=1;CN=2011;Flag=5CP=&&a=1&&";
        let mut f = Vec::new();
        let cp = find_cp(seg, &mut f).unwrap();
        assert!(cp.opened);
        let h = parse(seg, cp.key, &mut f);
        assert_eq!(text(seg, h.flag), Some("5"));
        assert_eq!(f[0].code, code::HEADER_SYNTAX);
    }
}
