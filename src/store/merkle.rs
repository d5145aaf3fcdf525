//! The Merkle tree over the log (RFC 6962), kept by the writer in the same
//! transaction as the records it covers.
//!
//! # Why a tree as well as the chain
//!
//! The hash chain proves that a log is internally consistent, not that it is the log
//! the gateway wrote: whoever can write the file can cut its tail or change a value
//! and re-chain everything after it. A signed checkpoint (tree size and root hash)
//! published off the machine fixes the log as it was; the tree then answers, in
//! O(log n) hashes, the two questions a third party asks: is this record in the log
//! the checkpoint signed (inclusion proof), and is today's log an extension of the
//! one signed yesterday (consistency proof)?
//!
//! # Shape
//!
//! RFC 6962 section 2.1: `MTH({d0}) = SHA-256(0x00 || d0)` for a leaf and
//! `MTH(D[n]) = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))` for `k` the largest
//! power of two below `n`. Leaf `n` is the record with `seq = n + 1`; its data is
//! the record's canonical encoding ([`super::chain::leaf_bytes`]), so the tree
//! covers exactly the bytes the chain covers. The tree size is the number of
//! records, i.e. the chain head's `seq`.
//!
//! Table `tree_hashes` stores the hash of every complete subtree under its
//! "stored hash index" (Crosby and Wallach, section 3.3; the numbering of Go's
//! `sumdb/tlog`, which `tlog_tiles` implements): appending leaf `n` stores the
//! leaf hash and the hash of every subtree that leaf completes, on average two
//! rows. The writer keeps the right edge of the tree (one hash per set bit of the
//! size, [`Frontier`]) in memory, so appending reads nothing. Proofs are computed by
//! `tlog_tiles` from the stored hashes.

use rusqlite::{Connection, OptionalExtension};
use tlog_tiles::{Hash, HashReader};

use super::StoreError;
use super::chain::HASHED_COLUMNS;

/// RFC 6962 interior node: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    tlog_tiles::node_hash(Hash(*left), Hash(*right)).0
}

/// The stored hash index of the subtree at `level` (0 = leaves) numbered `n` from
/// the left.
fn stored_index(level: u8, n: u64) -> u64 {
    tlog_tiles::stored_hash_index(level, n)
}

/// The right edge of the tree: the roots of the complete subtrees the first `size`
/// leaves decompose into, largest (leftmost) first. One per set bit of `size`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// `(level, hash)`, levels strictly decreasing.
    nodes: Vec<(u8, [u8; 32])>,
}

impl Frontier {
    /// Number of leaves covered.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends leaf `self.size` with hash `leaf`; `store` receives every hash to
    /// persist, in increasing stored-index order (the leaf, then each subtree it
    /// completes).
    pub fn push(&mut self, leaf: [u8; 32], mut store: impl FnMut(u64, &[u8; 32])) {
        let mut n = self.size;
        let mut level = 0u8;
        let mut hash = leaf;
        store(stored_index(0, n), &hash);
        // A leaf with an odd index closes its parent; the parent closes the
        // grandparent when it too is a right child, and so on: the carries of
        // `size + 1` in binary.
        while n & 1 == 1 {
            let (l, left) = self.nodes.pop().expect("an odd index has a left sibling");
            debug_assert_eq!(l, level);
            hash = node_hash(&left, &hash);
            level += 1;
            n >>= 1;
            store(stored_index(level, n), &hash);
        }
        self.nodes.push((level, hash));
        self.size += 1;
    }

    /// The tree head `MTH(D[0:size])`: the frontier folded right to left.
    pub fn root(&self) -> [u8; 32] {
        let mut it = self.nodes.iter().rev();
        let Some(&(_, last)) = it.next() else {
            return tlog_tiles::EMPTY_HASH.0;
        };
        it.fold(last, |acc, (_, left)| node_hash(left, &acc))
    }

    /// Reads the frontier of a tree of `size` leaves from `tree_hashes`.
    pub(crate) fn load(conn: &Connection, size: u64) -> Result<Frontier, StoreError> {
        let mut nodes = Vec::with_capacity(size.count_ones() as usize);
        let mut start = 0u64;
        for level in (0..64u8).rev() {
            if size & (1 << level) != 0 {
                let id = stored_index(level, start >> level);
                let hash = read_hash(conn, id)?.ok_or_else(|| missing(id))?;
                nodes.push((level, hash));
                start += 1 << level;
            }
        }
        Ok(Frontier { size, nodes })
    }
}

fn missing(id: u64) -> StoreError {
    let (level, n) = tlog_tiles::split_stored_hash_index(id);
    StoreError::Tree {
        reason: format!("tree hash of subtree {n} at level {level} (id {id}) is missing"),
    }
}

