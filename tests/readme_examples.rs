//! The README's shell examples, run against the built binary so that the README
//! and the gateway cannot drift apart.
//!
//! Every ```` ```sh ```` and ```` ```console ```` block is run, unless the line
//! right before it is `<!-- not run: REASON -->` (it needs root, systemd, a
//! network or minutes). A `sh` block runs with `sh -eu` and must exit 0. A
//! `console` block is a transcript: each `$ ` line is run and what follows it,
//! up to the next `$ ` line, must be exactly its output (stdout and stderr, as a
//! terminal shows them; a line `...` stands for any number of lines).
//!
//! Each block runs in a directory of its own, with `hj212-gateway` on `PATH`
//! being the binary under test, next to one gateway the test started and fed a
//! few seconds of simulated traffic. The README's paths and address stand for
//! that gateway's: `/var/lib/hj212-gateway` (its data directory),
//! `/etc/hj212-gateway/gateway.toml` (its config) and `127.0.0.1:9212` /
//! `0.0.0.0:9212` (its device port).

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const README: &str = include_str!("../README.md");
const NOT_RUN: &str = "<!-- not run:";

/// One fenced block of the README.
struct Block {
    /// 1-based line of its opening fence.
    line: usize,
    lang: String,
    body: String,
    /// The reason given in a `<!-- not run: ... -->` line right before it.
    not_run: Option<String>,
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    let mut previous = "";
    while let Some((i, line)) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            let not_run = previous
                .trim()
                .strip_prefix(NOT_RUN)
                .and_then(|r| r.strip_suffix("-->"))
                .map(|r| r.trim().to_owned());
            out.push(Block {
                line: i + 1,
                lang: lang.trim().to_owned(),
                body,
                not_run,
            });
            previous = "";
        } else {
            previous = line;
        }
    }
    out
}

fn is_shell(b: &Block) -> bool {
    b.lang == "sh" || b.lang == "console"
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces to `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_shell_block_is_run_or_says_why_not_and_the_contents_list_every_section() {
    let all = blocks(README);
    assert!(all.iter().filter(|b| is_shell(b)).count() >= 8);
    for b in &all {
        if let Some(reason) = &b.not_run {
            assert!(
                is_shell(b),
                "README.md:{}: `not run` before a ```{} block, which is never run anyway",
                b.line,
                b.lang
            );
            assert!(
                !reason.is_empty(),
                "README.md:{}: say why the block is not run",
                b.line
            );
        }
    }
    // A marker must sit right before a fence, or it marks nothing.
    let lines: Vec<&str> = README.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.trim().starts_with(NOT_RUN) {
            assert!(
                lines.get(i + 1).is_some_and(|n| n.starts_with("```")),
                "README.md:{}: a `not run` line must be right before a code block",
                i + 1
            );
        }
    }

    let mut fence = false;
    let mut sections = Vec::new();
    for l in README.lines() {
        if l.starts_with("```") {
            fence = !fence;
        } else if !fence && let Some(h) = l.strip_prefix("## ") {
            sections.push(h);
        }
    }
    let contents = README
        .split("## Contents\n")
        .nth(1)
        .expect("a ## Contents section")
        .split("\n## ")
        .next()
        .unwrap();
    for h in sections.iter().filter(|h| **h != "Contents") {
        let link = format!("(#{})", anchor(h));
        assert!(
            contents.contains(&link),
            "## Contents lacks `## {h}` (link {link})"
        );
    }
}

/// The gateway the examples run against, and where they run.
struct Bench {
    _gw: common::Bin,
    root: tempfile::TempDir,
    data: PathBuf,
    config: PathBuf,
    addr: String,
    path: String,
}

