//! What an operator imports from `deploy/` works against the gateway as built:
//! the Grafana dashboard and the Prometheus alert rules parse, and every metric
//! (and every exact label value) their PromQL names is in a real `/metrics`
//! scrape of the real binary, so renaming a series breaks this test instead of a
//! bureau's dashboard. The rules also go through `promtool check rules` when
//! Prometheus's `promtool` is installed.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Serve, expected_ack, mn, qn, scrape_metrics, upload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATIENCE: Duration = Duration::from_secs(20);

/// A local port nobody listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe port")
        .port()
}

fn read_file(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Metric selectors in a PromQL expression: each `hj212_*` or `process_*`
/// identifier with the exact-match (`=`) label pairs of its braces.
fn selectors(expr: &str) -> Vec<(String, Vec<(String, String)>)> {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let starts = (expr[i..].starts_with("hj212_") || expr[i..].starts_with("process_"))
            && (i == 0 || !ident(b[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let end = (i..b.len()).find(|&j| !ident(b[j])).unwrap_or(b.len());
        let name = expr[i..end].to_owned();
        let mut labels = Vec::new();
        if b.get(end) == Some(&b'{') {
            let close = expr[end..].find('}').expect("closed selector") + end;
            for m in expr[end + 1..close].split(',') {
                // Only `k="v"`: regex and negative matchers need not match anything.
                if let Some((k, v)) = m.split_once('=') {
                    let (k, v) = (k.trim(), v.trim());
                    if !k.ends_with('!') && !v.starts_with('~') {
                        labels.push((k.to_owned(), v.trim_matches('"').to_owned()));
                    }
                }
            }
        }
        out.push((name, labels));
        i = end;
    }
    out
}

/// The label pairs of a scraped series `name{k="v",...}`.
fn series_labels(series: &str) -> (&str, Vec<(String, String)>) {
    let Some((name, rest)) = series.split_once('{') else {
        return (series, Vec::new());
    };
    let body = rest.strip_suffix('}').expect("closed labels");
    let mut out = Vec::new();
    // Label values here never hold `",`; the exposition checker ran already.
    for pair in body.split("\",") {
        let (k, v) = pair.split_once("=\"").expect("k=\"v\"");
        out.push((k.to_owned(), v.trim_end_matches('"').to_owned()));
    }
    (name, out)
}

/// Every PromQL expression of the dashboard: panel targets and template queries.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("target expr").to_owned());
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

/// The dashboard is a Grafana 10 model an operator can import as is: a
/// Prometheus datasource variable every panel uses, unique ids, every panel
/// placed, and the figures the README promises on it.
fn check_dashboard(dash: &serde_json::Value) {
    assert_eq!(dash["uid"], "hj212-gateway");
    assert!(dash["schemaVersion"].as_u64().expect("schemaVersion") >= 36);
    let vars = dash["templating"]["list"].as_array().expect("variables");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().expect("title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "{title}: id twice"
        );
        let g = &p["gridPos"];
        for k in ["x", "y", "w", "h"] {
            assert!(g[k].is_u64(), "{title}: gridPos.{k}");
        }
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{title}: wider than the grid"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    let all = dashboard_exprs(dash).join("\n");
    for needed in [
        "hj212_device_mns_online",
        "hj212_frames_total",
        "hj212_ack_latency_seconds_bucket",
        "hj212_consumer_lag_records",
        "hj212_alarms_active",
        "hj212_alarms_raised_total",
        "hj212_store_size_bytes",
        "hj212_checkpoint_age_seconds",
        "hj212_witness_failures_total",
        "hj212_last_frame_timestamp_seconds",
        "process_resident_memory_bytes",
    ] {
        assert!(all.contains(needed), "the dashboard shows {needed}");
    }
}

/// The rules file's structure, as Prometheus reads it: groups of named rules,
/// each an alert with an expression, a severity and the two annotations.
/// Returns (alert name, expression).
fn check_rules(text: &str) -> Vec<(String, String)> {
    use yaml_rust2::{Yaml, YamlLoader};
    let docs = YamlLoader::load_from_str(text).expect("rules YAML parses");
    assert_eq!(docs.len(), 1, "one document");
    let top = docs[0].as_hash().expect("a mapping");
    assert_eq!(top.len(), 1, "only `groups`");
    let groups = docs[0]["groups"].as_vec().expect("groups: a list");
    let mut out = Vec::new();
    for g in groups {
        assert!(
            g["name"].as_str().is_some_and(|n| !n.is_empty()),
            "group name"
        );
        for r in g["rules"].as_vec().expect("rules: a list") {
            let h = r.as_hash().expect("a rule is a mapping");
            for k in h.keys() {
                let k = k.as_str().expect("string keys");
                assert!(
                    ["alert", "expr", "for", "labels", "annotations"].contains(&k),
                    "unexpected rule key {k}"
                );
            }
            let name = r["alert"].as_str().expect("alert name");
            assert!(
                name.starts_with("HJ212") && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "{name}"
            );
            let expr = r["expr"].as_str().expect("expr");
            if let Yaml::String(f) = &r["for"] {
                hj212_gateway::config::parse_duration(f)
                    .unwrap_or_else(|e| panic!("{name}: for: {e}"));
            } else {
                assert!(r["for"].is_badvalue(), "{name}: for is a duration string");
            }
            let severity = r["labels"]["severity"].as_str().expect("severity");
            assert!(
                ["critical", "warning"].contains(&severity),
                "{name}: {severity}"
            );
            for a in ["summary", "description"] {
                assert!(
                    r["annotations"][a].as_str().is_some(),
                    "{name}: annotations.{a}"
                );
            }
            assert!(!out.iter().any(|(n, _)| n == name), "{name} defined twice");
            out.push((name.to_owned(), expr.to_owned()));
        }
    }
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    for needed in [
        "HJ212GatewayDown",
        "HJ212StoreCommitsFailing",
        "HJ212DiskAlmostFull",
        "HJ212MqttBrokerDown",
        "HJ212ConsumerLagGrowing",
        "HJ212NoFrames",
        "HJ212CheckpointStale",
        "HJ212WitnessFailures",
    ] {
        assert!(names.contains(&needed), "{needed} missing from the rules");
    }
    out
}

/// `promtool check rules`, when Prometheus's tools are installed.
fn promtool(path: &Path) {
    match std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(path)
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!(
            "promtool check rules skipped: promtool not runnable ({e}); install Prometheus's tools (Debian: prometheus) to run it"
        ),
    }
}

async fn read_line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            return buf.drain(..i + 2).collect();
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(n > 0, "gateway closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    cond: impl Fn(&[(String, f64)]) -> bool,
) -> Vec<(String, f64)> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            let s = scrape_metrics(addr).await;
            if cond(&s) {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has(s: &[(String, f64)], series: &str) -> bool {
    s.iter().any(|(k, _)| k == series)
}

fn value(s: &[(String, f64)], series: &str) -> f64 {
    common::sample(s, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_query_only_what_the_gateway_exposes() {
    let dash_text = read_file("deploy/grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&dash_text).expect("dashboard JSON parses");
    check_dashboard(&dash);
    let rules_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus-rules.yml");
    let rules = check_rules(&read_file("deploy/prometheus-rules.yml"));
    promtool(&rules_path);

    // Every optional part on, so every series a query names can be present:
    // publisher and upstream (their peers down), detector, a witness.
    let (listen, metrics) = (free_port(), free_port());
    let (broker, platform, witness) = (free_port(), free_port(), free_port());
    let device = mn(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{listen}\"]\n[store]\nsync = \"off\"\n\
             [mqtt]\nenabled = true\nurl = \"mqtt://127.0.0.1:{broker}\"\nreconnect_max = \"500ms\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [evidence]\ncheckpoint_interval = \"1s\"\n\
             [[evidence.witness]]\nurl = \"http://127.0.0.1:{witness}\"\ntimeout = \"1s\"\n\
             [[upstream]]\nname = \"platform\"\naddr = \"127.0.0.1:{platform}\"\n\
             [[device]]\nmn = \"{device}\"\n"
        ),
    )
    .expect("write config");
    let data = dir.path().join("data");
    let _gw = Serve::run(&config, &data);
    let m: SocketAddr = format!("127.0.0.1:{metrics}").parse().expect("addr");
    let gw: SocketAddr = format!("127.0.0.1:{listen}").parse().expect("addr");
    let first = scrape_until(m, "the gateway to serve", |s| value(s, "hj212_up") == 1.0).await;
    assert_eq!(
        value(&first, "hj212_last_frame_timestamp_seconds"),
        0.0,
        "no frame yet"
    );

    // Three uploads whose DataTime is far from now: accepted and acked, and
    // three skewed frames in a row raise a time.skew alarm.
    let sent_at = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let mut dev = TcpStream::connect(gw).await.expect("connect");
    let mut buf = Vec::new();
    for n in 1..=3 {
        let frame = upload(&device, &qn(n), "123456");
        dev.write_all(&frame).await.expect("send");
        assert_eq!(read_line(&mut dev, &mut buf).await, expected_ack(&frame));
    }
    let acked_at = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;

    let s = scrape_until(m, "frame time, checkpoint, witness failure, alarm", |s| {
        has(s, "hj212_checkpoint_age_seconds")
            && s.iter()
                .any(|(k, v)| k.starts_with("hj212_witness_failures_total{") && *v >= 1.0)
            && value(s, "hj212_alarms_raised_total{kind=\"time.skew\"}") == 1.0
            && value(s, "hj212_alarms_active{kind=\"time.skew\"}") == 1.0
    })
    .await;
    let last = value(&s, "hj212_last_frame_timestamp_seconds");
    assert!(
        last >= sent_at.floor() - 1.0 && last <= acked_at + 1.0,
        "last frame at {last}, sent {sent_at}..{acked_at}"
    );
    assert_eq!(value(&s, "hj212_checkpoint_interval_seconds"), 1.0);
    assert!(value(&s, "process_start_time_seconds") <= sent_at);
    assert!(value(&s, "process_max_fds") >= value(&s, "process_open_fds"));

    // Label values: snake_case words, dot-separated where a vocabulary
    // namespaces them; never spaces.
    for (series, _) in &s {
        let (_, labels) = series_labels(series);
        for (k, v) in labels {
            if ["le", "version", "upstream", "witness"].contains(&k.as_str()) {
                continue;
            }
            let ok = v.split('.').all(|w| {
                !w.is_empty()
                    && w.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
            });
            assert!(ok, "{series}: {k}={v:?}");
        }
    }

    // Every series a query names is in the scrape, with its exact label values.
    let mut checked = BTreeSet::new();
    let exprs = dashboard_exprs(&dash)
        .into_iter()
        .map(|e| ("dashboard".to_owned(), e))
        .chain(rules.into_iter());
    for (whose, expr) in exprs {
        for (name, labels) in selectors(&expr) {
            let found = s.iter().any(|(series, _)| {
                let (n, have) = series_labels(series);
                n == name && labels.iter().all(|l| have.contains(l))
            });
            assert!(
                found,
                "{whose}: {name}{labels:?} is not in /metrics (from {expr})"
            );
            checked.insert(name);
        }
    }
    assert!(checked.len() >= 30, "{checked:?}");
    eprintln!("{} metric names checked against /metrics", checked.len());
}

#[test]
fn selectors_are_extracted_with_their_exact_labels() {
    let got = selectors(
        "hj212_mqtt_connected == 0 and on(instance) hj212_consumer_lag_records{consumer=\"mqtt\", instance=~\"$i\"} \
         / rate(process_cpu_seconds_total[5m]) + xhj212_not_one",
    );
    assert_eq!(
        got,
        vec![
            ("hj212_mqtt_connected".to_owned(), vec![]),
            (
                "hj212_consumer_lag_records".to_owned(),
                vec![("consumer".to_owned(), "mqtt".to_owned())]
            ),
            ("process_cpu_seconds_total".to_owned(), vec![]),
        ]
    );
}
