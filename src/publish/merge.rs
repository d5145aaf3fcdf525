//! Split uploads (PNUM/PNO): one merged message per (MN, CN, DataTime).
//!
//! A logger that cannot fit a data set in one frame sends PNUM packets numbered
//! PNO 1..=PNUM. Besides each packet's own message, consumers get one message
//! with the union of the packets' `values` and their `seqs`, once every packet
//! is in or after `merge_wait` (then with the finding `packets.incomplete`).
//!
//! Time is the log's time (the `received_at` of the newest record seen), not the
//! wall clock, so replaying an old backlog merges exactly as live traffic did;
//! the publisher adds the wall clock only once it has caught up. Nothing here is
//! persisted: the publisher keeps a second cursor at the lowest seq of any open
//! group and rebuilds groups from the log on start.
//!
//! # Bounds
//!
//! PNUM and PNO come off the wire (up to 4294967295), and a packet that is
//! acknowledged is read again on every restart, so anything sized by them
//! would crash the publisher on every start. Nothing here is: every quantity
//! has a cap from [`Limits`], and each cap that bites is counted by [`Limit`].
//!
//! - A split upload announcing more than `max_packets` packets is never
//!   buffered: each packet goes out alone on the merged topic with the finding
//!   `packets.not_merged` ([`Limit::Packets`]). A group also goes out once it
//!   holds `max_packets` packets (resent PNOs count).
//! - A merged message stays within `max_message` bytes (payload plus the MN and
//!   CN topic levels): a group that would outgrow it goes out as it is, and a
//!   packet too large on its own goes out without its values, which its own
//!   message carries ([`Limit::Size`]).
//! - All open groups together hold at most `max_bytes` (values kept as JSON
//!   text, plus a fixed cost per packet and per group); beyond it the oldest
//!   groups go out incomplete ([`Limit::Bytes`]). At most `max_groups` groups
//!   are open ([`Limit::Groups`]).
//! - The `packets.incomplete` detail names the first few missing PNOs and a
//!   count, never the whole list.
//! - Header fields longer than [`MAX_FIELD`] (real ones are at most 24
//!   characters) are not merged at all ([`Limit::Fields`]), so the fixed part
//!   of a merged message always fits.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{Map, Value};

/// Finding code of a merged message that is missing packets.
pub const PACKETS_INCOMPLETE: &str = "packets.incomplete";
/// Finding code of a packet published alone on the merged topic (not merged).
pub const PACKETS_NOT_MERGED: &str = "packets.not_merged";

/// Longest MN, CN, ST or DataTime a packet may have to be merged (bytes).
pub const MAX_FIELD: usize = 64;
/// Smallest `max_message` from which every message is guaranteed to fit: the
/// fixed part of a message with the longest header fields merged.
pub const MIN_MESSAGE: usize = 4096;
/// Missing PNOs named in a `packets.incomplete` detail.
const MISSING_NAMED: usize = 8;
/// Memory accounted for an open group besides its strings (map entries, struct).
const GROUP_COST: usize = 192;
/// Memory accounted for each packet pushed into a group besides its values text.
const PACKET_COST: usize = 64;
/// Upper bound of a merged message's JSON besides its variable parts: the keys,
/// `pnum`, and one finding with the longest detail this module writes.
const FIXED_WIRE: usize = 1024;
/// Upper bound of one `seqs` or `pnos` entry (u64 digits and a comma).
const NUMBER_WIRE: usize = 21;

/// A cap of the merger that made it publish something early, or alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// PNUM above `merge_max_packets` (published packet by packet), or a group
    /// that reached `merge_max_packets` packets.
    Packets = 0,
    /// `merge_max_groups` groups were open: the oldest went out incomplete.
    Groups = 1,
    /// `merge_max_bytes` held across open groups: the oldest went out incomplete.
    Bytes = 2,
    /// The merged message would exceed `max_packet_size`: the group went out as it
    /// was, or a packet went out without its values.
    Size = 3,
    /// A header field longer than [`MAX_FIELD`]: the packet was not merged.
    Fields = 4,
}

