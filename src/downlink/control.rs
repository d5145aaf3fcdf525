//! The operator control socket: a Unix socket, owner-only, one request per
//! connection, line-delimited JSON.
//!
//! ```text
//! -> {"op":"command","mn":"MN","request":{"action":"get-time"}}
//! <- {"event":"sent","qn":"20240601090000001","cn":1011,"attempt":1}
//! <- {"event":"qn_rtn","code":1,"meaning":"ready to execute"}
//! <- {"event":"upload","cn":"1011","qn":"20240601090000001","cp":"SystemTime=20240601090000"}
//! <- {"event":"exe_rtn","code":1,"meaning":"success"}
//! <- {"event":"done","outcome":"success","ok":true,"message":"..."}
//! -> {"op":"sessions"}
//! <- {"sessions":[{"mn":"..","peer":"..","since_ms":..,"dialect":"2017","last_frame_ms":..,"session":1}]}
//! ```
//!
//! The socket is the authority boundary: whoever can open it can command any
//! connected device, so it is created mode 0600 (and its directory should be
//! private too, as systemd's `RuntimeDirectory` is).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{Action, Event, ORIGIN_OPERATOR, Outcome, Refusal, Submit};
use crate::app::Shared;
use crate::protocol;

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// One operator request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ControlRequest {
    /// Send a request to a device and report its steps.
    Command {
        /// The device.
        mn: String,
        /// What to ask.
        request: ActionSpec,
    },
    /// List the live sessions.
    Sessions,
}

/// The `command` actions as they travel on the socket. Times are N14 device
/// local (`YYYYMMDDhhmmss`) or RFC 3339 (converted to the device time zone).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ActionSpec {
    /// 1011.
    GetTime {
        /// PolId (an instrument's clock).
        #[serde(default)]
        pol: Option<String>,
    },
    /// 1012; without `time`, the gateway's clock when the request is sent.
    SetTime {
        /// SystemTime.
        #[serde(default)]
        time: Option<String>,
    },
    /// 2051 / 2061 / 2031 (2041).
    Fetch {
        /// CN.
        cn: u16,
        /// BeginTime.
        from: String,
        /// EndTime.
        to: String,
    },
    /// 1062.
    SetRtdInterval {
        /// Seconds.
        seconds: u32,
    },
    /// 1061.
    GetRtdInterval,
    /// 3011.
    Calibrate {
        /// PolId.
        pol: String,
    },
    /// 3012.
    Sample {
        /// PolId.
        pol: String,
    },
    /// Any CN and CP.
    Raw {
        /// CN.
        cn: u16,
        /// CP body.
        cp: String,
    },
}

/// Parses an operator time: 14 digits as device-local, or RFC 3339.
pub fn parse_time(text: &str, tz: FixedOffset) -> Result<String, String> {
    let t = text.trim();
    if t.len() == 14 && t.bytes().all(|b| b.is_ascii_digit()) {
        return protocol::time::parse_local(t.as_bytes(), tz)
            .map(|_| t.to_owned())
            .ok_or_else(|| format!("{text:?} is not a valid YYYYMMDDhhmmss time"));
    }
    DateTime::parse_from_rfc3339(t)
        .map(|d| protocol::time::format_n14(d.with_timezone(&tz)))
        .map_err(|_| format!("{text:?}: expected YYYYMMDDhhmmss (device local) or RFC 3339"))
}

