//! The evidence a third party checks, end to end with the built binary, real
//! sockets, real SQLite files and a real MQTT broker: signed checkpoints cut while
//! serving and at shutdown (`/checkpoint`, `checkpoints.log`, the key generated on
//! first start), `prove` bundles checked by `check-proof` and by the README's
//! independent Python verifier, the tamper cases plain `verify` cannot see once the
//! attacker also rebuilds the tree (a cut tail, a re-chained value, an emptied log)
//! caught by `verify --checkpoint` with the first seq that differs, and a retained
//! MQTT checkpoint read back by a late subscriber and held against the log.
//!
//! One gateway log is written once (two runs: the second has an interval of a day,
//! so only the cut at shutdown can cover its records) and shared read-only; the
//! tamper tests work on copies.

#[allow(dead_code)]
mod common;
mod mqtt_support;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hj212_gateway::evidence::checkpoint;
use hj212_gateway::protocol::reply;
use rusqlite::Connection;
use serde_json::Value;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_hj212-gateway");
const PATIENCE: Duration = Duration::from_secs(20);
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Everything but the evidence settings: loopback on free ports, no automatic
/// downlink or alarms (so the log holds exactly the frames and their acks).
const BASE: &str = "[server]\nlisten = [\"127.0.0.1:0\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
                    [store]\nsync = \"off\"\n\
                    [downlink]\ntime_sync = false\ntime_sync_skew = false\nbackfill = false\n\
                    [alarms]\nenabled = false\n";
const CLIENT_ID: &str = "gw-ev";
const KEY_NAME: &str = "hj212-gateway/gw-ev";

/// The segment of upload `n` (2017 real-time data, ack requested); a tamper test
/// rewrites its `a21026-Rtd=12.5`.
fn segment(n: u32) -> String {
    format!(
        "QN={};ST=31;CN=2011;PW=123456;MN={};Flag=5;CP=&&DataTime=20240601085857;\
         a21026-Rtd=12.5,a21026-Flag=N;a21002-Rtd=35.2,a21002-Flag=N&&",
        common::qn(n),
        common::mn(n % 3)
    )
}

/// One `serve` process on a data directory, with its device and metrics addresses.
struct Gateway {
    serve: common::Serve,
    device: SocketAddr,
    metrics: SocketAddr,
    _config: tempfile::NamedTempFile,
}

impl Gateway {
    fn start(data: &Path, extra: &str) -> Gateway {
        let config = tempfile::NamedTempFile::new().expect("config file");
        std::fs::write(config.path(), format!("{BASE}{extra}")).expect("write config");
        let mut serve = common::Serve::run(config.path(), data);
        let line = serve.wait_for("listen=[");
        let rest = &line[line.find("listen=[").unwrap() + 8..];
        let device = rest[..rest.find(']').unwrap()]
            .parse()
            .expect("device addr");
        let line = serve.wait_for("metrics listening");
        let rest = &line[line.find("metrics=").unwrap() + 8..];
        let metrics = rest[..rest.find(' ').unwrap_or(rest.len())]
            .parse()
            .expect("metrics addr");
        Gateway {
            serve,
            device,
            metrics,
            _config: config,
        }
    }

    /// Polls `/checkpoint` until it serves a note of at least `size` records.
    fn wait_checkpoint(&self, size: u64) -> String {
        wait_checkpoint(self.metrics, size)
    }

    /// One upload per `n`, each waited for until acked (so committed).
    fn upload(&self, ns: std::ops::Range<u32>) {
        let mut s = TcpStream::connect(self.device).expect("connect device");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        for n in ns {
            let frame = reply::envelope(segment(n).as_bytes()).to_vec();
            s.write_all(&frame).expect("send");
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while !line.ends_with(b"\r\n") {
                assert_eq!(
                    s.read(&mut b).expect("ack in time"),
                    1,
                    "closed before the ack"
                );
                line.push(b[0]);
            }
            assert_eq!(line, common::expected_ack(&frame), "the ack of upload {n}");
        }
    }

