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
use std::sync::{Arc, Mutex};
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
use crate::store::{
    Cursors, DeadLetter, Direction, FeedReader, Kind, NewRecord, Reader, StoreError, StoredRecord,
    Verdict,
};

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
/// Most seqs of set-aside frames kept to skip after a restart.
const DEAD_SEQS_MAX: usize = 100_000;

/// The cursor name of upstream `name`.
pub fn cursor_name(name: &str) -> String {
    format!("upstream.{name}")
}

/// The cursor of upstream `name`, created at `start` if it does not exist yet.
///
/// `daemon::start` calls this before devices can connect, so `now` means the
/// end of the log when the upstream was first configured, not whenever its
/// task happened to run. Blocking.
pub fn prepare_cursor(db: &Path, e: &UpstreamEntry) -> Result<u64, StoreError> {
    init_cursor(
        &Reader::open(db)?,
        &Cursors::open(db)?,
        &cursor_name(&e.name),
        e.start,
    )
}

fn init_cursor(
    reader: &Reader,
    cursors: &Cursors,
    name: &str,
    start: UpstreamStart,
) -> Result<u64, StoreError> {
    if let Some(c) = cursors.get_cursor(name)? {
        return Ok(c);
    }
    // Stored at once, so a restart does not move a `now` start forward.
    let c = match start {
        UpstreamStart::Now => reader.last_seq()?,
        UpstreamStart::Oldest => 0,
    };
    cursors.set_cursor(name, c)?;
    Ok(c)
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
    tokio::spawn(async move {
        let name = entry.name.clone();
        loop {
            match Forwarder::open(entry.clone(), names.clone(), shared.clone(), &db).await {
                Ok(f) => return f.run(shutdown).await,
                Err(e) if e.is_damage() => {
                    error!(upstream = %name, error = %e, "upstream forwarder cannot read the damaged frame log; stopped (see `verify`)");
                    return;
                }
                Err(e) => {
                    crate::log_repeated!(error, upstream = %name, error = %e, "upstream forwarder cannot open the frame log; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(crate::store::OPEN_RETRY) => {}
            }
        }
    })
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
    reader: Arc<Mutex<FeedReader>>,
    /// The last committed seq: wakes a caught-up forwarder at once.
    committed: tokio::sync::watch::Receiver<u64>,
    cursors: Arc<Mutex<Cursors>>,
    cursor_name: String,
    /// Every record up to here is delivered or not for this upstream.
    delivered: u64,
    persisted: u64,
    last_persist: tokio::time::Instant,
    pending: VecDeque<Arc<StoredRecord>>,
    last_seq: u64,
    state: State,
    logged: (State, tokio::time::Instant),
    /// Answers left for requests that cannot be relayed.
    refusals: Budget,
    /// Requests refused unanswered since the last summary line, and when it was
    /// logged (`None`: never).
    unanswered: (u64, Option<tokio::time::Instant>),
    metrics: Arc<crate::metrics::UpstreamMetrics>,
    /// The frame that keeps failing, and its failed rounds.
    failing: Option<(u64, u32)>,
    /// Set-aside frames after the cursor (skipped).
    dead: std::collections::BTreeSet<u64>,
    /// Crash-loop guard: frames up to here are marked before they are sent; 0 off.
    careful_until: u64,
    last_redrive: tokio::time::Instant,
    /// The last delivery failed for want of an ack (or the platform closed).
    last_no_ack: bool,
}

impl Forwarder {
    async fn open(
        e: UpstreamEntry,
        names: Arc<Vec<String>>,
        shared: Arc<Shared>,
        db: &Path,
    ) -> Result<Forwarder, StoreError> {
        let db = db.to_owned();
        let cursor_name = cursor_name(&e.name);
        let (cn, start) = (cursor_name.clone(), e.start);
        let feed = shared.store.feed();
        let committed = feed.subscribe();
        let crash_loop_starts = shared.cfg.store.crash_loop_starts;
        let (reader, cursors, cursor, last, dead, careful_until) = blocking(move || {
            let reader = Reader::open(&db)?;
            let cursors = Cursors::open(&db)?;
            let cursor = init_cursor(&reader, &cursors, &cn, start)?;
            let last = reader.last_seq()?;
            let careful = cursors.guard_start(&cn, cursor, last, crash_loop_starts)?;
            let dead = cursors.dead_seqs(&cn, cursor, DEAD_SEQS_MAX)?;
            Ok((
                FeedReader::new(feed, reader),
                cursors,
                cursor,
                last,
                dead.into_iter().collect(),
                careful,
            ))
        })
        .await?;
        info!(upstream = %e.name, addr = %e.addr, cursor, lag_frames = last.saturating_sub(cursor), "upstream forwarder resumes from its cursor");
        let now = tokio::time::Instant::now();
        let refusals = Budget::new(e.refusals_per_minute, now);
        let metrics = crate::metrics::METRICS.upstream(&e.name);
        Ok(Forwarder {
            refusals,
            unanswered: (0, None),
            metrics,
            e,
            names,
            shared,
            reader: Arc::new(Mutex::new(reader)),
            committed,
            cursors: Arc::new(Mutex::new(cursors)),
            cursor_name,
            delivered: cursor,
            persisted: cursor,
            last_persist: now,
            pending: VecDeque::new(),
            last_seq: last,
            state: State::default(),
            logged: (State::default(), now),
            failing: None,
            dead,
            careful_until,
            last_redrive: now,
            last_no_ack: false,
        })
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let mut conn: Option<Conn> = None;
        let mut backoff = BACKOFF_MIN;
        while !shutdown.is_cancelled() {
            self.report();
            self.persist(false).await;
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
            if !self.selected(&front) || self.dead.contains(&front.seq) {
                self.delivered = front.seq;
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
            if self.careful_until > 0 {
                self.mark(rec.seq).await;
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
                    self.delivered = rec.seq;
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
        self.persist(true).await;
        let (cursors, name, careful) = (
            self.cursors.clone(),
            self.cursor_name.clone(),
            self.careful_until > 0,
        );
        let stopped = blocking(move || {
            let c = cursors.lock().unwrap_or_else(|e| e.into_inner());
            if careful {
                c.set_probe(&name, None)?;
            }
            c.clean_stop(&name)
        })
        .await;
        if let Err(e) = stopped {
            warn!(upstream = %self.e.name, error = %e, "clean stop not recorded; the next start counts as after a crash");
        }
        info!(upstream = %self.e.name, cursor = self.delivered, "upstream forwarder stopped");
    }

    /// Whether `rec` goes to this upstream (see [`selects`]).
    fn selected(&self, rec: &StoredRecord) -> bool {
        selects(&self.e, &self.names, rec)
    }

    /// Up to one batch of records after `after`, read off the async threads.
    async fn read_after(&self, after: u64) -> Result<Vec<Arc<StoredRecord>>, StoreError> {
        let reader = self.reader.clone();
        blocking(move || {
            reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_from(after, BATCH)
        })
        .await
    }

    async fn fill(&mut self) -> Result<(), StoreError> {
        let recs = self.read_after(self.delivered).await?;
        // For the lag report only; asking SQLite would be one more reader per fill.
        let newest = recs.last().map_or(0, |r| r.seq);
        self.last_seq = self.last_seq.max(newest).max(*self.committed.borrow());
        self.pending = recs.into();
        Ok(())
    }

    /// The first frame after the front of `pending` that goes to this upstream
    /// and is not set aside: what is tried in place of a stuck front.
    fn next_after_front(&self) -> Option<Arc<StoredRecord>> {
        self.pending
            .iter()
            .skip(1)
            .find(|r| self.selected(r) && !self.dead.contains(&r.seq))
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
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = self.committed.changed() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            return;
        };
        let got = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.committed.changed() => return,
            _ = tokio::time::sleep(IDLE_POLL) => return,
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
        let (reader, mn) = (self.reader.clone(), mn.to_owned());
        let text = blocking(move || {
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
        crate::metrics::METRICS
            .upstream(&self.e.name)
            .connected
            .set(i64::from(connected));
        if last_error.is_some() {
            self.state.last_error = last_error;
        }
        self.report();
    }

    /// Logs the state when it changed, and every [`STATE_EVERY`] anyway.
    fn report(&mut self) {
        let now = tokio::time::Instant::now();
        if self.state == self.logged.0 && now < self.logged.1 + STATE_EVERY {
            return;
        }
        self.logged = (self.state.clone(), now);
        let lag_frames = self.last_seq.saturating_sub(self.delivered);
        let lag_s = self
            .pending
            .front()
            .map(|r| (chrono::Utc::now().timestamp_millis() - r.received_at_ms).max(0) / 1000)
            .unwrap_or(0);
        let err = self.state.last_error.as_deref().unwrap_or("");
        if self.state.connected {
            info!(upstream = %self.e.name, connected = true, cursor = self.delivered, lag_frames, lag_s, last_error = err, "upstream state");
        } else {
            warn!(upstream = %self.e.name, connected = false, cursor = self.delivered, lag_frames, lag_s, last_error = err, "upstream state; ingest continues, forwarding resumes from the cursor");
        }
    }

    /// `stuck` failed its rounds and `next` (the first frame after it for this
    /// upstream) was just acked: `stuck` is set aside and the cursor moves past
    /// both, in one transaction.
    async fn set_aside(&mut self, stuck: u64, next: &StoredRecord) {
        let dl = DeadLetter {
            consumer: self.cursor_name.clone(),
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
        let (cursors, name, seq) = (self.cursors.clone(), self.cursor_name.clone(), next.seq);
        let r = blocking(move || {
            cursors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save(&[(&name, seq)], &[dl], &[])
        })
        .await;
        if let Err(e) = r {
            // Without its entry the frame must not be skipped: it stays stuck and
            // the next pass tries again.
            error!(upstream = %self.e.name, error = %e, "dead letter not written; the frame stays in line");
            return;
        }
        crate::metrics::METRICS.dead_letter(&self.cursor_name, "no_ack");
        warn!(upstream = %self.e.name, seq = stuck, next = next.seq, "frame never acked by the platform while the next one was; set aside (dead letter), forwarding goes on");
        self.failing = None;
        self.dead.insert(stuck);
        while self.pending.front().is_some_and(|r| r.seq <= next.seq) {
            self.pending.pop_front();
        }
        self.delivered = next.seq;
        self.persisted = next.seq;
        self.dead = self.dead.split_off(&(next.seq + 1));
    }

    /// Careful mode: marks `seq` in the cursor row before it is decoded and sent.
    async fn mark(&mut self, seq: u64) {
        let until = self.careful_until;
        let probe = (seq <= until).then_some(seq);
        let (cursors, name) = (self.cursors.clone(), self.cursor_name.clone());
        let r = blocking(move || {
            cursors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_probe(&name, probe)
        })
        .await;
        if let Err(e) = r {
            warn!(upstream = %self.e.name, error = %e, "crash marker not written");
        }
        if probe.is_none() {
            self.careful_until = 0;
            info!(upstream = %self.e.name, "forwarder passed the stretch it crashed in");
        }
    }

    /// Sends the frames an operator marked for re-drive (a bounded batch); an
    /// acked one is resolved, a failed one set aside again (one more attempt).
    /// A connection error ends the pass (the caller reconnects).
    async fn redrive(&mut self, c: &mut Conn) -> Result<(), String> {
        let (cursors, reader, name) = (
            self.cursors.clone(),
            self.reader.clone(),
            self.cursor_name.clone(),
        );
        let rows = blocking(move || {
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
            let (dead, resolved) = match &outcome {
                Ok(()) => (Vec::new(), vec![id]),
                Err(e) => (
                    vec![DeadLetter {
                        consumer: self.cursor_name.clone(),
                        seq,
                        reason: "no_ack",
                        detail: format!("re-drive failed: {e}"),
                    }],
                    Vec::new(),
                ),
            };
            let cursors = self.cursors.clone();
            let w = blocking(move || {
                cursors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .save(&[], &dead, &resolved)
            })
            .await;
            if let Err(e) = w {
                error!(upstream = %self.e.name, error = %e, "re-drive outcome not written");
            }
            outcome?;
        }
        Ok(())
    }

    async fn persist(&mut self, force: bool) {
        if self.delivered == self.persisted
            || (!force && self.last_persist.elapsed() < PERSIST_EVERY)
        {
            return;
        }
        let (cursors, name, seq) = (
            self.cursors.clone(),
            self.cursor_name.clone(),
            self.delivered,
        );
        let r = blocking(move || {
            cursors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_cursor(&name, seq)
        })
        .await;
        self.last_persist = tokio::time::Instant::now();
        match r {
            Ok(()) => self.persisted = seq,
            Err(e) => {
                error!(upstream = %self.e.name, error = %e, "upstream cursor not saved; a restart repeats more frames")
            }
        }
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io {
            source: std::io::Error::other(e.to_string()),
        })?
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
