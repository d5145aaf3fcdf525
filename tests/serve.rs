//! The gateway in-process over real sockets and a real SQLite file: what a device
//! receives (byte-exact acks, silence, closed sockets) and what the log holds
//! (byte-exact records, verdicts, findings, duplicates, the hash chain).
//!
//! Every test starts its own gateway on `127.0.0.1:0` with a temporary data
//! directory; nothing is mocked.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{expected_ack, mn, qn, upload};
use hj212_gateway::config::Config;
use hj212_gateway::protocol::framing::FramerConfig;
use hj212_gateway::store::{
    self, BreakReason, Direction, Kind, Reader, RecordFilter, StoredRecord, Verdict,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// HJ212.md §9.2 A: a 295-byte real-time upload and the platform's ack, verbatim.
const SPEC_UPLOAD: &[u8] = b"##0295QN=20240601085857223;ST=31;CN=2011;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&DataTime=20240601085857;a21026-Rtd=12.5,a21026-ZsRtd=15.1,a21026-Flag=N;a21002-Rtd=35.2,a21002-ZsRtd=42.6,a21002-Flag=N;a34013-Rtd=3.1,a34013-Flag=N;a19001-Rtd=9.8,a19001-Flag=N;a00000-Rtd=28.15,a00000-Flag=N&&3E80\r\n";
const SPEC_ACK: &[u8] = b"##0087QN=20240601085857223;ST=91;CN=9014;PW=123456;MN=010000A8900016F000169DC0;Flag=4;CP=&&&&24C0\r\n";

/// Longest any single expected event may take on a loaded 2-core CI machine.
const PATIENCE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// Config text: `[server]` on an ephemeral loopback port plus `server` lines,
/// `[store]` with `sync` (`off` unless durability is the point), then `rest`.
///
/// The uploads here carry fixed DataTimes, which look like a skewed clock and
/// gaps: automatic calibration and backfill are off (tests/downlink.rs covers
/// them), so the devices read nothing but their acks.
fn config_sync(sync: &str, server: &str, rest: &str) -> String {
    const DL: &str = "[downlink]\ntime_sync_skew = false\nbackfill = false\n";
    let rest = if rest.contains("[downlink]") {
        rest.replacen("[downlink]\n", DL, 1)
    } else {
        format!("{DL}{rest}")
    };
    format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n{server}\n[store]\nsync = \"{sync}\"\n{rest}\n"
    )
}

fn config_text(server: &str, rest: &str) -> String {
    config_sync("off", server, rest)
}

type Gateway = common::InProc;

impl Gateway {
    async fn start(server: &str, rest: &str) -> Gateway {
        Gateway::start_sync("off", server, rest).await
    }

    async fn start_sync(sync: &str, server: &str, rest: &str) -> Gateway {
        let text = config_sync(sync, server, rest);
        let cfg = Config::parse(&text, Path::new("test")).expect("config");
        Gateway::start_with(cfg, None).await
    }

    /// Starts from a config file on disk (so `reload()` re-reads it).
    async fn start_from_file(path: &Path) -> Gateway {
        let cfg = Config::load(path).expect("config file");
        Gateway::start_with(cfg, Some(path.to_owned())).await
    }

    async fn start_with(cfg: Config, config: Option<PathBuf>) -> Gateway {
        common::start_config(cfg, config).await
    }

    async fn device(&self) -> Device {
        Device::connect(self.addr).await
    }

    fn records(&self) -> Vec<StoredRecord> {
        all_records(&self.db)
    }

    /// Stops the gateway (drain, commit, checkpoint) and returns the data directory.
    async fn stop(self) -> (tempfile::TempDir, PathBuf) {
        tokio::time::timeout(PATIENCE * 3, self.running.stop())
            .await
            .expect("stop in time")
            .expect("clean stop");
        (self.dir, self.db)
    }
}

fn all_records(db: &Path) -> Vec<StoredRecord> {
    Reader::open(db)
        .expect("reader")
        .records(RecordFilter::default())
        .expect("records")
        .collect::<Result<_, _>>()
        .expect("read records")
}

/// Inbound records of one connection, identified by the client's local address.
fn inbound_of(recs: &[StoredRecord], client: SocketAddr) -> Vec<&StoredRecord> {
    let peer = client.to_string();
    recs.iter()
        .filter(|r| r.direction == Direction::In && r.peer == peer)
        .collect()
}

fn concat(recs: &[&StoredRecord]) -> Vec<u8> {
    recs.iter().flat_map(|r| r.raw.iter().copied()).collect()
}

fn finding_codes(r: &StoredRecord) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&r.findings).expect("findings JSON");
    v.as_array()
        .expect("findings array")
        .iter()
        .map(|f| f["code"].as_str().expect("code").to_owned())
        .collect()
}

fn find_raw<'a>(recs: &'a [StoredRecord], raw: &[u8]) -> Vec<&'a StoredRecord> {
    recs.iter().filter(|r| r.raw == raw).collect()
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A device: one TCP connection with a reply buffer.
struct Device {
    stream: TcpStream,
    buf: Vec<u8>,
    local: SocketAddr,
}

enum ReadOutcome {
    Reply(Vec<u8>),
    Closed,
    Nothing,
}

