//! The deploy kit's Grafana, Filebeat and OpenTelemetry Collector files: they parse, they name
//! only what the crate exposes, and the Filebeat settings fit the log lines the main job
//! really writes (run for a few seconds, both line profiles).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use serde_yaml::Value as Yaml;
use support::{example_binary, json_pairs};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &str) -> Yaml {
    serde_yaml::from_str(&read(&deploy(path))).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A setting by its dotted name, written either flat (`setup.template.name: x`) or nested
/// (`setup: {template: {name: x}}`), as Beats and the Collector accept both.
fn lookup<'a>(value: &'a Yaml, path: &str) -> Option<&'a Yaml> {
    let map = value.as_mapping()?;
    if let Some(found) = map.get(path) {
        return Some(found);
    }
    path.match_indices('.')
        .find_map(|(i, _)| map.get(&path[..i]).and_then(|inner| lookup(inner, &path[i + 1..])))
}

fn setting<'a>(value: &'a Yaml, path: &str) -> &'a Yaml {
    lookup(value, path).unwrap_or_else(|| panic!("setting {path} missing"))
}

fn string_list(value: &Yaml) -> Vec<String> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("a list expected, got {value:?}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// Shell-style glob, as Filebeat applies to `paths`: `*` is any run of characters other
/// than `/`, `?` one such character.
fn glob_matches(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len())
                .take_while(|&n| n == 0 || t[n - 1] != '/')
                .any(|n| go(rest, &t[n..])),
            Some(('?', rest)) => t.first().is_some_and(|&c| c != '/') && go(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

#[test]
fn the_glob_matcher_is_a_glob() {
    assert!(glob_matches("/a/*.log", "/a/x.2026-11-25.log"));
    assert!(!glob_matches("/a/*.log", "/a/b/x.log"));
    assert!(!glob_matches("/a/*.log", "/a/x.log.gz"));
    assert!(glob_matches("f-*", "f-2026.11.25"));
    assert!(glob_matches("a?c", "abc"));
}

// ------------------------------------------------------------------------------------------
// Grafana
// ------------------------------------------------------------------------------------------

/// Every series name the crate exposes (README, "What each signal looks like").
const METRICS: [&str; 29] = [
    "agent_executions_total",
    "agent_execution_duration_seconds_bucket",
    "agent_execution_duration_seconds_sum",
    "agent_execution_duration_seconds_count",
    "framework_memory_usage_bytes",
    "framework_info",
    "agent_telemetry_log_lines_dropped_total",
    "agent_telemetry_log_write_errors_total",
    "agent_telemetry_spans_dropped_total",
    "agent_telemetry_spans_export_failed_total",
    "agent_telemetry_agent_names_overflowed_total",
    "agent_telemetry_log_lines_written_total",
    "agent_telemetry_spans_exported_total",
    "agent_telemetry_metrics_connections_refused_total",
    "agent_telemetry_metrics_connections_timed_out_total",
    "agent_telemetry_metrics_requests_malformed_total",
    "agent_telemetry_metrics_requests_unauthorized_total",
    "agent_telemetry_metrics_accept_errors_total",
    "agent_telemetry_metrics_answers_shared_total",
    "agent_telemetry_metrics_requests_coalesced_total",
    "agent_tokens_total",
    "agent_model_calls_total",
    "agent_model_call_duration_seconds_bucket",
    "agent_model_call_duration_seconds_sum",
    "agent_model_call_duration_seconds_count",
    "agent_cost_usd_total",
    "agent_telemetry_unpriced_tokens_total",
    "agent_telemetry_model_names_overflowed_total",
    "agent_telemetry_usage_fields_invalid_total",
];

/// Labels the series carry: the crate's, and what Prometheus adds.
const LABELS: [&str; 11] = [
    "agent_name",
    "status",
    "model",
    "type",
    "le",
    "version",
    "environment",
    "scale",
    "job",
    "instance",
    "project",
];

/// PromQL functions, aggregations and keywords.
const PROMQL: [&str; 44] = [
    "sum",
    "count",
    "min",
    "max",
    "avg",
    "topk",
    "bottomk",
    "quantile",
    "stddev",
    "group",
    "sort",
    "sort_desc",
    "rate",
    "irate",
    "increase",
    "delta",
    "deriv",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
    "abs",
    "vector",
    "scalar",
    "absent",
    "avg_over_time",
    "max_over_time",
    "min_over_time",
    "sum_over_time",
    "count_over_time",
    "label_replace",
    "time",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
];

const DASHBOARDS: [(&str, &str); 4] = [
    ("executive.json", "agent-executive"),
    ("operations.json", "agent-operations"),
    ("quality.json", "agent-quality"),
    ("framework-performance.json", "agent-framework-performance"),
];

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Var(String),
    Str(String),
}

/// The identifiers, `$` variables and string literals of a PromQL expression (numbers and
/// durations such as `0.95`, `5m`, `1e-9` are skipped).
fn promql_tokens(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            let mut text = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                if i < chars.len() {
                    text.push(chars[i]);
                }
                i += 1;
            }
            assert!(i < chars.len(), "unterminated string in {expr}");
            tokens.push(Token::Str(text));
            i += 1;
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || ((chars[i] == '-' || chars[i] == '+') && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
        } else if c == '$' {
            let start = i;
            i += 1;
            while i < chars.len() && (ident(chars[i]) || chars[i] == '{' || chars[i] == '}') {
                i += 1;
            }
            tokens.push(Token::Var(chars[start..i].iter().collect()));
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else {
            i += 1;
        }
    }
    tokens
}

