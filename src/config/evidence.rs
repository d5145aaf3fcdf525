//! `[evidence]`: signed checkpoints of the log's Merkle tree and the witnesses that
//! cosign them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur};

/// `[evidence]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EvidenceSection {
    /// Cut a signed checkpoint this often when the log has grown (1s ..= 1d), and
    /// once more at shutdown.
    pub checkpoint_interval: Dur,
    /// The signing key (`hj212-gateway keygen`), relative to the data directory.
    /// `serve` generates one there on first start if the file does not exist.
    pub key: PathBuf,
    /// The checkpoint's origin line; empty: the key's name. Witnesses know a log by
    /// its origin, so it must not change once published.
    pub origin: String,
    /// `[[evidence.witness]]`: C2SP tlog-witness endpoints each checkpoint is
    /// submitted to.
    pub witness: Vec<WitnessSection>,
}

impl Default for EvidenceSection {
    fn default() -> Self {
        EvidenceSection {
            checkpoint_interval: Dur(Duration::from_secs(60)),
            key: PathBuf::from("checkpoint.key"),
            origin: String::new(),
            witness: Vec::new(),
        }
    }
}

/// One `[[evidence.witness]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WitnessSection {
    /// Base URL; the checkpoint goes to `{url}/add-checkpoint`.
    pub url: String,
    /// The witness's verifier key (`name+id+key`): when set, its cosignatures are
    /// checked and a bad one is an error; unset, they are kept unchecked.
    #[serde(default)]
    pub vkey: Option<String>,
    /// How long one submission may take (1s ..= 5m).
    #[serde(default = "default_witness_timeout")]
    pub timeout: Dur,
}

fn default_witness_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

/// Most witnesses a gateway submits to: each costs a request per checkpoint.
pub const MAX_WITNESSES: usize = 16;

impl EvidenceSection {
    /// The key file resolved against the data directory.
    pub fn key_path(&self, data_dir: &Path) -> PathBuf {
        if self.key.is_absolute() {
            self.key.clone()
        } else {
            data_dir.join(&self.key)
        }
    }

    /// Checks ranges, URLs and names (`path` is for the message).
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let i = self.checkpoint_interval.0;
        if i < Duration::from_secs(1) || i > Duration::from_secs(86_400) {
            return Err(bad(
                "evidence.checkpoint_interval".into(),
                "must be between 1s and 1d".into(),
            ));
        }
        if self.key.as_os_str().is_empty() {
            return Err(bad("evidence.key".into(), "must not be empty".into()));
        }
        if !self.origin.is_empty() && !signed_note::is_key_name_valid(&self.origin) {
            return Err(bad(
                "evidence.origin".into(),
                format!(
                    "{:?}: must be non-empty UTF-8 without spaces or '+' (C2SP signed-note key name)",
                    self.origin
                ),
            ));
        }
        if self.witness.len() > MAX_WITNESSES {
            return Err(bad(
                "evidence.witness".into(),
                format!("at most {MAX_WITNESSES} witnesses"),
            ));
        }
        for (n, w) in self.witness.iter().enumerate() {
            let key = |k: &str| format!("evidence.witness[{n}].{k}");
            let host = w
                .url
                .strip_prefix("http://")
                .or_else(|| w.url.strip_prefix("https://"));
            if host.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
                return Err(bad(
                    key("url"),
                    format!(
                        "{:?}: expected http://HOST[:PORT][/PATH] or https://...",
                        w.url
                    ),
                ));
            }
            if let Some(v) = &w.vkey {
                if let Err(e) = signed_note::StandardVerifier::new(v) {
                    return Err(bad(key("vkey"), format!("{v:?}: not a verifier key: {e}")));
                }
            }
            let t = w.timeout.0;
            if t < Duration::from_secs(1) || t > Duration::from_secs(300) {
                return Err(bad(key("timeout"), "must be between 1s and 5m".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<crate::config::Config, ConfigError> {
        crate::config::Config::parse(text, Path::new("t.toml"))
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = parse("").unwrap();
        assert_eq!(c.evidence.checkpoint_interval.0, Duration::from_secs(60));
        assert_eq!(
            c.evidence.key_path(Path::new("/var/lib/x")),
            Path::new("/var/lib/x/checkpoint.key")
        );
        for (text, key) in [
            (
                "[evidence]\ncheckpoint_interval = \"0s\"",
                "evidence.checkpoint_interval",
            ),
            ("[evidence]\norigin = \"a b\"", "evidence.origin"),
            (
                "[[evidence.witness]]\nurl = \"ftp://x\"",
                "evidence.witness[0].url",
            ),
            (
                "[[evidence.witness]]\nurl = \"http://x\"\nvkey = \"nope\"",
                "evidence.witness[0].vkey",
            ),
            (
                "[[evidence.witness]]\nurl = \"http://x\"\ntimeout = \"1h\"",
                "evidence.witness[0].timeout",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
