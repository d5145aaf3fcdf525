//! A session's side of downlink exchanges: building requests in the device's
//! dialect, logging each request before it is written, handing the engine's
//! steps to requesters and recording each exchange's outcome.

use std::time::Instant;

use crate::downlink::engine::{Begin, Engine, Out, Timing};
use crate::downlink::{self as dl, Action, Event, Outcome, Submit};
use crate::ingest::{CloseReason, decode_options, frame_record};
use crate::protocol::{self, reply};
use crate::store::Direction;

use super::conn::DeviceConn;
use super::{DlState, Session, Tag, now_ms};

impl Session {
    /// The downlink state, allocated on first use.
    pub(super) fn dl_state(&mut self) -> &mut DlState {
        let c = &self.shared.cfg.downlink;
        let timing = Timing {
            over_time: c.over_time.0,
            re_count: c.re_count,
            exec_timeout: c.exec_timeout.0,
        };
        self.dl.get_or_insert_with(|| {
            Box::new(DlState {
                engine: Engine::new(timing),
                auto: std::collections::VecDeque::new(),
                audit: None,
            })
        })
    }

    /// Builds a request in the device's dialect (registry override, else the
    /// dialect of its frames, else 2017) with a fresh QN and starts it.
    pub(super) fn dl_begin(&mut self, sub: Submit, out: &mut Vec<Out<Tag>>) {
        let shared = self.shared.clone();
        let registry = shared.registry.current();
        let dev = registry.get(&sub.mn);
        let header = self
            .owner()
            .info
            .header
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let dialect = dev
            .and_then(|d| d.profile.dialect)
            .or(header.dialect)
            .unwrap_or(protocol::Dialect::V2017);
        let pw = dev.and_then(|d| d.pw.clone()).unwrap_or(header.pw);
        let st = if header.st.is_empty() {
            "32".to_owned()
        } else {
            header.st
        };
        let key = dev.and_then(|d| d.profile.keys.first().copied());
        let tz = shared
            .cfg
            .time_zone()
            .unwrap_or_else(protocol::time::beijing);
        let now = chrono::Utc::now();
        let qn = match &sub.action {
            Action::Relay { qn, .. } => qn.clone(),
            _ => {
                let ms = shared
                    .sessions
                    .devices
                    .next_qn_ms(&sub.mn, now.timestamp_millis());
                let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or(now);
                protocol::time::format_qn(t, tz)
            }
        };
        let target = reply::Target {
            dialect,
            st: &st,
            pw: &pw,
            mn: &sub.mn,
        };
        let cn = sub.action.cn();
        let d = self.dl_state();
        if d.engine.is_idle() {
            d.audit = Some(dl::audit::Audit::start(&sub, &qn, now.timestamp_millis()));
        }
        match sub.action.build(
            target,
            &qn,
            now,
            tz,
            key.as_ref(),
            shared.cfg.downlink.encrypt_requests,
        ) {
            Ok(bytes) => {
                let b = Begin {
                    tag: sub.replies,
                    origin: sub.origin,
                    mn: sub.mn,
                    qn,
                    cn,
                    bytes,
                };
                self.dl_state().engine.begin(b, Instant::now(), out);
            }
            Err(message) => out.push(Out::Event(
                sub.replies,
                Event::Done(Outcome::Invalid(message)),
            )),
        }
    }

