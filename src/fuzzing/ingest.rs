//! The session's ingest path without sockets: arbitrary sequences of chunks,
//! frames, junk floods, closes and clock steps over a few sessions and MNs,
//! through the framer (`protocol::framing::cut` via the codec) and the
//! ingest core ([`crate::ingest::ingest`]: decoder, policy, junk coalescer,
//! records, acks, the MN ownership rule), exactly as the session calls them.
//!
//! Asserted bounds, not only "no panic":
//! * every input byte is in exactly one inbound record, in order, per session;
//! * junk records: doc + findings at most [`JUNK_DOC_MAX`]; a run cut by the
//!   cap holds at least the cap and at most the cap plus one item, and stores
//!   at most 8 bytes per junk byte; overall, junk storage is at most 8 bytes
//!   per junk byte plus one document per frame or close (the run those ended);
//! * records per input: at most 2 per frame plus the junk records, and junk
//!   records at most junk bytes / cap + frames + closes;
//! * items buffered: the read buffer stays within `max_frame` (+2 bytes of
//!   look-ahead for a `##` digit), the held-back run
//!   under the cap plus one item;
//! * ownership: a session never gets a `session.conflict` from its own address,
//!   and a flagged upload never moves the MN.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::OnceLock;

use bytes::BytesMut;
use chrono::TimeZone;
use tokio_util::codec::Decoder;

use crate::codec::{Hj212Codec, Item};
use crate::config::{Config, UnknownDevice};
use crate::downlink::Devices;
use crate::ingest::owner::{self, Claim, Holder};
use crate::ingest::{
    self, Batch, FindingCode, Hooks, Input, JUNK_DOC_MAX, Now, Policy, RunEnd, decode_options,
};
use crate::protocol::Frame;
use crate::protocol::framing::FramerConfig;
use crate::protocol::reply;
use crate::registry::Registry;
use crate::store::{Direction, Kind, NewRecord};

/// The smallest `[server] junk_record_bytes` the config accepts: the bound of
/// 8 stored bytes per junk byte must hold there.
const CAP: usize = 1024;
/// Small framer caps so oversize and eager junk cuts are reachable.
const FRAMER: FramerConfig = FramerConfig {
    max_frame: 512,
    max_junk_item: 64,
};
const SLOTS: usize = 3;
const MNS: [&str; 4] = [
    "010000A8900016F000000001",
    "010000A8900016F000000002",
    "88888880000001",
    "REGISTERED0000000000001",
];
/// `idle_timeout` of the model (ms).
const IDLE_MS: i64 = 600_000;

fn config() -> &'static (Config, Registry) {
    static C: OnceLock<(Config, Registry)> = OnceLock::new();
    C.get_or_init(|| {
        let text = format!("[[device]]\nmn = \"{}\"\npw = \"123456\"\n", MNS[3]);
        let cfg = Config::parse(&text, std::path::Path::new("fuzz")).expect("fuzz config");
        let reg = Registry::from_config(&cfg).expect("registry");
        (cfg, reg)
    })
}

/// One connection of the model.
struct Conn {
    id: u64,
    ip: IpAddr,
    peer: String,
    buf: BytesMut,
    codec: Hj212Codec,
    /// The ingest core's state for this connection.
    core: ingest::Conn,
    fed: Vec<u8>,
    /// MNs this session holds.
    held: Vec<String>,
}

impl Conn {
    fn new(id: u64, slot: usize) -> Conn {
        let ip: IpAddr = if slot == 2 {
            [10, 0, 0, 2].into()
        } else {
            [10, 0, 0, 1].into()
        };
        Conn {
            id,
            ip,
            peer: format!("{ip}:{}", 4000 + id),
            buf: BytesMut::new(),
            codec: Hj212Codec::new(FRAMER),
            core: ingest::Conn::default(),
            fed: Vec::new(),
            held: Vec::new(),
        }
    }
}

/// What the run stored, for the final accounting.
#[derive(Default)]
struct Totals {
    junk_bytes: usize,
    junk_stored: usize,
    junk_records: usize,
    frames: usize,
    closes: usize,
    records: usize,
}

struct Model {
    conns: Vec<Conn>,
    next_id: u64,
    now_ms: i64,
    unknown: UnknownDevice,
    owners: HashMap<String, Holder>,
    /// Inbound records per session id, in order.
    inbound: HashMap<u64, Vec<u8>>,
    fed: HashMap<u64, Vec<u8>>,
    totals: Totals,
    qn: u32,
    /// Per-MN downlink state the automatic requests read and update.
    devices: Devices,
}

