//! Talking back to devices: requests the gateway originates or relays.
//!
//! - [`engine`]: the sans-IO exchange state machine a session drives (one
//!   outstanding request per device, OverTime/ReCount, 9011/9012, uploads
//!   matched to the exchange).
//! - [`Devices`]: per-MN state shared across sessions and reconnects: the QN
//!   clock (strictly increasing per MN), the rate limits of automatic requests
//!   and the last minute/hour/day DataTimes the backfill compares against.
//!   Registered devices keep theirs; MNs outside the registry share
//!   `[downlink] max_unregistered_devices` slots, least recently seen evicted.
//! - [`inbox`]: a session's bounded queue of requests (and word of its
//!   supersession), allocation-free while empty.
//! - [`control`]: the operator's Unix control socket (`command`, `sessions`).
//! - [`audit`]: each exchange's outcome, recorded in the store.
//! - [`config`]: the `[downlink]` section.

pub mod audit;
pub mod auto;
pub mod config;
pub mod control;
pub mod engine;
pub mod inbox;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, FixedOffset, Utc};
use tokio::sync::mpsc;

use crate::protocol::crypt::Key;
use crate::protocol::reply::{self, Target};
use crate::protocol::{self, Dialect};
use crate::recency::Recency;
use crate::registry::SharedRegistry;

pub use engine::{Event, Outcome};

/// Log peer of operator requests.
pub const ORIGIN_OPERATOR: &str = "operator";
/// Log peer of automatic clock calibration.
pub const ORIGIN_TIMESYNC: &str = "auto:timesync";
/// Log peer of automatic gap backfill.
pub const ORIGIN_BACKFILL: &str = "auto:backfill";
/// Log peer of 2025 key pushes.
pub const ORIGIN_KEY: &str = "auto:key";

/// Finding on uploads that answer a history fetch (gap backfill or operator fetch).
pub const FINDING_BACKFILL: &str = "downlink.backfill";

/// What to ask a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// 1011, optionally an instrument's clock.
    GetTime {
        /// PolId.
        pol: Option<String>,
    },
    /// 1012; `time` is N14 device-local, `None` = the gateway's clock at send time.
    SetTime {
        /// SystemTime.
        time: Option<String>,
        /// PolId: an instrument's clock (a 1013 that named one is answered for it).
        pol: Option<String>,
    },
    /// 2051 / 2061 / 2031 (or 2041) history window, N14 device-local.
    Fetch {
        /// CN.
        cn: u16,
        /// BeginTime.
        from: String,
        /// EndTime.
        to: String,
    },
    /// 1062.
    SetRtdInterval(u32),
    /// 1061.
    GetRtdInterval,
    /// 3011 zero/span calibration.
    Calibrate {
        /// PolId.
        pol: String,
    },
    /// 3012 immediate sampling.
    Sample {
        /// PolId.
        pol: String,
    },
    /// Any CN with a CP body as given (encrypted for 2025 1014/3020).
    Raw {
        /// CN.
        cn: u16,
        /// What goes between `CP=&&` and `&&`.
        cp: String,
    },
    /// 2025 1014: push `new_key` (its configured text), encrypted under the current key.
    KeyPush {
        /// The next key's 32 hex digits.
        new_key: String,
    },
    /// A platform's request, relayed byte-exact with its own QN.
    Relay {
        /// The request as the platform sent it.
        bytes: Bytes,
        /// Its QN.
        qn: String,
        /// Its CN.
        cn: u16,
    },
}

impl Action {
    /// The request's CN.
    pub fn cn(&self) -> u16 {
        match self {
            Action::GetTime { .. } => 1011,
            Action::SetTime { .. } => 1012,
            Action::Fetch { cn, .. } | Action::Raw { cn, .. } | Action::Relay { cn, .. } => *cn,
            Action::SetRtdInterval(_) => 1062,
            Action::GetRtdInterval => 1061,
            Action::Calibrate { .. } => 3011,
            Action::Sample { .. } => 3012,
            Action::KeyPush { .. } => 1014,
        }
    }

