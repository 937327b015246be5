//! Async agents on a multi-thread tokio runtime, where spans move between worker threads: a
//! timed-out, raced-away, aborted or shut-down execution is `cancelled` in all three signals,
//! never a success; an `Err` is a failure, a panic a failure of type `panic`; a completed one
//! a success. Each test reads the scraped `/metrics`, the log file's lines and the exported
//! spans.

mod support;

use std::time::Duration;

use agent_telemetry::AgentInstrument;
use opentelemetry::trace::Status as SpanStatus;
use opentelemetry_sdk::trace::SpanData;
use support::Harness;
use tracing::Instrument;

/// An agent that works for `work`, then fails or not.
#[agent_telemetry::instrument(skip(work, fail))]
async fn execute_agent(agent_name: &str, task: &str, work: Duration, fail: bool) -> Result<usize, String> {
    tokio::time::sleep(work).await;
    if fail {
        Err(format!("{agent_name} could not {task}"))
    } else {
        Ok(task.len())
    }
}

/// [`execute_agent`], its span named as `tracing::instrument` also takes it.
#[agent_telemetry::instrument("agent_execution", skip(work))]
async fn named_positionally(agent_name: &str, task: &str, work: Duration) -> Result<(), String> {
    tokio::time::sleep(work).await;
    Ok(())
}

/// An agent that panics after a little work.
#[agent_telemetry::instrument]
async fn panicking_agent(agent_name: &str, task: &str) -> usize {
    tokio::time::sleep(Duration::from_millis(5)).await;
    panic!("{agent_name} fell over");
}

/// A lead that hands work to two agents, one awaited in place and one on another task.
#[agent_telemetry::instrument]
async fn lead_agent(agent_name: &str, task: &str) -> Result<usize, String> {
    let here = execute_agent("researcher", "Find sources", Duration::from_millis(10), false).await?;
    let span = tracing::info_span!("agent_execution", agent_name = "writer", task = "Draft summary");
    let spawned = tokio::spawn(async { tokio::time::sleep(Duration::from_millis(10)).await }.instrument_agent(span));
    spawned.await.map_err(|e| e.to_string())?;
    Ok(here)
}

/// A synchronous agent, annotated either way: never taken for a cancelled one.
#[agent_telemetry::instrument]
fn sync_agent(agent_name: &str, task: &str) -> Result<(), String> {
    std::thread::sleep(Duration::from_millis(5));
    Ok(())
}

#[tracing::instrument(name = "agent_execution", err)]
fn plain_sync_agent(agent_name: &str, task: &str) -> Result<(), String> {
    Ok(())
}

/// Agents behind a trait, as frameworks define them: `#[async_trait]` turns each `async fn`
/// into a function returning `Box::pin(async move { .. })` before the attribute sees it.
#[async_trait::async_trait]
trait Agent {
    async fn run(&self, agent_name: &str, task: &str) -> Result<usize, String>;
}

/// An agent of the trait that works for its `Duration`, then fails or not.
struct Worker(Duration, bool);

#[async_trait::async_trait]
impl Agent for Worker {
    #[agent_telemetry::instrument(skip(self))]
    async fn run(&self, agent_name: &str, task: &str) -> Result<usize, String> {
        tokio::time::sleep(self.0).await;
        if self.1 {
            Err(format!("{agent_name} could not {task}"))
        } else {
            Ok(task.len())
        }
    }
}

/// The same shape written by hand: a function returning a future of a `Result`.
#[agent_telemetry::instrument]
fn failing_future<'a>(
    agent_name: &'a str,
    task: &'a str,
) -> impl std::future::Future<Output = Result<(), String>> + 'a {
    async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Err(format!("{agent_name} could not {task}"))
    }
}

/// An `async fn` an agent delegates to.
async fn delegated(agent_name: String, task: String, work: Duration, fail: bool) -> Result<usize, String> {
    tokio::time::sleep(work).await;
    if fail {
        Err(format!("{agent_name} could not {task}"))
    } else {
        Ok(task.len())
    }
}

