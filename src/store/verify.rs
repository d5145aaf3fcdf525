//! The verifier: walks the whole chain of a log file and reports where it breaks.

use std::fmt;
use std::path::Path;

use rusqlite::OptionalExtension;
use rusqlite::types::ValueRef;

use super::StoreError;
use super::archive::{self, ArchiveCache, ArchiveError, ArchiveRow, ArchiveState};
use super::chain::{ChainHead, GENESIS, RECORD_COLUMNS, record_hash, row_values};
use super::schema;

/// How far past a mismatching record the verifier looks for the record that belongs
/// there, to tell "swapped" from "altered".
const REORDER_WINDOW: i64 = 4096;

/// The result of [`verify_chain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Records whose hash was recomputed and matched, from seq 1 up to the first break.
    pub records_checked: u64,
    /// The head stored in `meta`, if the row exists and is well-formed.
    pub head: Option<ChainHead>,
    /// The first point where the log stops being the one that was written.
    pub first_break: Option<ChainBreak>,
    /// Ranges retention deleted on purpose, each with its signed tombstone: the chain
    /// is carried across them from the tombstone's hashes (not a break).
    pub deliberate_gaps: Vec<DeliberateGap>,
}

/// A range of the log that retention deleted, leaving a signed tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliberateGap {
    /// First deleted seq.
    pub first_seq: u64,
    /// Last deleted seq.
    pub last_seq: u64,
    /// Start of the archived period, UTC unix ms.
    pub period_start_ms: i64,
    /// End of the archived period (exclusive), UTC unix ms.
    pub period_end_ms: i64,
    /// The signed tombstone note.
    pub tombstone: String,
}

impl fmt::Display for DeliberateGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms).map_or_else(
                || ms.to_string(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            )
        };
        let signer = self
            .tombstone
            .split_once("\n\n")
            .and_then(|(_, sigs)| sigs.lines().next())
            .and_then(|l| l.strip_prefix("\u{2014} "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("?");
        write!(
            f,
            "seqs {}..={} ({} records received {} .. {}) deleted by retention; tombstone signed by {}",
            self.first_seq,
            self.last_seq,
            self.last_seq - self.first_seq + 1,
            t(self.period_start_ms),
            t(self.period_end_ms),
            signer
        )
    }
}

impl ChainReport {
    /// True when every record and the head verified.
    pub fn is_intact(&self) -> bool {
        self.first_break.is_none()
    }
}

/// Where and why the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The first seq that is not as written.
    pub seq: u64,
    /// Why.
    pub reason: BreakReason,
}

/// Why [`verify_chain`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakReason {
    /// The record's content (or its predecessor) was altered.
    HashMismatch,
    /// The record is missing (deleted). `next_present` is the next seq in the log.
    Missing {
        /// Next seq that is present.
        next_present: u64,
    },
    /// The record that belongs at this seq is stored at `found_at` (rows swapped).
    Reordered {
        /// Where the record that belongs here was found.
        found_at: u64,
    },
    /// The log ends before the recorded head: the last records were deleted.
    TruncatedTail {
        /// The head's `last_seq` in `meta`.
        head_seq: u64,
    },
    /// Records exist after the recorded head (the head was rolled back, or rows were
    /// inserted by something other than the writer).
    BeyondHead {
        /// The head's `last_seq` in `meta`.
        head_seq: u64,
    },
    /// The last record's hash differs from the head's hash.
    HeadMismatch,
    /// The `meta` head row is missing or malformed.
    HeadMissing,
    /// A column holds a value the schema does not allow.
    Malformed {
        /// The column.
        column: &'static str,
    },
    /// A sealed archive's file is gone, and no tombstone says it was deleted.
    ArchiveMissing {
        /// The file.
        file: String,
    },
    /// A sealed archive's file is not the one that was sealed (its SHA-256
    /// differs), or cannot be read as an archive.
    ArchiveAltered {
        /// The file.
        file: String,
        /// What differs.
        detail: String,
    },
    /// A tombstone does not name the range, hashes or file it stands for.
    TombstoneMismatch,
}

impl fmt::Display for BreakReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BreakReason::HashMismatch => f.write_str("hash mismatch (record altered)"),
            BreakReason::Missing { next_present } => {
                write!(
                    f,
                    "record missing (deleted); next present is {next_present}"
                )
            }
            BreakReason::Reordered { found_at } => {
                write!(f, "records reordered; this record is stored at {found_at}")
            }
            BreakReason::TruncatedTail { head_seq } => {
                write!(f, "log ends before its head {head_seq} (tail deleted)")
            }
            BreakReason::BeyondHead { head_seq } => {
                write!(f, "records after the recorded head {head_seq}")
            }
            BreakReason::HeadMismatch => f.write_str("last record does not match the head"),
            BreakReason::HeadMissing => f.write_str("chain head row missing or malformed"),
            BreakReason::Malformed { column } => write!(f, "malformed {column}"),
            BreakReason::ArchiveMissing { file } => write!(
                f,
                "archive {file} is missing and no tombstone records its deletion"
            ),
            BreakReason::ArchiveAltered { file, detail } => {
                write!(f, "archive {file} is not as sealed ({detail})")
            }
            BreakReason::TombstoneMismatch => {
                f.write_str("the tombstone does not match the archive it stands for")
            }
        }
    }
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {}: {}", self.seq, self.reason)
    }
}

