//! Reading the few fields an observation needs straight out of a stored frame
//! document, without building a `serde_json::Value` of all of it.
//!
//! The detector reads every accepted inbound frame's document; going through a
//! `Value` allocated a map for the whole document (params, findings, every key)
//! only to copy five fields out of it. Here one pass keeps `mn`, `cn`,
//! `data_time`, `rf` and `values` and skips everything else in place. Keys,
//! suffixes and flags are read as borrowed text into inline [`ShortText`]s,
//! numbers from their raw text, and values are built in place into [`Values`]
//! (no `String` per key or number, no map nodes): a typical document costs `mn`,
//! `cn` and the two vectors of the values. The findings text gets the same
//! treatment ([`finding_codes`]).
//!
//! The result is the one the `Value` path gave for *any* input (the tests compare
//! both): a field of the wrong type reads as absent, a factor that is not an object
//! or a value that is neither a number nor a string is left out, and of repeated
//! keys the last one counts (as in a `Value` map), for repeated factors and for
//! repeated suffixes within a factor too.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use rust_decimal::Decimal;
use serde::de::{
    Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::value::RawValue;

use crate::protocol::cp::ValueKind;
use crate::protocol::{Frame, json};

use super::Val;
use super::values::{ShortText, Values};

/// The fields of a frame document the engine uses.
#[derive(Debug, Default)]
pub(super) struct DocFields {
    pub(super) mn: Option<String>,
    pub(super) cn: Option<String>,
    /// `data_time` as UTC unix ms (absent if it is not RFC 3339 text).
    pub(super) data_time_ms: Option<i64>,
    pub(super) rf: bool,
    pub(super) values: Values,
}

impl DocFields {
    /// What [`DocFields::parse`] reads from the document that
    /// `protocol::json::rebuild_frame_doc(raw, data_time, findings)` writes, for
    /// a frame decoded as that rebuild decodes it
    /// ([`json::decode_for_rebuild`]) and a findings column it rewrites
    /// ([`json::findings_rewritten`]; the findings are no field of these): the
    /// same fields without writing the document's text and reading it back. The
    /// values walk the document's own layout ([`json::visit_values`]); each
    /// value is read as the document's JSON would be (a test holds both paths
    /// to the same fields). `None` for the rare frame whose factor code or
    /// suffix is spelled as serde_json's private number key, which the text
    /// reading treats specially: its caller reads the document instead.
    pub(super) fn of_rebuilt(f: &Frame, data_time: Option<&str>) -> Option<DocFields> {
        let mut values = Values::default();
        let mut walk = FrameValues {
            values: &mut values,
            start: 0,
            code: ShortText::new(""),
            odd: false,
            loose: String::new(),
        };
        json::visit_values(f, &mut walk);
        if walk.odd {
            return None;
        }
        values.sort();
        Some(DocFields {
            mn: f.mn().map(str::to_owned),
            cn: f.cn().map(str::to_owned),
            data_time_ms: data_time.and_then(rfc3339_ms),
            rf: f.rf(),
            values,
        })
    }

    /// `None` if `doc` is not a JSON object.
    pub(super) fn parse(doc: &str) -> Option<DocFields> {
        let mut de = serde_json::Deserializer::from_str(doc);
        let mut out = DocFields::default();
        let is_object = ObjectSeed(&mut out).deserialize(&mut de).ok()?;
        de.end().ok()?;
        out.values.sort();
        is_object.then_some(out)
    }
}

/// With `arbitrary_precision`, serde_json hands a number to a visitor as a
/// one-entry map under a private key, with the number's text as the value (that
/// is how the device's exact digits survive). The key is learned from serde_json
/// itself rather than spelled here.
fn number_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        struct Probe;
        impl<'de> Visitor<'de> for Probe {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
                let key: Option<String> = map.next_key()?;
                let _: IgnoredAny = map.next_value()?;
                Ok(key.unwrap_or_default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<String, E> {
                Ok(String::new())
            }
        }
        // A fraction: integers that fit 64 bits are visited as integers.
        let mut de = serde_json::Deserializer::from_str("0.5");
        de.deserialize_any(Probe).unwrap_or_default()
    })
}

