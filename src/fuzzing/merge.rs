//! The split-upload merger under arbitrary sequences of packets and expiries.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::publish::merge::{Limits, MAX_FIELD, Merged, Merger, Part};

/// Bounds of the merger over an arbitrary sequence of pushes and expiries.
///
/// The first five bytes choose small caps (groups 1..=8, packets 2..=17, a byte
/// budget of 2..18 KiB, messages of 4..20 KiB, a wait of 0..700 ms) so that
/// every cap is reachable. Then each op byte is a push (MN, CN and DataTime from
/// a small alphabet, PNUM and PNO mostly consistent and small, else any u64
/// including 0 and PNO above PNUM, up to three values of
/// up to 4 KiB, log time moving by up to 12.75 s, rarely backwards, and now and
/// then an MN too long to merge) or an expiry at some log time.
///
/// Asserts after every step: no panic; the held bytes within the budget and
/// the accounting exact; at most `max_groups` groups; every message within
/// `max_message` (payload plus MN and CN), valid `hj212.merged.v1` JSON with at
/// most `max_packets` seqs, none of which was already published. At the end,
/// once everything is drained: every packet pushed (but those with a too long
/// field) is in exactly one message.
pub fn merge_packets(data: &[u8]) {
    let mut r = Bytes(data);
    let limits = Limits {
        max_groups: 1 + usize::from(r.u8() % 8),
        max_packets: 2 + u64::from(r.u8() % 16),
        max_bytes: 2048 + usize::from(r.u8()) * 64,
        max_message: 4096 + usize::from(r.u8()) * 64,
        wait: Duration::from_millis(u64::from(r.u8() % 8) * 100),
    };
    let mut m = Merger::new(limits.clone());
    let mut st = State {
        limits,
        pushed: BTreeSet::new(),
        published: BTreeSet::new(),
    };
    let (mut seq, mut now) = (0u64, 1_700_000_000_000i64);
    while !r.0.is_empty() {
        let op = r.u8();
        if op % 16 == 15 {
            now += i64::from(r.u8()) * 100;
            let out = m.expire(now);
            st.check(&m, &out);
            continue;
        }
        seq += 1;
        let step = i64::from(r.u8()) * 50;
        now += if op & 0x80 != 0 && step % 3 == 0 {
            -step
        } else {
            step
        };
        let mut mn = ["A", "B", "C"][usize::from(r.u8() % 3)].to_owned();
        if op % 16 == 14 {
            mn = "M".repeat(MAX_FIELD + 1);
        }
        let cn = ["2011", "2051"][usize::from(r.u8() % 2)].to_owned();
        let data_time = ["t0", "t1", "t2", "t3"][usize::from(r.u8() % 4)].to_owned();
        let pnum = match r.u8() {
            s if s < 240 => 2 + u64::from(s % 14),
            _ => r.u64(),
        };
        let pno = match r.u8() {
            s if s < 232 => 1 + u64::from(s) % pnum.clamp(1, 64),
            s if s < 244 => u64::from(s % 3),
            _ => r.u64(),
        };
        let mut values = Map::new();
        for i in 0..r.u8() % 4 {
            let len = usize::from(r.u8()) * 16;
            values.insert(
                format!("a0{i}"),
                serde_json::json!({ "Rtd": seq, "Info": "x".repeat(len) }),
            );
        }
        if mn.len() <= MAX_FIELD {
            st.pushed.insert(seq);
        }
        let out = m.push(Part {
            seq,
            received_ms: now,
            mn,
            cn,
            st: Some("31".into()),
            data_time,
            pnum,
            pno,
            values,
        });
        st.check(&m, &out);
    }
    let out = m.drain();
    st.check(&m, &out);
    assert!(m.is_empty() && m.held_bytes() == 0, "drained");
    assert_eq!(st.pushed, st.published, "a packet lost or invented");
}

struct State {
    limits: Limits,
    pushed: BTreeSet<u64>,
    published: BTreeSet<u64>,
}

impl State {
    fn check(&mut self, m: &Merger, out: &[Merged]) {
        m.assert_consistent();
        assert!(
            m.held_bytes() <= self.limits.max_bytes,
            "over the byte budget"
        );
        assert!(m.len() <= self.limits.max_groups, "over the group cap");
        for o in out {
            let size = o.payload.len() + o.mn.len() + o.cn.len();
            assert!(size <= self.limits.max_message, "{size}-byte message");
            let v: Value = serde_json::from_slice(&o.payload).expect("JSON payload");
            assert_eq!(v["schema"], "hj212.merged.v1");
            assert_eq!(v["mn"], o.mn.as_str());
            assert_eq!(v["complete"], o.complete);
            let seqs = v["seqs"].as_array().expect("seqs");
            assert!(!seqs.is_empty());
            assert!(
                seqs.len() as u64 <= self.limits.max_packets,
                "too many seqs"
            );
            assert_eq!(
                seqs.iter().filter_map(Value::as_u64).min(),
                Some(o.min_seq),
                "min_seq"
            );
            for s in seqs {
                let s = s.as_u64().expect("seq");
                assert!(self.pushed.contains(&s), "seq {s} never pushed");
                assert!(self.published.insert(s), "seq {s} published twice");
            }
        }
    }
}

/// A reader that yields zeros once the input is used up.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    /// Any u64 from the next eight bytes.
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        u64::from_le_bytes(b)
    }
}
