//! The HJ 212 CRC and the look-alikes devices send instead.
//!
//! HJ 212-2017 Appendix A (same procedure in HJ/T 212-2005 Appendix A):
//!
//! ```text
//! crc = 0xFFFF
//! for each byte b of the data segment:
//!     crc = (crc >> 8) XOR b          ; the old low byte is discarded
//!     repeat 8 times: crc = (crc >> 1) XOR (0xA001 if the shifted-out bit was 1)
//! print "%04X", high byte first
//! ```
//!
//! This is *not* CRC-16/MODBUS (`crc ^= b`), although many loggers send MODBUS,
//! printed either high byte first or byte-swapped. When the declared CRC does
//! not match, [`identify`] tells which variant the sender used so the finding
//! can say so and a per-device policy can accept it. MODBUS comes from the `crc`
//! crate's catalogue; the HJ 212 CRC is computed here (see [`hj212`] for why).

/// The reflected 0xA001 table (the CRC-16/MODBUS table, which the HJ 212
/// procedure indexes differently).
const TABLE: [u16; 256] = build_table();

const fn build_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u16;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// `SLICES[k][x]`: the state byte after k + 1 steps from state `x` over zero
/// bytes, i.e. `H` applied k + 1 times, where `H[x] = T[x] >> 8`.
const SLICES: [[u8; 256]; 16] = build_slices();

const fn build_slices() -> [[u8; 256]; 16] {
    let mut s = [[0u8; 256]; 16];
    let mut x = 0;
    while x < 256 {
        s[0][x] = (TABLE[x] >> 8) as u8;
        x += 1;
    }
    let mut k = 1;
    while k < 16 {
        let mut x = 0;
        while x < 256 {
            s[k][x] = s[0][s[k - 1][x] as usize];
            x += 1;
        }
        k += 1;
    }
    s
}

/// HJ 212 CRC of a data segment (the bytes between the length field and the CRC).
///
/// Hand-written because no entry of the `crc` catalogue (the Rocksoft model:
/// width, poly, init, refin, refout, xorout) expresses it. In every catalogue
/// CRC-16 the register update for a given input byte is a bijection on the
/// 65,536 register states (the polynomials all have the x^0 term), so all 16
/// bits carry on. The standard's procedure replaces the register with
/// `(crc >> 8) ^ b` before shifting: the old low byte is lost, 8 bits of state
/// survive, and the result is always one of the 256 table entries. The tests
/// check both facts and that no catalogue CRC-16 gives the HJ 212 check value.
///
/// Only the high byte of the register survives each step, so the state is one
/// byte: `h' = H[h ^ b]` with `H[x] = T[x] >> 8`, and the result is
/// `T[h ^ last byte]`. `H` is linear over GF(2) (so is every CRC table), hence
/// 16 steps collapse to `H^16(h ^ b0) ^ H^15(b1) ^ … ^ H^1(b15)`: 16 independent
/// lookups in 4 KiB of tables instead of a chain of 16 dependent ones. Same
/// values as [`hj212_bytewise`], several times faster.
#[inline]
pub fn hj212(data: &[u8]) -> u16 {
    let Some((&last, body)) = data.split_last() else {
        return 0xFFFF;
    };
    let mut h: u8 = 0xFF;
    let mut blocks = body.chunks_exact(16);
    // The block's bytes come from two 8-byte loads and are taken apart with
    // shifts: read one by one, each byte cost a load of its own next to its
    // table lookup, and the loads, not the lookups' latency, set the pace.
    // The optimiser turns a shifted-out byte of a loaded word back into a
    // byte load of its own; a zero it cannot see through (`black_box`, once
    // per call) xor-ed into the words keeps the loads whole.
    let opaque = std::hint::black_box(0u64);
    let byte = |w: u64, i: u32| usize::from((w >> (8 * i)) as u8);
    for c in &mut blocks {
        let s = &SLICES;
        let a = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ opaque;
        let b = u64::from_le_bytes([c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]]) ^ opaque;
        let rest = s[14][byte(a, 1)]
            ^ s[13][byte(a, 2)]
            ^ s[12][byte(a, 3)]
            ^ s[11][byte(a, 4)]
            ^ s[10][byte(a, 5)]
            ^ s[9][byte(a, 6)]
            ^ s[8][byte(a, 7)]
            ^ s[7][byte(b, 0)]
            ^ s[6][byte(b, 1)]
            ^ s[5][byte(b, 2)]
            ^ s[4][byte(b, 3)]
            ^ s[3][byte(b, 4)]
            ^ s[2][byte(b, 5)]
            ^ s[1][byte(b, 6)]
            ^ s[0][byte(b, 7)];
        h = s[15][usize::from(h ^ a as u8)] ^ rest;
    }
    for &b in blocks.remainder() {
        h = SLICES[0][usize::from(h ^ b)];
    }
    TABLE[usize::from(h ^ last)]
}

