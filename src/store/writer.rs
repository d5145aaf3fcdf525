//! The append path: bounded queue, one writer thread, group commit.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::chain::{GENESIS, HASHED_COLUMNS, record_and_leaf_hash};
use super::feed::Feed;
use super::schema;
use super::{
    Appended, Direction, Kind, NewExchange, NewRecord, StoreConfig, StoreError, StoredRecord,
};
use crate::metrics::Metrics;

/// Longest `raw` accepted. Frames are capped far lower by the codec; this only keeps a
/// caller bug from writing a huge blob into the permanent log.
const MAX_RAW: usize = 16 * 1024 * 1024;

const INSERT_SQL: &str = "INSERT INTO records (seq, received_at_ms, peer, session, direction, \
     kind, raw, dialect, st, cn, mn, qn, data_time, verdict, duplicate, findings, doc, hash) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)";

// The literal WHERE terms repeat the partial index's condition so SQLite can use it
// (a unit test checks the plan). Not forced with INDEXED BY: a missing index should make
// ingestion slow, not stop it.
const RETRANSMISSION_SQL: &str = "SELECT 1 FROM records \
     WHERE direction = 'in' AND kind = 'frame' AND qn IS NOT NULL AND qn <> '' \
     AND mn IS ?1 AND qn = ?2 AND cn IS ?3 LIMIT 1";

/// What the `records_device_dialect` trigger did before `schema::DIALECTS_BY_WRITER`:
/// the MN's dialect, written only when it is new or changed.
pub(crate) const DEVICE_DIALECT_SQL: &str = "INSERT INTO device_dialects (mn, dialect) \
     VALUES (?1, ?2) ON CONFLICT (mn) DO UPDATE SET dialect = excluded.dialect \
     WHERE dialect <> excluded.dialect";

/// Most MNs [`Dialects`] remembers. MNs come off the wire; past this many the
/// memory starts over, which costs one upsert per device that changes nothing.
const DIALECTS_REMEMBERED: usize = 16_384;

/// Longest MN [`Dialects`] remembers, in bytes: the longest the decoder accepts
/// (`field.malformed.mn` is an error past 32). A longer one, which a frame can
/// carry up to its own size, is upserted every time instead, so the memory stays
/// under ~1 MiB whatever the MNs.
const DIALECT_MN_REMEMBERED: usize = 32;

/// The MN and dialect a record tells `device_dialects`, under the conditions the
/// trigger had: an inbound frame with both, from a device connection (a socket
/// address peer; a platform's request about a device carries its name).
fn device_dialect(rec: &NewRecord) -> Option<(&str, &str)> {
    let from_device = rec.direction == super::Direction::In
        && rec.kind == super::Kind::Frame
        && rec.peer.contains(':');
    from_device
        .then(|| Some((rec.mn.as_deref()?, rec.dialect.as_deref()?)))
        .flatten()
}

/// What `device_dialects` holds for the MNs this writer wrote since it started
/// (or since the memory last started over): a device that keeps its dialect
/// costs no statement per frame. Only this writer writes the table; an entry
/// is added after its transaction committed.
#[derive(Default)]
struct Dialects(std::collections::HashMap<Box<str>, Box<str>>);

impl Dialects {
    fn knows(&self, mn: &str, dialect: &str) -> bool {
        self.0.get(mn).is_some_and(|d| **d == *dialect)
    }

    fn learn(&mut self, committed: Vec<(Box<str>, Box<str>)>) {
        for (mn, dialect) in committed {
            if mn.len() > DIALECT_MN_REMEMBERED {
                continue;
            }
            if self.0.len() >= DIALECTS_REMEMBERED && !self.0.contains_key(&mn) {
                self.0.clear();
            }
            self.0.insert(mn, dialect);
        }
    }
}

/// Entry point of the write side.
#[derive(Debug)]
pub struct Store;

impl Store {
    /// Creates the file (and directory) if needed, enables WAL, applies `synchronous`,
    /// migrates the schema, and spawns the writer thread that owns the write connection.
    ///
    /// Blocking (file I/O); call it before serving, or from `spawn_blocking`.
    pub fn open(cfg: StoreConfig) -> Result<(StoreHandle, WriterJoin), StoreError> {
        if cfg.batch_max == 0 {
            return Err(StoreError::InvalidConfig {
                field: "batch_max",
                reason: "must be at least 1",
            });
        }
        if cfg.queue == 0 {
            return Err(StoreError::InvalidConfig {
                field: "queue",
                reason: "must be at least 1",
            });
        }
        let mut conn = schema::open_log(&cfg.path, cfg.sync, cfg.check_tail)?;
        let (next_seq, prev_hash) = load_head(&conn)?;
        let tree = super::merkle::backfill(&mut conn, next_seq - 1)?;
        let counters = Arc::new(Counters::default());
        let checkpointer = Checkpointer::spawn(&cfg, Arc::clone(&counters))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|source| StoreError::Spawn { source })?;
        let (tx, rx) = mpsc::channel(cfg.queue);
        let feed = Arc::new(Feed::with_metrics(
            cfg.feed_records,
            Arc::clone(&cfg.metrics),
        ));
        let writer = Writer {
            feed: Arc::clone(&feed),
            conn,
            next_seq,
            prev_hash,
            tree,
            cfg,
            counters: Arc::clone(&counters),
            checkpointer: Some(checkpointer),
            hash_scratch: Vec::new(),
            finished_pass: 0,
            dialects: Dialects::default(),
        };
        let boost = writer.cfg.writer_boost;
        let thread = std::thread::Builder::new()
            .name("hj212-store-writer".into())
            .spawn(move || {
                raise_priority(boost);
                writer.run(rx, &rt)
            })
            .map_err(|source| StoreError::Spawn { source })?;
        Ok((
            StoreHandle {
                tx,
                counters: Arc::clone(&counters),
                feed,
            },
            WriterJoin { thread, counters },
        ))
    }
}

