//! Fuzz entry points, kept in the crate so that `tests/fuzz_corpus.rs` replays
//! the committed seeds on every `cargo test` and the fuzzer (`fuzz/`) and CI
//! run the same assertions.

pub mod ingest;
pub mod merge;
pub mod plan;

use crate::protocol::framing::{Cut, FramerConfig, JunkReason, cut};

pub use plan::plan_record;

/// Re-chunking property of the framer.
///
/// The first byte gives how many chunk sizes follow (at most 16), each one byte
/// (size 1..=256); the rest is the stream. The stream is fed in those chunks
/// (the sizes repeat until it is used up) and in one piece, with two configs (the
/// default and a small one that makes the caps reachable). Asserts: no panic,
/// every byte in exactly one item, never `None` at EOF, and the same frames,
/// `truncated` and `oversize` items both ways (eagerly cut junk may be split
/// differently, so consecutive `no_header`/`bad_length`/`padding` runs are compared
/// as one run).
pub fn codec_rechunk(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 17).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s) + 1).collect();
    for cfg in [
        FramerConfig::default(),
        FramerConfig {
            max_frame: 64,
            max_junk_item: 16,
        },
    ] {
        let whole = normalized(&feed(stream, &[], &cfg));
        let chunked = normalized(&feed(stream, &sizes, &cfg));
        assert_eq!(whole, chunked, "chunk sizes {sizes:?}");
    }
}

/// An item with its stream offset; eager junk reasons erased (see above).
#[derive(Debug, PartialEq, Eq)]
enum Norm {
    Frame(usize, Cut),
    Junk(usize, usize, Option<JunkReason>),
}

fn feed(stream: &[u8], sizes: &[usize], cfg: &FramerConfig) -> Vec<(usize, Cut)> {
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut offset = 0;
    let mut fed = 0;
    let mut drain = |buf: &mut Vec<u8>, eof: bool| {
        while !buf.is_empty() {
            let Some(item) = cut(buf, eof, cfg) else {
                assert!(!eof, "cut returned None at EOF");
                break;
            };
            assert!(
                !item.is_empty() && item.len() <= buf.len(),
                "bad length {item:?}"
            );
            if let Cut::Frame { len, .. } = item {
                assert!(len <= cfg.max_frame, "frame over the cap");
                assert_eq!(&buf[..2], b"##", "frame must start with ##");
            }
            out.push((offset, item));
            offset += item.len();
            buf.drain(..item.len());
        }
    };
    let mut chunks = sizes.iter().cycle();
    while fed < stream.len() {
        let n = chunks
            .next()
            .map_or(stream.len(), |&n| n)
            .min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        drain(&mut buf, false);
    }
    drain(&mut buf, true);
    assert_eq!(offset, stream.len(), "byte conservation");
    out
}

fn normalized(items: &[(usize, Cut)]) -> Vec<Norm> {
    let mut out: Vec<Norm> = Vec::new();
    for &(at, item) in items {
        match item {
            Cut::Frame { .. } => out.push(Norm::Frame(at, item)),
            Cut::Junk { len, reason } => match reason {
                JunkReason::NoHeader | JunkReason::BadLength | JunkReason::Padding => {
                    if let Some(Norm::Junk(_, l, None)) = out.last_mut() {
                        *l += len;
                    } else {
                        out.push(Norm::Junk(at, len, None));
                    }
                }
                JunkReason::Truncated | JunkReason::Oversize => {
                    out.push(Norm::Junk(at, len, Some(reason)));
                }
            },
        }
    }
    out
}