/// A hand-written, object-safe agent: a function returning a future it does not write as an
/// `async` block, made from borrowed arguments.
#[agent_telemetry::instrument(skip(work, fail))]
fn delegating_agent(
    agent_name: &str,
    task: &str,
    work: Duration,
    fail: bool,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize, String>> + Send>> {
    Box::pin(delegated(agent_name.to_owned(), task.to_owned(), work, fail))
}

/// The same as `impl Future`, its arguments moved into the future it returns.
#[agent_telemetry::instrument]
fn delegating_impl_agent(agent_name: String, task: String) -> impl std::future::Future<Output = Result<usize, String>> {
    delegated(agent_name, task, Duration::from_millis(1), true)
}

/// A delegating agent that returns early, from a guard clause.
#[agent_telemetry::instrument(skip(work))]
fn early_returning_agent(
    agent_name: &str,
    task: &str,
    work: Duration,
) -> impl std::future::Future<Output = Result<usize, String>> {
    if task.is_empty() {
        return delegated(agent_name.to_owned(), "nothing".to_owned(), Duration::ZERO, true);
    }
    delegated(agent_name.to_owned(), task.to_owned(), work, false)
}

/// A guard clause as a macro writes it: its `return` is not in the body's own syntax.
macro_rules! guard {
    ($refused:expr, $future:expr) => {
        if $refused {
            return $future;
        }
    };
}

/// A delegating agent whose returns are a compiled-out branch and a macro's, and which the
/// caller polls by `&mut` (its future is `Unpin`).
#[agent_telemetry::instrument]
fn guarded_agent(agent_name: &str, task: &str) -> impl std::future::Future<Output = Result<usize, String>> + Unpin {
    #[cfg(any())]
    return Box::pin(delegated(
        agent_name.to_owned(),
        "a compiled-out branch".to_owned(),
        Duration::ZERO,
        true,
    ));
    guard!(
        task.is_empty(),
        Box::pin(delegated(
            agent_name.to_owned(),
            "nothing".to_owned(),
            Duration::ZERO,
            true
        ))
    );
    Box::pin(delegated(
        agent_name.to_owned(),
        task.to_owned(),
        Duration::from_millis(1),
        false,
    ))
}

/// An `Unpin` future, boxed as `Pin<Box<impl Future + Unpin>>`.
#[agent_telemetry::instrument]
fn boxed_unpin_agent(
    agent_name: &str,
    task: &str,
) -> std::pin::Pin<Box<impl std::future::Future<Output = Result<usize, String>> + Unpin>> {
    Box::pin(std::future::ready(Ok(task.len())))
}

/// A session an agent borrows mutably for the future it returns.
struct Session {
    calls: usize,
}

impl Session {
    async fn call(&mut self, task: &str) -> Result<usize, String> {
        self.calls += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(task.len())
    }
}

/// A delegating agent that hands on a mutable borrow, or returns early.
#[agent_telemetry::instrument(skip(session))]
fn agent_with_a_session<'a>(
    session: &'a mut Session,
    agent_name: &str,
    task: &'a str,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize, String>> + Send + 'a>> {
    if task.is_empty() {
        return Box::pin(async { Err("nothing to do".to_owned()) });
    }
    Box::pin(session.call(task))
}

/// Returns that coerce to the declared type, as in any `async fn`: a boxed error, a trait
/// object.
#[agent_telemetry::instrument]
async fn coercing_agent(
    agent_name: &str,
    task: &str,
    fail: bool,
) -> Result<Box<dyn std::fmt::Display + Send>, Box<dyn std::error::Error + Send + Sync>> {
    if fail {
        return Err(Box::new(std::fmt::Error));
    }
    Ok(Box::new(task.len()))
}

/// A tool step, annotated with the crate's attribute for its `Err`: not an execution.
#[agent_telemetry::instrument(name = "execute_tool", skip_all)]
async fn slow_tool() -> Result<(), String> {
    tokio::time::sleep(Duration::from_secs(30)).await;
    Ok(())
}

/// An agent that times its tool out and answers without it.
#[agent_telemetry::instrument]
async fn agent_with_fallback(agent_name: &str, task: &str) -> Result<(), String> {
    let timed_out = tokio::time::timeout(Duration::from_millis(20), slow_tool()).await;
    assert!(timed_out.is_err(), "the tool timed out");
    Ok(())
}

/// A lead whose own code panics beside a step of its own that reports cancellation.
#[agent_telemetry::instrument]
async fn lead_that_panics_beside_a_guarded_step(agent_name: &str, task: &str) -> usize {
    let step = tokio::time::sleep(Duration::from_secs(30)).reports_cancellation();
    let own_code = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        panic!("{agent_name}'s own code fell over");
    };
    futures::join!(step, own_code);
    0
}

