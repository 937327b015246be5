//! Renders of the `/metrics` answer, each sent to every request that was waiting when it
//! started.
//!
//! A request joins the next render. The first of its requests to find no render running
//! leads it: it waits until the last render's duration has passed since that render ended
//! (at most [`MAX_PAUSE`]), then renders, and every request that joined before the render
//! started is sent its answer. However fast requests come, renders of up to [`MAX_PAUSE`]
//! take at most half the server's thread, and a scrape waits for at most the render running,
//! a pause and its own render, not for every request queued before it.
//!
//! Invariants:
//! - one render at a time; the requests waiting are at most the connections open;
//! - a request is answered by a render that started after it joined, so its answer counts
//!   every execution that ended before it arrived;
//! - a leader dropped before its render started hands the lead on; one that panics while
//!   rendering leaves its requests an error, never waiting.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::held_answers::Answer;

/// The longest pause between renders.
pub(crate) const MAX_PAUSE: Duration = Duration::from_secs(1);

/// The renders of the answer: the next one, which requests join, and when it may start.
#[derive(Debug)]
pub(super) struct CoalescedRenders {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The render requests join now, not started yet.
    next: Arc<Render>,
    /// Whether a request leads `next`.
    led: bool,
    /// When `next` may start.
    not_before: Instant,
}

/// One render and the requests waiting for it.
#[derive(Debug, Default)]
struct Render {
    /// Its answer once rendered; `None`: the render failed.
    answer: OnceLock<Option<Answer>>,
    /// Notified when its answer is set, or when its leader left before it started.
    changed: Notify,
}

impl Default for CoalescedRenders {
    fn default() -> Self {
        CoalescedRenders {
            state: Mutex::new(State {
                next: Arc::default(),
                led: false,
                not_before: Instant::now(),
            }),
        }
    }
}

impl CoalescedRenders {
    /// The answer of the next render to start, and whether another request led it: rendered
    /// by `render` when this request leads it. `None`: the render failed.
    pub(super) async fn answer(&self, render: impl FnOnce() -> Option<Answer>) -> Option<(Answer, bool)> {
        let joined = Arc::clone(&self.state().next);
        loop {
            let changed = joined.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(answer) = joined.answer.get() {
                return answer.clone().map(|answer| (answer, true));
            }
            if let Some(not_before) = self.lead(&joined) {
                let mut lead = Lead {
                    renders: self,
                    joined: &joined,
                    started: false,
                };
                if not_before > Instant::now() {
                    tokio::time::sleep_until(not_before).await;
                }
                lead.start();
                let started = Instant::now();
                let answer = render();
                lead.finish(answer.clone(), started.elapsed());
                return answer.map(|answer| (answer, false));
            }
            changed.await;
        }
    }

    /// Takes the lead of `joined` when it is the next render and nobody leads it: when it may
    /// start.
    fn lead(&self, joined: &Arc<Render>) -> Option<Instant> {
        let mut state = self.state();
        if state.led || !Arc::ptr_eq(&state.next, joined) {
            return None;
        }
        state.led = true;
        Some(state.not_before)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Taken by the server's thread alone, never across an await or a render: a poisoned
        // one is intact.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The lead of one render, handed on or failed if dropped before it finishes.
struct Lead<'a> {
    renders: &'a CoalescedRenders,
    joined: &'a Arc<Render>,
    started: bool,
}

impl Lead<'_> {
    /// The render starts: requests from now on join the one after it.
    fn start(&mut self) {
        self.renders.state().next = Arc::default();
        self.started = true;
    }

    /// The render ended with `answer`, taking `took`: its requests get it, and the next may
    /// start after as long a pause.
    fn finish(self, answer: Option<Answer>, took: Duration) {
        self.renders.state().not_before = Instant::now() + took.min(MAX_PAUSE);
        self.end(answer);
    }

