//! The frame log: the gateway's source of truth, and the only module that touches SQLite.
//!
//! # Why a log
//!
//! Every byte sequence a device sends (and every reply we send) is appended here
//! verbatim, with the verdict and decoded document the protocol layer produced for it.
//! Devices are acknowledged only after the transaction holding their frame has
//! committed, so an ack is a promise that the frame survives a crash. Consumers
//! (MQTT, upstream forwarders, the anomaly detector) read the log behind named
//! [cursors](Cursors); one mechanism gives zero loss across outages, replay for
//! audits and backfill.
//!
//! # Write path: one writer thread, group commit
//!
//! [`Store::open`] spawns one dedicated OS thread that owns the only write connection.
//! Sessions call [`StoreHandle::append`], which puts the record on a **bounded** queue
//! (when it is full the caller awaits: that is how backpressure reaches the socket) and
//! resolves only after the transaction containing the record has committed.
//!
//! The writer blocks for the first queued item, then takes whatever else is already
//! queued without waiting. Policy for latency vs throughput:
//!
//! * If nothing else was queued (low load), the lone record is committed at once: no
//!   added latency. While that commit (an `fsync` with [`SyncMode::Full`]) runs, new
//!   arrivals pile up in the queue and form the next batch, so batching is
//!   self-clocking.
//! * If more was queued (there is load), the writer sleeps until
//!   [`StoreConfig::batch_delay`] after the first item, then takes what queued up
//!   meanwhile, up to [`StoreConfig::batch_max`] records: the callers just acked by
//!   the previous commit are about to resubmit and one `fsync` can cover them all.
//!   It sleeps rather than waking for each arrival, which cost a context switch per
//!   append.
//!
//! All records of a batch are inserted in one transaction together with the chain head
//! in `meta`. If anything in the transaction fails, it is rolled back, every waiter in
//! the batch gets [`StoreError::BatchFailed`] (nothing is acknowledged), the failure is
//! logged and counted, and the writer carries on with the next batch.
//!
//! # Tamper evidence: the hash chain
//!
//! Each record carries `hash = SHA-256(prev_hash || enc(seq) || enc(received_at_ms) ||
//! enc(peer) || enc(session) || enc(direction) || enc(kind) || enc(raw) || enc(dialect)
//! || enc(st) || enc(cn) || enc(mn) || enc(qn) || enc(data_time) || enc(verdict) ||
//! enc(duplicate) || enc(findings) || enc(doc))`, i.e. every column of the `records`
//! table except `hash`, in table order. `prev_hash` is the `hash` of the record with
//! the previous `seq`; the record with `seq = 1` chains from 32 zero bytes.
//!
//! `enc(v)` is the value exactly as stored in its SQLite column:
//!
//! * `NULL`: the four bytes `FF FF FF FF`, nothing else;
//! * INTEGER (`seq`, `received_at_ms`, `session`, `duplicate` as 0/1): the length
//!   `00 00 00 08` followed by the 64-bit two's-complement value, big-endian;
//! * TEXT: its UTF-8 byte length as a 32-bit big-endian integer, then the bytes;
//! * BLOB (`raw`): its byte length as a 32-bit big-endian integer, then the bytes.
//!
//! # What the `doc` column holds
//!
//! The decoded frame document (`hj212.frame.v1`, what `export --format jsonl`
//! and the MQTT payloads carry) is a function of the raw bytes, the `data_time`
//! column and the findings, except where decryption adds to it. Since
//! 2026-12-07 the log therefore keeps an **accepted frame without encryption**
//! (inbound frames and our acks, the bulk of every log) with an empty `doc`,
//! and a reader that wants the document rebuilds it from those columns
//! ([`StoredRecord::document`], `protocol::json::rebuild_frame_doc`): the
//! document was most of a record's bytes, and every byte stored is inserted,
//! hashed twice, written to the WAL and checkpointed on the ack path. Our acks
//! leave the session without a document at all: nothing on the hot path reads
//! one. Rejected frames, encrypted ones, junk and every record of an
//! older log keep the document they were written with. The chain and the Merkle
//! leaf hash the column as stored, empty or not; an auditor's SQL over `doc`
//! reads the raw bytes for the empty ones (`stats` counts their CRC variants
//! with a `crc_variant(raw)` SQL function).
//!
//! Enumerations are stored (and therefore hashed) as their lower-case text:
//! `direction` `in`/`out`, `kind` `frame`/`junk`, `verdict` `accepted`/`rejected`/`junk`.
//! `session` and `seq` are unsigned in Rust and stored as the same 64-bit pattern.
//! An auditor can recompute the chain with any SQLite client and any SHA-256 tool
//! (`tests/store_tamper.rs` does it with Python's standard library).
//!
//! The single row of table `meta` holds the chain head (`last_seq`, `last_hash`) and is
//! updated in the same transaction as every batch, so deleting the *last* records is
//! detectable too. [`verify_chain`] reports hash mismatches, gaps (deleted records),
//! records swapped between positions, and a log that ends before or after its head.
//!
//! # What the triggers are, and are not
//!
//! Triggers make `UPDATE` and `DELETE` on `records` (and `DELETE` or a backwards move of
//! the head in `meta`) fail. They guard against accidents, such as a maintenance script
//! or a future bug. They are **not** a security boundary: anyone who can write the file
//! can drop them. The evidence is the hash chain. Someone who rewrites the chain *and*
//! the head from the point of tampering onward will pass [`verify_chain`]. Detecting
//! that needs a head anchored off this machine: the [Merkle tree](merkle) over the
//! records, whose signed checkpoints the notary publishes (MQTT, `checkpoints.log`,
//! `/checkpoint`, witnesses). `verify --checkpoint` holds the log against any of
//! them and names the first record that differs.
//!
//! # Readers and cursors
//!
//! [`Reader`] uses its own read-only connection; in WAL mode it runs alongside the
//! writer. Because `seq` is assigned by the single writer in commit order, a reader
//! paging with `seq > last_seen` can never miss a record that commits later with a
//! smaller `seq`. [`Cursors`] live in their own table, written through a separate small
//! connection (never through the append queue) and are not part of the chain; the
//! cursors of alarm-event consumers (`alarm_events` ids, not seqs) have a table of
//! their own, `event_cursors`. Every consumer follows the log through one
//! [`Follower`] (cursor, wake-up, cursor writes, crash-loop guard, dead letters).
//!
//! WAL checkpoints run on a background connection every 250 ms (PASSIVE, concurrent
//! with the writer) instead of inside an append's commit, so copying the WAL into the
//! database file does not land on an ack's latency; the writer's own auto-checkpoint
//! is kept only as a backstop at 64 MiB of WAL. On exit the writer runs a TRUNCATE
//! checkpoint.
//!
//! Durability: [`SyncMode::Full`] (default) `fsync`s the WAL on every commit, so an ack
//! survives power loss. [`SyncMode::Normal`] survives a process crash but may lose the
//! last commits on power loss. [`SyncMode::Off`] is for tests and benchmarks only.

