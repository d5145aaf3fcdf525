//! `simulate`: a fleet of HJ 212 data loggers against a gateway, measuring
//! ack latency (see README "Load generator").
//!
//! Latency is recorded from each frame's *scheduled* send time, not from when
//! it was actually written, so a stalled gateway (or a stalled simulator) shows
//! up as latency instead of silently lowering the offered rate (coordinated
//! omission).
//!
//! Ctrl-C ends the run early and still prints the summary (text or `--json`),
//! computed over the time actually run and marked `interrupted`.

mod device;
pub mod fleet;

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use super::CmdError;
use fleet::{Edition, Kind};

/// Simulate a fleet of data loggers against a gateway and measure ack latency.
///
/// Each device is one connection sending 2011 real-time data every --interval (or
/// the fleet sending --rate frames/s in total), 2051 at every --minute-every minute
/// and 2061 at every full hour of its clock (2031 at midnight, +08:00, with --cn
/// 2031), acked per frame. Like a real data logger, a device derives its 2051 from
/// its own 2011 samples of that interval, its 2061 from its minutes and its 2031
/// from its hours; Cou = Avg x flow Avg x interval (HJ 212 code-table units:
/// mg/m3 x m3/s or mg/L x L/s -> kg). --speedup N runs the device clocks N times
/// as fast as the wall clock, ending at the end of the run. Devices answer
/// platform requests (1011/1012/1061/1062, 2031/2051/2061 history) with 9011,
/// data and 9012. MN of device i: --mn-prefix (default 99 + 4 hex digits of the
/// seed) then i zero-padded to 24 characters (14 for 2005). Device i's dialect is
/// slot i mod (sum of --dialects weights), its kind slot (i / that sum) mod (sum of
/// --kinds weights). --list-devices prints the fleet as [[device]] TOML (with the
/// SM4 keys of 2025e devices) for the gateway's registry.
///
/// Latency is measured from each frame's scheduled send time (coordinated omission
/// corrected); --json prints one object with sent, acked, errors, reconnects,
/// duration_s and latency_ms {p50,p90,p99,p999,max}.
///
/// Examples:
///   hj212-gateway simulate --target 127.0.0.1:9212 --devices 1000 --rate 20000 \
///       --duration 300 --frame-size 500 --json
///   hj212-gateway simulate --target 127.0.0.1:9212 --devices 19000 --idle \
///       --source-ips 127.0.0.2-127.0.0.20 --ramp 30 --duration 600
///   hj212-gateway simulate --target 127.0.0.1:9212 --devices 500 --interval 5 \
///       --dialects 2017=2,2005=1,2025e=1 --reconnect-storm-at 20 --duration 60
///
/// Ctrl-C stops the fleet and prints the summary so far (with --json the same
/// object, "interrupted": true, rates over the time actually run), then exits 130.
///
/// Exit 0 when every frame was acked and nothing failed, 1 when frames went unacked
/// or connections/replies failed (errors > 0), 2 on usage errors (e.g. --devices
/// beyond RLIMIT_NOFILE or the ephemeral ports of the source addresses), 130
/// interrupted by Ctrl-C.
//
// The command line is also everything `simulate` was asked to do; `plan`
// validates it.
// This doc comment is the `--help` text, written for a terminal: rustdoc would
// read its `[[device]]` as markup.
#[allow(rustdoc::private_intra_doc_links)]
#[derive(Debug, Clone, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct SimulateArgs {
    /// Gateway address.
    #[arg(long, value_name = "HOST:PORT")]
    pub target: String,
    /// Devices (connections) simulated by this process.
    #[arg(long, default_value = "10")]
    pub devices: u64,
    /// Index of the first device, to split one fleet over several processes.
    #[arg(long, default_value = "0", value_name = "N")]
    pub first_device: u64,
    /// Seconds between 2011 uploads of one device (default 30 without --rate).
    #[arg(long, value_name = "SECS", conflicts_with = "rate")]
    pub interval: Option<f64>,
    /// Total 2011 frames per second, spread evenly over the devices.
    #[arg(long, value_name = "FRAMES_PER_S")]
    pub rate: Option<f64>,
    /// Seconds of sending (after --ramp).
    #[arg(long, default_value = "10", value_name = "SECS")]
    pub duration: f64,
    /// Dialect mix: 2005, 2017, 2025, 2025e (SM4-encrypted) with weights.
    #[arg(long, default_value = "2017", value_name = "D=W,...")]
    pub dialects: String,
    /// Device kinds with weights: air (flue gas, ST=31), water (waste water, ST=32).
    #[arg(long, default_value = "air=1,water=1", value_name = "K=W,...")]
    pub kinds: String,
    /// Which uploads: 2011 real-time, 2051 minute, 2061 hour, 2031 day data.
    #[arg(long = "cn", default_value = "2011,2051,2061", value_name = "CN,...")]
    pub cns: String,
    /// Device clocks run this many times as fast as the wall clock (DataTimes,
    /// --interval, minutes, hours, days); the simulated time ends at the end of
    /// the run, so DataTimes are never in the future.
    #[arg(long, default_value = "1", value_name = "N")]
    pub speedup: f64,
    /// Minutes between 2051 uploads (must divide 60).
    #[arg(long, default_value = "10", value_name = "MIN")]
    pub minute_every: u64,
    /// Send uploads without the ack bit (nothing is waited for or measured).
    #[arg(long)]
    pub no_ack: bool,
    /// Pad data frames with further plausible factors to about N bytes (100..=1000).
    #[arg(long, value_name = "N")]
    pub frame_size: Option<usize>,
    /// Seconds after start when all devices send hourly data at once (repeatable).
    #[arg(long, value_name = "SECS")]
    pub burst_at: Vec<f64>,
    /// Seconds after start when all devices drop their connection and reconnect (repeatable).
    #[arg(long, value_name = "SECS")]
    pub reconnect_storm_at: Vec<f64>,
    /// Local addresses to connect from: a count (from 127.0.0.2), A-B or A,B,...
    #[arg(long, value_name = "IPS")]
    pub source_ips: Option<String>,
    /// Seed for MNs, keys and values.
    #[arg(long, default_value = "1")]
    pub seed: u64,
    /// MN prefix (letters and digits).
    #[arg(long)]
    pub mn_prefix: Option<String>,
    /// Device password.
    #[arg(long, default_value = "123456")]
    pub pw: String,
    /// Runtime worker threads.
    #[arg(long, default_value = "1")]
    pub threads: usize,
    /// Seconds over which connections are opened (sending starts after it).
    #[arg(long, default_value = "0", value_name = "SECS")]
    pub ramp: f64,
    /// Only hold the connections open (plus --heartbeat if given).
    #[arg(long)]
    pub idle: bool,
    /// Seconds between 9015 heartbeats (2017/2025 devices; 0 = none).
    #[arg(long, value_name = "SECS")]
    pub heartbeat: Option<f64>,
    /// Seconds to wait for an ack before counting a timeout.
    #[arg(long, default_value = "5", value_name = "SECS")]
    pub ack_timeout: f64,
    /// Seconds between progress lines on stderr (0 = none).
    #[arg(long, default_value = "5", value_name = "SECS")]
    pub progress: f64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Print the fleet as [[device]] TOML for the gateway registry and exit.
    #[arg(long)]
    pub list_devices: bool,
}