impl Bench {
    fn start() -> Bench {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("state");
        let config = root.path().join("gateway.toml");
        std::fs::write(
            &config,
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[mqtt]\nenabled = false\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n[evidence]\ncheckpoint_interval = \"1s\"\n",
        )
        .unwrap();
        let gw = common::Bin::spawn(&config, &data);
        let addr = gw.addr.to_string();
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_hj212-gateway"),
            bin.join("hj212-gateway"),
        )
        .unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let sim = Command::new(env!("CARGO_BIN_EXE_hj212-gateway"))
            .args([
                "simulate",
                "--target",
                &addr,
                "--devices",
                "3",
                "--interval",
                "0.5",
                "--duration",
                "2",
                "--progress",
                "0",
            ])
            .output()
            .unwrap();
        assert!(
            sim.status.success(),
            "{}",
            String::from_utf8_lossy(&sim.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !data.join("checkpoints.log").is_file() {
            assert!(Instant::now() < deadline, "no checkpoint");
            std::thread::sleep(Duration::from_millis(100));
        }
        Bench {
            _gw: gw,
            root,
            data,
            config,
            addr,
            path,
        }
    }

    /// The README's paths and port replaced by this gateway's.
    fn localise(&self, text: &str) -> String {
        text.replace(
            "/etc/hj212-gateway/gateway.toml",
            &self.config.to_string_lossy(),
        )
        .replace("/var/lib/hj212-gateway", &self.data.to_string_lossy())
        .replace("127.0.0.1:9212", &self.addr)
        .replace("0.0.0.0:9212", &self.addr)
    }

    fn shell(&self, dir: &Path, flags: &str, script: &str) -> std::process::Output {
        Command::new("sh")
            .arg(flags)
            .arg(script)
            .current_dir(dir)
            .env("PATH", &self.path)
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }
}

/// A transcript's commands, each with the lines it must print (`\` continues a
/// command on the next line).
fn transcript(body: &str) -> Vec<(String, Vec<String>)> {
    let mut steps: Vec<(String, Vec<String>)> = Vec::new();
    let mut lines = body.lines();
    while let Some(l) = lines.next() {
        if let Some(cmd) = l.strip_prefix("$ ") {
            let mut cmd = cmd.to_owned();
            while cmd.ends_with('\\') {
                cmd.pop();
                cmd.push_str(lines.next().unwrap_or(""));
            }
            steps.push((cmd, Vec::new()));
        } else if let Some((_, out)) = steps.last_mut() {
            out.push(l.to_owned());
        } else {
            panic!("a console block must start with a `$ ` line: {l:?}");
        }
    }
    steps
}

/// Whether `actual` is `expected`, where an `...` line matches any lines.
fn matches(expected: &[String], actual: &[&str]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e == "..." => (0..=actual.len()).any(|k| matches(rest, &actual[k..])),
        Some((e, rest)) => actual
            .split_first()
            .is_some_and(|(a, more)| a == e && matches(rest, more)),
    }
}

#[test]
fn the_readme_shell_examples_run_against_the_binary() {
    let started = Instant::now();
    let bench = Bench::start();
    let mut ran = 0;
    for (n, b) in blocks(README).iter().enumerate() {
        if !is_shell(b) || b.not_run.is_some() {
            continue;
        }
        let dir = bench.root.path().join(format!("block-{n}"));
        std::fs::create_dir(&dir).unwrap();
        let body = bench.localise(&b.body);
        if b.lang == "sh" {
            let o = bench.shell(&dir, "-euc", &body);
            assert!(
                o.status.success(),
                "README.md:{}: exit {:?}\n{body}\nstdout:\n{}\nstderr:\n{}",
                b.line,
                o.status.code(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        } else {
            for (cmd, expected) in transcript(&body) {
                let o = bench.shell(&dir, "-c", &format!("{cmd} 2>&1"));
                let text = String::from_utf8_lossy(&o.stdout);
                let mut actual: Vec<&str> = text.lines().collect();
                while actual.last().is_some_and(|l| l.trim().is_empty()) {
                    actual.pop();
                }
                assert!(
                    matches(&expected, &actual),
                    "README.md:{}: `{cmd}` printed\n{}\nthe README shows\n{}",
                    b.line,
                    actual.join("\n"),
                    expected.join("\n")
                );
            }
        }
        ran += 1;
    }
    eprintln!(
        "{ran} README blocks ran in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(ran >= 5, "only {ran} README blocks ran");
}

#[test]
fn the_transcript_matcher_takes_dots_for_any_lines() {
    let e = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(matches(&e(&["a", "...", "d"]), &["a", "b", "c", "d"]));
    assert!(matches(&e(&["a", "..."]), &["a"]));
    assert!(!matches(&e(&["a", "d"]), &["a", "b", "d"]));
    assert!(!matches(&e(&["a"]), &["a", "b"]));
}
