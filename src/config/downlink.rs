//! `[downlink]`: timing and policy of requests the gateway sends to devices.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur, MAX_TRACKED, check_bounds};

/// `[downlink]` (see README "Downlink").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownlinkSection {
    /// How long to wait for a device's 9011 before sending the request again
    /// (the standard's OverTime; 10 s for cellular links).
    pub over_time: Dur,
    /// How many times a request is sent again without a 9011 before it times out
    /// (the standard's ReCount).
    pub re_count: u32,
    /// After a 9011 QnRtn=1 (or any data of the exchange), how long to wait for
    /// the next upload or the 9012.
    pub exec_timeout: Dur,
    /// Requests waiting per device behind the one in progress; more are refused.
    pub queue: usize,
    /// Steps (9011, uploads, 9012) buffered per requester; a requester that does
    /// not read loses steps beyond this (logged), the device is never stalled.
    pub events: usize,
    /// Operator control socket; unset: `$RUNTIME_DIRECTORY/control.sock`, else
    /// `<data dir>/control.sock`.
    pub control_socket: Option<PathBuf>,
    /// Operator connections served at once; more are answered "busy".
    pub control_clients: usize,
    /// Answer a device's 1013 (it asks for the time) with 1012 (per device:
    /// `[[device]] time_sync`).
    pub time_sync: bool,
    /// Also send 1012 unasked when a device's clock is off by more than
    /// `time_sync_threshold` on `time_sync_count` consecutive real-time uploads
    /// (on by default: the standard expects the platform to keep clocks right).
    pub time_sync_skew: bool,
    /// Clock skew (CN 2011 DataTime against receive time) that counts as off.
    pub time_sync_threshold: Dur,
    /// Consecutive, consistent skewed uploads needed (a backlog sent after an
    /// outage has old DataTimes but a good clock).
    pub time_sync_count: u32,
    /// At most one skew-triggered 1012 per device in this interval.
    pub time_sync_interval: Dur,
    /// Request missing minute/hour/day data (2051/2061/2031) when uploads show a
    /// gap (per device: `[[device]] backfill`; on by default).
    pub backfill: bool,
    /// Longest window one backfill request asks for (the newest part of a gap).
    pub backfill_max_window: Dur,
    /// At most one backfill request per device in this interval.
    pub backfill_interval: Dur,
    /// Encrypt the CP of the requests the gateway builds for a 2025 device that
    /// has a key (1011, 1012, 1061, 1062, 2xxx fetches, 3011, 3012, `raw`).
    /// Off by default: the 2025 text lists only device data (2000-2999), 1014
    /// and 3020 as encrypted (digest §2.1, §6.4.4) and leaves platform requests
    /// open; 1014 and 3020 are encrypted either way, relayed requests never
    /// change.
    pub encrypt_requests: bool,
    /// Devices outside the registry whose downlink state (QN clock, calibration
    /// and backfill rate limits, series) is kept; past it the one heard from
    /// longest ago is forgotten.
    pub max_unregistered_devices: usize,
}

impl Default for DownlinkSection {
    fn default() -> Self {
        DownlinkSection {
            over_time: Dur(Duration::from_secs(10)),
            re_count: 3,
            exec_timeout: Dur(Duration::from_secs(60)),
            queue: 8,
            events: 256,
            control_socket: None,
            control_clients: 16,
            time_sync: true,
            time_sync_skew: true,
            time_sync_threshold: Dur(Duration::from_secs(60)),
            time_sync_count: 3,
            time_sync_interval: Dur(Duration::from_secs(3600)),
            backfill: true,
            backfill_max_window: Dur(Duration::from_secs(6 * 3600)),
            backfill_interval: Dur(Duration::from_secs(600)),
            max_unregistered_devices: 5000,
            encrypt_requests: false,
        }
    }
}

