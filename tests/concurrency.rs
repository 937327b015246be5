//! Eight threads running agents at once are counted exactly in all three signals.

mod support;

use std::collections::BTreeSet;

use support::{json_pairs, Harness};

#[tracing::instrument(name = "agent_execution", err)]
fn execute_agent(agent_name: &str, task: &str, fail: bool) -> Result<(), String> {
    if fail {
        Err("failed".into())
    } else {
        Ok(())
    }
}

const THREADS: usize = 8;
const PER_THREAD: usize = 250;

#[test]
fn eight_threads_are_counted_exactly_everywhere() {
    let mut harness = Harness::new();
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let dispatch = harness.dispatch.clone();
            scope.spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    let agent = format!("agent-{thread}");
                    for i in 0..PER_THREAD {
                        let _ = execute_agent(&agent, &format!("{thread}/{i}"), i % 10 == 0);
                    }
                });
            });
        }
    });

    let scrape = harness.scrape();
    for thread in 0..THREADS {
        let agent = format!("agent-{thread}");
        let count = |status| scrape.value("agent_executions_total", &[("agent_name", &agent), ("status", status)]);
        assert_eq!(count("success"), Some(225.0), "{agent}");
        assert_eq!(count("failure"), Some(25.0), "{agent}");
        let histogram_count = scrape.value("agent_execution_duration_seconds_count", &[("agent_name", &agent)]);
        assert_eq!(histogram_count, Some(PER_THREAD as f64));
    }

    let (spans, text) = harness.shutdown();
    let total = THREADS * PER_THREAD;
    assert_eq!(spans.len(), total, "every span exported");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), total, "every line written");
    let tasks: BTreeSet<String> = lines
        .iter()
        .map(|l| json_pairs(l)[5].1.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tasks.len(), total, "each execution exactly once");
    let span_ids: BTreeSet<String> = spans.iter().map(|s| s.span_context.span_id().to_string()).collect();
    let logged_ids: BTreeSet<String> = lines
        .iter()
        .map(|l| {
            json_pairs(l)
                .into_iter()
                .find(|(k, _)| k == "span.id")
                .unwrap()
                .1
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let unmatched: Vec<_> = span_ids.symmetric_difference(&logged_ids).take(5).collect();
    assert!(
        unmatched.is_empty(),
        "every line names an exported span; unmatched: {unmatched:?}"
    );
}
