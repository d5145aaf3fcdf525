//! A QoS 1 publisher connection of its own for the data path.
//!
//! # Why not rumqttc here
//!
//! rumqttc 0.25 writes and flushes after every request it takes from its channel:
//! one `writev` per publish, whatever is waiting behind it (its
//! `max_request_batch` option is parsed and never used; rumqtt issue #810). At
//! a backlog drain or at 35,000 frames/s that is one system call, one wakeup and
//! one TCP segment per message. This connection encodes every publish it is
//! handed into one buffer and writes the buffer with as few `write` calls as the
//! socket takes, so a batch read from the log leaves in one system call.
//!
//! It speaks exactly what the data path needs of MQTT 3.1.1: CONNECT (clean
//! session, credentials, keep-alive; no will: the will and the retained status
//! stay on the rumqttc connection), CONNACK, PUBLISH at QoS 1 with packet ids,
//! PUBACK matched by packet id, PINGREQ/PINGRESP and DISCONNECT. It subscribes to
//! nothing. Packets are encoded and decoded with rumqttc's own `mqttbytes`
//! (PUBLISH is encoded here, straight from the caller's topic and payload).
//!
//! It holds no retry queue: a lost connection hands back every tag still in
//! flight ([`Wire::into_inflight`]) and the caller re-reads them from the log,
//! as it did with rumqttc.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{ConnAck, Connect, ConnectReturnCode, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// How long TCP connect, TLS handshake and CONNACK may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest packet accepted from the broker: it only ever sends small acks.
const MAX_INCOMING: usize = 64 << 10;
/// Written bytes at the front of the write buffer that are dropped at once.
const COMPACT_AT: usize = 256 << 10;
/// Read buffer reserved before each read (PUBACKs are 4 bytes each).
const READ_CHUNK: usize = 16 << 10;

/// Why the connection ended or could not be made. Never holds the password.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// TCP or TLS I/O failed (connection refused, reset, ...).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The host is not a valid TLS server name.
    #[error("TLS server name {host:?}: {message}")]
    ServerName {
        /// `[mqtt] url`'s host.
        host: String,
        /// rustls' reason.
        message: String,
    },
    /// The broker answered CONNECT with a refusal.
    #[error("connection refused by the broker: {0:?}")]
    Refused(ConnectReturnCode),
    /// The broker sent something MQTT 3.1.1 does not allow here.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Connect, TLS and CONNACK did not finish in time.
    #[error("no CONNACK within {0:?}")]
    ConnectTimeout(Duration),
    /// The previous PINGREQ was not answered within a keep-alive interval.
    #[error("no PINGRESP within the keep-alive interval")]
    PingTimeout,
    /// The broker closed the connection.
    #[error("connection closed by the broker")]
    Closed,
}

