//! The command line where the README promised more than it did: output whose
//! reader goes away, Ctrl-C in the middle of a run, the `--since` forms of
//! `export`, what a raw export holds and what its JSON shows of passwords.
//!
//! All against the real binary, a real gateway (`serve`) and its frame log.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

const PW: &str = "s3cret77";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
}

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .env_remove("STATE_DIRECTORY")
        .output()
        .expect("run the binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A gateway on ephemeral ports, no broker.
fn gateway(dir: &Path) -> common::Bin {
    let cfg = dir.join("gw.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[mqtt]\nenabled = false\n\
         [downlink]\ntime_sync_skew = false\nbackfill = false\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    common::Bin::spawn(&cfg, &dir.join("data"))
}

/// Sends `n` uploads (password [`PW`]) on one connection, each acked before the next.
fn upload(addr: std::net::SocketAddr, n: u32) -> Vec<Vec<u8>> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut frames = Vec::new();
    for i in 0..n {
        let f = common::upload(&common::mn(1), &common::qn(i), PW);
        c.write_all(&f).unwrap();
        let ack = common::expected_ack(&f);
        let mut got = vec![0u8; ack.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, ack);
        frames.push(f);
    }
    frames
}

/// A data dir whose log holds `n` acked uploads (and their acks).
fn logged(dir: &Path, n: u32) -> (PathBuf, Vec<Vec<u8>>) {
    let gw = gateway(dir);
    let frames = upload(gw.addr, n);
    // The acks are logged after they are written: let the last one commit.
    std::thread::sleep(Duration::from_millis(500));
    drop(gw);
    (dir.join("data"), frames)
}

/// `args` with stdout on a pipe whose reader is already gone, as after `| head`
/// has read what it wanted: every write gets EPIPE.
fn with_reader_gone(args: &[&str]) -> Child {
    let mut child = bin()
        .args(args)
        .env_remove("STATE_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    child
}

/// Waits up to `limit` for `child`; kills it and fails if it is still running.
fn exits_within(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}; stderr: {}",
                text(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn sigint(child: &Child) {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(child),
        rustix::process::Signal::INT,
    )
    .expect("SIGINT");
}

/// Reads `child`'s stderr in the background (a progress line could fill the pipe).
fn drain_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut e = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = e.read_to_string(&mut s);
        s
    })
}

