//! Per-thread scheduling priority (nice value).
//!
//! Linux keeps the nice value per thread, so one thread can run above or below
//! the rest of the process. The gateway uses that for two threads:
//!
//! - the store writer runs `[store] writer_boost` steps *above* the rest: it is the
//!   one serial stage every ack waits for, and at saturation it otherwise spends
//!   much of its wall time runnable but waiting for a CPU behind session tasks,
//!   until acks miss the devices' timeout (benches/README.md, "Measurements
//!   behind the code");
//! - the alarm detector runs `[alarms] nice` steps *below* it, so it lags under
//!   overload instead of delaying acks.
//!
//! Lowering a priority is always allowed. Raising one needs `CAP_SYS_NICE` or an
//! `RLIMIT_NICE` that reaches the new value (systemd: `LimitNICE=`). Failing only
//! costs the preference: the gateway is correct at any priority.

use std::io;

/// Moves the calling thread `steps` nice steps from the process's own nice value
/// (negative: higher priority), clamped to the kernel's range -20..=19. Returns
/// the nice value now in effect.
pub fn shift_current_thread(steps: i32) -> io::Result<i32> {
    // The process's value (its main thread's), not this thread's: a thread that is
    // reconfigured moves relative to the gateway, not cumulatively.
    let base = rustix::process::getpriority_process(Some(rustix::process::getpid()))?;
    let target = (base + steps).clamp(-20, 19);
    rustix::process::setpriority_process(None, target)?;
    Ok(target)
}
