//! `export`: the log (or a filtered part of it) as raw bytes, JSON lines or CSV.
//!
//! Filtering is done by SQLite on a read-only connection (see
//! [`RecordFilter`]); rows stream page by page, so an export of any size runs in
//! bounded memory next to a live writer.
//!
//! Two defaults keep an export from misleading its reader. `--format raw` writes
//! only what the devices sent unless `--direction` says otherwise: a raw file has
//! no direction marks, so the gateway's own replies in it would be read back by
//! `replay` as device frames (duplicates, frames without MN). And the JSON `raw`
//! text shows credentials (`PW`, `NewPW`, `NewSK`) as `<redacted>`, like `params`,
//! so a JSON export can be read or pasted without handing out device passwords;
//! `raw_b64` keeps the exact bytes (the evidence, what `replay` reads).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use serde_json::Value;

use super::{CmdError, is_broken_pipe, require_db, rfc3339_ms};
use crate::protocol::{self, Options};
use crate::store::{Direction, Reader, RecordFilter, StoredRecord, Verdict, export_record_json};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Exact stored bytes back to back.
    Raw,
    /// One export object per line.
    Jsonl,
    /// One row per reading (see [`CSV_HEADER`]).
    Csv,
}

/// Which clock `--since`/`--until` compare against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeBasis {
    /// When the gateway received the record.
    #[default]
    Received,
    /// The device's DataTime (records without one never match).
    Data,
}

/// Options of `export`.
#[derive(Debug, Clone)]
pub struct ExportArgs {
    /// The SQLite file.
    pub db: PathBuf,
    /// Output format.
    pub format: Format,
    /// Record filter (direction, MN, CN, ST, verdict, time bounds).
    pub filter: RecordFilter,
}

/// The CSV header row.
pub const CSV_HEADER: &str = "seq,received_at,mn,cn,data_time,factor,suffix,value,flag";

/// Builds the filter for `--since`/`--until` on the chosen clock (inclusive lower,
/// exclusive upper bound; RFC 3339, or a duration before `now_ms`, see
/// [`parse_when`](super::parse_when)).
pub fn time_filter(
    mut filter: RecordFilter,
    basis: TimeBasis,
    since: Option<&str>,
    until: Option<&str>,
    now_ms: i64,
) -> Result<RecordFilter, CmdError> {
    let since = since
        .map(|s| super::parse_when("--since", s, now_ms))
        .transpose()?;
    let until = until
        .map(|s| super::parse_when("--until", s, now_ms))
        .transpose()?;
    if let (Some(a), Some(b)) = (since, until) {
        if a >= b {
            return Err(CmdError::Usage(
                "--since must be before --until (the range is [since, until))".into(),
            ));
        }
    }
    match basis {
        TimeBasis::Received => {
            filter.received_from_ms = since;
            filter.received_before_ms = until;
        }
        TimeBasis::Data => {
            filter.data_time_from_ms = since;
            filter.data_time_before_ms = until;
        }
    }
    Ok(filter)
}

/// Writes the matching records to `out`; returns how many records matched. A closed
/// pipe ends the export quietly (`export | head`).
pub fn run(args: &ExportArgs, out: &mut dyn Write) -> Result<u64, CmdError> {
    require_db(&args.db)?;
    let reader = Reader::open(&args.db)?;
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut count = 0;
    let result = (|| -> Result<(), CmdError> {
        let w = CmdError::io("write the export");
        if args.format == Format::Csv {
            writeln!(out, "{CSV_HEADER}").map_err(CmdError::io("write the export"))?;
        }
        for rec in reader.records(args.filter.clone())? {
            let rec = rec?;
            match args.format {
                Format::Raw => out
                    .write_all(&rec.raw)
                    .map_err(CmdError::io("write the export"))?,
                Format::Jsonl => {
                    serde_json::to_writer(&mut out, &Value::Object(export_json(&rec)))
                        .map_err(|e| CmdError::io("write the export")(e.into()))?;
                    out.write_all(b"\n")
                        .map_err(CmdError::io("write the export"))?;
                }
                Format::Csv => {
                    write_csv_rows(&rec, &mut out).map_err(CmdError::io("write the export"))?
                }
            }
            count += 1;
        }
        out.flush().map_err(w)
    })();
    match result {
        Err(CmdError::Io { source, .. }) if is_broken_pipe(&source) => Ok(count),
        Err(e) => Err(e),
        Ok(()) => Ok(count),
    }
}

