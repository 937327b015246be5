//! State kept per agent thread, that one other thread visits: what agents' threads produce
//! (log lines, finished spans, metric updates) gathers where it was made, and crosses to the
//! background thread (or, for metrics, to the SDK when it collects) in batches rather than
//! item by item through one shared queue or lock, whose shared cache lines every producing
//! thread would write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crossbeam_utils::CachePadded;
use thread_local::ThreadLocal;

/// One `S` per thread that uses it, each behind a lock that others take only to visit it,
/// briefly, a few hundred times a second at most.
pub(crate) struct PerThread<S: Send> {
    threads: ThreadLocal<CachePadded<Mutex<S>>>,
    new: Box<dyn Fn() -> S + Send + Sync>,
    /// Set when the background thread stops visiting: from then on nothing is added.
    closed: AtomicBool,
}

impl<S: Send> PerThread<S> {
    pub(crate) fn new(new: impl Fn() -> S + Send + Sync + 'static) -> Self {
        PerThread {
            threads: ThreadLocal::new(),
            new: Box::new(new),
            closed: AtomicBool::new(false),
        }
    }

    /// Runs `f` on the calling thread's state; `None`, without running it, once closed.
    pub(crate) fn with_mine<R>(&self, f: impl FnOnce(&mut S) -> R) -> Option<R> {
        let mine = self.threads.get_or(|| CachePadded::new(Mutex::new((self.new)())));
        let mut mine = mine.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock a last visit also takes: nothing slips in after it.
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        Some(f(&mut mine))
    }

    /// Runs `f` on every thread's state, threads that have ended included.
    pub(crate) fn visit(&self, mut f: impl FnMut(&mut S)) {
        for state in &self.threads {
            f(&mut state.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// From now on [`with_mine`](Self::with_mine) adds nothing. What is there stays, for a
    /// last [`visit`](Self::visit).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Closes, then empties every thread's state with `empty`, which says how many items it
    /// dropped; returns their sum. For a background thread that has ended.
    pub(crate) fn discard(&self, mut empty: impl FnMut(&mut S) -> u64) -> u64 {
        self.close();
        let mut dropped = 0;
        self.visit(|state| dropped += empty(state));
        dropped
    }
}

/// Emptied buffers the visiting thread gives back, for threads to take when they hand theirs
/// over: a new one would be fresh memory to fault in. At most a few are kept.
pub(crate) struct Recycled<T> {
    kept: Mutex<Vec<T>>,
}

impl<T> Recycled<T> {
    const KEPT: usize = 16;

    /// A kept buffer, else `new()`.
    pub(crate) fn take_or(&self, new: impl FnOnce() -> T) -> T {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner).pop();
        kept.unwrap_or_else(new)
    }

    /// Keeps `item` for a later [`take_or`](Self::take_or), unless enough are kept.
    pub(crate) fn keep(&self, item: T) {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() < Self::KEPT {
            kept.push(item);
        }
    }
}

impl<T> Default for Recycled<T> {
    fn default() -> Self {
        Recycled { kept: Mutex::default() }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_visit_sees_every_threads_state_and_nothing_is_added_once_closed() {
        let items = Arc::new(PerThread::new(Vec::new));
        let threads: Vec<_> = (0..4)
            .map(|n| {
                let items = Arc::clone(&items);
                std::thread::spawn(move || {
                    for i in 0..100 {
                        items.with_mine(|mine| mine.push(n * 1000 + i)).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let mut seen = Vec::new();
        items.visit(|state| seen.append(state));
        seen.sort_unstable();
        let expected: Vec<_> = (0..4).flat_map(|n| (0..100).map(move |i| n * 1000 + i)).collect();
        assert_eq!(seen, expected, "the items of threads that have ended too");

        items.close();
        assert_eq!(items.with_mine(|mine| mine.push(1)), None);
        let mut left = 0;
        items.visit(|state| left += state.len());
        assert_eq!(left, 0, "nothing added after closing");
    }
}
