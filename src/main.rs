//! `hj212-gateway`: see `hj212-gateway --help` and the README.

// Every frame allocates and frees its decoded frame, JSON document, log records and
// MQTT payload on whichever worker thread runs the session, the writer thread or the
// blocking pool; glibc's allocator spent ~15 % of the gateway's CPU on that churn
// (malloc_consolidate, unlink_chunk) under load. mimalloc's per-thread free lists
// do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    hj212_gateway::cli::main()
}
