//! Inputs of `replay`: what a device sent, split into its original sessions.
//!
//! Five kinds, detected from content (never from the file name):
//! - a gateway data directory (or its SQLite file): inbound records, by session;
//! - `export --format jsonl`: inbound objects, by their `session` field;
//! - pcap / pcapng: TCP payload toward the server, reassembled per connection;
//! - anything else: a raw capture, bytes as received in one stream.
//!
//! Every stream is cut with the daemon's own framer ([`framing::cut`]), so frame
//! boundaries, junk and oversize handling are exactly what `serve` would have seen.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use bytes::Bytes;
use pcap_file::DataLink;

use super::CmdError;
use crate::config::Config;
use crate::protocol::framing::{self, Cut, FramerConfig};
use crate::store::{Direction, Kind, Reader, RecordFilter};

/// What kind of input a file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// A gateway data directory.
    DataDir,
    /// The frame log's SQLite file.
    Db,
    /// `export --format jsonl`.
    Jsonl,
    /// A classic pcap file.
    Pcap,
    /// A pcapng file.
    Pcapng,
    /// Bytes as received (also `export --format raw`).
    Raw,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::DataDir => "gateway data directory",
            SourceKind::Db => "frame log (SQLite)",
            SourceKind::Jsonl => "export JSON lines",
            SourceKind::Pcap => "pcap capture",
            SourceKind::Pcapng => "pcapng capture",
            SourceKind::Raw => "raw byte capture",
        })
    }
}

/// One item as the framer cut it, with the time it was complete at the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The exact bytes.
    pub bytes: Bytes,
    /// True for bytes that are not a frame.
    pub junk: bool,
    /// Reception time (UTC unix ms), when the input records it.
    pub at_ms: Option<i64>,
}

/// One original connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    /// Where it came from: `session 7 (1.2.3.4:5678)`, `10.0.0.2:40000 -> 10.0.0.1:9000`.
    pub label: String,
    /// Items in order.
    pub items: Vec<Item>,
}

/// A loaded input.
#[derive(Debug, Clone)]
pub struct Capture {
    /// The path given.
    pub path: PathBuf,
    /// Detected kind.
    pub kind: SourceKind,
    /// Streams in order of their first item.
    pub streams: Vec<Stream>,
    /// Problems met while reading that did not stop it (gaps, unparsable packets).
    pub notes: Vec<String>,
}

