//! `exchanges`: lists how the gateway's requests to devices ended.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use super::CmdError;
use crate::store::{ExchangeFilter, list_exchanges};

/// Arguments of `exchanges`.
#[derive(Debug, Clone)]
pub struct ExchangesArgs {
    /// The SQLite file.
    pub db: PathBuf,
    /// Only this MN.
    pub mn: Option<String>,
    /// Only exchanges that ended at or after this: RFC 3339, or a duration
    /// (`24h`) meaning that long ago.
    pub since: Option<String>,
    /// JSON lines (`hj212.downlink_exchange.v1`) instead of the table.
    pub json: bool,
}

/// Prints the exchanges; returns how many.
pub fn run(args: &ExchangesArgs, out: &mut dyn Write) -> Result<usize, CmdError> {
    let since_ms = args
        .since
        .as_deref()
        .map(|s| super::alarms::parse_since(s, chrono::Utc::now().timestamp_millis()))
        .transpose()?;
    let rows = list_exchanges(
        &args.db,
        &ExchangeFilter {
            mn: args.mn.clone(),
            since_ms,
        },
    )?;
    let io = CmdError::io("write the listing");
    let mut w = || -> std::io::Result<()> {
        if !args.json {
            writeln!(
                out,
                "{:>6}  {:<24}  {:<24}  {:<17}  {:>4}  {:<14}  {:<12}  {:>6}  {:>4}  {:>7}  {:>7}  detail",
                "id",
                "ended",
                "mn",
                "qn",
                "cn",
                "origin",
                "outcome",
                "qnrtn",
                "sent",
                "uploads",
                "req_seq"
            )?;
        }
        for r in &rows {
            let j = r.to_json();
            if args.json {
                writeln!(out, "{j}")?;
                continue;
            }
            let e = &r.exchange;
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            writeln!(
                out,
                "{:>6}  {:<24}  {:<24}  {:<17}  {:>4}  {:<14}  {:<12}  {:>6}  {:>4}  {:>7}  {:>7}  {}",
                r.id,
                j["ended_at"].as_str().unwrap_or("-"),
                e.mn,
                opt(e.qn.clone()),
                e.cn,
                e.origin,
                e.outcome,
                opt(e.qn_rtn.map(|c| c.to_string())),
                e.attempts,
                e.uploads,
                opt(e.request_seq.map(|s| s.to_string())),
                e.detail
            )?;
        }
        Ok(())
    };
    w().map_err(io)?;
    Ok(rows.len())
}

/// Lists how the gateway's requests to devices ended (see README "Exchange outcomes").
///
/// Example: hj212-gateway exchanges --data /var/lib/hj212-gateway --mn MN --since 24h
///
/// Exit 0 on success, 2 on errors.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ExchangesFlags {
    #[command(flatten)]
    log: super::LogFlags,
    /// Only this device.
    #[arg(long)]
    mn: Option<String>,
    /// Only exchanges that ended at or after this: RFC 3339 or a duration ago (24h).
    #[arg(long)]
    since: Option<String>,
    /// JSON lines (schema hj212.downlink_exchange.v1) instead of the table.
    #[arg(long)]
    json: bool,
}

/// Runs `exchanges` from the command line: the listing on stdout, the exit code back.
pub fn main(flags: ExchangesFlags) -> ExitCode {
    let args = ExchangesArgs {
        db: flags.log.db(None),
        mn: flags.mn,
        since: flags.since,
        json: flags.json,
    };
    match run(&args, &mut std::io::stdout().lock()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => super::fail(&e),
    }
}
