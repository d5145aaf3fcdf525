//! Ingest: what the items cut from one device connection become, without
//! sockets, clocks or tasks. Bytes in (as [`Item`]s), `now` in; records to
//! append, replies to write after the commit, downlink steps and automatic
//! requests out ([`Batch`]).
//!
//! The session task reads, calls [`ingest`], appends the batch's records,
//! waits for the commit and only then writes the replies: a device never holds
//! an ack for a frame a crash could lose. Because the core does no I/O, the
//! whole per-frame policy (decode, registry policy, junk coalescing, MN
//! conflicts, acks, downlink matching, automatic requests) is tested here on
//! real fixture bytes, and the fuzz target (`fuzzing::ingest`) runs the same
//! function over arbitrary chunk sequences.
//!
//! What the core cannot know by itself comes in through [`Hooks`]: which live
//! session holds an MN, and where counting and logging go. The session
//! implements them over the shared [`crate::app::SessionMap`] and the metrics.
//!
//! Also here: the gateway's policy on top of the protocol ([`apply_policy`],
//! [`decode_options`], its own [`FindingCode`]s), the log record of a frame
//! ([`frame_record`], used by sessions, `replay` and the upstream forwarders),
//! and why sessions end ([`CloseReason`]).

use std::time::Instant;

use bytes::Bytes;

use crate::codec::Item;
use crate::config::{Config, UnknownDevice};
use crate::downlink::auto::{self, Auto};
use crate::downlink::config::DownlinkSection;
use crate::downlink::engine::{Engine, Out};
use crate::downlink::{self as dl, Devices};
use crate::protocol::{self, Finding, Frame, Options, Severity, json, reply};
use crate::registry::Registry;
use crate::store::{Direction, Kind, NewRecord, Verdict};

pub mod crc_hint;
pub mod junk;
pub mod owner;

pub use crate::vocab::{CloseReason, FindingCode};
pub use crc_hint::CrcHint;
pub use junk::{JUNK_DOC_MAX, JUNK_PIECES_LISTED, JunkCoalescer, JunkRun, RunEnd};

/// The decoder options a session uses for frames received at `now`: the config's
/// time zone, timestamp tolerances, CRC policy and segment limit.
pub fn decode_options(cfg: &Config, now: chrono::DateTime<chrono::Utc>) -> Options {
    let mut opts = Options::new(now);
    opts.tz = cfg.time_zone().unwrap_or_else(protocol::time::beijing);
    opts.future_tolerance_s = cfg.validation.future_tolerance.0.as_secs() as i64;
    opts.stale_after_s = cfg.validation.stale_after.0.as_secs() as i64;
    opts.crc = cfg.validation.crc;
    opts.max_segment = cfg.validation.max_segment;
    opts
}

/// Gateway policy on top of protocol findings: registry, password, unknown devices.
///
/// Public so that `replay` judges captured frames exactly as a session does.
pub fn apply_policy(frame: &mut Frame, registry: &Registry, unknown: UnknownDevice) {
    let Some(mn) = frame.mn().map(str::to_owned) else {
        return;
    };
    match registry.get(&mn) {
        Some(dev) => {
            if let Some(pw) = &dev.pw {
                if frame.pw() != Some(pw.as_str()) {
                    frame.findings.push(Finding::new(
                        FindingCode::AuthPassword.as_str(),
                        Severity::Error,
                        "PW does not match the registry",
                    ));
                }
            }
        }
        None => match unknown {
            UnknownDevice::Accept => {}
            UnknownDevice::Reject => frame.findings.push(Finding::new(
                FindingCode::DeviceUnknown.as_str(),
                Severity::Error,
                "MN is not registered (unknown_device = reject)",
            )),
            UnknownDevice::Quarantine => frame.findings.push(Finding::new(
                FindingCode::DeviceQuarantined.as_str(),
                Severity::Warning,
                "MN is not registered (unknown_device = quarantine): stored and acked, not forwarded",
            )),
        },
    }
}

fn findings_json(f: &[Finding]) -> String {
    serde_json::to_string(f).unwrap_or_else(|_| "[]".into())
}

