//! One device connection: bytes -> items -> verdicts -> one commit -> acks.
//!
//! Each read is cut into frames and junk; every item, and every reply we are
//! about to send, becomes a record; the batch is appended and only after its
//! transaction commits are the replies written to the socket. A device
//! therefore never holds an ack for a frame that a crash could lose. When
//! the store's queue is full, `append_many` waits and we stop reading: TCP
//! flow control pushes the backpressure to the device.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::codec::{Hj212Codec, Item};
use crate::config::{Config, UnknownDevice};
use crate::protocol::framing::FramerConfig;
use crate::protocol::{self, Finding, Frame, Options, Severity, json, reply};
use crate::publish::presence::Presence;
use crate::registry::SharedRegistry;
use crate::store::{Direction, Kind, NewRecord, StoreHandle, Verdict};

/// Finding codes added by gateway policy (beyond the protocol's).
pub mod code {
    /// PW does not match the registry.
    pub const AUTH_PASSWORD: &str = "auth.password";
    /// MN not in the registry and `unknown_device = "reject"`.
    pub const DEVICE_UNKNOWN: &str = "device.unknown";
    /// MN not in the registry and `unknown_device = "quarantine"`: stored and
    /// acked, never forwarded or published.
    pub const DEVICE_QUARANTINED: &str = "device.quarantined";
}

/// A request an upstream platform sent for a device, to be written on the
/// device's live session byte-exact (see [`SessionMap::downlink`]).
#[derive(Debug)]
pub struct Downlink {
    /// The request exactly as the platform sent it.
    pub bytes: Bytes,
    /// The upstream's name: the peer of the logged request.
    pub upstream: String,
    /// Where the device's replies to it go (9011, 9012 and the uploads of the
    /// exchange). Bounded; a reply that does not fit is logged and not relayed.
    pub replies: mpsc::Sender<Bytes>,
}

/// Downlink requests waiting for one session. Small on purpose: a request is
/// answered by the device within seconds, and when the queue is full the
/// platform is told the request was rejected (QnRtn=2) rather than queued.
pub const DOWNLINK_QUEUE: usize = 8;

/// What [`SessionMap`] keeps per MN: the owning session, its cancel token and
/// its downlink queue.
#[derive(Debug, Clone)]
struct Owner {
    id: u64,
    token: CancellationToken,
    downlink: mpsc::Sender<Downlink>,
}

/// Which session currently owns each MN, so a reconnecting device supersedes
/// its stale session (and downlink traffic reaches the live one).
#[derive(Debug, Default)]
pub struct SessionMap {
    inner: Mutex<HashMap<String, Owner>>,
}

