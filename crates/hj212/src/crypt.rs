//! HJ 212-2025 CP-area encryption (§6.4.2, App. A.2).
//!
//! Rule as summarised in the 2025 digest: SM4, 128-bit key, ECB, "Nopadding";
//! only the characters between `CP=&&` and the closing `&&` are encrypted, in
//! groups of 16; a final group shorter than 16 stays plaintext; the CRC is
//! computed over the plaintext segment before encryption.
//!
//! The standard prints ciphertext as `{0xE4,0x3E,...}` and it is unresolved
//! whether devices send raw cipher bytes (length field unchanged) or that text.
//! Both wire forms are accepted here: [`WireForm::Raw`] and [`WireForm::Text`].

use sm4::Sm4;

use crate::crc::{self, CrcVariant};
use crate::finding::{Finding, Severity, code};
use crate::frame::{DeviceProfile, Span};
use sm4::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

/// A 16-byte SM4 key.
pub type Key = [u8; 16];

/// How ciphertext travels inside the CP area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireForm {
    /// Cipher bytes replace plaintext bytes one for one (length field unchanged).
    Raw,
    /// The standard's printed form: `{0xE4,0x3E,...}` followed by the plaintext tail.
    Text,
    /// Not the standard's: the whole CP is `EncryptedData=<hex>` of padded
    /// ciphertext (see [`classify_plain`]); [`sniff`] never returns it.
    Wrapper,
}

impl WireForm {
    /// Stable name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            WireForm::Raw => "sm4-raw",
            WireForm::Text => "sm4-text",
            WireForm::Wrapper => "sm4-wrapper",
        }
    }
}

/// Decides whether a CP area is encrypted and in which wire form.
///
/// Rule (2025 digest §2.4 step 3): a CP starting with `{0x` is the text form.
/// Otherwise a CP of at least 16 bytes is raw ciphertext when its first 16
/// bytes hold a control byte, or a byte >= 0x80 before the first `=` (keys are
/// ASCII; UTF-8 text only appears in values such as `-Info=//…//`). Sixteen
/// cipher bytes that are all printable ASCII occur with p ~ (95/256)^16 ~ 1e-7.
pub fn sniff(cp: &[u8]) -> Option<WireForm> {
    if cp.starts_with(b"{0x") || cp.starts_with(b"{0X") {
        return Some(WireForm::Text);
    }
    if cp.len() < 16 {
        return None;
    }
    let head = &cp[..16];
    let key_part = &head[..memchr::memchr(b'=', head).unwrap_or(16)];
    if head.iter().any(|&b| b < 0x20 || b == 0x7F) || key_part.iter().any(|&b| b >= 0x80) {
        return Some(WireForm::Raw);
    }
    None
}

/// Splits a text-form CP (`{0x..,0x..}tail`) into cipher bytes and the plaintext tail.
/// Returns `None` when the list is malformed.
pub fn parse_text_form(cp: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let close = memchr::memchr(b'}', cp)?;
    let list = cp.get(1..close)?;
    let mut out = Vec::with_capacity(list.len() / 5 + 1);
    for item in list.split(|&b| b == b',') {
        let item = item.trim_ascii();
        let hex = item
            .strip_prefix(b"0x")
            .or_else(|| item.strip_prefix(b"0X"))?;
        if hex.is_empty() || hex.len() > 2 {
            return None;
        }
        let mut v = 0u8;
        for &c in hex {
            v = (v << 4) | (c as char).to_digit(16)? as u8;
        }
        out.push(v);
    }
    Some((out, &cp[close + 1..]))
}

/// Renders cipher bytes in the text form `{0xE4,0x3E,...}`.
pub fn format_text_form(cipher: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cipher.len() * 5 + 2);
    out.push(b'{');
    for (i, b) in cipher.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("0x{b:02X}").as_bytes());
    }
    out.push(b'}');
    out
}

/// Decrypts every full 16-byte block in place; a shorter tail is left as is.
pub fn decrypt_in_place(key: &Key, data: &mut [u8]) {
    let cipher = Sm4::new(&Array::from(*key));
    for chunk in data.chunks_exact_mut(16) {
        let block: &mut Array<u8, _> = chunk.try_into().expect("chunks_exact yields 16 bytes");
        cipher.decrypt_block(block);
    }
}

