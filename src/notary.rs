//! The notary: cuts signed checkpoints of the log's Merkle tree and hands them to
//! everyone who should hold one off this machine.
//!
//! Every `[evidence] checkpoint_interval`, when the tree has grown, it signs a C2SP
//! `tlog-checkpoint` note for the tree as committed, keeps it in the log's
//! `checkpoints` table (where `prove` and the MQTT publisher find it), appends it
//! to `checkpoints.log` in the data directory, serves it at `/checkpoint`, and
//! submits it to each `[[evidence.witness]]` with a consistency proof from the
//! size that witness last saw; their cosignatures are appended to
//! `checkpoints.log` as the cosigned note. One last cut is made at shutdown,
//! after the frame log has drained, so the final records are covered too.
//!
//! Only the tree as stored is signed, and only when it agrees with the chain head:
//! a tree that stopped growing (see `store::merkle::backfill`) is never signed
//! again, because signing it would vouch for a log that no longer matches.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::evidence::checkpoint::{self, Checkpoint};
use crate::evidence::key::{self, SigningKey};
use crate::evidence::witness::{WitnessClient, WitnessEntry};
use crate::metrics::Counter;
use crate::store::StoreError;
use crate::store::merkle::{LogTree, StoredCheckpoint};

/// The file in the data directory every checkpoint is appended to.
pub const LOG_FILE: &str = "checkpoints.log";

/// The latest checkpoint and the notary's counters, for `/checkpoint` and `/metrics`.
#[derive(Debug, Default)]
pub struct Latest {
    current: RwLock<Option<Arc<StoredCheckpoint>>>,
    /// Cuts that failed (signing, storing or appending to `checkpoints.log`).
    pub cut_failures: Counter,
    /// Per witness URL: cosignatures received and failed submissions.
    witnesses: Mutex<Vec<(String, u64, u64)>>,
}

impl Latest {
    /// The latest checkpoint cut (or found in the log at start).
    pub fn get(&self) -> Option<Arc<StoredCheckpoint>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, cp: StoredCheckpoint) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(cp));
    }

    /// `(witness url, cosignatures received, failed submissions)`.
    pub fn witnesses(&self) -> Vec<(String, u64, u64)> {
        self.witnesses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn count_witness(&self, url: &str, ok: bool) {
        let mut w = self
            .witnesses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = match w.iter().position(|(u, _, _)| u == url) {
            Some(i) => i,
            None => {
                w.push((url.to_owned(), 0, 0));
                w.len() - 1
            }
        };
        if ok {
            w[i].1 += 1;
        } else {
            w[i].2 += 1;
        }
    }
}

/// Why the notary could not start.
#[derive(Debug, thiserror::Error)]
pub enum NotaryError {
    /// The signing key could not be read or written.
    #[error(transparent)]
    Key(#[from] key::KeyError),
    /// The log could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `[evidence] origin` (or the key name) is not a valid checkpoint origin.
    #[error("[evidence] origin: {0}")]
    Origin(String),
}

/// Signs and keeps checkpoints of one log. Blocking: run it on a blocking thread.
pub struct Notary {
    key: SigningKey,
    origin: String,
    log: LogTree,
    file: PathBuf,
    last: u64,
    latest: Arc<Latest>,
}

impl std::fmt::Debug for Notary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notary")
            .field("origin", &self.origin)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Notary {
    /// Loads the signing key (generating it on first start, and saying so with its
    /// verifier key), and the latest checkpoint kept in the log at `db`.
    pub fn open(
        cfg: &Config,
        data: &Path,
        db: &Path,
        latest: Arc<Latest>,
    ) -> Result<Notary, NotaryError> {
        let path = cfg.evidence.key_path(data);
        let id = cfg
            .mqtt
            .client_id
            .clone()
            .or_else(key::host_name)
            .unwrap_or_else(|| "gateway".into());
        let (key, generated) = SigningKey::load_or_generate(&path, &key::default_name(&id))?;
        if generated {
            tracing::warn!(
                key = %path.display(),
                verifier_key = %key.verifier_key(),
                "generated the checkpoint signing key; give the verifier key to whoever checks this gateway's checkpoints, and back the key file up"
            );
        } else {
            tracing::info!(verifier_key = %key.verifier_key(), "checkpoint signing key loaded");
        }
        let origin = if cfg.evidence.origin.is_empty() {
            key.name().to_owned()
        } else {
            cfg.evidence.origin.clone()
        };
        checkpoint::body(&origin, 0, &[0; 32]).map_err(|e| NotaryError::Origin(e.to_string()))?;
        let log = LogTree::open_for_checkpoints(db)?;
        let kept = log.latest_checkpoint()?;
        let last = kept.as_ref().map_or(0, |c| c.size);
        if let Some(cp) = kept {
            latest.set(cp);
        }
        Ok(Notary {
            key,
            origin,
            log,
            file: data.join(LOG_FILE),
            last,
            latest,
        })
    }

    /// The verifier key of the signing key (`name+id+key`).
    pub fn verifier_key(&self) -> String {
        self.key.verifier_key()
    }

    /// Signs the tree as committed now if it grew since the last cut. `Ok(None)`:
    /// nothing new, or a tree that no longer matches the chain head (logged).
    pub fn cut(&mut self, now_ms: i64) -> Result<Option<Checkpoint>, String> {
        let tree = self.log.tree().map_err(|e| e.to_string())?;
        let size = tree.size();
        if size <= self.last {
            return Ok(None);
        }
        let head = self.log.head_seq().map_err(|e| e.to_string())?;
        if size != head {
            crate::log_repeated!(
                error,
                tree_size = size,
                head,
                "the Merkle tree and the chain head disagree: no checkpoint is signed; run `hj212-gateway verify`"
            );
            return Ok(None);
        }
        let root = tree.root(size).map_err(|e| e.to_string())?;
        let cp = checkpoint::sign(self.key.signer(), &self.origin, size, &root)
            .map_err(|e| e.to_string())?;
        let stored = StoredCheckpoint {
            size,
            root,
            note: cp.note.clone(),
            cut_at_ms: now_ms,
        };
        // The file first: the table is what the MQTT publisher and `prove` read,
        // so nothing is told before the note is on disk here.
        self.append(&cp.note)
            .map_err(|e| format!("append to {}: {e}", self.file.display()))?;
        self.log
            .record_checkpoint(&stored)
            .map_err(|e| e.to_string())?;
        self.last = size;
        self.latest.set(stored);
        tracing::debug!(size, "checkpoint signed");
        Ok(Some(cp))
    }

    /// Appends a note (and a blank line between notes) to `checkpoints.log`, on disk
    /// before anyone is told: a reader of the file sees every checkpoint published.
    fn append(&self, note: &str) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)?;
        f.write_all(format!("{note}\n").as_bytes())?;
        f.sync_data()
    }

    /// RFC 6962 consistency proof between two sizes of the stored tree.
    fn consistency(&self, old: u64, new: u64) -> Result<Vec<[u8; 32]>, StoreError> {
        self.log.tree()?.consistency(old, new)
    }
}

