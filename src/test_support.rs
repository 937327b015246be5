//! Helpers shared by the unit tests.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Metadata, Subscriber};

use crate::execution::Execution;
use crate::status::Status;

/// A successful, untraced execution of agent `a` on task `t` that took 1 ms.
pub(crate) fn execution() -> Execution {
    Execution {
        agent_name: "a".into(),
        task: Some("t".into()),
        duration: Duration::from_millis(1),
        status: Status::Success,
        failure: None,
        finished_at: SystemTime::now(),
        trace: None,
        usage: None,
    }
}

/// A finished `tool_call` span, unsampled and parentless, with these attributes and events.
pub(crate) fn span_data(
    attributes: Vec<opentelemetry::KeyValue>,
    events: Vec<opentelemetry::trace::Event>,
) -> opentelemetry_sdk::trace::SpanData {
    use opentelemetry::trace::{SpanContext, SpanId, SpanKind};
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    let mut span_events = SpanEvents::default();
    span_events.events = events;
    opentelemetry_sdk::trace::SpanData {
        span_context: SpanContext::empty_context(),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: std::borrow::Cow::Borrowed("tool_call"),
        start_time: SystemTime::now(),
        end_time: SystemTime::now(),
        attributes,
        dropped_attributes_count: 0,
        events: span_events,
        links: SpanLinks::default(),
        status: opentelemetry::trace::Status::Unset,
        instrumentation_scope: opentelemetry::InstrumentationScope::builder("test").build(),
    }
}

/// A layer that keeps the message of every warning (or another level) with one target,
/// followed by its other fields as ` name=value`.
#[derive(Clone)]
pub(crate) struct Warnings {
    target: &'static str,
    level: tracing::Level,
    messages: Arc<Mutex<Vec<String>>>,
}

impl Warnings {
    pub(crate) fn with_target(target: &'static str) -> Self {
        keep_interest_dynamic();
        Warnings {
            target,
            level: tracing::Level::WARN,
            messages: Arc::default(),
        }
    }

    pub(crate) fn at_level(self, level: tracing::Level) -> Self {
        Warnings { level, ..self }
    }

    /// A dispatcher that sends everything to this layer.
    pub(crate) fn dispatch(&self) -> tracing::Dispatch {
        use tracing_subscriber::layer::SubscriberExt;
        tracing::Dispatch::new(tracing_subscriber::registry().with(self.clone()))
    }

    pub(crate) fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Message {
            text: String,
            fields: String,
        }
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.text = format!("{value:?}");
                } else {
                    use std::fmt::Write;
                    // Writing to a String cannot fail.
                    let _ = write!(self.fields, " {}={value:?}", field.name());
                }
            }
        }
        let metadata = event.metadata();
        if *metadata.level() == self.level && metadata.target() == self.target {
            let mut message = Message::default();
            event.record(&mut message);
            self.messages.lock().unwrap().push(message.text + &message.fields);
        }
    }
}

/// Unit tests run in parallel, each with its own scoped subscriber, and `tracing` caches one
/// interest per callsite for the whole process. While at most one dispatcher is registered,
/// tracing-core 0.1.36 computes that interest from the default dispatcher of whichever thread
/// hits the callsite first (`Rebuilder::JustOne` in `callsite.rs`), so a test without a
/// subscriber could cache "never" for a callsite another test is capturing, and its warning
/// would be lost. Two inert dispatchers that stay registered, each "sometimes" interested,
/// make every callsite ask the current thread's dispatcher at each event.
pub(crate) fn keep_interest_dynamic() {
    static ANCHORS: OnceLock<[Dispatch; 2]> = OnceLock::new();
    ANCHORS.get_or_init(|| [Dispatch::new(Inert), Dispatch::new(Inert)]);
}

/// Interested in every callsite, enabled for none.
struct Inert;

impl Subscriber for Inert {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        false
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}