/// Validated settings shared by all devices.
#[derive(Debug)]
pub struct Plan {
    target: SocketAddr,
    devices: u64,
    first_device: u64,
    interval: Duration,
    editions: Vec<(Edition, u32)>,
    kinds: Vec<(Kind, u32)>,
    realtime: bool,
    minute: bool,
    hour: bool,
    day: bool,
    minute_every: Duration,
    speedup: f64,
    ack: bool,
    frame_size: Option<usize>,
    bursts: Vec<Duration>,
    storms: Vec<Duration>,
    source_ips: Vec<Ipv4Addr>,
    seed: u64,
    prefix: String,
    pw: String,
    ramp: Duration,
    idle: bool,
    heartbeat: Option<Duration>,
    ack_timeout: Duration,
    duration: Duration,
    tz_offset_s: i32,
}

/// Counters updated by every device.
#[derive(Debug, Default)]
pub struct Stats {
    sent: AtomicU64,
    acked: AtomicU64,
    timeouts: AtomicU64,
    bad_replies: AtomicU64,
    late_acks: AtomicU64,
    connect_errors: AtomicU64,
    connection_errors: AtomicU64,
    reconnects: AtomicU64,
    connected: AtomicI64,
    connected_at_end: AtomicI64,
    requests: AtomicU64,
    bytes_sent: AtomicU64,
    storm_connect_us: AtomicU64,
    storm_send_us: AtomicU64,
    errors_printed: AtomicU64,
}

