//! `simulate` against the real gateway binary and against a platform written
//! here: every acked frame is in the log with a valid CRC, storms reconnect
//! every device, and devices answer platform requests per HJ 212-2017 §6.6.

#[allow(dead_code)]
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hj212_gateway::config::Config;
use hj212_gateway::protocol::crc::CrcVariant;
use hj212_gateway::protocol::framing::{self, Cut, FramerConfig};
use hj212_gateway::protocol::reply::{self, Target};
use hj212_gateway::protocol::{self, Dialect, Options};
use hj212_gateway::registry::Registry;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run the binary")
}

fn json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim().lines().count(),
        1,
        "exactly one JSON object on stdout: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).expect("summary is JSON")
}

/// A gateway whose registry is the simulated fleet (keys for the 2025e devices).
fn gateway(dir: &Path, fleet: &[&str]) -> (common::Bin, Config) {
    let mut args = vec!["simulate", "--target", "127.0.0.1:1", "--list-devices"];
    args.extend_from_slice(fleet);
    let out = run(&args);
    assert!(out.status.success());
    let devices = dir.join("devices.toml");
    std::fs::write(&devices, &out.stdout).unwrap();
    let cfg_path = dir.join("gw.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[registry]\ndevices_file = {:?}\n[mqtt]\nenabled = false\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            devices.display().to_string()
        ),
    )
    .unwrap();
    let cfg = Config::load(&cfg_path).expect("config");
    (common::Bin::spawn(&cfg_path, &dir.join("data")), cfg)
}

/// Every inbound record of the log, decoded with the registry (keys included).
fn logged_frames(dir: &Path, cfg: &Config) -> Vec<protocol::Frame> {
    let out = run(&[
        "export",
        "--data",
        dir.join("data").to_str().unwrap(),
        "--format",
        "raw",
        "--direction",
        "in",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reg = Registry::from_config(cfg).unwrap();
    let mut frames = Vec::new();
    let mut pos = 0;
    let raw = out.stdout;
    while let Some(cut) = framing::cut(&raw[pos..], true, &FramerConfig::default()) {
        match cut {
            Cut::Frame { len, .. } => frames.push(protocol::decode(
                Bytes::copy_from_slice(&raw[pos..pos + len]),
                &Options::new(chrono::Utc::now()),
                &reg,
            )),
            Cut::Junk { len, reason } => {
                panic!("junk in the log: {len} bytes ({})", reason.as_str())
            }
        }
        pos += cut.len();
    }
    frames
}

#[test]
fn mixed_fleet_is_acked_and_logged_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = [
        "--devices",
        "24",
        "--dialects",
        "2017=1,2005=1,2025=1,2025e=1",
        "--seed",
        "7",
    ];
    let (mut gw, cfg) = gateway(dir.path(), &fleet);
    let target = gw.addr.to_string();
    let mut args = vec!["simulate", "--target", &target];
    args.extend_from_slice(&fleet);
    args.extend_from_slice(&[
        "--cn",
        "2011",
        "--interval",
        "0.5",
        "--duration",
        "3",
        "--frame-size",
        "500",
        "--burst-at",
        "1.5",
        "--progress",
        "0",
        "--json",
    ]);
    let out = run(&args);
    let s = json(&out);
    assert!(out.status.success(), "{s}");
    let sent = s["sent"].as_u64().unwrap();
    // 24 devices x 6 real-time frames + one burst frame each.
    assert!(sent >= 24 * 6, "{s}");
    assert_eq!(s["acked"].as_u64(), Some(sent), "{s}");
    assert_eq!(s["errors"].as_u64(), Some(0), "{s}");
    assert_eq!(s["reconnects"].as_u64(), Some(0), "{s}");
    for k in ["p50", "p90", "p99", "p999", "max"] {
        assert!(s["latency_ms"][k].as_f64().unwrap() > 0.0, "{s}");
    }
    let avg = s["frame_bytes_avg"].as_f64().unwrap();
    assert!((420.0..=560.0).contains(&avg), "frame size about 500: {s}");

    gw.sigkill();
    let frames = logged_frames(dir.path(), &cfg);
    assert_eq!(
        frames.len() as u64,
        sent,
        "log holds exactly the acked frames"
    );
    let mut by_dialect = std::collections::HashMap::new();
    let mut encrypted = 0;
    let mut bursts = 0;
    for f in &frames {
        assert!(!f.has_error(), "{:?} {:?}", f.findings, f.raw);
        assert_eq!(f.crc.variant, CrcVariant::Hj212);
        assert!(f.mn().unwrap().starts_with("990007"), "MN from the seed");
        *by_dialect.entry(f.dialect).or_insert(0) += 1;
        encrypted += usize::from(f.encryption.is_some());
        if f.cn() == Some("2061") {
            bursts += 1;
            assert!(f.param("DataTime").unwrap().ends_with("0000"), "hour data");
        }
    }
    assert_eq!(bursts, 24, "one hourly frame per device in the burst");
    assert!(encrypted >= 6 * 6, "the 2025e devices encrypt: {encrypted}");
    for d in [Dialect::V2005, Dialect::V2017, Dialect::V2025] {
        assert!(
            by_dialect.get(&Some(d)).copied().unwrap_or(0) >= 6 * 6,
            "{by_dialect:?}"
        );
    }
}

#[test]
fn reconnect_storm_reconnects_every_device() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = ["--devices", "20", "--dialects", "2017=3,2025e=1"];
    let (_gw, _cfg) = gateway(dir.path(), &fleet);
    let target = _gw.addr.to_string();
    let mut args = vec!["simulate", "--target", &target];
    args.extend_from_slice(&fleet);
    args.extend_from_slice(&[
        "--interval",
        "0.4",
        "--duration",
        "3",
        "--reconnect-storm-at",
        "1.5",
        "--source-ips",
        "127.0.0.2-127.0.0.5",
        "--progress",
        "0",
        "--json",
    ]);
    let out = run(&args);
    let s = json(&out);
    assert!(out.status.success(), "{s}");
    assert_eq!(s["reconnects"].as_u64(), Some(20), "{s}");
    assert_eq!(s["errors"].as_u64(), Some(0), "{s}");
    assert_eq!(s["acked"], s["sent"], "{s}");
    assert!(s["storm_resend_s"].as_f64().unwrap() < 1.0, "{s}");
}

