//! Hostile device connections against a real gateway (in-process, real sockets,
//! a real SQLite file): junk floods must not bloat the log, and a second
//! session for a live MN from another address must not take the device over.
//!
//! Issue 18, rows 4 and 7.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{expected_ack, mn, qn, upload};
use hj212_gateway::config::Config;
use hj212_gateway::store::{Direction, Kind, StoredRecord, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Longest any single expected event may take on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(10);

fn config(server: &str, rest: &str) -> Config {
    let text = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n{server}\n\
         [store]\nsync = \"off\"\n[alarms]\nenabled = false\n\
         [downlink]\ntime_sync_skew = false\nbackfill = false\nover_time = \"2s\"\nre_count = 1\n{rest}\n"
    );
    Config::parse(&text, Path::new("test")).expect("config")
}

/// A device connection from a chosen loopback address (127.0.0.0/8 is all
/// local on Linux, so 127.0.0.2 is "another address" to the gateway).
struct Device {
    stream: TcpStream,
    buf: Vec<u8>,
    local: SocketAddr,
}

impl Device {
    async fn connect_from(gw: SocketAddr, from: [u8; 4]) -> Device {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::from((from, 0))).expect("bind");
        let stream = sock.connect(gw).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let local = stream.local_addr().expect("local");
        Device {
            stream,
            buf: Vec::new(),
            local,
        }
    }

    async fn connect(gw: SocketAddr) -> Device {
        Device::connect_from(gw, [127, 0, 0, 1]).await
    }

    async fn send(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.expect("send");
    }

    /// The next CR LF-terminated line within `wait`; `None` on silence or close.
    async fn line(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Some(self.buf.drain(..i + 2).collect());
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    async fn exchange(&mut self, frame: &[u8]) {
        self.send_expect_ack(frame, frame).await;
    }

    /// Sends `bytes`, which end with `frame`; expects exactly the ack of `frame`.
    async fn send_expect_ack(&mut self, bytes: &[u8], frame: &[u8]) {
        self.send(bytes).await;
        let got = self.line(PATIENCE).await.expect("an ack");
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected_ack(frame))
        );
    }

    /// True when the gateway closed the connection within `wait`.
    async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Half-closes and waits for the gateway to close too (its last bytes stored).
    async fn finish(mut self) {
        self.stream.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, self.stream.read_to_end(&mut rest))
            .await
            .expect("gateway closes after EOF")
            .expect("read to end");
    }
}

fn inbound_of(recs: &[StoredRecord], client: SocketAddr) -> Vec<&StoredRecord> {
    let peer = client.to_string();
    recs.iter()
        .filter(|r| r.direction == Direction::In && r.peer == peer)
        .collect()
}

fn finding_codes(r: &StoredRecord) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&r.findings).expect("findings JSON");
    v.as_array()
        .expect("array")
        .iter()
        .map(|f| f["code"].as_str().expect("code").to_owned())
        .collect()
}

/// Bytes of the log in use: pages (main file and WAL as a reader sees them)
/// minus free pages, so tables and every index count.
fn used_bytes(db: &Path) -> u64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open log");
    let q = |p: &str| -> u64 {
        c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0))
            .expect(p) as u64
    };
    (q("page_count") - q("freelist_count")) * q("page_size")
}

/// Hostile junk patterns, each a whole connection's worth (below the default
/// `max_junk_bytes`, so the good frame after it is still read).
fn junk_patterns() -> Vec<Vec<u8>> {
    let hashes = vec![b'#'; 12_000];
    let mut runs = Vec::new();
    while runs.len() < 12_000 {
        runs.extend_from_slice(b"##x##");
        runs.extend_from_slice(b"##9");
        runs.push(b'#');
        runs.extend_from_slice(b"##A\0\r\n");
    }
    let mut lengths = Vec::new();
    while lengths.len() < 12_000 {
        // Bad lengths: each a failed frame attempt cut at the next `##`. (A
        // declared length beyond the bytes sent makes the framer wait for them,
        // up to `max_frame_bytes`, by design: not what this test is about.)
        lengths.extend_from_slice(b"##12ab##0001&&zz##3x\n##");
    }
    vec![hashes, runs, lengths]
}

