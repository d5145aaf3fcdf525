//! `verify`: prove the log is the one that was written, and that every stored verdict
//! agrees with the stored bytes.
//!
//! Two independent checks run in parallel on their own read snapshots:
//! 1. the hash chain ([`store::verify_chain`]): altered, deleted, reordered records and
//!    a moved head;
//! 2. the CRC re-check: every inbound frame's raw bytes are decoded again with the
//!    device policy (from `--config`, else the defaults) and the CRC outcome is
//!    compared with the stored verdict. The chain proves the row was not changed after
//!    it was written; this check catches a row that was *written* wrong (a gateway bug
//!    or a forged chain) where a frame was accepted whose CRC does not hold, or rejected
//!    for its CRC alone although it holds.

use std::fmt;
use std::ops::ControlFlow;
use std::path::PathBuf;

use bytes::Bytes;

use super::{CmdError, require_db};
use crate::config::Config;
use crate::ingest::decode_options;
use crate::protocol::{self, DeviceLookup, Severity, finding::code};
use crate::registry::Registry;
use crate::store::{self, ChainReport, Verdict};

/// Options of `verify`.
#[derive(Debug, Clone)]
pub struct VerifyArgs {
    /// The SQLite file.
    pub db: PathBuf,
    /// Device registry, keys and CRC policy (defaults when `None`).
    pub config: Option<Config>,
    /// Signed checkpoints (note files, or `checkpoints.log`) to hold the log against.
    pub checkpoints: Vec<PathBuf>,
    /// Verifier keys the checkpoints must be signed with; empty: signatures are
    /// not checked (said in the report), consistency still is.
    pub vkeys: Vec<String>,
}

/// The largest checkpoint file read (a `checkpoints.log` of decades at one a minute).
const MAX_CHECKPOINT_FILE: u64 = 256 << 20;

/// A checkpoint given to `verify`, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenCheckpoint {
    /// The file.
    pub file: PathBuf,
    /// Its size and root.
    pub head: store::merkle::Head,
    /// Whether its signature was checked against a `--vkey`.
    pub signature_checked: bool,
}

/// Reads every note of every file; signatures are checked when keys are given.
pub fn read_checkpoints(
    files: &[PathBuf],
    vkeys: &[String],
) -> Result<Vec<GivenCheckpoint>, CmdError> {
    use std::io::Read as _;
    let keys: Vec<&str> = vkeys.iter().map(String::as_str).collect();
    let mut out: Vec<GivenCheckpoint> = Vec::new();
    for file in files {
        let mut text = String::new();
        std::fs::File::open(file)
            .and_then(|f| f.take(MAX_CHECKPOINT_FILE).read_to_string(&mut text))
            .map_err(CmdError::io(format!("read {}", file.display())))?;
        let notes = crate::notary::split_notes(&text);
        if notes.is_empty() {
            return Err(CmdError::Usage(format!(
                "{}: no checkpoint note in it",
                file.display()
            )));
        }
        for note in notes {
            let parsed = if keys.is_empty() {
                crate::evidence::checkpoint::parse_unverified(note.as_bytes())
            } else {
                crate::evidence::checkpoint::open(note.as_bytes(), &keys)
            }
            .map_err(|e| CmdError::Usage(format!("{}: {e}", file.display())))?;
            let head = store::merkle::Head {
                size: parsed.size,
                root: parsed.root,
            };
            if !out.iter().any(|g| g.head == head) {
                out.push(GivenCheckpoint {
                    file: file.clone(),
                    head,
                    signature_checked: !keys.is_empty(),
                });
            }
        }
    }
    Ok(out)
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The hash-chain walk.
    pub chain: ChainReport,
    /// Inbound frames whose CRC was re-judged.
    pub frames_checked: u64,
    /// Encrypted frames that could not be re-judged (no key, or no key decrypts them).
    pub not_judged: u64,
    /// Frames whose stored verdict disagrees with their CRC.
    pub inconsistent: u64,
    /// The first of them.
    pub first_inconsistent: Option<Inconsistency>,
    /// The Merkle tree recomputed from the records, against the stored tree and
    /// the checkpoints given.
    pub tree: store::merkle::TreeReport,
    /// The checkpoints given, in the order of `tree.heads`.
    pub checkpoints: Vec<GivenCheckpoint>,
}

