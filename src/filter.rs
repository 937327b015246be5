//! The per-layer filter in front of the crate's layer: what reaches it, and which side of it
//! (the execution layer's or `tracing-opentelemetry`'s) each span and event is for.
//! Everything no side selects is rejected at the callsite, so it costs what it costs without
//! a subscriber.

use std::sync::Arc;

use tracing_core::span::{Attributes, Id, Record};
use tracing_core::subscriber::Interest;
use tracing_core::{Event, Level, LevelFilter, Metadata, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;

use crate::execution::AgentSpanNames;

/// Targets whose spans and events must never reach the trace exporter: the exporter's own
/// HTTP/gRPC stack and this crate. Tracing them would export the export, forever.
const EXPORT_PATH_TARGETS: [&str; 7] = [
    "opentelemetry",
    "reqwest",
    "hyper",
    "h2",
    "tonic",
    "tower",
    "agent_telemetry",
];

/// Whether `target` belongs to one of the export path's crates: `hyper` and `hyper_util::client`
/// do, `hyperion` does not.
pub(crate) fn on_export_path(target: &str) -> bool {
    EXPORT_PATH_TARGETS.iter().any(|krate| {
        target
            .strip_prefix(krate)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '_']))
    })
}

/// What reaches the crate's layer: what either side selects.
///
/// Invariants:
/// - a span is for exactly one side: the execution layer's when the names follow it
///   ([`AgentSpanNames::follows`]), else `tracing-opentelemetry`'s;
/// - an event may be for both ([`LayerFilter::event_sides`]);
/// - each side's `EnvFilter` sees the span callbacks of its own side's spans only, and only
///   when its directives name spans (`[agent_execution]=debug`): without such directives it
///   has nothing to learn from them.
///
/// One filter for both sides, not one per side: a per-layer filter looks the span up on
/// every enter, exit and close, whichever side the span is for.
pub(crate) struct LayerFilter {
    execution: ExecutionFilter,
    /// `None` when traces are off.
    traced: Option<TracedFilter>,
    /// Whether either side's `EnvFilter` follows spans.
    follows_spans: bool,
}

impl LayerFilter {
    pub(crate) fn new(execution: ExecutionFilter, traced: Option<TracedFilter>) -> Self {
        let follows_spans =
            execution.span_follower().is_some() || traced.as_ref().is_some_and(|t| t.span_follower().is_some());
        LayerFilter {
            execution,
            traced,
            follows_spans,
        }
    }

    /// Which sides an event that reached the layer is for: the execution layer's, and
    /// `tracing-opentelemetry`'s.
    pub(crate) fn event_sides<S>(&self, event: &Event<'_>, ctx: &Context<'_, S>) -> (bool, bool)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let metadata = event.metadata();
        let execution = self.execution.enabled(metadata, ctx);
        let traced = self
            .traced
            .as_ref()
            .is_some_and(|traced| traced.enabled(metadata, ctx) && traced.event_enabled(event, ctx));
        (execution, traced)
    }

    /// The `EnvFilter` to hand a span's callbacks to: its side's, when that one follows
    /// spans. `metadata` is looked up only then.
    #[inline]
    fn follower(&self, metadata: impl FnOnce() -> Option<&'static Metadata<'static>>) -> Option<&EnvFilter> {
        if !self.follows_spans {
            return None;
        }
        if self.execution.names.follows(metadata()?) {
            self.execution.span_follower()
        } else {
            self.traced.as_ref().and_then(TracedFilter::span_follower)
        }
    }
}

/// [`LayerFilter`], shared with the layer, which routes events by it.
#[derive(Clone)]
pub(crate) struct SharedFilter(pub(crate) Arc<LayerFilter>);

impl<S> Filter<S> for SharedFilter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, metadata: &Metadata<'_>, ctx: &Context<'_, S>) -> bool {
        let filter = &self.0;
        filter.execution.enabled(metadata, ctx)
            || filter
                .traced
                .as_ref()
                .is_some_and(|traced| traced.enabled(metadata, ctx))
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        let filter = &self.0;
        // Both sides see every callsite: their `EnvFilter`s register the spans their
        // directives name.
        let execution = filter.execution.callsite_enabled::<S>(metadata);
        let traced = filter
            .traced
            .as_ref()
            .map_or(Interest::never(), |traced| traced.callsite_enabled::<S>(metadata));
        if execution.is_always() || traced.is_always() {
            Interest::always()
        } else if execution.is_never() && traced.is_never() {
            Interest::never()
        } else {
            Interest::sometimes()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // Agent spans are selected by name, at any level; and `EnvFilter`'s hint (`OFF` for
        // `RUST_LOG=off`) would also turn off the agent spans the execution side wants.
        None
    }