/// What the devices share.
pub struct Shared {
    plan: Plan,
    stats: Stats,
    hist: Mutex<Histogram<u64>>,
    base: Instant,
    /// The simulated clock (unix ms) at `base`: the wall clock without
    /// --speedup, earlier with it.
    sim_base_ms: i64,
    start: Instant,
    end: Instant,
    /// The first minute (--minute-every), hour and day (+08:00 midnight)
    /// boundaries of the simulated clock after the start, unix ms.
    first_minute_ms: i64,
    first_hour_ms: i64,
    first_day_ms: i64,
}

impl Shared {
    /// Simulated unix ms of a monotonic instant (the wall clock without --speedup).
    fn wall_ms(&self, t: Instant) -> i64 {
        self.sim_ns(t).div_euclid(1_000_000)
    }

    /// Simulated unix ns of a monotonic instant.
    fn sim_ns(&self, t: Instant) -> i64 {
        let k = self.plan.speedup;
        let base = self.sim_base_ms * 1_000_000;
        match t.checked_duration_since(self.base) {
            Some(d) => base + (d.as_nanos() as f64 * k) as i64,
            None => base - (self.base.duration_since(t).as_nanos() as f64 * k) as i64,
        }
    }

    /// The instant the simulated clock reads `ns` (unix ns); the base if earlier.
    fn at_sim_ns(&self, ns: i64) -> Instant {
        let real = (ns - self.sim_base_ms * 1_000_000) as f64 / self.plan.speedup;
        self.base + Duration::from_nanos(real.max(0.0) as u64)
    }

    /// [`Self::at_sim_ns`] for unix ms.
    fn at_sim(&self, ms: i64) -> Instant {
        self.at_sim_ns(ms.saturating_mul(1_000_000))
    }

    fn record_latency(&self, us: u64) {
        if let Ok(mut h) = self.hist.lock() {
            h.saturating_record(us.max(1));
        }
    }

    /// Prints the first few errors on stderr (the counters carry the rest).
    fn note_error(&self, msg: impl FnOnce() -> String) {
        if self.stats.errors_printed.fetch_add(1, Relaxed) < 10 {
            eprintln!("simulate: {}", msg());
        }
    }
}

/// The run's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Frames sent (data uploads and heartbeats).
    pub sent: u64,
    /// Frames acked by the gateway.
    pub acked: u64,
    /// Sum of timeouts, connect errors, connection errors and bad replies.
    pub errors: u64,
    /// Successful connections beyond each device's first.
    pub reconnects: u64,
    /// Configured sending time in seconds; after Ctrl-C, the sending time until then.
    pub duration_s: f64,
    /// Ack latency from the scheduled send time; frames that timed out count
    /// with their latency at expiry.
    pub latency_ms: Latency,
    /// Frames sent per second.
    pub rate: f64,
    /// Frames acked per second.
    pub acked_rate: f64,
    /// Frames whose ack did not arrive within --ack-timeout (or before the connection broke).
    pub timeouts: u64,
    /// Failed connection attempts.
    pub connect_errors: u64,
    /// Established connections that broke or were closed by the gateway.
    pub connection_errors: u64,
    /// Undecodable frames, junk or acks for QNs never sent, from the gateway.
    pub bad_replies: u64,
    /// Acks that arrived after their frame had timed out (not errors; the timeout is).
    pub late_acks: u64,
    /// Platform requests answered.
    pub requests: u64,
    /// Devices in this process.
    pub devices: u64,
    /// Devices whose connection lasted to the end of the run.
    pub devices_connected: i64,
    /// Bytes of frames sent.
    pub bytes_sent: u64,
    /// Mean frame size in bytes.
    pub frame_bytes_avg: f64,
    /// After the last reconnect storm: seconds until the last device had reconnected.
    pub storm_reconnect_s: Option<f64>,
    /// After the last reconnect storm: seconds until the last device had sent again.
    pub storm_resend_s: Option<f64>,
    /// Stopped by Ctrl-C (SIGINT) before the end: figures up to that moment.
    pub interrupted: bool,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Summary {
    /// True when every frame that asked for an ack got one and nothing failed.
    pub fn is_clean(&self, ack: bool) -> bool {
        self.errors == 0 && (!ack || self.acked == self.sent)
    }
}

