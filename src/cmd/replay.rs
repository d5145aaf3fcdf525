//! `replay`: audit captured traffic with the daemon's own validation, or send it to a
//! gateway as the devices would.
//!
//! Inputs are loaded by [`capture`](super::capture). Without `--to`, every frame goes
//! through [`protocol::decode`] with the options and registry policy a session applies
//! ([`decode_options`], [`apply_policy`]) and the findings are summed per MN. With
//! `--to`, each original connection (or each MN) gets its own TCP connection; a frame
//! that asks for an ack is answered before the next is sent (as a device waits), and
//! the time to its 9014/9013 is recorded in an HDR histogram. Ctrl-C stops the
//! sending and reports what was sent and acked until then (marked `interrupted`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::CmdError;
use super::capture::{self, Capture, Item, SourceKind};
use crate::alarm::engine::Engine;
use crate::alarm::task::Feeder;
use crate::alarm::{AlarmEvent, AlarmKey, Obs};
use crate::config::Config;
use crate::ingest::{apply_policy, decode_options};
use crate::protocol::framing::{self, Cut, FramerConfig};
use crate::protocol::{self, Frame, Options, Severity, finding::code, reply};
use crate::registry::Registry;
use crate::store::AlarmRow;

/// How frames are paced with `--to`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// Original inter-arrival times divided by `speed` (inputs without times: no wait).
    Original {
        /// Speed-up factor, > 0.
        speed: f64,
    },
    /// A fixed total rate, frames per second across all connections.
    Rate(f64),
}

/// How frames are grouped into connections with `--to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// One connection per original session (connection, stored session).
    Session,
    /// One connection per MN.
    Mn,
}

/// Options of `replay`.
#[derive(Debug, Clone)]
pub struct ReplayArgs {
    /// Input files or data directories.
    pub inputs: Vec<PathBuf>,
    /// Gateway to send to; `None` audits instead.
    pub to: Option<String>,
    /// Pacing with `--to`.
    pub pacing: Pacing,
    /// Grouping with `--to`.
    pub split: Split,
    /// How long to wait for an ack.
    pub ack_timeout: Duration,
    /// Server port for captures without handshakes.
    pub server_port: Option<u16>,
    /// Write the report as JSON here too.
    pub report: Option<PathBuf>,
    /// Devices, keys, thresholds (defaults when `None`).
    pub config: Option<Config>,
}

/// One input as loaded.
#[derive(Debug, Clone, Serialize)]
pub struct InputSummary {
    /// The path.
    pub path: String,
    /// What it was detected as.
    pub kind: SourceKind,
    /// Original connections found.
    pub streams: usize,
    /// Frames and junk items.
    pub items: usize,
    /// Reading problems that did not stop it.
    pub notes: Vec<String>,
}

/// DataTime continuity of one CN.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CnGaps {
    /// Distinct DataTimes seen.
    pub data_times: u64,
    /// The most common interval between consecutive DataTimes, seconds.
    pub typical_interval_s: Option<i64>,
    /// Intervals longer than 1.5 typical intervals.
    pub gaps: u64,
    /// Typical intervals missing inside those gaps.
    pub missing_intervals: u64,
    /// Frames whose DataTime was earlier than the one before it (arrival order).
    pub backwards: u64,
    /// The first few gaps: `[from, to]` as RFC 3339.
    pub examples: Vec<[String; 2]>,
}

/// Audit figures of one MN.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceAudit {
    /// The MN.
    pub mn: String,
    /// Frames.
    pub frames: u64,
    /// Frames the daemon would accept.
    pub accepted: u64,
    /// Frames the daemon would reject.
    pub rejected: u64,
    /// Rejected frames by error finding code.
    pub rejects_by_reason: BTreeMap<String, u64>,
    /// Frames per dialect.
    pub dialects: BTreeMap<String, u64>,
    /// Frames whose declared CRC is not the HJ 212 one nor allowed by policy.
    pub crc_failures: u64,
    /// Frames per CRC variant of the declared CRC.
    pub crc_variants: BTreeMap<String, u64>,
    /// `time.*` findings by code.
    pub timestamp_findings: BTreeMap<String, u64>,
    /// Retransmissions of an earlier (QN, CN) of this MN.
    pub duplicates: u64,
    /// Earliest DataTime.
    pub first_data_time: Option<String>,
    /// Latest DataTime.
    pub last_data_time: Option<String>,
    /// DataTime continuity per CN.
    pub gaps: BTreeMap<String, CnGaps>,
}

