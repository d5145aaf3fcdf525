//! `aggregate.mismatch` and `emission.mismatch`: the levels of a device's data
//! checked against each other.
//!
//! A data logger derives its minute records (2051) from the same measurements it
//! uploads as real-time samples (2011), its hours (2061) from its minutes and its
//! days (2031) from its hours, and a cumulative emission (`Cou`) from concentration,
//! flow and time. A single frame cannot show that an aggregate was edited; the
//! gateway sees every level raw and in order, so it can: an aggregate whose `Max`
//! is below a sample of its interval, whose `Min` is above one, or whose `Avg` is
//! far from the mean beneath it was not computed from what the device measured.
//!
//! Intervals: HJ 212-2017 Table 4 stamps a 2051/2061/2031 with the *start* of its
//! period, so a record covers `[DataTime, DataTime + interval)` (per device
//! `aggregate_stamp = "end"` for loggers that stamp the end). The minute interval is
//! the device's `MinInterval`: configured, or the smallest standard step among its
//! last [`RING`] consecutive 2051 DataTimes. Until it is known a 2051 is judged over
//! its first minute only (every standard interval is at least one), where `Max` and
//! `Min` are sound and `Avg` is not, so `Avg` waits.
//!
//! State is running sums, never raw samples: per factor and level a few open
//! intervals ([`Bucket`]: count, sum, min, max as exact decimals), at most
//! [`MAX_BUCKETS`] of them, for at most [`MAX_FACTORS`] factors per device (the
//! factor space is the sender's to invent). An aggregate is judged against the
//! buckets wholly inside its interval, and only when the samples in them cover
//! `aggregate_coverage` of it (expected samples: the interval over the device's
//! learned 2011 cadence, or over its minute interval for hours, or 24 hours for a
//! day). Only samples and aggregates flagged `N` (or unflagged) count: loggers leave
//! calibration and maintenance values out of their averages.
//!
//! Rounding: a device prints its numbers with a few digits, and some truncate. A
//! value with `k` fraction digits is taken to be within one unit of its last digit
//! of the true one (`10^-k`), and every comparison allows those units on both sides
//! on top of the configured tolerance.

use std::str::FromStr;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use super::{DetectorKind, Obs, Raise, Severity, ShortText, Val};
use crate::config::{AggregateStamp, AlarmsSection, FactorAlarms, FlowUnit, MINUTE_INTERVALS};

/// Factors per device whose consistency is tracked (real stacks and outfalls have
/// a few dozen at most).
pub(super) const MAX_FACTORS: usize = 64;
/// Open intervals kept per factor: samples (2011) for minutes, minutes (2051) for
/// hours, hours (2061) for days. The oldest goes first; an aggregate that arrives
/// after its interval's bucket went is not judged.
pub(super) const MAX_BUCKETS: [usize; 3] = [4, 3, 2];
/// Recent steps remembered to learn the 2011 cadence and the 2051 interval.
const RING: usize = 8;
const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;
/// Day boundaries until a 2031 shows the device's: midnight in Beijing (UTC+8),
/// the zone HJ 212 timestamps are written in.
const BEIJING_MIDNIGHT: i64 = 16 * HOUR;

/// Flow factors (2017 and 2005 codes): flue gas, waste water.
const AIR_FLOW: [&str; 2] = ["a00000", "B02"];
const WATER_FLOW: [&str; 2] = ["w00000", "B01"];

/// What the engine applies: a raise, or a clear of the key (kind, the device, factor).
#[derive(Debug)]
pub(super) enum Verdict {
    Raise(Raise),
    Clear {
        kind: DetectorKind,
        factor: ShortText,
    },
}

/// The last few positive steps of a series, in ms.
#[derive(Debug, Default, Clone, Copy)]
struct Ring {
    buf: [i64; RING],
    len: usize,
    next: usize,
}

impl Ring {
    fn push(&mut self, x: i64) {
        self.buf[self.next] = x;
        self.next = (self.next + 1) % RING;
        self.len = (self.len + 1).min(RING);
    }

    fn min(&self) -> Option<i64> {
        self.buf[..self.len].iter().copied().min()
    }

    fn median(&self) -> Option<i64> {
        if self.len < 2 {
            return None;
        }
        let mut v = self.buf;
        let s = &mut v[..self.len];
        s.sort_unstable();
        Some(s[self.len / 2])
    }
}

/// Per-device settings, resolved on the device's first observation.
#[derive(Debug, Clone, Copy)]
struct DevSet {
    aggregate: bool,
    emission: bool,
    /// Coverage in basis points (75 % = 7500).
    coverage_bp: i128,
    minute: Option<i64>,
    end_stamp: bool,
    flow: Option<FlowUnit>,
}

impl DevSet {
    fn new(cfg: &AlarmsSection, mn: &str) -> DevSet {
        let dev = cfg.device.get(mn);
        let on = |k: DetectorKind| {
            let k = k.as_str();
            !cfg.disabled.iter().any(|d| d == k)
                && !dev.is_some_and(|d| d.disabled.iter().any(|x| x == k))
        };
        let coverage = dev
            .and_then(|d| d.aggregate_coverage)
            .unwrap_or(cfg.aggregate_coverage);
        DevSet {
            aggregate: on(DetectorKind::AggregateMismatch),
            emission: on(DetectorKind::EmissionMismatch),
            coverage_bp: (coverage * 100.0).round() as i128,
            minute: dev
                .and_then(|d| d.minute_interval)
                .map(|m| m.0.as_millis() as i64),
            end_stamp: dev.and_then(|d| d.aggregate_stamp) == Some(AggregateStamp::End),
            flow: dev.and_then(|d| d.flow_unit),
        }
    }
}

/// Per-factor tolerances as decimals (fractions, not percent), and as f64 for
/// the quiet path's first look ([`clearly_within`]).
#[derive(Debug, Clone, Copy)]
struct FSet {
    agg_tol: Decimal,
    agg_abs: Decimal,
    em_tol: Decimal,
    em_abs: Decimal,
    cou_scale: Decimal,
    agg_tol_f: f64,
    agg_abs_f: f64,
    em_tol_f: f64,
    em_abs_f: f64,
    cou_scale_f: f64,
}

fn f64_of(d: Decimal) -> f64 {
    d.to_f64().unwrap_or(f64::NAN)
}

