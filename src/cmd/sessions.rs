//! `sessions`: the devices connected to the running gateway, asked through its
//! control socket (the client lives in [`command`]).

use std::process::ExitCode;

use super::command;

/// List the devices connected to the running gateway: MN, peer, since, dialect, last frame.
///
/// Exit 0 on success, 2 when the control socket cannot be reached, 78 bad --config.
#[derive(Debug, clap::Args)]
pub struct SessionsFlags {
    #[command(flatten)]
    control: command::ControlFlags,
    /// One JSON array instead of the table.
    #[arg(long)]
    json: bool,
}

/// Runs `sessions` from the command line: the table on stdout, the exit code back.
pub fn main(flags: SessionsFlags) -> ExitCode {
    let result = flags
        .control
        .socket()
        .and_then(|path| command::run_sessions(&path, flags.json, &mut std::io::stdout().lock()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail(&e),
    }
}