#[test]
fn unacked_frames_make_the_exit_code_non_zero() {
    // A listener that accepts and never answers.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
    });
    let out = run(&[
        "simulate",
        "--target",
        &addr,
        "--devices",
        "1",
        "--interval",
        "0.5",
        "--duration",
        "1",
        "--ack-timeout",
        "0.5",
        "--progress",
        "0",
        "--json",
    ]);
    let s = json(&out);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert_eq!(s["acked"].as_u64(), Some(0));
    assert_eq!(s["timeouts"], s["sent"], "{s}");
    drop(t);
}

/// Reads frames from a device connection, acking uploads that ask for it.
struct Platform {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl Platform {
    fn next(&mut self) -> protocol::Frame {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(Cut::Frame { len, .. }) =
                framing::cut(&self.buf, false, &FramerConfig::default())
            {
                let raw: Vec<u8> = self.buf.drain(..len).collect();
                let f = protocol::decode(Bytes::from(raw), &Options::new(chrono::Utc::now()), &());
                if let Some(ack) = reply::ack(&f) {
                    self.conn.write_all(&ack).unwrap();
                }
                return f;
            }
            assert!(Instant::now() < deadline, "no frame from the device");
            let mut b = [0u8; 4096];
            let n = self.conn.read(&mut b).unwrap();
            assert!(n > 0, "device closed the connection");
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    /// The next frame that is not a periodic 2011 upload.
    fn answer(&mut self) -> protocol::Frame {
        loop {
            let f = self.next();
            if f.cn() != Some("2011") {
                return f;
            }
        }
    }
}

fn expect_reply(f: &protocol::Frame, cn: &str, qn: &str, key: &str) {
    assert_eq!(f.cn(), Some(cn), "{:?}", f.raw);
    assert_eq!(f.qn(), Some(qn), "{:?}", f.raw);
    assert_eq!(f.param(key), Some("1"), "{:?}", f.raw);
}

#[test]
fn devices_answer_platform_requests() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let child = bin()
        .args([
            "simulate",
            "--target",
            &addr,
            "--devices",
            "3",
            "--dialects",
            "2017,2005,2025",
            "--cn",
            "2011",
            "--interval",
            "1",
            "--duration",
            "4",
            "--progress",
            "0",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let (conn, _) = l.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut p = Platform {
            conn,
            buf: Vec::new(),
        };
        let first = p.next();
        assert_eq!(first.cn(), Some("2011"));
        let d = first.dialect.unwrap();
        let mn = first.mn().unwrap().to_owned();
        seen.insert(d);
        let t = Target {
            dialect: d,
            st: first.st().unwrap(),
            pw: "123456",
            mn: &mn,
        };
        // 1012 moves the device clock to 2030; 1011 reads it back.
        let q1 = "20240601100000001";
        p.conn
            .write_all(&reply::set_time(t, q1, "20300101000000", None))
            .unwrap();
        expect_reply(&p.answer(), "9011", q1, "QnRtn");
        expect_reply(&p.answer(), "9012", q1, "ExeRtn");
        let q2 = "20240601100000002";
        p.conn.write_all(&reply::get_time(t, q2, None)).unwrap();
        expect_reply(&p.answer(), "9011", q2, "QnRtn");
        let time = p.answer();
        assert_eq!(time.cn(), Some("1011"));
        assert_eq!(time.qn(), Some(q2));
        let st = time.param("SystemTime").unwrap();
        assert!(st.starts_with("2030010100000"), "applied clock: {st}");
        expect_reply(&p.answer(), "9012", q2, "ExeRtn");
        // 2061 history for two hours: two uploads with those DataTimes, then 9012.
        let q3 = "20240601100000003";
        p.conn
            .write_all(&reply::history(
                t,
                q3,
                2061,
                "20240601080000",
                "20240601090000",
            ))
            .unwrap();
        expect_reply(&p.answer(), "9011", q3, "QnRtn");
        for want in ["20240601080000", "20240601090000"] {
            let h = p.answer();
            assert_eq!(h.cn(), Some("2061"), "{:?}", h.raw);
            assert!(!h.has_error(), "{:?}", h.findings);
            assert_eq!(h.param("DataTime"), Some(want));
            assert!(h.pairs.len() > 10, "factors present");
        }
        expect_reply(&p.answer(), "9012", q3, "ExeRtn");
        // An unsupported request is refused with QnRtn=2.
        let q4 = "20240601100000004";
        p.conn
            .write_all(&reply::request(t, q4, 3011, "PolId=w01018"))
            .unwrap();
        let r = p.answer();
        assert_eq!(
            (r.cn(), r.qn(), r.param("QnRtn")),
            (Some("9011"), Some(q4), Some("2"))
        );
        // Keep acking until the simulator hangs up.
        std::thread::spawn(move || {
            let mut p = p;
            while std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.next())).is_ok() {}
        });
    }
    assert_eq!(seen.len(), 3, "2005, 2017 and 2025 devices");
    let out = child.wait_with_output().unwrap();
    let s = json(&out);
    assert_eq!(s["requests"].as_u64(), Some(12), "{s}");
    assert_eq!(s["errors"].as_u64(), Some(0), "{s}");
    assert_eq!(s["acked"], s["sent"], "{s}");
    assert!(out.status.success(), "{s}");
}

