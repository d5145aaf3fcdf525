//! The session's ingest path over arbitrary chunk, frame, MN and close
//! sequences, asserting its bounds; see `hj212_gateway::fuzzing::ingest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hj212_gateway::fuzzing::ingest::session_ingest(data);
});
