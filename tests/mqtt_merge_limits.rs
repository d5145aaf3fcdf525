//! Hostile split uploads (issue 18 rows 1 and 3) through a real gateway and a
//! real broker (embedded rumqttd): PNUM/PNO are numbers off the wire, and the
//! publisher's merger must stay bounded whatever they say.

#[allow(dead_code)]
mod common;
mod mqtt_support;

use std::time::{Duration, Instant};

use common::{mn, qn, records, sample, scrape_metrics, upload};
use hj212_gateway::protocol::reply;
use hj212_gateway::store::Direction;
use mqtt_support::{Device, Got, PATIENCE, Subscriber, rumqttd};

/// Packet `pno` of a `pnum`-packet split upload (2017, Flag=7: split, ack).
fn split(m: &str, q: &str, data_time: &str, pnum: u32, pno: u32) -> Vec<u8> {
    reply::envelope(
        format!(
            "QN={q};ST=31;CN=2011;PW=123456;MN={m};Flag=7;PNUM={pnum};PNO={pno};\
             CP=&&DataTime={data_time};a01-Rtd={pno}.5,a01-Flag=N&&"
        )
        .as_bytes(),
    )
    .to_vec()
}

fn config(port: u16, mqtt: &str) -> String {
    format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n\
         [mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"gw-merge\"\nreconnect_max = \"500ms\"\n{mqtt}\n"
    )
}

fn seq_of(db: &std::path::Path, q: &str) -> u64 {
    records(db)
        .iter()
        .find(|r| r.direction == Direction::In && r.qn.as_deref() == Some(q))
        .expect("stored")
        .seq
}

fn merged(got: &[Got]) -> Vec<serde_json::Value> {
    got.iter()
        .filter(|g| g.topic.ends_with("/merged"))
        .map(Got::json)
        .collect()
}

/// Row 1: one upload with `PNUM=4294967295;PNO=1`. The merger used to list every
/// missing PNO (4.29e9 of them) and abort the process; the frame sat below the
/// publisher's cursor, so every restart aborted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pnum_of_u32_max_is_published_packet_by_packet_and_survives_a_restart() {
    let port = rumqttd();
    let sub = Subscriber::start(port, "hj212/#", false).await;
    let text = config(port, "");
    let gw = common::start_in_process(&text).await;
    let m = mn(41);
    let mut d = Device::connect(gw.addr).await;
    let hostile = split(&m, &qn(1), "20240601090000", u32::MAX, 1);
    assert!(!common::decode(&hostile).has_error(), "the frame is valid");
    d.send_acked(&hostile).await;
    d.send_acked(&upload(&m, &qn(2), "123456")).await;
    let (s1, s2) = (seq_of(&gw.db, &qn(1)), seq_of(&gw.db, &qn(2)));
    let got = sub
        .wait_for("both data messages and the packet's merged message", |g| {
            let seqs = mqtt_support::data_seqs(g);
            seqs.contains(&s1) && seqs.contains(&s2) && !merged(g).is_empty()
        })
        .await;
    let v = &merged(&got)[0];
    assert_eq!(v["pnum"], 4_294_967_295u64);
    assert_eq!(v["seqs"], serde_json::json!([s1]));
    assert_eq!(v["complete"], false);
    assert_eq!(v["values"]["a01"]["Rtd"].to_string(), "1.5");
    assert_eq!(v["findings"][0]["code"], "packets.not_merged");
    let metrics = gw.running.metrics_addr.expect("metrics bound");
    let s = scrape_metrics(metrics).await;
    assert!(sample(&s, "hj212_mqtt_merge_limited_total{reason=\"packets\"}") >= 1.0);

    // The gateway is still up, and a restart on the same log publishes on.
    d.send_acked(&upload(&m, &qn(3), "123456")).await;
    gw.running.stop().await.expect("stop");
    let cfg =
        hj212_gateway::config::Config::parse(&text, std::path::Path::new("test")).expect("config");
    let o = hj212_gateway::daemon::Overrides {
        config: None,
        listen: Vec::new(),
        data: Some(gw.dir.path().to_owned()),
    };
    let again = hj212_gateway::daemon::start(cfg, &o)
        .await
        .expect("restart");
    let mut d = Device::connect(again.addrs[0]).await;
    d.send_acked(&upload(&m, &qn(4), "123456")).await;
    let s4 = seq_of(&gw.db, &qn(4));
    sub.wait_for("a frame sent after the restart", |g| {
        mqtt_support::data_seqs(g).contains(&s4)
    })
    .await;
    again.stop().await.expect("stop");
}