/// `--speedup`: a day and a half of device time in a few seconds, every level
/// (2011, 2051, 2061 and the 2031 of a Beijing midnight) sent with DataTimes in
/// the past, and the gateway's consistency detectors find the levels agree.
#[test]
fn speedup_sends_consistent_levels_of_simulated_days() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = [
        "--devices",
        "4",
        "--dialects",
        "2017=1,2005=1",
        "--seed",
        "9",
    ];
    let cfg_path = dir.path().join("gw.toml");
    std::fs::write(
        &cfg_path,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[mqtt]\nenabled = false\n[metrics]\nenabled = false\n\
         [store]\nsync = \"off\"\n[downlink]\ntime_sync_skew = false\nbackfill = false\n\
         [alarms]\ntick = \"100ms\"\nskew_threshold = \"3d\"\n[validation]\nstale_after = \"3d\"\n",
    )
    .unwrap();
    let cfg = Config::load(&cfg_path).unwrap();
    let mut gw = common::Bin::spawn(&cfg_path, &dir.path().join("data"));
    let target = gw.addr.to_string();
    let mut args = vec!["simulate", "--target", &target];
    args.extend_from_slice(&fleet);
    let started = chrono::Utc::now();
    args.extend_from_slice(&[
        "--cn",
        "2011,2051,2061,2031",
        "--interval",
        "600",
        "--speedup",
        "30000",
        "--duration",
        "4",
        "--progress",
        "0",
        "--json",
    ]);
    let out = run(&args);
    let s = json(&out);
    assert!(out.status.success(), "{s}");
    // The detector reads behind the log.
    std::thread::sleep(Duration::from_secs(2));
    gw.sigkill();
    let frames = logged_frames(dir.path(), &cfg);
    let ended = chrono::Utc::now();
    let mut per_cn = std::collections::BTreeMap::new();
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for f in &frames {
        let t = f.data_time.expect("DataTime").timestamp();
        first = first.min(t);
        last = last.max(t);
        *per_cn.entry(f.cn().unwrap().to_owned()).or_insert(0) += 1;
        if f.cn() == Some("2031") {
            assert!(f.param("DataTime").unwrap().ends_with("000000"), "midnight");
        }
    }
    assert!(last <= ended.timestamp() + 1, "no DataTime in the future");
    assert!(
        last - first >= 30 * 3600,
        "over a day of device time: {}",
        last - first
    );
    // The simulated clock starts about 4 s x 30,000 = 34 h back, and the
    // first 2031 carries the day its midnight closes: up to 24 h before that.
    // A bound of 40 h failed whenever the run started within 6 h after a
    // Beijing midnight.
    assert!(
        first >= started.timestamp() - (34 + 24 + 1) * 3600,
        "{first}"
    );
    let non_day = frames
        .iter()
        .filter(|f| f.cn() != Some("2031"))
        .map(|f| f.data_time.unwrap().timestamp())
        .min()
        .unwrap();
    assert!(non_day >= started.timestamp() - 36 * 3600, "{non_day}");
    for cn in ["2011", "2051", "2061", "2031"] {
        assert!(per_cn.get(cn).copied().unwrap_or(0) >= 4, "{per_cn:?}");
    }
    let db = cfg.store_path(&dir.path().join("data"));
    let rows = hj212_gateway::store::AlarmStore::open_read_only(&db)
        .unwrap()
        .list(&Default::default())
        .unwrap();
    let consistency: Vec<_> = rows
        .iter()
        .filter(|r| r.kind.ends_with(".mismatch"))
        .collect();
    assert!(consistency.is_empty(), "{consistency:#?}");
}