/// Row 4: `#` floods (and other junk shapes) once made one ~380-byte record per
/// 1-2 byte junk item. Consecutive junk coalesces: the frame after the junk is
/// acked and stored, every junk byte is stored exactly once and in order, and
/// the log grows by at most 8 bytes per junk byte, indexes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_floods_are_stored_exactly_in_few_records() {
    let gw = common::start_config(config("", ""), None).await;
    let mut warm = Device::connect(gw.addr).await;
    warm.exchange(&upload(&mn(1), &qn(1), "123456")).await;
    warm.finish().await;
    let before = used_bytes(&gw.db);

    let mut junk_total = 0usize;
    let mut sent_by: Vec<(SocketAddr, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    for (i, junk) in junk_patterns().into_iter().enumerate() {
        junk_total += junk.len();
        // A frame after the junk, sent in one write ...
        let frame = upload(&mn(2 + i as u32), &qn(2), "123456");
        let mut d = Device::connect(gw.addr).await;
        let mut all = junk.clone();
        all.extend_from_slice(&frame);
        d.send_expect_ack(&all, &frame).await;
        sent_by.push((d.local, all, Some(frame)));
        d.finish().await;
        // ... across many small writes with pauses (many reads) ...
        let mut d = Device::connect(gw.addr).await;
        for part in junk.chunks(junk.len() / 7 + 1) {
            d.send(part).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let frame = upload(&mn(2 + i as u32), &qn(3), "123456");
        d.exchange(&frame).await;
        let mut all = junk.clone();
        all.extend_from_slice(&frame);
        sent_by.push((d.local, all, Some(frame)));
        junk_total += junk.len();
        d.finish().await;
        // ... and junk alone, then the device hangs up.
        let mut d = Device::connect(gw.addr).await;
        d.send(&junk).await;
        sent_by.push((d.local, junk.clone(), None));
        junk_total += junk.len();
        d.finish().await;
    }

    let recs = common::records(&gw.db);
    for (local, sent, frame) in &sent_by {
        let inbound = inbound_of(&recs, *local);
        let stored: Vec<u8> = inbound.iter().flat_map(|r| r.raw.iter().copied()).collect();
        assert!(
            stored == *sent,
            "connection {local}: stored bytes differ from sent"
        );
        let (junk, frames): (Vec<&StoredRecord>, Vec<&StoredRecord>) =
            inbound.iter().partition(|r| r.kind == Kind::Junk);
        assert!(junk.iter().all(|r| r.verdict == Verdict::Junk));
        match frame {
            Some(f) => {
                assert_eq!(frames.len(), 1, "connection {local}");
                assert_eq!(frames[0].raw, f[..]);
                assert_eq!(frames[0].verdict, Verdict::Accepted);
            }
            None => assert!(frames.is_empty()),
        }
        // The doc keeps the pieces in bounded form.
        for r in &junk {
            assert!(
                r.stored_doc().len() <= 2048,
                "junk doc of {} bytes",
                r.stored_doc().len()
            );
        }
    }
    let after = used_bytes(&gw.db);
    let grown = after - before;
    eprintln!("{junk_total} junk bytes grew the log by {grown} bytes");
    assert!(
        grown <= 8 * junk_total as u64,
        "{junk_total} junk bytes grew the log by {grown} bytes ({:.1} per junk byte)",
        grown as f64 / junk_total as f64
    );
    tokio::time::timeout(PATIENCE * 3, gw.running.stop())
        .await
        .expect("stop in time")
        .expect("clean stop");
}

/// `GET /metrics` from the gateway's metrics listener; the value of `series`.
async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let mut s = TcpStream::connect(addr).await.expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    tokio::time::timeout(PATIENCE, s.read_to_string(&mut body))
        .await
        .expect("metrics in time")
        .expect("read");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs `hj212-gateway command --socket S --mn MN ARGS..` to completion.
async fn command(socket: &Path, mn: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
        .arg("command")
        .arg("--socket")
        .arg(socket)
        .args(["--mn", mn])
        .args(args)
        .output()
        .await
        .expect("run command")
}

/// The session id and peer that own `mn` in the gateway's session map.
fn owner_of(gw: &common::InProc, mn: &str) -> Option<String> {
    gw.running
        .shared
        .sessions
        .list()
        .into_iter()
        .find(|e| e.mn == mn)
        .map(|e| e.peer)
}

/// Row 7: a frame with a live device's MN from another address used to close
/// the device's session as "superseded" and take its downlink. Now the second
/// session uploads (stored, acked, flagged `session.conflict`, counted) while
/// the first keeps the MN and receives operator commands; only when the first
/// closes does the MN move. From the same address a reconnect still supersedes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_address_cannot_take_a_live_session_over() {
    let gw = common::start_config(config("", ""), None).await;
    let metrics = gw.running.metrics_addr.expect("metrics on");
    let conflicts_before = metric(metrics, "hj212_session_conflicts_total").await;
    let dev = mn(70);
    let mut real = Device::connect_from(gw.addr, [127, 0, 0, 1]).await;
    real.exchange(&upload(&dev, &qn(1), "123456")).await;
    assert_eq!(owner_of(&gw, &dev), Some(real.local.to_string()));

    let mut spoof = Device::connect_from(gw.addr, [127, 0, 0, 2]).await;
    let spoofed = upload(&dev, &qn(2), "123456");
    spoof.exchange(&spoofed).await;
    spoof.exchange(&upload(&dev, &qn(3), "123456")).await;
    assert!(
        !real.closed_within(Duration::from_millis(300)).await,
        "the real session was closed"
    );
    real.exchange(&upload(&dev, &qn(4), "123456")).await;
    assert_eq!(owner_of(&gw, &dev), Some(real.local.to_string()));

    let recs = common::records(&gw.db);
    let theirs = inbound_of(&recs, spoof.local);
    assert_eq!(theirs.len(), 2);
    for r in &theirs {
        assert_eq!(r.verdict, Verdict::Accepted, "stored and acked");
        assert!(
            finding_codes(r).contains(&"session.conflict".to_owned()),
            "{:?}",
            r.findings
        );
    }
    for r in inbound_of(&recs, real.local) {
        assert!(!finding_codes(r).contains(&"session.conflict".to_owned()));
    }
    assert!(metric(metrics, "hj212_session_conflicts_total").await >= conflicts_before + 2.0);

    // An operator command goes to the first session, not to the spoofer.
    let socket = gw.running.control_path.clone();
    let mn_arg = dev.clone();
    let cmd = tokio::spawn(async move { command(&socket, &mn_arg, &["get-rtd-interval"]).await });
    let request = real
        .line(PATIENCE)
        .await
        .expect("the request reaches the real device");
    assert!(
        String::from_utf8_lossy(&request).contains("CN=1061"),
        "{}",
        String::from_utf8_lossy(&request)
    );
    assert_eq!(spoof.line(Duration::from_millis(300)).await, None);
    let _ = cmd.await;

    // Once the first session ends, the other address may take the MN.
    real.finish().await;
    let mut later = upload(&dev, &qn(5), "123456");
    spoof.exchange(&later).await;
    assert_eq!(owner_of(&gw, &dev), Some(spoof.local.to_string()));
    let recs = common::records(&gw.db);
    let r = recs
        .iter()
        .rev()
        .find(|r| r.raw == later[..])
        .expect("stored");
    assert!(!finding_codes(r).contains(&"session.conflict".to_owned()));

    // From the owner's own address a new connection supersedes (a reconnect).
    let mut again = Device::connect_from(gw.addr, [127, 0, 0, 2]).await;
    later = upload(&dev, &qn(6), "123456");
    again.exchange(&later).await;
    assert!(
        spoof.closed_within(PATIENCE).await,
        "superseded by the reconnect"
    );
    assert_eq!(owner_of(&gw, &dev), Some(again.local.to_string()));
    tokio::time::timeout(PATIENCE * 3, gw.running.stop())
        .await
        .expect("stop in time")
        .expect("clean stop");
}