impl Limit {
    /// Every limit, in exposition order.
    pub const ALL: [Limit; 5] = [
        Limit::Packets,
        Limit::Groups,
        Limit::Bytes,
        Limit::Size,
        Limit::Fields,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Packets => "packets",
            Limit::Groups => "groups",
            Limit::Bytes => "bytes",
            Limit::Size => "size",
            Limit::Fields => "fields",
        }
    }

    /// The config key behind the limit, for finding details.
    fn key(self) -> &'static str {
        match self {
            Limit::Packets => "merge_max_packets",
            Limit::Groups => "merge_max_groups",
            Limit::Bytes => "merge_max_bytes",
            Limit::Size => "max_packet_size",
            Limit::Fields => "the header field limit",
        }
    }
}

/// The merger's caps (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How long a group waits for missing packets (log time).
    pub wait: Duration,
    /// Most groups open at once.
    pub max_groups: usize,
    /// Most packets in one group; a PNUM above it is not merged.
    pub max_packets: u64,
    /// Most bytes held by all open groups together.
    pub max_bytes: usize,
    /// Most bytes of one merged message: payload plus MN and CN (the topic
    /// levels that vary). Guaranteed from [`MIN_MESSAGE`] up; below it a message
    /// without values may still exceed it (the publisher then sets it aside).
    pub max_message: usize,
}

/// One packet of a split upload, taken from its payload object.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Log position.
    pub seq: u64,
    /// `received_at` in unix milliseconds.
    pub received_ms: i64,
    /// MN.
    pub mn: String,
    /// CN.
    pub cn: String,
    /// ST, if any.
    pub st: Option<String>,
    /// DataTime (RFC 3339), or the QN when the packet has none.
    pub data_time: String,
    /// PNUM.
    pub pnum: u64,
    /// PNO.
    pub pno: u64,
    /// The packet's `values`.
    pub values: Map<String, Value>,
}

impl Part {
    /// The split-upload packet in `obj` (a `hj212.frame.v1` object), if it is one.
    pub fn from_object(obj: &Map<String, Value>, seq: u64, received_ms: i64) -> Option<Part> {
        let pnum = obj.get("pnum").and_then(Value::as_u64)?;
        let pno = obj.get("pno").and_then(Value::as_u64)?;
        if pnum < 2 || pno == 0 || pno > pnum {
            return None;
        }
        let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(Part {
            seq,
            received_ms,
            mn: text("mn")?,
            cn: text("cn")?,
            st: text("st"),
            data_time: text("data_time").or_else(|| text("qn"))?,
            pnum,
            pno,
            values: match obj.get("values") {
                Some(Value::Object(m)) => m.clone(),
                _ => Map::new(),
            },
        })
    }

    fn fields_ok(&self) -> bool {
        [&self.mn, &self.cn, &self.data_time]
            .into_iter()
            .chain(self.st.as_ref())
            .all(|s| s.len() <= MAX_FIELD)
    }
}

/// A merged message ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// Lowest seq of the group's packets.
    pub min_seq: u64,
    /// MN (topic level).
    pub mn: String,
    /// CN (topic level).
    pub cn: String,
    /// True when every packet arrived.
    pub complete: bool,
    /// JSON payload.
    pub payload: Vec<u8>,
}

type Key = (String, String, String);

#[derive(Debug)]
struct Group {
    st: Option<String>,
    pnum: u64,
    first_ms: i64,
    min_seq: u64,
    seqs: Vec<u64>,
    /// PNO -> the packet's `values` as JSON text (text is smaller than a
    /// `serde_json::Map` and its length is exactly what is accounted).
    parts: BTreeMap<u64, String>,
    /// Bytes accounted against `max_bytes`.
    held: usize,
    /// Upper bound of the merged message's size (payload plus MN and CN).
    wire: usize,
}

/// Why a group is published.
#[derive(Debug, Clone, Copy)]
enum Why {
    Complete,
    Waited,
    Early(Limit),
    /// A packet published by itself; `false` when its values were left out.
    Alone(Limit, bool),
}

/// Open split-upload groups.
#[derive(Debug)]
pub struct Merger {
    limits: Limits,
    wait_ms: i64,
    log_ms: i64,
    groups: HashMap<Key, Group>,
    by_seq: BTreeMap<u64, Key>,
    held: usize,
    limited: [u64; Limit::ALL.len()],
}

