//! Consumers of the frame log that publish elsewhere.
//!
//! The log is the only queue: a publisher reads records after its persisted
//! cursor, sends them, and moves the cursor only once the far side has
//! acknowledged them. After an outage or a restart it simply reads again from
//! the cursor, so no component keeps a retry queue of its own and ingest never
//! waits for a consumer. How a publisher follows the log (cursor, wake-up,
//! cursor writes, crash-loop guard, dead letters) is `crate::store::Follower`'s
//! job; each publisher implements `crate::store::Consumer`.
//!
//! - [`plan`]: which records are published, on which topic, with which payload
//!   (pure functions, no I/O).
//! - [`merge`]: split uploads (PNUM/PNO) merged per (MN, CN, DataTime).
//! - [`presence`]: device online/offline state handed from sessions to the publisher.
//! - [`mqtt`]: the MQTT publisher, the only module that touches the MQTT client crate.
//! - [`upstream`]: HJ 212 pass-through to upstream platforms, byte-exact.

pub mod merge;
pub mod mqtt;
pub mod plan;
pub mod presence;
pub mod upstream;
