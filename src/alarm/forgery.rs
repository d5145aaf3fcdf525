//! Detectors of falsified (not broken) data: `series.copied`, `device.cloned` and
//! `digits.biased`.
//!
//! The other detectors find instruments that fail. These look for data a person made:
//! a clean hour or day pasted over a bad one, one analyzer's output sent under several
//! MNs, numbers typed by hand. They keep no raw history, only fingerprints and digit
//! counts, so their state is bounded by named caps however hostile the MN and factor
//! space is.
//!
//! **Fingerprints** (`series.copied`, `device.cloned`). Per factor, three series are
//! cut into windows by DataTime: the 2011 `Rtd` samples of each hour (what the
//! analyzer produced, what a replayed recording repeats), the 2051 `Avg` minutes of
//! each hour (what the minute reports carry, and what a logger-side edit changes) and
//! the 2061 `Avg` hours of each day (a whole day pasted over another; days are Beijing
//! days, as HJ 212 DataTimes are). A 2061 hour alone is one number, not a series, and
//! 2031 days would make a month's window: neither is fingerprinted. A window's
//! fingerprint hashes the exact decimal differences between its consecutive samples
//! (flag `N` only, in DataTime order), so a copy shifted by a constant offset hashes
//! the same as the original. A window counts only if its step changes at least
//! `copy_min_changes` times: constant values and straight ramps (a counter that
//! advances by the same amount every sample) repeat honestly and are never judged.
//!
//! Timestamps are not hashed, so timing jitter does not matter as long as every
//! sample stays in its window. A sample missing, added, or moved across a window
//! boundary changes the fingerprint: the copy is then not found (a miss, never a false
//! alarm). Samples that arrive late (DataTime not after the window's last one, or in
//! a window already closed) are left out, so a backfill does not disturb the
//! fingerprint of the window being built. A window is judged when the first sample
//! of a later window arrives.
//!
//! `device.cloned` compares a window's fingerprint (with its factor, series and
//! window) against those every other device sent for the same window, held in one map
//! capped at `clone_max_fingerprints`. It is raised on the device whose window
//! completed later only, naming the other MN: the later one is usually the copy, and
//! an alarm on the original would accuse the victim.
//!
//! **Digits** (`digits.biased`). Of 2011 `Rtd` values flagged `N`, the last digit at
//! the factor's precision is counted over consecutive windows of `digits_window`
//! values, and a chi-square test with 9 degrees of freedom says whether the ten
//! digits are used evenly. Instruments produce noise in the last digit; people prefer
//! some digits and avoid others. Each window is tested once (a test after every
//! value would test each value hundreds of times over and multiply the false
//! alarms), and only two failed windows in a row raise: one honest window in
//! 1/significance fails, two in a row practically never, while made-up numbers fail
//! every window. State per factor: ten counters, the window's value range and
//! precision. The digit is taken at the most decimals the factor has sent (so `12.5`
//! from a device that drops trailing zeros counts as a final `0`), and values with
//! fewer than two significant digits are skipped (their last digit is also their
//! first). A window is structural, and not judged, when its values span fewer than
//! `digits_min_span` units of the last digit (too few distinct values for the digit
//! to be noise), when every digit is even or every digit is 0 or 5 (the
//! instrument's resolution), or when fewer than half of its values were sent with
//! the full number of decimals (a stray extra decimal: the next window counts at
//! the precision of the latest value).

use std::collections::{HashMap, VecDeque};

use rust_decimal::Decimal;

use super::{AlarmKey, DetectorKind, Obs, Raise, Severity};
use crate::config::{AlarmsSection, FactorAlarms};

/// `digits.biased` clears only when a window passes the test at this level
/// (hysteresis: a biased series hovering around the raise threshold must not flap).
const CLEAR_SIGNIFICANCE: f64 = 0.01;
/// Consecutive windows that must fail the digit test to raise `digits.biased`: one
/// honest window in 1/significance fails, two in a row almost never.
const BIASED_WINDOWS: u32 = 2;
/// Day windows start at Beijing midnight (UTC+8): DataTimes of HJ 212 are Beijing time.
const DAY_OFFSET_MS: i64 = 8 * 3_600_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// Where the detectors' raises and clears go (the engine's per-observation context).
pub(super) trait Sink {
    /// Raises `r` unless its key is active.
    fn raise(&mut self, r: Raise);
    /// Clears the alarm `kind` of the observation's device and `factor`, if active.
    fn clear(&mut self, kind: DetectorKind, factor: &str, end_ms: i64);
}

/// Which series a fingerprint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// 2011 `Rtd` within an hour.
    RtdHour = 0,
    /// 2051 `Avg` within an hour.
    MinuteHour = 1,
    /// 2061 `Avg` within a day.
    HourDay = 2,
}

impl Level {
    fn of(cn: &str) -> Option<Level> {
        match cn {
            "2011" => Some(Level::RtdHour),
            "2051" => Some(Level::MinuteHour),
            "2061" => Some(Level::HourDay),
            _ => None,
        }
    }

    fn window(t_ms: i64, level: Level) -> i64 {
        match level {
            Level::HourDay => (t_ms + DAY_OFFSET_MS).div_euclid(DAY_MS),
            _ => t_ms.div_euclid(HOUR_MS),
        }
    }

    fn start_ms(self, window: i64) -> i64 {
        match self {
            Level::HourDay => window * DAY_MS - DAY_OFFSET_MS,
            _ => window * HOUR_MS,
        }
    }

    fn zh(self) -> &'static str {
        match self {
            Level::RtdHour => "小时实时数据（2011）",
            Level::MinuteHour => "小时分钟数据（2051）",
            Level::HourDay => "日小时数据（2061）",
        }
    }

    fn en(self) -> &'static str {
        match self {
            Level::RtdHour => "hour of real-time (2011) samples",
            Level::MinuteHour => "hour of minute (2051) averages",
            Level::HourDay => "day of hour (2061) averages",
        }
    }
}

