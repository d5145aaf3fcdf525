//! What the MQTT publisher sends for a record: selection, topic and payload.
//!
//! Kept free of I/O and of the MQTT client so the contract (README "MQTT") is
//! testable on its own.

use serde_json::{Map, Value};

use crate::session::code::DEVICE_QUARANTINED;
use crate::store::{Direction, Kind, StoredRecord, Verdict, export_record_json};

/// Publishing choices that affect selection and payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    /// First topic level (`hj212`).
    pub prefix: String,
    /// Also publish rejected frames (on `{prefix}/{mn}/rejected`).
    pub publish_rejected: bool,
    /// Keep `raw`/`raw_b64` in payloads.
    pub include_raw: bool,
}

/// One record's message.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Topic.
    pub topic: String,
    /// JSON payload bytes.
    pub payload: Vec<u8>,
    /// The payload object (for the split-upload merger), only for accepted frames.
    pub object: Option<Map<String, Value>>,
}

/// The message for `rec`, or `None` when the record is not published: replies
/// we sent (`direction = out`), junk, frames without an MN, quarantined devices,
/// and rejected frames unless `publish_rejected`.
pub fn plan(rec: &StoredRecord, o: &PlanOptions) -> Option<Planned> {
    if rec.direction != Direction::In || rec.kind != Kind::Frame {
        return None;
    }
    let mn = rec.mn.as_deref().filter(|m| topic_level_ok(m))?;
    // Quarantined devices are stored and acked but never leave the gateway.
    if rec.findings.contains(DEVICE_QUARANTINED) && is_quarantined(&rec.findings) {
        return None;
    }
    let topic = match rec.verdict {
        Verdict::Accepted => {
            let cn = rec.cn.as_deref().filter(|c| topic_level_ok(c))?;
            format!("{}/{mn}/{cn}", o.prefix)
        }
        Verdict::Rejected if o.publish_rejected => format!("{}/{mn}/rejected", o.prefix),
        _ => return None,
    };
    // The common case (no raw bytes, a plain stored doc) splices text instead of
    // rebuilding the object: the drain of a backlog is bound by this JSON work.
    if !o.include_raw {
        if let Some(payload) = spliced_payload(rec) {
            let object = (rec.verdict == Verdict::Accepted && is_split(&rec.doc))
                .then(|| match serde_json::from_str(&rec.doc) {
                    Ok(Value::Object(m)) => Some(m),
                    _ => None,
                })
                .flatten();
            return Some(Planned {
                topic,
                payload,
                object,
            });
        }
    }
    let mut obj = export_record_json(rec);
    if !o.include_raw {
        // The raw frame carries the device password.
        obj.shift_remove("raw");
        obj.shift_remove("raw_b64");
    }
    let payload = serde_json::to_vec(&obj).unwrap_or_default();
    let object = (rec.verdict == Verdict::Accepted).then_some(obj);
    Some(Planned {
        topic,
        payload,
        object,
    })
}

/// Fields [`export_record_json`] appends to the stored doc, in its order.
const ADDED: [&str; 9] = [
    "\"raw\"",
    "\"raw_b64\"",
    "\"seq\"",
    "\"received_at\"",
    "\"peer\"",
    "\"session\"",
    "\"direction\"",
    "\"verdict\"",
    "\"duplicate\"",
];

/// The same JSON object as [`export_record_json`] without `raw`/`raw_b64`, built by
/// appending the record's fields to the stored doc text. `None` (use the general
/// path) unless the doc is a valid JSON object none of whose text names an added
/// field, so the result can neither differ from the export nor repeat a key.
fn spliced_payload(rec: &StoredRecord) -> Option<Vec<u8>> {
    let doc = rec.doc.as_str();
    if doc.len() < 2 || !doc.starts_with('{') || !doc.ends_with('}') {
        return None;
    }
    if ADDED.iter().any(|k| doc.contains(k)) {
        return None;
    }
    serde_json::from_str::<serde::de::IgnoredAny>(doc).ok()?;
    let mut out = Vec::with_capacity(doc.len() + 192);
    out.extend_from_slice(&doc.as_bytes()[..doc.len() - 1]);
    if doc[1..doc.len() - 1].trim().is_empty() {
        out.truncate(1);
    } else {
        out.push(b',');
    }
    let received_at = chrono::DateTime::from_timestamp_millis(rec.received_at_ms)?
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let peer = serde_json::to_string(&rec.peer).ok()?;
    let tail = format!(
        "\"seq\":{},\"received_at\":\"{received_at}\",\"peer\":{peer},\"session\":{},\"direction\":\"{}\",\"verdict\":\"{}\",\"duplicate\":{}}}",
        rec.seq,
        rec.session,
        rec.direction.as_str(),
        rec.verdict.as_str(),
        rec.duplicate
    );
    out.extend_from_slice(tail.as_bytes());
    Some(out)
}

