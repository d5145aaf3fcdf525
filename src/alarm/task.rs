//! The detector task: the engine behind its own cursor on the frame log.
//!
//! Each step reads a page of records after the cursor `alarms` (from the writer's
//! in-memory feed while the detector keeps up, else from SQLite), feeds the accepted
//! inbound frames to the engine (ticking the engine's clock with the records' receive
//! times, so a backlog is judged as it happened), then, once caught up, ticks with the
//! wall clock for `device.offline`. The events of a step and the new cursor are
//! committed in one transaction. Between steps it waits for the next commit, or
//! `tick` when nothing is committed.
//!
//! A step whose events the store keeps refusing (`[alarms] max_store_failures`
//! commits in a row) is set aside: a dead letter `alarms` (seq = the step's last
//! record, reason `store_refused`, the error and the number of events lost) is
//! written with the cursor, and detection goes on. A disk that is full refuses the
//! dead letter too, so then nothing moves until it is not. The crash-loop guard of
//! the log's consumers (see `crate::store`) marks each record before the engine
//! sees it while a crash loop is suspected; the record it died on is skipped on the
//! next start (dead letter, reason `crash`).
//!
//! On start the engine is rebuilt: up to `lookback` records before the cursor are fed
//! with their events discarded (cadences, windows, runs), then the active set is
//! replaced by the table's active alarms, so nothing active is raised twice. A store
//! without the cursor starts at its head (history is the job of `replay`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::engine::Engine;
use super::{AlarmEvent, DetectorKind, Obs};
use crate::config::{AlarmsSection, DeviceKind};
use crate::metrics::Metrics;
use crate::registry::SharedRegistry;
use crate::store::follower::{self, Consumer, Follower, Plan, Rewind, Start};
use crate::store::{AlarmRow, AlarmStore, Feed, StoreError, StoredRecord};

/// The detector's cursor in the `cursors` table.
pub const CURSOR: &str = "alarms";
/// Records read per step.
const PAGE: usize = 1024;
/// Longest a cursor-only move waits before it is written (see `Detector::step`):
/// under load each write competes with the frame writer for the WAL lock.
const CURSOR_EVERY: Duration = Duration::from_secs(1);
/// Shortest time between two steps woken by commits.
const MIN_STEP: Duration = Duration::from_millis(50);
/// The engine clock is ticked at most this often while reading records (ms).
const TICK_EVERY_MS: i64 = 1000;

/// Logs one persisted alarm event at warn (the operator's signal).
pub fn log_event(a: &AlarmRow, event: &str) {
    warn!(
        alarm_id = a.id,
        event,
        kind = %a.kind,
        severity = %a.severity,
        mn = %a.mn,
        factor = %a.factor,
        message = %a.message_en,
        "alarm"
    );
}

/// Feeds records to an engine, ticking its clock from the records' receive times.
/// Shared by the task and `replay`.
#[derive(Debug)]
pub struct Feeder {
    /// The engine.
    pub engine: Engine,
    last_tick: Option<i64>,
}

impl Feeder {
    /// Wraps an engine.
    pub fn new(engine: Engine) -> Feeder {
        Feeder {
            engine,
            last_tick: None,
        }
    }

    /// One record (any record: only accepted inbound frames are observed) of a
    /// device that is not in the registry.
    pub fn feed(&mut self, r: &StoredRecord, video: bool) -> Vec<AlarmEvent> {
        self.feed_device(r, video, false)
    }

    /// One record of a device that is (`registered`) or is not in the registry.
    pub fn feed_device(
        &mut self,
        r: &StoredRecord,
        video: bool,
        registered: bool,
    ) -> Vec<AlarmEvent> {
        let o = Obs::from_record(r, video).map(|mut o| {
            o.registered = registered;
            o
        });
        self.feed_obs(r.received_at_ms, o.as_ref())
    }

    /// The clock at `at_ms` (UTC unix ms), then the observation if any.
    pub fn feed_obs(&mut self, at_ms: i64, o: Option<&Obs>) -> Vec<AlarmEvent> {
        let mut out = Vec::new();
        if self
            .last_tick
            .is_none_or(|t| at_ms.saturating_sub(t) >= TICK_EVERY_MS)
        {
            self.last_tick = Some(at_ms);
            out.extend(self.engine.tick(at_ms));
        }
        if let Some(o) = o {
            out.extend(self.engine.observe(o));
        }
        out
    }
}

