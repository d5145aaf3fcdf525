//! What `serve` checks before it trusts a file as its frame log.
//!
//! A gateway that appends to a damaged B-tree acknowledges frames it may not be
//! able to read back, and one that "migrates" another application's database
//! destroys that application's data. So before the writer touches a file:
//!
//! * **Identity.** A new log carries [`APPLICATION_ID`] in its SQLite header (the
//!   first write to the file, before any table exists). A file without it is taken
//!   only when it is a frame log of an earlier release (user_version 1..=latest
//!   and the `records`, `meta` and `cursors` tables); it gets the id when it is
//!   migrated. A 0-byte file, a file that is not SQLite, and any other SQLite file
//!   (including an empty one) are refused: `serve` creates a new log only where no
//!   file exists.
//! * **The pages the gateway needs.** `PRAGMA quick_check` of every table except
//!   `records` (meta, cursors, alarms, exchanges: small, and written by the
//!   gateway), the schema itself, and the tail of `records`: the last
//!   `[store] check_tail` records read through the table's right edge (the pages the
//!   writer appends to), their chain links, and the last `check_tail` entries of
//!   every index on `records` compared with the rows they point to. The full
//!   `PRAGMA integrity_check` and chain walk stay in `verify`: both read the whole
//!   file, minutes on a 10 GB log.
//!
//! The cost is bounded by `check_tail` and the size of the small tables, not by the
//! length of the log; README's store section has the measurement.

use std::path::Path;

use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, ErrorCode};

use super::StoreError;
use super::chain::RECORD_COLUMNS;
use super::chain::{HASHED_COLUMNS, record_hash, row_values};

/// `PRAGMA application_id` of a frame log: "HJ21" in ASCII.
pub(crate) const APPLICATION_ID: i32 = 0x484A_3231;

/// Tables every frame log has had since its first schema version.
const CORE_TABLES: [&str; 3] = ["records", "meta", "cursors"];

/// Whether the file behind `conn` is a frame log this build may open; `Ok(false)`
/// for a log of an earlier release that lacks the application id.
pub(crate) fn identify(conn: &Connection, path: &Path, latest: i64) -> Result<bool, StoreError> {
    let not_a_log = |reason: String| StoreError::NotAFrameLog {
        path: path.to_owned(),
        reason,
    };
    let header = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => not_a_log("not an SQLite database".into()),
        _ => damaged(path, "read the file header", e),
    };
    let app: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(header)?;
    if app == APPLICATION_ID {
        return Ok(true);
    }
    if app != 0 {
        return Err(not_a_log(format!(
            "SQLite application_id {app:#010x} belongs to another application"
        )));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(header)?;
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
        .map_err(|e| damaged(path, "read the schema", e))?;
    let tables: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| damaged(path, "read the schema", e))?;
    let missing: Vec<&str> = CORE_TABLES
        .into_iter()
        .filter(|t| !tables.iter().any(|n| n == t))
        .collect();
    if tables.is_empty() {
        return Err(not_a_log("an SQLite database without tables".into()));
    }
    if !missing.is_empty() || !(1..=latest).contains(&version) {
        return Err(not_a_log(format!(
            "an SQLite database without the frame log's schema (user_version {version}, missing tables {missing:?})"
        )));
    }
    Ok(false)
}

/// The start-up check of the pages the gateway reads and writes (see the module
/// documentation). Read-only: a failing file is left exactly as it was.
pub(crate) fn startup_check(conn: &Connection, path: &Path, tail: usize) -> Result<(), StoreError> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name <> 'records' AND name NOT LIKE 'sqlite_%'")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| damaged(path, "read the schema", e))?;
    for t in &tables {
        quick_check(conn, path, t)?;
    }
    check_records_tail(conn, path, tail)?;
    check_index_tails(conn, path, tail)
}

fn quick_check(conn: &Connection, path: &Path, table: &str) -> Result<(), StoreError> {
    // The table name comes from the file's own schema; quoted as an identifier.
    let sql = format!("PRAGMA quick_check(\"{}\")", table.replace('"', "\"\""));
    let findings: Vec<String> = conn
        .prepare(&sql)
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| damaged(path, "check a table", e))?;
    match findings.first() {
        Some(f) if f == "ok" => Ok(()),
        Some(f) => Err(StoreError::Damaged {
            path: path.to_owned(),
            detail: format!("table {table}: {f}"),
        }),
        None => Ok(()),
    }
}

