//! Logging setup: plain lines for journald (no colours, no timestamps when not
//! on a TTY: journald stamps them), or JSON lines for log shippers; and the rate
//! limit of log lines that hostile input or a failing disk can repeat.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let tty = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Plain if tty => builder.try_init(),
        LogFormat::Plain => builder.with_ansi(false).without_time().try_init(),
    };
}

pub use crate::config::DEFAULT_REPEAT_INTERVAL;

/// `[log] repeat_interval` in milliseconds, shared by every [`Repeats`].
static REPEAT_INTERVAL_MS: AtomicU64 = AtomicU64::new(10_000);

/// Sets `[log] repeat_interval` for every call site (once, at start-up).
pub fn set_repeat_interval(every: Duration) {
    let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
    REPEAT_INTERVAL_MS.store(ms, Ordering::Relaxed);
}

/// Lines any [`Repeats`] did not write since the process started, exposed as
/// `hj212_log_lines_suppressed_total` (see [`lines_suppressed`]).
///
/// The one count kept per process rather than in a gateway's
/// [`Metrics`](crate::metrics::Metrics): [`log_repeated!`](crate::log_repeated)
/// call sites are statics expanded inside whatever function logs (the store
/// writer thread, the accept loop, code that holds no gateway state), and the
/// rate limit they apply, like the `tracing` subscriber they write to, is the
/// process's. There is no gateway handle to count in at that point.
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Lines suppressed by every [`Repeats`] in this process so far.
pub fn lines_suppressed() -> u64 {
    SUPPRESSED.load(Ordering::Relaxed)
}

/// Milliseconds since the first call (a process-wide monotonic clock), plus one so
/// that 0 can mean "never".
fn clock_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

/// Rate limit of one log call site whose line can repeat per frame, per connection
/// or per retry, e.g. a failing commit or accept: a full disk or a hostile peer must
/// not turn the gateway's log into the next thing that fills the disk or hides
/// everything else.
///
/// The first occurrence is logged; later ones within `[log] repeat_interval` are only
/// counted (and in `hj212_log_lines_suppressed_total`); the first occurrence after
/// the interval is logged again with `suppressed`, the count since the last line.
/// So a condition that persists shows as one line per interval with a count, and a
/// new one shows at once. Lock-free: a static per call site, see [`log_repeated!`].
///
/// [`log_repeated!`]: crate::log_repeated
#[derive(Debug)]
pub struct Repeats {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Repeats {
    /// A call site that has not logged yet.
    pub const fn new() -> Repeats {
        Repeats {
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` when this occurrence is to be
    /// logged, `None` when it is only counted.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(clock_ms(), REPEAT_INTERVAL_MS.load(Ordering::Relaxed))
    }

    /// [`admit`](Self::admit) at `now` (milliseconds of [`clock_ms`], never 0) with
    /// lines at least `every` milliseconds apart.
    fn admit_at(&self, now: u64, every: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < every
            // Another thread is logging this very occurrence window.
            || self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            SUPPRESSED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

impl Default for Repeats {
    fn default() -> Self {
        Repeats::new()
    }
}

/// Logs at most one line per `[log] repeat_interval` from this call site, with a
/// `suppressed` field counting the lines skipped since the last one (see
/// [`telemetry::Repeats`](crate::telemetry::Repeats)). Same arguments as the
/// `tracing` macro named by the first token:
///
/// ```ignore
/// log_repeated!(error, error = %e, "store batch rolled back");
/// ```
#[macro_export]
macro_rules! log_repeated {
    ($level:ident, $($rest:tt)+) => {{
        static SITE: $crate::telemetry::Repeats = $crate::telemetry::Repeats::new();
        if let Some(suppressed) = SITE.admit() {
            ::tracing::$level!(suppressed, $($rest)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One line, then silence counted, then one line carrying the count.
    #[test]
    fn a_repeating_line_is_logged_once_per_interval_with_the_count() {
        let site = Repeats::new();
        assert_eq!(site.admit_at(1, 10_000), Some(0));
        let before = lines_suppressed();
        for t in 0..1000 {
            assert_eq!(site.admit_at(2 + t, 10_000), None);
        }
        assert!(lines_suppressed() >= before + 1000);
        assert_eq!(site.admit_at(10_001, 10_000), Some(1000));
        assert_eq!(site.admit_at(10_002, 10_000), None);
        assert_eq!(site.admit_at(20_001, 10_000), Some(1));
    }
}
