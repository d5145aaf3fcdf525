//! Configuration: TOML in, a checked [`Config`] out.
//!
//! Unknown keys are rejected (a typo must not silently fall back to a
//! default), every key has a documented default (see `deploy/gateway.toml`),
//! and every error names the offending key so `check-config` can point at it.
//!
//! One file per section, each with its defaults and its own `check`: `server`,
//! `store`, `validation`, `registry` (`[registry]` and `[[device]]`), `mqtt`,
//! `upstream`, `alarms`, `downlink`, `metrics`, `log`. This file holds the whole
//! [`Config`], loading, [`ConfigError`], durations ([`Dur`]) and the checks the
//! sections share. Config depends on nothing that reads it: the daemon's
//! modules import their section from here, never the other way round.

mod alarms;
mod downlink;
pub mod env;
mod evidence;
mod log;
mod metrics;
mod mqtt;
mod registry;
mod server;
mod store;
mod upstream;
mod validation;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::FixedOffset;
use serde::Deserialize;

pub use alarms::{
    AggregateStamp, AlarmsSection, DETECTORS, DeviceAlarms, FactorAlarms, FlowUnit,
    MINUTE_INTERVALS,
};
pub use downlink::DownlinkSection;
pub use evidence::{EvidenceSection, MAX_WITNESSES, WitnessSection};
pub use log::{DEFAULT_REPEAT_INTERVAL, LogSection};
pub use metrics::MetricsConfig;
pub use mqtt::{BrokerUrl, MAX_MERGE_PACKETS, MqttSection, parse_broker_url};
pub use registry::{DeviceEntry, DeviceKind, RegistrySection, header_value_ok, load_devices_file};
pub use server::{ProxyProtocol, ServerConfig};
pub use store::{StoreSection, Sync};
pub use upstream::{UpstreamEntry, UpstreamMode, UpstreamStart};
pub use validation::{UnknownDevice, ValidationSection};

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A `${VAR}` reference that cannot be expanded (unset, malformed).
    #[error("{path}:{line}: {message}")]
    Env {
        /// File path.
        path: PathBuf,
        /// 1-based line of the reference.
        line: usize,
        /// What is wrong, naming the variable.
        message: String,
    },
    /// TOML syntax error or unknown/mistyped key (the message names it).
    #[error("{path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// toml's message, which names the key and position.
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        /// File path (or `<defaults>`).
        path: PathBuf,
        /// Dotted key, e.g. `server.listen` or `device[3].key`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// A duration written as `500ms`, `30s`, `5m`, `2h` or `1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses `<integer><unit>` with unit ms, s, m, h or d.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid duration {text:?}: expected e.g. \"30s\", \"5m\", \"250ms\"")
    })?;
    let per = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "invalid duration {text:?}: unit must be ms, s, m, h or d"
            ));
        }
    };
    let ms = n
        .checked_mul(per)
        .ok_or_else(|| format!("invalid duration {text:?}: too long"))?;
    Ok(Duration::from_millis(ms))
}

