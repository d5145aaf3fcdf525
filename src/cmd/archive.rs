//! `archive`: seal the log's complete periods into read-only archives now, and apply
//! retention ([`store::archive::maintain`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{CmdError, parse_instant, require_db, rfc3339_ms};
use crate::config::Config;
use crate::daemon;
use crate::evidence::key::{KeyError, SigningKey};
use crate::store::archive::{self, ArchiveRow, MaintainReport};

/// Options of `archive`.
#[derive(Debug, Clone)]
pub struct ArchiveArgs {
    /// The live log.
    pub db: PathBuf,
    /// `[store]` of the config (defaults when none was given).
    pub config: Config,
    /// Also seal everything received before this instant (UTC unix ms).
    pub before_ms: Option<i64>,
    /// The signing key file for tombstones.
    pub key: PathBuf,
    /// "Now" (UTC unix ms); tests pass a fixed one.
    pub now_ms: i64,
}

/// Seals and retires; returns what was done.
pub fn run(args: &ArchiveArgs) -> Result<MaintainReport, CmdError> {
    require_db(&args.db)?;
    let signer = load_signer(&args.key)?;
    let policy = args.config.store.archive_policy();
    Ok(archive::maintain_before(
        &args.db,
        &policy,
        args.now_ms,
        args.before_ms,
        signer.as_ref().map(|s| s as &dyn signed_note::Signer),
    )?)
}

/// The tombstone signer from `path`: `None` when there is no key file (retention
/// then refuses to delete; sealing works), an error when the file is unreadable,
/// readable by others, or not a signer key.
pub fn load_signer(path: &Path) -> Result<Option<SigningKey>, CmdError> {
    match SigningKey::load(path) {
        Ok(k) => Ok(Some(k)),
        Err(KeyError::NotFound { .. }) => Ok(None),
        Err(e) => Err(CmdError::Usage(e.to_string())),
    }
}

fn line(verb: &str, a: &ArchiveRow, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{verb} seqs {}..={} ({} records, received {} .. {}) -> {} ({} bytes)",
        a.first_seq,
        a.last_seq,
        a.records,
        rfc3339_ms(a.period_start_ms),
        rfc3339_ms(a.period_end_ms),
        a.file,
        a.bytes
    )
}

/// Prints the report the way the CLI shows it.
pub fn print(r: &MaintainReport, out: &mut dyn Write) -> std::io::Result<()> {
    if r.orphans_removed > 0 {
        writeln!(
            out,
            "removed {} file(s) an interrupted run left",
            r.orphans_removed
        )?;
    }
    for a in &r.sealed {
        line("sealed", a, out)?;
    }
    for a in &r.deleted {
        line("deleted (tombstone kept)", a, out)?;
    }
    if r.records_purged > 0 {
        writeln!(
            out,
            "{} archived record(s) removed from the live log (its file keeps its size; the pages are reused)",
            r.records_purged
        )?;
    }
    if r.sealed.is_empty() && r.deleted.is_empty() {
        writeln!(out, "nothing to seal or delete")?;
    }
    Ok(())
}

/// Seal every complete period of the log into a read-only, compressed archive in
/// <dir of the log>/archive/ and apply [store] retain.
///
/// Periods are [store] seal_every long (default 30d), aligned to the Unix epoch,
/// by reception time. Safe while serve runs on the same log. export, replay,
/// verify, stats and tail read archives and the live log alike. Retention deletes
/// an archive only with a tombstone signed by <data dir>/checkpoint.key (see
/// keygen); without the key it refuses, sealing still works.
///
/// Examples:
///   hj212-gateway archive --data /var/lib/hj212-gateway --config /etc/hj212-gateway/gateway.toml
///   hj212-gateway archive --db frames.db --before 2026-01-01T00:00:00+08:00
///
/// Exit 0 done (also when there was nothing to do), 2 on errors, 78 bad --config.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ArchiveFlags {
    /// Data directory (default: $STATE_DIRECTORY, else ./data).
    #[arg(long, conflicts_with = "db")]
    data: Option<PathBuf>,
    /// The SQLite file itself.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Gateway config ([store] path, seal_every, retain).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Also seal everything received before this instant (RFC 3339), even from a
    /// period not yet complete.
    #[arg(long, value_name = "RFC3339")]
    before: Option<String>,
}

/// Runs `archive` from the command line.
pub fn main(flags: ArchiveFlags) -> ExitCode {
    let result = (|| {
        let cfg = super::load_config(flags.config.as_deref())?;
        let before_ms = flags
            .before
            .as_deref()
            .map(|t| parse_instant("--before", t))
            .transpose()?;
        let db = super::resolve_db(flags.data.as_deref(), flags.db.as_deref(), cfg.as_ref());
        // `[evidence] key` is relative to the data directory; with only --db,
        // the log's own directory stands in for it.
        let key_dir = match (&flags.data, &flags.db) {
            (None, Some(db)) => db
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_owned),
            _ => daemon::data_dir(flags.data.as_deref()),
        };
        let cfg = cfg.unwrap_or_default();
        let key = cfg.evidence.key_path(&key_dir);
        let args = ArchiveArgs {
            db,
            config: cfg,
            before_ms,
            key,
            now_ms: chrono::Utc::now().timestamp_millis(),
        };
        run(&args)
    })();
    match result {
        Ok(r) => {
            let _ = print(&r, &mut std::io::stdout().lock());
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(&e),
    }
}