/// An object key, read from the borrowed text (serde's `String` or `Cow` would
/// allocate one per key).
enum Key {
    /// The private key of a number's map.
    Number,
    Text(ShortText),
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(if v == number_key() {
                    Key::Number
                } else {
                    Key::Text(ShortText::new(v))
                })
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// A number's text as a decimal (`None` if `Decimal` cannot hold it).
struct NumText(Option<Decimal>);

impl<'de> Deserialize<'de> for NumText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<NumText, D::Error> {
        struct NumVisitor;
        impl Visitor<'_> for NumVisitor {
            type Value = NumText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number's text")
            }
            // arbitrary_precision: the number's text is the device's digits.
            fn visit_str<E>(self, n: &str) -> Result<NumText, E> {
                Ok(NumText(
                    Decimal::from_str(n)
                        .or_else(|_| Decimal::from_scientific(n))
                        .ok(),
                ))
            }
        }
        d.deserialize_str(NumVisitor)
    }
}

/// What a JSON value is, as far as this module cares.
enum Leaf {
    Str(ShortText),
    Bool(bool),
    /// A number (`None` if `Decimal` cannot hold it). Integers that fit 64 bits
    /// are visited as integers even with `arbitrary_precision` (their text is the
    /// canonical one); other numbers come as text.
    Num(Option<Decimal>),
    /// Anything else (not kept).
    Other,
}

struct LeafVisitor;

