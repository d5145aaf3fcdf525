//! Consumers yield the CPU to ingest.
//!
//! A device waits for its ack on its session task and on the store writer.
//! Everything that reads the log afterwards (the MQTT publisher, the upstream
//! forwarders, the alarm detector, the WAL checkpointer) may fall behind for a
//! moment without losing anything, because it resumes from its cursor. On a
//! small box they all share the same cores, and a consumer's batch holding a
//! core for a few milliseconds is an ack delayed by as much. Their threads
//! therefore run [`NICE`] steps below the process: they get all the CPU that
//! ingest leaves and give it back when ingest needs it.
//!
//! Linux keeps the nice value per thread, and a thread may lower its own
//! priority without privileges but not raise it again. So only threads that do
//! nothing but background work are lowered: tokio's blocking pool (in this
//! daemon it runs only consumers, maintenance and start/stop work; sessions
//! never block) and the checkpointer.

use std::cell::Cell;

/// How many nice steps background threads run below the process.
pub const NICE: i32 = 10;

thread_local! {
    static LOWERED: Cell<bool> = const { Cell::new(false) };
}

/// Lowers the calling thread's priority by [`NICE`] (once per thread; later calls
/// are free). Failure only costs the preference, so it is ignored.
pub fn background() {
    if LOWERED.get() {
        return;
    }
    LOWERED.set(true);
    // `None` is the calling thread: the nice value is per thread on Linux (NPTL).
    if let Ok(now) = rustix::process::getpriority_process(None) {
        let _ = rustix::process::setpriority_process(None, (now + NICE).min(19));
    }
}

/// `spawn_blocking` for consumer work, on a lowered thread.
pub fn spawn_background<T, F>(f: F) -> tokio::task::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        background();
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_only_the_calling_thread_and_only_once() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let (inside, again) = std::thread::spawn(|| {
            background();
            let inside = rustix::process::getpriority_process(None).unwrap();
            background();
            (inside, rustix::process::getpriority_process(None).unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(inside, (before + NICE).min(19));
        assert_eq!(again, inside, "a second call does not lower it further");
        assert_eq!(
            rustix::process::getpriority_process(None).unwrap(),
            before,
            "other threads keep theirs"
        );
    }
}
