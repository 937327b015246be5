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
/// an incoming request. Call it after creating the span and before anything uses its context.
///
/// Returns `Ok(false)` when the headers carry no valid `traceparent` (as W3C Trace Context
/// writes it: two lowercase hex digits of version, then 32 of trace id, 16 of parent id and
/// 2 of flags, joined by `-`; ids not all zero): the span then starts a new trace, as it would
/// have without this call.
///
/// # Errors
///
/// [`Error::Propagation`] when the span's trace is fixed already: an agent span's is once it
/// was entered or its context was handed on (to a child made with `parent: &span`, a
/// `follows_from` link, or [`context`], [`inject_trace`], [`trace_headers`]), whose spans and
/// headers would otherwise name a trace it left; another span's, once `tracing-opentelemetry`
/// started it. Also when the span is not traced, or the telemetry layer is not installed.
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
    if !headers.get(TRACEPARENT).is_some_and(is_w3c_traceparent) {
        return Ok(false);
    }
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
        Some(Err(trace_fixed)) => Err(Error::Propagation {
            source: Box::new(trace_fixed),
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
/// process must continue. Empty when the span is not traced. An agent span's trace is fixed
/// from then on ([`continue_trace`] refuses it).
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

/// The header that names the trace and parent a request continues.
const TRACEPARENT: &str = "traceparent";

/// Whether `value` is a `traceparent` as W3C Trace Context writes it: version `00` with
/// exactly its four fields, or a later version (not `ff`) whose first four fields have
/// version 00's form, followed by the end or a `-`; every digit lowercase hex. The SDK's
/// parser reads ids of any length (`1` for `00…01`), which would join unrelated callers in
/// one trace. All-zero ids are left to it (a context that is not valid).
fn is_w3c_traceparent(value: &str) -> bool {
    const LEN: usize = 55;
    let value = value.trim().as_bytes();
    let is_hex = |range: std::ops::Range<usize>| {
        value[range]
            .iter()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(byte))
    };
    value.len() >= LEN
        && is_hex(0..2)
        && &value[0..2] != b"ff"
        && [2, 35, 52].iter().all(|&dash| value[dash] == b'-')
        && is_hex(3..35)
        && is_hex(36..52)
        && is_hex(53..LEN)
        && match (&value[0..2], value.get(LEN)) {
            (_, None) => true,
            (b"00", Some(_)) => false,
            (_, Some(next)) => *next == b'-',
        }
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
