//! Talking back to devices, end to end: the spawned gateway binary, simulated
//! devices on real TCP sockets that implement the device side of HJ 212
//! requests (9011/9012, uploads of requested history, applying a new time,
//! answering get-time), the `command`/`sessions` binaries on the real control
//! socket, and the real SQLite frame log.

#[allow(dead_code)] // each test crate uses a subset of the shared helpers
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chrono::{FixedOffset, Utc};
use hj212_gateway::config::Config;
use hj212_gateway::protocol::{self, Dialect, Frame, Options, reply};
use hj212_gateway::store::{Direction, Reader, RecordFilter, StoredRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use common::Bin;

const PW: &str = "123456";

fn tz() -> FixedOffset {
    protocol::time::beijing()
}

/// How the simulated device answers requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 9011 QnRtn=1, the data, 9012 ExeRtn=1 (3012 sampling fails: ExeRtn=5).
    Normal,
    /// Never answers a request (acks still arrive).
    Mute,
}

#[derive(Debug)]
struct SimState {
    dialect: Dialect,
    /// Device clock minus real clock.
    offset_ms: i64,
    rtd: u32,
    mode: Mode,
    /// Every request (not an ack) the gateway sent, byte-exact.
    requests: Vec<Vec<u8>>,
    acks: usize,
    /// What the device can upload on request: (CN, DataTime N14) -> CP values.
    history: BTreeMap<(u16, String), String>,
    qn_seq: i64,
}

/// A data logger: answers the gateway's requests like the standard's flows.
struct Sim {
    mn: String,
    state: Arc<Mutex<SimState>>,
    wr: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn decode(b: &[u8]) -> Frame {
    protocol::decode(Bytes::copy_from_slice(b), &Options::new(Utc::now()), &())
}

impl SimState {
    fn clock(&self) -> chrono::DateTime<FixedOffset> {
        (Utc::now() + chrono::Duration::milliseconds(self.offset_ms)).with_timezone(&tz())
    }
    /// A fresh QN from the device clock.
    fn qn(&mut self) -> String {
        self.qn_seq += 1;
        let t = self.clock() + chrono::Duration::milliseconds(self.qn_seq);
        t.format("%Y%m%d%H%M%S%3f").to_string()
    }
    fn frame(&self, mn: &str, qn: &str, cn: u16, flag: u8, cp: &str) -> Vec<u8> {
        let seg = match self.dialect {
            Dialect::V2005 => format!("ST=32;CN={cn:04};PW={PW};MN={mn};CP=&&QN={qn};{cp}&&"),
            _ => format!("QN={qn};ST=32;CN={cn:04};PW={PW};MN={mn};Flag={flag};CP=&&{cp}&&"),
        };
        reply::envelope(seg.as_bytes()).to_vec()
    }
    fn target<'a>(&self, mn: &'a str) -> reply::Target<'a> {
        reply::Target {
            dialect: self.dialect,
            st: "32",
            pw: PW,
            mn,
        }
    }

    /// The device's answer to one gateway request.
    fn answer(&mut self, mn: &str, f: &Frame) -> Vec<u8> {
        let (Some(cn), Some(qn)) = (f.cn_num(), f.qn().map(str::to_owned)) else {
            return Vec::new();
        };
        if self.mode == Mode::Mute {
            return Vec::new();
        }
        let t = self.target(mn);
        let mut out = reply::qn_rtn(t, &qn, 1).to_vec();
        let mut exe = 1;
        match cn {
            1011 => {
                let now = protocol::time::format_n14(self.clock());
                out.extend(self.frame(mn, &qn, 1011, 4, &format!("SystemTime={now}")));
            }
            1012 => {
                let st = f.param("SystemTime").expect("SystemTime");
                let want = protocol::time::parse_local(st.as_bytes(), tz()).expect("N14");
                self.offset_ms = (want.with_timezone(&Utc) - Utc::now()).num_milliseconds();
            }
            1061 => {
                let cp = format!("RtdInterval={}", self.rtd);
                out.extend(self.frame(mn, &qn, 1061, 4, &cp));
            }
            1062 => self.rtd = f.param("RtdInterval").unwrap().parse().unwrap(),
            2031 | 2051 | 2061 => {
                let (b, e) = (
                    f.param("BeginTime").unwrap().to_owned(),
                    f.param("EndTime").unwrap().to_owned(),
                );
                let rows: Vec<(String, String)> = self
                    .history
                    .range((cn, b)..=(cn, e))
                    .map(|((_, t), cp)| (t.clone(), cp.clone()))
                    .collect();
                if rows.is_empty() {
                    exe = 100;
                }
                for (t, cp) in rows {
                    let q = self.qn();
                    out.extend(self.frame(mn, &q, cn, 4, &format!("DataTime={t};{cp}")));
                }
            }
            3012 => exe = 5,
            _ => {}
        }
        out.extend(reply::exe_rtn(t, &qn, exe).to_vec());
        out
    }
}

