//! Which edition of HJ 212 a frame speaks.
//!
//! Rule (HJ 212-2017 Table 3, 2025 §6.3.2): Flag bits 7..2 are the version
//! V5..V0: `000000` HJ/T 212-2005, `000001` HJ 212-2017, `000010` HJ 212-2025.
//! Version 2 is shared with the surface-water station protocol (HJ 1404-2024
//! draft), which only a per-device override can tell apart. 2005 uploads often
//! carry no Flag at all (HJ/T 212-2005 App. C), so a missing Flag means 2005
//! unless the frame looks like a 2017 frame that merely dropped it.

use serde::Serialize;

/// An HJ 212 edition (or a variant sharing its envelope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub enum Dialect {
    /// HJ/T 212-2005.
    #[serde(rename = "2005")]
    V2005,
    /// HJ 212-2017.
    #[serde(rename = "2017")]
    V2017,
    /// HJ 212-2025.
    #[serde(rename = "2025")]
    V2025,
    /// Surface-water automatic station protocol (Flag version 2, own code tables).
    #[serde(rename = "surface-water")]
    SurfaceWater,
}

impl Dialect {
    /// Stable name used in JSON, config and the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::V2005 => "2005",
            Dialect::V2017 => "2017",
            Dialect::V2025 => "2025",
            Dialect::SurfaceWater => "surface-water",
        }
    }

    /// Parses a config or CLI value.
    pub fn parse(text: &str) -> Option<Dialect> {
        match text {
            "2005" => Some(Dialect::V2005),
            "2017" => Some(Dialect::V2017),
            "2025" => Some(Dialect::V2025),
            "surface-water" => Some(Dialect::SurfaceWater),
            _ => None,
        }
    }

    /// The Flag version bits (V5..V0) of this dialect.
    pub fn version_bits(self) -> u8 {
        match self {
            Dialect::V2005 => 0,
            Dialect::V2017 => 1,
            Dialect::V2025 | Dialect::SurfaceWater => 2,
        }
    }

    /// Flag value for replies (A = D = 0), e.g. 4 for 2017, 8 for 2025.
    pub fn reply_flag(self) -> u8 {
        self.version_bits() << 2
    }

    /// Flag value for requests that want an answer: 2017 uses 5, 2025 uses 9;
    /// every 2005 request in HJ/T 212-2005 App. C uses 3.
    pub fn request_flag(self) -> u8 {
        match self {
            Dialect::V2005 => 3,
            other => (other.version_bits() << 2) | 1,
        }
    }
}

/// What the Flag field says, bit by bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagBits(pub u8);

impl FlagBits {
    /// Version bits V5..V0.
    pub fn version(self) -> u8 {
        self.0 >> 2
    }
    /// Bit 0: the receiver must answer (2017 "A"; 2025 calls it "D", same position).
    pub fn ack_requested(self) -> bool {
        self.0 & 1 != 0
    }
    /// Bit 1: the frame is one packet of a split message (2017 "D"; 2025 "A").
    pub fn split(self) -> bool {
        self.0 & 2 != 0
    }
}

/// Inputs to classification besides the Flag.
pub struct Hints<'a> {
    /// Header has a QN field.
    pub has_qn: bool,
    /// Header has `RF=`.
    pub has_rf: bool,
    /// MN text.
    pub mn: &'a [u8],
    /// First factor code of the CP area, if any (`a21026`, `011`, `B01` ...).
    pub first_factor: Option<&'a [u8]>,
}

/// Result of classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    /// The dialect, or `None` when the version bits are unknown (>= 3).
    pub dialect: Option<Dialect>,
    /// True when no Flag decided it (heuristics or override only).
    pub guessed: bool,
}

/// Classifies one frame. A per-device override always wins; a surface-water
/// override only applies to version-2 or flag-less frames.
pub fn classify(flag: Option<u8>, hints: &Hints<'_>, device: Option<Dialect>) -> Classified {
    if let Some(over) = device {
        let fits = match (over, flag.map(|f| FlagBits(f).version())) {
            (_, None) => true,
            (Dialect::SurfaceWater | Dialect::V2025, Some(v)) => v == 2,
            (d, Some(v)) => d.version_bits() == v,
        };
        if fits {
            return Classified {
                dialect: Some(over),
                guessed: false,
            };
        }
    }
    match flag.map(|f| FlagBits(f).version()) {
        Some(0) => Classified {
            dialect: Some(Dialect::V2005),
            guessed: false,
        },
        Some(1) => Classified {
            dialect: Some(Dialect::V2017),
            guessed: false,
        },
        Some(2) => Classified {
            dialect: Some(Dialect::V2025),
            guessed: false,
        },
        Some(_) => Classified {
            dialect: None,
            guessed: false,
        },
        None => {
            // 2017 factor codes are 6 characters starting with a letter and
            // five digits (`a21026`, `w01018`); 2005 codes are 2-3 digits or
            // `B01`/`S01`. A 2025 frame would be betrayed by RF.
            let modern_code = hints.first_factor.is_some_and(|c| {
                c.len() == 6 && c[0].is_ascii_lowercase() && c[1..].iter().all(u8::is_ascii_digit)
            });
            let dialect = if hints.has_rf {
                Dialect::V2025
            } else if hints.has_qn && (modern_code || hints.mn.len() == 24) {
                Dialect::V2017
            } else {
                Dialect::V2005
            };
            Classified {
                dialect: Some(dialect),
                guessed: true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hints<'a>(has_qn: bool, mn: &'a [u8], f: Option<&'a [u8]>) -> Hints<'a> {
        Hints {
            has_qn,
            has_rf: false,
            mn,
            first_factor: f,
        }
    }

    #[test]
    fn flag_bits() {
        // Digest §3.2 / 2025 §1.1: Flag 9 = version 2, answer wanted, not split.
        let f = FlagBits(9);
        assert_eq!(
            (f.version(), f.ack_requested(), f.split()),
            (2, true, false)
        );
        let f = FlagBits(7);
        assert_eq!((f.version(), f.ack_requested(), f.split()), (1, true, true));
        assert_eq!(Dialect::V2017.reply_flag(), 4);
        assert_eq!(Dialect::V2025.reply_flag(), 8);
        assert_eq!(Dialect::V2025.request_flag(), 9);
        assert_eq!(Dialect::V2005.request_flag(), 3);
    }

    #[test]
    fn classification() {
        let h = hints(true, b"010000A8900016F000169DC0", Some(b"a21026"));
        assert_eq!(classify(Some(5), &h, None).dialect, Some(Dialect::V2017));
        assert_eq!(classify(Some(9), &h, None).dialect, Some(Dialect::V2025));
        assert_eq!(classify(Some(1), &h, None).dialect, Some(Dialect::V2005));
        assert_eq!(classify(Some(12), &h, None).dialect, None);
        assert_eq!(
            classify(Some(9), &h, Some(Dialect::SurfaceWater)).dialect,
            Some(Dialect::SurfaceWater)
        );
        // An override that contradicts the version bits is ignored.
        assert_eq!(
            classify(Some(5), &h, Some(Dialect::SurfaceWater)).dialect,
            Some(Dialect::V2017)
        );
        let c = classify(None, &hints(false, b"LD130133000015", Some(b"B01")), None);
        assert_eq!((c.dialect, c.guessed), (Some(Dialect::V2005), true));
        let c = classify(None, &hints(true, b"14513567846884", Some(b"a34013")), None);
        assert_eq!(c.dialect, Some(Dialect::V2017));
    }
}