/// Splits a file of notes written by [`Notary`] (or one note on its own) into the
/// notes: each is text lines, a blank line, then signature lines (`— ...`); a blank
/// line or a line that is not a signature ends it.
pub fn split_notes(text: &str) -> Vec<String> {
    let mut notes = Vec::new();
    let mut cur = String::new();
    let mut in_sigs = false;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        if in_sigs {
            if bare.starts_with("\u{2014} ") {
                cur.push_str(line);
                continue;
            }
            notes.push(std::mem::take(&mut cur));
            in_sigs = false;
            if bare.is_empty() {
                continue;
            }
        }
        if bare.is_empty() && !cur.is_empty() {
            in_sigs = true;
        }
        if !(bare.is_empty() && cur.is_empty()) {
            cur.push_str(line);
        }
    }
    if in_sigs && !cur.is_empty() {
        notes.push(cur);
    }
    notes
}

/// Cuts every `interval` until `shutdown`, then returns the notary for the last
/// cut after the log has drained ([`final_cut`]).
pub async fn run(
    notary: Arc<Mutex<Notary>>,
    interval: Duration,
    witnesses: Vec<WitnessEntry>,
    shutdown: CancellationToken,
) {
    let client = WitnessClient::new();
    // What each witness last cosigned, as far as this process knows (0 at start:
    // a witness that knows more answers 409 with its size, and the client retries).
    let mut seen: Vec<u64> = vec![0; witnesses.len()];
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let n = Arc::clone(&notary);
        let cut = tokio::task::spawn_blocking(move || {
            let mut n = n.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let r = n.cut(chrono::Utc::now().timestamp_millis());
            (r, Arc::clone(&n.latest))
        })
        .await;
        let (cp, latest) = match cut {
            Ok((Ok(Some(cp)), latest)) => (cp, latest),
            Ok((Ok(None), _)) => continue,
            Ok((Err(e), latest)) => {
                latest.cut_failures.inc();
                crate::log_repeated!(error, error = %e, "checkpoint not cut; retrying at the next interval");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "checkpoint task failed");
                continue;
            }
        };
        for (w, old) in witnesses.iter().zip(seen.iter_mut()) {
            let submitted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                r = client.add_checkpoint(w, &cp, *old, |from| {
                    notary
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .consistency(from, cp.size)
                }) => r,
            };
            match submitted {
                Ok(cosigned) => {
                    *old = cp.size;
                    latest.count_witness(&w.url, true);
                    let mut note = cp.note.clone();
                    for l in &cosigned.lines {
                        note.push_str(l);
                        note.push('\n');
                    }
                    let n = Arc::clone(&notary);
                    let kept = tokio::task::spawn_blocking(move || {
                        n.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .append(&note)
                    })
                    .await;
                    if let Ok(Err(e)) = kept {
                        tracing::error!(error = %e, witness = %w.url, "cosigned checkpoint not kept in checkpoints.log");
                    }
                    tracing::debug!(witness = %w.url, size = cp.size, verified = cosigned.verified, "checkpoint cosigned");
                }
                Err(e) => {
                    latest.count_witness(&w.url, false);
                    crate::log_repeated!(warn, witness = %w.url, error = %e, "witness did not cosign the checkpoint; the next one is submitted at the next interval");
                }
            }
        }
    }
}

/// The cut at shutdown, once the writer has committed everything: blocking.
pub fn final_cut(notary: &Mutex<Notary>) {
    let mut n = notary
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match n.cut(chrono::Utc::now().timestamp_millis()) {
        Ok(Some(cp)) => tracing::info!(size = cp.size, "final checkpoint signed"),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "final checkpoint not cut"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_written_one_after_another_split_back() {
        let a = "o\n1\nAAAA\n\n\u{2014} o abc=\n";
        let b = "o\n2\nBBBB\n\n\u{2014} o def=\n\u{2014} w ghi=\n";
        let file = format!("{a}\n{b}\n");
        assert_eq!(split_notes(&file), vec![a.to_owned(), b.to_owned()]);
        assert_eq!(split_notes(a), vec![a.to_owned()]);
        assert!(split_notes("").is_empty());
    }
}
