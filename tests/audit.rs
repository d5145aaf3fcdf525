//! Audit and operator tools (`verify`, `export` filters, `replay`, `tail`, `stats`)
//! against logs written by a real gateway over real sockets.

#[allow(dead_code)] // shared with other test binaries
mod common;

use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hj212_gateway::cmd::capture;
use hj212_gateway::cmd::replay::{self, Pacing, ReplayArgs, Split};
use hj212_gateway::config::Config;
use hj212_gateway::daemon::{self, Overrides, Running};
use hj212_gateway::protocol::reply;
use hj212_gateway::store::{self, Direction, Reader, StoredRecord};

const BIN: &str = env!("CARGO_BIN_EXE_hj212-gateway");
const MN_A: &str = "010000A8900016F000000001";
const MN_B: &str = "010000A8900016F000000002";

/// A 2017 frame; `ack` sets Flag=5 (ack requested) else Flag=4.
fn frame(mn: &str, qn: &str, cn: &str, dt: &str, values: &str, ack: bool) -> Vec<u8> {
    let flag = if ack { 5 } else { 4 };
    let seg = format!(
        "QN={qn};ST=31;CN={cn};PW=123456;MN={mn};Flag={flag};CP=&&DataTime={dt};{values}&&"
    );
    reply::envelope(seg.as_bytes()).to_vec()
}

/// The same frame with its CRC changed (a CRC failure).
fn bad_crc(f: &[u8]) -> Vec<u8> {
    let mut f = f.to_vec();
    let i = f.len() - 6;
    f[i] = if f[i] == b'0' { b'1' } else { b'0' };
    f
}

