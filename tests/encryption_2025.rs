//! HJ 212-2025 encryption as real devices and simulators do it, end to end: a
//! gateway in the test process on real TCP sockets, frames built with the
//! protocol crate's builder and SM4 functions, the real SQLite frame log.
//!
//! Covers: the non-standard `EncryptedData=<hex>` wrapper (decrypted, values
//! kept, flagged), a keyed device's unreadable CP (`encryption.expected`,
//! acked or not per `[[device]] unencrypted`), the 1014 key push only on the
//! device's `SKCreateTime` request, and `[downlink] encrypt_requests`.

#[allow(dead_code)] // each test crate uses a subset of the shared helpers
mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chrono::Utc;
use hj212_gateway::protocol::{self, Dialect, Frame, Options, build, crypt, reply};
use hj212_gateway::store::{Direction, StoredRecord, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PW: &str = "123456";
const KEY_HEX: &str = "30303030303030303030303030303030";
const NEXT_HEX: &str = "0123456789ABCDEF0123456789ABCDEF";
const KEY: crypt::Key = [0x30; 16];
const WRONG: crypt::Key = [0x31; 16];

/// A gateway with two keyed 2025 devices: `accepting` (default policy, has a
/// next key to push) and `rejecting` (`unencrypted = "reject"`).
struct Gw {
    gw: common::InProc,
    accepting: String,
    rejecting: String,
}

impl Gw {
    async fn start(encrypt_requests: bool) -> Gw {
        let (accepting, rejecting) = (common::mn(1), common::mn(2));
        let text = format!(
            r#"
[metrics]
enabled = false
[server]
listen = ["127.0.0.1:0"]
[store]
sync = "off"
[mqtt]
enabled = false
[downlink]
backfill = false
time_sync_skew = false
encrypt_requests = {encrypt_requests}
[[device]]
mn = "{accepting}"
pw = "{PW}"
dialect = "2025"
key = "{KEY_HEX}"
next_key = "{NEXT_HEX}"
[[device]]
mn = "{rejecting}"
pw = "{PW}"
dialect = "2025"
key = "{KEY_HEX}"
unencrypted = "reject"
"#
        );
        Gw {
            gw: common::start_in_process(&text).await,
            accepting,
            rejecting,
        }
    }

    async fn connect(&self) -> Dev {
        Dev {
            s: TcpStream::connect(self.gw.addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    /// The stored inbound record with QN `qn`, once it is in the log.
    async fn inbound(&self, qn: &str) -> StoredRecord {
        for _ in 0..200 {
            if let Some(r) = common::records(&self.gw.db)
                .into_iter()
                .find(|r| r.direction == Direction::In && r.qn.as_deref() == Some(qn))
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no record with QN {qn}");
    }
}

/// One device connection that reads frames by their length field, never by
/// CR LF: ciphertext may hold a CR LF pair.
struct Dev {
    s: TcpStream,
    buf: BytesMut,
}

impl Dev {
    async fn send(&mut self, frame: &[u8]) {
        self.s.write_all(frame).await.unwrap();
    }

    async fn try_read(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.buf.len() >= 6 {
                let len: usize = std::str::from_utf8(&self.buf[2..6])
                    .unwrap()
                    .parse()
                    .expect("length field");
                let total = 6 + len + 4 + 2;
                if self.buf.len() >= total {
                    return Some(self.buf.split_to(total).to_vec());
                }
            }
            match tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf)).await {
                Err(_) => return None,
                Ok(n) => assert!(n.unwrap() > 0, "gateway closed"),
            }
        }
    }

    async fn read(&mut self) -> Vec<u8> {
        self.try_read(Duration::from_secs(10))
            .await
            .expect("a frame in time")
    }
}

fn decode_with(frame: &[u8], key: Option<crypt::Key>) -> Frame {
    struct K(Option<crypt::Key>);
    impl protocol::DeviceLookup for K {
        fn profile(&self, _: &str) -> Option<std::sync::Arc<protocol::DeviceProfile>> {
            self.0.map(|k| {
                std::sync::Arc::new(protocol::DeviceProfile {
                    keys: vec![k],
                    ..Default::default()
                })
            })
        }
    }
    protocol::decode(
        Bytes::copy_from_slice(frame),
        &Options::new(Utc::now()),
        &K(key),
    )
}

fn now_n14() -> String {
    protocol::time::format_n14(Utc::now().with_timezone(&protocol::time::beijing()))
}

/// A 2025 real-time upload (Flag 9: ack wanted) whose CP area is `cp` as
/// given, CRC over those bytes: the simulator's way with its wrapper.
fn upload(mn: &str, qn: &str, cp: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let head = build::Head {
        qn: Some(qn.as_bytes()),
        st: "32",
        cn: 2011,
        pw: PW,
        mn,
        flag: Some(9),
        split: None,
    };
    build::device_frame(&mut out, &head, None, |b| b.extend_from_slice(cp));
    out
}

fn values_cp() -> String {
    format!("DataTime={};a21026-Rtd=12.5,a21026-Flag=N", now_n14())
}

fn target(mn: &str) -> reply::Target<'_> {
    reply::Target {
        dialect: Dialect::V2025,
        st: "32",
        pw: PW,
        mn,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_encrypted_data_wrapper_is_decrypted_with_a_finding() {
    let gw = Gw::start(false).await;
    let mut dev = gw.connect().await;
    let qn = "20260101080000001";
    let wrapped = crypt::wrap(&KEY, values_cp().as_bytes());
    dev.send(&upload(&gw.accepting, qn, &wrapped)).await;
    let ack = common::decode(&dev.read().await);
    assert_eq!((ack.cn(), ack.qn()), (Some("9014"), Some(qn)));
    let r = gw.inbound(qn).await;
    assert_eq!(r.verdict, Verdict::Accepted);
    assert!(r.findings.contains("encryption.wrapper"), "{}", r.findings);
    let doc: serde_json::Value = serde_json::from_str(&r.document()).unwrap();
    assert_eq!(doc["encryption"], "sm4-wrapper");
    assert!(
        r.findings.contains("hex text"),
        "CRC over the hex: {}",
        r.findings
    );
    assert!(!r.findings.contains("crc.mismatch"), "{}", r.findings);
    assert_eq!(
        doc["values"]["a21026"]["Rtd"],
        serde_json::json!(12.5),
        "values recovered: {doc}"
    );
    assert!(
        r.raw.windows(14).any(|w| w == b"EncryptedData="),
        "raw kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_cp_is_flagged_and_acked_or_not_per_device_policy() {
    let gw = Gw::start(false).await;
    // A wrapper the device's key does not open, and a bare hex blob.
    let unreadable: [Vec<u8>; 2] = [
        crypt::wrap(&WRONG, values_cp().as_bytes()),
        hex::encode_upper(crypt::wrap(&KEY, values_cp().as_bytes())).into_bytes(),
    ];
    let mut n = 0;
    for cp in &unreadable {
        // Default policy: stored with a warning, acked.
        let mut dev = gw.connect().await;
        n += 1;
        let qn = format!("2026010108000{n:04}");
        dev.send(&upload(&gw.accepting, &qn, cp)).await;
        let ack = common::decode(&dev.read().await);
        assert_eq!((ack.cn(), ack.qn()), (Some("9014"), Some(qn.as_str())));
        let r = gw.inbound(&qn).await;
        assert_eq!(r.verdict, Verdict::Accepted);
        assert!(r.findings.contains("encryption.expected"), "{}", r.findings);
        assert!(r.findings.contains("warning"), "{}", r.findings);

        // `unencrypted = "reject"`: stored as rejected, no ack. The readable
        // upload sent right after is acked first, so none came for this one.
        let mut dev = gw.connect().await;
        n += 1;
        let bad = format!("2026010108000{n:04}");
        n += 1;
        let good = format!("2026010108000{n:04}");
        dev.send(&upload(&gw.rejecting, &bad, cp)).await;
        dev.send(&upload(&gw.rejecting, &good, values_cp().as_bytes()))
            .await;
        let ack = common::decode(&dev.read().await);
        assert_eq!((ack.cn(), ack.qn()), (Some("9014"), Some(good.as_str())));
        let r = gw.inbound(&bad).await;
        assert_eq!(r.verdict, Verdict::Rejected);
        assert!(r.findings.contains("encryption.expected"), "{}", r.findings);
        let ok = gw.inbound(&good).await;
        assert_eq!(ok.verdict, Verdict::Accepted);
        assert!(!ok.findings.contains("encryption."), "{}", ok.findings);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_pushed_only_on_the_skcreatetime_request() {
    let gw = Gw::start(false).await;
    let mn = gw.accepting.clone();
    let t = target(&mn);
    let mut dev = gw.connect().await;
    // A 1014 that is not the request: no push follows its 9013.
    let q1 = "20260101080000001";
    dev.send(&reply::request_encrypted(t, q1, 1014, "", &KEY))
        .await;
    let ack = common::decode(&dev.read().await);
    assert_eq!((ack.cn(), ack.qn()), (Some("9013"), Some(q1)));
    assert_eq!(
        dev.try_read(Duration::from_millis(500))
            .await
            .map(|f| common::decode(&f).cn().map(str::to_owned)),
        None,
        "no push for a 1014 without SKCreateTime"
    );
    // The request the standard defines: 9013, then the push under the current key.
    let q2 = "20260101080000002";
    dev.send(&reply::request_encrypted(
        t,
        q2,
        1014,
        "SKCreateTime=20260101080000002",
        &KEY,
    ))
    .await;
    let ack = common::decode(&dev.read().await);
    assert_eq!((ack.cn(), ack.qn()), (Some("9013"), Some(q2)));
    let push = decode_with(&dev.read().await, Some(KEY));
    assert!(!push.has_error(), "{:?}", push.findings);
    assert_eq!(push.cn(), Some("1014"));
    assert_eq!(push.param("NewSK"), Some(NEXT_HEX));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_requests_decides_whether_a_request_cp_is_encrypted() {
    for encrypt in [false, true] {
        let gw = Gw::start(encrypt).await;
        let mn = gw.accepting.clone();
        let mut dev = gw.connect().await;
        // 1013 (the device announces its clock) calls for a 1012 set-time.
        let qn = "20260101080000001";
        dev.send(&reply::request(target(&mn), qn, 1013, "")).await;
        let ack = common::decode(&dev.read().await);
        assert_eq!((ack.cn(), ack.qn()), (Some("9013"), Some(qn)));
        let raw = dev.read().await;
        let plain_text = raw.windows(11).any(|w| w == b"SystemTime=");
        assert_eq!(plain_text, !encrypt, "{}", String::from_utf8_lossy(&raw));
        let f = decode_with(&raw, Some(KEY));
        assert!(!f.has_error(), "{:?}", f.findings);
        assert_eq!(f.cn(), Some("1012"));
        assert_eq!(f.param("SystemTime").map(str::len), Some(14));
        assert_eq!(
            f.encryption.is_some(),
            encrypt,
            "the CP is SM4 under the device key only with encrypt_requests"
        );
    }
}
