//! Abnormal-data detection: detectors over the frame log that raise and clear alarms.
//!
//! [`engine`] is sans-IO and deterministic: observations (accepted inbound frames) and
//! clock ticks in, [`AlarmEvent`]s out. [`task`] wires it to the log: it reads behind
//! its own cursor `alarms`, ticks the clock for `device.offline`, and persists each
//! batch of events together with the cursor in one transaction, so a crash can neither
//! lose nor duplicate an alarm. The same engine runs in `replay` (audit) over history.

mod consistency;
mod doc;
pub mod engine;
mod forgery;
mod kind;
pub mod task;
mod values;
mod window;

use rust_decimal::Decimal;

use crate::store::{Direction, Kind, StoredRecord, Verdict};

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
    pub fn from_record(r: &StoredRecord, video: bool) -> Option<Obs> {
        if r.direction != Direction::In || r.kind != Kind::Frame || r.verdict != Verdict::Accepted {
            return None;
        }
        // A frame read back from the file without its document: the fields come
        // from the frame decoded as the rebuild would decode it, without writing
        // the document and reading it back (the rebuild and the read were most of
        // the detector's work whenever it read the file: behind the commit feed,
        // at saturation and after a restart).
        if r.document_rebuilt() && crate::protocol::json::findings_rewritten(&r.findings) {
            let f = crate::protocol::json::decode_for_rebuild(&r.raw);
            if let Some(fields) = doc::DocFields::of_rebuilt(&f, r.data_time.as_deref()) {
                return Obs::from_fields(
                    r.seq,
                    r.received_at_ms,
                    fields,
                    &r.findings,
                    r.duplicate,
                    video,
                );
            }
        }
        Obs::from_doc(
            r.seq,
            r.received_at_ms,
            &r.document(),
            &r.findings,
            r.duplicate,
            video,
        )
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
        Obs::from_fields(
            seq,
            received_ms,
            doc::DocFields::parse(doc)?,
            findings,
            duplicate,
            video,
        )
    }

    fn from_fields(
        seq: u64,
        received_ms: i64,
        doc: doc::DocFields,
        findings: &str,
        duplicate: bool,
        video: bool,
    ) -> Option<Obs> {
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
