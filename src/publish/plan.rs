//! What the MQTT publisher sends for a record: selection, topic and payload.
//!
//! Kept free of I/O and of the MQTT client so the contract (README "MQTT") is
//! testable on its own.

use serde_json::{Map, Value};

use crate::ingest::FindingCode;
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

/// Why a message cannot go to the broker: a reason of
/// [`crate::store::DEAD_LETTER_REASONS`] and words for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `oversize`, `invalid_topic`, ...
    pub reason: &'static str,
    /// What exactly (sizes, the offending topic level, escaped).
    pub detail: String,
}

/// What the publisher does with a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Not published (see [`plan`]).
    Skip,
    /// Published.
    Publish(Planned),
    /// Meant to be published, but the broker would refuse it: set aside.
    Refuse(Refusal),
}

/// The message for `rec`, or `None` when the record is not published: replies
/// we sent (`direction = out`), junk, frames without an MN, quarantined devices,
/// rejected frames unless `publish_rejected`, and records [`decide`] refuses.
pub fn plan(rec: &StoredRecord, o: &PlanOptions) -> Option<Planned> {
    match decide(rec, o, usize::MAX) {
        Decision::Publish(p) => Some(p),
        Decision::Skip | Decision::Refuse(_) => None,
    }
}

/// [`plan`], telling apart records that are not published from records whose
/// message the broker would refuse: an MN or CN that is not a valid topic level
/// (see [`topic_problem`]), or a packet over `max_packet` bytes. Refused records
/// are the publisher's dead letters; deciding here, before the client sees them,
/// keeps one record from ever costing a broker connection.
pub fn decide(rec: &StoredRecord, o: &PlanOptions, max_packet: usize) -> Decision {
    if rec.direction != Direction::In || rec.kind != Kind::Frame {
        return Decision::Skip;
    }
    let Some(mn) = rec.mn.as_deref() else {
        return Decision::Skip;
    };
    // Quarantined devices are stored and acked but never leave the gateway.
    if rec
        .findings
        .contains(FindingCode::DeviceQuarantined.as_str())
        && is_quarantined(&rec.findings)
    {
        return Decision::Skip;
    }
    let cn = match rec.verdict {
        Verdict::Accepted => match rec.cn.as_deref() {
            Some(cn) => cn,
            None => return Decision::Skip,
        },
        Verdict::Rejected if o.publish_rejected => "rejected",
        _ => return Decision::Skip,
    };
    for (what, level) in [("MN", mn), ("CN", cn)] {
        if let Some(p) = level_problem(level) {
            return Decision::Refuse(Refusal {
                reason: "invalid_topic",
                detail: format!("{what} {} {p}", escaped(level)),
            });
        }
    }
    let Some(p) = planned(rec, o, format!("{}/{mn}/{cn}", o.prefix)) else {
        return Decision::Skip;
    };
    match check_message(&p.topic, p.payload.len(), max_packet) {
        Ok(()) => Decision::Publish(p),
        Err(r) => Decision::Refuse(r),
    }
}

