//! The `tracing` layer the crate installs: it recognises agent executions and hands each
//! closed one to the signals, and hands every other span it is given to
//! `tracing-opentelemetry`'s layer, which it holds.
//!
//! On the agent's thread it does only what must happen there, and what costs less there than
//! handing it over: the fields, the span's ids, the metrics, the log line into a buffer of the
//! thread's own, and the span's parts into a batch of the thread's own. Lines are written on
//! the log thread, spans built and exported on the span thread.
//! What reaches it, and which side each span and event is for, is chosen in `filter.rs`.
//!
//! Invariants a change must keep:
//! - a span is the execution side's when the layer made its state ([`Running`]) as it
//!   opened; every other span it is given is `tracing-opentelemetry`'s, and each callback of
//!   such a span is handed to that layer, once;
//! - both sides share one per-layer filter, so what `Context` finds (`span`, `scope`,
//!   `lookup_current`) includes the other side's spans: check for [`Running`] before taking a
//!   span for an execution's, and find the thread's innermost entered execution span with
//!   `innermost_entered`, as a filter of the execution side's own would;
//! - an execution's status does not depend on whether traces are on;
//! - no application code runs while a span's extensions are locked: a field's `Debug` or
//!   `Display` may emit events or record on that very span, so values are formatted first
//!   (`RecordedValues`, `AgentTracer::event`, `ErrorText`) and the span locked after, as
//!   `tracing-opentelemetry` does;
//! - no panic in a value's `Debug` leaves the execution side (`debug_text` formats every
//!   value it reads and stops it there): out of `on_new_span`, it would leave the span open
//!   for ever, and its parents with it. The spans handed over are `tracing-opentelemetry`'s
//!   to format.

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::ContextGuard;
use tracing_core::dispatcher::WeakDispatch;
use tracing_core::field::Field;
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::{Dispatch, Event, Level, Metadata, Subscriber};
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::{ExtensionsMut, LookupSpan, SpanRef};

use crate::execution::{
    AgentSpanNames, ErrorText, Execution, ExecutionFields, ExecutionState, SpanRole, TextPolicy, UNKNOWN_AGENT,
};
use crate::filter::LayerFilter;
use crate::gen_ai::{model_call_operation, CallUsage, EndedCall, UsageFields, UNKNOWN_MODEL};
use crate::logs::LineQueue;
use crate::metrics::Metrics;
use crate::panics;
use crate::prices::ModelPrices;
use crate::recorded::RecordedValues;
use crate::text::shared_name;
use crate::traces::{AgentSpan, AgentTracer};

/// The signals a closed execution goes to; none depends on another.
pub(crate) struct Signals {
    pub metrics: Arc<Metrics>,
    pub lines: Arc<LineQueue>,
    /// `None` when traces are off: no ids, no spans.
    pub tracer: Option<Arc<AgentTracer>>,
}

/// The state of a span the layer follows, from creation to close, in the span's extensions:
/// an agent execution's, a model call's or another GenAI span's.
struct Running {
    execution: ExecutionState,
    span: Option<AgentSpan>,
    role: SpanRole,
}

/// The OpenTelemetry contexts this thread's entered agent spans made current.
struct Active(RefCell<Vec<(Id, ContextGuard)>>);

impl Drop for Active {
    fn drop(&mut self) {
        CONTEXTS.set(Contexts::Gone);
    }
}

/// Where this thread is with OpenTelemetry's current context. A thread ends by dropping its
/// thread-locals, last set up first; `ACTIVE` is set up just after the thread's first
/// context is attached, which sets up OpenTelemetry's, so it goes first, and then
/// OpenTelemetry's may be gone. OpenTelemetry reads its own with `with`, which panics once it
/// is gone, and a panic in a thread-local's destructor (an instrumented future dropped as its
/// thread ends, say) aborts the process. [`with_current_contexts`] uses it accordingly.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Contexts {
    /// No agent span's context made current here yet: `ACTIVE` is not set up, and
    /// OpenTelemetry's, if another layer or the application set it up, may be gone.
    Unused,
    InUse,
    /// `ACTIVE` is gone: the thread is ending.
    Gone,
}

