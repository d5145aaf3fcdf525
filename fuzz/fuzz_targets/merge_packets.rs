//! Bounds of the split-upload merger; see `hj212_gateway::fuzzing::merge`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hj212_gateway::fuzzing::merge::merge_packets(data);
});
