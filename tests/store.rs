//! Integration tests of the frame log: real SQLite files in temp dirs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hj212_gateway::store::{
    Appended, Cursors, Direction, ExportDirection, ExportFormat, ExportOptions, Kind, NewRecord,
    Reader, RecordFilter, Store, StoreConfig, StoreError, StoreHandle, Verdict, WriterJoin, export,
    verify_chain,
};

fn frame(raw: impl Into<Bytes>, mn: &str, qn: &str, cn: &str) -> NewRecord {
    NewRecord {
        received_at_ms: 1_795_870_701_123,
        peer: "10.0.0.7:40001".into(),
        session: 7,
        direction: Direction::In,
        kind: Kind::Frame,
        raw: raw.into(),
        dialect: Some("2017".into()),
        st: Some("32".into()),
        cn: Some(cn.into()),
        mn: Some(mn.into()),
        qn: Some(qn.into()),
        data_time: Some("2026-11-28T21:05:00+08:00".into()),
        verdict: Verdict::Accepted,
        findings: "[]".into(),
        doc: r#"{"schema":"hj212.frame.v1","kind":"frame"}"#.into(),
        doc_stored: true,
    }
}

fn junk(raw: impl Into<Bytes>) -> NewRecord {
    NewRecord {
        kind: Kind::Junk,
        verdict: Verdict::Junk,
        dialect: None,
        st: None,
        cn: None,
        mn: None,
        qn: None,
        data_time: None,
        doc: String::new(),
        doc_stored: true,
        findings: r#"[{"code":"junk","severity":"warn","detail":"no frame header"}]"#.into(),
        ..frame(raw, "", "", "")
    }
}

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("log").join("frames.sqlite")
}

fn open(path: &Path) -> (StoreHandle, WriterJoin) {
    Store::open(StoreConfig::new(path)).expect("open store")
}

/// A store whose commit feed keeps only `records`, so tests cross its edge.
fn open_with_feed(path: &Path, records: usize) -> (StoreHandle, WriterJoin) {
    Store::open(StoreConfig {
        feed_records: records,
        ..StoreConfig::new(path)
    })
    .expect("open store")
}

async fn close(handle: StoreHandle, join: WriterJoin) {
    drop(handle);
    tokio::task::spawn_blocking(move || join.join())
        .await
        .unwrap()
        .expect("writer exits cleanly");
}

