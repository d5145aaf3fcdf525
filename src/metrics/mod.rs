//! Live metrics: a fixed, lock-free registry and its Prometheus text exposition.
//!
//! The hot path (one session frame) costs a handful of relaxed atomic adds: every
//! series is a field of one [`Metrics`] registry, label values are fixed
//! tables indexed at compile time (verdicts, finding codes, refusal reasons),
//! and histograms have fixed buckets. Nothing allocates per frame and no label
//! has unbounded cardinality (no per-MN or per-peer series).
//!
//! Values that live in the store (cursor lags, active alarms, queue depth) are
//! read when `/metrics` is scraped, by [`http`], from the gateway's own state.
//!
//! Each gateway has its own registry, created by `daemon::start` and held in
//! [`App::metrics`](crate::app::App::metrics); everything that counts is handed
//! it (the store writer through `StoreConfig::metrics`, the log's consumers
//! through the commit feed), so two gateways in one process (tests) count apart.
//! The process series ([`render_process`]: CPU, memory, descriptors, start
//! time, under the client libraries' standard `process_*` names) are the
//! process's own and so shared.

pub mod http;
mod render;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::vocab::{CloseReason, DEAD_LETTER_REASONS, ExchangeOutcome, FindingCode};

#[doc(hidden)]
pub use render::parse_exposition;
pub use render::{Exposition, render_process};

pub use crate::config::MetricsConfig;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Zero.
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Zero.
    pub const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Subtracts one.
    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// Sets the value.
    #[inline]
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Most buckets a [`Histogram`] may have (besides `+Inf`).
const MAX_BUCKETS: usize = 16;

/// Fixed-bucket histogram over integer observations (nanoseconds, counts).
///
/// Buckets are stored non-cumulative so an observation is one add to a bucket
/// and one to the sum; the exposition accumulates them, and derives `_count`
/// from the same bucket reads, so `+Inf` always equals `_count`.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in raw units, ascending.
    bounds: &'static [u64],
    /// Raw unit expressed in the exposition's base unit (1e-9 for ns -> s).
    scale: f64,
    /// `bounds.len() + 1` used; the last one is `+Inf`.
    buckets: [AtomicU64; MAX_BUCKETS + 1],
    sum: AtomicU64,
}

