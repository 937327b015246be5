//! The state agent threads and the span thread share: every thread's batch still gathering,
//! the emptied batches that go back, the count of spans handed over and not yet taken, and the
//! messages the span thread's channel carries.

use std::sync::atomic::{AtomicBool, AtomicUsize};

use crossbeam_channel::{bounded, Receiver, Sender};

use opentelemetry_sdk::error::OTelSdkResult;

use super::batch::ThreadSpans;
use crate::per_thread::{PerThread, Recycled};

/// What the span thread's channel carries. The channel has no bound of its own, and needs
/// none: the spans in it are counted against `OTEL_BSP_MAX_QUEUE_SIZE`, at most one `Wake` is
/// in it at a time, and flushes and shutdowns waiting are bounded ([`MAX_ASKS_WAITING`]). So
/// nothing is allocated for the queue up front, whatever its size.
pub(super) enum Message {
    /// A thread's batch of spans, boxed (and the box reused) so that messages stay small.
    Spans(Box<ThreadSpans>),
    /// A thread's batch has its first span: collect the batches. Sent only when none is
    /// already on its way (`Handoff::wake_pending`).
    Wake,
    /// Export everything queued before this message, then answer.
    Flush(Sender<OTelSdkResult>),
    /// Export everything queued before this message, shut the exporter down, answer, stop.
    Shutdown(Sender<OTelSdkResult>),
}

/// Spans a thread gathers before it hands them over at once (fewer for a small queue).
pub(super) const SPANS_PER_HANDOFF: usize = 64;

/// Flushes and shutdowns queued and not yet taken. A flush that times out behind a stalled
/// export leaves its message queued; beyond this many, a flush waits for room instead, until
/// its own timeout.
pub(super) const MAX_ASKS_WAITING: usize = 64;

/// The spans each thread has finished and the span thread has not taken yet, and the emptied
/// batches the threads take back.
pub(super) struct Handoff {
    /// Each thread's batch being filled; `None` until the thread's next span (a thread that
    /// has ended holds none).
    pub(super) threads: PerThread<Option<Box<ThreadSpans>>>,
    spare: Recycled<Box<ThreadSpans>>,
    pub(super) batch_spans: usize,
    /// A `Wake` is on its way: set by the thread that sends it, cleared by the span thread
    /// when it takes it, before it collects. A thread that finds it set sends none, since the
    /// collection that wake-up brings comes after the thread's span.
    pub(super) wake_pending: AtomicBool,
    /// One permit per flush or shutdown queued and not yet taken: a flush takes one before it
    /// is sent, waiting for room until its deadline, and the span thread gives it back as it
    /// takes the message; so at most [`MAX_ASKS_WAITING`] wait.
    pub(super) asks: (Sender<()>, Receiver<()>),
    /// Spans handed over and not yet taken by the span thread: never more than the queue's
    /// capacity. As in the SDK's batch processor, `OTEL_BSP_MAX_QUEUE_SIZE` bounds the spans
    /// waiting; the batch being built or exported, and threads' batches still gathering, are
    /// apart.
    pub(super) waiting: AtomicUsize,
    /// What those spans weigh: never more than the queue's capacity in bytes.
    pub(super) waiting_bytes: AtomicUsize,
}

impl Handoff {
    /// Nothing handed over yet; threads hand over `per_handoff` spans at a time.
    pub(super) fn new(per_handoff: usize) -> Self {
        Handoff {
            threads: PerThread::new(|| None),
            spare: Recycled::default(),
            batch_spans: per_handoff,
            wake_pending: AtomicBool::new(false),
            asks: bounded(MAX_ASKS_WAITING),
            waiting: AtomicUsize::new(0),
            waiting_bytes: AtomicUsize::new(0),
        }
    }

    #[allow(
        clippy::unnecessary_box_returns,
        reason = "the box crosses the queue and comes back, so that the queue's messages stay small"
    )]
    pub(super) fn spare_batch(&self) -> Box<ThreadSpans> {
        self.spare
            .take_or(|| Box::new(ThreadSpans::with_capacity(self.batch_spans)))
    }

    pub(super) fn recycle(&self, mut batch: Box<ThreadSpans>) {
        // A batch that grew (a huge task, or room for more spans than a handoff) is not kept.
        if batch.agents.reusable() && batch.built.capacity() <= self.batch_spans.next_power_of_two() {
            batch.clear();
            self.spare.keep(batch);
        }
    }

    /// Stops taking spans and empties every thread's batch unexported, for a span thread
    /// that has ended; returns how many spans that dropped.
    pub(super) fn discard(&self) -> u64 {
        self.threads
            .discard(|batch| batch.take().map_or(0, |batch| batch.len() as u64))
    }
}
