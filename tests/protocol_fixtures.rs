//! Known-answer tests over the real frames in `fixtures/frames.jsonl`.
//!
//! Each fixture records what an independent computation found (declared and
//! actual length, HJ 212 CRC, terminator) and, where the source had tests,
//! the field values they assert. The decoder must agree on every one.

use bytes::Bytes;
use chrono::TimeZone;
use hj212_gateway::protocol::{self, Options, Severity, finding::code, json};
use serde_json::Value;

fn fixtures() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/frames.jsonl"
    ))
    .unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn opts() -> Options {
    // A receive time far from every fixture's DataTime would flag them all stale;
    // time checks have their own tests, so use a lenient window here.
    let mut o = Options::new(chrono::Utc.with_ymd_and_hms(2026, 11, 28, 0, 0, 0).unwrap());
    o.stale_after_s = i64::MAX / 4;
    o.future_tolerance_s = i64::MAX / 4;
    o
}

/// Tags whose `frame` text is not one single frame (several glued, junk around it).
fn single_frame(fx: &Value) -> bool {
    let tags: Vec<&str> = fx["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let bad = [
        "glued_frames",
        "dtu_junk",
        "no_header",
        "interleaved_stream",
        "trailing_bytes_after_crc",
        "trailing_bytes_after_data",
        "not_hj212",
        "no_crc_after_data",
        "literal_backslash_escapes",
    ];
    !tags.iter().any(|t| bad.contains(t)) && fx["frame"].as_str().unwrap().starts_with("##")
}

#[test]
fn every_single_frame_fixture_matches_its_recorded_checks() {
    let mut checked = 0;
    for fx in fixtures() {
        if !single_frame(&fx) {
            continue;
        }
        let id = fx["id"].as_str().unwrap();
        let raw = fx["frame"].as_str().unwrap().as_bytes().to_vec();
        let f = protocol::decode(Bytes::from(raw.clone()), &opts(), &());
        let codes: Vec<&str> = f.findings.iter().map(|x| x.code).collect();
        assert_eq!(f.raw, raw, "{id}: raw bytes must be kept");

        // CRC: our HJ 212 CRC equals the independently computed one.
        if let Some(c) = fx["crc_computed"].as_str() {
            let ours =
                String::from_utf8(protocol::crc::format_hex4(f.crc.computed).to_vec()).unwrap();
            if f.encryption.is_none() {
                assert_eq!(ours, c, "{id}: computed CRC");
            }
        }
        let crc_ok = fx["crc_ok"].as_bool().unwrap();
        assert_eq!(
            !codes.contains(&code::CRC_MISMATCH) && !codes.contains(&code::CRC_MISSING),
            crc_ok,
            "{id}: crc verdict {codes:?}"
        );
        match fx.get("crc_algo_match").and_then(Value::as_str) {
            Some("modbus") => assert!(codes.contains(&code::CRC_VARIANT_MODBUS), "{id}: {codes:?}"),
            Some("modbus_swapped") => assert!(
                codes.contains(&code::CRC_VARIANT_MODBUS_SWAPPED),
                "{id}: {codes:?}"
            ),
            _ => {}
        }
        // Length: a mismatch is reported exactly when the fixture says so.
        if let (Some(d), Some(a)) = (fx["len_field"].as_u64(), fx["len_actual"].as_u64()) {
            assert_eq!(
                codes.contains(&code::LENGTH_MISMATCH),
                d != a,
                "{id}: length {d} vs {a}: {codes:?}"
            );
        }
        if fx["len_actual"].as_u64().unwrap_or(0) > 1024 {
            assert!(codes.contains(&code::FRAME_OVERSIZE), "{id}");
        }
        match fx["terminator"].as_str().unwrap() {
            "CRLF" => assert!(!codes.contains(&code::TERMINATOR_MISSING), "{id}"),
            "LF" => assert!(codes.contains(&code::TERMINATOR_NONSTANDARD), "{id}"),
            "none" => assert!(codes.contains(&code::TERMINATOR_MISSING), "{id}"),
            _ => {}
        }
        // Strictly valid fixtures decode without any error finding.
        if fx["valid"].as_bool().unwrap() {
            let errors: Vec<_> = f
                .findings
                .iter()
                .filter(|x| x.severity == Severity::Error)
                .collect();
            assert!(errors.is_empty(), "{id}: {errors:?}");
        }
        // Field values asserted by the source's own tests.
        if let Some(exp) = fx["expected"].as_object() {
            for (k, getter) in [
                ("QN", f.qn()),
                ("ST", f.st()),
                ("CN", f.cn()),
                ("PW", f.pw()),
                ("MN", f.mn()),
            ] {
                if let Some(v) = exp.get(k).and_then(Value::as_str) {
                    assert_eq!(getter, Some(v), "{id}: {k}");
                }
            }
            if let Some(v) = exp.get("Flag").and_then(Value::as_str) {
                assert_eq!(
                    f.flag.map(|x| x.to_string()).as_deref(),
                    Some(v),
                    "{id}: Flag"
                );
            }
            if let Some(cp) = exp.get("CP").and_then(Value::as_object) {
                for (k, v) in cp {
                    let got = f
                        .pairs
                        .iter()
                        .rev()
                        .find(|p| f.bytes(p.key) == k.as_bytes())
                        .map(|p| f.text(p.value).into_owned());
                    assert_eq!(got.as_deref(), v.as_str(), "{id}: CP {k}");
                }
            }
        }
        // The JSON object is well-formed and carries the schema.
        let j = json::frame_json(&f, true);
        assert_eq!(j["schema"], "hj212.frame.v1");
        assert_eq!(j["kind"], "frame");
        checked += 1;
    }
    assert!(checked > 150, "only {checked} fixtures checked");
}

