//! Schema, migrations by `PRAGMA user_version`, and connection setup.
//!
//! `MIGRATIONS[i]` moves a file from `user_version = i` to `i + 1`; each step runs in
//! its own transaction together with the version bump, so a crash mid-migration leaves
//! the previous version intact. Steps are never edited once released, only appended.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{StoreError, SyncMode};

/// How long a connection waits for another connection's write lock before `SQLITE_BUSY`.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Page cache of the write connection (negative: KiB, SQLite's convention).
///
/// Not larger: SQLite scans the cache's whole hash table at the end of every
/// commit (`pcache1TruncateUnsafe`), which at 64 MiB is a visible share of the
/// gateway's CPU under load (benches/README.md, "Measurements behind the code"). The hot pages are few: the tails of the table and of the
/// QN-ordered retransmission index.
const WRITER_CACHE_KIB: i64 = -16 * 1024;

/// Page size of a new log file.
///
/// SQLite writes each WAL frame (one page) with its own system calls and copies it
/// again at the checkpoint; records are ~1.3 KB with their doc. Larger pages mean
/// fewer writes per commit for the same bytes.
const PAGE_SIZE: i64 = 16 * 1024;

/// SQL expression: the stored `data_time` (RFC 3339 with the device's offset) as UTC
/// unix milliseconds, NULL when absent. Compared as an instant, never as text, because
/// devices in different zones write different offsets.
pub(crate) const DATA_TIME_MS: &str =
    "CAST(round(unixepoch(data_time, 'subsec') * 1000) AS INTEGER)";