/// Encrypts every full 16-byte block in place; a shorter tail is left as is.
pub fn encrypt_in_place(key: &Key, data: &mut [u8]) {
    let cipher = Sm4::new(&Array::from(*key));
    for chunk in data.chunks_exact_mut(16) {
        let block: &mut Array<u8, _> = chunk.try_into().expect("chunks_exact yields 16 bytes");
        cipher.encrypt_block(block);
    }
}

/// What to do with a frame from a keyed device whose CP is neither ciphertext
/// a key opens nor readable plaintext (`[[device]] unencrypted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unencrypted {
    /// Store it with a warning and ack it: the 2025 text makes encryption a
    /// per-link duty (§6.4.1: "shall" over the Internet, "should" on private
    /// networks), and refusing the ack only makes the device resend forever.
    #[default]
    Accept,
    /// Store it as rejected (no ack).
    Reject,
}

/// A CP area that [`sniff`] did not take for ciphertext, as classified for a
/// device that has a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlainCp {
    /// Readable `key=value` text, or empty.
    Readable,
    /// The non-standard wrapper `EncryptedData=<hex>` (seen in a widely used
    /// device simulator): the cipher bytes the hex spells.
    Wrapper(Vec<u8>),
    /// Neither: a bare hex or Base64 blob, a malformed wrapper, binary.
    Unreadable,
}

/// The wrapper's key: the whole CP is `EncryptedData=<hex>`.
const WRAPPER_KEY: &[u8] = b"EncryptedData=";

/// Classifies a CP area that is not SM4 ciphertext in the standard's forms.
///
/// Readable means what every HJ 212 CP starts with: a `key=value` item whose
/// key is ASCII letters, digits, `-` or `_` (`DataTime`, `a01011-Rtd`,
/// `101-LowValue`) and whose value is not empty and does not start with `=`
/// (so Base64 padding such as `q83v...kA==` is not taken for a pair), and no
/// control bytes anywhere. Only the first item is judged: later items may be
/// vendor-shaped (comma lists, `-Info=//text//`) and still carry values.
pub fn classify_plain(cp: &[u8]) -> PlainCp {
    if let Some(hex_text) = cp.strip_prefix(WRAPPER_KEY) {
        return match hex::decode(hex_text) {
            Ok(bytes) if !bytes.is_empty() && bytes.len() % 16 == 0 => PlainCp::Wrapper(bytes),
            _ => PlainCp::Unreadable,
        };
    }
    if readable(cp) {
        PlainCp::Readable
    } else {
        PlainCp::Unreadable
    }
}

fn readable(cp: &[u8]) -> bool {
    if cp.is_empty() {
        return true;
    }
    if cp.iter().any(|&b| b < 0x20 || b == 0x7F) {
        return false;
    }
    let first = &cp[..memchr::memchr2(b';', b',', cp).unwrap_or(cp.len())];
    let Some(eq) = memchr::memchr(b'=', first) else {
        return false;
    };
    let (key, value) = (&first[..eq], &first[eq + 1..]);
    !key.is_empty()
        && key.len() <= 40
        && key
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !value.is_empty()
        && value[0] != b'='
}

/// Opens the cipher bytes of an `EncryptedData=<hex>` wrapper: the plaintext
/// CP of the first key that yields readable text once its padding is removed.
///
/// The wrapper pads to whole blocks (unlike the standard's plaintext tail);
/// zero padding is what the simulator writes, PKCS#7 is removed as well since
/// it is the other padding SM4 libraries default to.
pub fn open_wrapper(keys: &[Key], cipher: &[u8]) -> Option<Vec<u8>> {
    keys.iter().find_map(|key| {
        let mut plain = cipher.to_vec();
        decrypt_in_place(key, &mut plain);
        let pkcs7 = plain.last().copied().map_or(0, usize::from);
        if (1..=16).contains(&pkcs7)
            && pkcs7 <= plain.len()
            && plain[plain.len() - pkcs7..]
                .iter()
                .all(|&b| usize::from(b) == pkcs7)
        {
            plain.truncate(plain.len() - pkcs7);
        } else {
            while plain.last() == Some(&0) {
                plain.pop();
            }
        }
        (classify_plain(&plain) == PlainCp::Readable).then_some(plain)
    })
}