fn read_hash(conn: &Connection, id: u64) -> Result<Option<[u8; 32]>, StoreError> {
    let run: Option<(i64, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT id, hashes FROM tree_hashes WHERE id <= ?1 ORDER BY id DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row([id as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(StoreError::sqlite("read a tree hash"))?;
    let Some((first, hashes)) = run else {
        return Ok(None);
    };
    let at = (id - first as u64) as usize * 32;
    Ok(hashes
        .get(at..at + 32)
        .map(|h| h.try_into().expect("32 bytes")))
}

/// Number of leaves `tree_hashes` covers: the last stored hash is the highest
/// subtree the last leaf completed, which ends at that leaf.
pub(crate) fn stored_size(conn: &Connection) -> Result<u64, StoreError> {
    let last: Option<(i64, i64)> = conn
        .query_row(
            "SELECT id, length(hashes) FROM tree_hashes ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(StoreError::sqlite("read the tree size"))?;
    Ok(match last {
        None => 0,
        Some((first, len)) => {
            let id = first as u64 + (len as u64 / 32).saturating_sub(1);
            let (level, n) = tlog_tiles::split_stored_hash_index(id);
            (n + 1) << level
        }
    })
}

/// Inserts one run of consecutive stored hashes (the writer's and the backfill's
/// statement).
pub(crate) const INSERT_RUN_SQL: &str = "INSERT INTO tree_hashes (id, hashes) VALUES (?1, ?2)";

/// Stored hashes waiting to be written as one row: they are consecutive, because
/// appends store them in index order, so a commit's hashes are one run and cost
/// one insert (benches/README.md, issue 20).
#[derive(Debug, Default)]
pub(crate) struct Run {
    first: u64,
    hashes: Vec<u8>,
}

impl Run {
    /// Adds the hash stored at `id`, the index after the last one added.
    pub(crate) fn push(&mut self, id: u64, hash: &[u8; 32]) {
        if self.hashes.is_empty() {
            self.first = id;
        }
        debug_assert_eq!(id, self.first + self.hashes.len() as u64 / 32);
        self.hashes.extend_from_slice(hash);
    }

    /// Hashes held.
    pub(crate) fn len(&self) -> usize {
        self.hashes.len() / 32
    }

    /// Writes the run as one row (nothing when empty) and starts a new one.
    pub(crate) fn write(
        &mut self,
        insert: &mut rusqlite::CachedStatement<'_>,
    ) -> rusqlite::Result<()> {
        if !self.hashes.is_empty() {
            insert.execute((self.first as i64, &self.hashes[..]))?;
            self.hashes.clear();
        }
        Ok(())
    }
}

/// Most hashes the backfill puts in one row (32 KiB): a proof reads whole rows.
const BACKFILL_RUN: usize = 1024;

/// How many records one backfill transaction covers.
const BACKFILL_BATCH: u64 = 20_000;

/// Computes the tree for records the file held before it had one (migration 9 of a
/// log written by an earlier release), and returns the frontier at the head.
///
/// Returns `Ok(None)` when the records and the tree cannot be brought together:
/// a record in the range to hash is missing (a gap where a tail was cut and the
/// head left standing) or the stored tree covers more leaves than the log has
/// records (the tail of the records was cut afterwards). Either is evidence of
/// tampering that `verify` reports; the gateway keeps logging frames, but it can no
/// longer extend or sign the tree, and says so.
pub(crate) fn backfill(conn: &mut Connection, head: u64) -> Result<Option<Frontier>, StoreError> {
    let size = stored_size(conn)?;
    if size > head {
        tracing::error!(
            tree_size = size,
            head,
            "the Merkle tree covers more records than the log holds (was the log's tail cut?): no checkpoints can be signed until an operator restores the log; run `hj212-gateway verify`"
        );
        return Ok(None);
    }
    let mut frontier = Frontier::load(conn, size)?;
    if size == head {
        return Ok(Some(frontier));
    }
    tracing::info!(
        from = size + 1,
        to = head,
        "computing the Merkle tree for records written before it existed"
    );
    while frontier.size() < head {
        let from = frontier.size() + 1;
        let to = (from + BACKFILL_BATCH - 1).min(head);
        let tx = conn
            .transaction()
            .map_err(StoreError::sqlite("begin the tree backfill"))?;
        {
            let mut read = tx
                .prepare(&format!(
                    "SELECT {} FROM records WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
                    super::chain::RECORD_COLUMNS
                ))
                .map_err(StoreError::sqlite("read records for the tree"))?;
            let mut insert = tx
                .prepare_cached(INSERT_RUN_SQL)
                .map_err(StoreError::sqlite("prepare the tree insert"))?;
            let mut run = Run::default();
            let mut rows = read
                .query([from as i64, to as i64])
                .map_err(StoreError::sqlite("read records for the tree"))?;
            while let Some(row) = rows
                .next()
                .map_err(StoreError::sqlite("read records for the tree"))?
            {
                let (cols, _) = super::chain::row_values(row)
                    .map_err(StoreError::sqlite("read records for the tree"))?;
                let seq = match cols[0] {
                    rusqlite::types::ValueRef::Integer(s) => s as u64,
                    _ => 0,
                };
                if seq != frontier.size() + 1 {
                    tracing::error!(
                        missing = frontier.size() + 1,
                        "a record is missing from the log: the Merkle tree stops before it and no checkpoints can be signed; run `hj212-gateway verify`"
                    );
                    return Ok(None);
                }
                let Some(leaf) = super::chain::leaf_hash(&cols) else {
                    return Err(StoreError::CorruptRow {
                        seq,
                        column: "record",
                        value: "a value the canonical encoding cannot hold".into(),
                    });
                };
                frontier.push(leaf, |id, h| run.push(id, h));
                if run.len() >= BACKFILL_RUN {
                    run.write(&mut insert)
                        .map_err(StoreError::sqlite("store tree hashes"))?;
                }
            }
            run.write(&mut insert)
                .map_err(StoreError::sqlite("store tree hashes"))?;
        }
        if frontier.size() < to {
            tracing::error!(
                missing = frontier.size() + 1,
                "a record is missing from the log: the Merkle tree stops before it and no checkpoints can be signed; run `hj212-gateway verify`"
            );
            return Ok(None);
        }
        tx.commit()
            .map_err(StoreError::sqlite("commit the tree backfill"))?;
    }
    tracing::info!(size = head, "Merkle tree complete");
    Ok(Some(frontier))
}

/// Reads stored tree hashes for `tlog_tiles`, remembering why a read failed
/// (`tlog_tiles`' error type carries no detail).
struct Stored<'c> {
    conn: &'c Connection,
    why: std::cell::RefCell<Option<StoreError>>,
}

impl HashReader for Stored<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        let mut out = Vec::with_capacity(indexes.len());
        for &id in indexes {
            match read_hash(self.conn, id) {
                Ok(Some(h)) => out.push(Hash(h)),
                Ok(None) => {
                    *self.why.borrow_mut() = Some(missing(id));
                    return Err(tlog_tiles::Error::IndexesNotInTree);
                }
                Err(e) => {
                    *self.why.borrow_mut() = Some(e);
                    return Err(tlog_tiles::Error::IndexesNotInTree);
                }
            }
        }
        Ok(out)
    }
}

impl<'c> Stored<'c> {
    fn new(conn: &'c Connection) -> Self {
        Stored {
            conn,
            why: std::cell::RefCell::new(None),
        }
    }

    fn fail(&self, e: tlog_tiles::Error) -> StoreError {
        self.why
            .borrow_mut()
            .take()
            .unwrap_or_else(|| StoreError::Tree {
                reason: e.to_string(),
            })
    }
}

/// The tree's proofs and heads, read from a log file's stored hashes.
///
/// Every size and index is checked against the stored tree first: `tlog_tiles`
/// panics on arguments outside the tree, and these come from command lines and
/// checkpoint files.
pub struct Tree<'c> {
    conn: &'c Connection,
    size: u64,
}

