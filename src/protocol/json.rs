//! The frame JSON schema `hj212.frame.v1`, shared by `decode --json`,
//! `export --format jsonl` and the MQTT payloads.
//!
//! Numbers keep the device's digits (`12.50` stays `12.50`): serde_json is
//! built with `arbitrary_precision`, and values are never routed through f64.

use std::str::FromStr;

use base64::Engine;
use serde_json::{Map, Number, Value, json};

use super::cp::ValueKind;
use super::crc;
use super::frame::Frame;
use super::time;

/// Schema identifier carried by every object.
pub const SCHEMA: &str = "hj212.frame.v1";

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

fn number(text: &str) -> Option<Value> {
    Number::from_str(text).ok().map(Value::Number)
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
    let mut values: Map<String, Value> = Map::new();
    let mut params: Map<String, Value> = Map::new();
    for p in &f.pairs {
        let text = f.text(p.value);
        match (p.code, p.suffix) {
            (Some(c), Some(s)) => {
                let v = match p.kind {
                    ValueKind::Number => number(&text),
                    ValueKind::LooseNumber => number(&normalise(&text)),
                    ValueKind::Text => None,
                }
                .unwrap_or_else(|| Value::String(text.into_owned()));
                let entry = values
                    .entry(f.text(c).into_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = entry {
                    m.insert(f.text(s).into_owned(), v);
                }
            }
            _ => {
                params.insert(f.text(p.key).into_owned(), Value::String(text.into_owned()));
            }
        }
    }
    let s = |o: Option<&str>| o.map_or(Value::Null, |v| Value::String(v.to_owned()));
    let findings: Vec<Value> = f
        .findings
        .iter()
        .map(|x| json!({"code": x.code, "severity": x.severity, "detail": x.detail}))
        .collect();
    let mut obj = Map::new();
    obj.insert("schema".into(), SCHEMA.into());
    obj.insert("kind".into(), "frame".into());
    obj.insert("dialect".into(), s(f.dialect.map(|d| d.as_str())));
    obj.insert("qn".into(), s(f.qn()));
    obj.insert("st".into(), s(f.st()));
    obj.insert("cn".into(), s(f.cn()));
    obj.insert("mn".into(), s(f.mn()));
    obj.insert("flag".into(), f.flag.map_or(Value::Null, |v| v.into()));
    obj.insert("pnum".into(), f.pnum().map_or(Value::Null, |v| v.into()));
    obj.insert("pno".into(), f.pno().map_or(Value::Null, |v| v.into()));
    obj.insert("rf".into(), f.rf().into());
    obj.insert(
        "data_time".into(),
        f.data_time
            .map_or(Value::Null, |t| time::rfc3339(t, f.data_time_ms).into()),
    );
    obj.insert("encryption".into(), s(f.encryption.map(|e| e.as_str())));
    obj.insert("values".into(), Value::Object(values));
    obj.insert("params".into(), Value::Object(params));
    obj.insert("findings".into(), Value::Array(findings));
    obj.insert(
        "crc".into(),
        json!({
            "declared": f.crc.declared.map(|d| String::from_utf8_lossy(&d).into_owned()),
            "computed": String::from_utf8_lossy(&crc::format_hex4(f.crc.computed)),
            "variant": f.crc.declared.map(|_| f.crc.variant.as_str()),
        }),
    );
    if include_raw {
        add_raw(&mut obj, &f.raw);
    }
    obj
}

/// The JSON object for bytes that are not a frame.
pub fn junk_json(bytes: &[u8], reason: &str, include_raw: bool) -> Map<String, Value> {
    let mut obj = Map::new();
    obj.insert("schema".into(), SCHEMA.into());
    obj.insert("kind".into(), "junk".into());
    obj.insert("dialect".into(), Value::Null);
    obj.insert(
        "findings".into(),
        json!([{"code": format!("junk.{reason}"), "severity": "error",
                "detail": format!("{} bytes that are not an HJ 212 frame ({reason})", bytes.len())}]),
    );
    if include_raw {
        add_raw(&mut obj, bytes);
    }
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Options, decode};
    use bytes::Bytes;
    use chrono::TimeZone;

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
        assert_eq!(normalise("+1.5"), "1.5");
        assert_eq!(normalise("007"), "7");
        assert_eq!(normalise(".5"), "0.5");
        assert_eq!(normalise("-1."), "-1");
    }
}
