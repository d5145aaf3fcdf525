//! The detector engine: sans-IO, deterministic.
//!
//! Every detector is a *level* condition evaluated per device (and per factor): when it
//! turns true and no alarm with its [`AlarmKey`] is active, a [`AlarmEvent::Raise`] is
//! emitted; when it turns false and one is active, a [`AlarmEvent::Clear`]. The set of
//! active keys is the only thing that decides "one raise, one clear", so a restart
//! restores it from the alarms table ([`Engine::set_active`]) after re-reading a
//! lookback of records with events discarded.
//!
//! Values are compared as exact decimals; f64 is used only for statistics (median/MAD,
//! shares of a window), never for values that end up in an alarm.
//!
//! The detectors run for every value of every frame, so the quiet path is kept cheap:
//! one device lookup per observation, the factor's state (with its resolved settings)
//! found once per value, the spike window kept sorted ([`super::window`]), and an
//! [`AlarmKey`] built only when an event is actually raised or cleared.
//!
//! Per-device state is bounded. Devices the operator knows (in the registry, or
//! named under `[alarms.device.<MN>]`) keep theirs for the engine's lifetime.
//! Any other MN takes one of `max_unregistered_devices` slots, and past that the
//! unregistered MN heard from longest ago is forgotten, its active alarms ended:
//! a sender inventing MNs (one frame each is enough) churns through the slots
//! instead of growing the engine. Unregistered devices are never reported
//! `device.offline`: a device nobody registered going quiet is not an outage the
//! operator asked to be told about, and one invented MN per frame would otherwise
//! end in one critical alarm per frame.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::str::FromStr;

use rust_decimal::Decimal;

use super::consistency::Verdict;
use super::forgery::{FactorForgery, Forgery};
use super::window::Window;
use super::{
    AlarmEvent, AlarmKey, DetectorKind, Factor, Obs, Raise, Severity, ShortText, Val, Values,
};
use crate::config::{AlarmsSection, FactorAlarms};
use crate::recency::Recency;

/// Factor code of O2 (HJ212.md §6.2).
const O2: &str = "a19001";
/// Factor code of pH.
const PH: &str = "w01001";
/// Seqs kept as support of a raise.
const MAX_SUPPORT: usize = 32;
/// Missing records remembered per series (memory bound against absurd DataTimes).
const MAX_MISSING: usize = 1024;
/// 2011 intervals remembered to learn the cadence.
const CADENCE_SAMPLES: usize = 9;

fn dec(x: f64) -> Decimal {
    Decimal::from_str(&format!("{x}")).unwrap_or_default()
}

/// Powers of ten an `f64` holds exactly (10^22 < 2^53 * 2^22; 10^23 is not exact).
const EXACT_POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// The decimal's text read as f64 (correctly rounded): this runs for every value
/// of every frame.
///
/// A decimal is `mantissa / 10^scale`. When both are exact in an `f64` (mantissa
/// up to 2^53, scale up to 22) one IEEE division rounds the quotient correctly,
/// which is what reading the text gives (Clinger's fast path, which the standard
/// library's parser takes for such text too); the sign is the text's, negative
/// zero included. Anything larger is formatted on the stack and parsed.
fn to_f64(d: Decimal) -> f64 {
    let m = d.mantissa().unsigned_abs();
    if let Some(&p) = EXACT_POW10.get(d.scale() as usize) {
        if m <= 1 << 53 {
            let x = m as f64 / p;
            return if d.is_sign_negative() { -x } else { x };
        }
    }
    to_f64_by_text(d)
}

/// [`to_f64`] the long way: the decimal's text, parsed.
fn to_f64_by_text(d: Decimal) -> f64 {
    let mut buf = StackText::default();
    if write!(buf, "{d}").is_err() {
        // Longer than any decimal's text: never happens, but stay exact if it did.
        return d.to_string().parse().unwrap_or(0.0);
    }
    buf.as_str().parse().unwrap_or(0.0)
}

/// A small fixed text buffer (a `Decimal` prints at most 31 characters).
struct StackText {
    buf: [u8; 64],
    len: usize,
}

impl Default for StackText {
    fn default() -> Self {
        StackText {
            buf: [0; 64],
            len: 0,
        }
    }
}

impl StackText {
    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever appended.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct FactorState {
    /// Settings resolved on the factor's first numeric value (the configuration
    /// never changes for an engine's lifetime).
    fs: Option<Fs>,
    stuck_value: Option<Decimal>,
    stuck_seqs: VecDeque<u64>,
    window: Window,
    hug: VecDeque<(Decimal, u64)>,
    flag_since: Option<(i64, u64)>,
    /// CNs whose latest sample is out of range / inconsistent. One alarm per factor
    /// covers all series: it clears only when every series is fine again, so a good
    /// minute average cannot clear (and re-raise) a bad real-time value.
    range_bad: BTreeSet<String>,
    mismatch_bad: BTreeSet<String>,
    /// series.copied, device.cloned, digits.biased ([`super::forgery`]).
    forgery: FactorForgery,
}

#[derive(Debug, Default)]
struct Series {
    step_ms: Option<i64>,
    last_ms: Option<i64>,
    missing: BTreeSet<i64>,
    support: Vec<u64>,
}

/// Which detectors run for a device (global and per-device `disabled`).
#[derive(Debug, Default, Clone, Copy)]
struct Enabled {
    flag: bool,
    range: bool,
    stuck: bool,
    spike: bool,
    hugging: bool,
    mismatch: bool,
    skew: bool,
    gap: bool,
}

#[derive(Debug, Default)]
struct DeviceState {
    /// Registered or configured under `[alarms.device]`: never evicted, and the only
    /// devices `device.offline` is raised for.
    known: bool,
    last_seen_ms: Option<i64>,
    last_seq: u64,
    video: bool,
    last_2011_dt: Option<i64>,
    intervals: VecDeque<i64>,
    skew_run: u32,
    clean_run: u32,
    skew_seqs: VecDeque<u64>,
    series: HashMap<String, Series>,
    /// Sorted by factor code: frames list a device's factors in the same order every
    /// time, and a binary search over a few short codes beats hashing each one.
    /// Codes are inline (a factor state is ~900 bytes, so the entries are far
    /// apart and a code on the heap cost a cache miss of its own per compare).
    factors: Vec<(ShortText, FactorState)>,
    on: Enabled,
    /// `reference_o2` of the device, else the global one.
    reference_o2: Option<Decimal>,
    /// aggregate.mismatch / emission.mismatch.
    consistency: super::consistency::DeviceCons,
}

impl DeviceState {
    /// The state of factor `f`; `None` when it is new and the device already
    /// has `cap` factors (`[alarms] max_factors_per_device`).
    ///
    /// `next` is where the previous factor of the same observation was, plus
    /// one: an observation's factors come in code order, as they are kept here,
    /// so the usual device (the same factors every time) is answered by one
    /// compare at `next` instead of a binary search, whose probes each touched
    /// another far-apart entry.
    fn factor(&mut self, f: &str, cap: usize, next: &mut usize) -> Option<&mut FactorState> {
        let i = super::values::find_or_insert(&mut self.factors, f, cap, Some(*next))?;
        *next = i + 1;
        Some(&mut self.factors[i].1)
    }
}

/// Resolved per-factor settings.
#[derive(Debug, Clone, Copy)]
struct Fs {
    min: Option<Decimal>,
    max: Option<Decimal>,
    limit: Option<Decimal>,
    stuck_count: u32,
    spike_k: f64,
}

/// Configuration values the detectors use as decimals, converted once.
#[derive(Debug)]
struct Decimals {
    hugging_band: Decimal,
    mismatch_tolerance: Decimal,
    mismatch_abs: Decimal,
}

/// The set of active alarms, apart from the devices' state so that a detector can
/// hold one device's state and raise or clear at the same time.
#[derive(Debug, Default)]
struct Active {
    keys: BTreeSet<AlarmKey>,
    /// Active alarms per MN (the keys of `keys` by MN), so that clearing on a device
    /// without alarms builds no key, and forgetting a device finds its alarms.
    per_mn: HashMap<String, Vec<AlarmKey>>,
}

impl Active {
    fn add(&mut self, key: &AlarmKey) {
        self.per_mn
            .entry(key.mn.clone())
            .or_default()
            .push(key.clone());
    }