/// An agent whose step, wrapped with `instrument_agent` in a span that is not an agent's,
/// times out: the agent is cancelled, as documented, and goes on for 400 ms.
#[agent_telemetry::instrument]
async fn agent_that_goes_on_after_its_step(agent_name: &str, task: &str) -> Result<(), String> {
    let step = tokio::time::sleep(Duration::from_secs(30)).instrument_agent(tracing::info_span!("tool_call"));
    assert!(tokio::time::timeout(Duration::from_millis(20), step).await.is_err());
    tokio::time::sleep(Duration::from_millis(400)).await;
    Ok(())
}

/// A lead whose own code panics beside nested agents, in flight and never polled, holding one
/// that completed.
#[agent_telemetry::instrument]
async fn lead_that_panics_beside_nested_agents(agent_name: &str, task: &str) -> usize {
    let held = execute_agent("held-attribute", "Quick", Duration::from_millis(5), false);
    tokio::pin!(held);
    (&mut held).await.unwrap();
    let nested = |name: &'static str| tracing::info_span!("agent_execution", agent_name = name, task = "Wait");
    let long = Duration::from_secs(30);
    let by_attribute = execute_agent("n-attribute", "Wait", long, false);
    let by_instrument_agent = tokio::time::sleep(long).instrument_agent(nested("n-instrument-agent"));
    let _never_attribute = execute_agent("n-attribute-unpolled", "Wait", long, false);
    let _never_instrument_agent = tokio::time::sleep(long).instrument_agent(nested("n-instrument-agent-unpolled"));
    let own_code = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        panic!("{agent_name}'s own code fell over");
    };
    let (done, (), ()) = futures::join!(by_attribute, by_instrument_agent, own_code);
    done.unwrap()
}

/// An agent whose step, wrapped with `reports_cancellation()`, times out; it goes on for
/// `then`.
#[agent_telemetry::instrument(skip(then))]
async fn agent_that_goes_on_after_a_reporting_step(agent_name: &str, task: &str, then: Duration) -> Result<(), String> {
    let step = tokio::time::sleep(Duration::from_secs(30)).reports_cancellation();
    assert!(tokio::time::timeout(Duration::from_millis(20), step).await.is_err());
    tokio::time::sleep(then).await;
    Ok(())
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// What the three signals say of the execution of `agent_name`: the counter's status, and the
/// log line and span of its one execution.
struct Said {
    counted: Vec<String>,
    line: serde_json::Value,
    span: SpanData,
}

fn said(harness: &Harness, agent_name: &str) -> Said {
    let scrape = harness.scrape();
    let counted: Vec<String> = scrape
        .with_name("agent_executions_total")
        .filter(|sample| sample.labels["agent_name"] == agent_name)
        .flat_map(|sample| std::iter::repeat_n(sample.labels["status"].clone(), sample.value as usize))
        .collect();
    let lines: Vec<serde_json::Value> = harness
        .log_lines()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|line: &serde_json::Value| line["agent_name"] == agent_name)
        .collect();
    assert_eq!(lines.len(), 1, "one line for {agent_name}: {lines:?}");
    let spans: Vec<SpanData> = harness
        .spans()
        .into_iter()
        .filter(|span| attribute(span, "agent.name").as_deref() == Some(agent_name))
        .collect();
    assert_eq!(spans.len(), 1, "one span for {agent_name}");
    Said {
        counted,
        line: lines.into_iter().next().unwrap(),
        span: spans.into_iter().next().unwrap(),
    }
}

/// All three signals say `cancelled`, with the error type and a duration of `at_least`.
fn assert_cancelled(said: &Said, at_least: Duration) {
    assert_eq!(said.counted, ["cancelled"], "the counter");
    assert_eq!(said.line["status"], "cancelled", "{}", said.line);
    assert_eq!(said.line["log.level"], "WARN");
    assert_eq!(said.line["error.type"], "cancelled");
    let seconds = said.line["duration_seconds"].as_f64().unwrap();
    assert!(
        seconds >= at_least.as_secs_f64() && seconds < 10.0,
        "wall-clock time until dropped: {seconds}"
    );
    assert_eq!(attribute(&said.span, "result.status").as_deref(), Some("cancelled"));
    assert_eq!(attribute(&said.span, "error.type").as_deref(), Some("cancelled"));
    assert!(
        matches!(said.span.status, SpanStatus::Error { .. }),
        "{:?}",
        said.span.status
    );
}

