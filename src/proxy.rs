//! The PROXY protocol (HAProxy, versions 1 and 2): the real client address in
//! front of a connection relayed by an L4 load balancer.
//!
//! Sans-IO like `protocol/`: [`parse`] takes the bytes received so far and
//! says whether they hold a complete header, need more, or can never be one.
//! It is not HJ 212 syntax, so it lives outside `protocol/`. The listener
//! (`server.rs`) peeks at the socket, feeds the peeked bytes here and then
//! consumes exactly [`Header::len`] bytes, so HJ 212 bytes that arrived in the
//! same segment stay in the kernel buffer for the session.
//!
//! The header is a claim, not a fact: whoever writes it chooses the address the
//! log will record. [`Cidr`] lists (`[server] proxy_trusted`) decide whose
//! claims are believed; the listener refuses every other source. The spec
//! forbids guessing whether a header is present, so a trusted connection
//! without one is refused too, never served as a direct device.
//!
//! Specification: `doc/proxy-protocol.txt` of HAProxy (2020 revision).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Which header versions a listener accepts (`[server] proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Only the text header.
    V1,
    /// Only the binary header.
    V2,
    /// Either; the first bytes tell which.
    Any,
}

/// The header's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `PROXY TCP4 ...\r\n`.
    V1,
    /// The binary form.
    V2,
}

/// One v2 type-length-value extension (ALPN, authority, unique id, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    /// `PP2_TYPE_*`.
    pub kind: u8,
    /// The value bytes.
    pub value: Vec<u8>,
}

/// A complete, valid header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Which form it was.
    pub version: Version,
    /// The client as the proxy saw it. `None` when the connection's own peer
    /// is to be used: v2 LOCAL (the proxy's health check), v1 `UNKNOWN`, and
    /// v2 families that carry no IP endpoint (UNSPEC, UNIX, datagram).
    pub source: Option<SocketAddr>,
    /// The address the client connected to (on the proxy), when given.
    pub destination: Option<SocketAddr>,
    /// Bytes the header occupies; what follows is the relayed stream.
    pub len: usize,
    /// v2 extensions in order (empty for v1 and LOCAL).
    pub tlvs: Vec<Tlv>,
}

/// Why bytes are not a header. Each variant is final: more bytes cannot fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The stream does not start with an accepted signature.
    #[error("no PROXY header (the first bytes are not a {expected} signature)")]
    Missing {
        /// The accepted forms, for the message.
        expected: &'static str,
    },
    /// The header is longer than allowed (v1: 107 bytes by the spec; v2: the
    /// configured `proxy_max_header`).
    #[error("PROXY header longer than {limit} bytes")]
    TooLong {
        /// The limit in force.
        limit: usize,
    },
    /// A v2 version or command this receiver must not accept.
    #[error("unsupported PROXY v2 {what} {value:#04x}")]
    Unsupported {
        /// `version`, `command`, `family` or `transport`.
        what: &'static str,
        /// The offending value.
        value: u8,
    },
    /// Anything else that does not match the grammar.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

impl ProxyError {
    /// A low-cardinality reason for counters and log fields.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Missing { .. } => "missing",
            ProxyError::TooLong { .. } => "too_long",
            ProxyError::Unsupported { .. } => "unsupported",
            ProxyError::Malformed(_) => "malformed",
        }
    }
}

/// What [`parse`] made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A prefix of a possible header: read more and call again with all of it.
    NeedMore,
    /// A complete header; the stream proper starts at `Header::len`.
    Header(Header),
    /// Never a header, whatever follows.
    Error(ProxyError),
}

/// "The maximum line lengths the receiver must support including the CRLF
/// are ... 107 chars" (spec 2.1); a longer line is not a v1 header.
pub const V1_MAX: usize = 107;

/// `\x0D \x0A \x0D \x0A \x00 \x0D \x0A \x51 \x55 \x49 \x54 \x0A` (spec 2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Fixed part of a v2 header: signature, version/command, family, length.
pub const V2_FIXED: usize = 16;

const V1_PREFIX: &[u8] = b"PROXY ";

const PP2_TYPE_CRC32C: u8 = 0x03;