/// Totals over all inputs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Frames and junk items.
    pub items: u64,
    /// Frames.
    pub frames: u64,
    /// Junk items.
    pub junk_items: u64,
    /// Junk bytes.
    pub junk_bytes: u64,
    /// Would be accepted.
    pub accepted: u64,
    /// Would be rejected.
    pub rejected: u64,
    /// Frames without an MN.
    pub frames_without_mn: u64,
    /// Retransmissions.
    pub duplicates: u64,
    /// CRC failures.
    pub crc_failures: u64,
    /// Distinct MNs.
    pub devices: u64,
}

/// What `replay --to` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SendSummary {
    /// The gateway.
    pub to: String,
    /// Connections opened.
    pub connections: u64,
    /// Connections that failed (connect or write error).
    pub connection_errors: u64,
    /// Items written (frames and junk).
    pub sent: u64,
    /// Frames that asked for an ack.
    pub ack_requested: u64,
    /// Acks received.
    pub acked: u64,
    /// Acks not received within the timeout.
    pub timed_out: u64,
    /// Ack latency percentiles, microseconds: p50, p90, p99, p99.9, max.
    pub latency_us: BTreeMap<String, u64>,
    /// Wall time, seconds.
    pub elapsed_s: f64,
    /// Stopped by Ctrl-C (SIGINT): the figures are those up to that moment.
    pub interrupted: bool,
}

/// The whole report (`--report` writes it as JSON).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// Schema identifier.
    pub schema: &'static str,
    /// Inputs.
    pub inputs: Vec<InputSummary>,
    /// Totals.
    pub totals: Totals,
    /// Per MN, sorted.
    pub devices: Vec<DeviceAudit>,
    /// With `--to`.
    pub send: Option<SendSummary>,
    /// What the anomaly detectors (the daemon's, with `[alarms]` of `--config`) raise
    /// over the inputs, as `hj212.alarm.v1` documents; `seqs` are item numbers
    /// (1-based, in input order), `end` is null for alarms still active at the end.
    pub alarms: Vec<serde_json::Value>,
}

/// Loads the inputs, audits them, sends them if asked; prints the report to `out`.
/// Returns the report (`send` set with `--to`). A reader of `out` that goes away
/// (`replay x | head`) is not an error: the rest of the report is not printed,
/// and `--report` is still written.
pub fn run(args: &ReplayArgs, out: &mut dyn Write) -> Result<ReplayReport, CmdError> {
    if args.inputs.is_empty() {
        return Err(CmdError::Usage("replay needs at least one INPUT".into()));
    }
    let cfg = args.config.clone().unwrap_or_default();
    let registry = Registry::from_config(&cfg)?;
    let mut captures = Vec::new();
    for p in &args.inputs {
        let c = capture::load(p, &cfg, args.server_port)?;
        let items: usize = c.streams.iter().map(|s| s.items.len()).sum();
        let _ = writeln!(
            out,
            "{}: {} ({} connection(s), {} item(s))",
            p.display(),
            c.kind,
            c.streams.len(),
            items
        );
        for n in &c.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        captures.push(c);
    }
    let mut report = audit(&captures, &cfg, &registry);
    if let Some(to) = &args.to {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(CmdError::io("start the runtime"))?;
        report.send = Some(rt.block_on(send(&captures, to, args, &cfg))?);
    }
    match print(&report, out).and_then(|()| out.flush()) {
        Err(e) if !super::is_broken_pipe(&e) => {
            return Err(CmdError::io("write the report")(e));
        }
        _ => {}
    }
    if let Some(path) = &args.report {
        let text = serde_json::to_string_pretty(&report).expect("report serialises");
        std::fs::write(path, text + "\n").map_err(CmdError::io(path.display().to_string()))?;
    }
    Ok(report)
}

