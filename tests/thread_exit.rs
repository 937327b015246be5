//! An agent execution from a thread-local's destructor, as an instrumented future dropped when
//! its thread ends makes one: recorded, and no panic (a panic there aborts the process). A
//! test binary of its own, since it installs the global default subscriber.

mod support;

use std::cell::RefCell;

use support::Harness;

#[tracing::instrument(name = "agent_execution")]
fn execute_agent(agent_name: &str, task: &str) {}

/// Runs an agent execution when dropped.
struct ExecutesOnDrop;

impl Drop for ExecutesOnDrop {
    fn drop(&mut self) {
        execute_agent("late-agent", "at thread exit");
    }
}

thread_local! {
    static LATE: RefCell<Option<ExecutesOnDrop>> = const { RefCell::new(None) };
}

#[test]
fn an_agent_execution_while_its_thread_ends_is_recorded_without_a_panic() {
    let mut harness = Harness::new();
    tracing::dispatcher::set_global_default(harness.dispatch.clone()).expect("the only subscriber in this binary");
    std::thread::spawn(|| {
        // A thread's thread-locals are dropped last first. What the registry and OpenTelemetry
        // keep per thread is set up before `LATE`, so it is still there when `LATE` drops;
        // the crate's own is set up after, by the first execution, and is gone by then.
        tracing::info_span!("warm_up").in_scope(|| {});
        drop(opentelemetry::Context::current());
        LATE.with(|late| *late.borrow_mut() = Some(ExecutesOnDrop));
        execute_agent("agent", "while running");
    })
    .join()
    .expect("the thread ends without a panic");
    let (spans, log) = harness.shutdown();
    let mut names: Vec<String> = spans
        .iter()
        .filter(|span| span.name == "agent_execution")
        .filter_map(|span| span.attributes.iter().find(|kv| kv.key.as_str() == "agent.name"))
        .map(|kv| kv.value.as_str().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["agent", "late-agent"]);
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.contains(r#""task":"at thread exit""#), "{log}");
}
