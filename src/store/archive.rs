//! Sealed archives of the log, and retention.
//!
//! # Why
//!
//! The live log only grows (about 1.6 KB per record with its indexes, a few GB a
//! month for a few hundred devices). Old periods are read rarely (audits, exports),
//! never written, and compress well: most of a record is the decoded JSON `doc`,
//! which repeats its keys and most of its values record after record.
//!
//! # What a seal does
//!
//! [`maintain`] takes the live log's oldest period (periods are `seal_every` long,
//! aligned to the Unix epoch, judged by `received_at_ms`) and moves it into one
//! read-only file in `<dir of the log>/archive/`. The archive holds seqs `[a, b)`:
//! `a` is the first seq not yet archived, `b` the first seq received at or after the
//! period's end, so archives tile the seq space without gaps or overlap even though
//! reception times are not strictly ordered by seq.
//!
//! The archive is an SQLite file (application id "HJ2A") with one `archive` row
//! (its seq range, the hash of record `a - 1` it chains from, the hash of its last
//! record, the period, the latest signed checkpoint covering it if the log has one)
//! and `blocks` of up to [`BLOCK_RECORDS`] records: each block's `data` is the zstd
//! compression of the records' canonical encodings (`enc(c0) .. enc(c16)` exactly as
//! the hash chain encodes them, see the [store docs](super)) each followed by its
//! stored 32-byte hash. Decoding needs no schema guesswork: column `i` of the chain
//! always has the same SQLite type in a STRICT table, and `verify` recomputes every
//! hash from the very bytes it decodes.
//!
//! # Crash safety
//!
//! The archive is written to a temporary file, `fsync`ed, made read-only (0444),
//! renamed into place and the directory `fsync`ed. Only then does one transaction
//! on the live log insert its row into `archives`: that commit is the moment seqs
//! `[a, b)` become "archived" for every reader (readers take the archive list and
//! the live rows in one snapshot). The copies in `records` are deleted afterwards in
//! small transactions ([`DELETE_CHUNK`] records, then a pause), so the writer never
//! waits long; an interrupted deletion resumes at the next [`maintain`] or
//! [`recover`]. A file in the archive directory without a committed row (a crash
//! before the commit) is removed by the next run. So a SIGKILL at any point leaves
//! every record readable exactly once.
//!
//! SQLite does not return freed pages to the file system: the live file keeps its
//! size and reuses the pages freed by a seal for new records. Sealing stops the
//! growth; it does not shrink the file (a `VACUUM` with the gateway stopped would).
//!
//! # Retention
//!
//! With `[store] retain`, archives whose period ended more than `retain` ago are
//! deleted. Their row stays, marked `deleted`, with a *tombstone*: a signed note
//! (C2SP signed-note format, the gateway's checkpoint key) naming the seq range,
//! record count, the hash the range chains from and its last hash, the period and
//! the archive file's SHA-256. `verify` reports such a range as a deliberate gap and
//! carries the chain on from the tombstone's last hash; an archive file that is
//! missing without a tombstone is reported as a break.

use std::fs::File;
use std::io::Read;
use std::ops::ControlFlow;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use sha2::{Digest, Sha256};

use super::chain::{GENESIS, HASHED_COLUMNS, RECORD_COLUMNS, record_hash, row_values};
use super::{Direction, Kind, StoreError, StoredRecord, SyncMode, Verdict, schema};

/// The directory, next to the log file, that holds its archives.
pub const ARCHIVE_DIR: &str = "archive";

/// `PRAGMA application_id` of an archive file: "HJ2A" in ASCII.
const APPLICATION_ID: i32 = 0x484A_3241;

/// The `format` value of an archive's `archive` row.
const FORMAT: &str = "hj212-archive-v1";

/// Records per block: a reader decompresses one block at a time, so this bounds its
/// memory together with [`BLOCK_TARGET_BYTES`].
pub const BLOCK_RECORDS: usize = 4096;

/// A block is closed once its uncompressed encoding reaches this many bytes. Large
/// enough for zstd to find the repetition between records (the measured ratio
/// hardly improves beyond it), small enough to decompress for one `get`.
const BLOCK_TARGET_BYTES: usize = 1 << 20;

/// Hostile-input cap on one block's declared uncompressed size (an archive file is
/// read from disk: its numbers are not trusted). A block this build writes is at most
/// [`BLOCK_TARGET_BYTES`] plus one record (frames and docs are bounded far below).
pub const MAX_BLOCK_BYTES: u64 = 64 << 20;

/// Hostile-input cap on the records one block declares.
const MAX_BLOCK_RECORDS: u64 = 65_536;

/// zstd level of the blocks: measured on simulator traffic, level 9 compresses
/// about a third better than the default 3 at a seal speed still far above any
/// ingest rate (see `tests/archive.rs` for the numbers).
const ZSTD_LEVEL: i32 = 9;

/// Live copies of archived records deleted per transaction. Each transaction holds
/// the write lock for a few milliseconds, so an append waits at most that long.
pub const DELETE_CHUNK: i64 = 1000;

/// Pause between two deletion transactions, so the writer's busy handler gets the
/// lock between them.
const DELETE_PAUSE: Duration = Duration::from_millis(5);

/// When no record at or after a period's end exists yet, the period is sealed up to
/// the head only once its end is this far in the past: a record received just before
/// the end may still be on its way through the append queue.
pub const IN_FLIGHT_GRACE_MS: i64 = 5 * 60 * 1000;

/// Start-up check depth when `maintain` opens the log for writing (the gateway's
/// own start-up check covers the rest).
const CHECK_TAIL: usize = 100;