impl<'de> Visitor<'de> for LeafVisitor {
    type Value = Leaf;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<Leaf, E> {
        Ok(Leaf::Str(ShortText::new(v)))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Leaf, E> {
        Ok(Leaf::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Leaf, E> {
        Ok(Leaf::Num(Some(Decimal::from(v))))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Leaf, E> {
        Ok(Leaf::Num(Some(Decimal::from(v))))
    }
    // Fractions come as text (arbitrary_precision); an f64 has lost the digits.
    fn visit_f64<E>(self, _: f64) -> Result<Leaf, E> {
        Ok(Leaf::Other)
    }
    fn visit_unit<E>(self) -> Result<Leaf, E> {
        Ok(Leaf::Other)
    }
    fn visit_none<E>(self) -> Result<Leaf, E> {
        Ok(Leaf::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Leaf, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Leaf::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Leaf, A::Error> {
        match map.next_key::<Key>()? {
            None => Ok(Leaf::Other),
            Some(Key::Number) => Ok(Leaf::Num(map.next_value::<NumText>()?.0)),
            Some(Key::Text(_)) => {
                let _: IgnoredAny = map.next_value()?;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Leaf::Other)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Leaf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Leaf, D::Error> {
        d.deserialize_any(LeafVisitor)
    }
}

/// A string value through `F`; any other value is skipped and reads as `None`.
struct StrSeed<F>(F);

impl<'de, T, F: FnOnce(&str) -> T> DeserializeSeed<'de> for StrSeed<F> {
    type Value = Option<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T, F: FnOnce(&str) -> T> Visitor<'de> for StrSeed<F> {
    type Value = Option<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E>(self, v: &str) -> Result<Option<T>, E> {
        Ok(Some((self.0)(v)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<T>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_none<E>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
}

/// The entries of an object, one at a time.
trait Fields {
    /// The entry `key`; `map` is positioned at its value, which must be consumed.
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        key: ShortText,
        map: &mut A,
    ) -> Result<(), A::Error>;
}

/// Visits an object's entries with `F` and reads `true`; any other value (a
/// number's private map included) is skipped and reads `false`.
struct ObjectSeed<F>(F);

impl<'de, F: Fields> DeserializeSeed<'de> for ObjectSeed<F> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: Fields> Visitor<'de> for ObjectSeed<F> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<bool, A::Error> {
        let first = match map.next_key::<Key>()? {
            None => return Ok(true),
            Some(Key::Number) => {
                let _: IgnoredAny = map.next_value()?;
                return Ok(false);
            }
            Some(Key::Text(k)) => k,
        };
        self.0.field(first, &mut map)?;
        while let Some(k) = map.next_key::<Key>()? {
            // Only a first key makes a number; later it is an ordinary key.
            let k = match k {
                Key::Text(k) => k,
                Key::Number => ShortText::new(number_key()),
            };
            self.0.field(k, &mut map)?;
        }
        Ok(true)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_none<E>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// suffix -> value of the factor being read, begun at `start`.
struct FactorFields<'a> {
    values: &'a mut Values,
    start: usize,
}

impl Fields for FactorFields<'_> {
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        suffix: ShortText,
        map: &mut A,
    ) -> Result<(), A::Error> {
        let raw: &'de RawValue = map.next_value()?;
        let val = match raw_leaf(raw.get()).map_err(serde::de::Error::custom)? {
            Leaf::Num(d) => d.map(Val::Num),
            Leaf::Str(s) => Some(Val::Text(s)),
            Leaf::Bool(_) | Leaf::Other => None,
        };
        self.values.put(self.start, suffix, val);
        Ok(())
    }
}

/// A value from its JSON text. serde_json with `arbitrary_precision` allocates a
/// `String` for every number it visits; taken as raw text (borrowed from the
/// document), the common values, numbers and strings without escapes, are read
/// here without one. Anything else goes through [`LeafVisitor`].
fn raw_leaf(raw: &str) -> Result<Leaf, serde_json::Error> {
    match raw.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => Ok(Leaf::Num(number(raw))),
        Some(b'"') if raw.len() >= 2 && !raw.contains('\\') => {
            Ok(Leaf::Str(ShortText::new(&raw[1..raw.len() - 1])))
        }
        _ => serde_json::from_str(raw),
    }
}

/// A JSON number's text as serde_json (`arbitrary_precision`) hands it to
/// [`LeafVisitor`]: integers that fit `u64` (non-negative) or `i64` (negative,
/// but not `-0`) as integers, everything else as text.
fn number(t: &str) -> Option<Decimal> {
    if !t.starts_with('-') {
        if let Ok(u) = t.parse::<u64>() {
            return Some(Decimal::from(u));
        }
    } else if t != "-0" {
        if let Ok(i) = t.parse::<i64>() {
            return Some(Decimal::from(i));
        }
    }
    Decimal::from_str(t)
        .or_else(|_| Decimal::from_scientific(t))
        .ok()
}

/// factor -> suffix -> value.
struct ValuesFields<'a>(&'a mut Values);

impl Fields for ValuesFields<'_> {
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        code: ShortText,
        map: &mut A,
    ) -> Result<(), A::Error> {
        let start = self.0.begin_factor();
        let is_object = map.next_value_seed(ObjectSeed(FactorFields {
            values: self.0,
            start,
        }))?;
        self.0.end_factor(code, start, is_object);
        Ok(())
    }
}

/// [`json::visit_values`] building [`Values`] as [`ValuesFields`] builds them
/// from the document's text.
struct FrameValues<'a> {
    values: &'a mut Values,
    start: usize,
    code: ShortText,
    /// A code or suffix is spelled as serde_json's private number key, which
    /// the text reading treats specially (see [`number_key`]).
    odd: bool,
    /// Scratch for a loose number's normalised text.
    loose: String,
}

impl json::ValuesVisitor for FrameValues<'_> {
    fn factor(&mut self, code: &str) {
        self.odd |= code == number_key();
        self.start = self.values.begin_factor();
        self.code = ShortText::new(code);
    }

    fn value(&mut self, suffix: &str, kind: ValueKind, text: &str) {
        self.odd |= suffix == number_key();
        // As `raw_leaf` reads what the document writes for each kind.
        let val = match kind {
            ValueKind::Number => number(text).map(Val::Num),
            ValueKind::LooseNumber => {
                self.loose.clear();
                json::normalise_number(&mut self.loose, text);
                number(&self.loose).map(Val::Num)
            }
            ValueKind::Text => Some(Val::Text(ShortText::new(text))),
        };
        self.values.put(self.start, ShortText::new(suffix), val);
    }

    fn end_factor(&mut self) {
        let code = std::mem::replace(&mut self.code, ShortText::new(""));
        self.values.end_factor(code, self.start, true);
    }
}

/// The `code`s of a findings array text, as the `Value` path read them: an
/// element that is not an object, or whose (last) `code` is not a string, is left
/// out; anything but an array reads as none. Read in place: a frame with a finding
/// on every record (a simulated MN is not hex) paid for a `Value` of the whole
/// array and a deep copy of it.
pub(super) fn finding_codes(findings: &str) -> Vec<String> {
    // Most frames have none.
    if findings == "[]" {
        return Vec::new();
    }
    let mut de = serde_json::Deserializer::from_str(findings);
    match de.deserialize_any(CodesVisitor) {
        Ok(codes) if de.end().is_ok() => codes,
        _ => Vec::new(),
    }
}

struct CodesVisitor;

impl<'de> Visitor<'de> for CodesVisitor {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of findings")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut codes = Vec::new();
        loop {
            let mut code = Code(None);
            match seq.next_element_seed(ObjectSeed(&mut code))? {
                None => return Ok(codes),
                Some(_) => codes.extend(code.0),
            }
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Vec::new())
    }
    fn visit_str<E>(self, _: &str) -> Result<Vec<String>, E> {
        Ok(Vec::new())
    }
    fn visit_bool<E>(self, _: bool) -> Result<Vec<String>, E> {
        Ok(Vec::new())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Vec<String>, E> {
        Ok(Vec::new())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Vec<String>, E> {
        Ok(Vec::new())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Vec<String>, E> {
        Ok(Vec::new())
    }
    fn visit_unit<E>(self) -> Result<Vec<String>, E> {
        Ok(Vec::new())
    }
}

/// The `code` of one finding.
struct Code(Option<String>);

impl Fields for &mut Code {
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        key: ShortText,
        map: &mut A,
    ) -> Result<(), A::Error> {
        if key.is("code") {
            self.0 = map.next_value_seed(StrSeed(str::to_owned))?;
        } else {
            let _: IgnoredAny = map.next_value()?;
        }
        Ok(())
    }
}

fn rfc3339_ms(t: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.timestamp_millis())
}

impl Fields for &mut DocFields {
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        key: ShortText,
        map: &mut A,
    ) -> Result<(), A::Error> {
        match key.as_bytes() {
            b"mn" => self.mn = map.next_value_seed(StrSeed(str::to_owned))?,
            b"cn" => self.cn = map.next_value_seed(StrSeed(str::to_owned))?,
            b"data_time" => {
                self.data_time_ms = map.next_value_seed(StrSeed(rfc3339_ms))?.flatten();
            }
            b"rf" => self.rf = matches!(map.next_value()?, Leaf::Bool(true)),
            b"values" => {
                // The last of repeated `values` counts; one that is not an object
                // reads as empty.
                self.values.clear();
                let _ = map.next_value_seed(ObjectSeed(ValuesFields(&mut self.values)))?;
            }
            _ => {
                let _: IgnoredAny = map.next_value()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::super::Obs;
    use super::*;
    use crate::protocol::{self, Options, json};

    /// An observation with its values as a map of maps: what the `Value` path
    /// built, and what [`Values`] must read as.
    #[derive(Debug)]
    #[allow(dead_code, reason = "compared through its Debug text")]
    struct Plain {
        seq: u64,
        received_ms: i64,
        mn: String,
        cn: String,
        data_time_ms: Option<i64>,
        rf: bool,
        duplicate: bool,
        findings: Vec<String>,
        values: BTreeMap<String, BTreeMap<String, Val>>,
        video: bool,
    }

    /// `o` as [`Plain`], after checking what a map would guarantee: factors in
    /// code order (the engine's visiting order), each code and each suffix of a
    /// factor once.
    fn plain(o: Obs) -> Plain {
        let codes: Vec<&str> = o.values.iter().map(|f| f.code()).collect();
        assert!(codes.windows(2).all(|w| w[0] < w[1]), "{codes:?}");
        let values: BTreeMap<String, BTreeMap<String, Val>> = o
            .values
            .iter()
            .map(|f| {
                let m: BTreeMap<String, Val> =
                    f.iter().map(|(s, v)| (s.to_owned(), v.clone())).collect();
                assert_eq!(m.len(), f.len(), "repeated suffix in {f:?}");
                (f.code().to_owned(), m)
            })
            .collect();
        Plain {
            seq: o.seq,
            received_ms: o.received_ms,
            mn: o.mn,
            cn: o.cn,
            data_time_ms: o.data_time_ms,
            rf: o.rf,
            duplicate: o.duplicate,
            findings: o.findings,
            values,
            video: o.video,
        }
    }

    /// The path this module replaces: the whole document as a `Value`.
    fn via_value(
        seq: u64,
        received_ms: i64,
        doc: &str,
        findings: &str,
        duplicate: bool,
        video: bool,
    ) -> Option<Plain> {
        let doc: serde_json::Value = serde_json::from_str(doc).ok()?;
        let text = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let mn = text("mn").filter(|m| !m.is_empty())?;
        let mut values = BTreeMap::new();
        if let Some(map) = doc.get("values").and_then(|v| v.as_object()) {
            for (factor, sufs) in map {
                let Some(sufs) = sufs.as_object() else {
                    continue;
                };
                let mut out = BTreeMap::new();
                for (suffix, v) in sufs {
                    let val = match v {
                        serde_json::Value::Number(n) => match Decimal::from_str(n.as_str())
                            .or_else(|_| Decimal::from_scientific(n.as_str()))
                        {
                            Ok(d) => Val::Num(d),
                            Err(_) => continue,
                        },
                        serde_json::Value::String(s) => Val::Text(ShortText::new(s)),
                        _ => continue,
                    };
                    out.insert(suffix.clone(), val);
                }
                values.insert(factor.clone(), out);
            }
        }
        let findings = serde_json::from_str::<serde_json::Value>(findings)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|f| f.get("code").and_then(|c| c.as_str()).map(str::to_owned))
            .collect();
        let data_time_ms = text("data_time")
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.timestamp_millis());
        Some(Plain {
            seq,
            received_ms,
            mn,
            cn: text("cn").unwrap_or_default(),
            data_time_ms,
            rf: doc.get("rf").and_then(|v| v.as_bool()).unwrap_or(false),
            duplicate,
            findings,
            values,
            video,
        })
    }

    fn same(doc: &str, findings: &str) {
        let new = Obs::from_doc(7, 1_780_000_000_000, doc, findings, false, false).map(plain);
        let old = via_value(7, 1_780_000_000_000, doc, findings, false, false);
        // Debug text, not `==`: decimals compare equal across scales (1.5 == 1.50),
        // and the device's digits are what must survive.
        assert_eq!(format!("{new:?}"), format!("{old:?}"), "doc {doc}");
    }

    #[test]
    fn stored_documents_of_every_fixture_frame_read_as_through_value() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-06-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let mut with_values = 0;
        let mut with_findings = 0;
        for frame in protocol::fixture_frames() {
            let f = protocol::decode(Bytes::from(frame), &Options::new(now), &());
            let doc = json::frame_doc(&f);
            let findings = serde_json::to_string(&f.findings).unwrap();
            same(&doc, &findings);
            let o = Obs::from_doc(1, 0, &doc, &findings, false, false);
            let numbers = o.as_ref().map_or(0, |o| {
                o.values
                    .iter()
                    .flat_map(|f| f.iter())
                    .filter(|(_, v)| matches!(v, Val::Num(_)))
                    .count()
            });
            with_values += (numbers > 0) as u32;
            with_findings += o.as_ref().is_some_and(|o| !o.findings.is_empty()) as u32;
        }
        assert!(with_values > 100, "{with_values}");
        assert!(with_findings > 10, "{with_findings}");
    }

