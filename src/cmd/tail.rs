//! `tail`: follow the log live, like `tail -f` for frames.
//!
//! Polls a read-only connection every [`POLL`] for records after the last one shown
//! (a cheap primary-key range query), so it never disturbs the writer. Ends with
//! exit 0 on Ctrl-C / SIGTERM, and when the reader of its output goes away: at
//! once when stdout is a pipe or terminal (the kernel flags the fd), else with EPIPE
//! on the next write. A filter that matches nothing writes nothing, so waiting for
//! EPIPE alone left `tail --mn X | head` running forever.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use super::{CmdError, is_broken_pipe, require_db, rfc3339_ms};
use crate::ingest::CrcHint;
use crate::store::{Direction, Reader, RecordFilter, StoredRecord, Verdict};

/// How often the log is polled.
pub const POLL: Duration = Duration::from_millis(200);

/// How many factor values a line shows.
const VALUES_SHOWN: usize = 4;

/// Output style of `tail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailFormat {
    /// One readable line per record.
    Line,
    /// The exact stored bytes.
    Raw,
    /// The export object, one per line.
    Json,
}

/// Options of `tail`.
#[derive(Debug, Clone)]
pub struct TailArgs {
    /// The SQLite file.
    pub db: PathBuf,
    /// Only this MN.
    pub mn: Option<String>,
    /// Only this CN.
    pub cn: Option<String>,
    /// Output style.
    pub format: TailFormat,
    /// Start after this seq (default: the end of the log when `tail` starts).
    pub since_seq: Option<u64>,
}

/// Follows the log until interrupted or the output closes. Exit 0 in both cases.
pub fn run(args: &TailArgs) -> Result<(), CmdError> {
    require_db(&args.db)?;
    let reader = Reader::open(&args.db)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CmdError::io("start the runtime"))?;
    let stdout = std::io::stdout();
    let colour = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut last = match args.since_seq {
        Some(s) => s,
        None => reader.last_seq()?,
    };
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(CmdError::io("install the SIGTERM handler"))?;
        loop {
            if reader_gone() {
                return Ok(());
            }
            let top = reader.last_seq()?;
            if top > last {
                let filter = RecordFilter {
                    after_seq: last,
                    until_seq: Some(top),
                    mn: args.mn.clone(),
                    cn: args.cn.clone(),
                    ..RecordFilter::default()
                };
                for rec in reader.records(filter)? {
                    let rec = rec?;
                    if let Err(e) = show(&rec, args.format, colour, &mut out) {
                        return done(e);
                    }
                }
                if let Err(e) = out.flush() {
                    return done(e);
                }
                last = top;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = term.recv() => return Ok(()),
            }
        }
    })
}

/// True when the reader of stdout went away though nothing was written to it:
/// poll(2) flags the write end of a pipe whose read end is closed (`POLLERR`) and
/// a hung-up terminal (`POLLHUP`) whatever was asked for. Regular files and
/// `/dev/null` have no reader to lose and are never flagged.
fn reader_gone() -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let stdout = std::io::stdout();
    let mut fds = [PollFd::new(&stdout, PollFlags::empty())];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)).is_ok()
        && fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP)
}

fn done(e: std::io::Error) -> Result<(), CmdError> {
    if is_broken_pipe(&e) {
        Ok(())
    } else {
        Err(CmdError::io("write to stdout")(e))
    }
}

fn show(
    rec: &StoredRecord,
    format: TailFormat,
    colour: bool,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    match format {
        TailFormat::Raw => out.write_all(&rec.raw),
        TailFormat::Json => {
            let mut obj = super::export::export_json(rec);
            if let Some(h) = crc_hint(rec) {
                obj.insert("hint".into(), Value::String(hint_text(&h)));
            }
            serde_json::to_writer(&mut *out, &Value::Object(obj))?;
            out.write_all(b"\n")
        }
        TailFormat::Line => writeln!(out, "{}", line(rec, colour)),
    }
}

/// The CRC hint of a rejected inbound frame (see [`CrcHint`]).
fn crc_hint(rec: &StoredRecord) -> Option<CrcHint> {
    (rec.direction == Direction::In && rec.verdict == Verdict::Rejected)
        .then(|| CrcHint::from_json(&rec.findings))
        .flatten()
}