impl VerifyReport {
    /// True when the chain is intact and every verdict agrees with its CRC.
    pub fn is_ok(&self) -> bool {
        self.chain.is_intact() && self.inconsistent == 0 && self.tree.is_ok()
    }
}

/// A stored verdict that its own bytes contradict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inconsistency {
    /// The record.
    pub seq: u64,
    /// The stored verdict.
    pub verdict: Verdict,
    /// What the re-check found.
    pub detail: String,
}

impl fmt::Display for Inconsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seq {}: stored verdict {} but {}",
            self.seq,
            self.verdict.as_str(),
            self.detail
        )
    }
}

const CRC_CODES: [&str; 2] = [code::CRC_MISMATCH, code::CRC_MISSING];

/// Runs both checks.
pub fn run(args: &VerifyArgs) -> Result<VerifyReport, CmdError> {
    require_db(&args.db)?;
    let checkpoints = read_checkpoints(&args.checkpoints, &args.vkeys)?;
    let heads: Vec<_> = checkpoints.iter().map(|c| c.head).collect();
    let db = args.db.clone();
    let tree = std::thread::Builder::new()
        .name("verify-tree".into())
        .spawn(move || store::merkle::check_log_or_report(&db, &heads))
        .map_err(CmdError::io("start the tree walk"))?;
    let db = args.db.clone();
    let chain = std::thread::Builder::new()
        .name("verify-chain".into())
        .spawn(move || store::verify_chain(&db))
        .map_err(CmdError::io("start the chain walk"))?;

    let cfg = args.config.clone().unwrap_or_default();
    let registry = Registry::from_config(&cfg)?;
    let (mut frames_checked, mut not_judged, mut inconsistent) = (0u64, 0u64, 0u64);
    let mut first = None;
    let mut opts = decode_options(&cfg, chrono::DateTime::UNIX_EPOCH);
    let scan = store::scan_inbound_frames(&args.db, |rec| {
        // Only the CRC outcome is compared; timestamp findings depend on `now`,
        // which is set to the reception time anyway so the decoder sees what the
        // session saw.
        opts.now = chrono::DateTime::from_timestamp_millis(rec.received_at_ms)
            .unwrap_or(chrono::DateTime::UNIX_EPOCH);
        let frame = protocol::decode(
            Bytes::copy_from_slice(rec.raw),
            &opts,
            &registry as &dyn DeviceLookup,
        );
        let has = |c: &str| {
            frame
                .findings
                .iter()
                .any(|f| f.code == c && f.severity == Severity::Error)
        };
        if has(code::DECRYPT_NOKEY) || has(code::DECRYPT_FAILED) {
            not_judged += 1;
            return ControlFlow::Continue(());
        }
        frames_checked += 1;
        let crc_error = frame
            .findings
            .iter()
            .find(|f| f.severity == Severity::Error && CRC_CODES.contains(&f.code));
        let detail = match (rec.verdict, crc_error) {
            (Verdict::Accepted, Some(f)) => Some(format!(
                "its CRC does not hold under the device's policy ({}: {})",
                f.code, f.detail
            )),
            (Verdict::Rejected, None) if rejected_only_for_crc(rec.findings) => Some(format!(
                "it was rejected only for its CRC, which holds ({} under the device's policy)",
                frame.crc.variant.as_str()
            )),
            _ => None,
        };
        if let Some(detail) = detail {
            inconsistent += 1;
            if first.is_none() {
                first = Some(Inconsistency {
                    seq: rec.seq,
                    verdict: rec.verdict,
                    detail,
                });
            }
        }
        ControlFlow::Continue(())
    });
    let chain = chain
        .join()
        .map_err(|_| CmdError::Usage("the chain walk panicked".into()))??;
    scan?;
    let tree = tree
        .join()
        .map_err(|_| CmdError::Usage("the tree walk panicked".into()))?;
    Ok(VerifyReport {
        chain,
        frames_checked,
        not_judged,
        inconsistent,
        first_inconsistent: first,
        tree,
        checkpoints,
    })
}

/// True when the stored findings hold error findings and all of them are CRC ones.
/// Unparsable findings text (an altered file) is not "only CRC".
fn rejected_only_for_crc(findings: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct F<'a> {
        code: &'a str,
        severity: &'a str,
    }
    let Ok(list) = serde_json::from_str::<Vec<F<'_>>>(findings) else {
        return false;
    };
    let errors: Vec<_> = list.iter().filter(|f| f.severity == "error").collect();
    !errors.is_empty() && errors.iter().all(|f| CRC_CODES.contains(&f.code))
}

