//! The commit feed: the records the writer has just committed, kept in memory for
//! the log's consumers.
//!
//! # Why
//!
//! Consumers (the MQTT publisher, upstream forwarders, the alarm detector) read the
//! log behind their own persisted cursors. Reading every new record back out of
//! SQLite cost each consumer a query, a row decode and a dozen allocations per
//! record. Worse, with several consumers polling, some reader was nearly always
//! inside a read transaction, so the WAL could never restart: it grew past the
//! auto-checkpoint size and from then on every commit paid for a checkpoint on the
//! ack path (benches/README.md, "Measurements behind the code").
//!
//! # What it is, and is not
//!
//! After each successful commit the writer hands the batch's records, exactly as
//! stored (seq, duplicate flag, hash), to this bounded ring and bumps a
//! [`watch`] of the last seq. A consumer whose cursor falls inside the ring takes
//! records from memory; one behind it (after a restart, during a broker outage)
//! gets `None` from [`Feed::read_after`] and reads SQLite as before until it has
//! caught up. The ring is a cache of the log, not a queue: the writer never waits
//! for it, and evicting the oldest records loses nothing because they are already
//! durable. Only committed records enter it, in seq order, so a consumer can never
//! see a record the log does not hold.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{Reader, StoreError, StoredRecord};
use crate::metrics::Metrics;

/// Bounded in-memory tail of the log (see the module documentation).
#[derive(Debug)]
pub struct Feed {
    ring: Mutex<VecDeque<Arc<StoredRecord>>>,
    cap: usize,
    last: watch::Sender<u64>,
    /// The gateway's registry: consumers count their reads here, and those that
    /// are handed only the feed find the registry through it.
    metrics: Arc<Metrics>,
}

impl Feed {
    /// A feed holding at most `cap` records; 0 keeps none (every read goes to SQLite).
    /// Reads are counted in a registry of its own (see [`Feed::with_metrics`]).
    pub fn new(cap: usize) -> Feed {
        Feed::with_metrics(cap, Arc::default())
    }

    /// Like [`Feed::new`], counting in `metrics`.
    pub fn with_metrics(cap: usize, metrics: Arc<Metrics>) -> Feed {
        Feed {
            ring: Mutex::new(VecDeque::with_capacity(cap.min(1024))),
            cap,
            last: watch::Sender::new(0),
            metrics,
        }
    }

    /// The registry this feed's readers, and the consumers reading it, count in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Most records held.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Adds a committed batch (in seq order; empty when the feed keeps nothing) and
    /// tells the subscribers the log now ends at `last_seq`.
    ///
    /// Returns the records the batch pushed out of the ring, for the caller to
    /// drop when it suits it: freeing a record is a dozen frees of memory other
    /// threads allocated, which the writer does after answering the appenders
    /// rather than before, and not while readers wait for the ring's lock.
    #[must_use = "the evicted records are dropped by the caller, after its answers"]
    pub(crate) fn publish(&self, recs: Vec<StoredRecord>, last_seq: u64) -> Vec<Arc<StoredRecord>> {
        let mut evicted = Vec::new();
        if self.cap > 0 && !recs.is_empty() {
            let fresh: Vec<Arc<StoredRecord>> = recs.into_iter().map(Arc::new).collect();
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            // Contiguity is what lets a reader index by seq; a gap (which the single
            // writer never produces) empties the ring instead of serving around it.
            if ring.back().is_some_and(|b| b.seq + 1 != fresh[0].seq) {
                evicted.extend(ring.drain(..));
            }
            let over = (ring.len() + fresh.len()).saturating_sub(self.cap);
            let over = over.min(ring.len());
            evicted.extend(ring.drain(..over));
            // A batch larger than the ring keeps only its newest records.
            let skip = fresh.len().saturating_sub(self.cap);
            let mut fresh = fresh.into_iter();
            evicted.extend(fresh.by_ref().take(skip));
            ring.extend(fresh);
        }
        if last_seq != *self.last.borrow() {
            self.last.send_replace(last_seq);
        }
        evicted
    }

    /// Up to `limit` records with `seq > after`, in order, when the ring reaches
    /// back to `after + 1` (an empty vector when nothing newer has been committed
    /// since). `None` when `after` is older than the ring, or the ring is empty:
    /// the caller reads SQLite.
    pub fn read_after(&self, after: u64, limit: usize) -> Option<Vec<Arc<StoredRecord>>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let first = ring.front()?.seq;
        if after + 1 < first {
            return None;
        }
        let skip = usize::try_from(after + 1 - first).unwrap_or(usize::MAX);
        Some(ring.iter().skip(skip).take(limit).cloned().collect())
    }

    /// A receiver of the last committed seq, to wait for new records instead of
    /// polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.last.subscribe()
    }
}

/// A consumer's view of the log: the feed when its cursor is inside the ring,
/// SQLite otherwise.
#[derive(Debug)]
pub struct FeedReader {
    feed: Arc<Feed>,
    reader: Reader,
}

