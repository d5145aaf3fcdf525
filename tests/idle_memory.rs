//! Memory held per idle session (issue 9: <= 4 KiB of RSS per idle session).
//!
//! `benches/e2e.sh idle` measures that on the release binary at 19,000
//! sessions. This test pins the structural part at 2,000: it runs under the
//! daemon's allocator (mimalloc, as `main.rs` sets it) and measures this
//! process's RSS, so the number is what the kernel charges, size classes and
//! all. The clients are blocking std sockets, which allocate nothing in this
//! process; socket buffers are the kernel's, not in RSS. It is not a timing
//! test. Only one test lives in this file: RSS is process-wide.
//!
//! mimalloc asks for transparent huge pages, so RSS grows in 2 MiB steps:
//! ~1 KiB per session at this N. The budget is therefore the 4 KiB,
//! which today's ~2 KiB meets at any alignment of those steps, and which a
//! regression of the kind that made idle sessions 7.5 KB (a read buffer held
//! while idle, 4 KiB) breaks. For the exact number, turn the huge pages off:
//! `MIMALLOC_ALLOW_THP=0 cargo test --test idle_memory -- --nocapture`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hj212_gateway::metrics::Metrics;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sessions per measurement: enough that page granularity is noise
/// (4 KiB / 2,000 = 2 B), few enough for any machine's open-file limit.
const N: usize = 2000;
/// RSS one idle session may add (bytes): the issue 9 target.
const IDLE_BUDGET: i64 = 4096;

/// This process's resident set, counted from its page tables.
fn rss_bytes() -> i64 {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").expect("/proc/self/smaps_rollup");
    let kib: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Rss");
    kib * 1024
}

fn wait_sessions(m: &Metrics, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.sessions_open.get() != n {
        assert!(
            Instant::now() < deadline,
            "{} sessions open, want {n}",
            m.sessions_open.get()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The gauge counts a session from its spawn; give the last ones time to
    // reach their first wait.
    std::thread::sleep(Duration::from_millis(500));
}

/// Sends one upload asking for an ack and reads the ack.
fn upload_and_ack(s: &mut TcpStream, i: u32) {
    let frame = common::upload(&common::mn(i), &common::qn(i), "123456");
    s.write_all(&frame).expect("send upload");
    let want = common::expected_ack(&frame);
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).expect("read ack");
    assert_eq!(got, want, "ack bytes");
}

/// Both ends of every session live in this process: raise the soft open-file
/// limit to the hard one (common defaults are 1,024 soft), and fail with the
/// reason if even that is too low.
fn enough_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
    let need = 2 * N as u64 + 256;
    if let Some(soft) = getrlimit(Resource::Nofile).current {
        assert!(
            soft >= need,
            "this test needs {need} open files; RLIMIT_NOFILE allows {soft} (hard {:?})",
            lim.maximum
        );
    }
}

#[test]
fn an_idle_session_costs_at_most_4_kib_of_rss() {
    enough_files();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let g = rt.block_on(common::start_in_process(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nmax_per_ip = 5000\nidle_timeout = \"1h\"\n\
         [store]\nsync = \"off\"\n[metrics]\nenabled = false\n",
    ));
    let addr = g.addr;
    let m = &g.running.shared.metrics;

    // Warm-up, kept small so that little freed memory is left for the
    // measured sessions to reuse: lazily made state (the store's first
    // batches, the registry) is not per session.
    {
        let mut warm: Vec<TcpStream> = (0..50)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        for (i, s) in warm.iter_mut().enumerate() {
            upload_and_ack(s, 900_000 + i as u32);
        }
        wait_sessions(m, 50);
    }
    wait_sessions(m, 0);

    let before = rss_bytes();
    let mut idle: Vec<TcpStream> = (0..N)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    wait_sessions(m, N as i64);
    let after_idle = rss_bytes();
    let idle_per = (after_idle - before) / N as i64;

    // Some devices of an idle fleet do speak (the bench's send a heartbeat):
    // after a frame each, the sessions go quiet again. What that adds is
    // mostly not the sessions' (the log's bounded feed of recent records, the
    // consumers' per-device state), so it is reported, not budgeted.
    for (i, s) in idle.iter_mut().enumerate().take(N / 10) {
        upload_and_ack(s, i as u32);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after_frames = rss_bytes();
    eprintln!(
        "{N} idle sessions: RSS +{} KiB = {idle_per} B per session; \
         after a frame from {} of them: +{} KiB",
        (after_idle - before) / 1024,
        N / 10,
        (after_frames - after_idle) / 1024
    );

    drop(idle);
    wait_sessions(m, 0);
    rt.block_on(g.running.stop()).expect("stop");

    assert!(
        idle_per <= IDLE_BUDGET,
        "an idle session adds {idle_per} B of RSS (budget {IDLE_BUDGET})"
    );
}