/// The log record of a decoded frame: the exact bytes, the header fields the
/// log indexes, the verdict, the findings and the frame JSON document. Used by
/// sessions and by the upstream forwarders for what they relay.
pub fn frame_record(
    f: &Frame,
    peer: &str,
    session: u64,
    direction: Direction,
    received_at_ms: i64,
    accepted: bool,
) -> NewRecord {
    let findings = findings_json(&f.findings);
    // Only accepted frames: a rejected one is rare, and audits read its stored
    // document with SQL (the CRC variant of a rejection).
    let doc_stored = !(accepted && json::doc_rebuildable(f));
    // What we send is read by no consumer on the hot path (the detector and the
    // publisher take inbound frames only): it goes without a document, and
    // `StoredRecord::document` rebuilds one for `export` and `tail`.
    let (doc, data_time) = if !doc_stored && direction == Direction::Out {
        (String::new(), json::data_time_text(f))
    } else {
        json::frame_doc_and_time(f)
    };
    debug_assert!(
        doc_stored
            || doc.is_empty()
            || json::rebuild_frame_doc(&f.raw, data_time.as_deref(), &findings) == doc,
        "the document of {:?} cannot be rebuilt from what the log keeps",
        String::from_utf8_lossy(&f.raw)
    );
    NewRecord {
        received_at_ms,
        peer: peer.to_owned(),
        session,
        direction,
        kind: Kind::Frame,
        raw: f.raw.clone(),
        dialect: f.dialect.map(|d| d.as_str().to_owned()),
        st: f.st().map(str::to_owned),
        cn: f.cn().map(str::to_owned),
        mn: f.mn().map(str::to_owned),
        qn: f.qn().map(str::to_owned),
        data_time,
        verdict: if accepted {
            Verdict::Accepted
        } else {
            Verdict::Rejected
        },
        findings,
        doc,
        doc_stored,
    }
}

/// The rules one batch is judged by, and who the connection is.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// Decoder options from the config; [`ingest`] sets their `now`.
    pub opts: &'a Options,
    /// `[validation] unknown_device`.
    pub unknown: UnknownDevice,
    /// `[server] junk_record_bytes`: where a junk run is cut into a record.
    pub junk_cap: usize,
    /// `[server] max_junk_bytes`: junk beyond it closes the connection.
    pub max_junk_bytes: usize,
    /// The `[downlink]` section (automatic requests).
    pub downlink: &'a DownlinkSection,
    /// Per-MN downlink state the automatic requests read and update.
    pub devices: &'a Devices,
    /// The device's address as the log records it (the PROXY header's
    /// source behind a balancer).
    pub peer: &'a str,
    /// Session id.
    pub session: u64,
    /// The MNs this session holds, its device first.
    pub mns: &'a [String],
}

impl<'a> Policy<'a> {
    /// The policy of `cfg` for session `session` from `peer` holding `mns`.
    pub fn new(
        cfg: &'a Config,
        opts: &'a Options,
        devices: &'a Devices,
        peer: &'a str,
        session: u64,
        mns: &'a [String],
    ) -> Policy<'a> {
        Policy {
            opts,
            unknown: cfg.validation.unknown_device,
            junk_cap: cfg.server.junk_record_bytes,
            max_junk_bytes: cfg.server.max_junk_bytes,
            downlink: &cfg.downlink,
            devices,
            peer,
            session,
            mns,
        }
    }
}

/// What the core keeps per connection between batches.
#[derive(Debug, Default)]
pub struct Conn {
    /// Consecutive junk items not yet stored (one record per run).
    pub junk: JunkCoalescer,
    /// Junk bytes received so far.
    pub junk_bytes: usize,
    /// Frames received so far.
    pub frames: u64,
}

/// When a batch was read.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Wall clock: record times, timestamp checks, automatic requests.
    pub wall: chrono::DateTime<chrono::Utc>,
    /// Monotonic clock: the downlink exchange's timers.
    pub mono: Instant,
}

impl Now {
    /// The clocks as they read now (for the session, not for the core).
    pub fn read() -> Now {
        Now {
            wall: chrono::Utc::now(),
            mono: Instant::now(),
        }
    }
}

