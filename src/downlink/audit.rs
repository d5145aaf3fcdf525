//! Recording how each exchange ended, in the store's `downlink_exchanges`
//! table (the requests and replies themselves are frame log records).
//!
//! A session keeps one [`Audit`] for the exchange in progress, feeds it the
//! engine's steps and the `seq` of the logged request, and hands the finished
//! row to [`record`]. Requests refused before they reach a session (offline,
//! busy) or dropped with it (closed) are recorded with [`unsent`], so the
//! table answers "what happened to every request", not only to those sent.

use crate::store::{NewExchange, StoreHandle};

use super::engine::{Event, Outcome};
use super::{Submit, exe_rtn_meaning, qn_rtn_meaning};

/// The exchange in progress, as its row will read.
#[derive(Debug)]
pub struct Audit {
    row: NewExchange,
}

impl Audit {
    /// A request about to be built and sent (`qn` assigned, nothing written yet).
    pub fn start(sub: &Submit, qn: &str, now_ms: i64) -> Audit {
        let mut row = unsent(sub, &Outcome::Closed, now_ms);
        row.qn = Some(qn.to_owned());
        Audit { row }
    }

    /// Takes in a step of the exchange.
    pub fn on_event(&mut self, ev: &Event) {
        match ev {
            Event::Sent { attempt, .. } => self.row.attempts = *attempt,
            Event::QnRtn { code, .. } => self.row.qn_rtn = Some(*code),
            Event::ExeRtn { code, .. } => self.row.exe_rtn = Some(*code),
            Event::Upload { .. } => self.row.uploads += 1,
            Event::NotifyAck { .. } | Event::Done(_) => {}
        }
    }

    /// The request record was committed at `seq` (the first send's is kept).
    pub fn on_logged(&mut self, seq: u64) {
        self.row.request_seq.get_or_insert(seq);
    }

    /// The row for outcome `o`.
    pub fn finish(mut self, o: &Outcome, now_ms: i64) -> NewExchange {
        self.row.outcome = o.name();
        self.row.detail = detail(o);
        self.row.ended_at_ms = now_ms;
        self.row
    }
}

/// The row of a request that ended before it was sent: refused at submit time
/// (offline, busy), or still queued when its session closed.
pub fn unsent(sub: &Submit, o: &Outcome, now_ms: i64) -> NewExchange {
    let qn = match &sub.action {
        super::Action::Relay { qn, .. } => Some(qn.clone()),
        _ => None,
    };
    NewExchange {
        mn: sub.mn.clone(),
        qn,
        cn: sub.action.cn(),
        origin: sub.origin.clone(),
        requested_at_ms: now_ms,
        ended_at_ms: now_ms,
        outcome: o.name(),
        qn_rtn: None,
        exe_rtn: None,
        attempts: 0,
        uploads: 0,
        request_seq: None,
        detail: detail(o),
    }
}

/// Words for an outcome, as stored in `detail`.
pub fn detail(o: &Outcome) -> String {
    match o {
        Outcome::Success => "done".into(),
        Outcome::Refused(c) => format!("QnRtn={c}: {}", qn_rtn_meaning(*c)),
        Outcome::Failed(c) => format!("ExeRtn={c}: {}", exe_rtn_meaning(*c)),
        Outcome::NoReply { sends } => format!("no 9011 after {sends} sends"),
        Outcome::ExecTimeout => {
            "accepted, then no upload or 9012 within downlink.exec_timeout".into()
        }
        Outcome::Offline => "the device has no live session".into(),
        Outcome::Busy => "the device's downlink queue (downlink.queue) is full".into(),
        Outcome::Closed => "the session ended before the exchange did".into(),
        Outcome::Invalid(m) => m.clone(),
    }
}

/// Counts the outcome and queues the row on the store's writer without
/// waiting (the session never stalls on it). A row that cannot be queued is
/// logged and counted (`hj212_downlink_exchanges_unrecorded_total`). Counted
/// in the store's registry, which in the daemon is the gateway's.
pub fn record(store: &StoreHandle, row: NewExchange) {
    let m = store.metrics();
    m.downlink_exchange(row.outcome);
    let (mn, qn, outcome) = (row.mn.clone(), row.qn.clone(), row.outcome);
    if let Err(e) = store.record_exchange(row) {
        m.downlink_unrecorded.inc();
        tracing::warn!(error = %e, mn = %mn, qn = qn.as_deref().unwrap_or(""), outcome, "downlink exchange outcome not recorded");
    }
}

/// Records a request refused at submit time (no session took it).
pub fn refused(store: &StoreHandle, sub: &Submit, why: super::Refusal) {
    let o = match why {
        super::Refusal::Offline => Outcome::Offline,
        super::Refusal::Busy => Outcome::Busy,
    };
    record(store, unsent(sub, &o, now_ms()));
}

/// The wall clock in UTC unix ms.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