    /// Builds the request in the device's dialect. `now` and `tz` give
    /// SetTime's default and 1014's SKCreateTime; `key` is the device's
    /// current SM4 key (2025); `encrypt_requests` is `[downlink]
    /// encrypt_requests` (the CP of every other request encrypted too).
    pub fn build(
        &self,
        t: Target<'_>,
        qn: &str,
        now: DateTime<Utc>,
        tz: FixedOffset,
        key: Option<&Key>,
        encrypt_requests: bool,
    ) -> Result<Bytes, String> {
        let plain = self.build_plain(t, qn, now, tz, key)?;
        Ok(match key {
            Some(k)
                if encrypt_requests
                    && t.dialect == Dialect::V2025
                    && !matches!(self, Action::Relay { .. })
                    && !self.always_encrypted(t) =>
            {
                encrypt_request(&plain, k)
            }
            _ => plain,
        })
    }

    /// 1014 and 3020 to a 2025 device travel encrypted whatever the setting.
    fn always_encrypted(&self, t: Target<'_>) -> bool {
        t.dialect == Dialect::V2025 && matches!(self.cn(), 1014 | 3020)
    }

    fn build_plain(
        &self,
        t: Target<'_>,
        qn: &str,
        now: DateTime<Utc>,
        tz: FixedOffset,
        key: Option<&Key>,
    ) -> Result<Bytes, String> {
        let encrypted = |cn: u16| t.dialect == Dialect::V2025 && matches!(cn, 1014 | 3020);
        Ok(match self {
            Action::GetTime { pol } => reply::get_time(t, qn, pol.as_deref()),
            Action::SetTime { time, pol } => {
                let now_text = protocol::time::format_n14(now.with_timezone(&tz));
                reply::set_time(t, qn, time.as_deref().unwrap_or(&now_text), pol.as_deref())
            }
            Action::Fetch { cn, from, to } => reply::history(t, qn, *cn, from, to),
            Action::SetRtdInterval(n) => reply::set_rtd_interval(t, qn, *n),
            Action::GetRtdInterval => reply::get_rtd_interval(t, qn),
            Action::Calibrate { pol } => reply::request(t, qn, 3011, &format!("PolId={pol}")),
            Action::Sample { pol } => reply::request(t, qn, 3012, &format!("PolId={pol}")),
            Action::Raw { cn, cp } if encrypted(*cn) => {
                let key =
                    key.ok_or("the device is 2025 and has no key: this CN must be encrypted")?;
                reply::request_encrypted(t, qn, *cn, cp, key)
            }
            Action::Raw { cn, cp } => reply::request(t, qn, *cn, cp),
            Action::KeyPush { new_key } => {
                let key = key.ok_or("the device has no current key to encrypt 1014 with")?;
                let created = protocol::time::format_qn(now, tz);
                reply::key_push(t, qn, &created, new_key, key)
            }
            Action::Relay { bytes, .. } => bytes.clone(),
        })
    }
}

/// Encrypts the CP area of a request the gateway built in plaintext, as a
/// 2025 device encrypts its own (App. A.2): whole 16-byte groups, the tail
/// in clear; length and CRC stay those of the plaintext segment. The CP of a
/// gateway-built request is its own text, so `CP=&&` and the final `&&`
/// bound it.
fn encrypt_request(plain: &Bytes, key: &Key) -> Bytes {
    let Some(open) = plain.windows(5).position(|w| w == b"CP=&&").map(|i| i + 5) else {
        return plain.clone();
    };
    // `##LLLL … &&CCCC\r\n`: the closing `&&` sits 8 bytes before the end.
    let close = plain.len().saturating_sub(8);
    if close < open || &plain[close..close + 2] != b"&&" {
        return plain.clone();
    }
    let mut wire = plain.to_vec();
    protocol::crypt::encrypt_in_place(key, &mut wire[open..close]);
    Bytes::from(wire)
}

/// A request for one device's session.
#[derive(Debug)]
pub struct Submit {
    /// The device.
    pub mn: String,
    /// What to ask.
    pub action: Action,
    /// Who asks: the log peer of the request.
    pub origin: String,
    /// Where the exchange's steps go (bounded; see `[downlink] events`);
    /// `None` for automatic requests, whose outcome goes to the gateway's log.
    pub replies: Option<mpsc::Sender<Event>>,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No live session for the MN.
    Offline,
    /// Its queue (`[downlink] queue`) is full.
    Busy,
}

/// Minute/hour/day series tracked for gaps, in this order.
pub const SERIES: [u16; 3] = [2051, 2061, 2031];

#[derive(Debug, Default, Clone, Copy)]
struct Series {
    /// Last live DataTime (unix seconds).
    last: Option<i64>,
    /// Interval: learned for minute data, fixed for hour and day data.
    step: Option<i64>,
}

