//! Every way an execution ends, checked in all three signals at once.

mod support;

use std::fmt;
use std::time::Duration;

use opentelemetry::trace::Status as SpanStatus;
use support::{agent_line, json_pairs, Harness};

/// Asserts `agent` ended with `status` in the counter, its log line and its span.
fn assert_outcome(harness: &Harness, agent: &str, status: &str, error_type: Option<&str>) {
    let scrape = harness.scrape();
    let series = [("agent_name", agent), ("status", status)];
    assert_eq!(
        scrape.value("agent_executions_total", &series),
        Some(1.0),
        "{agent}: counter\n{}",
        scrape.text
    );
    let other = if status == "success" { "failure" } else { "success" };
    assert_eq!(
        scrape.value("agent_executions_total", &[("agent_name", agent), ("status", other)]),
        None
    );

    let lines = harness.log_lines();
    let line = lines
        .iter()
        .map(|l| json_pairs(l))
        .find(|pairs| pairs[4].1 == agent)
        .unwrap_or_else(|| panic!("{agent}: no log line in {lines:?}"));
    assert_eq!(line[7], ("status".to_owned(), status.into()), "{agent}: log line");
    let logged_error_type = line
        .iter()
        .find(|(k, _)| k == "error.type")
        .map(|(_, v)| v.as_str().unwrap().to_owned());
    assert_eq!(
        logged_error_type.as_deref(),
        error_type,
        "{agent}: error.type in the log"
    );

    let spans = harness.spans();
    let span = support::agent_span(&spans, agent);
    let attr = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
    };
    assert_eq!(
        attr("result.status").as_deref(),
        Some(status),
        "{agent}: span attribute"
    );
    assert_eq!(attr("error.type").as_deref(), error_type, "{agent}: span error.type");
    assert_eq!(
        matches!(span.status, SpanStatus::Error { .. }),
        status == "failure",
        "{agent}: {:?}",
        span.status
    );
}

#[tracing::instrument(name = "agent_execution", err)]
fn fallible(agent_name: &str, fail: bool) -> Result<(), String> {
    if fail {
        Err("no luck".into())
    } else {
        Ok(())
    }
}

#[test]
fn explicit_status_field_wins() {
    let harness = Harness::new();
    harness.run(|| {
        tracing::info_span!("agent_execution", agent_name = "timeout-agent", status = "timeout").in_scope(|| {});
        let span = tracing::info_span!(
            "agent_execution",
            agent_name = "recorded-later",
            status = tracing::field::Empty
        );
        span.in_scope(|| {
            tracing::Span::current().record("status", "failure");
        });
        drop(span);
        // `result.status` is accepted too, and an explicit success beats an ERROR event.
        tracing::info_span!("agent_execution", agent_name = "recovered", result.status = "success").in_scope(|| {
            tracing::error!("retried and recovered");
        });
        tracing::info_span!("agent_execution", agent.name = "dotted", status = ?"ok").in_scope(|| {});
        // A blank status says nothing: the execution's own outcome stands.
        tracing::info_span!("agent_execution", agent_name = "blank", status = " ").in_scope(|| {});
        tracing::info_span!("agent_execution", agent_name = "blank-failing", status = "").in_scope(|| {
            tracing::error!("failed");
        });
    });
    assert_outcome(&harness, "timeout-agent", "failure", Some("timeout"));
    assert_outcome(&harness, "recorded-later", "failure", Some("failure"));
    assert_outcome(&harness, "recovered", "success", None);
    assert_outcome(&harness, "dotted", "success", None);
    assert_outcome(&harness, "blank", "success", None);
    assert_outcome(&harness, "blank-failing", "failure", Some("error"));
}

#[test]
fn instrument_err_is_a_failure() {
    let harness = Harness::new();
    harness.run(|| {
        fallible("failing-agent", true).unwrap_err();
        fallible("fine-agent", false).unwrap();
    });
    assert_outcome(&harness, "failing-agent", "failure", Some("error"));
    assert_outcome(&harness, "fine-agent", "success", None);
}

#[tracing::instrument(name = "agent_execution")]
fn panicking(agent_name: &str) {
    panic!("agent bug");
}

#[test]
fn a_panic_is_a_failure() {
    let harness = Harness::new();
    harness.run(|| {
        let result = std::panic::catch_unwind(|| panicking("panicking-agent"));
        assert!(result.is_err());
    });
    assert_outcome(&harness, "panicking-agent", "failure", Some("panic"));
}

/// A value whose `Debug` panics after it wrote `half`.
struct PanicsHalfway;

impl fmt::Debug for PanicsHalfway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("half")?;
        panic!("formatting panicked")
    }
}

#[test]
fn a_field_value_that_panics_is_cut_there_and_fails_nothing_whether_traces_are_on_or_off() {
    for (harness, traced) in [(Harness::new(), true), (Harness::untraced(), false)] {
        harness.run(|| {
            tracing::info_span!("agent_execution", agent_name = "value-panics", task = ?PanicsHalfway).in_scope(|| {
                let model = PanicsHalfway;
                tracing::info_span!("chat", gen_ai.usage.input_tokens = 5u64, gen_ai.request.model = ?model)
                    .in_scope(|| tracing::info!(value = ?PanicsHalfway, "an event"));
            });
        });
        if traced {
            assert_outcome(&harness, "value-panics", "success", None);
        }
        let series = [("agent_name", "value-panics"), ("status", "success")];
        assert_eq!(harness.scrape().value("agent_executions_total", &series), Some(1.0));
        let lines = harness.log_lines();
        let line = agent_line(&lines, "value-panics");
        for kept in [r#""task":"half""#, r#""model":"half""#, r#""input_tokens":5"#] {
            assert!(line.contains(kept), "{kept} in {line}");
        }
    }
}