/// The detector as a consumer of the log (see [`crate::store::follower`]).
#[derive(Clone)]
struct Alarms {
    cfg: AlarmsSection,
    registry: Arc<SharedRegistry>,
    crash_loop_starts: u32,
}

impl Consumer for Alarms {
    type Task = (Detector, Follower);

    fn plan(&self) -> Plan {
        Plan {
            name: CURSOR.into(),
            what: "alarm detector",
            start: Start::Head,
            keep_start: false,
            // The warm-up feeds records before the cursor to the engine too:
            // guarded from where it starts.
            rewind: Rewind::Lookback(self.cfg.lookback as u64),
            poll: self.cfg.tick.0,
            save_every: CURSOR_EVERY,
            crash_loop_starts: self.crash_loop_starts,
        }
    }

    fn open(self, f: Follower) -> Result<(Detector, Follower), StoreError> {
        Ok((Detector::open(self.cfg, &f, self.registry)?, f))
    }

    async fn run((mut d, mut f): (Detector, Follower), shutdown: CancellationToken) -> Follower {
        loop {
            let stepped = tokio::time::Instant::now();
            let now = chrono::Utc::now().timestamp_millis();
            let caught_up = match d.step(&mut f, now).await {
                Ok(c) => c,
                Err(e) => {
                    // Nothing was committed; the events are kept and retried first.
                    crate::log_repeated!(error, error = %e, "alarm detector step failed; retrying");
                    true
                }
            };
            if shutdown.is_cancelled() {
                break;
            }
            // A commit wakes the detector: while it keeps up it reads from
            // memory, and the feed only reaches back so far. Steps are at least
            // MIN_STEP apart so that under load each takes a batch of records,
            // not one commit's worth (the feed holds far more than MIN_STEP of
            // traffic).
            if caught_up && !f.wait(&shutdown).await {
                break;
            }
            if caught_up {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(stepped + MIN_STEP) => {}
                }
            }
        }
        f
    }
}

struct Detector {
    feeder: Feeder,
    alarms: AlarmStore,
    registry: Arc<SharedRegistry>,
    /// Every record up to here was fed to the engine and its events stored.
    cursor: u64,
    /// `[alarms] tick` in ms: the wall clock ticks the engine at most this often.
    tick_ms: i64,
    /// When the wall clock last ticked the engine (UTC ms).
    wall_tick: i64,
    /// Events (and the cursor they reach) the engine has decided but the store has
    /// not taken yet: retried before anything new is read, because the engine's state
    /// has already moved past them and must not see the same records twice.
    pending: Option<(Vec<AlarmEvent>, u64)>,
    /// Failed commits of `pending` in a row.
    failures: u32,
    max_failures: u32,
    /// The gateway's registry (the follower's), for the tracked-device gauges.
    metrics: Arc<Metrics>,
}

impl Detector {
    /// Opens the alarm tables and warms the engine up (blocking, on the detector's
    /// thread).
    fn open(
        cfg: AlarmsSection,
        f: &Follower,
        registry: Arc<SharedRegistry>,
    ) -> Result<Self, StoreError> {
        let alarms = AlarmStore::open(f.db())?;
        let cursor = f.cursor_at_start();
        let tick_ms = cfg.tick.0.as_millis() as i64;
        let max_failures = cfg.max_store_failures;
        let mut d = Detector {
            feeder: Feeder::new(Engine::new(cfg)),
            alarms,
            registry,
            cursor,
            tick_ms,
            wall_tick: i64::MIN,
            pending: None,
            failures: 0,
            max_failures,
            metrics: Arc::clone(f.metrics()),
        };
        let (reader, marker) = (f.reader(), f.marker().clone());
        let reader = reader.lock().unwrap_or_else(|e| e.into_inner());
        let mut after = f.rewind_from();
        let mut warmed = 0usize;
        while after < cursor {
            let page = reader.read_from(after, f.page(after, PAGE))?;
            if page.is_empty() {
                break;
            }
            for r in page.iter().take_while(|r| r.seq <= cursor) {
                if f.is_dead(r.seq) {
                    continue;
                }
                marker.mark(r.seq)?;
                let (video, registered) = d.device(r);
                let _ = d.feeder.feed_device(r, video, registered);
                warmed += 1;
            }
            after = page.last().map_or(cursor, |r| r.seq);
        }
        let active = d.alarms.active_keys()?;
        info!(
            cursor,
            warmed,
            active = active.len(),
            "alarm detector resumes from its cursor"
        );
        d.feeder.engine.set_active(active);
        Ok(d)
    }

