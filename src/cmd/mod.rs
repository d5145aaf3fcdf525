//! The subcommands, one module each.
//!
//! A module owns its command line (a clap struct, `<Name>Flags`, whose doc
//! comment is the `--help` text) and `main`, which turns the flags into plain
//! argument structs, runs the command and maps the outcome to an exit code
//! ([`crate::exit`]). The work itself is a `run` taking those plain structs (what
//! tests call) and returning a [`CmdError`] for usage, I/O and configuration
//! problems; what a command found (tampering, rejected frames) is its `Ok`
//! value, not an error.

pub mod alarms;
pub mod archive;
pub mod backup;
pub mod capture;
pub mod check_config;
pub mod check_proof;
pub mod command;
pub mod dead_letters;
pub mod decode;
pub mod exchanges;
pub mod export;
pub mod keygen;
pub mod prove;
pub mod replay;
pub mod serve;
pub mod sessions;
pub mod simulate;
pub mod stats;
pub mod tail;
pub mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{Config, ConfigError};
use crate::daemon;
use crate::store::StoreError;

/// Why a command could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// Bad argument or input (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The config file is invalid (exit 78).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The frame log could not be read (exit 2).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Reading or writing a file or socket failed (exit 2).
    #[error("{context}: {source}")]
    Io {
        /// What was being read or written.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl CmdError {
    /// The process exit code for this error (see [`crate::exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            CmdError::Config(_) => crate::exit::EX_CONFIG,
            _ => crate::exit::USAGE,
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CmdError {
        let context = context.into();
        move |source| CmdError::Io { context, source }
    }
}

/// Prints `e` and its causes to stderr; returns its exit code.
pub(crate) fn fail(e: &CmdError) -> ExitCode {
    eprintln!("error: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        eprintln!("  caused by: {s}");
        src = s.source();
    }
    ExitCode::from(e.exit_code())
}

/// Where a read command finds the frame log: `--data` or `--db` (flattened into
/// each command's flags, so every command words and checks them alike).
#[derive(Debug, clap::Args)]
pub struct LogFlags {
    /// Data directory (default: $STATE_DIRECTORY, else ./data, else /var/lib/hj212-gateway).
    #[arg(long, conflicts_with = "db")]
    data: Option<PathBuf>,
    /// The SQLite file itself.
    #[arg(long)]
    db: Option<PathBuf>,
}

impl LogFlags {
    /// The log file these flags name (see [`resolve_db`]).
    pub fn db(&self, cfg: Option<&Config>) -> PathBuf {
        resolve_db(self.data.as_deref(), self.db.as_deref(), cfg)
    }
}

/// Where a command finds the log: `--db` as given, else the store path of the config
/// (or the defaults) inside `--data` (default: `$STATE_DIRECTORY`, else `./data`,
/// else the packaged gateway's `/var/lib/hj212-gateway`, see [`local_or_packaged`]).
pub fn resolve_db(data: Option<&Path>, db: Option<&Path>, cfg: Option<&Config>) -> PathBuf {
    if let Some(db) = db {
        return db.to_owned();
    }
    let default = Config::default();
    let cfg = cfg.unwrap_or(&default);
    let local = cfg.store_path(&daemon::data_dir(data));
    if data.is_some() || env_set("STATE_DIRECTORY") {
        return local;
    }
    local_or_packaged(local, cfg.store_path(Path::new(daemon::PACKAGED_STATE_DIR)))
}

/// For a client given no directory and not run by systemd: `local` (a gateway
/// started in this directory) when it is there, else `packaged` (the installed
/// unit's) when that is there or merely not readable by this user (so the
/// error says "permission denied" about it rather than "nothing here"), else
/// `local`, whose absence the caller reports.
pub(crate) fn local_or_packaged(local: PathBuf, packaged: PathBuf) -> PathBuf {
    let present = |p: &Path| match std::fs::symlink_metadata(p) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
    };
    if !present(&local) && present(&packaged) {
        packaged
    } else {
        local
    }
}

/// Whether the environment variable is set to something.
pub(crate) fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// Loads `--config` if given.
pub fn load_config(path: Option<&Path>) -> Result<Option<Config>, CmdError> {
    path.map(Config::load).transpose().map_err(CmdError::from)
}

/// The log file must exist and be readable before a read-only open, or SQLite's
/// error is cryptic. A log this user may not read is named as such, with who may:
/// under the packaged unit, root and the members of the service's group.
pub(crate) fn require_db(path: &Path) -> Result<(), CmdError> {
    let denied = |source: std::io::Error| {
        CmdError::Usage(format!(
            "{}: cannot read the frame log: {source}; it is readable by root and the members of the group {SERVICE_GROUP} (`usermod -aG {SERVICE_GROUP} $USER`, then log in again)",
            path.display()
        ))
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {
            rustix::fs::access(path, rustix::fs::Access::READ_OK).map_err(|e| denied(e.into()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(denied(e)),
        _ => Err(CmdError::Usage(format!(
            "{}: no frame log there (give --data DIR or --db PATH)",
            path.display()
        ))),
    }
}

/// The group the packaged unit runs the gateway as (`Group=` in
/// `deploy/hj212-gateway.service`): its members read the config and the log.
pub const SERVICE_GROUP: &str = "hj212-gateway";

/// Parses an RFC 3339 instant (`2024-06-01T08:00:00+08:00`, `...Z`) to UTC unix ms.
pub fn parse_instant(flag: &str, text: &str) -> Result<i64, CmdError> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            CmdError::Usage(format!(
                "{flag} {text:?}: {e}; expected RFC 3339 with an offset, e.g. 2024-06-01T08:00:00+08:00"
            ))
        })
}

/// Parses what `--since`/`--until` take in every command that has them: an RFC
/// 3339 instant, or a duration (`90s`, `15m`, `24h`, `7d`) meaning that long
/// before `now_ms`. Returns UTC unix ms.
pub fn parse_when(flag: &str, text: &str, now_ms: i64) -> Result<i64, CmdError> {
    let text = text.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    crate::config::parse_duration(text)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .map(|ago| now_ms.saturating_sub(ago))
        .ok_or_else(|| {
            CmdError::Usage(format!(
                "{flag} {text:?}: expected RFC 3339 with an offset (2024-06-01T08:00:00+08:00) \
                 or a duration ago (90s, 15m, 24h, 7d)"
            ))
        })
}

/// True when the error means the reader of our output went away (`| head`): the
/// command then stops quietly with exit 0.
pub(crate) fn is_broken_pipe(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::BrokenPipe
}

/// `2026-11-28T13:05:01.123Z`, or the integer when out of range.
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_log_wins_over_the_packaged_one_and_either_must_be_there() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("data/frames.db");
        let packaged = dir.path().join("var/lib/hj212-gateway/frames.db");
        // Neither there: the local path, so the error names what a developer expects.
        assert_eq!(local_or_packaged(local.clone(), packaged.clone()), local);
        std::fs::create_dir_all(packaged.parent().unwrap()).unwrap();
        std::fs::write(&packaged, b"").unwrap();
        assert_eq!(local_or_packaged(local.clone(), packaged.clone()), packaged);
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        std::fs::write(&local, b"").unwrap();
        assert_eq!(local_or_packaged(local.clone(), packaged), local);
    }
}