/// Where and as whom to connect.
#[derive(Clone)]
pub struct Target {
    /// Broker host (also the TLS server name).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS client configuration for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Client id of this connection.
    pub client_id: String,
    /// User name and password.
    pub login: Option<(String, String)>,
    /// Keep-alive interval (zero: no PINGREQ).
    pub keep_alive: Duration,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One connected QoS 1 publisher; `T` tags each publish for its acknowledgement.
pub struct Wire<T> {
    rd: ReadHalf<Box<dyn Io>>,
    wr: WriteHalf<Box<dyn Io>>,
    /// Encoded packets; `out[written..]` is not yet handed to the socket.
    out: Vec<u8>,
    written: usize,
    /// TLS: bytes handed to the stream may wait in it until a flush.
    unflushed: bool,
    inbuf: BytesMut,
    next_pkid: u16,
    inflight: HashMap<u16, T>,
    keep_alive: Duration,
    /// When the next PINGREQ is due.
    ping: Pin<Box<Sleep>>,
    ping_out: bool,
    writes: u64,
}

impl<T> Wire<T> {
    /// Connects (TCP, TLS for `tls`, CONNECT with a clean session) and waits for
    /// the broker's CONNACK.
    pub async fn connect(t: &Target) -> Result<Wire<T>, WireError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, Self::handshake(t)).await {
            Ok(r) => r,
            Err(_) => Err(WireError::ConnectTimeout(CONNECT_TIMEOUT)),
        }
    }

    async fn handshake(t: &Target) -> Result<Wire<T>, WireError> {
        let tcp = TcpStream::connect((t.host.as_str(), t.port)).await?;
        // Batching is done here, per write; Nagle would only hold a lone publish
        // back until the previous segment is acknowledged.
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = match &t.tls {
            None => Box::new(tcp),
            Some(cfg) => {
                let name = rustls_pki_types::ServerName::try_from(t.host.clone()).map_err(|e| {
                    WireError::ServerName {
                        host: t.host.clone(),
                        message: e.to_string(),
                    }
                })?;
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(cfg))
                    .connect(name, tcp)
                    .await?;
                Box::new(tls)
            }
        };
        let (rd, wr) = tokio::io::split(io);
        let mut w = Wire {
            rd,
            wr,
            out: Vec::with_capacity(64 << 10),
            written: 0,
            unflushed: false,
            inbuf: BytesMut::with_capacity(READ_CHUNK),
            next_pkid: 1,
            inflight: HashMap::new(),
            keep_alive: t.keep_alive,
            ping: Box::pin(tokio::time::sleep(t.keep_alive)),
            ping_out: false,
            writes: 0,
        };
        let mut connect = Connect::new(t.client_id.clone());
        connect.keep_alive = u16::try_from(t.keep_alive.as_secs()).unwrap_or(u16::MAX);
        connect.clean_session = true;
        if let Some((u, p)) = &t.login {
            connect.set_login(u.clone(), p.clone());
        }
        let mut buf = BytesMut::new();
        connect
            .write(&mut buf)
            .map_err(|e| WireError::Protocol(format!("CONNECT: {e}")))?;
        w.wr.write_all(&buf).await?;
        w.wr.flush().await?;
        loop {
            match w.next_packet()? {
                Some(Packet::ConnAck(ConnAck { code, .. })) => {
                    return match code {
                        ConnectReturnCode::Success => Ok(w),
                        refused => Err(WireError::Refused(refused)),
                    };
                }
                Some(other) => {
                    return Err(WireError::Protocol(format!(
                        "expected CONNACK, got {other:?}"
                    )));
                }
                None => w.fill().await?,
            }
        }
    }

    /// Publishes handed over and not yet acknowledged.
    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    /// `write` calls made on the socket so far (each took one or more publishes).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Encodes a QoS 1 PUBLISH into the write buffer; it leaves with the next
    /// [`Wire::poll`]. The caller keeps the in-flight count under the broker's
    /// window, which is at most 65,535 (the packet id space).
    pub fn publish(&mut self, topic: &str, payload: &[u8], retain: bool, dup: bool, tag: T) {
        let mut pkid = self.next_pkid;
        // Skip ids still in flight (and 0, which MQTT forbids).
        while pkid == 0 || self.inflight.contains_key(&pkid) {
            pkid = pkid.wrapping_add(1);
        }
        self.next_pkid = pkid.wrapping_add(1);
        self.compact();
        encode_publish(&mut self.out, topic, payload, retain, dup, pkid);
        self.inflight.insert(pkid, tag);
    }

    /// Drives the connection: writes what is buffered, sends PINGREQs, and
    /// returns once at least one publish is acknowledged, with its tag(s) in
    /// `acked`. Cancel-safe: each await either completes or changes nothing.
    pub async fn poll(&mut self, acked: &mut Vec<T>) -> Result<(), WireError> {
        loop {
            while let Some(p) = self.next_packet()? {
                self.on_packet(p, acked)?;
            }
            if !acked.is_empty() {
                return Ok(());
            }
            let pending = self.written < self.out.len();
            tokio::select! {
                biased;
                r = push(&mut self.wr, &self.out[self.written..]), if pending || self.unflushed => {
                    match r? {
                        Some(0) => return Err(WireError::Closed),
                        Some(n) => {
                            self.writes += 1;
                            self.written += n;
                            self.unflushed = true;
                        }
                        None => self.unflushed = false,
                    }
                }
                r = self.rd.read_buf(&mut self.inbuf) => {
                    if r? == 0 {
                        return Err(WireError::Closed);
                    }
                }
                _ = self.ping.as_mut(), if !self.keep_alive.is_zero() => {
                    if self.ping_out {
                        return Err(WireError::PingTimeout);
                    }
                    self.queue(&[0xC0, 0x00]); // PINGREQ
                    self.ping_out = true;
                    let next = Instant::now() + self.keep_alive;
                    self.ping.as_mut().reset(next);
                }
            }
        }
    }

    /// Writes what is buffered and a DISCONNECT, then closes the connection.
    pub async fn disconnect(mut self) {
        self.queue(&[0xE0, 0x00]); // DISCONNECT
        let _ = self.wr.write_all(&self.out[self.written..]).await;
        let _ = self.wr.shutdown().await;
    }

    /// Every tag still in flight (the connection is gone).
    pub fn into_inflight(self) -> impl Iterator<Item = T> {
        self.inflight.into_values()
    }

    fn queue(&mut self, bytes: &[u8]) {
        self.compact();
        self.out.extend_from_slice(bytes);
    }

    /// Drops what the socket took from the front of the buffer, so a socket
    /// that is always a little behind does not let it grow with the backlog.
    fn compact(&mut self) {
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
        } else if self.written >= COMPACT_AT {
            self.out.drain(..self.written);
            self.written = 0;
        }
    }

    async fn fill(&mut self) -> Result<(), WireError> {
        self.inbuf.reserve(READ_CHUNK);
        if self.rd.read_buf(&mut self.inbuf).await? == 0 {
            return Err(WireError::Closed);
        }
        Ok(())
    }

    fn next_packet(&mut self) -> Result<Option<Packet>, WireError> {
        if self.inbuf.capacity() - self.inbuf.len() < READ_CHUNK / 4 {
            self.inbuf.reserve(READ_CHUNK);
        }
        match Packet::read(&mut self.inbuf, MAX_INCOMING) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(WireError::Protocol(e.to_string())),
        }
    }

    fn on_packet(&mut self, p: Packet, acked: &mut Vec<T>) -> Result<(), WireError> {
        match p {
            Packet::PubAck(a) => {
                // An id we do not know (e.g. acked twice) changes nothing.
                if let Some(tag) = self.inflight.remove(&a.pkid) {
                    acked.push(tag);
                }
                Ok(())
            }
            Packet::PingResp => {
                self.ping_out = false;
                Ok(())
            }
            other => Err(WireError::Protocol(format!("unexpected {other:?}"))),
        }
    }
}

