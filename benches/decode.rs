//! Full decode throughput on one core (framing, envelope, CRC, header, CP,
//! dialect, field and timestamp validation) over realistic frames from the
//! fixtures (2017 flue gas and waste water, 2005, long history records).
//! Also measures the JSON document built per frame at ingest, and the CP scan
//! against the same scan built from the nom grammar rules.
//!
//! Run: `cargo bench --bench decode`. For a profiler, one phase alone:
//! `DECODE_ONLY=<seconds>` runs the decode loop only, `DECODE_BENCH=cp` the CP
//! scan comparison only.

use std::time::Instant;

use bytes::Bytes;
use hj212_gateway::protocol::framing::{self, Cut, FramerConfig};
use hj212_gateway::protocol::{self, Options, cp, json};

// The gateway's allocator (src/main.rs): a decode allocates its pairs and
// findings, and what that costs in the gateway is what is measured.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn corpus() -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/frames.jsonl"
    ))
    .unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["valid"].as_bool() == Some(true) {
            out.push(v["frame"].as_str().unwrap().as_bytes().to_vec());
        }
    }
    out
}

fn main() {
    let frames = corpus();
    let mut stream = Vec::new();
    while stream.len() < 64 << 20 {
        for f in &frames {
            stream.extend_from_slice(f);
        }
    }
    let stream = Bytes::from(stream);
    let avg = stream.len() as f64
        / (stream.len() as f64
            / (frames.iter().map(Vec::len).sum::<usize>() as f64 / frames.len() as f64));
    // Live traffic: device clocks near the receive time, so no stale findings
    // (the fixtures span 2004-2026; flagging them all would measure
    // finding formatting, not decoding).
    let mut opts = Options::new(chrono::Utc::now());
    opts.stale_after_s = i64::MAX / 4;
    opts.future_tolerance_s = i64::MAX / 4;
    let cfg = FramerConfig::default();
    // `DECODE_BENCH=cp`: the CP scan alone.
    if std::env::var("DECODE_BENCH").as_deref() == Ok("cp") {
        cp_scan(&frames);
        return;
    }
    // `DECODE_ONLY=<seconds>`: nothing but the decode loop, for a profiler.
    if let Some(secs) = std::env::var("DECODE_ONLY")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        decode_only(&frames, &opts, secs);
        return;
    }
    println!(
        "corpus: {} valid fixture frames, mean {:.0} bytes; stream {} MiB",
        frames.len(),
        avg,
        stream.len() >> 20
    );

    for round in 0..3 {
        // framing + decode
        let t = Instant::now();
        let mut pos = 0;
        let mut n = 0u64;
        let mut errors = 0u64;
        while pos < stream.len() {
            let Some(cut) = framing::cut(&stream[pos..], true, &cfg) else {
                break;
            };
            let len = cut.len();
            if let Cut::Frame { .. } = cut {
                let f = protocol::decode(stream.slice(pos..pos + len), &opts, &());
                errors += f.has_error() as u64;
                n += 1;
            }
            pos += len;
        }
        let dt = t.elapsed().as_secs_f64();
        println!(
            "round {round}: frame+decode  {:8.1} MB/s  {:10.0} frames/s  ({n} frames, {errors} with errors)",
            stream.len() as f64 / dt / 1e6,
            n as f64 / dt
        );
    }
    // framing alone
    let t = Instant::now();
    let mut pos = 0;
    while pos < stream.len() {
        let Some(cut) = framing::cut(&stream[pos..], true, &cfg) else {
            break;
        };
        pos += cut.len();
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "framing only           {:8.1} MB/s",
        stream.len() as f64 / dt / 1e6
    );
    // decode alone (frames pre-cut)
    decode_only(&frames, &opts, 2.0);
    let sample: Vec<Bytes> = frames.iter().map(|f| Bytes::from(f.clone())).collect();
    // decode + JSON document (what a session does per frame besides I/O)
    let t = Instant::now();
    let mut bytes = 0usize;
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < 2.0 {
        for f in &sample {
            let d = protocol::decode(f.clone(), &opts, &());
            let doc = json::frame_doc(&d);
            bytes += f.len();
            n += 1;
            std::hint::black_box(doc);
        }
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "decode+json            {:8.1} MB/s  {:10.0} frames/s",
        bytes as f64 / dt / 1e6,
        n as f64 / dt
    );
    cp_scan(&frames);
}

/// Decoding alone, frames already cut, for `secs` seconds.
fn decode_only(frames: &[Vec<u8>], opts: &Options, secs: f64) {
    let sample: Vec<Bytes> = frames.iter().map(|f| Bytes::from(f.clone())).collect();
    let t = Instant::now();
    let mut bytes = 0usize;
    while t.elapsed().as_secs_f64() < secs {
        for f in &sample {
            std::hint::black_box(protocol::decode(f.clone(), opts, &()));
            bytes += f.len();
        }
    }
    println!(
        "decode only            {:8.1} MB/s",
        bytes as f64 / t.elapsed().as_secs_f64() / 1e6
    );
}

/// The CP scan alone: the hand-written fast path and the nom rules,
/// interleaved so that machine load hits both alike.
fn cp_scan(frames: &[Vec<u8>]) {
    let areas: Vec<(&[u8], usize, usize)> = frames
        .iter()
        .filter_map(|f| {
            let body = f.windows(5).position(|w| w == b"CP=&&")? + 5;
            let end = f
                .windows(2)
                .rposition(|w| w == b"&&")
                .filter(|&e| e >= body)?;
            Some((f.as_slice(), body, end))
        })
        .collect();
    let mut ns = [Vec::new(), Vec::new()];
    for _ in 0..15 {
        for (which, out) in ns.iter_mut().enumerate() {
            let t = Instant::now();
            for _ in 0..200 {
                for &(seg, start, end) in &areas {
                    let mut findings = Vec::new();
                    let pairs = if which == 0 {
                        cp::parse(seg, start, end, &mut findings)
                    } else {
                        cp::parse_grammar(seg, start, end, &mut findings)
                    };
                    std::hint::black_box((pairs, findings));
                }
            }
            out.push(t.elapsed().as_secs_f64() * 1e9 / (200 * areas.len()) as f64);
        }
    }
    for (name, mut v) in ["fast path", "nom rules"].into_iter().zip(ns) {
        v.sort_by(f64::total_cmp);
        println!(
            "CP scan, {name}    {:8.0} ns per CP area (median of {})",
            v[v.len() / 2],
            v.len()
        );
    }
}