/// A first look in f64 that only ever says "fine": `|x - y|` within half of the
/// larger of `tol x |y|` and `abs`. Decimal arithmetic is several times dearer
/// and every aggregate of every factor is checked; a value anywhere near the
/// limit (or one f64 cannot hold) goes on to the exact decimal comparison,
/// which alone decides a raise.
fn clearly_within(x: f64, y: f64, tol: f64, abs: f64) -> bool {
    x.is_finite() && y.is_finite() && (x - y).abs() <= 0.5 * (y.abs() * tol).max(abs)
}

fn dec(x: f64) -> Decimal {
    Decimal::from_str(&format!("{x}"))
        .or_else(|_| Decimal::from_scientific(&format!("{x:e}")))
        .unwrap_or_default()
}

impl FSet {
    fn new(cfg: &AlarmsSection, mn: &str, factor: &str) -> FSet {
        let empty = FactorAlarms::default();
        let dev = cfg.device.get(mn);
        let g = cfg.factor.get(factor).unwrap_or(&empty);
        let d = dev.and_then(|d| d.factor.get(factor)).unwrap_or(&empty);
        let pct = |x: f64| dec(x) / Decimal::ONE_HUNDRED;
        FSet {
            agg_tol: pct(d
                .aggregate_tolerance
                .or(dev.and_then(|x| x.aggregate_tolerance))
                .or(g.aggregate_tolerance)
                .unwrap_or(cfg.aggregate_tolerance)),
            agg_abs: dec(d
                .aggregate_abs
                .or(g.aggregate_abs)
                .unwrap_or(cfg.aggregate_abs)),
            em_tol: pct(d
                .emission_tolerance
                .or(dev.and_then(|x| x.emission_tolerance))
                .or(g.emission_tolerance)
                .unwrap_or(cfg.emission_tolerance)),
            em_abs: dec(d
                .emission_abs
                .or(g.emission_abs)
                .unwrap_or(cfg.emission_abs)),
            cou_scale: dec(d.cou_scale.or(g.cou_scale).unwrap_or(1e-6)),
            agg_tol_f: 0.0,
            agg_abs_f: 0.0,
            em_tol_f: 0.0,
            em_abs_f: 0.0,
            cou_scale_f: 0.0,
        }
        .with_floats()
    }

    fn with_floats(mut self) -> FSet {
        self.agg_tol_f = f64_of(self.agg_tol);
        self.agg_abs_f = f64_of(self.agg_abs);
        self.em_tol_f = f64_of(self.em_tol);
        self.em_abs_f = f64_of(self.em_abs);
        self.cou_scale_f = f64_of(self.cou_scale);
        self
    }
}

/// Running sums of one open interval.
#[derive(Debug, Clone)]
struct Bucket {
    start: i64,
    width: i64,
    n: u32,
    /// Minutes of the hour (hours of the day) already counted: a record sent twice
    /// (a backfill) counts once.
    slots: u64,
    sum: Decimal,
    min: Decimal,
    max: Decimal,
    min_seq: u64,
    max_seq: u64,
    /// Fewest fraction digits among the values (their rounding unit).
    coarse: u32,
    /// The sum overflowed: the bucket is never judged.
    broken: bool,
}

/// One value going into a bucket.
struct Input {
    avg: Decimal,
    min: Decimal,
    max: Decimal,
    seq: u64,
    slot: Option<u32>,
}

fn add(buckets: &mut Vec<Bucket>, cap: usize, start: i64, width: i64, x: Input) {
    let scale = x.avg.scale().min(x.min.scale()).min(x.max.scale());
    let i = match buckets
        .iter()
        .rposition(|b| b.start == start && b.width == width)
    {
        Some(i) => i,
        None => {
            buckets.push(Bucket {
                start,
                width,
                n: 0,
                slots: 0,
                sum: Decimal::ZERO,
                min: x.min,
                max: x.max,
                min_seq: x.seq,
                max_seq: x.seq,
                coarse: scale,
                broken: false,
            });
            if buckets.len() > cap {
                let oldest = (0..buckets.len())
                    .min_by_key(|&j| buckets[j].start)
                    .unwrap_or(0);
                buckets.remove(oldest);
                match buckets
                    .iter()
                    .rposition(|b| b.start == start && b.width == width)
                {
                    Some(i) => i,
                    // The new one was the oldest: nothing to add to.
                    None => return,
                }
            } else {
                buckets.len() - 1
            }
        }
    };
    let b = &mut buckets[i];
    if let Some(s) = x.slot.filter(|&s| s < 64) {
        if b.slots & (1 << s) != 0 {
            return;
        }
        b.slots |= 1 << s;
    }
    b.n += 1;
    match b.sum.checked_add(x.avg) {
        Some(s) => b.sum = s,
        None => b.broken = true,
    }
    if x.min < b.min {
        b.min = x.min;
        b.min_seq = x.seq;
    }
    if x.max > b.max {
        b.max = x.max;
        b.max_seq = x.seq;
    }
    b.coarse = b.coarse.min(scale);
}

/// The start of the bucket of width `width` (boundaries at `align` mod `width`) holding `t`.
fn floor_to(t: i64, width: i64, align: i64) -> i64 {
    align + (t - align).div_euclid(width) * width
}

/// One unit of the last printed digit.
fn ulp(x: Decimal) -> Decimal {
    Decimal::new(1, x.scale().min(28))
}

fn ulp_of_scale(scale: u32) -> Decimal {
    Decimal::new(1, scale.min(28))
}

#[derive(Debug, Default)]
struct FactorCons {
    set: Option<FSet>,
    buckets: [Vec<Bucket>; 3],
    last_sample_ms: Option<i64>,
    /// Levels (bit 0: 2051, 1: 2061, 2: 2031) whose latest judged record was
    /// inconsistent: the factor's alarm clears only when none is.
    agg_bad: u8,
    em_bad: u8,
}

/// A device's consistency state.
#[derive(Debug, Default)]
pub(super) struct DeviceCons {
    set: Option<DevSet>,
    last_rt_ms: Option<i64>,
    cadence: Ring,
    last_minute_ms: Option<i64>,
    minute_steps: Ring,
    /// Bucket boundaries per level (ms mod the level's width), from the device's
    /// latest aggregate of the level above; `None` until one came.
    align: [Option<i64>; 3],
    /// Sorted by code.
    factors: Vec<(ShortText, FactorCons)>,
}

/// A level: 0 = 2051 over 2011, 1 = 2061 over 2051, 2 = 2031 over 2061.
const NAMES: [(&str, &str, &str, &str); 3] = [
    (
        "分钟",
        "实时数据",
        "minute (2051)",
        "real-time samples (2011)",
    ),
    ("小时", "分钟数据", "hour (2061)", "minute records (2051)"),
    ("日", "小时数据", "day (2031)", "hour records (2061)"),
];