/// What the archive code can fail with beyond SQLite itself.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Another `maintain` (the daemon's, or `hj212-gateway archive`) holds the lock.
    #[error("another archive run holds {lock}; try again when it has finished")]
    Busy {
        /// The lock file.
        lock: PathBuf,
    },
    /// There is no frame log at the path.
    #[error("{path}: no frame log there")]
    NoLog {
        /// The path given.
        path: PathBuf,
    },
    /// Retention found archives to delete but was given no signing key.
    #[error(
        "{count} archive(s) are past [store] retain but no signing key was given: \
         retention deletes an archive only with a signed tombstone (create one with \
         `hj212-gateway keygen`); sealing is unaffected"
    )]
    NeedsSigner {
        /// Archives that would have been deleted.
        count: usize,
    },
    /// Signing a tombstone failed.
    #[error("cannot sign the tombstone of seqs {first_seq}..={last_seq}: {reason}")]
    Sign {
        /// First seq of the archive.
        first_seq: u64,
        /// Last seq of the archive.
        last_seq: u64,
        /// The signer's error.
        reason: String,
    },
    /// The live log does not chain where a seal reads it; nothing was sealed.
    #[error(
        "the log does not chain at seq {seq} ({reason}); nothing was sealed: run `hj212-gateway verify`"
    )]
    ChainBroken {
        /// The first seq that is not as written.
        seq: u64,
        /// Why.
        reason: &'static str,
    },
    /// An archive file is missing although the log says it is sealed.
    #[error("archive {file} of seqs {first_seq}..={last_seq} is missing")]
    Missing {
        /// The file.
        file: PathBuf,
        /// First seq it holds.
        first_seq: u64,
        /// Last seq it holds.
        last_seq: u64,
    },
    /// An archive file is not what this build writes (altered or foreign).
    #[error("archive {file} is unreadable: {detail}")]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A file-system operation on the archive directory failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> StoreError + 'p {
    move |source| {
        ArchiveError::Io {
            op,
            path: path.to_owned(),
            source,
        }
        .into()
    }
}

/// How [`maintain`] seals and retires archives (`[store] seal_every`, `retain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchivePolicy {
    /// Length of a period; periods are aligned to the Unix epoch.
    pub seal_every: Duration,
    /// Archives whose period ended longer ago than this are deleted (with a
    /// tombstone); `None` keeps them forever.
    pub retain: Option<Duration>,
}

/// Whether an archive's file still exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveState {
    /// The file holds the records.
    Sealed,
    /// Retention deleted the file; the row holds its tombstone.
    Deleted,
}

/// One row of the live log's `archives` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRow {
    /// First seq in the archive.
    pub first_seq: u64,
    /// Last seq in the archive (inclusive).
    pub last_seq: u64,
    /// Number of records (`last_seq - first_seq + 1`).
    pub records: u64,
    /// Start of the period the archive covers, UTC unix ms.
    pub period_start_ms: i64,
    /// End of the period (exclusive), UTC unix ms.
    pub period_end_ms: i64,
    /// Hash of record `first_seq - 1` (zeros for seq 1).
    pub prev_hash: [u8; 32],
    /// Hash of record `last_seq`.
    pub last_hash: [u8; 32],
    /// File name inside the archive directory.
    pub file: String,
    /// File size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file.
    pub sha256: [u8; 32],
    /// When it was sealed, UTC unix ms.
    pub sealed_at_ms: i64,
    /// Sealed or deleted by retention.
    pub state: ArchiveState,
    /// The signed tombstone of a deleted archive.
    pub tombstone: Option<String>,
}

/// What one [`maintain`] run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintainReport {
    /// Archives sealed by this run, oldest first.
    pub sealed: Vec<ArchiveRow>,
    /// Archives retention deleted (each now has a tombstone).
    pub deleted: Vec<ArchiveRow>,
    /// Files of interrupted runs removed (temporary files, archives never committed
    /// or whose deletion was interrupted).
    pub orphans_removed: u64,
    /// Live copies of archived records deleted (this run's seals and any left over).
    pub records_purged: u64,
    /// Live records considered by the seals (for throughput figures).
    pub seal_time: Duration,
}

/// The archive directory of the log at `db_path`.
pub fn archive_dir(db_path: &Path) -> PathBuf {
    match db_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(ARCHIVE_DIR),
        _ => PathBuf::from(ARCHIVE_DIR),
    }
}

/// Archive file names start with the log file's stem, so two logs sharing a
/// directory never take each other's archives for orphans.
fn stem(db_path: &Path) -> String {
    db_path
        .file_stem()
        .map_or_else(|| "frames".into(), |s| s.to_string_lossy().into_owned())
}

fn archive_name(db_path: &Path, first: u64, last: u64) -> String {
    format!("{}.{first:012}-{last:012}.archive", stem(db_path))
}

fn temp_name(db_path: &Path, first: u64) -> String {
    format!(".{}.{first:012}.seal-tmp", stem(db_path))
}

/// Whether the log behind `conn` has the `archives` table (a file of an earlier
/// release opened read-only has not).
pub(crate) fn has_table(conn: &Connection) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'archives'")
        .and_then(|mut s| s.exists([]))
        .map_err(StoreError::sqlite("look for the archives table"))
}

/// Every archive of the log, oldest first (empty for a log without the table).
pub(crate) fn list(conn: &Connection) -> Result<Vec<ArchiveRow>, StoreError> {
    if !has_table(conn)? {
        return Ok(Vec::new());
    }
    let op = "read the archive list";
    let mut st = conn
        .prepare_cached(
            "SELECT first_seq, last_seq, records, period_start_ms, period_end_ms, prev_hash, \
             last_hash, file, bytes, sha256, sealed_at_ms, state, tombstone \
             FROM archives ORDER BY first_seq",
        )
        .map_err(StoreError::sqlite(op))?;
    let mut rows = st.query([]).map_err(StoreError::sqlite(op))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(StoreError::sqlite(op))? {
        let first_seq = r.get::<_, i64>(0).map_err(StoreError::sqlite(op))? as u64;
        let hash = |i: usize, column: &'static str| -> Result<[u8; 32], StoreError> {
            let v: Vec<u8> = r.get(i).map_err(StoreError::sqlite(op))?;
            let len = v.len();
            v.try_into().map_err(|_| StoreError::CorruptRow {
                seq: first_seq,
                column,
                value: format!("{len} bytes"),
            })
        };
        let state: String = r.get(11).map_err(StoreError::sqlite(op))?;
        out.push(ArchiveRow {
            first_seq,
            last_seq: r.get::<_, i64>(1).map_err(StoreError::sqlite(op))? as u64,
            records: r.get::<_, i64>(2).map_err(StoreError::sqlite(op))? as u64,
            period_start_ms: r.get(3).map_err(StoreError::sqlite(op))?,
            period_end_ms: r.get(4).map_err(StoreError::sqlite(op))?,
            prev_hash: hash(5, "archives.prev_hash")?,
            last_hash: hash(6, "archives.last_hash")?,
            file: r.get(7).map_err(StoreError::sqlite(op))?,
            bytes: r.get::<_, i64>(8).map_err(StoreError::sqlite(op))? as u64,
            sha256: hash(9, "archives.sha256")?,
            sealed_at_ms: r.get(10).map_err(StoreError::sqlite(op))?,
            state: if state == "deleted" {
                ArchiveState::Deleted
            } else {
                ArchiveState::Sealed
            },
            tombstone: r.get(12).map_err(StoreError::sqlite(op))?,
        });
    }
    Ok(out)
}

