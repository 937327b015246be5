//! Helpers shared by the unit tests.

use std::sync::{Arc, Mutex};

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
