//! Read-side queries for auditors and operators: a lean scan of inbound frames (for
//! `verify`'s CRC re-check) and per-device aggregates (for `stats`).
//!
//! Both run on a read-only connection inside one read transaction, so they see one
//! consistent snapshot while the writer keeps appending. Aggregation happens in
//! SQLite; only one row per device (or per device and key) reaches Rust, so memory
//! does not grow with the log.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

use super::archive::{self, ArchiveCache, ArchiveError, ArchiveState};
use super::schema::{self, DATA_TIME_MS};
use super::{StoreError, Verdict};

/// One stored inbound frame, as [`scan_inbound_frames`] hands it out (borrowed from
/// the current row: nothing is copied).
#[derive(Debug)]
pub struct InboundFrame<'a> {
    /// Position in the log.
    pub seq: u64,
    /// Reception time, UTC unix ms.
    pub received_at_ms: i64,
    /// The stored verdict.
    pub verdict: Verdict,
    /// The exact wire bytes.
    pub raw: &'a [u8],
    /// The stored findings (JSON array text).
    pub findings: &'a str,
}

/// Calls `f` for every inbound frame (`direction = 'in'`, `kind = 'frame'`) in seq
/// order, streaming rows from one statement, until `f` breaks. Returns the number of
/// frames visited. Only the columns needed to re-judge a frame are read.
pub fn scan_inbound_frames(
    path: impl AsRef<Path>,
    mut f: impl FnMut(InboundFrame<'_>) -> ControlFlow<()>,
) -> Result<u64, StoreError> {
    let mut conn = schema::open_read_only(path.as_ref())?;
    let tx = conn
        .transaction()
        .map_err(StoreError::sqlite("begin the scan snapshot"))?;
    let mut n = 0;
    // Archived frames first, in seq order. A missing or unreadable archive is the
    // chain walk's finding (`verify_chain`), not a reason to stop this scan.
    let list = archive::list(&tx)?;
    let dir = archive::archive_dir(path.as_ref());
    let mut cache = ArchiveCache::default();
    for a in list.iter().filter(|a| a.state == ArchiveState::Sealed) {
        let flow = cache.scan(&dir, a, a.first_seq - 1, a.last_seq, |block, i| {
            let (received_at_ms, inbound, verdict, raw, findings) = block.inbound_view(i)?;
            if !inbound {
                return Ok(ControlFlow::Continue(()));
            }
            n += 1;
            Ok(f(InboundFrame {
                seq: block.seq(i) as u64,
                received_at_ms,
                verdict,
                raw,
                findings,
            }))
        });
        match flow {
            Ok(ControlFlow::Break(())) => return Ok(n),
            Ok(ControlFlow::Continue(())) => {}
            Err(StoreError::Archive(
                ArchiveError::Missing { .. } | ArchiveError::Corrupt { .. },
            )) => {}
            Err(e) => return Err(e),
        }
    }
    let mut stmt = tx
        .prepare(
            "SELECT seq, received_at_ms, verdict, raw, findings FROM records \
             WHERE direction = 'in' AND kind = 'frame' AND seq > ?1 ORDER BY seq",
        )
        .map_err(StoreError::sqlite("prepare the frame scan"))?;
    let mut rows = stmt
        .query([archive::archived_upto(&list) as i64])
        .map_err(StoreError::sqlite("scan inbound frames"))?;
    while let Some(row) = rows
        .next()
        .map_err(StoreError::sqlite("scan inbound frames"))?
    {
        let seq = row
            .get::<_, i64>(0)
            .map_err(StoreError::sqlite("decode a record"))? as u64;
        let corrupt =
            |column: &'static str, value: String| StoreError::CorruptRow { seq, column, value };
        let verdict_text = row
            .get_ref(2)
            .and_then(|v| v.as_str().map_err(Into::into))
            .map_err(StoreError::sqlite("decode a record"))?;
        let verdict = Verdict::parse(verdict_text)
            .ok_or_else(|| corrupt("verdict", verdict_text.to_owned()))?;
        let raw = row
            .get_ref(3)
            .and_then(|v| v.as_blob().map_err(Into::into))
            .map_err(StoreError::sqlite("decode a record"))?;
        let findings = row
            .get_ref(4)
            .and_then(|v| v.as_str().map_err(Into::into))
            .map_err(StoreError::sqlite("decode a record"))?;
        n += 1;
        let frame = InboundFrame {
            seq,
            received_at_ms: row.get(1).map_err(StoreError::sqlite("decode a record"))?,
            verdict,
            raw,
            findings,
        };
        if f(frame).is_break() {
            break;
        }
    }
    Ok(n)
}

/// Per-device aggregates of the inbound frames in the log (see [`device_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceStats {
    /// The device's MN.
    pub mn: String,
    /// Reception time of its latest frame, UTC unix ms.
    pub last_seen_ms: i64,
    /// Inbound frames, any verdict.
    pub frames_total: u64,
    /// Inbound frames received at or after the `since_ms` given to [`device_stats`].
    pub frames_since: u64,
    /// Frames with verdict `accepted`.
    pub accepted: u64,
    /// Frames with verdict `rejected`.
    pub rejected: u64,
    /// Rejected frames by error finding code (a frame with two error findings counts
    /// under both), most frequent first.
    pub rejects_by_reason: Vec<(String, u64)>,
    /// Frames by dialect (`"?"` when undetermined), most frequent first.
    pub dialects: Vec<(String, u64)>,
    /// Frames by CRC variant (`hj212`, `modbus`, `modbus-swapped`, `unknown`), most
    /// frequent first; frames without a declared CRC are not counted.
    pub crc_variants: Vec<(String, u64)>,
    /// The CRC variant (`modbus`, `modbus-swapped`) of the device's latest frame when
    /// that frame was rejected for its CRC (`crc.mismatch` error) and its CRC is
    /// that known variant: a device that gets no acks until its `crc` policy
    /// accepts the variant. `None` once its latest frame is no such rejection.
    pub crc_rejected_variant: Option<String>,
    /// Median of `received_at - DataTime` over CN 2011 frames with a DataTime, in ms
    /// (positive: the data arrived after its timestamp). For an even count, the lower
    /// of the two middle values.
    pub median_skew_ms: Option<i64>,
    /// Per CN: the latest DataTime (as stored) of an accepted frame.
    pub last_data_time: Vec<(String, String)>,
}

