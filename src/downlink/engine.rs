//! The per-session downlink state machine, sans-IO.
//!
//! Requests, device frames and `now` go in; bytes to send and steps for the
//! requester come out. The session task drives it (logs and writes what it
//! is told to send, delivers the steps after its commit), so there is no
//! extra task per session and the flow is unit-tested without sockets.
//!
//! One exchange at a time, as the device handles them (HJ 212-2017 §6.2):
//! send, wait `over_time` for the 9011, send the same bytes again (same QN)
//! up to `re_count` times, then give up. After 9011 QnRtn=1 the device
//! executes: uploads with the request's QN (1011, 1061 answers) and, for a
//! history fetch, uploads of the fetched CN belong to the exchange; each one
//! restarts the `exec_timeout` wait for the next packet or the 9012.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::Frame;
use crate::store::ExchangeOutcome;

/// Timers and retry count, from `[downlink]`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Wait for the 9011.
    pub over_time: Duration,
    /// Resends without a 9011 before giving up.
    pub re_count: u32,
    /// Wait for the next upload or the 9012 once the device accepted.
    pub exec_timeout: Duration,
}

/// A step of an exchange, for its requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The request was logged and written to the device.
    Sent {
        /// Its QN.
        qn: String,
        /// Its CN.
        cn: u16,
        /// 1 for the first send, then 2.. for resends.
        attempt: u32,
    },
    /// The device's 9011.
    QnRtn {
        /// QnRtn (100 when missing or not a number).
        code: u16,
        /// The device's frame, byte-exact.
        raw: Bytes,
    },
    /// An upload belonging to the exchange.
    Upload {
        /// Its CN.
        cn: String,
        /// Its QN.
        qn: String,
        /// Its CP text (decrypted for 2025 devices).
        cp: String,
        /// The device's frame, byte-exact.
        raw: Bytes,
    },
    /// The device's 9012.
    ExeRtn {
        /// ExeRtn (100 when missing or not a number).
        code: u16,
        /// The device's frame, byte-exact.
        raw: Bytes,
    },
    /// The device's 9013: the request was a notify (e.g. 2012 stop real-time
    /// data), which this answer completes.
    NotifyAck {
        /// The device's frame, byte-exact.
        raw: Bytes,
    },
    /// The exchange is over.
    Done(Outcome),
}

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 9012 ExeRtn=1 (or QnRtn=1 and the data, for a device that sends no 9012).
    Success,
    /// 9011 with QnRtn other than 1.
    Refused(u16),
    /// 9012 with ExeRtn other than 1.
    Failed(u16),
    /// No 9011 after this many sends.
    NoReply {
        /// Sends, the first included.
        sends: u32,
    },
    /// Accepted, but no further packet or 9012 within `exec_timeout`.
    ExecTimeout,
    /// The device has no live session.
    Offline,
    /// The device's queue is full.
    Busy,
    /// The session ended before the exchange did.
    Closed,
    /// The request could not be built (e.g. a 2025 device without a key).
    Invalid(String),
}

impl Outcome {
    /// Which outcome this is, without its details.
    pub fn kind(&self) -> ExchangeOutcome {
        match self {
            Outcome::Success => ExchangeOutcome::Success,
            Outcome::Refused(_) => ExchangeOutcome::Refused,
            Outcome::Failed(_) => ExchangeOutcome::Failed,
            Outcome::NoReply { .. } => ExchangeOutcome::NoReply,
            Outcome::ExecTimeout => ExchangeOutcome::ExecTimeout,
            Outcome::Offline => ExchangeOutcome::Offline,
            Outcome::Busy => ExchangeOutcome::Busy,
            Outcome::Closed => ExchangeOutcome::Closed,
            Outcome::Invalid(_) => ExchangeOutcome::Invalid,
        }
    }

    /// Stable name used on the control socket, in the exchanges table and in
    /// metrics: the [`ExchangeOutcome::as_str`] of its [`kind`](Outcome::kind).
    pub fn name(&self) -> &'static str {
        self.kind().as_str()
    }
}

/// What the session must do.
#[derive(Debug)]
pub enum Out<T> {
    /// Log (direction out, peer = `origin`) and write these bytes.
    Send {
        /// The request.
        bytes: Bytes,
        /// Who asked (the log record's peer).
        origin: String,
    },
    /// Give `Event` to the requester `T`.
    Event(T, Event),
}

/// What an inbound frame was to the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// An upload answering a history fetch (2031/2041/2051/2061).
    pub history: bool,
    /// Who asked.
    pub origin: String,
    /// The request's QN.
    pub qn: String,
}

