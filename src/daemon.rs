//! `serve`: wires the store, registry, listener and signals together.
//!
//! Shutdown is one token and one tracker: SIGTERM/SIGINT cancel the token,
//! the listener stops accepting, sessions finish the batch in flight (append,
//! commit, ack) and close; after the grace period the store drains, commits,
//! checkpoints and the process exits 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::app::{SessionMap, Shared};
use crate::config::{self, Config, ConfigError};
use crate::health::{self, Health};
use crate::metrics::http::{MetricsServer, Probe};
use crate::publish::mqtt::{self, MqttSettings};
use crate::publish::presence::Presence;
use crate::publish::upstream;
use crate::registry::{Registry, SharedRegistry};
use crate::server::Server;
use crate::store::{Store, StoreConfig, StoreHandle, SyncMode, WriterJoin};
use crate::systemd;

/// Why `serve` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration (exit 78).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The frame log could not be opened.
    #[error("frame log: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Binding or another I/O failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Command-line overrides of `serve`.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Config file.
    pub config: Option<PathBuf>,
    /// `--listen`, replacing `[server] listen`.
    pub listen: Vec<SocketAddr>,
    /// `--data`.
    pub data: Option<PathBuf>,
}

/// Resolves the data directory: flag, then `$STATE_DIRECTORY` (systemd), then `./data`.
pub fn data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_owned();
    }
    if let Some(s) = std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several colon-separated directories; the first is ours.
        if let Some(first) = s
            .to_string_lossy()
            .split(':')
            .next()
            .filter(|x| !x.is_empty())
        {
            return PathBuf::from(first);
        }
    }
    PathBuf::from("data")
}

/// Loads the config named by the overrides (or the defaults).
pub fn load_config(o: &Overrides) -> Result<Config, ConfigError> {
    match &o.config {
        Some(p) => Config::load(p),
        None => Config::parse("", Path::new("<defaults>")),
    }
}

/// A running gateway (used by `serve` and by tests).
#[derive(Debug)]
pub struct Running {
    /// Bound addresses.
    pub addrs: Vec<SocketAddr>,
    /// Where `/metrics` and `/healthz` are served (`None`: `[metrics]` is off).
    pub metrics_addr: Option<SocketAddr>,
    /// Cancel to shut down.
    pub shutdown: CancellationToken,
    /// Shared state (store handle, registry, config).
    pub shared: Arc<Shared>,
    tracker: TaskTracker,
    publisher: Option<tokio::task::JoinHandle<()>>,
    upstreams: Vec<tokio::task::JoinHandle<()>>,
    detector: Option<tokio::task::JoinHandle<()>>,
    metrics: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    control: tokio::task::JoinHandle<()>,
    /// The operator control socket (`command`, `sessions`).
    pub control_path: PathBuf,
    writer: WriterJoin,
    config_path: Option<PathBuf>,
}

