//! `serve`: wires the store, registry, listener and signals together.
//!
//! Shutdown is one token, two trackers and one deadline. SIGTERM/SIGINT cancel
//! the token: the listener stops accepting, sessions finish the batch in flight
//! (append, commit, ack) and close, consumers (MQTT, upstreams, alarms, the
//! control socket) stop between steps and persist their cursors. The deadline is
//! computed once, when the stop begins, and split in two named shares:
//!
//! - `[server] shutdown_grace` for the tasks: the stop waits for the sessions
//!   first (a session acks only after commit, so it must end before the log
//!   closes), then for the consumers, which stopped in parallel meanwhile, each
//!   wait taking only what is left of the grace. A task still running at the end
//!   of the grace is logged by name and left behind (a consumer resumes from its
//!   last saved cursor at the next start: at-least-once, nothing lost).
//! - [`STORE_DRAIN_RESERVE`] after it for the frame log: queued appends commit,
//!   the chain head is written, the WAL is checkpointed. The drain is never cut
//!   short (an unwritten chain head is a damaged-looking tail at the next start);
//!   one that overruns its reserve is logged and waited for.
//!
//! So a stop takes at most `shutdown_grace + STORE_DRAIN_RESERVE`, which
//! `check-config` compares with the packaged unit's `TimeoutStopSec`
//! ([`stop_timeout_warning`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::app::{SessionMap, Shared};
use crate::config::{self, Config, ConfigError};
use crate::health::{self, Health};
use crate::metrics::Metrics;
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
    /// A directory, file or address `serve` needs cannot be used: the data
    /// directory is a file or not writable, the listen address is taken
    /// (exit 2). `what` names the path or the config key.
    #[error("{what}: {source}")]
    Unusable {
        /// The path or key, and where it came from.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another I/O failure (a signal handler, a task that panicked).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The checkpoint signing key could not be read or written, or `[evidence]
    /// origin` is unusable.
    #[error("evidence: {0}")]
    Notary(#[from] crate::notary::NotaryError),
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

/// The data directory of the packaged unit (`StateDirectory=hj212-gateway`).
pub const PACKAGED_STATE_DIR: &str = "/var/lib/hj212-gateway";

/// The runtime directory of the packaged unit (`RuntimeDirectory=hj212-gateway`),
/// where its control socket is.
pub const PACKAGED_RUNTIME_DIR: &str = "/run/hj212-gateway";

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

/// Where the data directory came from, for messages: an operator who did not
/// pass `--data` needs to know which default was taken.
fn data_dir_origin(flag: Option<&Path>) -> &'static str {
    if flag.is_some() {
        "--data"
    } else if std::env::var_os("STATE_DIRECTORY").is_some_and(|s| !s.is_empty()) {
        "$STATE_DIRECTORY"
    } else {
        "the default ./data"
    }
}

/// Creates the data directory (0750) if missing and checks that this process can
/// write in it and in the log file. SQLite reports the same problems as "unable to
/// open database file" without the path or the OS error; checked here they name
/// both, and `serve` exits 2 instead of 70.
fn prepare_data_dir(data: &Path, origin: &str, store_path: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::DirBuilderExt;
    let unusable = |what: String| move |source| ServeError::Unusable { what, source };
    let what = format!("data directory {} ({origin})", data.display());
    match std::fs::metadata(data) {
        Ok(m) if !m.is_dir() => {
            return Err(unusable(what)(rustix::io::Errno::NOTDIR.into()));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(data)
            .map_err(unusable(what.clone()))?,
        Err(e) => return Err(unusable(what)(e)),
    }
    let rwx = rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK;
    let search = rustix::fs::Access::EXEC_OK;
    rustix::fs::access(data, rwx | search).map_err(|e| unusable(what)(e.into()))?;
    if let Some(dir) = store_path.parent().filter(|d| *d != data && d.is_dir()) {
        rustix::fs::access(dir, rwx | search).map_err(|e| {
            unusable(format!("[store] path: directory {}", dir.display()))(e.into())
        })?;
    }
    if store_path.exists() {
        rustix::fs::access(store_path, rwx)
            .map_err(|e| unusable(format!("frame log {}", store_path.display()))(e.into()))?;
    }
    Ok(())
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
    /// The accept loop and the sessions.
    tracker: TaskTracker,
    /// Everything else that stops on `shutdown`: publisher, forwarders, detector,
    /// control socket.
    consumers: Consumers,
    metrics: Option<(CancellationToken, JoinHandle<()>)>,
    /// The operator control socket (`command`, `sessions`).
    pub control_path: PathBuf,
    writer: WriterJoin,
    /// Signs the last checkpoint once the log has drained.
    notary: Arc<Mutex<crate::notary::Notary>>,
    config_path: Option<PathBuf>,
}

/// Opens the store and binds the listeners; sessions start immediately.
pub async fn start(cfg: Config, o: &Overrides) -> Result<Running, ServeError> {
    crate::telemetry::set_repeat_interval(cfg.log.repeat_interval.0);
    let data = data_dir(o.data.as_deref());
    let registry = Registry::from_config(&cfg)?;
    let store_path = cfg.store_path(&data);
    prepare_data_dir(&data, data_dir_origin(o.data.as_deref()), &store_path)?;
    // One registry per gateway, handed to everything that counts (see `App::metrics`).
    let metrics = Arc::new(Metrics::new());
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
        metrics: Arc::clone(&metrics),
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
    // The alarm detector starts at the head too: written here, the frames that
    // arrive before its thread has opened the log are still ahead of it.
    let entries: Vec<_> = cfg.upstream.iter().filter(|u| u.enabled).cloned().collect();
    let alarms = cfg.alarms.enabled;
    let db = store_path.clone();
    tokio::task::spawn_blocking(move || {
        entries
            .iter()
            .try_for_each(|u| upstream::prepare_cursor(&db, u).map(drop))?;
        if alarms {
            crate::store::follower::prepare(
                &db,
                crate::alarm::task::CURSOR,
                crate::store::follower::Start::Head,
            )?;
        }
        Ok::<(), crate::store::StoreError>(())
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;
    // After the store opened (and so migrated) the log; before devices connect,
    // so a key that cannot be read or written stops the start with its path named.
    let checkpoint = Arc::new(crate::notary::Latest::default());
    let notary = {
        let (cfg, data, db, latest) = (
            cfg.clone(),
            data.clone(),
            store_path.clone(),
            Arc::clone(&checkpoint),
        );
        tokio::task::spawn_blocking(move || crate::notary::Notary::open(&cfg, &data, &db, latest))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??
    };
    let notary = Arc::new(Mutex::new(notary));
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
        metrics,
        checkpoint,
    });
    let listen_key = if o.listen.is_empty() {
        match &o.config {
            Some(p) => format!("[server] listen in {}", p.display()),
            None => "[server] listen (default)".to_owned(),
        }
    } else {
        "--listen".to_owned()
    };
    let server = Server::bind(shared.clone(), &listen)
        .await
        .map_err(|source| ServeError::Unusable {
            what: listen_key,
            source,
        })?;
    let control = crate::downlink::control::Control::bind(&shared.cfg.downlink.socket_path(&data))
        .await
        .map_err(|source| ServeError::Unusable {
            what: "[downlink] control_socket".to_owned(),
            source,
        })?;
    let control_path = control.path().to_owned();
    let addrs = server.local_addrs();
    let metrics_server = match shared.cfg.metrics.addr() {
        Some(_) => Some(
            MetricsServer::bind(&shared.cfg.metrics)
                .await
                .map_err(|source| ServeError::Unusable {
                    what: "metrics endpoint".to_owned(),
                    source,
                })?,
        ),
        None => None,
    };
    let metrics_addr = metrics_server
        .as_ref()
        .map(MetricsServer::local_addr)
        .transpose()?;
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let health = Arc::new(Health::default());
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
        if let Some(addr) = metrics_addr {
            info!(metrics = %addr, "metrics listening");
        }
        // Outside the tracker and on its own token: /healthz keeps answering 503
        // while sessions drain, so a load balancer stops sending devices here.
        let stop = CancellationToken::new();
        Some((stop.clone(), tokio::spawn(m.run(probe, stop))))
    } else {
        None
    };
    // The publisher only reads the log (its own connections), so it neither slows
    // ingest nor needs the store handle; it stops on the same token.
    let consumers = Consumers::default();
    if let (Some(settings), Some(presence)) = (mqtt, presence) {
        consumers.watched(
            "MQTT publisher",
            mqtt::spawn(
                settings,
                store_path.clone(),
                shared.store.feed(),
                presence,
                shutdown.child_token(),
            ),
            &shutdown,
            &health,
        );
    }
    // Forwarders append what platforms send them, so they get the shared state
    // (store handle, registry) and must stop before the store does.
    let names: Arc<Vec<String>> =
        Arc::new(shared.cfg.upstream.iter().map(|u| u.name.clone()).collect());
    for u in shared.cfg.upstream.iter().filter(|u| u.enabled) {
        consumers.watched(
            &format!("upstream {}", u.name),
            upstream::spawn(
                u.clone(),
                names.clone(),
                shared.clone(),
                store_path.clone(),
                shutdown.child_token(),
            ),
            &shutdown,
            &health,
        );
    }
    // The detector, like the publisher, only reads the log behind its own cursor and
    // writes its own tables; the store writer never waits for it.
    if shared.cfg.alarms.enabled {
        consumers.watched(
            "alarm detector",
            crate::alarm::task::spawn(
                shared.cfg.alarms.clone(),
                store_path.clone(),
                shared.store.feed(),
                shared.registry.clone(),
                shared.cfg.store.crash_loop_starts,
                shutdown.child_token(),
            ),
            &shutdown,
            &health,
        );
    }
    // Checkpoints are read from the log by whoever publishes them (the MQTT
    // publisher, /checkpoint); the notary only signs and keeps them. Its last cut
    // waits for the log to drain (`Running::stop`).
    let witnesses = shared
        .cfg
        .evidence
        .witness
        .iter()
        .map(|w| crate::evidence::witness::WitnessEntry {
            url: w.url.clone(),
            vkey: w.vkey.clone(),
            timeout: w.timeout.0,
        })
        .collect();
    // A second copy of the key for tombstones: a seal can take minutes, and the
    // notary must not wait for it to sign the next checkpoint.
    let tombstone_key = crate::evidence::key::SigningKey::load(
        &shared.cfg.evidence.key_path(&data),
    )
    .map(Arc::new)
    .map_err(|e| warn!(error = %e, "retention cannot sign tombstones; it will not delete archives"))
    .ok();
    consumers.track(
        "archiver".into(),
        tokio::spawn(crate::archiver::run(
            store_path.clone(),
            shared.cfg.store.archive_policy(),
            tombstone_key,
            Arc::clone(&shared.metrics),
            shutdown.child_token(),
        )),
    );
    consumers.track(
        "notary".into(),
        tokio::spawn(crate::notary::run(
            Arc::clone(&notary),
            shared.cfg.evidence.checkpoint_interval.0,
            witnesses,
            shutdown.child_token(),
        )),
    );
    // Operators reach devices through their sessions; stops (and removes the
    // socket) on the same token.
    consumers.track(
        "control socket".into(),
        control.spawn(shared.clone(), shutdown.child_token()),
    );
    Ok(Running {
        control_path,
        addrs,
        metrics_addr,
        metrics,
        shutdown,
        shared,
        tracker,
        consumers,
        writer,
        notary,
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

    /// Stops accepting and stops every task within one deadline (see the module
    /// doc): sessions, then consumers, within `[server] shutdown_grace`; then the
    /// frame log drains and closes within [`STORE_DRAIN_RESERVE`].
    pub async fn stop(self) -> Result<(), ServeError> {
        let deadline = StopDeadline::from_now(self.shared.cfg.server.shutdown_grace.0);
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout_at(deadline.tasks, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                grace_s = deadline.grace.as_secs(),
                sessions = self.tracker.len(),
                "sessions still open after the grace period; closing anyway"
            );
        }
        self.consumers.stop_by(deadline.tasks).await;
        let writer = self.writer;
        let store = self.shared.store.clone();
        let drain = async move {
            store.shutdown().await;
            tokio::task::spawn_blocking(move || writer.join()).await
        };
        let mut drain = std::pin::pin!(drain);
        let joined = match tokio::time::timeout_at(deadline.end, &mut drain).await {
            Ok(j) => j,
            Err(_) => {
                warn!(
                    reserve_s = STORE_DRAIN_RESERVE.as_secs(),
                    "frame log still draining after its share of the shutdown deadline; waiting for it to write the chain head"
                );
                drain.await
            }
        };
        if let Some((stop, task)) = self.metrics {
            stop.cancel();
            // An answer in flight gets what is left of the deadline, the task at least one poll.
            let _ = tokio::time::timeout_at(deadline.end, task).await;
        }
        let stats = joined.map_err(|e| std::io::Error::other(e.to_string()))??;
        // Everything is committed now: the last checkpoint covers every record.
        let notary = self.notary;
        let _ = tokio::task::spawn_blocking(move || crate::notary::final_cut(&notary)).await;
        info!(
            records = stats.records_committed,
            commits = stats.commits,
            "frame log closed"
        );
        Ok(())
    }
}

/// What the frame log's drain is given of the stop deadline, after `[server]
/// shutdown_grace`: the writer commits what is queued (at most `[store] queue`
/// records, a few batches), writes the chain head and checkpoints the WAL, which
/// the writer keeps short while serving (tens of MB at most), so this is a wide
/// bound on a healthy disk.
pub const STORE_DRAIN_RESERVE: Duration = Duration::from_secs(5);

/// One stop's deadline, computed once when the stop begins.
#[derive(Debug, Clone, Copy)]
struct StopDeadline {
    /// `[server] shutdown_grace`.
    grace: Duration,
    /// Until when sessions and consumers may run: the grace's end.
    tasks: tokio::time::Instant,
    /// Until when the frame log may drain: `tasks` plus [`STORE_DRAIN_RESERVE`].
    end: tokio::time::Instant,
}

impl StopDeadline {
    fn from_now(grace: Duration) -> StopDeadline {
        let tasks = tokio::time::Instant::now() + grace;
        StopDeadline {
            grace,
            tasks,
            end: tasks + STORE_DRAIN_RESERVE,
        }
    }
}

/// The tasks that stop on the shutdown token besides the sessions, on one
/// [`TaskTracker`] so that the stop waits for all of them at once (in parallel,
/// not one timeout after another), with their names so that those cut short by
/// the deadline are logged by name.
#[derive(Debug, Default)]
struct Consumers {
    tracker: TaskTracker,
    /// Names of the tasks still running; a name may repeat (it is a multiset).
    running: Arc<Mutex<Vec<String>>>,
}

impl Consumers {
    /// Tracks `task` under `name` until it ends.
    fn track(&self, name: String, task: JoinHandle<()>) {
        lock(&self.running).push(name.clone());
        let running = Arc::clone(&self.running);
        self.tracker.spawn(async move {
            // A panic was reported by whoever watches the task; here it only ended.
            let _ = task.await;
            let mut r = lock(&running);
            if let Some(i) = r.iter().position(|n| *n == name) {
                r.swap_remove(i);
            }
        });
    }

    /// Tracks a consumer whose end while serving `/healthz` reports ([`health::watch`]).
    fn watched(
        &self,
        name: &str,
        task: JoinHandle<()>,
        shutdown: &CancellationToken,
        health: &Arc<Health>,
    ) {
        let watched = health::watch(name.into(), task, shutdown.clone(), health.clone());
        self.track(name.into(), watched);
    }

    /// Waits until every tracked task has ended or `deadline`; logs each one
    /// still running by name (it is left behind, and dropped with the runtime).
    async fn stop_by(self, deadline: tokio::time::Instant) {
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return;
        }
        let mut late = lock(&self.running).clone();
        late.sort();
        for task in late {
            warn!(%task, "did not stop in time; cut short at the shutdown deadline");
        }
    }
}

/// The systemd unit shipped in `deploy/`, read at build time: the stop budget
/// `check-config` compares the config with is the one this binary is packaged with.
const PACKAGED_UNIT: &str = include_str!("../deploy/hj212-gateway.service");

/// systemd's `DefaultTimeoutStopSec`, what a unit without its own stop timeout gets.
const SYSTEMD_DEFAULT_STOP: Duration = Duration::from_secs(90);

/// How long the packaged unit lets the gateway stop before systemd kills it:
/// its `TimeoutStopSec=` (or `TimeoutSec=`, which sets it too; the last
/// assignment wins, as in systemd), `None` for `infinity` or a value this
/// parser does not read.
pub fn packaged_stop_timeout() -> Option<Duration> {
    let mut value = None;
    for line in PACKAGED_UNIT.lines() {
        let Some((key, v)) = line.split_once('=') else {
            continue;
        };
        if matches!(key.trim(), "TimeoutStopSec" | "TimeoutSec") {
            value = Some(v.trim());
        }
    }
    match value {
        None => Some(SYSTEMD_DEFAULT_STOP),
        Some(v) => parse_timespan(v),
    }
}

/// A systemd time span, systemd.time(7): "a space-separated series of time values
/// each suffixed by a time unit", e.g. "2min 30s"; "if no time unit is specified,
/// generally seconds are assumed". Units read: us, ms, s/sec/second(s),
/// m/min/minute(s), h/hr/hour(s). `infinity` and anything else give `None`.
fn parse_timespan(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() || text == "infinity" {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits].parse().ok()?;
        rest = rest[digits..].trim_start();
        let unit = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let per_unit = match &rest[..unit] {
            "us" | "usec" => Duration::from_micros(1),
            "ms" | "msec" => Duration::from_millis(1),
            "" | "s" | "sec" | "second" | "seconds" => Duration::from_secs(1),
            "m" | "min" | "minute" | "minutes" => Duration::from_secs(60),
            "h" | "hr" | "hour" | "hours" => Duration::from_secs(3600),
            _ => return None,
        };
        total += per_unit.checked_mul(u32::try_from(n).ok()?)?;
        rest = rest[unit..].trim_start();
    }
    Some(total)
}