/// Decoder properties on one candidate frame (any bytes, as the framer might cut).
///
/// Asserts: no panic; the raw bytes are kept exactly; every span lies inside
/// the segment; the JSON document is valid JSON; a frame without error
/// findings whose CRC is the HJ 212 one really has that CRC; and the ack the
/// gateway would send decodes cleanly and echoes QN and MN. A device with the
/// standard's test key is registered so the SM4 paths run too.
pub fn decode_frame(data: &[u8]) {
    use crate::protocol::{self, ExampleKeyLookup, Options, crc, json, reply};
    use chrono::TimeZone;

    let now = chrono::Utc
        .with_ymd_and_hms(2024, 6, 1, 1, 0, 0)
        .single()
        .expect("valid date");
    let f = protocol::decode(
        bytes::Bytes::copy_from_slice(data),
        &Options::new(now),
        &ExampleKeyLookup,
    );
    assert_eq!(&f.raw[..], data, "raw bytes are never rewritten");
    let len = f.segment.len();
    let spans = [
        f.header.qn,
        f.header.st,
        f.header.cn,
        f.header.pw,
        f.header.mn,
        f.header.flag,
        f.header.pnum,
        f.header.pno,
        f.header.rf,
        f.cp,
    ];
    for s in spans.into_iter().flatten() {
        assert!(
            s.start() <= s.end() && s.end() <= len,
            "{s:?} outside {len}"
        );
    }
    for p in &f.pairs {
        for s in [Some(p.key), p.code, p.suffix, Some(p.value)]
            .into_iter()
            .flatten()
        {
            assert!(
                s.start() <= s.end() && s.end() <= len,
                "{s:?} outside {len}"
            );
        }
    }
    let doc = json::frame_doc(&f);
    let parsed: serde_json::Value = serde_json::from_str(&doc).expect("frame_doc is JSON");
    assert_eq!(parsed["schema"], "hj212.frame.v1");
    if !f.has_error() {
        if f.crc.variant == crc::CrcVariant::Hj212 && f.encryption.is_none() {
            assert_eq!(crc::hj212(&f.segment), f.crc.computed);
        }
        if let Some(ack) = reply::ack(&f) {
            let a = protocol::decode(ack, &Options::new(now), &());
            // The ack echoes QN/MN; values that cannot be echoed (a 2005 9014
            // has no MN) are skipped.
            assert!(
                !a.findings
                    .iter()
                    .any(|x| x.code == protocol::finding::code::CRC_MISMATCH),
                "our own ack has a bad CRC"
            );
            if f.header.qn.is_some() && f.qn().is_some_and(|q| !q.contains(['&', ';', ','])) {
                assert_eq!(a.qn(), f.qn());
            }
        }
    }
}

/// Round trip of the replies and requests the gateway builds, with fields
/// drawn from the input: whatever is built decodes without error findings and
/// gives back the same CN, QN, MN and values.
pub fn reply_roundtrip(data: &[u8]) {
    use crate::protocol::{self, Dialect, Options, reply};
    use chrono::TimeZone;

    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    // Field text limited to what the standard allows in these positions.
    let clean = |b: &[u8], max: usize| -> String {
        let s: String = b
            .iter()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(max)
            .map(|&c| c as char)
            .collect();
        if s.is_empty() { "0".into() } else { s }
    };
    let third = rest.len() / 3;
    let mn = clean(&rest[..third], 24);
    let pw = clean(&rest[third..2 * third], 6);
    let qn_digits: String = rest
        .iter()
        .map(|b| char::from(b'0' + b % 10))
        .take(17)
        .collect();
    let qn = format!("{qn_digits:0<17}");
    let dialect = [Dialect::V2005, Dialect::V2017, Dialect::V2025][usize::from(sel % 3)];
    let t = reply::Target {
        dialect,
        st: "32",
        pw: &pw,
        mn: &mn,
    };
    let n = u16::from(sel) % 101;
    let cases: Vec<(bytes::Bytes, &str)> = vec![
        (reply::qn_rtn(t, &qn, n), "9011"),
        (reply::exe_rtn(t, &qn, n), "9012"),
        (reply::set_rtd_interval(t, &qn, u32::from(sel) + 30), "1062"),
        (reply::get_rtd_interval(t, &qn), "1061"),
        (reply::get_time(t, &qn, None), "1011"),
        (reply::set_time(t, &qn, "20240601085857", None), "1012"),
        (
            reply::history(t, &qn, 2061, "20240601080000", "20240601090000"),
            "2061",
        ),
    ];
    let now = chrono::Utc
        .with_ymd_and_hms(2024, 6, 1, 1, 0, 0)
        .single()
        .expect("valid date");
    for (bytes, cn) in cases {
        let f = protocol::decode(bytes, &Options::new(now), &());
        assert!(!f.has_error(), "{cn}: {:?}", f.findings);
        assert_eq!(f.cn(), Some(cn));
        assert_eq!(f.qn(), Some(qn.as_str()));
        assert_eq!(f.dialect, Some(dialect));
        if dialect != Dialect::V2005 || cn != "9014" {
            assert_eq!(f.mn(), Some(mn.as_str()));
        }
        match cn {
            "9011" => assert_eq!(f.param("QnRtn"), Some(n.to_string().as_str())),
            "9012" => assert_eq!(f.param("ExeRtn"), Some(n.to_string().as_str())),
            "1062" => assert_eq!(
                f.param("RtdInterval"),
                Some((u32::from(sel) + 30).to_string().as_str())
            ),
            _ => {}
        }
    }
}
