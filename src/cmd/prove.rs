//! `prove`: a self-contained proof that one record is in the log a signed
//! checkpoint fixed, for a third party who trusts neither this machine nor this
//! binary.
//!
//! The bundle (`hj212.proof.v1`) carries the record as `export --format jsonl`
//! writes it, its Merkle leaf (the canonical encoding the hash chain also covers,
//! from which the record's stored values can be read back), the leaf's index and
//! hash, the RFC 6962 audit path to the root of a tree of `tree_size` leaves, and
//! the signed checkpoint of that size. `check-proof`, or the short Python verifier
//! in the README, checks it offline with the gateway's verifier key.

use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine as _;
use serde_json::{Value, json};

use super::{CmdError, require_db};
use crate::store::merkle::{self, LogTree};
use crate::store::{Reader, export_record_json};

/// The bundle's `schema`.
pub const SCHEMA: &str = "hj212.proof.v1";

/// Options of `prove`.
#[derive(Debug, Clone)]
pub struct ProveArgs {
    /// The SQLite file.
    pub db: PathBuf,
    /// The record.
    pub seq: u64,
    /// Prove against the checkpoint of exactly this size (default: the latest).
    pub size: Option<u64>,
}

/// Builds the bundle.
pub fn run(args: &ProveArgs) -> Result<Value, CmdError> {
    require_db(&args.db)?;
    if args.seq == 0 {
        return Err(CmdError::Usage("--seq: records are numbered from 1".into()));
    }
    let log = LogTree::open(&args.db)?;
    let checkpoint = match args.size {
        Some(size) => log.checkpoint_of_size(size)?.ok_or_else(|| {
            CmdError::Usage(format!(
                "--size {size}: the log kept no checkpoint of that size; leave --size out to use the latest"
            ))
        })?,
        None => log.latest_checkpoint()?.ok_or_else(|| {
            CmdError::Usage(
                "no signed checkpoint yet: `serve` cuts one every [evidence] checkpoint_interval while the log grows"
                    .into(),
            )
        })?,
    };
    if args.seq > checkpoint.size {
        return Err(CmdError::Usage(format!(
            "record {} is newer than the checkpoint (size {}): wait for the next checkpoint, or give a larger --size",
            args.seq, checkpoint.size
        )));
    }
    let rec = Reader::open(&args.db)?
        .get(args.seq)?
        .ok_or_else(|| CmdError::Usage(format!("--seq {}: no such record in the log", args.seq)))?;
    let tree = log.tree()?;
    let index = args.seq - 1;
    let leaf_hash = merkle::leaf_hash_of(&rec);
    if tree.leaf_hash(index)? != leaf_hash {
        return Err(CmdError::Usage(format!(
            "record {} does not match the tree stored with it: the log was altered; run `hj212-gateway verify`",
            args.seq
        )));
    }
    let path = tree.inclusion(index, checkpoint.size)?;
    if tree.root(checkpoint.size)? != checkpoint.root {
        return Err(CmdError::Usage(format!(
            "the stored tree no longer has the root checkpoint {} signed: the log was altered; run `hj212-gateway verify --checkpoint`",
            checkpoint.size
        )));
    }
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    Ok(json!({
        "schema": SCHEMA,
        "record": Value::Object(export_record_json(&rec)),
        "leaf": b64(&merkle::leaf_of(&rec)),
        "leaf_index": index,
        "tree_size": checkpoint.size,
        "leaf_hash": b64(&leaf_hash),
        "inclusion": path.iter().map(|h| b64(h)).collect::<Vec<_>>(),
        "checkpoint": checkpoint.note,
    }))
}

/// Print a proof that a record is in the log a signed checkpoint fixed.
///
/// Writes one JSON bundle (schema hj212.proof.v1) to stdout: the record as
/// `export --format jsonl` writes it, its Merkle leaf, leaf_index, tree_size,
/// leaf_hash, the RFC 6962 inclusion path (base64) and the signed checkpoint
/// whose size is tree_size. Anyone can check it offline with
/// `hj212-gateway check-proof BUNDLE --vkey KEY` or the README's Python verifier.
///
/// Examples:
///   hj212-gateway prove --seq 1234 --data /var/lib/hj212-gateway > proof-1234.json
///   hj212-gateway prove --seq 1234 --size 5000 --db frames.db
///
/// Exit 0 printed, 2 no such record, no checkpoint covering it yet, or an
/// unreadable or altered log.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ProveFlags {
    #[command(flatten)]
    log: super::LogFlags,
    /// Gateway config (for the store path inside --data).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The record to prove.
    #[arg(long)]
    seq: u64,
    /// Prove against the kept checkpoint of exactly this tree size (default: the latest).
    #[arg(long)]
    size: Option<u64>,
}

/// Runs `prove` from the command line.
pub fn main(flags: ProveFlags) -> ExitCode {
    let result = super::load_config(flags.config.as_deref()).and_then(|cfg| {
        run(&ProveArgs {
            db: flags.log.db(cfg.as_ref()),
            seq: flags.seq,
            size: flags.size,
        })
    });
    match result {
        Ok(bundle) => {
            let mut text = serde_json::to_string_pretty(&bundle).unwrap_or_default();
            text.push('\n');
            match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if super::is_broken_pipe(&e) => ExitCode::SUCCESS,
                Err(e) => super::fail(&CmdError::Io {
                    context: "write the proof".into(),
                    source: e,
                }),
            }
        }
        Err(e) => super::fail(&e),
    }
}
