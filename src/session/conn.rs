//! The socket side of a session: the read buffer, the codec that cuts it into
//! items, the line's quiet/partial-frame timing, and reply writing.
//!
//! Why not `FramedRead`: every connected device holds one of these, idle or
//! not, and `FramedRead` keeps its buffer for the connection's life. Here the
//! buffer is allocated when bytes arrive and released once everything in it
//! has been cut, so 100,000 quiet devices hold no read buffers. The cutting
//! itself is the codec's ([`Hj212Codec`]), the one path from bytes to items.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::Decoder;

use crate::codec::{Hj212Codec, Item};
use crate::ingest::CloseReason;
use crate::protocol;
use crate::protocol::framing::FramerConfig;

/// Quiet time after which a buffered frame lacking only its terminator is taken as complete.
const TAIL_GRACE: Duration = Duration::from_millis(500);

/// What one read did.
pub(super) enum Read {
    /// Bytes were added to the buffer.
    Data,
    /// Readiness came with nothing to read.
    Nothing,
    /// The device closed its side.
    Closed,
    /// The read failed.
    Failed(std::io::Error),
}

/// One device connection's socket, buffer and codec.
pub(super) struct DeviceConn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    codec: Hj212Codec,
    /// Since when the buffer has held an incomplete frame.
    partial_since: Option<Instant>,
    last_activity: Instant,
    /// The tail check ran in this quiet period.
    tail_checked: bool,
}

impl DeviceConn {
    /// Wraps an accepted stream; frames are capped at `max_frame` bytes.
    pub(super) fn new(stream: TcpStream, max_frame: usize) -> DeviceConn {
        let (rd, wr) = stream.into_split();
        DeviceConn {
            rd,
            wr,
            buf: BytesMut::new(),
            codec: Hj212Codec::new(FramerConfig {
                max_frame,
                ..FramerConfig::default()
            }),
            partial_since: None,
            last_activity: Instant::now(),
            tail_checked: false,
        }
    }

    /// When the line next needs attention: the tail check once it has been
    /// quiet with a partial frame, the partial frame's limit, or idleness.
    pub(super) fn deadline(&self, idle: Duration, partial_limit: Duration) -> Instant {
        match self.partial_since {
            Some(_) if !self.tail_checked => self.last_activity + TAIL_GRACE,
            Some(t) => t + partial_limit,
            None => self.last_activity + idle,
        }
    }

    /// What the line's deadline means when it passes.
    pub(super) fn due(&self) -> Due {
        match self.partial_since {
            Some(_) if !self.tail_checked => Due::Tail,
            Some(_) => Due::Partial,
            None => Due::Idle,
        }
    }

    /// Waits until the socket may be read.
    pub(super) async fn readable(&self) -> std::io::Result<()> {
        self.rd.readable().await
    }

    /// Reads what the socket holds into the buffer, without waiting.
    pub(super) fn try_read(&mut self) -> Read {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(4096);
        }
        match self.rd.try_read_buf(&mut self.buf) {
            Ok(0) => Read::Closed,
            Ok(_) => {
                self.last_activity = Instant::now();
                self.tail_checked = false;
                Read::Data
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Readiness can come with nothing to read: every new
                // connection saw it once, and each then kept the 4 KiB
                // just reserved for as long as it stayed quiet.
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                Read::Nothing
            }
            Err(e) => Read::Failed(e),
        }
    }

    /// Cuts the complete items out of the buffer after a read.
    pub(super) fn items(&mut self) -> std::io::Result<Vec<Item>> {
        let mut items = Vec::new();
        while let Some(item) = self.codec.decode(&mut self.buf)? {
            items.push(item);
        }
        if self.buf.is_empty() {
            self.partial_since = None;
            self.buf = BytesMut::new();
        } else if self.partial_since.is_none() || !items.is_empty() {
            self.partial_since = Some(Instant::now());
        }
        Ok(items)
    }

    /// The tail check ([`Hj212Codec::decode_tail`]), once per quiet period.
    pub(super) fn tail(&mut self) -> Option<Item> {
        self.tail_checked = true;
        let item = self.codec.decode_tail(&mut self.buf)?;
        if self.buf.is_empty() {
            self.partial_since = None;
            self.buf = BytesMut::new();
        }
        Some(item)
    }

    /// At end of stream: everything buffered, cut with `eof` (a partial
    /// frame becomes junk).
    pub(super) fn eof_items(&mut self) -> Vec<Item> {
        let mut items = Vec::new();
        while !self.buf.is_empty() {
            match self.codec.decode_eof(&mut self.buf) {
                Ok(Some(item)) => items.push(item),
                _ => break,
            }
        }
        if !self.buf.is_empty() {
            // The codec must consume everything at eof; keep any remainder as junk anyway.
            items.push(Item::Junk {
                bytes: self.buf.split().freeze(),
                reason: protocol::framing::JunkReason::Truncated,
            });
        }
        items
    }

    /// Writes the replies of one commit in one write. The socket almost
    /// always has room, so the write is tried at once and only a short or
    /// blocked write is finished under `timeout` (which costs a timer
    /// registration). A failure comes back as the session's close reason and
    /// the I/O error, if any.
    pub(super) async fn write_replies(
        &mut self,
        replies: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<(), (CloseReason, Option<std::io::Error>)> {
        let out: Bytes = match replies.len() {
            0 => return Ok(()),
            1 => replies.into_iter().next().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(replies.iter().map(Bytes::len).sum());
                for r in &replies {
                    all.extend_from_slice(r);
                }
                all.freeze()
            }
        };
        let done = match self.wr.try_write(&out) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err((CloseReason::WriteError, Some(e))),
        };
        if done == out.len() {
            return Ok(());
        }
        match tokio::time::timeout(timeout, self.wr.write_all(&out[done..])).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err((CloseReason::WriteError, Some(e))),
            Err(_) => Err((CloseReason::WriteTimeout, None)),
        }
    }

    /// Writes a downlink request within `timeout`.
    pub(super) async fn write_request(
        &mut self,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<(), CloseReason> {
        match tokio::time::timeout(timeout, self.wr.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CloseReason::WriteError),
            Err(_) => Err(CloseReason::WriteTimeout),
        }
    }

    /// Sends FIN after what was already written, within `timeout`.
    pub(super) async fn shutdown_write(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.wr.shutdown()).await;
    }

    /// Shutdown's drain: waits for bytes until `deadline` and returns the
    /// complete items one read added (maybe none); `None` once the device
    /// closed, the read failed or the deadline passed.
    pub(super) async fn drain_until(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Option<Vec<Item>> {
        loop {
            match tokio::time::timeout_at(deadline, self.rd.readable()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
            match self.try_read() {
                Read::Data => {
                    let mut items = Vec::new();
                    while let Ok(Some(item)) = self.codec.decode(&mut self.buf) {
                        items.push(item);
                    }
                    return Some(items);
                }
                Read::Nothing => continue,
                Read::Closed | Read::Failed(_) => return None,
            }
        }
    }

    /// Cuts complete items without eof (shutdown: what was read is acked).
    pub(super) fn buffered_items(&mut self) -> Vec<Item> {
        let mut items = Vec::new();
        while let Ok(Some(item)) = self.codec.decode(&mut self.buf) {
            items.push(item);
        }
        items
    }
}

/// What a passed line deadline means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// Ask the codec whether the quiet buffer holds a whole frame.
    Tail,
    /// A frame stayed incomplete too long.
    Partial,
    /// Nothing arrived for `idle_timeout`.
    Idle,
}