/// What is wrong with an aggregate.
enum Problem {
    MaxBelow {
        max: Decimal,
        sample: Decimal,
    },
    MinAbove {
        min: Decimal,
        sample: Decimal,
    },
    Avg {
        avg: Decimal,
        mean: Decimal,
    },
    Order {
        min: Decimal,
        avg: Decimal,
        max: Decimal,
    },
}

impl DeviceCons {
    /// The factor's state; `None` when it is new and [`MAX_FACTORS`] (or
    /// `max_factors_per_device`) are tracked already.
    fn factor(&mut self, code: &str, cap: usize) -> Option<&mut FactorCons> {
        let i = self.index(code, cap)?;
        Some(&mut self.factors[i].1)
    }

    /// [`Self::factor`]'s index.
    fn index(&mut self, code: &str, cap: usize) -> Option<usize> {
        super::values::find_or_insert(&mut self.factors, code, cap, None)
    }

    /// The device's minute interval: configured, else learned.
    fn minute(&self, set: &DevSet) -> Option<i64> {
        set.minute.or_else(|| self.minute_steps.min())
    }

    fn align(&self, level: usize) -> i64 {
        self.align[level].unwrap_or(if level == 2 { BEIJING_MIDNIGHT } else { 0 })
    }

    /// One observation (an accepted, non-duplicate inbound frame). Clears are
    /// only proposed when `active` (the device has an active alarm at all).
    pub(super) fn observe(
        &mut self,
        cfg: &AlarmsSection,
        o: &Obs,
        active: bool,
        out: &mut Vec<Verdict>,
    ) {
        let set = *self.set.get_or_insert_with(|| DevSet::new(cfg, &o.mn));
        if !set.aggregate && !set.emission {
            return;
        }
        let Some(dt) = o.data_time_ms else { return };
        let cap = MAX_FACTORS.min(cfg.max_factors_per_device);
        match o.cn.as_str() {
            "2011" if set.aggregate => self.sample(&set, o, dt, cap),
            "2051" => self.aggregate(cfg, &set, o, dt, 0, cap, active, out),
            "2061" => self.aggregate(cfg, &set, o, dt, 1, cap, active, out),
            "2031" => self.aggregate(cfg, &set, o, dt, 2, cap, active, out),
            _ => {}
        }
    }