/// Decodes one item as a session would at `at_ms` (or now).
fn judge(bytes: &Bytes, at_ms: Option<i64>, cfg: &Config, registry: &Registry) -> Frame {
    let now = at_ms
        .and_then(chrono::DateTime::from_timestamp_millis)
        .unwrap_or_else(chrono::Utc::now);
    let opts = decode_options(cfg, now);
    let mut frame = protocol::decode(bytes.clone(), &opts, registry);
    apply_policy(&mut frame, registry, cfg.validation.unknown_device);
    frame
}

/// The audit without sending anything.
pub fn audit(captures: &[Capture], cfg: &Config, registry: &Registry) -> ReplayReport {
    let mut t = Totals::default();
    let mut devices: BTreeMap<String, DeviceAudit> = BTreeMap::new();
    let mut seen: HashSet<(String, String, String)> = HashSet::new();
    // (mn, cn) -> DataTimes in arrival order, UTC ms, with their text.
    let mut times: BTreeMap<(String, String), Vec<(i64, String)>> = BTreeMap::new();
    let mut inputs = Vec::new();
    let mut feeder = Feeder::new(Engine::new(cfg.alarms.clone()));
    let mut alarms = ReplayAlarms::default();
    for c in captures {
        inputs.push(InputSummary {
            path: c.path.display().to_string(),
            kind: c.kind,
            streams: c.streams.len(),
            items: c.streams.iter().map(|s| s.items.len()).sum(),
            notes: c.notes.clone(),
        });
        for item in c.streams.iter().flat_map(|s| &s.items) {
            t.items += 1;
            if item.junk {
                t.junk_items += 1;
                t.junk_bytes += item.bytes.len() as u64;
                continue;
            }
            t.frames += 1;
            let f = judge(&item.bytes, item.at_ms, cfg, registry);
            let accepted = !f.has_error();
            if accepted {
                t.accepted += 1;
            } else {
                t.rejected += 1;
            }
            let crc_failed = f
                .findings
                .iter()
                .any(|x| x.code == code::CRC_MISMATCH && x.severity == Severity::Error);
            t.crc_failures += u64::from(crc_failed);
            let Some(mn) = f.mn().filter(|m| !m.is_empty()) else {
                t.frames_without_mn += 1;
                continue;
            };
            let d = devices.entry(mn.to_owned()).or_insert_with(|| DeviceAudit {
                mn: mn.to_owned(),
                ..DeviceAudit::default()
            });
            d.frames += 1;
            if accepted {
                d.accepted += 1;
            } else {
                d.rejected += 1;
                for x in f.findings.iter().filter(|x| x.severity == Severity::Error) {
                    *d.rejects_by_reason.entry(x.code.to_owned()).or_default() += 1;
                }
            }
            *d.dialects
                .entry(f.dialect.map_or("?", |x| x.as_str()).to_owned())
                .or_default() += 1;
            d.crc_failures += u64::from(crc_failed);
            if f.crc.declared.is_some() {
                *d.crc_variants
                    .entry(f.crc.variant.as_str().to_owned())
                    .or_default() += 1;
            }
            for x in f.findings.iter().filter(|x| x.code.starts_with("time.")) {
                *d.timestamp_findings.entry(x.code.to_owned()).or_default() += 1;
            }
            let cn = f.cn().unwrap_or("").to_owned();
            if accepted && cfg.alarms.enabled {
                let dup = f
                    .qn()
                    .filter(|q| !q.is_empty())
                    .is_some_and(|q| seen.contains(&(mn.to_owned(), q.to_owned(), cn.clone())));
                let registered = registry.get(mn);
                let video = registered.is_some_and(|d| d.kind == crate::config::DeviceKind::Video);
                let at = item.at_ms.or(f.data_time.map(|d| d.timestamp_millis()));
                let findings = serde_json::to_string(&f.findings).unwrap_or_else(|_| "[]".into());
                let o = Obs::from_doc(
                    t.items,
                    at.unwrap_or(0),
                    &protocol::json::frame_doc(&f),
                    &findings,
                    dup,
                    video,
                )
                .map(|mut o| {
                    o.registered = registered.is_some();
                    o
                });
                // Without any time there is no clock: only value detectors can judge.
                let events = match at {
                    Some(at) => feeder.feed_obs(at, o.as_ref()),
                    None => o.map(|o| feeder.engine.observe(&o)).unwrap_or_default(),
                };
                alarms.apply(events);
            }
            if let Some(qn) = f.qn().filter(|q| !q.is_empty()) {
                if !seen.insert((mn.to_owned(), qn.to_owned(), cn.clone())) {
                    d.duplicates += 1;
                    t.duplicates += 1;
                    // A retransmission repeats its DataTime: not a data point.
                    continue;
                }
            }
            if let Some(dt) = f.data_time {
                let text = protocol::time::rfc3339(dt, f.data_time_ms);
                let ms = dt.timestamp_millis();
                let older = |cur: &Option<String>, later: bool| {
                    cur.as_ref()
                        .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
                        .is_none_or(|c| {
                            (c.timestamp_millis() > ms) != later && c.timestamp_millis() != ms
                        })
                };
                if older(&d.first_data_time, false) {
                    d.first_data_time = Some(text.clone());
                }
                if older(&d.last_data_time, true) {
                    d.last_data_time = Some(text.clone());
                }
                times
                    .entry((mn.to_owned(), cn))
                    .or_default()
                    .push((ms, text));
            }
        }
    }
    for ((mn, cn), list) in times {
        if let Some(d) = devices.get_mut(&mn) {
            d.gaps.insert(cn, gaps(&list));
        }
    }
    t.devices = devices.len() as u64;
    ReplayReport {
        schema: "hj212.replay.v1",
        inputs,
        totals: t,
        devices: devices.into_values().collect(),
        send: None,
        alarms: alarms.rows.iter().map(|r| r.to_json(None)).collect(),
    }
}