pub(crate) const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the log, its head, consumer cursors, accident guards.
    r#"
    CREATE TABLE records (
        seq            INTEGER PRIMARY KEY,
        received_at_ms INTEGER NOT NULL,
        peer           TEXT    NOT NULL,
        session        INTEGER NOT NULL,
        direction      TEXT    NOT NULL CHECK (direction IN ('in', 'out')),
        kind           TEXT    NOT NULL CHECK (kind IN ('frame', 'junk')),
        raw            BLOB    NOT NULL,
        dialect        TEXT,
        st             TEXT,
        cn             TEXT,
        mn             TEXT,
        qn             TEXT,
        data_time      TEXT,
        verdict        TEXT    NOT NULL CHECK (verdict IN ('accepted', 'rejected', 'junk')),
        duplicate      INTEGER NOT NULL CHECK (duplicate IN (0, 1)),
        findings       TEXT    NOT NULL,
        doc            TEXT    NOT NULL,
        hash           BLOB    NOT NULL CHECK (length(hash) = 32)
    ) STRICT;

    -- Retransmission lookup. Partial: only inbound frames with a QN can be duplicates,
    -- which keeps the index small and the per-append probe a single B-tree seek.
    CREATE INDEX records_retransmission ON records (mn, qn, cn)
        WHERE direction = 'in' AND kind = 'frame' AND qn IS NOT NULL AND qn <> '';

    CREATE TABLE meta (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        last_seq      INTEGER NOT NULL,
        last_hash     BLOB    NOT NULL CHECK (length(last_hash) = 32),
        updated_at_ms INTEGER NOT NULL
    ) STRICT;
    INSERT INTO meta (id, last_seq, last_hash, updated_at_ms) VALUES (1, 0, zeroblob(32), 0);

    CREATE TABLE cursors (
        name       TEXT    PRIMARY KEY,
        seq        INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;

    -- Accident guards, not security: anyone who can write the file can drop them.
    CREATE TRIGGER records_append_only_update BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'records are append-only: UPDATE refused'); END;
    CREATE TRIGGER records_append_only_delete BEFORE DELETE ON records
    BEGIN SELECT RAISE(ABORT, 'records are append-only: DELETE refused'); END;
    CREATE TRIGGER meta_head_forward_only BEFORE UPDATE ON meta
        WHEN NEW.last_seq < OLD.last_seq
    BEGIN SELECT RAISE(ABORT, 'the chain head only moves forward'); END;
    CREATE TRIGGER meta_no_delete BEFORE DELETE ON meta
    BEGIN SELECT RAISE(ABORT, 'the chain head cannot be deleted'); END;
    "#,
    // 1 -> 2: alarms of the anomaly detector. Outside the hash chain, like cursors:
    // derived data that `replay` can recompute from the records at any time.
    r#"
    CREATE TABLE alarms (
        id          INTEGER PRIMARY KEY,
        kind        TEXT    NOT NULL,
        severity    TEXT    NOT NULL CHECK (severity IN ('warning', 'critical')),
        mn          TEXT    NOT NULL,
        factor      TEXT    NOT NULL,
        start_ms    INTEGER NOT NULL,
        end_ms      INTEGER,
        seqs        TEXT    NOT NULL,
        clear_seq   INTEGER,
        message_zh  TEXT    NOT NULL,
        message_en  TEXT    NOT NULL
    ) STRICT;
    -- One active alarm per condition: a duplicate raise fails instead of piling up.
    CREATE UNIQUE INDEX alarms_one_active ON alarms (kind, mn, factor) WHERE end_ms IS NULL;
    CREATE INDEX alarms_mn_start ON alarms (mn, start_ms);

    -- Every raise and clear in order: what the MQTT publisher follows with its own cursor.
    CREATE TABLE alarm_events (
        id        INTEGER PRIMARY KEY,
        alarm_id  INTEGER NOT NULL REFERENCES alarms (id),
        event     TEXT    NOT NULL CHECK (event IN ('raise', 'clear')),
        mn        TEXT    NOT NULL,
        payload   TEXT    NOT NULL
    ) STRICT;
    "#,
    // 2 -> 3: how each downlink exchange ended (see `exchanges.rs`). Outside the hash
    // chain like the alarms (the requests and replies are chained records), but
    // append-only like `records`: an audit trail, not a working table.
    r#"
    CREATE TABLE downlink_exchanges (
        id              INTEGER PRIMARY KEY,
        mn              TEXT    NOT NULL,
        qn              TEXT,
        cn              INTEGER NOT NULL,
        origin          TEXT    NOT NULL,
        requested_at_ms INTEGER NOT NULL,
        ended_at_ms     INTEGER NOT NULL,
        outcome         TEXT    NOT NULL CHECK (outcome IN ('success', 'refused', 'failed',
                            'no_reply', 'exec_timeout', 'offline', 'busy', 'closed', 'invalid')),
        qn_rtn          INTEGER,
        exe_rtn         INTEGER,
        attempts        INTEGER NOT NULL CHECK (attempts >= 0),
        uploads         INTEGER NOT NULL CHECK (uploads >= 0),
        request_seq     INTEGER,
        detail          TEXT    NOT NULL
    ) STRICT;
    CREATE INDEX downlink_exchanges_mn_ended ON downlink_exchanges (mn, ended_at_ms);
    CREATE TRIGGER downlink_exchanges_append_only_update BEFORE UPDATE ON downlink_exchanges
    BEGIN SELECT RAISE(ABORT, 'downlink exchanges are append-only: UPDATE refused'); END;
    CREATE TRIGGER downlink_exchanges_append_only_delete BEFORE DELETE ON downlink_exchanges
    BEGIN SELECT RAISE(ABORT, 'downlink exchanges are append-only: DELETE refused'); END;
    "#,
    // 3 -> 4: the retransmission index ordered by QN first. Ordered by MN, each of
    // N devices inserts at the end of its own MN range, so a commit of k frames dirtied
    // ~k scattered index pages, each written to the WAL, fsynced and checkpointed: more
    // pages than the records themselves (benches/README.md, "Measurements behind
    // the code"). QNs are timestamps, so new entries of all devices land on the last few
    // pages. Equality on all three columns serves the probe just as well.
    r#"
    DROP INDEX records_retransmission;
    CREATE INDEX records_retransmission_qn ON records (qn, mn, cn)
        WHERE direction = 'in' AND kind = 'frame' AND qn IS NOT NULL AND qn <> '';
    "#,
    // 4 -> 5: the `verdict` CHECK as comparisons instead of an IN list. SQLite
    // evaluates a constant IN list of three or more terms by building a temporary
    // B-tree, and a CHECK runs for every row: opening and closing that B-tree was
    // a visible share of the gateway's CPU (benches/README.md, "Measurements behind
    // the code"). The two forms accept exactly the same values. SQLite cannot ALTER
    // a column's CHECK, so the stored CREATE TABLE text is edited in place, the
    // procedure SQLite documents for removing or changing CHECK constraints ("Making
    // Other Kinds Of Table Schema Changes", lang_altertable.html): sound because
    // every stored row already satisfies the new expression. RESET makes this connection re-read the schema; `migrate` bumps
    // the schema cookie so other connections do too. A file whose text differs is
    // left as it is.
    r#"
    PRAGMA writable_schema = ON;
    UPDATE sqlite_schema
       SET sql = replace(sql, 'CHECK (verdict IN (''accepted'', ''rejected'', ''junk''))',
                 'CHECK (verdict = ''accepted'' OR verdict = ''rejected'' OR verdict = ''junk'')')
     WHERE type = 'table' AND name = 'records';
    PRAGMA writable_schema = RESET;
    "#,
    // 5 -> 6: records a consumer set aside (see `dead_letters.rs`), and the start
    // bookkeeping of its crash-loop guard in its cursor row. Outside the hash chain
    // like the cursors: consumer state, not evidence. One row per (consumer, seq):
    // a record refused again updates its row instead of piling up.
    r#"
    CREATE TABLE dead_letters (
        id         INTEGER PRIMARY KEY,
        consumer   TEXT    NOT NULL,
        seq        INTEGER NOT NULL,
        reason     TEXT    NOT NULL,
        detail     TEXT    NOT NULL,
        attempts   INTEGER NOT NULL CHECK (attempts >= 1),
        first_ms   INTEGER NOT NULL,
        last_ms    INTEGER NOT NULL,
        state      TEXT    NOT NULL CHECK (state = 'dead' OR state = 'redrive' OR state = 'resolved')
    ) STRICT;
    CREATE UNIQUE INDEX dead_letters_consumer_seq ON dead_letters (consumer, seq);
    -- What a consumer polls for: the few entries an operator asked to re-drive.
    CREATE INDEX dead_letters_redrive ON dead_letters (consumer) WHERE state = 'redrive';
    ALTER TABLE cursors ADD COLUMN start_seq INTEGER;
    ALTER TABLE cursors ADD COLUMN starts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE cursors ADD COLUMN probe_seq INTEGER;
    "#,
    DEVICE_DIALECTS,
    EVENT_CURSORS,
    MERKLE,
    ARCHIVES,
    DIALECTS_BY_WRITER,
];

