//! The `downlink_exchanges` table: how each request to a device ended.
//!
//! The requests and the device's replies are records of the frame log; this
//! table adds the one thing the log cannot show by itself: the outcome the
//! engine decided (no reply after ReCount sends, refused, failed, offline...).
//! Rows are written by the store's writer, in the same transactions as
//! records, and are append-only (triggers refuse UPDATE and DELETE). Like the
//! alarms they are outside the hash chain: the chain covers what went over
//! the wire, and an exchange row names its request's `seq` so an auditor can
//! check it against the chained records.

use std::path::Path;

use rusqlite::{Connection, params};

use super::StoreError;
use super::schema;

pub use crate::vocab::ExchangeOutcome;

impl std::fmt::Display for ExchangeOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The names of [`ExchangeOutcome::ALL`], in that order.
pub const OUTCOMES: [&str; ExchangeOutcome::ALL.len()] = {
    let mut names = [""; ExchangeOutcome::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = ExchangeOutcome::ALL[i].as_str();
        i += 1;
    }
    names
};

/// One exchange to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewExchange {
    /// Device.
    pub mn: String,
    /// The request's QN; `None` when none was assigned (refused before it was built).
    pub qn: Option<String>,
    /// The request's CN.
    pub cn: u16,
    /// Who asked: `operator`, `auto:timesync`, `auto:backfill`, `auto:key` or an
    /// upstream's name (the request record's peer).
    pub origin: String,
    /// When the request was submitted or started (UTC unix ms).
    pub requested_at_ms: i64,
    /// When the outcome was decided (UTC unix ms).
    pub ended_at_ms: i64,
    /// How it ended: an [`ExchangeOutcome::as_str`].
    pub outcome: &'static str,
    /// The device's 9011 QnRtn, if one came.
    pub qn_rtn: Option<u16>,
    /// The device's 9012 ExeRtn, if one came.
    pub exe_rtn: Option<u16>,
    /// How many times the request was written (first send included).
    pub attempts: u32,
    /// Uploads matched to the exchange.
    pub uploads: u32,
    /// `seq` of the first logged request record.
    pub request_seq: Option<u64>,
    /// Words: the outcome's meaning, the refusal or failure reason.
    pub detail: String,
}

/// A stored exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeRow {
    /// Row id, in recording order.
    pub id: i64,
    /// The exchange.
    pub exchange: NewExchange,
}

pub(crate) const INSERT_SQL: &str = "INSERT INTO downlink_exchanges (mn, qn, cn, origin, \
     requested_at_ms, ended_at_ms, outcome, qn_rtn, exe_rtn, attempts, uploads, request_seq, \
     detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";

/// Inserts `e` (inside the writer's transaction).
pub(crate) fn insert(conn: &Connection, e: &NewExchange) -> rusqlite::Result<()> {
    conn.prepare_cached(INSERT_SQL)?.execute(params![
        e.mn,
        e.qn,
        e.cn,
        e.origin,
        e.requested_at_ms,
        e.ended_at_ms,
        e.outcome,
        e.qn_rtn,
        e.exe_rtn,
        e.attempts,
        e.uploads,
        e.request_seq.map(|s| s as i64),
        e.detail,
    ])?;
    Ok(())
}

fn ms_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl ExchangeRow {
    /// The `hj212.downlink_exchange.v1` JSON document (see README "Downlink").
    pub fn to_json(&self) -> serde_json::Value {
        let e = &self.exchange;
        serde_json::json!({
            "schema": "hj212.downlink_exchange.v1",
            "id": self.id,
            "mn": e.mn,
            "qn": e.qn,
            "cn": e.cn,
            "origin": e.origin,
            "requested_at": ms_text(e.requested_at_ms),
            "ended_at": ms_text(e.ended_at_ms),
            "outcome": e.outcome,
            "qn_rtn": e.qn_rtn,
            "exe_rtn": e.exe_rtn,
            "attempts": e.attempts,
            "uploads": e.uploads,
            "request_seq": e.request_seq,
            "detail": e.detail,
        })
    }
}

/// Which exchanges [`list_exchanges`] returns.
#[derive(Debug, Clone, Default)]
pub struct ExchangeFilter {
    /// Only this MN.
    pub mn: Option<String>,
    /// Only exchanges that ended at or after this time (UTC unix ms).
    pub since_ms: Option<i64>,
}

