//! Planning a stored record for the log's consumers: the MQTT plan and the
//! upstream selection, over arbitrary records.
//!
//! A record is whatever the log holds: any MN, CN, doc, findings and raw bytes
//! (an altered file included). Whatever it is, the publisher must either publish
//! a message the broker accepts or refuse the record with a reason (it is then
//! set aside): a message a broker would refuse is what stopped the publisher for
//! good (issue 18, row 2).

use bytes::Bytes;

use crate::config::UpstreamEntry;
use crate::protocol::{self, reply};
use crate::publish::plan::{self, Decision, PlanOptions, publish_packet_len, topic_problem};
use crate::publish::upstream::selects;
use crate::store::{DEAD_LETTER_REASONS, Direction, Kind, StoredRecord, Verdict};

/// Longest detail a refusal may carry (it is stored and logged).
const DETAIL_MAX: usize = 1024;

/// Builds a record from `data` and plans it for MQTT and an upstream.
///
/// Layout: byte 0 flags (bit 0 direction out, bit 1 junk, bits 2-3 verdict,
/// bit 4 `publish_rejected`, bit 5 `include_raw`, bit 6 no MN, bit 7 no CN);
/// bytes 1-2 the packet limit (1024 + u16); byte 3 the seq; the rest split at
/// 0xFF into MN, CN, doc, findings and raw (lossy UTF-8 for the text fields).
///
/// Asserts: no panic; a published message has a valid topic and a packet within
/// the limit; a refused record has a known reason and a bounded detail; the
/// upstream selects only inbound, non-junk frames.
pub fn plan_record(data: &[u8]) {
    let Some((rec, opts, max_packet)) = record(data) else {
        return;
    };
    match plan::decide(&rec, &opts, max_packet) {
        Decision::Publish(p) => {
            assert_eq!(topic_problem(&p.topic), None, "topic {:?}", p.topic);
            assert!(
                publish_packet_len(p.topic.len(), p.payload.len()) <= max_packet,
                "packet over {max_packet}"
            );
            assert!(p.topic.starts_with(&opts.prefix));
            assert!(
                serde_json::from_slice::<serde_json::Value>(&p.payload)
                    .is_ok_and(|v| v.is_object()),
                "payload {:?}",
                String::from_utf8_lossy(&p.payload)
            );
        }
        Decision::Refuse(r) => {
            assert!(DEAD_LETTER_REASONS.contains(&r.reason), "{r:?}");
            assert!(
                !r.detail.is_empty() && r.detail.len() <= DETAIL_MAX,
                "{r:?}"
            );
        }
        Decision::Skip => {}
    }
    let e = upstream_entry(data[0] & 0x10 != 0);
    if selects(e, &["other".to_owned()], &rec) {
        assert_eq!((rec.direction, rec.kind), (Direction::In, Kind::Frame));
        assert_ne!(rec.verdict, Verdict::Junk);
        // What the forwarder does with a selected record before sending it.
        let f = protocol::decode(
            Bytes::copy_from_slice(&rec.raw),
            &protocol::Options::new(chrono::DateTime::UNIX_EPOCH),
            &(),
        );
        let _ = reply::ack_kind(&f);
        let _ = f.qn();
    }
}

/// The upstream entry the record is planned for (parsed once: the fuzzer calls
/// this millions of times).
fn upstream_entry(include_rejected: bool) -> &'static UpstreamEntry {
    static ENTRIES: std::sync::OnceLock<[UpstreamEntry; 2]> = std::sync::OnceLock::new();
    let parse = |inc: bool| {
        let text = format!(
            "[[upstream]]\nname = \"u\"\naddr = \"127.0.0.1:1\"\ninclude_rejected = {inc}\n"
        );
        crate::config::Config::parse(&text, std::path::Path::new("fuzz"))
            .expect("static config")
            .upstream
            .remove(0)
    };
    &ENTRIES.get_or_init(|| [parse(false), parse(true)])[usize::from(include_rejected)]
}

fn record(data: &[u8]) -> Option<(StoredRecord, PlanOptions, usize)> {
    if data.len() < 4 {
        return None;
    }
    let flags = data[0];
    let max_packet = 1024 + usize::from(u16::from_le_bytes([data[1], data[2]]));
    let mut fields = data[4..].split(|&b| b == 0xFF);
    let mut text = || String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let (mn, cn, doc, findings) = (text(), text(), text(), text());
    let raw = fields.next().unwrap_or_default().to_vec();
    let mut rec = StoredRecord {
        seq: u64::from(data[3]) + 1,
        received_at_ms: 1_795_870_701_123,
        peer: "10.0.0.1:4000".into(),
        session: 1,
        direction: if flags & 1 != 0 {
            Direction::Out
        } else {
            Direction::In
        },
        kind: if flags & 2 != 0 {
            Kind::Junk
        } else {
            Kind::Frame
        },
        raw,
        dialect: Some("2017".into()),
        st: Some("31".into()),
        cn: (flags & 0x80 == 0).then_some(cn),
        mn: (flags & 0x40 == 0).then_some(mn),
        qn: None,
        data_time: None,
        verdict: match (flags >> 2) & 3 {
            0 | 3 => Verdict::Accepted,
            1 => Verdict::Rejected,
            _ => Verdict::Junk,
        },
        duplicate: false,
        findings: if findings.is_empty() {
            "[]".into()
        } else {
            findings
        },
        doc,
        doc_stored: true,
        hash: [0; 32],
    };
    // As the log's readers set it: an empty document is rebuilt from `raw`.
    rec.read_doc_column();
    let opts = PlanOptions {
        prefix: "hj212".into(),
        publish_rejected: flags & 0x10 != 0,
        include_raw: flags & 0x20 != 0,
    };
    Some((rec, opts, max_packet))
}
