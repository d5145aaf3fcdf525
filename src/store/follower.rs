//! One follower of the frame log for every consumer.
//!
//! # Why
//!
//! The MQTT publisher, the upstream forwarders and the alarm detector each read the
//! log behind a cursor of their own. What they do with a record differs; how they
//! follow the log must not: where a cursor starts, retrying a log that cannot be
//! opened yet, being woken by the commit feed (with a poll as the fallback), how
//! often the cursor is written, the crash-loop guard and the set-aside records
//! (dead letters). Written three times, those drifted apart. A [`Follower`] owns
//! them; a consumer is an implementation of [`Consumer`] that opens its own state,
//! and then follows the log with the follower's reads, marks and saves.
//!
//! # Blocking or async, in one place
//!
//! SQLite calls block. The publisher and the forwarders run on the async threads
//! and hand them to tokio's blocking pool; the alarm detector runs on a thread of
//! its own (lowered priority: Linux keeps the nice value per thread), where they
//! run in place. A follower is made with its [`Exec`] and every blocking call goes
//! through [`Follower::blocking`], so a consumer's code is the same either way.
//!
//! # Cursor writes
//!
//! A cursor write is a commit on the log's file, which under load competes with the
//! store writer for the WAL lock, so a cursor is written at most every
//! [`Plan::save_every`] (or on stop), together with the dead letters queued since
//! the last write: the cursor never passes a set-aside record without its entry.
//! A write that fails keeps the entries for the next one. A crash between writes
//! only repeats work from the log (at-least-once).

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Cursors, DeadLetter, Feed, FeedReader, Reader, StoreError};
use crate::metrics::Metrics;

/// Most seqs of set-aside records kept to skip on re-reads.
const DEAD_SEQS_MAX: usize = 100_000;

/// Where a consumer without a stored cursor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the beginning of the log.
    Oldest,
    /// At the log's head: history is not this consumer's job.
    Head,
}

impl Start {
    /// The cursor this start means on a log whose last record is `head`.
    pub fn seq(self, head: u64) -> u64 {
        match self {
            Start::Oldest => 0,
            Start::Head => head,
        }
    }
}

/// Writes cursor `name` at `start` unless it exists; returns the cursor.
///
/// `daemon::start` calls this before devices can connect, for every consumer
/// that starts at the head: a consumer task opens the log a moment later (the
/// alarm detector on a thread of its own, at a lower priority), and without
/// the cursor written first the frames that arrived meanwhile would lie
/// behind its start and never reach it. Blocking.
pub fn prepare(db: &Path, name: &str, start: Start) -> Result<u64, StoreError> {
    let cursors = Cursors::open(db)?;
    if let Some(c) = cursors.get_cursor(name)? {
        return Ok(c);
    }
    let c = start.seq(Reader::open(db)?.last_seq()?);
    cursors.set_cursor(name, c)?;
    Ok(c)
}

/// Where a start re-reads from, relative to the cursor: what the crash-loop guard
/// watches and where set-aside records are looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewind {
    /// From the cursor.
    None,
    /// Up to this many records before the cursor (the alarm detector's warm-up).
    Lookback(u64),
    /// From this other cursor of the consumer when it is lower (the publisher's
    /// `mqtt.merge`, below which no split-upload group is open).
    Cursor(&'static str),
}

/// How a consumer follows the log: everything the follower needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The cursor's name in the `cursors` table (`mqtt`, `upstream.<name>`, `alarms`);
    /// also the consumer of its dead letters.
    pub name: String,
    /// The consumer in log lines ("MQTT publisher").
    pub what: &'static str,
    /// Where a consumer without a cursor starts.
    pub start: Start,
    /// Whether a new cursor is written at once, so that a restart does not move a
    /// start at the head forward.
    pub keep_start: bool,
    /// Where a start re-reads from.
    pub rewind: Rewind,
    /// How often a caught-up consumer looks for new records when no commit wakes it.
    pub poll: Duration,
    /// Shortest time between two cursor writes (see the module documentation).
    pub save_every: Duration,
    /// Starts at the same place without a clean stop from which the consumer reads
    /// carefully (`[store] crash_loop_starts`).
    pub crash_loop_starts: u32,
}

/// Where a follower's blocking calls run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    /// On tokio's blocking pool (consumers on the async threads).
    Pool,
    /// In place (a consumer on a thread of its own).
    Inline,
}

