//! Junk coalescing (issue 18): a stream of `#` is cut into 1-2 byte junk items,
//! and one record (a few hundred bytes) per item grew the log by two orders of
//! magnitude more than the input (benches/README.md, "Measurements behind the
//! code"). Bad input is still data (every junk byte is stored, byte-exact, in
//! order), but consecutive junk items of a session become one record: a *junk
//! run* that ends when a frame arrives, when the connection ends, or when it
//! holds `[server] junk_record_bytes`. Its document keeps one finding per
//! reason (with item and byte counts) and the first [`JUNK_PIECES_LISTED`]
//! items' offsets, so its size does not grow with the number of items. A run
//! is held in memory only until it ends, at most `junk_record_bytes` plus one
//! item (an item is at most `max_frame_bytes`). Junk is never acked, so
//! holding it back delays nothing a device waits for.

use bytes::{Bytes, BytesMut};

use crate::protocol::framing::JunkReason;
use crate::protocol::json::{self, JunkPiece};
use crate::store::{Direction, Kind, NewRecord, Verdict};

/// How many items a junk record lists by offset; the rest are only counted.
pub const JUNK_PIECES_LISTED: usize = 8;

/// Upper bound on a junk record's `doc` plus `findings` text, whatever its
/// items: 5 reasons and [`JUNK_PIECES_LISTED`] pieces with 20-digit numbers
/// (measured at ~1.7 KB; the fuzz target and a unit test check it).
pub const JUNK_DOC_MAX: usize = 2560;

/// Why a junk run ended (the `end` label of `hj212_junk_records_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// A frame followed it.
    Frame,
    /// It reached `[server] junk_record_bytes`.
    Cap,
    /// The connection ended (closed, timed out, superseded, shut down).
    Close,
}

impl RunEnd {
    /// Every cause, in label order.
    pub const ALL: [RunEnd; 3] = [RunEnd::Frame, RunEnd::Cap, RunEnd::Close];

    /// Stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RunEnd::Frame => "frame",
            RunEnd::Cap => "cap",
            RunEnd::Close => "close",
        }
    }
}

/// The bytes of a run: most runs are one item (a modem string before a
/// frame), kept as the item's own `Bytes` without a copy.
#[derive(Debug)]
enum Pending {
    One(Bytes),
    Many(BytesMut),
}

/// Consecutive junk items of one session, not yet stored.
#[derive(Debug)]
pub struct JunkRun {
    bytes: Pending,
    /// Items and bytes per reason, indexed by [`JunkReason::index`].
    by_reason: [(u64, u64); 5],
    pieces: Vec<JunkPiece>,
    /// When its first item was received (unix ms): the record's time.
    received_at_ms: i64,
}

impl JunkRun {
    fn new(bytes: Bytes, reason: JunkReason, received_at_ms: i64) -> JunkRun {
        let mut run = JunkRun {
            bytes: Pending::One(Bytes::new()),
            by_reason: [(0, 0); 5],
            pieces: Vec::new(),
            received_at_ms,
        };
        run.count(0, bytes.len(), reason);
        run.bytes = Pending::One(bytes);
        run
    }

    fn count(&mut self, at: usize, len: usize, reason: JunkReason) {
        let r = &mut self.by_reason[reason.index()];
        r.0 += 1;
        r.1 += len as u64;
        if self.pieces.len() < JUNK_PIECES_LISTED {
            self.pieces.push(JunkPiece {
                at,
                len,
                reason: reason.as_str(),
            });
        }
    }

    fn push(&mut self, bytes: &[u8], reason: JunkReason) {
        let at = self.len();
        self.count(at, bytes.len(), reason);
        match &mut self.bytes {
            Pending::Many(b) => b.extend_from_slice(bytes),
            Pending::One(first) => {
                let mut b = BytesMut::with_capacity(first.len() + bytes.len());
                b.extend_from_slice(first);
                b.extend_from_slice(bytes);
                self.bytes = Pending::Many(b);
            }
        }
    }

    /// Bytes in the run.
    pub fn len(&self) -> usize {
        match &self.bytes {
            Pending::One(b) => b.len(),
            Pending::Many(b) => b.len(),
        }
    }

    /// Always false: a run starts with an item, and items are never empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Junk items in the run.
    pub fn items(&self) -> u64 {
        self.by_reason.iter().map(|r| r.0).sum()
    }

    /// The run as one junk record of session `session` from `peer`.
    pub fn record(self, peer: &str, session: u64) -> NewRecord {
        let reasons: Vec<(&str, u64, u64)> = JunkReason::ALL
            .iter()
            .zip(self.by_reason)
            .filter(|(_, (n, _))| *n > 0)
            .map(|(r, (n, b))| (r.as_str(), n, b))
            .collect();
        let doc = json::junk_run_json(&reasons, &self.pieces, None);
        let raw = match self.bytes {
            Pending::One(b) => b,
            Pending::Many(b) => b.freeze(),
        };
        NewRecord {
            received_at_ms: self.received_at_ms,
            peer: peer.to_owned(),
            session,
            direction: Direction::In,
            kind: Kind::Junk,
            raw,
            dialect: None,
            st: None,
            cn: None,
            mn: None,
            qn: None,
            data_time: None,
            verdict: Verdict::Junk,
            findings: doc["findings"].to_string(),
            doc: serde_json::Value::Object(doc).to_string(),
            doc_stored: true,
        }
    }
}

