//! The PROXY protocol over real sockets, the gateway in-process with a real
//! SQLite file: headers (v1, v2, LOCAL) sent in the same write as HJ 212 frames,
//! the claimed address as the logged peer, refusals (no header, bad header,
//! late header, untrusted source) that store nothing, and the per-IP cap
//! counted on real client addresses.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{expected_ack, mn, qn, upload};
use hj212_gateway::config::Config;
use hj212_gateway::daemon::{self, Overrides, Running};
use hj212_gateway::store::{Direction, Kind, Reader, RecordFilter, StoredRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const PATIENCE: Duration = Duration::from_secs(10);

struct Gateway {
    running: Running,
    addr: SocketAddr,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    async fn start(server: &str) -> Gateway {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{server}\n[store]\nsync = \"off\"\n[mqtt]\nenabled = false\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
        );
        let cfg = Config::parse(&text, Path::new("test")).expect("config");
        let dir = tempfile::tempdir().expect("tempdir");
        let db = cfg.store_path(dir.path());
        let o = Overrides {
            config: None,
            listen: Vec::new(),
            data: Some(dir.path().to_owned()),
        };
        let running = daemon::start(cfg, &o).await.expect("gateway starts");
        let addr = running.addrs[0];
        Gateway {
            running,
            addr,
            db,
            _dir: dir,
        }
    }

    /// A connection from `from` (a 127.0.0.x address), bound before connecting.
    async fn connect_from(&self, from: &str) -> TcpStream {
        let s = TcpSocket::new_v4().expect("socket");
        s.bind(format!("{from}:0").parse().unwrap()).expect("bind");
        let s = s.connect(self.addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s
    }

    async fn stop(self) -> Vec<StoredRecord> {
        tokio::time::timeout(PATIENCE * 3, self.running.stop())
            .await
            .expect("stop in time")
            .expect("clean stop");
        Reader::open(&self.db)
            .expect("reader")
            .records(RecordFilter::default())
            .expect("records")
            .collect::<Result<_, _>>()
            .expect("read records")
    }
}

/// Reads CRLF-terminated replies until `n` have arrived.
async fn replies(s: &mut TcpStream, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut cur = Vec::new();
    let mut b = [0u8; 512];
    while got.len() < n {
        let k = tokio::time::timeout(PATIENCE, s.read(&mut b))
            .await
            .expect("replies in time")
            .expect("read");
        assert!(k > 0, "closed after {} of {n} replies", got.len());
        for &x in &b[..k] {
            cur.push(x);
            if cur.ends_with(b"\r\n") {
                got.push(std::mem::take(&mut cur));
            }
        }
    }
    got
}

/// The gateway closes the connection without replying anything.
async fn refused(s: &mut TcpStream) {
    let mut b = [0u8; 64];
    match tokio::time::timeout(PATIENCE, s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("expected a close, got {:?}", &b[..n]),
        Err(_) => panic!("connection still open"),
    }
}

fn v2(cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
    let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v.push(0x20 | cmd);
    v.push(fam);
    v.extend_from_slice(&(block.len() as u16).to_be_bytes());
    v.extend_from_slice(block);
    v
}

fn v2_tcp4(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut block = src.to_vec();
    block.extend_from_slice(&[127, 0, 0, 1]);
    block.extend_from_slice(&port.to_be_bytes());
    block.extend_from_slice(&9212u16.to_be_bytes());
    // A unique-id TLV, as `send-proxy-v2` with `proxy-v2-options unique-id` sends.
    block.extend_from_slice(&[0x05, 0x00, 0x04]);
    block.extend_from_slice(b"abcd");
    v2(1, 0x11, &block)
}

fn v1(src: &str) -> Vec<u8> {
    let (ip, port) = src.rsplit_once(':').unwrap();
    format!("PROXY TCP4 {ip} 127.0.0.1 {port} 9212\r\n").into_bytes()
}

fn inbound_by_peer<'a>(recs: &'a [StoredRecord], peer: &str) -> Vec<&'a StoredRecord> {
    recs.iter()
        .filter(|r| r.direction == Direction::In && r.peer == peer)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_frames_in_one_write_are_acked_and_logged_with_the_claimed_peer() {
    let gw = Gateway::start("proxy_protocol = \"any\"\nproxy_trusted = [\"127.0.0.1/32\"]").await;

    // v1 header and two frames in one write.
    let (f1, f2) = (
        upload(&mn(1), &qn(1), "123456"),
        upload(&mn(1), &qn(2), "123456"),
    );
    let mut s = gw.connect_from("127.0.0.1").await;
    let mut w = v1("198.51.100.7:40001");
    w.extend_from_slice(&f1);
    w.extend_from_slice(&f2);
    s.write_all(&w).await.unwrap();
    assert_eq!(
        replies(&mut s, 2).await,
        [expected_ack(&f1), expected_ack(&f2)]
    );

    // v2 (with a TLV) and two frames in one write.
    let (f3, f4) = (
        upload(&mn(2), &qn(1), "123456"),
        upload(&mn(2), &qn(2), "123456"),
    );
    let mut t = gw.connect_from("127.0.0.1").await;
    let mut w = v2_tcp4([203, 0, 113, 9], 50000);
    w.extend_from_slice(&f3);
    w.extend_from_slice(&f4);
    t.write_all(&w).await.unwrap();
    assert_eq!(
        replies(&mut t, 2).await,
        [expected_ack(&f3), expected_ack(&f4)]
    );

    // v2 TCP6.
    let f5 = upload(&mn(3), &qn(1), "123456");
    let mut block = "2001:db8::5"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets()
        .to_vec();
    block.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    block.extend_from_slice(&[0x9c, 0x41, 0x23, 0xfc]);
    let mut u = gw.connect_from("127.0.0.1").await;
    let mut w = v2(1, 0x21, &block);
    w.extend_from_slice(&f5);
    u.write_all(&w).await.unwrap();
    assert_eq!(replies(&mut u, 1).await, [expected_ack(&f5)]);

    // LOCAL (the balancer's own health check): the socket peer stays.
    let f6 = upload(&mn(4), &qn(1), "123456");
    let mut l = gw.connect_from("127.0.0.1").await;
    let local_peer = l.local_addr().unwrap().to_string();
    let mut w = v2(0, 0x00, &[]);
    w.extend_from_slice(&f6);
    l.write_all(&w).await.unwrap();
    assert_eq!(replies(&mut l, 1).await, [expected_ack(&f6)]);

    // The header split over two writes (slower than one segment) still works.
    let f7 = upload(&mn(5), &qn(1), "123456");
    let mut p = gw.connect_from("127.0.0.1").await;
    let h = v1("192.0.2.1:1");
    p.write_all(&h[..9]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut w = h[9..].to_vec();
    w.extend_from_slice(&f7);
    p.write_all(&w).await.unwrap();
    assert_eq!(replies(&mut p, 1).await, [expected_ack(&f7)]);

    drop((s, t, u, l, p));
    let recs = gw.stop().await;
    let raws = |peer: &str| -> Vec<Vec<u8>> {
        inbound_by_peer(&recs, peer)
            .iter()
            .map(|r| r.raw.to_vec())
            .collect()
    };
    assert_eq!(
        raws("198.51.100.7:40001"),
        [f1, f2],
        "v1 claimed peer, frames byte-exact"
    );
    assert_eq!(raws("203.0.113.9:50000"), [f3, f4], "v2 claimed peer");
    assert_eq!(raws("[2001:db8::5]:40001"), [f5], "v2 TCP6 claimed peer");
    assert_eq!(raws(&local_peer), [f6], "LOCAL keeps the socket peer");
    assert_eq!(raws("192.0.2.1:1"), [f7]);
    // The acks are logged under the same peer; no header byte became a record.
    let acks = recs
        .iter()
        .filter(|r| r.direction == Direction::Out && r.peer == "198.51.100.7:40001")
        .count();
    assert_eq!(acks, 2);
    assert!(
        recs.iter().all(|r| r.kind != Kind::Junk),
        "headers are not junk"
    );
    assert_eq!(recs.len(), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bad_late_or_untrusted_headers_are_refused_and_store_nothing() {
    let gw = Gateway::start(
        "proxy_protocol = \"v2\"\nproxy_trusted = [\"127.0.0.1\"]\nproxy_header_timeout = \"300ms\"",
    )
    .await;
    let f = upload(&mn(10), &qn(1), "123456");

    // A device talking HJ 212 straight to the port (the balancer bypassed).
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(&f).await.unwrap();
    refused(&mut s).await;

    // A v1 header where only v2 is configured.
    let mut s = gw.connect_from("127.0.0.1").await;
    let mut w = v1("198.51.100.7:40001");
    w.extend_from_slice(&f);
    s.write_all(&w).await.unwrap();
    refused(&mut s).await;

    // A malformed v2 header (address block shorter than its family needs).
    let mut s = gw.connect_from("127.0.0.1").await;
    let mut w = v2(1, 0x11, &[198, 51, 100, 7]);
    w.extend_from_slice(&f);
    s.write_all(&w).await.unwrap();
    refused(&mut s).await;

    // Half a header, then silence: closed after proxy_header_timeout.
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(&v2_tcp4([198, 51, 100, 7], 1)[..14])
        .await
        .unwrap();
    let t = std::time::Instant::now();
    refused(&mut s).await;
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );

    // A valid header from a source that is not trusted: refused before reading.
    let mut s = gw.connect_from("127.0.0.2").await;
    let mut w = v2_tcp4([198, 51, 100, 7], 1);
    w.extend_from_slice(&f);
    s.write_all(&w).await.unwrap();
    refused(&mut s).await;

    // The trusted path still works after all that.
    let mut s = gw.connect_from("127.0.0.1").await;
    let mut w = v2_tcp4([198, 51, 100, 8], 2);
    w.extend_from_slice(&f);
    s.write_all(&w).await.unwrap();
    assert_eq!(replies(&mut s, 1).await, [expected_ack(&f)]);
    drop(s);

    let recs = gw.stop().await;
    assert_eq!(recs.len(), 2, "only the trusted frame and its ack");
    assert!(recs.iter().all(|r| r.peer == "198.51.100.8:2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_cap_counts_the_real_client_addresses() {
    // Every connection comes from the balancer (127.0.0.1); the cap of 2 must
    // apply to the addresses behind it.
    let gw = Gateway::start(
        "max_per_ip = 2\nproxy_protocol = \"v1\"\nproxy_trusted = [\"127.0.0.0/8\"]",
    )
    .await;
    let mut open = Vec::new();
    for i in 0..2u32 {
        let f = upload(&mn(20 + i), &qn(1), "123456");
        let mut s = gw.connect_from("127.0.0.1").await;
        let mut w = v1(&format!("198.51.100.1:{}", 1000 + i));
        w.extend_from_slice(&f);
        s.write_all(&w).await.unwrap();
        assert_eq!(replies(&mut s, 1).await, [expected_ack(&f)]);
        open.push(s);
    }
    // A third session for 198.51.100.1 is over its cap.
    let f = upload(&mn(22), &qn(1), "123456");
    let mut s = gw.connect_from("127.0.0.1").await;
    let mut w = v1("198.51.100.1:1002");
    w.extend_from_slice(&f);
    s.write_all(&w).await.unwrap();
    refused(&mut s).await;
    // Other clients behind the same balancer are not: 4 sessions now share 127.0.0.1.
    for i in 0..2u32 {
        let f = upload(&mn(30 + i), &qn(1), "123456");
        let mut s = gw.connect_from("127.0.0.1").await;
        let mut w = v1(&format!("198.51.100.2:{}", 2000 + i));
        w.extend_from_slice(&f);
        s.write_all(&w).await.unwrap();
        assert_eq!(replies(&mut s, 1).await, [expected_ack(&f)]);
        open.push(s);
    }
    // Closing one of 198.51.100.1's sessions frees its slot.
    drop(open.remove(0));
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let f = upload(&mn(23), &qn(1), "123456");
        let mut s = gw.connect_from("127.0.0.1").await;
        let mut w = v1("198.51.100.1:1003");
        w.extend_from_slice(&f);
        s.write_all(&w).await.unwrap();
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => {
                assert_eq!(&b[..n], expected_ack(&f).as_slice());
                break;
            }
            _ => assert!(std::time::Instant::now() < deadline, "slot never freed"),
        }
    }
    drop(open);
    let recs = gw.stop().await;
    assert_eq!(inbound_by_peer(&recs, "198.51.100.1:1002").len(), 0);
    assert_eq!(inbound_by_peer(&recs, "198.51.100.2:2001").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_proxy_protocol_off_a_header_is_just_junk() {
    // Off by default: a PROXY line is device input like any other, stored as junk.
    let gw = Gateway::start("").await;
    let f = upload(&mn(40), &qn(1), "123456");
    let mut s = gw.connect_from("127.0.0.1").await;
    let peer = s.local_addr().unwrap().to_string();
    let h = v1("198.51.100.7:40001");
    let mut w = h.clone();
    w.extend_from_slice(&f);
    s.write_all(&w).await.unwrap();
    assert_eq!(replies(&mut s, 1).await, [expected_ack(&f)]);
    drop(s);
    let recs = gw.stop().await;
    let inbound = inbound_by_peer(&recs, &peer);
    assert_eq!(inbound.len(), 2);
    assert_eq!((inbound[0].kind, inbound[0].raw.to_vec()), (Kind::Junk, h));
    assert_eq!(inbound[1].raw.to_vec(), f);
}