/// Loads `path`, detecting its kind. `cfg` gives the store path inside a data
/// directory and the framer's size cap; `server_port` says which side of a TCP
/// connection is the gateway when the capture lacks the SYN.
pub fn load(path: &Path, cfg: &Config, server_port: Option<u16>) -> Result<Capture, CmdError> {
    let framer = FramerConfig {
        max_frame: cfg.server.max_frame_bytes,
        ..FramerConfig::default()
    };
    if path.is_dir() {
        let db = cfg.store_path(path);
        if !db.is_file() {
            return Err(CmdError::Usage(format!(
                "{}: a directory without a frame log ({} not found)",
                path.display(),
                db.display()
            )));
        }
        return from_db(path, &db, SourceKind::DataDir, &framer);
    }
    let mut file = std::fs::File::open(path).map_err(CmdError::io(path.display().to_string()))?;
    let mut head = [0u8; 16];
    let n = read_up_to(&mut file, &mut head).map_err(CmdError::io(path.display().to_string()))?;
    let head = &head[..n];
    if head.starts_with(b"SQLite format 3\0") {
        return from_db(path, path, SourceKind::Db, &framer);
    }
    let data = std::fs::read(path).map_err(CmdError::io(path.display().to_string()))?;
    let magic = head
        .get(..4)
        .map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
    match magic {
        Some(0xa1b2_c3d4 | 0xd4c3_b2a1 | 0xa1b2_3c4d | 0x4d3c_b2a1) => {
            from_pcap(path, &data, server_port, &framer)
        }
        Some(0x0a0d_0d0a) => from_pcapng(path, &data, server_port, &framer),
        _ if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') => {
            from_jsonl(path, &data, &framer)
        }
        _ => Ok(Capture {
            path: path.to_owned(),
            kind: SourceKind::Raw,
            streams: vec![Stream {
                label: "raw stream".into(),
                items: cut_all(&data, &framer, |_| None),
            }],
            notes: Vec::new(),
        }),
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Cuts a whole stream; `time_at(offset)` gives the time the byte at `offset` arrived.
fn cut_all(data: &[u8], cfg: &FramerConfig, time_at: impl Fn(usize) -> Option<i64>) -> Vec<Item> {
    let mut items = Vec::new();
    let mut pos = 0;
    let all = Bytes::copy_from_slice(data);
    while pos < data.len() {
        let Some(c) = framing::cut(&data[pos..], true, cfg) else {
            break;
        };
        let len = c.len().max(1);
        items.push(Item {
            bytes: all.slice(pos..pos + len),
            junk: matches!(c, Cut::Junk { .. }),
            at_ms: time_at(pos + len - 1),
        });
        pos += len;
    }
    items
}

/// Inbound records, grouped by session. Each record is one item as the daemon cut it,
/// so no re-framing is needed.
fn from_db(
    path: &Path,
    db: &Path,
    kind: SourceKind,
    _cfg: &FramerConfig,
) -> Result<Capture, CmdError> {
    let reader = Reader::open(db)?;
    let mut streams: Vec<Stream> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    for rec in reader.records(RecordFilter {
        direction: Some(Direction::In),
        ..RecordFilter::default()
    })? {
        let rec = rec?;
        let i = *index.entry(rec.session).or_insert_with(|| {
            streams.push(Stream {
                label: format!("session {} ({})", rec.session, rec.peer),
                items: Vec::new(),
            });
            streams.len() - 1
        });
        streams[i].items.push(Item {
            bytes: Bytes::from(rec.raw),
            junk: rec.kind == Kind::Junk,
            at_ms: Some(rec.received_at_ms),
        });
    }
    Ok(Capture {
        path: path.to_owned(),
        kind,
        streams,
        notes: Vec::new(),
    })
}

/// `export --format jsonl`: `raw_b64` of inbound objects, grouped by `session`.
/// Objects without `direction` (older exports) are taken as inbound.
fn from_jsonl(path: &Path, data: &[u8], cfg: &FramerConfig) -> Result<Capture, CmdError> {
    let mut streams: Vec<Stream> = Vec::new();
    let mut index: HashMap<(String, u64), usize> = HashMap::new();
    for (n, line) in data.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |why: &str| CmdError::Usage(format!("{}:{}: {why}", path.display(), n + 1));
        let v: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| bad(&format!("not JSON ({e})")))?;
        if v.get("direction")
            .and_then(|d| d.as_str())
            .is_some_and(|d| d != "in")
        {
            continue;
        }
        let raw = v
            .get("raw_b64")
            .and_then(|r| r.as_str())
            .ok_or_else(|| bad("no raw_b64 field (is this an export --format jsonl file?)"))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(raw)
            .map_err(|e| bad(&format!("raw_b64: {e}")))?;
        let session = v.get("session").and_then(|s| s.as_u64()).unwrap_or(0);
        let peer = v
            .get("peer")
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_owned();
        let at_ms = v
            .get("received_at")
            .and_then(|s| s.as_str())
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.timestamp_millis());
        let i = *index.entry((peer.clone(), session)).or_insert_with(|| {
            streams.push(Stream {
                label: format!("session {session} ({peer})"),
                items: Vec::new(),
            });
            streams.len() - 1
        });
        let junk = v.get("kind").and_then(|k| k.as_str()) == Some("junk");
        // An exported record is one item already; cutting it again would only
        // matter for a hand-edited file, where the framer's view is the right one.
        if junk {
            streams[i].items.push(Item {
                bytes: Bytes::from(raw),
                junk,
                at_ms,
            });
        } else {
            streams[i].items.extend(cut_all(&raw, cfg, |_| at_ms));
        }
    }
    Ok(Capture {
        path: path.to_owned(),
        kind: SourceKind::Jsonl,
        streams,
        notes: Vec::new(),
    })
}

/// A TCP segment found in a packet.
struct Segment<'a> {
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    seq: u32,
    syn: bool,
    ack_flag: bool,
    payload: &'a [u8],
}

