//! Sans-IO HJ 212: bytes and `now` in; typed frames, findings and reply bytes out.
//!
//! Nothing in this module performs I/O, spawns tasks or reads a clock. It is the
//! only place in the crate that knows HJ 212 syntax.

pub mod crc;
pub mod framing;
