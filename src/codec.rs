//! The tokio-util codec around [`protocol::framing::cut`](crate::protocol::framing::cut).
//!
//! It knows no HJ 212 syntax: it hands the read buffer to the sans-IO framer and
//! turns each cut into an [`Item`] without copying (`split_to` + `freeze`), so
//! the bytes stored and forwarded later are exactly the bytes received. Junk is
//! an item, not an error: the session counts and logs it, and the stream goes
//! on. `Err` only ever comes from the socket.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::protocol::framing::{self, Cut, FrameInfo, FramerConfig, JunkReason};

/// One item read from a device connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A frame candidate, `##` through its terminator, not yet validated.
    Frame {
        /// The frame bytes exactly as received.
        bytes: Bytes,
        /// How its end was found.
        info: FrameInfo,
    },
    /// Bytes that are not a frame.
    Junk {
        /// The junk bytes exactly as received.
        bytes: Bytes,
        /// Why they are junk.
        reason: JunkReason,
    },
}

impl Item {
    /// The raw bytes of the item.
    pub fn bytes(&self) -> &Bytes {
        match self {
            Item::Frame { bytes, .. } | Item::Junk { bytes, .. } => bytes,
        }
    }
}

/// Decoder of device byte streams into [`Item`]s; encoder of pre-built replies.
#[derive(Debug, Clone, Default)]
pub struct Hj212Codec {
    /// Limits handed to the framer.
    pub cfg: FramerConfig,
}

impl Hj212Codec {
    /// A codec with the given framer limits.
    pub fn new(cfg: FramerConfig) -> Self {
        Hj212Codec { cfg }
    }

    fn next(&self, src: &mut BytesMut, eof: bool) -> Option<Item> {
        let item = match framing::cut(src, eof, &self.cfg)? {
            Cut::Frame { len, info } => Item::Frame {
                bytes: src.split_to(len).freeze(),
                info,
            },
            Cut::Junk { len, reason } => Item::Junk {
                bytes: src.split_to(len).freeze(),
                reason,
            },
        };
        Some(item)
    }

    /// A frame that lacks only its terminator, taken as complete: some
    /// loggers send no CR LF and then wait for their ack, and the framer
    /// cannot know no terminator is coming. The caller asks once the line has
    /// been quiet for a while; anything but one whole frame stays buffered.
    pub fn decode_tail(&mut self, src: &mut BytesMut) -> Option<Item> {
        match framing::cut(src, true, &self.cfg)? {
            Cut::Frame { len, info } => Some(Item::Frame {
                bytes: src.split_to(len).freeze(),
                info,
            }),
            Cut::Junk { .. } => None,
        }
    }
}

impl Decoder for Hj212Codec {
    type Item = Item;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Item>, Self::Error> {
        Ok(self.next(src, false))
    }

    /// At EOF every remaining byte still leaves as an item (a partial frame
    /// becomes `truncated` junk), so nothing received is dropped silently.
    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Item>, Self::Error> {
        Ok(self.next(src, true))
    }
}

impl Encoder<Bytes> for Hj212Codec {
    type Error = std::io::Error;

    /// Replies are built by the protocol layer; they go out byte for byte.
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), Self::Error> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}
