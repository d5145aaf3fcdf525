//! `backup` against a real gateway that is ingesting: the copy verifies, holds
//! every record committed before it started, each byte-exact, together with the
//! sealed archives and the checkpoints; it never overwrites; a gateway starts on it.

#[allow(dead_code)]
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hj212_gateway::store::Reader;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
}

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .env_remove("STATE_DIRECTORY")
        .output()
        .expect("run the binary")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn head(db: &Path) -> u64 {
    Reader::open(db).unwrap().last_seq().unwrap()
}

/// `export --format jsonl` of every record, one line each.
fn export_lines(data: &Path) -> Vec<String> {
    ok(&run(&[
        "export",
        "--data",
        data.to_str().unwrap(),
        "--format",
        "jsonl",
        "--direction",
        "all",
    ]))
    .lines()
    .map(str::to_owned)
    .collect()
}

#[test]
fn backup_while_ingesting_verifies_and_holds_every_record_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nsync = \"normal\"\n\
         [mqtt]\nenabled = false\n[metrics]\nenabled = false\n\
         [evidence]\ncheckpoint_interval = \"1s\"\n",
    )
    .unwrap();
    let db = data.join("frames.db");
    let simulate = |target: &str, secs: &str| {
        bin()
            .args([
                "simulate",
                "--target",
                target,
                "--devices",
                "20",
                "--rate",
                "400",
                "--duration",
                secs,
                "--progress",
                "0",
                "--json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // A first run's records sealed into an archive (with the gateway stopped:
    // what `archive` does to a live log is tests/archive.rs's business). A seal
    // ends at the first record received after `--before`: a second short run
    // provides it.
    let traffic = |secs: &str| {
        let gw = common::Bin::spawn(&cfg, &data);
        let o = simulate(&gw.addr.to_string(), secs)
            .wait_with_output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    traffic("2");
    let now = chrono::Utc::now().to_rfc3339();
    traffic("1");
    let sealed = ok(&run(&[
        "archive",
        "--data",
        data.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--before",
        &now,
    ]));
    assert!(sealed.contains("sealed seqs 1..="), "{sealed}");
    let archived = head(&db);

    // The gateway again, ingesting while the backup runs.
    let gw = common::Bin::spawn(&cfg, &data);
    let mut sim = simulate(&gw.addr.to_string(), "8");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(head(&db) > archived + 400 && data.join("checkpoints.log").is_file()) {
        assert!(Instant::now() < deadline, "no traffic or checkpoint");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = head(&db);
    let out = dir.path().join("backup-1");
    let printed = ok(&run(&[
        "backup",
        "--data",
        data.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
    ]));
    let still_ingesting = sim.try_wait().unwrap().is_none();
    let sim_out = sim.wait_with_output().unwrap();
    assert!(
        sim_out.status.success(),
        "{}",
        String::from_utf8_lossy(&sim_out.stderr)
    );
    assert!(still_ingesting, "the simulator ended before the backup did");
    eprintln!("{printed}");

    assert!(printed.contains("(SQLite online backup)"), "{printed}");
    assert!(printed.contains("archives: 1 file(s)"), "{printed}");
    assert!(printed.contains("checkpoints: "), "{printed}");
    assert!(
        printed.contains("not copied: "),
        "the key is named: {printed}"
    );
    assert!(
        !out.join("checkpoint.key").exists(),
        "the key is not copied"
    );
    assert!(!dir.path().join("backup-1.tmp").exists());

    // The copy holds every record committed before the backup began, and the
    // printed head is its real head.
    let copied = head(&out.join("frames.db"));
    assert!(
        copied >= before,
        "backup head {copied} < {before} before it"
    );
    assert!(
        printed.contains(&format!("seqs 1..={copied} ")),
        "{printed}"
    );

    // `verify` on the backup: chain, CRCs, tree, and the checkpoints copied with it.
    let v = run(&[
        "verify",
        "--data",
        out.to_str().unwrap(),
        "--checkpoint",
        out.join("checkpoints.log").to_str().unwrap(),
    ]);
    let report = ok(&v);
    assert!(report.contains("chain intact"), "{report}");
    assert!(
        report.contains(&format!("{copied} records checked")),
        "{report}"
    );
    assert!(report.lines().any(|l| l == "intact"), "{report}");

    // Byte-exact: the backup's records are the source's first `copied` records.
    drop(gw);
    let src = export_lines(&data);
    let bak = export_lines(&out);
    assert_eq!(bak.len() as u64, copied);
    assert!(
        src.len() as u64 > copied,
        "the gateway wrote on after the backup"
    );
    assert!(
        bak[..] == src[..bak.len()],
        "backup records differ from the source"
    );

    // Never overwrites: exit 2, the existing backup untouched.
    let before_bytes = std::fs::read(out.join("frames.db")).unwrap();
    let again = run(&[
        "backup",
        "--data",
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(out.join("frames.db")).unwrap(), before_bytes);

    // No log: exit 2 naming the path, nothing created.
    let none = dir.path().join("none");
    let missing = run(&[
        "backup",
        "--data",
        none.to_str().unwrap(),
        dir.path().join("backup-2").to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no frame log there"));
    assert!(!dir.path().join("backup-2").exists());
    assert!(!dir.path().join("backup-2.tmp").exists());

    // A backup is a data directory: a gateway starts on it.
    let restored = common::Bin::spawn(&cfg, &out);
    drop(restored);
}