#[test]
fn replay_into_a_closed_pipe_ends_quietly_with_0() {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("capture.bin");
    let frames: Vec<u8> = (0..50)
        .flat_map(|i| common::upload(&common::mn(i), &common::qn(i), PW))
        .collect();
    std::fs::write(&capture, frames).unwrap();
    let out = exits_within(
        with_reader_gone(&["replay", capture.to_str().unwrap()]),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "quiet");

    // The same with --report: the file is still written.
    let report = dir.path().join("audit.json");
    let out = exits_within(
        with_reader_gone(&[
            "replay",
            capture.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["totals"]["frames"], 50);
}

#[test]
fn tail_with_a_filter_that_matches_nothing_ends_when_its_reader_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = logged(dir.path(), 1);
    let started = Instant::now();
    let out = exits_within(
        with_reader_gone(&[
            "tail",
            "--data",
            data.to_str().unwrap(),
            "--mn",
            "NO-SUCH-MN",
        ]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
    assert!(started.elapsed() < Duration::from_secs(5));

    // With its reader there, it keeps following.
    let mut child = bin()
        .args(["tail", "--data", data.to_str().unwrap(), "--mn", "NO-SUCH"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(child.try_wait().unwrap().is_none(), "tail ended by itself");
    sigint(&child);
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn replay_to_a_gateway_interrupted_prints_the_summary_so_far_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let capture = dir.path().join("capture.bin");
    let frames: Vec<u8> = (0..400)
        .flat_map(|i| common::upload(&common::mn(1), &common::qn(i), PW))
        .collect();
    std::fs::write(&capture, frames).unwrap();
    let report = dir.path().join("report.json");
    let mut child = bin()
        .args([
            "replay",
            capture.to_str().unwrap(),
            "--to",
            &gw.addr.to_string(),
            "--rate",
            "20",
            "--report",
            report.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = drain_stderr(&mut child);
    std::thread::sleep(Duration::from_millis(1500));
    sigint(&child);
    let out = exits_within(child, Duration::from_secs(10));
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(130),
        "{stdout}{}",
        err.join().unwrap()
    );
    assert!(stdout.contains("totals: 400 items"), "{stdout}");
    assert!(stdout.contains("sent to "), "{stdout}");
    assert!(stdout.contains("interrupted (Ctrl-C)"), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let send = &r["send"];
    assert_eq!(send["interrupted"], true, "{send}");
    let sent = send["sent"].as_u64().unwrap();
    assert!((5..400).contains(&sent), "{send}");
    assert!(send["acked"].as_u64().unwrap() + 1 >= sent, "{send}");
}

fn simulate_interrupted(target: &str, json: bool) -> (Output, String) {
    let mut args = vec![
        "simulate",
        "--target",
        target,
        "--devices",
        "2",
        "--interval",
        "0.2",
        "--cn",
        "2011",
        "--duration",
        "60",
        "--progress",
        "0",
    ];
    if json {
        args.push("--json");
    }
    let mut child = bin()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = drain_stderr(&mut child);
    std::thread::sleep(Duration::from_millis(1500));
    sigint(&child);
    let out = exits_within(child, Duration::from_secs(10));
    (out, err.join().unwrap())
}

#[test]
fn simulate_interrupted_prints_the_summary_so_far_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let target = gw.addr.to_string();

    let (out, err) = simulate_interrupted(&target, true);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}{err}");
    let s: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(s["interrupted"], true, "{s}");
    assert!(s["sent"].as_u64().unwrap() >= 4, "{s}");
    let d = s["duration_s"].as_f64().unwrap();
    assert!(d > 0.5 && d < 10.0, "the time actually run: {s}");
    assert_eq!(s["devices_connected"], 2, "{s}");

    let (out, err) = simulate_interrupted(&target, false);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}{err}");
    assert!(stdout.contains("interrupted (Ctrl-C)"), "{stdout}");
    assert!(stdout.contains("ack latency ms"), "{stdout}");
}

#[test]
fn export_takes_relative_times_like_alarms() {
    let dir = tempfile::tempdir().unwrap();
    let (data, frames) = logged(dir.path(), 3);
    let data = data.to_str().unwrap();
    let count = |args: &[&str]| {
        let mut all = vec!["export", "--data", data, "--direction", "in"];
        all.extend_from_slice(args);
        let out = run(&all);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout).lines().count()
    };
    assert_eq!(count(&["--since", "24h"]), frames.len());
    assert_eq!(count(&["--since", "1h", "--until", "0s"]), frames.len());
    assert_eq!(count(&["--until", "1h"]), 0);
    assert_eq!(
        count(&["--since", "2024-06-01T00:00:00+08:00"]),
        frames.len()
    );
    let bad = run(&["export", "--data", data, "--since", "yesterday"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("--since \"yesterday\""),
        "{}",
        text(&bad.stderr)
    );
    // alarms and exchanges read the same forms through the same parser.
    for cmd in ["alarms", "exchanges"] {
        let out = run(&[cmd, "--data", data, "--since", "7d"]);
        assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
    }
}

#[test]
fn raw_export_holds_what_devices_sent_and_replay_counts_no_false_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (data, frames) = logged(dir.path(), 3);
    let data = data.to_str().unwrap();
    let raw = run(&["export", "--data", data, "--format", "raw"]);
    assert!(raw.status.success(), "{}", text(&raw.stderr));
    assert_eq!(raw.stdout, frames.concat(), "inbound only, byte-exact");
    let all = run(&[
        "export",
        "--data",
        data,
        "--format",
        "raw",
        "--direction",
        "all",
    ]);
    for f in &frames {
        let ack = common::expected_ack(f);
        assert!(all.stdout.windows(ack.len()).any(|w| w == ack.as_slice()));
    }

    let capture = dir.path().join("capture.bin");
    std::fs::write(&capture, &raw.stdout).unwrap();
    let out = run(&["replay", capture.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("totals: 3 items, 3 frames (3 accepted, 0 rejected)"),
        "{stdout}"
    );
    assert!(stdout.contains("0 duplicates"), "{stdout}");
    assert!(stdout.contains("0 frames without MN"), "{stdout}");
}

#[test]
fn json_exports_redact_the_password_in_raw_and_keep_the_exact_bytes_in_raw_b64() {
    let dir = tempfile::tempdir().unwrap();
    let (data, frames) = logged(dir.path(), 2);
    let data = data.to_str().unwrap();
    let out = run(&["export", "--data", data, "--direction", "in"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), frames.len());
    for (v, f) in lines.iter().zip(&frames) {
        let raw = v["raw"].as_str().unwrap();
        assert!(raw.contains(";PW=<redacted>;"), "{raw}");
        assert!(!raw.contains(PW), "{raw}");
        let exact = base64::engine::general_purpose::STANDARD
            .decode(v["raw_b64"].as_str().unwrap())
            .unwrap();
        assert_eq!(&exact, f, "raw_b64 is the evidence, byte-exact");
        // Only the password differs.
        assert_eq!(raw, text(f).replace(&format!("PW={PW}"), "PW=<redacted>"));
    }
    assert!(!stdout.contains(PW));

    // replay reads raw_b64: the JSON export replays as the frames themselves.
    let jsonl = dir.path().join("export.jsonl");
    std::fs::write(&jsonl, &out.stdout).unwrap();
    let r = run(&["replay", jsonl.to_str().unwrap()]);
    let rs = text(&r.stdout);
    assert!(rs.contains("(2 accepted, 0 rejected)"), "{rs}");

    // tail --json prints the same object.
    let mut t = bin()
        .args(["tail", "--data", data, "--json", "--since-seq", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = std::io::BufReader::new(t.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    drop(stdout);
    assert_eq!(
        exits_within(t, Duration::from_secs(5)).status.code(),
        Some(0)
    );
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert!(v["raw"].as_str().unwrap().contains("PW=<redacted>"), "{v}");
}