    /// SIGTERM (as systemd stops it), then the exit code and the whole log.
    fn sigterm(mut self) -> (Option<i32>, String) {
        let pid = self.serve.child.id().to_string();
        let st = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(st.success());
        let deadline = Instant::now() + PATIENCE;
        let code = loop {
            if let Some(st) = self.serve.child.try_wait().expect("try_wait") {
                break st.code();
            }
            assert!(Instant::now() < deadline, "serve ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the stderr reader catch the last lines.
        std::thread::sleep(Duration::from_millis(200));
        (code, self.serve.log())
    }
}

/// The tree size line of a checkpoint note.
fn note_size(note: &str) -> u64 {
    note.lines()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no size line in {note:?}"))
}

/// `GET path` on a metrics port: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read the response");
    let text = String::from_utf8(out).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    (head[9..12].parse().expect("status"), body.to_owned())
}

/// Polls `/checkpoint` until it serves a note of at least `size` records.
fn wait_checkpoint(addr: SocketAddr, size: u64) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = get(addr, "/checkpoint");
        if status == 200 && note_size(&body) >= size {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint of {size} records: last answer {status} {body:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The log's chain head seq.
fn head_seq(db: &Path) -> u64 {
    hj212_gateway::store::Reader::open(db)
        .expect("reader")
        .head()
        .expect("head")
        .last_seq
}

/// A log two gateway runs wrote, stopped with SIGTERM; shared by every test.
struct Finished {
    _dir: tempfile::TempDir,
    data: PathBuf,
    db: PathBuf,
    /// The verifier key the first run logged when it generated the key.
    vkey: String,
    /// `/checkpoint` bodies served by the first run, one per round of uploads.
    served: Vec<String>,
    /// `/metrics` of the first run after its last round.
    metrics: String,
    /// Exit codes and logs of both runs.
    runs: Vec<(Option<i32>, String)>,
    /// Uploads sent (each acked, so two records: the frame and the ack).
    uploads: u64,
}

const ROUNDS: u32 = 2;
const PER_ROUND: u32 = 6;
// (6 + 6 + 5) uploads and their acks: 34 records, not a power of two, so the
// right edge of the tree has a lone subtree (the audit path's `fn == sn` case).
const LAST_ROUND: u32 = 5;

fn finished() -> &'static Finished {
    static LOG: OnceLock<Finished> = OnceLock::new();
    LOG.get_or_init(|| {
        // Statics are never dropped: the log stays under target/tmp, named.
        let dir = tempfile::Builder::new()
            .prefix("evidence_log.")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tempdir");
        let data = dir.path().join("state");
        let db = data.join("frames.db");
        let evidence = |interval: &str| {
            format!(
                "[mqtt]\nenabled = false\nclient_id = \"{CLIENT_ID}\"\n\
                 [evidence]\ncheckpoint_interval = \"{interval}\"\n"
            )
        };
        let gw = Gateway::start(&data, &evidence("1s"));
        let (status, body) = get(gw.metrics, "/checkpoint");
        assert_eq!(
            (status, body.as_str()),
            (404, "no checkpoint signed yet\n"),
            "nothing is signed for an empty log"
        );
        let mut served = Vec::new();
        for r in 0..ROUNDS {
            gw.upload(r * PER_ROUND..(r + 1) * PER_ROUND);
            served.push(gw.wait_checkpoint(head_seq(&db)));
        }
        let (_, metrics) = get(gw.metrics, "/metrics");
        let mut runs = vec![gw.sigterm()];
        // A day between cuts: only the cut at shutdown can cover these.
        let gw = Gateway::start(&data, &evidence("1d"));
        let first = ROUNDS * PER_ROUND;
        gw.upload(first..first + LAST_ROUND);
        runs.push(gw.sigterm());
        let line = runs[0]
            .1
            .lines()
            .find(|l| l.contains("generated the checkpoint signing key"))
            .unwrap_or_else(|| panic!("no key generation line:\n{}", runs[0].1))
            .to_owned();
        let vkey = line[line.find("verifier_key=").expect("verifier_key field") + 13..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        Finished {
            _dir: dir,
            data,
            db,
            vkey,
            served,
            metrics,
            runs,
            uploads: u64::from(first + LAST_ROUND),
        }
    })
}

/// The notes of a file of checkpoints (blank line between notes).
fn notes(text: &str) -> Vec<String> {
    hj212_gateway::notary::split_notes(text)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run the binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A tiny deterministic generator: the seed is printed (and taken from
/// `EVIDENCE_SEED` when set) so a failing pick can be replayed.
struct Picks(u64);

impl Picks {
    fn new() -> Picks {
        let seed = std::env::var("EVIDENCE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("EVIDENCE_SEED={seed}");
        Picks(seed)
    }

    /// Uniform enough in `1..=n`.
    fn seq(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        1 + self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

// ---------------------------------------------------------------- 1. serve

#[test]
fn serve_cuts_checkpoints_while_serving_and_at_shutdown_with_a_generated_key() {
    let f = finished();
    for (i, (code, log)) in f.runs.iter().enumerate() {
        assert_eq!(*code, Some(0), "run {i} exits 0 on SIGTERM:\n{log}");
    }
    // The key was generated on first start, 0600, and its verifier key logged;
    // the second run loaded the same key.
    let key = f.data.join("checkpoint.key");
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "{}", key.display());
    assert!(f.vkey.starts_with(&format!("{KEY_NAME}+")), "{}", f.vkey);
    signed_note::StandardVerifier::new(&f.vkey).expect("a verifier key is logged");
    assert!(
        f.runs[1].1.contains("checkpoint signing key loaded")
            && f.runs[1].1.contains(&f.vkey)
            && !f.runs[1].1.contains("generated the checkpoint"),
        "{}",
        f.runs[1].1
    );

    // While serving: every round's records covered at /checkpoint, signed.
    let mut covered = 0;
    for (r, body) in f.served.iter().enumerate() {
        let cp = checkpoint::open(body.as_bytes(), &[&f.vkey]).expect("served note verifies");
        assert_eq!(cp.origin, KEY_NAME);
        let frames = u64::from((r as u32 + 1) * PER_ROUND);
        assert!(
            cp.size >= 2 * frames,
            "round {r}: {} < {}",
            cp.size,
            2 * frames
        );
        assert!(cp.size > covered);
        covered = cp.size;
    }
    let scrape = hj212_gateway::metrics::parse_exposition(&f.metrics).expect("exposition");
    assert_eq!(
        common::sample(&scrape, "hj212_checkpoint_size"),
        covered as f64
    );
    assert_eq!(
        common::sample(&scrape, "hj212_checkpoint_failures_total"),
        0.0
    );
    let age = common::sample(&scrape, "hj212_checkpoint_age_seconds");
    assert!((0.0..5.0).contains(&age), "age {age}");

    // checkpoints.log: every note verifies, sizes grow, and the last one is the
    // cut at shutdown covering every record, including the second run's.
    let text = std::fs::read_to_string(f.data.join("checkpoints.log")).expect("checkpoints.log");
    let all = notes(&text);
    assert!(all.len() >= 3, "{text}");
    let mut last = 0;
    for n in &all {
        let cp = checkpoint::open(n.as_bytes(), &[&f.vkey]).expect("note verifies");
        assert!(cp.size > last, "sizes grow: {text}");
        last = cp.size;
    }
    for body in &f.served {
        assert!(all.contains(body), "what /checkpoint served is in the file");
    }
    let records = common::records(&f.db);
    assert_eq!(
        records.len() as u64,
        2 * f.uploads,
        "every upload and its ack"
    );
    assert_eq!(
        last,
        records.len() as u64,
        "the last note covers every record"
    );
    assert!(
        f.runs[1]
            .1
            .contains(&format!("final checkpoint signed size={last}")),
        "{}",
        f.runs[1].1
    );
    // Its root is the RFC 6962 root of the records, recomputed here from the
    // documented encoding.
    let last_cp = checkpoint::open(all.last().unwrap().as_bytes(), &[&f.vkey]).unwrap();
    assert_eq!(last_cp.root, mth(&leaf_hashes(&f.db)));
    let v = run(&[
        "verify",
        "--db",
        f.db.to_str().unwrap(),
        "--checkpoint",
        f.data.join("checkpoints.log").to_str().unwrap(),
        "--vkey",
        &f.vkey,
    ]);
    assert_eq!(v.status.code(), Some(0), "{}", describe(&v));
}

/// The canonical encoding of a `records` row's 17 hashed columns, written from the
/// store module's documentation (not the crate's code).
fn encode(row: &rusqlite::Row<'_>) -> Vec<u8> {
    use rusqlite::types::ValueRef;
    let mut out = Vec::new();
    for i in 0..17 {
        match row.get_ref(i).unwrap() {
            ValueRef::Null => out.extend_from_slice(&[0xff; 4]),
            ValueRef::Integer(v) => {
                out.extend_from_slice(&[0, 0, 0, 8]);
                out.extend_from_slice(&v.to_be_bytes());
            }
            ValueRef::Text(b) | ValueRef::Blob(b) => {
                out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                out.extend_from_slice(b);
            }
            ValueRef::Real(_) => panic!("no REAL columns"),
        }
    }
    out
}

const COLUMNS: &str = "seq, received_at_ms, peer, session, direction, kind, raw, dialect, st, \
                       cn, mn, qn, data_time, verdict, duplicate, findings, doc";

/// `(seq, leaf)` of every record, in seq order.
fn leaves(conn: &Connection) -> Vec<(u64, Vec<u8>)> {
    let mut st = conn
        .prepare(&format!("SELECT {COLUMNS} FROM records ORDER BY seq"))
        .unwrap();
    st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, encode(r))))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn leaf_hashes(db: &Path) -> Vec<[u8; 32]> {
    leaves(&Connection::open(db).unwrap())
        .iter()
        .map(|(_, l)| leaf_hash(l))
        .collect()
}

fn leaf_hash(leaf: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update([0])
        .chain_update(leaf)
        .finalize()
        .into()
}

/// RFC 6962 section 2.1 `MTH` over leaf hashes, straight from its definition.
fn mth(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves.len() {
        0 => Sha256::digest(b"").into(),
        1 => leaves[0],
        n => {
            let k = 1 << (usize::BITS - 1 - (n - 1).leading_zeros());
            Sha256::new()
                .chain_update([1])
                .chain_update(mth(&leaves[..k]))
                .chain_update(mth(&leaves[k..]))
                .finalize()
                .into()
        }
    }
}

// ---------------------------------------------------------- 2. prove, check-proof

/// `prove --seq N [--size M]` on the shared log: the bundle.
fn prove(seq: u64, size: Option<u64>) -> Value {
    let f = finished();
    let mut args = vec![
        "prove".to_owned(),
        "--seq".into(),
        seq.to_string(),
        "--db".into(),
        f.db.to_str().unwrap().into(),
    ];
    if let Some(s) = size {
        args.extend(["--size".into(), s.to_string()]);
    }
    let o = Command::new(BIN).args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    serde_json::from_slice(&o.stdout).expect("the bundle is JSON")
}

fn write_bundle(dir: &Path, name: &str, bundle: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec_pretty(bundle).unwrap()).unwrap();
    p
}

fn check_proof(bundle: &Path, vkey: &str) -> Output {
    run(&["check-proof", bundle.to_str().unwrap(), "--vkey", vkey])
}

/// Flips one bit of byte `i` of a base64 string's bytes.
fn flip_b64(s: &str, i: usize) -> String {
    let mut b = B64.decode(s).unwrap();
    let i = i % b.len();
    b[i] ^= 0x01;
    B64.encode(b)
}

/// The ways a bundle is altered, each with the reason `check-proof` must give.
fn alterations(b: &Value) -> Vec<(&'static str, Value, &'static str)> {
    let mut out = Vec::new();
    let mut raw = b.clone();
    let s = raw["record"]["raw_b64"].as_str().unwrap().to_owned();
    // A digit of a reading: 12.5 becomes 13.5.
    let at = B64
        .decode(&s)
        .unwrap()
        .windows(4)
        .position(|w| w == b"12.5")
        .expect("the reading is in the raw bytes");
    raw["record"]["raw_b64"] = Value::from(flip_b64(&s, at + 1));
    out.push((
        "one byte of raw_b64",
        raw,
        "the record's `raw_b64` is not what the leaf holds",
    ));
    let mut inc = b.clone();
    let h = inc["inclusion"][0].as_str().unwrap().to_owned();
    inc["inclusion"][0] = Value::from(flip_b64(&h, 7));
    out.push((
        "one inclusion hash",
        inc,
        "the inclusion path does not lead from leaf",
    ));
    let mut leaf = b.clone();
    let l = leaf["leaf"].as_str().unwrap().to_owned();
    leaf["leaf"] = Value::from(flip_b64(&l, 120));
    out.push(("the leaf", leaf, "leaf_hash is not SHA-256(0x00 || leaf)"));
    // The leaf and its hash altered together: only the path to the signed root
    // can tell.
    let mut both = b.clone();
    let mut lb = B64.decode(b["leaf"].as_str().unwrap()).unwrap();
    let at = lb.len() - 3;
    lb[at] ^= 0x01;
    both["leaf"] = Value::from(B64.encode(&lb));
    both["leaf_hash"] = Value::from(B64.encode(leaf_hash(&lb)));
    out.push((
        "the leaf and leaf_hash",
        both,
        "the inclusion path does not lead from leaf",
    ));
    let mut sig = b.clone();
    let note = sig["checkpoint"].as_str().unwrap().to_owned();
    let (text, sigs) = note.split_once("\n\n").unwrap();
    let line = sigs.lines().next().unwrap();
    let (who, s) = line.rsplit_once(' ').unwrap();
    // Byte 10 is inside the Ed25519 signature (the first 4 are the key id).
    sig["checkpoint"] = Value::from(format!("{text}\n\n{who} {}\n", flip_b64(s, 10)));
    out.push((
        "the checkpoint signature",
        sig,
        "the checkpoint's signature does not hold",
    ));
    let mut idx = b.clone();
    idx["leaf_index"] = Value::from(b["leaf_index"].as_u64().unwrap() + 1);
    out.push((
        "leaf_index",
        idx,
        "the inclusion path does not lead from leaf",
    ));
    out
}

#[test]
fn proofs_for_random_seqs_check_and_every_alteration_is_named() {
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    let size = head_seq(&f.db);
    let mut picks = Picks::new();
    for _ in 0..5 {
        let seq = picks.seq(size);
        let b = prove(seq, None);
        assert_eq!(b["schema"], "hj212.proof.v1");
        assert_eq!(b["record"]["seq"], seq);
        assert_eq!(b["leaf_index"], seq - 1);
        assert_eq!(b["tree_size"], size);
        let p = write_bundle(dir.path(), &format!("proof-{seq}.json"), &b);
        let o = check_proof(&p, &f.vkey);
        assert_eq!(o.status.code(), Some(0), "seq {seq}: {}", describe(&o));
        assert!(
            stdout(&o).contains(&format!(
                "record {seq} is in the log {KEY_NAME} signed at size {size}"
            )),
            "{}",
            describe(&o)
        );
    }
    // Against an earlier checkpoint (--size): its own, smaller tree.
    let early = note_size(&f.served[0]);
    let seq = picks.seq(early);
    let b = prove(seq, Some(early));
    assert_eq!(b["tree_size"], early);
    assert_eq!(b["checkpoint"], f.served[0].as_str());
    let p = write_bundle(dir.path(), "early.json", &b);
    let o = check_proof(&p, &f.vkey);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));

    // Alterations of a proof for an inbound frame (its raw bytes hold a reading).
    let seq = (1..=size)
        .map(|_| picks.seq(size))
        .find(|s| s % 2 == 1)
        .unwrap_or(1);
    let good = prove(seq, None);
    assert_eq!(good["record"]["direction"], "in", "odd seqs are the frames");
    for (what, bad, reason) in alterations(&good) {
        let p = write_bundle(dir.path(), "bad.json", &bad);
        let o = check_proof(&p, &f.vkey);
        assert_eq!(o.status.code(), Some(1), "{what}: {}", describe(&o));
        assert!(
            stdout(&o).contains("proof does NOT hold") && stdout(&o).contains(reason),
            "{what}: expected {reason:?}: {}",
            describe(&o)
        );
    }
    // The right proof under another gateway's key.
    let other = other_vkey(dir.path());
    let p = write_bundle(dir.path(), "good.json", &good);
    let o = check_proof(&p, &other);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        stdout(&o).contains("signature does not hold"),
        "{}",
        describe(&o)
    );
}

/// A bundle whose `record` says another reading than its leaf must not hold: an
/// auditor reads `record.values`, not the leaf.
#[test]
fn check_proof_refuses_a_record_whose_reading_is_not_the_leafs() {
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    let mut b = prove(13, None);
    assert_eq!(b["record"]["values"]["a21026"]["Rtd"].to_string(), "12.5");
    b["record"]["values"]["a21026"]["Rtd"] = serde_json::from_str("99.9").unwrap();
    b["record"]["mn"] = Value::from("someone else");
    let p = write_bundle(dir.path(), "reading.json", &b);
    let o = check_proof(&p, &f.vkey);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
}

/// A second key (`keygen`), as another gateway would have: (key file, verifier key).
fn other_key(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("other.key");
    if !key.exists() {
        let o = run(&["keygen", "--name", KEY_NAME, "--out", key.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
        std::fs::write(dir.join("other.vkey"), &o.stdout).unwrap();
    }
    let vkey = std::fs::read_to_string(dir.join("other.vkey")).unwrap();
    (key, vkey.trim().to_owned())
}

fn other_vkey(dir: &Path) -> String {
    other_key(dir).1
}

// ------------------------------------------------------ 3. the README's verifier

/// The Python verifier exactly as README.md shows it.
fn readme_verifier() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let begin = "<!-- verifier.py begin -->";
    let end = "<!-- verifier.py end -->";
    let start = readme
        .find(begin)
        .expect("README has the verifier begin marker")
        + begin.len();
    let stop = readme[start..].find(end).expect("end marker") + start;
    let block = readme[start..stop].trim();
    block
        .strip_prefix("```python\n")
        .and_then(|b| b.strip_suffix("```"))
        .expect("a ```python block between the markers")
        .to_owned()
}

/// python3 with the `cryptography` package, or a skip (a failure under CI, whose
/// `.ci/run` installs it).
fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with `cryptography` is needed; .ci/run installs it"
        );
        eprintln!("SKIPPED: python3 with `cryptography` not available (pip install cryptography)");
    }
    ok
}

