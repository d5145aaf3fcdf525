//! The anomaly detector through the real daemon: frames over TCP, alarms in the
//! store and on MQTT (embedded rumqttd), a restart that must not duplicate alarms,
//! and the `alarms` listing. Time is compressed through DataTime; nothing sleeps
//! except the one-second offline threshold.

#[allow(dead_code)]
mod common;
mod mqtt_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset};
use hj212_gateway::cmd::alarms::{self as alarms_cmd, AlarmsArgs};
use hj212_gateway::cmd::replay::{self, Pacing, ReplayArgs, Split};
use hj212_gateway::config::Config;
use hj212_gateway::daemon::{self, Overrides, Running};
use hj212_gateway::protocol::reply;
use hj212_gateway::store::{AlarmFilter, AlarmRow, AlarmStore};
use mqtt_support::{Device, PATIENCE, Subscriber, rumqttd};

const STUCK: &str = "ALARMSTUCK0000000000001";
const STUCK2: &str = "ALARMSTUCK0000000000002";
const RANGE: &str = "ALARMRANGE0000000000001";
const SPIKE: &str = "ALARMSPIKE0000000000001";
const FLAG: &str = "ALARMFLAG00000000000001";
const HUG: &str = "ALARMHUG000000000000001";
const CONV: &str = "ALARMCONV00000000000001";
const GAP: &str = "ALARMGAP000000000000001";
const SKEW: &str = "ALARMSKEW00000000000001";
const OFFLINE: &str = "ALARMOFFLINE00000000001";
const VIDEO: &str = "ALARMVIDEO0000000000001";

fn config(mqtt_port: u16) -> String {
    format!(
        r#"
[metrics]
listen = "127.0.0.1:0"
[server]
listen = ["127.0.0.1:0"]
[store]
sync = "off"
# Compressed history with fixed DataTimes looks like clock skew and gaps:
# no automatic requests, the devices here only read acks.
[downlink]
time_sync_skew = false
backfill = false
[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
[alarms]
tick = "100ms"
skew_threshold = "1d"
stuck_count = 5
spike_window = 10
spike_min_samples = 5
flag_after = "2m"
hugging_window = 10
[alarms.device.{HUG}.factor.a21026]
limit = 100
[alarms.device.{CONV}]
reference_o2 = 9
[alarms.device.{OFFLINE}]
offline_after = "1s"
[alarms.device.{VIDEO}]
offline_after = "1s"
[[device]]
mn = "{VIDEO}"
kind = "video"
"#
    )
}

struct Sender {
    dev: Device,
    n: u32,
    base: DateTime<FixedOffset>,
}

impl Sender {
    /// `cp` after DataTime; `offset_s` seconds from an hour ago (device time, +08:00).
    async fn send(&mut self, mn: &str, cn: &str, offset_s: i64, cp: &str) {
        let dt = self.base + chrono::Duration::seconds(offset_s);
        self.send_at(mn, cn, dt, cp).await;
    }

    async fn send_at(&mut self, mn: &str, cn: &str, dt: DateTime<FixedOffset>, cp: &str) {
        self.n += 1;
        let seg = format!(
            "QN={};ST=31;CN={cn};PW=123456;MN={mn};Flag=5;CP=&&DataTime={};{cp}&&",
            common::qn(self.n),
            dt.format("%Y%m%d%H%M%S")
        );
        let frame = reply::envelope(seg.as_bytes());
        let ack = self.dev.send_acked(&frame).await;
        assert!(ack.windows(7).any(|w| w == b"CN=9014"), "acked");
    }

    /// 2011 frames every 30 s, one factor, `(value, flag)` each.
    async fn series(&mut self, mn: &str, start: i64, vals: &[(&str, &str)]) -> i64 {
        let mut t = start;
        for (v, f) in vals {
            self.send(mn, "2011", t, &format!("a21026-Rtd={v},a21026-Flag={f}"))
                .await;
            t += 30;
        }
        t
    }
}

fn now8() -> DateTime<FixedOffset> {
    chrono::Utc::now().with_timezone(&FixedOffset::east_opt(8 * 3600).unwrap())
}

async fn start(cfg: &str, dir: &Path) -> Running {
    let cfg = Config::parse(cfg, Path::new("test")).expect("config");
    let o = Overrides {
        config: None,
        listen: Vec::new(),
        data: Some(dir.to_owned()),
    };
    daemon::start(cfg, &o).await.expect("gateway starts")
}

fn all(db: &Path) -> Vec<AlarmRow> {
    AlarmStore::open_read_only(db)
        .expect("alarms")
        .list(&AlarmFilter::default())
        .expect("list")
}

fn of<'a>(rows: &'a [AlarmRow], mn: &str, kind: &str) -> Vec<&'a AlarmRow> {
    rows.iter()
        .filter(|r| r.mn == mn && r.kind == kind)
        .collect()
}