/// The HJ 212 CRC one table lookup per byte, as the standard's procedure reads.
/// Reference for [`hj212`] in tests and benches.
#[doc(hidden)]
pub fn hj212_bytewise(data: &[u8]) -> u16 {
    // The register after each step is always some T[x]; its high byte is all
    // that feeds the next step, so we carry only that byte.
    let mut hi: u8 = 0xFF;
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc = TABLE[(hi ^ b) as usize];
        hi = (crc >> 8) as u8;
    }
    crc
}

/// CRC-16/MODBUS from the `crc` catalogue (init 0xFFFF, reflected 0xA001,
/// `crc ^= b`), sliced by 16: a logger that always sends MODBUS makes every
/// one of its frames pay for this second pass.
const MODBUS: ::crc::Crc<u16, ::crc::Table<16>> =
    ::crc::Crc::<u16, ::crc::Table<16>>::new(&::crc::CRC_16_MODBUS);

/// CRC-16/MODBUS as a 16-bit value (what a MODBUS-sending logger prints high
/// byte first).
#[inline]
pub fn modbus(data: &[u8]) -> u16 {
    MODBUS.checksum(data)
}

/// Which CRC algorithm and byte order a declared CRC corresponds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrcVariant {
    /// The HJ 212 algorithm, as the standard requires.
    Hj212,
    /// CRC-16/MODBUS printed high byte first.
    Modbus,
    /// CRC-16/MODBUS printed low byte first (Modbus RTU wire order rendered as hex).
    ModbusSwapped,
    /// Matches none of the known algorithms.
    Unknown,
}

impl CrcVariant {
    /// Stable short name used in JSON and findings.
    pub fn as_str(self) -> &'static str {
        match self {
            CrcVariant::Hj212 => "hj212",
            CrcVariant::Modbus => "modbus",
            CrcVariant::ModbusSwapped => "modbus-swapped",
            CrcVariant::Unknown => "unknown",
        }
    }
}

/// Parses 4 hex digits (either case) into a CRC value.
pub fn parse_hex4(text: &[u8]) -> Option<u16> {
    if text.len() != 4 {
        return None;
    }
    let mut v: u16 = 0;
    for &c in text {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | d as u16;
    }
    Some(v)
}

/// Formats a CRC the way the standard prints it: 4 upper-case hex digits.
pub fn format_hex4(crc: u16) -> [u8; 4] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    [
        HEX[(crc >> 12) as usize & 0xF],
        HEX[(crc >> 8) as usize & 0xF],
        HEX[(crc >> 4) as usize & 0xF],
        HEX[crc as usize & 0xF],
    ]
}

