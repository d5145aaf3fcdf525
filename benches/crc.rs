//! CRC and framing throughput on one core. Run: `cargo bench --bench crc`.
//!
//! Prints MB/s (10^6 bytes per second) for the HJ 212 CRC over realistic data
//! segments and over a 1 MiB buffer, and MB/s plus frames/s for
//! `framing::cut` over a long stream of fixture frames; and the per-frame
//! latency of `cut` as percentiles.

use std::hint::black_box;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hj212_gateway::protocol::crc;
use hj212_gateway::protocol::framing::{Cut, FramerConfig, cut};

/// (frame bytes, strictly valid) for every fixture.
fn fixtures() -> Vec<(Vec<u8>, bool)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/frames.jsonl");
    std::fs::read_to_string(path)
        .expect("fixtures")
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            let frame = v["frame"].as_str().expect("frame").as_bytes().to_vec();
            (frame, v["valid"].as_bool() == Some(true))
        })
        .collect()
}

/// Runs `f` repeatedly for about `for_at_least`, returns (iterations, elapsed).
fn run(for_at_least: Duration, mut f: impl FnMut()) -> (u64, Duration) {
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < for_at_least {
        for _ in 0..64 {
            f();
        }
        n += 64;
    }
    (n, start.elapsed())
}

fn mb_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e6
}

fn main() {
    let time = Duration::from_millis(1500);
    let fx = fixtures();
    let all: Vec<Vec<u8>> = fx.iter().map(|(f, _)| f.clone()).collect();
    let valid: Vec<Vec<u8>> = fx
        .iter()
        .filter(|(_, v)| *v)
        .map(|(f, _)| f.clone())
        .collect();

    // Data segments of 300..=1000 bytes cut from the real frames.
    let segments: Vec<&[u8]> = all
        .iter()
        .filter(|f| f.starts_with(b"##") && f.len() >= 312 && f.len() <= 1012)
        .map(|f| &f[6..f.len() - 6])
        .collect();
    let seg_bytes: u64 = segments.iter().map(|s| s.len() as u64).sum();
    let (n, t) = run(time, || {
        for s in &segments {
            black_box(crc::hj212(black_box(s)));
        }
    });
    let (n0, t0) = run(time, || {
        for s in &segments {
            black_box(crc::hj212_bytewise(black_box(s)));
        }
    });
    println!(
        "crc::hj212_bytewise (before) segments:            {:>8.0} MB/s",
        mb_per_s(seg_bytes * n0, t0)
    );
    println!(
        "crc::hj212  {} segments of 300..1000 B (avg {} B): {:>8.0} MB/s",
        segments.len(),
        seg_bytes / segments.len() as u64,
        mb_per_s(seg_bytes * n, t)
    );

    let mut big = Vec::with_capacity(1 << 20);
    while big.len() < 1 << 20 {
        big.extend_from_slice(&all[big.len() % all.len()]);
    }
    big.truncate(1 << 20);
    let (n, t) = run(time, || {
        black_box(crc::hj212(black_box(&big)));
    });
    println!(
        "crc::hj212  1 MiB buffer:                        {:>8.0} MB/s",
        mb_per_s((1 << 20) * n, t)
    );
    let (n, t) = run(time, || {
        black_box(crc::hj212_bytewise(black_box(&big)));
    });
    println!(
        "crc::hj212_bytewise (before) 1 MiB buffer:        {:>8.0} MB/s",
        mb_per_s((1 << 20) * n, t)
    );
    let (n, t) = run(time, || {
        black_box(crc::modbus(black_box(&big)));
    });
    println!(
        "crc::modbus 1 MiB buffer:                        {:>8.0} MB/s",
        mb_per_s((1 << 20) * n, t)
    );

    // A long stream of every fixture, repeated: the mix a real port sees is
    // mostly well-formed frames, so also time the valid-only stream.
    let cfg = FramerConfig::default();
    for (label, corpus) in [("all fixtures", &all), ("valid frames only", &valid)] {
        let mut stream = Vec::new();
        while stream.len() < 8 << 20 {
            for f in corpus {
                stream.extend_from_slice(f);
            }
        }
        let (passes, t) = run(time, || {
            let mut pos = 0;
            while pos < stream.len() {
                let item = cut(black_box(&stream[pos..]), true, &cfg).expect("eof");
                pos += item.len();
            }
        });
        // Latency per item, timed separately so the clock reads do not slow the
        // throughput figure.
        let mut hist = Histogram::<u64>::new(3).expect("histogram");
        let mut frames = 0u64;
        let mut pos = 0;
        while pos < stream.len() {
            let t0 = Instant::now();
            let item = cut(black_box(&stream[pos..]), true, &cfg).expect("eof");
            hist.record(t0.elapsed().as_nanos() as u64).expect("record");
            frames += u64::from(matches!(item, Cut::Frame { .. }));
            pos += item.len();
        }
        println!(
            "framing::cut over {label} ({:.1} MB stream x {passes}): {:>6.0} MB/s, {:>9.0} frames/s; \
             ns per item P50 {} P90 {} P99 {} P99.9 {} max {}",
            stream.len() as f64 / 1e6,
            mb_per_s(stream.len() as u64 * passes, t),
            (frames * passes) as f64 / t.as_secs_f64(),
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.9),
            hist.value_at_quantile(0.99),
            hist.value_at_quantile(0.999),
            hist.max()
        );
    }
}
