//! `deploy/install.sh` into a scratch root (DESTDIR in a temporary directory, no
//! systemd): what it installs, with which modes and owners, that a second run
//! keeps the config, and that the unit's service identity can read what it
//! installed: `check-config` run as an unprivileged user in the service group
//! passes, while the same config made root-only (0600, the layout that failed
//! in issue 21) is refused.
//!
//! install.sh creates the system group and user `hj212-gateway`, so this needs
//! root; without it, or without `setpriv`, the test says so and returns. The
//! accounts it created are removed at the end.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_hj212-gateway");
const NAME: &str = "hj212-gateway";

fn id_of(db: &str, name: &str) -> Option<u32> {
    std::fs::read_to_string(db).ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f.get(2)?.parse().ok())?
    })
}

/// Removes the accounts install.sh created for this test, not ones that were there.
struct Accounts {
    user: bool,
    group: bool,
}

impl Drop for Accounts {
    fn drop(&mut self) {
        if self.user && id_of("/etc/passwd", NAME).is_some() {
            let _ = Command::new("userdel").arg(NAME).status();
        }
        if self.group && id_of("/etc/group", NAME).is_some() {
            let _ = Command::new("groupdel").arg(NAME).status();
        }
    }
}

fn install(root: &Path, prefix: &str) -> Output {
    let out = Command::new("sh")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/install.sh"))
        .env("DESTDIR", root)
        .env("PREFIX", prefix)
        .env("BIN", BIN)
        .output()
        .expect("run install.sh");
    assert!(
        out.status.success(),
        "install.sh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// (mode, uid, gid) of a path.
fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// `hj212-gateway check-config <config>` as uid 65534 with only the group `gid`.
fn check_config_as(gid: u32, bin: &Path, config: &Path) -> (Option<i32>, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups"])
        .arg(bin)
        .arg("check-config")
        .arg(config)
        .output()
        .expect("setpriv");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn install_sh_lays_out_files_the_service_group_can_read() {
    if !rustix::process::geteuid().is_root() {
        println!("SKIPPED: install.sh creates the group {NAME} and chowns the config; needs root");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("SKIPPED: setpriv (util-linux) is not installed; cannot run as the service user");
        return;
    }
    let _accounts = Accounts {
        user: id_of("/etc/passwd", NAME).is_none(),
        group: id_of("/etc/group", NAME).is_none(),
    };
    let tmp = tempfile::tempdir().unwrap();
    // The unprivileged user must be able to walk down to the installed files.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = tmp.path().join("root");
    let out = install(&root, "/usr/local");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Next steps:") && stdout.contains("systemctl enable --now hj212-gateway"),
        "{stdout}"
    );

    let gid = id_of("/etc/group", NAME).expect("install.sh created the group");
    assert!(
        id_of("/etc/passwd", NAME).is_some(),
        "install.sh created the user"
    );
    let bin: PathBuf = root.join("usr/local/bin/hj212-gateway");
    let unit = root.join("etc/systemd/system/hj212-gateway.service");
    let etc = root.join("etc/hj212-gateway");
    let config = etc.join("gateway.toml");
    assert_eq!(owner_mode(&bin), (0o755, 0, 0));
    assert_eq!(owner_mode(&unit), (0o644, 0, 0));
    assert_eq!(owner_mode(&etc), (0o755, 0, 0));
    assert_eq!(owner_mode(&config), (0o640, 0, gid));
    assert_eq!(
        std::fs::read(&config).unwrap(),
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/gateway.toml")).unwrap()
    );
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/hj212-gateway serve",
        "User=hj212-gateway",
        "Group=hj212-gateway",
    ] {
        assert!(unit_text.contains(line), "unit lacks {line:?}");
    }

    // The service's view: not root, not the owner, only the group.
    let (code, text) = check_config_as(gid, &bin, &config);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(": ok (") && !text.contains("warning"),
        "{text}"
    );

    // The layout issue 21 found: root-only. The service is refused (78, the
    // file and the OS error named); root's own check-config still passes, warning.
    let root_only = etc.join("root-only.toml");
    std::fs::copy(&config, &root_only).unwrap();
    std::os::unix::fs::chown(&root_only, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, text) = check_config_as(gid, &bin, &root_only);
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains(&root_only.display().to_string()) && text.contains("Permission denied"),
        "{text}"
    );
    let out = Command::new(&bin)
        .arg("check-config")
        .arg(&root_only)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning:") && err.contains("chgrp hj212-gateway"),
        "{err}"
    );

    // A second run is an upgrade: the operator's config stays as it is.
    std::fs::write(&config, "# edited by the operator\n").unwrap();
    let out = install(&root, "/usr/local");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("kept {}", config.display())));
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "# edited by the operator\n"
    );
    assert_eq!(owner_mode(&config), (0o640, 0, gid));

    // Another prefix: the unit starts the binary where it went.
    let opt = tmp.path().join("opt-root");
    install(&opt, "/opt/hj212");
    assert_eq!(
        owner_mode(&opt.join("opt/hj212/bin/hj212-gateway")).0,
        0o755
    );
    let unit_text =
        std::fs::read_to_string(opt.join("etc/systemd/system/hj212-gateway.service")).unwrap();
    assert!(
        unit_text.contains("ExecStart=/opt/hj212/bin/hj212-gateway serve"),
        "{unit_text}"
    );
}