/// The junk run a session is building, if any. Boxed: most sessions never
/// hold one, and the session's idle size is budgeted (`idle_size` test).
#[derive(Debug, Default)]
pub struct JunkCoalescer {
    run: Option<Box<JunkRun>>,
}

impl JunkCoalescer {
    /// Adds one junk item received at `now_ms`. Returns the run once it holds
    /// at least `cap` bytes (so a record is at most `cap - 1` bytes plus one item).
    pub fn push(
        &mut self,
        bytes: Bytes,
        reason: JunkReason,
        now_ms: i64,
        cap: usize,
    ) -> Option<Box<JunkRun>> {
        match &mut self.run {
            Some(run) => run.push(&bytes, reason),
            None => self.run = Some(Box::new(JunkRun::new(bytes, reason, now_ms))),
        }
        if self.pending() >= cap {
            self.run.take()
        } else {
            None
        }
    }

    /// Ends the run (a frame follows, or the connection ended).
    pub fn take(&mut self) -> Option<Box<JunkRun>> {
        self.run.take()
    }

    /// Bytes held back.
    pub fn pending(&self) -> usize {
        self.run.as_ref().map_or(0, |r| r.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ends_are_the_metric_labels() {
        let names: Vec<&str> = RunEnd::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(names, crate::metrics::JUNK_RUN_ENDS);
    }

    #[test]
    fn reasons_index_their_own_slot() {
        for (i, r) in JunkReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn a_run_is_the_items_concatenated_with_a_bounded_doc() {
        let mut c = JunkCoalescer::default();
        let mut sent = Vec::new();
        for i in 0..10_000u32 {
            let b = if i % 3 == 0 { &b"#"[..] } else { &b"##x"[..] };
            sent.extend_from_slice(b);
            let reason = JunkReason::ALL[(i % 5) as usize];
            assert!(
                c.push(Bytes::copy_from_slice(b), reason, 7, 1 << 20)
                    .is_none()
            );
        }
        let run = c.take().expect("a run");
        assert_eq!(run.items(), 10_000);
        let rec = run.record("10.0.0.1:1", 3);
        assert_eq!(rec.raw, sent);
        assert_eq!(rec.received_at_ms, 7);
        assert!(rec.doc.len() + rec.findings.len() <= JUNK_DOC_MAX);
        let doc: serde_json::Value = serde_json::from_str(&rec.doc).unwrap();
        assert_eq!(doc["items"], 10_000);
        assert_eq!(doc["pieces"].as_array().unwrap().len(), JUNK_PIECES_LISTED);
        assert_eq!(doc["pieces"][1]["at"], 1);
        assert_eq!(doc["pieces_omitted"], 10_000 - JUNK_PIECES_LISTED);
        assert_eq!(doc["findings"].as_array().unwrap().len(), 5);
        assert!(c.take().is_none());
    }

    #[test]
    fn the_largest_doc_stays_under_its_bound() {
        let big = Bytes::from(vec![b'x'; 1]);
        let mut run = JunkRun::new(big, JunkReason::NoHeader, i64::MIN);
        for r in JunkReason::ALL.iter().cycle().take(JUNK_PIECES_LISTED) {
            run.push(b"x", *r);
        }
        // Counts as large as they can get.
        run.by_reason = [(u64::MAX / 8, u64::MAX / 8); 5];
        for p in &mut run.pieces {
            p.at = usize::MAX;
            p.len = usize::MAX;
            p.reason = "bad_length";
        }
        let rec = run.record("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", u64::MAX);
        assert!(
            rec.doc.len() + rec.findings.len() <= JUNK_DOC_MAX,
            "{} + {}",
            rec.doc.len(),
            rec.findings.len()
        );
    }

    #[test]
    fn one_item_reads_as_a_junk_item_always_did() {
        let mut c = JunkCoalescer::default();
        c.push(Bytes::from_static(b"AT+OK"), JunkReason::NoHeader, 1, 4096);
        let rec = c.take().unwrap().record("p", 1);
        let old = json::junk_json(b"AT+OK", "no_header", false);
        assert_eq!(rec.doc, serde_json::Value::Object(old).to_string());
    }

    #[test]
    fn a_run_ends_at_the_cap_with_its_last_item_whole() {
        let mut c = JunkCoalescer::default();
        assert!(
            c.push(Bytes::from(vec![b'#'; 900]), JunkReason::BadLength, 1, 1024)
                .is_none()
        );
        let run = c
            .push(Bytes::from(vec![b'z'; 300]), JunkReason::NoHeader, 2, 1024)
            .expect("full");
        assert_eq!(run.len(), 1200);
        assert_eq!(c.pending(), 0);
    }
}
