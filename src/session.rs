//! One device connection: bytes -> items -> verdicts -> one commit -> acks.
//!
//! Each read is cut into frames and junk; every item, and every reply we are
//! about to send, becomes a record; the batch is appended and only after its
//! transaction commits are the replies written to the socket. A device
//! therefore never holds an ack for a frame that a crash could lose. When
//! the store's queue is full, `append_many` waits and we stop reading: TCP
//! flow control pushes the backpressure to the device.
//!
//! Junk items are not stored one record each: consecutive junk of a session
//! is one record (see [`ingest`]), so a `#` flood cannot bloat the log.
//!
//! MN ownership ([`SessionMap`]): the session that sends an MN's first
//! accepted frame holds the MN and its downlink. A new session for it from
//! the same address supersedes the holder (a device reconnecting after a
//! network drop); from another address it may upload (stored, acked, finding
//! `session.conflict`, counted, a WARN per MN and minute) but the holder keeps
//! the MN until it closes or its device has been silent for `idle_timeout`.
//! A password match proves nothing (PW travels in clear text); the address is
//! the real client's (the PROXY header's source behind a balancer).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::downlink::engine::{Begin, Engine, Out, Timing};
use crate::downlink::inbox::{Inbox, Next};
use crate::downlink::{self as dl, Action, Event, Outcome, Refusal, Submit};

use crate::codec::{Hj212Codec, Item};
use crate::config::{Config, UnknownDevice};
use crate::protocol::framing::FramerConfig;
use crate::protocol::{self, Finding, Frame, Options, Severity, json, reply};
use crate::publish::presence::Presence;
use crate::registry::SharedRegistry;
use crate::store::{Direction, Kind, NewRecord, StoreHandle, Verdict};

pub mod ingest;

use ingest::{Claim, Ctx, Holder, JunkCoalescer, Step};

/// Emits a session event with the session's `peer`, `session` (id) and, once
/// known, `mn` as fields. There is no per-session span: a span lives as long as
/// its session, and the fmt layer keeps each span's formatted fields in the
/// registry, ~2.6 KB per idle connection. Explicit fields cost nothing until an
/// event is actually logged. `mn = ..` first overrides the session's MN (events
/// about another MN on the same connection, or before the session has one).
macro_rules! slog {
    ($level:ident, $s:expr, mn = $mn:expr, $($rest:tt)+) => {
        tracing::$level!(peer = %$s.peer_text, session = $s.id, mn = $mn, $($rest)+)
    };
    ($level:ident, $s:expr, $($rest:tt)+) => {
        tracing::$level!(
            peer = %$s.peer_text,
            session = $s.id,
            mn = $s.mns.first().map(String::as_str),
            $($rest)+
        )
    };
}

/// Finding codes added by gateway policy (beyond the protocol's).
pub mod code {
    /// PW does not match the registry.
    pub const AUTH_PASSWORD: &str = "auth.password";
    /// MN not in the registry and `unknown_device = "reject"`.
    pub const DEVICE_UNKNOWN: &str = "device.unknown";
    /// MN not in the registry and `unknown_device = "quarantine"`: stored and
    /// acked, never forwarded or published.
    pub const DEVICE_QUARANTINED: &str = "device.quarantined";
    /// The MN has a live session from another address: stored and acked, but
    /// that session keeps the MN (and its downlink).
    pub const SESSION_CONFLICT: &str = "session.conflict";
}

/// What [`SessionMap`] keeps per MN: the owning session and its
/// [`SessionInfo`] (with its downlink queue, which also carries supersession).
#[derive(Debug, Clone)]
struct Owner {
    id: u64,
    info: Arc<SessionInfo>,
}

/// A session as `sessions` lists it, kept current by the session.
#[derive(Debug)]
pub struct SessionInfo {
    /// Remote address.
    pub peer: String,
    /// Connected at (unix ms).
    pub since_ms: i64,
    /// The device's address (the PROXY header's source behind a balancer).
    ip: IpAddr,
    last_frame_ms: AtomicI64,
    header: Mutex<DeviceHeader>,
    /// When a conflict over this session's MN was last logged (unix ms), and
    /// how many were not logged since: one WARN per MN and minute.
    conflict_log: Mutex<(i64, u64)>,
    /// Requests for this session's devices (bounded by `[downlink] queue`),
    /// taken one at a time when the engine is idle, and the word that a newer
    /// session took the device over.
    inbox: Inbox,
}

/// What requests to the device echo from its own frames.
#[derive(Debug, Default, Clone)]
struct DeviceHeader {
    dialect: Option<protocol::Dialect>,
    st: String,
    pw: String,
}

/// One row of `sessions`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionEntry {
    /// Device MN.
    pub mn: String,
    /// Remote address.
    pub peer: String,
    /// Connected at (unix ms).
    pub since_ms: i64,
    /// Dialect of its last accepted frame (`None` before any).
    pub dialect: Option<&'static str>,
    /// Last accepted frame (unix ms; 0 before any).
    pub last_frame_ms: i64,
    /// Session id (the frame log's `session`).
    pub session: u64,
}

/// Which session currently owns each MN, so a reconnecting device supersedes
/// its stale session (and downlink traffic reaches the live one), while a
/// session from another address cannot take a live device over
/// ([`ingest::claim`]).
#[derive(Debug, Default)]
pub struct SessionMap {
    inner: Mutex<HashMap<String, Owner>>,
    /// Per-MN downlink state (QN clock, rate limits, series), kept across sessions.
    pub devices: crate::downlink::Devices,
}

/// What [`SessionMap::claim`] did.
#[derive(Debug)]
enum Claimed {
    /// The MN was free or already ours.
    Took,
    /// Taken from session `.0`, which is told to close.
    Superseded(u64),
    /// A live session from another address keeps it.
    Conflict(Arc<SessionInfo>),
}

impl Owner {
    fn holder(&self) -> Holder {
        Holder {
            id: self.id,
            ip: self.info.ip,
            last_seen_ms: self
                .info
                .last_frame_ms
                .load(Ordering::Relaxed)
                .max(self.info.since_ms),
        }
    }
}

impl SessionInfo {
    /// Whether to log a conflict over this session's MN now (at most once a
    /// minute), and how many went unlogged before it.
    fn conflict_log_due(&self, now_ms: i64) -> Option<u64> {
        let mut g = self.conflict_log.lock().unwrap_or_else(|e| e.into_inner());
        if now_ms.saturating_sub(g.0) >= 60_000 || now_ms < g.0 {
            let unlogged = g.1;
            *g = (now_ms, 0);
            Some(unlogged)
        } else {
            g.1 += 1;
            None
        }
    }
}