impl Device {
    async fn connect(addr: SocketAddr) -> Device {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let local = stream.local_addr().expect("local addr");
        Device {
            stream,
            buf: Vec::new(),
            local,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next CRLF-terminated reply, or what happened instead within `wait`.
    async fn next(&mut self, wait: Duration) -> ReadOutcome {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return ReadOutcome::Reply(self.buf.drain(..i + 2).collect());
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return ReadOutcome::Nothing,
                Ok(Ok(0)) | Ok(Err(_)) => return ReadOutcome::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn reply(&mut self) -> Vec<u8> {
        match self.next(PATIENCE).await {
            ReadOutcome::Reply(r) => r,
            ReadOutcome::Closed => panic!("connection closed instead of a reply"),
            ReadOutcome::Nothing => panic!("no reply within {PATIENCE:?}"),
        }
    }

    /// Asserts that nothing arrives for `d` and the connection stays open.
    async fn silent_for(&mut self, d: Duration) {
        match self.next(d).await {
            ReadOutcome::Nothing => {}
            ReadOutcome::Reply(r) => panic!("unexpected reply {:?}", show(&r)),
            ReadOutcome::Closed => panic!("connection closed unexpectedly"),
        }
        assert!(self.buf.is_empty(), "partial reply {:?}", show(&self.buf));
    }

    /// Asserts that the gateway closes the connection within `d` without replying.
    async fn closed_within(&mut self, d: Duration) {
        match self.next(d).await {
            ReadOutcome::Closed => {}
            ReadOutcome::Reply(r) => panic!("reply {:?} instead of a close", show(&r)),
            ReadOutcome::Nothing => panic!("connection still open after {d:?}"),
        }
    }

    /// Half-closes, reads to EOF, and returns every byte not yet taken as a reply.
    async fn finish(mut self) -> Vec<u8> {
        self.stream.shutdown().await.expect("shutdown");
        let mut rest = std::mem::take(&mut self.buf);
        tokio::time::timeout(PATIENCE, self.stream.read_to_end(&mut rest))
            .await
            .expect("gateway closes after EOF")
            .expect("read to end");
        rest
    }

    /// Sends `frame`, expects exactly its ack.
    async fn exchange(&mut self, frame: &[u8]) {
        self.send(frame).await;
        let got = self.reply().await;
        assert_eq!(
            show(&got),
            show(&expected_ack(frame)),
            "ack of {}",
            show(frame)
        );
    }
}

// ---------------------------------------------------------------------------
// 1. Framing over real sockets: every byte received is stored, every good frame acked once
// ---------------------------------------------------------------------------

#[test]
fn the_spec_ack_is_what_the_protocol_layer_builds() {
    assert_eq!(
        SPEC_UPLOAD.len(),
        6 + 295 + 6,
        "##, LLLL, 295-byte segment, CRC, CR LF"
    );
    assert_eq!(show(&expected_ack(SPEC_UPLOAD)), show(SPEC_ACK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_split_at_every_byte_boundary_is_acked_once_and_stored_whole() {
    let gw = Gateway::start("", "").await;
    // Each split on its own device: connections sharing one MN supersede each
    // other (the newest session owns an MN), which would close a connection
    // holding half a frame. The frames differ only in MN and QN, so they have
    // the same length and every split point is covered.
    let frame_for = |at: usize| {
        let f = upload(&mn(2000 + at as u32), &qn(at as u32), "123456");
        let ack = expected_ack(&f);
        (f, ack)
    };
    let splits: Vec<usize> = (1..frame_for(0).0.len()).collect();
    let mut tasks = Vec::new();
    for at in splits.clone() {
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            let (frame, want) = frame_for(at);
            let mut d = Device::connect(addr).await;
            d.send(&frame[..at]).await;
            // Give the gateway a chance to read the first part on its own.
            tokio::time::sleep(Duration::from_millis(20)).await;
            d.send(&frame[at..]).await;
            let ack = d.reply().await;
            assert_eq!(show(&ack), show(&want), "split at {at}");
            let local = d.local;
            let rest = d.finish().await;
            assert!(
                rest.is_empty(),
                "split at {at}: extra bytes {:?}",
                show(&rest)
            );
            local
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("client task"));
    }
    let (_dir, db) = gw.stop().await;
    let recs = all_records(&db);
    for (at, client) in splits.iter().zip(&clients) {
        let inbound = inbound_of(&recs, *client);
        assert_eq!(inbound.len(), 1, "split at {at}: one record, not pieces");
        let (frame, want) = frame_for(*at);
        assert_eq!(inbound[0].raw, frame, "split at {at}");
        assert_eq!(inbound[0].kind, Kind::Frame);
        assert_eq!(inbound[0].verdict, Verdict::Accepted);
        let out: Vec<_> = recs
            .iter()
            .filter(|r| r.direction == Direction::Out && r.peer == client.to_string())
            .collect();
        assert_eq!(out.len(), 1, "split at {at}: one ack logged");
        assert_eq!(out[0].raw, want);
    }
    assert!(store::verify_chain(&db).expect("verify").is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glued_frames_garbage_bad_length_lf_only_and_oversize_in_one_stream() {
    let gw = Gateway::start("max_frame_bytes = 1024", "").await;
    let f1 = upload(&mn(1), &qn(1), "123456");
    let f2 = upload(&mn(1), &qn(2), "123456");
    let f3 = upload(&mn(1), &qn(3), "123456");
    // Declared length 0999 while the segment is shorter: found by scanning, a warning.
    let mut bad_len = upload(&mn(1), &qn(4), "123456");
    bad_len[2..6].copy_from_slice(b"0999");
    // LF-only terminator: the frame minus its CR.
    let mut lf_only = upload(&mn(1), &qn(5), "123456");
    lf_only.remove(lf_only.len() - 2);
    // An oversize frame: a valid envelope around a 1500-byte segment (> max_frame_bytes).
    let big_seg = format!(
        "QN={};ST=31;CN=2011;PW=123456;MN={};Flag=5;CP=&&DataTime=20240601085857;{}&&",
        qn(6),
        mn(1),
        "a21026-Rtd=12.5,a21026-Flag=N;".repeat(50)
    );
    let oversize = hj212_gateway::protocol::reply::envelope(big_seg.as_bytes()).to_vec();
    assert!(oversize.len() > 1024);
    // A bad CRC: recognised as a frame, rejected, never acked.
    let mut bad_crc = upload(&mn(1), &qn(7), "123456");
    let c = bad_crc.len() - 3;
    bad_crc[c] = if bad_crc[c] == b'0' { b'1' } else { b'0' };

    let garbage = b"AT+CSQ\r\n+CSQ: 23,99\r\nOK\r\n\0\0\0";
    let mut stream = Vec::new();
    for part in [
        &garbage[..],
        &f1,
        &f2, // glued to f1
        b"\xff\xfe junk between frames ",
        &bad_len,
        &lf_only,
        &oversize,
        &bad_crc,
        &f3,
    ] {
        stream.extend_from_slice(part);
    }

    let mut d = gw.device().await;
    d.send(&stream).await;
    let acked = [&f1, &f2, &bad_len, &lf_only, &f3];
    for f in acked {
        let ack = d.reply().await;
        assert_eq!(show(&ack), show(&expected_ack(f)), "ack for {}", show(f));
    }
    let client = d.local;
    let rest = d.finish().await;
    assert!(rest.is_empty(), "no other replies: {:?}", show(&rest));

    let recs = gw.records();
    let inbound = inbound_of(&recs, client);
    assert_eq!(
        concat(&inbound),
        stream,
        "the log holds exactly the bytes sent"
    );
    let frames: Vec<&&StoredRecord> = inbound.iter().filter(|r| r.kind == Kind::Frame).collect();
    let raws: Vec<&[u8]> = frames.iter().map(|r| r.raw.as_slice()).collect();
    assert_eq!(raws, [&f1[..], &f2, &bad_len, &lf_only, &bad_crc, &f3]);
    for r in &frames {
        let want = if r.raw == bad_crc {
            Verdict::Rejected
        } else {
            Verdict::Accepted
        };
        assert_eq!(r.verdict, want, "{}", show(&r.raw));
    }
    assert!(finding_codes(frames[2]).contains(&"length.mismatch".to_owned()));
    assert!(finding_codes(frames[3]).contains(&"terminator.nonstandard".to_owned()));
    for j in inbound.iter().filter(|r| r.kind == Kind::Junk) {
        assert_eq!(j.verdict, Verdict::Junk);
        assert!(j.mn.is_none());
    }
    let junk: Vec<u8> = inbound
        .iter()
        .filter(|r| r.kind == Kind::Junk)
        .flat_map(|r| r.raw.iter().copied())
        .collect();
    let mut want_junk = garbage.to_vec();
    want_junk.extend_from_slice(b"\xff\xfe junk between frames ");
    want_junk.extend_from_slice(&oversize);
    assert_eq!(show(&junk), show(&want_junk), "junk is exactly the garbage");
    let out: Vec<&StoredRecord> = recs
        .iter()
        .filter(|r| r.direction == Direction::Out && r.peer == client.to_string())
        .collect();
    let out_raws: Vec<Vec<u8>> = out.iter().map(|r| r.raw.clone()).collect();
    let want_out: Vec<Vec<u8>> = acked.iter().map(|f| expected_ack(f)).collect();
    assert_eq!(out_raws, want_out, "every ack sent is logged, in order");
    gw.stop().await;
}

/// Every fixture frame (real captures) on its own connection: the gateway's acks
/// are exactly what the protocol layer says for the items the framer cuts, and
/// the log holds exactly the bytes sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_frames_are_stored_byte_exact_and_acked_as_the_protocol_says() {
    use hj212_gateway::codec::{Hj212Codec, Item};
    use tokio_util::codec::Decoder;

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/frames.jsonl"
    ))
    .expect("fixtures");
    let frames: Vec<Vec<u8>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("fixture JSON");
            v["frame"].as_str().expect("frame text").as_bytes().to_vec()
        })
        .collect();
    assert!(frames.len() > 100, "fixtures present");

    // Only the acks: the 1012 a 1013 calls for is tested in tests/downlink.rs.
    let gw = Gateway::start("", "[downlink]\ntime_sync = false").await;
    let mut tasks = Vec::new();
    for frame in frames {
        // What the gateway must answer: cut as at end of stream, ack accepted frames.
        let mut codec = Hj212Codec::new(FramerConfig {
            max_frame: 10_240,
            ..FramerConfig::default()
        });
        let mut buf = bytes::BytesMut::from(&frame[..]);
        let mut want = Vec::new();
        while let Some(item) = codec.decode_eof(&mut buf).expect("cut") {
            if let Item::Frame { bytes, .. } = item {
                let f = common::decode(&bytes);
                if !f.has_error() {
                    if let Some(a) = hj212_gateway::protocol::reply::ack(&f) {
                        want.extend_from_slice(&a);
                    }
                }
            }
            if buf.is_empty() {
                break;
            }
        }
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            let mut d = Device::connect(addr).await;
            d.send(&frame).await;
            let local = d.local;
            let got = d.finish().await;
            assert_eq!(show(&got), show(&want), "replies to {}", show(&frame));
            (local, frame)
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.expect("client task"));
    }
    let recs = gw.records();
    for (client, frame) in &sent {
        assert_eq!(
            show(&concat(&inbound_of(&recs, *client))),
            show(frame),
            "stored byte-exact"
        );
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// 2. No ack before commit
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_ack_arrives_the_record_is_already_in_the_log() {
    let gw = Gateway::start_sync("normal", "", "").await;
    let mut d = gw.device().await;
    for i in 0..100 {
        let f = upload(&mn(2), &qn(i), "123456");
        d.exchange(&f).await;
        // A fresh connection, opened only now, must already see the frame.
        let reader = Reader::open(&gw.db).expect("reader");
        let last = reader.last_seq().expect("last seq");
        let recs: Vec<StoredRecord> = reader
            .read_from(last.saturating_sub(2), 2)
            .expect("read tail");
        assert!(
            recs.iter()
                .any(|r| r.raw == f && r.direction == Direction::In),
            "frame {i} acked but not committed"
        );
        assert!(
            recs.iter()
                .any(|r| r.raw == expected_ack(&f) && r.direction == Direction::Out),
            "ack {i} sent but not logged"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_while_another_connection_holds_the_write_lock() {
    let gw = Gateway::start("", "").await;
    let mut d = gw.device().await;
    d.exchange(&upload(&mn(3), &qn(1), "123456")).await;

    let lock = rusqlite::Connection::open(&gw.db).expect("second connection");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let f = upload(&mn(3), &qn(2), "123456");
    d.send(&f).await;
    let held = Instant::now();
    d.silent_for(Duration::from_millis(500)).await;
    assert!(
        find_raw(&all_records(&gw.db), &f).is_empty(),
        "not committed while locked"
    );
    lock.execute_batch("ROLLBACK").expect("release");
    let ack = d.reply().await;
    assert_eq!(show(&ack), show(&expected_ack(&f)));
    assert!(held.elapsed() >= Duration::from_millis(500));
    let recs = all_records(&gw.db);
    assert_eq!(find_raw(&recs, &f).len(), 1, "committed before the ack");
    drop(lock);
    let (_dir, db) = gw.stop().await;
    assert!(store::verify_chain(&db).expect("verify").is_intact());
}

/// A commit that fails (here: a trigger installed by the test refuses one MN's
/// rows) rolls the batch back; the device gets no ack and its connection is
/// closed, so it will retransmit. Other devices carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_sends_no_ack_and_closes_the_session() {
    let gw = Gateway::start("", "").await;
    let mut good = gw.device().await;
    good.exchange(&upload(&mn(4), &qn(1), "123456")).await;
    let poison = mn(5);
    let side = rusqlite::Connection::open(&gw.db).expect("second connection");
    side.execute_batch(&format!(
        "CREATE TRIGGER test_refuse BEFORE INSERT ON records WHEN NEW.mn = '{poison}' \
         BEGIN SELECT RAISE(ABORT, 'test: refused'); END;"
    ))
    .expect("install trigger");
    drop(side);

    let mut bad = gw.device().await;
    let f = upload(&poison, &qn(2), "123456");
    bad.send(&f).await;
    bad.closed_within(PATIENCE).await;
    assert!(find_raw(&gw.records(), &f).is_empty(), "rolled back");
    good.exchange(&upload(&mn(4), &qn(3), "123456")).await;
    let (_dir, db) = gw.stop().await;
    assert!(store::verify_chain(&db).expect("verify").is_intact());
}

// ---------------------------------------------------------------------------
// 4. Tamper evidence on a log the daemon wrote
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_altered_after_the_fact_is_reported_at_its_seq() {
    let gw = Gateway::start_sync("normal", "", "").await;
    let mut d = gw.device().await;
    for i in 0..5 {
        d.exchange(&upload(&mn(6), &qn(i), "123456")).await;
    }
    drop(d);
    let (_dir, db) = gw.stop().await;
    let report = store::verify_chain(&db).expect("verify");
    assert!(report.is_intact());
    assert_eq!(report.records_checked, 10, "5 frames + 5 acks");

    let recs = all_records(&db);
    let victim = recs
        .iter()
        .find(|r| r.direction == Direction::In && r.raw == upload(&mn(6), &qn(2), "123456"))
        .expect("stored frame");
    let mut altered = victim.raw.clone();
    let at = altered
        .windows(4)
        .position(|w| w == b"12.5")
        .expect("value");
    altered[at..at + 4].copy_from_slice(b"02.5");
    let attacker = rusqlite::Connection::open(&db).expect("open");
    assert!(
        attacker
            .execute(
                "UPDATE records SET raw = ?1 WHERE seq = ?2",
                (&altered, victim.seq as i64)
            )
            .is_err(),
        "the trigger refuses the naive update"
    );
    attacker
        .execute_batch("DROP TRIGGER records_append_only_update")
        .expect("drop trigger");
    let n = attacker
        .execute(
            "UPDATE records SET raw = ?1 WHERE seq = ?2",
            (&altered, victim.seq as i64),
        )
        .expect("update");
    assert_eq!(n, 1);
    drop(attacker);
    let report = store::verify_chain(&db).expect("verify");
    let b = report.first_break.expect("tampering detected");
    assert_eq!(b.seq, victim.seq);
    assert_eq!(b.reason, BreakReason::HashMismatch);
    assert_eq!(report.records_checked, victim.seq - 1);
}

// ---------------------------------------------------------------------------
// 5. Many devices at once
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_devices_are_all_acked_and_none_lost() {
    const DEVICES: u32 = 1000;
    const FRAMES: u32 = 3;
    let gw = Gateway::start("max_per_ip = 1100", "").await;
    let connected = Arc::new(tokio::sync::Barrier::new(DEVICES as usize + 1));
    let done = Arc::new(tokio::sync::Barrier::new(DEVICES as usize + 1));
    let checked = Arc::new(tokio::sync::Barrier::new(DEVICES as usize + 1));
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let (connected, done, checked) = (connected.clone(), done.clone(), checked.clone());
        let d = Device::connect(gw.addr).await;
        tasks.push(tokio::spawn(async move {
            let mut d = d;
            connected.wait().await;
            for k in 0..FRAMES {
                d.exchange(&upload(&mn(10_000 + i), &qn(k * DEVICES + i), "123456"))
                    .await;
            }
            done.wait().await;
            checked.wait().await;
            d.finish().await
        }));
    }
    connected.wait().await;
    done.wait().await;
    // Every device has claimed its MN and is still connected.
    assert_eq!(gw.running.shared.sessions.len(), DEVICES as usize);
    checked.wait().await;
    for t in tasks {
        assert!(t.await.expect("device task").is_empty(), "no extra replies");
    }
    let (_dir, db) = gw.stop().await;
    let recs = all_records(&db);
    let mut per_mn: HashMap<String, u32> = HashMap::new();
    for r in &recs {
        if r.direction == Direction::In {
            assert_eq!(r.verdict, Verdict::Accepted);
            *per_mn.entry(r.mn.clone().expect("mn")).or_default() += 1;
        }
    }
    assert_eq!(per_mn.len(), DEVICES as usize);
    assert!(per_mn.values().all(|&n| n == FRAMES), "3 records per MN");
    assert_eq!(recs.len(), (DEVICES * FRAMES * 2) as usize);
    assert!(store::verify_chain(&db).expect("verify").is_intact());
}

// ---------------------------------------------------------------------------
// 6. Registry
// ---------------------------------------------------------------------------

const DEVICE_PW: &str = "[[device]]\nmn = \"010000A8900016F000000777\"\npw = \"654321\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_stored_rejected_and_never_acked() {
    let gw = Gateway::start("", DEVICE_PW).await;
    let dev = "010000A8900016F000000777";
    let mut d = gw.device().await;
    let wrong = upload(dev, &qn(1), "123456");
    d.send(&wrong).await;
    d.silent_for(Duration::from_millis(300)).await;
    let right = upload(dev, &qn(2), "654321");
    d.exchange(&right).await;
    let recs = gw.records();
    let w = find_raw(&recs, &wrong);
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].verdict, Verdict::Rejected);
    assert!(finding_codes(w[0]).contains(&"auth.password".to_owned()));
    assert_eq!(find_raw(&recs, &right)[0].verdict, Verdict::Accepted);
    assert_eq!(
        recs.iter()
            .filter(|r| r.direction == Direction::Out)
            .count(),
        1,
        "only the good frame was answered"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_devices_rejected_when_configured() {
    let rest = format!("[validation]\nunknown_device = \"reject\"\n{DEVICE_PW}");
    let gw = Gateway::start("", &rest).await;
    let mut d = gw.device().await;
    let stranger = upload(&mn(8), &qn(1), "123456");
    d.send(&stranger).await;
    d.silent_for(Duration::from_millis(300)).await;
    d.exchange(&upload("010000A8900016F000000777", &qn(2), "654321"))
        .await;
    let recs = gw.records();
    let s = find_raw(&recs, &stranger);
    assert_eq!(s[0].verdict, Verdict::Rejected);
    assert!(finding_codes(s[0]).contains(&"device.unknown".to_owned()));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_devices_quarantined_are_acked_and_marked() {
    let rest = format!("[validation]\nunknown_device = \"quarantine\"\n{DEVICE_PW}");
    let gw = Gateway::start("", &rest).await;
    let mut d = gw.device().await;
    let stranger = upload(&mn(9), &qn(1), "123456");
    d.exchange(&stranger).await;
    let known = upload("010000A8900016F000000777", &qn(2), "654321");
    d.exchange(&known).await;
    let recs = gw.records();
    let s = find_raw(&recs, &stranger)[0];
    assert_eq!(s.verdict, Verdict::Accepted);
    assert!(finding_codes(s).contains(&"device.quarantined".to_owned()));
    let k = find_raw(&recs, &known)[0];
    assert!(!finding_codes(k).contains(&"device.quarantined".to_owned()));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_to_live_sessions_and_a_broken_file_keeps_the_registry() {
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let path = cfg_dir.path().join("gateway.toml");
    std::fs::write(&path, config_text("", "")).expect("write config");
    let gw = Gateway::start_from_file(&path).await;
    let dev = mn(20);
    let mut d = gw.device().await;
    // Not registered yet: any PW is accepted.
    d.exchange(&upload(&dev, &qn(1), "111111")).await;

    let with_pw = config_text(
        "",
        &format!("[[device]]\nmn = \"{dev}\"\npw = \"222222\"\n"),
    );
    std::fs::write(&path, with_pw).expect("rewrite config");
    gw.running.reload();
    // Same connection, next frame: the new rule applies.
    let old_pw = upload(&dev, &qn(2), "111111");
    d.send(&old_pw).await;
    d.silent_for(Duration::from_millis(300)).await;
    d.exchange(&upload(&dev, &qn(3), "222222")).await;

    std::fs::write(&path, "[server]\nlisten = [\"nope\"]\n").expect("break config");
    gw.running.reload();
    let again = upload(&dev, &qn(4), "111111");
    d.send(&again).await;
    d.silent_for(Duration::from_millis(300)).await;
    d.exchange(&upload(&dev, &qn(5), "222222")).await;

    let recs = gw.records();
    for f in [&old_pw, &again] {
        let r = find_raw(&recs, f)[0];
        assert_eq!(r.verdict, Verdict::Rejected);
        assert!(finding_codes(r).contains(&"auth.password".to_owned()));
    }
    assert_eq!(
        inbound_of(&recs, d.local).len(),
        5,
        "one session throughout"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// 7. Retransmissions, 8. reconnection
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmission_is_acked_again_and_marked_duplicate() {
    let gw = Gateway::start("", "").await;
    let f = upload(&mn(30), &qn(1), "123456");
    let mut d = gw.device().await;
    d.exchange(&f).await;
    d.exchange(&f).await;
    // And again from a new connection (the device restarted).
    let mut d2 = gw.device().await;
    d2.exchange(&f).await;
    let recs = gw.records();
    let stored = find_raw(&recs, &f);
    let dups: Vec<bool> = stored.iter().map(|r| r.duplicate).collect();
    assert_eq!(dups, [false, true, true]);
    assert!(stored.iter().all(|r| r.verdict == Verdict::Accepted));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_device_supersedes_its_old_session() {
    let gw = Gateway::start("", "").await;
    let dev = mn(31);
    let mut old = gw.device().await;
    old.exchange(&upload(&dev, &qn(1), "123456")).await;
    // The old connection has half a frame in the gateway's buffer when it is superseded.
    let half = upload(&dev, &qn(2), "123456");
    let half = &half[..half.len() / 2];
    old.send(half).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut new = gw.device().await;
    new.exchange(&upload(&dev, &qn(3), "123456")).await;
    old.closed_within(PATIENCE).await;
    // The new session is unaffected.
    new.exchange(&upload(&dev, &qn(4), "123456")).await;
    assert_eq!(gw.running.shared.sessions.len(), 1);

    let recs = gw.records();
    let old_in = inbound_of(&recs, old.local);
    let mut sent = upload(&dev, &qn(1), "123456");
    sent.extend_from_slice(half);
    assert_eq!(
        show(&concat(&old_in)),
        show(&sent),
        "bytes received before the supersede are stored"
    );
    assert_eq!(old_in.last().expect("junk").verdict, Verdict::Junk);
    gw.stop().await;
}

/// A connection may carry several MNs (a data logger relaying for analyzers).
/// When it is superseded for one MN while holding a complete frame of another MN
/// that still waits for its terminator, that frame is stored and acked on the
/// old connection, but the closing session must not claim the other MN and so
/// supersede the live session that owns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_session_flushing_a_frame_supersedes_no_one() {
    let gw = Gateway::start("", "").await;
    let (a, b) = (mn(32), mn(33));
    let mut old = gw.device().await;
    old.exchange(&upload(&a, &qn(1), "123456")).await;
    let mut owner_b = gw.device().await;
    owner_b.exchange(&upload(&b, &qn(2), "123456")).await;
    let mut pending = upload(&b, &qn(3), "123456");
    pending.truncate(pending.len() - 2); // no CR LF yet: the framer waits for it
    old.send(&pending).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut new = gw.device().await;
    new.exchange(&upload(&a, &qn(4), "123456")).await;
    let ack = old.reply().await;
    assert_eq!(show(&ack), show(&expected_ack(&pending)));
    old.closed_within(PATIENCE).await;
    let p = find_raw(&gw.records(), &pending)[0].clone();
    assert_eq!(p.verdict, Verdict::Accepted);
    // B's live session is untouched.
    owner_b.exchange(&upload(&b, &qn(5), "123456")).await;
    owner_b.silent_for(Duration::from_millis(100)).await;
    new.exchange(&upload(&a, &qn(6), "123456")).await;
    assert_eq!(gw.running.shared.sessions.len(), 2);
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// 9. Limits
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_connection_from_one_address_is_closed_at_once() {
    let gw = Gateway::start("max_per_ip = 2", "").await;
    let mut a = gw.device().await;
    a.exchange(&upload(&mn(40), &qn(1), "123456")).await;
    let mut b = gw.device().await;
    b.exchange(&upload(&mn(41), &qn(1), "123456")).await;
    let mut c = gw.device().await;
    c.closed_within(Duration::from_secs(2)).await;
    // Closing one frees its slot.
    drop(a);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut d = gw.device().await;
        let f = upload(&mn(42), &qn(1), "123456");
        d.send(&f).await;
        match d.next(Duration::from_secs(1)).await {
            ReadOutcome::Reply(r) => {
                assert_eq!(r, expected_ack(&f));
                break;
            }
            _ => assert!(Instant::now() < deadline, "slot never freed"),
        }
    }
    b.exchange(&upload(&mn(41), &qn(2), "123456")).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_closed_after_idle_timeout() {
    let gw = Gateway::start("idle_timeout = \"1s\"", "").await;
    let mut d = gw.device().await;
    let t = Instant::now();
    d.exchange(&upload(&mn(43), &qn(1), "123456")).await;
    d.closed_within(PATIENCE).await;
    // Measured from before the last frame was sent: the gateway's idle clock
    // starts when it reads that frame, which is later.
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_frame_is_closed_after_partial_frame_timeout_and_kept_as_junk() {
    let gw = Gateway::start("partial_frame_timeout = \"1s\"", "").await;
    let mut d = gw.device().await;
    let f = upload(&mn(44), &qn(1), "123456");
    let half = &f[..120];
    d.send(half).await;
    let t = Instant::now();
    d.closed_within(PATIENCE).await;
    assert!(
        t.elapsed() >= Duration::from_millis(980),
        "{:?}",
        t.elapsed()
    );
    let recs = gw.records();
    let inbound = inbound_of(&recs, d.local);
    assert_eq!(inbound.len(), 1);
    assert_eq!(inbound[0].raw, half);
    assert_eq!(inbound[0].kind, Kind::Junk);
    assert_eq!(inbound[0].verdict, Verdict::Junk);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_max_junk_bytes_is_closed() {
    let gw = Gateway::start("max_junk_bytes = 1000", "").await;
    let mut d = gw.device().await;
    d.exchange(&upload(&mn(45), &qn(1), "123456")).await;
    // 1500 bytes of garbage, then the start of a frame, in one write.
    let mut garbage: Vec<u8> = (0..1500u32).map(|i| b'a' + (i % 26) as u8).collect();
    garbage.extend_from_slice(&upload(&mn(45), &qn(2), "123456")[..60]);
    d.send(&garbage).await;
    d.closed_within(PATIENCE).await;
    let recs = gw.records();
    let inbound = inbound_of(&recs, d.local);
    let junk: Vec<&StoredRecord> = inbound[1..].to_vec();
    assert!(junk.iter().all(|r| r.verdict == Verdict::Junk));
    assert_eq!(
        show(&concat(&junk)),
        show(&garbage),
        "everything read before closing is stored"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// 10. Graceful shutdown
// ---------------------------------------------------------------------------

/// Devices stream frames without waiting for acks while `stop()` is called.
/// What holds, precisely, for each device:
/// * the frames stored (accepted) are a gap-free prefix `frames[..m]` of those sent,
///   and the inbound records are a prefix of the bytes sent;
/// * the acks logged (outbound records) are exactly the acks of `frames[..m]`:
///   everything committed during shutdown was answered;
/// * the acks received are the acks of a prefix `frames[..k]`, `k <= m`, in order:
///   no ack for anything that is not in the log.
///
/// `k == m` is NOT guaranteed: the gateway closes a connection whose device is
/// still sending, the kernel then resets it, and acks still queued in the socket
/// are discarded. The device retransmits those frames, which the log marks as
/// duplicates. Nothing acked is ever lost; some committed frames are not acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_commits_and_acks_frames_in_flight() {
    const DEVICES: u32 = 8;
    let gw = Gateway::start_sync("normal", "", "").await;
    let acks_seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let (addr, acks_seen) = (gw.addr, acks_seen.clone());
        tasks.push(tokio::spawn(async move {
            let d = Device::connect(addr).await;
            let local = d.local;
            let (mut rd, mut wr) = d.stream.into_split();
            let frames: Vec<Vec<u8>> = (0..2000)
                .map(|k| upload(&mn(50 + i), &qn(k * DEVICES + i), "123456"))
                .collect();
            let to_send = frames.clone();
            let writer = tokio::spawn(async move {
                let mut sent = Vec::new();
                for f in &to_send {
                    // Counted before the write: a write cut short may still deliver a prefix.
                    sent.extend_from_slice(f);
                    if wr.write_all(f).await.is_err() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                sent
            });
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match tokio::time::timeout(PATIENCE * 3, rd.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        got.extend_from_slice(&chunk[..n]);
                        acks_seen.fetch_add(
                            chunk[..n].iter().filter(|&&b| b == b'\n').count(),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    Err(_) => panic!("gateway never closed the connection"),
                }
            }
            let sent = writer.await.expect("writer");
            (local, frames, sent, got)
        }));
    }
    let t = Instant::now();
    while acks_seen.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(t.elapsed() < PATIENCE * 3, "devices never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let addr = gw.addr;
    let (_dir, db) = gw.stop().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
    let recs = all_records(&db);
    let mut total_acked = 0;
    for t in tasks {
        let (local, frames, sent, got) = t.await.expect("device task");
        let acked = got.iter().filter(|&&b| b == b'\n').count();
        let want: Vec<u8> = frames[..acked]
            .iter()
            .flat_map(|f| expected_ack(f))
            .collect();
        assert_eq!(
            show(&got),
            show(&want),
            "acks are a prefix, in order, complete"
        );
        let inbound = inbound_of(&recs, local);
        assert!(
            sent.starts_with(&concat(&inbound)),
            "inbound is a prefix of the bytes sent"
        );
        let accepted: Vec<&[u8]> = inbound
            .iter()
            .filter(|r| r.kind == Kind::Frame && r.verdict == Verdict::Accepted)
            .map(|r| r.raw.as_slice())
            .collect();
        let m = accepted.len();
        assert!(
            acked <= m,
            "{acked} acks received but only {m} frames stored"
        );
        let stored_prefix: Vec<&[u8]> = frames[..m].iter().map(Vec::as_slice).collect();
        assert_eq!(
            accepted, stored_prefix,
            "stored frames are a gap-free prefix"
        );
        let out: Vec<u8> = recs
            .iter()
            .filter(|r| r.direction == Direction::Out && r.peer == local.to_string())
            .flat_map(|r| r.raw.iter().copied())
            .collect();
        // The gateway half-closes after its last ack and drains the socket, so
        // the kernel never resets the connection: every ack it logged as sent
        // reached the device. Frames read during the drain are stored but not
        // acked (the device will retransmit them, marked duplicate).
        assert_eq!(
            show(&got),
            show(&out),
            "every logged ack reached the device"
        );
        total_acked += acked;
    }
    assert!(total_acked >= 200);
    assert!(store::verify_chain(&db).expect("verify").is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_keeps_a_half_received_frame_as_junk() {
    let gw = Gateway::start("", "").await;
    let mut d = gw.device().await;
    let f = upload(&mn(60), &qn(1), "123456");
    d.exchange(&f).await;
    let half = upload(&mn(60), &qn(2), "123456");
    let half = &half[..100];
    d.send(half).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_dir, db) = gw.stop().await;
    d.closed_within(PATIENCE).await;
    let recs = all_records(&db);
    let inbound = inbound_of(&recs, d.local);
    let mut sent = f.clone();
    sent.extend_from_slice(half);
    assert_eq!(show(&concat(&inbound)), show(&sent));
    assert_eq!(inbound[1].verdict, Verdict::Junk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_without_terminator_is_acked_once_the_line_is_quiet() {
    // Loggers that send no CR LF still wait for their 9014.
    let gw = Gateway::start("", "").await;
    let mut d = gw.device().await;
    let full = upload(&mn(31), &qn(1), "123456");
    let bare = &full[..full.len() - 2];
    let t = Instant::now();
    d.send(bare).await;
    let got = d.reply().await;
    assert_eq!(show(&got), show(&expected_ack(&full)));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "acked after {:?}",
        t.elapsed()
    );
    // The next frame (with CR LF) on the same connection is unaffected.
    d.exchange(&upload(&mn(31), &qn(2), "123456")).await;
    let recs = gw.records();
    let stored = find_raw(&recs, bare);
    assert_eq!(stored.len(), 1, "stored byte-exact without terminator");
    assert!(finding_codes(stored[0]).contains(&"terminator.missing".to_owned()));
    gw.stop().await;
}

// Thread priorities of a running gateway, read from `/proc`: the store writer runs
// `[store] writer_boost` nice steps above the rest, the alarm detector `[alarms]
// nice` steps below, every other thread at the process's own priority.

/// The nice value of each thread of `pid`, by thread name.
fn thread_nices(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let t = t.expect("task").path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(t.join("comm")),
            std::fs::read_to_string(t.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // Fields after the parenthesised name: state is field 3, nice field 19.
        let rest = &stat[stat.rfind(')').expect("stat") + 2..];
        let nice = rest
            .split(' ')
            .nth(16)
            .expect("nice")
            .parse()
            .expect("number");
        out.push((comm.trim().to_owned(), nice));
    }
    out
}

/// Whether this process may raise a thread `steps` nice steps (root, CAP_SYS_NICE
/// or RLIMIT_NICE): asked of a throwaway thread, so the test's own stay put.
fn may_raise(steps: i32) -> bool {
    std::thread::spawn(move || hj212_gateway::priority::shift_current_thread(-steps).is_ok())
        .join()
        .unwrap()
}

const DETECTOR: &str = "hj212-alarms";
// The kernel keeps 15 bytes of a thread's name.
const WRITER: &str = "hj212-store-wri";

#[test]
fn the_writer_runs_above_and_the_detector_below_the_rest_of_the_gateway() {
    // ([alarms] keys, [store] keys, detector steps below, writer steps above when
    // this machine lets a process raise a thread)
    let cases = [
        ("", "", 10, 5),
        ("nice = 0", "writer_boost = 0", 0, 0),
        ("nice = 3", "writer_boost = 2", 3, 2),
    ];
    for (alarms, store, below, above) in cases {
        let setting = format!("{alarms} {store}");
        let raised = if may_raise(above) {
            i64::from(above)
        } else {
            0
        };
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("gateway.toml");
        std::fs::write(
            &cfg,
            format!(
                "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n\
                 [store]\nsync = \"off\"\n{store}\n[alarms]\n{alarms}\n"
            ),
        )
        .unwrap();
        let gw = common::Bin::spawn(&cfg, &dir.path().join("data"));
        let of = |nices: &[(String, i64)], name: &str| {
            nices.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
        };
        // Both threads have their names from the start and set their priority
        // first thing; poll until both did.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (nices, base) = loop {
            let n = thread_nices(gw.child.id());
            let base = of(&n, "hj212-gateway").expect("main thread");
            if of(&n, DETECTOR) == Some((base + below).min(19))
                && of(&n, WRITER) == Some((base - raised).max(-20))
            {
                break (n, base);
            }
            assert!(
                Instant::now() < deadline,
                "{setting:?}: detector not {below} below or writer not {raised} above: {n:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for (name, nice) in &nices {
            if name != DETECTOR && name != WRITER {
                assert_eq!(
                    *nice, base,
                    "{setting:?}: {name} keeps the gateway's priority"
                );
            }
        }
    }
}

#[test]
fn priorities_out_of_range_are_refused_by_key() {
    for (text, key) in [
        ("[alarms]\nnice = 20", "`alarms.nice`"),
        ("[store]\nwriter_boost = 21", "`store.writer_boost`"),
    ] {
        let err = Config::parse(text, Path::new("t")).unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}