/// SQL `crc_variant(raw)`: the `crc.variant` of the document of a frame the log
/// keeps without one (`protocol::frame::crc_variant`), NULL when it declares no CRC.
fn register_crc_variant(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    use rusqlite::functions::FunctionFlags;
    conn.create_scalar_function(
        "crc_variant",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let raw = ctx.get_raw(0).as_bytes_or_null()?.unwrap_or_default();
            Ok(crate::protocol::frame::crc_variant(raw).map(|v| v.as_str()))
        },
    )
    .map_err(StoreError::sqlite("register crc_variant()"))
}

/// Aggregates the inbound frames of every device that sent an MN, ordered by MN.
///
/// `since_ms` is the lower bound for [`DeviceStats::frames_since`] (e.g. local
/// midnight for "today"). Every figure is computed by SQLite in a few scans of one
/// snapshot; the median is taken from one sorted scan.
pub fn device_stats(path: impl AsRef<Path>, since_ms: i64) -> Result<Vec<DeviceStats>, StoreError> {
    let mut conn = schema::open_read_only(path.as_ref())?;
    register_crc_variant(&conn)?;
    let tx = conn
        .transaction()
        .map_err(StoreError::sqlite("begin the stats snapshot"))?;
    const INBOUND: &str = "direction = 'in' AND kind = 'frame' AND mn IS NOT NULL";
    let sq = StoreError::sqlite;
    let records = stats_source(&tx, path.as_ref())?;
    let mut by_mn: BTreeMap<String, DeviceStats> = BTreeMap::new();
    {
        let mut stmt = tx
            .prepare(&format!(
                "SELECT mn, MAX(received_at_ms), COUNT(*), SUM(received_at_ms >= ?1), \
                 SUM(verdict = 'accepted'), SUM(verdict = 'rejected') \
                 FROM {records} WHERE {INBOUND} GROUP BY mn"
            ))
            .map_err(sq("prepare the device totals"))?;
        let mut rows = stmt.query([since_ms]).map_err(sq("count frames"))?;
        while let Some(r) = rows.next().map_err(sq("count frames"))? {
            let mn: String = r.get(0).map_err(sq("decode device totals"))?;
            let n = |i| r.get::<_, i64>(i).map(|v| v as u64);
            let s = DeviceStats {
                mn: mn.clone(),
                last_seen_ms: r.get(1).map_err(sq("decode device totals"))?,
                frames_total: n(2).map_err(sq("decode device totals"))?,
                frames_since: n(3).map_err(sq("decode device totals"))?,
                accepted: n(4).map_err(sq("decode device totals"))?,
                rejected: n(5).map_err(sq("decode device totals"))?,
                ..DeviceStats::default()
            };
            by_mn.insert(mn, s);
        }
    }
    // (mn, key, count) breakdowns, most frequent first.
    let mut breakdown = |sql: String,
                         op: &'static str,
                         put: fn(&mut DeviceStats, String, u64)|
     -> Result<(), StoreError> {
        let mut stmt = tx.prepare(&sql).map_err(sq(op))?;
        let mut rows = stmt.query([]).map_err(sq(op))?;
        while let Some(r) = rows.next().map_err(sq(op))? {
            let mn: String = r.get(0).map_err(sq(op))?;
            let key: String = r.get(1).map_err(sq(op))?;
            let count: i64 = r.get(2).map_err(sq(op))?;
            if let Some(s) = by_mn.get_mut(&mn) {
                put(s, key, count as u64);
            }
        }
        Ok(())
    };
    // A findings text that is not JSON can only come from an altered file; it counts
    // under "findings.invalid" instead of failing the whole query.
    breakdown(
        format!(
            "SELECT r.mn, CASE WHEN json_valid(r.findings) \
                THEN COALESCE(json_extract(f.value, '$.code'), '?') ELSE 'findings.invalid' END, \
             COUNT(*) FROM {records} r, \
             json_each(CASE WHEN json_valid(r.findings) THEN r.findings ELSE '[{{}}]' END) f \
             WHERE r.{} AND r.verdict = 'rejected' \
             AND (NOT json_valid(r.findings) OR json_extract(f.value, '$.severity') = 'error') \
             GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2",
            INBOUND.replace(" AND ", " AND r.")
        ),
        "count rejects by reason",
        |s, k, n| s.rejects_by_reason.push((k, n)),
    )?;
    breakdown(
        format!(
            "SELECT mn, COALESCE(dialect, '?'), COUNT(*) FROM {records} WHERE {INBOUND} \
             GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"
        ),
        "count dialects",
        |s, k, n| s.dialects.push((k, n)),
    )?;
    breakdown(
        format!(
            "SELECT mn, v, COUNT(*) FROM (SELECT mn, CASE WHEN doc = '' THEN crc_variant(raw) \
                WHEN json_valid(doc) THEN json_extract(doc, '$.crc.variant') END AS v \
                FROM {records} WHERE {INBOUND}) \
             WHERE v IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"
        ),
        "count CRC variants",
        |s, k, n| s.crc_variants.push((k, n)),
    )?;
    // The latest frame, not a count: after the operator sets the policy the next
    // accepted frame ends the hint, however many rejections came before.
    breakdown(
        format!(
            "SELECT r.mn, json_extract(r.doc, '$.crc.variant'), 1 FROM {records} r \
             JOIN (SELECT mn, MAX(seq) AS seq FROM {records} WHERE {INBOUND} GROUP BY mn) l \
               ON r.seq = l.seq \
             WHERE r.verdict = 'rejected' AND json_valid(r.doc) AND json_valid(r.findings) \
             AND json_extract(r.doc, '$.crc.variant') IN ('modbus', 'modbus-swapped') \
             AND EXISTS (SELECT 1 FROM json_each(r.findings) f \
                 WHERE json_extract(f.value, '$.code') = 'crc.mismatch' \
                 AND json_extract(f.value, '$.severity') = 'error')"
        ),
        "find CRC-variant rejections",
        |s, k, _| s.crc_rejected_variant = Some(k),
    )?;
    {
        // SQLite returns the bare column `data_time` from the row holding the MAX.
        let op = "find the last DataTime per CN";
        let mut stmt = tx
            .prepare(&format!(
                "SELECT mn, cn, data_time, MAX({DATA_TIME_MS}) FROM {records} \
                 WHERE {INBOUND} AND verdict = 'accepted' AND cn IS NOT NULL \
                 AND {DATA_TIME_MS} IS NOT NULL GROUP BY mn, cn ORDER BY mn, cn"
            ))
            .map_err(sq(op))?;
        let mut rows = stmt.query([]).map_err(sq(op))?;
        while let Some(r) = rows.next().map_err(sq(op))? {
            let mn: String = r.get(0).map_err(sq(op))?;
            if let Some(s) = by_mn.get_mut(&mn) {
                s.last_data_time
                    .push((r.get(1).map_err(sq(op))?, r.get(2).map_err(sq(op))?));
            }
        }
    }
    {
        // Median: per MN count first, then one sorted scan picks the middle element.
        let op = "compute the clock skew";
        let skew = format!("received_at_ms - {DATA_TIME_MS}");
        let filter = format!("{INBOUND} AND cn = '2011' AND {DATA_TIME_MS} IS NOT NULL");
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT mn, COUNT(*) FROM {records} WHERE {filter} GROUP BY mn"
                ))
                .map_err(sq(op))?;
            let mut rows = stmt.query([]).map_err(sq(op))?;
            while let Some(r) = rows.next().map_err(sq(op))? {
                counts.insert(
                    r.get(0).map_err(sq(op))?,
                    r.get::<_, i64>(1).map_err(sq(op))? as u64,
                );
            }
        }
        let mut stmt = tx
            .prepare(&format!(
                "SELECT mn, {skew} AS s FROM {records} WHERE {filter} ORDER BY mn, s"
            ))
            .map_err(sq(op))?;
        let mut rows = stmt.query([]).map_err(sq(op))?;
        let (mut current, mut index) = (String::new(), 0u64);
        while let Some(r) = rows.next().map_err(sq(op))? {
            let mn = r.get_ref(0).and_then(|v| v.as_str().map_err(Into::into));
            let mn = mn.map_err(sq(op))?;
            if mn != current {
                current = mn.to_owned();
                index = 0;
            }
            let n = counts.get(&current).copied().unwrap_or(0);
            if n > 0 && index == (n - 1) / 2 {
                if let Some(s) = by_mn.get_mut(&current) {
                    s.median_skew_ms = Some(r.get(1).map_err(sq(op))?);
                }
            }
            index += 1;
        }
    }
    Ok(by_mn.into_values().collect())
}

