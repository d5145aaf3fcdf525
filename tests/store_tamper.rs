//! Tamper evidence: alter a finished log the way an attacker with the file would, and
//! check that `verify_chain` names the exact seq and reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use hj212_gateway::store::{
    BreakReason, ChainBreak, Direction, Kind, NewRecord, Reader, Store, StoreConfig, Verdict,
    verify_chain,
};
use rusqlite::Connection;
use sha2::{Digest, Sha256};

const N: u64 = 10;

fn record(i: u64) -> NewRecord {
    let mut raw = format!("##0101QN=2026112813050{i};ST=32;CN=2011;MN=M{i}&&").into_bytes();
    raw.extend_from_slice(&[0x00, 0xff, b'\r', b'\n']);
    NewRecord {
        received_at_ms: 1_795_870_701_000 + i as i64,
        peer: format!("10.0.0.{i}:4000{i}"),
        session: i,
        direction: if i % 2 == 0 {
            Direction::Out
        } else {
            Direction::In
        },
        kind: Kind::Frame,
        raw: Bytes::from(raw),
        dialect: Some("2017".into()),
        st: Some("32".into()),
        cn: Some("2011".into()),
        mn: Some(format!("M{i}")),
        qn: if i == 3 { None } else { Some(format!("Q{i}")) },
        data_time: Some("2026-11-28T21:05:00+08:00".into()),
        verdict: Verdict::Accepted,
        findings: "[]".into(),
        doc: format!(r#"{{"schema":"hj212.frame.v1","i":{i}.50}}"#),
        doc_stored: true,
    }
}

/// A finished log of N records, writer stopped.
fn build() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frames.sqlite");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (handle, join) = Store::open(StoreConfig::new(&path)).unwrap();
    rt.block_on(async {
        for i in 1..=N {
            handle.append(record(i)).await.unwrap();
        }
    });
    drop(handle);
    join.join().unwrap();
    let report = verify_chain(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records_checked, N);
    (dir, path)
}

fn attacker(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(
        "DROP TRIGGER records_append_only_update; DROP TRIGGER records_append_only_delete;",
    )
    .unwrap();
    conn
}

fn first_break(path: &Path) -> (u64, ChainBreak) {
    let report = verify_chain(path).unwrap();
    (
        report.records_checked,
        report.first_break.expect("tampering detected"),
    )
}

#[test]
fn triggers_refuse_update_and_delete() {
    let (_dir, path) = build();
    let conn = Connection::open(&path).unwrap();
    for sql in [
        "UPDATE records SET peer = 'x' WHERE seq = 2",
        "DELETE FROM records WHERE seq = 10",
        "UPDATE meta SET last_seq = 3",
        "DELETE FROM meta",
    ] {
        let err = conn.execute(sql, []).unwrap_err().to_string();
        assert!(
            err.contains("append-only") || err.contains("chain head"),
            "{sql}: {err}"
        );
    }
    assert!(verify_chain(&path).unwrap().is_intact());
}

#[test]
fn one_changed_raw_byte_is_a_hash_mismatch_at_that_seq() {
    let (_dir, path) = build();
    let conn = attacker(&path);
    let mut raw: Vec<u8> = conn
        .query_row("SELECT raw FROM records WHERE seq = 4", [], |r| r.get(0))
        .unwrap();
    raw[10] ^= 0x01;
    conn.execute("UPDATE records SET raw = ?1 WHERE seq = 4", [raw])
        .unwrap();
    let (checked, brk) = first_break(&path);
    assert_eq!(checked, 3);
    assert_eq!(
        brk,
        ChainBreak {
            seq: 4,
            reason: BreakReason::HashMismatch
        }
    );
}