/// Per-factor settings, resolved on the factor's first value.
#[derive(Debug, Clone, Copy)]
struct Settings {
    copy_on: bool,
    clone_on: bool,
    digits_on: bool,
    min_changes: u32,
    window: usize,
    /// Chi-square (9 df) above which `digits.biased` raises.
    raise_chi2: f64,
    /// ... and at or below which it clears.
    clear_chi2: f64,
    min_span: i64,
}

/// A window being built.
#[derive(Debug, Clone, Copy)]
struct Acc {
    window: i64,
    last_t: i64,
    prev: Decimal,
    prev_step: Option<Step>,
    hash: u64,
    n: u32,
    changes: u32,
    first_seq: u64,
    last_seq: u64,
}

/// A judged window of the past in 8 bytes: the low 48 bits of its hash (an honest
/// collision among a factor's few dozen windows: ~1e-12) and the window number
/// modulo 2^16 (windows of one deque are never that far apart but for a DataTime
/// jumping years, which at worst compares against a stale fingerprint).
#[derive(Debug, Clone, Copy)]
struct Fp(u64);

const HASH_BITS: u32 = 48;
const HASH_MASK: u64 = (1 << HASH_BITS) - 1;

impl Fp {
    fn new(hash: u64, window: i64) -> Fp {
        Fp((hash & HASH_MASK) | ((window as u64) << HASH_BITS))
    }

    fn same(self, hash: u64) -> bool {
        self.0 & HASH_MASK == hash & HASH_MASK
    }

    /// Its window, given a window `now` not before it and less than 2^16 after.
    fn window(self, now: i64) -> i64 {
        let back = (now as u64).wrapping_sub(self.0 >> HASH_BITS) & 0xFFFF;
        now - back as i64
    }
}

#[derive(Debug, Default)]
struct LevelState {
    acc: Option<Acc>,
    /// Oldest first; at most the level's look-back in windows.
    past: VecDeque<Fp>,
}

/// The last digits of one factor's current window of values.
#[derive(Debug, Default)]
struct Digits {
    counts: [u32; 10],
    n: u32,
    /// Values of the window sent with `prec` decimals.
    full: u32,
    /// Decimals the digit is taken at.
    prec: u32,
    /// Value range of the window, in units of the last digit.
    lo: i64,
    hi: i64,
    /// Consecutive windows that failed the test.
    fails: u32,
}

impl Digits {
    /// Starts the next window at `prec` decimals.
    fn next_window(&mut self, prec: u32) {
        *self = Digits {
            prec,
            fails: self.fails,
            ..Digits::default()
        };
    }

    fn push(&mut self, digit: u8, full: bool, units: i64) {
        if self.n == 0 {
            (self.lo, self.hi) = (units, units);
        }
        self.counts[usize::from(digit)] += 1;
        self.n += 1;
        self.full += u32::from(full);
        self.lo = self.lo.min(units);
        self.hi = self.hi.max(units);
    }

    /// The digits used look like the instrument's resolution: all even, or all 0/5.
    fn resolution(&self) -> bool {
        let c = &self.counts;
        let odd = c[1] + c[3] + c[5] + c[7] + c[9];
        let not_half = c.iter().enumerate().filter(|(i, _)| *i != 0 && *i != 5);
        odd == 0 || not_half.map(|(_, n)| *n).sum::<u32>() == 0
    }

    fn chi2(&self) -> f64 {
        let n = f64::from(self.n);
        let sum_sq: f64 = self
            .counts
            .iter()
            .map(|&c| f64::from(c) * f64::from(c))
            .sum();
        10.0 * sum_sq / n - n
    }
}

/// One factor's state for the three detectors.
#[derive(Debug, Default)]
pub(super) struct FactorForgery {
    settings: Option<Settings>,
    levels: [LevelState; 3],
    /// Levels whose latest judged window is a copy / a clone: one alarm per factor
    /// clears only when every level is fine again.
    copied: u8,
    cloned: u8,
    /// `None` until the factor's first value (its precision).
    digits: Option<Digits>,
    biased: bool,
}

/// Fingerprints of recent windows of every device, for `device.cloned`: capped at
/// `clone_max_fingerprints`, the oldest forgotten first.
#[derive(Debug, Default)]
struct CloneMap {
    /// Key: the window's fingerprint with its factor, level and window mixed in.
    by_key: HashMap<u64, Box<str>>,
    order: VecDeque<u64>,
    cap: usize,
    evicted: u64,
}

impl CloneMap {
    /// The MN that sent `key` first, if another; remembers `mn` otherwise.
    fn check(&mut self, key: u64, mn: &str) -> Option<&str> {
        if self.by_key.contains_key(&key) {
            let first = &self.by_key[&key];
            return (**first != *mn).then_some(&**first);
        }
        while self.order.len() >= self.cap.max(1) {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.by_key.remove(&old);
            self.evicted += 1;
        }
        self.by_key.insert(key, mn.into());
        self.order.push_back(key);
        None
    }
}

/// The engine-wide part: settings and the cross-device fingerprint map.
#[derive(Debug)]
pub(super) struct Forgery {
    clones: CloneMap,
    lookback_hours: usize,
    lookback_days: usize,
}

impl Forgery {
    pub(super) fn new(cfg: &AlarmsSection) -> Forgery {
        Forgery {
            clones: CloneMap {
                cap: cfg.clone_max_fingerprints,
                ..CloneMap::default()
            },
            lookback_hours: cfg.copy_lookback_hours,
            lookback_days: cfg.copy_lookback_days,
        }
    }

    /// Window fingerprints held for `device.cloned` (at most `clone_max_fingerprints`).
    #[cfg(test)]
    fn clone_fingerprints(&self) -> usize {
        self.clones.by_key.len()
    }

    /// Fingerprints forgotten to stay within `clone_max_fingerprints`, since start.
    #[cfg(test)]
    fn clones_evicted(&self) -> u64 {
        self.clones.evicted
    }