/// Decides which variant produced `declared` over `segment`.
///
/// The HJ 212 value is always computed; MODBUS is computed only on a mismatch,
/// so the common case costs one pass.
pub fn identify(segment: &[u8], declared: u16) -> (u16, CrcVariant) {
    let computed = hj212(segment);
    if computed == declared {
        return (computed, CrcVariant::Hj212);
    }
    let m = modbus(segment);
    let variant = if m == declared {
        CrcVariant::Modbus
    } else if m.swap_bytes() == declared {
        CrcVariant::ModbusSwapped
    } else {
        CrcVariant::Unknown
    };
    (computed, variant)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from the protocol digest §9.1 (HJ 212 and MODBUS columns).
    #[test]
    fn known_answers() {
        let cases: &[(&str, u16, Option<u16>)] = &[
            (
                "QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;CP=&&RtdInterval=30&&",
                0x1C80,
                Some(0x0759),
            ),
            (
                "QN=20040516010101001;ST=32;CN=2051;PW=123456;MN=88888880000001;Flag=3;CP=&&BeginTime=20040506111000,EndTime=20040506151000&&",
                0x6B80,
                Some(0xAC73),
            ),
            (
                "QN=20201008154743635;ST=91;CN=9014;PW=123456;MN=SD000001;Flag=9;CP=&&QnRtn=1&&",
                0x71C0,
                Some(0xF028),
            ),
            ("123456789", 0x2F80, Some(0x4B37)),
            ("", 0xFFFF, Some(0xFFFF)),
            ("A", 0x7080, Some(0x707F)),
            (
                "QN=20160801085857223;ST=32;CN=3020;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&DataTime=20160801085857;PolId=w01018;i11001-Info=//清洗管路//&&",
                0x9481,
                Some(0x7033),
            ),
            (
                "QN=20170516010101001;ST=22;CN=1072;PW=123456;MN=ABCDEFG1234567;Flag=3;CP=&&PW=654321&&",
                0xE681,
                Some(0xE476),
            ),
            (
                "QN=20160801085857223;ST=23;CN=2011;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&DataTime=20160801085857; LA-Rtd=50.1&&",
                0x1E00,
                Some(0x25FB),
            ),
            (
                "QN=20240601085857223;ST=32;CN=1011;PW=123456;MN=010000A8900016F000169DC0;Flag=9;CP=&&&&",
                0x2200,
                None,
            ),
        ];
        for (seg, hj, mb) in cases {
            assert_eq!(hj212(seg.as_bytes()), *hj, "hj212 of {seg}");
            assert_eq!(
                hj212_bytewise(seg.as_bytes()),
                *hj,
                "bytewise hj212 of {seg}"
            );
            if let Some(mb) = mb {
                assert_eq!(modbus(seg.as_bytes()), *mb, "modbus of {seg}");
            }
        }
    }

    #[test]
    fn low_byte_is_always_one_of_eight() {
        // Digest §2.2: only 256 possible values; low byte in {00,01,40,41,80,81,C0,C1}.
        for x in 0..=255u8 {
            let lo = hj212(&[x, x.wrapping_mul(7)]) & 0xFF;
            assert!([0x00, 0x01, 0x40, 0x41, 0x80, 0x81, 0xC0, 0xC1].contains(&lo));
        }
    }

    /// The claim in [`hj212`]'s doc: no `crc` catalogue CRC-16 is the HJ 212 CRC.
    #[test]
    fn no_catalogue_crc16_is_hj212() {
        use ::crc::*;
        let catalogue: [&'static Algorithm<u16>; 31] = [
            &CRC_16_ARC,
            &CRC_16_CDMA2000,
            &CRC_16_CMS,
            &CRC_16_DDS_110,
            &CRC_16_DECT_R,
            &CRC_16_DECT_X,
            &CRC_16_DNP,
            &CRC_16_EN_13757,
            &CRC_16_GENIBUS,
            &CRC_16_GSM,
            &CRC_16_IBM_3740,
            &CRC_16_IBM_SDLC,
            &CRC_16_ISO_IEC_14443_3_A,
            &CRC_16_KERMIT,
            &CRC_16_LJ1200,
            &CRC_16_M17,
            &CRC_16_MAXIM_DOW,
            &CRC_16_MCRF4XX,
            &CRC_16_MODBUS,
            &CRC_16_NRSC_5,
            &CRC_16_OPENSAFETY_A,
            &CRC_16_OPENSAFETY_B,
            &CRC_16_PROFIBUS,
            &CRC_16_RIELLO,
            &CRC_16_SPI_FUJITSU,
            &CRC_16_T10_DIF,
            &CRC_16_TELEDISK,
            &CRC_16_TMS37157,
            &CRC_16_UMTS,
            &CRC_16_USB,
            &CRC_16_XMODEM,
        ];
        let check = hj212(b"123456789");
        assert_eq!(check, 0x2F80);
        for alg in catalogue {
            assert_ne!(alg.check, check, "{alg:?}");
            assert_eq!(Crc::<u16>::new(alg).checksum(b"123456789"), alg.check);
        }
        // Over all two-byte inputs a catalogue CRC-16 reaches every value; the
        // HJ 212 CRC reaches only the 256 table entries.
        let mut hj = std::collections::HashSet::new();
        let mut mb = std::collections::HashSet::new();
        for x in 0..=u16::MAX {
            hj.insert(hj212(&x.to_be_bytes()));
            mb.insert(modbus(&x.to_be_bytes()));
        }
        assert_eq!(hj.len(), 256);
        assert_eq!(mb.len(), 65536);
    }

    #[test]
    fn identify_variants() {
        let seg = b"QN=20170516010101001;ST=22;CN=1072;PW=123456;MN=ABCDEFG1234567;Flag=3;CP=&&PW=654321&&";
        assert_eq!(identify(seg, 0xE681).1, CrcVariant::Hj212);
        assert_eq!(identify(seg, 0xE476).1, CrcVariant::Modbus);
        assert_eq!(identify(seg, 0x76E4).1, CrcVariant::ModbusSwapped);
        assert_eq!(identify(seg, 0x1234).1, CrcVariant::Unknown);
        assert_eq!(parse_hex4(b"1c80"), Some(0x1C80));
        assert_eq!(parse_hex4(b"1G80"), None);
        assert_eq!(&format_hex4(0x0A0B), b"0A0B");
    }

    /// The sliced CRC equals the bytewise one at every length around the
    /// 16-byte block edges and on arbitrary bytes.
    #[test]
    fn sliced_equals_bytewise() {
        let mut x: u32 = 0x1234_5678;
        let data: Vec<u8> = (0..4099)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for n in 0..data.len() {
            assert_eq!(hj212(&data[..n]), hj212_bytewise(&data[..n]), "length {n}");
        }
        for start in 1..40 {
            assert_eq!(hj212(&data[start..]), hj212_bytewise(&data[start..]));
        }
    }
}