mod alarms;
pub mod archive;
mod audit;
pub mod backup;
mod chain;
mod check;
mod dead_letters;
mod error;
mod exchanges;
mod export;
mod feed;
pub mod follower;
pub mod merkle;
mod reader;
mod schema;
mod verify;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

pub use alarms::{AlarmEventRow, AlarmFilter, AlarmRow, AlarmStore};
pub use audit::{DeviceStats, InboundFrame, device_stats, scan_inbound_frames};
pub use chain::ChainHead;
pub use dead_letters::{
    DeadLetter, DeadLetterFilter, DeadLetterRow, NOT_REDRIVABLE, REASONS as DEAD_LETTER_REASONS,
    STATES as DEAD_LETTER_STATES, StartCheck, list_dead_letters, mark_redrive,
};
pub use error::StoreError;
pub use exchanges::{
    ExchangeFilter, ExchangeOutcome, ExchangeRow, NewExchange, OUTCOMES, list_exchanges,
};
pub use export::{ExportDirection, ExportFormat, ExportOptions, export, export_record_json};
pub use feed::{Feed, FeedReader};
pub use follower::{Consumer, Exec, Follower, Plan};
pub use reader::{Cursors, Reader, RecordFilter, Records};
/// A log file as an earlier release left it (tests of migrations elsewhere in the crate).
#[cfg(test)]
pub(crate) use schema::file_at_version;
pub use verify::{BreakReason, ChainBreak, ChainReport, verify_chain};
pub use writer::{Store, StoreHandle, StoreStats, WriterJoin};

/// Whether a record was received from a peer or sent to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes received from a device (or an upstream).
    In,
    /// Bytes the gateway sent (replies, forwarded frames).
    Out,
}

impl Direction {
    /// The text stored in the `direction` column: `"in"` or `"out"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }

    /// Parses the stored text form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "in" => Some(Direction::In),
            "out" => Some(Direction::Out),
            _ => None,
        }
    }
}