fn usage(msg: impl Into<String>) -> CmdError {
    CmdError::Usage(msg.into())
}

fn parse_mix<T: Copy>(
    flag: &str,
    text: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<(T, u32)>, CmdError> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, w) = item.split_once('=').unwrap_or((item, "1"));
        let t = parse(name.trim())
            .ok_or_else(|| usage(format!("{flag} {item:?}: unknown name {name:?}")))?;
        let w: u32 = w
            .trim()
            .parse()
            .map_err(|_| usage(format!("{flag} {item:?}: weight must be a whole number")))?;
        if w > 0 {
            out.push((t, w));
        }
    }
    if out.is_empty() {
        return Err(usage(format!(
            "{flag} {text:?}: needs at least one entry with weight > 0"
        )));
    }
    Ok(out)
}

fn parse_ips(text: &str) -> Result<Vec<Ipv4Addr>, CmdError> {
    let bad = || {
        usage(format!(
            "--source-ips {text:?}: expected a count, A-B (127.0.0.2-127.0.0.250) or A,B,..."
        ))
    };
    if let Ok(n) = text.trim().parse::<u32>() {
        if n == 0 || n > 65_000 {
            return Err(bad());
        }
        let base = u32::from(Ipv4Addr::new(127, 0, 0, 2));
        return Ok((0..n).map(|i| Ipv4Addr::from(base + i)).collect());
    }
    if let Some((a, b)) = text.split_once('-') {
        let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
        let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
        let (a, b) = (u32::from(a), u32::from(b));
        if b < a || b - a > 65_000 {
            return Err(bad());
        }
        return Ok((a..=b).map(Ipv4Addr::from).collect());
    }
    text.split(',')
        .map(|s| s.trim().parse::<Ipv4Addr>().map_err(|_| bad()))
        .collect()
}

fn secs(flag: &str, v: f64) -> Result<Duration, CmdError> {
    if v.is_finite() && v >= 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(usage(format!(
            "{flag} {v}: must be a number of seconds >= 0"
        )))
    }
}

