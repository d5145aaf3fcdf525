//! A C2SP `tlog-witness` client: submits a signed checkpoint with its
//! consistency proof (`add-checkpoint`) and returns the witness's cosignature.
//!
//! A witness remembers the largest tree it cosigned for our origin and cosigns a
//! new checkpoint only if it is consistent with that one. Once a witness holds
//! size N, a log that was cut or re-chained below N can no longer get a
//! cosignature, and the cosignatures already published pin what it was.
//!
//! The exchange (C2SP `tlog-witness`, "add-checkpoint"):
//!
//! ```text
//! POST <submission prefix>/add-checkpoint
//!
//! old 20852014                                  <- size the witness last cosigned
//! PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=  <- consistency proof, one hash a line
//!                                               <- empty line
//! <signed checkpoint note>
//! ```
//!
//! answered by `200` and cosignature lines, or `409 Conflict` and the size the
//! witness really holds (then we prove from that size and try once more), or
//! another status (an error naming it and the witness).
//!
//! Transport: one HTTP/1.1 request per connection (`Connection: close`) over
//! tokio, `http://` or `https://` (rustls with the `ring` provider and the
//! system's roots, or a [`rustls::ClientConfig`] given to
//! [`WitnessClient::with_tls_config`]). Everything the witness sends is capped:
//! [`MAX_RESPONSE_HEAD`] bytes of status line and headers, [`MAX_RESPONSE_BODY`]
//! of body; the whole exchange is bounded by [`WitnessEntry::timeout`].

use std::error::Error as StdError;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::checkpoint::Checkpoint;

/// The most status-line-and-header bytes read from a witness.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The most body bytes read from a witness (a cosignature line is about 130
/// bytes; an ML-DSA-44 one about 3.3 KB).
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// C2SP `tlog-witness`: "The client MUST NOT send more than 63 consistency proof
/// lines."
pub const MAX_PROOF_HASHES: usize = 63;

/// Signature type of timestamped Ed25519 checkpoint cosignatures (C2SP
/// `signed-note`: "`0x04` — Timestamped Ed25519 checkpoint cosignatures").
pub const COSIGNATURE_V1_TYPE: u8 = 0x04;

/// One configured witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessEntry {
    /// The submission prefix, `http://host[:port][/path]` or `https://...`;
    /// `/add-checkpoint` is appended.
    pub url: String,
    /// The witness's cosigner verifier key,
    /// `<name>+<hex id>+<base64(0x04 || Ed25519 public key)>`. Without it the
    /// returned cosignatures are kept but NOT verified.
    pub vkey: Option<String>,
    /// Bound on each request (connect, send, receive), not on both attempts.
    pub timeout: Duration,
}

/// What a witness returned for a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cosigned {
    /// The witness URL, as configured.
    pub witness: String,
    /// The cosignature lines (`— <name> <base64>`, without the newline). With a
    /// configured key: only the lines from that key, all verified. Without one:
    /// every line the witness sent. Appending them (each plus `\n`) to the
    /// checkpoint note gives the cosigned checkpoint.
    pub lines: Vec<String>,
    /// True when every line was verified against [`WitnessEntry::vkey`].
    pub verified: bool,
    /// The old size the accepted request carried (the witness's previous size).
    pub old: u64,
}

