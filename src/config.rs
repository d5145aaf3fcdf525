//! Configuration: TOML in, a checked [`Config`] out.
//!
//! Unknown keys are rejected (a typo must not silently fall back to a
//! default), every key has a documented default (see `deploy/gateway.toml`),
//! and every error names the offending key so `check-config` can point at it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::FixedOffset;
use serde::Deserialize;

use crate::protocol::{CrcPolicy, Dialect, crypt};

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// TOML syntax error or unknown/mistyped key (the message names it).
    #[error("{path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// toml's message, which names the key and position.
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        /// File path (or `<defaults>`).
        path: PathBuf,
        /// Dotted key, e.g. `server.listen` or `device[3].key`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// A duration written as `500ms`, `30s`, `5m`, `2h` or `1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses `<integer><unit>` with unit ms, s, m, h or d.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid duration {text:?}: expected e.g. \"30s\", \"5m\", \"250ms\"")
    })?;
    let per = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "invalid duration {text:?}: unit must be ms, s, m, h or d"
            ));
        }
    };
    let ms = n
        .checked_mul(per)
        .ok_or_else(|| format!("invalid duration {text:?}: too long"))?;
    Ok(Duration::from_millis(ms))
}

/// `[server]`: listening and per-connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Addresses to listen on.
    pub listen: Vec<String>,
    /// Concurrent device sessions; further connections wait in the backlog.
    pub max_connections: usize,
    /// Concurrent sessions from one IP address; more are refused.
    pub max_per_ip: usize,
    /// Close a session that sent nothing for this long.
    pub idle_timeout: Dur,
    /// Close a session whose incomplete frame does not complete within this (slowloris).
    pub partial_frame_timeout: Dur,
    /// Cap on one frame's bytes; a frame start without a tail within it becomes junk.
    pub max_frame_bytes: usize,
    /// Junk bytes one session may send before it is closed.
    pub max_junk_bytes: usize,
    /// Consecutive junk items of a session are stored as one record of at
    /// least this many bytes (fewer when a frame follows or the connection
    /// ends); it is also what a session holds back before storing.
    pub junk_record_bytes: usize,
    /// TCP keepalive idle time.
    pub tcp_keepalive: Dur,
    /// Give up writing a reply to a device after this long.
    pub write_timeout: Dur,
    /// On SIGTERM, sessions get this long to finish frames in flight.
    pub shutdown_grace: Dur,
    /// Expect a PROXY protocol header (behind an L4 load balancer); off by default.
    pub proxy_protocol: ProxyProtocol,
    /// Sources (CIDR blocks or addresses) whose PROXY headers are believed;
    /// connections from anywhere else are refused while `proxy_protocol` is on.
    pub proxy_trusted: Vec<String>,
    /// The PROXY header must be complete within this after the connection opens.
    pub proxy_header_timeout: Dur,
    /// Largest v2 header accepted, TLVs included (v1 is bounded at 107 bytes by its spec).
    pub proxy_max_header: usize,
}

/// `[server] proxy_protocol`: which PROXY header connections must start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No header: the socket peer is the device.
    #[default]
    Off,
    /// Text header only.
    V1,
    /// Binary header only.
    V2,
    /// Either version.
    Any,
}

impl ProxyProtocol {
    /// The parser's setting, `None` when off.
    pub fn accept(self) -> Option<crate::proxy::Accept> {
        match self {
            ProxyProtocol::Off => None,
            ProxyProtocol::V1 => Some(crate::proxy::Accept::V1),
            ProxyProtocol::V2 => Some(crate::proxy::Accept::V2),
            ProxyProtocol::Any => Some(crate::proxy::Accept::Any),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec!["0.0.0.0:9212".into()],
            max_connections: 10_000,
            max_per_ip: 1_000,
            idle_timeout: Dur(Duration::from_secs(600)),
            partial_frame_timeout: Dur(Duration::from_secs(30)),
            max_frame_bytes: 10_240,
            max_junk_bytes: 65_536,
            junk_record_bytes: 4096,
            tcp_keepalive: Dur(Duration::from_secs(60)),
            write_timeout: Dur(Duration::from_secs(10)),
            shutdown_grace: Dur(Duration::from_secs(10)),
            proxy_protocol: ProxyProtocol::Off,
            proxy_trusted: Vec::new(),
            proxy_header_timeout: Dur(Duration::from_secs(5)),
            proxy_max_header: 4096,
        }
    }
}

/// Durability mode of the frame log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sync {
    /// fsync on every commit (no acked frame is lost on power failure).
    Full,
    /// fsync at WAL checkpoints only (an OS crash may lose the last commits).
    Normal,
    /// Never fsync (tests and benchmarks only).
    Off,
}

/// `[store]`: the SQLite frame log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Database file; relative paths are under the data directory.
    pub path: PathBuf,
    /// `full` (default), `normal` or `off`.
    pub sync: Sync,
    /// Most records committed in one transaction.
    pub batch_max: usize,
    /// Longest a record waits for companions before its batch commits.
    pub batch_delay: Dur,
    /// Bounded queue of records awaiting the writer; when full, sessions stop reading.
    pub queue: usize,
    /// Committed records kept in memory for the consumers (MQTT, upstreams, alarms);
    /// 0 makes every consumer read SQLite.
    pub feed_records: usize,
    /// Nice steps the writer thread runs above the rest of the gateway (0..=20).
    pub writer_boost: u8,
    /// Records (and entries of each index on them) the start-up check reads from
    /// the end of an existing log (1..=1,000,000).
    pub check_tail: usize,
    /// Crash-loop guard of the log's consumers (MQTT, upstreams, alarms): after this
    /// many consecutive starts at the same cursor without a clean stop, a consumer
    /// marks each record before working on it, so one more crash names the record,
    /// which the next start sets aside (dead letter, reason `crash`). 1..=100.
    pub crash_loop_starts: u32,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            path: PathBuf::from("frames.db"),
            sync: Sync::Full,
            batch_max: 512,
            batch_delay: Dur(Duration::from_millis(2)),
            queue: 8192,
            feed_records: 8192,
            writer_boost: 5,
            check_tail: crate::store::DEFAULT_CHECK_TAIL,
            crash_loop_starts: 2,
        }
    }
}

/// What to do with frames from an MN that is not in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDevice {
    /// Store, ack, forward and publish as usual.
    Accept,
    /// Store as rejected; no ack.
    Reject,
    /// Store and ack, but never forward or publish.
    Quarantine,
}

/// `[validation]`: timestamps, CRC and identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationSection {
    /// Device clock zone, e.g. `+08:00` (HJ 212 timestamps carry none).
    pub time_zone: String,
    /// DataTime ahead of receive time beyond this gives `time.future`.
    pub future_tolerance: Dur,
    /// DataTime older than this gives `time.stale` (unless RF=1).
    pub stale_after: Dur,
    /// CRC policy for devices without their own: strict | modbus | swapped | any.
    pub crc: CrcPolicy,
    /// accept | reject | quarantine.
    pub unknown_device: UnknownDevice,
    /// Standard data-segment maximum; longer segments get `frame.oversize` (warning).
    pub max_segment: usize,
}