/// Raises the writer thread `boost` nice steps above the rest of the gateway (see
/// [`crate::priority`]; the README's Architecture has the measurements).
/// Without `CAP_SYS_NICE` or a large enough `RLIMIT_NICE` the kernel refuses; the
/// writer then runs at the gateway's priority, which is correct: an informational
/// line, not an error.
fn raise_priority(boost: u8) {
    if boost == 0 {
        return;
    }
    match crate::priority::shift_current_thread(-i32::from(boost)) {
        Ok(nice) => tracing::debug!(nice, "store writer thread raised"),
        Err(e) => tracing::info!(
            error = %e,
            boost,
            "store writer runs at the gateway's priority ([store] writer_boost needs CAP_SYS_NICE or LimitNICE=, see deploy/hj212-gateway.service)"
        ),
    }
}

/// Reads the chain head and reconciles it with the last stored record.
///
/// The writer continues from the *head* when the log ends before it (deleted tail), so
/// the deletion stays visible as a gap instead of being papered over.
fn load_head(conn: &Connection) -> Result<(u64, [u8; 32]), StoreError> {
    let (head_seq, head_hash): (i64, Vec<u8>) = conn
        .query_row(
            "SELECT last_seq, last_hash FROM meta WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(StoreError::sqlite("read the chain head"))?;
    let head_hash: [u8; 32] = head_hash.try_into().unwrap_or(GENESIS);
    let last: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(StoreError::sqlite("read the last record"))?;
    let last_seq = last.as_ref().map_or(0, |l| l.0);
    if last_seq == head_seq {
        return Ok((head_seq as u64 + 1, head_hash));
    }
    // Every record up to the head sealed into archives: nothing live, nothing lost.
    let archived = super::archive::archived_upto(&super::archive::list(conn)?) as i64;
    if last_seq < archived && archived == head_seq {
        return Ok((head_seq as u64 + 1, head_hash));
    }
    if last_seq < head_seq {
        tracing::error!(
            head_seq,
            last_seq,
            "store log ends before its head: records were deleted; continuing from the head"
        );
        return Ok((head_seq as u64 + 1, head_hash));
    }
    tracing::error!(
        head_seq,
        last_seq,
        "store log has records after its head; continuing after the last record"
    );
    let hash = last.and_then(|l| l.1.try_into().ok()).unwrap_or(GENESIS);
    Ok((last_seq as u64 + 1, hash))
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    commits: AtomicU64,
    failed_batches: AtomicU64,
    failed_records: AtomicU64,
    largest_batch: AtomicU64,
    wal_pages: AtomicU64,
    /// Background checkpoint passes that copied every frame the WAL held when they
    /// began (see [`Writer::finish_checkpoint`]).
    complete_passes: AtomicU64,
    /// Set by `shutdown()`: later appends fail fast instead of queueing.
    closing: AtomicBool,
    /// [`HEALTHY`], [`FAILING`] or [`DAMAGED`]; `why` is written before it.
    condition: AtomicU8,
    /// The last failure, for `/healthz`.
    why: Mutex<String>,
}

/// Commits succeed (or none was tried).
const HEALTHY: u8 = 0;
/// The last commit failed (disk full, read-only, I/O error); the writer keeps
/// trying, with every batch and once per [`PROBE_EVERY`] while idle.
const FAILING: u8 = 1;
/// SQLite reported the file damaged: the writer refuses every later batch.
const DAMAGED: u8 = 2;

/// How often a writer whose commits fail tries a small write while no batch comes,
/// so that health recovers when the disk does, without waiting for traffic.
const PROBE_EVERY: Duration = Duration::from_secs(1);

impl Counters {
    fn set_condition(&self, condition: u8, why: String) {
        *self
            .why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
        self.condition.store(condition, Ordering::Release);
    }

    fn condition(&self) -> u8 {
        self.condition.load(Ordering::Acquire)
    }

    fn snapshot(&self, queued: usize) -> StoreStats {
        StoreStats {
            records_committed: self.records.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            failed_records: self.failed_records.load(Ordering::Relaxed),
            largest_batch: self.largest_batch.load(Ordering::Relaxed),
            wal_pages: self.wal_pages.load(Ordering::Relaxed),
            queued,
        }
    }
}

/// Counters of the writer since [`Store::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Records committed.
    pub records_committed: u64,
    /// Successful transactions (batches).
    pub commits: u64,
    /// Batches rolled back; their waiters got [`StoreError::BatchFailed`].
    pub failed_batches: u64,
    /// Records in failed batches.
    pub failed_records: u64,
    /// Most records committed in one transaction.
    pub largest_batch: u64,
    /// Pages in the WAL at the background checkpointer's last pass. The WAL starts
    /// over once every page has been copied back, so this stays near a quarter
    /// second of commits; a value that keeps growing means something holds an old
    /// snapshot open (a long read) and the WAL cannot start over.
    pub wal_pages: u64,
    /// Append calls waiting in the queue right now.
    pub queued: usize,
}

