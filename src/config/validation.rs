//! `[validation]`: how frames are judged (timestamps, CRC, unknown devices).

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur, check_bounds, parse_offset};
use crate::protocol::CrcPolicy;

/// What to do with frames from an MN that is not in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDevice {
    /// Store, ack, forward and publish as usual.
    Accept,
    /// Store as rejected; no ack.
    Reject,
    /// Store and ack, but never forward or publish.
    Quarantine,
}

/// `[validation]`: timestamps, CRC and identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationSection {
    /// Device clock zone, e.g. `+08:00` (HJ 212 timestamps carry none).
    pub time_zone: String,
    /// DataTime ahead of receive time beyond this gives `time.future`.
    pub future_tolerance: Dur,
    /// DataTime older than this gives `time.stale` (unless RF=1).
    pub stale_after: Dur,
    /// CRC policy for devices without their own: strict | modbus | swapped | any.
    pub crc: CrcPolicy,
    /// accept | reject | quarantine.
    pub unknown_device: UnknownDevice,
    /// Standard data-segment maximum; longer segments get `frame.oversize` (warning).
    pub max_segment: usize,
}

impl Default for ValidationSection {
    fn default() -> Self {
        ValidationSection {
            time_zone: "+08:00".into(),
            future_tolerance: Dur(Duration::from_secs(300)),
            stale_after: Dur(Duration::from_secs(48 * 3600)),
            crc: CrcPolicy::Strict,
            unknown_device: UnknownDevice::Accept,
            max_segment: 1024,
        }
    }
}

impl ValidationSection {
    /// Range checks, naming the key.
    pub(super) fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        if self.max_segment == 0 {
            return Err(bad(
                "validation.max_segment",
                "must be greater than 0".into(),
            ));
        }
        check_bounds(
            path,
            &[(
                "validation.stale_after",
                self.stale_after.0,
                Duration::from_secs(1),
                Duration::from_secs(3660 * 86_400),
            )],
        )?;
        parse_offset(&self.time_zone).ok_or_else(|| {
            bad(
                "validation.time_zone",
                format!("{:?} is not an offset like \"+08:00\"", self.time_zone),
            )
        })?;
        Ok(())
    }
}
