//! A consistent copy of a log that may be in use: SQLite's online backup API for
//! the live file, then the sealed archives its copy names.
//!
//! # Why not `cp frames.db`
//!
//! In WAL mode a committed record can live only in `frames.db-wal` until the
//! background checkpointer copies it back, and pages of `frames.db` change while
//! `cp` reads them. A copy of the two files taken at slightly different moments is
//! a mix of two states: records the gateway acked missing, or a file SQLite
//! reports as malformed. The backup API reads every page through SQLite, WAL
//! included, inside one read transaction, so the copy is the log as of one commit.
//!
//! # Order
//!
//! The live file is copied first, then the archives listed *in the copy*: an
//! archive sealed after the snapshot is not needed (its records are still live in
//! the copy), and one the copy lists must be there. Retention deleting a listed
//! archive between the two steps is reported as [`ArchiveError::Missing`]; running
//! the backup again gives a copy with its tombstone instead.

use std::fs::File;
use std::path::{Path, PathBuf};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::archive::{self, ArchiveError, ArchiveState};
use super::{StoreError, schema};

/// One archive file the backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedArchive {
    /// The file name inside the archive directory.
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Hard-linked (same file system; archives are never written again) rather
    /// than copied.
    pub linked: bool,
}

/// What [`backup`] copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    /// The copy's chain head: the last seq it holds (0 for an empty log).
    pub last_seq: u64,
    /// Records still in the copy's live file.
    pub live_records: u64,
    /// Size of the copied live file in bytes.
    pub live_bytes: u64,
    /// Archives copied with it, oldest first.
    pub archives: Vec<CopiedArchive>,
    /// Archives retention had deleted: only their signed tombstones (rows of the
    /// copy) are in the backup.
    pub tombstones: usize,
}

/// Copies the log at `src` (which `serve` may be writing) to the new file `dst`,
/// and the archives the copy lists into `archive_dir(dst)`. `dst` and that
/// directory must not exist yet.
pub fn backup(src: &Path, dst: &Path) -> Result<BackupReport, StoreError> {
    let source = schema::open_read_only(src)?;
    let mut target = Connection::open_with_flags(
        dst,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(StoreError::sqlite("create the backup file"))?;
    {
        let op = "copy the log with the backup API";
        let b = Backup::new(&source, &mut target).map_err(StoreError::sqlite(op))?;
        // All pages in one step, i.e. in one read transaction: in WAL mode that
        // never blocks the writer. Copied in small steps, SQLite restarts the
        // backup whenever another connection commits, which a live gateway does
        // every few milliseconds, so it might never finish.
        loop {
            match b.step(-1).map_err(StoreError::sqlite(op))? {
                StepResult::Done => break,
                // Only while another connection holds an exclusive lock (the
                // writer's rare WAL restart): wait as the readers' busy timeout would.
                _ => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }
    drop(source);
    let op = "read the backup's head";
    let last_seq: i64 = target
        .query_row("SELECT last_seq FROM meta WHERE id = 1", [], |r| r.get(0))
        .map_err(StoreError::sqlite(op))?;
    let live_records: i64 = target
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .map_err(StoreError::sqlite(op))?;
    let rows = archive::list(&target)?;
    // Closing the only connection folds the copy's WAL into the file, so the
    // backup is one file plus its archives.
    target
        .close()
        .map_err(|(_, e)| StoreError::sqlite("close the backup file")(e))?;
    let live_bytes = std::fs::metadata(dst).map(|m| m.len()).unwrap_or(0);

    let from_dir = archive::archive_dir(src);
    let to_dir = archive::archive_dir(dst);
    let mut archives = Vec::new();
    let mut tombstones = 0;
    for r in &rows {
        if r.state == ArchiveState::Deleted {
            tombstones += 1;
            continue;
        }
        if archives.is_empty() {
            std::fs::create_dir(&to_dir).map_err(io("create", &to_dir))?;
        }
        let from = from_dir.join(&r.file);
        let to = to_dir.join(&r.file);
        if !from.is_file() {
            return Err(ArchiveError::Missing {
                file: from,
                first_seq: r.first_seq,
                last_seq: r.last_seq,
            }
            .into());
        }
        let linked = match std::fs::hard_link(&from, &to) {
            Ok(()) => true,
            Err(_) => {
                std::fs::copy(&from, &to).map_err(io("copy", &from))?;
                File::open(&to)
                    .and_then(|f| f.sync_all())
                    .map_err(io("fsync", &to))?;
                false
            }
        };
        archives.push(CopiedArchive {
            file: r.file.clone(),
            bytes: std::fs::metadata(&to).map_err(io("stat", &to))?.len(),
            linked,
        });
    }
    if !archives.is_empty() {
        File::open(&to_dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync the directory", &to_dir))?;
    }
    Ok(BackupReport {
        last_seq: last_seq as u64,
        live_records: live_records as u64,
        live_bytes,
        archives,
        tombstones,
    })
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path: PathBuf = path.to_owned();
    move |source| ArchiveError::Io { op, path, source }.into()
}