struct Job {
    recs: Vec<NewRecord>,
    /// Downlink exchange outcomes, inserted in the same transaction.
    exchanges: Vec<NewExchange>,
    reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
}

enum Msg {
    Append(Job),
    Shutdown,
}

/// Cheap, cloneable sender side of the store. Appends resolve after commit.
///
/// When every handle is dropped (or [`shutdown`](Self::shutdown) is called) the writer
/// commits what is queued, checkpoints the WAL and exits; [`WriterJoin::join`] waits
/// for that.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    feed: Arc<Feed>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Append(j) => write!(
                f,
                "Append({} records, {} exchanges)",
                j.recs.len(),
                j.exchanges.len()
            ),
            Msg::Shutdown => f.write_str("Shutdown"),
        }
    }
}

impl StoreHandle {
    /// Appends one record and resolves once the transaction holding it has committed.
    ///
    /// Awaits while the queue is full (backpressure). Cancelling the future after the
    /// record was queued does not un-append it: it is committed, just not acknowledged.
    pub async fn append(&self, rec: NewRecord) -> Result<Appended, StoreError> {
        let mut v = self.append_many(vec![rec]).await?;
        Ok(v.pop().expect("one result per record"))
    }

    /// Appends several records (e.g. everything a session cut from one read) in order,
    /// in the same transaction, as one queue entry. Resolves after commit with one
    /// [`Appended`] per record, in order.
    pub async fn append_many(&self, recs: Vec<NewRecord>) -> Result<Vec<Appended>, StoreError> {
        if recs.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.submit(recs, reply).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues records (in order, one transaction) without waiting for their commit:
    /// waits only while the writer's queue is full. For traffic whose sender is
    /// not acked on durability (a platform's requests and the gateway's answers to
    /// them), so that nobody waits on an fsync per record; a batch that fails is
    /// logged and counted by the writer, and the records are lost with it.
    pub async fn queue(&self, recs: Vec<NewRecord>) -> Result<(), StoreError> {
        if recs.is_empty() {
            return Ok(());
        }
        // Nobody waits for the answer.
        let (reply, _) = oneshot::channel();
        self.submit(recs, reply).await
    }

    /// Validates `recs` and hands them to the writer as one job (waits only
    /// while its queue is full).
    async fn submit(
        &self,
        recs: Vec<NewRecord>,
        reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
    ) -> Result<(), StoreError> {
        if self.counters.closing.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        for rec in &recs {
            validate(rec)?;
        }
        self.tx
            .send(Msg::Append(Job {
                recs,
                exchanges: Vec::new(),
                reply,
            }))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Queues a downlink exchange outcome (table `downlink_exchanges`) without
    /// waiting: it commits with the next batch. Fails at once when the queue is
    /// full or the writer is closed; a failed batch is logged and counted by the
    /// writer (`hj212_downlink_exchanges_unrecorded_total`).
    pub fn record_exchange(&self, e: NewExchange) -> Result<(), StoreError> {
        if self.counters.closing.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        // Nobody waits for the answer: the writer reports failures itself.
        let (reply, _) = oneshot::channel();
        self.tx
            .try_send(Msg::Append(Job {
                recs: Vec::new(),
                exchanges: vec![e],
                reply,
            }))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
            })
    }

    /// Asks the writer to stop: appends queued before this call are committed, appends
    /// after it fail with [`StoreError::Closed`] (on every clone of the handle). Returns
    /// once the request is queued; [`WriterJoin::join`] waits for the writer to exit.
    pub async fn shutdown(&self) {
        self.counters.closing.store(true, Ordering::Release);
        // Err means the writer is already gone: nothing left to stop.
        let _ = self.tx.send(Msg::Shutdown).await;
    }

    /// The writer's commit feed: what consumers read instead of SQLite while they
    /// keep up (see [`Feed`]).
    pub fn feed(&self) -> Arc<Feed> {
        Arc::clone(&self.feed)
    }

    /// The registry the writer counts in ([`StoreConfig::metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.feed.metrics()
    }

    /// Why the log is not taking records right now, `None` while commits succeed:
    /// the last commit failed (disk full, read-only file system, I/O error; cleared
    /// by the next commit that succeeds) or SQLite found the file damaged (the
    /// writer then refuses every batch until the gateway is restarted on a sound
    /// log). What `/healthz` reports.
    pub fn problem(&self) -> Option<String> {
        let c = &self.counters;
        let prefix = match c.condition() {
            FAILING => "frame log commits failing",
            DAMAGED => "frame log damaged, nothing is acknowledged",
            _ => return None,
        };
        let why = c
            .why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(format!("{prefix}: {why}"))
    }

    /// True while the writer thread is running (its queue has a receiver).
    pub fn writer_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Writer counters and current queue depth.
    pub fn stats(&self) -> StoreStats {
        self.counters
            .snapshot(self.tx.max_capacity() - self.tx.capacity())
    }
}

/// Join handle of the writer thread.
#[derive(Debug)]
pub struct WriterJoin {
    thread: JoinHandle<Result<(), StoreError>>,
    counters: Arc<Counters>,
}

