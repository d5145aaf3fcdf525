//! One device connection: a short loop that waits on the socket, the
//! session's inbox, one timer and shutdown, hands what arrived to the ingest
//! core ([`crate::ingest::ingest`]) and carries out the batch it returns:
//! append the records, wait for the commit, then write the replies. A device
//! therefore never holds an ack for a frame that a crash could lose. When the
//! store's queue is full, `append_many` waits and we stop reading: TCP flow
//! control pushes the backpressure to the device.
//!
//! `DeviceConn` (`session/conn.rs`) owns the socket, the read buffer and the codec; the
//! session owns what lives as long as the device is connected: its MNs in the
//! shared [`crate::app::SessionMap`], its downlink exchange and its log fields.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::app::sessions::{Claimed, DeviceHeader, Owner, SessionInfo};
use crate::codec::Item;
use crate::downlink::auto::{Auto, Why};
use crate::downlink::engine::Engine;
use crate::downlink::inbox::{Inbox, Next};
use crate::downlink::{Event, Submit};
use crate::ingest::{self, Batch, CloseReason, Hooks, Input, Now, Policy, RunEnd, decode_options};
use crate::protocol::{Frame, Options, Severity};
use crate::store::NewRecord;

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

mod conn;
mod downlink;

use conn::{DeviceConn, Due, Read};

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

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One session, to be spawned: runs it to completion, then drops `held`
/// (what the listener lent it: its connection permit and per-IP slot).
///
/// The session is set up here, outside the returned future, and that future
/// captures only the session and its connection: arguments of an `async fn`,
/// and values an outer `async` block moves into it, would each keep a second
/// copy in the task for its whole life (~200 B per idle session).
pub fn run<H: Send + 'static>(
    app: Arc<App>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    held: H,
) -> impl Future<Output = ()> + Send + 'static {
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let mut io = DeviceConn::new(stream, app.cfg.server.max_frame_bytes);
    let mut s = Session::new(app, peer, id, shutdown);
    async move {
        s.run_to_end(&mut io).await;
        drop(held);
    }
}

struct Session {
    shared: Arc<App>,
    peer_text: String,
    id: u64,
    /// Decoder options from the config (its time zone parsed once); `now` is set per read.
    opts: Options,
    shutdown: CancellationToken,
    mns: Vec<String>,
    /// The first MN was announced online (so its end is announced offline).
    announced: bool,
    /// The ingest core's per-connection state (junk run, counters).
    core: ingest::Conn,
    /// The device's address, for the MN ownership rule.
    ip: IpAddr,
    warn: WarnLimiter,
    /// Connected at (unix ms), for [`SessionInfo::since_ms`].
    since_ms: i64,
    /// This session as the session map records it (with its downlink queue).
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
    audit: Option<crate::downlink::audit::Audit>,
}

/// What woke the session.
enum Wake {
    Shutdown,
    Inbox(Next),
    Timer,
    Readable(std::io::Result<()>),
}

