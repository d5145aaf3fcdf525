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
