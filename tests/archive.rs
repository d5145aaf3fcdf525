//! Sealed archives and retention against real files and the real binary: every
//! reader gives the same answers before and after a seal, a SIGKILL mid-seal loses
//! and duplicates nothing, retention leaves a tombstone `verify` accepts while a
//! hand-deleted archive is a break, and archives are at least 5x smaller than the
//! live log for simulator traffic.

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hj212_gateway::store::archive::{self, ArchivePolicy, ArchiveState};
use hj212_gateway::store::{
    Direction, Kind, NewRecord, Reader, RecordFilter, Store, StoreConfig, SyncMode, Verdict,
    verify_chain,
};

const DAY_MS: i64 = 86_400_000;
/// 2024-01-01T00:00:00Z: the generated logs are in the past, so every period is complete.
const BASE_MS: i64 = 1_704_067_200_000;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run the binary")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        text(o),
        String::from_utf8_lossy(&o.stderr)
    );
    text(o)
}

/// A 2011 real-time or 2051 minute upload of device `d` at `ms`, as the gateway logs
/// it: the raw frame, its decoded document, and then the 9014 ack it sent.
fn traffic(d: u32, n: u64, ms: i64) -> [NewRecord; 2] {
    let minute = n % 10 == 9;
    let cn = if minute { "2051" } else { "2011" };
    let mn = format!("8888800000{d:04}");
    let qn = format!("{}", 20240101000000000u64 + n * 1000 + d as u64);
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap();
    let dt = t.format("%Y%m%d%H%M%S").to_string();
    let iso = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let v = |k: u64| 10.0 + ((n * 7919 + d as u64 * 104_729 + k * 31) % 1000) as f64 / 37.0;
    let factors: Vec<(String, f64)> = ["a01012", "a01011", "a34013", "a21026", "a21002", "a01013"]
        .iter()
        .enumerate()
        .map(|(k, f)| (f.to_string(), v(k as u64)))
        .collect();
    let cp: String = factors
        .iter()
        .map(|(f, x)| {
            if minute {
                format!(
                    "{f}-Avg={x:.3},{f}-Min={:.3},{f}-Max={:.3},{f}-Flag=N",
                    x - 1.0,
                    x + 1.0
                )
            } else {
                format!("{f}-Rtd={x:.3},{f}-Flag=N")
            }
        })
        .collect::<Vec<_>>()
        .join(";");
    let body = format!("QN={qn};ST=22;CN={cn};PW=123456;MN={mn};Flag=5;CP=&&DataTime={dt};{cp}&&");
    let raw = hj212_gateway::protocol::reply::envelope(body.as_bytes()).to_vec();
    let doc_cp: String = factors
        .iter()
        .map(|(f, x)| {
            if minute {
                format!(
                    r#""{f}":{{"Avg":{x:.3},"Min":{:.3},"Max":{:.3},"Flag":"N"}}"#,
                    x - 1.0,
                    x + 1.0
                )
            } else {
                format!(r#""{f}":{{"Rtd":{x:.3},"Flag":"N"}}"#)
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let doc = format!(
        r#"{{"schema":"hj212.frame.v1","kind":"frame","dialect":"2017","qn":"{qn}","st":"22","cn":"{cn}","mn":"{mn}","pw":"123456","flag":5,"crc":{{"declared":"ABCD","variant":"hj212"}},"cp":{{"DataTime":"{iso}",{doc_cp}}}}}"#
    );
    let peer = format!("10.0.{}.{}:{}", d / 250, d % 250 + 1, 40_000 + d);
    let ack_body = format!("QN={qn};ST=91;CN=9014;PW=123456;MN={mn};Flag=4;CP=&&&&");
    let ack = hj212_gateway::protocol::reply::envelope(ack_body.as_bytes()).to_vec();
    [
        NewRecord {
            received_at_ms: ms,
            peer: peer.clone(),
            session: d as u64 + 1,
            direction: Direction::In,
            kind: Kind::Frame,
            raw: raw.into(),
            dialect: Some("2017".into()),
            st: Some("22".into()),
            cn: Some(cn.into()),
            mn: Some(mn.clone()),
            qn: Some(qn.clone()),
            data_time: Some(iso),
            verdict: Verdict::Accepted,
            findings: "[]".into(),
            // Half the devices' uploads as ingest keeps them now: without their
            // document, which readers rebuild from `raw`.
            doc: if d % 2 == 0 { doc } else { String::new() },
            doc_stored: d % 2 == 0,
        },
        NewRecord {
            received_at_ms: ms + 2,
            peer,
            session: d as u64 + 1,
            direction: Direction::Out,
            kind: Kind::Frame,
            raw: ack.into(),
            dialect: Some("2017".into()),
            st: Some("91".into()),
            cn: Some("9014".into()),
            mn: Some(mn),
            qn: Some(qn),
            data_time: None,
            verdict: Verdict::Accepted,
            findings: "[]".into(),
            doc: String::new(),
            doc_stored: true,
        },
    ]
}

/// A log of `devices` devices uploading every `every_ms` for `span_ms` from [`BASE_MS`].
fn make_log(db: &Path, devices: u32, every_ms: i64, span_ms: i64) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (h, join) = Store::open(StoreConfig {
            sync: SyncMode::Off,
            feed_records: 0,
            ..StoreConfig::new(db)
        })
        .unwrap();
        let mut n = 0u64;
        let mut ms = BASE_MS;
        while ms < BASE_MS + span_ms {
            let mut batch = Vec::new();
            for d in 0..devices {
                batch.extend(traffic(d, n, ms + d as i64 * 7));
            }
            h.append_many(batch).await.unwrap();
            n += 1;
            ms += every_ms;
        }
        drop(h);
        tokio::task::spawn_blocking(move || join.join().unwrap())
            .await
            .unwrap();
    });
    Reader::open(db).unwrap().last_seq().unwrap()
}

fn config(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("gw.toml");
    std::fs::write(
        &p,
        format!("[store]\nsync = \"off\"\n{extra}\n[mqtt]\nenabled = false\n[metrics]\nenabled = false\n"),
    )
    .unwrap();
    p
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `tail --since-seq 0 --json` until it printed `n` lines.
fn tail_all(db: &str, n: u64) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = bin()
        .args(["tail", "--db", db, "--since-seq", "0", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..n {
        out.push_str(&lines.next().expect("a tail line").unwrap());
        out.push('\n');
    }
    let _ = child.kill();
    let _ = child.wait();
    out
}

/// What every reading command prints for the log.
fn outputs(db: &str, head: u64) -> Vec<(&'static str, String)> {
    vec![
        (
            "export jsonl",
            ok(&run(&["export", "--db", db, "--format", "jsonl"])),
        ),
        (
            "export raw in",
            ok(&run(&[
                "export",
                "--db",
                db,
                "--format",
                "raw",
                "--direction",
                "in",
            ])),
        ),
        ("verify", ok(&run(&["verify", "--db", db]))),
        ("stats", ok(&run(&["stats", "--db", db, "--json"]))),
        ("replay", ok(&run(&["replay", db]))),
        ("tail", tail_all(db, head)),
    ]
}

fn seqs_once(db: &Path) -> u64 {
    let r = Reader::open(db).unwrap();
    let head = r.last_seq().unwrap();
    let mut want = 1;
    for rec in r.records(RecordFilter::default()).unwrap() {
        assert_eq!(rec.unwrap().seq, want, "every seq once, in order");
        want += 1;
    }
    assert_eq!(want - 1, head, "every seq up to the head");
    head
}

fn live_min_seq(db: &Path) -> Option<i64> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.query_row("SELECT MIN(seq) FROM records", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn every_reader_answers_the_same_across_archives_and_the_live_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("frames.db");
    // 20 devices every 10 min for 3.5 days: 20,160 records over four day-periods.
    let head = make_log(&db, 20, 600_000, 3 * DAY_MS + DAY_MS / 2);
    let dbs = db.to_str().unwrap();
    let before = outputs(dbs, head);
    let r = Reader::open(&db).unwrap();
    let probe: Vec<_> = [1, 2, head / 3, head / 2, head - 1, head]
        .iter()
        .map(|&s| r.get(s).unwrap().unwrap())
        .collect();
    let filtered = |r: &Reader| -> Vec<u64> {
        r.records(RecordFilter {
            mn: Some("88888000000003".into()),
            data_time_from_ms: Some(BASE_MS + DAY_MS / 2),
            data_time_before_ms: Some(BASE_MS + 3 * DAY_MS),
            ..RecordFilter::default()
        })
        .unwrap()
        .map(|x| x.unwrap().seq)
        .collect()
    };
    let filtered_before = filtered(&r);
    assert!(!filtered_before.is_empty());
    drop(r);

    // Seal days 1 and 2 whole and day 3 up to noon; the rest stays live.
    let cfg = config(dir.path(), "seal_every = \"1d\"");
    let out = ok(&run(&[
        "archive",
        "--db",
        dbs,
        "--config",
        cfg.to_str().unwrap(),
        "--before",
        &rfc3339(BASE_MS + 2 * DAY_MS + DAY_MS / 2),
    ]));
    assert_eq!(out.matches("sealed seqs").count(), 3, "{out}");
    let rows = {
        let c = rusqlite::Connection::open(&db).unwrap();
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM archives WHERE state = 'sealed'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        n
    };
    assert_eq!(rows, 3);
    let adir = archive::archive_dir(&db);
    let mut files = 0;
    for e in std::fs::read_dir(&adir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().ends_with(".archive") {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(e.metadata().unwrap().permissions().mode() & 0o777, 0o444);
            files += 1;
        }
    }
    assert_eq!(files, 3);
    let first_live = live_min_seq(&db).unwrap() as u64;
    assert!(first_live > head / 2 && first_live < head, "{first_live}");

    let after = outputs(dbs, head);
    for ((what, b), (_, a)) in before.iter().zip(&after) {
        assert!(
            b == a,
            "{what} differs after sealing:\nbefore: {:.500}\nafter: {:.500}",
            b,
            a
        );
    }
    assert!(
        after[2]
            .1
            .contains(&format!("{head} records checked, chain intact"))
    );
    let r = Reader::open(&db).unwrap();
    assert_eq!(r.last_seq().unwrap(), head);
    for p in &probe {
        assert_eq!(&r.get(p.seq).unwrap().unwrap(), p, "get({})", p.seq);
    }
    // A consumer lagging behind the seal reads on across the boundary.
    let lag = r.read_from(first_live - 5, 10).unwrap();
    assert_eq!(
        lag.iter().map(|x| x.seq).collect::<Vec<_>>(),
        (first_live - 4..first_live + 6).collect::<Vec<_>>()
    );
    assert_eq!(filtered(&r), filtered_before);
    seqs_once(&db);
    // Sizes for the metrics.
    let s = archive::store_sizes(&db).unwrap();
    assert_eq!(s.archives, 3);
    assert_eq!(s.archived_records, first_live - 1);
    assert!(s.archive_bytes > 0 && s.live_bytes > 0);
    let m = hj212_gateway::metrics::Metrics::new();
    archive::refresh_metrics(&db, &m).unwrap();
    let mut e = hj212_gateway::metrics::Exposition::new();
    m.render(&mut e);
    let text = e.finish();
    assert!(
        text.contains(&format!(
            "hj212_store_size_bytes{{part=\"archive\"}} {}",
            s.archive_bytes
        )),
        "{text}"
    );
    assert!(text.contains("hj212_store_archives 3"), "{text}");
    // The accident guard still holds outside archived ranges.
    let c = rusqlite::Connection::open(&db).unwrap();
    let e = c
        .execute("DELETE FROM records WHERE seq = ?1", [head as i64])
        .unwrap_err();
    assert!(e.to_string().contains("append-only"), "{e}");
}

#[test]
fn sigkill_mid_seal_leaves_every_record_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("frames.db");
    // 40 devices every 2 min over 2 days: 96,000 records in 48 hour-periods.
    let head = make_log(&db, 40, 120_000, 2 * DAY_MS);
    let cfg = config(dir.path(), "seal_every = \"1h\"");
    let dbs = db.to_str().unwrap();
    let started = Instant::now();
    let mut interrupted = 0;
    for delay_ms in [40u64, 120, 250, 400, 700, 1100] {
        let mut child = bin()
            .args(["archive", "--db", dbs, "--config", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            interrupted += 1;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Readers see every seq exactly once, before and after the clean-up.
        assert_eq!(seqs_once(&db), head);
        let (_removed, _purged) = archive::recover(&db).unwrap();
        assert_eq!(seqs_once(&db), head);
        let report = verify_chain(&db).unwrap();
        assert!(
            report.is_intact(),
            "after a kill at {delay_ms} ms: {report:?}"
        );
        assert_eq!(report.records_checked, head);
        // Physically: no live copy of an archived record, no file without a row.
        let c = rusqlite::Connection::open(&db).unwrap();
        let upto: i64 = c
            .query_row("SELECT COALESCE(MAX(last_seq), 0) FROM archives", [], |r| {
                r.get(0)
            })
            .unwrap();
        if let Some(min) = live_min_seq(&db) {
            assert_eq!(min, upto + 1);
        }
        let sealed: i64 = c
            .query_row("SELECT count(*) FROM archives", [], |r| r.get(0))
            .unwrap();
        let files = match std::fs::read_dir(archive::archive_dir(&db)) {
            Ok(dir) => dir
                .filter(|e| {
                    !e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(".lock")
                })
                .count() as i64,
            // Killed before it made its directory (the first kill comes 40 ms
            // in, and a loaded machine starts the process slower): no file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => panic!("the archive directory: {e}"),
        };
        assert_eq!(
            files, sealed,
            "one file per committed archive, no leftovers"
        );
    }
    assert!(
        interrupted >= 3,
        "the kills should land mid-run ({interrupted})"
    );
    let out = ok(&run(&[
        "archive",
        "--db",
        dbs,
        "--config",
        cfg.to_str().unwrap(),
    ]));
    eprintln!("completed after the kills: {}", out.lines().count());
    assert_eq!(seqs_once(&db), head);
    assert!(verify_chain(&db).unwrap().is_intact());
    let c = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM archives", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 48, "every hour sealed");
    assert_eq!(live_min_seq(&db), None, "nothing left live");
    eprintln!("sigkill test took {:?}", started.elapsed());
}

fn signer_key(dir: &Path) -> (String, String) {
    let (skey, vkey) = signed_note::generate_key(&mut rand_core::OsRng, "gw.example");
    std::fs::write(dir.join("checkpoint.key"), format!("{skey}\n")).unwrap();
    // As `keygen` leaves it: a key others can read is refused.
    std::fs::set_permissions(
        dir.join("checkpoint.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    (skey, vkey)
}

#[test]
fn retention_leaves_a_signed_tombstone_and_verify_tells_it_from_a_lost_archive() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("frames.db");
    let head = make_log(&db, 5, 600_000, 3 * DAY_MS);
    let dbs = db.to_str().unwrap();

    // Without a key: sealing works, retention refuses with a clear error.
    let cfg = config(dir.path(), "seal_every = \"1d\"\nretain = \"1d\"");
    let o = run(&["archive", "--db", dbs, "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no signing key"), "{err}");
    let rows = |db: &Path| {
        let c = rusqlite::Connection::open(db).unwrap();
        let v: Vec<(i64, i64, String)> = c
            .prepare("SELECT first_seq, last_seq, state FROM archives ORDER BY first_seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        v
    };
    assert_eq!(rows(&db).len(), 3, "sealed although retention refused");
    assert!(rows(&db).iter().all(|r| r.2 == "sealed"));

    // With the key: the two archives past `retain` (as of day 4) go, with tombstones.
    let (_skey, vkey) = signer_key(dir.path());
    let signer = archive_signer(dir.path());
    let policy = ArchivePolicy {
        seal_every: Duration::from_secs(86_400),
        retain: Some(Duration::from_secs(86_400)),
    };
    let report = archive::maintain(&db, &policy, BASE_MS + 4 * DAY_MS - 1, Some(&signer)).unwrap();
    assert_eq!(report.deleted.len(), 2);
    let r = rows(&db);
    assert_eq!(
        r.iter().map(|x| x.2.as_str()).collect::<Vec<_>>(),
        ["deleted", "deleted", "sealed"]
    );
    for d in &report.deleted {
        assert_eq!(d.state, ArchiveState::Deleted);
        assert!(!archive::archive_dir(&db).join(&d.file).exists());
        let note = d.tombstone.as_deref().unwrap();
        let v = signed_note::StandardVerifier::new(&vkey).unwrap();
        let n = signed_note::Note::from_bytes(note.as_bytes()).unwrap();
        n.verify(&signed_note::VerifierList::new(vec![Box::new(v)]))
            .expect("the tombstone verifies with the gateway's key");
        let t = String::from_utf8_lossy(n.text()).into_owned();
        assert!(
            t.contains(&format!("seqs {} {}", d.first_seq, d.last_seq)),
            "{t}"
        );
        assert!(
            t.contains(&format!("archive-sha256 {}", hex::encode(d.sha256))),
            "{t}"
        );
        assert!(t.contains("origin gw.example"), "{t}");
    }
    // verify: the chain intact, the gap named as deliberate, the chain carried on,
    // the Merkle tree recomputed with the tombstoned leaves taken from the stored tree.
    let chain = verify_chain(&db).unwrap();
    assert!(chain.is_intact(), "{chain:?}");
    assert_eq!(chain.deliberate_gaps.len(), 2);
    let o = run(&["verify", "--db", dbs]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("matches the stored tree"), "{out}");
    assert_eq!(
        out.matches("deliberate gap (not a break)").count(),
        2,
        "{out}"
    );
    let kept = (r[2].1 - r[2].0 + 1) as u64 + (head - r[2].1 as u64);
    assert!(
        out.contains(&format!("{kept} records checked, chain intact")),
        "{out}"
    );
    assert!(out.contains("tombstone signed by gw.example"), "{out}");
    // Readers skip the deleted range and read the rest.
    let reader = Reader::open(&db).unwrap();
    assert_eq!(reader.get(1).unwrap(), None);
    assert_eq!(
        reader.get(r[2].0 as u64).unwrap().unwrap().seq,
        r[2].0 as u64
    );
    assert_eq!(
        reader.records(RecordFilter::default()).unwrap().count() as u64,
        kept
    );

    // The last archive removed by hand, without a tombstone: a break, exit 1.
    let file: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT file FROM archives WHERE state = 'sealed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    std::fs::remove_file(archive::archive_dir(&db).join(&file)).unwrap();
    // The chain walk reports it as a break, and `verify` says the log is not intact.
    let chain = verify_chain(&db).unwrap();
    let b = chain.first_break.expect("a missing archive is a break");
    assert_eq!(b.seq, r[2].0 as u64);
    assert_eq!(
        b.to_string(),
        format!(
            "seq {}: archive {file} is missing and no tombstone records its deletion",
            r[2].0
        )
    );
    let o = run(&["verify", "--db", dbs]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

fn archive_signer(dir: &Path) -> hj212_gateway::evidence::key::SigningKey {
    hj212_gateway::cmd::archive::load_signer(&dir.join("checkpoint.key"))
        .unwrap()
        .expect("a key")
}

/// Simulator traffic through the real gateway, sealed: live bytes per record against
/// archive bytes per record.
#[test]
fn archives_are_at_least_five_times_smaller_than_the_live_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n[mqtt]\nenabled = false\n[metrics]\nenabled = false\n",
    )
    .unwrap();
    let mut gw = common::Bin::spawn(&cfg, &data);
    let target = gw.addr.to_string();
    let sim = run(&[
        "simulate",
        "--target",
        &target,
        "--devices",
        "40",
        "--rate",
        "1500",
        "--duration",
        "6",
        "--cn",
        "2011,2051",
        "--minute-every",
        "1",
        "--dialects",
        "2017=3,2005=1",
        "--progress",
        "0",
        "--json",
    ]);
    // Only the traffic matters here: a debug gateway on a loaded CI box may leave
    // a few frames unacked at the end, which makes `simulate` exit 1.
    assert!(
        matches!(sim.status.code(), Some(0 | 1)),
        "{}\n{}",
        String::from_utf8_lossy(&sim.stdout),
        String::from_utf8_lossy(&sim.stderr)
    );
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    let db = data.join("frames.db");
    // The WAL into the file first, so the file size is the live log's size.
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    let r = Reader::open(&db).unwrap();
    let head = r.last_seq().unwrap();
    assert!(head > 10_000, "{head} records");
    let last_ms = r.get(head).unwrap().unwrap().received_at_ms;
    drop(r);
    let live_bytes = std::fs::metadata(&db).unwrap().len();
    let started = Instant::now();
    let out = ok(&run(&[
        "archive",
        "--db",
        db.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--before",
        &rfc3339(last_ms),
    ]));
    let took = started.elapsed();
    let s = archive::store_sizes(&db).unwrap();
    assert!(s.archived_records > head * 9 / 10, "{out}");
    let live_per = live_bytes as f64 / head as f64;
    let arch_per = s.archive_bytes as f64 / s.archived_records as f64;
    let ratio = live_per / arch_per;
    eprintln!(
        "simulator traffic: {head} records; live {live_per:.0} B/record, archive {arch_per:.1} B/record, \
         ratio {ratio:.1}x; sealed {} records in {took:?} ({:.0} records/s, debug build)",
        s.archived_records,
        s.archived_records as f64 / took.as_secs_f64()
    );
    assert!(ratio >= 5.0, "ratio {ratio:.2}");
    assert!(verify_chain(&db).unwrap().is_intact());
}

/// `archive` while `serve` ingests: every run seals what was received before its
/// `--before` and exits 0. Its seal commit reads the archive list, then writes; as a
/// deferred transaction it was refused ("database is locked") whenever the writer
/// committed in between.
#[test]
fn archive_runs_while_serve_ingests() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[mqtt]\nenabled = false\n[metrics]\nenabled = false\n",
    )
    .unwrap();
    let gw = common::Bin::spawn(&cfg, &data);
    let target = gw.addr.to_string();
    let mut sim = bin()
        .args([
            "simulate",
            "--target",
            &target,
            "--devices",
            "20",
            "--rate",
            "400",
            "--duration",
            "12",
            "--progress",
            "0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let db = data.join("frames.db");
    let dbs = db.to_str().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut sealed = 0;
    for _ in 0..8 {
        std::thread::sleep(std::time::Duration::from_millis(700));
        let before = rfc3339(chrono::Utc::now().timestamp_millis() - 200);
        let out = ok(&run(&["archive", "--db", dbs, "--before", &before]));
        sealed += out.matches("sealed seqs").count();
    }
    let _ = sim.wait();
    assert!(sealed >= 4, "{sealed} seals");
    drop(gw);
    let o = run(&["verify", "--db", dbs]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}