    fn event_enabled(&self, _event: &Event<'_>, _ctx: &Context<'_, S>) -> bool {
        // Decided per side where the event is handed on: `LayerFilter::event_sides`.
        true
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(follower) = self.0.follower(|| Some(attrs.metadata())) {
            Filter::on_new_span(follower, attrs, id, ctx);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(follower) = self.0.follower(|| ctx.metadata(id)) {
            Filter::on_record(follower, id, values, ctx);
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(follower) = self.0.follower(|| ctx.metadata(id)) {
            Filter::on_enter(follower, id, ctx);
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(follower) = self.0.follower(|| ctx.metadata(id)) {
            Filter::on_exit(follower, id, ctx);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(follower) = self.0.follower(|| ctx.metadata(&id)) {
            Filter::on_close(follower, id, ctx);
        }
    }
}

/// The `EnvFilter` of `RUST_LOG`'s directives, and whether it needs span callbacks: only
/// directives that name a span (`[agent_execution]=debug`) follow the spans entered; without
/// them the filter has nothing to learn from span callbacks.
struct Directives {
    filter: EnvFilter,
    follows_spans: bool,
}

impl Directives {
    fn new(filter: EnvFilter, directives: &str) -> Self {
        Directives {
            filter,
            follows_spans: directives.contains('['),
        }
    }

    /// The filter to hand span callbacks to, when it needs them.
    fn span_follower(&self) -> Option<&EnvFilter> {
        self.follows_spans.then_some(&self.filter)
    }
}

/// The execution layer's side: agent spans by name, GenAI spans, `ERROR` events (which may
/// fail an enclosing agent) and, when traces are on, the events `RUST_LOG` selects (those
/// directly inside an agent span become its span events).
pub(crate) struct ExecutionFilter {
    names: Arc<AgentSpanNames>,
    events: Option<Directives>,
}

impl ExecutionFilter {
    /// Agent spans and `ERROR` events; with `events`, also the events those directives select.
    pub(crate) fn new(names: Arc<AgentSpanNames>, events: Option<(EnvFilter, &str)>) -> Self {
        ExecutionFilter {
            names,
            events: events.map(|(filter, directives)| Directives::new(filter, directives)),
        }
    }

    /// The filter to hand span callbacks to, when one needs them.
    fn span_follower(&self) -> Option<&EnvFilter> {
        self.events.as_ref().and_then(Directives::span_follower)
    }

    fn enabled<S: Subscriber>(&self, metadata: &Metadata<'_>, ctx: &Context<'_, S>) -> bool {
        if metadata.is_span() {
            return self.names.follows(metadata);
        }
        *metadata.level() == Level::ERROR
            || self.events.as_ref().is_some_and(|events| {
                !on_export_path(metadata.target()) && Filter::<S>::enabled(&events.filter, metadata, ctx)
            })
    }

    fn callsite_enabled<S: Subscriber>(&self, metadata: &'static Metadata<'static>) -> Interest {
        if metadata.is_span() {
            if let Some(filter) = self.span_follower() {
                // Registers the spans its directives name; the answer for events is below.
                let _ = Filter::<S>::callsite_enabled(filter, metadata);
            }
            return if self.names.follows(metadata) {
                Interest::always()
            } else {
                Interest::never()
            };
        }
        if *metadata.level() == Level::ERROR {
            return Interest::always();
        }
        match &self.events {
            Some(events) if !on_export_path(metadata.target()) => {
                Filter::<S>::callsite_enabled(&events.filter, metadata)
            }
            _ => Interest::never(),
        }
    }
}

/// `tracing-opentelemetry`'s side: what `RUST_LOG` selects, off the export path, but no agent
/// or GenAI spans (the execution layer's) and no events whose innermost span is one of those
/// (they are its span events, recorded by the execution layer).
pub(crate) struct TracedFilter {
    names: Arc<AgentSpanNames>,
    directives: Directives,
}

impl TracedFilter {
    pub(crate) fn new(names: Arc<AgentSpanNames>, filter: EnvFilter, directives: &str) -> Self {
        TracedFilter {
            names,
            directives: Directives::new(filter, directives),
        }
    }

    /// The filter to hand span callbacks to, when it needs them.
    fn span_follower(&self) -> Option<&EnvFilter> {
        self.directives.span_follower()
    }

    fn enabled<S: Subscriber>(&self, metadata: &Metadata<'_>, ctx: &Context<'_, S>) -> bool {
        let is_span = metadata.is_span();
        if is_span && self.names.follows(metadata) {
            return false;
        }
        if on_export_path(metadata.target()) || !Filter::<S>::enabled(&self.directives.filter, metadata, ctx) {
            return false;
        }
        is_span
            || !ctx
                .current_span()
                .metadata()
                .is_some_and(|span| self.names.follows(span))
    }

    fn callsite_enabled<S: Subscriber>(&self, metadata: &'static Metadata<'static>) -> Interest {
        // `EnvFilter` sees every callsite, as it registers the spans its directives name.
        let selected = Filter::<S>::callsite_enabled(&self.directives.filter, metadata);
        if selected.is_never() || on_export_path(metadata.target()) {
            return Interest::never();
        }
        match (metadata.is_span(), self.names.follows(metadata)) {
            (true, true) => Interest::never(),
            // `EnvFilter` says `always` for every span a span directive names, at any level:
            // its `enabled` still decides by the level.
            (true, false) if self.directives.follows_spans && selected.is_always() => Interest::sometimes(),
            (true, false) => selected,
            // An event's answer depends on the span it happens in.
            (false, _) => Interest::sometimes(),
        }
    }

    fn event_enabled<S: Subscriber>(&self, event: &Event<'_>, ctx: &Context<'_, S>) -> bool {
        Filter::<S>::event_enabled(&self.directives.filter, event, ctx)
    }
}
#[cfg(test)]
mod tests {
    use super::on_export_path;

    #[test]
    fn export_path_targets_are_whole_crates() {
        for target in [
            "opentelemetry_sdk",
            "opentelemetry",
            "hyper_util::client::legacy",
            "h2::codec",
            "reqwest",
        ] {
            assert!(on_export_path(target), "{target}");
        }
        for target in ["h2o_agents", "hyperion::agent", "towering", "my_app::reqwest_helper"] {
            assert!(!on_export_path(target), "{target}");
        }
    }
}
