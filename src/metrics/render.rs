//! Prometheus text exposition format 0.0.4.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::Histogram;

/// The `/metrics` body being built: `# HELP`/`# TYPE` once per family, then
/// its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// Label values are the only free text: escape `\`, `"` and newlines.
fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl Exposition {
    /// An empty body.
    pub fn new() -> Exposition {
        Exposition {
            out: String::with_capacity(16 * 1024),
        }
    }

    /// Starts a family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape(v, &mut self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
    }

    /// One integer sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl Into<i128>) {
        self.labels(name, labels);
        let _ = writeln!(self.out, "{}", v.into());
    }

    /// One float sample.
    pub fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.labels(name, labels);
        let _ = writeln!(self.out, "{v}");
    }

    /// A whole histogram family: cumulative `_bucket`s, `_sum`, `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, b) in h.bounds.iter().enumerate() {
            cumulative += h.buckets[i].load(Ordering::Relaxed);
            let le = format!("{}", *b as f64 * h.scale);
            self.labels(&bucket, &[("le", &le)]);
            let _ = writeln!(self.out, "{cumulative}");
        }
        cumulative += h.buckets[h.bounds.len()].load(Ordering::Relaxed);
        self.labels(&bucket, &[("le", "+Inf")]);
        let _ = writeln!(self.out, "{cumulative}");
        let sum = h.sum.load(Ordering::Relaxed) as f64 * h.scale;
        self.sample_f64(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], cumulative);
    }

    /// The finished body.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Clock ticks per second of `/proc` times (`USER_HZ`): 100 on every Linux ABI
/// we build for (x86_64, aarch64); reading `sysconf` would need `unsafe`.
const USER_HZ: f64 = 100.0;