thread_local! {
    static ACTIVE: Active = const { Active(RefCell::new(Vec::new())) };
    /// Nothing to drop: readable to the end.
    static CONTEXTS: Cell<Contexts> = const { Cell::new(Contexts::Unused) };
    /// Nothing to drop: readable to the end.
    static LATE_ENTERED: Cell<LateEntered> = const { Cell::new(LateEntered::EMPTY) };
}

/// The execution side's spans entered on this thread once `ACTIVE` is gone (the thread is
/// ending), in entry order, innermost last: their ids only, in a fixed array, so that reading
/// and writing it needs nothing dropped. Past [`LateEntered::CAPACITY`] spans are not
/// recorded.
#[derive(Clone, Copy)]
struct LateEntered {
    ids: [u64; LateEntered::CAPACITY],
    len: usize,
}

impl LateEntered {
    const CAPACITY: usize = 16;
    const EMPTY: Self = LateEntered {
        ids: [0; Self::CAPACITY],
        len: 0,
    };

    fn entered(id: &Id) {
        let mut late = LATE_ENTERED.get();
        if let Some(slot) = late.ids.get_mut(late.len) {
            *slot = id.into_u64();
            late.len += 1;
            LATE_ENTERED.set(late);
        }
    }

    /// Whether `id` was entered here, forgetting its last entry.
    fn exited(id: &Id) -> bool {
        let mut late = LATE_ENTERED.get();
        let recorded = &late.ids[..late.len];
        let Some(at) = recorded.iter().rposition(|&entered| entered == id.into_u64()) else {
            return false;
        };
        late.ids.copy_within(at + 1..late.len, at);
        late.len -= 1;
        LATE_ENTERED.set(late);
        true
    }

    /// The innermost span entered, counting one entered again where it was first entered.
    fn innermost() -> Option<Id> {
        let late = LATE_ENTERED.get();
        innermost_first_entry(&late.ids[..late.len], |id| id).map(|&id| Id::from_u64(id))
    }
}

/// Of `entered`, spans in entry order, the innermost entry of a span not entered already
/// below it: a span entered again while entered counts where it was first entered, as the
/// registry counts it. `span` gives an entry's span.
fn innermost_first_entry<T, K: PartialEq>(entered: &[T], span: impl Fn(&T) -> &K) -> Option<&T> {
    entered
        .iter()
        .enumerate()
        .rev()
        .find(|&(at, entry)| !entered[..at].iter().any(|below| span(below) == span(entry)))
        .map(|(_, entry)| entry)
}

/// Runs `use_context`, which uses OpenTelemetry's current context; `None` when that is gone
/// as the thread ends. Before this thread's first agent context is made current, whether
/// OpenTelemetry's is still there cannot be asked (another layer or the application may have
/// set it up after the thread-local whose destructor runs this), so that panic is caught: in a
/// thread-local's destructor it would abort the process. Any other goes on.
fn with_current_contexts<T>(use_context: impl FnOnce() -> T) -> Option<T> {
    match CONTEXTS.get() {
        Contexts::InUse => Some(use_context()),
        Contexts::Gone => None,
        Contexts::Unused => match std::panic::catch_unwind(AssertUnwindSafe(use_context)) {
            Ok(used) => Some(used),
            Err(panic) if is_thread_local_gone(&*panic) => {
                CONTEXTS.set(Contexts::Gone);
                None
            }
            Err(panic) => std::panic::resume_unwind(panic),
        },
    }
}

/// Whether `panic` is the one `LocalKey::with` raises for a thread-local already dropped.
fn is_thread_local_gone(panic: &(dyn Any + Send)) -> bool {
    panics::message(panic).contains("during or after destruction")
}

/// Makes an entered agent span's context current until it exits; as the thread ends, the
/// span is recorded all the same, its context not made current.
fn make_current(id: &Id, context: opentelemetry::Context) {
    let Some(guard) = with_current_contexts(|| context.attach()) else {
        return LateEntered::entered(id);
    };
    let _ = ACTIVE.try_with(|active| match active.0.try_borrow_mut() {
        Ok(mut active) => active.push((id.clone(), guard)),
        Err(_) => drop(guard),
    });
    CONTEXTS.set(Contexts::InUse);
}

/// `tracing-opentelemetry`'s layer, which traces every span that is not an agent span or a
/// model call.
type Traced<S> = OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>;