/// Validates the arguments into a plan.
pub fn plan(a: &SimulateArgs) -> Result<Plan, CmdError> {
    let target = a
        .target
        .to_socket_addrs()
        .map_err(|e| usage(format!("--target {:?}: {e}", a.target)))?
        .next()
        .ok_or_else(|| usage(format!("--target {:?}: no address", a.target)))?;
    if a.devices == 0 {
        return Err(usage("--devices must be > 0"));
    }
    let interval = match (a.rate, a.interval) {
        (Some(r), _) if r.is_finite() && r > 0.0 => Duration::from_secs_f64(a.devices as f64 / r),
        (Some(r), _) => return Err(usage(format!("--rate {r}: must be > 0"))),
        (None, Some(i)) if i.is_finite() && i > 0.0 => Duration::from_secs_f64(i),
        (None, Some(i)) => return Err(usage(format!("--interval {i}: must be > 0"))),
        (None, None) => Duration::from_secs(30),
    };
    let mut realtime = false;
    let mut minute = false;
    let mut hour = false;
    let mut day = false;
    for cn in a.cns.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match cn {
            "2011" => realtime = true,
            "2051" => minute = true,
            "2061" => hour = true,
            "2031" => day = true,
            _ => {
                return Err(usage(format!(
                    "--cn {cn:?}: expected 2011, 2051, 2061 or 2031"
                )));
            }
        }
    }
    if !(a.speedup.is_finite() && (1.0..=100_000.0).contains(&a.speedup)) {
        return Err(usage(format!(
            "--speedup {}: must be between 1 and 100000",
            a.speedup
        )));
    }
    if let Some(s) = a.frame_size {
        if !(100..=1000).contains(&s) {
            return Err(usage(format!(
                "--frame-size {s}: must be 100..=1000 (the standard caps a segment at 1024 bytes)"
            )));
        }
    }
    if a.minute_every == 0 || 60 % a.minute_every != 0 {
        return Err(usage(format!(
            "--minute-every {}: must divide 60",
            a.minute_every
        )));
    }
    let prefix = a
        .mn_prefix
        .clone()
        .unwrap_or_else(|| fleet::default_prefix(a.seed));
    let editions = parse_mix("--dialects", &a.dialects, Edition::parse)?;
    let last = a.first_device + a.devices - 1;
    let digits = last.max(1).ilog10() as usize + 1;
    for &(e, _) in &editions {
        if prefix.len() + digits > e.mn_len() {
            return Err(usage(format!(
                "--mn-prefix {prefix:?}: too long for {}-character MNs with device index {last}",
                e.mn_len()
            )));
        }
    }
    if !prefix.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(usage(format!(
            "--mn-prefix {prefix:?}: letters and digits only"
        )));
    }
    if a.pw.is_empty() || a.pw.contains([';', ',', '=', '&']) {
        return Err(usage(format!(
            "--pw {:?}: must be non-empty without separators",
            a.pw
        )));
    }
    let mut bursts = a
        .burst_at
        .iter()
        .map(|&v| secs("--burst-at", v))
        .collect::<Result<Vec<_>, _>>()?;
    bursts.sort();
    let mut storms = a
        .reconnect_storm_at
        .iter()
        .map(|&v| secs("--reconnect-storm-at", v))
        .collect::<Result<Vec<_>, _>>()?;
    storms.sort();
    let ack_timeout = secs("--ack-timeout", a.ack_timeout)?;
    if ack_timeout.is_zero() {
        return Err(usage("--ack-timeout must be > 0"));
    }
    Ok(Plan {
        target,
        devices: a.devices,
        first_device: a.first_device,
        interval,
        editions,
        kinds: parse_mix("--kinds", &a.kinds, Kind::parse)?,
        realtime,
        minute,
        hour,
        day,
        minute_every: Duration::from_secs(a.minute_every * 60),
        speedup: a.speedup,
        ack: !a.no_ack,
        frame_size: a.frame_size,
        bursts,
        storms,
        source_ips: a
            .source_ips
            .as_deref()
            .map(parse_ips)
            .transpose()?
            .unwrap_or_default(),
        seed: a.seed,
        prefix,
        pw: a.pw.clone(),
        ramp: secs("--ramp", a.ramp)?,
        idle: a.idle,
        heartbeat: match a.heartbeat {
            Some(h) if h > 0.0 => Some(secs("--heartbeat", h)?),
            _ => None,
        },
        ack_timeout,
        duration: secs("--duration", a.duration)?,
        tz_offset_s: 8 * 3600,
    })
}