impl SessionMap {
    /// Claims `mn` for `owner` under the ownership rule ([`ingest::claim`]):
    /// free, same address or a silent holder: taken; a live holder from
    /// another address keeps it.
    fn claim(&self, mn: &str, owner: &Owner, now_ms: i64, idle_ms: i64) -> Claimed {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let held = m.get(mn);
        let rule = ingest::claim(
            held.map(Owner::holder).as_ref(),
            owner.id,
            owner.info.ip,
            now_ms,
            idle_ms,
        );
        match (rule, held) {
            (Claim::Conflict, Some(h)) => Claimed::Conflict(h.info.clone()),
            (Claim::Supersede, Some(old)) => {
                old.info.inbox.supersede();
                let old = old.id;
                m.insert(mn.to_owned(), owner.clone());
                Claimed::Superseded(old)
            }
            (Claim::Own, _) => Claimed::Took,
            _ => {
                m.insert(mn.to_owned(), owner.clone());
                Claimed::Took
            }
        }
    }
    /// The live session from another address that holds `mn` against session
    /// `id` at `ip` (the frame is then flagged `session.conflict`), if any.
    fn conflicting(
        &self,
        mn: &str,
        id: u64,
        ip: IpAddr,
        now_ms: i64,
        idle_ms: i64,
    ) -> Option<Arc<SessionInfo>> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let held = m.get(mn)?;
        match ingest::claim(Some(&held.holder()), id, ip, now_ms, idle_ms) {
            Claim::Conflict => Some(held.info.clone()),
            _ => None,
        }
    }
    /// Claims `mn` for session `id` only if no other session owns it.
    fn claim_if_free(&self, mn: &str, owner: &Owner) -> bool {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(mn) {
            Some(o) if o.id != owner.id => false,
            _ => {
                m.insert(mn.to_owned(), owner.clone());
                true
            }
        }
    }
    /// Queues a request for the live session of `s.mn` without waiting. Gives
    /// it back when the device has no live session or its queue is full.
    pub fn submit(&self, s: Box<Submit>) -> Result<(), (Box<Submit>, Refusal)> {
        let info = {
            let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&s.mn) {
                Some(o) => o.info.clone(),
                None => return Err((s, Refusal::Offline)),
            }
        };
        info.inbox.try_push(s)
    }
    /// The live sessions, one row per MN, sorted by MN.
    pub fn list(&self) -> Vec<SessionEntry> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<SessionEntry> = m
            .iter()
            .map(|(mn, o)| {
                let h = o.info.header.lock().unwrap_or_else(|e| e.into_inner());
                SessionEntry {
                    mn: mn.clone(),
                    peer: o.info.peer.clone(),
                    since_ms: o.info.since_ms,
                    dialect: h.dialect.map(|d| d.as_str()),
                    last_frame_ms: o.info.last_frame_ms.load(Ordering::Relaxed),
                    session: o.id,
                }
            })
            .collect();
        v.sort_by(|a, b| a.mn.cmp(&b.mn));
        v
    }
    /// Releases `mn` if session `id` still owns it; true when it did.
    fn release(&self, mn: &str, id: u64) -> bool {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(mn).is_some_and(|o| o.id == id) {
            m.remove(mn);
            true
        } else {
            false
        }
    }
    /// Number of MNs with a live session.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    /// True when no MN has a live session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything a session needs, shared by all sessions.
#[derive(Debug)]
pub struct Shared {
    /// Loaded configuration.
    pub cfg: Config,
    /// Device registry (reloadable).
    pub registry: Arc<SharedRegistry>,
    /// Frame log.
    pub store: StoreHandle,
    /// MN ownership.
    pub sessions: SessionMap,
    /// Session ids.
    pub next_id: AtomicU64,
    /// Device presence for the MQTT publisher (`None` when it is disabled).
    pub presence: Option<Arc<Presence>>,
}

/// Logs the first few warnings per window, then counts silently: a device
/// spewing garbage must not flood journald.
struct WarnLimiter {
    window: Instant,
    count: u32,
    suppressed: u32,
}

impl WarnLimiter {
    const PER_MINUTE: u32 = 5;
    fn new() -> Self {
        WarnLimiter {
            window: Instant::now(),
            count: 0,
            suppressed: 0,
        }
    }
    /// Whether to log this warning, and how many were suppressed in the window
    /// that just ended (for the caller to report).
    fn allow(&mut self) -> (bool, u32) {
        let mut ended = 0;
        if self.window.elapsed() > Duration::from_secs(60) {
            ended = self.suppressed;
            self.window = Instant::now();
            self.count = 0;
            self.suppressed = 0;
        }
        self.count += 1;
        if self.count <= Self::PER_MINUTE {
            (true, ended)
        } else {
            self.suppressed += 1;
            (false, ended)
        }
    }
}

/// Quiet time after which a buffered frame lacking only its terminator is taken as complete.
const TAIL_GRACE: Duration = Duration::from_millis(500);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn findings_json(f: &[Finding]) -> String {
    serde_json::to_string(f).unwrap_or_else(|_| "[]".into())
}

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
pub fn apply_policy(
    frame: &mut Frame,
    registry: &crate::registry::Registry,
    unknown: UnknownDevice,
) {
    let Some(mn) = frame.mn().map(str::to_owned) else {
        return;
    };
    match registry.get(&mn) {
        Some(dev) => {
            if let Some(pw) = &dev.pw {
                if frame.pw() != Some(pw.as_str()) {
                    frame.findings.push(Finding::new(code::AUTH_PASSWORD, Severity::Error, "PW does not match the registry"));
                }
            }
        }
        None => match unknown {
            UnknownDevice::Accept => {}
            UnknownDevice::Reject => frame.findings.push(Finding::new(
                code::DEVICE_UNKNOWN,
                Severity::Error,
                "MN is not registered (unknown_device = reject)",
            )),
            UnknownDevice::Quarantine => frame.findings.push(Finding::new(
                code::DEVICE_QUARANTINED,
                Severity::Warning,
                "MN is not registered (unknown_device = quarantine): stored and acked, not forwarded",
            )),
        },
    }
}

/// One session, to be spawned: runs it to completion, then drops `held`
/// (what the listener lent it: its connection permit and per-IP slot).
///
/// The session is set up here, outside the returned future, and that future
/// captures only the session and the socket's halves: arguments of an `async
/// fn`, and values an outer `async` block moves into it, would each keep a
/// second copy in the task for its whole life (~200 B per idle session).
pub fn run<H: Send + 'static>(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    held: H,
) -> impl Future<Output = ()> + Send + 'static {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let mut s = Session::new(shared, peer, id, shutdown);
    let (rd, wr) = stream.into_split();
    async move {
        s.run_to_end(rd, wr).await;
        drop(held);
    }
}

