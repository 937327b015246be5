//! W3C Trace Context: joining an incoming trace and passing ours on.

mod support;

use std::collections::HashMap;

use agent_telemetry::propagation::{continue_trace, trace_headers};
use agent_telemetry::Error;
use support::{json_pairs, Harness};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn incoming() -> HashMap<String, String> {
    HashMap::from([("traceparent".to_owned(), format!("00-{TRACE_ID}-{PARENT_ID}-01"))])
}

#[test]
fn an_execution_joins_the_callers_trace_in_spans_and_logs() {
    let harness = Harness::new();
    let outgoing = harness.run(|| {
        let span = tracing::info_span!(
            "agent_execution",
            agent_name = "backend-engineer",
            task = "Implement API"
        );
        assert!(continue_trace(&span, &incoming()).unwrap());
        span.in_scope(|| trace_headers(&tracing::Span::current()))
    });
    let spans = harness.spans();
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(span.parent_span_id.to_string(), PARENT_ID);
    assert!(span.parent_span_is_remote);

    let line = json_pairs(&harness.log_lines()[0]);
    let trace_id = line.iter().find(|(k, _)| k == "trace.id").unwrap();
    assert_eq!(trace_id.1, TRACE_ID, "the log line carries the joined trace");

    // Calling out: the next service continues from this execution's span.
    let expected = format!("00-{TRACE_ID}-{}-01", span.span_context.span_id());
    assert_eq!(outgoing.get("traceparent"), Some(&expected));
}

#[test]
fn without_a_traceparent_a_new_trace_starts() {
    let harness = Harness::new();
    harness.run(|| {
        let span = tracing::info_span!("agent_execution", agent_name = "a");
        let garbage = HashMap::from([("traceparent".to_owned(), "not-a-trace".to_owned())]);
        assert!(!continue_trace(&span, &garbage).unwrap());
        assert!(!continue_trace(&span, &HashMap::new()).unwrap());
        span.in_scope(|| {});
    });
    let spans = harness.spans();
    assert_ne!(spans[0].span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(spans[0].parent_span_id, opentelemetry::trace::SpanId::INVALID);
}

#[test]
fn joining_after_the_span_started_is_an_error() {
    let harness = Harness::new();
    harness.run(|| {
        let span = tracing::info_span!("agent_execution", agent_name = "a");
        span.in_scope(|| {
            let error = continue_trace(&tracing::Span::current(), &incoming()).unwrap_err();
            assert!(matches!(error, Error::Propagation { .. }), "{error:?}");
            assert!(error.to_string().contains("incoming trace"), "{error}");
        });
    });
}

#[test]
fn only_a_traceparent_written_as_w3c_writes_it_is_joined() {
    let harness = Harness::new();
    let traceparent = |value: &str| HashMap::from([("traceparent".to_owned(), value.to_owned())]);
    let not_w3c = [
        "00-1-1-01",
        "0-1-1-1",
        "00-+4bf92f3577b34da6a3ce929d0e0e473-+0f067aa0ba902b7-01",
        "00-00000000000000004bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-001",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0١",
    ];
    // A later version is read by version 00's first four fields, as W3C asks.
    let later_version = format!("cc-{TRACE_ID}-{PARENT_ID}-01-what-comes-next");
    let joined: Vec<bool> = harness.run(|| {
        not_w3c
            .iter()
            .chain([&later_version.as_str()])
            .map(|value| {
                let span = tracing::info_span!("agent_execution", agent_name = "a", task = *value);
                let joined = continue_trace(&span, &traceparent(value)).unwrap();
                span.in_scope(|| {});
                joined
            })
            .collect()
    });
    assert_eq!(joined[..not_w3c.len()], [false; 11], "{not_w3c:?}");
    assert!(joined[not_w3c.len()], "{later_version}");
    let spans = harness.spans();
    let remote: Vec<String> = spans
        .iter()
        .filter(|span| span.parent_span_is_remote)
        .map(|span| format!("{}-{}", span.span_context.trace_id(), span.parent_span_id))
        .collect();
    assert_eq!(
        remote,
        [format!("{TRACE_ID}-{PARENT_ID}")],
        "only the later version joined"
    );
}

#[test]
fn joining_after_the_spans_context_was_handed_on_is_an_error() {
    let harness = Harness::new();
    let refused = |error: Error| {
        assert!(matches!(error, Error::Propagation { .. }), "{error:?}");
        assert!(error.to_string().contains("handed on"), "{error}");
    };
    let sent = harness.run(|| {
        // To a nested agent prepared before the lead starts.
        let lead = tracing::info_span!("agent_execution", agent_name = "lead", task = "t");
        let helper = tracing::info_span!(parent: &lead, "agent_execution", agent_name = "helper", task = "t");
        refused(continue_trace(&lead, &incoming()).unwrap_err());
        lead.in_scope(|| helper.in_scope(|| {}));

        // To an agent that follows from it.
        let followed = tracing::info_span!("agent_execution", agent_name = "followed", task = "t");
        let follower = tracing::info_span!("agent_execution", agent_name = "follower", task = "t");
        follower.follows_from(&followed);
        refused(continue_trace(&followed, &incoming()).unwrap_err());
        followed.in_scope(|| {});
        follower.in_scope(|| {});

        // To another process.
        let caller = tracing::info_span!("agent_execution", agent_name = "caller", task = "t");
        let sent = trace_headers(&caller);
        refused(continue_trace(&caller, &incoming()).unwrap_err());
        caller.in_scope(|| {});
        sent
    });
    let spans = harness.spans();
    let agent = |name: &str| support::agent_span(&spans, name);
    // Each kept the trace it had handed on, and none joined the caller's.
    let (lead, helper) = (agent("lead"), agent("helper"));
    assert_eq!(helper.parent_span_id, lead.span_context.span_id());
    assert_eq!(helper.span_context.trace_id(), lead.span_context.trace_id());
    let (followed, follower) = (agent("followed"), agent("follower"));
    assert_eq!(follower.links.links[0].span_context, followed.span_context);
    let caller = agent("caller");
    let exported = format!(
        "00-{}-{}-01",
        caller.span_context.trace_id(),
        caller.span_context.span_id()
    );
    assert_eq!(sent["traceparent"], exported);
    assert!(spans
        .iter()
        .all(|span| span.span_context.trace_id().to_string() != TRACE_ID));
}