#[test]
fn a_timeout_that_runs_out_is_cancelled_not_a_success() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    let outcome = harness.run(|| {
        runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_millis(100),
                execute_agent("slow", "Summarise", Duration::from_secs(30), false),
            )
            .await
        })
    });
    assert!(outcome.is_err(), "the timeout ran out");
    let named = harness.run(|| {
        runtime.block_on(async {
            let work = named_positionally("named", "Summarise", Duration::from_secs(30));
            tokio::time::timeout(Duration::from_millis(100), work).await
        })
    });
    assert!(named.is_err(), "the timeout ran out");
    drop(runtime);
    assert_cancelled(&said(&harness, "slow"), Duration::from_millis(100));
    assert_cancelled(&said(&harness, "named"), Duration::from_millis(100));
}

#[test]
fn the_branch_a_select_drops_is_cancelled_and_the_winner_a_success() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| {
        runtime.block_on(async {
            tokio::select! {
                _ = execute_agent("tortoise", "Race", Duration::from_secs(30), false) => panic!("the tortoise won"),
                won = execute_agent("hare", "Race", Duration::from_millis(20), false) => assert_eq!(won, Ok(4)),
            }
        })
    });
    drop(runtime);
    assert_cancelled(&said(&harness, "tortoise"), Duration::from_millis(20));
    let hare = said(&harness, "hare");
    assert_eq!(hare.counted, ["success"]);
    assert_eq!(hare.line["status"], "success");
    assert_eq!(attribute(&hare.span, "result.status").as_deref(), Some("success"));
}

#[test]
fn an_err_is_a_failure_and_a_panic_in_a_spawned_task_a_panic() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| {
        runtime.block_on(async {
            let failed = execute_agent("failing", "Deploy", Duration::from_millis(5), true).await;
            assert!(failed.is_err());
            let panicked = tokio::spawn(panicking_agent("fragile", "Parse")).await;
            assert!(panicked.unwrap_err().is_panic());
        })
    });
    drop(runtime);
    let failing = said(&harness, "failing");
    assert_eq!(failing.counted, ["failure"]);
    assert_eq!(failing.line["error.type"], "error");
    assert_eq!(failing.line["error.message"], "failing could not Deploy");
    let fragile = said(&harness, "fragile");
    assert_eq!(fragile.counted, ["failure"]);
    assert_eq!(fragile.line["error.type"], "panic");
    assert_eq!(attribute(&fragile.span, "error.type").as_deref(), Some("panic"));
}

#[test]
fn an_aborted_execution_is_cancelled() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| {
        runtime.block_on(async {
            let (abortable, handle) =
                futures::future::abortable(execute_agent("abortable", "Crawl", Duration::from_secs(30), false));
            let running = tokio::spawn(abortable);
            tokio::time::sleep(Duration::from_millis(50)).await;
            handle.abort();
            assert!(running.await.unwrap().is_err(), "aborted");

            let spawned = tokio::spawn(execute_agent("spawned", "Index", Duration::from_secs(30), false));
            tokio::time::sleep(Duration::from_millis(50)).await;
            spawned.abort();
            assert!(spawned.await.unwrap_err().is_cancelled());
        })
    });
    drop(runtime);
    // An `async fn`'s span opens at its first poll, which a worker may make a little after
    // the 50 ms began.
    assert_cancelled(&said(&harness, "abortable"), Duration::from_millis(25));
    assert_cancelled(&said(&harness, "spawned"), Duration::from_millis(25));
}

