//! The evidence primitives from outside: `keygen` run as an operator would, and
//! the witness client against a real witness on a real socket.
//!
//! The witness here is written from the C2SP `tlog-witness` and
//! `tlog-cosignature` specs with the stock crates only (`signed_note`,
//! `tlog_tiles`, `ed25519-dalek`), not with the gateway's code: it parses the
//! add-checkpoint request, verifies the log's signature and the consistency
//! proof against the last tree it cosigned, answers 409 with its size when the
//! old size is wrong, and cosigns with its own Ed25519 key.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::Signer as _;
use hj212_gateway::evidence::checkpoint::{self, Checkpoint};
use hj212_gateway::evidence::key::SigningKey;
use hj212_gateway::evidence::witness::{WitnessClient, WitnessEntry, WitnessError};
use signed_note::{Note, StandardVerifier, VerifierList};
use tlog_tiles::{Hash, HashReader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const BIN: &str = env!("CARGO_BIN_EXE_hj212-gateway");

#[test]
fn keygen_writes_a_0600_key_prints_its_verifier_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let out = Command::new(BIN)
        .args(["keygen", "--name", "hj212-gateway/gw-01", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "only the verifier key: {stdout:?}"
    );
    let vkey = stdout.trim_end();
    assert!(vkey.starts_with("hj212-gateway/gw-01+"), "{vkey}");
    StandardVerifier::new(vkey).expect("stdout is a verifier key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("checkpoint.key"));

    let path = data.join("checkpoint.key");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();

    // The key signs checkpoints that the printed verifier key accepts.
    let key = SigningKey::load(&path).unwrap();
    let c = checkpoint::sign(
        key.signer(),
        key.name(),
        1,
        &tlog_tiles::record_hash(b"x").0,
    )
    .unwrap();
    let n = Note::from_bytes(c.note.as_bytes()).unwrap();
    let v = StandardVerifier::new(vkey).unwrap();
    n.verify(&VerifierList::new(vec![Box::new(v)]))
        .expect("verifies with the printed key");

    // A second run refuses, exit 2, names the file, changes nothing.
    let again = Command::new(BIN)
        .args(["keygen", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(again.stdout.is_empty());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains(&path.display().to_string()) && err.contains("refusing"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

    // --out and the default name.
    let other = dir.path().join("keys/other.key");
    let out = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("hj212-gateway")
    );
    assert_eq!(
        std::fs::metadata(&other).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// The log's side: an RFC 6962 tree kept as tlog "stored hashes" in a Vec.
#[derive(Default)]
struct MemTree {
    hashes: Vec<Hash>,
    size: u64,
}

impl HashReader for MemTree {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&i| {
                self.hashes
                    .get(i as usize)
                    .copied()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}

impl MemTree {
    fn append(&mut self, leaf: &[u8]) {
        let new = tlog_tiles::stored_hashes(self.size, leaf, self).unwrap();
        self.hashes.extend(new);
        self.size += 1;
    }

    fn with_leaves(prefix: &str, n: u64) -> MemTree {
        let mut t = MemTree::default();
        for i in 0..n {
            t.append(format!("{prefix} record {i}").as_bytes());
        }
        t
    }

    fn root(&self, n: u64) -> [u8; 32] {
        tlog_tiles::tree_hash(n, self).unwrap().0
    }

    fn prove(&self, t: u64, n: u64) -> Vec<[u8; 32]> {
        tlog_tiles::prove_tree(t, n, self)
            .unwrap()
            .into_iter()
            .map(|h| h.0)
            .collect()
    }

    fn checkpoint(&self, key: &SigningKey, n: u64) -> Checkpoint {
        checkpoint::sign(key.signer(), key.name(), n, &self.root(n)).unwrap()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Honest,
    /// Signs one timestamp but sends another: the cosignature cannot verify.
    BadCosignature,
}

struct WitnessState {
    size: u64,
    root: [u8; 32],
    olds: Vec<u64>,
}

/// A C2SP tlog-witness for one log.
struct FakeWitness {
    url: String,
    vkey: String,
    state: Arc<Mutex<WitnessState>>,
}

impl FakeWitness {
    async fn start(
        log_vkey: &str,
        behaviour: Behaviour,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> FakeWitness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name = "witness.test/w1";
        let sk = ed25519_dalek::SigningKey::from_bytes(&[77u8; 32]);
        let mut material = vec![0x04];
        material.extend_from_slice(sk.verifying_key().as_bytes());
        let id = key_id(name, &material);
        let vkey = format!("{name}+{id:08x}+{}", BASE64.encode(&material));
        let state = Arc::new(Mutex::new(WitnessState {
            size: 0,
            root: tlog_tiles::EMPTY_HASH.0,
            olds: Vec::new(),
        }));
        let log = StandardVerifier::new(log_vkey).unwrap();
        let st = state.clone();
        let scheme = if tls.is_some() {
            "https://localhost"
        } else {
            "http://127.0.0.1"
        };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (st, log, sk, tls) = (st.clone(), log.clone(), sk.clone(), tls.clone());
                tokio::spawn(async move {
                    let w = Cosigner {
                        name,
                        id,
                        sk,
                        log,
                        behaviour,
                    };
                    match tls {
                        Some(cfg) => {
                            let s = tokio_rustls::TlsAcceptor::from(cfg)
                                .accept(tcp)
                                .await
                                .unwrap();
                            serve_one(s, &w, &st).await;
                        }
                        None => serve_one(tcp, &w, &st).await,
                    }
                });
            }
        });

        FakeWitness {
            url: format!("{scheme}:{}/w1/", addr.port()),
            vkey,
            state,
        }
    }

    fn entry(&self, vkey: Option<&str>) -> WitnessEntry {
        WitnessEntry {
            url: self.url.clone(),
            vkey: vkey.map(str::to_owned),
            timeout: Duration::from_secs(5),
        }
    }

    fn size(&self) -> u64 {
        self.state.lock().unwrap().size
    }

    fn olds(&self) -> Vec<u64> {
        self.state.lock().unwrap().olds.clone()
    }
}

fn key_id(name: &str, material: &[u8]) -> u32 {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update(material);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

struct Cosigner {
    name: &'static str,
    id: u32,
    sk: ed25519_dalek::SigningKey,
    log: StandardVerifier,
    behaviour: Behaviour,
}

/// Reads one request, answers it, closes.
async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    w: &Cosigner,
    st: &Mutex<WitnessState>,
) {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "client closed early");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|x| x == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    assert!(
        head.starts_with("POST /w1/add-checkpoint HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("Connection: close\r\n"));
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    let (status, ctype, body) = answer(&buf[head_end..head_end + len], w, st);
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await.unwrap();
    s.shutdown().await.ok();
}

/// The add-checkpoint rules of C2SP tlog-witness, in its order.
fn answer(
    body: &[u8],
    w: &Cosigner,
    st: &Mutex<WitnessState>,
) -> (&'static str, &'static str, String) {
    let text = std::str::from_utf8(body).unwrap();
    let (old_line, rest) = text.split_once('\n').unwrap();
    let old: u64 = old_line.strip_prefix("old ").unwrap().parse().unwrap();
    // "an old size line, zero or more consistency proof lines, and an empty
    // line, followed by a checkpoint"
    let (proof, note): (Vec<Hash>, &str) = match rest.strip_prefix('\n') {
        Some(note) => (Vec::new(), note),
        None => {
            let (p, n) = rest.split_once("\n\n").unwrap();
            (
                p.split('\n')
                    .map(|l| Hash::parse_hash(l).unwrap())
                    .collect(),
                n,
            )
        }
    };
    let Ok(n) = Note::from_bytes(note.as_bytes()) else {
        return ("400 Bad Request", "text/plain", "bad note\n".into());
    };
    if n.verify(&VerifierList::new(vec![Box::new(w.log.clone())]))
        .is_err()
    {
        return (
            "403 Forbidden",
            "text/plain",
            "not signed by the log\n".into(),
        );
    }
    let cp = tlog_tiles::Checkpoint::from_bytes(n.text()).unwrap();
    let mut s = st.lock().unwrap();
    s.olds.push(old);
    if old > cp.size() {
        return ("400 Bad Request", "text/plain", "old > size\n".into());
    }
    if old != s.size {
        return ("409 Conflict", "text/x.tlog.size", format!("{}\n", s.size));
    }
    if old == 0 {
        if !proof.is_empty() {
            return (
                "422 Unprocessable Entity",
                "text/plain",
                "proof from 0\n".into(),
            );
        }
    } else if old == cp.size() {
        if cp.hash().0 != s.root {
            return (
                "422 Unprocessable Entity",
                "text/plain",
                "same size, other root\n".into(),
            );
        }
    } else if tlog_tiles::check_tree(&proof, cp.size(), *cp.hash(), old, Hash(s.root)).is_err() {
        return (
            "422 Unprocessable Entity",
            "text/plain",
            "inconsistent\n".into(),
        );
    }
    s.size = cp.size();
    s.root = cp.hash().0;
    let t: u64 = 1_700_000_000 + s.olds.len() as u64;
    let mut msg = format!("cosignature/v1\ntime {t}\n").into_bytes();
    msg.extend_from_slice(n.text());
    let sig = w.sk.sign(&msg);
    let sent_t = if w.behaviour == Behaviour::BadCosignature {
        t + 1
    } else {
        t
    };
    let mut raw = w.id.to_be_bytes().to_vec();
    raw.extend_from_slice(&sent_t.to_be_bytes());
    raw.extend_from_slice(&sig.to_bytes());
    (
        "200 OK",
        "text/plain",
        format!("— {} {}\n", w.name, BASE64.encode(raw)),
    )
}

fn log_key() -> SigningKey {
    SigningKey::from_seed("hj212-gateway/evidence-test", &[5u8; 32]).unwrap()
}

#[tokio::test]
async fn witness_cosigns_retries_after_409_and_the_cosignature_verifies() {
    let key = log_key();
    let witness = FakeWitness::start(&key.verifier_key(), Behaviour::Honest, None).await;
    let client = WitnessClient::new();
    let entry = witness.entry(Some(&witness.vkey));

    // First checkpoint: the witness knows nothing (old 0, no proof).
    let tree = MemTree::with_leaves("a", 25);
    let cp10 = tree.checkpoint(&key, 10);
    let calls = Mutex::new(Vec::new());
    let prove = |to: u64| {
        move |n: u64| -> Result<Vec<[u8; 32]>, String> {
            Ok(MemTree::with_leaves("a", to).prove(to, n))
        }
    };
    let c = client
        .add_checkpoint(&entry, &cp10, 0, prove(10))
        .await
        .unwrap();
    assert!(c.verified && c.old == 0 && c.lines.len() == 1, "{c:?}");
    assert_eq!(c.witness, witness.url);
    assert_eq!(witness.size(), 10);

    // The log grew; the caller lost track of the witness (says 0): 409 "10",
    // the client proves 10 -> 25 and tries again.
    let cp25 = tree.checkpoint(&key, 25);
    let c = client
        .add_checkpoint(&entry, &cp25, 0, |n| {
            calls.lock().unwrap().push(n);
            prove(25)(n)
        })
        .await
        .unwrap();
    assert_eq!(*calls.lock().unwrap(), vec![10]);
    assert!(c.verified && c.old == 10, "{c:?}");
    assert_eq!(witness.olds(), vec![0, 0, 10]);
    assert_eq!(witness.size(), 25);

    // The cosigned checkpoint is still a valid checkpoint note for the log key,
    // now with two signatures.
    let mut cosigned = cp25.note.clone();
    for l in &c.lines {
        cosigned.push_str(l);
        cosigned.push('\n');
    }
    let opened = checkpoint::open(cosigned.as_bytes(), &[&key.verifier_key()]).unwrap();
    assert_eq!(
        (opened.size, opened.signers.len(), opened.verified_by.len()),
        (25, 2, 1)
    );

    // The same checkpoint again (a lost response): old = size, no proof needed.
    let c = client
        .add_checkpoint(&entry, &cp25, 25, |_| -> Result<Vec<[u8; 32]>, String> {
            panic!("no proof needed")
        })
        .await
        .unwrap();
    assert!(c.verified);

    // Without a configured key the lines are kept, marked unverified.
    let cp25b = tree.checkpoint(&key, 25);
    let c = client
        .add_checkpoint(&witness.entry(None), &cp25b, 25, prove(25))
        .await
        .unwrap();
    assert!(!c.verified && c.lines.len() == 1);
}

#[tokio::test]
async fn a_forked_or_cut_log_gets_no_cosignature() {
    let key = log_key();
    let witness = FakeWitness::start(&key.verifier_key(), Behaviour::Honest, None).await;
    let client = WitnessClient::new();
    let entry = witness.entry(Some(&witness.vkey));
    let honest = MemTree::with_leaves("a", 20);
    client
        .add_checkpoint(
            &entry,
            &honest.checkpoint(&key, 20),
            0,
            |_| -> Result<Vec<[u8; 32]>, String> { unreachable!() },
        )
        .await
        .unwrap();

    // A re-chained log (different records, same key) proves from 20 to 30 with
    // its own tree: the proof does not match the root the witness holds.
    let forged = MemTree::with_leaves("b", 30);
    let e = client
        .add_checkpoint(
            &entry,
            &forged.checkpoint(&key, 30),
            20,
            |n| -> Result<_, String> { Ok(forged.prove(30, n)) },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, WitnessError::Status { status: 422, .. }), "{e}");
    assert!(e.to_string().contains(&witness.url), "{e}");
    assert_eq!(witness.size(), 20);

    // A log cut back to 15 records: the witness answers 409 "20", which is more
    // than the checkpoint holds.
    let cut = honest.checkpoint(&key, 15);
    let e = client
        .add_checkpoint(&entry, &cut, 0, |_| -> Result<Vec<[u8; 32]>, String> {
            panic!("no retry")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            WitnessError::Rollback {
                witness_size: 20,
                size: 15,
                ..
            }
        ),
        "{e}"
    );

    // A checkpoint signed by another key: 403, reported with the status.
    let stranger = SigningKey::from_seed("hj212-gateway/evidence-test", &[6u8; 32]).unwrap();
    let e = client
        .add_checkpoint(
            &entry,
            &honest.checkpoint(&stranger, 20),
            20,
            |_| -> Result<Vec<[u8; 32]>, String> { unreachable!() },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, WitnessError::Status { status: 403, .. }), "{e}");

    // A failing proof source is reported with the size it was asked for.
    let e = client
        .add_checkpoint(
            &entry,
            &honest.checkpoint(&key, 20),
            10,
            |_| -> Result<Vec<[u8; 32]>, String> { Err("store closed".into()) },
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("size 10") && e.to_string().contains("store closed"),
        "{e}"
    );
}

#[tokio::test]
async fn a_bad_cosignature_or_a_cosignature_from_another_key_is_reported() {
    let key = log_key();
    let witness = FakeWitness::start(&key.verifier_key(), Behaviour::BadCosignature, None).await;
    let client = WitnessClient::new();
    let tree = MemTree::with_leaves("a", 4);
    let e = client
        .add_checkpoint(
            &witness.entry(Some(&witness.vkey)),
            &tree.checkpoint(&key, 4),
            0,
            |_| -> Result<Vec<[u8; 32]>, String> { unreachable!() },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, WitnessError::BadCosignature { .. }), "{e}");
    assert!(e.to_string().contains("witness.test/w1+"), "{e}");

    // Configured with some other witness's key: the line is ignored, and no
    // cosignature from the configured key is an error.
    let other = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]);
    let mut material = vec![0x04];
    material.extend_from_slice(other.verifying_key().as_bytes());
    let other_vkey = format!(
        "witness.test/w9+{:08x}+{}",
        key_id("witness.test/w9", &material),
        BASE64.encode(&material)
    );
    let honest = FakeWitness::start(&key.verifier_key(), Behaviour::Honest, None).await;
    let e = client
        .add_checkpoint(
            &honest.entry(Some(&other_vkey)),
            &tree.checkpoint(&key, 4),
            0,
            |_| -> Result<Vec<[u8; 32]>, String> { unreachable!() },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, WitnessError::NoCosignature { .. }), "{e}");
}

