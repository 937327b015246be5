//! The `tracing` layer that recognises agent executions and hands each closed one to the
//! signals, plus the per-layer filter that keeps everything else off its path.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use opentelemetry::trace::TraceContextExt;
use tracing_core::dispatcher::WeakDispatch;
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::subscriber::Interest;
use tracing_core::{Dispatch, Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::execution::{AgentSpanNames, ErrorText, Execution, ExecutionState, TraceIds, UNKNOWN_AGENT};
use crate::logs::LogWriter;
use crate::metrics::Metrics;
use crate::traces;

/// The signals a closed execution goes to; none depends on another.
pub(crate) struct Signals {
    pub metrics: Arc<Metrics>,
    pub logs: Arc<LogWriter>,
    /// Whether an OpenTelemetry layer sits beside this one (so there are ids to correlate).
    pub traces: bool,
}

/// Turns closed agent spans into [`Execution`] records for the signals.
pub(crate) struct ExecutionLayer {
    signals: Signals,
    dispatch: OnceLock<WeakDispatch>,
}

impl ExecutionLayer {
    pub(crate) fn new(signals: Signals) -> Self {
        ExecutionLayer {
            signals,
            dispatch: OnceLock::new(),
        }
    }

    /// The exported span's ids, read from the OpenTelemetry layer before it ends the span.
    fn trace_ids(&self, id: &Id) -> Option<TraceIds> {
        if !self.signals.traces {
            return None;
        }
        let dispatch = self.dispatch.get()?.upgrade()?;
        let cx = tracing_opentelemetry::get_otel_context(id, &dispatch)?;
        let span_context = cx.span().span_context().clone();
        span_context.is_valid().then(|| TraceIds {
            trace_id: span_context.trace_id(),
            span_id: span_context.span_id(),
        })
    }
}

impl<S> Layer<S> for ExecutionLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        // The first dispatch is ours; a layer is registered with one subscriber.
        let _ = self.dispatch.set(subscriber.downgrade());
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut state = ExecutionState::new();
        attrs.record(&mut state.fields);
        span.extensions_mut().insert(state);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(state) = extensions.get_mut::<ExecutionState>() {
            values.record(&mut state.fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        // The filter lets only ERROR events through; the nearest agent span owns the error.
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            let mut extensions = span.extensions_mut();
            if let Some(state) = extensions.get_mut::<ExecutionState>() {
                if state.error_event.is_none() {
                    let mut text = ErrorText::default();
                    event.record(&mut text);
                    state.error_event = Some(text.into_text());
                }
                return;
            }
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        // An async agent's span may close later, on another thread: note the panic now.
        if std::thread::panicking() {
            if let Some(span) = ctx.span(id) {
                if let Some(state) = span.extensions_mut().get_mut::<ExecutionState>() {
                    state.panicked = true;
                };
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        // Taken out, not borrowed: the extensions must not be locked while the
        // OpenTelemetry layer is asked for the span's ids below.
        let Some(mut state) = span.extensions_mut().remove::<ExecutionState>() else {
            return;
        };
        drop(span);
        let duration = state.started.elapsed();
        state.panicked |= std::thread::panicking();
        let (status, failure) = state.outcome();
        let execution = Execution {
            agent_name: state.fields.agent_name.as_deref().unwrap_or(UNKNOWN_AGENT),
            task: state.fields.task.as_deref().unwrap_or_default(),
            duration,
            status,
            failure: failure.as_ref(),
            finished_at: SystemTime::now(),
            trace: self.trace_ids(&id),
        };
        self.signals.metrics.record(&execution);
        self.signals.logs.write(&execution);
        if let Some(ids) = execution.trace {
            traces::hand_over_outcome(ids.span_id, &execution);
        }
    }
}

/// Selects agent spans by name and `ERROR` events (which may fail an enclosing agent);
/// everything else is rejected at the callsite, so it costs what it costs without us.
#[derive(Clone)]
pub(crate) struct AgentFilter {
    names: Arc<AgentSpanNames>,
    with_error_events: bool,
}

impl AgentFilter {
    /// The filter of the execution layer: agent spans and `ERROR` events.
    pub(crate) fn executions(names: Arc<AgentSpanNames>) -> Self {
        AgentFilter {
            names,
            with_error_events: true,
        }
    }

    /// Agent spans only: what the trace layer must always see, whatever `RUST_LOG` says.
    pub(crate) fn spans(names: Arc<AgentSpanNames>) -> Self {
        AgentFilter {
            names,
            with_error_events: false,
        }
    }

    #[inline]
    fn selects(&self, metadata: &Metadata<'_>) -> bool {
        if metadata.is_span() {
            self.names.matches(metadata.name())
        } else {
            self.with_error_events && *metadata.level() == Level::ERROR
        }
    }
}

impl<S> Filter<S> for AgentFilter {
    fn enabled(&self, metadata: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        self.selects(metadata)
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        if self.selects(metadata) {
            Interest::always()
        } else {
            Interest::never()
        }
    }
}
