//! The device registry: who may send, with which password, dialect, CRC
//! policy and keys. Built from `[[device]]` entries and the optional devices
//! file; swapped atomically on SIGHUP so live sessions are never dropped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use crate::config::{self, Config, ConfigError, DeviceEntry, DeviceKind};
use crate::protocol::{DeviceLookup, DeviceProfile, Dialect, crypt};

/// One registered device.
#[derive(Debug)]
pub struct Device {
    /// MN.
    pub mn: String,
    /// Expected password (never logged).
    pub pw: Option<String>,
    /// analyzer | video.
    pub kind: DeviceKind,
    /// Operator's name for it.
    pub name: Option<String>,
    /// What the decoder needs.
    pub profile: Arc<DeviceProfile>,
    /// Per-device override of `[downlink] backfill`.
    pub backfill: Option<bool>,
    /// Per-device override of `[downlink] time_sync`.
    pub time_sync: Option<bool>,
    /// 2025: the key to push with CN 1014 (its 32 hex digits, as configured).
    pub next_key: Option<String>,
}

/// An immutable snapshot of the registry.
#[derive(Debug, Default)]
pub struct Registry {
    devices: HashMap<String, Arc<Device>>,
}

impl Registry {
    /// Builds the registry from the config's entries plus its devices file.
    pub fn from_config(cfg: &Config) -> Result<Registry, ConfigError> {
        let mut entries = cfg.device.clone();
        if let Some(path) = &cfg.registry.devices_file {
            entries.extend(config::load_devices_file(path)?);
        }
        Registry::from_entries(
            &entries,
            cfg.registry
                .devices_file
                .as_deref()
                .unwrap_or(Path::new("<config>")),
        )
    }

    /// Builds the registry from entries (already syntax-checked).
    pub fn from_entries(entries: &[DeviceEntry], origin: &Path) -> Result<Registry, ConfigError> {
        let mut devices = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let mut keys = Vec::new();
            // The next key decodes too: the device may switch as soon as it has it.
            for k in e
                .key
                .iter()
                .chain(e.next_key.iter())
                .chain(e.old_keys.iter())
            {
                keys.push(crypt::parse_key(k).ok_or_else(|| ConfigError::Invalid {
                    path: origin.to_owned(),
                    key: format!("device[{i}].key"),
                    message: "must be 32 hex digits".into(),
                })?);
            }
            let profile = DeviceProfile {
                dialect: e.dialect.as_deref().and_then(Dialect::parse),
                crc: e.crc,
                keys,
                unencrypted: e.unencrypted.unwrap_or_default(),
            };
            let dev = Device {
                mn: e.mn.clone(),
                pw: e.pw.clone(),
                kind: e.kind,
                name: e.name.clone(),
                profile: Arc::new(profile),
                backfill: e.backfill,
                time_sync: e.time_sync,
                next_key: e.next_key.clone(),
            };
            if devices.insert(e.mn.clone(), Arc::new(dev)).is_some() {
                return Err(ConfigError::Invalid {
                    path: origin.to_owned(),
                    key: format!("device[{i}].mn"),
                    message: format!("{:?} is registered twice (config and devices file?)", e.mn),
                });
            }
        }
        Ok(Registry { devices })
    }

    /// Looks a device up.
    pub fn get(&self, mn: &str) -> Option<&Arc<Device>> {
        self.devices.get(mn)
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// True when no device is registered.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

impl DeviceLookup for Registry {
    fn profile(&self, mn: &str) -> Option<Arc<DeviceProfile>> {
        self.devices.get(mn).map(|d| d.profile.clone())
    }
}

/// The live registry, replaced whole on reload.
#[derive(Debug, Default)]
pub struct SharedRegistry(RwLock<Arc<Registry>>);

impl SharedRegistry {
    /// Wraps a snapshot.
    pub fn new(r: Registry) -> SharedRegistry {
        SharedRegistry(RwLock::new(Arc::new(r)))
    }
    /// The current snapshot.
    pub fn current(&self) -> Arc<Registry> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Replaces the snapshot.
    pub fn replace(&self, r: Registry) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(r);
    }
}
