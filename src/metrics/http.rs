//! The metrics listener: `GET /metrics` (Prometheus text 0.0.4) and `GET /healthz`.
//!
//! A deliberately small HTTP/1.1 responder instead of a framework: two GET
//! routes, one response per connection (`Connection: close`), a bounded request
//! head, a read deadline (`[metrics] head_timeout`) and a cap on concurrent
//! connections (`[metrics] max_connections`) that closes the oldest silent one
//! rather than make a health check wait. That is all a
//! Prometheus scraper or a load balancer health check needs, and it keeps the
//! dependency tree (and the attack surface facing the network) as it is.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Exposition, render_process};
use crate::app::Shared;
use crate::health::Health;
use crate::store::Reader;

/// Largest request head accepted (request line and headers).
const MAX_REQUEST: usize = 8 * 1024;
/// A client must take the response within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the response, how long (and how many bytes) we wait for the client to close.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;
/// Longest the store part of a scrape may take; after it the scrape answers
/// without store figures (and says so in `hj212_scrape_store_ok`).
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

const _: () = assert!(crate::alarm::DetectorKind::ALL.len() == super::ALARM_KINDS);

/// What a scrape reads besides the gateway's counters: the gateway's own
/// state (store handle, registry, config) and the frame log.
#[derive(Debug)]
pub struct Probe {
    shared: Arc<Shared>,
    db: PathBuf,
    /// Cursor names whose lag is reported (the enabled consumers).
    consumers: Vec<String>,
    /// True while the device listener's accept loop runs.
    serving: Arc<AtomicBool>,
    shutdown: CancellationToken,
    /// Consumers that stopped while serving.
    health: Arc<Health>,
    /// Reused read-only connection; one scrape at a time uses it.
    reader: Arc<Mutex<Option<Reader>>>,
}

/// Store-derived figures of one scrape.
#[derive(Debug, Default)]
struct StoreView {
    head: u64,
    cursors: Vec<(String, u64)>,
    alarms: Vec<(String, u64)>,
}

impl Probe {
    /// The probe of a gateway whose log is `db` and whose accept loop reports on `serving`.
    pub fn new(
        shared: Arc<Shared>,
        db: PathBuf,
        serving: Arc<AtomicBool>,
        shutdown: CancellationToken,
        health: Arc<Health>,
    ) -> Probe {
        let cfg = &shared.cfg;
        let mut consumers = Vec::new();
        if cfg.mqtt.enabled {
            consumers.push(crate::publish::mqtt::CURSOR.to_owned());
            consumers.push(crate::publish::mqtt::MERGE_CURSOR.to_owned());
        }
        for u in cfg.upstream.iter().filter(|u| u.enabled) {
            consumers.push(crate::publish::upstream::cursor_name(&u.name));
        }
        if cfg.alarms.enabled {
            consumers.push(crate::alarm::task::CURSOR.to_owned());
        }
        Probe {
            shared,
            db,
            consumers,
            serving,
            shutdown,
            health,
            reader: Arc::default(),
        }
    }

    /// `None` when healthy, else why not: shutting down, the listener stopped, the
    /// frame log's writer stopped or its commits fail (disk full, read-only, damaged
    /// file), or a consumer of the log stopped.
    pub fn unhealthy(&self) -> Option<String> {
        if self.shutdown.is_cancelled() {
            return Some("shutting down".into());
        }
        if !self.serving.load(Ordering::Relaxed) {
            return Some("device listener not accepting".into());
        }
        if !self.shared.store.writer_alive() {
            return Some("frame log writer stopped".into());
        }
        self.shared
            .store
            .problem()
            .or_else(|| self.health.problem())
    }

    /// `None` when another scrape is still reading (a slow disk must not pile
    /// up blocking threads behind the lock).
    fn read_store(&self) -> Option<Result<StoreView, crate::store::StoreError>> {
        let mut guard = match self.reader.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(Self::read_with(&mut guard, &self.db))
    }