/// Parses the start of a connection. `max_v2` bounds a v2 header (16 bytes
/// plus its declared length); v1 is bounded by the spec's 107 bytes.
pub fn parse(buf: &[u8], accept: Accept, max_v2: usize) -> Parsed {
    let v1 = matches!(accept, Accept::V1 | Accept::Any);
    let v2 = matches!(accept, Accept::V2 | Accept::Any);
    let n = buf.len();
    // Decide on the first bytes, so a device talking HJ 212 straight to the
    // port is refused at once rather than after the header timeout.
    let could_v2 = v2 && buf[..n.min(12)] == V2_SIGNATURE[..n.min(12)];
    let could_v1 = v1 && buf[..n.min(6)] == V1_PREFIX[..n.min(6)];
    match (could_v1, could_v2) {
        (_, true) if n >= 12 => parse_v2(buf, max_v2),
        (true, _) if n >= 6 => parse_v1(buf),
        (false, false) => Parsed::Error(ProxyError::Missing {
            expected: match accept {
                Accept::V1 => "v1",
                Accept::V2 => "v2",
                Accept::Any => "v1 or v2",
            },
        }),
        _ => Parsed::NeedMore,
    }
}

/// v1 (spec 2.1):
/// `"PROXY" SP ("TCP4" | "TCP6") SP src SP dst SP sport SP dport CRLF`, or
/// `"PROXY" SP "UNKNOWN" [anything] CRLF`, at most 107 bytes.
fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Parsed::Error(ProxyError::TooLong { limit: V1_MAX });
        }
        // A lone LF or a CR followed by something else can never become CRLF.
        if window.contains(&b'\n') || window[..window.len().saturating_sub(1)].contains(&b'\r') {
            return Parsed::Error(ProxyError::Malformed("v1 line not ended by CRLF"));
        }
        return Parsed::NeedMore;
    };
    let len = cr + 2;
    let line = &buf[V1_PREFIX.len()..cr];
    let Ok(line) = std::str::from_utf8(line) else {
        return Parsed::Error(ProxyError::Malformed("v1 line is not ASCII"));
    };
    // "For UNKNOWN, the rest of the line before the CRLF may be omitted by the
    // sender, and the receiver must ignore anything presented before the CRLF".
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return header(Version::V1, None, None, len, Vec::new());
    }
    let mut parts = line.split(' ');
    let fields: Vec<&str> = parts.by_ref().take(6).collect();
    if fields.len() != 5 || parts.next().is_some() {
        return Parsed::Error(ProxyError::Malformed(
            "v1 needs protocol, two addresses and two ports separated by single spaces",
        ));
    }
    let v6 = match fields[0] {
        "TCP4" => false,
        "TCP6" => true,
        _ => {
            return Parsed::Error(ProxyError::Malformed(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ));
        }
    };
    let (Some(src), Some(dst)) = (v1_addr(fields[1], v6), v1_addr(fields[2], v6)) else {
        return Parsed::Error(ProxyError::Malformed("v1 address invalid for its protocol"));
    };
    let (Some(sport), Some(dport)) = (v1_port(fields[3]), v1_port(fields[4])) else {
        return Parsed::Error(ProxyError::Malformed("v1 port invalid"));
    };
    header(
        Version::V1,
        Some(SocketAddr::new(src, sport)),
        Some(SocketAddr::new(dst, dport)),
        len,
        Vec::new(),
    )
}