    /// Carries out the engine's outputs: each request is logged (direction out,
    /// peer = who asked) and only then written; steps go to their requesters.
    /// Then starts waiting automatic requests while the engine is free.
    pub(super) async fn dl_run(
        &mut self,
        mut out: Vec<Out<Tag>>,
        io: &mut DeviceConn,
    ) -> Result<(), CloseReason> {
        loop {
            for o in std::mem::take(&mut out) {
                match o {
                    Out::Event(tag, ev) => self.dl_event(tag, ev),
                    Out::Send { bytes, origin } => {
                        let opts = decode_options(&self.shared.cfg, chrono::Utc::now());
                        let registry = self.shared.registry.current();
                        let frame = protocol::decode(bytes.clone(), &opts, &*registry);
                        let mut rec = frame_record(
                            &frame,
                            &self.peer_text,
                            self.id,
                            Direction::Out,
                            now_ms(),
                            !frame.has_error(),
                        );
                        rec.peer = origin.clone();
                        let logged = self.shared.store.append_many(vec![rec]).await;
                        if let (Ok(a), Some(x)) =
                            (&logged, self.dl.as_mut().and_then(|d| d.audit.as_mut()))
                        {
                            if let Some(first) = a.first() {
                                x.on_logged(first.seq);
                            }
                        }
                        if let Err(e) = logged {
                            // Unlogged bytes never reach a device.
                            slog!(warn, self, error = %e, origin = %origin, "downlink request not logged; not sent");
                            let mut end = Vec::new();
                            if let Some(d) = self.dl.as_mut() {
                                d.engine.abort(
                                    Outcome::Invalid("the frame log is unavailable".into()),
                                    &mut end,
                                );
                            }
                            out.extend(end);
                            continue;
                        }
                        io.write_request(&bytes, self.shared.cfg.server.write_timeout.0)
                            .await?;
                        self.shared.metrics.bytes_out.add(bytes.len() as u64);
                        slog!(info, self, origin = %origin, cn = frame.cn().unwrap_or(""), qn = frame.qn().unwrap_or(""), "downlink request sent");
                    }
                }
            }
            let next = match self.dl.as_mut() {
                Some(d) if d.engine.is_idle() => d.auto.pop_front(),
                _ => None,
            };
            match next {
                Some(sub) => self.dl_begin(sub, &mut out),
                None if out.is_empty() => break,
                None => {}
            }
        }
        if self
            .dl
            .as_ref()
            .is_some_and(|d| d.engine.is_idle() && d.auto.is_empty())
        {
            self.dl = None;
        }
        Ok(())
    }

    /// Delivers steps (never sends; device frames only produce steps).
    pub(super) fn dl_deliver(&mut self, out: Vec<Out<Tag>>) {
        for o in out {
            if let Out::Event(tag, ev) = o {
                self.dl_event(tag, ev);
            }
        }
    }

    /// A step of the exchange in progress: recorded, then given to its requester.
    pub(super) fn dl_event(&mut self, tag: Tag, ev: Event) {
        let audit = self.dl.as_mut().and_then(|d| d.audit.as_mut());
        if let Some(a) = audit {
            a.on_event(&ev);
        }
        if let Event::Done(o) = &ev {
            match o {
                Outcome::Success => slog!(info, self, outcome = o.name(), "downlink exchange done"),
                _ => {
                    // Plain values, each under its protocol name, and only those that apply.
                    let (qn_rtn, exe_rtn, sends, why) = match o {
                        Outcome::Refused(c) => (Some(*c), None, None, None),
                        Outcome::Failed(c) => (None, Some(*c), None, None),
                        Outcome::NoReply { sends } => (None, None, Some(*sends), None),
                        Outcome::Invalid(why) => (None, None, None, Some(why.as_str())),
                        _ => (None, None, None, None),
                    };
                    slog!(
                        warn,
                        self,
                        outcome = o.name(),
                        qn_rtn,
                        exe_rtn,
                        sends,
                        why,
                        "downlink exchange failed"
                    )
                }
            }
            match self.dl.as_mut().and_then(|d| d.audit.take()) {
                Some(a) => dl::audit::record(&self.shared.store, a.finish(o, now_ms())),
                None => {
                    self.shared.metrics.downlink_unrecorded.inc();
                    slog!(
                        warn,
                        self,
                        outcome = o.name(),
                        "downlink exchange ended without a record"
                    );
                }
            }
        }
        self.dl_reply(tag, ev);
    }

    /// Ends the exchange in progress and answers what is still queued: the
    /// session is over. Each of them is recorded as `closed`.
    pub(super) fn dl_close(&mut self) {
        let mut out = Vec::new();
        if let Some(d) = self.dl.as_mut() {
            d.engine.abort(Outcome::Closed, &mut out);
        }
        self.dl_deliver(out);
        let now = now_ms();
        if let Some(d) = self.dl.take() {
            for sub in d.auto {
                dl::audit::record(
                    &self.shared.store,
                    dl::audit::unsent(&sub, &Outcome::Closed, now),
                );
            }
        }
        let Some(queued) = self.owner.as_ref().map(|o| o.info.inbox.close()) else {
            return;
        };
        for sub in queued {
            dl::audit::record(
                &self.shared.store,
                dl::audit::unsent(&sub, &Outcome::Closed, now),
            );
            self.dl_reply(sub.replies, Event::Done(Outcome::Closed));
        }
    }

    /// Gives a step to its requester, if any.
    pub(super) fn dl_reply(&self, tag: Tag, ev: Event) {
        if let Some(tx) = tag {
            // Never waits: a requester that does not read must not stall the device.
            if tx.try_send(ev).is_err() {
                slog!(
                    warn,
                    self,
                    "downlink step not delivered: the requester is gone or not reading"
                );
            }
        }
    }
}
