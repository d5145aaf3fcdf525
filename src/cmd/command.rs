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

use serde_json::Value;

use super::CmdError;
use crate::config::Config;
use crate::daemon;
use crate::downlink::control::{ActionSpec, ControlRequest};

/// Exit code: the device answered no.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: the device did not answer in time.
pub const EXIT_TIMEOUT: u8 = 3;
/// Exit code: the device is offline or busy.
pub const EXIT_UNAVAILABLE: u8 = 4;

/// Where the control socket is: `--socket`, else `[downlink] control_socket`
/// of `--config`, else `$RUNTIME_DIRECTORY/control.sock`, else
/// `<data>/control.sock` (data: `--data`, `$STATE_DIRECTORY`, `./data`).
pub fn socket_path(socket: Option<&Path>, data: Option<&Path>, cfg: Option<&Config>) -> PathBuf {
    if let Some(s) = socket {
        return s.to_owned();
    }
    let dir = daemon::data_dir(data);
    match cfg {
        Some(c) => c.downlink.socket_path(&dir),
        None => Config::default().downlink.socket_path(&dir),
    }
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
                    _ => 2,
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