impl Session {
    fn new(shared: Arc<App>, peer: SocketAddr, id: u64, shutdown: CancellationToken) -> Session {
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
            mns: Vec::new(),
            announced: false,
            core: ingest::Conn::default(),
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

    /// This session as the session map records it, made on first use.
    fn owner(&mut self) -> &Owner {
        owner_of(
            &mut self.owner,
            &self.shared,
            self.id,
            &self.peer_text,
            self.since_ms,
            self.ip,
        )
    }

    async fn run_to_end(&mut self, io: &mut DeviceConn) {
        let s = self;
        let id = s.id;
        slog!(debug, s, "connected");
        let reason = s.serve(io).await;
        // Paths that end on an error store no last run themselves: junk is
        // stored whatever ended the session (a failing store fails again here).
        if s.core.junk.pending() > 0 {
            let _ = Box::pin(s.process(io, Vec::new(), true, false)).await;
        }
        s.shared.metrics.session_closed(reason);
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
        let reason = reason.as_str();
        if reason == CloseReason::StoreError.as_str() {
            // The log's failure, not the device's: every session meets it, and
            // devices reconnect and meet it again (hundreds a second). One line
            // per interval; hj212_sessions_closed_total counts them all.
            crate::log_repeated!(
                info,
                peer = %s.peer_text,
                session = s.id,
                reason,
                frames = s.core.frames,
                "closed"
            );
        } else {
            slog!(
                info,
                s,
                reason,
                frames = s.core.frames,
                junk_bytes = s.core.junk_bytes,
                "closed"
            );
        }
    }

    /// The session loop: wait, then let the core and the connection act.
    async fn serve(&mut self, io: &mut DeviceConn) -> CloseReason {
        let idle = self.shared.cfg.server.idle_timeout.0;
        let partial_limit = self.shared.cfg.server.partial_frame_timeout.0;
        // The work done on bytes (process, flush_eof, dl_run, ...) is boxed
        // below: inline, its futures would make every idle session's task as
        // large as the largest of them (~2.9 KB).
        //
        // The waits live across iterations: re-creating them for every frame would
        // register and deregister a cancellation waiter and a timer per frame
        // (the shutdown token's waiter list is shared by every session). Moving the
        // timer's deadline later, which every read does, is a cheap update in tokio.
        let shutdown = self.shutdown.clone();
        let mut shutdown_wait = std::pin::pin!(shutdown.cancelled());
        let mut armed = io.deadline(idle, partial_limit);
        let mut timer = std::pin::pin!(tokio::time::sleep_until(armed.into()));
        loop {
            let dl_deadline = self.dl.as_ref().and_then(|d| d.engine.deadline());
            let dl_idle = self.dl.as_ref().is_none_or(|d| d.engine.is_idle());
            // One timer serves the line and the downlink exchange: a second
            // sleep in the select would add its ~110 B to every idle session's
            // task although an exchange is rarely in progress.
            let line_deadline = io.deadline(idle, partial_limit);
            let deadline = dl_deadline.map_or(line_deadline, |d| d.min(line_deadline));
            if deadline != armed || timer.is_elapsed() {
                timer.as_mut().reset(deadline.into());
                armed = deadline;
            }
            let wake = tokio::select! {
                biased;
                _ = &mut shutdown_wait => Wake::Shutdown,
                next = next_for(&self.owner, dl_idle) => Wake::Inbox(next),
                _ = &mut timer => Wake::Timer,
                r = io.readable() => Wake::Readable(r),
            };
            let step = match wake {
                // Bytes already read are stored (a partial frame as junk), never dropped.
                Wake::Shutdown => {
                    Box::pin(self.close_gracefully(io)).await;
                    Err(CloseReason::Shutdown)
                }
                Wake::Inbox(Next::Superseded) => self.end(io, CloseReason::Superseded).await,
                Wake::Inbox(Next::Request(sub)) => {
                    let mut out = Vec::new();
                    self.dl_begin(*sub, &mut out);
                    Box::pin(self.dl_run(out, io)).await
                }
                // The exchange first when both are due; the line's deadline,
                // already past, fires again on the next turn.
                Wake::Timer if dl_deadline.is_some_and(|d| d <= armed) => {
                    let mut out = Vec::new();
                    if let Some(d) = self.dl.as_mut() {
                        d.engine.on_timer(Instant::now(), &mut out);
                    }
                    Box::pin(self.dl_run(out, io)).await
                }
                Wake::Timer => match io.due() {
                    Due::Tail => match io.tail() {
                        Some(item) => Box::pin(self.process(io, vec![item], false, true))
                            .await
                            .map(drop),
                        None => Ok(()),
                    },
                    // Slowloris or a device that died mid-frame: keep its bytes as junk.
                    Due::Partial => self.end(io, CloseReason::PartialFrameTimeout).await,
                    // A junk run may still be held back.
                    Due::Idle => self.end(io, CloseReason::IdleTimeout).await,
                },
                Wake::Readable(Err(e)) => {
                    slog!(debug, self, error = %e, "readable failed");
                    Err(CloseReason::ReadError)
                }
                Wake::Readable(Ok(())) => self.on_readable(io).await,
            };
            if let Err(reason) = step {
                return reason;
            }
        }
    }

    /// Reads what the socket holds and ingests the complete items.
    async fn on_readable(&mut self, io: &mut DeviceConn) -> Result<(), CloseReason> {
        match io.try_read() {
            Read::Data => {}
            Read::Nothing => return Ok(()),
            Read::Closed => return self.end(io, CloseReason::PeerClosed).await,
            Read::Failed(e) => {
                slog!(debug, self, error = %e, "read failed");
                return self.end(io, CloseReason::ReadError).await;
            }
        }
        let items = match io.items() {
            Ok(items) => items,
            Err(e) => {
                slog!(warn, self, error = %e, "codec error");
                return Err(CloseReason::CodecError);
            }
        };
        if items.is_empty() {
            return Ok(());
        }
        match Box::pin(self.process(io, items, false, true)).await? {
            Some(reason) => {
                slog!(
                    warn,
                    self,
                    junk_bytes = self.core.junk_bytes,
                    "junk limit exceeded; closing"
                );
                self.end(io, reason).await
            }
            None => Ok(()),
        }
    }

    /// Ends the session for `reason`, storing what is still buffered first.
    async fn end(&mut self, io: &mut DeviceConn, reason: CloseReason) -> Result<(), CloseReason> {
        let _ = Box::pin(self.flush_eof(io, true)).await;
        Err(reason)
    }

    /// Shutdown: ack what was already read, send FIN after the queued acks,
    /// then keep reading (storing, no longer acking) until the device closes
    /// or a short drain deadline passes. Closing with unread bytes in the
    /// kernel buffer would make the kernel send RST and discard acks still
    /// queued for the device.
    async fn close_gracefully(&mut self, io: &mut DeviceConn) {
        let items = io.buffered_items();
        if !items.is_empty() && self.process(io, items, false, true).await.is_err() {
            return;
        }
        let cfg = &self.shared.cfg.server;
        io.shutdown_write(cfg.write_timeout.0).await;
        let drain = (cfg.shutdown_grace.0 / 2).min(Duration::from_secs(2));
        let deadline = tokio::time::Instant::now() + drain;
        while let Some(items) = io.drain_until(deadline).await {
            if !items.is_empty() && self.process(io, items, false, false).await.is_err() {
                return;
            }
        }
        let _ = self.flush_eof(io, false).await;
    }

    /// At end of stream, whatever is buffered is cut with `eof` (a partial
    /// frame becomes junk) and stored; `ack`: replies can still be written.
    async fn flush_eof(&mut self, io: &mut DeviceConn, ack: bool) -> Result<(), CloseReason> {
        let items = io.eof_items();
        if items.is_empty() && self.core.junk.pending() == 0 {
            return Ok(());
        }
        self.process(io, items, true, ack).await.map(drop)
    }

    /// Ingests the items and carries out the batch: the records are appended
    /// and, after the commit, the replies written (with `ack`; without it the
    /// write side is closed, so frames are stored but not acked and the
    /// device will retransmit, marked duplicate). Returns the reason to close
    /// the batch calls for, if any.
    ///
    /// `end`: the connection is over, so a junk run still open is stored too.
    async fn process(
        &mut self,
        io: &mut DeviceConn,
        items: Vec<Item>,
        end: bool,
        ack: bool,
    ) -> Result<Option<CloseReason>, CloseReason> {
        // The items were fully read just before this call: ack latency starts here.
        let read_at = Instant::now();
        let shared = self.shared.clone();
        let registry = shared.registry.current();
        let now = Now {
            wall: chrono::Utc::now(),
            mono: read_at,
        };
        let policy = Policy::new(
            &shared.cfg,
            &self.opts,
            &shared.sessions.devices,
            &self.peer_text,
            self.id,
            &self.mns,
        );
        let mut hooks = Shell {
            shared: &shared,
            peer_text: &self.peer_text,
            id: self.id,
            ip: self.ip,
            since_ms: self.since_ms,
            mns: &self.mns,
            warn: &mut self.warn,
            owner: &mut self.owner,
        };
        let input = Input { items, end, ack };
        let engine = self.dl.as_mut().map(|d| &mut d.engine);
        let batch = ingest::ingest(
            &mut self.core,
            input,
            now,
            &registry,
            &policy,
            engine,
            &mut hooks,
        );
        drop(registry);
        self.perform(io, batch, ack, read_at).await
    }

    /// Carries out a batch: append, wait for the commit, deliver, claim,
    /// write the replies, queue the automatic requests.
    async fn perform(
        &mut self,
        io: &mut DeviceConn,
        batch: Batch<Tag>,
        ack: bool,
        read_at: Instant,
    ) -> Result<Option<CloseReason>, CloseReason> {
        let Batch {
            records,
            replies,
            claims,
            downlink,
            autos,
            close,
        } = batch;
        if records.is_empty() {
            // Only junk held back for its run: nothing to store or answer yet.
            return Ok(close);
        }
        if let Err(e) = self.shared.store.append_many(records).await {
            // Nothing of this batch is durable: no ack may go out.
            // Every session meets the same failure (a full disk): one line per
            // interval for all of them, not one per batch per session.
            crate::log_repeated!(warn, peer = %self.peer_text, session = self.id, error = %e, "frame log append failed; replies withheld");
            return Err(CloseReason::StoreError);
        }
        // No sends come from device frames, only steps for requesters.
        self.dl_deliver(downlink);
        for c in claims {
            // A superseded session storing its last bytes must not take the MN back.
            if self.superseded() {
                break;
            }
            if !self.take(c.mn.as_str(), c.announce) {
                continue;
            }
            if self.mns.is_empty() {
                // Almost every connection speaks for one MN: room for one, not
                // the four a first push would reserve.
                self.mns.reserve_exact(1);
            }
            self.mns.push(c.mn);
        }
        if ack {
            self.answer(io, replies, autos, read_at).await?;
        }
        Ok(close)
    }

    /// Takes `mn` after a commit; false when another session keeps it.
    ///
    /// The first MN a connection speaks for is its device: a reconnect from
    /// the same address (or after the holder went silent) supersedes the
    /// stale session; a live holder elsewhere keeps it. Further MNs on the
    /// same connection (multi-outlet loggers, forwarders) are only taken when
    /// unowned, so two live paths for one MN never evict each other in turn.
    fn take(&mut self, mn: &str, announce: bool) -> bool {
        let shared = self.shared.clone();
        if !self.mns.is_empty() {
            if !shared.sessions.claim_if_free(mn, self.owner()) {
                slog!(
                    debug,
                    self,
                    mn = mn,
                    "MN already has a live session; not taking it over"
                );
                return false;
            }
            return true;
        }
        let idle_ms = shared.cfg.server.idle_timeout.0.as_millis() as i64;
        match shared.sessions.claim(mn, self.owner(), now_ms(), idle_ms) {
            Claimed::Took => {}
            Claimed::Superseded(old) => slog!(
                info,
                self,
                mn = mn,
                superseded = old,
                "device reconnected; older session superseded"
            ),
            // The holder appeared between the frame's check and the
            // commit: counted, not flagged (the frame is stored).
            Claimed::Conflict(holder) => {
                self.shared.metrics.session_conflicts.inc();
                slog!(
                    debug,
                    self,
                    mn = mn,
                    holder = %holder.peer,
                    "MN taken by a live session from another address; not taking it over"
                );
                return false;
            }
        }
        if let (Some(p), true) = (&shared.presence, announce) {
            p.set(mn, true, &self.peer_text);
        }
        self.announced = announce;
        true
    }

    /// Writes the replies of a committed batch (none is fine: the exchange
    /// may still move on), then queues its automatic
    /// requests and lets the engine take the next one.
    async fn answer(
        &mut self,
        io: &mut DeviceConn,
        replies: Vec<Bytes>,
        autos: Vec<Auto>,
        read_at: Instant,
    ) -> Result<(), CloseReason> {
        let acks = replies.len() as u64;
        let bytes: usize = replies.iter().map(Bytes::len).sum();
        if let Err((reason, e)) = io
            .write_replies(replies, self.shared.cfg.server.write_timeout.0)
            .await
        {
            if let Some(e) = e {
                slog!(debug, self, error = %e, "reply write failed");
            }
            return Err(reason);
        }
        self.shared.metrics.bytes_out.add(bytes as u64);
        self.shared
            .metrics
            .ack_seconds
            .observe_duration(read_at.elapsed(), acks);
        // After the 9013 to a 1013 or 1014 went out, as the standard's flows expect.
        // Not while closing: the exchange could not finish.
        if !autos.is_empty() && !self.superseded() && !self.shutdown.is_cancelled() {
            let d = self.dl_state();
            for a in autos {
                let a = a.submit;
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
            self.dl_run(Vec::new(), io).await?;
        }
        Ok(())
    }
}

/// This session as the session map records it, made on first use.
fn owner_of<'a>(
    owner: &'a mut Option<Owner>,
    shared: &App,
    id: u64,
    peer_text: &str,
    since_ms: i64,
    ip: IpAddr,
) -> &'a Owner {
    owner.get_or_insert_with(|| Owner {
        id,
        info: Arc::new(SessionInfo {
            inbox: Inbox::new(shared.cfg.downlink.queue),
            peer: peer_text.to_owned(),
            since_ms,
            ip,
            last_frame_ms: AtomicI64::new(0),
            header: std::sync::Mutex::new(DeviceHeader::default()),
            conflict_log: std::sync::Mutex::new((i64::MIN, 0)),
        }),
    })
}