/// The alarms table of `replay`, in memory: same raise/clear rules as the store.
#[derive(Default)]
struct ReplayAlarms {
    rows: Vec<AlarmRow>,
    active: HashMap<AlarmKey, usize>,
}

impl ReplayAlarms {
    fn apply(&mut self, events: Vec<AlarmEvent>) {
        for e in events {
            match e {
                AlarmEvent::Raise(r) => {
                    if self.active.contains_key(&r.key) {
                        continue;
                    }
                    self.active.insert(r.key.clone(), self.rows.len());
                    self.rows.push(AlarmRow {
                        id: self.rows.len() as i64 + 1,
                        kind: r.key.kind.as_str().to_owned(),
                        severity: r.severity.as_str().to_owned(),
                        mn: r.key.mn,
                        factor: r.key.factor,
                        start_ms: r.start_ms,
                        end_ms: None,
                        seqs: r.seqs,
                        clear_seq: None,
                        message_zh: r.message_zh,
                        message_en: r.message_en,
                    });
                }
                AlarmEvent::Clear { key, end_ms, seq } => {
                    if let Some(i) = self.active.remove(&key) {
                        let row = &mut self.rows[i];
                        row.end_ms = Some(end_ms.max(row.start_ms));
                        row.clear_seq = seq;
                    }
                }
            }
        }
    }
}

/// Continuity of one CN's DataTimes.
fn gaps(list: &[(i64, String)]) -> CnGaps {
    let mut g = CnGaps {
        backwards: list.windows(2).filter(|w| w[1].0 < w[0].0).count() as u64,
        ..CnGaps::default()
    };
    let mut sorted: Vec<&(i64, String)> = list.iter().collect();
    sorted.sort_by_key(|x| x.0);
    sorted.dedup_by_key(|x| x.0);
    g.data_times = sorted.len() as u64;
    let mut freq: HashMap<i64, u64> = HashMap::new();
    for w in sorted.windows(2) {
        *freq.entry(w[1].0 - w[0].0).or_default() += 1;
    }
    // The most common interval; ties go to the shorter one.
    let Some(typical) = freq
        .iter()
        .max_by_key(|(iv, n)| (**n, std::cmp::Reverse(**iv)))
        .map(|(iv, _)| *iv)
    else {
        return g;
    };
    g.typical_interval_s = Some(typical / 1000);
    for w in sorted.windows(2) {
        let iv = w[1].0 - w[0].0;
        if iv * 2 > typical * 3 {
            g.gaps += 1;
            g.missing_intervals += (iv / typical.max(1)).saturating_sub(1) as u64;
            if g.examples.len() < 10 {
                g.examples.push([w[0].1.clone(), w[1].1.clone()]);
            }
        }
    }
    g
}

