//! Sans-IO HJ 212: bytes and `now` in; typed frames, findings and reply bytes out.
//!
//! Nothing in this crate performs I/O, spawns tasks or reads a clock; its
//! dependencies (no tokio, no SQLite, no tracing) keep it that way. In the
//! hj212-gateway it is the only place that knows HJ 212 syntax.
//!
//! # Layout
//! - [`framing`]: finds frame boundaries in a hostile byte stream, with caps.
//! - [`frame`]: one frame: envelope, [`header`] and [`cp`] grammar, [`crc`],
//!   [`dialect`], field and timestamp checks ([`time`]); [`decode`] never fails,
//!   everything it notices is a [`Finding`].
//! - [`crypt`]: the 2025 SM4 data segment; [`codes`]: the command table.
//! - [`reply`], [`build`]: replies (9014/9013, ...) and frames built from scratch.
//! - [`json`]: the frame document; [`span`]: byte ranges into a data segment.
#![doc = ""]
#![doc = include_str!("../README.md")]

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
pub mod span;
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

/// The repository's `fixtures/frames.jsonl` (real frames, one JSON line each),
/// read in place: the fixtures belong to the whole workspace.
#[cfg(test)]
pub(crate) const FIXTURE_FRAMES: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/frames.jsonl");

/// The raw bytes of every frame in `fixtures/frames.jsonl`, for unit tests that
/// run a property over the real corpus.
#[cfg(test)]
pub(crate) fn fixture_frames() -> Vec<Vec<u8>> {
    let path = FIXTURE_FRAMES;
    let text = std::fs::read_to_string(path).expect("fixtures/frames.jsonl");
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            v["frame"].as_str().expect("frame").as_bytes().to_vec()
        })
        .collect()
}