/// "IPv4 addresses must be indicated as a series of exactly 4 integers in the
/// range [0..255] ... Heading zeroes are not permitted"; IPv6 in RFC 4291 text
/// form. The advertised protocol dictates the family.
fn v1_addr(s: &str, v6: bool) -> Option<IpAddr> {
    if v6 {
        // Only hex digits and colons: the dotted-quad tail is not in the spec's form.
        if !s.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return None;
        }
        s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        // std's parser rejects leading zeros and out-of-range octets.
        s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

/// "a decimal integer in the range [0..65535] ... Heading zeroes are not permitted".
fn v1_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// v2 (spec 2.2): 12-byte signature, version (high nibble, must be 2) and
/// command (low nibble: 0 LOCAL, 1 PROXY), family (high nibble: UNSPEC, INET,
/// INET6, UNIX) and transport (low nibble: UNSPEC, STREAM, DGRAM), a
/// big-endian length of what follows, the address block, then TLVs.
fn parse_v2(buf: &[u8], max_v2: usize) -> Parsed {
    if buf.len() > 12 {
        let version = buf[12] >> 4;
        if version != 2 {
            return Parsed::Error(ProxyError::Unsupported {
                what: "version",
                value: version,
            });
        }
        let command = buf[12] & 0x0f;
        if command > 1 {
            return Parsed::Error(ProxyError::Unsupported {
                what: "command",
                value: command,
            });
        }
    }
    if buf.len() > 13 {
        let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
        if family > 3 {
            return Parsed::Error(ProxyError::Unsupported {
                what: "family",
                value: family,
            });
        }
        if transport > 2 {
            return Parsed::Error(ProxyError::Unsupported {
                what: "transport",
                value: transport,
            });
        }
    }
    if buf.len() < V2_FIXED {
        return Parsed::NeedMore;
    }
    let total = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if total > max_v2 {
        return Parsed::Error(ProxyError::TooLong { limit: max_v2 });
    }
    if buf.len() < total {
        return Parsed::NeedMore;
    }
    let block = &buf[V2_FIXED..total];
    if buf[12] & 0x0f == 0 {
        // LOCAL: "the receiver must accept this connection as valid and must use
        // the real connection endpoints and discard the protocol block".
        return header(Version::V2, None, None, total, Vec::new());
    }
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let addr_len = match family {
        0 => 0,
        1 => 12,
        2 => 36,
        _ => 216,
    };
    if block.len() < addr_len {
        return Parsed::Error(ProxyError::Malformed(
            "v2 length shorter than its address block",
        ));
    }
    let (src, dst) = match (family, transport) {
        (1, 1) => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::from(
                    <[u8; 4]>::try_from(&block[o..o + 4]).unwrap_or_default(),
                ))
            };
            let port = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(8))),
                Some(SocketAddr::new(ip(4), port(10))),
            )
        }
        (2, 1) => {
            let ip = |o: usize| {
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&block[o..o + 16]).unwrap_or_default(),
                ))
            };
            let port = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(32))),
                Some(SocketAddr::new(ip(16), port(34))),
            )
        }
        // "A receiver is not required to implement other ones, provided that it
        // automatically falls back to the UNSPEC mode": UNSPEC, UNIX and
        // datagram endpoints leave the connection's own peer in place.
        _ => (None, None),
    };
    let tlvs = match parse_tlvs(&block[addr_len..]) {
        Ok(t) => t,
        Err(e) => return Parsed::Error(e),
    };
    if let Some(crc) = tlvs.iter().find(|t| t.kind == PP2_TYPE_CRC32C) {
        if !crc32c_holds(&buf[..total], addr_len, &crc.value) {
            return Parsed::Error(ProxyError::Malformed("v2 CRC32C does not match"));
        }
    }
    header(Version::V2, src, dst, total, tlvs)
}

/// `struct pp2_tlv { uint8_t type; uint8_t length_hi; uint8_t length_lo; uint8_t value[0]; }`,
/// back to back until the end of the header.
fn parse_tlvs(mut rest: &[u8]) -> Result<Vec<Tlv>, ProxyError> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(ProxyError::Malformed("v2 TLV header truncated"));
        }
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        if rest.len() < 3 + len {
            return Err(ProxyError::Malformed("v2 TLV longer than the header"));
        }
        out.push(Tlv {
            kind: rest[0],
            value: rest[3..3 + len].to_vec(),
        });
        rest = &rest[3 + len..];
    }
    Ok(out)
}

/// "replace the 32 bits of the checksum field in the received PROXY header with
/// all '0's and calculate a CRC32c checksum value of the whole PROXY header"
/// (spec 2.2.3). The field is found by walking the TLVs again.
fn crc32c_holds(header: &[u8], addr_len: usize, declared: &[u8]) -> bool {
    let Ok(declared) = <[u8; 4]>::try_from(declared) else {
        return false;
    };
    let mut copy = header.to_vec();
    let mut at = V2_FIXED + addr_len;
    while at + 3 <= copy.len() {
        let len = usize::from(u16::from_be_bytes([copy[at + 1], copy[at + 2]]));
        if copy[at] == PP2_TYPE_CRC32C && len == 4 {
            copy[at + 3..at + 7].fill(0);
            break;
        }
        at += 3 + len;
    }
    crc32c(&copy) == u32::from_be_bytes(declared)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), RFC 4960 appendix B.
/// Bitwise: it runs over one header per connection.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn header(
    version: Version,
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    len: usize,
    tlvs: Vec<Tlv>,
) -> Parsed {
    Parsed::Header(Header {
        version,
        source,
        destination,
        len,
        tlvs,
    })
}

