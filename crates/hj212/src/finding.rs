//! Findings: what validation noticed about a frame. They are data, not errors:
//! a frame with findings is still stored verbatim with its verdict.

use serde::Serialize;

/// How much a finding matters for the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; never affects the verdict.
    Info,
    /// A deviation the gateway tolerates; the frame is still accepted.
    Warning,
    /// The frame cannot be trusted; it is rejected (stored, not acked).
    Error,
}

impl Severity {
    /// Lower-case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One observation about a frame, with a stable machine code (see [`code`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable dotted code such as `crc.mismatch`.
    pub code: &'static str,
    /// Effect on the verdict.
    pub severity: Severity,
    /// Human-readable specifics (declared vs computed values, offending field).
    pub detail: String,
}

impl Finding {
    /// Builds a finding.
    pub fn new(code: &'static str, severity: Severity, detail: impl Into<String>) -> Self {
        Finding {
            code,
            severity,
            detail: detail.into(),
        }
    }
}

/// True if any finding has error severity.
pub fn has_error(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}

/// The stable finding codes. Metrics use them as the low-cardinality `reason` label.
pub mod code {
    /// Declared length differs from the data segment's byte count.
    pub const LENGTH_MISMATCH: &str = "length.mismatch";
    /// The length field is not 4 decimal digits.
    pub const LENGTH_MALFORMED: &str = "length.malformed";
    /// Data segment longer than the standard's 1024 bytes.
    pub const FRAME_OVERSIZE: &str = "frame.oversize";
    /// Vendor bytes between the data segment and the CRC, outside the declared length.
    pub const FRAME_EXTENSION: &str = "frame.extension";
    /// Frame does not start with `##`.
    pub const FRAME_HEADER: &str = "frame.header";
    /// Declared CRC differs from the HJ 212 CRC.
    pub const CRC_MISMATCH: &str = "crc.mismatch";
    /// Declared CRC is CRC-16/MODBUS printed high byte first.
    pub const CRC_VARIANT_MODBUS: &str = "crc.variant.modbus";
    /// Declared CRC is CRC-16/MODBUS printed low byte first.
    pub const CRC_VARIANT_MODBUS_SWAPPED: &str = "crc.variant.modbus_swapped";
    /// No 4-hex-digit CRC after the data segment.
    pub const CRC_MISSING: &str = "crc.missing";
    /// CRC printed in lower case (the standard prints upper case).
    pub const CRC_LOWERCASE: &str = "crc.lowercase";
    /// Terminator is LF or CR alone.
    pub const TERMINATOR_NONSTANDARD: &str = "terminator.nonstandard";
    /// No terminator at all.
    pub const TERMINATOR_MISSING: &str = "terminator.missing";
    /// QN absent.
    pub const FIELD_MISSING_QN: &str = "field.missing.qn";
    /// ST absent.
    pub const FIELD_MISSING_ST: &str = "field.missing.st";
    /// CN absent.
    pub const FIELD_MISSING_CN: &str = "field.missing.cn";
    /// PW absent.
    pub const FIELD_MISSING_PW: &str = "field.missing.pw";
    /// MN absent.
    pub const FIELD_MISSING_MN: &str = "field.missing.mn";
    /// Flag absent.
    pub const FIELD_MISSING_FLAG: &str = "field.missing.flag";
    /// QN is not 17 digits `YYYYMMDDhhmmsszzz`.
    pub const FIELD_MALFORMED_QN: &str = "field.malformed.qn";
    /// ST is not 1..3 characters of `0-9A-Z`.
    pub const FIELD_MALFORMED_ST: &str = "field.malformed.st";
    /// CN is not 4 digits.
    pub const FIELD_MALFORMED_CN: &str = "field.malformed.cn";
    /// MN has an unusual length or characters.
    pub const FIELD_MALFORMED_MN: &str = "field.malformed.mn";
    /// PW has an unusual length or characters.
    pub const FIELD_MALFORMED_PW: &str = "field.malformed.pw";
    /// Flag is not an integer 0..255.
    pub const FIELD_MALFORMED_FLAG: &str = "field.malformed.flag";
    /// PNUM/PNO malformed or inconsistent.
    pub const FIELD_MALFORMED_PACKET: &str = "field.malformed.packet";
    /// A header key appears twice (the last one wins).
    pub const FIELD_DUPLICATE: &str = "field.duplicate";
    /// A header key the standard does not define.
    pub const FIELD_UNKNOWN: &str = "field.unknown";
    /// A header key in the wrong case (`FLAG=`).
    pub const FIELD_CASE: &str = "field.case";
    /// Stray separators or tokens without `=` in the header.
    pub const HEADER_SYNTAX: &str = "header.syntax";
    /// No `CP=&&` in the data segment.
    pub const CP_MISSING: &str = "cp.missing";
    /// CP tokens without `=`, unterminated `//` text, empty keys.
    pub const CP_SYNTAX: &str = "cp.syntax";
    /// Bytes after the closing `&&` inside the data segment (vendor extension).
    pub const CP_TRAILING: &str = "cp.trailing";
    /// The same CP key twice (the last one wins).
    pub const CP_DUPLICATE: &str = "cp.duplicate";
    /// CP area longer than the standard's 950 bytes.
    pub const CP_OVERSIZE: &str = "cp.oversize";
    /// A numeric value not in plain decimal form (`+1`, `.5`, `007`); normalised in JSON.
    pub const VALUE_FORMAT: &str = "value.format";
    /// DataTime or QN time not a valid `YYYYMMDDhhmmss[zzz]`.
    pub const TIME_MALFORMED: &str = "time.malformed";
    /// DataTime ahead of the receive time beyond the tolerance.
    pub const TIME_FUTURE: &str = "time.future";
    /// DataTime older than the staleness threshold (and not marked RF=1).
    pub const TIME_STALE: &str = "time.stale";
    /// DataTime carries milliseconds (17 digits) where the standard has 14.
    pub const TIME_PRECISION: &str = "time.precision";
    /// Encrypted CP but no key configured for the device.
    pub const DECRYPT_NOKEY: &str = "decrypt.nokey";
    /// No configured key yields a plaintext with a matching CRC.
    pub const DECRYPT_FAILED: &str = "decrypt.failed";
    /// Flag version bits name no known edition.
    pub const FLAG_VERSION_UNKNOWN: &str = "flag.version.unknown";
    /// The dialect was inferred without Flag version bits.
    pub const DIALECT_GUESSED: &str = "dialect.guessed";
}
