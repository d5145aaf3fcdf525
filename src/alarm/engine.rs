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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::str::FromStr;

use rust_decimal::Decimal;

use super::{AlarmEvent, AlarmKey, Obs, Raise, Severity, Val};
use crate::config::{AlarmsSection, FactorAlarms};

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

fn to_f64(d: Decimal) -> f64 {
    d.to_string().parse().unwrap_or(0.0)
}

#[derive(Debug, Default)]
struct FactorState {
    stuck_value: Option<Decimal>,
    stuck_seqs: VecDeque<u64>,
    window: VecDeque<f64>,
    hug: VecDeque<(Decimal, u64)>,
    flag_since: Option<(i64, u64)>,
    /// CNs whose latest sample is out of range / inconsistent. One alarm per factor
    /// covers all series: it clears only when every series is fine again, so a good
    /// minute average cannot clear (and re-raise) a bad real-time value.
    range_bad: BTreeSet<String>,
    mismatch_bad: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Series {
    step_ms: Option<i64>,
    last_ms: Option<i64>,
    missing: BTreeSet<i64>,
    support: Vec<u64>,
}

#[derive(Debug, Default)]
struct DeviceState {
    last_seen_ms: Option<i64>,
    last_seq: u64,
    video: bool,
    last_2011_dt: Option<i64>,
    intervals: VecDeque<i64>,
    skew_run: u32,
    clean_run: u32,
    skew_seqs: VecDeque<u64>,
    series: HashMap<String, Series>,
    factors: HashMap<String, FactorState>,
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

/// Detectors, their state, and the set of active alarms.
#[derive(Debug)]
pub struct Engine {
    cfg: AlarmsSection,
    devices: HashMap<String, DeviceState>,
    active: BTreeSet<AlarmKey>,
    /// `factor_settings` per MN and factor: resolving them converts up to three
    /// bounds through text into decimals, for every value of every frame otherwise.
    /// The configuration never changes for an engine's lifetime.
    settings: HashMap<String, HashMap<String, Fs>>,
    /// Active alarms per MN (the MNs of `active`), so that clearing on a device
    /// without alarms builds no key.
    active_per_mn: HashMap<String, usize>,
}

impl Engine {
    /// An engine with no history.
    pub fn new(cfg: AlarmsSection) -> Engine {
        Engine {
            cfg,
            devices: HashMap::new(),
            active: BTreeSet::new(),
            settings: HashMap::new(),
            active_per_mn: HashMap::new(),
        }
    }

    /// Replaces the set of active alarms (restored from the alarms table on restart).
    pub fn set_active(&mut self, keys: impl IntoIterator<Item = AlarmKey>) {
        self.active = keys.into_iter().collect();
        self.active_per_mn.clear();
        for k in &self.active {
            *self.active_per_mn.entry(k.mn.clone()).or_default() += 1;
        }
    }

    /// The active alarms.
    pub fn active(&self) -> impl Iterator<Item = &AlarmKey> {
        self.active.iter()
    }

    fn enabled(&self, mn: &str, kind: &str) -> bool {
        !self.cfg.disabled.iter().any(|d| d == kind)
            && !self
                .cfg
                .device
                .get(mn)
                .is_some_and(|d| d.disabled.iter().any(|x| x == kind))
    }

    fn cached_settings(&mut self, mn: &str, factor: &str) -> Fs {
        if let Some(fs) = self.settings.get(mn).and_then(|m| m.get(factor)) {
            return *fs;
        }
        let fs = self.factor_settings(mn, factor);
        self.settings
            .entry(mn.to_owned())
            .or_default()
            .insert(factor.to_owned(), fs);
        fs
    }

    fn factor_settings(&self, mn: &str, factor: &str) -> Fs {
        let empty = FactorAlarms::default();
        let g = self.cfg.factor.get(factor).unwrap_or(&empty);
        let d = self
            .cfg
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
            stuck_count: d
                .stuck_count
                .or(g.stuck_count)
                .unwrap_or(self.cfg.stuck_count),
            spike_k: d.spike_k.or(g.spike_k).unwrap_or(self.cfg.spike_k),
        }
    }

