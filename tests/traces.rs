//! Spans on an in-memory exporter: name, attributes, status, parent/child.

mod support;

use opentelemetry::trace::Status;
use opentelemetry::Value;
use opentelemetry_sdk::trace::SpanData;
use support::Harness;
use tracing_subscriber::layer::SubscriberExt;

#[tracing::instrument(name = "agent_execution", err)]
fn execute_agent(agent_name: &str, task: &str, fail: bool) -> Result<(), String> {
    if fail {
        Err("the API is down".into())
    } else {
        Ok(())
    }
}

#[tracing::instrument(name = "agent_execution")]
fn delegate(agent_name: &str, task: &str) {
    execute_agent("backend-engineer", "Implement API", false).unwrap();
    execute_agent("qa-engineer", "Test API", false).unwrap();
}

fn attr(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn string(span: &SpanData, key: &str) -> Option<String> {
    attr(span, key).map(|v| v.as_str().into_owned())
}

/// The span named `name`.
fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|span| span.name == name)
        .unwrap_or_else(|| panic!("no span named {name}"))
}

/// Asserts that `child` is `parent`'s child, in its trace.
fn assert_child_of(child: &SpanData, parent: &SpanData) {
    let (name, parent_name) = (&child.name, &parent.name);
    assert_eq!(
        child.parent_span_id,
        parent.span_context.span_id(),
        "{name} under {parent_name}"
    );
    assert_eq!(
        child.span_context.trace_id(),
        parent.span_context.trace_id(),
        "{name}'s trace"
    );
}

/// The names of `span`'s events, in order.
fn event_names(span: &SpanData) -> Vec<&str> {
    span.events.iter().map(|event| event.name.as_ref()).collect()
}

#[test]
fn agent_span_carries_the_guides_genai_and_openinference_attributes() {
    let harness = Harness::new();
    harness.run(|| execute_agent("backend-engineer", "Implement API", false).unwrap());
    let spans = harness.spans();
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.name, "agent_execution");
    for (key, value) in [
        ("agent.name", "backend-engineer"),
        ("task", "Implement API"),
        ("result.status", "success"),
        ("gen_ai.operation.name", "invoke_agent"),
        ("gen_ai.agent.name", "backend-engineer"),
        ("openinference.span.kind", "AGENT"),
    ] {
        assert_eq!(string(span, key).as_deref(), Some(value), "{key}");
    }
    assert_eq!(span.status, Status::Unset);
    assert_eq!(string(span, "error.type"), None);
    let keys: Vec<&str> = span.attributes.iter().map(|kv| kv.key.as_str()).collect();
    let mut unique = keys.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(keys.len(), unique.len(), "no attribute twice: {keys:?}");
}

#[test]
fn failure_sets_error_status_and_error_type() {
    let harness = Harness::new();
    harness.run(|| execute_agent("backend-engineer", "Deploy", true).unwrap_err());
    let spans = harness.spans();
    let span = &spans[0];
    assert_eq!(span.status, Status::error("the API is down"));
    assert_eq!(string(span, "error.type").as_deref(), Some("error"));
    assert_eq!(string(span, "result.status").as_deref(), Some("failure"));
}

#[test]
fn nested_agents_keep_parent_and_child() {
    let harness = Harness::new();
    harness.run(|| delegate("tech-lead", "Ship feature"));
    let spans = harness.spans();
    assert_eq!(spans.len(), 3);
    let parent = spans
        .iter()
        .find(|s| string(s, "agent.name").as_deref() == Some("tech-lead"))
        .unwrap();
    for child_name in ["backend-engineer", "qa-engineer"] {
        let child = spans
            .iter()
            .find(|s| string(s, "agent.name").as_deref() == Some(child_name))
            .unwrap();
        assert_child_of(child, parent);
    }
}

#[test]
fn shutdown_exports_every_queued_span() {
    let mut harness = Harness::new();
    harness.run(|| (0..100).for_each(|_| execute_agent("a", "t", false).unwrap()));
    let (spans, _) = harness.shutdown();
    assert_eq!(spans.len(), 100, "shutdown exports the queued spans");
    assert_eq!(spans[0].instrumentation_scope.name(), "agent_telemetry");
}

