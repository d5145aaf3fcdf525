//! `check-proof`: checks a `prove` bundle offline, with nothing but the bundle and
//! the gateway's verifier key: no log, no network.
//!
//! What is checked, in order (the first failure is reported):
//! 1. the checkpoint note is signed by the verifier key (C2SP signed-note);
//! 2. the bundle's `tree_size` is the checkpoint's size;
//! 3. `leaf_hash` is `SHA-256(0x00 || leaf)` (RFC 6962 section 2.1);
//! 4. the leaf's values are the record's: `seq` (and `leaf_index = seq - 1`),
//!    `peer`, `session`, `direction`, `verdict` and the raw bytes (`raw_b64`);
//! 5. the inclusion path leads from the leaf hash to the checkpoint's root.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::CmdError;
use crate::evidence::checkpoint;
use crate::store::merkle::{self, LeafValue};

/// The largest bundle read: a proof is a record (at most 16 MiB of raw bytes,
/// base64 and doc around it) and 63 hashes.
const MAX_BUNDLE: u64 = 64 << 20;

/// What a valid bundle proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proven {
    /// The record's seq.
    pub seq: u64,
    /// The checkpoint's tree size.
    pub tree_size: u64,
    /// The checkpoint's origin.
    pub origin: String,
}

/// Checks `bundle` against the verifier keys; `Ok(Err(why))` when it does not hold.
pub fn check(bundle: &[u8], vkeys: &[&str]) -> Result<Result<Proven, String>, CmdError> {
    let v: Value = serde_json::from_slice(bundle)
        .map_err(|e| CmdError::Usage(format!("the bundle is not JSON: {e}")))?;
    let field = |k: &str| {
        v.get(k)
            .ok_or_else(|| CmdError::Usage(format!("the bundle has no `{k}`")))
    };
    let schema = field("schema")?.as_str().unwrap_or_default();
    if schema != super::prove::SCHEMA {
        return Err(CmdError::Usage(format!(
            "schema {schema:?}: expected {:?}",
            super::prove::SCHEMA
        )));
    }
    let num = |k: &str| {
        field(k)?
            .as_u64()
            .ok_or_else(|| CmdError::Usage(format!("`{k}` is not an unsigned integer")))
    };
    let b64 = |k: &str, s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| CmdError::Usage(format!("`{k}` is not base64: {e}")))
    };
    let hash = |k: &str, s: &str| -> Result<[u8; 32], CmdError> {
        b64(k, s)?
            .try_into()
            .map_err(|_| CmdError::Usage(format!("`{k}` is not a 32-byte hash")))
    };
    let note = field("checkpoint")?
        .as_str()
        .ok_or_else(|| CmdError::Usage("`checkpoint` is not text".into()))?;
    let (tree_size, index) = (num("tree_size")?, num("leaf_index")?);
    let leaf = b64("leaf", field("leaf")?.as_str().unwrap_or_default())?;
    let leaf_hash = hash(
        "leaf_hash",
        field("leaf_hash")?.as_str().unwrap_or_default(),
    )?;
    let path = field("inclusion")?
        .as_array()
        .ok_or_else(|| CmdError::Usage("`inclusion` is not a list".into()))?
        .iter()
        .map(|h| hash("inclusion", h.as_str().unwrap_or_default()))
        .collect::<Result<Vec<_>, _>>()?;
    let record = field("record")?;

    let cp = match checkpoint::open(note.as_bytes(), vkeys) {
        Ok(cp) => cp,
        Err(e) => {
            return Ok(Err(format!(
                "the checkpoint's signature does not hold: {e}"
            )));
        }
    };
    if cp.size != tree_size {
        return Ok(Err(format!(
            "tree_size {tree_size} is not the checkpoint's size {}",
            cp.size
        )));
    }
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(&leaf);
    if <[u8; 32]>::from(h.finalize()) != leaf_hash {
        return Ok(Err("leaf_hash is not SHA-256(0x00 || leaf)".into()));
    }
    let values = match merkle::decode_leaf(&leaf) {
        Ok(v) => v,
        Err(e) => return Ok(Err(format!("the leaf is not a record's encoding: {e}"))),
    };
    if let Err(why) = record_matches(record, &values, index) {
        return Ok(Err(why));
    }
    if !merkle::check_inclusion(&path, tree_size, &cp.root, index, &leaf_hash) {
        return Ok(Err(format!(
            "the inclusion path does not lead from leaf {index} to the root of the checkpoint (size {tree_size})"
        )));
    }
    Ok(Ok(Proven {
        seq: index + 1,
        tree_size,
        origin: cp.origin,
    }))
}

