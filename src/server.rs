//! The listener: accept loop, connection limits, one task per session.
//!
//! Limits follow mini-redis: a semaphore permit is taken *before* accepting,
//! so beyond `max_connections` new devices wait in the kernel backlog rather
//! than being accepted and starved. The per-IP cap refuses outright (one
//! misconfigured NAT must not take every slot). Accept errors (EMFILE...)
//! back off instead of spinning.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::metrics::{METRICS, Refusal};
use crate::session::{self, Shared};

/// Counters of connection handling.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused by the per-IP cap.
    pub refused_per_ip: AtomicU64,
    /// Accept errors.
    pub accept_errors: AtomicU64,
}

/// Bound listeners, ready to serve.
#[derive(Debug)]
pub struct Server {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Connection counters.
    pub stats: Arc<ServerStats>,
}

impl Server {
    /// Binds every `[server] listen` address (`override_listen` replaces them).
    pub async fn bind(shared: Arc<Shared>, addrs: &[SocketAddr]) -> std::io::Result<Server> {
        let mut listeners = Vec::with_capacity(addrs.len());
        for a in addrs {
            let l = TcpListener::bind(a)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
            listeners.push(l);
        }
        let limit = Arc::new(Semaphore::new(shared.cfg.server.max_connections));
        Ok(Server {
            listeners,
            shared,
            limit,
            per_ip: Arc::default(),
            stats: Arc::default(),
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Accepts until `shutdown`; sessions are spawned on `tracker`.
    pub async fn run(self, shutdown: CancellationToken, tracker: TaskTracker) {
        let mut accept_tasks = Vec::new();
        for listener in self.listeners {
            let ctx = AcceptCtx {
                shared: self.shared.clone(),
                limit: self.limit.clone(),
                per_ip: self.per_ip.clone(),
                stats: self.stats.clone(),
                tracker: tracker.clone(),
                shutdown: shutdown.clone(),
            };
            accept_tasks.push(tokio::spawn(ctx.accept_loop(listener)));
        }
        for t in accept_tasks {
            let _ = t.await;
        }
    }
}

struct AcceptCtx {
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    stats: Arc<ServerStats>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl AcceptCtx {
    async fn accept_loop(self, listener: TcpListener) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let permit = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                p = self.limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let (stream, peer) = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => { backoff = Duration::from_millis(10); x }
                    Err(e) => {
                        self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                        METRICS.accept_errors.inc();
                        error!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            let ip = peer.ip();
            {
                let mut m = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
                let n = m.entry(ip).or_insert(0);
                if *n >= self.shared.cfg.server.max_per_ip {
                    let refused = self.stats.refused_per_ip.fetch_add(1, Ordering::Relaxed) + 1;
                    METRICS.refused(Refusal::PerIp);
                    // Rate-limit: a flood from one address logs at powers of two.
                    if refused.is_power_of_two() {
                        warn!(%peer, refused_total = refused, max_per_ip = self.shared.cfg.server.max_per_ip, "connection refused: per-IP limit");
                    }
                    continue;
                }
                *n += 1;
            }
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            METRICS.accepted.inc();
            configure(&stream, &self.shared);
            let shared = self.shared.clone();
            let per_ip = self.per_ip.clone();
            let shutdown = self.shutdown.clone();
            self.tracker.spawn(async move {
                METRICS.sessions_open.inc();
                session::run(shared, stream, peer, shutdown).await;
                METRICS.sessions_open.dec();
                drop(permit);
                let mut m = per_ip.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(n) = m.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(&ip);
                    }
                }
            });
        }
    }
}

fn configure(stream: &TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(shared.cfg.server.tcp_keepalive.0)
        .with_interval(Duration::from_secs(10));
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        info!(error = %e, "could not enable TCP keepalive");
    }
}