fn print(r: &ReplayReport, out: &mut dyn Write) -> std::io::Result<()> {
    let t = &r.totals;
    writeln!(
        out,
        "totals: {} items, {} frames ({} accepted, {} rejected), {} junk items ({} bytes), \
         {} duplicates, {} CRC failures, {} device(s), {} frames without MN",
        t.items,
        t.frames,
        t.accepted,
        t.rejected,
        t.junk_items,
        t.junk_bytes,
        t.duplicates,
        t.crc_failures,
        t.devices,
        t.frames_without_mn
    )?;
    let kv = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "-".to_owned()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    for d in &r.devices {
        writeln!(
            out,
            "MN {}: {} frames ({} accepted, {} rejected), {} duplicates; dialects {}; CRC {} ({} failures)",
            d.mn,
            d.frames,
            d.accepted,
            d.rejected,
            d.duplicates,
            kv(&d.dialects),
            kv(&d.crc_variants),
            d.crc_failures
        )?;
        writeln!(
            out,
            "  DataTime {} .. {}",
            d.first_data_time.as_deref().unwrap_or("-"),
            d.last_data_time.as_deref().unwrap_or("-")
        )?;
        if !d.rejects_by_reason.is_empty() {
            writeln!(out, "  rejects: {}", kv(&d.rejects_by_reason))?;
        }
        if !d.timestamp_findings.is_empty() {
            writeln!(out, "  timestamp findings: {}", kv(&d.timestamp_findings))?;
        }
        for (cn, g) in &d.gaps {
            writeln!(
                out,
                "  CN {cn}: {} DataTimes, typical interval {}, {} gap(s) ({} missing), {} backwards",
                g.data_times,
                g.typical_interval_s.map_or("-".into(), |s| format!("{s}s")),
                g.gaps,
                g.missing_intervals,
                g.backwards
            )?;
            for [a, b] in &g.examples {
                writeln!(out, "    gap {a} -> {b}")?;
            }
        }
    }
    let active = r.alarms.iter().filter(|a| a["end"].is_null()).count();
    writeln!(
        out,
        "alarms: {} ({active} active at the end)",
        r.alarms.len()
    )?;
    for a in &r.alarms {
        let s = |k: &str| a[k].as_str().unwrap_or("-").to_owned();
        writeln!(
            out,
            "  {} {} {} {} {} -> {}: {}",
            s("severity"),
            s("kind"),
            s("mn"),
            s("factor"),
            s("start"),
            s("end"),
            a["message"]["en"].as_str().unwrap_or("")
        )?;
    }
    if let Some(s) = &r.send {
        writeln!(
            out,
            "sent to {}: {} items on {} connection(s) ({} failed) in {:.1}s; {} acks requested, {} acked, {} timed out",
            s.to,
            s.sent,
            s.connections,
            s.connection_errors,
            s.elapsed_s,
            s.ack_requested,
            s.acked,
            s.timed_out
        )?;
        if s.interrupted {
            writeln!(out, "interrupted (Ctrl-C): figures up to then")?;
        }
        if !s.latency_us.is_empty() {
            let l = |k: &str| s.latency_us.get(k).map_or(0.0, |v| *v as f64 / 1000.0);
            writeln!(
                out,
                "ack latency ms: p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
                l("p50"),
                l("p90"),
                l("p99"),
                l("p99.9"),
                l("max")
            )?;
        }
    }
    Ok(())
}

/// A connection's worth of items with their send offsets from the start.
struct Plan {
    items: Vec<(Item, Option<Duration>)>,
}

