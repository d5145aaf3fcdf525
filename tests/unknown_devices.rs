//! Per-MN state for devices nobody registered, through the real daemon: a
//! sender inventing MNs (one frame each) must not grow the alarm engine or the
//! downlink state beyond their caps, nor raise one `device.offline` per MN,
//! while a registered device keeps its state and its offline alarm.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{expected_ack, mn, qn, sample, scrape_metrics, upload};
use hj212_gateway::store::{AlarmFilter, AlarmRow, AlarmStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATIENCE: Duration = Duration::from_secs(30);
/// Distinct unregistered MNs sent, and the caps they must stay under.
const STRANGERS: u32 = 2000;
const CAP: usize = 100;

fn config(registered: &str) -> String {
    format!(
        r#"
[metrics]
listen = "127.0.0.1:0"
[server]
listen = ["127.0.0.1:0"]
[store]
sync = "off"
[mqtt]
enabled = false
[downlink]
max_unregistered_devices = {CAP}
[alarms]
tick = "100ms"
offline_after = "1s"
offline_min = "1s"
max_unregistered_devices = {CAP}
[[device]]
mn = "{registered}"
"#
    )
}

/// Sends `frame` on a new connection and waits for its ack.
async fn send_one(addr: SocketAddr, frame: Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&frame).await.expect("send");
    let want = expected_ack(&frame);
    let mut got = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while !got.ends_with(b"\r\n") {
        let mut chunk = [0u8; 512];
        let n = tokio::time::timeout_at(deadline.into(), s.read(&mut chunk))
            .await
            .expect("ack in time")
            .expect("read");
        assert!(n > 0, "gateway closed the connection");
        got.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(got, want);
}

fn offline_alarms(db: &Path) -> Vec<AlarmRow> {
    AlarmStore::open_read_only(db)
        .expect("alarms")
        .list(&AlarmFilter::default())
        .expect("list")
        .into_iter()
        .filter(|a| a.kind == "device.offline")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_mns_stay_within_the_caps_and_raise_no_offline_alarms() {
    let registered = mn(9_000_000);
    let gw = common::start_in_process(&config(&registered)).await;
    let metrics = gw.running.metrics_addr.expect("metrics listener");

    // 2,000 MNs nobody registered, one accepted real-time frame each, 16
    // connections at a time (one MN per connection, as a spoofer would).
    let mut next = 0u32;
    while next < STRANGERS {
        let mut batch = Vec::new();
        for i in next..(next + 16).min(STRANGERS) {
            batch.push(tokio::spawn(send_one(
                gw.addr,
                upload(&mn(i), &qn(i), "123456"),
            )));
        }
        next += 16;
        for t in batch {
            t.await.expect("sender");
        }
    }
    // Then the registered device, once, and silence: it goes offline after 1 s,
    // later than every stranger did.
    send_one(gw.addr, upload(&registered, &qn(STRANGERS), "123456")).await;
    let deadline = Instant::now() + PATIENCE;
    let offline = loop {
        let rows = offline_alarms(&gw.db);
        if rows.iter().any(|a| a.mn == registered) {
            break rows;
        }
        assert!(Instant::now() < deadline, "registered device never offline");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let strangers: Vec<&str> = offline
        .iter()
        .filter(|a| a.mn != registered)
        .map(|a| a.mn.as_str())
        .collect();
    assert!(
        strangers.is_empty(),
        "{} device.offline alarms for unregistered MNs, e.g. {:?}",
        strangers.len(),
        strangers.first()
    );

    // The detector has read everything; its state and the downlink's are capped.
    let deadline = Instant::now() + PATIENCE;
    let s = loop {
        let s = scrape_metrics(metrics).await;
        if sample(&s, "hj212_consumer_lag_records{consumer=\"alarms\"}") == 0.0 {
            break s;
        }
        assert!(Instant::now() < deadline, "detector never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let alarm_unreg = sample(&s, "hj212_alarm_tracked_devices{registered=\"false\"}");
    let alarm_reg = sample(&s, "hj212_alarm_tracked_devices{registered=\"true\"}");
    let dl_unreg = sample(&s, "hj212_downlink_tracked_devices{registered=\"false\"}");
    let dl_reg = sample(&s, "hj212_downlink_tracked_devices{registered=\"true\"}");
    assert_eq!(
        alarm_unreg, CAP as f64,
        "alarm engine holds exactly the cap"
    );
    assert_eq!(dl_unreg, CAP as f64, "downlink holds exactly the cap");
    assert_eq!(
        (alarm_reg, dl_reg),
        (1.0, 1.0),
        "the registered device kept"
    );
    let evicted = |state: &str| {
        sample(
            &s,
            &format!("hj212_tracked_devices_evicted_total{{state=\"{state}\"}}"),
        )
    };
    assert_eq!(evicted("alarms"), f64::from(STRANGERS) - CAP as f64);
    assert_eq!(evicted("downlink"), f64::from(STRANGERS) - CAP as f64);
    // No per-MN series: the scrape does not grow with the MNs sent.
    assert!(
        !s.iter()
            .any(|(k, _)| k.contains(&mn(0)) || k.contains(&registered)),
        "a metric labelled with an MN"
    );

    // The registered device's state still works: it comes back, the alarm ends.
    send_one(gw.addr, upload(&registered, &qn(STRANGERS + 1), "123456")).await;
    let deadline = Instant::now() + PATIENCE;
    while !offline_alarms(&gw.db)
        .iter()
        .any(|a| a.mn == registered && a.end_ms.is_some())
    {
        assert!(Instant::now() < deadline, "offline alarm never cleared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.running.stop().await.expect("stop");
}