/// `device_dialects` kept by the writer, no longer by a trigger on `records`.
///
/// An `AFTER INSERT` trigger makes every record insert a statement that may write
/// more than one row and abort part way, so SQLite opened a statement journal for
/// each one and copied every page the insert touched into it first: the records
/// table's last leaf and the retransmission index page, 16 KiB each, per record.
/// That copy was a fifth of the store bench's time (`benches/README.md`). The
/// writer now upserts the same row in the same transaction
/// (`writer::DEVICE_DIALECT_SQL`), only for an MN it has not yet seen with that
/// dialect, with the conditions the trigger had.
pub(crate) const DIALECTS_BY_WRITER: &str = "DROP TRIGGER IF EXISTS records_device_dialect;";

/// The Merkle tree over the records (RFC 6962) and the signed checkpoints cut from
/// it (see [`super::merkle`]).
///
/// `tree_hashes` holds every node of every complete subtree under its "stored hash
/// index" (Crosby and Wallach, as Go's `sumdb/tlog` numbers them), in runs: row
/// `id` holds the consecutive hashes `id, id + 1, ...` one commit stored, 32 bytes
/// each. The writer only ever appends, so ids arrive in increasing order, the
/// cheapest insert a rowid table has, and only once per commit. Leaf `n` is the record with `seq = n + 1`. Tree hashes of records
/// that were already in the file are computed in Rust after this step
/// (`merkle::backfill`): SQL has no SHA-256.
///
/// `checkpoints` keeps every signed tree head the gateway published, so `prove` can
/// attach one and an archive can carry its own. Like the records, neither table is
/// edited in place: guards against accidents, as for `records`.
pub(crate) const MERKLE: &str = r#"
    CREATE TABLE IF NOT EXISTS tree_hashes (
        id     INTEGER PRIMARY KEY,
        hashes BLOB    NOT NULL CHECK (length(hashes) > 0 AND length(hashes) % 32 = 0)
    ) STRICT;
    CREATE TABLE IF NOT EXISTS checkpoints (
        size      INTEGER PRIMARY KEY,
        root      BLOB    NOT NULL CHECK (length(root) = 32),
        note      TEXT    NOT NULL,
        cut_at_ms INTEGER NOT NULL
    ) STRICT;
    CREATE TRIGGER IF NOT EXISTS tree_hashes_append_only_update BEFORE UPDATE ON tree_hashes
    BEGIN SELECT RAISE(ABORT, 'tree hashes are append-only: UPDATE refused'); END;
    CREATE TRIGGER IF NOT EXISTS tree_hashes_append_only_delete BEFORE DELETE ON tree_hashes
    BEGIN SELECT RAISE(ABORT, 'tree hashes are append-only: DELETE refused'); END;
    CREATE TRIGGER IF NOT EXISTS checkpoints_append_only_update BEFORE UPDATE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only: UPDATE refused'); END;
    CREATE TRIGGER IF NOT EXISTS checkpoints_append_only_delete BEFORE DELETE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only: DELETE refused'); END;
    "#;

