//! The log file's bytes, parsed line by line: fields, types, key order, no duplicate keys,
//! trace correlation, whole lines.

mod support;

use support::{json_pairs, Harness};

#[tracing::instrument(name = "agent_execution", err)]
fn execute_agent(agent_name: &str, task: &str, fail: bool) -> Result<(), String> {
    if fail {
        Err("boom".into())
    } else {
        Ok(())
    }
}

const KEYS: [&str; 11] = support::LOG_LINE_KEYS;

#[test]
fn one_line_per_execution_in_the_contract_shape() {
    let harness = Harness::new();
    harness.run(|| {
        execute_agent("backend-engineer", "Implement API", false).unwrap();
        execute_agent("qa-engineer", "Test API", true).unwrap_err();
    });
    let spans = harness.spans();
    let lines = harness.log_lines();
    assert_eq!(lines.len(), 2);

    let success = json_pairs(&lines[0]);
    let keys: Vec<&str> = success.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, KEYS, "key order and no duplicates");
    let value = |pairs: &[(String, serde_json::Value)], key: &str| {
        pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap()
    };
    assert_eq!(value(&success, "event"), "agent_execution");
    assert_eq!(value(&success, "agent_name"), "backend-engineer");
    assert_eq!(value(&success, "task"), "Implement API");
    assert_eq!(value(&success, "status"), "success");
    assert_eq!(value(&success, "log.level"), "INFO");
    assert_eq!(value(&success, "service.name"), "test-service");
    assert!(value(&success, "duration_seconds").is_f64());
    assert!(lines[0].contains(r#""duration_seconds":"#) && !lines[0].contains(r#""duration_seconds":0,"#));

    let failure = json_pairs(&lines[1]);
    let keys: Vec<&str> = failure.iter().map(|(k, _)| k.as_str()).collect();
    let mut expected: Vec<&str> = KEYS[..8].to_vec();
    expected.extend(["error.type", "error.message"]);
    expected.extend(&KEYS[8..11]);
    assert_eq!(keys, expected);
    assert_eq!(value(&failure, "status"), "failure");
    assert_eq!(value(&failure, "log.level"), "ERROR");
    assert_eq!(value(&failure, "error.message"), "boom");

    // Each line names its own exported span.
    for (line, name) in [(&success, "backend-engineer"), (&failure, "qa-engineer")] {
        let span = support::agent_span(&spans, name);
        assert_eq!(value(line, "trace.id"), span.span_context.trace_id().to_string());
        assert_eq!(value(line, "span.id"), span.span_context.span_id().to_string());
    }
}

#[test]
fn timestamps_are_utc_rfc3339_with_z() {
    let harness = Harness::new();
    let before = std::time::SystemTime::now();
    harness.run(|| execute_agent("a", "t", false).unwrap());
    let lines = harness.log_lines();
    let pairs = json_pairs(&lines[0]);
    let at = pairs[0].1.as_str().unwrap().to_owned();
    let precise = pairs[1].1.as_str().unwrap().to_owned();
    assert_eq!(at.len(), "2026-11-24T10:15:30.123Z".len(), "{at}");
    assert_eq!(precise.len(), "2026-11-24T10:15:30.123456Z".len(), "{precise}");
    assert!(at.ends_with('Z') && precise.starts_with(&at[..23]), "{at} {precise}");
    let parsed = time::OffsetDateTime::parse(&precise, &time::format_description::well_known::Rfc3339).unwrap();
    let elapsed = (time::OffsetDateTime::from(before) - parsed).abs();
    assert!(
        elapsed < time::Duration::seconds(5),
        "the line's time is now: {precise}"
    );
}

#[test]
fn hostile_text_stays_one_bounded_json_line() {
    let harness = Harness::with(|b| b.with_max_task_chars(50));
    let long = "ü".repeat(10_000);
    let nasty = "line\nbreak \"quote\" back\\slash \u{0} nul \u{1b}[31m esc \\u0041 not-an-escape";
    harness.run(|| {
        execute_agent(nasty, &long, false).unwrap();
        execute_agent("a", nasty, false).unwrap();
    });
    let text = support::read_log_text(harness.dir.path());
    let lines = harness.log_lines();
    assert_eq!(lines.len(), 2, "control characters never split a line:\n{text}");
    let first = json_pairs(&lines[0]);
    assert_eq!(first[4].1, nasty, "agent_name round-trips");
    let task = first[5].1.as_str().unwrap();
    assert_eq!(task.chars().count(), 51, "50 characters and an ellipsis");
    assert!(task.ends_with('…') && task.starts_with("üü"));
    assert!(lines[0].len() < 1_000, "bounded: {} bytes", lines[0].len());
    let cut: String = nasty.chars().take(50).collect();
    assert_eq!(json_pairs(&lines[1])[5].1, format!("{cut}…"));
}

/// Today's log file name with the default prefix, as Filebeat's glob expects it (UTC).
fn todays_file_name() -> String {
    let today = time::OffsetDateTime::now_utc().date();
    format!(
        "agents.{:04}-{:02}-{:02}.log",
        today.year(),
        u8::from(today.month()),
        today.day()
    )
}

#[test]
fn daily_file_name_matches_filebeats_glob() {
    let harness = Harness::new();
    harness.run(|| execute_agent("a", "t", false).unwrap());
    harness.log_lines();
    let file = support::log_file(harness.dir.path());
    let name = file.file_name().unwrap().to_str().unwrap();
    assert_eq!(name, todays_file_name());
}

#[test]
fn shutdown_leaves_only_whole_lines_and_loses_nothing() {
    let mut harness = Harness::new();
    harness.run(|| (0..2_000).for_each(|i| execute_agent("a", &format!("task {i}"), false).unwrap()));
    let (spans, text) = harness.shutdown();
    assert!(text.ends_with('\n'), "the file ends with a complete line");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2_000);
    assert_eq!(spans.len(), 2_000);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(json_pairs(line)[5].1, format!("task {i}"), "in order, none lost");
    }
}

