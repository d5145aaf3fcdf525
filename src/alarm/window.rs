//! The spike detector's sliding window, kept sorted as it slides.
//!
//! `value.spike` needs the median and the MAD (median absolute deviation) of the
//! last `spike_window` values before every new value of every factor of every
//! frame. Copying and selecting twice per value was the detector's largest cost;
//! here an insert and a removal move at most `spike_window` floats, the median is
//! read off the sorted side, and the MAD is a selection over the two sorted halves
//! (their deviations grow monotonically away from the median), with no
//! allocation. Results are bit-identical to selecting over a copy: the same order
//! statistics of the same multiset under `f64::total_cmp`.

use std::collections::VecDeque;

/// Values in arrival order and in sorted order.
#[derive(Debug, Default, Clone)]
pub(crate) struct Window {
    fifo: VecDeque<f64>,
    sorted: Vec<f64>,
}

impl Window {
    /// Values held.
    pub(crate) fn len(&self) -> usize {
        self.fifo.len()
    }

    /// Appends `x`, dropping the oldest value once more than `cap` are held.
    pub(crate) fn push(&mut self, x: f64, cap: usize) {
        let at = self.sorted.partition_point(|y| y.total_cmp(&x).is_lt());
        self.sorted.insert(at, x);
        self.fifo.push_back(x);
        if self.fifo.len() > cap {
            let old = self.fifo.pop_front().expect("more than cap >= 0 held");
            // total_cmp equality is bit equality: whichever equal copy is found is it.
            let i = self
                .sorted
                .binary_search_by(|y| y.total_cmp(&old))
                .expect("every held value is in the sorted side");
            self.sorted.remove(i);
        }
    }

    /// `(median, MAD)`; for an even count the mean of the two middle values, as
    /// for the deviations. `(0, 0)` when empty.
    pub(crate) fn median_mad(&self) -> (f64, f64) {
        let s = &self.sorted;
        let n = s.len();
        if n == 0 {
            return (0.0, 0.0);
        }
        let k = n / 2;
        let med = if n % 2 == 1 {
            s[k]
        } else {
            (s[k - 1] + s[k]) / 2.0
        };
        // s[..k] <= med <= s[k..], so |y - med| grows leftwards from k - 1 on the one
        // side and rightwards from k on the other: two sorted runs, whose merged
        // q-th value is found by bisecting how many of the q + 1 smallest come from
        // the left run (O(log n), no merge).
        let left = |i: usize| (s[k - 1 - i] - med).abs();
        let right = |j: usize| (s[k + j] - med).abs();
        let (a, b) = (k, n - k);
        let nth = |q: usize| {
            let (mut lo, mut hi) = ((q + 1).saturating_sub(b), a.min(q + 1));
            while lo < hi {
                let i = (lo + hi) / 2;
                // Taking i from the left leaves the right run's q - i in: too many
                // from the right while that one exceeds the next left value.
                if right(q - i) > left(i) {
                    lo = i + 1;
                } else {
                    hi = i;
                }
            }
            let i = lo;
            let l = (i > 0).then(|| left(i - 1));
            let r = (q + 1 > i).then(|| right(q - i));
            match (l, r) {
                (Some(x), Some(y)) => x.max(y),
                (Some(x), None) => x,
                (None, Some(y)) => y,
                (None, None) => 0.0,
            }
        };
        let mad = if n % 2 == 1 {
            nth(k)
        } else {
            (nth(k - 1) + nth(k)) / 2.0
        };
        (med, mad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The computation this window replaces: selection over a copy.
    fn median_by_selection(v: &mut [f64]) -> f64 {
        let n = v.len();
        if n == 0 {
            return 0.0;
        }
        let (below, &mut upper, _) = v.select_nth_unstable_by(n / 2, f64::total_cmp);
        if n % 2 == 1 {
            upper
        } else {
            let lower = below
                .iter()
                .copied()
                .max_by(f64::total_cmp)
                .unwrap_or(upper);
            (lower + upper) / 2.0
        }
    }

    fn reference(values: &VecDeque<f64>) -> (f64, f64) {
        let mut w: Vec<f64> = values.iter().copied().collect();
        let med = median_by_selection(&mut w);
        let mut dev: Vec<f64> = w.iter().map(|y| (y - med).abs()).collect();
        (med, median_by_selection(&mut dev))
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn median_and_mad_equal_selection_on_random_windows() {
        let mut rng = Lcg(9);
        let mut checked = 0u64;
        for cap in 1..=60usize {
            for style in 0..4 {
                let mut w = Window::default();
                let mut shadow = VecDeque::new();
                for _ in 0..(3 * cap + 20) {
                    let r = rng.next();
                    let x = match style {
                        // Few distinct values: many duplicates, flat windows.
                        0 => (r % 4) as f64,
                        // Device-like decimals with two fraction digits.
                        1 => (r % 10_000) as f64 / 100.0 + 20.0,
                        // Signed, wide range, some exact zeros and negative zeros.
                        2 => match r % 7 {
                            0 => 0.0,
                            1 => -0.0,
                            _ => (r as f64 - 2_147_483_648.0) * 1e-3,
                        },
                        // Two clusters far apart: medians between them.
                        _ => (r % 1000) as f64 * 1e-3 + if r % 2 == 0 { 0.0 } else { 1e6 },
                    };
                    w.push(x, cap);
                    shadow.push_back(x);
                    if shadow.len() > cap {
                        shadow.pop_front();
                    }
                    let (m, d) = w.median_mad();
                    let (rm, rd) = reference(&shadow);
                    assert_eq!(w.len(), shadow.len());
                    assert_eq!(
                        (m.to_bits(), d.to_bits()),
                        (rm.to_bits(), rd.to_bits()),
                        "cap {cap} style {style} window {shadow:?}: {m} {d} vs {rm} {rd}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 10_000);
    }

    #[test]
    fn empty_window_is_zero() {
        assert_eq!(Window::default().median_mad(), (0.0, 0.0));
    }
}
