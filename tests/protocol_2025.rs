//! HJ 212-2025: SM4 frames in both wire forms, RF, and timestamp / CRC policies.

use std::sync::Arc;

use bytes::Bytes;
use chrono::TimeZone;
use hj212_gateway::protocol::{
    self, CrcPolicy, DeviceLookup, DeviceProfile, Options, Severity, crypt, finding::code, json,
};

const HEAD: &str =
    "QN=20240520210700000;ST=31;CN=2051;PW=123456;MN=010000A8900016F000169DC0;Flag=9;CP=&&";
const CP1: &str = "DataTime=20240520210600;a01011-Min=1.35,a01011-Avg=1.35,a01011-Max=1.35,a01011-Flag=N;a01012-Min=9.3,a01012-Avg=9.3,a01012-Max=9.3,a01012-Flag=N;a01014-Min=3.20,a01014-Avg=3.211,a01014-Max=3.212,a01014-Flag=N";
const CP3: &str = "DataTime=20240520210600;a01011-Min=1.35,a01011-Avg=1.35,a01011-Max=1.35,a01011-Flag=N;a01014-Min=3.20,a01014-Avg=3.20,a01014-Max=3.20,a01014-Flag=N";

struct Devices(Option<Arc<DeviceProfile>>);
impl DeviceLookup for Devices {
    fn profile(&self, _mn: &str) -> Option<Arc<DeviceProfile>> {
        self.0.clone()
    }
}

fn with_keys(keys: Vec<[u8; 16]>) -> Devices {
    Devices(Some(Arc::new(DeviceProfile {
        keys,
        ..Default::default()
    })))
}

fn opts() -> Options {
    Options::new(
        chrono::Utc
            .with_ymd_and_hms(2024, 5, 20, 13, 7, 30)
            .unwrap(),
    )
}

/// Reading A (2025 digest §8.2): `##0295` + header + 208 raw cipher bytes + `&&2200`.
fn raw_form(cp: &str) -> Vec<u8> {
    let mut c = cp.as_bytes().to_vec();
    crypt::encrypt_in_place(&[0x30; 16], &mut c);
    let mut out = format!("##{:04}{HEAD}", HEAD.len() + cp.len() + 2).into_bytes();
    out.extend_from_slice(&c);
    let mut plain = HEAD.as_bytes().to_vec();
    plain.extend_from_slice(cp.as_bytes());
    plain.extend_from_slice(b"&&");
    out.extend_from_slice(b"&&");
    out.extend_from_slice(&protocol::crc::format_hex4(protocol::crc::hj212(&plain)));
    out.extend_from_slice(b"\r\n");
    out
}

#[test]
fn standard_example_raw_form_decrypts_and_keeps_wire_bytes() {
    let wire = raw_form(CP1);
    assert_eq!(&wire[..6], b"##0295");
    assert!(wire.ends_with(b"&&2200\r\n"), "standard prints CRC 2200");
    assert_eq!(wire.len(), 307);
    assert_eq!(
        wire.iter().filter(|&&b| b >= 0x80).count(),
        108,
        "digest: 108 bytes >= 0x80"
    );
    let f = protocol::decode(
        Bytes::from(wire.clone()),
        &opts(),
        &with_keys(vec![[0x30; 16]]),
    );
    assert!(!f.has_error(), "{:?}", f.findings);
    assert_eq!(f.raw, wire, "wire bytes untouched");
    assert_eq!(f.encryption, Some(crypt::WireForm::Raw));
    let j = serde_json::Value::Object(json::frame_json(&f, true));
    assert_eq!(
        serde_json::to_string(&j["values"]["a01014"]).unwrap(),
        r#"{"Min":3.20,"Avg":3.211,"Max":3.212,"Flag":"N"}"#
    );
    assert_eq!(j["encryption"], "sm4-raw");
    assert_eq!(j["dialect"], "2025");
    assert!(
        j.get("raw").is_none(),
        "ciphertext is not UTF-8: only raw_b64"
    );
    assert!(j["raw_b64"].as_str().unwrap().len() > 400);
    assert_eq!(j["crc"]["declared"], "2200");
    assert_eq!(protocol::reply::ack(&f).map(|b| b.to_vec()), Some(b"##0087QN=20240520210700000;ST=91;CN=9014;PW=123456;MN=010000A8900016F000169DC0;Flag=8;CP=&&&&EF41\r\n".to_vec()));
}

#[test]
fn tail_shorter_than_a_block_stays_plain() {
    let wire = raw_form(CP3);
    assert_eq!(&wire[..6], b"##0234");
    assert!(wire.ends_with(b"g=N&&B541\r\n"));
    let f = protocol::decode(
        Bytes::from(wire),
        &opts(),
        &with_keys(vec![[0x31; 16], [0x30; 16]]),
    );
    assert!(
        !f.has_error(),
        "second key (old/new changeover) must be tried: {:?}",
        f.findings
    );
    assert_eq!(f.param("DataTime"), Some("20240520210600"));
}

#[test]
fn text_form_is_accepted_too() {
    let mut c = CP3.as_bytes().to_vec();
    crypt::encrypt_in_place(&[0x30; 16], &mut c);
    let mut cp = crypt::format_text_form(&c[..144]);
    cp.extend_from_slice(b"g=N");
    let mut seg = HEAD.as_bytes().to_vec();
    seg.extend_from_slice(&cp);
    seg.extend_from_slice(b"&&");
    let mut wire = format!("##{:04}", seg.len()).into_bytes();
    wire.extend_from_slice(&seg);
    wire.extend_from_slice(b"B541\r\n");
    let f = protocol::decode(Bytes::from(wire), &opts(), &with_keys(vec![[0x30; 16]]));
    assert_eq!(f.encryption, Some(crypt::WireForm::Text));
    assert!(!f.has_error(), "{:?}", f.findings);
    assert_eq!(f.param("DataTime"), Some("20240520210600"));
}