#[test]
fn the_readme_python_verifier_accepts_proofs_and_rejects_alterations() {
    let script = readme_verifier();
    assert!(
        // 90 until frames were kept without their document; checking their
        // readings against the raw CP added 30.
        script.lines().count() <= 125,
        "the verifier stays short enough to audit: {} lines",
        script.lines().count()
    );
    if !python_ready() {
        return;
    }
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    let py = dir.path().join("verify_proof.py");
    std::fs::write(&py, &script).unwrap();
    let python = |bundle: &Path, vkey: &str| {
        Command::new("python3")
            .arg(&py)
            .arg(bundle)
            .arg(vkey)
            .output()
            .expect("run python3")
    };
    let size = head_seq(&f.db);
    let mut picks = Picks::new();
    let mut seqs: Vec<u64> = (0..6).map(|_| picks.seq(size)).collect();
    // Both ends of the tree: the first leaf, and the last two (a subtree of two
    // leaves on the right edge, hashed in after the complete 32-leaf subtree).
    seqs.extend([1, size - 1, size]);
    for seq in seqs {
        let b = prove(seq, None);
        let p = write_bundle(dir.path(), &format!("proof-{seq}.json"), &b);
        let o = python(&p, &f.vkey);
        assert_eq!(o.status.code(), Some(0), "seq {seq}: {}", describe(&o));
        assert!(
            stdout(&o).contains(&format!(
                "record {seq} is in the log {KEY_NAME} signed at size {size}"
            )),
            "{}",
            describe(&o)
        );
    }
    let early = note_size(&f.served[0]);
    let p = write_bundle(dir.path(), "early.json", &prove(early, Some(early)));
    let o = python(&p, &f.vkey);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));

    let seq = 2 * picks.seq(size / 2) - 1;
    let good = prove(seq, None);
    let mut bad: Vec<(&str, Value)> = alterations(&good)
        .into_iter()
        .map(|(what, b, _)| (what, b))
        .collect();
    // A decoded reading changed in the record, raw bytes left alone: the record
    // must be the leaf's as a whole, not only its raw bytes.
    let mut reading = good.clone();
    let doc = reading["record"].as_object_mut().unwrap();
    let cp = serde_json::to_string(&doc).unwrap();
    assert!(cp.contains("12.5"), "the reading is in the record: {cp}");
    reading["record"] = serde_json::from_str(&cp.replacen("12.5", "1.25", 1)).unwrap();
    bad.push(("a decoded reading", reading));
    let mut when = good.clone();
    when["record"]["received_at"] = Value::from("2024-06-01T00:00:00.000Z");
    bad.push(("received_at", when));
    for (what, b) in bad {
        let p = write_bundle(dir.path(), "bad.json", &b);
        let o = python(&p, &f.vkey);
        assert_ne!(
            o.status.code(),
            Some(0),
            "{what} must not verify: {}",
            describe(&o)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("proof does NOT hold"),
            "{what}: a reason, not a crash: {}",
            describe(&o)
        );
    }
    let p = write_bundle(dir.path(), "good.json", &good);
    let o = python(&p, &other_vkey(dir.path()));
    assert_ne!(o.status.code(), Some(0), "another key: {}", describe(&o));

    // Base64 has '+' in its alphabet, and the verifier key separates its parts
    // with '+': about half of all keys hold one. The same tree head signed by a
    // key (fixed seed) whose verifier key does.
    let key = (0u8..)
        .map(|i| hj212_gateway::evidence::key::SigningKey::from_seed(KEY_NAME, &[i; 32]).unwrap())
        .find(|k| k.verifier_key().matches('+').count() > 2)
        .unwrap();
    let cp = checkpoint::open(good["checkpoint"].as_str().unwrap().as_bytes(), &[&f.vkey]).unwrap();
    let mut resigned = good.clone();
    resigned["checkpoint"] = Value::from(
        checkpoint::sign(key.signer(), &cp.origin, cp.size, &cp.root)
            .unwrap()
            .note,
    );
    let p = write_bundle(dir.path(), "plus.json", &resigned);
    let o = python(&p, &key.verifier_key());
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}: {}",
        key.verifier_key(),
        describe(&o)
    );
}

