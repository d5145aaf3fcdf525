//! The MQTT data path's socket writes and its cursor, seen from the broker's
//! side of the socket: a raw TCP listener that speaks just enough MQTT 3.1.1
//! (CONNECT/CONNACK, PUBLISH/PUBACK, PINGREQ/PINGRESP, DISCONNECT) and records
//! every read, every publish and every PUBACK it sends.
//!
//! - A backlog drained as a burst arrives in few reads: many publishes per
//!   system call (one `writev` per publish would show as about one read each).
//! - A broker that drops every connection twice mid-burst loses nothing, the
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
use mqtt_support::{Device, PATIENCE, free_port};

/// Frames in the backlog.
const N: u32 = 2000;

#[derive(Default)]
struct Seen {
    /// Reads that completed at least one PUBLISH, and the publishes.
    reads_with_publish: u64,
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
            g.reads_with_publish += 1;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_burst_reaches_the_broker_in_few_socket_writes() {
    let port = free_port();
    let (gw, expected) = gateway_with_backlog(port).await;
    let last = *expected.last().expect("records");
    let broker = Broker::new(port);
    let t = Instant::now();
    while cursor(&gw.db) < last {
        assert!(t.elapsed() < PATIENCE * 3, "backlog not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (reads, publishes, missing) = {
        let g = broker.seen.lock().unwrap();
        let missing = expected.difference(&g.acked).count();
        (g.reads_with_publish, g.publishes, missing)
    };
    eprintln!("{publishes} publishes arrived in {reads} reads");
    assert_eq!(missing, 0, "every frame acknowledged");
    // One write per publish shows as roughly one read per publish here (about
    // 1.1 publishes per read were seen with rumqttc's per-publish writes).
    assert!(
        publishes >= 8 * reads,
        "{publishes} publishes in {reads} reads: fewer than 8 per socket write"
    );
    gw.running.stop().await.expect("stop");
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
