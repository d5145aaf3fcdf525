//! `[server]`: the listener, per-connection limits and the PROXY protocol.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur, check_bounds};

/// `[server]`: listening and per-connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Addresses to listen on.
    pub listen: Vec<String>,
    /// Concurrent device sessions; further connections wait in the backlog.
    pub max_connections: usize,
    /// Concurrent sessions from one IP address; more are refused.
    pub max_per_ip: usize,
    /// Close a session that sent nothing for this long.
    pub idle_timeout: Dur,
    /// Close a session whose incomplete frame does not complete within this (slowloris).
    pub partial_frame_timeout: Dur,
    /// Cap on one frame's bytes; a frame start without a tail within it becomes junk.
    pub max_frame_bytes: usize,
    /// Junk bytes one session may send before it is closed.
    pub max_junk_bytes: usize,
    /// Consecutive junk items of a session are stored as one record of at
    /// least this many bytes (fewer when a frame follows or the connection
    /// ends); it is also what a session holds back before storing.
    pub junk_record_bytes: usize,
    /// TCP keepalive idle time.
    pub tcp_keepalive: Dur,
    /// Give up writing a reply to a device after this long.
    pub write_timeout: Dur,
    /// On SIGTERM, sessions get this long to finish frames in flight.
    pub shutdown_grace: Dur,
    /// Expect a PROXY protocol header (behind an L4 load balancer); off by default.
    pub proxy_protocol: ProxyProtocol,
    /// Sources (CIDR blocks or addresses) whose PROXY headers are believed;
    /// connections from anywhere else are refused while `proxy_protocol` is on.
    pub proxy_trusted: Vec<String>,
    /// The PROXY header must be complete within this after the connection opens.
    pub proxy_header_timeout: Dur,
    /// Largest v2 header accepted, TLVs included (v1 is bounded at 107 bytes by its spec).
    pub proxy_max_header: usize,
}

/// `[server] proxy_protocol`: which PROXY header connections must start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No header: the socket peer is the device.
    #[default]
    Off,
    /// Text header only.
    V1,
    /// Binary header only.
    V2,
    /// Either version.
    Any,
}

impl ProxyProtocol {
    /// The parser's setting, `None` when off.
    pub fn accept(self) -> Option<crate::proxy::Accept> {
        match self {
            ProxyProtocol::Off => None,
            ProxyProtocol::V1 => Some(crate::proxy::Accept::V1),
            ProxyProtocol::V2 => Some(crate::proxy::Accept::V2),
            ProxyProtocol::Any => Some(crate::proxy::Accept::Any),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec!["0.0.0.0:9212".into()],
            max_connections: 10_000,
            max_per_ip: 1_000,
            idle_timeout: Dur(Duration::from_secs(600)),
            partial_frame_timeout: Dur(Duration::from_secs(30)),
            max_frame_bytes: 10_240,
            max_junk_bytes: 65_536,
            junk_record_bytes: 4096,
            tcp_keepalive: Dur(Duration::from_secs(60)),
            write_timeout: Dur(Duration::from_secs(10)),
            shutdown_grace: Dur(Duration::from_secs(10)),
            proxy_protocol: ProxyProtocol::Off,
            proxy_trusted: Vec::new(),
            proxy_header_timeout: Dur(Duration::from_secs(5)),
            proxy_max_header: 4096,
        }
    }
}

