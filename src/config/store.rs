//! `[store]`: the SQLite frame log and its writer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur, check_bounds};

/// Durability mode of the frame log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sync {
    /// fsync on every commit (no acked frame is lost on power failure).
    Full,
    /// fsync at WAL checkpoints only (an OS crash may lose the last commits).
    Normal,
    /// Never fsync (tests and benchmarks only).
    Off,
}

/// `[store]`: the SQLite frame log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Database file; relative paths are under the data directory.
    pub path: PathBuf,
    /// `full` (default), `normal` or `off`.
    pub sync: Sync,
    /// Most records committed in one transaction.
    pub batch_max: usize,
    /// Longest a record waits for companions before its batch commits.
    pub batch_delay: Dur,
    /// Bounded queue of records awaiting the writer; when full, sessions stop reading.
    pub queue: usize,
    /// Committed records kept in memory for the consumers (MQTT, upstreams, alarms);
    /// 0 makes every consumer read SQLite.
    pub feed_records: usize,
    /// Nice steps the writer thread runs above the rest of the gateway (0..=20).
    pub writer_boost: u8,
    /// Records (and entries of each index on them) the start-up check reads from
    /// the end of an existing log (1..=1,000,000).
    pub check_tail: usize,
    /// Crash-loop guard of the log's consumers (MQTT, upstreams, alarms): after this
    /// many consecutive starts at the same cursor without a clean stop, a consumer
    /// marks each record before working on it, so one more crash names the record,
    /// which the next start sets aside (dead letter, reason `crash`). 1..=100.
    pub crash_loop_starts: u32,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            path: PathBuf::from("frames.db"),
            sync: Sync::Full,
            batch_max: 512,
            batch_delay: Dur(Duration::from_millis(2)),
            queue: 8192,
            feed_records: 8192,
            writer_boost: 5,
            check_tail: crate::store::DEFAULT_CHECK_TAIL,
            crash_loop_starts: 2,
        }
    }
}

impl StoreSection {
    /// Range checks, naming the key.
    pub(super) fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        for (k, v) in [
            ("store.batch_max", self.batch_max),
            ("store.queue", self.queue),
        ] {
            if v == 0 {
                return Err(bad(k, "must be greater than 0".into()));
            }
        }
        if self.writer_boost > 20 {
            return Err(bad(
                "store.writer_boost",
                "must be between 0 and 20 (nice steps)".into(),
            ));
        }
        if !(1..=1_000_000).contains(&self.check_tail) {
            return Err(bad(
                "store.check_tail",
                "must be between 1 and 1000000 (records)".into(),
            ));
        }
        if !(1..=100).contains(&self.crash_loop_starts) {
            return Err(bad(
                "store.crash_loop_starts",
                "must be between 1 and 100".into(),
            ));
        }
        // Every ack waits for its batch's commit.
        check_bounds(
            path,
            &[(
                "store.batch_delay",
                self.batch_delay.0,
                Duration::ZERO,
                Duration::from_secs(1),
            )],
        )
    }
}