#[tokio::test]
async fn a_silent_witness_times_out_and_a_closed_port_is_an_io_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(s);
    });
    let key = log_key();
    let cp = MemTree::with_leaves("a", 1).checkpoint(&key, 1);
    let entry = WitnessEntry {
        url: format!("http://127.0.0.1:{port}"),
        vkey: None,
        timeout: Duration::from_millis(300),
    };
    let t0 = std::time::Instant::now();
    let e = WitnessClient::new()
        .add_checkpoint(&entry, &cp, 0, |_| -> Result<Vec<[u8; 32]>, String> {
            unreachable!()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, WitnessError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    hold.abort();

    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let entry = WitnessEntry {
        url: format!("http://127.0.0.1:{port}"),
        ..entry
    };
    let e = WitnessClient::new()
        .add_checkpoint(&entry, &cp, 0, |_| -> Result<Vec<[u8; 32]>, String> {
            unreachable!()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, WitnessError::Io { op: "connect", .. }), "{e}");
}

#[tokio::test]
async fn an_https_witness_is_reached_through_a_given_ca() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let der = cert.cert.der().clone();
    let key_der =
        rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key_der)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let key = log_key();
    let witness = FakeWitness::start(
        &key.verifier_key(),
        Behaviour::Honest,
        Some(Arc::new(server)),
    )
    .await;
    assert!(witness.url.starts_with("https://localhost:"));
    let cp = MemTree::with_leaves("a", 3).checkpoint(&key, 3);
    let client = WitnessClient::with_tls_config(Arc::new(client_cfg));
    let c = client
        .add_checkpoint(
            &witness.entry(Some(&witness.vkey)),
            &cp,
            0,
            |_| -> Result<Vec<[u8; 32]>, String> { unreachable!() },
        )
        .await
        .unwrap();
    assert!(c.verified);
    assert_eq!(witness.size(), 3);
}