impl Histogram {
    /// A histogram with the given raw upper bounds; `scale` converts raw units to
    /// the exposed base unit.
    pub const fn new(bounds: &'static [u64], scale: f64) -> Histogram {
        assert!(bounds.len() <= MAX_BUCKETS);
        Histogram {
            bounds,
            scale,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS + 1],
            sum: AtomicU64::new(0),
        }
    }

    /// Records `n` observations of `v` (raw units).
    #[inline]
    pub fn observe_n(&self, v: u64, n: u64) {
        if n == 0 {
            return;
        }
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.sum.fetch_add(v.saturating_mul(n), Ordering::Relaxed);
    }

    /// Records one observation of `v` (raw units).
    #[inline]
    pub fn observe(&self, v: u64) {
        self.observe_n(v, 1);
    }

    /// Records a duration (the histogram's raw unit must be nanoseconds).
    #[inline]
    pub fn observe_duration(&self, d: Duration, n: u64) {
        self.observe_n(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), n);
    }

    /// Number of observations so far.
    pub fn count(&self) -> u64 {
        self.buckets[..=self.bounds.len()]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

/// Latency buckets, nanoseconds: 100 us .. 5 s.
const LATENCY_NS: &[u64] = &[
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// Records per store transaction.
const BATCH_RECORDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Why a connection was refused after `accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `[server] max_per_ip` sessions from this address already open.
    PerIp,
    /// `[server] proxy_protocol` is on and the source is not in `proxy_trusted`.
    ProxyUntrusted,
    /// `[server] proxy_protocol` is on and the PROXY header was missing, bad or late.
    ProxyHeader,
}

impl Refusal {
    /// Every reason, in exposition order.
    pub const ALL: [Refusal; 3] = [
        Refusal::PerIp,
        Refusal::ProxyUntrusted,
        Refusal::ProxyHeader,
    ];
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerIp => "per_ip_cap",
            Refusal::ProxyUntrusted => "proxy_untrusted",
            Refusal::ProxyHeader => "proxy_header",
        }
    }
}

/// The verdict label of a cut item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameVerdict {
    /// Stored and acked.
    Accepted = 0,
    /// Stored, not acked (an error finding).
    Rejected = 1,
    /// Bytes between frames, stored as junk.
    Junk = 2,
}

/// Verdict label values, indexed by [`FrameVerdict`].
pub const VERDICTS: [&str; 3] = ["accepted", "rejected", "junk"];

/// The protocol's finding codes, as the protocol crate lists them.
const PROTOCOL_FINDING_CODES: &[&str] = crate::protocol::finding::code::ALL;

/// Byte order of two strings, usable in a constant.
const fn str_less(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut i = 0;
    while i < a.len() && i < b.len() {
        if a[i] != b[i] {
            return a[i] < b[i];
        }
        i += 1;
    }
    a.len() < b.len()
}

/// The `variant` labels of `hj212_frames_crc_variant_total` and the finding code
/// the decoder gives a frame whose CRC is that variant. Counted apart from
/// `hj212_findings_total` because the verdict matters here: rejected ones are a
/// device that gets no acks until its `crc` policy names the variant.
pub const CRC_VARIANTS: [(&str, &str); 2] = [
    ("modbus", crate::protocol::finding::code::CRC_VARIANT_MODBUS),
    (
        "modbus_swapped",
        crate::protocol::finding::code::CRC_VARIANT_MODBUS_SWAPPED,
    ),
];

/// Every finding code the gateway can produce: the protocol's and its own
/// policy's ([`FindingCode`]), sorted (the `code` label order of
/// `hj212_findings_total`, and binary-searched per finding).
pub const FINDING_CODES: [&str; PROTOCOL_FINDING_CODES.len() + FindingCode::ALL.len()] = {
    let mut out = [""; PROTOCOL_FINDING_CODES.len() + FindingCode::ALL.len()];
    let mut n = 0;
    while n < out.len() {
        let next = if n < PROTOCOL_FINDING_CODES.len() {
            PROTOCOL_FINDING_CODES[n]
        } else {
            FindingCode::ALL[n - PROTOCOL_FINDING_CODES.len()].as_str()
        };
        // Insertion sort: a few dozen codes, once, at compile time.
        let mut j = n;
        while j > 0 && str_less(next, out[j - 1]) {
            out[j] = out[j - 1];
            j -= 1;
        }
        out[j] = next;
        n += 1;
    }
    out
};

const FINDING_SLOTS: usize = 64;
const _: () = assert!(FINDING_CODES.len() < FINDING_SLOTS);

/// Index of `code` in [`FINDING_CODES`], or the `other` slot.
fn finding_index(code: &str) -> usize {
    FINDING_CODES
        .binary_search(&code)
        .unwrap_or(FINDING_CODES.len())
}

/// What ends a junk run (the `end` label of `hj212_junk_records_total`): a
/// frame, the `junk_record_bytes` cap, the connection's end.
pub const JUNK_RUN_ENDS: [&str; 3] = ["frame", "cap", "close"];

/// Caps of the MQTT split-upload merger (`reason` of
/// `hj212_mqtt_merge_limited_total`, the `as_str` of `publish::merge::Limit`).
pub const MERGE_LIMITS: [&str; 5] = ["packets", "groups", "bytes", "size", "fields"];
/// Consumers of `hj212_dead_letters_total`, sorted. Every upstream forwarder counts
/// as `upstream` (the entry in the store names which one); `mqtt.status` counts
/// presence and gateway-status messages the publisher gave up on (they have no
/// record to set aside).
pub const DEAD_LETTER_CONSUMERS: [&str; 6] = [
    "alarms",
    "mqtt",
    "mqtt.alarms",
    "mqtt.merge",
    "mqtt.status",
    "upstream",
];
const DL_REASONS: usize = DEAD_LETTER_REASONS.len();

/// Alarm detectors (`alarm::DetectorKind::ALL`, checked where that is in scope:
/// `metrics::http`).
pub const ALARM_KINDS: usize = crate::alarm::DetectorKind::ALL.len();

/// Per-upstream series, registered once per forwarder (names come from the config).
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    /// 1 while the forwarder holds a connection to its platform.
    pub connected: Gauge,
    /// Platform requests not relayed because the device had no live session,
    /// answered QnRtn=2.
    pub refused_offline: Counter,
    /// Platform requests not relayed because the device's queue was full,
    /// answered QnRtn=2.
    pub refused_busy: Counter,
    /// Platform requests not relayed and not answered: beyond
    /// `[[upstream]] refusals_per_minute`.
    pub refused_rate_limited: Counter,
}

/// One gateway's series (see [`App::metrics`](crate::app::App::metrics)). See the
/// README "Metrics" section for meanings.
#[derive(Debug)]
pub struct Metrics {
    /// Device sessions currently open.
    pub sessions_open: Gauge,
    /// Connections accepted (a session was started).
    pub accepted: Counter,
    refused: [Counter; Refusal::ALL.len()],
    /// `accept()` failures (EMFILE, ...).
    pub accept_errors: Counter,
    /// Metrics connections closed before their request head to make room for a
    /// new one (`[metrics] max_connections` reached).
    pub metrics_connections_evicted: Counter,
    closed: [Counter; CloseReason::ALL.len()],
    items: [Counter; 3],
    findings: [Counter; FINDING_SLOTS],
    /// `[variant][verdict]`: frames whose CRC matched a non-standard variant.
    crc_variants: [[Counter; 2]; CRC_VARIANTS.len()],
    /// Bytes received from devices (every byte becomes a frame or junk record).
    pub bytes_in: Counter,
    /// Bytes written to devices (acks, relayed requests).
    pub bytes_out: Counter,
    /// Bytes stored as junk.
    pub junk_bytes: Counter,
    junk_records: [Counter; 3],
    /// Uploads for an MN held by a live session from another address.
    pub session_conflicts: Counter,
    /// Inbound frames the store marked as retransmissions of an earlier (MN, QN, CN).
    pub duplicates: Counter,
    /// Records consumers took from the writer's in-memory commit feed.
    pub feed_reads: Counter,
    /// Records consumers had to read back from SQLite (behind the feed).
    pub feed_misses: Counter,
    downlink_exchanges: [Counter; ExchangeOutcome::ALL.len()],
    /// Exchange outcomes that could not be written to the store.
    pub downlink_unrecorded: Counter,
    /// Wall time of one store transaction (begin .. commit), nanoseconds.
    pub commit_seconds: Histogram,
    /// Records per committed transaction.
    pub commit_batch_records: Histogram,
    /// Frame fully read .. its ack written to the socket (includes the commit), ns.
    pub ack_seconds: Histogram,
    /// 1 while the MQTT publisher is connected.
    pub mqtt_connected: Gauge,
    /// PUBLISH packets sent to the broker (resends after a reconnect included).
    pub mqtt_publishes: Counter,
    /// Publishes the broker confirmed (PUBACK/PUBCOMP; at QoS 0, sent).
    pub mqtt_acks: Counter,
    /// Registered (or `[alarms.device]`) devices the alarm engine holds state for.
    pub alarm_tracked_registered: Gauge,
    /// Unregistered devices the alarm engine holds state for (at most
    /// `[alarms] max_unregistered_devices`).
    pub alarm_tracked_unregistered: Gauge,
    /// Unregistered devices the alarm engine forgot to stay within its cap (the
    /// engine's own count, so set rather than added to).
    pub alarm_evicted: Gauge,
    /// Values the alarm engine did not judge because their device had
    /// `[alarms] max_factors_per_device` other factors (the engine's count).
    pub alarm_untracked_factors: Gauge,
    /// Bytes held by open split-upload groups (as accounted against `merge_max_bytes`).
    pub mqtt_merge_bytes: Gauge,
    /// Open split-upload groups.
    pub mqtt_merge_groups: Gauge,
    /// The live log file and its WAL, bytes (set by `store::archive::refresh_metrics`).
    pub store_live_bytes: Gauge,
    /// Sealed archive files of the log, bytes.
    pub store_archive_bytes: Gauge,
    /// Sealed archives (files present).
    pub store_archives: Gauge,
    /// Records held in sealed archives.
    pub store_archived_records: Gauge,
    merge_limited: [Counter; MERGE_LIMITS.len()],
    dead_letters: [[Counter; DL_REASONS]; DEAD_LETTER_CONSUMERS.len()],
    /// Consumer starts that found the previous run had died on a record (crash-loop guard).
    pub consumer_crashes: Counter,
    upstreams: Mutex<Vec<(String, Arc<UpstreamMetrics>)>>,
    /// Receive time of the newest accepted inbound frame, unix ms; 0 before the first.
    last_frame_ms: AtomicI64,
    alarms_raised: [Counter; ALARM_KINDS],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// All zero.
    pub const fn new() -> Metrics {
        Metrics {
            sessions_open: Gauge::new(),
            accepted: Counter::new(),
            refused: [const { Counter::new() }; Refusal::ALL.len()],
            accept_errors: Counter::new(),
            metrics_connections_evicted: Counter::new(),
            closed: [const { Counter::new() }; CloseReason::ALL.len()],
            items: [const { Counter::new() }; 3],
            findings: [const { Counter::new() }; FINDING_SLOTS],
            crc_variants: [const { [const { Counter::new() }; 2] }; CRC_VARIANTS.len()],
            bytes_in: Counter::new(),
            bytes_out: Counter::new(),
            junk_bytes: Counter::new(),
            junk_records: [const { Counter::new() }; 3],
            session_conflicts: Counter::new(),
            duplicates: Counter::new(),
            feed_reads: Counter::new(),
            feed_misses: Counter::new(),
            downlink_exchanges: [const { Counter::new() }; ExchangeOutcome::ALL.len()],
            downlink_unrecorded: Counter::new(),
            commit_seconds: Histogram::new(LATENCY_NS, 1e-9),
            commit_batch_records: Histogram::new(BATCH_RECORDS, 1.0),
            ack_seconds: Histogram::new(LATENCY_NS, 1e-9),
            mqtt_connected: Gauge::new(),
            mqtt_publishes: Counter::new(),
            mqtt_acks: Counter::new(),
            alarm_tracked_registered: Gauge::new(),
            alarm_tracked_unregistered: Gauge::new(),
            alarm_evicted: Gauge::new(),
            alarm_untracked_factors: Gauge::new(),
            mqtt_merge_bytes: Gauge::new(),
            mqtt_merge_groups: Gauge::new(),
            store_live_bytes: Gauge::new(),
            store_archive_bytes: Gauge::new(),
            store_archives: Gauge::new(),
            store_archived_records: Gauge::new(),
            merge_limited: [const { Counter::new() }; MERGE_LIMITS.len()],
            dead_letters: [const { [const { Counter::new() }; DL_REASONS] };
                DEAD_LETTER_CONSUMERS.len()],
            consumer_crashes: Counter::new(),
            upstreams: Mutex::new(Vec::new()),
            last_frame_ms: AtomicI64::new(0),
            alarms_raised: [const { Counter::new() }; ALARM_KINDS],
        }
    }

    /// Counts a connection refused after `accept`; returns the refusals of
    /// this kind so far (the listener logs at powers of two).
    #[inline]
    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r as usize].0.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a session end by its reason.
    pub fn session_closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
    }

    /// Counts one inbound device frame: its verdict, its findings, its bytes.
    #[inline]
    pub fn frame(&self, accepted: bool, len: usize, findings: &[crate::protocol::Finding]) {
        let v = if accepted {
            FrameVerdict::Accepted
        } else {
            FrameVerdict::Rejected
        };
        self.items[v as usize].inc();
        self.bytes_in.add(len as u64);
        for f in findings {
            self.findings[finding_index(f.code)].inc();
            if let Some(i) = CRC_VARIANTS.iter().position(|(_, c)| *c == f.code) {
                self.crc_variants[i][usize::from(!accepted)].inc();
            }
        }
    }

    /// Counts `n` times a split-upload merger cap bit (`reason` one of
    /// [`MERGE_LIMITS`]; anything else is not counted).
    pub fn mqtt_merge_limited(&self, reason: &str, n: u64) {
        if let Some(i) = MERGE_LIMITS.iter().position(|r| *r == reason) {
            self.merge_limited[i].add(n);
        }
    }

    /// Counts a downlink exchange that ended with `outcome` (the name of one of
    /// [`ExchangeOutcome::ALL`]; anything else is not counted).
    pub fn downlink_exchange(&self, outcome: &str) {
        if let Some(o) = ExchangeOutcome::from_name(outcome) {
            self.downlink_exchanges[o as usize].inc();
        }
    }

    /// Counts one junk item of `len` bytes.
    #[inline]
    pub fn junk(&self, len: usize) {
        self.items[FrameVerdict::Junk as usize].inc();
        self.bytes_in.add(len as u64);
        self.junk_bytes.add(len as u64);
    }

    /// Counts a record (or message) `consumer` set aside for `reason` (one of
    /// [`DEAD_LETTER_REASONS`]). `upstream.<name>` counts as `upstream`.
    pub fn dead_letter(&self, consumer: &str, reason: &str) {
        let c = if consumer.starts_with("upstream.") {
            "upstream"
        } else {
            consumer
        };
        let (Ok(i), Some(j)) = (
            DEAD_LETTER_CONSUMERS.binary_search(&c),
            DEAD_LETTER_REASONS.iter().position(|r| *r == reason),
        ) else {
            return;
        };
        self.dead_letters[i][j].inc();
    }

    /// The count of [`dead_letter`](Self::dead_letter) for one pair (tests, health).
    pub fn dead_letters(&self, consumer: &str, reason: &str) -> u64 {
        let i = DEAD_LETTER_CONSUMERS.binary_search(&consumer).ok();
        let j = DEAD_LETTER_REASONS.iter().position(|r| *r == reason);
        match (i, j) {
            (Some(i), Some(j)) => self.dead_letters[i][j].get(),
            _ => 0,
        }
    }

    /// Counts one junk record stored (a run of consecutive junk items) by
    /// what ended its run (one of [`JUNK_RUN_ENDS`]; anything else is not counted).
    #[inline]
    pub fn junk_record(&self, end: &str) {
        if let Some(i) = JUNK_RUN_ENDS.iter().position(|e| *e == end) {
            self.junk_records[i].inc();
        }
    }

    /// The series of upstream `name` (created on first use; cold path).
    pub fn upstream(&self, name: &str) -> Arc<UpstreamMetrics> {
        let mut v = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = v.iter().find(|(n, _)| n == name) {
            return m.clone();
        }
        let m = Arc::new(UpstreamMetrics::default());
        v.push((name.to_owned(), m.clone()));
        m
    }

    /// Notes an accepted inbound frame read at `received_at_ms` (unix ms), for
    /// `hj212_last_frame_timestamp_seconds`. Sessions report concurrently, so
    /// the newest time wins rather than the last call.
    #[inline]
    pub fn frame_accepted_at(&self, received_at_ms: i64) {
        self.last_frame_ms
            .fetch_max(received_at_ms, Ordering::Relaxed);
    }

    /// Receive time (unix ms) of the newest accepted inbound frame; 0 before the first.
    pub fn last_frame_ms(&self) -> i64 {
        self.last_frame_ms.load(Ordering::Relaxed)
    }

    /// Counts an alarm raised by detector `kind` (its index in
    /// `alarm::DetectorKind::ALL`; anything beyond is not counted). The index,
    /// not the enum, keeps this registry below the alarm module.
    pub fn alarm_raised(&self, kind: usize) {
        if let Some(c) = self.alarms_raised.get(kind) {
            c.inc();
        }
    }

    /// Alarms raised by the detector at `kind` (its index in `DetectorKind::ALL`).
    pub fn alarms_raised(&self, kind: usize) -> u64 {
        self.alarms_raised.get(kind).map_or(0, Counter::get)
    }

    /// Writes every series of this registry (and the process-wide count of
    /// suppressed log lines, see [`crate::telemetry::lines_suppressed`]).
    pub fn render(&self, e: &mut Exposition) {
        e.family(
            "hj212_gateway_build_info",
            "gauge",
            "Build of the running gateway; always 1.",
        );
        e.sample(
            "hj212_gateway_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        e.family(
            "hj212_last_frame_timestamp_seconds",
            "gauge",
            "Receive time of the newest accepted inbound device frame, unix seconds; 0 before the first since start.",
        );
        e.sample_f64(
            "hj212_last_frame_timestamp_seconds",
            &[],
            self.last_frame_ms() as f64 / 1000.0,
        );
        e.family(
            "hj212_sessions_open",
            "gauge",
            "Device sessions currently open.",
        );
        e.sample("hj212_sessions_open", &[], self.sessions_open.get());
        e.family(
            "hj212_connections_accepted_total",
            "counter",
            "Device connections accepted (a session started).",
        );
        e.sample("hj212_connections_accepted_total", &[], self.accepted.get());
        e.family(
            "hj212_connections_refused_total",
            "counter",
            "Device connections closed right after accept, by reason.",
        );
        for r in Refusal::ALL {
            e.sample(
                "hj212_connections_refused_total",
                &[("reason", r.as_str())],
                self.refused[r as usize].get(),
            );
        }
        e.family(
            "hj212_accept_errors_total",
            "counter",
            "accept() failures (EMFILE, ...).",
        );
        e.sample("hj212_accept_errors_total", &[], self.accept_errors.get());
        e.family(
            "hj212_log_lines_suppressed_total",
            "counter",
            "Repeated warning and error lines not written ([log] repeat_interval); each call site logs once per interval with the count.",
        );
        e.sample(
            "hj212_log_lines_suppressed_total",
            &[],
            // Per process, not per registry: see `telemetry::lines_suppressed`.
            crate::telemetry::lines_suppressed(),
        );
        e.family(
            "hj212_metrics_connections_evicted_total",
            "counter",
            "Metrics connections closed before sending a request head, to make room for a new one ([metrics] max_connections).",
        );
        e.sample(
            "hj212_metrics_connections_evicted_total",
            &[],
            self.metrics_connections_evicted.get(),
        );
        e.family(
            "hj212_sessions_closed_total",
            "counter",
            "Device sessions ended, by reason.",
        );
        for r in CloseReason::ALL {
            e.sample(
                "hj212_sessions_closed_total",
                &[("reason", r.as_str())],
                self.closed[r as usize].get(),
            );
        }
        e.family(
            "hj212_frames_total",
            "counter",
            "Items cut from device connections, by verdict (junk = bytes between frames).",
        );
        for (i, v) in VERDICTS.iter().enumerate() {
            e.sample("hj212_frames_total", &[("verdict", v)], self.items[i].get());
        }
        e.family(
            "hj212_findings_total",
            "counter",
            "Findings on device frames, by finding code.",
        );
        for (i, c) in FINDING_CODES.iter().enumerate() {
            e.sample(
                "hj212_findings_total",
                &[("code", c)],
                self.findings[i].get(),
            );
        }
        let other = self.findings[FINDING_CODES.len()].get();
        if other > 0 {
            e.sample("hj212_findings_total", &[("code", "other")], other);
        }
        e.family(
            "hj212_frames_crc_variant_total",
            "counter",
            "Device frames whose CRC is a non-standard variant (not the HJ 212 CRC), by variant and verdict.",
        );
        for (i, (v, _)) in CRC_VARIANTS.iter().enumerate() {
            for (j, verdict) in ["accepted", "rejected"].iter().enumerate() {
                e.sample(
                    "hj212_frames_crc_variant_total",
                    &[("variant", v), ("verdict", verdict)],
                    self.crc_variants[i][j].get(),
                );
            }
        }
        e.family(
            "hj212_received_bytes_total",
            "counter",
            "Bytes received from devices.",
        );
        e.sample("hj212_received_bytes_total", &[], self.bytes_in.get());
        e.family(
            "hj212_sent_bytes_total",
            "counter",
            "Bytes written to devices.",
        );
        e.sample("hj212_sent_bytes_total", &[], self.bytes_out.get());
        e.family("hj212_junk_bytes_total", "counter", "Bytes stored as junk.");
        e.sample("hj212_junk_bytes_total", &[], self.junk_bytes.get());
        e.family(
            "hj212_junk_records_total",
            "counter",
            "Junk records stored (each a run of consecutive junk items of one session), by what ended the run: a frame, the junk_record_bytes cap, or the connection's end.",
        );
        for (i, end) in JUNK_RUN_ENDS.iter().enumerate() {
            e.sample(
                "hj212_junk_records_total",
                &[("end", end)],
                self.junk_records[i].get(),
            );
        }
        e.family(
            "hj212_session_conflicts_total",
            "counter",
            "Uploads for an MN held by a live session from another address (stored and acked with finding session.conflict; the holder keeps the MN).",
        );
        e.sample(
            "hj212_session_conflicts_total",
            &[],
            self.session_conflicts.get(),
        );
        e.family(
            "hj212_duplicate_frames_total",
            "counter",
            "Inbound frames retransmitting an earlier (MN, QN, CN).",
        );
        e.sample("hj212_duplicate_frames_total", &[], self.duplicates.get());
        e.family(
            "hj212_consumer_records_total",
            "counter",
            "Records read by the log's consumers, by source: the writer's in-memory feed or SQLite (a consumer behind the feed).",
        );
        e.sample(
            "hj212_consumer_records_total",
            &[("source", "feed")],
            self.feed_reads.get(),
        );
        e.sample(
            "hj212_consumer_records_total",
            &[("source", "sqlite")],
            self.feed_misses.get(),
        );
        e.family(
            "hj212_downlink_exchanges_total",
            "counter",
            "Downlink exchanges ended, by outcome.",
        );
        for o in ExchangeOutcome::ALL {
            e.sample(
                "hj212_downlink_exchanges_total",
                &[("outcome", o.as_str())],
                self.downlink_exchanges[o as usize].get(),
            );
        }
        e.family(
            "hj212_downlink_exchanges_unrecorded_total",
            "counter",
            "Downlink exchange outcomes that could not be written to the store.",
        );
        e.sample(
            "hj212_downlink_exchanges_unrecorded_total",
            &[],
            self.downlink_unrecorded.get(),
        );
        e.histogram(
            "hj212_store_commit_duration_seconds",
            "Duration of one frame log transaction (begin to durable commit).",
            &self.commit_seconds,
        );
        e.histogram(
            "hj212_store_commit_batch_records",
            "Records per committed frame log transaction.",
            &self.commit_batch_records,
        );
        e.histogram(
            "hj212_ack_latency_seconds",
            "Frame fully read to its ack written to the socket (includes the durable commit).",
            &self.ack_seconds,
        );
        e.family(
            "hj212_mqtt_connected",
            "gauge",
            "1 while the MQTT publisher is connected to the broker.",
        );
        e.sample("hj212_mqtt_connected", &[], self.mqtt_connected.get());
        e.family(
            "hj212_mqtt_publishes_total",
            "counter",
            "PUBLISH packets sent to the broker (resends after a reconnect included).",
        );
        e.sample("hj212_mqtt_publishes_total", &[], self.mqtt_publishes.get());
        e.family(
            "hj212_mqtt_acks_total",
            "counter",
            "Publishes confirmed by the broker (PUBACK/PUBCOMP; at QoS 0, sent).",
        );
        e.sample("hj212_mqtt_acks_total", &[], self.mqtt_acks.get());
        e.family(
            "hj212_mqtt_merge_bytes",
            "gauge",
            "Bytes held by open split-upload groups, as accounted against merge_max_bytes.",
        );
        e.sample("hj212_mqtt_merge_bytes", &[], self.mqtt_merge_bytes.get());
        e.family(
            "hj212_mqtt_merge_groups",
            "gauge",
            "Split-upload groups open in the MQTT publisher's merger.",
        );
        e.sample("hj212_mqtt_merge_groups", &[], self.mqtt_merge_groups.get());
        e.family(
            "hj212_store_size_bytes",
            "gauge",
            "Bytes the frame log takes on disk, by part: live (the SQLite file and its WAL; never shrinks, freed pages are reused) and archive (sealed archive files).",
        );
        e.sample(
            "hj212_store_size_bytes",
            &[("part", "live")],
            self.store_live_bytes.get(),
        );
        e.sample(
            "hj212_store_size_bytes",
            &[("part", "archive")],
            self.store_archive_bytes.get(),
        );
        e.family(
            "hj212_store_archives",
            "gauge",
            "Sealed archive files of the frame log.",
        );
        e.sample("hj212_store_archives", &[], self.store_archives.get());
        e.family(
            "hj212_store_archived_records",
            "gauge",
            "Records held in sealed archive files.",
        );
        e.sample(
            "hj212_store_archived_records",
            &[],
            self.store_archived_records.get(),
        );
        e.family(
            "hj212_mqtt_merge_limited_total",
            "counter",
            "Times a split-upload merger cap bit, by reason: packets (PNUM above merge_max_packets, published packet by packet), groups, bytes (group published early), size (message would exceed max_packet_size), fields (header field too long to merge).",
        );
        for (i, r) in MERGE_LIMITS.iter().enumerate() {
            e.sample(
                "hj212_mqtt_merge_limited_total",
                &[("reason", r)],
                self.merge_limited[i].get(),
            );
        }
        e.family(
            "hj212_dead_letters_total",
            "counter",
            "Records (or messages) a log consumer could not deliver and set aside, by consumer and reason.",
        );
        for (i, c) in DEAD_LETTER_CONSUMERS.iter().enumerate() {
            for (j, r) in DEAD_LETTER_REASONS.iter().enumerate() {
                e.sample(
                    "hj212_dead_letters_total",
                    &[("consumer", c), ("reason", r)],
                    self.dead_letters[i][j].get(),
                );
            }
        }
        e.family(
            "hj212_consumer_crashes_total",
            "counter",
            "Consumer starts that found the previous run died on a record (crash-loop guard).",
        );
        e.sample(
            "hj212_consumer_crashes_total",
            &[],
            self.consumer_crashes.get(),
        );
        let ups = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        if !ups.is_empty() {
            e.family(
                "hj212_upstream_connected",
                "gauge",
                "1 while the upstream forwarder is connected to its platform.",
            );
            for (name, m) in ups.iter() {
                e.sample(
                    "hj212_upstream_connected",
                    &[("upstream", name)],
                    m.connected.get(),
                );
            }
            e.family(
                "hj212_upstream_requests_refused_total",
                "counter",
                "Platform requests not relayed to a device, by reason: offline (no live session) and busy (its queue full) were answered QnRtn=2; rate_limited ones, beyond [[upstream]] refusals_per_minute, were logged but not answered.",
            );
            for (name, m) in ups.iter() {
                for (reason, c) in [
                    ("offline", &m.refused_offline),
                    ("busy", &m.refused_busy),
                    ("rate_limited", &m.refused_rate_limited),
                ] {
                    e.sample(
                        "hj212_upstream_requests_refused_total",
                        &[("upstream", name), ("reason", reason)],
                        c.get(),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_table_is_sorted_and_holds_every_code() {
        assert!(
            FINDING_CODES.windows(2).all(|w| w[0] < w[1]),
            "sorted, unique"
        );
        for c in PROTOCOL_FINDING_CODES
            .iter()
            .copied()
            .chain(FindingCode::ALL.map(FindingCode::as_str))
        {
            assert_ne!(finding_index(c), FINDING_CODES.len(), "{c} counts as other");
        }
        assert_eq!(
            FindingCode::ALL.map(FindingCode::as_str).to_vec(),
            {
                let mut v = FindingCode::ALL.map(FindingCode::as_str).to_vec();
                v.sort_unstable();
                v
            },
            "gateway codes listed in order"
        );
    }

    /// What the decoder and the policy produce on real frames is counted by
    /// its code, never as `other` (the table is complete for them).
    #[test]
    fn findings_on_the_fixtures_have_their_own_slot() {
        let registry = crate::registry::Registry::default();
        let opts = crate::protocol::Options::new(chrono::Utc::now());
        let mut seen = 0;
        for raw in crate::protocol::fixture_frames() {
            let mut f = crate::protocol::decode(bytes::Bytes::from(raw), &opts, &());
            crate::ingest::apply_policy(
                &mut f,
                &registry,
                crate::config::UnknownDevice::Quarantine,
            );
            for x in &f.findings {
                assert_ne!(finding_index(x.code), FINDING_CODES.len(), "{}", x.code);
                seen += 1;
            }
        }
        assert!(seen > 100, "{seen} findings");
    }

    #[test]
    fn close_reasons_index_their_slot_in_label_order() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r}");
        }
        assert!(
            CloseReason::ALL
                .windows(2)
                .all(|w| w[0].as_str() < w[1].as_str()),
            "sorted, unique"
        );
        assert!(
            DEAD_LETTER_CONSUMERS.windows(2).all(|w| w[0] < w[1]),
            "sorted, unique (binary search)"
        );
    }

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = Histogram::new(&[10, 100], 1.0);
        h.observe(10);
        h.observe(11);
        h.observe_n(1000, 3);
        assert_eq!(h.count(), 5);
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[1].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[2].load(Ordering::Relaxed), 3);
        assert_eq!(h.sum.load(Ordering::Relaxed), 3021);
    }
}
