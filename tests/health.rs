//! The gateway's trust in its own files and what `/healthz` says about them, with
//! the built binary where exit codes and log lines matter: `serve` refuses an
//! empty, foreign or damaged log file; a full (here: size-limited) disk makes
//! `/healthz` answer 503 without flooding the log and recovers; a consumer that
//! dies is reported; files `serve` creates are private; idle clients on the
//! metrics port cannot hold `/healthz` back.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{expected_ack, mn, qn, upload};
use hj212_gateway::store::{Direction, Kind, NewRecord, Store, StoreConfig, SyncMode, Verdict};

const PATIENCE: Duration = Duration::from_secs(20);

/// Every test daemon: ephemeral ports, no MQTT broker, no automatic downlink;
/// `[metrics]` keys follow it.
const BASE: &str = "[server]\nlisten = [\"127.0.0.1:0\"]\n\
    [mqtt]\nenabled = false\n\
    [downlink]\ntime_sync_skew = false\nbackfill = false\n\
    [metrics]\nlisten = \"127.0.0.1:0\"\n";

type Daemon = common::Serve;

impl Daemon {
    /// Starts `serve --config <BASE + extra> --data <data>`.
    fn spawn(data: &Path, extra: &str) -> (Daemon, tempfile::NamedTempFile) {
        let config = tempfile::NamedTempFile::new().expect("config file");
        std::fs::write(config.path(), format!("{BASE}{extra}")).expect("config");
        (Daemon::run(config.path(), data), config)
    }

    /// The device and metrics addresses from the start-up lines.
    fn addrs(&mut self) -> (SocketAddr, SocketAddr) {
        let line = self.wait_for("listen=[");
        let rest = &line[line.find("listen=[").unwrap() + 8..];
        let device = rest[..rest.find(']').unwrap()]
            .parse()
            .expect("device addr");
        let line = self.wait_for("metrics listening");
        let rest = &line[line.find("metrics=").unwrap() + 8..];
        let metrics = rest[..rest.find(' ').unwrap_or(rest.len())]
            .parse()
            .expect("metrics addr");
        (device, metrics)
    }

    /// Waits for the process to exit by itself; kills it and fails if it keeps running.
    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(200));
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("serve kept running: {:#?}", self.lines.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn warn_or_error_lines(&self) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| {
                l.contains(" WARN ")
                    || l.contains(" ERROR ")
                    || l.starts_with("WARN")
                    || l.starts_with("ERROR")
            })
            .count()
    }
}

/// One HTTP GET; (status, body), or `None` when no answer came within `wait`.
fn http_get(addr: SocketAddr, path: &str, wait: Duration) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return None;
        }
        Err(e) => panic!("metrics read: {e}"),
    }
    let text = String::from_utf8(out).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head[9..12].parse().expect("status"), body.to_owned()))
}

fn healthz(addr: SocketAddr) -> (u16, String) {
    http_get(addr, "/healthz", PATIENCE).expect("healthz answers")
}

/// Polls `/healthz` until its status is `want`; returns the last body.
fn healthz_until(addr: SocketAddr, want: u16) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = healthz(addr);
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "healthz stayed {status}: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one upload; the ack, or `None` when none came within `wait`.
fn send(addr: SocketAddr, frame: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(frame).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.ends_with(b"\r\n") {
                    return Some(buf);
                }
            }
        }
    }
    None
}

fn record(i: u64) -> NewRecord {
    // ~700 bytes: a few thousand records span a few hundred 16 KiB pages.
    let raw = format!("##{:0>700}\r\n", i);
    NewRecord {
        received_at_ms: 1_795_870_701_123 + i as i64,
        peer: "10.0.0.7:40001".into(),
        session: 7,
        direction: Direction::In,
        kind: Kind::Frame,
        raw: Bytes::from(raw),
        dialect: Some("2017".into()),
        st: Some("32".into()),
        cn: Some("2011".into()),
        mn: Some(mn(1)),
        qn: Some(format!("2026112821{:07}", i)),
        data_time: Some("2026-11-28T21:05:00+08:00".into()),
        verdict: Verdict::Accepted,
        findings: "[]".into(),
        doc: r#"{"schema":"hj212.frame.v1","kind":"frame"}"#.into(),
        doc_stored: true,
    }
}

