//! `[metrics]`: where `/metrics` and `/healthz` are served.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur};

/// `[metrics]`: where `/metrics` and `/healthz` are served.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve metrics at all. `false`, or an empty `listen`, binds nothing.
    pub enabled: bool,
    /// `HOST:PORT` of the metrics HTTP listener.
    pub listen: String,
    /// Metrics connections served at once (1..=1024). When all are taken, the
    /// oldest one still waiting for its request head is closed to make room, so
    /// idle or slow clients cannot keep `/healthz` from answering.
    pub max_connections: usize,
    /// A client must send its request head within this (100 ms ..= 60 s).
    pub head_timeout: Dur,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
            max_connections: 64,
            head_timeout: Dur(Duration::from_secs(5)),
        }
    }
}

impl MetricsConfig {
    /// The address to bind, `None` when metrics are switched off.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        if !self.enabled || self.listen.is_empty() {
            return None;
        }
        self.listen.parse().ok()
    }

    /// Checks `metrics.listen` (`path` is for the message).
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.into(),
            message: message.into(),
        };
        if !(1..=1024).contains(&self.max_connections) {
            return Err(bad("metrics.max_connections", "must be between 1 and 1024"));
        }
        let t = self.head_timeout.0;
        if t < Duration::from_millis(100) || t > Duration::from_secs(60) {
            return Err(bad("metrics.head_timeout", "must be between 100ms and 60s"));
        }
        if !self.enabled || self.listen.is_empty() {
            return Ok(());
        }
        self.listen
            .parse::<std::net::SocketAddr>()
            .map(drop)
            .map_err(|e| ConfigError::Invalid {
                path: path.to_owned(),
                key: "metrics.listen".into(),
                message: format!(
                    "{:?}: {e} (expected HOST:PORT, e.g. \"127.0.0.1:9464\"; \"\" switches metrics off)",
                    self.listen
                ),
            })
    }
}
