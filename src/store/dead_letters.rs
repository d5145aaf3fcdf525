//! Dead letters: records a consumer set aside, and the crash-loop guard of its cursor.
//!
//! # Why
//!
//! A consumer of the log (MQTT publisher, upstream forwarder, alarm detector) moves
//! its cursor only past what it has finished. A record it can never finish (a
//! payload over the broker's packet limit, a topic the broker refuses, a frame a
//! platform never acks, a record that crashes the process) would otherwise hold the
//! cursor for good, and with it every later record of every device. Such a record is
//! written here with the reason and the cursor moves on, in the same transaction
//! ([`Cursors::save`]), so a crash can neither lose the entry nor skip the record
//! without one.
//!
//! An operator lists the entries (`hj212-gateway dead-letters`) and may mark them
//! for re-drive; the consumer then tries them once more and marks them `resolved`
//! (or `dead` again, with one more attempt and the new reason).
//!
//! # The crash-loop guard
//!
//! A record that aborts the process (an allocation failure, a stack overflow) cannot
//! be caught where it happens. Each consumer's [`Follower`](super::Follower) calls
//! [`Cursors::begin_start`] when it starts and [`Cursors::clean_stop`] when it
//! stops cleanly. The cursor row counts
//! starts that were not followed by a clean stop while the cursor stayed where it
//! was. From a named number of such starts on (`[store] crash_loop_starts`), the
//! consumer works in *careful mode* for a bounded stretch: before it hands a record
//! to code that could abort, it writes the record's seq into the row
//! ([`Cursors::set_probe`], a commit without fsync: it survives a process crash,
//! which is all it is for). If it dies there, the next start finds that seq, sets
//! the record aside with reason `crash` and says so in the log. Outside careful mode
//! the hot path writes nothing per record.
//!
//! Entries are never deleted by the gateway: they are the audit of what did not go
//! out. They are outside the hash chain (like cursors and alarms).

use std::path::Path;

use rusqlite::{OptionalExtension, params};

use super::reader::Cursors;
use super::{StoreError, schema};
use crate::metrics::Metrics;

pub use crate::vocab::DEAD_LETTER_REASONS as REASONS;

/// States of an entry: `dead` (set aside), `redrive` (an operator asked for
/// another try), `resolved` (the re-drive went through).
pub const STATES: [&str; 3] = ["dead", "redrive", "resolved"];

/// One record set aside by a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The consumer: its cursor name (`mqtt`, `upstream.<name>`, `alarms`), or
    /// `mqtt.merge` / `mqtt.alarms` for the publisher's merged groups (seq = the
    /// group's first packet) and alarm events (seq = the event id).
    pub consumer: String,
    /// The record's seq (or event id, see `consumer`).
    pub seq: u64,
    /// One of [`REASONS`].
    pub reason: &'static str,
    /// Words for the operator: the limit, the broker's error, the topic.
    pub detail: String,
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRow {
    /// Row id (what `dead-letters redrive --id` takes).
    pub id: i64,
    /// Consumer (see [`DeadLetter::consumer`]).
    pub consumer: String,
    /// The record's seq (or event id).
    pub seq: u64,
    /// The last reason.
    pub reason: String,
    /// The last detail.
    pub detail: String,
    /// How many times it was set aside (a failed re-drive adds one).
    pub attempts: u32,
    /// First time it was set aside (UTC unix ms).
    pub first_ms: i64,
    /// Last time (UTC unix ms).
    pub last_ms: i64,
    /// One of [`STATES`].
    pub state: String,
}

impl DeadLetterRow {
    /// The `hj212.dead_letter.v1` JSON document (see README "Dead letters").
    pub fn to_json(&self) -> serde_json::Value {
        let t = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default()
        };
        serde_json::json!({
            "schema": "hj212.dead_letter.v1",
            "id": self.id,
            "consumer": self.consumer,
            "seq": self.seq,
            "reason": self.reason,
            "detail": self.detail,
            "attempts": self.attempts,
            "first_at": t(self.first_ms),
            "last_at": t(self.last_ms),
            "state": self.state,
        })
    }
}

/// What [`Cursors::begin_start`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartCheck {
    /// Consecutive starts at this cursor without a clean stop, this one included
    /// (1: the previous run stopped cleanly, or the cursor moved since).
    pub starts: u32,
    /// The record the previous run was working on in careful mode when it died.
    pub died_on: Option<u64>,
}

