//! The verifier: walks the whole chain of a log file and reports where it breaks.

use std::fmt;
use std::path::Path;

use rusqlite::OptionalExtension;
use rusqlite::types::ValueRef;

use super::StoreError;
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
    };
    let mut stmt = tx
        .prepare(&format!(
            "SELECT {RECORD_COLUMNS} FROM records ORDER BY seq"
        ))
        .map_err(StoreError::sqlite("prepare the verify scan"))?;
    let mut rows = stmt.query([]).map_err(StoreError::sqlite("scan the log"))?;
    let mut prev = GENESIS;
    let mut expected: u64 = 1;
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