/// One batch of input.
#[derive(Debug, Default)]
pub struct Input {
    /// Items cut from the stream, in order.
    pub items: Vec<Item>,
    /// The connection is over: a junk run still open becomes a record too.
    pub end: bool,
    /// Replies can be written (false once the write side is closed: frames
    /// are then stored but not acked, and the device retransmits).
    pub ack: bool,
}

/// An MN the session takes after the commit (see `SessionMap::claim`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MnClaim {
    /// The MN.
    pub mn: String,
    /// Announce it online (quarantined devices are never published).
    pub announce: bool,
}

/// What a batch asks the session to do, in this order: append `records`;
/// after the commit deliver `downlink`, take `claims`, write `replies`; after
/// the write queue `autos`; then close if `close` says so.
#[derive(Debug)]
pub struct Batch<T> {
    /// Log records, in stream order (each frame's ack right after it).
    pub records: Vec<NewRecord>,
    /// Reply bytes (acks), written in one write after the commit.
    pub replies: Vec<Bytes>,
    /// MNs first seen on this connection in accepted frames.
    pub claims: Vec<MnClaim>,
    /// Steps of the downlink exchange in progress for its requesters.
    pub downlink: Vec<Out<T>>,
    /// Automatic requests, queued once the replies went out.
    pub autos: Vec<Auto>,
    /// The connection must close after this batch.
    pub close: Option<CloseReason>,
}

/// What the core asks of, and tells, the world around it. The session
/// implements it over the shared session map, the metrics and its log; tests
/// and the fuzzer with plain maps.
pub trait Hooks {
    /// The peer of the live session from another address that holds `mn`
    /// against this session at `now_ms` (the upload is then flagged
    /// `session.conflict`), if any. Called for accepted frames whose MN the
    /// session does not hold.
    fn conflicting(&mut self, frame: &Frame, mn: &str, now_ms: i64) -> Option<String>;
    /// A junk item of `len` bytes arrived.
    fn junk(&mut self, _len: usize) {}
    /// A junk run became a record.
    fn junk_record(&mut self, _rec: &NewRecord, _end: RunEnd) {}
    /// A frame was judged (findings complete as counted; accepted = no error).
    fn frame(&mut self, _frame: &Frame, _accepted: bool) {}
    /// An accepted frame, with the MN the session speaks for (held, or
    /// claimed earlier in this batch).
    /// `now_ms` is the batch's read time.
    fn accepted(&mut self, _frame: &Frame, _primary: Option<&str>, _now_ms: i64) {}
    /// A frame called for an automatic request.
    fn auto(&mut self, _frame: &Frame, _auto: &Auto) {}
}

