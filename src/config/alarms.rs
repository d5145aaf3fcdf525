//! `[alarms]`: abnormal-data detection, with per-factor and per-device settings.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur, MAX_TRACKED, check_bounds};

/// `[alarms.factor.<code>]` (and `[alarms.device.<MN>.factor.<code>]`): per-factor settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FactorAlarms {
    /// Lowest plausible value (`value.range`); default 0 for concentrations, 0 for pH and O2.
    pub min: Option<f64>,
    /// Highest plausible value (`value.range`); default 14 for pH (w01001), 25 for O2 (a19001).
    pub max: Option<f64>,
    /// Emission limit (`limit.hugging`); no limit, no check.
    pub limit: Option<f64>,
    /// Overrides `alarms.stuck_count` for this factor.
    pub stuck_count: Option<u32>,
    /// Overrides `alarms.spike_k` for this factor.
    pub spike_k: Option<f64>,
    /// Overrides `alarms.copy_min_changes` for this factor.
    pub copy_min_changes: Option<u32>,
    /// Overrides `alarms.digits_window` for this factor; 0 switches `digits.biased`
    /// off for it (a factor whose last digit is structural in a way the rule misses).
    pub digits_window: Option<usize>,
    /// Overrides `alarms.digits_significance` for this factor.
    pub digits_significance: Option<f64>,
    /// The factor comes from an instrument several devices share (a plant's
    /// ambient temperature or pressure): `device.cloned` does not compare it.
    pub shared: Option<bool>,
    // aggregate.mismatch / emission.mismatch (src/alarm/consistency.rs).
    /// Overrides `alarms.aggregate_tolerance` for this factor.
    pub aggregate_tolerance: Option<f64>,
    /// Overrides `alarms.aggregate_abs` for this factor (in the factor's unit).
    pub aggregate_abs: Option<f64>,
    /// Overrides `alarms.emission_tolerance` for this factor.
    pub emission_tolerance: Option<f64>,
    /// Overrides `alarms.emission_abs` for this factor (in the unit of its `Cou`).
    pub emission_abs: Option<f64>,
    /// `emission.mismatch`: Cou = Avg x flow x seconds x this (default 1e-6: mg/m3
    /// x m3/s -> kg, mg/L x L/s -> kg, ug/L x L/s -> g; README "Detectors").
    pub cou_scale: Option<f64>,
}

/// `[alarms.device.<MN>] aggregate_stamp`: which end of its interval a
/// 2051/2061/2031 DataTime names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggregateStamp {
    /// The start, as HJ 212-2017 Table 4 defines it: `[DataTime, DataTime + interval)`.
    Start,
    /// The end: `[DataTime - interval, DataTime)` (some loggers).
    End,
}

/// `[alarms.device.<MN>] flow_unit`: the unit the device's flow factor
/// (a00000 / w00000, 2005 B02 / B01) is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FlowUnit {
    /// m3/s (the code table's unit of a00000).
    #[serde(rename = "m3/s")]
    CubicMetresPerSecond,
    /// m3/h.
    #[serde(rename = "m3/h")]
    CubicMetresPerHour,
    /// L/s (the code table's unit of w00000).
    #[serde(rename = "L/s")]
    LitresPerSecond,
}

/// `[alarms.device.<MN>]`: per-device settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceAlarms {
    /// Fixed `device.offline` threshold instead of the learned one.
    pub offline_after: Option<Dur>,
    /// Reference O2 (%) of this source, enables `converted.mismatch`.
    pub reference_o2: Option<f64>,
    /// Detectors switched off for this device.
    pub disabled: Vec<String>,
    /// Per-factor settings for this device (override `[alarms.factor]`).
    pub factor: std::collections::BTreeMap<String, FactorAlarms>,
    // aggregate.mismatch / emission.mismatch (src/alarm/consistency.rs).
    /// Overrides `alarms.aggregate_tolerance` for this device.
    pub aggregate_tolerance: Option<f64>,
    /// Overrides `alarms.aggregate_coverage` for this device.
    pub aggregate_coverage: Option<f64>,
    /// Overrides `alarms.emission_tolerance` for this device.
    pub emission_tolerance: Option<f64>,
    /// The device's 2051 interval (MinInterval); unset: learned from its 2051 DataTimes.
    pub minute_interval: Option<Dur>,
    /// Which end of the interval a 2051/2061/2031 DataTime names (default start).
    pub aggregate_stamp: Option<AggregateStamp>,
    /// The unit of the device's flow factor (default: the code table's).
    pub flow_unit: Option<FlowUnit>,
}