#[derive(Debug, Default)]
struct MnState {
    last_qn_ms: i64,
    last_timesync_ms: Option<i64>,
    last_backfill_ms: Option<i64>,
    /// Consecutive real-time uploads off by a similar amount, and the last skew.
    skew_run: u32,
    last_skew_ms: i64,
    series: [Series; 3],
}

/// A window of missing data: BeginTime and EndTime (unix seconds, inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// CN to fetch.
    pub cn: u16,
    /// First missing DataTime.
    pub from: i64,
    /// Last missing DataTime.
    pub to: i64,
}

/// Per-MN downlink state shared by all sessions (survives reconnects; a few
/// dozen bytes per MN). Registered devices keep theirs for the process's
/// lifetime; MNs outside the registry take one of `cap` slots, and the one
/// heard from longest ago is forgotten when a new one needs a slot.
///
/// Forgetting costs an unregistered device little: its next request's QN
/// restarts from the clock (still unique unless the clock went back), a
/// calibration or backfill may come sooner than its interval, and its gap
/// detection learns the series again.
#[derive(Debug)]
pub struct Devices {
    inner: Mutex<Tracked>,
    /// Who is registered; `None`: nobody (tests, tools).
    registry: Option<Arc<SharedRegistry>>,
    cap: usize,
}

#[derive(Debug, Default)]
struct Tracked {
    states: HashMap<String, MnState>,
    /// The MNs of `states` that were not registered when first seen.
    unregistered: Recency,
    evicted: u64,
}

impl Default for Devices {
    fn default() -> Self {
        Devices::new(
            None,
            config::DownlinkSection::default().max_unregistered_devices,
        )
    }
}

/// How many devices [`Devices`] holds state for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackedCounts {
    /// Registered when first seen (never evicted).
    pub registered: usize,
    /// Outside the registry: at most `[downlink] max_unregistered_devices`.
    pub unregistered: usize,
    /// Unregistered devices forgotten to stay within the cap, since start.
    pub evicted: u64,
}

impl Devices {
    /// State for devices of `registry`, and for at most `cap` (at least 1) others.
    pub fn new(registry: Option<Arc<SharedRegistry>>, cap: usize) -> Devices {
        Devices {
            inner: Mutex::default(),
            registry,
            cap: cap.max(1),
        }
    }

    fn registered(&self, mn: &str) -> bool {
        self.registry
            .as_ref()
            .is_some_and(|r| r.current().get(mn).is_some())
    }

    fn with<R>(&self, mn: &str, f: impl FnOnce(&mut MnState) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *guard;
        if let Some(s) = t.states.get_mut(mn) {
            t.unregistered.refresh(mn);
            return f(s);
        }
        if !self.registered(mn) {
            t.unregistered.touch(mn);
            // `mn` is the newest, so it is never the one forgotten here.
            while t.unregistered.len() > self.cap {
                let Some(old) = t.unregistered.pop_oldest() else {
                    break;
                };
                // Registered by a reload since: it keeps its state, outside the slots.
                if !self.registered(&old) {
                    t.states.remove(&old);
                    t.evicted += 1;
                }
            }
        }
        f(t.states.entry(mn.to_owned()).or_default())
    }

    /// Devices with state now, and evictions so far.
    pub fn tracked(&self) -> TrackedCounts {
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        TrackedCounts {
            registered: t.states.len() - t.unregistered.len(),
            unregistered: t.unregistered.len(),
            evicted: t.evicted,
        }
    }

    /// The next QN timestamp for `mn`: the clock in ms, or one past the last
    /// one when the clock has not moved (or went back): unique per MN.
    pub fn next_qn_ms(&self, mn: &str, now_ms: i64) -> i64 {
        self.with(mn, |s| {
            s.last_qn_ms = now_ms.max(s.last_qn_ms + 1);
            s.last_qn_ms
        })
    }

    /// True (and the time recorded) when no skew-triggered calibration was sent
    /// to `mn` within `interval_ms`.
    pub fn time_sync_due(&self, mn: &str, now_ms: i64, interval_ms: i64) -> bool {
        self.with(mn, |s| {
            if s.last_timesync_ms.is_some_and(|t| now_ms - t < interval_ms) {
                return false;
            }
            s.last_timesync_ms = Some(now_ms);
            true
        })
    }