impl Exec {
    /// Runs `f` where this says and returns its result.
    pub async fn run<T: Send + 'static>(self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self {
            Exec::Inline => f(),
            Exec::Pool => match tokio::task::spawn_blocking(f).await {
                Ok(t) => t,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Cancelled: the runtime is shutting down and drops this task with it.
                Err(_) => std::future::pending().await,
            },
        }
    }
}

/// A consumer of the log: what it opens besides the follower, and how it follows.
pub trait Consumer: Clone + Send + 'static {
    /// The running consumer.
    type Task: Send + 'static;

    /// How it follows the log.
    fn plan(&self) -> Plan;

    /// Opens the consumer's own state around the open follower (blocking, on the
    /// follower's [`Exec`]). An error is retried with the follower's own open.
    fn open(self, f: Follower) -> Result<Self::Task, StoreError>;

    /// Follows the log until `shutdown` is cancelled; hands the follower back to
    /// be stopped (its cursor written, the clean stop recorded).
    fn run(task: Self::Task, shutdown: CancellationToken) -> impl Future<Output = Follower> + Send;
}

/// Runs `consumer` on the async threads until `shutdown` is cancelled.
pub fn spawn<C: Consumer>(
    consumer: C,
    db: PathBuf,
    feed: Arc<Feed>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(follow(consumer, db, feed, Exec::Pool, shutdown))
}

/// Runs `consumer` on a thread of its own named `name`, after `setup` has run
/// there, until `shutdown` is cancelled; its blocking calls run in place. The
/// returned task ends when the thread does, and panics if the thread did (so a
/// watcher reports it as it would a consumer on the async threads).
///
/// For a consumer whose async part must not queue behind the sessions on the
/// async threads (or that must run at another priority, which Linux keeps per
/// thread). `Err` when the thread cannot be started.
pub fn spawn_thread<C: Consumer + Send>(
    name: &str,
    setup: impl FnOnce() + Send + 'static,
    consumer: C,
    db: PathBuf,
    feed: Arc<Feed>,
    shutdown: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    let rt = tokio::runtime::Handle::current();
    let (stopped, on_stop) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // Code under the consumer may expect a runtime context, as it has on
            // the async threads.
            let _context = rt.enter();
            setup();
            rt.block_on(follow(consumer, db, feed, Exec::Inline, shutdown));
            let _ = stopped.send(());
        })?;
    let name = name.to_owned();
    Ok(tokio::spawn(async move {
        // The sender is dropped unsent only when the thread unwound.
        if on_stop.await.is_err() {
            panic!("the {name} thread panicked");
        }
    }))
}

