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
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Redacting {
            inner: DefaultVisitor::new(writer, true),
            scrubber: &self.scrubber,
        };
        fields.record(&mut visitor);
        visitor.inner.finish()
    }
}

/// Hands each field to `tracing-subscriber`'s visitor scrubbed, value by value, as the
/// layer scrubs each: [`REDACTED`] in place of the value of a field whose name looks
/// sensitive, and the text of every other scrubbed before it is quoted or escaped.
struct Redacting<'a, 'writer> {
    inner: DefaultVisitor<'writer>,
    scrubber: &'a Scrubber,
}

impl Redacting<'_, '_> {
    /// Hands on `field` as [`REDACTED`] if its name looks sensitive; whether it did.
    fn redacted(&mut self, field: &Field) -> bool {
        let redacts = self.scrubber.redacts_field(field.name());
        if redacts {
            self.inner.record_debug(field, &format_args!("{REDACTED}"));
        }
        redacts
    }
}

impl Visit for Redacting<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.redacted(field) {
            self.inner.record_str(field, &self.scrubber.scrub(value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.redacted(field) {
            return;
        }
        if self.scrubber.is_on() {
            self.inner
                .record_error(field, &ScrubbedError::of(value, self.scrubber, 0));
        } else {
            self.inner.record_error(field, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.redacted(field) {
            return;
        }
        if self.scrubber.is_on() {
            let text = format!("{value:?}");
            self.inner
                .record_debug(field, &format_args!("{}", self.scrubber.scrub(&text)));
        } else {
            self.inner.record_debug(field, value);
        }
    }
}

/// An error and its sources as their text scrubbed, for `tracing-subscriber` to print as it
/// prints an error: its message, then `.sources=[..]`.
#[derive(Debug)]
struct ScrubbedError {
    text: String,
    source: Option<Box<ScrubbedError>>,
}

/// The most sources of an error printed; past them, [`MORE_SOURCES`] says there were more.
const MAX_SOURCES: usize = 32;

/// What stands for the sources past [`MAX_SOURCES`].
const MORE_SOURCES: &str = "(further sources not printed)";

impl ScrubbedError {
    fn of(error: &(dyn std::error::Error + 'static), scrubber: &Scrubber, depth: usize) -> Self {
        let source = error.source().map(|source| {
            Box::new(if depth < MAX_SOURCES {
                ScrubbedError::of(source, scrubber, depth + 1)
            } else {
                ScrubbedError {
                    text: MORE_SOURCES.to_owned(),
                    source: None,
                }
            })
        });
        ScrubbedError {
            text: scrubber.scrub(&error.to_string()).into_owned(),
            source,
        }
    }
}

impl fmt::Display for ScrubbedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for ScrubbedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
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
                // Quoted: the text is scrubbed before its quotes are escaped.
                tracing::info!(note = r#"log in with password="quoted secret" please"#);
                let cause = std::io::Error::other("upstream said api_key=source-secret");
                let error = std::io::Error::other(Wrapped(cause));
                tracing::error!(error = &error as &(dyn std::error::Error + 'static));
            });
        });
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn span_and_event_fields_are_printed_scrubbed() {
        let line = printed(&Scrubbing::default());
        for secret in ["hunter2", "sk-proj-", "k-123", "quoted secret", "source-secret"] {
            assert!(!line.contains(secret), "{secret} in {line}");
        }
        assert!(line.contains("agent_name=\"a\""), "{line}");
        assert!(line.contains("api_key=[REDACTED]"), "{line}");
        assert!(line.contains("password=[REDACTED]"), "{line}");
        assert!(line.contains("failed"), "{line}");
        assert!(
            line.contains("error.sources=["),
            "the sources are still printed: {line}"
        );
    }

    /// An error with a source, as an application wraps one.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("the call failed")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn sources_past_the_most_printed_are_said_to_be_there() {
        let mut error = std::io::Error::other("source 40");
        for _ in 0..40 {
            error = std::io::Error::other(Wrapped(error));
        }
        let scrubbed = ScrubbedError::of(&error, &Scrubbing::default().build().unwrap(), 0);
        let texts: Vec<String> = std::iter::successors(Some(&scrubbed as &dyn std::error::Error), |e| e.source())
            .map(ToString::to_string)
            .collect();
        assert_eq!(texts.len(), 1 + MAX_SOURCES + 1, "{texts:?}");
        assert_eq!(texts.last().map(String::as_str), Some(MORE_SOURCES));
        let short = std::io::Error::other(Wrapped(std::io::Error::other("the cause")));
        let scrubbed = ScrubbedError::of(&short, &Scrubbing::default().build().unwrap(), 0);
        let cause = std::error::Error::source(&scrubbed).expect("its source");
        assert_eq!(cause.to_string(), "the cause");
        assert!(cause.source().is_none(), "no marker after the last source");
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