/// Process figures from `/proc` (Linux), under the names and with the meanings
/// the Prometheus client libraries give them, so stock dashboards and alerts
/// find them: `process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_start_time_seconds`. A figure that cannot be read is absent.
pub fn render_process(e: &mut Exposition) {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the parenthesised command name (which may hold spaces):
    // index 0 is field 3 (state), so field N (1-based, proc(5)) is index N - 3.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(") "))
        .map(|x| x.1.split(' ').collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|x| x.parse::<u64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        e.family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        e.sample_f64(
            "process_cpu_seconds_total",
            &[],
            (utime + stime) as f64 / USER_HZ,
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(kb) = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    {
        e.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        e.sample("process_resident_memory_bytes", &[], kb * 1024);
    }
    if let Some(vsize) = field(23) {
        e.family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
        );
        e.sample("process_virtual_memory_bytes", &[], vsize);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        e.family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        e.sample("process_open_fds", &[], fds.count() as u64);
    }
    if let Some(max) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .as_deref()
        .and_then(max_open_files)
    {
        e.family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        e.sample("process_max_fds", &[], max);
    }
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    if let (Some(btime), Some(start)) = (btime, field(22)) {
        e.family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        e.sample_f64(
            "process_start_time_seconds",
            &[],
            btime as f64 + start as f64 / USER_HZ,
        );
    }
}

/// The soft limit on open files from `/proc/self/limits` (`None` when unlimited).
fn max_open_files(limits: &str) -> Option<u64> {
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Checks that `text` is well-formed exposition format: every line a comment or
/// `name{labels} value`, HELP and TYPE once per family and before its samples,
/// histogram buckets cumulative with `+Inf` equal to `_count`. Returns the
/// samples as (`name{labels}`, value). Used by the tests.
#[doc(hidden)]
pub fn parse_exposition(text: &str) -> Result<Vec<(String, f64)>, String> {
    use std::collections::{HashMap, HashSet};
    let mut help = HashSet::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let mut last_bucket: HashMap<String, f64> = HashMap::new();
    let mut inf: HashMap<String, f64> = HashMap::new();
    let mut counts: HashMap<String, f64> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !help.insert(name.to_owned()) {
                return Err(err("HELP twice"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(err("bad TYPE"));
            }
            if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                return Err(err("TYPE twice"));
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| err("no value"))?;
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            x => x.parse().map_err(|_| err("bad value"))?,
        };
        let (name, labels) = match series.find('{') {
            Some(i) => {
                if !series.ends_with('}') {
                    return Err(err("unterminated labels"));
                }
                (&series[..i], &series[i + 1..series.len() - 1])
            }
            None => (series, ""),
        };
        let ok_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !ok_name {
            return Err(err("bad metric name"));
        }
        if !labels.is_empty() {
            for pair in split_labels(labels).map_err(|m| err(&m))? {
                let (k, _) = pair;
                if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(err("bad label name"));
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        if !types.contains_key(family) || !help.contains(family) {
            return Err(err("sample before its HELP/TYPE"));
        }
        if types[family] == "histogram" {
            if name.ends_with("_bucket") {
                let prev = last_bucket.get(family).copied().unwrap_or(0.0);
                if v < prev {
                    return Err(err("buckets not cumulative"));
                }
                last_bucket.insert(family.to_owned(), v);
                if labels.contains("le=\"+Inf\"") {
                    inf.insert(family.to_owned(), v);
                }
            } else if name.ends_with("_count") {
                counts.insert(family.to_owned(), v);
            }
        }
        samples.push((series.to_owned(), v));
    }
    for (family, kind) in &types {
        if kind == "histogram" && inf.get(family) != counts.get(family) {
            return Err(format!("{family}: +Inf bucket != _count"));
        }
    }
    Ok(samples)
}

fn split_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next() != Some('"') {
            return Err("label value not quoted".into());
        }
        let mut val = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(c @ ('\\' | '"')) => val.push(c),
                    _ => return Err("bad escape".into()),
                },
                Some('"') => break,
                Some(c) => val.push(c),
                None => return Err("unterminated label value".into()),
            }
        }
        out.push((key, val));
        match chars.next() {
            Some(',') => continue,
            None => return Ok(out),
            Some(_) => return Err("junk after label value".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, Refusal};

    #[test]
    fn exposition_parses_and_histograms_are_consistent() {
        let m = Metrics::new();
        m.refused(Refusal::PerIp);
        m.junk(7);
        m.frame(false, 100, &[]);
        m.commit_seconds.observe(3_000_000);
        m.commit_seconds.observe(u64::MAX / 2);
        m.commit_batch_records.observe_n(5, 2);
        m.upstream("plat\"form\\1").connected.set(1);
        m.downlink_exchange("no_reply");
        m.downlink_exchange("no_reply");
        m.downlink_exchange("not an outcome");
        let mut e = Exposition::new();
        m.render(&mut e);
        Metrics::new().render(&mut e);
        let text = e.finish();
        // Rendering the same registry twice must be caught as duplicate families...
        assert!(parse_exposition(&text).unwrap_err().contains("twice"));
        let mut e = Exposition::new();
        m.render(&mut e);
        render_process(&mut e);
        let text = e.finish();
        let samples = parse_exposition(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
        let get = |k: &str| {
            samples
                .iter()
                .find(|(s, _)| s == k)
                .map(|x| x.1)
                .unwrap_or_else(|| panic!("{k} missing\n{text}"))
        };
        assert_eq!(
            get("hj212_connections_refused_total{reason=\"per_ip_cap\"}"),
            1.0
        );
        assert_eq!(get("hj212_frames_total{verdict=\"junk\"}"), 1.0);
        assert_eq!(
            get("hj212_downlink_exchanges_total{outcome=\"no_reply\"}"),
            2.0
        );
        assert_eq!(
            get("hj212_downlink_exchanges_total{outcome=\"offline\"}"),
            0.0
        );
        assert_eq!(get("hj212_downlink_exchanges_unrecorded_total"), 0.0);
        assert_eq!(get("hj212_frames_total{verdict=\"rejected\"}"), 1.0);
        assert_eq!(get("hj212_received_bytes_total"), 107.0);
        assert_eq!(get("hj212_store_commit_duration_seconds_count"), 2.0);
        assert_eq!(
            get("hj212_store_commit_duration_seconds_bucket{le=\"0.0025\"}"),
            0.0
        );
        assert_eq!(
            get("hj212_store_commit_duration_seconds_bucket{le=\"0.005\"}"),
            1.0
        );
        assert_eq!(
            get("hj212_store_commit_duration_seconds_bucket{le=\"+Inf\"}"),
            2.0
        );
        assert_eq!(
            get("hj212_store_commit_batch_records_bucket{le=\"4\"}"),
            0.0
        );
        assert_eq!(
            get("hj212_store_commit_batch_records_bucket{le=\"8\"}"),
            2.0
        );
        assert_eq!(get("hj212_store_commit_batch_records_sum"), 10.0);
        assert_eq!(
            get("hj212_upstream_connected{upstream=\"plat\\\"form\\\\1\"}"),
            1.0
        );
        // The client libraries' names, so stock dashboards find them.
        assert!(get("process_resident_memory_bytes") > 0.0);
        assert!(get("process_virtual_memory_bytes") >= get("process_resident_memory_bytes"));
        assert!(get("process_open_fds") >= 1.0);
        assert!(get("process_max_fds") >= get("process_open_fds"));
        assert!(get("process_cpu_seconds_total") >= 0.0);
        let now = chrono::Utc::now().timestamp() as f64;
        let start = get("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
        assert!(!text.contains("hj212_process_"), "{text}");
    }

    /// Label values from the gateway's vocabularies are snake_case words,
    /// dot-separated where the vocabulary itself namespaces them (finding codes
    /// `crc.mismatch`, detectors `value.stuck`, consumers `mqtt.merge`): never
    /// spaces or capitals. Free text from the config (upstream names, witness
    /// URLs), the build version and bucket bounds are what they are.
    #[test]
    fn label_values_are_snake_case() {
        let m = Metrics::new();
        m.upstream("platform-1");
        let mut e = Exposition::new();
        m.render(&mut e);
        let text = e.finish();
        let word = |v: &str| {
            v.split('.').all(|w| {
                !w.is_empty()
                    && w.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
        };
        let mut checked = 0;
        for (series, _) in parse_exposition(&text).unwrap() {
            let Some((_, labels)) = series.split_once('{') else {
                continue;
            };
            for (k, v) in split_labels(labels.trim_end_matches('}')).unwrap() {
                if ["le", "version", "upstream", "witness"].contains(&k.as_str()) {
                    continue;
                }
                assert!(word(&v), "{series}: {k}={v:?} is not snake_case");
                checked += 1;
            }
        }
        assert!(checked > 100, "{checked}");
        assert!(text.contains("hj212_sessions_closed_total{reason=\"peer_closed\"}"));
    }

    #[test]
    fn the_checker_rejects_malformed_expositions() {
        let bad = [
            "x 1\n",
            "# HELP x h\n# TYPE x counter\nx{a=1} 1\n",
            "# HELP x h\n# TYPE x counter\nx one\n",
            "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 0\nh_count 1\n",
            "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0\nh_count 1\n",
        ];
        for b in bad {
            assert!(parse_exposition(b).is_err(), "{b}");
        }
    }
}