/// Walks the whole log in seq order on a read-only connection, recomputing every hash,
/// and checks the last record against the head in `meta`.
///
/// Runs inside one read transaction, so it sees a consistent snapshot and can run while
/// the writer appends (records committed after it started are not checked). Stops at
/// the first break. `Err` means the file could not be read; a tampered log is `Ok` with
/// [`ChainReport::first_break`] set.
pub fn verify_chain(path: impl AsRef<Path>) -> Result<ChainReport, StoreError> {
    let mut conn = schema::open_read_only(path.as_ref())?;
    let tx = conn
        .transaction()
        .map_err(StoreError::sqlite("begin the verify snapshot"))?;
    let head_row: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT last_seq, last_hash FROM meta WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .or_else(|e| match e {
            // A head row with the wrong types is evidence, not an I/O failure.
            rusqlite::Error::InvalidColumnType(..) => Ok(None),
            e => Err(e),
        })
        .map_err(StoreError::sqlite("read the chain head"))?;
    let head = head_row.and_then(|(seq, hash)| {
        Some(ChainHead {
            last_seq: u64::try_from(seq).ok()?,
            last_hash: hash.try_into().ok()?,
        })
    });

    let mut report = ChainReport {
        records_checked: 0,
        head,
        first_break: None,
        deliberate_gaps: Vec::new(),
    };
    let mut prev = GENESIS;
    let mut expected: u64 = 1;
    let list = archive::list(&tx)?;
    let dir = archive::archive_dir(path.as_ref());
    let mut cache = ArchiveCache::default();
    for a in &list {
        if let Some(b) = verify_archive(&dir, a, &mut cache, &mut report, &mut prev, &mut expected)?
        {
            report.first_break = Some(b);
            return Ok(report);
        }
    }
    let mut stmt = tx
        .prepare(&format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE seq > ?1 ORDER BY seq"
        ))
        .map_err(StoreError::sqlite("prepare the verify scan"))?;
    let mut rows = stmt
        .query([archive::archived_upto(&list) as i64])
        .map_err(StoreError::sqlite("scan the log"))?;
    while let Some(row) = rows.next().map_err(StoreError::sqlite("scan the log"))? {
        let vals = row_values(row).map_err(StoreError::sqlite("read a record"))?;
        let brk = |seq, reason| Some(ChainBreak { seq, reason });
        let seq = match vals.0[0] {
            ValueRef::Integer(s) if s >= 1 => s as u64,
            _ => {
                report.first_break = brk(expected, BreakReason::Malformed { column: "seq" });
                return Ok(report);
            }
        };
        if seq != expected {
            // ORDER BY the primary key: seq can only be larger than expected here.
            report.first_break = brk(expected, BreakReason::Missing { next_present: seq });
            return Ok(report);
        }
        let stored: [u8; 32] = match vals.1 {
            ValueRef::Blob(b) if b.len() == 32 => b.try_into().expect("length checked"),
            _ => {
                report.first_break = brk(seq, BreakReason::Malformed { column: "hash" });
                return Ok(report);
            }
        };
        let Some(computed) = record_hash(&prev, &vals.0) else {
            report.first_break = brk(seq, BreakReason::Malformed { column: "record" });
            return Ok(report);
        };
        if computed != stored {
            let reason = match find_displaced(&tx, seq, &prev, &stored)? {
                Some(found_at) => BreakReason::Reordered { found_at },
                None => BreakReason::HashMismatch,
            };
            report.first_break = brk(seq, reason);
            return Ok(report);
        }
        prev = stored;
        expected += 1;
        report.records_checked += 1;
    }
    let last_seq = expected - 1;
    report.first_break = match report.head {
        None => Some(ChainBreak {
            seq: expected,
            reason: BreakReason::HeadMissing,
        }),
        Some(h) if h.last_seq > last_seq => Some(ChainBreak {
            seq: expected,
            reason: BreakReason::TruncatedTail {
                head_seq: h.last_seq,
            },
        }),
        Some(h) if h.last_seq < last_seq => Some(ChainBreak {
            seq: h.last_seq + 1,
            reason: BreakReason::BeyondHead {
                head_seq: h.last_seq,
            },
        }),
        Some(h) if h.last_hash != prev => Some(ChainBreak {
            seq: last_seq,
            reason: BreakReason::HeadMismatch,
        }),
        Some(_) => None,
    };
    Ok(report)
}

