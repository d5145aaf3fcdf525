//! Abnormal-data detection: detectors over the frame log that raise and clear alarms.
//!
//! [`engine`] is sans-IO and deterministic: observations (accepted inbound frames) and
//! clock ticks in, [`AlarmEvent`]s out. [`task`] wires it to the log: it reads behind
//! its own cursor `alarms`, ticks the clock for `device.offline`, and persists each
//! batch of events together with the cursor in one transaction, so a crash can neither
//! lose nor duplicate an alarm. The same engine runs in `replay` (audit) over history.

mod doc;
pub mod engine;
mod kind;
pub mod task;
mod values;
mod window;

use rust_decimal::Decimal;

use hj212::cp::ValueKind;
use hj212::{DeviceLookup, DeviceProfile, Dialect, Frame, Options};

use crate::store::{Direction, Kind, StoredRecord, Verdict};

/// Decodes a stored frame as it was first decoded: with its stored dialect,
/// which a device's registry entry may have imposed.
struct StoredDialect(Option<Dialect>);

impl DeviceLookup for StoredDialect {
    fn profile(&self, _mn: &str) -> Option<std::sync::Arc<DeviceProfile>> {
        let d = self.0?;
        Some(std::sync::Arc::new(DeviceProfile {
            dialect: Some(d),
            ..DeviceProfile::default()
        }))
    }
}

pub use kind::DetectorKind;
pub use values::{Factor, ShortText, Values};

/// How serious an alarm is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Worth a look.
    Warning,
    /// Data are missing or likely falsified.
    Critical,
}

impl Severity {
    /// `warning` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One value of a frame's `values` map.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// A number with the device's exact digits.
    Num(Decimal),
    /// A flag, time or text.
    Text(ShortText),
}

/// What the engine needs of one accepted inbound frame.
#[derive(Debug, Clone, Default)]
pub struct Obs {
    /// Log seq.
    pub seq: u64,
    /// Receive time, UTC unix ms.
    pub received_ms: i64,
    /// Device.
    pub mn: String,
    /// Command code.
    pub cn: String,
    /// DataTime as UTC unix ms.
    pub data_time_ms: Option<i64>,
    /// `RF=1` (re-sent data).
    pub rf: bool,
    /// Retransmission of an earlier `(mn, qn, cn)`.
    pub duplicate: bool,
    /// Finding codes of the frame.
    pub findings: Vec<String>,
    /// factor -> suffix -> value, factors in code order.
    pub values: Values,
    /// The device is a video gateway (`kind = "video"`): only offline checks.
    pub video: bool,
    /// The MN is in the device registry. Unregistered devices (unless named under
    /// `[alarms.device]`) share `[alarms] max_unregistered_devices` slots of state and
    /// are never reported `device.offline`.
    pub registered: bool,
}

impl Obs {
    /// A numeric value, if present.
    pub fn num(&self, factor: &str, suffix: &str) -> Option<Decimal> {
        self.values.num(factor, suffix)
    }

    /// A text value (flags), if present.
    pub fn text(&self, factor: &str, suffix: &str) -> Option<&str> {
        self.values.text(factor, suffix)
    }

    /// Builds the observation of a stored record; `None` for anything that is not an
    /// accepted inbound frame with an MN (replies, junk, rejected frames carry no
    /// trustworthy data).
    ///
    /// The values come from decoding the raw bytes again rather than from the
    /// stored document: decoding is about half the cost of reading the
    /// document's JSON (benches/README.md, issue 23), and a unit test holds
    /// both to the same observation over the fixtures. An encrypted frame's
    /// plaintext needs the device's key, so its document is read instead.
    pub fn from_record(r: &StoredRecord, video: bool) -> Option<Obs> {
        if r.direction != Direction::In || r.kind != Kind::Frame || r.verdict != Verdict::Accepted {
            return None;
        }
        if let Some(o) = Obs::from_raw(r, video) {
            return Some(o);
        }
        Obs::from_doc(
            r.seq,
            r.received_at_ms,
            &r.doc,
            &r.findings,
            r.duplicate,
            video,
        )
    }

