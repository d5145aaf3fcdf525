//! What a session does per inbound frame between the read and the store
//! queue: decode, the frame's log record, its ack and the ack's log record,
//! and the JSON check `append_many` runs on each record's doc and findings.
//!
//! Two paths over the same frames, so one run shows the difference:
//! - `decode-path`: the ack decoded back to build its record, decoder options
//!   rebuilt per read, both records' JSON re-parsed with serde (how sessions
//!   worked before and what debug builds still check);
//! - `session`: the same steps called one by one (`reply::ack_frame`, cached
//!   options, `json::well_formed`);
//! - `ingest core`: what a session does per read of one frame: the codec
//!   cuts it and `ingest::ingest` turns it into records and the reply.
//!
//! Frames: the fixture corpus with the ack bit set where it has a Flag, and a
//! simulator-like 2017 real-time upload of ~500 bytes.
//!
//! Run: `cargo bench --bench session`

use std::time::Instant;

use bytes::Bytes;
use bytes::BytesMut;
use hj212_gateway::codec::Hj212Codec;
use hj212_gateway::config::Config;
use hj212_gateway::downlink::Devices;
use hj212_gateway::ingest::{self, Hooks, Input, Now, Policy, decode_options, frame_record};
use hj212_gateway::protocol::{self, Frame, Options, json, reply};
use hj212_gateway::registry::Registry;
use hj212_gateway::store::{Direction, NewRecord};

fn corpus() -> Vec<Bytes> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/frames.jsonl"
    ))
    .unwrap();
    let opts = Options::new(chrono::Utc::now());
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["valid"].as_bool() != Some(true) {
            continue;
        }
        let f = protocol::decode(
            Bytes::from(v["frame"].as_str().unwrap().as_bytes().to_vec()),
            &opts,
            &(),
        );
        match (f.header.flag, f.encryption) {
            (Some(flag), None) => {
                let seg = &f.segment[..];
                let mut s = seg[..flag.start()].to_vec();
                s.extend_from_slice((f.flag.unwrap_or(0) | 1).to_string().as_bytes());
                s.extend_from_slice(&seg[flag.end()..]);
                out.push(reply::envelope(&s));
            }
            _ => out.push(f.raw),
        }
    }
    out
}

/// A 2017 real-time upload like `simulate` sends (flue gas, ~500 bytes, ack bit).
fn simulated() -> Bytes {
    let now = chrono::Utc::now().with_timezone(&protocol::time::beijing());
    let mut cp = format!("DataTime={}", now.format("%Y%m%d%H%M%S"));
    for (i, code) in [
        "a21026", "a21002", "a34013", "a19001", "a01011", "a01012", "a01013", "a01014", "a00000",
        "a21005",
    ]
    .iter()
    .enumerate()
    {
        cp.push_str(&format!(
            ";{code}-Rtd={}.{},{code}-ZsRtd={}.{},{code}-Flag=N",
            10 + i,
            25,
            12 + i,
            5
        ));
    }
    let seg = format!(
        "QN={};ST=31;CN=2011;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&{cp}&&",
        now.format("%Y%m%d%H%M%S%3f")
    );
    reply::envelope(seg.as_bytes())
}