fn plan(captures: &[Capture], args: &ReplayArgs, cfg: &Config) -> Vec<Plan> {
    let streams: Vec<&capture::Stream> = captures.iter().flat_map(|c| &c.streams).collect();
    // Regroup by MN when asked; junk stays with the MN last seen on its stream.
    let groups: Vec<Vec<Item>> = match args.split {
        Split::Session => streams.iter().map(|s| s.items.clone()).collect(),
        Split::Mn => {
            let mut order: Vec<String> = Vec::new();
            let mut by: HashMap<String, Vec<Item>> = HashMap::new();
            let opts = Options::new(chrono::Utc::now());
            let _ = cfg;
            for s in &streams {
                let mut current = String::new();
                for it in &s.items {
                    if !it.junk {
                        let f = protocol::decode(it.bytes.clone(), &opts, &());
                        current = f.mn().unwrap_or("").to_owned();
                    }
                    if !by.contains_key(&current) {
                        order.push(current.clone());
                    }
                    by.entry(current.clone()).or_default().push(it.clone());
                }
            }
            order.iter().filter_map(|m| by.remove(m)).collect()
        }
    };
    let t0 = groups.iter().flatten().filter_map(|i| i.at_ms).min();
    match args.pacing {
        Pacing::Original { speed } => groups
            .into_iter()
            .map(|g| Plan {
                items: g
                    .into_iter()
                    .map(|i| {
                        let off = match (i.at_ms, t0) {
                            (Some(a), Some(t0)) => Some(Duration::from_secs_f64(
                                (a - t0).max(0) as f64 / 1000.0 / speed,
                            )),
                            _ => None,
                        };
                        (i, off)
                    })
                    .collect(),
            })
            .collect(),
        Pacing::Rate(rate) => {
            // Global order by original time (then input order), one slot per item.
            let mut all: Vec<(usize, usize, Option<i64>)> = Vec::new();
            for (gi, g) in groups.iter().enumerate() {
                for (ii, it) in g.iter().enumerate() {
                    all.push((gi, ii, it.at_ms));
                }
            }
            all.sort_by_key(|&(gi, ii, at)| (at.unwrap_or(i64::MIN), gi, ii));
            let mut slot: HashMap<(usize, usize), usize> = HashMap::new();
            for (k, &(gi, ii, _)) in all.iter().enumerate() {
                slot.insert((gi, ii), k);
            }
            groups
                .into_iter()
                .enumerate()
                .map(|(gi, g)| Plan {
                    items: g
                        .into_iter()
                        .enumerate()
                        .map(|(ii, it)| {
                            let k = slot[&(gi, ii)];
                            (it, Some(Duration::from_secs_f64(k as f64 / rate)))
                        })
                        .collect(),
                })
                .collect()
        }
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    ack_requested: AtomicU64,
    acked: AtomicU64,
    timed_out: AtomicU64,
    connection_errors: AtomicU64,
}

async fn send(
    captures: &[Capture],
    to: &str,
    args: &ReplayArgs,
    cfg: &Config,
) -> Result<SendSummary, CmdError> {
    let addr = tokio::net::lookup_host(to)
        .await
        .map_err(|e| CmdError::Usage(format!("--to {to}: {e}")))?
        .next()
        .ok_or_else(|| CmdError::Usage(format!("--to {to}: no address")))?;
    let plans = plan(captures, args, cfg);
    let total: u64 = plans.iter().map(|p| p.items.len() as u64).sum();
    let counters = Arc::new(Counters::default());
    let hist = Arc::new(std::sync::Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
            .expect("valid histogram bounds"),
    ));
    let start = tokio::time::Instant::now();
    let began = Instant::now();
    let framer = FramerConfig {
        max_frame: cfg.server.max_frame_bytes,
        ..FramerConfig::default()
    };
    // Registered before the first frame goes out, so a Ctrl-C at any point
    // reports rather than kills.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(CmdError::io("install the SIGINT handler"))?;
    let mut tasks = tokio::task::JoinSet::new();
    let connections = plans.len() as u64;
    for p in plans {
        let (c, h) = (counters.clone(), hist.clone());
        let timeout = args.ack_timeout;
        tasks.spawn(async move {
            if let Err(e) = connection(addr, p, start, timeout, framer, &c, &h).await {
                c.connection_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "replay connection failed");
            }
        });
    }
    // A progress line on a terminal only; pipes and files get the summary alone.
    let progress = std::io::stderr().is_terminal().then(|| {
        let c = counters.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let sent = c.sent.load(Ordering::Relaxed);
                eprint!(
                    "\rreplay: {sent}/{total} sent ({:.0}%), {} acked, {} timed out   ",
                    sent as f64 * 100.0 / total.max(1) as f64,
                    c.acked.load(Ordering::Relaxed),
                    c.timed_out.load(Ordering::Relaxed)
                );
            }
        })
    });
    let mut interrupted = false;
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = interrupt.recv() => {
                interrupted = true;
                tasks.shutdown().await;
                break;
            }
        }
    }
    if let Some(p) = progress {
        p.abort();
        eprint!("\r\x1b[2K");
    }
    let h = hist.lock().unwrap_or_else(|e| e.into_inner());
    let mut latency = BTreeMap::new();
    if !h.is_empty() {
        for (k, q) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)] {
            latency.insert(k.to_owned(), h.value_at_percentile(q));
        }
        latency.insert("max".to_owned(), h.max());
    }
    Ok(SendSummary {
        to: to.to_owned(),
        connections,
        connection_errors: counters.connection_errors.load(Ordering::Relaxed),
        sent: counters.sent.load(Ordering::Relaxed),
        ack_requested: counters.ack_requested.load(Ordering::Relaxed),
        acked: counters.acked.load(Ordering::Relaxed),
        timed_out: counters.timed_out.load(Ordering::Relaxed),
        latency_us: latency,
        elapsed_s: began.elapsed().as_secs_f64(),
        interrupted,
    })
}