// -------------------------------------------------- 4. tampering after publication

/// A copy of the shared log (and of the checkpoints published from it) to tamper
/// with.
struct Copy {
    dir: tempfile::TempDir,
    db: PathBuf,
    /// `checkpoints.log` as published before the tampering.
    published: PathBuf,
}

fn copy() -> Copy {
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&f.data).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name.to_string_lossy().starts_with("frames.db") {
            std::fs::copy(e.path(), dir.path().join(&name)).unwrap();
        }
    }
    let published = dir.path().join("published.log");
    std::fs::copy(f.data.join("checkpoints.log"), &published).unwrap();
    Copy {
        db: dir.path().join("frames.db"),
        published,
        dir,
    }
}

/// The attacker: the append-only triggers dropped (anyone who can write the file
/// can).
fn attacker(db: &Path) -> Connection {
    let c = Connection::open(db).unwrap();
    c.execute_batch(
        "DROP TRIGGER records_append_only_update; DROP TRIGGER records_append_only_delete;
         DROP TRIGGER meta_head_forward_only; DROP TRIGGER tree_hashes_append_only_delete;",
    )
    .unwrap();
    c
}

/// Recomputes every record's chain hash from `from` on and moves the head to the
/// last record, as the store module documents the chain.
fn rechain(c: &Connection, from: u64) {
    let mut prev = [0u8; 32];
    for (seq, leaf) in leaves(c) {
        if seq < from {
            prev = c
                .query_row(
                    "SELECT hash FROM records WHERE seq = ?1",
                    [seq as i64],
                    |r| r.get::<_, Vec<u8>>(0),
                )
                .unwrap()
                .try_into()
                .unwrap();
            continue;
        }
        let h: [u8; 32] = Sha256::new()
            .chain_update(prev)
            .chain_update(&leaf)
            .finalize()
            .into();
        c.execute(
            "UPDATE records SET hash = ?1 WHERE seq = ?2",
            (&h[..], seq as i64),
        )
        .unwrap();
        prev = h;
    }
    let last: i64 = c
        .query_row("SELECT coalesce(max(seq), 0) FROM records", [], |r| {
            r.get(0)
        })
        .unwrap();
    c.execute(
        "UPDATE meta SET last_seq = ?1, last_hash = ?2",
        (last, &prev[..]),
    )
    .unwrap();
}

