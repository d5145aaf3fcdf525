//! The command line: one subcommand per job, each mapped to an exit code.
//!
//! Exit codes: 0 success; 1 the command's answer is "no" (decode found an
//! error, verify found tampering); 2 usage or I/O error; 70 internal error;
//! 78 bad configuration (sysexits `EX_CONFIG`, as systemd units expect).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cmd::decode::{self, DecodeArgs, DecodeError};
use crate::config::{self, Config};
use crate::daemon::{self, Overrides, ServeError};
use crate::protocol::CrcPolicy;
use crate::store;
use crate::telemetry::{self, LogFormat};

/// Exit code for configuration errors.
pub const EX_CONFIG: u8 = 78;
/// Exit code for internal errors.
pub const EX_SOFTWARE: u8 = 70;

/// HJ 212 ingestion gateway.
#[derive(Debug, Parser)]
#[command(name = "hj212-gateway", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "plain", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExportFormatArg {
    Raw,
    Jsonl,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DirectionArg {
    In,
    Out,
    All,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: accept devices, log every frame durably, ack after commit.
    ///
    /// Example: hj212-gateway serve --config /etc/hj212-gateway/gateway.toml
    Serve {
        /// Config file (TOML); without it every key takes its default.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address, replacing [server] listen (repeatable; port 0 picks one).
        #[arg(long)]
        listen: Vec<SocketAddr>,
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Check a config file; exit 0 if valid, 78 naming the bad key otherwise.
    CheckConfig {
        /// Config file.
        path: PathBuf,
    },
    /// Explain a byte stream frame by frame (file or - for stdin).
    ///
    /// Exit 0 when every item is a valid frame, 1 when any finding is an error, 2 on usage/IO errors.
    /// Example: printf '##0087QN=...\r\n' | hj212-gateway decode -
    Decode {
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
    },
    /// Write stored records in seq order (works while serve is running).
    Export {
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long, conflicts_with = "db")]
        data: Option<PathBuf>,
        /// The SQLite file itself.
        #[arg(long)]
        db: Option<PathBuf>,
        /// raw: the exact stored bytes back to back; jsonl: one object per record.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormatArg,
        /// Which records.
        #[arg(long, value_enum, default_value = "all")]
        direction: DirectionArg,
        /// Output file (default stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Walk the log's hash chain; exit 0 intact, 1 tampered.
    Verify {
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long, conflicts_with = "db")]
        data: Option<PathBuf>,
        /// The SQLite file itself.
        #[arg(long)]
        db: Option<PathBuf>,
    },
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

fn db_path(data: Option<PathBuf>, db: Option<PathBuf>) -> PathBuf {
    db.unwrap_or_else(|| Config::default().store_path(&daemon::data_dir(data.as_deref())))
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            data,
        } => {
            telemetry::init(cli.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(EX_SOFTWARE);
                }
            };
            match rt.block_on(daemon::serve(Overrides {
                config,
                listen,
                data,
            })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(ServeError::Config(e)) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::from(EX_CONFIG)
                }
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::from(EX_SOFTWARE)
                }
            }
        }
        Command::CheckConfig { path } => match Config::load(&path)
            .and_then(|c| crate::registry::Registry::from_config(&c).map(|_| c))
        {
            Ok(c) => {
                println!(
                    "{}: ok ({} listen address(es), {} device(s) inline)",
                    path.display(),
                    c.server.listen.len(),
                    c.device.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Decode {
            input,
            json,
            keys,
            dialects,
            crc,
            now,
            tz,
        } => {
            let Some(tz) = config::parse_offset(&tz) else {
                eprintln!("error: --tz {tz:?}: expected an offset like +08:00");
                return ExitCode::from(2);
            };
            let args = DecodeArgs {
                input,
                json,
                keys,
                dialects,
                crc,
                now,
                tz,
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            match decode::run(&args, &mut out) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e @ (DecodeError::Usage(_) | DecodeError::Io(_))) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Export {
            data,
            db,
            format,
            direction,
            output,
        } => {
            let opts = store::ExportOptions {
                db: db_path(data, db),
                format: match format {
                    ExportFormatArg::Raw => store::ExportFormat::Raw,
                    ExportFormatArg::Jsonl => store::ExportFormat::Jsonl,
                },
                direction: match direction {
                    DirectionArg::In => store::ExportDirection::In,
                    DirectionArg::Out => store::ExportDirection::Out,
                    DirectionArg::All => store::ExportDirection::All,
                },
            };
            let result = match output {
                Some(p) => std::fs::File::create(&p)
                    .map_err(|e| format!("{}: {e}", p.display()))
                    .and_then(|f| {
                        let mut w = std::io::BufWriter::new(f);
                        store::export(&opts, &mut w).map_err(|e| e.to_string())
                    }),
                None => {
                    let stdout = std::io::stdout();
                    let mut w = std::io::BufWriter::new(stdout.lock());
                    store::export(&opts, &mut w).map_err(|e| e.to_string())
                }
            };
            match result {
                Ok(n) => {
                    eprintln!("exported {n} records");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Verify { data, db } => {
            let path = db_path(data, db);
            match store::verify_chain(&path) {
                Ok(r) if r.is_intact() => {
                    println!(
                        "{}: {} records checked, chain intact",
                        path.display(),
                        r.records_checked
                    );
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    println!(
                        "{}: {} records checked; {}",
                        path.display(),
                        r.records_checked,
                        r.first_break.map(|b| b.to_string()).unwrap_or_default()
                    );
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
