//! Agent executions from a thread-local's destructor, as an instrumented future dropped when
//! its thread ends makes them: recorded, and no panic (a panic there aborts the process). A
//! test binary of its own, since it installs the global default subscriber.

mod support;

use std::cell::RefCell;

use support::Harness;

#[tracing::instrument(name = "agent_execution")]
fn execute_agent(agent_name: &str, task: &str) {}

/// Runs an agent execution when dropped.
struct ExecutesOnDrop(&'static str);

impl Drop for ExecutesOnDrop {
    fn drop(&mut self) {
        execute_agent(self.0, "at thread exit");
    }
}

thread_local! {
    static LATE: RefCell<Option<ExecutesOnDrop>> = const { RefCell::new(None) };
}

/// A thread that runs an agent, with `late_agent` run as it ends. A thread's thread-locals
/// are dropped last set up first: the registry's, set up by the first span, outlives `LATE`,
/// and the crate's own, set up by the first execution, are gone when `LATE` drops. So is
/// OpenTelemetry's current context, unless `context_first` sets it up before `LATE`.
fn thread_with_a_late_agent(late_agent: &'static str, context_first: bool) {
    std::thread::spawn(move || {
        // Printed at WARN by the harness, not traced: OpenTelemetry is not used yet.
        tracing::warn_span!("warm_up").in_scope(|| {});
        if context_first {
            drop(opentelemetry::Context::current());
        }
        LATE.with(|late| *late.borrow_mut() = Some(ExecutesOnDrop(late_agent)));
        execute_agent("agent", "while running");
    })
    .join()
    .expect("the thread ends without a panic");
}

#[test]
fn agent_executions_while_their_thread_ends_are_recorded_without_a_panic() {
    let mut harness = Harness::with(|b| b.with_env_filter("off"));
    tracing::dispatcher::set_global_default(harness.dispatch.clone()).expect("the only subscriber in this binary");
    thread_with_a_late_agent("late-with-context", true);
    thread_with_a_late_agent("late-without-context", false);
    let (spans, log) = harness.shutdown();
    let mut names: Vec<String> = spans
        .iter()
        .filter(|span| span.name == "agent_execution")
        .filter_map(|span| span.attributes.iter().find(|kv| kv.key.as_str() == "agent.name"))
        .map(|kv| kv.value.as_str().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["agent", "agent", "late-with-context", "late-without-context"]);
    assert_eq!(log.lines().count(), 4, "{log}");
    assert_eq!(log.matches(r#""task":"at thread exit""#).count(), 2, "{log}");
}