#[test]
fn every_column_is_covered_by_the_hash() {
    let updates = [
        "received_at_ms = received_at_ms + 1",
        "peer = 'evil:1'",
        "session = session + 1",
        "direction = 'out'",
        "kind = 'junk'",
        "raw = CAST(raw || x'00' AS BLOB)",
        "dialect = '2005'",
        "dialect = NULL",
        "st = '31'",
        "cn = '2051'",
        "mn = 'M99'",
        "qn = ''",
        "data_time = NULL",
        "verdict = 'rejected'",
        "duplicate = 1",
        "findings = '[{}]'",
        "doc = '{}'",
        "hash = zeroblob(32)",
    ];
    for set in updates {
        let (_dir, path) = build();
        attacker(&path)
            .execute(&format!("UPDATE records SET {set} WHERE seq = 5"), [])
            .unwrap();
        let (checked, brk) = first_break(&path);
        assert_eq!((checked, brk.seq), (4, 5), "{set}");
        assert_eq!(brk.reason, BreakReason::HashMismatch, "{set}");
    }
}

#[test]
fn a_deleted_middle_record_is_a_gap() {
    let (_dir, path) = build();
    attacker(&path)
        .execute("DELETE FROM records WHERE seq = 6", [])
        .unwrap();
    let (checked, brk) = first_break(&path);
    assert_eq!(checked, 5);
    assert_eq!(
        brk,
        ChainBreak {
            seq: 6,
            reason: BreakReason::Missing { next_present: 7 }
        }
    );
}

#[test]
fn a_deleted_first_record_is_a_gap_at_one() {
    let (_dir, path) = build();
    attacker(&path)
        .execute("DELETE FROM records WHERE seq = 1", [])
        .unwrap();
    let (checked, brk) = first_break(&path);
    assert_eq!(checked, 0);
    assert_eq!(brk.seq, 1);
    assert_eq!(brk.reason, BreakReason::Missing { next_present: 2 });
}