/// The protocol layer's judgement of an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// A well-formed frame that was accepted.
    Accepted,
    /// A frame that was recognised but rejected (bad CRC, bad field, ...).
    Rejected,
    /// Bytes that are not a frame at all.
    Junk,
}

impl Verdict {
    /// The text stored in the `verdict` column: `"accepted"`, `"rejected"` or `"junk"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Rejected => "rejected",
            Verdict::Junk => "junk",
        }
    }

    /// Parses the stored text form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "accepted" => Some(Verdict::Accepted),
            "rejected" => Some(Verdict::Rejected),
            "junk" => Some(Verdict::Junk),
            _ => None,
        }
    }
}

/// What the codec cut out of the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A delimited frame (`##` ... CR LF), valid or not.
    Frame,
    /// Bytes between frames that could not be framed.
    Junk,
}

impl Kind {
    /// The text stored in the `kind` column: `"frame"` or `"junk"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Frame => "frame",
            Kind::Junk => "junk",
        }
    }

    /// Parses the stored text form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "frame" => Some(Kind::Frame),
            "junk" => Some(Kind::Junk),
            _ => None,
        }
    }
}

/// One item to append. Everything here is decided by the caller (the session); the
/// store adds `seq`, `duplicate` and `hash`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    /// Reception time, UTC unix milliseconds.
    pub received_at_ms: i64,
    /// `"1.2.3.4:5678"` or an upstream's name.
    pub peer: String,
    /// Session (connection) number assigned by the server.
    pub session: u64,
    /// Received or sent.
    pub direction: Direction,
    /// Frame or junk.
    pub kind: Kind,
    /// The exact wire bytes; never modified. Must not be empty.
    pub raw: bytes::Bytes,
    /// Protocol dialect: `"2005"`, `"2017"`, `"2025"`, ...
    pub dialect: Option<String>,
    /// `ST` (system code).
    pub st: Option<String>,
    /// `CN` (command code).
    pub cn: Option<String>,
    /// `MN` (device identifier).
    pub mn: Option<String>,
    /// `QN` (request number).
    pub qn: Option<String>,
    /// Data time, RFC 3339 with the device's offset, as decided by the protocol layer.
    pub data_time: Option<String>,
    /// The protocol layer's verdict.
    pub verdict: Verdict,
    /// JSON array text of `{code, severity, detail}` objects.
    pub findings: String,
    /// The decoded frame as JSON object text (without `raw`/`raw_b64`); for junk,
    /// the junk description. May be empty when `doc_stored` is false (ingest
    /// leaves out the document of what we send).
    pub doc: String,
    /// Whether the log stores `doc`. False for an accepted frame whose document
    /// the protocol layer rebuilds from `raw`, `data_time` and `findings`
    /// (`protocol::json::rebuild_frame_doc`): the log then holds an empty `doc`
    /// (and hashes that), while the commit feed still hands consumers this one.
    pub doc_stored: bool,
}

/// A junk record holding `raw`, for unit tests that only need records in a log.
#[cfg(test)]
pub(crate) fn junk_record(raw: impl Into<bytes::Bytes>) -> NewRecord {
    NewRecord {
        received_at_ms: 0,
        peer: "p".into(),
        session: 1,
        direction: Direction::In,
        kind: Kind::Junk,
        raw: raw.into(),
        dialect: None,
        st: None,
        cn: None,
        mn: None,
        qn: None,
        data_time: None,
        verdict: Verdict::Junk,
        findings: "[]".into(),
        doc: String::new(),
        doc_stored: true,
    }
}

/// The store's answer to an append, given after the record has committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The record's position in the log (1-based, dense).
    pub seq: u64,
    /// True when this is an inbound frame retransmitting an earlier `(mn, qn, cn)`.
    pub duplicate: bool,
}