/// The OpenTelemetry context of `id` if it is an agent span or model call this layer traces,
/// handed on: the span's trace is fixed from here.
fn own_context<S>(id: &Id, ctx: &Context<'_, S>) -> Option<opentelemetry::Context>
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    let span = ctx.span(id)?;
    let mut extensions = span.extensions_mut();
    extensions.get_mut::<Running>()?.span.as_mut().map(AgentSpan::context)
}

/// Hands a span to `tracing-opentelemetry`. That layer does not know agent spans and model
/// calls, so a span whose explicit parent is one would start a trace of its own there: it
/// is handed as a contextual span, opened with the parent's context current.
fn new_traced_span<S>(traced: &Traced<S>, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>)
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    let Some(context) = attrs.parent().and_then(|parent| own_context(parent, &ctx)) else {
        return traced.on_new_span(attrs, id, ctx);
    };
    match with_current_contexts(|| context.attach()) {
        Some(_current) => traced.on_new_span(&Attributes::new(attrs.metadata(), attrs.values()), id, ctx),
        // The thread is ending and no context can be made current: a trace of its own.
        None => traced.on_new_span(attrs, id, ctx),
    }
}

/// Turns agent spans into executions for the signals, and hands the spans and events that are
/// not its own to `tracing-opentelemetry`.
pub(crate) struct ExecutionLayer<S> {
    signals: Signals,
    /// `tracing-opentelemetry`'s layer, for every other span: `None` when traces are off.
    traced: Option<Traced<S>>,
    /// The filter in front of this layer, which says which side an event is for.
    filter: Arc<LayerFilter>,
    text: TextPolicy,
    names: Arc<AgentSpanNames>,
    /// `None`: no spend is computed.
    prices: Option<ModelPrices>,
    hook: AgentSpanHook,
    dispatch: OnceLock<WeakDispatch>,
    _subscriber: PhantomData<fn(S)>,
}