#[test]
fn deleted_last_records_are_a_truncated_tail() {
    let (_dir, path) = build();
    attacker(&path)
        .execute("DELETE FROM records WHERE seq = 10", [])
        .unwrap();
    let (checked, brk) = first_break(&path);
    assert_eq!(checked, 9);
    assert_eq!(
        brk,
        ChainBreak {
            seq: 10,
            reason: BreakReason::TruncatedTail { head_seq: 10 }
        }
    );

    // The writer restarted on such a file keeps the hole visible instead of reusing seq 10.
    let (handle, join) = Store::open(StoreConfig::new(&path)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let a = rt.block_on(handle.append(record(11))).unwrap();
    assert_eq!(a.seq, 11);
    drop(handle);
    join.join().unwrap();
    let (checked, brk) = first_break(&path);
    assert_eq!(checked, 9);
    assert_eq!(
        brk,
        ChainBreak {
            seq: 10,
            reason: BreakReason::Missing { next_present: 11 }
        }
    );
}

#[test]
fn swapped_rows_are_reported_as_reordered() {
    let (_dir, path) = build();
    let conn = attacker(&path);
    // Swap every column but seq (hashes included) between seq 3 and seq 7.
    let cols = "received_at_ms, peer, session, direction, kind, raw, dialect, st, cn, mn, qn, \
                data_time, verdict, duplicate, findings, doc, hash";
    let set = cols
        .split(", ")
        .map(|c| format!("{c} = (SELECT {c} FROM stash s WHERE s.seq = 10 - records.seq)"))
        .collect::<Vec<_>>()
        .join(", ");
    conn.execute_batch(&format!(
        "CREATE TEMP TABLE stash AS SELECT * FROM records WHERE seq IN (3, 7);
         UPDATE records SET {set} WHERE seq IN (3, 7);"
    ))
    .unwrap();
    // Sanity: the rows really moved (raw of seq 3 is now record 7's).
    let raw3: Vec<u8> = conn
        .query_row("SELECT raw FROM records WHERE seq = 3", [], |r| r.get(0))
        .unwrap();
    assert_eq!(&raw3[..], &record(7).raw[..]);
    let (checked, brk) = first_break(&path);
    assert_eq!(checked, 2);
    assert_eq!(
        brk,
        ChainBreak {
            seq: 3,
            reason: BreakReason::Reordered { found_at: 7 }
        }
    );
}

#[test]
fn swapped_contents_with_hashes_left_in_place_are_reordered() {
    let (_dir, path) = build();
    let conn = attacker(&path);
    conn.execute_batch(
        "UPDATE records SET raw = CASE seq WHEN 2 THEN (SELECT raw FROM records WHERE seq = 8)
                                         ELSE (SELECT raw FROM records WHERE seq = 2) END,
                            peer = CASE seq WHEN 2 THEN (SELECT peer FROM records WHERE seq = 8)
                                         ELSE (SELECT peer FROM records WHERE seq = 2) END
         WHERE seq IN (2, 8);",
    )
    .unwrap();
    let (checked, brk) = first_break(&path);
    assert_eq!(checked, 1);
    assert_eq!(brk.seq, 2);
    // Only some columns moved, so no later row is the displaced original.
    assert_eq!(brk.reason, BreakReason::HashMismatch);

    // Swapping all hashed columns but leaving the hashes is recognised.
    let (_dir, path) = build();
    let conn = attacker(&path);
    let cols = "received_at_ms, peer, session, direction, kind, raw, dialect, st, cn, mn, qn, \
                data_time, verdict, duplicate, findings, doc";
    let set = cols
        .split(", ")
        .map(|c| format!("{c} = (SELECT {c} FROM stash s WHERE s.seq = 10 - records.seq)"))
        .collect::<Vec<_>>()
        .join(", ");
    conn.execute_batch(&format!(
        "CREATE TEMP TABLE stash AS SELECT * FROM records WHERE seq IN (2, 8);
         UPDATE records SET {set} WHERE seq IN (2, 8);"
    ))
    .unwrap();
    let (checked, brk) = first_break(&path);
    assert_eq!(checked, 1);
    assert_eq!(
        brk,
        ChainBreak {
            seq: 2,
            reason: BreakReason::Reordered { found_at: 8 }
        }
    );
}

#[test]
fn an_altered_head_is_detected() {
    let (_dir, path) = build();
    let conn = Connection::open(&path).unwrap();
    conn.execute("UPDATE meta SET last_hash = zeroblob(32)", [])
        .unwrap();
    let (checked, brk) = first_break(&path);
    assert_eq!(checked, N);
    assert_eq!(
        brk,
        ChainBreak {
            seq: N,
            reason: BreakReason::HeadMismatch
        }
    );
    conn.execute_batch("DROP TRIGGER meta_head_forward_only; UPDATE meta SET last_seq = 8")
        .unwrap();
    let (_, brk) = first_break(&path);
    assert_eq!(
        brk,
        ChainBreak {
            seq: 9,
            reason: BreakReason::BeyondHead { head_seq: 8 }
        }
    );
    conn.execute_batch("DROP TRIGGER meta_no_delete; DELETE FROM meta")
        .unwrap();
    let (_, brk) = first_break(&path);
    assert_eq!(brk.reason, BreakReason::HeadMissing);
}

/// The documented limit: whoever rewrites the tail *and* the head leaves a consistent
/// file. Only a head anchored elsewhere (published seq/hash) reveals it.
#[test]
fn truncating_and_rewriting_the_head_needs_an_external_anchor() {
    let (_dir, path) = build();
    let published = Reader::open(&path).unwrap().head().unwrap();
    let conn = attacker(&path);
    conn.execute_batch(
        "DROP TRIGGER meta_head_forward_only;
         DELETE FROM records WHERE seq > 8;
         UPDATE meta SET last_seq = 8, last_hash = (SELECT hash FROM records WHERE seq = 8);",
    )
    .unwrap();
    assert!(verify_chain(&path).unwrap().is_intact());
    let now = Reader::open(&path).unwrap().head().unwrap();
    assert!(
        now.last_seq < published.last_seq,
        "the external anchor shows the loss"
    );
}

#[test]
fn tampering_with_the_sqlite3_cli_is_detected() {
    let cli = Path::new("/usr/bin/sqlite3");
    if !cli.exists() {
        eprintln!("skipped: {} not present", cli.display());
        return;
    }
    let run = |path: &Path, sql: &str| {
        let out = Command::new(cli).arg(path).arg(sql).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The CLI is refused while the triggers are in place...
    let (_dir, path) = build();
    let out = Command::new(cli)
        .arg(&path)
        .arg("UPDATE records SET peer = 'x' WHERE seq = 2;")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("append-only"));
    assert!(verify_chain(&path).unwrap().is_intact());
    // ...and detected once they are dropped.
    run(
        &path,
        "DROP TRIGGER records_append_only_update; UPDATE records SET peer = 'x' WHERE seq = 2;",
    );
    assert_eq!(
        first_break(&path).1,
        ChainBreak {
            seq: 2,
            reason: BreakReason::HashMismatch
        }
    );
    let (_dir, path) = build();
    run(
        &path,
        "DROP TRIGGER records_append_only_delete; DELETE FROM records WHERE seq = 9;",
    );
    assert_eq!(
        first_break(&path).1,
        ChainBreak {
            seq: 9,
            reason: BreakReason::Missing { next_present: 10 }
        }
    );
}

/// An independent implementation of the chain format exactly as the module doc states
/// it, without using the crate: proves the documentation is enough to audit a file.
fn recompute_from_the_documentation(path: &Path) -> (u64, [u8; 32]) {
    use rusqlite::types::ValueRef;
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT seq, received_at_ms, peer, session, direction, kind, raw, dialect, st, cn, \
             mn, qn, data_time, verdict, duplicate, findings, doc, hash FROM records ORDER BY seq",
        )
        .unwrap();
    let mut rows = stmt.query([]).unwrap();
    let mut prev = [0u8; 32];
    let mut n = 0;
    while let Some(row) = rows.next().unwrap() {
        let mut input = prev.to_vec();
        for i in 0..17 {
            match row.get_ref(i).unwrap() {
                ValueRef::Null => input.extend_from_slice(&[0xff; 4]),
                ValueRef::Integer(v) => {
                    input.extend_from_slice(&[0, 0, 0, 8]);
                    input.extend_from_slice(&v.to_be_bytes());
                }
                ValueRef::Text(b) | ValueRef::Blob(b) => {
                    input.extend_from_slice(&(b.len() as u32).to_be_bytes());
                    input.extend_from_slice(b);
                }
                ValueRef::Real(_) => panic!("no REAL columns"),
            }
        }
        let h: [u8; 32] = Sha256::digest(&input).into();
        let stored: Vec<u8> = row.get(17).unwrap();
        assert_eq!(&stored[..], &h[..], "seq {}", n + 1);
        prev = h;
        n += 1;
    }
    (n, prev)
}

