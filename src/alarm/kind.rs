//! The detectors' names: one enum, so that a misspelt kind is a compile error
//! instead of an alarm no metric, config key or stored row ever matches.

use std::cmp::Ordering;
use std::fmt;

/// Which detector raised an alarm. Its [`as_str`](DetectorKind::as_str) is what
/// the `alarms` table's `kind` column stores, `[alarms] disabled` names and the
/// `kind` label of `hj212_alarms_active` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DetectorKind {
    /// `device.offline`: nothing received for longer than the device's threshold.
    DeviceOffline,
    /// `data.gap`: a hole in a 2051/2061/2031 series.
    DataGap,
    /// `time.skew`: consecutive frames with a skewed or flagged clock.
    TimeSkew,
    /// `value.stuck`: identical consecutive samples of a factor.
    ValueStuck,
    /// `value.range`: a value outside its physical or configured bounds.
    ValueRange,
    /// `value.spike`: a sample far from the median of the last ones.
    ValueSpike,
    /// `flag.abnormal`: a data flag other than `N` for too long.
    FlagAbnormal,
    /// `limit.hugging`: samples kept just under the emission limit.
    LimitHugging,
    /// `converted.mismatch`: a converted (Zs) value inconsistent with O2.
    ConvertedMismatch,
    /// `aggregate.mismatch`: a 2051/2061/2031 Avg/Min/Max the samples beneath it
    /// do not allow.
    AggregateMismatch,
    /// `emission.mismatch`: a Cou inconsistent with concentration x flow x interval.
    EmissionMismatch,
    /// `series.copied`: an hour or day of a factor repeats an earlier one of the device.
    SeriesCopied,
    /// `device.cloned`: a window of a factor is the one another MN sent.
    DeviceCloned,
    /// `digits.biased`: the last digits of a factor are not used evenly.
    DigitsBiased,
}

impl DetectorKind {
    /// Every detector, in the order the README's table and the metrics list them.
    pub const ALL: [DetectorKind; 14] = [
        DetectorKind::DeviceOffline,
        DetectorKind::DataGap,
        DetectorKind::TimeSkew,
        DetectorKind::ValueStuck,
        DetectorKind::ValueRange,
        DetectorKind::ValueSpike,
        DetectorKind::FlagAbnormal,
        DetectorKind::LimitHugging,
        DetectorKind::ConvertedMismatch,
        DetectorKind::AggregateMismatch,
        DetectorKind::EmissionMismatch,
        DetectorKind::SeriesCopied,
        DetectorKind::DeviceCloned,
        DetectorKind::DigitsBiased,
    ];

    /// The stored and exported name, e.g. `value.stuck`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DetectorKind::DeviceOffline => "device.offline",
            DetectorKind::DataGap => "data.gap",
            DetectorKind::TimeSkew => "time.skew",
            DetectorKind::ValueStuck => "value.stuck",
            DetectorKind::ValueRange => "value.range",
            DetectorKind::ValueSpike => "value.spike",
            DetectorKind::FlagAbnormal => "flag.abnormal",
            DetectorKind::LimitHugging => "limit.hugging",
            DetectorKind::ConvertedMismatch => "converted.mismatch",
            DetectorKind::AggregateMismatch => "aggregate.mismatch",
            DetectorKind::EmissionMismatch => "emission.mismatch",
            DetectorKind::SeriesCopied => "series.copied",
            DetectorKind::DeviceCloned => "device.cloned",
            DetectorKind::DigitsBiased => "digits.biased",
        }
    }

    /// The detector named `name` (an [`as_str`](DetectorKind::as_str)), if any.
    pub fn from_name(name: &str) -> Option<DetectorKind> {
        DetectorKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// By name, as the stored strings sort: alarm keys (and so the order in which a
/// device's active alarms are cleared together) keep the order they had as strings.
impl Ord for DetectorKind {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for DetectorKind {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for DetectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for k in DetectorKind::ALL {
            assert_eq!(DetectorKind::from_name(k.as_str()), Some(k));
        }
        let mut names: Vec<_> = DetectorKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DetectorKind::ALL.len());
        assert_eq!(DetectorKind::from_name("value.rang"), None);
    }

    /// `[alarms] disabled` is checked against the config's list of names.
    #[test]
    fn the_config_accepts_exactly_these_names() {
        let names: Vec<_> = DetectorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, crate::config::DETECTORS);
    }

    /// The README's detector table lists every detector once, in this order.
    #[test]
    fn the_readme_table_lists_every_detector() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("### Detectors").expect("section")..];
        let section = &section[..section[4..].find("\n#").expect("section end")];
        let rows: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .collect();
        let names: Vec<_> = DetectorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(rows, names);
    }

    #[test]
    fn keys_sort_as_the_names_do() {
        let mut kinds = DetectorKind::ALL.to_vec();
        kinds.sort();
        let sorted: Vec<_> = kinds.iter().map(|k| k.as_str()).collect();
        let mut names: Vec<_> = DetectorKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(sorted, names);
    }
}