/// A frame log with `n` records at `<dir>/frames.db`, closed (WAL checkpointed away).
fn make_log(dir: &Path, n: u64) -> PathBuf {
    let path = dir.join("frames.db");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = StoreConfig {
        sync: SyncMode::Off,
        ..StoreConfig::new(&path)
    };
    let (h, join) = Store::open(cfg).expect("open a new log");
    rt.block_on(async {
        for chunk in (1..=n).collect::<Vec<_>>().chunks(100) {
            h.append_many(chunk.iter().map(|i| record(*i)).collect())
                .await
                .expect("append");
        }
    });
    drop(h);
    join.join().expect("writer");
    path
}

/// Leaf pages of table or index `name`, left to right (SQLite's `dbstat`).
fn leaves(db: &Path, name: &str) -> Vec<u64> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT pageno FROM dbstat WHERE name = ?1 AND pagetype = 'leaf' ORDER BY path")
        .unwrap();
    stmt.query_map([name], |r| r.get::<_, i64>(0).map(|p| p as u64))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn page_size(db: &Path) -> u64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
        .unwrap() as u64
}

/// Overwrites page `pageno` (1-based) with pseudo-random bytes: what a disk, a
/// bad copy or a stray write leaves behind.
fn scribble(db: &Path, pageno: u64, seed: u64) {
    use std::io::{Seek, SeekFrom};
    let size = page_size(db);
    let mut x = seed | 1;
    let junk: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    f.seek(SeekFrom::Start((pageno - 1) * size)).unwrap();
    f.write_all(&junk).unwrap();
    f.sync_all().unwrap();
}

/// Row 13 and contract 3: `serve` does not turn a 0-byte file into a new log.
#[test]
fn serve_refuses_an_empty_log_file_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("frames.db");
    std::fs::write(&db, b"").unwrap();
    let (mut d, _cfg) = Daemon::spawn(dir.path(), "");
    assert_eq!(d.exit_code(), Some(2), "{}", d.log());
    let log = d.log();
    assert!(log.contains(&db.display().to_string()), "{log}");
    assert!(log.contains("empty file (0 bytes)"), "{log}");
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "left as it was");
}

/// Row 13 and contract 3: another application's SQLite file is not migrated in
/// place: `serve` exits 2 naming it and the file's bytes are unchanged. Also a
/// file that is not SQLite at all, and one labelled by another application.
#[test]
fn serve_refuses_a_foreign_file_and_leaves_it_unchanged() {
    type Make = fn(&Path);
    let cases: [(&str, Make); 3] = [
        ("an SQLite database without the frame log's schema", |p| {
            let c = rusqlite::Connection::open(p).unwrap();
            c.execute_batch(
                "CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL); \
                 INSERT INTO invoices VALUES (1, 9.5);",
            )
            .unwrap();
        }),
        ("belongs to another application", |p| {
            let c = rusqlite::Connection::open(p).unwrap();
            c.execute_batch("PRAGMA application_id = 1234; CREATE TABLE records (x);")
                .unwrap();
        }),
        ("not an SQLite database", |p| {
            std::fs::write(p, vec![b'x'; 8192]).unwrap();
        }),
    ];
    for (reason, make) in cases {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("frames.db");
        make(&db);
        let before = std::fs::read(&db).unwrap();
        let (mut d, _cfg) = Daemon::spawn(dir.path(), "");
        assert_eq!(d.exit_code(), Some(2), "{reason}: {}", d.log());
        let log = d.log();
        assert!(log.contains(&db.display().to_string()), "{log}");
        assert!(log.contains("is not a frame log"), "{log}");
        assert!(log.contains(reason), "{reason}: {log}");
        assert_eq!(
            std::fs::read(&db).unwrap(),
            before,
            "{reason}: file changed"
        );
        assert!(!dir.path().join("frames.db-wal").exists(), "{reason}");
    }
}

/// Row 5 and contract 3: random bytes in the pages the writer appends to (the
/// last leaf of `records`, or of its retransmission index) are found before
/// anything is acknowledged into them.
#[test]
fn serve_refuses_a_log_whose_tail_pages_hold_random_bytes() {
    for (btree, pick) in [
        ("records", usize::MAX),
        ("records_retransmission_qn", usize::MAX),
        ("meta", 0),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let db = make_log(dir.path(), 2000);
        let pages = leaves(&db, btree);
        assert!(!pages.is_empty(), "{btree}");
        let page = pages[pick.min(pages.len() - 1)];
        scribble(&db, page, 0x9E37_79B9_7F4A_7C15 ^ page);
        let (mut d, _cfg) = Daemon::spawn(dir.path(), "");
        assert_eq!(d.exit_code(), Some(2), "{btree}: {}", d.log());
        let log = d.log();
        assert!(log.contains(&db.display().to_string()), "{log}");
        assert!(log.contains("is damaged"), "{btree}: {log}");
        assert!(log.contains("verify"), "{log}");
    }
}