    /// Sets the answer of a started render, and lets the next one be led.
    fn end(&self, answer: Option<Answer>) {
        let _ = self.joined.answer.set(answer);
        self.joined.changed.notify_waiters();
        let mut state = self.renders.state();
        state.led = false;
        state.next.changed.notify_waiters();
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if self.joined.answer.get().is_some() {
            return;
        }
        if self.started {
            // Its render panicked: its requests get an error.
            self.end(None);
        } else {
            // Its request went away before the render started: another of its requests
            // leads it.
            self.renders.state().led = false;
            self.joined.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use bytes::Bytes;
    use futures::FutureExt as _;

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// A render that takes 20 ms, so that the next pauses as long, counted in `renders`.
    fn rendered<'a>(text: &'static str, renders: &'a Cell<usize>) -> impl FnOnce() -> Option<Answer> + 'a {
        move || {
            std::thread::sleep(Duration::from_millis(20));
            renders.set(renders.get() + 1);
            Some(Answer::Rendered(Bytes::from_static(text.as_bytes())))
        }
    }

    /// What a request was sent: the body, and whether another request led its render.
    fn sent(answer: Option<(Answer, bool)>) -> Option<(Bytes, bool)> {
        answer.map(|(answer, joined)| (answer.into_body(), joined))
    }

    /// A render of its own, `text`.
    fn own(text: &'static str) -> (Bytes, bool) {
        (Bytes::from_static(text.as_bytes()), false)
    }

    #[test]
    fn requests_waiting_together_share_one_render() {
        let renders = CoalescedRenders::default();
        let count = Cell::new(0);
        runtime().block_on(async {
            assert_eq!(sent(renders.answer(rendered("1", &count)).await), Some(own("1")));
            // The next render pauses after the first: three requests join it.
            let (a, b, c) = tokio::join!(
                renders.answer(rendered("2", &count)),
                renders.answer(rendered("never", &count)),
                renders.answer(rendered("never", &count)),
            );
            assert_eq!(count.get(), 2, "one render for the three");
            assert_eq!(sent(a), Some(own("2")));
            for joined in [b, c] {
                assert_eq!(sent(joined), Some((Bytes::from_static(b"2"), true)));
            }
        });
    }

    #[test]
    fn a_request_that_joins_during_a_render_gets_the_next_one() {
        let renders = CoalescedRenders::default();
        let count = Cell::new(0);
        runtime().block_on(async {
            let late = Cell::new(None);
            let first = renders.answer(|| {
                late.set(Some(Arc::clone(&renders.state().next)));
                Some(Answer::Rendered(Bytes::from_static(b"first")))
            });
            assert!(first.await.is_some());
            let joined = late.take().unwrap();
            assert!(joined.answer.get().is_none(), "not sent the render it missed");
            assert_eq!(
                sent(renders.answer(rendered("second", &count)).await),
                Some(own("second"))
            );
            let answered = joined.answer.get().cloned().flatten().map(Answer::into_body);
            assert_eq!(answered.unwrap(), "second", "sent the next");
        });
    }

    #[test]
    fn a_leader_that_goes_away_before_its_render_hands_the_lead_on() {
        let renders = CoalescedRenders::default();
        let count = Cell::new(0);
        runtime().block_on(async {
            renders.answer(rendered("1", &count)).await;
            let mut leader = Box::pin(renders.answer(rendered("never", &count)));
            let mut follower = Box::pin(renders.answer(rendered("2", &count)));
            assert!(futures::poll!(&mut leader).is_pending(), "leading, pausing");
            assert!(futures::poll!(&mut follower).is_pending(), "waiting for it");
            drop(leader);
            assert_eq!(sent(follower.await), Some(own("2")), "it led the render");
            assert_eq!(count.get(), 2);
        });
    }

    #[test]
    fn a_render_that_panics_fails_its_requests_and_the_next_renders() {
        let renders = CoalescedRenders::default();
        let count = Cell::new(0);
        runtime().block_on(async {
            renders.answer(rendered("1", &count)).await;
            let leader = std::panic::AssertUnwindSafe(renders.answer(|| panic!("render"))).catch_unwind();
            let (leader, follower) = tokio::join!(leader, renders.answer(rendered("never", &count)));
            assert!(leader.is_err(), "the leader's render panicked");
            assert_eq!(sent(follower), None, "its request gets an error");
            assert_eq!(sent(renders.answer(rendered("next", &count)).await), Some(own("next")));
        });
    }
}
