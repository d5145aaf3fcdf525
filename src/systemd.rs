//! systemd `Type=notify` integration: READY after bind, STOPPING on shutdown,
//! WATCHDOG pings at half the configured interval. All calls are no-ops when
//! not started by systemd (no `NOTIFY_SOCKET`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Tells systemd the service is ready, with a status line.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Spawns the watchdog pinger if `WatchdogSec=` is set for this unit.
pub fn spawn_watchdog(shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(500));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
            }
        }
    });
}