    /// The observation of a plain (unencrypted) accepted frame, decoded from
    /// its raw bytes; `None` when the CP is encrypted or the frame names no MN
    /// (then the document decides).
    fn from_raw(r: &StoredRecord, video: bool) -> Option<Obs> {
        let lookup = StoredDialect(r.dialect.as_deref().and_then(Dialect::parse));
        let opts = Options::new(chrono::DateTime::from_timestamp_millis(r.received_at_ms)?);
        let f = hj212::decode(bytes::Bytes::copy_from_slice(&r.raw), &opts, &lookup);
        if f.encryption.is_some() {
            return None;
        }
        let mut o = Obs::from_frame(r.seq, r.received_at_ms, &f, &r.findings, r.duplicate, video)?;
        // The stored column is the document's `data_time`, in the device's zone.
        o.data_time_ms = r.data_time.as_deref().and_then(doc::rfc3339_ms);
        Some(o)
    }

    /// The observation of a decoded frame: the fields [`Obs::from_doc`] reads
    /// from the frame's document (`hj212.frame.v1`), taken from the frame
    /// itself. `data_time_ms` is the frame's DataTime as decoded.
    pub fn from_frame(
        seq: u64,
        received_ms: i64,
        f: &Frame,
        findings: &str,
        duplicate: bool,
        video: bool,
    ) -> Option<Obs> {
        let mn = f.mn().filter(|m| !m.is_empty())?.to_owned();
        let mut values = Values::default();
        let mut loose = String::new();
        for p in &f.pairs {
            let (Some(c), Some(s)) = (p.code, p.suffix) else {
                continue;
            };
            let code = String::from_utf8_lossy(f.bytes(c));
            let suffix = String::from_utf8_lossy(f.bytes(s));
            let text = String::from_utf8_lossy(f.bytes(p.value));
            // As the document renders each kind (hj212::json).
            let val = match p.kind {
                ValueKind::Number => doc::number(&text).map(Val::Num),
                ValueKind::LooseNumber => {
                    loose.clear();
                    hj212::json::normalise_number(&mut loose, &text);
                    doc::number(&loose).map(Val::Num)
                }
                ValueKind::Text => Some(Val::Text(ShortText::new(&text))),
            };
            // Of a repeated suffix the document keeps the last, in its place.
            values.remove(&code, &suffix);
            if let Some(v) = val {
                values.insert(&code, &suffix, v);
            }
        }
        Some(Obs {
            seq,
            received_ms,
            mn,
            cn: f.cn().unwrap_or_default().to_owned(),
            data_time_ms: f.data_time.map(|t| {
                if f.data_time_ms {
                    t.timestamp_millis()
                } else {
                    t.timestamp() * 1000
                }
            }),
            rf: f.rf(),
            duplicate,
            findings: doc::finding_codes(findings),
            values,
            video,
            registered: false,
        })
    }

    /// Builds an observation from a frame document (`hj212.frame.v1` text, as stored
    /// and as `replay` produces it) and its findings array text. The caller has
    /// already decided that the frame was accepted.
    pub fn from_doc(
        seq: u64,
        received_ms: i64,
        doc: &str,
        findings: &str,
        duplicate: bool,
        video: bool,
    ) -> Option<Obs> {
        let doc = doc::DocFields::parse(doc)?;
        let mn = doc.mn.filter(|m| !m.is_empty())?;
        let findings = doc::finding_codes(findings);
        Some(Obs {
            seq,
            received_ms,
            mn,
            cn: doc.cn.unwrap_or_default(),
            data_time_ms: doc.data_time_ms,
            rf: doc.rf,
            duplicate,
            findings,
            values: doc.values,
            video,
            registered: false,
        })
    }
}

/// Identity of a condition: at most one active alarm per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AlarmKey {
    /// Which detector, e.g. `value.stuck`.
    pub kind: DetectorKind,
    /// Device.
    pub mn: String,
    /// Factor code; for `data.gap` the CN of the series; empty for device-wide alarms.
    pub factor: String,
}

/// A condition started.
#[derive(Debug, Clone, PartialEq)]
pub struct Raise {
    /// What and where.
    pub key: AlarmKey,
    /// How serious.
    pub severity: Severity,
    /// When the condition started (UTC unix ms).
    pub start_ms: i64,
    /// Seqs of the frames that support it.
    pub seqs: Vec<u64>,
    /// Chinese message.
    pub message_zh: String,
    /// English message.
    pub message_en: String,
}