impl ServerConfig {
    /// Range checks, naming the key.
    pub(super) fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        if self.listen.is_empty() {
            return Err(bad(
                "server.listen",
                "at least one address is required".into(),
            ));
        }
        for a in &self.listen {
            a.parse::<SocketAddr>()
                .map_err(|e| bad("server.listen", format!("{a:?}: {e}")))?;
        }
        let positive = [
            ("server.max_connections", self.max_connections),
            ("server.max_per_ip", self.max_per_ip),
            ("server.max_frame_bytes", self.max_frame_bytes),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(bad(k, "must be greater than 0".into()));
            }
        }
        // Below ~1 KiB a junk record's fixed cost (its document, row and
        // hash, up to ~2.5 KB) would outweigh its bytes: the log's growth per
        // junk byte is bounded by 8 only above that.
        if !(1024..=1 << 20).contains(&self.junk_record_bytes) {
            return Err(bad(
                "server.junk_record_bytes",
                "must be between 1024 and 1048576".into(),
            ));
        }
        if self.max_frame_bytes < 64 || self.max_frame_bytes > 1 << 20 {
            return Err(bad(
                "server.max_frame_bytes",
                "must be between 64 and 1048576".into(),
            ));
        }
        const MS: fn(u64) -> Duration = Duration::from_millis;
        const S: fn(u64) -> Duration = Duration::from_secs;
        check_bounds(
            path,
            &[
                // Each of these closes or delays a connection.
                (
                    "server.idle_timeout",
                    self.idle_timeout.0,
                    S(1),
                    S(7 * 86_400),
                ),
                (
                    "server.partial_frame_timeout",
                    self.partial_frame_timeout.0,
                    S(1),
                    S(3600),
                ),
                ("server.tcp_keepalive", self.tcp_keepalive.0, S(1), S(7200)),
                // A reply write and the SIGTERM grace both hold shutdown.
                ("server.write_timeout", self.write_timeout.0, MS(100), S(60)),
                ("server.shutdown_grace", self.shutdown_grace.0, S(0), S(60)),
                (
                    "server.proxy_header_timeout",
                    self.proxy_header_timeout.0,
                    MS(1),
                    S(60),
                ),
            ],
        )?;
        self.check_proxy(path)
    }

    fn check_proxy(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        for c in &self.proxy_trusted {
            c.parse::<crate::proxy::Cidr>()
                .map_err(|e| bad("server.proxy_trusted", e))?;
        }
        // Trusting nobody would refuse every connection; trusting everybody by
        // default would let any client claim any address. Make it explicit.
        if self.proxy_protocol != ProxyProtocol::Off && self.proxy_trusted.is_empty() {
            return Err(bad(
                "server.proxy_trusted",
                "list the load balancers' addresses (e.g. [\"10.0.0.0/8\"]) when proxy_protocol is on"
                    .into(),
            ));
        }
        if self.proxy_header_timeout.0.is_zero() {
            return Err(bad(
                "server.proxy_header_timeout",
                "must be greater than 0".into(),
            ));
        }
        let max = self.proxy_max_header;
        if !(crate::proxy::V2_FIXED + 36..=crate::proxy::V2_FIXED + 65_535).contains(&max) {
            return Err(bad(
                "server.proxy_max_header",
                "must be between 52 and 65551".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::err;

    #[test]
    fn junk_record_bytes_is_bounded() {
        let c = Config::parse("", Path::new("t")).unwrap();
        assert_eq!(c.server.junk_record_bytes, 4096);
        for v in ["1023", "0", "1048577"] {
            let e = err(&format!("[server]\njunk_record_bytes = {v}"));
            assert!(e.contains("`server.junk_record_bytes`"), "{e}");
        }
        assert!(Config::parse("[server]\njunk_record_bytes = 1024", Path::new("t")).is_ok());
    }

    #[test]
    fn proxy_keys() {
        let c = Config::parse("", Path::new("t")).unwrap();
        assert_eq!(c.server.proxy_protocol, ProxyProtocol::Off);
        assert_eq!(c.server.proxy_header_timeout.0, Duration::from_secs(5));
        let c = Config::parse(
            "[server]\nproxy_protocol = \"v2\"\nproxy_trusted = [\"10.0.0.0/8\", \"::1\"]",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(
            c.server.proxy_protocol.accept(),
            Some(crate::proxy::Accept::V2)
        );
        assert_eq!(c.proxy_trusted().len(), 2);
        assert!(err("[server]\nproxy_protocol = \"v1\"").contains("`server.proxy_trusted`"));
        assert!(
            err("[server]\nproxy_protocol = \"any\"\nproxy_trusted = [\"10.0.0.0/40\"]")
                .contains("`server.proxy_trusted`")
        );
        assert!(err("[server]\nproxy_protocol = \"v3\"").contains("proxy_protocol"));
        assert!(
            err("[server]\nproxy_header_timeout = \"0s\"")
                .contains("`server.proxy_header_timeout`")
        );
        assert!(err("[server]\nproxy_max_header = 20").contains("`server.proxy_max_header`"));
    }
}
