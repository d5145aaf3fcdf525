//! `backup`: a consistent copy of the data directory while `serve` runs
//! ([`store::backup`] for the log and its archives, plus `checkpoints.log`).
//!
//! The copy is built in `OUT.tmp` and renamed to `OUT` only once every file in
//! it is on disk, so `OUT` either is a complete backup or does not exist.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{CmdError, require_db};
use crate::notary;
use crate::store::backup::{self, BackupReport};

/// Options of `backup`.
#[derive(Debug, Clone)]
pub struct BackupArgs {
    /// The live log.
    pub db: PathBuf,
    /// The directory holding `checkpoints.log` and the signing key.
    pub data_dir: PathBuf,
    /// The signing key file (reported, never copied).
    pub key: PathBuf,
    /// The directory to create.
    pub out: PathBuf,
}

/// What [`run`] copied.
#[derive(Debug, Clone)]
pub struct BackupDone {
    /// The log and its archives.
    pub log: BackupReport,
    /// The log file inside the backup.
    pub log_file: PathBuf,
    /// Checkpoint notes copied from `checkpoints.log` (`None`: there was none).
    pub checkpoints: Option<usize>,
    /// The signing key, when one exists (it is not part of the backup).
    pub key_left: Option<PathBuf>,
}

/// Creates `args.out` holding a copy of the log, its archives and `checkpoints.log`.
pub fn run(args: &BackupArgs) -> Result<BackupDone, CmdError> {
    require_db(&args.db)?;
    if args.out.symlink_metadata().is_ok() {
        return Err(CmdError::Usage(format!(
            "{}: already exists; backup never overwrites, give a new name",
            args.out.display()
        )));
    }
    let mut tmp = args.out.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if tmp.symlink_metadata().is_ok() {
        return Err(CmdError::Usage(format!(
            "{}: already exists (an interrupted backup?); remove it and run backup again",
            tmp.display()
        )));
    }
    // 0750 like the data directory: the log holds every device's password.
    std::fs::DirBuilder::new()
        .mode(0o750)
        .create(&tmp)
        .map_err(CmdError::io(format!("create {}", tmp.display())))?;
    match fill(args, &tmp) {
        Ok(done) => {
            std::fs::rename(&tmp, &args.out).map_err(CmdError::io(format!(
                "rename {} to {}",
                tmp.display(),
                args.out.display()
            )))?;
            let parent = match args.out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            sync(parent)?;
            let log_file = args.out.join(done.log_file.file_name().unwrap_or_default());
            Ok(BackupDone { log_file, ..done })
        }
        Err(e) => {
            // Only what this run created: nothing else is ever at OUT.tmp.
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn fill(args: &BackupArgs, tmp: &Path) -> Result<BackupDone, CmdError> {
    // checkpoints.log before the log: every checkpoint copied then covers a size
    // the copied log holds, so `verify --checkpoint` on the backup agrees.
    let checkpoints = copy_checkpoints(&args.data_dir.join(notary::LOG_FILE), tmp)?;
    let name = args
        .db
        .file_name()
        .ok_or_else(|| CmdError::Usage(format!("{}: not a file name", args.db.display())))?;
    let log_file = tmp.join(name);
    let log = backup::backup(&args.db, &log_file)?;
    std::fs::set_permissions(&log_file, std::fs::Permissions::from_mode(0o640))
        .map_err(CmdError::io(format!("chmod {}", log_file.display())))?;
    sync(&log_file)?;
    sync(tmp)?;
    Ok(BackupDone {
        log,
        log_file,
        checkpoints,
        key_left: args.key.is_file().then(|| args.key.clone()),
    })
}

/// Copies the complete notes of `from` (the notary may be appending one right
/// now) into `dir`; `None` when there is no such file.
fn copy_checkpoints(from: &Path, dir: &Path) -> Result<Option<usize>, CmdError> {
    let bytes = match std::fs::read(from) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CmdError::io(format!("read {}", from.display()))(e)),
    };
    let text = String::from_utf8_lossy(&bytes);
    let kept = &text[..complete_notes_len(&text)];
    let to = dir.join(notary::LOG_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&to)
        .map_err(CmdError::io(format!("create {}", to.display())))?;
    f.write_all(kept.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(CmdError::io(format!("write {}", to.display())))?;
    Ok(Some(notary::split_notes(kept).len()))
}

/// The length of the prefix of a `checkpoints.log` that ends after a signature
/// line (and the blank line the notary writes after a note): a note caught
/// half-written is left out.
fn complete_notes_len(text: &str) -> usize {
    let mut end = 0;
    let mut at = 0;
    let mut after_signature = false;
    for line in text.split_inclusive('\n') {
        at += line.len();
        if !line.ends_with('\n') {
            break;
        }
        if line.starts_with("\u{2014} ") {
            end = at;
            after_signature = true;
        } else if after_signature && line == "\n" {
            end = at;
            after_signature = false;
        } else {
            after_signature = false;
        }
    }
    end
}

fn sync(path: &Path) -> Result<(), CmdError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(CmdError::io(format!("fsync {}", path.display())))
}

/// Prints what was copied, one line per part.
pub fn print(done: &BackupDone, out: &Path, w: &mut dyn Write) -> std::io::Result<()> {
    let r = &done.log;
    writeln!(
        w,
        "log: seqs 1..={} ({} live records, {} bytes) -> {} (SQLite online backup)",
        r.last_seq,
        r.live_records,
        r.live_bytes,
        done.log_file.display()
    )?;
    if !r.archives.is_empty() {
        let bytes: u64 = r.archives.iter().map(|a| a.bytes).sum();
        let linked = r.archives.iter().filter(|a| a.linked).count();
        writeln!(
            w,
            "archives: {} file(s), {bytes} bytes ({linked} hard-linked, {} copied) -> {}",
            r.archives.len(),
            r.archives.len() - linked,
            out.join(crate::store::archive::ARCHIVE_DIR).display()
        )?;
    }
    if r.tombstones > 0 {
        writeln!(
            w,
            "archives deleted by retention: {} (their signed tombstones are in the log)",
            r.tombstones
        )?;
    }
    match done.checkpoints {
        Some(n) => writeln!(
            w,
            "checkpoints: {n} note(s) -> {}",
            out.join(notary::LOG_FILE).display()
        )?,
        None => writeln!(w, "checkpoints: no {} to copy", notary::LOG_FILE)?,
    }
    if let Some(k) = &done.key_left {
        writeln!(
            w,
            "not copied: {} (the signing key: keep its own backup, apart from the log's)",
            k.display()
        )?;
    }
    writeln!(w, "backup complete: {}", out.display())
}

/// Copy the frame log, its archives and checkpoints.log to a new directory OUT,
/// consistently, while serve keeps running.
///
/// The log is copied with SQLite's online backup API (a snapshot as of one
/// commit, WAL included; `cp` of a live frames.db is not a backup). Archives are
/// hard-linked when OUT is on the same file system, else copied. The copy is
/// built in OUT.tmp and renamed to OUT once it is on disk; an existing OUT is
/// never overwritten. OUT is laid out like a data directory:
/// `hj212-gateway verify --data OUT` checks it, `serve --data OUT` runs on it.
/// The signing key (checkpoint.key) is not copied: back it up on its own.
///
/// Examples:
///   hj212-gateway backup --data /var/lib/hj212-gateway /srv/backup/hj212-2026-01-01
///   hj212-gateway backup --db frames.db backup-1
///
/// Exit 0 done, 2 on errors (OUT exists, no log, I/O), 78 bad --config.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct BackupFlags {
    #[command(flatten)]
    log: super::LogFlags,
    /// Gateway config ([store] path, [evidence] key).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The directory to create.
    #[arg(value_name = "OUT")]
    out: PathBuf,
}

