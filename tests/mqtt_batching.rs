//! The MQTT data path's system calls and its cursor.
//!
//! - A backlog drained as a burst leaves the gateway binary (under `strace`,
//!   against a real mosquitto) in few write system calls: many publishes each.
//! - A broker that drops every connection twice mid-burst (a raw TCP listener
//!   that speaks just enough MQTT 3.1.1 and records every publish and PUBACK)
//!   loses nothing, the
//!   persisted cursor never passes a publish the broker has not acknowledged,
//!   and what is published again on a later connection carries the DUP flag.

#[allow(dead_code)]
mod common;
mod mqtt_support;

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{mn, qn, upload};
use hj212_gateway::store::{Cursors, Direction, Verdict};
use mqtt_support::{Device, Mosquitto, PATIENCE, free_port, mosquitto_bin};

/// Frames in the backlog.
const N: u32 = 2000;

#[derive(Default)]
struct Seen {
    /// PUBLISH packets received.
    publishes: u64,
    /// Data seqs acknowledged (inserted before the PUBACK is written).
    acked: BTreeSet<u64>,
    /// Data seqs received on earlier connections, and on the current ones.
    seen_before: HashSet<u64>,
    seen_now: HashSet<u64>,
    /// Publishes of a seq received on an earlier connection, and those of them
    /// without the DUP flag.
    resent: u64,
    resent_without_dup: u64,
}

/// The listener; `down()` drops it and every connection, `up()` listens again.
struct Broker {
    port: u16,
    seen: Arc<Mutex<Seen>>,
    running: Option<Arc<AtomicBool>>,
}

impl Broker {
    fn new(port: u16) -> Broker {
        let mut b = Broker {
            port,
            seen: Arc::default(),
            running: None,
        };
        b.up();
        b
    }

    fn up(&mut self) {
        let running = Arc::new(AtomicBool::new(true));
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind broker port");
        listener.set_nonblocking(true).expect("nonblocking");
        let (seen, run) = (Arc::clone(&self.seen), Arc::clone(&running));
        std::thread::spawn(move || {
            let mut conns: Vec<TcpStream> = Vec::new();
            while run.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).expect("blocking");
                        conns.push(s.try_clone().expect("clone"));
                        let (seen, run) = (Arc::clone(&seen), Arc::clone(&run));
                        std::thread::spawn(move || serve(s, &seen, &run));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.shutdown(Shutdown::Both);
            }
        });
        self.running = Some(running);
    }

    /// Drops every connection at once, without a word: a broker that died.
    fn down(&mut self) {
        if let Some(r) = self.running.take() {
            r.store(false, Ordering::SeqCst);
        }
        // The accept loop closes the connections within its 5 ms sleep.
        std::thread::sleep(Duration::from_millis(50));
        let mut s = self.seen.lock().unwrap();
        let now = std::mem::take(&mut s.seen_now);
        s.seen_before.extend(now);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.store(false, Ordering::SeqCst);
        }
    }
}

/// One connection: answers CONNECT, PUBLISH (QoS 1) and PINGREQ; the PUBACKs of
/// one read go out in one write, as a broker answers a batch.
fn serve(mut s: TcpStream, seen: &Mutex<Seen>, run: &AtomicBool) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !run.load(Ordering::SeqCst) {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut reply = Vec::new();
        let mut publishes = 0;
        let mut at = 0;
        while let Some((first, body, next)) = packet(&buf[at..]) {
            let body = &buf[at + body.0..at + body.1];
            at += next;
            match first >> 4 {
                1 => reply.extend_from_slice(&[0x20, 0x02, 0x00, 0x00]),
                3 => {
                    publishes += 1;
                    let (dup, qos) = (first & 0x08 != 0, (first >> 1) & 3);
                    let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    let mut p = 2 + tlen;
                    let pkid = (qos > 0).then(|| [body[p], body[p + 1]]);
                    if qos > 0 {
                        p += 2;
                    }
                    let seq = serde_json::from_slice::<serde_json::Value>(&body[p..])
                        .ok()
                        .and_then(|v| v["seq"].as_u64());
                    let mut g = seen.lock().unwrap();
                    if let Some(seq) = seq {
                        if g.seen_before.contains(&seq) {
                            g.resent += 1;
                            if !dup {
                                g.resent_without_dup += 1;
                            }
                        }
                        g.seen_now.insert(seq);
                        if qos == 1 {
                            g.acked.insert(seq);
                        }
                    }
                    if let Some(id) = pkid {
                        reply.extend_from_slice(&[0x40, 0x02, id[0], id[1]]);
                    }
                }
                12 => reply.extend_from_slice(&[0xD0, 0x00]),
                14 => return,
                _ => {}
            }
        }
        buf.drain(..at);
        if publishes > 0 {
            let mut g = seen.lock().unwrap();
            g.publishes += publishes;
        }
        if !reply.is_empty() && s.write_all(&reply).is_err() {
            return;
        }
    }
}

