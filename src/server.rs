//! The listener: accept loop, connection limits, one task per session.
//!
//! Limits follow mini-redis: a semaphore permit is taken *before* accepting,
//! so beyond `max_connections` new devices wait in the kernel backlog rather
//! than being accepted and starved. The per-IP cap refuses outright (one
//! misconfigured NAT must not take every slot). Accept errors (EMFILE...)
//! back off instead of spinning.
//!
//! Behind an L4 load balancer (`proxy_protocol` on) every socket peer is the
//! balancer, so the per-IP cap and the session's `peer` use the address from
//! the PROXY header instead, and only sources in `proxy_trusted` may send one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::app::Shared;
use crate::metrics::{Metrics, Refusal};
use crate::proxy::{self, Accept, Cidr, Parsed};
use crate::session;

/// Bound listeners, ready to serve.
#[derive(Debug)]
pub struct Server {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Pending connections the kernel queues per listener (capped by
/// `net.core.somaxconn`). tokio's default of 1024 overflows when thousands of
/// devices reconnect at once (a gateway restart, a network blip): the kernel then
/// drops SYNs and each device waits out SYN retransmission (1 s, 3 s, 7 s ...).
const LISTEN_BACKLOG: i32 = 65_535;

/// Binds `addr` like `TcpListener::bind` (SO_REUSEADDR), with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

impl Server {
    /// Binds every `[server] listen` address (`override_listen` replaces them).
    pub async fn bind(shared: Arc<Shared>, addrs: &[SocketAddr]) -> std::io::Result<Server> {
        let mut listeners = Vec::with_capacity(addrs.len());
        for a in addrs {
            let l = listen(*a)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
            listeners.push(l);
        }
        let limit = Arc::new(Semaphore::new(shared.cfg.server.max_connections));
        Ok(Server {
            listeners,
            shared,
            limit,
            per_ip: Arc::default(),
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
        let cfg = &self.shared.cfg;
        let proxy = cfg.server.proxy_protocol.accept().map(|accept| {
            Arc::new(ProxyPolicy {
                accept,
                trusted: cfg.proxy_trusted(),
                timeout: cfg.server.proxy_header_timeout.0,
                max_header: cfg.server.proxy_max_header,
            })
        });
        for listener in self.listeners {
            let ctx = AcceptCtx {
                proxy: proxy.clone(),
                shared: self.shared.clone(),
                limit: self.limit.clone(),
                per_ip: self.per_ip.clone(),
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

/// `[server] proxy_*`, resolved once.
struct ProxyPolicy {
    accept: Accept,
    trusted: Vec<Cidr>,
    timeout: Duration,
    max_header: usize,
}

struct AcceptCtx {
    proxy: Option<Arc<ProxyPolicy>>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
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
                        self.shared.metrics.accept_errors.inc();
                        crate::log_repeated!(error, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            if let Some(policy) = &self.proxy {
                self.spawn_proxied(stream, peer, permit, policy.clone());
                continue;
            }
            let ip = peer.ip();
            if !admit(&self.per_ip, &self.shared, peer) {
                continue;
            }
            self.shared.metrics.accepted.inc();
            configure(&stream, &self.shared);
            // Spawned as is, not inside an `async` block: a block would keep its
            // own copy of everything it hands the session (see `session::run`).
            let held = Held::new(permit, self.per_ip.clone(), ip, &self.shared.metrics);
            self.tracker.spawn(session::run(
                self.shared.clone(),
                stream,
                peer,
                self.shutdown.clone(),
                held,
            ));
        }
    }

    /// A connection through the load balancer: refused unless its source is
    /// trusted; then its PROXY header is read (within `proxy_header_timeout`,
    /// on its own task so a slow header never holds up accepting), and only
    /// then is the per-IP cap applied, to the address the header names.
    fn spawn_proxied(
        &self,
        mut stream: TcpStream,
        sock_peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        policy: Arc<ProxyPolicy>,
    ) {
        if !proxy::trusted(&policy.trusted, sock_peer.ip()) {
            // Refused before a byte is read: an untrusted source must not be able
            // to claim an address, and serving it as a direct device would make
            // the log's peer depend on which path a device took.
            let refused = self.shared.metrics.refused(Refusal::ProxyUntrusted);
            if refused.is_power_of_two() {
                warn!(peer = %sock_peer, refused_total = refused, "connection refused: source not in proxy_trusted");
            }
            return;
        }
        let (shared, per_ip, shutdown) = (
            self.shared.clone(),
            self.per_ip.clone(),
            self.shutdown.clone(),
        );
        self.tracker.spawn(async move {
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(policy.timeout, read_proxy_header(&mut stream, &policy)) => r,
            };
            let header = match read {
                Ok(Ok(h)) => h,
                failed => {
                    let (reason, detail) = match failed {
                        Ok(Err(HeaderFailure::Proxy(e))) => (e.reason(), e.to_string()),
                        Ok(Err(HeaderFailure::Closed)) => ("closed", "closed before a complete header".into()),
                        Ok(Err(HeaderFailure::Io(e))) => ("io", e.to_string()),
                        _ => ("timeout", format!("no complete header within {:?}", policy.timeout)),
                    };
                    let refused = shared.metrics.refused(Refusal::ProxyHeader);
                    // Nothing was acked, so the device still holds its data and
                    // retransmits once the path is fixed; storing bytes whose
                    // sender is unknown would put a wrong peer in the log.
                    if refused.is_power_of_two() {
                        warn!(peer = %sock_peer, reason, error = %detail, refused_total = refused, "connection refused: bad PROXY header");
                    }
                    return;
                }
            };
            let peer = header.source.unwrap_or(sock_peer);
            if !admit(&per_ip, &shared, peer) {
                return;
            }
            shared.metrics.accepted.inc();
            debug!(%peer, via = %sock_peer, version = match header.version { proxy::Version::V1 => "1", proxy::Version::V2 => "2" }, "PROXY header accepted");
            configure(&stream, &shared);
            let held = Held::new(permit, per_ip, peer.ip(), &shared.metrics);
            session::run(shared, stream, peer, shutdown, held).await;
        });
    }
}

/// What a session holds from the listener while it lives: a connection
/// permit and a per-IP slot. Given back on drop, so also when the session's
/// task is dropped without finishing (runtime shutdown).
struct Held {
    _permit: OwnedSemaphorePermit,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
    /// Where the session counts as open.
    metrics: Arc<Metrics>,
}

impl Held {
    /// Takes over a slot [`admit`] granted; the session counts as open from here.
    fn new(
        permit: OwnedSemaphorePermit,
        per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
        metrics: &Arc<Metrics>,
    ) -> Held {
        metrics.sessions_open.inc();
        Held {
            _permit: permit,
            per_ip,
            ip,
            metrics: Arc::clone(metrics),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.metrics.sessions_open.dec();
        release(&self.per_ip, self.ip);
    }
}

/// Takes a per-IP slot for `peer`, or counts and (rate-limited) logs the refusal.
fn admit(per_ip: &Mutex<HashMap<IpAddr, usize>>, shared: &Shared, peer: SocketAddr) -> bool {
    let max = shared.cfg.server.max_per_ip;
    let mut m = per_ip.lock().unwrap_or_else(|e| e.into_inner());
    let n = m.entry(peer.ip()).or_insert(0);
    if *n >= max {
        let refused = shared.metrics.refused(Refusal::PerIp);
        // Rate-limit: a flood from one address logs at powers of two.
        if refused.is_power_of_two() {
            warn!(%peer, refused_total = refused, max_per_ip = max, "connection refused: per-IP limit");
        }
        return false;
    }
    *n += 1;
    true
}

/// Gives back the slot [`admit`] took.
fn release(per_ip: &Mutex<HashMap<IpAddr, usize>>, ip: IpAddr) {
    let mut m = per_ip.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = m.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            m.remove(&ip);
        }
    }
}

enum HeaderFailure {
    Proxy(proxy::ProxyError),
    Closed,
    Io(std::io::Error),
}

/// Reads the PROXY header and nothing more. It peeks, so HJ 212 bytes sent in
/// the same segment stay in the socket for the session to read, and consumes
/// exactly the header's length once it is complete.
async fn read_proxy_header(
    stream: &mut TcpStream,
    policy: &ProxyPolicy,
) -> Result<proxy::Header, HeaderFailure> {
    // Room for any v1 line and a v2 header with addresses and a few TLVs;
    // grown up to `max_header` only when a longer v2 header says so.
    let mut buf = vec![0u8; policy.max_header.clamp(proxy::V1_MAX, 256)];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut buf).await.map_err(HeaderFailure::Io)?;
        if n == 0 {
            return Err(HeaderFailure::Closed);
        }
        match proxy::parse(&buf[..n], policy.accept, policy.max_header) {
            Parsed::Header(h) => {
                let mut header = vec![0u8; h.len];
                stream
                    .read_exact(&mut header)
                    .await
                    .map_err(HeaderFailure::Io)?;
                return Ok(h);
            }
            Parsed::Error(e) => return Err(HeaderFailure::Proxy(e)),
            Parsed::NeedMore if n == buf.len() && buf.len() < policy.max_header => {
                buf.resize((buf.len() * 2).min(policy.max_header), 0);
            }
            Parsed::NeedMore => {
                // A peek that found data leaves the socket readable, so waiting
                // for readiness would spin; a header split across segments is
                // rare (the spec asks senders to send it at once), so poll with
                // a short, growing pause until the timeout.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
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