/// The warning `check-config` prints when a stop may need longer than the
/// packaged unit allows: `[server] shutdown_grace` plus [`STORE_DRAIN_RESERVE`]
/// over its `TimeoutStopSec` means systemd may SIGKILL the gateway before the
/// frame log has drained. `None` when it fits.
pub fn stop_timeout_warning(cfg: &Config) -> Option<String> {
    let limit = packaged_stop_timeout()?;
    let grace = cfg.server.shutdown_grace.0;
    let needed = grace + STORE_DRAIN_RESERVE;
    (needed > limit).then(|| {
        format!(
            "server.shutdown_grace = {} plus the frame log's {} drain reserve is {}, over the packaged unit's TimeoutStopSec={}: systemd may kill the gateway before the log is closed; lower server.shutdown_grace to at most {} or raise TimeoutStopSec",
            secs(grace),
            secs(STORE_DRAIN_RESERVE),
            secs(needed),
            secs(limit),
            secs(limit.saturating_sub(STORE_DRAIN_RESERVE)),
        )
    })
}

/// Prints [`stop_timeout_warning`] on stderr, if any (`check-config`).
pub fn warn_stop_timeout(cfg: &Config) {
    if let Some(w) = stop_timeout_warning(cfg) {
        eprintln!("warning: {w}");
    }
}

