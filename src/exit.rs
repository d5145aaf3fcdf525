//! The process exit codes, one table for the command line and every subcommand.
//!
//! Scripts and systemd branch on these numbers, so each has one meaning across
//! the commands: 0 success; 1 the command ran and its answer is "no"; 2 the
//! command could not do its job with what it was given; 3 and 4 only from
//! `command`; 70 and 78 as in BSD `sysexits.h` (the packaged unit lists 78 in
//! `RestartPreventExitStatus=`).

/// The command ran and its answer is "no": `decode` found an error finding,
/// `verify` found tampering, `replay --to` left acks missing or connections
/// failed, `simulate` left frames unacked or saw errors, `command`'s device
/// refused (QnRtn) or failed (ExeRtn).
pub const NO: u8 = 1;

/// A usage error (bad flag value, unreadable input, unreachable control
/// socket), a failed read or write, a path or address `serve` cannot use (data
/// directory not a directory or not writable, listen address in use, signing
/// key unreadable), or a frame log that `serve` or a reading command will not
/// use (missing, unreadable, empty, not a frame log, damaged, too new). The
/// message names the path or the config key and the OS error.
pub const USAGE: u8 = 2;

/// `command`: the device did not answer in time (no 9011 after ReCount
/// resends, or nothing within the execution timeout).
pub const TIMEOUT: u8 = 3;

/// `command`: the device is offline or busy, or its session ended mid-exchange.
pub const UNAVAILABLE: u8 = 4;

/// `EX_SOFTWARE`: an internal error (the runtime did not start, a task failed);
/// never a file or address an operator could fix.
pub const EX_SOFTWARE: u8 = 70;

/// `EX_CONFIG`: the config file is unreadable or invalid; the message names
/// the key. Restarting cannot help, so the packaged unit does not.
pub const EX_CONFIG: u8 = 78;

/// `replay --to` and `simulate` were stopped by Ctrl-C (SIGINT) and printed the
/// summary up to then: 128 + SIGINT, what a shell reports for a process SIGINT
/// killed, so scripts see the same code as before, now with the partial result.
pub const INTERRUPTED: u8 = 130;
