//! Agent spans, built here rather than by `tracing-opentelemetry`: ids and the sampling
//! decision when the span opens, the finished span with the guide's, GenAI and OpenInference
//! attributes when it closes, on the span processor's thread. A general-purpose span builder
//! costs more than the whole budget of an execution (see `benches/README.md`).
//!
//! The span joins the rest of the trace through the OpenTelemetry context: its parent is the
//! context current when it opens, and while it is entered its own context is current, so the
//! spans `tracing-opentelemetry` builds inside it are its children.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status as SpanStatus, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample, SpanData, SpanEvents, SpanLinks,
};
use tracing_core::field::{Field, Visit};
use tracing_core::Metadata;
use tracing_subscriber::field::RecordFields;

use super::processor::CountingProcessor;
use super::span_size;
use crate::execution::{shared_agent_name, Execution, ExecutionFields, Failure, Status, TraceIds};
use crate::scrub::{Scrubber, REDACTED, SCRUB_MARGIN};
use crate::text::{cut, debug_text};

/// Events kept per span, as the SDK's default span limits; the rest are counted as dropped.
const MAX_EVENTS: usize = 128;

/// Starts agent spans and hands the finished ones to the span processor.
#[derive(Debug)]
pub(crate) struct AgentTracer {
    processor: Arc<CountingProcessor>,
    sampler: Sampler,
    ids: RandomIdGenerator,
    /// String attributes and event attributes are cut at this many characters ...
    value_chars: usize,
    /// ... and scrubbed by these rules first.
    scrubber: Arc<Scrubber>,
}

/// Builds finished agent spans, and finishes the spans `tracing-opentelemetry` built, on the
/// span processor's thread.
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
}

/// An agent span from open to close: what the finished span needs beyond the execution.
#[derive(Debug)]
pub(crate) struct AgentSpan {
    /// The parent's context (its span, baggage and the rest) ...
    parent: Context,
    /// ... and this span's: together they are the context current while it is entered, made
    /// on each entry, on the thread that then drops it (a cross-thread free contends).
    span_context: SpanContext,
    parent_span_id: SpanId,
    parent_is_remote: bool,
    metadata: &'static Metadata<'static>,
    name: Cow<'static, str>,
    kind: SpanKind,
    /// The span's other fields, as `tracing-opentelemetry` would record them.
    attributes: Vec<KeyValue>,
    events: Vec<Event>,
    dropped_events: u32,
    entered: bool,
}

/// A closed agent span, as it crosses to the span processor's thread: what building it needs,
/// in under two cache lines when the span has nothing rare. Every cache line of it is a
/// transfer between cores that both threads pay for (see `benches/README.md`). Its text (the
/// agent's name and the task) is in its batch's buffer.
pub(crate) struct FinishedSpan {
    trace_id: TraceId,
    span_id: SpanId,
    parent_span_id: SpanId,
    flags: TraceFlags,
    parent_is_remote: bool,
    kind: SpanKind,
    status: Status,
    metadata: &'static Metadata<'static>,
    /// Where the agent's name and then the task are in the batch's text.
    text: Range<usize>,
    /// Whether the task is captured: without, the span has no `task` attribute.
    has_task: bool,
    agent_name_len: usize,
    end_time: SystemTime,
    duration: Duration,
    rare: Option<Box<RareParts>>,
}

/// A thread's finished agent spans, with their text in one buffer: no text crosses as an
/// allocation of the agent's thread that the span thread would free, which would have the two
/// contend for the allocator's arena on every span (see `benches/README.md`).
pub(crate) struct AgentBatch {
    spans: Vec<FinishedSpan>,
    text: String,
}

impl AgentBatch {
    /// Text kept by an emptied batch for reuse; a batch that grew past it is not reused.
    const KEPT_TEXT_BYTES: usize = 16 * 1024;

    /// Room for `spans` spans with names and tasks of usual length.
    pub(crate) fn with_capacity(spans: usize) -> Self {
        AgentBatch {
            spans: Vec::with_capacity(spans),
            text: String::with_capacity(spans.saturating_mul(64).min(Self::KEPT_TEXT_BYTES)),
        }
    }

