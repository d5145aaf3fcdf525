//! What an operator sees when the machine, not the config, is wrong: the real
//! binary against real files, directories, ports and users. Each failure exits
//! with the documented code (2: a path or address to fix) and names the path or
//! key together with the OS error.
//!
//! The permission cases need a user the files refuse: a non-root test run is
//! that user (mode 000); as root the command runs as `nobody` through `setpriv`,
//! and the case is skipped, saying why, when `setpriv` is missing.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_hj212-gateway");

/// A config the gateway starts with and nothing else listens for (no broker, no
/// metrics port), readable by every user so `nobody` can be given it.
fn config(dir: &Path, listen: &str) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"{listen}\"]\n[mqtt]\nenabled = false\n[metrics]\nlisten = \"\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// A temporary directory other users may enter (tempdir makes it 0700).
fn open_tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn run(cmd: &mut Command) -> (Option<i32>, String) {
    let Output { status, stderr, .. } = cmd
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run hj212-gateway");
    (status.code(), String::from_utf8_lossy(&stderr).into_owned())
}

/// `hj212-gateway <args>` as a user that files of mode 000 refuse: this user
/// when not root, else `nobody` through setpriv; `None` (and why, printed) when
/// that cannot be arranged.
fn as_refused_user(args: &[&str]) -> Option<Command> {
    if !rustix::process::geteuid().is_root() {
        let mut c = Command::new(BIN);
        c.args(args);
        return Some(c);
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("SKIPPED: running as root and setpriv (util-linux) is not installed");
        return None;
    }
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(args);
    Some(c)
}

#[test]
fn serve_exits_2_naming_a_data_dir_that_is_a_file() {
    let dir = open_tempdir();
    let cfg = config(dir.path(), "127.0.0.1:0");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let (code, err) = run(Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--data")
        .arg(&file));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("data directory {} (--data)", file.display()))
            && err.contains("Not a directory (os error 20)"),
        "{err}"
    );
}

#[test]
fn serve_exits_2_naming_the_listen_key_when_the_port_is_taken() {
    let dir = open_tempdir();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cfg = config(dir.path(), &addr);
    let (code, err) = run(Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--data")
        .arg(dir.path().join("data")));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("[server] listen in {}", cfg.display()))
            && err.contains(&addr)
            && err.contains("Address already in use (os error 98)"),
        "{err}"
    );
    // Given on the command line, the flag is what the message names.
    let (code, err) = run(Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--data")
        .arg(dir.path().join("data"))
        .args(["--listen", &addr]));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("--listen: cannot listen on {addr}")),
        "{err}"
    );
}

#[test]
fn serve_exits_2_naming_a_data_dir_it_may_not_write() {
    let dir = open_tempdir();
    let cfg = config(dir.path(), "127.0.0.1:0");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    let (cfg_s, data_s) = (cfg.to_str().unwrap(), data.to_str().unwrap());
    let Some(mut cmd) = as_refused_user(&["serve", "--config", cfg_s, "--data", data_s]) else {
        return;
    };
    let (code, err) = run(&mut cmd);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "data directory {data_s} (--data): Permission denied (os error 13)"
        )),
        "{err}"
    );
}

#[test]
fn serve_exits_2_naming_an_unusable_signing_key() {
    let dir = open_tempdir();
    let cfg = config(dir.path(), "127.0.0.1:0");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let key = data.join("checkpoint.key");
    std::fs::write(&key, b"not a key\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, err) = run(Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--data")
        .arg(&data));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&key.display().to_string()), "{err}");
}

#[test]
fn serve_help_lists_the_exit_codes() {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for code in [
        "0 stopped cleanly",
        "2 a path or address",
        "70 internal",
        "78 bad config",
    ] {
        assert!(
            help.contains(code),
            "{code:?} missing from serve --help:\n{help}"
        );
    }
}

#[test]
fn check_config_warns_when_the_service_group_cannot_read_the_file() {
    let dir = open_tempdir();
    let cfg = config(dir.path(), "127.0.0.1:0");
    let (code, err) = run(Command::new(BIN).arg("check-config").arg(&cfg));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !err.contains("warning"),
        "0644 is readable by everyone: {err}"
    );

    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, err) = run(Command::new(BIN).arg("check-config").arg(&cfg));
    assert_eq!(code, Some(0), "a warning does not fail the check: {err}");
    let p = cfg.display();
    assert!(
        err.contains(&format!(
            "warning: {p}: the gateway's service user cannot read this file (mode 0600"
        )) && err.contains(&format!("chgrp hj212-gateway {p} && chmod 0640 {p}")),
        "{err}"
    );
}

#[test]
fn a_read_command_says_permission_denied_not_no_log() {
    let dir = open_tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("frames.db"), b"").unwrap();
    // As the packaged unit leaves it to users outside its group.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o000)).unwrap();
    let data_s = data.to_str().unwrap();
    let Some(mut cmd) = as_refused_user(&["stats", "--data", data_s]) else {
        return;
    };
    let (code, err) = run(&mut cmd);
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{data_s}/frames.db: cannot read the frame log: Permission denied (os error 13); \
             it is readable by root and the members of the group hj212-gateway"
        )) && !err.contains("no frame log there"),
        "{err}"
    );
}