impl Merger {
    /// A merger with the given caps (zero groups or packets are raised to one).
    pub fn new(limits: Limits) -> Merger {
        let limits = Limits {
            max_groups: limits.max_groups.max(1),
            max_packets: limits.max_packets.max(1),
            ..limits
        };
        Merger {
            wait_ms: i64::try_from(limits.wait.as_millis()).unwrap_or(i64::MAX),
            limits,
            log_ms: i64::MIN,
            groups: HashMap::new(),
            by_seq: BTreeMap::new(),
            held: 0,
            limited: [0; Limit::ALL.len()],
        }
    }

    /// The caps in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Adds a packet; returns the groups it completed or pushed out (a limit or
    /// age), or the packet alone when it cannot be merged.
    pub fn push(&mut self, p: Part) -> Vec<Merged> {
        let mut out = Vec::new();
        self.log_ms = self.log_ms.max(p.received_ms);
        self.push_inner(p, &mut out);
        out.extend(self.expire(self.log_ms));
        out
    }

    fn push_inner(&mut self, p: Part, out: &mut Vec<Merged>) {
        if !p.fields_ok() {
            // Its own message still carries it; a merged one could not be bounded.
            self.count(Limit::Fields);
            return;
        }
        let text = serde_json::to_string(&p.values).unwrap_or_else(|_| "{}".into());
        let key = (p.mn, p.cn, p.data_time);
        let key_held = GROUP_COST
            + key.0.len()
            + key.1.len()
            + key.2.len()
            + p.st.as_ref().map_or(0, String::len);
        let part_held = PACKET_COST + text.len();
        let part_wire = text.len() + 1 + 2 * NUMBER_WIRE;
        let skeleton = skeleton_wire(&key, p.st.as_deref());
        let fits = skeleton + part_wire <= self.limits.max_message;
        let alone =
            if p.pnum < 2 || p.pno == 0 || p.pno > p.pnum || p.pnum > self.limits.max_packets {
                Some(Limit::Packets)
            } else if !fits {
                Some(Limit::Size)
            } else if key_held + part_held > self.limits.max_bytes {
                Some(Limit::Bytes)
            } else {
                None
            };
        if let Some(limit) = alone {
            self.count(limit);
            let g = Group {
                st: p.st,
                pnum: p.pnum,
                first_ms: p.received_ms,
                min_seq: p.seq,
                seqs: vec![p.seq],
                // Values too large for any merged message stay in the packet's own.
                parts: BTreeMap::from([(p.pno, if fits { text } else { "{}".into() })]),
                held: 0,
                wire: 0,
            };
            out.push(finish(key, g, Why::Alone(limit, fits), &self.limits));
            return;
        }
        if let Some(g) = self.groups.get(&key) {
            let early = if g.wire + part_wire > self.limits.max_message {
                Some(Limit::Size)
            } else if g.seqs.len() as u64 >= self.limits.max_packets {
                Some(Limit::Packets)
            } else {
                None
            };
            if let Some(limit) = early {
                self.count(limit);
                out.extend(self.close(&key, Why::Early(limit)));
            }
        }
        if !self.groups.contains_key(&key) && self.groups.len() >= self.limits.max_groups {
            self.count(Limit::Groups);
            out.extend(self.close_oldest(Why::Early(Limit::Groups)));
        }
        // Oldest first until the packet fits; it fits in an empty merger (checked above).
        loop {
            let need = part_held
                + if self.groups.contains_key(&key) {
                    0
                } else {
                    key_held
                };
            if self.held + need <= self.limits.max_bytes {
                break;
            }
            self.count(Limit::Bytes);
            match self.close_oldest(Why::Early(Limit::Bytes)) {
                Some(m) => out.push(m),
                None => break,
            }
        }
        let g = match self.groups.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                self.by_seq.insert(p.seq, key.clone());
                self.held += key_held;
                e.insert(Group {
                    st: p.st,
                    pnum: p.pnum,
                    first_ms: p.received_ms,
                    min_seq: p.seq,
                    seqs: Vec::new(),
                    parts: BTreeMap::new(),
                    held: key_held,
                    wire: skeleton,
                })
            }
        };
        g.seqs.push(p.seq);
        g.pnum = g.pnum.max(p.pnum);
        g.held += part_held;
        g.wire += part_wire;
        self.held += part_held;
        if let Some(old) = g.parts.insert(p.pno, text) {
            // A resent PNO replaces the earlier values; its seq stays listed.
            g.held -= old.len();
            g.wire -= old.len() + 1 + NUMBER_WIRE;
            self.held -= old.len();
        }
        if g.min_seq > p.seq {
            // Seqs arrive in log order; this only guards the by_seq index.
            let old = g.min_seq;
            g.min_seq = p.seq;
            self.by_seq.remove(&old);
            self.by_seq.insert(p.seq, key.clone());
        }
        if g.parts.len() as u64 >= g.pnum {
            out.extend(self.close(&key, Why::Complete));
        }
    }

    /// Publishes (incomplete) every group older than `merge_wait` at `now_ms`.
    pub fn expire(&mut self, now_ms: i64) -> Vec<Merged> {
        let mut due: Vec<(u64, Key)> = self
            .groups
            .iter()
            .filter(|(_, g)| g.first_ms.saturating_add(self.wait_ms) < now_ms)
            .map(|(k, g)| (g.min_seq, k.clone()))
            .collect();
        due.sort();
        due.into_iter()
            .filter_map(|(_, k)| self.close(&k, Why::Waited))
            .collect()
    }

    /// Publishes every open group, oldest first, as it is.
    pub fn drain(&mut self) -> Vec<Merged> {
        let mut out = Vec::new();
        while let Some(m) = self.close_oldest(Why::Waited) {
            out.push(m);
        }
        out
    }

    /// Lowest seq of any open group.
    pub fn lowest_open_seq(&self) -> Option<u64> {
        self.by_seq.keys().next().copied()
    }

    /// Number of open groups.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// True when no group is open.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Bytes held by the open groups, as accounted against `max_bytes`.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// How often each [`Limit`] bit since the last call (indexed by `Limit as usize`).
    pub fn take_limited(&mut self) -> [u64; Limit::ALL.len()] {
        std::mem::take(&mut self.limited)
    }

    /// Recomputes the accounting from scratch and panics if it drifted (fuzzing).
    #[doc(hidden)]
    pub fn assert_consistent(&self) {
        let held: usize = self.groups.values().map(|g| g.held).sum();
        assert_eq!(held, self.held, "held bytes drifted");
        assert_eq!(self.by_seq.len(), self.groups.len(), "index drifted");
        for (k, g) in &self.groups {
            assert_eq!(self.by_seq.get(&g.min_seq), Some(k), "index drifted");
            let texts: usize = g.parts.values().map(String::len).sum();
            let key_held = GROUP_COST
                + k.0.len()
                + k.1.len()
                + k.2.len()
                + g.st.as_ref().map_or(0, String::len);
            assert_eq!(g.held, key_held + texts + PACKET_COST * g.seqs.len());
            assert!(g.seqs.len() as u64 <= self.limits.max_packets);
            assert!(g.wire <= self.limits.max_message);
        }
    }

    fn count(&mut self, l: Limit) {
        self.limited[l as usize] += 1;
    }

    fn close(&mut self, key: &Key, why: Why) -> Option<Merged> {
        let g = self.groups.remove(key)?;
        self.by_seq.remove(&g.min_seq);
        self.held -= g.held;
        Some(finish(key.clone(), g, why, &self.limits))
    }

    fn close_oldest(&mut self, why: Why) -> Option<Merged> {
        let key = self.by_seq.values().next()?.clone();
        self.close(&key, why)
    }
}

