//! `[[upstream]]`: HJ 212 platforms that receive every device frame byte-exact.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur, show_duration};

/// How an upstream connection is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamMode {
    /// One long-lived connection (default).
    #[default]
    Persistent,
    /// A new connection for every frame, closed once it is delivered.
    PerMessage,
}

/// Where a new upstream's cursor starts the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamStart {
    /// At the end of the log: only frames received from now on (default).
    #[default]
    Now,
    /// At the beginning: the whole history is sent.
    Oldest,
}

/// One `[[upstream]]`: an HJ 212 platform that receives every device frame
/// byte-exact (README "Upstream pass-through").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamEntry {
    /// Unique name: the cursor is `upstream.<name>`, relayed records carry it as `peer`.
    pub name: String,
    /// `host:port` of the platform.
    pub addr: String,
    /// Run this forwarder.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Only these MNs (empty: all).
    #[serde(default)]
    pub mn: Vec<String>,
    /// Only these STs (empty: all).
    #[serde(default)]
    pub st: Vec<String>,
    /// Only these CNs (empty: all).
    #[serde(default)]
    pub cn: Vec<String>,
    /// `persistent` or `per-message`.
    #[serde(default)]
    pub mode: UpstreamMode,
    /// How long to wait for the platform's 9014/9013 (OverTime).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: Dur,
    /// Resends after a timeout before reconnecting (ReCount).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Also forward rejected frames (never those of quarantined devices).
    #[serde(default)]
    pub include_rejected: bool,
    /// `now` or `oldest`: where the cursor starts the first time.
    #[serde(default)]
    pub start: UpstreamStart,
    /// Requests of this platform the gateway cannot relay (the device has no
    /// live session, or its queue is full) answered QnRtn=2 per minute; beyond
    /// it they are logged and recorded as refused, but not answered.
    #[serde(default = "default_refusals_per_minute")]
    pub refusals_per_minute: u32,
    /// Rounds of `1 + retries` sends without the platform's ack after which a frame
    /// is set aside (dead letter, reason `no_ack`), provided the platform acks the
    /// next frame (a platform that acks nothing is an outage, not a poison frame).
    /// 1..=1000.
    #[serde(default = "default_dead_letter_after")]
    pub dead_letter_after: u32,
}

fn yes() -> bool {
    true
}
fn default_ack_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_retries() -> u32 {
    3
}
fn default_refusals_per_minute() -> u32 {
    120
}
fn default_dead_letter_after() -> u32 {
    3
}

/// Checks every `[[upstream]]`, naming the key (`upstream[3].addr`).
pub(super) fn check_upstreams(upstreams: &[UpstreamEntry], path: &Path) -> Result<(), ConfigError> {
    for (i, u) in upstreams.iter().enumerate() {
        if u.ack_timeout.0 > Duration::from_secs(120) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: format!("upstream[{i}].ack_timeout"),
                message: format!(
                    "{} is out of range: must be between 50ms and 120s",
                    show_duration(u.ack_timeout.0)
                ),
            });
        }
    }
    for (i, u) in upstreams.iter().enumerate() {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("upstream[{i}].{key}"),
            message,
        };
        let name_ok = !u.name.is_empty()
            && u.name.len() <= 64
            && u.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(bad(
                "name",
                "must be 1..64 characters of letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if upstreams[..i].iter().any(|o| o.name == u.name) {
            return Err(bad("name", format!("{:?} is used twice", u.name)));
        }
        // host:port; the host may be a name, resolved at each connect.
        let port_ok = u
            .addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            return Err(bad("addr", format!("{:?}: expected host:port", u.addr)));
        }
        if u.ack_timeout.0 < Duration::from_millis(50) {
            return Err(bad("ack_timeout", "must be at least 50ms".into()));
        }
        if u.retries > 100 {
            return Err(bad("retries", "must be at most 100".into()));
        }
        if u.refusals_per_minute == 0 || u.refusals_per_minute > 60_000 {
            return Err(bad(
                "refusals_per_minute",
                "must be between 1 and 60000".into(),
            ));
        }
        if !(1..=1000).contains(&u.dead_letter_after) {
            return Err(bad(
                "dead_letter_after",
                "must be between 1 and 1000".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::err;

    #[test]
    fn upstream_keys() {
        let c = Config::parse(
            "[[upstream]]\nname = \"prov\"\naddr = \"10.0.0.1:9000\"\n\
             [[upstream]]\nname = \"city\"\naddr = \"plat.example:9001\"\nmode = \"per-message\"\n\
             cn = [\"2011\"]\nack_timeout = \"2s\"\nretries = 1\nstart = \"oldest\"\nenabled = false\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let (a, b) = (&c.upstream[0], &c.upstream[1]);
        assert!(a.enabled && !b.enabled);
        assert_eq!(
            (a.mode, a.start, a.retries),
            (UpstreamMode::Persistent, UpstreamStart::Now, 3)
        );
        assert_eq!(a.ack_timeout.0, Duration::from_secs(10));
        assert!(!a.include_rejected && a.mn.is_empty());
        assert_eq!(
            (b.mode, b.start),
            (UpstreamMode::PerMessage, UpstreamStart::Oldest)
        );
        assert_eq!(b.cn, ["2011"]);
        let up = |body: &str| {
            err(&format!(
                "[[upstream]]\nname = \"a\"\naddr = \"h:1\"\n[[upstream]]\n{body}"
            ))
        };
        assert!(up("name = \"b\"\naddr = \"nope\"").contains("`upstream[1].addr`"));
        assert_eq!(a.refusals_per_minute, 120);
        assert!(
            up("name = \"b\"\naddr = \"h:2\"\nrefusals_per_minute = 0")
                .contains("`upstream[1].refusals_per_minute`")
        );
        assert!(up("name = \"a\"\naddr = \"h:2\"").contains("`upstream[1].name`"));
        assert!(up("name = \"b c\"\naddr = \"h:2\"").contains("`upstream[1].name`"));
        assert!(
            up("name = \"b\"\naddr = \"h:2\"\nack_timeout = \"1ms\"")
                .contains("`upstream[1].ack_timeout`")
        );
        assert!(up("name = \"b\"\naddr = \"h:2\"\nmode = \"often\"").contains("mode"));
        assert!(up("name = \"b\"\naddr = \"h:2\"\nfilter = 1").contains("filter"));
    }
}
