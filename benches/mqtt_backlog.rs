//! Catching up an MQTT backlog: how fast the publisher drains the frame log.
//!
//! `cargo bench --bench mqtt_backlog` builds a log of 1 million accepted 2017
//! real-time frames, each followed by our ack, recorded by ingest's own
//! `frame_record` (as a session logs them), starts a local Debian `mosquitto` on
//! a free loopback port, runs the publisher from cursor 0 and times until its
//! persisted cursor reaches the last record (every frame PUBACKed, QoS 1).
//! Prints frames/s, and the CPU time per frame of this process (the publisher:
//! log reads, planning, payloads, MQTT I/O) and of mosquitto over the drain,
//! from `/proc/<pid>/stat` (clock ticks of 10 ms). The broker's pid is printed
//! for tracing its system calls apart.
//!
//! Environment: `MQTT_BENCH_DOC=stored` stores every record's document in the
//! log (logs written before 2026-12-07; by default the log keeps it out and the
//! publisher rebuilds it from the raw bytes), `MQTT_BENCH_ACKS=0` leaves the
//! acks out (the shape of this bench before 2026-12-07), `MQTT_BENCH_N` frames
//! (default 1000000), `MQTT_BENCH_INFLIGHT` (default: the config default),
//! `MQTT_BENCH_DIR` where to put the files, `MQTT_BENCH_BROKER_CONF` extra
//! mosquitto config lines.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hj212_gateway::config::MqttSection;
use hj212_gateway::ingest::frame_record;
use hj212_gateway::protocol::{self, Options, json, reply};
use hj212_gateway::publish::mqtt::{self, MqttSettings};
use hj212_gateway::publish::presence::Presence;
use hj212_gateway::store::{Cursors, Direction, NewRecord, Reader, Store, StoreConfig, SyncMode};
use tokio_util::sync::CancellationToken;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An accepted inbound 2017 upload and our ack of it, as the session records
/// them (`MQTT_BENCH_ACKS=0`: the upload alone).
fn records(opts: &Options, n: u64) -> Vec<NewRecord> {
    let mn = format!("010000A8900016F0{:08}", n % 500);
    let qn = format!("20261128{:09}", n % 1_000_000_000);
    let seg = format!(
        "QN={qn};ST=32;CN=2011;PW=123456;MN={mn};Flag=5;CP=&&DataTime=20261128130501;\
         a01012-Rtd=12.50,a01012-Flag=N;a01011-Rtd=3.201,a01011-Flag=N;a34013-Rtd=21.7,\
         a34013-Flag=N;a21026-Rtd=35.100,a21026-Flag=N;a21002-Rtd=88.2,a21002-Flag=N&&"
    );
    let f = protocol::decode(reply::envelope(seg.as_bytes()), opts, &());
    let at = 1_795_870_701_000 + n as i64;
    let peer = "10.1.0.7:40001";
    let mut out = vec![frame_record(&f, peer, n % 500, Direction::In, at, true)];
    if env_num("MQTT_BENCH_ACKS", 1) != 0 {
        let ack = reply::ack_frame(&f, opts).expect("Flag=5 asks for an ack");
        out.push(frame_record(&ack, peer, n % 500, Direction::Out, at, true));
    }
    // The shape of logs written before 2026-12-07: every document stored.
    if std::env::var("MQTT_BENCH_DOC").as_deref() == Ok("stored") {
        for r in &mut out {
            let f = protocol::decode(r.raw.clone(), opts, &());
            r.doc = json::frame_doc(&f);
            r.doc_stored = true;
        }
    }
    out
}

/// CPU time (user + system) of process `pid` ("self" for this one), in seconds.
fn cpu_s(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // USER_HZ is 100 on Linux.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

fn build_log(path: &Path, n: u64) {
    let _ = std::fs::remove_file(path);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (handle, join) = Store::open(StoreConfig {
        sync: SyncMode::Off,
        batch_max: 4096,
        ..StoreConfig::new(path)
    })
    .unwrap();
    let opts = Options::new(chrono::Utc::now());
    rt.block_on(async {
        let mut i = 0;
        while i < n {
            let recs = (i..(i + 2000).min(n))
                .flat_map(|k| records(&opts, k))
                .collect();
            handle.append_many(recs).await.unwrap();
            i += 2000;
        }
    });
    drop(handle);
    join.join().unwrap();
}

fn main() {
    let n = env_num("MQTT_BENCH_N", 1_000_000);
    let inflight = env_num(
        "MQTT_BENCH_INFLIGHT",
        MqttSection::default().max_inflight as u64,
    ) as usize;
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("MQTT_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("mqtt-backlog.sqlite");

    let t0 = Instant::now();
    build_log(&db, n);
    let last = Reader::open(&db).unwrap().last_seq().unwrap();
    println!(
        "built a log of {last} records in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nallow_anonymous true\nlog_dest none\nlistener {port} 127.0.0.1\n{}\n",
            std::env::var("MQTT_BENCH_BROKER_CONF").unwrap_or_default()
        ),
    )
    .unwrap();
    let mut broker = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (apt-get install mosquitto)");
    let broker_pid = broker.id().to_string();
    println!("mosquitto pid {broker_pid} port {port}");
    let up = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "mosquitto did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let section = MqttSection {
        url: format!("mqtt://127.0.0.1:{port}"),
        client_id: Some("bench".into()),
        max_inflight: inflight,
        ..MqttSection::default()
    };
    let settings = MqttSettings::from_config(&section, Path::new("bench")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cursors = Cursors::open(&db).unwrap();
    let token = CancellationToken::new();
    let t1 = Instant::now();
    let (cpu0, broker0) = (cpu_s("self"), cpu_s(&broker_pid));
    let task = {
        let _guard = rt.enter();
        mqtt::spawn(
            settings,
            db.clone(),
            // A backlog is read from the log file: the feed would be empty anyway.
            Arc::new(hj212_gateway::store::Feed::new(0)),
            Arc::new(Presence::default()),
            token.clone(),
        )
    };
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if cursors.get_cursor(mqtt::CURSOR).unwrap().unwrap_or(0) >= last {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(600),
            "drain took over 10 minutes"
        );
    }
    let took = t1.elapsed();
    let (cpu, broker_cpu) = (cpu_s("self") - cpu0, cpu_s(&broker_pid) - broker0);
    token.cancel();
    let _ = rt.block_on(task);
    let _ = broker.kill();
    let _ = broker.wait();
    println!(
        "mqtt backlog: {n} frames ({last} records) published (QoS 1, max_inflight {inflight}) and PUBACKed in {:.2} s = {:.0} frames/s",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    println!(
        "cpu per frame: publisher {:.2} us, mosquitto {:.2} us",
        cpu * 1e6 / n as f64,
        broker_cpu * 1e6 / n as f64
    );
}
