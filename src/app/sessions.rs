//! MN ownership: which session holds each MN, and with it the MN's downlink.
//!
//! The session that sends an MN's first accepted frame holds the MN and its
//! downlink. A new session for it from the same address supersedes the holder
//! (a device reconnecting after a network drop); from another address it may
//! upload (stored, acked, finding `session.conflict`, counted, a WARN per MN
//! and minute) but the holder keeps the MN until it closes or its device has
//! been silent for `idle_timeout` ([`crate::ingest::owner::claim`]). A password
//! match proves nothing (PW travels in clear text); the address is the real
//! client's (the PROXY header's source behind a balancer).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use crate::downlink::inbox::Inbox;
use crate::downlink::{Refusal, Submit};
use crate::ingest::owner::{self, Claim, Holder};
use crate::protocol;

/// What [`SessionMap`] keeps per MN: the owning session and its
/// [`SessionInfo`] (with its downlink queue, which also carries supersession).
#[derive(Debug, Clone)]
pub(crate) struct Owner {
    /// The session's id.
    pub(crate) id: u64,
    /// The session as `sessions` lists it.
    pub(crate) info: Arc<SessionInfo>,
}

/// A session as `sessions` lists it, kept current by the session.
#[derive(Debug)]
pub struct SessionInfo {
    /// Remote address.
    pub peer: String,
    /// Connected at (unix ms).
    pub since_ms: i64,
    /// The device's address (the PROXY header's source behind a balancer).
    pub(crate) ip: IpAddr,
    /// Its device's last accepted frame (unix ms; 0 before any).
    pub(crate) last_frame_ms: AtomicI64,
    /// What requests to its device echo.
    pub(crate) header: Mutex<DeviceHeader>,
    /// When a conflict over this session's MN was last logged (unix ms), and
    /// how many were not logged since: one WARN per MN and minute.
    pub(crate) conflict_log: Mutex<(i64, u64)>,
    /// Requests for this session's devices (bounded by `[downlink] queue`),
    /// taken one at a time when the engine is idle, and the word that a newer
    /// session took the device over.
    pub(crate) inbox: Inbox,
}

/// What requests to the device echo from its own frames.
#[derive(Debug, Default, Clone)]
pub(crate) struct DeviceHeader {
    /// Dialect of its last accepted frame.
    pub(crate) dialect: Option<protocol::Dialect>,
    /// Its ST.
    pub(crate) st: String,
    /// Its PW.
    pub(crate) pw: String,
}

/// One row of `sessions`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionEntry {
    /// Device MN.
    pub mn: String,
    /// Remote address.
    pub peer: String,
    /// Connected at (unix ms).
    pub since_ms: i64,
    /// Dialect of its last accepted frame (`None` before any).
    pub dialect: Option<&'static str>,
    /// Last accepted frame (unix ms; 0 before any).
    pub last_frame_ms: i64,
    /// Session id (the frame log's `session`).
    pub session: u64,
}

/// Which session currently owns each MN, so a reconnecting device supersedes
/// its stale session (and downlink traffic reaches the live one), while a
/// session from another address cannot take a live device over
/// ([`owner::claim`]).
#[derive(Debug, Default)]
pub struct SessionMap {
    inner: Mutex<HashMap<String, Owner>>,
    /// Per-MN downlink state (QN clock, rate limits, series), kept across sessions.
    pub devices: crate::downlink::Devices,
}

/// What [`SessionMap::claim`] did.
#[derive(Debug)]
pub(crate) enum Claimed {
    /// The MN was free or already ours.
    Took,
    /// Taken from session `.0`, which is told to close.
    Superseded(u64),
    /// A live session from another address keeps it.
    Conflict(Arc<SessionInfo>),
}

impl Owner {
    pub(crate) fn holder(&self) -> Holder {
        Holder {
            id: self.id,
            ip: self.info.ip,
            last_seen_ms: self
                .info
                .last_frame_ms
                .load(Ordering::Relaxed)
                .max(self.info.since_ms),
        }
    }
}