fn planned(rec: &StoredRecord, o: &PlanOptions, topic: String) -> Option<Planned> {
    // The common case (no raw bytes, a plain stored doc) splices text instead of
    // rebuilding the object: the drain of a backlog is bound by this JSON work.
    if !o.include_raw {
        let doc = rec.document();
        if let Some(payload) = spliced_payload(rec, &doc) {
            let object = (rec.verdict == Verdict::Accepted && is_split(&doc))
                .then(|| match serde_json::from_str(&doc) {
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
/// appending the record's fields to the document's text, so the result can
/// neither differ from the export nor repeat a key. `None` (use the general
/// path) when that cannot be shown for `doc`, the record's document.
///
/// A document this process wrote (`StoredRecord::document_is_ours`) is valid
/// JSON with the `hj212.frame.v1` keys and no others at its top level: it is
/// spliced as it is (a key of an added name deeper in, a factor code from the
/// wire, does not matter). Looking for the added names in it anyway was nine
/// scans of every published document, a quarter of the publisher's own CPU per
/// frame; proving it valid was a full JSON parse of every record drained. Text
/// from the file must be valid JSON and name no added field anywhere.
fn spliced_payload(rec: &StoredRecord, doc: &str) -> Option<Vec<u8>> {
    if doc.len() < 2 || !doc.starts_with('{') || !doc.ends_with('}') {
        return None;
    }
    if !rec.document_is_ours() {
        if ADDED.iter().any(|k| doc.contains(k)) {
            return None;
        }
        // `IgnoredAny` does not decode `\u` escapes, so it takes a lone
        // surrogate (`\ud800`), which no JSON reader accepts in a string:
        // text with escapes is read whole.
        if doc.contains("\\u") {
            serde_json::from_str::<Value>(doc).ok()?;
        } else {
            serde_json::from_str::<serde::de::IgnoredAny>(doc).ok()?;
        }
    }
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
            v.iter().any(|f| {
                f.get("code").and_then(Value::as_str)
                    == Some(FindingCode::DeviceQuarantined.as_str())
            })
        })
        // An unparsable findings column only comes from an altered file; keep it home.
        .unwrap_or(true)
}

/// MNs and CNs become topic levels: they must not be empty, carry MQTT
/// wildcards or level separators (a device must not publish into another's topic),
/// or characters a broker refuses (see [`topic_problem`]).
pub fn topic_level_ok(s: &str) -> bool {
    level_problem(s).is_none()
}

fn level_problem(s: &str) -> Option<&'static str> {
    if s.contains('/') {
        return Some("holds a topic level separator '/'");
    }
    topic_problem(s)
}

/// Why `topic` is not a topic name a broker accepts in a PUBLISH, or `None`.
///
/// MQTT 3.1.1 §1.5.3 and §4.7 (and 5.0 §1.5.4): a UTF-8 string (a Rust `str`
/// already is) of 1 to 65,535 bytes, without U+0000 and without the wildcards `+`
/// and `#`. Control characters (U+0001..U+001F, U+007F..U+009F) and
/// non-characters "SHOULD NOT" appear; mosquitto and others close the connection
/// over them, which for a publisher that retries means never getting past the
/// message, so they are refused here too.
pub fn topic_problem(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        return Some("is empty");
    }
    if topic.len() > 65_535 {
        return Some("is longer than 65535 bytes");
    }
    for c in topic.chars() {
        match c {
            '+' | '#' => return Some("holds an MQTT wildcard"),
            '\0' => return Some("holds U+0000"),
            c if c.is_control() => return Some("holds a control character"),
            c if is_noncharacter(c) => return Some("holds a Unicode non-character"),
            _ => {}
        }
    }
    None
}

fn is_noncharacter(c: char) -> bool {
    let u = u32::from(c);
    (0xFDD0..=0xFDEF).contains(&u) || (u & 0xFFFE) == 0xFFFE
}

/// The bytes of a QoS 1/2 PUBLISH packet: fixed header (1 + 1..4 bytes of
/// remaining length), topic (2 + len), packet id (2), payload.
pub fn publish_packet_len(topic_len: usize, payload_len: usize) -> usize {
    let rest = 2 + topic_len + 2 + payload_len;
    let len_bytes = match rest {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_bytes + rest
}

/// Checks a message against what a broker would refuse: the topic (see
/// [`topic_problem`]) and the packet size against `max_packet`.
pub fn check_message(topic: &str, payload_len: usize, max_packet: usize) -> Result<(), Refusal> {
    if let Some(p) = topic_problem(topic) {
        return Err(Refusal {
            reason: "invalid_topic",
            detail: format!("topic {} {p}", escaped(topic)),
        });
    }
    let len = publish_packet_len(topic.len(), payload_len);
    if len > max_packet {
        return Err(Refusal {
            reason: "oversize",
            detail: format!(
                "PUBLISH of {len} bytes (payload {payload_len}) over mqtt.max_packet_size = {max_packet}"
            ),
        });
    }
    Ok(())
}

/// `s` for a log line or a dead-letter detail: control characters escaped, at
/// most 64 characters (an MN or CN is far shorter).
fn escaped(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().nth(64).is_some() {
        out.push('…');
    }
    format!("\"{out}\"")
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

/// `{prefix}/_gateway/{client_id}/checkpoint`: the latest signed checkpoint, retained.
pub fn checkpoint_topic(prefix: &str, client_id: &str) -> String {
    format!("{prefix}/_gateway/{client_id}/checkpoint")
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
            doc_stored: true,
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

    /// A document of ours whose factor codes and parameters carry the names of
    /// the keys the payload adds (`seq`, `peer`, `raw`...) is spliced, and the
    /// payload is still the export object's text: the names sit below the top
    /// level.
    #[test]
    fn added_key_names_inside_a_document_of_ours_are_spliced() {
        let raw = crate::protocol::reply::envelope(
            b"QN=20261128130501001;ST=32;CN=2011;PW=123456;MN=M1;Flag=5;\
              CP=&&DataTime=20261128130501;seq-Rtd=1.5,peer-Rtd=2,raw-Flag=N;session=3&&",
        );
        let dt = Some("2026-11-28T13:05:01+08:00");
        let mut r = rec("");
        r.raw = raw.to_vec();
        r.data_time = dt.map(str::to_owned);
        r.doc_stored = false;
        assert!(r.document_is_ours());
        let doc = r.document();
        assert!(
            ADDED.iter().filter(|k| doc.contains(*k)).count() >= 3,
            "{doc}"
        );
        let p = plan(&r, &opts(false)).unwrap();
        let mut want = export_record_json(&r);
        want.shift_remove("raw");
        want.shift_remove("raw_b64");
        assert_eq!(p.payload, serde_json::to_vec(&want).unwrap());
        let got: Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(got["values"]["seq"]["Rtd"].to_string(), "1.5");
        assert_eq!(got["seq"], serde_json::json!(r.seq));
    }

    /// Text from the file is spliced only when it is valid JSON that names no
    /// added field: a findings column altered into another array (with a
    /// repeated key), or a stored document holding a lone surrogate, takes the
    /// export path, and the payload is still the export object.
    #[test]
    fn altered_text_from_the_file_takes_the_export_path() {
        let raw = crate::protocol::reply::envelope(
            b"QN=20261128130501001;ST=32;CN=2011;PW=123456;MN=M1;Flag=5;\
              CP=&&DataTime=20261128130501;a01012-Rtd=12.50&&",
        );
        let mut r = rec("");
        r.raw = raw.to_vec();
        r.doc_stored = false;
        r.findings = r#"[{"seq":1,"seq":2}]"#.into();
        assert!(!r.document_is_ours());
        let p = plan(&r, &opts(false)).unwrap();
        let mut want = export_record_json(&r);
        want.shift_remove("raw");
        want.shift_remove("raw_b64");
        let got: Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(got, Value::Object(want));
        assert_eq!(got["findings"], serde_json::json!([{ "seq": 2 }]));

        let r = rec(r#"{"schema":"hj212.frame.v1","info":"\ud800"}"#);
        let p = plan(&r, &opts(false)).unwrap();
        let got: Value = serde_json::from_slice(&p.payload).expect("a JSON payload");
        assert_eq!(got["seq"], serde_json::json!(42));
    }

    /// A frame read back without its document (rebuilt, not parsed to prove it
    /// valid) plans the very payload of the same frame with its document stored.
    #[test]
    fn a_rebuilt_document_plans_the_stored_documents_payload() {
        let raw = crate::protocol::reply::envelope(
            b"QN=20261128130501001;ST=32;CN=2011;PW=123456;MN=M1;Flag=5;\
              CP=&&DataTime=20261128130501;a01012-Rtd=12.50,a01012-Flag=N&&",
        );
        let dt = Some("2026-11-28T13:05:01+08:00");
        let doc = crate::protocol::json::rebuild_frame_doc(&raw, dt, "[]");
        let mut stored = rec(&doc);
        stored.raw = raw.to_vec();
        stored.data_time = dt.map(str::to_owned);
        let mut kept = stored.clone();
        kept.doc = String::new();
        kept.doc_stored = false;
        assert!(kept.document_is_ours() && !stored.document_is_ours());
        assert_eq!(kept.document(), doc);
        let (a, b) = (plan(&stored, &opts(false)), plan(&kept, &opts(false)));
        assert_eq!(a, b);
        let got: Value = serde_json::from_slice(&a.unwrap().payload).unwrap();
        assert_eq!(got["values"]["a01012"]["Rtd"].to_string(), "12.50");
    }

    /// A findings column altered in the file into text that is not JSON, on a frame
    /// kept without its document: the rebuild splices it in as it is, so the
    /// document is not taken as valid, and the payload is still JSON.
    #[test]
    fn an_altered_findings_column_still_gives_a_json_payload() {
        let raw = crate::protocol::reply::envelope(
            b"QN=20261128130501001;ST=32;CN=2011;PW=123456;MN=M1;Flag=5;\
              CP=&&DataTime=20261128130501;a01012-Rtd=12.50,a01012-Flag=N&&",
        );
        let mut r = rec("");
        r.raw = raw.to_vec();
        r.doc_stored = false;
        r.findings = "[{\"code\":".into();
        assert!(!r.document_is_ours());
        let p = plan(&r, &opts(false)).unwrap();
        let got: Value = serde_json::from_slice(&p.payload).expect("a JSON payload");
        assert_eq!(got["doc_invalid"], true, "{got}");
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

    #[test]
    fn topics_a_broker_refuses_are_refused_with_a_reason() {
        for bad in [
            "", "a+b", "a#", "a\0b", "a\u{1}b", "a\u{7f}", "a\u{85}", "\u{fffe}", "\u{fdd0}",
        ] {
            assert!(topic_problem(bad).is_some(), "{bad:?}");
        }
        assert!(topic_problem(&"a".repeat(65_536)).is_some());
        assert_eq!(topic_problem("hj212/010000A8900016F0/2011"), None);
        assert_eq!(topic_problem("hj212/设备/2011"), None);
        let mut r = rec("{}");
        r.mn = Some("AB\u{1}CD".into());
        r.verdict = Verdict::Rejected;
        let mut o = opts(false);
        o.publish_rejected = true;
        let Decision::Refuse(why) = decide(&r, &o, 1 << 20) else {
            panic!("refused");
        };
        assert_eq!(why.reason, "invalid_topic");
        assert!(why.detail.contains("\\u{1}"), "{}", why.detail);
        let Decision::Refuse(why) = decide(&rec(r#"{"a":1}"#), &opts(false), 100) else {
            panic!("refused");
        };
        assert_eq!(why.reason, "oversize");
        assert!(matches!(
            decide(&rec("{}"), &opts(false), 1 << 20),
            Decision::Publish(_)
        ));
        // The packet length counts the remaining-length bytes.
        assert_eq!(publish_packet_len(3, 120), 1 + 1 + 127);
        assert_eq!(publish_packet_len(3, 121), 1 + 2 + 128);
    }
}
