//! Frame log throughput and latency.
//!
//! `cargo bench --bench store` runs, for synchronous FULL and NORMAL and batch_max
//! 1/64/512, 200 concurrent tasks appending realistic frames for a fixed time, and
//! prints appends/s, transactions and append latency percentiles (ack after commit).
//! A `lone` run (one task, FULL, defaults) shows the latency of a record at low load.
//! Then it builds a log of 1 million records and times `verify_chain` over it.
//!
//! Environment: `STORE_BENCH_SECS` (default 5) seconds per append run,
//! `STORE_BENCH_VERIFY` (default 1000000) records for the verify run,
//! `STORE_BENCH_DIR` where to put the files (default: a temp dir),
//! `STORE_BENCH_TASKS` concurrent appending tasks (default 200),
//! `STORE_BENCH_DELAY_MS` the writer's batch_delay (default 2),
//! `STORE_BENCH_ONLY` e.g. `full-512,normal-64` to run only some append configurations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use hj212_gateway::store::{
    Direction, Kind, NewRecord, Store, StoreConfig, SyncMode, Verdict, verify_chain,
};

const TASKS: usize = 200;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A 2017 real-time data frame (~300 bytes) and its decoded document.
fn record(device: usize, n: u64) -> NewRecord {
    let mn = format!("0100000A89000{device:04}F0001");
    let qn = format!("20261128{:09}", n);
    let body = format!(
        "QN={qn};ST=32;CN=2011;PW=123456;MN={mn};Flag=5;CP=&&DataTime=20261128130501;\
         a01012-Rtd=12.50,a01012-Flag=N;a01011-Rtd=3.201,a01011-Flag=N;a34013-Rtd=21.7,\
         a34013-Flag=N;a21026-Rtd=35.100,a21026-Flag=N;a21002-Rtd=88.2,a21002-Flag=N&&"
    );
    let raw = format!("##{:04}{body}ABCD\r\n", body.len());
    let doc = format!(
        r#"{{"schema":"hj212.frame.v1","kind":"frame","dialect":"2017","qn":"{qn}","st":"32","cn":"2011","mn":"{mn}","cp":{{"DataTime":"2026-11-28T13:05:01+08:00","a01012":{{"Rtd":12.50,"Flag":"N"}},"a01011":{{"Rtd":3.201,"Flag":"N"}},"a34013":{{"Rtd":21.7,"Flag":"N"}},"a21026":{{"Rtd":35.100,"Flag":"N"}},"a21002":{{"Rtd":88.2,"Flag":"N"}}}}}}"#
    );
    NewRecord {
        received_at_ms: 1_795_870_701_000 + n as i64,
        peer: format!("10.1.{}.{}:40001", device / 250, device % 250),
        session: device as u64,
        direction: Direction::In,
        kind: Kind::Frame,
        raw: Bytes::from(raw),
        dialect: Some("2017".into()),
        st: Some("32".into()),
        cn: Some("2011".into()),
        mn: Some(mn),
        qn: Some(qn),
        data_time: Some("2026-11-28T13:05:01+08:00".into()),
        verdict: Verdict::Accepted,
        findings: "[]".into(),
        doc,
        doc_stored: true,
    }
}

fn append_run(dir: &std::path::Path, sync: SyncMode, batch_max: usize, tasks_n: usize, secs: u64) {
    let path = dir.join(format!("append-{sync:?}-{batch_max}.sqlite"));
    let _ = std::fs::remove_file(&path);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg = StoreConfig {
        sync,
        batch_max,
        batch_delay: Duration::from_millis(env_num("STORE_BENCH_DELAY_MS", 2)),
        ..StoreConfig::new(&path)
    };
    let (handle, join) = Store::open(cfg).unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let hist = rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..tasks_n {
            let h = handle.clone();
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let rec = record(t, n * tasks_n as u64 + t as u64);
                    let t0 = Instant::now();
                    h.append(rec).await.unwrap();
                    hist.saturating_record(t0.elapsed().as_micros() as u64);
                    n += 1;
                }
                hist
            }));
        }
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for t in tasks {
            all.add(t.await.unwrap()).unwrap();
        }
        all
    });
    let elapsed = started.elapsed();
    let stats = handle.stats();
    drop(handle);
    join.join().unwrap();
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "append sync={:<6} batch_max={:<3} tasks={tasks_n:<3}: {:>8.0} appends/s  {:>7} records {:>6} commits (avg batch {:>5.1}, max {:>3})  latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        format!("{sync:?}"),
        batch_max,
        stats.records_committed as f64 / elapsed.as_secs_f64(),
        stats.records_committed,
        stats.commits,
        stats.records_committed as f64 / stats.commits.max(1) as f64,
        stats.largest_batch,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        hist.max() as f64 / 1000.0,
    );
    let _ = std::fs::remove_file(&path);
}

fn verify_run(dir: &std::path::Path, n: u64) {
    let path = dir.join("verify.sqlite");
    let _ = std::fs::remove_file(&path);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg = StoreConfig {
        sync: SyncMode::Off,
        batch_max: 4096,
        ..StoreConfig::new(&path)
    };
    let (handle, join) = Store::open(cfg).unwrap();
    let handle = Arc::new(handle);
    let t0 = Instant::now();
    rt.block_on(async {
        let chunk = 1000u64;
        let mut tasks = Vec::new();
        for w in 0..4u64 {
            let h = Arc::clone(&handle);
            tasks.push(tokio::spawn(async move {
                let mut i = w * chunk;
                while i < n {
                    let recs = (i..(i + chunk).min(n))
                        .map(|k| record((k % 500) as usize, k))
                        .collect();
                    h.append_many(recs).await.unwrap();
                    i += 4 * chunk;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    drop(handle);
    join.join().unwrap();
    let build = t0.elapsed();
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let t1 = Instant::now();
    let report = verify_chain(&path).unwrap();
    let took = t1.elapsed();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records_checked, n);
    println!(
        "verify_chain: {} records ({:.0} MiB) in {:.2} s = {:.0} records/s  (building the log with sync=OFF took {:.1} s = {:.0} appends/s)",
        report.records_checked,
        size as f64 / (1024.0 * 1024.0),
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        build.as_secs_f64(),
        n as f64 / build.as_secs_f64(),
    );
    let _ = std::fs::remove_file(&path);
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and should not
    // spend minutes here.
    if !std::env::args().any(|a| a == "--bench") {
        println!("store bench: run with `cargo bench --bench store`");
        return;
    }
    let secs = env_num("STORE_BENCH_SECS", 5);
    let verify_n = env_num("STORE_BENCH_VERIFY", 1_000_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("STORE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let only = std::env::var("STORE_BENCH_ONLY").unwrap_or_default();
    let tasks = env_num("STORE_BENCH_TASKS", TASKS as u64) as usize;
    for sync in [SyncMode::Full, SyncMode::Normal] {
        for batch_max in [1, 64, 512] {
            let name = format!("{sync:?}-{batch_max}").to_lowercase();
            if !only.is_empty() && !only.split(',').any(|o| o == name) {
                continue;
            }
            append_run(&dir, sync, batch_max, tasks, secs);
        }
    }
    // Low load: one session appending back to back (each record is a lone batch).
    if only.is_empty() || only.split(',').any(|o| o == "lone") {
        append_run(&dir, SyncMode::Full, 512, 1, secs);
    }
    if verify_n > 0 {
        verify_run(&dir, verify_n);
    }
}