/// Largest accepted `max_unregistered_devices` (alarms and downlink): a cap far
/// above it is no cap.
pub const MAX_TRACKED: usize = 1_000_000;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[store]`.
    pub store: StoreSection,
    /// `[validation]`.
    pub validation: ValidationSection,
    /// `[registry]`.
    pub registry: RegistrySection,
    /// `[mqtt]`.
    pub mqtt: MqttSection,
    /// `[alarms]`.
    pub alarms: AlarmsSection,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// `[[device]]`.
    pub device: Vec<DeviceEntry>,
    /// `[[upstream]]`.
    pub upstream: Vec<UpstreamEntry>,
    /// `[downlink]`.
    pub downlink: DownlinkSection,
    /// `[log]`.
    pub log: LogSection,
    /// `[evidence]`.
    pub evidence: EvidenceSection,
}

impl Config {
    /// Reads a config file, expands its `${VAR}` references from the process
    /// environment ([`env`]) and checks it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse_env(&text, path, |name| std::env::var_os(name))
    }

    /// Expands `${VAR}` references in `text` with `lookup` ([`env::expand`]),
    /// then parses and checks it (`path` is for messages).
    pub fn parse_env(
        text: &str,
        path: &Path,
        lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Config, ConfigError> {
        let expanded = env::expand(text, lookup).map_err(|e| ConfigError::Env {
            path: path.to_owned(),
            line: e.line,
            message: e.message,
        })?;
        match expanded {
            std::borrow::Cow::Borrowed(_) => Config::parse(text, path),
            std::borrow::Cow::Owned(expanded) => {
                let cfg: Config = toml::from_str(&expanded)
                    .map_err(|e| expanded_parse_error(text, &expanded, path, &e))?;
                cfg.check(path)?;
                Ok(cfg)
            }
        }
    }

    /// Parses and checks TOML text (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// Semantic checks that serde cannot express, section by section; the
    /// first error found is returned.
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        self.server.check(path)?;
        self.store.check(path)?;
        self.log.check(path)?;
        self.validation.check(path)?;
        self.mqtt.check(path)?;
        self.alarms.check(path)?;
        registry::check_devices(&self.device, path)?;
        upstream::check_upstreams(&self.upstream, path)?;
        self.downlink.check(path)?;
        self.metrics.check(path)?;
        self.evidence.check(path)?;
        Ok(())
    }

    /// The parsed `[server] proxy_trusted` blocks (valid once `check` passed).
    pub fn proxy_trusted(&self) -> Vec<crate::proxy::Cidr> {
        self.server
            .proxy_trusted
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect()
    }

    /// The device time zone.
    pub fn time_zone(&self) -> Option<FixedOffset> {
        parse_offset(&self.validation.time_zone)
    }

    /// Store file path resolved against the data directory.
    pub fn store_path(&self, data_dir: &Path) -> PathBuf {
        if self.store.path.is_absolute() {
            self.store.path.clone()
        } else {
            data_dir.join(&self.store.path)
        }
    }
}

/// The TOML error `e` on `expanded` (the text after `${VAR}` expansion of
/// `original`), quoting the line as written in the file: toml quotes the
/// offending line, which after expansion holds the variables' values
/// (passwords). Expanded values never hold line breaks, so line numbers agree.
fn expanded_parse_error(
    original: &str,
    expanded: &str,
    path: &Path,
    e: &toml::de::Error,
) -> ConfigError {
    let message = match e.span() {
        Some(span) => {
            let line = expanded[..span.start.min(expanded.len())]
                .matches('\n')
                .count()
                + 1;
            let text = original.lines().nth(line - 1).unwrap_or("");
            format!(
                "TOML parse error at line {line} (after ${{VAR}} expansion)\n  |\n{line} | {text}\n  |\n{}",
                e.message().trim_end()
            )
        }
        None => e.message().trim_end().to_owned(),
    };
    ConfigError::Parse {
        path: path.to_owned(),
        message,
    }
}

/// Every duration a hostile or mistaken value could turn into a stall: a zero
/// that spins a timer, or an hour that holds every ack or SIGTERM. Each entry is
/// `(key, value, lowest, highest)`, bounds inclusive; the message names the key
/// and the range.
fn check_bounds(
    path: &Path,
    bounds: &[(&str, Duration, Duration, Duration)],
) -> Result<(), ConfigError> {
    for &(key, v, lo, hi) in bounds {
        if v < lo || v > hi {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: key.to_owned(),
                message: format!(
                    "{} is out of range: must be between {} and {}",
                    show_duration(v),
                    show_duration(lo),
                    show_duration(hi)
                ),
            });
        }
    }
    Ok(())
}

/// `1h`, `250ms`, `90s`: the shortest exact form, for error messages.
fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses `+08:00`, `-05:30`, `Z` or `UTC`.
pub fn parse_offset(text: &str) -> Option<FixedOffset> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match t.as_bytes().first()? {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let h: i32 = h.parse().ok()?;
    let m: i32 = m.parse().ok()?;
    if h > 14 || m > 59 {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of the error `Config::parse` gives for `text`.
    pub(super) fn err(text: &str) -> String {
        Config::parse(text, Path::new("t.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn durations_that_would_stall_acks_or_shutdown_are_refused() {
        for (text, key) in [
            ("[store]\nbatch_delay = \"1h\"", "`store.batch_delay`"),
            ("[store]\nbatch_delay = \"1001ms\"", "`store.batch_delay`"),
            ("[server]\nidle_timeout = \"0s\"", "`server.idle_timeout`"),
            (
                "[server]\nidle_timeout = \"999ms\"",
                "`server.idle_timeout`",
            ),
            (
                "[server]\nshutdown_grace = \"1h\"",
                "`server.shutdown_grace`",
            ),
            ("[server]\nwrite_timeout = \"0s\"", "`server.write_timeout`"),
            ("[server]\nwrite_timeout = \"2m\"", "`server.write_timeout`"),
            (
                "[server]\npartial_frame_timeout = \"0s\"",
                "`server.partial_frame_timeout`",
            ),
            ("[server]\ntcp_keepalive = \"0s\"", "`server.tcp_keepalive`"),
            ("[alarms]\ntick = \"1ms\"", "`alarms.tick`"),
            ("[mqtt]\nmerge_wait = \"2h\"", "`mqtt.merge_wait`"),
            ("[mqtt]\nreconnect_max = \"1d\"", "`mqtt.reconnect_max`"),
            ("[downlink]\nover_time = \"50ms\"", "`downlink.over_time`"),
            (
                "[downlink]\nexec_timeout = \"2h\"",
                "`downlink.exec_timeout`",
            ),
            (
                "[[upstream]]\nname = \"p\"\naddr = \"h:1\"\nack_timeout = \"1h\"",
                "`upstream[0].ack_timeout`",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(key) && e.contains("out of range"), "{text}: {e}");
        }
        assert!(err("[store]\nbatch_delay = \"1h\"").contains("between 0s and 1s"));
        // The edges are allowed.
        for text in [
            "[store]\nbatch_delay = \"1s\"",
            "[store]\nbatch_delay = \"0ms\"",
            "[server]\nidle_timeout = \"1s\"\nshutdown_grace = \"0s\"",
            "[server]\nshutdown_grace = \"60s\"",
        ] {
            Config::parse(text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        // A count of units that overflows is an error, not a wrap or a panic.
        assert!(err("[store]\nbatch_delay = \"99999999999999999d\"").contains("too long"));
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(c.server.listen, ["0.0.0.0:9212"]);
        assert_eq!(c.store.sync, Sync::Full);
        assert_eq!(c.time_zone(), FixedOffset::east_opt(8 * 3600));
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("[server]\nlisten = [\"nope\"]").contains("`server.listen`"));
        assert!(err("[server]\nlisen = []").contains("lisen"));
        assert!(err("[store]\nsync = \"sometimes\"").contains("sync"));
        assert!(err("[server]\nidle_timeout = \"5 parsecs\"").contains("idle_timeout"));
        assert!(err("[validation]\ntime_zone = \"Mars\"").contains("`validation.time_zone`"));
        assert!(err("[[device]]\nmn = \"A\"\nkey = \"00\"").contains("`device[0].key`"));
        assert!(err("[[device]]\nmn = \"A\"\n[[device]]\nmn = \"A\"").contains("`device[1].mn`"));
        let e = err("[[device]]\nmn = \"A\"\nkey = \"zz\"");
        assert!(!e.contains("zz"), "keys never echoed: {e}");
    }

    /// The start-up check, the log's repeat limit and the metrics listener's caps.
    #[test]
    fn health_keys() {
        let c = Config::parse("", Path::new("t")).unwrap();
        assert_eq!(c.store.check_tail, 1000);
        assert_eq!(c.log.repeat_interval.0, Duration::from_secs(10));
        assert_eq!(c.metrics.max_connections, 64);
        assert_eq!(c.metrics.head_timeout.0, Duration::from_secs(5));
        assert!(err("[store]\ncheck_tail = 0").contains("`store.check_tail`"));
        assert!(err("[log]\nrepeat_interval = \"500ms\"").contains("`log.repeat_interval`"));
        assert!(err("[log]\nrepeat_interval = \"2h\"").contains("`log.repeat_interval`"));
        assert!(err("[metrics]\nmax_connections = 0").contains("`metrics.max_connections`"));
        assert!(err("[metrics]\nhead_timeout = \"2m\"").contains("`metrics.head_timeout`"));
    }

    /// `${VAR}` references expand before parsing; errors name the variable and
    /// the line, and never show a value.
    #[test]
    fn environment_references() {
        let env = |name: &str| match name {
            "MQTT_PW" => Some("hunter2".into()),
            "LISTEN" => Some("127.0.0.1:9300".into()),
            "KEEP" => Some("ten seconds".into()),
            _ => None,
        };
        let text = "[server]\nlisten = [\"${LISTEN}\"]\n[mqtt]\nusername = \"gw\"\n\
                    password = \"${MQTT_PW}\"\nclient_id = \"${CLIENT:-gw-1}\"\n";
        let c = Config::parse_env(text, Path::new("t.toml"), env).unwrap();
        assert_eq!(c.server.listen, ["127.0.0.1:9300"]);
        assert_eq!(c.mqtt.password.as_deref(), Some("hunter2"));
        assert_eq!(c.mqtt.client_id.as_deref(), Some("gw-1"));

        let e = Config::parse_env("[mqtt]\n\npassword = \"${NOPE}\"", Path::new("t.toml"), env)
            .unwrap_err();
        assert!(matches!(e, ConfigError::Env { line: 3, .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("t.toml:3: environment variable `NOPE` is not set"),
            "{e}"
        );

        // A value that makes the TOML invalid: the message quotes the line as
        // written, not the password in it.
        let e = Config::parse_env("[mqtt]\npassword = ${MQTT_PW}\n", Path::new("t.toml"), env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("password = ${MQTT_PW}"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        // A value checked after parsing: the key is named as usual.
        let e = Config::parse_env(
            "[mqtt]\nkeep_alive = \"${KEEP}\"\n",
            Path::new("t.toml"),
            env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("keep_alive"), "{e}");
        // Plain text is parsed as before.
        assert_eq!(
            Config::parse_env(
                "[mqtt]\nusername = \"u\"\npassword = \"a$b\"",
                Path::new("t"),
                env
            )
            .unwrap()
            .mqtt
            .password
            .as_deref(),
            Some("a$b")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5").is_err());
        assert_eq!(
            parse_offset("-05:30"),
            FixedOffset::east_opt(-(5 * 3600 + 1800))
        );
    }
}