/// What the engine decided.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmEvent {
    /// A condition started.
    Raise(Raise),
    /// The condition of an active alarm ended.
    Clear {
        /// Which alarm.
        key: AlarmKey,
        /// When it ended (UTC unix ms).
        end_ms: i64,
        /// The frame that ended it, if a frame did (not for a tick).
        seq: Option<u64>,
    },
}

impl AlarmEvent {
    /// The alarm's key.
    pub fn key(&self) -> &AlarmKey {
        match self {
            AlarmEvent::Raise(r) => &r.key,
            AlarmEvent::Clear { key, .. } => key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewRecord;

    fn stored(rec: NewRecord) -> StoredRecord {
        StoredRecord {
            seq: 7,
            received_at_ms: rec.received_at_ms,
            peer: rec.peer,
            session: rec.session,
            direction: rec.direction,
            kind: rec.kind,
            raw: rec.raw.to_vec(),
            dialect: rec.dialect,
            st: rec.st,
            cn: rec.cn,
            mn: rec.mn,
            qn: rec.qn,
            data_time: rec.data_time,
            verdict: rec.verdict,
            duplicate: false,
            findings: rec.findings,
            doc: rec.doc,
            hash: [0; 32],
        }
    }

    /// What the engine sees of an observation.
    fn seen(o: &Obs) -> String {
        format!(
            "{} {} {:?} {} {:?} {:?}",
            o.mn, o.cn, o.data_time_ms, o.rf, o.findings, o.values
        )
    }

    /// `from_record` decodes the raw bytes; the observation must be the one
    /// the stored document gives, for every fixture frame and for values the
    /// fixtures lack (loose numbers, repeated suffixes and codes, numbers no
    /// decimal holds, text with JSON escapes).
    #[test]
    fn the_raw_bytes_and_the_document_give_the_same_observation() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-07T04:00:00Z")
            .unwrap()
            .to_utc();
        let odd: &[&str] = &[
            "QN=20261207120000001;ST=22;CN=2011;PW=123456;MN=010000A8900016F000169DC0;Flag=4;CP=&&DataTime=20261207115959;a01012-Rtd=+007.50,a01012-Flag=N;a01011-Rtd=1e3,a01012-Rtd=12.0,a01012-Flag=D;a34013-Rtd=99999999999999999999999999999999999,a34013-Rtd=5;w01018-Info=a\"b\\c;a21026-Rtd=-0,a21026-Min=-0.00&&",
            "QN=20261207120000002;ST=22;CN=2051;PW=123456;MN=010000A8900016F000169DC0;Flag=4;CP=&&DataTime=20261207115900;a34013-Avg=5,a34013-Avg=99999999999999999999999999999999999;a01012-Avg=00012&&",
        ];
        let mut frames: Vec<Vec<u8>> = crate::protocol::fixture_frames();
        for seg in odd {
            frames.push(hj212::reply::envelope(seg.as_bytes()).to_vec());
        }
        let mut compared = 0;
        for raw in frames {
            let f = hj212::decode(bytes::Bytes::from(raw), &Options::new(now), &());
            let rec = stored(crate::ingest::frame_record(
                &f,
                "10.0.0.1:1",
                1,
                Direction::In,
                now.timestamp_millis(),
                true,
            ));
            let by_doc = Obs::from_doc(
                rec.seq,
                rec.received_at_ms,
                &rec.doc,
                &rec.findings,
                false,
                false,
            );
            let Some(by_raw) = Obs::from_raw(&rec, false) else {
                assert!(
                    f.encryption.is_some() || by_doc.is_none(),
                    "no observation from {:?}",
                    String::from_utf8_lossy(&rec.raw)
                );
                continue;
            };
            let by_doc = by_doc.expect("a document where the raw bytes give an observation");
            assert_eq!(
                seen(&by_raw),
                seen(&by_doc),
                "{}",
                String::from_utf8_lossy(&rec.raw)
            );
            compared += 1;
        }
        assert!(compared > 100, "only {compared} frames compared");
    }
}