impl<'c> Tree<'c> {
    /// The tree stored in the file `conn` reads.
    fn new(conn: &'c Connection) -> Result<Tree<'c>, StoreError> {
        Ok(Tree {
            conn,
            size: stored_size(conn)?,
        })
    }

    /// Number of leaves (records) the stored tree covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn within(&self, size: u64, what: &str) -> Result<(), StoreError> {
        if size > self.size {
            return Err(StoreError::Tree {
                reason: format!(
                    "{what} {size} is beyond the tree, which has {} leaves",
                    self.size
                ),
            });
        }
        Ok(())
    }

    /// `MTH(D[0:size])`.
    pub fn root(&self, size: u64) -> Result<[u8; 32], StoreError> {
        self.within(size, "tree size")?;
        let r = Stored::new(self.conn);
        tlog_tiles::tree_hash(size, &r)
            .map(|h| h.0)
            .map_err(|e| r.fail(e))
    }

    /// The stored hash of leaf `index` (0-based).
    pub fn leaf_hash(&self, index: u64) -> Result<[u8; 32], StoreError> {
        self.within(index + 1, "leaf")?;
        let id = stored_index(0, index);
        read_hash(self.conn, id)?.ok_or_else(|| missing(id))
    }

    /// RFC 6962 section 2.1.1 audit path of leaf `index` in the tree of `size`
    /// leaves, from the leaf's sibling up.
    pub fn inclusion(&self, index: u64, size: u64) -> Result<Vec<[u8; 32]>, StoreError> {
        self.within(size, "tree size")?;
        if index >= size {
            return Err(StoreError::Tree {
                reason: format!("leaf {index} is not in a tree of {size} leaves"),
            });
        }
        let r = Stored::new(self.conn);
        tlog_tiles::prove_record(size, index, &r)
            .map(|p| p.into_iter().map(|h| h.0).collect())
            .map_err(|e| r.fail(e))
    }

    /// RFC 6962 section 2.1.2 consistency proof from the tree of `old` leaves to the
    /// tree of `new` leaves.
    pub fn consistency(&self, old: u64, new: u64) -> Result<Vec<[u8; 32]>, StoreError> {
        self.within(new, "tree size")?;
        if old > new {
            return Err(StoreError::Tree {
                reason: format!("cannot prove a tree of {old} leaves is a prefix of one of {new}"),
            });
        }
        if old == new || old == 0 {
            return Ok(Vec::new());
        }
        let r = Stored::new(self.conn);
        tlog_tiles::prove_tree(new, old, &r)
            .map(|p| p.into_iter().map(|h| h.0).collect())
            .map_err(|e| r.fail(e))
    }
}