/// Opens the follower and the consumer (retrying every [`super::OPEN_RETRY`] until
/// the log can be opened; a damaged log stops it), runs the consumer, stops cleanly.
pub async fn follow<C: Consumer>(
    consumer: C,
    db: PathBuf,
    feed: Arc<Feed>,
    exec: Exec,
    shutdown: CancellationToken,
) {
    let plan = consumer.plan();
    let what = plan.what;
    let repeats = crate::telemetry::Repeats::new();
    let task = loop {
        let (c, p, db, feed) = (consumer.clone(), plan.clone(), db.clone(), feed.clone());
        let opened = exec
            .run(move || c.open(Follower::open(p, &db, feed, exec)?))
            .await;
        match opened {
            Ok(task) => break task,
            Err(e) if e.is_damage() => {
                error!(consumer = %plan.name, error = %e, "{what} cannot read the damaged frame log; stopped (see `verify`)");
                return;
            }
            Err(e) => {
                if let Some(suppressed) = repeats.admit() {
                    error!(suppressed, consumer = %plan.name, error = %e, "{what} cannot open the frame log; retrying");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(super::OPEN_RETRY) => {}
        }
    };
    C::run(task, shutdown).await.stop().await;
}

/// Careful mode of the crash-loop guard, shareable with a blocking task: marks a
/// record in the cursor row before the consumer hands it to code that could abort.
#[derive(Debug, Clone)]
pub struct Marker {
    name: Arc<str>,
    what: &'static str,
    cursors: Arc<Mutex<Cursors>>,
    /// Records up to here are marked; 0 when careful mode is off.
    until: Arc<AtomicU64>,
}

impl Marker {
    /// Whether `seq` is inside the careful stretch.
    pub fn careful(&self, seq: u64) -> bool {
        seq <= self.until.load(Ordering::Relaxed)
    }

    /// Whether careful mode is on.
    pub fn on(&self) -> bool {
        self.until.load(Ordering::Relaxed) > 0
    }

    /// Marks `seq` before it is handed on while careful mode is on; past the careful
    /// stretch, ends careful mode (the stretch was read without a crash). Blocking.
    pub fn mark(&self, seq: u64) -> Result<(), StoreError> {
        let until = self.until.load(Ordering::Relaxed);
        if until == 0 {
            return Ok(());
        }
        let probe = (seq <= until).then_some(seq);
        lock(&self.cursors).set_probe(&self.name, probe)?;
        if probe.is_none() {
            self.until.store(0, Ordering::Relaxed);
            info!(consumer = %self.name, "{} passed the stretch it crashed in; reading at full speed again", self.what);
        }
        Ok(())
    }
}

/// Dead letters and resolved re-drives a cursor write could not save.
type Unsaved = (Vec<DeadLetter>, Vec<i64>);

/// A consumer's hold on the log (see the module documentation).
#[derive(Debug)]
pub struct Follower {
    plan: Plan,
    exec: Exec,
    db: PathBuf,
    reader: Arc<Mutex<FeedReader>>,
    cursors: Arc<Mutex<Cursors>>,
    committed: watch::Receiver<u64>,
    marker: Marker,
    /// Set-aside records after the rewind position (skipped on re-reads).
    dead: BTreeSet<u64>,
    /// The stored cursor at start, and where the start re-reads from.
    started: (u64, u64),
    /// Every record up to here is finished.
    position: u64,
    /// Other cursors of the consumer (seqs), written with its own.
    also: Vec<(&'static str, u64)>,
    /// The consumer's alarm-event cursors (`alarm_events` ids), written with its own.
    events: Vec<(&'static str, u64)>,
    /// What the last write stored (cursor, others, event cursors).
    saved: Option<Saved>,
    last_save: Instant,
    save_task: Option<JoinHandle<Option<Unsaved>>>,
    dead_pending: Vec<DeadLetter>,
    resolved_pending: Vec<i64>,
    /// The gateway's registry (the feed's), where set-asides are counted.
    metrics: Arc<Metrics>,
}

type Saved = (u64, Vec<(&'static str, u64)>, Vec<(&'static str, u64)>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Follower {
    /// Opens the log for `plan` (blocking): the reader, the cursor (created per
    /// [`Plan::start`]), the crash-loop guard at the rewind position, the records
    /// set aside after it.
    pub fn open(
        plan: Plan,
        db: &Path,
        feed: Arc<Feed>,
        exec: Exec,
    ) -> Result<Follower, StoreError> {
        let committed = feed.subscribe();
        let metrics = Arc::clone(feed.metrics());
        let reader = FeedReader::new(feed, Reader::open(db)?);
        let cursors = Cursors::open(db)?;
        let head = reader.reader().last_seq()?;
        let cursor = match cursors.get_cursor(&plan.name)? {
            Some(c) => c,
            None => {
                let c = plan.start.seq(head);
                if plan.keep_start {
                    cursors.set_cursor(&plan.name, c)?;
                }
                c
            }
        };
        let from = match plan.rewind {
            Rewind::None => cursor,
            Rewind::Lookback(n) => cursor.saturating_sub(n),
            Rewind::Cursor(other) => cursors.get_cursor(other)?.unwrap_or(cursor).min(cursor),
        };
        let careful =
            cursors.guard_start(&plan.name, from, head, plan.crash_loop_starts, &metrics)?;
        let dead = cursors
            .dead_seqs(&plan.name, from, DEAD_SEQS_MAX)?
            .into_iter()
            .collect();
        let cursors = Arc::new(Mutex::new(cursors));
        Ok(Follower {
            marker: Marker {
                name: plan.name.as_str().into(),
                what: plan.what,
                cursors: cursors.clone(),
                until: Arc::new(AtomicU64::new(careful)),
            },
            exec,
            db: db.to_owned(),
            reader: Arc::new(Mutex::new(reader)),
            cursors,
            committed,
            dead,
            started: (cursor, from),
            position: cursor,
            also: Vec::new(),
            events: Vec::new(),
            saved: Some((cursor, Vec::new(), Vec::new())),
            last_save: Instant::now(),
            save_task: None,
            dead_pending: Vec::new(),
            resolved_pending: Vec::new(),
            metrics,
            plan,
        })
    }

    /// The cursor's name.
    pub fn name(&self) -> &str {
        &self.plan.name
    }

    /// The log's file.
    pub fn db(&self) -> &Path {
        &self.db
    }

    /// The poll interval of a caught-up consumer ([`Plan::poll`]).
    pub fn poll(&self) -> Duration {
        self.plan.poll
    }

    /// The stored cursor when the follower opened.
    pub fn cursor_at_start(&self) -> u64 {
        self.started.0
    }

    /// Where this start re-reads from (see [`Rewind`]).
    pub fn rewind_from(&self) -> u64 {
        self.started.1
    }

    /// Every record up to here is finished (what the next write stores).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Moves the consumer's position (the cursor written at the next save).
    pub fn advance(&mut self, seq: u64) {
        self.position = seq;
    }

    /// Sets another cursor of the consumer, written with its own.
    pub fn set_also(&mut self, name: &'static str, seq: u64) {
        set(&mut self.also, name, seq);
    }

    /// Sets an alarm-event cursor of the consumer, written with its own.
    pub fn set_event_cursor(&mut self, name: &'static str, id: u64) {
        set(&mut self.events, name, id);
    }

    /// The last committed seq the feed announced.
    pub fn head(&self) -> u64 {
        *self.committed.borrow()
    }

    /// Resolves when something new is committed (an error when the store is gone).
    pub async fn committed(&mut self) -> Result<(), watch::error::RecvError> {
        self.committed.changed().await
    }

    /// Waits for the next commit, at most [`Plan::poll`]; false on shutdown.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = self.committed.changed() => true,
            _ = tokio::time::sleep(self.plan.poll) => true,
        }
    }

    /// The registry the consumer counts in (the gateway's, handed over with the feed).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The reader (the feed, else SQLite), for blocking calls.
    pub fn reader(&self) -> Arc<Mutex<FeedReader>> {
        self.reader.clone()
    }

    /// The cursor connection, for blocking calls (re-drives).
    pub fn cursors(&self) -> Arc<Mutex<Cursors>> {
        self.cursors.clone()
    }

    /// The crash-loop guard's careful mode.
    pub fn marker(&self) -> &Marker {
        &self.marker
    }

    /// Records per read: one at a time while careful (each is marked first).
    pub fn page(&self, after: u64, full: usize) -> usize {
        if self.marker.on() && after < self.marker.until.load(Ordering::Relaxed) {
            1
        } else {
            full
        }
    }

    /// Runs a blocking call where this follower's [`Exec`] says.
    pub async fn blocking<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.exec.run(f).await
    }

    /// Up to `limit` records after `after`, in seq order (see [`page`](Self::page)
    /// for a consumer that reads one at a time while careful).
    pub async fn read(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Arc<super::StoredRecord>>, StoreError> {
        let reader = self.reader.clone();
        self.blocking(move || lock(&reader).read_from(after, limit))
            .await
    }

    /// Marks `seq` while careful mode is on (see [`Marker::mark`]).
    pub async fn mark(&self, seq: u64) -> Result<(), StoreError> {
        if !self.marker.on() {
            return Ok(());
        }
        let m = self.marker.clone();
        self.blocking(move || m.mark(seq)).await
    }

    /// Whether `seq` was set aside (and is skipped).
    pub fn is_dead(&self, seq: u64) -> bool {
        self.dead.contains(&seq)
    }

    /// Set-aside seqs in `after + 1 ..= after + span`, for a read that runs elsewhere.
    pub fn dead_in(&self, after: u64, span: u64) -> Vec<u64> {
        self.dead
            .range(after + 1..=after.saturating_add(span))
            .copied()
            .collect()
    }

    /// Whether `seq` goes to the consumer: not set aside; marked first in careful
    /// mode (see [`Marker::mark`]).
    pub async fn admit(&self, seq: u64) -> Result<bool, StoreError> {
        if self.dead.contains(&seq) {
            return Ok(false);
        }
        self.mark(seq).await?;
        Ok(true)
    }

    /// Sets a record (or another thing the consumer counts, e.g. an alarm event)
    /// aside: counted now, written with the next cursor write, never passed by the
    /// cursor without its entry. A record of the follower's own cursor is skipped
    /// from now on.
    pub fn set_aside(&mut self, d: DeadLetter) {
        self.metrics.dead_letter(&d.consumer, d.reason);
        if d.consumer == self.plan.name {
            self.dead.insert(d.seq);
        }
        self.dead_pending.push(d);
    }

    /// A re-driven entry went through: marked `resolved` with the next cursor write.
    pub fn resolve(&mut self, id: i64) {
        self.resolved_pending.push(id);
    }

    /// Writes the cursor to `seq` together with `dead` (and `resolved`) now, in one
    /// transaction; on success the dead letters are counted and the position moves.
    /// For a consumer that may only move on once the entry is stored.
    pub async fn save_now(
        &mut self,
        seq: Option<u64>,
        dead: Vec<DeadLetter>,
        resolved: Vec<i64>,
    ) -> Result<(), StoreError> {
        let (cursors, name) = (self.cursors.clone(), self.plan.name.clone());
        let d = dead.clone();
        self.blocking(move || {
            let own: Vec<(&str, u64)> = seq.map(|s| (name.as_str(), s)).into_iter().collect();
            lock(&cursors).save(&own, &d, &resolved)
        })
        .await?;
        for d in &dead {
            self.metrics.dead_letter(&d.consumer, d.reason);
            if d.consumer == self.plan.name {
                self.dead.insert(d.seq);
            }
        }
        if let Some(s) = seq {
            self.saved_at(s);
        }
        Ok(())
    }

    /// Writes the outcome of one re-driven entry now: `resolved`, or (`again`) set
    /// aside once more, one more attempt on the same entry. Not counted as a new
    /// dead letter.
    pub async fn redriven(&self, id: i64, again: Option<DeadLetter>) -> Result<(), StoreError> {
        let cursors = self.cursors.clone();
        self.blocking(move || match again {
            Some(d) => lock(&cursors).save(&[], &[d], &[]),
            None => lock(&cursors).save(&[], &[], &[id]),
        })
        .await
    }

    /// The cursor was written to `seq` by the consumer itself (in the transaction of
    /// its own results): the next write is not due before [`Plan::save_every`].
    pub fn saved_at(&mut self, seq: u64) {
        self.position = seq;
        let (_, also, events) = self.saved.take().unwrap_or_default();
        self.saved = Some((seq, also, events));
        self.last_save = Instant::now();
        self.prune(seq);
    }

    fn prune(&mut self, through: u64) {
        let low = self.also.iter().map(|(_, s)| *s).fold(through, u64::min);
        self.dead = self.dead.split_off(&(low + 1));
    }

    /// Writes the cursors and the queued dead letters when something changed and
    /// the last write is [`Plan::save_every`] old (`force`: now, and waits for it).
    /// On the blocking pool the write runs in the background while the consumer
    /// goes on; a failed write is logged and its entries kept for the next one.
    pub async fn persist(&mut self, force: bool) {
        if let Some(t) = &self.save_task {
            if !t.is_finished() && !force {
                return;
            }
        }
        if let Some(t) = self.save_task.take() {
            self.collect(t.await.ok().flatten());
        }
        let state: Saved = (self.position, self.also.clone(), self.events.clone());
        let changed = self.saved.as_ref() != Some(&state)
            || !self.dead_pending.is_empty()
            || !self.resolved_pending.is_empty();
        if !changed || (!force && self.last_save.elapsed() < self.plan.save_every) {
            return;
        }
        self.last_save = Instant::now();
        self.prune(state.0);
        self.saved = Some(state.clone());
        let dead = std::mem::take(&mut self.dead_pending);
        let resolved = std::mem::take(&mut self.resolved_pending);
        let (cursors, name, what) = (self.cursors.clone(), self.plan.name.clone(), self.plan.what);
        let write = move || {
            let (seq, also, events) = state;
            let mut all: Vec<(&str, u64)> = vec![(name.as_str(), seq)];
            all.extend(also.iter().map(|(n, s)| (*n, *s)));
            // The dead letters and the cursors that pass them commit together.
            match lock(&cursors).save_with_events(&all, &events, &dead, &resolved) {
                Ok(()) => None,
                Err(e) => {
                    error!(consumer = %name, error = %e, "{what} cursor not saved; a restart repeats more work");
                    Some((dead, resolved))
                }
            }
        };
        match self.exec {
            Exec::Inline => self.collect(write()),
            Exec::Pool => {
                let t = tokio::task::spawn_blocking(write);
                if force {
                    self.collect(t.await.ok().flatten());
                } else {
                    self.save_task = Some(t);
                }
            }
        }
    }

    /// Takes back what a write could not save: kept (ahead of newer entries) for
    /// the next write, which is then due whatever the cursors say.
    fn collect(&mut self, unsaved: Option<Unsaved>) {
        if let Some((mut dead, mut resolved)) = unsaved {
            dead.append(&mut self.dead_pending);
            self.dead_pending = dead;
            resolved.append(&mut self.resolved_pending);
            self.resolved_pending = resolved;
            self.saved = None;
        }
    }

    /// Stops cleanly: writes the cursors, ends careful mode and records the clean
    /// stop (the next start is not counted as after a crash).
    pub async fn stop(mut self) {
        self.persist(true).await;
        let (cursors, name, careful) = (
            self.cursors.clone(),
            self.plan.name.clone(),
            self.marker.on(),
        );
        let stopped = self
            .blocking(move || {
                let c = lock(&cursors);
                if careful {
                    c.set_probe(&name, None)?;
                }
                c.clean_stop(&name)
            })
            .await;
        let (what, name) = (self.plan.what, &self.plan.name);
        if let Err(e) = stopped {
            warn!(consumer = %name, error = %e, "{what} could not record its clean stop; the next start counts as after a crash");
        }
        info!(consumer = %name, cursor = self.position, "{what} stopped");
    }
}

fn set(v: &mut Vec<(&'static str, u64)>, name: &'static str, seq: u64) {
    match v.iter_mut().find(|(n, _)| *n == name) {
        Some(e) => e.1 = seq,
        None => v.push((name, seq)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        NewRecord, Store, StoreConfig, StoreHandle, SyncMode, WriterJoin, list_dead_letters,
    };

    fn junk(i: u64) -> NewRecord {
        crate::store::junk_record(format!("x{i}"))
    }

    async fn store(dir: &Path, n: u64) -> (PathBuf, StoreHandle, WriterJoin) {
        let path = dir.join("log.sqlite");
        let mut cfg = StoreConfig::new(&path);
        cfg.sync = SyncMode::Off;
        let (h, j) = Store::open(cfg).unwrap();
        for i in 0..n {
            h.append(junk(i)).await.unwrap();
        }
        (path, h, j)
    }

    /// A cursor prepared before a consumer opens pins its start: frames that
    /// arrive before the consumer runs are still ahead of it, and an existing
    /// cursor is left as it is.
    #[tokio::test]
    async fn a_prepared_cursor_pins_where_a_consumer_starts() {
        let dir = tempfile::tempdir().unwrap();
        let (db, h, j) = store(dir.path(), 3).await;
        assert_eq!(prepare(&db, "late", Start::Head).unwrap(), 3);
        assert_eq!(prepare(&db, "all", Start::Oldest).unwrap(), 0);
        for i in 3..5 {
            h.append(junk(i)).await.unwrap();
        }
        assert_eq!(prepare(&db, "late", Start::Head).unwrap(), 3, "kept");
        let mut p = plan("late");
        p.start = Start::Head;
        let f = Follower::open(p, &db, h.feed(), Exec::Inline).unwrap();
        assert_eq!(f.position, 3, "the two records after it are still to read");
        drop(f);
        drop(h);
        j.join().unwrap();
    }

    fn plan(name: &str) -> Plan {
        Plan {
            name: name.into(),
            what: "test consumer",
            start: Start::Oldest,
            keep_start: false,
            rewind: Rewind::None,
            poll: Duration::from_secs(3600),
            save_every: Duration::from_secs(3600),
            crash_loop_starts: 2,
        }
    }

    fn stored(path: &Path, name: &str) -> Option<u64> {
        Cursors::open(path).unwrap().get_cursor(name).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_wakes_a_waiting_follower_long_before_its_poll() {
        let dir = tempfile::tempdir().unwrap();
        let (path, h, _j) = store(dir.path(), 1).await;
        let mut f = Follower::open(plan("c"), &path, h.feed(), Exec::Pool).unwrap();
        let stop = CancellationToken::new();
        let t0 = std::time::Instant::now();
        let append = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            h.append(junk(9)).await.unwrap();
        };
        let (woke, ()) = tokio::join!(f.wait(&stop), append);
        assert!(woke);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "woken by the commit"
        );
        let recs = f.read(0, 10).await.unwrap();
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
        stop.cancel();
        assert!(!f.wait(&stop).await, "shutdown ends the wait");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cursor_is_written_on_its_cadence_with_the_dead_letters_it_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, h, _j) = store(dir.path(), 5).await;
        let mut p = plan("c");
        p.save_every = Duration::from_millis(300);
        let mut f = Follower::open(p, &path, h.feed(), Exec::Pool).unwrap();
        f.advance(2);
        f.persist(false).await;
        assert_eq!(stored(&path, "c"), Some(0), "not due yet: the start's row");
        tokio::time::sleep(Duration::from_millis(350)).await;
        f.set_aside(DeadLetter {
            consumer: "c".into(),
            seq: 3,
            reason: "oversize",
            detail: "too big".into(),
        });
        assert!(f.is_dead(3), "skipped from now on");
        f.advance(4);
        f.set_also("c.other", 1);
        f.persist(false).await;
        // The write runs in the background; a forced one waits for it.
        f.persist(true).await;
        assert_eq!(stored(&path, "c"), Some(4));
        assert_eq!(stored(&path, "c.other"), Some(1));
        let dl = list_dead_letters(&path, &Default::default()).unwrap();
        assert_eq!(
            (dl.len(), dl[0].seq, dl[0].reason.as_str()),
            (1, 3, "oversize")
        );
        // Nothing changed: nothing is written, even when due.
        let before = Cursors::open(&path)
            .unwrap()
            .conn
            .query_row("SELECT updated_at FROM cursors WHERE name = 'c'", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
        f.persist(false).await;
        f.persist(true).await;
        let after = Cursors::open(&path)
            .unwrap()
            .conn
            .query_row("SELECT updated_at FROM cursors WHERE name = 'c'", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap();
        assert_eq!(before, after);
        f.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unclean_starts_read_carefully_and_the_record_died_on_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (path, h, _j) = store(dir.path(), 5).await;
        // Two starts at 0 without a clean stop: careful from the second on.
        drop(Follower::open(plan("c"), &path, h.feed(), Exec::Inline).unwrap());
        let f = Follower::open(plan("c"), &path, h.feed(), Exec::Inline).unwrap();
        assert!(f.marker().on());
        assert_eq!(f.page(0, 100), 1, "one record at a time");
        assert!(f.admit(1).await.unwrap());
        assert!(f.admit(2).await.unwrap());
        // It dies on 2: the next start sets 2 aside (reason crash) and skips it.
        drop(f);
        let f = Follower::open(plan("c"), &path, h.feed(), Exec::Inline).unwrap();
        assert_eq!(h.metrics().consumer_crashes.get(), 1);
        assert!(!f.marker().on(), "the culprit is known");
        assert!(f.is_dead(2));
        assert!(!f.admit(2).await.unwrap());
        let dl = list_dead_letters(&path, &Default::default()).unwrap();
        assert_eq!((dl[0].seq, dl[0].reason.as_str()), (2, "crash"));
        // A clean stop ends the streak.
        f.stop().await;
        let f = Follower::open(plan("c"), &path, h.feed(), Exec::Inline).unwrap();
        assert!(!f.marker().on());
        assert_eq!(f.page(0, 100), 100);
        f.stop().await;
    }

    /// A test consumer: retries a record it cannot finish `tries` times, then sets
    /// it aside and goes on; stops once it has reached the end of the log.
    #[derive(Clone)]
    struct Picky {
        poison: u64,
        tries: u32,
        opened: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Consumer for Picky {
        type Task = (Picky, Follower);

        fn plan(&self) -> Plan {
            plan("picky")
        }

        fn open(self, f: Follower) -> Result<Self::Task, StoreError> {
            self.opened.store(true, Ordering::SeqCst);
            Ok((self, f))
        }

        async fn run((p, mut f): Self::Task, shutdown: CancellationToken) -> Follower {
            let mut failed = 0;
            while !shutdown.is_cancelled() {
                let recs = f.read(f.position(), 10).await.unwrap();
                if recs.is_empty() {
                    break;
                }
                for r in recs {
                    if !f.admit(r.seq).await.unwrap() {
                        f.advance(r.seq);
                        continue;
                    }
                    if r.seq == p.poison {
                        failed += 1;
                        if failed < p.tries {
                            break; // tried again from the cursor
                        }
                        f.set_aside(DeadLetter {
                            consumer: f.name().to_owned(),
                            seq: r.seq,
                            reason: "no_ack",
                            detail: format!("{failed} tries"),
                        });
                    }
                    f.advance(r.seq);
                }
                f.persist(false).await;
            }
            f
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_that_keeps_failing_is_set_aside_after_bounded_retries() {
        let dir = tempfile::tempdir().unwrap();
        let (path, h, j) = store(dir.path(), 6).await;
        let picky = Picky {
            poison: 3,
            tries: 3,
            opened: Arc::default(),
        };
        follow(
            picky.clone(),
            path.clone(),
            h.feed(),
            Exec::Pool,
            CancellationToken::new(),
        )
        .await;
        // Written on stop: the cursor past the record and its entry, together.
        assert_eq!(stored(&path, "picky"), Some(6));
        let dl = list_dead_letters(&path, &Default::default()).unwrap();
        assert_eq!(dl.len(), 1);
        assert_eq!((dl[0].seq, dl[0].detail.as_str()), (3, "3 tries"));
        drop(h);
        j.join().unwrap();
    }

    /// `spawn_thread` runs the consumer on the named thread to the end of the
    /// log (its cursor written); a panic there ends the returned task as a
    /// panic, which the gateway's watcher reports.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_consumer_on_its_own_thread_runs_there_and_its_panic_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let (path, h, j) = store(dir.path(), 4).await;
        let picky = Picky {
            poison: 0,
            tries: 1,
            opened: Arc::default(),
        };
        let thread_name = Arc::new(Mutex::new(None));
        let seen = thread_name.clone();
        let task = spawn_thread(
            "test-consumer",
            move || *seen.lock().unwrap() = std::thread::current().name().map(str::to_owned),
            picky.clone(),
            path.clone(),
            h.feed(),
            CancellationToken::new(),
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("ran to the end of the log")
            .expect("no panic");
        assert_eq!(
            thread_name.lock().unwrap().as_deref(),
            Some("test-consumer")
        );
        assert_eq!(stored(&path, "picky"), Some(4));

        let task = spawn_thread(
            "test-panics",
            || panic!("the consumer's thread fails"),
            picky,
            path,
            h.feed(),
            CancellationToken::new(),
        )
        .unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("ended");
        assert!(ended.is_err_and(|e| e.is_panic()));
        drop(h);
        j.join().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_that_cannot_be_opened_yet_is_retried_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        let feed = Arc::new(Feed::new(8));
        let picky = Picky {
            poison: 0,
            tries: 1,
            opened: Arc::default(),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(follow(
            picky.clone(),
            path.clone(),
            feed,
            Exec::Pool,
            stop.clone(),
        ));
        tokio::time::sleep(super::super::OPEN_RETRY / 2).await;
        assert!(!task.is_finished(), "gave up on the log");
        assert!(!picky.opened.load(Ordering::SeqCst));
        let (h, j) = Store::open(StoreConfig::new(&path)).unwrap();
        h.append(junk(0)).await.unwrap();
        let until = std::time::Instant::now() + super::super::OPEN_RETRY * 10;
        while !task.is_finished() {
            assert!(std::time::Instant::now() < until, "never opened the log");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(picky.opened.load(Ordering::SeqCst));
        assert_eq!(stored(&path, "picky"), Some(1));
        drop(h);
        j.join().unwrap();
    }

    #[tokio::test]
    async fn a_damaged_log_stops_the_consumer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let picky = Picky {
            poison: 0,
            tries: 1,
            opened: Arc::default(),
        };
        let done = tokio::time::timeout(
            Duration::from_secs(10),
            follow(
                picky.clone(),
                path,
                Arc::new(Feed::new(8)),
                Exec::Pool,
                CancellationToken::new(),
            ),
        )
        .await;
        assert!(done.is_ok(), "stopped, not retried");
        assert!(!picky.opened.load(Ordering::SeqCst));
    }
}