    /// Records the clock skew of a real-time upload and returns how many
    /// consecutive uploads were off by more than `threshold_ms` in a
    /// consistent way (each within `threshold_ms` of the previous one).
    ///
    /// A wrong clock shows the same offset on every upload; a backlog the
    /// logger sends after an outage shows old DataTimes whose lag shrinks with
    /// each frame, and must not trigger a calibration.
    pub fn skew_run(&self, mn: &str, skew_ms: i64, threshold_ms: i64) -> u32 {
        self.with(mn, |s| {
            if skew_ms.abs() <= threshold_ms {
                s.skew_run = 0;
            } else if s.skew_run > 0 && (skew_ms - s.last_skew_ms).abs() <= threshold_ms {
                s.skew_run += 1;
            } else {
                s.skew_run = 1;
            }
            s.last_skew_ms = skew_ms;
            s.skew_run
        })
    }

    /// True (and the time recorded) when no backfill was requested from `mn`
    /// within `interval_ms`.
    pub fn backfill_due(&self, mn: &str, now_ms: i64, interval_ms: i64) -> bool {
        self.with(mn, |s| {
            if s.last_backfill_ms.is_some_and(|t| now_ms - t < interval_ms) {
                return false;
            }
            s.last_backfill_ms = Some(now_ms);
            true
        })
    }

    /// Records a live (not requested) upload of a series and returns the gap
    /// before it, if any, limited to its newest `max_window_s`.
    ///
    /// Hour and day data have fixed steps; the minute step is learned as the
    /// smallest interval seen (loggers send 1, 5 or 10 minute data), so the
    /// first two minute uploads of a device only teach the step. A gap is a
    /// jump of more than 1.5 steps; older or repeated DataTimes change nothing.
    pub fn observe(&self, mn: &str, cn: u16, t: i64, max_window_s: i64) -> Option<Gap> {
        let i = SERIES.iter().position(|c| *c == cn)?;
        self.with(mn, |s| {
            let se = &mut s.series[i];
            let fixed = match cn {
                2061 => Some(3600),
                2031 => Some(86_400),
                _ => None,
            };
            let Some(last) = se.last else {
                se.last = Some(t);
                se.step = fixed;
                return None;
            };
            if t <= last {
                return None;
            }
            let d = t - last;
            se.last = Some(t);
            let step = match (fixed, se.step) {
                (Some(f), _) => f,
                (None, Some(st)) if d < st => {
                    se.step = Some(d);
                    return None;
                }
                (None, Some(st)) => st,
                (None, None) => {
                    // Larger than an hour is not a minute interval.
                    se.step = Some(d.min(3600));
                    return None;
                }
            };
            if d * 2 <= step * 3 {
                return None;
            }
            let to = t - step;
            let from = (last + step).max(to - max_window_s.max(step) + step);
            Some(Gap { cn, from, to })
        })
    }
}

/// Words for a QnRtn code.
pub fn qn_rtn_meaning(code: u16) -> &'static str {
    protocol::codes::qn_rtn_name(&code.to_string()).unwrap_or("unknown code")
}

