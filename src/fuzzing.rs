//! Fuzz entry points, kept in the crate so that `tests/fuzz_corpus.rs` replays
//! the committed seeds on every `cargo test` and the fuzzer (`fuzz/`) and CI
//! run the same assertions.

use crate::protocol::framing::{Cut, FramerConfig, JunkReason, cut};

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