    fn read_with(
        guard: &mut Option<Reader>,
        db: &std::path::Path,
    ) -> Result<StoreView, crate::store::StoreError> {
        if guard.is_none() {
            *guard = Some(Reader::open(db)?);
        }
        let r = guard.as_ref().expect("opened above");
        // Cursors before the head: the head only grows, so lag is never negative
        // even though the reads are separate transactions.
        let cursors = r.cursors();
        let view = cursors.and_then(|cursors| {
            Ok(StoreView {
                cursors,
                head: r.head()?.last_seq,
                alarms: r.active_alarms()?,
            })
        });
        if view.is_err() {
            // A broken connection is not reused.
            *guard = None;
        }
        view
    }

    /// The whole `/metrics` body.
    pub async fn render(self: &Arc<Self>) -> String {
        let started = Instant::now();
        let me = self.clone();
        let view = tokio::time::timeout(
            STORE_TIMEOUT,
            tokio::task::spawn_blocking(move || me.read_store()),
        )
        .await;
        let view = match view {
            Ok(Ok(Some(Ok(v)))) => Some(v),
            Ok(Ok(Some(Err(e)))) => {
                crate::log_repeated!(warn, error = %e, "metrics: cannot read the frame log");
                None
            }
            Ok(Ok(None)) => {
                debug!("metrics: previous frame log read still running; skipped");
                None
            }
            Ok(Err(_)) | Err(_) => {
                crate::log_repeated!(warn, "metrics: frame log read timed out");
                None
            }
        };
        let mut e = Exposition::new();
        self.shared.metrics.render(&mut e);
        self.render_state(&mut e, view.as_ref());
        render_process(&mut e);
        e.family(
            "hj212_scrape_duration_seconds",
            "gauge",
            "Time this scrape took to gather its figures.",
        );
        e.sample_f64(
            "hj212_scrape_duration_seconds",
            &[],
            started.elapsed().as_secs_f64(),
        );
        e.finish()
    }