/// The first complete packet of `b`: its first byte, the body's range and its length.
fn packet(b: &[u8]) -> Option<(u8, (usize, usize), usize)> {
    let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
    loop {
        let d = *b.get(i)?;
        len += usize::from(d & 0x7F) * mult;
        mult *= 128;
        i += 1;
        if d & 0x80 == 0 {
            break;
        }
    }
    (b.len() >= i + len).then_some((b[0], (i, i + len), i + len))
}

/// A gateway whose broker is not up yet, with a backlog of `N` accepted frames.
async fn gateway_with_backlog(port: u16) -> (common::InProc, BTreeSet<u64>) {
    let text = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n\
         [store]\nsync = \"off\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n\
         client_id = \"gw-batch\"\nreconnect_max = \"200ms\"\n"
    );
    let gw = common::start_in_process(&text).await;
    let mut tasks = Vec::new();
    for dev in 0..4u32 {
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            let mut d = Device::connect(addr).await;
            for i in (dev..N).step_by(4) {
                d.send_acked(&upload(&mn(dev), &qn(i), "123456")).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("device");
    }
    let expected: BTreeSet<u64> = common::records(&gw.db)
        .iter()
        .filter(|r| r.direction == Direction::In && r.verdict == Verdict::Accepted)
        .map(|r| r.seq)
        .collect();
    assert_eq!(expected.len(), N as usize);
    (gw, expected)
}

fn cursor(db: &Path) -> u64 {
    Cursors::open(db)
        .expect("cursors")
        .get_cursor("mqtt")
        .expect("cursor")
        .unwrap_or(0)
}

/// `strace`, or `None` after saying why the test is skipped.
fn strace_bin() -> Option<&'static str> {
    let ok = std::process::Command::new("strace")
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: strace is not installed (apt-get install strace)");
    }
    ok.then_some("strace")
}

