//! The `/metrics` answers being sent, bounded in bytes by sharing the latest.
//!
//! An answer is held, counted by the bytes its render allocated, from its render until hyper
//! drops every part of it: written out, or its connection closed. A client that does not
//! read holds its answer until its connection ends, so if every request rendered its own,
//! the answers held could reach the connection limit times the largest render. A request
//! renders a new answer only when [`HeldAnswers::has_room`]: nothing is held, or what is
//! held and the last answer's length are within [`MAX_HELD_ANSWER_BYTES`]. Otherwise it is
//! sent the latest answer, shared, when that one is still held and at most
//! [`MAX_SHARED_AGE`] old; no request waits for room.
//!
//! Invariants:
//! - what is held is at most [`MAX_HELD_ANSWER_BYTES`] and one answer, plus one more for each
//!   [`MAX_SHARED_AGE`] that answers are held past the limit;
//! - an answer is never older than one sent before it: the one shared is the latest.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// The most bytes of answers held at once before the latest is shared: room for a few
/// concurrent scrapes of the largest metrics the default caps allow.
pub(crate) const MAX_HELD_ANSWER_BYTES: usize = 64 << 20;

/// The oldest answer shared; past it, a new one is rendered whatever is held.
pub(crate) const MAX_SHARED_AGE: Duration = Duration::from_secs(10);

/// The body of an answer, and whether it was rendered for it.
#[derive(Debug, Clone)]
pub(super) enum Answer {
    Rendered(Bytes),
    /// The latest answer, shared: there was no room for a new one.
    Shared(Bytes),
}

impl Answer {
    pub(super) fn into_body(self) -> Bytes {
        match self {
            Answer::Rendered(body) | Answer::Shared(body) => body,
        }
    }
}

/// The answers being sent: their bytes, and the latest, for sharing.
#[derive(Debug, Default)]
pub(super) struct HeldAnswers {
    held: AtomicUsize,
    /// The last answer's length: what the next one is expected to take.
    last: AtomicUsize,
    latest: Mutex<Option<Latest>>,
}

/// The answer rendered last, while any part of it is held.
#[derive(Debug)]
struct Latest {
    rendered: Instant,
    answer: Weak<HeldAnswer>,
}

impl HeldAnswers {
    /// The body of the next answer: the latest shared when there is no room for a new one
    /// and it is recent enough, else what `render` gives, held.
    ///
    /// # Errors
    ///
    /// What `render` returns.
    pub(super) fn answer<E>(self: &Arc<Self>, render: impl FnOnce() -> Result<String, E>) -> Result<Answer, E> {
        if !self.has_room() {
            if let Some(latest) = self.recent_latest() {
                return Ok(Answer::Shared(Bytes::from_owner(SharedAnswer(latest))));
            }
        }
        render().map(|answer| Answer::Rendered(self.hold(answer)))
    }

    /// Whether a new answer may be rendered: nothing is held, or what is held and the last
    /// answer's length are within [`MAX_HELD_ANSWER_BYTES`].
    fn has_room(&self) -> bool {
        let held = self.held.load(Ordering::Relaxed);
        held == 0 || held.saturating_add(self.last.load(Ordering::Relaxed)) <= MAX_HELD_ANSWER_BYTES
    }

    /// The latest answer, if any part of it is still held and it is at most
    /// [`MAX_SHARED_AGE`] old.
    fn recent_latest(&self) -> Option<Arc<HeldAnswer>> {
        let latest = self.latest();
        let latest = latest.as_ref()?;
        if latest.rendered.elapsed() > MAX_SHARED_AGE {
            return None;
        }
        latest.answer.upgrade()
    }

    /// `answer` as a body, held until every part of it, shared or not, is dropped.
    fn hold(self: &Arc<Self>, answer: String) -> Bytes {
        let length = answer.capacity();
        self.held.fetch_add(length, Ordering::Relaxed);
        self.last.store(length, Ordering::Relaxed);
        let held = Arc::new(HeldAnswer {
            answer,
            answers: Arc::clone(self),
        });
        *self.latest() = Some(Latest {
            rendered: Instant::now(),
            answer: Arc::downgrade(&held),
        });
        Bytes::from_owner(SharedAnswer(held))
    }

