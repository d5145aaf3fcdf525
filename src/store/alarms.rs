//! The alarms table: written by the anomaly detector, read by the `alarms` command and
//! the MQTT publisher. Outside the hash chain; never touches `records`.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;
use super::schema;
use crate::alarm::{AlarmEvent, AlarmKey, DetectorKind};

/// One stored alarm.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmRow {
    /// Row id (stable alarm id).
    pub id: i64,
    /// Detector name.
    pub kind: String,
    /// `warning` or `critical`.
    pub severity: String,
    /// Device.
    pub mn: String,
    /// Factor code (CN for `data.gap`), empty for device-wide alarms.
    pub factor: String,
    /// Start, UTC unix ms.
    pub start_ms: i64,
    /// End, UTC unix ms; `None` while active.
    pub end_ms: Option<i64>,
    /// Supporting seqs.
    pub seqs: Vec<u64>,
    /// The frame that cleared it.
    pub clear_seq: Option<u64>,
    /// Chinese message.
    pub message_zh: String,
    /// English message.
    pub message_en: String,
}

fn ms_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl AlarmRow {
    /// The `hj212.alarm.v1` JSON document (see README "Alarms"); `event` is `raise`,
    /// `clear`, or `None` for a listing.
    pub fn to_json(&self, event: Option<&str>) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("schema".into(), "hj212.alarm.v1".into());
        if let Some(e) = event {
            m.insert("event".into(), e.into());
        }
        m.insert("id".into(), self.id.into());
        m.insert("kind".into(), self.kind.clone().into());
        m.insert("severity".into(), self.severity.clone().into());
        m.insert("mn".into(), self.mn.clone().into());
        m.insert(
            "factor".into(),
            if self.factor.is_empty() {
                serde_json::Value::Null
            } else {
                self.factor.clone().into()
            },
        );
        m.insert("start".into(), ms_text(self.start_ms).into());
        m.insert(
            "end".into(),
            self.end_ms
                .map(ms_text)
                .map_or(serde_json::Value::Null, Into::into),
        );
        m.insert("active".into(), self.end_ms.is_none().into());
        m.insert("seqs".into(), self.seqs.clone().into());
        m.insert(
            "clear_seq".into(),
            self.clear_seq.map_or(serde_json::Value::Null, Into::into),
        );
        m.insert(
            "message".into(),
            serde_json::json!({"zh": self.message_zh, "en": self.message_en}),
        );
        serde_json::Value::Object(m)
    }
}

/// One published-order event: what MQTT sends on `{prefix}/{mn}/alarm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmEventRow {
    /// Position in `alarm_events` (the MQTT alarm cursor follows it).
    pub id: u64,
    /// Device.
    pub mn: String,
    /// JSON document.
    pub payload: String,
}

/// Which alarms [`AlarmStore::list`] returns.
#[derive(Debug, Clone, Default)]
pub struct AlarmFilter {
    /// Only active ones.
    pub active: bool,
    /// Only this MN.
    pub mn: Option<String>,
    /// Only alarms active at or after this time (UTC unix ms).
    pub since_ms: Option<i64>,
}

/// A read-write connection on the alarm tables. Blocking.
#[derive(Debug)]
pub struct AlarmStore {
    conn: Connection,
}

const COLS: &str =
    "id, kind, severity, mn, factor, start_ms, end_ms, seqs, clear_seq, message_zh, message_en";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AlarmRow> {
    let seqs: String = r.get(7)?;
    Ok(AlarmRow {
        id: r.get(0)?,
        kind: r.get(1)?,
        severity: r.get(2)?,
        mn: r.get(3)?,
        factor: r.get(4)?,
        start_ms: r.get(5)?,
        end_ms: r.get(6)?,
        seqs: serde_json::from_str(&seqs).unwrap_or_default(),
        clear_seq: r.get::<_, Option<i64>>(8)?.map(|x| x as u64),
        message_zh: r.get(9)?,
        message_en: r.get(10)?,
    })
}

