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
    /// 2051 / 2061 / 2031: `-Cou`, `-Min`, `-Avg`, `-Max`, `-Flag`.
    Aggregate,
}

/// Writes one factor group (no leading separator).
fn put_factor(
    out: &mut Vec<u8>,
    f: &Factor,
    code: &str,
    series: Series,
    level: f64,
    rng: &mut u64,
) {
    let mut v = || f.base * level * (1.0 + f.spread * (2.0 * unit(rng) - 1.0));
    let key = |out: &mut Vec<u8>, suffix: &[u8]| {
        out.extend_from_slice(code.as_bytes());
        out.push(b'-');
        out.extend_from_slice(suffix);
        out.push(b'=');
    };
    match series {
        Series::Realtime => {
            let x = v();
            key(out, b"Rtd");
            put_fixed(out, x, f.decimals);
            if f.converted {
                out.push(b',');
                key(out, b"ZsRtd");
                put_fixed(out, x * 1.21, f.decimals);
            }
        }
        Series::Aggregate => {
            let (a, b, c) = (v(), v(), v());
            let min = a.min(b).min(c);
            let max = a.max(b).max(c);
            let avg = (a + b + c) / 3.0;
            if f.cumulative {
                key(out, b"Cou");
                put_fixed(out, avg * 0.36, f.decimals.max(2));
                out.push(b',');
            }
            key(out, b"Min");
            put_fixed(out, min, f.decimals);
            out.push(b',');
            key(out, b"Avg");
            put_fixed(out, avg, f.decimals);
            out.push(b',');
            key(out, b"Max");
            put_fixed(out, max, f.decimals);
        }
    }
    out.extend_from_slice(b",");
    key(out, b"Flag");
    out.push(b'N');
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
    let (main, extra) = match kind {
        Kind::Air => (AIR, AIR_EXTRA),
        Kind::Water => (WATER, WATER_EXTRA),
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
            put_factor(out, f, code, series, level(seed, index, k), rng);
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
            series,
            level(seed, index, k + main.len()),
            rng,
        );
        // A group that does not fit is dropped and a smaller one tried.
        if out.len() - frame_start + 8 > limit {
            out.truncate(before);
        }
    }
}