/// Reads the last `tail` records newest first, through the right edge of the table
/// B-tree, and checks that they are dense and chained.
fn check_records_tail(conn: &Connection, path: &Path, tail: usize) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {RECORD_COLUMNS} FROM records ORDER BY seq DESC LIMIT ?1"
        ))
        .map_err(|e| damaged(path, "read the last records", e))?;
    let mut rows = stmt
        .query([tail as i64])
        .map_err(|e| damaged(path, "read the last records", e))?;
    // Newest first: each row's hash must be the `prev` of the row read before it.
    let mut later: Option<(i64, Vec<u8>, Vec<Value>)> = None;
    while let Some(row) = rows
        .next()
        .map_err(|e| damaged(path, "read the last records", e))?
    {
        let (cols, hash) = row_values(row).map_err(|e| damaged(path, "read a record", e))?;
        let (ValueRef::Integer(seq), ValueRef::Blob(hash)) = (cols[0], hash) else {
            return Err(malformed(
                path,
                "a record's seq or hash has the wrong type".into(),
            ));
        };
        let Ok(prev) = <[u8; 32]>::try_from(hash) else {
            return Err(malformed(
                path,
                format!("record {seq}'s hash is not 32 bytes"),
            ));
        };
        if let Some((later_seq, later_hash, later_cols)) = &later {
            if *later_seq != seq + 1 {
                return Err(malformed(
                    path,
                    format!("records {seq} and {later_seq} are not consecutive"),
                ));
            }
            let refs: Vec<ValueRef<'_>> = later_cols.iter().map(ValueRef::from).collect();
            let refs: [ValueRef<'_>; HASHED_COLUMNS] =
                refs.try_into().expect("one value per hashed column");
            // A broken link is tamper evidence, not damage SQLite can see: like a
            // head that does not match (see `writer::load_head`), it is reported and
            // the log stays in service; `verify` tells the whole story.
            if record_hash(&prev, &refs).as_ref().map(|h| &h[..]) != Some(later_hash.as_slice()) {
                tracing::error!(
                    seq = later_seq,
                    "frame log record does not chain from the one before it; run `hj212-gateway verify`"
                );
            }
        }
        let owned: Vec<Value> = cols
            .iter()
            .map(|v| Value::try_from(*v))
            .collect::<Result<_, _>>()
            .map_err(|_| malformed(path, format!("record {seq} holds text that is not UTF-8")))?;
        later = Some((seq, prev.to_vec(), owned));
    }
    Ok(())
}