/// Entry point; see the module doc. Byte 0 picks `unknown_device`; then each
/// op is one byte (`op % 6`: chunk, frame, `#` flood, `##`-junk flood, close,
/// clock step; `op / 6 % 3`: the session) and its arguments.
pub fn session_ingest(data: &[u8]) {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let unknown = [
        UnknownDevice::Accept,
        UnknownDevice::Quarantine,
        UnknownDevice::Reject,
    ][usize::from(first % 3)];
    let mut m = Model {
        conns: (0..SLOTS).map(|s| Conn::new(s as u64, s)).collect(),
        next_id: SLOTS as u64,
        now_ms: 1_717_203_600_000,
        unknown,
        owners: HashMap::new(),
        inbound: HashMap::new(),
        fed: HashMap::new(),
        totals: Totals::default(),
        qn: 0,
        devices: Devices::new(None, config().0.downlink.max_unregistered_devices),
    };
    let take = |n: usize, rest: &mut &[u8]| -> Vec<u8> {
        let n = n.min(rest.len());
        let (a, b) = rest.split_at(n);
        *rest = b;
        a.to_vec()
    };
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let slot = usize::from(op / 6) % SLOTS;
        let arg = take(1, &mut rest).first().copied().unwrap_or(0);
        match op % 6 {
            0 => {
                let bytes = take(usize::from(arg) + 1, &mut rest);
                m.feed(slot, &bytes);
            }
            1 => {
                let f = m.frame(arg);
                m.feed(slot, &f);
            }
            2 => m.feed(slot, &vec![b'#'; usize::from(arg) * 16 + 1]),
            3 => {
                let mut b = Vec::new();
                for i in 0..=usize::from(arg) {
                    b.extend_from_slice(if i % 3 == 0 { b"##x" } else { b"##" });
                }
                m.feed(slot, &b);
            }
            4 => m.close(slot),
            _ => m.now_ms += i64::from(arg) * 10_000,
        }
    }
    for slot in 0..SLOTS {
        m.close(slot);
    }
    for (id, fed) in &m.fed {
        let stored = m.inbound.get(id).map_or(&[][..], Vec::as_slice);
        assert!(
            stored == &fed[..],
            "session {id}: stored bytes differ from received"
        );
    }
    let t = &m.totals;
    assert!(
        t.junk_records <= t.junk_bytes / CAP + t.frames + t.closes,
        "{} junk records for {} junk bytes, {} frames, {} closes",
        t.junk_records,
        t.junk_bytes,
        t.frames,
        t.closes
    );
    assert!(
        t.junk_stored <= 8 * t.junk_bytes + JUNK_DOC_MAX * (t.frames + t.closes),
        "{} bytes stored for {} junk bytes",
        t.junk_stored,
        t.junk_bytes
    );
    assert!(t.records <= 2 * t.frames + t.junk_records);
}

impl Model {
    /// A valid upload (CRC computed) for one of the MNs; some with a bad CRC
    /// or the registered device's wrong password.
    fn frame(&mut self, arg: u8) -> Vec<u8> {
        self.qn += 1;
        let mn = MNS[usize::from(arg) % MNS.len()];
        let pw = if arg & 0x10 != 0 { "654321" } else { "123456" };
        let seg = format!(
            "QN=20240601085857{:03};ST=32;CN=2011;PW={pw};MN={mn};Flag=5;CP=&&DataTime=20240601085800;a21026-Rtd=12.5&&",
            self.qn % 1000
        );
        let mut f = reply::envelope(seg.as_bytes()).to_vec();
        if arg & 0x20 != 0 {
            let n = f.len();
            f[n - 3] ^= 0x01;
        }
        f
    }

    fn feed(&mut self, slot: usize, bytes: &[u8]) {
        let c = &mut self.conns[slot];
        c.buf.extend_from_slice(bytes);
        c.fed.extend_from_slice(bytes);
        let mut items = Vec::new();
        while let Some(item) = c.codec.decode(&mut c.buf).expect("the codec never fails") {
            items.push(item);
        }
        // The framer may look 2 bytes past `max_frame` for a `##` digit.
        assert!(
            c.buf.len() <= FRAMER.max_frame + 2,
            "{} bytes buffered: {:?}",
            c.buf.len(),
            String::from_utf8_lossy(&c.buf)
        );
        self.ingest(slot, items, false);
    }

    fn close(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        let mut items = Vec::new();
        while !c.buf.is_empty() {
            items.push(
                c.codec
                    .decode_eof(&mut c.buf)
                    .expect("the codec never fails")
                    .expect("an item at EOF"),
            );
        }
        self.ingest(slot, items, true);
        let c = &mut self.conns[slot];
        for mn in &c.held {
            if self.owners.get(mn).is_some_and(|h| h.id == c.id) {
                self.owners.remove(mn);
            }
        }
        self.fed.insert(c.id, std::mem::take(&mut c.fed));
        self.totals.closes += 1;
        let id = self.next_id;
        self.next_id += 1;
        self.conns[slot] = Conn::new(id, slot);
    }