/// Turns one batch of items read at `now` into what the session must do.
///
/// Items become junk records (runs of consecutive junk, see [`junk`]) and
/// frames in stream order. Each frame is decoded with `policy.opts` at `now`,
/// judged by [`apply_policy`], flagged when a live session elsewhere holds its
/// MN, and, when accepted, acked (if `input.ack`), matched against the
/// downlink exchange in progress (`engine`) or else checked for automatic
/// requests. Its record and its ack's record go to the batch.
pub fn ingest<T: Clone, H: Hooks>(
    conn: &mut Conn,
    input: Input,
    now: Now,
    registry: &Registry,
    policy: &Policy<'_>,
    mut engine: Option<&mut Engine<T>>,
    hooks: &mut H,
) -> Batch<T> {
    let mut opts = policy.opts.clone();
    opts.now = now.wall;
    let received_at_ms = now.wall.timestamp_millis();
    let (peer, session) = (policy.peer, policy.session);
    // Room for each frame's ack record (junk runs are few).
    let mut b = Batch {
        records: Vec::with_capacity(input.items.len() * 2),
        replies: Vec::new(),
        claims: Vec::new(),
        downlink: Vec::new(),
        autos: Vec::new(),
        close: None,
    };
    for item in input.items {
        let bytes = match item {
            Item::Junk { bytes, reason } => {
                conn.junk_bytes += bytes.len();
                hooks.junk(bytes.len());
                if let Some(run) = conn
                    .junk
                    .push(bytes, reason, received_at_ms, policy.junk_cap)
                {
                    junk_record(&mut b, hooks, run.record(peer, session), RunEnd::Cap);
                }
                continue;
            }
            Item::Frame { bytes, .. } => bytes,
        };
        // A frame ends the junk run first, so records stay in stream order.
        if let Some(run) = conn.junk.take() {
            junk_record(&mut b, hooks, run.record(peer, session), RunEnd::Frame);
        }
        let mut frame = protocol::decode(bytes, &opts, registry);
        apply_policy(&mut frame, registry, policy.unknown);
        conn.frames += 1;
        let accepted = !frame.has_error();
        // An upload for an MN that a live session from another address
        // holds: stored and acked, flagged, never given the MN.
        let conflict = match frame.mn() {
            Some(mn) if accepted && !policy.mns.iter().any(|m| m == mn) => {
                hooks.conflicting(&frame, mn, received_at_ms)
            }
            _ => None,
        };
        if let Some(holder) = &conflict {
            frame.findings.push(owner::conflict_finding(holder));
        }
        hooks.frame(&frame, accepted);
        if accepted && conflict.is_none() {
            if let Some(mn) = frame.mn() {
                if !policy.mns.iter().any(|m| m == mn) && !b.claims.iter().any(|c| c.mn == mn) {
                    let announce = !FindingCode::DeviceQuarantined.is_on(&frame);
                    b.claims.push(MnClaim {
                        mn: mn.to_owned(),
                        announce,
                    });
                }
            }
        }
        let ack = if accepted && input.ack {
            reply::ack_frame(&frame, &opts)
        } else {
            None
        };
        if accepted {
            let matched = engine
                .as_deref_mut()
                .and_then(|e| e.on_frame(&frame, now.mono, &mut b.downlink));
            match matched {
                Some(m) if m.history => frame.findings.push(Finding::new(
                    dl::FINDING_BACKFILL,
                    Severity::Info,
                    format!("answers the {} request QN={}", m.origin, m.qn),
                )),
                Some(_) => {}
                // The downlink belongs to the MN's holder.
                None if conflict.is_some() => {}
                // Only for devices this session speaks for (quarantined ones
                // are not claimed).
                None if FindingCode::DeviceQuarantined.is_on(&frame) => {}
                None => {
                    let first = b.autos.len();
                    auto::auto_requests(
                        &frame,
                        registry,
                        policy.downlink,
                        policy.devices,
                        received_at_ms,
                        &mut b.autos,
                    );
                    for a in &b.autos[first..] {
                        hooks.auto(&frame, a);
                    }
                }
            }
            let primary = policy
                .mns
                .first()
                .or(b.claims.first().map(|c| &c.mn))
                .map(String::as_str);
            hooks.accepted(&frame, primary, received_at_ms);
        }
        b.records.push(frame_record(
            &frame,
            peer,
            session,
            Direction::In,
            received_at_ms,
            accepted,
        ));
        if let Some(ack) = ack {
            b.records.push(frame_record(
                &ack,
                peer,
                session,
                Direction::Out,
                received_at_ms,
                true,
            ));
            b.replies.push(ack.raw);
        }
    }
    if input.end {
        if let Some(run) = conn.junk.take() {
            junk_record(&mut b, hooks, run.record(peer, session), RunEnd::Close);
        }
    }
    if conn.junk_bytes > policy.max_junk_bytes {
        b.close = Some(CloseReason::JunkLimit);
    }
    b
}