/// Link layer → IP → TCP. `None` for anything that is not TCP over IPv4/IPv6.
fn tcp_segment(link: DataLink, data: &[u8]) -> Option<Segment<'_>> {
    let ip = match link {
        DataLink::ETHERNET => {
            let mut off = 12;
            let mut ty = u16::from_be_bytes([*data.get(off)?, *data.get(off + 1)?]);
            // 802.1Q / QinQ tags.
            while ty == 0x8100 || ty == 0x88a8 {
                off += 4;
                ty = u16::from_be_bytes([*data.get(off)?, *data.get(off + 1)?]);
            }
            data.get(off + 2..)?
        }
        DataLink::LINUX_SLL => data.get(16..)?,
        DataLink::NULL | DataLink::LOOP => data.get(4..)?,
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => data,
        _ => return None,
    };
    let (src, dst, tcp) = match ip.first()? >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if *ip.get(9)? != 6 || ihl < 20 {
                return None;
            }
            // Fragmented datagrams (MF set or an offset) are not reassembled.
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            if frag & 0x3fff != 0 {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            // Ethernet pads short frames: trust the IP total length.
            let end = total.min(ip.len());
            (IpAddr::from(src), IpAddr::from(dst), ip.get(ihl..end)?)
        }
        6 => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let end = (40 + plen).min(ip.len());
            (IpAddr::from(src), IpAddr::from(dst), ip.get(40..end)?)
        }
        _ => return None,
    };
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    if doff < 20 {
        return None;
    }
    let flags = *tcp.get(13)?;
    Some(Segment {
        src: (src, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: (dst, u16::from_be_bytes([tcp[2], tcp[3]])),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        syn: flags & 0x02 != 0,
        ack_flag: flags & 0x10 != 0,
        payload: tcp.get(doff..).unwrap_or(&[]),
    })
}

/// One direction of one TCP connection, reassembled by sequence number.
#[derive(Default)]
struct Flow {
    /// Sequence number of the first payload byte (ISN + 1, or the first seq seen).
    base: Option<u32>,
    /// Saw the client's SYN: this flow is client -> server.
    client_syn: bool,
    /// Segments by offset from `base`: retransmissions and reordering resolve here.
    segments: BTreeMap<u64, (Vec<u8>, i64)>,
    first_ms: i64,
}

/// One direction of a connection: (source, destination).
type FlowKey = ((IpAddr, u16), (IpAddr, u16));

struct Reassembler {
    flows: HashMap<FlowKey, Flow>,
    order: Vec<FlowKey>,
    skipped: u64,
}

impl Reassembler {
    fn new() -> Self {
        Reassembler {
            flows: HashMap::new(),
            order: Vec::new(),
            skipped: 0,
        }
    }

    fn packet(&mut self, link: DataLink, data: &[u8], at_ms: i64) {
        let Some(s) = tcp_segment(link, data) else {
            self.skipped += 1;
            return;
        };
        let key = (s.src, s.dst);
        let flow = self.flows.entry(key).or_insert_with(|| {
            self.order.push(key);
            Flow {
                first_ms: at_ms,
                ..Flow::default()
            }
        });
        if s.syn {
            flow.client_syn |= !s.ack_flag;
            flow.base = Some(s.seq.wrapping_add(1));
            return;
        }
        if s.payload.is_empty() {
            return;
        }
        let base = *flow.base.get_or_insert(s.seq);
        // Offsets within 2 GiB of the base; larger streams are out of scope.
        let off = u64::from(s.seq.wrapping_sub(base));
        let entry = flow
            .segments
            .entry(off)
            .or_insert_with(|| (Vec::new(), at_ms));
        if s.payload.len() > entry.0.len() {
            entry.0 = s.payload.to_vec();
        }
    }

