//! Who the simulated devices are (MN, dialect, kind, key) and what they measure.
//!
//! Everything derives from `--seed` and the device index, so a test or a
//! second process can predict every MN and key without talking to the first.

use crate::protocol::Dialect;
use crate::protocol::build::put_fixed;

/// A device's edition, with 2025 split into clear and SM4-encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edition {
    /// HJ/T 212-2005: 14-char MN, numeric codes, QN only when acks are wanted.
    V2005,
    /// HJ 212-2017.
    V2017,
    /// HJ 212-2025, clear CP.
    V2025,
    /// HJ 212-2025 with the CP of data uploads SM4-encrypted.
    V2025Encrypted,
}

impl Edition {
    /// Parses a `--dialects` name.
    pub fn parse(s: &str) -> Option<Edition> {
        match s {
            "2005" => Some(Edition::V2005),
            "2017" => Some(Edition::V2017),
            "2025" => Some(Edition::V2025),
            "2025e" | "2025-sm4" => Some(Edition::V2025Encrypted),
            _ => None,
        }
    }

    /// The protocol dialect.
    pub fn dialect(self) -> Dialect {
        match self {
            Edition::V2005 => Dialect::V2005,
            Edition::V2017 => Dialect::V2017,
            Edition::V2025 | Edition::V2025Encrypted => Dialect::V2025,
        }
    }

    /// MN length: 14 in 2005, 24 later.
    pub fn mn_len(self) -> usize {
        if self == Edition::V2005 { 14 } else { 24 }
    }
}

/// What the device monitors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Flue gas (ST=31).
    Air,
    /// Waste water (ST=32).
    Water,
}

impl Kind {
    /// Parses a `--kinds` name.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "air" | "flue-gas" => Some(Kind::Air),
            "water" | "waste-water" => Some(Kind::Water),
            _ => None,
        }
    }

    /// The ST code.
    pub fn st(self) -> &'static str {
        match self {
            Kind::Air => "31",
            Kind::Water => "32",
        }
    }
}

/// Picks from a weighted mix by slot: slot `s` (mod the weight sum) falls in
/// the entry whose cumulative weight range holds it, so `2017=1,2025e=1` gives
/// even indices 2017 and odd ones 2025e.
pub fn pick<T: Copy>(mix: &[(T, u32)], slot: u64) -> T {
    let total: u64 = mix.iter().map(|&(_, w)| u64::from(w)).sum();
    let mut s = slot % total.max(1);
    for &(t, w) in mix {
        if s < u64::from(w) {
            return t;
        }
        s -= u64::from(w);
    }
    mix[0].0
}

/// Sum of a mix's weights.
pub fn weight(mix: &[(impl Copy, u32)]) -> u64 {
    mix.iter().map(|&(_, w)| u64::from(w)).sum()
}

