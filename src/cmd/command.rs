//! `command` and `sessions`: clients of the gateway's control socket.
//!
//! `command` prints each step of the exchange as it happens and exits with
//! what the device did: 0 success; 1 the device refused (QnRtn != 1) or failed
//! (ExeRtn != 1); 2 usage error, unreachable socket or rejected request;
//! 3 no answer (no 9011 after ReCount resends, or nothing within the
//! execution timeout); 4 the device is offline, its queue is full, or its
//! session ended mid-exchange; 78 bad --config.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;

use super::CmdError;
use crate::config::Config;
use crate::daemon;
use crate::downlink::control::{ActionSpec, ControlRequest};

pub use crate::exit::{
    NO as EXIT_REFUSED, TIMEOUT as EXIT_TIMEOUT, UNAVAILABLE as EXIT_UNAVAILABLE,
};

/// Where a control-socket client finds the running gateway (flattened into the
/// flags of `command` and `sessions`).
// The doc comments are `--help` text, written for a terminal: rustdoc would
// read `<data>` as markup.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, clap::Args)]
pub struct ControlFlags {
    /// Control socket (default: from --config, $RUNTIME_DIRECTORY, else <data>/control.sock,
    /// else /run/hj212-gateway/control.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Data directory (default: $STATE_DIRECTORY, else ./data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Gateway config ([downlink] control_socket).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl ControlFlags {
    /// The socket these flags name, reading `--config` if given (see [`socket_path`]).
    pub fn socket(&self) -> Result<PathBuf, CmdError> {
        let cfg = super::load_config(self.config.as_deref())?;
        Ok(socket_path(
            self.socket.as_deref(),
            self.data.as_deref(),
            cfg.as_ref(),
        ))
    }
}

/// Where the control socket is: `--socket`, else `[downlink] control_socket`
/// of `--config`, else `$RUNTIME_DIRECTORY/control.sock`, else
/// `<data>/control.sock` (data: `--data`, `$STATE_DIRECTORY`, `./data`); with
/// none of those given or set and no `./data/control.sock`, the packaged
/// gateway's `/run/hj212-gateway/control.sock` when it is there.
pub fn socket_path(socket: Option<&Path>, data: Option<&Path>, cfg: Option<&Config>) -> PathBuf {
    if let Some(s) = socket {
        return s.to_owned();
    }
    let dir = daemon::data_dir(data);
    let default = Config::default();
    let cfg = cfg.unwrap_or(&default);
    let local = cfg.downlink.socket_path(&dir);
    if data.is_some()
        || cfg.downlink.control_socket.is_some()
        || super::env_set("STATE_DIRECTORY")
        || super::env_set("RUNTIME_DIRECTORY")
    {
        return local;
    }
    super::local_or_packaged(
        local,
        Path::new(daemon::PACKAGED_RUNTIME_DIR).join("control.sock"),
    )
}

fn connect(path: &Path, req: &ControlRequest) -> Result<BufReader<UnixStream>, CmdError> {
    let mut s = UnixStream::connect(path).map_err(CmdError::io(format!(
        "cannot reach the gateway's control socket {} (is serve running? --socket/--data/--config)",
        path.display()
    )))?;
    let line = serde_json::to_string(req).map_err(|e| CmdError::Usage(e.to_string()))?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(CmdError::io(path.display().to_string()))?;
    Ok(BufReader::new(s))
}