    /// Raises `key` unless it is active.
    fn raise(&mut self, out: &mut Vec<AlarmEvent>, r: Raise) {
        if self.keys.insert(r.key.clone()) {
            self.add(&r.key);
            out.push(AlarmEvent::Raise(r));
        }
    }

    /// Ends every active alarm of `mn` (the engine forgets the device).
    fn clear_all(&mut self, out: &mut Vec<AlarmEvent>, mn: &str, end_ms: i64) {
        let Some(keys) = self.per_mn.remove(mn) else {
            return;
        };
        for key in keys {
            if self.keys.remove(&key) {
                out.push(AlarmEvent::Clear {
                    key,
                    end_ms,
                    seq: None,
                });
            }
        }
    }

    /// [`Self::clear`] for detectors that run on every value of every frame: the
    /// key (two strings) is only built when `mn` has an active alarm at all.
    fn clear_lazy(
        &mut self,
        out: &mut Vec<AlarmEvent>,
        mn: &str,
        key: impl FnOnce() -> AlarmKey,
        end_ms: i64,
        seq: Option<u64>,
    ) {
        if self.per_mn.contains_key(mn) {
            self.clear(out, key(), end_ms, seq);
        }
    }

    /// Clears `key` if it is active.
    fn clear(&mut self, out: &mut Vec<AlarmEvent>, key: AlarmKey, end_ms: i64, seq: Option<u64>) {
        if self.keys.remove(&key) {
            if let Some(v) = self.per_mn.get_mut(&key.mn) {
                v.retain(|k| *k != key);
                if v.is_empty() {
                    self.per_mn.remove(&key.mn);
                }
            }
            out.push(AlarmEvent::Clear { key, end_ms, seq });
        }
    }
}

/// Detectors, their state, and the set of active alarms.
#[derive(Debug)]
pub struct Engine {
    cfg: AlarmsSection,
    decimals: Decimals,
    devices: HashMap<String, DeviceState>,
    active: Active,
    /// The tracked devices that are not known, least recently seen first.
    unregistered: Recency,
    /// Unregistered devices forgotten to stay within the cap, since start.
    evicted: u64,
    /// Values of factors not judged because their device had
    /// `max_factors_per_device` factors already, since start.
    untracked_factors: u64,
    /// The falsification detectors' engine-wide state (cross-device fingerprints).
    forgery: Forgery,
}

/// What the per-value detectors of one observation share.
struct Cx<'a> {
    cfg: &'a AlarmsSection,
    decimals: &'a Decimals,
    active: &'a mut Active,
    out: &'a mut Vec<AlarmEvent>,
    o: &'a Obs,
    on: Enabled,
    /// DataTime, else receive time.
    t: i64,
    /// The device has an active alarm: the only case where a clear can do anything.
    /// Every key of an observation is of its own MN, and only `raise`/`clear_lazy`
    /// below change the active set while it is processed, so this is kept in step
    /// there instead of hashing the MN again for every detector of every value.
    mn_active: bool,
}

impl Engine {
    /// An engine with no history.
    pub fn new(cfg: AlarmsSection) -> Engine {
        let decimals = Decimals {
            hugging_band: dec(cfg.hugging_band),
            mismatch_tolerance: dec(cfg.mismatch_tolerance),
            mismatch_abs: dec(cfg.mismatch_abs),
        };
        let forgery = Forgery::new(&cfg);
        Engine {
            cfg,
            decimals,
            devices: HashMap::new(),
            active: Active::default(),
            unregistered: Recency::default(),
            evicted: 0,
            untracked_factors: 0,
            forgery,
        }
    }

    /// Replaces the set of active alarms (restored from the alarms table on restart).
    pub fn set_active(&mut self, keys: impl IntoIterator<Item = AlarmKey>) {
        self.active.keys = keys.into_iter().collect();
        self.active.per_mn.clear();
        let keys: Vec<AlarmKey> = self.active.keys.iter().cloned().collect();
        for k in &keys {
            self.active.add(k);
        }
    }

    /// Devices with state: `(known, unregistered)`. The second never exceeds
    /// `[alarms] max_unregistered_devices`.
    pub fn tracked(&self) -> (usize, usize) {
        let unregistered = self.unregistered.len();
        (self.devices.len() - unregistered, unregistered)
    }

    /// Unregistered devices forgotten to stay within the cap, since the engine started.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Values not judged since start because their device had
    /// `[alarms] max_factors_per_device` other factors already.
    pub fn untracked_factors(&self) -> u64 {
        self.untracked_factors
    }

    /// Takes `mn` into the unregistered slots (or moves it to the back) and, past
    /// the cap, forgets the devices heard from longest ago, ending their alarms at
    /// `now_ms`.
    fn admit_unregistered(&mut self, mn: &str, now_ms: i64, out: &mut Vec<AlarmEvent>) {
        if !self.unregistered.touch(mn) {
            return;
        }
        // `touch` put `mn` at the back, so with a cap of at least one it is never
        // the device popped here.
        while self.unregistered.len() > self.cfg.max_unregistered_devices.max(1) {
            let Some(old) = self.unregistered.pop_oldest() else {
                break;
            };
            self.devices.remove(&old);
            self.active.clear_all(out, &old, now_ms);
            self.evicted += 1;
        }
    }

    /// The active alarms.
    pub fn active(&self) -> impl Iterator<Item = &AlarmKey> {
        self.active.keys.iter()
    }

    fn enabled(&self, mn: &str, kind: DetectorKind) -> bool {
        let kind = kind.as_str();
        !self.cfg.disabled.iter().any(|d| d == kind)
            && !self
                .cfg
                .device
                .get(mn)
                .is_some_and(|d| d.disabled.iter().any(|x| x == kind))
    }

    /// A new device's state: which detectors run for it and its reference O2.
    fn new_device(&self, mn: &str) -> DeviceState {
        let on = |kind| self.enabled(mn, kind);
        DeviceState {
            on: Enabled {
                flag: on(DetectorKind::FlagAbnormal),
                range: on(DetectorKind::ValueRange),
                stuck: on(DetectorKind::ValueStuck),
                spike: on(DetectorKind::ValueSpike),
                hugging: on(DetectorKind::LimitHugging),
                mismatch: on(DetectorKind::ConvertedMismatch),
                skew: on(DetectorKind::TimeSkew),
                gap: on(DetectorKind::DataGap),
            },
            reference_o2: self
                .cfg
                .device
                .get(mn)
                .and_then(|d| d.reference_o2)
                .or(self.cfg.reference_o2)
                .map(dec),
            ..DeviceState::default()
        }
    }

    fn factor_settings(cfg: &AlarmsSection, mn: &str, factor: &str) -> Fs {
        let empty = FactorAlarms::default();
        let g = cfg.factor.get(factor).unwrap_or(&empty);
        let d = cfg
            .device
            .get(mn)
            .and_then(|d| d.factor.get(factor))
            .unwrap_or(&empty);
        // Physical bounds: pH 0-14, O2 0-25 %, concentrations not negative. Flue-gas and
        // weather state (a01xxx: temperatures, pressures) may legitimately be negative.
        let (dmin, dmax) = match factor {
            PH => (Some(0.0), Some(14.0)),
            O2 => (Some(0.0), Some(25.0)),
            f if f.starts_with("a01") => (None, None),
            _ => (Some(0.0), None),
        };
        Fs {
            min: d.min.or(g.min).or(dmin).map(dec),
            max: d.max.or(g.max).or(dmax).map(dec),
            limit: d.limit.or(g.limit).map(dec),
            stuck_count: d.stuck_count.or(g.stuck_count).unwrap_or(cfg.stuck_count),
            spike_k: d.spike_k.or(g.spike_k).unwrap_or(cfg.spike_k),
        }
    }

