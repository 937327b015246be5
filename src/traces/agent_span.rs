//! Agent spans, made here rather than by `tracing-opentelemetry`: ids and the sampling decision
//! when the span opens, its fields as they are recorded, and its parts handed to the span queue
//! when it closes (the span thread builds it).
//!
//! The span joins the rest of the trace through the OpenTelemetry context: its parent is the
//! context current when it opens, and while it is entered its own context is current, so the
//! spans `tracing-opentelemetry` builds inside it are its children.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::trace::{Event, Link, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceState};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample};
use tracing_core::field::{Field, Visit};
use tracing_core::Metadata;

use super::batch::{FinishedSpan, RareParts, UsageText};
use super::fields::{formatted_chars, push_location, span_kind, EventFields, FieldSink, OtelValues, SplitFields};
use super::span_queue::SpanQueue;
use crate::execution::{Execution, ExecutionFields, SpanRole, TraceIds};
use crate::scrub::Scrubber;

/// Events kept per span, as the SDK's default span limits; the rest are counted as dropped.
const MAX_EVENTS: usize = 128;

/// Links kept per span, as the SDK's default span limits; the rest are counted as dropped.
const MAX_LINKS: usize = 128;

/// Starts agent spans and hands the finished ones to the span queue.
#[derive(Debug)]
pub(crate) struct AgentTracer {
    queue: Arc<SpanQueue>,
    sampler: Sampler,
    ids: RandomIdGenerator,
    /// String attributes and event attributes are cut at this many characters ...
    value_chars: usize,
    /// ... and scrubbed by these rules first.
    scrubber: Arc<Scrubber>,
}

/// An agent span from open to close: what the finished span needs beyond the execution.
#[derive(Debug)]
pub(crate) struct AgentSpan {
    /// The parent's context (its span, baggage and the rest) ...
    parent: Context,
    /// ... and this span's: together they are the context current while it is entered.
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
    /// The spans it follows from.
    links: Vec<Link>,
    dropped_links: u32,
    /// Its context, made the first time it is handed on (current while the span is entered,
    /// a child's parent, a link's target or outgoing headers; `None` before): its parent and
    /// trace are fixed from then on.
    handed_on: Option<Context>,
}

/// Why a span cannot join an incoming trace: its trace is fixed.
#[derive(Debug)]
pub(crate) struct TraceFixed;

impl fmt::Display for TraceFixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the span's trace is fixed: it was already entered, or its context handed on to a child, a link or outgoing headers",
        )
    }
}

impl std::error::Error for TraceFixed {}

impl AgentTracer {
    pub(crate) fn new(queue: Arc<SpanQueue>, sampler: Sampler, value_chars: usize, scrubber: Arc<Scrubber>) -> Self {
        AgentTracer {
            queue,
            sampler,
            ids: RandomIdGenerator::default(),
            value_chars,
            scrubber,
        }
    }

    /// Records `span`'s fields, when it opens and when they are recorded later, in one walk
    /// (`fields` visits them): the execution's own into `execution`, the others as the span's
    /// attributes (scrubbed, cut).
    pub(crate) fn record(
        &self,
        span: &mut AgentSpan,
        execution: &mut ExecutionFields,
        fields: impl FnOnce(&mut dyn Visit),
    ) {
        fields(&mut SplitFields {
            execution,
            span: OtelValues {
                sink: &mut FieldAttributes(span),
                chars: self.value_chars,
                scrubber: &self.scrubber,
            },
        });
    }

    /// The most characters of `field`'s `Debug` text that [`record`](Self::record) formats as
    /// a span attribute: `None` for the execution's own fields, which it does not make
    /// attributes, and for a name it sends as `[REDACTED]` without reading the value.
    pub(crate) fn formatted_chars_for(&self, field: &Field) -> Option<usize> {
        let attribute = !ExecutionFields::owns(field) && !self.scrubber.redacts_field(field.name());
        attribute.then(|| formatted_chars(self.value_chars))
    }