/// The last archived seq (0 when nothing is archived): live rows with a seq up to
/// it are copies awaiting deletion and are never read.
pub(crate) fn archived_upto(list: &[ArchiveRow]) -> u64 {
    list.last().map_or(0, |a| a.last_seq)
}

// ---------------------------------------------------------------------------------
// The record encoding inside blocks.

/// Columns of the chain stored as INTEGER (`seq`, `received_at_ms`, `session`,
/// `duplicate`); `raw` (6) is the BLOB; every other column is TEXT.
const INT_COLUMNS: [usize; 4] = [0, 1, 3, 14];
const BLOB_COLUMN: usize = 6;
/// `dialect` .. `data_time`: the only columns that may be NULL.
const NULLABLE: std::ops::RangeInclusive<usize> = 7..=12;

#[derive(Debug, Clone, Copy)]
enum Cell {
    Null,
    Int(i64),
    /// Byte range in the block's buffer.
    Bytes(usize, usize),
}

/// One decompressed block: its buffer and, per record, where each value and the
/// stored hash sit in it. Values are borrowed from the buffer, never copied.
#[derive(Debug)]
pub(crate) struct Block {
    first_seq: u64,
    data: Vec<u8>,
    rows: Vec<([Cell; HASHED_COLUMNS], usize)>,
}

impl Block {
    fn decode(first_seq: u64, data: Vec<u8>, count: usize) -> Result<Block, String> {
        let mut rows = Vec::with_capacity(count);
        let mut at = 0usize;
        let take = |at: &mut usize, n: usize| -> Result<usize, String> {
            let start = *at;
            let end = start
                .checked_add(n)
                .filter(|&e| e <= data.len())
                .ok_or_else(|| format!("a record runs past the block's end (at byte {start})"))?;
            *at = end;
            Ok(start)
        };
        for i in 0..count {
            let mut cells = [Cell::Null; HASHED_COLUMNS];
            for (c, cell) in cells.iter_mut().enumerate() {
                let s = take(&mut at, 4)?;
                let len = u32::from_be_bytes(data[s..s + 4].try_into().expect("4 bytes"));
                if len == u32::MAX {
                    if !NULLABLE.contains(&c) {
                        return Err(format!("record {i} of the block: column {c} is NULL"));
                    }
                    continue;
                }
                if INT_COLUMNS.contains(&c) {
                    if len != 8 {
                        return Err(format!(
                            "record {i} of the block: column {c} is not an integer"
                        ));
                    }
                    let s = take(&mut at, 8)?;
                    *cell = Cell::Int(i64::from_be_bytes(
                        data[s..s + 8].try_into().expect("8 bytes"),
                    ));
                } else {
                    let s = take(&mut at, len as usize)?;
                    *cell = Cell::Bytes(s, s + len as usize);
                }
            }
            let h = take(&mut at, 32)?;
            rows.push((cells, h));
        }
        if at != data.len() {
            return Err(format!(
                "{} bytes after the block's last record",
                data.len() - at
            ));
        }
        Ok(Block {
            first_seq,
            data,
            rows,
        })
    }

    fn last_seq(&self) -> u64 {
        self.first_seq + self.rows.len() as u64 - 1
    }

    /// The 17 hashed values of record `i`, as the chain encodes them.
    pub(crate) fn values(&self, i: usize) -> [ValueRef<'_>; HASHED_COLUMNS] {
        let mut out = [ValueRef::Null; HASHED_COLUMNS];
        for (c, cell) in self.rows[i].0.iter().enumerate() {
            out[c] = match *cell {
                Cell::Null => ValueRef::Null,
                Cell::Int(v) => ValueRef::Integer(v),
                Cell::Bytes(s, e) if c == BLOB_COLUMN => ValueRef::Blob(&self.data[s..e]),
                Cell::Bytes(s, e) => ValueRef::Text(&self.data[s..e]),
            };
        }
        out
    }

    /// The stored hash of record `i`.
    pub(crate) fn hash(&self, i: usize) -> [u8; 32] {
        let s = self.rows[i].1;
        self.data[s..s + 32].try_into().expect("32 bytes")
    }

    fn int(&self, i: usize, c: usize) -> i64 {
        match self.rows[i].0[c] {
            Cell::Int(v) => v,
            _ => 0,
        }
    }

    fn text(&self, i: usize, c: usize) -> Result<Option<&str>, StoreError> {
        match self.rows[i].0[c] {
            Cell::Bytes(s, e) => std::str::from_utf8(&self.data[s..e])
                .map(Some)
                .map_err(|_| StoreError::CorruptRow {
                    seq: self.int(i, 0) as u64,
                    column: "archived text",
                    value: "not UTF-8".into(),
                }),
            _ => Ok(None),
        }
    }

    fn bytes(&self, i: usize, c: usize) -> &[u8] {
        match self.rows[i].0[c] {
            Cell::Bytes(s, e) => &self.data[s..e],
            _ => &[],
        }
    }

    /// The seq stored in record `i`.
    pub(crate) fn seq(&self, i: usize) -> i64 {
        self.int(i, 0)
    }

    /// `received_at_ms`, `direction`, `kind`, `verdict`, `raw`, `findings` of record
    /// `i` without building a [`StoredRecord`] (the CRC re-check's scan).
    pub(crate) fn inbound_view(
        &self,
        i: usize,
    ) -> Result<(i64, bool, Verdict, &[u8], &str), StoreError> {
        let seq = self.seq(i) as u64;
        let corrupt = |column, value: &str| StoreError::CorruptRow {
            seq,
            column,
            value: value.to_owned(),
        };
        let direction = self.text(i, 4)?.unwrap_or("");
        let kind = self.text(i, 5)?.unwrap_or("");
        let verdict = self.text(i, 13)?.unwrap_or("");
        let verdict = Verdict::parse(verdict).ok_or_else(|| corrupt("verdict", verdict))?;
        Ok((
            self.int(i, 1),
            direction == "in" && kind == "frame",
            verdict,
            self.bytes(i, 6),
            self.text(i, 15)?.unwrap_or(""),
        ))
    }