/// The relation `device_stats` aggregates: `records` itself, or, when the log has
/// sealed archives, a temporary view over the archived inbound frames (copied into
/// a temporary table, on disk: SQLite cannot aggregate compressed blocks) and the
/// live records after them. Temporary objects live in this connection's own temp
/// database, so the read-only log is not touched.
fn stats_source(tx: &rusqlite::Transaction<'_>, path: &Path) -> Result<&'static str, StoreError> {
    let list = archive::list(tx)?;
    if list.is_empty() {
        return Ok("records");
    }
    let sq = StoreError::sqlite;
    // As in the live log: the `doc` column as stored, and `raw` only where it is
    // empty (the queries read the CRC variant of such a frame off its bytes).
    const COLS: &str = "seq, received_at_ms, direction, kind, dialect, st, cn, mn, data_time, \
                        verdict, findings, doc, raw";
    tx.execute_batch(&format!(
        "PRAGMA temp_store = FILE;
         DROP VIEW IF EXISTS temp.stats_records;
         DROP TABLE IF EXISTS temp.archived_frames;
         CREATE TEMP TABLE archived_frames (seq INTEGER PRIMARY KEY, received_at_ms INTEGER, \
             direction TEXT, kind TEXT, dialect TEXT, st TEXT, cn TEXT, mn TEXT, data_time TEXT, \
             verdict TEXT, findings TEXT, doc TEXT, raw BLOB);
         CREATE TEMP VIEW stats_records AS
             SELECT {COLS} FROM temp.archived_frames
             UNION ALL SELECT {COLS} FROM main.records WHERE seq > {};",
        archive::archived_upto(&list)
    ))
    .map_err(sq("prepare the archived frames"))?;
    let dir = archive::archive_dir(path);
    let mut cache = ArchiveCache::default();
    let mut ins = tx
        .prepare(&format!(
            "INSERT INTO temp.archived_frames ({COLS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
        ))
        .map_err(sq("prepare the archived frames"))?;
    for a in list.iter().filter(|a| a.state == ArchiveState::Sealed) {
        // The closure never breaks: the whole archive is copied.
        let _ = cache.scan(&dir, a, a.first_seq - 1, a.last_seq, |block, i| {
            let r = block.record(i)?;
            if r.direction == super::Direction::In && r.kind == super::Kind::Frame && r.mn.is_some()
            {
                ins.execute(rusqlite::params![
                    r.seq as i64,
                    r.received_at_ms,
                    r.direction.as_str(),
                    r.kind.as_str(),
                    r.dialect,
                    r.st,
                    r.cn,
                    r.mn,
                    r.data_time,
                    r.verdict.as_str(),
                    r.findings,
                    r.stored_doc(),
                    r.stored_doc().is_empty().then_some(&r.raw)
                ])
                .map_err(sq("copy an archived frame"))?;
            }
            Ok(ControlFlow::Continue(()))
        })?;
    }
    Ok("stats_records")
}
