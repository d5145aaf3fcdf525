//! Writes a synthetic frame log for measuring `verify`, `stats` and `export`:
//! `cargo run --release --example gen_log -- DIR N` (N inbound frames from 100 devices,
//! each decoded and judged like a session would, then appended in batches).

use hj212_gateway::protocol::{self, Options, json, reply};
use hj212_gateway::store::{Direction, Kind, NewRecord, Store, StoreConfig, SyncMode, Verdict};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("DIR"));
    let n: u64 = args.next().expect("N").parse().expect("N is a number");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (h, w) = Store::open(StoreConfig {
        sync: SyncMode::Off,
        ..StoreConfig::new(dir.join("frames.sqlite"))
    })
    .expect("store");
    let t0 = 1_717_200_000_000i64;
    rt.block_on(async {
        let mut batch = Vec::with_capacity(1000);
        for i in 0..n {
            let mn = format!("010000A8900016F0{:08}", i % 100);
            let t = t0 + (i as i64) * 10;
            let local = chrono::DateTime::from_timestamp_millis(t).unwrap()
                .with_timezone(&protocol::time::beijing());
            let seg = format!(
                "QN={};ST=31;CN=2011;PW=123456;MN={mn};Flag=5;CP=&&DataTime={};\
                 a21026-Rtd=12.5,a21026-Flag=N;a21002-Rtd=35.2,a21002-Flag=N;a34013-Rtd=3.1,a34013-Flag=N&&",
                local.format("%Y%m%d%H%M%S%3f"),
                local.format("%Y%m%d%H%M%S")
            );
            let f = protocol::decode(reply::envelope(seg.as_bytes()), &Options::new(chrono::DateTime::from_timestamp_millis(t).unwrap()), &());
            batch.push(NewRecord {
                received_at_ms: t,
                peer: "10.0.0.2:40000".into(),
                session: i % 100,
                direction: Direction::In,
                kind: Kind::Frame,
                raw: f.raw.clone(),
                dialect: f.dialect.map(|d| d.as_str().to_owned()),
                st: f.st().map(str::to_owned),
                cn: f.cn().map(str::to_owned),
                mn: f.mn().map(str::to_owned),
                qn: f.qn().map(str::to_owned),
                data_time: f.data_time.map(|d| protocol::time::rfc3339(d, false)),
                verdict: if f.has_error() { Verdict::Rejected } else { Verdict::Accepted },
                findings: serde_json::to_string(&f.findings).unwrap(),
                doc: json::frame_doc(&f),
                doc_stored: true,
            });
            if batch.len() == 1000 {
                h.append_many(std::mem::take(&mut batch)).await.expect("append");
            }
        }
        if !batch.is_empty() {
            h.append_many(batch).await.expect("append");
        }
        h.shutdown().await;
    });
    w.join().expect("writer");
}
