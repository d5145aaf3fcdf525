//! Split uploads (PNUM/PNO): one merged message per (MN, CN, DataTime).
//!
//! A logger that cannot fit a data set in one frame sends PNUM packets numbered
//! PNO 1..=PNUM. Besides each packet's own message, consumers get one message
//! with the union of the packets' `values` and their `seqs`, once every packet
//! is in or after `merge_wait` (then with the finding `packets.incomplete`).
//!
//! Time is the log's time (the `received_at` of the newest record seen), not the
//! wall clock, so replaying an old backlog merges exactly as live traffic did;
//! the publisher adds the wall clock only once it has caught up. Memory is
//! bounded by `merge_max_groups`: beyond it the oldest group goes out
//! incomplete. Nothing here is persisted: the publisher keeps a second cursor at
//! the lowest seq of any open group and rebuilds groups from the log on start.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

/// Finding code of a merged message that is missing packets.
pub const PACKETS_INCOMPLETE: &str = "packets.incomplete";

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
    parts: BTreeMap<u64, Map<String, Value>>,
}

/// Open split-upload groups.
#[derive(Debug)]
pub struct Merger {
    wait_ms: i64,
    max_groups: usize,
    log_ms: i64,
    groups: HashMap<Key, Group>,
    by_seq: BTreeMap<u64, Key>,
}

impl Merger {
    /// A merger that waits `wait` for missing packets and holds at most `max_groups` groups.
    pub fn new(wait: std::time::Duration, max_groups: usize) -> Merger {
        Merger {
            wait_ms: i64::try_from(wait.as_millis()).unwrap_or(i64::MAX),
            max_groups: max_groups.max(1),
            log_ms: i64::MIN,
            groups: HashMap::new(),
            by_seq: BTreeMap::new(),
        }
    }

    /// Adds a packet; returns the groups it completed or pushed out (limit or age).
    pub fn push(&mut self, p: Part) -> Vec<Merged> {
        let mut out = Vec::new();
        self.log_ms = self.log_ms.max(p.received_ms);
        let key = (p.mn.clone(), p.cn.clone(), p.data_time.clone());
        if !self.groups.contains_key(&key) && self.groups.len() >= self.max_groups {
            if let Some((_, oldest)) = self.by_seq.pop_first() {
                if let Some(g) = self.groups.remove(&oldest) {
                    out.push(finish(oldest, g));
                }
            }
        }
        let g = self.groups.entry(key.clone()).or_insert_with(|| Group {
            st: p.st.clone(),
            pnum: p.pnum,
            first_ms: p.received_ms,
            min_seq: p.seq,
            seqs: Vec::new(),
            parts: BTreeMap::new(),
        });
        if g.seqs.is_empty() {
            self.by_seq.insert(p.seq, key.clone());
        }
        g.seqs.push(p.seq);
        g.pnum = g.pnum.max(p.pnum);
        g.parts.insert(p.pno, p.values);
        if g.parts.len() as u64 >= g.pnum {
            let min = g.min_seq;
            self.by_seq.remove(&min);
            if let Some(g) = self.groups.remove(&key) {
                out.push(finish(key, g));
            }
        }
        out.extend(self.expire(self.log_ms));
        out
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
            .filter_map(|(seq, k)| {
                self.by_seq.remove(&seq);
                self.groups.remove(&k).map(|g| finish(k, g))
            })
            .collect()
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
}

fn finish((mn, cn, data_time): Key, g: Group) -> Merged {
    let mut values = Map::new();
    for part in g.parts.values() {
        for (code, v) in part {
            match (values.get_mut(code), v) {
                (Some(Value::Object(have)), Value::Object(add)) => {
                    for (k, x) in add {
                        have.insert(k.clone(), x.clone());
                    }
                }
                _ => {
                    values.insert(code.clone(), v.clone());
                }
            }
        }
    }
    let complete = g.parts.len() as u64 >= g.pnum;
    let mut findings = Vec::new();
    if !complete {
        let missing: Vec<u64> = (1..=g.pnum).filter(|n| !g.parts.contains_key(n)).collect();
        findings.push(serde_json::json!({
            "code": PACKETS_INCOMPLETE,
            "severity": "warning",
            "detail": format!("{} of {} packets; missing PNO {:?}", g.parts.len(), g.pnum, missing),
        }));
    }
    let mut seqs = g.seqs;
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
    Merged {
        min_seq: g.min_seq,
        mn,
        cn,
        complete,
        payload: serde_json::to_vec(&doc).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    #[test]
    fn complete_group_merges_values_and_seqs() {
        let mut m = Merger::new(Duration::from_secs(60), 10);
        assert!(m.push(part(5, 0, "t1", 2, 2, "a02")).is_empty());
        assert_eq!(m.lowest_open_seq(), Some(5));
        let out = m.push(part(7, 10, "t1", 1, 2, "a01"));
        assert_eq!(out.len(), 1);
        assert!(out[0].complete);
        let v: Value = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!(v["seqs"], serde_json::json!([5, 7]));
        assert_eq!(v["values"]["a01"]["Rtd"], 7);
        assert_eq!(v["values"]["a02"]["Rtd"], 5);
        assert!(m.is_empty());
    }

    #[test]
    fn incomplete_after_wait_and_limit() {
        let mut m = Merger::new(Duration::from_secs(1), 2);
        assert!(m.push(part(1, 0, "t1", 1, 3, "a")).is_empty());
        assert!(m.push(part(2, 10, "t2", 1, 3, "a")).is_empty());
        // A third group pushes out the oldest.
        let out = m.push(part(3, 20, "t3", 1, 3, "a"));
        assert_eq!((out.len(), out[0].min_seq, out[0].complete), (1, 1, false));
        let v: Value = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!(v["findings"][0]["code"], PACKETS_INCOMPLETE);
        // Log time moves past the wait: both remaining groups go out.
        let out = m.push(part(4, 5000, "t4", 1, 2, "a"));
        assert_eq!(out.iter().map(|g| g.min_seq).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(m.lowest_open_seq(), Some(4));
        assert_eq!(m.expire(10_000).len(), 1);
    }
}