/// The JSON object of one record as `export` (and `tail --json`) print it: the
/// store's export object with credentials in `raw` shown as `<redacted>`;
/// `raw_b64` stays the exact stored bytes.
pub fn export_json(rec: &StoredRecord) -> serde_json::Map<String, Value> {
    let mut m = export_record_json(rec);
    if let Some(Value::String(raw)) = m.get_mut("raw") {
        if let Some(redacted) = redact_credentials(raw) {
            *raw = redacted;
        }
    }
    m
}

/// HJ 212 keys whose values are credentials: the header's `PW`, and `NewPW`
/// (CN 1072, set password) and `NewSK` (a new SM4 key) in CP.
const CREDENTIAL_KEYS: [&str; 3] = ["PW", "NewPW", "NewSK"];

/// `text` with the value of every credential key replaced by `<redacted>`, or
/// `None` when it has none. A key is the text between a field separator (`;`,
/// `,`, `&`, or the start) and `=`, compared without case, as the decoder reads
/// a `pw=` header too (finding `field.case`).
pub fn redact_credentials(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    for field in text.split_inclusive([';', ',', '&']) {
        let body = field.trim_end_matches([';', ',', '&']);
        // The first field starts with `##dddd` (`##0295QN=`) and the CRC with CR LF
        // ends the last (`&&4F40\r\n`): neither is a credential key.
        match body.split_once('=') {
            Some((key, value))
                if !value.is_empty()
                    && CREDENTIAL_KEYS.iter().any(|k| key.eq_ignore_ascii_case(k)) =>
            {
                out.push_str(key);
                out.push_str("=<redacted>");
                out.push_str(&field[body.len()..]);
                changed = true;
            }
            _ => out.push_str(field),
        }
    }
    changed.then_some(out)
}

/// One reading of a frame: factor code, suffix, the value's exact text, and the
/// factor's `Flag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// Factor code (`a21026`).
    pub factor: String,
    /// Suffix (`Rtd`, `Avg`, ...).
    pub suffix: String,
    /// The value exactly as the device wrote it.
    pub value: String,
    /// The same factor's `Flag` value, if sent.
    pub flag: Option<String>,
}

/// The readings of a stored record, in the frame's order; `Flag` items become the
/// `flag` of their factor's readings rather than readings of their own. A key
/// repeated in one frame keeps its last value (as the stored document does).
///
/// Values come from re-reading the stored raw bytes, so they keep the device's
/// digits (`+1.50`, `.5`). An encrypted frame cannot be re-read without its key, so
/// its readings come from the document stored at ingest (decrypted then).
pub fn readings(rec: &StoredRecord) -> Vec<Reading> {
    if rec.direction != Direction::In || !rec.has_document() {
        return Vec::new();
    }
    let frame = protocol::decode(
        Bytes::copy_from_slice(&rec.raw),
        &Options::new(chrono::DateTime::UNIX_EPOCH),
        &(),
    );
    let mut items: Vec<(String, String, String)> = Vec::new();
    if frame.encryption.is_none() {
        for p in &frame.pairs {
            if let (Some(c), Some(s)) = (p.code, p.suffix) {
                items.push((
                    frame.text(c).into_owned(),
                    frame.text(s).into_owned(),
                    frame.text(p.value).into_owned(),
                ));
            }
        }
    } else if let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(&rec.document()) {
        if let Some(Value::Object(values)) = doc.get("values") {
            for (code, sfx) in values {
                if let Value::Object(sfx) = sfx {
                    for (s, v) in sfx {
                        let text = match v {
                            Value::String(t) => t.clone(),
                            other => other.to_string(),
                        };
                        items.push((code.clone(), s.clone(), text));
                    }
                }
            }
        }
    }
    // Last value wins for a repeated factor-suffix.
    let mut keep: Vec<(String, String, String)> = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        if !items[i + 1..].iter().any(|o| o.0 == it.0 && o.1 == it.1) {
            keep.push(it.clone());
        }
    }
    let flag_of = |code: &str| {
        keep.iter()
            .find(|(c, s, _)| c == code && s == "Flag")
            .map(|x| x.2.clone())
    };
    keep.iter()
        .filter(|(_, s, _)| s != "Flag")
        .map(|(c, s, v)| Reading {
            factor: c.clone(),
            suffix: s.clone(),
            value: v.clone(),
            flag: flag_of(c),
        })
        .collect()
}

