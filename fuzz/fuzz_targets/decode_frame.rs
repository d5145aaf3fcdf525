//! Decoder properties on one candidate frame; see `hj212_gateway::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hj212_gateway::fuzzing::decode_frame(data);
});