    /// Whether the record's device is a video gateway, and whether it is registered.
    fn device(&self, r: &StoredRecord) -> (bool, bool) {
        let Some(mn) = r.mn.as_deref() else {
            return (false, false);
        };
        match self.registry.current().get(mn) {
            Some(d) => (d.kind == DeviceKind::Video, true),
            None => (false, false),
        }
    }

    /// Publishes the engine's device counts (`hj212_alarm_tracked_devices`,
    /// `hj212_tracked_devices_evicted_total`).
    fn report_tracked(&self) {
        let m = &self.metrics;
        let (known, unregistered) = self.feeder.engine.tracked();
        m.alarm_tracked_registered.set(known as i64);
        m.alarm_tracked_unregistered.set(unregistered as i64);
        m.alarm_evicted.set(self.feeder.engine.evicted() as i64);
        m.alarm_untracked_factors
            .set(self.feeder.engine.untracked_factors() as i64);
    }

    /// One step; returns true when caught up. Runs in place on the detector's
    /// thread (the follower's blocking calls too).
    async fn step(&mut self, f: &mut Follower, now_ms: i64) -> Result<bool, StoreError> {
        if let Some((events, next)) = self.pending.take() {
            if let Err(e) = self.persist(f, events, next) {
                self.failures += 1;
                if self.failures < self.max_failures {
                    return Err(e);
                }
                self.set_aside(f, next, &e).await?;
            }
            self.failures = 0;
        }
        let size = f.page(self.cursor, PAGE);
        let page = f.read(self.cursor, size).await?;
        let caught_up = page.len() < size;
        let mut events = Vec::new();
        for r in &page {
            if !f.admit(r.seq).await? {
                continue;
            }
            let (video, registered) = self.device(r);
            events.extend(self.feeder.feed_device(r, video, registered));
        }
        self.report_tracked();
        // A tick walks every device (offline checks). Steps follow commits, up to
        // `1 / MIN_STEP` a second, and ticking at each of them cost a large share
        // of the detector's CPU (benches/README.md, "Measurements behind the
        // code"); `tick` is the resolution it promises.
        // (Half a tick: the idle loop sleeps exactly `tick`, and the wall clock
        // read after it must not just miss the gate.)
        if caught_up && now_ms.saturating_sub(self.wall_tick) >= self.tick_ms / 2 {
            self.wall_tick = now_ms;
            events.extend(self.feeder.engine.tick(now_ms));
        }
        let next = page.last().map_or(self.cursor, |r| r.seq);
        if events.is_empty() {
            // A cursor-only move is written on the follower's cadence. Records after
            // a cursor left behind by a crash are fed again after the warm-up and
            // produce no events again (they produced none).
            self.cursor = next;
            f.advance(next);
            f.persist(false).await;
            return Ok(caught_up);
        }
        self.persist(f, events, next)?;
        Ok(caught_up)
    }

    /// The pending events keep failing: they are dropped and the step's last record
    /// set aside with the cursor moving past it, in one transaction. If that fails
    /// too the events stay pending.
    async fn set_aside(
        &mut self,
        f: &mut Follower,
        next: u64,
        e: &StoreError,
    ) -> Result<(), StoreError> {
        let n = self.pending.as_ref().map_or(0, |(ev, _)| ev.len());
        let dl = crate::store::DeadLetter {
            consumer: CURSOR.into(),
            seq: next,
            reason: "store_refused",
            detail: format!(
                "{n} alarm events of the step ending here not stored after {} commits: {e}",
                self.failures
            ),
        };
        f.save_now(Some(next), vec![dl], Vec::new()).await?;
        self.pending = None;
        self.cursor = next;
        error!(seq = next, events = n, error = %e, "alarm events the store keeps refusing set aside (dead letter); detection goes on");
        Ok(())
    }