/// A request ready to send.
#[derive(Debug)]
pub struct Begin<T> {
    /// Where the steps go.
    pub tag: T,
    /// Who asked (log peer).
    pub origin: String,
    /// The device's MN (replies from other MNs on the connection do not match).
    pub mn: String,
    /// The request's QN.
    pub qn: String,
    /// The request's CN.
    pub cn: u16,
    /// The request as written.
    pub bytes: Bytes,
}

struct Exchange<T> {
    tag: T,
    origin: String,
    mn: String,
    qn: String,
    cn: u16,
    bytes: Bytes,
    sends: u32,
    accepted: bool,
    deadline: Instant,
}

impl<T: Clone> Exchange<T> {
    /// Puts the request on the wire (again: a resend is the same bytes, same
    /// QN) and tells the requester which attempt it is.
    fn send(&self, out: &mut Vec<Out<T>>) {
        out.push(Out::Send {
            bytes: self.bytes.clone(),
            origin: self.origin.clone(),
        });
        out.push(Out::Event(
            self.tag.clone(),
            Event::Sent {
                qn: self.qn.clone(),
                cn: self.cn,
                attempt: self.sends,
            },
        ));
    }
}

/// The state machine. Holds at most one exchange.
pub struct Engine<T> {
    timing: Timing,
    current: Option<Exchange<T>>,
}

/// History fetches: their data uploads carry new QNs and the fetched CN.
pub fn is_history(cn: u16) -> bool {
    matches!(cn, 2031 | 2041 | 2051 | 2061)
}

fn code(f: &Frame, key: &str) -> u16 {
    f.param(key).and_then(|v| v.parse().ok()).unwrap_or(100)
}

impl<T: Clone> Engine<T> {
    /// An idle engine.
    pub fn new(timing: Timing) -> Self {
        Engine {
            timing,
            current: None,
        }
    }

    /// No exchange in progress.
    pub fn is_idle(&self) -> bool {
        self.current.is_none()
    }

    /// Origin of the exchange in progress.
    pub fn current_origin(&self) -> Option<&str> {
        self.current.as_ref().map(|x| x.origin.as_str())
    }

    /// When [`Engine::on_timer`] must run next.
    pub fn deadline(&self) -> Option<Instant> {
        self.current.as_ref().map(|x| x.deadline)
    }

    /// Starts an exchange (the engine must be idle; a busy engine refuses it
    /// with `Done(Busy)`).
    pub fn begin(&mut self, b: Begin<T>, now: Instant, out: &mut Vec<Out<T>>) {
        if self.current.is_some() {
            out.push(Out::Event(b.tag, Event::Done(Outcome::Busy)));
            return;
        }
        let x = Exchange {
            tag: b.tag,
            origin: b.origin,
            mn: b.mn,
            qn: b.qn,
            cn: b.cn,
            bytes: b.bytes,
            sends: 1,
            accepted: false,
            deadline: now + self.timing.over_time,
        };
        x.send(out);
        self.current = Some(x);
    }

    /// A frame the device sent (accepted by the gateway). Returns whether it
    /// belongs to the exchange.
    pub fn on_frame(&mut self, f: &Frame, now: Instant, out: &mut Vec<Out<T>>) -> Option<Matched> {
        let x = self.current.as_mut()?;
        if f.mn() != Some(x.mn.as_str()) {
            return None;
        }
        let same = f.qn() == Some(x.qn.as_str());
        let cn = f.cn_num();
        let matched = Matched {
            history: false,
            origin: x.origin.clone(),
            qn: x.qn.clone(),
        };
        match cn {
            Some(9011) if same => {
                let c = code(f, "QnRtn");
                out.push(Out::Event(
                    x.tag.clone(),
                    Event::QnRtn {
                        code: c,
                        raw: f.raw.clone(),
                    },
                ));
                if c == 1 {
                    x.accepted = true;
                    x.deadline = now + self.timing.exec_timeout;
                } else {
                    self.finish(Outcome::Refused(c), out);
                }
                Some(matched)
            }
            Some(9012) if same => {
                let c = code(f, "ExeRtn");
                out.push(Out::Event(
                    x.tag.clone(),
                    Event::ExeRtn {
                        code: c,
                        raw: f.raw.clone(),
                    },
                ));
                let o = if c == 1 {
                    Outcome::Success
                } else {
                    Outcome::Failed(c)
                };
                self.finish(o, out);
                Some(matched)
            }
            Some(9013) if same => {
                out.push(Out::Event(
                    x.tag.clone(),
                    Event::NotifyAck { raw: f.raw.clone() },
                ));
                self.finish(Outcome::Success, out);
                Some(matched)
            }
            Some(9011..=9014) => None,
            Some(c) if same || (x.accepted && is_history(x.cn) && c == x.cn) => {
                let history = is_history(x.cn) && c == x.cn;
                // Some devices skip the 9011 and go straight to the data.
                x.accepted = true;
                x.deadline = now + self.timing.exec_timeout;
                let cp = f.cp.map(|s| f.text(s).into_owned()).unwrap_or_default();
                out.push(Out::Event(
                    x.tag.clone(),
                    Event::Upload {
                        cn: f.cn().unwrap_or("").to_owned(),
                        qn: f.qn().unwrap_or("").to_owned(),
                        cp,
                        raw: f.raw.clone(),
                    },
                ));
                Some(Matched { history, ..matched })
            }
            _ => None,
        }
    }