/// Row 5 and contract 4: damage beyond the start-up check's reach (here: the
/// check reads only the last 10 records) that kills a consumer, the alarm
/// detector warming up from the records before its cursor, makes `/healthz`
/// answer 503 naming it; the gateway keeps taking frames.
#[test]
fn a_consumer_that_dies_is_reported_by_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let db = make_log(dir.path(), 2000);
    let pages = leaves(&db, "records");
    let page = pages[pages.len() / 2];
    scribble(&db, page, 7);
    let (mut d, _cfg) = Daemon::spawn(dir.path(), "[store]\ncheck_tail = 10\n");
    let (device, metrics) = d.addrs();
    d.wait_for("consumer stopped");
    let body = healthz_until(metrics, 503);
    assert!(body.contains("consumer stopped: alarm detector"), "{body}");
    let frame = upload(&mn(2), &qn(1), "123456");
    assert_eq!(
        send(device, &frame, PATIENCE).as_deref(),
        Some(expected_ack(&frame).as_slice()),
        "ingest goes on"
    );
}

/// Row 10 and contract 7: what `serve` creates is not world-readable: the data
/// directory 0750, the log and its -wal/-shm 0640 (the control socket stays 0600).
#[test]
fn files_serve_creates_are_private() {
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("state").join("gw");
    let (mut d, _cfg) = Daemon::spawn(&data, "");
    let (device, _) = d.addrs();
    let frame = upload(&mn(3), &qn(1), "123456");
    assert!(send(device, &frame, PATIENCE).is_some(), "acked");
    let mode = |p: PathBuf| {
        std::fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(data.clone()), 0o750, "data directory");
    assert_eq!(
        mode(data.parent().unwrap().to_owned()),
        0o750,
        "its parent, created too"
    );
    for f in ["frames.db", "frames.db-wal", "frames.db-shm"] {
        assert_eq!(mode(data.join(f)), 0o640, "{f}");
    }
    for entry in std::fs::read_dir(&data).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(
            mode(p.clone()) & 0o007,
            0,
            "{} is world-accessible",
            p.display()
        );
    }
}

