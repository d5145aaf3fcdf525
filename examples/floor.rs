//! The floor: the least a gateway with this one's guarantees must do per frame,
//! for `benches/floor.sh` to measure on the same machine as the gateway.
//!
//! Issue 23 asks where the remaining CPU per frame goes when a goal stays out
//! of reach, and whether it is outside the gateway. This program does only the
//! work no gateway keeping the guarantees can skip, with the same building
//! blocks, and none of the rest:
//!
//! - reads each device's TCP stream and cuts it into frames (the gateway's
//!   framer, `hj212::framing::cut`);
//! - appends every frame and the ack it answers with to a SQLite WAL file with
//!   `synchronous = FULL`, in group commits from one writer thread (two rows per
//!   frame, raw bytes only: no decode, no validation, no document, no hash
//!   chain, no index);
//! - writes the ack (`CN=9014` with the frame's QN and MN) only after the commit;
//! - publishes every committed frame's raw bytes to MQTT with QoS 1 (a bare
//!   MQTT 3.1.1 publisher: one write per commit, or more when the window is
//!   full, PUBACKs counted, at most [`INFLIGHT`] unacknowledged).
//!
//! It has no findings, downlink, alarms, metrics, evidence or configuration,
//! and is not a gateway: it trusts every byte it is sent.
//!
//! ```text
//! cargo run --release --example floor -- LISTEN_ADDR DB_PATH MQTT_ADDR STATS_PATH
//! ```
//!
//! `STATS_PATH` is rewritten every 200 ms with `{"frames":..,"commits":..,
//! "published":..,"pubacks":..}` so that the script can wait for MQTT to catch up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hj212_gateway::protocol::framing::{self, Cut, FramerConfig};
use hj212_gateway::protocol::reply;
use hj212_gateway::publish::mqtt::encode_publish;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

// The gateway's allocator (src/main.rs), so that allocation costs alike.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Records per transaction at most, as the gateway's `[store] batch_max`.
const BATCH_MAX: usize = 512;
/// The gateway's default `[store] batch_delay`.
const BATCH_DELAY: Duration = Duration::from_millis(2);
/// Unacknowledged QoS 1 publishes at most.
const INFLIGHT: usize = 1024;

#[derive(Default)]
struct Stats {
    frames: AtomicU64,
    commits: AtomicU64,
    published: AtomicU64,
    pubacks: AtomicU64,
}