    /// Record `i` as the readers hand it out.
    pub(crate) fn record(&self, i: usize) -> Result<StoredRecord, StoreError> {
        let seq = self.seq(i) as u64;
        let corrupt = |column, value: &str| StoreError::CorruptRow {
            seq,
            column,
            value: value.to_owned(),
        };
        let text = |c| -> Result<String, StoreError> {
            Ok(self.text(i, c)?.unwrap_or_default().to_owned())
        };
        let opt =
            |c| -> Result<Option<String>, StoreError> { Ok(self.text(i, c)?.map(str::to_owned)) };
        let direction = text(4)?;
        let kind = text(5)?;
        let verdict = text(13)?;
        let mut rec = StoredRecord {
            seq,
            received_at_ms: self.int(i, 1),
            peer: text(2)?,
            session: self.int(i, 3) as u64,
            direction: Direction::parse(&direction)
                .ok_or_else(|| corrupt("direction", &direction))?,
            kind: Kind::parse(&kind).ok_or_else(|| corrupt("kind", &kind))?,
            raw: self.bytes(i, 6).to_vec(),
            dialect: opt(7)?,
            st: opt(8)?,
            cn: opt(9)?,
            mn: opt(10)?,
            qn: opt(11)?,
            data_time: opt(12)?,
            verdict: Verdict::parse(&verdict).ok_or_else(|| corrupt("verdict", &verdict))?,
            duplicate: self.int(i, 14) != 0,
            findings: text(15)?,
            doc: text(16)?,
            doc_stored: true,
            hash: self.hash(i),
        };
        rec.read_doc_column();
        Ok(rec)
    }
}

// ---------------------------------------------------------------------------------
// Reading an archive file.

/// The `archive` row of an archive file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ArchiveMeta {
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
    pub(crate) prev_hash: [u8; 32],
    pub(crate) last_hash: [u8; 32],
    pub(crate) checkpoint: Option<String>,
}

/// An open archive file (read-only).
#[derive(Debug)]
pub(crate) struct ArchiveFile {
    path: PathBuf,
    conn: Connection,
    pub(crate) meta: ArchiveMeta,
}

impl ArchiveFile {
    /// Opens and identifies an archive file.
    pub(crate) fn open(path: &Path) -> Result<ArchiveFile, StoreError> {
        let corrupt = |detail: String| -> StoreError {
            ArchiveError::Corrupt {
                file: path.to_owned(),
                detail,
            }
            .into()
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(corrupt("not a regular file".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ArchiveError::Missing {
                    file: path.to_owned(),
                    first_seq: 0,
                    last_seq: 0,
                }
                .into());
            }
            Err(e) => return Err(io_err("read", path)(e)),
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| corrupt(format!("open: {e}")))?;
        let app: i32 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|e| corrupt(format!("read the header: {e}")))?;
        if app != APPLICATION_ID {
            return Err(corrupt(format!(
                "application_id {app:#010x} is not an archive's"
            )));
        }
        let row = conn
            .query_row(
                "SELECT format, first_seq, last_seq, prev_hash, last_hash, checkpoint \
                 FROM archive WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                },
            )
            .map_err(|e| corrupt(format!("read the archive row: {e}")))?;
        if row.0 != FORMAT {
            return Err(corrupt(format!("format {:?}, expected {FORMAT:?}", row.0)));
        }
        let h = |v: Vec<u8>| {
            <[u8; 32]>::try_from(v).map_err(|_| corrupt("a hash is not 32 bytes".into()))
        };
        if row.1 < 1 || row.2 < row.1 {
            return Err(corrupt(format!("seq range {}..={}", row.1, row.2)));
        }
        Ok(ArchiveFile {
            path: path.to_owned(),
            meta: ArchiveMeta {
                first_seq: row.1 as u64,
                last_seq: row.2 as u64,
                prev_hash: h(row.3)?,
                last_hash: h(row.4)?,
                checkpoint: row.5,
            },
            conn,
        })
    }

    fn corrupt(&self, detail: String) -> StoreError {
        ArchiveError::Corrupt {
            file: self.path.clone(),
            detail,
        }
        .into()
    }

    /// The block holding seq `after + 1` (the first block ending after `after`),
    /// decompressed and decoded; `None` past the last block.
    pub(crate) fn block_after(&self, after: u64) -> Result<Option<Block>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT first_seq, last_seq, records, raw_len, length(data) FROM blocks \
                 WHERE last_seq > ?1 ORDER BY first_seq LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row([i64::try_from(after).unwrap_or(i64::MAX)], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .optional()
            })
            .map_err(|e| self.corrupt(format!("read the block index: {e}")))?;
        let Some((first, last, count, raw_len, zlen)) = row else {
            return Ok(None);
        };
        // Every number below comes from the file: check before allocating.
        if first < 1
            || last < first
            || count as u64 != (last - first + 1) as u64
            || !(1..=MAX_BLOCK_RECORDS as i64).contains(&count)
            || !(0..=MAX_BLOCK_BYTES as i64).contains(&raw_len)
            || !(0..=MAX_BLOCK_BYTES as i64).contains(&zlen)
        {
            return Err(self.corrupt(format!(
                "block {first}..={last}: {count} records, {raw_len} bytes ({zlen} compressed) \
                 is out of bounds"
            )));
        }
        let data: Vec<u8> = self
            .conn
            .query_row(
                "SELECT data FROM blocks WHERE first_seq = ?1",
                [first],
                |r| r.get(0),
            )
            .map_err(|e| self.corrupt(format!("read block {first}: {e}")))?;
        let raw = zstd::bulk::decompress(&data, raw_len as usize)
            .map_err(|e| self.corrupt(format!("decompress block {first}: {e}")))?;
        if raw.len() != raw_len as usize {
            return Err(self.corrupt(format!(
                "block {first} holds {} bytes, its index says {raw_len}",
                raw.len()
            )));
        }
        let block = Block::decode(first as u64, raw, count as usize)
            .map_err(|d| self.corrupt(format!("block {first}: {d}")))?;
        Ok(Some(block))
    }
}