    fn latest(&self) -> std::sync::MutexGuard<'_, Option<Latest>> {
        // Taken by the server's thread alone, never while another lock is held: a poisoned
        // one is intact.
        self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// One rendered answer, released from [`HeldAnswers`] when the last body sharing it is
/// dropped.
#[derive(Debug)]
struct HeldAnswer {
    answer: String,
    answers: Arc<HeldAnswers>,
}

impl Drop for HeldAnswer {
    fn drop(&mut self) {
        self.answers.held.fetch_sub(self.answer.capacity(), Ordering::Relaxed);
    }
}

/// A body's share of a [`HeldAnswer`].
struct SharedAnswer(Arc<HeldAnswer>);

impl AsRef<[u8]> for SharedAnswer {
    fn as_ref(&self) -> &[u8] {
        self.0.answer.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    fn rendered(text: &str) -> impl FnOnce() -> Result<String, Infallible> + '_ {
        move || Ok(text.to_owned())
    }

    /// The body of the next answer of `answers`, rendered by `render` if there is room.
    fn body(answers: &Arc<HeldAnswers>, render: impl FnOnce() -> Result<String, Infallible>) -> Bytes {
        match answers.answer(render) {
            Ok(answer) => answer.into_body(),
            Err(never) => match never {},
        }
    }

    #[test]
    fn an_answer_is_held_until_every_part_of_it_is_dropped() {
        let answers = Arc::new(HeldAnswers::default());
        let mut allocated = String::with_capacity(1000);
        allocated.push_str("xxxxxxxxxxxxxxxxxxxx");
        let body = body(&answers, move || Ok(allocated));
        let part = body.slice(10..20);
        drop(body);
        assert_eq!(answers.held(), 1000, "counted by what its render allocated");
        assert_eq!(&part[..], b"xxxxxxxxxx");
        drop(part);
        assert_eq!(answers.held(), 0);
    }

    #[test]
    fn past_the_limit_the_latest_answer_is_shared_and_nothing_rendered() {
        let answers = Arc::new(HeldAnswers::default());
        let half = "a".repeat(MAX_HELD_ANSWER_BYTES / 2);
        let first = body(&answers, rendered(&half));
        let second = body(&answers, rendered(&"b".repeat(half.len())));
        let never = || -> Result<String, Infallible> { panic!("rendered past the limit") };
        let shared = answers.answer(never).unwrap();
        assert!(matches!(shared, Answer::Shared(_)), "{shared:?}");
        let shared = shared.into_body();
        assert_eq!(shared, second, "the latest, shared");
        assert_eq!(answers.held(), 2 * half.len(), "sharing holds nothing more");
        drop(first);
        let third = body(&answers, rendered("c"));
        assert_eq!(&third[..], b"c", "room again: rendered anew");
        drop((second, shared, third));
        assert_eq!(answers.held(), 0);
    }

    #[test]
    fn one_answer_is_rendered_whatever_its_length_and_the_next_shares_it() {
        let answers = Arc::new(HeldAnswers::default());
        let huge = body(&answers, rendered(&"x".repeat(MAX_HELD_ANSWER_BYTES + 1)));
        let shared = body(&answers, rendered("new"));
        assert_eq!(shared.len(), huge.len());
        drop((huge, shared));
        let next = body(&answers, rendered("new"));
        assert_eq!(&next[..], b"new", "nothing held: rendered anew");
    }

    #[test]
    fn an_answer_no_longer_held_is_never_shared() {
        let answers = Arc::new(HeldAnswers::default());
        let half = "a".repeat(MAX_HELD_ANSWER_BYTES / 2);
        let older = body(&answers, rendered(&half));
        let small = body(&answers, rendered("b"));
        drop(body(&answers, rendered(&half)));
        // Past the limit (what is held and the last answer's length), the latest released.
        let next = body(&answers, rendered("fresh"));
        assert_eq!(&next[..], b"fresh", "rendered anew");
        drop((older, small, next));
        assert_eq!(answers.held(), 0);
    }
}