/// `[alarms]`: abnormal-data detection (see README "Alarms").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmsSection {
    /// Run the detector task at all.
    pub enabled: bool,
    /// How often the clock is ticked for `device.offline` (and new records polled).
    pub tick: Dur,
    /// Records re-read before the cursor on restart to rebuild detector state.
    pub lookback: usize,
    /// `device.offline`: silent for longer than this many learned 2011 intervals.
    pub offline_factor: u32,
    /// `device.offline` threshold until an interval is learned (and for video devices).
    pub offline_after: Dur,
    /// `device.offline` never fires sooner than this.
    pub offline_min: Dur,
    /// `time.skew`: |receive time - DataTime| of a 2011 frame beyond this is skewed.
    pub skew_threshold: Dur,
    /// `time.skew`: consecutive skewed (or clean) 2011 frames to raise (or clear).
    pub skew_count: u32,
    /// `value.stuck`: identical consecutive samples (flag N) that raise.
    pub stuck_count: u32,
    /// `value.spike`: rolling window of samples.
    pub spike_window: usize,
    /// `value.spike`: samples needed before judging.
    pub spike_min_samples: usize,
    /// `value.spike`: robust deviations (1.4826 x MAD) from the median that make a spike.
    pub spike_k: f64,
    /// `flag.abnormal`: a flag other than N lasting longer than this raises (S at once).
    pub flag_after: Dur,
    /// `limit.hugging`: samples considered.
    pub hugging_window: usize,
    /// `limit.hugging`: share of the window within the band that raises (clears below half).
    pub hugging_fraction: f64,
    /// `limit.hugging`: band under the limit, percent of the limit.
    pub hugging_band: f64,
    /// `converted.mismatch`: allowed relative difference, percent.
    pub mismatch_tolerance: f64,
    /// `converted.mismatch`: allowed absolute difference (rounding of small values).
    pub mismatch_abs: f64,
    /// Reference O2 (%) for all devices; unset means `converted.mismatch` only runs for
    /// devices with their own `reference_o2`.
    pub reference_o2: Option<f64>,
    /// Nice steps the detector's thread runs below the gateway (0 = the same).
    pub nice: u8,
    /// Devices outside the registry (and `[alarms.device]`) the detectors keep state
    /// for; past it the one heard from longest ago is forgotten and its alarms end.
    pub max_unregistered_devices: usize,
    /// Distinct factor codes the detectors keep state for per device (1..=10000):
    /// a device inventing a new code in every frame must not grow the engine
    /// without bound. Values of further codes are not judged (counted in
    /// `hj212_alarm_factors_untracked_total`).
    pub max_factors_per_device: usize,
    /// Failed commits of one step's alarm events after which they are set aside
    /// (dead letter `alarms`, reason `store_refused`) and the cursor moves on.
    /// 1..=1000.
    pub max_store_failures: u32,
    /// `aggregate.mismatch`: allowed difference of an Avg from the mean beneath
    /// it, percent of that mean.
    pub aggregate_tolerance: f64,
    /// `aggregate.mismatch`: allowed absolute difference (Avg, Min and Max).
    pub aggregate_abs: f64,
    /// `aggregate.mismatch`: percent of an interval's samples that must have been
    /// received before it is judged against them.
    pub aggregate_coverage: f64,
    /// `emission.mismatch`: allowed difference of a Cou from Avg x flow x
    /// interval, percent.
    pub emission_tolerance: f64,
    /// `emission.mismatch`: allowed absolute difference (unit of the Cou).
    pub emission_abs: f64,
    /// `series.copied`, `device.cloned`: an hour or day window of a factor is
    /// fingerprinted only if the step between its consecutive values changes at
    /// least this often (constant series and straight ramps repeat honestly).
    pub copy_min_changes: u32,
    /// `series.copied`: hour windows (2011 `Rtd`, 2051 `Avg`) looked back over, and
    /// fingerprints kept per factor and series (1..=744).
    pub copy_lookback_hours: usize,
    /// `series.copied`: day windows (2061 `Avg`) looked back over (1..=366).
    pub copy_lookback_days: usize,
    /// `device.cloned`: window fingerprints of all devices kept, the oldest
    /// forgotten first (1000..=10000000).
    pub clone_max_fingerprints: usize,
    /// `digits.biased`: 2011 values per factor in each tested window (100..=10000).
    pub digits_window: usize,
    /// `digits.biased`: significance of each window's chi-square test
    /// (1e-12..=0.05); two failed windows in a row raise.
    pub digits_significance: f64,
    /// `digits.biased`: the window's values must span at least this many units of
    /// their last digit to be judged (10..=1000000).
    pub digits_min_span: u32,
    /// Detectors switched off everywhere, e.g. `["value.stuck"]`.
    pub disabled: Vec<String>,
    /// Per-factor settings.
    pub factor: std::collections::BTreeMap<String, FactorAlarms>,
    /// Per-device settings, keyed by MN.
    pub device: std::collections::BTreeMap<String, DeviceAlarms>,
}