/// What makes an expression acceptable in a panel: known names only, `$__rate_interval` and
/// `$__range` (a panel's own time range, such as "today so far") as the only variables outside
/// label matchers, `$agent_name` only as `agent_name=~"$agent_name"`.
/// Returns what is wrong with it.
fn expr_problem(expr: &str) -> Option<String> {
    let mut names = 0;
    for token in promql_tokens(expr) {
        match token {
            Token::Ident(name) => {
                let known_series =
                    METRICS.contains(&name.as_str()) || support::SHARED_RECORDING_RULES.contains(&name.as_str());
                names += usize::from(known_series);
                if !(known_series
                    || LABELS.contains(&name.as_str())
                    || PROMQL.contains(&name.to_ascii_lowercase().as_str()))
                {
                    return Some(format!("unknown name {name:?}"));
                }
            }
            Token::Var(var) if var != "$__rate_interval" && var != "$__range" => {
                return Some(format!(
                    "{var}: only $__rate_interval and $__range may appear outside a label matcher"
                ));
            }
            Token::Str(text) if text.contains('$') && text != "$agent_name" => {
                return Some(format!("variable in string {text:?}"));
            }
            Token::Var(_) | Token::Str(_) => {}
        }
    }
    if names == 0 {
        return Some("reads no series".into());
    }
    if expr.matches("$agent_name").count() != expr.matches("agent_name=~\"$agent_name\"").count() {
        return Some("$agent_name must be used as agent_name=~\"$agent_name\"".into());
    }
    None
}

#[test]
fn the_expression_check_rejects_what_it_should() {
    let ok = "sum by (le, agent_name) (rate(agent_execution_duration_seconds_bucket{agent_name=~\"$agent_name\",le=~\"10|10.0\"}[$__rate_interval])) * 60 > 1e-9";
    assert_eq!(expr_problem(ok), None);
    let tokens = promql_tokens(ok);
    assert!(tokens.contains(&Token::Var("$__rate_interval".into())));
    assert!(tokens.contains(&Token::Str("$agent_name".into())));
    assert!(!tokens.contains(&Token::Ident("e".into())));
    for bad in [
        "rate(agent_executions_totl[5m])",
        "rate(agent_executions_total[$__interval])",
        "rate(agent_executions_total{agent_name=\"$agent_name\"}[5m])",
        "rate(agent_executions_total{job=~\"$job\"}[5m])",
        "rate(agent_executions_total{agent_name=~\"${agent_name}\"}[5m])",
        "up",
        "vector(1)",
    ] {
        assert!(expr_problem(bad).is_some(), "accepted {bad}");
    }
}

/// All panels, rows' children included.
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut all = Vec::new();
    let mut stack: Vec<Value> = dashboard["panels"].as_array().cloned().unwrap_or_default();
    stack.reverse();
    while let Some(panel) = stack.pop() {
        let mut children = panel["panels"].as_array().cloned().unwrap_or_default();
        children.reverse();
        stack.extend(children);
        all.push(panel);
    }
    all
}

