//! The MN ownership rule, as a pure function of the holder, the claimant and
//! the time: [`crate::app::SessionMap`] applies it under its lock, the ingest
//! core applies it to flag uploads for an MN held elsewhere.

use std::net::IpAddr;

use crate::protocol::{Finding, Severity};

use super::FindingCode;

/// The live session holding an MN, as the ownership rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// Its session id.
    pub id: u64,
    /// Its device's address.
    pub ip: IpAddr,
    /// Its last accepted frame from its device, or its start (unix ms).
    pub last_seen_ms: i64,
}

/// What a session that sent a frame for an MN may do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// No live session holds it: take it.
    Free,
    /// This session holds it already.
    Own,
    /// Take it, closing the holder: the same address (a device reconnecting
    /// after a network drop), or a holder silent for `idle_timeout`.
    Supersede,
    /// A live session from another address holds it: this session may upload
    /// (stored, acked, flagged `session.conflict`) but does not get the MN.
    Conflict,
}

/// The finding on an upload whose MN a live session from `holder` holds.
pub fn conflict_finding(holder: &str) -> Finding {
    Finding::new(
        FindingCode::SessionConflict.as_str(),
        Severity::Warning,
        format!(
            "the MN has a live session from {holder}; this session may upload but does not take the device over"
        ),
    )
}

/// The ownership rule (README, "Devices on the network"). A password match
/// proves nothing (PW travels in clear text), so it is not an input; the
/// address is the real client's (the PROXY header's source when behind a
/// balancer). IPv4-mapped IPv6 addresses compare equal to their IPv4 form.
pub fn claim(holder: Option<&Holder>, id: u64, ip: IpAddr, now_ms: i64, idle_ms: i64) -> Claim {
    match holder {
        None => Claim::Free,
        Some(h) if h.id == id => Claim::Own,
        Some(h) if h.ip.to_canonical() == ip.to_canonical() => Claim::Supersede,
        Some(h) if now_ms.saturating_sub(h.last_seen_ms) >= idle_ms => Claim::Supersede,
        Some(_) => Claim::Conflict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_rule() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let h = Holder {
            id: 1,
            ip: a,
            last_seen_ms: 1_000,
        };
        let idle = 600_000;
        assert_eq!(claim(None, 2, b, 2_000, idle), Claim::Free);
        assert_eq!(claim(Some(&h), 1, b, 2_000, idle), Claim::Own);
        assert_eq!(claim(Some(&h), 2, a, 2_000, idle), Claim::Supersede);
        assert_eq!(claim(Some(&h), 2, mapped, 2_000, idle), Claim::Supersede);
        assert_eq!(claim(Some(&h), 2, b, 2_000, idle), Claim::Conflict);
        assert_eq!(
            claim(Some(&h), 2, b, 1_000 + idle - 1, idle),
            Claim::Conflict
        );
        assert_eq!(claim(Some(&h), 2, b, 1_000 + idle, idle), Claim::Supersede);
        // A clock step backwards never makes the holder look silent.
        assert_eq!(claim(Some(&h), 2, b, i64::MIN, idle), Claim::Conflict);
    }
}
