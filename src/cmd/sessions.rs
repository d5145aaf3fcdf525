//! `sessions`: the devices connected to the running gateway, asked through its
//! control socket (the client lives in [`command`]).

use std::path::PathBuf;
use std::process::ExitCode;

use super::command;

/// List the devices connected to the running gateway: MN, peer, since, dialect, last frame.
///
/// Exit 0 on success, 2 when the control socket cannot be reached, 78 bad --config.
// This doc comment is the `--help` text, written for a terminal: rustdoc would
// read its `<data>` as markup.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, clap::Args)]
pub struct SessionsFlags {
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
}

/// Runs `sessions` from the command line: the table on stdout, the exit code back.
pub fn main(flags: SessionsFlags) -> ExitCode {
    let result = super::load_config(flags.config.as_deref()).and_then(|cfg| {
        let path =
            command::socket_path(flags.socket.as_deref(), flags.data.as_deref(), cfg.as_ref());
        command::run_sessions(&path, flags.json, &mut std::io::stdout().lock())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail(&e),
    }
}