/// What the ingest core asks of the session and tells it: MN holders from
/// the shared session map, counts to the metrics, warnings (rate-limited) to
/// the log, the device's header to its `SessionInfo`.
struct Shell<'a> {
    shared: &'a App,
    peer_text: &'a str,
    id: u64,
    ip: IpAddr,
    since_ms: i64,
    mns: &'a [String],
    warn: &'a mut WarnLimiter,
    owner: &'a mut Option<Owner>,
}

impl Shell<'_> {
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
}

impl Hooks for Shell<'_> {
    /// Counts a conflict over `frame`'s MN with its holder and logs it, at
    /// most once a minute per MN (the holder's session keeps the count).
    fn conflicting(&mut self, frame: &Frame, mn: &str, now_ms: i64) -> Option<String> {
        let idle_ms = self.shared.cfg.server.idle_timeout.0.as_millis() as i64;
        let holder = self
            .shared
            .sessions
            .conflicting(mn, self.id, self.ip, now_ms, idle_ms)?;
        self.shared.metrics.session_conflicts.inc();
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
        Some(holder.peer.clone())
    }

    fn junk(&mut self, len: usize) {
        self.shared.metrics.junk(len);
    }

    fn junk_record(&mut self, rec: &NewRecord, end: RunEnd) {
        self.shared.metrics.junk_record(end.as_str());
        if self.warn_allowed() {
            slog!(
                warn,
                self,
                bytes = rec.raw.len(),
                findings = %rec.findings,
                "junk received"
            );
        }
    }

    fn frame(&mut self, frame: &Frame, accepted: bool) {
        self.shared
            .metrics
            .frame(accepted, frame.raw.len(), &frame.findings);
        if !accepted && self.warn_allowed() {
            let codes: Vec<&str> = frame
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .map(|f| f.code)
                .collect();
            slog!(warn, self, mn = frame.mn().or(self.mns.first().map(String::as_str)), cn = frame.cn().unwrap_or(""), reasons = %codes.join(","), "frame rejected");
        }
        // A device on the wrong CRC variant repeats this with every frame (it gets no
        // ack and retransmits), so the fix is said once per interval, not per frame.
        let hint = (!accepted)
            .then(|| {
                crate::ingest::CrcHint::from_findings(
                    frame
                        .findings
                        .iter()
                        .map(|f| (f.code, f.severity == Severity::Error)),
                )
            })
            .flatten();
        if let Some(h) = hint {
            crate::log_repeated!(
                warn,
                peer = %self.peer_text,
                session = self.id,
                mn = frame.mn(),
                variant = h.variant,
                fix = %h.fix(),
                "frame rejected for its CRC, which matches another known variant: device {}",
                h.sends()
            );
        }
    }

    /// Remembers the session's device header (for requests and `sessions`).
    fn accepted(&mut self, f: &Frame, primary: Option<&str>, now_ms: i64) {
        self.shared.metrics.frame_accepted_at(now_ms);
        if f.mn().is_none() || f.mn() != primary {
            return;
        }
        let info = &owner_of(
            self.owner,
            self.shared,
            self.id,
            self.peer_text,
            self.since_ms,
            self.ip,
        )
        .info;
        info.last_frame_ms.store(now_ms, Ordering::Relaxed);
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

    fn auto(&mut self, f: &Frame, a: &Auto) {
        let mn = f.mn();
        match &a.why {
            Why::ClockSkew { skew_s } => slog!(
                info,
                self,
                mn = mn,
                skew_s = *skew_s,
                "device clock off; calibrating"
            ),
            Why::Gap { cn, from, to } => {
                slog!(info, self, mn = mn, cn = *cn, from = %from, to = %to, "gap in device data; requesting backfill")
            }
            Why::ClockNotify | Why::KeyPush => {}
        }
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
    /// break this budget (see benches/README.md, "End-to-end targets").
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
