//! `decode` over every real frame in `fixtures/frames.jsonl`, through the same
//! function the CLI runs: each fixture is explained item by item, valid frames
//! exit 0, everything deviant exits 1 with a specific finding, and no byte is
//! unaccounted for.

use hj212_gateway::cmd::decode::{DecodeArgs, run};
use hj212_gateway::protocol::CrcPolicy;
use serde_json::Value;

fn args(path: &std::path::Path, json: bool) -> DecodeArgs {
    DecodeArgs {
        input: path.to_string_lossy().into_owned(),
        json,
        keys: vec![],
        dialects: vec![],
        crc: CrcPolicy::Strict,
        // Far-off fixtures must not all be "stale": judge them at their own time.
        now: None,
        tz: chrono::FixedOffset::east_opt(8 * 3600).unwrap(),
    }
}

#[test]
fn every_fixture_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/frames.jsonl"
    ))
    .unwrap();
    let mut n = 0;
    for line in text.lines() {
        let fx: Value = serde_json::from_str(line).unwrap();
        let id = fx["id"].as_str().unwrap();
        let raw = fx["frame"].as_str().unwrap().as_bytes();
        let path = dir.path().join(id);
        std::fs::write(&path, raw).unwrap();

        let mut out = Vec::new();
        let ok = run(&args(&path, true), &mut out).unwrap();
        let items: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(!items.is_empty(), "{id}: no item");
        // Every byte is in exactly one item, in order.
        let mut joined = Vec::new();
        for it in &items {
            use base64::Engine;
            joined.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(it["raw_b64"].as_str().unwrap())
                    .unwrap(),
            );
        }
        assert_eq!(joined, raw, "{id}: items must cover the input exactly");
        let frames: Vec<&Value> = items.iter().filter(|i| i["kind"] == "frame").collect();
        let tags: Vec<&str> = fx["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        if fx["valid"].as_bool().unwrap() {
            assert!(!frames.is_empty(), "{id}: a valid fixture holds a frame");
            for f in &frames {
                let errors: Vec<&Value> = f["findings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|x| x["severity"] == "error")
                    .collect();
                assert!(errors.is_empty(), "{id}: {errors:?}");
            }
            if !tags.contains(&"glued_frames") {
                assert_eq!(frames.len(), 1, "{id}");
                assert_eq!(frames[0]["crc"]["computed"], fx["crc_computed"], "{id}");
            }
        } else {
            // Deviant: rejected (exit 1), or tolerated with the deviation named
            // (LF-only, lower-case CRC, miscounted length...).
            let named = items
                .iter()
                .any(|i| !i["findings"].as_array().unwrap().is_empty());
            assert!(
                !ok || named,
                "{id}: a deviant fixture must not pass silently"
            );
        }
        if id == "fs-039" {
            assert_eq!(frames.len(), 4, "four glued frames");
        }
        if id == "fs-040" {
            assert_eq!(frames.len(), 3, "three frames in one read");
        }
        n += 1;
    }
    assert_eq!(n, 252);
}

#[test]
fn human_report_names_the_crc_variant() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hcu");
    std::fs::write(
        &path,
        b"##0086QN=20170516010101001;ST=22;CN=1072;PW=123456;MN=ABCDEFG1234567;Flag=3;CP=&&PW=654321&&E476\r\n",
    )
    .unwrap();
    let mut out = Vec::new();
    assert!(!run(&args(&path, false), &mut out).unwrap());
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("CRC   declared E476 computed E681 (modbus)"),
        "{text}"
    );
    assert!(text.contains("error   crc.mismatch"), "{text}");
    assert!(
        text.contains("PW=<redacted>") && !text.contains("654321"),
        "{text}"
    );
    let mut a = args(&path, false);
    a.crc = CrcPolicy::Modbus;
    let mut out = Vec::new();
    assert!(
        run(&a, &mut out).unwrap(),
        "accepted under the modbus policy"
    );
}
