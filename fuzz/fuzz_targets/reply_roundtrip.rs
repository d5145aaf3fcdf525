//! Round trip of the replies and requests the gateway builds; see `hj212_gateway::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hj212_gateway::fuzzing::reply_roundtrip(data);
});