fn dashboard(file: &str) -> Value {
    let path = deploy("grafana/dashboards").join(file);
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn dashboards_are_importable_and_query_only_what_exists() {
    let datasource = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut uids = BTreeSet::new();
    for (file, uid) in DASHBOARDS {
        let d = dashboard(file);
        assert_eq!(d["uid"], uid, "{file}");
        assert!(uids.insert(uid));
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "{file}");
        let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
        assert!((36..=41).contains(&schema), "{file}: schemaVersion {schema}");
        assert!(d["id"].is_null(), "{file}: id must be null to import anywhere");

        // The two variables.
        let vars = d["templating"]["list"].as_array().expect("templating.list");
        let var = |name: &str| {
            vars.iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{file}: variable {name} missing"))
        };
        let ds = var("datasource");
        assert_eq!(ds["type"], "datasource", "{file}");
        assert_eq!(ds["query"], "prometheus", "{file}");
        let agent = var("agent_name");
        assert_eq!(agent["type"], "query", "{file}");
        let query = agent["query"]
            .as_str()
            .or_else(|| agent["query"]["query"].as_str())
            .expect("agent_name query");
        assert_eq!(query, "label_values(agent_executions_total, agent_name)", "{file}");
        assert_eq!(agent["multi"], true, "{file}");
        assert_eq!(agent["includeAll"], true, "{file}");
        assert_eq!(agent["allValue"], ".*", "{file}");
        assert_eq!(agent["datasource"], datasource, "{file}");

        // Panels.
        let panels = panels(&d);
        assert!(!panels.is_empty(), "{file}: no panels");
        let mut ids = BTreeSet::new();
        for panel in &panels {
            let title = panel["title"].as_str().unwrap_or_default();
            let at = format!("{file} / {title}");
            assert!(!title.is_empty(), "{file}: panel without title");
            let id = panel["id"].as_u64().unwrap_or_else(|| panic!("{at}: panel without id"));
            assert!(ids.insert(id), "{at}: duplicate panel id {id}");
            assert_eq!(panel["datasource"], datasource, "{at}");
            let grid = &panel["gridPos"];
            let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
            assert!(x + w <= 24 && grid["h"].as_u64().unwrap() > 0, "{at}: gridPos");
            if panel["type"] == "row" {
                continue;
            }
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{at}: no targets");
            let mut refs = BTreeSet::new();
            for target in targets {
                assert!(
                    refs.insert(target["refId"].as_str().expect("refId")),
                    "{at}: duplicate refId"
                );
                if !target["datasource"].is_null() {
                    assert_eq!(target["datasource"], datasource, "{at}");
                }
                let expr = target["expr"].as_str().expect("expr");
                if let Some(problem) = expr_problem(expr) {
                    panic!("{at}: {problem}: {expr}");
                }
            }
        }
    }
}

#[test]
fn the_framework_performance_dashboard_is_the_guides_with_a_correct_p95() {
    let d = dashboard("framework-performance.json");
    let panels = panels(&d);
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    assert_eq!(
        titles,
        ["Agent Execution Rate", "Agent Response Time (p95)"],
        "the guide's two panels"
    );
    let expr = |i: usize| panels[i]["targets"][0]["expr"].as_str().unwrap().to_owned();
    assert!(expr(0).contains("rate(agent_executions_total"), "{}", expr(0));
    let p95 = expr(1);
    for part in [
        "histogram_quantile(0.95,",
        "sum by (le",
        "rate(agent_execution_duration_seconds_bucket",
        "[5m]",
    ] {
        assert!(p95.contains(part), "{p95} lacks {part}");
    }
    assert_ne!(p95, "histogram_quantile(0.95, agent_execution_duration_seconds_bucket)");
}

/// A cancelled execution did not succeed: a panel that reads failures (a `"failure"` label
/// matcher) reads cancellations too, counted with them (`status=~"failure|cancelled"`) or
/// beside them (a `status="cancelled"` query of its own). Panels split by status show them
/// anyway.
#[test]
fn dashboards_show_cancelled_executions_wherever_they_show_failures() {
    for (file, _) in DASHBOARDS {
        for panel in panels(&dashboard(file)) {
            let strings: Vec<String> = panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|target| target["expr"].as_str())
                .flat_map(promql_tokens)
                .filter_map(|token| match token {
                    Token::Str(text) => Some(text),
                    _ => None,
                })
                .collect();
            if strings.iter().any(|text| text.contains("failure")) {
                assert!(
                    strings.iter().any(|text| text.contains("cancelled")),
                    "{file} / {}: shows failures without cancelled executions",
                    panel["title"]
                );
            }
        }
    }
}

#[test]
fn grafana_provisioning_points_at_the_dashboards() {
    let datasources = yaml("grafana/provisioning/datasources/prometheus.yml");
    let list = setting(&datasources, "datasources").as_sequence().unwrap();
    let prometheus = list
        .iter()
        .find(|d| d["uid"].as_str() == Some("prometheus"))
        .expect("a data source with uid prometheus");
    assert_eq!(prometheus["type"].as_str(), Some("prometheus"));
    assert_eq!(prometheus["url"].as_str(), Some("http://localhost:9090"));

    let dashboards = yaml("grafana/provisioning/dashboards/agent-telemetry.yml");
    let providers = setting(&dashboards, "providers").as_sequence().unwrap();
    assert_eq!(providers.len(), 1);
    let provider = &providers[0];
    assert_eq!(provider["type"].as_str(), Some("file"));
    let path = setting(provider, "options.path").as_str().unwrap();
    assert!(path.starts_with('/'), "absolute path on the Grafana machine");
    // The README says how deploy/grafana/dashboards gets there.
    assert!(
        read(&deploy("README.md")).contains(path),
        "deploy/README.md does not mention {path}"
    );
}

// ------------------------------------------------------------------------------------------
// Filebeat
// ------------------------------------------------------------------------------------------

const FILEBEAT_GUIDE: &str = "filebeat/filebeat.yml";
const FILEBEAT_LEGACY: &str = "filebeat/filebeat-legacy-log-input.yml";
const FILEBEAT_ECS: &str = "filebeat/filebeat-ecs.yml";
const LOG_GLOB: &str = "/var/log/my-name-is-claude/*.log";

