//! Logging under journald, as systemd runs the daemon: the real binary with
//! `JOURNAL_STREAM` naming its stderr (device:inode, as systemd sets it), and
//! the same binary without it.
//!
//! Under journald every line starts with its syslog priority (`<6>` info, `<4>`
//! warning), carries no colour and no timestamp; elsewhere the lines are as
//! before. An unreachable broker, retried every 100 ms here, logs a first line
//! and then ever rarer ones with a count, not a line per retry.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Ephemeral device port, metrics off, an MQTT broker that refuses every
/// connection, retried every 100 ms, `[log] repeat_interval` 1 s.
fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n\
             [mqtt]\nenabled = true\nurl = \"mqtt://127.0.0.1:{}\"\nreconnect_max = \"100ms\"\n\
             [downlink]\ntime_sync_skew = false\nbackfill = false\n\
             [log]\nrepeat_interval = \"1s\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n",
            closed_port()
        ),
    )
    .expect("write config");
    path
}

/// `serve` with stderr on a pipe; with `journal`, started through `sh` so that
/// `JOURNAL_STREAM` is the device:inode of that very pipe, as systemd sets it for
/// a unit whose stderr is the journal.
fn serve(dir: &std::path::Path, journal: bool) -> (Child, Arc<Mutex<Vec<String>>>) {
    let cfg = config(dir);
    let data = dir.join("data");
    let bin = env!("CARGO_BIN_EXE_hj212-gateway");
    let mut cmd = if journal {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$0" "$@""#)
            .arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--data")
        .arg(&data)
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .env_remove("STATE_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn serve");
    let stderr = child.stderr.take().expect("stderr");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(l);
        }
    });
    (child, lines)
}

/// Runs the daemon for `secs` (after its listening line) and returns its log.
fn log_of(journal: bool, secs: u64) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, lines) = serve(dir.path(), journal);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("listening"))
    {
        assert!(
            Instant::now() < deadline,
            "no listening line: {:#?}",
            lines.lock().unwrap()
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "serve exited: {:#?}",
            lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(secs));
    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(100));
    lines.lock().unwrap().clone()
}

fn unreachable_lines(log: &[String]) -> Vec<&String> {
    log.iter()
        .filter(|l| l.contains("MQTT broker unreachable"))
        .collect()
}

/// The `attempt=N` of a line.
fn attempt(line: &str) -> u64 {
    let rest = &line[line.find("attempt=").expect("attempt field") + 8..];
    rest[..rest.find(' ').unwrap_or(rest.len())]
        .parse()
        .expect("attempt number")
}

#[test]
fn under_journald_every_line_carries_its_priority_and_no_colour_or_time() {
    let log = log_of(true, 5);
    assert!(!log.is_empty());
    for l in &log {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| l.starts_with(p)),
            "line without a priority prefix: {l:?}\n{log:#?}"
        );
        assert!(!l.contains('\x1b'), "ANSI escape in {l:?}");
        // No timestamp: journald stamps the line itself.
        assert!(
            !l[3..].starts_with(|c: char| c.is_ascii_digit()),
            "timestamp in {l:?}"
        );
    }
    let listening = log.iter().find(|l| l.contains("listening")).unwrap();
    assert!(listening.starts_with("<6>"), "{listening}");
    let warns = unreachable_lines(&log);
    assert!(!warns.is_empty(), "{log:#?}");
    assert!(warns.iter().all(|l| l.starts_with("<4>")), "{warns:#?}");

    // A retry every 100..250 ms for 5 s is some 20 attempts; the lines come at
    // 0, 1, 3 s (the gap doubles from repeat_interval), each with its count.
    let last = attempt(warns.last().unwrap());
    assert!(
        warns.len() <= 4,
        "{} lines for {last} attempts: {warns:#?}",
        warns.len()
    );
    assert!(last >= 8, "only {last} attempts in 5 s: {warns:#?}");
    assert!(
        warns[1..].iter().all(|l| l.contains("suppressed=")),
        "{warns:#?}"
    );
    let suppressed: u64 = warns[1..]
        .iter()
        .map(|l| {
            let rest = &l[l.find("suppressed=").unwrap() + 11..];
            rest[..rest.find(' ').unwrap()].parse::<u64>().unwrap()
        })
        .sum();
    assert!(suppressed > 0, "{warns:#?}");
    // No Rust Debug formatting of options in the fields.
    assert!(!log.iter().any(|l| l.contains("Some(")), "{log:#?}");
}

#[test]
fn without_journald_lines_have_no_priority_prefix() {
    let log = log_of(false, 1);
    assert!(log.iter().any(|l| l.contains("listening")), "{log:#?}");
    assert!(!unreachable_lines(&log).is_empty(), "{log:#?}");
    for l in &log {
        assert!(!l.starts_with('<'), "prefix without journald: {l:?}");
        assert!(!l.contains('\x1b'), "ANSI escape on a pipe: {l:?}");
    }
    assert!(log.iter().any(|l| l.contains(" WARN ")), "{log:#?}");
}

/// `JOURNAL_STREAM` inherited by a process whose stderr goes elsewhere (here, a
/// pipe that is not the stream it names) must not add prefixes.
#[test]
fn a_journal_stream_naming_another_file_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--data")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .env("JOURNAL_STREAM", "1:1")
        .env_remove("STATE_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut first = String::new();
    std::io::BufReader::new(stderr)
        .read_line(&mut first)
        .expect("a line");
    let _ = child.kill();
    let _ = child.wait();
    assert!(!first.is_empty());
    assert!(!first.starts_with('<'), "{first:?}");
}
