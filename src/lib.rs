//! hj212-gateway: the front door of a pollution-source monitoring network.
//!
//! Stack analyzers and data loggers dial in over TCP and stream HJ 212
//! (2005, 2017 and 2025 editions). The gateway frames the hostile byte
//! stream, validates every frame, stores it byte-exact in an append-only,
//! hash-chained SQLite log, and acknowledges the device only once the frame
//! is durable. Everything downstream reads that log from its own cursor.
//!
//! # Layout
//! - [`protocol`]: the workspace crate `hj212` (`crates/hj212`), sans-IO HJ 212
//!   (framing, CRC, header, CP, dialects, SM4, findings, replies, the frame JSON
//!   schema). No I/O, no clock reads; Cargo keeps tokio, SQLite and tracing out.
//! - [`codec`]: the tokio-util adapter around [`protocol::framing`].
//! - [`config`], [`registry`]: strict TOML config and the device registry.
//! - [`app`]: what every task shares (config, registry, store handle, MN
//!   ownership).
//! - [`ingest`]: sans-IO per-connection core: items and `now` in; records,
//!   replies and downlink steps out.
//! - [`server`], [`session`]: listener with limits; one task per device, a
//!   short wait loop around [`ingest`].
//! - [`proxy`]: sans-IO PROXY protocol v1/v2 (real client addresses behind an
//!   L4 load balancer).
//! - [`store`]: the frame log (the only module that touches SQLite).
//! - [`publish`]: consumers of the log; [`publish::mqtt`] republishes to an
//!   MQTT broker (the only module that touches the MQTT client);
//!   [`publish::upstream`] forwards frames to HJ 212 platforms.
//! - [`alarm`]: abnormal-data detection, a sans-IO engine and the task that
//!   follows the log with it (alarms in the store, on MQTT, in `replay`).
//! - [`recency`]: least-recently-seen order that caps per-MN state of
//!   unregistered devices (alarm engine, downlink state).
//! - [`metrics`]: lock-free counters and histograms, `/metrics` and `/healthz`.
//! - [`downlink`]: gateway-originated requests to devices (operator commands, clock
//!   calibration, gap backfill, 2025 key rotation, relayed platform requests), a
//!   sans-IO engine per session and the operator control socket.
//! - [`health`]: consumers that stopped, for `/healthz`.
//! - [`vocab`]: the closed vocabularies (close reasons, the gateway's finding
//!   codes, exchange outcomes, dead-letter reasons), below everything that
//!   names or counts them.
//! - [`daemon`], [`systemd`], [`telemetry`], [`cli`], [`cmd`], [`exit`]: process wiring.
//!
//! # Data flow
//! ```text
//! device --TCP--> codec (frame | junk) --> protocol::decode(now) + registry policy
//!    --> store.append_many (bounded queue -> writer thread -> one transaction per batch)
//!    --> replies (9014/9013) written only after the commit
//! log --cursor--> MQTT publisher (QoS 1; PUBACK advances the cursor)
//! log --cursor--> upstream forwarders (HJ 212 pass-through, byte-exact; platform requests relayed down)
//! log --cursor--> alarm detector -> alarms table -> (cursor mqtt.alarms) MQTT {prefix}/{mn}/alarm
//! ```

pub mod alarm;
pub mod app;
pub mod archiver;
pub mod cli;
pub mod cmd;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod downlink;
pub mod evidence;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod ingest;
pub mod metrics;
pub mod notary;
pub mod priority;
/// The sans-IO HJ 212 crate ([`hj212`], `crates/hj212`), under the path the
/// gateway has always used for it.
pub mod protocol {
    pub use hj212::*;

    /// The raw bytes of every frame in `fixtures/frames.jsonl`, for the
    /// gateway's unit tests that run a property over the real corpus.
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
}
pub mod proxy;
pub mod publish;
pub mod recency;
pub mod registry;
pub mod server;
pub mod session;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod vocab;
