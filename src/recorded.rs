//! Field values taken before a span is locked, and handed to its visitors under the lock.
//!
//! A value's `Debug` or `Display` is the application's code, and may emit events or record
//! on spans as it formats itself: on the very span whose fields are being recorded, whose
//! extensions would then be locked twice on one thread, and the thread would wait on itself.
//! So the layer never formats a value while it holds a span's extensions:
//! [`RecordedValues`] takes every value first, with no lock held, formatting each that a
//! visitor reads to at most the characters its visitors keep (and none no visitor reads), and
//! [`replay`](RecordedValues::replay) then makes the same calls on the span's visitors with
//! the taken values, which they treat exactly as the originals.

use std::fmt;

use tracing_core::field::{display, Field, Visit};

use crate::text::debug_text;

/// The values of one `Span::record`, taken.
pub(crate) struct RecordedValues {
    values: Vec<(Field, Recorded)>,
}

/// Takes values: `chars_for` says how many characters of a field's `Debug` text a visitor of
/// the replay formats, `None` when none reads it.
struct Taking<'a> {
    values: Vec<(Field, Recorded)>,
    chars_for: &'a dyn Fn(&Field) -> Option<usize>,
}

/// One value, as its visitor call carried it.
enum Recorded {
    Str(String),
    Bool(bool),
    I64(i64),
    U64(u64),
    I128(i128),
    U128(u128),
    F64(f64),
    /// A `Debug` value's text, cut as `debug_text` cuts.
    Debug(String),
    /// An error's `Display` text, cut likewise.
    Error(String),
}

impl RecordedValues {
    /// Takes the values `record` visits. A `Debug` or error value is formatted to at most
    /// `chars_for(field)` characters, at least as many as any visitor of the replay keeps; one
    /// no visitor reads (`None`: a sensitive name's, say) is not formatted at all, and is
    /// replayed as empty text.
    pub(crate) fn take(chars_for: &dyn Fn(&Field) -> Option<usize>, record: impl FnOnce(&mut dyn Visit)) -> Self {
        let mut taking = Taking {
            values: Vec::new(),
            chars_for,
        };
        record(&mut taking);
        RecordedValues { values: taking.values }
    }

    /// Makes on `visitor` the calls the values were taken from, in their order.
    pub(crate) fn replay(&self, visitor: &mut dyn Visit) {
        for (field, value) in &self.values {
            match value {
                Recorded::Str(text) => visitor.record_str(field, text),
                Recorded::Bool(value) => visitor.record_bool(field, *value),
                Recorded::I64(value) => visitor.record_i64(field, *value),
                Recorded::U64(value) => visitor.record_u64(field, *value),
                Recorded::I128(value) => visitor.record_i128(field, *value),
                Recorded::U128(value) => visitor.record_u128(field, *value),
                Recorded::F64(value) => visitor.record_f64(field, *value),
                // `display`: a `Debug` that writes the taken text as it is.
                Recorded::Debug(text) => visitor.record_debug(field, &display(text)),
                Recorded::Error(text) => visitor.record_error(field, &TextError(text.clone())),
            }
        }
    }
}

impl Taking<'_> {
    fn push(&mut self, field: &Field, value: Recorded) {
        self.values.push((field.clone(), value));
    }

    /// `value`'s text as the visitors that read `field` need it; empty when none does.
    fn text(&self, field: &Field, value: &dyn fmt::Debug) -> String {
        (self.chars_for)(field).map_or_else(String::new, |chars| debug_text(value, chars))
    }
}