    fn render_state(&self, e: &mut Exposition, view: Option<&StoreView>) {
        let cfg = &self.shared.cfg;
        e.family(
            "hj212_up",
            "gauge",
            "1 when the gateway is serving and its frame log writer is alive (see /healthz).",
        );
        e.sample("hj212_up", &[], u8::from(self.unhealthy().is_none()));
        e.family(
            "hj212_max_connections",
            "gauge",
            "[server] max_connections: beyond it devices wait in the kernel backlog.",
        );
        e.sample(
            "hj212_max_connections",
            &[],
            cfg.server.max_connections as u64,
        );
        e.family(
            "hj212_registry_devices",
            "gauge",
            "Devices in the registry (after the last reload).",
        );
        e.sample(
            "hj212_registry_devices",
            &[],
            self.shared.registry.current().len() as u64,
        );
        e.family(
            "hj212_device_mns_online",
            "gauge",
            "MNs with a live session.",
        );
        e.sample(
            "hj212_device_mns_online",
            &[],
            self.shared.sessions.len() as u64,
        );
        let dl = self.shared.sessions.devices.tracked();
        e.family(
            "hj212_downlink_tracked_devices",
            "gauge",
            "Devices the downlink keeps state for (QN clock, rate limits, series); registered=\"false\" is capped by [downlink] max_unregistered_devices.",
        );
        for (registered, n) in [("true", dl.registered), ("false", dl.unregistered)] {
            e.sample(
                "hj212_downlink_tracked_devices",
                &[("registered", registered)],
                n as u64,
            );
        }
        e.family(
            "hj212_alarm_tracked_devices",
            "gauge",
            "Devices the alarm detectors keep state for; registered=\"false\" (outside the registry and [alarms.device]) is capped by [alarms] max_unregistered_devices.",
        );
        for (registered, g) in [
            ("true", &self.shared.metrics.alarm_tracked_registered),
            ("false", &self.shared.metrics.alarm_tracked_unregistered),
        ] {
            e.sample(
                "hj212_alarm_tracked_devices",
                &[("registered", registered)],
                g.get(),
            );
        }
        e.family(
            "hj212_tracked_devices_evicted_total",
            "counter",
            "Unregistered devices whose state was forgotten to stay within a cap (state=\"alarms\": [alarms] max_unregistered_devices, their alarms ended; state=\"downlink\": [downlink] max_unregistered_devices).",
        );
        e.sample(
            "hj212_tracked_devices_evicted_total",
            &[("state", "alarms")],
            self.shared.metrics.alarm_evicted.get(),
        );
        e.sample(
            "hj212_tracked_devices_evicted_total",
            &[("state", "downlink")],
            dl.evicted,
        );
        e.family(
            "hj212_alarm_factors_untracked_total",
            "counter",
            "Values the alarm detectors did not judge because their device already had [alarms] max_factors_per_device factors.",
        );
        e.sample(
            "hj212_alarm_factors_untracked_total",
            &[],
            self.shared.metrics.alarm_untracked_factors.get(),
        );
        let latest = self.shared.checkpoint.get();
        e.family(
            "hj212_checkpoint_size",
            "gauge",
            "Tree size (records) of the latest signed checkpoint; 0 before the first.",
        );
        e.sample(
            "hj212_checkpoint_size",
            &[],
            latest.as_ref().map_or(0, |c| c.size),
        );
        e.family(
            "hj212_checkpoint_age_seconds",
            "gauge",
            "Seconds since the latest signed checkpoint was cut (absent before the first); grows past [evidence] checkpoint_interval only while the log is idle or signing fails.",
        );
        if let Some(c) = &latest {
            let age = chrono::Utc::now()
                .timestamp_millis()
                .saturating_sub(c.cut_at_ms)
                / 1000;
            e.sample("hj212_checkpoint_age_seconds", &[], age.max(0) as u64);
        }
        e.family(
            "hj212_checkpoint_interval_seconds",
            "gauge",
            "[evidence] checkpoint_interval: alert on hj212_checkpoint_age_seconds against a multiple of it.",
        );
        e.sample(
            "hj212_checkpoint_interval_seconds",
            &[],
            cfg.evidence.checkpoint_interval.0.as_secs(),
        );
        e.family(
            "hj212_checkpoint_failures_total",
            "counter",
            "Checkpoints that could not be signed, kept or appended to checkpoints.log.",
        );
        e.sample(
            "hj212_checkpoint_failures_total",
            &[],
            self.shared.checkpoint.cut_failures.get(),
        );
        let witnesses = self.shared.checkpoint.witnesses();
        e.family(
            "hj212_witness_cosignatures_total",
            "counter",
            "Checkpoints a [[evidence.witness]] cosigned.",
        );
        for (url, ok, _) in &witnesses {
            e.sample("hj212_witness_cosignatures_total", &[("witness", url)], *ok);
        }
        e.family(
            "hj212_witness_failures_total",
            "counter",
            "Submissions a [[evidence.witness]] refused or did not answer.",
        );
        for (url, _, failed) in &witnesses {
            e.sample("hj212_witness_failures_total", &[("witness", url)], *failed);
        }
        let stats = self.shared.store.stats();
        e.family(
            "hj212_store_queue_depth",
            "gauge",
            "Append calls waiting for the frame log writer.",
        );
        e.sample("hj212_store_queue_depth", &[], stats.queued as u64);
        e.family(
            "hj212_store_queue_capacity",
            "gauge",
            "[store] queue: append calls the writer queue holds before sessions wait.",
        );
        e.sample("hj212_store_queue_capacity", &[], cfg.store.queue as u64);
        e.family(
            "hj212_store_records_committed_total",
            "counter",
            "Records committed to the frame log since start.",
        );
        e.sample(
            "hj212_store_records_committed_total",
            &[],
            stats.records_committed,
        );
        e.family(
            "hj212_store_wal_pages",
            "gauge",
            "Pages in the frame log's WAL at the last background checkpoint; it starts over once all are copied back, so growth means a long read holds an old snapshot.",
        );
        e.sample("hj212_store_wal_pages", &[], stats.wal_pages);
        e.family(
            "hj212_store_failed_batches_total",
            "counter",
            "Frame log transactions rolled back (nothing in them acked).",
        );
        e.sample(
            "hj212_store_failed_batches_total",
            &[],
            stats.failed_batches,
        );
        e.family(
            "hj212_alarms_raised_total",
            "counter",
            "Alarms raised (stored) by the detectors since start, by detector.",
        );
        for (i, kind) in crate::alarm::DetectorKind::ALL.iter().enumerate() {
            e.sample(
                "hj212_alarms_raised_total",
                &[("kind", kind.as_str())],
                self.shared.metrics.alarms_raised(i),
            );
        }
        e.family(
            "hj212_scrape_store_ok",
            "gauge",
            "1 when this scrape could read the frame log (head, cursors, alarms).",
        );
        e.sample("hj212_scrape_store_ok", &[], u8::from(view.is_some()));
        let Some(v) = view else {
            return;
        };
        e.family(
            "hj212_store_head_seq",
            "gauge",
            "Last committed seq of the frame log.",
        );
        e.sample("hj212_store_head_seq", &[], v.head);
        if !self.consumers.is_empty() {
            e.family(
                "hj212_consumer_lag_records",
                "gauge",
                "Records in the log after a consumer's cursor (head seq minus cursor).",
            );
            for c in &self.consumers {
                let at = v
                    .cursors
                    .iter()
                    .find(|(n, _)| n == c)
                    .map_or(0, |(_, s)| *s);
                e.sample(
                    "hj212_consumer_lag_records",
                    &[("consumer", c)],
                    v.head.saturating_sub(at),
                );
            }
        }
        e.family(
            "hj212_alarms_active",
            "gauge",
            "Alarms raised and not yet cleared, by detector.",
        );
        for kind in crate::alarm::DetectorKind::ALL.map(|k| k.as_str()) {
            let n = v
                .alarms
                .iter()
                .find(|(k, _)| k == kind)
                .map_or(0, |(_, n)| *n);
            e.sample("hj212_alarms_active", &[("kind", kind)], n);
        }
    }
}

