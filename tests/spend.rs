//! Tokens, models and spend (issue #24) through the real outputs: the scraped `/metrics`, the
//! log file's lines and the spans the exporter received, all agreeing.

mod support;

use std::collections::BTreeMap;

use agent_telemetry::{AgentTelemetry, Error, LogFormat, ModelPrice, ModelPrices};
use opentelemetry::trace::Status as SpanStatus;
use opentelemetry::Value;
use opentelemetry_sdk::trace::SpanData;
use support::{agent_line, json_pairs, Harness, Scrape};

fn prices() -> ModelPrices {
    ModelPrices::new()
        .with_model(
            "gpt-4o",
            ModelPrice::per_million_tokens(2.5, 10.0).with_cache_read(1.25),
        )
        .with_model("claude-sonnet", ModelPrice::per_million_tokens(3.0, 15.0))
}

/// A model call the way an agent framework would annotate it.
#[tracing::instrument(name = "chat", fields(gen_ai.request.model = model, gen_ai.provider.name = provider, gen_ai.usage.input_tokens, gen_ai.usage.output_tokens), err)]
fn chat(model: &str, provider: &str, input: u64, output: u64, fail: bool) -> Result<(), String> {
    if fail {
        return Err("rate limited".to_owned());
    }
    let span = tracing::Span::current();
    span.record("gen_ai.usage.input_tokens", input);
    span.record("gen_ai.usage.output_tokens", output);
    Ok(())
}

#[tracing::instrument(name = "agent_execution", fields(cache_read_tokens = tracing::field::Empty))]
fn planner(agent_name: &str, task: &str) {
    chat("gpt-4o", "openai", 1200, 300, false).unwrap();
    // Failed and retried: the call fails, the execution does not.
    chat("gpt-4o", "openai", 0, 0, true).unwrap_err();
    chat("claude-sonnet", "anthropic", 800, 200, false).unwrap();
    // Cache reads of the first call, recorded on the execution itself, and a call by
    // `gen_ai.operation.name` rather than by name.
    tracing::Span::current().record("cache_read_tokens", 1000_u64);
    let call = tracing::info_span!(
        "llm request",
        gen_ai.operation.name = "chat",
        model = "gpt-4o",
        input_tokens = 100_u64,
        output_tokens = 50_u64
    );
    call.in_scope(|| {});
    // A nested agent: its tokens are its own.
    coder("coder", "Write it");
}

#[tracing::instrument(
    name = "agent_execution",
    fields(model = "gpt-4o-mini", input_tokens = 40_u64, output_tokens = 10_u64)
)]
fn coder(agent_name: &str, task: &str) {}

/// `agent_tokens_total` of one agent, model and token type.
fn tokens(scrape: &Scrape, agent: &str, model: &str, kind: &str) -> Option<f64> {
    scrape.value(
        "agent_tokens_total",
        &[("agent_name", agent), ("model", model), ("type", kind)],
    )
}

/// `agent_model_calls_total` of one agent, model and status.
fn calls(scrape: &Scrape, agent: &str, model: &str, status: &str) -> Option<f64> {
    scrape.value(
        "agent_model_calls_total",
        &[("agent_name", agent), ("model", model), ("status", status)],
    )
}

