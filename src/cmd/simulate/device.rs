//! One simulated data logger: connect, send on schedule, match acks, answer
//! platform requests, reconnect.
//!
//! A device is one tokio task with a few hundred bytes of state. Frames are
//! built straight into the device's output buffer and written with
//! `try_write`, so the common path allocates nothing beyond decoding the ack.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep_until};

use super::Shared;
use super::fleet::{self, Edition, Kind, Logger, Series};
use crate::protocol::build::{self, Civil, Head};
use crate::protocol::crc::CrcVariant;
use crate::protocol::crypt::{self, Key};
use crate::protocol::framing::{self, Cut, FramerConfig};
use crate::protocol::reply::{self, Target};
use crate::protocol::{Frame, Options};

/// Stop producing new frames while this much is still unwritten.
const OUT_CAP: usize = 256 * 1024;
/// Drop an incomplete inbound frame beyond this size (the gateway sends small replies).
const IN_CAP: usize = 16 * 1024;
/// Most frames one history request is answered with.
const HISTORY_CAP: i64 = 288;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// What a data upload carries.
#[derive(Clone, Copy)]
enum Content {
    /// A 2011 measurement (`upload`: sent; otherwise only into the logger).
    Realtime,
    /// The logger's minute (0), hour (1) or day (2) closing.
    Close(usize),
    /// A record drawn for a history request or a burst (consistent in itself).
    Drawn,
}

/// A frame waiting for its ack.
struct Pending {
    qn: [u8; 17],
    /// When it was due: latency is measured from here (coordinated omission).
    due: Instant,
    /// When it was actually queued: the ack timeout runs from here.
    sent: Instant,
}

/// Why a session ended.
enum Outcome {
    /// The run is over.
    Ended,
    /// A reconnect storm: reconnect at once.
    Storm,
    /// The connection failed or the gateway closed it.
    Failed,
}

/// One device's state.
pub struct Device {
    index: u64,
    edition: Edition,
    kind: Kind,
    mn: String,
    key: Option<Key>,
    src: Option<Ipv4Addr>,
    rng: u64,
    /// Device clock minus wall clock, set by a 1012 request.
    clock_offset_ms: i64,
    last_qn_ms: i64,
    /// The newest QN sent: an ack for an older QN that is no longer pending
    /// came after its timeout.
    last_qn: [u8; 17],
    /// Real-time interval, simulated time.
    interval: Duration,
    /// Next real-time tick, simulated unix ns.
    next_rt: i64,
    /// Next minute / hour / day boundary of the simulated clock, unix ms.
    next_min: i64,
    next_hour: i64,
    next_day: i64,
    /// The data logger's running aggregates.
    logger: Logger,
    /// The last hour closed (DataTime ms and its CP factor groups), resent by
    /// a burst for that hour; only kept when bursts are planned.
    last_hour: Option<(i64, Vec<u8>)>,
    next_hb: Instant,
    burst_idx: usize,
    storm_idx: usize,
    /// Set when a storm dropped the connection: time-to-recover is measured from it.
    storm_at: Option<Instant>,
    out: Vec<u8>,
    pending: VecDeque<Pending>,
}