/// A signed tree head the gateway cut, as kept in `checkpoints`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// Tree size (the last seq it covers).
    pub size: u64,
    /// `MTH(D[0:size])`.
    pub root: [u8; 32],
    /// The signed note (C2SP tlog-checkpoint), exactly as published.
    pub note: String,
    /// When it was cut (unix milliseconds).
    pub cut_at_ms: i64,
}

/// The tree and checkpoints of one log file, on a connection of their own.
///
/// Blocking; from async code use `spawn_blocking`.
#[derive(Debug)]
pub struct LogTree {
    conn: Connection,
}

impl LogTree {
    /// Opens `path` read-only (`prove`, `verify`, the HTTP `/checkpoint`).
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<LogTree, StoreError> {
        Ok(LogTree {
            conn: super::schema::open_read_only(path.as_ref())?,
        })
    }

    /// Opens `path` for recording checkpoints (the daemon's checkpointer). The
    /// writer must have opened (and so migrated) the file first.
    pub fn open_for_checkpoints(path: impl AsRef<std::path::Path>) -> Result<LogTree, StoreError> {
        Ok(LogTree {
            conn: super::schema::open_side(path.as_ref())?,
        })
    }

    /// The stored tree, as of now.
    pub fn tree(&self) -> Result<Tree<'_>, StoreError> {
        Tree::new(&self.conn)
    }

    /// The chain head's seq (`meta.last_seq`): the tree should have as many leaves.
    pub fn head_seq(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT last_seq FROM meta WHERE id = 1", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|s| s as u64)
            .map_err(StoreError::sqlite("read the chain head"))
    }

    /// Keeps a checkpoint the gateway signed. `false` if one of that size is
    /// already kept (the log did not grow between two cuts).
    pub fn record_checkpoint(&self, cp: &StoredCheckpoint) -> Result<bool, StoreError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO checkpoints (size, root, note, cut_at_ms) VALUES (?1, ?2, ?3, ?4)",
                (cp.size as i64, &cp.root[..], &cp.note, cp.cut_at_ms),
            )
            .map(|n| n == 1)
            .map_err(StoreError::sqlite("record a checkpoint"))
    }

    /// The largest checkpoint kept, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<StoredCheckpoint>, StoreError> {
        self.checkpoint_where("ORDER BY size DESC LIMIT 1", 0)
    }

    /// The smallest kept checkpoint covering at least `size` records.
    pub fn checkpoint_covering(&self, size: u64) -> Result<Option<StoredCheckpoint>, StoreError> {
        self.checkpoint_where("WHERE size >= ?1 ORDER BY size LIMIT 1", size)
    }

    /// The kept checkpoint of exactly `size` records.
    pub fn checkpoint_of_size(&self, size: u64) -> Result<Option<StoredCheckpoint>, StoreError> {
        self.checkpoint_where("WHERE size = ?1", size)
    }

    fn checkpoint_where(
        &self,
        clause: &str,
        size: u64,
    ) -> Result<Option<StoredCheckpoint>, StoreError> {
        let sql = format!("SELECT size, root, note, cut_at_ms FROM checkpoints {clause}");
        let mut st = self
            .conn
            .prepare_cached(&sql)
            .map_err(StoreError::sqlite("read checkpoints"))?;
        let params: &[&dyn rusqlite::ToSql] = if clause.contains("?1") {
            &[&(size as i64)]
        } else {
            &[]
        };
        let row = st
            .query_row(params, |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .optional()
            .map_err(StoreError::sqlite("read checkpoints"))?;
        row.map(|(size, root, note, cut_at_ms)| {
            Ok(StoredCheckpoint {
                size: size as u64,
                root: root.try_into().map_err(|_| StoreError::CorruptRow {
                    seq: size as u64,
                    column: "checkpoints.root",
                    value: "not 32 bytes".into(),
                })?,
                note,
                cut_at_ms,
            })
        })
        .transpose()
    }
}

/// A tree head someone holds (from a checkpoint) to hold the log against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: [u8; 32],
}

/// What [`check_log`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeReport {
    /// Records hashed into the recomputed tree.
    pub records: u64,
    /// The recomputed root differs from the stored tree's at the same size: a record
    /// was changed (and perhaps re-chained) without rebuilding the tree, or the
    /// reverse. `None` when they agree (or the stored tree is empty).
    pub stored_tree_differs: Option<String>,
    /// Per head given, in the order given: `None` when the log is consistent with it,
    /// else where it first differs.
    pub heads: Vec<(Head, Option<Difference>)>,
}

impl TreeReport {
    /// True when the stored tree matches the records and every head is consistent.
    pub fn is_ok(&self) -> bool {
        self.stored_tree_differs.is_none() && self.heads.iter().all(|(_, d)| d.is_none())
    }
}