    /// Adds a finished span with its text.
    pub(crate) fn push(&mut self, mut span: FinishedSpan, agent_name: &str, task: &str) {
        let start = self.text.len();
        self.text.push_str(agent_name);
        self.text.push_str(task);
        span.text = start..self.text.len();
        span.agent_name_len = agent_name.len();
        self.spans.push(span);
    }

    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Empties the batch, keeping its room.
    pub(crate) fn clear(&mut self) {
        self.spans.clear();
        self.text.clear();
    }

    /// Whether the emptied batch is worth keeping for another thread's spans.
    pub(crate) fn reusable(&self) -> bool {
        self.is_empty() && self.text.capacity() <= Self::KEPT_TEXT_BYTES
    }

    /// Takes the spans out, in order, each with its agent's name and task. The text stays
    /// until [`clear`](Self::clear), which every batch goes through before it is used again.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (FinishedSpan, &str, &str)> + '_ {
        let text = &self.text;
        self.spans.drain(..).map(move |span| {
            // `push` set the ranges in this text, at char boundaries: a range that is not
            // would be a bug, and gives empty text rather than a panic.
            let own = text.get(span.text.clone()).unwrap_or_default();
            let (agent_name, task) = own.split_at_checked(span.agent_name_len).unwrap_or_default();
            (span, agent_name, task)
        })
    }
}

/// The parts most agent spans do not have, boxed only when one does.
struct RareParts {
    /// An `otel.name` field's.
    name: Option<String>,
    trace_state: TraceState,
    attributes: Vec<KeyValue>,
    events: Vec<Event>,
    dropped_events: u32,
    failure: Option<Failure>,
}

/// Why a span cannot join an incoming trace.
#[derive(Debug)]
pub(crate) struct AlreadyStarted;

impl fmt::Display for AlreadyStarted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the span was already entered, and its trace is fixed once it starts")
    }
}

impl std::error::Error for AlreadyStarted {}

impl AgentTracer {
    pub(crate) fn new(
        processor: Arc<CountingProcessor>,
        sampler: Sampler,
        value_chars: usize,
        scrubber: Arc<Scrubber>,
    ) -> Self {
        AgentTracer {
            processor,
            sampler,
            ids: RandomIdGenerator::default(),
            value_chars,
            scrubber,
        }
    }

    /// Records `span`'s fields, when it opens and when they are recorded later, in one walk:
    /// the execution's own into `execution`, the others as the span's attributes (scrubbed,
    /// cut).
    pub(crate) fn record(&self, span: &mut AgentSpan, fields: &impl RecordFields, execution: &mut ExecutionFields) {
        fields.record(&mut SplitFields {
            execution,
            span: OtelValues {
                sink: &mut FieldAttributes(span),
                chars: self.value_chars,
                scrubber: &self.scrubber,
            },
        });
    }

    /// Adds an event that happened inside `span`, named and shaped as `tracing-opentelemetry`
    /// shapes span events (its fields scrubbed and cut).
    pub(crate) fn add_event(&self, span: &mut AgentSpan, event: &tracing_core::Event<'_>) {
        if span.events.len() >= MAX_EVENTS {
            span.dropped_events = span.dropped_events.saturating_add(1);
            return;
        }
        let metadata = event.metadata();
        let mut fields = EventFields {
            name: None,
            attributes: vec![
                KeyValue::new("level", metadata.level().as_str()),
                KeyValue::new("target", metadata.target()),
            ],
        };
        event.record(&mut OtelValues {
            sink: &mut fields,
            chars: self.value_chars,
            scrubber: &self.scrubber,
        });
        push_location(&mut fields.attributes, metadata);
        let name = fields.name.map_or(Cow::Borrowed(metadata.name()), Cow::Owned);
        span.events
            .push(Event::new(name, SystemTime::now(), fields.attributes, 0));
    }

