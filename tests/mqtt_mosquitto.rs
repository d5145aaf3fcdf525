//! Interop with the Debian `mosquitto` broker: a broker stopped mid-stream and
//! restarted (nothing missing), TLS with a CA generated here, and the last will
//! of a SIGKILLed gateway binary with device presence.
//!
//! Locally these tests print a SKIPPED line when mosquitto is absent; under CI
//! (`CI` set) they fail instead, because `.ci/run` installs it.

#[allow(dead_code)]
mod common;
mod mqtt_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Bin, mn, qn, upload};
use hj212_gateway::daemon::{self};
use hj212_gateway::store::{Direction, Reader, RecordFilter, Verdict};
use mqtt_support::{Device, Mosquitto, PATIENCE, Subscriber, data_seqs, mosquitto_bin};

fn expected_seqs(db: &Path) -> BTreeSet<u64> {
    Reader::open(db)
        .expect("reader")
        .records(RecordFilter::default())
        .expect("records")
        .map(|r| r.expect("record"))
        .filter(|r| r.direction == Direction::In && r.verdict == Verdict::Accepted)
        .map(|r| r.seq)
        .collect()
}

async fn start_gateway(mqtt: &str) -> (daemon::Running, PathBuf, tempfile::TempDir) {
    let text = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n\
         [mqtt]\nclient_id = \"gw-interop\"\nreconnect_max = \"500ms\"\n{mqtt}\n"
    );
    let g = common::start_in_process(&text).await;
    (g.running, g.db, g.dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_stopped_mid_stream_and_restarted_nothing_missing() {
    let Some(bin) = mosquitto_bin() else { return };
    let mut broker = Mosquitto::start(bin, "");
    // A persistent subscriber session: what mosquitto queued for it survives the restart.
    let sub = Subscriber::start(broker.port, "hj212/#", true).await;
    let (gw, db, _dir) =
        start_gateway(&format!("url = \"mqtt://127.0.0.1:{}\"", broker.port)).await;
    let mut d = Device::connect(gw.addrs[0]).await;
    let mut n = 0;
    for _ in 0..400 {
        d.send_acked(&upload(&mn(n % 20), &qn(n), "123456")).await;
        n += 1;
    }
    broker.stop();
    // The broker is down: devices are still acked, promptly.
    let t = Instant::now();
    for _ in 0..400 {
        d.send_acked(&upload(&mn(n % 20), &qn(n), "123456")).await;
        n += 1;
    }
    assert!(t.elapsed() < PATIENCE, "ingest does not wait for MQTT");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.restart();
    for _ in 0..400 {
        d.send_acked(&upload(&mn(n % 20), &qn(n), "123456")).await;
        n += 1;
    }
    let expected = expected_seqs(&db);
    assert_eq!(expected.len(), 1200);
    let got = sub
        .wait_for("every accepted frame after the restart", |g| {
            data_seqs(g).is_superset(&expected)
        })
        .await;
    let msgs = got.iter().filter(|m| m.seq().is_some()).count();
    eprintln!("1200 frames, {msgs} data messages received across the broker restart");
    gw.stop().await.expect("stop");
    drop(broker);
}

/// A CA and a server certificate for 127.0.0.1/localhost, written as PEM files.
fn make_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "hj212 test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut p = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server params");
    p.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = p.signed_by(&key, &issuer).expect("server cert");
    let (ca_f, cert_f, key_f) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_f, ca_cert.pem()).expect("write ca");
    std::fs::write(&cert_f, cert.pem()).expect("write cert");
    std::fs::write(&key_f, key.serialize_pem()).expect("write key");
    (ca_f, cert_f, key_f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_tls_listener_with_a_generated_ca() {
    let Some(bin) = mosquitto_bin() else { return };
    let pki = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = make_pki(pki.path());
    let broker = Mosquitto::start(
        bin,
        &format!(
            "listener {{port2}} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    let tls_port = broker.port2;
    let sub = Subscriber::start(broker.port, "hj212/#", false).await;
    let (gw, db, _dir) = start_gateway(&format!(
        "url = \"mqtts://127.0.0.1:{tls_port}\"\nca_file = \"{}\"",
        ca.display()
    ))
    .await;
    let mut d = Device::connect(gw.addrs[0]).await;
    d.send_acked(&upload(&mn(1), &qn(1), "123456")).await;
    let expected = expected_seqs(&db);
    sub.wait_for("the frame over TLS", |g| {
        data_seqs(g).is_superset(&expected)
    })
    .await;
    gw.stop().await.expect("stop");

    // A gateway that does not trust the broker's CA publishes nothing.
    let other = tempfile::tempdir().expect("tempdir");
    let (wrong_ca, _, _) = make_pki(other.path());
    let sub2 = Subscriber::start(broker.port, "hj212/_gateway/#", false).await;
    let (gw, _db, _dir) = start_gateway(&format!(
        "url = \"mqtts://127.0.0.1:{tls_port}\"\nca_file = \"{}\"",
        wrong_ca.display()
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !sub2
            .all()
            .iter()
            .any(|m| m.payload == b"online" && !m.retain),
        "untrusted broker certificate must be refused"
    );
    gw.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_last_will_of_a_killed_gateway() {
    let Some(bin) = mosquitto_bin() else { return };
    let broker = Mosquitto::start(bin, "");
    let sub = Subscriber::start(broker.port, "hj212/#", false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("gateway.toml");
    // The password comes from a file, as an operator would keep it.
    let pw = dir.path().join("mqtt.pw");
    std::fs::write(&pw, "not-checked-by-this-broker\n").expect("pw file");
    std::fs::write(
        &cfg,
        format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"gw-will\"\n\
             username = \"gw\"\npassword_file = \"{}\"\n",
            broker.port,
            pw.display()
        ),
    )
    .expect("config");
    let mut gw = Bin::spawn(&cfg, &dir.path().join("data"));
    let gw_topic = "hj212/_gateway/gw-will/status";
    sub.wait_for("gateway online", |g| {
        g.iter()
            .any(|m| m.topic == gw_topic && m.payload == b"online")
    })
    .await;

    let m = mn(3);
    let status = format!("hj212/{m}/status");
    let mut d = Device::connect(gw.addr).await;
    d.send_acked(&upload(&m, &qn(1), "123456")).await;
    let got = sub
        .wait_for("device online", |g| g.iter().any(|x| x.topic == status))
        .await;
    let on = got.iter().find(|x| x.topic == status).unwrap().json();
    assert_eq!(on["online"], true);
    drop(d);
    sub.wait_for("device offline", |g| {
        g.iter()
            .any(|x| x.topic == status && x.json()["online"] == false)
    })
    .await;

    gw.sigkill();
    sub.wait_for("last will: offline", |g| {
        g.iter()
            .any(|m| m.topic == gw_topic && m.payload == b"offline")
    })
    .await;
    // Retained: a newcomer learns the gateway is offline.
    let late = Subscriber::start(broker.port, gw_topic, false).await;
    late.wait_for("retained offline", |g| {
        g.iter().any(|m| m.retain && m.payload == b"offline")
    })
    .await;
}