    #[test]
    fn odd_documents_read_as_through_value() {
        for doc in [
            r#"{"mn":"M1","cn":"2011","rf":true,"data_time":"2026-01-01T00:00:00+08:00","values":{"a":{"Rtd":1.50,"Flag":"N"}}}"#,
            // Repeated keys: the last counts, also when it is unusable.
            r#"{"mn":"M0","mn":"M1","values":{"a":{"Rtd":1,"Rtd":2},"b":{"Rtd":1},"b":3}}"#,
            r#"{"mn":"M1","values":{"a":{"Rtd":1,"Rtd":null},"c":{"Rtd":"x","Rtd":4}}}"#,
            r#"{"mn":"M1","values":{"a":{}},"values":{"z":{"Avg":1e3,"Max":-2.5E-2}}}"#,
            // Integers (visited as such), negative zero, beyond 64 bits, beyond Decimal.
            r#"{"mn":"M1","values":{"a":{"Rtd":0,"Avg":-0,"Min":-7,"Max":18446744073709551615,"Cou":18446744073709551616}}}"#,
            r#"{"mn":"M1","values":{"a":{"Rtd":-9223372036854775808,"Avg":-9223372036854775809,"Max":1e40,"Min":99999999999999999999999999999999}}}"#,
            // Wrong types read as absent.
            r#"{"mn":"M1","cn":2011,"rf":"true","data_time":5,"values":[1,2]}"#,
            r#"{"mn":"M1","values":{"a":[1],"b":"x","c":1.5,"d":true,"e":null,"f":{"x":{"y":1}}}}"#,
            r#"{"mn":"M1","values":{"a":{"Rtd":[1],"Flag":{"N":1},"Avg":true,"Min":123456789012345678901234567890123}}}"#,
            r#"{"mn":"M1","values":5}"#,
            r#"{"mn":"M1","values":"x"}"#,
            r#"{"mn":"M1","rf":1}"#,
            // Repeated factors and suffixes anywhere: the last counts, in its place
            // in code order.
            r#"{"mn":"M1","values":{"b":{"Rtd":1,"Flag":"N","Rtd":2},"a":{"Rtd":3},"b":{"Avg":4,"Flag":"D"},"c":{}}}"#,
            r#"{"mn":"M1","values":{"c":{"Rtd":1},"a":{"Rtd":2,"Flag":"N"},"b":{"Rtd":3},"a":5,"d":{"Flag":"N","Flag":7}}}"#,
            r#"{"mn":"M1","values":{"a":{"Rtd":1},"a":{},"a":{"Flag":"N"},"b":{"Rtd":2},"b":[1]}}"#,
            r#"{"mn":"M1","values":{"a":{"Rtd":1}},"values":[],"cn":"2011"}"#,
            // Codes, suffixes and texts longer than kept inline.
            r#"{"mn":"M1","values":{"a_non_standard_factor_code_x":{"SampleTime_or_some_longer_suffix":"a text longer than twenty-two bytes","Rtd":1.5},"a":{"Info":"0123456789012345678901","EFlag":"01234567890123456789012"}}}"#,
            // The private key of serde_json's number map, as an ordinary key and first.
            r#"{"mn":"M1","values":{"a":{"Rtd":1,"$serde_json::private::Number":"2"},"b":{"$serde_json::private::Number":"1.5"}}}"#,
            // Escapes in keys and values.
            r#"{"m\u006e":"M\u00e9","values":{"a\"b":{"R\u0074d":"\u4e2d"}}}"#,
            // Unused fields of any shape are skipped.
            r#"{"params":{"x":[{"y":[1,2,{"z":null}]}]},"mn":"M1","findings":[{"code":"x"}]}"#,
            // No or empty MN, not an object, not JSON.
            r#"{"mn":"","values":{}}"#,
            r#"{"cn":"2011"}"#,
            r#"{"mn":null}"#,
            r#"[1,2]"#,
            r#""mn""#,
            r#"12.5"#,
            r#"{"mn":"M1"} trailing"#,
            r#"{"mn":"M1""#,
            "",
        ] {
            same(doc, "[]");
        }
        for findings in [
            "[]",
            r#"[{"code":"time.future"},{"code":"crc.bad","code":"x"},{"code":1},3]"#,
            r#"{"code":"x"}"#,
            r#"[{"code":"a","code":null},[{"code":"b"}],{"x":{"code":"c"}},{"detail":"d","code":"d"},null,"e",1.5,true,{}]"#,
            r#"[{"$serde_json::private::Number":"1"},{"code":"f","$serde_json::private::Number":"1"},{"code":"\u0067"}]"#,
            r#"[{"code":"a"}] x"#,
            r#" [ {"code" : "a"} ] "#,
            "[",
            "not json",
            "",
        ] {
            same(r#"{"mn":"M1"}"#, findings);
        }
    }

    /// `raw` received now as an accepted inbound frame, as the file holds it:
    /// without its document when the log keeps none.
    fn as_read_back(raw: &[u8]) -> crate::store::StoredRecord {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-07T04:00:00Z")
            .unwrap()
            .to_utc();
        let f = protocol::decode(Bytes::copy_from_slice(raw), &Options::new(now), &());
        let rec = crate::ingest::frame_record(
            &f,
            "10.0.0.1:1",
            1,
            crate::store::Direction::In,
            now.timestamp_millis(),
            true,
        );
        crate::store::StoredRecord::committed(
            rec,
            crate::store::Appended {
                seq: 7,
                duplicate: false,
            },
            [0; 32],
        )
        .as_read_back()
    }

    /// A segment in a frame with the right length and CRC.
    fn framed(segment: &[u8]) -> Vec<u8> {
        protocol::reply::envelope(segment).to_vec()
    }

    /// `Obs::from_record` on a frame read back without its document takes the
    /// frame's fields from a decode ([`DocFields::of_rebuilt`]) instead of
    /// rebuilding the document and reading it: the observation must be the one
    /// the rebuilt document gives, for every fixture frame, for values the
    /// fixtures lack, and for generated CP areas of every kind of value.
    #[test]
    fn frames_read_back_observe_as_their_rebuilt_documents() {
        let head = "QN=20261207120000001;ST=22;CN=2011;PW=123456;MN=010000A8900016F000169DC0;Flag=4;CP=&&DataTime=20261207115959;";
        let mut frames: Vec<Vec<u8>> = protocol::fixture_frames();
        let odd: &[&[u8]] = &[
            // Loose numbers, exponents, repeated suffixes and codes, numbers no
            // decimal holds, negative zeros, texts with JSON escapes.
            b"a01012-Rtd=+007.50,a01012-Flag=N;a01011-Rtd=1e3,a01012-Rtd=12.0,a01012-Flag=D;a34013-Rtd=99999999999999999999999999999999999,a34013-Rtd=5;w01018-Info=a\"b\\c\td;a21026-Rtd=-0,a21026-Min=-0.00,a21026-Max=.5,a21026-Avg=-.5,a21026-Cou=1.",
            b"a34013-Avg=5,a34013-Avg=99999999999999999999999999999999999;a01012-Avg=00012;a01012-Avg=",
            // Codes and suffixes that differ only in invalid UTF-8: one key in the
            // document, so the last factor counts.
            b"a\xff-Rtd=1,a\xfe-Rtd=2;b-R\xfftd=3,b-R\xfetd=4;c\xc3-Rtd=5",
            // serde_json's private number key as a code and as a suffix.
            b"$serde_json::private::Number-Rtd=1;a-Rtd=2",
            b"a-$serde_json::private::Number=1,a-Rtd=2",
            // Long codes, suffixes and texts (off the inline storage).
            b"a_non_standard_factor_code_x-SampleTime_or_some_longer_suffix=a text longer than twenty-two bytes;a-Info=0123456789012345678901234",
        ];
        for cp in odd {
            let mut seg = head.as_bytes().to_vec();
            seg.extend_from_slice(cp);
            seg.extend_from_slice(b"&&");
            frames.push(framed(&seg));
        }
        // Generated CP areas: codes, suffixes and values from small alphabets
        // that collide often.
        let mut rng = 0x2026_1207_u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let codes: &[&[u8]] = &[
            b"a01012", b"a34013", b"w01018", b"a\xff", b"a\xfe", b"a01012",
        ];
        let suffixes: &[&[u8]] = &[
            b"Rtd",
            b"Flag",
            b"Avg",
            b"Min",
            b"Max",
            b"Cou",
            b"SampleTime",
        ];
        let values: &[&[u8]] = &[
            b"12.50",
            b"+1",
            b"007",
            b".5",
            b"1.",
            b"-0",
            b"-0.0",
            b"1e3",
            b"1E-2",
            b"N",
            b"D",
            b"20261207115959",
            b"x\"y",
            b"q\"",
            b"\\",
            b"",
            b"99999999999999999999999999999999",
            b"-7",
            b"18446744073709551616",
            b"\xe4\xb8\xad",
        ];
        for _ in 0..2000 {
            let mut seg = head.as_bytes().to_vec();
            for g in 0..1 + next(4) {
                if g > 0 {
                    seg.push(b';');
                }
                for k in 0..1 + next(4) {
                    if k > 0 {
                        seg.push(b',');
                    }
                    seg.extend_from_slice(codes[next(codes.len() as u64) as usize]);
                    seg.push(b'-');
                    seg.extend_from_slice(suffixes[next(suffixes.len() as u64) as usize]);
                    seg.push(b'=');
                    seg.extend_from_slice(values[next(values.len() as u64) as usize]);
                }
            }
            seg.extend_from_slice(b"&&");
            frames.push(framed(&seg));
        }
        let mut decoded = 0;
        for raw in &frames {
            let r = as_read_back(raw);
            let by_doc = Obs::from_doc(
                r.seq,
                r.received_at_ms,
                &r.document(),
                &r.findings,
                false,
                false,
            );
            let by_frame = Obs::from_record(&r, false);
            assert_eq!(
                format!("{:?}", by_frame.map(plain)),
                format!("{:?}", by_doc.map(plain)),
                "{}",
                String::from_utf8_lossy(raw)
            );
            if r.document_rebuilt()
                && DocFields::of_rebuilt(&json::decode_for_rebuild(&r.raw), None).is_some()
            {
                decoded += 1;
            }
        }
        assert!(
            decoded > 1900,
            "only {decoded} frames took the decoded path"
        );
    }
}
