//! Read side: read-only record access and consumer cursors.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, Row};

use super::archive::{self, ArchiveCache, ArchiveState};
use super::chain::ChainHead;
use super::chain::RECORD_COLUMNS;
use super::schema::{self, DATA_TIME_MS};
use super::{Direction, Kind, StoreError, StoredRecord, Verdict};

/// Records fetched per query by [`Records`].
const PAGE: usize = 512;

/// The last dialect an MN spoke from a device connection.
pub(crate) const LAST_DIALECT_SQL: &str = "SELECT dialect FROM device_dialects WHERE mn = ?1";

/// A read-only connection on the log. Runs alongside the writer (WAL).
///
/// Each call is its own short read transaction, so a `Reader` never holds back WAL
/// checkpoints. Blocking: from async code use `spawn_blocking`.
///
/// Sealed archives (see [`archive`]) are read transparently: every read takes the
/// archive list and the live rows in one snapshot, serves the archived seqs from the
/// archive files (one open file, one decompressed block at a time) and the rest from
/// `records`. Seqs of an archive retention deleted are skipped, as if filtered out.
#[derive(Debug)]
pub struct Reader {
    conn: Connection,
    archive_dir: PathBuf,
    archives: RefCell<ArchiveCache>,
}

impl Reader {
    /// Opens `path` read-only. The store must have been initialised by [`super::Store::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Ok(Reader {
            conn: schema::open_read_only(path.as_ref())?,
            archive_dir: archive::archive_dir(path.as_ref()),
            archives: RefCell::default(),
        })
    }

    /// The last committed seq, 0 for an empty log.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let sql = if archive::has_table(&self.conn)? {
            // One statement, one snapshot: a seal committing in between cannot make
            // the live maximum vanish before the archived one is seen.
            "SELECT max(COALESCE((SELECT MAX(seq) FROM records), 0), \
                        COALESCE((SELECT MAX(last_seq) FROM archives), 0))"
        } else {
            "SELECT COALESCE(MAX(seq), 0) FROM records"
        };
        let max: i64 = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(StoreError::sqlite("read the last seq"))?;
        Ok(max as u64)
    }

    /// The chain head stored in `meta`.
    pub fn head(&self) -> Result<ChainHead, StoreError> {
        let (seq, hash): (i64, Vec<u8>) = self
            .conn
            .query_row(
                "SELECT last_seq, last_hash FROM meta WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(StoreError::sqlite("read the chain head"))?;
        let len = hash.len();
        Ok(ChainHead {
            last_seq: seq as u64,
            last_hash: hash.try_into().map_err(|_| StoreError::CorruptRow {
                seq: seq as u64,
                column: "meta.last_hash",
                value: format!("{len} bytes"),
            })?,
        })
    }

    /// Every consumer cursor in the `cursors` table, by name (for metrics).
    pub fn cursors(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT name, seq FROM cursors ORDER BY name")
            .map_err(StoreError::sqlite("read the cursors"))?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(StoreError::sqlite("read the cursors"))?;
        rows.collect::<Result<_, _>>()
            .map_err(StoreError::sqlite("read the cursors"))
    }

    /// Active (not yet cleared) alarms per detector kind (for metrics).
    pub fn active_alarms(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT kind, COUNT(*) FROM alarms WHERE end_ms IS NULL GROUP BY kind ORDER BY kind",
            )
            .map_err(StoreError::sqlite("count active alarms"))?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(StoreError::sqlite("count active alarms"))?;
        rows.collect::<Result<_, _>>()
            .map_err(StoreError::sqlite("count active alarms"))
    }

    /// The dialect of the last inbound frame `mn` sent from a device
    /// connection, if any. Records a platform sent about the device (peer = an
    /// upstream's name) do not count: device peers are socket addresses, the
    /// only peers with a `:`. Used to answer requests for an offline device.
    ///
    /// One primary-key seek in `device_dialects` (see `schema::DEVICE_DIALECTS`),
    /// whatever the size of the log and whether or not the log knows the MN.
    pub fn last_device_dialect(&self, mn: &str) -> Result<Option<String>, StoreError> {
        use rusqlite::OptionalExtension;
        self.conn
            .prepare_cached(LAST_DIALECT_SQL)
            .and_then(|mut st| st.query_row([mn], |r| r.get(0)).optional())
            .map_err(StoreError::sqlite("read a device's last dialect"))
    }

    /// One record by seq.
    pub fn get(&self, seq: u64) -> Result<Option<StoredRecord>, StoreError> {
        Ok(self
            .page(&RecordFilter::default(), seq.saturating_sub(1), seq, 1)?
            .pop_front())
    }

    /// Up to `limit` records with `seq > after_seq`, in seq order.
    pub fn read_from(&self, after_seq: u64, limit: usize) -> Result<Vec<StoredRecord>, StoreError> {
        Ok(self
            .page(&RecordFilter::default(), after_seq, u64::MAX, limit)?
            .into())
    }

    /// The inbound frames among the next `span` seqs after `after_seq`, and the seq
    /// the read covered: the caller's position moves there even when the stretch
    /// held only replies and junk. A consumer that publishes inbound frames only
    /// (MQTT) drains a backlog without loading the rows it would skip: about half
    /// of the log is the acks we sent.
    pub fn read_inbound_frames(
        &self,
        after_seq: u64,
        span: usize,
    ) -> Result<(Vec<StoredRecord>, u64), StoreError> {
        // The head is read first, in its own snapshot: seqs are dense and commit in
        // order, so every seq up to it is in the later snapshot the page reads.
        let until = self
            .last_seq()?
            .min(after_seq.saturating_add(span as u64))
            .max(after_seq);
        let filter = RecordFilter {
            direction: Some(Direction::In),
            kind: Some(Kind::Frame),
            ..RecordFilter::default()
        };
        let recs = self.page(&filter, after_seq, until, span)?;
        Ok((recs.into(), until))
    }

    /// Streams the records matching `filter` in seq order, a page at a time (bounded
    /// memory, no long-lived read transaction). The end is fixed when the iterator is
    /// created: records committed later are not included, so the iteration terminates
    /// even while the writer keeps appending.
    pub fn records(&self, filter: RecordFilter) -> Result<Records<'_>, StoreError> {
        let last = self.last_seq()?;
        let until = filter.until_seq.map_or(last, |u| u.min(last));
        Ok(Records {
            reader: self,
            after: filter.after_seq,
            until,
            filter,
            page: VecDeque::new(),
            done: false,
        })
    }

    fn page(
        &self,
        filter: &RecordFilter,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<VecDeque<StoredRecord>, StoreError> {
        if !archive::has_table(&self.conn)? {
            let mut out = VecDeque::new();
            self.live_page(filter, after, until, limit, &mut out)?;
            return Ok(out);
        }
        // The archive list and the live rows come from one snapshot: a seal that
        // commits meanwhile (and deletes the live copies) cannot hide a record.
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(StoreError::sqlite("begin a read"))?;
        let list = archive::list(&tx)?;
        let upto = archive::archived_upto(&list);
        let mut out = VecDeque::new();
        if after < upto && limit > 0 {
            let mut cache = self.archives.borrow_mut();
            for a in list
                .iter()
                .filter(|a| a.last_seq > after && a.first_seq <= until)
            {
                if a.state == ArchiveState::Deleted {
                    continue;
                }
                let flow = cache.scan(&self.archive_dir, a, after, until, |block, i| {
                    let rec = block.record(i)?;
                    if self.matches(filter, &rec)? {
                        out.push_back(rec);
                    }
                    Ok(if out.len() >= limit {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    })
                })?;
                if flow.is_break() {
                    break;
                }
            }
        }
        if out.len() < limit && until > upto {
            self.live_page(filter, after.max(upto), until, limit - out.len(), &mut out)?;
        }
        drop(tx);
        Ok(out)
    }

    /// What the page query's `WHERE` decides, for an archived record. The DataTime
    /// bounds use SQLite's own conversion ([`DATA_TIME_MS`]) so that both sides of
    /// an archive boundary filter alike.
    fn matches(&self, f: &RecordFilter, r: &StoredRecord) -> Result<bool, StoreError> {
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        let plain = f.direction.is_none_or(|d| d == r.direction)
            && f.kind.is_none_or(|k| k == r.kind)
            && f.verdict.is_none_or(|v| v == r.verdict)
            && eq(&f.mn, &r.mn)
            && eq(&f.cn, &r.cn)
            && eq(&f.st, &r.st)
            && f.received_from_ms.is_none_or(|t| r.received_at_ms >= t)
            && f.received_before_ms.is_none_or(|t| r.received_at_ms < t);
        if !plain || (f.data_time_from_ms.is_none() && f.data_time_before_ms.is_none()) {
            return Ok(plain);
        }
        let ms: Option<i64> = match &r.data_time {
            None => None,
            Some(t) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {}",
                    DATA_TIME_MS.replace("data_time", "?1")
                ))
                .and_then(|mut s| s.query_row([t], |row| row.get(0)))
                .map_err(StoreError::sqlite("convert a DataTime"))?,
        };
        let Some(ms) = ms else {
            return Ok(false);
        };
        Ok(f.data_time_from_ms.is_none_or(|t| ms >= t)
            && f.data_time_before_ms.is_none_or(|t| ms < t))
    }

    fn live_page(
        &self,
        filter: &RecordFilter,
        after: u64,
        until: u64,
        limit: usize,
        out: &mut VecDeque<StoredRecord>,
    ) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {RECORD_COLUMNS} FROM records \
                 WHERE seq > ?1 AND seq <= ?2 \
                 AND (?3 IS NULL OR direction = ?3) AND (?4 IS NULL OR kind = ?4) \
                 AND (?5 IS NULL OR mn = ?5) \
                 AND (?7 IS NULL OR cn = ?7) AND (?8 IS NULL OR st = ?8) \
                 AND (?9 IS NULL OR verdict = ?9) \
                 AND (?10 IS NULL OR received_at_ms >= ?10) \
                 AND (?11 IS NULL OR received_at_ms < ?11) \
                 AND (?12 IS NULL OR {DATA_TIME_MS} >= ?12) \
                 AND (?13 IS NULL OR {DATA_TIME_MS} < ?13) \
                 ORDER BY seq LIMIT ?6"
            ))
            .map_err(StoreError::sqlite("prepare a page read"))?;
        let until = i64::try_from(until).unwrap_or(i64::MAX);
        let mut rows = stmt
            .query(rusqlite::params![
                i64::try_from(after).unwrap_or(i64::MAX),
                until,
                filter.direction.map(Direction::as_str),
                filter.kind.map(Kind::as_str),
                filter.mn.as_deref(),
                i64::try_from(limit).unwrap_or(i64::MAX),
                filter.cn.as_deref(),
                filter.st.as_deref(),
                filter.verdict.map(Verdict::as_str),
                filter.received_from_ms,
                filter.received_before_ms,
                filter.data_time_from_ms,
                filter.data_time_before_ms,
            ])
            .map_err(StoreError::sqlite("read records"))?;
        while let Some(row) = rows.next().map_err(StoreError::sqlite("read records"))? {
            out.push_back(record_from_row(row)?);
        }
        Ok(())
    }
}

