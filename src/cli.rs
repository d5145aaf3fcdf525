//! The command line: one subcommand per job, each mapped to an exit code.
//!
//! Exit codes: 0 success; 1 the command's answer is "no" (decode found an
//! error, verify found tampering); 2 usage or I/O error, or a frame log that
//! `serve` will not use (empty, not a frame log, damaged, too new); 70 internal error;
//! 78 bad configuration (sysexits `EX_CONFIG`, as systemd units expect).
//! `command` adds 3 (the device did not answer in time) and 4 (the device is
//! offline or busy); see [`crate::cmd::command`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cmd::decode::{self, DecodeArgs, DecodeError};
use crate::cmd::{self, alarms, exchanges, export, replay, simulate, stats, tail, verify};
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
    Csv,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TimeArg {
    /// When the gateway received the record.
    Received,
    /// The device's DataTime.
    Data,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum VerdictArg {
    Accepted,
    Rejected,
    Junk,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SplitArg {
    /// One connection per original connection / stored session.
    Session,
    /// One connection per MN.
    Mn,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DirectionArg {
    In,
    Out,
    All,
}

/// What `dead-letters` does besides listing.
#[derive(Debug, Subcommand)]
enum DeadLettersAction {
    /// Mark entries for re-drive: the running gateway's consumer sends them once
    /// more (within seconds, or at its next start) and marks them resolved, or dead
    /// again with one more attempt.
    ///
    /// Examples:
    ///   hj212-gateway dead-letters redrive --id 12 --id 13
    ///   hj212-gateway dead-letters redrive --consumer upstream.cnemc --all
    #[command(verbatim_doc_comment)]
    Redrive {
        /// An entry id from the listing (repeatable).
        #[arg(long = "id")]
        ids: Vec<i64>,
        /// Every `dead` entry (of --consumer, if given).
        #[arg(long)]
        all: bool,
    },
}

/// What `command` asks the device.
#[derive(Debug, Subcommand)]
enum CommandAction {
    /// CN 1011: read the device clock (with --pol: an instrument's clock).
    GetTime {
        /// PolId of the instrument.
        #[arg(long)]
        pol: Option<String>,
    },
    /// CN 1012: set the device clock to TIME (YYYYMMDDhhmmss device-local, or RFC 3339);
    /// default: the gateway's clock in the device time zone.
    SetTime {
        /// The time to set.
        time: Option<String>,
    },
    /// CN 2051/2061/2031: fetch minute/hour/day history for a window.
    Fetch {
        /// 2051 minute, 2061 hour, 2031 day (2041 facility running time).
        #[arg(long)]
        cn: u16,
        /// BeginTime (YYYYMMDDhhmmss device-local, or RFC 3339).
        #[arg(long)]
        from: String,
        /// EndTime (YYYYMMDDhhmmss device-local, or RFC 3339).
        #[arg(long)]
        to: String,
    },
    /// CN 1062: set the real-time upload interval in seconds.
    SetRtdInterval {
        /// Seconds.
        seconds: u32,
    },
    /// CN 1061: read the real-time upload interval.
    GetRtdInterval,
    /// CN 3011: zero/span calibration of an instrument.
    Calibrate {
        /// PolId, e.g. a21026.
        #[arg(long)]
        pol: String,
    },
    /// CN 3012: immediate sampling.
    Sample {
        /// PolId, e.g. w01018.
        #[arg(long)]
        pol: String,
    },
    /// Any CN with a CP body as given (what goes between CP=&& and &&).
    Raw {
        /// CN, e.g. 1063.
        #[arg(long)]
        cn: u16,
        /// CP body, e.g. 'PolId=w01018;InfoId=i13004'.
        #[arg(long, default_value = "")]
        cp: String,
    },
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
    /// Write stored records in seq order, optionally filtered (works while serve is running).
    ///
    /// Filters combine with AND and are exact matches. --since is inclusive, --until
    /// exclusive; both are RFC 3339 instants compared with the receive time, or with the
    /// device's DataTime under --time data (records without a DataTime then never match).
    ///
    /// Examples:
    ///   hj212-gateway export --data /var/lib/hj212-gateway --format raw -o capture.bin
    ///   hj212-gateway export --mn 010000A8900016F000169DC0 --cn 2011 --verdict accepted \
    ///       --time data --since 2024-06-01T00:00:00+08:00 --until 2024-06-02T00:00:00+08:00 --format csv
    ///
    /// Exit 0 on success (also when a pipe reader goes away), 2 on usage or I/O errors.
    #[command(verbatim_doc_comment)]
    Export {
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long, conflicts_with = "db")]
        data: Option<PathBuf>,
        /// The SQLite file itself.
        #[arg(long)]
        db: Option<PathBuf>,
        /// raw: the exact stored bytes back to back; jsonl: one object per record;
        /// csv: one row per reading (seq,received_at,mn,cn,data_time,factor,suffix,value,flag).
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormatArg,
        /// Which records.
        #[arg(long, value_enum, default_value = "all")]
        direction: DirectionArg,
        /// Only this MN.
        #[arg(long)]
        mn: Option<String>,
        /// Only this CN (e.g. 2011).
        #[arg(long)]
        cn: Option<String>,
        /// Only this ST (e.g. 31).
        #[arg(long)]
        st: Option<String>,
        /// Only records at or after this instant (RFC 3339, e.g. 2024-06-01T00:00:00+08:00).
        #[arg(long)]
        since: Option<String>,
        /// Only records before this instant (RFC 3339, exclusive).
        #[arg(long)]
        until: Option<String>,
        /// Clock that --since/--until compare with.
        #[arg(long, value_enum, default_value = "received")]
        time: TimeArg,
        /// Only this verdict.
        #[arg(long, value_enum)]
        verdict: Option<VerdictArg>,
        /// Output file (default stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Prove the log is intact: walk the hash chain and re-check every inbound frame's CRC
    /// against its stored verdict.
    ///
    /// Prints the records checked and, on failure, the first broken seq and why. Works
    /// while serve is running (records committed after it starts are not checked).
    ///
    /// Examples:
    ///   hj212-gateway verify --data /var/lib/hj212-gateway
    ///   hj212-gateway verify --db frames.sqlite --config /etc/hj212-gateway/gateway.toml
    ///
    /// Exit 0 intact, 1 tampered or inconsistent, 2 unreadable, 78 bad --config.
    #[command(verbatim_doc_comment)]
    Verify {
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long, conflicts_with = "db")]
        data: Option<PathBuf>,
        /// The SQLite file itself.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Gateway config: device registry, keys and CRC policies for the re-check.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
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
    ///   hj212-gateway replay /var/lib/hj212-gateway --to 127.0.0.1:9000 --rate 200
    ///   hj212-gateway replay capture.bin --to gw.example:9000 --speed 10
    ///
    /// Exit 0 on success, 1 when --to left acks missing or connections failed,
    /// 2 on bad input or I/O errors, 78 bad --config.
    #[command(verbatim_doc_comment)]
    Replay {
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
    },
    /// Follow the log live, one line per record (time, peer, MN, CN, verdict, values).
    ///
    /// Starts at the end of the log unless --since-seq is given; polls every 200 ms.
    /// Colours only on a terminal (and not with NO_COLOR).
    ///
    /// Examples:
    ///   hj212-gateway tail --data /var/lib/hj212-gateway --mn 010000A8900016F000169DC0
    ///   hj212-gateway tail --raw --since-seq 0 | hj212-gateway decode -
    ///
    /// Exit 0 on Ctrl-C, SIGTERM or a closed pipe; 2 on errors.
    #[command(verbatim_doc_comment)]
    Tail {
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long, conflicts_with = "db")]
        data: Option<PathBuf>,
        /// The SQLite file itself.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Only this MN.
        #[arg(long)]
        mn: Option<String>,
        /// Only this CN.
        #[arg(long)]
        cn: Option<String>,
        /// Print the exact stored bytes.
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        /// Print one export JSON object per record.
        #[arg(long)]
        json: bool,
        /// Start after this seq (0: from the beginning).
        #[arg(long, value_name = "N")]
        since_seq: Option<u64>,
    },
    /// Simulate a fleet of data loggers against a gateway and measure ack latency.
    ///
    /// Each device is one connection sending 2011 real-time data every --interval (or
    /// the fleet sending --rate frames/s in total), 2051 at every --minute-every minute
    /// and 2061 at every full hour of the wall clock, acked per frame. Devices answer
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
    ///   hj212-gateway simulate --target 127.0.0.1:9000 --devices 1000 --rate 20000 \
    ///       --duration 300 --frame-size 500 --json
    ///   hj212-gateway simulate --target 127.0.0.1:9000 --devices 19000 --idle \
    ///       --source-ips 127.0.0.2-127.0.0.20 --ramp 30 --duration 600
    ///   hj212-gateway simulate --target 127.0.0.1:9000 --devices 500 --interval 5 \
    ///       --dialects 2017=2,2005=1,2025e=1 --reconnect-storm-at 20 --duration 60
    ///
    /// Exit 0 when every frame was acked and nothing failed, 1 when frames went unacked
    /// or connections/replies failed (errors > 0), 2 on usage errors (e.g. --devices
    /// beyond RLIMIT_NOFILE or the ephemeral ports of the source addresses).
    #[command(verbatim_doc_comment)]
    Simulate(simulate::SimulateArgs),
    /// Lists the anomaly detector's alarms (see README "Alarms").
    ///
    /// Example: hj212-gateway alarms --data /var/lib/hj212-gateway --active --since 24h
    ///
    /// Exit 0 on success, 2 on errors.
    #[command(verbatim_doc_comment)]
    Alarms {
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long, conflicts_with = "db")]
        data: Option<PathBuf>,
        /// The SQLite file itself.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Only alarms that are still active.
        #[arg(long)]
        active: bool,
        /// Only this device.
        #[arg(long)]
        mn: Option<String>,
        /// Only alarms active at or ended after this: RFC 3339 or a duration ago (24h).
        #[arg(long)]
        since: Option<String>,
        /// JSON lines (schema hj212.alarm.v1) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Lists how the gateway's requests to devices ended (see README "Exchange outcomes").
    ///
    /// Example: hj212-gateway exchanges --data /var/lib/hj212-gateway --mn MN --since 24h
    ///
    /// Exit 0 on success, 2 on errors.
    #[command(verbatim_doc_comment)]
    Exchanges {
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long, conflicts_with = "db")]
        data: Option<PathBuf>,
        /// The SQLite file itself.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Only this device.
        #[arg(long)]
        mn: Option<String>,
        /// Only exchanges that ended at or after this: RFC 3339 or a duration ago (24h).
        #[arg(long)]
        since: Option<String>,
        /// JSON lines (schema hj212.downlink_exchange.v1) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// List the records the log's consumers could not deliver and set aside (see README "Dead letters").
    ///
    /// Examples:
    ///   hj212-gateway dead-letters --data /var/lib/hj212-gateway
    ///   hj212-gateway dead-letters --consumer mqtt --json
    ///   hj212-gateway dead-letters redrive --id 12
    ///
    /// Exit 0 on success, 2 on usage or store errors.
    #[command(verbatim_doc_comment)]
    DeadLetters {
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long, conflicts_with = "db", global = true)]
        data: Option<PathBuf>,
        /// The SQLite file itself.
        #[arg(long, global = true)]
        db: Option<PathBuf>,
        /// Only this consumer: mqtt, mqtt.merge, mqtt.alarms, upstream.<name>, alarms.
        #[arg(long, global = true)]
        consumer: Option<String>,
        /// Only entries in this state: dead, redrive, resolved.
        #[arg(long)]
        state: Option<String>,
        /// JSON lines (schema hj212.dead_letter.v1) instead of the table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<DeadLettersAction>,
    },
    /// Send a request to a connected device through the running gateway and print each step.
    ///
    /// The request goes through the device's downlink engine (one at a time per device,
    /// OverTime/ReCount resends, 9011 then 9012), in its dialect, and is logged (peer
    /// "operator") like every reply.
    ///
    /// Examples:
    ///   hj212-gateway command --mn 010000A8900016F000169DC0 get-time
    ///   hj212-gateway command --mn 010000A8900016F000169DC0 fetch --cn 2061 \
    ///       --from 20240601000000 --to 20240601060000
    ///
    /// Exit 0 success; 1 the device refused (QnRtn) or failed (ExeRtn); 2 usage error or
    /// control socket unreachable; 3 no answer in time; 4 device offline, busy, or its
    /// session ended; 78 bad --config.
    #[command(verbatim_doc_comment, name = "command")]
    Ask {
        /// The device's MN.
        #[arg(long)]
        mn: String,
        /// Control socket (default: from --config, $RUNTIME_DIRECTORY, else <data>/control.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Gateway config ([downlink] control_socket).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the gateway's JSON lines instead of text.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: CommandAction,
    },
    /// List the devices connected to the running gateway: MN, peer, since, dialect, last frame.
    ///
    /// Exit 0 on success, 2 when the control socket cannot be reached, 78 bad --config.
    Sessions {
        /// Control socket (default: from --config, $RUNTIME_DIRECTORY, else <data>/control.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Gateway config ([downlink] control_socket).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Per-device table: last seen, frames today/total, rejects by reason, dialect, CRC
    /// variant, median clock skew (CN 2011), last DataTime per CN.
    ///
    /// "Today" starts at local midnight of this machine. Aggregated by SQLite, fast on
    /// big logs; works while serve is running.
    ///
    /// Example: hj212-gateway stats --data /var/lib/hj212-gateway
    ///
    /// Exit 0 on success, 2 on errors.
    #[command(verbatim_doc_comment)]
    Stats {
        /// Data directory (default: $STATE_DIRECTORY, else ./data).
        #[arg(long, conflicts_with = "db")]
        data: Option<PathBuf>,
        /// The SQLite file itself.
        #[arg(long)]
        db: Option<PathBuf>,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
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
                // Empty, foreign or damaged log file: an operator must act on the
                // file (exit 2, like any command given a file it cannot use);
                // restarting would only fail the same way.
                Err(ServeError::Store(e)) if e.refuses_file() => {
                    tracing::error!("{e}");
                    eprintln!("error: frame log: {e}");
                    ExitCode::from(2)
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
                crate::daemon::warn_stop_timeout(&c);
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
            mn,
            cn,
            st,
            since,
            until,
            time,
            verdict,
            output,
        } => {
            let filter = store::RecordFilter {
                direction: match direction {
                    DirectionArg::In => Some(store::Direction::In),
                    DirectionArg::Out => Some(store::Direction::Out),
                    DirectionArg::All => None,
                },
                mn,
                cn,
                st,
                verdict: verdict.map(|v| match v {
                    VerdictArg::Accepted => store::Verdict::Accepted,
                    VerdictArg::Rejected => store::Verdict::Rejected,
                    VerdictArg::Junk => store::Verdict::Junk,
                }),
                ..store::RecordFilter::default()
            };
            let basis = match time {
                TimeArg::Received => export::TimeBasis::Received,
                TimeArg::Data => export::TimeBasis::Data,
            };
            let result = export::time_filter(filter, basis, since.as_deref(), until.as_deref())
                .and_then(|filter| {
                    let args = export::ExportArgs {
                        db: cmd::resolve_db(data.as_deref(), db.as_deref(), None),
                        format: match format {
                            ExportFormatArg::Raw => export::Format::Raw,
                            ExportFormatArg::Jsonl => export::Format::Jsonl,
                            ExportFormatArg::Csv => export::Format::Csv,
                        },
                        filter,
                    };
                    // Checked before the output file is created, so a typo in --db
                    // does not leave an empty file behind.
                    cmd::require_db(&args.db)?;
                    match &output {
                        Some(p) => {
                            let f = std::fs::File::create(p)
                                .map_err(cmd::CmdError::io(p.display().to_string()))?;
                            export::run(&args, &mut std::io::BufWriter::new(f))
                        }
                        None => export::run(&args, &mut std::io::stdout().lock()),
                    }
                });
            match result {
                Ok(n) => {
                    eprintln!("exported {n} records");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Verify { data, db, config } => {
            let result = cmd::load_config(config.as_deref()).and_then(|cfg| {
                let args = verify::VerifyArgs {
                    db: cmd::resolve_db(data.as_deref(), db.as_deref(), cfg.as_ref()),
                    config: cfg,
                };
                verify::run(&args).map(|r| (args.db, r))
            });
            match result {
                Ok((path, r)) => {
                    let _ = verify::print(&path, &r, &mut std::io::stdout().lock());
                    if r.is_ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => fail(&e),
            }
        }
        Command::Replay {
            inputs,
            to,
            speed,
            rate,
            split,
            ack_timeout,
            server_port,
            report,
            config,
        } => {
            let pacing = match (speed, rate) {
                (_, Some(r)) if !(r.is_finite() && r > 0.0) => {
                    return fail(&cmd::CmdError::Usage(format!("--rate {r}: must be > 0")));
                }
                (Some(x), _) if !(x.is_finite() && x > 0.0) => {
                    return fail(&cmd::CmdError::Usage(format!("--speed {x}: must be > 0")));
                }
                (_, Some(r)) => replay::Pacing::Rate(r),
                (x, None) => replay::Pacing::Original {
                    speed: x.unwrap_or(1.0),
                },
            };
            if !(ack_timeout.is_finite() && ack_timeout > 0.0) {
                return fail(&cmd::CmdError::Usage(format!(
                    "--ack-timeout {ack_timeout}: must be > 0"
                )));
            }
            let result = cmd::load_config(config.as_deref()).and_then(|cfg| {
                let args = replay::ReplayArgs {
                    inputs,
                    to,
                    pacing,
                    split: match split {
                        SplitArg::Session => replay::Split::Session,
                        SplitArg::Mn => replay::Split::Mn,
                    },
                    ack_timeout: std::time::Duration::from_secs_f64(ack_timeout),
                    server_port,
                    report,
                    config: cfg,
                };
                replay::run(&args, &mut std::io::stdout().lock())
            });
            match result {
                Ok(r) => match r.send {
                    Some(s) if s.timed_out > 0 || s.connection_errors > 0 => ExitCode::from(1),
                    _ => ExitCode::SUCCESS,
                },
                Err(e) => fail(&e),
            }
        }
        Command::Tail {
            data,
            db,
            mn,
            cn,
            raw,
            json,
            since_seq,
        } => {
            let args = tail::TailArgs {
                db: cmd::resolve_db(data.as_deref(), db.as_deref(), None),
                mn,
                cn,
                format: if raw {
                    tail::TailFormat::Raw
                } else if json {
                    tail::TailFormat::Json
                } else {
                    tail::TailFormat::Line
                },
                since_seq,
            };
            match tail::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Alarms {
            data,
            db,
            active,
            mn,
            since,
            json,
        } => {
            let args = alarms::AlarmsArgs {
                db: cmd::resolve_db(data.as_deref(), db.as_deref(), None),
                active,
                mn,
                since,
                json,
            };
            match alarms::run(&args, &mut std::io::stdout().lock()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Exchanges {
            data,
            db,
            mn,
            since,
            json,
        } => {
            let args = exchanges::ExchangesArgs {
                db: cmd::resolve_db(data.as_deref(), db.as_deref(), None),
                mn,
                since,
                json,
            };
            match exchanges::run(&args, &mut std::io::stdout().lock()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::DeadLetters {
            data,
            db,
            consumer,
            state,
            json,
            action,
        } => {
            let db = cmd::resolve_db(data.as_deref(), db.as_deref(), None);
            let mut out = std::io::stdout().lock();
            let r = match action {
                None => cmd::dead_letters::list(
                    &cmd::dead_letters::ListArgs {
                        db,
                        consumer,
                        state,
                        json,
                    },
                    &mut out,
                ),
                Some(DeadLettersAction::Redrive { ids, all }) => cmd::dead_letters::redrive(
                    &cmd::dead_letters::RedriveArgs {
                        db,
                        consumer,
                        ids,
                        all,
                    },
                    &mut out,
                ),
            };
            match r {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Simulate(args) => {
            let plan = match simulate::plan(&args) {
                Ok(p) => p,
                Err(e) => return fail(&e),
            };
            if args.list_devices {
                return match simulate::list_devices(&plan, &mut std::io::stdout().lock()) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(&cmd::CmdError::Io {
                        context: "stdout".into(),
                        source: e,
                    }),
                };
            }
            match simulate::run(plan, args.threads, args.progress) {
                Ok(s) => {
                    let mut out = std::io::stdout().lock();
                    let _ = if args.json {
                        use std::io::Write;
                        writeln!(
                            out,
                            "{}",
                            serde_json::to_string(&s)
                                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
                        )
                    } else {
                        simulate::print(&s, &mut out)
                    };
                    if s.is_clean(!args.no_ack) {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => fail(&e),
            }
        }
        Command::Ask {
            mn,
            socket,
            data,
            config,
            json,
            action,
        } => {
            use crate::downlink::control::ActionSpec;
            let request = match action {
                CommandAction::GetTime { pol } => ActionSpec::GetTime { pol },
                CommandAction::SetTime { time } => ActionSpec::SetTime { time },
                CommandAction::Fetch { cn, from, to } => ActionSpec::Fetch { cn, from, to },
                CommandAction::SetRtdInterval { seconds } => ActionSpec::SetRtdInterval { seconds },
                CommandAction::GetRtdInterval => ActionSpec::GetRtdInterval,
                CommandAction::Calibrate { pol } => ActionSpec::Calibrate { pol },
                CommandAction::Sample { pol } => ActionSpec::Sample { pol },
                CommandAction::Raw { cn, cp } => ActionSpec::Raw { cn, cp },
            };
            let result = cmd::load_config(config.as_deref()).and_then(|cfg| {
                let path =
                    cmd::command::socket_path(socket.as_deref(), data.as_deref(), cfg.as_ref());
                cmd::command::run_command(&path, &mn, request, json, &mut std::io::stdout().lock())
            });
            match result {
                Ok(code) => ExitCode::from(code),
                Err(e) => fail(&e),
            }
        }
        Command::Sessions {
            socket,
            data,
            config,
            json,
        } => {
            let result = cmd::load_config(config.as_deref()).and_then(|cfg| {
                let path =
                    cmd::command::socket_path(socket.as_deref(), data.as_deref(), cfg.as_ref());
                cmd::command::run_sessions(&path, json, &mut std::io::stdout().lock())
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Stats { data, db, json } => {
            let args = stats::StatsArgs {
                db: cmd::resolve_db(data.as_deref(), db.as_deref(), None),
                json,
            };
            match stats::run(&args, &mut std::io::stdout().lock()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

fn fail(e: &cmd::CmdError) -> ExitCode {
    eprintln!("error: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        eprintln!("  caused by: {s}");
        src = s.source();
    }
    ExitCode::from(e.exit_code())
}
