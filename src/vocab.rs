//! The gateway's closed vocabularies: finding codes of its own policy, why a
//! session ended, how a downlink exchange ended, why a record was set aside.
//!
//! Each is one list with one spelling, used for what is stored, logged and
//! exported and for the metric labels. They live here, below everything that
//! names them, so that the metrics registry can list every label value without
//! importing the modules that produce them (and those modules can count into
//! the registry without an import circle). The protocol's own finding codes
//! are the protocol crate's (`protocol::finding::Code`); the alarm detectors'
//! names are `alarm::DetectorKind`.

use crate::protocol::Frame;

/// Finding codes the gateway's own policy adds (beyond the protocol's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingCode {
    /// PW does not match the registry.
    AuthPassword,
    /// MN not in the registry and `unknown_device = "quarantine"`: stored and
    /// acked, never forwarded or published.
    DeviceQuarantined,
    /// MN not in the registry and `unknown_device = "reject"`.
    DeviceUnknown,
    /// The MN has a live session from another address: stored and acked, but
    /// that session keeps the MN (and its downlink).
    SessionConflict,
}

impl FindingCode {
    /// Every code, sorted by its text.
    pub const ALL: [FindingCode; 4] = [
        FindingCode::AuthPassword,
        FindingCode::DeviceQuarantined,
        FindingCode::DeviceUnknown,
        FindingCode::SessionConflict,
    ];

    /// The code as findings, metrics and the frame JSON spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            FindingCode::AuthPassword => "auth.password",
            FindingCode::DeviceQuarantined => "device.quarantined",
            FindingCode::DeviceUnknown => "device.unknown",
            FindingCode::SessionConflict => "session.conflict",
        }
    }

    /// Whether `f` carries this code.
    pub fn is_on(self, f: &Frame) -> bool {
        f.findings.iter().any(|x| x.code == self.as_str())
    }
}

/// Why a session ended (the `reason` label of `hj212_sessions_closed_total`
/// and the `reason` field of the session's `closed` log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The framer reported a broken stream (never today: junk is an item).
    CodecError,
    /// No bytes for `idle_timeout`.
    IdleTimeout,
    /// More than `max_junk_bytes` of junk.
    JunkLimit,
    /// A frame stayed incomplete for `partial_frame_timeout`.
    PartialFrameTimeout,
    /// The device closed the connection.
    PeerClosed,
    /// Reading the socket failed.
    ReadError,
    /// The gateway is shutting down.
    Shutdown,
    /// The frame log could not take the batch: nothing is acked.
    StoreError,
    /// A newer session took the device over.
    Superseded,
    /// Writing to the socket failed.
    WriteError,
    /// Writing to the socket took longer than `write_timeout`.
    WriteTimeout,
}

impl CloseReason {
    /// Every reason, sorted by its text; `ALL[r as usize] == r`.
    pub const ALL: [CloseReason; 11] = [
        CloseReason::CodecError,
        CloseReason::IdleTimeout,
        CloseReason::JunkLimit,
        CloseReason::PartialFrameTimeout,
        CloseReason::PeerClosed,
        CloseReason::ReadError,
        CloseReason::Shutdown,
        CloseReason::StoreError,
        CloseReason::Superseded,
        CloseReason::WriteError,
        CloseReason::WriteTimeout,
    ];

    /// The reason as metrics and logs spell it: snake_case, like every other
    /// label value, so queries and log filters need no quoting of spaces.
    pub const fn as_str(self) -> &'static str {
        match self {
            CloseReason::CodecError => "codec_error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::JunkLimit => "junk_limit",
            CloseReason::PartialFrameTimeout => "partial_frame_timeout",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::ReadError => "read_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::StoreError => "store_error",
            CloseReason::Superseded => "superseded",
            CloseReason::WriteError => "write_error",
            CloseReason::WriteTimeout => "write_timeout",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a downlink exchange ended: the vocabulary of the table's `outcome` column
/// (its CHECK constraint), of `hj212_downlink_exchanges_total{outcome}` and of the
/// control socket's `done` lines. `downlink::Outcome` carries the details (codes,
/// sends); this is its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeOutcome {
    /// `success`: 9012 ExeRtn=1, a 9013 to a notify, or QnRtn=1 and the data.
    Success,
    /// `refused`: 9011 with QnRtn other than 1.
    Refused,
    /// `failed`: 9012 with ExeRtn other than 1.
    Failed,
    /// `no_reply`: no 9011 after `1 + re_count` sends.
    NoReply,
    /// `exec_timeout`: accepted, then nothing within `exec_timeout`.
    ExecTimeout,
    /// `offline`: no live session when submitted.
    Offline,
    /// `busy`: the device's queue was full when submitted.
    Busy,
    /// `closed`: the session ended first.
    Closed,
    /// `invalid`: the request could not be built or logged.
    Invalid,
}

impl ExchangeOutcome {
    /// Every outcome, in metrics order (and the README table's).
    pub const ALL: [ExchangeOutcome; 9] = [
        ExchangeOutcome::Success,
        ExchangeOutcome::Refused,
        ExchangeOutcome::Failed,
        ExchangeOutcome::NoReply,
        ExchangeOutcome::ExecTimeout,
        ExchangeOutcome::Offline,
        ExchangeOutcome::Busy,
        ExchangeOutcome::Closed,
        ExchangeOutcome::Invalid,
    ];

    /// The stored and exported name, e.g. `no_reply`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ExchangeOutcome::Success => "success",
            ExchangeOutcome::Refused => "refused",
            ExchangeOutcome::Failed => "failed",
            ExchangeOutcome::NoReply => "no_reply",
            ExchangeOutcome::ExecTimeout => "exec_timeout",
            ExchangeOutcome::Offline => "offline",
            ExchangeOutcome::Busy => "busy",
            ExchangeOutcome::Closed => "closed",
            ExchangeOutcome::Invalid => "invalid",
        }
    }

    /// The outcome named `name` (an [`as_str`](ExchangeOutcome::as_str)), if any.
    pub fn from_name(name: &str) -> Option<ExchangeOutcome> {
        ExchangeOutcome::ALL
            .into_iter()
            .find(|o| o.as_str() == name)
    }
}

/// Reasons a record is set aside, in metrics order.
pub const DEAD_LETTER_REASONS: [&str; 7] = [
    "oversize",
    "invalid_topic",
    "broker_refused",
    "no_ack",
    "crash",
    "store_refused",
    "panic",
];