#[test]
fn the_documented_format_recomputes_the_chain() {
    let (_dir, path) = build();
    let (n, last) = recompute_from_the_documentation(&path);
    let head = Reader::open(&path).unwrap().head().unwrap();
    assert_eq!((n, last), (head.last_seq, head.last_hash));
}

const AUDIT_PY: &str = r#"
import hashlib, sqlite3, struct, sys
db = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True)
prev = bytes(32)
n = 0
for row in db.execute("SELECT seq, received_at_ms, peer, session, direction, kind, raw, dialect, "
                      "st, cn, mn, qn, data_time, verdict, duplicate, findings, doc, hash "
                      "FROM records ORDER BY seq"):
    h = hashlib.sha256(prev)
    for v in row[:17]:
        if v is None:
            h.update(b"\xff\xff\xff\xff")
        elif isinstance(v, int):
            h.update(struct.pack(">Iq", 8, v))
        else:
            b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
            h.update(struct.pack(">I", len(b)) + b)
    if h.digest() != row[17]:
        print("BROKEN", row[0]); sys.exit(1)
    prev = h.digest(); n += 1
seq, head = db.execute("SELECT last_seq, last_hash FROM meta").fetchone()
print(n, prev.hex(), seq, bytes(head).hex())
"#;

#[test]
fn an_auditor_can_recompute_the_chain_with_python() {
    let Ok(probe) = Command::new("python3").arg("--version").output() else {
        eprintln!("skipped: python3 not present");
        return;
    };
    if !probe.status.success() {
        eprintln!("skipped: python3 not usable");
        return;
    }
    let (_dir, path) = build();
    let out = Command::new("python3")
        .arg("-c")
        .arg(AUDIT_PY)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = Reader::open(&path).unwrap().head().unwrap();
    let hex = hex::encode(head.last_hash);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("{N} {hex} {N} {hex}")
    );
}
