//! Frames and expected replies shared by the gateway's integration tests.
//!
//! Test frames are built with the protocol layer's own envelope (length and CRC
//! computed, not hand-typed) and checked to decode without error before use, so a
//! typo here cannot masquerade as a gateway bug. Expected acks come from
//! `protocol::reply::ack`, whose bytes are pinned separately against HJ212.md §9.2.

use bytes::Bytes;
use hj212_gateway::protocol::{self, Options, reply};

/// A 2017 real-time upload (CN 2011) asking for an ack (Flag=5).
pub fn upload(mn: &str, qn: &str, pw: &str) -> Vec<u8> {
    let seg = format!(
        "QN={qn};ST=31;CN=2011;PW={pw};MN={mn};Flag=5;CP=&&DataTime=20240601085857;\
         a21026-Rtd=12.5,a21026-Flag=N;a21002-Rtd=35.2,a21002-Flag=N&&"
    );
    let frame = reply::envelope(seg.as_bytes()).to_vec();
    let decoded = decode(&frame);
    assert!(
        !decoded.has_error(),
        "test frame must be valid: {:?}",
        decoded.findings
    );
    frame
}

/// A valid QN (`YYYYMMDDhhmmsszzz`) unique for each `n` below 57 600 000.
pub fn qn(n: u32) -> String {
    let (ms, s, m, h) = (
        n % 1000,
        (n / 1000) % 60,
        (n / 60_000) % 60,
        8 + n / 3_600_000,
    );
    format!("20240601{h:02}{m:02}{s:02}{ms:03}")
}

/// A 24-character MN (the 2017 edition's length) unique for each `i`.
pub fn mn(i: u32) -> String {
    format!("010000A8900016F0{i:08}")
}

/// Decodes `frame` the way the gateway does for an unregistered device.
pub fn decode(frame: &[u8]) -> protocol::Frame {
    protocol::decode(
        Bytes::copy_from_slice(frame),
        &Options::new(chrono::Utc::now()),
        &(),
    )
}

/// The ack the gateway must send for `frame`.
pub fn expected_ack(frame: &[u8]) -> Vec<u8> {
    reply::ack(&decode(frame))
        .expect("frame asks for an ack")
        .to_vec()
}

/// The built binary, as an operator runs it: `serve --config C --data D`, with
/// the bound address read from its "listening" log line. Killed on drop.
// Each test crate compiles its own copy of this module and uses a subset of it.
#[allow(dead_code)]
pub struct Bin {
    /// The daemon process.
    pub child: std::process::Child,
    /// The address it bound (`listen = ["127.0.0.1:0"]` in tests).
    pub addr: std::net::SocketAddr,
}

#[allow(dead_code)]
impl Bin {
    /// Spawns the daemon and waits (up to 10 s) for its listening line.
    pub fn spawn(config: &std::path::Path, data: &std::path::Path) -> Bin {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--data")
            .arg(data)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gateway");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let addr = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .expect("listening line");
            if let Some(i) = line.find("listen=[") {
                let rest = &line[i + 8..];
                break rest[..rest.find(']').unwrap()].parse().expect("addr");
            }
        };
        // Keep draining so the daemon never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Bin { child, addr }
    }

    /// SIGKILL, then reap.
    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hj212-gateway serve` with its stderr collected line by line, for tests
/// that read what the daemon logs. Killed on drop.
#[allow(dead_code)]
pub struct Serve {
    /// The daemon process.
    pub child: std::process::Child,
    /// Every stderr line so far.
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

#[allow(dead_code)]
impl Serve {
    /// Starts `serve --config <config> --data <data>` at log level info.
    pub fn run(config: &std::path::Path, data: &std::path::Path) -> Serve {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--data")
            .arg(data)
            .env("RUST_LOG", "info")
            .env_remove("STATE_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hj212-gateway serve");
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        Serve { child, lines }
    }

    /// Waits (up to 20 s) for a log line containing `needle` and returns it;
    /// fails with the whole log if the daemon exits first.
    pub fn wait_for(&mut self, needle: &str) -> String {
        use std::time::{Duration, Instant};
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader thread catch the last lines.
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "daemon exited ({st}) before logging {needle:?}: {:#?}",
                    self.lines.lock().unwrap()
                );
            }
            assert!(Instant::now() < deadline, "no log line with {needle:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The log so far, one string.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway started inside the test process (`daemon::start`) on a temporary
/// data directory, so a test can reach its `Running` handle directly.
#[allow(dead_code)]
pub struct InProc {
    /// The running daemon (stop, reload, bound addresses).
    pub running: hj212_gateway::daemon::Running,
    /// The first device listener's address.
    pub addr: std::net::SocketAddr,
    /// The frame log file.
    pub db: std::path::PathBuf,
    /// The data directory (removed on drop).
    pub dir: tempfile::TempDir,
}

/// Starts a gateway in-process from config text.
#[allow(dead_code)]
pub async fn start_in_process(text: &str) -> InProc {
    let cfg =
        hj212_gateway::config::Config::parse(text, std::path::Path::new("test")).expect("config");
    start_config(cfg, None).await
}

/// Starts a gateway in-process from a parsed config; `config` is the file it
/// came from, if any (so `reload()` re-reads it).
#[allow(dead_code)]
pub async fn start_config(
    cfg: hj212_gateway::config::Config,
    config: Option<std::path::PathBuf>,
) -> InProc {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = cfg.store_path(dir.path());
    let o = hj212_gateway::daemon::Overrides {
        config,
        listen: Vec::new(),
        data: Some(dir.path().to_owned()),
    };
    let running = hj212_gateway::daemon::start(cfg, &o)
        .await
        .expect("gateway starts");
    let addr = running.addrs[0];
    InProc {
        running,
        addr,
        db,
        dir,
    }
}

/// Every record of the frame log at `db`, in seq order.
#[allow(dead_code)]
pub fn records(db: &std::path::Path) -> Vec<hj212_gateway::store::StoredRecord> {
    hj212_gateway::store::Reader::open(db)
        .expect("reader")
        .records(hj212_gateway::store::RecordFilter::default())
        .expect("records")
        .collect::<Result<_, _>>()
        .expect("read")
}

/// A 2005 real-time upload (Flag=1: version bits 0, ack requested).
#[allow(dead_code)]
pub fn frame_2005() -> Vec<u8> {
    reply::envelope(
        b"QN=20240601085857001;ST=32;CN=2011;PW=123456;MN=88888880000001;Flag=1;\
          CP=&&DataTime=20240601085857;B02-Rtd=36.50,B02-Flag=N&&",
    )
    .to_vec()
}

/// `GET /metrics` from the listener at `addr`, parsed as (`name{labels}`, value).
#[allow(dead_code)]
pub async fn scrape_metrics(addr: std::net::SocketAddr) -> Vec<(String, f64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8(out).expect("utf-8");
    let (_, body) = text.split_once("\r\n\r\n").expect("head and body");
    hj212_gateway::metrics::parse_exposition(body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

/// The value of `series` (`name{labels}` exactly) in a scrape.
#[allow(dead_code)]
pub fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map(|x| x.1)
        .unwrap_or_else(|| panic!("{series} missing from the scrape"))
}
