//! `/metrics` fetched over HTTP and parsed: the guide's families, labels, buckets and counts.

mod support;

use std::time::Duration;

use agent_telemetry::{AgentTelemetry, Error, OVERFLOW_AGENT_NAME};
use support::{http, Harness};

#[tracing::instrument(name = "agent_execution", err)]
fn execute_agent(agent_name: &str, task: &str, sleep_ms: u64, fail: bool) -> Result<(), String> {
    std::thread::sleep(Duration::from_millis(sleep_ms));
    if fail {
        Err(format!("{agent_name} could not {task}"))
    } else {
        Ok(())
    }
}

const BUCKETS: [&str; 9] = ["0.1", "0.5", "1", "2", "5", "10", "30", "60", "+Inf"];

#[test]
fn known_workload_gives_exact_families_labels_and_buckets() {
    let harness = Harness::new();
    harness.run(|| {
        for _ in 0..3 {
            execute_agent("backend-engineer", "Implement API", 0, false).unwrap();
        }
        execute_agent("backend-engineer", "Deploy", 0, true).unwrap_err();
        execute_agent("qa-engineer", "Test API", 150, false).unwrap();
        execute_agent("qa-engineer", "Regression", 600, false).unwrap();
    });
    let scrape = harness.scrape();

    let count = |agent, status| scrape.value("agent_executions_total", &[("agent_name", agent), ("status", status)]);
    assert_eq!(count("backend-engineer", "success"), Some(3.0));
    assert_eq!(count("backend-engineer", "failure"), Some(1.0));
    assert_eq!(count("qa-engineer", "success"), Some(2.0));
    assert_eq!(
        count("qa-engineer", "failure"),
        None,
        "no failure series without a failure"
    );
    assert_eq!(scrape.with_name("agent_executions_total").count(), 3);

    // Cumulative buckets: backend 4 fast ones; qa one in (0.1, 0.5] and one in (0.5, 1].
    let bucket = |agent, le| {
        scrape.value(
            "agent_execution_duration_seconds_bucket",
            &[("agent_name", agent), ("le", le)],
        )
    };
    let backend: Vec<_> = BUCKETS.iter().map(|le| bucket("backend-engineer", le)).collect();
    assert_eq!(backend, vec![Some(4.0); 9]);
    let qa: Vec<_> = BUCKETS.iter().map(|le| bucket("qa-engineer", le)).collect();
    let expected = [0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0].map(Some);
    assert_eq!(qa, expected);
    let qa_sum = scrape
        .value("agent_execution_duration_seconds_sum", &[("agent_name", "qa-engineer")])
        .unwrap();
    assert!((0.75..5.0).contains(&qa_sum), "sum of 150 ms + 600 ms sleeps: {qa_sum}");
    assert_eq!(
        scrape.value(
            "agent_execution_duration_seconds_count",
            &[("agent_name", "qa-engineer")]
        ),
        Some(2.0)
    );

    let memory = scrape
        .value("framework_memory_usage_bytes", &[])
        .expect("memory gauge without labels");
    assert!(memory > 1_000_000.0, "resident set size of a test process: {memory}");
    let version = env!("CARGO_PKG_VERSION");
    let info = [
        ("environment", "production"),
        ("scale", "enterprise"),
        ("version", version),
    ];
    assert_eq!(scrape.value("framework_info", &info), Some(1.0));
}

#[test]
fn exposition_has_the_guides_names_types_and_help_only() {
    let harness = Harness::new();
    harness.run(|| execute_agent("a", "t", 0, false).unwrap());
    let scrape = harness.scrape();
    let expected = [
        ("agent_executions_total", "counter", "Total agent executions"),
        (
            "agent_execution_duration_seconds",
            "histogram",
            "Agent execution duration",
        ),
        (
            "framework_memory_usage_bytes",
            "gauge",
            "Framework memory usage in bytes",
        ),
        ("framework_info", "gauge", "Framework version and configuration"),
    ];
    for (name, kind, help) in expected {
        assert_eq!(scrape.types.get(name).map(String::as_str), Some(kind), "{name}");
        assert_eq!(scrape.help.get(name).map(String::as_str), Some(help), "{name}");
    }
    let families: Vec<&String> = scrape
        .types
        .keys()
        .filter(|n| !n.starts_with("agent_telemetry_"))
        .collect();
    assert_eq!(
        families.len(),
        4,
        "only the guide's families besides self-metrics: {families:?}"
    );
    assert!(!scrape.text.contains("otel_scope"), "no scope labels:\n{}", scrape.text);
    assert!(!scrape.text.contains("target_info"), "no target_info:\n{}", scrape.text);
    for self_metric in [
        "agent_telemetry_log_lines_dropped_total",
        "agent_telemetry_spans_dropped_total",
        "agent_telemetry_spans_export_failed_total",
        "agent_telemetry_agent_names_overflowed_total",
    ] {
        assert_eq!(
            scrape.value(self_metric, &[]),
            Some(0.0),
            "{self_metric} is exposed and zero"
        );
    }
}

