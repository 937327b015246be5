//! The span queue's sending side, which agent threads (and the SDK's spans) feed: a span joins
//! its thread's batch, a full batch is handed over whole unless the queue is full (then its
//! spans are dropped and counted, never the caller's time), and control messages (flush,
//! shutdown) are asked of the span thread and answered.

use crossbeam_channel::{bounded, unbounded, RecvTimeoutError, SendTimeoutError, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::SpanData;

use super::batch::{queued_weight, FinishedSpan, ThreadSpans, UsageText};
use super::export::CountingExporter;
use super::handoff::{Handoff, Message, SPANS_PER_HANDOFF};
use super::span_size;
use super::span_thread::{SpanBuilder, SpanThread};
use crate::background;
use crate::config::BatchSettings;
use crate::error::Result;
use crate::stats::{first_time, TelemetryStats};

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

/// Spans a thread hands over at a time: [`SPANS_PER_HANDOFF`], or half the queue if smaller.
fn spans_per_handoff(settings: BatchSettings) -> usize {
    SPANS_PER_HANDOFF.min(settings.max_queue_size / 2).max(1)
}

/// The queue's sending side, with the drop accounting.
pub(crate) struct SpanQueue {
    sender: Sender<Message>,
    handoff: Arc<Handoff>,
    stats: Arc<TelemetryStats>,
    capacity: usize,
    capacity_bytes: usize,
    /// How long `force_flush` waits for the export.
    pub(super) flush_timeout: Duration,
    shut_down: AtomicBool,
    /// Whether the first drop from this queue was reported.
    warned_full: AtomicBool,
    /// Whether the first span ended after shutdown was reported.
    warned_shut_down: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SpanQueue {
    /// Starts the processor's thread, which owns `exporter` from now on.
    pub(crate) fn start(
        exporter: CountingExporter,
        settings: BatchSettings,
        spans: SpanBuilder,
        flush_timeout: Duration,
        stats: Arc<TelemetryStats>,
    ) -> Result<Self> {
        let (sender, receiver) = unbounded();
        let handoff = Arc::new(Handoff::new(spans_per_handoff(settings)));
        let span_thread = SpanThread::new(Arc::clone(&handoff), exporter, spans, settings, Arc::clone(&stats));
        let thread = background::spawn("agent-tel-spans", move || span_thread.run(&receiver))?;
        Ok(SpanQueue::new(
            sender,
            handoff,
            settings,
            flush_timeout,
            stats,
            Some(thread),
        ))
    }

    /// The sending side of a queue whose span thread, `thread`, takes from `handoff` and the
    /// receiver of `sender`.
    fn new(
        sender: Sender<Message>,
        handoff: Arc<Handoff>,
        settings: BatchSettings,
        flush_timeout: Duration,
        stats: Arc<TelemetryStats>,
        thread: Option<JoinHandle<()>>,
    ) -> Self {
        SpanQueue {
            sender,
            handoff,
            stats,
            capacity: settings.max_queue_size,
            capacity_bytes: settings.max_queue_bytes,
            flush_timeout,
            shut_down: AtomicBool::new(false),
            warned_full: AtomicBool::new(false),
            warned_shut_down: AtomicBool::new(false),
            thread: Mutex::new(thread),
        }
    }

    /// Queues an agent span with its text, built on the processor's thread. It waits in the
    /// calling thread's batch until the batch is full or the processor collects it.
    pub(crate) fn queue_agent(&self, span: FinishedSpan, agent_name: &str, task: &str, usage: Option<UsageText<'_>>) {
        self.queue_mine(|mine| {
            mine.bytes += queued_weight(&span, agent_name, task, usage.as_ref());
            mine.agents.push(span, agent_name, task, usage);
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
        let spans = &self.handoff;
        // A full batch is handed over under its thread's lock: once the span thread has closed
        // and collected the batches, none is still on its way.
        let queued = spans.threads.with_mine(|slot| {
            let mine = slot.get_or_insert_with(|| spans.spare_batch());
            add(mine);
            match mine.len() {
                1 => Queued::First,
                n if n >= spans.batch_spans => slot.take().map_or(Queued::More, |full| self.hand_over(full)),
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
        let too_many = self
            .handoff
            .waiting
            .fetch_add(spans, Ordering::Relaxed)
            .saturating_add(spans)
            > self.capacity;
        let too_heavy = self
            .handoff
            .waiting_bytes
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes)
            > self.capacity_bytes;
        let take_back = || {
            self.handoff.waiting.fetch_sub(spans, Ordering::Relaxed);
            self.handoff.waiting_bytes.fetch_sub(bytes, Ordering::Relaxed);
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
        lost += self.handoff.discard();
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
    pub(super) fn ask(&self, message: fn(Sender<OTelSdkResult>) -> Message, timeout: Duration) -> OTelSdkResult {
        let deadline = background::deadline_after(timeout);
        let (permits, given_back) = &self.handoff.asks;
        // A thread that ended unexpectedly never gives back the permits of the asks it left.
        if background::has_finished(&self.thread) {
            return Err(self.gone());
        }
        if let Err(SendTimeoutError::Timeout(()) | SendTimeoutError::Disconnected(())) =
            permits.send_deadline((), deadline)
        {
            return Err(OTelSdkError::Timeout(timeout));
        }
        let (answer, answered) = bounded(1);
        if self.sender.send(message(answer)).is_err() {
            let _ = given_back.try_recv();
            return Err(self.gone());
        }
        match background::answer(&answered, deadline, &self.thread) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(self.gone()),
        }
    }

    /// Why the span thread took no message: shut down, or ended before it was asked to.
    fn gone(&self) -> OTelSdkError {
        if background::ended_unexpectedly(&self.thread) {
            OTelSdkError::InternalFailure(
                "the span thread has ended unexpectedly; its spans and every one since are counted in agent_telemetry_spans_dropped_total".into(),
            )
        } else {
            OTelSdkError::AlreadyShutdown
        }
    }

    pub(super) fn shutdown(&self, timeout: Duration) -> OTelSdkResult {
        if self.shut_down.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let result = self.ask(Message::Shutdown, timeout);
        if result.is_ok() {
            background::join_answered(&self.thread);
        }
        result
    }
}

impl std::fmt::Debug for SpanQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanQueue")
            .field("capacity", &self.capacity)
            .field("shut_down", &self.shut_down)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use opentelemetry_sdk::trace::InMemorySpanExporter;

    use super::*;
    use crate::execution::Execution;
    use crate::execution::SpanRole;
    use crate::scrub::Scrubber;
    use crate::test_support::{execution, Warnings};
    use crate::traces::batch::AgentBatch;
    use crate::traces::batch::UsageText;
    use crate::traces::export::Exporter;
    use crate::traces::handoff::MAX_ASKS_WAITING;
    use crate::traces::sdk_processor::SharedProcessor;
    use crate::traces::{AgentSpan, AgentTracer};
    use opentelemetry::Context;
    use opentelemetry_sdk::trace::{SpanExporter, SpanProcessor};
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc::Receiver;
    use std::time::Instant;

    fn span() -> SpanData {
        crate::test_support::span_data(Vec::new(), Vec::new())
    }

    /// A processor exporting into `exporter`, with a queue of `queue` spans.
    fn processor(
        exporter: InMemorySpanExporter,
        queue: usize,
        delay: Duration,
    ) -> (Arc<SpanQueue>, Arc<TelemetryStats>) {
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
    fn start(exporter: impl SpanExporter + 'static, settings: BatchSettings) -> (Arc<SpanQueue>, Arc<TelemetryStats>) {
        let stats = Arc::new(TelemetryStats::default());
        let exporter = CountingExporter::new(Exporter::Boxed(Box::new(exporter)), Arc::clone(&stats));
        let processor = SpanQueue::start(
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
    fn an_export_delay_of_zero_exports_spans_as_they_come() {
        // That the idle span thread then waits rather than spins: tests/idle_threads.rs.
        let exporter = InMemorySpanExporter::default();
        let (processor, _stats) = processor(exporter.clone(), 2048, Duration::ZERO);
        for round in 1..=3 {
            processor.queue(span());
            assert_eq!(exported_within_10_s(&exporter, round), round);
        }
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
    fn holding_an_export(queue: usize) -> (Arc<SpanQueue>, Arc<TelemetryStats>, std::sync::mpsc::Sender<()>) {
        holding_an_export_with(queue, crate::config::DEFAULT_MAX_QUEUE_BYTES)
    }

    /// [`holding_an_export`] with a queue of at most `queue_bytes` bytes.
    fn holding_an_export_with(
        queue: usize,
        queue_bytes: usize,
    ) -> (Arc<SpanQueue>, Arc<TelemetryStats>, std::sync::mpsc::Sender<()>) {
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
        let asks = || processor.handoff.asks.1.len();
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
        // The span thread is driven here, on the test's thread: it collects what three
        // threads left in batches of their own (two spans each, alive together so the batches
        // are three), then panics before it exports them.
        let stats = Arc::new(TelemetryStats::default());
        let settings = BatchSettings {
            max_queue_size: 64,
            max_export_batch_size: 64,
            scheduled_delay: Duration::from_secs(3600),
            max_queue_bytes: crate::config::DEFAULT_MAX_QUEUE_BYTES,
            max_export_bytes: crate::config::DEFAULT_MAX_EXPORT_BYTES,
        };
        let exporter = CountingExporter::new(
            Exporter::Boxed(Box::new(InMemorySpanExporter::default())),
            Arc::clone(&stats),
        );
        let (sender, receiver) = unbounded();
        let handoff = Arc::new(Handoff::new(spans_per_handoff(settings)));
        let builder = SpanBuilder::new(1024, Arc::new(Scrubber::off()));
        let mut span_thread = SpanThread::new(Arc::clone(&handoff), exporter, builder, settings, Arc::clone(&stats));
        let processor = SpanQueue::new(
            sender,
            handoff,
            settings,
            Duration::from_secs(5),
            Arc::clone(&stats),
            None,
        );
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
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            assert_eq!(span_thread.collect(), 6);
            panic!("the span thread dies holding what it collected");
        }));
        assert!(died.is_err());
        drop(receiver);
        assert_eq!(TelemetryStats::get(&stats.spans_exported), 0);
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
        tracer.export(span, SpanRole::Agent, execution);
    }

    /// A tracer that samples every span into `queue`, with no scrubbing.
    fn tracer_of(queue: &Arc<SpanQueue>) -> AgentTracer {
        AgentTracer::new(
            Arc::clone(queue),
            opentelemetry_sdk::trace::Sampler::AlwaysOn,
            1024,
            Arc::new(Scrubber::off()),
        )
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
        let tracer = tracer_of(&processor);
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
        let tracer = tracer_of(&processor);
        for (task, kept) in [("usual".to_owned(), true), ("long".repeat(10_000), false)] {
            let (span, mut execution) = agent_span(&tracer, "a", task);
            let mut batch = AgentBatch::with_capacity(4);
            batch.push(
                span.finish(SpanRole::Agent, &mut execution),
                &execution.agent_name,
                execution.task.as_deref().unwrap_or_default(),
                None,
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
    fn usages_cross_in_the_batch_each_with_its_own_span() {
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let (processor, _) = processor(InMemorySpanExporter::default(), 16, Duration::from_secs(3600));
        let tracer = tracer_of(&processor);
        let usage = |model, provider, input| UsageText {
            model,
            provider,
            tokens: crate::prices::Tokens {
                input,
                output: 2,
                cache_read: 1,
            },
            has_tokens: true,
        };
        let pushed = [
            ("planner", "Plan", Some(usage("gpt-4o", "openai", 10))),
            ("coder", "Code ü", None),
            ("", "", Some(usage("claude-sonnet-4", "", 7))),
            ("reviewer", "", Some(usage("", "", 0))),
        ];
        let mut batch = AgentBatch::with_capacity(4);
        for (agent_name, task, usage) in pushed {
            let (span, mut execution) = agent_span(&tracer, agent_name, task.to_owned());
            batch.push(span.finish(SpanRole::Agent, &mut execution), agent_name, task, usage);
        }
        let drained: Vec<_> = batch
            .drain()
            .map(|(_, agent_name, task, usage)| (agent_name, task, usage))
            .collect();
        assert_eq!(drained, pushed);
    }

    #[test]
    fn spans_gathered_per_thread_are_all_exported_and_late_ones_counted() {
        // The test's spans need a subscriber that enables them, for their metadata.
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let exporter = InMemorySpanExporter::default();
        let (processor, stats) = processor(exporter.clone(), 2048, Duration::from_secs(3600));
        let tracer = tracer_of(&processor);
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
