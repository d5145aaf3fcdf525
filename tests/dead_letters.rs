//! No record can stop the MQTT publisher (issue 18, row 2): a record the broker
//! refuses, an oversize payload, a rejected frame whose MN holds a control
//! character are set aside (dead letters) and the next good frame still goes
//! out; a restart keeps going; the CLI lists the entries and re-drive works; a
//! consumer that died on a record skips it on the next start.
//!
//! Real brokers (Debian mosquitto, whose `max_packet_size` sets a small limit,
//! and the embedded rumqttd), real sockets, a real SQLite file, the built binary
//! for the CLI.

#[allow(dead_code)]
mod common;
mod mqtt_support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{mn, qn, upload};
use hj212_gateway::config::Config;
use hj212_gateway::daemon::{self, Overrides, Running};
use hj212_gateway::protocol::reply;
use hj212_gateway::store::{Cursors, DeadLetterFilter, DeadLetterRow, list_dead_letters};
use mqtt_support::{Device, Mosquitto, PATIENCE, Subscriber, data_seqs, mosquitto_bin};

/// Starts a gateway on `dir` (kept across restarts) with `[mqtt]` lines `mqtt`.
async fn gateway(dir: &Path, mqtt: &str) -> Running {
    let text = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n\
         [store]\nsync = \"off\"\n[alarms]\nenabled = false\n\
         [mqtt]\nclient_id = \"gw-dead\"\nreconnect_max = \"300ms\"\n{mqtt}\n"
    );
    let cfg = Config::parse(&text, Path::new("test")).expect("config");
    daemon::start(
        cfg,
        &Overrides {
            config: None,
            listen: Vec::new(),
            data: Some(dir.to_owned()),
        },
    )
    .await
    .expect("gateway starts")
}

fn db(dir: &Path) -> std::path::PathBuf {
    Config::default().store_path(dir)
}

fn entries(dir: &Path) -> Vec<DeadLetterRow> {
    list_dead_letters(&db(dir), &DeadLetterFilter::default()).expect("dead letters")
}

/// The seq of the last stored inbound frame.
fn last_seq(dir: &Path) -> u64 {
    common::records(&db(dir))
        .iter()
        .filter(|r| r.direction == hj212_gateway::store::Direction::In)
        .map(|r| r.seq)
        .max()
        .expect("a record")
}

