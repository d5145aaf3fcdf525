//! The alarm detector's cost per record, on records as the gateway stores them:
//! 2017 CN=2011 frames built the way `simulate` sends them (500 bytes, flue gas
//! and waste water alternating, ~20 values each), decoded by the protocol core
//! and turned into the stored JSON document as a session does.
//!
//! Measures, per record, in the steady state (every device's windows full):
//! - `from_record`: `Obs::from_record` on a record of the commit feed (the
//!   session's document and findings text -> observation);
//! - `from_file`: `Obs::from_record` on the same record read back from the log,
//!   which keeps it without its document (the raw bytes decoded again);
//!   `from_file-doc` the same records the way the detector read them before
//!   issue 23 session 16: the document rebuilt from the raw bytes, then read;
//! - `observe`: `Engine::observe` on a ready observation;
//! - `feed`: `Feeder::feed`, what the detector task does per record (both of the above
//!   plus the clock tick);
//! - `observe-new`: `Engine::observe` with the detectors of issue 24 ([`NEW_DETECTORS`])
//!   off: `observe` minus this is what they cost per record.
//!
//! 1000 devices report round-robin, 30 s apart per device; values vary as
//! `simulate`'s do, so no alarm fires and the detectors' quiet path is measured.
//! Like `simulate`'s loggers, each device also sends the 2051 of every minute
//! (and the 2061 of the hour) aggregated from its own samples, so the
//! consistency detectors (`aggregate.mismatch`, `emission.mismatch`) judge real
//! aggregates; `observe-cons` is `observe` minus the same engine with those two
//! disabled: what they cost per record.
//!
//! Last, `hostile` rows: one frame each of the largest CP a frame holds, ~750
//! factors or one factor of ~600 values, and of half that size, against an
//! ordinary frame (medians of single runs): the detector's work per item must
//! stay linear (twice the items, twice the time).
//!
//! Run: `cargo bench --bench alarm`

use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use hj212_gateway::alarm::engine::Engine;
use hj212_gateway::alarm::task::Feeder;
use hj212_gateway::alarm::{AlarmEvent, Obs, Val};
use hj212_gateway::cmd::simulate::fleet::{self, Edition, Kind, Logger};
use hj212_gateway::config::Config;
use hj212_gateway::protocol::build::{self, Civil, Head};
use hj212_gateway::protocol::{self, Options};
use hj212_gateway::store::{Appended, Direction, StoredRecord};

// The gateway's allocator (src/main.rs): allocation cost is part of the detector's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEVICES: u64 = 1000;
const SEED: u64 = 212;
const FRAME_SIZE: usize = 500;
/// Per-device cadence of the series (ms).
const CADENCE_MS: i64 = 30_000;
/// Rounds (one record per device) fed before measuring: fills the spike windows
/// (`spike_window` = 60) and every other run.
const WARMUP_ROUNDS: u64 = 70;
/// Rounds measured.
const ROUNDS: u64 = 150;
/// Beijing time, as `simulate` sends by default.
const TZ_S: i32 = 8 * 3600;
/// The detectors issue 24 added, measured together by switching them off.
const NEW_DETECTORS: &[&str] = &[
    "aggregate.mismatch",
    "emission.mismatch",
    "series.copied",
    "device.cloned",
    "digits.biased",
];

/// What one record of a round is.
#[derive(Clone, Copy)]
enum What {
    Realtime,
    /// The logger's minute (0) or hour (1) closing, stamped with its start.
    Close(usize, i64),
}