/// One `write` of what is buffered (`Some(bytes taken)`), or with nothing
/// buffered a flush (`None`).
async fn push(wr: &mut WriteHalf<Box<dyn Io>>, buf: &[u8]) -> std::io::Result<Option<usize>> {
    if buf.is_empty() {
        wr.flush().await.map(|()| None)
    } else {
        wr.write(buf).await.map(Some)
    }
}

/// Appends a PUBLISH at QoS 1 (MQTT 3.1.1 section 3.3): fixed header, remaining
/// length, topic, packet id, payload. Public (hidden) for `examples/floor.rs`,
/// which publishes as the gateway does.
#[doc(hidden)]
pub fn encode_publish(
    out: &mut Vec<u8>,
    topic: &str,
    payload: &[u8],
    retain: bool,
    dup: bool,
    pkid: u16,
) {
    let len = 2 + topic.len() + 2 + payload.len();
    out.reserve(5 + len);
    out.push(0x30 | (u8::from(dup) << 3) | (1 << 1) | u8::from(retain));
    let mut x = len;
    loop {
        let mut b = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            b |= 0x80;
        }
        out.push(b);
        if x == 0 {
            break;
        }
    }
    // The caller checked the topic (at most 65,535 bytes) and the packet size.
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{Publish, QoS};

    /// What this module encodes, rumqttc decodes to the same fields, at the edges
    /// of the remaining-length encoding (1 to 3 bytes).
    #[test]
    fn publish_encoding_round_trips_through_rumqttc() {
        for (size, retain, dup) in [
            (0, false, false),
            (100, true, false),
            (127 - 7, false, true),
            (128 - 7, false, false),
            (16_383 - 7, true, true),
            (16_384 - 7, false, false),
            (300_000, false, true),
        ] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_publish(&mut out, "a/b", &payload, retain, dup, 513);
            let mut buf = BytesMut::from(&out[..]);
            let Packet::Publish(p) = Packet::read(&mut buf, 1 << 20).unwrap() else {
                panic!("not a publish");
            };
            let mut want = Publish::new("a/b", QoS::AtLeastOnce, payload);
            want.pkid = 513;
            want.retain = retain;
            want.dup = dup;
            assert_eq!(p, want, "size {size}");
            assert!(buf.is_empty(), "exactly one packet");
        }
    }
}
