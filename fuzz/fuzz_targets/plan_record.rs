//! MQTT plan and upstream selection of an arbitrary stored record; see
//! `hj212_gateway::fuzzing::plan`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hj212_gateway::fuzzing::plan_record(data);
});