/// One read's frames and their acks, answered once committed.
struct Append {
    frames: Vec<(Bytes, Bytes)>,
    done: oneshot::Sender<()>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, db, mqtt, stats_path] = &args[..] else {
        eprintln!("usage: floor LISTEN_ADDR DB_PATH MQTT_ADDR STATS_PATH");
        std::process::exit(2);
    };
    let stats = Arc::new(Stats::default());
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let (append_tx, append_rx) = mpsc::channel::<Append>(1024);
    let (publish_tx, publish_rx) = mpsc::channel::<Vec<Bytes>>(64);
    let writer = {
        let (db, stats) = (db.clone(), stats.clone());
        std::thread::spawn(move || write_log(&db, append_rx, publish_tx, &stats))
    };
    rt.block_on(async {
        tokio::spawn(publish(mqtt.clone(), publish_rx, stats.clone()));
        tokio::spawn(write_stats(stats_path.clone(), stats.clone()));
        let listener = TcpListener::bind(listen.as_str()).await.expect("bind");
        let accept = async {
            loop {
                let (sock, _) = listener.accept().await.expect("accept");
                let _ = sock.set_nodelay(true);
                tokio::spawn(session(sock, append_tx.clone(), stats.clone()));
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            () = accept => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
    // The writer ends when every appender is gone.
    drop(rt);
    drop(append_tx);
    let _ = writer.join();
}

/// One device connection: frames in, acks out after their commit.
async fn session(sock: TcpStream, log: mpsc::Sender<Append>, stats: Arc<Stats>) {
    let (mut rd, mut wr) = sock.into_split();
    let cfg = FramerConfig::default();
    let mut buf = BytesMut::with_capacity(4096);
    let mut acks = Vec::new();
    loop {
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut frames = Vec::new();
        while let Some(cut) = framing::cut(&buf, false, &cfg) {
            match cut {
                Cut::Frame { len, .. } => {
                    let raw = buf.split_to(len).freeze();
                    let ack = ack_for(&raw);
                    frames.push((raw, ack));
                }
                Cut::Junk { len, .. } => buf.advance(len),
            }
        }
        if frames.is_empty() {
            continue;
        }
        acks.clear();
        for (_, ack) in &frames {
            acks.extend_from_slice(ack);
        }
        stats.frames.fetch_add(frames.len() as u64, Relaxed);
        let (done, committed) = oneshot::channel();
        if log.send(Append { frames, done }).await.is_err() || committed.await.is_err() {
            return;
        }
        if wr.write_all(&acks).await.is_err() {
            return;
        }
    }
}

/// The data ack of `raw`: `CN=9014` echoing its QN and MN.
fn ack_for(raw: &[u8]) -> Bytes {
    let field = |key: &[u8]| -> &[u8] {
        let Some(at) = raw.windows(key.len()).position(|w| w == key) else {
            return b"";
        };
        let rest = &raw[at + key.len()..];
        let end = rest
            .iter()
            .position(|&b| b == b';' || b == b'&')
            .unwrap_or(rest.len());
        &rest[..end]
    };
    let mut seg = Vec::with_capacity(96);
    seg.extend_from_slice(b"ST=91;CN=9014;PW=123456;MN=");
    seg.extend_from_slice(field(b"MN="));
    seg.extend_from_slice(b";Flag=4;CP=&&QN=");
    seg.extend_from_slice(field(b"QN="));
    seg.extend_from_slice(b";CN=2011&&");
    reply::envelope(&seg)
}

/// The writer thread: group commits of every frame and its ack, then the
/// frames to the publisher, then the appenders answered.
fn write_log(
    path: &str,
    mut rx: mpsc::Receiver<Append>,
    publish: mpsc::Sender<Vec<Bytes>>,
    stats: &Stats,
) {
    let conn = rusqlite::Connection::open(path).expect("open the log");
    conn.execute_batch(
        // The page size first, as the gateway does (src/store/schema.rs): SQLite
        // ignores a change once the file is in WAL mode.
        "PRAGMA page_size = 16384; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, raw BLOB NOT NULL);",
    )
    .expect("create the log");
    while let Some(first) = rx.blocking_recv() {
        let started = Instant::now();
        let mut batch = vec![first];
        let mut records = batch[0].frames.len() * 2;
        let take =
            |rx: &mut mpsc::Receiver<Append>, batch: &mut Vec<Append>, records: &mut usize| {
                while *records < BATCH_MAX {
                    match rx.try_recv() {
                        Ok(a) => {
                            *records += a.frames.len() * 2;
                            batch.push(a);
                        }
                        Err(_) => break,
                    }
                }
            };
        take(&mut rx, &mut batch, &mut records);
        // The gateway's group commit (`[store] batch_delay`, src/store/writer.rs):
        // under load, linger once for more appends, unless a quarter of a batch
        // is already here.
        if batch.len() > 1 && records < BATCH_MAX.div_ceil(4) {
            if let Some(rest) = (started + BATCH_DELAY).checked_duration_since(Instant::now()) {
                std::thread::sleep(rest);
            }
            take(&mut rx, &mut batch, &mut records);
        }
        let tx = conn.unchecked_transaction().expect("begin");
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO records (raw) VALUES (?1)")
                .expect("prepare");
            for a in &batch {
                for (raw, ack) in &a.frames {
                    insert.execute([&raw[..]]).expect("insert a frame");
                    insert.execute([&ack[..]]).expect("insert an ack");
                }
            }
        }
        tx.commit().expect("commit");
        stats.commits.fetch_add(1, Relaxed);
        let raws: Vec<Bytes> = batch
            .iter()
            .flat_map(|a| a.frames.iter().map(|(raw, _)| raw.clone()))
            .collect();
        if publish.blocking_send(raws).is_err() {
            return;
        }
        for a in batch {
            let _ = a.done.send(());
        }
    }
}

/// Publishes every committed frame with QoS 1 on one connection.
async fn publish(addr: String, mut rx: mpsc::Receiver<Vec<Bytes>>, stats: Arc<Stats>) {
    let mut sock = TcpStream::connect(addr.as_str())
        .await
        .expect("connect to the broker");
    let _ = sock.set_nodelay(true);
    // CONNECT (§3.1): protocol "MQTT" level 4, clean session, keep-alive 0
    // (off: this publisher sends no PINGREQ, and an idle run must not be cut).
    let client_id = b"floor";
    // Remaining length 17: one byte, under 128 (§2.2.3).
    let mut connect = vec![0x10, (10 + 2 + client_id.len()) as u8];
    connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0]);
    connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    connect.extend_from_slice(client_id);
    sock.write_all(&connect).await.expect("CONNECT");
    let mut connack = [0u8; 4];
    sock.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!(
        connack,
        [0x20, 2, 0, 0],
        "the broker refused the connection"
    );
    let (mut rd, mut wr) = sock.into_split();
    let window = Arc::new(Semaphore::new(INFLIGHT));
    {
        let (window, stats) = (window.clone(), stats.clone());
        // PUBACKs (§3.4): 0x40, 2, packet id.
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(4096);
            loop {
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let n = buf.len() / 4;
                assert!(
                    buf[..n * 4].chunks(4).all(|p| p[0] == 0x40 && p[1] == 2),
                    "only PUBACKs expected"
                );
                buf.advance(n * 4);
                stats.pubacks.fetch_add(n as u64, Relaxed);
                window.add_permits(n);
            }
        });
    }
    const TOPIC: &str = "hj212/floor";
    let mut id: u16 = 0;
    let mut out = Vec::with_capacity(64 * 1024);
    while let Some(raws) = rx.recv().await {
        out.clear();
        for raw in &raws {
            match window.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(_) => {
                    // The window is full: what is written so far must reach the
                    // broker for its PUBACKs to free it.
                    if wr.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                    window
                        .acquire()
                        .await
                        .expect("the window is never closed")
                        .forget();
                }
            }
            id = id.checked_add(1).unwrap_or(1);
            // PUBLISH (§3.3) QoS 1, encoded by the gateway's own data connection.
            encode_publish(&mut out, TOPIC, raw, false, false, id);
        }
        if wr.write_all(&out).await.is_err() {
            return;
        }
        stats.published.fetch_add(raws.len() as u64, Relaxed);
    }
}

async fn write_stats(path: String, stats: Arc<Stats>) {
    let tmp = format!("{path}.tmp");
    loop {
        let text = format!(
            "{{\"frames\":{},\"commits\":{},\"published\":{},\"pubacks\":{}}}\n",
            stats.frames.load(Relaxed),
            stats.commits.load(Relaxed),
            stats.published.load(Relaxed),
            stats.pubacks.load(Relaxed),
        );
        if tokio::fs::write(&tmp, text).await.is_ok() {
            let _ = tokio::fs::rename(&tmp, &path).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