impl Visit for Taking<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, Recorded::Str(value.to_owned()));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, Recorded::Bool(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, Recorded::I64(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, Recorded::U64(value));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.push(field, Recorded::I128(value));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.push(field, Recorded::U128(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, Recorded::F64(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let text = self.text(field, &format_args!("{value}"));
        self.push(field, Recorded::Error(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = self.text(field, value);
        self.push(field, Recorded::Debug(text));
    }
}

/// An error whose `Display` is a taken text. Visitors see its message only, as they format
/// an error's; its sources were not taken.
#[derive(Debug)]
struct TextError(String);

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TextError {}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::{Context, SubscriberExt};

    use super::*;

    /// Every call a visitor gets, written out; a `Debug` value's text cut at `chars`.
    struct Calls {
        chars: usize,
        seen: Vec<String>,
    }

    impl Visit for Calls {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.seen.push(format!("str {field}={value}"));
        }
        fn record_bool(&mut self, field: &Field, value: bool) {
            self.seen.push(format!("bool {field}={value}"));
        }
        fn record_i64(&mut self, field: &Field, value: i64) {
            self.seen.push(format!("i64 {field}={value}"));
        }
        fn record_u64(&mut self, field: &Field, value: u64) {
            self.seen.push(format!("u64 {field}={value}"));
        }
        fn record_i128(&mut self, field: &Field, value: i128) {
            self.seen.push(format!("i128 {field}={value}"));
        }
        fn record_u128(&mut self, field: &Field, value: u128) {
            self.seen.push(format!("u128 {field}={value}"));
        }
        fn record_f64(&mut self, field: &Field, value: f64) {
            self.seen.push(format!("f64 {field}={value}"));
        }
        fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
            let text = debug_text(&format_args!("{value}"), self.chars);
            self.seen.push(format!("error {field}={text}"));
        }
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            self.seen
                .push(format!("debug {field}={}", debug_text(value, self.chars)));
        }
    }

    /// The calls a span's fields made on a visitor, directly and replayed.
    type DirectAndReplayed = (Vec<String>, Vec<String>);

    /// For each new span: the calls its fields make on a visitor keeping `chars`, directly
    /// and replayed from values taken at `taken_chars`.
    struct Compare {
        chars: usize,
        taken_chars: usize,
        seen: Arc<Mutex<Vec<DirectAndReplayed>>>,
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Compare {
        fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, _: &tracing::span::Id, _: Context<'_, S>) {
            let mut direct = Calls {
                chars: self.chars,
                seen: Vec::new(),
            };
            attrs.record(&mut direct);
            let mut replayed = Calls {
                chars: self.chars,
                seen: Vec::new(),
            };
            let taken_chars = |_: &Field| Some(self.taken_chars);
            RecordedValues::take(&taken_chars, |visitor| attrs.record(visitor)).replay(&mut replayed);
            self.seen.lock().unwrap().push((direct.seen, replayed.seen));
        }
    }

    #[derive(Debug)]
    struct Failed;

    impl fmt::Display for Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("the model refused the request")
        }
    }

    impl std::error::Error for Failed {}

    fn calls_directly_and_replayed(chars: usize, taken_chars: usize) -> DirectAndReplayed {
        let seen = Arc::default();
        let layer = Compare {
            chars,
            taken_chars,
            seen: Arc::clone(&seen),
        };
        let long = "é".repeat(40);
        let error: &(dyn std::error::Error + 'static) = &Failed;
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            tracing::info_span!(
                "agent_execution",
                task = "plan",
                ok = true,
                signed = -3i64,
                unsigned = 7u64,
                wide = -(1i128 << 70),
                wider = 1u128 << 70,
                ratio = 0.5,
                model = ?"gpt-4o",
                prompt = ?long,
                error,
            );
        });
        let mut seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        seen.remove(0)
    }

    #[test]
    fn a_replay_makes_the_calls_the_values_made() {
        let (direct, replayed) = calls_directly_and_replayed(1000, 1000);
        assert_eq!(replayed, direct);
        assert_eq!(direct.len(), 10, "{direct:?}");
        assert!(direct.contains(&"debug model=\"gpt-4o\"".to_owned()), "{direct:?}");
        assert!(
            direct.contains(&"error error=the model refused the request".to_owned()),
            "{direct:?}"
        );
    }

    /// Counts how often it is formatted.
    struct Counted(&'static AtomicUsize);

    impl fmt::Debug for Counted {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.fetch_add(1, Ordering::Relaxed);
            f.write_str("hunter2")
        }
    }

    /// Takes a new span's values as if only its `password` went unread, and checks the
    /// replay.
    struct PasswordUnread;

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PasswordUnread {
        fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, _: &tracing::span::Id, _: Context<'_, S>) {
            let read = |field: &Field| (field.name() != "password").then_some(100);
            let taken = RecordedValues::take(&read, |visitor| attrs.record(visitor));
            let mut calls = Calls {
                chars: 100,
                seen: Vec::new(),
            };
            taken.replay(&mut calls);
            assert_eq!(calls.seen, ["debug password=", "debug model=hunter2"]);
        }
    }

    #[test]
    fn a_value_no_visitor_reads_is_not_formatted() {
        static FORMATTED: AtomicUsize = AtomicUsize::new(0);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(PasswordUnread), || {
            let _span = tracing::info_span!(
                "agent_execution",
                password = ?Counted(&FORMATTED),
                model = ?Counted(&FORMATTED)
            );
        });
        assert_eq!(FORMATTED.load(Ordering::Relaxed), 1, "only the value a visitor reads");
    }

    #[test]
    fn values_taken_at_a_visitors_limit_or_more_are_cut_as_it_cuts_them() {
        for taken_chars in [10, 11, 30, 1000] {
            let (direct, replayed) = calls_directly_and_replayed(10, taken_chars);
            assert_eq!(replayed, direct, "taken at {taken_chars}");
        }
        let (direct, _) = calls_directly_and_replayed(10, 10);
        assert!(
            direct.contains(&format!("debug prompt=\"{}…", "é".repeat(9))),
            "{direct:?}"
        );
        // Taken at fewer characters than the visitor keeps, the value is cut short: what the
        // layer's limit rules out.
        let (direct, replayed) = calls_directly_and_replayed(30, 10);
        assert_ne!(replayed, direct);
    }
    /// Records a new span's fields into the execution's own visitor, directly and replayed
    /// from values taken as the layer takes them.
    struct IntoExecutionFields(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for IntoExecutionFields {
        fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, _: &tracing::span::Id, _: Context<'_, S>) {
            use crate::execution::ExecutionFields;
            let mut direct = ExecutionFields::new(8);
            attrs.record(&mut direct);
            let mut replayed = ExecutionFields::new(8);
            let chars = replayed.formatted_chars();
            let chars_for = |field: &Field| ExecutionFields::reads(field).then_some(chars);
            RecordedValues::take(&chars_for, |visitor| attrs.record(visitor)).replay(&mut replayed);
            let mut seen = self.0.lock().unwrap();
            seen.push(format!("{direct:?}"));
            seen.push(format!("{replayed:?}"));
        }
    }

    #[test]
    fn the_execution_keeps_the_same_fields_replayed_as_recorded_directly() {
        let seen = Arc::default();
        let layer = IntoExecutionFields(Arc::clone(&seen));
        let long = "a task in many words ".repeat(30);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            let _span = tracing::info_span!(
                "agent_execution",
                agent_name = ?"reviewer",
                task = ?long,
                status = false,
                gen_ai.request.model = ?"gpt-4o",
                gen_ai.usage.input_tokens = 12u64,
                gen_ai.usage.output_tokens = ?"many",
                payload = ?long,
            );
        });
        let seen = seen.lock().unwrap();
        assert_eq!(seen[1], seen[0]);
        for kept in [
            "reviewer",
            "a task i…",
            "failure",
            "gpt-4o",
            "input: Some(12)",
            "invalid: 1",
        ] {
            assert!(seen[0].contains(kept), "{kept} in {}", seen[0]);
        }
    }
}
