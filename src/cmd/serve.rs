//! `serve`: the gateway itself, started from the command line.
//!
//! Everything it runs is wired in [`daemon::serve`]; this file only starts the
//! runtime and turns what stopped it into an exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::daemon::{self, Overrides, ServeError};
use crate::exit;

/// Run the gateway: accept devices, log every frame durably, ack after commit.
///
/// Example: hj212-gateway serve --config /etc/hj212-gateway/gateway.toml
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
/// returns the exit code: 0 after a clean stop, 78 for a bad config, 2 for a
/// frame log it will not use, 70 otherwise.
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
        Err(ServeError::Config(e)) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::from(exit::EX_CONFIG)
        }
        // Empty, foreign or damaged log file: an operator must act on the
        // file (exit 2, like any command given a file it cannot use);
        // restarting would only fail the same way.
        Err(ServeError::Store(e)) if e.refuses_file() => {
            tracing::error!("{e}");
            eprintln!("error: frame log: {e}");
            ExitCode::from(exit::USAGE)
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::from(exit::EX_SOFTWARE)
        }
    }
}