/// The one archive a reader has open and the one block it has decoded: a reader
/// going through the log in seq order opens each archive once and decompresses each
/// block once, and never holds more than one block.
#[derive(Debug, Default)]
pub(crate) struct ArchiveCache {
    file: Option<(u64, ArchiveFile)>,
    block: Option<Block>,
}

impl ArchiveCache {
    /// Calls `f(block, i)` for each record of the sealed archive `row` with
    /// `after < seq <= until`, in seq order, until `f` breaks.
    pub(crate) fn scan(
        &mut self,
        dir: &Path,
        row: &ArchiveRow,
        mut after: u64,
        until: u64,
        mut f: impl FnMut(&Block, usize) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<ControlFlow<()>, StoreError> {
        let until = until.min(row.last_seq);
        after = after.max(row.first_seq - 1);
        while after < until {
            let want = after + 1;
            let cached = self
                .block
                .as_ref()
                .is_some_and(|b| b.first_seq <= want && want <= b.last_seq());
            if !cached {
                if self.file.as_ref().map(|f| f.0) != Some(row.first_seq) {
                    self.block = None;
                    let file = ArchiveFile::open(&dir.join(&row.file)).map_err(|e| match e {
                        StoreError::Archive(ArchiveError::Missing { file, .. }) => {
                            ArchiveError::Missing {
                                file,
                                first_seq: row.first_seq,
                                last_seq: row.last_seq,
                            }
                            .into()
                        }
                        e => e,
                    })?;
                    self.file = Some((row.first_seq, file));
                }
                let (_, file) = self.file.as_ref().expect("opened above");
                self.block = file.block_after(after)?;
                match &self.block {
                    Some(b) if b.first_seq <= want => {}
                    _ => {
                        return Err(file.corrupt(format!("seq {want} is in no block")));
                    }
                }
            }
            let block = self.block.as_ref().expect("loaded above");
            let from = (want - block.first_seq) as usize;
            let to = ((until.min(block.last_seq())) - block.first_seq) as usize;
            for i in from..=to {
                if block.seq(i) as u64 != block.first_seq + i as u64 {
                    return Err(StoreError::CorruptRow {
                        seq: block.first_seq + i as u64,
                        column: "archived seq",
                        value: block.seq(i).to_string(),
                    });
                }
                if f(block, i)?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            after = block.first_seq + to as u64;
        }
        Ok(ControlFlow::Continue(()))
    }
}

// ---------------------------------------------------------------------------------
// Sealing.

/// Seals, retires and cleans up the archives of the log at `db_path`: removes what
/// an interrupted run left (see the [module docs](self)), seals every complete
/// period (periods of `policy.seal_every` ending at or before `now_ms`; with
/// `before_ms`, also the part of a period received before it), then deletes
/// archives past `policy.retain` with a tombstone signed by `signer`.
///
/// Safe while a gateway appends to the same log: it takes SQLite's write lock only
/// for short transactions (busy timeout [`schema::BUSY_TIMEOUT`]). Two runs on one
/// log exclude each other with a lock file ([`ArchiveError::Busy`]). Without a
/// signer, sealing still happens and retention fails with
/// [`ArchiveError::NeedsSigner`] when there is something to delete.
pub fn maintain(
    db_path: &Path,
    policy: &ArchivePolicy,
    now_ms: i64,
    signer: Option<&dyn signed_note::Signer>,
) -> Result<MaintainReport, StoreError> {
    maintain_before(db_path, policy, now_ms, None, signer)
}

/// [`maintain`], additionally sealing everything received before `before_ms`
/// (`hj212-gateway archive --before`), even from periods not yet complete.
pub fn maintain_before(
    db_path: &Path,
    policy: &ArchivePolicy,
    now_ms: i64,
    before_ms: Option<i64>,
    signer: Option<&dyn signed_note::Signer>,
) -> Result<MaintainReport, StoreError> {
    let period = i64::try_from(policy.seal_every.as_millis())
        .ok()
        .filter(|&p| p > 0)
        .ok_or(StoreError::InvalidConfig {
            field: "seal_every",
            reason: "must be a positive number of milliseconds",
        })?;
    if !db_path.is_file() {
        return Err(ArchiveError::NoLog {
            path: db_path.to_owned(),
        }
        .into());
    }
    let dir = archive_dir(db_path);
    create_dir(&dir)?;
    let _lock = lock(&dir)?;
    let conn = schema::open_log(db_path, SyncMode::Full, CHECK_TAIL)?;
    let mut report = MaintainReport::default();
    let (orphans, purged) = recover_with(&conn, db_path, &dir)?;
    report.orphans_removed = orphans;
    report.records_purged = purged;

    let started = Instant::now();
    let limit = before_ms.map_or(now_ms, |b| b.min(now_ms));
    while let Some(row) = seal_one(
        &conn,
        db_path,
        &dir,
        period,
        limit,
        now_ms,
        before_ms.is_some(),
    )? {
        report.records_purged += purge(&conn, row.last_seq)?;
        report.sealed.push(row);
    }
    report.seal_time = started.elapsed();

    if let Some(retain) = policy.retain {
        let retain = i64::try_from(retain.as_millis()).unwrap_or(i64::MAX);
        let due: Vec<ArchiveRow> = list(&conn)?
            .into_iter()
            .filter(|a| {
                a.state == ArchiveState::Sealed && a.period_end_ms.saturating_add(retain) < now_ms
            })
            .collect();
        if !due.is_empty() {
            let Some(signer) = signer else {
                return Err(ArchiveError::NeedsSigner { count: due.len() }.into());
            };
            for a in due {
                report.deleted.push(retire(&conn, &dir, a, signer, now_ms)?);
            }
        }
    }
    Ok(report)
}

/// Finishes what an interrupted [`maintain`] left: removes archive files that no
/// committed row owns (and those of archives retention deleted), and deletes the
/// live copies of archived records. Returns (files removed, records deleted).
/// The daemon can call it at start; [`maintain`] runs it first.
pub fn recover(db_path: &Path) -> Result<(u64, u64), StoreError> {
    let dir = archive_dir(db_path);
    if !dir.is_dir() {
        return Ok((0, 0));
    }
    let _lock = lock(&dir)?;
    let conn = schema::open_log(db_path, SyncMode::Full, CHECK_TAIL)?;
    recover_with(&conn, db_path, &dir)
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(io_err("create", dir))
}

fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("open the lock file", &path))?;
    // flock: released by the kernel when the process dies, so a SIGKILLed run never
    // leaves the next one locked out.
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(ArchiveError::Busy { lock: path }.into()),
        Err(e) => Err(io_err("lock", &path)(e.into())),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync the directory", dir))
}

