//! The span thread: takes the threads' batches, builds the agent spans from their parts (with
//! the guide's, GenAI and OpenInference attributes), scrubs and cuts the spans
//! `tracing-opentelemetry` built, and exports them in batches bounded in spans and bytes.

use std::borrow::Cow;
use std::mem;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use opentelemetry::trace::{SpanContext, Status as SpanStatus, TraceState};
use opentelemetry::{Context, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};

use super::attributes;
use super::batch::{queued_weight, FinishedSpan, ThreadSpans, UsageText};
use super::export::CountingExporter;
use super::fields::push_location;
use super::handoff::{Handoff, Message};
use super::span_size;
use crate::background::{self, Pacing};
use crate::config::BatchSettings;
use crate::execution::SpanRole;
use crate::scrub::Scrubber;
use crate::stats::TelemetryStats;
use crate::text::{cut, shared_name};

/// Room made for an export batch before its spans come: the default batch (512) and more,
/// but not whatever `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` says (a batch of millions, or an
/// impossible allocation); a larger batch grows as it fills.
const EXPORT_BATCH_ROOM: usize = 4096;

/// An empty export batch for batches of `spans`.
fn export_batch(spans: usize) -> Vec<SpanData> {
    Vec::with_capacity(spans.min(EXPORT_BATCH_ROOM))
}

/// Builds finished agent spans, and finishes the spans `tracing-opentelemetry` built, on the
/// span thread.
#[derive(Debug)]
pub(crate) struct SpanBuilder {
    scope: InstrumentationScope,
    /// The task, the status description and built spans' text are cut at this many
    /// characters ...
    value_chars: usize,
    /// ... built spans' scrubbed by these rules first (agent spans' fields were, as they were
    /// recorded).
    scrubber: Arc<Scrubber>,
}

impl SpanBuilder {
    pub(crate) fn new(value_chars: usize, scrubber: Arc<Scrubber>) -> Self {
        SpanBuilder {
            scope: InstrumentationScope::builder("agent_telemetry").build(),
            value_chars,
            scrubber,
        }
    }

    /// Scrubs a span `tracing-opentelemetry` built and cuts its text, as agent spans are.
    pub(crate) fn scrub_and_cut(&self, span: &mut SpanData) {
        span_size::scrub_and_cut(span, &self.scrubber, self.value_chars);
    }