impl WriterJoin {
    /// Blocks until the writer has drained the queue, committed, checkpointed and
    /// exited (which happens after every [`StoreHandle`] is dropped or after
    /// [`StoreHandle::shutdown`]). From async code call it in `spawn_blocking`.
    pub fn join(self) -> Result<StoreStats, StoreError> {
        match self.thread.join() {
            Ok(r) => r.map(|()| self.counters.snapshot(0)),
            Err(_) => Err(StoreError::WriterPanicked),
        }
    }

    /// True once the writer thread has exited.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

fn validate(rec: &NewRecord) -> Result<(), StoreError> {
    let bad = |field, reason| Err(StoreError::InvalidRecord { field, reason });
    if rec.raw.is_empty() {
        return bad("raw", "empty");
    }
    if rec.raw.len() > MAX_RAW {
        return bad("raw", "longer than 16 MiB");
    }
    if !is_json_of(&rec.findings, b'[') {
        return bad("findings", "not a JSON array");
    }
    // A document the log does not keep cannot be sealed into it unreadable.
    if rec.doc_stored && !rec.doc.is_empty() && !is_json_of(&rec.doc, b'{') {
        return bad("doc", "neither empty nor a JSON object");
    }
    Ok(())
}

/// JSON whose top-level value opens with `open`. Checked before queueing so a
/// caller bug cannot poison a whole batch or seal unreadable JSON into the chain.
///
/// This runs on every appending task for every record, and a session's records
/// are written by our own serializers (`protocol::json`, serde_json), so release
/// builds check structure only (`protocol::json::well_formed`): one value of the right kind,
/// brackets balanced and matched, strings closed with valid escapes and no raw
/// control characters, nothing after it. That catches what a caller bug does to
/// JSON (truncation, concatenation, unescaped text) at a fraction of a parse.
/// Debug builds, and so every test, also run the full serde parse, which
/// catches token-level slips (`{"a":}`) in the serializers themselves.
fn is_json_of(text: &str, open: u8) -> bool {
    let shape = crate::protocol::json::well_formed(text.as_bytes(), open);
    if cfg!(debug_assertions) {
        shape && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    } else {
        shape
    }
}

struct Writer {
    feed: Arc<Feed>,
    conn: Connection,
    next_seq: u64,
    prev_hash: [u8; 32],
    /// The Merkle tree's right edge at `next_seq - 1` leaves; `None` once the tree
    /// and the records disagree (see [`super::merkle::backfill`]): records are still
    /// logged, the tree no longer grows.
    tree: Option<super::merkle::Frontier>,
    cfg: StoreConfig,
    counters: Arc<Counters>,
    checkpointer: Option<Checkpointer>,
    /// The last of `Counters::complete_passes` this writer finished.
    finished_pass: u64,
    /// What `device_dialects` holds, as far as this writer wrote it.
    dialects: Dialects,
    /// A record's hashed encoding, reused from record to record.
    hash_scratch: Vec<u8>,
}

impl Writer {
    fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        rt: &tokio::runtime::Runtime,
    ) -> Result<(), StoreError> {
        let mut batch: Vec<Job> = Vec::new();
        let mut closing = false;
        // `recv` yields None once every handle is dropped, or after `close()` (on
        // Shutdown) once the queue is drained.
        loop {
            let next = if self.counters.condition() == FAILING {
                rt.block_on(async { tokio::time::timeout(PROBE_EVERY, rx.recv()).await })
            } else {
                Ok(rt.block_on(rx.recv()))
            };
            let first = match next {
                Ok(Some(first)) => first,
                Ok(None) => break,
                Err(_idle) => {
                    self.probe();
                    continue;
                }
            };
            let started = Instant::now();
            let mut n = 0;
            take(first, &mut batch, &mut n, &mut rx, &mut closing);
            let mut lone = true;
            while n < self.cfg.batch_max {
                match rx.try_recv() {
                    Ok(msg) => {
                        lone = false;
                        take(msg, &mut batch, &mut n, &mut rx, &mut closing);
                    }
                    Err(_) => break,
                }
            }
            // Linger only under load (see the module docs): a lone record commits now.
            // The thread sleeps through the linger and then takes what queued up:
            // waking for every append (one context switch each) cost more CPU than
            // the commit it was batching for. Batches fill far slower than
            // `batch_delay` at any rate this box reaches, so one sleep is enough.
            // Not when a quarter of a batch is already here: the previous commit took
            // long enough to gather one, and under saturation the linger only idles
            // the one thread every append queues behind while a full batch waits.
            let gathered = n >= self.cfg.batch_max.div_ceil(4);
            if !lone && !gathered && !self.cfg.batch_delay.is_zero() && !closing {
                let deadline = started + self.cfg.batch_delay;
                if let Some(rest) = deadline.checked_duration_since(Instant::now()) {
                    std::thread::sleep(rest);
                }
                while n < self.cfg.batch_max {
                    match rx.try_recv() {
                        Ok(msg) => take(msg, &mut batch, &mut n, &mut rx, &mut closing),
                        Err(_) => break,
                    }
                }
            }
            if !batch.is_empty() {
                self.commit_and_answer(&mut batch, n);
            }
        }
        if let Some(c) = self.checkpointer.take() {
            c.stop();
        }
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(StoreError::sqlite("checkpoint the WAL at shutdown"))?;
        tracing::info!(next_seq = self.next_seq, "store writer stopped");
        Ok(())
    }

