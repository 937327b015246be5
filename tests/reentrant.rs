//! The application's code run inside the layer: field values whose `Debug` emits events or
//! records on spans, as a value that logs while it formats itself does, or panics; a value in
//! an OpenTelemetry context that records as the context drops. The layer runs none of it while
//! it holds a span's lock, so nothing hangs or aborts, and what it says about the execution is
//! kept. A test binary of its own, since it installs the global default subscriber: a scoped
//! one would drop the nested calls itself.

mod support;

use std::collections::HashMap;
use std::fmt;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use support::{agent_line, Harness};
use tracing::field::debug;

/// A value that, formatted, emits an event in the current span and records on it and opens
/// a span in it (`Event`), emits an `ERROR` (`Error`), or panics (`Panic`).
#[derive(Clone, Copy)]
enum Noisy {
    Event,
    Error,
    Panic,
}

impl fmt::Debug for Noisy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Noisy::Event => {
                tracing::info!(detail = "inner", "formatting");
                tracing::Span::current().record("status", "partial");
                tracing::info_span!(target: "tools", "formatting_span").in_scope(|| {});
            }
            Noisy::Error => tracing::error!("formatting failed"),
            Noisy::Panic => {
                f.write_str("half")?;
                panic!("formatting panicked")
            }
        }
        f.write_str("noisy")
    }
}

/// An application's value carried in the OpenTelemetry context: dropped, it records a
/// status on the span it holds.
struct RecordsOnDrop(Arc<Mutex<Option<tracing::Span>>>);

impl Drop for RecordsOnDrop {
    fn drop(&mut self) {
        if let Some(span) = self.0.lock().unwrap().take() {
            span.record("status", "partial");
        }
    }
}

