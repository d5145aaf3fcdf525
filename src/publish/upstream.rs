//! HJ 212 pass-through (原始数据直传): one forwarder per `[[upstream]]`.
//!
//! Each forwarder is a consumer of the frame log with its own persisted cursor
//! `upstream.<name>`. It sends the stored raw bytes of inbound device frames,
//! unchanged and in log order, one at a time (stop-and-wait): a frame whose
//! Flag asks for an ack is delivered only once the platform's 9014/9013 with
//! the same QN arrived; one without counts as delivered once written. The
//! cursor never passes an undelivered frame, so an outage or a crash only
//! delays (and at worst repeats) frames, never loses them.
//!
//! What comes back from the platform on the forwarder's connection is logged
//! (direction `in`, peer = the upstream's name) and never passed to devices:
//! the gateway acks devices itself, after its own commit.
//!
//! Why stop-and-wait: HJ 212 has no window; platforms answer in order of
//! arrival and some drop frames sent before the previous ack. One frame in
//! flight also bounds the duplicates a reconnect can cause to one.
//!
//! A platform's requests are handled on the forwarder's task, so what one
//! costs is what forwarding waits for. None waits on an fsync: the platform's
//! frames and the gateway's answers are queued on the writer (in order) and
//! commit with the next batch; nobody is acked on their durability. A request
//! that cannot be relayed (no live session, queue full) costs one record, one
//! exchange row and, within `refusals_per_minute`, an answer in the device's
//! last dialect (one primary-key seek). Beyond the budget it is still logged and
//! recorded as refused, but not answered: a platform flooding requests for
//! devices that are not there gets silence, and the log grows by the request
//! and its row, not by answers as well.
//!
//! # A frame the platform never takes
//!
//! Stop-and-wait means one frame the platform never acks (or closes the
//! connection over) would hold every later frame for good. After
//! `dead_letter_after` failed rounds (each `1 + retries` sends) the forwarder
//! sends the *next* frame instead: if the platform acks that one, the stuck
//! frame is set aside (dead letter `upstream.<name>`, reason `no_ack`) in the
//! same transaction that moves the cursor past both. If the next frame fails
//! too, the platform acks nothing (an outage, not a poison frame): nothing is
//! set aside and the stuck frame is retried with backoff as before. Entries an
//! operator marks for re-drive are sent again, out of order, and resolved once
//! acked. The crash-loop guard of the log's consumers (see `crate::store`) marks
//! each frame before it is decoded and sent while a crash loop is suspected.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::plan::is_quarantined;
use crate::app::Shared;
use crate::codec::{Hj212Codec, Item};
use crate::config::{UpstreamEntry, UpstreamMode, UpstreamStart};
use crate::downlink::{Action, Event, Refusal, Submit};
use crate::ingest::decode_options;
use crate::protocol::reply::Target;
use crate::protocol::{self, DeviceLookup, Dialect, Frame, reply};
use crate::store::follower::{self, Consumer, Follower, Plan, Rewind, Start};
use crate::store::{DeadLetter, Direction, Kind, NewRecord, StoreError, StoredRecord, Verdict};