    fn sample(&mut self, set: &DevSet, o: &Obs, dt: i64, cap: usize) {
        if let Some(prev) = self.last_rt_ms {
            if dt > prev {
                self.cadence.push(dt - prev);
            }
        }
        self.last_rt_ms = Some(self.last_rt_ms.map_or(dt, |p| p.max(dt)));
        let width = self.minute(set).unwrap_or(MINUTE);
        let start = floor_to(dt, width, self.align(0));
        // Both lists are sorted by code and a device sends the same factors
        // every time: the factor is usually the one after the previous.
        let mut hint = 0;
        for f in o.values.iter() {
            let (mut rtd, mut normal) = (None, true);
            for (suffix, v) in f.iter() {
                match (suffix, v) {
                    ("Rtd", Val::Num(d)) => rtd = Some(*d),
                    ("Flag", Val::Text(t)) => normal = t.is("N"),
                    _ => {}
                }
            }
            let (Some(v), true) = (rtd, normal) else {
                continue;
            };
            let code = f.code();
            let i = match self.factors.get(hint) {
                Some((c, _)) if c.is(code) => hint,
                _ => match self.index(code, cap) {
                    Some(i) => i,
                    None => continue,
                },
            };
            hint = i + 1;
            let st = &mut self.factors[i].1;
            // Strictly increasing DataTimes: a re-sent sample counts once.
            if st.last_sample_ms.is_some_and(|l| dt <= l) {
                continue;
            }
            st.last_sample_ms = Some(dt);
            add(
                &mut st.buckets[0],
                MAX_BUCKETS[0],
                start,
                width,
                Input {
                    avg: v,
                    min: v,
                    max: v,
                    seq: o.seq,
                    slot: None,
                },
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn aggregate(
        &mut self,
        cfg: &AlarmsSection,
        set: &DevSet,
        o: &Obs,
        dt: i64,
        level: usize,
        cap: usize,
        active: bool,
        out: &mut Vec<Verdict>,
    ) {
        if level == 0 {
            if let Some(prev) = self.last_minute_ms {
                let step = dt - prev;
                if step > 0
                    && step % 1000 == 0
                    && MINUTE_INTERVALS.contains(&((step / 1000) as u64))
                {
                    self.minute_steps.push(step);
                }
            }
            self.last_minute_ms = Some(self.last_minute_ms.map_or(dt, |p| p.max(dt)));
        }
        let minute = self.minute(set);
        // The interval; `avg_ok` false while a 2051's is unknown (judged over its
        // first minute, Max and Min only).
        let (interval, avg_ok) = match level {
            0 => minute.map_or((MINUTE, false), |m| (m, true)),
            1 => (HOUR, true),
            _ => (DAY, true),
        };
        let start = if set.end_stamp { dt - interval } else { dt };
        self.align[level] = Some(start.rem_euclid(interval));
        // Expected input per interval, for coverage: one per cadence / minute / hour.
        let unit = match level {
            0 => self.cadence.median(),
            1 => minute,
            _ => Some(HOUR),
        };
        let up_align = (level < 2).then(|| {
            let w = if level == 0 { HOUR } else { DAY };
            (w, self.align(level + 1))
        });
        let flows = Flows::of(o, set.flow);
        for f in o.values.iter() {
            let (mut avg, mut min, mut max, mut cou) = (None, None, None, None);
            let mut normal = true;
            for (suffix, v) in f.iter() {
                match (suffix, v) {
                    ("Avg", Val::Num(d)) => avg = Some(*d),
                    ("Min", Val::Num(d)) => min = Some(*d),
                    ("Max", Val::Num(d)) => max = Some(*d),
                    ("Cou", Val::Num(d)) => cou = Some(*d),
                    ("Flag", Val::Text(t)) => normal = t.is("N"),
                    _ => {}
                }
            }
            if (avg.is_none() && min.is_none() && max.is_none()) || !normal {
                continue;
            }
            let code = f.code();
            let Some(st) = self.factor(code, cap) else {
                continue;
            };
            let fs = *st.set.get_or_insert_with(|| FSet::new(cfg, &o.mn, code));
            if set.aggregate {
                let judged = judge(
                    st, &fs, set, level, start, interval, avg_ok, unit, avg, min, max,
                );
                let key = DetectorKind::AggregateMismatch;
                match judged {
                    Some(Err((p, seqs))) => {
                        st.agg_bad |= 1 << level;
                        out.push(Verdict::Raise(aggregate_raise(o, code, level, dt, p, seqs)));
                    }
                    Some(Ok(())) => {
                        st.agg_bad &= !(1 << level);
                        if st.agg_bad == 0 && active {
                            out.push(Verdict::Clear {
                                kind: key,
                                factor: ShortText::new(code),
                            });
                        }
                    }
                    None => {}
                }
                if let (Some((w, al)), Some(a)) = (up_align, avg) {
                    let up = floor_to(start, w, al);
                    let slot_unit = if level == 0 { MINUTE } else { HOUR };
                    add(
                        &mut st.buckets[level + 1],
                        MAX_BUCKETS[level + 1],
                        up,
                        w,
                        Input {
                            avg: a,
                            min: min.unwrap_or(a),
                            max: max.unwrap_or(a),
                            seq: o.seq,
                            slot: u32::try_from((start - up) / slot_unit).ok(),
                        },
                    );
                }
            }
            if set.emission {
                let secs = if avg_ok { Some(interval / 1000) } else { None };
                let (Some(a), Some(c), Some(secs)) = (avg, cou, secs) else {
                    continue;
                };
                if !flows.clearly_fine(code, a, c, secs, &fs) {
                    let Some(e) = flows.expected(code, a, secs, fs.cou_scale) else {
                        continue;
                    };
                    let allowed = (e.value.abs() * fs.em_tol).max(fs.em_abs) + e.slack + ulp(c);
                    if (c - e.value).abs() > allowed {
                        st.em_bad |= 1 << level;
                        let r = emission_raise(o, code, level, dt, c, a, secs, &e);
                        out.push(Verdict::Raise(r));
                        continue;
                    }
                }
                st.em_bad &= !(1 << level);
                if st.em_bad == 0 && active {
                    out.push(Verdict::Clear {
                        kind: DetectorKind::EmissionMismatch,
                        factor: ShortText::new(code),
                    });
                }
            }
        }
    }
}

/// Judges one aggregate: `None` when there is nothing to judge, else whether it
/// holds (with the seqs supporting a failure).
#[allow(clippy::too_many_arguments)]
fn judge(
    st: &FactorCons,
    fs: &FSet,
    set: &DevSet,
    level: usize,
    start: i64,
    interval: i64,
    avg_ok: bool,
    unit: Option<i64>,
    avg: Option<Decimal>,
    min: Option<Decimal>,
    max: Option<Decimal>,
) -> Option<Result<(), (Problem, Vec<u64>)>> {
    // The record against itself: Min <= Avg <= Max needs no samples.
    let mut judged = false;
    let order = |lo: Decimal, hi: Decimal| lo > hi + ulp(lo).max(ulp(hi)) + fs.agg_abs;
    for (lo, hi) in [(min, avg), (avg, max), (min, max)] {
        if let (Some(lo), Some(hi)) = (lo, hi) {
            judged = true;
            if order(lo, hi) {
                let z = Decimal::ZERO;
                let p = Problem::Order {
                    min: min.unwrap_or(z),
                    avg: avg.unwrap_or(z),
                    max: max.unwrap_or(z),
                };
                return Some(Err((p, Vec::new())));
            }
        }
    }
    let verdict = |judged: bool| judged.then_some(Ok(()));
    // The buckets wholly inside [start, start + interval).
    let end = start + interval;
    let (mut n, mut sum) = (0u32, Decimal::ZERO);
    let mut lo: Option<(Decimal, u64)> = None;
    let mut hi: Option<(Decimal, u64)> = None;
    let mut coarse = u32::MAX;
    for b in &st.buckets[level] {
        let inside = b.start >= start && b.start + b.width <= end;
        let overlaps = b.start < end && b.start + b.width > start;
        if !inside {
            if overlaps {
                // Bucketed with other boundaries (the interval changed): the
                // samples of this interval cannot be told apart.
                return verdict(judged);
            }
            continue;
        }
        if b.broken {
            return verdict(judged);
        }
        n += b.n;
        sum = sum.checked_add(b.sum)?;
        if lo.is_none_or(|(x, _)| b.min < x) {
            lo = Some((b.min, b.min_seq));
        }
        if hi.is_none_or(|(x, _)| b.max > x) {
            hi = Some((b.max, b.max_seq));
        }
        coarse = coarse.min(b.coarse);
    }
    let (Some((lo, lo_seq)), Some((hi, hi_seq)), Some(unit)) = (lo, hi, unit) else {
        return verdict(judged);
    };
    // Coverage: n inputs of `unit` each against the interval.
    if i128::from(n) * i128::from(unit) * 10_000 < set.coverage_bp * i128::from(interval) {
        return verdict(judged);
    }
    let sample_ulp = ulp_of_scale(coarse);
    if let Some(m) = max {
        // Printed values are within one unit of their last digit of the true
        // ones (rounded or truncated): the larger unit covers both sides.
        if m + ulp(m).max(sample_ulp) + fs.agg_abs < hi {
            return Some(Err((
                Problem::MaxBelow { max: m, sample: hi },
                vec![hi_seq],
            )));
        }
    }
    if let Some(m) = min {
        if m - ulp(m).max(sample_ulp) - fs.agg_abs > lo {
            return Some(Err((
                Problem::MinAbove { min: m, sample: lo },
                vec![lo_seq],
            )));
        }
    }
    if let (Some(a), true) = (avg, avg_ok) {
        let mean_f = f64_of(sum) / f64::from(n);
        if clearly_within(f64_of(a), mean_f, fs.agg_tol_f, fs.agg_abs_f) {
            return Some(Ok(()));
        }
        // |a - sum/n| > tol |sum/n| + slack, multiplied out by n.
        let dn = Decimal::from(n);
        let slack = ulp(a) + sample_ulp;
        let diff = (a.checked_mul(dn)? - sum).abs();
        let allowed = (sum.abs() * fs.agg_tol).max(fs.agg_abs * dn) + slack * dn;
        if diff > allowed {
            let mean = sum.checked_div(dn)?;
            let p = Problem::Avg {
                avg: a,
                mean: mean.round_dp(a.scale().max(coarse).min(28) + 1),
            };
            return Some(Err((p, vec![lo_seq, hi_seq])));
        }
    }
    Some(Ok(()))
}

fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|x| x.to_rfc3339())
        .unwrap_or_default()
}

fn aggregate_raise(
    o: &Obs,
    f: &str,
    level: usize,
    dt: i64,
    p: Problem,
    mut seqs: Vec<u64>,
) -> Raise {
    let (lz, sz, le, se) = NAMES[level];
    let (mn, at) = (&o.mn, time_text(dt));
    let (zh, en) = match p {
        Problem::MaxBelow { max, sample } => (
            format!(
                "设备 {mn} 因子 {f} 的{lz}数据（{at}）最大值 {max} 低于该时段{sz}中的最大值 {sample}"
            ),
            format!(
                "device {mn} factor {f}: {le} record of {at} has Max {max}, below {sample} among its {se}"
            ),
        ),
        Problem::MinAbove { min, sample } => (
            format!(
                "设备 {mn} 因子 {f} 的{lz}数据（{at}）最小值 {min} 高于该时段{sz}中的最小值 {sample}"
            ),
            format!(
                "device {mn} factor {f}: {le} record of {at} has Min {min}, above {sample} among its {se}"
            ),
        ),
        Problem::Avg { avg, mean } => (
            format!(
                "设备 {mn} 因子 {f} 的{lz}数据（{at}）均值 {avg} 与该时段{sz}的均值 {mean} 不符"
            ),
            format!(
                "device {mn} factor {f}: {le} record of {at} has Avg {avg}, but its {se} average {mean}"
            ),
        ),
        Problem::Order { min, avg, max } => (
            format!(
                "设备 {mn} 因子 {f} 的{lz}数据（{at}）最小值 {min}、均值 {avg}、最大值 {max} 自相矛盾"
            ),
            format!(
                "device {mn} factor {f}: {le} record of {at} contradicts itself: Min {min}, Avg {avg}, Max {max}"
            ),
        ),
    };
    seqs.push(o.seq);
    seqs.sort_unstable();
    seqs.dedup();
    Raise {
        key: super::AlarmKey {
            kind: DetectorKind::AggregateMismatch,
            mn: o.mn.clone(),
            factor: f.to_owned(),
        },
        severity: Severity::Critical,
        start_ms: dt,
        seqs,
        message_zh: zh,
        message_en: en,
    }
}

#[allow(clippy::too_many_arguments)]
fn emission_raise(
    o: &Obs,
    f: &str,
    level: usize,
    dt: i64,
    cou: Decimal,
    avg: Decimal,
    secs: i64,
    e: &Expected,
) -> Raise {
    let (lz, _, le, _) = NAMES[level];
    let (mn, at) = (&o.mn, time_text(dt));
    let ev = e.value.round_dp(cou.scale().clamp(3, 28));
    let (zh, en) = match &e.flow {
        Some((code, q)) => (
            format!(
                "设备 {mn} 因子 {f} 的{lz}数据（{at}）排放量 {cou} 与浓度 {avg} × 流量 {code} {q} × {secs} 秒的计算值 {ev} 不符"
            ),
            format!(
                "device {mn} factor {f}: {le} record of {at} has Cou {cou}, but Avg {avg} x flow {code} {q} x {secs} s gives {ev}"
            ),
        ),
        None => (
            format!(
                "设备 {mn} 流量 {f} 的{lz}数据（{at}）累计流量 {cou} 与均值 {avg} × {secs} 秒的计算值 {ev} m³ 不符"
            ),
            format!(
                "device {mn} flow {f}: {le} record of {at} has Cou {cou}, but Avg {avg} x {secs} s gives {ev} m3"
            ),
        ),
    };
    Raise {
        key: super::AlarmKey {
            kind: DetectorKind::EmissionMismatch,
            mn: o.mn.clone(),
            factor: f.to_owned(),
        },
        severity: Severity::Critical,
        start_ms: dt,
        seqs: vec![o.seq],
        message_zh: zh,
        message_en: en,
    }
}

/// The flows of one record (their `Avg`, flagged normal), with the device's unit.
struct Flows<'a> {
    air: Option<(&'a str, Decimal)>,
    water: Option<(&'a str, Decimal)>,
    unit: Option<FlowUnit>,
}

/// An expected `Cou` and the rounding it cannot be held to.
struct Expected {
    value: Decimal,
    slack: Decimal,
    /// The flow it came from (`None` for a flow's own volume).
    flow: Option<(String, Decimal)>,
}

impl<'a> Flows<'a> {
    fn of(o: &'a Obs, unit: Option<FlowUnit>) -> Flows<'a> {
        let find = |codes: [&'static str; 2]| {
            codes.into_iter().find_map(|c| {
                let f = o.values.get(c)?;
                if f.text("Flag").is_some_and(|x| x != "N") {
                    return None;
                }
                Some((c, f.num("Avg")?))
            })
        };
        Flows {
            air: find(AIR_FLOW),
            water: find(WATER_FLOW),
            unit,
        }
    }

    /// Flue gas (`a…`, 2005 two-digit codes) or waste water (`w…`, three digits).
    fn is_air(code: &str) -> Option<bool> {
        match code.as_bytes().first()? {
            b'a' => Some(true),
            b'w' => Some(false),
            b'0'..=b'9' if code.len() == 2 => Some(true),
            b'0'..=b'9' if code.len() == 3 => Some(false),
            _ => None,
        }
    }

    /// Multiplier from the device's flow unit to the code table's (m3/s for flue
    /// gas, L/s for waste water), and from the table's to m3/s.
    fn factors(&self, air: bool) -> (Decimal, Decimal) {
        let d = |n: i64, m: i64| Decimal::from(n) / Decimal::from(m);
        let to_table = match (air, self.unit) {
            (_, None) => Decimal::ONE,
            (true, Some(FlowUnit::CubicMetresPerSecond)) => Decimal::ONE,
            (true, Some(FlowUnit::CubicMetresPerHour)) => d(1, 3600),
            (true, Some(FlowUnit::LitresPerSecond)) => d(1, 1000),
            (false, Some(FlowUnit::LitresPerSecond)) => Decimal::ONE,
            (false, Some(FlowUnit::CubicMetresPerSecond)) => Decimal::from(1000),
            (false, Some(FlowUnit::CubicMetresPerHour)) => d(5, 18),
        };
        let table_to_m3 = if air {
            Decimal::ONE
        } else {
            Decimal::new(1, 3)
        };
        (to_table, table_to_m3)
    }

    /// [`clearly_within`] for a `Cou`: false when the record lacks the flow or
    /// the value is anywhere near the limit (the exact check decides then).
    fn clearly_fine(&self, code: &str, avg: Decimal, cou: Decimal, secs: i64, fs: &FSet) -> bool {
        let air_flow = AIR_FLOW.contains(&code);
        let expected = if air_flow || WATER_FLOW.contains(&code) {
            let (to_table, to_m3) = self.factors(air_flow);
            f64_of(avg) * f64_of(to_table) * f64_of(to_m3) * secs as f64
        } else {
            let Some(air) = Flows::is_air(code) else {
                return false;
            };
            let Some((_, q)) = (if air { self.air } else { self.water }) else {
                return false;
            };
            let (to_table, _) = self.factors(air);
            f64_of(avg) * f64_of(q) * f64_of(to_table) * secs as f64 * fs.cou_scale_f
        };
        clearly_within(f64_of(cou), expected, fs.em_tol_f, fs.em_abs_f)
    }

    /// The `Cou` that `avg` of `code` over `secs` implies, if the record has the flow.
    fn expected(&self, code: &str, avg: Decimal, secs: i64, scale: Decimal) -> Option<Expected> {
        let t = Decimal::from(secs);
        let air_flow = AIR_FLOW.contains(&code);
        if air_flow || WATER_FLOW.contains(&code) {
            // The flow's own volume (m3): Avg x seconds.
            let (to_table, to_m3) = self.factors(air_flow);
            let k = to_table.checked_mul(to_m3)?.checked_mul(t)?;
            return Some(Expected {
                value: avg.checked_mul(k)?,
                slack: ulp(avg).checked_mul(k)?,
                flow: None,
            });
        }
        let air = Flows::is_air(code)?;
        let (flow_code, q) = if air { self.air? } else { self.water? };
        let (to_table, _) = self.factors(air);
        let k = to_table.checked_mul(t)?.checked_mul(scale)?;
        let value = avg.checked_mul(q)?.checked_mul(k)?;
        // Rounded inputs: |A q - A' q'| <= ulp(A) |q| + |A| ulp(q) + ulp(A) ulp(q).
        let (ua, uq) = (ulp(avg), ulp(q));
        let slack = (ua.checked_mul(q.abs())? + avg.abs().checked_mul(uq)? + ua.checked_mul(uq)?)
            .checked_mul(k)?;
        Some(Expected {
            value,
            slack,
            flow: Some((flow_code.to_owned(), q)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::engine::{Engine, obs};
    use super::super::{AlarmEvent, Obs};
    use super::*;
    use crate::config::Config;

    const MN: &str = "CONS0000000000000000001";
    /// A minute boundary (2026-05-28T20:26:40Z is not; this is 20:26:00).
    const T0: i64 = 1_780_000_000_000 - 40_000;

    fn cfg(extra: &str) -> AlarmsSection {
        Config::parse(extra, std::path::Path::new("t"))
            .unwrap()
            .alarms
    }

    fn ev_kinds(ev: &[AlarmEvent]) -> Vec<(String, &'static str, String)> {
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
        ev_kinds(ev).iter().any(|(w, k, _)| w == what && *k == kind)
    }

    fn mine(ev: &[AlarmEvent]) -> Vec<(String, &'static str, String)> {
        ev_kinds(ev)
            .into_iter()
            .filter(|(_, k, _)| matches!(*k, "aggregate.mismatch" | "emission.mismatch"))
            .collect()
    }

    struct Dev {
        e: Engine,
        seq: u64,
    }

    impl Dev {
        fn new(extra: &str) -> Dev {
            Dev {
                e: Engine::new(cfg(extra)),
                seq: 0,
            }
        }

        fn send(&mut self, cn: &str, at: i64, vals: &[(&str, &str, &str)]) -> Vec<AlarmEvent> {
            self.seq += 1;
            let mut o: Obs = obs(self.seq, MN, cn, at, vals);
            o.registered = true;
            self.e.observe(&o)
        }

        /// 2011 samples of a21026 every `step_s` seconds from `at`.
        fn samples(&mut self, at: i64, step_s: i64, vals: &[&str]) -> Vec<AlarmEvent> {
            let mut out = Vec::new();
            for (i, v) in vals.iter().enumerate() {
                out.extend(self.send(
                    "2011",
                    at + i as i64 * step_s * 1000,
                    &[("a21026", "Rtd", v), ("a21026", "Flag", "N")],
                ));
            }
            out
        }

        fn minute(&mut self, at: i64, min: &str, avg: &str, max: &str) -> Vec<AlarmEvent> {
            self.send(
                "2051",
                at,
                &[
                    ("a21026", "Min", min),
                    ("a21026", "Avg", avg),
                    ("a21026", "Max", max),
                    ("a21026", "Flag", "N"),
                ],
            )
        }
    }

    #[test]
    fn max_below_the_largest_sample_raises_and_a_consistent_minute_clears() {
        let mut d = Dev::new("");
        // Two samples per minute (30 s), a third minute to learn the cadence.
        d.samples(T0, 30, &["10.0", "14.0", "11.0", "12.0"]);
        // Minute 0: samples 10 and 14; Max 13 is below 14.
        let ev = d.minute(T0, "10.0", "12.0", "13.0");
        assert_eq!(
            mine(&ev),
            vec![("raise".into(), "aggregate.mismatch", "a21026".into())]
        );
        let AlarmEvent::Raise(r) = &ev[0] else {
            panic!()
        };
        assert_eq!(r.seqs, vec![2, 5], "the sample of 14 and the 2051");
        assert!(
            r.message_en.contains("Max 13.0, below 14.0"),
            "{}",
            r.message_en
        );
        assert!(r.message_zh.contains("最大值 13.0"), "{}", r.message_zh);
        // Minute 1: samples 11 and 12, consistent.
        let ev = d.minute(T0 + MINUTE, "11.0", "11.5", "12.0");
        assert_eq!(
            mine(&ev),
            vec![("clear".into(), "aggregate.mismatch", "a21026".into())]
        );
    }

    #[test]
    fn min_above_the_smallest_sample_raises() {
        let mut d = Dev::new("");
        d.samples(T0, 30, &["10.0", "14.0", "11.0"]);
        assert!(has(
            &d.minute(T0, "10.5", "12.0", "14.0"),
            "raise",
            "aggregate.mismatch"
        ));
    }

    /// Rounding is not falsification: a Max printed with fewer digits than the
    /// samples, and a Max one unit of its last digit low (truncation), hold.
    #[test]
    fn rounding_of_the_printed_digits_does_not_raise() {
        let mut d = Dev::new("");
        d.samples(T0, 30, &["12.34", "12.29", "12.31"]);
        assert!(mine(&d.minute(T0, "12.3", "12.3", "12.3")).is_empty());
        // 12.2 + 0.1 + 0.01 < 12.34: beyond rounding.
        let mut d = Dev::new("");
        d.samples(T0, 30, &["12.34", "12.29", "12.31"]);
        assert!(has(
            &d.minute(T0, "12.2", "12.3", "12.2"),
            "raise",
            "aggregate.mismatch"
        ));
    }

    #[test]
    fn avg_just_within_the_tolerance_holds_and_just_beyond_raises() {
        // 1-minute interval learned from two 2051s; samples every 30 s.
        let run = |avg: &str| {
            let mut d = Dev::new("[alarms]\naggregate_abs = 0\n");
            d.samples(T0, 30, &["100", "100", "100", "100", "100", "100"]);
            let mut ev = d.minute(T0, "100", "100", "100");
            ev.extend(d.minute(T0 + MINUTE, "100", "100", "100"));
            assert!(mine(&ev).is_empty(), "{ev:?}");
            // Samples 100 and 100: 10 % of 100 is 10, plus one unit of each last
            // digit (the Avg's 0.01, the samples' 1): 111 allowed.
            mine(&d.minute(T0 + 2 * MINUTE, "100", avg, "120"))
        };
        assert!(run("111.00").is_empty(), "within");
        assert_eq!(run("111.02").len(), 1, "beyond");
        // Before the interval is known, Avg is not judged (only Max/Min).
        let mut d = Dev::new("");
        d.samples(T0, 30, &["100", "100", "100"]);
        assert!(mine(&d.minute(T0, "100", "150", "150")).is_empty());
    }

    #[test]
    fn coverage_just_below_the_threshold_is_not_judged() {
        // One-minute interval configured, samples every 3 s: 20 expected per minute.
        let run = |n: usize| {
            let mut d = Dev::new(&format!("[alarms.device.{MN}]\nminute_interval = \"1m\"\n"));
            let vals: Vec<&str> = (0..n).map(|i| if i == 0 { "50" } else { "10" }).collect();
            // The cadence is learned from the steps: samples at 0, 3, 6, ... s.
            d.samples(T0, 3, &vals);
            mine(&d.minute(T0, "10", "10", "10"))
        };
        // 15 of 20 = 75 %: judged (Max 10 is below the sample 50).
        assert_eq!(run(15).len(), 1);
        // 14 of 20 = 70 %: not judged.
        assert!(run(14).is_empty());
    }

    #[test]
    fn flagged_samples_do_not_count() {
        let mut d = Dev::new("");
        d.samples(T0, 30, &["10", "11", "12"]);
        // A calibration value of 500 inside the minute, flagged C.
        d.send(
            "2011",
            T0 + 15_000,
            &[("a21026", "Rtd", "500"), ("a21026", "Flag", "C")],
        );
        assert!(mine(&d.minute(T0, "10", "10.5", "11")).is_empty());
    }

    #[test]
    fn end_stamped_devices_are_judged_over_the_minute_before() {
        let mut d = Dev::new(&format!(
            "[alarms.device.{MN}]\naggregate_stamp = \"end\"\n"
        ));
        d.samples(T0, 30, &["10.0", "14.0", "11.0"]);
        // Stamped T0 + 1 min: covers [T0, T0 + 1 min), samples 10 and 14.
        assert!(mine(&d.minute(T0 + MINUTE, "10.0", "12.0", "14.0")).is_empty());
        assert!(has(
            &d.minute(T0 + MINUTE, "10.0", "12.0", "13.0"),
            "raise",
            "aggregate.mismatch"
        ));
    }

    #[test]
    fn record_contradicting_itself_raises_without_samples() {
        let mut d = Dev::new("");
        assert!(has(
            &d.minute(T0, "10.0", "9.0", "12.0"),
            "raise",
            "aggregate.mismatch"
        ));
    }

    /// Hours against their minutes (and days against their hours): consistent
    /// ones hold, an hour whose Avg was edited down raises.
    #[test]
    fn hours_against_minutes_and_days_against_hours() {
        let mut d = Dev::new("");
        // A day-aligned start (Beijing midnight) so that a whole day fits.
        let day0 = (T0 - BEIJING_MIDNIGHT).div_euclid(DAY) * DAY + BEIJING_MIDNIGHT;
        let mut events = Vec::new();
        let mut hour_avgs = Vec::new();
        for h in 0..24i64 {
            let mut sum = 0i64;
            // 10-minute records, Avg 30..35 in tenths.
            for m in 0..6i64 {
                let v = 300 + (h * 7 + m * 3) % 50;
                sum += v;
                let t = day0 + h * HOUR + m * 10 * MINUTE;
                let s = |x: i64| format!("{}.{}", x / 10, x % 10);
                events.extend(d.send(
                    "2051",
                    t,
                    &[
                        ("a21026", "Min", &s(v - 5)),
                        ("a21026", "Avg", &s(v)),
                        ("a21026", "Max", &s(v + 5)),
                    ],
                ));
            }
            let avg = sum as f64 / 60.0;
            hour_avgs.push(avg);
            // Hour 5 reports its Avg edited 20 % down.
            let a = if h == 5 { avg * 0.8 } else { avg };
            let ev = d.send(
                "2061",
                day0 + h * HOUR,
                &[("a21026", "Avg", &format!("{a:.2}"))],
            );
            if h == 5 {
                assert!(has(&ev, "raise", "aggregate.mismatch"), "{ev:?}");
            } else if h == 6 {
                assert!(has(&ev, "clear", "aggregate.mismatch"), "{ev:?}");
            } else {
                events.extend(ev);
            }
        }
        assert!(mine(&events).is_empty(), "{:?}", mine(&events));
        // The day against its hours (the hours as reported, hour 5 edited).
        let reported: f64 = hour_avgs
            .iter()
            .enumerate()
            .map(|(h, a)| if h == 5 { a * 0.8 } else { *a })
            .sum::<f64>()
            / 24.0;
        let ev = d.send(
            "2031",
            day0,
            &[("a21026", "Avg", &format!("{reported:.2}"))],
        );
        assert!(mine(&ev).is_empty(), "{ev:?}");
        let ev = d.send(
            "2031",
            day0,
            &[("a21026", "Avg", &format!("{:.2}", reported * 0.85))],
        );
        assert!(has(&ev, "raise", "aggregate.mismatch"), "{ev:?}");
    }

    #[test]
    fn an_hour_with_too_few_minutes_is_not_judged() {
        let mut d = Dev::new("");
        // Minutes every 10 min, but only 4 of the hour's 6 (67 %).
        for m in [0, 1, 2, 3] {
            d.send("2051", T0 + m * 10 * MINUTE, &[("a21026", "Avg", "30.0")]);
        }
        assert!(
            mine(&d.send("2061", floor_to(T0, HOUR, 0), &[("a21026", "Avg", "60.0")])).is_empty()
        );
    }

    /// SO2 25 mg/m3 x 85 m3/s x 3600 s = 7.65 kg; flow 85 x 3600 = 306000 m3.
    #[test]
    fn emission_of_flue_gas_against_concentration_flow_and_time() {
        let hour = |cou: &str, flow_cou: &str| {
            let mut d = Dev::new("");
            let h = floor_to(T0, HOUR, 0);
            mine(&d.send(
                "2061",
                h,
                &[
                    ("a21026", "Avg", "25.00"),
                    ("a21026", "Cou", cou),
                    ("a00000", "Avg", "85.00"),
                    ("a00000", "Cou", flow_cou),
                ],
            ))
        };
        assert!(hour("7.650000", "306000").is_empty());
        // 10 % of 7.65 = 0.765, plus rounding of Avg and flow (~0.004): 8.419 holds.
        assert!(hour("8.41", "306000").is_empty(), "just within");
        assert_eq!(
            hour("8.43", "306000"),
            vec![("raise".into(), "emission.mismatch", "a21026".into())]
        );
        assert_eq!(
            hour("7.65", "250000"),
            vec![("raise".into(), "emission.mismatch", "a00000".into())]
        );
    }

    /// COD 45 mg/L x 12.5 L/s x 3600 s = 2.025 kg; 45 m3 of water.
    #[test]
    fn emission_of_waste_water_and_flow_units() {
        let mut d = Dev::new("");
        let h = floor_to(T0, HOUR, 0);
        let send = |d: &mut Dev, cou: &str, flow: &str, flow_cou: &str| {
            mine(&d.send(
                "2061",
                h,
                &[
                    ("w01018", "Avg", "45.0"),
                    ("w01018", "Cou", cou),
                    ("w00000", "Avg", flow),
                    ("w00000", "Cou", flow_cou),
                ],
            ))
        };
        assert!(send(&mut d, "2.025", "12.50", "45.00").is_empty());
        assert_eq!(send(&mut d, "1.5", "12.50", "45.00").len(), 1);
        assert_eq!(
            send(&mut d, "2.025", "12.50", "45.00"),
            vec![("clear".into(), "emission.mismatch", "w01018".into())]
        );
        // A device sending its flow in m3/h (45 m3/h = 12.5 L/s).
        let mut d = Dev::new(&format!("[alarms.device.{MN}]\nflow_unit = \"m3/h\"\n"));
        assert!(send(&mut d, "2.025", "45.00", "45.00").is_empty());
        let mut d = Dev::new("");
        assert!(!send(&mut d, "2.025", "45.00", "45.00").is_empty());
    }

    #[test]
    fn a_minute_emission_needs_the_interval() {
        let mut d = Dev::new("");
        fn rec(cou: &str) -> [(&str, &str, &str); 3] {
            [
                ("a21026", "Avg", "25.00"),
                ("a21026", "Cou", cou),
                ("a00000", "Avg", "85.00"),
            ]
        }
        // 25 x 85 x 600 s x 1e-6 = 1.275 kg; the first record's interval is unknown.
        assert!(mine(&d.send("2051", T0, &rec("9.9"))).is_empty());
        assert!(mine(&d.send("2051", T0 + 10 * MINUTE, &rec("1.275"))).is_empty());
        assert!(has(
            &d.send("2051", T0 + 20 * MINUTE, &rec("0.9")),
            "raise",
            "emission.mismatch"
        ));
    }

    #[test]
    fn disabled_detectors_keep_quiet() {
        let mut d = Dev::new("[alarms]\ndisabled = [\"aggregate.mismatch\"]\n");
        d.samples(T0, 30, &["10.0", "14.0", "11.0"]);
        assert!(mine(&d.minute(T0, "10.0", "12.0", "13.0")).is_empty());
    }

    /// A device inventing factor codes and never sending 2051 keeps bounded state.
    #[test]
    fn state_stays_within_the_caps() {
        let c = cfg("");
        let mut st = DeviceCons::default();
        let mut out = Vec::new();
        for i in 0..2000i64 {
            let code = format!("x{:05}", i % 500);
            let t = T0 + i * 30_000;
            let rt = obs(
                2 * i as u64,
                MN,
                "2011",
                t,
                &[(code.as_str(), "Rtd", "1.5")],
            );
            st.observe(&c, &rt, true, &mut out);
            let agg = [(code.as_str(), "Avg", "1.5"), ("a21026", "Avg", "1")];
            for cn in ["2051", "2061", "2031"] {
                st.observe(&c, &obs(2 * i as u64 + 1, MN, cn, t, &agg), true, &mut out);
            }
        }
        assert_eq!(st.factors.len(), MAX_FACTORS);
        for (_, f) in &st.factors {
            for (l, b) in f.buckets.iter().enumerate() {
                assert!(b.len() <= MAX_BUCKETS[l], "{l}: {}", b.len());
            }
        }
    }

    #[test]
    fn config_keys_are_checked_by_name() {
        let err = |t: &str| {
            Config::parse(t, std::path::Path::new("t.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("[alarms]\naggregate_coverage = 0").contains("`alarms.aggregate_coverage`"));
        assert!(err("[alarms]\nemission_tolerance = -1").contains("`alarms.emission_tolerance`"));
        assert!(
            err("[alarms.factor.a21026]\naggregate_abs = -1")
                .contains("`alarms.factor.a21026.aggregate_abs`")
        );
        assert!(
            err("[alarms.device.M1.factor.a21026]\ncou_scale = 0")
                .contains("`alarms.device.M1.factor.a21026.cou_scale`")
        );
        assert!(
            err("[alarms.device.M1]\nminute_interval = \"7m\"")
                .contains("`alarms.device.M1.minute_interval`")
        );
        assert!(
            err("[alarms.device.M1]\naggregate_coverage = 120")
                .contains("`alarms.device.M1.aggregate_coverage`")
        );
        assert!(err("[alarms.device.M1]\nflow_unit = \"gal/min\"").contains("flow_unit"));
        let c = cfg("[alarms.device.M1]\nflow_unit = \"L/s\"\naggregate_stamp = \"end\"\n");
        assert_eq!(c.device["M1"].flow_unit, Some(FlowUnit::LitresPerSecond));
        assert_eq!(c.aggregate_coverage, 75.0);
    }
}