/// Why a witness gave no (valid) cosignature. Every variant names the witness.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The configured URL is not usable.
    #[error("witness {url}: bad URL: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configured verifier key is not a cosignature/v1 key.
    #[error("witness {url}: bad vkey: {reason}")]
    Vkey {
        /// The witness URL.
        url: String,
        /// What is wrong with the key.
        reason: String,
    },
    /// The caller asked for an old size above the checkpoint's size.
    #[error("witness {url}: old size {old} is larger than the checkpoint size {size}")]
    OldTooLarge {
        /// The witness URL.
        url: String,
        /// The old size given.
        old: u64,
        /// The checkpoint's size.
        size: u64,
    },
    /// The witness did not answer within the timeout.
    #[error("witness {url}: no answer within {after:?}")]
    Timeout {
        /// The witness URL.
        url: String,
        /// The timeout.
        after: Duration,
    },
    /// Connecting, sending or receiving failed.
    #[error("witness {url}: {op}: {source}")]
    Io {
        /// The witness URL.
        url: String,
        /// What was being done.
        op: &'static str,
        /// The OS or TLS error.
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error("witness {url}: TLS: {reason}")]
    Tls {
        /// The witness URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The response is not HTTP/1.x as we can read it, or is over a cap.
    #[error("witness {url}: bad HTTP response: {reason}")]
    Http {
        /// The witness URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The witness answered with a status other than 200 or a usable 409.
    #[error("witness {url}: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        /// The witness URL.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body, printable characters only.
        body: String,
    },
    /// The witness still reports a different size after our retry.
    #[error("witness {url}: 409 Conflict again: it holds size {witness_size}, we sent old {old}")]
    Conflict {
        /// The witness URL.
        url: String,
        /// The size the witness reports.
        witness_size: u64,
        /// The old size we sent.
        old: u64,
    },
    /// The witness has cosigned a larger tree than the checkpoint: the log lost
    /// records since, or is presenting a fork.
    #[error(
        "witness {url} has cosigned a tree of size {witness_size}, larger than this checkpoint ({size}): \
         the log was cut back or forked since that cosignature"
    )]
    Rollback {
        /// The witness URL.
        url: String,
        /// The size the witness holds.
        witness_size: u64,
        /// The checkpoint's size.
        size: u64,
    },
    /// The caller's `prove` callback failed.
    #[error("witness {url}: no consistency proof from size {old}: {source}")]
    Prove {
        /// The witness URL.
        url: String,
        /// The old size asked for.
        old: u64,
        /// The callback's error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The consistency proof is longer than the protocol allows.
    #[error("witness {url}: consistency proof has {count} hashes, more than {MAX_PROOF_HASHES}")]
    ProofTooLong {
        /// The witness URL.
        url: String,
        /// Its length.
        count: usize,
    },
    /// The 200 body is not a list of note signature lines.
    #[error("witness {url}: bad cosignature response: {reason}")]
    BadResponse {
        /// The witness URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A cosignature from the configured key does not verify.
    #[error("witness {url}: cosignature from {key} is invalid: {reason}")]
    BadCosignature {
        /// The witness URL.
        url: String,
        /// `name+hex id` of the key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The witness answered 200 but with no cosignature from the configured key.
    #[error("witness {url}: no cosignature from the configured key {key} (got: {})", got.join(", "))]
    NoCosignature {
        /// The witness URL.
        url: String,
        /// `name+hex id` of the configured key.
        key: String,
        /// `name+hex id` of the lines it did send.
        got: Vec<String>,
    },
}

/// A witness client; keep one for the life of the process (it loads the
/// system's TLS roots once, on the first `https://` witness).
#[derive(Debug, Default)]
pub struct WitnessClient {
    tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl WitnessClient {
    /// A client that trusts the system's CA certificates for `https://`.
    pub fn new() -> WitnessClient {
        WitnessClient::default()
    }

    /// A client that uses `config` for `https://` witnesses (a private CA, a
    /// client certificate).
    pub fn with_tls_config(config: Arc<rustls::ClientConfig>) -> WitnessClient {
        let tls = OnceLock::new();
        let _ = tls.set(Ok(config));
        WitnessClient { tls }
    }

    /// Submits `checkpoint` to the witness and returns its cosignature.
    ///
    /// `old` is the size this witness last cosigned, as far as the caller knows
    /// (0 if never). `prove(n)` must return the RFC 6962 consistency proof from
    /// size `n` to `checkpoint.size` (the hashes of `tlog_tiles::prove_tree`);
    /// it is not called for `n` = 0 or `n` = the checkpoint size (empty proofs),
    /// and is called a second time if the witness answers `409 Conflict` with
    /// another size. It runs on the calling task, so keep it short (one indexed
    /// read of at most 63 hashes).
    ///
    /// A 409 size above the checkpoint's is [`WitnessError::Rollback`], never
    /// retried: it means the witness saw more of this log than the log now has.
    pub async fn add_checkpoint<F, E>(
        &self,
        entry: &WitnessEntry,
        checkpoint: &Checkpoint,
        old: u64,
        mut prove: F,
    ) -> Result<Cosigned, WitnessError>
    where
        F: FnMut(u64) -> Result<Vec<[u8; 32]>, E>,
        E: Into<Box<dyn StdError + Send + Sync>>,
    {
        let url = entry.url.as_str();
        let target = Target::parse(url)?;
        let cosigner = entry
            .vkey
            .as_deref()
            .map(CosignerKey::parse)
            .transpose()
            .map_err(|reason| WitnessError::Vkey {
                url: url.to_owned(),
                reason,
            })?;
        if old > checkpoint.size {
            return Err(WitnessError::OldTooLarge {
                url: url.to_owned(),
                old,
                size: checkpoint.size,
            });
        }
        let mut old = old;
        let mut retried = false;
        loop {
            let proof = if old == 0 || old == checkpoint.size {
                Vec::new()
            } else {
                prove(old).map_err(|e| WitnessError::Prove {
                    url: url.to_owned(),
                    old,
                    source: e.into(),
                })?
            };
            if proof.len() > MAX_PROOF_HASHES {
                return Err(WitnessError::ProofTooLong {
                    url: url.to_owned(),
                    count: proof.len(),
                });
            }
            let body = request_body(old, &proof, &checkpoint.note);
            let response = tokio::time::timeout(entry.timeout, self.post(&target, url, &body))
                .await
                .map_err(|_| WitnessError::Timeout {
                    url: url.to_owned(),
                    after: entry.timeout,
                })??;
            match response.status {
                200 => {
                    return cosignatures(url, &response.body, checkpoint, cosigner.as_ref()).map(
                        |(lines, verified)| Cosigned {
                            witness: url.to_owned(),
                            lines,
                            verified,
                            old,
                        },
                    );
                }
                409 => {
                    let witness_size = parse_size(&response.body).ok_or_else(|| WitnessError::Http {
                        url: url.to_owned(),
                        reason: format!(
                            "409 Conflict without a tree size body (content-type {:?}, body {:?})",
                            response.content_type.as_deref().unwrap_or(""),
                            printable(&response.body)
                        ),
                    })?;
                    if witness_size > checkpoint.size {
                        return Err(WitnessError::Rollback {
                            url: url.to_owned(),
                            witness_size,
                            size: checkpoint.size,
                        });
                    }
                    if retried || witness_size == old {
                        return Err(WitnessError::Conflict {
                            url: url.to_owned(),
                            witness_size,
                            old,
                        });
                    }
                    old = witness_size;
                    retried = true;
                }
                status => {
                    return Err(WitnessError::Status {
                        url: url.to_owned(),
                        status,
                        body: printable(&response.body),
                    });
                }
            }
        }
    }

    async fn post(
        &self,
        target: &Target,
        url: &str,
        body: &[u8],
    ) -> Result<Response, WitnessError> {
        let io = |op| {
            move |source| WitnessError::Io {
                url: url.to_owned(),
                op,
                source,
            }
        };
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(io("connect"))?;
        let _ = tcp.set_nodelay(true);
        let mut request = format!(
            "POST {}/add-checkpoint HTTP/1.1\r\nHost: {}\r\nUser-Agent: hj212-gateway/{}\r\n\
             Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            target.path,
            target.host_header,
            env!("CARGO_PKG_VERSION"),
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        if target.tls {
            let config = self
                .tls
                .get_or_init(system_tls_config)
                .clone()
                .map_err(|reason| WitnessError::Tls {
                    url: url.to_owned(),
                    reason,
                })?;
            let name =
                rustls_pki_types::ServerName::try_from(target.host.clone()).map_err(|e| {
                    WitnessError::Tls {
                        url: url.to_owned(),
                        reason: format!("{:?} is not a valid server name: {e}", target.host),
                    }
                })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(io("TLS handshake"))?;
            exchange(tls, &request, url).await
        } else {
            exchange(tcp, &request, url).await
        }
    }
}

/// [`WitnessClient::add_checkpoint`] with a one-off client (system TLS roots).
pub async fn add_checkpoint<F, E>(
    entry: &WitnessEntry,
    checkpoint: &Checkpoint,
    old: u64,
    prove: F,
) -> Result<Cosigned, WitnessError>
where
    F: FnMut(u64) -> Result<Vec<[u8; 32]>, E>,
    E: Into<Box<dyn StdError + Send + Sync>>,
{
    WitnessClient::new()
        .add_checkpoint(entry, checkpoint, old, prove)
        .await
}

fn system_tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err("no system CA certificates found".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The request body (C2SP `tlog-witness`, "add-checkpoint"):
///
/// > The request body MUST be a sequence of an old size line, zero or more
/// > consistency proof lines, and an empty line, followed by a checkpoint. Each
/// > line MUST terminate in a newline character (U+000A). The old size line MUST
/// > consist of the string `old`, a single space (0x20), and the tree size of
/// > the previous checkpoint encoded as an ASCII decimal with no leading zeroes
/// > ... Each consistency proof line MUST encode a single hash in base64.
pub fn request_body(old: u64, proof: &[[u8; 32]], note: &str) -> Vec<u8> {
    let mut body = format!("old {old}\n");
    for h in proof {
        body.push_str(&BASE64.encode(h));
        body.push('\n');
    }
    body.push('\n');
    body.push_str(note);
    body.into_bytes()
}

/// The 409 body: "the tree size of the latest cosigned checkpoint in decimal,
/// followed by a newline (U+000A)". A missing final newline is tolerated.
fn parse_size(body: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(body).ok()?;
    let s = s.strip_suffix('\n').unwrap_or(s);
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&n: &u64| n <= i64::MAX as u64)
}

/// A witness's Ed25519 cosigner key, from its vkey.
#[derive(Debug, Clone)]
struct CosignerKey {
    name: String,
    id: u32,
    key: ed25519_dalek::VerifyingKey,
}

impl CosignerKey {
    /// `<key name>+hex(32-bit key ID)+base64(signature type || public key)`
    /// (C2SP `signed-note`, "Verifier keys"), where C2SP `tlog-cosignature`
    /// says: "Ed25519 public keys MAY be encoded as vkeys with signature type
    /// 0x04 and the 32-byte Ed25519 cosigner public key as the public key
    /// material", and "The key ID for Ed25519 cosignatures MUST be computed as
    /// `SHA-256(<name> || "\n" || 0x04 || 32-byte Ed25519 cosigner public key)[:4]`".
    fn parse(vkey: &str) -> Result<CosignerKey, String> {
        let (name, rest) = vkey
            .split_once('+')
            .ok_or("expected <name>+<hex id>+<base64 key>")?;
        let (id16, key64) = rest
            .split_once('+')
            .ok_or("expected <name>+<hex id>+<base64 key>")?;
        if !signed_note::is_key_name_valid(name) {
            return Err(format!(
                "key name {name:?} is empty or contains a space or '+'"
            ));
        }
        if id16.len() != 8 || !id16.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("key id {id16:?} is not 8 hex digits"));
        }
        let id = u32::from_str_radix(id16, 16).map_err(|e| e.to_string())?;
        let material = BASE64
            .decode(key64)
            .map_err(|e| format!("key is not base64: {e}"))?;
        match material.first() {
            Some(&COSIGNATURE_V1_TYPE) => {}
            Some(0x01) => {
                return Err(
                    "this is a note signing key (type 0x01); a witness cosigner key has type 0x04 \
                     (C2SP tlog-cosignature, cosignature/v1)"
                        .into(),
                );
            }
            Some(t) => {
                return Err(format!(
                    "signature type 0x{t:02x} is not cosignature/v1 (0x04)"
                ));
            }
            None => return Err("key is empty".into()),
        }
        let pk: [u8; 32] = material[1..]
            .try_into()
            .map_err(|_| format!("Ed25519 key is {} bytes, expected 32", material.len() - 1))?;
        let expect = signed_note::key_id(name, &material);
        if expect != id {
            return Err(format!(
                "key id {id:08x} does not match the name and key (expected {expect:08x})"
            ));
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&pk)
            .map_err(|e| format!("bad Ed25519 key: {e}"))?;
        Ok(CosignerKey {
            name: name.to_owned(),
            id,
            key,
        })
    }

    fn label(&self) -> String {
        format!("{}+{:08x}", self.name, self.id)
    }

    /// Verifies one cosignature/v1 signature (the bytes after the key id).
    ///
    /// C2SP `tlog-cosignature`: the signature is `timestamped_signature { u64
    /// timestamp; opaque ed25519_signature[64]; }`, big-endian; "The signed
    /// message MUST be two newline (U+000A) terminated lines (one header line
    /// and one timestamp line) followed by the whole note body of the cosigned
    /// checkpoint ... The header line MUST be the fixed string `cosignature/v1`
    /// ... The timestamp line MUST consist of the string `time`, a single space
    /// (0x20), and `timestamped_signature.timestamp` encoded as an ASCII decimal
    /// with no leading zeroes." The timestamp "MUST NOT exceed 2^63 - 1", and
    /// `tlog-witness`: "The cosignature MUST NOT omit the timestamp, i.e. the
    /// timestamp MUST NOT be zero."
    fn verify(&self, sig: &[u8], text: &str) -> Result<u64, String> {
        let sig: &[u8; 72] = sig.try_into().map_err(|_| {
            format!(
                "{} signature bytes, expected 72 (timestamp and Ed25519)",
                sig.len()
            )
        })?;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&sig[..8]);
        let timestamp = u64::from_be_bytes(ts);
        if timestamp == 0 {
            return Err("timestamp is zero".into());
        }
        if timestamp > i64::MAX as u64 {
            return Err(format!("timestamp {timestamp} exceeds 2^63 - 1"));
        }
        let message = cosigned_message(timestamp, text);
        let signature =
            ed25519_dalek::Signature::from_slice(&sig[8..]).map_err(|e| e.to_string())?;
        self.key
            .verify_strict(message.as_bytes(), &signature)
            .map_err(|_| "Ed25519 signature does not verify over this checkpoint".to_owned())?;
        Ok(timestamp)
    }
}

/// The cosignature/v1 signed message for a checkpoint note text.
pub fn cosigned_message(timestamp: u64, text: &str) -> String {
    format!("cosignature/v1\ntime {timestamp}\n{text}")
}

/// The 200 body (C2SP `tlog-witness`): "a sequence of one or more note
/// signature lines, each starting with the `—` character (U+2014) and ending
/// with a newline character (U+000A)"; and "The client MUST ignore any
/// cosignatures from unknown keys."
fn cosignatures(
    url: &str,
    body: &[u8],
    checkpoint: &Checkpoint,
    cosigner: Option<&CosignerKey>,
) -> Result<(Vec<String>, bool), WitnessError> {
    let bad = |reason: String| WitnessError::BadResponse {
        url: url.to_owned(),
        reason,
    };
    let text = std::str::from_utf8(body).map_err(|_| bad("not UTF-8".into()))?;
    let Some(text) = text.strip_suffix('\n') else {
        return Err(bad(if text.is_empty() {
            "empty body".into()
        } else {
            "the last line does not end in a newline".into()
        }));
    };
    let mut all = Vec::new();
    for line in text.split('\n') {
        let sig = signed_note::Signature::from_bytes(line.as_bytes()).map_err(|_| {
            bad(format!(
                "not a note signature line: {:?}",
                printable(line.as_bytes())
            ))
        })?;
        all.push((line.to_owned(), sig));
    }
    let Some(key) = cosigner else {
        return Ok((all.into_iter().map(|(l, _)| l).collect(), false));
    };
    let mut kept = Vec::new();
    for (line, sig) in &all {
        if sig.name() == key.name && sig.id() == key.id {
            key.verify(sig.signature(), &checkpoint.text)
                .map_err(|reason| WitnessError::BadCosignature {
                    url: url.to_owned(),
                    key: key.label(),
                    reason,
                })?;
            kept.push(line.clone());
        }
    }
    if kept.is_empty() {
        return Err(WitnessError::NoCosignature {
            url: url.to_owned(),
            key: key.label(),
            got: all
                .iter()
                .map(|(_, s)| format!("{}+{:08x}", s.name(), s.id()))
                .collect(),
        });
    }
    Ok((kept, true))
}

/// Where to send requests, from the configured URL.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    tls: bool,
    /// Host to connect to (no brackets around an IPv6 address).
    host: String,
    port: u16,
    /// `host[:port]` as written, for the `Host` header.
    host_header: String,
    /// The prefix path without a trailing `/` (may be empty).
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, WitnessError> {
        let bad = |reason: &str| WitnessError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        if !url.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("must be printable ASCII without spaces"));
        }
        if url.contains(['?', '#']) {
            return Err(bad("a submission prefix has no query or fragment"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad("user info (user@host) is not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in host"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad("port must be 1-65535"))?,
        };
        Ok(Target {
            tls,
            host: host.to_owned(),
            port,
            host_header: authority.to_owned(),
            path: path.trim_end_matches('/').to_owned(),
        })
    }
}