/// A bound metrics listener.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    max_connections: usize,
    head_timeout: Duration,
}

/// Connections still waiting for their request head, oldest first: the ones to
/// close when every slot is taken.
#[derive(Debug, Default)]
struct Waiting {
    next_id: u64,
    queue: VecDeque<(u64, CancellationToken)>,
}

impl MetricsServer {
    /// Binds `[metrics] listen`; the error names the key.
    pub async fn bind(cfg: &super::MetricsConfig) -> std::io::Result<MetricsServer> {
        let addr = cfg.addr().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "[metrics] listen: metrics are switched off",
            )
        })?;
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("[metrics] listen: cannot listen on {addr}: {e}"),
            )
        })?;
        Ok(MetricsServer {
            listener,
            max_connections: cfg.max_connections,
            head_timeout: cfg.head_timeout.0,
        })
    }

    /// The bound address (port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`.
    ///
    /// Each connection is its own task holding one of `max_connections` slots. The
    /// accept loop never waits on a client: when every slot is taken, the oldest
    /// connection that has not sent its request head yet is closed to make room.
    /// Scrapers and health checks send their head right after connecting, so idle
    /// or slow clients (slowloris) cannot hold `/healthz` back, however many.
    pub async fn run(self, probe: Arc<Probe>, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        crate::log_repeated!(warn, error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let victim = lock(&waiting).queue.pop_front();
                    if let Some((_, token)) = victim {
                        token.cancel();
                        probe.shared.metrics.metrics_connections_evicted.inc();
                    }
                    // The evicted task gives its slot back at once; without one
                    // (every slot is answering) wait at most a head timeout.
                    let wait =
                        tokio::time::timeout(self.head_timeout, slots.clone().acquire_owned());
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        p = wait => match p {
                            Ok(Ok(p)) => p,
                            Ok(Err(_)) => return,
                            Err(_) => {
                                crate::log_repeated!(warn, "metrics connection dropped: every [metrics] max_connections slot is answering");
                                continue;
                            }
                        },
                    }
                }
            };
            let token = shutdown.child_token();
            let id = {
                let mut w = lock(&waiting);
                w.next_id += 1;
                let id = w.next_id;
                w.queue.push_back((id, token.clone()));
                id
            };
            let (probe, waiting, head_timeout) =
                (probe.clone(), waiting.clone(), self.head_timeout);
            tokio::spawn(async move {
                let mut stream = stream;
                let head = tokio::select! {
                    _ = token.cancelled() => None,
                    h = read_head(&mut stream, head_timeout) => Some(h),
                };
                lock(&waiting).queue.retain(|(i, _)| *i != id);
                match head {
                    Some(Ok(head)) => {
                        if let Err(e) = respond(stream, head, &probe).await {
                            debug!(error = %e, "metrics request failed");
                        }
                    }
                    Some(Err(e)) => debug!(error = %e, "metrics request head not read"),
                    // Evicted for a newer connection.
                    None => {}
                }
                drop(permit);
            });
        }
    }
}