impl ActionSpec {
    /// The engine's action, with times checked and converted.
    pub fn to_action(&self, tz: FixedOffset) -> Result<Action, String> {
        let pol = |p: &str| {
            if p.is_empty() || p.contains([';', ',', '=', '&']) {
                Err(format!("{p:?} is not a pollutant code"))
            } else {
                Ok(p.to_owned())
            }
        };
        Ok(match self {
            ActionSpec::GetTime { pol: p } => Action::GetTime {
                pol: p.as_deref().map(pol).transpose()?,
            },
            ActionSpec::SetTime { time } => Action::SetTime {
                time: time.as_deref().map(|t| parse_time(t, tz)).transpose()?,
                pol: None,
            },
            ActionSpec::Fetch { cn, from, to } => {
                if !super::engine::is_history(*cn) {
                    return Err(format!("--cn {cn}: expected 2051, 2061, 2031 or 2041"));
                }
                let (from, to) = (parse_time(from, tz)?, parse_time(to, tz)?);
                if from > to {
                    return Err(format!("--from {from} is after --to {to}"));
                }
                Action::Fetch { cn: *cn, from, to }
            }
            ActionSpec::SetRtdInterval { seconds } => {
                if *seconds == 0 || *seconds > 3600 {
                    return Err(format!("{seconds}: expected 1..3600 seconds"));
                }
                Action::SetRtdInterval(*seconds)
            }
            ActionSpec::GetRtdInterval => Action::GetRtdInterval,
            ActionSpec::Calibrate { pol: p } => Action::Calibrate { pol: pol(p)? },
            ActionSpec::Sample { pol: p } => Action::Sample { pol: pol(p)? },
            ActionSpec::Raw { cn, cp } => {
                if *cn == 0 || *cn > 9999 {
                    return Err(format!("--cn {cn}: expected a 4-digit CN"));
                }
                if cp.contains("&&") || cp.contains(['\r', '\n']) {
                    return Err("--cp must not contain && or line breaks".into());
                }
                Action::Raw {
                    cn: *cn,
                    cp: cp.clone(),
                }
            }
        })
    }
}

/// A bound control socket.
#[derive(Debug)]
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
}

impl Control {
    /// Binds `path` (mode 0600). A socket file left by a crashed gateway is
    /// replaced; one a live gateway answers on is an error.
    pub async fn bind(path: &Path) -> std::io::Result<Control> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "control socket {} is in use by another gateway",
                        path.display()
                    ),
                ));
            }
            // Only a socket is ours to replace; anything else is a misconfiguration.
            use std::os::unix::fs::FileTypeExt;
            if !std::fs::symlink_metadata(path)?.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "control socket {} exists and is not a socket",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
        })?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Control {
            listener,
            path: path.to_owned(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves operators until `shutdown`, then removes the socket file.
    pub fn spawn(
        self,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let clients = Arc::new(Semaphore::new(shared.cfg.downlink.control_clients));
            // Clients stop on the same token; the task ends only after they did,
            // so that whoever waits for it at shutdown waits for them too.
            let tracker = TaskTracker::new();
            info!(path = %self.path.display(), "control socket ready");
            loop {
                let conn = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    c = self.listener.accept() => c,
                };
                let stream = match conn {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = clients.clone().try_acquire_owned() else {
                    let mut s = stream;
                    let _ = s
                        .write_all(
                            done_line(
                                &Outcome::Busy,
                                "too many control clients (downlink.control_clients)",
                            )
                            .as_bytes(),
                        )
                        .await;
                    continue;
                };
                let (shared, stop) = (shared.clone(), shutdown.clone());
                tracker.spawn(async move {
                    let _permit = permit;
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        r = handle(stream, shared) => if let Err(e) = r {
                            debug!(error = %e, "control client gone");
                        },
                    }
                });
            }
            let _ = std::fs::remove_file(&self.path);
            tracker.close();
            tracker.wait().await;
        })
    }
}

fn done_line(o: &Outcome, message: &str) -> String {
    let mut v = json!({
        "event": "done",
        "outcome": o.name(),
        "ok": *o == Outcome::Success,
        "message": message,
    });
    match o {
        Outcome::Refused(c) => v["code"] = json!(c),
        Outcome::Failed(c) => v["code"] = json!(c),
        Outcome::NoReply { sends } => v["sends"] = json!(sends),
        _ => {}
    }
    format!("{v}\n")
}

/// The operator-facing sentence for an outcome.
pub fn outcome_message(o: &Outcome, mn: &str, cfg: &super::config::DownlinkSection) -> String {
    match o {
        Outcome::Success => "success".into(),
        Outcome::Refused(c) => format!(
            "the device refused the request: QnRtn={c} ({})",
            super::qn_rtn_meaning(*c)
        ),
        Outcome::Failed(c) => format!(
            "the device could not execute the request: ExeRtn={c} ({})",
            super::exe_rtn_meaning(*c)
        ),
        Outcome::NoReply { sends } => format!(
            "no 9011 from {mn} after {sends} sends, {} s apart (downlink.over_time, downlink.re_count)",
            cfg.over_time.0.as_secs_f64()
        ),
        Outcome::ExecTimeout => format!(
            "the device accepted but sent nothing more within {} s (downlink.exec_timeout)",
            cfg.exec_timeout.0.as_secs_f64()
        ),
        Outcome::Offline => format!("device {mn} is not connected (no live session)"),
        Outcome::Busy => format!(
            "device {mn} has {} requests waiting already (downlink.queue); try again later",
            cfg.queue
        ),
        Outcome::Closed => format!("the session of {mn} ended before the exchange did"),
        Outcome::Invalid(m) => m.clone(),
    }
}

