//! HJ 212 pass-through against a test platform: a real TCP server in this file
//! that frames with the gateway's codec and acks like a platform (9014/9013
//! with the frame's QN, built by the protocol layer). Nothing is mocked: the
//! gateway runs in-process (or as the built binary for the SIGKILL test) and
//! devices are TCP clients.

#[allow(dead_code)]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{Bin, mn, qn, upload};
use hj212_gateway::codec::{Hj212Codec, Item};
use hj212_gateway::config::Config;
use hj212_gateway::daemon::{self, Overrides};
use hj212_gateway::protocol::{self, Options, crc, crypt, reply};
use hj212_gateway::store::{Direction, Reader, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;

const PATIENCE: Duration = Duration::from_secs(10);
const KEY_HEX: &str = "30303030303030303030303030303030";
const MN_2025: &str = "010000A8900016F000169DC0";
const MN_2005: &str = "88888880000001";
const MN_MODBUS: &str = "010000A8900016F0MODBUS01";

/// A test upstream platform.
struct Platform {
    addr: SocketAddr,
    /// Every frame received, in arrival order.
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Frames received per connection, in accept order.
    per_conn: Arc<Mutex<Vec<usize>>>,
    /// Frames asking for an ack that are left unanswered (from the first on).
    ignore: Arc<AtomicUsize>,
    /// A QN the platform never acks (a frame it refuses, every time).
    poison: Arc<Mutex<Option<String>>>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// Write halves of the accepted connections, to send requests down.
    outs: Arc<Mutex<Vec<Writer>>>,
}

type Writer = Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>;

impl Platform {
    async fn start(addr: &str, ack_delay: Duration) -> Platform {
        let l = TcpListener::bind(addr).await.expect("platform binds");
        let p = Platform {
            addr: l.local_addr().unwrap(),
            got: Arc::default(),
            per_conn: Arc::default(),
            ignore: Arc::default(),
            poison: Arc::default(),
            tasks: Arc::default(),
            outs: Arc::default(),
        };
        let (got, per_conn, ignore, tasks, outs, poison) = (
            p.got.clone(),
            p.per_conn.clone(),
            p.ignore.clone(),
            p.tasks.clone(),
            p.outs.clone(),
            p.poison.clone(),
        );
        let accept = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let idx = {
                    let mut v = per_conn.lock().unwrap();
                    v.push(0);
                    v.len() - 1
                };
                let (got, per_conn, ignore) = (got.clone(), per_conn.clone(), ignore.clone());
                let poison = poison.clone();
                let (rd, wr) = s.into_split();
                let wr = Arc::new(tokio::sync::Mutex::new(wr));
                outs.lock().unwrap().push(wr.clone());
                let t = tokio::spawn(serve(
                    rd,
                    wr,
                    idx,
                    got,
                    per_conn,
                    (ignore, poison),
                    ack_delay,
                ));
                tasks.lock().unwrap().push(t);
            }
        });
        p.tasks.lock().unwrap().push(accept);
        p
    }

    /// Sends `bytes` on the latest connection (as a platform sends a request).
    async fn send(&self, bytes: &[u8]) {
        let deadline = Instant::now() + PATIENCE;
        let wr = loop {
            if let Some(w) = self.outs.lock().unwrap().last().cloned() {
                break w;
            }
            assert!(Instant::now() < deadline, "the gateway never connected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        wr.lock()
            .await
            .write_all(bytes)
            .await
            .expect("platform writes");
    }

    fn got(&self) -> Vec<Vec<u8>> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let g = self.got();
            if g.len() >= n {
                return g;
            }
            assert!(
                Instant::now() < deadline,
                "platform got {} of {n} frames",
                g.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

async fn serve(
    mut s: tokio::net::tcp::OwnedReadHalf,
    wr: Writer,
    idx: usize,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    per_conn: Arc<Mutex<Vec<usize>>>,
    (ignore, poison): (Arc<AtomicUsize>, Arc<Mutex<Option<String>>>),
    ack_delay: Duration,
) {
    let mut codec = Hj212Codec::default();
    let mut buf = BytesMut::new();
    loop {
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while let Ok(Some(item)) = codec.decode(&mut buf) {
            let Item::Frame { bytes, .. } = item else {
                panic!("the gateway sent junk: {item:?}");
            };
            got.lock().unwrap().push(bytes.to_vec());
            per_conn.lock().unwrap()[idx] += 1;
            let f = protocol::decode(bytes, &Options::new(chrono::Utc::now()), &());
            let Some(ack) = reply::ack(&f) else { continue };
            if f.qn().is_some() && poison.lock().unwrap().as_deref() == f.qn() {
                continue;
            }
            if ignore
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                continue;
            }
            tokio::time::sleep(ack_delay).await;
            if wr.lock().await.write_all(&ack).await.is_err() {
                return;
            }
        }
    }
}

/// A device connection.
struct Device(TcpStream);

impl Device {
    async fn connect(addr: SocketAddr) -> Device {
        Device(TcpStream::connect(addr).await.expect("connect"))
    }
    /// Sends and waits for the gateway's ack (so the frame is committed).
    async fn send_acked(&mut self, frame: &[u8]) {
        self.0.write_all(frame).await.expect("write");
        // Past any request of the gateway's own (a 1012 for an old DataTime).
        loop {
            let mut out = Vec::new();
            let mut b = [0u8; 1];
            while !out.ends_with(b"\r\n") {
                let n = tokio::time::timeout(PATIENCE, self.0.read(&mut b))
                    .await
                    .expect("ack in time")
                    .expect("read");
                assert!(n > 0, "closed before the ack");
                out.push(b[0]);
            }
            if out.windows(8).any(|w| w == b"CN=9014;" || w == b"CN=9013;") {
                return;
            }
        }
    }
    /// Reads one CR LF terminated frame.
    async fn read_frame(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while !out.ends_with(b"\r\n") {
            let n = tokio::time::timeout(PATIENCE, self.0.read(&mut b))
                .await
                .expect("frame in time")
                .expect("read");
            assert!(n > 0, "closed before a frame");
            out.push(b[0]);
        }
        out
    }
    /// Sends a frame that gets no ack, then gives the gateway time to store it.
    async fn send_unacked(&mut self, frame: &[u8]) {
        self.0.write_all(frame).await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A 2017 frame with the given CN and Flag.
fn frame(m: &str, q: &str, cn: &str, flag: u8) -> Vec<u8> {
    reply::envelope(
        format!(
            "QN={q};ST=31;CN={cn};PW=123456;MN={m};Flag={flag};CP=&&DataTime=20240601085800;\
             a21026-Avg=12.5,a21026-Flag=N&&"
        )
        .as_bytes(),
    )
    .to_vec()
}

use common::frame_2005;

/// A 2025 minute upload, CP SM4-encrypted on the wire (key 0x30 x16).
fn frame_2025() -> Vec<u8> {
    let head =
        "QN=20240520210700000;ST=31;CN=2051;PW=123456;MN=010000A8900016F000169DC0;Flag=9;CP=&&";
    let cp =
        "DataTime=20240520210600;a01011-Min=1.35,a01011-Avg=1.35,a01011-Max=1.35,a01011-Flag=N";
    let mut c = cp.as_bytes().to_vec();
    crypt::encrypt_in_place(&[0x30; 16], &mut c);
    let mut out = format!("##{:04}{head}", head.len() + cp.len() + 2).into_bytes();
    out.extend_from_slice(&c);
    let mut plain = head.as_bytes().to_vec();
    plain.extend_from_slice(cp.as_bytes());
    plain.extend_from_slice(b"&&");
    out.extend_from_slice(b"&&");
    out.extend_from_slice(&crc::format_hex4(crc::hj212(&plain)));
    out.extend_from_slice(b"\r\n");
    out
}

/// A 2017 upload whose CRC is CRC-16/MODBUS (rejected under the strict policy).
fn frame_modbus() -> Vec<u8> {
    let seg = format!(
        "QN=20240601085857123;ST=31;CN=2011;PW=123456;MN={MN_MODBUS};Flag=5;\
         CP=&&DataTime=20240601085857;a21026-Rtd=1.5,a21026-Flag=N&&"
    );
    reply::envelope_with_crc(seg.as_bytes(), crc::modbus(seg.as_bytes())).to_vec()
}

fn config(upstreams: &str, rest: &str) -> String {
    format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n[mqtt]\nenabled = false\n\
         {rest}\n{upstreams}\n"
    )
}

fn upstream(name: &str, addr: SocketAddr, extra: &str) -> String {
    format!("[[upstream]]\nname = \"{name}\"\naddr = \"{addr}\"\n{extra}\n")
}

type Gw = common::InProc;

async fn start(text: &str) -> Gw {
    common::start_in_process(text).await
}

use common::records;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_2005_2017_2025_encrypted_and_modbus_frames_byte_exact() {
    let p = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    let devices = format!(
        "[validation]\nunknown_device = \"quarantine\"\n\
         [[device]]\nmn = \"{MN_2025}\"\npw = \"123456\"\nkey = \"{KEY_HEX}\"\n\
         [[device]]\nmn = \"{MN_2005}\"\n[[device]]\nmn = \"{}\"\npw = \"123456\"\n\
         [[device]]\nmn = \"{MN_MODBUS}\"\ncrc = \"modbus\"\n",
        mn(1)
    );
    let gw = start(&config(&upstream("prov", p.addr, ""), &devices)).await;
    let mut d = Device::connect(gw.addr).await;
    // Neither of these leaves: a rejected frame (wrong PW), a quarantined device.
    d.send_unacked(&upload(&mn(1), &qn(1), "999999")).await;
    Device::connect(gw.addr)
        .await
        .send_acked(&upload(&mn(2), &qn(2), "123456"))
        .await;
    let sent = vec![
        upload(&mn(1), &qn(3), "123456"),
        frame_2005(),
        frame_2025(),
        frame_modbus(),
        // Flag=4: no ack asked, delivered once written.
        frame(&mn(1), &qn(4), "2051", 4),
    ];
    d.send_acked(&sent[0]).await;
    for f in &sent[1..4] {
        Device::connect(gw.addr).await.send_acked(f).await;
    }
    d.send_unacked(&sent[4]).await;
    let got = p.wait_for(sent.len()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        p.got(),
        sent,
        "exactly the accepted frames, byte for byte, in order"
    );
    assert_eq!(got, sent);
    // Each stored inbound frame is what went out.
    let recs = records(&gw.db);
    let forwarded: Vec<_> = recs
        .iter()
        .filter(|r| r.direction == Direction::In && r.peer != "prov")
        .filter(|r| r.verdict == Verdict::Accepted && r.mn.as_deref() != Some(mn(2).as_str()))
        .map(|r| r.raw.clone())
        .collect();
    assert_eq!(forwarded, sent);
    // The platform's acks are logged under its name, and never reached a device.
    let acks: Vec<_> = recs.iter().filter(|r| r.peer == "prov").collect();
    assert_eq!(acks.len(), 4, "four frames asked for an ack");
    assert!(
        acks.iter()
            .all(|r| r.direction == Direction::In && r.cn.as_deref() == Some("9014"))
    );
    gw.running.stop().await.expect("stop");
    let c = hj212_gateway::store::Cursors::open(&gw.db).unwrap();
    let last = Reader::open(&gw.db).unwrap().last_seq().unwrap();
    let cur = c.get_cursor("upstream.prov").unwrap().unwrap();
    assert!(
        cur >= last - 4,
        "cursor {cur} near the end {last} after a clean stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_then_up_delivers_everything_once_in_order() {
    let addr = free_addr();
    let gw = start(&config(&upstream("late", addr, ""), "")).await;
    let mut d = Device::connect(gw.addr).await;
    let sent: Vec<_> = (0..20).map(|i| upload(&mn(1), &qn(i), "123456")).collect();
    for f in &sent {
        d.send_acked(f).await; // the gateway acks while its upstream is down
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let p = Platform::start(&addr.to_string(), Duration::ZERO).await;
    p.wait_for(sent.len()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.got(), sent, "once each, in order");
    gw.running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_timeout_resends_then_reconnects() {
    // retries = 2: the ignored first send is resent on the same connection.
    let p = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    p.ignore.store(1, Ordering::SeqCst);
    // retries = 1 and two ignored sends: the forwarder reconnects and sends again.
    let q = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    q.ignore.store(2, Ordering::SeqCst);
    let ups = upstream("p", p.addr, "ack_timeout = \"300ms\"\nretries = 2")
        + &upstream("q", q.addr, "ack_timeout = \"300ms\"\nretries = 1");
    let gw = start(&config(&ups, "")).await;
    let mut d = Device::connect(gw.addr).await;
    let (f1, f2) = (
        upload(&mn(1), &qn(1), "123456"),
        upload(&mn(1), &qn(2), "123456"),
    );
    d.send_acked(&f1).await;
    d.send_acked(&f2).await;
    p.wait_for(3).await;
    q.wait_for(4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.got(), [f1.clone(), f1.clone(), f2.clone()]);
    assert_eq!(*p.per_conn.lock().unwrap(), [3]);
    assert_eq!(q.got(), [f1.clone(), f1.clone(), f1.clone(), f2.clone()]);
    assert_eq!(
        *q.per_conn.lock().unwrap(),
        [2, 2],
        "reconnected after the retries"
    );
    gw.running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_message_mode_opens_a_connection_per_frame() {
    let p = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    let gw = start(&config(
        &upstream("short", p.addr, "mode = \"per-message\""),
        "",
    ))
    .await;
    let mut d = Device::connect(gw.addr).await;
    let sent = vec![
        upload(&mn(1), &qn(1), "123456"),
        frame(&mn(1), &qn(2), "2051", 4), // no ack asked
        upload(&mn(1), &qn(3), "123456"),
    ];
    d.send_acked(&sent[0]).await;
    d.send_unacked(&sent[1]).await;
    d.send_acked(&sent[2]).await;
    p.wait_for(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.got(), sent);
    assert_eq!(*p.per_conn.lock().unwrap(), [1, 1, 1]);
    gw.running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_by_mn_st_cn_and_rejected() {
    let (a, b, c) = (
        Platform::start("127.0.0.1:0", Duration::ZERO).await,
        Platform::start("127.0.0.1:0", Duration::ZERO).await,
        Platform::start("127.0.0.1:0", Duration::ZERO).await,
    );
    let ups = upstream("a", a.addr, &format!("mn = [\"{}\"]", mn(1)))
        + &upstream("b", b.addr, "cn = [\"2011\"]\nst = [\"31\"]")
        + &upstream("c", c.addr, "include_rejected = true\ncn = [\"2011\"]");
    let devices = format!("[[device]]\nmn = \"{}\"\npw = \"123456\"\n", mn(2));
    let gw = start(&config(&ups, &devices)).await;
    let mut d1 = Device::connect(gw.addr).await;
    let mut d2 = Device::connect(gw.addr).await;
    let f1 = upload(&mn(1), &qn(1), "123456");
    let f2 = upload(&mn(2), &qn(2), "123456");
    let f3 = frame(&mn(1), &qn(3), "2051", 5);
    let bad = upload(&mn(2), &qn(4), "999999"); // wrong PW: rejected
    d1.send_acked(&f1).await;
    d2.send_acked(&f2).await;
    d1.send_acked(&f3).await;
    d2.send_unacked(&bad).await;
    a.wait_for(2).await;
    b.wait_for(2).await;
    c.wait_for(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.got(), [f1.clone(), f3.clone()]);
    assert_eq!(b.got(), [f1.clone(), f2.clone()]);
    assert_eq!(c.got(), [f1, f2, bad]);
    gw.running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_now_skips_history_and_oldest_sends_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = Overrides {
        config: None,
        listen: Vec::new(),
        data: Some(dir.path().to_owned()),
    };
    let old = upload(&mn(1), &qn(1), "123456");
    let new = upload(&mn(1), &qn(2), "123456");
    // First run without upstreams: history builds up.
    let cfg = Config::parse(&config("", ""), Path::new("t")).unwrap();
    let gw = daemon::start(cfg, &o).await.unwrap();
    Device::connect(gw.addrs[0]).await.send_acked(&old).await;
    gw.stop().await.unwrap();
    // Second run: two new upstreams.
    let (now, oldest) = (
        Platform::start("127.0.0.1:0", Duration::ZERO).await,
        Platform::start("127.0.0.1:0", Duration::ZERO).await,
    );
    let ups =
        upstream("now", now.addr, "") + &upstream("oldest", oldest.addr, "start = \"oldest\"");
    let cfg = Config::parse(&config(&ups, ""), Path::new("t")).unwrap();
    let gw = daemon::start(cfg, &o).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Device::connect(gw.addrs[0]).await.send_acked(&new).await;
    now.wait_for(1).await;
    oldest.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(now.got(), std::slice::from_ref(&new));
    assert_eq!(oldest.got(), [old, new]);
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sigkilled_mid_backlog_loses_nothing() {
    const N: u32 = 150;
    // A slow platform (10 ms per ack) keeps a backlog in the log.
    let p = Platform::start("127.0.0.1:0", Duration::from_millis(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("gateway.toml");
    std::fs::write(&cfg_path, config(&upstream("prov", p.addr, ""), "")).unwrap();
    let data = dir.path().join("data");
    let sent: Vec<_> = (0..N).map(|i| upload(&mn(1), &qn(i), "123456")).collect();
    let mut gw = Bin::spawn(&cfg_path, &data);
    let mut d = Device::connect(gw.addr).await;
    for f in &sent {
        d.send_acked(f).await;
    }
    p.wait_for(20).await;
    gw.child.kill().expect("SIGKILL");
    gw.child.wait().unwrap();
    let at_kill = p.got().len();
    assert!(
        at_kill < sent.len(),
        "killed mid-backlog ({at_kill} of {N})"
    );
    let _gw = Bin::spawn(&cfg_path, &data);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = p.got();
        // Delivered at least once each; a repeat can only be what was in flight.
        let distinct: std::collections::BTreeSet<_> = got.iter().collect();
        if distinct.len() == sent.len() {
            let mut first_seen = Vec::new();
            for f in &got {
                if !first_seen.contains(&f) {
                    first_seen.push(f);
                }
            }
            assert!(
                first_seen.iter().zip(&sent).all(|(a, b)| *a == b),
                "in order"
            );
            eprintln!(
                "delivered at kill: {at_kill}; after restart: {} frames for {N} ({} repeated)",
                got.len(),
                got.len() - sent.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {N} after restart",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_request_relayed_to_the_device_and_its_replies_back() {
    let p = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    // Only 2011 goes through the pass-through feed, so what the platform gets
    // beyond the first upload is exactly the relayed exchange.
    let gw = start(&config(&upstream("prov", p.addr, "cn = [\"2011\"]"), "")).await;
    let m = mn(1);
    let mut d = Device::connect(gw.addr).await;
    let first = upload(&m, &qn(1), "123456");
    d.send_acked(&first).await; // the session now owns the MN
    p.wait_for(1).await;
    let t = reply::Target {
        dialect: protocol::Dialect::V2017,
        st: "31",
        pw: "123456",
        mn: &m,
    };
    // 1012 set time: 9011 then 9012, matched by QN.
    let set = reply::set_time(t, "20240601090000001", "20240601090000", None);
    p.send(&set).await;
    assert_eq!(
        d.read_frame().await,
        set.to_vec(),
        "written to the device byte-exact"
    );
    let r1 = reply::qn_rtn(t, "20240601090000001", 1);
    let r2 = reply::exe_rtn(t, "20240601090000001", 1);
    d.send_unacked(&r1).await;
    d.send_unacked(&r2).await;
    // 2061 history fetch: the uploads between 9011 and 9012 carry new QNs.
    let hist = reply::history(
        t,
        "20240601090100002",
        2061,
        "20240601000000",
        "20240601010000",
    );
    p.send(&hist).await;
    assert_eq!(d.read_frame().await, hist.to_vec());
    let h1 = reply::qn_rtn(t, "20240601090100002", 1);
    let data1 = frame(&m, &qn(50), "2061", 4);
    let data2 = frame(&m, &qn(51), "2061", 4);
    let h2 = reply::exe_rtn(t, "20240601090100002", 1);
    for f in [&h1[..], &data1, &data2, &h2[..]] {
        d.send_unacked(f).await;
    }
    // After the 9012, an upload with a new QN is not part of the exchange.
    d.send_unacked(&frame(&m, &qn(52), "2061", 4)).await;
    p.wait_for(7).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let want = vec![
        first,
        r1.to_vec(),
        r2.to_vec(),
        h1.to_vec(),
        data1,
        data2,
        h2.to_vec(),
    ];
    assert_eq!(p.got(), want);
    // Everything relayed is logged with the upstream's name as the peer.
    let recs = records(&gw.db);
    let logged = |raw: &[u8], dir: Direction| {
        recs.iter()
            .any(|r| r.raw == raw && r.peer == "prov" && r.direction == dir)
    };
    assert!(logged(&set, Direction::In) && logged(&set, Direction::Out));
    assert!(logged(&hist, Direction::Out));
    for f in &want[1..] {
        assert!(logged(f, Direction::Out), "relayed reply logged");
    }
    gw.running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_request_for_an_offline_device_is_answered_qnrtn_2() {
    let p = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    let devices = format!("[[device]]\nmn = \"{MN_2005}\"\ndialect = \"2005\"\n");
    let gw = start(&config(&upstream("prov", p.addr, ""), &devices)).await;
    // 3011 calibration for a registered 2005 device that is not connected;
    // the platform writes 2017, the answer is in the registry's dialect.
    let t = reply::Target {
        dialect: protocol::Dialect::V2005,
        st: "32",
        pw: "123456",
        mn: MN_2005,
    };
    let req = reply::request(
        reply::Target {
            dialect: protocol::Dialect::V2017,
            ..t
        },
        "20240601090000003",
        3011,
        "PolId=B02",
    );
    p.send(&req).await;
    // And a 2017 device nobody registered: answered in the request's dialect.
    let t17 = reply::Target {
        dialect: protocol::Dialect::V2017,
        st: "31",
        pw: "123456",
        mn: &mn(9),
    };
    let req17 = reply::request(t17, "20240601090000004", 1012, "SystemTime=20240601090000");
    p.send(&req17).await;
    p.wait_for(2).await;
    // An unregistered 2005 device that was here and left: its last frame's dialect.
    let m05 = "88888880000002";
    let f05 = reply::envelope(
        format!(
            "QN=20240601085857001;ST=32;CN=2011;PW=123456;MN={m05};Flag=1;\
             CP=&&DataTime=20240601085857;B02-Rtd=36.50,B02-Flag=N&&"
        )
        .as_bytes(),
    );
    let mut d = Device::connect(gw.addr).await;
    d.send_acked(&f05).await;
    drop(d);
    p.wait_for(3).await; // its upload was forwarded; the session is gone by now
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t05 = reply::Target {
        dialect: protocol::Dialect::V2005,
        st: "32",
        pw: "123456",
        mn: m05,
    };
    let req05 = reply::request(
        reply::Target {
            dialect: protocol::Dialect::V2017,
            ..t05
        },
        "20240601090000005",
        1012,
        "SystemTime=20240601090000",
    );
    p.send(&req05).await;
    let got = p.wait_for(4).await;
    assert_eq!(
        got,
        [
            reply::qn_rtn(t, "20240601090000003", 2).to_vec(),
            reply::qn_rtn(t17, "20240601090000004", 2).to_vec(),
            f05.to_vec(),
            reply::qn_rtn(t05, "20240601090000005", 2).to_vec(),
        ]
    );
    assert!(String::from_utf8_lossy(&got[0]).contains("CP=&&QN=20240601090000003;QnRtn=2&&"));
    // Each refusal is in the exchange table under the platform's name and QN.
    // (Committed by the writer right after the refusal, without anyone waiting.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let x = loop {
        let x = hj212_gateway::store::list_exchanges(&gw.db, &Default::default()).unwrap();
        if x.len() >= 3 || Instant::now() > deadline {
            break x;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rows: Vec<_> = x
        .iter()
        .map(|r| {
            let e = &r.exchange;
            (
                e.origin.as_str(),
                e.qn.as_deref().unwrap_or(""),
                e.cn,
                e.outcome,
                e.attempts,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("prov", "20240601090000003", 3011, "offline", 0),
            ("prov", "20240601090000004", 1012, "offline", 0),
            ("prov", "20240601090000005", 1012, "offline", 0),
        ]
    );
    gw.running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_frames_do_not_wait_for_an_ack() {
    // A platform that never acks: a rejected frame must not hold the feed.
    let p = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    p.ignore.store(usize::MAX, Ordering::SeqCst);
    let ups = upstream("p", p.addr, "include_rejected = true\nack_timeout = \"5s\"");
    let devices = format!("[[device]]\nmn = \"{}\"\npw = \"123456\"\n", mn(1));
    let gw = start(&config(&ups, &devices)).await;
    let mut d = Device::connect(gw.addr).await;
    let bad = upload(&mn(1), &qn(1), "999999"); // Flag=5, wrong PW
    let next = frame(&mn(1), &qn(2), "2051", 4);
    let t0 = Instant::now();
    d.send_unacked(&bad).await;
    d.send_unacked(&next).await;
    assert_eq!(p.wait_for(2).await, [bad, next]);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    gw.running.stop().await.expect("stop");
}

/// A platform flooding requests for MNs that have no session (here 2,000
/// invented ones) costs the forwarder one logged record and one exchange row
/// each, no fsync wait: the real frames behind them are still forwarded, every
/// request is recorded as refused, and only `refusals_per_minute` of them get
/// an answer (and an answer record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_flood_for_unknown_mns_is_refused_cheaply_and_forwarding_goes_on() {
    const JUNK: u32 = 2000;
    const UPLOADS: u32 = 20;
    const BUDGET: u32 = 10;
    let started = Instant::now();
    let p = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    let gw = start(&config(
        &upstream(
            "flood",
            p.addr,
            &format!("refusals_per_minute = {BUDGET}\ncn = [\"2011\"]"),
        ),
        "",
    ))
    .await;
    let m = mn(1);
    let mut d = Device::connect(gw.addr).await;
    d.send_acked(&upload(&m, &qn(0), "123456")).await;
    p.wait_for(1).await;
    let mut junk = Vec::new();
    for i in 0..JUNK {
        let t = reply::Target {
            dialect: protocol::Dialect::V2017,
            st: "91",
            pw: "123456",
            mn: &mn(500_000 + i),
        };
        junk.extend_from_slice(&reply::get_time(t, &qn(i), None));
    }
    p.send(&junk).await;
    for i in 1..=UPLOADS {
        d.send_acked(&upload(&m, &qn(i), "123456")).await;
    }
    let is_upload = |f: &Vec<u8>| String::from_utf8_lossy(f).contains("CN=2011;");
    let deadline = Instant::now() + PATIENCE * 3;
    while p.got().iter().filter(|f| is_upload(f)).count() < UPLOADS as usize + 1 {
        assert!(
            Instant::now() < deadline,
            "forwarding stalled behind the flood"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every request has its exchange row (committed without anyone waiting).
    let deadline = Instant::now() + PATIENCE * 3;
    let rows = loop {
        let x = hj212_gateway::store::list_exchanges(&gw.db, &Default::default()).unwrap();
        let rows: Vec<_> = x
            .into_iter()
            .map(|r| r.exchange)
            .filter(|e| e.origin == "flood")
            .collect();
        if rows.len() >= JUNK as usize {
            break rows;
        }
        assert!(Instant::now() < deadline, "{} of {JUNK} rows", rows.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rows.len(), JUNK as usize);
    assert!(rows.iter().all(|e| e.outcome == "offline" && e.cn == 1011));
    let unanswered = rows
        .iter()
        .filter(|e| e.detail.contains("not answered"))
        .count();
    let answers = p
        .got()
        .iter()
        .filter(|f| String::from_utf8_lossy(f).contains("QnRtn=2"))
        .count();
    assert_eq!(answers + unanswered, JUNK as usize);
    // The bucket starts full and refills at BUDGET a minute.
    let refill = (started.elapsed().as_secs_f64() * f64::from(BUDGET) / 60.0).ceil() as usize;
    assert!(
        (BUDGET as usize..=BUDGET as usize + refill).contains(&answers),
        "{answers} answers, budget {BUDGET} + {refill}"
    );
    let m_flood = gw.running.shared.metrics.upstream("flood");
    assert_eq!(m_flood.refused_offline.get(), answers as u64);
    assert_eq!(m_flood.refused_rate_limited.get(), unanswered as u64);
    // One record per request; answer records only for the answers sent.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let recs = records(&gw.db);
        // The platform's 9014s for the forwarded uploads are logged too.
        let n = |dir: Direction| {
            recs.iter()
                .filter(|r| r.peer == "flood" && r.direction == dir)
                .filter(|r| r.cn.as_deref() != Some("9014"))
                .count()
        };
        if n(Direction::In) == JUNK as usize && n(Direction::Out) == answers {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} in, {} out",
            n(Direction::In),
            n(Direction::Out)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The device's dialect was looked up by key; invented MNs left no rows.
    let conn = rusqlite::Connection::open(&gw.db).unwrap();
    let known: Vec<String> = conn
        .prepare("SELECT mn FROM device_dialects")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(known, std::slice::from_ref(&m));
    let plan: String = conn
        .query_row(
            "EXPLAIN QUERY PLAN SELECT dialect FROM device_dialects WHERE mn = ?1",
            [&m],
            |r| r.get(3),
        )
        .unwrap();
    assert!(plan.contains("USING PRIMARY KEY (mn=?)"), "{plan}");
    gw.running.stop().await.expect("stop");
}

/// A frame the platform never acks is set aside once the platform acks the next
/// one, and forwarding goes on; a re-drive sends it again; a platform that acks
/// nothing sets nothing aside (an outage is not a poison frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_the_platform_never_acks_is_set_aside_and_forwarding_goes_on() {
    use hj212_gateway::store::{DeadLetterFilter, list_dead_letters, mark_redrive};
    let p = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    *p.poison.lock().unwrap() = Some(qn(2));
    let ups = upstream(
        "p",
        p.addr,
        "ack_timeout = \"100ms\"\nretries = 0\ndead_letter_after = 2",
    );
    let gw = start(&config(&ups, "")).await;
    let mut d = Device::connect(gw.addr).await;
    let f: Vec<Vec<u8>> = (1..=4).map(|i| upload(&mn(1), &qn(i), "123456")).collect();
    for x in &f {
        d.send_acked(x).await;
    }
    let deadline = Instant::now() + PATIENCE;
    while !p.got().contains(&f[3]) {
        assert!(
            Instant::now() < deadline,
            "forwarding stopped at the poison frame: {} frames",
            p.got().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = p.got();
    assert_eq!(got[0], f[0]);
    assert_eq!(
        got.iter().filter(|g| **g == f[1]).count(),
        2,
        "two rounds of one send"
    );
    let e = list_dead_letters(&gw.db, &DeadLetterFilter::default()).expect("dead letters");
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        (e[0].consumer.as_str(), e[0].reason.as_str()),
        ("upstream.p", "no_ack")
    );
    let poisoned = records(&gw.db)
        .into_iter()
        .find(|r| r.raw == f[1])
        .expect("stored")
        .seq;
    assert_eq!(e[0].seq, poisoned);

    // The platform takes it now: a re-drive sends it and resolves the entry.
    *p.poison.lock().unwrap() = None;
    assert_eq!(
        mark_redrive(&gw.db, Some("upstream.p"), &[]).expect("mark"),
        1
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let e = list_dead_letters(&gw.db, &DeadLetterFilter::default()).expect("dead letters");
        if e[0].state == "resolved" {
            break;
        }
        assert!(Instant::now() < deadline, "re-drive not resolved: {e:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(p.got().iter().filter(|g| **g == f[1]).count(), 3);
    gw.running.stop().await.expect("stop");

    // A platform that acks nothing: rounds go by, nothing is set aside.
    let q = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    q.ignore.store(usize::MAX, Ordering::SeqCst);
    let ups = upstream(
        "q",
        q.addr,
        "ack_timeout = \"100ms\"\nretries = 0\ndead_letter_after = 1",
    );
    let gw = start(&config(&ups, "")).await;
    let mut d = Device::connect(gw.addr).await;
    for x in &f[..2] {
        d.send_acked(x).await;
    }
    // The first frame's round, then the second frame tried as a probe, then the first again.
    let deadline = Instant::now() + PATIENCE;
    while q.got().len() < 4 {
        assert!(Instant::now() < deadline, "platform got {}", q.got().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(q.got().contains(&f[1]), "the next frame was tried");
    let e = list_dead_letters(&gw.db, &DeadLetterFilter::default()).expect("dead letters");
    assert!(e.is_empty(), "an outage sets nothing aside: {e:?}");
    gw.running.stop().await.expect("stop");
}

/// The frame after a stuck one may be stored only once the forwarder is already
/// retrying the stuck one (its read of the log ended there): it is still tried in
/// the stuck frame's place, and the stuck frame set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_stored_while_the_stuck_one_is_retried_is_tried_in_its_place() {
    use hj212_gateway::store::{DeadLetterFilter, list_dead_letters};
    let p = Platform::start("127.0.0.1:0", Duration::ZERO).await;
    *p.poison.lock().unwrap() = Some(qn(1));
    let ups = upstream(
        "p",
        p.addr,
        "ack_timeout = \"100ms\"\nretries = 0\ndead_letter_after = 2",
    );
    let gw = start(&config(&ups, "")).await;
    let mut d = Device::connect(gw.addr).await;
    let (stuck, next) = (
        upload(&mn(1), &qn(1), "123456"),
        upload(&mn(1), &qn(2), "123456"),
    );
    d.send_acked(&stuck).await;
    // The forwarder has read the log and sent the stuck frame: the next one is
    // not in what it read.
    p.wait_for(1).await;
    d.send_acked(&next).await;
    let deadline = Instant::now() + PATIENCE;
    while !p.got().contains(&next) {
        assert!(
            Instant::now() < deadline,
            "the next frame was never tried: {} sends of the stuck one",
            p.got().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + PATIENCE;
    let e = loop {
        let e = list_dead_letters(&gw.db, &DeadLetterFilter::default()).expect("dead letters");
        if !e.is_empty() || Instant::now() >= deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stuck_seq = records(&gw.db)
        .into_iter()
        .find(|r| r.raw == stuck)
        .expect("stored")
        .seq;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].seq, e[0].reason.as_str()), (stuck_seq, "no_ack"));
    gw.running.stop().await.expect("stop");
}