/// Row 8 and contract 4: while commits fail for lack of space (here the file size
/// limit, set on the running daemon: SQLite gets the same write errors as on a
/// full disk) nothing is acked, `/healthz` answers 503 with the reason, and
/// devices hammering the gateway produce a handful of WARN/ERROR lines, not one
/// per frame. When space comes back, health returns to 200 and frames are acked.
#[test]
fn a_full_disk_makes_healthz_503_without_flooding_the_log_and_recovers() {
    use rustix::process::{Pid, Resource, Rlimit, prlimit};
    let dir = tempfile::tempdir().unwrap();
    let (mut d, _cfg) = Daemon::spawn(dir.path(), "");
    let (device, metrics) = d.addrs();
    let first = upload(&mn(4), &qn(1), "123456");
    assert!(send(device, &first, PATIENCE).is_some(), "acked before");
    assert_eq!(healthz(metrics).0, 200);
    let pid = Pid::from_raw(d.child.id() as i32).unwrap();
    prlimit(
        Some(pid),
        Resource::Fsize,
        Rlimit {
            current: Some(1),
            maximum: None,
        },
    )
    .expect("limit the daemon's file size");
    // Hammer: 4 devices resending for 3 s, each on a fresh connection (the
    // gateway closes a session whose frames it could not store).
    let before = d.warn_or_error_lines();
    let until = Instant::now() + Duration::from_secs(3);
    let sent = std::sync::atomic::AtomicU64::new(0);
    let acked = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for dev in 0..4 {
            let (sent, acked) = (&sent, &acked);
            s.spawn(move || {
                let mut i = 0;
                while Instant::now() < until {
                    i += 1;
                    let f = upload(&mn(10 + dev), &qn(i), "123456");
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if send(device, &f, Duration::from_millis(500)).is_some() {
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let sent = sent.into_inner();
    assert!(sent >= 20, "the hammer ran ({sent} frames)");
    assert_eq!(
        acked.into_inner(),
        0,
        "nothing acked while nothing is stored"
    );
    let body = healthz_until(metrics, 503);
    assert!(body.contains("frame log commits failing"), "{body}");
    let lines = d.warn_or_error_lines() - before;
    let closed = d.log().matches("reason=\"store_error\"").count();
    assert!(
        closed <= 4,
        "{closed} session close lines for {sent} failed frames"
    );
    assert!(
        lines <= 12,
        "{lines} WARN/ERROR lines for {sent} failed frames: {}",
        d.log()
    );
    assert!(d.log().contains("suppressed"), "{}", d.log());
    prlimit(
        Some(pid),
        Resource::Fsize,
        Rlimit {
            current: None,
            maximum: None,
        },
    )
    .expect("lift the limit");
    healthz_until(metrics, 200);
    let after = upload(&mn(4), &qn(99), "123456");
    assert_eq!(
        send(device, &after, PATIENCE).as_deref(),
        Some(expected_ack(&after).as_slice()),
        "acked again"
    );
    d.wait_for("frame log commits succeed again");
    if std::env::var_os("SHOW_LOG").is_some() {
        eprintln!("sent {sent}, {lines} lines:\n{}", d.log());
    }
}

/// Row 12: idle connections on the metrics port (slowloris) neither delay
/// `/healthz` nor get closed while there is room; beyond `[metrics]
/// max_connections` the oldest silent one makes room.
#[test]
fn idle_metrics_clients_cannot_hold_healthz_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, _cfg) = Daemon::spawn(dir.path(), "");
    let (_, metrics) = d.addrs();
    let idle: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(metrics).unwrap())
        .collect();
    // Each idle client has sent nothing; the old listener served 8 at a time and
    // made the 9th wait out their 5 s head timeout.
    let answer = http_get(metrics, "/healthz", Duration::from_secs(3));
    assert_eq!(
        answer.map(|a| a.0),
        Some(200),
        "healthz answered while 10 clients idle"
    );
    for mut s in &idle {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = s.read(&mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "idle connection still open: {r:?}"
        );
    }
    drop(idle);
    drop(d);

    let dir = tempfile::tempdir().unwrap();
    let (mut d, _cfg) = Daemon::spawn(dir.path(), "max_connections = 4\nhead_timeout = \"30s\"\n");
    let (_, metrics) = d.addrs();
    let idle: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(metrics).unwrap())
        .collect();
    let answer = http_get(metrics, "/healthz", Duration::from_secs(3));
    assert_eq!(
        answer.map(|a| a.0),
        Some(200),
        "healthz answered with every slot idle"
    );
    let (status, body) = http_get(metrics, "/metrics", PATIENCE).expect("scrape");
    assert_eq!(status, 200);
    let evicted: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("hj212_metrics_connections_evicted_total "))
        .expect("eviction metric")
        .parse()
        .unwrap();
    assert!(
        evicted >= 7.0,
        "10 idle + 2 requests in 4 slots: {evicted} evicted"
    );
    drop(idle);
}

/// Contract 3 at run time: when SQLite reports damage in the middle of serving
/// (a page the start-up check does not read), the batch fails, the writer refuses
/// every later batch without touching the file, and the store reports why (what
/// `/healthz` answers).
#[test]
fn damage_found_while_serving_stops_acknowledgements() {
    let dir = tempfile::tempdir().unwrap();
    let db = make_log(dir.path(), 2000);
    let index = leaves(&db, "records_retransmission_qn");
    assert!(
        index.len() >= 3,
        "the index spans several leaves: {index:?}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = StoreConfig {
        sync: SyncMode::Off,
        ..StoreConfig::new(&db)
    };
    let (h, join) = Store::open(cfg).expect("the tail is sound");
    assert_eq!(h.problem(), None);
    // The leftmost leaf: where a QN that sorts first is looked up.
    scribble(&db, index[0], 99);
    let early = NewRecord {
        qn: Some("19990101000000000".into()),
        ..record(5000)
    };
    let err = rt.block_on(h.append(early)).unwrap_err();
    assert!(
        matches!(err, hj212_gateway::store::StoreError::BatchFailed { .. }),
        "{err}"
    );
    let why = h.problem().expect("a problem is reported");
    assert!(why.starts_with("frame log damaged"), "{why}");
    let before = std::fs::read(&db).unwrap();
    let err = rt.block_on(h.append(record(5001))).unwrap_err();
    assert!(
        matches!(err, hj212_gateway::store::StoreError::Damaged { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("verify"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "nothing written");
    assert_eq!(h.stats().records_committed, 0);
    drop(h);
    let _ = join.join();
}