/// The thorough attacker also throws the stored tree away and builds it again over
/// the altered records, so the file agrees with itself everywhere.
fn rebuild_tree(c: &Connection) {
    c.execute("DELETE FROM tree_hashes", []).unwrap();
    let mut f = hj212_gateway::store::merkle::Frontier::default();
    for (_, leaf) in leaves(c) {
        f.push(leaf_hash(&leaf), |id, h| {
            c.execute(
                "INSERT INTO tree_hashes (id, hashes) VALUES (?1, ?2)",
                (id as i64, &h[..]),
            )
            .unwrap();
        });
    }
}

fn verify(db: &Path, checkpoint: Option<&Path>, vkey: &str) -> Output {
    let mut args = vec!["verify", "--db", db.to_str().unwrap()];
    if let Some(c) = checkpoint {
        args.extend(["--checkpoint", c.to_str().unwrap(), "--vkey", vkey]);
    }
    run(&args)
}

/// Plain `verify` passes (only the published checkpoints can show the change).
fn plain_verify_passes(db: &Path, what: &str) {
    let o = verify(db, None, "");
    assert_eq!(o.status.code(), Some(0), "{what}: {}", describe(&o));
    assert!(stdout(&o).ends_with("intact\n"), "{what}: {}", describe(&o));
}