/// Runs `command`: prints the steps to `out`, returns the exit code.
pub fn run_command(
    path: &Path,
    mn: &str,
    request: ActionSpec,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8, CmdError> {
    let req = ControlRequest::Command {
        mn: mn.to_owned(),
        request,
    };
    let rd = connect(path, &req)?;
    for line in rd.lines() {
        let line = line.map_err(CmdError::io("control socket"))?;
        if json {
            writeln!(out, "{line}").map_err(CmdError::io("stdout"))?;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| CmdError::Usage(format!("unexpected answer from the gateway: {e}")))?;
        let s = |k: &str| match &v[k] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            x => x.to_string(),
        };
        let text = match v["event"].as_str().unwrap_or("") {
            "sent" if s("attempt") == "1" => {
                format!("sent CN={} QN={} to {mn}", s("cn"), s("qn"))
            }
            "sent" => format!(
                "no 9011 yet; sent CN={} QN={} again (attempt {})",
                s("cn"),
                s("qn"),
                s("attempt")
            ),
            "qn_rtn" => format!("9011 QnRtn={}: {}", s("code"), s("meaning")),
            "upload" => format!("upload CN={} QN={}: {}", s("cn"), s("qn"), s("cp")),
            "notify_ack" => "9013: the device acknowledged".to_owned(),
            "exe_rtn" => format!("9012 ExeRtn={}: {}", s("code"), s("meaning")),
            "done" => {
                let code = match s("outcome").as_str() {
                    "success" => 0,
                    "refused" | "failed" => EXIT_REFUSED,
                    "no_reply" | "exec_timeout" => EXIT_TIMEOUT,
                    "offline" | "busy" | "closed" => EXIT_UNAVAILABLE,
                    _ => crate::exit::USAGE,
                };
                if code == 0 {
                    if !json {
                        writeln!(out, "done: success").map_err(CmdError::io("stdout"))?;
                    }
                } else {
                    eprintln!("error: {}", s("message"));
                }
                return Ok(code);
            }
            _ => continue,
        };
        if !json {
            writeln!(out, "{text}").map_err(CmdError::io("stdout"))?;
        }
    }
    eprintln!("error: the gateway closed the control connection before the exchange ended");
    Ok(EXIT_UNAVAILABLE)
}

/// Runs `sessions`: a table (or the JSON array) of live sessions.
pub fn run_sessions(path: &Path, json: bool, out: &mut dyn Write) -> Result<(), CmdError> {
    let mut rd = connect(path, &ControlRequest::Sessions)?;
    let mut line = String::new();
    rd.read_line(&mut line)
        .map_err(CmdError::io("control socket"))?;
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| CmdError::Usage(format!("unexpected answer from the gateway: {e}")))?;
    let Some(list) = v["sessions"].as_array() else {
        return Err(CmdError::Usage(format!(
            "unexpected answer from the gateway: {}",
            line.trim()
        )));
    };
    let w = |e| CmdError::io("stdout")(e);
    if json {
        writeln!(out, "{}", Value::Array(list.clone())).map_err(w)?;
        return Ok(());
    }
    let when = |ms: i64| {
        if ms == 0 {
            "-".to_owned()
        } else {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| {
                    t.with_timezone(&chrono::Local)
                        .format("%Y-%m-%d %H:%M:%S")
                        .to_string()
                })
                .unwrap_or_else(|| "-".into())
        }
    };
    writeln!(
        out,
        "{:<26} {:<22} {:<19} {:<13} {:<19}",
        "MN", "PEER", "SINCE", "DIALECT", "LAST FRAME"
    )
    .map_err(w)?;
    for s in list {
        writeln!(
            out,
            "{:<26} {:<22} {:<19} {:<13} {:<19}",
            s["mn"].as_str().unwrap_or(""),
            s["peer"].as_str().unwrap_or(""),
            when(s["since_ms"].as_i64().unwrap_or(0)),
            s["dialect"].as_str().unwrap_or("-"),
            when(s["last_frame_ms"].as_i64().unwrap_or(0)),
        )
        .map_err(w)?;
    }
    writeln!(out, "{} session(s)", list.len()).map_err(w)?;
    Ok(())
}

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
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct CommandFlags {
    /// The device's MN.
    #[arg(long)]
    mn: String,
    #[command(flatten)]
    control: ControlFlags,
    /// Print the gateway's JSON lines instead of text.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: Action,
}

/// What `command` asks the device.
#[derive(Debug, clap::Subcommand)]
enum Action {
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

/// Runs `command` from the command line: the steps on stdout, the exit code
/// that says what the device did.
pub fn main(flags: CommandFlags) -> ExitCode {
    let request = match flags.action {
        Action::GetTime { pol } => ActionSpec::GetTime { pol },
        Action::SetTime { time } => ActionSpec::SetTime { time },
        Action::Fetch { cn, from, to } => ActionSpec::Fetch { cn, from, to },
        Action::SetRtdInterval { seconds } => ActionSpec::SetRtdInterval { seconds },
        Action::GetRtdInterval => ActionSpec::GetRtdInterval,
        Action::Calibrate { pol } => ActionSpec::Calibrate { pol },
        Action::Sample { pol } => ActionSpec::Sample { pol },
        Action::Raw { cn, cp } => ActionSpec::Raw { cn, cp },
    };
    let result = flags.control.socket().and_then(|path| {
        run_command(
            &path,
            &flags.mn,
            request,
            flags.json,
            &mut std::io::stdout().lock(),
        )
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => super::fail(&e),
    }
}
