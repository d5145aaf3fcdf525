//! The hash chain: canonical encoding of a record and the verifier.
//!
//! The format is specified in the [module documentation](super). Writer and verifier
//! share [`record_hash`], which encodes SQLite values exactly as stored, so what is
//! verified is what is on disk, not a re-interpretation of it.

use std::fmt;
use std::path::Path;

use rusqlite::OptionalExtension;
use rusqlite::types::ValueRef;
use sha2::{Digest, Sha256};

use super::StoreError;
use super::schema::{self, RECORD_COLUMNS};

/// The `prev_hash` of the first record.
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// Number of hashed columns (every column of `records` except `hash`).
pub(crate) const HASHED_COLUMNS: usize = 17;

/// How far past a mismatching record the verifier looks for the record that belongs
/// there, to tell "swapped" from "altered".
const REORDER_WINDOW: i64 = 4096;

/// `SHA-256(prev || enc(c0) || ... || enc(c16))`; `None` if a value cannot be encoded
/// (a REAL, or longer than 4 GiB: neither can occur in an unaltered file).
pub(crate) fn record_hash(
    prev: &[u8; 32],
    cols: &[ValueRef<'_>; HASHED_COLUMNS],
) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(prev);
    for v in cols {
        match *v {
            ValueRef::Null => h.update(u32::MAX.to_be_bytes()),
            ValueRef::Integer(i) => {
                h.update(8u32.to_be_bytes());
                h.update(i.to_be_bytes());
            }
            ValueRef::Text(b) | ValueRef::Blob(b) => {
                let len = u32::try_from(b.len()).ok().filter(|&l| l != u32::MAX)?;
                h.update(len.to_be_bytes());
                h.update(b);
            }
            ValueRef::Real(_) => return None,
        }
    }
    Some(h.finalize().into())
}

/// The chain head recorded in `meta`: the last committed `seq` and its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// Last committed seq (0 for an empty log).
    pub last_seq: u64,
    /// Its hash (32 zero bytes for an empty log).
    pub last_hash: [u8; 32],
}

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

/// The 17 hashed values and the stored hash of a `SELECT {RECORD_COLUMNS}` row.
pub(crate) fn row_values<'r>(
    row: &'r rusqlite::Row<'_>,
) -> rusqlite::Result<([ValueRef<'r>; HASHED_COLUMNS], ValueRef<'r>)> {
    let mut vals = [ValueRef::Null; HASHED_COLUMNS];
    for (i, v) in vals.iter_mut().enumerate() {
        *v = row.get_ref(i)?;
    }
    Ok((vals, row.get_ref(HASHED_COLUMNS)?))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vector, computed independently (Python `hashlib` + `struct`) from the
    /// format in the module documentation. Covers NULL, empty text, integers, a
    /// non-UTF-8 blob with NUL, and the zero genesis hash.
    #[test]
    fn known_answer_vector() {
        let cols: [ValueRef<'_>; HASHED_COLUMNS] = [
            ValueRef::Integer(1),
            ValueRef::Integer(1_795_870_701_123),
            ValueRef::Text(b"1.2.3.4:5678"),
            ValueRef::Integer(7),
            ValueRef::Text(b"in"),
            ValueRef::Text(b"frame"),
            ValueRef::Blob(b"##\x00\xff\r\n"),
            ValueRef::Text(b"2017"),
            ValueRef::Null,
            ValueRef::Text(b"2011"),
            ValueRef::Text(b"MN1"),
            ValueRef::Text(b""),
            ValueRef::Null,
            ValueRef::Text(b"rejected"),
            ValueRef::Integer(1),
            ValueRef::Text(b"[]"),
            ValueRef::Text(br#"{"a":12.50}"#),
        ];
        assert_eq!(
            hex::encode(record_hash(&GENESIS, &cols).unwrap()),
            "122cd997a3874991de2dc58355733f5dd7216e4c3fdc50785d4f1f534d63d69e"
        );
    }

    #[test]
    fn null_and_empty_text_differ_and_reals_are_refused() {
        let mut cols = [ValueRef::Null; HASHED_COLUMNS];
        let with_null = record_hash(&GENESIS, &cols).unwrap();
        cols[8] = ValueRef::Text(b"");
        assert_ne!(record_hash(&GENESIS, &cols).unwrap(), with_null);
        cols[8] = ValueRef::Real(1.0);
        assert_eq!(record_hash(&GENESIS, &cols), None);
    }

    #[test]
    fn the_previous_hash_is_chained() {
        let cols = [ValueRef::Integer(1); HASHED_COLUMNS];
        assert_ne!(record_hash(&GENESIS, &cols), record_hash(&[1; 32], &cols));
    }
}
