//! Errors of the frame log.

use std::path::PathBuf;
use std::sync::Arc;

/// Everything that can go wrong in the store. A tampered log is *not* an error: it is
/// the [`ChainReport`](super::ChainReport) that [`verify_chain`](super::verify_chain)
/// returns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory for the database file could not be created.
    #[error("cannot create store directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An SQLite call failed.
    #[error("sqlite failed while trying to {op}")]
    Sqlite {
        /// What the store was doing.
        op: &'static str,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// Sealing, reading or retiring an archive of the log failed (see
    /// [`ArchiveError`](super::archive::ArchiveError)).
    #[error(transparent)]
    Archive(#[from] super::archive::ArchiveError),
    /// The transaction holding a batch failed and was rolled back. Nothing in the batch
    /// was committed, so nothing in it may be acknowledged. Every waiter in the batch
    /// receives this error, sharing the underlying SQLite error.
    #[error("batch of {records} records failed while trying to {op}; nothing in it was committed")]
    BatchFailed {
        /// The step that failed.
        op: &'static str,
        /// How many records the batch held.
        records: usize,
        /// The SQLite error.
        #[source]
        source: Arc<rusqlite::Error>,
    },
    /// The file was written by a newer build with a schema this one does not know.
    #[error("store schema version {found} is newer than this build supports ({supported})")]
    SchemaTooNew {
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// The newest version this build migrates to.
        supported: i64,
    },
    /// A reader was pointed at a file that no writer has initialised.
    #[error("{path} is not an initialised frame log (user_version 0)")]
    NotInitialized {
        /// The file.
        path: PathBuf,
    },
    /// `serve` found a 0-byte file where the log should be. SQLite would silently
    /// make it a new database; an empty file is more likely a log that was truncated
    /// or a copy that went wrong than a new installation.
    #[error(
        "{path} is an empty file (0 bytes), not a frame log: restore the log from a backup, or remove the file if this is a new installation and no log existed"
    )]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a frame log (not SQLite, or another application's database);
    /// it was not changed.
    #[error(
        "{path} is not a frame log ({reason}); it was left unchanged. `serve` creates a new log only where no file exists: point --data or [store] path at the frame log, or at a path that does not exist yet"
    )]
    NotAFrameLog {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
    /// The start-up check (or SQLite while serving) found the file damaged; nothing
    /// is acknowledged into it.
    #[error(
        "{path} is damaged ({detail}): run `hj212-gateway verify --db {path}` and restore the log from a backup; the gateway does not write to a damaged log"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What SQLite or the check reported.
        detail: String,
    },
    /// The writer has shut down (or died); the append was not queued or not answered.
    #[error("the store writer is closed")]
    Closed,
    /// The writer's queue is full and the caller does not wait (exchange outcomes).
    #[error("the store writer's queue is full")]
    QueueFull,
    /// The writer thread panicked.
    #[error("the store writer thread panicked")]
    WriterPanicked,
    /// The writer thread could not be started.
    #[error("cannot spawn the store writer thread")]
    Spawn {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid store config {field}: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// A record was refused before it was queued (a caller bug: nothing was stored).
    #[error("invalid record field {field}: {reason}")]
    InvalidRecord {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// A stored row holds a value the schema does not allow (the file was altered).
    #[error("stored record {seq} has an invalid {column}: {value:?}")]
    CorruptRow {
        /// The record.
        seq: u64,
        /// The column.
        column: &'static str,
        /// The offending value, as text.
        value: String,
    },
    /// A consumer tried to move its cursor past the end of the log.
    #[error("cursor {name:?} cannot move to {seq}: the log ends at {head}")]
    CursorAhead {
        /// Cursor name.
        name: String,
        /// Requested position.
        seq: u64,
        /// Last committed seq.
        head: u64,
    },
    /// The Merkle tree cannot answer: a size or leaf outside it, or a stored hash
    /// missing (an altered file).
    #[error("Merkle tree: {reason}")]
    Tree {
        /// What is wrong, with the sizes or ids involved.
        reason: String,
    },
    /// Writing an export failed.
    #[error("cannot write the export")]
    Io {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether this refuses the log file itself (empty, foreign or damaged): an
    /// operator has to act on the file, restarting will not help.
    pub fn refuses_file(&self) -> bool {
        matches!(
            self,
            StoreError::EmptyFile { .. }
                | StoreError::NotAFrameLog { .. }
                | StoreError::Damaged { .. }
                | StoreError::SchemaTooNew { .. }
        )
    }

    /// Whether this is damage to the log (a corrupt page or row, or a refused
    /// file): trying again cannot help, so a consumer that meets it at start stops
    /// and `/healthz` names it, rather than retrying forever. Anything else (a full
    /// disk, a lock, a file not there yet) may pass.
    pub fn is_damage(&self) -> bool {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        match self {
            StoreError::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => matches!(e.code, DatabaseCorrupt | NotADatabase),
            StoreError::CorruptRow { .. } => true,
            e => e.refuses_file(),
        }
    }

    pub(crate) fn sqlite(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |source| StoreError::Sqlite { op, source }
    }
}
