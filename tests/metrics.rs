//! `/metrics` and `/healthz` over real sockets against a real gateway and its
//! SQLite log: counters are checked against what was sent and what was stored.
//!
//! Each gateway counts in its own registry, so the tests here run in parallel
//! and each reads only its own gateway's traffic.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{expected_ack, mn, qn, upload};
use hj212_gateway::config::Config;
use hj212_gateway::daemon::{self, Overrides, Running};
use hj212_gateway::metrics::parse_exposition;
use hj212_gateway::store::{Direction, Kind, StoredRecord, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATIENCE: Duration = Duration::from_secs(10);

async fn start(text: &str) -> (Running, PathBuf, tempfile::TempDir) {
    let g = common::start_in_process(text).await;
    (g.running, g.db, g.dir)
}

/// One raw HTTP/1.1 exchange; returns (status code, body).
async fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect metrics");
    s.write_all(request.as_bytes()).await.expect("send request");
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read response");
    let text = String::from_utf8(out).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head[9..12].parse().expect("status code");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("content length")
        .parse()
        .expect("length");
    assert_eq!(len, body.len(), "Content-Length matches the body");
    assert!(head.contains("Connection: close"), "{head}");
    (status, head.to_owned(), body.to_owned())
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await
}

/// The scrape as (`name{labels}`, value), checked for format.
async fn scrape(addr: SocketAddr) -> Vec<(String, f64)> {
    let (status, head, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

fn value(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map(|x| x.1)
        .unwrap_or_else(|| panic!("{series} missing from the scrape"))
}

use common::records;

async fn read_reply(s: &mut TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            return buf.drain(..i + 2).collect();
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline.into(), s.read(&mut chunk))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(n > 0, "gateway closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Polls the scrape until `cond` holds (counters updated after a reply is written).
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    cond: impl Fn(&[(String, f64)]) -> bool,
) -> Vec<(String, f64)> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = scrape(addr).await;
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_the_traffic_and_the_log() {
    // A broker port nobody listens on: the publisher never connects, so its
    // cursor stays at 0 and its lag is the whole log. The gateway's own
    // requests are off: the test counts every byte sent, and a third upload
    // with an old DataTime would bring an unasked clock setting.
    let dead_broker = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("probe port")
        .local_addr()
        .expect("addr")
        .port();
    let (known1, known2) = (mn(1), mn(2));
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nmax_per_ip = 2\n[store]\nsync = \"off\"\n\
         [mqtt]\nenabled = true\nurl = \"mqtt://127.0.0.1:{dead_broker}\"\nreconnect_max = \"500ms\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [downlink]\ntime_sync_skew = false\nbackfill = false\n\
         [[device]]\nmn = \"{known1}\"\n[[device]]\nmn = \"{known2}\"\n"
    );
    let (running, db, _dir) = start(&text).await;
    let m = running.metrics_addr.expect("metrics bound");
    let gw = running.addrs[0];

    let before = scrape(m).await;
    assert_eq!(value(&before, "hj212_up"), 1.0);
    assert_eq!(value(&before, "hj212_registry_devices"), 2.0);
    assert_eq!(value(&before, "hj212_sessions_open"), 0.0);
    assert_eq!(
        value(&before, "hj212_gateway_build_info{version=\"0.1.0\"}"),
        1.0
    );
    assert!(value(&before, "process_start_time_seconds") > 1.7e9);

    // One connection: junk, a good frame, a frame with a bad CRC, and the good
    // frame again (a retransmission: accepted, acked, marked duplicate).
    let good = upload(&known1, &qn(1), "123456");
    let mut bad = upload(&known1, &qn(2), "123456");
    let crc_at = bad.len() - 6;
    bad[crc_at] = if bad[crc_at] == b'0' { b'1' } else { b'0' };
    let junk = b"NOISE!".to_vec();
    let ack = expected_ack(&good);
    let mut a = TcpStream::connect(gw).await.expect("connect");
    let mut abuf = Vec::new();
    let mut first = junk.clone();
    first.extend_from_slice(&good);
    a.write_all(&first).await.expect("send");
    assert_eq!(read_reply(&mut a, &mut abuf).await, ack);
    a.write_all(&bad).await.expect("send");
    a.write_all(&good).await.expect("send");
    // The bad frame is not acked; the retransmission is.
    assert_eq!(read_reply(&mut a, &mut abuf).await, ack);

    // A second and a third connection from the same IP: the cap is 2.
    let b = TcpStream::connect(gw).await.expect("connect");
    let mut c = TcpStream::connect(gw).await.expect("connect");
    let mut one = [0u8; 1];
    let closed = tokio::time::timeout(PATIENCE, c.read(&mut one))
        .await
        .expect("refused connection closes");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    let s = scrape_until(m, "the refusal and the ack latency", |s| {
        value(s, "hj212_connections_refused_total{reason=\"per_ip_cap\"}") >= 1.0
            && value(s, "hj212_ack_latency_seconds_count") >= 2.0
            && value(s, "hj212_sessions_open") >= 2.0
    })
    .await;
    let recs = records(&db);
    let inbound: Vec<&StoredRecord> = recs
        .iter()
        .filter(|r| r.direction == Direction::In)
        .collect();
    let count = |v: Verdict| inbound.iter().filter(|r| r.verdict == v).count() as f64;
    assert_eq!(count(Verdict::Accepted), 2.0);
    assert_eq!(count(Verdict::Rejected), 1.0);
    assert_eq!(count(Verdict::Junk), 1.0);
    assert_eq!(value(&s, "hj212_frames_total{verdict=\"accepted\"}"), 2.0);
    assert_eq!(value(&s, "hj212_frames_total{verdict=\"rejected\"}"), 1.0);
    assert_eq!(value(&s, "hj212_frames_total{verdict=\"junk\"}"), 1.0);
    assert_eq!(
        value(&s, "hj212_findings_total{code=\"crc.mismatch\"}"),
        1.0
    );
    assert_eq!(
        value(&s, "hj212_findings_total{code=\"device.unknown\"}"),
        0.0
    );
    let sent_in = (junk.len() + 2 * good.len() + bad.len()) as f64;
    let stored_in: usize = inbound.iter().map(|r| r.raw.len()).sum();
    assert_eq!(stored_in as f64, sent_in, "every byte read is in the log");
    assert_eq!(value(&s, "hj212_received_bytes_total"), sent_in);
    assert_eq!(value(&s, "hj212_junk_bytes_total"), junk.len() as f64);
    assert_eq!(value(&s, "hj212_sent_bytes_total"), (2 * ack.len()) as f64);
    assert_eq!(value(&s, "hj212_duplicate_frames_total"), 1.0);
    assert_eq!(
        inbound.iter().filter(|r| r.duplicate).count(),
        1,
        "the log agrees"
    );
    assert_eq!(value(&s, "hj212_ack_latency_seconds_count"), 2.0);
    assert!(value(&s, "hj212_ack_latency_seconds_sum") > 0.0);
    assert_eq!(value(&s, "hj212_sessions_open"), 2.0);
    assert_eq!(value(&s, "hj212_connections_accepted_total"), 2.0);
    assert_eq!(
        value(&s, "hj212_connections_refused_total{reason=\"per_ip_cap\"}"),
        1.0
    );
    assert_eq!(value(&s, "hj212_device_mns_online"), 1.0);
    let commits = value(&s, "hj212_store_commit_duration_seconds_count");
    assert!(commits > 0.0);
    assert_eq!(
        value(&s, "hj212_store_commit_batch_records_count"),
        commits,
        "one batch-size observation per commit"
    );
    // Junk+good (+ ack), bad, good (+ ack): every record once in the batch sizes.
    assert_eq!(
        value(&s, "hj212_store_commit_batch_records_sum"),
        recs.len() as f64
    );
    let head = recs.last().expect("records").seq as f64;
    assert_eq!(value(&s, "hj212_store_head_seq"), head);
    // Present from the first scrape; its size depends on checkpoint timing.
    assert!(value(&s, "hj212_store_wal_pages") >= 0.0);
    assert_eq!(value(&s, "hj212_scrape_store_ok"), 1.0);
    assert_eq!(value(&s, "hj212_mqtt_connected"), 0.0);
    assert_eq!(
        value(&s, "hj212_consumer_lag_records{consumer=\"mqtt\"}"),
        head
    );
    assert_eq!(
        value(&s, "hj212_consumer_lag_records{consumer=\"mqtt.merge\"}"),
        head
    );
    // No upstream configured: no series for one.
    assert!(!s.iter().any(|(k, _)| k.contains("consumer=\"upstream.")));
    // The detector (on by default) follows the log: its lag drains to 0 while
    // the publisher's stays at the whole log.
    scrape_until(m, "the detector to catch up", |s| {
        value(s, "hj212_consumer_lag_records{consumer=\"alarms\"}") == 0.0
            && value(s, "hj212_consumer_lag_records{consumer=\"mqtt\"}") == head
    })
    .await;
    assert_eq!(
        value(&s, "hj212_alarms_active{kind=\"device.offline\"}"),
        0.0
    );
    assert_eq!(
        recs.iter()
            .filter(|r| r.kind == Kind::Frame && r.direction == Direction::Out)
            .count(),
        2
    );

    // Health, and the HTTP edges.
    let (status, _, body) = get(m, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, _) = get(m, "/healthz?verbose=1").await;
    assert_eq!(status, 200);
    assert_eq!(get(m, "/").await.0, 404);
    assert_eq!(get(m, "/metricsx").await.0, 404);
    let (status, head, _) = http(m, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET"), "{head}");
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let mut h = TcpStream::connect(m).await.expect("connect");
    // The server answers after 8 KiB without reading the rest.
    let _ = h.write_all(huge.as_bytes()).await;
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, h.read_to_end(&mut resp)).await;
    assert!(
        resp.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&resp)
    );

    // Sessions close: the gauge follows.
    drop((a, b));
    scrape_until(m, "sessions to close", |s| {
        value(s, "hj212_sessions_open") == 0.0
            && value(s, "hj212_sessions_closed_total{reason=\"peer_closed\"}") == 2.0
    })
    .await;

    // Shutting down: /healthz says so while sessions drain.
    running.shutdown.cancel();
    let (status, _, body) = get(m, "/healthz").await;
    assert_eq!((status, body.as_str()), (503, "shutting down\n"));
    assert_eq!(value(&scrape(m).await, "hj212_up"), 0.0);
    tokio::time::timeout(PATIENCE * 3, running.stop())
        .await
        .expect("stop in time")
        .expect("clean stop");
    assert!(
        TcpStream::connect(m).await.is_err(),
        "metrics listener closed after stop"
    );
}