impl AlarmStore {
    /// Opens the alarm tables of an initialised store (read-write).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Ok(AlarmStore {
            conn: schema::open_side(path.as_ref())?,
        })
    }

    /// Opens read-only (for listings).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Ok(AlarmStore {
            conn: schema::open_read_only(path.as_ref())?,
        })
    }

    /// The active alarms' keys.
    pub fn active_keys(&self) -> Result<Vec<AlarmKey>, StoreError> {
        let rows = self.list(&AlarmFilter {
            active: true,
            ..AlarmFilter::default()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                Some(AlarmKey {
                    kind: DetectorKind::from_name(&r.kind)?,
                    mn: r.mn,
                    factor: r.factor,
                })
            })
            .collect())
    }

    /// Alarms matching `f`, oldest first.
    pub fn list(&self, f: &AlarmFilter) -> Result<Vec<AlarmRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLS} FROM alarms WHERE (?1 = 0 OR end_ms IS NULL) \
                 AND (?2 IS NULL OR mn = ?2) AND (?3 IS NULL OR end_ms IS NULL OR end_ms >= ?3) \
                 ORDER BY start_ms, id"
            ))
            .map_err(StoreError::sqlite("prepare an alarm listing"))?;
        let rows = stmt
            .query_map(params![f.active as i64, f.mn, f.since_ms], row)
            .map_err(StoreError::sqlite("list alarms"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::sqlite("list alarms"))
    }

    /// Up to `limit` events after `after_id`, in order.
    pub fn events_after(
        &self,
        after_id: u64,
        limit: usize,
    ) -> Result<Vec<AlarmEventRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, mn, payload FROM alarm_events WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(StoreError::sqlite("prepare an alarm event read"))?;
        let rows = stmt
            .query_map(params![after_id as i64, limit as i64], |r| {
                Ok(AlarmEventRow {
                    id: r.get::<_, i64>(0)? as u64,
                    mn: r.get(1)?,
                    payload: r.get(2)?,
                })
            })
            .map_err(StoreError::sqlite("read alarm events"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::sqlite("read alarm events"))
    }

    /// The last event id (0 if none).
    pub fn last_event_id(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM alarm_events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|x| x as u64)
            .map_err(StoreError::sqlite("read the last alarm event"))
    }

    /// The position of an alarm-event consumer (`mqtt.alarms`), `None` if never set.
    /// Alarm-event cursors count `alarm_events.id`, not seqs: they have their own
    /// table, `event_cursors`.
    pub fn event_cursor(&self, name: &str) -> Result<Option<u64>, StoreError> {
        self.conn
            .query_row(
                "SELECT event_id FROM event_cursors WHERE name = ?1",
                [name],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|x| x.map(|v| v as u64))
            .map_err(StoreError::sqlite("read an alarm cursor"))
    }

    /// Stores an alarm-event consumer's position (at most the last event id).
    pub fn set_event_cursor(&self, name: &str, id: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                super::dead_letters::SET_EVENT_CURSOR_SQL,
                params![name, id as i64, chrono::Utc::now().timestamp_millis()],
            )
            .map(|_| ())
            .map_err(StoreError::sqlite("write an alarm cursor"))
    }

    /// Applies engine events and moves the cursor `cursor` to `seq`, all in one
    /// transaction: after a crash either both happened or neither did, so alarms are
    /// never lost or raised twice. A raise of an already active key and a clear of a
    /// key with no active alarm are ignored. Returns the rows written, with their event.
    pub fn apply(
        &mut self,
        events: &[AlarmEvent],
        cursor: Option<(&str, u64)>,
    ) -> Result<Vec<(AlarmRow, &'static str)>, StoreError> {
        let tx = self
            .conn
            .transaction()
            .map_err(StoreError::sqlite("begin an alarm transaction"))?;
        let mut out = Vec::new();
        for e in events {
            let id: Option<i64> = match e {
                AlarmEvent::Raise(r) => {
                    let seqs = serde_json::to_string(&r.seqs).unwrap_or_else(|_| "[]".into());
                    let n = tx
                        .execute(
                            "INSERT INTO alarms (kind, severity, mn, factor, start_ms, seqs, message_zh, message_en) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                             ON CONFLICT (kind, mn, factor) WHERE end_ms IS NULL DO NOTHING",
                            params![
                                r.key.kind.as_str(),
                                r.severity.as_str(),
                                r.key.mn,
                                r.key.factor,
                                r.start_ms,
                                seqs,
                                r.message_zh,
                                r.message_en
                            ],
                        )
                        .map_err(StoreError::sqlite("insert an alarm"))?;
                    (n == 1).then(|| tx.last_insert_rowid())
                }
                AlarmEvent::Clear { key, end_ms, seq } => tx
                    .query_row(
                        "UPDATE alarms SET end_ms = max(?4, start_ms), clear_seq = ?5 \
                         WHERE kind = ?1 AND mn = ?2 AND factor = ?3 AND end_ms IS NULL RETURNING id",
                        params![key.kind.as_str(), key.mn, key.factor, end_ms, seq.map(|s| s as i64)],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(StoreError::sqlite("clear an alarm"))?,
            };
            let Some(id) = id else { continue };
            let a = tx
                .query_row(
                    &format!("SELECT {COLS} FROM alarms WHERE id = ?1"),
                    [id],
                    row,
                )
                .map_err(StoreError::sqlite("read an alarm"))?;
            let event = if matches!(e, AlarmEvent::Raise(_)) {
                "raise"
            } else {
                "clear"
            };
            tx.execute(
                "INSERT INTO alarm_events (alarm_id, event, mn, payload) VALUES (?1, ?2, ?3, ?4)",
                params![id, event, a.mn, a.to_json(Some(event)).to_string()],
            )
            .map_err(StoreError::sqlite("insert an alarm event"))?;
            out.push((a, event));
        }
        if let Some((name, seq)) = cursor {
            tx.execute(
                "INSERT INTO cursors (name, seq, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
                params![name, seq as i64, chrono::Utc::now().timestamp_millis()],
            )
            .map_err(StoreError::sqlite("write the alarm cursor"))?;
        }
        tx.commit().map_err(StoreError::sqlite("commit alarms"))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alarm::{Raise, Severity};
    use crate::store::{Cursors, Store, StoreConfig};

    fn raise(factor: &str) -> AlarmEvent {
        AlarmEvent::Raise(Raise {
            key: AlarmKey {
                kind: DetectorKind::ValueRange,
                mn: "M1".into(),
                factor: factor.into(),
            },
            severity: Severity::Critical,
            start_ms: 1000,
            seqs: vec![0],
            message_zh: "中".into(),
            message_en: "en".into(),
        })
    }

    #[test]
    fn one_active_alarm_per_key_events_in_order_cursor_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let (h, j) = Store::open(StoreConfig::new(&path)).unwrap();
        drop(h);
        j.join().unwrap();
        let mut s = AlarmStore::open(&path).unwrap();
        let w = s
            .apply(&[raise("a"), raise("a"), raise("b")], Some(("alarms", 0)))
            .unwrap();
        assert_eq!(w.len(), 2, "a duplicate raise is ignored");
        let clear = AlarmEvent::Clear {
            key: AlarmKey {
                kind: DetectorKind::ValueRange,
                mn: "M1".into(),
                factor: "a".into(),
            },
            end_ms: 500, // before the start: clamped
            seq: Some(0),
        };
        let w = s.apply(&[clear.clone(), clear], None).unwrap();
        assert_eq!(w.len(), 1, "a second clear finds nothing active");
        assert_eq!(w[0].0.end_ms, Some(1000));
        // The same key can be raised again once cleared: a new alarm.
        assert_eq!(s.apply(&[raise("a")], None).unwrap().len(), 1);
        let ev = s.events_after(0, 10).unwrap();
        let kinds: Vec<String> = ev
            .iter()
            .map(|e| {
                let j: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
                format!(
                    "{}:{}",
                    j["event"].as_str().unwrap(),
                    j["factor"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(kinds, ["raise:a", "raise:b", "clear:a", "raise:a"]);
        assert_eq!(s.active_keys().unwrap().len(), 2);
        assert_eq!(
            Cursors::open(&path).unwrap().get_cursor("alarms").unwrap(),
            Some(0)
        );
        s.set_event_cursor("mqtt.alarms", 4).unwrap();
        assert_eq!(s.event_cursor("mqtt.alarms").unwrap(), Some(4));
        s.set_event_cursor("mqtt.alarms", 99).unwrap();
        assert_eq!(
            s.event_cursor("mqtt.alarms").unwrap(),
            Some(4),
            "not past the last event"
        );
    }
}
