//! The next step for a frame rejected for its CRC whose bytes match another
//! known CRC variant.
//!
//! Under the default `crc = "strict"` a logger that computes CRC-16/MODBUS gets
//! every frame rejected and never an ack, so it retransmits forever. The decoder
//! already knows which variant the bytes match (`crc.variant.*` next to the
//! `crc.mismatch` error); this turns that pair into the one-line fix an operator
//! needs, the same words in the session log, `tail` and `stats`.

use crate::protocol::finding::code;

/// A CRC rejection that one per-device policy would turn into an acceptance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrcHint {
    /// The variant the declared CRC matches, as in the frame JSON
    /// (`modbus`, `modbus-swapped`).
    pub variant: &'static str,
    /// The `crc` policy value that accepts it (`modbus`, `swapped`).
    pub policy: &'static str,
}

impl CrcHint {
    /// The hint for a frame with these findings (`(code, is_error)`), if it was
    /// rejected for its CRC (a `crc.mismatch` error) and a variant finding names
    /// what the sender computes instead.
    pub fn from_findings<'a>(
        findings: impl IntoIterator<Item = (&'a str, bool)>,
    ) -> Option<CrcHint> {
        let (mut rejected, mut hint) = (false, None);
        for (c, error) in findings {
            if c == code::CRC_MISMATCH && error {
                rejected = true;
            } else if c == code::CRC_VARIANT_MODBUS {
                hint = CrcHint::from_variant("modbus");
            } else if c == code::CRC_VARIANT_MODBUS_SWAPPED {
                hint = CrcHint::from_variant("modbus-swapped");
            }
        }
        hint.filter(|_| rejected)
    }

    /// The same from a stored findings column (the JSON array of
    /// `{"code", "severity", ...}`); `None` for text that is not such an array.
    pub fn from_json(findings: &str) -> Option<CrcHint> {
        let serde_json::Value::Array(items) = serde_json::from_str(findings).ok()? else {
            return None;
        };
        CrcHint::from_findings(
            items.iter().filter_map(|f| {
                Some((f["code"].as_str()?, f["severity"].as_str() == Some("error")))
            }),
        )
    }

    /// The hint for a CRC rejection whose declared CRC is `variant` as the frame
    /// JSON names it (`crc.variant`); `None` for `hj212`, `unknown` or anything else.
    pub fn from_variant(variant: &str) -> Option<CrcHint> {
        match variant {
            "modbus" => Some(CrcHint {
                variant: "modbus",
                policy: "modbus",
            }),
            "modbus-swapped" => Some(CrcHint {
                variant: "modbus-swapped",
                policy: "swapped",
            }),
            _ => None,
        }
    }

    /// `sends MODBUS CRC: set crc = "modbus"`, the short form for a table.
    pub fn short(&self) -> String {
        format!("{}: set crc = \"{}\"", self.sends(), self.policy)
    }

    /// What the sender does, for an operator: `sends MODBUS CRC`.
    pub fn sends(&self) -> String {
        format!("sends {} CRC", self.variant.to_uppercase())
    }

    /// The fix, ready to paste: `set crc = "modbus" for this device ([[device]] crc = "modbus")`.
    pub fn fix(&self) -> String {
        format!(
            "set crc = \"{p}\" for this device ([[device]] crc = \"{p}\")",
            p = self.policy
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Options, reply};

    fn decoded(seg: &str, crc: impl Fn(u16) -> u16) -> crate::protocol::Frame {
        let good = reply::envelope(seg.as_bytes()).to_vec();
        let value = crc(crate::protocol::crc::modbus(seg.as_bytes()));
        let mut raw = good[..good.len() - 6].to_vec();
        raw.extend_from_slice(&crate::protocol::crc::format_hex4(value));
        raw.extend_from_slice(b"\r\n");
        crate::protocol::decode(
            bytes::Bytes::from(raw),
            &Options::new(chrono::Utc::now()),
            &(),
        )
    }

    fn hint_of(f: &crate::protocol::Frame) -> Option<CrcHint> {
        CrcHint::from_findings(
            f.findings
                .iter()
                .map(|x| (x.code, x.severity == crate::protocol::Severity::Error)),
        )
    }

    const SEG: &str =
        "QN=20170516010101001;ST=22;CN=1072;PW=123456;MN=ABCDEFG1234567;Flag=3;CP=&&PW=654321&&";

    #[test]
    fn a_modbus_rejection_names_its_policy() {
        let f = decoded(SEG, |m| m);
        let h = hint_of(&f).expect("hint");
        assert_eq!(h.policy, "modbus");
        assert_eq!(h.sends(), "sends MODBUS CRC");
        assert_eq!(h.short(), "sends MODBUS CRC: set crc = \"modbus\"");
        assert_eq!(CrcHint::from_variant("modbus"), Some(h));
        assert_eq!(CrcHint::from_variant("hj212"), None);
        assert_eq!(
            h.fix(),
            "set crc = \"modbus\" for this device ([[device]] crc = \"modbus\")"
        );
        let json = serde_json::to_string(&f.findings).unwrap();
        assert_eq!(CrcHint::from_json(&json), Some(h));
        let swapped = hint_of(&decoded(SEG, u16::swap_bytes)).expect("hint");
        assert_eq!(swapped.policy, "swapped");
    }

    #[test]
    fn no_hint_without_a_known_variant_or_without_the_rejection() {
        assert_eq!(hint_of(&decoded(SEG, |m| m ^ 0x0101)), None);
        let mut opts = Options::new(chrono::Utc::now());
        opts.crc = crate::protocol::CrcPolicy::Modbus;
        let good = reply::envelope(SEG.as_bytes()).to_vec();
        let mut raw = good[..good.len() - 6].to_vec();
        raw.extend_from_slice(&crate::protocol::crc::format_hex4(
            crate::protocol::crc::modbus(SEG.as_bytes()),
        ));
        raw.extend_from_slice(b"\r\n");
        let f = crate::protocol::decode(bytes::Bytes::from(raw), &opts, &());
        assert!(!f.has_error(), "{:?}", f.findings);
        assert_eq!(hint_of(&f), None);
        assert_eq!(CrcHint::from_json("not json"), None);
    }
}