impl Default for AlarmsSection {
    fn default() -> Self {
        AlarmsSection {
            enabled: true,
            tick: Dur(Duration::from_secs(5)),
            lookback: 5000,
            offline_factor: 3,
            offline_after: Dur(Duration::from_secs(600)),
            offline_min: Dur(Duration::from_secs(60)),
            skew_threshold: Dur(Duration::from_secs(300)),
            skew_count: 3,
            stuck_count: 30,
            spike_window: 60,
            spike_min_samples: 20,
            spike_k: 8.0,
            flag_after: Dur(Duration::from_secs(3600)),
            hugging_window: 20,
            hugging_fraction: 0.8,
            hugging_band: 5.0,
            mismatch_tolerance: 5.0,
            mismatch_abs: 1.0,
            reference_o2: None,
            nice: 10,
            max_unregistered_devices: 5000,
            max_factors_per_device: 256,
            max_store_failures: 10,
            aggregate_tolerance: 10.0,
            aggregate_abs: 0.0,
            aggregate_coverage: 75.0,
            emission_tolerance: 10.0,
            emission_abs: 0.0,
            copy_min_changes: 10,
            copy_lookback_hours: 24,
            copy_lookback_days: 31,
            clone_max_fingerprints: 100_000,
            digits_window: 300,
            digits_significance: 1e-5,
            digits_min_span: 50,
            disabled: Vec::new(),
            factor: Default::default(),
            device: Default::default(),
        }
    }
}