/// A record as stored in the log. Two are equal when every column is and their
/// documents ([`StoredRecord::document`]) are: a record from the commit feed
/// equals the same record read from the file, whichever of them carries its
/// document as text.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    /// Position in the log (1-based, dense).
    pub seq: u64,
    /// Reception time, UTC unix milliseconds.
    pub received_at_ms: i64,
    /// Peer address or upstream name.
    pub peer: String,
    /// Session number.
    pub session: u64,
    /// Received or sent.
    pub direction: Direction,
    /// Frame or junk.
    pub kind: Kind,
    /// The exact wire bytes.
    pub raw: Vec<u8>,
    /// Protocol dialect.
    pub dialect: Option<String>,
    /// `ST`.
    pub st: Option<String>,
    /// `CN`.
    pub cn: Option<String>,
    /// `MN`.
    pub mn: Option<String>,
    /// `QN`.
    pub qn: Option<String>,
    /// Data time (RFC 3339).
    pub data_time: Option<String>,
    /// The protocol layer's verdict.
    pub verdict: Verdict,
    /// Retransmission of an earlier inbound `(mn, qn, cn)`.
    pub duplicate: bool,
    /// Findings JSON array text.
    pub findings: String,
    /// The `doc` column's text, or for a frame the log keeps without its document
    /// (`doc_stored` false) either the session's document (a record from the
    /// commit feed) or nothing: read the document with [`StoredRecord::document`].
    pub(crate) doc: String,
    /// Whether the log's `doc` column holds the document. False when the column
    /// is empty and the document is rebuilt from `raw`, `data_time` and
    /// `findings` when asked for (or was handed over by the session through the
    /// commit feed): the chain and the Merkle leaf hash the empty column, never
    /// the rebuilt text.
    pub doc_stored: bool,
    /// Chain hash of this record (see the module documentation).
    pub hash: [u8; 32],
}

impl PartialEq for StoredRecord {
    fn eq(&self, o: &StoredRecord) -> bool {
        self.columns() == o.columns() && self.document() == o.document()
    }
}

/// A record's values other than its document, for comparing (see [`StoredRecord`]).
type Columns<'a> = (
    (
        &'a u64,
        &'a i64,
        &'a String,
        &'a u64,
        &'a Direction,
        &'a Kind,
    ),
    (
        &'a Vec<u8>,
        [&'a Option<String>; 6],
        &'a Verdict,
        &'a bool,
        &'a String,
    ),
    (&'a bool, &'a [u8; 32]),
);

impl StoredRecord {
    fn columns(&self) -> Columns<'_> {
        // Destructured so that a new field cannot be left out of the comparison.
        let StoredRecord {
            seq,
            received_at_ms,
            peer,
            session,
            direction,
            kind,
            raw,
            dialect,
            st,
            cn,
            mn,
            qn,
            data_time,
            verdict,
            duplicate,
            findings,
            doc: _,
            doc_stored,
            hash,
        } = self;
        (
            (seq, received_at_ms, peer, session, direction, kind),
            (
                raw,
                [dialect, st, cn, mn, qn, data_time],
                verdict,
                duplicate,
                findings,
            ),
            (doc_stored, hash),
        )
    }
}

impl StoredRecord {
    /// `rec` as the log holds it once appended as `a` with chain hash `hash` (what
    /// the commit feed carries). Moves the strings, copies `raw`.
    pub fn committed(rec: NewRecord, a: Appended, hash: [u8; 32]) -> StoredRecord {
        StoredRecord {
            seq: a.seq,
            received_at_ms: rec.received_at_ms,
            peer: rec.peer,
            session: rec.session,
            direction: rec.direction,
            kind: rec.kind,
            raw: rec.raw.to_vec(),
            dialect: rec.dialect,
            st: rec.st,
            cn: rec.cn,
            mn: rec.mn,
            qn: rec.qn,
            data_time: rec.data_time,
            verdict: rec.verdict,
            duplicate: a.duplicate,
            findings: rec.findings,
            doc: rec.doc,
            doc_stored: rec.doc_stored,
            hash,
        }
    }

    /// Sets `doc_stored` from the `doc` column just read. Every row decoder runs
    /// this; the document of a frame kept without one is rebuilt only when a
    /// consumer asks for it ([`StoredRecord::document`]): most consumers skip most
    /// records (our replies, other kinds) and would rebuild them for nothing.
    pub(crate) fn read_doc_column(&mut self) {
        self.doc_stored = !self.doc.is_empty() || self.kind != Kind::Frame;
    }