fn recover_with(conn: &Connection, db_path: &Path, dir: &Path) -> Result<(u64, u64), StoreError> {
    let rows = list(conn)?;
    let prefix = format!("{}.", stem(db_path));
    let tmp_prefix = format!(".{}.", stem(db_path));
    let mut removed = 0;
    let entries = std::fs::read_dir(dir).map_err(io_err("list", dir))?;
    for e in entries {
        let e = e.map_err(io_err("list", dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = (name.starts_with(&tmp_prefix) && name.ends_with(".seal-tmp"))
            || (name.starts_with(&prefix) && name.ends_with(".archive"));
        if !ours {
            continue;
        }
        let live = rows
            .iter()
            .any(|r| r.file == name && r.state == ArchiveState::Sealed);
        if !live {
            let p = e.path();
            std::fs::remove_file(&p).map_err(io_err("remove", &p))?;
            tracing::info!(file = %p.display(), "removed an archive file no committed archive owns");
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    let purged = purge(conn, archived_upto(&rows))?;
    Ok((removed, purged))
}

/// Deletes the live copies of records up to `upto` (all archived) in small
/// transactions. Returns how many were deleted.
fn purge(conn: &Connection, upto: u64) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n = conn
            .prepare_cached(
                "DELETE FROM records WHERE seq IN \
                 (SELECT seq FROM records WHERE seq <= ?1 ORDER BY seq LIMIT ?2)",
            )
            .and_then(|mut s| s.execute((upto as i64, DELETE_CHUNK)))
            .map_err(StoreError::sqlite(
                "delete archived records from the live log",
            ))?;
        total += n as u64;
        if (n as i64) < DELETE_CHUNK {
            return Ok(total);
        }
        std::thread::sleep(DELETE_PAUSE);
    }
}

fn head_seq(conn: &Connection) -> Result<u64, StoreError> {
    conn.query_row("SELECT last_seq FROM meta WHERE id = 1", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|s| s as u64)
    .map_err(StoreError::sqlite("read the chain head"))
}

/// Seals the oldest live period if it may be sealed; `None` when there is nothing
/// (more) to seal.
fn seal_one(
    conn: &Connection,
    db_path: &Path,
    dir: &Path,
    period: i64,
    limit: i64,
    now_ms: i64,
    partial: bool,
) -> Result<Option<ArchiveRow>, StoreError> {
    let rows = list(conn)?;
    let upto = archived_upto(&rows);
    let prev = rows.last().map_or(GENESIS, |r| r.last_hash);
    let a = upto + 1;
    let head = head_seq(conn)?;
    if a > head {
        return Ok(None);
    }
    let Some(first_ms) = conn
        .query_row(
            "SELECT received_at_ms FROM records WHERE seq = ?1",
            [a as i64],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map_err(StoreError::sqlite("read the first live record"))?
    else {
        return Err(ArchiveError::ChainBroken {
            seq: a,
            reason: "the first live record is missing",
        }
        .into());
    };
    let start = first_ms.div_euclid(period) * period;
    let end = start.saturating_add(period);
    if !partial && end > now_ms {
        return Ok(None);
    }
    let end = end.min(limit);
    if end <= first_ms {
        return Ok(None);
    }
    let b: Option<i64> = conn
        .query_row(
            "SELECT seq FROM records WHERE seq > ?1 AND received_at_ms >= ?2 ORDER BY seq LIMIT 1",
            (a as i64, end),
            |r| r.get(0),
        )
        .optional()
        .map_err(StoreError::sqlite("find the end of the period"))?;
    let last = match b {
        Some(b) => b as u64 - 1,
        None if end <= now_ms - IN_FLIGHT_GRACE_MS => head,
        None => return Ok(None),
    };
    let row = write_archive(conn, db_path, dir, a, last, prev, start, end, now_ms)?;
    // IMMEDIATE: this transaction reads, then writes. A deferred one would be
    // refused without waiting (SQLITE_BUSY, "database is locked") whenever the
    // gateway's writer committed between the two, which under load is nearly always.
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)
        .map_err(StoreError::sqlite("begin the seal commit"))?;
    // The lock file keeps other runs out; this re-check keeps the table sound even
    // if someone removed the lock file.
    let current = archived_upto(&list(&tx)?);
    if current != upto {
        drop(tx);
        let _ = std::fs::remove_file(dir.join(&row.file));
        return Err(ArchiveError::Busy {
            lock: dir.join(".lock"),
        }
        .into());
    }
    tx.execute(
        "INSERT INTO archives (first_seq, last_seq, records, period_start_ms, period_end_ms, \
         prev_hash, last_hash, file, bytes, sha256, sealed_at_ms, state) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'sealed')",
        rusqlite::params![
            row.first_seq as i64,
            row.last_seq as i64,
            row.records as i64,
            row.period_start_ms,
            row.period_end_ms,
            &row.prev_hash[..],
            &row.last_hash[..],
            row.file,
            row.bytes as i64,
            &row.sha256[..],
            row.sealed_at_ms,
        ],
    )
    .map_err(StoreError::sqlite("record the archive"))?;
    tx.commit()
        .map_err(StoreError::sqlite("commit the archive"))?;
    tracing::info!(
        first_seq = row.first_seq,
        last_seq = row.last_seq,
        bytes = row.bytes,
        file = %row.file,
        "sealed an archive of the frame log"
    );
    Ok(Some(row))
}

#[allow(clippy::too_many_arguments)]
fn write_archive(
    conn: &Connection,
    db_path: &Path,
    dir: &Path,
    a: u64,
    last: u64,
    prev: [u8; 32],
    start: i64,
    end: i64,
    now_ms: i64,
) -> Result<ArchiveRow, StoreError> {
    let tmp = dir.join(temp_name(db_path, a));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("remove", &tmp)(e));
        }
        _ => {}
    }
    let checkpoint = latest_checkpoint(conn, last)?;
    let out_err = |op: &'static str| StoreError::sqlite(op);
    {
        let mut out = Connection::open(&tmp).map_err(out_err("create an archive file"))?;
        // No journal: an interrupted write leaves a temporary file that the next run
        // removes; durability comes from the fsync before the rename.
        out.execute_batch(&format!(
            "PRAGMA page_size = 65536; PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
             PRAGMA application_id = {APPLICATION_ID};
             CREATE TABLE archive (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 format TEXT NOT NULL,
                 first_seq INTEGER NOT NULL,
                 last_seq INTEGER NOT NULL,
                 records INTEGER NOT NULL,
                 prev_hash BLOB NOT NULL,
                 last_hash BLOB NOT NULL,
                 period_start_ms INTEGER NOT NULL,
                 period_end_ms INTEGER NOT NULL,
                 checkpoint TEXT,
                 created_at_ms INTEGER NOT NULL
             ) STRICT;
             CREATE TABLE blocks (
                 first_seq INTEGER PRIMARY KEY,
                 last_seq INTEGER NOT NULL,
                 records INTEGER NOT NULL,
                 min_ms INTEGER NOT NULL,
                 max_ms INTEGER NOT NULL,
                 raw_len INTEGER NOT NULL,
                 data BLOB NOT NULL
             ) STRICT;"
        ))
        .map_err(out_err("set up an archive file"))?;
        let tx = out
            .transaction()
            .map_err(out_err("begin writing an archive"))?;
        let mut prev_hash = prev;
        let mut buf: Vec<u8> = Vec::with_capacity(BLOCK_TARGET_BYTES + 64 * 1024);
        let (mut block_first, mut block_n, mut min_ms, mut max_ms) = (a, 0u64, i64::MAX, i64::MIN);
        let mut next = a;
        {
            let mut ins = tx
                .prepare(
                    "INSERT INTO blocks (first_seq, last_seq, records, min_ms, max_ms, raw_len, data) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(out_err("write a block"))?;
            let mut flush = |buf: &mut Vec<u8>,
                             first: u64,
                             n: u64,
                             min_ms: i64,
                             max_ms: i64|
             -> Result<(), StoreError> {
                let z = zstd::bulk::compress(buf, ZSTD_LEVEL)
                    .map_err(io_err("compress a block of", dir))?;
                ins.execute(rusqlite::params![
                    first as i64,
                    (first + n - 1) as i64,
                    n as i64,
                    min_ms,
                    max_ms,
                    buf.len() as i64,
                    z
                ])
                .map_err(out_err("write a block"))?;
                buf.clear();
                Ok(())
            };
            // One short read per block, each its own snapshot: records below the head
            // never change, and a long read transaction would hold back the live
            // log's WAL checkpoints for the whole seal.
            let mut read = conn
                .prepare_cached(&format!(
                    "SELECT {RECORD_COLUMNS} FROM records WHERE seq >= ?1 AND seq <= ?2 \
                     ORDER BY seq LIMIT ?3"
                ))
                .map_err(StoreError::sqlite("prepare the seal read"))?;
            while next <= last {
                let mut rows = read
                    .query((next as i64, last as i64, BLOCK_RECORDS as i64))
                    .map_err(StoreError::sqlite("read records to seal"))?;
                let before = next;
                while let Some(r) = rows
                    .next()
                    .map_err(StoreError::sqlite("read records to seal"))?
                {
                    let (vals, stored) =
                        row_values(r).map_err(StoreError::sqlite("read a record"))?;
                    if vals[0] != ValueRef::Integer(next as i64) {
                        return Err(ArchiveError::ChainBroken {
                            seq: next,
                            reason: "record missing",
                        }
                        .into());
                    }
                    let stored: [u8; 32] = match stored {
                        ValueRef::Blob(b) => {
                            b.try_into().map_err(|_| ArchiveError::ChainBroken {
                                seq: next,
                                reason: "malformed hash",
                            })?
                        }
                        _ => {
                            return Err(ArchiveError::ChainBroken {
                                seq: next,
                                reason: "malformed hash",
                            }
                            .into());
                        }
                    };
                    if record_hash(&prev_hash, &vals) != Some(stored) {
                        return Err(ArchiveError::ChainBroken {
                            seq: next,
                            reason: "hash mismatch",
                        }
                        .into());
                    }
                    if super::chain::encode(&vals, |b| buf.extend_from_slice(b)).is_none() {
                        return Err(ArchiveError::ChainBroken {
                            seq: next,
                            reason: "a value cannot be encoded",
                        }
                        .into());
                    }
                    buf.extend_from_slice(&stored);
                    if let ValueRef::Integer(ms) = vals[1] {
                        min_ms = min_ms.min(ms);
                        max_ms = max_ms.max(ms);
                    }
                    prev_hash = stored;
                    block_n += 1;
                    next += 1;
                    if block_n as usize >= BLOCK_RECORDS || buf.len() >= BLOCK_TARGET_BYTES {
                        flush(&mut buf, block_first, block_n, min_ms, max_ms)?;
                        (block_first, block_n, min_ms, max_ms) = (next, 0, i64::MAX, i64::MIN);
                    }
                }
                if next == before {
                    return Err(ArchiveError::ChainBroken {
                        seq: next,
                        reason: "record missing",
                    }
                    .into());
                }
            }
            if block_n > 0 {
                flush(&mut buf, block_first, block_n, min_ms, max_ms)?;
            }
        }
        tx.execute(
            "INSERT INTO archive (id, format, first_seq, last_seq, records, prev_hash, last_hash, \
             period_start_ms, period_end_ms, checkpoint, created_at_ms) \
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            rusqlite::params![
                FORMAT,
                a as i64,
                last as i64,
                (last - a + 1) as i64,
                &prev[..],
                &prev_hash[..],
                start,
                end,
                checkpoint,
                now_ms
            ],
        )
        .map_err(out_err("write the archive row"))?;
        tx.commit().map_err(out_err("finish an archive file"))?;
        out.close().map_err(|(_, e)| StoreError::Sqlite {
            op: "close an archive file",
            source: e,
        })?;
    }
    let f = File::open(&tmp).map_err(io_err("open", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
        .map_err(io_err("make read-only", &tmp))?;
    let name = archive_name(db_path, a, last);
    let path = dir.join(&name);
    std::fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
    sync_dir(dir)?;
    let (sha256, bytes) = file_sha256(&path)?;
    let meta = ArchiveFile::open(&path)?.meta;
    Ok(ArchiveRow {
        first_seq: a,
        last_seq: last,
        records: last - a + 1,
        period_start_ms: start,
        period_end_ms: end,
        prev_hash: prev,
        last_hash: meta.last_hash,
        file: name,
        bytes,
        sha256,
        sealed_at_ms: now_ms,
        state: ArchiveState::Sealed,
        tombstone: None,
    })
}

/// The latest signed checkpoint whose tree covers record `last` (the `checkpoints`
/// table of the evidence layer), if the log has one.
fn latest_checkpoint(conn: &Connection, last: u64) -> Result<Option<String>, StoreError> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'checkpoints'")
        .and_then(|mut s| s.exists([]))
        .map_err(StoreError::sqlite("look for the checkpoints table"))?;
    if !exists {
        return Ok(None);
    }
    conn.query_row(
        "SELECT note FROM checkpoints WHERE size >= ?1 ORDER BY size DESC LIMIT 1",
        [last as i64],
        |r| r.get(0),
    )
    .optional()
    .map_err(StoreError::sqlite("read the latest checkpoint"))
}