impl FeedReader {
    /// Combines the writer's feed with a read-only connection.
    pub fn new(feed: Arc<Feed>, reader: Reader) -> FeedReader {
        FeedReader { feed, reader }
    }

    /// Up to `limit` records with `seq > after`, in seq order, from memory when the
    /// feed has them. Blocking when it falls back to SQLite.
    pub fn read_from(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Arc<StoredRecord>>, StoreError> {
        if let Some(recs) = self.feed.read_after(after, limit) {
            self.feed.metrics.feed_reads.add(recs.len() as u64);
            return Ok(recs);
        }
        let recs = self.reader.read_from(after, limit)?;
        self.feed.metrics.feed_misses.add(recs.len() as u64);
        Ok(recs.into_iter().map(Arc::new).collect())
    }

    /// Like [`read_from`](Self::read_from) for a consumer that only wants inbound
    /// frames: up to `limit` seqs after `after` are covered, the returned records
    /// include every inbound frame among them (the feed may also return other
    /// records; SQLite does not load them), and the second value is the last seq
    /// covered, where the consumer's position moves. Covering fewer than `limit`
    /// seqs means the consumer reached the head.
    pub fn read_inbound_frames(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Arc<StoredRecord>>, u64), StoreError> {
        if let Some(recs) = self.feed.read_after(after, limit) {
            self.feed.metrics.feed_reads.add(recs.len() as u64);
            let through = recs.last().map_or(after, |r| r.seq);
            return Ok((recs, through));
        }
        let (recs, through) = self.reader.read_inbound_frames(after, limit)?;
        self.feed.metrics.feed_misses.add(recs.len() as u64);
        Ok((recs.into_iter().map(Arc::new).collect(), through))
    }

    /// The SQLite side, for everything that is not a page of new records.
    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    /// The feed, e.g. to [`subscribe`](Feed::subscribe).
    pub fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Direction, Kind, Verdict};

    fn rec(seq: u64) -> StoredRecord {
        StoredRecord {
            seq,
            received_at_ms: 0,
            peer: "p".into(),
            session: 1,
            direction: Direction::In,
            kind: Kind::Frame,
            raw: vec![b'#'],
            dialect: None,
            st: None,
            cn: None,
            mn: None,
            qn: None,
            data_time: None,
            verdict: Verdict::Accepted,
            duplicate: false,
            findings: "[]".into(),
            doc: "{}".into(),
            doc_stored: true,
            hash: [0; 32],
        }
    }

    fn seqs(v: Option<Vec<Arc<StoredRecord>>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|r| r.seq).collect())
    }

    #[test]
    fn a_batch_larger_than_the_ring_keeps_its_newest() {
        let f = Feed::new(2);
        let out = f.publish((1..=5).map(rec).collect(), 5);
        assert_eq!(seqs(Some(out)), Some(vec![1, 2, 3]));
        assert_eq!(seqs(f.read_after(3, 10)), Some(vec![4, 5]));
        assert_eq!(seqs(f.read_after(2, 10)), None);
        let out = f.publish(vec![rec(6)], 6);
        assert_eq!(seqs(Some(out)), Some(vec![4]));
        assert_eq!(seqs(f.read_after(4, 10)), Some(vec![5, 6]));
    }

    #[test]
    fn serves_only_what_it_reaches_back_to() {
        let f = Feed::new(4);
        assert_eq!(seqs(f.read_after(0, 10)), None, "empty: read SQLite");
        let _ = f.publish((1..=3).map(rec).collect(), 3);
        assert_eq!(seqs(f.read_after(0, 10)), Some(vec![1, 2, 3]));
        assert_eq!(seqs(f.read_after(1, 1)), Some(vec![2]));
        assert_eq!(seqs(f.read_after(3, 10)), Some(vec![]), "caught up");
        assert_eq!(
            seqs(f.read_after(9, 10)),
            Some(vec![]),
            "ahead (read SQLite first)"
        );
        let out = f.publish((4..=6).map(rec).collect(), 6);
        assert_eq!(
            seqs(Some(out)),
            Some(vec![1, 2]),
            "handed back to the writer"
        );
        // Holds 3..=6 now: a cursor at 1 is behind the ring.
        assert_eq!(seqs(f.read_after(1, 10)), None);
        assert_eq!(seqs(f.read_after(2, 10)), Some(vec![3, 4, 5, 6]));
        assert_eq!(*f.subscribe().borrow(), 6);
    }

    #[test]
    fn a_gap_empties_the_ring_and_zero_capacity_keeps_nothing() {
        let f = Feed::new(8);
        let _ = f.publish((1..=3).map(rec).collect(), 3);
        let out = f.publish(vec![rec(7)], 7);
        assert_eq!(seqs(Some(out)), Some(vec![1, 2, 3]));
        assert_eq!(seqs(f.read_after(3, 10)), None);
        assert_eq!(seqs(f.read_after(6, 10)), Some(vec![7]));
        let z = Feed::new(0);
        let _ = z.publish(Vec::new(), 1);
        assert_eq!(seqs(z.read_after(0, 10)), None);
        assert_eq!(*z.subscribe().borrow(), 1, "still wakes subscribers");
    }
}