/// Sealed archives of the log (see `archive.rs`) and the one change to the
/// append-only guard they need.
///
/// A row here is the commit point of a seal: once it exists, every reader takes
/// seqs `first_seq..=last_seq` from the archive file and no longer from `records`,
/// whose copies are then deleted in small transactions. The delete guard on
/// `records` is replaced by one that still refuses every delete except of a seq
/// inside a recorded archive, so an accidental `DELETE FROM records` still fails.
/// Rows are never deleted; the only update is retention retiring an archive
/// (`sealed` -> `deleted`) with its signed tombstone, which is what `verify`
/// reports the gap with. Like the other guards, these stop accidents, not an
/// attacker: the evidence is the chain and the tombstone's signature. Idempotent,
/// like [`DEVICE_DIALECTS`], so a file whose version was set back migrates again;
/// kept as a named step so renumbering it against another branch is moving a line.
pub(crate) const ARCHIVES: &str = r#"
    CREATE TABLE IF NOT EXISTS archives (
        first_seq       INTEGER PRIMARY KEY CHECK (first_seq >= 1),
        last_seq        INTEGER NOT NULL CHECK (last_seq >= first_seq),
        records         INTEGER NOT NULL CHECK (records = last_seq - first_seq + 1),
        period_start_ms INTEGER NOT NULL,
        period_end_ms   INTEGER NOT NULL CHECK (period_end_ms > period_start_ms),
        prev_hash       BLOB    NOT NULL CHECK (length(prev_hash) = 32),
        last_hash       BLOB    NOT NULL CHECK (length(last_hash) = 32),
        file            TEXT    NOT NULL UNIQUE,
        bytes           INTEGER NOT NULL CHECK (bytes > 0),
        sha256          BLOB    NOT NULL CHECK (length(sha256) = 32),
        sealed_at_ms    INTEGER NOT NULL,
        state           TEXT    NOT NULL CHECK (state = 'sealed' OR state = 'deleted'),
        tombstone       TEXT,
        deleted_at_ms   INTEGER,
        CHECK (state = 'sealed' OR (tombstone IS NOT NULL AND deleted_at_ms IS NOT NULL))
    ) STRICT;
    CREATE TRIGGER IF NOT EXISTS archives_no_delete BEFORE DELETE ON archives
    BEGIN SELECT RAISE(ABORT, 'archives are never forgotten: DELETE refused'); END;
    CREATE TRIGGER IF NOT EXISTS archives_retire_only BEFORE UPDATE ON archives
        WHEN NOT (OLD.state = 'sealed' AND NEW.state = 'deleted'
              AND NEW.first_seq = OLD.first_seq AND NEW.last_seq = OLD.last_seq
              AND NEW.records = OLD.records AND NEW.prev_hash = OLD.prev_hash
              AND NEW.last_hash = OLD.last_hash AND NEW.sha256 = OLD.sha256
              AND NEW.file = OLD.file AND NEW.bytes = OLD.bytes
              AND NEW.period_start_ms = OLD.period_start_ms
              AND NEW.period_end_ms = OLD.period_end_ms
              AND NEW.sealed_at_ms = OLD.sealed_at_ms)
    BEGIN SELECT RAISE(ABORT, 'an archive row only changes from sealed to deleted'); END;
    DROP TRIGGER IF EXISTS records_append_only_delete;
    CREATE TRIGGER records_append_only_delete BEFORE DELETE ON records
        WHEN NOT EXISTS (SELECT 1 FROM archives
                          WHERE first_seq = (SELECT max(first_seq) FROM archives
                                              WHERE first_seq <= OLD.seq)
                            AND last_seq >= OLD.seq)
    BEGIN SELECT RAISE(ABORT, 'records are append-only: DELETE refused outside a sealed archive'); END;
    "#;