#[test]
fn queue_and_batch_sizes_as_large_as_usize_are_taken_at_their_word() {
    // Nothing is allocated for them up front: the span queue's and export batch's used to
    // panic (capacity overflow).
    let mut harness = Harness::with(|b| {
        b.with_span_queue_size(usize::MAX)
            .with_span_export_batch_size(usize::MAX)
            .with_log_queue_lines(usize::MAX)
    });
    harness.run(|| (0..100).for_each(|_| execute_agent("a", "t", false).unwrap()));
    let (spans, log) = harness.shutdown();
    assert_eq!(spans.len(), 100, "shutdown exports the queued spans");
    assert_eq!(log.lines().count(), 100, "and writes the lines");
}

#[test]
fn other_spans_follow_the_env_filter_and_never_the_export_path() {
    let harness = Harness::with(|b| b.with_env_filter("warn"));
    harness.run(|| {
        tracing::info_span!("not_traced_at_warn").in_scope(|| {});
        tracing::warn_span!("traced_at_warn").in_scope(|| {});
        tracing::warn_span!(target: "opentelemetry_sdk", "export_path").in_scope(|| {});
        tracing::warn_span!(target: "reqwest::connect", "export_path").in_scope(|| {});
    });
    let names: Vec<String> = harness.spans().iter().map(|s| s.name.to_string()).collect();
    assert_eq!(names, ["traced_at_warn"]);
}

#[test]
fn env_filter_directives_may_have_spaces_around_them() {
    // `tracing-subscriber` alone rejects the first and panics on the second.
    for directives in [" warn, traces=debug ", "warn, é=debug,traces=debug"] {
        let harness = Harness::with(|b| b.with_env_filter(directives));
        harness.run(|| {
            tracing::debug_span!("traced_at_debug").in_scope(|| {});
            tracing::debug_span!(target: "elsewhere", "not_traced").in_scope(|| {});
        });
        let names: Vec<String> = harness.spans().iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["traced_at_debug"], "{directives}");
    }
}

#[test]
fn a_bad_env_filter_is_an_error_naming_rust_log() {
    let built = agent_telemetry::AgentTelemetry::builder()
        .ignore_environment()
        .without_metrics_server()
        .with_log_writer(std::io::sink())
        .with_env_filter("info, app=loud")
        .build::<tracing_subscriber::Registry>();
    let Err(error) = built else {
        panic!("`loud` is no level");
    };
    let message = error.to_string();
    assert!(
        message.contains("RUST_LOG") && message.contains("app=loud"),
        "{message}"
    );
}

#[test]
fn agent_spans_are_traced_whatever_the_env_filter_says() {
    let harness = Harness::with(|b| b.with_env_filter("off"));
    harness.run(|| execute_agent("a", "t", false).unwrap());
    assert_eq!(harness.spans().len(), 1);
}

#[test]
fn spans_traced_inside_an_agent_are_its_children_and_it_is_theirs() {
    let harness = Harness::new();
    harness.run(|| {
        tracing::info_span!("handle_request").in_scope(|| {
            tracing::info_span!("agent_execution", agent_name = "tech-lead", task = "Plan").in_scope(|| {
                tracing::info_span!("tool_call", tool = "search").in_scope(|| {});
            });
        });
    });
    let spans = harness.spans();
    let (request, agent, tool) = (
        named(&spans, "handle_request"),
        named(&spans, "agent_execution"),
        named(&spans, "tool_call"),
    );
    assert_child_of(agent, request);
    assert_child_of(tool, agent);
}