impl DownlinkSection {
    /// Range checks, naming the key.
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("downlink.{key}"),
            message: message.to_owned(),
        };
        const S: fn(u64) -> Duration = Duration::from_secs;
        check_bounds(
            path,
            &[
                (
                    "downlink.over_time",
                    self.over_time.0,
                    Duration::from_millis(100),
                    S(600),
                ),
                ("downlink.exec_timeout", self.exec_timeout.0, S(1), S(3600)),
                (
                    "downlink.time_sync_interval",
                    self.time_sync_interval.0,
                    S(1),
                    S(30 * 86_400),
                ),
                (
                    "downlink.backfill_max_window",
                    self.backfill_max_window.0,
                    S(60),
                    S(31 * 86_400),
                ),
                (
                    "downlink.backfill_interval",
                    self.backfill_interval.0,
                    S(1),
                    S(30 * 86_400),
                ),
            ],
        )?;
        if self.over_time.0.is_zero() {
            return Err(bad("over_time", "must be greater than 0"));
        }
        if self.re_count > 99 {
            return Err(bad("re_count", "must be between 0 and 99"));
        }
        if self.exec_timeout.0.is_zero() {
            return Err(bad("exec_timeout", "must be greater than 0"));
        }
        if self.queue == 0 || self.queue > 1024 {
            return Err(bad("queue", "must be between 1 and 1024"));
        }
        if self.max_unregistered_devices == 0 || self.max_unregistered_devices > MAX_TRACKED {
            return Err(bad(
                "max_unregistered_devices",
                "must be between 1 and 1000000",
            ));
        }
        if self.control_clients == 0 {
            return Err(bad("control_clients", "must be greater than 0"));
        }
        if self.events == 0 {
            return Err(bad("events", "must be greater than 0"));
        }
        if self.time_sync_threshold.0 < Duration::from_secs(1) {
            return Err(bad("time_sync_threshold", "must be at least 1s"));
        }
        if self.time_sync_count == 0 {
            return Err(bad("time_sync_count", "must be greater than 0"));
        }
        if self.backfill_max_window.0 < Duration::from_secs(60) {
            return Err(bad("backfill_max_window", "must be at least 1m"));
        }
        if let Some(p) = &self.control_socket {
            if p.as_os_str().is_empty() {
                return Err(bad("control_socket", "must not be empty"));
            }
        }
        Ok(())
    }

    /// Where the control socket lives: the key, else `$RUNTIME_DIRECTORY`
    /// (systemd), else the data directory.
    pub fn socket_path(&self, data_dir: &Path) -> PathBuf {
        if let Some(p) = &self.control_socket {
            return p.clone();
        }
        if let Some(s) = std::env::var_os("RUNTIME_DIRECTORY") {
            if let Some(first) = s
                .to_string_lossy()
                .split(':')
                .next()
                .filter(|x| !x.is_empty())
            {
                return PathBuf::from(first).join("control.sock");
            }
        }
        data_dir.join("control.sock")
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn errors_name_the_downlink_key() {
        for (text, key) in [
            ("[downlink]\nover_time = \"0s\"", "downlink.over_time"),
            ("[downlink]\nre_count = 100", "downlink.re_count"),
            ("[downlink]\nqueue = 0", "downlink.queue"),
            (
                "[downlink]\nmax_unregistered_devices = 0",
                "downlink.max_unregistered_devices",
            ),
            ("[downlink]\nevents = 0", "downlink.events"),
            (
                "[downlink]\ncontrol_clients = 0",
                "downlink.control_clients",
            ),
            (
                "[downlink]\ntime_sync_count = 0",
                "downlink.time_sync_count",
            ),
            (
                "[downlink]\nbackfill_max_window = \"10s\"",
                "downlink.backfill_max_window",
            ),
            (
                "[[device]]\nmn = \"A\"\nnext_key = \"0123456789ABCDEF0123456789ABCDEF\"",
                "device[0].next_key",
            ),
            (
                "[[device]]\nmn = \"A\"\nkey = \"30303030303030303030303030303030\"\nnext_key = \"xyz\"",
                "device[0].next_key",
            ),
            (
                "[[device]]\nmn = \"A\"\nunencrypted = \"reject\"",
                "device[0].unencrypted",
            ),
        ] {
            let e = Config::parse(text, Path::new("t")).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let d = Config::parse("", Path::new("t")).unwrap();
        assert!(
            d.downlink.backfill && d.downlink.time_sync_skew,
            "on by default"
        );
        let c = Config::parse("[[device]]\nmn = \"A\"\nbackfill = false", Path::new("t")).unwrap();
        assert!(c.downlink.backfill);
        assert_eq!(c.device[0].backfill, Some(false));
        assert!(!d.downlink.encrypt_requests, "off by default");
        // A type error is toml's: it quotes the line, which names the key.
        let e = Config::parse("[downlink]\nencrypt_requests = 1", Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("encrypt_requests") && e.contains("boolean"),
            "{e}"
        );
        let e = Config::parse(
            "[[device]]\nmn = \"A\"\nkey = \"30303030303030303030303030303030\"\nunencrypted = \"drop\"",
            Path::new("t"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unencrypted") && e.contains("accept") && e.contains("reject"),
            "{e}"
        );
        assert!(Config::parse("[downlink]\nbogus = 1", Path::new("t")).is_err());
    }
}
