//! The real decoder over real async I/O: every fixture, with garbage between
//! them, read in chunks of every size 1..=64, in pseudo-random chunks, and over
//! a TCP loopback socket. The items must be the same whatever the chunking, and
//! their concatenation must be the input, byte for byte.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hj212_gateway::codec::{Hj212Codec, Item};
use hj212_gateway::protocol::framing::{JunkReason, Terminator};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio_util::codec::{FramedRead, FramedWrite};

/// xorshift64*: deterministic, good enough to pick chunk sizes and garbage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Fixture {
    id: String,
    frame: Vec<u8>,
    valid: bool,
}

fn fixtures() -> Vec<Fixture> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/frames.jsonl");
    std::fs::read_to_string(path)
        .expect("fixtures")
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            Fixture {
                id: v["id"].as_str().expect("id").to_owned(),
                frame: v["frame"].as_str().expect("frame").as_bytes().to_vec(),
                valid: v["valid"].as_bool().expect("valid"),
            }
        })
        .collect()
}

/// Every fixture in corpus order, with modem/HTTP/binary garbage between some.
/// Garbage never ends in '#' or '&', so it cannot lend a fixture a header or tail.
fn stream() -> Vec<u8> {
    const GARBAGE: &[&[u8]] = &[
        b"",
        b"\r\n",
        b"\0\0\0",
        b"  ",
        b"AT+CSQ\r\n+CSQ: 23,99\r\nOK\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"##test13912345678\0\n$\t?\0",
        b"\x00\x01\x02\x03\x00\x06\x00\x00\x00\x06\x01\x03\x00\x00\x00\x0a",
        b"#x#",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::new();
    for fx in fixtures() {
        out.extend_from_slice(&fx.frame);
        out.extend_from_slice(GARBAGE[rng.below(GARBAGE.len())]);
    }
    out
}

/// An `AsyncRead` that hands out at most the next chunk size per read.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    turn: usize,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let want = this.sizes[this.turn % this.sizes.len()];
        this.turn += 1;
        let n = want.min(this.data.len() - this.pos).min(buf.remaining());
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// A comparable view of an item: frames exactly; eagerly cut junk
/// (no_header, bad_length, padding) merged, since read boundaries may split it.
#[derive(Debug, PartialEq, Eq)]
enum View {
    Frame(Bytes, Terminator, bool),
    Junk(Vec<u8>, Option<JunkReason>),
}

fn view(items: &[Item]) -> Vec<View> {
    let mut out: Vec<View> = Vec::new();
    for item in items {
        match item {
            Item::Frame { bytes, info } => {
                out.push(View::Frame(bytes.clone(), info.terminator, info.by_length))
            }
            Item::Junk { bytes, reason } => match reason {
                JunkReason::Truncated | JunkReason::Oversize => {
                    out.push(View::Junk(bytes.to_vec(), Some(*reason)))
                }
                _ => match out.last_mut() {
                    Some(View::Junk(run, None)) => run.extend_from_slice(bytes),
                    _ => out.push(View::Junk(bytes.to_vec(), None)),
                },
            },
        }
    }
    out
}

async fn decode<R: AsyncRead + Unpin>(reader: R) -> Vec<Item> {
    let mut framed = FramedRead::new(reader, Hj212Codec::default());
    let mut items = Vec::new();
    while let Some(item) = framed.next().await {
        items.push(item.expect("decoding never fails on bad bytes"));
    }
    items
}

async fn decode_chunked(data: &[u8], sizes: Vec<usize>) -> Vec<Item> {
    decode(Chunked {
        data: data.to_vec(),
        pos: 0,
        sizes,
        turn: 0,
    })
    .await
}

fn concat(items: &[Item]) -> Vec<u8> {
    items
        .iter()
        .flat_map(|i| i.bytes().iter().copied())
        .collect()
}

/// The reference: the whole stream in one read.
async fn reference(data: &[u8]) -> Vec<Item> {
    let items = decode_chunked(data, vec![data.len()]).await;
    assert_eq!(concat(&items), data);
    items
}

#[tokio::test]
async fn every_valid_fixture_comes_out_as_one_frame() {
    let data = stream();
    let items = reference(&data).await;
    let frames: Vec<&Bytes> = items
        .iter()
        .filter_map(|i| match i {
            Item::Frame { bytes, .. } => Some(bytes),
            Item::Junk { .. } => None,
        })
        .collect();
    let mut at = 0;
    for fx in fixtures().into_iter().filter(|f| f.valid) {
        let found = frames[at..].iter().position(|b| b[..] == fx.frame[..]);
        let Some(i) = found else {
            panic!("{} not framed", fx.id);
        };
        at += i + 1;
    }
    // The DTU string and the Modbus/HTTP noise never become frames.
    assert!(frames.iter().all(|b| b.starts_with(b"##")));
    assert!(items.iter().any(|i| matches!(
        i,
        Item::Junk { reason: JunkReason::BadLength, bytes } if bytes.starts_with(b"##test139")
    )));
}

#[tokio::test]
async fn every_chunk_size_1_to_64_gives_the_same_items() {
    let data = stream();
    let want = view(&reference(&data).await);
    for size in 1..=64 {
        let items = decode_chunked(&data, vec![size]).await;
        assert_eq!(concat(&items), data, "chunk size {size}");
        assert_eq!(view(&items), want, "chunk size {size}");
    }
}

#[tokio::test]
async fn random_chunkings_give_the_same_items() {
    let data = stream();
    let want = view(&reference(&data).await);
    let mut rng = Rng(42);
    for round in 0..40 {
        let max = [2, 8, 64, 700, 4096][round % 5];
        let sizes: Vec<usize> = (0..997).map(|_| 1 + rng.below(max)).collect();
        let items = decode_chunked(&data, sizes).await;
        assert_eq!(concat(&items), data, "round {round}");
        assert_eq!(view(&items), want, "round {round}");
    }
}

#[tokio::test]
async fn over_duplex_and_tcp_loopback() {
    let data = stream();
    let want = view(&reference(&data).await);

    let (mut tx, rx) = tokio::io::duplex(61);
    let payload = data.clone();
    let writer = tokio::spawn(async move {
        let mut rng = Rng(7);
        let mut pos = 0;
        while pos < payload.len() {
            let n = (1 + rng.below(300)).min(payload.len() - pos);
            tx.write_all(&payload[pos..pos + n]).await.expect("write");
            pos += n;
        }
    });
    let items = decode(rx).await;
    writer.await.expect("writer");
    assert_eq!(concat(&items), data);
    assert_eq!(view(&items), want);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let payload = data.clone();
    let writer = tokio::spawn(async move {
        let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
        sock.set_nodelay(true).expect("nodelay");
        let mut rng = Rng(11);
        let mut pos = 0;
        while pos < payload.len() {
            let n = (1 + rng.below(1500)).min(payload.len() - pos);
            sock.write_all(&payload[pos..pos + n]).await.expect("write");
            pos += n;
            if rng.below(8) == 0 {
                tokio::task::yield_now().await;
            }
        }
        sock.shutdown().await.expect("shutdown");
    });
    let (sock, _) = listener.accept().await.expect("accept");
    let items = decode(sock).await;
    writer.await.expect("writer");
    assert_eq!(concat(&items), data);
    assert_eq!(view(&items), want);
}

#[tokio::test]
async fn encoder_writes_replies_as_is() {
    let reply = Bytes::from_static(
        b"##0087QN=20240601085857223;ST=91;CN=9014;PW=123456;MN=010000A8900016F000169DC0;Flag=4;CP=&&&&24C0\r\n",
    );
    let (tx, rx) = tokio::io::duplex(1024);
    let mut sink = FramedWrite::new(tx, Hj212Codec::default());
    sink.send(reply.clone()).await.expect("send");
    sink.send(reply.clone()).await.expect("send");
    drop(sink);
    let items = decode(rx).await;
    assert_eq!(items.len(), 2);
    for item in items {
        assert!(
            matches!(item, Item::Frame { bytes, info } if bytes == reply && info.by_length && info.terminator == Terminator::CrLf)
        );
    }
}
