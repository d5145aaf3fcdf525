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

fn is_quarantined(findings: &str) -> bool {
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