/// For every plain-column index on `records`: its last `tail` entries, each
/// compared with the row it points to.
fn check_index_tails(conn: &Connection, path: &Path, tail: usize) -> Result<(), StoreError> {
    let indexes: Vec<(String, Option<String>)> = conn
        .prepare(
            "SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'records'",
        )
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(|e| damaged(path, "read the schema", e))?;
    for (name, sql) in indexes {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let cols: Vec<Option<String>> = conn
            .prepare(&format!(
                "SELECT name FROM pragma_index_info({})",
                sql_text(&name)
            ))
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| damaged(path, "read an index's columns", e))?;
        // Expression indexes (no column names) are left to `verify`.
        let Some(cols) = cols.into_iter().collect::<Option<Vec<String>>>() else {
            continue;
        };
        if cols.is_empty() {
            continue;
        }
        let list = cols
            .iter()
            .map(|c| format!("\"{}\"", c.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(", ");
        let desc = cols
            .iter()
            .map(|c| format!("\"{}\" DESC", c.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(", ");
        // A partial index is only used when the query repeats its condition.
        let partial = sql
            .as_deref()
            .and_then(|s| {
                let upper = s.to_ascii_uppercase();
                upper.rfind(" WHERE ").map(|i| s[i + 7..].to_owned())
            })
            .map_or(String::new(), |w| format!("WHERE {w}"));
        let entries = format!(
            "SELECT seq, {list} FROM records INDEXED BY {quoted} {partial} ORDER BY {desc} LIMIT ?1"
        );
        let row_of = format!("SELECT {list} FROM records NOT INDEXED WHERE seq = ?1");
        let n = cols.len();
        let mut stmt = conn
            .prepare(&entries)
            .map_err(|e| damaged(path, "read an index", e))?;
        let mut lookup = conn
            .prepare(&row_of)
            .map_err(|e| damaged(path, "read an index", e))?;
        let mut rows = stmt
            .query([tail as i64])
            .map_err(|e| damaged(path, "read an index", e))?;
        while let Some(row) = rows.next().map_err(|e| damaged(path, "read an index", e))? {
            let seq: i64 = row.get(0).map_err(|e| damaged(path, "read an index", e))?;
            let indexed: Vec<Value> = (1..=n)
                .map(|i| row.get(i))
                .collect::<Result<_, _>>()
                .map_err(|e| damaged(path, "read an index", e))?;
            let stored: Option<Vec<Value>> = lookup
                .query_row([seq], |r| (0..n).map(|i| r.get(i)).collect())
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
                .map_err(|e| damaged(path, "read a record an index points to", e))?;
            if stored.as_ref() != Some(&indexed) {
                return Err(malformed(
                    path,
                    format!("index {name} does not match record {seq}"),
                ));
            }
        }
    }
    Ok(())
}

/// A string literal for SQL text.
fn sql_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// SQLite's verdict on a failed read: damage when it says so, else the plain error
/// (a lock held too long, an I/O error) with what the check was doing.
fn damaged(path: &Path, op: &'static str, e: rusqlite::Error) -> StoreError {
    if is_damage(&e) {
        StoreError::Damaged {
            path: path.to_owned(),
            detail: format!("cannot {op}: {e}"),
        }
    } else {
        StoreError::Sqlite { op, source: e }
    }
}

/// Whether SQLite reports the file itself as damaged (or not a database at all).
pub(crate) fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

fn malformed(path: &Path, detail: String) -> StoreError {
    StoreError::Damaged {
        path: path.to_owned(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::super::schema::{self, file_at_version, latest_version};
    use super::*;

    fn app_id(path: &Path) -> i32 {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .unwrap()
    }

    /// Logs of every earlier schema version (no application id then) are
    /// recognised by their schema, migrated, and labelled; a new log is labelled
    /// from its first write.
    #[test]
    fn logs_of_every_earlier_version_open_and_get_the_application_id() {
        let dir = tempfile::tempdir().unwrap();
        for v in 1..latest_version() as usize {
            let path = dir.path().join(format!("v{v}.sqlite"));
            drop(file_at_version(&path, v));
            assert_eq!(app_id(&path), 0);
            let conn = schema::open_writer(&path, super::super::SyncMode::Off)
                .unwrap_or_else(|e| panic!("v{v}: {e}"));
            let version: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(version, latest_version());
            drop(conn);
            assert_eq!(app_id(&path), APPLICATION_ID, "v{v}");
        }
        let new = dir.path().join("new.sqlite");
        drop(schema::open_writer(&new, super::super::SyncMode::Off).unwrap());
        assert_eq!(app_id(&new), APPLICATION_ID);
        // And it opens again, checked.
        drop(schema::open_writer(&new, super::super::SyncMode::Off).unwrap());
    }

    /// A database with user_version 0 or without the core tables is not a log of
    /// an earlier release, whatever its tables are called.
    #[test]
    fn lookalikes_are_not_frame_logs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sqlite");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
        // Our tables, but nobody stamped a version: not migrated, not written.
        let err = identify(&conn, &path, latest_version()).unwrap_err();
        assert!(matches!(err, StoreError::NotAFrameLog { .. }), "{err}");
        conn.execute_batch("DROP TABLE cursors; PRAGMA user_version = 1;")
            .unwrap();
        let err = identify(&conn, &path, latest_version()).unwrap_err();
        assert!(err.to_string().contains("\"cursors\""), "{err}");
    }
}
