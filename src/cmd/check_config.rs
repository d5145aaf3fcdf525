//! `check-config`: the strict config check `serve` runs at start, on its own, so
//! a file can be checked before a restart.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::Config;
use crate::exit;
use crate::registry::Registry;

/// Check a config file; exit 0 if valid, 78 naming the bad key otherwise.
///
/// A valid file the packaged unit could not read (not world-readable, and
/// neither owned by nor group-readable by hj212-gateway) gets a warning on
/// stderr with the commands that fix it; the exit is still 0.
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
            if let Some(w) = service_read_warning(&path) {
                eprintln!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit::EX_CONFIG)
        }
    }
}

/// Why the packaged unit (`User=`/`Group=` hj212-gateway) could not read the
/// config at `path`, with the fix; `None` when it could. Checked because root,
/// who usually runs `check-config`, reads any file: a root-only config passes
/// here and then stops `serve` with 78 at its first start.
pub fn service_read_warning(path: &Path) -> Option<String> {
    let group = super::SERVICE_GROUP;
    let m = std::fs::metadata(path).ok()?;
    let mode = m.mode() & 0o7777;
    let owner_reads = id_of("/etc/passwd", group) == Some(m.uid()) && mode & 0o400 != 0;
    let group_reads = id_of("/etc/group", group) == Some(m.gid()) && mode & 0o040 != 0;
    if mode & 0o004 != 0 || owner_reads || group_reads {
        return None;
    }
    let file_group = name_of("/etc/group", m.gid()).unwrap_or_else(|| m.gid().to_string());
    Some(format!(
        "{p}: the gateway's service user cannot read this file (mode {mode:04o}, group {file_group}); \
         the packaged unit runs as group {group}: run `chgrp {group} {p} && chmod 0640 {p}` \
         (deploy/install.sh creates the group)",
        p = path.display()
    ))
}

/// The id of `name` in a `name:x:id:...` database (`/etc/passwd`, `/etc/group`).
fn id_of(db: &str, name: &str) -> Option<u32> {
    std::fs::read_to_string(db).ok()?.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

/// The name of `id` in a `name:x:id:...` database.
fn name_of(db: &str, id: u32) -> Option<String> {
    std::fs::read_to_string(db).ok()?.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)?.parse::<u32>().ok()? == id).then(|| name.to_owned())
    })
}