    fn settings(cfg: &AlarmsSection, mn: &str, factor: &str) -> Settings {
        let empty = FactorAlarms::default();
        let g = cfg.factor.get(factor).unwrap_or(&empty);
        let dev = cfg.device.get(mn);
        let d = dev.and_then(|d| d.factor.get(factor)).unwrap_or(&empty);
        let on = |kind: DetectorKind| {
            let k = kind.as_str();
            !cfg.disabled.iter().any(|x| x == k)
                && !dev.is_some_and(|d| d.disabled.iter().any(|x| x == k))
        };
        let window = d
            .digits_window
            .or(g.digits_window)
            .unwrap_or(cfg.digits_window);
        let alpha = d
            .digits_significance
            .or(g.digits_significance)
            .unwrap_or(cfg.digits_significance);
        Settings {
            copy_on: on(DetectorKind::SeriesCopied),
            clone_on: on(DetectorKind::DeviceCloned) && !d.shared.or(g.shared).unwrap_or(false),
            // `digits_window = 0` switches the test off for one factor.
            digits_on: on(DetectorKind::DigitsBiased) && window > 0,
            min_changes: d
                .copy_min_changes
                .or(g.copy_min_changes)
                .unwrap_or(cfg.copy_min_changes),
            window,
            raise_chi2: chi2_critical_memo(alpha),
            clear_chi2: chi2_critical_memo(CLEAR_SIGNIFICANCE.max(alpha)),
            min_span: i64::from(cfg.digits_min_span),
        }
    }

    /// One numeric value of a data record (`Rtd` of 2011, `Avg` of 2051/2061):
    /// `normal` when its flag is `N` or absent.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn value(
        &mut self,
        cfg: &AlarmsSection,
        st: &mut FactorForgery,
        sink: &mut impl Sink,
        o: &Obs,
        t: i64,
        f: &str,
        v: Decimal,
        normal: bool,
    ) {
        let Some(level) = Level::of(&o.cn) else {
            return;
        };
        if !normal {
            return;
        }
        let s = *st
            .settings
            .get_or_insert_with(|| Forgery::settings(cfg, &o.mn, f));
        if s.copy_on || s.clone_on {
            self.fingerprint(st, &s, sink, o, t, f, v, level);
        }
        if s.digits_on && level == Level::RtdHour {
            digits(st, &s, sink, o, t, f, v);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn fingerprint(
        &mut self,
        st: &mut FactorForgery,
        s: &Settings,
        sink: &mut impl Sink,
        o: &Obs,
        t: i64,
        f: &str,
        v: Decimal,
        level: Level,
    ) {
        let w = Level::window(t, level);
        let ls = &mut st.levels[level as usize];
        let fresh = Acc {
            window: w,
            last_t: t,
            prev: v,
            prev_step: None,
            hash: SEED,
            n: 1,
            changes: 0,
            first_seq: o.seq,
            last_seq: o.seq,
        };
        let Some(acc) = ls.acc.as_mut() else {
            ls.acc = Some(fresh);
            return;
        };
        if w < acc.window || (w == acc.window && t <= acc.last_t) {
            return; // late: not part of the window being built
        }
        if w == acc.window {
            let step = Step::between(acc.prev, v);
            if acc.prev_step.is_some_and(|p| p != step) {
                acc.changes += 1;
            }
            acc.hash = mix(acc.hash, step);
            acc.prev_step = Some(step);
            acc.prev = v;
            acc.last_t = t;
            acc.n += 1;
            acc.last_seq = o.seq;
            return;
        }
        let done = *acc;
        ls.acc = Some(fresh);
        if done.changes < s.min_changes {
            return; // not judged: too regular to tell a copy from honest data
        }
        let lookback = match level {
            Level::HourDay => self.lookback_days,
            _ => self.lookback_hours,
        } as i64;
        // Every judged window of the last `lookback` is compared, then the deque
        // keeps at most `lookback` of them.
        while ls
            .past
            .front()
            .is_some_and(|p| done.window - p.window(done.window) > lookback)
        {
            ls.past.pop_front();
        }
        let bit = 1u8 << (level as u8);
        let start = level.start_ms(done.window);
        let when = |w: i64| {
            chrono::DateTime::from_timestamp_millis(level.start_ms(w))
                .map(|x| {
                    x.with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).expect("valid"))
                        .format("%Y-%m-%d %H:%M")
                        .to_string()
                })
                .unwrap_or_default()
        };
        if s.copy_on {
            let earlier = ls.past.iter().rev().find(|p| p.same(done.hash)).copied();
            if let Some(p) = earlier {
                st.copied |= bit;
                let (this, that) = (when(done.window), when(p.window(done.window)));
                sink.raise(Raise {
                    key: key(DetectorKind::SeriesCopied, o, f),
                    severity: Severity::Critical,
                    start_ms: start,
                    seqs: vec![done.first_seq, done.last_seq],
                    message_zh: format!(
                        "设备 {} 因子 {f} 自 {this} 起的{}（{} 个值）与 {that} 起的完全相同或仅差一个常数（疑似复制数据）",
                        o.mn,
                        level.zh(),
                        done.n
                    ),
                    message_en: format!(
                        "device {} factor {f}: the {} from {this} ({} values) repeats the one from {that}, identically or shifted by a constant (possible copied data)",
                        o.mn,
                        level.en(),
                        done.n
                    ),
                });
            } else if st.copied & bit != 0 {
                st.copied &= !bit;
                if st.copied == 0 {
                    sink.clear(DetectorKind::SeriesCopied, f, t);
                }
            }
            if ls.past.len() >= lookback as usize {
                ls.past.pop_front();
            }
            ls.past.push_back(Fp::new(done.hash, done.window));
        }
        if s.clone_on {
            let k = clone_key(done.hash, f, level, done.window);
            if let Some(other) = self.clones.check(k, &o.mn) {
                st.cloned |= bit;
                let this = when(done.window);
                sink.raise(Raise {
                    key: key(DetectorKind::DeviceCloned, o, f),
                    severity: Severity::Critical,
                    start_ms: start,
                    seqs: vec![done.first_seq, done.last_seq],
                    message_zh: format!(
                        "设备 {} 因子 {f} 自 {this} 起的{}（{} 个值）与设备 {other} 发送的完全相同或仅差一个常数（疑似克隆设备）",
                        o.mn,
                        level.zh(),
                        done.n
                    ),
                    message_en: format!(
                        "device {} factor {f}: the {} from {this} ({} values) is the one device {other} sent, identically or shifted by a constant (possible cloned device)",
                        o.mn,
                        level.en(),
                        done.n
                    ),
                });
            } else if st.cloned & bit != 0 {
                st.cloned &= !bit;
                if st.cloned == 0 {
                    sink.clear(DetectorKind::DeviceCloned, f, t);
                }
            }
        }
    }
}