const UPSERT_SQL: &str = "INSERT INTO dead_letters \
     (consumer, seq, reason, detail, attempts, first_ms, last_ms, state) \
     VALUES (?1, ?2, ?3, ?4, 1, ?5, ?5, 'dead') \
     ON CONFLICT (consumer, seq) DO UPDATE SET reason = excluded.reason, \
     detail = excluded.detail, attempts = dead_letters.attempts + 1, \
     last_ms = excluded.last_ms, state = 'dead'";

const SET_CURSOR_SQL: &str = "INSERT INTO cursors (name, seq, updated_at) \
     SELECT ?1, ?2, ?3 WHERE ?2 <= (SELECT last_seq FROM meta WHERE id = 1) \
     ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at";

/// An alarm-event cursor counts `alarm_events.id`: never past the last event.
pub(crate) const SET_EVENT_CURSOR_SQL: &str = "INSERT INTO event_cursors (name, event_id, updated_at) \
     SELECT ?1, ?2, ?3 WHERE ?2 <= (SELECT COALESCE(MAX(id), 0) FROM alarm_events) \
     ON CONFLICT (name) DO UPDATE SET event_id = excluded.event_id, updated_at = excluded.updated_at";

/// A transaction that writes, holding the write lock from `BEGIN` on.
///
/// A deferred transaction that reads before it writes holds a read snapshot when it
/// asks for the write lock; SQLite then returns `SQLITE_BUSY` at once if another
/// connection writes (the busy timeout is not applied, as waiting could deadlock,
/// and a snapshot older than that writer's commit could not write anyway). At
/// start-up every consumer records its start while the others do the same and the
/// store writer appends frames, so that happened within milliseconds and the
/// consumer gave up for good. `BEGIN IMMEDIATE` waits for the lock under the busy
/// timeout instead.
fn write_tx(conn: &rusqlite::Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Longest stretch after the cursor read in careful mode (one record at a time,
/// each marked first): how far from the cursor a crash can be pinned to its record.
pub const CAREFUL_SPAN: u64 = 1 << 20;

/// Longest detail kept: the broker's or platform's words, never a payload.
const DETAIL_MAX: usize = 512;

fn clip(s: &str) -> &str {
    if s.len() <= DETAIL_MAX {
        return s;
    }
    let mut end = DETAIL_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Cursors {
    /// Writes `cursors` (name, seq), `dead` letters and the entries whose re-drive
    /// went through (`resolved` ids) in one transaction: the cursor never passes a
    /// set-aside record without its entry. A cursor ahead of the log's head is not
    /// written (as [`Cursors::set_cursor`] refuses it).
    pub fn save(
        &self,
        cursors: &[(&str, u64)],
        dead: &[DeadLetter],
        resolved: &[i64],
    ) -> Result<(), StoreError> {
        self.save_with_events(cursors, &[], dead, resolved)
    }

    /// [`save`](Self::save) with alarm-event cursors (`event_cursors`: name, event
    /// id) in the same transaction. An event cursor past the last alarm event is
    /// not written.
    pub fn save_with_events(
        &self,
        cursors: &[(&str, u64)],
        events: &[(&str, u64)],
        dead: &[DeadLetter],
        resolved: &[i64],
    ) -> Result<(), StoreError> {
        let op = "write cursors and dead letters";
        let tx = write_tx(&self.conn).map_err(StoreError::sqlite(op))?;
        let now = chrono::Utc::now().timestamp_millis();
        for d in dead {
            tx.prepare_cached(UPSERT_SQL)
                .and_then(|mut st| {
                    st.execute(params![
                        d.consumer,
                        to_i64(d.seq),
                        d.reason,
                        clip(&d.detail),
                        now
                    ])
                })
                .map_err(StoreError::sqlite(op))?;
        }
        for id in resolved {
            tx.prepare_cached(
                "UPDATE dead_letters SET state = 'resolved', last_ms = ?2 \
                 WHERE id = ?1 AND state = 'redrive'",
            )
            .and_then(|mut st| st.execute(params![id, now]))
            .map_err(StoreError::sqlite(op))?;
        }
        for (name, seq) in cursors {
            tx.prepare_cached(SET_CURSOR_SQL)
                .and_then(|mut st| st.execute(params![name, to_i64(*seq), now]))
                .map_err(StoreError::sqlite(op))?;
        }
        for (name, id) in events {
            tx.prepare_cached(SET_EVENT_CURSOR_SQL)
                .and_then(|mut st| st.execute(params![name, to_i64(*id), now]))
                .map_err(StoreError::sqlite(op))?;
        }
        tx.commit().map_err(StoreError::sqlite(op))
    }

    /// Seqs above `after` that `consumer` has set aside and not been asked to
    /// re-drive, ascending, at most `limit` (a consumer re-reading the log after a
    /// restart skips them).
    pub fn dead_seqs(
        &self,
        consumer: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let op = "read dead letters";
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT seq FROM dead_letters WHERE consumer = ?1 AND seq > ?2 \
                 AND state = 'dead' ORDER BY seq LIMIT ?3",
            )
            .map_err(StoreError::sqlite(op))?;
        let rows = st
            .query_map(
                params![consumer, to_i64(after), to_i64(limit as u64)],
                |r| r.get::<_, i64>(0),
            )
            .map_err(StoreError::sqlite(op))?;
        rows.map(|r| r.map(|v| v as u64))
            .collect::<Result<_, _>>()
            .map_err(StoreError::sqlite(op))
    }

    /// Entries of `consumer` an operator marked for re-drive (at most `limit`, oldest first).
    pub fn redrives(&self, consumer: &str, limit: usize) -> Result<Vec<DeadLetterRow>, StoreError> {
        query_rows(
            &self.conn,
            "WHERE consumer = ?1 AND state = 'redrive' ORDER BY id LIMIT ?2",
            params![consumer, to_i64(limit as u64)],
        )
    }

    /// Starts consumer `name` at `cursor` (where it begins re-reading): counts the
    /// start and returns what the guard needs (see the module documentation).
    pub fn begin_start(&self, name: &str, cursor: u64) -> Result<StartCheck, StoreError> {
        let op = "record a consumer start";
        // Reads the row, then writes it: see `write_tx` for why the write lock is
        // taken up front.
        let tx = write_tx(&self.conn).map_err(StoreError::sqlite(op))?;
        let row: Option<(Option<i64>, i64, Option<i64>)> = tx
            .query_row(
                "SELECT start_seq, starts, probe_seq FROM cursors WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(StoreError::sqlite(op))?;
        let now = chrono::Utc::now().timestamp_millis();
        let (starts, died_on) = match row {
            Some((start_seq, starts, probe)) => {
                let starts = if starts > 0 && start_seq == Some(to_i64(cursor)) {
                    starts + 1
                } else {
                    1
                };
                tx.execute(
                    "UPDATE cursors SET start_seq = ?2, starts = ?3, probe_seq = NULL WHERE name = ?1",
                    params![name, to_i64(cursor), starts],
                )
                .map_err(StoreError::sqlite(op))?;
                (starts, probe.map(|p| p as u64))
            }
            None => {
                tx.execute(
                    "INSERT INTO cursors (name, seq, updated_at, start_seq, starts) \
                     SELECT ?1, ?2, ?3, ?2, 1 WHERE ?2 <= (SELECT last_seq FROM meta WHERE id = 1)",
                    params![name, to_i64(cursor), now],
                )
                .map_err(StoreError::sqlite(op))?;
                (1, None)
            }
        };
        tx.commit().map_err(StoreError::sqlite(op))?;
        Ok(StartCheck {
            starts: u32::try_from(starts).unwrap_or(u32::MAX),
            died_on,
        })
    }

    /// The crash-loop guard at a consumer's start: counts the start at `cursor`; if
    /// the previous run died on a record in careful mode, sets it aside (reason
    /// `crash`), counts it in `metrics` and says so; returns the end of the stretch
    /// to read carefully (0: none). Shared by the log's consumers.
    pub fn guard_start(
        &self,
        name: &str,
        cursor: u64,
        head: u64,
        crash_loop_starts: u32,
        metrics: &Metrics,
    ) -> Result<u64, StoreError> {
        let check = self.begin_start(name, cursor)?;
        if let Some(seq) = check.died_on {
            metrics.consumer_crashes.inc();
            metrics.dead_letter(name, "crash");
            tracing::error!(
                consumer = name,
                seq,
                starts = check.starts,
                "consumer died on this record in its last run; record set aside (dead letter, reason crash)"
            );
            self.save(
                &[],
                &[DeadLetter {
                    consumer: name.to_owned(),
                    seq,
                    reason: "crash",
                    detail: format!(
                        "the process died while {name} worked on this record, after {} starts at cursor {cursor} without a clean stop",
                        check.starts.saturating_sub(1)
                    ),
                }],
                &[],
            )?;
            return Ok(0);
        }
        if check.starts >= crash_loop_starts && head > cursor {
            tracing::warn!(
                consumer = name,
                cursor,
                starts = check.starts,
                "consumer restarted at the same cursor without a clean stop; reading carefully (one record at a time, each marked) to find the record it dies on"
            );
            return Ok(head.min(cursor.saturating_add(CAREFUL_SPAN)));
        }
        Ok(0)
    }

    /// Careful mode: `seq` is about to be handed to code that could abort (`None`:
    /// careful mode is over). A commit without fsync (the side connection's
    /// `synchronous = NORMAL`): it only has to survive a process crash.
    pub fn set_probe(&self, name: &str, seq: Option<u64>) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE cursors SET probe_seq = ?2 WHERE name = ?1")
            .and_then(|mut st| st.execute(params![name, seq.map(to_i64)]))
            .map_err(StoreError::sqlite("write a consumer's probe"))?;
        Ok(())
    }

    /// The consumer stopped cleanly: its next start is not a crash loop.
    pub fn clean_stop(&self, name: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE cursors SET starts = 0, probe_seq = NULL WHERE name = ?1")
            .and_then(|mut st| st.execute([name]))
            .map_err(StoreError::sqlite("record a clean stop"))?;
        Ok(())
    }
}

/// Which entries [`list_dead_letters`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Only this consumer (exact name, e.g. `mqtt`, `upstream.cnemc`).
    pub consumer: Option<String>,
    /// Only this state (one of [`STATES`]).
    pub state: Option<String>,
}

fn query_rows(
    conn: &rusqlite::Connection,
    tail: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<DeadLetterRow>, StoreError> {
    let op = "read dead letters";
    let mut st = conn
        .prepare_cached(&format!(
            "SELECT id, consumer, seq, reason, detail, attempts, first_ms, last_ms, state \
             FROM dead_letters {tail}"
        ))
        .map_err(StoreError::sqlite(op))?;
    let rows = st
        .query_map(p, |r| {
            Ok(DeadLetterRow {
                id: r.get(0)?,
                consumer: r.get(1)?,
                seq: r.get::<_, i64>(2)? as u64,
                reason: r.get(3)?,
                detail: r.get(4)?,
                attempts: r.get::<_, i64>(5)?.try_into().unwrap_or(u32::MAX),
                first_ms: r.get(6)?,
                last_ms: r.get(7)?,
                state: r.get(8)?,
            })
        })
        .map_err(StoreError::sqlite(op))?;
    rows.collect::<Result<_, _>>()
        .map_err(StoreError::sqlite(op))
}

/// The entries of the log at `path` matching `filter`, in id order (read-only).
pub fn list_dead_letters(
    path: &Path,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetterRow>, StoreError> {
    let conn = schema::open_read_only(path)?;
    query_rows(
        &conn,
        "WHERE (?1 IS NULL OR consumer = ?1) AND (?2 IS NULL OR state = ?2) ORDER BY id",
        params![filter.consumer, filter.state],
    )
}

/// Consumers whose entries cannot be re-driven: a merged split-upload group is
/// derived from packets that were each published on their own, and the alarm
/// detector's state has moved past a record (`replay` re-runs detection over
/// history instead).
pub const NOT_REDRIVABLE: [&str; 2] = ["alarms", "mqtt.merge"];

/// Marks `dead` entries for re-drive (never those of [`NOT_REDRIVABLE`] consumers): those with the given `ids`, or (no ids) every
/// `dead` entry of `consumer`. Returns how many were marked. Works while `serve`
/// runs (its own short transaction on the side tables).
pub fn mark_redrive(path: &Path, consumer: Option<&str>, ids: &[i64]) -> Result<usize, StoreError> {
    let conn = schema::open_side(path)?;
    let op = "mark dead letters for re-drive";
    if ids.is_empty() {
        return conn
            .execute(
                "UPDATE dead_letters SET state = 'redrive' WHERE state = 'dead' \
                 AND (?1 IS NULL OR consumer = ?1) AND consumer NOT IN ('alarms', 'mqtt.merge')",
                [consumer],
            )
            .map_err(StoreError::sqlite(op));
    }
    let tx = write_tx(&conn).map_err(StoreError::sqlite(op))?;
    let mut n = 0;
    for id in ids {
        n += tx
            .execute(
                "UPDATE dead_letters SET state = 'redrive' WHERE id = ?1 AND state = 'dead' \
                 AND (?2 IS NULL OR consumer = ?2) AND consumer NOT IN ('alarms', 'mqtt.merge')",
                params![id, consumer],
            )
            .map_err(StoreError::sqlite(op))?;
    }
    tx.commit().map_err(StoreError::sqlite(op))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreConfig, SyncMode};

    async fn store_with(n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sqlite");
        let mut cfg = StoreConfig::new(&path);
        cfg.sync = SyncMode::Off;
        let (store, join) = Store::open(cfg).unwrap();
        for i in 0..n {
            store
                .append(crate::store::junk_record(vec![b'x'; i + 1]))
                .await
                .unwrap();
        }
        drop(store);
        join.join().unwrap();
        (dir, path)
    }

    #[tokio::test]
    async fn save_upserts_and_redrive_round_trip() {
        let (_d, path) = store_with(5).await;
        let c = Cursors::open(&path).unwrap();
        let dl = |seq, reason: &'static str| DeadLetter {
            consumer: "mqtt".into(),
            seq,
            reason,
            detail: "x".repeat(2000),
        };
        c.save(&[("mqtt", 3)], &[dl(2, "oversize")], &[]).unwrap();
        c.save(
            &[("mqtt", 4)],
            &[dl(2, "invalid_topic"), dl(4, "crash")],
            &[],
        )
        .unwrap();
        assert_eq!(c.get_cursor("mqtt").unwrap(), Some(4));
        let rows = list_dead_letters(&path, &DeadLetterFilter::default()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].seq, rows[0].attempts), (2, 2));
        assert_eq!(rows[0].reason, "invalid_topic");
        assert_eq!(rows[0].detail.len(), DETAIL_MAX);
        assert_eq!(c.dead_seqs("mqtt", 0, 10).unwrap(), vec![2, 4]);
        assert_eq!(mark_redrive(&path, Some("mqtt"), &[rows[0].id]).unwrap(), 1);
        assert_eq!(c.dead_seqs("mqtt", 0, 10).unwrap(), vec![4]);
        let r = c.redrives("mqtt", 10).unwrap();
        assert_eq!(r.len(), 1);
        c.save(&[], &[], &[r[0].id]).unwrap();
        assert!(c.redrives("mqtt", 10).unwrap().is_empty());
        assert_eq!(mark_redrive(&path, None, &[]).unwrap(), 1, "only dead ones");
        // A cursor past the head is not written, entries are.
        c.save(&[("mqtt", 99)], &[], &[]).unwrap();
        assert_eq!(c.get_cursor("mqtt").unwrap(), Some(4));
    }

    #[tokio::test]
    async fn a_start_waits_while_another_connection_writes() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // Set by the busy handler: the start is waiting for the write lock.
        static WAITING: AtomicBool = AtomicBool::new(false);
        static DONE: AtomicBool = AtomicBool::new(false);
        fn on_busy(_tries: i32) -> bool {
            WAITING.store(true, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            true
        }
        let (_d, path) = store_with(5).await;
        let mut c = Cursors::open(&path).unwrap();
        assert_eq!(c.begin_start("a", 2).unwrap().starts, 1);
        // Another consumer (or the store writer) is in the middle of a write; it
        // commits only once the start is seen waiting for it.
        let (locked_tx, locked) = std::sync::mpsc::channel();
        let p = path.clone();
        let writer = std::thread::spawn(move || {
            let w = schema::open_side(&p).unwrap();
            w.execute_batch("BEGIN IMMEDIATE; UPDATE cursors SET updated_at = 0 WHERE name = 'b'")
                .unwrap();
            locked_tx.send(()).unwrap();
            while !WAITING.load(Ordering::SeqCst) && !DONE.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            w.execute_batch("COMMIT").unwrap();
        });
        locked.recv().unwrap();
        c.conn.busy_handler(Some(on_busy)).unwrap();
        let r = c.begin_start("a", 2);
        DONE.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        assert_eq!(r.expect("waits for the lock, not SQLITE_BUSY").starts, 2);
    }

    #[tokio::test]
    async fn starts_count_only_unclean_starts_at_the_same_cursor() {
        let (_d, path) = store_with(5).await;
        let c = Cursors::open(&path).unwrap();
        assert_eq!(c.begin_start("a", 2).unwrap().starts, 1);
        assert_eq!(c.begin_start("a", 2).unwrap().starts, 2);
        c.set_probe("a", Some(3)).unwrap();
        let s = c.begin_start("a", 2).unwrap();
        assert_eq!((s.starts, s.died_on), (3, Some(3)));
        assert_eq!(c.begin_start("a", 2).unwrap().died_on, None, "cleared");
        assert_eq!(c.begin_start("a", 4).unwrap().starts, 1, "moved");
        c.clean_stop("a").unwrap();
        assert_eq!(c.begin_start("a", 4).unwrap().starts, 1, "clean stop");
    }
}
