//! Per-layer filters: what reaches the execution layer and what reaches
//! `tracing-opentelemetry`. Everything no signal selects is rejected at the callsite, so it
//! costs what it costs without a subscriber.

use std::sync::Arc;

use tracing_core::span::{Attributes, Id, Record};
use tracing_core::subscriber::Interest;
use tracing_core::{Event, Level, LevelFilter, Metadata, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::{Context, Filter};

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

/// What the execution layer sees: agent spans by name, GenAI spans, `ERROR` events (which may fail an
/// enclosing agent) and, when traces are on, the events `RUST_LOG` selects (those directly
/// inside an agent span become its span events).
///
/// Written out rather than composed with `FilterExt::or`: a combinator hands every span
/// callback to both sides, and `EnvFilter` takes a shared read lock in each, which two
/// threads running agents would contend for on every enter, exit and close.
pub(crate) struct ExecutionFilter {
    names: Arc<AgentSpanNames>,
    events: Option<SelectedEvents>,
}

/// The events `RUST_LOG` selects, off the export path.
struct SelectedEvents {
    filter: EnvFilter,
    /// Directives that name a span (`[agent_execution]=debug`) need to follow the spans
    /// entered; without them the filter has nothing to learn from span callbacks.
    follows_spans: bool,
}

impl ExecutionFilter {
    /// Agent spans and `ERROR` events; with `events`, also the events those directives select.
    pub(crate) fn new(names: Arc<AgentSpanNames>, events: Option<(EnvFilter, &str)>) -> Self {
        ExecutionFilter {
            names,
            events: events.map(|(filter, directives)| SelectedEvents {
                filter,
                follows_spans: directives.contains('['),
            }),
        }
    }

    /// The filter to hand span callbacks to, when one needs them.
    fn span_follower(&self) -> Option<&EnvFilter> {
        self.events
            .as_ref()
            .filter(|events| events.follows_spans)
            .map(|events| &events.filter)
    }
}

impl<S: Subscriber> Filter<S> for ExecutionFilter {
    fn enabled(&self, metadata: &Metadata<'_>, ctx: &Context<'_, S>) -> bool {
        if metadata.is_span() {
            return self.names.follows(metadata);
        }
        *metadata.level() == Level::ERROR
            || self.events.as_ref().is_some_and(|events| {
                !on_export_path(metadata.target()) && Filter::<S>::enabled(&events.filter, metadata, ctx)
            })
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
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

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // Agent spans are selected by name, at any level.
        None
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(filter) = self.span_follower() {
            Filter::on_new_span(filter, attrs, id, ctx);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(filter) = self.span_follower() {
            Filter::on_record(filter, id, values, ctx);
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(filter) = self.span_follower() {
            Filter::on_enter(filter, id, ctx);
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(filter) = self.span_follower() {
            Filter::on_exit(filter, id, ctx);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(filter) = self.span_follower() {
            Filter::on_close(filter, id, ctx);
        }
    }
}

/// For the `tracing-opentelemetry` layer: what `RUST_LOG` selects, off the export path, but no
/// agent or GenAI spans (ours) and no events whose innermost span is one of ours (they are its
/// span events, recorded by us).
///
/// Written out rather than composed with `FilterExt::and`: every agent span goes through this
/// filter's `enabled` (the execution layer wants it, so the callsite cannot be cached as
/// never), and the name check rejects it before `EnvFilter` and the target are looked at.
pub(crate) struct TracedFilter {
    names: Arc<AgentSpanNames>,
    filter: EnvFilter,
}

impl TracedFilter {
    pub(crate) fn new(names: Arc<AgentSpanNames>, filter: EnvFilter) -> Self {
        TracedFilter { names, filter }
    }
}

impl<S: Subscriber> Filter<S> for TracedFilter {
    fn enabled(&self, metadata: &Metadata<'_>, ctx: &Context<'_, S>) -> bool {
        let is_span = metadata.is_span();
        if is_span && self.names.follows(metadata) {
            return false;
        }
        if on_export_path(metadata.target()) || !Filter::<S>::enabled(&self.filter, metadata, ctx) {
            return false;
        }
        is_span
            || !ctx
                .current_span()
                .metadata()
                .is_some_and(|span| self.names.follows(span))
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        // `EnvFilter` sees every callsite, as it registers the spans its directives name.
        let selected = Filter::<S>::callsite_enabled(&self.filter, metadata);
        if selected.is_never() || on_export_path(metadata.target()) {
            return Interest::never();
        }
        match (metadata.is_span(), self.names.follows(metadata)) {
            (true, true) => Interest::never(),
            (true, false) => selected,
            // An event's answer depends on the span it happens in.
            (false, _) => Interest::sometimes(),
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // No hint, as the combinators this filter replaces gave none: `EnvFilter`'s (`OFF` for
        // `RUST_LOG=off`) would also turn off the agent spans the execution layer wants.
        None
    }

    fn event_enabled(&self, event: &Event<'_>, ctx: &Context<'_, S>) -> bool {
        Filter::<S>::event_enabled(&self.filter, event, ctx)
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        Filter::on_new_span(&self.filter, attrs, id, ctx);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        Filter::on_record(&self.filter, id, values, ctx);
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        Filter::on_enter(&self.filter, id, ctx);
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        Filter::on_exit(&self.filter, id, ctx);
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        Filter::on_close(&self.filter, id, ctx);
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