fn key(kind: DetectorKind, o: &Obs, f: &str) -> AlarmKey {
    AlarmKey {
        kind,
        mn: o.mn.clone(),
        factor: f.to_owned(),
    }
}

fn digits(
    st: &mut FactorForgery,
    s: &Settings,
    sink: &mut impl Sink,
    o: &Obs,
    t: i64,
    f: &str,
    v: Decimal,
) {
    let scale = v.scale();
    let dg = st.digits.get_or_insert_with(|| Digits {
        prec: scale,
        ..Digits::default()
    });
    if scale > dg.prec {
        dg.fails = 0;
        dg.next_window(scale);
    }
    let Some(units) = 10i64
        .checked_pow(dg.prec - scale)
        .zip(i64::try_from(v.mantissa()).ok())
        .and_then(|(p, m)| m.checked_mul(p))
    else {
        return; // beyond 18 digits: no instrument's
    };
    if units.unsigned_abs() < 10 {
        return; // one significant digit: the last digit is also the first
    }
    let digit = (units.unsigned_abs() % 10) as u8;
    dg.push(digit, scale == dg.prec, units);
    if (dg.n as usize) < s.window {
        return;
    }
    // A full window: judged once, then the next one starts.
    let (chi2, counts, n, prec) = (dg.chi2(), dg.counts, dg.n, dg.prec);
    let structural = dg.hi.saturating_sub(dg.lo) < s.min_span || dg.resolution();
    if dg.full * 2 < dg.n {
        // Most values came with fewer decimals than one stray value had: count at
        // the precision the device actually uses.
        dg.fails = 0;
        dg.next_window(scale);
        return;
    }
    dg.next_window(prec);
    if structural {
        dg.fails = 0;
        return; // not judged
    }
    if chi2 <= s.raise_chi2 {
        dg.fails = 0;
        if chi2 <= s.clear_chi2 && st.biased {
            st.biased = false;
            sink.clear(DetectorKind::DigitsBiased, f, t);
        }
        return;
    }
    dg.fails += 1;
    if dg.fails < BIASED_WINDOWS || st.biased {
        return;
    }
    st.biased = true;
    let counts = counts
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let p = chi2_sf(chi2);
    let w = BIASED_WINDOWS;
    sink.raise(Raise {
        key: key(DetectorKind::DigitsBiased, o, f),
        severity: Severity::Warning,
        start_ms: t,
        seqs: vec![o.seq],
        message_zh: format!(
            "设备 {} 因子 {f} 连续 {w} 个 {n} 值窗口的末位数字分布不均（最近窗口 0-9 次数 {counts}，卡方 {chi2:.1}，p = {p:.1e}），疑似人工编造",
            o.mn
        ),
        message_en: format!(
            "device {} factor {f}: last digits uneven in {w} consecutive windows of {n} values (latest 0-9 counts {counts}, chi-square {chi2:.1}, p = {p:.1e}): possibly made-up numbers",
            o.mn
        ),
    });
}

const SEED: u64 = 0x243F_6A88_85A3_08D3;

/// SplitMix64's finalizer: every input bit affects every output bit, so two series
/// that differ in one step do not collide by construction.
fn fmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The exact difference between two consecutive values, normalised (no trailing
/// zeros, zero with scale 0), so that `0.10` and `0.1` are the same step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Step {
    mantissa: i128,
    scale: u32,
}

impl Step {
    /// `v - prev`. Values of one factor nearly always have the same scale: their
    /// mantissas are subtracted directly (in 64 bits when they fit, as they do for
    /// any measured value), else through `Decimal`.
    fn between(prev: Decimal, v: Decimal) -> Step {
        if prev.scale() == v.scale() {
            let (a, b) = (prev.mantissa(), v.mantissa());
            if let (Ok(a), Ok(b)) = (i64::try_from(a), i64::try_from(b)) {
                if let Some(mut d) = b.checked_sub(a) {
                    let mut scale = v.scale();
                    if d == 0 {
                        scale = 0;
                    }
                    while scale > 0 && d % 10 == 0 {
                        d /= 10;
                        scale -= 1;
                    }
                    return Step {
                        mantissa: i128::from(d),
                        scale,
                    };
                }
            }
        }
        let d = (v - prev).normalize();
        Step {
            mantissa: d.mantissa(),
            scale: d.scale(),
        }
    }
}

/// Folds one step into the window's hash.
fn mix(h: u64, step: Step) -> u64 {
    let m = step.mantissa;
    let x = fmix(m as u64 ^ fmix((m >> 64) as u64 ^ u64::from(step.scale)));
    fmix(h.rotate_left(23) ^ x)
}

fn clone_key(hash: u64, f: &str, level: Level, window: i64) -> u64 {
    let mut h = fmix(hash ^ level as u64);
    for chunk in f.as_bytes().chunks(8) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        h = fmix(h ^ u64::from_le_bytes(b));
    }
    fmix(h ^ window as u64)
}

/// Survival function of the chi-square distribution with 9 degrees of freedom:
/// 1 - P(4.5, x/2), the regularized lower incomplete gamma function by its series.
/// Accurate to ~1e-15 absolute, enough for significances down to 1e-12.
fn chi2_sf(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    const A: f64 = 4.5;
    // ln Γ(5.5) = ln(945 √π / 32).
    let ln_gamma = (945.0 * std::f64::consts::PI.sqrt() / 32.0_f64).ln();
    let y = x / 2.0;
    let (mut term, mut sum, mut k) = (1.0, 1.0, 1.0);
    while term > sum * 1e-17 && k < 10_000.0 {
        term *= y / (A + k);
        sum += term;
        k += 1.0;
    }
    let p = (A * y.ln() - y - ln_gamma + sum.ln()).exp();
    (1.0 - p).max(0.0)
}