/// One round: one 2011 record per device at `round` (and after every second
/// round the minute's 2051, after the 120th the hour's 2061), stored as a
/// session stores it.
fn round_records(
    round: u64,
    seq: &mut u64,
    rngs: &mut [u64],
    loggers: &mut [Logger],
) -> Vec<StoredRecord> {
    // A full hour: every minute of the measured rounds is whole.
    let t0 = 1_779_998_400_000i64;
    let mut out = Vec::with_capacity(DEVICES as usize);
    let mut buf = Vec::with_capacity(1024);
    let mut jobs = Vec::with_capacity(DEVICES as usize * 2);
    for index in 0..DEVICES {
        // Devices spread over the cadence, as a real fleet's phases are.
        let at = t0 + round as i64 * CADENCE_MS + (index as i64 * CADENCE_MS) / DEVICES as i64;
        jobs.push((index, at, What::Realtime));
        if round % 2 == 1 {
            let minute = t0 + (round as i64 - 1) * CADENCE_MS;
            jobs.push((index, at + 1, What::Close(0, minute)));
        }
        if round % 120 == 119 {
            let hour = t0 + (round as i64 - 119) * CADENCE_MS;
            jobs.push((index, at + 2, What::Close(1, hour)));
        }
    }
    for (index, at, what) in jobs {
        let kind = if index % 2 == 0 {
            Kind::Air
        } else {
            Kind::Water
        };
        let mn = fleet::mn("SIM", Edition::V2017, index);
        let qn = Civil::from_unix_ms(at, TZ_S).qn();
        let (cn, data_at) = match what {
            What::Realtime => (2011, at),
            What::Close(0, t) => (2051, t),
            What::Close(_, t) => (2061, t),
        };
        let head = Head {
            qn: Some(&qn[..]),
            st: kind.st(),
            cn,
            pw: "123456",
            mn: &mn,
            flag: Some(5),
            split: None,
        };
        buf.clear();
        let civil = Civil::from_unix_ms(data_at, TZ_S);
        let rng = &mut rngs[index as usize];
        let logger = &mut loggers[index as usize];
        build::device_frame(&mut buf, &head, None, |b| match what {
            What::Realtime => {
                b.extend_from_slice(b"DataTime=");
                civil.put_n14(b);
                logger.realtime(b, true, SEED, index, rng, 0, Some(FRAME_SIZE));
            }
            What::Close(level, _) => {
                b.extend_from_slice(b"DataTime=");
                civil.put_n14(b);
                let secs = if level == 0 { 60 } else { 3600 };
                logger.close(b, true, level, secs, SEED, index, rng, 0, Some(FRAME_SIZE));
            }
        });
        let now = chrono::DateTime::from_timestamp_millis(at + 40).expect("in range");
        let f = protocol::decode(Bytes::copy_from_slice(&buf), &Options::new(now), &());
        assert!(!f.has_error(), "simulated frame decodes cleanly");
        *seq += 1;
        // As ingest records it (an accepted frame keeps its document in the
        // commit feed, which is where the detector reads it from).
        let rec = hj212_gateway::ingest::frame_record(
            &f,
            "127.0.0.1:40000",
            index,
            Direction::In,
            at + 40,
            true,
        );
        out.push(StoredRecord::committed(
            rec,
            Appended {
                seq: *seq,
                duplicate: false,
            },
            [0; 32],
        ));
    }
    out
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds")
}

/// Per-record ns of a whole round (the round's time / its records): one sample per round.
fn report(name: &str, h: &Histogram<u64>, total: Duration, n: u64) {
    println!(
        "{name:13} {:8.0} ns/record (mean)  per-round p50 {:6} p90 {:6} p99 {:6} max {:6} ns/record",
        total.as_nanos() as f64 / n as f64,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.max()
    );
}