impl<S> ExecutionLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    pub(crate) fn new(
        signals: Signals,
        text: TextPolicy,
        names: Arc<AgentSpanNames>,
        prices: Option<ModelPrices>,
        traced: Option<Traced<S>>,
        filter: Arc<LayerFilter>,
    ) -> Self {
        let hook = AgentSpanHook {
            tracer: signals.tracer.clone(),
            with_span: with_agent_span::<S>,
            cancel: cancel_execution::<S>,
        };
        ExecutionLayer {
            signals,
            traced,
            filter,
            text,
            names,
            prices,
            hook,
            dispatch: OnceLock::new(),
            _subscriber: PhantomData,
        }
    }

    /// The OpenTelemetry context a new agent span opens under, as `tracing-opentelemetry`
    /// chooses it: an explicit parent's, else the current one (which entered agent spans and
    /// the spans `tracing-opentelemetry` builds both make current).
    fn parent_context(&self, attrs: &Attributes<'_>, ctx: &Context<'_, S>) -> opentelemetry::Context {
        let Some(parent) = attrs.parent() else {
            return attrs
                .is_contextual()
                .then(|| with_current_contexts(opentelemetry::Context::current))
                .flatten()
                .unwrap_or_default();
        };
        // A parent nothing traces: the span starts a trace, as it would in
        // `tracing-opentelemetry`.
        self.traced_context(parent, ctx).unwrap_or_default()
    }

    /// The OpenTelemetry context of a span either side traces; `None` for one neither does.
    fn traced_context(&self, id: &Id, ctx: &Context<'_, S>) -> Option<opentelemetry::Context> {
        own_context(id, ctx).or_else(|| {
            let dispatch = self.dispatch.get()?.upgrade()?;
            tracing_opentelemetry::get_otel_context(id, &dispatch)
        })
    }

    /// The span an event of the execution side is in, among the execution side's own spans:
    /// its explicit parent if that is one; else the innermost one entered on this thread.
    fn event_execution_span<'a>(&self, event: &Event<'_>, ctx: &'a Context<'_, S>) -> Option<SpanRef<'a, S>> {
        match event.parent() {
            Some(parent) => ctx.span(parent).filter(is_execution_span),
            None if event.is_contextual() => self.innermost_entered(ctx),
            None => None,
        }
    }

    /// The innermost of the execution side's spans entered on this thread, as a filter of
    /// its own finds it in the thread's stack of entered spans: a span entered again while
    /// entered counts where it was first entered. With traces off the layer's filter is the
    /// execution side's, and so is `lookup_current`; with traces on the entered spans are on
    /// `ACTIVE`, each with its context.
    fn innermost_entered<'a>(&self, ctx: &'a Context<'_, S>) -> Option<SpanRef<'a, S>> {
        if self.signals.tracer.is_none() {
            return ctx.lookup_current();
        }
        match CONTEXTS.get() {
            Contexts::Unused => None,
            Contexts::InUse => {
                let id = ACTIVE
                    .try_with(|active| {
                        let active = active.0.try_borrow().ok()?;
                        innermost_first_entry(&active, |(id, _)| id).map(|(id, _)| id.clone())
                    })
                    .ok()
                    .flatten()?;
                ctx.span(&id)
            }
            Contexts::Gone => ctx.span(&LateEntered::innermost()?),
        }
    }

    /// Counts a model call as it closes: held by its execution, which counts it as it ends;
    /// part of a model call around it; or counted now when its execution holds too many or
    /// it is in none. An exported call's span carries its own usage.
    fn close_model_call(
        &self,
        closing: SpanRef<'_, S>,
        state: &mut ExecutionState,
        execution: &mut Execution,
        exported: bool,
    ) {
        let (status, duration) = (execution.status, execution.duration);
        let call = state.take_rollup().into_call(state.fields.usage());
        let ended = EndedCall {
            model: call.model.clone(),
            status,
            seconds: duration.as_secs_f64(),
        };
        let handed = hand_over(&closing, &call, ended);
        drop(closing);
        let metrics = &self.signals.metrics;
        match handed {
            HandedOver::Held | HandedOver::IntoCall => {}
            // Under the execution's names as recorded so far, not labels yet (it is open).
            HandedOver::Full {
                mut agent_name,
                model,
                mut agent_model,
            } => {
                self.text.scrub_name(&mut agent_name);
                let model = model.unwrap_or_else(|| {
                    self.text.scrub_name(&mut agent_model);
                    agent_model
                });
                metrics.record_model_call(&agent_name, &model, status, duration, None);
            }
            // Outside any execution: counted now, under `unknown`, tokens and all.
            HandedOver::Nowhere => {
                execution.usage = call.counted_usage(self.prices.as_ref());
                let model = call.model.as_deref().unwrap_or(UNKNOWN_MODEL);
                let usage = execution.usage.as_deref();
                metrics.record_model_call(UNKNOWN_AGENT, model, status, duration, usage);
            }
        }
        if exported && execution.usage.is_none() {
            execution.usage = call.span_usage();
        }
    }

    /// An event for the execution side: an `ERROR` fails the nearest enclosing agent span or
    /// model call; an event directly inside an agent span is one of the span's events (the
    /// `tracing-opentelemetry` side is not given these).
    fn execution_event(&self, event: &Event<'_>, ctx: &Context<'_, S>) {
        if *event.metadata().level() == Level::ERROR {
            if let Some(start) = self.event_execution_span(event, ctx) {
                fail_nearest_agent(event, &start, self.text.held_chars());
            }
        }
        let innermost = match event.parent() {
            Some(parent) => Some(parent.clone()),
            None if event.is_contextual() => ctx.current_span().id().cloned(),
            None => None,
        };
        if let Some(span) = innermost.and_then(|id| ctx.span(&id)) {
            self.add_span_event(&span, event);
        }
    }

    /// Whether an event for the `tracing-opentelemetry` side is the execution side's after all,
    /// and recorded as such: that layer puts an event on the innermost span of the thread that
    /// it sees, which, behind this layer's filter, may be one of the execution side's.
    fn is_execution_span_event(&self, event: &Event<'_>, ctx: &Context<'_, S>) -> bool {
        if !event.is_contextual() {
            return false;
        }
        match ctx.lookup_current().filter(is_execution_span) {
            Some(span) => {
                self.add_span_event(&span, event);
                true
            }
            None => false,
        }
    }

    /// Records `event` on `span`, when that is a sampled span of the execution side with room
    /// for it. The event is made unlocked: its fields may emit events into the span as they
    /// format themselves.
    fn add_span_event(&self, span: &SpanRef<'_, S>, event: &Event<'_>) {
        let Some(tracer) = &self.signals.tracer else {
            return;
        };
        if !agent_span(&mut span.extensions_mut()).is_some_and(AgentSpan::takes_events) {
            return;
        }
        let event = tracer.event(event);
        if let Some(agent_span) = agent_span(&mut span.extensions_mut()) {
            agent_span.add_event(event);
        }
    }

    /// What a new span is: an agent execution by its name; else a model call by its
    /// `gen_ai.operation.name` as created, or without one by its name; else another GenAI
    /// span.
    fn role(&self, metadata: &Metadata<'_>, usage: &UsageFields) -> SpanRole {
        if self.names.matches(metadata.name()) {
            return SpanRole::Agent;
        }
        let operation = match &usage.operation {
            Some(operation) => model_call_operation(operation),
            None => model_call_operation(metadata.name()),
        };
        operation.map_or(SpanRole::GenAi, SpanRole::ModelCall)
    }
}

