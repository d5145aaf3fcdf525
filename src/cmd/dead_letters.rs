//! `dead-letters`: lists the records the log's consumers set aside, and marks
//! entries for re-drive (see README "Dead letters").

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

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

/// List the records the log's consumers could not deliver and set aside (see README "Dead letters").
///
/// Examples:
///   hj212-gateway dead-letters --data /var/lib/hj212-gateway
///   hj212-gateway dead-letters --consumer mqtt --json
///   hj212-gateway dead-letters redrive --id 12
///
/// Exit 0 on success, 2 on usage or store errors.
// This doc comment is the `--help` text, written for a terminal: rustdoc would
// read its `<name>` as markup.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct DeadLettersFlags {
    /// Data directory (default: $STATE_DIRECTORY, else ./data).
    #[arg(long, conflicts_with = "db", global = true)]
    data: Option<PathBuf>,
    /// The SQLite file itself.
    #[arg(long, global = true)]
    db: Option<PathBuf>,
    /// Only this consumer: mqtt, mqtt.merge, mqtt.alarms, upstream.<name>, alarms.
    #[arg(long, global = true)]
    consumer: Option<String>,
    /// Only entries in this state: dead, redrive, resolved.
    #[arg(long)]
    state: Option<String>,
    /// JSON lines (schema hj212.dead_letter.v1) instead of the table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: Option<Action>,
}

/// What `dead-letters` does besides listing.
#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Mark entries for re-drive: the running gateway's consumer sends them once
    /// more (within seconds, or at its next start) and marks them resolved, or dead
    /// again with one more attempt.
    ///
    /// Examples:
    ///   hj212-gateway dead-letters redrive --id 12 --id 13
    ///   hj212-gateway dead-letters redrive --consumer upstream.cnemc --all
    #[command(verbatim_doc_comment)]
    Redrive {
        /// An entry id from the listing (repeatable).
        #[arg(long = "id")]
        ids: Vec<i64>,
        /// Every `dead` entry (of --consumer, if given).
        #[arg(long)]
        all: bool,
    },
}

/// Runs `dead-letters` (the listing, or `redrive`) from the command line: the
/// output on stdout, the exit code back.
pub fn main(flags: DeadLettersFlags) -> ExitCode {
    let db = super::resolve_db(flags.data.as_deref(), flags.db.as_deref(), None);
    let consumer = flags.consumer;
    let mut out = std::io::stdout().lock();
    let r = match flags.action {
        None => list(
            &ListArgs {
                db,
                consumer,
                state: flags.state,
                json: flags.json,
            },
            &mut out,
        ),
        Some(Action::Redrive { ids, all }) => redrive(
            &RedriveArgs {
                db,
                consumer,
                ids,
                all,
            },
            &mut out,
        ),
    };
    match r {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => super::fail(&e),
    }
}
