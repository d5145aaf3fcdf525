//! Findings: what validation noticed about a frame. They are data, not errors:
//! a frame with findings is still stored verbatim with its verdict.

use std::borrow::Cow;

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
    /// Borrowed when the text is fixed: most findings of real traffic (a 2005
    /// frame's missing Flag and QN, a 17-digit DataTime) say the same words
    /// every time, and decoding should not allocate to say them.
    pub detail: Cow<'static, str>,
}

impl Finding {
    /// Builds a finding.
    pub fn new(
        code: &'static str,
        severity: Severity,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
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

/// Declares every finding code once: the `&str` constant in [`code`] that
/// findings carry, the [`Code`] variant, its string and the list of all of them
/// come from one row each, so nothing is kept in sync by hand.
macro_rules! finding_codes {
    ($($(#[doc = $doc:expr])* $konst:ident $variant:ident = $s:literal;)*) => {
        /// The stable finding codes. Metrics use them as the low-cardinality
        /// `reason` label; [`Finding::code`] carries one of these strings.
        pub mod code {
            $($(#[doc = $doc])* pub const $konst: &str = $s;)*
            /// Every code, in declaration order.
            pub const ALL: &[&str] = &[$($konst),*];
        }

        /// The finding codes as a type: one variant per [`code`] constant.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Code {
            /// Every code, in declaration order.
            pub const ALL: &[Code] = &[$(Code::$variant),*];

            /// The stable string (stored in findings and used as a metric label).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => code::$konst,)*
                }
            }

            /// The code whose string is `s`.
            pub fn from_name(s: &str) -> Option<Code> {
                Code::ALL.iter().copied().find(|c| c.as_str() == s)
            }
        }
    };
}

finding_codes! {
    /// Declared length differs from the data segment's byte count.
    LENGTH_MISMATCH LengthMismatch = "length.mismatch";
    /// Declared length is the data segment's character count, not its UTF-8 byte count.
    LENGTH_CHARACTERS LengthCharacters = "length.characters";
    /// The length field is not 4 decimal digits.
    LENGTH_MALFORMED LengthMalformed = "length.malformed";
    /// Data segment longer than the standard's 1024 bytes.
    FRAME_OVERSIZE FrameOversize = "frame.oversize";
    /// Vendor bytes between the data segment and the CRC, outside the declared length.
    FRAME_EXTENSION FrameExtension = "frame.extension";
    /// Frame does not start with `##`.
    FRAME_HEADER FrameHeader = "frame.header";
    /// Declared CRC differs from the HJ 212 CRC.
    CRC_MISMATCH CrcMismatch = "crc.mismatch";
    /// Declared CRC is CRC-16/MODBUS printed high byte first.
    CRC_VARIANT_MODBUS CrcVariantModbus = "crc.variant.modbus";
    /// Declared CRC is CRC-16/MODBUS printed low byte first.
    CRC_VARIANT_MODBUS_SWAPPED CrcVariantModbusSwapped = "crc.variant.modbus_swapped";
    /// No 4-hex-digit CRC after the data segment.
    CRC_MISSING CrcMissing = "crc.missing";
    /// CRC printed in lower case (the standard prints upper case).
    CRC_LOWERCASE CrcLowercase = "crc.lowercase";
    /// Terminator is LF or CR alone.
    TERMINATOR_NONSTANDARD TerminatorNonstandard = "terminator.nonstandard";
    /// No terminator at all.
    TERMINATOR_MISSING TerminatorMissing = "terminator.missing";
    /// QN absent.
    FIELD_MISSING_QN FieldMissingQn = "field.missing.qn";
    /// ST absent.
    FIELD_MISSING_ST FieldMissingSt = "field.missing.st";
    /// CN absent.
    FIELD_MISSING_CN FieldMissingCn = "field.missing.cn";
    /// PW absent.
    FIELD_MISSING_PW FieldMissingPw = "field.missing.pw";
    /// MN absent.
    FIELD_MISSING_MN FieldMissingMn = "field.missing.mn";
    /// Flag absent.
    FIELD_MISSING_FLAG FieldMissingFlag = "field.missing.flag";
    /// QN is not 17 digits `YYYYMMDDhhmmsszzz`.
    FIELD_MALFORMED_QN FieldMalformedQn = "field.malformed.qn";
    /// ST is not 1..3 characters of `0-9A-Z`.
    FIELD_MALFORMED_ST FieldMalformedSt = "field.malformed.st";
    /// CN is not 4 digits.
    FIELD_MALFORMED_CN FieldMalformedCn = "field.malformed.cn";
    /// MN has an unusual length or characters.
    FIELD_MALFORMED_MN FieldMalformedMn = "field.malformed.mn";
    /// PW has an unusual length or characters.
    FIELD_MALFORMED_PW FieldMalformedPw = "field.malformed.pw";
    /// Flag is not an integer 0..255.
    FIELD_MALFORMED_FLAG FieldMalformedFlag = "field.malformed.flag";
    /// PNUM/PNO malformed or inconsistent.
    FIELD_MALFORMED_PACKET FieldMalformedPacket = "field.malformed.packet";
    /// A header key appears twice (the last one wins).
    FIELD_DUPLICATE FieldDuplicate = "field.duplicate";
    /// A header key the standard does not define.
    FIELD_UNKNOWN FieldUnknown = "field.unknown";
    /// A header key in the wrong case (`FLAG=`).
    FIELD_CASE FieldCase = "field.case";
    /// Stray separators or tokens without `=` in the header.
    HEADER_SYNTAX HeaderSyntax = "header.syntax";
    /// No `CP=&&` in the data segment.
    CP_MISSING CpMissing = "cp.missing";
    /// CP tokens without `=`, unterminated `//` text, empty keys.
    CP_SYNTAX CpSyntax = "cp.syntax";
    /// Bytes after the closing `&&` inside the data segment (vendor extension).
    CP_TRAILING CpTrailing = "cp.trailing";
    /// The same CP key twice (the last one wins).
    CP_DUPLICATE CpDuplicate = "cp.duplicate";
    /// CP area longer than the standard's 950 bytes.
    CP_OVERSIZE CpOversize = "cp.oversize";
    /// A numeric value not in plain decimal form (`+1`, `.5`, `007`); normalised in JSON.
    VALUE_FORMAT ValueFormat = "value.format";
    /// DataTime or QN time not a valid `YYYYMMDDhhmmss[zzz]`.
    TIME_MALFORMED TimeMalformed = "time.malformed";
    /// DataTime ahead of the receive time beyond the tolerance.
    TIME_FUTURE TimeFuture = "time.future";
    /// DataTime older than the staleness threshold (and not marked RF=1).
    TIME_STALE TimeStale = "time.stale";
    /// DataTime carries milliseconds (17 digits) where the standard has 14.
    TIME_PRECISION TimePrecision = "time.precision";
    /// Encrypted CP but no key configured for the device.
    DECRYPT_NOKEY DecryptNokey = "decrypt.nokey";
    /// No configured key yields a plaintext with a matching CRC.
    DECRYPT_FAILED DecryptFailed = "decrypt.failed";
    /// A device with a key sent a CP that no key opens and that is not readable
    /// plaintext; `[[device]] unencrypted` sets the severity.
    ENCRYPTION_EXPECTED EncryptionExpected = "encryption.expected";
    /// The CP came in the non-standard `EncryptedData=<hex>` wrapper and was decrypted.
    ENCRYPTION_WRAPPER EncryptionWrapper = "encryption.wrapper";
    /// Flag version bits name no known edition.
    FLAG_VERSION_UNKNOWN FlagVersionUnknown = "flag.version.unknown";
    /// The dialect was inferred without Flag version bits.
    DIALECT_GUESSED DialectGuessed = "dialect.guessed";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_unique_and_round_trips() {
        assert_eq!(Code::ALL.len(), code::ALL.len());
        for (c, s) in Code::ALL.iter().zip(code::ALL) {
            assert_eq!(c.as_str(), *s);
            assert_eq!(Code::from_name(s), Some(*c));
        }
        let mut sorted = code::ALL.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), code::ALL.len(), "a code string used twice");
    }
}