fn serde_ok(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// Before: options per read, the ack decoded back, serde re-parses.
fn decode_path(cfg: &Config, raw: &Bytes) -> Vec<NewRecord> {
    let opts = decode_options(cfg, chrono::Utc::now());
    let f = protocol::decode(raw.clone(), &opts, &());
    let mut recs = vec![frame_record(
        &f,
        "127.0.0.1:40000",
        1,
        Direction::In,
        1,
        true,
    )];
    if let Some(ack) = reply::ack(&f) {
        let out = protocol::decode(ack, &opts, &());
        recs.push(frame_record(
            &out,
            "127.0.0.1:40000",
            1,
            Direction::Out,
            1,
            true,
        ));
    }
    for r in &recs {
        assert!(serde_ok(&r.doc) && serde_ok(&r.findings));
    }
    recs
}

/// Now: cached options, the ack's frame built directly, structural checks.
fn session_path(opts: &mut Options, raw: &Bytes) -> Vec<NewRecord> {
    opts.now = chrono::Utc::now();
    let f: Frame = protocol::decode(raw.clone(), opts, &());
    let mut recs = vec![frame_record(
        &f,
        "127.0.0.1:40000",
        1,
        Direction::In,
        1,
        true,
    )];
    if let Some(ack) = reply::ack_frame(&f, opts) {
        recs.push(frame_record(
            &ack,
            "127.0.0.1:40000",
            1,
            Direction::Out,
            1,
            true,
        ));
    }
    for r in &recs {
        assert!(
            json::well_formed(r.doc.as_bytes(), b'{')
                && json::well_formed(r.findings.as_bytes(), b'[')
        );
    }
    recs
}

/// A session alone on the network: nobody else holds an MN.
struct Alone;

impl Hooks for Alone {
    fn conflicting(&mut self, _: &Frame, _: &str, _: i64) -> Option<String> {
        None
    }
}

/// The core as a session calls it for a read that holds one frame.
fn ingest_path(cfg: &Config, opts: &Options, devices: &Devices, raw: &Bytes) -> Vec<NewRecord> {
    let mut buf = BytesMut::from(&raw[..]);
    let mut codec = Hj212Codec::default();
    let mut items = Vec::with_capacity(1);
    while let Ok(Some(item)) = tokio_util::codec::Decoder::decode(&mut codec, &mut buf) {
        items.push(item);
    }
    let registry = Registry::default();
    let policy = Policy::new(cfg, opts, devices, "127.0.0.1:40000", 1, &[]);
    let input = Input {
        items,
        end: false,
        ack: true,
    };
    let mut conn = ingest::Conn::default();
    let b: ingest::Batch<()> = ingest::ingest(
        &mut conn,
        input,
        Now::read(),
        &registry,
        &policy,
        None,
        &mut Alone,
    );
    for r in &b.records {
        assert!(
            json::well_formed(r.doc.as_bytes(), b'{')
                && json::well_formed(r.findings.as_bytes(), b'[')
        );
    }
    b.records
}

fn run(name: &str, frames: &[Bytes], mut f: impl FnMut(&Bytes) -> Vec<NewRecord>) {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed().as_secs_f64() < 1.0 {
            for raw in frames {
                std::hint::black_box(f(raw));
                n += 1;
            }
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
    println!("{name:<40} {best:8.0} ns/frame (best of 3 one-second rounds)");
}

fn main() {
    let mut cfg = Config::default();
    // Live traffic: device clocks near the receive time (the fixtures span
    // 2004-2026; stale findings everywhere would measure their formatting).
    cfg.validation.stale_after =
        hj212_gateway::config::Dur(std::time::Duration::from_secs(1 << 40));
    cfg.validation.future_tolerance =
        hj212_gateway::config::Dur(std::time::Duration::from_secs(1 << 40));
    let corpus = corpus();
    let acked = corpus
        .iter()
        .filter(|r| {
            reply::ack(&protocol::decode(
                (*r).clone(),
                &Options::new(chrono::Utc::now()),
                &(),
            ))
            .is_some()
        })
        .count();
    println!(
        "corpus: {} valid fixture frames, {acked} of them acked",
        corpus.len()
    );
    let sim = vec![simulated()];
    println!("simulated upload: {} bytes", sim[0].len());
    // The check `append_many` runs on each record, alone.
    let mut o = decode_options(&cfg, chrono::Utc::now());
    let recs: Vec<NewRecord> = corpus
        .iter()
        .flat_map(|r| session_path(&mut o, r))
        .collect();
    let bytes: usize = recs.iter().map(|r| r.doc.len() + r.findings.len()).sum();
    for (name, check) in [
        (
            "validate: serde parse",
            (|t: &str, _: u8| serde_ok(t)) as fn(&str, u8) -> bool,
        ),
        ("validate: json::well_formed", |t: &str, o: u8| {
            json::well_formed(t.as_bytes(), o)
        }),
    ] {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed().as_secs_f64() < 1.0 {
            for r in &recs {
                assert!(std::hint::black_box(
                    check(&r.doc, b'{') && check(&r.findings, b'[')
                ));
                n += 1;
            }
        }
        let ns = t.elapsed().as_secs_f64() * 1e9 / n as f64;
        println!(
            "{name:<40} {ns:8.0} ns/record (mean doc+findings {} bytes)",
            bytes / recs.len()
        );
    }
    for (label, frames) in [("fixtures", &corpus), ("simulated 2017", &sim)] {
        run(&format!("{label}: decode-path"), frames, |r| {
            decode_path(&cfg, r)
        });
        let mut opts = decode_options(&cfg, chrono::Utc::now());
        run(&format!("{label}: session"), frames, |r| {
            session_path(&mut opts, r)
        });
        let devices = Devices::new(None, 1024);
        run(&format!("{label}: ingest core"), frames, |r| {
            ingest_path(&cfg, &opts, &devices, r)
        });
    }
}