    /// Resends or gives up when the deadline has passed.
    pub fn on_timer(&mut self, now: Instant, out: &mut Vec<Out<T>>) {
        let Some(x) = self.current.as_mut() else {
            return;
        };
        if now < x.deadline {
            return;
        }
        if x.accepted {
            self.finish(Outcome::ExecTimeout, out);
        } else if x.sends <= self.timing.re_count {
            x.sends += 1;
            x.deadline = now + self.timing.over_time;
            x.send(out);
        } else {
            let sends = x.sends;
            self.finish(Outcome::NoReply { sends }, out);
        }
    }

    /// Ends the exchange in progress (the session is closing).
    pub fn abort(&mut self, o: Outcome, out: &mut Vec<Out<T>>) {
        self.finish(o, out);
    }

    fn finish(&mut self, o: Outcome, out: &mut Vec<Out<T>>) {
        if let Some(x) = self.current.take() {
            out.push(Out::Event(x.tag, Event::Done(o)));
        }
    }
}

impl<T> std::fmt::Debug for Engine<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("busy", &self.current.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::reply::{self, Target};
    use crate::protocol::{Dialect, Options};

    const MN: &str = "010000A8900016F000169DC0";
    const QN: &str = "20240601090000001";

    fn t() -> Target<'static> {
        Target {
            dialect: Dialect::V2017,
            st: "32",
            pw: "123456",
            mn: MN,
        }
    }

    fn dec(b: &[u8]) -> Frame {
        let now = chrono::DateTime::parse_from_rfc3339("2024-06-01T01:00:00Z")
            .unwrap()
            .to_utc();
        crate::protocol::decode(Bytes::copy_from_slice(b), &Options::new(now), &())
    }

    fn engine() -> Engine<u8> {
        Engine::new(Timing {
            over_time: Duration::from_secs(5),
            re_count: 2,
            exec_timeout: Duration::from_secs(30),
        })
    }

    fn begin(e: &mut Engine<u8>, cn: u16, bytes: Bytes, now: Instant) -> Vec<Out<u8>> {
        let mut out = Vec::new();
        e.begin(
            Begin {
                tag: 7,
                origin: "operator".into(),
                mn: MN.into(),
                qn: QN.into(),
                cn,
                bytes,
            },
            now,
            &mut out,
        );
        out
    }

    fn events(out: Vec<Out<u8>>) -> Vec<Event> {
        out.into_iter()
            .filter_map(|o| match o {
                Out::Event(7, e) => Some(e),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn resends_same_bytes_re_count_times_then_gives_up() {
        let mut e = engine();
        let t0 = Instant::now();
        let req = reply::get_time(t(), QN, None);
        let out = begin(&mut e, 1011, req.clone(), t0);
        assert!(matches!(&out[0], Out::Send { bytes, .. } if *bytes == req));
        let mut sends = 1;
        let mut now = t0;
        let mut done = None;
        for _ in 0..10 {
            now = e.deadline().unwrap();
            let mut out = Vec::new();
            e.on_timer(now, &mut out);
            for o in out {
                match o {
                    Out::Send { bytes, .. } => {
                        assert_eq!(bytes, req, "same QN, same bytes");
                        sends += 1;
                    }
                    Out::Event(_, Event::Done(o)) => done = Some(o),
                    Out::Event(..) => {}
                }
            }
            if done.is_some() {
                break;
            }
        }
        assert_eq!(sends, 3, "first send + re_count resends");
        assert_eq!(done, Some(Outcome::NoReply { sends: 3 }));
        assert!(e.is_idle());
        assert_eq!(now, t0 + Duration::from_secs(15));
    }

    #[test]
    fn get_time_flow_and_history_uploads_match() {
        let mut e = engine();
        let now = Instant::now();
        begin(&mut e, 1011, reply::get_time(t(), QN, None), now);
        let mut out = Vec::new();
        // A stranger's 9011 and an unrelated upload do not match.
        assert!(
            e.on_frame(
                &dec(&reply::qn_rtn(t(), "20240601090000999", 1)),
                now,
                &mut out
            )
            .is_none()
        );
        assert!(
            e.on_frame(&dec(&reply::qn_rtn(t(), QN, 1)), now, &mut out)
                .is_some()
        );
        let up = reply::envelope(
            format!(
                "QN={QN};ST=32;CN=1011;PW=123456;MN={MN};Flag=4;CP=&&SystemTime=20240601090000&&"
            )
            .as_bytes(),
        );
        assert!(e.on_frame(&dec(&up), now, &mut out).is_some());
        assert!(
            e.on_frame(&dec(&reply::exe_rtn(t(), QN, 1)), now, &mut out)
                .is_some()
        );
        let ev = events(out);
        assert!(matches!(ev[0], Event::QnRtn { code: 1, .. }));
        assert!(matches!(&ev[1], Event::Upload { cp, .. } if cp == "SystemTime=20240601090000"));
        assert_eq!(ev[2..].len(), 2);
        assert_eq!(ev[3], Event::Done(Outcome::Success));
        assert!(e.is_idle());

        // History: uploads of the fetched CN with new QNs belong, after QnRtn=1 only.
        begin(
            &mut e,
            2061,
            reply::history(t(), QN, 2061, "20240601000000", "20240601010000"),
            now,
        );
        let data = reply::envelope(
            format!("QN=20240601090000500;ST=32;CN=2061;PW=123456;MN={MN};Flag=4;CP=&&DataTime=20240601000000;a21026-Avg=1&&")
                .as_bytes(),
        );
        let mut out = Vec::new();
        assert!(
            e.on_frame(&dec(&data), now, &mut out).is_none(),
            "not yet accepted"
        );
        e.on_frame(&dec(&reply::qn_rtn(t(), QN, 1)), now, &mut out);
        let m = e.on_frame(&dec(&data), now, &mut out).unwrap();
        assert!(m.history);
        // The exec timer restarts with each packet.
        assert_eq!(e.deadline(), Some(now + Duration::from_secs(30)));
        e.on_timer(now + Duration::from_secs(30), &mut out);
        assert_eq!(events(out).last(), Some(&Event::Done(Outcome::ExecTimeout)));
    }

    #[test]
    fn refusal_and_failure_end_the_exchange() {
        let mut e = engine();
        let now = Instant::now();
        begin(
            &mut e,
            3011,
            reply::request(t(), QN, 3011, "PolId=a21026"),
            now,
        );
        let mut out = Vec::new();
        e.on_frame(&dec(&reply::qn_rtn(t(), QN, 2)), now, &mut out);
        assert_eq!(events(out).last(), Some(&Event::Done(Outcome::Refused(2))));
        begin(
            &mut e,
            3011,
            reply::request(t(), QN, 3011, "PolId=a21026"),
            now,
        );
        let mut out = Vec::new();
        e.on_frame(&dec(&reply::qn_rtn(t(), QN, 1)), now, &mut out);
        e.on_frame(&dec(&reply::exe_rtn(t(), QN, 5)), now, &mut out);
        assert_eq!(events(out).last(), Some(&Event::Done(Outcome::Failed(5))));
        // A notify (2012 stop real-time data) is complete with the device's 9013.
        begin(&mut e, 2012, reply::request(t(), QN, 2012, ""), now);
        let mut out = Vec::new();
        let ack = reply::envelope(
            format!("QN={QN};ST=91;CN=9013;PW=123456;MN={MN};Flag=4;CP=&&&&").as_bytes(),
        );
        assert!(e.on_frame(&dec(&ack), now, &mut out).is_some());
        assert_eq!(events(out).last(), Some(&Event::Done(Outcome::Success)));
        assert!(e.is_idle());
        // A busy engine refuses a second exchange instead of losing the first.
        begin(&mut e, 1011, reply::get_time(t(), QN, None), now);
        let out = begin(&mut e, 1011, reply::get_time(t(), QN, None), now);
        assert!(matches!(&out[0], Out::Event(7, Event::Done(Outcome::Busy))));
    }
}
