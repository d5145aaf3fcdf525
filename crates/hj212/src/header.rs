//! The data-segment header: `key=value;` tokens up to `CP=`.
//!
//! Rule (HJ 212-2017 §6.3.2, Table 3): `QN=…;ST=…;CN=…;PW=…;MN=…;Flag=…;
//! [PNUM=…;PNO=…;]CP=&&…&&`, fields separated by `;`. HJ 212-2025 adds an
//! optional `RF=1` before CP. Real devices reorder fields, drop QN/Flag (2005),
//! write `FLAG=`, repeat keys and leave stray separators, so parsing is by
//! key, never by position; oddities become findings.

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

/// Parses header tokens in `seg[..end]`.
pub fn parse(seg: &[u8], end: usize, findings: &mut Vec<Finding>) -> Header {
    let mut h = Header::default();
    let mut pos = 0usize;
    while pos < end {
        let tok_end = memchr::memchr(b';', &seg[pos..end]).map_or(end, |i| pos + i);
        let mut start = pos;
        pos = tok_end + 1;
        // Trim spaces and stray commas (`;,MN=` seen in the field).
        while start < tok_end && matches!(seg[start], b' ' | b',') {
            if seg[start] == b',' {
                findings.push(Finding::new(
                    code::HEADER_SYNTAX,
                    Severity::Warning,
                    "stray ',' in header",
                ));
            }
            start += 1;
        }
        let mut stop = tok_end;
        while stop > start && seg[stop - 1] == b' ' {
            stop -= 1;
        }
        if start == stop {
            if tok_end < end {
                findings.push(Finding::new(
                    code::HEADER_SYNTAX,
                    Severity::Info,
                    "empty header token",
                ));
            }
            continue;
        }
        let Some(eq) = memchr::memchr(b'=', &seg[start..stop]).map(|i| start + i) else {
            findings.push(Finding::new(
                code::HEADER_SYNTAX,
                Severity::Warning,
                format!(
                    "header token without '=': {:?}",
                    String::from_utf8_lossy(&seg[start..stop])
                ),
            ));
            continue;
        };
        let key = &seg[start..eq];
        let value = Span::new(eq + 1, stop);
        let slot = match key {
            b"QN" => &mut h.qn,
            b"ST" => &mut h.st,
            b"CN" => &mut h.cn,
            b"PW" => &mut h.pw,
            b"MN" => &mut h.mn,
            b"Flag" => &mut h.flag,
            b"PNUM" => &mut h.pnum,
            b"PNO" => &mut h.pno,
            b"RF" => &mut h.rf,
            other => {
                let canon: Option<&mut Option<Span>> = match other.to_ascii_uppercase().as_slice() {
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
                let name = String::from_utf8_lossy(other).into_owned();
                match canon {
                    Some(slot) => {
                        findings.push(Finding::new(
                            code::FIELD_CASE,
                            Severity::Info,
                            format!("header key {name:?} in non-standard case"),
                        ));
                        slot
                    }
                    None => {
                        findings.push(Finding::new(
                            code::FIELD_UNKNOWN,
                            Severity::Info,
                            format!("unknown header key {name:?}"),
                        ));
                        continue;
                    }
                }
            }
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
    h
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