/// The record's fields a reader relies on must be the leaf's.
fn record_matches(record: &Value, leaf: &[LeafValue], index: u64) -> Result<(), String> {
    let text = |i: usize| match &leaf[i] {
        LeafValue::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    };
    let int = |i: usize| match leaf[i] {
        LeafValue::Integer(n) => Some(n),
        _ => None,
    };
    let seq = record.get("seq").and_then(Value::as_u64);
    if int(0).map(|s| s as u64) != seq || seq != Some(index + 1) {
        return Err(format!(
            "record seq {seq:?}, leaf seq {:?} and leaf_index {index} do not agree",
            int(0)
        ));
    }
    let raw = record
        .get("raw_b64")
        .and_then(Value::as_str)
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok());
    if raw.as_deref()
        != match &leaf[6] {
            LeafValue::Bytes(b) => Some(b.as_slice()),
            _ => None,
        }
    {
        return Err("the record's raw bytes (raw_b64) are not the leaf's".into());
    }
    for (name, i) in [("peer", 2), ("direction", 4), ("verdict", 13)] {
        if record.get(name).and_then(Value::as_str) != text(i).as_deref() {
            return Err(format!("the record's {name} is not the leaf's"));
        }
    }
    if record.get("session").and_then(Value::as_u64) != int(3).map(|s| s as u64) {
        return Err("the record's session is not the leaf's".into());
    }
    Ok(())
}

/// Check a `prove` bundle offline: no log, no network, only the verifier key.
///
/// Verifies the checkpoint's signature, that the leaf is the record (seq, peer,
/// session, direction, verdict, raw bytes) and hashes to leaf_hash, and that the
/// RFC 6962 inclusion path leads to the signed root.
///
/// Examples:
///   hj212-gateway check-proof proof-1234.json --vkey 'hj212-gateway/gw1+1a2b3c4d+AR...'
///   hj212-gateway prove --seq 7 | hj212-gateway check-proof - --vkey "$(cat gateway.vkey)"
///
/// Exit 0 the proof holds, 1 it does not (the reason is printed), 2 unreadable
/// bundle or key.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct CheckProofFlags {
    /// The bundle `prove` printed (`-` for stdin).
    bundle: PathBuf,
    /// The gateway's verifier key (`name+id+key`, as `keygen` printed it); repeat
    /// for several.
    #[arg(long, required = true)]
    vkey: Vec<String>,
}

/// Runs `check-proof` from the command line.
pub fn main(flags: CheckProofFlags) -> ExitCode {
    let read = || -> Result<Vec<u8>, CmdError> {
        let mut buf = Vec::new();
        let what = format!("read {}", flags.bundle.display());
        if flags.bundle.as_os_str() == "-" {
            std::io::stdin()
                .take(MAX_BUNDLE)
                .read_to_end(&mut buf)
                .map_err(CmdError::io(what))?;
        } else {
            std::fs::File::open(&flags.bundle)
                .and_then(|f| f.take(MAX_BUNDLE).read_to_end(&mut buf))
                .map_err(CmdError::io(what))?;
        }
        Ok(buf)
    };
    for k in &flags.vkey {
        if let Err(e) = signed_note::StandardVerifier::new(k) {
            return super::fail(&CmdError::Usage(format!("--vkey {k:?}: {e}")));
        }
    }
    let vkeys: Vec<&str> = flags.vkey.iter().map(String::as_str).collect();
    match read().and_then(|b| check(&b, &vkeys)) {
        Ok(Ok(p)) => {
            println!(
                "proof holds: record {} is in the log {} signed at size {}",
                p.seq, p.origin, p.tree_size
            );
            ExitCode::SUCCESS
        }
        Ok(Err(why)) => {
            println!("proof does NOT hold: {why}");
            ExitCode::from(crate::exit::NO)
        }
        Err(e) => super::fail(&e),
    }
}