/// `verify --checkpoint` fails, exit 1, and says `expect`.
fn checkpoint_verify_fails(c: &Copy, expect: &str, what: &str) {
    let f = finished();
    let o = verify(&c.db, Some(&c.published), &f.vkey);
    assert_eq!(o.status.code(), Some(1), "{what}: {}", describe(&o));
    assert!(
        stdout(&o).contains(expect),
        "{what}: expected {expect:?}: {}",
        describe(&o)
    );
    assert!(
        stdout(&o).contains("TAMPERED OR INCONSISTENT"),
        "{what}: {}",
        describe(&o)
    );
}

/// The sizes of the published checkpoints.
fn published_sizes(c: &Copy) -> Vec<u64> {
    notes(&std::fs::read_to_string(&c.published).unwrap())
        .iter()
        .map(|n| note_size(n))
        .collect()
}

#[test]
fn untampered_log_is_consistent_and_a_foreign_checkpoint_is_refused() {
    let f = finished();
    let c = copy();
    let o = verify(&c.db, Some(&c.published), &f.vkey);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let sizes = published_sizes(&c);
    for s in &sizes {
        assert!(
            stdout(&o).contains(&format!(
                "checkpoint of size {s} (signature valid): the log is consistent with it"
            )),
            "{}",
            describe(&o)
        );
    }
    // The note served at /checkpoint, kept on its own, works as well.
    let served = c.dir.path().join("served.note");
    std::fs::write(&served, &f.served[0]).unwrap();
    let o = verify(&c.db, Some(&served), &f.vkey);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));

    // The same tree head signed by another key: refused under this gateway's key
    // (exit 2: the input is not what it claims), accepted under its own.
    let (key, other) = other_key(c.dir.path());
    let last = checkpoint::open(f.served[1].as_bytes(), &[&f.vkey]).unwrap();
    let k = hj212_gateway::evidence::key::SigningKey::load(&key).unwrap();
    let forged = checkpoint::sign(k.signer(), KEY_NAME, last.size, &last.root).unwrap();
    let file = c.dir.path().join("forged.note");
    std::fs::write(&file, &forged.note).unwrap();
    let o = verify(&c.db, Some(&file), &f.vkey);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    let o = verify(&c.db, Some(&file), &other);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
}