impl Device {
    /// Device `index` of the fleet (`pos` is its position in this process).
    pub fn new(sh: &Shared, index: u64, pos: u64) -> Device {
        let p = &sh.plan;
        let edition = fleet::pick(&p.editions, index);
        let kind = fleet::pick(&p.kinds, index / fleet::weight(&p.editions));
        let n = p.devices.max(1);
        // Real-time sends are spread evenly over one interval after the ramp,
        // in simulated time (with --speedup an interval passes faster).
        let phase = p.interval.mul_f64(pos as f64 / n as f64).as_nanos() as i64;
        let first = sh.sim_ns(sh.start + p.ramp) + phase;
        Device {
            index,
            edition,
            kind,
            mn: fleet::mn(&p.prefix, edition, index),
            key: (edition == Edition::V2025Encrypted).then(|| fleet::key(p.seed, index)),
            src: (!p.source_ips.is_empty())
                .then(|| p.source_ips[(pos % p.source_ips.len() as u64) as usize]),
            rng: p.seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03),
            clock_offset_ms: 0,
            last_qn_ms: 0,
            last_qn: [b'0'; 17],
            interval: p.interval,
            next_rt: first,
            next_min: sh.first_minute_ms,
            next_hour: sh.first_hour_ms,
            next_day: sh.first_day_ms,
            logger: Logger::new(kind, edition),
            last_hour: None,
            // Heartbeats are spread over their own period.
            next_hb: sh.start
                + p.ramp
                + p.heartbeat
                    .unwrap_or_default()
                    .mul_f64((pos as f64 + 1.0) / n as f64),
            burst_idx: 0,
            storm_idx: 0,
            storm_at: None,
            out: Vec::new(),
            pending: VecDeque::new(),
        }
    }

    /// Runs the device until the end of the run.
    pub async fn run(mut self, sh: Arc<Shared>, pos: u64) {
        let p = &sh.plan;
        let n = p.devices.max(1);
        sleep_until(sh.start + p.ramp.mul_f64(pos as f64 / n as f64)).await;
        let mut connected_once = false;
        let mut backoff = Duration::from_millis(200);
        loop {
            if Instant::now() >= sh.end {
                break;
            }
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), connect(p.target, self.src))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        sh.stats.connect_errors.fetch_add(1, Relaxed);
                        sh.note_error(|| format!("device {}: connect: {e}", self.mn));
                        sleep_until((Instant::now() + backoff).min(sh.end)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    Err(_) => {
                        sh.stats.connect_errors.fetch_add(1, Relaxed);
                        sh.note_error(|| format!("device {}: connect timed out", self.mn));
                        continue;
                    }
                };
            backoff = Duration::from_millis(200);
            if connected_once {
                sh.stats.reconnects.fetch_add(1, Relaxed);
            }
            connected_once = true;
            if let Some(at) = self.storm_at {
                sh.stats
                    .storm_connect_us
                    .fetch_max(at.elapsed().as_micros() as u64, Relaxed);
            }
            sh.stats.connected.fetch_add(1, Relaxed);
            let outcome = self.session(&sh, stream).await;
            sh.stats.connected.fetch_sub(1, Relaxed);
            match outcome {
                Outcome::Ended => {
                    sh.stats.connected_at_end.fetch_add(1, Relaxed);
                    break;
                }
                Outcome::Storm => self.storm_at = Some(Instant::now()),
                Outcome::Failed => {
                    sh.stats.connection_errors.fetch_add(1, Relaxed);
                    self.abandon(&sh);
                    sleep_until((Instant::now() + backoff).min(sh.end)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn session(&mut self, sh: &Shared, stream: TcpStream) -> Outcome {
        let p = &sh.plan;
        let _ = stream.set_nodelay(true);
        self.out.clear();
        let mut inbuf: Vec<u8> = Vec::new();
        let sleep = sleep_until(Instant::now());
        tokio::pin!(sleep);
        let mut draining: Option<(Outcome, Instant)> = None;
        loop {
            let now = Instant::now();
            if draining.is_none() {
                if now >= sh.end {
                    draining = Some((Outcome::Ended, now + p.ack_timeout));
                } else if p
                    .storms
                    .get(self.storm_idx)
                    .is_some_and(|&at| now >= sh.start + at)
                {
                    self.storm_idx += 1;
                    draining = Some((Outcome::Storm, now + p.ack_timeout));
                } else {
                    self.produce(sh, now);
                }
            }
            self.expire(sh, now);
            if let Some((_, deadline)) = &draining {
                if (self.pending.is_empty() && self.out.is_empty()) || now >= *deadline {
                    self.abandon(sh);
                    return draining.map(|d| d.0).unwrap_or(Outcome::Ended);
                }
            }
            if !self.out.is_empty() {
                match stream.try_write(&self.out) {
                    Ok(n) => {
                        if n == self.out.len() {
                            self.out.clear();
                        } else {
                            self.out.drain(..n);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        sh.note_error(|| format!("device {}: write: {e}", self.mn));
                        return Outcome::Failed;
                    }
                }
            }
            let wake = self.next_wake(sh, draining.as_ref().map(|d| d.1));
            sleep.as_mut().reset(wake);
            tokio::select! {
                biased;
                r = stream.readable() => {
                    if let Err(e) = r {
                        sh.note_error(|| format!("device {}: read: {e}", self.mn));
                        return Outcome::Failed;
                    }
                    let mut buf = [0u8; 4096];
                    match stream.try_read(&mut buf) {
                        Ok(0) => {
                            sh.note_error(|| format!("device {}: gateway closed the connection", self.mn));
                            return Outcome::Failed;
                        }
                        Ok(n) => self.on_bytes(sh, &buf[..n], &mut inbuf),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            sh.note_error(|| format!("device {}: read: {e}", self.mn));
                            return Outcome::Failed;
                        }
                    }
                }
                r = stream.writable(), if !self.out.is_empty() => {
                    if r.is_err() {
                        return Outcome::Failed;
                    }
                }
                () = &mut sleep => {}
            }
        }
    }

    /// The earliest instant something is due.
    fn next_wake(&self, sh: &Shared, drain_deadline: Option<Instant>) -> Instant {
        let p = &sh.plan;
        let mut w = sh.end + p.ack_timeout + Duration::from_secs(1);
        let mut at = |t: Instant| w = w.min(t);
        if let Some(f) = self.pending.front() {
            at(f.sent + p.ack_timeout);
        }
        if let Some(d) = drain_deadline {
            at(d);
            return w;
        }
        at(sh.end);
        if let Some(&s) = p.storms.get(self.storm_idx) {
            at(sh.start + s);
        }
        if self.out.len() >= OUT_CAP {
            return w;
        }
        if !p.idle {
            let aggregates = p.minute || p.hour || p.day;
            if p.realtime || aggregates {
                at(sh.at_sim_ns(self.next_rt));
            }
            if aggregates {
                at(sh.at_sim(self.next_min));
            }
            if p.hour || p.day {
                at(sh.at_sim(self.next_hour));
            }
            if p.day {
                at(sh.at_sim(self.next_day));
            }
            if let Some(&b) = p.bursts.get(self.burst_idx) {
                at(sh.start + b);
            }
        }
        if p.heartbeat.is_some() && self.edition != Edition::V2005 {
            at(self.next_hb);
        }
        w
    }

    /// Queues every frame that is due, in the order of the device clock. At
    /// a boundary the minute closes before the hour and the hour before the
    /// day (each is made of the one below), and all of them before the sample
    /// stamped on the boundary, which belongs to the next interval.
    fn produce(&mut self, sh: &Shared, now: Instant) {
        let p = &sh.plan;
        if !p.idle {
            let aggregates = p.minute || p.hour || p.day;
            let now_ns = sh.sim_ns(now);
            let now_ms = now_ns.div_euclid(1_000_000);
            let me = p.minute_every.as_millis() as i64;
            while self.out.len() < OUT_CAP {
                let mut due: Option<(i64, u8)> = None;
                let mut consider = |ns: i64, what: u8, on: bool| {
                    if on && ns <= now_ns && due.is_none_or(|d| (ns, what) < d) {
                        due = Some((ns, what));
                    }
                };
                let ms = 1_000_000;
                consider(self.next_min * ms, 0, aggregates && self.next_min <= now_ms);
                consider(
                    self.next_hour * ms,
                    1,
                    (p.hour || p.day) && self.next_hour <= now_ms,
                );
                consider(self.next_day * ms, 2, p.day && self.next_day <= now_ms);
                consider(self.next_rt, 3, p.realtime || aggregates);
                let Some((at_ns, what)) = due else { break };
                let at = sh.at_sim_ns(at_ns);
                match what {
                    0 => {
                        let dt = self.next_min - me;
                        self.upload(sh, 2051, at, dt, Content::Close(0), p.minute);
                        self.next_min += me;
                    }
                    1 => {
                        let dt = self.next_hour - HOUR_MS;
                        self.upload(sh, 2061, at, dt, Content::Close(1), p.hour);
                        self.next_hour += HOUR_MS;
                    }
                    2 => {
                        let dt = self.next_day - DAY_MS;
                        self.upload(sh, 2031, at, dt, Content::Close(2), p.day);
                        self.next_day += DAY_MS;
                    }
                    _ => {
                        let dt = round_s(at_ns.div_euclid(1_000_000));
                        self.upload(sh, 2011, at, dt, Content::Realtime, p.realtime);
                        self.next_rt += (self.interval.as_nanos() as i64).max(1);
                    }
                }
            }
            if let Some(&b) = p.bursts.get(self.burst_idx) {
                let due = sh.start + b;
                if due <= now && self.out.len() < OUT_CAP {
                    // An artificial top of the hour: last full hour's data, all devices at once.
                    let hour = sh.wall_ms(due).div_euclid(HOUR_MS) * HOUR_MS;
                    self.data(sh, 2061, due, hour - HOUR_MS, Content::Drawn);
                    self.burst_idx += 1;
                }
            }
        }
        if let Some(hb) = p.heartbeat {
            if self.edition != Edition::V2005 && self.next_hb <= now && self.out.len() < OUT_CAP {
                let due = self.next_hb;
                self.heartbeat(sh, due);
                self.next_hb = (due + hb).max(now);
            }
        }
    }

    /// A measurement or a closing: sent as a data upload when `upload`, else
    /// only kept by the logger.
    fn upload(
        &mut self,
        sh: &Shared,
        cn: u16,
        due: Instant,
        data_ms: i64,
        c: Content,
        upload: bool,
    ) {
        if upload {
            self.data(sh, cn, due, data_ms, c);
            return;
        }
        let p = &sh.plan;
        let mut scratch = Vec::new();
        match c {
            Content::Realtime => self.logger.realtime(
                &mut scratch,
                false,
                p.seed,
                self.index,
                &mut self.rng,
                0,
                p.frame_size,
            ),
            Content::Close(lv) => self.logger.close(
                &mut scratch,
                false,
                lv,
                close_secs(p, lv),
                p.seed,
                self.index,
                &mut self.rng,
                0,
                p.frame_size,
            ),
            Content::Drawn => {}
        }
    }

    fn flag(&self, ack: bool) -> Option<u8> {
        let a = u8::from(ack);
        match self.edition {
            Edition::V2005 => ack.then_some(1),
            Edition::V2017 => Some(4 | a),
            Edition::V2025 | Edition::V2025Encrypted => Some(8 | a),
        }
    }

    /// A fresh QN from the device clock, strictly increasing per device so
    /// acks can be matched.
    fn next_qn(&mut self, sh: &Shared) -> [u8; 17] {
        let ms = (sh.wall_ms(Instant::now()) + self.clock_offset_ms).max(self.last_qn_ms + 1);
        self.last_qn_ms = ms;
        self.last_qn = Civil::from_unix_ms(ms, sh.plan.tz_offset_s).qn();
        self.last_qn
    }

    /// Queues a data upload (`cn` 2011/2051/2061/2031) for DataTime `data_ms`.
    fn data(&mut self, sh: &Shared, cn: u16, due: Instant, data_ms: i64, content: Content) {
        let p = &sh.plan;
        let qn = self.next_qn(sh);
        let head = Head {
            qn: (self.edition != Edition::V2005 || p.ack).then_some(&qn[..]),
            st: self.kind.st(),
            cn,
            pw: &p.pw,
            mn: &self.mn,
            flag: self.flag(p.ack),
            split: None,
        };
        let data_civil = Civil::from_unix_ms(data_ms + self.clock_offset_ms, p.tz_offset_s);
        let start = self.out.len();
        let (edition, kind, index) = (self.edition, self.kind, self.index);
        // A burst resends the hour closed last if it is the one it names.
        let resend = match (content, &self.last_hour) {
            (Content::Drawn, Some((t, groups))) if cn == 2061 && *t == data_ms => {
                Some(groups.clone())
            }
            _ => None,
        };
        // Encrypted frames may be drawn again (below): the logger as it was.
        let saved = self.key.is_some().then(|| self.logger.clone());
        let mut groups_at = 0..0;
        for attempt in 0..8 {
            let rng = &mut self.rng;
            let logger = &mut self.logger;
            let cp = build::device_frame(&mut self.out, &head, self.key.as_ref(), |b| {
                b.extend_from_slice(b"DataTime=");
                data_civil.put_n14(b);
                let from = b.len();
                match (content, &resend) {
                    (_, Some(groups)) => b.extend_from_slice(groups),
                    (Content::Realtime, _) => {
                        logger.realtime(b, true, p.seed, index, rng, start, p.frame_size)
                    }
                    (Content::Close(lv), _) => logger.close(
                        b,
                        true,
                        lv,
                        close_secs(p, lv),
                        p.seed,
                        index,
                        rng,
                        start,
                        p.frame_size,
                    ),
                    (Content::Drawn, _) => fleet::put_factors(
                        b,
                        kind,
                        edition,
                        Series::Aggregate {
                            secs: close_secs(p, history_level(cn)),
                        },
                        p.seed,
                        index,
                        rng,
                        start,
                        p.frame_size,
                    ),
                }
                groups_at = from - start..b.len() - start;
            });
            // Ciphertext that happens to look like text would be read as
            // plaintext (p ~ 1e-7); draw other values instead.
            if self.key.is_none() || attempt == 7 || crypt::sniff(&self.out[cp]).is_some() {
                break;
            }
            self.out.truncate(start);
            if let Some(l) = &saved {
                self.logger = l.clone();
            }
        }
        if matches!(content, Content::Close(1)) && !p.bursts.is_empty() {
            // The plaintext groups: encrypted frames carry ciphertext in `out`,
            // so they are rebuilt from the logger only for clear devices.
            if self.key.is_none() {
                let g = self.out[start + groups_at.start..start + groups_at.end].to_vec();
                self.last_hour = Some((data_ms, g));
            }
        }
        sh.stats.sent.fetch_add(1, Relaxed);
        sh.stats
            .bytes_sent
            .fetch_add((self.out.len() - start) as u64, Relaxed);
        if let Some(at) = self.storm_at.take() {
            sh.stats
                .storm_send_us
                .fetch_max(at.elapsed().as_micros() as u64, Relaxed);
        }
        if p.ack {
            self.pending.push_back(Pending {
                qn,
                due,
                sent: Instant::now(),
            });
        }
    }

    /// Queues a 9015 heartbeat (2017/2025 only).
    fn heartbeat(&mut self, sh: &Shared, due: Instant) {
        let p = &sh.plan;
        let qn = self.next_qn(sh);
        let head = Head {
            qn: Some(&qn),
            st: self.kind.st(),
            cn: 9015,
            pw: &p.pw,
            mn: &self.mn,
            flag: self.flag(p.ack),
            split: None,
        };
        let start = self.out.len();
        build::device_frame(&mut self.out, &head, None, |_| {});
        sh.stats.sent.fetch_add(1, Relaxed);
        sh.stats
            .bytes_sent
            .fetch_add((self.out.len() - start) as u64, Relaxed);
        if p.ack {
            self.pending.push_back(Pending {
                qn,
                due,
                sent: Instant::now(),
            });
        }
    }

    /// Counts frames whose ack did not come within `--ack-timeout`. Their
    /// latency so far goes into the histogram too (a lower bound), so losses
    /// raise the percentiles instead of vanishing from them.
    fn expire(&mut self, sh: &Shared, now: Instant) {
        while let Some(f) = self.pending.front() {
            if f.sent + sh.plan.ack_timeout > now {
                break;
            }
            sh.record_latency(now.saturating_duration_since(f.due).as_micros() as u64);
            self.pending.pop_front();
            sh.stats.timeouts.fetch_add(1, Relaxed);
        }
    }

    /// Gives up on every pending frame (connection gone or run over).
    fn abandon(&mut self, sh: &Shared) {
        let now = Instant::now();
        for f in self.pending.drain(..) {
            sh.record_latency(now.saturating_duration_since(f.due).as_micros() as u64);
            sh.stats.timeouts.fetch_add(1, Relaxed);
        }
    }

    fn on_bytes(&mut self, sh: &Shared, data: &[u8], inbuf: &mut Vec<u8>) {
        if inbuf.is_empty() {
            let used = self.on_frames(sh, data);
            inbuf.extend_from_slice(&data[used..]);
        } else {
            inbuf.extend_from_slice(data);
            let used = self.on_frames(sh, inbuf);
            inbuf.drain(..used);
        }
        if inbuf.len() > IN_CAP {
            sh.stats.bad_replies.fetch_add(1, Relaxed);
            sh.note_error(|| {
                format!(
                    "device {}: {} bytes without a frame end",
                    self.mn,
                    inbuf.len()
                )
            });
            inbuf.clear();
        }
        if inbuf.is_empty() && inbuf.capacity() > 0 {
            // Idle devices hold no read buffer.
            *inbuf = Vec::new();
        }
    }

    /// Handles every complete frame at the front of `buf`; returns the bytes used.
    fn on_frames(&mut self, sh: &Shared, buf: &[u8]) -> usize {
        let cfg = FramerConfig::default();
        let mut pos = 0;
        while let Some(cut) = framing::cut(&buf[pos..], false, &cfg) {
            match cut {
                Cut::Frame { len, .. } => {
                    let frame = crate::protocol::decode(
                        Bytes::copy_from_slice(&buf[pos..pos + len]),
                        &Options::new(chrono::Utc::now()),
                        &(),
                    );
                    self.on_frame(sh, &frame);
                }
                Cut::Junk { len, reason } => {
                    sh.stats.bad_replies.fetch_add(1, Relaxed);
                    sh.note_error(|| {
                        format!(
                            "device {}: {len} junk bytes from the gateway ({})",
                            self.mn,
                            reason.as_str()
                        )
                    });
                }
            }
            pos += cut.len();
        }
        pos
    }

    fn on_frame(&mut self, sh: &Shared, f: &Frame) {
        // The 2005 data ack (`ST=91;CN=9014;CP=&&QN=..;CN=..&&`) has no MN by
        // design and the decoder reports that as an error, so replies are judged
        // by their CRC and QN; requests by the full validation.
        let is_ack = matches!(f.cn_num(), Some(9013 | 9014));
        let bad = if is_ack {
            f.crc.declared.is_none() || f.crc.variant != CrcVariant::Hj212
        } else {
            f.has_error()
        };
        if bad {
            sh.stats.bad_replies.fetch_add(1, Relaxed);
            sh.note_error(|| {
                format!(
                    "device {}: invalid frame from the gateway: {:?}",
                    self.mn,
                    String::from_utf8_lossy(&f.raw)
                )
            });
            return;
        }
        match f.cn_num() {
            Some(9013 | 9014) => {
                let qn = f.qn().unwrap_or("").as_bytes();
                match self.pending.iter().position(|p| p.qn[..] == *qn) {
                    Some(i) => {
                        let p = self.pending.remove(i).expect("position is in range");
                        let us = p.due.elapsed().as_micros() as u64;
                        sh.record_latency(us);
                        sh.stats.acked.fetch_add(1, Relaxed);
                    }
                    None if qn.len() == 17 && qn <= &self.last_qn[..] => {
                        sh.stats.late_acks.fetch_add(1, Relaxed);
                    }
                    None => {
                        sh.stats.bad_replies.fetch_add(1, Relaxed);
                        sh.note_error(|| {
                            format!("device {}: ack for unknown QN {:?}", self.mn, f.qn())
                        });
                    }
                }
            }
            Some(9011 | 9012 | 9015) => {}
            Some(cn) => self.answer(sh, f, cn),
            None => {
                sh.stats.bad_replies.fetch_add(1, Relaxed);
            }
        }
    }

    /// Answers a platform request the way HJ 212-2017 §6.6 describes:
    /// 9011 (request accepted), the data, 9012 (execution result).
    fn answer(&mut self, sh: &Shared, f: &Frame, cn: u16) {
        let p = &sh.plan;
        sh.stats.requests.fetch_add(1, Relaxed);
        let qn = f.qn().unwrap_or("").to_owned();
        let pw = p.pw.clone();
        let mn = self.mn.clone();
        let t = Target {
            dialect: self.edition.dialect(),
            st: self.kind.st(),
            pw: &pw,
            mn: &mn,
        };
        let tz = p.tz_offset_s;
        let now_ms = sh.wall_ms(Instant::now());
        match cn {
            1011 => {
                self.out.extend_from_slice(&reply::qn_rtn(t, &qn, 1));
                let device_now = Civil::from_unix_ms(now_ms + self.clock_offset_ms, tz);
                let head = Head {
                    qn: Some(qn.as_bytes()),
                    st: self.kind.st(),
                    cn: 1011,
                    pw: &pw,
                    mn: &mn,
                    flag: self.flag(false),
                    split: None,
                };
                build::device_frame(&mut self.out, &head, None, |b| {
                    if let Some(pol) = f.param("PolId") {
                        b.extend_from_slice(b"PolId=");
                        b.extend_from_slice(pol.as_bytes());
                        b.push(b';');
                    }
                    b.extend_from_slice(b"SystemTime=");
                    device_now.put_n14(b);
                });
                self.out.extend_from_slice(&reply::exe_rtn(t, &qn, 1));
            }
            1012 => {
                let new = f
                    .param("SystemTime")
                    .and_then(|s| build::parse_n14(s.as_bytes(), tz));
                self.out.extend_from_slice(&reply::qn_rtn(t, &qn, 1));
                match new {
                    Some(secs) => {
                        self.clock_offset_ms = secs * 1000 - now_ms;
                        self.out.extend_from_slice(&reply::exe_rtn(t, &qn, 1));
                    }
                    None => self.out.extend_from_slice(&reply::exe_rtn(t, &qn, 2)),
                }
            }
            1061 => {
                self.out.extend_from_slice(&reply::qn_rtn(t, &qn, 1));
                let head = Head {
                    qn: Some(qn.as_bytes()),
                    st: self.kind.st(),
                    cn: 1061,
                    pw: &pw,
                    mn: &mn,
                    flag: self.flag(false),
                    split: None,
                };
                let secs = self.interval.as_secs().max(1);
                build::device_frame(&mut self.out, &head, None, |b| {
                    b.extend_from_slice(b"RtdInterval=");
                    build::put_uint(b, secs);
                });
                self.out.extend_from_slice(&reply::exe_rtn(t, &qn, 1));
            }
            1062 => {
                let secs = f
                    .param("RtdInterval")
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|&s| (1..=86_400).contains(&s));
                self.out.extend_from_slice(&reply::qn_rtn(t, &qn, 1));
                match secs {
                    Some(s) => {
                        self.interval = Duration::from_secs(s);
                        self.next_rt = sh.sim_ns(Instant::now()) + self.interval.as_nanos() as i64;
                        self.out.extend_from_slice(&reply::exe_rtn(t, &qn, 1));
                    }
                    None => self.out.extend_from_slice(&reply::exe_rtn(t, &qn, 2)),
                }
            }
            2031 | 2051 | 2061 => {
                let window = f
                    .param("BeginTime")
                    .and_then(|s| build::parse_n14(s.as_bytes(), tz))
                    .zip(
                        f.param("EndTime")
                            .and_then(|s| build::parse_n14(s.as_bytes(), tz)),
                    );
                let Some((begin, end)) = window.filter(|(b, e)| b <= e) else {
                    self.out.extend_from_slice(&reply::qn_rtn(t, &qn, 2));
                    return;
                };
                self.out.extend_from_slice(&reply::qn_rtn(t, &qn, 1));
                let step = match cn {
                    2051 => p.minute_every.as_secs().max(60) as i64,
                    2061 => 3600,
                    _ => 86_400,
                };
                // Periods are aligned to the device's local clock.
                let local = |s: i64| s + i64::from(tz);
                let first = (local(begin) + step - 1).div_euclid(step) * step - i64::from(tz);
                let now = Instant::now();
                let mut ts = first;
                let mut n = 0;
                while ts <= end && n < HISTORY_CAP {
                    self.data(
                        sh,
                        cn,
                        now,
                        ts * 1000 - self.clock_offset_ms,
                        Content::Drawn,
                    );
                    ts += step;
                    n += 1;
                }
                self.out.extend_from_slice(&reply::exe_rtn(t, &qn, 1));
            }
            _ => self.out.extend_from_slice(&reply::qn_rtn(t, &qn, 2)),
        }
    }
}

fn round_s(ms: i64) -> i64 {
    ms.div_euclid(1000) * 1000
}

/// Seconds of a minute (--minute-every), an hour or a day.
fn close_secs(p: &super::Plan, lv: usize) -> u32 {
    match lv {
        0 => p.minute_every.as_secs() as u32,
        1 => 3600,
        _ => 86_400,
    }
}

/// The level of a history CN: 2051 minutes, 2061 hours, 2031 days.
fn history_level(cn: u16) -> usize {
    match cn {
        2051 => 0,
        2061 => 1,
        _ => 2,
    }
}

async fn connect(target: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let sock = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip.into(), 0))?;
    }
    sock.connect(target).await
}
