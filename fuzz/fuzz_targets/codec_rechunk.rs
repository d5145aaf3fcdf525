//! Re-chunking property of the stream framer; see `hj212_gateway::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hj212_gateway::fuzzing::codec_rechunk(data);
});