/// Prints the report the way the CLI shows it.
pub fn print(
    path: &std::path::Path,
    r: &VerifyReport,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let p = path.display();
    match &r.chain.first_break {
        None => writeln!(
            out,
            "{p}: {} records checked, chain intact",
            r.chain.records_checked
        )?,
        Some(b) => writeln!(
            out,
            "{p}: {} records checked; chain broken at {b}",
            r.chain.records_checked
        )?,
    }
    for g in &r.chain.deliberate_gaps {
        writeln!(out, "{p}: deliberate gap (not a break): {g}")?;
    }
    let skipped = if r.not_judged > 0 {
        format!(
            "; {} encrypted frame(s) not judged (no configured key decrypts them)",
            r.not_judged
        )
    } else {
        String::new()
    };
    match &r.first_inconsistent {
        None => writeln!(
            out,
            "{p}: {} inbound frames re-checked, every CRC agrees with its verdict{skipped}",
            r.frames_checked
        )?,
        Some(i) => writeln!(
            out,
            "{p}: {} inbound frames re-checked, {} inconsistent; first at {i}{skipped}",
            r.frames_checked, r.inconsistent
        )?,
    }
    match &r.tree.stored_tree_differs {
        None => writeln!(
            out,
            "{p}: Merkle tree recomputed from {} records, matches the stored tree",
            r.tree.records
        )?,
        Some(why) => writeln!(out, "{p}: Merkle tree: {why}")?,
    }
    for (given, (head, diff)) in r.checkpoints.iter().zip(&r.tree.heads) {
        let signed = if given.signature_checked {
            "signature valid"
        } else {
            "signature not checked (give --vkey)"
        };
        match diff {
            None => writeln!(
                out,
                "{}: checkpoint of size {} ({signed}): the log is consistent with it",
                given.file.display(),
                head.size
            )?,
            Some(d) => writeln!(
                out,
                "{}: checkpoint of size {} ({signed}): the log is NOT consistent with it: {d}",
                given.file.display(),
                head.size
            )?,
        }
    }
    writeln!(
        out,
        "{}",
        if r.is_ok() {
            "intact"
        } else {
            "TAMPERED OR INCONSISTENT"
        }
    )
}

/// Prove the log is intact: walk the hash chain, recompute the Merkle tree from the
/// records, re-check every inbound frame's CRC against its stored verdict, and hold
/// the log against signed checkpoints published before (--checkpoint).
///
/// Prints the records checked and, on failure, the first broken seq and why. Works
/// while serve is running (records committed after it starts are not checked).
///
/// Examples:
///   hj212-gateway verify --data /var/lib/hj212-gateway
///   hj212-gateway verify --db frames.db --config /etc/hj212-gateway/gateway.toml
///   hj212-gateway verify --data /var/lib/hj212-gateway --checkpoint saved/checkpoints.log --vkey "$VKEY"
///
/// Exit 0 intact, 1 tampered or inconsistent, 2 unreadable, 78 bad --config.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct VerifyFlags {
    #[command(flatten)]
    log: super::LogFlags,
    /// Gateway config: device registry, keys and CRC policies for the re-check.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Signed checkpoints to hold the log against: note files (from MQTT,
    /// /checkpoint or a witness) or a copy of checkpoints.log. A cut tail or a
    /// re-chained record after publication is reported with the first seq that
    /// differs. Repeatable.
    #[arg(long, num_args = 1..)]
    checkpoint: Vec<PathBuf>,
    /// The gateway's verifier key: the checkpoints' signatures must hold under it.
    #[arg(long)]
    vkey: Vec<String>,
}

/// Runs `verify` from the command line: the report on stdout, the exit code back.
pub fn main(flags: VerifyFlags) -> std::process::ExitCode {
    use std::process::ExitCode;
    let result = super::load_config(flags.config.as_deref()).and_then(|cfg| {
        let args = VerifyArgs {
            db: flags.log.db(cfg.as_ref()),
            config: cfg,
            checkpoints: flags.checkpoint,
            vkeys: flags.vkey,
        };
        run(&args).map(|r| (args.db, r))
    });
    match result {
        Ok((path, r)) => {
            let _ = print(&path, &r, &mut std::io::stdout().lock());
            if r.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(crate::exit::NO)
            }
        }
        Err(e) => super::fail(&e),
    }
}