    /// Opens a span under `parent` (an empty context for a root).
    pub(crate) fn start(&self, parent: &Context, metadata: &'static Metadata<'static>) -> AgentSpan {
        let mut span = AgentSpan {
            parent: Context::new(),
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_is_remote: false,
            metadata,
            name: Cow::Borrowed(metadata.name()),
            kind: SpanKind::Internal,
            attributes: Vec::new(),
            events: Vec::new(),
            dropped_events: 0,
            entered: false,
        };
        self.place_under(&mut span, parent, self.ids.new_span_id());
        span
    }

    /// Moves a span that has not started yet under a parent from another process.
    pub(crate) fn continue_remote(&self, span: &mut AgentSpan, remote: &Context) -> Result<(), AlreadyStarted> {
        if span.entered {
            return Err(AlreadyStarted);
        }
        let span_id = span.span_context.span_id();
        self.place_under(span, remote, span_id);
        Ok(())
    }

    /// Sets the span's parent, trace and sampling decision.
    fn place_under(&self, span: &mut AgentSpan, parent: &Context, span_id: SpanId) {
        let parent_span = parent.span();
        let parent_context = parent_span.span_context();
        let trace_id = if parent.has_active_span() && parent_context.is_valid() {
            span.parent_span_id = parent_context.span_id();
            span.parent_is_remote = parent_context.is_remote();
            parent_context.trace_id()
        } else {
            span.parent_span_id = SpanId::INVALID;
            span.parent_is_remote = false;
            self.ids.new_trace_id()
        };
        let decision = self
            .sampler
            .should_sample(Some(parent), trace_id, &span.name, &span.kind, &[], &[]);
        let flags = match decision.decision {
            SamplingDecision::RecordAndSample => TraceFlags::SAMPLED,
            SamplingDecision::Drop | SamplingDecision::RecordOnly => TraceFlags::default(),
        };
        span.span_context = SpanContext::new(trace_id, span_id, flags, false, decision.trace_state);
        span.parent = parent.clone();
    }

    /// Queues the finished span for export, built on the processor's thread. Only sampled
    /// spans come here: the layer sends no other.
    pub(crate) fn export(&self, span: AgentSpan, mut execution: Execution) {
        let finished = span.finish(&mut execution);
        self.processor.queue_agent(
            finished,
            &execution.agent_name,
            execution.task.as_deref().unwrap_or_default(),
        );
    }
}