    /// Streams toward the server, in order of first packet, and notes on gaps.
    fn finish(self, server_port: Option<u16>, framer: &FramerConfig) -> (Vec<Stream>, Vec<String>) {
        let mut streams = Vec::new();
        let mut notes = Vec::new();
        for key in &self.order {
            let flow = &self.flows[key];
            let reverse = self.flows.get(&(key.1, key.0));
            let toward_server = if flow.client_syn {
                true
            } else if reverse.is_some_and(|r| r.client_syn) {
                false
            } else if let Some(p) = server_port {
                key.1.1 == p
            } else {
                // No handshake captured: the lower port is taken as the server's.
                key.1.1 < key.0.1
            };
            if !toward_server || flow.segments.is_empty() {
                continue;
            }
            let label = format!("{} -> {}", sock(key.0), sock(key.1));
            let mut data: Vec<u8> = Vec::new();
            let mut times: Vec<(usize, i64)> = Vec::new();
            for (&off, (bytes, at)) in &flow.segments {
                let off = off as usize;
                let have = data.len();
                if off > have {
                    notes.push(format!(
                        "{label}: {} bytes missing from the capture at stream offset {have}",
                        off - have
                    ));
                } else if off + bytes.len() <= have {
                    continue; // retransmission of bytes we already have
                }
                let skip = have.saturating_sub(off);
                times.push((data.len(), *at));
                data.extend_from_slice(&bytes[skip..]);
            }
            let first = flow.first_ms;
            let time_at = |pos: usize| {
                let i = times.partition_point(|&(start, _)| start <= pos);
                Some(times.get(i.wrapping_sub(1)).map_or(first, |t| t.1))
            };
            streams.push(Stream {
                label,
                items: cut_all(&data, framer, time_at),
            });
        }
        if self.skipped > 0 {
            notes.push(format!(
                "{} packets were not TCP over IP and were skipped",
                self.skipped
            ));
        }
        (streams, notes)
    }
}

fn sock(a: (IpAddr, u16)) -> String {
    std::net::SocketAddr::new(a.0, a.1).to_string()
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn from_pcap(
    path: &Path,
    data: &[u8],
    port: Option<u16>,
    framer: &FramerConfig,
) -> Result<Capture, CmdError> {
    let bad = |e: pcap_file::PcapError| {
        CmdError::Usage(format!("{}: bad pcap file: {e}", path.display()))
    };
    let mut r = pcap_file::pcap::PcapReader::new(data).map_err(bad)?;
    let link = r.header().datalink;
    let mut asm = Reassembler::new();
    let mut notes = Vec::new();
    while let Some(p) = r.next_packet() {
        match p {
            Ok(p) => asm.packet(link, &p.data, ms(p.timestamp)),
            Err(e) => {
                // A capture cut short (tcpdump killed) ends mid-packet: keep what came before.
                notes.push(format!("capture ends early: {e}"));
                break;
            }
        }
    }
    let (streams, mut n2) = asm.finish(port, framer);
    notes.append(&mut n2);
    Ok(Capture {
        path: path.to_owned(),
        kind: SourceKind::Pcap,
        streams,
        notes,
    })
}

fn from_pcapng(
    path: &Path,
    data: &[u8],
    port: Option<u16>,
    framer: &FramerConfig,
) -> Result<Capture, CmdError> {
    use pcap_file::pcapng::Block;
    let bad = |e: pcap_file::PcapError| {
        CmdError::Usage(format!("{}: bad pcapng file: {e}", path.display()))
    };
    let mut r = pcap_file::pcapng::PcapNgReader::new(data).map_err(bad)?;
    let mut asm = Reassembler::new();
    let mut notes = Vec::new();
    let mut links: Vec<DataLink> = Vec::new();
    while let Some(b) = r.next_block() {
        let b = match b {
            Ok(b) => b,
            Err(e) => {
                notes.push(format!("capture ends early: {e}"));
                break;
            }
        };
        // Link types per interface, in the order the section declares them (a new
        // section restarts the numbering).
        match b {
            Block::SectionHeader(_) => links.clear(),
            Block::InterfaceDescription(i) => links.push(i.linktype),
            Block::EnhancedPacket(p) => {
                let link = links
                    .get(p.interface_id as usize)
                    .copied()
                    .unwrap_or(DataLink::ETHERNET);
                asm.packet(link, &p.data, ms(p.timestamp));
            }
            Block::SimplePacket(p) => {
                let link = links.first().copied().unwrap_or(DataLink::ETHERNET);
                asm.packet(link, &p.data, 0);
            }
            _ => {}
        }
    }
    let (streams, mut n2) = asm.finish(port, framer);
    notes.append(&mut n2);
    Ok(Capture {
        path: path.to_owned(),
        kind: SourceKind::Pcapng,
        streams,
        notes,
    })
}