/// SplitMix64: a tiny, good-enough generator for plausible values.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform value in [0, 1).
pub fn unit(state: &mut u64) -> f64 {
    (splitmix(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// The default MN prefix for a seed: `99` and the seed's low 16 bits in hex.
pub fn default_prefix(seed: u64) -> String {
    format!("99{:04X}", seed & 0xFFFF)
}

/// Device `index`'s MN: the prefix, then the index zero-padded to the
/// edition's MN length (14 for 2005, 24 otherwise).
pub fn mn(prefix: &str, edition: Edition, index: u64) -> String {
    let width = edition.mn_len().saturating_sub(prefix.len());
    format!("{prefix}{index:0width$}")
}

/// Device `index`'s SM4 key (only used by encrypted 2025 devices).
pub fn key(seed: u64, index: u64) -> [u8; 16] {
    let mut s = seed ^ 0x5EED_4B45_5900_0000 ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let a = splitmix(&mut s).to_be_bytes();
    let b = splitmix(&mut s).to_be_bytes();
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a);
    k[8..].copy_from_slice(&b);
    k
}

/// One monitored factor with a plausible operating range.
#[derive(Debug)]
pub struct Factor {
    /// 2017/2025 code.
    pub code: &'static str,
    /// HJ/T 212-2005 code; `None` if 2005 had none (not sent by 2005 devices).
    pub code_2005: Option<&'static str>,
    /// Typical value.
    pub base: f64,
    /// Relative variation around it.
    pub spread: f64,
    /// Fraction digits.
    pub decimals: u8,
    /// Reported also as a reference-oxygen converted value (`-ZsRtd`/`-ZsAvg`).
    pub converted: bool,
    /// Has a cumulative amount (`-Cou`) in minute/hour/day data.
    pub cumulative: bool,
}

const fn fx(
    code: &'static str,
    code_2005: Option<&'static str>,
    base: f64,
    spread: f64,
    decimals: u8,
    converted: bool,
    cumulative: bool,
) -> Factor {
    Factor {
        code,
        code_2005,
        base,
        spread,
        decimals,
        converted,
        cumulative,
    }
}

/// Flue gas: what every CEMS reports.
pub static AIR: &[Factor] = &[
    fx("a34013", Some("01"), 8.0, 0.3, 2, true, true),
    fx("a21026", Some("02"), 25.0, 0.3, 2, true, true),
    fx("a21002", Some("03"), 60.0, 0.25, 2, true, true),
    fx("a19001", Some("S01"), 9.5, 0.1, 2, false, false),
    fx("a01011", Some("S02"), 12.0, 0.1, 2, false, false),
    fx("a01012", Some("S03"), 65.0, 0.05, 1, false, false),
    fx("a01013", Some("S08"), 0.35, 0.2, 3, false, false),
    fx("a01014", Some("S05"), 8.5, 0.1, 2, false, false),
    fx("a00000", Some("B02"), 85.0, 0.1, 2, false, true),
];

/// Flue gas: further factors some stacks have, used to pad to `--frame-size`.
pub static AIR_EXTRA: &[Factor] = &[
    fx("a21005", Some("04"), 30.0, 0.3, 2, true, true),
    fx("a21024", Some("08"), 5.0, 0.3, 2, true, true),
    fx("a21028", Some("05"), 1.2, 0.3, 3, false, true),
    fx("a24087", Some("25"), 4.0, 0.2, 2, false, true),
    fx("a25003", Some("17"), 0.5, 0.3, 3, false, true),
    fx("a25005", Some("18"), 0.4, 0.3, 3, false, true),
    fx("a01015", Some("S06"), 4.5, 0.1, 1, false, false),
    fx("a01017", Some("S04"), 0.25, 0.2, 3, false, false),
    fx("a01016", Some("S07"), 7.07, 0.0, 2, false, false),
    fx("a21001", Some("10"), 2.5, 0.3, 2, false, true),
    fx("a21003", None, 40.0, 0.25, 2, true, true),
    fx("a21004", None, 5.0, 0.3, 2, true, true),
    fx("a24088", None, 3.0, 0.2, 2, false, true),
    fx("a25002", None, 0.3, 0.3, 3, false, true),
    fx("a01901", None, 880.0, 0.03, 1, false, false),
    fx("a01902", None, 860.0, 0.03, 1, false, false),
];

/// Waste water: what every outfall station reports.
pub static WATER: &[Factor] = &[
    fx("w01018", Some("011"), 45.0, 0.2, 2, false, true),
    fx("w21003", Some("060"), 2.5, 0.3, 3, false, true),
    fx("w01001", Some("001"), 7.4, 0.04, 2, false, false),
    fx("w00000", Some("B01"), 12.5, 0.2, 2, false, true),
    fx("w21011", Some("101"), 0.3, 0.3, 3, false, true),
    fx("w21001", Some("065"), 12.0, 0.2, 2, false, true),
];

/// Waste water: further factors, used to pad to `--frame-size`.
pub static WATER_EXTRA: &[Factor] = &[
    fx("w01017", Some("010"), 12.0, 0.2, 2, false, true),
    fx("w01020", Some("015"), 15.0, 0.2, 2, false, true),
    fx("w21016", Some("070"), 0.005, 0.3, 4, false, true),
    fx("w22001", Some("080"), 0.3, 0.3, 3, false, true),
    fx("w23002", Some("110"), 0.02, 0.3, 4, false, true),
    fx("w20116", Some("023"), 0.02, 0.3, 4, false, true),
    fx("w20121", Some("028"), 0.01, 0.3, 4, false, true),
    fx("w20122", Some("029"), 0.05, 0.3, 4, false, true),
    fx("w20123", Some("030"), 0.1, 0.3, 3, false, true),
    fx("w20111", Some("020"), 0.05, 0.3, 3, false, true),
    fx("w20115", Some("022"), 0.3, 0.3, 3, false, true),
    fx("w20119", Some("026"), 1.2, 0.3, 2, false, true),
    fx("w20120", Some("027"), 2.0, 0.3, 2, false, true),
    fx("w01002", Some("002"), 8.0, 0.2, 0, false, false),
    fx("w01010", None, 22.0, 0.05, 1, false, false),
    fx("w01014", None, 850.0, 0.05, 0, false, false),
    fx("w01009", None, 6.5, 0.1, 2, false, false),
    fx("w01019", None, 4.2, 0.2, 2, false, true),
];

/// Which data a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    /// 2011: `-Rtd`, `-Flag`.
    Realtime,
    /// 2051 / 2061 / 2031 over `secs` seconds: `-Cou`, `-Min`, `-Avg`, `-Max`,
    /// `-Flag`, drawn at random but consistent in themselves (Min <= Avg <= Max,
    /// Cou = Avg x flow x secs); a [`Logger`]'s are derived from its samples.
    Aggregate {
        /// The interval.
        secs: u32,
    },
}

/// The flow factor of a kind (a00000 / w00000), whose `Avg` the `Cou` of the
/// others follows from.
fn is_flow(f: &Factor) -> bool {
    matches!(f.code, "a00000" | "w00000")
}

/// `Cou` of an interval of `secs` seconds, in the code table's units (HJ212.md
/// §6.2; README "Detectors"): a pollutant's mass `avg x flow x secs x 1e-6`
/// (mg/m3 x m3/s -> kg, mg/L x L/s -> kg, ug/L x L/s -> g); a flow's own volume
/// in m3 (flue gas m3/s x s; waste water L/s x s / 1000).
fn cou(f: &Factor, kind: Kind, avg: f64, flow: f64, secs: f64) -> f64 {
    if is_flow(f) {
        match kind {
            Kind::Air => avg * secs,
            Kind::Water => avg * secs / 1000.0,
        }
    } else {
        avg * flow * secs * 1e-6
    }
}

/// Fraction digits of a `Cou`: masses in kg need six, volumes in m3 two.
fn cou_decimals(f: &Factor) -> u8 {
    if is_flow(f) { 2 } else { 6 }
}

/// Fraction digits of an aggregate's `Avg`: one more than its samples'.
fn avg_decimals(f: &Factor) -> u8 {
    (f.decimals + 1).min(6)
}

/// `x` as it reads printed with `d` fraction digits (what `put_fixed` writes).
fn printed(x: f64, d: u8) -> f64 {
    let s = 10f64.powi(i32::from(d.min(6)));
    (x * s).round() / s
}

/// Writes an aggregate group (no leading separator).
fn put_aggregate(
    out: &mut Vec<u8>,
    f: &Factor,
    code: &str,
    (min, avg, max): (f64, f64, f64),
    cou: Option<f64>,
) {
    let key = |out: &mut Vec<u8>, suffix: &[u8]| {
        out.extend_from_slice(code.as_bytes());
        out.push(b'-');
        out.extend_from_slice(suffix);
        out.push(b'=');
    };
    if let Some(c) = cou {
        key(out, b"Cou");
        put_fixed(out, c, cou_decimals(f));
        out.push(b',');
    }
    key(out, b"Min");
    put_fixed(out, min, f.decimals);
    out.push(b',');
    key(out, b"Avg");
    put_fixed(out, avg, avg_decimals(f));
    out.push(b',');
    key(out, b"Max");
    put_fixed(out, max, f.decimals);
    out.extend_from_slice(b",");
    key(out, b"Flag");
    out.push(b'N');
}

/// One level of a logger's running aggregate of a factor.
#[derive(Debug, Clone, Copy)]
struct Acc {
    n: u32,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for Acc {
    fn default() -> Acc {
        Acc {
            n: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Acc {
    fn add(&mut self, avg: f64, min: f64, max: f64) {
        self.n += 1;
        self.sum += avg;
        self.min = self.min.min(min);
        self.max = self.max.max(max);
    }
}

/// A simulated data logger's memory: per factor (the kind's standard ones,
/// then its extras) the running minute, hour and day aggregates. Minutes are
/// made of the samples the logger uploaded (or measured, when 2011 is not
/// sent), hours of the minutes, days of the hours, each from the values as
/// printed, so the levels agree the way `aggregate.mismatch` checks them.
#[derive(Debug, Clone)]
pub struct Logger {
    kind: Kind,
    edition: Edition,
    acc: Vec<[Acc; 3]>,
}

impl Logger {
    /// A logger with nothing measured yet (and nothing allocated: an idle
    /// fleet's devices never measure).
    pub fn new(kind: Kind, edition: Edition) -> Logger {
        Logger {
            kind,
            edition,
            acc: Vec::new(),
        }
    }

    fn ensure(&mut self) {
        if self.acc.is_empty() {
            let (main, extra) = tables(self.kind);
            self.acc = vec![[Acc::default(); 3]; main.len() + extra.len()];
        }
    }

    fn code(&self, f: &'static Factor) -> Option<&'static str> {
        if self.edition == Edition::V2005 {
            f.code_2005
        } else {
            Some(f.code)
        }
    }

    /// One measurement of every factor at a real-time tick, written as the
    /// factor groups of a 2011 CP when `upload` (within `frame_size`, as
    /// [`put_factors`] does); what was written (all of it without `upload`)
    /// goes into the minute.
    #[allow(clippy::too_many_arguments)]
    pub fn realtime(
        &mut self,
        out: &mut Vec<u8>,
        upload: bool,
        seed: u64,
        index: u64,
        rng: &mut u64,
        frame_start: usize,
        frame_size: Option<usize>,
    ) {
        self.ensure();
        let (main, n) = (
            tables(self.kind).0,
            factor_count(self.kind, upload, frame_size),
        );
        for k in 0..n {
            let f = factor_at(self.kind, k);
            let Some(code) = self.code(f) else { continue };
            let lvl = level(seed, index, k);
            let x = printed(
                f.base * lvl * (1.0 + f.spread * (2.0 * unit(rng) - 1.0)),
                f.decimals,
            );
            if upload {
                let before = out.len();
                out.push(b';');
                put_factor_value(out, f, code, x);
                if k >= main.len()
                    && frame_size.is_some_and(|limit| out.len() - frame_start + 8 > limit)
                {
                    out.truncate(before);
                    continue;
                }
            }
            self.acc[k][0].add(x, x, x);
        }
    }

    /// Closes the current minute (`lv` 0), hour (1) or day (2) of `secs`
    /// seconds: writes the factor groups of its 2051/2061/2031 CP when `upload`
    /// and passes what was written (everything without `upload`) on to the next
    /// level. A factor with nothing measured in the interval (the run began in
    /// it) gets values drawn at random, consistent in themselves.
    #[allow(clippy::too_many_arguments)]
    pub fn close(
        &mut self,
        out: &mut Vec<u8>,
        upload: bool,
        lv: usize,
        secs: u32,
        seed: u64,
        index: u64,
        rng: &mut u64,
        frame_start: usize,
        frame_size: Option<usize>,
    ) {
        self.ensure();
        let (main, n) = (
            tables(self.kind).0,
            factor_count(self.kind, upload, frame_size),
        );
        let factor = |k: usize| factor_at(self.kind, k);
        let mut values = [(0.0, 0.0, 0.0); 32];
        for (k, v) in values.iter_mut().enumerate().take(n) {
            let f = factor(k);
            let a = self.acc[k][lv];
            *v = if a.n > 0 {
                (
                    a.min,
                    printed(a.sum / f64::from(a.n), avg_decimals(f)),
                    a.max,
                )
            } else {
                drawn(f, level(seed, index, k), rng)
            };
        }
        let flow = (0..n)
            .find(|&k| is_flow(factor(k)))
            .map_or(0.0, |k| values[k].1);
        for (k, &(min, avg, max)) in values.iter().enumerate().take(n) {
            let f = factor(k);
            self.acc[k][lv] = Acc::default();
            let Some(code) = self.code(f) else { continue };
            if upload {
                let before = out.len();
                out.push(b';');
                let c = f
                    .cumulative
                    .then(|| cou(f, self.kind, avg, flow, f64::from(secs)));
                put_aggregate(out, f, code, (min, avg, max), c);
                if k >= main.len()
                    && frame_size.is_some_and(|limit| out.len() - frame_start + 8 > limit)
                {
                    out.truncate(before);
                    continue;
                }
            }
            if lv < 2 {
                self.acc[k][lv + 1].add(avg, min, max);
            }
        }
    }
}

/// Three random values of a factor as (min, avg, max), printed.
fn drawn(f: &Factor, level: f64, rng: &mut u64) -> (f64, f64, f64) {
    let mut v = || {
        printed(
            f.base * level * (1.0 + f.spread * (2.0 * unit(rng) - 1.0)),
            f.decimals,
        )
    };
    let (a, b, c) = (v(), v(), v());
    (
        a.min(b).min(c),
        printed((a + b + c) / 3.0, avg_decimals(f)),
        a.max(b).max(c),
    )
}

/// Writes a real-time group (no leading separator).
fn put_factor_value(out: &mut Vec<u8>, f: &Factor, code: &str, x: f64) {
    let key = |out: &mut Vec<u8>, suffix: &[u8]| {
        out.extend_from_slice(code.as_bytes());
        out.push(b'-');
        out.extend_from_slice(suffix);
        out.push(b'=');
    };
    key(out, b"Rtd");
    put_fixed(out, x, f.decimals);
    if f.converted {
        out.push(b',');
        key(out, b"ZsRtd");
        put_fixed(out, x * 1.21, f.decimals);
    }
    out.extend_from_slice(b",");
    key(out, b"Flag");
    out.push(b'N');
}

/// How many of a kind's factors a record carries: the standard ones, and the
/// extra ones too when a frame size is to be filled or nothing is uploaded
/// (the accumulators still take every factor).
fn factor_count(kind: Kind, upload: bool, frame_size: Option<usize>) -> usize {
    let (main, extra) = tables(kind);
    if frame_size.is_some() || !upload {
        main.len() + extra.len()
    } else {
        main.len()
    }
}

/// Factor `k` of a kind, counting the standard factors first, then the extra.
fn factor_at(kind: Kind, k: usize) -> &'static Factor {
    let (main, extra) = tables(kind);
    if k < main.len() {
        &main[k]
    } else {
        &extra[k - main.len()]
    }
}

/// The standard and extra factors of a kind.
fn tables(kind: Kind) -> (&'static [Factor], &'static [Factor]) {
    match kind {
        Kind::Air => (AIR, AIR_EXTRA),
        Kind::Water => (WATER, WATER_EXTRA),
    }
}

/// Writes one factor group (no leading separator); `flow` is the record's flow
/// (min, avg, max), drawn first because every `Cou` follows from its `Avg`.
#[allow(clippy::too_many_arguments)]
fn put_factor(
    out: &mut Vec<u8>,
    f: &Factor,
    code: &str,
    kind: Kind,
    series: Series,
    level: f64,
    flow: (f64, f64, f64),
    rng: &mut u64,
) {
    match series {
        Series::Realtime => {
            let x = f.base * level * (1.0 + f.spread * (2.0 * unit(rng) - 1.0));
            put_factor_value(out, f, code, x);
        }
        Series::Aggregate { secs } => {
            let (min, avg, max) = if is_flow(f) {
                flow
            } else {
                drawn(f, level, rng)
            };
            let c = f
                .cumulative
                .then(|| cou(f, kind, avg, flow.1, f64::from(secs)));
            put_aggregate(out, f, code, (min, avg, max), c);
        }
    }
}

/// A device's per-factor level (stacks differ), stable for a seed and index.
fn level(seed: u64, index: u64, k: usize) -> f64 {
    let mut s = seed ^ index.rotate_left(17) ^ (k as u64).wrapping_mul(0xA24B_AED4_963E_E407);
    0.7 + 0.6 * unit(&mut s)
}

/// Writes the factor groups of a data CP after `DataTime=...`: the kind's
/// standard factors, then extras while the whole frame stays within
/// `frame_size` bytes (`frame_start` is where the frame began in `out`;
/// 8 bytes for `&&`, CRC and CR LF follow the CP).
#[allow(clippy::too_many_arguments)]
pub fn put_factors(
    out: &mut Vec<u8>,
    kind: Kind,
    edition: Edition,
    series: Series,
    seed: u64,
    index: u64,
    rng: &mut u64,
    frame_start: usize,
    frame_size: Option<usize>,
) {
    let (main, extra) = tables(kind);
    let flow = match series {
        Series::Aggregate { .. } => main
            .iter()
            .enumerate()
            .find(|(_, f)| is_flow(f))
            .map_or((0.0, 0.0, 0.0), |(k, f)| {
                drawn(f, level(seed, index, k), rng)
            }),
        Series::Realtime => (0.0, 0.0, 0.0),
    };
    let code_of = |f: &'static Factor| {
        if edition == Edition::V2005 {
            f.code_2005
        } else {
            Some(f.code)
        }
    };
    for (k, f) in main.iter().enumerate() {
        if let Some(code) = code_of(f) {
            out.push(b';');
            put_factor(out, f, code, kind, series, level(seed, index, k), flow, rng);
        }
    }
    let Some(limit) = frame_size else { return };
    for (k, f) in extra.iter().enumerate() {
        let Some(code) = code_of(f) else { continue };
        let before = out.len();
        out.push(b';');
        put_factor(
            out,
            f,
            code,
            kind,
            series,
            level(seed, index, k + main.len()),
            flow,
            rng,
        );
        // A group that does not fit is dropped and a smaller one tried.
        if out.len() - frame_start + 8 > limit {
            out.truncate(before);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::alarm::engine::Engine;
    use crate::alarm::{AlarmEvent, Obs};
    use crate::protocol::build::{self, Civil, Head};
    use crate::protocol::{self, Options, json};

    /// 2026-05-28T16:00:00Z, midnight in Beijing: a whole day ahead.
    const T0: i64 = 1_779_984_000_000;
    const TZ: i32 = 8 * 3600;

    struct Gateway {
        engine: Engine,
        seq: u64,
        events: Vec<AlarmEvent>,
    }

    impl Gateway {
        /// What the detector makes of a frame with this CP (after DataTime).
        fn feed(&mut self, mn: &str, cn: u16, at: i64, groups: &[u8]) {
            let qn = Civil::from_unix_ms(at, TZ).qn();
            let head = Head {
                qn: Some(&qn[..]),
                st: "31",
                cn,
                pw: "123456",
                mn,
                flag: Some(5),
                split: None,
            };
            let mut frame = Vec::new();
            build::device_frame(&mut frame, &head, None, |b| {
                b.extend_from_slice(b"DataTime=");
                Civil::from_unix_ms(at, TZ).put_n14(b);
                b.extend_from_slice(groups);
            });
            let now = chrono::DateTime::from_timestamp_millis(at).expect("in range");
            let f = protocol::decode(Bytes::from(frame), &Options::new(now), &());
            assert!(!f.has_error(), "{:?}", f.findings);
            self.seq += 1;
            let findings = serde_json::to_string(&f.findings).expect("findings");
            let mut o = Obs::from_doc(self.seq, at, &json::frame_doc(&f), &findings, false, false)
                .expect("an observation");
            o.registered = true;
            self.events.extend(self.engine.observe(&o));
        }

        fn mine(&self) -> Vec<String> {
            self.events
                .iter()
                .map(|e| e.key())
                .filter(|k| matches!(k.kind.as_str(), "aggregate.mismatch" | "emission.mismatch"))
                .map(|k| format!("{} {}", k.kind, k.factor))
                .collect()
        }
    }

    /// A simulated logger's 2011, 2051 (every minute), 2061 and 2031 over a day,
    /// through the decoder and the detector: no aggregate.mismatch and no
    /// emission.mismatch. Then the same logger's next records, edited (a minute's
    /// Max lowered to its Avg, an hour's SO2 Cou raised by half), raise both: the
    /// clean day was judged, not skipped.
    #[test]
    fn a_simulated_logger_is_consistent_across_levels_and_edits_are_caught() {
        let cfg = crate::config::Config::parse("", std::path::Path::new("t"))
            .expect("config")
            .alarms;
        let mut gw = Gateway {
            engine: Engine::new(cfg),
            seq: 0,
            events: Vec::new(),
        };
        let mn = "99000700000000000000000003";
        let mut logger = Logger::new(Kind::Air, Edition::V2017);
        let mut rng = 7u64;
        let mut b = Vec::new();
        // Samples every 20 s; minutes, hours and the day close on their boundaries.
        let step = 20_000;
        let mut t = T0;
        while t < T0 + 86_400_000 {
            b.clear();
            logger.realtime(&mut b, true, 7, 3, &mut rng, 0, Some(1000));
            gw.feed(mn, 2011, t, &b);
            t += step;
            if t % 60_000 == 0 {
                b.clear();
                logger.close(&mut b, true, 0, 60, 7, 3, &mut rng, 0, Some(1000));
                gw.feed(mn, 2051, t - 60_000, &b);
            }
            if t % 3_600_000 == 0 {
                b.clear();
                logger.close(&mut b, true, 1, 3600, 7, 3, &mut rng, 0, Some(1000));
                gw.feed(mn, 2061, t - 3_600_000, &b);
            }
        }
        b.clear();
        logger.close(&mut b, true, 2, 86_400, 7, 3, &mut rng, 0, Some(1000));
        gw.feed(mn, 2031, T0, &b);
        assert!(gw.mine().is_empty(), "{:?}", gw.mine());

        // The next minute, its SO2 Max replaced by its Avg.
        for i in 0..3 {
            b.clear();
            logger.realtime(&mut b, true, 7, 3, &mut rng, 0, Some(1000));
            gw.feed(mn, 2011, t + i * step, &b);
        }
        b.clear();
        logger.close(&mut b, true, 0, 60, 7, 3, &mut rng, 0, Some(1000));
        let text = String::from_utf8(b.clone()).expect("ascii");
        let (avg_at, avg_end) = field_in(&text, "a21026-Avg=");
        let avg = text[avg_at..avg_end].to_owned();
        let (max_at, max_end) = field_in(&text, "a21026-Max=");
        let edited = format!("{}{avg}{}", &text[..max_at], &text[max_end..]);
        gw.feed(mn, 2051, t, edited.as_bytes());
        assert_eq!(gw.mine(), ["aggregate.mismatch a21026"]);

        // An hour whose SO2 Cou was raised by half.
        b.clear();
        logger.close(&mut b, true, 1, 3600, 7, 3, &mut rng, 0, Some(1000));
        let text = String::from_utf8(b.clone()).expect("ascii");
        let (cou_at, cou_end) = field_in(&text, "a21026-Cou=");
        let cou: f64 = text[cou_at..cou_end].parse().expect("a number");
        let edited = format!("{}{:.6}{}", &text[..cou_at], cou * 1.5, &text[cou_end..]);
        gw.feed(mn, 2061, t, edited.as_bytes());
        assert_eq!(
            gw.mine(),
            ["aggregate.mismatch a21026", "emission.mismatch a21026"]
        );
    }

    fn field_in(text: &str, name: &str) -> (usize, usize) {
        let at = text.find(name).expect(name) + name.len();
        let end = text[at..].find([',', ';']).map_or(text.len(), |e| at + e);
        (at, end)
    }

    /// Drawn aggregates (history answers, bursts) hold together by themselves:
    /// Min <= Avg <= Max and Cou = Avg x flow x interval.
    #[test]
    fn drawn_aggregates_are_consistent_in_themselves() {
        let cfg = crate::config::Config::parse("", std::path::Path::new("t"))
            .expect("config")
            .alarms;
        let mut gw = Gateway {
            engine: Engine::new(cfg),
            seq: 0,
            events: Vec::new(),
        };
        for kind in [Kind::Air, Kind::Water] {
            for i in 0..200u64 {
                let mut rng = i;
                let mut b = Vec::new();
                put_factors(
                    &mut b,
                    kind,
                    Edition::V2017,
                    Series::Aggregate { secs: 3600 },
                    1,
                    i,
                    &mut rng,
                    0,
                    Some(1000),
                );
                gw.feed(&format!("D{i}"), 2061, T0 + i as i64 * 3_600_000, &b);
            }
        }
        assert!(gw.mine().is_empty(), "{:?}", gw.mine());
    }
}
