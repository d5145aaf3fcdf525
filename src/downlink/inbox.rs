//! A session's queue of downlink requests, bounded by `[downlink] queue`, and
//! the word that a newer session took its device over.
//!
//! Every session that speaks for an MN has one, and most never receive a
//! request. tokio's bounded `mpsc` channel allocates ~800 B up front (its
//! cache-padded state and a first block of 32 slots), which made a quiet
//! session several times its own size. This queue allocates nothing until a
//! request arrives and gives the storage back once it is empty again; requests
//! are rare and handled one at a time, so a lock is cheap here. Its only
//! reader is the session, so the session's waker is all it needs to wake: the
//! wait is a pointer in the session's task, where a `Notify` waiter would add
//! ~60 B to every session. Supersession travels the same way, so a session
//! needs no cancellation token of its own (~130 B each, with its slot in the
//! parent's list).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use super::{Refusal, Submit};

/// What a session is woken for.
#[derive(Debug)]
pub enum Next {
    /// A newer session took the device over: this one ends.
    Superseded,
    /// The oldest queued request.
    Request(Box<Submit>),
}

/// Requests waiting for one session.
#[derive(Debug)]
pub struct Inbox {
    cap: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Box<Submit>>,
    closed: bool,
    superseded: bool,
    /// The session, while it waits in [`Inbox::next`].
    waiting: Option<Waker>,
}

impl Inbox {
    /// An empty queue that holds at most `cap` requests.
    pub fn new(cap: usize) -> Inbox {
        Inbox {
            cap,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `s` without waiting; gives it back when the queue is full
    /// ([`Refusal::Busy`]) or its session has ended ([`Refusal::Offline`]).
    pub fn try_push(&self, s: Box<Submit>) -> Result<(), (Box<Submit>, Refusal)> {
        let mut st = self.state();
        if st.closed {
            return Err((s, Refusal::Offline));
        }
        if st.items.len() >= self.cap {
            return Err((s, Refusal::Busy));
        }
        st.items.push_back(s);
        Self::wake(st);
        Ok(())
    }

    /// Tells the session a newer one took its device over.
    pub fn supersede(&self) {
        let mut st = self.state();
        st.superseded = true;
        Self::wake(st);
    }

    /// True once [`Inbox::supersede`] was called.
    pub fn is_superseded(&self) -> bool {
        self.state().superseded
    }

    fn wake(mut st: std::sync::MutexGuard<'_, State>) {
        let waiting = st.waiting.take();
        drop(st);
        // A session that is not waiting sees the news on its next `next`.
        if let Some(w) = waiting {
            w.wake();
        }
    }

    /// The oldest request, if any.
    pub fn try_pop(&self) -> Option<Box<Submit>> {
        Self::take(&mut self.state())
    }

    fn take(st: &mut State) -> Option<Box<Submit>> {
        let s = st.items.pop_front();
        if st.items.is_empty() && st.items.capacity() > 0 {
            st.items = VecDeque::new();
        }
        s
    }

    /// Waits until the session is superseded or, when `requests`, a request
    /// is queued; supersession first. One reader: the session. Cancel-safe:
    /// nothing is taken until it returns.
    pub fn next(&self, requests: bool) -> impl Future<Output = Next> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx, requests))
    }

    fn poll_next(&self, cx: &mut Context<'_>, requests: bool) -> Poll<Next> {
        let mut st = self.state();
        if st.superseded {
            return Poll::Ready(Next::Superseded);
        }
        if requests {
            if let Some(s) = Self::take(&mut st) {
                return Poll::Ready(Next::Request(s));
            }
        }
        match &mut st.waiting {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Refuses further requests and hands back those still queued.
    pub fn close(&self) -> VecDeque<Box<Submit>> {
        let mut st = self.state();
        st.closed = true;
        st.waiting = None;
        std::mem::take(&mut st.items)
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.state().items.len()
    }

    /// True when no request is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::downlink::test_requests::{n, request};

    fn req(i: u32) -> Box<Submit> {
        request("MN", i)
    }

    #[test]
    fn bounded_fifo_then_closed() {
        let q = Inbox::new(2);
        assert!(q.try_push(req(1)).is_ok());
        assert!(q.try_push(req(2)).is_ok());
        let (back, why) = q.try_push(req(3)).unwrap_err();
        assert_eq!((n(&back), why), (3, Refusal::Busy));
        assert_eq!(q.try_pop().map(|s| n(&s)), Some(1));
        assert!(q.try_push(req(4)).is_ok());
        assert_eq!(q.len(), 2);
        let left: Vec<u32> = q.close().iter().map(|s| n(s)).collect();
        assert_eq!(left, [2, 4]);
        assert!(q.is_empty());
        let (back, why) = q.try_push(req(5)).unwrap_err();
        assert_eq!((n(&back), why), (5, Refusal::Offline));
    }

    #[tokio::test]
    async fn a_waiting_session_is_woken_and_none_is_lost() {
        let q = Arc::new(Inbox::new(8));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move {
                let mut got = Vec::new();
                for _ in 0..3 {
                    match q.next(true).await {
                        Next::Request(s) => got.push(n(&s)),
                        Next::Superseded => panic!("not superseded"),
                    }
                }
                got
            }
        });
        tokio::task::yield_now().await;
        // Several requests behind one wakeup: each is still taken.
        for i in 1..=3 {
            q.try_push(req(i)).unwrap();
        }
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, [1, 2, 3]);
        // Drained: the storage was given back.
        assert_eq!(q.state().items.capacity(), 0);
    }

    #[tokio::test]
    async fn supersession_wakes_a_session_that_takes_no_requests() {
        let q = Arc::new(Inbox::new(8));
        q.try_push(req(1)).unwrap();
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.next(false).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a queued request is not taken");
        assert!(!q.is_superseded());
        q.supersede();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert!(matches!(got, Next::Superseded));
        // It comes before a queued request, too.
        assert!(matches!(q.next(true).await, Next::Superseded));
        assert_eq!(q.len(), 1);
    }
}