impl SessionInfo {
    /// Whether to log a conflict over this session's MN now (at most once a
    /// minute), and how many went unlogged before it.
    pub(crate) fn conflict_log_due(&self, now_ms: i64) -> Option<u64> {
        let mut g = self.conflict_log.lock().unwrap_or_else(|e| e.into_inner());
        if now_ms.saturating_sub(g.0) >= 60_000 || now_ms < g.0 {
            let unlogged = g.1;
            *g = (now_ms, 0);
            Some(unlogged)
        } else {
            g.1 += 1;
            None
        }
    }
}

impl SessionMap {
    /// Claims `mn` for `owner` under the ownership rule ([`owner::claim`]):
    /// free, same address or a silent holder: taken; a live holder from
    /// another address keeps it.
    pub(crate) fn claim(&self, mn: &str, owner: &Owner, now_ms: i64, idle_ms: i64) -> Claimed {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let held = m.get(mn);
        let rule = owner::claim(
            held.map(Owner::holder).as_ref(),
            owner.id,
            owner.info.ip,
            now_ms,
            idle_ms,
        );
        match (rule, held) {
            (Claim::Conflict, Some(h)) => Claimed::Conflict(h.info.clone()),
            (Claim::Supersede, Some(old)) => {
                old.info.inbox.supersede();
                let old = old.id;
                m.insert(mn.to_owned(), owner.clone());
                Claimed::Superseded(old)
            }
            (Claim::Own, _) => Claimed::Took,
            _ => {
                m.insert(mn.to_owned(), owner.clone());
                Claimed::Took
            }
        }
    }
    /// The live session from another address that holds `mn` against session
    /// `id` at `ip` (the frame is then flagged `session.conflict`), if any.
    pub(crate) fn conflicting(
        &self,
        mn: &str,
        id: u64,
        ip: IpAddr,
        now_ms: i64,
        idle_ms: i64,
    ) -> Option<Arc<SessionInfo>> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let held = m.get(mn)?;
        match owner::claim(Some(&held.holder()), id, ip, now_ms, idle_ms) {
            Claim::Conflict => Some(held.info.clone()),
            _ => None,
        }
    }
    /// Claims `mn` for session `id` only if no other session owns it.
    pub(crate) fn claim_if_free(&self, mn: &str, owner: &Owner) -> bool {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(mn) {
            Some(o) if o.id != owner.id => false,
            _ => {
                m.insert(mn.to_owned(), owner.clone());
                true
            }
        }
    }
    /// Queues a request for the live session of `s.mn` without waiting. Gives
    /// it back when the device has no live session or its queue is full.
    pub fn submit(&self, s: Box<Submit>) -> Result<(), (Box<Submit>, Refusal)> {
        let info = {
            let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&s.mn) {
                Some(o) => o.info.clone(),
                None => return Err((s, Refusal::Offline)),
            }
        };
        info.inbox.try_push(s)
    }
    /// The live sessions, one row per MN, sorted by MN.
    pub fn list(&self) -> Vec<SessionEntry> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<SessionEntry> = m
            .iter()
            .map(|(mn, o)| {
                let h = o.info.header.lock().unwrap_or_else(|e| e.into_inner());
                SessionEntry {
                    mn: mn.clone(),
                    peer: o.info.peer.clone(),
                    since_ms: o.info.since_ms,
                    dialect: h.dialect.map(|d| d.as_str()),
                    last_frame_ms: o.info.last_frame_ms.load(Ordering::Relaxed),
                    session: o.id,
                }
            })
            .collect();
        v.sort_by(|a, b| a.mn.cmp(&b.mn));
        v
    }
    /// Releases `mn` if session `id` still owns it; true when it did.
    pub(crate) fn release(&self, mn: &str, id: u64) -> bool {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(mn).is_some_and(|o| o.id == id) {
            m.remove(mn);
            true
        } else {
            false
        }
    }
    /// Number of MNs with a live session.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    /// True when no MN has a live session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::downlink::test_requests::{n, request as req};

    const IDLE: i64 = 600_000;

    fn owner(id: u64, cap: usize) -> Owner {
        owner_at(id, cap, [127, 0, 0, 1])
    }

    fn owner_at(id: u64, cap: usize, ip: [u8; 4]) -> Owner {
        let info = Arc::new(SessionInfo {
            inbox: Inbox::new(cap),
            peer: "127.0.0.1:1".into(),
            since_ms: 0,
            ip: ip.into(),
            last_frame_ms: AtomicI64::new(0),
            header: Mutex::new(DeviceHeader::default()),
            conflict_log: Mutex::new((i64::MIN, 0)),
        });
        Owner { id, info }
    }

    #[test]
    fn another_address_does_not_take_a_live_mn() {
        let map = SessionMap::default();
        let a = owner_at(1, 4, [10, 0, 0, 1]);
        let b = owner_at(2, 4, [10, 0, 0, 2]);
        assert!(matches!(map.claim("MN", &a, 1_000, IDLE), Claimed::Took));
        a.info.last_frame_ms.store(5_000, Ordering::Relaxed);
        assert!(map.conflicting("MN", 2, b.info.ip, 6_000, IDLE).is_some());
        assert!(matches!(
            map.claim("MN", &b, 6_000, IDLE),
            Claimed::Conflict(_)
        ));
        assert!(!a.info.inbox.is_superseded());
        assert!(map.submit(req("MN", 1)).is_ok());
        assert_eq!(
            n(&a.info.inbox.try_pop().unwrap()),
            1,
            "requests go to the holder"
        );
        // Silent for idle_timeout since its last frame: taken over.
        assert!(
            map.conflicting("MN", 2, b.info.ip, 5_000 + IDLE, IDLE)
                .is_none()
        );
        assert!(matches!(
            map.claim("MN", &b, 5_000 + IDLE, IDLE),
            Claimed::Superseded(1)
        ));
        assert!(a.info.inbox.is_superseded());
        // Rate-limited logging: one per minute per holder, then the count.
        assert_eq!(b.info.conflict_log_due(0), Some(0));
        assert_eq!(b.info.conflict_log_due(59_999), None);
        assert_eq!(b.info.conflict_log_due(30_000), None);
        assert_eq!(b.info.conflict_log_due(60_000), Some(2));
    }

    #[test]
    fn requests_reach_the_live_owner_and_are_bounded() {
        let map = SessionMap::default();
        assert_eq!(map.submit(req("MN1", 0)).unwrap_err().1, Refusal::Offline);
        let a = owner(1, 1);
        assert!(matches!(map.claim("MN1", &a, 0, IDLE), Claimed::Took));
        assert!(map.submit(req("MN1", 1)).is_ok());
        // Full queue: handed back at once.
        let (back, why) = map.submit(req("MN1", 2)).unwrap_err();
        assert_eq!((n(&back), why), (2, Refusal::Busy));
        assert_eq!(n(&a.info.inbox.try_pop().unwrap()), 1);
        // A reconnect takes the MN over: requests go to the new session.
        let b = owner(2, 4);
        assert!(matches!(
            map.claim("MN1", &b, 0, IDLE),
            Claimed::Superseded(1)
        ));
        assert!(a.info.inbox.is_superseded());
        assert!(!b.info.inbox.is_superseded());
        assert!(map.submit(req("MN1", 3)).is_ok());
        assert_eq!(n(&b.info.inbox.try_pop().unwrap()), 3);
        assert!(a.info.inbox.try_pop().is_none());
        assert_eq!(map.list().len(), 1);
        assert_eq!(map.list()[0].session, 2);
        // Released: offline again; a session that ended cannot receive.
        assert!(map.release("MN1", 2));
        assert_eq!(map.submit(req("MN1", 4)).unwrap_err().1, Refusal::Offline);
        let c = owner(3, 4);
        assert!(map.claim_if_free("MN2", &c));
        assert!(c.info.inbox.close().is_empty());
        assert_eq!(
            map.submit(req("MN2", 5)).unwrap_err().1,
            Refusal::Offline,
            "closed queue"
        );
    }
}
