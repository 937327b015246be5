//! Helpers shared by the unit tests.

use std::sync::{Arc, Mutex};

/// A layer that keeps the message of every warning (or another level) with one target.
#[derive(Clone)]
pub(crate) struct Warnings {
    target: &'static str,
    level: tracing::Level,
    messages: Arc<Mutex<Vec<String>>>,
}

impl Warnings {
    pub(crate) fn with_target(target: &'static str) -> Self {
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
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let metadata = event.metadata();
        if *metadata.level() == self.level && metadata.target() == self.target {
            let mut message = Message(String::new());
            event.record(&mut message);
            self.messages.lock().unwrap().push(message.0);
        }
    }
}