/// `agent_cost_usd_total` of one agent and model.
fn cost(scrape: &Scrape, agent: &str, model: &str) -> Option<f64> {
    scrape.value("agent_cost_usd_total", &[("agent_name", agent), ("model", model)])
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn int(span: &SpanData, key: &str) -> i64 {
    match attribute(span, key) {
        Some(Value::I64(value)) => *value,
        other => panic!("{key} of {}: {other:?}", span.name),
    }
}

fn text(span: &SpanData, key: &str) -> String {
    attribute(span, key)
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default()
}

#[test]
fn tokens_and_spend_agree_in_metrics_log_lines_and_spans() {
    let mut harness = Harness::with(|builder| builder.with_model_prices(prices()));
    harness.run(|| planner("planner", "Plan the release"));
    let scrape = harness.scrape();
    // gpt-4o: 1200 + 100 input, 300 + 50 output; the execution's own 1000 cache reads count
    // under its model, which it did not name: `unknown`.
    assert_eq!(tokens(&scrape, "planner", "gpt-4o", "input"), Some(1300.0));
    assert_eq!(tokens(&scrape, "planner", "gpt-4o", "output"), Some(350.0));
    assert_eq!(tokens(&scrape, "planner", "claude-sonnet", "input"), Some(800.0));
    assert_eq!(tokens(&scrape, "planner", "unknown", "cache_read"), Some(1000.0));
    assert_eq!(tokens(&scrape, "coder", "gpt-4o-mini", "input"), Some(40.0));
    assert_eq!(
        tokens(&scrape, "planner", "gpt-4o-mini", "input"),
        None,
        "a nested agent's tokens are not its parent's"
    );
    assert_eq!(calls(&scrape, "planner", "gpt-4o", "success"), Some(2.0));
    assert_eq!(calls(&scrape, "planner", "gpt-4o", "failure"), Some(1.0));
    assert_eq!(calls(&scrape, "planner", "claude-sonnet", "success"), Some(1.0));
    assert_eq!(
        scrape.value(
            "agent_executions_total",
            &[("agent_name", "planner"), ("status", "success")]
        ),
        Some(1.0),
        "a failed call the agent recovered from does not fail the execution"
    );
    assert_eq!(
        scrape.value(
            "agent_model_call_duration_seconds_count",
            &[("agent_name", "planner"), ("model", "gpt-4o")]
        ),
        Some(3.0)
    );
    assert!(scrape
        .value(
            "agent_model_call_duration_seconds_bucket",
            &[("agent_name", "planner"), ("model", "gpt-4o"), ("le", "81.92")]
        )
        .is_some());
    let gpt = (1300.0 * 2.5 + 350.0 * 10.0) / 1e6;
    let claude = (800.0 * 3.0 + 200.0 * 15.0) / 1e6;
    assert!((cost(&scrape, "planner", "gpt-4o").unwrap() - gpt).abs() < 1e-12);
    assert!((cost(&scrape, "planner", "claude-sonnet").unwrap() - claude).abs() < 1e-12);
    assert_eq!(cost(&scrape, "coder", "gpt-4o-mini"), None, "no price");
    // Unpriced: coder's 40 + 10, and the 1000 cache reads under `unknown` (input of none).
    assert_eq!(
        scrape.value("agent_telemetry_unpriced_tokens_total", &[("model", "gpt-4o-mini")]),
        Some(50.0)
    );

    // The log lines: the same totals, numbers as numbers.
    let lines = harness.log_lines();
    let line = |agent: &str| -> BTreeMap<String, serde_json::Value> {
        json_pairs(agent_line(&lines, agent)).into_iter().collect()
    };
    let planner_line = line("planner");
    assert_eq!(planner_line["model"], "gpt-4o", "its first call's");
    assert_eq!(planner_line["input_tokens"], 2100);
    assert_eq!(planner_line["output_tokens"], 550);
    assert_eq!(planner_line["cache_read_tokens"], 1000);
    let logged_cost = planner_line["cost_usd"].as_f64().unwrap();
    assert!((logged_cost - (gpt + claude)).abs() < 1e-12, "{logged_cost}");
    let keys: Vec<String> = json_pairs(lines.iter().find(|l| l.contains("planner")).unwrap())
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    let after_status = &keys[keys.iter().position(|k| k == "status").unwrap() + 1..][..5];
    assert_eq!(
        after_status,
        [
            "model",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cost_usd"
        ]
    );
    let coder_line = line("coder");
    assert_eq!(coder_line["input_tokens"], 40);
    assert!(!coder_line.contains_key("cost_usd"), "unpriced");

    // The spans: the agent's totals, the calls as LLM spans under it.
    let (spans, _) = harness.shutdown();
    let agent = spans.iter().find(|s| text(s, "agent.name") == "planner").unwrap();
    assert_eq!(int(agent, "gen_ai.usage.input_tokens"), 2100);
    assert_eq!(int(agent, "llm.token_count.prompt"), 2100);
    assert_eq!(int(agent, "llm.token_count.completion"), 550);
    assert_eq!(int(agent, "llm.token_count.total"), 2650);
    assert_eq!(int(agent, "gen_ai.usage.cache_read.input_tokens"), 1000);
    assert_eq!(text(agent, "gen_ai.request.model"), "gpt-4o");
    assert_eq!(text(agent, "gen_ai.provider.name"), "openai");
    let calls: Vec<&SpanData> = spans
        .iter()
        .filter(|s| text(s, "openinference.span.kind") == "LLM")
        .collect();
    assert_eq!(calls.len(), 4);
    for call in &calls {
        assert_eq!(call.parent_span_id, agent.span_context.span_id(), "{}", call.name);
        assert_eq!(call.span_context.trace_id(), agent.span_context.trace_id());
        assert_eq!(text(call, "gen_ai.operation.name"), "chat");
        assert_eq!(text(call, "llm.model_name"), text(call, "gen_ai.request.model"));
    }
    let failed: Vec<_> = calls
        .iter()
        .filter(|s| matches!(s.status, SpanStatus::Error { .. }))
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(text(failed[0], "error.type"), "error");
    let call_tokens: i64 = calls
        .iter()
        .filter(|s| attribute(s, "llm.token_count.prompt").is_some())
        .map(|s| int(s, "llm.token_count.prompt"))
        .sum();
    assert_eq!(
        call_tokens,
        int(agent, "llm.token_count.prompt"),
        "the calls' input is the agent's"
    );
}

#[test]
fn token_fields_count_as_any_integer_type_and_the_rest_are_ignored_and_counted() {
    let harness = Harness::new();
    harness.run(|| {
        tracing::info_span!(
            "agent_execution",
            agent_name = "odd",
            input_tokens = -5_i64,
            output_tokens = "many",
            cache_read_tokens = 1.5,
            model = "m"
        )
        .in_scope(|| {});
        // Integers of any type count; an integer name is its text.
        tracing::info_span!(
            "agent_execution",
            agent_name = "wide",
            input_tokens = 100_u128,
            output_tokens = 7_i128,
            cache_read_tokens = u128::MAX,
            model = -5_i64
        )
        .in_scope(|| {});
    });
    let scrape = harness.scrape();
    assert_eq!(
        scrape.value("agent_telemetry_usage_fields_invalid_total", &[]),
        Some(4.0),
        "odd's three, and wide's count past u64"
    );
    assert_eq!(tokens(&scrape, "odd", "m", "input"), None);
    assert_eq!(tokens(&scrape, "wide", "-5", "input"), Some(100.0));
    assert_eq!(tokens(&scrape, "wide", "-5", "output"), Some(7.0));
    let lines = harness.log_lines();
    let odd = agent_line(&lines, "odd");
    assert!(odd.contains(r#""model":"m""#) && !odd.contains("input_tokens"), "{odd}");
    let wide = agent_line(&lines, "wide");
    assert!(
        wide.contains(r#""model":"-5","input_tokens":100,"output_tokens":7"#),
        "{wide}"
    );
}

#[test]
fn an_empty_or_blank_name_is_unknown_in_every_signal() {
    let harness = Harness::new();
    harness.run(|| {
        for (agent_name, model) in [("", ""), (" ", "\t"), ("\t", " ")] {
            tracing::info_span!("agent_execution", agent_name, task = "t", model, input_tokens = 5_u64).in_scope(
                || {
                    tracing::info_span!("chat", model, provider = " ", output_tokens = 1_u64).in_scope(|| {});
                },
            );
        }
    });
    let scrape = harness.scrape();
    assert_eq!(tokens(&scrape, "unknown", "unknown", "input"), Some(15.0));
    assert_eq!(tokens(&scrape, "unknown", "unknown", "output"), Some(3.0));
    assert_eq!(calls(&scrape, "unknown", "unknown", "success"), Some(3.0));
    let names: Vec<&str> = scrape
        .samples
        .iter()
        .flat_map(|s| ["agent_name", "model"].map(|label| s.labels.get(label)))
        .flatten()
        .map(String::as_str)
        .collect();
    assert!(names.iter().all(|name| *name == "unknown"), "{names:?}");
    for line in harness.log_lines() {
        assert!(line.contains(r#""agent_name":"unknown""#), "{line}");
        assert!(
            !line.contains(r#""model":"""#) && !line.contains(r#""model":" "#),
            "{line}"
        );
    }
    for span in harness.spans() {
        for attribute in &span.attributes {
            let value = attribute.value.as_str();
            assert!(!value.trim().is_empty(), "{} is {value:?}", attribute.key);
        }
    }
}

#[test]
fn token_counters_never_go_backwards_past_what_a_u64_holds() {
    // Model calls outside any execution, each with the most tokens a field takes (2^53):
    // 2,048 of them pass 2^64, where a u64 sum wraps round to 0, a counter reset.
    let harness = Harness::new();
    let mut readings = Vec::new();
    for _ in 0..3 {
        harness.run(|| {
            for _ in 0..1024 {
                tracing::info_span!("chat", model = "m", input_tokens = 1_u64 << 53).in_scope(|| {});
            }
        });
        readings.push(tokens(&harness.scrape(), "unknown", "m", "input").unwrap());
    }
    assert!(readings.windows(2).all(|pair| pair[1] > pair[0]), "{readings:?}");
    assert_eq!(readings[0], 2f64.powi(63), "exact while it can be");
}

#[test]
fn model_labels_are_capped_and_the_overflow_counted() {
    let harness = Harness::with(|builder| builder.with_max_model_names(2));
    harness.run(|| {
        for model in ["a", "b", "c", "d"] {
            tracing::info_span!("agent_execution", agent_name = "x", model, input_tokens = 1_u64).in_scope(|| {});
        }
    });
    let scrape = harness.scrape();
    assert_eq!(
        (tokens(&scrape, "x", "a", "input"), tokens(&scrape, "x", "b", "input")),
        (Some(1.0), Some(1.0))
    );
    assert_eq!(tokens(&scrape, "x", "__overflow__", "input"), Some(2.0));
    assert_eq!(tokens(&scrape, "x", "c", "input"), None);
    assert_eq!(
        scrape.value("agent_telemetry_model_names_overflowed_total", &[]),
        Some(2.0)
    );
}

#[test]
fn every_pair_of_agent_and_model_within_the_caps_keeps_its_labels() {
    // 40 agents and 20 models, inside the caps (256, 64, and 1,000 pairs): 2,400 token series
    // and 800 model-call series, past the SDK's own 2,000 a metric; and 600 agents, past it
    // in the execution metrics, under a cap raised to 1,000.
    let harness = Harness::with(|b| b.with_max_agent_names(1000).with_max_agent_models(1000));
    harness.run(|| {
        for (agent, model) in (0..40).flat_map(|agent| (0..20).map(move |model| (agent, model))) {
            tracing::info_span!("agent_execution", agent_name = format!("agent-{agent}"), task = "t").in_scope(|| {
                tracing::info_span!(
                    "chat",
                    model = format!("model-{model}"),
                    input_tokens = 10_u64,
                    output_tokens = 1_u64,
                    cache_read_tokens = 2_u64
                )
                .in_scope(|| {});
            });
        }
        for agent in 40..600 {
            tracing::info_span!("agent_execution", agent_name = format!("agent-{agent}"), task = "t").in_scope(|| {});
        }
    });
    let scrape = harness.scrape();
    for (agent, model) in (0..40).flat_map(|agent| (0..20).map(move |model| (agent, model))) {
        let (agent, model) = (format!("agent-{agent}"), format!("model-{model}"));
        let counted = ["input", "output", "cache_read"].map(|kind| tokens(&scrape, &agent, &model, kind));
        assert_eq!(counted, [Some(10.0), Some(1.0), Some(2.0)], "{agent} on {model}");
        assert_eq!(
            calls(&scrape, &agent, &model, "success"),
            Some(1.0),
            "{agent} on {model}"
        );
    }
    for agent in 0..600 {
        let executions = scrape.value(
            "agent_executions_total",
            &[("agent_name", &format!("agent-{agent}")), ("status", "success")],
        );
        assert_eq!(executions, Some(if agent < 40 { 20.0 } else { 1.0 }), "agent-{agent}");
    }
    let folded: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.labels.contains_key("otel_metric_overflow"))
        .collect();
    assert!(folded.is_empty(), "series folded by the SDK: {folded:?}");
}

#[test]
fn pairs_of_agent_and_model_past_their_cap_fold_into_the_agents_overflow() {
    let harness = Harness::with(|b| b.with_max_agent_models(4));
    harness.run(|| {
        for agent in ["a", "b", "c"] {
            for model in ["m1", "m2"] {
                tracing::info_span!("agent_execution", agent_name = agent, model, input_tokens = 10_u64)
                    .in_scope(|| {});
            }
        }
        // A pair kept is kept: b on m1 again.
        tracing::info_span!("agent_execution", agent_name = "b", model = "m1", input_tokens = 1_u64).in_scope(|| {});
    });
    let scrape = harness.scrape();
    let kept = [("a", "m1"), ("a", "m2"), ("b", "m1"), ("b", "m2")];
    for (agent, model) in kept {
        let expected = if (agent, model) == ("b", "m1") { 11.0 } else { 10.0 };
        assert_eq!(
            tokens(&scrape, agent, model, "input"),
            Some(expected),
            "{agent} on {model}"
        );
    }
    assert_eq!(tokens(&scrape, "c", "m1", "input"), None);
    assert_eq!(
        tokens(&scrape, "c", "__overflow__", "input"),
        Some(20.0),
        "c's own overflow"
    );
    assert_eq!(
        scrape.value("agent_telemetry_model_names_overflowed_total", &[]),
        Some(2.0)
    );
}

#[test]
fn caps_whose_series_a_metric_could_not_hold_are_an_error() {
    let error = AgentTelemetry::builder()
        .ignore_environment()
        .with_max_agent_names(400_000)
        .build::<tracing_subscriber::Registry>()
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(error, Error::InvalidSetting { .. }), "{error:?}");
    assert!(error.to_string().contains("with_max_agent_names"), "{error}");
}

#[test]
fn the_ecs_profile_puts_usage_under_gen_ai() {
    let harness = Harness::with(|builder| builder.with_log_format(LogFormat::Ecs).with_model_prices(prices()));
    harness.run(|| coder("coder", "Write it"));
    harness.run(|| {
        tracing::info_span!(
            "agent_execution",
            agent_name = "x",
            model = "gpt-4o",
            output_tokens = 1_000_000_u64
        )
        .in_scope(|| {});
    });
    let lines = harness.log_lines();
    let line: BTreeMap<String, serde_json::Value> = json_pairs(&lines[1]).into_iter().collect();
    assert_eq!(line["gen_ai.request.model"], "gpt-4o");
    assert_eq!(line["gen_ai.usage.output_tokens"], 1_000_000);
    assert_eq!(line["gen_ai.usage.input_tokens"], 0);
    assert_eq!(line["gen_ai.usage.cost_usd"].as_f64(), Some(10.0));
    assert!(
        lines[1].contains(r#""gen_ai.usage.cost_usd":10.0"#),
        "a float: {}",
        lines[1]
    );
}

#[test]
fn a_malformed_prices_file_is_an_error_naming_the_variable_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prices.toml");
    std::fs::write(&file, "[models.\"gpt-4o\"]\ninput = 2.5\noutput = \"ten\"\n").unwrap();
    // Read by `build`; the other tests of this file ignore the environment.
    std::env::set_var("AGENT_TELEMETRY_PRICES", &file);
    let built = agent_telemetry::AgentTelemetry::builder()
        .without_metrics_server()
        .with_traces_exporter(agent_telemetry::TracesExporter::None)
        .build::<tracing_subscriber::Registry>();
    std::env::remove_var("AGENT_TELEMETRY_PRICES");
    let error = built.err().expect("refused");
    let message = error.to_string();
    assert!(matches!(error, Error::Prices { line: 3, .. }), "{message}");
    assert!(message.contains("AGENT_TELEMETRY_PRICES"), "{message}");
    assert!(message.contains("line 3"), "{message}");
}

#[test]
fn calls_count_under_the_names_their_execution_records_last() {
    let harness = Harness::new();
    harness.run(|| {
        let agent = tracing::info_span!(
            "agent_execution",
            agent_name = tracing::field::Empty,
            model = tracing::field::Empty
        );
        agent.in_scope(|| {
            // Before the execution names itself or its model.
            tracing::info_span!("chat", input_tokens = 10_u64).in_scope(|| {});
        });
        agent.record("agent_name", "late-namer");
        agent.record("model", "gpt-4o");
    });
    let scrape = harness.scrape();
    assert_eq!(calls(&scrape, "late-namer", "gpt-4o", "success"), Some(1.0));
    assert_eq!(tokens(&scrape, "late-namer", "gpt-4o", "input"), Some(10.0));
    assert_eq!(
        scrape.with_name("agent_model_calls_total").count(),
        1,
        "no `unknown` series"
    );
}

#[test]
fn a_call_made_inside_a_call_is_counted_once() {
    let harness = Harness::new();
    harness.run(|| {
        tracing::info_span!("agent_execution", agent_name = "wrapper", model = "gpt-4o").in_scope(|| {
            // An application's call span around a client library's own, both with the usage.
            tracing::info_span!("chat", input_tokens = 300_u64, output_tokens = 20_u64).in_scope(|| {
                tracing::info_span!(
                    "chat",
                    gen_ai.usage.input_tokens = 300_u64,
                    gen_ai.usage.output_tokens = 20_u64
                )
                .in_scope(|| {});
            });
        });
    });
    let scrape = harness.scrape();
    assert_eq!(tokens(&scrape, "wrapper", "gpt-4o", "input"), Some(300.0));
    assert_eq!(scrape.sum("agent_model_calls_total"), 1.0);
    assert!(harness.log_lines()[0].contains(r#""input_tokens":300,"output_tokens":20"#));
}

#[test]
fn a_calls_tokens_count_under_the_model_a_call_inside_it_names() {
    let harness = Harness::with(|builder| builder.with_model_prices(prices()));
    harness.run(|| {
        tracing::info_span!("agent_execution", agent_name = "nester", task = "Ask").in_scope(|| {
            // The application's span has the usage; the client library's inside it, the model.
            tracing::info_span!("chat", input_tokens = 1_000_000_u64).in_scope(|| {
                tracing::info_span!("chat", model = "gpt-4o", input_tokens = 1_000_000_u64).in_scope(|| {});
            });
        });
    });
    let scrape = harness.scrape();
    assert_eq!(calls(&scrape, "nester", "gpt-4o", "success"), Some(1.0));
    assert_eq!(tokens(&scrape, "nester", "gpt-4o", "input"), Some(1e6));
    assert_eq!(tokens(&scrape, "nester", "unknown", "input"), None);
    assert_eq!(cost(&scrape, "nester", "gpt-4o"), Some(2.5));
    let lines = harness.log_lines();
    let line: serde_json::Value = serde_json::from_str(agent_line(&lines, "nester")).unwrap();
    assert_eq!(line["model"], "gpt-4o");
    assert_eq!(line["input_tokens"], 1_000_000);
    assert_eq!(line["cost_usd"], 2.5);
}

#[test]
fn sums_past_what_a_span_carries_agree_in_the_line_and_the_span() {
    let harness = Harness::new();
    let most = 1_u64 << 53;
    harness.run(|| {
        tracing::info_span!("agent_execution", agent_name = "hoarder", task = "Read").in_scope(|| {
            for _ in 0..1025 {
                tracing::info_span!("chat", model = "m", input_tokens = most, output_tokens = most).in_scope(|| {});
            }
        });
    });
    let lines = harness.log_lines();
    let line: serde_json::Value = serde_json::from_str(agent_line(&lines, "hoarder")).unwrap();
    let spans = harness.spans();
    let agent = spans.iter().find(|span| text(span, "agent.name") == "hoarder").unwrap();
    for (logged, attribute) in [
        ("input_tokens", "gen_ai.usage.input_tokens"),
        ("output_tokens", "gen_ai.usage.output_tokens"),
    ] {
        assert_eq!(line[logged].as_i64(), Some(i64::MAX), "{line}");
        assert_eq!(int(agent, attribute), i64::MAX);
    }
    assert_eq!(int(agent, "llm.token_count.total"), i64::MAX);
}

#[test]
fn tokens_of_models_past_those_kept_apart_are_unpriced_whatever_the_prices_say() {
    let prices = ModelPrices::new().with_model("__overflow__", ModelPrice::per_million_tokens(1.0, 1.0));
    let harness = Harness::with(|builder| builder.with_model_prices(prices).with_max_model_names(1000));
    harness.run(|| {
        tracing::info_span!("agent_execution", agent_name = "many", task = "Compare").in_scope(|| {
            for n in 0..257 {
                tracing::info_span!("chat", model = format!("model-{n}"), input_tokens = 1_000_000_u64).in_scope(|| {});
            }
        });
    });
    let scrape = harness.scrape();
    assert_eq!(tokens(&scrape, "many", "__overflow__", "input"), Some(1e6));
    assert_eq!(cost(&scrape, "many", "__overflow__"), None);
    let lines = harness.log_lines();
    let line: serde_json::Value = serde_json::from_str(agent_line(&lines, "many")).unwrap();
    assert!(line.get("cost_usd").is_none(), "{line}");
}

/// A model call annotated like an agent, so that a dropped one is reported as cancelled.
#[agent_telemetry::instrument(name = "chat", skip_all, fields(model = "gpt-4o"))]
async fn slow_chat() -> Result<(), String> {
    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    Ok(())
}

#[agent_telemetry::instrument]
async fn impatient(agent_name: &str) -> Result<(), String> {
    let timed_out = tokio::time::timeout(std::time::Duration::from_millis(20), slow_chat()).await;
    assert!(timed_out.is_err());
    Ok(())
}

#[test]
fn a_model_call_that_times_out_is_cancelled_and_its_execution_is_not() {
    let harness = Harness::new();
    let runtime = harness.runtime(2);
    harness.run(|| runtime.block_on(impatient("impatient")).unwrap());
    drop(runtime);
    let scrape = harness.scrape();
    assert_eq!(calls(&scrape, "impatient", "gpt-4o", "cancelled"), Some(1.0));
    assert_eq!(
        scrape.value(
            "agent_executions_total",
            &[("agent_name", "impatient"), ("status", "success")]
        ),
        Some(1.0)
    );
}

#[test]
fn a_call_outside_any_execution_counts_as_it_ends_under_unknown() {
    let harness = Harness::with(|builder| builder.with_model_prices(prices()));
    harness.run(|| {
        tracing::info_span!("chat", model = "gpt-4o", input_tokens = 1_000_000_u64).in_scope(|| {});
        tracing::info_span!("embeddings", input_tokens = 5_u64).in_scope(|| {});
    });
    let scrape = harness.scrape();
    assert_eq!(tokens(&scrape, "unknown", "gpt-4o", "input"), Some(1e6));
    assert_eq!(cost(&scrape, "unknown", "gpt-4o"), Some(2.5));
    assert_eq!(tokens(&scrape, "unknown", "unknown", "input"), Some(5.0));
    assert_eq!(calls(&scrape, "unknown", "unknown", "success"), Some(1.0));
    assert!(harness.log_lines().is_empty(), "no execution, no line");
}

#[test]
fn models_named_past_the_label_limit_take_one_model_slot_per_label() {
    // 256 models whose names share their first 300 characters, so one label (cut at 256),
    // then a priced model: the execution keeps 256 models apart.
    #[tracing::instrument(name = "agent_execution")]
    fn many_long_models(agent_name: &str, task: &str) {
        let prefix = "m".repeat(300);
        for n in 0..256 {
            let model = format!("{prefix}{n}");
            tracing::info_span!(
                "chat",
                gen_ai.request.model = model.as_str(),
                gen_ai.usage.input_tokens = 1_u64
            )
            .in_scope(|| {});
        }
        tracing::info_span!(
            "chat",
            gen_ai.request.model = "gpt-4o",
            gen_ai.usage.input_tokens = 1000_u64
        )
        .in_scope(|| {});
    }
    let harness = Harness::with(|b| b.with_model_prices(prices()).with_max_model_names(1000));
    harness.run(|| many_long_models("planner", "t"));
    let scrape = harness.scrape();
    let tokens = |model: &str| {
        scrape.value(
            "agent_tokens_total",
            &[("agent_name", "planner"), ("model", model), ("type", "input")],
        )
    };
    let label = format!("{}…", "m".repeat(256));
    assert_eq!(tokens(&label), Some(256.0));
    assert_eq!(tokens("gpt-4o"), Some(1000.0));
    assert_eq!(tokens("__overflow__"), None);
}

#[test]
fn an_agents_own_model_and_its_calls_same_model_are_one_label() {
    // Long enough to be cut, with a key-shaped run that the cut would make look whole: a
    // name scrubbed twice (cut, then scrubbed again) would read differently from once.
    let model = format!("{}-AKIA1234567890ABCDEFGHIJKLMNOP", "m".repeat(235));
    let harness = Harness::new();
    harness.run(|| {
        let agent = tracing::info_span!(
            "agent_execution",
            agent_name = "planner",
            task = "t",
            gen_ai.request.model = model.as_str(),
            gen_ai.usage.input_tokens = 5_u64
        );
        agent.in_scope(|| {
            tracing::info_span!(
                "chat",
                gen_ai.request.model = model.as_str(),
                gen_ai.usage.input_tokens = 7_u64
            )
            .in_scope(|| {});
        });
    });
    let scrape = harness.scrape();
    let labels: std::collections::BTreeSet<&String> = scrape
        .with_name("agent_tokens_total")
        .filter(|sample| sample.labels.get("agent_name").is_some_and(|name| name == "planner"))
        .filter_map(|sample| sample.labels.get("model"))
        .collect();
    let line = agent_line(&harness.log_lines(), "planner").to_owned();
    assert_eq!(labels.len(), 1, "{labels:?}");
    let label = labels.into_iter().next().unwrap();
    assert!(line.contains(&format!(r#""model":"{label}""#)), "{label} in {line}");
    let tokens = [("agent_name", "planner"), ("model", label.as_str()), ("type", "input")];
    assert_eq!(scrape.value("agent_tokens_total", &tokens), Some(12.0));
}