    /// The `device.offline` threshold of a device, in ms.
    fn offline_threshold(&self, mn: &str, d: &DeviceState) -> i64 {
        if let Some(fixed) = self.cfg.device.get(mn).and_then(|x| x.offline_after) {
            return fixed.0.as_millis() as i64;
        }
        let learned = if d.video || d.intervals.len() < 3 {
            None
        } else {
            // Every device on every tick: on the stack, not in a Vec.
            let mut buf = [0i64; CADENCE_SAMPLES];
            let n = d.intervals.len().min(CADENCE_SAMPLES);
            for (slot, x) in buf.iter_mut().zip(&d.intervals) {
                *slot = *x;
            }
            let v = &mut buf[..n];
            let mid = v.len() / 2;
            let (_, &mut m, _) = v.select_nth_unstable(mid);
            Some(m * i64::from(self.cfg.offline_factor))
        };
        learned
            .unwrap_or(self.cfg.offline_after.0.as_millis() as i64)
            .max(self.cfg.offline_min.0.as_millis() as i64)
    }

    /// The clock moved to `now_ms` (UTC unix ms): raises `device.offline` for devices
    /// silent beyond their threshold.
    pub fn tick(&mut self, now_ms: i64) -> Vec<AlarmEvent> {
        let mut out = Vec::new();
        let mut due = Vec::new();
        for (mn, d) in &self.devices {
            if !d.known {
                continue;
            }
            let Some(seen) = d.last_seen_ms else { continue };
            let limit = self.offline_threshold(mn, d);
            if now_ms - seen > limit && self.enabled(mn, DetectorKind::DeviceOffline) {
                due.push((mn.clone(), seen, d.last_seq, limit));
            }
        }
        due.sort();
        for (mn, seen, seq, limit) in due {
            let secs = limit / 1000;
            self.active.raise(
                &mut out,
                Raise {
                    key: AlarmKey {
                        kind: DetectorKind::DeviceOffline,
                        mn: mn.clone(),
                        factor: String::new(),
                    },
                    severity: Severity::Critical,
                    start_ms: seen + limit,
                    seqs: vec![seq],
                    message_zh: format!("设备 {mn} 离线：超过 {secs} 秒未收到数据"),
                    message_en: format!("device {mn} offline: nothing received for over {secs} s"),
                },
            );
        }
        out
    }

    /// One accepted inbound frame.
    pub fn observe(&mut self, o: &Obs) -> Vec<AlarmEvent> {
        let mut out = Vec::new();
        let known = o.registered || self.cfg.device.contains_key(&o.mn);
        if known {
            // Registered since it was first seen (a registry reload): no longer
            // one of the slots.
            if !self.unregistered.is_empty() {
                self.unregistered.remove(&o.mn);
            }
        } else {
            self.admit_unregistered(&o.mn, o.received_ms, &mut out);
        }
        if !self.devices.contains_key(&o.mn) {
            let d = self.new_device(&o.mn);
            self.devices.insert(o.mn.clone(), d);
        }
        let Engine {
            cfg,
            decimals,
            devices,
            active,
            untracked_factors,
            forgery,
            ..
        } = self;
        let d = devices.get_mut(&o.mn).expect("inserted above");
        d.known = known;
        d.video = o.video;
        d.last_seen_ms = Some(
            d.last_seen_ms
                .map_or(o.received_ms, |s| s.max(o.received_ms)),
        );
        d.last_seq = o.seq;
        active.clear_lazy(
            &mut out,
            &o.mn,
            || AlarmKey {
                kind: DetectorKind::DeviceOffline,
                mn: o.mn.clone(),
                factor: String::new(),
            },
            o.received_ms,
            Some(o.seq),
        );
        if o.video || o.duplicate {
            // Video gateways only get offline/heartbeat checks; a retransmission
            // carries no new sample (counting it would fake a stuck value).
            return out;
        }
        let mn_active = active.per_mn.contains_key(&o.mn);
        let mut cx = Cx {
            cfg,
            decimals,
            active,
            out: &mut out,
            o,
            on: d.on,
            t: o.data_time_ms.unwrap_or(o.received_ms),
            mn_active,
        };
        let realtime = o.cn == "2011";
        if realtime {
            learn_cadence(d, o);
            cx.time_skew(d);
        }
        if matches!(o.cn.as_str(), "2051" | "2061" | "2031") {
            cx.data_gap(d);
        }
        let suffix = if realtime { "Rtd" } else { "Avg" };
        let reference_o2 = d.reference_o2;
        let mut next = 0;
        for vals in o.values.iter() {
            let f = vals.code();
            let Some(st) = d.factor(f, cx.cfg.max_factors_per_device, &mut next) else {
                *untracked_factors += 1;
                continue;
            };
            let flag = vals.text("Flag");
            let Some(v) = vals.num(suffix) else {
                // A flag without a value still counts for flag.abnormal.
                cx.flag(st, f, flag);
                continue;
            };
            let fs = *st
                .fs
                .get_or_insert_with(|| Engine::factor_settings(cx.cfg, &o.mn, f));
            cx.flag(st, f, flag);
            cx.range(st, f, v, &fs);
            if realtime {
                let normal = flag.is_none_or(|x| x == "N");
                cx.stuck(st, f, v, normal, &fs);
                cx.spike(st, f, v, &fs);
                let hv = vals.num("ZsRtd").unwrap_or(v);
                cx.hugging(st, f, hv, &fs);
            }
            cx.mismatch(st, f, vals, v, suffix, reference_o2);
            let (c, t, normal) = (cx.cfg, cx.t, flag.is_none_or(|x| x == "N"));
            forgery.value(c, &mut st.forgery, &mut cx, o, t, f, v, normal);
        }
        // aggregate.mismatch / emission.mismatch (src/alarm/consistency.rs).
        let mut verdicts = Vec::new();
        d.consistency
            .observe(cx.cfg, o, cx.mn_active, &mut verdicts);
        for v in verdicts {
            match v {
                Verdict::Raise(r) => cx.raise(r),
                Verdict::Clear { kind, factor } => {
                    let mn = &o.mn;
                    let key = || AlarmKey {
                        kind,
                        mn: mn.clone(),
                        factor: factor.as_str().to_owned(),
                    };
                    cx.clear_lazy(key, cx.t);
                }
            }
        }
        out
    }
}

impl super::forgery::Sink for Cx<'_> {
    fn raise(&mut self, r: Raise) {
        Cx::raise(self, r);
    }

    fn clear(&mut self, kind: DetectorKind, factor: &str, end_ms: i64) {
        let mn = &self.o.mn;
        self.clear_lazy(
            || AlarmKey {
                kind,
                mn: mn.clone(),
                factor: factor.to_owned(),
            },
            end_ms,
        );
    }
}

#[cfg(test)]
impl Engine {
    /// The falsification detectors' state of one factor (tests of bounds).
    pub(super) fn forgery_state(&self, mn: &str, f: &str) -> Option<&FactorForgery> {
        let d = self.devices.get(mn)?;
        let i = d
            .factors
            .binary_search_by(|(c, _)| c.as_bytes().cmp(f.as_bytes()))
            .ok()?;
        Some(&d.factors[i].1.forgery)
    }

    /// The falsification detectors' engine-wide state.
    pub(super) fn forgery(&self) -> &Forgery {
        &self.forgery
    }
}

fn learn_cadence(d: &mut DeviceState, o: &Obs) {
    let Some(dt) = o.data_time_ms else { return };
    if let Some(prev) = d.last_2011_dt {
        let gap = dt - prev;
        if gap > 0 {
            d.intervals.push_back(gap);
            if d.intervals.len() > CADENCE_SAMPLES {
                d.intervals.pop_front();
            }
        }
    }
    d.last_2011_dt = Some(dt);
}