/// Row 3: split uploads that never complete. Each group's incomplete message
/// used to name every missing PNO (675 KB for PNUM=99999) and the merger held
/// groups without a byte bound. Now: PNUM above `merge_max_packets` is published
/// packet by packet, the groups that are merged stay within `merge_max_bytes`
/// (the oldest go out early) and every merged message within `max_packet_size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_completing_split_uploads_stay_within_the_merge_budget() {
    const BUDGET: f64 = 32_768.0;
    const MAX_PACKET: usize = 16_384;
    let port = rumqttd();
    let sub = Subscriber::start(port, "hj212/+/+/merged", false).await;
    let gw = common::start_in_process(&config(
        port,
        "merge_wait = \"1h\"\nmerge_max_packets = 65535\nmerge_max_bytes = 32768\n\
         max_packet_size = 16384",
    ))
    .await;
    let metrics = gw.running.metrics_addr.expect("metrics bound");
    let mut d = Device::connect(gw.addr).await;
    const N: u32 = 300;
    let mut max_bytes_seen = 0.0f64;
    let mut max_groups_seen = 0.0f64;
    for i in 0..N {
        // Odd: PNUM 99999 (above merge_max_packets: not merged); even: PNUM
        // 60000, one packet per DataTime, never complete (merged, held).
        let pnum = if i % 2 == 1 { 99_999 } else { 60_000 };
        let data_time = format!(
            "202406{:02}{:02}{:02}00",
            1 + i / 1440,
            (i / 60) % 24,
            i % 60
        );
        d.send_acked(&split(&mn(42), &qn(100 + i), &data_time, pnum, 2))
            .await;
        if i % 25 == 0 {
            let s = scrape_metrics(metrics).await;
            max_bytes_seen = max_bytes_seen.max(sample(&s, "hj212_mqtt_merge_bytes"));
            max_groups_seen = max_groups_seen.max(sample(&s, "hj212_mqtt_merge_groups"));
        }
    }
    // Every PNUM 99999 packet arrives alone; the budget pushed out the oldest
    // PNUM 60000 groups long before `merge_wait`.
    let got = sub
        .wait_for("the unmerged packets and early groups", |g| {
            let m = merged(g);
            let alone = m.iter().filter(|v| v["pnum"] == 99_999).count();
            let early = m.iter().filter(|v| v["pnum"] == 60_000).count();
            alone == (N / 2) as usize && early > 10
        })
        .await;
    for g in &got {
        assert!(
            g.payload.len() + g.topic.len() < MAX_PACKET,
            "{} bytes on {}",
            g.payload.len(),
            g.topic
        );
        let v = g.json();
        assert_eq!(v["complete"], false);
        let detail = v["findings"][0]["detail"].as_str().expect("detail");
        if v["pnum"] == 60_000 {
            assert_eq!(v["findings"][0]["code"], "packets.incomplete");
            assert!(detail.ends_with("(merge_max_bytes reached)"), "{detail}");
        } else {
            assert_eq!(v["findings"][0]["code"], "packets.not_merged");
        }
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = scrape_metrics(metrics).await;
        max_bytes_seen = max_bytes_seen.max(sample(&s, "hj212_mqtt_merge_bytes"));
        max_groups_seen = max_groups_seen.max(sample(&s, "hj212_mqtt_merge_groups"));
        if sample(&s, "hj212_mqtt_merge_limited_total{reason=\"bytes\"}") >= 10.0 {
            break;
        }
        assert!(Instant::now() < deadline, "bytes limit never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(max_bytes_seen <= BUDGET, "held {max_bytes_seen} bytes");
    assert!(max_groups_seen > 0.0 && max_groups_seen < f64::from(N / 2));
    gw.running.stop().await.expect("stop");
}