impl Sim {
    /// Connects and sends a first real-time upload so the gateway knows the MN.
    async fn start(addr: std::net::SocketAddr, mn: &str, dialect: Dialect, mode: Mode) -> Sim {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut rd, wr) = stream.into_split();
        let state = Arc::new(Mutex::new(SimState {
            dialect,
            offset_ms: 0,
            rtd: 60,
            mode,
            requests: Vec::new(),
            acks: 0,
            history: BTreeMap::new(),
            qn_seq: 0,
        }));
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        let (st, w, m) = (state.clone(), wr.clone(), mn.to_owned());
        let task = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            loop {
                if rd.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                // The gateway ends every frame with CR LF.
                while let Some(end) = buf.windows(2).position(|x| x == b"\r\n") {
                    let raw = buf.split_to(end + 2).freeze();
                    let f = decode(&raw);
                    let answer = {
                        let mut s = st.lock().unwrap();
                        if matches!(f.cn_num(), Some(9013 | 9014)) {
                            s.acks += 1;
                            continue;
                        }
                        s.requests.push(raw.to_vec());
                        s.answer(&m, &f)
                    };
                    if !answer.is_empty() {
                        let _ = w.lock().await.write_all(&answer).await;
                    }
                }
            }
        });
        let sim = Sim {
            mn: mn.to_owned(),
            state,
            wr,
            task,
        };
        sim.send_rtd().await;
        if dialect != Dialect::V2005 {
            until("first upload acked", || sim.state.lock().unwrap().acks >= 1).await;
        }
        sim
    }

    async fn send(&self, bytes: Vec<u8>) {
        self.wr.lock().await.write_all(&bytes).await.expect("write");
    }

    /// A real-time upload stamped with the device clock (ack requested).
    async fn send_rtd(&self) {
        let b = {
            let mut s = self.state.lock().unwrap();
            let q = s.qn();
            let t = protocol::time::format_n14(s.clock());
            let flag = if s.dialect == Dialect::V2005 { 0 } else { 5 };
            s.frame(
                &self.mn,
                &q,
                2011,
                flag,
                &format!("DataTime={t};a21026-Rtd=12.5,a21026-Flag=N"),
            )
        };
        self.send(b).await;
    }

    /// A live minute/hour/day upload (no ack requested) for DataTime `t`.
    async fn send_series(&self, cn: u16, t: &str) {
        let b = {
            let mut s = self.state.lock().unwrap();
            let q = s.qn();
            s.frame(
                &self.mn,
                &q,
                cn,
                4,
                &format!("DataTime={t};a21026-Avg=12.5,a21026-Flag=N"),
            )
        };
        self.send(b).await;
    }

    fn requests(&self) -> Vec<Frame> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|r| decode(r))
            .collect()
    }
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Gw {
    bin: Bin,
    dir: tempfile::TempDir,
}