impl AlarmsSection {
    /// Range checks, naming the key (`alarms.device.<MN>.factor.<code>.limit`).
    pub(super) fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let a = self;
        const S: fn(u64) -> Duration = Duration::from_secs;
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        let percent = |x: f64| non_negative(x) && x <= 1000.0;
        check_bounds(
            path,
            &[
                ("alarms.tick", a.tick.0, Duration::from_millis(100), S(300)),
                (
                    "alarms.offline_after",
                    a.offline_after.0,
                    S(1),
                    S(30 * 86_400),
                ),
                ("alarms.offline_min", a.offline_min.0, S(0), S(30 * 86_400)),
            ],
        )?;
        if !(1..=1000).contains(&a.max_store_failures) {
            return Err(bad(
                "alarms.max_store_failures".into(),
                "must be between 1 and 1000".into(),
            ));
        }
        let positive = [
            ("tick", a.tick.0.is_zero()),
            ("offline_factor", a.offline_factor == 0),
            ("offline_after", a.offline_after.0.is_zero()),
            ("skew_count", a.skew_count == 0),
            ("stuck_count", a.stuck_count < 2),
            ("spike_window", a.spike_window < 5),
            (
                "spike_min_samples",
                a.spike_min_samples < 5 || a.spike_min_samples > a.spike_window,
            ),
            ("spike_k", !(a.spike_k.is_finite() && a.spike_k > 0.0)),
            ("hugging_window", a.hugging_window < 2),
            (
                "hugging_fraction",
                !(a.hugging_fraction > 0.0 && a.hugging_fraction <= 1.0),
            ),
            (
                "hugging_band",
                !(a.hugging_band > 0.0 && a.hugging_band < 100.0),
            ),
            (
                "mismatch_tolerance",
                !(a.mismatch_tolerance >= 0.0 && a.mismatch_tolerance.is_finite()),
            ),
            (
                "mismatch_abs",
                !(a.mismatch_abs >= 0.0 && a.mismatch_abs.is_finite()),
            ),
            ("nice", a.nice > 19),
            (
                "max_unregistered_devices",
                a.max_unregistered_devices == 0 || a.max_unregistered_devices > MAX_TRACKED,
            ),
            (
                "max_factors_per_device",
                !(1..=10_000).contains(&a.max_factors_per_device),
            ),
            ("aggregate_tolerance", !percent(a.aggregate_tolerance)),
            ("aggregate_abs", !non_negative(a.aggregate_abs)),
            (
                "aggregate_coverage",
                !(a.aggregate_coverage > 0.0 && a.aggregate_coverage <= 100.0),
            ),
            ("emission_tolerance", !percent(a.emission_tolerance)),
            ("emission_abs", !non_negative(a.emission_abs)),
            (
                "copy_min_changes",
                !(3..=1000).contains(&a.copy_min_changes),
            ),
            (
                "copy_lookback_hours",
                !(1..=744).contains(&a.copy_lookback_hours),
            ),
            (
                "copy_lookback_days",
                !(1..=366).contains(&a.copy_lookback_days),
            ),
            (
                "clone_max_fingerprints",
                !(1000..=10_000_000).contains(&a.clone_max_fingerprints),
            ),
            ("digits_window", !(100..=10_000).contains(&a.digits_window)),
            (
                "digits_significance",
                !(1e-12..=0.05).contains(&a.digits_significance),
            ),
            (
                "digits_min_span",
                !(10..=1_000_000).contains(&a.digits_min_span),
            ),
        ];
        for (k, wrong) in positive {
            if wrong {
                return Err(bad(
                    format!("alarms.{k}"),
                    "out of range (see deploy/gateway.toml)".into(),
                ));
            }
        }
        let o2 = |key: String, v: Option<f64>| match v {
            Some(x) if !(0.0..21.0).contains(&x) => Err(bad(key, "must be in 0..21 (%)".into())),
            _ => Ok(()),
        };
        o2("alarms.reference_o2".into(), a.reference_o2)?;
        let names = |key: String, list: &[String]| {
            for d in list {
                if !DETECTORS.contains(&d.as_str()) {
                    return Err(bad(
                        key,
                        format!("{d:?} is not a detector; expected one of {DETECTORS:?}"),
                    ));
                }
            }
            Ok(())
        };
        names("alarms.disabled".into(), &a.disabled)?;
        let factors = |prefix: String, f: &std::collections::BTreeMap<String, FactorAlarms>| {
            for (code, fa) in f {
                let k = |x: &str| format!("{prefix}.{code}.{x}");
                for (name, v) in [
                    ("min", fa.min),
                    ("max", fa.max),
                    ("limit", fa.limit),
                    ("spike_k", fa.spike_k),
                ] {
                    if v.is_some_and(|x| !x.is_finite()) {
                        return Err(bad(k(name), "must be a finite number".into()));
                    }
                }
                if let (Some(lo), Some(hi)) = (fa.min, fa.max) {
                    if lo > hi {
                        return Err(bad(k("min"), "greater than max".into()));
                    }
                }
                if fa.limit.is_some_and(|l| l <= 0.0) {
                    return Err(bad(k("limit"), "must be positive".into()));
                }
                if fa.stuck_count.is_some_and(|n| n < 2) {
                    return Err(bad(k("stuck_count"), "must be at least 2".into()));
                }
                if fa.spike_k.is_some_and(|x| x <= 0.0) {
                    return Err(bad(k("spike_k"), "must be positive".into()));
                }
                for (name, v) in [
                    ("aggregate_tolerance", fa.aggregate_tolerance),
                    ("emission_tolerance", fa.emission_tolerance),
                ] {
                    if v.is_some_and(|x| !percent(x)) {
                        return Err(bad(k(name), "must be a percentage in 0..1000".into()));
                    }
                }
                for (name, v) in [
                    ("aggregate_abs", fa.aggregate_abs),
                    ("emission_abs", fa.emission_abs),
                ] {
                    if v.is_some_and(|x| !non_negative(x)) {
                        return Err(bad(k(name), "must be a number >= 0".into()));
                    }
                }
                if fa.cou_scale.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
                    return Err(bad(k("cou_scale"), "must be a positive number".into()));
                }
                if fa
                    .copy_min_changes
                    .is_some_and(|n| !(3..=1000).contains(&n))
                {
                    return Err(bad(k("copy_min_changes"), "must be in 3..=1000".into()));
                }
                if fa
                    .digits_window
                    .is_some_and(|n| n != 0 && !(100..=10_000).contains(&n))
                {
                    return Err(bad(
                        k("digits_window"),
                        "must be 0 (off) or in 100..=10000".into(),
                    ));
                }
                if fa
                    .digits_significance
                    .is_some_and(|x| !(1e-12..=0.05).contains(&x))
                {
                    return Err(bad(
                        k("digits_significance"),
                        "must be in 1e-12..=0.05".into(),
                    ));
                }
            }
            Ok(())
        };
        factors("alarms.factor".into(), &a.factor)?;
        for (mn, d) in &a.device {
            let p = format!("alarms.device.{mn}");
            o2(format!("{p}.reference_o2"), d.reference_o2)?;
            names(format!("{p}.disabled"), &d.disabled)?;
            if d.offline_after.is_some_and(|x| x.0.is_zero()) {
                return Err(bad(format!("{p}.offline_after"), "must be positive".into()));
            }
            factors(format!("{p}.factor"), &d.factor)?;
            for (name, v) in [
                ("aggregate_tolerance", d.aggregate_tolerance),
                ("emission_tolerance", d.emission_tolerance),
            ] {
                if v.is_some_and(|x| !percent(x)) {
                    return Err(bad(
                        format!("{p}.{name}"),
                        "must be a percentage in 0..1000".into(),
                    ));
                }
            }
            if d.aggregate_coverage
                .is_some_and(|x| !(x > 0.0 && x <= 100.0))
            {
                return Err(bad(
                    format!("{p}.aggregate_coverage"),
                    "must be in (0, 100] (%)".into(),
                ));
            }
            if let Some(m) = d.minute_interval {
                if !MINUTE_INTERVALS.contains(&m.0.as_secs()) || m.0.subsec_nanos() != 0 {
                    return Err(bad(
                        format!("{p}.minute_interval"),
                        "must be one of the MinInterval values 1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 minutes".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The minute-data intervals HJ 212-2017 allows (`MinInterval`, Table 4), in seconds.
pub const MINUTE_INTERVALS: [u64; 11] = [60, 120, 180, 240, 300, 360, 600, 720, 900, 1200, 1800];

/// Detector names accepted in `disabled`.
pub const DETECTORS: &[&str] = &[
    "device.offline",
    "data.gap",
    "time.skew",
    "value.stuck",
    "value.range",
    "value.spike",
    "flag.abnormal",
    "limit.hugging",
    "converted.mismatch",
    "aggregate.mismatch",
    "emission.mismatch",
    "series.copied",
    "device.cloned",
    "digits.biased",
];

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::err;
    use std::path::Path;

    #[test]
    fn alarms_keys() {
        let c = Config::parse("", Path::new("t")).unwrap();
        assert!(c.alarms.enabled);
        assert_eq!(c.alarms.stuck_count, 30);
        let c = Config::parse(
            "[alarms.factor.a21026]\nlimit = 100\n[alarms.device.M1]\nreference_o2 = 9\noffline_after = \"3m\"\n[alarms.device.M1.factor.a21002]\nmax = 500",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(c.alarms.factor["a21026"].limit, Some(100.0));
        assert_eq!(c.alarms.device["M1"].factor["a21002"].max, Some(500.0));
        assert!(err("[alarms]\nstuck_count = 1").contains("`alarms.stuck_count`"));
        assert!(err("[alarms]\nspike_k = -1").contains("`alarms.spike_k`"));
        assert!(err("[alarms]\ndisabled = [\"value.stuk\"]").contains("`alarms.disabled`"));
        assert!(err("[alarms]\nreference_o2 = 21").contains("`alarms.reference_o2`"));
        assert_eq!(c.alarms.max_unregistered_devices, 5000);
        assert_eq!(c.alarms.max_factors_per_device, 256);
        assert!(
            err("[alarms]\nmax_factors_per_device = 0").contains("`alarms.max_factors_per_device`")
        );
        assert!(
            err("[alarms]\nmax_unregistered_devices = 0")
                .contains("`alarms.max_unregistered_devices`")
        );
        assert!(
            err("[alarms.factor.a21026]\nmin = 5\nmax = 1").contains("`alarms.factor.a21026.min`")
        );
        assert!(
            err("[alarms.device.M1.factor.a21026]\nlimit = 0")
                .contains("`alarms.device.M1.factor.a21026.limit`")
        );
        assert!(
            err("[alarms.device.M1]\nreference_o2 = 30")
                .contains("`alarms.device.M1.reference_o2`")
        );
        assert!(err("[alarms]\nstuck = 3").contains("stuck"));
        assert_eq!(c.alarms.digits_window, 300);
        assert_eq!(c.alarms.copy_lookback_hours, 24);
        for (text, key) in [
            (
                "[alarms]\ncopy_min_changes = 2",
                "`alarms.copy_min_changes`",
            ),
            (
                "[alarms]\ncopy_lookback_hours = 0",
                "`alarms.copy_lookback_hours`",
            ),
            (
                "[alarms]\ncopy_lookback_days = 400",
                "`alarms.copy_lookback_days`",
            ),
            (
                "[alarms]\nclone_max_fingerprints = 10",
                "`alarms.clone_max_fingerprints`",
            ),
            ("[alarms]\ndigits_window = 50", "`alarms.digits_window`"),
            (
                "[alarms]\ndigits_significance = 0.5",
                "`alarms.digits_significance`",
            ),
            ("[alarms]\ndigits_min_span = 1", "`alarms.digits_min_span`"),
            (
                "[alarms.factor.a21026]\ndigits_window = 20",
                "`alarms.factor.a21026.digits_window`",
            ),
            (
                "[alarms.device.M1.factor.a21026]\ndigits_significance = 0",
                "`alarms.device.M1.factor.a21026.digits_significance`",
            ),
            (
                "[alarms.factor.a21026]\ncopy_min_changes = 1",
                "`alarms.factor.a21026.copy_min_changes`",
            ),
        ] {
            assert!(err(text).contains(key), "{text}: {}", err(text));
        }
        let c = Config::parse(
            "[alarms]\ndisabled = [\"digits.biased\"]\n[alarms.factor.a21026]\ndigits_window = 0",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(c.alarms.factor["a21026"].digits_window, Some(0));
    }
}