/// JSON length of a string (quotes and escapes included).
fn json_len(s: &str) -> usize {
    serde_json::to_string(s).map_or(s.len() * 6 + 2, |t| t.len())
}

/// Upper bound of a merged message without values, seqs and PNOs.
fn skeleton_wire((mn, cn, data_time): &Key, st: Option<&str>) -> usize {
    FIXED_WIRE
        + json_len(mn)
        + json_len(cn)
        + json_len(data_time)
        + st.map_or(4, json_len)
        + mn.len()
        + cn.len()
}

/// The `packets.incomplete` detail: counts, the first few missing PNOs, and why
/// the group went out. Bounded whatever PNUM says.
fn incomplete_detail(g: &Group, why: Why) -> String {
    let have = g.parts.len() as u64;
    let missing_count = g.pnum.saturating_sub(have);
    // Each PNO in `parts` is skipped once, so this visits at most
    // parts + MISSING_NAMED numbers.
    let named: Vec<String> = (1..=g.pnum)
        .filter(|n| !g.parts.contains_key(n))
        .take(MISSING_NAMED)
        .map(|n| n.to_string())
        .collect();
    let more = missing_count.saturating_sub(named.len() as u64);
    let mut d = format!(
        "{have} of {} packets; missing PNO {}",
        g.pnum,
        named.join(", ")
    );
    if more > 0 {
        d.push_str(&format!(" and {more} more"));
    }
    if let Why::Early(l) = why {
        d.push_str(&format!("; published early ({} reached)", l.key()));
    }
    d
}