impl<S> Layer<S> for ExecutionLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        // The first dispatch is ours; a layer is registered with one subscriber.
        let _ = self.dispatch.set(subscriber.downgrade());
        if let Some(traced) = &self.traced {
            traced.on_register_dispatch(subscriber);
        }
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        if let Some(traced) = &mut self.traced {
            traced.on_layer(subscriber);
        }
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if !self.names.follows(attrs.metadata()) {
            if let Some(traced) = &self.traced {
                new_traced_span(traced, attrs, id, ctx);
            }
            return;
        }
        let mut execution = ExecutionState::new(self.text.held_chars());
        let span = if let Some(tracer) = &self.signals.tracer {
            let mut span = tracer.start(&self.parent_context(attrs, &ctx), attrs.metadata());
            tracer.record(&mut span, &mut execution.fields, |visitor| attrs.record(visitor));
            Some(span)
        } else {
            attrs.record(&mut execution.fields);
            None
        };
        let role = self.role(attrs.metadata(), execution.fields.usage());
        if let Some(registered) = ctx.span(id) {
            registered.extensions_mut().insert(Running { execution, span, role });
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let execution_chars = span
            .extensions()
            .get::<Running>()
            .map(|running| running.execution.fields.formatted_chars());
        let Some(execution_chars) = execution_chars else {
            drop(span);
            if let Some(traced) = &self.traced {
                traced.on_record(id, values, ctx);
            }
            return;
        };
        // Taken unlocked: a value may record on this span, or emit an event in it, as it
        // formats itself.
        let chars_for = |field: &Field| {
            let execution = ExecutionFields::reads(field).then_some(execution_chars);
            let traced = self
                .signals
                .tracer
                .as_ref()
                .and_then(|tracer| tracer.formatted_chars_for(field));
            execution.max(traced)
        };
        let recorded = RecordedValues::take(&chars_for, |visitor| values.record(visitor));
        let mut extensions = span.extensions_mut();
        if let Some(Running { execution, span, .. }) = extensions.get_mut::<Running>() {
            match (span, &self.signals.tracer) {
                (Some(span), Some(tracer)) => {
                    tracer.record(span, &mut execution.fields, |visitor| recorded.replay(visitor));
                }
                _ => recorded.replay(&mut execution.fields),
            }
        }
    }

    fn on_follows_from(&self, id: &Id, follows: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if !is_execution_span(&span) {
            drop(span);
            // It links only spans it opened: one that follows an agent span gets no link.
            if let Some(traced) = &self.traced {
                traced.on_follows_from(id, follows, ctx);
            }
            return;
        }
        // Taken before this span is locked: `follows` may be this span.
        let Some(follows) = self.traced_context(follows, &ctx) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(agent_span) = agent_span(&mut extensions) {
            agent_span.add_link(follows.span().span_context().clone());
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let (for_execution, for_traced) = self.filter.event_sides(event, &ctx);
        if for_execution {
            self.execution_event(event, &ctx);
        }
        if let Some(traced) = self.traced.as_ref().filter(|_| for_traced) {
            if !self.is_execution_span_event(event, &ctx) {
                traced.on_event(event, ctx);
            }
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        let Some(running) = extensions.get_mut::<Running>() else {
            drop(extensions);
            drop(span);
            if let Some(traced) = &self.traced {
                traced.on_enter(id, ctx);
            }
            return;
        };
        running.execution.entered = true;
        let context = running.span.as_mut().map(AgentSpan::context);
        drop(extensions);
        drop(span);
        if let Some(context) = context {
            make_current(id, context);
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        // An async agent's span may close later, on another thread: note the panic now.
        if std::thread::panicking() {
            if let Some(span) = ctx.span(id) {
                if let Some(running) = span.extensions_mut().get_mut::<Running>() {
                    running.execution.panicked = true;
                }
            }
        }
        let Some(traced) = &self.traced else { return };
        // Not before a context was attached here: `ACTIVE` is set up after OpenTelemetry's.
        let guard = match CONTEXTS.get() {
            Contexts::InUse => ACTIVE
                .try_with(|active| {
                    let mut active = active.0.try_borrow_mut().ok()?;
                    let position = active.iter().rposition(|(entered, _)| entered == id)?;
                    Some(active.remove(position))
                })
                .ok()
                .flatten(),
            Contexts::Gone if LateEntered::exited(id) => return,
            Contexts::Unused | Contexts::Gone => None,
        };
        match guard {
            // Dropped outside the borrow: restoring the context may emit events.
            Some(guard) => drop(guard),
            // Not an agent span entered here: `tracing-opentelemetry`'s, or an agent span whose
            // context was not made current, which it passes by.
            None => traced.on_exit(id, ctx),
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(closing) = ctx.span(&id) else { return };
        let Some(running) = closing.extensions_mut().remove::<Running>() else {
            drop(closing);
            if let Some(traced) = &self.traced {
                traced.on_close(id, ctx);
            }
            return;
        };
        let Running {
            execution: mut state,
            span,
            role,
        } = running;
        if state.entered {
            state.panicked |= std::thread::panicking();
        } else {
            // Never entered: its future was dropped before it was ever polled, so no panic
            // went through it, whenever it closes.
            state.cancel(false);
        }
        let duration = state.duration();
        if let Some(text) = &mut state.error_event {
            *text = self.text.error_text(text);
        }
        if let Some(text) = &mut state.fields.status {
            *text = self.text.status_text(text);
        }
        // Its own model and provider become labels (scrubbed, then cut) once, before they meet
        // its calls', labels already since each closed.
        state
            .fields
            .usage_names_mut()
            .for_each(|name| self.text.scrub_name(name));
        let invalid = state.fields.usage().invalid;
        if invalid > 0 {
            self.signals.metrics.count_invalid_usage_fields(invalid);
        }
        let (status, failure) = state.outcome();
        let exported = self.signals.tracer.is_some() && span.as_ref().is_some_and(AgentSpan::is_sampled);
        let (agent_name, task) = match role {
            SpanRole::Agent => {
                let mut agent_name = state
                    .fields
                    .agent_name
                    .take()
                    .unwrap_or_else(|| Arc::from(UNKNOWN_AGENT));
                self.text.scrub_name(&mut agent_name);
                (agent_name, self.text.task(state.fields.task.take()))
            }
            SpanRole::ModelCall(_) | SpanRole::GenAi => (shared_name(""), None),
        };
        let mut execution = Execution {
            agent_name,
            task,
            duration,
            status,
            failure,
            finished_at: state.started_at.checked_add(duration).unwrap_or_else(SystemTime::now),
            trace: span.as_ref().map(AgentSpan::ids),
            usage: None,
        };
        match role {
            SpanRole::Agent => {
                drop(closing);
                let rollup = state.take_rollup();
                execution.usage = rollup.finish(state.fields.usage(), self.prices.as_ref());
                self.signals.metrics.record(&execution);
                self.signals.lines.write_line(&execution);
            }
            SpanRole::ModelCall(_) => self.close_model_call(closing, &mut state, &mut execution, exported),
            SpanRole::GenAi => {
                drop(closing);
                // Its usage is for its span only.
                if exported {
                    let own = state.take_rollup().into_call(state.fields.usage());
                    execution.usage = own.span_usage();
                }
            }
        }
        if let (Some(tracer), Some(span)) = (&self.signals.tracer, span.filter(|_| exported)) {
            tracer.export(span, role, execution);
        }
    }

    // SAFETY: each pointer returned points to a value of exactly the type asked for, owned by
    // `self`, as `Layer::downcast_raw` requires.
    #[allow(unsafe_code)]
    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            Some(std::ptr::from_ref(self).cast())
        } else if id == TypeId::of::<AgentSpanHook>() {
            Some(std::ptr::from_ref(&self.hook).cast())
        } else {
            // SAFETY: `tracing-opentelemetry`'s layer answers for its own types, as above.
            self.traced
                .as_ref()
                .and_then(|traced| unsafe { traced.downcast_raw(id) })
        }
    }
}

/// The first failure source after an explicit status: an `ERROR` event fails the nearest
/// agent span or model call at or above `start` (a failed call the agent recovers from does
/// not fail the execution), its text kept to `max_chars` characters.
fn fail_nearest_agent<S>(event: &Event<'_>, start: &SpanRef<'_, S>, max_chars: usize)
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    // For the execution side's agent spans and model calls: whether one failed already.
    let already_failed = |span: &SpanRef<'_, S>| {
        let extensions = span.extensions();
        let running = extensions
            .get::<Running>()
            .filter(|running| running.role != SpanRole::GenAi)?;
        Some(running.execution.error_event.is_some())
    };
    let nearest = start.scope().find_map(|span| Some((already_failed(&span)?, span)));
    let Some((false, nearest)) = nearest else {
        return;
    };
    // Taken unlocked: a field may emit events into the span as it formats itself.
    let mut text = ErrorText::new(max_chars);
    event.record(&mut text);
    let mut extensions = nearest.extensions_mut();
    if let Some(running) = extensions.get_mut::<Running>() {
        // The event's own error, over one its fields raised as they formatted.
        running.execution.error_event = Some(text.into_text());
    }
}

