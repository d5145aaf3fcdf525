//! Device presence handed from sessions to the publisher.
//!
//! Presence is state, not a stream of events: only the latest status of each MN
//! matters. Sessions overwrite an entry in a map and wake the publisher, which
//! takes the whole map. So sessions never wait, memory is bounded by the number
//! of MNs whose status changed since the publisher last looked, and a burst of
//! changes collapses to the last one per MN instead of being dropped.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

/// One device's presence as published on `{prefix}/{mn}/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// True from the session's first accepted frame until the session ends.
    pub online: bool,
    /// Peer address of the session.
    pub peer: String,
    /// When the status began, RFC 3339 UTC with milliseconds.
    pub since: String,
}

impl DeviceStatus {
    /// `{"online":..,"peer":..,"since":..}`.
    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "online": self.online,
            "peer": self.peer,
            "since": self.since,
        }))
        .unwrap_or_default()
    }
}

/// Latest unpublished status per MN, plus a wake-up for the publisher.
#[derive(Debug, Default)]
pub struct Presence {
    changed: Mutex<HashMap<String, DeviceStatus>>,
    notify: Notify,
}

impl Presence {
    /// Records a status change (never blocks on the publisher).
    pub fn set(&self, mn: &str, online: bool, peer: &str) {
        let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let status = DeviceStatus {
            online,
            peer: peer.to_owned(),
            since,
        };
        self.changed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(mn.to_owned(), status);
        self.notify.notify_one();
    }

    /// Takes every change recorded since the last call.
    pub fn take(&self) -> HashMap<String, DeviceStatus> {
        std::mem::take(&mut *self.changed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts back statuses that could not be published, unless a newer one arrived.
    pub fn restore(&self, statuses: impl IntoIterator<Item = (String, DeviceStatus)>) {
        let mut m = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        for (mn, s) in statuses {
            m.entry(mn).or_insert_with(|| {
                any = true;
                s
            });
        }
        if any {
            self.notify.notify_one();
        }
    }

    /// Resolves once a change is pending.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}