#[test]
fn p5_trailing_separator_and_typo_key() {
    // expected_tests.md P5 (teafull-001): DataTime is the time, LA-td is kept as an unknown item.
    let fx = fixtures()
        .into_iter()
        .find(|f| f["id"] == "teafull-001")
        .unwrap();
    let f = protocol::decode(
        Bytes::from(fx["frame"].as_str().unwrap().as_bytes().to_vec()),
        &opts(),
        &(),
    );
    assert_eq!(f.param("DataTime"), Some("20200814151600"));
    let j = json::frame_json(&f, false);
    assert_eq!(
        serde_json::to_string(&j["values"]["LA"]).unwrap(),
        r#"{"td":50.1,"Flag":"N"}"#
    );
    assert_eq!(
        serde_json::to_string(&j["values"]["a01006"]).unwrap(),
        r#"{"Rtd":101.02,"Flag":"N"}"#
    );
    assert_eq!(f.flag, Some(7));
    assert_eq!(f.dialect, Some(protocol::Dialect::V2017));
}

#[test]
fn p1_2005_no_qn_no_flag_keeps_scale() {
    let fx = fixtures()
        .into_iter()
        .find(|f| f["id"] == "xy-001")
        .unwrap();
    let f = protocol::decode(
        Bytes::from(fx["frame"].as_str().unwrap().as_bytes().to_vec()),
        &opts(),
        &(),
    );
    assert_eq!(f.dialect, Some(protocol::Dialect::V2005));
    let codes: Vec<&str> = f.findings.iter().map(|x| x.code).collect();
    assert!(codes.contains(&code::FIELD_MISSING_QN) && codes.contains(&code::FIELD_MISSING_FLAG));
    assert!(
        codes.contains(&code::TIME_PRECISION),
        "17-digit DataTime is flagged: {codes:?}"
    );
    assert!(!f.has_error());
    let j = json::frame_json(&f, false);
    assert_eq!(
        serde_json::to_string(&j["values"]).unwrap(),
        r#"{"B01":{"Rtd":36.91},"011":{"Rtd":231.0,"Flag":"N"},"060":{"Rtd":1.803,"Flag":"N"}}"#
    );
    assert_eq!(j["data_time"], "2016-08-24T00:38:17.000+08:00");
}

#[test]
fn p6_p10_flag_8_and_9_are_2025() {
    for id in ["fs-012", "chenqi-001"] {
        let fx = fixtures().into_iter().find(|f| f["id"] == id).unwrap();
        let f = protocol::decode(
            Bytes::from(fx["frame"].as_str().unwrap().as_bytes().to_vec()),
            &opts(),
            &(),
        );
        assert_eq!(f.dialect, Some(protocol::Dialect::V2025), "{id}");
    }
}

#[test]
fn r2_r6_r7_rejections() {
    let all = fixtures();
    let get = |id: &str| {
        let fx = all.iter().find(|f| f["id"] == id).unwrap();
        protocol::decode(
            Bytes::from(fx["frame"].as_str().unwrap().as_bytes().to_vec()),
            &opts(),
            &(),
        )
    };
    // R1: CRC off by one is an error under the strict default.
    let f = get("xy-005");
    assert!(
        f.findings
            .iter()
            .any(|x| x.code == code::CRC_MISMATCH && x.severity == Severity::Error)
    );
    // R2: segment over 1024 flagged.
    assert!(
        get("xy-008")
            .findings
            .iter()
            .any(|x| x.code == code::FRAME_OVERSIZE)
    );
    // R6: declared 215, actual 271.
    let f = get("issue-001");
    assert!(
        f.findings
            .iter()
            .any(|x| x.code == code::LENGTH_MISMATCH && x.detail.contains("215")),
        "{:?}",
        f.findings
    );
    // R7 (issue-002, `…PolId=w01018&&;Flag=03740`): the peers call it "no CRC
    // after &&", but read byte-exact it is consistent: the 108-byte segment
    // `…&&;Flag=0` has length 108 and HJ 212 CRC 3740. What is wrong is the
    // Flag misplaced after CP, which we report; the header then has no Flag.
    let f = get("issue-002");
    let codes: Vec<&str> = f.findings.iter().map(|x| x.code).collect();
    assert!(
        codes.contains(&code::CP_TRAILING) && codes.contains(&code::FIELD_MISSING_FLAG),
        "{codes:?}"
    );
    assert!(!codes.contains(&code::CRC_MISMATCH) && !codes.contains(&code::LENGTH_MISMATCH));
}
