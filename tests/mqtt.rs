//! The MQTT publisher against a real broker that `cargo test` starts by itself
//! (an embedded rumqttd): the payload contract for 2005/2017/2025 frames,
//! presence, split-upload merging, and a SIGKILLed gateway binary resuming
//! mid-backlog without losing a frame. Nothing is mocked.

#[allow(dead_code)]
mod common;
mod mqtt_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{Bin, mn, qn, upload};
use hj212_gateway::protocol::{crc, crypt, reply};
use hj212_gateway::store::{Direction, Verdict};
use mqtt_support::{Device, Subscriber, data_seqs, free_port, rumqttd, rumqttd_on};

const KEY_HEX: &str = "30303030303030303030303030303030";
const MN_2025: &str = "010000A8900016F000169DC0";
const MN_2005: &str = "88888880000001";

use common::frame_2005;

/// A 2025 minute upload with its CP SM4-encrypted in the raw wire form (key 0x30 x16).
fn frame_2025() -> Vec<u8> {
    let head =
        "QN=20240520210700000;ST=31;CN=2051;PW=123456;MN=010000A8900016F000169DC0;Flag=9;CP=&&";
    let cp = "DataTime=20240520210600;a01011-Min=1.35,a01011-Avg=1.35,a01011-Max=1.35,a01011-Flag=N;a01014-Min=3.20,a01014-Avg=3.211,a01014-Max=3.212,a01014-Flag=N";
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

/// Packet `pno` of a `pnum`-packet split upload (2017, Flag=7: split, ack).
fn split(m: &str, q: &str, data_time: &str, pnum: u32, pno: u32, code: &str) -> Vec<u8> {
    reply::envelope(
        format!(
            "QN={q};ST=31;CN=2011;PW=123456;MN={m};Flag=7;PNUM={pnum};PNO={pno};\
             CP=&&DataTime={data_time};{code}-Rtd={pno}.5,{code}-Flag=N&&"
        )
        .as_bytes(),
    )
    .to_vec()
}

fn config(port: u16, mqtt: &str, rest: &str) -> String {
    format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n\
         [mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"gw-test\"\nreconnect_max = \"500ms\"\n{mqtt}\n{rest}\n"
    )
}

type Gw = common::InProc;

async fn start(text: &str) -> Gw {
    common::start_in_process(text).await
}

use common::records;

/// Seqs that must be published: accepted inbound frames.
fn expected_seqs(db: &Path) -> BTreeSet<u64> {
    records(db)
        .iter()
        .filter(|r| r.direction == Direction::In && r.verdict == Verdict::Accepted)
        .map(|r| r.seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_contract_2005_2017_2025_and_presence() {
    let port = rumqttd();
    let sub = Subscriber::start(port, "hj212/#", false).await;
    let devices = format!(
        "[validation]\nunknown_device = \"quarantine\"\n\
         [[device]]\nmn = \"{MN_2025}\"\npw = \"123456\"\nkey = \"{KEY_HEX}\"\n\
         [[device]]\nmn = \"{MN_2005}\"\n[[device]]\nmn = \"{}\"\npw = \"123456\"\n",
        mn(1)
    );
    let gw = start(&config(port, "", &devices)).await;
    sub.wait_for("gateway online", |g| {
        g.iter()
            .any(|m| m.topic == "hj212/_gateway/gw-test/status" && m.payload == b"online")
    })
    .await;

    let mut d = Device::connect(gw.addr).await;
    // Not published: a rejected frame (wrong PW) and a quarantined device's frame.
    d.send(&upload(&mn(1), &qn(1), "999999")).await;
    let mut q = Device::connect(gw.addr).await;
    q.send_acked(&upload(&mn(2), &qn(2), "123456")).await;
    d.send_acked(&upload(&mn(1), &qn(3), "123456")).await;
    let mut d5 = Device::connect(gw.addr).await;
    d5.send_acked(&frame_2005()).await;
    let mut d25 = Device::connect(gw.addr).await;
    d25.send_acked(&frame_2025()).await;

    let got = sub
        .wait_for("three data messages", |g| data_seqs(g).len() >= 3)
        .await;
    let recs = records(&gw.db);
    let by_seq = |s: u64| recs.iter().find(|r| r.seq == s).expect("record");
    let data: Vec<_> = got.iter().filter(|m| m.seq().is_some()).collect();
    assert_eq!(
        data.len(),
        3,
        "only the three accepted device frames: {data:?}"
    );
    for m in &data {
        let v = m.json();
        let rec = by_seq(v["seq"].as_u64().unwrap());
        // The payload is exactly the export object minus the raw bytes.
        let mut want = hj212_gateway::store::export_record_json(rec);
        want.shift_remove("raw");
        want.shift_remove("raw_b64");
        assert_eq!(v, serde_json::Value::Object(want));
        assert_eq!(
            m.topic,
            format!(
                "hj212/{}/{}",
                rec.mn.as_deref().unwrap(),
                rec.cn.as_deref().unwrap()
            )
        );
        assert!(!m.retain, "data is not retained");
        assert_eq!(
            (v["direction"].as_str(), v["verdict"].as_str()),
            (Some("in"), Some("accepted"))
        );
        for k in [
            "received_at",
            "peer",
            "session",
            "duplicate",
            "findings",
            "crc",
        ] {
            assert!(v.get(k).is_some(), "{k} present");
        }
        assert!(v.get("raw").is_none() && v.get("raw_b64").is_none());
        let text = String::from_utf8_lossy(&m.payload);
        assert!(
            !text.contains("PW=") && !text.contains("123456"),
            "no password: {text}"
        );
    }
    let topic = |t: &str| {
        data.iter()
            .find(|m| m.topic == t)
            .map(|m| m.json())
            .unwrap()
    };
    let v17 = topic(&format!("hj212/{}/2011", mn(1)));
    assert_eq!(v17["dialect"], "2017");
    assert_eq!(
        serde_json::to_string(&v17["values"]["a21026"]).unwrap(),
        r#"{"Rtd":12.5,"Flag":"N"}"#
    );
    let v05 = topic(&format!("hj212/{MN_2005}/2011"));
    assert_eq!(v05["dialect"], "2005");
    assert_eq!(
        serde_json::to_string(&v05["values"]["B02"]).unwrap(),
        r#"{"Rtd":36.50,"Flag":"N"}"#
    );
    let v25 = topic(&format!("hj212/{MN_2025}/2051"));
    assert_eq!(
        (v25["dialect"].as_str(), v25["encryption"].as_str()),
        (Some("2025"), Some("sm4-raw"))
    );
    assert_eq!(
        serde_json::to_string(&v25["values"]["a01014"]).unwrap(),
        r#"{"Min":3.20,"Avg":3.211,"Max":3.212,"Flag":"N"}"#,
        "decrypted, exact digits"
    );

    // Presence: online with the peer on the first accepted frame; offline at session end.
    let status = format!("hj212/{MN_2005}/status");
    let on = sub
        .wait_for("presence online", |g| g.iter().any(|m| m.topic == status))
        .await;
    let on = on.iter().find(|m| m.topic == status).unwrap().json();
    assert_eq!(on["online"], true);
    assert!(on["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(on["since"].as_str().unwrap().ends_with('Z'));
    drop(d5);
    sub.wait_for("presence offline", |g| {
        g.iter()
            .any(|m| m.topic == status && m.json()["online"] == false)
    })
    .await;
    assert!(
        !sub.all().iter().any(|m| m.topic.contains(&mn(2))),
        "quarantined device: no data, no presence"
    );
    // A late subscriber gets the retained states.
    let late = Subscriber::start(port, "hj212/+/status", false).await;
    late.wait_for("retained presence", |g| {
        g.iter().any(|m| m.topic == status && m.retain)
    })
    .await;

    gw.running.stop().await.expect("stop");
    sub.wait_for("gateway offline on stop", |g| {
        g.iter()
            .any(|m| m.topic == "hj212/_gateway/gw-test/status" && m.payload == b"offline")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_uploads_are_merged_complete_or_after_the_wait() {
    let port = rumqttd();
    let sub = Subscriber::start(port, "hj212/+/+/merged", false).await;
    let gw = start(&config(port, "merge_wait = \"1s\"", "")).await;
    let m = mn(7);
    let mut d = Device::connect(gw.addr).await;
    // Group A: 3 packets, out of order; group B: 2 packets, only one arrives.
    d.send_acked(&split(&m, &qn(10), "20240601090000", 3, 2, "a02"))
        .await;
    d.send_acked(&split(&m, &qn(11), "20240601091000", 2, 1, "a01"))
        .await;
    d.send_acked(&split(&m, &qn(12), "20240601090000", 3, 1, "a01"))
        .await;
    d.send_acked(&split(&m, &qn(13), "20240601090000", 3, 3, "a03"))
        .await;
    let got = sub.wait_for("both merged messages", |g| g.len() >= 2).await;
    let recs = records(&gw.db);
    let seq_of = |q: &str| {
        recs.iter()
            .find(|r| r.direction == Direction::In && r.qn.as_deref() == Some(q))
            .unwrap()
            .seq
    };
    let a = got[0].json();
    assert_eq!(got[0].topic, format!("hj212/{m}/2011/merged"));
    assert_eq!(a["schema"], "hj212.merged.v1");
    assert_eq!(a["complete"], true);
    assert_eq!(a["pnum"], 3);
    assert_eq!(
        a["seqs"],
        serde_json::json!([seq_of(&qn(10)), seq_of(&qn(12)), seq_of(&qn(13))])
    );
    assert_eq!(
        serde_json::to_string(&a["values"])
            .unwrap()
            .matches("Rtd")
            .count(),
        3
    );
    assert_eq!(a["values"]["a02"]["Rtd"].to_string(), "2.5");
    assert_eq!(a["findings"], serde_json::json!([]));
    let b = got[1].json();
    assert_eq!(b["complete"], false);
    assert_eq!(b["seqs"], serde_json::json!([seq_of(&qn(11))]));
    assert_eq!(b["findings"][0]["code"], "packets.incomplete");
    gw.running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sigkilled_mid_backlog_resumes_from_the_cursor() {
    const N: u32 = 3000;
    let port = free_port(); // the broker comes later: a backlog builds up first
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("gateway.toml");
    // One publish in flight at a time makes the drain slow enough to kill it midway.
    std::fs::write(&cfg, config(port, "max_inflight = 1\nbatch = 32", "")).expect("config");
    let data = dir.path().join("data");
    let mut gw = Bin::spawn(&cfg, &data);
    let mut d = Device::connect(gw.addr).await;
    for i in 0..N {
        d.send_acked(&upload(&mn(i % 50), &qn(i), "123456")).await;
    }
    drop(d);
    rumqttd_on(port);
    let sub = Subscriber::start(port, "hj212/#", false).await;
    sub.wait_for("part of the backlog", |g| data_seqs(g).len() >= 300)
        .await;
    gw.sigkill();
    let at_kill = data_seqs(&sub.all()).len();
    let expected = expected_seqs(&data.join("frames.db"));
    assert_eq!(expected.len(), N as usize);
    assert!(
        at_kill < expected.len(),
        "killed mid-backlog ({at_kill} of {})",
        expected.len()
    );
    let _gw2 = Bin::spawn(&cfg, &data);
    let got = sub
        .wait_for("every accepted frame", |g| {
            data_seqs(g).is_superset(&expected)
        })
        .await;
    let data_msgs = got.iter().filter(|m| m.seq().is_some()).count();
    eprintln!(
        "published at kill: {at_kill}; after restart: {} distinct of {} messages ({} duplicates)",
        expected.len(),
        data_msgs,
        data_msgs - expected.len()
    );
    // Duplicates come only from the unpersisted tail (cursor saved every 200 ms) and the window.
    assert!(data_msgs - expected.len() < 1500, "duplicates bounded");
    let _ = Duration::ZERO;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_and_2_also_publish_every_frame() {
    let port = rumqttd();
    let sub = Subscriber::start(port, "hj212/#", false).await;
    for qos in [0, 2] {
        let gw = start(&config(
            port,
            &format!("qos = {qos}\ntopic_prefix = \"hj212/q{qos}\""),
            "",
        ))
        .await;
        let mut d = Device::connect(gw.addr).await;
        for i in 0..50 {
            d.send_acked(&upload(&mn(i % 5), &qn(i), "123456")).await;
        }
        let expected = expected_seqs(&gw.db);
        let prefix = format!("hj212/q{qos}/");
        sub.wait_for("every frame", |g| {
            let mine: Vec<_> = g
                .iter()
                .filter(|m| m.topic.starts_with(&prefix))
                .cloned()
                .collect();
            data_seqs(&mine).is_superset(&expected)
        })
        .await;
        gw.running.stop().await.expect("stop");
        let c = hj212_gateway::store::Cursors::open(&gw.db).expect("cursors");
        assert_eq!(
            c.get_cursor("mqtt").expect("cursor"),
            Some(records(&gw.db).last().expect("records").seq),
            "qos {qos}: the cursor reached the end of the log on a clean stop"
        );
    }
}

/// A gateway with a 4-record commit feed that stored `backlog` frames while no
/// broker was configured, restarted with one (`[mqtt]` plus `mqtt_extra`)
/// while four devices send `live` frames each. Returns once every device is
/// acked, with the seqs that must be published and the directory of the log.
async fn backlog_then_live(
    backlog: u32,
    live: u32,
    mqtt_extra: &str,
) -> (Gw, Subscriber, BTreeSet<u64>, tempfile::TempDir) {
    let shared = tempfile::tempdir().expect("tempdir");
    let store = format!(
        "[store]\nsync = \"off\"\npath = {:?}\nfeed_records = 4\n",
        shared.path().join("frames.db")
    );
    let base = "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n";
    let gw = start(&format!("{base}{store}")).await;
    let mut d = Device::connect(gw.addr).await;
    for i in 0..backlog {
        d.send_acked(&upload(&mn(i % 4), &qn(i), "123456")).await;
    }
    drop(d);
    gw.running.stop().await.expect("stop");

    let port = rumqttd();
    let sub = Subscriber::start(port, "hj212/#", false).await;
    let gw = start(&format!(
        "{base}{store}[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n{mqtt_extra}"
    ))
    .await;
    let mut senders = Vec::new();
    for dev in 0..4u32 {
        let addr = gw.addr;
        senders.push(tokio::spawn(async move {
            let mut d = Device::connect(addr).await;
            for i in 0..live {
                d.send_acked(&upload(&mn(dev), &qn(10_000 + dev * 1000 + i), "123456"))
                    .await;
            }
        }));
    }
    for s in senders {
        s.await.expect("device");
    }
    let expected = expected_seqs(&shared.path().join("frames.db"));
    assert_eq!(expected.len() as u32, backlog + 4 * live);
    (gw, sub, expected, shared)
}

/// The data seqs `sub` received, in arrival order, once every one of
/// `expected` has arrived and anything published twice would have too.
async fn published_seqs(sub: &Subscriber, expected: &BTreeSet<u64>) -> Vec<u64> {
    sub.wait_for("every frame", |g| data_seqs(g).is_superset(expected))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = sub.got.lock().unwrap();
    got.iter().filter_map(|m| m.seq()).collect()
}

/// The publisher reads a backlog from the log file, then keeps up from the writer's
/// in-memory commit feed. With a 4-record feed and four devices sending at once it
/// crosses between the two sources all the time: every accepted frame is still
/// published, and none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_commit_feed_loses_and_repeats_nothing() {
    let (gw, sub, expected, _dir) = backlog_then_live(40, 60, "client_id = \"gw-feed\"\n").await;
    let data = published_seqs(&sub, &expected).await;
    assert_eq!(data.len(), expected.len(), "no frame published twice");
    let m = &gw.running.shared.metrics;
    assert!(m.feed_misses.get() > 0, "the backlog came from SQLite");
    assert!(m.feed_reads.get() > 0, "live frames came from the feed");
    gw.running.stop().await.expect("stop");
}

/// Pages of 8 records (4 frames with their acks) with the same tiny feed, while
/// a backlog of 300 frames drains and live frames arrive: the publisher
/// switches between the file and the feed and reaches the head with a short
/// page many times over. Every accepted frame is still published once, and in
/// the order of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_pages_publish_every_frame_once_in_log_order() {
    let (gw, sub, expected, _dir) =
        backlog_then_live(300, 40, "client_id = \"gw-pages\"\nbatch = 8\n").await;
    let data = published_seqs(&sub, &expected).await;
    let in_order: Vec<u64> = expected.iter().copied().collect();
    assert_eq!(data, in_order, "each frame once, in the log's order");
    assert!(
        gw.running.shared.metrics.feed_misses.get() > 0,
        "the backlog came from SQLite"
    );
    gw.running.stop().await.expect("stop");
}
