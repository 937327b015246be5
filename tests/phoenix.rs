//! Round trips through a real OTLP receiver, Arize Phoenix: over OTLP/HTTP and (with the
//! `grpc` feature) OTLP/gRPC, every span arrives with the guide's attributes and the ids its
//! log line carries; and a load from several threads agrees exactly in all three signals.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use agent_telemetry::AgentTelemetryBuilder;
use serde_json::Value;
use support::phoenix::Phoenix;
use support::{json_pairs, Harness};

#[tracing::instrument(name = "agent_execution", err)]
fn execute_agent(agent_name: &str, task: &str, fail: bool) -> Result<(), String> {
    if fail {
        Err(format!("{agent_name} failed {task}"))
    } else {
        Ok(())
    }
}

#[tracing::instrument(name = "agent_execution")]
fn lead(agent_name: &str, task: &str) {
    execute_agent("backend-engineer", "Implement API", false).unwrap();
    execute_agent("qa-engineer", "Test API", true).unwrap_err();
}

/// 10 successes, 3 failures, one lead with two sub-agents: 16 executions.
fn workload() {
    for i in 0..10 {
        execute_agent("frontend-engineer", &format!("Build page {i}"), false).unwrap();
    }
    for i in 0..3 {
        execute_agent("devops-engineer", &format!("Deploy {i}"), true).unwrap_err();
    }
    lead("tech-lead", "Ship feature");
}

const WORKLOAD_EXECUTIONS: usize = 16;

fn project(builder: AgentTelemetryBuilder, name: &str) -> AgentTelemetryBuilder {
    builder
        .with_resource_attribute("openinference.project.name", name)
        .with_span_export_delay(Duration::from_millis(200))
}

