//! `keygen`: writes the checkpoint signing key and prints its verifier key.
//!
//! The verifier key is the one line an auditor needs to check every checkpoint
//! the gateway signs, so it is the only thing on stdout
//! (`hj212-gateway keygen > gateway.vkey`); the hint goes to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use super::CmdError;
use crate::daemon;
use crate::evidence::key::{self, KeyError, SigningKey};

/// Create the checkpoint signing key (mode 0600) and print its verifier key.
///
/// Only the verifier key goes to stdout, one line: give it to whoever checks the
/// gateway's checkpoints. `serve` generates a key on first start when there is
/// none; run keygen first to choose the name or to publish the verifier key
/// before the first checkpoint.
///
/// Refuses to overwrite an existing key: checkpoints published so far would not
/// verify against a new verifier key.
///
/// Example: hj212-gateway keygen --data /var/lib/hj212-gateway > gateway.vkey
///
/// Exit 0 on success, 2 when the key file exists or cannot be written.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct KeygenFlags {
    /// Key name, also the checkpoint origin (default: hj212-gateway/HOSTNAME).
    #[arg(long)]
    name: Option<String>,
    /// Key file (default: checkpoint.key in the data directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Data directory (default: $STATE_DIRECTORY, else ./data).
    #[arg(long)]
    data: Option<PathBuf>,
}

/// Options of `keygen`.
#[derive(Debug, Clone)]
pub struct KeygenArgs {
    /// The key name.
    pub name: String,
    /// Where to write the key.
    pub out: PathBuf,
}

impl KeygenFlags {
    /// The plain arguments: `--out`, else `<data dir>/checkpoint.key`;
    /// `--name`, else [`key::default_name`] of the host name.
    pub fn args(&self) -> KeygenArgs {
        KeygenArgs {
            name: self
                .name
                .clone()
                .unwrap_or_else(|| key::default_name(&key::host_name().unwrap_or_default())),
            out: self
                .out
                .clone()
                .unwrap_or_else(|| key::default_path(&daemon::data_dir(self.data.as_deref()))),
        }
    }
}

/// Writes a new key at `args.out`; returns it.
pub fn run(args: &KeygenArgs) -> Result<SigningKey, CmdError> {
    SigningKey::write_new(&args.out, &args.name).map_err(|e| match e {
        KeyError::Io { path, op, source } => CmdError::Io {
            context: format!("{}: {op}", path.display()),
            source,
        },
        other => CmdError::Usage(other.to_string()),
    })
}

/// Runs `keygen` from the command line: the verifier key on stdout, a hint on
/// stderr, the exit code back (2 when the key exists or cannot be written).
pub fn main(flags: KeygenFlags) -> ExitCode {
    let args = flags.args();
    match run(&args) {
        Ok(k) => {
            println!("{}", k.verifier_key());
            eprintln!(
                "wrote the signing key {} (mode 0600; keep it secret, back it up); \
                 the line above is its verifier key: give it to whoever checks the checkpoints",
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(&e),
    }
}
