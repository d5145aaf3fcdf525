//! `dead-letters`: lists the records the log's consumers set aside, and marks
//! entries for re-drive (see README "Dead letters").

use std::io::Write;
use std::path::PathBuf;

use super::CmdError;
use crate::store::{
    DEAD_LETTER_STATES, DeadLetterFilter, NOT_REDRIVABLE, list_dead_letters, mark_redrive,
};

/// Arguments of `dead-letters` (list).
#[derive(Debug, Clone)]
pub struct ListArgs {
    /// The SQLite file.
    pub db: PathBuf,
    /// Only this consumer (`mqtt`, `mqtt.merge`, `mqtt.alarms`, `upstream.<name>`, `alarms`).
    pub consumer: Option<String>,
    /// Only this state (`dead`, `redrive`, `resolved`).
    pub state: Option<String>,
    /// JSON lines (`hj212.dead_letter.v1`) instead of the table.
    pub json: bool,
}

/// Prints the entries; returns how many.
pub fn list(args: &ListArgs, out: &mut dyn Write) -> Result<usize, CmdError> {
    super::require_db(&args.db)?;
    if let Some(s) = &args.state {
        if !DEAD_LETTER_STATES.contains(&s.as_str()) {
            return Err(CmdError::Usage(format!(
                "--state {s:?}: expected one of {}",
                DEAD_LETTER_STATES.join(", ")
            )));
        }
    }
    let rows = list_dead_letters(
        &args.db,
        &DeadLetterFilter {
            consumer: args.consumer.clone(),
            state: args.state.clone(),
        },
    )?;
    let mut w = || -> std::io::Result<()> {
        if !args.json {
            writeln!(
                out,
                "{:>6}  {:<20}  {:>10}  {:<14}  {:<8}  {:>8}  {:<24}  detail",
                "id", "consumer", "seq", "reason", "state", "attempts", "last"
            )?;
        }
        for r in &rows {
            if args.json {
                writeln!(out, "{}", r.to_json())?;
                continue;
            }
            writeln!(
                out,
                "{:>6}  {:<20}  {:>10}  {:<14}  {:<8}  {:>8}  {:<24}  {}",
                r.id,
                r.consumer,
                r.seq,
                r.reason,
                r.state,
                r.attempts,
                super::rfc3339_ms(r.last_ms),
                r.detail.escape_debug()
            )?;
        }
        Ok(())
    };
    match w() {
        Ok(()) => Ok(rows.len()),
        Err(e) if super::is_broken_pipe(&e) => Ok(rows.len()),
        Err(e) => Err(CmdError::Io {
            context: "write the listing".into(),
            source: e,
        }),
    }
}

/// Arguments of `dead-letters redrive`.
#[derive(Debug, Clone)]
pub struct RedriveArgs {
    /// The SQLite file.
    pub db: PathBuf,
    /// Only entries of this consumer.
    pub consumer: Option<String>,
    /// These entries (ids from the listing); empty with `all`.
    pub ids: Vec<i64>,
    /// Every `dead` entry (of `consumer`, if given).
    pub all: bool,
}

/// Marks entries for re-drive; the running gateway's consumer picks them up within
/// seconds (or at its next start). Returns how many were marked.
pub fn redrive(args: &RedriveArgs, out: &mut dyn Write) -> Result<usize, CmdError> {
    super::require_db(&args.db)?;
    if args.ids.is_empty() != args.all {
        return Err(CmdError::Usage(
            "give the entries to re-drive: --id N (repeatable) or --all".into(),
        ));
    }
    if let Some(c) = args
        .consumer
        .as_deref()
        .filter(|c| NOT_REDRIVABLE.contains(c))
    {
        return Err(CmdError::Usage(format!(
            "entries of {c} cannot be re-driven (a merged group is rebuilt from packets that \
             were each published; alarms come back through `replay`)"
        )));
    }
    let n = mark_redrive(&args.db, args.consumer.as_deref(), &args.ids)?;
    let _ = writeln!(
        out,
        "{n} entries marked for re-drive; the gateway retries them and marks them resolved \
         (entries of {} are never marked)",
        NOT_REDRIVABLE.join(", ")
    );
    Ok(n)
}