    /// Commits the events with the cursor in one transaction (after a crash either
    /// both happened or neither did).
    fn persist(
        &mut self,
        f: &mut Follower,
        events: Vec<AlarmEvent>,
        next: u64,
    ) -> Result<(), StoreError> {
        match self.alarms.apply(&events, Some((CURSOR, next))) {
            Ok(written) => {
                self.cursor = next;
                f.saved_at(next);
                for (a, e) in &written {
                    log_event(a, e);
                    if *e == "raise" {
                        if let Some(i) = DetectorKind::ALL.iter().position(|k| k.as_str() == a.kind)
                        {
                            self.metrics.alarm_raised(i);
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.pending = Some((events, next));
                Err(e)
            }
        }
    }
}

/// Starts the detector on a thread of its own, `cfg.nice` steps below the
/// process's priority; the handle completes when it has stopped (cursor written).
///
/// Its own thread because Linux keeps the nice value per thread and an
/// unprivileged thread cannot raise it again: tokio's blocking pool also runs the
/// MQTT publisher, which must not slow down. Alarms are derived from the log
/// behind a cursor, so under overload they lag (`hj212_consumer_lag_records`)
/// while sessions and the writer keep the CPU for acks. The follower runs its
/// blocking calls in place ([`Exec::Inline`]), on this thread.
pub fn spawn(
    cfg: AlarmsSection,
    db: PathBuf,
    feed: Arc<Feed>,
    registry: Arc<SharedRegistry>,
    crash_loop_starts: u32,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let nice = cfg.nice;
    let alarms = Alarms {
        cfg,
        registry,
        crash_loop_starts,
    };
    match follower::spawn_thread(
        "hj212-alarms",
        move || lower_priority(nice),
        alarms,
        db,
        feed,
        shutdown,
    ) {
        Ok(task) => task,
        Err(e) => {
            error!(error = %e, "alarm detector thread cannot start; no alarms");
            tokio::spawn(async {})
        }
    }
}

/// Lowers the calling thread's priority by `nice` steps (see [`crate::priority`]).
/// Failing only costs the preference, so it is logged and run.
fn lower_priority(nice: u8) {
    if nice == 0 {
        return;
    }
    if let Err(e) = crate::priority::shift_current_thread(i32::from(nice)) {
        warn!(error = %e, nice, "alarm detector runs at the gateway's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use crate::store::{Store, StoreConfig};
    use std::path::Path;

    fn started(db: &Path) -> bool {
        let Ok(c) = rusqlite::Connection::open(db) else {
            return false;
        };
        c.query_row(
            "SELECT count(*) FROM cursors WHERE name = ?1",
            [CURSOR],
            |r| r.get::<_, i64>(0),
        )
        .is_ok_and(|n| n == 1)
    }

    /// A log the detector cannot open at start (here: not there yet; in the field,
    /// a full disk refusing the start marker) is tried again, not given up on until
    /// the gateway restarts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_that_cannot_be_opened_at_start_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("log.db");
        let feed = Arc::new(Feed::new(16));
        let registry = Arc::new(SharedRegistry::new(Registry::default()));
        let shutdown = CancellationToken::new();
        let cfg = AlarmsSection {
            nice: 0,
            ..AlarmsSection::default()
        };
        let task = spawn(cfg, db.clone(), feed, registry, 3, shutdown.clone());
        tokio::time::sleep(crate::store::OPEN_RETRY / 2).await;
        assert!(!task.is_finished(), "the detector gave up on the log");
        let (h, j) = Store::open(StoreConfig::new(&db)).unwrap();
        let until = std::time::Instant::now() + crate::store::OPEN_RETRY * 10;
        while !started(&db) {
            assert!(std::time::Instant::now() < until, "never opened the log");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        task.await.unwrap();
        drop(h);
        j.join().unwrap();
    }
}
