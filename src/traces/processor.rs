//! The span processor every exported span goes through, agent spans and the spans
//! `tracing-opentelemetry` builds alike: one thread builds the agent spans, batches and
//! exports. Spans gather in a batch of the thread that finished them (agent spans as the few
//! fields they are made of) and cross to it 64 at a time. A full queue drops (and counts)
//! spans, never the caller's time.
//!
//! It replaces the SDK's batch processor so that an agent span crosses threads once and is
//! built, exported and freed on one thread: the SDK's would take it built, one by one through
//! a queue every agent thread writes to (see `benches/README.md`).

use std::mem;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;

use super::agent_span::{AgentBatch, FinishedSpan, SpanBuilder};
use super::export::CountingExporter;
use super::span_size;
use crate::background::{self, Linger};
use crate::config::BatchSettings;
use crate::error::Result;
use crate::per_thread::{PerThread, Spares};
use crate::stats::{first_time, TelemetryStats};

/// What the span thread's channel carries. The channel has no bound of its own, and needs
/// none: the spans in it are counted against `OTEL_BSP_MAX_QUEUE_SIZE`, at most one `Wake` is
/// in it at a time, and flushes and shutdowns waiting are bounded ([`MAX_ASKS_WAITING`]). So
/// nothing is allocated for the queue up front, whatever its size.
enum Message {
    /// A thread's batch of spans, boxed (and the box reused) so that messages stay small.
    Spans(Box<ThreadSpans>),
    /// A thread's batch has its first span: collect the batches. Sent only when none is
    /// already on its way (`Batches::wake_pending`).
    Wake,
    /// Export everything queued before this message, then answer.
    Flush(SyncSender<OTelSdkResult>),
    /// Export everything queued before this message, shut the exporter down, answer, stop.
    Shutdown(SyncSender<OTelSdkResult>),
}

/// Spans a thread gathers before it hands them over at once (fewer for a small queue).
const SPANS_PER_HANDOFF: usize = 64;

/// Flushes and shutdowns queued and not yet taken. A flush that times out behind a stalled
/// export leaves its message queued; beyond this many, a flush waits for room instead, until
/// its own timeout.
const MAX_ASKS_WAITING: usize = 64;

/// Room made for an export batch before its spans come: the default batch (512) and more,
/// but not whatever `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` says (a batch of millions, or an
/// impossible allocation); a larger batch grows as it fills.
const EXPORT_BATCH_ROOM: usize = 4096;

/// An empty export batch for batches of `spans`.
fn export_batch(spans: usize) -> Vec<SpanData> {
    Vec::with_capacity(spans.min(EXPORT_BATCH_ROOM))
}

/// The spans one thread finished: agent spans as their parts, to be built on the span thread,
/// and the spans `tracing-opentelemetry` built. They cross together, and no span crosses
/// alone through the queue every thread writes to.
struct ThreadSpans {
    agents: AgentBatch,
    built: Vec<SpanData>,
    /// What the spans weigh (`span_size`), for the queue's bound in bytes.
    bytes: usize,
}

impl ThreadSpans {
    fn with_capacity(spans: usize) -> Self {
        ThreadSpans {
            agents: AgentBatch::with_capacity(spans),
            // Most threads finish agent spans only: room is made on the first other one.
            built: Vec::new(),
            bytes: 0,
        }
    }

    fn len(&self) -> usize {
        self.agents.len() + self.built.len()
    }

    fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.built.is_empty()
    }

    fn clear(&mut self) {
        self.agents.clear();
        self.built.clear();
        self.bytes = 0;
    }
}

/// The spans each thread has finished and the processor has not taken yet, and the emptied
/// batches the threads take back.
struct Batches {
    threads: PerThread<Box<ThreadSpans>>,
    spare: Spares<Box<ThreadSpans>>,
    per_handoff: usize,
    /// A `Wake` is on its way: set by the thread that sends it, cleared by the span thread
    /// when it takes it, before it collects. A thread that finds it set sends none, since the
    /// collection that wake-up brings comes after the thread's span.
    wake_pending: AtomicBool,
    /// Flushes and shutdowns queued and not yet taken (at most [`MAX_ASKS_WAITING`]).
    asks_waiting: AtomicUsize,
    /// Makes the span thread panic when it next takes a batch, to test what it counts then.
    #[cfg(test)]
    panic_on_take: AtomicBool,
    /// How many times the span thread has waited for messages.
    #[cfg(test)]
    rounds: AtomicUsize,
}

impl Batches {
    #[allow(
        clippy::unnecessary_box_returns,
        reason = "the box crosses the queue and comes back, so that the queue's messages stay small"
    )]
    fn spare_batch(&self) -> Box<ThreadSpans> {
        self.spare
            .take_or(|| Box::new(ThreadSpans::with_capacity(self.per_handoff)))
    }

    fn recycle(&self, mut batch: Box<ThreadSpans>) {
        // A batch that grew (a huge task, or room for more spans than a handoff) is not kept.
        if batch.agents.reusable() && batch.built.capacity() <= self.per_handoff.next_power_of_two() {
            batch.clear();
            self.spare.keep(batch);
        }
    }

    /// Stops taking spans and empties every thread's batch unexported, for a span thread
    /// that has ended; returns how many spans that dropped.
    fn discard(&self) -> u64 {
        self.threads.discard(|batch| {
            let dropped = batch.len() as u64;
            batch.clear();
            dropped
        })
    }
}

/// What became of a span.
enum Queued {
    /// It is the first in its thread's batch: the processor needs to hear of it.
    First,
    /// It joined spans the processor will take anyway.
    More,
    /// It filled its thread's batch, which was handed over.
    HandedOver,
    /// It filled its thread's batch, whose spans the full queue refused.
    Refused(u64),
    /// It filled its thread's batch, whose spans cannot be handed over: the span thread has
    /// ended.
    Lost(u64),
}

