//! The size of spans: what a span weighs in the queue and in an export request, and the
//! attribute value limit applied to the spans `tracing-opentelemetry` builds (agent spans are
//! cut as their fields are recorded).
//!
//! Weights are estimates of the OTLP protobuf encoding from above: every string's bytes, plus
//! a fixed overhead per span, attribute and event that exceeds what protobuf adds for them.

use opentelemetry::trace::{Event, Link, TraceState};
use opentelemetry::{Array, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::SpanData;

use std::borrow::Cow;

use crate::scrub::{Scrubber, REDACTED};

/// Ids, times, kind, flags, status code and the message framing of a span.
const SPAN_OVERHEAD: usize = 96;

/// The framing of an attribute, and a number or boolean value.
const ATTRIBUTE_OVERHEAD: usize = 16;

/// The framing and time of an event.
const EVENT_OVERHEAD: usize = 24;

/// What `span` weighs in an export request, from above.
pub(crate) fn of_span_data(span: &SpanData) -> usize {
    let status = match &span.status {
        opentelemetry::trace::Status::Error { description } => description.len(),
        _ => 0,
    };
    SPAN_OVERHEAD
        + span.name.len()
        + status
        + span.instrumentation_scope.name().len()
        + of_attributes(&span.attributes)
        + of_events(&span.events.events)
        + of_links(&span.links.links)
        + of_trace_state(span.span_context.trace_state())
}

/// What a `tracestate` weighs: a caller's, up to 32 members of 512 bytes each, that every
/// span of the trace below it carries.
pub(crate) fn of_trace_state(trace_state: &TraceState) -> usize {
    if *trace_state == TraceState::NONE {
        return 0;
    }
    trace_state.header().len()
}

/// What `attributes` weigh.
pub(crate) fn of_attributes(attributes: &[KeyValue]) -> usize {
    attributes
        .iter()
        .map(|kv| ATTRIBUTE_OVERHEAD + kv.key.as_str().len() + of_value(&kv.value))
        .sum()
}

/// What `links` weigh.
pub(crate) fn of_links(links: &[Link]) -> usize {
    links
        .iter()
        .map(|link| SPAN_OVERHEAD + of_attributes(&link.attributes) + of_trace_state(link.span_context.trace_state()))
        .sum()
}

/// What `events` weigh.
pub(crate) fn of_events(events: &[Event]) -> usize {
    events
        .iter()
        .map(|event| EVENT_OVERHEAD + event.name.len() + of_attributes(&event.attributes))
        .sum()
}

fn of_value(value: &Value) -> usize {
    match value {
        Value::String(text) => text.as_str().len(),
        Value::Array(Array::String(texts)) => texts.iter().map(|t| ATTRIBUTE_OVERHEAD + t.as_str().len()).sum(),
        Value::Array(Array::Bool(values)) => values.len() * 2,
        Value::Array(Array::I64(values)) => values.len() * 10,
        Value::Array(Array::F64(values)) => values.len() * 9,
        _ => 0,
    }
}

/// Scrubs `span` as agent spans are scrubbed and cuts it as they are cut: attributes whose
/// names look sensitive become [`REDACTED`], and every string attribute value, event attribute
/// value and event name is scrubbed and cut at `chars` characters, `…` marking the cut.
pub(crate) fn scrub_and_cut(span: &mut SpanData, scrubber: &Scrubber, chars: usize) {
    scrub_attributes(&mut span.attributes, scrubber, chars);
    for event in &mut span.events.events {
        if let Cow::Owned(name) = scrubber.scrub_and_cut(&event.name, chars) {
            event.name = name.into();
        }
        scrub_attributes(&mut event.attributes, scrubber, chars);
    }
    for link in &mut span.links.links {
        scrub_attributes(&mut link.attributes, scrubber, chars);
    }
    if let opentelemetry::trace::Status::Error { description } = &mut span.status {
        if let Cow::Owned(kept) = scrubber.scrub_and_cut(description, chars) {
            *description = kept.into();
        }
    }
}

fn scrub_attributes(attributes: &mut [KeyValue], scrubber: &Scrubber, chars: usize) {
    for attribute in attributes {
        if scrubber.redacts_field(attribute.key.as_str()) {
            attribute.value = Value::from(REDACTED);
            continue;
        }
        match &mut attribute.value {
            Value::String(text) => {
                if let Some(kept) = scrubbed(text, scrubber, chars) {
                    *text = kept;
                }
            }
            Value::Array(Array::String(texts)) => {
                for text in texts {
                    if let Some(kept) = scrubbed(text, scrubber, chars) {
                        *text = kept;
                    }
                }
            }
            _ => {}
        }
    }
}

/// `text` scrubbed and cut, if that changed it.
fn scrubbed(text: &StringValue, scrubber: &Scrubber, chars: usize) -> Option<StringValue> {
    match scrubber.scrub_and_cut(text.as_str(), chars) {
        Cow::Borrowed(_) => None,
        Cow::Owned(kept) => Some(kept.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::test_support::span_data as span;

    #[test]
    fn long_values_are_cut_and_the_rest_left_alone() {
        let long = "x".repeat(100);
        let mut span = span(
            vec![
                KeyValue::new("long", long.clone()),
                KeyValue::new("short", "ok"),
                KeyValue::new("count", 7_i64),
                KeyValue::new(
                    "list",
                    Value::Array(Array::String(vec![long.clone().into(), "a".into()])),
                ),
            ],
            vec![Event::new(
                long.clone(),
                SystemTime::now(),
                vec![KeyValue::new("field", long.clone())],
                0,
            )],
        );
        scrub_and_cut(&mut span, &Scrubber::off(), 10);
        let cut10 = format!("{}…", "x".repeat(10));
        assert_eq!(span.attributes[0].value.as_str(), cut10);
        assert_eq!(span.attributes[1].value.as_str(), "ok");
        assert_eq!(span.attributes[2].value, Value::I64(7));
        let Value::Array(Array::String(list)) = &span.attributes[3].value else {
            panic!("still a list")
        };
        assert_eq!((list[0].as_str(), list[1].as_str()), (cut10.as_str(), "a"));
        assert_eq!(span.events.events[0].name, cut10);
        assert_eq!(span.events.events[0].attributes[0].value.as_str(), cut10);
    }

    #[test]
    fn the_weight_grows_with_every_string_a_span_carries() {
        let empty = of_span_data(&span(vec![], vec![]));
        let with_text = of_span_data(&span(vec![KeyValue::new("k", "x".repeat(1000))], vec![]));
        assert!(with_text >= empty + 1001, "{empty} {with_text}");
        let with_event = of_span_data(&span(
            vec![],
            vec![Event::new(
                "e",
                SystemTime::now(),
                vec![KeyValue::new("k", "x".repeat(500))],
                0,
            )],
        ));
        assert!(with_event >= empty + 502, "{empty} {with_event}");
    }
}
