//! Real brokers for the MQTT tests: an embedded rumqttd (always available) and
//! the Debian `mosquitto` binary (interop; required when `CI` is set), plus a
//! subscriber that records every message.
#![allow(dead_code)] // each test file uses a different part

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Longest any expected event may take on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Starts an embedded rumqttd (MQTT 3.1.1) on a free loopback port; it lives as
/// long as the test process.
pub fn rumqttd_on(port: u16) {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 500
dynamic_filters = true
"#
    );
    let cfg: rumqttd::Config = toml::from_str(&text).expect("rumqttd config");
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(cfg);
        let _ = broker.start();
    });
    wait_listening(port);
}

/// Starts rumqttd on a fresh port and returns it.
pub fn rumqttd() -> u16 {
    let port = free_port();
    rumqttd_on(port);
    port
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_listening(port: u16) {
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The mosquitto binary, or `None` (after saying why) when it is absent locally.
/// Under CI (`CI` set) a missing mosquitto fails the test: the interop test must run.
pub fn mosquitto_bin() -> Option<PathBuf> {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)");
    }
    eprintln!("SKIPPED: mosquitto not installed (apt-get install mosquitto); interop test not run");
    None
}

/// A mosquitto process with its own config and data directory.
pub struct Mosquitto {
    bin: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
    /// Plain listener.
    pub port: u16,
    /// A second free port, for a listener `extra` declares as `{port2}`.
    pub port2: u16,
    /// Whether `extra` declared that listener (a restart waits for it too).
    second_listener: bool,
    /// Directory holding the config, persistence and any certificates.
    pub dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts mosquitto with a plain listener on a free port plus `extra` config lines
    /// (which may use `{dir}` for its directory and `{port2}` for a second free
    /// port). A port is only free "a moment ago": taken meanwhile (tests run in
    /// parallel), mosquitto exits at once, and it is started again on others.
    pub fn start(bin: PathBuf, extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let conf = dir.path().join("mosquitto.conf");
        let mut m = Mosquitto {
            bin,
            conf,
            child: None,
            port: 0,
            port2: 0,
            second_listener: extra.contains("{port2}"),
            dir,
        };
        for attempt in 1.. {
            let (port, port2) = (free_port(), free_port());
            if port == port2 {
                continue;
            }
            let text = format!(
                "user root\nper_listener_settings false\nallow_anonymous true\n\
                 persistence true\npersistence_location {d}/\nautosave_interval 1\n\
                 log_dest file {d}/mosquitto.log\nlistener {port} 127.0.0.1\n{}\n",
                extra
                    .replace("{dir}", &d)
                    .replace("{port2}", &port2.to_string())
            );
            std::fs::write(&m.conf, text).expect("write mosquitto.conf");
            (m.port, m.port2) = (port, port2);
            match m.spawn_and_wait() {
                Ok(()) => return m,
                Err(why) if attempt < 5 => eprintln!("mosquitto attempt {attempt}: {why}; again"),
                Err(why) => panic!("mosquitto did not start: {why}"),
            }
        }
        unreachable!()
    }

    /// (Re)starts the process with the same config and persistence.
    pub fn restart(&mut self) {
        if let Err(why) = self.spawn_and_wait() {
            panic!("mosquitto did not restart: {why}");
        }
    }

    /// Spawns mosquitto and waits until it accepts connections on each of its
    /// listeners; `Err` with its log if it exits first or takes longer than
    /// [`PATIENCE`].
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        let ports = if self.second_listener {
            vec![self.port, self.port2]
        } else {
            vec![self.port]
        };
        for port in ports {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                let exited = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    self.child = None;
                    return Err(format!("exited ({status}); its log: {}", self.log()));
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "nothing listens on {port}; its log: {}",
                        self.log()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Stops it with SIGTERM (it saves its persistence) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("/bin/kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// The broker's log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One received message.
#[derive(Debug, Clone)]
pub struct Got {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retain flag as delivered.
    pub retain: bool,
}

impl Got {
    /// The payload as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).expect("JSON payload")
    }

    /// The `seq` of a data message (`None` for status and merged messages).
    pub fn seq(&self) -> Option<u64> {
        if self.topic.ends_with("/status") || self.topic.ends_with("/merged") {
            return None;
        }
        serde_json::from_slice::<serde_json::Value>(&self.payload)
            .ok()?
            .get("seq")?
            .as_u64()
    }
}

/// A subscriber on `filter` that records every message. With `persistent`, it uses a
/// persistent session (clean_session = false) so a broker restart loses nothing queued
/// for it; it reconnects by itself.
pub struct Subscriber {
    /// Everything received so far.
    pub got: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects to `127.0.0.1:port`, subscribes with QoS 1 and waits for the SUBACK.
    pub async fn start(port: u16, filter: &str, persistent: bool) -> Subscriber {
        let id = format!("test-sub-{}", free_port());
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(!persistent)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut el) = AsyncClient::new(o, 100);
        let got = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let g = got.clone();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            // Subscribes on every CONNACK until a SUBACK arrives: rumqttc does not
            // carry a SUBSCRIBE over to the next connection, so one sent into a
            // connection that then failed would never be answered.
            let mut tx = Some(tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) if tx.is_some() => {
                        client
                            .subscribe(filter.as_str(), QoS::AtLeastOnce)
                            .await
                            .expect("subscribe");
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        g.lock().unwrap().push(Got {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("test subscriber on {filter}: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(PATIENCE, rx)
            .await
            .expect("SUBACK in time")
            .expect("subscriber alive");
        Subscriber { got, task }
    }

    /// Messages so far.
    pub fn all(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `pred` holds over the messages received so far.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            {
                let g = self.got.lock().unwrap();
                if pred(&g) {
                    return g.clone();
                }
            }
            if Instant::now() > deadline {
                let g = self.got.lock().unwrap();
                let topics: Vec<&str> = g.iter().rev().take(10).map(|m| m.topic.as_str()).collect();
                panic!(
                    "timed out waiting for {what}; {} messages, last topics {topics:?}",
                    g.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The seqs of data messages (`{prefix}/{mn}/{cn}` with a `seq` field).
pub fn data_seqs(got: &[Got]) -> std::collections::BTreeSet<u64> {
    got.iter().filter_map(Got::seq).collect()
}

/// A device connection that sends frames and reads acks.
pub struct Device {
    s: tokio::net::TcpStream,
}

impl Device {
    /// Connects.
    pub async fn connect(addr: SocketAddr) -> Device {
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Device { s }
    }

    /// Sends `frame` and waits for one CRLF-terminated reply (the ack).
    pub async fn send_acked(&mut self, frame: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.s.write_all(frame).await.expect("write");
        // The gateway may also send requests of its own (a 1012 when the
        // device's DataTimes look like a wrong clock): a device reads past them.
        loop {
            let mut out = Vec::new();
            let mut b = [0u8; 1];
            while !out.ends_with(b"\r\n") {
                let n = tokio::time::timeout(PATIENCE, self.s.read(&mut b))
                    .await
                    .expect("ack in time")
                    .expect("read");
                assert!(n > 0, "connection closed before the ack");
                out.push(b[0]);
            }
            if is_reply(&out) {
                return out;
            }
        }
    }

    /// Sends bytes without waiting for anything.
    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.s.write_all(bytes).await.expect("write");
    }
}

/// A 9013/9014 reply (the only frames a gateway sends that answer an upload).
pub fn is_reply(frame: &[u8]) -> bool {
    frame
        .windows(8)
        .any(|w| w == b"CN=9014;" || w == b"CN=9013;")
}
