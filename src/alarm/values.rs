//! The values of one observation, kept flat.
//!
//! The detector builds one observation per accepted inbound frame. As a map of
//! maps of `String`s a realtime frame of ten factors cost some sixty heap
//! allocations (every code, suffix and flag, and every map node); here a frame's
//! values live in two vectors, and codes, suffixes and flags are stored inline.
//! A frame has some ten factors of two to five values each, so lookups while
//! building scan; a hostile frame's CP holds up to ~1,700 items, and past
//! [`SCAN_MAX`] factors, or values of one factor, the builder looks them up by
//! hash instead (a scan per item made such a frame cost the detector most of a
//! millisecond).
//!
//! Factors are kept sorted by code: the engine visits them in that order, and the
//! order of the events it emits for one frame follows it (as with the map this
//! replaces). A factor can be present without usable values (`"a":{}`): the engine
//! still sees it (a flag check runs for it).

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};

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

impl Hash for ShortText {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Equal texts have equal bytes (a text is inline exactly when it fits).
        self.as_bytes().hash(state);
    }
}

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

/// Entries looked up by scanning at most this many while building: a frame
/// has some ten factors of a few values each, and a scan of so few beats
/// hashing them.
const SCAN_MAX: usize = 64;

/// factor -> suffix -> value of one observation: at most one entry per factor and
/// per suffix within a factor, factors in code order.
#[derive(Clone, Default)]
pub struct Values {
    /// Sorted by code (bytewise, as `str` orders).
    factors: Vec<Span>,
    /// The factors' `(suffix, value)`s, each factor's contiguous. While
    /// building past [`SCAN_MAX`] entries, and after, some are no factor's: an
    /// entry replaced by a later one of the same suffix or code is left where
    /// it is rather than removed (removing shifts the rest, which made a
    /// hostile CP quadratic).
    vals: Vec<(ShortText, Val)>,
    /// While building, once there are more than [`SCAN_MAX`] of them: where
    /// each entry is. `None` otherwise, and after [`Values::sort`].
    index: Option<Box<Index>>,
}