/// Waits until `pred` holds over the dead letters.
async fn wait_entries(dir: &Path, what: &str, pred: impl Fn(&[DeadLetterRow]) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let e = entries(dir);
        if pred(&e) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A rejected frame (bad MN) whose MN holds U+0001.
fn control_char_mn_frame() -> Vec<u8> {
    reply::envelope(
        b"QN=20240601085857001;ST=31;CN=2011;PW=123456;MN=AB\x01CD;Flag=5;\
          CP=&&DataTime=20240601085857;a21026-Rtd=12.5&&",
    )
    .to_vec()
}

/// A valid upload of about 3 KB (80 factors): over a 2 KB packet limit.
fn big_upload(m: &str, q: &str) -> Vec<u8> {
    let mut cp = String::from("DataTime=20240601085857");
    for i in 0..80 {
        cp.push_str(&format!(
            ";a{:05}-Rtd=12.5,a{:05}-Flag=N",
            30000 + i,
            30000 + i
        ));
    }
    let seg = format!("QN={q};ST=31;CN=2011;PW=123456;MN={m};Flag=5;CP=&&{cp}&&");
    let f = reply::envelope(seg.as_bytes()).to_vec();
    assert!(!common::decode(&f).has_error(), "test frame must be valid");
    f
}

/// Runs the built binary's `dead-letters` with `args` on `db`.
fn cli(db: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
        .arg("dead-letters")
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .expect("run the CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_frame_with_a_control_character_in_its_mn_is_set_aside_and_publishing_goes_on() {
    let Some(bin) = mosquitto_bin() else { return };
    let broker = Mosquitto::start(bin, "");
    let sub = Subscriber::start(broker.port, "hj212/#", false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mqtt = format!(
        "url = \"mqtt://127.0.0.1:{}\"\npublish_rejected = true",
        broker.port
    );
    let gw = gateway(dir.path(), &mqtt).await;
    let mut d = Device::connect(gw.addrs[0]).await;
    d.send_acked(&upload(&mn(1), &qn(1), "123456")).await;
    d.send(&control_char_mn_frame()).await;
    // The session stores frames in order: once the next one is acked, the bad one is stored.
    d.send_acked(&upload(&mn(2), &qn(2), "123456")).await;
    let good = last_seq(dir.path());
    sub.wait_for("the good frame after the poison one", |g| {
        data_seqs(g).contains(&good)
    })
    .await;
    wait_entries(dir.path(), "the dead letter", |e| e.len() == 1).await;
    let e = &entries(dir.path())[0];
    assert_eq!(
        (e.consumer.as_str(), e.seq, e.reason.as_str()),
        ("mqtt", good - 1, "invalid_topic")
    );
    assert!(e.detail.contains("\\u{1}"), "{e:?}");
    assert!(
        !sub.all().iter().any(|m| m.topic.contains('\u{1}')),
        "nothing was published on a topic with a control character"
    );
    gw.stop().await.expect("stop");

    // A restart keeps going: the set-aside record is neither retried nor entered twice.
    let gw = gateway(dir.path(), &mqtt).await;
    let mut d = Device::connect(gw.addrs[0]).await;
    d.send_acked(&upload(&mn(3), &qn(3), "123456")).await;
    let after = last_seq(dir.path());
    sub.wait_for("a frame after the restart", |g| {
        data_seqs(g).contains(&after)
    })
    .await;
    assert_eq!(entries(dir.path())[0].attempts, 1);

    // The CLI lists it; a re-drive tries it again and, still refused, it is dead
    // again with one more attempt.
    let (ok, out) = cli(&db(dir.path()), &["--json", "--consumer", "mqtt"]);
    assert!(ok, "{out}");
    let j: serde_json::Value =
        serde_json::from_str(out.lines().next().expect("one line")).expect("JSON line");
    assert_eq!(j["schema"], "hj212.dead_letter.v1");
    assert_eq!(j["reason"], "invalid_topic");
    assert_eq!(j["seq"], good - 1);
    let (ok, out) = cli(&db(dir.path()), &["redrive", "--id", &e.id.to_string()]);
    assert!(ok && out.starts_with("1 entries marked"), "{out}");
    wait_entries(dir.path(), "the failed re-drive", |e| {
        e[0].attempts == 2 && e[0].state == "dead"
    })
    .await;
    gw.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_refuses_is_set_aside_after_bounded_retries_and_redrive_delivers_it() {
    let Some(bin) = mosquitto_bin() else { return };
    // mosquitto closes the connection of a client that sends a larger packet.
    let small = Mosquitto::start(bin.clone(), "max_packet_size 2048");
    let sub = Subscriber::start(small.port, "hj212/#", false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = gateway(
        dir.path(),
        &format!(
            "url = \"mqtt://127.0.0.1:{}\"\nmax_refusals = 2",
            small.port
        ),
    )
    .await;
    let mut d = Device::connect(gw.addrs[0]).await;
    d.send_acked(&upload(&mn(1), &qn(1), "123456")).await;
    d.send_acked(&big_upload(&mn(1), &qn(2))).await;
    let big = last_seq(dir.path());
    d.send_acked(&upload(&mn(1), &qn(3), "123456")).await;
    let good = last_seq(dir.path());
    sub.wait_for("the good frame after the refused one", |g| {
        data_seqs(g).contains(&good)
    })
    .await;
    wait_entries(dir.path(), "the dead letter", |e| e.len() == 1).await;
    let e = entries(dir.path()).remove(0);
    assert_eq!(
        (e.consumer.as_str(), e.seq, e.reason.as_str()),
        ("mqtt", big, "broker_refused")
    );
    assert!(!data_seqs(&sub.all()).contains(&big));
    assert!(
        gw.shared.metrics.dead_letters("mqtt", "broker_refused") >= 1,
        "counted"
    );
    gw.stop().await.expect("stop");
    drop(small);

    // The operator points the gateway at a broker that takes the message and
    // re-drives it: it is published and the entry resolved.
    let roomy = Mosquitto::start(bin, "");
    let sub = Subscriber::start(roomy.port, "hj212/#", false).await;
    let gw = gateway(
        dir.path(),
        &format!("url = \"mqtt://127.0.0.1:{}\"", roomy.port),
    )
    .await;
    let (ok, out) = cli(&db(dir.path()), &["redrive", "--all", "--consumer", "mqtt"]);
    assert!(ok && out.starts_with("1 entries marked"), "{out}");
    sub.wait_for("the re-driven message", |g| data_seqs(g).contains(&big))
        .await;
    wait_entries(dir.path(), "the entry resolved", |e| {
        e[0].state == "resolved"
    })
    .await;
    let (ok, out) = cli(&db(dir.path()), &["--state", "resolved"]);
    assert!(ok && out.contains("broker_refused"), "{out}");
    gw.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_over_max_packet_size_is_set_aside_before_it_is_sent() {
    let port = mqtt_support::rumqttd();
    let sub = Subscriber::start(port, "hj212/#", false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = gateway(
        dir.path(),
        &format!("url = \"mqtt://127.0.0.1:{port}\"\nmax_packet_size = 2048"),
    )
    .await;
    let mut d = Device::connect(gw.addrs[0]).await;
    d.send_acked(&big_upload(&mn(7), &qn(1))).await;
    let big = last_seq(dir.path());
    d.send_acked(&upload(&mn(7), &qn(2), "123456")).await;
    let good = last_seq(dir.path());
    sub.wait_for("the good frame", |g| data_seqs(g).contains(&good))
        .await;
    wait_entries(dir.path(), "the dead letter", |e| e.len() == 1).await;
    let e = &entries(dir.path())[0];
    assert_eq!((e.seq, e.reason.as_str()), (big, "oversize"));
    assert!(e.detail.contains("mqtt.max_packet_size = 2048"), "{e:?}");
    gw.stop().await.expect("stop");
}

/// What a publisher that died in careful mode leaves in its cursor row: two
/// starts at the same cursor without a clean stop, and the record it was on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_died_on_a_record_skips_it_on_the_next_start_and_says_so() {
    let port = mqtt_support::rumqttd();
    let dir = tempfile::tempdir().expect("tempdir");
    // Frames stored while MQTT is off: the publisher has no cursor yet.
    let gw = gateway(dir.path(), "enabled = false").await;
    let mut d = Device::connect(gw.addrs[0]).await;
    let mut seqs = Vec::new();
    for i in 0..3 {
        d.send_acked(&upload(&mn(9), &qn(i), "123456")).await;
        seqs.push(last_seq(dir.path()));
    }
    gw.stop().await.expect("stop");
    let c = Cursors::open(db(dir.path())).expect("cursors");
    c.begin_start("mqtt", 0).expect("start 1");
    c.begin_start("mqtt", 0).expect("start 2");
    c.set_probe("mqtt", Some(seqs[1])).expect("probe");
    drop(c);

    let sub = Subscriber::start(port, "hj212/#", false).await;
    let gw = gateway(dir.path(), &format!("url = \"mqtt://127.0.0.1:{port}\"")).await;
    sub.wait_for("the frames around the poison one", |g| {
        let s = data_seqs(g);
        s.contains(&seqs[0]) && s.contains(&seqs[2])
    })
    .await;
    assert!(!data_seqs(&sub.all()).contains(&seqs[1]), "skipped");
    let e = entries(dir.path());
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].seq, e[0].reason.as_str()), (seqs[1], "crash"));
    assert_eq!(gw.shared.metrics.consumer_crashes.get(), 1);
    gw.stop().await.expect("stop");
}

/// Two unclean starts at the same cursor put the publisher in careful mode; it
/// gets through (nothing set aside when nothing crashes) and publishes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn careful_mode_after_unclean_starts_publishes_everything_and_sets_nothing_aside() {
    let port = mqtt_support::rumqttd();
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = gateway(dir.path(), "enabled = false").await;
    let mut d = Device::connect(gw.addrs[0]).await;
    for i in 0..20 {
        d.send_acked(&upload(&mn(i % 3), &qn(i), "123456")).await;
    }
    let last = last_seq(dir.path());
    gw.stop().await.expect("stop");
    let c = Cursors::open(db(dir.path())).expect("cursors");
    c.begin_start("mqtt", 0).expect("start 1");
    drop(c);
    let sub = Subscriber::start(port, "hj212/#", false).await;
    let gw = gateway(dir.path(), &format!("url = \"mqtt://127.0.0.1:{port}\"")).await;
    sub.wait_for("every frame", |g| {
        data_seqs(g).len() == 20 && data_seqs(g).contains(&last)
    })
    .await;
    assert!(entries(dir.path()).is_empty());
    gw.stop().await.expect("stop");
    // The clean stop ends the streak: the next start is not careful.
    let c = Cursors::open(db(dir.path())).expect("cursors");
    assert_eq!(c.begin_start("mqtt", 1).expect("start").starts, 1);
}

/// The alarm detector's crash-loop guard: the record it died on in careful mode
/// (left in its cursor row) is set aside on the next start, the rest is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alarm_detector_skips_the_record_it_died_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n\
                [store]\nsync = \"off\"\n[mqtt]\nenabled = false\n[alarms]\nenabled = false\n";
    let start = |text: &str| {
        let cfg = Config::parse(text, Path::new("test")).expect("config");
        let o = Overrides {
            config: None,
            listen: Vec::new(),
            data: Some(dir.path().to_owned()),
        };
        async move { daemon::start(cfg, &o).await.expect("gateway starts") }
    };
    let gw = start(text).await;
    let mut d = Device::connect(gw.addrs[0]).await;
    let mut seqs = Vec::new();
    for i in 0..3 {
        d.send_acked(&upload(&mn(4), &qn(i), "123456")).await;
        seqs.push(last_seq(dir.path()));
    }
    gw.stop().await.expect("stop");
    // The detector had no cursor: it starts at the head and warms up from 0.
    let c = Cursors::open(db(dir.path())).expect("cursors");
    c.set_cursor("alarms", 0).expect("cursor");
    c.begin_start("alarms", 0).expect("start 1");
    c.begin_start("alarms", 0).expect("start 2");
    c.set_probe("alarms", Some(seqs[1])).expect("probe");
    drop(c);
    let gw = start(&text.replace("[alarms]\nenabled = false", "[alarms]\nenabled = true")).await;
    wait_entries(dir.path(), "the detector's dead letter", |e| e.len() == 1).await;
    let e = &entries(dir.path())[0];
    assert_eq!(
        (e.consumer.as_str(), e.seq, e.reason.as_str()),
        ("alarms", seqs[1], "crash")
    );
    let c = Cursors::open(db(dir.path())).expect("cursors");
    let deadline = Instant::now() + PATIENCE;
    while c.get_cursor("alarms").expect("cursor") < Some(seqs[2]) {
        assert!(
            Instant::now() < deadline,
            "the detector did not read past it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await.expect("stop");
}