struct Gw {
    rt: tokio::runtime::Runtime,
    running: Option<Running>,
    addr: SocketAddr,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gw {
    fn start() -> Gw {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let text = "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n[downlink]\ntime_sync_skew = false\nbackfill = false\n";
        let cfg = Config::parse(text, Path::new("test")).unwrap();
        let db = cfg.store_path(dir.path());
        let o = Overrides {
            data: Some(dir.path().to_owned()),
            ..Overrides::default()
        };
        let running = rt.block_on(daemon::start(cfg, &o)).expect("gateway starts");
        Gw {
            addr: running.addrs[0],
            running: Some(running),
            rt,
            db,
            _dir: dir,
        }
    }

    /// Sends `frames` on one connection; waits for an ack after each Flag=5 frame that
    /// is valid, then closes and waits until the log holds `expect_records`.
    fn send(&self, frames: &[Vec<u8>], expect_records: u64) {
        let mut s = std::net::TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for f in frames {
            s.write_all(f).unwrap();
            let d = common::decode(f);
            if reply::ack(&d).is_some() && !d.has_error() {
                let want = common::expected_ack(f);
                let mut got = vec![0; want.len()];
                s.read_exact(&mut got).unwrap();
                assert_eq!(got, want);
            }
        }
        drop(s);
        self.wait_records(expect_records);
    }

    fn wait_records(&self, n: u64) {
        let t = Instant::now();
        while Reader::open(&self.db)
            .and_then(|r| r.last_seq())
            .unwrap_or(0)
            < n
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "records not stored in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) -> (tempfile::TempDir, PathBuf) {
        let r = self.running.take().unwrap();
        self.rt.block_on(r.stop()).unwrap();
        (self._dir, self.db)
    }
}

use common::records;

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A known log: MN_A sends 3 CN 2011 (one a retransmission) and 1 CN 2051; MN_B sends
/// 1 CN 2011 and one frame with a bad CRC; then a junk item.
fn known_log() -> (tempfile::TempDir, PathBuf, Vec<Vec<u8>>) {
    let gw = Gw::start();
    let v = "a21026-Rtd=12.50,a21026-Flag=N;a21002-Rtd=+3.1,a21002-Flag=D";
    let a1 = frame(MN_A, "20240601085800001", "2011", "20240601085800", v, true);
    let a2 = frame(MN_A, "20240601085900001", "2011", "20240601085900", v, true);
    let a3 = frame(
        MN_A,
        "20240601090000001",
        "2051",
        "20240601085000",
        "a21026-Avg=7.0,a21026-Flag=N",
        false,
    );
    let b1 = frame(
        MN_B,
        "20240601085800002",
        "2011",
        "20240601085800",
        "a21026-Rtd=1",
        true,
    );
    let b2 = bad_crc(&frame(
        MN_B,
        "20240601085900002",
        "2011",
        "20240601085900",
        "a21026-Rtd=2",
        true,
    ));
    // Records: a1+ack, a2+ack, a2 again+ack (duplicate), a3, b1+ack, b2 (rejected), junk.
    gw.send(&[a1.clone(), a2.clone(), a2.clone(), a3.clone()], 7);
    gw.send(&[b1.clone(), b2.clone(), b"garbage\r\n".to_vec()], 11);
    let (dir, db) = gw.stop();
    (dir, db, vec![a1, a2, a3, b1, b2])
}

fn copy_db(db: &Path, name: &str) -> PathBuf {
    let p = db.with_file_name(name);
    std::fs::copy(db, &p).unwrap();
    p
}

fn attacker(p: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(p).unwrap();
    c.execute_batch(
        "DROP TRIGGER records_append_only_update; DROP TRIGGER records_append_only_delete;",
    )
    .unwrap();
    c
}

#[test]
fn verify_detects_a_changed_byte_a_deleted_and_a_reordered_record() {
    let (_dir, db, _) = known_log();
    let (code, out, _) = run(&["verify", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("11 records checked, chain intact"), "{out}");
    assert!(out.contains("6 inbound frames re-checked"), "{out}");

    let changed = copy_db(&db, "changed.sqlite");
    attacker(&changed)
        .execute_batch("UPDATE records SET raw = CAST(replace(CAST(raw AS TEXT), '12.50', '12.51') AS BLOB) WHERE seq = 1")
        .unwrap();
    let (code, out, _) = run(&["verify", "--db", changed.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("chain broken at seq 1: hash mismatch"),
        "{out}"
    );
    // The altered frame no longer matches its CRC either.
    assert!(
        out.contains("first at seq 1: stored verdict accepted but its CRC does not hold"),
        "{out}"
    );

    let deleted = copy_db(&db, "deleted.sqlite");
    attacker(&deleted)
        .execute_batch("DELETE FROM records WHERE seq = 4")
        .unwrap();
    let (code, out, _) = run(&["verify", "--db", deleted.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("3 records checked; chain broken at seq 4: record missing"),
        "{out}"
    );

    let reordered = copy_db(&db, "reordered.sqlite");
    attacker(&reordered)
        .execute_batch(
            "UPDATE records SET seq = -1 WHERE seq = 5; UPDATE records SET seq = 5 WHERE seq = 6; \
             UPDATE records SET seq = 6 WHERE seq = -1;",
        )
        .unwrap();
    let (code, out, _) = run(&["verify", "--db", reordered.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("chain broken at seq 5: records reordered"),
        "{out}"
    );

    let (code, _, err) = run(&["verify", "--db", "/nonexistent/x.sqlite"]);
    assert_eq!(code, 2);
    assert!(err.contains("no frame log there"), "{err}");
}

#[test]
fn verify_flags_verdicts_that_contradict_the_crc() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("f.sqlite");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let good = frame(
        MN_A,
        "20240601085800001",
        "2011",
        "20240601085800",
        "a21026-Rtd=1",
        false,
    );
    let bad = bad_crc(&good);
    rt.block_on(async {
        let (h, w) = store::Store::open(store::StoreConfig {
            sync: store::SyncMode::Off,
            ..store::StoreConfig::new(&db)
        })
        .unwrap();
        let rec = |raw: &[u8], verdict, findings: &str| store::NewRecord {
            received_at_ms: 1_717_203_480_000,
            peer: "127.0.0.1:1".into(),
            session: 1,
            direction: Direction::In,
            kind: store::Kind::Frame,
            raw: bytes::Bytes::copy_from_slice(raw),
            dialect: Some("2017".into()),
            st: Some("31".into()),
            cn: Some("2011".into()),
            mn: Some(MN_A.into()),
            qn: None,
            data_time: None,
            verdict,
            findings: findings.into(),
            doc: "{}".into(),
            doc_stored: true,
        };
        let crc_err = r#"[{"code":"crc.mismatch","severity":"error","detail":"x"}]"#;
        h.append(rec(&good, store::Verdict::Accepted, "[]"))
            .await
            .unwrap();
        // A gateway bug: accepted although the CRC is wrong.
        h.append(rec(&bad, store::Verdict::Accepted, "[]"))
            .await
            .unwrap();
        // Rejected only for a CRC that in fact holds.
        h.append(rec(&good, store::Verdict::Rejected, crc_err))
            .await
            .unwrap();
        // Correctly rejected.
        h.append(rec(&bad, store::Verdict::Rejected, crc_err))
            .await
            .unwrap();
        h.shutdown().await;
        w.join().unwrap();
    });
    let (code, out, _) = run(&["verify", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("4 records checked, chain intact"), "{out}");
    assert!(
        out.contains(
            "4 inbound frames re-checked, 2 inconsistent; first at seq 2: stored verdict accepted"
        ),
        "{out}"
    );
}

fn export_seqs(db: &Path, extra: &[&str]) -> Vec<u64> {
    let mut args = vec!["export", "--db", db.to_str().unwrap(), "--format", "jsonl"];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn export_filters_are_exact() {
    let (_dir, db, _) = known_log();
    let all = records(&db);
    let pick = |f: &dyn Fn(&StoredRecord) -> bool| -> Vec<u64> {
        all.iter().filter(|r| f(r)).map(|r| r.seq).collect()
    };
    assert_eq!(
        export_seqs(&db, &["--mn", MN_A]),
        pick(&|r| r.mn.as_deref() == Some(MN_A))
    );
    assert_eq!(export_seqs(&db, &["--cn", "2051"]), vec![7]);
    assert_eq!(
        export_seqs(&db, &["--cn", "9014"]),
        pick(&|r| r.cn.as_deref() == Some("9014"))
    );
    assert_eq!(
        export_seqs(&db, &["--st", "91"]),
        pick(&|r| r.st.as_deref() == Some("91"))
    );
    assert_eq!(export_seqs(&db, &["--verdict", "rejected"]), vec![10]);
    assert_eq!(export_seqs(&db, &["--verdict", "junk"]), vec![11]);
    assert_eq!(
        export_seqs(
            &db,
            &["--verdict", "accepted", "--direction", "in", "--mn", MN_B]
        ),
        vec![8]
    );
    // DataTime bounds: [08:58:00, 08:59:00) +08:00 holds a1 and b1 (inbound) only.
    assert_eq!(
        export_seqs(
            &db,
            &[
                "--time",
                "data",
                "--since",
                "2024-06-01T08:58:00+08:00",
                "--until",
                "2024-06-01T00:59:00Z",
                "--direction",
                "in"
            ]
        ),
        vec![1, 8]
    );
    // Receive-time bounds around the second connection.
    let t = all[7].received_at_ms;
    let ms = |m: i64| {
        chrono::DateTime::from_timestamp_millis(m)
            .unwrap()
            .to_rfc3339()
    };
    assert_eq!(
        export_seqs(
            &db,
            &[
                "--since",
                &ms(t),
                "--until",
                &ms(all[10].received_at_ms + 1)
            ]
        ),
        pick(&|r| r.received_at_ms >= t)
    );
    let (code, _, err) = run(&[
        "export",
        "--db",
        db.to_str().unwrap(),
        "--since",
        "yesterday",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--since \"yesterday\""), "{err}");

    let (code, csv, _) = run(&[
        "export",
        "--db",
        db.to_str().unwrap(),
        "--format",
        "csv",
        "--mn",
        MN_A,
        "--cn",
        "2011",
    ]);
    assert_eq!(code, 0);
    let at = |i: usize| {
        chrono::DateTime::from_timestamp_millis(all[i].received_at_ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let mut want = String::from("seq,received_at,mn,cn,data_time,factor,suffix,value,flag\n");
    for (i, dt) in [(0usize, "08:58:00"), (2, "08:59:00"), (4, "08:59:00")] {
        for (f, v, fl) in [("a21026", "12.50", "N"), ("a21002", "+3.1", "D")] {
            want.push_str(&format!(
                "{},{},{MN_A},2011,2024-06-01T{dt}+08:00,{f},Rtd,{v},{fl}\n",
                all[i].seq,
                at(i)
            ));
        }
    }
    assert_eq!(csv, want);
}

/// The packets (timestamp, Ethernet frame) of two connections toward port 9000:
/// handshakes, frames split across 100-byte segments, one retransmitted segment.
fn capture_packets(conns: &[(u16, Vec<Vec<u8>>)]) -> Vec<(Duration, Vec<u8>)> {
    let mut out = Vec::new();
    let mut t = Duration::from_secs(1_717_203_480);
    let mut put = |sport: u16, dport: u16, seq: u32, flags: u8, payload: &[u8]| {
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&sport.to_be_bytes());
        tcp.extend_from_slice(&dport.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&0u32.to_be_bytes());
        tcp.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        tcp.extend_from_slice(payload);
        let (src, dst) = if dport == 9000 {
            ([10, 0, 0, 2], [10, 0, 0, 1])
        } else {
            ([10, 0, 0, 1], [10, 0, 0, 2])
        };
        let total = (20 + tcp.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let sum = !ip.chunks(2).fold(0u32, |a, c| {
            let s = a + u32::from(u16::from_be_bytes([c[0], c[1]]));
            (s & 0xffff) + (s >> 16)
        }) as u16;
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut eth = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        eth.extend_from_slice(&ip);
        eth.extend_from_slice(&tcp);
        t += Duration::from_millis(10);
        out.push((t, eth));
    };
    for (sport, frames) in conns {
        let isn = 1000u32 * u32::from(*sport);
        put(*sport, 9000, isn, 0x02, &[]);
        put(9000, *sport, 77, 0x12, &[]);
        let bytes: Vec<u8> = frames.concat();
        let mut seq = isn + 1;
        for (i, chunk) in bytes.chunks(100).enumerate() {
            put(*sport, 9000, seq, 0x18, chunk);
            if i == 1 {
                put(*sport, 9000, seq, 0x18, chunk); // retransmission
            }
            put(
                9000,
                *sport,
                78,
                0x18,
                b"##0087QN=1;ST=91;CN=9014&&0000\r\n",
            );
            seq += chunk.len() as u32;
        }
    }
    out
}

fn write_pcap(path: &Path, conns: &[(u16, Vec<Vec<u8>>)]) {
    use pcap_file::pcap::{PcapPacket, PcapWriter};
    let mut w = PcapWriter::new(std::fs::File::create(path).unwrap()).unwrap();
    for (t, eth) in capture_packets(conns) {
        w.write_packet(&PcapPacket::new(t, eth.len() as u32, &eth))
            .unwrap();
    }
}

fn write_pcapng(path: &Path, conns: &[(u16, Vec<Vec<u8>>)]) {
    use pcap_file::DataLink;
    use pcap_file::pcapng::PcapNgWriter;
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
    use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock;
    let mut w = PcapNgWriter::new(std::fs::File::create(path).unwrap()).unwrap();
    w.write_pcapng_block(InterfaceDescriptionBlock {
        linktype: DataLink::ETHERNET,
        snaplen: 0,
        options: vec![],
    })
    .unwrap();
    for (t, eth) in capture_packets(conns) {
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: 0,
            timestamp: t,
            original_len: eth.len() as u32,
            data: std::borrow::Cow::Owned(eth),
            options: vec![],
        })
        .unwrap();
    }
}

fn frames_of(c: &capture::Capture) -> Vec<Vec<u8>> {
    c.streams
        .iter()
        .flat_map(|s| &s.items)
        .map(|i| i.bytes.to_vec())
        .collect()
}

#[test]
fn replay_of_a_pcap_yields_the_frames_of_the_raw_capture() {
    let dir = tempfile::tempdir().unwrap();
    let v = "a21026-Rtd=12.50,a21026-Flag=N";
    let c1: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            frame(
                MN_A,
                &format!("2024060108580000{i}"),
                "2011",
                &format!("2024060108{:02}00", 50 + i),
                v,
                true,
            )
        })
        .collect();
    let c2: Vec<Vec<u8>> = vec![frame(
        MN_B,
        "20240601085800009",
        "2011",
        "20240601085800",
        v,
        true,
    )];
    let pcap = dir.path().join("cap.pcap");
    write_pcap(&pcap, &[(40001, c1.clone()), (40002, c2.clone())]);
    let raw = dir.path().join("cap.bin");
    std::fs::write(&raw, [c1.concat(), c2.concat()].concat()).unwrap();

    let cfg = Config::default();
    let p = capture::load(&pcap, &cfg, None).unwrap();
    let r = capture::load(&raw, &cfg, None).unwrap();
    assert_eq!(p.kind, capture::SourceKind::Pcap);
    assert_eq!(r.kind, capture::SourceKind::Raw);
    assert_eq!(p.streams.len(), 2);
    assert_eq!(frames_of(&p), frames_of(&r));
    assert_eq!(frames_of(&p), [c1.clone(), c2.clone()].concat());
    // The same traffic as pcapng.
    let ng = dir.path().join("cap.pcapng");
    write_pcapng(&ng, &[(40001, c1.clone()), (40002, c2.clone())]);
    let n = capture::load(&ng, &cfg, None).unwrap();
    assert_eq!(n.kind, capture::SourceKind::Pcapng);
    assert_eq!(n.streams.len(), 2);
    assert_eq!(frames_of(&n), frames_of(&r));

    let report = dir.path().join("r.json");
    let (code, out, err) = run(&[
        "replay",
        pcap.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("pcap capture (2 connection(s), 4 item(s))"),
        "{out}"
    );
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(j["totals"]["frames"], 4);
    assert_eq!(j["devices"][0]["mn"], MN_A);
    assert_eq!(j["devices"][0]["gaps"]["2011"]["data_times"], 3);
    assert_eq!(j["devices"][0]["gaps"]["2011"]["typical_interval_s"], 60);
}

#[test]
fn replay_to_a_gateway_is_acked_and_stored_byte_exact() {
    let gw = Gw::start();
    let dir = tempfile::tempdir().unwrap();
    let v = "a21026-Rtd=12.50,a21026-Flag=N";
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| {
            frame(
                if i % 2 == 0 { MN_A } else { MN_B },
                &format!("2024060108580000{i}"),
                "2011",
                "20240601085800",
                v,
                true,
            )
        })
        .collect();
    let raw = dir.path().join("cap.bin");
    std::fs::write(&raw, frames.concat()).unwrap();
    let args = ReplayArgs {
        inputs: vec![raw],
        to: Some(gw.addr.to_string()),
        pacing: Pacing::Rate(500.0),
        split: Split::Mn,
        ack_timeout: Duration::from_secs(5),
        server_port: None,
        report: None,
        config: None,
    };
    let mut out = Vec::new();
    let r = replay::run(&args, &mut out).unwrap();
    let s = r.send.unwrap();
    assert_eq!(
        (s.sent, s.ack_requested, s.acked, s.timed_out, s.connections),
        (5, 5, 5, 0, 2)
    );
    assert!(s.latency_us.contains_key("p99"));
    gw.wait_records(10);
    let (_d, db) = gw.stop();
    let mut stored: Vec<Vec<u8>> = records(&db)
        .into_iter()
        .filter(|r| r.direction == Direction::In)
        .map(|r| r.raw)
        .collect();
    let mut want = frames.clone();
    stored.sort();
    want.sort();
    assert_eq!(stored, want);
}

#[test]
fn tail_shows_new_records_and_exits_0_when_its_pipe_closes() {
    let gw = Gw::start();
    let v = "a21026-Rtd=12.50,a21026-Flag=N";
    gw.send(
        &[frame(
            MN_A,
            "20240601085800001",
            "2011",
            "20240601085800",
            v,
            false,
        )],
        1,
    );
    let mut child = Command::new(BIN)
        .args(["tail", "--db", gw.db.to_str().unwrap(), "--mn", MN_B])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    gw.send(
        &[frame(
            MN_B,
            "20240601085800002",
            "2011",
            "20240601085800",
            v,
            false,
        )],
        2,
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert!(
        line.contains(&format!("MN={MN_B} CN=2011 accepted a21026-Rtd=12.50")),
        "{line}"
    );
    assert!(!line.contains(MN_A));
    drop(lines);
    gw.send(
        &[frame(
            MN_B,
            "20240601085800003",
            "2011",
            "20240601085800",
            v,
            false,
        )],
        3,
    );
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "tail did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    gw.stop();
}

#[test]
fn stats_figures_are_right_for_a_known_log() {
    let (_dir, db, _) = known_log();
    let s = store::device_stats(&db, 0).unwrap();
    assert_eq!(s.len(), 2);
    let a = &s[0];
    assert_eq!(a.mn, MN_A);
    assert_eq!(
        (a.frames_total, a.frames_since, a.accepted, a.rejected),
        (4, 4, 4, 0)
    );
    assert_eq!(a.dialects, vec![("2017".to_owned(), 4)]);
    assert_eq!(a.crc_variants, vec![("hj212".to_owned(), 4)]);
    assert_eq!(
        a.last_data_time,
        vec![
            ("2011".to_owned(), "2024-06-01T08:59:00+08:00".to_owned()),
            ("2051".to_owned(), "2024-06-01T08:50:00+08:00".to_owned())
        ]
    );
    let recs = records(&db);
    // Skews of the three 2011 frames: received - 00:58:00Z, - 00:59:00Z, - 00:59:00Z; the median is the middle one.
    let mut sk: Vec<i64> = [
        (0, 1_717_203_480_000),
        (2, 1_717_203_540_000),
        (4, 1_717_203_540_000),
    ]
    .iter()
    .map(|&(i, dt)| recs[i].received_at_ms - dt)
    .collect();
    sk.sort();
    assert_eq!(a.median_skew_ms, Some(sk[1]));
    let b = &s[1];
    assert_eq!((b.frames_total, b.accepted, b.rejected), (2, 1, 1));
    assert_eq!(b.rejects_by_reason, vec![("crc.mismatch".to_owned(), 1)]);
    assert_eq!(
        b.crc_variants,
        vec![("hj212".to_owned(), 1), ("unknown".to_owned(), 1)]
    );
    assert_eq!(s.iter().map(|d| d.frames_since).sum::<u64>(), 6);
    assert_eq!(
        store::device_stats(&db, i64::MAX).unwrap()[0].frames_since,
        0
    );
    let (code, out, _) = run(&["stats", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("rejects: crc.mismatch=1"), "{out}");
    assert!(out.contains("2 device(s)"), "{out}");
}
