//! `stats`: one block per device, aggregated by SQLite ([`store::device_stats`]).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::TimeZone;

use super::{CmdError, is_broken_pipe, require_db, rfc3339_ms};
use crate::ingest::CrcHint;
use crate::store::{self, DeviceStats};

/// Options of `stats`.
#[derive(Debug, Clone)]
pub struct StatsArgs {
    /// The SQLite file.
    pub db: PathBuf,
    /// One JSON document instead of the table.
    pub json: bool,
}

/// Local midnight of today (the machine's time zone), UTC unix ms: "frames today".
pub fn today_start_ms() -> i64 {
    let now = chrono::Local::now();
    let midnight = now
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists");
    chrono::Local
        .from_local_datetime(&midnight)
        .earliest()
        .map_or(now.timestamp_millis(), |t| t.timestamp_millis())
}

fn join(items: &[(String, u64)]) -> String {
    if items.is_empty() {
        return "-".into();
    }
    items
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `sends MODBUS CRC: set crc = "modbus"` while the device's latest frame is a
/// rejection its `crc` policy would accept by naming the variant.
fn crc_hint(d: &DeviceStats) -> Option<String> {
    CrcHint::from_variant(d.crc_rejected_variant.as_deref()?).map(|h| h.short())
}

fn skew(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), |ms| format!("{:+.1}s", ms as f64 / 1000.0))
}

/// Writes the stats of every device to `out`; returns the number of devices.
pub fn run(args: &StatsArgs, out: &mut dyn Write) -> Result<usize, CmdError> {
    require_db(&args.db)?;
    let devices = store::device_stats(&args.db, today_start_ms())?;
    match write(args, &devices, out) {
        Err(e) if !is_broken_pipe(&e) => Err(CmdError::io("write the stats")(e)),
        _ => Ok(devices.len()),
    }
}

fn write(args: &StatsArgs, devices: &[DeviceStats], out: &mut dyn Write) -> std::io::Result<()> {
    if args.json {
        let mut list = serde_json::to_value(devices)?;
        for (d, v) in devices
            .iter()
            .zip(list.as_array_mut().into_iter().flatten())
        {
            if let Some(obj) = v.as_object_mut() {
                obj.insert(
                    "crc_hint".into(),
                    crc_hint(d).map_or(serde_json::Value::Null, serde_json::Value::String),
                );
            }
        }
        serde_json::to_writer_pretty(&mut *out, &list)?;
        return writeln!(out);
    }
    writeln!(
        out,
        "{:<24} {:<24} {:>8} {:>10} {:>8} {:>10}  {:<12} {:<16} CRC FIX",
        "MN", "LAST SEEN (UTC)", "TODAY", "TOTAL", "REJECTED", "SKEW(P50)", "DIALECT", "CRC"
    )?;
    for d in devices {
        writeln!(
            out,
            "{:<24} {:<24} {:>8} {:>10} {:>8} {:>10}  {:<12} {:<16} {}",
            d.mn,
            rfc3339_ms(d.last_seen_ms),
            d.frames_since,
            d.frames_total,
            d.rejected,
            skew(d.median_skew_ms),
            join(&d.dialects),
            join(&d.crc_variants),
            crc_hint(d).unwrap_or_else(|| "-".into()),
        )?;
        if !d.rejects_by_reason.is_empty() {
            writeln!(out, "    rejects: {}", join(&d.rejects_by_reason))?;
        }
        if !d.last_data_time.is_empty() {
            let cns: Vec<String> = d
                .last_data_time
                .iter()
                .map(|(cn, t)| format!("{cn}@{t}"))
                .collect();
            writeln!(out, "    last DataTime: {}", cns.join(" "))?;
        }
    }
    writeln!(out, "{} device(s)", devices.len())
}

/// Per-device table: last seen, frames today/total, rejects by reason, dialect, CRC
/// variant, median clock skew (CN 2011), last DataTime per CN, and CRC FIX: the
/// `crc` policy to set while the device's latest frame is rejected for a CRC that
/// is CRC-16/MODBUS (or byte-swapped MODBUS).
///
/// "Today" starts at local midnight of this machine. Aggregated by SQLite, fast on
/// big logs; works while serve is running.
///
/// Example: hj212-gateway stats --data /var/lib/hj212-gateway
///
/// Exit 0 on success, 2 on errors.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct StatsFlags {
    #[command(flatten)]
    log: super::LogFlags,
    /// One JSON array instead of the table.
    #[arg(long)]
    json: bool,
}

/// Runs `stats` from the command line: the table on stdout, the exit code back.
pub fn main(flags: StatsFlags) -> ExitCode {
    let args = StatsArgs {
        db: flags.log.db(None),
        json: flags.json,
    };
    match run(&args, &mut std::io::stdout().lock()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => super::fail(&e),
    }
}
