//! `[registry]` and `[[device]]`: the devices the gateway knows, inline or in a
//! devices file re-read on SIGHUP.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;
use crate::protocol::{CrcPolicy, Dialect, crypt};

/// `[registry]`: where else devices come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// A TOML file of `[[device]]` entries, re-read on SIGHUP.
    pub devices_file: Option<PathBuf>,
}

/// Kind of site equipment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Analyzer or data logger sending monitoring data.
    #[default]
    Analyzer,
    /// Site video gateway (heartbeats and status only).
    Video,
}

/// One `[[device]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// Device id.
    pub mn: String,
    /// Expected password; frames with another PW are rejected.
    pub pw: Option<String>,
    /// Dialect override: 2005 | 2017 | 2025 | surface-water.
    pub dialect: Option<String>,
    /// CRC policy: strict | modbus | swapped | any.
    pub crc: Option<CrcPolicy>,
    /// Current SM4 key, 32 hex digits (2025 encrypted devices).
    pub key: Option<String>,
    /// With a key: accept (default, with a warning) or reject a frame whose CP
    /// no key opens and that is not readable plaintext (`encryption.expected`).
    pub unencrypted: Option<crypt::Unencrypted>,
    /// Previous keys still accepted during a key change.
    #[serde(default)]
    pub old_keys: Vec<String>,
    /// analyzer | video.
    #[serde(default)]
    pub kind: DeviceKind,
    /// Free-text name for operators.
    pub name: Option<String>,
    /// Automatic gap backfill for this device; unset follows `[downlink] backfill`.
    pub backfill: Option<bool>,
    /// Automatic clock calibration for this device; unset follows `[downlink] time_sync`.
    pub time_sync: Option<bool>,
    /// 2025: the key pushed with CN 1014 when the device asks for a new one (32 hex
    /// digits). Accepted for decoding alongside `key` and `old_keys` during the changeover.
    pub next_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesFile {
    #[serde(default)]
    device: Vec<DeviceEntry>,
}

/// Loads a devices file (SIGHUP reload source).
pub fn load_devices_file(path: &Path) -> Result<Vec<DeviceEntry>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let f: DevicesFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    check_devices(&f.device, path)?;
    Ok(f.device)
}

/// Checks `[[device]]` entries, naming the key (`device[3].key`); secrets are never echoed.
pub(super) fn check_devices(devices: &[DeviceEntry], path: &Path) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for (i, d) in devices.iter().enumerate() {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("device[{i}].{field}"),
            message,
        };
        if !header_value_ok(&d.mn, 32) {
            return Err(bad(
                "mn",
                format!(
                    "{:?} is not a valid MN: 1..32 printable ASCII characters without spaces, ';', ',', '=' or '&'",
                    d.mn
                ),
            ));
        }
        // The password is a secret: the message never repeats it.
        if d.pw.as_deref().is_some_and(|pw| !header_value_ok(pw, 32)) {
            return Err(bad(
                "pw",
                "is not a valid PW: 1..32 printable ASCII characters without spaces, ';', ',', '=' or '&' (the gateway writes it into frame headers)".into(),
            ));
        }
        if !seen.insert(d.mn.as_str()) {
            return Err(bad("mn", format!("{:?} appears twice", d.mn)));
        }
        if let Some(dl) = &d.dialect {
            Dialect::parse(dl).ok_or_else(|| {
                bad(
                    "dialect",
                    format!("{dl:?}: expected 2005, 2017, 2025 or surface-water"),
                )
            })?;
        }
        // Keys are secrets: the message never repeats them.
        if let Some(k) = &d.key {
            crypt::parse_key(k)
                .ok_or_else(|| bad("key", "must be 32 hex digits (16 bytes)".into()))?;
        }
        if let Some(k) = &d.next_key {
            crypt::parse_key(k)
                .ok_or_else(|| bad("next_key", "must be 32 hex digits (16 bytes)".into()))?;
            // The push travels encrypted under the current key.
            if d.key.is_none() {
                return Err(bad(
                    "next_key",
                    "needs `key` (the push is encrypted with it)".into(),
                ));
            }
        }
        // Without a key nothing is expected to be encrypted: the setting would
        // silently do nothing.
        if d.unencrypted.is_some() && d.key.is_none() {
            return Err(bad(
                "unencrypted",
                "needs `key` (it judges CPs that the device's key does not open)".into(),
            ));
        }
        for (j, k) in d.old_keys.iter().enumerate() {
            crypt::parse_key(k).ok_or_else(|| {
                bad(
                    &format!("old_keys[{j}]"),
                    "must be 32 hex digits (16 bytes)".into(),
                )
            })?;
        }
    }
    Ok(())
}

/// A value the gateway may write into an HJ 212 header field (`MN=`, `PW=`).
///
/// HJ 212-2017 §6.3.2 (Table 3) gives MN as 24 characters `0-9A-F` and PW as
/// 6 characters; the field has no escaping, so `;` ends the field, `,` `=` and
/// `&` are CP separators and control characters break line-based tooling.
/// Loggers in the field use longer passwords (24 hex seen) and other MN
/// alphabets, so this admits any printable ASCII up to `max` bytes except those.
pub fn header_value_ok(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'=' | b'&'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::err;

    #[test]
    fn mn_and_pw_cannot_carry_header_syntax() {
        for (text, key) in [
            ("[[device]]\nmn = \"A\"\npw = \"12;MN=X\"", "`device[0].pw`"),
            ("[[device]]\nmn = \"A\"\npw = \"a&&b\"", "`device[0].pw`"),
            ("[[device]]\nmn = \"A\"\npw = \"a,b\"", "`device[0].pw`"),
            ("[[device]]\nmn = \"A\"\npw = \"a=b\"", "`device[0].pw`"),
            ("[[device]]\nmn = \"A\"\npw = \"\"", "`device[0].pw`"),
            (
                "[[device]]\nmn = \"A\"\npw = \"12\\r\\n34\"",
                "`device[0].pw`",
            ),
            ("[[device]]\nmn = \"A\"\npw = \"12 34\"", "`device[0].pw`"),
            ("[[device]]\nmn = \"A\\u0007\"", "`device[0].mn`"),
            ("[[device]]\nmn = \"A B\"", "`device[0].mn`"),
            ("[[device]]\nmn = \"站点1\"", "`device[0].mn`"),
        ] {
            let e = err(text);
            assert!(e.contains(key), "{text}: {e}");
        }
        // The secret is never echoed back.
        assert!(!err("[[device]]\nmn = \"A\"\npw = \"se;cret\"").contains("se;cret"));
        let c = Config::parse(
            "[[device]]\nmn = \"010000A8900016F000169DC0\"\npw = \"100000\"\n\
             [[device]]\nmn = \"88888880000001\"\npw = \"0123456789ABCDEF01234567\"",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.device.len(), 2);
    }
}