/// Which records [`Reader::records`] yields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordFilter {
    /// Only records with `seq > after_seq`.
    pub after_seq: u64,
    /// Only records with `seq <= until_seq` (default: the last seq when iteration starts).
    pub until_seq: Option<u64>,
    /// Only this direction.
    pub direction: Option<Direction>,
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Only this MN.
    pub mn: Option<String>,
    /// Only this CN.
    pub cn: Option<String>,
    /// Only this ST.
    pub st: Option<String>,
    /// Only this verdict.
    pub verdict: Option<Verdict>,
    /// Only records received at or after this time (UTC unix ms, inclusive).
    pub received_from_ms: Option<i64>,
    /// Only records received before this time (UTC unix ms, exclusive).
    pub received_before_ms: Option<i64>,
    /// Only records whose DataTime is at or after this instant (UTC unix ms,
    /// inclusive). Records without a DataTime never match a DataTime bound.
    pub data_time_from_ms: Option<i64>,
    /// Only records whose DataTime is before this instant (UTC unix ms, exclusive).
    pub data_time_before_ms: Option<i64>,
}

/// Iterator returned by [`Reader::records`].
#[derive(Debug)]
pub struct Records<'r> {
    reader: &'r Reader,
    filter: RecordFilter,
    after: u64,
    until: u64,
    page: VecDeque<StoredRecord>,
    done: bool,
}