    fn ingest(&mut self, slot: usize, items: Vec<Item>, end: bool) {
        let (cfg, registry) = config();
        let now = chrono::Utc
            .timestamp_millis_opt(self.now_ms)
            .single()
            .expect("valid time");
        let opts = decode_options(cfg, now);
        let c = &mut self.conns[slot];
        let mut policy = Policy::new(cfg, &opts, &self.devices, &c.peer, c.id, &c.held);
        policy.unknown = self.unknown;
        policy.junk_cap = CAP;
        let mut hooks = ModelHooks {
            owners: &mut self.owners,
            id: c.id,
            ip: c.ip,
            totals: &mut self.totals,
            flagged: None,
            flagged_mns: Vec::new(),
        };
        let input = Input {
            items,
            end,
            ack: true,
        };
        let now = Now {
            wall: now,
            mono: std::time::Instant::now(),
        };
        let batch: Batch<()> =
            ingest::ingest(&mut c.core, input, now, registry, &policy, None, &mut hooks);
        let flagged_mns = hooks.flagged_mns;
        assert!(
            c.core.junk.pending() < CAP + FRAMER.max_frame,
            "{} junk bytes held back",
            c.core.junk.pending()
        );
        if end {
            assert_eq!(c.core.junk.pending(), 0);
        }
        let acks = batch
            .records
            .iter()
            .filter(|r| r.direction == Direction::Out)
            .count();
        assert_eq!(acks, batch.replies.len(), "one ack record per reply");
        // What the session does after the commit: take the MNs the batch
        // saw first, under the ownership rule.
        for claim in batch.claims {
            assert!(
                !flagged_mns.contains(&claim.mn),
                "a flagged upload claims {}",
                claim.mn
            );
            let holder = self.owners.get(&claim.mn).copied();
            let took = if c.held.is_empty() {
                matches!(
                    owner::claim(holder.as_ref(), c.id, c.ip, self.now_ms, IDLE_MS),
                    Claim::Free | Claim::Supersede | Claim::Own
                )
            } else {
                holder.is_none_or(|h| h.id == c.id)
            };
            if took {
                self.owners.insert(
                    claim.mn.clone(),
                    Holder {
                        id: c.id,
                        ip: c.ip,
                        last_seen_ms: self.now_ms,
                    },
                );
                c.held.push(claim.mn);
            }
        }
        let id = c.id;
        for r in &batch.records {
            assert!(!r.raw.is_empty(), "an empty record");
            if r.direction == Direction::In {
                self.inbound
                    .entry(id)
                    .or_default()
                    .extend_from_slice(&r.raw);
            }
        }
        self.totals.records += batch.records.len();
    }
}

/// The model's side of the core: MN holders from its map, and the checks on
/// what the core reports.
struct ModelHooks<'a> {
    owners: &'a mut HashMap<String, Holder>,
    id: u64,
    ip: IpAddr,
    totals: &'a mut Totals,
    /// Whether the frame being judged was reported held elsewhere.
    flagged: Option<String>,
    flagged_mns: Vec<String>,
}

impl Hooks for ModelHooks<'_> {
    fn conflicting(&mut self, _frame: &Frame, mn: &str, now_ms: i64) -> Option<String> {
        let holder = self.owners.get(mn).copied();
        match owner::claim(holder.as_ref(), self.id, self.ip, now_ms, IDLE_MS) {
            Claim::Conflict => {
                let h = holder.expect("a conflict has a holder");
                assert_ne!(h.ip, self.ip, "a conflict from the holder's own address");
                assert_ne!(h.id, self.id);
                self.flagged = Some(mn.to_owned());
                self.flagged_mns.push(mn.to_owned());
                Some("10.0.0.9:1".to_owned())
            }
            _ => None,
        }
    }

    fn junk(&mut self, len: usize) {
        self.totals.junk_bytes += len;
    }

    fn junk_record(&mut self, rec: &NewRecord, run_end: RunEnd) {
        assert_eq!(rec.kind, Kind::Junk);
        let stored = rec.raw.len() + rec.doc.len() + rec.findings.len();
        assert!(
            rec.doc.len() + rec.findings.len() <= JUNK_DOC_MAX,
            "junk doc {} + findings {}",
            rec.doc.len(),
            rec.findings.len()
        );
        let doc: serde_json::Value = serde_json::from_str(&rec.doc).expect("junk doc is JSON");
        assert_eq!(doc["kind"], "junk");
        if run_end == RunEnd::Cap {
            assert!(rec.raw.len() >= CAP);
            assert!(rec.raw.len() < CAP + FRAMER.max_frame);
            assert!(
                stored <= 8 * rec.raw.len(),
                "{stored} for {}",
                rec.raw.len()
            );
        }
        self.totals.junk_stored += stored;
        self.totals.junk_records += 1;
    }

    fn frame(&mut self, frame: &Frame, _accepted: bool) {
        self.totals.frames += 1;
        let flagged = self.flagged.take();
        assert_eq!(flagged.is_some(), FindingCode::SessionConflict.is_on(frame));
    }

    fn accepted(&mut self, frame: &Frame, primary: Option<&str>, now_ms: i64) {
        if let (Some(mn), Some(p)) = (frame.mn(), primary) {
            if mn == p {
                if let Some(h) = self.owners.get_mut(mn).filter(|h| h.id == self.id) {
                    h.last_seen_ms = now_ms;
                }
            }
        }
    }
}