/// Where the log stops matching a signed head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// The log has fewer records than the head covers: it ends at `last`.
    Shorter {
        /// The log's last record.
        last: u64,
    },
    /// A record is missing from the log (a gap in `seq`).
    Missing {
        /// The first missing seq.
        seq: u64,
    },
    /// This is the first record that is not what the head signed.
    Record {
        /// Its seq.
        seq: u64,
    },
    /// Some record in `after + 1 ..= through` is not what the head signed; the
    /// tree stored in the file was rebuilt too, so it cannot say which.
    Range {
        /// Last seq known good (the largest consistent head given, or 0).
        after: u64,
        /// The head's size.
        through: u64,
    },
    /// The log could not be read far enough to tell (an archive file missing or
    /// unreadable): not consistent as far as anyone can show.
    NotChecked {
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::Shorter { last } => write!(
                f,
                "the log ends at seq {last}, before the checkpoint's size: first seq that differs is {}",
                last + 1
            ),
            Difference::Missing { seq } => {
                write!(
                    f,
                    "record {seq} is missing: first seq that differs is {seq}"
                )
            }
            Difference::Record { seq } => write!(
                f,
                "first seq that differs is {seq} (its record is not the one the checkpoint signed)"
            ),
            Difference::Range { after, through } => write!(
                f,
                "a record in seq {}..={through} differs (the file's own tree was rebuilt as well, so the first one cannot be named)",
                after + 1
            ),
            Difference::NotChecked { reason } => {
                write!(f, "the log could not be read to check it: {reason}")
            }
        }
    }
}

/// [`check_log`], but a log that cannot be read to its end (an archive file gone
/// without a tombstone, a corrupt row) is a finding, not an error: `verify` has
/// then shown that the log is not what was signed.
pub fn check_log_or_report(path: &std::path::Path, heads: &[Head]) -> TreeReport {
    check_log(path, heads).unwrap_or_else(|e| TreeReport {
        records: 0,
        stored_tree_differs: Some(format!("not recomputed: {e}")),
        heads: heads
            .iter()
            .map(|h| {
                (
                    *h,
                    Some(Difference::NotChecked {
                        reason: e.to_string(),
                    }),
                )
            })
            .collect(),
    })
}

/// Recomputes the tree from the records themselves (never from the stored
/// hashes, which whoever changed the records may have rebuilt) and holds it against
/// the stored tree and against every head given.
///
/// One pass over the log in seq order; a second pass, up to the failing size,
/// only when a head does not match and the stored tree still reproduces that head
/// (then the stored leaf hashes are the signed ones and name the first record that
/// differs).
pub fn check_log(path: &std::path::Path, heads: &[Head]) -> Result<TreeReport, StoreError> {
    let reader = super::Reader::open(path)?;
    let tree_conn = super::schema::open_read_only(path)?;
    let stored = Tree::new(&tree_conn)?;
    // Ranges retention deleted (a signed tombstone each): their records are gone,
    // so their leaves can only come from the stored tree.
    let deleted: Vec<(u64, u64)> = super::archive::list(&tree_conn)?
        .into_iter()
        .filter(|a| a.state == super::archive::ArchiveState::Deleted)
        .map(|a| (a.first_seq, a.last_seq))
        .collect();
    let head = LogTree {
        conn: super::schema::open_read_only(path)?,
    }
    .head_seq()?;
    let mut wanted: Vec<u64> = heads.iter().map(|h| h.size).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut roots = std::collections::HashMap::new();
    let mut f = Frontier::default();
    let mut gap = None;
    let mut next = wanted.iter().peekable();
    let mut stored_root_at = None;
    let mut push = |f: &mut Frontier, leaf: [u8; 32]| {
        f.push(leaf, |_, _| {});
        while next.peek().is_some_and(|&&s| s == f.size()) {
            roots.insert(f.size(), f.root());
            next.next();
        }
        if f.size() == stored.size() {
            stored_root_at = Some(f.root());
        }
    };
    // Leaves of tombstoned seqs from `f.size() + 1` up to `before` (exclusive);
    // false if a seq there is neither tombstoned nor in the stored tree.
    let fill = |f: &mut Frontier, push: &mut dyn FnMut(&mut Frontier, [u8; 32]), before: u64| {
        while f.size() + 1 < before {
            let seq = f.size() + 1;
            if !deleted.iter().any(|&(a, b)| (a..=b).contains(&seq)) {
                return Ok(false);
            }
            match stored.leaf_hash(seq - 1) {
                Ok(h) => push(f, h),
                Err(_) => return Ok(false),
            }
        }
        Ok::<bool, StoreError>(true)
    };
    for rec in reader.records(super::RecordFilter::default())? {
        let rec = rec?;
        if rec.seq != f.size() + 1 && !fill(&mut f, &mut push, rec.seq)? {
            gap = Some(f.size() + 1);
            break;
        }
        push(&mut f, leaf_hash_of(&rec));
    }
    if gap.is_none() {
        // A tail retention deleted entirely (nothing live after it).
        fill(&mut f, &mut push, head + 1)?;
    }
    let records = f.size();
    let stored_tree_differs = if stored.size() == 0 {
        None
    } else {
        match stored_root_at {
            Some(mine) if mine == stored.root(stored.size())? => None,
            Some(_) => Some(format!(
                "the tree stored in the file does not match the records (size {})",
                stored.size()
            )),
            None => Some(format!(
                "the tree stored in the file covers {} records, the log has {records}",
                stored.size()
            )),
        }
    };
    let consistent_below = |size: u64| {
        heads
            .iter()
            .filter(|h| h.size < size && roots.get(&h.size) == Some(&h.root))
            .map(|h| h.size)
            .max()
            .unwrap_or(0)
    };
    let mut out = Vec::with_capacity(heads.len());
    for h in heads {
        let diff = match roots.get(&h.size) {
            Some(r) if *r == h.root => None,
            Some(_) => Some(first_difference(
                &reader,
                &stored,
                h,
                consistent_below(h.size),
            )?),
            None => Some(match gap {
                Some(seq) => Difference::Missing { seq },
                None => Difference::Shorter { last: records },
            }),
        };
        out.push((*h, diff));
    }
    Ok(TreeReport {
        records,
        stored_tree_differs,
        heads: out,
    })
}

