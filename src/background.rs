//! What the two background threads (the log thread and the span thread) share: how they
//! start, and how long they let work gather in their queues before they take it.
//!
//! Between rounds, parking on the queue would wake a thread for every item, and each wake-up
//! costs the sending thread a system call; sleeping a fixed time would overflow the queue
//! under load. So the thread sleeps up to [`MAX_PAUSE`], and less when the queue filled fast
//! enough last time to reach half its capacity before then. (With nothing to do, it parks.)

use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::error::{Error, Result};

/// Starts a background thread named `name`.
pub(crate) fn spawn(name: &'static str, run: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(run)
        .map_err(|source| Error::Thread { name, source })
}

/// Joins a background thread that has answered its last message (a no-op the second time).
pub(crate) fn join_answered(thread: &Mutex<Option<JoinHandle<()>>>) {
    let thread = thread.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(thread) = thread {
        // It has answered: joining only reaps it, and a panic after that changes nothing.
        let _ = thread.join();
    }
}

/// Whether `thread` is gone without having been joined, which only an answered shutdown
/// does: with its channel disconnected, it has ended unexpectedly (a panic), or is ending.
pub(crate) fn ended_unexpectedly(thread: &Mutex<Option<JoinHandle<()>>>) -> bool {
    thread.lock().unwrap_or_else(PoisonError::into_inner).is_some()
}

/// The answer to a message sent to `thread`, by `deadline`; `Disconnected` when the thread has
/// finished without sending one. A message queued as the thread ended stays in its channel,
/// with the answer's sender, so the answer's channel alone would wait until the deadline: the
/// thread is looked at between waits of [`ANSWER_POLL`].
pub(crate) fn answer<T>(
    answered: &Receiver<T>,
    deadline: Instant,
    thread: &Mutex<Option<JoinHandle<()>>>,
) -> Result<T, RecvTimeoutError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match answered.recv_timeout(left.min(ANSWER_POLL)) {
            Err(RecvTimeoutError::Timeout) if !left.is_zero() => {}
            answer => return answer,
        }
        if has_finished(thread) {
            // An answer sent just before it finished still counts.
            return answered.try_recv().map_err(|_| RecvTimeoutError::Disconnected);
        }
    }
}

/// Whether `thread` has finished and was not joined: it ended unexpectedly.
pub(crate) fn has_finished(thread: &Mutex<Option<JoinHandle<()>>>) -> bool {
    thread
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .is_some_and(JoinHandle::is_finished)
}

/// How long a wait for an answer lasts before it looks whether the thread has finished.
const ANSWER_POLL: Duration = Duration::from_millis(50);

/// The instant `timeout` from now; a timeout too long to represent (`Duration::MAX`) is a
/// century, which no wait here outlives.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// The longest the thread sleeps: bounds its wake-ups to about 200 a second, and delays an
/// item by at most this much.
pub(crate) const MAX_PAUSE: Duration = Duration::from_millis(5);

/// The pace of one queue, from one round of taking what it held to the next.
pub(crate) struct Pacing {
    capacity: usize,
    round_started: Instant,
}

impl Pacing {
    pub(crate) fn new(capacity: usize) -> Self {
        Pacing {
            capacity: capacity.max(1),
            round_started: Instant::now(),
        }
    }

    /// Sleeps before the next round, `taken` being how many items this round took; `limit`
    /// caps the sleep (a scheduled export, say).
    pub(crate) fn sleep(&mut self, taken: usize, limit: Duration) {
        // A round runs from one call to the next: the sleep and the work that followed it.
        let now = Instant::now();
        let round = now.saturating_duration_since(self.round_started);
        self.round_started = now;
        let pause = pause(round, taken, self.capacity).min(limit);
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

/// [`MAX_PAUSE`], or less: at the pace of a round that took `taken` items in `round`, the time
/// a queue of `capacity` takes to fill half way.
fn pause(round: Duration, taken: usize, capacity: usize) -> Duration {
    let half = u32::try_from(capacity / 2).unwrap_or(u32::MAX).max(1);
    match u32::try_from(taken) {
        Ok(0) => MAX_PAUSE,
        Ok(taken) => MAX_PAUSE.min(round * half / taken),
        // More than fits a u32 in one round: no time to sleep.
        Err(_) => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_queue_sleeps_the_whole_linger() {
        assert_eq!(pause(Duration::from_millis(5), 0, 2048), MAX_PAUSE);
        assert_eq!(
            pause(Duration::from_millis(5), 10, 2048),
            MAX_PAUSE,
            "10 items are far from half"
        );
    }

    #[test]
    fn an_endless_timeout_is_a_deadline_far_away_not_a_panic() {
        assert!(deadline_after(Duration::MAX) > Instant::now() + Duration::from_secs(365 * 24 * 3600));
        let soon = deadline_after(Duration::from_secs(1));
        assert!(soon <= Instant::now() + Duration::from_secs(1));
    }

    #[test]
    fn a_busy_queue_sleeps_until_it_would_be_half_full() {
        // 10,240 items in 5 ms: 1024 (half of 2048) come in 0.5 ms.
        assert_eq!(
            pause(Duration::from_millis(5), 10_240, 2048),
            Duration::from_micros(500)
        );
        assert_eq!(pause(Duration::from_millis(5), usize::MAX, 2048), Duration::ZERO);
    }
}