fn main() {
    let cfg = Config::parse("", std::path::Path::new("bench")).expect("default config");
    let mut feeder = Feeder::new(Engine::new(cfg.alarms.clone()));
    let mut without_new = cfg.alarms.clone();
    without_new.disabled = NEW_DETECTORS.iter().map(|k| (*k).to_owned()).collect();
    let mut engine_old = Engine::new(without_new);
    let mut without = cfg.alarms.clone();
    without.disabled = vec!["aggregate.mismatch".into(), "emission.mismatch".into()];
    let mut engine_without = Engine::new(without);
    let mut engine = Engine::new(cfg.alarms);
    let mut rngs: Vec<u64> = (0..DEVICES).map(|i| SEED ^ (i * 0x9E37_79B9)).collect();
    let logger = |index: u64| {
        let kind = if index % 2 == 0 {
            Kind::Air
        } else {
            Kind::Water
        };
        Logger::new(kind, Edition::V2017)
    };
    let mut loggers: Vec<Logger> = (0..DEVICES).map(logger).collect();
    let mut seq = 0;
    let sample = round_records(
        0,
        &mut 0,
        &mut rngs.clone(),
        &mut (0..DEVICES).map(logger).collect::<Vec<_>>(),
    );
    let (mut factors, mut numbers) = (0, 0);
    for o in sample.iter().filter_map(|r| Obs::from_record(r, false)) {
        factors += o.values.len();
        numbers += o
            .values
            .iter()
            .flat_map(|f| f.iter())
            .filter(|(_, v)| matches!(v, Val::Num(_)))
            .count();
    }
    // A reader that lost the numbers would make the detectors look free.
    assert!(numbers >= factors, "every factor has a number");
    println!(
        "{DEVICES} devices, 2017 CN=2011, mean frame {:.0} bytes, mean doc {:.0} bytes, {:.1} factors and {:.1} numbers per record",
        sample.iter().map(|r| r.raw.len()).sum::<usize>() as f64 / sample.len() as f64,
        sample.iter().map(|r| r.document().len()).sum::<usize>() as f64 / sample.len() as f64,
        factors as f64 / sample.len() as f64,
        numbers as f64 / sample.len() as f64,
    );

    let (mut h_parse, mut h_obs, mut h_feed) = (hist(), hist(), hist());
    let (mut t_parse, mut t_obs, mut t_feed) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut h_old, mut t_old) = (hist(), Duration::ZERO);
    let (mut h_file, mut t_file) = (hist(), Duration::ZERO);
    let (mut h_file_doc, mut t_file_doc) = (hist(), Duration::ZERO);
    let (mut h_without, mut t_without) = (hist(), Duration::ZERO);
    let mut events: Vec<AlarmEvent> = Vec::new();
    let mut measured = 0u64;
    for round in 0..WARMUP_ROUNDS + ROUNDS {
        let recs = round_records(round, &mut seq, &mut rngs, &mut loggers);
        let n = recs.len() as u64;
        let warm = round >= WARMUP_ROUNDS;

        let t = Instant::now();
        let obs: Vec<Obs> = recs
            .iter()
            .map(|r| Obs::from_record(r, false).expect("accepted inbound frame"))
            .collect();
        let dt = t.elapsed();
        if warm {
            t_parse += dt;
            h_parse.record(dt.as_nanos() as u64 / n).expect("in range");
        }

        // As the log's reader hands them over: no document column.
        let file: Vec<StoredRecord> = recs
            .iter()
            .map(|r| {
                let r = r.clone().as_read_back();
                assert!(
                    r.document_rebuilt(),
                    "a plain frame is kept without its document"
                );
                r
            })
            .collect();
        // The two ways in turn, the first alternating by round.
        for decoded in [round % 2 == 0, round % 2 == 1] {
            let t = Instant::now();
            for r in &file {
                let o = if decoded {
                    Obs::from_record(r, false)
                } else {
                    Obs::from_doc(
                        r.seq,
                        r.received_at_ms,
                        &r.document(),
                        &r.findings,
                        r.duplicate,
                        false,
                    )
                };
                std::hint::black_box(o.expect("accepted inbound frame"));
            }
            let dt = t.elapsed();
            if warm {
                let (t_sum, h) = if decoded {
                    (&mut t_file, &mut h_file)
                } else {
                    (&mut t_file_doc, &mut h_file_doc)
                };
                *t_sum += dt;
                h.record(dt.as_nanos() as u64 / n).expect("in range");
            }
        }

        // Both engines in turn, the first of them alternating by round: the
        // one that runs first reads the observations into the cache.
        for with in [round % 2 == 0, round % 2 == 1] {
            let (e, t_sum, h) = if with {
                (&mut engine, &mut t_obs, &mut h_obs)
            } else {
                (&mut engine_without, &mut t_without, &mut h_without)
            };
            let t = Instant::now();
            for o in &obs {
                std::hint::black_box(e.observe(o));
            }
            let dt = t.elapsed();
            if warm {
                *t_sum += dt;
                h.record(dt.as_nanos() as u64 / n).expect("in range");
            }
        }

        let t = Instant::now();
        for o in &obs {
            std::hint::black_box(engine_old.observe(o));
        }
        let dt = t.elapsed();
        if warm {
            t_old += dt;
            h_old.record(dt.as_nanos() as u64 / n).expect("in range");
        }

        let t = Instant::now();
        for r in &recs {
            events.extend(feeder.feed(r, false));
        }
        let dt = t.elapsed();
        if warm {
            t_feed += dt;
            h_feed.record(dt.as_nanos() as u64 / n).expect("in range");
            measured += n;
        }
    }
    println!(
        "{measured} records measured after {} warm-up; events raised: {}",
        WARMUP_ROUNDS * DEVICES,
        events.len()
    );
    let consistency = events
        .iter()
        .filter(|e| {
            matches!(
                e.key().kind.as_str(),
                "aggregate.mismatch" | "emission.mismatch"
            )
        })
        .count();
    println!("  of them aggregate.mismatch / emission.mismatch: {consistency}");
    for e in events.iter().take(5) {
        println!("  event: {:?}", e.key());
    }
    report("from_record", &h_parse, t_parse, measured);
    report("from_file", &h_file, t_file, measured);
    report("from_file-doc", &h_file_doc, t_file_doc, measured);
    report("observe", &h_obs, t_obs, measured);
    report("observe-w/o", &h_without, t_without, measured);
    println!(
        "observe-cons {:8.0} ns/record (mean): aggregate.mismatch + emission.mismatch",
        (t_obs.as_nanos() as f64 - t_without.as_nanos() as f64) / measured as f64
    );
    report("feed", &h_feed, t_feed, measured);
    report("observe-new", &h_old, t_old, measured);
    println!(
        "new detectors ({}): {:.0} ns/record (observe minus observe-new)",
        NEW_DETECTORS.join(", "),
        (t_obs.as_nanos() as f64 - t_old.as_nanos() as f64) / measured as f64
    );
    hostile(&sample[0]);
}