fn first_difference(
    reader: &super::Reader,
    stored: &Tree<'_>,
    head: &Head,
    good: u64,
) -> Result<Difference, StoreError> {
    let signed_tree_kept =
        head.size <= stored.size() && stored.root(head.size).is_ok_and(|r| r == head.root);
    if !signed_tree_kept {
        return Ok(Difference::Range {
            after: good,
            through: head.size,
        });
    }
    let filter = super::RecordFilter {
        after_seq: good,
        until_seq: Some(head.size),
        ..Default::default()
    };
    for rec in reader.records(filter)? {
        let rec = rec?;
        if leaf_hash_of(&rec) != stored.leaf_hash(rec.seq - 1)? {
            return Ok(Difference::Record { seq: rec.seq });
        }
    }
    // Every leaf matches yet the root did not: only an interior hash can differ,
    // which the records cannot cause.
    Ok(Difference::Range {
        after: good,
        through: head.size,
    })
}

/// Checks an RFC 6962 audit path: leaf `index` with hash `leaf` is in the tree of
/// `size` leaves whose head is `root`.
pub fn check_inclusion(
    proof: &[[u8; 32]],
    size: u64,
    root: &[u8; 32],
    index: u64,
    leaf: &[u8; 32],
) -> bool {
    if index >= size {
        return false;
    }
    let p: Vec<Hash> = proof.iter().map(|h| Hash(*h)).collect();
    tlog_tiles::check_record(&p, size, Hash(*root), index, Hash(*leaf)).is_ok()
}

/// Checks an RFC 6962 consistency proof between the heads of trees of `old` and
/// `new` leaves.
pub fn check_consistency(
    proof: &[[u8; 32]],
    new: u64,
    new_root: &[u8; 32],
    old: u64,
    old_root: &[u8; 32],
) -> bool {
    if old > new {
        return false;
    }
    if old == new {
        return proof.is_empty() && old_root == new_root;
    }
    if old == 0 {
        return proof.is_empty();
    }
    let p: Vec<Hash> = proof.iter().map(|h| Hash(*h)).collect();
    tlog_tiles::check_tree(&p, new, Hash(*new_root), old, Hash(*old_root)).is_ok()
}

/// The hashed values of a stored record, in chain order (for its leaf).
pub(crate) fn record_values(
    rec: &super::StoredRecord,
) -> [rusqlite::types::ValueRef<'_>; HASHED_COLUMNS] {
    super::chain::hashed_values!(rec, rec.seq, rec.duplicate)
}

/// One value read back out of a leaf (the canonical encoding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeafValue {
    /// SQL NULL.
    Null,
    /// An INTEGER column.
    Integer(i64),
    /// A TEXT or BLOB column's bytes.
    Bytes(Vec<u8>),
}

/// Reads the 17 values back out of a leaf, in chain order (`seq`,
/// `received_at_ms`, `peer`, `session`, `direction`, `kind`, `raw`, `dialect`,
/// `st`, `cn`, `mn`, `qn`, `data_time`, `verdict`, `duplicate`, `findings`,
/// `doc`), so a proof's record can be held against what its leaf says.
///
/// The grammar is the chain's (store module documentation): each value is
/// `FF FF FF FF` (NULL) or a 32-bit big-endian length and that many bytes; the
/// four integer columns are always 8 bytes. Anything left over, a length past the
/// end, or a wrong-sized integer is refused.
pub fn decode_leaf(leaf: &[u8]) -> Result<Vec<LeafValue>, String> {
    const INTEGERS: [usize; 4] = [0, 1, 3, 14];
    let mut out = Vec::with_capacity(HASHED_COLUMNS);
    let mut rest = leaf;
    for i in 0..HASHED_COLUMNS {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| format!("value {i}: the leaf ends inside its length"))?;
        let len = u32::from_be_bytes(*len);
        if len == u32::MAX {
            out.push(LeafValue::Null);
            rest = tail;
            continue;
        }
        let len = len as usize;
        if len > tail.len() {
            return Err(format!("value {i}: length {len} runs past the leaf's end"));
        }
        let (bytes, tail) = tail.split_at(len);
        rest = tail;
        if INTEGERS.contains(&i) {
            let b: [u8; 8] = bytes
                .try_into()
                .map_err(|_| format!("value {i}: an integer of {len} bytes, not 8"))?;
            out.push(LeafValue::Integer(i64::from_be_bytes(b)));
        } else {
            out.push(LeafValue::Bytes(bytes.to_vec()));
        }
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last value", rest.len()));
    }
    Ok(out)
}

