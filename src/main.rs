//! `hj212-gateway`: see `hj212-gateway --help` and the README.

// Every frame allocates and frees its decoded frame, JSON document, log records and
// MQTT payload on whichever worker thread runs the session, the writer thread or the
// blocking pool; glibc's allocator pays for that cross-thread churn in
// malloc_consolidate and unlink_chunk, mimalloc's per-thread free lists do not
// (benches/README.md, "Measurements behind the code").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    hj212_gateway::cli::main()
}