impl Default for ValidationSection {
    fn default() -> Self {
        ValidationSection {
            time_zone: "+08:00".into(),
            future_tolerance: Dur(Duration::from_secs(300)),
            stale_after: Dur(Duration::from_secs(48 * 3600)),
            crc: CrcPolicy::Strict,
            unknown_device: UnknownDevice::Accept,
            max_segment: 1024,
        }
    }
}

/// `[registry]`: where else devices come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// A TOML file of `[[device]]` entries, re-read on SIGHUP.
    pub devices_file: Option<PathBuf>,
}

/// Kind of site equipment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Analyzer or data logger sending monitoring data.
    #[default]
    Analyzer,
    /// Site video gateway (heartbeats and status only).
    Video,
}

/// One `[[device]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// Device id.
    pub mn: String,
    /// Expected password; frames with another PW are rejected.
    pub pw: Option<String>,
    /// Dialect override: 2005 | 2017 | 2025 | surface-water.
    pub dialect: Option<String>,
    /// CRC policy: strict | modbus | swapped | any.
    pub crc: Option<CrcPolicy>,
    /// Current SM4 key, 32 hex digits (2025 encrypted devices).
    pub key: Option<String>,
    /// Previous keys still accepted during a key change.
    #[serde(default)]
    pub old_keys: Vec<String>,
    /// analyzer | video.
    #[serde(default)]
    pub kind: DeviceKind,
    /// Free-text name for operators.
    pub name: Option<String>,
    /// Automatic gap backfill for this device; unset follows `[downlink] backfill`.
    pub backfill: Option<bool>,
    /// Automatic clock calibration for this device; unset follows `[downlink] time_sync`.
    pub time_sync: Option<bool>,
    /// 2025: the key pushed with CN 1014 when the device asks for a new one (32 hex
    /// digits). Accepted for decoding alongside `key` and `old_keys` during the changeover.
    pub next_key: Option<String>,
}

/// Largest `[mqtt] merge_max_packets`.
pub const MAX_MERGE_PACKETS: u64 = 65_535;

/// `[mqtt]`: republishing the frame log to an MQTT broker (see README "MQTT").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// Run the publisher at all.
    pub enabled: bool,
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (TLS, 8883).
    pub url: String,
    /// MQTT client id; default `hj212-gateway-<hostname>`.
    pub client_id: Option<String>,
    /// MQTT user name.
    pub username: Option<String>,
    /// MQTT password (prefer `password_file`).
    pub password: Option<String>,
    /// File whose content (trailing newline trimmed) is the password; read at start.
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle that signs the broker's certificate (`mqtts://`); default: system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (needs `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// MQTT keep-alive interval.
    pub keep_alive: Dur,
    /// QoS of data messages: 0, 1 (default) or 2. The cursor advances on PUBACK (1),
    /// PUBCOMP (2) or once written (0, which is at-most-once).
    pub qos: u8,
    /// First topic level.
    pub topic_prefix: String,
    /// Publishes awaiting their acknowledgement at once (1..=65535).
    pub max_inflight: usize,
    /// Also publish rejected frames on `{prefix}/{mn}/rejected`.
    pub publish_rejected: bool,
    /// Include `raw`/`raw_b64` (which contain the device password) in payloads.
    pub include_raw: bool,
    /// Records read from the log per query.
    pub batch: usize,
    /// Longest a split upload (PNUM/PNO) waits for its missing packets before its
    /// merged message goes out with `packets.incomplete`.
    pub merge_wait: Dur,
    /// Most split-upload groups held open at once; beyond it the oldest is published
    /// incomplete (memory bound).
    pub merge_max_groups: usize,
    /// Most packets a split upload may announce (PNUM) to be merged; a larger one
    /// is published packet by packet on the merged topic with `packets.not_merged`.
    /// Also the most packets one group holds (resent PNOs count).
    pub merge_max_packets: u64,
    /// Most bytes all open split-upload groups hold together; beyond it the oldest
    /// group is published incomplete (memory bound).
    pub merge_max_bytes: usize,
    /// Cap of the exponential reconnect backoff.
    pub reconnect_max: Dur,
    /// Largest MQTT packet the publisher sends (set it to the broker's limit). A
    /// message that would exceed it is not sent: its record is set aside (dead
    /// letter, reason `oversize`); merged split uploads are kept under it.
    /// 1024..=268435455 bytes.
    pub max_packet_size: usize,
    /// Connection losses with the same message alone in flight before that message
    /// is set aside (dead letter, reason `broker_refused`): how a broker refuses a
    /// publish under MQTT 3.1.1. 1..=100.
    pub max_refusals: u32,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            enabled: true,
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive: Dur(Duration::from_secs(30)),
            qos: 1,
            topic_prefix: "hj212".into(),
            max_inflight: 1024,
            publish_rejected: false,
            include_raw: false,
            batch: 1024,
            merge_wait: Dur(Duration::from_secs(60)),
            merge_max_groups: 10_000,
            merge_max_packets: 256,
            merge_max_bytes: 64 << 20,
            max_packet_size: 1 << 20,
            reconnect_max: Dur(Duration::from_secs(10)),
            max_refusals: 3,
        }
    }
}

/// How an upstream connection is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamMode {
    /// One long-lived connection (default).
    #[default]
    Persistent,
    /// A new connection for every frame, closed once it is delivered.
    PerMessage,
}

/// Where a new upstream's cursor starts the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamStart {
    /// At the end of the log: only frames received from now on (default).
    #[default]
    Now,
    /// At the beginning: the whole history is sent.
    Oldest,
}

/// One `[[upstream]]`: an HJ 212 platform that receives every device frame
/// byte-exact (README "Upstream pass-through").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamEntry {
    /// Unique name: the cursor is `upstream.<name>`, relayed records carry it as `peer`.
    pub name: String,
    /// `host:port` of the platform.
    pub addr: String,
    /// Run this forwarder.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Only these MNs (empty: all).
    #[serde(default)]
    pub mn: Vec<String>,
    /// Only these STs (empty: all).
    #[serde(default)]
    pub st: Vec<String>,
    /// Only these CNs (empty: all).
    #[serde(default)]
    pub cn: Vec<String>,
    /// `persistent` or `per-message`.
    #[serde(default)]
    pub mode: UpstreamMode,
    /// How long to wait for the platform's 9014/9013 (OverTime).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: Dur,
    /// Resends after a timeout before reconnecting (ReCount).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Also forward rejected frames (never those of quarantined devices).
    #[serde(default)]
    pub include_rejected: bool,
    /// `now` or `oldest`: where the cursor starts the first time.
    #[serde(default)]
    pub start: UpstreamStart,
    /// Requests of this platform the gateway cannot relay (the device has no
    /// live session, or its queue is full) answered QnRtn=2 per minute; beyond
    /// it they are logged and recorded as refused, but not answered.
    #[serde(default = "default_refusals_per_minute")]
    pub refusals_per_minute: u32,
    /// Rounds of `1 + retries` sends without the platform's ack after which a frame
    /// is set aside (dead letter, reason `no_ack`), provided the platform acks the
    /// next frame (a platform that acks nothing is an outage, not a poison frame).
    /// 1..=1000.
    #[serde(default = "default_dead_letter_after")]
    pub dead_letter_after: u32,
}