fn junk_record<T, H: Hooks>(b: &mut Batch<T>, hooks: &mut H, rec: NewRecord, end: RunEnd) {
    hooks.junk_record(&rec, end);
    b.records.push(rec);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Hj212Codec;
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    /// The first frame of the corpus (HJ 212-2017 §6.3.2), Flag=5: asks for an ack.
    const STD_001: &[u8] = b"##0101QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;CP=&&RtdInterval=30&&1C80\r\n";
    const MN: &str = "010000A8900016F000169DC0";
    const PEER: &str = "10.0.0.1:5000";
    const NOW_MS: i64 = 1_700_000_000_123;

    /// Hooks of a session alone on the network, or one whose MNs are all
    /// held by `holder`; they record what the core told them.
    #[derive(Default)]
    struct Seen {
        holder: Option<String>,
        junk: usize,
        runs: Vec<RunEnd>,
        frames: Vec<bool>,
        accepted: Vec<Option<String>>,
    }

    impl Hooks for Seen {
        fn conflicting(&mut self, _: &Frame, _: &str, _: i64) -> Option<String> {
            self.holder.clone()
        }
        fn junk(&mut self, len: usize) {
            self.junk += len;
        }
        fn junk_record(&mut self, _: &NewRecord, end: RunEnd) {
            self.runs.push(end);
        }
        fn frame(&mut self, _: &Frame, accepted: bool) {
            self.frames.push(accepted);
        }
        fn accepted(&mut self, _: &Frame, primary: Option<&str>, _: i64) {
            self.accepted.push(primary.map(str::to_owned));
        }
    }

    fn config(extra: &str) -> Config {
        Config::parse(extra, std::path::Path::new("test")).expect("config")
    }

    /// Decoder options that take the 2016 corpus as current.
    fn opts(cfg: &Config) -> Options {
        let mut o = decode_options(cfg, chrono::Utc::now());
        o.stale_after_s = i64::MAX / 4;
        o.future_tolerance_s = i64::MAX / 4;
        o
    }

    fn items(bytes: &[u8]) -> Vec<Item> {
        let mut buf = BytesMut::from(bytes);
        let mut codec = Hj212Codec::default();
        let mut out = Vec::new();
        while let Some(i) = codec.decode_eof(&mut buf).unwrap() {
            out.push(i);
        }
        out
    }

    /// One batch through the core, as session 7 from [`PEER`] holding `mns`.
    fn run(
        cfg: &Config,
        conn: &mut Conn,
        input: Input,
        mns: &[String],
        hooks: &mut Seen,
    ) -> Batch<()> {
        let o = opts(cfg);
        let devices = Devices::new(None, 16);
        let registry = crate::registry::Registry::from_config(cfg).expect("registry");
        let policy = Policy::new(cfg, &o, &devices, PEER, 7, mns);
        let now = Now {
            wall: chrono::DateTime::from_timestamp_millis(NOW_MS).unwrap(),
            mono: Instant::now(),
        };
        ingest(conn, input, now, &registry, &policy, None, hooks)
    }

    fn input(bytes: &[u8], end: bool) -> Input {
        Input {
            items: items(bytes),
            end,
            ack: true,
        }
    }

    #[test]
    fn a_frame_is_stored_then_its_ack_which_is_the_reply() {
        let cfg = config("");
        let (mut conn, mut seen) = (Conn::default(), Seen::default());
        let b = run(&cfg, &mut conn, input(STD_001, false), &[], &mut seen);
        assert_eq!(b.records.len(), 2);
        let (frame, ack) = (&b.records[0], &b.records[1]);
        assert_eq!(frame.raw, STD_001);
        assert_eq!(
            (frame.direction, frame.kind, frame.verdict),
            (Direction::In, Kind::Frame, Verdict::Accepted)
        );
        assert_eq!(
            (frame.peer.as_str(), frame.session, frame.received_at_ms),
            (PEER, 7, NOW_MS)
        );
        assert_eq!(frame.mn.as_deref(), Some(MN));
        assert_eq!(frame.cn.as_deref(), Some("1062"));
        // The reply is the ack record's bytes, a 9014 for this QN.
        assert_eq!(b.replies, vec![ack.raw.clone()]);
        assert_eq!(
            (ack.direction, ack.verdict),
            (Direction::Out, Verdict::Accepted)
        );
        let want = reply::ack(&protocol::decode(
            Bytes::from_static(STD_001),
            &opts(&cfg),
            &(),
        ))
        .expect("Flag=5 asks for an ack");
        assert_eq!(ack.raw, want);
        let text = String::from_utf8_lossy(&ack.raw);
        assert!(text.starts_with("##") && text.ends_with("\r\n"), "{text}");
        assert!(
            text.contains("QN=20160801085857223;ST=91;CN=9014;"),
            "{text}"
        );
        assert_eq!(
            b.claims,
            vec![MnClaim {
                mn: MN.into(),
                announce: true
            }]
        );
        assert_eq!(seen.frames, vec![true]);
        assert_eq!(seen.accepted, vec![Some(MN.to_owned())]);
        assert_eq!((conn.frames, b.close), (1, None));
        // Held already: not claimed again.
        let b = run(
            &cfg,
            &mut conn,
            input(STD_001, false),
            &[MN.into()],
            &mut seen,
        );
        assert!(b.claims.is_empty());
        assert_eq!(b.replies.len(), 1);
    }

    #[test]
    fn without_a_writer_frames_are_stored_but_not_acked() {
        let cfg = config("");
        let mut i = input(STD_001, false);
        i.ack = false;
        let b = run(&cfg, &mut Conn::default(), i, &[], &mut Seen::default());
        assert_eq!(b.records.len(), 1);
        assert!(b.replies.is_empty());
        assert_eq!(b.claims.len(), 1, "the MN is still taken");
    }

    #[test]
    fn junk_is_one_record_per_run_in_stream_order() {
        let cfg = config("");
        let (mut conn, mut seen) = (Conn::default(), Seen::default());
        let mut bytes = b"AT+OK\r\n#".to_vec();
        bytes.extend_from_slice(STD_001);
        bytes.extend_from_slice(b"NO CARRIER");
        // Without `end` the trailing run is held back for more junk.
        let b = run(&cfg, &mut conn, input(&bytes, false), &[], &mut seen);
        let raws: Vec<&[u8]> = b.records.iter().map(|r| &r.raw[..]).collect();
        assert_eq!(raws[0], b"AT+OK\r\n#");
        assert_eq!(b.records[0].verdict, Verdict::Junk);
        assert_eq!(raws[1], STD_001);
        assert_eq!(b.records.len(), 3, "junk, frame, ack");
        assert_eq!(seen.runs, vec![RunEnd::Frame]);
        assert_eq!(conn.junk.pending(), 10);
        // The connection ends: the held run is stored.
        let b = run(
            &cfg,
            &mut conn,
            Input {
                end: true,
                ..Input::default()
            },
            &[],
            &mut seen,
        );
        assert_eq!(b.records.len(), 1);
        assert_eq!(b.records[0].raw, b"NO CARRIER"[..]);
        assert_eq!(seen.runs, vec![RunEnd::Frame, RunEnd::Close]);
        assert_eq!(seen.junk, conn.junk_bytes);
        assert_eq!(conn.junk_bytes, 18);
    }

    #[test]
    fn junk_beyond_the_limit_closes_the_connection() {
        let cfg = config("[server]\nmax_junk_bytes = 4096\njunk_record_bytes = 1024\n");
        let (mut conn, mut seen) = (Conn::default(), Seen::default());
        let b = run(&cfg, &mut conn, input(&[b'x'; 4096], false), &[], &mut seen);
        assert_eq!(b.close, None, "at the limit");
        assert!(b.records.iter().all(|r| r.verdict == Verdict::Junk));
        let b = run(&cfg, &mut conn, input(b"y", false), &[], &mut seen);
        assert_eq!(b.close, Some(CloseReason::JunkLimit));
    }

    #[test]
    fn an_upload_for_an_mn_held_elsewhere_is_acked_and_flagged_not_claimed() {
        let cfg = config("");
        let mut seen = Seen {
            holder: Some("10.0.0.2:7000".into()),
            ..Seen::default()
        };
        let b = run(
            &cfg,
            &mut Conn::default(),
            input(STD_001, false),
            &[],
            &mut seen,
        );
        assert!(b.claims.is_empty());
        assert_eq!(b.replies.len(), 1, "stored and acked");
        assert!(b.records[0].findings.contains("session.conflict"));
        assert!(b.records[0].findings.contains("10.0.0.2:7000"));
        assert_eq!(b.records[0].verdict, Verdict::Accepted);
    }

    #[test]
    fn unknown_devices_follow_the_policy() {
        let (registered, quarantine, reject) = (
            config(&format!("[[device]]\nmn = \"{MN}\"\npw = \"100000\"\n")),
            config("[validation]\nunknown_device = \"quarantine\"\n"),
            config("[validation]\nunknown_device = \"reject\"\n"),
        );
        let b = run(
            &registered,
            &mut Conn::default(),
            input(STD_001, false),
            &[],
            &mut Seen::default(),
        );
        assert!(!b.records[0].findings.contains("device."));
        assert!(b.claims[0].announce);
        let b = run(
            &quarantine,
            &mut Conn::default(),
            input(STD_001, false),
            &[],
            &mut Seen::default(),
        );
        assert!(b.records[0].findings.contains("device.quarantined"));
        assert_eq!(b.replies.len(), 1, "stored and acked");
        assert!(!b.claims[0].announce, "never announced");
        let mut seen = Seen::default();
        let b = run(
            &reject,
            &mut Conn::default(),
            input(STD_001, false),
            &[],
            &mut seen,
        );
        assert!(b.records[0].findings.contains("device.unknown"));
        assert_eq!(b.records[0].verdict, Verdict::Rejected);
        assert!(b.replies.is_empty() && b.claims.is_empty());
        assert_eq!(seen.frames, vec![false]);
        let wrong_pw = config(&format!("[[device]]\nmn = \"{MN}\"\npw = \"654321\"\n"));
        let b = run(
            &wrong_pw,
            &mut Conn::default(),
            input(STD_001, false),
            &[],
            &mut Seen::default(),
        );
        assert!(b.records[0].findings.contains("auth.password"));
        assert!(b.replies.is_empty());
    }

    #[test]
    fn every_fixture_byte_is_stored_once_in_order() {
        let cfg = config("");
        let mut all = Vec::new();
        for f in crate::protocol::fixture_frames() {
            all.extend_from_slice(&f);
        }
        let (mut conn, mut seen) = (Conn::default(), Seen::default());
        let mut stored = Vec::new();
        let mut codec = Hj212Codec::default();
        let mut buf = BytesMut::new();
        // In uneven chunks, as a socket delivers them.
        for (n, chunk) in all.chunks(701).enumerate() {
            buf.extend_from_slice(chunk);
            let mut items = Vec::new();
            while let Some(i) = codec.decode(&mut buf).unwrap() {
                items.push(i);
            }
            let end = n == all.len().div_ceil(701) - 1;
            if end {
                while let Some(i) = codec.decode_eof(&mut buf).unwrap() {
                    items.push(i);
                }
            }
            let b = run(
                &cfg,
                &mut conn,
                Input {
                    items,
                    end,
                    ack: true,
                },
                &[],
                &mut seen,
            );
            for r in b.records.iter().filter(|r| r.direction == Direction::In) {
                stored.extend_from_slice(&r.raw);
            }
            let acks = b.records.iter().filter(|r| r.direction == Direction::Out);
            assert!(acks.map(|r| &r.raw).eq(b.replies.iter()));
        }
        assert!(stored == all, "stored bytes differ from received");
        assert!(conn.frames > 150);
    }

    #[test]
    fn gateway_codes_and_close_reasons_are_listed_in_order() {
        for w in FindingCode::ALL.windows(2) {
            assert!(w[0].as_str() < w[1].as_str());
        }
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    /// The ack record built directly must be the record of our ack bytes
    /// decoded, column for column, for every frame that gets an ack.
    fn assert_ack_record_identical(frame: &Frame, opts: &Options) -> Option<bool> {
        let direct = reply::ack_frame(frame, opts)?;
        let bytes = reply::ack(frame).expect("ack_frame implies ack");
        assert_eq!(direct.raw, bytes, "ack bytes");
        let decoded = protocol::decode(bytes, opts, &());
        let a = frame_record(
            &direct,
            "10.0.0.1:5000",
            7,
            Direction::Out,
            1_700_000_000_123,
            true,
        );
        let b = frame_record(
            &decoded,
            "10.0.0.1:5000",
            7,
            Direction::Out,
            1_700_000_000_123,
            true,
        );
        assert_eq!(a, b, "ack of {:?}", String::from_utf8_lossy(&frame.raw));
        // Acks leave ingest without a document; readers rebuild it from the bytes.
        assert!(a.doc.is_empty() && !a.doc_stored);
        assert_eq!(
            json::rebuild_frame_doc(&a.raw, a.data_time.as_deref(), &a.findings),
            json::frame_doc(&decoded),
            "ack of {:?}",
            String::from_utf8_lossy(&frame.raw)
        );
        Some(reply::ack_is_direct(frame, opts))
    }

    fn live_opts() -> Options {
        let mut opts = Options::new(chrono::Utc::now());
        opts.stale_after_s = i64::MAX / 4;
        opts.future_tolerance_s = i64::MAX / 4;
        opts
    }

    #[test]
    fn ack_records_match_the_decode_path_over_the_fixtures() {
        let opts = live_opts();
        let (mut acked, mut direct) = (0, 0);
        for raw in crate::protocol::fixture_frames() {
            let f = protocol::decode(Bytes::from(raw), &opts, &());
            let mut frames = vec![f.clone()];
            // The same frame asking for an ack (most fixtures do not).
            if let (Some(flag), None) = (f.header.flag, f.encryption) {
                let seg = &f.segment[..];
                let n: u8 = f.flag.unwrap_or(0) | 1;
                let mut s = seg[..flag.start()].to_vec();
                s.extend_from_slice(n.to_string().as_bytes());
                s.extend_from_slice(&seg[flag.end()..]);
                frames.push(protocol::decode(reply::envelope(&s), &opts, &()));
            }
            for f in frames {
                if let Some(d) = assert_ack_record_identical(&f, &opts) {
                    acked += 1;
                    direct += usize::from(d);
                }
            }
        }
        assert!(acked >= 150, "only {acked} fixture frames got an ack");
        // Most real headers take the direct path (174 of 197 today).
        assert!(direct * 10 >= acked * 8, "direct for {direct} of {acked}");
    }

    #[test]
    fn ack_records_match_the_decode_path_for_odd_fields() {
        let opts = live_opts();
        let qns = [
            Some("20240601085857223"),
            None,
            Some("123"),
            Some("2024060108585722X"),
            Some(""),
        ];
        let pws = [
            Some("123456"),
            None,
            Some("12345"),
            Some(""),
            Some("ab#d;f"),
        ];
        let mns = [
            Some("010000A8900016F000169DC0"),
            Some("88888880000001"),
            None,
            Some(""),
            Some("mn-lower-case"),
            Some("010000A8900016F000169DCX"),
        ];
        // (version bits, ack flag or none, CN): uploads, notifies, a 2005 notify
        // without Flag, a 2005 upload split into packets.
        let kinds: [(Option<&str>, &str, &str); 8] = [
            (Some("1"), "ST=32", "2011"),
            (Some("5"), "ST=32", "2011"),
            (Some("9"), "ST=22", "2061"),
            (Some("5"), "ST=32", "1013"),
            (Some("9"), "ST=31", "9015"),
            (None, "ST=32", "2072"),
            (Some("1"), "ST=32;PNUM=3;PNO=2", "2051"),
            (Some("13"), "ST=32", "2011"),
        ];
        let (mut n, mut direct) = (0, 0);
        for qn in qns {
            for pw in pws {
                for mn in mns {
                    for (flag, st, cn) in kinds {
                        let mut seg = String::new();
                        if let Some(q) = qn {
                            seg.push_str(&format!("QN={q};"));
                        }
                        seg.push_str(&format!("{st};CN={cn};"));
                        if let Some(p) = pw {
                            seg.push_str(&format!("PW={p};"));
                        }
                        if let Some(m) = mn {
                            seg.push_str(&format!("MN={m};"));
                        }
                        if let Some(f) = flag {
                            seg.push_str(&format!("Flag={f};"));
                        }
                        seg.push_str("CP=&&DataTime=20240601085857;a21026-Rtd=12.5&&");
                        let f = protocol::decode(reply::envelope(seg.as_bytes()), &opts, &());
                        if let Some(d) = assert_ack_record_identical(&f, &opts) {
                            n += 1;
                            direct += usize::from(d);
                        }
                    }
                }
            }
        }
        assert!(n > 1000 && direct > 80, "{n} acks, {direct} direct");
    }
}
