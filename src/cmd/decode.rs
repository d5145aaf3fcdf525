//! `decode`: explain any byte stream (a capture, one or many frames, any
//! chunking) frame by frame, for device vendors debugging a logger.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;

use crate::exit;
use crate::protocol::framing::{self, Cut, FramerConfig};
use crate::protocol::{
    self, CrcPolicy, DeviceLookup, DeviceProfile, Dialect, Frame, Options, Severity, codes, crc,
    crypt, json,
};

/// Options of `decode`.
#[derive(Debug, Clone)]
pub struct DecodeArgs {
    /// Input path, or `-` for stdin.
    pub input: String,
    /// One JSON object per line instead of the report.
    pub json: bool,
    /// `MN=HEX` SM4 keys.
    pub keys: Vec<String>,
    /// `MN=DIALECT` overrides.
    pub dialects: Vec<String>,
    /// CRC policy for every device.
    pub crc: CrcPolicy,
    /// Receive time for timestamp checks (default: now).
    pub now: Option<chrono::DateTime<chrono::Utc>>,
    /// Device time zone.
    pub tz: chrono::FixedOffset,
}

#[derive(Default)]
struct CliDevices(HashMap<String, Arc<DeviceProfile>>);

impl DeviceLookup for CliDevices {
    fn profile(&self, mn: &str) -> Option<Arc<DeviceProfile>> {
        self.0.get(mn).cloned()
    }
}

/// Usage or I/O problems (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Bad argument.
    #[error("{0}")]
    Usage(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs `decode`; returns true when every item is a valid frame.
pub fn run(args: &DecodeArgs, out: &mut dyn Write) -> Result<bool, DecodeError> {
    let mut devices = CliDevices::default();
    for k in &args.keys {
        let (mn, hex) = k
            .split_once('=')
            .ok_or_else(|| DecodeError::Usage(format!("--key {k:?}: expected MN=HEX")))?;
        let key = crypt::parse_key(hex).ok_or_else(|| {
            DecodeError::Usage(format!("--key for {mn}: the key must be 32 hex digits"))
        })?;
        let e = devices.0.entry(mn.to_owned()).or_default();
        Arc::make_mut(e).keys.push(key);
    }
    for d in &args.dialects {
        let (mn, name) = d.split_once('=').ok_or_else(|| {
            DecodeError::Usage(format!(
                "--dialect {d:?}: expected MN=2005|2017|2025|surface-water"
            ))
        })?;
        let dialect = Dialect::parse(name).ok_or_else(|| {
            DecodeError::Usage(format!("--dialect {d:?}: unknown dialect {name:?}"))
        })?;
        let e = devices.0.entry(mn.to_owned()).or_default();
        Arc::make_mut(e).dialect = Some(dialect);
    }
    let mut input = Vec::new();
    if args.input == "-" {
        std::io::stdin().read_to_end(&mut input)?;
    } else {
        input = std::fs::read(&args.input)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", args.input)))?;
    }
    let mut opts = Options::new(args.now.unwrap_or_else(chrono::Utc::now));
    opts.tz = args.tz;
    opts.crc = args.crc;

    let data = Bytes::from(input);
    let cfg = FramerConfig::default();
    let mut pos = 0;
    let mut n = 0;
    let mut all_ok = true;
    while pos < data.len() {
        let Some(cut) = framing::cut(&data[pos..], true, &cfg) else {
            break;
        };
        n += 1;
        let len = cut.len();
        let bytes = data.slice(pos..pos + len);
        match cut {
            Cut::Junk { reason, .. } => {
                all_ok = false;
                if args.json {
                    let mut j = json::junk_json(&bytes, reason.as_str(), true);
                    j.insert("offset".into(), pos.into());
                    writeln!(out, "{}", serde_json::Value::Object(j))?;
                } else {
                    writeln!(
                        out,
                        "#{n} junk at offset {pos}, {len} bytes ({})",
                        reason.as_str()
                    )?;
                    writeln!(out, "  {}", escape(&bytes, 200))?;
                    writeln!(out)?;
                }
            }
            Cut::Frame { .. } => {
                let f = protocol::decode(bytes, &opts, &devices);
                if f.has_error() {
                    all_ok = false;
                }
                if args.json {
                    let mut j = json::frame_json(&f, true);
                    j.insert("offset".into(), pos.into());
                    writeln!(out, "{}", serde_json::Value::Object(j))?;
                } else {
                    report(out, n, pos, &f)?;
                }
            }
        }
        pos += len;
    }
    if n == 0 && !args.json {
        writeln!(out, "no bytes")?;
    }
    Ok(all_ok)
}

fn escape(b: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &c in b.iter().take(max) {
        match c {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            0x20..=0x7E => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02X}")),
        }
    }
    if b.len() > max {
        s.push_str(&format!("… (+{} bytes)", b.len() - max));
    }
    s
}