/// SHA-256 and length of a file, read in 64 KiB pieces.
pub(crate) fn file_sha256(path: &Path) -> Result<([u8; 32], u64), StoreError> {
    let mut f = File::open(path).map_err(io_err("read", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io_err("read", path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.finalize().into(), n))
}

// ---------------------------------------------------------------------------------
// Retention.

/// First line of a tombstone note's text.
pub const TOMBSTONE_HEADER: &str = "hj212-gateway archive tombstone v1";

/// The text of the tombstone of `row` (before the signature lines).
pub fn tombstone_text(origin: &str, row: &ArchiveRow) -> String {
    let t = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms).map_or_else(
            || ms.to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
    };
    format!(
        "{TOMBSTONE_HEADER}\norigin {origin}\nseqs {} {}\nrecords {}\nprev {}\nlast {}\n\
         period {} {}\narchive-sha256 {}\n",
        row.first_seq,
        row.last_seq,
        row.records,
        hex::encode(row.prev_hash),
        hex::encode(row.last_hash),
        t(row.period_start_ms),
        t(row.period_end_ms),
        hex::encode(row.sha256),
    )
}

/// Whether a tombstone's text names exactly `row`'s range, count, hashes and file
/// digest (what `verify` needs before it carries the chain across the gap). The
/// signature itself is checked by whoever holds the verifier key.
pub(crate) fn tombstone_matches(note: &str, row: &ArchiveRow) -> bool {
    let Some((text, _sigs)) = note.split_once("\n\n") else {
        return false;
    };
    let mut lines = text.lines();
    if lines.next() != Some(TOMBSTONE_HEADER) {
        return false;
    }
    let Some(origin) = lines.next().and_then(|l| l.strip_prefix("origin ")) else {
        return false;
    };
    tombstone_text(origin, row) == format!("{text}\n")
}