/// A frame whose CP is items written by `item` for as long as the data segment
/// stays within `limit` bytes (a frame's at most 9,999).
fn hostile_frame(limit: usize, item: impl Fn(&mut Vec<u8>, usize)) -> StoredRecord {
    let mn = fleet::mn("SIM", Edition::V2017, 0);
    let head = Head {
        qn: Some(&b"20260601000000000"[..]),
        st: "22",
        cn: 2011,
        pw: "123456",
        mn: &mn,
        flag: Some(5),
        split: None,
    };
    let mut buf = Vec::new();
    build::device_frame(&mut buf, &head, None, |b| {
        b.extend_from_slice(b"DataTime=20260601000000");
        let mut one = Vec::new();
        for i in 0.. {
            one.clear();
            one.push(b';');
            item(&mut one, i);
            // Room for the header and the closing `&&`.
            if b.len() + one.len() > limit {
                break;
            }
            b.extend_from_slice(&one);
        }
    });
    let now = chrono::DateTime::from_timestamp_millis(1_780_272_000_040).expect("in range");
    let f = protocol::decode(Bytes::copy_from_slice(&buf), &Options::new(now), &());
    assert!(
        !f.has_error(),
        "a hostile frame is a valid one: {:?}",
        f.findings
    );
    let rec = hj212_gateway::ingest::frame_record(
        &f,
        "127.0.0.1:40000",
        0,
        Direction::In,
        1_780_272_000_040,
        true,
    );
    StoredRecord::committed(
        rec,
        Appended {
            seq: 1,
            duplicate: false,
        },
        [0; 32],
    )
}

/// What one frame of the largest CP a frame holds costs the detector, against
/// an ordinary one: the per-item work must stay linear (issue 23).
fn hostile(normal: &StoredRecord) {
    const RUNS: usize = 101;
    let codes = |b: &mut Vec<u8>, i| b.extend_from_slice(format!("c{i}-Rtd=1.5").as_bytes());
    let suffixes = |b: &mut Vec<u8>, i| b.extend_from_slice(format!("a34013-s{i}=1.5").as_bytes());
    // Each at half the size too: linear work doubles, quadratic quadruples.
    let frames = [
        ("normal", normal.clone()),
        ("codes", hostile_frame(4_900, codes)),
        ("codes", hostile_frame(9_800, codes)),
        ("suffixes", hostile_frame(4_900, suffixes)),
        ("suffixes", hostile_frame(9_800, suffixes)),
    ];
    let cfg = Config::parse("", std::path::Path::new("bench")).expect("default config");
    for (name, rec) in frames {
        let file = rec.clone().as_read_back();
        let items = Obs::from_record(&rec, false)
            .expect("accepted")
            .values
            .iter()
            .map(|f| f.len())
            .sum::<usize>();
        let mut engine = Engine::new(cfg.alarms.clone());
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..RUNS {
            let t = Instant::now();
            let o = std::hint::black_box(Obs::from_record(&rec, false).expect("accepted"));
            times[0].push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(Obs::from_record(&file, false).expect("accepted"));
            times[1].push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(engine.observe(&o));
            times[2].push(t.elapsed());
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2].as_nanos()
        };
        println!(
            "hostile {name:9} {:5} bytes {items:5} values: from_record {:8} ns  from_file {:8} ns  observe {:8} ns (medians of {RUNS})",
            rec.raw.len(),
            median(&mut times[0]),
            median(&mut times[1]),
            median(&mut times[2]),
        );
    }
}