#[test]
fn an_unwritable_log_dir_is_an_error_that_names_the_setting() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let result = agent_telemetry::AgentTelemetry::builder()
        .ignore_environment()
        .without_metrics_server()
        .with_traces_exporter(agent_telemetry::TracesExporter::None)
        .with_log_dir(file.path().join("logs"))
        .build::<tracing_subscriber::Registry>();
    let Err(error) = result else {
        panic!("a log dir under a file cannot be created")
    };
    assert!(error.to_string().contains("AGENT_TELEMETRY_LOG_DIR"), "{error}");
}

#[test]
fn a_line_cut_short_by_an_earlier_writer_never_swallows_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let name = todays_file_name();
    // A process killed mid-write, or stopped while the disk was full, leaves this behind.
    let cut = r#"{"@timestamp":"2026-12-07T10:00:00.000Z","task":"cut off by a full disk"#;
    std::fs::write(dir.path().join(&name), cut).unwrap();
    let harness = Harness::with(|b| b.with_log_dir(dir.path()));
    harness.run(|| execute_agent("survivor", "after the restart", false).unwrap());
    harness.telemetry().flush().unwrap();
    let lines = support::read_log_lines(dir.path());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], cut);
    let survivor: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(survivor["agent_name"], "survivor", "{}", lines[1]);
}

#[test]
fn two_writers_that_open_a_file_ending_mid_line_end_it_once() {
    let first = Harness::new();
    let dir = first.dir.path().to_owned();
    first.run(|| execute_agent("earlier-run", "t", false).unwrap());
    first.telemetry().flush().unwrap();
    let path = support::log_file(&dir);
    // Cut short, as a process killed mid-write leaves it.
    let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut file, br#"{"cut"#).unwrap();
    // Two processes (here, instances) open it before either writes.
    let open = |dir: std::path::PathBuf| Harness::with(move |builder| builder.with_log_dir(dir));
    let (a, b) = (open(dir.clone()), open(dir.clone()));
    a.run(|| execute_agent("process-a", "t", false).unwrap());
    a.telemetry().flush().unwrap();
    b.run(|| execute_agent("process-b", "t", false).unwrap());
    b.telemetry().flush().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines.iter().all(|line| !line.is_empty()), "{text}");
    assert_eq!(lines[1], r#"{"cut"#);
}
