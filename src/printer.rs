//! The formatter [`AgentTelemetryBuilder::try_init`](crate::AgentTelemetryBuilder::try_init)
//! installs beside the layer, which prints the other events `RUST_LOG` selects to stderr:
//! `tracing-subscriber`'s, with the fields of its spans and events scrubbed as every other
//! signal's are. Without it, a failing agent's `ERROR` line would print its task and error
//! text with the secrets the log line, the span and the metrics leave out.

use std::fmt;
use std::sync::Arc;

use tracing_core::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, FormatFields, Writer};

use crate::scrub::{Scrubber, REDACTED};

/// `tracing-subscriber`'s default field format, scrubbed: a field whose name looks
/// sensitive is written as [`REDACTED`], and the secrets in the text of every other are
/// replaced by it. ANSI styling of the field names is left out.
pub(crate) struct ScrubbedFields {
    scrubber: Arc<Scrubber>,
}

impl ScrubbedFields {
    pub(crate) fn new(scrubber: Arc<Scrubber>) -> Self {
        ScrubbedFields { scrubber }
    }
}

impl<'writer> FormatFields<'writer> for ScrubbedFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut text = String::new();
        let mut visitor = Redacting {
            inner: DefaultVisitor::new(Writer::new(&mut text), true),
            scrubber: &self.scrubber,
        };
        fields.record(&mut visitor);
        visitor.inner.finish()?;
        writer.write_str(&self.scrubber.scrub(&text))
    }
}

/// Hands each field to `tracing-subscriber`'s visitor, or [`REDACTED`] in place of the value
/// of a field whose name looks sensitive.
struct Redacting<'a, 'text> {
    inner: DefaultVisitor<'text>,
    scrubber: &'a Scrubber,
}

impl Visit for Redacting<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.scrubber.redacts_field(field.name()) {
            self.inner.record_debug(field, &format_args!("{REDACTED}"));
        } else {
            self.inner.record_str(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.scrubber.redacts_field(field.name()) {
            self.inner.record_debug(field, &format_args!("{REDACTED}"));
        } else {
            self.inner.record_error(field, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.scrubber.redacts_field(field.name()) {
            self.inner.record_debug(field, &format_args!("{REDACTED}"));
        } else {
            self.inner.record_debug(field, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::scrub::Scrubbing;

    /// What a formatter with [`ScrubbedFields`] prints for a span with `task` and an event in
    /// it.
    fn printed(scrubbing: &Scrubbing) -> String {
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let printer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .fmt_fields(ScrubbedFields::new(Arc::new(scrubbing.build().unwrap())));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(printer), || {
            let task = "use password=hunter2 and key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD";
            tracing::info_span!("agent_execution", agent_name = "a", task).in_scope(|| {
                tracing::error!(api_key = "k-123", error = %format!("could not {task}"), "failed");
            });
        });
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn span_and_event_fields_are_printed_scrubbed() {
        let line = printed(&Scrubbing::default());
        for secret in ["hunter2", "sk-proj-", "k-123"] {
            assert!(!line.contains(secret), "{secret} in {line}");
        }
        assert!(line.contains("agent_name=\"a\""), "{line}");
        assert!(line.contains("api_key=[REDACTED]"), "{line}");
        assert!(line.contains("password=[REDACTED]"), "{line}");
        assert!(line.contains("failed"), "{line}");
    }

    #[test]
    fn scrubbing_off_prints_fields_as_they_are() {
        let line = printed(&Scrubbing::off());
        assert!(
            line.contains("password=hunter2") && line.contains("api_key=\"k-123\""),
            "{line}"
        );
    }
}