#[test]
fn events_inside_an_agent_are_its_span_events_and_other_fields_its_attributes() {
    let harness = Harness::new();
    harness.run(|| {
        tracing::info_span!("handle_request").in_scope(|| {
            let agent = tracing::info_span!(
                "agent_execution",
                agent_name = "qa-engineer",
                task = "Test",
                attempt = 2_i64,
                otel.kind = "client"
            );
            agent.in_scope(|| tracing::info!(tests = 12_i64, "ran the suite"));
            tracing::info!("back in the request");
        });
    });
    let spans = harness.spans();
    let agent = named(&spans, "agent_execution");
    let request = named(&spans, "handle_request");
    let names = event_names(agent);
    assert_eq!(names, ["ran the suite"], "the event is on the agent span, once");
    let event = &agent.events[0];
    assert!(event
        .attributes
        .iter()
        .any(|kv| kv.key.as_str() == "tests" && kv.value == Value::I64(12)));
    let request_events = event_names(request);
    assert_eq!(
        request_events,
        ["back in the request"],
        "not duplicated on the outer span"
    );
    assert_eq!(attr(agent, "attempt"), Some(Value::I64(2)));
    assert_eq!(agent.span_kind, opentelemetry::trace::SpanKind::Client);
    assert_eq!(
        attr(agent, "agent_name"),
        None,
        "the execution's own fields are not repeated"
    );
}

#[test]
fn directives_that_name_the_agent_span_select_its_span_events() {
    let harness = Harness::with(|b| b.with_env_filter("warn,[agent_execution]=debug"));
    harness.run(|| {
        let agent = tracing::info_span!("agent_execution", agent_name = "qa-engineer", task = "Test");
        agent.in_scope(|| tracing::debug!("inside the agent"));
        tracing::debug!("outside any agent");
    });
    let spans = harness.spans();
    let agent = named(&spans, "agent_execution");
    let names = event_names(agent);
    assert_eq!(names, ["inside the agent"], "debug inside the agent span only");
}

#[test]
fn directives_that_name_a_traced_span_select_its_span_events() {
    let harness = Harness::with(|b| b.with_env_filter("warn,[tool_call]=debug"));
    harness.run(|| {
        tracing::info_span!("agent_execution", agent_name = "qa-engineer", task = "Test").in_scope(|| {
            tracing::warn_span!("tool_call", tool = "search").in_scope(|| tracing::debug!("inside the tool"));
            tracing::debug!("inside the agent");
        });
    });
    let spans = harness.spans();
    assert_eq!(event_names(named(&spans, "tool_call")), ["inside the tool"]);
    assert!(
        event_names(named(&spans, "agent_execution")).is_empty(),
        "debug is selected inside the tool call only"
    );
}

#[test]
fn traced_spans_inside_an_agent_take_recorded_fields_and_links() {
    let harness = Harness::new();
    harness.run(|| {
        let request = tracing::info_span!("handle_request");
        tracing::info_span!("agent_execution", agent_name = "tech-lead", task = "Plan").in_scope(|| {
            let tool = tracing::info_span!("tool_call", tool = "search", hits = tracing::field::Empty);
            tool.follows_from(&request);
            tool.in_scope(|| {});
            tool.record("hits", 3_i64);
        });
    });
    let spans = harness.spans();
    let (request, agent, tool) = (
        named(&spans, "handle_request"),
        named(&spans, "agent_execution"),
        named(&spans, "tool_call"),
    );
    assert_eq!(tool.parent_span_id, agent.span_context.span_id());
    assert_eq!(attr(tool, "hits"), Some(Value::I64(3)), "recorded after it was entered");
    let links: Vec<_> = tool.links.iter().map(|link| link.span_context.span_id()).collect();
    assert_eq!(links, [request.span_context.span_id()]);
}

#[test]
fn an_event_in_a_span_only_another_layer_selects_inside_an_agent_is_the_agents() {
    // `noisy` spans are off here, but the harness's own WARN layer makes them: they are
    // between the agent and the event, and traced nowhere.
    let harness = Harness::with(|b| b.with_env_filter("info,noisy=off"));
    harness.run(|| {
        tracing::info_span!("handle_request").in_scope(|| {
            tracing::info_span!("agent_execution", agent_name = "a", task = "t").in_scope(|| {
                tracing::warn_span!(target: "noisy", "parse").in_scope(|| tracing::info!("parsed"));
            });
        });
    });
    let spans = harness.spans();
    assert_eq!(event_names(named(&spans, "agent_execution")), ["parsed"]);
    assert!(event_names(named(&spans, "handle_request")).is_empty());
    assert!(spans.iter().all(|s| s.name != "parse"));
}