/// Checks one archive (or its tombstone) against the chain so far and moves `prev`
/// and `expected` past it; `Some` is the first break found in it.
fn verify_archive(
    dir: &Path,
    a: &ArchiveRow,
    cache: &mut ArchiveCache,
    report: &mut ChainReport,
    prev: &mut [u8; 32],
    expected: &mut u64,
) -> Result<Option<ChainBreak>, StoreError> {
    let brk = |seq, reason| Ok(Some(ChainBreak { seq, reason }));
    if a.first_seq != *expected {
        return brk(
            *expected,
            BreakReason::Missing {
                next_present: a.first_seq,
            },
        );
    }
    if a.prev_hash != *prev {
        return brk(a.first_seq, BreakReason::HashMismatch);
    }
    if a.state == ArchiveState::Deleted {
        let Some(note) = a
            .tombstone
            .as_deref()
            .filter(|n| archive::tombstone_matches(n, a))
        else {
            return brk(a.first_seq, BreakReason::TombstoneMismatch);
        };
        report.deliberate_gaps.push(DeliberateGap {
            first_seq: a.first_seq,
            last_seq: a.last_seq,
            period_start_ms: a.period_start_ms,
            period_end_ms: a.period_end_ms,
            tombstone: note.to_owned(),
        });
        *prev = a.last_hash;
        *expected = a.last_seq + 1;
        return Ok(None);
    }
    let file = dir.join(&a.file);
    let altered = |detail: String| {
        brk(
            a.first_seq,
            BreakReason::ArchiveAltered {
                file: a.file.clone(),
                detail,
            },
        )
    };
    match archive::file_sha256(&file) {
        Err(StoreError::Archive(ArchiveError::Io { source, .. }))
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return brk(
                a.first_seq,
                BreakReason::ArchiveMissing {
                    file: a.file.clone(),
                },
            );
        }
        Err(e) => return Err(e),
        Ok((sha, _)) if sha != a.sha256 => {
            return altered(format!(
                "SHA-256 {}, sealed as {}",
                hex::encode(sha),
                hex::encode(a.sha256)
            ));
        }
        Ok(_) => {}
    }
    let mut found: Option<ChainBreak> = None;
    let scanned = cache.scan(dir, a, a.first_seq - 1, a.last_seq, |block, i| {
        let seq = block.seq(i) as u64;
        match record_hash(prev, &block.values(i)) {
            Some(h) if h == block.hash(i) => {
                *prev = h;
                *expected = seq + 1;
                report.records_checked += 1;
                Ok(std::ops::ControlFlow::Continue(()))
            }
            _ => {
                found = Some(ChainBreak {
                    seq,
                    reason: BreakReason::HashMismatch,
                });
                Ok(std::ops::ControlFlow::Break(()))
            }
        }
    });
    match scanned {
        Ok(_) if found.is_some() => Ok(found),
        Ok(_) if *expected != a.last_seq + 1 || *prev != a.last_hash => altered(format!(
            "it ends at seq {} without its last record's hash",
            *expected - 1
        )),
        Ok(_) => Ok(None),
        Err(StoreError::Archive(e)) => altered(e.to_string()),
        Err(StoreError::CorruptRow { seq, .. }) => brk(
            seq,
            BreakReason::Malformed {
                column: "archived record",
            },
        ),
        Err(e) => Err(e),
    }
}

/// After a mismatch at `seq`: is the record that belongs at `seq` stored further on?
/// It does if some later row, re-encoded with `seq`, chains from `prev` to either its
/// own stored hash (whole rows swapped) or the hash stored at `seq` (contents swapped,
/// hashes left in place).
fn find_displaced(
    tx: &rusqlite::Transaction<'_>,
    seq: u64,
    prev: &[u8; 32],
    stored_here: &[u8; 32],
) -> Result<Option<u64>, StoreError> {
    let mut stmt = tx
        .prepare(&format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))
        .map_err(StoreError::sqlite("prepare the reorder probe"))?;
    let mut rows = stmt
        .query((seq as i64, REORDER_WINDOW))
        .map_err(StoreError::sqlite("probe for reordering"))?;
    while let Some(row) = rows
        .next()
        .map_err(StoreError::sqlite("probe for reordering"))?
    {
        let (mut vals, stored) = row_values(row).map_err(StoreError::sqlite("read a record"))?;
        let ValueRef::Integer(at) = vals[0] else {
            continue;
        };
        vals[0] = ValueRef::Integer(seq as i64);
        let Some(h) = record_hash(prev, &vals) else {
            continue;
        };
        if h == *stored_here || ValueRef::Blob(&h) == stored {
            return Ok(Some(at as u64));
        }
    }
    Ok(None)
}
