//! `alarms`: lists the detector's alarms from the store.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use super::CmdError;
use crate::store::{AlarmFilter, AlarmStore};

/// Arguments of `alarms`.
#[derive(Debug, Clone)]
pub struct AlarmsArgs {
    /// The SQLite file.
    pub db: PathBuf,
    /// Only active alarms.
    pub active: bool,
    /// Only this MN.
    pub mn: Option<String>,
    /// Only alarms still active at or ended after this: RFC 3339, or a duration
    /// (`24h`) meaning that long ago.
    pub since: Option<String>,
    /// JSON lines (`hj212.alarm.v1`) instead of the table.
    pub json: bool,
}

pub(crate) fn parse_since(text: &str, now_ms: i64) -> Result<i64, CmdError> {
    super::parse_when("--since", text, now_ms)
}

/// Prints the alarms; returns how many.
pub fn run(args: &AlarmsArgs, out: &mut dyn Write) -> Result<usize, CmdError> {
    let since_ms = args
        .since
        .as_deref()
        .map(|s| parse_since(s, chrono::Utc::now().timestamp_millis()))
        .transpose()?;
    let store = AlarmStore::open_read_only(&args.db)?;
    let rows = store.list(&AlarmFilter {
        active: args.active,
        mn: args.mn.clone(),
        since_ms,
    })?;
    let io = CmdError::io("write the listing");
    let mut w = || -> std::io::Result<()> {
        if !args.json {
            writeln!(
                out,
                "{:>6}  {:<18}  {:<8}  {:<24}  {:<7}  {:<24}  {:<24}  message",
                "id", "kind", "severity", "mn", "factor", "start", "end"
            )?;
        }
        for r in &rows {
            if args.json {
                writeln!(out, "{}", r.to_json(None))?;
            } else {
                let j = r.to_json(None);
                let s = |k: &str| j[k].as_str().unwrap_or("-").to_owned();
                writeln!(
                    out,
                    "{:>6}  {:<18}  {:<8}  {:<24}  {:<7}  {:<24}  {:<24}  {}",
                    r.id,
                    r.kind,
                    r.severity,
                    r.mn,
                    if r.factor.is_empty() { "-" } else { &r.factor },
                    s("start"),
                    if r.end_ms.is_some() {
                        s("end")
                    } else {
                        "active".into()
                    },
                    r.message_en
                )?;
            }
        }
        Ok(())
    };
    w().map_err(io)?;
    Ok(rows.len())
}

/// Lists the anomaly detector's alarms (see README "Alarms").
///
/// Example: hj212-gateway alarms --data /var/lib/hj212-gateway --active --since 24h
///
/// Exit 0 on success, 2 on errors.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct AlarmsFlags {
    #[command(flatten)]
    log: super::LogFlags,
    /// Only alarms that are still active.
    #[arg(long)]
    active: bool,
    /// Only this device.
    #[arg(long)]
    mn: Option<String>,
    /// Only alarms active at or ended after this: RFC 3339 or a duration ago (24h).
    #[arg(long)]
    since: Option<String>,
    /// JSON lines (schema hj212.alarm.v1) instead of the table.
    #[arg(long)]
    json: bool,
}

/// Runs `alarms` from the command line: the listing on stdout, the exit code back.
pub fn main(flags: AlarmsFlags) -> ExitCode {
    let args = AlarmsArgs {
        db: flags.log.db(None),
        active: flags.active,
        mn: flags.mn,
        since: flags.since,
        json: flags.json,
    };
    match run(&args, &mut std::io::stdout().lock()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => super::fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_rfc3339_and_durations() {
        assert_eq!(
            parse_since("2h", 10_000_000).unwrap(),
            10_000_000 - 7_200_000
        );
        assert_eq!(parse_since("1970-01-01T00:00:01Z", 0).unwrap(), 1000);
        assert!(parse_since("yesterday", 0).is_err());
        assert_eq!(parse_since("7d", 7 * 86_400_000).unwrap(), 0);
        assert_eq!(
            crate::cmd::parse_when("--until", " 90s ", 100_000).unwrap(),
            10_000
        );
    }
}