/// A response as far as we need it.
#[derive(Debug)]
struct Response {
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// Sends `request` and reads one HTTP/1.x response (skipping `1xx` interim
/// responses), with the body framed by `Content-Length`, chunked transfer
/// coding, or the end of the connection (RFC 9112, section 6.3), all capped.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
    url: &str,
) -> Result<Response, WitnessError> {
    let io = |op| {
        move |source| WitnessError::Io {
            url: url.to_owned(),
            op,
            source,
        }
    };
    s.write_all(request).await.map_err(io("send"))?;
    s.flush().await.map_err(io("send"))?;
    let mut r = Reader {
        s,
        buf: Vec::with_capacity(4096),
        pos: 0,
        url,
    };
    loop {
        let head = r.read_head().await?;
        let head = parse_head(&head).map_err(|reason| r.http(reason))?;
        if (100..200).contains(&head.status) {
            continue;
        }
        let body = if head.chunked {
            r.read_chunked().await?
        } else if let Some(n) = head.content_length {
            if n > MAX_RESPONSE_BODY as u64 {
                return Err(r.http(format!(
                    "Content-Length {n} is over the {MAX_RESPONSE_BODY}-byte cap"
                )));
            }
            r.read_exact(n as usize).await?
        } else {
            r.read_to_end().await?
        };
        return Ok(Response {
            status: head.status,
            content_type: head.content_type,
            body,
        });
    }
}

struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    content_type: Option<String>,
}

/// Parses `HTTP/1.x SP status-code SP [reason-phrase]` and the header fields we
/// use (RFC 9112, sections 4 and 5).
fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(head).map_err(|_| "header is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .ok_or_else(|| {
            format!(
                "not an HTTP/1.x status line: {:?}",
                printable(status_line.as_bytes())
            )
        })?;
    let code = rest
        .get(..3)
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
    let status = code
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| rest.len() == 3 || rest.as_bytes()[3] == b' ')
        .ok_or_else(|| format!("bad status line {:?}", printable(status_line.as_bytes())))?;
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
        content_type: None,
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {:?}", printable(line.as_bytes())))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length headers".into());
            }
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.eq_ignore_ascii_case("chunked") {
                head.chunked = true;
            } else {
                return Err(format!("unsupported Transfer-Encoding {value:?}"));
            }
        } else if name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(value.to_owned());
        }
    }
    Ok(head)
}

struct Reader<'a, S> {
    s: S,
    buf: Vec<u8>,
    pos: usize,
    url: &'a str,
}

impl<S: AsyncRead + Unpin> Reader<'_, S> {
    fn http(&self, reason: String) -> WitnessError {
        WitnessError::Http {
            url: self.url.to_owned(),
            reason,
        }
    }

    /// Reads more bytes into the buffer; false at the end of the stream.
    async fn fill(&mut self) -> Result<bool, WitnessError> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut chunk = [0u8; 4096];
        let n = self
            .s
            .read(&mut chunk)
            .await
            .map_err(|source| WitnessError::Io {
                url: self.url.to_owned(),
                op: "receive",
                source,
            })?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// The status line and headers, up to the blank line (consumed).
    async fn read_head(&mut self) -> Result<Vec<u8>, WitnessError> {
        loop {
            if let Some(i) = self.unread().windows(4).position(|w| w == b"\r\n\r\n") {
                let head = self.unread()[..i].to_vec();
                self.pos += i + 4;
                return Ok(head);
            }
            if self.unread().len() > MAX_RESPONSE_HEAD {
                return Err(self.http(format!("headers longer than {MAX_RESPONSE_HEAD} bytes")));
            }
            if !self.fill().await? {
                return Err(self.http(if self.unread().is_empty() {
                    "connection closed without a response".into()
                } else {
                    "connection closed inside the headers".into()
                }));
            }
        }
    }

    async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, WitnessError> {
        while self.unread().len() < n {
            if !self.fill().await? {
                return Err(self.http(format!(
                    "connection closed after {} of {n} body bytes",
                    self.unread().len()
                )));
            }
        }
        let out = self.unread()[..n].to_vec();
        self.pos += n;
        Ok(out)
    }

    async fn read_to_end(&mut self) -> Result<Vec<u8>, WitnessError> {
        loop {
            if self.unread().len() > MAX_RESPONSE_BODY {
                return Err(self.http(format!("body longer than {MAX_RESPONSE_BODY} bytes")));
            }
            if !self.fill().await? {
                return Ok(self.unread().to_vec());
            }
        }
    }

    async fn read_line(&mut self) -> Result<String, WitnessError> {
        loop {
            if let Some(i) = self.unread().windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.unread()[..i]).into_owned();
                self.pos += i + 2;
                return Ok(line);
            }
            if self.unread().len() > 1024 {
                return Err(self.http("chunk header line too long".into()));
            }
            if !self.fill().await? {
                return Err(self.http("connection closed inside a chunk header".into()));
            }
        }
    }

    /// Chunked transfer coding (RFC 9112, section 7.1): `chunk-size [ext] CRLF
    /// data CRLF`, ..., `0 CRLF`, trailer fields, `CRLF`.
    async fn read_chunked(&mut self) -> Result<Vec<u8>, WitnessError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line().await?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let n = usize::from_str_radix(size, 16)
                .map_err(|_| self.http(format!("bad chunk size {size:?}")))?;
            if n == 0 {
                // Trailer fields until the empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body);
            }
            if body.len() + n > MAX_RESPONSE_BODY {
                return Err(self.http(format!("body longer than {MAX_RESPONSE_BODY} bytes")));
            }
            body.extend(self.read_exact(n).await?);
            if !self.read_exact(2).await?.eq(b"\r\n") {
                return Err(self.http("chunk not followed by CRLF".into()));
            }
        }
    }
}