/// A duration as an operator writes it in the config ("12s", "1.5s").
fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timespans_read_as_systemd_reads_them() {
        let s = Duration::from_secs;
        assert_eq!(parse_timespan("30s"), Some(s(30)));
        assert_eq!(parse_timespan("30"), Some(s(30)));
        assert_eq!(parse_timespan("2min 30s"), Some(s(150)));
        assert_eq!(parse_timespan("1min30s"), Some(s(90)));
        assert_eq!(parse_timespan("1h"), Some(s(3600)));
        assert_eq!(parse_timespan("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_timespan("infinity"), None);
        assert_eq!(parse_timespan("30 fortnights"), None);
        assert_eq!(parse_timespan(""), None);
    }

    /// The packaged unit leaves room for the default grace and the store's reserve,
    /// and the largest grace the config accepts is warned about.
    #[test]
    fn the_default_grace_fits_the_packaged_unit_and_the_largest_does_not() {
        let limit = packaged_stop_timeout().expect("the unit's TimeoutStopSec is read");
        let mut cfg = Config::parse("", Path::new("<defaults>")).expect("defaults");
        assert!(cfg.server.shutdown_grace.0 + STORE_DRAIN_RESERVE <= limit);
        assert_eq!(stop_timeout_warning(&cfg), None);
        cfg.server.shutdown_grace.0 = Duration::from_secs(60);
        let w = stop_timeout_warning(&cfg).expect("60s + reserve is over the unit's limit");
        assert!(w.contains("server.shutdown_grace = 60s"), "{w}");
        assert!(
            w.contains(&format!("at most {}", secs(limit - STORE_DRAIN_RESERVE))),
            "{w}"
        );
    }

    /// Consumers stop in parallel within what is left of the deadline; the one that
    /// does not is left behind, and the wait ends at the deadline.
    #[tokio::test]
    async fn consumers_are_waited_for_together_until_the_deadline() {
        let c = Consumers::default();
        let token = CancellationToken::new();
        for (name, takes) in [("quick", 10), ("also quick", 20), ("stuck", 3_600_000)] {
            let t = token.clone();
            c.track(
                name.into(),
                tokio::spawn(async move {
                    t.cancelled().await;
                    tokio::time::sleep(Duration::from_millis(takes)).await;
                }),
            );
        }
        let running = Arc::clone(&c.running);
        let started = tokio::time::Instant::now();
        token.cancel();
        c.stop_by(started + Duration::from_millis(300)).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(*lock(&running), vec!["stuck".to_owned()]);
    }
}