/// Whether the doc may be a split-upload packet (then the merger needs the object).
fn is_split(doc: &str) -> bool {
    doc.contains("\"pno\":") && !doc.contains("\"pno\":null")
}

/// True when the findings JSON names `device.quarantined` (or cannot be read).
pub(crate) fn is_quarantined(findings: &str) -> bool {
    serde_json::from_str::<Vec<Value>>(findings)
        .map(|v| {
            v.iter()
                .any(|f| f.get("code").and_then(Value::as_str) == Some(DEVICE_QUARANTINED))
        })
        // An unparsable findings column only comes from an altered file; keep it home.
        .unwrap_or(true)
}

/// MNs and CNs become topic levels: they must not be empty or carry MQTT
/// wildcards or level separators (a device must not publish into another's topic).
pub fn topic_level_ok(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '+', '#', '\0'])
}

/// `{prefix}/{mn}/{cn}/merged`.
pub fn merged_topic(prefix: &str, mn: &str, cn: &str) -> String {
    format!("{prefix}/{mn}/{cn}/merged")
}

/// `{prefix}/{mn}/status`.
pub fn presence_topic(prefix: &str, mn: &str) -> String {
    format!("{prefix}/{mn}/status")
}

/// `{prefix}/_gateway/{client_id}/status`.
pub fn gateway_topic(prefix: &str, client_id: &str) -> String {
    format!("{prefix}/_gateway/{client_id}/status")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(doc: &str) -> StoredRecord {
        StoredRecord {
            seq: 42,
            received_at_ms: 1_795_870_701_123,
            peer: "10.0.0.1:4000".into(),
            session: 7,
            direction: Direction::In,
            kind: Kind::Frame,
            raw: b"##0010QN=1&&ABCD\r\n".to_vec(),
            dialect: Some("2017".into()),
            st: None,
            cn: Some("2011".into()),
            mn: Some("M1".into()),
            qn: None,
            data_time: None,
            verdict: Verdict::Accepted,
            duplicate: true,
            findings: "[]".into(),
            doc: doc.into(),
            hash: [0; 32],
        }
    }

    fn opts(include_raw: bool) -> PlanOptions {
        PlanOptions {
            prefix: "p".into(),
            publish_rejected: false,
            include_raw,
        }
    }

    #[test]
    fn spliced_payload_equals_the_export_object() {
        for doc in [
            r#"{"schema":"hj212.frame.v1","kind":"frame","values":{"a":{"Rtd":12.50}},"pno":null}"#,
            r#"{"schema":"hj212.frame.v1","info":"text naming \"peer\" inside"}"#,
            r#"{}"#,
            r#"{"broken":"#,
            "",
        ] {
            let r = rec(doc);
            let p = plan(&r, &opts(false)).unwrap();
            let mut want = export_record_json(&r);
            want.shift_remove("raw");
            want.shift_remove("raw_b64");
            let got: Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(got, Value::Object(want.clone()), "{doc}");
            // Same text, key order included.
            assert_eq!(p.payload, serde_json::to_vec(&want).unwrap(), "{doc}");
            assert_eq!(p.topic, "p/M1/2011");
        }
        let p = plan(&rec(r#"{"a":1}"#), &opts(true)).unwrap();
        let got: Value = serde_json::from_slice(&p.payload).unwrap();
        assert!(got.get("raw_b64").is_some() && got.get("raw").is_some());
    }

    #[test]
    fn not_published() {
        let mut r = rec("{}");
        r.direction = Direction::Out;
        assert!(plan(&r, &opts(false)).is_none());
        let mut r = rec("{}");
        r.verdict = Verdict::Rejected;
        assert!(plan(&r, &opts(false)).is_none());
        let mut o = opts(false);
        o.publish_rejected = true;
        assert_eq!(plan(&r, &o).unwrap().topic, "p/M1/rejected");
        let mut r = rec("{}");
        r.findings = r#"[{"code":"device.quarantined","severity":"warning","detail":""}]"#.into();
        assert!(plan(&r, &opts(false)).is_none());
        let mut r = rec("{}");
        r.mn = Some("a/#".into());
        assert!(plan(&r, &opts(false)).is_none());
    }
}