/// Waits until `pred` holds over the stored alarms.
async fn wait_rows(db: &Path, what: &str, pred: impl Fn(&[AlarmRow]) -> bool) -> Vec<AlarmRow> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let rows = all(db);
        if pred(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Exactly one alarm of `kind` for `mn`, and it has ended. For `device.offline`
/// the first one has ended: a device the test has stopped sending to goes offline
/// again a second later, and a slow machine may poll after that.
fn raised_and_cleared(rows: &[AlarmRow], mn: &str, kind: &str) -> bool {
    let a = of(rows, mn, kind);
    let once = a.len() == 1 || (kind == "device.offline" && !a.is_empty());
    once && a[0].end_ms.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_detector_raises_and_clears_through_the_daemon() {
    let port = rumqttd();
    let sub = Subscriber::start(port, "hj212/+/alarm", false).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(port);
    let gw = start(&cfg, dir.path()).await;
    let db: PathBuf = Config::parse(&cfg, Path::new("t"))
        .unwrap()
        .store_path(dir.path());
    let mut s = Sender {
        dev: Device::connect(gw.addrs[0]).await,
        n: 0,
        base: now8() - chrono::Duration::hours(1),
    };

    // value.stuck: five identical normal samples, then a change.
    let t = s
        .series(
            STUCK,
            0,
            &[
                ("12.5", "N"),
                ("12.50", "N"),
                ("12.5", "N"),
                ("12.5", "N"),
                ("12.5", "N"),
            ],
        )
        .await;
    s.series(STUCK, t, &[("12.6", "N")]).await;
    // A second stuck device stays active across the restart below.
    s.series(STUCK2, 0, &[("7.1", "N"); 5]).await;
    // value.range: pH above 14, then back.
    s.send(RANGE, "2011", 0, "w01001-Rtd=15.20,w01001-Flag=N")
        .await;
    s.send(RANGE, "2011", 30, "w01001-Rtd=7.20,w01001-Flag=N")
        .await;
    // value.spike: a steady series, one jump, back to normal.
    let steady = [
        ("50", "N"),
        ("51", "N"),
        ("52", "N"),
        ("50", "N"),
        ("51", "N"),
        ("52", "N"),
        ("50", "N"),
        ("51", "N"),
    ];
    let t = s.series(SPIKE, 0, &steady).await;
    let t = s.series(SPIKE, t, &[("400", "N")]).await;
    s.series(SPIKE, t, &[("51", "N")]).await;
    // flag.abnormal: D for 2 minutes, N; then S once, N.
    let t = s
        .series(
            FLAG,
            0,
            &[
                ("1", "D"),
                ("2", "D"),
                ("3", "D"),
                ("4", "D"),
                ("5", "D"),
                ("6", "N"),
            ],
        )
        .await;
    s.series(FLAG, t, &[("7", "S"), ("8", "N")]).await;
    // limit.hugging: ten samples just under 100, then well below.
    let near = [
        "97.1", "98.5", "99.9", "96.2", "98.8", "97.7", "99.1", "95.5", "98.0", "97.3",
    ];
    let v: Vec<(&str, &str)> = near.iter().map(|x| (*x, "N")).collect();
    let t = s.series(HUG, 0, &v).await;
    let far = ["60", "61", "59", "62", "58", "60", "61"];
    let v: Vec<(&str, &str)> = far.iter().map(|x| (*x, "N")).collect();
    s.series(HUG, t, &v).await;
    // converted.mismatch: 40 at 13 % O2, reference 9 %: ZsRtd must be 60.
    s.send(
        CONV,
        "2011",
        0,
        "a21026-Rtd=40,a21026-ZsRtd=40,a21026-Flag=N;a19001-Rtd=13,a19001-Flag=N",
    )
    .await;
    s.send(
        CONV,
        "2011",
        30,
        "a21026-Rtd=40.5,a21026-ZsRtd=60.8,a21026-Flag=N;a19001-Rtd=13.0,a19001-Flag=N",
    )
    .await;
    // data.gap: minutes 0, 1, 4, then the missing 2 and 3 arrive.
    for m in [0, 1, 4, 2, 3] {
        s.send(
            GAP,
            "2051",
            m * 60,
            &format!("a21026-Avg=3{m}.0,a21026-Flag=N"),
        )
        .await;
    }
    // time.skew: three frames 30 h old (beyond 1 d), then three current ones.
    let old = now8() - chrono::Duration::hours(30);
    for i in 0..3 {
        s.send_at(
            SKEW,
            "2011",
            old + chrono::Duration::seconds(30 * i),
            &format!("a21026-Rtd=2{i},a21026-Flag=N"),
        )
        .await;
    }
    for i in 0..3 {
        s.send_at(
            SKEW,
            "2011",
            now8(),
            &format!("a21026-Rtd=3{i},a21026-Flag=N"),
        )
        .await;
    }
    // device.offline (1 s): one frame, silence, one frame. The video device gets
    // only offline checks, whatever it sends.
    s.send(OFFLINE, "2011", 0, "a21026-Rtd=1,a21026-Flag=N")
        .await;
    s.send(VIDEO, "2011", 0, "a21026-Rtd=-5,a21026-Flag=S")
        .await;
    wait_rows(&db, "offline raised", |r| {
        of(r, OFFLINE, "device.offline").len() == 1 && of(r, VIDEO, "device.offline").len() == 1
    })
    .await;
    s.send(OFFLINE, "2011", 30, "a21026-Rtd=2,a21026-Flag=N")
        .await;
    s.send(VIDEO, "2011", 30, "a21026-Rtd=-5,a21026-Flag=S")
        .await;

    let expect: &[(&str, &str)] = &[
        (STUCK, "value.stuck"),
        (RANGE, "value.range"),
        (SPIKE, "value.spike"),
        (HUG, "limit.hugging"),
        (CONV, "converted.mismatch"),
        (GAP, "data.gap"),
        (SKEW, "time.skew"),
        (OFFLINE, "device.offline"),
        (VIDEO, "device.offline"),
    ];
    let rows = wait_rows(&db, "every detector raised and cleared", |r| {
        expect.iter().all(|(mn, k)| raised_and_cleared(r, mn, k))
            && of(r, FLAG, "flag.abnormal").len() == 2
            && of(r, FLAG, "flag.abnormal")
                .iter()
                .all(|a| a.end_ms.is_some())
            && of(r, STUCK2, "value.stuck").len() == 1
    })
    .await;
    let video: Vec<&str> = rows
        .iter()
        .filter(|r| r.mn == VIDEO)
        .map(|r| r.kind.as_str())
        .collect();
    assert!(
        !video.is_empty() && video.iter().all(|k| *k == "device.offline"),
        "video devices get offline checks only: {video:?}"
    );
    let s_flag = of(&rows, FLAG, "flag.abnormal");
    assert_eq!(
        s_flag.iter().filter(|a| a.severity == "critical").count(),
        1,
        "S is critical"
    );
    let gap = &of(&rows, GAP, "data.gap")[0];
    assert_eq!(gap.factor, "2051");
    assert!(!gap.message_zh.is_empty() && gap.message_en.contains("missing"));
    assert!(!of(&rows, STUCK, "value.stuck")[0].seqs.is_empty());

    // MQTT: one raise and one clear per alarm, on {prefix}/{mn}/alarm.
    let expected_msgs: usize = rows
        .iter()
        .map(|r| if r.end_ms.is_some() { 2 } else { 1 })
        .sum();
    let got = sub
        .wait_for("alarm messages", |g| g.len() >= expected_msgs)
        .await;
    let mut per: BTreeMap<(String, String, String), Vec<String>> = BTreeMap::new();
    for m in &got {
        let j = m.json();
        assert_eq!(j["schema"], "hj212.alarm.v1");
        let mn = j["mn"].as_str().unwrap().to_owned();
        assert_eq!(m.topic, format!("hj212/{mn}/alarm"));
        assert!(j["message"]["zh"].is_string() && j["message"]["en"].is_string());
        per.entry((mn, j["kind"].as_str().unwrap().into(), j["id"].to_string()))
            .or_default()
            .push(j["event"].as_str().unwrap().into());
    }
    for r in &rows {
        let ev = &per[&(r.mn.clone(), r.kind.clone(), r.id.to_string())];
        let want: &[&str] = if r.end_ms.is_some() {
            &["raise", "clear"]
        } else {
            &["raise"]
        };
        assert_eq!(ev, want, "{} {}", r.mn, r.kind);
    }

    // Restart: STUCK2's alarm stays active and is not raised again by the same value.
    gw.stop().await.expect("stop");
    let gw = start(&cfg, dir.path()).await;
    let mut s2 = Sender {
        dev: Device::connect(gw.addrs[0]).await,
        n: 1000,
        base: s.base,
    };
    s2.series(STUCK2, 150, &[("7.1", "N"), ("7.1", "N")]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        of(&all(&db), STUCK2, "value.stuck").len(),
        1,
        "no duplicate after restart"
    );
    s2.series(STUCK2, 210, &[("7.3", "N")]).await;
    let rows = wait_rows(&db, "STUCK2 cleared", |r| {
        raised_and_cleared(r, STUCK2, "value.stuck")
    })
    .await;

    // The listing.
    let mut out = Vec::new();
    let n = alarms_cmd::run(
        &AlarmsArgs {
            db: db.clone(),
            active: false,
            mn: Some(GAP.into()),
            since: Some("1h".into()),
            json: true,
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(n, 1);
    let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(line["kind"], "data.gap");
    let active = alarms_cmd::run(
        &AlarmsArgs {
            db: db.clone(),
            active: true,
            mn: None,
            since: None,
            json: false,
        },
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(active, rows.iter().filter(|r| r.end_ms.is_none()).count());
    gw.stop().await.expect("stop");
    // The command as an operator runs it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
        .args(["alarms", "--db"])
        .arg(&db)
        .args(["--mn", SPIKE])
        .output()
        .expect("run alarms");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().next().unwrap().contains("kind"), "{text}");
    assert!(text.contains("value.spike"), "{text}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
        .args(["alarms", "--db"])
        .arg(&db)
        .args(["--since", "yesterday"])
        .output()
        .expect("run alarms");
    assert_eq!(bad.status.code(), Some(2));

    // The audit replay of the same log runs the same detectors.
    let args = ReplayArgs {
        inputs: vec![db.clone()],
        to: None,
        pacing: Pacing::Rate(1.0),
        split: Split::Mn,
        ack_timeout: Duration::from_secs(1),
        server_port: None,
        report: None,
        config: Some(Config::parse(&cfg, Path::new("t")).unwrap()),
    };
    let mut text = Vec::new();
    let report =
        tokio::task::spawn_blocking(move || replay::run(&args, &mut text).map(|r| (r, text)))
            .await
            .unwrap()
            .expect("replay");
    let (report, text) = report;
    assert!(String::from_utf8_lossy(&text).contains("alarms: "));
    for (mn, kind) in expect.iter().filter(|(_, k)| *k != "device.offline") {
        let found: Vec<&serde_json::Value> = report
            .alarms
            .iter()
            .filter(|a| a["mn"] == *mn && a["kind"] == *kind)
            .collect();
        assert_eq!(found.len(), 1, "replay: {mn} {kind}");
        assert!(!found[0]["end"].is_null(), "replay: {mn} {kind} cleared");
    }
}

/// Box-Muller over a 64-bit LCG: seeded normal noise without a dependency.
struct Noise(u64);

impl Noise {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// False positives: 8 hours of a clean flue-gas stack (2011 every 30 s with normal
/// noise, consistent ZsRtd at reference O2 9 %, 2051 per minute, 2061 per hour),
/// compressed into a few seconds through DataTime, raise nothing with the defaults.
/// Only `skew_threshold` is widened: compressed history is up to 8 h behind the
/// receive time, which on a real line would be skew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_eight_hour_flue_gas_series_raises_nothing() {
    const MN: &str = "CLEANSTACK0000000000001";
    let cfg = r#"
[metrics]
listen = "127.0.0.1:0"
[server]
listen = ["127.0.0.1:0"]
[store]
sync = "off"
# Compressed history with fixed DataTimes looks like clock skew and gaps:
# no automatic requests, the devices here only read acks.
[downlink]
time_sync_skew = false
backfill = false
[mqtt]
enabled = false
[alarms]
tick = "100ms"
skew_threshold = "9h"
reference_o2 = 9.0
[alarms.factor.a21026]
limit = 100
[alarms.factor.a21002]
limit = 150
[alarms.factor.a34013]
limit = 20
"#;
    let dir = tempfile::tempdir().unwrap();
    let gw = start(cfg, dir.path()).await;
    let db = Config::parse(cfg, Path::new("t"))
        .unwrap()
        .store_path(dir.path());
    let mut s = Sender {
        dev: Device::connect(gw.addrs[0]).await,
        n: 0,
        base: now8() - chrono::Duration::hours(8),
    };
    let mut n = Noise(212);
    let zs = |c: f64, o2: f64| c * 12.0 / (21.0 - o2);
    let mut prev = (0.0, 0.0);
    for i in 0..(8 * 120) {
        let o2 = ((10.0 + 0.4 * n.normal()) * 10.0).round() / 10.0;
        let so2 = ((35.0 + 3.0 * n.normal()) * 100.0).round() / 100.0;
        let nox = ((80.0 + 6.0 * n.normal()) * 10.0).round() / 10.0;
        let dust = ((5.0 + 0.5 * n.normal()) * 100.0).round() / 100.0;
        let temp = 120.0 + 2.0 * n.normal();
        let flow = 60.0 + 1.5 * n.normal();
        let cp = format!(
            "a21026-Rtd={so2:.2},a21026-ZsRtd={:.2},a21026-Flag=N;\
             a21002-Rtd={nox:.1},a21002-ZsRtd={:.1},a21002-Flag=N;\
             a34013-Rtd={dust:.2},a34013-ZsRtd={:.2},a34013-Flag=N;\
             a19001-Rtd={o2:.1},a19001-Flag=N;a01012-Rtd={temp:.1},a01012-Flag=N;\
             a00000-Rtd={flow:.1},a00000-Flag=N",
            zs(so2, o2),
            zs(nox, o2),
            zs(dust, o2)
        );
        s.send(MN, "2011", i * 30, &cp).await;
        if i % 2 == 1 {
            // The minute's two samples aggregated as a logger does (checked by
            // aggregate.mismatch), its ZsAvg from the averages (converted.mismatch).
            let (p_so2, p_o2) = prev;
            let (avg, o2a) = ((p_so2 + so2) / 2.0, (p_o2 + o2) / 2.0);
            let cp = format!(
                "a21026-Min={:.2},a21026-Avg={avg:.3},a21026-Max={:.2},a21026-ZsAvg={:.2},a21026-Flag=N;\
                 a19001-Avg={o2a:.2},a19001-Flag=N",
                p_so2.min(so2),
                p_so2.max(so2),
                zs(avg, o2a)
            );
            s.send(MN, "2051", (i - 1) * 30, &cp).await;
        }
        prev = (so2, o2);
        if i % 120 == 119 {
            s.send(MN, "2061", (i - 119) * 30, "a21026-Avg=35.00,a21026-Flag=N")
                .await;
        }
    }
    // Wait until the detector has seen everything.
    let last = hj212_gateway::store::Reader::open(&db)
        .unwrap()
        .last_seq()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let c = hj212_gateway::store::Cursors::open(&db)
            .unwrap()
            .get_cursor("alarms")
            .unwrap()
            .unwrap_or(0);
        if c >= last {
            break;
        }
        assert!(Instant::now() < deadline, "detector at {c} of {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = all(&db);
    assert!(rows.is_empty(), "false positives: {rows:#?}");
    gw.stop().await.expect("stop");
}

/// The consistency detectors through `serve` as an operator runs it (the built
/// binary, real sockets, a real SQLite file): 2011 samples then a 2051 whose Max
/// is below the largest of them raise `aggregate.mismatch`, a consistent minute
/// clears it; an hour whose SO2 Cou does not follow from Avg x flow x 3600 s
/// raises `emission.mismatch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_and_emission_mismatch_through_serve() {
    const AGG: &str = "CONSAGG0000000000000001";
    const EMIS: &str = "CONSEMIS000000000000001";
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg_path,
        r#"
[metrics]
enabled = false
[server]
listen = ["127.0.0.1:0"]
[store]
sync = "off"
[downlink]
time_sync_skew = false
backfill = false
[mqtt]
enabled = false
[alarms]
tick = "100ms"
skew_threshold = "1d"
"#,
    )
    .unwrap();
    let data = dir.path().join("data");
    let gw = common::Bin::spawn(&cfg_path, &data);
    let db = Config::load(&cfg_path).unwrap().store_path(&data);
    // A minute boundary an hour ago, device time (+08:00).
    let base = now8() - chrono::Duration::hours(1);
    let base = base - chrono::Duration::seconds(i64::from(chrono::Timelike::second(&base)));
    let mut s = Sender {
        dev: Device::connect(gw.addr).await,
        n: 0,
        base,
    };
    // Samples every 30 s: minute 0 has 10.0 and 14.0, minute 1 has 11.0 and 12.0.
    for (i, v) in ["10.0", "14.0", "11.0", "12.0", "11.5"].iter().enumerate() {
        s.send(
            AGG,
            "2011",
            30 * i as i64,
            &format!("a21026-Rtd={v},a21026-Flag=N"),
        )
        .await;
    }
    s.send(
        AGG,
        "2051",
        0,
        "a21026-Min=10.0,a21026-Avg=12.0,a21026-Max=13.0,a21026-Flag=N",
    )
    .await;
    let rows = wait_rows(&db, "aggregate.mismatch raised", |r| {
        of(r, AGG, "aggregate.mismatch").len() == 1
    })
    .await;
    let a = of(&rows, AGG, "aggregate.mismatch")[0];
    assert_eq!(a.factor, "a21026");
    assert_eq!(a.severity, "critical");
    assert!(a.end_ms.is_none());
    assert_eq!(a.seqs.len(), 2, "the sample of 14.0 and the 2051: {a:?}");
    assert!(a.message_en.contains("Max 13.0, below 14.0"), "{a:?}");
    assert!(a.message_zh.contains("最大值 13.0"), "{a:?}");
    s.send(
        AGG,
        "2051",
        60,
        "a21026-Min=11.0,a21026-Avg=11.5,a21026-Max=12.0,a21026-Flag=N",
    )
    .await;
    // An hour of flue gas: 25 mg/m3 x 85 m3/s x 3600 s = 7.65 kg, sent as 9.90.
    s.send(
        EMIS,
        "2061",
        0,
        "a21026-Avg=25.00,a21026-Cou=9.90,a21026-Flag=N;a00000-Avg=85.00,a00000-Cou=306000.0,a00000-Flag=N",
    )
    .await;
    let rows = wait_rows(&db, "cleared and emission raised", |r| {
        raised_and_cleared(r, AGG, "aggregate.mismatch")
            && of(r, EMIS, "emission.mismatch").len() == 1
    })
    .await;
    let e = of(&rows, EMIS, "emission.mismatch")[0];
    assert_eq!(e.factor, "a21026", "the flow's own volume holds: {rows:#?}");
    assert!(e.message_en.contains("gives 7.650"), "{e:?}");
    assert_eq!(rows.len(), 2, "nothing else: {rows:#?}");
    drop(gw);
    // The listing as an operator reads it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
        .args(["alarms", "--db"])
        .arg(&db)
        .args(["--mn", EMIS, "--json"])
        .output()
        .expect("run alarms");
    assert!(out.status.success());
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["kind"], "emission.mismatch");
}