    fn commit_and_answer(&mut self, batch: &mut Vec<Job>, n: usize) {
        let started = Instant::now();
        if self.counters.condition() == DAMAGED {
            // Writing on into a B-tree SQLite found damaged can only spread the
            // damage; nothing is acknowledged until an operator has a sound log.
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(self.damaged()));
            }
            self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            self.counters
                .failed_records
                .fetch_add(n as u64, Ordering::Relaxed);
            crate::log_repeated!(
                error,
                records = n,
                path = %self.cfg.path.display(),
                "frame log damaged: batch refused, nothing acknowledged; restart on a sound log"
            );
            return;
        }
        match self.commit(batch) {
            Ok((results, hashes)) => {
                if self.counters.condition() == FAILING {
                    self.counters.set_condition(HEALTHY, String::new());
                    tracing::info!("frame log commits succeed again");
                }
                let m = &*self.cfg.metrics;
                m.commit_seconds.observe_duration(started.elapsed(), 1);
                if n > 0 {
                    m.commit_batch_records.observe(n as u64);
                }
                m.duplicates
                    .add(results.iter().flatten().filter(|a| a.duplicate).count() as u64);
                let c = &self.counters;
                c.records.fetch_add(n as u64, Ordering::Relaxed);
                c.commits.fetch_add(1, Ordering::Relaxed);
                c.largest_batch.fetch_max(n as u64, Ordering::Relaxed);
                // Into the feed before anyone is answered: whoever saw an append
                // complete finds its record there too.
                let keep = self.feed.capacity() > 0;
                let mut committed = Vec::with_capacity(if keep { n } else { 0 });
                let mut hashes = hashes.into_iter();
                let mut answers = Vec::with_capacity(batch.len());
                for (job, res) in batch.drain(..).zip(results) {
                    if keep {
                        for (rec, a) in job.recs.into_iter().zip(&res) {
                            let hash = hashes.next().unwrap_or_default();
                            committed.push(StoredRecord::committed(rec, *a, hash));
                        }
                    }
                    answers.push((job.reply, res));
                }
                let evicted = self.feed.publish(committed, self.next_seq - 1);
                for (reply, res) in answers {
                    // The waiter may have given up; the record is committed regardless.
                    let _ = reply.send(Ok(res));
                }
                drop(evicted);
                self.finish_checkpoint();
            }
            Err((op, err)) => {
                self.failed(op, &err);
                crate::log_repeated!(error, op, records = n, error = %err, "store batch rolled back; nothing in it acknowledged");
                self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .failed_records
                    .fetch_add(n as u64, Ordering::Relaxed);
                let lost: usize = batch.iter().map(|j| j.exchanges.len()).sum();
                if lost > 0 {
                    crate::log_repeated!(
                        warn,
                        exchanges = lost,
                        "downlink exchange outcomes not recorded"
                    );
                    self.cfg.metrics.downlink_unrecorded.add(lost as u64);
                }
                let source = Arc::new(err);
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(StoreError::BatchFailed {
                        op,
                        records: n,
                        source: Arc::clone(&source),
                    }));
                }
            }
        }
    }

    /// Records why a commit (or probe) failed: damage is final, anything else is
    /// retried.
    fn failed(&self, op: &'static str, err: &rusqlite::Error) {
        if super::check::is_damage(err) {
            if self.counters.condition() != DAMAGED {
                tracing::error!(
                    op,
                    error = %err,
                    path = %self.cfg.path.display(),
                    "frame log damaged: from now on every batch is refused and nothing is acknowledged; run `hj212-gateway verify` and restore the log from a backup"
                );
            }
            self.counters.set_condition(DAMAGED, format!("{op}: {err}"));
        } else {
            let what = match err.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DiskFull) => "disk full: ",
                Some(rusqlite::ErrorCode::ReadOnly) => "read-only: ",
                _ => "",
            };
            self.counters
                .set_condition(FAILING, format!("{what}{op}: {err}"));
        }
    }

    fn damaged(&self) -> StoreError {
        StoreError::Damaged {
            path: self.cfg.path.clone(),
            detail: self
                .counters
                .why
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }

    /// While commits fail and no batch comes: one small write transaction (the
    /// head's `updated_at_ms`, outside the chain) to learn whether the log takes
    /// writes again.
    fn probe(&mut self) {
        let result = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .and_then(|tx| {
                tx.execute(
                    "UPDATE meta SET updated_at_ms = ?1 WHERE id = 1",
                    [chrono::Utc::now().timestamp_millis()],
                )?;
                tx.commit()
            });
        match result {
            Ok(()) => {
                self.counters.set_condition(HEALTHY, String::new());
                tracing::info!("frame log commits succeed again");
            }
            Err(err) => self.failed("probe the log with a small write", &err),
        }
    }

    /// Copies into the database file what this writer committed while the background
    /// checkpointer's last pass ran, so that the WAL restarts.
    ///
    /// SQLite only rewinds the WAL to its start when a write transaction begins with
    /// every frame already copied back ("walRestartLog" in wal.c). The background
    /// pass copies the frames that existed when it began; the writer commits every
    /// few milliseconds meanwhile, so a pass almost never ends with nothing left
    /// over: the WAL grows until the writer's auto-checkpoint backstop (16,384
    /// pages, 256 MiB) runs a checkpoint inside a commit, stalling acks. Right after
    /// the acks of a batch have gone out, copying the few frames of the commits that
    /// overlapped the pass (tens of pages) is short, and the next batch starts the
    /// WAL over, so it stays small and slow commits are rarer (benches/README.md,
    /// "Measurements behind the code").
    fn finish_checkpoint(&mut self) {
        let passes = self.counters.complete_passes.load(Ordering::Acquire);
        if passes == self.finished_pass {
            return;
        }
        self.finished_pass = passes;
        // PASSIVE never waits: with the background pass still running it does nothing.
        if let Err(error) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::debug!(%error, "store writer's closing checkpoint failed");
        }
    }

    /// One transaction for the whole batch. The in-memory head only advances after
    /// COMMIT succeeded; on error the transaction is rolled back when dropped.
    fn commit(&mut self, batch: &[Job]) -> Result<Committed, (&'static str, rusqlite::Error)> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| ("begin the batch", e))?;
        let mut seq = self.next_seq;
        let mut prev = self.prev_hash;
        // Advanced on a copy (at most 64 hashes): a rolled-back batch leaves the
        // in-memory edge where the file's tree is.
        let mut tree = self.tree.clone();
        let mut results = Vec::with_capacity(batch.len());
        let mut hashes = Vec::new();
        let keep = self.feed.capacity() > 0;
        let mut learned = Vec::new();
        {
            let mut probe = tx
                .prepare_cached(RETRANSMISSION_SQL)
                .map_err(|e| ("prepare the retransmission probe", e))?;
            let mut insert = tx
                .prepare_cached(INSERT_SQL)
                .map_err(|e| ("prepare the insert", e))?;
            let mut run = super::merkle::Run::default();
            for job in batch {
                let mut answers = Vec::with_capacity(job.recs.len());
                for rec in &job.recs {
                    let duplicate = is_retransmission_candidate(rec)
                        && probe
                            .exists((rec.mn.as_deref(), rec.qn.as_deref(), rec.cn.as_deref()))
                            .map_err(|e| ("probe for a retransmission", e))?;
                    let cols = columns(rec, seq, duplicate);
                    let (hash, leaf) = record_and_leaf_hash(&prev, &cols, &mut self.hash_scratch)
                        .ok_or(("hash a record", rusqlite::Error::InvalidQuery))?;
                    insert
                        .execute(rusqlite::params_from_iter(
                            cols.into_iter()
                                .chain([ValueRef::Blob(&hash)])
                                .map(ToSqlOutput::Borrowed),
                        ))
                        .map_err(|e| ("insert a record", e))?;
                    if let Some((mn, dialect)) = device_dialect(rec)
                        .filter(|&(mn, dialect)| !self.dialects.knows(mn, dialect))
                    {
                        tx.prepare_cached(DEVICE_DIALECT_SQL)
                            .and_then(|mut upsert| upsert.execute((mn, dialect)))
                            .map_err(|e| ("keep the device's dialect", e))?;
                        learned.push((mn.into(), dialect.into()));
                    }
                    if let Some(tree) = &mut tree {
                        tree.push(leaf, |id, h| run.push(id, h));
                    }
                    answers.push(Appended { seq, duplicate });
                    if keep {
                        hashes.push(hash);
                    }
                    prev = hash;
                    seq += 1;
                }
                for e in &job.exchanges {
                    super::exchanges::insert(&tx, e).map_err(|e| ("insert an exchange", e))?;
                }
                results.push(answers);
            }
            tx.prepare_cached(super::merkle::INSERT_RUN_SQL)
                .and_then(|mut insert| run.write(&mut insert))
                .map_err(|e| ("store the tree hashes", e))?;
        }
        tx.prepare_cached(
            "UPDATE meta SET last_seq = ?1, last_hash = ?2, updated_at_ms = ?3 WHERE id = 1",
        )
        .and_then(|mut head| {
            head.execute((
                (seq - 1) as i64,
                &prev[..],
                chrono::Utc::now().timestamp_millis(),
            ))
        })
        .map_err(|e| ("advance the chain head", e))?;
        tx.commit().map_err(|e| ("commit", e))?;
        self.dialects.learn(learned);
        self.next_seq = seq;
        self.prev_hash = prev;
        self.tree = tree;
        Ok((results, hashes))
    }
}