fn the_input(config: &Yaml) -> &Yaml {
    let inputs = setting(config, "filebeat.inputs").as_sequence().unwrap();
    assert_eq!(inputs.len(), 1, "one input");
    let input = &inputs[0];
    assert_ne!(input["enabled"].as_bool(), Some(false), "input enabled");
    let paths = string_list(&input["paths"]);
    assert_eq!(paths, [LOG_GLOB], "the guide's path");
    assert!(glob_matches(
        &paths[0],
        "/var/log/my-name-is-claude/my-name-is-claude.2026-11-25.log"
    ));
    input
}

fn ndjson_parser(input: &Yaml) -> &Yaml {
    assert_eq!(input["type"].as_str(), Some("filestream"));
    assert!(
        input["id"].as_str().is_some_and(|id| !id.is_empty()),
        "filestream needs a stable id"
    );
    let parsers = input["parsers"].as_sequence().expect("parsers");
    let ndjson = parsers.iter().find_map(|p| p.get("ndjson")).expect("an ndjson parser");
    assert_eq!(ndjson["target"].as_str(), Some(""), "keys at the root");
    assert_eq!(ndjson["overwrite_keys"].as_bool(), Some(true), "@timestamp honoured");
    assert_eq!(ndjson["add_error_key"].as_bool(), Some(true), "bad lines kept");
    assert!(ndjson["expand_keys"].is_bool(), "expand_keys decided");
    ndjson
}

/// The guide's index, and the template settings a custom index name needs.
fn check_output(path: &str, config: &Yaml) {
    let hosts = string_list(setting(config, "output.elasticsearch.hosts"));
    assert!(hosts.iter().any(|h| h.contains("localhost:9200")), "{path}");
    let index = setting(config, "output.elasticsearch.index").as_str().unwrap();
    assert_eq!(index, "framework-%{+yyyy.MM.dd}", "{path}");
    let name = setting(config, "setup.template.name").as_str().unwrap();
    let pattern = setting(config, "setup.template.pattern").as_str().unwrap();
    assert_eq!(name, "framework", "{path}");
    assert!(glob_matches(pattern, "framework-2026.11.25"), "{path}: {pattern}");
    assert!(!glob_matches(pattern, "filebeat-8.15.0"), "{path}: {pattern}");
    assert_eq!(
        setting(config, "setup.ilm.enabled").as_bool(),
        Some(false),
        "{path}: ILM would ignore the index name"
    );
    assert_ne!(
        lookup(config, "setup.template.enabled").and_then(Yaml::as_bool),
        Some(false),
        "{path}: the template types the fields"
    );
    let fields = append_fields(config);
    assert_eq!(
        fields.get("duration_seconds").map(String::as_str),
        Some("float"),
        "{path}"
    );
    // What an execution used: typed, so that no first value decides (an integer cost_usd
    // would make the field long for the day).
    for (field, kind) in [
        ("model", "keyword"),
        ("input_tokens", "long"),
        ("output_tokens", "long"),
        ("cache_read_tokens", "long"),
        ("cost_usd", "double"),
        ("gen_ai.usage.cost_usd", "double"),
    ] {
        assert_eq!(fields.get(field).map(String::as_str), Some(kind), "{path}: {field}");
    }
    // ECS defines these (recent versions): a field defined twice makes Filebeat refuse the
    // template.
    for ecs in [
        "gen_ai.agent.name",
        "gen_ai.operation.name",
        "gen_ai.request.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
    ] {
        assert!(!fields.contains_key(ecs), "{path}: {ecs} is an ECS field");
    }
}

fn append_fields(config: &Yaml) -> BTreeMap<String, String> {
    setting(config, "setup.template.append_fields")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_owned(),
                f["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn filebeat_configs_read_the_guides_files_into_the_guides_index() {
    let guide = yaml(FILEBEAT_GUIDE);
    ndjson_parser(the_input(&guide));
    check_output(FILEBEAT_GUIDE, &guide);

    let ecs = yaml(FILEBEAT_ECS);
    ndjson_parser(the_input(&ecs));
    check_output(FILEBEAT_ECS, &ecs);
    assert_ne!(
        the_input(&guide)["id"],
        the_input(&ecs)["id"],
        "two configurations, two input ids"
    );

    let legacy = yaml(FILEBEAT_LEGACY);
    let input = the_input(&legacy);
    assert_eq!(input["type"].as_str(), Some("log"));
    for key in ["json.keys_under_root", "json.add_error_key", "json.overwrite_keys"] {
        assert_eq!(setting(input, key).as_bool(), Some(true), "{FILEBEAT_LEGACY}: {key}");
    }
    assert!(setting(input, "json.expand_keys").is_bool());
    check_output(FILEBEAT_LEGACY, &legacy);

    // One template for all three: whichever Filebeat loads it first, it is the same.
    assert_eq!(append_fields(&guide), append_fields(&ecs));
    assert_eq!(append_fields(&guide), append_fields(&legacy));
}

/// The input's processors, by kind.
fn processors<'a>(input: &'a Yaml, kind: &str) -> Vec<&'a Yaml> {
    input["processors"]
        .as_sequence()
        .map(|list| list.iter().filter_map(|p| p.get(kind)).collect())
        .unwrap_or_default()
}

