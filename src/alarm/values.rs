//! The values of one observation, kept flat.
//!
//! The detector builds one observation per accepted inbound frame. As a map of
//! maps of `String`s a realtime frame of ten factors cost some sixty heap
//! allocations (every code, suffix and flag, and every map node); here a frame's
//! values live in two vectors, and codes, suffixes and flags are stored inline.
//! A frame has some ten factors of two to five values each, so lookups scan.
//!
//! Factors are kept sorted by code: the engine visits them in that order, and the
//! order of the events it emits for one frame follows it (as with the map this
//! replaces). A factor can be present without usable values (`"a":{}`): the engine
//! still sees it (a flag check runs for it).

use std::fmt;

use rust_decimal::Decimal;

use super::Val;

/// Bytes kept inline: factor codes (`a34013`, `011`, `d20105`), suffixes (at most
/// `SampleTime`), flags and `SampleTime` values (14 digits) all fit; 22 bytes make
/// the type as large as a `String`.
const INLINE: usize = 22;

/// A short text (factor code, suffix, flag) stored inline; a longer one (a
/// non-standard code, an `Info` text) goes on the heap, so nothing is cut.
#[derive(Clone)]
pub struct ShortText(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Box<str>),
}

impl ShortText {
    /// `s`, inline if it fits.
    pub fn new(s: &str) -> ShortText {
        if s.len() <= INLINE {
            let mut buf = [0; INLINE];
            buf[..s.len()].copy_from_slice(s.as_bytes());
            ShortText(Repr::Inline {
                len: s.len() as u8,
                buf,
            })
        } else {
            ShortText(Repr::Heap(s.into()))
        }
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, buf } => &buf[..usize::from(*len)],
            Repr::Heap(s) => s.as_bytes(),
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Copied whole from a `&str` in `new`: always UTF-8.
            Repr::Inline { len, buf } => {
                std::str::from_utf8(&buf[..usize::from(*len)]).expect("copied from a str")
            }
            Repr::Heap(s) => s,
        }
    }

    /// The same text as `s` (compares bytes, no UTF-8 check).
    pub fn is(&self, s: &str) -> bool {
        self.as_bytes() == s.as_bytes()
    }
}

impl PartialEq for ShortText {
    fn eq(&self, other: &ShortText) -> bool {
        match (&self.0, &other.0) {
            // Whole buffers (zero after `len`): a fixed-size compare the compiler
            // inlines, where a slice compare calls `memcmp` for three bytes.
            (Repr::Inline { len: a, buf: x }, Repr::Inline { len: b, buf: y }) => a == b && x == y,
            _ => self.as_bytes() == other.as_bytes(),
        }
    }
}

impl Eq for ShortText {}

impl PartialEq<str> for ShortText {
    fn eq(&self, other: &str) -> bool {
        self.is(other)
    }
}

impl PartialEq<&str> for ShortText {
    fn eq(&self, other: &&str) -> bool {
        self.is(other)
    }
}

impl From<&str> for ShortText {
    fn from(s: &str) -> ShortText {
        ShortText::new(s)
    }
}

impl fmt::Debug for ShortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ShortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The index of `code` in `entries` (sorted by code, bytewise, as `str`
/// orders), inserting a default entry in its place when it is new; `None`
/// when it is new and `entries` holds `cap` already. `hint` is where it
/// probably is (the detectors visit a device's factors in code order, the
/// same ones every time): checked with one compare before searching.
pub(super) fn find_or_insert<T: Default>(
    entries: &mut Vec<(ShortText, T)>,
    code: &str,
    cap: usize,
    hint: Option<usize>,
) -> Option<usize> {
    if let Some(h) = hint.filter(|&h| entries.get(h).is_some_and(|(c, _)| c.is(code))) {
        return Some(h);
    }
    match entries.binary_search_by(|(c, _)| c.as_bytes().cmp(code.as_bytes())) {
        Ok(i) => Some(i),
        Err(_) if entries.len() >= cap => None,
        Err(i) => {
            entries.insert(i, (ShortText::new(code), T::default()));
            Some(i)
        }
    }
}

/// One factor's place in [`Values::vals`].
#[derive(Debug, Clone)]
struct Span {
    code: ShortText,
    start: usize,
    end: usize,
}

/// factor -> suffix -> value of one observation: at most one entry per factor and
/// per suffix within a factor, factors in code order.
#[derive(Clone, Default)]
pub struct Values {
    /// Sorted by code (bytewise, as `str` orders).
    factors: Vec<Span>,
    /// The factors' `(suffix, value)`s, each factor's contiguous.
    vals: Vec<(ShortText, Val)>,
}

/// One factor of [`Values`].
#[derive(Clone, Copy)]
pub struct Factor<'a> {
    code: &'a ShortText,
    vals: &'a [(ShortText, Val)],
}

