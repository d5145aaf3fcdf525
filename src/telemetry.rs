//! Logging setup: plain lines (colours and timestamps only on a terminal), or
//! JSON lines for log shippers; under journald, each line carries its syslog
//! priority; and the rate limit of log lines that hostile input, a failing disk
//! or an unreachable broker can repeat.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level.
///
/// When stderr is the journal's stream (see [`stderr_is_journal`]), every line
/// starts with its `<N>` priority, which journald strips and stores as
/// `PRIORITY=` (systemd.exec(5), `SyslogLevelPrefix=`), so `journalctl -p
/// warning` works; no colours and no timestamp, journald stamps each line.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = stderr_is_journal();
    let tty = !journal && std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => {
            let json = builder.json().flatten_event(true).with_current_span(true);
            if journal {
                json.map_event_format(Prioritised).try_init()
            } else {
                json.try_init()
            }
        }
        LogFormat::Plain if tty => builder.try_init(),
        LogFormat::Plain => {
            let plain = builder.with_ansi(false).without_time();
            if journal {
                plain.map_event_format(Prioritised).try_init()
            } else {
                plain.try_init()
            }
        }
    };
}

/// True when stderr is the stream systemd connected to journald:
/// `$JOURNAL_STREAM` is `DEVICE:INODE` of that stream, and sd_journal_stream_fd(3)
/// says to compare it with the fd's own, since the variable is inherited by
/// children whose stderr was redirected elsewhere (a shell pipeline in a unit,
/// `ExecStartPre=` tools), where a `<N>` prefix would be noise in a file.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    journal_stream_matches(&value.to_string_lossy(), st.st_dev, st.st_ino)
}

/// `DEVICE:INODE` (decimal, as systemd writes it) names this device and inode.
fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    value
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        .is_some_and(|(d, i)| d == dev && i == ino)
}

/// The syslog priority of a level as sd-daemon(3) defines the prefixes: `SD_ERR`
/// `<3>`, `SD_WARNING` `<4>`, `SD_INFO` `<6>`, `SD_DEBUG` `<7>` (trace too: syslog
/// has nothing below debug).
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// An event format that puts `<N>` before every line the inner format writes.
///
/// Every line, not only the first: journald reads its stream line by line, and a
/// message or field value with a newline in it would otherwise continue at the
/// default priority (info), hiding the tail of an error from `journalctl -p err`.
struct Prioritised<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prioritised<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let priority = syslog_priority(event.metadata().level());
        for part in line.trim_end_matches('\n').split('\n') {
            writeln!(writer, "<{priority}>{part}")?;
        }
        Ok(())
    }
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

/// Longest gap between two lines of one [`Streak`].
pub const STREAK_MAX_GAP: Duration = Duration::from_secs(600);

/// Rate limit of a condition that persists and is retried on a timer, such as an
/// unreachable MQTT broker: the retry interval is often no longer than `[log]
/// repeat_interval`, so [`Repeats`] alone would still write a line per retry,
/// forever (8,640 a day at 10 s).
///
/// The first occurrence is logged; the next line comes after `[log]
/// repeat_interval`, and each later gap is twice the previous one, up to
/// [`STREAK_MAX_GAP`]; each line carries `suppressed`, the occurrences since the
/// last line. [`end`](Self::end) (the condition cleared) starts over, so the next
/// failure shows at once. Owned by the task that retries (no sharing, no atomics).
#[derive(Debug, Default)]
pub struct Streak {
    /// When the last line was written; `None` outside a streak.
    last: Option<Instant>,
    gap: Duration,
    suppressed: u64,
    total: u64,
}

impl Streak {
    /// No streak yet.
    pub const fn new() -> Streak {
        Streak {
            last: None,
            gap: Duration::ZERO,
            suppressed: 0,
            total: 0,
        }
    }

    /// One more occurrence: `Some(occurrences not logged since the last line)`
    /// when it is to be logged, `None` when it is only counted.
    pub fn admit(&mut self) -> Option<u64> {
        let every = Duration::from_millis(REPEAT_INTERVAL_MS.load(Ordering::Relaxed));
        self.admit_at(Instant::now(), every)
    }

    fn admit_at(&mut self, now: Instant, every: Duration) -> Option<u64> {
        self.total += 1;
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.gap => {
                self.suppressed += 1;
                SUPPRESSED.fetch_add(1, Ordering::Relaxed);
                None
            }
            Some(_) => {
                self.last = Some(now);
                self.gap = (self.gap * 2).clamp(every, STREAK_MAX_GAP.max(every));
                Some(std::mem::take(&mut self.suppressed))
            }
            None => {
                self.last = Some(now);
                self.gap = every;
                Some(0)
            }
        }
    }

    /// The condition cleared: returns how many times it occurred in the streak
    /// (0 when there was none), and forgets it.
    pub fn end(&mut self) -> u64 {
        let total = self.total;
        *self = Streak::new();
        total
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

    /// A retry every 10 s for a day: a first line, then lines at doubling gaps
    /// up to one per STREAK_MAX_GAP, each counting what it stood for.
    #[test]
    fn a_persisting_condition_logs_ever_more_rarely_and_restarts_when_it_clears() {
        let mut s = Streak::new();
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        let mut lines = Vec::new();
        for i in 0..8640u64 {
            if let Some(n) = s.admit_at(t0 + Duration::from_secs(i * 10), every) {
                lines.push((i * 10, n));
            }
        }
        assert_eq!(&lines[..5], &[(0, 0), (10, 0), (30, 1), (70, 3), (150, 7)]);
        // 8,640 retries, about 150 lines; every retry accounted for.
        assert!(lines.len() < 160, "{} lines", lines.len());
        let counted: u64 = lines.iter().map(|l| l.1 + 1).sum::<u64>() + s.suppressed;
        assert_eq!(counted, 8640);
        let gaps: Vec<u64> = lines.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(gaps.iter().all(|&g| g <= STREAK_MAX_GAP.as_secs()));
        assert_eq!(s.end(), 8640);
        assert_eq!(s.admit_at(t0 + Duration::from_secs(86_401), every), Some(0));
    }

    #[test]
    fn journal_stream_is_compared_with_the_fds_own_device_and_inode() {
        assert!(journal_stream_matches("64769:123456", 64769, 123456));
        assert!(!journal_stream_matches("64769:123456", 64769, 123457));
        assert!(!journal_stream_matches("64769", 64769, 0));
        assert!(!journal_stream_matches("", 0, 0));
        assert_eq!(syslog_priority(&Level::ERROR), 3);
        assert_eq!(syslog_priority(&Level::WARN), 4);
        assert_eq!(syslog_priority(&Level::INFO), 6);
        assert_eq!(syslog_priority(&Level::TRACE), 7);
    }
}