/// Words for an ExeRtn code.
pub fn exe_rtn_meaning(code: u16) -> &'static str {
    protocol::codes::exe_rtn_name(&code.to_string()).unwrap_or("unknown code")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qns_strictly_increase_per_mn() {
        let d = Devices::default();
        assert_eq!(d.next_qn_ms("A", 1000), 1000);
        assert_eq!(d.next_qn_ms("A", 1000), 1001);
        assert_eq!(d.next_qn_ms("A", 900), 1002, "clock went back");
        assert_eq!(d.next_qn_ms("B", 900), 900, "per MN");
        assert_eq!(d.next_qn_ms("A", 5000), 5000);
    }

    #[test]
    fn gaps_in_minute_hour_day_series() {
        let d = Devices::default();
        let m = 60;
        // Minute data every 10 min: the step is learned, then a 40 min jump is a gap.
        assert_eq!(d.observe("A", 2051, 0, 86_400), None);
        assert_eq!(d.observe("A", 2051, 10 * m, 86_400), None);
        assert_eq!(d.observe("A", 2051, 20 * m, 86_400), None);
        assert_eq!(
            d.observe("A", 2051, 60 * m, 86_400),
            Some(Gap {
                cn: 2051,
                from: 30 * m,
                to: 50 * m
            })
        );
        // Old or repeated data changes nothing.
        assert_eq!(d.observe("A", 2051, 30 * m, 86_400), None);
        assert_eq!(d.observe("A", 2051, 70 * m, 86_400), None);
        // Hour data: fixed step; the window is capped to the newest part.
        assert_eq!(d.observe("A", 2061, 0, 7200), None);
        assert_eq!(
            d.observe("A", 2061, 10 * 3600, 7200),
            Some(Gap {
                cn: 2061,
                from: 8 * 3600,
                to: 9 * 3600
            })
        );
        assert_eq!(d.observe("A", 2011, 0, 7200), None, "not a series");
    }

    #[test]
    fn skew_needs_a_consistent_run() {
        let d = Devices::default();
        let h = 3_600_000;
        assert_eq!(d.skew_run("A", h, 60_000), 1);
        assert_eq!(d.skew_run("A", h + 500, 60_000), 2);
        assert_eq!(d.skew_run("A", h + 900, 60_000), 3);
        // A backlog: the lag shrinks by a reporting interval per frame.
        assert_eq!(d.skew_run("B", -10 * h, 60_000), 1);
        assert_eq!(d.skew_run("B", -10 * h + 300_000, 60_000), 1);
        assert_eq!(d.skew_run("B", 0, 60_000), 0);
    }

    /// Bounded property: thousands of calls for random MNs, a few registered,
    /// keep at most `cap` unregistered MNs and every registered one.
    #[test]
    fn state_for_random_mns_stays_within_the_cap() {
        const CAP: usize = 40;
        let entries: Vec<crate::config::DeviceEntry> = (0..5)
            .map(|i| {
                crate::config::Config::parse(
                    &format!("[[device]]\nmn = \"REG{i}\"\n"),
                    std::path::Path::new("t"),
                )
                .unwrap()
                .device
                .remove(0)
            })
            .collect();
        let registry =
            crate::registry::Registry::from_entries(&entries, std::path::Path::new("t")).unwrap();
        let d = Devices::new(Some(Arc::new(SharedRegistry::new(registry))), CAP);
        let mut x: u64 = 212;
        for i in 0..5000i64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = x >> 33;
            let mn = if r % 10 == 0 {
                format!("REG{}", (r / 10) % 5)
            } else {
                format!("X{:08}", r % 50_000)
            };
            match r % 4 {
                0 => drop(d.next_qn_ms(&mn, i)),
                1 => drop(d.skew_run(&mn, 3_600_000, 60_000)),
                2 => drop(d.observe(&mn, 2051, i * 60, 86_400)),
                _ => drop(d.backfill_due(&mn, i, 1000)),
            }
            let t = d.tracked();
            assert!(t.unregistered <= CAP, "{t:?} after {i}");
        }
        let t = d.tracked();
        assert_eq!(t.registered, 5, "registered devices are never forgotten");
        assert_eq!(t.unregistered, CAP);
        assert!(t.evicted > 1000, "{t:?}");
        // A registered device keeps its QN clock through the churn.
        let before = d.next_qn_ms("REG1", 0);
        for i in 0..200 {
            d.next_qn_ms(&format!("Y{i}"), 0);
        }
        assert_eq!(d.next_qn_ms("REG1", 0), before + 1);
    }

    #[test]
    fn the_least_recently_seen_unregistered_device_goes_first() {
        let d = Devices::new(None, 2);
        d.next_qn_ms("A", 1000);
        d.next_qn_ms("B", 1000);
        d.next_qn_ms("A", 1000);
        d.next_qn_ms("C", 1000);
        // B was the oldest: forgotten; A kept its clock.
        assert_eq!(d.next_qn_ms("A", 1000), 1002);
        assert_eq!(d.tracked().evicted, 1);
        assert_eq!(d.next_qn_ms("B", 500), 500, "B starts over");
    }

    #[test]
    fn rate_limits() {
        let d = Devices::default();
        assert!(d.time_sync_due("A", 0, 1000));
        assert!(!d.time_sync_due("A", 999, 1000));
        assert!(d.time_sync_due("A", 1000, 1000));
        assert!(d.backfill_due("A", 0, 1000));
        assert!(!d.backfill_due("A", 10, 1000));
    }
}

/// Numbered requests for the unit tests of the queues that carry them.
#[cfg(test)]
pub(crate) mod test_requests {
    use super::{Action, Submit};

    /// A request for `mn` whose number `n` reads back.
    pub(crate) fn request(mn: &str, n: u32) -> Box<Submit> {
        Box::new(Submit {
            mn: mn.into(),
            action: Action::SetRtdInterval(n),
            origin: "test".into(),
            replies: None,
        })
    }

    /// The number [`request`] gave.
    pub(crate) fn n(s: &Submit) -> u32 {
        match s.action {
            Action::SetRtdInterval(n) => n,
            _ => unreachable!("only numbered requests are queued in these tests"),
        }
    }
}