fn csv_field(out: &mut dyn Write, s: &str) -> std::io::Result<()> {
    if s.contains([',', '"', '\r', '\n']) {
        write!(out, "\"{}\"", s.replace('"', "\"\""))
    } else {
        out.write_all(s.as_bytes())
    }
}

fn write_csv_rows(rec: &StoredRecord, out: &mut dyn Write) -> std::io::Result<()> {
    let received = rfc3339_ms(rec.received_at_ms);
    for r in readings(rec) {
        write!(out, "{},{received},", rec.seq)?;
        for (i, f) in [
            rec.mn.as_deref().unwrap_or(""),
            rec.cn.as_deref().unwrap_or(""),
            rec.data_time.as_deref().unwrap_or(""),
            &r.factor,
            &r.suffix,
            &r.value,
            r.flag.as_deref().unwrap_or(""),
        ]
        .iter()
        .enumerate()
        {
            if i > 0 {
                out.write_all(b",")?;
            }
            csv_field(out, f)?;
        }
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Write stored records in seq order, optionally filtered (works while serve is running).
///
/// Filters combine with AND and are exact matches. --since is inclusive, --until
/// exclusive; each is an RFC 3339 instant or a duration ago (90s, 15m, 24h, 7d),
/// compared with the receive time, or with the device's DataTime under --time data
/// (records without a DataTime then never match).
///
/// --format raw writes only the frames devices sent (--direction in) unless
/// --direction is given: a raw file cannot mark the gateway's replies, and replay
/// would count them as device frames. JSON shows PW, NewPW and NewSK in "raw" as
/// <redacted>; "raw_b64" is the exact stored bytes, passwords included.
///
/// Examples:
///   hj212-gateway export --data /var/lib/hj212-gateway --format raw -o capture.bin
///   hj212-gateway export --data /var/lib/hj212-gateway --since 24h --format csv
///   hj212-gateway export --mn 010000A8900016F000169DC0 --cn 2011 --verdict accepted \
///       --time data --since 2024-06-01T00:00:00+08:00 --until 2024-06-02T00:00:00+08:00 --format csv
///
/// Exit 0 on success (also when a pipe reader goes away), 2 on usage or I/O errors.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ExportFlags {
    #[command(flatten)]
    log: super::LogFlags,
    /// raw: the exact stored bytes back to back; jsonl: one object per record;
    /// csv: one row per reading (seq,received_at,mn,cn,data_time,factor,suffix,value,flag).
    #[arg(long, value_enum, default_value = "jsonl")]
    format: FormatArg,
    /// Which records [default: in with --format raw, else all].
    #[arg(long, value_enum)]
    direction: Option<DirectionArg>,
    /// Only this MN.
    #[arg(long)]
    mn: Option<String>,
    /// Only this CN (e.g. 2011).
    #[arg(long)]
    cn: Option<String>,
    /// Only this ST (e.g. 31).
    #[arg(long)]
    st: Option<String>,
    /// Only records at or after this: RFC 3339 (2024-06-01T00:00:00+08:00) or a
    /// duration ago (24h).
    #[arg(long)]
    since: Option<String>,
    /// Only records before this (exclusive): RFC 3339 or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// Clock that --since/--until compare with.
    #[arg(long, value_enum, default_value = "received")]
    time: TimeArg,
    /// Only this verdict.
    #[arg(long, value_enum)]
    verdict: Option<VerdictArg>,
    /// Output file (default stdout).
    #[arg(long, short)]
    output: Option<PathBuf>,
}

// A doc comment on a value becomes its description in `--help`; of these
// values only those of `--time` have one.

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Raw,
    Jsonl,
    Csv,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TimeArg {
    /// When the gateway received the record.
    Received,
    /// The device's DataTime.
    Data,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum VerdictArg {
    Accepted,
    Rejected,
    Junk,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DirectionArg {
    In,
    Out,
    All,
}

/// Runs `export` from the command line: records to `--output` or stdout, the
/// count on stderr, the exit code back.
pub fn main(flags: ExportFlags) -> ExitCode {
    let filter = RecordFilter {
        direction: match flags.direction {
            Some(DirectionArg::In) => Some(Direction::In),
            Some(DirectionArg::Out) => Some(Direction::Out),
            Some(DirectionArg::All) => None,
            None if matches!(flags.format, FormatArg::Raw) => Some(Direction::In),
            None => None,
        },
        mn: flags.mn,
        cn: flags.cn,
        st: flags.st,
        verdict: flags.verdict.map(|v| match v {
            VerdictArg::Accepted => Verdict::Accepted,
            VerdictArg::Rejected => Verdict::Rejected,
            VerdictArg::Junk => Verdict::Junk,
        }),
        ..RecordFilter::default()
    };
    let basis = match flags.time {
        TimeArg::Received => TimeBasis::Received,
        TimeArg::Data => TimeBasis::Data,
    };
    let result = time_filter(
        filter,
        basis,
        flags.since.as_deref(),
        flags.until.as_deref(),
        chrono::Utc::now().timestamp_millis(),
    )
    .and_then(|filter| {
        let args = ExportArgs {
            db: flags.log.db(None),
            format: match flags.format {
                FormatArg::Raw => Format::Raw,
                FormatArg::Jsonl => Format::Jsonl,
                FormatArg::Csv => Format::Csv,
            },
            filter,
        };
        // Checked before the output file is created, so a typo in --db
        // does not leave an empty file behind.
        require_db(&args.db)?;
        match &flags.output {
            Some(p) => {
                let f = std::fs::File::create(p).map_err(CmdError::io(p.display().to_string()))?;
                run(&args, &mut std::io::BufWriter::new(f))
            }
            None => run(&args, &mut std::io::stdout().lock()),
        }
    });
    match result {
        Ok(n) => {
            eprintln!("exported {n} records");
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_raw_text_are_redacted_and_nothing_else_changes() {
        let frame = "##0120QN=20240601085857000;ST=31;CN=1072;PW=123456;MN=M1;Flag=5;\
                     CP=&&NewPW=654321;newsk=00FF&&4F40\r\n";
        assert_eq!(
            redact_credentials(frame).unwrap(),
            "##0120QN=20240601085857000;ST=31;CN=1072;PW=<redacted>;MN=M1;Flag=5;\
             CP=&&NewPW=<redacted>;newsk=<redacted>&&4F40\r\n"
        );
        let lower = "##0050QN=1;pw=abc;MN=M1;CP=&&&&0000\r\n";
        assert_eq!(
            redact_credentials(lower).unwrap(),
            "##0050QN=1;pw=<redacted>;MN=M1;CP=&&&&0000\r\n"
        );
        assert_eq!(redact_credentials("##0010QN=1;MN=M1;CP=&&&&"), None);
        // A key that only ends in PW is not the password.
        assert_eq!(redact_credentials("XPW=1;a-PW=2"), None);
    }
}