fn yes() -> bool {
    true
}
fn default_ack_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_retries() -> u32 {
    3
}
fn default_refusals_per_minute() -> u32 {
    120
}
fn default_dead_letter_after() -> u32 {
    3
}

/// `[alarms.factor.<code>]` (and `[alarms.device.<MN>.factor.<code>]`): per-factor settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FactorAlarms {
    /// Lowest plausible value (`value.range`); default 0 for concentrations, 0 for pH and O2.
    pub min: Option<f64>,
    /// Highest plausible value (`value.range`); default 14 for pH (w01001), 25 for O2 (a19001).
    pub max: Option<f64>,
    /// Emission limit (`limit.hugging`); no limit, no check.
    pub limit: Option<f64>,
    /// Overrides `alarms.stuck_count` for this factor.
    pub stuck_count: Option<u32>,
    /// Overrides `alarms.spike_k` for this factor.
    pub spike_k: Option<f64>,
}

/// `[alarms.device.<MN>]`: per-device settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceAlarms {
    /// Fixed `device.offline` threshold instead of the learned one.
    pub offline_after: Option<Dur>,
    /// Reference O2 (%) of this source, enables `converted.mismatch`.
    pub reference_o2: Option<f64>,
    /// Detectors switched off for this device.
    pub disabled: Vec<String>,
    /// Per-factor settings for this device (override `[alarms.factor]`).
    pub factor: std::collections::BTreeMap<String, FactorAlarms>,
}

/// `[alarms]`: abnormal-data detection (see README "Alarms").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmsSection {
    /// Run the detector task at all.
    pub enabled: bool,
    /// How often the clock is ticked for `device.offline` (and new records polled).
    pub tick: Dur,
    /// Records re-read before the cursor on restart to rebuild detector state.
    pub lookback: usize,
    /// `device.offline`: silent for longer than this many learned 2011 intervals.
    pub offline_factor: u32,
    /// `device.offline` threshold until an interval is learned (and for video devices).
    pub offline_after: Dur,
    /// `device.offline` never fires sooner than this.
    pub offline_min: Dur,
    /// `time.skew`: |receive time - DataTime| of a 2011 frame beyond this is skewed.
    pub skew_threshold: Dur,
    /// `time.skew`: consecutive skewed (or clean) 2011 frames to raise (or clear).
    pub skew_count: u32,
    /// `value.stuck`: identical consecutive samples (flag N) that raise.
    pub stuck_count: u32,
    /// `value.spike`: rolling window of samples.
    pub spike_window: usize,
    /// `value.spike`: samples needed before judging.
    pub spike_min_samples: usize,
    /// `value.spike`: robust deviations (1.4826 x MAD) from the median that make a spike.
    pub spike_k: f64,
    /// `flag.abnormal`: a flag other than N lasting longer than this raises (S at once).
    pub flag_after: Dur,
    /// `limit.hugging`: samples considered.
    pub hugging_window: usize,
    /// `limit.hugging`: share of the window within the band that raises (clears below half).
    pub hugging_fraction: f64,
    /// `limit.hugging`: band under the limit, percent of the limit.
    pub hugging_band: f64,
    /// `converted.mismatch`: allowed relative difference, percent.
    pub mismatch_tolerance: f64,
    /// `converted.mismatch`: allowed absolute difference (rounding of small values).
    pub mismatch_abs: f64,
    /// Reference O2 (%) for all devices; unset means `converted.mismatch` only runs for
    /// devices with their own `reference_o2`.
    pub reference_o2: Option<f64>,
    /// Nice steps the detector's thread runs below the gateway (0 = the same).
    pub nice: u8,
    /// Devices outside the registry (and `[alarms.device]`) the detectors keep state
    /// for; past it the one heard from longest ago is forgotten and its alarms end.
    pub max_unregistered_devices: usize,
    /// Failed commits of one step's alarm events after which they are set aside
    /// (dead letter `alarms`, reason `store_refused`) and the cursor moves on.
    /// 1..=1000.
    pub max_store_failures: u32,
    /// Detectors switched off everywhere, e.g. `["value.stuck"]`.
    pub disabled: Vec<String>,
    /// Per-factor settings.
    pub factor: std::collections::BTreeMap<String, FactorAlarms>,
    /// Per-device settings, keyed by MN.
    pub device: std::collections::BTreeMap<String, DeviceAlarms>,
}

impl Default for AlarmsSection {
    fn default() -> Self {
        AlarmsSection {
            enabled: true,
            tick: Dur(Duration::from_secs(5)),
            lookback: 5000,
            offline_factor: 3,
            offline_after: Dur(Duration::from_secs(600)),
            offline_min: Dur(Duration::from_secs(60)),
            skew_threshold: Dur(Duration::from_secs(300)),
            skew_count: 3,
            stuck_count: 30,
            spike_window: 60,
            spike_min_samples: 20,
            spike_k: 8.0,
            flag_after: Dur(Duration::from_secs(3600)),
            hugging_window: 20,
            hugging_fraction: 0.8,
            hugging_band: 5.0,
            mismatch_tolerance: 5.0,
            mismatch_abs: 1.0,
            reference_o2: None,
            nice: 10,
            max_unregistered_devices: 5000,
            max_store_failures: 10,
            disabled: Vec::new(),
            factor: Default::default(),
            device: Default::default(),
        }
    }
}

/// Largest accepted `max_unregistered_devices` (alarms and downlink): a cap far
/// above it is no cap.
pub const MAX_TRACKED: usize = 1_000_000;

/// Detector names accepted in `disabled`.
pub const DETECTORS: &[&str] = &[
    "device.offline",
    "data.gap",
    "time.skew",
    "value.stuck",
    "value.range",
    "value.spike",
    "flag.abnormal",
    "limit.hugging",
    "converted.mismatch",
];