/// The queue's sending side, with the drop accounting.
pub(crate) struct CountingProcessor {
    sender: Sender<Message>,
    batches: Arc<Batches>,
    /// Spans handed over and not yet taken by the span thread: never more than `capacity`.
    /// As in the SDK's batch processor, `OTEL_BSP_MAX_QUEUE_SIZE` bounds the spans waiting;
    /// the batch being built or exported, and threads' batches still gathering, are apart.
    waiting: Arc<AtomicUsize>,
    /// What those spans weigh: never more than `capacity_bytes`.
    waiting_bytes: Arc<AtomicUsize>,
    stats: Arc<TelemetryStats>,
    capacity: usize,
    capacity_bytes: usize,
    /// How long `force_flush` waits for the export.
    flush_timeout: Duration,
    shut_down: AtomicBool,
    /// Whether the first drop from this queue was reported.
    warned_full: AtomicBool,
    /// Whether the first span ended after shutdown was reported.
    warned_shut_down: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl CountingProcessor {
    /// Starts the processor's thread, which owns `exporter` from now on.
    pub(crate) fn start(
        exporter: CountingExporter,
        settings: BatchSettings,
        spans: SpanBuilder,
        flush_timeout: Duration,
        stats: Arc<TelemetryStats>,
    ) -> Result<Self> {
        let (sender, receiver) = channel();
        let per_handoff = SPANS_PER_HANDOFF.min(settings.max_queue_size / 2).max(1);
        let batches = Arc::new(Batches {
            threads: PerThread::new(move || Box::new(ThreadSpans::with_capacity(per_handoff))),
            spare: Spares::default(),
            per_handoff,
            wake_pending: AtomicBool::new(false),
            asks_waiting: AtomicUsize::new(0),
            #[cfg(test)]
            panic_on_take: AtomicBool::new(false),
            #[cfg(test)]
            rounds: AtomicUsize::new(0),
        });
        let waiting = Arc::new(AtomicUsize::new(0));
        let waiting_bytes = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            batches: Arc::clone(&batches),
            waiting: Arc::clone(&waiting),
            waiting_bytes: Arc::clone(&waiting_bytes),
            unexported: 0,
            stats: Arc::clone(&stats),
            exporter,
            linger: Linger::new(settings.max_queue_size),
            spans,
            batch: export_batch(settings.max_export_batch_size),
            batch_bytes: 0,
            settings,
            exported: Ok(()),
        };
        let thread = background::spawn("agent-tel-spans", move || worker.run(&receiver))?;
        Ok(CountingProcessor {
            sender,
            batches,
            waiting,
            waiting_bytes,
            stats,
            capacity: settings.max_queue_size,
            capacity_bytes: settings.max_queue_bytes,
            flush_timeout,
            shut_down: AtomicBool::new(false),
            warned_full: AtomicBool::new(false),
            warned_shut_down: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues an agent span with its text, built on the processor's thread. It waits in the
    /// calling thread's batch until the batch is full or the processor collects it.
    pub(crate) fn queue_agent(&self, span: FinishedSpan, agent_name: &str, task: &str) {
        self.queue_mine(|mine| {
            mine.bytes += span.weight() + 2 * agent_name.len() + task.len();
            mine.agents.push(span, agent_name, task);
        });
    }

    /// Queues a span `tracing-opentelemetry` built, in the calling thread's batch too; the
    /// span thread scrubs and cuts it before export.
    pub(crate) fn queue(&self, span: SpanData) {
        self.queue_mine(|mine| {
            mine.bytes += span_size::of_span_data(&span);
            mine.built.push(span);
        });
    }

    /// Adds a span to the calling thread's batch with `add`, and hands the batch over once
    /// full.
    fn queue_mine(&self, add: impl FnOnce(&mut ThreadSpans)) {
        if self.shut_down.load(Ordering::Relaxed) {
            return self.dropped_after_shutdown(1);
        }
        let spans = &self.batches;
        // A full batch is handed over under its thread's lock: once the span thread has closed
        // and collected the batches, none is still on its way.
        let queued = spans.threads.with_mine(|mine| {
            add(mine);
            match mine.len() {
                1 => Queued::First,
                n if n >= spans.per_handoff => self.hand_over(mem::replace(mine, spans.spare_batch())),
                _ => Queued::More,
            }
        });
        match queued {
            Some(Queued::More | Queued::HandedOver) => {}
            // A wake-up still pending is cleared after this thread's span was added (else the
            // swap would see it cleared), so the collection that follows the clearing finds it.
            Some(Queued::First) => {
                if !spans.wake_pending.swap(true, Ordering::AcqRel) && self.sender.send(Message::Wake).is_err() {
                    self.span_thread_gone(0);
                }
            }
            Some(Queued::Refused(spans)) => self.dropped_full(spans),
            Some(Queued::Lost(spans)) => self.span_thread_gone(spans),
            None => self.dropped_after_shutdown(1),
        }
    }

    /// Queues a thread's full batch unless its spans would pass the queue's bound; the span
    /// thread takes them back off the count when it takes the batch. Called under that
    /// thread's lock, so it never blocks.
    fn hand_over(&self, batch: Box<ThreadSpans>) -> Queued {
        let (spans, bytes) = (batch.len(), batch.bytes);
        let too_many = self.waiting.fetch_add(spans, Ordering::Relaxed).saturating_add(spans) > self.capacity;
        let too_heavy = self
            .waiting_bytes
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes)
            > self.capacity_bytes;
        let take_back = || {
            self.waiting.fetch_sub(spans, Ordering::Relaxed);
            self.waiting_bytes.fetch_sub(bytes, Ordering::Relaxed);
        };
        if too_many || too_heavy {
            take_back();
            return Queued::Refused(spans as u64);
        }
        if self.sender.send(Message::Spans(batch)).is_err() {
            take_back();
            return Queued::Lost(spans as u64);
        }
        Queued::HandedOver
    }

    /// The span thread is gone: the spans waiting in threads' batches never leave either.
    fn span_thread_gone(&self, mut lost: u64) {
        lost += self.batches.discard();
        self.count_dropped(lost);
        if !self.shut_down.load(Ordering::Relaxed) {
            if first_time(&self.warned_shut_down) {
                tracing::error!(
                    target: "agent_telemetry::traces",
                    "the agent-telemetry span thread has ended unexpectedly; dropping every span from now on and counting them in agent_telemetry_spans_dropped_total"
                );
            }
        } else if lost > 0 && first_time(&self.warned_shut_down) {
            Self::warn_after_shutdown();
        }
    }

    fn dropped_full(&self, spans: u64) {
        self.count_dropped(spans);
        if first_time(&self.warned_full) {
            tracing::warn!(
                target: "agent_telemetry::traces",
                queue = "span export queue (OTEL_BSP_MAX_QUEUE_SIZE)",
                capacity = self.capacity,
                capacity_bytes = self.capacity_bytes,
                "queue full on the way to the span exporter; dropping spans and counting them in agent_telemetry_spans_dropped_total"
            );
        }
    }

    fn dropped_after_shutdown(&self, spans: u64) {
        self.count_dropped(spans);
        if first_time(&self.warned_shut_down) {
            Self::warn_after_shutdown();
        }
    }

    fn warn_after_shutdown() {
        tracing::warn!(
            target: "agent_telemetry::traces",
            "a span ended after the span export shut down; dropping it and counting it in agent_telemetry_spans_dropped_total"
        );
    }

    /// Counts spans lost on their way to the exporter. The queue that dropped them warns.
    fn count_dropped(&self, spans: u64) {
        TelemetryStats::add(&self.stats.spans_dropped, spans);
    }

    /// Sends a control message and waits for its answer.
    fn ask(&self, message: fn(SyncSender<OTelSdkResult>) -> Message, timeout: Duration) -> OTelSdkResult {
        let deadline = background::deadline_after(timeout);
        let asks = &self.batches.asks_waiting;
        while asks.fetch_add(1, Ordering::Relaxed) >= MAX_ASKS_WAITING {
            asks.fetch_sub(1, Ordering::Relaxed);
            if Instant::now() >= deadline {
                return Err(OTelSdkError::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (answer, answered) = sync_channel(1);
        if self.sender.send(message(answer)).is_err() {
            asks.fetch_sub(1, Ordering::Relaxed);
            return Err(OTelSdkError::AlreadyShutdown);
        }
        match answered.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(OTelSdkError::InternalFailure(
                "the span processor's thread has ended".into(),
            )),
        }
    }

    fn shutdown(&self, timeout: Duration) -> OTelSdkResult {
        if self.shut_down.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let result = self.ask(Message::Shutdown, timeout);
        if result.is_ok() {
            background::reap(&self.thread);
        }
        result
    }
}

impl std::fmt::Debug for CountingProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingProcessor")
            .field("capacity", &self.capacity)
            .field("shut_down", &self.shut_down)
            .finish_non_exhaustive()
    }
}

/// The provider's handle on the one processor the agent spans also use.
#[derive(Debug)]
pub(crate) struct SharedProcessor(pub Arc<CountingProcessor>);

impl SpanProcessor for SharedProcessor {
    fn on_start(&self, _: &mut Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.0.queue(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.ask(Message::Flush, self.0.flush_timeout)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown(timeout)
    }

    fn set_resource(&mut self, _: &Resource) {
        // Set on the exporter before its thread started (see `traces::build`).
    }
}

/// The processor's thread: builds, batches and exports.
struct Worker {
    batches: Arc<Batches>,
    waiting: Arc<AtomicUsize>,
    waiting_bytes: Arc<AtomicUsize>,
    /// Spans this thread has taken (handed over or collected) and not yet given to the
    /// exporter, which counts them from then on: the batches being taken, the export batch
    /// being built. Counted as dropped if this thread panics.
    unexported: usize,
    stats: Arc<TelemetryStats>,
    exporter: CountingExporter,
    linger: Linger,
    spans: SpanBuilder,
    batch: Vec<SpanData>,
    /// What `batch` weighs: an export holds at most `settings.max_export_bytes`, or one span.
    batch_bytes: usize,
    settings: BatchSettings,
    /// The first failed export of this round, if any.
    exported: OTelSdkResult,
}

impl Worker {
    fn run(mut self, receiver: &Receiver<Message>) {
        // Whatever exporting emits is not telemetry to export: that would loop.
        let _suppressed = Context::enter_telemetry_suppressed_scope();
        let mut next_export = background::deadline_after(self.settings.scheduled_delay);
        loop {
            // With nothing to export, nothing is due: wait for spans (their first in a thread's
            // batch sends a wake-up). An export delay of zero would spin here otherwise.
            let wait = if self.batch.is_empty() {
                Duration::MAX
            } else {
                next_export.saturating_duration_since(Instant::now())
            };
            #[cfg(test)]
            self.batches.rounds.fetch_add(1, Ordering::Relaxed);
            let first = match receiver.recv_timeout(wait) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                // Every sender is gone: nothing more can come, and nothing asked to shut down.
                Err(RecvTimeoutError::Disconnected) => {
                    self.collect();
                    return self.export();
                }
            };
            let mut next = first;
            let mut control = None;
            let mut taken = 0;
            self.exported = Ok(());
            // Take what is queued now, without waiting.
            while let Some(message) = next.take() {
                match self.take(message) {
                    Ok(spans) => taken += spans,
                    Err(control_message) => {
                        control = Some(control_message);
                        break;
                    }
                }
                next = receiver.try_recv().ok();
            }
            let mut answers = Vec::new();
            if let Some(Message::Shutdown(_)) = control {
                // Spans finished after this are counted as dropped, not left in a batch.
                self.batches.threads.close();
                self.collect();
                // Batches are handed over under their thread's lock, which the collection took
                // after closing: every one handed over is queued by now.
                while let Ok(message) = receiver.try_recv() {
                    if let Err(Message::Flush(answer)) = self.take(message) {
                        answers.push(answer);
                    }
                }
            } else {
                taken += self.collect();
            }
            if control.is_some() || Instant::now() >= next_export {
                self.export();
                next_export = background::deadline_after(self.settings.scheduled_delay);
            }
            match control {
                Some(Message::Flush(answer)) => {
                    let _ = answer.send(mem::replace(&mut self.exported, Ok(())));
                }
                Some(Message::Shutdown(answer)) => {
                    // The exporter reports a failure of its own shutdown (`report_shutdown`):
                    // the spans were exported before it, which is what the answer says.
                    let _ = self.exporter.shutdown();
                    let exported = mem::replace(&mut self.exported, Ok(()));
                    for flushed in answers {
                        let copy = match &exported {
                            Ok(()) => Ok(()),
                            Err(error) => Err(OTelSdkError::InternalFailure(error.to_string())),
                        };
                        let _ = flushed.send(copy);
                    }
                    let _ = answer.send(exported);
                    return;
                }
                // Never past the next scheduled export.
                _ => self
                    .linger
                    .sleep(taken, next_export.saturating_duration_since(Instant::now())),
            }
        }
    }

    /// Adds a message's spans to the export batch; returns how many, or gives back a control
    /// message.
    fn take(&mut self, message: Message) -> Result<usize, Message> {
        match message {
            Message::Spans(batch) => {
                // Taken: no longer waiting, as a span the SDK's processor receives.
                self.waiting.fetch_sub(batch.len(), Ordering::Relaxed);
                self.waiting_bytes.fetch_sub(batch.bytes, Ordering::Relaxed);
                self.unexported += batch.len();
                Ok(self.take_batch(batch))
            }
            Message::Wake => {
                // Before the collection that follows: a span added after it sends a new one.
                self.batches.wake_pending.store(false, Ordering::Release);
                Ok(0)
            }
            control => {
                self.batches.asks_waiting.fetch_sub(1, Ordering::Relaxed);
                Err(control)
            }
        }
    }

    /// Takes every thread's batch of spans, each swapped for an empty one (the
    /// threads' locks are held only for the swap); returns how many.
    fn collect(&mut self) -> usize {
        let mut collected = Vec::new();
        let spans = &self.batches;
        spans.threads.visit(|batch| {
            if !batch.is_empty() {
                collected.push(mem::replace(batch, spans.spare_batch()));
            }
        });
        // All of them, before any is taken: none is lost uncounted if taking one panics.
        self.unexported += collected.iter().map(|batch| batch.len()).sum::<usize>();
        collected.into_iter().map(|batch| self.take_batch(batch)).sum()
    }

    /// Adds a thread's batch to the export batch and gives it back emptied; returns how many
    /// spans it held.
    fn take_batch(&mut self, mut spans: Box<ThreadSpans>) -> usize {
        #[cfg(test)]
        assert!(
            !self.batches.panic_on_take.load(Ordering::SeqCst),
            "the test's panic while taking a batch"
        );
        let taken = spans.len();
        for (span, agent_name, task) in spans.agents.drain() {
            // Weighed as it was queued, without walking the built span again.
            let bytes = span.weight() + 2 * agent_name.len() + task.len();
            let span = self.spans.build(span, agent_name, task);
            self.add(span, bytes);
        }
        for mut span in spans.built.drain(..) {
            self.spans.scrub_and_cut(&mut span);
            let bytes = span_size::of_span_data(&span);
            self.add(span, bytes);
        }
        self.batches.recycle(spans);
        taken
    }

    /// Adds a span weighing `bytes` to the export batch, exporting it once full in spans or
    /// bytes; a span that would take the batch past its bytes goes into the next, alone if it
    /// is that heavy.
    fn add(&mut self, span: SpanData, bytes: usize) {
        if !self.batch.is_empty() && self.batch_bytes.saturating_add(bytes) > self.settings.max_export_bytes {
            self.export();
        }
        self.batch.push(span);
        self.batch_bytes = self.batch_bytes.saturating_add(bytes);
        if self.batch.len() >= self.settings.max_export_batch_size || self.batch_bytes >= self.settings.max_export_bytes
        {
            self.export();
        }
    }

    /// Exports the batch; the exporter counts and reports what it delivers and loses, and a
    /// failure is kept for the flush or shutdown this round answers.
    fn export(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = mem::replace(&mut self.batch, export_batch(self.settings.max_export_batch_size));
        self.batch_bytes = 0;
        // The exporter counts them from here, delivered or failed, even if it panics.
        self.unexported -= batch.len();
        let result = futures_executor::block_on(self.exporter.export(batch));
        if self.exported.is_ok() {
            self.exported = result;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A thread that panicked exports no more: count what was handed to it or taken by it,
        // and what waits in threads' batches; the spans finished from now on are counted as
        // they come.
        if std::thread::panicking() {
            // Threads' batches first: once closed and emptied, none is being handed over.
            let gathering = self.batches.discard();
            let handed_over = self.waiting.swap(0, Ordering::Relaxed) + self.unexported;
            self.waiting_bytes.store(0, Ordering::Relaxed);
            let lost = gathering + handed_over as u64;
            TelemetryStats::add(&self.stats.spans_dropped, lost);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::SystemTime;

    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status};
    use opentelemetry::InstrumentationScope;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanEvents, SpanLinks};

    use super::*;
    use crate::execution::Execution;
    use crate::scrub::Scrubber;
    use crate::test_support::{execution, Warnings};
    use crate::traces::export::Exporter;
    use crate::traces::{AgentSpan, AgentTracer};

    fn span() -> SpanData {
        SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed("tool_call"),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("test").build(),
        }
    }

    /// A processor exporting into `exporter`, with a queue of `queue` spans.
    fn processor(
        exporter: InMemorySpanExporter,
        queue: usize,
        delay: Duration,
    ) -> (Arc<CountingProcessor>, Arc<TelemetryStats>) {
        let settings = BatchSettings {
            max_queue_size: queue,
            max_export_batch_size: queue.min(512),
            scheduled_delay: delay,
            max_queue_bytes: crate::config::DEFAULT_MAX_QUEUE_BYTES,
            max_export_bytes: crate::config::DEFAULT_MAX_EXPORT_BYTES,
        };
        start(exporter, settings)
    }

    /// A processor exporting into `exporter` with `settings`, with its counts.
    fn start(
        exporter: impl SpanExporter + 'static,
        settings: BatchSettings,
    ) -> (Arc<CountingProcessor>, Arc<TelemetryStats>) {
        let stats = Arc::new(TelemetryStats::default());
        let exporter = CountingExporter::new(Exporter::Boxed(Box::new(exporter)), Arc::clone(&stats));
        let processor = CountingProcessor::start(
            exporter,
            settings,
            SpanBuilder::new(1024, Arc::new(Scrubber::off())),
            Duration::from_secs(5),
            Arc::clone(&stats),
        )
        .unwrap();
        (Arc::new(processor), stats)
    }

    #[test]
    fn flush_exports_every_span_queued_before_it() {
        let exporter = InMemorySpanExporter::default();
        let (processor, stats) = processor(exporter.clone(), 2048, Duration::from_secs(3600));
        for _ in 0..1000 {
            processor.queue(span());
        }
        SharedProcessor(Arc::clone(&processor)).force_flush().unwrap();
        assert_eq!(exporter.get_finished_spans().unwrap().len(), 1000);
        assert_eq!(TelemetryStats::get(&stats.spans_exported), 1000);
        assert_eq!(TelemetryStats::get(&stats.spans_dropped), 0);
    }

    #[test]
    fn exports_run_with_telemetry_suppressed_so_what_an_exporter_traces_does_not_loop() {
        /// Notes whether its export ran with telemetry suppressed, as the SDK's tracer and
        /// `tracing-opentelemetry` check before they make a span.
        #[derive(Debug)]
        struct Notes(Arc<AtomicBool>);
        impl SpanExporter for Notes {
            async fn export(&self, _: Vec<SpanData>) -> OTelSdkResult {
                self.0
                    .store(Context::current().is_telemetry_suppressed(), Ordering::SeqCst);
                Ok(())
            }
        }
        let suppressed = Arc::new(AtomicBool::new(false));
        let settings = BatchSettings {
            max_queue_size: 16,
            max_export_batch_size: 16,
            scheduled_delay: Duration::from_secs(3600),
            max_queue_bytes: crate::config::DEFAULT_MAX_QUEUE_BYTES,
            max_export_bytes: crate::config::DEFAULT_MAX_EXPORT_BYTES,
        };
        let (processor, stats) = start(Notes(Arc::clone(&suppressed)), settings);
        processor.queue(span());
        SharedProcessor(processor).force_flush().unwrap();
        assert_eq!(TelemetryStats::get(&stats.spans_exported), 1);
        assert!(
            suppressed.load(Ordering::SeqCst),
            "the export ran with telemetry suppressed"
        );
    }

    #[test]
    fn spans_go_out_on_schedule_without_a_flush() {
        let exporter = InMemorySpanExporter::default();
        let (processor, _stats) = processor(exporter.clone(), 2048, Duration::from_millis(20));
        processor.queue(span());
        assert_eq!(exported_within_10_s(&exporter, 1), 1, "exported by the schedule alone");
    }

    /// How many spans `exporter` holds once it holds `count`, or after 10 s: a bounded wait
    /// for the span thread, not a timing assertion.
    fn exported_within_10_s(exporter: &InMemorySpanExporter, count: usize) -> usize {
        let held = || exporter.get_finished_spans().unwrap().len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while held() < count && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        held()
    }

    #[test]
    fn a_span_alone_in_its_threads_batch_goes_out_without_a_flush_every_time() {
        // Exports of one and no schedule in sight: only a wake-up brings a lone span to the
        // span thread. Each round's wake-up is taken before the next span, which must send
        // its own.
        let exporter = InMemorySpanExporter::default();
        let settings = BatchSettings {
            max_queue_size: 2048,
            max_export_batch_size: 1,
            scheduled_delay: Duration::from_secs(3600),
            max_queue_bytes: crate::config::DEFAULT_MAX_QUEUE_BYTES,
            max_export_bytes: crate::config::DEFAULT_MAX_EXPORT_BYTES,
        };
        let (processor, _stats) = start(exporter.clone(), settings);
        for round in 1..=20 {
            processor.queue(span());
            assert_eq!(exported_within_10_s(&exporter, round), round, "span {round} went out");
        }
    }

    #[test]
    fn an_export_delay_of_zero_exports_spans_as_they_come_and_the_idle_thread_waits() {
        let exporter = InMemorySpanExporter::default();
        let (processor, _stats) = processor(exporter.clone(), 2048, Duration::ZERO);
        for round in 1..=3 {
            processor.queue(span());
            assert_eq!(exported_within_10_s(&exporter, round), round);
        }
        // Time for a spinning thread to go round thousands of times.
        std::thread::sleep(Duration::from_millis(50));
        let before = processor.batches.rounds.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        let idle_rounds = processor.batches.rounds.load(Ordering::Relaxed) - before;
        // One, if the thread was held off the CPU before the round that found nothing.
        assert!(
            idle_rounds <= 1,
            "the idle span thread waits for spans: {idle_rounds} rounds"
        );
    }

    #[test]
    fn a_queue_and_export_batch_of_any_size_are_allocated_as_spans_come_not_up_front() {
        let exporter = InMemorySpanExporter::default();
        let settings = BatchSettings {
            max_queue_size: usize::MAX,
            max_export_batch_size: usize::MAX,
            scheduled_delay: Duration::from_secs(3600),
            max_queue_bytes: crate::config::DEFAULT_MAX_QUEUE_BYTES,
            max_export_bytes: crate::config::DEFAULT_MAX_EXPORT_BYTES,
        };
        let (processor, stats) = start(exporter.clone(), settings);
        for _ in 0..1000 {
            processor.queue(span());
        }
        SharedProcessor(processor).force_flush().unwrap();
        assert_eq!(exporter.get_finished_spans().unwrap().len(), 1000);
        assert_eq!(TelemetryStats::get(&stats.spans_dropped), 0);
    }

    /// Remembers how many spans, and what they weighed, each export held.
    #[derive(Debug, Clone, Default)]
    struct Weighing(Arc<Mutex<Vec<(usize, usize)>>>);

    impl SpanExporter for Weighing {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let bytes = batch.iter().map(span_size::of_span_data).sum();
            self.0.lock().unwrap().push((batch.len(), bytes));
            Ok(())
        }
    }

    /// A built span carrying `bytes` bytes of attribute text, in attributes of 1000.
    fn span_of(bytes: usize) -> SpanData {
        let attributes = (0..bytes.div_ceil(1000))
            .map(|n| opentelemetry::KeyValue::new(format!("a{n}"), "x".repeat(1000)))
            .collect();
        SpanData { attributes, ..span() }
    }

    #[test]
    fn export_requests_are_cut_by_bytes_and_a_heavy_span_goes_alone() {
        let weighing = Weighing::default();
        let settings = BatchSettings {
            max_queue_size: 4096,
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_secs(3600),
            max_queue_bytes: crate::config::DEFAULT_MAX_QUEUE_BYTES,
            max_export_bytes: 20_000,
        };
        let (processor, stats) = start(weighing.clone(), settings);
        for n in 0..100 {
            // Every tenth span alone weighs more than an export may hold.
            processor.queue(span_of(if n % 10 == 0 { 50_000 } else { 3_000 }));
        }
        SharedProcessor(processor).force_flush().unwrap();
        let exports = weighing.0.lock().unwrap().clone();
        assert_eq!(exports.iter().map(|(spans, _)| spans).sum::<usize>(), 100);
        assert_eq!(TelemetryStats::get(&stats.spans_exported), 100);
        for &(spans, bytes) in &exports {
            assert!(
                bytes <= 20_000 || spans == 1,
                "{spans} spans of {bytes} bytes in one export"
            );
        }
        let alone = exports
            .iter()
            .filter(|&&(spans, bytes)| spans == 1 && bytes > 50_000)
            .count();
        assert_eq!(alone, 10, "each heavy span in an export of its own: {exports:?}");
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_as_well_as_spans() {
        // Room for 8 spans (handed over 4 at a time) but 100 kB: while an export holds the
        // span thread, one handoff of 4 spans of 20 kB fits, the next two do not.
        let (processor, stats, let_go) = holding_an_export_with(8, 100_000);
        for _ in 0..12 {
            processor.queue(span_of(20_000));
        }
        assert_eq!(TelemetryStats::get(&stats.spans_dropped), 8, "refused by bytes");
        drop(let_go);
        SharedProcessor(processor).force_flush().unwrap();
        assert_eq!(TelemetryStats::get(&stats.spans_exported), 4 + 4);
    }

    #[test]
    fn built_spans_string_values_are_cut_at_the_attribute_limit() {
        let memory = InMemorySpanExporter::default();
        let (processor, _) = processor(memory.clone(), 16, Duration::from_secs(3600));
        processor.queue(SpanData {
            attributes: vec![opentelemetry::KeyValue::new("prompt", "y".repeat(5000))],
            ..span()
        });
        SharedProcessor(processor).force_flush().unwrap();
        let spans = memory.get_finished_spans().unwrap();
        let value = spans[0].attributes[0].value.as_str().into_owned();
        assert_eq!(value, format!("{}…", "y".repeat(1024)), "cut at the default limit");
    }

    #[test]
    fn a_full_queue_drops_counts_and_warns_once() {
        let memory = InMemorySpanExporter::default();
        let (processor, stats) = processor(memory.clone(), 4, Duration::from_secs(3600));
        let warnings = Warnings::with_target("agent_telemetry::traces");
        tracing::dispatcher::with_default(&warnings.dispatch(), || {
            for _ in 0..100_000 {
                processor.queue(span());
            }
        });
        SharedProcessor(Arc::clone(&processor)).force_flush().unwrap();
        let exported = TelemetryStats::get(&stats.spans_exported);
        let dropped = TelemetryStats::get(&stats.spans_dropped);
        assert_eq!(exported + dropped, 100_000, "every span exported or counted");
        assert_eq!(memory.get_finished_spans().unwrap().len() as u64, exported);
        assert!(dropped > 0, "a queue of 4 cannot take 100000 spans sent back to back");
        let warnings = warnings.messages();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("queue full on the way to the span exporter"),
            "{warnings:?}"
        );
    }

    /// Says when an export begins, then holds it until the test lets go.
    #[derive(Debug)]
    struct Held {
        began: Mutex<std::sync::mpsc::Sender<()>>,
        release: Mutex<Receiver<()>>,
    }

    impl SpanExporter for Held {
        async fn export(&self, _: Vec<SpanData>) -> OTelSdkResult {
            let _ = self.began.lock().unwrap().send(());
            // Returns once the test drops its sender.
            let _ = self.release.lock().unwrap().recv();
            Ok(())
        }
    }

    /// A processor with a queue of `queue` spans and exports of 4, whose exporter holds every
    /// export, holding its first: 4 spans queued and taken. Dropping the sender lets go.
    fn holding_an_export(queue: usize) -> (Arc<CountingProcessor>, Arc<TelemetryStats>, std::sync::mpsc::Sender<()>) {
        holding_an_export_with(queue, crate::config::DEFAULT_MAX_QUEUE_BYTES)
    }

    /// [`holding_an_export`] with a queue of at most `queue_bytes` bytes.
    fn holding_an_export_with(
        queue: usize,
        queue_bytes: usize,
    ) -> (Arc<CountingProcessor>, Arc<TelemetryStats>, std::sync::mpsc::Sender<()>) {
        let (began, export_began) = std::sync::mpsc::channel();
        let (let_go, release) = std::sync::mpsc::channel();
        let held = Held {
            began: Mutex::new(began),
            release: Mutex::new(release),
        };
        let settings = BatchSettings {
            max_queue_size: queue,
            max_export_batch_size: 4,
            scheduled_delay: Duration::from_secs(3600),
            max_queue_bytes: queue_bytes,
            max_export_bytes: crate::config::DEFAULT_MAX_EXPORT_BYTES,
        };
        let (processor, stats) = start(held, settings);
        for _ in 0..4 {
            processor.queue(span());
        }
        export_began
            .recv_timeout(Duration::from_secs(10))
            .expect("the first 4 spans are exported");
        (processor, stats, let_go)
    }

    #[test]
    fn the_queue_bound_counts_spans_waiting_not_the_batch_being_exported() {
        // Threads hand over 4 spans at a time (half the queue), and an export takes 4.
        let (processor, stats, let_go) = holding_an_export(8);
        // The 4 being exported are not waiting: 8 more wait, the next 4 are dropped.
        for _ in 0..12 {
            processor.queue(span());
        }
        assert_eq!(
            TelemetryStats::get(&stats.spans_dropped),
            4,
            "a queue of 8 takes 8 while 4 export"
        );
        drop(let_go);
        SharedProcessor(processor).force_flush().unwrap();
        assert_eq!(TelemetryStats::get(&stats.spans_exported), 12);
    }

    #[test]
    fn flushes_that_time_out_behind_a_stalled_export_queue_no_more_than_the_bound() {
        let (processor, _stats, let_go) = holding_an_export(64);
        let asks = || processor.batches.asks_waiting.load(Ordering::Relaxed);
        for _ in 0..MAX_ASKS_WAITING + 20 {
            let flushed = processor.ask(Message::Flush, Duration::from_millis(1));
            assert!(matches!(flushed, Err(OTelSdkError::Timeout(_))), "{flushed:?}");
        }
        assert_eq!(asks(), MAX_ASKS_WAITING, "flushes left queued behind the export");
        drop(let_go);
        processor
            .ask(Message::Flush, Duration::from_secs(10))
            .expect("once the export returns, the queued flushes are taken and a new one answered");
        assert_eq!(asks(), 0);
    }

    #[test]
    fn a_span_thread_that_panics_counts_every_span_it_held_as_dropped() {
        let (processor, stats, let_go) = holding_an_export(64);
        // While the export holds the span thread, three threads leave two spans each in
        // batches of their own (alive together, so the batches are three), which it then
        // collects together and panics taking.
        let queued = std::sync::Barrier::new(4);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    processor.queue(span());
                    processor.queue(span());
                    queued.wait();
                });
            }
            queued.wait();
        });
        processor.batches.panic_on_take.store(true, Ordering::SeqCst);
        drop(let_go);
        let span_thread = processor.thread.lock().unwrap().take().unwrap();
        assert!(span_thread.join().is_err(), "the span thread panicked");
        assert_eq!(TelemetryStats::get(&stats.spans_exported), 4);
        assert_eq!(
            TelemetryStats::get(&stats.spans_dropped),
            6,
            "the three batches it took"
        );
        processor.queue(span());
        assert_eq!(
            TelemetryStats::get(&stats.spans_dropped),
            7,
            "a span after it is counted as it comes"
        );
    }

    /// Exports an agent span of `tracer`'s, with `agent_name` and `task`.
    fn export_agent_span(tracer: &AgentTracer, agent_name: &str, task: String) {
        let (span, execution) = agent_span(tracer, agent_name, task);
        tracer.export(span, execution);
    }

    /// An agent span of `tracer`'s, and its execution, with `agent_name` and `task`.
    fn agent_span(tracer: &AgentTracer, agent_name: &str, task: String) -> (AgentSpan, Execution) {
        let span = tracing::info_span!("agent_execution");
        let metadata = span.metadata().expect("a callsite's span has metadata");
        let execution = Execution {
            agent_name: agent_name.into(),
            task: Some(task),
            ..execution()
        };
        (tracer.start(&Context::new(), metadata), execution)
    }

    #[test]
    fn every_span_queued_while_the_processor_shuts_down_is_exported_or_counted() {
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let (processor, stats) = processor(InMemorySpanExporter::default(), 2048, Duration::from_secs(3600));
        let tracer = AgentTracer::new(
            Arc::clone(&processor),
            opentelemetry_sdk::trace::Sampler::AlwaysOn,
            1024,
            Arc::new(Scrubber::off()),
        );
        let (threads, per_thread) = (4, 50_000);
        std::thread::scope(|scope| {
            for thread in 0..threads {
                let (tracer, processor) = (&tracer, &processor);
                scope.spawn(move || {
                    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
                    for i in 0..per_thread {
                        if i % 2 == 0 {
                            export_agent_span(tracer, "a", format!("{thread}/{i}"));
                        } else {
                            processor.queue(span());
                        }
                    }
                });
            }
            // While the threads queue, most likely: the sum below holds either way.
            std::thread::sleep(Duration::from_millis(2));
            SharedProcessor(Arc::clone(&processor))
                .shutdown_with_timeout(Duration::from_secs(30))
                .unwrap();
        });
        let exported = TelemetryStats::get(&stats.spans_exported);
        let dropped = TelemetryStats::get(&stats.spans_dropped);
        assert_eq!(
            exported + dropped,
            threads * per_thread,
            "{exported} exported, {dropped} dropped"
        );
    }

    #[test]
    fn a_batch_whose_text_grew_past_its_room_is_not_kept() {
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let (processor, _) = processor(InMemorySpanExporter::default(), 16, Duration::from_secs(3600));
        let tracer = AgentTracer::new(
            Arc::clone(&processor),
            opentelemetry_sdk::trace::Sampler::AlwaysOn,
            1024,
            Arc::new(Scrubber::off()),
        );
        for (task, kept) in [("usual".to_owned(), true), ("long".repeat(10_000), false)] {
            let (span, mut execution) = agent_span(&tracer, "a", task);
            let mut batch = AgentBatch::with_capacity(4);
            batch.push(
                span.finish(&mut execution),
                &execution.agent_name,
                execution.task.as_deref().unwrap_or_default(),
            );
            batch.clear();
            assert_eq!(
                batch.reusable(),
                kept,
                "{} bytes of text",
                execution.task.as_deref().map_or(0, str::len)
            );
        }
    }

    #[test]
    fn spans_gathered_per_thread_are_all_exported_and_late_ones_counted() {
        // The test's spans need a subscriber that enables them, for their metadata.
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let exporter = InMemorySpanExporter::default();
        let (processor, stats) = processor(exporter.clone(), 2048, Duration::from_secs(3600));
        let tracer = AgentTracer::new(
            Arc::clone(&processor),
            opentelemetry_sdk::trace::Sampler::AlwaysOn,
            1024,
            Arc::new(Scrubber::off()),
        );
        // Fewer than a batch on some threads, several batches on others, agent spans and
        // every third iteration a built span among them; every thread has ended before the
        // flush.
        let runs = [(0, 1), (1, 63), (2, 64), (3, 200)];
        std::thread::scope(|scope| {
            for (thread, spans) in runs {
                let (tracer, processor) = (&tracer, &processor);
                scope.spawn(move || {
                    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
                    for i in 0..spans {
                        // Text of varied lengths, not all ASCII, side by side in a batch.
                        export_agent_span(
                            tracer,
                            &format!("agent-é{thread}"),
                            format!("{thread}/{i}{}", "ü".repeat(i % 5)),
                        );
                        if i % 3 == 0 {
                            let name = Cow::Owned(format!("built {thread}/{i}"));
                            processor.queue(SpanData { name, ..span() });
                        }
                    }
                });
            }
        });
        SharedProcessor(Arc::clone(&processor)).force_flush().unwrap();
        let (built, spans): (Vec<_>, Vec<_>) = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .partition(|span| span.name.starts_with("built "));
        let mut built: Vec<_> = built.into_iter().map(|span| span.name.into_owned()).collect();
        built.sort();
        let mut expected: Vec<_> = runs
            .iter()
            .flat_map(|&(thread, spans)| (0..spans).step_by(3).map(move |i| format!("built {thread}/{i}")))
            .collect();
        expected.sort();
        assert_eq!(built, expected, "every built span exported once");
        let attribute = |span: &SpanData, key: &str| {
            let kv = span.attributes.iter().find(|kv| kv.key.as_str() == key);
            kv.map(|kv| kv.value.as_str().into_owned())
        };
        let mut tasks = Vec::new();
        for span in &spans {
            let task = attribute(span, "task").expect("every agent span has its task");
            let (thread, rest) = task.split_once('/').expect("the task as sent");
            let i: usize = rest.trim_end_matches('ü').parse().expect("the task as sent");
            assert_eq!(rest.len() - i.to_string().len(), "ü".len() * (i % 5), "{task}");
            let agent = format!("agent-é{thread}");
            assert_eq!(attribute(span, "agent.name").as_deref(), Some(agent.as_str()), "{task}");
            assert_eq!(
                attribute(span, "gen_ai.agent.name").as_deref(),
                Some(agent.as_str()),
                "{task}"
            );
            tasks.push(task);
        }
        let total = 1 + 63 + 64 + 200;
        assert_eq!(tasks.len(), total, "every span exported");
        tasks.sort();
        tasks.dedup();
        assert_eq!(tasks.len(), total, "each one once");
        let all_spans = (total + expected.len()) as u64;
        assert_eq!(TelemetryStats::get(&stats.spans_exported), all_spans);
        assert_eq!(TelemetryStats::get(&stats.spans_dropped), 0);

        SharedProcessor(Arc::clone(&processor))
            .shutdown_with_timeout(Duration::from_secs(5))
            .unwrap();
        export_agent_span(&tracer, "a", "late".into());
        processor.queue(span());
        assert_eq!(TelemetryStats::get(&stats.spans_dropped), 2, "finished after shutdown");
    }

    #[test]
    fn spans_after_shutdown_are_counted_and_the_warning_says_why() {
        let exporter = InMemorySpanExporter::default();
        let (processor, stats) = processor(exporter.clone(), 16, Duration::from_secs(3600));
        processor.queue(span());
        SharedProcessor(Arc::clone(&processor))
            .shutdown_with_timeout(Duration::from_secs(5))
            .unwrap();
        // (The in-memory exporter forgets its spans when it shuts down.)
        assert_eq!(
            TelemetryStats::get(&stats.spans_exported),
            1,
            "shutdown exports what is queued"
        );
        let warnings = Warnings::with_target("agent_telemetry::traces");
        tracing::dispatcher::with_default(&warnings.dispatch(), || {
            for _ in 0..3 {
                processor.queue(span());
            }
        });
        assert_eq!(TelemetryStats::get(&stats.spans_dropped), 3);
        let warnings = warnings.messages();
        assert_eq!(warnings.len(), 1, "one warning for the three: {warnings:?}");
        assert!(warnings[0].contains("after the span export shut down"), "{warnings:?}");
        assert!(!warnings[0].contains("queue full"), "{warnings:?}");
    }
}