/// Sends one connection's items in order, waiting for each requested ack.
async fn connection(
    addr: std::net::SocketAddr,
    plan: Plan,
    start: tokio::time::Instant,
    ack_timeout: Duration,
    framer: FramerConfig,
    c: &Counters,
    hist: &std::sync::Mutex<hdrhistogram::Histogram<u64>>,
) -> std::io::Result<()> {
    let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(4096);
    let opts = Options::new(chrono::Utc::now());
    for (item, offset) in plan.items {
        if let Some(off) = offset {
            tokio::time::sleep_until(start + off).await;
        }
        let expect = if item.junk {
            None
        } else {
            let f = protocol::decode(item.bytes.clone(), &opts, &());
            reply::ack_kind(&f).map(|_| f.qn().unwrap_or("").to_owned())
        };
        let sent_at = Instant::now();
        stream.write_all(&item.bytes).await?;
        c.sent.fetch_add(1, Ordering::Relaxed);
        let Some(qn) = expect else { continue };
        c.ack_requested.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + ack_timeout;
        match wait_ack(&mut stream, &mut buf, &qn, deadline, &framer).await? {
            true => {
                c.acked.fetch_add(1, Ordering::Relaxed);
                let us = u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = hist
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(us.max(1));
            }
            false => {
                c.timed_out.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // Half-close and let the gateway finish (store, reply) before the socket goes.
    stream.shutdown().await?;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(ack_timeout, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

/// Reads replies until the ack (9014/9013) for `qn` arrives (true) or the deadline
/// passes (false). Other replies are skipped.
async fn wait_ack(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    qn: &str,
    deadline: tokio::time::Instant,
    framer: &FramerConfig,
) -> std::io::Result<bool> {
    let opts = Options::new(chrono::Utc::now());
    loop {
        while let Some(cut) = framing::cut(buf, false, framer) {
            let item = buf.split_to(cut.len()).freeze();
            if let Cut::Frame { .. } = cut {
                let f = protocol::decode(item, &opts, &());
                if matches!(f.cn(), Some("9014" | "9013")) && f.qn().unwrap_or("") == qn {
                    return Ok(true);
                }
            }
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Err(_) => return Ok(false),
            Ok(Ok(0)) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the gateway closed the connection",
                ));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Audit captured traffic with the daemon's validation, or replay it to a gateway.
///
/// INPUT (detected from content, named in the output): a raw capture (bytes as
/// received), a pcap or pcapng file (TCP payload toward the server, reassembled per
/// connection), an `export --format raw|jsonl` file, a gateway data dir or its SQLite file.
///
/// Without --to: prints an audit per MN (frames, dialects, CRC failures and variants,
/// timestamp findings, duplicates, DataTime gaps per CN, first/last DataTime).
/// With --to: one connection per original session (or --split mn), waits for each
/// requested 9014/9013 ack (--ack-timeout), paces by the original timing / --speed or
/// at --rate frames/s, and prints sent/acked/timed out and ack latency percentiles.
///
/// Examples:
///   hj212-gateway replay site.pcapng --config gateway.toml --report audit.json
///   hj212-gateway replay /var/lib/hj212-gateway --to 127.0.0.1:9212 --rate 200
///   hj212-gateway replay capture.bin --to gw.example:9212 --speed 10
///
/// Ctrl-C during --to stops sending and still prints the summary (and writes
/// --report, with "interrupted": true), then exits 130.
///
/// Exit 0 on success (also when the reader of stdout goes away: `replay x | head`),
/// 1 when --to left acks missing or connections failed, 2 on bad input or I/O
/// errors, 78 bad --config, 130 interrupted by Ctrl-C.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ReplayFlags {
    /// Inputs (files or data directories).
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
    /// Send the frames to this gateway (HOST:PORT) instead of only auditing them.
    #[arg(long, value_name = "HOST:PORT")]
    to: Option<String>,
    /// Original timing divided by X (default 1 = real time).
    #[arg(long, conflicts_with = "rate", value_name = "X")]
    speed: Option<f64>,
    /// Fixed rate in frames per second over all connections.
    #[arg(long, value_name = "N")]
    rate: Option<f64>,
    /// Group frames into connections by original session or by MN.
    #[arg(long, value_enum, default_value = "session")]
    split: SplitArg,
    /// Seconds to wait for an ack before counting it as timed out.
    #[arg(long, default_value = "5", value_name = "SECS")]
    ack_timeout: f64,
    /// The server's TCP port in a capture that lacks the handshake (default: the
    /// receiver of the SYN, else the lower port).
    #[arg(long, value_name = "PORT")]
    server_port: Option<u16>,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Gateway config: devices, keys, thresholds, time zone.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SplitArg {
    /// One connection per original connection / stored session.
    Session,
    /// One connection per MN.
    Mn,
}

/// Runs `replay` from the command line: the report on stdout, the exit code back.
pub fn main(flags: ReplayFlags) -> std::process::ExitCode {
    use std::process::ExitCode;
    let pacing = match (flags.speed, flags.rate) {
        (_, Some(r)) if !(r.is_finite() && r > 0.0) => {
            return super::fail(&CmdError::Usage(format!("--rate {r}: must be > 0")));
        }
        (Some(x), _) if !(x.is_finite() && x > 0.0) => {
            return super::fail(&CmdError::Usage(format!("--speed {x}: must be > 0")));
        }
        (_, Some(r)) => Pacing::Rate(r),
        (x, None) => Pacing::Original {
            speed: x.unwrap_or(1.0),
        },
    };
    let ack_timeout = flags.ack_timeout;
    if !(ack_timeout.is_finite() && ack_timeout > 0.0) {
        return super::fail(&CmdError::Usage(format!(
            "--ack-timeout {ack_timeout}: must be > 0"
        )));
    }
    let result = super::load_config(flags.config.as_deref()).and_then(|cfg| {
        let args = ReplayArgs {
            inputs: flags.inputs,
            to: flags.to,
            pacing,
            split: match flags.split {
                SplitArg::Session => Split::Session,
                SplitArg::Mn => Split::Mn,
            },
            ack_timeout: Duration::from_secs_f64(ack_timeout),
            server_port: flags.server_port,
            report: flags.report,
            config: cfg,
        };
        run(&args, &mut std::io::stdout().lock())
    });
    match result {
        Ok(r) => match r.send {
            Some(s) if s.interrupted => ExitCode::from(crate::exit::INTERRUPTED),
            Some(s) if s.timed_out > 0 || s.connection_errors > 0 => {
                ExitCode::from(crate::exit::NO)
            }
            _ => ExitCode::SUCCESS,
        },
        Err(e) => super::fail(&e),
    }
}