    /// The finished span, with the guide's, GenAI and OpenInference attributes of its role.
    /// The agent's name is this thread's shared copy, so the span thread frees only what it
    /// allocated.
    pub(crate) fn build(
        &self,
        span: FinishedSpan,
        agent_name: &str,
        task: &str,
        usage: Option<UsageText<'_>>,
    ) -> SpanData {
        let rare = span.rare.map(|rare| *rare);
        let extra_attributes = rare.as_ref().map_or(0, |rare| rare.attributes.len());
        let usage_attributes = if usage.is_some() { 11 } else { 0 };
        let mut attributes = Vec::with_capacity(10 + extra_attributes + usage_attributes);
        match span.role {
            SpanRole::Agent => {
                let agent_name = Value::String(shared_name(agent_name).into());
                attributes.extend([
                    KeyValue::new(attributes::AGENT_NAME, agent_name.clone()),
                    KeyValue::new(attributes::RESULT_STATUS, span.status.as_str()),
                    KeyValue::new(attributes::GEN_AI_OPERATION_NAME, attributes::INVOKE_AGENT),
                    KeyValue::new(attributes::GEN_AI_AGENT_NAME, agent_name),
                    KeyValue::new(attributes::OPENINFERENCE_SPAN_KIND, attributes::AGENT_SPAN_KIND),
                ]);
            }
            SpanRole::ModelCall(operation) => attributes.extend([
                KeyValue::new(attributes::GEN_AI_OPERATION_NAME, operation.as_str()),
                KeyValue::new(attributes::OPENINFERENCE_SPAN_KIND, attributes::LLM_SPAN_KIND),
            ]),
            SpanRole::GenAi => {}
        }
        if let Some(usage) = usage {
            push_usage(&mut attributes, span.role, &usage);
        }
        if span.has_task {
            attributes.push(KeyValue::new(
                attributes::TASK,
                cut(task, self.value_chars).into_owned(),
            ));
        }
        push_location(&mut attributes, span.metadata);
        let mut name = Cow::Borrowed(span.metadata.name());
        let mut trace_state = TraceState::default();
        let mut status = SpanStatus::Unset;
        let mut events = SpanEvents::default();
        let mut links = SpanLinks::default();
        if let Some(rare) = rare {
            if let Some(failure) = &rare.failure {
                attributes.push(KeyValue::new(attributes::ERROR_TYPE, failure.error_type().to_owned()));
                status = SpanStatus::error(cut(failure.description(), self.value_chars).into_owned());
            }
            // Ours first: a field that happens to share a key does not make it appear twice.
            let ours = attributes.len();
            for attribute in rare.attributes {
                if !attributes[..ours].iter().any(|kv| kv.key == attribute.key) {
                    attributes.push(attribute);
                }
            }
            if let Some(renamed) = rare.name {
                name = Cow::Owned(renamed);
            }
            trace_state = rare.trace_state;
            events.events = rare.events;
            events.dropped_count = rare.dropped_events;
            links.links = rare.links;
            links.dropped_count = rare.dropped_links;
        }
        SpanData {
            span_context: SpanContext::new(span.trace_id, span.span_id, span.flags, false, trace_state),
            parent_span_id: span.parent_span_id,
            parent_span_is_remote: span.parent_is_remote,
            span_kind: span.kind,
            name,
            start_time: span.end_time.checked_sub(span.duration).unwrap_or(span.end_time),
            end_time: span.end_time,
            attributes,
            dropped_attributes_count: 0,
            events,
            links,
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// The GenAI and OpenInference attributes of a span's usage: an agent's totals, a model call's
/// own. The names are this thread's shared copies.
fn push_usage(attributes: &mut Vec<KeyValue>, role: SpanRole, usage: &UsageText<'_>) {
    let call = matches!(role, SpanRole::ModelCall(_));
    let name = |text: &str| Value::String(shared_name(text).into());
    if !usage.model.is_empty() {
        let model = name(usage.model);
        if call {
            attributes.push(KeyValue::new(attributes::LLM_MODEL_NAME, model.clone()));
        }
        attributes.push(KeyValue::new(attributes::GEN_AI_REQUEST_MODEL, model));
    }
    if !usage.provider.is_empty() {
        let provider = name(usage.provider);
        if call {
            attributes.push(KeyValue::new(attributes::LLM_PROVIDER, provider.clone()));
        }
        attributes.push(KeyValue::new(attributes::GEN_AI_PROVIDER_NAME, provider));
    }
    if usage.has_tokens {
        let count = |tokens: u64| Value::I64(i64::try_from(tokens).unwrap_or(i64::MAX));
        let tokens = usage.tokens;
        attributes.extend(
            [
                (attributes::GEN_AI_USAGE_INPUT_TOKENS, tokens.input),
                (attributes::GEN_AI_USAGE_OUTPUT_TOKENS, tokens.output),
                (attributes::GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, tokens.cache_read),
                (attributes::LLM_TOKEN_COUNT_PROMPT, tokens.input),
                (attributes::LLM_TOKEN_COUNT_COMPLETION, tokens.output),
                (attributes::LLM_TOKEN_COUNT_TOTAL, tokens.total()),
                (attributes::LLM_TOKEN_COUNT_PROMPT_CACHE_READ, tokens.cache_read),
            ]
            .map(|(key, value)| KeyValue::new(key, count(value))),
        );
    }
}

/// The span thread: builds agent spans, batches and exports.
pub(super) struct SpanThread {
    handoff: Arc<Handoff>,
    /// Spans this thread has taken (handed over or collected) and not yet given to the
    /// exporter, which counts them from then on: the batches being taken, the export batch
    /// being built. Counted as dropped if this thread panics.
    unexported: usize,
    stats: Arc<TelemetryStats>,
    exporter: CountingExporter,
    linger: Pacing,
    spans: SpanBuilder,
    batch: Vec<SpanData>,
    /// What `batch` weighs: an export holds at most `settings.max_export_bytes`, or one span.
    batch_bytes: usize,
    settings: BatchSettings,
    /// The first failed export of this round, if any.
    exported: OTelSdkResult,
}

impl SpanThread {
    /// The span thread's state, before it runs: it exports to `exporter`.
    pub(super) fn new(
        handoff: Arc<Handoff>,
        exporter: CountingExporter,
        spans: SpanBuilder,
        settings: BatchSettings,
        stats: Arc<TelemetryStats>,
    ) -> Self {
        SpanThread {
            handoff,
            unexported: 0,
            stats,
            exporter,
            linger: Pacing::new(settings.max_queue_size),
            spans,
            batch: export_batch(settings.max_export_batch_size),
            batch_bytes: 0,
            settings,
            exported: Ok(()),
        }
    }

    /// Takes spans and control messages until told to shut down, or until every sender is gone.
    pub(super) fn run(mut self, receiver: &Receiver<Message>) {
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
                self.handoff.threads.close();
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
    pub(super) fn take(&mut self, message: Message) -> Result<usize, Message> {
        match message {
            Message::Spans(batch) => {
                // Taken: no longer waiting, as a span the SDK's processor receives.
                self.handoff.waiting.fetch_sub(batch.len(), Ordering::Relaxed);
                self.handoff.waiting_bytes.fetch_sub(batch.bytes, Ordering::Relaxed);
                self.unexported += batch.len();
                Ok(self.take_batch(batch))
            }
            Message::Wake => {
                // Before the collection that follows: a span added after it sends a new one.
                self.handoff.wake_pending.store(false, Ordering::Release);
                Ok(0)
            }
            control => {
                // Its permit goes back: room for the next flush.
                let _ = self.handoff.asks.1.try_recv();
                Err(control)
            }
        }
    }

    /// Takes every thread's batch of spans whole (the thread takes a spare one with its next
    /// span; the threads' locks are held only for the take); returns how many.
    pub(super) fn collect(&mut self) -> usize {
        let mut collected = Vec::new();
        self.handoff.threads.visit(|slot| {
            if let Some(batch) = slot.take_if(|batch| !batch.is_empty()) {
                collected.push(batch);
            }
        });
        // All of them, before any is taken: none is lost uncounted if taking one panics.
        self.unexported += collected.iter().map(|batch| batch.len()).sum::<usize>();
        collected.into_iter().map(|batch| self.take_batch(batch)).sum()
    }

    /// Adds a thread's batch to the export batch and gives it back emptied; returns how many
    /// spans it held.
    fn take_batch(&mut self, mut spans: Box<ThreadSpans>) -> usize {
        let taken = spans.len();
        for (span, agent_name, task, usage) in spans.agents.drain() {
            // Weighed as it was queued, without walking the built span again.
            let bytes = queued_weight(&span, agent_name, task, usage.as_ref());
            let span = self.spans.build(span, agent_name, task, usage);
            self.add(span, bytes);
        }
        for mut span in spans.built.drain(..) {
            self.spans.scrub_and_cut(&mut span);
            let bytes = span_size::of_span_data(&span);
            self.add(span, bytes);
        }
        self.handoff.recycle(spans);
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

impl Drop for SpanThread {
    fn drop(&mut self) {
        // A thread that panicked exports no more: count what was handed to it or taken by it,
        // and what waits in threads' batches; the spans finished from now on are counted as
        // they come.
        if std::thread::panicking() {
            // Threads' batches first: once closed and emptied, none is being handed over.
            let gathering = self.handoff.discard();
            let handed_over = self.handoff.waiting.swap(0, Ordering::Relaxed) + self.unexported;
            self.handoff.waiting_bytes.store(0, Ordering::Relaxed);
            let lost = gathering + handed_over as u64;
            TelemetryStats::add(&self.stats.spans_dropped, lost);
        }
    }
}