#[test]
fn executions_in_flight_when_the_runtime_shuts_down_are_cancelled() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| {
        for n in 0..4 {
            let name = format!("in-flight-{n}");
            runtime.spawn(async move { execute_agent(&name, "Wait", Duration::from_secs(30), false).await });
        }
        // One that never started: spawned and aborted before its first poll.
        let span = tracing::info_span!("agent_execution", agent_name = "never-polled", task = "t");
        let never = runtime.spawn(async { tokio::time::sleep(Duration::from_secs(30)).await }.instrument_agent(span));
        never.abort();
    });
    std::thread::sleep(Duration::from_millis(100));
    runtime.shutdown_timeout(Duration::from_secs(5));
    for n in 0..4 {
        assert_cancelled(&said(&harness, &format!("in-flight-{n}")), Duration::from_millis(50));
    }
    assert_cancelled(&said(&harness, "never-polled"), Duration::ZERO);
}

#[test]
fn agents_handing_work_across_await_and_spawn_keep_their_trace_and_succeed() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    let done = harness.run(|| runtime.block_on(lead_agent("lead", "Write report")));
    assert_eq!(done, Ok(12));
    drop(runtime);
    let spans = harness.spans();
    let by_name = |name: &str| {
        spans
            .iter()
            .find(|span| attribute(span, "agent.name").as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{name}'s span"))
    };
    let lead = by_name("lead");
    for child in ["researcher", "writer"] {
        let span = by_name(child);
        assert_eq!(span.parent_span_id, lead.span_context.span_id(), "{child} under lead");
        assert_eq!(span.span_context.trace_id(), lead.span_context.trace_id());
        assert_eq!(attribute(span, "result.status").as_deref(), Some("success"));
    }
    let scrape = harness.scrape();
    for agent in ["lead", "researcher", "writer"] {
        let success = [("agent_name", agent), ("status", "success")];
        assert_eq!(scrape.value("agent_executions_total", &success), Some(1.0), "{agent}");
    }
}

#[test]
fn synchronous_agents_are_never_taken_for_cancelled_ones() {
    let harness = Harness::new();
    harness.run(|| {
        sync_agent("sync", "Check").unwrap();
        plain_sync_agent("plain", "Check").unwrap();
    });
    for agent in ["sync", "plain"] {
        let said = said(&harness, agent);
        assert_eq!(said.counted, ["success"], "{agent}");
        assert_eq!(said.line["status"], "success");
    }
}

#[test]
fn async_trait_agents_and_functions_returning_futures_tell_each_outcome_apart() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| {
        runtime.block_on(async {
            let slow = Worker(Duration::from_secs(30), false);
            let timed_out = tokio::time::timeout(Duration::from_millis(50), slow.run("trait-slow", "Wait")).await;
            assert!(timed_out.is_err(), "the timeout ran out");
            let quick = Worker(Duration::from_millis(5), false);
            assert_eq!(quick.run("trait-quick", "Wait").await, Ok(4));
            let failing = Worker(Duration::from_millis(5), true);
            assert!(failing.run("trait-failing", "Wait").await.is_err());
            assert!(failing_future("future-failing", "Wait").await.is_err());
        })
    });
    drop(runtime);
    assert_cancelled(&said(&harness, "trait-slow"), Duration::from_millis(50));
    let quick = said(&harness, "trait-quick");
    assert_eq!(quick.counted, ["success"]);
    assert_eq!(quick.line["status"], "success");
    assert_eq!(attribute(&quick.span, "result.status").as_deref(), Some("success"));
    for agent in ["trait-failing", "future-failing"] {
        let failing = said(&harness, agent);
        assert_eq!(failing.counted, ["failure"], "{agent}");
        assert_eq!(failing.line["error.type"], "error");
        assert_eq!(failing.line["error.message"], format!("{agent} could not Wait"));
    }
}