impl<'a> Factor<'a> {
    /// The factor code.
    pub fn code(&self) -> &'a str {
        self.code.as_str()
    }

    /// The value of `suffix`, if present.
    pub fn get(&self, suffix: &str) -> Option<&'a Val> {
        let suffix = ShortText::new(suffix);
        self.vals.iter().find(|(s, _)| *s == suffix).map(|(_, v)| v)
    }

    /// A numeric value, if present.
    pub fn num(&self, suffix: &str) -> Option<Decimal> {
        match self.get(suffix)? {
            Val::Num(d) => Some(*d),
            Val::Text(_) => None,
        }
    }

    /// A text value (flags), if present.
    pub fn text(&self, suffix: &str) -> Option<&'a str> {
        match self.get(suffix)? {
            Val::Text(s) => Some(s.as_str()),
            Val::Num(_) => None,
        }
    }

    /// `(suffix, value)`s, in the order they were read.
    pub fn iter(self) -> impl Iterator<Item = (&'a str, &'a Val)> + 'a {
        self.vals.iter().map(|(s, v)| (s.as_str(), v))
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.vals.len()
    }

    /// No usable values (the factor was an empty object, or none of its values was
    /// a number or a string).
    pub fn is_empty(&self) -> bool {
        self.vals.is_empty()
    }
}

impl fmt::Debug for Factor<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Values {
    /// Number of factors.
    pub fn len(&self) -> usize {
        self.factors.len()
    }

    /// No factors.
    pub fn is_empty(&self) -> bool {
        self.factors.is_empty()
    }

    /// The factor `code`, if present.
    pub fn get(&self, code: &str) -> Option<Factor<'_>> {
        let code = ShortText::new(code);
        self.factors
            .iter()
            .find(|s| s.code == code)
            .map(|s| self.factor(s))
    }

    /// The factors, in code order.
    pub fn iter(&self) -> impl Iterator<Item = Factor<'_>> {
        self.factors.iter().map(|s| self.factor(s))
    }

    /// A numeric value, if present.
    pub fn num(&self, code: &str, suffix: &str) -> Option<Decimal> {
        self.get(code)?.num(suffix)
    }

    /// A text value (flags), if present.
    pub fn text(&self, code: &str, suffix: &str) -> Option<&str> {
        self.get(code)?.text(suffix)
    }

    fn factor<'a>(&'a self, s: &'a Span) -> Factor<'a> {
        Factor {
            code: &s.code,
            vals: &self.vals[s.start..s.end],
        }
    }

    /// Sets `suffix` of `code` to `val`, adding the factor if it is new and
    /// replacing an earlier value of the suffix.
    pub fn insert(&mut self, code: &str, suffix: &str, val: Val) {
        let i = match self
            .factors
            .binary_search_by(|s| s.code.as_bytes().cmp(code.as_bytes()))
        {
            Ok(i) => i,
            Err(i) => {
                let at = self.vals.len();
                self.factors.insert(
                    i,
                    Span {
                        code: ShortText::new(code),
                        start: at,
                        end: at,
                    },
                );
                i
            }
        };
        let (start, end) = (self.factors[i].start, self.factors[i].end);
        if let Some(k) = self.vals[start..end].iter().position(|(s, _)| s.is(suffix)) {
            self.vals[start + k].1 = val;
            return;
        }
        self.vals.insert(end, (ShortText::new(suffix), val));
        for (j, s) in self.factors.iter_mut().enumerate() {
            if j == i {
                s.end += 1;
            } else if s.start >= end {
                // Stored after the grown factor (vals are not in code order).
                s.start += 1;
                s.end += 1;
            }
        }
    }

    // Building while reading a document (doc.rs): factors in document order,
    // each factor's values appended after the earlier factors', then `sort`.

    /// Drops every factor.
    pub(super) fn clear(&mut self) {
        self.factors.clear();
        self.vals.clear();
    }

    /// Where the values of the factor being read start.
    pub(super) fn begin_factor(&mut self) -> usize {
        if self.factors.capacity() == 0 {
            // Room for a typical frame (about ten factors of two or three values):
            // one allocation per vector for most documents.
            self.factors.reserve(12);
            self.vals.reserve(32);
        }
        self.vals.len()
    }

    /// Sets `suffix` of the factor being read (begun at `start`) to `val`, or
    /// removes it for `None`: of repeated suffixes the last counts, also when it
    /// is unusable.
    pub(super) fn put(&mut self, start: usize, suffix: ShortText, val: Option<Val>) {
        if let Some(k) = self.vals[start..].iter().position(|(s, _)| *s == suffix) {
            self.vals.remove(start + k);
        }
        if let Some(v) = val {
            self.vals.push((suffix, v));
        }
    }

    /// Ends the factor `code` begun at `start`: it replaces any earlier factor of
    /// that code, and is kept only if it was an object (the last of repeated
    /// factors counts, also when it is not an object).
    pub(super) fn end_factor(&mut self, code: ShortText, mut start: usize, is_object: bool) {
        if let Some(i) = self.factors.iter().position(|s| s.code == code) {
            let old = self.factors.remove(i);
            let n = old.end - old.start;
            self.vals.drain(old.start..old.end);
            for s in &mut self.factors[i..] {
                s.start -= n;
                s.end -= n;
            }
            start -= n;
        }
        if is_object {
            let end = self.vals.len();
            self.factors.push(Span { code, start, end });
        } else {
            self.vals.truncate(start);
        }
    }

    /// Puts the factors read in code order (codes are unique by then).
    pub(super) fn sort(&mut self) {
        self.factors
            .sort_unstable_by(|a, b| a.code.as_bytes().cmp(b.code.as_bytes()));
    }
}

