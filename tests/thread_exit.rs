//! Agent executions from a thread-local's destructor, as an instrumented future dropped when
//! its thread ends makes them: recorded, and no panic (a panic there aborts the process). A
//! test binary of its own, since it installs the global default subscriber.

mod support;

use std::cell::RefCell;

use support::{agent_line, Harness};

#[tracing::instrument(name = "agent_execution")]
fn execute_agent(agent_name: &str, task: &str) {}

/// Runs agent executions when dropped.
struct ExecutesOnDrop(fn());

impl Drop for ExecutesOnDrop {
    fn drop(&mut self) {
        (self.0)();
    }
}

fn late_agent_with_context() {
    execute_agent("late-with-context", "at thread exit");
}

fn late_agent_without_context() {
    execute_agent("late-without-context", "at thread exit");
}

/// Two `ERROR`s placed as in `tests/status.rs`: one in a traced span from outside entered in
/// the agent, which fails it; one in a traced span made in the agent and entered after it,
/// which does not.
fn late_agents_with_errors() {
    let agent = |name: &'static str| tracing::info_span!("agent_execution", agent_name = name, task = "at thread exit");
    let connection = tracing::info_span!(target: "tools", "connection");
    agent("late-span-from-outside-entered-in-it")
        .in_scope(|| connection.in_scope(|| tracing::error!("connection failed")));
    let tool = agent("late-tool-entered-after-it").in_scope(|| tracing::info_span!(target: "tools", "tool_call"));
    tool.in_scope(|| tracing::error!("tool failed"));
}

thread_local! {
    static LATE: RefCell<Option<ExecutesOnDrop>> = const { RefCell::new(None) };
}

fn late_root_agent() {
    tracing::info_span!(parent: None, "agent_execution", agent_name = "late-root", task = "at thread exit")
        .in_scope(|| {});
}

fn run_an_agent() {
    execute_agent("agent", "while running");
}

/// A traced span, whose context `tracing-opentelemetry` makes current: it sets up
/// OpenTelemetry's current context, and no agent span is entered on the thread.
fn enter_a_traced_span() {
    tracing::info_span!(target: "tools", "tool_call").in_scope(|| {});
}

/// The application reads the current context (to pass it on, say): it sets it up.
fn read_the_current_context() {
    drop(opentelemetry::Context::current());
}

/// A thread that runs `while_running` (an agent, say), with `late_agent` run as it ends. A
/// thread's thread-locals are dropped last set up first: the registry's, set up by the first
/// span, outlives `LATE`, and the crate's own, set up by the first execution, are gone when
/// `LATE` drops. So is OpenTelemetry's current context, unless `context_first` sets it up
/// before `LATE`; when `while_running` sets it up and runs no agent, the crate cannot know
/// it is gone.
fn thread_with_a_late_agent(late_agent: fn(), context_first: bool) {
    thread_with_a_late_agent_after(late_agent, context_first, run_an_agent);
}

fn thread_with_a_late_agent_after(late_agent: fn(), context_first: bool, while_running: fn()) {
    std::thread::spawn(move || {
        // Printed at WARN by the harness, not traced: OpenTelemetry is not used yet.
        tracing::warn_span!("warm_up").in_scope(|| {});
        if context_first {
            drop(opentelemetry::Context::current());
            // The harness prints `ERROR`s: its printer's buffer outlives `LATE` too.
            tracing::warn!("warm up the printer");
        }
        LATE.with(|late| *late.borrow_mut() = Some(ExecutesOnDrop(late_agent)));
        while_running();
    })
    .join()
    .expect("the thread ends without a panic");
}

#[test]
fn agent_executions_while_their_thread_ends_are_recorded_without_a_panic() {
    // Only the `tools` spans are traced besides agents.
    let mut harness = Harness::with(|b| b.with_env_filter("off,tools=info"));
    tracing::dispatcher::set_global_default(harness.dispatch.clone()).expect("the only subscriber in this binary");
    thread_with_a_late_agent(late_agent_with_context, true);
    thread_with_a_late_agent(late_agent_without_context, false);
    thread_with_a_late_agent(late_agents_with_errors, true);
    // A panic reading a context that is gone, in `LATE`'s destructor, would abort.
    thread_with_a_late_agent_after(late_agent_with_context, false, enter_a_traced_span);
    thread_with_a_late_agent_after(late_root_agent, false, enter_a_traced_span);
    thread_with_a_late_agent_after(late_agent_without_context, false, read_the_current_context);
    let (spans, log) = harness.shutdown();
    let mut names: Vec<String> = spans
        .iter()
        .filter(|span| span.name == "agent_execution")
        .filter_map(|span| span.attributes.iter().find(|kv| kv.key.as_str() == "agent.name"))
        .map(|kv| kv.value.as_str().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "agent",
            "agent",
            "agent",
            "late-root",
            "late-span-from-outside-entered-in-it",
            "late-tool-entered-after-it",
            "late-with-context",
            "late-with-context",
            "late-without-context",
            "late-without-context"
        ]
    );
    assert_eq!(log.lines().count(), 10, "{log}");
    assert_eq!(log.matches(r#""task":"at thread exit""#).count(), 7, "{log}");
    let lines: Vec<&str> = log.lines().collect();
    let status = |agent: &str| {
        let line: serde_json::Value = serde_json::from_str(agent_line(&lines, agent)).unwrap();
        line["status"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(status("late-span-from-outside-entered-in-it"), "failure");
    assert_eq!(status("late-tool-entered-after-it"), "success");
}
