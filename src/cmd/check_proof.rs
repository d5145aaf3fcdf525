//! `check-proof`: checks a `prove` bundle offline, with nothing but the bundle and
//! the gateway's verifier key: no log, no network.
//!
//! What is checked, in order (the first failure is reported):
//! 1. the checkpoint note is signed by the verifier key (C2SP signed-note);
//! 2. the bundle's `tree_size` is the checkpoint's size;
//! 3. `leaf_hash` is `SHA-256(0x00 || leaf)` (RFC 6962 section 2.1);
//! 4. the inclusion path leads from the leaf hash to the checkpoint's root;
//! 5. the record is exactly the leaf's: the leaf decoded and exported as `export
//!    --format jsonl` does is the bundle's `record`, field for field, and its seq
//!    is `leaf_index + 1`.

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
    if !merkle::check_inclusion(&path, tree_size, &cp.root, index, &leaf_hash) {
        return Ok(Err(format!(
            "the inclusion path does not lead from leaf {index} to the root of the checkpoint (size {tree_size})"
        )));
    }
    let values = match merkle::decode_leaf(&leaf) {
        Ok(v) => v,
        Err(e) => return Ok(Err(format!("the leaf is not a record's encoding: {e}"))),
    };
    if let Err(why) = record_matches(record, &values, index) {
        return Ok(Err(why));
    }
    Ok(Ok(Proven {
        seq: index + 1,
        tree_size,
        origin: cp.origin,
    }))
}

/// The record must be exactly what its leaf says: the leaf is decoded back into a
/// stored record, exported as `export --format jsonl` exports it, and the two JSON
/// objects compared whole, so no field (a reading, the MN, a time) can differ.
fn record_matches(record: &Value, leaf: &[LeafValue], index: u64) -> Result<(), String> {
    let rec = merkle::record_from_leaf(leaf)?;
    if rec.seq != index + 1 {
        return Err(format!(
            "the leaf is record {} but leaf_index {index} is record {}",
            rec.seq,
            index + 1
        ));
    }
    let from_leaf = Value::Object(crate::store::export_record_json(&rec));
    if &from_leaf == record {
        return Ok(());
    }
    let (Value::Object(want), Value::Object(got)) = (&from_leaf, record) else {
        return Err("`record` is not a JSON object".into());
    };
    let field = want
        .iter()
        .find(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .or_else(|| got.keys().find(|k| !want.contains_key(*k)).cloned())
        .unwrap_or_default();
    Err(format!("the record's `{field}` is not what the leaf holds"))
}

/// Check a `prove` bundle offline: no log, no network, only the verifier key.
///
/// Verifies the checkpoint's signature, that the leaf hashes to leaf_hash, that the
/// RFC 6962 inclusion path leads to the signed root, and that the record is
/// exactly what the leaf holds (every field, readings included).
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