/// A wrapper CP opened with a device key.
#[derive(Debug)]
pub(crate) struct Opened {
    /// The data segment with the plaintext CP in place of the wrapper.
    pub plain: Vec<u8>,
    /// The CP area inside `plain`.
    pub cp: Span,
    /// The declared CRC holds over the wire segment (the hex text), not over
    /// the plaintext: the CRC check must be made on the wire bytes.
    pub crc_over_wire: bool,
}

/// Judges the CP area `cp` of `seg` (not ciphertext by [`sniff`]) for a device
/// with keys: readable text passes; the `EncryptedData=<hex>` wrapper is opened
/// (`encryption.wrapper`); anything else is `encryption.expected`, an error
/// only under [`Unencrypted::Reject`]. `accepts` is the device's CRC policy.
pub(crate) fn judge_plain_cp(
    seg: &[u8],
    cp: Span,
    profile: &DeviceProfile,
    declared_crc: Option<u16>,
    accepts: impl Fn(CrcVariant) -> bool,
    findings: &mut Vec<Finding>,
) -> Option<Opened> {
    let (severity, policy) = match profile.unencrypted {
        Unencrypted::Accept => (Severity::Warning, "accept"),
        Unencrypted::Reject => (Severity::Error, "reject"),
    };
    let expected = |why: &str| {
        Finding::new(
            code::ENCRYPTION_EXPECTED,
            severity,
            format!(
                "the device has a key but its CP {why} ({} bytes; `unencrypted = \"{policy}\"`)",
                cp.end() - cp.start()
            ),
        )
    };
    let cipher = match classify_plain(&seg[cp.range()]) {
        PlainCp::Readable => return None,
        PlainCp::Unreadable => {
            findings.push(expected(
                "is neither SM4 ciphertext nor readable key=value text",
            ));
            return None;
        }
        PlainCp::Wrapper(cipher) => cipher,
    };
    let Some(text) = open_wrapper(&profile.keys, &cipher) else {
        findings.push(expected(
            "is an EncryptedData=<hex> wrapper that no configured key opens",
        ));
        return None;
    };
    let mut plain = seg[..cp.start()].to_vec();
    plain.extend_from_slice(&text);
    let close = plain.len();
    plain.extend_from_slice(&seg[cp.end()..]);
    // The simulator computes the CRC over what it sends (the hex); the
    // standard computes it over the plaintext.
    let crc_over_wire = declared_crc.is_some_and(|d| {
        let holds = |s: &[u8]| accepts(crc::identify(s, d).1);
        holds(seg) && !holds(&plain)
    });
    findings.push(Finding::new(
        code::ENCRYPTION_WRAPPER,
        Severity::Warning,
        format!(
            "CP sent as the non-standard EncryptedData=<hex> wrapper ({} cipher bytes, padded; CRC over the {}); decrypted with the device key",
            cipher.len(),
            if crc_over_wire { "hex text" } else { "plaintext" }
        ),
    ));
    Some(Opened {
        plain,
        cp: Span::new(cp.start(), close),
        crc_over_wire,
    })
}

/// Builds the wrapper form `EncryptedData=<HEX>` of a plaintext CP: zero
/// padding to whole blocks, then SM4-ECB, as the simulator that uses the form
/// sends it. For building test frames; the gateway never sends it.
pub fn wrap(key: &Key, cp: &[u8]) -> Vec<u8> {
    let mut data = cp.to_vec();
    data.resize(cp.len().div_ceil(16).max(1) * 16, 0);
    encrypt_in_place(key, &mut data);
    let mut out = WRAPPER_KEY.to_vec();
    out.extend_from_slice(hex::encode_upper(&data).as_bytes());
    out
}

