//! Cost of the metrics. Run: `cargo bench --bench metrics`.
//!
//! 1. The per-frame instrumentation a session adds: `Metrics::frame` (verdict,
//!    bytes, findings), the ack-latency observation and the sent-bytes add, on
//!    one thread and on two threads hammering the same counters (the worst case
//!    for cache-line contention on this 2-core machine). The registry is reached
//!    through an `Arc`, as a session reaches its gateway's.
//! 2. Rendering one gateway's registry (no I/O).
//! 3. A whole scrape over HTTP (`GET /metrics`: store head, cursors and active
//!    alarms read from a real SQLite log of 100 k records, render, response)
//!    against an in-process gateway, as percentiles.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hj212_gateway::config::Config;
use hj212_gateway::daemon::{self, Overrides};
use hj212_gateway::metrics::{Exposition, Metrics, render_process};
use hj212_gateway::protocol::{Finding, Severity};
use hj212_gateway::store::{Direction, Kind, NewRecord, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn per_frame(m: &Arc<Metrics>, findings: &[Finding]) {
    let t = Instant::now();
    m.frame(true, black_box(512), findings);
    m.bytes_out.add(black_box(87));
    m.ack_seconds.observe_duration(t.elapsed(), 1);
}

fn bench_counters() {
    let m = Arc::new(Metrics::new());
    let none: Vec<Finding> = Vec::new();
    let one = vec![Finding::new("time.stale", Severity::Warning, "x")];
    for (label, f) in [("no findings", &none), ("one finding", &one)] {
        let n = 20_000_000u64;
        let start = Instant::now();
        for _ in 0..n {
            per_frame(black_box(&m), black_box(f));
        }
        let ns = start.elapsed().as_nanos() as f64 / n as f64;
        println!("per-frame instrumentation, 1 thread, {label}: {ns:.1} ns/frame");
    }
    let n = 10_000_000u64;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..n {
                    per_frame(black_box(&m), black_box(&none));
                }
            });
        }
    });
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("per-frame instrumentation, 2 threads contending: {ns:.1} ns/frame per thread");
}

fn bench_render() {
    let m = Metrics::new();
    let n = 2_000;
    let start = Instant::now();
    let mut len = 0;
    for _ in 0..n {
        let mut e = Exposition::new();
        m.render(&mut e);
        len = e.finish().len();
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("render one gateway's registry ({len} bytes): {us:.1} us");
    let start = Instant::now();
    for _ in 0..n {
        let mut e = Exposition::new();
        render_process(&mut e);
        black_box(e.finish());
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("read /proc/self figures: {us:.1} us");
}

fn record(i: u64) -> NewRecord {
    NewRecord {
        received_at_ms: 1_717_000_000_000 + i as i64,
        peer: "127.0.0.1:5000".into(),
        session: 1,
        direction: Direction::In,
        kind: Kind::Frame,
        raw: bytes::Bytes::from(format!("##0000QN={i};CN=2011\r\n")),
        dialect: Some("2017".into()),
        st: Some("31".into()),
        cn: Some("2011".into()),
        mn: Some("BENCHMN".into()),
        qn: Some(format!("{i:017}")),
        data_time: None,
        verdict: Verdict::Accepted,
        findings: "[]".into(),
        doc: "{}".into(),
        doc_stored: true,
    }
}

async fn bench_scrape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = "[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"off\"\n\
                [mqtt]\nenabled = true\nurl = \"mqtt://127.0.0.1:1\"\n\
                [metrics]\nlisten = \"127.0.0.1:0\"\n";
    let cfg = Config::parse(text, Path::new("bench")).expect("config");
    let o = Overrides {
        config: None,
        listen: Vec::new(),
        data: Some(dir.path().to_owned()),
    };
    let running = daemon::start(cfg, &o).await.expect("gateway");
    let addr = running.metrics_addr.expect("metrics");
    for chunk in 0..100u64 {
        let recs = (0..1000).map(|i| record(chunk * 1000 + i)).collect();
        running
            .shared
            .store
            .append_many(recs)
            .await
            .expect("append");
    }
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    let mut size = 0;
    for i in 0..1100 {
        let t = Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: b\r\n\r\n")
            .await
            .expect("send");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        assert!(out.starts_with(b"HTTP/1.1 200"));
        size = out.len();
        if i >= 100 {
            h.record(t.elapsed().as_micros() as u64).expect("record");
        }
    }
    println!(
        "GET /metrics over HTTP, 100 k-record log, {size} bytes: p50 {} us, p99 {} us, max {} us",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
    tokio::time::timeout(Duration::from_secs(30), running.stop())
        .await
        .expect("stop in time")
        .expect("stop");
}

fn main() {
    bench_counters();
    bench_render();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench_scrape());
}