/// Runs `f` on a thread of its own, failing the test if it has not returned within 20 s.
fn within_time(what: &str, f: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    match finished.recv_timeout(Duration::from_secs(20)) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: hung (a span's lock held while the application's code ran)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

fn agent(name: &'static str) -> tracing::Span {
    tracing::info_span!(
        "agent_execution",
        agent_name = name,
        task = "format",
        status = tracing::field::Empty
    )
}

#[test]
fn values_that_log_while_formatting_neither_hang_nor_lose_the_execution() {
    let mut harness = Harness::with(|b| b.with_env_filter("info"));
    tracing::dispatcher::set_global_default(harness.dispatch.clone()).expect("the only subscriber in this binary");

    within_time("an event's field", || {
        agent("event-field").in_scope(|| tracing::info!(value = ?Noisy::Event, "an event"));
    });
    within_time("an ERROR event's message", || {
        agent("error-message").in_scope(|| tracing::error!("outer failed: {:?}", Noisy::Error));
    });
    within_time("an ERROR event's field", || {
        agent("error-field").in_scope(|| tracing::error!(value = ?Noisy::Error, "it failed"));
    });
    within_time("a recorded field", || {
        let span = agent("recorded-field");
        span.in_scope(|| span.record("task", debug(Noisy::Event)));
    });
    within_time("a recorded field that logs an ERROR", || {
        let span = agent("recorded-error");
        span.in_scope(|| span.record("task", debug(Noisy::Error)));
    });
    within_time("a model call's recorded field", || {
        agent("model-call").in_scope(|| {
            let call = tracing::info_span!("chat", gen_ai.request.model = tracing::field::Empty);
            call.in_scope(|| call.record("gen_ai.request.model", debug(Noisy::Event)));
        });
    });
    // A value that panics as the layer formats it poisons no span's lock (the span would panic
    // again as it closed, while unwinding, and abort): it keeps what it wrote, and its panic
    // goes no further than the layer. `tests/status.rs` has one that panics as a span opens.
    within_time("a value that panics", || {
        agent("panicking-value").in_scope(|| tracing::info!(value = ?Noisy::Panic, "an event"));
        agent("panicking-record").in_scope(|| {
            tracing::Span::current().record("task", debug(Noisy::Panic));
        });
    });
    // The application's value in the context an agent span opened under, dropped when
    // `continue_trace` replaces that context with the caller's, may record on the span.
    within_time("a context value dropped as the trace is continued", || {
        let holder = Arc::new(Mutex::new(None));
        let attached = opentelemetry::Context::current_with_value(RecordsOnDrop(Arc::clone(&holder))).attach();
        let span = agent("continued");
        // The span's parent context holds the value's last reference now.
        drop(attached);
        *holder.lock().unwrap() = Some(span.clone());
        let headers = HashMap::from([(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        )]);
        assert!(agent_telemetry::propagation::continue_trace(&span, &headers).expect("continued"));
        span.in_scope(|| {});
    });

    let (spans, log) = harness.shutdown();
    let lines: Vec<&str> = log.lines().collect();
    let line_of = |name: &str| agent_line(&lines, name);
    // A status recorded while a value formatted is kept. An `ERROR`'s own text is the
    // execution's error, over one its message or fields raised as they formatted; an `ERROR`
    // raised by a value recorded on the span is the span's error.
    let partial = |line: &str| line.contains("\"status\":\"failure\"") && line.contains("\"error.type\":\"partial\"");
    let failed = "\"error.message\":\"formatting failed\"";
    assert!(partial(line_of("event-field")), "{log}");
    assert!(
        line_of("error-message").contains("\"error.message\":\"outer failed: noisy\""),
        "{log}"
    );
    assert!(
        line_of("error-field").contains("\"error.message\":\"it failed\""),
        "{log}"
    );
    assert!(line_of("recorded-field").contains("\"task\":\"noisy\""), "{log}");
    assert!(partial(line_of("recorded-field")), "{log}");
    assert!(line_of("recorded-error").contains("\"task\":\"noisy\""), "{log}");
    assert!(line_of("recorded-error").contains(failed), "{log}");
    assert!(line_of("model-call").contains("\"model\":\"noisy\""), "{log}");
    assert!(line_of("panicking-value").contains("\"status\":\"success\""), "{log}");
    let continued = line_of("continued");
    assert!(
        partial(continued) && continued.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
        "{log}"
    );
    let recorded = line_of("panicking-record");
    assert!(
        recorded.contains("\"task\":\"half\"") && recorded.contains("\"status\":\"success\""),
        "{log}"
    );

    let agent_span = |name: &str| support::agent_span(&spans, name);
    let events = |name: &str| -> Vec<String> {
        agent_span(name)
            .events
            .iter()
            .map(|event| event.name.to_string())
            .collect()
    };
    // Each event once, the value's own first: it is emitted while the outer event is made.
    // (The harness's printer may format the value once more after: `tracing-subscriber`'s
    // per-layer filters lose an event's state to an event emitted inside it.)
    let outer_after_inner = |events: Vec<String>, inner: &str, outer: &str| {
        let at = |wanted: &str| events.iter().position(|name| name == wanted);
        assert_eq!(events.iter().filter(|name| *name == outer).count(), 1, "{events:?}");
        assert!(at(inner).is_some() && at(inner) < at(outer), "{events:?}");
    };
    outer_after_inner(events("event-field"), "formatting", "an event");
    outer_after_inner(events("error-field"), "formatting failed", "it failed");
    let panicked = &agent_span("panicking-value").events;
    assert!(
        panicked.iter().any(|event| event.name == "an event"
            && event
                .attributes
                .iter()
                .any(|kv| kv.key.as_str() == "value" && kv.value.as_str() == "half")),
        "{panicked:?}"
    );
    let call = spans
        .iter()
        .find(|span| span.name == "chat")
        .expect("the model call's span");
    assert!(
        call.attributes
            .iter()
            .any(|kv| kv.key.as_str() == "gen_ai.request.model" && kv.value.as_str() == "noisy"),
        "{:?}",
        call.attributes
    );
}