/// Opens the store and binds the listeners; sessions start immediately.
pub async fn start(cfg: Config, o: &Overrides) -> Result<Running, ServeError> {
    crate::telemetry::set_repeat_interval(cfg.log.repeat_interval.0);
    let data = data_dir(o.data.as_deref());
    let registry = Registry::from_config(&cfg)?;
    let store_path = cfg.store_path(&data);
    let store_cfg = StoreConfig {
        path: store_path.clone(),
        sync: match cfg.store.sync {
            config::Sync::Full => SyncMode::Full,
            config::Sync::Normal => SyncMode::Normal,
            config::Sync::Off => SyncMode::Off,
        },
        batch_max: cfg.store.batch_max,
        batch_delay: cfg.store.batch_delay.0,
        queue: cfg.store.queue,
        feed_records: cfg.store.feed_records,
        writer_boost: cfg.store.writer_boost,
        check_tail: cfg.store.check_tail,
    };
    let (store, writer): (StoreHandle, WriterJoin) =
        tokio::task::spawn_blocking(move || Store::open(store_cfg))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
    let listen: Vec<SocketAddr> = if o.listen.is_empty() {
        cfg.server
            .listen
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    } else {
        o.listen.clone()
    };
    let devices = registry.len();
    // Files named by [mqtt] (password, CA, client cert) are read now: a bad one
    // stops the start with the key named, instead of failing later in the background.
    let mqtt = if cfg.mqtt.enabled {
        let path = o
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("<defaults>"));
        let mut m = MqttSettings::from_config(&cfg.mqtt, &path)?;
        m.crash_loop_starts = cfg.store.crash_loop_starts;
        Some(m)
    } else {
        None
    };
    let presence = mqtt.as_ref().map(|_| Arc::new(Presence::default()));
    // Before devices can connect: `start = "now"` is the end of the log as it is now.
    let entries: Vec<_> = cfg.upstream.iter().filter(|u| u.enabled).cloned().collect();
    let db = store_path.clone();
    tokio::task::spawn_blocking(move || {
        entries
            .iter()
            .try_for_each(|u| upstream::prepare_cursor(&db, u).map(drop))
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;
    let registry = Arc::new(SharedRegistry::new(registry));
    let mut sessions = SessionMap::default();
    sessions.devices = crate::downlink::Devices::new(
        Some(registry.clone()),
        cfg.downlink.max_unregistered_devices,
    );
    let shared = Arc::new(Shared {
        cfg,
        registry,
        store,
        sessions,
        next_id: AtomicU64::new(1),
        presence: presence.clone(),
    });
    let server = Server::bind(shared.clone(), &listen).await?;
    let control =
        crate::downlink::control::Control::bind(&shared.cfg.downlink.socket_path(&data)).await?;
    let control_path = control.path().to_owned();
    let addrs = server.local_addrs();
    let metrics_server = match shared.cfg.metrics.addr() {
        Some(_) => Some(MetricsServer::bind(&shared.cfg.metrics).await?),
        None => None,
    };
    let metrics_addr = metrics_server
        .as_ref()
        .map(MetricsServer::local_addr)
        .transpose()?;
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let health = Arc::new(Health::default());
    crate::metrics::METRICS.mark_start();
    info!(listen = ?addrs, data = %data.display(), store = %store_path.display(), devices, "listening");
    let (t, s) = (tracker.clone(), shutdown.clone());
    // /healthz reports unhealthy once the accept loop has ended, whatever the cause.
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let accepting = serving.clone();
    tracker.spawn(async move {
        server.run(s, t).await;
        accepting.store(false, std::sync::atomic::Ordering::Relaxed);
    });
    let metrics = if let Some(m) = metrics_server {
        let probe = Arc::new(Probe::new(
            shared.clone(),
            store_path.clone(),
            serving,
            shutdown.clone(),
            health.clone(),
        ));
        info!(metrics = ?metrics_addr, "metrics listening");
        // Outside the tracker and on its own token: /healthz keeps answering 503
        // while sessions drain, so a load balancer stops sending devices here.
        let stop = CancellationToken::new();
        Some((stop.clone(), tokio::spawn(m.run(probe, stop))))
    } else {
        None
    };
    // The publisher only reads the log (its own connections), so it neither slows
    // ingest nor needs the store handle; it stops on the same token.
    let publisher = match (mqtt, presence) {
        (Some(settings), Some(presence)) => Some(health::watch(
            "MQTT publisher".into(),
            mqtt::spawn(
                settings,
                store_path.clone(),
                shared.store.feed(),
                presence,
                shutdown.child_token(),
            ),
            shutdown.clone(),
            health.clone(),
        )),
        _ => None,
    };
    // Forwarders append what platforms send them, so they get the shared state
    // (store handle, registry) and must stop before the store does.
    let names: Arc<Vec<String>> =
        Arc::new(shared.cfg.upstream.iter().map(|u| u.name.clone()).collect());
    let upstreams = shared
        .cfg
        .upstream
        .iter()
        .filter(|u| u.enabled)
        .map(|u| {
            health::watch(
                format!("upstream {}", u.name),
                upstream::spawn(
                    u.clone(),
                    names.clone(),
                    shared.clone(),
                    store_path.clone(),
                    shutdown.child_token(),
                ),
                shutdown.clone(),
                health.clone(),
            )
        })
        .collect();
    // The detector, like the publisher, only reads the log behind its own cursor and
    // writes its own tables; the store writer never waits for it.
    let detector = shared.cfg.alarms.enabled.then(|| {
        health::watch(
            "alarm detector".into(),
            crate::alarm::task::spawn(
                shared.cfg.alarms.clone(),
                store_path.clone(),
                shared.store.feed(),
                shared.registry.clone(),
                shared.cfg.store.crash_loop_starts,
                shutdown.child_token(),
            ),
            shutdown.clone(),
            health.clone(),
        )
    });
    // Operators reach devices through their sessions; stops (and removes the
    // socket) on the same token.
    let control = control.spawn(shared.clone(), shutdown.child_token());
    Ok(Running {
        control,
        control_path,
        addrs,
        metrics_addr,
        metrics,
        detector,
        shutdown,
        shared,
        tracker,
        publisher,
        upstreams,
        writer,
        config_path: o.config.clone(),
    })
}

impl Running {
    /// Re-reads the registry from the config file (SIGHUP). A bad file keeps
    /// the old registry.
    pub fn reload(&self) {
        let result = match &self.config_path {
            Some(p) => Config::load(p).and_then(|c| Registry::from_config(&c)),
            None => Registry::from_config(&self.shared.cfg),
        };
        match result {
            Ok(r) => {
                let devices = r.len();
                // Log only once the new registry is in effect: whoever waits for
                // this line must not still meet the old rules.
                self.shared.registry.replace(r);
                info!(devices, "registry reloaded");
            }
            Err(e) => error!(error = %e, "registry reload failed; keeping the previous registry"),
        }
    }

    /// Stops accepting, lets sessions finish within the grace period, then
    /// drains and closes the frame log.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        self.tracker.close();
        let grace = self.shared.cfg.server.shutdown_grace.0;
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                grace_s = grace.as_secs(),
                "sessions still open after the grace period; closing anyway"
            );
        }
        if tokio::time::timeout(Duration::from_secs(5), self.control)
            .await
            .is_err()
        {
            warn!("control socket did not stop in time");
        }
        if let Some(d) = self.detector {
            // Each step commits its events with the cursor, so stopping between steps
            // loses nothing; a step in flight is short (one page).
            if tokio::time::timeout(Duration::from_secs(10), d)
                .await
                .is_err()
            {
                warn!("alarm detector did not stop in time");
            }
        }
        if let Some(p) = self.publisher {
            // Bounded inside: at most a couple of seconds to get in-flight PUBACKs.
            if tokio::time::timeout(Duration::from_secs(10), p)
                .await
                .is_err()
            {
                warn!("MQTT publisher did not stop in time");
            }
        }
        for u in self.upstreams {
            // A forwarder stops between frames; it may be mid-append of a platform frame.
            if tokio::time::timeout(Duration::from_secs(10), u)
                .await
                .is_err()
            {
                warn!("upstream forwarder did not stop in time");
            }
        }
        self.shared.store.shutdown().await;
        let writer = self.writer;
        let joined = tokio::task::spawn_blocking(move || writer.join()).await;
        if let Some((stop, task)) = self.metrics {
            stop.cancel();
            let _ = task.await;
        }
        let stats = joined.map_err(|e| std::io::Error::other(e.to_string()))??;
        info!(
            records = stats.records_committed,
            commits = stats.commits,
            "frame log closed"
        );
        Ok(())
    }
}

/// `serve`: runs until SIGTERM/SIGINT.
pub async fn serve(o: Overrides) -> Result<(), ServeError> {
    let cfg = load_config(&o)?;
    // Raw frames hold device passwords: whatever serve creates (data directory, log,
    // its -wal/-shm, the control socket before its chmod) is not world-readable,
    // also outside systemd's UMask=. The store sets 0750/0640 explicitly as well.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o027));
    // A file size limit (ulimit -f, LimitFSIZE=) must fail a commit like a full
    // disk does (health 503, nothing acked), not kill the process with SIGXFSZ.
    let _xfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(
        rustix::process::Signal::XFSZ.as_raw(),
    ))?;
    // Handlers go in before we announce ourselves (log line, READY=1): a SIGHUP
    // or SIGTERM sent right after must not meet the default action (terminate).
    let signals = Signals::install()?;
    let running = start(cfg, &o).await?;
    systemd::ready(&format!("listening on {:?}", running.addrs));
    systemd::spawn_watchdog(running.shutdown.clone());
    signals.wait(&running).await;
    info!("shutting down");
    systemd::stopping();
    running.stop().await
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn wait(mut self, running: &Running) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => running.reload(),
            }
        }
    }
}