#[test]
fn a_cut_tail_with_the_head_moved_back_is_caught_by_a_published_checkpoint() {
    let n = head_seq(&finished().db);
    let k = n - 5;
    for rebuild in [false, true] {
        let c = copy();
        let conn = attacker(&c.db);
        conn.execute("DELETE FROM records WHERE seq > ?1", [k as i64])
            .unwrap();
        conn.execute(
            "UPDATE meta SET last_seq = ?1, last_hash = (SELECT hash FROM records WHERE seq = ?1)",
            [k as i64],
        )
        .unwrap();
        if rebuild {
            rebuild_tree(&conn);
            drop(conn);
            plain_verify_passes(&c.db, "cut tail, tree rebuilt");
        } else {
            drop(conn);
        }
        assert_eq!(head_seq(&c.db), k);
        checkpoint_verify_fails(
            &c,
            &format!("first seq that differs is {}", k + 1),
            &format!("cut tail (tree rebuilt: {rebuild})"),
        );
    }
}

#[test]
fn a_value_changed_and_rechained_is_caught_by_a_published_checkpoint() {
    let f = finished();
    let n = head_seq(&f.db);
    // An inbound frame after the first published checkpoint, so earlier
    // checkpoints stay consistent and later ones do not.
    let first = note_size(&f.served[0]);
    let j = (first + 3) | 1;
    assert!(j < n);
    for rebuild in [false, true] {
        let c = copy();
        let conn = attacker(&c.db);
        let (raw, doc): (Vec<u8>, String) = conn
            .query_row(
                "SELECT raw, doc FROM records WHERE seq = ?1 AND direction = 'in'",
                [j as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        // A new reading with a correct CRC, and the decoded document to match: the
        // CRC re-check of plain verify finds nothing wrong either.
        let seg = std::str::from_utf8(&raw[6..raw.len() - 6]).unwrap();
        assert!(seg.contains("a21026-Rtd=12.5"), "{seg}");
        let forged = reply::envelope(seg.replace("a21026-Rtd=12.5", "a21026-Rtd=1.25").as_bytes());
        // The log keeps an accepted frame without its document: the raw bytes
        // are the whole reading.
        assert!(doc.is_empty(), "{doc}");
        conn.execute(
            "UPDATE records SET raw = ?1 WHERE seq = ?2",
            (&forged[..], j as i64),
        )
        .unwrap();
        rechain(&conn, j);
        let what = format!("re-chained value (tree rebuilt: {rebuild})");
        if rebuild {
            rebuild_tree(&conn);
            drop(conn);
            plain_verify_passes(&c.db, &what);
            // The file's own tree was rebuilt too: a range, from the largest
            // checkpoint still consistent up to the checkpoint that is not.
            let good = published_sizes(&c)
                .into_iter()
                .filter(|&s| s < j)
                .max()
                .unwrap_or(0);
            checkpoint_verify_fails(
                &c,
                &format!(
                    "a record in seq {}..={n} differs (the file's own tree was rebuilt as well",
                    good + 1
                ),
                &what,
            );
        } else {
            drop(conn);
            checkpoint_verify_fails(&c, &format!("first seq that differs is {j} "), &what);
        }
        assert_eq!(head_seq(&c.db), n, "the head is where it was");
    }
}

#[test]
fn an_emptied_log_with_the_head_reset_is_caught_by_a_published_checkpoint() {
    for rebuild in [false, true] {
        let c = copy();
        let conn = attacker(&c.db);
        conn.execute_batch(
            "DELETE FROM records; UPDATE meta SET last_seq = 0, last_hash = zeroblob(32);",
        )
        .unwrap();
        if rebuild {
            rebuild_tree(&conn);
            drop(conn);
            plain_verify_passes(&c.db, "emptied, tree rebuilt");
        } else {
            drop(conn);
        }
        checkpoint_verify_fails(
            &c,
            "first seq that differs is 1",
            &format!("emptied (tree rebuilt: {rebuild})"),
        );
    }
}

// ------------------------------------------------------------ 5. retained on MQTT

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_reads_the_retained_checkpoint_and_it_verifies() {
    let port = mqtt_support::rumqttd();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let extra = format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"{CLIENT_ID}\"\nreconnect_max = \"500ms\"\n\
         [evidence]\ncheckpoint_interval = \"1s\"\n"
    );
    let d = data.clone();
    let gw = tokio::task::spawn_blocking(move || {
        let gw = Gateway::start(&d, &extra);
        gw.upload(0..8);
        gw
    })
    .await
    .unwrap();
    let db = data.join("frames.db");
    let head = head_seq(&db);
    let metrics = gw.metrics;
    let served = tokio::task::spawn_blocking(move || wait_checkpoint(metrics, head))
        .await
        .unwrap();
    assert_eq!(note_size(&served), head);

    // A subscriber that connects after the checkpoint was cut; the broker hands it
    // the retained message. Until the publisher (once a second) has delivered it,
    // a new subscriber sees nothing retained yet, so connect again.
    let topic = format!("hj212/_gateway/{CLIENT_ID}/checkpoint");
    let deadline = Instant::now() + PATIENCE;
    let payload = loop {
        let sub = mqtt_support::Subscriber::start(port, &topic, false).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = sub.all();
        if let Some(m) = got
            .iter()
            .find(|m| m.retain && m.payload == served.as_bytes())
        {
            assert_eq!(m.topic, topic);
            break m.payload.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no retained checkpoint of size {head} on {topic}: {got:?}\n{}",
            gw.serve.log()
        );
    };
    let (code, log) = tokio::task::spawn_blocking(move || gw.sigterm())
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("generated the checkpoint signing key"))
        .expect("key generated");
    let vkey = line[line.find("verifier_key=").unwrap() + 13..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let file = dir.path().join("from-mqtt.note");
    std::fs::write(&file, &payload).unwrap();
    let o = verify(&db, Some(&file), &vkey);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(
        stdout(&o).contains(&format!(
            "checkpoint of size {head} (signature valid): the log is consistent with it"
        )),
        "{}",
        describe(&o)
    );
}

// ---------------------------------------------------------- deploy/gateway.toml

/// The shipped config, `[evidence]` included, passes `check-config`, and its
/// `[evidence]` values are the defaults it claims.
#[test]
fn the_shipped_config_documents_the_evidence_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gateway.toml");
    let o = run(&["check-config", path]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains("\n[evidence]\n"), "an [evidence] section");
    let shipped = hj212_gateway::config::Config::parse(&text, Path::new(path)).unwrap();
    let defaults = hj212_gateway::config::Config::parse("", Path::new("empty")).unwrap();
    assert_eq!(shipped.evidence, defaults.evidence);
}