fn retire(
    conn: &Connection,
    dir: &Path,
    mut row: ArchiveRow,
    signer: &dyn signed_note::Signer,
    now_ms: i64,
) -> Result<ArchiveRow, StoreError> {
    let sign_err = |reason: String| ArchiveError::Sign {
        first_seq: row.first_seq,
        last_seq: row.last_seq,
        reason,
    };
    let text = tombstone_text(signer.name(), &row);
    let mut note =
        signed_note::Note::new(text.as_bytes(), &[]).map_err(|e| sign_err(e.to_string()))?;
    note.add_sigs(&[signer])
        .map_err(|e| sign_err(e.to_string()))?;
    let signed = String::from_utf8(note.to_bytes()).map_err(|e| sign_err(e.to_string()))?;
    let n = conn
        .execute(
            "UPDATE archives SET state = 'deleted', tombstone = ?1, deleted_at_ms = ?2 \
             WHERE first_seq = ?3 AND state = 'sealed'",
            (&signed, now_ms, row.first_seq as i64),
        )
        .map_err(StoreError::sqlite("record a tombstone"))?;
    if n == 1 {
        // After the commit: a crash before the unlink leaves a file no sealed row
        // owns, which the next run removes.
        let path = dir.join(&row.file);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("remove", &path)(e));
            }
            _ => {}
        }
        sync_dir(dir)?;
        tracing::info!(
            first_seq = row.first_seq,
            last_seq = row.last_seq,
            file = %row.file,
            "retention deleted an archive, leaving a signed tombstone"
        );
    }
    row.state = ArchiveState::Deleted;
    row.tombstone = Some(signed);
    Ok(row)
}

// ---------------------------------------------------------------------------------
// Sizes, for metrics and operators.

/// How much the log takes on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreSizes {
    /// The live SQLite file and its WAL, bytes.
    pub live_bytes: u64,
    /// The sealed archive files, bytes.
    pub archive_bytes: u64,
    /// Sealed archives (files present).
    pub archives: u64,
    /// Records in sealed archives.
    pub archived_records: u64,
    /// Archives retention deleted (tombstones).
    pub tombstones: u64,
}

/// The sizes of the log at `db_path` and its archives (read-only).
pub fn store_sizes(db_path: &Path) -> Result<StoreSizes, StoreError> {
    let conn = schema::open_read_only(db_path)?;
    let rows = list(&conn)?;
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut s = StoreSizes {
        live_bytes: size(db_path) + size(Path::new(&wal)),
        ..StoreSizes::default()
    };
    for r in &rows {
        match r.state {
            ArchiveState::Sealed => {
                s.archives += 1;
                s.archive_bytes += r.bytes;
                s.archived_records += r.records;
            }
            ArchiveState::Deleted => s.tombstones += 1,
        }
    }
    Ok(s)
}

/// Sets the store-size gauges (`hj212_store_size_bytes`, `hj212_store_archives`,
/// `hj212_store_archived_records`) from [`store_sizes`]; the daemon calls it
/// periodically (it costs two `stat`s and one small query).
pub fn refresh_metrics(
    db_path: &Path,
    m: &crate::metrics::Metrics,
) -> Result<StoreSizes, StoreError> {
    let s = store_sizes(db_path)?;
    let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    m.store_live_bytes.set(g(s.live_bytes));
    m.store_archive_bytes.set(g(s.archive_bytes));
    m.store_archives.set(g(s.archives));
    m.store_archived_records.set(g(s.archived_records));
    Ok(s)
}