    /// Raises `key` unless it is active.
    fn raise(&mut self, out: &mut Vec<AlarmEvent>, r: Raise) {
        if self.active.insert(r.key.clone()) {
            *self.active_per_mn.entry(r.key.mn.clone()).or_default() += 1;
            out.push(AlarmEvent::Raise(r));
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
        if self.active_per_mn.contains_key(mn) {
            self.clear(out, key(), end_ms, seq);
        }
    }

    /// Clears `key` if it is active.
    fn clear(&mut self, out: &mut Vec<AlarmEvent>, key: AlarmKey, end_ms: i64, seq: Option<u64>) {
        if self.active.remove(&key) {
            if let Some(n) = self.active_per_mn.get_mut(&key.mn) {
                *n -= 1;
                if *n == 0 {
                    self.active_per_mn.remove(&key.mn);
                }
            }
            out.push(AlarmEvent::Clear { key, end_ms, seq });
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
            let mut v: Vec<i64> = d.intervals.iter().copied().collect();
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
            let Some(seen) = d.last_seen_ms else { continue };
            let limit = self.offline_threshold(mn, d);
            if now_ms - seen > limit && self.enabled(mn, "device.offline") {
                due.push((mn.clone(), seen, d.last_seq, limit));
            }
        }
        due.sort();
        for (mn, seen, seq, limit) in due {
            let secs = limit / 1000;
            self.raise(
                &mut out,
                Raise {
                    key: AlarmKey {
                        kind: "device.offline",
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
        let mn = o.mn.clone();
        if !self.devices.contains_key(&mn) {
            self.devices.insert(mn.clone(), DeviceState::default());
        }
        let d = self.devices.get_mut(&mn).expect("inserted above");
        d.video = o.video;
        d.last_seen_ms = Some(
            d.last_seen_ms
                .map_or(o.received_ms, |s| s.max(o.received_ms)),
        );
        d.last_seq = o.seq;
        let key = |kind: &'static str, factor: &str| AlarmKey {
            kind,
            mn: mn.clone(),
            factor: factor.to_owned(),
        };
        self.clear_lazy(
            &mut out,
            &o.mn,
            || key("device.offline", ""),
            o.received_ms,
            Some(o.seq),
        );
        if o.video || o.duplicate {
            // Video gateways only get offline/heartbeat checks; a retransmission
            // carries no new sample (counting it would fake a stuck value).
            return out;
        }
        let t = o.data_time_ms.unwrap_or(o.received_ms);
        if o.cn == "2011" {
            self.learn_cadence(&mn, o);
            self.time_skew(&mut out, o);
        }
        if matches!(o.cn.as_str(), "2051" | "2061" | "2031") {
            self.data_gap(&mut out, o);
        }
        let suffix = if o.cn == "2011" { "Rtd" } else { "Avg" };
        let factors: Vec<String> = o.values.keys().cloned().collect();
        for f in &factors {
            let Some(v) = o.num(f, suffix) else {
                // A flag without a value still counts for flag.abnormal.
                self.flag(&mut out, o, f, t);
                continue;
            };
            let fs = self.cached_settings(&mn, f);
            self.flag(&mut out, o, f, t);
            self.range(&mut out, o, f, v, &fs, t);
            if o.cn == "2011" {
                let normal = o.text(f, "Flag").is_none_or(|x| x == "N");
                self.stuck(&mut out, o, f, v, normal, &fs, t);
                self.spike(&mut out, o, f, v, &fs, t);
                let hv = o.num(f, "ZsRtd").unwrap_or(v);
                self.hugging(&mut out, o, f, hv, &fs, t);
            }
            self.mismatch(&mut out, o, f, v, suffix, t);
        }
        out
    }

    fn learn_cadence(&mut self, mn: &str, o: &Obs) {
        let Some(dt) = o.data_time_ms else { return };
        let d = self.devices.get_mut(mn).expect("device exists");
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

    fn time_skew(&mut self, out: &mut Vec<AlarmEvent>, o: &Obs) {
        if !self.enabled(&o.mn, "time.skew") {
            return;
        }
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
        let d = self.devices.get_mut(&o.mn).expect("device exists");
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
        let seqs: Vec<u64> = d.skew_seqs.iter().copied().collect();
        let key = || AlarmKey {
            kind: "time.skew",
            mn: o.mn.clone(),
            factor: String::new(),
        };
        if run >= n {
            let s = diff.unwrap_or(0) / 1000;
            self.raise(
                out,
                Raise {
                    key: key(),
                    severity: Severity::Warning,
                    start_ms: o.received_ms,
                    seqs,
                    message_zh: format!(
                        "设备 {} 时钟偏差：连续 {run} 条实时数据的数据时间与接收时间相差 {s} 秒",
                        o.mn
                    ),
                    message_en: format!(
                        "device {} clock skew: {run} consecutive real-time frames, receive time minus DataTime {s} s",
                        o.mn
                    ),
                },
            );
        } else if clean >= n {
            self.clear_lazy(out, &o.mn, key, o.received_ms, Some(o.seq));
        }
    }

    fn data_gap(&mut self, out: &mut Vec<AlarmEvent>, o: &Obs) {
        let Some(t) = o.data_time_ms else { return };
        if !self.enabled(&o.mn, "data.gap") {
            return;
        }
        let nominal: i64 = match o.cn.as_str() {
            "2051" => 60_000,
            "2061" => 3_600_000,
            _ => 86_400_000,
        };
        let d = self.devices.get_mut(&o.mn).expect("device exists");
        let s = d.series.entry(o.cn.clone()).or_default();
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
        let missing: Vec<i64> = s.missing.iter().copied().collect();
        let support = s.support.clone();
        let key = || AlarmKey {
            kind: "data.gap",
            mn: o.mn.clone(),
            factor: o.cn.clone(),
        };
        if let Some(first) = missing.first() {
            let first_txt = chrono::DateTime::from_timestamp_millis(*first)
                .map(|x| x.to_rfc3339())
                .unwrap_or_default();
            let n = missing.len();
            self.raise(
                out,
                Raise {
                    key: key(),
                    severity: Severity::Warning,
                    start_ms: *first,
                    seqs: support,
                    message_zh: format!(
                        "设备 {} 的 {} 数据缺失 {n} 条，自 {first_txt} 起",
                        o.mn, o.cn
                    ),
                    message_en: format!(
                        "device {}: {n} {} record(s) missing from {first_txt}",
                        o.mn, o.cn
                    ),
                },
            );
        } else {
            self.clear_lazy(out, &o.mn, key, o.received_ms, Some(o.seq));
        }
    }

    fn fstate(&mut self, mn: &str, f: &str) -> &mut FactorState {
        let factors = &mut self.devices.get_mut(mn).expect("device exists").factors;
        // Looked up several times per value: no key allocation once the factor is known.
        if !factors.contains_key(f) {
            factors.insert(f.to_owned(), FactorState::default());
        }
        factors.get_mut(f).expect("inserted above")
    }

    fn flag(&mut self, out: &mut Vec<AlarmEvent>, o: &Obs, f: &str, t: i64) {
        let Some(flag) = o.text(f, "Flag") else {
            return;
        };
        if !self.enabled(&o.mn, "flag.abnormal") {
            return;
        }
        let after = self.cfg.flag_after.0.as_millis() as i64;
        let st = self.fstate(&o.mn, f);
        let key = || AlarmKey {
            kind: "flag.abnormal",
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        if flag == "N" {
            st.flag_since = None;
            self.clear_lazy(out, &o.mn, key, t, Some(o.seq));
            return;
        }
        let (since, first_seq) = *st.flag_since.get_or_insert((t, o.seq));
        // S is a manually set value: never acceptable as measured data.
        if flag == "S" || t - since >= after {
            let mins = (t - since) / 60_000;
            self.raise(
                out,
                Raise {
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
                },
            );
        }
    }

    fn range(&mut self, out: &mut Vec<AlarmEvent>, o: &Obs, f: &str, v: Decimal, fs: &Fs, t: i64) {
        if !self.enabled(&o.mn, "value.range") {
            return;
        }
        let low = fs.min.is_some_and(|m| v < m);
        let high = fs.max.is_some_and(|m| v > m);
        let st = self.fstate(&o.mn, f);
        if low || high {
            st.range_bad.insert(o.cn.clone());
        } else {
            st.range_bad.remove(&o.cn);
        }
        let any_bad = !st.range_bad.is_empty();
        let key = || AlarmKey {
            kind: "value.range",
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        if low || high {
            let bounds = format!(
                "[{}, {}]",
                fs.min.map_or("-".into(), |x| x.to_string()),
                fs.max.map_or("-".into(), |x| x.to_string())
            );
            self.raise(
                out,
                Raise {
                    key: key(),
                    severity: Severity::Critical,
                    start_ms: t,
                    seqs: vec![o.seq],
                    message_zh: format!("设备 {} 因子 {f} 数值 {v} 超出合理范围 {bounds}", o.mn),
                    message_en: format!(
                        "device {} factor {f}: value {v} outside plausible range {bounds}",
                        o.mn
                    ),
                },
            );
        } else if !any_bad {
            self.clear_lazy(out, &o.mn, key, t, Some(o.seq));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn stuck(
        &mut self,
        out: &mut Vec<AlarmEvent>,
        o: &Obs,
        f: &str,
        v: Decimal,
        normal: bool,
        fs: &Fs,
        t: i64,
    ) {
        if !self.enabled(&o.mn, "value.stuck") {
            return;
        }
        let st = self.fstate(&o.mn, f);
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
        let seqs: Vec<u64> = st.stuck_seqs.iter().copied().collect();
        let key = || AlarmKey {
            kind: "value.stuck",
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        if run >= fs.stuck_count {
            self.raise(
                out,
                Raise {
                    key: key(),
                    severity: Severity::Warning,
                    start_ms: t,
                    seqs,
                    message_zh: format!(
                        "设备 {} 因子 {f} 数值 {v} 连续 {run} 次不变（仪器标记正常）",
                        o.mn
                    ),
                    message_en: format!(
                        "device {} factor {f}: value {v} unchanged for {run} consecutive samples while flagged normal",
                        o.mn
                    ),
                },
            );
        } else if run <= 1 {
            self.clear_lazy(out, &o.mn, key, t, Some(o.seq));
        }
    }

    fn spike(&mut self, out: &mut Vec<AlarmEvent>, o: &Obs, f: &str, v: Decimal, fs: &Fs, t: i64) {
        if !self.enabled(&o.mn, "value.spike") {
            return;
        }
        let (window, min) = (self.cfg.spike_window, self.cfg.spike_min_samples);
        let x = to_f64(v);
        let st = self.fstate(&o.mn, f);
        let verdict = if st.window.len() >= min {
            let mut w: Vec<f64> = st.window.iter().copied().collect();
            let med = median(&mut w);
            let mut dev: Vec<f64> = w.iter().map(|y| (y - med).abs()).collect();
            let mad = median(&mut dev);
            // A perfectly flat window has MAD 0; 1 % of the median (or 1e-6) keeps one
            // tiny wiggle from counting as infinitely many deviations.
            let sigma = (1.4826 * mad).max(med.abs() * 0.01).max(1e-6);
            Some(((x - med).abs() / sigma, med))
        } else {
            None
        };
        st.window.push_back(x);
        if st.window.len() > window {
            st.window.pop_front();
        }
        let key = || AlarmKey {
            kind: "value.spike",
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        match verdict {
            Some((z, med)) if z > fs.spike_k => {
                // Spikes stay out of the window's statistics only by being robust
                // (median/MAD), not by exclusion: a real level change becomes normal.
                self.raise(
                    out,
                    Raise {
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
                    },
                );
            }
            Some(_) => self.clear_lazy(out, &o.mn, key, t, Some(o.seq)),
            None => {}
        }
    }

    fn hugging(
        &mut self,
        out: &mut Vec<AlarmEvent>,
        o: &Obs,
        f: &str,
        v: Decimal,
        fs: &Fs,
        t: i64,
    ) {
        let Some(limit) = fs.limit else { return };
        if !self.enabled(&o.mn, "limit.hugging") {
            return;
        }
        let (n, frac) = (self.cfg.hugging_window, self.cfg.hugging_fraction);
        let low = limit - limit * dec(self.cfg.hugging_band) / Decimal::ONE_HUNDRED;
        let st = self.fstate(&o.mn, f);
        st.hug.push_back((v, o.seq));
        if st.hug.len() > n {
            st.hug.pop_front();
        }
        let near: Vec<u64> = st
            .hug
            .iter()
            .filter(|(x, _)| *x >= low && *x <= limit)
            .map(|(_, s)| *s)
            .collect();
        let full = st.hug.len() >= n;
        let share = near.len() as f64 / n as f64;
        let key = || AlarmKey {
            kind: "limit.hugging",
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        if full && share >= frac {
            let (k, pct) = (near.len(), self.cfg.hugging_band);
            self.raise(
                out,
                Raise {
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
                },
            );
        } else if share < frac / 2.0 {
            // Hysteresis: clearing at half the raising share keeps a series that
            // hovers around the threshold from flapping.
            self.clear_lazy(out, &o.mn, key, t, Some(o.seq));
        }
    }

    fn mismatch(
        &mut self,
        out: &mut Vec<AlarmEvent>,
        o: &Obs,
        f: &str,
        c: Decimal,
        suffix: &str,
        t: i64,
    ) {
        let zs_suffix = if suffix == "Rtd" { "ZsRtd" } else { "ZsAvg" };
        let Some(zs) = o.num(f, zs_suffix) else {
            return;
        };
        let Some(o2) = o.num(O2, suffix) else { return };
        let reference = self
            .cfg
            .device
            .get(&o.mn)
            .and_then(|d| d.reference_o2)
            .or(self.cfg.reference_o2);
        let Some(reference) = reference.map(dec) else {
            return;
        };
        if !self.enabled(&o.mn, "converted.mismatch") {
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
        let tol = (expected.abs() * dec(self.cfg.mismatch_tolerance) / Decimal::ONE_HUNDRED)
            .max(dec(self.cfg.mismatch_abs));
        let key = || AlarmKey {
            kind: "converted.mismatch",
            mn: o.mn.clone(),
            factor: f.to_owned(),
        };
        let st = self.fstate(&o.mn, f);
        if diff > tol {
            st.mismatch_bad.insert(o.cn.clone());
        } else {
            st.mismatch_bad.remove(&o.cn);
        }
        let any_bad = !st.mismatch_bad.is_empty();
        if diff > tol {
            let e = expected.round_dp(3);
            self.raise(
                out,
                Raise {
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
                },
            );
        } else if !any_bad {
            self.clear_lazy(out, &o.mn, key, t, Some(o.seq));
        }
    }
}

/// Runs for every value of every frame: selection (linear) rather than a full sort.
fn median(v: &mut [f64]) -> f64 {
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    let (below, &mut upper, _) = v.select_nth_unstable_by(n / 2, f64::total_cmp);
    if n % 2 == 1 {
        upper
    } else {
        // The lower middle is the largest of the elements placed before the upper one.
        let lower = below
            .iter()
            .copied()
            .max_by(f64::total_cmp)
            .unwrap_or(upper);
        (lower + upper) / 2.0
    }
}

/// Builds an observation by hand (tests, benches): `values` as `(factor, suffix, text)`
/// where numbers are given as decimal text.
pub fn obs(seq: u64, mn: &str, cn: &str, at_ms: i64, values: &[(&str, &str, &str)]) -> Obs {
    let mut map: BTreeMap<String, BTreeMap<String, Val>> = BTreeMap::new();
    for (f, s, v) in values {
        let val = match Decimal::from_str(v) {
            Ok(d) if *s != "Flag" => Val::Num(d),
            _ => Val::Text((*v).to_owned()),
        };
        map.entry((*f).to_owned())
            .or_default()
            .insert((*s).to_owned(), val);
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
                AlarmEvent::Raise(r) => ("raise".into(), r.key.kind, r.key.factor.clone()),
                AlarmEvent::Clear { key, .. } => ("clear".into(), key.kind, key.factor.clone()),
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

    #[test]
    fn offline_raises_after_learned_interval_and_clears() {
        let mut e = Engine::new(cfg());
        for i in 0..6 {
            e.observe(&obs(i, MN, "2011", T0 + i as i64 * 60_000, &[]));
        }
        let last = T0 + 5 * 60_000;
        assert!(e.tick(last + 170_000).is_empty(), "3 x 60 s not yet passed");
        let ev = e.tick(last + 181_000);
        assert!(has(&ev, "raise", "device.offline"));
        assert!(e.tick(last + 300_000).is_empty(), "one raise only");
        let ev = e.observe(&obs(9, MN, "2011", last + 400_000, &[]));
        assert!(has(&ev, "clear", "device.offline"));
    }

    #[test]
    fn video_devices_get_only_offline() {
        let mut e = Engine::new(cfg());
        let mut o = obs(
            1,
            MN,
            "2011",
            T0,
            &[("a21026", "Rtd", "-5"), ("a21026", "Flag", "S")],
        );
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
            kind: "value.range",
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
        fn uniform(&mut self) -> f64 {
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
                seq += 1;
                let m = T0 + (i - 1) * 30_000;
                events.extend(e.observe(&obs(
                    seq,
                    MN,
                    "2051",
                    m,
                    &[
                        ("a21026", "Avg", &s[0]),
                        ("a21026", "ZsAvg", &s[1]),
                        ("a19001", "Avg", &s[6]),
                    ],
                )));
            }
            if i % 120 == 119 {
                seq += 1;
                let h = T0 + (i - 119) * 30_000;
                events.extend(e.observe(&obs(seq, MN, "2061", h, &[("a21026", "Avg", "35.0")])));
            }
        }
        assert!(events.is_empty(), "false positives: {:?}", kinds(&events));
    }
}