/// The stored record a decoded leaf describes (its `hash` is not in the leaf
/// and is left zero).
pub fn record_from_leaf(v: &[LeafValue]) -> Result<super::StoredRecord, String> {
    if v.len() != HASHED_COLUMNS {
        return Err(format!("{} values, not {HASHED_COLUMNS}", v.len()));
    }
    let int = |i: usize| match v[i] {
        LeafValue::Integer(n) => Ok(n),
        _ => Err(format!("value {i} is not an integer")),
    };
    let text = |i: usize| match &v[i] {
        LeafValue::Bytes(b) => {
            String::from_utf8(b.clone()).map_err(|_| format!("value {i} is not UTF-8 text"))
        }
        _ => Err(format!("value {i} is NULL")),
    };
    let opt = |i: usize| match &v[i] {
        LeafValue::Null => Ok(None),
        _ => text(i).map(Some),
    };
    let raw = match &v[6] {
        LeafValue::Bytes(b) => b.clone(),
        _ => return Err("value 6 (raw) is not bytes".into()),
    };
    let bad = |what: &str| format!("{what} is not one the log writes");
    let mut rec = super::StoredRecord {
        seq: int(0)? as u64,
        received_at_ms: int(1)?,
        peer: text(2)?,
        session: int(3)? as u64,
        direction: super::Direction::parse(&text(4)?).ok_or_else(|| bad("direction"))?,
        kind: super::Kind::parse(&text(5)?).ok_or_else(|| bad("kind"))?,
        raw,
        dialect: opt(7)?,
        st: opt(8)?,
        cn: opt(9)?,
        mn: opt(10)?,
        qn: opt(11)?,
        data_time: opt(12)?,
        verdict: super::Verdict::parse(&text(13)?).ok_or_else(|| bad("verdict"))?,
        duplicate: int(14)? != 0,
        findings: text(15)?,
        doc: text(16)?,
        doc_stored: true,
        hash: [0; 32],
    };
    rec.read_doc_column();
    Ok(rec)
}

/// A stored record's Merkle leaf: its canonical encoding.
pub fn leaf_of(rec: &super::StoredRecord) -> Vec<u8> {
    super::chain::leaf_bytes(&record_values(rec)).unwrap_or_default()
}