/// Per job its answers, and (when the feed keeps records) every record's hash in order.
type Committed = (Vec<Vec<Appended>>, Vec<[u8; 32]>);

/// How often the background checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Background WAL checkpointer on its own connection.
///
/// SQLite's automatic checkpoint runs inside the committing transaction, so every
/// ~1000 pages one append batch would also pay for copying the WAL into the database
/// file and `fsync`ing it. A PASSIVE checkpoint from another connection runs
/// concurrently with the writer instead; the writer's own auto-checkpoint stays as a
/// backstop at a much larger WAL size (see `schema::open_writer`).
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Reports the WAL's size and its complete passes in `counters`.
    fn spawn(cfg: &StoreConfig, counters: Arc<Counters>) -> Result<Self, StoreError> {
        let conn = schema::open_side(&cfg.path)?;
        conn.pragma_update(None, "synchronous", cfg.sync.pragma_value())
            .map_err(StoreError::sqlite("set synchronous"))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hj212-store-ckpt".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    // The row is (busy, frames in the WAL, frames copied back).
                    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                        ))
                    }) {
                        Ok((busy, log, done)) => {
                            counters
                                .wal_pages
                                .store(u64::try_from(log).unwrap_or(0), Ordering::Relaxed);
                            if busy == 0 && log > 0 && log == done {
                                counters.complete_passes.fetch_add(1, Ordering::Release);
                            }
                        }
                        Err(error) => {
                            crate::log_repeated!(warn, %error, "store background checkpoint failed")
                        }
                    }
                }
            })
            .map_err(|source| StoreError::Spawn { source })?;
        Ok(Checkpointer { stop, thread })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