impl Session {
    async fn run_to_end(&mut self, rd: OwnedReadHalf, wr: OwnedWriteHalf) {
        let s = self;
        let id = s.id;
        slog!(debug, s, "connected");
        let reason = s.serve(rd, wr).await;
        // Paths that end on an error store no last run themselves: junk is
        // stored whatever ended the session (a failing store fails again here).
        if s.junk.pending() > 0 {
            let _ = Box::pin(s.process(Vec::new(), None, true)).await;
        }
        crate::metrics::METRICS.session_closed(reason);
        s.dl_close();
        for (i, mn) in s.mns.iter().enumerate() {
            let released = s.shared.sessions.release(mn, id);
            // Offline only for the session's device, and only if no newer session
            // took it over (that one already announced it online).
            if i == 0 && released && s.announced {
                if let Some(p) = &s.shared.presence {
                    p.set(mn, false, &s.peer_text);
                }
            }
        }
        if reason == "store error" {
            // The log's failure, not the device's: every session meets it, and
            // devices reconnect and meet it again (hundreds a second). One line
            // per interval; hj212_sessions_closed_total counts them all.
            crate::log_repeated!(
                info,
                peer = %s.peer_text,
                session = s.id,
                reason,
                frames = s.frames,
                "closed"
            );
        } else {
            slog!(
                info,
                s,
                reason,
                frames = s.frames,
                junk_bytes = s.junk_bytes,
                "closed"
            );
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    peer_text: String,
    id: u64,
    /// Decoder options from the config (its time zone parsed once); `now` is set per read.
    opts: Options,
    shutdown: CancellationToken,
    codec: Hj212Codec,
    mns: Vec<String>,
    /// The first MN was announced online (so its end is announced offline).
    announced: bool,
    frames: u64,
    junk_bytes: usize,
    /// Consecutive junk items not yet stored (one record per run).
    junk: JunkCoalescer,
    /// The device's address, for the MN ownership rule.
    ip: IpAddr,
    warn: WarnLimiter,
    /// Connected at (unix ms), for [`SessionInfo::since_ms`].
    since_ms: i64,
    /// This session as [`SessionMap`] records it (with its downlink queue).
    /// Made when the first frame names an MN: only then can the session be
    /// listed, superseded or sent requests, so a connection that has sent
    /// nothing holds no `SessionInfo`.
    owner: Option<Owner>,
    /// Downlink state, allocated only while a request is in progress or waiting,
    /// so an idle session stays small.
    dl: Option<Box<DlState>>,
}

/// What wakes the session through its inbox: supersession, or (when
/// `requests`) a queued request. Pending forever while it has no inbox: it has
/// not claimed an MN, so it can be neither superseded nor sent requests.
async fn next_for(owner: &Option<Owner>, requests: bool) -> Next {
    match owner {
        Some(o) => o.info.inbox.next(requests).await,
        None => std::future::pending().await,
    }
}

/// Where an exchange's steps go: a requester's channel, or (automatic
/// requests) the gateway's own log.
type Tag = Option<mpsc::Sender<Event>>;

struct DlState {
    engine: Engine<Tag>,
    /// Automatic requests waiting for the engine; at most one per origin
    /// (calibration, backfill, key push), so bounded by construction.
    auto: std::collections::VecDeque<Submit>,
    /// The exchange in progress as `downlink_exchanges` will record it.
    audit: Option<dl::audit::Audit>,
}

impl Session {
    fn new(shared: Arc<Shared>, peer: SocketAddr, id: u64, shutdown: CancellationToken) -> Session {
        let codec = Hj212Codec::new(FramerConfig {
            max_frame: shared.cfg.server.max_frame_bytes,
            ..FramerConfig::default()
        });
        let opts = decode_options(&shared.cfg, chrono::Utc::now());
        Session {
            since_ms: now_ms(),
            owner: None,
            dl: None,
            shared,
            peer_text: peer.to_string(),
            id,
            opts,
            shutdown,
            codec,
            mns: Vec::new(),
            announced: false,
            frames: 0,
            junk_bytes: 0,
            junk: JunkCoalescer::default(),
            ip: peer.ip(),
            warn: WarnLimiter::new(),
        }
    }

    /// A newer session took the device over.
    fn superseded(&self) -> bool {
        self.owner
            .as_ref()
            .is_some_and(|o| o.info.inbox.is_superseded())
    }

    /// This session as [`SessionMap`] records it, made on first use.
    fn owner(&mut self) -> &Owner {
        if self.owner.is_none() {
            self.owner = Some(Owner {
                id: self.id,
                info: Arc::new(SessionInfo {
                    inbox: Inbox::new(self.shared.cfg.downlink.queue),
                    peer: self.peer_text.clone(),
                    since_ms: self.since_ms,
                    ip: self.ip,
                    last_frame_ms: AtomicI64::new(0),
                    header: Mutex::new(DeviceHeader::default()),
                    conflict_log: Mutex::new((i64::MIN, 0)),
                }),
            });
        }
        self.owner.as_ref().expect("just made")
    }

    async fn serve(&mut self, rd: OwnedReadHalf, mut wr: OwnedWriteHalf) -> &'static str {
        let idle = self.shared.cfg.server.idle_timeout.0;
        let partial_limit = self.shared.cfg.server.partial_frame_timeout.0;
        // No buffer is held while the connection is idle: it is allocated when
        // bytes arrive and released once everything in it has been cut. For the
        // same reason the work done on bytes (process, flush_eof, dl_run, ...) is
        // boxed below: inline, its futures would make every idle session's task
        // as large as the largest of them (~2.9 KB).
        let mut buf = BytesMut::new();
        let mut partial_since: Option<Instant> = None;
        let mut last_activity = Instant::now();
        // Some loggers send no CR LF and then wait for their ack. The framer
        // cannot know no terminator is coming, so once the line has been quiet
        // for TAIL_GRACE we ask it whether the buffer holds a complete frame
        // as-is (once per quiet period).
        let mut tail_checked = false;
        // The waits live across iterations: re-creating them for every frame would
        // register and deregister a cancellation waiter and a timer per frame
        // (the shutdown token's waiter list is shared by every session). Moving the
        // timer's deadline later, which every read does, is a cheap update in tokio.
        let shutdown = self.shutdown.clone();
        let mut shutdown_wait = std::pin::pin!(shutdown.cancelled());
        let mut armed = last_activity + idle;
        let mut timer = std::pin::pin!(tokio::time::sleep_until(armed.into()));
        loop {
            let dl_deadline = self.dl.as_ref().and_then(|d| d.engine.deadline());
            let dl_idle = self.dl.as_ref().is_none_or(|d| d.engine.is_idle());
            let line_deadline = match partial_since {
                Some(_) if !tail_checked => last_activity + TAIL_GRACE,
                Some(t) => t + partial_limit,
                None => last_activity + idle,
            };
            // One timer serves the line and the downlink exchange: a second
            // sleep in the select would add its ~110 B to every idle session's
            // task although an exchange is rarely in progress.
            let deadline = dl_deadline.map_or(line_deadline, |d| d.min(line_deadline));
            if deadline != armed || timer.is_elapsed() {
                timer.as_mut().reset(deadline.into());
                armed = deadline;
            }
            tokio::select! {
                biased;
                // Bytes already read are stored (a partial frame as junk), never dropped.
                _ = &mut shutdown_wait => {
                    Box::pin(self.close_gracefully(&rd, &mut buf, wr)).await;
                    return "shutdown";
                }
                next = next_for(&self.owner, dl_idle) => match next {
                    Next::Superseded => {
                        let _ = Box::pin(self.flush_eof(&mut buf, Some(&mut wr))).await;
                        return "superseded";
                    }
                    Next::Request(sub) => {
                        let mut out = Vec::new();
                        self.dl_begin(*sub, &mut out);
                        if let Err(reason) = Box::pin(self.dl_run(out, &mut wr)).await {
                            return reason;
                        }
                        continue;
                    }
                },
                _ = &mut timer => {
                    // The exchange first when both are due; the line's deadline,
                    // already past, fires again on the next turn.
                    if dl_deadline.is_some_and(|d| d <= armed) {
                        let mut out = Vec::new();
                        if let Some(d) = self.dl.as_mut() {
                            d.engine.on_timer(Instant::now(), &mut out);
                        }
                        if let Err(reason) = Box::pin(self.dl_run(out, &mut wr)).await {
                            return reason;
                        }
                        continue;
                    }
                    if partial_since.is_some() && !tail_checked {
                        tail_checked = true;
                        if let Some(protocol::framing::Cut::Frame { len, info }) =
                            protocol::framing::cut(&buf, true, &self.codec.cfg)
                        {
                            let bytes = buf.split_to(len).freeze();
                            if buf.is_empty() {
                                partial_since = None;
                                buf = BytesMut::new();
                            }
                            if let Err(reason) = Box::pin(self.process(vec![Item::Frame { bytes, info }], Some(&mut wr), false)).await {
                                return reason;
                            }
                        }
                        continue;
                    }
                    if partial_since.is_some() {
                        // Slowloris or a device that died mid-frame: keep its bytes as junk.
                        let _ = Box::pin(self.flush_eof(&mut buf, Some(&mut wr))).await;
                        return "partial frame timeout";
                    }
                    // A junk run may still be held back.
                    let _ = Box::pin(self.flush_eof(&mut buf, Some(&mut wr))).await;
                    return "idle timeout";
                }
                r = rd.readable() => {
                    if let Err(e) = r {
                        slog!(debug, self, error = %e, "readable failed");
                        return "read error";
                    }
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            match rd.try_read_buf(&mut buf) {
                Ok(0) => {
                    let _ = Box::pin(self.flush_eof(&mut buf, Some(&mut wr))).await;
                    return "peer closed";
                }
                Ok(_) => {
                    last_activity = Instant::now();
                    tail_checked = false;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Readiness can come with nothing to read: every new
                    // connection saw it once, and each then kept the 4 KiB
                    // just reserved for as long as it stayed quiet.
                    if buf.is_empty() {
                        buf = BytesMut::new();
                    }
                    continue;
                }
                Err(e) => {
                    slog!(debug, self, error = %e, "read failed");
                    let _ = Box::pin(self.flush_eof(&mut buf, Some(&mut wr))).await;
                    return "read error";
                }
            }
            let mut items = Vec::new();
            loop {
                match self.codec.decode(&mut buf) {
                    Ok(Some(item)) => items.push(item),
                    Ok(None) => break,
                    Err(e) => {
                        slog!(warn, self, error = %e, "codec error");
                        return "codec error";
                    }
                }
            }
            if buf.is_empty() {
                partial_since = None;
                buf = BytesMut::new();
            } else if partial_since.is_none() || !items.is_empty() {
                partial_since = Some(Instant::now());
            }
            if !items.is_empty() {
                if let Err(reason) = Box::pin(self.process(items, Some(&mut wr), false)).await {
                    return reason;
                }
            }
            if self.junk_bytes > self.shared.cfg.server.max_junk_bytes {
                slog!(
                    warn,
                    self,
                    junk_bytes = self.junk_bytes,
                    "junk limit exceeded; closing"
                );
                let _ = Box::pin(self.flush_eof(&mut buf, Some(&mut wr))).await;
                return "junk limit";
            }
        }
    }

    /// Shutdown: ack what was already read, send FIN after the queued acks,
    /// then keep reading (storing, no longer acking) until the device closes
    /// or a short drain deadline passes. Closing with unread bytes in the
    /// kernel buffer would make the kernel send RST and discard acks still
    /// queued for the device.
    async fn close_gracefully(
        &mut self,
        rd: &OwnedReadHalf,
        buf: &mut BytesMut,
        mut wr: OwnedWriteHalf,
    ) {
        let mut items = Vec::new();
        while let Ok(Some(item)) = self.codec.decode(buf) {
            items.push(item);
        }
        if !items.is_empty() && self.process(items, Some(&mut wr), false).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(self.shared.cfg.server.write_timeout.0, wr.shutdown()).await;
        let drain = (self.shared.cfg.server.shutdown_grace.0 / 2).min(Duration::from_secs(2));
        let deadline = tokio::time::Instant::now() + drain;
        loop {
            match tokio::time::timeout_at(deadline, rd.readable()).await {
                Ok(Ok(())) => {}
                _ => break,
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            match rd.try_read_buf(buf) {
                Ok(0) => break,
                Ok(_) => {
                    let mut items = Vec::new();
                    while let Ok(Some(item)) = self.codec.decode(buf) {
                        items.push(item);
                    }
                    if !items.is_empty() && self.process(items, None, false).await.is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        }
        let _ = self.flush_eof(buf, None).await;
    }

    /// At end of stream, whatever is buffered is cut with `eof` (a partial
    /// frame becomes junk) and stored.
    async fn flush_eof(
        &mut self,
        buf: &mut BytesMut,
        wr: Option<&mut OwnedWriteHalf>,
    ) -> Result<(), &'static str> {
        let mut items = Vec::new();
        while !buf.is_empty() {
            match self.codec.decode_eof(buf) {
                Ok(Some(item)) => items.push(item),
                _ => break,
            }
        }
        if !buf.is_empty() {
            // The codec must consume everything at eof; keep any remainder as junk anyway.
            items.push(Item::Junk {
                bytes: buf.split().freeze(),
                reason: protocol::framing::JunkReason::Truncated,
            });
        }
        if items.is_empty() && self.junk.pending() == 0 {
            return Ok(());
        }
        self.process(items, wr, true).await
    }

    /// Stores the items; with a writer, also builds, logs and (after commit)
    /// sends the replies. Without one (the write side is closed) frames are
    /// stored but not acked: the device will retransmit, marked duplicate.
    ///
    /// `end`: the connection is over, so a junk run still open is stored too.
    async fn process(
        &mut self,
        items: Vec<Item>,
        wr: Option<&mut OwnedWriteHalf>,
        end: bool,
    ) -> Result<(), &'static str> {
        // The items were fully read just before this call: ack latency starts here.
        let read_at = Instant::now();
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        // Only `now` changes between calls: the rest was taken from the config once.
        let now = chrono::Utc::now();
        self.opts.now = now;
        let opts = self.opts.clone();
        let registry = self.shared.registry.current();
        let received_at_ms = now.timestamp_millis();
        let idle_ms = cfg.server.idle_timeout.0.as_millis() as i64;
        // Cut items become junk records (runs of consecutive junk) and judged
        // frames, in stream order; see `ingest`.
        let mut steps = Vec::new();
        let ctx = Ctx {
            peer: &self.peer_text,
            session: self.id,
            received_at_ms,
            opts: &opts,
            registry: &registry,
            unknown: cfg.validation.unknown_device,
            junk_cap: cfg.server.junk_record_bytes,
        };
        for item in items {
            if let Item::Junk { bytes, .. } = &item {
                self.junk_bytes += bytes.len();
                crate::metrics::METRICS.junk(bytes.len());
            }
            ingest::ingest_item(&mut self.junk, item, &ctx, &mut steps);
        }
        if end {
            ingest::ingest_end(&mut self.junk, ctx.peer, ctx.session, &mut steps);
        }
        // Room for each frame's ack record (junk runs are few).
        let mut records = Vec::with_capacity(steps.len() * 2);
        let mut replies: Vec<Bytes> = Vec::new();
        // (MN, announce presence): quarantined devices are never published.
        let mut claims: Vec<(String, bool)> = Vec::new();
        // Steps of the downlink exchange, delivered after the commit.
        let mut dl_out: Vec<Out<Tag>> = Vec::new();
        // Automatic requests the batch calls for, queued after the replies are written.
        let mut autos: Vec<Submit> = Vec::new();
        for step in steps {
            match step {
                Step::Junk(rec, run_end) => {
                    crate::metrics::METRICS.junk_record(run_end.as_str());
                    if self.warn_allowed() {
                        slog!(
                            warn,
                            self,
                            bytes = rec.raw.len(),
                            findings = %rec.findings,
                            "junk received"
                        );
                    }
                    records.push(rec);
                }
                Step::Frame(mut frame) => {
                    self.frames += 1;
                    let accepted = !frame.has_error();
                    // An upload for an MN that a live session from another
                    // address holds: stored and acked, flagged, never given the MN.
                    let conflict = match frame.mn() {
                        Some(mn) if accepted && !self.mns.iter().any(|m| m == mn) => shared
                            .sessions
                            .conflicting(mn, self.id, self.ip, received_at_ms, idle_ms),
                        _ => None,
                    };
                    if let Some(holder) = &conflict {
                        self.note_conflict(&frame, holder, received_at_ms);
                        frame.findings.push(ingest::conflict_finding(&holder.peer));
                    }
                    crate::metrics::METRICS.frame(accepted, frame.raw.len(), &frame.findings);
                    if !accepted && self.warn_allowed() {
                        let codes: Vec<&str> = frame
                            .findings
                            .iter()
                            .filter(|f| f.severity == Severity::Error)
                            .map(|f| f.code)
                            .collect();
                        slog!(warn, self, mn = frame.mn().or(self.mns.first().map(String::as_str)), cn = frame.cn().unwrap_or(""), reasons = ?codes, "frame rejected");
                    }
                    if accepted && conflict.is_none() {
                        if let Some(mn) = frame.mn() {
                            if !self.mns.iter().any(|m| m == mn)
                                && !claims.iter().any(|(m, _)| m == mn)
                            {
                                let quarantined = frame
                                    .findings
                                    .iter()
                                    .any(|f| f.code == code::DEVICE_QUARANTINED);
                                claims.push((mn.to_owned(), !quarantined));
                            }
                        }
                    }
                    let ack = if accepted && wr.is_some() {
                        reply::ack_frame(&frame, &opts)
                    } else {
                        None
                    };
                    if accepted {
                        let matched = self
                            .dl
                            .as_mut()
                            .and_then(|d| d.engine.on_frame(&frame, Instant::now(), &mut dl_out));
                        match matched {
                            Some(m) if m.history => frame.findings.push(Finding::new(
                                dl::FINDING_BACKFILL,
                                Severity::Info,
                                format!("answers the {} request QN={}", m.origin, m.qn),
                            )),
                            Some(_) => {}
                            // The downlink belongs to the MN's holder.
                            None if conflict.is_some() => {}
                            None => {
                                self.auto_requests(&frame, &registry, received_at_ms, &mut autos)
                            }
                        }
                        self.note_header(&frame, &claims, received_at_ms);
                    }
                    records.push(self.record(&frame, Direction::In, received_at_ms, accepted));
                    if let Some(ack) = ack {
                        records.push(self.record(&ack, Direction::Out, received_at_ms, true));
                        replies.push(ack.raw);
                    }
                }
            }
        }
        if records.is_empty() {
            // Only junk held back for its run: nothing to store or answer yet.
            return Ok(());
        }
        match self.shared.store.append_many(records).await {
            Ok(_) => {}
            Err(e) => {
                // Nothing of this batch is durable: no ack may go out.
                // Every session meets the same failure (a full disk): one line per
                // interval for all of them, not one per batch per session.
                crate::log_repeated!(warn, peer = %self.peer_text, session = self.id, error = %e, "frame log append failed; replies withheld");
                return Err("store error");
            }
        }
        // No sends come from device frames, only steps for requesters.
        self.dl_deliver(dl_out);
        for (mn, announce) in claims {
            // A superseded session storing its last bytes must not take the MN back.
            if self.superseded() {
                break;
            }
            // The first MN a connection speaks for is its device: a reconnect
            // from the same address (or after the holder went silent)
            // supersedes the stale session; a live holder elsewhere keeps it.
            // Further MNs on the same connection (multi-outlet loggers,
            // forwarders) are only taken when unowned, so two live paths for
            // one MN never evict each other in turn.
            if self.mns.is_empty() {
                let shared = self.shared.clone();
                let idle_ms = shared.cfg.server.idle_timeout.0.as_millis() as i64;
                match shared.sessions.claim(&mn, self.owner(), now_ms(), idle_ms) {
                    Claimed::Took => {}
                    Claimed::Superseded(old) => slog!(
                        info,
                        self,
                        mn = mn.as_str(),
                        superseded = old,
                        "device reconnected; older session superseded"
                    ),
                    // The holder appeared between the frame's check and the
                    // commit: counted, not flagged (the frame is stored).
                    Claimed::Conflict(holder) => {
                        crate::metrics::METRICS.session_conflicts.inc();
                        slog!(
                            debug,
                            self,
                            mn = mn.as_str(),
                            holder = %holder.peer,
                            "MN taken by a live session from another address; not taking it over"
                        );
                        continue;
                    }
                }
                if let (Some(p), true) = (&self.shared.presence, announce) {
                    p.set(&mn, true, &self.peer_text);
                }
                self.announced = announce;
            } else if !self
                .shared
                .clone()
                .sessions
                .claim_if_free(&mn, self.owner())
            {
                slog!(
                    debug,
                    self,
                    mn = mn.as_str(),
                    "MN already has a live session; not taking it over"
                );
                continue;
            }
            if self.mns.is_empty() {
                // Almost every connection speaks for one MN: room for one, not
                // the four a first push would reserve.
                self.mns.reserve_exact(1);
            }
            self.mns.push(mn);
        }
        let Some(wr) = wr else {
            return Ok(());
        };
        let acks = replies.len() as u64;
        let bytes: usize = replies.iter().map(Bytes::len).sum();
        if let Err((reason, e)) =
            write_replies(wr, replies, self.shared.cfg.server.write_timeout.0).await
        {
            if let Some(e) = e {
                slog!(debug, self, error = %e, "reply write failed");
            }
            return Err(reason);
        }
        crate::metrics::METRICS.bytes_out.add(bytes as u64);
        crate::metrics::METRICS
            .ack_seconds
            .observe_duration(read_at.elapsed(), acks);
        // After the 9013 to a 1013 or 1014 went out, as the standard's flows expect.
        // Not while closing: the exchange could not finish.
        if !autos.is_empty() && !self.superseded() && !self.shutdown.is_cancelled() {
            let d = self.dl_state();
            for a in autos {
                let queued = d.engine.current_origin() == Some(a.origin.as_str())
                    || d.auto.iter().any(|x| x.origin == a.origin);
                if !queued {
                    d.auto.push_back(a);
                }
            }
        }
        // An exchange this batch ended frees the engine for waiting automatic
        // requests (operator and upstream ones are taken by the session loop).
        if self.dl.is_some() {
            self.dl_run(Vec::new(), wr).await?;
        }
        Ok(())
    }

    /// Counts a conflict over `frame`'s MN with its `holder` and logs it, at
    /// most once a minute per MN (the holder's session keeps the count).
    fn note_conflict(&self, frame: &Frame, holder: &SessionInfo, now_ms: i64) {
        crate::metrics::METRICS.session_conflicts.inc();
        if let Some(unlogged) = holder.conflict_log_due(now_ms) {
            slog!(
                warn,
                self,
                mn = frame.mn(),
                holder = %holder.peer,
                unlogged,
                "upload for an MN held by a live session from another address; that session keeps the device"
            );
        }
    }

    /// [`WarnLimiter::allow`], reporting what the window that just ended suppressed.
    fn warn_allowed(&mut self) -> bool {
        let (allowed, suppressed) = self.warn.allow();
        if suppressed > 0 {
            slog!(
                warn,
                self,
                suppressed,
                "similar warnings suppressed in the last minute"
            );
        }
        allowed
    }

    /// The downlink state, allocated on first use.
    fn dl_state(&mut self) -> &mut DlState {
        let c = &self.shared.cfg.downlink;
        let timing = Timing {
            over_time: c.over_time.0,
            re_count: c.re_count,
            exec_timeout: c.exec_timeout.0,
        };
        self.dl.get_or_insert_with(|| {
            Box::new(DlState {
                engine: Engine::new(timing),
                auto: std::collections::VecDeque::new(),
                audit: None,
            })
        })
    }

    /// Builds a request in the device's dialect (registry override, else the
    /// dialect of its frames, else 2017) with a fresh QN and starts it.
    fn dl_begin(&mut self, sub: Submit, out: &mut Vec<Out<Tag>>) {
        let shared = self.shared.clone();
        let registry = shared.registry.current();
        let dev = registry.get(&sub.mn);
        let header = self
            .owner()
            .info
            .header
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let dialect = dev
            .and_then(|d| d.profile.dialect)
            .or(header.dialect)
            .unwrap_or(protocol::Dialect::V2017);
        let pw = dev.and_then(|d| d.pw.clone()).unwrap_or(header.pw);
        let st = if header.st.is_empty() {
            "32".to_owned()
        } else {
            header.st
        };
        let key = dev.and_then(|d| d.profile.keys.first().copied());
        let tz = shared
            .cfg
            .time_zone()
            .unwrap_or_else(protocol::time::beijing);
        let now = chrono::Utc::now();
        let qn = match &sub.action {
            Action::Relay { qn, .. } => qn.clone(),
            _ => {
                let ms = shared
                    .sessions
                    .devices
                    .next_qn_ms(&sub.mn, now.timestamp_millis());
                let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or(now);
                protocol::time::format_qn(t, tz)
            }
        };
        let target = reply::Target {
            dialect,
            st: &st,
            pw: &pw,
            mn: &sub.mn,
        };
        let cn = sub.action.cn();
        let d = self.dl_state();
        if d.engine.is_idle() {
            d.audit = Some(dl::audit::Audit::start(&sub, &qn, now.timestamp_millis()));
        }
        match sub.action.build(target, &qn, now, tz, key.as_ref()) {
            Ok(bytes) => {
                let b = Begin {
                    tag: sub.replies,
                    origin: sub.origin,
                    mn: sub.mn,
                    qn,
                    cn,
                    bytes,
                };
                self.dl_state().engine.begin(b, Instant::now(), out);
            }
            Err(message) => out.push(Out::Event(
                sub.replies,
                Event::Done(Outcome::Invalid(message)),
            )),
        }
    }

    /// Carries out the engine's outputs: each request is logged (direction out,
    /// peer = who asked) and only then written; steps go to their requesters.
    /// Then starts waiting automatic requests while the engine is free.
    async fn dl_run(
        &mut self,
        mut out: Vec<Out<Tag>>,
        wr: &mut OwnedWriteHalf,
    ) -> Result<(), &'static str> {
        loop {
            for o in std::mem::take(&mut out) {
                match o {
                    Out::Event(tag, ev) => self.dl_event(tag, ev),
                    Out::Send { bytes, origin } => {
                        let opts = decode_options(&self.shared.cfg, chrono::Utc::now());
                        let registry = self.shared.registry.current();
                        let frame = protocol::decode(bytes.clone(), &opts, &*registry);
                        let mut rec =
                            self.record(&frame, Direction::Out, now_ms(), !frame.has_error());
                        rec.peer = origin.clone();
                        let logged = self.shared.store.append_many(vec![rec]).await;
                        if let (Ok(a), Some(x)) =
                            (&logged, self.dl.as_mut().and_then(|d| d.audit.as_mut()))
                        {
                            if let Some(first) = a.first() {
                                x.on_logged(first.seq);
                            }
                        }
                        if let Err(e) = logged {
                            // Unlogged bytes never reach a device.
                            slog!(warn, self, error = %e, origin = %origin, "downlink request not logged; not sent");
                            let mut end = Vec::new();
                            if let Some(d) = self.dl.as_mut() {
                                d.engine.abort(
                                    Outcome::Invalid("the frame log is unavailable".into()),
                                    &mut end,
                                );
                            }
                            out.extend(end);
                            continue;
                        }
                        match tokio::time::timeout(
                            self.shared.cfg.server.write_timeout.0,
                            wr.write_all(&bytes),
                        )
                        .await
                        {
                            Ok(Ok(())) => crate::metrics::METRICS.bytes_out.add(bytes.len() as u64),
                            Ok(Err(_)) => return Err("write error"),
                            Err(_) => return Err("write timeout"),
                        }
                        slog!(info, self, origin = %origin, cn = frame.cn().unwrap_or(""), qn = frame.qn().unwrap_or(""), "downlink request sent");
                    }
                }
            }
            let next = match self.dl.as_mut() {
                Some(d) if d.engine.is_idle() => d.auto.pop_front(),
                _ => None,
            };
            match next {
                Some(sub) => self.dl_begin(sub, &mut out),
                None if out.is_empty() => break,
                None => {}
            }
        }
        if self
            .dl
            .as_ref()
            .is_some_and(|d| d.engine.is_idle() && d.auto.is_empty())
        {
            self.dl = None;
        }
        Ok(())
    }

    /// Delivers steps (never sends; device frames only produce steps).
    fn dl_deliver(&mut self, out: Vec<Out<Tag>>) {
        for o in out {
            if let Out::Event(tag, ev) = o {
                self.dl_event(tag, ev);
            }
        }
    }

    /// A step of the exchange in progress: recorded, then given to its requester.
    fn dl_event(&mut self, tag: Tag, ev: Event) {
        let audit = self.dl.as_mut().and_then(|d| d.audit.as_mut());
        if let Some(a) = audit {
            a.on_event(&ev);
        }
        if let Event::Done(o) = &ev {
            match o {
                Outcome::Success => slog!(info, self, outcome = o.name(), "downlink exchange done"),
                _ => slog!(warn, self, outcome = o.name(), detail = ?o, "downlink exchange failed"),
            }
            match self.dl.as_mut().and_then(|d| d.audit.take()) {
                Some(a) => dl::audit::record(&self.shared.store, a.finish(o, now_ms())),
                None => {
                    crate::metrics::METRICS.downlink_unrecorded.inc();
                    slog!(
                        warn,
                        self,
                        outcome = o.name(),
                        "downlink exchange ended without a record"
                    );
                }
            }
        }
        self.dl_reply(tag, ev);
    }

    /// Ends the exchange in progress and answers what is still queued: the
    /// session is over. Each of them is recorded as `closed`.
    fn dl_close(&mut self) {
        let mut out = Vec::new();
        if let Some(d) = self.dl.as_mut() {
            d.engine.abort(Outcome::Closed, &mut out);
        }
        self.dl_deliver(out);
        let now = now_ms();
        if let Some(d) = self.dl.take() {
            for sub in d.auto {
                dl::audit::record(
                    &self.shared.store,
                    dl::audit::unsent(&sub, &Outcome::Closed, now),
                );
            }
        }
        let Some(queued) = self.owner.as_ref().map(|o| o.info.inbox.close()) else {
            return;
        };
        for sub in queued {
            dl::audit::record(
                &self.shared.store,
                dl::audit::unsent(&sub, &Outcome::Closed, now),
            );
            self.dl_reply(sub.replies, Event::Done(Outcome::Closed));
        }
    }

    /// Gives a step to its requester, if any.
    fn dl_reply(&self, tag: Tag, ev: Event) {
        if let Some(tx) = tag {
            // Never waits: a requester that does not read must not stall the device.
            if tx.try_send(ev).is_err() {
                slog!(
                    warn,
                    self,
                    "downlink step not delivered: the requester is gone or not reading"
                );
            }
        }
    }

    /// Remembers the session's device header (for requests and `sessions`).
    fn note_header(&mut self, f: &Frame, claims: &[(String, bool)], now: i64) {
        let primary = self.mns.first().or(claims.first().map(|c| &c.0));
        if f.mn().is_none() || f.mn() != primary.map(String::as_str) {
            return;
        }
        let info = &self.owner().info;
        info.last_frame_ms.store(now, Ordering::Relaxed);
        if matches!(f.cn_num(), Some(9011..=9014)) {
            // Replies carry ST=91, not the device's own ST.
            return;
        }
        let mut h = info.header.lock().unwrap_or_else(|e| e.into_inner());
        if f.dialect.is_some() {
            h.dialect = f.dialect;
        }
        let (st, pw) = (f.st().unwrap_or(""), f.pw().unwrap_or(""));
        if h.st != st {
            h.st = st.to_owned();
        }
        if h.pw != pw {
            h.pw = pw.to_owned();
        }
    }

    /// Automatic requests a device frame calls for: clock calibration on 1013
    /// or skew, backfill of a gap in minute/hour/day data, the 2025 key push
    /// on 1014.
    fn auto_requests(
        &self,
        f: &Frame,
        registry: &crate::registry::Registry,
        received_at_ms: i64,
        autos: &mut Vec<Submit>,
    ) {
        let (Some(mn), Some(cn)) = (f.mn(), f.cn_num()) else {
            return;
        };
        // Only devices this session speaks for (quarantined ones are not claimed).
        if f.findings
            .iter()
            .any(|x| x.code == code::DEVICE_QUARANTINED)
        {
            return;
        }
        let c = &self.shared.cfg.downlink;
        let dev = registry.get(mn);
        let auto = |action: Action, origin: &str| Submit {
            mn: mn.to_owned(),
            action,
            origin: origin.to_owned(),
            replies: None,
        };
        let time_sync = dev.and_then(|d| d.time_sync).unwrap_or(c.time_sync);
        match cn {
            // A notify in the device's edition (2005 has no 1013: it is acked as
            // data there); PolId names the instrument whose clock is asked for.
            1013 if time_sync
                && f.dialect.is_some_and(|d| {
                    protocol::codes::command(d, protocol::codes::Dir::Up, 1013)
                        .is_some_and(|c| c.exchange == protocol::codes::Exchange::Notify)
                }) =>
            {
                let pol = f.param("PolId").map(str::to_owned);
                autos.push(auto(
                    Action::SetTime { time: None, pol },
                    dl::ORIGIN_TIMESYNC,
                ));
            }
            1014 if f.dialect == Some(protocol::Dialect::V2025) => {
                if let Some(next) = dev.and_then(|d| d.next_key.clone()) {
                    autos.push(auto(Action::KeyPush { new_key: next }, dl::ORIGIN_KEY));
                }
            }
            2011 if time_sync && c.time_sync_skew => {
                let Some(t) = f.data_time else { return };
                let skew_ms = t.timestamp_millis() - received_at_ms;
                let threshold = c.time_sync_threshold.0.as_millis() as i64;
                let devices = &self.shared.sessions.devices;
                if devices.skew_run(mn, skew_ms, threshold) >= c.time_sync_count
                    && devices.time_sync_due(
                        mn,
                        received_at_ms,
                        c.time_sync_interval.0.as_millis() as i64,
                    )
                {
                    slog!(
                        info,
                        self,
                        mn = mn,
                        skew_s = skew_ms / 1000,
                        "device clock off; calibrating"
                    );
                    autos.push(auto(
                        Action::SetTime {
                            time: None,
                            pol: None,
                        },
                        dl::ORIGIN_TIMESYNC,
                    ));
                }
            }
            2051 | 2061 | 2031 => {
                let Some(t) = f.data_time else { return };
                let window = c.backfill_max_window.0.as_secs() as i64;
                let Some(gap) = self
                    .shared
                    .sessions
                    .devices
                    .observe(mn, cn, t.timestamp(), window)
                else {
                    return;
                };
                let enabled = dev.and_then(|d| d.backfill).unwrap_or(c.backfill);
                if enabled
                    && self.shared.sessions.devices.backfill_due(
                        mn,
                        received_at_ms,
                        c.backfill_interval.0.as_millis() as i64,
                    )
                {
                    let tz = *t.offset();
                    let n14 = |s: i64| {
                        chrono::DateTime::from_timestamp(s, 0)
                            .map(|x| protocol::time::format_n14(x.with_timezone(&tz)))
                            .unwrap_or_default()
                    };
                    slog!(info, self, mn = mn, cn, from = %n14(gap.from), to = %n14(gap.to), "gap in device data; requesting backfill");
                    autos.push(auto(
                        Action::Fetch {
                            cn,
                            from: n14(gap.from),
                            to: n14(gap.to),
                        },
                        dl::ORIGIN_BACKFILL,
                    ));
                }
            }
            _ => {}
        }
    }

    fn record(
        &self,
        f: &Frame,
        direction: Direction,
        received_at_ms: i64,
        accepted: bool,
    ) -> NewRecord {
        frame_record(
            f,
            &self.peer_text,
            self.id,
            direction,
            received_at_ms,
            accepted,
        )
    }
}

/// Writes the replies of one commit in one write. The socket almost always has
/// room, so the write is tried at once and only a short or blocked write is
/// finished under `timeout` (which costs a timer registration). A failure
/// comes back as the session's close reason and the I/O error, if any.
async fn write_replies(
    wr: &mut OwnedWriteHalf,
    replies: Vec<Bytes>,
    timeout: Duration,
) -> Result<(), (&'static str, Option<std::io::Error>)> {
    let out: Bytes = match replies.len() {
        0 => return Ok(()),
        1 => replies.into_iter().next().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(replies.iter().map(Bytes::len).sum());
            for r in &replies {
                all.extend_from_slice(r);
            }
            all.freeze()
        }
    };
    let done = match wr.try_write(&out) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(("write error", Some(e))),
    };
    if done == out.len() {
        return Ok(());
    }
    match tokio::time::timeout(timeout, wr.write_all(&out[done..])).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(("write error", Some(e))),
        Err(_) => Err(("write timeout", None)),
    }
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
    let (doc, data_time) = json::frame_doc_and_time(f);
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
        findings: findings_json(&f.findings),
        doc,
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer_text)
            .field("id", &self.id)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: i64 = 600_000;

    fn owner(id: u64, cap: usize) -> Owner {
        owner_at(id, cap, [127, 0, 0, 1])
    }

    fn owner_at(id: u64, cap: usize, ip: [u8; 4]) -> Owner {
        let info = Arc::new(SessionInfo {
            inbox: Inbox::new(cap),
            peer: "127.0.0.1:1".into(),
            since_ms: 0,
            ip: ip.into(),
            last_frame_ms: AtomicI64::new(0),
            header: Mutex::new(DeviceHeader::default()),
            conflict_log: Mutex::new((i64::MIN, 0)),
        });
        Owner { id, info }
    }

    use crate::downlink::test_requests::{n, request as req};

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
        assert_eq!(
            a,
            b,
            "ack of {:?}\n doc  {}\n want {}",
            String::from_utf8_lossy(&frame.raw),
            a.doc,
            b.doc
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

    #[test]
    fn another_address_does_not_take_a_live_mn() {
        let map = SessionMap::default();
        let a = owner_at(1, 4, [10, 0, 0, 1]);
        let b = owner_at(2, 4, [10, 0, 0, 2]);
        assert!(matches!(map.claim("MN", &a, 1_000, IDLE), Claimed::Took));
        a.info.last_frame_ms.store(5_000, Ordering::Relaxed);
        assert!(map.conflicting("MN", 2, b.info.ip, 6_000, IDLE).is_some());
        assert!(matches!(
            map.claim("MN", &b, 6_000, IDLE),
            Claimed::Conflict(_)
        ));
        assert!(!a.info.inbox.is_superseded());
        assert!(map.submit(req("MN", 1)).is_ok());
        assert_eq!(
            n(&a.info.inbox.try_pop().unwrap()),
            1,
            "requests go to the holder"
        );
        // Silent for idle_timeout since its last frame: taken over.
        assert!(
            map.conflicting("MN", 2, b.info.ip, 5_000 + IDLE, IDLE)
                .is_none()
        );
        assert!(matches!(
            map.claim("MN", &b, 5_000 + IDLE, IDLE),
            Claimed::Superseded(1)
        ));
        assert!(a.info.inbox.is_superseded());
        // Rate-limited logging: one per minute per holder, then the count.
        assert_eq!(b.info.conflict_log_due(0), Some(0));
        assert_eq!(b.info.conflict_log_due(59_999), None);
        assert_eq!(b.info.conflict_log_due(30_000), None);
        assert_eq!(b.info.conflict_log_due(60_000), Some(2));
    }

    #[test]
    fn requests_reach_the_live_owner_and_are_bounded() {
        let map = SessionMap::default();
        assert_eq!(map.submit(req("MN1", 0)).unwrap_err().1, Refusal::Offline);
        let a = owner(1, 1);
        assert!(matches!(map.claim("MN1", &a, 0, IDLE), Claimed::Took));
        assert!(map.submit(req("MN1", 1)).is_ok());
        // Full queue: handed back at once.
        let (back, why) = map.submit(req("MN1", 2)).unwrap_err();
        assert_eq!((n(&back), why), (2, Refusal::Busy));
        assert_eq!(n(&a.info.inbox.try_pop().unwrap()), 1);
        // A reconnect takes the MN over: requests go to the new session.
        let b = owner(2, 4);
        assert!(matches!(
            map.claim("MN1", &b, 0, IDLE),
            Claimed::Superseded(1)
        ));
        assert!(a.info.inbox.is_superseded());
        assert!(!b.info.inbox.is_superseded());
        assert!(map.submit(req("MN1", 3)).is_ok());
        assert_eq!(n(&b.info.inbox.try_pop().unwrap()), 3);
        assert!(a.info.inbox.try_pop().is_none());
        assert_eq!(map.list().len(), 1);
        assert_eq!(map.list()[0].session, 2);
        // Released: offline again; a session that ended cannot receive.
        assert!(map.release("MN1", 2));
        assert_eq!(map.submit(req("MN1", 4)).unwrap_err().1, Refusal::Offline);
        let c = owner(3, 4);
        assert!(map.claim_if_free("MN2", &c));
        assert!(c.info.inbox.close().is_empty());
        assert_eq!(
            map.submit(req("MN2", 5)).unwrap_err().1,
            Refusal::Offline,
            "closed queue"
        );
    }
}

#[cfg(test)]
mod idle_size {
    use super::*;

    /// Size of what `f` returns (the future of an `async` function).
    fn output<A, B, C, D, E, F>(_: impl Fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connected device holds one session task, idle or not, and tokio
    /// allocates the task with room for the future's largest state. The work
    /// done on bytes is boxed and the downlink queue, `SessionInfo` and the
    /// read buffer are made on demand so that the future is mostly the
    /// session and its waits (~1 KB in a debug build, less in release). A
    /// bigger future means a larger allocation for each of 100,000 sessions:
    /// inline work, a second timer or wait, or arguments kept twice would
    /// break this budget (see README, "End-to-end targets").
    #[test]
    fn the_session_future_stays_small() {
        let size = output(run::<()>);
        eprintln!(
            "session future: {size} B (Session {} B)",
            std::mem::size_of::<Session>()
        );
        assert!(size <= 1152, "session future is {size} B");
    }
}