impl Cx<'_> {
    fn raise(&mut self, r: Raise) {
        self.active.raise(self.out, r);
        // Raised now or active already: either way the device has an active alarm.
        self.mn_active = true;
    }

    /// Clears the alarm `key` builds (only built if the device has any active alarm),
    /// ended by this observation at `end_ms`.
    fn clear_lazy(&mut self, key: impl FnOnce() -> AlarmKey, end_ms: i64) {
        if !self.mn_active {
            return;
        }
        let o = self.o;
        self.active.clear(self.out, key(), end_ms, Some(o.seq));
        self.mn_active = self.active.per_mn.contains_key(&o.mn);
    }

    fn time_skew(&mut self, d: &mut DeviceState) {
        if !self.on.skew {
            return;
        }
        let o = self.o;
        let limit = self.cfg.skew_threshold.0.as_millis() as i64;
        let diff = o.data_time_ms.map(|t| o.received_ms - t);
        // time.future / time.stale (old DataTime) and RF=1 on real-time data are the
        // protocol layer's findings of the same problem; they count as skewed samples.
        let skewed = diff.is_some_and(|x| x.abs() > limit)
            || o.rf
            || o.findings
                .iter()
                .any(|f| f == "time.future" || f == "time.stale");
        let n = self.cfg.skew_count;
        if skewed {
            d.skew_run += 1;
            d.clean_run = 0;
            d.skew_seqs.push_back(o.seq);
            if d.skew_seqs.len() > MAX_SUPPORT {
                d.skew_seqs.pop_front();
            }
        } else {
            d.clean_run += 1;
            d.skew_run = 0;
            d.skew_seqs.clear();
        }
        let (run, clean) = (d.skew_run, d.clean_run);
        let key = || AlarmKey {
            kind: DetectorKind::TimeSkew,
            mn: o.mn.clone(),
            factor: String::new(),
        };
        if run >= n {
            let s = diff.unwrap_or(0) / 1000;
            self.raise(Raise {
                key: key(),
                severity: Severity::Warning,
                start_ms: o.received_ms,
                seqs: d.skew_seqs.iter().copied().collect(),
                message_zh: format!(
                    "设备 {} 时钟偏差：连续 {run} 条实时数据的数据时间与接收时间相差 {s} 秒",
                    o.mn
                ),
                message_en: format!(
                    "device {} clock skew: {run} consecutive real-time frames, receive time minus DataTime {s} s",
                    o.mn
                ),
            });
        } else if clean >= n {
            self.clear_lazy(key, o.received_ms);
        }
    }

    fn data_gap(&mut self, d: &mut DeviceState) {
        let o = self.o;
        let Some(t) = o.data_time_ms else { return };
        if !self.on.gap {
            return;
        }
        // The longest step a series may have: minute data come every
        // `MinInterval` minutes, 1 to 30 (HJ 212-2017 Table 4); capped at one
        // minute, a logger on the common 10-minute interval raised a gap (and
        // a backfill request) for nine "missing" minutes at every record.
        let nominal: i64 = match o.cn.as_str() {
            "2051" => 1_800_000,
            "2061" => 3_600_000,
            _ => 86_400_000,
        };
        if !d.series.contains_key(&o.cn) {
            d.series.insert(o.cn.clone(), Series::default());
        }
        let s = d.series.get_mut(&o.cn).expect("inserted above");
        s.missing.remove(&t);
        match s.last_ms {
            Some(last) if t > last => {
                let diff = t - last;
                // The step is learned (minute data is often sent every 5 or 10 minutes):
                // the smallest interval seen, never above the nominal one.
                let step = s.step_ms.map_or(diff, |x| x.min(diff)).min(nominal);
                let step = step.max(1000);
                s.step_ms = Some(step);
                let mut m = last + step;
                while m < t && s.missing.len() < MAX_MISSING {
                    s.missing.insert(m);
                    m += step;
                }
                if t - last > step {
                    s.support = vec![o.seq];
                }
                s.last_ms = Some(t);
            }
            Some(_) => {}
            None => s.last_ms = Some(t),
        }
        let key = || AlarmKey {
            kind: DetectorKind::DataGap,
            mn: o.mn.clone(),
            factor: o.cn.clone(),
        };
        if let Some(&first) = s.missing.first() {
            let first_txt = chrono::DateTime::from_timestamp_millis(first)
                .map(|x| x.to_rfc3339())
                .unwrap_or_default();
            let n = s.missing.len();
            let support = s.support.clone();
            self.raise(Raise {
                key: key(),
                severity: Severity::Warning,
                start_ms: first,
                seqs: support,
                message_zh: format!(
                    "设备 {} 的 {} 数据缺失 {n} 条，自 {first_txt} 起",
                    o.mn, o.cn
                ),
                message_en: format!(
                    "device {}: {n} {} record(s) missing from {first_txt}",
                    o.mn, o.cn
                ),
            });
        } else {
            self.clear_lazy(key, o.received_ms);
        }
    }

    fn flag(&mut self, st: &mut FactorState, f: &str, flag: Option<&str>) {
        let Some(flag) = flag else {
            return;
        };
        if !self.on.flag {
            return;
        }
        let (o, t) = (self.o, self.t);
        let after = self.cfg.flag_after.0.as_millis() as i64;
        let key = || AlarmKey {
            kind: DetectorKind::FlagAbnormal,
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        if flag == "N" {
            st.flag_since = None;
            self.clear_lazy(key, t);
            return;
        }
        let (since, first_seq) = *st.flag_since.get_or_insert((t, o.seq));
        // S is a manually set value: never acceptable as measured data.
        if flag == "S" || t - since >= after {
            let mins = (t - since) / 60_000;
            self.raise(Raise {
                key: key(),
                severity: if flag == "S" {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                start_ms: since,
                seqs: vec![first_seq, o.seq],
                message_zh: format!(
                    "设备 {} 因子 {f} 数据标记为 {flag}（非正常），已持续 {mins} 分钟",
                    o.mn
                ),
                message_en: format!(
                    "device {} factor {f}: flag {flag} (not normal) for {mins} min",
                    o.mn
                ),
            });
        }
    }

    fn range(&mut self, st: &mut FactorState, f: &str, v: Decimal, fs: &Fs) {
        if !self.on.range {
            return;
        }
        let (o, t) = (self.o, self.t);
        let low = fs.min.is_some_and(|m| v < m);
        let high = fs.max.is_some_and(|m| v > m);
        if low || high {
            if !st.range_bad.contains(&o.cn) {
                st.range_bad.insert(o.cn.clone());
            }
        } else {
            st.range_bad.remove(&o.cn);
        }
        let any_bad = !st.range_bad.is_empty();
        let key = || AlarmKey {
            kind: DetectorKind::ValueRange,
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        if low || high {
            let bounds = format!(
                "[{}, {}]",
                fs.min.map_or("-".into(), |x| x.to_string()),
                fs.max.map_or("-".into(), |x| x.to_string())
            );
            self.raise(Raise {
                key: key(),
                severity: Severity::Critical,
                start_ms: t,
                seqs: vec![o.seq],
                message_zh: format!("设备 {} 因子 {f} 数值 {v} 超出合理范围 {bounds}", o.mn),
                message_en: format!(
                    "device {} factor {f}: value {v} outside plausible range {bounds}",
                    o.mn
                ),
            });
        } else if !any_bad {
            self.clear_lazy(key, t);
        }
    }

    fn stuck(&mut self, st: &mut FactorState, f: &str, v: Decimal, normal: bool, fs: &Fs) {
        if !self.on.stuck {
            return;
        }
        let (o, t) = (self.o, self.t);
        if !normal || st.stuck_value != Some(v) {
            st.stuck_value = normal.then_some(v);
            st.stuck_seqs.clear();
        }
        if normal {
            st.stuck_seqs.push_back(o.seq);
            if st.stuck_seqs.len() > MAX_SUPPORT {
                st.stuck_seqs.pop_front();
            }
        }
        let run = st.stuck_seqs.len() as u32;
        let key = || AlarmKey {
            kind: DetectorKind::ValueStuck,
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        if run >= fs.stuck_count {
            self.raise(Raise {
                key: key(),
                severity: Severity::Warning,
                start_ms: t,
                seqs: st.stuck_seqs.iter().copied().collect(),
                message_zh: format!(
                    "设备 {} 因子 {f} 数值 {v} 连续 {run} 次不变（仪器标记正常）",
                    o.mn
                ),
                message_en: format!(
                    "device {} factor {f}: value {v} unchanged for {run} consecutive samples while flagged normal",
                    o.mn
                ),
            });
        } else if run <= 1 {
            self.clear_lazy(key, t);
        }
    }

    fn spike(&mut self, st: &mut FactorState, f: &str, v: Decimal, fs: &Fs) {
        if !self.on.spike {
            return;
        }
        let (o, t) = (self.o, self.t);
        let (window, min) = (self.cfg.spike_window, self.cfg.spike_min_samples);
        let x = to_f64(v);
        let verdict = if st.window.len() >= min {
            let (med, mad) = st.window.median_mad();
            // A perfectly flat window has MAD 0; 1 % of the median (or 1e-6) keeps one
            // tiny wiggle from counting as infinitely many deviations.
            let sigma = (1.4826 * mad).max(med.abs() * 0.01).max(1e-6);
            Some(((x - med).abs() / sigma, med))
        } else {
            None
        };
        st.window.push(x, window);
        let key = || AlarmKey {
            kind: DetectorKind::ValueSpike,
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        match verdict {
            Some((z, med)) if z > fs.spike_k => {
                // Spikes stay out of the window's statistics only by being robust
                // (median/MAD), not by exclusion: a real level change becomes normal.
                self.raise(Raise {
                    key: key(),
                    severity: Severity::Warning,
                    start_ms: t,
                    seqs: vec![o.seq],
                    message_zh: format!(
                        "设备 {} 因子 {f} 数值 {v} 突变：偏离中位数 {med:.3} 达 {z:.1} 倍稳健标准差",
                        o.mn
                    ),
                    message_en: format!(
                        "device {} factor {f}: spike {v}, {z:.1} robust deviations from median {med:.3}",
                        o.mn
                    ),
                });
            }
            Some(_) => self.clear_lazy(key, t),
            None => {}
        }
    }

    fn hugging(&mut self, st: &mut FactorState, f: &str, v: Decimal, fs: &Fs) {
        let Some(limit) = fs.limit else { return };
        if !self.on.hugging {
            return;
        }
        let (o, t) = (self.o, self.t);
        let (n, frac) = (self.cfg.hugging_window, self.cfg.hugging_fraction);
        let low = limit - limit * self.decimals.hugging_band / Decimal::ONE_HUNDRED;
        st.hug.push_back((v, o.seq));
        if st.hug.len() > n {
            st.hug.pop_front();
        }
        let is_near = |x: &Decimal| *x >= low && *x <= limit;
        let k = st.hug.iter().filter(|(x, _)| is_near(x)).count();
        let full = st.hug.len() >= n;
        let share = k as f64 / n as f64;
        let key = || AlarmKey {
            kind: DetectorKind::LimitHugging,
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        if full && share >= frac {
            let pct = self.cfg.hugging_band;
            let near: Vec<u64> = st
                .hug
                .iter()
                .filter(|(x, _)| is_near(x))
                .map(|(_, s)| *s)
                .collect();
            self.raise(Raise {
                key: key(),
                severity: Severity::Critical,
                start_ms: t,
                seqs: near.into_iter().rev().take(MAX_SUPPORT).rev().collect(),
                message_zh: format!(
                    "设备 {} 因子 {f} 最近 {n} 个数据中有 {k} 个紧贴排放限值 {limit} 以下 {pct}% 以内（疑似造假）",
                    o.mn
                ),
                message_en: format!(
                    "device {} factor {f}: {k} of the last {n} samples within {pct} % below the limit {limit} (possible falsification)",
                    o.mn
                ),
            });
        } else if share < frac / 2.0 {
            // Hysteresis: clearing at half the raising share keeps a series that
            // hovers around the threshold from flapping.
            self.clear_lazy(key, t);
        }
    }

    fn mismatch(
        &mut self,
        st: &mut FactorState,
        f: &str,
        vals: Factor<'_>,
        c: Decimal,
        suffix: &str,
        reference: Option<Decimal>,
    ) {
        let (o, t) = (self.o, self.t);
        let zs_suffix = if suffix == "Rtd" { "ZsRtd" } else { "ZsAvg" };
        let Some(zs) = vals.num(zs_suffix) else {
            return;
        };
        let Some(reference) = reference else {
            return;
        };
        let Some(o2) = o.num(O2, suffix) else { return };
        if !self.on.mismatch {
            return;
        }
        let twenty_one = Decimal::from(21);
        if o2 >= twenty_one {
            return; // no conversion exists at 21 % O2 (and value.range reports O2 > 25)
        }
        // HJ 75: Cz = C x (21 - O2ref) / (21 - O2).
        let Some(expected) = c
            .checked_mul(twenty_one - reference)
            .and_then(|x| x.checked_div(twenty_one - o2))
        else {
            return;
        };
        let diff = (zs - expected).abs();
        let tol = (expected.abs() * self.decimals.mismatch_tolerance / Decimal::ONE_HUNDRED)
            .max(self.decimals.mismatch_abs);
        let key = || AlarmKey {
            kind: DetectorKind::ConvertedMismatch,
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        if diff > tol {
            if !st.mismatch_bad.contains(&o.cn) {
                st.mismatch_bad.insert(o.cn.clone());
            }
        } else {
            st.mismatch_bad.remove(&o.cn);
        }
        let any_bad = !st.mismatch_bad.is_empty();
        if diff > tol {
            let e = expected.round_dp(3);
            self.raise(Raise {
                key: key(),
                severity: Severity::Critical,
                start_ms: t,
                seqs: vec![o.seq],
                message_zh: format!(
                    "设备 {} 因子 {f} 折算值 {zs} 与实测值 {c}、含氧量 {o2}%（基准 {reference}%）计算值 {e} 不符",
                    o.mn
                ),
                message_en: format!(
                    "device {} factor {f}: converted {zs} does not follow from measured {c} at O2 {o2} % (reference {reference} %): expected {e}",
                    o.mn
                ),
            });
        } else if !any_bad {
            self.clear_lazy(key, t);
        }
    }
}

/// Builds an observation by hand (tests, benches): `values` as `(factor, suffix, text)`
/// where numbers are given as decimal text.
pub fn obs(seq: u64, mn: &str, cn: &str, at_ms: i64, values: &[(&str, &str, &str)]) -> Obs {
    let mut map = Values::default();
    for (f, s, v) in values {
        let val = match Decimal::from_str(v) {
            Ok(d) if *s != "Flag" => Val::Num(d),
            _ => Val::Text(ShortText::new(v)),
        };
        map.insert(f, s, val);
    }
    Obs {
        seq,
        received_ms: at_ms,
        mn: mn.to_owned(),
        cn: cn.to_owned(),
        data_time_ms: Some(at_ms),
        values: map,
        ..Obs::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DeviceAlarms};

    const MN: &str = "MN01";
    const T0: i64 = 1_780_000_000_000;

    fn cfg() -> AlarmsSection {
        Config::parse("", std::path::Path::new("t")).unwrap().alarms
    }

    fn kinds(ev: &[AlarmEvent]) -> Vec<(String, &'static str, String)> {
        ev.iter()
            .map(|e| match e {
                AlarmEvent::Raise(r) => ("raise".into(), r.key.kind.as_str(), r.key.factor.clone()),
                AlarmEvent::Clear { key, .. } => {
                    ("clear".into(), key.kind.as_str(), key.factor.clone())
                }
            })
            .collect()
    }

    fn has(ev: &[AlarmEvent], what: &str, kind: &str) -> bool {
        kinds(ev).iter().any(|(w, k, _)| w == what && *k == kind)
    }

    /// Feeds 2011 frames every 30 s with one factor; returns all events.
    fn rtd_series(e: &mut Engine, start_seq: u64, vals: &[(&str, &str)]) -> Vec<AlarmEvent> {
        let mut out = Vec::new();
        for (i, (v, flag)) in vals.iter().enumerate() {
            let seq = start_seq + i as u64;
            let o = obs(
                seq,
                MN,
                "2011",
                T0 + seq as i64 * 30_000,
                &[("a21026", "Rtd", v), ("a21026", "Flag", flag)],
            );
            out.extend(e.observe(&o));
        }
        out
    }

    /// An observation of a registered device.
    fn registered(mut o: Obs) -> Obs {
        o.registered = true;
        o
    }

    #[test]
    fn offline_raises_after_learned_interval_and_clears() {
        let mut e = Engine::new(cfg());
        for i in 0..6 {
            e.observe(&registered(obs(i, MN, "2011", T0 + i as i64 * 60_000, &[])));
        }
        let last = T0 + 5 * 60_000;
        assert!(e.tick(last + 170_000).is_empty(), "3 x 60 s not yet passed");
        let ev = e.tick(last + 181_000);
        assert!(has(&ev, "raise", "device.offline"));
        assert!(e.tick(last + 300_000).is_empty(), "one raise only");
        let ev = e.observe(&registered(obs(9, MN, "2011", last + 400_000, &[])));
        assert!(has(&ev, "clear", "device.offline"));
    }

    #[test]
    fn unregistered_devices_are_never_offline_unless_configured() {
        let mut c = cfg();
        c.device
            .insert("CONFIGURED".into(), DeviceAlarms::default());
        let mut e = Engine::new(c);
        for (i, mn) in ["STRANGER", "CONFIGURED"].into_iter().enumerate() {
            e.observe(&obs(i as u64, mn, "2011", T0, &[]));
        }
        let ev = e.tick(T0 + 86_400_000);
        let offline: Vec<&str> = ev
            .iter()
            .map(|x| x.key())
            .filter(|k| k.kind == DetectorKind::DeviceOffline)
            .map(|k| k.mn.as_str())
            .collect();
        assert_eq!(offline, ["CONFIGURED"], "{ev:?}");
        assert_eq!(e.tracked(), (1, 1));
    }

    #[test]
    fn unregistered_devices_beyond_the_cap_are_forgotten_oldest_first() {
        let mut c = cfg();
        c.max_unregistered_devices = 2;
        let mut e = Engine::new(c);
        // A registered device and three strangers; the first stranger raises an alarm.
        e.observe(&registered(obs(
            1,
            MN,
            "2011",
            T0,
            &[("w01001", "Rtd", "15")],
        )));
        let ev = e.observe(&obs(2, "S1", "2011", T0, &[("w01001", "Rtd", "15")]));
        assert!(has(&ev, "raise", "value.range"));
        e.observe(&obs(3, "S2", "2011", T0, &[]));
        // S1 is heard again: S2 is now the oldest.
        e.observe(&obs(4, "S1", "2011", T0 + 1000, &[("w01001", "Rtd", "15")]));
        let ev = e.observe(&obs(5, "S3", "2011", T0 + 2000, &[]));
        assert!(ev.is_empty(), "S2 had no alarm to end: {ev:?}");
        assert_eq!(e.tracked(), (1, 2));
        assert_eq!(e.evicted(), 1);
        // S4 pushes S1 out, and S1's alarm ends with it: nothing stays active for
        // a device the engine no longer watches.
        let ev = e.observe(&obs(6, "S4", "2011", T0 + 3000, &[]));
        assert_eq!(
            ev,
            vec![AlarmEvent::Clear {
                key: AlarmKey {
                    kind: DetectorKind::ValueRange,
                    mn: "S1".into(),
                    factor: "w01001".into(),
                },
                end_ms: T0 + 3000,
                seq: None,
            }]
        );
        assert_eq!(e.active().filter(|k| k.mn == "S1").count(), 0);
        assert_eq!(e.active().filter(|k| k.mn == MN).count(), 1, "kept");
        assert_eq!(e.tracked(), (1, 2));
        assert_eq!(e.evicted(), 2);
    }

    /// The division fast path gives the bits reading the text gives, for
    /// device-like values, both signs of zero, the edges of the fast path
    /// (mantissa 2^53, scale 22) and the decimals beyond it.
    #[test]
    fn to_f64_is_the_decimal_text_read_as_f64() {
        let mut cases: Vec<Decimal> = [
            "0",
            "-0",
            "-0.000",
            "1",
            "-1",
            "0.1",
            "0.3",
            "123.456",
            "-98.7654321",
            "9007199254740992",
            "9007199254740993",
            "-9007199254740992.5",
            "0.0000000000000000000000001",
            "1.2345678901234567890123456789",
            "79228162514264337593543950335",
            "-79228162514264337593543950335",
            "0.9999999999999999999999999999",
            "4503599627370497.5",
        ]
        .iter()
        .map(|t| Decimal::from_str(t).expect(t))
        .collect();
        // Negative zeros of every scale.
        for scale in 0..=28 {
            let mut z = Decimal::new(0, scale);
            z.set_sign_negative(true);
            cases.push(z);
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mantissas around 2^53 and below, every scale 0..=28, both signs.
            let m = match x % 4 {
                0 => (x >> 8) % 100_000,
                1 => (x >> 4) & ((1 << 53) - 1),
                2 => (1 << 53) - 2 + (x >> 60),
                _ => x >> 1,
            };
            let mut d = Decimal::from_i128_with_scale(m as i128, ((x >> 40) % 29) as u32);
            d.set_sign_negative(x & 1 == 1);
            cases.push(d);
        }
        for d in cases {
            assert_eq!(
                to_f64(d).to_bits(),
                to_f64_by_text(d).to_bits(),
                "{d} (mantissa {}, scale {})",
                d.mantissa(),
                d.scale()
            );
        }
    }

    /// The cursor gives each code its own state, as the binary search alone did:
    /// codes inserted between known ones, codes left out, codes out of order,
    /// and the cap reached partway through an observation.
    #[test]
    fn the_factor_cursor_finds_each_codes_own_state() {
        // Each state is tagged with its code's number when created.
        let tag = |c: &str| c.bytes().fold(0i64, |h, b| h * 131 + i64::from(b));
        let walk = |d: &mut DeviceState, codes: &[&str], cap: usize| -> usize {
            let mut next = 0;
            let mut refused = 0;
            for c in codes {
                match d.factor(c, cap, &mut next) {
                    Some(st) => {
                        let (t, _) = *st.flag_since.get_or_insert((tag(c), 0));
                        assert_eq!(t, tag(c), "{c} got another code's state");
                    }
                    None => refused += 1,
                }
            }
            assert!(d.factors.len() <= cap);
            assert!(
                d.factors
                    .windows(2)
                    .all(|w| w[0].0.as_bytes() < w[1].0.as_bytes()),
                "sorted, unique"
            );
            refused
        };
        let mut d = DeviceState::default();
        assert_eq!(walk(&mut d, &["b", "d"], 6), 0);
        assert_eq!(walk(&mut d, &["a", "b", "c", "d", "e"], 6), 0);
        assert_eq!(walk(&mut d, &["b", "e"], 6), 0);
        assert_eq!(walk(&mut d, &["e", "a", "c"], 6), 0);
        assert_eq!(
            walk(&mut d, &["a", "b", "c", "d", "e", "f", "g", "h"], 6),
            2
        );
        assert_eq!(d.factors.len(), 6);
        let mut x = 7u64;
        let pool = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        for _ in 0..2_000 {
            let mut codes = Vec::new();
            for c in pool {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if x >> 62 != 0 {
                    codes.push(c);
                }
            }
            if x & 1 == 1 {
                codes.reverse();
            }
            walk(&mut d, &codes, 8);
        }
        assert_eq!(d.factors.len(), 8);
    }

    /// A device inventing a new factor code in every frame keeps at most
    /// `max_factors_per_device` factors' state; the factors it has are still
    /// judged, the rest counted.
    #[test]
    fn factors_per_device_stay_within_the_cap() {
        let mut c = cfg();
        c.max_factors_per_device = 3;
        let mut e = Engine::new(c);
        e.observe(&registered(obs(
            1,
            MN,
            "2011",
            T0,
            &[("w01001", "Rtd", "7")],
        )));
        for i in 0..50u64 {
            let code = format!("x{i:05}");
            e.observe(&registered(obs(
                2 + i,
                MN,
                "2011",
                T0 + i as i64 * 1000,
                &[(code.as_str(), "Rtd", "1")],
            )));
        }
        assert_eq!(e.devices[MN].factors.len(), 3);
        assert_eq!(e.untracked_factors(), 48);
        let ev = e.observe(&registered(obs(
            100,
            MN,
            "2011",
            T0 + 60_000,
            &[("w01001", "Rtd", "15")],
        )));
        assert!(has(&ev, "raise", "value.range"), "{ev:?}");
    }

    /// Bounded property: thousands of observations for random MNs (some
    /// registered, a few repeating) never leave more unregistered state than the
    /// cap, never evict a registered device, and never raise `device.offline`
    /// for an unregistered one.
    #[test]
    fn state_for_random_mns_stays_within_the_cap() {
        const CAP: usize = 50;
        let mut c = cfg();
        c.max_unregistered_devices = CAP;
        let mut e = Engine::new(c);
        let mut n = Noise::new(18);
        let mut reg = std::collections::BTreeSet::new();
        let mut events = Vec::new();
        for i in 0..4000u64 {
            let r = (n.uniform() * 1e9) as u64;
            // One in ten from a pool of 20 registered devices, the rest from a
            // large pool of invented MNs (so some repeat).
            let (mn, registered) = if r % 10 == 0 {
                (format!("REG{:02}", (r / 10) % 20), true)
            } else {
                (format!("X{:08}", r % 100_000), false)
            };
            let t = T0 + i as i64 * 1000;
            let v = format!("{}", r % 40);
            let mut o = obs(
                i,
                &mn,
                ["2011", "2051", "2061"][(r % 3) as usize],
                t,
                &[
                    ("w01001", "Rtd", &v),
                    ("w01001", "Avg", &v),
                    ("a21026", "Flag", ["N", "D", "S"][(r % 3) as usize]),
                ],
            );
            o.registered = registered;
            if registered {
                reg.insert(mn.clone());
            }
            events.extend(e.observe(&o));
            if i % 100 == 0 {
                events.extend(e.tick(t + 3_600_000));
            }
            let (known, unregistered) = e.tracked();
            assert!(unregistered <= CAP, "{unregistered} > {CAP} after {i}");
            assert_eq!(known, reg.len(), "registered devices are never forgotten");
        }
        assert!(e.evicted() > 1000, "the flood churned: {}", e.evicted());
        for ev in &events {
            if ev.key().kind == DetectorKind::DeviceOffline {
                assert!(ev.key().mn.starts_with("REG"), "{ev:?}");
            }
        }
        // Every alarm still active is of a device the engine still tracks.
        let active_mns: std::collections::BTreeSet<&str> =
            e.active().map(|k| k.mn.as_str()).collect();
        assert!(active_mns.len() <= CAP + reg.len(), "{}", active_mns.len());
    }

    #[test]
    fn video_devices_get_only_offline() {
        let mut e = Engine::new(cfg());
        let mut o = registered(obs(
            1,
            MN,
            "2011",
            T0,
            &[("a21026", "Rtd", "-5"), ("a21026", "Flag", "S")],
        ));
        o.video = true;
        assert!(e.observe(&o).is_empty());
        let ev = e.tick(T0 + 601_000);
        assert!(
            has(&ev, "raise", "device.offline"),
            "default 10 min for video"
        );
    }

    #[test]
    fn gap_raises_when_later_record_arrives_and_clears_on_backfill() {
        let mut e = Engine::new(cfg());
        let m = |seq: u64, minute: i64| obs(seq, MN, "2051", T0 + minute * 60_000, &[]);
        assert!(e.observe(&m(1, 0)).is_empty());
        assert!(e.observe(&m(2, 1)).is_empty());
        let ev = e.observe(&m(3, 4));
        assert!(has(&ev, "raise", "data.gap"), "{ev:?}");
        assert!(e.observe(&m(4, 2)).is_empty(), "still one missing");
        let ev = e.observe(&m(5, 3));
        assert!(has(&ev, "clear", "data.gap"));
        // Hour data are their own series.
        let h = |seq, hour: i64| obs(seq, MN, "2061", T0 + hour * 3_600_000, &[]);
        e.observe(&h(6, 0));
        e.observe(&h(7, 1));
        assert!(has(&e.observe(&h(8, 3)), "raise", "data.gap"));
    }

    /// Minute data every 10 minutes (a common `MinInterval`) is a series
    /// with a 10-minute step, not one with nine missing minutes per record;
    /// a skipped 10-minute record is still a gap.
    #[test]
    fn minute_data_on_a_ten_minute_interval_has_no_gap_until_one_is_skipped() {
        let mut e = Engine::new(cfg());
        let m = |seq: u64, minute: i64| obs(seq, MN, "2051", T0 + minute * 60_000, &[]);
        for (seq, minute) in [(1, 0), (2, 10), (3, 20), (4, 30), (5, 40)] {
            let ev = e.observe(&m(seq, minute));
            assert!(!has(&ev, "raise", "data.gap"), "minute {minute}: {ev:?}");
        }
        let ev = e.observe(&m(6, 60));
        assert!(has(&ev, "raise", "data.gap"), "{ev:?}");
        assert!(has(&e.observe(&m(7, 50)), "clear", "data.gap"));
    }

    #[test]
    fn skew_needs_persistence_and_clears() {
        let mut e = Engine::new(cfg());
        let skewed = |seq: u64| {
            let mut o = obs(seq, MN, "2011", T0 + seq as i64 * 30_000, &[]);
            o.data_time_ms = Some(o.received_ms - 600_000);
            o
        };
        assert!(e.observe(&skewed(1)).is_empty());
        assert!(e.observe(&skewed(2)).is_empty());
        assert!(has(&e.observe(&skewed(3)), "raise", "time.skew"));
        assert!(e.observe(&skewed(4)).is_empty());
        let mut out = Vec::new();
        for s in 5..8 {
            out.extend(e.observe(&obs(s, MN, "2011", T0 + s as i64 * 30_000, &[])));
        }
        assert_eq!(
            kinds(&out),
            vec![("clear".into(), "time.skew", String::new())]
        );
        // time.future findings count too.
        for s in 8..11 {
            let mut o = obs(s, MN, "2011", T0 + s as i64 * 30_000, &[]);
            o.findings = vec!["time.future".into()];
            out.extend(e.observe(&o));
        }
        assert!(has(&out, "raise", "time.skew"));
    }

    #[test]
    fn stuck_needs_normal_flag_and_clears_on_change() {
        let mut c = cfg();
        c.stuck_count = 5;
        let mut e = Engine::new(c);
        let ev = rtd_series(&mut e, 1, &[("12.5", "N"); 4]);
        assert!(ev.is_empty());
        let ev = rtd_series(&mut e, 5, &[("12.50", "N")]);
        assert!(has(&ev, "raise", "value.stuck"), "12.50 == 12.5");
        let ev = rtd_series(&mut e, 6, &[("12.6", "N")]);
        assert!(has(&ev, "clear", "value.stuck"));
        // Flag M (maintenance) values may well be constant: not stuck.
        let mut e = Engine::new(cfg());
        let ev = rtd_series(&mut e, 1, &[("3", "M"); 40]);
        assert!(!has(&ev, "raise", "value.stuck"));
    }

    #[test]
    fn range_defaults_and_configured() {
        let mut c = cfg();
        c.factor.insert(
            "a21026".into(),
            FactorAlarms {
                max: Some(500.0),
                ..FactorAlarms::default()
            },
        );
        let mut e = Engine::new(c);
        // One real-time value of one factor.
        let rtd = |seq, code: &str, v: &str| {
            obs(seq, MN, "2011", T0 + seq as i64 * 1000, &[(code, "Rtd", v)])
        };
        for (seq, code, v, what) in [
            (1, "w01001", "14.01", "raise"),
            (2, "w01001", "7.2", "clear"),
            (3, "a19001", "25.1", "raise"),
            (4, "a19001", "9.8", "clear"),
            (5, "a21026", "-0.1", "raise"),
            (6, "a21026", "1", "clear"),
            (7, "a21026", "500.01", "raise"),
        ] {
            let events = e.observe(&rtd(seq, code, v));
            assert!(has(&events, what, "value.range"), "#{seq} {code}={v}");
        }
        // A good minute average does not clear a bad real-time value.
        let avg = obs(9, MN, "2051", T0 + 9000, &[("a21026", "Avg", "30")]);
        assert!(e.observe(&avg).is_empty());
        assert!(has(
            &e.observe(&rtd(10, "a21026", "40")),
            "clear",
            "value.range"
        ));
        // Flue-gas pressure may be negative.
        let p = obs(8, MN, "2011", T0 + 8000, &[("a01013", "Rtd", "-0.3")]);
        assert!(e.observe(&p).is_empty());
    }

    #[test]
    fn spike_median_mad() {
        let mut e = Engine::new(cfg());
        let vals: Vec<String> = (0..30).map(|i| format!("{}", 50 + (i % 5))).collect();
        let series: Vec<(&str, &str)> = vals.iter().map(|v| (v.as_str(), "N")).collect();
        assert!(rtd_series(&mut e, 1, &series).is_empty());
        let ev = rtd_series(&mut e, 31, &[("400", "N")]);
        assert!(has(&ev, "raise", "value.spike"));
        let ev = rtd_series(&mut e, 32, &[("52", "N")]);
        assert!(has(&ev, "clear", "value.spike"));
    }

    #[test]
    fn flag_abnormal_after_threshold_and_s_at_once() {
        let mut c = cfg();
        c.flag_after = crate::config::Dur(std::time::Duration::from_secs(120));
        let mut e = Engine::new(c);
        // 30 s cadence: D for 90 s is fine, 120 s raises.
        let ev = rtd_series(&mut e, 1, &[("1", "D"), ("2", "D"), ("3", "D"), ("4", "D")]);
        assert!(ev.is_empty(), "{ev:?}");
        let ev = rtd_series(&mut e, 5, &[("5", "D")]);
        assert!(has(&ev, "raise", "flag.abnormal"));
        let ev = rtd_series(&mut e, 6, &[("6", "N")]);
        assert!(has(&ev, "clear", "flag.abnormal"));
        let ev = rtd_series(&mut e, 7, &[("6", "S")]);
        assert!(has(&ev, "raise", "flag.abnormal"), "S at once");
        let ev = rtd_series(&mut e, 8, &[("7", "N")]);
        assert!(has(&ev, "clear", "flag.abnormal"));
    }

    #[test]
    fn limit_hugging() {
        let mut c = cfg();
        c.hugging_window = 10;
        c.factor.insert(
            "a21026".into(),
            FactorAlarms {
                limit: Some(100.0),
                ..FactorAlarms::default()
            },
        );
        let mut e = Engine::new(c);
        let near = [
            "97.1", "98.5", "99.9", "96.2", "98.8", "97.7", "99.1", "95.5", "98.0", "97.3",
        ];
        let series: Vec<(&str, &str)> = near.iter().map(|v| (*v, "N")).collect();
        let ev = rtd_series(&mut e, 1, &series);
        assert!(has(&ev, "raise", "limit.hugging"), "{ev:?}");
        let far: Vec<(&str, &str)> = ["60", "61", "59", "62", "58", "60", "61"]
            .iter()
            .map(|v| (*v, "N"))
            .collect();
        let ev = rtd_series(&mut e, 11, &far);
        assert!(has(&ev, "clear", "limit.hugging"));
    }

    #[test]
    fn converted_mismatch() {
        let mut c = cfg();
        c.device.insert(
            MN.into(),
            DeviceAlarms {
                reference_o2: Some(9.0),
                ..DeviceAlarms::default()
            },
        );
        let mut e = Engine::new(c);
        // C = 40, O2 = 13: Cz = 40 x 12 / 8 = 60.
        let f = |seq, zs: &str| {
            obs(
                seq,
                MN,
                "2011",
                T0 + seq as i64 * 30_000,
                &[
                    ("a21026", "Rtd", "40"),
                    ("a21026", "ZsRtd", zs),
                    ("a19001", "Rtd", "13"),
                ],
            )
        };
        assert!(e.observe(&f(1, "60.0")).is_empty());
        assert!(e.observe(&f(2, "61.9")).is_empty(), "within 5 %");
        assert!(has(&e.observe(&f(3, "40")), "raise", "converted.mismatch"));
        assert!(has(&e.observe(&f(4, "60")), "clear", "converted.mismatch"));
    }

    #[test]
    fn restored_active_set_prevents_duplicates() {
        let mut e = Engine::new(cfg());
        e.set_active([AlarmKey {
            kind: DetectorKind::ValueRange,
            mn: MN.into(),
            factor: "a21026".into(),
        }]);
        let o = obs(1, MN, "2011", T0, &[("a21026", "Rtd", "-1")]);
        assert!(e.observe(&o).is_empty());
    }

    /// Box-Muller over a tiny LCG: deterministic noise without a dependency.
    pub(crate) struct Noise(u64);
    impl Noise {
        pub(crate) fn new(seed: u64) -> Noise {
            Noise(seed)
        }
        pub(crate) fn uniform(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        pub(crate) fn normal(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    #[test]
    fn clean_flue_gas_series_raises_nothing() {
        let mut c = cfg();
        c.reference_o2 = Some(9.0);
        for (f, limit) in [("a21026", 100.0), ("a21002", 150.0), ("a34013", 20.0)] {
            c.factor.insert(
                f.into(),
                FactorAlarms {
                    limit: Some(limit),
                    ..FactorAlarms::default()
                },
            );
        }
        let mut e = Engine::new(c);
        let mut n = Noise::new(212);
        let mut events = Vec::new();
        let mut seq = 0u64;
        let mut prev: [String; 9] = Default::default();
        // 8 h: 2011 every 30 s, 2051 per minute, 2061 per hour.
        for i in 0..(8 * 120) {
            let t = T0 + i * 30_000;
            let o2 = 10.0 + 0.4 * n.normal();
            let zs = |c: f64| c * 12.0 / (21.0 - (o2 * 10.0).round() / 10.0);
            let so2 = 35.0 + 3.0 * n.normal();
            let nox = 80.0 + 6.0 * n.normal();
            let dust = 5.0 + 0.5 * n.normal();
            let temp = 120.0 + 2.0 * n.normal();
            let flow = 60.0 + 1.5 * n.normal();
            let s = [
                format!("{so2:.2}"),
                format!("{:.2}", zs((so2 * 100.0).round() / 100.0)),
                format!("{nox:.1}"),
                format!("{:.1}", zs((nox * 10.0).round() / 10.0)),
                format!("{dust:.2}"),
                format!("{:.2}", zs((dust * 100.0).round() / 100.0)),
                format!("{o2:.1}"),
                format!("{temp:.1}"),
                format!("{flow:.1}"),
            ];
            seq += 1;
            let o = obs(
                seq,
                MN,
                "2011",
                t,
                &[
                    ("a21026", "Rtd", &s[0]),
                    ("a21026", "ZsRtd", &s[1]),
                    ("a21026", "Flag", "N"),
                    ("a21002", "Rtd", &s[2]),
                    ("a21002", "ZsRtd", &s[3]),
                    ("a21002", "Flag", "N"),
                    ("a34013", "Rtd", &s[4]),
                    ("a34013", "ZsRtd", &s[5]),
                    ("a34013", "Flag", "N"),
                    ("a19001", "Rtd", &s[6]),
                    ("a19001", "Flag", "N"),
                    ("a01012", "Rtd", &s[7]),
                    ("a00000", "Rtd", &s[8]),
                ],
            );
            events.extend(e.tick(t));
            events.extend(e.observe(&o));
            if i % 2 == 1 {
                // The minute's averages of its two samples, as a logger computes
                // them (aggregate.mismatch checks them against the samples).
                let avg = |a: &str, b: &str| {
                    (a.parse::<f64>().unwrap() + b.parse::<f64>().unwrap()) / 2.0
                };
                let (so2a, o2a) = (avg(&prev[0], &s[0]), avg(&prev[6], &s[6]));
                let (so2a, o2a) = (format!("{so2a:.3}"), format!("{o2a:.2}"));
                let zsa = format!(
                    "{:.2}",
                    so2a.parse::<f64>().unwrap() * 12.0 / (21.0 - o2a.parse::<f64>().unwrap())
                );
                seq += 1;
                let m = T0 + (i - 1) * 30_000;
                events.extend(e.observe(&obs(
                    seq,
                    MN,
                    "2051",
                    m,
                    &[
                        ("a21026", "Avg", &so2a),
                        ("a21026", "ZsAvg", &zsa),
                        ("a19001", "Avg", &o2a),
                    ],
                )));
            }
            prev = s;
            if i % 120 == 119 {
                seq += 1;
                let h = T0 + (i - 119) * 30_000;
                events.extend(e.observe(&obs(seq, MN, "2061", h, &[("a21026", "Avg", "35.0")])));
            }
        }
        assert!(events.is_empty(), "false positives: {:?}", kinds(&events));
    }
}