/// Two gateways in one process count apart: traffic to one leaves the other's
/// scrape at zero, and the first's counts only what it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_in_one_process_have_their_own_counters() {
    let text = "[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n\
                [metrics]\nlisten = \"127.0.0.1:0\"\n";
    let (busy, _db1, _dir1) = start(text).await;
    let (quiet, _db2, _dir2) = start(text).await;
    let (busy_m, quiet_m) = (
        busy.metrics_addr.expect("metrics bound"),
        quiet.metrics_addr.expect("metrics bound"),
    );
    let good = upload(&mn(7), &qn(1), "123456");
    let mut a = TcpStream::connect(busy.addrs[0]).await.expect("connect");
    let mut buf = Vec::new();
    a.write_all(&good).await.expect("send");
    assert_eq!(read_reply(&mut a, &mut buf).await, expected_ack(&good));
    let s = scrape_until(busy_m, "the frame counted", |s| {
        value(s, "hj212_frames_total{verdict=\"accepted\"}") >= 1.0
    })
    .await;
    assert_eq!(value(&s, "hj212_frames_total{verdict=\"accepted\"}"), 1.0);
    assert_eq!(value(&s, "hj212_connections_accepted_total"), 1.0);
    assert_eq!(value(&s, "hj212_sessions_open"), 1.0);
    let q = scrape(quiet_m).await;
    for series in [
        "hj212_frames_total{verdict=\"accepted\"}",
        "hj212_connections_accepted_total",
        "hj212_sessions_open",
        "hj212_received_bytes_total",
        "hj212_sent_bytes_total",
        "hj212_ack_latency_seconds_count",
    ] {
        assert_eq!(value(&q, series), 0.0, "{series} of the quiet gateway");
    }
    assert_eq!(quiet.shared.metrics.accepted.get(), 0);
    drop(a);
    busy.stop().await.expect("stop");
    quiet.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_binds_nothing() {
    for metrics in ["[metrics]\nenabled = false\n", "[metrics]\nlisten = \"\"\n"] {
        let text =
            format!("[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n{metrics}");
        let (running, _db, _dir) = start(&text).await;
        assert_eq!(running.metrics_addr, None, "{metrics}");
        running.stop().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_is_a_startup_error_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    let cfg = Config::parse(&text, Path::new("test")).expect("config");
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Overrides {
        config: None,
        listen: Vec::new(),
        data: Some(dir.path().to_owned()),
    };
    let err = daemon::start(cfg, &o).await.expect_err("port taken");
    assert!(err.to_string().contains("[metrics] listen"), "{err}");
}

#[test]
fn check_config_names_a_bad_metrics_listen_and_exits_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_hj212-gateway");
    let check = |text: &str| {
        let p = dir.path().join("gw.toml");
        std::fs::write(&p, text).expect("write config");
        std::process::Command::new(bin)
            .arg("check-config")
            .arg(&p)
            .output()
            .expect("run check-config")
    };
    let bad = check("[metrics]\nlisten = \"localhost\"\n");
    assert_eq!(bad.status.code(), Some(78));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("metrics.listen"), "{err}");
    let typo = check("[metrics]\nlisen = \"127.0.0.1:9464\"\n");
    assert_eq!(typo.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&typo.stderr).contains("lisen"));
    // Switched off, the address is not checked.
    let off = check("[metrics]\nenabled = false\nlisten = \"localhost\"\n");
    assert_eq!(off.status.code(), Some(0), "{off:?}");
    assert_eq!(
        check("[metrics]\nlisten = \"[::1]:0\"\n").status.code(),
        Some(0)
    );
}
