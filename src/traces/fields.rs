//! A span's `tracing` fields as OpenTelemetry values, the conversions `tracing-opentelemetry`
//! makes: each field to the execution (its own fields) or to the span, a field whose name
//! looks sensitive as `[REDACTED]`, text scrubbed and cut; events shaped as
//! `tracing-opentelemetry` shapes span events; the `code.*` location.

use std::fmt;

use opentelemetry::trace::SpanKind;
use opentelemetry::{KeyValue, Value};
use tracing_core::field::{Field, Visit};
use tracing_core::Metadata;

use super::attributes;
use crate::execution::ExecutionFields;
use crate::gen_ai::OPERATION_FIELD;
use crate::scrub::{Scrubber, REDACTED, SCRUB_MARGIN};
use crate::text::debug_text;

/// `code.*` attributes, as `tracing-opentelemetry` adds them.
pub(super) fn push_location(attributes: &mut Vec<KeyValue>, metadata: &'static Metadata<'static>) {
    if let Some(file) = metadata.file() {
        attributes.push(KeyValue::new(attributes::CODE_FILE_PATH, file));
    }
    if let Some(module) = metadata.module_path() {
        attributes.push(KeyValue::new(attributes::CODE_MODULE_NAME, module));
    }
    if let Some(line) = metadata.line() {
        attributes.push(KeyValue::new(attributes::CODE_LINE_NUMBER, i64::from(line)));
    }
}

/// The most characters of a value's `Debug` text formatted for an attribute kept to `chars`:
/// scrubbing looks [`SCRUB_MARGIN`] past the cut.
pub(super) fn formatted_chars(chars: usize) -> usize {
    chars.saturating_add(SCRUB_MARGIN)
}

/// A span's fields, each to the execution or to the span.
pub(super) struct SplitFields<'a, S> {
    pub(super) execution: &'a mut ExecutionFields,
    pub(super) span: OtelValues<'a, S>,
}

impl<S: FieldSink> SplitFields<'_, S> {
    fn visitor(&mut self, field: &Field) -> &mut dyn Visit {
        if ExecutionFields::owns(field) {
            self.execution
        } else {
            &mut self.span
        }
    }
}

impl<S: FieldSink> Visit for SplitFields<'_, S> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // The operation decides the span's role, and stays its attribute.
        if field.name() == OPERATION_FIELD {
            self.execution.record_str(field, value);
        }
        self.visitor(field).record_str(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.visitor(field).record_bool(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.visitor(field).record_i64(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.visitor(field).record_u64(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.visitor(field).record_i128(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.visitor(field).record_u128(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.visitor(field).record_f64(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.visitor(field).record_error(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == OPERATION_FIELD {
            self.execution.record_debug(field, value);
        }
        self.visitor(field).record_debug(field, value);
    }
}

pub(super) fn span_kind(text: &str) -> Option<SpanKind> {
    Some(match text.to_ascii_lowercase().as_str() {
        "server" => SpanKind::Server,
        "client" => SpanKind::Client,
        "producer" => SpanKind::Producer,
        "consumer" => SpanKind::Consumer,
        "internal" => SpanKind::Internal,
        _ => return None,
    })
}

/// An event's fields: `message` names the event, an `error` becomes an `exception` event.
pub(super) struct EventFields {
    pub(super) name: Option<String>,
    pub(super) attributes: Vec<KeyValue>,
}

impl FieldSink for EventFields {
    fn set(&mut self, field: &Field, value: Value) {
        match field.name() {
            "message" => self.name = Some(value.as_str().into_owned()),
            "error" => {
                self.name.get_or_insert_with(|| "exception".to_owned());
                self.attributes
                    .push(KeyValue::new(attributes::EXCEPTION_MESSAGE, value));
            }
            name if name.starts_with("log.") => {}
            name => self.attributes.push(KeyValue::new(name, value)),
        }
    }
}

/// Where [`OtelValues`] puts each field, as an OpenTelemetry value.
pub(super) trait FieldSink {
    fn set(&mut self, field: &Field, value: Value);

    /// OpenTelemetry has no unsigned integers; `tracing-opentelemetry` writes an event's as
    /// text, which is the default here.
    fn set_u64(&mut self, field: &Field, value: u64) {
        self.set(field, Value::from(value.to_string()));
    }
}

/// A `tracing` field visitor that hands each value to a [`FieldSink`] as an OpenTelemetry
/// value, the conversions `tracing-opentelemetry` makes: a field whose name looks sensitive
/// as [`REDACTED`], text scrubbed and cut at `chars` characters.
pub(super) struct OtelValues<'a, S> {
    pub(super) sink: &'a mut S,
    pub(super) chars: usize,
    pub(super) scrubber: &'a Scrubber,
}

impl<S: FieldSink> OtelValues<'_, S> {
    /// Sets `field` to [`REDACTED`] if its name looks sensitive; whether it did.
    fn redacted(&mut self, field: &Field) -> bool {
        let redacts = self.scrubber.redacts_field(field.name());
        if redacts {
            self.sink.set(field, Value::from(REDACTED));
        }
        redacts
    }

    fn text(&mut self, field: &Field, text: &str) {
        if !self.redacted(field) {
            let kept = self.scrubber.scrub_and_cut(text, self.chars).into_owned();
            self.sink.set(field, Value::from(kept));
        }
    }

    fn formatted(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.redacted(field) {
            let text = debug_text(value, formatted_chars(self.chars));
            let kept = self.scrubber.scrub_and_cut(&text, self.chars).into_owned();
            self.sink.set(field, Value::from(kept));
        }
    }
}

impl<S: FieldSink> Visit for OtelValues<'_, S> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if !self.redacted(field) {
            self.sink.set(field, Value::Bool(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if !self.redacted(field) {
            self.sink.set(field, Value::I64(value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if !self.redacted(field) {
            self.sink.set_u64(field, value);
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if !self.redacted(field) {
            self.sink.set(field, Value::F64(value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.formatted(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.formatted(field, value);
    }
}