#[test]
fn a_span_directive_selects_the_spans_it_names_at_its_level_only() {
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let dir = tempfile::tempdir().unwrap();
    let (layer, telemetry) = agent_telemetry::AgentTelemetry::builder()
        .ignore_environment()
        .without_metrics_server()
        .with_log_dir(dir.path())
        .with_env_filter("info,[tool_call]=debug")
        .with_span_exporter(support::KeepOnShutdown(exporter.clone()))
        .build()
        .unwrap();
    // This crate's layer alone: no other layer's interest hides what its filter answers.
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
    tracing::dispatcher::with_default(&dispatch, || {
        tracing::trace_span!("tool_call", step = 1).in_scope(|| {});
        tracing::debug_span!("tool_call", step = 2).in_scope(|| {});
    });
    telemetry.flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let steps: Vec<Option<Value>> = spans.iter().map(|span| attr(span, "step")).collect();
    assert_eq!(steps, [Some(Value::I64(2))], "the debug span, not the trace one");
}

#[test]
fn the_sampler_applies_to_agent_spans_and_logs_keep_their_ids() {
    let harness = Harness::with(|b| b.with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOff));
    harness.run(|| {
        execute_agent("backend-engineer", "Implement API", false).unwrap();
        tracing::info_span!("handle_request").in_scope(|| {});
    });
    assert!(harness.spans().is_empty(), "nothing sampled, nothing exported");
    let lines = harness.log_lines();
    assert_eq!(lines.len(), 1);
    let line = support::json_pairs(&lines[0]);
    let trace_id = &line
        .iter()
        .find(|(k, _)| k == "trace.id")
        .expect("ids still correlate")
        .1;
    assert_eq!(trace_id.as_str().map(str::len), Some(32));
}

/// Fails as a formatting impl may, by returning `Err`.
struct FailsToFormat;

impl std::fmt::Debug for FailsToFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("half")?;
        Err(std::fmt::Error)
    }
}

impl std::fmt::Display for FailsToFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for FailsToFormat {}