#[test]
fn configured_buckets_and_info_labels_are_used() {
    let harness = Harness::with(|b| {
        b.with_duration_buckets(vec![0.25, 4.0])
            .with_environment("staging")
            .with_scale("team")
            .with_service_version("3.3.0")
    });
    harness.run(|| execute_agent("a", "t", 0, false).unwrap());
    let scrape = harness.scrape();
    let les: Vec<&str> = scrape
        .with_name("agent_execution_duration_seconds_bucket")
        .map(|s| s.labels["le"].as_str())
        .collect();
    assert_eq!(les, ["0.25", "4", "+Inf"]);
    let info = [("environment", "staging"), ("scale", "team"), ("version", "3.3.0")];
    assert_eq!(scrape.value("framework_info", &info), Some(1.0));
}

#[test]
fn agent_names_beyond_the_cap_are_folded_and_counted() {
    let harness = Harness::with(|b| b.with_max_agent_names(2));
    harness.run(|| {
        for name in ["a", "b", "c", "d", "a", "c"] {
            execute_agent(name, "t", 0, false).unwrap();
        }
    });
    let scrape = harness.scrape();
    let success = |agent| {
        scrape.value(
            "agent_executions_total",
            &[("agent_name", agent), ("status", "success")],
        )
    };
    assert_eq!((success("a"), success("b")), (Some(2.0), Some(1.0)));
    assert_eq!(success(OVERFLOW_AGENT_NAME), Some(3.0));
    assert_eq!(success("c"), None);
    assert_eq!(
        scrape.value("agent_telemetry_agent_names_overflowed_total", &[]),
        Some(3.0)
    );
    // The log lines keep the real names: logs have no cardinality limit.
    let names: Vec<String> = harness
        .log_lines()
        .iter()
        .map(|l| support::json_pairs(l)[4].1.to_string())
        .collect();
    assert_eq!(names, ["\"a\"", "\"b\"", "\"c\"", "\"d\"", "\"a\"", "\"c\""]);
}

#[test]
fn spans_and_events_that_are_not_agent_executions_produce_nothing() {
    let harness = Harness::new();
    harness.run(|| {
        tracing::info_span!("http_request", agent_name = "x").in_scope(|| {
            tracing::info!("hello");
            tracing::error!("an error outside any agent");
        });
    });
    assert_eq!(harness.scrape().with_name("agent_executions_total").count(), 0);
    assert!(harness.log_lines().is_empty());
}

#[test]
fn only_get_metrics_is_served() {
    let harness = Harness::new();
    let addr = harness.telemetry().metrics_addr().unwrap();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0, "the bound port is reported, not 0");
    assert_eq!(http(addr, "POST", "/metrics").0, 405);
    assert_eq!(http(addr, "GET", "/").0, 404);
    assert_eq!(http(addr, "GET", "/metrics?x=1").0, 200);
    // The same text is available without HTTP.
    let text = harness.telemetry().metrics().render().unwrap();
    assert!(text.contains("# TYPE framework_info gauge"));
}

#[test]
fn a_port_in_use_is_an_error_that_names_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let result = AgentTelemetry::builder()
        .ignore_environment()
        .with_metrics_addr(addr)
        .with_traces_exporter(agent_telemetry::TracesExporter::None)
        .build::<tracing_subscriber::Registry>();
    let Err(error) = result else {
        panic!("the port is taken, yet the build succeeded")
    };
    assert!(matches!(error, Error::MetricsBind { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("AGENT_TELEMETRY_METRICS_ADDR") && message.contains(&addr.to_string()),
        "{message}"
    );
    assert!(
        std::error::Error::source(&error).is_some(),
        "the io error is kept as the source"
    );
}

#[test]
fn promtool_accepts_the_scrape() {
    let harness = Harness::new();
    harness.run(|| {
        execute_agent("backend-engineer", "Implement API", 0, false).unwrap();
        execute_agent("backend-engineer", "Deploy", 0, true).unwrap_err();
    });
    let scrape = harness.scrape();
    if let Some((clean, report)) = support::promtool_check_metrics(&scrape.text) {
        assert!(clean, "promtool check metrics:\n{report}\n{}", scrape.text);
    }
}

#[test]
fn an_agent_name_flood_is_folded_and_stays_bounded() {
    let harness = Harness::with(|b| {
        b.with_max_agent_names(50)
            .with_traces_exporter(agent_telemetry::TracesExporter::None)
    });
    harness.run(|| {
        for i in 0..20_000 {
            tracing::info_span!("agent_execution", agent_name = format!("generated-{i}").as_str()).in_scope(|| {});
        }
    });
    let scrape = harness.scrape();
    assert_eq!(
        scrape.with_name("agent_executions_total").count(),
        51,
        "50 names and the overflow series"
    );
    assert_eq!(scrape.with_name("agent_execution_duration_seconds_count").count(), 51);
    assert_eq!(
        scrape.value("agent_telemetry_agent_names_overflowed_total", &[]),
        Some(19_950.0)
    );
    assert_eq!(scrape.sum("agent_executions_total"), 20_000.0, "folded, not lost");
}