/// [`Values::index`].
#[derive(Clone, Default)]
struct Index {
    /// code -> the position in `factors` of its latest factor; a factor whose
    /// code maps elsewhere (or nowhere) was replaced.
    factors: Option<HashMap<ShortText, usize>>,
    /// suffix -> the position in `vals` of its latest value, for the factor
    /// being read; a value of that factor whose suffix maps elsewhere (or
    /// nowhere) was replaced.
    suffixes: Option<HashMap<ShortText, usize>>,
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
        // A detector looks up one factor per factor it checks (O2 beside each
        // pollutant): a scan would be quadratic in a CP of ~1,700 codes.
        let i = self
            .factors
            .binary_search_by(|s| s.code.as_bytes().cmp(code.as_bytes()))
            .ok()?;
        Some(self.factor(&self.factors[i]))
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
        self.index = None;
    }

    /// Where the values of the factor being read start.
    pub(super) fn begin_factor(&mut self) -> usize {
        if self.factors.capacity() == 0 {
            // Room for a typical frame (about ten factors of two or three values):
            // one allocation per vector for most documents.
            self.factors.reserve(12);
            self.vals.reserve(32);
        }
        if let Some(ix) = &mut self.index {
            ix.suffixes = None;
        }
        self.vals.len()
    }

    /// Sets `suffix` of the factor being read (begun at `start`) to `val`, or
    /// removes it for `None`: of repeated suffixes the last counts, also when it
    /// is unusable.
    pub(super) fn put(&mut self, start: usize, suffix: ShortText, val: Option<Val>) {
        if let Some(seen) = self.index.as_mut().and_then(|ix| ix.suffixes.as_mut()) {
            // An earlier value of `suffix` stays where it is, no longer mapped:
            // `end_factor` drops it.
            match val {
                Some(v) => {
                    seen.insert(suffix.clone(), self.vals.len());
                    self.vals.push((suffix, v));
                }
                None => {
                    seen.remove(&suffix);
                }
            }
            return;
        }
        if let Some(k) = self.vals[start..].iter().position(|(s, _)| *s == suffix) {
            self.vals.remove(start + k);
        }
        if let Some(v) = val {
            self.vals.push((suffix, v));
            if self.vals.len() - start > SCAN_MAX {
                // Unique so far (each repeat was removed above).
                let seen = (start..self.vals.len())
                    .map(|p| (self.vals[p].0.clone(), p))
                    .collect();
                self.index.get_or_insert_default().suffixes = Some(seen);
            }
        }
    }

    /// Ends the factor `code` begun at `start`: it replaces any earlier factor of
    /// that code, and is kept only if it was an object (the last of repeated
    /// factors counts, also when it is not an object).
    pub(super) fn end_factor(&mut self, code: ShortText, mut start: usize, is_object: bool) {
        if let Some(seen) = self.index.as_mut().and_then(|ix| ix.suffixes.take()) {
            // Keep the values their suffixes still map to, in the order read.
            let mut kept = start;
            for p in start..self.vals.len() {
                if seen.get(&self.vals[p].0) == Some(&p) {
                    self.vals.swap(kept, p);
                    kept += 1;
                }
            }
            self.vals.truncate(kept);
        }
        if let Some(seen) = self.index.as_mut().and_then(|ix| ix.factors.as_mut()) {
            // An earlier factor of `code` stays where it is, no longer mapped:
            // `sort` drops it (its values are no factor's).
            if is_object {
                seen.insert(code.clone(), self.factors.len());
                let end = self.vals.len();
                self.factors.push(Span { code, start, end });
            } else {
                seen.remove(&code);
                self.vals.truncate(start);
            }
            return;
        }
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
            if self.factors.len() > SCAN_MAX {
                // Unique so far (each repeat was removed above).
                let seen = (0..self.factors.len())
                    .map(|i| (self.factors[i].code.clone(), i))
                    .collect();
                self.index.get_or_insert_default().factors = Some(seen);
            }
        } else {
            self.vals.truncate(start);
        }
    }

    /// Puts the factors read in code order (codes are unique by then).
    pub(super) fn sort(&mut self) {
        if let Some(seen) = self.index.take().and_then(|ix| ix.factors) {
            let mut i = 0;
            self.factors.retain(|s| {
                i += 1;
                seen.get(&s.code) == Some(&(i - 1))
            });
        }
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

    /// Building as the document readers do (`begin_factor`, `put`,
    /// `end_factor`, `sort`) gives what a plain model gives: the last of
    /// repeated suffixes and factors counts, also when it is unusable (`None`)
    /// or not an object, values in the order their last occurrences were read.
    /// Sizes cross `SCAN_MAX` for factors and for one factor's values, with and
    /// without repeats on either side of the switch.
    #[test]
    fn building_reads_as_the_last_of_repeats_at_any_size() {
        type Model = BTreeMap<String, Vec<(String, Val)>>;
        let mut x = 11u64;
        let mut next = move |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for case in 0..600u64 {
            // Few distinct codes (many repeats) up to many (few repeats).
            let factors = next(3 * SCAN_MAX as u64);
            let codes = 1 + next(4 * SCAN_MAX as u64);
            let mut v = Values::default();
            let mut model: Model = BTreeMap::new();
            for _ in 0..factors {
                let code = format!("c{}", next(codes));
                // Mostly small factors; some cross the switch.
                let (items, suffixes) = if next(8) == 0 {
                    (next(3 * SCAN_MAX as u64), 1 + next(3 * SCAN_MAX as u64))
                } else {
                    (next(6), 1 + next(6))
                };
                let start = v.begin_factor();
                let mut vals: Vec<(String, Val)> = Vec::new();
                for _ in 0..items {
                    let suffix = format!("s{}", next(suffixes));
                    let val = match next(5) {
                        0 => None,
                        1 => Some(Val::Text(ShortText::new(
                            &"T".repeat(1 + next(30) as usize),
                        ))),
                        _ => Some(Val::Num(Decimal::from(next(1000)))),
                    };
                    vals.retain(|(s, _)| *s != suffix);
                    if let Some(val) = &val {
                        vals.push((suffix.clone(), val.clone()));
                    }
                    v.put(start, ShortText::new(&suffix), val);
                }
                let is_object = next(6) != 0;
                model.remove(&code);
                if is_object {
                    model.insert(code.clone(), vals);
                }
                v.end_factor(ShortText::new(&code), start, is_object);
            }
            v.sort();
            let got: Vec<(String, Vec<(String, Val)>)> = v
                .iter()
                .map(|f| {
                    let vals = f.iter().map(|(s, x)| (s.to_owned(), x.clone())).collect();
                    (f.code().to_owned(), vals)
                })
                .collect();
            let want: Vec<(String, Vec<(String, Val)>)> = model.into_iter().collect();
            assert_eq!(got, want, "case {case}");
            for (code, vals) in &want {
                let f = v.get(code).expect("every factor is found");
                for (s, x) in vals {
                    assert_eq!(f.get(s), Some(x), "case {case} {code} {s}");
                }
            }
            assert!(v.get("c").is_none() && v.get("d").is_none());
        }
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