#[test]
fn fields_whose_formatting_fails_keep_what_they_wrote_and_panic_nothing() {
    let mut harness = Harness::new();
    harness.run(|| {
        let span = tracing::info_span!("agent_execution", agent_name = ?FailsToFormat, task = %FailsToFormat, odd = ?FailsToFormat);
        let _entered = span.enter();
        tracing::info!(detail = ?FailsToFormat, "step");
        tracing::error!(error = %FailsToFormat, "failed");
        tracing::error!(error = &FailsToFormat as &dyn std::error::Error, "failed again");
    });
    let (spans, log) = harness.shutdown();
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(string(span, "agent.name").as_deref(), Some("half"));
    assert_eq!(string(span, "task").as_deref(), Some("half"));
    assert_eq!(string(span, "odd").as_deref(), Some("half"));
    assert_eq!(span.status, Status::error("half"));
    assert_eq!(span.events.events.len(), 3);
    for event in &span.events.events {
        let texts = event.attributes.iter().filter(|kv| kv.value.as_str() == "half").count();
        assert_eq!(texts, 1, "{event:?}");
    }
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(log.contains(r#""agent_name":"half""#), "{log}");
}

#[test]
fn spans_whose_explicit_parent_is_an_agent_or_model_call_are_its_children() {
    let harness = Harness::new();
    harness.run(|| {
        let agent = tracing::info_span!("agent_execution", agent_name = "tech-lead", task = "Plan");
        let chat = tracing::info_span!(parent: &agent, "chat", gen_ai.request.model = "gpt-4o");
        // Made on another thread, where neither was ever entered: the parent is explicit.
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let (tool, stream) = std::thread::scope(|scope| {
            let made = || {
                let tool = tracing::info_span!(parent: &agent, "tool_call", tool = "search");
                let stream = tracing::info_span!(parent: &chat, "read_stream");
                (tool, stream)
            };
            let made = scope.spawn(move || tracing::dispatcher::with_default(&dispatch, made));
            made.join().unwrap()
        });
        tool.in_scope(|| {});
        drop((tool, stream, chat, agent));
    });
    let spans = harness.spans();
    let (agent, chat) = (named(&spans, "agent_execution"), named(&spans, "chat"));
    let (tool, stream) = (named(&spans, "tool_call"), named(&spans, "read_stream"));
    assert_child_of(chat, agent);
    assert_child_of(tool, agent);
    assert_child_of(stream, chat);
}

#[test]
fn agent_spans_link_the_spans_they_follow_from() {
    let harness = Harness::new();
    harness.run(|| {
        let request = tracing::info_span!("handle_request");
        let planner = tracing::info_span!("agent_execution", agent_name = "planner", task = "Plan");
        let coder = tracing::info_span!("agent_execution", agent_name = "coder", task = "Code");
        coder.follows_from(&request);
        coder.follows_from(&planner);
        coder.in_scope(|| {});
        // Past the SDK's default of 128 links, links are counted as dropped.
        let busy = tracing::info_span!("agent_execution", agent_name = "busy", task = "Merge");
        for _ in 0..130 {
            busy.follows_from(&request);
        }
    });
    let spans = harness.spans();
    let request = named(&spans, "handle_request");
    let agent = |name: &str| {
        spans
            .iter()
            .find(|span| string(span, "agent.name").as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no agent {name}"))
    };
    let (planner, coder, busy) = (agent("planner"), agent("coder"), agent("busy"));
    let links: Vec<_> = coder.links.iter().map(|link| link.span_context.span_id()).collect();
    assert_eq!(
        links,
        [request.span_context.span_id(), planner.span_context.span_id()],
        "a traced span and an agent"
    );
    assert_eq!(coder.links.dropped_count, 0);
    assert_eq!((busy.links.len(), busy.links.dropped_count), (128, 2));
}

#[test]
fn a_field_filter_selects_a_string_field_by_its_text_exactly() {
    let directives = r#"warn,[{user=alice}]=debug,[{path=a.b}]=debug,[{team="core"}]=debug"#;
    let harness = Harness::with(|b| b.with_env_filter(directives));
    harness.run(|| {
        let requests = [
            ("alice", "x", "web"),
            ("bob", "a.b", "web"),
            ("bob", "y", "core"),
            // Neither `a.b` as a pattern, nor any text that ends or starts with the value.
            ("bob", "axb", "web"),
            ("malice", "x", "web"),
            ("alicex", "x", "web"),
        ];
        for (user, path, team) in requests {
            tracing::info_span!(target: "app", "request", user, path, team).in_scope(|| {
                tracing::debug!(target: "app", "looked up");
            });
        }
        // Recorded with `?`, the text is the value's `Debug`: the same filter selects it.
        tracing::info_span!(target: "app", "request", user = ?"alice", path = "z", team = "web")
            .in_scope(|| tracing::debug!(target: "app", "looked up"));
    });
    let spans = harness.spans();
    let selected: Vec<String> = spans
        .iter()
        .filter(|span| span.name == "request" && !span.events.events.is_empty())
        .map(|span| {
            let value = |key: &str| {
                let kv = span.attributes.iter().find(|kv| kv.key.as_str() == key).unwrap();
                kv.value.as_str().into_owned()
            };
            format!("{}/{}", value("user"), value("path"))
        })
        .collect();
    assert_eq!(selected, ["alice/x", "bob/a.b", "bob/y", r#""alice"/z"#]);
}

#[test]
fn a_field_filter_value_whose_debug_text_escapes_with_braces_still_selects_its_field() {
    // `Debug` writes a zero-width space as `\u{200b}`, and a `}` ends the directive's fields.
    let harness = Harness::with(|b| b.with_env_filter("warn,[{user=a\u{200b}b}]=debug"));
    harness.run(|| {
        for user in ["a\u{200b}b", "ab"] {
            tracing::info_span!(target: "app", "request", user)
                .in_scope(|| tracing::debug!(target: "app", "looked up"));
        }
        // Recorded with `?`: selected by its `Debug` text.
        let user = "a\u{200b}b";
        tracing::info_span!(target: "app", "request", user = ?user)
            .in_scope(|| tracing::debug!(target: "app", "looked up"));
    });
    let selected: Vec<String> = harness
        .spans()
        .iter()
        .filter(|span| span.name == "request" && !span.events.events.is_empty())
        .map(|span| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == "user")
                .unwrap()
                .value
                .as_str()
                .into_owned()
        })
        .collect();
    assert_eq!(selected, ["a\u{200b}b", "\"a\\u{200b}b\""]);
}