impl fmt::Debug for Values {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|x| (x.code(), x)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn as_map(v: &Values) -> BTreeMap<String, BTreeMap<String, Val>> {
        let codes: Vec<&str> = v.iter().map(|f| f.code()).collect();
        assert!(codes.windows(2).all(|w| w[0] < w[1]), "{codes:?}");
        v.iter()
            .map(|f| {
                let m: BTreeMap<String, Val> =
                    f.iter().map(|(s, x)| (s.to_owned(), x.clone())).collect();
                assert_eq!(m.len(), f.len(), "repeated suffix in {f:?}");
                (f.code().to_owned(), m)
            })
            .collect()
    }

    #[test]
    fn insert_reads_as_a_map_of_maps() {
        // Factors inserted out of order, interleaved, growing earlier-stored
        // factors, replacing values, with long codes and texts.
        let codes = [
            "w01018",
            "a34013",
            "b",
            "a_code_longer_than_twenty_two",
            "011",
        ];
        let suffixes = ["Rtd", "Flag", "ZsRtd", "SampleTime_longer_than_inline"];
        let mut v = Values::default();
        let mut model: BTreeMap<String, BTreeMap<String, Val>> = BTreeMap::new();
        let mut x = 7u64;
        for i in 0..400u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let c = codes[(x >> 33) as usize % codes.len()];
            let s = suffixes[(x >> 40) as usize % suffixes.len()];
            let val = if x >> 63 == 0 {
                Val::Num(Decimal::from(i))
            } else {
                Val::Text(ShortText::new(&"N".repeat(1 + (i as usize % 30))))
            };
            v.insert(c, s, val.clone());
            model
                .entry(c.to_owned())
                .or_default()
                .insert(s.to_owned(), val);
            assert_eq!(as_map(&v), model, "after insert {i}");
        }
        assert_eq!(v.len(), codes.len());
        assert_eq!(
            v.num("a34013", "Rtd"),
            model["a34013"].get("Rtd").and_then(|x| match x {
                Val::Num(d) => Some(*d),
                Val::Text(_) => None,
            })
        );
        assert!(v.get("a3401").is_none() && v.get("a340130").is_none());
    }

    #[test]
    fn short_text_keeps_every_byte() {
        for s in [
            "",
            "N",
            "a34013",
            "0123456789012345678901",
            "01234567890123456789012",
            "中文因子编码与很长的文本",
        ] {
            let t = ShortText::new(s);
            assert_eq!(t.as_str(), s);
            assert!(t.is(s) && t == s);
            assert_eq!(format!("{t:?}"), format!("{s:?}"));
        }
        assert!(ShortText::new("Rtd") != ShortText::new("Rt"));
        assert_eq!(
            std::mem::size_of::<ShortText>(),
            std::mem::size_of::<String>()
        );
    }
}