/// The trace span of an execution side's span, when traces are on.
fn agent_span<'a>(extensions: &'a mut ExtensionsMut<'_>) -> Option<&'a mut AgentSpan> {
    extensions.get_mut::<Running>()?.span.as_mut()
}

/// Whether `span` is one of the execution side's: the layer made its state as it opened.
fn is_execution_span<S>(span: &SpanRef<'_, S>) -> bool
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    span.extensions().get::<Running>().is_some()
}

/// Reaches an agent span's trace state from outside the layer (the `propagation` module),
/// found with `Dispatch::downcast_ref` as `tracing-opentelemetry` finds its own.
pub(crate) struct AgentSpanHook {
    tracer: Option<Arc<AgentTracer>>,
    with_span: WithAgentSpan,
    cancel: CancelExecution,
}

/// Finds the agent span `id` in the subscriber the layer was built for.
type WithAgentSpan = fn(&Dispatch, &Id, &mut dyn FnMut(&mut AgentSpan)) -> bool;

/// Marks the execution of span `id` cancelled, as [`Dropped`] says; `false` when there is none.
type CancelExecution = fn(&Dispatch, &Id, Dropped) -> bool;

/// Which future was dropped before it completed, from its span: which execution it cancels,
/// and whether the drop ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// The span's own future: the span, when it is an agent span or model call. The drop
    /// ends it.
    Own,
    /// The span's own future, which cancels the nearest execution at or above the span; the
    /// drop ends the span's own.
    OwnOrAbove,
    /// A future inside the span: the nearest execution at or above it, which ends as it
    /// closes.
    Inside,
}