/// At most 200 characters of `bytes`, control characters escaped, for messages.
fn printable(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let mut out: String = s.chars().take(200).flat_map(char::escape_default).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::checkpoint;
    use crate::evidence::key::SigningKey;
    use ed25519_dalek::Signer as _;

    fn cosigner(name: &str, seed: u8) -> (ed25519_dalek::SigningKey, String) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let mut material = vec![COSIGNATURE_V1_TYPE];
        material.extend_from_slice(sk.verifying_key().as_bytes());
        let id = signed_note::key_id(name, &material);
        (sk, format!("{name}+{id:08x}+{}", BASE64.encode(&material)))
    }

    fn cosign_line(
        sk: &ed25519_dalek::SigningKey,
        name: &str,
        vkey: &str,
        t: u64,
        text: &str,
    ) -> String {
        let id = u32::from_str_radix(vkey.split('+').nth(1).unwrap(), 16).unwrap();
        let sig = sk.sign(cosigned_message(t, text).as_bytes());
        let mut raw = id.to_be_bytes().to_vec();
        raw.extend_from_slice(&t.to_be_bytes());
        raw.extend_from_slice(&sig.to_bytes());
        format!("— {name} {}", BASE64.encode(raw))
    }

    fn cp() -> Checkpoint {
        let k = SigningKey::from_seed("hj212-gateway/t", &[3; 32]).unwrap();
        checkpoint::sign(k.signer(), k.name(), 5, &[8; 32]).unwrap()
    }

    #[test]
    fn spec_cosignature_example_line_carries_key_id_and_timestamp() {
        // C2SP tlog-cosignature example: its timestamp is the "time 1679315147"
        // of the spec's signed-message example.
        let line = "— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==";
        let sig = signed_note::Signature::from_bytes(line.as_bytes()).unwrap();
        assert_eq!(sig.name(), "witness.example.com/w1");
        assert_eq!(sig.signature().len(), 72);
        let t = u64::from_be_bytes(sig.signature()[..8].try_into().unwrap());
        assert_eq!(t, 1679315147);
        assert_eq!(
            cosigned_message(
                t,
                "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
            ),
            "cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
        );
    }

    #[test]
    fn cosigner_key_id_uses_type_0x04() {
        use sha2::Digest as _;
        let (sk, vkey) = cosigner("witness.example/w1", 9);
        let k = CosignerKey::parse(&vkey).unwrap();
        let mut h = sha2::Sha256::new();
        h.update(b"witness.example/w1\n\x04");
        h.update(sk.verifying_key().as_bytes());
        let d = h.finalize();
        assert_eq!(k.id, u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
        // A note key (0x01) is refused with the reason.
        let note_vkey = SigningKey::from_seed("w", &[9; 32]).unwrap().verifier_key();
        assert!(CosignerKey::parse(&note_vkey).unwrap_err().contains("0x04"));
        let mut parts: Vec<&str> = vkey.split('+').collect();
        let flipped = if parts[1].starts_with('0') {
            "1".to_owned()
        } else {
            "0".to_owned()
        } + &parts[1][1..];
        parts[1] = &flipped;
        assert!(
            CosignerKey::parse(&parts.join("+"))
                .unwrap_err()
                .contains("does not match")
        );
    }

    #[test]
    fn cosignatures_verify_ignore_unknown_and_reject_bad_ones() {
        let c = cp();
        let (sk, vkey) = cosigner("witness.example/w1", 9);
        let (other, other_vkey) = cosigner("witness.example/w2", 10);
        let key = CosignerKey::parse(&vkey).unwrap();
        let good = cosign_line(&sk, "witness.example/w1", &vkey, 1_700_000_000, &c.text);
        let unknown = cosign_line(
            &other,
            "witness.example/w2",
            &other_vkey,
            1_700_000_000,
            &c.text,
        );
        let body = format!("{unknown}\n{good}\n");
        let (lines, verified) = cosignatures("u", body.as_bytes(), &c, Some(&key)).unwrap();
        assert!(verified);
        assert_eq!(lines, vec![good.clone()]);
        // Unverified mode keeps everything.
        let (lines, verified) = cosignatures("u", body.as_bytes(), &c, None).unwrap();
        assert!(!verified);
        assert_eq!(lines.len(), 2);

        // Signed over another checkpoint, a zero timestamp, or only unknown keys.
        let wrong = cosign_line(
            &sk,
            "witness.example/w1",
            &vkey,
            1_700_000_000,
            "x\n1\nAA==\n",
        );
        let e = cosignatures("u", format!("{wrong}\n").as_bytes(), &c, Some(&key)).unwrap_err();
        assert!(matches!(e, WitnessError::BadCosignature { .. }), "{e}");
        let zero = cosign_line(&sk, "witness.example/w1", &vkey, 0, &c.text);
        let e = cosignatures("u", format!("{zero}\n").as_bytes(), &c, Some(&key)).unwrap_err();
        assert!(e.to_string().contains("zero"), "{e}");
        let e = cosignatures("u", format!("{unknown}\n").as_bytes(), &c, Some(&key)).unwrap_err();
        assert!(matches!(e, WitnessError::NoCosignature { .. }), "{e}");
        for junk in ["", "\n", "hello\n", "— w1 AAAA"] {
            let e = cosignatures("u", junk.as_bytes(), &c, Some(&key)).unwrap_err();
            assert!(
                matches!(e, WitnessError::BadResponse { .. }),
                "{junk:?}: {e}"
            );
        }
    }

    #[test]
    fn request_body_matches_the_spec_layout() {
        let c = cp();
        let b = request_body(3, &[[0; 32], [255; 32]], &c.note);
        let want = format!(
            "old 3\n{}\n{}\n\n{}",
            BASE64.encode([0u8; 32]),
            BASE64.encode([255u8; 32]),
            c.note
        );
        assert_eq!(String::from_utf8(b).unwrap(), want);
        assert!(request_body(0, &[], "n\n").starts_with(b"old 0\n\nn\n"));
    }

    #[test]
    fn urls_parse_to_host_port_and_prefix() {
        let t = Target::parse("http://127.0.0.1:8080/w/").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (false, "127.0.0.1", 8080, "/w")
        );
        let t = Target::parse("https://witness.example").unwrap();
        assert_eq!(
            (t.tls, t.port, t.path.as_str(), t.host_header.as_str()),
            (true, 443, "", "witness.example")
        );
        let t = Target::parse("http://[::1]:9/x").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.host_header.as_str()),
            ("::1", 9, "[::1]:9")
        );
        for bad in [
            "ftp://x",
            "http://",
            "http://h:0",
            "http://h:99999",
            "http://u@h",
            "http://h/a b",
            "http://h/?q",
            "http://[::1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn heads_parse_strictly() {
        let h = parse_head(
            b"HTTP/1.1 409 Conflict\r\nContent-Type: text/x.tlog.size\r\ncontent-length: 3",
        )
        .unwrap();
        assert_eq!(
            (h.status, h.content_length, h.chunked),
            (409, Some(3), false)
        );
        assert_eq!(h.content_type.as_deref(), Some("text/x.tlog.size"));
        assert!(parse_head(b"HTTP/1.1 200").is_ok());
        assert!(parse_head(b"HTTP/2 200 OK").is_err());
        assert!(parse_head(b"HTTP/1.1 20 OK").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip").is_err());
        assert_eq!(parse_size(b"12\n"), Some(12));
        assert_eq!(parse_size(b"12"), Some(12));
        for bad in [
            &b""[..],
            b"\n",
            b"-1\n",
            b"1 2\n",
            b"99999999999999999999\n",
            b"9223372036854775808\n",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn responses_are_framed_and_capped() {
        async fn serve(reply: Vec<u8>) -> Result<Response, WitnessError> {
            let (client, mut server) = tokio::io::duplex(1 << 20);
            let t = tokio::spawn(async move {
                let mut sink = vec![0u8; 4096];
                let _ = server.read(&mut sink).await;
                let _ = server.write_all(&reply).await;
            });
            let r = exchange(client, b"POST / HTTP/1.1\r\n\r\n", "http://w").await;
            t.await.unwrap();
            r
        }
        let r = serve(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef"
                .to_vec(),
        )
        .await
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        let r = serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n".to_vec()).await.unwrap();
        assert_eq!(r.body, b"abcde");
        let r = serve(b"HTTP/1.0 200 OK\r\n\r\nuntil close".to_vec())
            .await
            .unwrap();
        assert_eq!(r.body, b"until close");
        let mut big = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        big.extend(vec![b'a'; MAX_RESPONSE_BODY + 1]);
        assert!(
            serve(big)
                .await
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
        let e = serve(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                MAX_RESPONSE_BODY + 1
            )
            .into_bytes(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("cap"), "{e}");
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..20 {
            chunked.extend(format!("1000\r\n{}\r\n", "a".repeat(4096)).into_bytes());
        }
        assert!(
            serve(chunked)
                .await
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        head.extend(vec![b'x'; MAX_RESPONSE_HEAD + 10]);
        assert!(
            serve(head)
                .await
                .unwrap_err()
                .to_string()
                .contains("headers longer")
        );
        assert!(
            serve(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc".to_vec())
                .await
                .unwrap_err()
                .to_string()
                .contains("3 of 9")
        );
        assert!(
            serve(Vec::new())
                .await
                .unwrap_err()
                .to_string()
                .contains("without a response")
        );
    }
}