    /// An event that happened inside an agent span, named and shaped as `tracing-opentelemetry`
    /// shapes span events (its fields scrubbed and cut), for [`AgentSpan::add_event`]. Made
    /// before the span is locked: its fields' `Debug` may emit events into that same span.
    pub(crate) fn event(&self, event: &tracing_core::Event<'_>) -> Event {
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
        Event::new(name, SystemTime::now(), fields.attributes, 0)
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
            links: Vec::new(),
            dropped_links: 0,
            handed_on: None,
        };
        self.place_under(&mut span, parent, self.ids.new_span_id());
        span
    }

    /// Moves a span whose context was not handed on yet under a parent from another process.
    /// Gives back the parent it replaced, for the caller to drop once it no longer holds the
    /// span's lock: the application's values in that context run their `Drop` then.
    pub(crate) fn continue_remote(&self, span: &mut AgentSpan, remote: &Context) -> Result<Context, TraceFixed> {
        if span.handed_on.is_some() {
            return Err(TraceFixed);
        }
        let span_id = span.span_context.span_id();
        Ok(self.place_under(span, remote, span_id))
    }

    /// Sets the span's parent, trace and sampling decision; gives back the parent it replaced.
    fn place_under(&self, span: &mut AgentSpan, parent: &Context, span_id: SpanId) -> Context {
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
        std::mem::replace(&mut span.parent, parent.clone())
    }

    /// Queues the finished span for export, built on the span thread. Only sampled
    /// spans come here: the layer sends no other. A model call's or GenAI span's `execution`
    /// has no task, and its agent name is not used.
    pub(crate) fn export(&self, span: AgentSpan, role: SpanRole, mut execution: Execution) {
        let finished = span.finish(role, &mut execution);
        let usage = execution.usage.as_deref().map(|usage| UsageText {
            model: usage.model.as_deref().unwrap_or_default(),
            provider: usage.provider.as_deref().unwrap_or_default(),
            tokens: usage.tokens,
            has_tokens: usage.has_tokens,
        });
        self.queue.queue_agent(
            finished,
            &execution.agent_name,
            execution.task.as_deref().unwrap_or_default(),
            usage,
        );
    }
}

impl AgentSpan {
    /// The span's parts for building it elsewhere, with the execution's (its failure taken)
    /// but for its text, which [`AgentBatch::push`] adds. Its contexts are dropped here, on
    /// the thread that closes it, not on the span thread.
    pub(crate) fn finish(self, role: SpanRole, execution: &mut Execution) -> FinishedSpan {
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
            links,
            dropped_links,
            handed_on: _,
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
            || !links.is_empty()
            || dropped_links > 0
            || execution.failure.is_some())
        .then(|| {
            Box::new(RareParts {
                name,
                trace_state,
                attributes,
                events,
                dropped_events,
                links,
                dropped_links,
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
            role,
            status: execution.status,
            metadata,
            text: 0..0,
            has_task: execution.task.is_some(),
            has_usage: false,
            agent_name_len: 0,
            end_time: execution.finished_at,
            duration: execution.duration,
            rare,
        }
    }

    /// The span's context: current while it is entered, the parent of its children, the
    /// target of links, and what another process continues. Handing it on fixes the span's
    /// trace: it can no longer [continue a remote one](AgentTracer::continue_remote).
    pub(crate) fn context(&mut self) -> Context {
        let AgentSpan {
            parent,
            span_context,
            handed_on,
            ..
        } = self;
        handed_on
            .get_or_insert_with(|| parent.with_remote_span_context(span_context.clone()))
            .clone()
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

    /// Whether the span takes another event: it is sampled and holds fewer than it keeps (an
    /// event past those is counted as dropped).
    pub(crate) fn takes_events(&mut self) -> bool {
        self.is_sampled() && has_room(self.events.len(), MAX_EVENTS, &mut self.dropped_events)
    }

    /// Adds an event made by [`AgentTracer::event`], if the span [takes](Self::takes_events)
    /// it.
    pub(crate) fn add_event(&mut self, event: Event) {
        if self.takes_events() {
            self.events.push(event);
        }
    }

    /// Links the span to one it follows from, unless that is invalid (a span nothing
    /// traces); past the links it keeps, the link is counted as dropped.
    pub(crate) fn add_link(&mut self, follows: SpanContext) {
        if follows.is_valid() && has_room(self.links.len(), MAX_LINKS, &mut self.dropped_links) {
            self.links.push(Link::with_context(follows));
        }
    }

    fn set_attribute(&mut self, key: &'static str, value: Value) {
        match self.attributes.iter_mut().find(|kv| kv.key.as_str() == key) {
            Some(existing) => existing.value = value,
            None => self.attributes.push(KeyValue::new(key, value)),
        }
    }
}

/// Whether a list of `len` items has room for one more under `max`; if not, that one is
/// counted in `dropped`.
fn has_room(len: usize, max: usize, dropped: &mut u32) -> bool {
    let room = len < max;
    if !room {
        *dropped = dropped.saturating_add(1);
    }
    room
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