async fn handle(stream: UnixStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    BufReader::new(rd.take(MAX_LINE))
        .read_line(&mut line)
        .await?;
    let req: ControlRequest = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("bad control request: {e}");
            wr.write_all(done_line(&Outcome::Invalid(msg.clone()), &msg).as_bytes())
                .await?;
            return Ok(());
        }
    };
    let cfg = &shared.cfg.downlink;
    match req {
        ControlRequest::Sessions => {
            let v = json!({ "sessions": shared.sessions.list() });
            wr.write_all(format!("{v}\n").as_bytes()).await?;
        }
        ControlRequest::Command { mn, request } => {
            let tz = shared
                .cfg
                .time_zone()
                .unwrap_or_else(protocol::time::beijing);
            let action = match request.to_action(tz) {
                Ok(a) => a,
                Err(m) => {
                    wr.write_all(done_line(&Outcome::Invalid(m.clone()), &m).as_bytes())
                        .await?;
                    return Ok(());
                }
            };
            let (tx, mut rx) = mpsc::channel(cfg.events);
            let sub = Box::new(Submit {
                mn: mn.clone(),
                action,
                origin: ORIGIN_OPERATOR.into(),
                replies: Some(tx),
            });
            if let Err((sub, why)) = shared.sessions.submit(sub) {
                super::audit::refused(&shared.store, &sub, why);
                let o = match why {
                    Refusal::Offline => Outcome::Offline,
                    Refusal::Busy => Outcome::Busy,
                };
                let m = outcome_message(&o, &mn, cfg);
                wr.write_all(done_line(&o, &m).as_bytes()).await?;
                return Ok(());
            }
            info!(mn = %mn, "operator request queued");
            loop {
                let Some(ev) = rx.recv().await else {
                    let o = Outcome::Closed;
                    wr.write_all(done_line(&o, &outcome_message(&o, &mn, cfg)).as_bytes())
                        .await?;
                    break;
                };
                let line = match &ev {
                    Event::Sent { qn, cn, attempt } => {
                        json!({"event": "sent", "qn": qn, "cn": cn, "attempt": attempt})
                    }
                    Event::QnRtn { code, .. } => {
                        json!({"event": "qn_rtn", "code": code, "meaning": super::qn_rtn_meaning(*code)})
                    }
                    Event::Upload { cn, qn, cp, .. } => {
                        json!({"event": "upload", "cn": cn, "qn": qn, "cp": cp})
                    }
                    Event::NotifyAck { .. } => json!({"event": "notify_ack"}),
                    Event::ExeRtn { code, .. } => {
                        json!({"event": "exe_rtn", "code": code, "meaning": super::exe_rtn_meaning(*code)})
                    }
                    Event::Done(o) => {
                        wr.write_all(done_line(o, &outcome_message(o, &mn, cfg)).as_bytes())
                            .await?;
                        break;
                    }
                };
                wr.write_all(format!("{line}\n").as_bytes()).await?;
            }
        }
    }
    let _ = wr.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_actions_are_checked() {
        let tz = protocol::time::beijing();
        assert_eq!(parse_time("20240601090000", tz).unwrap(), "20240601090000");
        assert_eq!(
            parse_time("2024-06-01T01:00:00Z", tz).unwrap(),
            "20240601090000"
        );
        assert!(parse_time("20241301090000", tz).is_err());
        assert!(parse_time("yesterday", tz).is_err());
        let f = ActionSpec::Fetch {
            cn: 2011,
            from: "20240601000000".into(),
            to: "20240601010000".into(),
        };
        assert!(f.to_action(tz).is_err());
        let raw = ActionSpec::Raw {
            cn: 3020,
            cp: "a&&b".into(),
        };
        assert!(raw.to_action(tz).is_err());
        let r: ControlRequest = serde_json::from_str(
            r#"{"op":"command","mn":"X","request":{"action":"set-rtd-interval","seconds":30}}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            ControlRequest::Command {
                request: ActionSpec::SetRtdInterval { seconds: 30 },
                ..
            }
        ));
    }
}