/// Exchanges matching `f`, in recording order (read-only connection).
pub fn list_exchanges(
    path: impl AsRef<Path>,
    f: &ExchangeFilter,
) -> Result<Vec<ExchangeRow>, StoreError> {
    let conn = schema::open_read_only(path.as_ref())?;
    let mut stmt = conn
        .prepare(
            "SELECT id, mn, qn, cn, origin, requested_at_ms, ended_at_ms, outcome, qn_rtn, \
             exe_rtn, attempts, uploads, request_seq, detail FROM downlink_exchanges \
             WHERE (?1 IS NULL OR mn = ?1) AND (?2 IS NULL OR ended_at_ms >= ?2) ORDER BY id",
        )
        .map_err(StoreError::sqlite("prepare the exchange listing"))?;
    let rows = stmt
        .query_map(params![f.mn, f.since_ms], |r| {
            let outcome: String = r.get(7)?;
            Ok(ExchangeRow {
                id: r.get(0)?,
                exchange: NewExchange {
                    mn: r.get(1)?,
                    qn: r.get(2)?,
                    cn: r.get(3)?,
                    origin: r.get(4)?,
                    requested_at_ms: r.get(5)?,
                    ended_at_ms: r.get(6)?,
                    // The CHECK constraint keeps this to the known names.
                    outcome: ExchangeOutcome::from_name(&outcome)
                        .unwrap_or(ExchangeOutcome::Invalid)
                        .as_str(),
                    qn_rtn: r.get(8)?,
                    exe_rtn: r.get(9)?,
                    attempts: r.get(10)?,
                    uploads: r.get(11)?,
                    request_seq: r.get::<_, Option<i64>>(12)?.map(|s| s as u64),
                    detail: r.get(13)?,
                },
            })
        })
        .map_err(StoreError::sqlite("list exchanges"))?;
    rows.collect::<Result<_, _>>()
        .map_err(StoreError::sqlite("read an exchange"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreConfig, SyncMode};

    fn row(outcome: &'static str) -> NewExchange {
        NewExchange {
            mn: "M1".into(),
            qn: Some("20240601090000001".into()),
            cn: 1011,
            origin: "operator".into(),
            requested_at_ms: 1_000,
            ended_at_ms: 2_000,
            outcome,
            qn_rtn: None,
            exe_rtn: None,
            attempts: 3,
            uploads: 0,
            request_seq: Some(7),
            detail: "no 9011 after 3 sends".into(),
        }
    }

    #[test]
    fn a_v2_store_gains_the_table_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sqlite");
        {
            // A file as the previous release left it: migrations 1 and 2 only.
            let conn = schema::file_at_version(&path, 2);
            conn.execute(
                "INSERT INTO cursors (name, seq, updated_at) VALUES ('mqtt', 0, 0)",
                [],
            )
            .unwrap();
        }
        assert!(matches!(
            list_exchanges(&path, &ExchangeFilter::default()),
            Err(StoreError::Sqlite { .. })
        ));
        let conn = schema::open_writer(&path, SyncMode::Off).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::latest_version());
        let n: i64 = conn
            .query_row("SELECT count(*) FROM cursors", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1, "earlier data kept");
        assert!(
            list_exchanges(&path, &ExchangeFilter::default())
                .unwrap()
                .is_empty()
        );
    }

    /// Every outcome passes the table's CHECK and reads back as itself.
    #[test]
    fn every_outcome_is_stored_and_read_back_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sqlite");
        let (h, join) = Store::open(StoreConfig {
            sync: SyncMode::Off,
            ..StoreConfig::new(&path)
        })
        .unwrap();
        for o in ExchangeOutcome::ALL {
            h.record_exchange(row(o.as_str())).unwrap();
        }
        drop(h);
        join.join().unwrap();
        let read: Vec<_> = list_exchanges(&path, &ExchangeFilter::default())
            .unwrap()
            .into_iter()
            .map(|r| ExchangeOutcome::from_name(r.exchange.outcome))
            .collect();
        assert_eq!(read, ExchangeOutcome::ALL.map(Some));
        assert_eq!(OUTCOMES, ExchangeOutcome::ALL.map(ExchangeOutcome::as_str));
        // Metrics index their counters by discriminant.
        for (i, o) in ExchangeOutcome::ALL.into_iter().enumerate() {
            assert_eq!(o as usize, i);
        }
    }

    /// The README's outcome table lists every outcome once, in this order.
    #[test]
    fn the_readme_table_lists_every_outcome() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("### Exchange outcomes").expect("section")..];
        let section = &section[..section[4..].find("\n#").expect("section end")];
        let rows: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .filter(|name| *name != "outcome")
            .collect();
        assert_eq!(rows, OUTCOMES);
    }

    #[test]
    fn rows_go_through_the_writer_and_are_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sqlite");
        let (h, join) = Store::open(StoreConfig {
            sync: SyncMode::Off,
            ..StoreConfig::new(&path)
        })
        .unwrap();
        h.record_exchange(row("no_reply")).unwrap();
        let mut other = row("offline");
        other.mn = "M2".into();
        other.qn = None;
        other.request_seq = None;
        other.ended_at_ms = 5_000;
        h.record_exchange(other.clone()).unwrap();
        drop(h);
        join.join().unwrap();
        let all = list_exchanges(&path, &ExchangeFilter::default()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].exchange, row("no_reply"));
        assert_eq!(all[1].exchange, other);
        let j = all[1].to_json();
        assert_eq!(j["schema"], "hj212.downlink_exchange.v1");
        assert_eq!(j["qn"], serde_json::Value::Null);
        assert_eq!(j["ended_at"], "1970-01-01T00:00:05.000Z");
        let f = ExchangeFilter {
            mn: Some("M2".into()),
            since_ms: None,
        };
        assert_eq!(list_exchanges(&path, &f).unwrap().len(), 1);
        let f = ExchangeFilter {
            mn: None,
            since_ms: Some(3_000),
        };
        assert_eq!(list_exchanges(&path, &f).unwrap()[0].exchange.mn, "M2");
        let conn = Connection::open(&path).unwrap();
        for sql in [
            "UPDATE downlink_exchanges SET outcome = 'success'",
            "DELETE FROM downlink_exchanges",
        ] {
            let e = conn.execute(sql, []).unwrap_err().to_string();
            assert!(e.contains("append-only"), "{e}");
        }
        let e = conn
            .execute(
                "INSERT INTO downlink_exchanges (mn, cn, origin, requested_at_ms, ended_at_ms, \
                 outcome, attempts, uploads, detail) VALUES ('M', 1, 'x', 0, 0, 'maybe', 0, 0, '')",
                [],
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("CHECK"), "{e}");
        // The chain is untouched by exchange rows.
        assert!(crate::store::verify_chain(&path).unwrap().is_intact());
    }
}