/// `sends MODBUS CRC: set crc = "modbus" for this device ([[device]] crc = "modbus")`.
fn hint_text(h: &CrcHint) -> String {
    format!("{}: {}", h.sends(), h.fix())
}

/// The readable line for one record: time, peer, direction, MN, CN, verdict, the
/// first few factor values (`Rtd`, else `Avg`, else the first suffix) and the first
/// error finding of a rejected frame.
pub fn line(rec: &StoredRecord, colour: bool) -> String {
    let paint = |code: &str, s: &str| {
        if colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    };
    let verdict = match rec.verdict {
        Verdict::Accepted => paint("32", "accepted"),
        Verdict::Rejected => paint("31", "rejected"),
        Verdict::Junk => paint("33", "junk"),
    };
    let dir = match rec.direction {
        Direction::In => "<-",
        Direction::Out => "->",
    };
    let mut s = format!(
        "{} #{} {} {} MN={} CN={} {}",
        rfc3339_ms(rec.received_at_ms),
        rec.seq,
        rec.peer,
        dir,
        rec.mn.as_deref().unwrap_or("-"),
        rec.cn.as_deref().unwrap_or("-"),
        verdict
    );
    if rec.verdict == Verdict::Junk {
        s.push_str(&format!(" {} bytes", rec.raw.len()));
    }
    let doc: Option<serde_json::Map<String, Value>> = serde_json::from_str(&rec.document()).ok();
    if let Some(Value::Object(values)) = doc.as_ref().and_then(|d| d.get("values")) {
        for (code, v) in values.iter().take(VALUES_SHOWN) {
            let Value::Object(sfx) = v else { continue };
            let pick = ["Rtd", "Avg"]
                .iter()
                .find_map(|k| sfx.get(*k).map(|v| (*k, v)))
                .or_else(|| sfx.iter().next().map(|(k, v)| (k.as_str(), v)));
            if let Some((k, v)) = pick {
                let v = match v {
                    Value::String(t) => t.clone(),
                    o => o.to_string(),
                };
                s.push_str(&format!(" {code}-{k}={v}"));
            }
        }
        if values.len() > VALUES_SHOWN {
            s.push_str(&format!(" (+{})", values.len() - VALUES_SHOWN));
        }
    }
    if rec.verdict == Verdict::Rejected {
        if let Ok(Value::Array(f)) = serde_json::from_str::<Value>(&rec.findings) {
            if let Some(code) = f
                .iter()
                .find(|x| x["severity"] == "error")
                .and_then(|x| x["code"].as_str())
            {
                s.push_str(&format!(" [{}]", paint("31", code)));
            }
        }
        if let Some(h) = crc_hint(rec) {
            s.push_str(&format!(" {}", hint_text(&h)));
        }
    }
    if rec.duplicate {
        s.push_str(" (duplicate)");
    }
    s
}

/// Follow the log live, one line per record (time, peer, MN, CN, verdict, values).
///
/// Starts at the end of the log unless --since-seq is given; polls every 200 ms.
/// Colours only on a terminal (and not with NO_COLOR).
///
/// Examples:
///   hj212-gateway tail --data /var/lib/hj212-gateway --mn 010000A8900016F000169DC0
///   hj212-gateway tail --raw --since-seq 0 | hj212-gateway decode -
///
/// Exit 0 on Ctrl-C, SIGTERM or a closed pipe; 2 on errors.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct TailFlags {
    #[command(flatten)]
    log: super::LogFlags,
    /// Only this MN.
    #[arg(long)]
    mn: Option<String>,
    /// Only this CN.
    #[arg(long)]
    cn: Option<String>,
    /// Print the exact stored bytes.
    #[arg(long, conflicts_with = "json")]
    raw: bool,
    /// Print one export JSON object per record (as `export`: credentials in "raw"
    /// redacted, "raw_b64" exact).
    #[arg(long)]
    json: bool,
    /// Start after this seq (0: from the beginning).
    #[arg(long, value_name = "N")]
    since_seq: Option<u64>,
}

/// Runs `tail` from the command line until interrupted; returns the exit code.
pub fn main(flags: TailFlags) -> ExitCode {
    let args = TailArgs {
        db: flags.log.db(None),
        mn: flags.mn,
        cn: flags.cn,
        format: if flags.raw {
            TailFormat::Raw
        } else if flags.json {
            TailFormat::Json
        } else {
            TailFormat::Line
        },
        since_seq: flags.since_seq,
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail(&e),
    }
}