impl AgentSpanHook {
    /// Marks the execution of span `id` cancelled, as `dropped` says: a future was dropped
    /// before it completed, now. An execution a panic went through stays a panic. `false`
    /// when there is none.
    pub(crate) fn cancel(&self, dispatch: &Dispatch, id: &Id, dropped: Dropped) -> bool {
        (self.cancel)(dispatch, id, dropped)
    }

    /// Runs `f` on the agent span `id`; `false` when `id` is not a traced agent span.
    pub(crate) fn with_span(
        &self,
        dispatch: &Dispatch,
        id: &Id,
        f: &mut dyn FnMut(&AgentTracer, &mut AgentSpan),
    ) -> bool {
        let Some(tracer) = &self.tracer else {
            return false;
        };
        (self.with_span)(dispatch, id, &mut |span| f(tracer, span))
    }
}

/// The span `id` in the subscriber `dispatch` holds, if that subscriber is an `S`.
fn lookup<'a, S>(dispatch: &'a Dispatch, id: &Id) -> Option<SpanRef<'a, S>>
where
    S: Subscriber + for<'b> LookupSpan<'b>,
{
    dispatch.downcast_ref::<S>()?.span(id)
}

fn cancel_execution<S>(dispatch: &Dispatch, id: &Id, dropped: Dropped) -> bool
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let Some(span) = lookup::<S>(dispatch, id) else {
        return false;
    };
    let reach = if dropped == Dropped::Own { 1 } else { usize::MAX };
    for (depth, span) in span.scope().take(reach).enumerate() {
        if let Some(running) = span
            .extensions_mut()
            .get_mut::<Running>()
            .filter(|running| running.role != SpanRole::GenAi)
        {
            // Its own future's drop ends it; one inside it cancels it as it closes.
            running.execution.cancel(depth == 0 && dropped != Dropped::Inside);
            return true;
        }
    }
    false
}

