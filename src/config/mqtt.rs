//! `[mqtt]`: republishing the frame log to an MQTT broker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur, check_bounds};

/// Largest `[mqtt] merge_max_packets`.
pub const MAX_MERGE_PACKETS: u64 = 65_535;

/// `[mqtt]`: republishing the frame log to an MQTT broker (see README "MQTT").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// Run the publisher at all.
    pub enabled: bool,
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (TLS, 8883).
    pub url: String,
    /// MQTT client id; default `hj212-gateway-<hostname>`.
    pub client_id: Option<String>,
    /// MQTT user name.
    pub username: Option<String>,
    /// MQTT password (prefer `password_file`).
    pub password: Option<String>,
    /// File whose content (trailing newline trimmed) is the password; read at start.
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle that signs the broker's certificate (`mqtts://`); default: system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (needs `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// MQTT keep-alive interval.
    pub keep_alive: Dur,
    /// QoS of data messages: 0, 1 (default) or 2. The cursor advances on PUBACK (1),
    /// PUBCOMP (2) or once written (0, which is at-most-once).
    pub qos: u8,
    /// First topic level.
    pub topic_prefix: String,
    /// Publishes awaiting their acknowledgement at once (1..=65535).
    pub max_inflight: usize,
    /// Also publish rejected frames on `{prefix}/{mn}/rejected`.
    pub publish_rejected: bool,
    /// Include `raw`/`raw_b64` (which contain the device password) in payloads.
    pub include_raw: bool,
    /// Records read from the log per query.
    pub batch: usize,
    /// Longest a split upload (PNUM/PNO) waits for its missing packets before its
    /// merged message goes out with `packets.incomplete`.
    pub merge_wait: Dur,
    /// Most split-upload groups held open at once; beyond it the oldest is published
    /// incomplete (memory bound).
    pub merge_max_groups: usize,
    /// Most packets a split upload may announce (PNUM) to be merged; a larger one
    /// is published packet by packet on the merged topic with `packets.not_merged`.
    /// Also the most packets one group holds (resent PNOs count).
    pub merge_max_packets: u64,
    /// Most bytes all open split-upload groups hold together; beyond it the oldest
    /// group is published incomplete (memory bound).
    pub merge_max_bytes: usize,
    /// Cap of the exponential reconnect backoff, and so the longest a broker that
    /// is back waits for the publisher. Default 2 s: after a long outage the
    /// backoff sits at its cap, and at 10 s the wait was half of draining a
    /// minute's backlog (benches/README.md, issue 23).
    pub reconnect_max: Dur,
    /// Largest MQTT packet the publisher sends (set it to the broker's limit). A
    /// message that would exceed it is not sent: its record is set aside (dead
    /// letter, reason `oversize`); merged split uploads are kept under it.
    /// 1024..=268435455 bytes.
    pub max_packet_size: usize,
    /// Connection losses with the same message alone in flight before that message
    /// is set aside (dead letter, reason `broker_refused`): how a broker refuses a
    /// publish under MQTT 3.1.1. 1..=100.
    pub max_refusals: u32,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            enabled: true,
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive: Dur(Duration::from_secs(30)),
            qos: 1,
            topic_prefix: "hj212".into(),
            max_inflight: 1024,
            publish_rejected: false,
            include_raw: false,
            batch: 1024,
            merge_wait: Dur(Duration::from_secs(60)),
            merge_max_groups: 10_000,
            merge_max_packets: 256,
            merge_max_bytes: 64 << 20,
            max_packet_size: 1 << 20,
            reconnect_max: Dur(Duration::from_secs(2)),
            max_refusals: 3,
        }
    }
}

