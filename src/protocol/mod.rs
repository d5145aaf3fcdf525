//! Sans-IO HJ 212: bytes and `now` in; typed frames, findings and reply bytes out.
//!
//! Nothing in this module performs I/O, spawns tasks or reads a clock. It is the
//! only place in the crate that knows HJ 212 syntax.

pub mod build;
pub mod codes;
pub mod cp;
pub mod crc;
pub mod crypt;
pub mod dialect;
pub mod finding;
pub mod frame;
pub mod framing;
pub mod header;
pub mod json;
pub mod reply;
pub mod time;

pub use dialect::Dialect;
pub use finding::{Finding, Severity};
pub use frame::{CrcPolicy, DeviceLookup, DeviceProfile, Frame, Options, decode};

/// A device lookup in which every MN holds the SM4 key of the standard's worked
/// examples (sixteen `0x30` bytes), so encrypted example frames decode. For
/// fuzzing, tests and demonstrations; never a production registry.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExampleKeyLookup;

impl DeviceLookup for ExampleKeyLookup {
    fn profile(&self, _mn: &str) -> Option<std::sync::Arc<DeviceProfile>> {
        Some(std::sync::Arc::new(DeviceProfile {
            keys: vec![[0x30; 16]],
            ..Default::default()
        }))
    }
}

/// The raw bytes of every frame in `fixtures/frames.jsonl`, for unit tests that
/// run a property over the real corpus.
#[cfg(test)]
pub(crate) fn fixture_frames() -> Vec<Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/frames.jsonl");
    let text = std::fs::read_to_string(path).expect("fixtures/frames.jsonl");
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            v["frame"].as_str().expect("frame").as_bytes().to_vec()
        })
        .collect()
}