/// Evaluates a processor's `when` (has_fields, not, and, or) on a line's keys: dotted keys
/// as written, which is also what they are after expand_keys.
fn condition_holds(condition: Option<&Yaml>, keys: &BTreeSet<String>) -> bool {
    let Some(condition) = condition else {
        return true;
    };
    let map = condition.as_mapping().expect("a condition");
    map.iter().all(|(kind, arg)| match kind.as_str().unwrap() {
        "has_fields" => string_list(arg).iter().all(|f| keys.contains(f)),
        "not" => !condition_holds(Some(arg), keys),
        "and" => arg
            .as_sequence()
            .unwrap()
            .iter()
            .all(|c| condition_holds(Some(c), keys)),
        "or" => arg
            .as_sequence()
            .unwrap()
            .iter()
            .any(|c| condition_holds(Some(c), keys)),
        other => panic!("condition {other} not understood by this test"),
    })
}

#[test]
fn filebeat_deduplicates_by_span_and_never_fingerprints_nothing() {
    for path in [FILEBEAT_GUIDE, FILEBEAT_LEGACY, FILEBEAT_ECS] {
        let config = yaml(path);
        let input = the_input(&config);
        let fingerprints = processors(input, "fingerprint");
        assert!(!fingerprints.is_empty(), "{path}: no fingerprint");
        for fp in &fingerprints {
            assert_eq!(fp["target_field"].as_str(), Some("@metadata._id"), "{path}");
            // A fingerprint of only missing fields is the same for every line: all but one
            // would be dropped as duplicates. Such a fingerprint needs a condition.
            if fp["ignore_missing"].as_bool() == Some(true) {
                assert!(
                    fp.get("when").is_some(),
                    "{path}: fingerprint with ignore_missing and no condition"
                );
            }
        }
        assert!(
            fingerprints.iter().any(|fp| {
                let fields = string_list(&fp["fields"]);
                fields.contains(&"trace.id".to_owned()) && fields.contains(&"span.id".to_owned())
            }),
            "{path}: no fingerprint of trace.id and span.id"
        );
        if path != FILEBEAT_ECS {
            // The guide's scalar `event` would clash with ECS's `event` object.
            assert!(
                processors(input, "rename").iter().any(|r| {
                    r["fields"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .any(|f| f["from"].as_str() == Some("event") && f["to"].as_str() == Some("event.action"))
                }),
                "{path}: event is not renamed to event.action"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// The lines the crate really writes
// ------------------------------------------------------------------------------------------

/// Runs the main job for 3 s in a temporary directory and returns every line of its log files.
fn run_example(env: &[(&str, &str)]) -> Vec<String> {
    let work = tempfile::tempdir().unwrap();
    let mut command = Command::new(example_binary());
    command
        .args(["--duration", "3", "--rate", "20"])
        .current_dir(work.path())
        .env("AGENT_TELEMETRY_METRICS_ADDR", "127.0.0.1:0")
        .env("OTEL_TRACES_EXPORTER", "none")
        .env("RUST_LOG", "off")
        .env_remove("AGENT_TELEMETRY_LOG_DIR")
        .env_remove("AGENT_TELEMETRY_LOG_FORMAT")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("start the example");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the example did not stop within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "the example failed: {status}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(work.path().join("logs"))
        .expect("logs/ written")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no log file");
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            glob_matches(LOG_GLOB, &format!("/var/log/my-name-is-claude/{name}")),
            "{name} is not matched by {LOG_GLOB}"
        );
    }
    let lines: Vec<String> = files
        .iter()
        .flat_map(|f| read(f).lines().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert!(lines.len() >= 10, "only {} lines in 3 s at 20/s", lines.len());
    lines
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`: RFC 3339, UTC, milliseconds.
fn check_timestamp(line: &str, value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("@timestamp not a string: {line}"));
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> u32 {
        assert!(b[range.clone()].iter().all(u8::is_ascii_digit), "@timestamp {text}");
        text[range].parse().unwrap()
    };
    assert_eq!(b.len(), 24, "@timestamp {text}: milliseconds and Z expected");
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ] {
        assert_eq!(b[i], c, "@timestamp {text}");
    }
    digits(0..4);
    assert!((1..=12).contains(&digits(5..7)), "@timestamp {text}");
    assert!((1..=31).contains(&digits(8..10)), "@timestamp {text}");
    assert!(digits(11..13) < 24, "@timestamp {text}");
    assert!(digits(14..16) < 60, "@timestamp {text}");
    assert!(digits(17..19) < 61, "@timestamp {text}");
    digits(20..23);
}

/// The raw text of a number value in the line, to see how it was written.
fn raw_number<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} missing: {line}"))
        + key.len()
        + 3;
    let rest = &line[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    &rest[..end]
}

/// What any line must be for the ndjson parser (target "", overwrite_keys, expand_keys) and
/// the index: one JSON object, unique keys, Filebeat's keys left alone, no key both a value
/// and the prefix of another (expand_keys would fail on it), a usable @timestamp.
fn check_line_for_filebeat(line: &str) -> BTreeMap<String, Value> {
    let pairs = json_pairs(line);
    let mut fields = BTreeMap::new();
    for (key, value) in pairs {
        assert!(
            fields.insert(key.clone(), value).is_none(),
            "duplicate key {key}: {line}"
        );
    }
    for owned in ["@metadata", "type", "agent", "ecs", "host", "input"] {
        assert!(!fields.contains_key(owned), "{owned} is Filebeat's: {line}");
    }
    for object in ["log", "error"] {
        assert!(
            !matches!(fields.get(object), Some(value) if !value.is_object()),
            "scalar {object} clashes with Filebeat's {object}.*: {line}"
        );
    }
    for key in fields.keys() {
        assert!(
            !key.starts_with("agent.") && !key.starts_with("input.") && !key.starts_with("host."),
            "{key} is Filebeat's: {line}"
        );
        for other in fields.keys() {
            assert!(
                !other.starts_with(&format!("{key}.")),
                "{key} and {other}: expand_keys cannot make {key} both a value and an object: {line}"
            );
        }
    }
    check_timestamp(line, fields.get("@timestamp").expect("@timestamp"));
    fields
}

/// What an execution used, in the guide's line: after `status`, in this order, each only
/// when present.
const GUIDE_USAGE_KEYS: [&str; 5] = [
    "model",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cost_usd",
];

/// The same in the ECS profile.
const ECS_USAGE_KEYS: [&str; 5] = [
    "gen_ai.request.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cost_usd",
];

/// The usage fields `keys` (model, input, output, cache reads, cost) of a line, where
/// present, have the JSON types the template maps them to: the model a string, token counts
/// non-negative integers with the cache reads part of input, the cost a non-negative number.
/// With `after`, they follow that key in the order of `keys`.
fn check_usage_fields(line: &str, keys: [&str; 5], after: Option<&str>) {
    let pairs = json_pairs(line);
    let fields: BTreeMap<&str, &Value> = pairs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    if let Some(model) = fields.get(keys[0]) {
        assert!(model.as_str().is_some_and(|m| !m.is_empty()), "{}: {line}", keys[0]);
    }
    for key in &keys[1..4] {
        if let Some(count) = fields.get(key) {
            assert!(count.is_u64(), "{key} is not a non-negative integer: {line}");
        }
    }
    if let (Some(input), Some(cached)) = (
        fields.get(keys[1]).and_then(|v| v.as_u64()),
        fields.get(keys[3]).and_then(|v| v.as_u64()),
    ) {
        assert!(cached <= input, "cache reads are part of input: {line}");
    }
    if let Some(cost) = fields.get(keys[4]) {
        assert!(
            cost.as_f64().is_some_and(|c| c.is_finite() && c >= 0.0),
            "{} is not a non-negative number: {line}",
            keys[4]
        );
    }
    let positions: Vec<usize> = keys
        .iter()
        .filter_map(|key| pairs.iter().position(|(k, _)| k == key))
        .collect();
    if let Some(after) = after {
        let at = pairs
            .iter()
            .position(|(k, _)| k == after)
            .unwrap_or_else(|| panic!("{after} missing: {line}"));
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]) && positions.iter().all(|&p| p > at),
            "{keys:?} must follow {after}, in that order: {line}"
        );
    }
}

#[test]
fn the_usage_field_check_rejects_what_it_should() {
    let guide = |usage: &str| {
        format!(
            r#"{{"@timestamp":"2026-11-25T22:18:12.647Z","event":"agent_execution","agent_name":"a","task":"t","duration_seconds":0.5,"status":"success"{usage},"service.name":"s"}}"#
        )
    };
    let ok = r#","model":"m","input_tokens":1834,"output_tokens":412,"cache_read_tokens":1024,"cost_usd":0.011682"#;
    check_usage_fields(&guide(ok), GUIDE_USAGE_KEYS, Some("status"));
    check_usage_fields(&guide(""), GUIDE_USAGE_KEYS, Some("status"));
    let ecs = r#"{"@timestamp":"2026-11-25T22:18:12.647Z","gen_ai.request.model":"m","gen_ai.usage.input_tokens":10,"gen_ai.usage.cache_read.input_tokens":10,"gen_ai.usage.cost_usd":0}"#;
    check_usage_fields(ecs, ECS_USAGE_KEYS, None);
    for bad in [
        r#","model":"","input_tokens":1"#,
        r#","input_tokens":"1834""#,
        r#","input_tokens":-1"#,
        r#","output_tokens":4.5"#,
        r#","input_tokens":10,"cache_read_tokens":11"#,
        r#","cost_usd":"0.01""#,
        r#","cost_usd":-0.01"#,
        r#","output_tokens":1,"input_tokens":1"#,
    ] {
        let line = guide(bad);
        let rejected = std::panic::catch_unwind(|| check_usage_fields(&line, GUIDE_USAGE_KEYS, Some("status")));
        assert!(rejected.is_err(), "accepted {line}");
    }
    // Before status.
    let early = guide("").replace(r#""status":"success""#, r#""model":"m","status":"success""#);
    assert!(std::panic::catch_unwind(|| check_usage_fields(&early, GUIDE_USAGE_KEYS, Some("status"))).is_err());
}

/// The fingerprint that applies to a line under a configuration, and its value's inputs.
fn fingerprint_key(path: &str, input: &Yaml, line: &str, fields: &BTreeMap<String, Value>) -> String {
    let keys: BTreeSet<String> = fields.keys().cloned().collect();
    let applying: Vec<&Yaml> = processors(input, "fingerprint")
        .into_iter()
        .filter(|fp| condition_holds(fp.get("when"), &keys))
        .collect();
    assert_eq!(
        applying.len(),
        1,
        "{path}: {} fingerprints apply to {line}",
        applying.len()
    );
    let used = string_list(&applying[0]["fields"]);
    for field in &used {
        assert!(
            fields.contains_key(field),
            "{path}: fingerprint field {field} missing: {line}"
        );
    }
    used.iter()
        .map(|f| format!("{f}={}", fields[f]))
        .collect::<Vec<_>>()
        .join("|")
}

#[test]
fn the_guide_lines_fit_the_filebeat_settings() {
    // Traces off (no ids in the lines) and on (console exporter, stdout discarded), at once.
    let with_traces = std::thread::spawn(|| run_example(&[("OTEL_TRACES_EXPORTER", "console")]));
    let without = run_example(&[]);
    let with = with_traces.join().expect("run with traces");

    for (path, config) in [
        (FILEBEAT_GUIDE, yaml(FILEBEAT_GUIDE)),
        (FILEBEAT_LEGACY, yaml(FILEBEAT_LEGACY)),
    ] {
        let input = the_input(&config);
        for (lines, traced) in [(&without, false), (&with, true)] {
            let mut ids = BTreeSet::new();
            for line in lines {
                let fields = check_line_for_filebeat(line);
                assert!(line.starts_with("{\"@timestamp\":"), "{line}");
                // The guide's six fields, with stable types.
                assert_eq!(fields["event"], "agent_execution", "{line}");
                assert!(
                    !fields.contains_key("event.action"),
                    "the rename's target exists: {line}"
                );
                assert!(fields["agent_name"].is_string(), "{line}");
                assert!(fields["task"].is_string(), "{line}");
                assert!(fields["timestamp"].is_string(), "{line}");
                let status = fields["status"].as_str().expect("status is a string");
                let level = match status {
                    "success" => "INFO",
                    "failure" => "ERROR",
                    "cancelled" => "WARN",
                    other => panic!("status {other:?}: {line}"),
                };
                assert_eq!(fields["log.level"], level, "{line}");
                assert_eq!(
                    status != "success",
                    fields.contains_key("error.type") && fields.contains_key("error.message"),
                    "{line}"
                );
                assert!(fields["duration_seconds"].is_f64(), "{line}");
                let raw = raw_number(line, "duration_seconds");
                assert!(
                    raw.contains(['.', 'e', 'E']),
                    "duration_seconds {raw} is not written as a float: {line}"
                );
                assert_eq!(
                    fields.contains_key("trace.id") && fields.contains_key("span.id"),
                    traced,
                    "{line}"
                );
                check_usage_fields(line, GUIDE_USAGE_KEYS, Some("status"));
                for ecs_key in ECS_USAGE_KEYS {
                    assert!(!fields.contains_key(ecs_key), "{ecs_key} in the guide's line: {line}");
                }
                // Deduplication never merges two executions.
                let id = fingerprint_key(path, input, line, &fields);
                assert!(ids.insert(id.clone()), "{path}: two lines with _id of {id}");
            }
        }
    }
}

/// The crate's ECS profile, as the example writes it with traces on or off.
fn ecs_lines(traces: &str) -> Vec<String> {
    let lines = run_example(&[("AGENT_TELEMETRY_LOG_FORMAT", "ecs"), ("OTEL_TRACES_EXPORTER", traces)]);
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("{\"@timestamp\"") && l.contains("\"event.action\"")),
        "the example does not write the ECS profile: {}",
        lines[0]
    );
    lines
}

#[test]
fn the_ecs_lines_fit_the_filebeat_ecs_settings() {
    let with_traces = std::thread::spawn(|| ecs_lines("console"));
    let without = ecs_lines("none");
    let with = with_traces.join().expect("run with traces");
    let config = yaml(FILEBEAT_ECS);
    let input = the_input(&config);
    for (lines, traced) in [(&without, false), (&with, true)] {
        let mut ids = BTreeSet::new();
        for line in lines {
            check_ecs_line(line, traced);
            let fields = check_line_for_filebeat(line);
            let id = fingerprint_key(FILEBEAT_ECS, input, line, &fields);
            assert!(ids.insert(id.clone()), "two lines with _id of {id}");
        }
    }
}

/// The ECS profile's keys and types, as Filebeat's ECS template maps them.
fn check_ecs_line(line: &str, traced: bool) {
    let fields = check_line_for_filebeat(line);
    assert_eq!(fields["event.action"], "agent_execution", "{line}");
    assert_eq!(fields["event.kind"], "event", "{line}");
    let outcome = fields["event.outcome"].as_str().expect("event.outcome");
    assert!(matches!(outcome, "success" | "failure"), "{line}");
    assert!(
        fields["event.duration"].is_u64(),
        "event.duration is integer nanoseconds: {line}"
    );
    let level = fields["log.level"].as_str().expect("log.level");
    // A cancelled execution did not succeed: outcome failure, level warn.
    assert!(matches!(level, "info" | "error" | "warn"), "{line}");
    assert_eq!(outcome == "failure", level != "info", "{line}");
    assert_eq!(
        outcome == "failure",
        fields.contains_key("error.type") && fields.contains_key("error.message"),
        "{line}"
    );
    assert!(fields["message"].is_string(), "{line}");
    assert!(fields["gen_ai.agent.name"].is_string(), "{line}");
    assert_eq!(fields["gen_ai.operation.name"], "invoke_agent", "{line}");
    assert!(fields["agent_execution.task"].is_string(), "{line}");
    assert!(fields["service.name"].is_string(), "{line}");
    assert_eq!(
        fields.contains_key("trace.id") && fields.contains_key("span.id"),
        traced,
        "{line}"
    );
    for guide_key in ["event", "duration_seconds", "agent_name", "status"]
        .into_iter()
        .chain(GUIDE_USAGE_KEYS)
    {
        assert!(!fields.contains_key(guide_key), "{guide_key} in ECS: {line}");
    }
    check_usage_fields(line, ECS_USAGE_KEYS, None);
}

// ------------------------------------------------------------------------------------------
// OpenTelemetry Collector
// ------------------------------------------------------------------------------------------

#[test]
fn collector_pipelines_limit_memory_first_batch_last_and_use_defined_components() {
    let config = yaml("otel-collector/config.yaml");
    let pipelines = setting(&config, "service.pipelines")
        .as_mapping()
        .expect("service.pipelines");
    let kinds: BTreeSet<&str> = pipelines
        .keys()
        .map(|k| k.as_str().unwrap().split('/').next().unwrap())
        .collect();
    assert!(kinds.contains("traces") && kinds.contains("metrics"), "{kinds:?}");
    let kind = |id: &str| id.split('/').next().unwrap().to_owned();
    for (name, pipeline) in pipelines {
        let name = name.as_str().unwrap();
        for section in ["receivers", "processors", "exporters"] {
            let ids = string_list(&pipeline[section]);
            assert!(!ids.is_empty(), "{name}: no {section}");
            for id in &ids {
                assert!(
                    config[section].get(id.as_str()).is_some(),
                    "{name}: {section} {id} is not defined"
                );
            }
            if section == "processors" {
                assert_eq!(kind(&ids[0]), "memory_limiter", "{name}: memory_limiter first");
                assert_eq!(kind(ids.last().unwrap()), "batch", "{name}: batch last");
            }
        }
    }
    for id in string_list(setting(&config, "service.extensions")) {
        assert!(
            config["extensions"].get(id.as_str()).is_some(),
            "extension {id} is not defined"
        );
    }
    let traces = string_list(&config["service"]["pipelines"]["traces"]["exporters"]);
    assert!(
        traces.iter().any(|e| kind(e).starts_with("otlp")),
        "traces leave over OTLP: {traces:?}"
    );
    let metrics = string_list(&config["service"]["pipelines"]["metrics"]["exporters"]);
    assert!(
        metrics.iter().any(|e| kind(e) == "prometheusremotewrite"),
        "{metrics:?}"
    );
    // The ports the crate sends to.
    let otlp = &config["receivers"]["otlp"]["protocols"];
    assert!(otlp["grpc"]["endpoint"].as_str().is_some_and(|e| e.ends_with(":4317")));
    assert!(otlp["http"]["endpoint"].as_str().is_some_and(|e| e.ends_with(":4318")));
}

// ------------------------------------------------------------------------------------------
// README
// ------------------------------------------------------------------------------------------

#[test]
fn the_deploy_readme_names_every_file_of_the_kit() {
    let readme = read(&deploy("README.md"));
    for dir in ["grafana", "filebeat", "otel-collector"] {
        let mut stack = vec![deploy(dir)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let relative = path.strip_prefix(deploy("")).unwrap().to_string_lossy().into_owned();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    readme.contains(&relative) || readme.contains(&name),
                    "deploy/README.md does not mention {relative}"
                );
            }
        }
    }
}
