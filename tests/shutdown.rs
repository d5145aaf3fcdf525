//! SIGTERM within one deadline, with the built binary: whatever its consumers are
//! stuck on, `serve` exits within `[server] shutdown_grace` (plus the store's
//! reserve, which an idle log does not need) and logs by name what it cut short;
//! `check-config` warns when the grace cannot fit the packaged unit's stop timeout.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{expected_ack, mn, qn, upload};

const BIN: &str = env!("CARGO_BIN_EXE_hj212-gateway");
const PATIENCE: Duration = Duration::from_secs(30);

type Daemon = common::Serve;

impl Daemon {
    /// Sends SIGTERM; returns how long the process took to exit and its exit code.
    fn terminate(&mut self) -> (Duration, Option<i32>) {
        let sent = Instant::now();
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                let took = sent.elapsed();
                // Let the reader thread catch the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return (took, st.code());
            }
            if sent.elapsed() > PATIENCE {
                let _ = self.child.kill();
                panic!("serve kept running: {:#?}", self.lines.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A TCP peer that accepts connections and reads everything, answering nothing
/// after `greeting` (sent once the first bytes of a connection arrived): with
/// the MQTT CONNACK it is a broker that never acknowledges a publish, with no
/// greeting an upstream platform that never acks a frame.
fn black_hole(greeting: &'static [u8]) -> (std::net::SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = Arc::new(Mutex::new(0usize));
    let count = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut greeted = greeting.is_empty();
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    *count.lock().unwrap() += n;
                    if !greeted {
                        greeted = true;
                        let _ = s.write_all(greeting);
                    }
                }
            });
        }
    });
    (addr, received)
}

/// MQTT 3.1.1 CONNACK: session not present, connection accepted.
const CONNACK: &[u8] = &[0x20, 0x02, 0x00, 0x00];

/// The grace of the test daemon; the margin covers the store drain of a tiny
/// log and process exit on a loaded machine.
const GRACE: Duration = Duration::from_millis(500);
const MARGIN: Duration = Duration::from_millis(1200);

/// A device that never closes its connection, a broker that never acknowledges a
/// publish and an upstream that never acks a frame: each holds its part of the
/// stop for a while (the session drains until the device closes, the publisher
/// waits up to 2 s for in-flight PUBACKs, four times the grace); the stop still
/// ends within one grace and names the publisher it cut short.
#[test]
fn sigterm_exits_within_the_grace_and_names_what_was_cut_short() {
    let (broker, published) = black_hole(CONNACK);
    let (platform, forwarded) = black_hole(b"");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"{}ms\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [downlink]\ntime_sync_skew = false\nbackfill = false\n\
             [mqtt]\nurl = \"mqtt://{broker}\"\nclient_id = \"gw-stop\"\n\
             [[upstream]]\nname = \"silent\"\naddr = \"{platform}\"\nack_timeout = \"30s\"\n",
            GRACE.as_millis()
        ),
    )
    .expect("config");
    let data = dir.path().join("data");
    let mut d = Daemon::run(&config, &data);
    let line = d.wait_for("listen=[");
    let rest = &line[line.find("listen=[").unwrap() + 8..];
    let addr: std::net::SocketAddr = rest[..rest.find(']').unwrap()].parse().expect("addr");
    d.wait_for("MQTT connected");

    // The device is acked and then keeps its connection open, as loggers do.
    let mut device = TcpStream::connect(addr).expect("connect");
    device
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let frame = upload(&mn(1), &qn(1), "123456");
    device.write_all(&frame).expect("send");
    let want = expected_ack(&frame);
    let mut got = vec![0u8; want.len()];
    device.read_exact(&mut got).expect("ack");
    assert_eq!(got, want);
    // Both consumers hold the frame before the stop begins: the publisher waits
    // for its PUBACK, the forwarder for the platform's ack.
    let until = Instant::now() + PATIENCE;
    while *published.lock().unwrap() < 100 || *forwarded.lock().unwrap() < frame.len() {
        assert!(Instant::now() < until, "consumers never sent the frame");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (took, code) = d.terminate();
    eprintln!("SIGTERM to exit: {took:?}");
    let log = d.log();
    assert_eq!(code, Some(0), "SIGTERM exits 0: {log}");
    assert!(
        took <= GRACE + MARGIN,
        "stop took {took:?} with shutdown_grace {GRACE:?}: {log}"
    );
    assert!(
        log.contains("did not stop in time; cut short at the shutdown deadline")
            && log.contains("MQTT publisher"),
        "the publisher still waiting for PUBACKs is named: {log}"
    );
    assert!(
        log.contains("frame log closed"),
        "the log is drained: {log}"
    );
    drop(device);
}

/// `check-config` on a config whose grace cannot fit the packaged unit's stop
/// timeout: still valid (exit 0, "ok"), with a warning naming the key.
#[test]
fn check_config_warns_when_the_grace_cannot_fit_the_units_stop_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |grace: &str| {
        let path = dir.path().join(format!("grace-{grace}.toml"));
        std::fs::write(&path, format!("[server]\nshutdown_grace = \"{grace}\"\n")).expect("config");
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("run check-config");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run("60s");
    assert_eq!(code, Some(0), "a warning, not an error: {stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");
    let warning: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warning.len(), 1, "{stderr}");
    assert!(
        warning[0].contains("server.shutdown_grace") && warning[0].contains("TimeoutStopSec=30s"),
        "{stderr}"
    );
    let (code, _, stderr) = run("10s");
    assert_eq!(code, Some(0));
    assert!(
        !stderr.contains("warning"),
        "the default grace fits: {stderr}"
    );
}
