//! Replays every committed fuzz seed through the fuzz entry point, so the
//! properties the fuzzer checks run in every `cargo test`.

use hj212_gateway::fuzzing::codec_rechunk;

#[test]
fn seed_corpus_replays() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/corpus-seed/codec_rechunk"
    );
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("seed corpus") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("seed");
        codec_rechunk(&data);
        // Every chunk size from 1 to 64 as well, for the same stream.
        let stream = &data[1 + usize::from(data[0] % 17).min(data.len() - 1)..];
        for size in 1..=64u8 {
            codec_rechunk(&[[1, size - 1].as_slice(), stream].concat());
        }
        seen += 1;
    }
    assert!(seen >= 252, "only {seen} seeds");
}

#[test]
fn entry_rejects_nothing() {
    codec_rechunk(&[]);
    codec_rechunk(&[5]);
    codec_rechunk(b"\x01\x00##");
    codec_rechunk(b"\x00##0000&&0000\r\n");
}

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = format!("{}/fuzz/corpus-seed/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("seed corpus") {
        f(&std::fs::read(entry.expect("entry").path()).expect("seed"));
        seen += 1;
    }
    seen
}

#[test]
fn decode_frame_seeds_replay() {
    assert!(replay("decode_frame", hj212_gateway::fuzzing::decode_frame) >= 252);
    // Truncations of every fixture, as a framer at EOF might hand them over.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/frames.jsonl"
    ))
    .unwrap();
    for line in text.lines().take(40) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let raw = v["frame"].as_str().unwrap().as_bytes();
        for cut in 0..raw.len() {
            hj212_gateway::fuzzing::decode_frame(&raw[..cut]);
        }
    }
}

#[test]
fn reply_roundtrip_seeds_replay() {
    assert!(replay("reply_roundtrip", hj212_gateway::fuzzing::reply_roundtrip) >= 4);
    for sel in 0..=255u8 {
        hj212_gateway::fuzzing::reply_roundtrip(&[sel, b'A', b'1', b'x', b'9', b'Z', b'0']);
    }
}

#[test]
fn merge_packets_seeds_replay() {
    assert!(
        replay(
            "merge_packets",
            hj212_gateway::fuzzing::merge::merge_packets
        ) >= 10
    );
}

/// A bounded property run of the merger target in every `cargo test`:
/// pseudo-random op sequences (a fixed-seed SplitMix64, so a failure repeats),
/// biased towards the hostile cases of issue 18 (huge PNUMs, groups that never
/// complete, values near the message cap).
#[test]
fn merge_packets_random_sequences_keep_their_bounds() {
    let mut state = 0x5eed_0018_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for _ in 0..1000 {
        let len = 5 + (next() % 400) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Every fourth sequence: values mostly small, so groups fill up by count.
        if data[0] % 4 == 0 {
            for b in data.iter_mut().skip(5).step_by(3) {
                *b %= 8;
            }
        }
        hj212_gateway::fuzzing::merge::merge_packets(&data);
    }
}