#[test]
fn functions_returning_a_future_they_do_not_write_tell_each_outcome_apart() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| {
        runtime.block_on(async {
            let slow = delegating_agent("delegating-slow", "Wait", Duration::from_secs(30), false);
            assert!(tokio::time::timeout(Duration::from_millis(50), slow).await.is_err());
            let slow = early_returning_agent("early-slow", "Wait", Duration::from_secs(30));
            assert!(tokio::time::timeout(Duration::from_millis(50), slow).await.is_err());
            assert!(early_returning_agent("early-failing", "", Duration::ZERO)
                .await
                .is_err());
            let mut guarded = guarded_agent("guarded", "Wait");
            assert_eq!((&mut guarded).await, Ok(4));
            assert!(guarded_agent("guarded-failing", "").await.is_err());
            assert_eq!(boxed_unpin_agent("boxed-unpin", "Wait").await, Ok(4));
            let mut session = Session { calls: 0 };
            assert_eq!(agent_with_a_session(&mut session, "session", "Wait").await, Ok(4));
            assert_eq!(session.calls, 1);
            let quick = delegating_agent("delegating-quick", "Wait", Duration::from_millis(5), false);
            assert_eq!(quick.await, Ok(4));
            let failing = delegating_agent("delegating-failing", "Wait", Duration::from_millis(5), true);
            assert!(failing.await.is_err());
            let failing = delegating_impl_agent("delegating-impl".to_owned(), "Wait".to_owned());
            assert!(failing.await.is_err());
            assert_eq!(
                coercing_agent("coercing", "Wait", false).await.unwrap().to_string(),
                "4"
            );
            assert!(coercing_agent("coercing-failing", "Wait", true).await.is_err());
        })
    });
    drop(runtime);
    // From the call, which made the future, to the drop.
    for agent in ["delegating-slow", "early-slow"] {
        assert_cancelled(&said(&harness, agent), Duration::from_millis(50));
    }
    for agent in ["delegating-quick", "coercing", "session", "guarded", "boxed-unpin"] {
        let quick = said(&harness, agent);
        assert_eq!(quick.counted, ["success"], "{agent}");
        assert_eq!(quick.line["status"], "success");
        assert_eq!(attribute(&quick.span, "result.status").as_deref(), Some("success"));
    }
    for (agent, message) in [
        ("delegating-failing", "delegating-failing could not Wait"),
        ("delegating-impl", "delegating-impl could not Wait"),
        ("early-failing", "early-failing could not nothing"),
        ("guarded-failing", "guarded-failing could not nothing"),
        ("coercing-failing", "an error occurred when formatting an argument"),
    ] {
        let failing = said(&harness, agent);
        assert_eq!(failing.counted, ["failure"], "{agent}");
        assert_eq!(failing.line["error.message"], message, "{agent}");
    }
}

#[test]
fn an_agent_dropped_where_its_subscriber_is_not_the_default_is_cancelled() {
    // Installed as the default of the test's thread only: the future is polled there, then
    // dropped on a thread where no subscriber is the default.
    let harness = Harness::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let polled = harness.run(|| {
        let mut agent = Box::pin(execute_agent(
            "dropped-elsewhere",
            "Wait",
            Duration::from_secs(30),
            false,
        ));
        runtime.block_on(async { assert!(futures::poll!(agent.as_mut()).is_pending()) });
        agent
    });
    // A delegating agent opens its span as it is called: called there, polled here.
    let mut called = harness.run(|| delegating_agent("called-there", "Wait", Duration::from_secs(30), false));
    runtime.block_on(async { assert!(futures::poll!(called.as_mut()).is_pending()) });
    std::thread::sleep(Duration::from_millis(20));
    std::thread::spawn(move || drop((polled, called))).join().unwrap();
    assert_cancelled(&said(&harness, "dropped-elsewhere"), Duration::from_millis(20));
    assert_cancelled(&said(&harness, "called-there"), Duration::from_millis(20));
}

#[test]
fn a_timed_out_step_cancels_no_agent_that_goes_on() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    let done = harness.run(|| runtime.block_on(agent_with_fallback("fallback", "Answer")));
    assert_eq!(done, Ok(()));
    drop(runtime);
    let fallback = said(&harness, "fallback");
    assert_eq!(fallback.counted, ["success"]);
    assert_eq!(fallback.line["status"], "success");
    assert_eq!(attribute(&fallback.span, "result.status").as_deref(), Some("success"));
}

#[test]
fn a_cancelled_agent_lasts_until_it_was_dropped_though_a_call_outlives_it() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| {
        runtime.block_on(async {
            let span = tracing::info_span!("agent_execution", agent_name = "outlived", task = "Ask");
            let agent = async {
                // The call's span keeps the agent's open until it closes, 600 ms in.
                let call = tracing::info_span!("chat", gen_ai.request.model = "gpt-4o");
                tokio::spawn(tokio::time::sleep(Duration::from_millis(600)).instrument(call));
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            .instrument_agent(span);
            assert!(tokio::time::timeout(Duration::from_millis(20), agent).await.is_err());
            tokio::time::sleep(Duration::from_millis(700)).await;
        })
    });
    drop(runtime);
    let outlived = said(&harness, "outlived");
    assert_cancelled(&outlived, Duration::from_millis(20));
    let seconds = outlived.line["duration_seconds"].as_f64().unwrap();
    assert!(seconds < 0.5, "dropped 20 ms in, closed 600 ms in: {seconds} s");
    let span_seconds = (outlived.span.end_time.duration_since(outlived.span.start_time))
        .unwrap()
        .as_secs_f64();
    assert!(span_seconds < 0.5, "the span's end too: {span_seconds} s");
}