fn report(out: &mut dyn Write, n: usize, offset: usize, f: &Frame) -> std::io::Result<()> {
    let verdict = if f.has_error() { "REJECT" } else { "ok" };
    writeln!(
        out,
        "#{n} frame at offset {offset}, {} bytes, dialect {}: {verdict}",
        f.raw.len(),
        f.dialect.map_or("unknown", Dialect::as_str)
    )?;
    let cn = f.cn().unwrap_or("-");
    let cmd = f
        .dialect
        .zip(f.cn_num())
        .and_then(|(d, c)| {
            codes::command(d, codes::Dir::Up, c).or_else(|| codes::command(d, codes::Dir::Down, c))
        })
        .map(|c| format!(" ({}, {})", c.name, c.exchange.as_str()))
        .unwrap_or_default();
    writeln!(out, "  CN    {cn}{cmd}")?;
    let st = f.st().unwrap_or("-");
    let st_name = f
        .st()
        .and_then(|s| codes::system_name(s, f.dialect))
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    writeln!(out, "  ST    {st}{st_name}")?;
    writeln!(out, "  MN    {}", f.mn().unwrap_or("-"))?;
    writeln!(out, "  QN    {}", f.qn().unwrap_or("-"))?;
    if let Some(bits) = f.flag_bits() {
        writeln!(
            out,
            "  Flag  {} (version {}, ack {}, split {})",
            bits.0,
            bits.version(),
            if bits.ack_requested() {
                "requested"
            } else {
                "not requested"
            },
            if bits.split() { "yes" } else { "no" }
        )?;
    } else {
        writeln!(out, "  Flag  - (absent)")?;
    }
    if let (Some(num), Some(no)) = (f.pnum(), f.pno()) {
        writeln!(out, "  Packet {no} of {num}")?;
    }
    if f.rf() {
        writeln!(out, "  RF    1 (re-sent data)")?;
    }
    if let Some(t) = f.data_time {
        writeln!(
            out,
            "  DataTime {}",
            protocol::time::rfc3339(t, f.data_time_ms)
        )?;
    }
    if let Some(e) = f.encryption {
        writeln!(out, "  Encrypted CP ({})", e.as_str())?;
    }
    let computed = String::from_utf8_lossy(&crc::format_hex4(f.crc.computed)).into_owned();
    match f.crc.declared {
        Some(d) => writeln!(
            out,
            "  CRC   declared {} computed {computed} ({})",
            String::from_utf8_lossy(&d),
            f.crc.variant.as_str()
        )?,
        None => writeln!(out, "  CRC   missing (computed {computed})")?,
    }
    // Readings: one row per factor and suffix; the factor's Flag in its own column.
    let mut rows: Vec<[String; 5]> = Vec::new();
    let mut params = Vec::new();
    for p in &f.pairs {
        match (p.code, p.suffix) {
            (Some(c), Some(s)) => {
                let code = f.text(c);
                let suffix = f.text(s);
                if suffix == "Flag" {
                    continue;
                }
                let flag = f
                    .pairs
                    .iter()
                    .rev()
                    .find(|q| {
                        q.code.map(|x| f.text(x)) == Some(code.clone())
                            && q.suffix.map(|x| f.text(x)).as_deref() == Some("Flag")
                    })
                    .map(|q| f.text(q.value).into_owned())
                    .unwrap_or_default();
                let unit = codes::factor(&code)
                    .map(|fa| {
                        if suffix == "Cou" {
                            fa.cou_unit.unwrap_or("")
                        } else {
                            fa.unit
                        }
                    })
                    .unwrap_or("");
                rows.push([
                    code.into_owned(),
                    suffix.into_owned(),
                    f.text(p.value).into_owned(),
                    flag,
                    unit.to_owned(),
                ]);
            }
            _ if json::is_secret(f.bytes(p.key)) => {
                params.push(format!("{}={}", f.text(p.key), json::REDACTED))
            }
            _ => params.push(format!("{}={}", f.text(p.key), f.text(p.value))),
        }
    }
    if !rows.is_empty() {
        let head = ["factor", "suffix", "value", "flag", "unit"];
        let mut w = head.map(str::len);
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: [&str; 5]| {
            let mut s = String::from("  ");
            for (i, c) in cells.iter().enumerate() {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
            s.trim_end().to_owned()
        };
        writeln!(out, "{}", line(head))?;
        for r in &rows {
            writeln!(out, "{}", line([&r[0], &r[1], &r[2], &r[3], &r[4]]))?;
        }
    }
    if !params.is_empty() {
        writeln!(out, "  params: {}", params.join("; "))?;
    }
    for x in &f.findings {
        let sev = match x.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        writeln!(out, "  {sev:<7} {}: {}", x.code, x.detail)?;
    }
    writeln!(out)
}

/// Explain a byte stream frame by frame (file or - for stdin).
///
/// Exit 0 when every item is a valid frame, 1 when any finding is an error, 2 on usage/IO errors.
/// Example: printf '##0087QN=...\r\n' | hj212-gateway decode -
#[derive(Debug, clap::Args)]
pub struct DecodeFlags {
    /// Input file, or - for stdin.
    #[arg(default_value = "-")]
    input: String,
    /// One JSON object per item (schema hj212.frame.v1).
    #[arg(long)]
    json: bool,
    /// SM4 key for an encrypted 2025 device: MN=32HEX (repeatable).
    #[arg(long = "key", value_name = "MN=HEX")]
    keys: Vec<String>,
    /// Dialect override: MN=2005|2017|2025|surface-water (repeatable).
    #[arg(long = "dialect", value_name = "MN=DIALECT")]
    dialects: Vec<String>,
    /// CRC policy: strict, modbus, swapped or any.
    #[arg(long, default_value = "strict", value_parser = parse_crc)]
    crc: CrcPolicy,
    /// Receive time for timestamp checks, RFC 3339 (default: now).
    #[arg(long)]
    now: Option<chrono::DateTime<chrono::Utc>>,
    /// Device time zone.
    #[arg(long, default_value = "+08:00")]
    tz: String,
}

fn parse_crc(s: &str) -> Result<CrcPolicy, String> {
    match s {
        "strict" => Ok(CrcPolicy::Strict),
        "modbus" => Ok(CrcPolicy::Modbus),
        "swapped" => Ok(CrcPolicy::Swapped),
        "any" => Ok(CrcPolicy::Any),
        _ => Err(format!("{s:?}: expected strict, modbus, swapped or any")),
    }
}

/// Runs `decode` from the command line: the report on stdout, the exit code back.
pub fn main(flags: DecodeFlags) -> ExitCode {
    let Some(tz) = crate::config::parse_offset(&flags.tz) else {
        eprintln!("error: --tz {:?}: expected an offset like +08:00", flags.tz);
        return ExitCode::from(exit::USAGE);
    };
    let args = DecodeArgs {
        input: flags.input,
        json: flags.json,
        keys: flags.keys,
        dialects: flags.dialects,
        crc: flags.crc,
        now: flags.now,
        tz,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match run(&args, &mut out) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(exit::NO),
        Err(e @ (DecodeError::Usage(_) | DecodeError::Io(_))) => {
            eprintln!("error: {e}");
            ExitCode::from(exit::USAGE)
        }
    }
}