#[test]
fn wrong_or_missing_key_rejects() {
    let wire = Bytes::from(raw_form(CP1));
    let f = protocol::decode(wire.clone(), &opts(), &with_keys(vec![[0x31; 16]]));
    assert!(
        f.findings
            .iter()
            .any(|x| x.code == code::DECRYPT_FAILED && x.severity == Severity::Error)
    );
    assert!(
        protocol::reply::ack(&f).is_some(),
        "ack decision is the session's: it must check has_error"
    );
    let f = protocol::decode(wire, &opts(), &());
    assert!(f.findings.iter().any(|x| x.code == code::DECRYPT_NOKEY));
    assert!(f.has_error());
}

#[test]
fn rf_and_heartbeat_2025() {
    let raw = b"##0144QN=20260101081500001;ST=31;CN=2051;PW=123456;MN=010000A8900016F000169DC0;Flag=9;RF=1;CP=&&DataTime=20260101080000;a34013-Avg=7.5,a34013-Flag=N&&5A00\r\n";
    // Received a week later: old, but RF=1 marks it as re-sent, so not stale.
    let o = Options::new(chrono::Utc.with_ymd_and_hms(2026, 1, 8, 0, 0, 0).unwrap());
    let f = protocol::decode(Bytes::from_static(raw), &o, &());
    assert!(f.rf());
    assert!(!f.has_error(), "{:?}", f.findings);
    assert!(!f.findings.iter().any(|x| x.code == code::TIME_STALE));
    let j = json::frame_json(&f, false);
    assert_eq!(j["rf"], true);
}

#[test]
fn timestamp_checks_use_now_and_zone() {
    let raw = b"##0295QN=20240601085857223;ST=31;CN=2011;PW=123456;MN=010000A8900016F000169DC0;Flag=5;CP=&&DataTime=20240601085857;a21026-Rtd=12.5,a21026-ZsRtd=15.1,a21026-Flag=N;a21002-Rtd=35.2,a21002-ZsRtd=42.6,a21002-Flag=N;a34013-Rtd=3.1,a34013-Flag=N;a19001-Rtd=9.8,a19001-Flag=N;a00000-Rtd=28.15,a00000-Flag=N&&3E80\r\n";
    let codes = |now: chrono::DateTime<chrono::Utc>| {
        let f = protocol::decode(Bytes::from_static(raw), &Options::new(now), &());
        f.findings.iter().map(|x| x.code).collect::<Vec<_>>()
    };
    // 08:58:57 Beijing = 00:58:57 UTC.
    assert!(codes(chrono::Utc.with_ymd_and_hms(2024, 6, 1, 0, 59, 0).unwrap()).is_empty());
    assert_eq!(
        codes(chrono::Utc.with_ymd_and_hms(2024, 6, 1, 0, 50, 0).unwrap()),
        [code::TIME_FUTURE]
    );
    assert_eq!(
        codes(chrono::Utc.with_ymd_and_hms(2024, 6, 4, 0, 0, 0).unwrap()),
        [code::TIME_STALE]
    );
    // Device clock in UTC (zone configured): now 8 h "ahead".
    let mut o = Options::new(chrono::Utc.with_ymd_and_hms(2024, 6, 1, 0, 59, 0).unwrap());
    o.tz = chrono::FixedOffset::east_opt(0).unwrap();
    let f = protocol::decode(Bytes::from_static(raw), &o, &());
    assert_eq!(f.findings[0].code, code::TIME_FUTURE);
}

#[test]
fn crc_policies() {
    // hcu: a MODBUS-CRC device (digest §9.1 #9).
    let raw = b"##0086QN=20170516010101001;ST=22;CN=1072;PW=123456;MN=ABCDEFG1234567;Flag=3;CP=&&PW=654321&&E476\r\n";
    let swapped = b"##0086QN=20170516010101001;ST=22;CN=1072;PW=123456;MN=ABCDEFG1234567;Flag=3;CP=&&PW=654321&&76E4\r\n";
    let run = |raw: &'static [u8], policy: Option<CrcPolicy>| {
        let d = Devices(policy.map(|p| {
            Arc::new(DeviceProfile {
                crc: Some(p),
                ..Default::default()
            })
        }));
        let f = protocol::decode(Bytes::from_static(raw), &opts(), &d);
        (
            f.has_error(),
            f.findings
                .iter()
                .map(|x| x.code)
                .filter(|c| c.starts_with("crc"))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        run(raw, None),
        (true, vec![code::CRC_VARIANT_MODBUS, code::CRC_MISMATCH])
    );
    assert_eq!(
        run(raw, Some(CrcPolicy::Modbus)),
        (false, vec![code::CRC_VARIANT_MODBUS])
    );
    assert!(run(raw, Some(CrcPolicy::Swapped)).0);
    assert_eq!(
        run(swapped, Some(CrcPolicy::Swapped)),
        (false, vec![code::CRC_VARIANT_MODBUS_SWAPPED])
    );
    assert!(!run(swapped, Some(CrcPolicy::Any)).0);
    let f = protocol::decode(Bytes::from_static(raw), &opts(), &());
    let d = &f
        .findings
        .iter()
        .find(|x| x.code == code::CRC_MISMATCH)
        .unwrap()
        .detail;
    assert!(
        d.contains("E476") && d.contains("E681") && d.contains("modbus"),
        "{d}"
    );
}