fn lock(w: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads one request head (bounded, with a deadline); `None` when it is too large.
async fn read_head(stream: &mut TcpStream, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(buf));
        }
        if buf.len() >= MAX_REQUEST {
            return Ok(None);
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timeout")
            })??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn respond(
    mut stream: TcpStream,
    head: Option<Vec<u8>>,
    probe: &Arc<Probe>,
) -> std::io::Result<()> {
    let (status, content_type, body, allow) = match head {
        None => (
            "431 Request Header Fields Too Large",
            "text/plain; charset=utf-8",
            "request head too large\n".to_owned(),
            false,
        ),
        Some(head) => {
            let line = head.split(|b| *b == b'\n').next().unwrap_or(&[]);
            let line = String::from_utf8_lossy(line);
            let mut parts = line.trim_end().split(' ');
            let method = parts.next().unwrap_or("");
            let target = parts.next().unwrap_or("");
            let path = target.split('?').next().unwrap_or("");
            match (method, path) {
                ("GET", "/metrics") => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    probe.render().await,
                    false,
                ),
                ("GET", "/healthz") => match probe.unhealthy() {
                    None => (
                        "200 OK",
                        "text/plain; charset=utf-8",
                        "ok\n".to_owned(),
                        false,
                    ),
                    Some(why) => (
                        "503 Service Unavailable",
                        "text/plain; charset=utf-8",
                        format!("{why}\n"),
                        false,
                    ),
                },
                // The latest signed checkpoint, exactly as signed (C2SP
                // tlog-checkpoint note): what a monitor polls and keeps.
                ("GET", "/checkpoint") => match probe.shared.checkpoint.get() {
                    Some(cp) => (
                        "200 OK",
                        "text/plain; charset=utf-8",
                        cp.note.clone(),
                        false,
                    ),
                    None => (
                        "404 Not Found",
                        "text/plain; charset=utf-8",
                        "no checkpoint signed yet\n".to_owned(),
                        false,
                    ),
                },
                (_, "/metrics" | "/healthz" | "/checkpoint") => (
                    "405 Method Not Allowed",
                    "text/plain; charset=utf-8",
                    "only GET\n".to_owned(),
                    true,
                ),
                _ => (
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    "not found; try /metrics, /healthz or /checkpoint\n".to_owned(),
                    false,
                ),
            }
        }
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if allow {
        out.push_str("Allow: GET\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(out.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response write timeout"))??;
    // Closing with unread request bytes would make the kernel reset the
    // connection and could discard the response before the client reads it:
    // read (bounded) until the client closes.
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    Ok(())
}
