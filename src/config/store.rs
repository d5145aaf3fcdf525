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
    /// Length of the periods sealed into read-only archives (default `30d`);
    /// periods are aligned to the Unix epoch (see `store::archive`).
    pub seal_every: Dur,
    /// Archives whose period ended longer ago than this are deleted, leaving a
    /// signed tombstone; unset (default) keeps archives forever. At least
    /// `seal_every`.
    pub retain: Option<Dur>,
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
            seal_every: Dur(Duration::from_secs(30 * 86_400)),
            retain: None,
        }
    }
}

impl StoreSection {
    /// The archive policy these keys describe.
    pub fn archive_policy(&self) -> crate::store::archive::ArchivePolicy {
        crate::store::archive::ArchivePolicy {
            seal_every: self.seal_every.0,
            retain: self.retain.map(|d| d.0),
        }
    }

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
        if self.seal_every.0 < Duration::from_secs(60) {
            return Err(bad(
                "store.seal_every",
                "must be at least 1m (periods are sealed whole)".into(),
            ));
        }
        if let Some(retain) = self.retain {
            if retain.0 < self.seal_every.0 {
                return Err(bad(
                    "store.retain",
                    format!(
                        "must be at least store.seal_every ({}s): an archive cannot be deleted before its period is sealed",
                        self.seal_every.0.as_secs()
                    ),
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> Result<StoreSection, ConfigError> {
        let s: StoreSection = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: "t.toml".into(),
            key: "store".into(),
            message: e.to_string(),
        })?;
        s.check(Path::new("t.toml"))?;
        Ok(s)
    }

    #[test]
    fn seal_every_takes_days_and_retain_defaults_to_forever() {
        let s = section("").unwrap();
        assert_eq!(s.seal_every.0, Duration::from_secs(30 * 86_400));
        assert_eq!(s.retain, None);
        let s = section("seal_every = \"7d\"\nretain = \"365d\"").unwrap();
        assert_eq!(s.seal_every.0, Duration::from_secs(7 * 86_400));
        assert_eq!(s.retain.unwrap().0, Duration::from_secs(365 * 86_400));
        let p = s.archive_policy();
        assert_eq!(p.seal_every, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn retain_shorter_than_seal_every_is_refused_naming_the_key() {
        let e = section("seal_every = \"30d\"\nretain = \"7d\"").unwrap_err();
        match e {
            ConfigError::Invalid { key, message, .. } => {
                assert_eq!(key, "store.retain");
                assert!(message.contains("seal_every"), "{message}");
            }
            e => panic!("{e:?}"),
        }
        let e = section("seal_every = \"1s\"").unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { ref key, .. } if key == "store.seal_every"),
            "{e:?}"
        );
    }
}
