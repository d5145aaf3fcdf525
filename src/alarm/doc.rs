//! Reading the few fields an observation needs straight out of a stored frame
//! document, without building a `serde_json::Value` of all of it.
//!
//! The detector reads every accepted inbound frame's document; going through a
//! `Value` allocated a map for the whole document (params, findings, every key)
//! only to copy five fields out of it. Here one pass keeps `mn`, `cn`,
//! `data_time`, `rf` and `values` and skips everything else in place.
//!
//! The result is the one the `Value` path gave for *any* input (the tests compare
//! both): a field of the wrong type reads as absent, a factor that is not an object
//! or a value that is neither a number nor a string is left out, and of repeated
//! keys the last one counts (as in a `Value` map).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use rust_decimal::Decimal;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Val;

/// The fields of a frame document the engine uses.
#[derive(Debug, Default)]
pub(super) struct DocFields {
    pub(super) mn: Option<String>,
    pub(super) cn: Option<String>,
    pub(super) data_time: Option<String>,
    pub(super) rf: bool,
    pub(super) values: BTreeMap<String, BTreeMap<String, Val>>,
}

impl DocFields {
    /// `None` if `doc` is not a JSON object.
    pub(super) fn parse(doc: &str) -> Option<DocFields> {
        serde_json::from_str::<DocFields>(doc).ok()
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

/// What a JSON value is, as far as this module cares.
enum Leaf {
    Str(String),
    Bool(bool),
    /// A number's text.
    Num(String),
    /// An integer that fits 64 bits (serde_json visits those as integers even with
    /// `arbitrary_precision`; their text is the canonical one).
    Int(Decimal),
    /// An object other than a number (not kept).
    Object,
    Other,
}

struct LeafVisitor;

impl<'de> Visitor<'de> for LeafVisitor {
    type Value = Leaf;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<Leaf, E> {
        Ok(Leaf::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Leaf, E> {
        Ok(Leaf::Str(v))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Leaf, E> {
        Ok(Leaf::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Leaf, E> {
        Ok(Leaf::Int(Decimal::from(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Leaf, E> {
        Ok(Leaf::Int(Decimal::from(v)))
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
        let Some(first) = map.next_key::<Cow<'de, str>>()? else {
            return Ok(Leaf::Object);
        };
        if first == number_key() {
            let text: Cow<'de, str> = map.next_value()?;
            return Ok(Leaf::Num(text.into_owned()));
        }
        let _: IgnoredAny = map.next_value()?;
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Leaf::Object)
    }
}

impl<'de> Deserialize<'de> for Leaf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Leaf, D::Error> {
        d.deserialize_any(LeafVisitor)
    }
}

/// An object's entries through `each`, or `None` for anything that is not an
/// object (a number's private map included).
fn object<'de, A, F>(mut map: A, mut each: F) -> Result<bool, A::Error>
where
    A: MapAccess<'de>,
    F: FnMut(Cow<'de, str>, &mut A) -> Result<(), A::Error>,
{
    let Some(first) = map.next_key::<Cow<'de, str>>()? else {
        return Ok(true);
    };
    if first == number_key() {
        let _: IgnoredAny = map.next_value()?;
        return Ok(false);
    }
    each(first, &mut map)?;
    while let Some(k) = map.next_key::<Cow<'de, str>>()? {
        each(k, &mut map)?;
    }
    Ok(true)
}

/// Visits an object with `each`; any other value is skipped and reads as `None`.
macro_rules! object_or_none {
    ($name:ident, $out:ty, $expect:literal, |$k:ident, $map:ident, $acc:ident| $body:block) => {
        struct $name;
        impl<'de> Visitor<'de> for $name {
            type Value = Option<$out>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str($expect)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let mut $acc = <$out>::default();
                let is_object = object(map, |$k, $map| $body)?;
                Ok(is_object.then_some($acc))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(None)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
        }
    };
}

// suffix -> value of one factor.
object_or_none!(
    FactorVisitor,
    BTreeMap<String, Val>,
    "a factor's values",
    |suffix, map, out| {
        let val = match map.next_value::<Leaf>()? {
            // arbitrary_precision: the number's text is the device's digits.
            Leaf::Num(n) => Decimal::from_str(&n)
                .or_else(|_| Decimal::from_scientific(&n))
                .ok()
                .map(Val::Num),
            Leaf::Int(d) => Some(Val::Num(d)),
            Leaf::Str(s) => Some(Val::Text(s)),
            _ => None,
        };
        match val {
            Some(v) => {
                out.insert(suffix.into_owned(), v);
            }
            // The last of repeated keys counts, even when it is unusable.
            None => {
                out.remove(suffix.as_ref());
            }
        }
        Ok(())
    }
);

/// `Option<factor map>` through [`FactorVisitor`].
struct Factor(Option<BTreeMap<String, Val>>);

impl<'de> Deserialize<'de> for Factor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Factor, D::Error> {
        d.deserialize_any(FactorVisitor).map(Factor)
    }
}

// factor -> suffix -> value.
object_or_none!(
    ValuesVisitor,
    BTreeMap<String, BTreeMap<String, Val>>,
    "the values object",
    |factor, map, out| {
        match map.next_value::<Factor>()?.0 {
            Some(f) => {
                out.insert(factor.into_owned(), f);
            }
            None => {
                out.remove(factor.as_ref());
            }
        }
        Ok(())
    }
);

struct Values(Option<BTreeMap<String, BTreeMap<String, Val>>>);

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Values, D::Error> {
        d.deserialize_any(ValuesVisitor).map(Values)
    }
}

struct DocVisitor;

impl<'de> Visitor<'de> for DocVisitor {
    type Value = DocFields;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a frame document object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DocFields, A::Error> {
        let mut doc = DocFields::default();
        let text = |leaf: Leaf| match leaf {
            Leaf::Str(s) => Some(s),
            _ => None,
        };
        let is_object = object(map, |key, map| {
            match key.as_ref() {
                "mn" => doc.mn = text(map.next_value()?),
                "cn" => doc.cn = text(map.next_value()?),
                "data_time" => doc.data_time = text(map.next_value()?),
                "rf" => doc.rf = matches!(map.next_value()?, Leaf::Bool(true)),
                "values" => doc.values = map.next_value::<Values>()?.0.unwrap_or_default(),
                _ => {
                    let _: IgnoredAny = map.next_value()?;
                }
            }
            Ok(())
        })?;
        if is_object {
            Ok(doc)
        } else {
            Err(serde::de::Error::custom("a number, not a document"))
        }
    }
}

impl<'de> Deserialize<'de> for DocFields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<DocFields, D::Error> {
        d.deserialize_map(DocVisitor)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::Obs;
    use super::*;
    use crate::protocol::{self, Options, json};

    /// The path this module replaces: the whole document as a `Value`.
    fn via_value(
        seq: u64,
        received_ms: i64,
        doc: &str,
        findings: &str,
        duplicate: bool,
        video: bool,
    ) -> Option<Obs> {
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
                        serde_json::Value::String(s) => Val::Text(s.clone()),
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
        Some(Obs {
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
        let new = Obs::from_doc(7, 1_780_000_000_000, doc, findings, false, false);
        let old = via_value(7, 1_780_000_000_000, doc, findings, false, false);
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
                    .values()
                    .flat_map(|m| m.values())
                    .filter(|v| matches!(v, Val::Num(_)))
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
            "not json",
            "",
        ] {
            same(r#"{"mn":"M1"}"#, findings);
        }
    }
}
