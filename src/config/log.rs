//! `[log]`: the gateway's own log lines.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur};

/// Default of `[log] repeat_interval`.
pub const DEFAULT_REPEAT_INTERVAL: Duration = Duration::from_secs(10);

/// `[log]`: the gateway's own log lines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A warning or error that repeats (per frame, per connection, per retry) is
    /// logged once, then at most once per this interval with the count of the
    /// lines suppressed meanwhile (1 s ..= 1 h).
    pub repeat_interval: Dur,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            repeat_interval: Dur(DEFAULT_REPEAT_INTERVAL),
        }
    }
}

impl LogSection {
    /// Range checks, naming the key.
    pub(super) fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let repeat = self.repeat_interval.0;
        if repeat < Duration::from_secs(1) || repeat > Duration::from_secs(3600) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: "log.repeat_interval".into(),
                message: "must be between 1s and 1h".into(),
            });
        }
        Ok(())
    }
}