/// An address block, `10.0.0.0/8` or `2001:db8::/32`; a bare address is a
/// block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { net, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside the block. IPv4-mapped IPv6 peers (a dual-stack
    /// `[::]` listener) match IPv4 blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u8) {
            match ip {
                IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
                IpAddr::V6(a) => (u128::from(a), 128),
            }
        };
        let (net, width) = bits(self.net);
        let (addr, w) = bits(ip.to_canonical());
        if w != width {
            return false;
        }
        let shift = u32::from(width - self.prefix);
        // A /0 shifts by the whole width; checked_shr keeps that defined.
        net.checked_shr(shift).unwrap_or(0) == addr.checked_shr(shift).unwrap_or(0)
    }
}

/// Whether any block in `list` contains `ip`.
pub fn trusted(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 4096;

    fn ok(buf: &[u8]) -> Header {
        match parse(buf, Accept::Any, MAX) {
            Parsed::Header(h) => h,
            other => panic!("expected a header from {buf:?}, got {other:?}"),
        }
    }

    fn err(buf: &[u8], accept: Accept) -> ProxyError {
        match parse(buf, accept, MAX) {
            Parsed::Error(e) => e,
            other => panic!("expected an error from {buf:?}, got {other:?}"),
        }
    }

    fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    /// Every strict prefix of a valid header is NeedMore, never an error or a
    /// header, and the whole is the header with the trailing data untouched.
    fn prefixes_need_more(header: &[u8], accept: Accept) {
        for cut in 0..header.len() {
            assert_eq!(
                parse(&header[..cut], accept, MAX),
                Parsed::NeedMore,
                "prefix of {cut} bytes"
            );
        }
    }

    fn v2(cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(block.len() as u16).to_be_bytes());
        v.extend_from_slice(block);
        v
    }

    fn v2_tcp4() -> Vec<u8> {
        // 127.0.0.5:40001 -> 10.0.0.1:9212
        let block = [127, 0, 0, 5, 10, 0, 0, 1, 0x9c, 0x41, 0x23, 0xfc];
        v2(1, 0x11, &block)
    }

    #[test]
    fn v1_spec_examples() {
        // The spec's own example (section 2.1).
        let h = ok(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n");
        assert_eq!(h.version, Version::V1);
        assert_eq!(h.source, sa("192.168.0.1:56324"));
        assert_eq!(h.destination, sa("192.168.0.11:443"));
        assert_eq!(h.len, 47);
        let h = ok(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n##0101");
        assert_eq!(h.source, sa("[2001:db8::1]:1"));
        assert_eq!(h.destination, sa("[::1]:65535"));
        assert_eq!(h.len, 36);
        let h = ok(b"PROXY UNKNOWN\r\n##");
        assert_eq!((h.source, h.destination, h.len), (None, None, 15));
        // "the receiver must ignore anything presented before the CRLF"
        let h = ok(b"PROXY UNKNOWN ffff:: ffff:: 65535 65535\r\n");
        assert_eq!((h.source, h.len), (None, 41));
    }

    #[test]
    fn v1_longest_lines_fit_and_longer_do_not() {
        let worst4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(ok(worst4).len, 56);
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let worst6 = format!("PROXY TCP6 {f} {f} 65535 65535\r\n");
        assert_eq!(ok(worst6.as_bytes()).len, 104);
        let unknown = format!("PROXY UNKNOWN {f} {f} 65535 65535\r\n");
        assert_eq!(unknown.len(), V1_MAX);
        assert_eq!(ok(unknown.as_bytes()).len, V1_MAX);
        // 107 bytes and no CRLF yet: the line can only be longer than allowed.
        let long = format!("PROXY UNKNOWN {}", "a".repeat(93));
        assert_eq!(long.len(), V1_MAX);
        assert_eq!(
            err(long.as_bytes(), Accept::V1),
            ProxyError::TooLong { limit: V1_MAX }
        );
        assert_eq!(
            parse(&long.as_bytes()[..106], Accept::V1, MAX),
            Parsed::NeedMore
        );
    }

    #[test]
    fn v1_rejects_what_the_grammar_does_not_allow() {
        for bad in [
            &b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n"[..],
            b"PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n",
            b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 192.168.0.1 192.168.0.11 1 2\r\n",
            b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY tcp4 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
            b"PROXY TCP4 1.2.3.4\r1.2.3.4 1 2\r\n",
            b"PROXY \xff\r\n",
        ] {
            let e = err(bad, Accept::Any);
            assert_eq!(
                e.reason(),
                "malformed",
                "{:?}: {e}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn v1_truncated_at_every_byte_needs_more() {
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 40001 9212\r\n";
        prefixes_need_more(line, Accept::V1);
        prefixes_need_more(line, Accept::Any);
        let mut with_data = line.to_vec();
        with_data.extend_from_slice(b"##0101QN=");
        assert_eq!(ok(&with_data).len, line.len());
    }

    #[test]
    fn v2_tcp4_tcp6_and_local() {
        let mut buf = v2_tcp4();
        buf.extend_from_slice(b"##0101QN=");
        let h = ok(&buf);
        assert_eq!(h.version, Version::V2);
        assert_eq!(h.source, sa("127.0.0.5:40001"));
        assert_eq!(h.destination, sa("10.0.0.1:9212"));
        assert_eq!(h.len, 28);
        assert!(h.tlvs.is_empty());

        let mut block = Vec::new();
        block.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        block.extend_from_slice(&[0xff, 0xff, 0x00, 0x50]);
        let h = ok(&v2(1, 0x21, &block));
        assert_eq!(h.source, sa("[2001:db8::7]:65535"));
        assert_eq!(h.destination, sa("[::1]:80"));
        assert_eq!(h.len, 52);

        // LOCAL (health check): addresses discarded even when present.
        let h = ok(&v2(0, 0x00, &[]));
        assert_eq!((h.source, h.len), (None, 16));
        let h = ok(&v2(0, 0x11, &[127, 0, 0, 5, 10, 0, 0, 1, 0, 1, 0, 2]));
        assert_eq!((h.source, h.len), (None, 28));
        // PROXY with UNSPEC, UNIX or datagram endpoints: fall back to the socket.
        assert_eq!(ok(&v2(1, 0x00, &[])).source, None);
        assert_eq!(ok(&v2(1, 0x31, &[0; 216])).source, None);
        assert_eq!(ok(&v2(1, 0x12, &[0; 12])).source, None);
    }

    #[test]
    fn v2_with_tlvs() {
        let mut block = vec![127, 0, 0, 9, 10, 0, 0, 1, 0x9c, 0x41, 0x23, 0xfc];
        // PP2_TYPE_AUTHORITY "gw.example", PP2_TYPE_UNIQUE_ID, PP2_TYPE_NOOP (empty).
        block.extend_from_slice(&[0x02, 0x00, 0x0a]);
        block.extend_from_slice(b"gw.example");
        block.extend_from_slice(&[0x05, 0x00, 0x03, 1, 2, 3]);
        block.extend_from_slice(&[0x04, 0x00, 0x00]);
        let hdr = v2(1, 0x11, &block);
        let mut buf = hdr.clone();
        buf.extend_from_slice(b"##0101");
        let h = ok(&buf);
        assert_eq!(h.len, hdr.len());
        assert_eq!(h.source, sa("127.0.0.9:40001"));
        assert_eq!(
            h.tlvs,
            vec![
                Tlv {
                    kind: 2,
                    value: b"gw.example".to_vec()
                },
                Tlv {
                    kind: 5,
                    value: vec![1, 2, 3]
                },
                Tlv {
                    kind: 4,
                    value: vec![]
                },
            ]
        );
        prefixes_need_more(&hdr, Accept::V2);
        prefixes_need_more(&hdr, Accept::Any);
        // A TLV running past the declared length, or a stray byte after the last one.
        let mut bad = block.clone();
        bad.extend_from_slice(&[0x05, 0x00, 0x09, 1]);
        assert_eq!(err(&v2(1, 0x11, &bad), Accept::V2).reason(), "malformed");
        let mut bad = block;
        bad.push(0x05);
        assert_eq!(err(&v2(1, 0x11, &bad), Accept::V2).reason(), "malformed");
    }

    #[test]
    fn v2_crc32c_is_checked() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283, "RFC 4960 check value");
        let mut block = vec![127, 0, 0, 9, 10, 0, 0, 1, 0x9c, 0x41, 0x23, 0xfc];
        block.extend_from_slice(&[0x03, 0x00, 0x04, 0, 0, 0, 0]);
        let mut hdr = v2(1, 0x11, &block);
        let crc = crc32c(&hdr);
        let at = hdr.len() - 4;
        hdr[at..].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(ok(&hdr).source, sa("127.0.0.9:40001"));
        // Any changed bit (here the claimed source) fails the check.
        hdr[V2_FIXED + 3] = 10;
        assert_eq!(
            err(&hdr, Accept::V2),
            ProxyError::Malformed("v2 CRC32C does not match")
        );
    }

    #[test]
    fn v2_truncated_at_every_byte_needs_more() {
        let hdr = v2_tcp4();
        prefixes_need_more(&hdr, Accept::V2);
        prefixes_need_more(&hdr, Accept::Any);
    }

    #[test]
    fn v2_rejects_bad_signature_version_command_family_and_length() {
        let good = v2_tcp4();
        for i in 0..12 {
            let mut b = good.clone();
            b[i] ^= 0x40;
            assert_eq!(
                err(&b[..i + 1], Accept::V2).reason(),
                "missing",
                "signature byte {i}"
            );
            assert_eq!(err(&b, Accept::V2).reason(), "missing");
        }
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            b
        };
        assert_eq!(
            err(&with(12, 0x11), Accept::V2),
            ProxyError::Unsupported {
                what: "version",
                value: 1
            }
        );
        assert_eq!(
            err(&with(12, 0x22), Accept::V2),
            ProxyError::Unsupported {
                what: "command",
                value: 2
            }
        );
        assert_eq!(
            err(&with(13, 0x41), Accept::V2),
            ProxyError::Unsupported {
                what: "family",
                value: 4
            }
        );
        assert_eq!(
            err(&with(13, 0x13), Accept::V2),
            ProxyError::Unsupported {
                what: "transport",
                value: 3
            }
        );
        // Decided as soon as the byte arrives, before the rest of the header.
        assert_eq!(
            err(&with(12, 0x11)[..13], Accept::V2).reason(),
            "unsupported"
        );
        // Declared length shorter than an INET block.
        let short = v2(1, 0x11, &[127, 0, 0, 1]);
        assert_eq!(err(&short, Accept::V2).reason(), "malformed");
        let six = v2(1, 0x21, &[0; 12]);
        assert_eq!(err(&six, Accept::V2).reason(), "malformed");
    }

    #[test]
    fn oversize_v2_is_refused_from_its_length_field() {
        let mut b = V2_SIGNATURE.to_vec();
        b.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(
            parse(&b, Accept::V2, MAX),
            Parsed::Error(ProxyError::TooLong { limit: MAX })
        );
        // Exactly at the limit is fine.
        let block = vec![0u8; 64 - 16];
        let mut block = block;
        block[..12].copy_from_slice(&[127, 0, 0, 1, 127, 0, 0, 2, 0, 1, 0, 2]);
        block[12..15].copy_from_slice(&[0x04, 0x00, 33]);
        let hdr = v2(1, 0x11, &block);
        assert_eq!(hdr.len(), 64);
        assert!(matches!(parse(&hdr, Accept::V2, 64), Parsed::Header(_)));
        assert_eq!(
            parse(&hdr, Accept::V2, 63),
            Parsed::Error(ProxyError::TooLong { limit: 63 })
        );
    }

    #[test]
    fn missing_header_is_refused_on_the_first_byte() {
        let hj = b"##0101QN=20240601085857223;ST=31";
        assert_eq!(
            err(&hj[..1], Accept::Any),
            ProxyError::Missing {
                expected: "v1 or v2"
            }
        );
        assert_eq!(err(hj, Accept::V1).reason(), "missing");
        // Each version alone refuses the other's header.
        assert_eq!(err(&v2_tcp4(), Accept::V1).reason(), "missing");
        assert_eq!(err(b"PROXY UNKNOWN\r\n", Accept::V2).reason(), "missing");
        assert_eq!(err(b"PROXZ", Accept::Any).reason(), "missing");
        assert_eq!(parse(b"", Accept::Any, MAX), Parsed::NeedMore);
    }

    #[test]
    fn cidr_blocks() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.255.1.2".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(
            c.contains("::ffff:10.1.2.3".parse().unwrap()),
            "v4-mapped peer"
        );
        assert!(!c.contains("::1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(
            "::/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("fe80::1".parse().unwrap())
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0/8".parse::<Cidr>().is_err());
        assert!("any".parse::<Cidr>().is_err());
        assert!(trusted(&[c, v6], "10.9.9.9".parse().unwrap()));
        assert!(!trusted(&[], "10.9.9.9".parse().unwrap()));
    }
}
