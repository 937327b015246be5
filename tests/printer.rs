//! The formatter `try_init` installs prints the events `RUST_LOG` selects to stderr: a
//! failing agent's `ERROR` line, with its span's fields. It scrubs them as every signal is
//! scrubbed. The test runs itself again as a child, which installs the global subscriber, and
//! reads the child's stderr.

use std::process::Command;

const CHILD: &str = "AGENT_TELEMETRY_TEST_PRINTER_CHILD";
const TASK: &str = r#"use password="hunter2 quoted" and key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"#;

#[tracing::instrument(name = "agent_execution", err)]
fn execute_agent(agent_name: &str, task: &str, api_key: &str) -> Result<(), String> {
    Err(format!("could not {task}"))
}

#[test]
fn the_stderr_printer_prints_a_failing_agent_scrubbed() {
    if std::env::var_os(CHILD).is_some() {
        let telemetry = agent_telemetry::AgentTelemetry::builder()
            .ignore_environment()
            .without_metrics_server()
            .with_traces_exporter(agent_telemetry::TracesExporter::None)
            .with_log_writer(std::io::sink())
            .try_init()
            .unwrap();
        execute_agent("leaky", TASK, "k-123").unwrap_err();
        telemetry.shutdown().unwrap();
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_stderr_printer_prints_a_failing_agent_scrubbed",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ERROR") && stderr.contains("leaky"),
        "the failure is printed: {stderr}"
    );
    for secret in ["hunter2", "sk-proj-", "k-123"] {
        assert!(!stderr.contains(secret), "{secret} printed: {stderr}");
    }
}
