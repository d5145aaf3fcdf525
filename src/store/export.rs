//! Export of the log: raw bytes for replay, JSON lines for people and other tools.

use std::io::Write;
use std::path::PathBuf;

use base64::Engine as _;
use serde_json::{Map, Value};

use super::reader::{Reader, RecordFilter};
use super::{Direction, StoreError, StoredRecord};

/// Output format of [`export`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The exact stored bytes, back to back in seq order.
    Raw,
    /// One JSON object per line: [`export_record_json`].
    Jsonl,
}

/// Which directions [`export`] includes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDirection {
    /// Received records only.
    In,
    /// Sent records only.
    Out,
    /// Everything.
    All,
}

/// What [`export`] reads and how it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// The SQLite file.
    pub db: PathBuf,
    /// Output format.
    pub format: ExportFormat,
    /// Direction filter.
    pub direction: ExportDirection,
}

/// Writes the log to `out` in seq order and returns the number of records written.
///
/// Streams page by page on a read-only connection, so it neither loads the log into
/// memory nor blocks the writer. The records exported are those committed when the
/// export started.
pub fn export(opts: &ExportOptions, out: &mut dyn Write) -> Result<u64, StoreError> {
    let reader = Reader::open(&opts.db)?;
    let filter = RecordFilter {
        direction: match opts.direction {
            ExportDirection::In => Some(Direction::In),
            ExportDirection::Out => Some(Direction::Out),
            ExportDirection::All => None,
        },
        ..RecordFilter::default()
    };
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let io = |source| StoreError::Io { source };
    let mut count = 0;
    for rec in reader.records(filter)? {
        let rec = rec?;
        match opts.format {
            ExportFormat::Raw => out.write_all(&rec.raw).map_err(io)?,
            ExportFormat::Jsonl => {
                serde_json::to_writer(&mut out, &Value::Object(export_record_json(&rec)))
                    .map_err(|e| io(e.into()))?;
                out.write_all(b"\n").map_err(io)?;
            }
        }
        count += 1;
    }
    out.flush().map_err(io)?;
    Ok(count)
}

/// The exported JSON object of one record (also what the MQTT publisher sends).
///
/// Starts from the stored `doc` object (numbers keep their exact digits), or from
/// `{"schema":"hj212.frame.v1","kind":"junk"}` when `doc` is empty, and appends `raw`
/// (only when the bytes are valid UTF-8), `raw_b64` (standard base64), `seq`,
/// `received_at` (RFC 3339 UTC with milliseconds), `peer`, `session`, `direction`,
/// `verdict` and `duplicate`, replacing any same-named field of `doc`.
///
/// The writer only accepts an empty `doc` or a JSON object, so an unparsable `doc` can
/// only come from an altered file; it is then exported as the junk base object with
/// `"kind"` set to the record's kind and `"doc_invalid": true`, rather than dropped.
pub fn export_record_json(rec: &StoredRecord) -> Map<String, Value> {
    let base = |kind: &str| {
        let mut m = Map::new();
        m.insert("schema".into(), Value::from("hj212.frame.v1"));
        m.insert("kind".into(), Value::from(kind));
        m
    };
    let doc = rec.document();
    let mut m = if doc.is_empty() {
        base("junk")
    } else {
        match serde_json::from_str::<Value>(&doc) {
            Ok(Value::Object(m)) => m,
            _ => {
                let mut m = base(rec.kind.as_str());
                m.insert("doc_invalid".into(), Value::Bool(true));
                m
            }
        }
    };
    match std::str::from_utf8(&rec.raw) {
        Ok(text) => {
            m.insert("raw".into(), Value::from(text));
        }
        Err(_) => {
            m.shift_remove("raw");
        }
    }
    m.insert(
        "raw_b64".into(),
        Value::from(base64::engine::general_purpose::STANDARD.encode(&rec.raw)),
    );
    m.insert("seq".into(), Value::from(rec.seq));
    m.insert(
        "received_at".into(),
        Value::from(rfc3339_ms(rec.received_at_ms)),
    );
    m.insert("peer".into(), Value::from(rec.peer.as_str()));
    m.insert("session".into(), Value::from(rec.session));
    m.insert("direction".into(), Value::from(rec.direction.as_str()));
    m.insert("verdict".into(), Value::from(rec.verdict.as_str()));
    m.insert("duplicate".into(), Value::Bool(rec.duplicate));
    m
}

/// `2026-11-28T13:05:01.123Z`. Out-of-range times (only possible from a caller bug)
/// fall back to the integer milliseconds as text, so the export never fails on them.
fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}