/// Prints `[[device]]` entries for the fleet: what a gateway registry needs
/// to accept it (keys for the encrypted devices).
pub fn list_devices(p: &Plan, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    for index in p.first_device..p.first_device + p.devices {
        let e = fleet::pick(&p.editions, index);
        writeln!(out, "[[device]]")?;
        writeln!(out, "mn = \"{}\"", fleet::mn(&p.prefix, e, index))?;
        writeln!(out, "pw = \"{}\"", p.pw)?;
        writeln!(out, "dialect = \"{}\"", e.dialect().as_str())?;
        if e == Edition::V2025Encrypted {
            writeln!(
                out,
                "key = \"{}\"",
                hex::encode_upper(fleet::key(p.seed, index))
            )?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Raises the soft fd limit to the hard one and checks the fleet fits, also
/// in the ephemeral port range of each source address.
fn check_limits(p: &Plan) -> Result<(), CmdError> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum;
    if lim.current != hard {
        let _ = setrlimit(
            Resource::Nofile,
            rustix::process::Rlimit {
                current: hard,
                maximum: hard,
            },
        );
    }
    let soft = getrlimit(Resource::Nofile).current;
    let need = p.devices + 64;
    if let Some(soft) = soft {
        if need > soft {
            return Err(usage(format!(
                "--devices {} needs about {need} file descriptors but RLIMIT_NOFILE allows {soft} \
                 (hard limit {}); split the fleet over several simulate processes with \
                 --first-device",
                p.devices,
                hard.map_or("unlimited".into(), |h| h.to_string())
            )));
        }
    }
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|s| s.parse::<u64>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let ports = range.1.saturating_sub(range.0) + 1;
    let ips = p.source_ips.len().max(1) as u64;
    let per_ip = p.devices.div_ceil(ips);
    // After a storm each device needs a second port while its old one (closed
    // by us) sits in TIME_WAIT.
    let need_ports = if p.storms.is_empty() {
        per_ip
    } else {
        2 * per_ip
    };
    if need_ports > ports {
        return Err(usage(format!(
            "--devices {} over {ips} source address(es) needs {need_ports} ports per address{}, \
             more than the {ports} ephemeral ports ({}-{}); give more --source-ips",
            p.devices,
            if p.storms.is_empty() {
                ""
            } else {
                " (twice the devices: reconnect storm)"
            },
            range.0,
            range.1
        )));
    }
    Ok(())
}

/// Runs the fleet and returns its summary.
pub fn run(p: Plan, threads: usize, progress: f64) -> Result<Summary, CmdError> {
    check_limits(&p)?;
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .map_err(CmdError::io("tokio runtime"))?;
    rt.block_on(fleet_main(p, progress))
}

async fn fleet_main(p: Plan, progress: f64) -> Result<Summary, CmdError> {
    let base = Instant::now();
    let base_wall_ms = chrono::Utc::now().timestamp_millis();
    let start = base + Duration::from_millis(50);
    let end = start + p.ramp + p.duration;
    // With --speedup the simulated clock is set back so that it reaches the
    // wall clock at the end of the run: every DataTime is in the past.
    let run_ms = (end - base).as_millis() as i64;
    let sim_base_ms = base_wall_ms - (run_ms as f64 * (p.speedup - 1.0)) as i64;
    let start_ms = sim_base_ms + (50.0 * p.speedup) as i64;
    let me = p.minute_every.as_millis() as i64;
    let (hour, day, tz) = (3_600_000i64, 86_400_000i64, i64::from(p.tz_offset_s) * 1000);
    let first_minute_ms = (start_ms.div_euclid(me) + 1) * me;
    let first_hour_ms = (start_ms.div_euclid(hour) + 1) * hour;
    let first_day_ms = ((start_ms + tz).div_euclid(day) + 1) * day - tz;
    let hist = Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| usage(format!("histogram: {e}")))?;
    let sh = Arc::new(Shared {
        plan: p,
        stats: Stats::default(),
        hist: Mutex::new(hist),
        base,
        sim_base_ms,
        start,
        end,
        first_minute_ms,
        first_hour_ms,
        first_day_ms,
    });
    // Registered before the first connection, so a Ctrl-C at any point reports
    // rather than kills.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(CmdError::io("install the SIGINT handler"))?;
    let mut tasks = tokio::task::JoinSet::new();
    for pos in 0..sh.plan.devices {
        let dev = device::Device::new(&sh, sh.plan.first_device + pos, pos);
        tasks.spawn(dev.run(Arc::clone(&sh), pos));
    }
    let reporter = (progress > 0.0).then(|| {
        let sh = Arc::clone(&sh);
        tokio::spawn(async move {
            let every = Duration::from_secs_f64(progress);
            let mut last = (0u64, 0u64);
            let mut tick = tokio::time::interval_at(sh.start + every, every);
            loop {
                tick.tick().await;
                let s = &sh.stats;
                let (sent, acked) = (s.sent.load(Relaxed), s.acked.load(Relaxed));
                eprintln!(
                    "[{:>6.1}s] connected={} sent={sent} (+{:.0}/s) acked={acked} (+{:.0}/s) \
                     timeouts={} errors={} reconnects={}",
                    sh.start.elapsed().as_secs_f64(),
                    s.connected.load(Relaxed),
                    (sent - last.0) as f64 / progress,
                    (acked - last.1) as f64 / progress,
                    s.timeouts.load(Relaxed),
                    s.connect_errors.load(Relaxed)
                        + s.connection_errors.load(Relaxed)
                        + s.bad_replies.load(Relaxed),
                    s.reconnects.load(Relaxed),
                );
                last = (sent, acked);
            }
        })
    });
    let mut interrupted = false;
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = interrupt.recv() => {
                interrupted = true;
                break;
            }
        }
    }
    // Devices still connected at the interrupt are those at "the end".
    let connected_now = sh.stats.connected.load(Relaxed);
    tasks.shutdown().await;
    if let Some(r) = reporter {
        r.abort();
    }
    let devices_connected = if interrupted {
        connected_now
    } else {
        sh.stats.connected_at_end.load(Relaxed)
    };
    let s = &sh.stats;
    let h = sh
        .hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    let ms = |us: u64| us as f64 / 1000.0;
    let q = |x: f64| {
        if h.is_empty() {
            0.0
        } else {
            ms(h.value_at_quantile(x))
        }
    };
    let sent = s.sent.load(Relaxed);
    let acked = s.acked.load(Relaxed);
    let duration_s = if interrupted {
        let sending_from = sh.start + sh.plan.ramp;
        Instant::now()
            .saturating_duration_since(sending_from)
            .min(sh.plan.duration)
            .as_secs_f64()
    } else {
        sh.plan.duration.as_secs_f64()
    };
    let timeouts = s.timeouts.load(Relaxed);
    let connect_errors = s.connect_errors.load(Relaxed);
    let connection_errors = s.connection_errors.load(Relaxed);
    let bad_replies = s.bad_replies.load(Relaxed);
    let bytes_sent = s.bytes_sent.load(Relaxed);
    let storm = !sh.plan.storms.is_empty();
    Ok(Summary {
        sent,
        acked,
        errors: timeouts + connect_errors + connection_errors + bad_replies,
        reconnects: s.reconnects.load(Relaxed),
        duration_s,
        latency_ms: Latency {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: if h.is_empty() { 0.0 } else { ms(h.max()) },
            mean: if h.is_empty() { 0.0 } else { h.mean() / 1000.0 },
        },
        rate: if duration_s > 0.0 {
            sent as f64 / duration_s
        } else {
            0.0
        },
        acked_rate: if duration_s > 0.0 {
            acked as f64 / duration_s
        } else {
            0.0
        },
        timeouts,
        connect_errors,
        connection_errors,
        bad_replies,
        late_acks: s.late_acks.load(Relaxed),
        requests: s.requests.load(Relaxed),
        devices: sh.plan.devices,
        devices_connected,
        bytes_sent,
        frame_bytes_avg: if sent > 0 {
            bytes_sent as f64 / sent as f64
        } else {
            0.0
        },
        storm_reconnect_s: storm.then(|| s.storm_connect_us.load(Relaxed) as f64 / 1e6),
        storm_resend_s: (storm && !sh.plan.idle)
            .then(|| s.storm_send_us.load(Relaxed) as f64 / 1e6),
        interrupted,
    })
}