fn all_records(path: &Path) -> Vec<hj212_gateway::store::StoredRecord> {
    let reader = Reader::open(path).unwrap();
    reader
        .records(RecordFilter::default())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Bytes that are not UTF-8 and contain NUL, CR, LF.
fn nasty_raw(task: usize, i: usize) -> Vec<u8> {
    let mut v = format!("##t{task}-{i};").into_bytes();
    v.extend_from_slice(&[0x00, 0xff, 0xfe, 0x80, b'\r', b'\n', 0x00]);
    v.extend_from_slice(&(task as u32 * 31 + i as u32).to_le_bytes());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_dense_unique_and_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    let mut tasks = Vec::new();
    for t in 0..1000 {
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..20 {
                let raw = nasty_raw(t, i);
                let a = h.append(junk(raw.clone())).await.expect("append resolves");
                out.push((a.seq, raw));
            }
            out
        }));
    }
    let mut appended: HashMap<u64, Vec<u8>> = HashMap::new();
    for t in tasks {
        for (seq, raw) in t.await.unwrap() {
            assert!(
                appended.insert(seq, raw).is_none(),
                "seq {seq} handed out twice"
            );
        }
    }
    assert_eq!(appended.len(), 20_000);
    let seqs: HashSet<u64> = appended.keys().copied().collect();
    assert_eq!(
        seqs,
        (1..=20_000).collect::<HashSet<u64>>(),
        "seqs are dense from 1"
    );

    let stats = handle.stats();
    assert_eq!(stats.records_committed, 20_000);
    assert!(
        stats.commits < 20_000,
        "group commit should batch under load: {stats:?}"
    );
    close(handle, join).await;

    let stored = all_records(&path);
    assert_eq!(stored.len(), 20_000);
    for rec in &stored {
        assert_eq!(
            &rec.raw, &appended[&rec.seq],
            "raw bytes of seq {}",
            rec.seq
        );
    }
    let report = verify_chain(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records_checked, 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_record_is_visible_to_a_fresh_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    // Sequential: each ack is immediately checked from a brand-new connection.
    for i in 0..30 {
        let raw = nasty_raw(0, i);
        let a = handle.append(junk(raw.clone())).await.unwrap();
        let fresh = Reader::open(&path).unwrap();
        let got = fresh
            .get(a.seq)
            .unwrap()
            .expect("acked record is committed");
        assert_eq!(got.raw, raw);
        assert_eq!(fresh.last_seq().unwrap(), a.seq);
    }
    // Concurrent: every task checks its own ack while others are still writing.
    let mut tasks = Vec::new();
    for t in 1..=50 {
        let h = handle.clone();
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                let raw = nasty_raw(t, i);
                let a = h.append(junk(raw.clone())).await.unwrap();
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    let got = Reader::open(&path).unwrap().get(a.seq).unwrap();
                    assert_eq!(
                        got.map(|r| r.raw),
                        Some(raw),
                        "seq {} acked but not visible",
                        a.seq
                    );
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    close(handle, join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_batches_under_load_and_respects_batch_max() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let cfg = StoreConfig {
        batch_max: 64,
        ..StoreConfig::new(&path)
    };
    let (handle, join) = Store::open(cfg).unwrap();
    let mut tasks = Vec::new();
    for t in 0..200 {
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                h.append(junk(nasty_raw(t, i))).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = handle.stats();
    assert_eq!(stats.records_committed, 5_000);
    assert!(stats.largest_batch > 1, "{stats:?}");
    assert!(stats.largest_batch <= 64, "batch_max exceeded: {stats:?}");
    assert!(
        stats.commits * 4 < stats.records_committed,
        "expected batches averaging more than 4 records: {stats:?}"
    );
    close(handle, join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_record_is_not_delayed_by_batch_delay() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let cfg = StoreConfig {
        batch_delay: Duration::from_secs(2),
        ..StoreConfig::new(&path)
    };
    let (handle, join) = Store::open(cfg).unwrap();
    for i in 0..3 {
        let started = Instant::now();
        handle.append(junk(nasty_raw(0, i))).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a lone record waited {:?}",
            started.elapsed()
        );
    }
    assert_eq!(handle.stats().commits, 3);
    close(handle, join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_many_is_one_ordered_unit() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    let recs: Vec<NewRecord> = (0..10).map(|i| junk(nasty_raw(9, i))).collect();
    let got = handle.append_many(recs.clone()).await.unwrap();
    assert_eq!(
        got.iter().map(|a| a.seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert!(handle.append_many(Vec::new()).await.unwrap().is_empty());
    assert_eq!(handle.stats().commits, 1);
    close(handle, join).await;
    let stored = all_records(&path);
    for (r, s) in recs.iter().zip(&stored) {
        assert_eq!(&r.raw[..], &s.raw[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_retransmitted_inbound_frames_with_a_qn() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    let dup = |a: Appended| a.duplicate;
    let mn = "010000A8900016F000169DC0";
    let qn = "20160801085857223";
    assert!(!dup(handle
        .append(frame("##a", mn, qn, "2011"))
        .await
        .unwrap()));
    assert!(dup(handle
        .append(frame("##b", mn, qn, "2011"))
        .await
        .unwrap()));
    // Another CN, MN or QN is a different request.
    assert!(!dup(handle
        .append(frame("##c", mn, qn, "2051"))
        .await
        .unwrap()));
    assert!(!dup(handle
        .append(frame("##d", "OTHER", qn, "2011"))
        .await
        .unwrap()));
    assert!(!dup(handle
        .append(frame("##e", mn, "20160801085857224", "2011"))
        .await
        .unwrap()));
    // Outbound records are never duplicates and do not make inbound ones duplicates.
    let out = |qn: &str| NewRecord {
        direction: Direction::Out,
        ..frame("##o", mn, qn, "9014")
    };
    assert!(!dup(handle.append(out("Q1")).await.unwrap()));
    assert!(!dup(handle.append(out("Q1")).await.unwrap()));
    assert!(!dup(handle
        .append(frame("##f", mn, "Q1", "9014"))
        .await
        .unwrap()));
    // No QN (2005 style) or an empty QN: cannot be recognised as a retransmission.
    let no_qn = || NewRecord {
        qn: None,
        ..frame("##g", mn, "", "2011")
    };
    assert!(!dup(handle.append(no_qn()).await.unwrap()));
    assert!(!dup(handle.append(no_qn()).await.unwrap()));
    assert!(!dup(handle
        .append(frame("##h", mn, "", "2011"))
        .await
        .unwrap()));
    assert!(!dup(handle
        .append(frame("##h", mn, "", "2011"))
        .await
        .unwrap()));
    // Junk is never a duplicate.
    let j = || NewRecord {
        qn: Some(qn.into()),
        mn: Some(mn.into()),
        cn: Some("2011".into()),
        ..junk("xx")
    };
    assert!(!dup(handle.append(j()).await.unwrap()));
    // A missing MN compares equal to a missing MN.
    let no_mn = || NewRecord {
        mn: None,
        ..frame("##i", "", "Q9", "2011")
    };
    assert!(!dup(handle.append(no_mn()).await.unwrap()));
    assert!(dup(handle.append(no_mn()).await.unwrap()));
    // Within one batch, the second of two equal frames is the duplicate.
    let both = handle
        .append_many(vec![
            frame("##j", mn, "Q2", "2011"),
            frame("##k", mn, "Q2", "2011"),
        ])
        .await
        .unwrap();
    assert_eq!((both[0].duplicate, both[1].duplicate), (false, true));
    close(handle, join).await;

    // The flag is stored, and detection survives a restart.
    let stored = all_records(&path);
    assert!(stored[1].duplicate && !stored[0].duplicate);
    let (handle, join) = open(&path);
    assert!(dup(handle
        .append(frame("##l", mn, qn, "2011"))
        .await
        .unwrap()));
    close(handle, join).await;
    assert!(verify_chain(&path).unwrap().is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_handles_mid_stream_commits_the_queue_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let mut total_acked = HashMap::new();
    for round in 0..3 {
        let (handle, join) = open(&path);
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for t in 0..40 {
            let h = handle.clone();
            let ack_tx = ack_tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let raw = nasty_raw(round * 1000 + t, i);
                    let a = h.append(junk(raw.clone())).await.unwrap();
                    ack_tx.send((a.seq, raw)).unwrap();
                }
            }));
        }
        drop(ack_tx);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Mid-stream: abort the producers (some appends are queued, some in flight)
        // and drop every handle without calling shutdown().
        for t in &tasks {
            t.abort();
        }
        drop(handle);
        for t in tasks {
            let _ = t.await;
        }
        tokio::task::spawn_blocking(move || join.join())
            .await
            .unwrap()
            .unwrap();
        while let Some((seq, raw)) = ack_rx.recv().await {
            assert!(total_acked.insert(seq, raw).is_none());
        }
        let report = verify_chain(&path).unwrap();
        assert!(report.is_intact(), "round {round}: {report:?}");
        let stored = all_records(&path);
        // Everything acked is stored, byte-exact; seqs stay dense across restarts.
        assert_eq!(stored.len() as u64, report.records_checked);
        assert_eq!(
            stored.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=stored.len() as u64).collect::<Vec<_>>()
        );
        let by_seq: HashMap<u64, &Vec<u8>> = stored.iter().map(|r| (r.seq, &r.raw)).collect();
        for (seq, raw) in &total_acked {
            assert_eq!(by_seq.get(seq), Some(&raw), "acked seq {seq} lost");
        }
    }
    assert!(
        total_acked.len() > 100,
        "the test should have appended something"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_commits_what_is_queued_and_refuses_later_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    let first = handle.append(junk("before")).await.unwrap();
    handle.shutdown().await;
    let err = handle.append(junk("after")).await.unwrap_err();
    assert!(matches!(err, StoreError::Closed), "{err:?}");
    let h2 = handle.clone();
    drop(handle);
    let stats = tokio::task::spawn_blocking(move || join.join())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stats.records_committed, 1);
    assert!(matches!(
        h2.append(junk("late")).await,
        Err(StoreError::Closed)
    ));
    assert_eq!(Reader::open(&path).unwrap().last_seq().unwrap(), first.seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_acks_nothing_and_the_writer_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    handle.append(junk("one")).await.unwrap();
    // Make the next transaction fail inside SQLite: a trigger refusing one peer.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER poison BEFORE INSERT ON records WHEN NEW.peer = 'poison' \
         BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
    )
    .unwrap();
    let poison = NewRecord {
        peer: "poison".into(),
        ..junk("bad")
    };
    let err = handle
        .append_many(vec![junk("innocent"), poison])
        .await
        .unwrap_err();
    match &err {
        StoreError::BatchFailed { records, op, .. } => {
            assert_eq!((*records, *op), (2, "insert a record"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        Reader::open(&path).unwrap().last_seq().unwrap(),
        1,
        "nothing of the batch committed"
    );
    conn.execute_batch("DROP TRIGGER poison").unwrap();
    let next = handle.append(junk("two")).await.unwrap();
    assert_eq!(next.seq, 2, "the failed batch consumed no seq");
    let stats = handle.stats();
    assert_eq!((stats.failed_batches, stats.failed_records), (1, 2));
    close(handle, join).await;
    assert!(verify_chain(&path).unwrap().is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_are_refused_before_queueing() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    let cases = [
        (junk(""), "raw"),
        (
            NewRecord {
                findings: "{}".into(),
                ..junk("x")
            },
            "findings",
        ),
        (
            NewRecord {
                doc: "[1]".into(),
                doc_stored: true,
                ..junk("x")
            },
            "doc",
        ),
        (
            NewRecord {
                doc: "{\"a\":".into(),
                doc_stored: true,
                ..junk("x")
            },
            "doc",
        ),
    ];
    for (rec, field) in cases {
        match handle.append(rec).await {
            Err(StoreError::InvalidRecord { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected InvalidRecord({field}), got {other:?}"),
        }
    }
    close(handle, join).await;
    assert_eq!(Reader::open(&path).unwrap().last_seq().unwrap(), 0);
}

#[test]
fn config_and_schema_version_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let bad = StoreConfig {
        batch_max: 0,
        ..StoreConfig::new(&path)
    };
    assert!(matches!(
        Store::open(bad),
        Err(StoreError::InvalidConfig {
            field: "batch_max",
            ..
        })
    ));
    // A plain SQLite file that no writer initialised.
    let other = dir.path().join("other.sqlite");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    assert!(matches!(
        Reader::open(&other),
        Err(StoreError::NotInitialized { .. })
    ));
    // A file from a newer build.
    let (h, j) = open(&path);
    drop(h);
    j.join().unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    assert!(matches!(
        Store::open(StoreConfig::new(&path)),
        // `supported` is this build's version, whatever migrations it has.
        Err(StoreError::SchemaTooNew {
            found: 99,
            supported
        }) if (7..99).contains(&supported)
    ));
    assert!(matches!(
        Reader::open(&path),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_pages_filters_and_reports_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    for i in 0..1500 {
        let rec = if i % 3 == 0 {
            NewRecord {
                direction: Direction::Out,
                ..frame(format!("out{i}"), "M1", &format!("Q{i}"), "9014")
            }
        } else {
            frame(
                format!("in{i}"),
                if i % 2 == 0 { "M2" } else { "M1" },
                &format!("Q{i}"),
                "2011",
            )
        };
        handle.append(rec).await.unwrap();
    }
    let reader = Reader::open(&path).unwrap();
    assert_eq!(reader.last_seq().unwrap(), 1500);
    let head = reader.head().unwrap();
    assert_eq!(head.last_seq, 1500);
    assert_eq!(head.last_hash, reader.get(1500).unwrap().unwrap().hash);
    assert!(reader.get(1501).unwrap().is_none());

    let page = reader.read_from(100, 7).unwrap();
    assert_eq!(
        page.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (101..=107).collect::<Vec<_>>()
    );
    assert!(reader.read_from(1500, 10).unwrap().is_empty());

    let outs: Vec<u64> = reader
        .records(RecordFilter {
            direction: Some(Direction::Out),
            ..Default::default()
        })
        .unwrap()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(outs, (1..=1500).step_by(3).collect::<Vec<u64>>());
    let m2_after_1000 = reader
        .records(RecordFilter {
            after_seq: 1000,
            until_seq: Some(1200),
            direction: Some(Direction::In),
            mn: Some("M2".into()),
            ..Default::default()
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect::<Vec<_>>();
    assert!(!m2_after_1000.is_empty());
    for r in &m2_after_1000 {
        let i = r.seq - 1;
        assert!(
            r.seq > 1000 && r.seq <= 1200 && i % 3 != 0 && i % 2 == 0,
            "{}",
            r.seq
        );
        assert_eq!(r.mn.as_deref(), Some("M2"));
    }
    // The iterator's end is fixed when it is created.
    let it = reader.records(RecordFilter::default()).unwrap();
    handle.append(junk("later")).await.unwrap();
    assert_eq!(it.count(), 1500);
    close(handle, join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_are_kept_outside_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    for i in 0..5 {
        handle.append(junk(format!("r{i}"))).await.unwrap();
    }
    let cursors = Cursors::open(&path).unwrap();
    assert_eq!(cursors.get_cursor("mqtt").unwrap(), None);
    cursors.set_cursor("mqtt", 3).unwrap();
    cursors.set_cursor("upstream:a", 5).unwrap();
    assert_eq!(cursors.get_cursor("mqtt").unwrap(), Some(3));
    cursors.set_cursor("mqtt", 1).unwrap(); // replay moves backwards
    assert_eq!(cursors.get_cursor("mqtt").unwrap(), Some(1));
    match cursors.set_cursor("mqtt", 6) {
        Err(StoreError::CursorAhead {
            seq: 6, head: 5, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(cursors.get_cursor("mqtt").unwrap(), Some(1));
    // Cursor writes interleave with appends and do not disturb the chain.
    let writer = {
        let h = handle.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                h.append(junk(format!("w{i}"))).await.unwrap();
            }
        })
    };
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        let c = Cursors::open(&p).unwrap();
        let r = Reader::open(&p).unwrap();
        for _ in 0..100 {
            let last = r.last_seq().unwrap();
            c.set_cursor("alarm", last).unwrap();
            assert_eq!(c.get_cursor("alarm").unwrap(), Some(last));
        }
    })
    .await
    .unwrap();
    writer.await.unwrap();
    close(handle, join).await;
    let report = verify_chain(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records_checked, 305);
    assert!(
        Cursors::open(&path)
            .unwrap()
            .get_cursor("alarm")
            .unwrap()
            .is_some()
    );
}

fn jsonl_lines(path: &Path, direction: ExportDirection) -> (u64, Vec<serde_json::Value>) {
    let mut out = Vec::new();
    let n = export(
        &ExportOptions {
            db: path.to_path_buf(),
            format: ExportFormat::Jsonl,
            direction,
        },
        &mut out,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'));
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (n, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_raw_is_the_concatenation_of_appended_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    let mut expected_all = Vec::new();
    let mut expected_in = Vec::new();
    for i in 0..700 {
        let raw = nasty_raw(i, i);
        let rec = if i % 4 == 0 {
            NewRecord {
                direction: Direction::Out,
                ..junk(raw.clone())
            }
        } else {
            expected_in.extend_from_slice(&raw);
            junk(raw.clone())
        };
        expected_all.extend_from_slice(&raw);
        handle.append(rec).await.unwrap();
    }
    close(handle, join).await;
    let run = |direction| {
        let mut out = Vec::new();
        let n = export(
            &ExportOptions {
                db: path.clone(),
                format: ExportFormat::Raw,
                direction,
            },
            &mut out,
        )
        .unwrap();
        (n, out)
    };
    assert_eq!(run(ExportDirection::All), (700, expected_all));
    assert_eq!(run(ExportDirection::In), (525, expected_in));
    assert_eq!(run(ExportDirection::Out).0, 175);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_jsonl_adds_the_record_fields_and_keeps_exact_digits() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    let raw = "##0101QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;CP=&&RtdInterval=30&&1C80\r\n";
    let doc = r#"{"schema":"hj212.frame.v1","kind":"frame","cp":{"w01018":{"Rtd":12.50,"big":123456789012345678901234567890.000100,"neg":-0.0}},"crc_ok":true}"#;
    let rec = NewRecord {
        doc: doc.into(),
        doc_stored: true,
        ..frame(raw, "010000A8900016F000169DC0", "20160801085857223", "1062")
    };
    handle.append(rec.clone()).await.unwrap();
    handle.append(rec).await.unwrap(); // retransmission
    handle
        .append(NewRecord {
            direction: Direction::Out,
            session: u64::MAX,
            received_at_ms: 0,
            ..junk(vec![0xff, 0x00, b'#'])
        })
        .await
        .unwrap();
    close(handle, join).await;

    let mut out = Vec::new();
    export(
        &ExportOptions {
            db: path.clone(),
            format: ExportFormat::Jsonl,
            direction: ExportDirection::All,
        },
        &mut out,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    let first = text.lines().next().unwrap();
    // Exact digits and the doc's field order survive; the added fields follow in order.
    assert!(
        first.starts_with(
            r###"{"schema":"hj212.frame.v1","kind":"frame","cp":{"w01018":{"Rtd":12.50,"big":123456789012345678901234567890.000100,"neg":-0.0}},"crc_ok":true,"raw":"##0101QN="###
        ),
        "{first}"
    );
    assert!(
        first.ends_with(
            r###"1C80\r\n","raw_b64":"IyMwMTAxUU49MjAxNjA4MDEwODU4NTcyMjM7U1Q9MzI7Q049MTA2MjtQVz0xMDAwMDA7TU49MDEwMDAwQTg5MDAwMTZGMDAwMTY5REMwO0ZsYWc9NTtDUD0mJlJ0ZEludGVydmFsPTMwJiYxQzgwDQo=","seq":1,"received_at":"2026-11-28T12:58:21.123Z","peer":"10.0.0.7:40001","session":7,"direction":"in","verdict":"accepted","duplicate":false}"###
        ),
        "{first}"
    );

    let (n, lines) = jsonl_lines(&path, ExportDirection::All);
    assert_eq!((n, lines.len()), (3, 3));
    assert_eq!(lines[0]["raw"], raw);
    assert_eq!(lines[1]["duplicate"], true);
    assert_eq!(lines[1]["seq"], 2);
    let j = &lines[2];
    assert_eq!(j["schema"], "hj212.frame.v1");
    assert_eq!(j["kind"], "junk");
    assert!(j.get("raw").is_none(), "non-UTF-8 bytes have no raw text");
    assert_eq!(j["raw_b64"], "/wAj");
    assert_eq!(j["session"], u64::MAX);
    assert_eq!(j["received_at"], "1970-01-01T00:00:00.000Z");
    assert_eq!(j["direction"], "out");
    assert_eq!(j["verdict"], "junk");
    let (n_out, _) = jsonl_lines(&path, ExportDirection::Out);
    assert_eq!(n_out, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_runs_while_the_writer_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    for i in 0..2000 {
        handle.append(junk(format!("pre{i};"))).await.unwrap();
    }
    let producer = {
        let h = handle.clone();
        tokio::spawn(async move {
            for i in 0..3000 {
                h.append(junk(format!("live{i};"))).await.unwrap();
            }
        })
    };
    let p = path.clone();
    let exported = tokio::task::spawn_blocking(move || {
        let mut runs = Vec::new();
        for _ in 0..5 {
            let mut out = Vec::new();
            let n = export(
                &ExportOptions {
                    db: p.clone(),
                    format: ExportFormat::Raw,
                    direction: ExportDirection::All,
                },
                &mut out,
            )
            .unwrap();
            runs.push((n, out));
        }
        runs
    })
    .await
    .unwrap();
    producer.await.unwrap();
    close(handle, join).await;
    let mut full = Vec::new();
    for r in all_records(&path) {
        full.extend_from_slice(&r.raw);
    }
    for (n, out) in exported {
        assert!(n >= 2000);
        // Each export is a prefix of the final log: a consistent cut, in order.
        assert_eq!(&full[..out.len()], &out[..]);
    }
}

/// Child half of `acked_records_survive_sigkill`: appends forever from many tasks and
/// prints every acknowledgement. Does nothing unless started by the parent test.
#[test]
#[ignore = "started as a child process by acked_records_survive_sigkill"]
fn crash_child_process() {
    let Some(path) = std::env::var_os("STORE_CRASH_DB") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let (handle, _join) = Store::open(StoreConfig::new(PathBuf::from(path))).unwrap();
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for t in 0..20 {
            let h = handle.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let raw = nasty_raw(t, i);
                    let a = h.append(junk(raw.clone())).await.unwrap();
                    println!("ACK {} {}", a.seq, hex::encode(&raw));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn acked_records_survive_sigkill() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["crash_child_process", "--exact", "--ignored", "--nocapture"])
        .env("STORE_CRASH_DB", &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut acked: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut lines = stdout.lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let Some(rest) = line.strip_prefix("ACK ") else {
            continue;
        };
        let (seq, raw) = rest.split_once(' ').unwrap();
        acked.insert(seq.parse().unwrap(), hex::decode(raw).unwrap());
        if acked.len() == 2_000 {
            child.kill().unwrap(); // SIGKILL: no destructors, no shutdown, no checkpoint
            break;
        }
    }
    // Acks already written to the pipe before the kill count too.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some((seq, raw)) = line.strip_prefix("ACK ").and_then(|r| r.split_once(' ')) {
            acked.insert(seq.parse().unwrap(), hex::decode(raw).unwrap());
        }
    }
    child.wait().unwrap();
    assert!(acked.len() >= 2_000);

    // The log as the killed process left it (WAL not checkpointed).
    let report = verify_chain(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    let stored: HashMap<u64, Vec<u8>> = all_records(&path)
        .into_iter()
        .map(|r| (r.seq, r.raw))
        .collect();
    for (seq, raw) in &acked {
        assert_eq!(
            stored.get(seq),
            Some(raw),
            "acked seq {seq} lost by the crash"
        );
    }
    // A new writer continues the chain after the crash.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (handle, join) = open(&path);
    let a = rt.block_on(handle.append(junk("after the crash"))).unwrap();
    assert_eq!(a.seq, stored.len() as u64 + 1);
    drop(handle);
    join.join().unwrap();
    let report = verify_chain(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records_checked, stored.len() as u64 + 1);
}

/// The writer's commit feed hands consumers exactly what SQLite holds (every column,
/// the duplicate flag and the chain hash), and a consumer behind the bounded ring
/// falls back to SQLite without a gap or a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_feed_serves_exactly_what_the_log_holds() {
    use hj212_gateway::store::FeedReader;
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (h, join) = open_with_feed(&path, 16);
    let mut committed = h.feed().subscribe();
    // Frames, a retransmission (duplicate = true), junk; one append and a group.
    h.append(frame(&b"##a"[..], "MN1", "Q1", "2011"))
        .await
        .unwrap();
    h.append_many(vec![
        frame(&b"##b"[..], "MN1", "Q1", "2011"),
        junk(nasty_raw(1, 2)),
        frame(&b"##c"[..], "MN2", "Q2", "2051"),
    ])
    .await
    .unwrap();
    assert_eq!(
        *committed.borrow_and_update(),
        4,
        "subscribers see the head"
    );
    let feed = FeedReader::new(h.feed(), Reader::open(&path).unwrap());
    let sqlite = Reader::open(&path).unwrap();
    for after in 0..=4 {
        let from_feed: Vec<_> = feed
            .read_from(after, 100)
            .unwrap()
            .into_iter()
            .map(|r| (*r).clone())
            .collect();
        assert_eq!(
            from_feed,
            sqlite.read_from(after, 100).unwrap(),
            "after {after}"
        );
    }
    assert!(h.feed().read_after(0, 100).is_some(), "served from memory");
    assert!(h.feed().read_after(1, 100).unwrap()[0].duplicate);

    // 40 more records: the ring (16) now starts at 29, so a cursor at 3 is behind it.
    for i in 0..40 {
        h.append(frame(nasty_raw(2, i), "MN3", &format!("Q{i}"), "2011"))
            .await
            .unwrap();
    }
    assert!(h.feed().read_after(3, 10).is_none());
    assert_eq!(h.feed().read_after(28, 100).unwrap()[0].seq, 29);
    // A consumer paging with a small limit walks SQLite, then memory.
    let mut after = 0;
    let mut walked = Vec::new();
    loop {
        let page = feed.read_from(after, 7).unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        walked.extend(page.into_iter().map(|r| (*r).clone()));
    }
    assert_eq!(walked, all_records(&path));
    assert_eq!(walked.len(), 44);
    close(h, join).await;
}

/// The MQTT publisher's backlog read: only inbound frames are loaded, and the
/// position still moves over stretches of acks and junk up to the head, from
/// SQLite and from the feed alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_frame_reads_skip_replies_and_cover_every_seq() {
    use hj212_gateway::store::FeedReader;
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (h, join) = open_with_feed(&path, 8);
    let ack = |i: usize| NewRecord {
        direction: Direction::Out,
        qn: Some(format!("A{i}")),
        ..frame(
            format!("##ack{i}").into_bytes(),
            "MN1",
            &format!("A{i}"),
            "9014",
        )
    };
    // seq 1..=30: frame, ack, frame, ack...; then 31..=33 junk and acks only.
    for i in 0..15 {
        h.append_many(vec![
            frame(nasty_raw(3, i), "MN1", &format!("Q{i}"), "2011"),
            ack(i),
        ])
        .await
        .unwrap();
    }
    h.append_many(vec![junk(nasty_raw(4, 0)), ack(100), ack(101)])
        .await
        .unwrap();
    let inbound: Vec<u64> = all_records(&path)
        .into_iter()
        .filter(|r| r.direction == Direction::In && r.kind == Kind::Frame)
        .map(|r| r.seq)
        .collect();
    assert_eq!(inbound, (1..=29).step_by(2).collect::<Vec<_>>());

    let sqlite = Reader::open(&path).unwrap();
    // A span of 4 covers exactly 4 seqs, 2 of them frames.
    let (recs, through) = sqlite.read_inbound_frames(0, 4).unwrap();
    assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3]);
    assert_eq!(through, 4);
    assert_eq!(recs[0].raw, nasty_raw(3, 0), "whole records, byte-exact");
    // Near the head: covers up to the head, which is an ack; then nothing.
    let (recs, through) = sqlite.read_inbound_frames(27, 100).unwrap();
    assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [29]);
    assert_eq!(through, 33);
    assert_eq!(sqlite.read_inbound_frames(29, 100).unwrap(), (vec![], 33));
    assert_eq!(sqlite.read_inbound_frames(33, 100).unwrap(), (vec![], 33));

    // Walking with a small span through SQLite and then the ring (which holds
    // 26..=33) visits every inbound frame once and ends on the head.
    let feed = FeedReader::new(h.feed(), Reader::open(&path).unwrap());
    assert!(
        h.feed().read_after(3, 4).is_none(),
        "the start is behind the ring"
    );
    let (mut after, mut seen) = (0, Vec::new());
    loop {
        let (recs, through) = feed.read_inbound_frames(after, 5).unwrap();
        assert!(through >= after && through - after <= 5);
        seen.extend(
            recs.iter()
                .filter(|r| r.direction == Direction::In && r.kind == Kind::Frame)
                .map(|r| r.seq),
        );
        if through - after < 5 {
            after = through;
            break;
        }
        after = through;
    }
    assert_eq!(seen, inbound);
    assert_eq!(after, 33);
    close(h, join).await;
}

/// Salt-1 of the WAL header (bytes 16..20): SQLite adds one to it each time the WAL
/// starts over from its beginning.
fn wal_salt(path: &Path) -> Option<u32> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let bytes = std::fs::read(PathBuf::from(wal)).ok()?;
    Some(u32::from_be_bytes(bytes.get(16..20)?.try_into().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_starts_over_while_appends_never_pause() {
    // The writer commits back to back here, so a background checkpoint pass never
    // ends with the WAL fully copied; without the writer finishing the pass the WAL
    // only starts over at the 256 MiB auto-checkpoint backstop.
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (handle, join) = open(&path);
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < until {
                let mut raw = nasty_raw(t, i);
                raw.resize(2_000, b'x');
                h.append(junk(raw)).await.unwrap();
                i += 1;
            }
        }));
    }
    let mut salts = HashSet::new();
    let mut wal_pages = 0;
    while Instant::now() < until {
        salts.extend(wal_salt(&path));
        wal_pages = wal_pages.max(handle.stats().wal_pages);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = handle.stats();
    close(handle, join).await;
    assert!(
        salts.len() >= 4,
        "the WAL started over {} times in 3 s of appends ({} commits)",
        salts.len().saturating_sub(1),
        stats.commits
    );
    assert!(wal_pages > 0, "the checkpointer reports the WAL's size");
}

/// An accepted frame is kept as its raw bytes, header columns and findings, with
/// an empty `doc` column: readers rebuild the document, which equals the one the
/// session handed the commit feed, and the chain and the audit figures still hold.
/// A rejected frame keeps its document (audits read it with SQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_frames_are_kept_without_their_document_and_read_back_with_it() {
    use hj212_gateway::ingest::frame_record;
    use hj212_gateway::protocol::{Options, decode};
    let good: &[u8] = b"##0295QN=20240601085857223;ST=31;CN=2011;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&DataTime=20240601085857;a21026-Rtd=12.5,a21026-ZsRtd=15.1,a21026-Flag=N;a21002-Rtd=35.2,a21002-ZsRtd=42.6,a21002-Flag=N;a34013-Rtd=3.1,a34013-Flag=N;a19001-Rtd=9.8,a19001-Flag=N;a00000-Rtd=28.15,a00000-Flag=N&&3E80\r\n";
    let mut bad = good.to_vec();
    let n = bad.len();
    bad[n - 6..n - 2].copy_from_slice(b"0000");
    let now = chrono::DateTime::from_timestamp(1_717_203_600, 0).unwrap();
    let opts = Options::new(now);
    let accepted = frame_record(
        &decode(Bytes::from_static(good), &opts, &()),
        "10.0.0.7:40001",
        7,
        Direction::In,
        1_717_203_600_000,
        true,
    );
    let rejected = frame_record(
        &decode(Bytes::from(bad), &opts, &()),
        "10.0.0.7:40001",
        7,
        Direction::In,
        1_717_203_600_001,
        false,
    );
    assert!(!accepted.doc_stored && rejected.doc_stored);
    assert!(
        accepted
            .doc
            .contains(r#""a00000":{"Rtd":28.15,"Flag":"N"}"#)
    );

    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (h, join) = open_with_feed(&path, 16);
    h.append_many(vec![accepted.clone(), rejected.clone()])
        .await
        .unwrap();
    let from_feed = h.feed().read_after(0, 10).expect("in the feed");
    let from_file = all_records(&path);
    assert_eq!(from_file.len(), 2);
    for (f, s) in from_feed.iter().zip(&from_file) {
        assert_eq!(**f, *s, "the feed and the file agree on record {}", s.seq);
    }
    assert_eq!(
        from_file[0].document(),
        accepted.doc,
        "rebuilt byte for byte"
    );
    assert_eq!(from_file[0].stored_doc(), "");
    assert!(!from_file[0].doc_stored);
    assert_eq!(from_file[1].document(), rejected.doc);
    assert_eq!(from_file[1].stored_doc(), rejected.doc);
    assert!(from_file[1].doc_stored);
    close(h, join).await;

    let conn = rusqlite::Connection::open(&path).unwrap();
    let docs: Vec<String> = conn
        .prepare("SELECT doc FROM records ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(docs, vec![String::new(), rejected.doc.clone()]);
    assert!(verify_chain(&path).unwrap().is_intact());
    let stats = hj212_gateway::store::device_stats(&path, 0).unwrap();
    assert_eq!(stats.len(), 1);
    let mut variants = stats[0].crc_variants.clone();
    variants.sort();
    assert_eq!(
        variants,
        vec![("hj212".to_string(), 1), ("unknown".to_string(), 1)],
        "the kept-without-document frame counts by its raw bytes"
    );
}