/// Parses a 32-hex-digit key.
pub fn parse_key(hex_text: &str) -> Option<Key> {
    let bytes = hex::decode(hex_text.trim()).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: Key = [0x30; 16];
    const CP1: &str = "DataTime=20240520210600;a01011-Min=1.35,a01011-Avg=1.35,a01011-Max=1.35,a01011-Flag=N;a01012-Min=9.3,a01012-Avg=9.3,a01012-Max=9.3,a01012-Flag=N;a01014-Min=3.20,a01014-Avg=3.211,a01014-Max=3.212,a01014-Flag=N";
    const CT1: &str = "E43E159ACFAB242CB53155FB8B9281A1A242577ABFAED881BE88B72D69FC55ED1A80119FAAC8B3CD33D285CC76F57F2CA7F88B9573C6647E0F07E24609BD6B63EB20C5B9784F28E71D2F4994FF61D9E1C2B3075592B4D1E09C4D8BB27BE97B559E3DA6643781A6F477769DEEB009B10DFFF3426922725D607DC4480F0CAC5F70DB2587B124BCB281592721D6E4BC180A97E5E111499CBE822E31C8D7761553543AA24207C290997BBDE64F9266BC5F529A172E381C1D898CA1A0D771A914A7B2D7467C70B94F1D4A7B0350A48DBF8B41";

    /// The standard's worked example 1/2 (2025 digest §8.2), key `30` x 16.
    #[test]
    fn standard_example_full_blocks() {
        assert_eq!(CP1.len(), 208);
        let mut data = CP1.as_bytes().to_vec();
        encrypt_in_place(&KEY, &mut data);
        assert_eq!(hex::encode_upper(&data), CT1);
        decrypt_in_place(&KEY, &mut data);
        assert_eq!(data, CP1.as_bytes());
    }

    /// Example 3/4: 9 blocks + a 3-byte tail `g=N` that stays in clear.
    #[test]
    fn standard_example_tail_stays_plain() {
        let cp = "DataTime=20240520210600;a01011-Min=1.35,a01011-Avg=1.35,a01011-Max=1.35,a01011-Flag=N;a01014-Min=3.20,a01014-Avg=3.20,a01014-Max=3.20,a01014-Flag=N";
        assert_eq!(cp.len(), 147);
        let mut data = cp.as_bytes().to_vec();
        encrypt_in_place(&KEY, &mut data);
        assert_eq!(&data[144..], b"g=N");
        assert_eq!(hex::encode_upper(&data[..80]), &CT1[..160]);
        assert_eq!(
            hex::encode_upper(&data[80..144]),
            "3B391A1D2A454B65388D5D9435DBF021528C7BF9755EF16518710C0CAC0ADEF9C5156CD0A5A17674AC0ED2ABC40023E9EF70128554B82438E91ADCE98A0D03A4"
        );
    }

    #[test]
    fn classifying_plain_cps() {
        for readable in [
            &b""[..],
            CP1.as_bytes(),
            b"SKCreateTime=20260101080000001",
            b"QnRtn=1",
            b"PolId=a21026,a21002,a21003",
            b"101-LowValue=1.1,101-UpValue=9.9",
            "i11001-Info=//清洗管路//".as_bytes(),
        ] {
            assert_eq!(classify_plain(readable), PlainCp::Readable, "{readable:?}");
        }
        for unreadable in [
            &b"E43E159ACFAB242CB53155FB8B9281A1"[..],
            b"q83vEjRWeJCrze8SNFZ4kA==",
            b"SGVsbG8=",
            b"=1",
            b"Data Time=1",
            b"DataTime=2024\x01",
            b"EncryptedData=ABC",
            b"EncryptedData=E43E",
            b"EncryptedData=",
        ] {
            assert_eq!(
                classify_plain(unreadable),
                PlainCp::Unreadable,
                "{unreadable:?}"
            );
        }
        assert_eq!(
            classify_plain(format!("EncryptedData={}", &CT1[..64]).as_bytes()),
            PlainCp::Wrapper(hex::decode(&CT1[..64]).unwrap())
        );
    }

    #[test]
    fn wrapper_round_trip_and_wrong_key() {
        let cp = b"DataTime=20260101080000;a21026-Rtd=12.5,a21026-Flag=N";
        let wrapped = wrap(&KEY, cp);
        assert!(wrapped.starts_with(b"EncryptedData="));
        let PlainCp::Wrapper(cipher) = classify_plain(&wrapped) else {
            panic!("not a wrapper: {wrapped:?}");
        };
        assert_eq!(cipher.len(), 64, "zero-padded to whole blocks");
        assert_eq!(
            open_wrapper(&[[0x31; 16], KEY], &cipher).as_deref(),
            Some(&cp[..])
        );
        assert_eq!(open_wrapper(&[[0x31; 16]], &cipher), None);
        // PKCS#7 padding is removed too.
        let mut padded = cp.to_vec();
        padded.extend_from_slice(&[10; 10]);
        encrypt_in_place(&KEY, &mut padded);
        assert_eq!(open_wrapper(&[KEY], &padded).as_deref(), Some(&cp[..]));
    }

    /// The decoder's use of the classification: with a key, the wrapper is
    /// opened and an unreadable CP is flagged; without one, neither is judged.
    #[test]
    fn decoding_wrapper_and_unreadable_cps() {
        use crate::finding::{Severity, code};
        let frame = |cp: &[u8]| {
            let mut out = Vec::new();
            let head = crate::build::Head {
                qn: Some(b"20240601085857223"),
                st: "32",
                cn: 2011,
                pw: "123456",
                mn: "010000A8900016F000169DC0",
                flag: Some(9),
                split: None,
            };
            crate::build::device_frame(&mut out, &head, None, |b| b.extend_from_slice(cp));
            bytes::Bytes::from(out)
        };
        let opts = crate::Options::new(chrono::Utc::now());
        let keyed = crate::ExampleKeyLookup;
        let codes = |f: &crate::Frame| {
            f.findings
                .iter()
                .filter(|x| x.code.starts_with("encryption."))
                .map(|x| (x.code, x.severity))
                .collect::<Vec<_>>()
        };
        let f = crate::decode(frame(&wrap(&KEY, b"a21026-Rtd=12.5")), &opts, &keyed);
        assert_eq!(codes(&f), [(code::ENCRYPTION_WRAPPER, Severity::Warning)]);
        assert_eq!(f.encryption, Some(WireForm::Wrapper));
        assert_eq!(f.pairs.len(), 1, "{:?}", f.findings);
        assert!(!f.has_error(), "{:?}", f.findings);
        let f = crate::decode(frame(&wrap(&[0x31; 16], b"a21026-Rtd=12.5")), &opts, &keyed);
        assert_eq!(codes(&f), [(code::ENCRYPTION_EXPECTED, Severity::Warning)]);
        let f = crate::decode(frame(b"E43E159ACFAB242CB53155FB8B9281A1"), &opts, &keyed);
        assert_eq!(codes(&f), [(code::ENCRYPTION_EXPECTED, Severity::Warning)]);
        let f = crate::decode(frame(b"a21026-Rtd=12.5"), &opts, &keyed);
        assert_eq!(codes(&f), []);
        let f = crate::decode(frame(b"E43E159ACFAB242CB53155FB8B9281A1"), &opts, &());
        assert_eq!(codes(&f), [], "no key: nothing is expected");
    }

    #[test]
    fn sniffing_and_text_form() {
        assert_eq!(sniff(CP1.as_bytes()), None);
        assert_eq!(sniff(b"&&"), None);
        assert_eq!(sniff(b"101-LowValue=1.1,101-UpValue=9.9"), None);
        assert_eq!(sniff("i11001-Info=//清洗管路//".as_bytes()), None);
        let ct = hex::decode(CT1).unwrap();
        assert_eq!(sniff(&ct), Some(WireForm::Raw));
        let mut text = format_text_form(&ct[..32]);
        text.extend_from_slice(b"g=N");
        assert_eq!(sniff(&text), Some(WireForm::Text));
        let (bytes, tail) = parse_text_form(&text).unwrap();
        assert_eq!(bytes, &ct[..32]);
        assert_eq!(tail, b"g=N");
        assert!(parse_text_form(b"{0xZZ}").is_none());
        assert_eq!(parse_key("30303030303030303030303030303030"), Some(KEY));
        assert_eq!(parse_key("3030"), None);
    }
}