/// Broker address parsed from `[mqtt] url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `mqtts://`.
    pub tls: bool,
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Parses `mqtt://host[:port]` / `mqtts://host[:port]` (IPv6 as `[::1]`).
pub fn parse_broker_url(url: &str) -> Result<BrokerUrl, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!("{url:?}: scheme must be mqtt:// or mqtts://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("{url:?}: unexpected text after ']'")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() || host.contains(['/', '@', '?', '#']) {
        return Err(format!("{url:?}: expected mqtt[s]://host[:port]"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{url:?}: bad port"))?,
        None => default_port,
    };
    Ok(BrokerUrl {
        tls,
        host: host.to_owned(),
        port,
    })
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[store]`.
    pub store: StoreSection,
    /// `[validation]`.
    pub validation: ValidationSection,
    /// `[registry]`.
    pub registry: RegistrySection,
    /// `[mqtt]`.
    pub mqtt: MqttSection,
    /// `[alarms]`.
    pub alarms: AlarmsSection,
    /// `[metrics]`.
    pub metrics: crate::metrics::MetricsConfig,
    /// `[[device]]`.
    pub device: Vec<DeviceEntry>,
    /// `[[upstream]]`.
    pub upstream: Vec<UpstreamEntry>,
    /// `[downlink]`.
    pub downlink: crate::downlink::config::DownlinkSection,
    /// `[log]`.
    pub log: LogSection,
}

/// `[log]`: the gateway's own log lines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A warning or error that repeats (per frame, per connection, per retry) is
    /// logged once, then at most once per this interval with the count of the
    /// lines suppressed meanwhile (1 s ..= 1 h).
    pub repeat_interval: Dur,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            repeat_interval: Dur(crate::telemetry::DEFAULT_REPEAT_INTERVAL),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesFile {
    #[serde(default)]
    device: Vec<DeviceEntry>,
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg = Config::parse(&text, path)?;
        Ok(cfg)
    }

    /// Parses and checks TOML text (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// Semantic checks that serde cannot express.
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        if self.server.listen.is_empty() {
            return Err(bad(
                "server.listen",
                "at least one address is required".into(),
            ));
        }
        for a in &self.server.listen {
            a.parse::<SocketAddr>()
                .map_err(|e| bad("server.listen", format!("{a:?}: {e}")))?;
        }
        let positive = [
            ("server.max_connections", self.server.max_connections),
            ("server.max_per_ip", self.server.max_per_ip),
            ("server.max_frame_bytes", self.server.max_frame_bytes),
            ("store.batch_max", self.store.batch_max),
            ("store.queue", self.store.queue),
            ("validation.max_segment", self.validation.max_segment),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(bad(k, "must be greater than 0".into()));
            }
        }
        if self.store.writer_boost > 20 {
            return Err(bad(
                "store.writer_boost",
                "must be between 0 and 20 (nice steps)".into(),
            ));
        }
        if !(1..=1_000_000).contains(&self.store.check_tail) {
            return Err(bad(
                "store.check_tail",
                "must be between 1 and 1000000 (records)".into(),
            ));
        }
        let repeat = self.log.repeat_interval.0;
        if repeat < Duration::from_secs(1) || repeat > Duration::from_secs(3600) {
            return Err(bad(
                "log.repeat_interval",
                "must be between 1s and 1h".into(),
            ));
        }
        if !(1..=100).contains(&self.store.crash_loop_starts) {
            return Err(bad(
                "store.crash_loop_starts",
                "must be between 1 and 100".into(),
            ));
        }
        // Below ~1 KiB a junk record's fixed cost (its document, row and
        // hash, up to ~2.5 KB) would outweigh its bytes: the log's growth per
        // junk byte is bounded by 8 only above that.
        if !(1024..=1 << 20).contains(&self.server.junk_record_bytes) {
            return Err(bad(
                "server.junk_record_bytes",
                "must be between 1024 and 1048576".into(),
            ));
        }
        if self.server.max_frame_bytes < 64 || self.server.max_frame_bytes > 1 << 20 {
            return Err(bad(
                "server.max_frame_bytes",
                "must be between 64 and 1048576".into(),
            ));
        }
        self.check_durations(path)?;
        self.check_proxy(path)?;
        self.time_zone().ok_or_else(|| {
            bad(
                "validation.time_zone",
                format!(
                    "{:?} is not an offset like \"+08:00\"",
                    self.validation.time_zone
                ),
            )
        })?;
        self.check_mqtt(path)?;
        self.check_alarms(path)?;
        check_devices(&self.device, path)?;
        self.check_upstreams(path)?;
        self.downlink.check(path)?;
        self.metrics.check(path)?;
        Ok(())
    }

    /// The parsed `[server] proxy_trusted` blocks (valid once `check` passed).
    pub fn proxy_trusted(&self) -> Vec<crate::proxy::Cidr> {
        self.server
            .proxy_trusted
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect()
    }

    /// Every duration a hostile or mistaken value could turn into a stall: a
    /// zero that spins a timer, or an hour that holds every ack or SIGTERM.
    /// Bounds are inclusive; the message names the key and the range.
    fn check_durations(&self, path: &Path) -> Result<(), ConfigError> {
        const MS: fn(u64) -> Duration = Duration::from_millis;
        const S: fn(u64) -> Duration = Duration::from_secs;
        let (sv, st, m, a, d) = (
            &self.server,
            &self.store,
            &self.mqtt,
            &self.alarms,
            &self.downlink,
        );
        let bounds: [(&str, Duration, Duration, Duration); 18] = [
            // Sessions: each of these closes or delays a connection.
            (
                "server.idle_timeout",
                sv.idle_timeout.0,
                S(1),
                S(7 * 86_400),
            ),
            (
                "server.partial_frame_timeout",
                sv.partial_frame_timeout.0,
                S(1),
                S(3600),
            ),
            ("server.tcp_keepalive", sv.tcp_keepalive.0, S(1), S(7200)),
            // A reply write and the SIGTERM grace both hold shutdown.
            ("server.write_timeout", sv.write_timeout.0, MS(100), S(60)),
            ("server.shutdown_grace", sv.shutdown_grace.0, S(0), S(60)),
            (
                "server.proxy_header_timeout",
                sv.proxy_header_timeout.0,
                MS(1),
                S(60),
            ),
            // Every ack waits for its batch's commit.
            ("store.batch_delay", st.batch_delay.0, S(0), S(1)),
            ("mqtt.merge_wait", m.merge_wait.0, S(0), S(3600)),
            ("mqtt.reconnect_max", m.reconnect_max.0, MS(100), S(600)),
            ("alarms.tick", a.tick.0, MS(100), S(300)),
            (
                "alarms.offline_after",
                a.offline_after.0,
                S(1),
                S(30 * 86_400),
            ),
            ("alarms.offline_min", a.offline_min.0, S(0), S(30 * 86_400)),
            ("downlink.over_time", d.over_time.0, MS(100), S(600)),
            ("downlink.exec_timeout", d.exec_timeout.0, S(1), S(3600)),
            (
                "downlink.time_sync_interval",
                d.time_sync_interval.0,
                S(1),
                S(30 * 86_400),
            ),
            (
                "downlink.backfill_max_window",
                d.backfill_max_window.0,
                S(60),
                S(31 * 86_400),
            ),
            (
                "downlink.backfill_interval",
                d.backfill_interval.0,
                S(1),
                S(30 * 86_400),
            ),
            (
                "validation.stale_after",
                self.validation.stale_after.0,
                S(1),
                S(3660 * 86_400),
            ),
        ];
        for (key, v, lo, hi) in bounds {
            if v < lo || v > hi {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    key: key.to_owned(),
                    message: format!(
                        "{} is out of range: must be between {} and {}",
                        show_duration(v),
                        show_duration(lo),
                        show_duration(hi)
                    ),
                });
            }
        }
        for (i, u) in self.upstream.iter().enumerate() {
            if u.ack_timeout.0 > S(120) {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    key: format!("upstream[{i}].ack_timeout"),
                    message: format!(
                        "{} is out of range: must be between 50ms and 120s",
                        show_duration(u.ack_timeout.0)
                    ),
                });
            }
        }
        Ok(())
    }

    fn check_proxy(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        for c in &self.server.proxy_trusted {
            c.parse::<crate::proxy::Cidr>()
                .map_err(|e| bad("server.proxy_trusted", e))?;
        }
        // Trusting nobody would refuse every connection; trusting everybody by
        // default would let any client claim any address. Make it explicit.
        if self.server.proxy_protocol != ProxyProtocol::Off && self.server.proxy_trusted.is_empty()
        {
            return Err(bad(
                "server.proxy_trusted",
                "list the load balancers' addresses (e.g. [\"10.0.0.0/8\"]) when proxy_protocol is on"
                    .into(),
            ));
        }
        if self.server.proxy_header_timeout.0.is_zero() {
            return Err(bad(
                "server.proxy_header_timeout",
                "must be greater than 0".into(),
            ));
        }
        let max = self.server.proxy_max_header;
        if !(crate::proxy::V2_FIXED + 36..=crate::proxy::V2_FIXED + 65_535).contains(&max) {
            return Err(bad(
                "server.proxy_max_header",
                "must be between 52 and 65551".into(),
            ));
        }
        Ok(())
    }

    fn check_alarms(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let a = &self.alarms;
        if !(1..=1000).contains(&a.max_store_failures) {
            return Err(bad(
                "alarms.max_store_failures".into(),
                "must be between 1 and 1000".into(),
            ));
        }
        let positive = [
            ("tick", a.tick.0.is_zero()),
            ("offline_factor", a.offline_factor == 0),
            ("offline_after", a.offline_after.0.is_zero()),
            ("skew_count", a.skew_count == 0),
            ("stuck_count", a.stuck_count < 2),
            ("spike_window", a.spike_window < 5),
            (
                "spike_min_samples",
                a.spike_min_samples < 5 || a.spike_min_samples > a.spike_window,
            ),
            ("spike_k", !(a.spike_k.is_finite() && a.spike_k > 0.0)),
            ("hugging_window", a.hugging_window < 2),
            (
                "hugging_fraction",
                !(a.hugging_fraction > 0.0 && a.hugging_fraction <= 1.0),
            ),
            (
                "hugging_band",
                !(a.hugging_band > 0.0 && a.hugging_band < 100.0),
            ),
            (
                "mismatch_tolerance",
                !(a.mismatch_tolerance >= 0.0 && a.mismatch_tolerance.is_finite()),
            ),
            (
                "mismatch_abs",
                !(a.mismatch_abs >= 0.0 && a.mismatch_abs.is_finite()),
            ),
            ("nice", a.nice > 19),
            (
                "max_unregistered_devices",
                a.max_unregistered_devices == 0 || a.max_unregistered_devices > MAX_TRACKED,
            ),
        ];
        for (k, wrong) in positive {
            if wrong {
                return Err(bad(
                    format!("alarms.{k}"),
                    "out of range (see deploy/gateway.toml)".into(),
                ));
            }
        }
        let o2 = |key: String, v: Option<f64>| match v {
            Some(x) if !(0.0..21.0).contains(&x) => Err(bad(key, "must be in 0..21 (%)".into())),
            _ => Ok(()),
        };
        o2("alarms.reference_o2".into(), a.reference_o2)?;
        let names = |key: String, list: &[String]| {
            for d in list {
                if !DETECTORS.contains(&d.as_str()) {
                    return Err(bad(
                        key,
                        format!("{d:?} is not a detector; expected one of {DETECTORS:?}"),
                    ));
                }
            }
            Ok(())
        };
        names("alarms.disabled".into(), &a.disabled)?;
        let factors = |prefix: String, f: &std::collections::BTreeMap<String, FactorAlarms>| {
            for (code, fa) in f {
                let k = |x: &str| format!("{prefix}.{code}.{x}");
                for (name, v) in [
                    ("min", fa.min),
                    ("max", fa.max),
                    ("limit", fa.limit),
                    ("spike_k", fa.spike_k),
                ] {
                    if v.is_some_and(|x| !x.is_finite()) {
                        return Err(bad(k(name), "must be a finite number".into()));
                    }
                }
                if let (Some(lo), Some(hi)) = (fa.min, fa.max) {
                    if lo > hi {
                        return Err(bad(k("min"), "greater than max".into()));
                    }
                }
                if fa.limit.is_some_and(|l| l <= 0.0) {
                    return Err(bad(k("limit"), "must be positive".into()));
                }
                if fa.stuck_count.is_some_and(|n| n < 2) {
                    return Err(bad(k("stuck_count"), "must be at least 2".into()));
                }
                if fa.spike_k.is_some_and(|x| x <= 0.0) {
                    return Err(bad(k("spike_k"), "must be positive".into()));
                }
            }
            Ok(())
        };
        factors("alarms.factor".into(), &a.factor)?;
        for (mn, d) in &a.device {
            let p = format!("alarms.device.{mn}");
            o2(format!("{p}.reference_o2"), d.reference_o2)?;
            names(format!("{p}.disabled"), &d.disabled)?;
            if d.offline_after.is_some_and(|x| x.0.is_zero()) {
                return Err(bad(format!("{p}.offline_after"), "must be positive".into()));
            }
            factors(format!("{p}.factor"), &d.factor)?;
        }
        Ok(())
    }

    fn check_mqtt(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("mqtt.{key}"),
            message,
        };
        let m = &self.mqtt;
        let url = parse_broker_url(&m.url).map_err(|e| bad("url", e))?;
        if m.qos > 2 {
            return Err(bad("qos", "must be 0, 1 or 2".into()));
        }
        if m.max_inflight == 0 || m.max_inflight > 65_535 {
            return Err(bad("max_inflight", "must be between 1 and 65535".into()));
        }
        for (k, v) in [("batch", m.batch), ("merge_max_groups", m.merge_max_groups)] {
            if v == 0 {
                return Err(bad(k, "must be greater than 0".into()));
            }
        }
        if !(2..=MAX_MERGE_PACKETS).contains(&m.merge_max_packets) {
            return Err(bad(
                "merge_max_packets",
                format!("must be between 2 and {MAX_MERGE_PACKETS}"),
            ));
        }
        let topic_ok = |t: &str| !t.is_empty() && !t.contains(['+', '#', '\0']);
        if !topic_ok(&m.topic_prefix) || m.topic_prefix.ends_with('/') {
            return Err(bad(
                "topic_prefix",
                "must be non-empty, without '+', '#' or a trailing '/'".into(),
            ));
        }
        if let Some(id) = &m.client_id {
            if !topic_ok(id) || id.contains('/') || id.len() > 128 {
                return Err(bad(
                    "client_id",
                    "must be 1..128 characters without '+', '#' or '/'".into(),
                ));
            }
        }
        // The password is a secret: messages never repeat it.
        if m.password.is_some() && m.password_file.is_some() {
            return Err(bad(
                "password_file",
                "set either password or password_file, not both".into(),
            ));
        }
        if (m.password.is_some() || m.password_file.is_some()) && m.username.is_none() {
            return Err(bad("username", "required when a password is set".into()));
        }
        if m.client_cert.is_some() != m.client_key.is_some() {
            let key = if m.client_cert.is_some() {
                "client_key"
            } else {
                "client_cert"
            };
            return Err(bad(key, "client_cert and client_key go together".into()));
        }
        if !url.tls {
            for (k, v) in [
                ("ca_file", &m.ca_file),
                ("client_cert", &m.client_cert),
                ("client_key", &m.client_key),
            ] {
                if v.is_some() {
                    return Err(bad(k, "only used with an mqtts:// url".into()));
                }
            }
        }
        if m.keep_alive.0 < Duration::from_secs(5) || m.keep_alive.0 > Duration::from_secs(65_535) {
            return Err(bad("keep_alive", "must be between 5s and 65535s".into()));
        }
        if m.reconnect_max.0 < Duration::from_millis(100) {
            return Err(bad("reconnect_max", "must be at least 100ms".into()));
        }
        // 268,435,455: the largest remaining length MQTT can encode.
        if !(1024..=268_435_455).contains(&m.max_packet_size) {
            return Err(bad(
                "max_packet_size",
                "must be between 1024 and 268435455 bytes".into(),
            ));
        }
        if m.merge_max_bytes < m.max_packet_size {
            return Err(bad(
                "merge_max_bytes",
                format!(
                    "must be at least max_packet_size ({} bytes): one merged message \
                     must fit the budget",
                    m.max_packet_size
                ),
            ));
        }
        if !(1..=100).contains(&m.max_refusals) {
            return Err(bad("max_refusals", "must be between 1 and 100".into()));
        }
        Ok(())
    }

    fn check_upstreams(&self, path: &Path) -> Result<(), ConfigError> {
        for (i, u) in self.upstream.iter().enumerate() {
            let bad = |key: &str, message: String| ConfigError::Invalid {
                path: path.to_owned(),
                key: format!("upstream[{i}].{key}"),
                message,
            };
            let name_ok = !u.name.is_empty()
                && u.name.len() <= 64
                && u.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !name_ok {
                return Err(bad(
                    "name",
                    "must be 1..64 characters of letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if self.upstream[..i].iter().any(|o| o.name == u.name) {
                return Err(bad("name", format!("{:?} is used twice", u.name)));
            }
            // host:port; the host may be a name, resolved at each connect.
            let port_ok = u
                .addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok {
                return Err(bad("addr", format!("{:?}: expected host:port", u.addr)));
            }
            if u.ack_timeout.0 < Duration::from_millis(50) {
                return Err(bad("ack_timeout", "must be at least 50ms".into()));
            }
            if u.retries > 100 {
                return Err(bad("retries", "must be at most 100".into()));
            }
            if u.refusals_per_minute == 0 || u.refusals_per_minute > 60_000 {
                return Err(bad(
                    "refusals_per_minute",
                    "must be between 1 and 60000".into(),
                ));
            }
            if !(1..=1000).contains(&u.dead_letter_after) {
                return Err(bad(
                    "dead_letter_after",
                    "must be between 1 and 1000".into(),
                ));
            }
        }
        Ok(())
    }

    /// The device time zone.
    pub fn time_zone(&self) -> Option<FixedOffset> {
        parse_offset(&self.validation.time_zone)
    }

    /// Store file path resolved against the data directory.
    pub fn store_path(&self, data_dir: &Path) -> PathBuf {
        if self.store.path.is_absolute() {
            self.store.path.clone()
        } else {
            data_dir.join(&self.store.path)
        }
    }
}

/// Loads a devices file (SIGHUP reload source).
pub fn load_devices_file(path: &Path) -> Result<Vec<DeviceEntry>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let f: DevicesFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    check_devices(&f.device, path)?;
    Ok(f.device)
}

fn check_devices(devices: &[DeviceEntry], path: &Path) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for (i, d) in devices.iter().enumerate() {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("device[{i}].{field}"),
            message,
        };
        if !header_value_ok(&d.mn, 32) {
            return Err(bad(
                "mn",
                format!(
                    "{:?} is not a valid MN: 1..32 printable ASCII characters without spaces, ';', ',', '=' or '&'",
                    d.mn
                ),
            ));
        }
        // The password is a secret: the message never repeats it.
        if d.pw.as_deref().is_some_and(|pw| !header_value_ok(pw, 32)) {
            return Err(bad(
                "pw",
                "is not a valid PW: 1..32 printable ASCII characters without spaces, ';', ',', '=' or '&' (the gateway writes it into frame headers)".into(),
            ));
        }
        if !seen.insert(d.mn.as_str()) {
            return Err(bad("mn", format!("{:?} appears twice", d.mn)));
        }
        if let Some(dl) = &d.dialect {
            Dialect::parse(dl).ok_or_else(|| {
                bad(
                    "dialect",
                    format!("{dl:?}: expected 2005, 2017, 2025 or surface-water"),
                )
            })?;
        }
        // Keys are secrets: the message never repeats them.
        if let Some(k) = &d.key {
            crypt::parse_key(k)
                .ok_or_else(|| bad("key", "must be 32 hex digits (16 bytes)".into()))?;
        }
        if let Some(k) = &d.next_key {
            crypt::parse_key(k)
                .ok_or_else(|| bad("next_key", "must be 32 hex digits (16 bytes)".into()))?;
            // The push travels encrypted under the current key.
            if d.key.is_none() {
                return Err(bad(
                    "next_key",
                    "needs `key` (the push is encrypted with it)".into(),
                ));
            }
        }
        for (j, k) in d.old_keys.iter().enumerate() {
            crypt::parse_key(k).ok_or_else(|| {
                bad(
                    &format!("old_keys[{j}]"),
                    "must be 32 hex digits (16 bytes)".into(),
                )
            })?;
        }
    }
    Ok(())
}

/// A value the gateway may write into an HJ 212 header field (`MN=`, `PW=`).
///
/// HJ 212-2017 §6.3.2 (Table 3) gives MN as 24 characters `0-9A-F` and PW as
/// 6 characters; the field has no escaping, so `;` ends the field, `,` `=` and
/// `&` are CP separators and control characters break line-based tooling.
/// Loggers in the field use longer passwords (24 hex seen) and other MN
/// alphabets, so this admits any printable ASCII up to `max` bytes except those.
pub fn header_value_ok(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'=' | b'&'))
}

/// `1h`, `250ms`, `90s`: the shortest exact form, for error messages.
fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses `+08:00`, `-05:30`, `Z` or `UTC`.
pub fn parse_offset(text: &str) -> Option<FixedOffset> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match t.as_bytes().first()? {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let h: i32 = h.parse().ok()?;
    let m: i32 = m.parse().ok()?;
    if h > 14 || m > 59 {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("t.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn durations_that_would_stall_acks_or_shutdown_are_refused() {
        for (text, key) in [
            ("[store]\nbatch_delay = \"1h\"", "`store.batch_delay`"),
            ("[store]\nbatch_delay = \"1001ms\"", "`store.batch_delay`"),
            ("[server]\nidle_timeout = \"0s\"", "`server.idle_timeout`"),
            (
                "[server]\nidle_timeout = \"999ms\"",
                "`server.idle_timeout`",
            ),
            (
                "[server]\nshutdown_grace = \"1h\"",
                "`server.shutdown_grace`",
            ),
            ("[server]\nwrite_timeout = \"0s\"", "`server.write_timeout`"),
            ("[server]\nwrite_timeout = \"2m\"", "`server.write_timeout`"),
            (
                "[server]\npartial_frame_timeout = \"0s\"",
                "`server.partial_frame_timeout`",
            ),
            ("[server]\ntcp_keepalive = \"0s\"", "`server.tcp_keepalive`"),
            ("[alarms]\ntick = \"1ms\"", "`alarms.tick`"),
            ("[mqtt]\nmerge_wait = \"2h\"", "`mqtt.merge_wait`"),
            ("[mqtt]\nreconnect_max = \"1d\"", "`mqtt.reconnect_max`"),
            ("[downlink]\nover_time = \"50ms\"", "`downlink.over_time`"),
            (
                "[downlink]\nexec_timeout = \"2h\"",
                "`downlink.exec_timeout`",
            ),
            (
                "[[upstream]]\nname = \"p\"\naddr = \"h:1\"\nack_timeout = \"1h\"",
                "`upstream[0].ack_timeout`",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(key) && e.contains("out of range"), "{text}: {e}");
        }
        assert!(err("[store]\nbatch_delay = \"1h\"").contains("between 0s and 1s"));
        // The edges are allowed.
        for text in [
            "[store]\nbatch_delay = \"1s\"",
            "[store]\nbatch_delay = \"0ms\"",
            "[server]\nidle_timeout = \"1s\"\nshutdown_grace = \"0s\"",
            "[server]\nshutdown_grace = \"60s\"",
        ] {
            Config::parse(text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        // A count of units that overflows is an error, not a wrap or a panic.
        assert!(err("[store]\nbatch_delay = \"99999999999999999d\"").contains("too long"));
    }

    #[test]
    fn mn_and_pw_cannot_carry_header_syntax() {
        for (text, key) in [
            ("[[device]]\nmn = \"A\"\npw = \"12;MN=X\"", "`device[0].pw`"),
            ("[[device]]\nmn = \"A\"\npw = \"a&&b\"", "`device[0].pw`"),
            ("[[device]]\nmn = \"A\"\npw = \"a,b\"", "`device[0].pw`"),
            ("[[device]]\nmn = \"A\"\npw = \"a=b\"", "`device[0].pw`"),
            ("[[device]]\nmn = \"A\"\npw = \"\"", "`device[0].pw`"),
            (
                "[[device]]\nmn = \"A\"\npw = \"12\\r\\n34\"",
                "`device[0].pw`",
            ),
            ("[[device]]\nmn = \"A\"\npw = \"12 34\"", "`device[0].pw`"),
            ("[[device]]\nmn = \"A\\u0007\"", "`device[0].mn`"),
            ("[[device]]\nmn = \"A B\"", "`device[0].mn`"),
            ("[[device]]\nmn = \"站点1\"", "`device[0].mn`"),
        ] {
            let e = err(text);
            assert!(e.contains(key), "{text}: {e}");
        }
        // The secret is never echoed back.
        assert!(!err("[[device]]\nmn = \"A\"\npw = \"se;cret\"").contains("se;cret"));
        let c = Config::parse(
            "[[device]]\nmn = \"010000A8900016F000169DC0\"\npw = \"100000\"\n\
             [[device]]\nmn = \"88888880000001\"\npw = \"0123456789ABCDEF01234567\"",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.device.len(), 2);
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(c.server.listen, ["0.0.0.0:9212"]);
        assert_eq!(c.store.sync, Sync::Full);
        assert_eq!(c.time_zone(), FixedOffset::east_opt(8 * 3600));
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("[server]\nlisten = [\"nope\"]").contains("`server.listen`"));
        assert!(err("[server]\nlisen = []").contains("lisen"));
        assert!(err("[store]\nsync = \"sometimes\"").contains("sync"));
        assert!(err("[server]\nidle_timeout = \"5 parsecs\"").contains("idle_timeout"));
        assert!(err("[validation]\ntime_zone = \"Mars\"").contains("`validation.time_zone`"));
        assert!(err("[[device]]\nmn = \"A\"\nkey = \"00\"").contains("`device[0].key`"));
        assert!(err("[[device]]\nmn = \"A\"\n[[device]]\nmn = \"A\"").contains("`device[1].mn`"));
        let e = err("[[device]]\nmn = \"A\"\nkey = \"zz\"");
        assert!(!e.contains("zz"), "keys never echoed: {e}");
    }

    /// The start-up check, the log's repeat limit and the metrics listener's caps.
    #[test]
    fn health_keys() {
        let c = Config::parse("", Path::new("t")).unwrap();
        assert_eq!(c.store.check_tail, 1000);
        assert_eq!(c.log.repeat_interval.0, Duration::from_secs(10));
        assert_eq!(c.metrics.max_connections, 64);
        assert_eq!(c.metrics.head_timeout.0, Duration::from_secs(5));
        assert!(err("[store]\ncheck_tail = 0").contains("`store.check_tail`"));
        assert!(err("[log]\nrepeat_interval = \"500ms\"").contains("`log.repeat_interval`"));
        assert!(err("[log]\nrepeat_interval = \"2h\"").contains("`log.repeat_interval`"));
        assert!(err("[metrics]\nmax_connections = 0").contains("`metrics.max_connections`"));
        assert!(err("[metrics]\nhead_timeout = \"2m\"").contains("`metrics.head_timeout`"));
    }

    #[test]
    fn junk_record_bytes_is_bounded() {
        let c = Config::parse("", Path::new("t")).unwrap();
        assert_eq!(c.server.junk_record_bytes, 4096);
        for v in ["1023", "0", "1048577"] {
            let e = err(&format!("[server]\njunk_record_bytes = {v}"));
            assert!(e.contains("`server.junk_record_bytes`"), "{e}");
        }
        assert!(Config::parse("[server]\njunk_record_bytes = 1024", Path::new("t")).is_ok());
    }

    #[test]
    fn proxy_keys() {
        let c = Config::parse("", Path::new("t")).unwrap();
        assert_eq!(c.server.proxy_protocol, ProxyProtocol::Off);
        assert_eq!(c.server.proxy_header_timeout.0, Duration::from_secs(5));
        let c = Config::parse(
            "[server]\nproxy_protocol = \"v2\"\nproxy_trusted = [\"10.0.0.0/8\", \"::1\"]",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(
            c.server.proxy_protocol.accept(),
            Some(crate::proxy::Accept::V2)
        );
        assert_eq!(c.proxy_trusted().len(), 2);
        assert!(err("[server]\nproxy_protocol = \"v1\"").contains("`server.proxy_trusted`"));
        assert!(
            err("[server]\nproxy_protocol = \"any\"\nproxy_trusted = [\"10.0.0.0/40\"]")
                .contains("`server.proxy_trusted`")
        );
        assert!(err("[server]\nproxy_protocol = \"v3\"").contains("proxy_protocol"));
        assert!(
            err("[server]\nproxy_header_timeout = \"0s\"")
                .contains("`server.proxy_header_timeout`")
        );
        assert!(err("[server]\nproxy_max_header = 20").contains("`server.proxy_max_header`"));
    }

    #[test]
    fn alarms_keys() {
        let c = Config::parse("", Path::new("t")).unwrap();
        assert!(c.alarms.enabled);
        assert_eq!(c.alarms.stuck_count, 30);
        let c = Config::parse(
            "[alarms.factor.a21026]\nlimit = 100\n[alarms.device.M1]\nreference_o2 = 9\noffline_after = \"3m\"\n[alarms.device.M1.factor.a21002]\nmax = 500",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(c.alarms.factor["a21026"].limit, Some(100.0));
        assert_eq!(c.alarms.device["M1"].factor["a21002"].max, Some(500.0));
        assert!(err("[alarms]\nstuck_count = 1").contains("`alarms.stuck_count`"));
        assert!(err("[alarms]\nspike_k = -1").contains("`alarms.spike_k`"));
        assert!(err("[alarms]\ndisabled = [\"value.stuk\"]").contains("`alarms.disabled`"));
        assert!(err("[alarms]\nreference_o2 = 21").contains("`alarms.reference_o2`"));
        assert_eq!(c.alarms.max_unregistered_devices, 5000);
        assert!(
            err("[alarms]\nmax_unregistered_devices = 0")
                .contains("`alarms.max_unregistered_devices`")
        );
        assert!(
            err("[alarms.factor.a21026]\nmin = 5\nmax = 1").contains("`alarms.factor.a21026.min`")
        );
        assert!(
            err("[alarms.device.M1.factor.a21026]\nlimit = 0")
                .contains("`alarms.device.M1.factor.a21026.limit`")
        );
        assert!(
            err("[alarms.device.M1]\nreference_o2 = 30")
                .contains("`alarms.device.M1.reference_o2`")
        );
        assert!(err("[alarms]\nstuck = 3").contains("stuck"));
    }

    #[test]
    fn mqtt_keys() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert!(c.mqtt.enabled);
        assert_eq!(c.mqtt.qos, 1);
        assert_eq!(c.mqtt.topic_prefix, "hj212");
        assert!(err("[mqtt]\nurl = \"http://x\"").contains("`mqtt.url`"));
        assert!(err("[mqtt]\nqos = 3").contains("`mqtt.qos`"));
        assert!(err("[mqtt]\nmax_inflight = 0").contains("`mqtt.max_inflight`"));
        assert!(err("[mqtt]\ntopic_prefix = \"a/#\"").contains("`mqtt.topic_prefix`"));
        assert!(err("[mqtt]\nca_file = \"ca.pem\"").contains("`mqtt.ca_file`"));
        assert!(
            err("[mqtt]\nurl = \"mqtts://h\"\nclient_cert = \"c\"").contains("`mqtt.client_key`")
        );
        assert!(err("[mqtt]\nqso = 1").contains("qso"));
        let e = err("[mqtt]\nusername = \"u\"\npassword = \"s3cret\"\npassword_file = \"f\"");
        assert!(
            e.contains("`mqtt.password_file`") && !e.contains("s3cret"),
            "{e}"
        );
        let u = parse_broker_url("mqtts://[::1]").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "::1", 8883));
        let u = parse_broker_url("mqtt://broker.example:1884").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (false, "broker.example", 1884)
        );
    }

    #[test]
    fn mqtt_merge_limit_keys() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(
            (
                c.mqtt.merge_max_packets,
                c.mqtt.merge_max_bytes,
                c.mqtt.max_packet_size
            ),
            (256, 64 << 20, 1 << 20)
        );
        for bad in [
            "merge_max_packets = 1",
            "merge_max_packets = 65536",
            "max_packet_size = 1000",
            "max_packet_size = 268435456",
            "merge_max_bytes = 1000",
        ] {
            let key = bad.split(' ').next().unwrap();
            let e = err(&format!("[mqtt]\n{bad}"));
            assert!(e.contains(&format!("`mqtt.{key}`")), "{bad}: {e}");
        }
        let c = Config::parse(
            "[mqtt]\nmax_packet_size = 16384\nmerge_max_bytes = 16384\nmerge_max_packets = 2",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.mqtt.merge_max_bytes, 16384);
    }

    #[test]
    fn upstream_keys() {
        let c = Config::parse(
            "[[upstream]]\nname = \"prov\"\naddr = \"10.0.0.1:9000\"\n\
             [[upstream]]\nname = \"city\"\naddr = \"plat.example:9001\"\nmode = \"per-message\"\n\
             cn = [\"2011\"]\nack_timeout = \"2s\"\nretries = 1\nstart = \"oldest\"\nenabled = false\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let (a, b) = (&c.upstream[0], &c.upstream[1]);
        assert!(a.enabled && !b.enabled);
        assert_eq!(
            (a.mode, a.start, a.retries),
            (UpstreamMode::Persistent, UpstreamStart::Now, 3)
        );
        assert_eq!(a.ack_timeout.0, Duration::from_secs(10));
        assert!(!a.include_rejected && a.mn.is_empty());
        assert_eq!(
            (b.mode, b.start),
            (UpstreamMode::PerMessage, UpstreamStart::Oldest)
        );
        assert_eq!(b.cn, ["2011"]);
        let up = |body: &str| {
            err(&format!(
                "[[upstream]]\nname = \"a\"\naddr = \"h:1\"\n[[upstream]]\n{body}"
            ))
        };
        assert!(up("name = \"b\"\naddr = \"nope\"").contains("`upstream[1].addr`"));
        assert_eq!(a.refusals_per_minute, 120);
        assert!(
            up("name = \"b\"\naddr = \"h:2\"\nrefusals_per_minute = 0")
                .contains("`upstream[1].refusals_per_minute`")
        );
        assert!(up("name = \"a\"\naddr = \"h:2\"").contains("`upstream[1].name`"));
        assert!(up("name = \"b c\"\naddr = \"h:2\"").contains("`upstream[1].name`"));
        assert!(
            up("name = \"b\"\naddr = \"h:2\"\nack_timeout = \"1ms\"")
                .contains("`upstream[1].ack_timeout`")
        );
        assert!(up("name = \"b\"\naddr = \"h:2\"\nmode = \"often\"").contains("mode"));
        assert!(up("name = \"b\"\naddr = \"h:2\"\nfilter = 1").contains("filter"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5").is_err());
        assert_eq!(
            parse_offset("-05:30"),
            FixedOffset::east_opt(-(5 * 3600 + 1800))
        );
    }
}