    /// The decoded frame document (`hj212.frame.v1` JSON object text; for junk,
    /// the junk description or nothing), the same whether the record came from
    /// the commit feed or from the file. For a frame the log keeps without its
    /// document and that did not come through the feed, it is rebuilt from the
    /// raw bytes here, at each call: callers take it once per record.
    pub fn document(&self) -> std::borrow::Cow<'_, str> {
        if !self.document_rebuilt() {
            std::borrow::Cow::Borrowed(&self.doc)
        } else {
            std::borrow::Cow::Owned(crate::protocol::json::rebuild_frame_doc(
                &self.raw,
                self.data_time.as_deref(),
                &self.findings,
            ))
        }
    }

    /// The record as the log's reader hands it back: a frame the log keeps
    /// without its document comes without it (its document is rebuilt on
    /// demand). For benches and tests of the consumers' read-back path.
    #[doc(hidden)]
    pub fn as_read_back(mut self) -> StoredRecord {
        if !self.doc_stored {
            self.doc.clear();
        }
        self
    }

    /// Whether [`StoredRecord::document`] rebuilds the document from the raw
    /// bytes (a frame kept without it, read from the file).
    pub fn document_rebuilt(&self) -> bool {
        !self.doc_stored && self.doc.is_empty()
    }

    /// Whether the record has a document: false only for one stored with an empty
    /// `doc` column that is not a frame's (a frame kept without its document has
    /// one, rebuilt). Answers without rebuilding it.
    pub fn has_document(&self) -> bool {
        !(self.doc_stored && self.doc.is_empty())
    }

    /// What the log's `doc` column holds: the document, or empty for a frame kept
    /// without it.
    pub fn stored_doc(&self) -> &str {
        if self.doc_stored { &self.doc } else { "" }
    }

    /// Whether [`StoredRecord::document`] is text this process wrote throughout
    /// (`protocol::json`), hence a valid JSON object with the `hj212.frame.v1`
    /// keys and no others at its top level: the session's own document, or one
    /// rebuilt from the raw bytes with a findings column the rebuild rewrites.
    /// A stored `doc` column, or a findings column that is not an array of
    /// findings (which the rebuild splices in as it is), is text from the file,
    /// which may have been altered, and is not.
    pub fn document_is_ours(&self) -> bool {
        !self.doc_stored
            && (!self.doc.is_empty() || crate::protocol::json::findings_rewritten(&self.findings))
    }
}

/// SQLite `synchronous` setting for the write connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// `fsync` the WAL at every commit: an ack survives power loss (default).
    #[default]
    Full,
    /// `fsync` only at checkpoints: an ack survives a process crash, not power loss.
    Normal,
    /// Never `fsync`. Tests and benchmarks only.
    Off,
}

impl SyncMode {
    pub(crate) fn pragma_value(self) -> &'static str {
        match self {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
            SyncMode::Off => "OFF",
        }
    }
}

/// Default of [`StoreConfig::check_tail`] (and `[store] check_tail`).
pub const DEFAULT_CHECK_TAIL: usize = 1000;

/// How long a consumer waits before trying again to open the log. A store that
/// cannot be opened at start (a full disk refuses the start marker, a file not
/// there yet) must not leave the consumer off until the gateway restarts.
pub const OPEN_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Configuration of [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The SQLite file; its directory is created if missing.
    pub path: PathBuf,
    /// Durability of each commit.
    pub sync: SyncMode,
    /// Records per transaction: the writer stops taking queue entries once this many
    /// are gathered. An `append_many` is never split, so a batch can exceed it by the
    /// size of the last entry taken. Default 512.
    pub batch_max: usize,
    /// Longest time the writer lingers to fill a batch when there is load (not when
    /// a quarter of `batch_max` is already queued). Default 2 ms.
    pub batch_delay: Duration,
    /// Capacity of the bounded append queue, in append calls. Default 8192.
    pub queue: usize,
    /// Committed records kept in memory for consumers ([`Feed`]); 0 keeps none.
    /// Default 8192.
    pub feed_records: usize,
    /// Nice steps the writer thread runs above the rest of the process (see
    /// [`crate::priority`]); 0 leaves it alone. Default 0 here (library users and
    /// tests); the daemon passes `[store] writer_boost`.
    pub writer_boost: u8,
    /// Records (and entries of each index on them) read from the end of an existing
    /// log by the start-up check (see the `check` module). Default 1000.
    pub check_tail: usize,
    /// Where the writer and the commit feed count (commit latency, batch sizes,
    /// duplicates, feed hits and misses). Default: a registry of its own, which
    /// nobody scrapes (library users and tests); the daemon passes the gateway's.
    pub metrics: Arc<Metrics>,
}

impl StoreConfig {
    /// The defaults for a store at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            path: path.into(),
            ..StoreConfig::default()
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("data/frames.sqlite"),
            sync: SyncMode::Full,
            batch_max: 512,
            batch_delay: Duration::from_millis(2),
            queue: 8192,
            feed_records: 8192,
            writer_boost: 0,
            check_tail: DEFAULT_CHECK_TAIL,
            metrics: Arc::default(),
        }
    }
}
