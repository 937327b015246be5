//! W3C Trace Context across process boundaries: an agent execution that continues a trace
//! started elsewhere joins it, and one that calls out passes its own context on.
//!
//! Headers are anything that implements OpenTelemetry's [`Extractor`] / [`Injector`]
//! (`HashMap<String, String>` does; `opentelemetry-http` adds `http::HeaderMap`).
//!
//! Agent spans are built by this crate, not by `tracing-opentelemetry`, so its
//! `OpenTelemetrySpanExt` does not reach them: use these functions, which work on agent spans
//! and on every other traced span alike.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::{Error, Result};
use crate::layer::AgentSpanHook;
use crate::traces::{AgentSpan, AgentTracer};

/// Makes `span` a child of the trace named by the `traceparent` (and `tracestate`) headers of
/// an incoming request. Call it after creating the span and before entering it.
///
/// Returns `Ok(false)` when the headers carry no valid `traceparent`: the span then starts a
/// new trace, as it would have without this call.
///
/// # Errors
///
/// [`Error::Propagation`] when the span was already entered (its trace is fixed by then), is
/// not traced, or the telemetry layer is not installed.
///
/// # Examples
///
/// ```
/// # use std::collections::HashMap;
/// # use agent_telemetry::{AgentTelemetry, TracesExporter};
/// # use tracing_subscriber::layer::SubscriberExt;
/// # fn main() -> Result<(), agent_telemetry::Error> {
/// # let (layer, _telemetry) = AgentTelemetry::builder().without_metrics_server()
/// #     .with_traces_exporter(TracesExporter::Console).ignore_environment().build()?;
/// # let _default = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
/// let headers = HashMap::from([(
///     "traceparent".to_owned(),
///     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
/// )]);
/// let span = tracing::info_span!("agent_execution", agent_name = "backend-engineer", task = "Implement API");
/// assert!(agent_telemetry::propagation::continue_trace(&span, &headers)?);
/// span.in_scope(|| { /* the agent's work, in the caller's trace */ });
/// # Ok(())
/// # }
/// ```
pub fn continue_trace(span: &tracing::Span, headers: &dyn Extractor) -> Result<bool> {
    let parent = TraceContextPropagator::new().extract(headers);
    if !parent.span().span_context().is_valid() {
        return Ok(false);
    }
    let joined = with_agent_span(span, &mut |tracer, agent_span| {
        tracer.continue_remote(agent_span, &parent)
    });
    match joined {
        // The replaced parent is dropped here, the span's lock released.
        Some(Ok(_replaced)) => Ok(true),
        Some(Err(already_started)) => Err(Error::Propagation {
            source: Box::new(already_started),
        }),
        // Not an agent span: one `tracing-opentelemetry` traces, if any.
        None => span
            .set_parent(parent)
            .map(|()| true)
            .map_err(|source| Error::Propagation {
                source: Box::new(source),
            }),
    }
}

/// The OpenTelemetry context of `span`, agent spans included: what a child in another
/// process must continue. Empty when the span is not traced.
pub fn context(span: &tracing::Span) -> opentelemetry::Context {
    with_agent_span(span, &mut |_, agent_span| agent_span.context()).unwrap_or_else(|| span.context())
}

/// Writes `span`'s `traceparent` (and `tracestate`) into the headers of an outgoing request,
/// so the service it calls continues the same trace.
pub fn inject_trace(span: &tracing::Span, headers: &mut dyn Injector) {
    TraceContextPropagator::new().inject_context(&context(span), headers);
}

/// The W3C Trace Context headers of `span`, for clients that take a map.
pub fn trace_headers(span: &tracing::Span) -> HashMap<String, String> {
    let mut headers = HashMap::new();
    inject_trace(span, &mut headers);
    headers
}

/// Runs `f` on `span`'s agent span state; `None` when it is not a traced agent span.
fn with_agent_span<T>(span: &tracing::Span, f: &mut dyn FnMut(&AgentTracer, &mut AgentSpan) -> T) -> Option<T> {
    let mut result = None;
    span.with_subscriber(|(id, dispatch)| {
        if let Some(hook) = dispatch.downcast_ref::<AgentSpanHook>() {
            hook.with_span(dispatch, id, &mut |tracer, agent_span| {
                result = Some(f(tracer, agent_span));
            });
        }
    });
    result
}