#[test]
fn a_lead_that_panics_beside_a_step_reporting_cancellation_is_a_panic() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| {
        runtime.block_on(async {
            let joined = tokio::spawn(lead_that_panics_beside_a_guarded_step("guarded-lead", "Lead")).await;
            assert!(joined.unwrap_err().is_panic());
        })
    });
    drop(runtime);
    let lead = said(&harness, "guarded-lead");
    assert_eq!(lead.counted, ["failure"]);
    assert_eq!(lead.line["error.type"], "panic");
    assert_eq!(attribute(&lead.span, "error.type").as_deref(), Some("panic"));
}

#[test]
fn an_agent_cancelled_by_a_step_inside_it_lasts_until_it_closes() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    let done = harness.run(|| runtime.block_on(agent_that_goes_on_after_its_step("goes-on", "Work")));
    assert_eq!(done, Ok(()));
    drop(runtime);
    assert_cancelled(&said(&harness, "goes-on"), Duration::from_millis(420));
}

#[test]
fn an_agent_span_never_entered_is_cancelled_though_a_panic_drops_it() {
    let harness = Harness::new();
    let unwound = harness.run(|| {
        std::panic::catch_unwind(|| {
            let _never_entered = tracing::info_span!("agent_execution", agent_name = "unentered", task = "Wait");
            panic!("the code around it fell over");
        })
    });
    assert!(unwound.is_err());
    assert_cancelled(&said(&harness, "unentered"), Duration::ZERO);
}

#[test]
fn a_lead_that_panics_beside_nested_agents_is_the_only_panic_and_they_are_cancelled() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| {
        runtime.block_on(async {
            let joined = tokio::spawn(lead_that_panics_beside_nested_agents("panicking-lead-2", "Lead")).await;
            assert!(joined.unwrap_err().is_panic());
        })
    });
    drop(runtime);
    let lead = said(&harness, "panicking-lead-2");
    assert_eq!(lead.counted, ["failure"]);
    assert_eq!(lead.line["error.type"], "panic");
    // In flight since before the panic, 20 ms in.
    for nested in ["n-attribute", "n-instrument-agent"] {
        assert_cancelled(&said(&harness, nested), Duration::from_millis(20));
    }
    assert_cancelled(&said(&harness, "n-instrument-agent-unpolled"), Duration::ZERO);
    let held = said(&harness, "held-attribute");
    assert_eq!(held.counted, ["success"]);
    assert_eq!(held.line["status"], "success");
    let lines = harness.log_lines();
    assert!(
        !lines.iter().any(|line| line.contains("n-attribute-unpolled")),
        "an attribute's span opens at its first poll"
    );
}

#[test]
fn an_agent_cancelled_from_a_future_inside_it_ends_at_its_own_drop_or_close() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| {
        runtime.block_on(async {
            let goes_on =
                agent_that_goes_on_after_a_reporting_step("reported-goes-on", "Work", Duration::from_millis(400));
            assert_eq!(goes_on.await, Ok(()));
            let dropped_later =
                agent_that_goes_on_after_a_reporting_step("reported-then-dropped", "Work", Duration::from_secs(30));
            assert!(tokio::time::timeout(Duration::from_millis(300), dropped_later)
                .await
                .is_err());
        })
    });
    drop(runtime);
    assert_cancelled(&said(&harness, "reported-goes-on"), Duration::from_millis(420));
    let dropped = said(&harness, "reported-then-dropped");
    assert_cancelled(&dropped, Duration::from_millis(300));
    let seconds = dropped.line["duration_seconds"].as_f64().unwrap();
    assert!(seconds < 1.0, "dropped 300 ms in: {seconds} s");
}