/// `SHA-256(0x00 || leaf)` of a stored record.
pub fn leaf_hash_of(rec: &super::StoredRecord) -> [u8; 32] {
    super::chain::leaf_hash(&record_values(rec)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The eight leaves of the RFC 6962 reference implementation's Merkle tree tests
    /// (certificate-transparency `merkle_tree_test.cc`), and the tree heads of their
    /// prefixes.
    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn tree_db(leaves: &[Vec<u8>]) -> (Connection, Vec<[u8; 32]>) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(crate::store::schema::MERKLE).unwrap();
        let mut f = Frontier::default();
        let mut roots = Vec::new();
        let mut insert = conn.prepare_cached(INSERT_RUN_SQL).unwrap();
        let mut run = Run::default();
        for (i, l) in leaves.iter().enumerate() {
            let leaf = tlog_tiles::record_hash(l).0;
            f.push(leaf, |id, h| run.push(id, h));
            // Runs of every length, as commits of different sizes leave them.
            if i % 7 < 3 {
                run.write(&mut insert).unwrap();
            }
            roots.push(f.root());
        }
        run.write(&mut insert).unwrap();
        drop(insert);
        (conn, roots)
    }

    fn write_log(path: &std::path::Path, n: usize) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (h, j) = crate::store::Store::open(crate::store::StoreConfig::new(path)).unwrap();
        rt.block_on(async {
            for i in 0..n {
                h.append(crate::store::junk_record(format!("junk {i}")))
                    .await
                    .unwrap();
            }
        });
        drop(h);
        j.join().unwrap();
    }

    /// The root recomputed from the records themselves, as `verify` does.
    fn root_from_records(path: &std::path::Path) -> [u8; 32] {
        let reader = crate::store::Reader::open(path).unwrap();
        let mut f = Frontier::default();
        for rec in reader
            .records(crate::store::RecordFilter::default())
            .unwrap()
        {
            f.push(leaf_hash_of(&rec.unwrap()), |_, _| {});
        }
        f.root()
    }

    #[test]
    fn the_writer_keeps_the_tree_and_an_old_log_gets_one_at_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        write_log(&path, 1000);
        let log = LogTree::open(&path).unwrap();
        let tree = log.tree().unwrap();
        assert_eq!(tree.size(), 1000);
        let root = tree.root(1000).unwrap();
        assert_eq!(root, root_from_records(&path));
        drop(log);

        // The file as release 8 left it: no tree.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TRIGGER tree_hashes_append_only_delete; DELETE FROM tree_hashes;
             DROP TABLE tree_hashes; DROP TABLE checkpoints; PRAGMA user_version = 8;",
        )
        .unwrap();
        drop(conn);
        write_log(&path, 5);
        let log = LogTree::open(&path).unwrap();
        let tree = log.tree().unwrap();
        assert_eq!(tree.size(), 1005);
        assert_eq!(
            tree.root(1000).unwrap(),
            root,
            "the backfill rebuilt the same tree"
        );
        assert_eq!(tree.root(1005).unwrap(), root_from_records(&path));
    }

    #[test]
    fn a_tree_ahead_of_the_records_stops_growing_but_records_are_still_logged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        write_log(&path, 10);
        // The tail cut and the head moved back, the tree left as it was.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TRIGGER records_append_only_delete; DROP TRIGGER meta_head_forward_only;
             DELETE FROM records WHERE seq > 7;
             UPDATE meta SET last_seq = 7, last_hash = (SELECT hash FROM records WHERE seq = 7);",
        )
        .unwrap();
        drop(conn);
        write_log(&path, 3);
        let log = LogTree::open(&path).unwrap();
        assert_eq!(log.head_seq().unwrap(), 10);
        assert_eq!(
            log.tree().unwrap().size(),
            10,
            "the tree did not grow past its old leaves"
        );
    }

    #[test]
    fn a_leaf_reads_back_into_its_values_and_garbage_is_refused() {
        let mut rec = crate::store::StoredRecord {
            seq: 42,
            received_at_ms: 1_795_870_701_123,
            peer: "1.2.3.4:5".into(),
            session: 7,
            direction: crate::store::Direction::In,
            kind: crate::store::Kind::Frame,
            raw: b"##\x00\xff".to_vec(),
            dialect: Some("2017".into()),
            st: None,
            cn: Some("2011".into()),
            mn: Some("MN1".into()),
            qn: None,
            data_time: None,
            verdict: crate::store::Verdict::Accepted,
            duplicate: false,
            findings: "[]".into(),
            doc: "{}".into(),
            doc_stored: true,
            hash: [0; 32],
        };
        let v = decode_leaf(&leaf_of(&rec)).unwrap();
        assert_eq!(v[0], LeafValue::Integer(42));
        assert_eq!(v[6], LeafValue::Bytes(rec.raw.clone()));
        assert_eq!(v[8], LeafValue::Null);
        assert_eq!(v[14], LeafValue::Integer(0));
        rec.seq = 43;
        let mut leaf = leaf_of(&rec);
        leaf.push(0);
        assert!(
            decode_leaf(&leaf)
                .unwrap_err()
                .contains("after the last value")
        );
        assert!(decode_leaf(&leaf[..10]).is_err());
        assert!(decode_leaf(&[0xff; 3]).is_err());
    }

    #[test]
    fn rfc6962_reference_roots() {
        let leaves: Vec<Vec<u8>> = LEAVES.iter().map(|h| hex::decode(h).unwrap()).collect();
        let (conn, roots) = tree_db(&leaves);
        for (i, want) in ROOTS.iter().enumerate() {
            assert_eq!(hex::encode(roots[i]), *want, "size {}", i + 1);
            let tree = Tree::new(&conn).unwrap();
            assert_eq!(hex::encode(tree.root(i as u64 + 1).unwrap()), *want);
            assert_eq!(
                Frontier::load(&conn, i as u64 + 1).unwrap().root(),
                roots[i]
            );
        }
        assert_eq!(Tree::new(&conn).unwrap().size(), 8);
    }

    #[test]
    fn the_writer_stores_what_tlog_stores() {
        // tlog_tiles' own append computes the same hashes at the same indexes.
        let leaves: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let (conn, _) = tree_db(&leaves);
        let r = Stored::new(&conn);
        for (n, l) in leaves.iter().enumerate() {
            for (k, h) in tlog_tiles::stored_hashes(n as u64, l, &r)
                .unwrap()
                .into_iter()
                .enumerate()
            {
                let id = tlog_tiles::stored_hash_count(n as u64) + k as u64;
                assert_eq!(
                    read_hash(&conn, id).unwrap(),
                    Some(h.0),
                    "leaf {n} hash {k}"
                );
            }
        }
        assert_eq!(
            conn.query_row(
                "SELECT sum(length(hashes)) / 32 FROM tree_hashes",
                [],
                |r| r.get::<_, i64>(0)
            )
            .unwrap() as u64,
            tlog_tiles::stored_hash_count(300)
        );
        assert_eq!(stored_size(&conn).unwrap(), 300);
    }

    #[test]
    fn every_inclusion_and_consistency_proof_checks_and_a_wrong_one_does_not() {
        let leaves: Vec<Vec<u8>> = (0..37u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let (conn, roots) = tree_db(&leaves);
        let tree = Tree::new(&conn).unwrap();
        for size in 1..=37u64 {
            let root = roots[size as usize - 1];
            for i in 0..size {
                let leaf = tlog_tiles::record_hash(&leaves[i as usize]).0;
                let p = tree.inclusion(i, size).unwrap();
                assert!(check_inclusion(&p, size, &root, i, &leaf), "{i} in {size}");
                let other = tlog_tiles::record_hash(b"forged").0;
                assert!(!check_inclusion(&p, size, &root, i, &other));
            }
            for old in 1..=size {
                let p = tree.consistency(old, size).unwrap();
                let old_root = roots[old as usize - 1];
                assert!(
                    check_consistency(&p, size, &root, old, &old_root),
                    "{old}->{size}"
                );
                if old < size {
                    assert!(!check_consistency(&p, size, &root, old, &root));
                }
            }
        }
        assert!(tree.inclusion(37, 37).is_err());
        assert!(tree.root(38).is_err());
        assert!(tree.consistency(5, 4).is_err());
    }
}