fn with_agent_span<S>(dispatch: &Dispatch, id: &Id, f: &mut dyn FnMut(&mut AgentSpan)) -> bool
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let Some(span) = lookup::<S>(dispatch, id) else {
        return false;
    };
    let mut extensions = span.extensions_mut();
    match agent_span(&mut extensions) {
        Some(span) => {
            f(span);
            true
        }
        None => false,
    }
}

/// Where a model call's usage went as it ended.
enum HandedOver {
    /// To the nearest agent execution above it, which counts the call when it ends.
    Held,
    /// To a model call it was made inside, as part of that call.
    IntoCall,
    /// To its execution, which holds [`MAX_HELD_CALLS`](crate::gen_ai::MAX_HELD_CALLS) already: the call is counted now, under
    /// the execution's name and model as recorded so far.
    Full {
        agent_name: Arc<str>,
        /// The call's model, a label already ...
        model: Option<Arc<str>>,
        /// ... else the execution's, as recorded.
        agent_model: Arc<str>,
    },
    /// Nowhere: it ended in no execution.
    Nowhere,
}

/// Hands a model call's usage to the nearest agent execution or model call above `call_span`
/// (other GenAI spans are passed by).
fn hand_over<S>(call_span: &SpanRef<'_, S>, call: &CallUsage, ended: EndedCall<Option<Arc<str>>>) -> HandedOver
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    for span in call_span.scope().skip(1) {
        let mut extensions = span.extensions_mut();
        let Some(running) = extensions.get_mut::<Running>() else {
            continue;
        };
        let state = &mut running.execution;
        match running.role {
            SpanRole::GenAi => {}
            SpanRole::ModelCall(_) => {
                state.rollup_mut().add(call);
                return HandedOver::IntoCall;
            }
            SpanRole::Agent => {
                let rollup = state.rollup_mut();
                rollup.add(call);
                let Some(ended) = rollup.hold(ended) else {
                    return HandedOver::Held;
                };
                let unknown = |name: &str| Arc::from(name);
                return HandedOver::Full {
                    agent_name: state
                        .fields
                        .agent_name
                        .clone()
                        .unwrap_or_else(|| unknown(UNKNOWN_AGENT)),
                    model: ended.model,
                    agent_model: state
                        .fields
                        .usage()
                        .model
                        .clone()
                        .unwrap_or_else(|| unknown(UNKNOWN_MODEL)),
                };
            }
        }
    }
    HandedOver::Nowhere
}

#[cfg(test)]
mod tests {
    use super::innermost_first_entry;

    #[test]
    fn a_span_entered_again_counts_where_it_was_first_entered() {
        let first = |entered: &[u64]| innermost_first_entry(entered, |id| id).copied();
        assert_eq!(first(&[]), None);
        assert_eq!(first(&[1, 2]), Some(2));
        // 1 entered, then 2, then 1 again: the registry's current span is 2.
        assert_eq!(first(&[1, 2, 1]), Some(2));
        assert_eq!(first(&[1, 1]), Some(1));
        assert_eq!(first(&[1, 2, 2, 1]), Some(2));
    }
}