impl Iterator for Records<'_> {
    type Item = Result<StoredRecord, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty() && !self.done {
            match self.reader.page(&self.filter, self.after, self.until, PAGE) {
                Ok(page) => {
                    self.done = page.len() < PAGE;
                    self.page = page;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        let rec = self.page.pop_front()?;
        self.after = rec.seq;
        Some(Ok(rec))
    }
}

fn record_from_row(row: &Row<'_>) -> Result<StoredRecord, StoreError> {
    fn col<T: rusqlite::types::FromSql>(row: &Row<'_>, i: usize) -> Result<T, StoreError> {
        row.get(i).map_err(StoreError::sqlite("decode a record"))
    }
    let seq = col::<i64>(row, 0)? as u64;
    let corrupt = |column, value: &str| StoreError::CorruptRow {
        seq,
        column,
        value: value.to_owned(),
    };
    let direction: String = col(row, 4)?;
    let kind: String = col(row, 5)?;
    let verdict: String = col(row, 13)?;
    let hash: Vec<u8> = col(row, 17)?;
    let hash_len = hash.len();
    let mut rec = StoredRecord {
        seq,
        received_at_ms: col(row, 1)?,
        peer: col(row, 2)?,
        session: col::<i64>(row, 3)? as u64,
        direction: Direction::parse(&direction).ok_or_else(|| corrupt("direction", &direction))?,
        kind: Kind::parse(&kind).ok_or_else(|| corrupt("kind", &kind))?,
        raw: col(row, 6)?,
        dialect: col(row, 7)?,
        st: col(row, 8)?,
        cn: col(row, 9)?,
        mn: col(row, 10)?,
        qn: col(row, 11)?,
        data_time: col(row, 12)?,
        verdict: Verdict::parse(&verdict).ok_or_else(|| corrupt("verdict", &verdict))?,
        duplicate: col::<i64>(row, 14)? != 0,
        findings: col(row, 15)?,
        doc: col(row, 16)?,
        doc_stored: true,
        hash: hash
            .try_into()
            .map_err(|_| corrupt("hash", &format!("{hash_len} bytes")))?,
    };
    rec.read_doc_column();
    Ok(rec)
}

/// Consumer cursors (MQTT, upstream, alarms): the last seq each consumer has finished.
///
/// Uses its own small read-write connection, never the append queue, and touches only
/// the `cursors` table, which is outside the hash chain. Blocking: from async code use
/// `spawn_blocking`.
#[derive(Debug)]
pub struct Cursors {
    pub(super) conn: Connection,
}

impl Cursors {
    /// Opens the cursor table of an initialised store.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Ok(Cursors {
            conn: schema::open_side(path.as_ref())?,
        })
    }

    /// The stored position of `name`, `None` if it never set one.
    pub fn get_cursor(&self, name: &str) -> Result<Option<u64>, StoreError> {
        use rusqlite::OptionalExtension;
        let seq: Option<i64> = self
            .conn
            .query_row("SELECT seq FROM cursors WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(StoreError::sqlite("read a cursor"))?;
        Ok(seq.map(|s| s as u64))
    }

    /// Stores the position of `name`. Moving backwards (replay) is allowed; moving past
    /// the last committed seq is refused with [`StoreError::CursorAhead`], because that
    /// would silently skip records appended later.
    pub fn set_cursor(&self, name: &str, seq: u64) -> Result<(), StoreError> {
        let changed = self
            .conn
            .execute(
                "INSERT INTO cursors (name, seq, updated_at) \
                 SELECT ?1, ?2, ?3 WHERE ?2 <= (SELECT last_seq FROM meta WHERE id = 1) \
                 ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
                (
                    name,
                    i64::try_from(seq).unwrap_or(i64::MAX),
                    chrono::Utc::now().timestamp_millis(),
                ),
            )
            .map_err(StoreError::sqlite("write a cursor"))?;
        if changed == 0 {
            let head: i64 = self
                .conn
                .query_row("SELECT last_seq FROM meta WHERE id = 1", [], |r| r.get(0))
                .map_err(StoreError::sqlite("read the chain head"))?;
            return Err(StoreError::CursorAhead {
                name: name.to_owned(),
                seq,
                head: head as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewRecord, Store, StoreConfig, SyncMode};

    /// A row as an earlier release's writer left it (the hash is not checked here).
    fn insert_old(
        conn: &Connection,
        seq: i64,
        peer: &str,
        direction: &str,
        mn: &str,
        dialect: &str,
    ) {
        conn.execute(
            "INSERT INTO records (seq, received_at_ms, peer, session, direction, kind, raw, \
             dialect, mn, verdict, duplicate, findings, doc, hash) \
             VALUES (?1, 0, ?2, 1, ?3, 'frame', x'2323', ?4, ?5, 'accepted', 0, '[]', '{}', zeroblob(32))",
            (seq, peer, direction, dialect, mn),
        )
        .unwrap();
    }

    fn plan(conn: &Connection, sql: &str) -> Vec<String> {
        conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(["M"], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn a_previous_log_gains_the_dialect_table_and_the_lookup_is_one_seek() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sqlite");
        let previous = schema::device_dialects_version() - 1;
        {
            let conn = schema::file_at_version(&path, previous);
            insert_old(&conn, 1, "10.0.0.1:1", "in", "A", "2005");
            insert_old(&conn, 2, "10.0.0.1:2", "in", "A", "2017");
            // A platform's request about A (peer = its name) and our reply to A.
            insert_old(&conn, 3, "prov", "in", "A", "2025");
            insert_old(&conn, 4, "10.0.0.1:2", "out", "A", "2025");
            insert_old(&conn, 5, "10.0.0.9:1", "in", "B", "2025");
            insert_old(&conn, 6, "prov", "in", "C", "2017");
        }
        let conn = schema::open_writer(&path, SyncMode::Off).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::latest_version());
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.last_device_dialect("A").unwrap().as_deref(), Some("2017"));
        assert_eq!(r.last_device_dialect("B").unwrap().as_deref(), Some("2025"));
        assert_eq!(
            r.last_device_dialect("C").unwrap(),
            None,
            "never from a device"
        );
        assert_eq!(r.last_device_dialect("nobody").unwrap(), None);
        // One primary-key seek: no scan of `records`, whatever the MN.
        let p = plan(&conn, LAST_DIALECT_SQL);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("SEARCH device_dialects USING PRIMARY KEY (mn=?)"),
            "{p:?}"
        );
        // What the lookup was before: a scan of the log for an MN it never saw.
        let old = "SELECT dialect FROM records WHERE mn = ?1 AND direction = 'in' \
                   AND kind = 'frame' AND dialect IS NOT NULL AND instr(peer, ':') > 0 \
                   ORDER BY seq DESC LIMIT 1";
        assert!(plan(&conn, old)[0].starts_with("SCAN records"));
    }

    fn device_frame(peer: &str, mn: &str, dialect: &str) -> NewRecord {
        NewRecord {
            received_at_ms: 1,
            peer: peer.into(),
            session: 1,
            direction: crate::store::Direction::In,
            kind: crate::store::Kind::Frame,
            raw: bytes::Bytes::from_static(b"##0000"),
            dialect: Some(dialect.into()),
            st: Some("32".into()),
            cn: Some("2011".into()),
            mn: Some(mn.into()),
            qn: None,
            data_time: None,
            verdict: crate::store::Verdict::Accepted,
            findings: "[]".into(),
            doc: "{}".into(),
            doc_stored: true,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_keep_the_dialect_table_current_and_the_chain_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sqlite");
        let (h, join) = Store::open(StoreConfig {
            sync: SyncMode::Off,
            ..StoreConfig::new(&path)
        })
        .unwrap();
        h.append_many(vec![
            device_frame("10.0.0.1:1", "A", "2005"),
            device_frame("10.0.0.1:1", "A", "2005"),
            device_frame("10.0.0.1:1", "A", "2017"),
            device_frame("prov", "A", "2025"),
            device_frame("prov", "Z", "2017"),
        ])
        .await
        .unwrap();
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.last_device_dialect("A").unwrap().as_deref(), Some("2017"));
        assert_eq!(r.last_device_dialect("Z").unwrap(), None);
        // Later batches: a device back on a dialect the writer wrote before, one
        // that keeps its dialect, and a new one.
        h.append(device_frame("10.0.0.1:1", "A", "2005"))
            .await
            .unwrap();
        assert_eq!(r.last_device_dialect("A").unwrap().as_deref(), Some("2005"));
        h.append_many(vec![
            device_frame("10.0.0.1:1", "A", "2005"),
            device_frame("10.0.0.2:1", "B", "2025"),
            device_frame("prov", "B", "2017"),
        ])
        .await
        .unwrap();
        assert_eq!(r.last_device_dialect("A").unwrap().as_deref(), Some("2005"));
        assert_eq!(r.last_device_dialect("B").unwrap().as_deref(), Some("2025"));
        drop(h);
        tokio::task::spawn_blocking(move || join.join().unwrap())
            .await
            .unwrap();
        assert!(crate::store::verify_chain(&path).unwrap().is_intact());
    }
}