impl SpanBuilder {
    /// The finished span, with the guide's, GenAI and OpenInference attributes. The name is
    /// this thread's shared copy, so the span thread frees only what it allocated.
    pub(crate) fn build(&self, span: FinishedSpan, agent_name: &str, task: &str) -> SpanData {
        let rare = span.rare.map(|rare| *rare);
        let extra_attributes = rare.as_ref().map_or(0, |rare| rare.attributes.len());
        let agent_name = Value::String(shared_agent_name(agent_name).into());
        let mut attributes = Vec::with_capacity(10 + extra_attributes);
        attributes.extend([
            KeyValue::new("agent.name", agent_name.clone()),
            KeyValue::new("result.status", span.status.as_str()),
            KeyValue::new("gen_ai.operation.name", "invoke_agent"),
            KeyValue::new("gen_ai.agent.name", agent_name),
            KeyValue::new("openinference.span.kind", "AGENT"),
        ]);
        if span.has_task {
            attributes.push(KeyValue::new("task", cut(task, self.value_chars).into_owned()));
        }
        push_location(&mut attributes, span.metadata);
        let mut name = Cow::Borrowed(span.metadata.name());
        let mut trace_state = TraceState::default();
        let mut status = SpanStatus::Unset;
        let mut events = SpanEvents::default();
        if let Some(rare) = rare {
            if let Some(failure) = &rare.failure {
                attributes.push(KeyValue::new("error.type", failure.error_type().to_owned()));
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
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }
}

impl FinishedSpan {
    /// What the span weighs besides its agent's name (which it carries twice) and its task
    /// (`span_size`): the overhead, the keys and values of the attributes the crate sets, the
    /// code location, and the rare parts.
    pub(crate) fn weight(&self) -> usize {
        let location = self.metadata.file().map_or(0, str::len) + self.metadata.module_path().map_or(0, str::len);
        let rare = self.rare.as_ref().map_or(0, |rare| {
            rare.name.as_ref().map_or(0, String::len)
                + span_size::of_attributes(&rare.attributes)
                + span_size::of_events(&rare.events)
                + rare.failure.as_ref().map_or(0, |failure| failure.description().len())
        });
        256 + location + rare
    }
}

impl AgentSpan {
    /// The span's parts for building it elsewhere, with the execution's (its failure taken)
    /// but for its text, which [`AgentBatch::push`] adds. Its parent context is dropped here,
    /// on the thread that made it.
    pub(crate) fn finish(self, execution: &mut Execution) -> FinishedSpan {
        let AgentSpan {
            parent: _,
            span_context,
            parent_span_id,
            parent_is_remote,
            metadata,
            name,
            kind,
            attributes,
            events,
            dropped_events,
            entered: _,
        } = self;
        let name = match name {
            Cow::Owned(name) => Some(name),
            Cow::Borrowed(_) => None,
        };
        let trace_state = span_context.trace_state().clone();
        let rare = (name.is_some()
            || trace_state != TraceState::default()
            || !attributes.is_empty()
            || !events.is_empty()
            || dropped_events > 0
            || execution.failure.is_some())
        .then(|| {
            Box::new(RareParts {
                name,
                trace_state,
                attributes,
                events,
                dropped_events,
                failure: execution.failure.take(),
            })
        });
        FinishedSpan {
            trace_id: span_context.trace_id(),
            span_id: span_context.span_id(),
            parent_span_id,
            flags: span_context.trace_flags(),
            parent_is_remote,
            kind,
            status: execution.status,
            metadata,
            text: 0..0,
            has_task: execution.task.is_some(),
            agent_name_len: 0,
            end_time: execution.finished_at,
            duration: execution.duration,
            rare,
        }
    }

    /// The context that is current while the span is entered; marks the span started.
    pub(crate) fn enter(&mut self) -> Context {
        self.entered = true;
        self.context()
    }

    /// The span's context: for its children, and to pass on to another process.
    pub(crate) fn context(&self) -> Context {
        self.parent.with_remote_span_context(self.span_context.clone())
    }

    pub(crate) fn ids(&self) -> TraceIds {
        TraceIds {
            trace_id: self.span_context.trace_id(),
            span_id: self.span_context.span_id(),
        }
    }

    pub(crate) fn is_sampled(&self) -> bool {
        self.span_context.is_sampled()
    }

    fn set_attribute(&mut self, key: &'static str, value: Value) {
        match self.attributes.iter_mut().find(|kv| kv.key.as_str() == key) {
            Some(existing) => existing.value = value,
            None => self.attributes.push(KeyValue::new(key, value)),
        }
    }
}

/// `code.*` attributes, as `tracing-opentelemetry` adds them.
fn push_location(attributes: &mut Vec<KeyValue>, metadata: &'static Metadata<'static>) {
    if let Some(file) = metadata.file() {
        attributes.push(KeyValue::new("code.file.path", file));
    }
    if let Some(module) = metadata.module_path() {
        attributes.push(KeyValue::new("code.module.name", module));
    }
    if let Some(line) = metadata.line() {
        attributes.push(KeyValue::new("code.line.number", i64::from(line)));
    }
}

/// A span's fields, each to the execution or to the span.
struct SplitFields<'a, 'b> {
    execution: &'a mut ExecutionFields,
    span: OtelValues<'a, FieldAttributes<'b>>,
}

impl SplitFields<'_, '_> {
    fn visitor(&mut self, field: &Field) -> &mut dyn Visit {
        if ExecutionFields::owns(field) {
            self.execution
        } else {
            &mut self.span
        }
    }
}

impl Visit for SplitFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.visitor(field).record_str(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.visitor(field).record_bool(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.visitor(field).record_i64(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.visitor(field).record_u64(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.visitor(field).record_f64(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.visitor(field).record_error(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.visitor(field).record_debug(field, value);
    }
}

/// Span fields as attributes; `otel.name` and `otel.kind` rename the span and set its kind.
/// [`SplitFields`] hands it only the fields the execution does not own.
struct FieldAttributes<'a>(&'a mut AgentSpan);

impl FieldSink for FieldAttributes<'_> {
    fn set(&mut self, field: &Field, value: Value) {
        match field.name() {
            "otel.name" => self.0.name = Cow::Owned(value.as_str().into_owned()),
            "otel.kind" => self.0.kind = span_kind(&value.as_str()).unwrap_or(SpanKind::Internal),
            name => self.0.set_attribute(name, value),
        }
    }

    fn set_u64(&mut self, field: &Field, value: u64) {
        // Past i64 the value is kept as text.
        let value = i64::try_from(value).map_or_else(|_| Value::from(value.to_string()), Value::I64);
        self.set(field, value);
    }
}

fn span_kind(text: &str) -> Option<SpanKind> {
    Some(match text.to_ascii_lowercase().as_str() {
        "server" => SpanKind::Server,
        "client" => SpanKind::Client,
        "producer" => SpanKind::Producer,
        "consumer" => SpanKind::Consumer,
        "internal" => SpanKind::Internal,
        _ => return None,
    })
}

/// An event's fields: `message` names the event, an `error` becomes an `exception` event.
struct EventFields {
    name: Option<String>,
    attributes: Vec<KeyValue>,
}

impl FieldSink for EventFields {
    fn set(&mut self, field: &Field, value: Value) {
        match field.name() {
            "message" => self.name = Some(value.as_str().into_owned()),
            "error" => {
                self.name.get_or_insert_with(|| "exception".to_owned());
                self.attributes.push(KeyValue::new("exception.message", value));
            }
            name if name.starts_with("log.") => {}
            name => self.attributes.push(KeyValue::new(name, value)),
        }
    }
}

/// Where [`OtelValues`] puts each field, as an OpenTelemetry value.
trait FieldSink {
    fn set(&mut self, field: &Field, value: Value);

    /// OpenTelemetry has no unsigned integers; `tracing-opentelemetry` writes an event's as
    /// text, which is the default here.
    fn set_u64(&mut self, field: &Field, value: u64) {
        self.set(field, Value::from(value.to_string()));
    }
}

/// A `tracing` field visitor that hands each value to a [`FieldSink`] as an OpenTelemetry
/// value, the conversions `tracing-opentelemetry` makes: a field whose name looks sensitive
/// as [`REDACTED`], text scrubbed and cut at `chars` characters.
struct OtelValues<'a, S> {
    sink: &'a mut S,
    chars: usize,
    scrubber: &'a Scrubber,
}

impl<S: FieldSink> OtelValues<'_, S> {
    /// Sets `field` to [`REDACTED`] if its name looks sensitive; whether it did.
    fn redacted(&mut self, field: &Field) -> bool {
        let redacts = self.scrubber.redacts_field(field.name());
        if redacts {
            self.sink.set(field, Value::from(REDACTED));
        }
        redacts
    }

    fn text(&mut self, field: &Field, text: &str) {
        if !self.redacted(field) {
            let kept = self.scrubber.scrub_and_cut(text, self.chars).into_owned();
            self.sink.set(field, Value::from(kept));
        }
    }

    fn formatted(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.redacted(field) {
            let text = debug_text(value, self.chars.saturating_add(SCRUB_MARGIN));
            let kept = self.scrubber.scrub_and_cut(&text, self.chars).into_owned();
            self.sink.set(field, Value::from(kept));
        }
    }
}

impl<S: FieldSink> Visit for OtelValues<'_, S> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if !self.redacted(field) {
            self.sink.set(field, Value::Bool(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if !self.redacted(field) {
            self.sink.set(field, Value::I64(value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if !self.redacted(field) {
            self.sink.set_u64(field, value);
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if !self.redacted(field) {
            self.sink.set(field, Value::F64(value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.formatted(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.formatted(field, value);
    }
}