#[tracing::instrument(name = "agent_execution", err)]
async fn async_agent(agent_name: &str, wait_ms: u64, fail: bool) -> Result<(), String> {
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    if fail {
        Err("async failure".into())
    } else {
        Ok(())
    }
}

#[test]
fn async_agents_are_timed_by_the_wall_clock() {
    let harness = Harness::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    harness.run(|| {
        runtime.block_on(async {
            let (a, b) = tokio::join!(
                async_agent("async-ok", 300, false),
                async_agent("async-failing", 10, true)
            );
            a.unwrap();
            b.unwrap_err();
        });
    });
    assert_outcome(&harness, "async-ok", "success", None);
    assert_outcome(&harness, "async-failing", "failure", Some("error"));
    // 300 ms awaited, almost no busy time: the histogram sees the 300 ms.
    let scrape = harness.scrape();
    let sum = scrape
        .value("agent_execution_duration_seconds_sum", &[("agent_name", "async-ok")])
        .unwrap();
    assert!(sum >= 0.3, "wall-clock duration, not busy time: {sum}");
}

#[tracing::instrument(name = "agent_execution")]
fn lead(agent_name: &str) {
    fallible("nested-failing", true).unwrap_err();
    fallible("nested-fine", false).unwrap();
    tracing::info_span!("tool_call").in_scope(|| {});
}

#[tracing::instrument(name = "agent_execution")]
fn lead_with_failing_tool(agent_name: &str) {
    tracing::info_span!("tool_call").in_scope(|| tracing::error!(error = "tool crashed", "tool call failed"));
}

#[test]
fn nested_agents_each_have_their_own_outcome() {
    let harness = Harness::new();
    harness.run(|| {
        lead("lead-agent");
        lead_with_failing_tool("lead-with-broken-tool");
    });
    // A failing sub-agent does not fail the agent that handled its error...
    assert_outcome(&harness, "nested-failing", "failure", Some("error"));
    assert_outcome(&harness, "nested-fine", "success", None);
    assert_outcome(&harness, "lead-agent", "success", None);
    // ...but an ERROR event in a non-agent span belongs to the nearest enclosing agent.
    assert_outcome(&harness, "lead-with-broken-tool", "failure", Some("error"));
}

#[test]
fn a_missing_agent_name_is_counted_as_unknown() {
    let harness = Harness::new();
    harness.run(|| tracing::info_span!("agent_execution", task = "orphan").in_scope(|| {}));
    assert_outcome(&harness, "unknown", "success", None);
}

/// The status each of four agents ends with, by its log line, each with an `ERROR` event
/// placed differently against it.
fn statuses_of_errors_placed_around_agents(harness: &Harness) -> Vec<(String, String)> {
    let agent = |name: &str| tracing::info_span!("agent_execution", agent_name = name, task = "t");
    harness.run(|| {
        agent("explicit-parent-in-a-tool").in_scope(|| {
            let tool = tracing::info_span!("tool_call");
            tracing::error!(parent: &tool, "tool failed");
        });
        let tool = agent("tool-entered-after-it").in_scope(|| tracing::info_span!("tool_call"));
        tool.in_scope(|| tracing::error!("tool failed"));
        drop(tool);
        let span = agent("tool-entered-on-a-worker");
        let tool = span.in_scope(|| tracing::info_span!("tool_call"));
        std::thread::scope(|s| {
            s.spawn(|| harness.run(|| tool.in_scope(|| tracing::error!("tool failed on a worker"))));
        });
        drop((tool, span));
        let connection = tracing::info_span!("connection");
        agent("span-from-outside-entered-in-it")
            .in_scope(|| connection.in_scope(|| tracing::error!("connection failed")));
    });
    harness.telemetry().flush().unwrap();
    let mut statuses: Vec<(String, String)> = harness
        .log_lines()
        .iter()
        .map(|line| {
            let line: serde_json::Value = serde_json::from_str(line).unwrap();
            let text = |key: &str| line[key].as_str().unwrap_or_default().to_owned();
            (text("agent_name"), text("status"))
        })
        .collect();
    statuses.sort();
    statuses
}

#[test]
fn an_error_fails_the_agent_entered_where_it_happens_whether_traces_are_on_or_off() {
    let expected = [
        ("explicit-parent-in-a-tool", "success"),
        ("span-from-outside-entered-in-it", "failure"),
        ("tool-entered-after-it", "success"),
        ("tool-entered-on-a-worker", "success"),
    ]
    .map(|(agent, status)| (agent.to_owned(), status.to_owned()));
    let traced = Harness::new();
    assert_eq!(statuses_of_errors_placed_around_agents(&traced), expected, "traces on");
    let untraced = Harness::untraced();
    assert_eq!(
        statuses_of_errors_placed_around_agents(&untraced),
        expected,
        "traces off"
    );
    let lines = untraced.log_lines();
    assert!(
        lines.iter().all(|line| !line.contains("trace.id")),
        "traces are off: {lines:?}"
    );
}
