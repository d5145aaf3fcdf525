//! The built binary, driven as an operator would: `serve` on a data directory,
//! devices over TCP, SIGKILL, restart, SIGHUP, SIGTERM, then `export`, `verify`
//! and `check-config` on the result.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{expected_ack, mn, qn, upload};

/// Automatic downlink requests off: these devices send fixed DataTimes.
const NO_AUTO: &str = "[downlink]\ntime_sync_skew = false\nbackfill = false\n";
const BIN: &str = env!("CARGO_BIN_EXE_hj212-gateway");
const PATIENCE: Duration = Duration::from_secs(20);

/// A running `hj212-gateway serve` whose stderr is drained into a channel (an
/// undrained pipe would eventually block the daemon's logging).
struct Daemon {
    child: Child,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
    /// The config given when the test passes none (see `spawn`).
    _config: Option<tempfile::NamedTempFile>,
}

impl Daemon {
    fn spawn(args: &[&str]) -> Daemon {
        // Without --config every setting is at its default except the metrics
        // port: parallel daemons must not contend for 127.0.0.1:9464.
        let config = (!args.contains(&"--config")).then(|| {
            let f = tempfile::NamedTempFile::new().expect("config file");
            // Fixed DataTimes look like a skewed clock: no calibration requests,
            // the devices here read nothing but their acks.
            std::fs::write(
                f.path(),
                format!("[metrics]\nlisten = \"127.0.0.1:0\"\n{NO_AUTO}"),
            )
            .expect("config");
            f
        });
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").args(args);
        if let Some(f) = &config {
            cmd.arg("--config").arg(f.path());
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .env_remove("STATE_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hj212-gateway serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child,
            addr: "0.0.0.0:0".parse().expect("placeholder"),
            log,
            _config: config,
        };
        let line = d.wait_for_log("listening");
        // `listening listen=[127.0.0.1:PORT] data=...`, or `"listen":"[...]"` in JSON.
        let start = ["listen=[", "\"listen\":\"["]
            .iter()
            .find_map(|k| line.find(k).map(|i| i + k.len()))
            .expect("listen field");
        let end = start + line[start..].find(']').expect("closing bracket");
        d.addr = line[start..end].parse().expect("bound address");
        d
    }

    fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!("no log line with {needle:?} ({e}); daemon status {status:?}");
                }
            }
        }
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("/bin/kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run /bin/kill");
        assert!(st.success(), "kill {sig}");
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Never leave a daemon behind when an assertion fails.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A blocking device connection.
struct Dev {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Dev {
    fn connect(addr: SocketAddr) -> Dev {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Dev { s, buf: Vec::new() }
    }