/// Significances whose critical values [`chi2_critical_memo`] keeps.
const CHI2_MEMO: usize = 16;

/// [`chi2_critical`], remembered: it costs 200 bisection steps, each a series
/// of dozens of terms, and every factor of every new device asks for it (twice)
/// with one of the few significances the configuration names. Remembers the
/// first [`CHI2_MEMO`] significances asked for; any other is computed again.
fn chi2_critical_memo(alpha: f64) -> f64 {
    thread_local! {
        static MEMO: std::cell::RefCell<Vec<(u64, f64)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let key = alpha.to_bits();
    MEMO.with_borrow_mut(|memo| {
        if let Some(&(_, x)) = memo.iter().find(|(k, _)| *k == key) {
            return x;
        }
        let x = chi2_critical(alpha);
        if memo.len() < CHI2_MEMO {
            memo.push((key, x));
        }
        x
    })
}

/// The chi-square (9 df) value exceeded with probability `alpha`.
fn chi2_critical(alpha: f64) -> f64 {
    let (mut lo, mut hi) = (0.0, 500.0);
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if chi2_sf(mid) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alarm::AlarmEvent;
    use crate::alarm::engine::{Engine, obs};
    use crate::config::Config;

    const T0: i64 = 1_780_000_000_000 / HOUR_MS * HOUR_MS;

    fn cfg() -> AlarmsSection {
        Config::parse("", std::path::Path::new("t")).unwrap().alarms
    }

    fn raised(ev: &[AlarmEvent], kind: DetectorKind) -> Vec<&Raise> {
        ev.iter()
            .filter_map(|e| match e {
                AlarmEvent::Raise(r) if r.key.kind == kind => Some(r),
                _ => None,
            })
            .collect()
    }

    fn cleared(ev: &[AlarmEvent], kind: DetectorKind) -> usize {
        ev.iter()
            .filter(|e| matches!(e, AlarmEvent::Clear { key, .. } if key.kind == kind))
            .count()
    }

    /// A deterministic noisy series: `n` values with two decimals around 30.
    fn noisy(seed: u64, n: usize) -> Vec<String> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                let u = fmix({
                    s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    s
                });
                format!("{:.2}", 30.0 + (u % 2000) as f64 / 100.0 - 10.0)
            })
            .collect()
    }

    /// Feeds `vals` as 2011 samples of a21026 of `mn`, 30 s apart from `start`.
    fn feed(
        e: &mut Engine,
        seq: &mut u64,
        mn: &str,
        start: i64,
        vals: &[String],
    ) -> Vec<AlarmEvent> {
        let mut out = Vec::new();
        for (i, v) in vals.iter().enumerate() {
            *seq += 1;
            let o = obs(
                *seq,
                mn,
                "2011",
                start + i as i64 * 30_000,
                &[("a21026", "Rtd", v), ("a21026", "Flag", "N")],
            );
            out.extend(e.observe(&o));
        }
        out
    }

    /// One sample that closes the window before `at`.
    fn closer(e: &mut Engine, seq: &mut u64, mn: &str, at: i64) -> Vec<AlarmEvent> {
        feed(e, seq, mn, at, &["1.00".to_owned()])
    }

    fn offset(vals: &[String], by: f64) -> Vec<String> {
        vals.iter()
            .map(|v| format!("{:.2}", v.parse::<f64>().unwrap() + by))
            .collect()
    }

    fn only_copy() -> AlarmsSection {
        let mut c = cfg();
        c.disabled = vec!["value.spike".into(), "digits.biased".into()];
        c
    }

    /// The fast path of a step equals the decimal difference, normalised.
    #[test]
    fn steps_are_exact_normalised_differences() {
        let d = |x: &str| x.parse::<Decimal>().unwrap();
        for (a, b) in [
            ("12.50", "12.60"),
            ("12.50", "12.50"),
            ("12.5", "12.60"),
            ("-3.000", "4.000"),
            ("100", "70"),
            ("0.0001", "0.0011"),
            ("79228162514264337593543950335", "1"),
        ] {
            let (a, b) = (d(a), d(b));
            let n = (b - a).normalize();
            let s = Step::between(a, b);
            assert_eq!(
                (s.mantissa, s.scale),
                (n.mantissa(), n.scale()),
                "{a} -> {b}"
            );
        }
    }

    #[test]
    fn chi_square_quantiles() {
        // Published 9-df quantiles.
        for (x, p) in [
            (16.919, 0.05),
            (21.666, 0.01),
            (27.877, 0.001),
            (33.720, 1e-4),
        ] {
            let q = chi2_sf(x);
            assert!((q - p).abs() / p < 2e-3, "Q({x}) = {q}, expected {p}");
            assert!((chi2_critical(p) - x).abs() < 0.01, "critical at {p}");
        }
        assert_eq!(chi2_sf(0.0), 1.0);
        for p in [1e-6, 1e-3, 0.5, 1e-6] {
            assert_eq!(chi2_critical_memo(p).to_bits(), chi2_critical(p).to_bits());
        }
        assert!(chi2_sf(200.0) < 1e-30);
        assert!((chi2_critical(1e-6) - 44.6).abs() < 0.5);
    }

    #[test]
    fn a_copied_hour_raises_and_a_fresh_one_clears() {
        let mut e = Engine::new(only_copy());
        let mut seq = 0;
        let a = noisy(1, 120);
        assert!(feed(&mut e, &mut seq, "M1", T0, &a).is_empty());
        // The same hour again, shifted by +2.5: the closing sample judges it.
        let mut ev = feed(&mut e, &mut seq, "M1", T0 + HOUR_MS, &offset(&a, 2.5));
        ev.extend(closer(&mut e, &mut seq, "M1", T0 + 2 * HOUR_MS));
        let r = raised(&ev, DetectorKind::SeriesCopied);
        assert_eq!(r.len(), 1, "{ev:?}");
        assert_eq!(r[0].key.factor, "a21026");
        assert_eq!(r[0].start_ms, T0 + HOUR_MS);
        assert!(
            r[0].message_en.contains("120 values"),
            "{}",
            r[0].message_en
        );
        assert!(r[0].message_zh.contains("复制"));
        // A fresh hour clears it.
        let mut ev = feed(&mut e, &mut seq, "M1", T0 + 3 * HOUR_MS, &noisy(2, 120));
        ev.extend(closer(&mut e, &mut seq, "M1", T0 + 4 * HOUR_MS));
        assert_eq!(cleared(&ev, DetectorKind::SeriesCopied), 1, "{ev:?}");
    }

    #[test]
    fn near_copies_do_not_raise() {
        let a = noisy(3, 120);
        let mut one_changed = a.clone();
        one_changed[60] = format!("{:.2}", a[60].parse::<f64>().unwrap() + 0.01);
        let shifted: Vec<String> = a[1..].iter().chain([&a[0]]).cloned().collect();
        let mut missing = a.clone();
        missing.remove(40);
        let constant = vec!["12.30".to_owned(); 120];
        let ramp: Vec<String> = (0..120).map(|i| format!("{}.5", 100 + i)).collect();
        for (name, first, second) in [
            ("one value changed", &a, &one_changed),
            ("shifted by one sample", &a, &shifted),
            ("one sample missing", &a, &missing),
            ("constant", &constant, &constant),
            ("ramp", &ramp, &offset(&ramp, 7.0)),
        ] {
            let mut e = Engine::new(only_copy());
            let mut seq = 0;
            let mut ev = feed(&mut e, &mut seq, "M1", T0, first);
            ev.extend(feed(&mut e, &mut seq, "M1", T0 + HOUR_MS, second));
            ev.extend(closer(&mut e, &mut seq, "M1", T0 + 2 * HOUR_MS));
            assert!(
                raised(&ev, DetectorKind::SeriesCopied).is_empty(),
                "{name}: {ev:?}"
            );
        }
    }

    #[test]
    fn a_copy_beyond_the_look_back_is_not_found() {
        let mut c = only_copy();
        c.copy_lookback_hours = 2;
        let mut e = Engine::new(c);
        let mut seq = 0;
        let a = noisy(4, 120);
        feed(&mut e, &mut seq, "M1", T0, &a);
        feed(&mut e, &mut seq, "M1", T0 + HOUR_MS, &noisy(5, 120));
        feed(&mut e, &mut seq, "M1", T0 + 2 * HOUR_MS, &noisy(6, 120));
        let mut ev = feed(&mut e, &mut seq, "M1", T0 + 3 * HOUR_MS, &a);
        ev.extend(closer(&mut e, &mut seq, "M1", T0 + 4 * HOUR_MS));
        assert!(raised(&ev, DetectorKind::SeriesCopied).is_empty(), "{ev:?}");
        let levels = &e_state(&e, "M1").levels[Level::RtdHour as usize];
        assert!(levels.past.len() <= 2, "bounded: {}", levels.past.len());
        // A copy of the window two back is within the look-back.
        let b = noisy(12, 120);
        feed(&mut e, &mut seq, "M1", T0 + 5 * HOUR_MS, &b);
        feed(&mut e, &mut seq, "M1", T0 + 6 * HOUR_MS, &noisy(13, 120));
        let mut ev = feed(&mut e, &mut seq, "M1", T0 + 7 * HOUR_MS, &b);
        ev.extend(closer(&mut e, &mut seq, "M1", T0 + 8 * HOUR_MS));
        let r = raised(&ev, DetectorKind::SeriesCopied);
        assert_eq!(r.len(), 1, "{ev:?}");
        assert!(
            r[0].message_en.contains("repeats the one from"),
            "{}",
            r[0].message_en
        );
    }

    #[test]
    fn fingerprints_recover_their_window() {
        for (w, now) in [(5i64, 5i64), (491_000, 491_744), (65_535, 65_536), (-3, 10)] {
            let p = Fp::new(0xDEAD_BEEF_1234_5678, w);
            assert_eq!(p.window(now), w);
            assert!(p.same(0x0000_BEEF_1234_5678));
            assert!(!p.same(0x0000_BEEF_1234_5679));
        }
    }

    fn e_state<'a>(e: &'a Engine, mn: &str) -> &'a FactorForgery {
        e.forgery_state(mn, "a21026").expect("factor state")
    }

    #[test]
    fn a_copied_day_of_hour_averages_raises() {
        let mut e = Engine::new(only_copy());
        let day = noisy(7, 24);
        let mut seq = 0;
        let mut ev = Vec::new();
        // Beijing midnight.
        let d0 = (T0 + DAY_OFFSET_MS).div_euclid(DAY_MS) * DAY_MS - DAY_OFFSET_MS;
        for d in 0..3i64 {
            for (h, v) in day.iter().enumerate() {
                seq += 1;
                let o = obs(
                    seq,
                    "M1",
                    "2061",
                    d0 + d * DAY_MS + h as i64 * HOUR_MS,
                    &[("a21026", "Avg", v), ("a21026", "Flag", "N")],
                );
                ev.extend(e.observe(&o));
            }
        }
        let r = raised(&ev, DetectorKind::SeriesCopied);
        assert_eq!(r.len(), 1, "{ev:?}");
        assert_eq!(r[0].start_ms, d0 + DAY_MS);
        assert!(r[0].message_en.contains("day of hour (2061)"));
    }

    #[test]
    fn two_mns_with_one_series_raise_on_the_later() {
        let mut c = cfg();
        c.disabled = vec!["value.spike".into(), "digits.biased".into()];
        let mut e = Engine::new(c);
        let mut seq = 0;
        let a = noisy(8, 120);
        let mut ev = feed(&mut e, &mut seq, "ORIG", T0, &a);
        ev.extend(feed(&mut e, &mut seq, "COPY", T0, &offset(&a, 1.0)));
        ev.extend(closer(&mut e, &mut seq, "ORIG", T0 + HOUR_MS));
        ev.extend(closer(&mut e, &mut seq, "COPY", T0 + HOUR_MS));
        let r = raised(&ev, DetectorKind::DeviceCloned);
        assert_eq!(r.len(), 1, "{ev:?}");
        assert_eq!(r[0].key.mn, "COPY");
        assert!(
            r[0].message_en.contains("device ORIG sent"),
            "{}",
            r[0].message_en
        );
        assert!(r[0].message_zh.contains("ORIG"));
        // The next hour differs: cleared.
        let mut ev = feed(
            &mut e,
            &mut seq,
            "COPY",
            T0 + HOUR_MS + 30_000,
            &noisy(9, 110),
        );
        ev.extend(closer(&mut e, &mut seq, "COPY", T0 + 2 * HOUR_MS));
        assert_eq!(cleared(&ev, DetectorKind::DeviceCloned), 1, "{ev:?}");
    }

    #[test]
    fn clone_near_misses_do_not_raise() {
        let a = noisy(10, 120);
        let shifted: Vec<String> = a[1..].to_vec();
        let mut one_changed = a.clone();
        one_changed[5] = "99.99".into();
        for (name, b, start_b) in [
            ("shifted by one sample", &shifted, T0),
            ("one value changed", &one_changed, T0),
            ("the same values an hour later", &a, T0 + HOUR_MS),
        ] {
            let mut c = only_copy();
            c.disabled.push("series.copied".into());
            let mut e = Engine::new(c);
            let mut seq = 0;
            let mut ev = feed(&mut e, &mut seq, "ORIG", T0, &a);
            ev.extend(feed(&mut e, &mut seq, "COPY", start_b, b));
            ev.extend(closer(&mut e, &mut seq, "ORIG", T0 + 2 * HOUR_MS));
            ev.extend(closer(&mut e, &mut seq, "COPY", T0 + 3 * HOUR_MS));
            assert!(
                raised(&ev, DetectorKind::DeviceCloned).is_empty(),
                "{name}: {ev:?}"
            );
        }
    }

    /// A plant's shared ambient sensor reported by two stacks is not a clone.
    #[test]
    fn a_shared_factor_is_not_compared_across_devices() {
        let mut c = only_copy();
        c.factor.insert(
            "a21026".into(),
            FactorAlarms {
                shared: Some(true),
                ..FactorAlarms::default()
            },
        );
        let mut e = Engine::new(c);
        let mut seq = 0;
        let a = noisy(11, 120);
        let mut ev = feed(&mut e, &mut seq, "ORIG", T0, &a);
        ev.extend(feed(&mut e, &mut seq, "COPY", T0, &a));
        ev.extend(closer(&mut e, &mut seq, "ORIG", T0 + HOUR_MS));
        ev.extend(closer(&mut e, &mut seq, "COPY", T0 + HOUR_MS));
        assert!(raised(&ev, DetectorKind::DeviceCloned).is_empty(), "{ev:?}");
    }

    /// The fixed part of a factor's state (README: "Cost").
    #[test]
    fn a_factor_state_is_small() {
        let n = std::mem::size_of::<FactorForgery>();
        println!("FactorForgery: {n} bytes");
        assert!(n <= 800, "{n} bytes");
    }

    #[test]
    fn the_clone_map_stays_within_its_cap() {
        let mut c = only_copy();
        c.clone_max_fingerprints = 50;
        let mut e = Engine::new(c);
        let mut seq = 0;
        for i in 0..200u64 {
            let mn = format!("X{i:05}");
            feed(&mut e, &mut seq, &mn, T0, &noisy(100 + i, 20));
            closer(&mut e, &mut seq, &mn, T0 + HOUR_MS);
        }
        assert_eq!(e.forgery().clone_fingerprints(), 50);
        assert_eq!(e.forgery().clones_evicted(), 150);
    }

    /// 2011 values of a21026 with the given last digits: `tens` + digit / 100.
    fn digit_values(digits: &[u8], seed: u64) -> Vec<String> {
        let mut s = seed;
        digits
            .iter()
            .map(|d| {
                let u = fmix({
                    s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    s
                });
                // Integer part and first decimal spread widely (span >> 50 units).
                format!("{}.{}{}", 20 + u % 40, (u >> 8) % 10, d)
            })
            .collect()
    }

    fn only_digits() -> AlarmsSection {
        let mut c = cfg();
        c.disabled = vec![
            "value.spike".into(),
            "series.copied".into(),
            "device.cloned".into(),
        ];
        c
    }

    #[test]
    fn avoided_digits_raise_in_two_windows_and_even_ones_clear() {
        let mut e = Engine::new(only_digits());
        let mut seq = 0;
        // A person who never types 3 or 7: values over the other eight digits.
        let biased: Vec<u8> = (0..600).map(|i| [0, 1, 2, 4, 5, 6, 8, 9][i % 8]).collect();
        let vals = digit_values(&biased, 1);
        let ev = feed(&mut e, &mut seq, "M1", T0, &vals[..300]);
        assert!(ev.is_empty(), "one failed window is not enough: {ev:?}");
        let ev = feed(&mut e, &mut seq, "M1", T0 + HOUR_MS, &vals[300..]);
        let r = raised(&ev, DetectorKind::DigitsBiased);
        assert_eq!(r.len(), 1, "{ev:?}");
        assert!(
            r[0].message_en
                .contains("0-9 counts 37 37 37 0 37 38 38 0 38 38"),
            "{}",
            r[0].message_en
        );
        assert!(r[0].message_zh.contains("末位数字"));
        // A window of evenly used digits clears it.
        let even: Vec<u8> = (0..300).map(|i| (i % 10) as u8).collect();
        let ev = feed(
            &mut e,
            &mut seq,
            "M1",
            T0 + 2 * HOUR_MS,
            &digit_values(&even, 2),
        );
        assert_eq!(cleared(&ev, DetectorKind::DigitsBiased), 1, "{ev:?}");
    }

    /// A biased window between honest ones never raises.
    #[test]
    fn one_biased_window_among_honest_ones_does_not_raise() {
        let mut e = Engine::new(only_digits());
        let mut seq = 0;
        let even: Vec<u8> = (0..300).map(|i| (i % 10) as u8).collect();
        let biased: Vec<u8> = (0..300).map(|i| [0, 1, 2, 4, 5, 6, 8, 9][i % 8]).collect();
        let mut ev = Vec::new();
        for (k, ds) in [&biased, &even, &biased, &even].iter().enumerate() {
            let start = T0 + k as i64 * HOUR_MS;
            ev.extend(feed(
                &mut e,
                &mut seq,
                "M1",
                start,
                &digit_values(ds, k as u64),
            ));
        }
        assert!(ev.is_empty(), "{ev:?}");
    }

    /// Counts exactly at the edge: two windows with a chi-square just under the
    /// critical value do not raise, one step over does.
    #[test]
    fn uniform_digits_at_the_significance_edge() {
        let mut c = only_digits();
        c.digits_significance = 0.001; // critical 27.877 at n = 300
        // Counts 30 each give 0; moving k values from digit 1 to digit 0 gives
        // chi2 = 2k^2/30: k = 11 -> 8.07 ... k = 20 -> 26.7 (no), k = 21 -> 29.4 (yes).
        for (k, raises) in [(20usize, false), (21, true)] {
            let mut counts = [30usize; 10];
            counts[0] += k;
            counts[1] -= k;
            let mut ds: Vec<u8> = Vec::new();
            // Interleaved, so that the window is the same at its end whatever the order.
            while ds.len() < 300 {
                for (d, n) in counts.iter_mut().enumerate() {
                    if *n > 0 {
                        ds.push(d as u8);
                        *n -= 1;
                    }
                }
            }
            let mut e = Engine::new(c.clone());
            let mut seq = 0;
            let mut ev = feed(&mut e, &mut seq, "M1", T0, &digit_values(&ds, 3));
            ev.extend(feed(
                &mut e,
                &mut seq,
                "M1",
                T0 + HOUR_MS,
                &digit_values(&ds, 4),
            ));
            assert_eq!(
                !raised(&ev, DetectorKind::DigitsBiased).is_empty(),
                raises,
                "k = {k}: {ev:?}"
            );
        }
    }

    #[test]
    fn structural_last_digits_are_not_judged() {
        let cases: Vec<(&str, Vec<String>)> = vec![
            // Resolution 0.5: every value ends in 0 or 5.
            (
                "half steps",
                (0..700)
                    .map(|i| format!("{}.{}", 20 + i % 37, [0, 5][i % 2]))
                    .collect(),
            ),
            // Resolution 0.02: even last digits only.
            (
                "even steps",
                (0..700)
                    .map(|i| format!("{}.{}{}", 20 + i % 37, i % 10, (i % 5) * 2))
                    .collect(),
            ),
            // A narrow range of one-decimal values (span < 50 units).
            (
                "narrow",
                (0..700)
                    .map(|i| format!("7.{}", [3, 4, 4, 5, 4][i % 5]))
                    .collect(),
            ),
            // Small integers (one or two significant digits).
            (
                "small integers",
                (0..700).map(|i| format!("{}", 3 + i % 9)).collect(),
            ),
        ];
        for (name, vals) in cases {
            let mut e = Engine::new(only_digits());
            let mut seq = 0;
            let ev = feed(&mut e, &mut seq, "M1", T0, &vals);
            assert!(
                raised(&ev, DetectorKind::DigitsBiased).is_empty(),
                "{name}: {ev:?}"
            );
        }
    }

    /// A device that drops trailing zeros (`12.5` for `12.50`) has no final 0 at two
    /// decimals; it is counted as one, and one stray extra decimal restarts the window.
    #[test]
    fn dropped_trailing_zeros_and_a_stray_decimal_do_not_raise() {
        let even: Vec<u8> = (0..900).map(|i| (i % 10) as u8).collect();
        let stripped: Vec<String> = digit_values(&even, 4)
            .into_iter()
            .map(|v| {
                let t = v.trim_end_matches('0');
                t.trim_end_matches('.').to_owned()
            })
            .collect();
        let mut e = Engine::new(only_digits());
        let mut seq = 0;
        let ev = feed(&mut e, &mut seq, "M1", T0, &stripped);
        assert!(raised(&ev, DetectorKind::DigitsBiased).is_empty(), "{ev:?}");
        // One decimal mostly, one value with two.
        let mut one: Vec<String> = (0..1000)
            .map(|i| format!("{}.{}", 20 + (i * 7) % 53, i % 10))
            .collect();
        one[10] = "33.33".into();
        let mut e = Engine::new(only_digits());
        let ev = feed(&mut e, &mut seq, "M2", T0, &one);
        assert!(raised(&ev, DetectorKind::DigitsBiased).is_empty(), "{ev:?}");
    }

    #[test]
    fn digits_can_be_switched_off_per_factor_and_device() {
        let biased: Vec<u8> = (0..600).map(|i| [0, 5, 5, 1][i % 4]).collect();
        let vals = digit_values(&biased, 9);
        let mut c = only_digits();
        c.factor.insert(
            "a21026".into(),
            FactorAlarms {
                digits_window: Some(0),
                ..FactorAlarms::default()
            },
        );
        let mut e = Engine::new(c);
        let mut seq = 0;
        assert!(feed(&mut e, &mut seq, "M1", T0, &vals).is_empty());
        let mut c = only_digits();
        c.device.insert(
            "M1".into(),
            crate::config::DeviceAlarms {
                disabled: vec!["digits.biased".into()],
                ..Default::default()
            },
        );
        let mut e = Engine::new(c);
        assert!(feed(&mut e, &mut seq, "M1", T0, &vals).is_empty());
        // And on for another device.
        let ev = feed(&mut e, &mut seq, "M2", T0, &vals);
        assert_eq!(raised(&ev, DetectorKind::DigitsBiased).len(), 1);
    }
}