impl Gw {
    fn start(extra: &str) -> Gw {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[alarms]\nenabled = false\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
             [downlink]\nover_time = \"300ms\"\nre_count = 2\nexec_timeout = \"3s\"\n{extra}\n"
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, cfg).unwrap();
        let bin = Bin::spawn(&path, &dir.path().join("data"));
        Gw { bin, dir }
    }
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn db(&self) -> PathBuf {
        Config::default().store_path(&self.data())
    }
    fn records(&self) -> Vec<StoredRecord> {
        records(&self.db())
    }
    /// Waits until `sessions` lists `mn` (2005 uploads are not acked).
    async fn wait_session(&self, mn: &str) {
        let data = self.data();
        until("session listed", || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
                .args(["sessions", "--json", "--data", data.to_str().unwrap()])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains(mn)
        })
        .await;
    }
    /// Runs the `command` binary (`--data` finds the socket); (exit code, stdout, stderr).
    async fn command(&self, mn: &str, args: &[&str]) -> (i32, String, String) {
        let data = self.data();
        let mut all = vec!["command", "--mn", mn, "--data", data.to_str().unwrap()];
        all.extend_from_slice(args);
        run(&all).await
    }
}

async fn run(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
        .args(args)
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .await
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn records(db: &Path) -> Vec<StoredRecord> {
    Reader::open(db)
        .expect("reader")
        .records(RecordFilter::default())
        .expect("records")
        .collect::<Result<_, _>>()
        .expect("read")
}

fn out_requests<'a>(recs: &'a [StoredRecord], peer: &str, cn: &str) -> Vec<&'a StoredRecord> {
    recs.iter()
        .filter(|r| r.direction == Direction::Out && r.peer == peer && r.cn.as_deref() == Some(cn))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_end_to_end_through_the_control_socket() {
    let gw = Gw::start("");
    let mn = common::mn(1);
    let sim = Sim::start(gw.bin.addr, &mn, Dialect::V2017, Mode::Normal).await;
    let dev = |s: &Sim| s.state.lock().unwrap().offset_ms;

    // sessions: the device, its peer, dialect and last frame.
    let data = gw.data();
    let (code, out, err) = run(&["sessions", "--data", data.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&mn) && out.contains("2017") && out.contains("1 session(s)"),
        "{out}"
    );
    let (code, out, _) = run(&["sessions", "--json", "--data", data.to_str().unwrap()]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v[0]["mn"], mn.as_str());
    assert_eq!(v[0]["dialect"], "2017");
    assert!(v[0]["last_frame_ms"].as_i64().unwrap() > 0);
    assert!(v[0]["peer"].as_str().unwrap().starts_with("127.0.0.1:"));

    // get-time: 9011, the 1011 upload with the device clock, 9012.
    let (code, out, err) = gw.command(&mn, &["get-time"]).await;
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "sent CN=1011 QN=",
        "9011 QnRtn=1: ready to execute",
        "upload CN=1011",
        "SystemTime=",
        "9012 ExeRtn=1: success",
        "done: success",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }

    // set-time: the device applies the time it was given.
    let (code, out, err) = gw.command(&mn, &["set-time", "20240601090000"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let want = protocol::time::parse_local(b"20240601090000", tz()).unwrap();
    let off = dev(&sim) - (want.with_timezone(&Utc) - Utc::now()).num_milliseconds();
    assert!(off.abs() < 5_000, "device clock applied: {off} ms off");
    // set-time without TIME: the gateway's clock.
    let (code, _, err) = gw.command(&mn, &["set-time"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(dev(&sim).abs() < 5_000, "device clock back to now");

    // fetch: the device uploads the window; each upload is printed and marked in the log.
    {
        let mut s = sim.state.lock().unwrap();
        for h in ["00", "01", "02", "03"] {
            s.history.insert(
                (2061, format!("20240601{h}0000")),
                "a21026-Avg=30.0,a21026-Flag=N".into(),
            );
        }
    }
    let (code, out, err) = gw
        .command(
            &mn,
            &[
                "fetch",
                "--cn",
                "2061",
                "--from",
                "20240601010000",
                "--to",
                "2024-06-01T03:00:00+08:00",
            ],
        )
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("upload CN=2061").count(), 3, "{out}");
    assert!(out.contains("DataTime=20240601010000") && out.contains("DataTime=20240601030000"));
    let recs = gw.records();
    let marked: Vec<_> = recs
        .iter()
        .filter(|r| r.direction == Direction::In && r.cn.as_deref() == Some("2061"))
        .collect();
    assert_eq!(marked.len(), 3);
    assert!(
        marked
            .iter()
            .all(|r| r.findings.contains("downlink.backfill")),
        "fetched uploads are marked"
    );
    let fetch = out_requests(&recs, "operator", "2061");
    assert_eq!(fetch.len(), 1);
    assert!(
        String::from_utf8_lossy(&fetch[0].raw)
            .contains("CP=&&BeginTime=20240601010000;EndTime=20240601030000&&")
    );

    // set-rtd-interval, then get-rtd-interval reads it back.
    let (code, _, err) = gw.command(&mn, &["set-rtd-interval", "30"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = gw.command(&mn, &["get-rtd-interval"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("upload CN=1061") && out.contains("RtdInterval=30"),
        "{out}"
    );

    // calibrate succeeds; sample fails on the device (ExeRtn=5): exit 1, reason printed.
    let (code, out, err) = gw.command(&mn, &["calibrate", "--pol", "a21026"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = gw.command(&mn, &["sample", "--pol", "w01018"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("9012 ExeRtn=5: system busy"), "{out}");
    assert!(err.contains("ExeRtn=5"), "{err}");

    // raw: any CN and CP.
    let (code, out, err) = gw
        .command(
            &mn,
            &["raw", "--cn", "3020", "--cp", "PolId=w01018;InfoId=i13004"],
        )
        .await;
    assert_eq!(code, 0, "{out}{err}");
    // An empty window: the device says "no data" (ExeRtn=100).
    let (code, out, _) = gw
        .command(
            &mn,
            &[
                "fetch",
                "--cn",
                "2051",
                "--from",
                "20200101000000",
                "--to",
                "20200101010000",
            ],
        )
        .await;
    assert_eq!(code, 1);
    assert!(out.contains("ExeRtn=100: no data"), "{out}");
    // Bad input is refused before anything is sent.
    let (code, _, err) = gw
        .command(&mn, &["fetch", "--cn", "2011", "--from", "x", "--to", "y"])
        .await;
    assert_eq!(code, 2, "{err}");

    // Everything the device got, byte-exact in the log with peer "operator", in 2017
    // (Flag=5) and with QNs strictly increasing.
    let reqs = sim.requests();
    let cns: Vec<&str> = reqs.iter().map(|f| f.cn().unwrap()).collect();
    assert_eq!(
        cns,
        [
            "1011", "1012", "1012", "2061", "1062", "1061", "3011", "3012", "3020", "2051"
        ]
    );
    let recs = gw.records();
    let mut last = String::new();
    for f in &reqs {
        assert_eq!(f.flag, Some(5));
        let qn = f.qn().unwrap().to_owned();
        assert!(qn > last, "QNs increase: {qn} after {last}");
        last = qn;
        assert!(
            recs.iter()
                .any(|r| r.raw == f.raw && r.direction == Direction::Out && r.peer == "operator"),
            "request logged"
        );
    }
    // The device's 9011/9012 are logged inbound.
    let replies = recs
        .iter()
        .filter(|r| {
            r.direction == Direction::In && matches!(r.cn.as_deref(), Some("9011" | "9012"))
        })
        .count();
    assert_eq!(replies, 2 * reqs.len());
    assert_eq!(sim.mn, mn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_in_the_device_dialect_2005() {
    let gw = Gw::start("");
    let mn = "88888880000001";
    let _sim = Sim::start(gw.bin.addr, mn, Dialect::V2005, Mode::Normal).await;
    gw.wait_session(mn).await;
    let (code, out, err) = gw.command(mn, &["get-time"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("9011 QnRtn=1") && out.contains("SystemTime="),
        "{out}"
    );
    let recs = gw.records();
    let req = out_requests(&recs, "operator", "1011");
    assert_eq!(req.len(), 1);
    assert!(
        String::from_utf8_lossy(&req[0].raw).contains(";Flag=3;"),
        "2005 request Flag"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_device_times_out_after_re_count_resends() {
    let gw = Gw::start("");
    let mn = common::mn(2);
    let sim = Sim::start(gw.bin.addr, &mn, Dialect::V2017, Mode::Mute).await;
    let (code, out, err) = gw.command(&mn, &["get-time"]).await;
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.contains("(attempt 3)") && !out.contains("(attempt 4)"),
        "{out}"
    );
    assert!(
        err.contains("no 9011") && err.contains("after 3 sends"),
        "{err}"
    );
    // 1 + re_count identical sends (same QN), all logged.
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 3);
    assert!(reqs.iter().all(|f| f.raw == reqs[0].raw));
    let recs = gw.records();
    let logged = out_requests(&recs, "operator", "1011");
    assert_eq!(logged.len(), 3, "every resend is in the log");
    // The device is free again afterwards: the next request goes out.
    let (code, _, _) = gw.command(&mn, &["get-rtd-interval"]).await;
    assert_eq!(code, 3);
    assert_eq!(sim.requests().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_and_missing_gateway_are_clear_errors() {
    let gw = Gw::start("");
    let (code, out, err) = gw.command(&common::mn(77), &["get-time"]).await;
    assert_eq!(code, 4, "{out}{err}");
    assert!(err.contains("is not connected"), "{err}");
    // Nothing was sent or logged for it.
    assert!(gw.records().iter().all(|r| r.direction != Direction::Out));
    // A device that leaves is offline again.
    let mn = common::mn(3);
    let sim = Sim::start(gw.bin.addr, &mn, Dialect::V2017, Mode::Normal).await;
    drop(sim);
    let data = gw.data();
    until("session gone", || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
            .args(["sessions", "--json", "--data", data.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "[]"
    })
    .await;
    let (code, _, err) = gw.command(&mn, &["get-time"]).await;
    assert_eq!(code, 4, "{err}");
    // Socket is owner-only; it goes away when the gateway stops.
    let sock = gw.data().join("control.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pid = gw.bin.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    until("socket removed", || !sock.exists()).await;
    // No gateway: exit 2 naming the socket.
    let (code, _, err) = gw.command(&mn, &["get-time"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("control socket") && err.contains("control.sock"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_device_gets_1012_and_recovers() {
    let gw = Gw::start(
        "time_sync_skew = true\ntime_sync_threshold = \"60s\"\ntime_sync_count = 3\ntime_sync_interval = \"1h\"\n",
    );
    let mn = common::mn(4);
    let sim = Sim::start(gw.bin.addr, &mn, Dialect::V2017, Mode::Normal).await;
    // The device clock runs two hours ahead.
    sim.state.lock().unwrap().offset_ms = 2 * 3_600_000;
    for _ in 0..3 {
        sim.send_rtd().await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    until("1012 applied", || {
        sim.state.lock().unwrap().offset_ms.abs() < 5_000
    })
    .await;
    // Recovered: further uploads are on time and trigger nothing more.
    for _ in 0..4 {
        sim.send_rtd().await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    until("acks", || sim.state.lock().unwrap().acks >= 8).await;
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 1, "exactly one calibration");
    assert_eq!(reqs[0].cn(), Some("1012"));
    let recs = gw.records();
    assert_eq!(out_requests(&recs, "auto:timesync", "1012").len(), 1);
    let ok = recs.iter().any(|r| {
        r.direction == Direction::In
            && r.cn.as_deref() == Some("9012")
            && r.qn.as_deref() == reqs[0].qn()
            && String::from_utf8_lossy(&r.raw).contains("ExeRtn=1")
    });
    assert!(ok, "the device's ExeRtn=1 is logged");
    // The last upload's DataTime is within the threshold of its receive time.
    let last = recs
        .iter()
        .rev()
        .find(|r| r.direction == Direction::In && r.cn.as_deref() == Some("2011"))
        .unwrap();
    let dt = chrono::DateTime::parse_from_rfc3339(last.data_time.as_deref().unwrap()).unwrap();
    assert!((dt.timestamp_millis() - last.received_at_ms).abs() < 60_000);

    // A device asking with 1013 gets its 9013, then a 1012.
    let b = {
        let mut s = sim.state.lock().unwrap();
        s.offset_ms = -600_000;
        let q = s.qn();
        s.frame(&mn, &q, 1013, 5, "PolId=w01018")
    };
    sim.send(b).await;
    until("second 1012 applied", || {
        sim.state.lock().unwrap().offset_ms.abs() < 5_000
    })
    .await;
    let recs = gw.records();
    let sets = out_requests(&recs, "auto:timesync", "1012");
    assert_eq!(sets.len(), 2);
    // For the instrument the 1013 named.
    assert!(String::from_utf8_lossy(&sets[1].raw).contains("CP=&&PolId=w01018;SystemTime="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_is_backfilled_and_the_uploads_are_marked() {
    let other = common::mn(6);
    let gw = Gw::start(&format!(
        "backfill = true\nbackfill_interval = \"1m\"\n\n[[device]]\nmn = \"{other}\"\nbackfill = false\n"
    ));
    let mn = common::mn(5);
    let sim = Sim::start(gw.bin.addr, &mn, Dialect::V2017, Mode::Normal).await;
    let hour = |h: u32| format!("20240601{h:02}0000");
    {
        let mut s = sim.state.lock().unwrap();
        for h in 0..8 {
            s.history
                .insert((2061, hour(h)), "a21026-Avg=30.0,a21026-Flag=N".into());
        }
    }
    // Live hour data 00, 01, 02 and then 06: 03..05 are missing.
    for h in [0, 1, 2] {
        sim.send_series(2061, &hour(h)).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // In one write with the 06 upload, a 1013: the calibration goes first, the
    // backfill waits for the engine and follows once the 1012 exchange is over.
    let both = {
        let mut s = sim.state.lock().unwrap();
        let q = s.qn();
        let mut b = s.frame(&mn, &q, 1013, 5, "");
        let q = s.qn();
        b.extend(s.frame(
            &mn,
            &q,
            2061,
            4,
            &format!("DataTime={};a21026-Avg=12.5,a21026-Flag=N", hour(6)),
        ));
        b
    };
    sim.send(both).await;
    let db = gw.db();
    until("backfilled", || {
        records(&db)
            .iter()
            .filter(|r| r.findings.contains("downlink.backfill"))
            .count()
            == 3
    })
    .await;
    let reqs = sim.requests();
    let cns: Vec<_> = reqs.iter().map(|f| f.cn().unwrap()).collect();
    assert_eq!(cns, ["1012", "2061"]);
    assert_eq!(reqs[1].param("BeginTime"), Some(hour(3).as_str()));
    assert_eq!(reqs[1].param("EndTime"), Some(hour(5).as_str()));
    let recs = gw.records();
    assert_eq!(out_requests(&recs, "auto:backfill", "2061").len(), 1);
    let data: Vec<(&str, bool)> = recs
        .iter()
        .filter(|r| r.direction == Direction::In && r.cn.as_deref() == Some("2061"))
        .map(|r| {
            (
                r.data_time.as_deref().unwrap(),
                r.findings.contains("downlink.backfill"),
            )
        })
        .collect();
    assert_eq!(
        data,
        [
            ("2024-06-01T00:00:00+08:00", false),
            ("2024-06-01T01:00:00+08:00", false),
            ("2024-06-01T02:00:00+08:00", false),
            ("2024-06-01T06:00:00+08:00", false),
            ("2024-06-01T03:00:00+08:00", true),
            ("2024-06-01T04:00:00+08:00", true),
            ("2024-06-01T05:00:00+08:00", true),
        ]
    );
    // Backfill off for a device: its gap is left alone.
    let sim2 = Sim::start(gw.bin.addr, &other, Dialect::V2017, Mode::Normal).await;
    for h in [0, 5] {
        sim2.send_series(2061, &hour(h)).await;
    }
    sim2.send_rtd().await;
    until("acked", || sim2.state.lock().unwrap().acks >= 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sim2.requests().is_empty());
}

/// Reads one CR LF terminated frame.
async fn read_frame(s: &mut TcpStream, buf: &mut BytesMut) -> Vec<u8> {
    loop {
        if let Some(end) = buf.windows(2).position(|x| x == b"\r\n") {
            return buf.split_to(end + 2).to_vec();
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(buf))
            .await
            .expect("frame in time")
            .expect("read");
        assert!(n > 0, "gateway closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_2025_answers_1014_and_pushes_the_next_key() {
    const KEY: &str = "30303030303030303030303030303030";
    const NEXT: &str = "0123456789ABCDEF0123456789ABCDEF";
    let mn = common::mn(8);
    let gw = Gw::start(&format!(
        "\n[[device]]\nmn = \"{mn}\"\ndialect = \"2025\"\nkey = \"{KEY}\"\nnext_key = \"{NEXT}\"\n"
    ));
    let key = protocol::crypt::parse_key(KEY).unwrap();
    let next = protocol::crypt::parse_key(NEXT).unwrap();
    let t = reply::Target {
        dialect: Dialect::V2025,
        st: "32",
        pw: PW,
        mn: &mn,
    };
    let mut s = TcpStream::connect(gw.bin.addr).await.unwrap();
    let mut buf = BytesMut::new();
    // The device asks for a new key: 1014, CP encrypted under its current key.
    let ask = reply::request_encrypted(
        t,
        "20260101080000001",
        1014,
        "SKCreateTime=20260101080000001",
        &key,
    );
    s.write_all(&ask).await.unwrap();
    let ack = decode(&read_frame(&mut s, &mut buf).await);
    assert_eq!(
        (ack.cn(), ack.qn()),
        (Some("9013"), Some("20260101080000001"))
    );
    // Then the gateway pushes the next key, encrypted under the current one.
    let push = read_frame(&mut s, &mut buf).await;
    assert!(
        !String::from_utf8_lossy(&push).contains(NEXT),
        "NewSK travels encrypted"
    );
    struct K([u8; 16]);
    impl protocol::DeviceLookup for K {
        fn profile(&self, _: &str) -> Option<Arc<protocol::DeviceProfile>> {
            Some(Arc::new(protocol::DeviceProfile {
                keys: vec![self.0],
                ..Default::default()
            }))
        }
    }
    let f = protocol::decode(
        Bytes::from(push.clone()),
        &Options::new(Utc::now()),
        &K(key),
    );
    assert!(!f.has_error(), "{:?}", f.findings);
    assert_eq!(f.cn(), Some("1014"));
    assert_eq!(f.flag, Some(9));
    assert_eq!(f.param("NewSK"), Some(NEXT));
    let qn = f.qn().unwrap().to_owned();
    s.write_all(&reply::qn_rtn(t, &qn, 1)).await.unwrap();
    s.write_all(&reply::exe_rtn(t, &qn, 1)).await.unwrap();
    // During the changeover both keys are accepted: uploads under the new one and the old one.
    for (i, k) in [next, key].iter().enumerate() {
        let q = format!("2026010108000100{i}");
        let now = protocol::time::format_n14(Utc::now().with_timezone(&tz()));
        let up = reply::request_encrypted(
            t,
            &q,
            2011,
            &format!("DataTime={now};a21026-Rtd=12.5,a21026-Flag=N"),
            k,
        );
        s.write_all(&up).await.unwrap();
        let ack = decode(&read_frame(&mut s, &mut buf).await);
        assert_eq!(
            (ack.cn(), ack.qn()),
            (Some("9014"), Some(q.as_str())),
            "upload {i} acked"
        );
    }
    let recs = gw.records();
    let pushed = out_requests(&recs, "auto:key", "1014");
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0].raw, push, "the push is logged byte-exact");
    assert!(
        !pushed[0].findings.contains(NEXT)
            && !String::from_utf8_lossy(
                &recs
                    .iter()
                    .map(|r| r.raw.clone())
                    .collect::<Vec<_>>()
                    .concat()
            )
            .contains(NEXT),
        "the new key never appears in clear in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_at_a_time_then_a_bounded_queue_then_busy() {
    let gw = Arc::new(Gw::start("queue = 1"));
    let mn = common::mn(9);
    let sim = Sim::start(gw.bin.addr, &mn, Dialect::V2017, Mode::Mute).await;
    let spawn = |args: &'static [&'static str]| {
        let (gw, mn) = (gw.clone(), mn.clone());
        tokio::spawn(async move { gw.command(&mn, args).await })
    };
    let first = spawn(&["get-time"]);
    until("first request sent", || sim.requests().len() == 1).await;
    let second = spawn(&["get-rtd-interval"]);
    // The second waits in the queue (capacity 1): nothing more reaches the device.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(sim.requests().len(), 1);
    let (code, _, err) = gw.command(&mn, &["calibrate", "--pol", "a21026"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("requests waiting already"), "{err}");
    assert_eq!(first.await.unwrap().0, 3);
    assert_eq!(second.await.unwrap().0, 3);
    // Strictly one after the other: three sends of 1011, then three of 1061.
    let cns: Vec<_> = sim
        .requests()
        .iter()
        .map(|f| f.cn().unwrap().to_owned())
        .collect();
    assert_eq!(cns, ["1011", "1011", "1011", "1061", "1061", "1061"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_requests_share_the_engine_with_operators() {
    // A platform the gateway dials (persistent), forwarding nothing but 9999.
    let platform = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let paddr = platform.local_addr().unwrap();
    let gw = Arc::new(Gw::start(&format!(
        "\n[[upstream]]\nname = \"prov\"\naddr = \"{paddr}\"\ncn = [\"9999\"]\n"
    )));
    let (mut up, _) = tokio::time::timeout(Duration::from_secs(10), platform.accept())
        .await
        .expect("gateway connects to the platform")
        .unwrap();
    let mn = common::mn(10);
    let sim = Sim::start(gw.bin.addr, &mn, Dialect::V2017, Mode::Mute).await;
    // An operator request is in progress on the silent device...
    let op = {
        let (gw, mn) = (gw.clone(), mn.clone());
        tokio::spawn(async move { gw.command(&mn, &["get-time"]).await })
    };
    until("operator request sent", || sim.requests().len() == 1).await;
    // ...when the platform asks for the real-time interval: it waits its turn,
    // then is sent (and resent, same bytes) like any request.
    let t = reply::Target {
        dialect: Dialect::V2017,
        st: "32",
        pw: PW,
        mn: &mn,
    };
    let req = reply::get_rtd_interval(t, "20240601120000001");
    up.write_all(&req).await.unwrap();
    assert_eq!(op.await.unwrap().0, 3);
    until("relayed request resent", || sim.requests().len() == 6).await;
    let reqs = sim.requests();
    assert!(reqs[..3].iter().all(|f| f.cn() == Some("1011")));
    assert!(
        reqs[3..].iter().all(|f| f.raw == req),
        "byte-exact, platform's QN"
    );
    let recs = gw.records();
    assert_eq!(out_requests(&recs, "prov", "1061").len(), 3);
    assert_eq!(out_requests(&recs, "operator", "1011").len(), 3);
    // Now the device answers: the next platform request's replies go back to it.
    sim.state.lock().unwrap().mode = Mode::Normal;
    let req = reply::get_rtd_interval(t, "20240601120000002");
    up.write_all(&req).await.unwrap();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(decode(&read_frame(&mut up, &mut buf).await));
    }
    let cns: Vec<_> = got.iter().map(|f| f.cn().unwrap().to_owned()).collect();
    assert_eq!(cns, ["9011", "1061", "9012"]);
    assert!(got.iter().all(|f| f.qn() == Some("20240601120000002")));
    assert_eq!(got[1].param("RtdInterval"), Some("60"));
}