    /// The next CRLF-terminated reply within `wait`, `None` on silence.
    fn reply_within(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Some(self.buf.drain(..i + 2).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.s.set_read_timeout(Some(left)).expect("timeout");
            let mut chunk = [0u8; 1024];
            match self.s.read(&mut chunk) {
                Ok(0) => panic!("connection closed"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    fn exchange(&mut self, frame: &[u8]) {
        self.s.write_all(frame).expect("send");
        let got = self.reply_within(PATIENCE).expect("an ack");
        assert_eq!(got, expected_ack(frame), "ack byte-exact");
    }
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("STATE_DIRECTORY")
        .output()
        .expect("run hj212-gateway")
}

fn contains(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// Session events carry the peer, the session id and (once known) the MN as
/// their own fields, in both log formats: operators grep for an MN or a peer.
#[test]
fn session_log_lines_name_peer_session_and_mn() {
    for format in ["plain", "json"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let data_s = data.to_str().expect("utf-8 path");
        let mut d = Daemon::spawn(&[
            "--log-format",
            format,
            "--listen",
            "127.0.0.1:0",
            "--data",
            data_s,
        ]);
        let m = mn(77);
        let mut dev = Dev::connect(d.addr);
        let peer = dev.s.local_addr().expect("local addr").to_string();
        dev.exchange(&upload(&m, &qn(1), "123456"));
        drop(dev);
        if format == "plain" {
            let line = d.wait_for_log("session: closed");
            for want in [
                format!("peer={peer}"),
                format!("mn=\"{m}\""),
                "session=".to_owned(),
                "reason=\"peer_closed\"".to_owned(),
            ] {
                assert!(line.contains(&want), "{want} missing from {line}");
            }
        } else {
            let line = d.wait_for_log("\"message\":\"closed\"");
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            assert_eq!(v["peer"], peer.as_str(), "{line}");
            assert_eq!(v["mn"], m.as_str(), "{line}");
            assert!(v["session"].is_u64(), "{line}");
            assert_eq!(v["reason"], "peer_closed", "{line}");
        }
    }
}

#[test]
fn acked_frames_survive_sigkill_and_the_daemon_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8 path");

    // First life: default config (sync = full), devices on several connections.
    let mut first = Daemon::spawn(&["--listen", "127.0.0.1:0", "--data", data_s]);
    let addr = first.addr;
    let threads: Vec<_> = (0..4u32)
        .map(|c| {
            std::thread::spawn(move || {
                let mut d = Dev::connect(addr);
                let mut acked = Vec::new();
                for k in 0..10u32 {
                    let f = upload(&mn(100 + c), &qn(k * 4 + c), "123456");
                    d.exchange(&f);
                    acked.push(f);
                }
                acked
            })
        })
        .collect();
    let mut acked: Vec<Vec<u8>> = Vec::new();
    for t in threads {
        acked.extend(t.join().expect("device thread"));
    }
    // SIGKILL: no shutdown path runs; only what was committed may remain.
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    drop(first);

    // Second life on the same data directory, with a config file for SIGHUP.
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n{NO_AUTO}"
        ),
    )
    .expect("config");
    let cfg_s = cfg.to_str().expect("utf-8 path");
    let mut second = Daemon::spawn(&[
        "--config",
        cfg_s,
        "--listen",
        "127.0.0.1:0",
        "--data",
        data_s,
    ]);
    let dev = mn(200);
    let mut d = Dev::connect(second.addr);
    let f = upload(&dev, &qn(1), "111111");
    d.exchange(&f);
    acked.push(f);
    std::fs::write(
        &cfg,
        format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n{NO_AUTO}[[device]]\nmn = \"{dev}\"\npw = \"222222\"\n"
        ),
    )
    .expect("rewrite config");
    second.signal("-HUP");
    let reloaded = second.wait_for_log("registry reloaded");
    assert!(reloaded.contains("devices=1"), "{reloaded}");
    let wrong = upload(&dev, &qn(2), "111111");
    d.s.write_all(&wrong).expect("send");
    assert_eq!(
        d.reply_within(Duration::from_millis(300)),
        None,
        "no ack for a wrong PW"
    );
    let f = upload(&dev, &qn(3), "222222");
    d.exchange(&f);
    acked.push(f);

    // Export while serving: every acked frame, byte-exact, exactly once.
    let out = run(&[
        "export",
        "--data",
        data_s,
        "--format",
        "raw",
        "--direction",
        "in",
    ]);
    assert!(
        out.status.success(),
        "export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in &acked {
        assert_eq!(
            contains(&out.stdout, f),
            1,
            "{}",
            String::from_utf8_lossy(f)
        );
    }
    assert_eq!(
        contains(&out.stdout, &wrong),
        1,
        "the rejected frame is stored too"
    );
    let all = run(&[
        "export",
        "--data",
        data_s,
        "--format",
        "raw",
        "--direction",
        "all",
    ]);
    for f in &acked {
        assert!(contains(&all.stdout, &expected_ack(f)) >= 1, "ack logged");
    }

    drop(d);
    second.signal("-TERM");
    let st = second.wait_exit();
    assert_eq!(st.code(), Some(0), "SIGTERM exits 0");
    second.wait_for_log("frame log closed");

    let v = run(&["verify", "--data", data_s]);
    assert_eq!(
        v.status.code(),
        Some(0),
        "verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(String::from_utf8_lossy(&v.stdout).contains("chain intact"));
}

#[test]
fn check_config_names_the_bad_key_and_exits_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        run(&["check-config", p.to_str().expect("utf-8 path")])
    };
    let good = check(
        "good.toml",
        "[server]\nlisten = [\"127.0.0.1:9212\"]\nidle_timeout = \"5m\"\n\
         [[device]]\nmn = \"010000A8900016F000000001\"\npw = \"123456\"\n",
    );
    assert_eq!(
        good.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let bad = check("bad.toml", "[server]\nidle_timeout = \"5 parsecs\"\n");
    assert_eq!(bad.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("idle_timeout"));
    let typo = check("typo.toml", "[server]\nlisen = [\"127.0.0.1:9212\"]\n");
    assert_eq!(typo.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&typo.stderr).contains("lisen"));
    let invalid = check("invalid.toml", "[validation]\ntime_zone = \"Mars\"\n");
    assert_eq!(invalid.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&invalid.stderr).contains("validation.time_zone"));
    // Values that parse but would hold every ack for an hour, close every
    // session at once, or inject header text into the frames the gateway builds.
    for (name, text, key) in [
        (
            "delay.toml",
            "[store]\nbatch_delay = \"1h\"\n",
            "store.batch_delay",
        ),
        (
            "idle.toml",
            "[server]\nidle_timeout = \"0s\"\n",
            "server.idle_timeout",
        ),
        (
            "pw.toml",
            "[[device]]\nmn = \"010000A8900016F000000001\"\npw = \"1;MN=X\"\n",
            "device[0].pw",
        ),
    ] {
        let out = check(name, text);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{name}: {err}");
        assert!(err.contains(key), "{name}: {err}");
    }
}

#[test]
fn serve_with_a_bad_config_exits_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[store]\nsync = \"sometimes\"\n").expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().expect("utf-8"), "--data"])
        .arg(dir.path().join("data"))
        .env_remove("STATE_DIRECTORY")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sync"));
    assert!(!Path::new(&dir.path().join("data").join("frames.db")).exists());
}

/// A reload or stop request right after the daemon announced itself must be
/// handled, not kill it with the signal's default action.
#[test]
fn signals_right_after_listening_are_handled() {
    for _ in 0..10 {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut d = Daemon::spawn(&[
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().expect("utf-8"),
        ]);
        d.signal("-HUP");
        d.wait_for_log("registry reloaded");
        d.signal("-TERM");
        let st = d.wait_exit();
        assert_eq!(st.code(), Some(0), "{st:?}");
    }
}