impl MqttSection {
    /// Range checks, naming the key.
    pub(super) fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("mqtt.{key}"),
            message,
        };
        let m = self;
        check_bounds(
            path,
            &[
                (
                    "mqtt.merge_wait",
                    m.merge_wait.0,
                    Duration::ZERO,
                    Duration::from_secs(3600),
                ),
                (
                    "mqtt.reconnect_max",
                    m.reconnect_max.0,
                    Duration::from_millis(100),
                    Duration::from_secs(600),
                ),
            ],
        )?;
        let url = parse_broker_url(&m.url).map_err(|e| bad("url", e))?;
        if m.qos > 2 {
            return Err(bad("qos", "must be 0, 1 or 2".into()));
        }
        if m.max_inflight == 0 || m.max_inflight > 65_535 {
            return Err(bad("max_inflight", "must be between 1 and 65535".into()));
        }
        for (k, v) in [("batch", m.batch), ("merge_max_groups", m.merge_max_groups)] {
            if v == 0 {
                return Err(bad(k, "must be greater than 0".into()));
            }
        }
        if !(2..=MAX_MERGE_PACKETS).contains(&m.merge_max_packets) {
            return Err(bad(
                "merge_max_packets",
                format!("must be between 2 and {MAX_MERGE_PACKETS}"),
            ));
        }
        let topic_ok = |t: &str| !t.is_empty() && !t.contains(['+', '#', '\0']);
        if !topic_ok(&m.topic_prefix) || m.topic_prefix.ends_with('/') {
            return Err(bad(
                "topic_prefix",
                "must be non-empty, without '+', '#' or a trailing '/'".into(),
            ));
        }
        if let Some(id) = &m.client_id {
            if !topic_ok(id) || id.contains('/') || id.len() > 128 {
                return Err(bad(
                    "client_id",
                    "must be 1..128 characters without '+', '#' or '/'".into(),
                ));
            }
        }
        // The password is a secret: messages never repeat it.
        if m.password.is_some() && m.password_file.is_some() {
            return Err(bad(
                "password_file",
                "set either password or password_file, not both".into(),
            ));
        }
        if (m.password.is_some() || m.password_file.is_some()) && m.username.is_none() {
            return Err(bad("username", "required when a password is set".into()));
        }
        if m.client_cert.is_some() != m.client_key.is_some() {
            let key = if m.client_cert.is_some() {
                "client_key"
            } else {
                "client_cert"
            };
            return Err(bad(key, "client_cert and client_key go together".into()));
        }
        if !url.tls {
            for (k, v) in [
                ("ca_file", &m.ca_file),
                ("client_cert", &m.client_cert),
                ("client_key", &m.client_key),
            ] {
                if v.is_some() {
                    return Err(bad(k, "only used with an mqtts:// url".into()));
                }
            }
        }
        if m.keep_alive.0 < Duration::from_secs(5) || m.keep_alive.0 > Duration::from_secs(65_535) {
            return Err(bad("keep_alive", "must be between 5s and 65535s".into()));
        }
        if m.reconnect_max.0 < Duration::from_millis(100) {
            return Err(bad("reconnect_max", "must be at least 100ms".into()));
        }
        // 268,435,455: the largest remaining length MQTT can encode.
        if !(1024..=268_435_455).contains(&m.max_packet_size) {
            return Err(bad(
                "max_packet_size",
                "must be between 1024 and 268435455 bytes".into(),
            ));
        }
        if m.merge_max_bytes < m.max_packet_size {
            return Err(bad(
                "merge_max_bytes",
                format!(
                    "must be at least max_packet_size ({} bytes): one merged message \
                     must fit the budget",
                    m.max_packet_size
                ),
            ));
        }
        if !(1..=100).contains(&m.max_refusals) {
            return Err(bad("max_refusals", "must be between 1 and 100".into()));
        }
        Ok(())
    }
}

/// Broker address parsed from `[mqtt] url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `mqtts://`.
    pub tls: bool,
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Parses `mqtt://host[:port]` / `mqtts://host[:port]` (IPv6 as `[::1]`).
pub fn parse_broker_url(url: &str) -> Result<BrokerUrl, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!("{url:?}: scheme must be mqtt:// or mqtts://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("{url:?}: unexpected text after ']'")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() || host.contains(['/', '@', '?', '#']) {
        return Err(format!("{url:?}: expected mqtt[s]://host[:port]"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{url:?}: bad port"))?,
        None => default_port,
    };
    Ok(BrokerUrl {
        tls,
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::err;
    use std::path::Path;

    /// A broker back after an outage gets the publisher within 2 s, and the
    /// shipped config says so.
    #[test]
    fn reconnect_max_defaults_to_two_seconds_as_shipped() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(c.mqtt.reconnect_max.0, Duration::from_secs(2));
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gateway.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let shipped = Config::parse(&text, Path::new(path)).unwrap();
        assert_eq!(shipped.mqtt.reconnect_max, c.mqtt.reconnect_max);
    }

    #[test]
    fn mqtt_keys() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert!(c.mqtt.enabled);
        assert_eq!(c.mqtt.qos, 1);
        assert_eq!(c.mqtt.topic_prefix, "hj212");
        assert!(err("[mqtt]\nurl = \"http://x\"").contains("`mqtt.url`"));
        assert!(err("[mqtt]\nqos = 3").contains("`mqtt.qos`"));
        assert!(err("[mqtt]\nmax_inflight = 0").contains("`mqtt.max_inflight`"));
        assert!(err("[mqtt]\ntopic_prefix = \"a/#\"").contains("`mqtt.topic_prefix`"));
        assert!(err("[mqtt]\nca_file = \"ca.pem\"").contains("`mqtt.ca_file`"));
        assert!(
            err("[mqtt]\nurl = \"mqtts://h\"\nclient_cert = \"c\"").contains("`mqtt.client_key`")
        );
        assert!(err("[mqtt]\nqso = 1").contains("qso"));
        let e = err("[mqtt]\nusername = \"u\"\npassword = \"s3cret\"\npassword_file = \"f\"");
        assert!(
            e.contains("`mqtt.password_file`") && !e.contains("s3cret"),
            "{e}"
        );
        let u = parse_broker_url("mqtts://[::1]").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "::1", 8883));
        let u = parse_broker_url("mqtt://broker.example:1884").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (false, "broker.example", 1884)
        );
    }

    #[test]
    fn mqtt_merge_limit_keys() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(
            (
                c.mqtt.merge_max_packets,
                c.mqtt.merge_max_bytes,
                c.mqtt.max_packet_size
            ),
            (256, 64 << 20, 1 << 20)
        );
        for bad in [
            "merge_max_packets = 1",
            "merge_max_packets = 65536",
            "max_packet_size = 1000",
            "max_packet_size = 268435456",
            "merge_max_bytes = 1000",
        ] {
            let key = bad.split(' ').next().unwrap();
            let e = err(&format!("[mqtt]\n{bad}"));
            assert!(e.contains(&format!("`mqtt.{key}`")), "{bad}: {e}");
        }
        let c = Config::parse(
            "[mqtt]\nmax_packet_size = 16384\nmerge_max_bytes = 16384\nmerge_max_packets = 2",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.mqtt.merge_max_bytes, 16384);
    }
}
