//! Automatic requests: what an accepted device frame calls for without an
//! operator asking. Clock calibration when a device announces its clock
//! (1013) or its data keeps arriving off the gateway's clock, backfill of a
//! gap in minute/hour/day data, and the 2025 key push on 1014.
//!
//! No I/O: the function reads the frame, the registry and the `[downlink]`
//! section, and reads and updates the per-MN rate limits in [`Devices`]
//! (memory shared by every session, so a device reconnecting does not reset
//! them). The session decides when the requests start (after the frame's ack
//! went out) and logs [`Why`] at the moment a request is called for.

use crate::downlink::config::DownlinkSection;
use crate::downlink::{self as dl, Action, Devices, Submit};
use crate::protocol::{self, Frame};
use crate::registry::Registry;

/// One automatic request and why it was called for.
#[derive(Debug)]
pub struct Auto {
    /// The request, with no requester to answer (its outcome is logged).
    pub submit: Submit,
    /// What called for it, for the session's log line.
    pub why: Why,
}

/// What called for an automatic request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The device announced its clock (1013).
    ClockNotify,
    /// The device's data times have been off the gateway's clock for
    /// `time_sync_count` uploads in a row.
    ClockSkew {
        /// The skew of the last upload (seconds, device minus gateway).
        skew_s: i64,
    },
    /// A gap in minute/hour/day data.
    Gap {
        /// The data's CN.
        cn: u16,
        /// First missing DataTime (N14, the device's time zone).
        from: String,
        /// Last missing DataTime (N14, the device's time zone).
        to: String,
    },
    /// The registry holds the device's next SM4 key and it asked for one
    /// (1014 with `SKCreateTime`).
    KeyPush,
}

/// Automatic requests that frame `f`, received at `received_at_ms`, calls
/// for, appended to `out`. The caller passes only accepted frames of devices
/// the session speaks for (not quarantined ones, not those another session
/// holds) that did not answer the exchange in progress.
pub fn auto_requests(
    f: &Frame,
    registry: &Registry,
    c: &DownlinkSection,
    devices: &Devices,
    received_at_ms: i64,
    out: &mut Vec<Auto>,
) {
    let (Some(mn), Some(cn)) = (f.mn(), f.cn_num()) else {
        return;
    };
    let dev = registry.get(mn);
    let auto = |action: Action, origin: &str, why: Why| Auto {
        submit: Submit {
            mn: mn.to_owned(),
            action,
            origin: origin.to_owned(),
            replies: None,
        },
        why,
    };
    let time_sync = dev.and_then(|d| d.time_sync).unwrap_or(c.time_sync);
    match cn {
        // A notify in the device's edition (2005 has no 1013: it is acked as
        // data there); PolId names the instrument whose clock is asked for.
        1013 if time_sync
            && f.dialect.is_some_and(|d| {
                protocol::codes::command(d, protocol::codes::Dir::Up, 1013)
                    .is_some_and(|c| c.exchange == protocol::codes::Exchange::Notify)
            }) =>
        {
            let pol = f.param("PolId").map(str::to_owned);
            out.push(auto(
                Action::SetTime { time: None, pol },
                dl::ORIGIN_TIMESYNC,
                Why::ClockNotify,
            ));
        }
        // Only the request the standard defines (2025 digest §2.2): the device's
        // `SKCreateTime=…` alone. A 1014 carrying `NewSK` is a device echoing a
        // push, and one without SKCreateTime asks for nothing; answering either
        // with a push would rotate the key on every such frame.
        1014 if f.dialect == Some(protocol::Dialect::V2025)
            && f.param("SKCreateTime").is_some_and(|t| !t.is_empty())
            && f.param("NewSK").is_none() =>
        {
            if let Some(next) = dev.and_then(|d| d.next_key.clone()) {
                out.push(auto(
                    Action::KeyPush { new_key: next },
                    dl::ORIGIN_KEY,
                    Why::KeyPush,
                ));
            }
        }
        2011 if time_sync && c.time_sync_skew => {
            let Some(t) = f.data_time else { return };
            let skew_ms = t.timestamp_millis() - received_at_ms;
            let threshold = c.time_sync_threshold.0.as_millis() as i64;
            if devices.skew_run(mn, skew_ms, threshold) >= c.time_sync_count
                && devices.time_sync_due(
                    mn,
                    received_at_ms,
                    c.time_sync_interval.0.as_millis() as i64,
                )
            {
                out.push(auto(
                    Action::SetTime {
                        time: None,
                        pol: None,
                    },
                    dl::ORIGIN_TIMESYNC,
                    Why::ClockSkew {
                        skew_s: skew_ms / 1000,
                    },
                ));
            }
        }
        2051 | 2061 | 2031 => {
            let Some(t) = f.data_time else { return };
            let window = c.backfill_max_window.0.as_secs() as i64;
            let Some(gap) = devices.observe(mn, cn, t.timestamp(), window) else {
                return;
            };
            let enabled = dev.and_then(|d| d.backfill).unwrap_or(c.backfill);
            if enabled
                && devices.backfill_due(
                    mn,
                    received_at_ms,
                    c.backfill_interval.0.as_millis() as i64,
                )
            {
                let tz = *t.offset();
                let n14 = |s: i64| {
                    chrono::DateTime::from_timestamp(s, 0)
                        .map(|x| protocol::time::format_n14(x.with_timezone(&tz)))
                        .unwrap_or_default()
                };
                let (from, to) = (n14(gap.from), n14(gap.to));
                out.push(auto(
                    Action::Fetch {
                        cn,
                        from: from.clone(),
                        to: to.clone(),
                    },
                    dl::ORIGIN_BACKFILL,
                    Why::Gap { cn, from, to },
                ));
            }
        }
        _ => {}
    }
}