/// (trace id, span id) of every log line.
fn logged_ids(lines: &[String]) -> BTreeSet<(String, String)> {
    lines
        .iter()
        .map(|line| {
            let pairs: BTreeMap<String, Value> = json_pairs(line).into_iter().collect();
            (
                pairs["trace.id"].as_str().unwrap().to_owned(),
                pairs["span.id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn received_ids(spans: &[Value]) -> BTreeSet<(String, String)> {
    spans
        .iter()
        .map(|s| {
            (
                s["context"]["trace_id"].as_str().unwrap().to_owned(),
                s["context"]["span_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn check_round_trip(phoenix: &Phoenix, project_name: &str, mut harness: Harness) {
    harness.run(workload);
    let (_, log_text) = harness.shutdown();
    let lines: Vec<String> = log_text.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), WORKLOAD_EXECUTIONS);

    let spans = phoenix.wait_for_project_spans(project_name, WORKLOAD_EXECUTIONS, Duration::from_secs(60));
    assert_eq!(
        spans.len(),
        WORKLOAD_EXECUTIONS,
        "{project_name}: every span arrives, exactly once"
    );
    assert_eq!(
        received_ids(&spans),
        logged_ids(&lines),
        "{project_name}: log lines name the received spans"
    );

    let by_agent =
        |name: &str| -> Vec<&Value> { spans.iter().filter(|s| s["attributes"]["agent.name"] == name).collect() };
    for span in &spans {
        assert_eq!(span["name"], "agent_execution");
        assert_eq!(span["span_kind"], "AGENT", "OpenInference kind: {span}");
        let attributes = &span["attributes"];
        assert_eq!(attributes["gen_ai.operation.name"], "invoke_agent");
        assert_eq!(attributes["gen_ai.agent.name"], attributes["agent.name"]);
        assert!(attributes["task"].is_string(), "{span}");
    }
    for span in by_agent("frontend-engineer") {
        assert_eq!(span["status_code"], "UNSET");
        assert_eq!(span["attributes"]["result.status"], "success");
    }
    let failed = by_agent("devops-engineer");
    assert_eq!(failed.len(), 3);
    for span in failed {
        assert_eq!(span["status_code"], "ERROR");
        assert!(
            span["status_message"]
                .as_str()
                .unwrap()
                .contains("devops-engineer failed Deploy"),
            "{span}"
        );
        assert_eq!(span["attributes"]["error.type"], "error");
        assert_eq!(span["attributes"]["result.status"], "failure");
    }
    let lead = by_agent("tech-lead")[0];
    for child in [by_agent("backend-engineer")[0], by_agent("qa-engineer")[0]] {
        assert_eq!(
            child["parent_id"], lead["context"]["span_id"],
            "{project_name}: parent/child kept"
        );
        assert_eq!(child["context"]["trace_id"], lead["context"]["trace_id"]);
    }
    assert_eq!(
        lead["status_code"], "UNSET",
        "a failing sub-agent does not fail its lead"
    );
}

#[test]
fn round_trips_through_a_real_receiver() {
    let Some(phoenix) = Phoenix::start() else { return };

    let endpoint = format!("{}/v1/traces", phoenix.otlp_http_endpoint());
    let harness = Harness::otlp(&endpoint, |b| project(b, "http-round-trip"));
    check_round_trip(&phoenix, "http-round-trip", harness);

    #[cfg(feature = "grpc")]
    {
        // tonic needs a multi-threaded tokio runtime where the exporter is built.
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _entered = runtime.enter();
        let endpoint = format!("http://127.0.0.1:{}", phoenix.grpc_port);
        let harness = Harness::otlp(&endpoint, |b| {
            project(b, "grpc-round-trip").with_otlp_protocol(agent_telemetry::OtlpProtocol::Grpc)
        });
        check_round_trip(&phoenix, "grpc-round-trip", harness);
    }

    load_agrees_exactly_in_all_three_signals(&phoenix);
    tokens_agree_exactly_in_all_three_signals(&phoenix);
}

/// A model call: a `chat` span with the GenAI fields, its usage recorded as it answers.
#[tracing::instrument(
    name = "chat",
    skip_all,
    fields(gen_ai.request.model = model, gen_ai.usage.input_tokens = tracing::field::Empty, gen_ai.usage.output_tokens = tracing::field::Empty),
    err
)]
fn chat(model: &str, input: u64, output: u64) -> Result<(), String> {
    if input == 0 {
        return Err("rate limited".to_owned());
    }
    let span = tracing::Span::current();
    span.record("gen_ai.usage.input_tokens", input);
    span.record("gen_ai.usage.output_tokens", output);
    Ok(())
}

#[tracing::instrument(name = "agent_execution")]
fn thinking_agent(agent_name: &str, task: &str, seed: u64) {
    let model = ["gpt-4o", "claude-sonnet-4"][(seed % 2) as usize];
    let _ = chat(model, 500 + seed * 7, 100 + seed * 3);
    let _ = chat(model, if seed.is_multiple_of(5) { 0 } else { 1_000 + seed }, 250);
}

/// Tokens: what Phoenix stores on the agent spans equals the counters and the log lines.
fn tokens_agree_exactly_in_all_three_signals(phoenix: &Phoenix) {
    let endpoint = format!("{}/v1/traces", phoenix.otlp_http_endpoint());
    let prices = agent_telemetry::ModelPrices::new()
        .with_model("gpt-4o", agent_telemetry::ModelPrice::per_million_tokens(2.5, 10.0));
    let mut harness = Harness::otlp(&endpoint, |b| project(b, "spend").with_model_prices(prices));
    const AGENTS: u64 = 20;
    harness.run(|| {
        for seed in 0..AGENTS {
            thinking_agent(["planner", "coder"][(seed % 2) as usize], "Think", seed);
        }
    });
    let _ = harness.telemetry().flush();
    let scrape = harness.scrape();
    let counted = |kind: &str| -> u64 {
        scrape
            .with_name("agent_tokens_total")
            .filter(|sample| sample.labels.get("type").map(String::as_str) == Some(kind))
            .map(|sample| sample.value as u64)
            .sum()
    };
    let calls = scrape.sum("agent_model_calls_total") as usize;
    let cost = scrape.sum("agent_cost_usd_total");
    let (_, log_text) = harness.shutdown();
    let lines: Vec<BTreeMap<String, Value>> = log_text.lines().map(|l| json_pairs(l).into_iter().collect()).collect();
    let logged = |key: &str| -> u64 { lines.iter().map(|line| line[key].as_u64().unwrap()).sum() };
    let logged_cost: f64 = lines.iter().filter_map(|line| line.get("cost_usd")?.as_f64()).sum();

    let spans = phoenix.wait_for_project_spans("spend", AGENTS as usize * 3, Duration::from_secs(60));
    assert_eq!(spans.len(), AGENTS as usize * 3, "agents and their calls");
    let of_kind = |kind: &str| -> Vec<&Value> { spans.iter().filter(|s| s["span_kind"] == kind).collect() };
    let (agents, llm) = (of_kind("AGENT"), of_kind("LLM"));
    let stored =
        |spans: &[&Value], key: &str| -> u64 { spans.iter().filter_map(|s| s["attributes"][key].as_u64()).sum() };
    for (kind, key, log_key) in [
        ("input", "llm.token_count.prompt", "input_tokens"),
        ("output", "llm.token_count.completion", "output_tokens"),
    ] {
        let (stored_agents, stored_calls) = (stored(&agents, key), stored(&llm, key));
        assert!(stored_agents > 0, "{key} stored");
        assert_eq!(stored_agents, counted(kind), "{key}: Phoenix and /metrics");
        assert_eq!(stored_agents, logged(log_key), "{key}: Phoenix and the log lines");
        assert_eq!(stored_calls, stored_agents, "{key}: the calls add up to their agents");
    }
    assert_eq!(
        stored(&agents, "llm.token_count.total"),
        counted("input") + counted("output")
    );
    assert_eq!(llm.len(), calls, "every model call is an LLM span");
    for call in &llm {
        let parent = agents
            .iter()
            .find(|agent| agent["context"]["span_id"] == call["parent_id"])
            .expect("an LLM span under its agent");
        assert_eq!(parent["context"]["trace_id"], call["context"]["trace_id"]);
        assert_eq!(
            call["attributes"]["llm.model_name"],
            call["attributes"]["gen_ai.request.model"]
        );
    }
    let failed = llm.iter().filter(|s| s["status_code"] == "ERROR").count();
    assert_eq!(failed, 4, "seeds 0, 5, 10, 15 fail their second call");
    assert!(
        cost > 0.0 && (cost - logged_cost).abs() < 1e-9,
        "{cost} vs {logged_cost}"
    );
}

const THREADS: usize = 4;
const PER_THREAD: usize = 1_000;
/// Executions per second, all threads together: below what one exporter thread delivers to
/// Phoenix here, so the default span queue never fills (see the README).
const RATE: f64 = 1_000.0;

fn load_agrees_exactly_in_all_three_signals(phoenix: &Phoenix) {
    let endpoint = format!("{}/v1/traces", phoenix.otlp_http_endpoint());
    // Default batch settings: only the project and the endpoint are set.
    let mut harness = Harness::otlp(&endpoint, |b| {
        b.with_resource_attribute("openinference.project.name", "load")
    });
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let dispatch = harness.dispatch.clone();
            scope.spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    let interval = Duration::from_secs_f64(THREADS as f64 / RATE);
                    let began = Instant::now();
                    for i in 0..PER_THREAD {
                        let due = began + interval * i as u32;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let _ = execute_agent(&format!("agent-{thread}"), &format!("{thread}/{i}"), i % 25 == 0);
                    }
                });
            });
        }
    });
    let produced_in = started.elapsed();
    let _ = harness.telemetry().flush();
    let scrape = harness.scrape();
    let self_metric = |name: &str| scrape.value(name, &[]).unwrap();
    assert_eq!(
        self_metric("agent_telemetry_spans_dropped_total"),
        0.0,
        "no drops at default settings"
    );
    assert_eq!(self_metric("agent_telemetry_spans_export_failed_total"), 0.0);
    assert_eq!(self_metric("agent_telemetry_log_lines_dropped_total"), 0.0);
    let total = THREADS * PER_THREAD;
    assert_eq!(scrape.sum("agent_executions_total"), total as f64);
    let (_, log_text) = harness.shutdown();
    let lines: Vec<String> = log_text.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), total, "every log line written");

    let waited = Instant::now();
    // Phoenix stores a few dozen spans a second on this machine: the wait is its, not ours.
    let spans = phoenix.wait_for_project_spans("load", total, Duration::from_secs(400));
    eprintln!(
        "load: {total} executions in {produced_in:?} from {THREADS} threads; Phoenix stored them {:?} after shutdown",
        waited.elapsed()
    );
    assert_eq!(spans.len(), total, "every span received");
    assert_eq!(received_ids(&spans), logged_ids(&lines));
}