impl SessionMap {
    /// Claims `mn` for session `id`; returns the session it took it from.
    fn claim(&self, mn: &str, owner: &Owner) -> Option<u64> {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match m.insert(mn.to_owned(), owner.clone()) {
            Some(old) if old.id != owner.id => {
                old.token.cancel();
                Some(old.id)
            }
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
    /// Queues `d` for the live session of `mn` without waiting. Gives it back
    /// when the device has no live session or its queue is full.
    pub fn downlink(&self, mn: &str, d: Downlink) -> Result<(), Downlink> {
        let tx = {
            let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(mn) {
                Some(o) => o.downlink.clone(),
                None => return Err(d),
            }
        };
        tx.try_send(d).map_err(|e| match e {
            mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d) => d,
        })
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
    fn allow(&mut self) -> bool {
        if self.window.elapsed() > Duration::from_secs(60) {
            if self.suppressed > 0 {
                warn!(
                    suppressed = self.suppressed,
                    "similar warnings suppressed in the last minute"
                );
            }
            self.window = Instant::now();
            self.count = 0;
            self.suppressed = 0;
        }
        self.count += 1;
        if self.count <= Self::PER_MINUTE {
            true
        } else {
            self.suppressed += 1;
            false
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

/// Runs one session to completion.
pub async fn run(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("session", %peer, id, mn = tracing::field::Empty);
    async move {
        debug!("connected");
        let mut s = Session::new(shared, peer, id, shutdown);
        let reason = s.serve(stream).await;
        for (i, mn) in std::mem::take(&mut s.mns).into_iter().enumerate() {
            let released = s.shared.sessions.release(&mn, id);
            // Offline only for the session's device, and only if no newer session
            // took it over (that one already announced it online).
            if i == 0 && released && s.announced {
                if let Some(p) = &s.shared.presence {
                    p.set(&mn, false, &s.peer_text);
                }
            }
        }
        info!(
            reason,
            frames = s.frames,
            junk_bytes = s.junk_bytes,
            "closed"
        );
    }
    .instrument(span)
    .await
}

struct Session {
    shared: Arc<Shared>,
    peer: SocketAddr,
    peer_text: String,
    id: u64,
    token: CancellationToken,
    shutdown: CancellationToken,
    codec: Hj212Codec,
    mns: Vec<String>,
    /// The first MN was announced online (so its end is announced offline).
    announced: bool,
    frames: u64,
    junk_bytes: usize,
    warn: WarnLimiter,
    /// This session as [`SessionMap`] records it (its downlink queue's sender).
    owner: Owner,
    downlink: mpsc::Receiver<Downlink>,
    /// The downlink exchange in progress (one at a time, like the device).
    relay: Option<Relay>,
}

/// A relayed request whose replies go back to its upstream.
struct Relay {
    qn: String,
    replies: mpsc::Sender<Bytes>,
    /// The device accepted the request (9011 QnRtn=1): uploads with other QNs
    /// until its 9012 (a history fetch's data) belong to the exchange.
    open: bool,
    expires: Instant,
}

/// An exchange whose 9012 never comes stops capturing uploads after this.
const RELAY_TTL: Duration = Duration::from_secs(600);

impl Session {
    fn new(shared: Arc<Shared>, peer: SocketAddr, id: u64, shutdown: CancellationToken) -> Session {
        let codec = Hj212Codec::new(FramerConfig {
            max_frame: shared.cfg.server.max_frame_bytes,
            ..FramerConfig::default()
        });
        let (tx, downlink) = mpsc::channel(DOWNLINK_QUEUE);
        let token = CancellationToken::new();
        Session {
            owner: Owner {
                id,
                token: token.clone(),
                downlink: tx,
            },
            downlink,
            relay: None,
            shared,
            peer,
            peer_text: peer.to_string(),
            id,
            token,
            shutdown,
            codec,
            mns: Vec::new(),
            announced: false,
            frames: 0,
            junk_bytes: 0,
            warn: WarnLimiter::new(),
        }
    }

    async fn serve(&mut self, stream: TcpStream) -> &'static str {
        let (rd, mut wr) = stream.into_split();
        let idle = self.shared.cfg.server.idle_timeout.0;
        let partial_limit = self.shared.cfg.server.partial_frame_timeout.0;
        // No buffer is held while the connection is idle: it is allocated when
        // bytes arrive and released once everything in it has been cut.
        let mut buf = BytesMut::new();
        let mut partial_since: Option<Instant> = None;
        let mut last_activity = Instant::now();
        // Some loggers send no CR LF and then wait for their ack. The framer
        // cannot know no terminator is coming, so once the line has been quiet
        // for TAIL_GRACE we ask it whether the buffer holds a complete frame
        // as-is (once per quiet period).
        let mut tail_checked = false;
        // The waits live across iterations: re-creating them for every frame would
        // register and deregister two cancellation waiters and a timer per frame
        // (the shutdown token's waiter list is shared by every session). Moving the
        // timer's deadline later, which every read does, is a cheap update in tokio.
        let (shutdown, superseded) = (self.shutdown.clone(), self.token.clone());
        let mut shutdown_wait = std::pin::pin!(shutdown.cancelled());
        let mut superseded_wait = std::pin::pin!(superseded.cancelled());
        let mut armed = last_activity + idle;
        let mut timer = std::pin::pin!(tokio::time::sleep_until(armed.into()));
        loop {
            let deadline = match partial_since {
                Some(_) if !tail_checked => last_activity + TAIL_GRACE,
                Some(t) => t + partial_limit,
                None => last_activity + idle,
            };
            if deadline != armed || timer.is_elapsed() {
                timer.as_mut().reset(deadline.into());
                armed = deadline;
            }
            tokio::select! {
                biased;
                // Bytes already read are stored (a partial frame as junk), never dropped.
                _ = &mut shutdown_wait => {
                    self.close_gracefully(&rd, &mut buf, wr).await;
                    return "shutdown";
                }
                _ = &mut superseded_wait => {
                    let _ = self.flush_eof(&mut buf, Some(&mut wr)).await;
                    return "superseded";
                }
                Some(d) = self.downlink.recv() => {
                    if let Err(reason) = self.send_downlink(d, &mut wr).await {
                        return reason;
                    }
                    continue;
                }
                _ = &mut timer => {
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
                            if let Err(reason) = self.process(vec![Item::Frame { bytes, info }], Some(&mut wr)).await {
                                return reason;
                            }
                        }
                        continue;
                    }
                    if partial_since.is_some() {
                        // Slowloris or a device that died mid-frame: keep its bytes as junk.
                        let _ = self.flush_eof(&mut buf, Some(&mut wr)).await;
                        return "partial frame timeout";
                    }
                    return "idle timeout";
                }
                r = rd.readable() => {
                    if let Err(e) = r {
                        debug!(error = %e, "readable failed");
                        return "read error";
                    }
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            match rd.try_read_buf(&mut buf) {
                Ok(0) => {
                    let _ = self.flush_eof(&mut buf, Some(&mut wr)).await;
                    return "peer closed";
                }
                Ok(_) => {
                    last_activity = Instant::now();
                    tail_checked = false;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    debug!(error = %e, "read failed");
                    let _ = self.flush_eof(&mut buf, Some(&mut wr)).await;
                    return "read error";
                }
            }
            let mut items = Vec::new();
            loop {
                match self.codec.decode(&mut buf) {
                    Ok(Some(item)) => items.push(item),
                    Ok(None) => break,
                    Err(e) => {
                        warn!(error = %e, "codec error");
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
                if let Err(reason) = self.process(items, Some(&mut wr)).await {
                    return reason;
                }
            }
            if self.junk_bytes > self.shared.cfg.server.max_junk_bytes {
                warn!(junk_bytes = self.junk_bytes, "junk limit exceeded; closing");
                let _ = self.flush_eof(&mut buf, Some(&mut wr)).await;
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
        rd: &tokio::net::tcp::OwnedReadHalf,
        buf: &mut BytesMut,
        mut wr: tokio::net::tcp::OwnedWriteHalf,
    ) {
        let mut items = Vec::new();
        while let Ok(Some(item)) = self.codec.decode(buf) {
            items.push(item);
        }
        if !items.is_empty() && self.process(items, Some(&mut wr)).await.is_err() {
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
                    if !items.is_empty() && self.process(items, None).await.is_err() {
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
        wr: Option<&mut tokio::net::tcp::OwnedWriteHalf>,
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
        if items.is_empty() {
            return Ok(());
        }
        self.process(items, wr).await
    }

    /// Stores the items; with a writer, also builds, logs and (after commit)
    /// sends the replies. Without one (the write side is closed) frames are
    /// stored but not acked: the device will retransmit, marked duplicate.
    async fn process(
        &mut self,
        items: Vec<Item>,
        wr: Option<&mut tokio::net::tcp::OwnedWriteHalf>,
    ) -> Result<(), &'static str> {
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        let opts = decode_options(cfg, chrono::Utc::now());
        let registry = self.shared.registry.current();
        let received_at_ms = now_ms();
        let mut records = Vec::with_capacity(items.len() * 2);
        let mut replies: Vec<Bytes> = Vec::new();
        // (MN, announce presence): quarantined devices are never published.
        let mut claims: Vec<(String, bool)> = Vec::new();
        // Device replies to a relayed request, sent to its upstream after the commit.
        let mut relayed: Vec<(mpsc::Sender<Bytes>, Bytes)> = Vec::new();
        for item in items {
            match item {
                Item::Junk { bytes, reason } => {
                    self.junk_bytes += bytes.len();
                    if self.warn.allow() {
                        warn!(
                            reason = reason.as_str(),
                            bytes = bytes.len(),
                            "junk received"
                        );
                    }
                    let doc = json::junk_json(&bytes, reason.as_str(), false);
                    records.push(NewRecord {
                        received_at_ms,
                        peer: self.peer_text.clone(),
                        session: self.id,
                        direction: Direction::In,
                        kind: Kind::Junk,
                        raw: bytes,
                        dialect: None,
                        st: None,
                        cn: None,
                        mn: None,
                        qn: None,
                        data_time: None,
                        verdict: Verdict::Junk,
                        findings: doc["findings"].to_string(),
                        doc: serde_json::Value::Object(doc).to_string(),
                    });
                }
                Item::Frame { bytes, .. } => {
                    self.frames += 1;
                    let mut frame = protocol::decode(bytes, &opts, &*registry);
                    apply_policy(&mut frame, &registry, cfg.validation.unknown_device);
                    let accepted = !frame.has_error();
                    if !accepted && self.warn.allow() {
                        let codes: Vec<&str> = frame
                            .findings
                            .iter()
                            .filter(|f| f.severity == Severity::Error)
                            .map(|f| f.code)
                            .collect();
                        warn!(mn = frame.mn().unwrap_or(""), cn = frame.cn().unwrap_or(""), reasons = ?codes, "frame rejected");
                    }
                    if accepted {
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
                        reply::ack(&frame)
                    } else {
                        None
                    };
                    if accepted {
                        if let Some(tx) = self.relay_match(&frame) {
                            relayed.push((tx, frame.raw.clone()));
                        }
                    }
                    records.push(self.record(&frame, Direction::In, received_at_ms, accepted));
                    if let Some(ack) = ack {
                        let out = protocol::decode(ack.clone(), &opts, &());
                        records.push(self.record(&out, Direction::Out, received_at_ms, true));
                        replies.push(ack);
                    }
                }
            }
        }
        match self.shared.store.append_many(records).await {
            Ok(_) => {}
            Err(e) => {
                // Nothing of this batch is durable: no ack may go out.
                warn!(error = %e, "frame log append failed; replies withheld");
                return Err("store error");
            }
        }
        for (tx, bytes) in relayed {
            // Never waits: a platform that does not read must not stall the device.
            if tx.try_send(bytes).is_err() {
                warn!("downlink reply not relayed: the upstream connection is gone or not reading");
            }
        }
        for (mn, announce) in claims {
            // A superseded session storing its last bytes must not take the MN back.
            if self.token.is_cancelled() {
                break;
            }
            if self.mns.is_empty() {
                tracing::Span::current().record("mn", mn.as_str());
            }
            // The first MN a connection speaks for is its device: a reconnect
            // supersedes the stale session. Further MNs on the same connection
            // (multi-outlet loggers, forwarders) are only taken when unowned,
            // so two live paths for one MN never evict each other in turn.
            if self.mns.is_empty() {
                if let Some(old) = self.shared.sessions.claim(&mn, &self.owner) {
                    info!(mn = %mn, superseded = old, "device reconnected; older session superseded");
                }
                if let (Some(p), true) = (&self.shared.presence, announce) {
                    p.set(&mn, true, &self.peer_text);
                }
                self.announced = announce;
            } else if !self.shared.sessions.claim_if_free(&mn, &self.owner) {
                debug!(mn = %mn, "MN already has a live session; not taking it over");
                continue;
            }
            self.mns.push(mn);
        }
        let Some(wr) = wr else {
            return Ok(());
        };
        write_replies(wr, replies, self.shared.cfg.server.write_timeout.0).await
    }

    /// Writes a platform's request to the device, byte-exact, after logging it
    /// (direction out, peer = the upstream's name), and starts relaying the
    /// device's replies to it.
    async fn send_downlink(
        &mut self,
        d: Downlink,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> Result<(), &'static str> {
        let opts = decode_options(&self.shared.cfg, chrono::Utc::now());
        let registry = self.shared.registry.current();
        let frame = protocol::decode(d.bytes.clone(), &opts, &*registry);
        let mut rec = self.record(&frame, Direction::Out, now_ms(), !frame.has_error());
        rec.peer = d.upstream.clone();
        if let Err(e) = self.shared.store.append_many(vec![rec]).await {
            // Unlogged bytes never reach a device; the platform sees no reply.
            warn!(error = %e, upstream = %d.upstream, "downlink request not logged; not sent");
            return Ok(());
        }
        match tokio::time::timeout(
            self.shared.cfg.server.write_timeout.0,
            wr.write_all(&d.bytes),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("write error"),
            Err(_) => return Err("write timeout"),
        }
        info!(upstream = %d.upstream, cn = frame.cn().unwrap_or(""), qn = frame.qn().unwrap_or(""), "downlink request relayed to the device");
        self.relay = frame.qn().map(|qn| Relay {
            qn: qn.to_owned(),
            replies: d.replies,
            open: false,
            expires: Instant::now() + RELAY_TTL,
        });
        Ok(())
    }

    /// Whether an accepted frame from the device answers the relayed request:
    /// its 9011/9012 (same QN), uploads with its QN, and, between a 9011
    /// QnRtn=1 and the 9012, uploads with new QNs (history fetches).
    fn relay_match(&mut self, f: &Frame) -> Option<mpsc::Sender<Bytes>> {
        let r = self.relay.as_mut()?;
        if Instant::now() > r.expires {
            self.relay = None;
            return None;
        }
        let same = f.qn() == Some(r.qn.as_str());
        let tx = r.replies.clone();
        match f.cn_num() {
            Some(9011) if same => {
                r.open = f.param("QnRtn") == Some("1");
                if !r.open {
                    self.relay = None;
                }
                Some(tx)
            }
            Some(9012) if same => {
                self.relay = None;
                Some(tx)
            }
            Some(9011..=9014) => None,
            _ if same || r.open => Some(tx),
            _ => None,
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
/// finished under `timeout` (which costs a timer registration).
async fn write_replies(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    replies: Vec<Bytes>,
    timeout: Duration,
) -> Result<(), &'static str> {
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
        Err(e) => {
            debug!(error = %e, "reply write failed");
            return Err("write error");
        }
    };
    if done == out.len() {
        return Ok(());
    }
    match tokio::time::timeout(timeout, wr.write_all(&out[done..])).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            debug!(error = %e, "reply write failed");
            Err("write error")
        }
        Err(_) => Err("write timeout"),
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
        data_time: f
            .data_time
            .map(|t| protocol::time::rfc3339(t, f.data_time_ms)),
        verdict: if accepted {
            Verdict::Accepted
        } else {
            Verdict::Rejected
        },
        findings: findings_json(&f.findings),
        doc: json::frame_doc(f),
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("id", &self.id)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(id: u64, cap: usize) -> (Owner, mpsc::Receiver<Downlink>) {
        let (downlink, rx) = mpsc::channel(cap);
        let token = CancellationToken::new();
        (
            Owner {
                id,
                token,
                downlink,
            },
            rx,
        )
    }

    fn req(n: u8) -> Downlink {
        Downlink {
            bytes: Bytes::from(vec![n]),
            upstream: "up".into(),
            replies: mpsc::channel(1).0,
        }
    }

    #[test]
    fn downlink_reaches_the_live_owner_and_is_bounded() {
        let map = SessionMap::default();
        assert!(map.downlink("MN1", req(0)).is_err(), "offline");
        let (a, mut rx_a) = owner(1, 1);
        assert_eq!(map.claim("MN1", &a), None);
        assert!(map.downlink("MN1", req(1)).is_ok());
        // Full queue: handed back at once (the caller answers QnRtn=2).
        assert_eq!(map.downlink("MN1", req(2)).unwrap_err().bytes[0], 2);
        assert_eq!(rx_a.try_recv().unwrap().bytes[0], 1);
        // A reconnect takes the MN over: requests go to the new session.
        let (b, mut rx_b) = owner(2, 4);
        assert_eq!(map.claim("MN1", &b), Some(1));
        assert!(a.token.is_cancelled());
        assert!(map.downlink("MN1", req(3)).is_ok());
        assert_eq!(rx_b.try_recv().unwrap().bytes[0], 3);
        assert!(rx_a.try_recv().is_err());
        // Released: offline again; a session that ended cannot receive.
        assert!(map.release("MN1", 2));
        assert!(map.downlink("MN1", req(4)).is_err());
        let (c, rx_c) = owner(3, 4);
        assert!(map.claim_if_free("MN2", &c));
        drop(rx_c);
        assert!(map.downlink("MN2", req(5)).is_err(), "closed queue");
    }
}