/// Records read from the log per query.
const BATCH: usize = 256;
/// How often the forwarder looks for new records once caught up.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Cursor writes (each an fsync'd commit) at most this often.
const PERSIST_EVERY: Duration = Duration::from_millis(200);
/// First reconnect delay; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Connect and write deadline.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// State line at least this often, even without a change.
const STATE_EVERY: Duration = Duration::from_secs(60);
/// Frames from the platform buffered between its socket and the forwarder.
const INBOX: usize = 64;
/// Device replies to relayed requests buffered for one connection.
const RELAYED: usize = 256;
/// Summary of unanswered refusals at most this often.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Answers to refused requests a platform may still get: a token bucket that
/// holds a minute's worth (`refusals_per_minute`) and refills continuously.
/// Sans-IO: the caller passes the clock.
#[derive(Debug)]
struct Budget {
    per_minute: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Budget {
    fn new(per_minute: u32, now: tokio::time::Instant) -> Budget {
        let per_minute = f64::from(per_minute.max(1));
        Budget {
            per_minute,
            tokens: per_minute,
            at: now,
        }
    }

    /// Takes one answer if the budget has one at `now`.
    fn take(&mut self, now: tokio::time::Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.per_minute / 60.0;
        self.tokens = (self.tokens + refill).min(self.per_minute);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
/// How often the forwarder looks for dead letters an operator marked for re-drive.
const REDRIVE_EVERY: Duration = Duration::from_secs(2);
/// Entries re-driven per look.
const REDRIVE_BATCH: usize = 16;

/// The cursor name of upstream `name`.
pub fn cursor_name(name: &str) -> String {
    format!("upstream.{name}")
}

/// The cursor of upstream `name`, created at `start` if it does not exist yet
/// (see [`follower::prepare`]): `now` means the end of the log when the upstream
/// was first configured, not whenever its task happened to run. Blocking.
pub fn prepare_cursor(db: &Path, e: &UpstreamEntry) -> Result<u64, StoreError> {
    follower::prepare(db, &cursor_name(&e.name), start_of(e.start))
}

/// Where a new cursor of an upstream starts.
fn start_of(s: UpstreamStart) -> Start {
    match s {
        UpstreamStart::Now => Start::Head,
        UpstreamStart::Oldest => Start::Oldest,
    }
}

/// Starts the forwarder for `entry` on the log at `db`; it runs until `shutdown`
/// is cancelled, then persists its cursor and returns. `names` are all configured
/// upstream names: records they produced are never forwarded.
pub fn spawn(
    entry: UpstreamEntry,
    names: Arc<Vec<String>>,
    shared: Arc<Shared>,
    db: PathBuf,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let feed = shared.store.feed();
    follower::spawn(
        Upstream {
            e: entry,
            names,
            shared,
        },
        db,
        feed,
        shutdown,
    )
}

/// A forwarder as a consumer of the log (see [`crate::store::follower`]).
#[derive(Clone)]
struct Upstream {
    e: UpstreamEntry,
    names: Arc<Vec<String>>,
    shared: Arc<Shared>,
}

impl Consumer for Upstream {
    type Task = Forwarder;

    fn plan(&self) -> Plan {
        Plan {
            name: cursor_name(&self.e.name),
            what: "upstream forwarder",
            start: start_of(self.e.start),
            // Stored at once, so a restart does not move a `now` start forward.
            keep_start: true,
            rewind: Rewind::None,
            poll: IDLE_POLL,
            save_every: PERSIST_EVERY,
            crash_loop_starts: self.shared.cfg.store.crash_loop_starts,
        }
    }

    fn open(self, f: Follower) -> Result<Forwarder, StoreError> {
        let last = f
            .reader()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reader()
            .last_seq()?;
        let (e, cursor) = (self.e, f.position());
        info!(upstream = %e.name, addr = %e.addr, cursor, lag_frames = last.saturating_sub(cursor), "upstream forwarder resumes from its cursor");
        let now = tokio::time::Instant::now();
        Ok(Forwarder {
            refusals: Budget::new(e.refusals_per_minute, now),
            unanswered: (0, None),
            metrics: self.shared.metrics.upstream(&e.name),
            e,
            names: self.names,
            shared: self.shared,
            f,
            pending: VecDeque::new(),
            last_seq: last,
            state: State::default(),
            logged: (State::default(), now),
            repeats: crate::telemetry::Streak::new(),
            failing: None,
            last_redrive: now,
            last_no_ack: false,
        })
    }

    async fn run(fw: Forwarder, shutdown: CancellationToken) -> Follower {
        fw.run(shutdown).await
    }
}

/// A connection to the platform: the write half, and frames read from it.
struct Conn {
    wr: OwnedWriteHalf,
    inbox: mpsc::Receiver<Bytes>,
    /// Steps of requests relayed from this connection (the device's replies).
    relay_tx: mpsc::Sender<Event>,
    relay_rx: mpsc::Receiver<Event>,
    reader: JoinHandle<()>,
    session: u64,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Visible state, logged on change and every [`STATE_EVERY`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct State {
    connected: bool,
    last_error: Option<String>,
}

struct Forwarder {
    e: UpstreamEntry,
    names: Arc<Vec<String>>,
    shared: Arc<Shared>,
    /// The log behind the cursor; its position: every record up to there is
    /// delivered or not for this upstream.
    f: Follower,
    pending: VecDeque<Arc<StoredRecord>>,
    last_seq: u64,
    state: State,
    logged: (State, tokio::time::Instant),
    /// The current state's periodic lines.
    repeats: crate::telemetry::Streak,
    /// Answers left for requests that cannot be relayed.
    refusals: Budget,
    /// Requests refused unanswered since the last summary line, and when it was
    /// logged (`None`: never).
    unanswered: (u64, Option<tokio::time::Instant>),
    metrics: Arc<crate::metrics::UpstreamMetrics>,
    /// The frame that keeps failing, and its failed rounds.
    failing: Option<(u64, u32)>,
    last_redrive: tokio::time::Instant,
    /// The last delivery failed for want of an ack (or the platform closed).
    last_no_ack: bool,
}

impl Forwarder {
    async fn run(mut self, shutdown: CancellationToken) -> Follower {
        let mut conn: Option<Conn> = None;
        let mut backoff = BACKOFF_MIN;
        while !shutdown.is_cancelled() {
            self.report();
            self.f.persist(false).await;
            if self.pending.is_empty() {
                if let Err(e) = self.fill().await {
                    crate::log_repeated!(error, upstream = %self.e.name, error = %e, "upstream forwarder cannot read the frame log; retrying");
                }
            }
            // A persistent connection is kept up even with nothing to send: the
            // platform may send requests for devices on it at any time.
            let wanted = self.e.mode == UpstreamMode::Persistent
                || self.pending.front().is_some_and(|r| self.selected(r));
            if conn.is_none() && wanted {
                let r = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = self.connect() => r,
                };
                match r {
                    Ok(c) => {
                        conn = Some(c);
                        self.set_state(true, None);
                    }
                    Err(e) => {
                        self.set_state(false, Some(format!("connect: {e}")));
                        if !self.sleep(&mut backoff, &shutdown).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            if let Some(c) = conn.as_mut() {
                if self.last_redrive.elapsed() >= REDRIVE_EVERY {
                    self.last_redrive = tokio::time::Instant::now();
                    if let Err(e) = self.redrive(c).await {
                        conn = None;
                        self.set_state(false, Some(e));
                        continue;
                    }
                }
            }
            let Some(front) = self.pending.front().cloned() else {
                // Caught up: keep consuming what the platform sends meanwhile.
                self.idle(&mut conn, &shutdown).await;
                continue;
            };
            if !self.selected(&front) || self.f.is_dead(front.seq) {
                self.f.advance(front.seq);
                self.pending.pop_front();
                continue;
            }
            // A frame that failed its rounds: try the next one (see the module doc).
            let stuck = self
                .failing
                .filter(|&(seq, n)| seq == front.seq && n >= self.e.dead_letter_after)
                .map(|(seq, _)| seq);
            let mut probe = stuck.and_then(|_| self.next_after_front());
            if stuck.is_some() && probe.is_none() {
                // `pending` is refilled only once empty, so the batch read with the
                // stuck frame may end at it (the next frames were stored after that
                // read): without a look further on, the stuck frame would be retried
                // for good and never set aside.
                match self.read_past_front().await {
                    Ok(()) => probe = self.next_after_front(),
                    Err(e) => {
                        crate::log_repeated!(error, upstream = %self.e.name, error = %e, "upstream forwarder cannot read the frame log; retrying");
                    }
                }
            }
            let rec = probe.clone().unwrap_or(front);
            if let Err(e) = self.f.mark(rec.seq).await {
                warn!(upstream = %self.e.name, error = %e, "crash marker not written");
            }
            let c = conn.as_mut().expect("connected above");
            let r = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.deliver(c, &rec) => r,
            };
            if let (Some(stuck), Some(_)) = (stuck, &probe) {
                match r {
                    Ok(()) => {
                        backoff = BACKOFF_MIN;
                        self.set_aside(stuck, &rec).await;
                    }
                    Err(e) => {
                        // The platform acks nothing: an outage, not a poison frame.
                        self.failing = Some((stuck, 0));
                        conn = None;
                        self.set_state(false, Some(e));
                        if !self.sleep(&mut backoff, &shutdown).await {
                            break;
                        }
                    }
                }
                continue;
            }
            match r {
                Ok(()) => {
                    backoff = BACKOFF_MIN;
                    self.failing = None;
                    self.f.advance(rec.seq);
                    self.pending.pop_front();
                    if self.e.mode == UpstreamMode::PerMessage {
                        // Close cleanly; whatever the platform still says is ignored.
                        if let Some(mut c) = conn.take() {
                            let _ = tokio::time::timeout(IO_TIMEOUT, c.wr.shutdown()).await;
                        }
                    }
                }
                Err(e) => {
                    if self.last_no_ack {
                        self.failing = match self.failing {
                            Some((seq, n)) if seq == rec.seq => Some((seq, n + 1)),
                            _ => Some((rec.seq, 1)),
                        };
                    }
                    conn = None;
                    self.set_state(false, Some(e));
                    if !self.sleep(&mut backoff, &shutdown).await {
                        break;
                    }
                }
            }
        }
        drop(conn);
        self.f
    }

    /// Whether `rec` goes to this upstream (see [`selects`]).
    fn selected(&self, rec: &StoredRecord) -> bool {
        selects(&self.e, &self.names, rec)
    }

    /// Up to one batch of records after `after`, read off the async threads.
    async fn read_after(&self, after: u64) -> Result<Vec<Arc<StoredRecord>>, StoreError> {
        self.f.read(after, BATCH).await
    }

    async fn fill(&mut self) -> Result<(), StoreError> {
        let recs = self.read_after(self.f.position()).await?;
        // For the lag report only; asking SQLite would be one more reader per fill.
        let newest = recs.last().map_or(0, |r| r.seq);
        self.last_seq = self.last_seq.max(newest).max(self.f.head());
        self.pending = recs.into();
        Ok(())
    }

    /// The first frame after the front of `pending` that goes to this upstream
    /// and is not set aside: what is tried in place of a stuck front.
    fn next_after_front(&self) -> Option<Arc<StoredRecord>> {
        self.pending
            .iter()
            .skip(1)
            .find(|r| self.selected(r) && !self.f.is_dead(r.seq))
            .cloned()
    }

    /// Replaces what follows the front of `pending` (none of it a frame for this
    /// upstream, see [`Self::next_after_front`]) with the batch after the last
    /// pending record, so `pending` stays within one batch past the front.
    async fn read_past_front(&mut self) -> Result<(), StoreError> {
        let Some(after) = self.pending.back().map(|r| r.seq) else {
            return Ok(());
        };
        let recs = self.read_after(after).await?;
        if let Some(newest) = recs.last().map(|r| r.seq) {
            self.last_seq = self.last_seq.max(newest);
            self.pending.truncate(1);
            self.pending.extend(recs);
        }
        Ok(())
    }

    async fn connect(&self) -> Result<Conn, String> {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(&self.e.addr))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (mut rd, wr) = stream.into_split();
        let (tx, inbox) = mpsc::channel(INBOX);
        let max_frame = self.shared.cfg.server.max_frame_bytes;
        let name = self.e.name.clone();
        // Frames only: the bounded channel pushes back on a chatty platform
        // through TCP, since this task stops reading while it is full.
        let reader = tokio::spawn(async move {
            let mut codec = Hj212Codec::new(protocol::framing::FramerConfig {
                max_frame,
                ..Default::default()
            });
            let mut buf = BytesMut::with_capacity(4096);
            loop {
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                while let Ok(Some(item)) = codec.decode(&mut buf) {
                    match item {
                        Item::Frame { bytes, .. } => {
                            if tx.send(bytes).await.is_err() {
                                return;
                            }
                        }
                        Item::Junk { bytes, reason } => {
                            debug!(upstream = %name, bytes = bytes.len(), reason = reason.as_str(), "junk from upstream ignored");
                        }
                    }
                }
            }
        });
        let session = self
            .shared
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (relay_tx, relay_rx) = mpsc::channel(RELAYED);
        Ok(Conn {
            wr,
            inbox,
            relay_tx,
            relay_rx,
            reader,
            session,
        })
    }

    /// Sends `rec` and, if its Flag asks for an ack, waits for the platform's
    /// 9014/9013 with its QN: up to `1 + retries` sends, `ack_timeout` apart.
    async fn deliver(&mut self, c: &mut Conn, rec: &StoredRecord) -> Result<(), String> {
        self.last_no_ack = false;
        let frame = self.decode(Bytes::copy_from_slice(&rec.raw));
        // A rejected frame (`include_rejected`) may be one the platform refuses
        // to ack (bad CRC): waiting for it would stop the feed for good.
        let wants_ack = rec.verdict == Verdict::Accepted && reply::ack_kind(&frame).is_some();
        let qn = frame.qn().map(str::to_owned);
        let sends = 1 + self.e.retries;
        for attempt in 1..=sends {
            match tokio::time::timeout(IO_TIMEOUT, c.wr.write_all(&rec.raw)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("write: {e}")),
                Err(_) => return Err("write timed out".into()),
            }
            if !wants_ack {
                return Ok(());
            }
            let deadline = tokio::time::Instant::now() + self.e.ack_timeout.0;
            loop {
                let got = tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    got = c.inbox.recv() => got,
                    Some(ev) = c.relay_rx.recv() => {
                        if let Some(b) = relay_bytes(ev) {
                            self.on_relayed(c, b).await?;
                        }
                        continue;
                    }
                };
                let Some(got) = got else {
                    // Closing over a frame is how some platforms refuse it.
                    self.last_no_ack = true;
                    return Err("connection closed by the platform".into());
                };
                let f = self.on_incoming(c, got).await?;
                let is_ack = matches!(f.cn_num(), Some(9013 | 9014));
                if is_ack && f.qn().map(str::to_owned) == qn {
                    return Ok(());
                }
            }
            if attempt < sends {
                debug!(upstream = %self.e.name, seq = rec.seq, attempt, "no ack in time; sending again");
            }
        }
        self.last_no_ack = true;
        Err(format!(
            "no 9014/9013 for seq {} (QN {}) after {sends} sends",
            rec.seq,
            qn.as_deref().unwrap_or("-")
        ))
    }

    /// While caught up: consume what the platform sends, or wait for the next
    /// commit (a poll interval at most).
    async fn idle(&mut self, conn: &mut Option<Conn>, shutdown: &CancellationToken) {
        let Some(c) = conn.as_mut() else {
            self.f.wait(shutdown).await;
            return;
        };
        let poll = self.f.poll();
        let got = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.f.committed() => return,
            _ = tokio::time::sleep(poll) => return,
            got = c.inbox.recv() => got,
            Some(ev) = c.relay_rx.recv() => {
                let Some(b) = relay_bytes(ev) else { return };
                if let Err(e) = self.on_relayed(c, b).await {
                    *conn = None;
                    self.set_state(false, Some(e));
                }
                return;
            }
        };
        match got {
            Some(b) => {
                if let Err(e) = self.on_incoming(c, b).await {
                    *conn = None;
                    self.set_state(false, Some(e));
                }
            }
            None => {
                *conn = None;
                self.set_state(false, Some("connection closed by the platform".into()));
            }
        }
    }

    /// Logs a frame the platform sent (peer = the upstream's name). Acks need
    /// nothing more; a request is relayed to its device's live session, or
    /// answered with 9011 QnRtn=2 when the device is offline.
    async fn on_incoming(&mut self, c: &mut Conn, bytes: Bytes) -> Result<Frame, String> {
        let f = self.decode(bytes);
        self.log(&f, Direction::In, c.session).await;
        let (Some(cn), Some(mn)) = (f.cn_num(), f.mn()) else {
            return Ok(f);
        };
        if (9011..=9014).contains(&cn) {
            return Ok(f);
        }
        // Through the device's downlink engine, like the gateway's own requests:
        // one exchange at a time per device, OverTime/ReCount, replies matched by QN.
        let sub = Box::new(Submit {
            mn: mn.to_owned(),
            action: Action::Relay {
                bytes: f.raw.clone(),
                qn: f.qn().unwrap_or("").to_owned(),
                cn,
            },
            origin: self.e.name.clone(),
            replies: Some(c.relay_tx.clone()),
        });
        let (sub, why) = match self.shared.sessions.submit(sub) {
            Ok(()) => return Ok(f),
            Err(refused) => refused,
        };
        if !self.refusals.take(tokio::time::Instant::now()) {
            self.refuse_unanswered(&sub, why);
            return Ok(f);
        }
        crate::downlink::audit::refused(&self.shared.store, &sub, why);
        match why {
            Refusal::Busy => {
                self.metrics.refused_busy.inc();
                warn!(upstream = %self.e.name, mn, cn, "device's downlink queue is full (downlink.queue); request rejected");
            }
            Refusal::Offline => self.metrics.refused_offline.inc(),
        }
        // Offline (or its downlink queue is full): rejected, in the device's
        // dialect: the registry's override, else that of its last frame, else 2017.
        let over = self
            .shared
            .registry
            .current()
            .profile(mn)
            .and_then(|p| p.dialect);
        let dialect = match over {
            Some(d) => d,
            None => self.last_dialect(mn).await.unwrap_or(Dialect::V2017),
        };
        let t = Target {
            dialect,
            st: f.st().unwrap_or("91"),
            pw: f.pw().unwrap_or(""),
            mn,
        };
        let answer = reply::qn_rtn(t, f.qn().unwrap_or(""), 2);
        info!(upstream = %self.e.name, mn, cn, "downlink request for an offline device answered QnRtn=2");
        self.on_relayed(c, answer).await?;
        Ok(f)
    }

    /// A request that cannot be relayed, beyond `refusals_per_minute`: its exchange
    /// row says so, it is counted, and a summary line is logged at most every
    /// [`SUMMARY_EVERY`]; nothing is sent.
    fn refuse_unanswered(&mut self, sub: &Submit, why: Refusal) {
        use crate::downlink::{Outcome, audit};
        self.metrics.refused_rate_limited.inc();
        let o = match why {
            Refusal::Offline => Outcome::Offline,
            Refusal::Busy => Outcome::Busy,
        };
        let mut row = audit::unsent(sub, &o, audit::now_ms());
        row.detail = format!(
            "{}; not answered: over upstream {:?} refusals_per_minute = {}",
            row.detail, self.e.name, self.e.refusals_per_minute
        );
        audit::record(&self.shared.store, row);
        let (n, last) = &mut self.unanswered;
        *n += 1;
        // The first one at once, then one line per SUMMARY_EVERY with the count.
        let now = tokio::time::Instant::now();
        if last.is_none_or(|t| now.saturating_duration_since(t) >= SUMMARY_EVERY) {
            warn!(
                upstream = %self.e.name,
                unanswered = *n,
                refusals_per_minute = self.e.refusals_per_minute,
                "platform requests for devices that cannot take them, beyond refusals_per_minute: logged and recorded, not answered"
            );
            *n = 0;
            *last = Some(now);
        }
    }

    /// Writes a frame to the platform (a device's reply to a relayed request,
    /// or our own QnRtn=2) and logs it as sent to the upstream.
    async fn on_relayed(&mut self, c: &mut Conn, bytes: Bytes) -> Result<(), String> {
        let f = self.decode(bytes);
        self.log(&f, Direction::Out, c.session).await;
        match tokio::time::timeout(IO_TIMEOUT, c.wr.write_all(&f.raw)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err("write timed out".into()),
        }
    }

    /// Queues the frame's record on the writer without waiting for its commit
    /// (see the module doc): in order with everything else this task logs.
    async fn log(&self, f: &Frame, direction: Direction, session: u64) {
        let rec = self.record(f, direction, session);
        if let Err(e) = self.shared.store.queue(vec![rec]).await {
            // A gateway problem, not the platform's: the traffic goes on, the
            // record is missing and the error logged.
            warn!(upstream = %self.e.name, error = %e, "upstream traffic not logged");
        }
    }

    async fn last_dialect(&self, mn: &str) -> Option<Dialect> {
        let (reader, mn) = (self.f.reader(), mn.to_owned());
        let text = self
            .f
            .blocking(move || {
                reader
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reader()
                    .last_device_dialect(&mn)
            })
            .await;
        match text {
            Ok(t) => t.and_then(|t| Dialect::parse(&t)),
            Err(e) => {
                warn!(upstream = %self.e.name, error = %e, "cannot read the device's last dialect; answering in 2017");
                None
            }
        }
    }

    fn decode(&self, bytes: Bytes) -> Frame {
        let opts = decode_options(&self.shared.cfg, chrono::Utc::now());
        let registry = self.shared.registry.current();
        protocol::decode(bytes, &opts, &*registry)
    }

    fn record(&self, f: &Frame, direction: Direction, session: u64) -> NewRecord {
        crate::ingest::frame_record(
            f,
            &self.e.name,
            session,
            direction,
            chrono::Utc::now().timestamp_millis(),
            !f.has_error(),
        )
    }

    /// Waits the current backoff (false on shutdown), then doubles it.
    async fn sleep(&mut self, backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
        self.report();
        let d = *backoff;
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn set_state(&mut self, connected: bool, last_error: Option<String>) {
        self.state.connected = connected;
        self.metrics.connected.set(i64::from(connected));
        if last_error.is_some() {
            self.state.last_error = last_error;
        }
        self.report();
    }

    /// Logs the state when it changed, and every [`STATE_EVERY`] anyway.
    ///
    /// An unchanged state is a streak: the periodic lines thin out the longer it
    /// lasts (`telemetry::Streak`: gaps doubling up to 10 minutes, each with the
    /// lines skipped), so a platform down for a day is ~150 lines, not 1,440.
    fn report(&mut self) {
        let now = tokio::time::Instant::now();
        let changed = self.state != self.logged.0;
        if !changed && now < self.logged.1 + STATE_EVERY {
            return;
        }
        self.logged = (self.state.clone(), now);
        let suppressed = if changed {
            self.repeats.end();
            self.repeats.admit();
            0
        } else {
            match self.repeats.admit() {
                Some(n) => n,
                None => return,
            }
        };
        let lag_frames = self.last_seq.saturating_sub(self.f.position());
        let lag_s = self
            .pending
            .front()
            .map(|r| (chrono::Utc::now().timestamp_millis() - r.received_at_ms).max(0) / 1000)
            .unwrap_or(0);
        let err = self.state.last_error.as_deref().unwrap_or("");
        if self.state.connected {
            info!(upstream = %self.e.name, connected = true, cursor = self.f.position(), lag_frames, lag_s, last_error = err, suppressed, "upstream state");
        } else {
            warn!(upstream = %self.e.name, connected = false, cursor = self.f.position(), lag_frames, lag_s, last_error = err, suppressed, "upstream state; ingest continues, forwarding resumes from the cursor");
        }
    }

    /// `stuck` failed its rounds and `next` (the first frame after it for this
    /// upstream) was just acked: `stuck` is set aside and the cursor moves past
    /// both, in one transaction.
    async fn set_aside(&mut self, stuck: u64, next: &StoredRecord) {
        let dl = DeadLetter {
            consumer: self.f.name().to_owned(),
            seq: stuck,
            reason: "no_ack",
            detail: format!(
                "{} rounds of {} sends to {} without an ack ({}), while the platform acked seq {}",
                self.e.dead_letter_after,
                1 + self.e.retries,
                self.e.addr,
                self.state.last_error.as_deref().unwrap_or("-"),
                next.seq
            ),
        };
        if let Err(e) = self.f.save_now(Some(next.seq), vec![dl], Vec::new()).await {
            // Without its entry the frame must not be skipped: it stays stuck and
            // the next pass tries again.
            error!(upstream = %self.e.name, error = %e, "dead letter not written; the frame stays in line");
            return;
        }
        warn!(upstream = %self.e.name, seq = stuck, next = next.seq, "frame never acked by the platform while the next one was; set aside (dead letter), forwarding goes on");
        self.failing = None;
        while self.pending.front().is_some_and(|r| r.seq <= next.seq) {
            self.pending.pop_front();
        }
    }

    /// Sends the frames an operator marked for re-drive (a bounded batch); an
    /// acked one is resolved, a failed one set aside again (one more attempt).
    /// A connection error ends the pass (the caller reconnects).
    async fn redrive(&mut self, c: &mut Conn) -> Result<(), String> {
        let (cursors, reader, name) = (self.f.cursors(), self.f.reader(), self.f.name().to_owned());
        let rows = self
            .f
            .blocking(move || {
                let rows = cursors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .redrives(&name, REDRIVE_BATCH)?;
                let r = reader.lock().unwrap_or_else(|e| e.into_inner());
                rows.into_iter()
                    .map(|row| Ok((row.id, row.seq, r.reader().get(row.seq)?)))
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await
            .map_err(|e| format!("reading dead letters to re-drive: {e}"))?;
        for (id, seq, rec) in rows {
            let outcome = match &rec {
                Some(rec) if self.selected(rec) => {
                    info!(upstream = %self.e.name, id, seq, "re-driving a dead letter");
                    self.deliver(c, rec).await
                }
                // No longer for this upstream (filters changed): nothing to send.
                _ => Ok(()),
            };
            let again = outcome.as_ref().err().map(|e| DeadLetter {
                consumer: self.f.name().to_owned(),
                seq,
                reason: "no_ack",
                detail: format!("re-drive failed: {e}"),
            });
            if let Err(e) = self.f.redriven(id, again).await {
                error!(upstream = %self.e.name, error = %e, "re-drive outcome not written");
            }
            outcome?;
        }
        Ok(())
    }
}

/// Whether `rec` goes to upstream `e` (`names`: every configured upstream): an
/// inbound device frame (not one an upstream sent us), accepted (or rejected with
/// `include_rejected`), never from a quarantined device, and passing the
/// MN/ST/CN filters. Pure, for the forwarder and the fuzzer.
pub fn selects(e: &UpstreamEntry, names: &[String], rec: &StoredRecord) -> bool {
    if rec.direction != Direction::In || rec.kind != Kind::Frame {
        return false;
    }
    if names.contains(&rec.peer) {
        return false;
    }
    // A device's 9011/9012 answer a request relayed from one upstream; they
    // go back to that upstream only (see `on_relayed`), never to all.
    if matches!(rec.cn.as_deref(), Some("9011" | "9012")) {
        return false;
    }
    match rec.verdict {
        Verdict::Accepted => {}
        Verdict::Rejected if e.include_rejected => {}
        _ => return false,
    }
    if is_quarantined(&rec.findings) {
        return false;
    }
    let pass = |list: &[String], v: &Option<String>| {
        list.is_empty() || v.as_deref().is_some_and(|v| list.iter().any(|x| x == v))
    };
    pass(&e.mn, &rec.mn) && pass(&e.st, &rec.st) && pass(&e.cn, &rec.cn)
}

/// The device frame a relayed exchange's step carries back to the platform;
/// the gateway's own bookkeeping (sent, done) is not the platform's business.
fn relay_bytes(ev: Event) -> Option<Bytes> {
    match ev {
        Event::QnRtn { raw, .. }
        | Event::Upload { raw, .. }
        | Event::ExeRtn { raw, .. }
        | Event::NotifyAck { raw } => Some(raw),
        Event::Sent { .. } | Event::Done(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_budget_holds_a_minute_and_refills_over_it() {
        let t0 = tokio::time::Instant::now();
        let mut b = Budget::new(60, t0);
        assert_eq!((0..100).filter(|_| b.take(t0)).count(), 60);
        assert!(!b.take(t0 + Duration::from_millis(500)));
        assert!(b.take(t0 + Duration::from_secs(1)), "one a second");
        assert!(!b.take(t0 + Duration::from_secs(1)));
        // An hour of silence refills a minute's worth, not an hour's.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| b.take(later)).count(), 60);
    }
}