/// Prints the summary as text.
pub fn print(s: &Summary, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "devices {} (connected at end {}), {:.1} s",
        s.devices, s.devices_connected, s.duration_s
    )?;
    writeln!(
        out,
        "sent {} ({:.0}/s, {:.0} B avg), acked {} ({:.0}/s)",
        s.sent, s.rate, s.frame_bytes_avg, s.acked, s.acked_rate
    )?;
    writeln!(
        out,
        "errors {} (timeouts {}, connect {}, connection {}, bad replies {}), late acks {}, reconnects {}, requests answered {}",
        s.errors,
        s.timeouts,
        s.connect_errors,
        s.connection_errors,
        s.bad_replies,
        s.late_acks,
        s.reconnects,
        s.requests
    )?;
    let l = &s.latency_ms;
    writeln!(
        out,
        "ack latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3})",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    )?;
    if s.interrupted {
        writeln!(out, "interrupted (Ctrl-C): figures up to then")?;
    }
    if let (Some(c), Some(r)) = (s.storm_reconnect_s, s.storm_resend_s) {
        writeln!(
            out,
            "reconnect storm: all reconnected after {c:.3} s, all sending again after {r:.3} s"
        )?;
    }
    Ok(())
}

/// Runs `simulate` from the command line: the summary (or the fleet with
/// `--list-devices`) on stdout, the exit code back.
pub fn main(args: SimulateArgs) -> ExitCode {
    let plan = match plan(&args) {
        Ok(p) => p,
        Err(e) => return super::fail(&e),
    };
    if args.list_devices {
        return match list_devices(&plan, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => super::fail(&CmdError::Io {
                context: "stdout".into(),
                source: e,
            }),
        };
    }
    match run(plan, args.threads, args.progress) {
        Ok(s) => {
            let mut out = std::io::stdout().lock();
            let _ = if args.json {
                use std::io::Write;
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
                )
            } else {
                print(&s, &mut out)
            };
            if s.interrupted {
                ExitCode::from(crate::exit::INTERRUPTED)
            } else if s.is_clean(!args.no_ack) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(crate::exit::NO)
            }
        }
        Err(e) => super::fail(&e),
    }
}
