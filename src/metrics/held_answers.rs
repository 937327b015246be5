//! The `/metrics` answers being sent, bounded in bytes.
//!
//! An answer is held from its render until hyper drops it: written out, or its connection
//! closed. A client that does not read holds its answer until its connection is closed, so
//! without a bound the answers held could reach the connection limit times the largest
//! render. The server renders the next answer only when [`HeldAnswers::has_room`]: nothing
//! is held, or what is held and the last answer's length are within
//! [`MAX_HELD_ANSWER_BYTES`]. Until then the request waits, holding nothing, while room is
//! made by closing a connection whose answer has not moved (`open_connections.rs`).
//!
//! Invariant: what is held is at most [`MAX_HELD_ANSWER_BYTES`] plus one answer and what the
//! metrics grew by since the last render; one answer is always served.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;

/// The most bytes of answers held at once, one answer always allowed: room for a few
/// concurrent scrapes of the largest metrics the default caps allow.
pub(crate) const MAX_HELD_ANSWER_BYTES: usize = 64 << 20;

/// The answers being sent: their bytes, and a notification each time one is released.
#[derive(Debug, Default)]
pub(super) struct HeldAnswers {
    held: AtomicUsize,
    /// The last answer's length: what the next one is expected to take.
    last: AtomicUsize,
    released: Notify,
}

impl HeldAnswers {
    /// Whether the next answer may be rendered: nothing is held, or what is held and the
    /// last answer's length are within [`MAX_HELD_ANSWER_BYTES`].
    pub(super) fn has_room(&self) -> bool {
        let held = self.held.load(Ordering::Relaxed);
        held == 0 || held.saturating_add(self.last.load(Ordering::Relaxed)) <= MAX_HELD_ANSWER_BYTES
    }

    /// `answer` as a body, held until the body and every part of it are dropped.
    pub(super) fn hold(self: &Arc<Self>, answer: String) -> Bytes {
        let length = answer.len();
        self.held.fetch_add(length, Ordering::Relaxed);
        self.last.store(length, Ordering::Relaxed);
        Bytes::from_owner(HeldAnswer {
            answer,
            answers: Arc::clone(self),
        })
    }

    /// Resolves when an answer is released after this is first polled.
    pub(super) async fn released(&self) {
        self.released.notified().await;
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// One answer's bytes, released from [`HeldAnswers`] when dropped.
struct HeldAnswer {
    answer: String,
    answers: Arc<HeldAnswers>,
}

impl AsRef<[u8]> for HeldAnswer {
    fn as_ref(&self) -> &[u8] {
        self.answer.as_bytes()
    }
}

impl Drop for HeldAnswer {
    fn drop(&mut self) {
        self.answers.held.fetch_sub(self.answer.len(), Ordering::Relaxed);
        self.answers.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_held_until_every_part_of_it_is_dropped() {
        let answers = Arc::new(HeldAnswers::default());
        let body = answers.hold("x".repeat(1000));
        let part = body.slice(10..20);
        drop(body);
        assert_eq!(answers.held(), 1000);
        assert_eq!(&part[..], b"xxxxxxxxxx");
        drop(part);
        assert_eq!(answers.held(), 0);
    }

    #[test]
    fn one_answer_always_fits_and_the_next_only_within_the_limit() {
        let answers = Arc::new(HeldAnswers::default());
        let half = MAX_HELD_ANSWER_BYTES / 2;
        assert!(answers.has_room());
        let larger_than_the_limit = answers.hold("x".repeat(MAX_HELD_ANSWER_BYTES + 1));
        assert!(!answers.has_room());
        drop(larger_than_the_limit);
        assert!(
            answers.has_room(),
            "nothing held: the next is served whatever its length"
        );
        let first = answers.hold("x".repeat(half));
        assert!(answers.has_room(), "two halves fit");
        let second = answers.hold("x".repeat(half));
        assert!(!answers.has_room());
        drop(first);
        assert!(answers.has_room());
        drop(second);
    }
}
