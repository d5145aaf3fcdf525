//! `check-config`: the strict config check `serve` runs at start, on its own, so
//! a file can be checked before a restart.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::exit;
use crate::registry::Registry;

/// Check a config file; exit 0 if valid, 78 naming the bad key otherwise.
#[derive(Debug, clap::Args)]
pub struct CheckConfigFlags {
    /// Config file.
    path: PathBuf,
}

/// Runs `check-config`: one line on stdout when the file is valid, the error on
/// stderr otherwise; returns the exit code.
pub fn main(flags: CheckConfigFlags) -> ExitCode {
    let path = flags.path;
    match Config::load(&path).and_then(|c| Registry::from_config(&c).map(|_| c)) {
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
            ExitCode::from(exit::EX_CONFIG)
        }
    }
}