/// Runs `backup` from the command line.
pub fn main(flags: BackupFlags) -> ExitCode {
    let result = (|| {
        let cfg = super::load_config(flags.config.as_deref())?;
        let db = flags.log.db(cfg.as_ref());
        // checkpoints.log and the key live in the data directory; with only
        // --db, the log's own directory stands in for it (as for `archive`).
        let data_dir = match (&flags.log.data, &flags.log.db) {
            (None, Some(db)) => db
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_owned),
            _ => crate::daemon::data_dir(flags.log.data.as_deref()),
        };
        let key = cfg.unwrap_or_default().evidence.key_path(&data_dir);
        run(&BackupArgs {
            db,
            data_dir,
            key,
            out: flags.out.clone(),
        })
    })();
    match result {
        Ok(done) => {
            let _ = print(&done, &flags.out, &mut std::io::stdout().lock());
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::complete_notes_len;

    #[test]
    fn a_half_written_note_is_left_out() {
        let one = "o\n1\nAAAA\n\n\u{2014} o sig1\n\n";
        let two = "o\n2\nBBBB\n\n\u{2014} o sig2\n\n";
        let whole = format!("{one}{two}");
        assert_eq!(complete_notes_len(&whole), whole.len());
        // A reader can see any byte prefix of an append, mid-character included.
        for cut in one.len() + 1..whole.len() - 1 {
            let torn = String::from_utf8_lossy(&whole.as_bytes()[..cut]);
            let n = complete_notes_len(&torn);
            assert!(
                n == one.len() || n == cut && torn.ends_with("sig2\n"),
                "cut {cut}: {n}"
            );
        }
        assert_eq!(complete_notes_len("o\n1\nAAAA\n\n"), 0);
        assert_eq!(complete_notes_len(""), 0);
    }
}