/// System calls writing to a connection to `port`, in an `strace -f` log.
fn writes_to_port(trace: &str, port: u16) -> (u64, usize) {
    let mut fds = HashSet::new();
    let mut connections = 0;
    let mut writes = 0;
    let fd_of = |call: &str| -> Option<u32> {
        let args = call.split_once('(')?.1;
        args.split([',', ')']).next()?.trim().parse().ok()
    };
    for line in trace.lines() {
        // "PID name(fd, ...) = ret", or "PID <... name resumed> ...".
        let Some((_, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        let name = call.split('(').next().unwrap_or("");
        match name {
            "connect" if call.contains(&format!("sin_port=htons({port})")) => {
                if let Some(fd) = fd_of(call) {
                    fds.insert(fd);
                    connections += 1;
                }
            }
            "close" => {
                if let Some(fd) = fd_of(call) {
                    fds.remove(&fd);
                }
            }
            "write" | "writev" | "sendto" | "sendmsg"
                if fd_of(call).is_some_and(|fd| fds.contains(&fd)) =>
            {
                writes += 1;
            }
            _ => {}
        }
    }
    (writes, connections)
}

/// The gateway binary under `strace` drains a backlog to a real mosquitto:
/// the system calls that write to the broker must carry many publishes each
/// (rumqttc's one `writev` per publish made about one per publish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_burst_leaves_in_few_write_system_calls() {
    let Some(bin) = mosquitto_bin() else { return };
    let Some(strace) = strace_bin() else { return };
    let mut broker = Mosquitto::start(bin, "");
    // Down while the backlog builds, back on the same port for the burst.
    broker.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = free_port();
    let text = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:{listen}\"]\n\
         [store]\nsync = \"off\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n\
         client_id = \"gw-strace\"\nreconnect_max = \"200ms\"\n",
        broker.port
    );
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, &text).expect("config");
    let db = hj212_gateway::config::Config::parse(&text, &config)
        .expect("parse")
        .store_path(dir.path());
    let trace = dir.path().join("strace.log");
    let mut gw = std::process::Command::new(strace)
        .args(["-f", "-qq", "--seccomp-bpf", "-s", "0", "-o"])
        .arg(&trace)
        .args(["-e", "trace=connect,close,write,writev,sendto,sendmsg"])
        .arg(env!("CARGO_BIN_EXE_hj212-gateway"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--data")
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("strace the gateway");
    mqtt_support::wait_listening(listen);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], listen).into();
    let mut tasks = Vec::new();
    for dev in 0..4u32 {
        tasks.push(tokio::spawn(async move {
            let mut d = Device::connect(addr).await;
            for i in (dev..N).step_by(4) {
                d.send_acked(&upload(&mn(dev), &qn(i), "123456")).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("device");
    }
    let last = hj212_gateway::store::Reader::open(&db)
        .expect("reader")
        .last_seq()
        .expect("last seq");
    broker.restart();
    let t = Instant::now();
    while cursor(&db) < last {
        assert!(t.elapsed() < PATIENCE * 3, "backlog not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = gw.kill();
    let _ = gw.wait();
    let (writes, connections) = writes_to_port(
        &std::fs::read_to_string(&trace).expect("trace"),
        broker.port,
    );
    eprintln!("{N} frames published in {writes} write system calls over {connections} connections");
    assert!(
        connections >= 1,
        "the trace saw the connection to the broker"
    );
    assert!(
        writes * 8 <= u64::from(N),
        "{writes} write system calls for {N} publishes: fewer than 8 publishes each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_dying_twice_mid_burst_loses_nothing_and_the_cursor_waits_for_pubacks() {
    let port = free_port();
    let (gw, expected) = gateway_with_backlog(port).await;
    let last = *expected.last().expect("records");
    let mut broker = Broker::new(port);
    let mut kills = 0;
    let mut prev = 0;
    let t = Instant::now();
    loop {
        // The cursor first, then what the broker acknowledged (which only grows):
        // everything at or below the cursor must already be in it.
        let c = cursor(&gw.db);
        let (acked, publishes) = {
            let g = broker.seen.lock().unwrap();
            (g.acked.clone(), g.publishes)
        };
        assert!(c >= prev, "cursor went back from {prev} to {c}");
        prev = c;
        let ahead: Vec<u64> = expected
            .range(..=c)
            .filter(|s| !acked.contains(s))
            .take(5)
            .copied()
            .collect();
        assert!(
            ahead.is_empty(),
            "cursor {c} passed seqs the broker never acknowledged: {ahead:?}"
        );
        if c >= last {
            break;
        }
        // Mid-burst: after a third and after two thirds of the backlog arrived.
        if (kills == 0 && publishes >= u64::from(N) / 3)
            || (kills == 1 && publishes >= 2 * u64::from(N) / 3)
        {
            broker.down();
            kills += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            broker.up();
        }
        assert!(
            t.elapsed() < PATIENCE * 3,
            "backlog not drained (cursor {c})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(kills, 2, "the broker died twice mid-burst");
    {
        let g = broker.seen.lock().unwrap();
        let missing: Vec<u64> = expected.difference(&g.acked).copied().collect();
        assert!(missing.is_empty(), "lost: {missing:?}");
        eprintln!(
            "{} publishes for {} frames; {} sent again on a later connection",
            g.publishes,
            expected.len(),
            g.resent
        );
        assert_eq!(g.resent_without_dup, 0, "a re-sent publish without DUP");
    }
    gw.running.stop().await.expect("stop");
}