/// Alarm-event cursors in a table of their own. They count `alarm_events.id`, not
/// record seqs; kept in `cursors`, the one column held two kinds of number (the
/// head a lag is measured against, the guard of a cursor write: `meta.last_seq`
/// for one, the last event id for the other). The publisher's `mqtt.alarms` (the
/// only alarm-event cursor so far) moves here with its value, in the same step.
/// Idempotent, like [`DEVICE_DIALECTS`], so a file whose version was set back
/// migrates again.
pub(crate) const EVENT_CURSORS: &str = r#"
    CREATE TABLE IF NOT EXISTS event_cursors (
        name       TEXT    PRIMARY KEY,
        event_id   INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;
    INSERT OR REPLACE INTO event_cursors (name, event_id, updated_at)
        SELECT name, seq, updated_at FROM cursors WHERE name = 'mqtt.alarms';
    DELETE FROM cursors WHERE name = 'mqtt.alarms';
    "#;

/// The dialect each MN last spoke from a device connection, for answering a
/// platform's request for a device that is offline (`Reader::last_device_dialect`).
///
/// Before this, that answer searched `records` newest first for the MN: for an MN
/// the log never saw, a scan of the whole log per request, which a platform
/// flooding requests for invented MNs turned into a stalled forwarder. An index
/// on `records (mn)` would answer it too, but MN-ordered index entries land on
/// one page per device, the write amplification migration 3 -> 4 removed from the
/// retransmission index. This table has one row per MN (a few pages for a
/// thousand devices), is kept in the transaction that inserts the record, and is
/// only written when an MN is new or changes dialect: the upsert's `WHERE`
/// leaves an unchanged row (and its page) alone. The device-peer test is the one
/// the old query used: device peers are socket addresses, the only peers with a
/// `:`; records a platform sent about a device carry its name. This step kept
/// the table with a trigger; [`DIALECTS_BY_WRITER`] drops it (it made each
/// record insert copy pages into a statement journal) and the writer keeps the
/// table instead.
///
/// Outside the hash chain, like cursors and alarms: derived from the records and
/// rebuilt from them by this step's `INSERT ... SELECT` (one pass over the log,
/// once, at the upgrade; idempotent, so a file whose version was set back, as
/// tests do, migrates again). Kept as a named step so that renumbering it against
/// another branch's migration is moving one line.
pub(crate) const DEVICE_DIALECTS: &str = r#"
    CREATE TABLE IF NOT EXISTS device_dialects (
        mn      TEXT NOT NULL PRIMARY KEY,
        dialect TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;
    INSERT OR REPLACE INTO device_dialects (mn, dialect)
        SELECT mn, dialect FROM (
            SELECT mn, dialect, max(seq) FROM records
             WHERE mn IS NOT NULL AND direction = 'in' AND kind = 'frame'
               AND dialect IS NOT NULL AND instr(peer, ':') > 0
             GROUP BY mn);
    CREATE TRIGGER IF NOT EXISTS records_device_dialect AFTER INSERT ON records
        WHEN NEW.mn IS NOT NULL AND NEW.direction = 'in' AND NEW.kind = 'frame'
         AND NEW.dialect IS NOT NULL AND instr(NEW.peer, ':') > 0
    BEGIN
        INSERT INTO device_dialects (mn, dialect) VALUES (NEW.mn, NEW.dialect)
            ON CONFLICT (mn) DO UPDATE SET dialect = excluded.dialect
            WHERE dialect <> excluded.dialect;
    END;
    "#;

/// The schema version a file has once [`DEVICE_DIALECTS`] ran (the step's index + 1).
#[cfg(test)]
pub(crate) fn device_dialects_version() -> usize {
    MIGRATIONS
        .iter()
        .position(|m| *m == DEVICE_DIALECTS)
        .expect("DEVICE_DIALECTS is a migration")
        + 1
}

/// A log file as an earlier release left it: the first `version` migrations only.
#[cfg(test)]
pub(crate) fn file_at_version(path: &Path, version: usize) -> Connection {
    let conn = Connection::open(path).expect("open");
    for sql in &MIGRATIONS[..version] {
        conn.execute_batch(sql).expect("migration");
    }
    conn.pragma_update(None, "user_version", version as i64)
        .expect("user_version");
    conn
}

/// Whether a migration step edits `sqlite_schema` directly: SQLite does not bump the
/// schema cookie for that, so `migrate` does, or connections keep the old schema.
fn edits_schema_text(sql: &str) -> bool {
    sql.contains("writable_schema")
}

/// The schema version this build writes.
pub(crate) fn latest_version() -> i64 {
    MIGRATIONS.len() as i64
}

#[cfg(test)]
/// Opens (creating if needed) the write connection with the default start-up check
/// (see [`open_log`]).
pub(crate) fn open_writer(path: &Path, sync: SyncMode) -> Result<Connection, StoreError> {
    open_log(path, sync, super::DEFAULT_CHECK_TAIL)
}

/// Opens the write connection: creates a new log where no file exists (directory
/// 0750, file 0640: raw frames hold device passwords), or identifies and checks an
/// existing one (see [`super::check`]) before anything is written to it; then sets
/// WAL and `synchronous` and migrates the schema to the latest version.
pub(crate) fn open_log(
    path: &Path,
    sync: SyncMode,
    check_tail: usize,
) -> Result<Connection, StoreError> {
    let existing = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(StoreError::Io { source });
        }
    };
    match &existing {
        None => create_private(path)?,
        Some(m) if !m.is_file() => {
            return Err(StoreError::NotAFrameLog {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        Some(m) if m.len() == 0 => {
            return Err(StoreError::EmptyFile {
                path: path.to_path_buf(),
            });
        }
        Some(_) => {}
    }
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(StoreError::sqlite("open the store file"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(StoreError::sqlite("set busy_timeout"))?;
    // Nothing below may write to a file before it is known to be ours and sound:
    // even `journal_mode = WAL` rewrites the header of a foreign database.
    let labelled = match existing {
        Some(_) => {
            let labelled = super::check::identify(&conn, path, latest_version())?;
            let started = std::time::Instant::now();
            super::check::startup_check(&conn, path, check_tail)?;
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                check_tail,
                "frame log start-up check passed"
            );
            labelled
        }
        None => {
            // Only takes effect on a new, empty file (before WAL mode is set); an
            // existing log keeps the page size it was created with.
            conn.pragma_update(None, "page_size", PAGE_SIZE)
                .map_err(StoreError::sqlite("set page_size"))?;
            // The first write: from here on the file says it is a frame log, so a
            // start interrupted before the first migration is recognised as ours.
            conn.pragma_update(None, "application_id", super::check::APPLICATION_ID)
                .map_err(StoreError::sqlite("set application_id"))?;
            true
        }
    };
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(StoreError::sqlite("enable WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Sqlite {
            op: "enable WAL",
            source: rusqlite::Error::InvalidQuery,
        });
    }
    conn.pragma_update(None, "synchronous", sync.pragma_value())
        .map_err(StoreError::sqlite("set synchronous"))?;
    // Every append probes and extends the retransmission index; with SQLite's 2 MiB
    // default cache a large transaction spills pages mid-way and re-reads them from
    // the OS. `WRITER_CACHE_KIB` keeps a whole batch and the index's tail resident.
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)
        .map_err(StoreError::sqlite("set cache_size"))?;
    // Checkpoints normally run on a background connection (see `writer::Checkpointer`);
    // this is only the backstop if that one falls behind (16,384 pages: 256 MiB of WAL
    // with 16 KiB pages).
    conn.pragma_update(None, "wal_autocheckpoint", 16_384)
        .map_err(StoreError::sqlite("set wal_autocheckpoint"))?;
    migrate(&mut conn)?;
    if !labelled {
        // A log of an earlier release: recognised by its schema above, labelled now
        // so that later starts need not guess.
        conn.pragma_update(None, "application_id", super::check::APPLICATION_ID)
            .map_err(StoreError::sqlite("set application_id"))?;
    }
    Ok(conn)
}

/// Creates a new, empty log file readable by its owner and group only, and its
/// directory (0750) if missing. SQLite gives the `-wal` and `-shm` files the mode
/// of the database file.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
        .map(drop)
        .map_err(|source| StoreError::Io { source })
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(StoreError::sqlite("read user_version"))?;
    if found > latest_version() {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: latest_version(),
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(StoreError::sqlite("begin migration"))?;
        tx.execute_batch(sql)
            .map_err(StoreError::sqlite("apply migration"))?;
        if edits_schema_text(sql) {
            let cookie: i64 = tx
                .query_row("PRAGMA schema_version", [], |r| r.get(0))
                .map_err(StoreError::sqlite("read schema_version"))?;
            tx.pragma_update(None, "schema_version", cookie + 1)
                .map_err(StoreError::sqlite("bump schema_version"))?;
        }
        tx.pragma_update(None, "user_version", from as i64 + 1)
            .map_err(StoreError::sqlite("bump user_version"))?;
        tx.commit()
            .map_err(StoreError::sqlite("commit migration"))?;
        tracing::info!(to_version = from + 1, "store schema migrated");
    }
    Ok(())
}

/// Opens a read-only connection on an initialised store.
pub(crate) fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(StoreError::sqlite("open the store read-only"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(StoreError::sqlite("set busy_timeout"))?;
    check_version(&conn, path)?;
    Ok(conn)
}

/// Opens a read-write connection for small side tables (cursors) on an initialised store.
pub(crate) fn open_side(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(StoreError::sqlite("open the store for cursors"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(StoreError::sqlite("set busy_timeout"))?;
    check_version(&conn, path)?;
    // With SQLite's default (1000 pages) every cursor or alarm commit made while the
    // WAL is over 4 MiB ran a whole checkpoint on the consumer's thread
    // (benches/README.md, "Measurements behind the code"). The background checkpointer
    // and the writer's backstop own checkpointing.
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(StoreError::sqlite("set wal_autocheckpoint"))?;
    // Side tables are consumer state (cursors, alarms with their cursor in the same
    // transaction): NORMAL skips the fsync of their own commits, and the next frame
    // commit (synchronous = FULL) makes them durable with it. A power cut in between
    // rolls events and cursor back together, and the consumer redoes that work from
    // the log; nothing a device was acked for depends on them.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(StoreError::sqlite("set synchronous"))?;
    Ok(conn)
}

fn check_version(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(StoreError::sqlite("read user_version"))?;
    if found == 0 {
        return Err(StoreError::NotInitialized {
            path: path.to_path_buf(),
        });
    }
    if found > latest_version() {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: latest_version(),
        });
    }
    Ok(())
}