fn take(
    msg: Msg,
    batch: &mut Vec<Job>,
    n: &mut usize,
    rx: &mut mpsc::Receiver<Msg>,
    closing: &mut bool,
) {
    match msg {
        // The queue is FIFO: anything behind the Shutdown was sent after it.
        Msg::Append(job) if *closing => {
            let _ = job.reply.send(Err(StoreError::Closed));
        }
        Msg::Append(job) => {
            *n += job.recs.len();
            batch.push(job);
        }
        // Refuse new sends; what is still queued is received (and refused above).
        Msg::Shutdown => {
            *closing = true;
            rx.close();
        }
    }
}

/// A retransmission is an inbound frame with a non-empty QN.
fn is_retransmission_candidate(rec: &NewRecord) -> bool {
    rec.direction == Direction::In
        && rec.kind == Kind::Frame
        && rec.qn.as_deref().is_some_and(|q| !q.is_empty())
}

/// The hashed columns in table order, as they will be stored.
fn columns(rec: &NewRecord, seq: u64, duplicate: bool) -> [ValueRef<'_>; HASHED_COLUMNS] {
    super::chain::hashed_values!(rec, seq, duplicate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(raw: &'static [u8], qn: &str) -> NewRecord {
        NewRecord {
            received_at_ms: 1,
            peer: "10.0.0.1:1".into(),
            session: 1,
            direction: Direction::In,
            kind: Kind::Frame,
            raw: bytes::Bytes::from_static(raw),
            dialect: Some("2017".into()),
            st: Some("32".into()),
            cn: Some("2011".into()),
            mn: Some("MN1".into()),
            qn: Some(qn.into()),
            data_time: None,
            verdict: super::super::Verdict::Accepted,
            findings: "[]".into(),
            doc: "{}".into(),
            doc_stored: true,
        }
    }

    /// A v3 log (retransmission index by MN) moves to the QN-ordered index, and a
    /// retransmission of a frame stored before the migration is still found.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_v3_log_gets_the_qn_ordered_index_and_keeps_finding_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sqlite");
        let cfg = StoreConfig {
            sync: super::super::SyncMode::Off,
            ..StoreConfig::new(&path)
        };
        let (h, join) = Store::open(cfg.clone()).unwrap();
        h.append(inbound(b"##a", "20261128120000001"))
            .await
            .unwrap();
        drop(h);
        tokio::task::spawn_blocking(move || join.join().unwrap())
            .await
            .unwrap();
        {
            // Back to the file as release v3 left it.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "DROP INDEX records_retransmission_qn; \
                 CREATE INDEX records_retransmission ON records (mn, qn, cn) \
                 WHERE direction = 'in' AND kind = 'frame' AND qn IS NOT NULL AND qn <> ''; \
                 DROP TABLE dead_letters; ALTER TABLE cursors DROP COLUMN start_seq; \
                 ALTER TABLE cursors DROP COLUMN starts; ALTER TABLE cursors DROP COLUMN probe_seq; \
                 PRAGMA user_version = 3;",
            )
            .unwrap();
        }
        let (h, join) = Store::open(cfg).unwrap();
        let again = h
            .append(inbound(b"##a", "20261128120000001"))
            .await
            .unwrap();
        let other = h
            .append(inbound(b"##b", "20261128120000002"))
            .await
            .unwrap();
        assert!(again.duplicate && !other.duplicate);
        drop(h);
        tokio::task::spawn_blocking(move || join.join().unwrap())
            .await
            .unwrap();
        let conn = Connection::open(&path).unwrap();
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'records'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(indexes, ["records_retransmission_qn"]);
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::latest_version());
    }

    /// The opcodes of the record insert as `conn` compiles it.
    fn insert_opcodes(conn: &Connection) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN {INSERT_SQL}")).unwrap();
        let unbound = std::iter::repeat_n(rusqlite::types::Null, HASHED_COLUMNS + 1);
        stmt.query_map(rusqlite::params_from_iter(unbound), |r| {
            r.get::<_, String>(1)
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    /// Inserts one row with the given verdict, as the writer would.
    fn insert_verdict(conn: &Connection, seq: i64, verdict: &str) -> rusqlite::Result<usize> {
        conn.execute(
            INSERT_SQL,
            rusqlite::params![
                seq,
                1,
                "p",
                1,
                "in",
                "frame",
                b"##".to_vec(),
                None::<String>,
                None::<String>,
                None::<String>,
                None::<String>,
                None::<String>,
                None::<String>,
                verdict,
                0,
                "[]",
                "{}",
                vec![0u8; 32]
            ],
        )
    }

    /// New logs get 16 KiB pages; a log created with SQLite's default 4 KiB keeps them
    /// (the page size of a WAL file cannot change) and is written as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_logs_get_large_pages_and_old_ones_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let page_size = |p: &std::path::Path| -> i64 {
            Connection::open(p)
                .unwrap()
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        let new = dir.path().join("new.sqlite");
        drop(schema::open_writer(&new, super::super::SyncMode::Off).unwrap());
        assert_eq!(page_size(&new), 16 * 1024);
        let old = dir.path().join("old.sqlite");
        {
            let conn = Connection::open(&old).unwrap();
            conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
                .unwrap();
            conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        assert_eq!(page_size(&old), 4096);
        let cfg = StoreConfig {
            sync: super::super::SyncMode::Off,
            ..StoreConfig::new(&old)
        };
        let (h, join) = Store::open(cfg).unwrap();
        let a = h
            .append(inbound(b"##a", "20261129000000001"))
            .await
            .unwrap();
        assert_eq!(a.seq, 1);
        drop(h);
        tokio::task::spawn_blocking(move || join.join().unwrap())
            .await
            .unwrap();
        assert_eq!(page_size(&old), 4096);
        let n: i64 = Connection::open(&old)
            .unwrap()
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    /// The record insert's opcodes in a new log under `dir`.
    fn fresh_insert_opcodes(dir: &std::path::Path) -> Vec<String> {
        let conn = schema::open_writer(&dir.join("f.sqlite"), super::super::SyncMode::Off).unwrap();
        insert_opcodes(&conn)
    }

    /// No temporary B-tree per row: the `verdict` CHECK is plain comparisons.
    #[test]
    fn the_insert_builds_no_temporary_btree() {
        let dir = tempfile::tempdir().unwrap();
        let ops = fresh_insert_opcodes(dir.path());
        assert!(ops.iter().any(|o| o == "Insert"), "{ops:?}");
        assert!(!ops.iter().any(|o| o == "OpenEphemeral"), "{ops:?}");
    }

    /// No trigger program runs per record insert, in a new log or an upgraded
    /// one: with one, SQLite journals every page the insert touches first
    /// (`schema::DIALECTS_BY_WRITER`).
    #[test]
    fn the_insert_runs_no_trigger() {
        let dir = tempfile::tempdir().unwrap();
        let ops = fresh_insert_opcodes(dir.path());
        assert!(ops.iter().any(|o| o == "Insert"), "{ops:?}");
        assert!(!ops.iter().any(|o| o == "Program"), "{ops:?}");
        let path = dir.path().join("old.sqlite");
        {
            let old = schema::file_at_version(&path, schema::latest_version() as usize - 1);
            assert!(insert_opcodes(&old).iter().any(|o| o == "Program"));
        }
        let upgraded = schema::open_writer(&path, super::super::SyncMode::Off).unwrap();
        assert!(!insert_opcodes(&upgraded).iter().any(|o| o == "Program"));
    }

    /// The dialect memory keeps no MN longer than the decoder accepts and starts
    /// over at its cap, so MNs off the wire cannot grow it.
    #[test]
    fn the_dialect_memory_is_bounded() {
        let mut d = Dialects::default();
        let long = "M".repeat(DIALECT_MN_REMEMBERED + 1);
        d.learn(vec![(long.as_str().into(), "2017".into())]);
        assert!(!d.knows(&long, "2017"));
        d.learn(
            (0..DIALECTS_REMEMBERED)
                .map(|i| (format!("{i:032}").into(), "2017".into()))
                .collect(),
        );
        assert_eq!(d.0.len(), DIALECTS_REMEMBERED);
        d.learn(vec![("new".into(), "2005".into())]);
        assert_eq!(d.0.len(), 1);
        assert!(d.knows("new", "2005") && !d.knows("new", "2017"));
    }

    /// A v4 log gets the comparison form of the `verdict` CHECK in place: its rows
    /// stay, the file stays sound, and the CHECK still refuses what it refused.
    #[test]
    fn a_v4_log_gets_the_verdict_check_rewritten_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sqlite");
        {
            let conn = schema::file_at_version(&path, 4);
            insert_verdict(&conn, 1, "accepted").unwrap();
            assert!(insert_opcodes(&conn).iter().any(|o| o == "OpenEphemeral"));
        }
        let conn = schema::open_writer(&path, super::super::SyncMode::Off).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::latest_version());
        // The migrating connection itself already runs the new schema.
        assert!(!insert_opcodes(&conn).iter().any(|o| o == "OpenEphemeral"));
        let sql: String = conn
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'records'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            sql.contains(
                "CHECK (verdict = 'accepted' OR verdict = 'rejected' OR verdict = 'junk')"
            ) && !sql.contains("verdict IN"),
            "{sql}"
        );
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        for (seq, verdict) in [(2, "rejected"), (3, "junk")] {
            insert_verdict(&conn, seq, verdict).unwrap();
        }
        let err = insert_verdict(&conn, 4, "bogus").unwrap_err();
        assert!(err.to_string().contains("CHECK constraint failed"), "{err}");
        let n: i64 = conn
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
        drop(conn);
        // Another connection opened afterwards reads the new text too.
        let other = schema::open_read_only(&path).unwrap();
        assert!(!insert_opcodes(&other).iter().any(|o| o == "OpenEphemeral"));
    }

    #[test]
    fn the_retransmission_probe_is_one_index_seek() {
        let dir = tempfile::tempdir().unwrap();
        let conn =
            schema::open_writer(&dir.path().join("f.sqlite"), super::super::SyncMode::Off).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {RETRANSMISSION_SQL}"))
            .unwrap()
            .query_map(("m", "q", "c"), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        // One seek on all three columns; the row itself is only read on a hit.
        assert_eq!(plan.len(), 1, "{plan:?}");
        assert!(
            plan[0].starts_with("SEARCH records USING")
                && plan[0].ends_with("INDEX records_retransmission_qn (qn=? AND mn=? AND cn=?)"),
            "{plan:?}"
        );
    }
}
