//! `serve`: the gateway itself, started from the command line.
//!
//! Everything it runs is wired in [`daemon::serve`]; this file only starts the
//! runtime and turns what stopped it into an exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::daemon::{self, Overrides, ServeError};
use crate::exit;
use crate::notary::NotaryError;
use crate::store::StoreError;

/// Run the gateway: accept devices, log every frame durably, ack after commit.
///
/// Example: hj212-gateway serve --config /etc/hj212-gateway/gateway.toml
///
/// Exit codes: 0 stopped cleanly (SIGTERM/SIGINT); 2 a path or address it
/// cannot use (data directory missing rights or not a directory, listen address
/// in use, frame log empty/foreign/damaged/too new, signing key unreadable),
/// named with the OS error: fix it, then start again; 70 internal error;
/// 78 bad config (the packaged unit does not restart on it).
#[derive(Debug, clap::Args)]
pub struct ServeFlags {
    /// Config file (TOML); without it every key takes its default.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address, replacing [server] listen (repeatable; port 0 picks one).
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Data directory (default: $STATE_DIRECTORY, else ./data).
    #[arg(long)]
    data: Option<PathBuf>,
}

/// Runs the gateway until it is stopped (logging is set up by the caller);
/// returns the exit code (see [`exit_code`]).
pub fn main(flags: ServeFlags) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(exit::EX_SOFTWARE);
        }
    };
    match rt.block_on(daemon::serve(Overrides {
        config: flags.config,
        listen: flags.listen,
        data: flags.data,
    })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = message(&e);
            tracing::error!("{text}");
            eprintln!("error: {text}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code for what stopped `serve`: 78 a bad config; 2 a path, address
/// or file an operator must act on (restarting fails the same way until then);
/// 70 anything else.
pub fn exit_code(e: &ServeError) -> u8 {
    match e {
        ServeError::Config(_) => exit::EX_CONFIG,
        ServeError::Unusable { .. } => exit::USAGE,
        ServeError::Store(e) if e.refuses_file() || store_io(e) => exit::USAGE,
        ServeError::Notary(NotaryError::Key(_)) => exit::USAGE,
        _ => exit::EX_SOFTWARE,
    }
}

/// Whether the store failed on the file system (a directory or file it could
/// not create) rather than on its own logic. SQLite's own open errors do not
/// name the path; [`daemon`] checks the data directory and the log before the
/// store opens them, so those name it.
fn store_io(e: &StoreError) -> bool {
    matches!(e, StoreError::CreateDir { .. } | StoreError::Io { .. })
}

/// `e` and its causes on one line; a cause already quoted in the text before it
/// (errors that format their source) is not repeated.
fn message(e: &ServeError) -> String {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text = format!("{text}: {part}");
        }
        src = s.source();
    }
    text
}