fn finish((mn, cn, data_time): Key, g: Group, why: Why, limits: &Limits) -> Merged {
    let mut values = Map::new();
    for text in g.parts.values() {
        let Ok(Value::Object(part)) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        for (code, v) in part {
            match (values.get_mut(&code), v) {
                (Some(Value::Object(have)), Value::Object(add)) => {
                    for (k, x) in add {
                        have.insert(k, x);
                    }
                }
                (_, v) => {
                    values.insert(code, v);
                }
            }
        }
    }
    let complete = g.parts.len() as u64 >= g.pnum;
    let finding = match why {
        Why::Alone(limit, kept) => {
            let mut d = match limit {
                Limit::Packets => format!(
                    "PNUM {} is above merge_max_packets ({}) or inconsistent with PNO {}: \
                     the packets are published one by one",
                    g.pnum,
                    limits.max_packets,
                    g.parts.keys().next().copied().unwrap_or(0)
                ),
                l => format!("the packet alone reaches {}: not merged", l.key()),
            };
            if !kept {
                d.push_str("; its values are only in the packet's own message");
            }
            Some((PACKETS_NOT_MERGED, d))
        }
        _ if !complete => Some((PACKETS_INCOMPLETE, incomplete_detail(&g, why))),
        _ => None,
    };
    let build = |values: Map<String, Value>| {
        let findings: Vec<Value> = finding
            .iter()
            .map(|(code, detail)| {
                serde_json::json!({"code": code, "severity": "warning", "detail": detail})
            })
            .collect();
        let mut seqs = g.seqs.clone();
        seqs.sort_unstable();
        let doc = serde_json::json!({
            "schema": "hj212.merged.v1",
            "mn": mn,
            "cn": cn,
            "st": g.st,
            "data_time": data_time,
            "pnum": g.pnum,
            "pnos": g.parts.keys().collect::<Vec<_>>(),
            "complete": complete,
            "seqs": seqs,
            "values": values,
            "findings": findings,
        });
        serde_json::to_vec(&doc).unwrap_or_default()
    };
    let mut payload = build(values);
    if payload.len() + mn.len() + cn.len() > limits.max_message {
        // The estimate is an upper bound; from MIN_MESSAGE up, reaching this is a
        // bug the fuzzer looks for.
        debug_assert!(
            limits.max_message < MIN_MESSAGE,
            "merged message over its estimate"
        );
        payload = build(Map::new());
    }
    Merged {
        min_seq: g.min_seq,
        mn,
        cn,
        complete,
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(wait: Duration, max_groups: usize) -> Limits {
        Limits {
            wait,
            max_groups,
            max_packets: 256,
            max_bytes: 64 << 20,
            max_message: 1 << 20,
        }
    }

    fn part(seq: u64, ms: i64, dt: &str, pno: u64, pnum: u64, code: &str) -> Part {
        let mut values = Map::new();
        values.insert(code.into(), serde_json::json!({"Rtd": seq}));
        Part {
            seq,
            received_ms: ms,
            mn: "M".into(),
            cn: "2011".into(),
            st: Some("31".into()),
            data_time: dt.into(),
            pnum,
            pno,
            values,
        }
    }

    fn json(m: &Merged) -> Value {
        serde_json::from_slice(&m.payload).unwrap()
    }

    #[test]
    fn complete_group_merges_values_and_seqs() {
        let mut m = Merger::new(limits(Duration::from_secs(60), 10));
        assert!(m.push(part(5, 0, "t1", 2, 2, "a02")).is_empty());
        assert_eq!(m.lowest_open_seq(), Some(5));
        let out = m.push(part(7, 10, "t1", 1, 2, "a01"));
        assert_eq!(out.len(), 1);
        assert!(out[0].complete);
        let v = json(&out[0]);
        assert_eq!(v["seqs"], serde_json::json!([5, 7]));
        assert_eq!(v["values"]["a01"]["Rtd"], 7);
        assert_eq!(v["values"]["a02"]["Rtd"], 5);
        assert!(m.is_empty());
        assert_eq!(m.held_bytes(), 0);
    }

    #[test]
    fn incomplete_after_wait_and_limit() {
        let mut m = Merger::new(limits(Duration::from_secs(1), 2));
        assert!(m.push(part(1, 0, "t1", 1, 3, "a")).is_empty());
        assert!(m.push(part(2, 10, "t2", 1, 3, "a")).is_empty());
        // A third group pushes out the oldest.
        let out = m.push(part(3, 20, "t3", 1, 3, "a"));
        assert_eq!((out.len(), out[0].min_seq, out[0].complete), (1, 1, false));
        assert_eq!(json(&out[0])["findings"][0]["code"], PACKETS_INCOMPLETE);
        assert_eq!(m.take_limited()[Limit::Groups as usize], 1);
        // Log time moves past the wait: both remaining groups go out.
        let out = m.push(part(4, 5000, "t4", 1, 2, "a"));
        assert_eq!(out.iter().map(|g| g.min_seq).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(m.lowest_open_seq(), Some(4));
        assert_eq!(m.expire(10_000).len(), 1);
    }

    /// Issue 18 row 1: PNUM=4294967295 used to build the list of every missing PNO.
    #[test]
    fn a_huge_pnum_is_published_alone_and_nothing_is_held() {
        let mut m = Merger::new(limits(Duration::from_secs(60), 10));
        let out = m.push(part(9, 0, "t1", 1, 4_294_967_295, "a01"));
        assert_eq!(out.len(), 1);
        let v = json(&out[0]);
        assert_eq!(v["complete"], false);
        assert_eq!(v["seqs"], serde_json::json!([9]));
        assert_eq!(v["pnum"], 4_294_967_295u64);
        assert_eq!(v["values"]["a01"]["Rtd"], 9);
        assert_eq!(v["findings"][0]["code"], PACKETS_NOT_MERGED);
        assert!(out[0].payload.len() < 1024, "{}", out[0].payload.len());
        assert!(m.is_empty());
        assert_eq!(m.held_bytes(), 0);
        assert_eq!(m.take_limited()[Limit::Packets as usize], 1);
        // At the cap it is still merged.
        assert!(m.push(part(10, 0, "t2", 1, 256, "a01")).is_empty());
        assert_eq!(m.len(), 1);
    }

    /// Issue 18 row 3: an incomplete group of PNUM 99999 named every missing PNO.
    #[test]
    fn the_missing_detail_is_bounded() {
        let mut l = limits(Duration::from_secs(1), 10);
        l.max_packets = 100_000;
        let mut m = Merger::new(l);
        assert!(m.push(part(1, 0, "t1", 2, 99_999, "a")).is_empty());
        let out = m.expire(10_000);
        let v = json(&out[0]);
        let detail = v["findings"][0]["detail"].as_str().unwrap();
        assert_eq!(
            detail,
            "1 of 99999 packets; missing PNO 1, 3, 4, 5, 6, 7, 8, 9 and 99990 more"
        );
        assert!(out[0].payload.len() < 1024);
    }

    #[test]
    fn the_byte_budget_pushes_out_the_oldest_groups() {
        let mut l = limits(Duration::from_secs(3600), 1000);
        l.max_bytes = 4096;
        let mut m = Merger::new(l);
        let mut out = Vec::new();
        for i in 0..100 {
            out.extend(m.push(part(i, 0, &format!("t{i}"), 1, 99, "a01")));
            assert!(m.held_bytes() <= 4096);
            m.assert_consistent();
        }
        assert!(!out.is_empty());
        assert_eq!(out[0].min_seq, 0, "oldest first");
        assert!(
            json(&out[0])["findings"][0]["detail"]
                .as_str()
                .unwrap()
                .ends_with("(merge_max_bytes reached)")
        );
        let limited = m.take_limited()[Limit::Bytes as usize];
        assert_eq!(limited, out.len() as u64);
        // Every packet is in exactly one message once the rest is drained.
        out.extend(m.drain());
        let mut seqs: Vec<u64> = out
            .iter()
            .flat_map(|o| json(o)["seqs"].as_array().unwrap().clone())
            .map(|s| s.as_u64().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..100).collect::<Vec<_>>());
        assert_eq!(m.held_bytes(), 0);
    }

    fn big_part(seq: u64, pno: u64, bytes: usize) -> Part {
        let mut p = part(seq, 0, "t", pno, 8, "x");
        p.values.insert(
            format!("c{pno}"),
            serde_json::json!({ "Info": "v".repeat(bytes) }),
        );
        p
    }

    #[test]
    fn a_group_never_outgrows_the_message_size() {
        let mut l = limits(Duration::from_secs(3600), 10);
        l.max_message = 8192;
        let mut m = Merger::new(l);
        let mut out = Vec::new();
        for pno in 1..=8 {
            out.extend(m.push(big_part(pno, pno, 2000)));
            m.assert_consistent();
        }
        // 8 packets of 2 KB do not fit 8 KB: the group went out in pieces.
        assert!(out.len() >= 2, "{}", out.len());
        for o in &out {
            assert!(o.payload.len() + 5 <= 8192, "{}", o.payload.len());
            assert!(json(o)["values"].as_object().unwrap().len() > 1);
        }
        assert!(m.take_limited()[Limit::Size as usize] >= 2);
        // One packet larger than the message alone goes out without its values.
        let out = m.push(big_part(20, 1, 9000));
        let v = json(&out[0]);
        assert_eq!(v["findings"][0]["code"], PACKETS_NOT_MERGED);
        assert_eq!(v["values"], serde_json::json!({}));
        assert_eq!(v["seqs"], serde_json::json!([20]));
    }

    #[test]
    fn resent_pnos_count_towards_the_packet_cap() {
        let mut l = limits(Duration::from_secs(3600), 10);
        l.max_packets = 4;
        let mut m = Merger::new(l);
        let mut out = Vec::new();
        for seq in 0..10 {
            out.extend(m.push(part(seq, 0, "t", 1, 3, "a")));
            m.assert_consistent();
        }
        assert_eq!(out.len(), 2);
        assert_eq!(json(&out[0])["seqs"], serde_json::json!([0, 1, 2, 3]));
        assert_eq!(m.take_limited()[Limit::Packets as usize], 2);
    }

    #[test]
    fn every_limit_has_its_metric_label() {
        let labels: Vec<&str> = Limit::ALL.iter().map(|l| l.as_str()).collect();
        assert_eq!(labels, crate::metrics::MERGE_LIMITS);
        for (i, l) in Limit::ALL.into_iter().enumerate() {
            assert_eq!(l as usize, i);
        }
    }

    #[test]
    fn long_header_fields_are_not_merged() {
        let mut m = Merger::new(limits(Duration::from_secs(60), 10));
        let mut p = part(1, 0, "t", 1, 2, "a");
        p.mn = "M".repeat(MAX_FIELD + 1);
        assert!(m.push(p).is_empty());
        assert!(m.is_empty());
        assert_eq!(m.take_limited()[Limit::Fields as usize], 1);
    }

    #[test]
    fn the_estimate_bounds_the_longest_detail() {
        let mut l = limits(Duration::from_secs(1), 10);
        l.max_packets = u64::MAX;
        let mut m = Merger::new(l);
        let mut p = part(
            u64::MAX - 1,
            0,
            &"\u{1}".repeat(MAX_FIELD),
            2,
            u64::MAX,
            "a",
        );
        p.mn = "\u{1}".repeat(MAX_FIELD);
        p.cn = "\u{1}".repeat(MAX_FIELD);
        p.st = Some("\u{1}".repeat(MAX_FIELD));
        p.values = Map::new();
        assert!(m.push(p).is_empty());
        let g = m.groups.values().next().unwrap();
        let wire = g.wire;
        let out = m.drain();
        let len = out[0].payload.len() + 2 * MAX_FIELD;
        assert!(len <= wire, "{len} > {wire}");
    }
}
