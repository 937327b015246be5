//! The Prometheus and Alertmanager files of `deploy/`, checked with the real tools: promtool
//! (every config, every rule file, every rule unit test) and amtool (the config, and every
//! route of `deploy/alertmanager/routes.tsv`). Plus what the tools cannot see: every alert
//! is unit-tested firing and silent, and routed; the shared recording rules keep their names.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_yaml::Value;
use support::require_tool;

/// Longest any one tool run may take (the slowest rule unit test file takes about 10 s).
const TIMEOUT: Duration = Duration::from_secs(180);

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// The `*.yml` files of a `deploy/` directory, sorted; at least one.
fn yml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy(dir))
        .unwrap_or_else(|e| panic!("deploy/{dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.yml in deploy/{dir}");
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn seq(value: &Value) -> &[Value] {
    value.as_sequence().map_or(&[], Vec::as_slice)
}

/// A YAML scalar as Prometheus reads a label value.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, v)| (scalar(k), scalar(v)))
        .collect()
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------
// Running the tools: bounded in time, output kept for the failure message.

/// A tool run that has started.
struct Running {
    command: String,
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
    deadline: Instant,
}

/// A tool run that has ended.
struct Finished {
    command: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn spawn(program: &Path, args: &[OsString]) -> Running {
    let command = std::iter::once(program.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
    // Read both pipes while the tool runs, so a full pipe never blocks it.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    Running {
        command,
        child,
        stdout,
        stderr,
        deadline: Instant::now() + TIMEOUT,
    }
}

impl Running {
    /// Waits for the tool to exit; kills it and fails the test after `TIMEOUT`.
    fn finish(mut self) -> Finished {
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the tool") {
                break Some(status);
            }
            if Instant::now() >= self.deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = self.stdout.join().unwrap();
        let stderr = self.stderr.join().unwrap();
        let Some(status) = status else {
            panic!(
                "$ {}\ndid not finish within {TIMEOUT:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                self.command
            );
        };
        Finished {
            command: self.command,
            status,
            stdout,
            stderr,
        }
    }
}

impl Finished {
    fn describe(&self) -> String {
        format!(
            "$ {}\n{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }

    fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "tool failed:\n{}", self.describe());
        self
    }

    fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn run(program: &Path, args: &[OsString]) -> Finished {
    spawn(program, args).finish()
}

fn args<const N: usize>(args: [&dyn AsRef<std::ffi::OsStr>; N]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_owned()).collect()
}

// ---------------------------------------------------------------------------------------------
// What the rule files define.

/// One alerting rule: its name, static labels and annotations.
struct AlertRule {
    file: String,
    alert: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn alert_rules() -> Vec<AlertRule> {
    let mut rules = Vec::new();
    for file in yml_files("prometheus/rules") {
        let doc = yaml(&file);
        for group in seq(&doc["groups"]) {
            for rule in seq(&group["rules"]) {
                if let Some(alert) = rule["alert"].as_str() {
                    rules.push(AlertRule {
                        file: name(&file),
                        alert: alert.to_owned(),
                        labels: string_map(&rule["labels"]),
                        annotations: string_map(&rule["annotations"]),
                    });
                }
            }
        }
    }
    assert!(!rules.is_empty(), "no alerting rules in deploy/prometheus/rules");
    rules
}

/// Group names and recorded series of one rule file.
fn groups_and_records(file: &Path) -> (Vec<String>, Vec<(String, String)>) {
    let doc = yaml(file);
    let mut groups = Vec::new();
    let mut records = Vec::new();
    for group in seq(&doc["groups"]) {
        let group_name = group["name"].as_str().expect("group name").to_owned();
        for rule in seq(&group["rules"]) {
            if let Some(record) = rule["record"].as_str() {
                records.push((group_name.clone(), record.to_owned()));
            }
        }
        groups.push(group_name);
    }
    (groups, records)
}

/// `labels` contains all of `wanted`.
fn superset(labels: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `text` mentions the series `name` (not merely a longer name starting with it).
fn mentions(text: &str, name: &str) -> bool {
    text.match_indices(name).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + name.len()..].chars().next();
        let part_of_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        !before.is_some_and(part_of_name) && !after.is_some_and(part_of_name)
    })
}

/// One row of routes.tsv: the receivers amtool must print, and the alert's labels.
struct Route {
    line: usize,
    receivers: String,
    labels: Vec<(String, String)>,
}

fn routes() -> Vec<Route> {
    let path = deploy("alertmanager/routes.tsv");
    let mut routes = Vec::new();
    for (index, line) in read(&path).lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let mut columns = line.split('\t');
        let receivers = columns.next().unwrap().trim().to_owned();
        let labels: Vec<(String, String)> = columns
            .map(|pair| {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("routes.tsv:{}: `{pair}` is not label=value", index + 1));
                (k.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        assert!(
            !receivers.is_empty() && labels.iter().any(|(k, _)| k == "alertname"),
            "routes.tsv:{}: needs receivers and an alertname: {line}",
            index + 1
        );
        routes.push(Route {
            line: index + 1,
            receivers,
            labels,
        });
    }
    assert!(!routes.is_empty(), "routes.tsv has no rows");
    routes
}

// ---------------------------------------------------------------------------------------------
// promtool

#[test]
fn prometheus_configs_pass_promtool_check_config() {
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    let rule_files = yml_files("prometheus/rules").len();
    // The token variant names a token file beside it, which promtool requires to exist: the
    // kit is checked in a copy with a token there.
    let copy = tempfile::tempdir().unwrap();
    let kit = copy.path().join("prometheus");
    copy_dir(&deploy("prometheus"), &kit);
    std::fs::write(kit.join("agent-telemetry.token"), "a-test-token\n").unwrap();
    for config in ["prometheus.yml", "prometheus-file-sd.yml", "prometheus-token.yml"] {
        let finished = run(&promtool, &args([&"check", &"config", &kit.join(config)]));
        finished.assert_success();
        let output = finished.output();
        // Every rules/*.yml loaded through the relative glob, and every rule file valid.
        assert!(
            output.contains(&format!("SUCCESS: {rule_files} rule files found")),
            "{config}: expected {rule_files} rule files:\n{}",
            finished.describe()
        );
        // promtool only warns when file_sd target files are missing: they must exist (and
        // are then validated).
        assert!(
            !output.contains("WARNING"),
            "{config}: warnings:\n{}",
            finished.describe()
        );
    }
}

/// Copies the directory `from` to `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn rule_files_pass_promtool_check_rules() {
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    for file in yml_files("prometheus/rules") {
        let doc = yaml(&file);
        let rules: usize = seq(&doc["groups"]).iter().map(|group| seq(&group["rules"]).len()).sum();
        let finished = run(&promtool, &args([&"check", &"rules", &file]));
        finished.assert_success();
        assert!(
            finished.output().contains(&format!("SUCCESS: {rules} rules found")),
            "{}: promtool did not find the {rules} rules of the file:\n{}",
            name(&file),
            finished.describe()
        );
    }
}

#[test]
fn rule_unit_tests_pass_promtool_test_rules() {
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    // One promtool per file, all at once: the files are independent.
    let running: Vec<Running> = yml_files("prometheus/tests")
        .iter()
        .map(|file| spawn(&promtool, &args([&"test", &"rules", file])))
        .collect();
    let mut failures = Vec::new();
    for finished in running.into_iter().map(Running::finish) {
        if !finished.status.success() || !finished.output().contains("SUCCESS") {
            failures.push(finished.describe());
        }
    }
    assert!(
        failures.is_empty(),
        "promtool test rules failed:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// amtool

#[test]
fn alertmanager_config_passes_amtool_check_config() {
    let Some(amtool) = require_tool("amtool") else {
        return;
    };
    // The config is checked as shipped: amtool 0.25 (like Alertmanager) does not open the
    // api_url_file / auth_password_file secrets; they are read when a notification is sent.
    let config = deploy("alertmanager/alertmanager.yml");
    let finished = run(&amtool, &args([&"check-config", &config]));
    finished.assert_success();
    assert!(finished.output().contains("SUCCESS"), "{}", finished.describe());
}

#[test]
fn alertmanager_secrets_come_from_files() {
    let config = yaml(&deploy("alertmanager/alertmanager.yml"));
    for key in ["slack_api_url", "smtp_auth_password", "smtp_auth_secret"] {
        assert!(
            config["global"].get(key).is_none(),
            "global.{key} is a secret written into the config; use the *_file form"
        );
    }
    let receivers = seq(&config["receivers"]);
    assert!(!receivers.is_empty(), "no receivers");
    for receiver in receivers {
        let receiver_name = receiver["name"].as_str().unwrap_or("?");
        for slack in seq(&receiver["slack_configs"]) {
            assert!(
                slack.get("api_url").is_none() && slack["api_url_file"].as_str().is_some(),
                "{receiver_name}: Slack webhook must come from api_url_file"
            );
        }
        for email in seq(&receiver["email_configs"]) {
            assert!(
                email.get("auth_password").is_none()
                    && email.get("auth_secret").is_none()
                    && email["auth_password_file"].as_str().is_some(),
                "{receiver_name}: SMTP password must come from auth_password_file"
            );
        }
    }
}

#[test]
fn alert_routes_reach_their_receivers() {
    let Some(amtool) = require_tool("amtool") else {
        return;
    };
    let config = deploy("alertmanager/alertmanager.yml");
    let mut failures = Vec::new();
    for route in routes() {
        let mut command = vec![
            OsString::from("config"),
            OsString::from("routes"),
            OsString::from("test"),
            OsString::from(format!("--config.file={}", config.display())),
        ];
        command.extend(route.labels.iter().map(|(k, v)| OsString::from(format!("{k}={v}"))));
        let finished = run(&amtool, &command);
        if !finished.status.success() || finished.stdout.trim() != route.receivers {
            failures.push(format!(
                "routes.tsv:{}: expected `{}`, amtool printed `{}`\n{}",
                route.line,
                route.receivers,
                finished.stdout.trim(),
                finished.describe()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------------------------
// Coverage: what the tools do not check by themselves.

#[test]
fn alerts_are_documented_with_a_routed_severity() {
    for rule in alert_rules() {
        let id = format!("{} {} {:?}", rule.file, rule.alert, rule.labels);
        for annotation in ["summary", "description"] {
            assert!(
                rule.annotations
                    .get(annotation)
                    .is_some_and(|text| !text.trim().is_empty()),
                "{id}: no {annotation} annotation"
            );
        }
        assert!(
            matches!(
                rule.labels.get("severity").map(String::as_str),
                Some("critical" | "warning")
            ),
            "{id}: severity must be critical or warning (the values alertmanager.yml routes)"
        );
    }
}

/// Every alerting rule fires in some promtool test (with its static labels, annotations
/// checked) and is checked silent in some other case; and routes.tsv routes it.
#[test]
fn every_alert_is_unit_tested_and_routed() {
    let mut firing: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    let mut silent: BTreeSet<String> = BTreeSet::new();
    for file in yml_files("prometheus/tests") {
        let doc = yaml(&file);
        for group in seq(&doc["tests"]) {
            for case in seq(&group["alert_rule_test"]) {
                let alertname = case["alertname"].as_str().expect("alertname").to_owned();
                let expected = seq(&case["exp_alerts"]);
                if expected.is_empty() {
                    silent.insert(alertname.clone());
                }
                for alert in expected {
                    let annotations = string_map(&alert["exp_annotations"]);
                    assert!(
                        annotations.contains_key("summary") && annotations.contains_key("description"),
                        "{}: {alertname} at {:?} is expected without its annotations",
                        name(&file),
                        case["eval_time"]
                    );
                    firing.push((alertname.clone(), string_map(&alert["exp_labels"])));
                }
            }
        }
    }
    let routes = routes();
    let mut missing = Vec::new();
    for rule in alert_rules() {
        // Label values with templates depend on the series; match the fixed ones.
        let fixed: BTreeMap<String, String> = rule
            .labels
            .iter()
            .filter(|(_, v)| !v.contains("{{"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let id = format!("{} {} {fixed:?}", rule.file, rule.alert);
        if !firing
            .iter()
            .any(|(alert, labels)| *alert == rule.alert && superset(labels, &fixed))
        {
            missing.push(format!("{id}: never fires in deploy/prometheus/tests"));
        }
        if !silent.contains(&rule.alert) {
            missing.push(format!("{id}: no `exp_alerts: []` case in deploy/prometheus/tests"));
        }
        let mut with_alertname = fixed.clone();
        with_alertname.insert("alertname".into(), rule.alert.clone());
        if !routes.iter().any(|route| {
            let labels: BTreeMap<String, String> = route.labels.iter().cloned().collect();
            superset(&labels, &with_alertname)
        }) {
            missing.push(format!(
                "{id}: no row in deploy/alertmanager/routes.tsv with these labels"
            ));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// A promtool test file that loads several rule groups must order them: without
/// `group_eval_order` promtool evaluates groups in random order, and an alert reading a
/// recording rule of another group then sees a value one evaluation old, or not.
#[test]
fn rule_unit_tests_fix_the_group_order() {
    for file in yml_files("prometheus/tests") {
        let doc = yaml(&file);
        let mut groups = BTreeSet::new();
        for rule_file in seq(&doc["rule_files"]) {
            let rule_file = rule_file.as_str().expect("rule file path");
            assert!(
                !rule_file.contains(['*', '?', '[']),
                "{}: list rule files without globs",
                name(&file)
            );
            let (names, _) = groups_and_records(&file.parent().unwrap().join(rule_file));
            groups.extend(names);
        }
        let ordered: BTreeSet<String> = seq(&doc["group_eval_order"]).iter().map(scalar).collect();
        if groups.len() > 1 {
            assert_eq!(
                ordered,
                groups,
                "{}: group_eval_order must list every group it loads",
                name(&file)
            );
        }
    }
}

#[test]
fn shared_recording_rules_keep_their_names_and_every_record_is_tested() {
    let mut records = Vec::new();
    for file in yml_files("prometheus/rules") {
        let (_, file_records) = groups_and_records(&file);
        records.extend(file_records);
    }
    for shared in support::SHARED_RECORDING_RULES {
        let groups: Vec<&str> = records
            .iter()
            .filter(|(_, record)| record == shared)
            .map(|(group, _)| group.as_str())
            .collect();
        assert_eq!(
            groups,
            ["agent_executions"],
            "{shared} must be recorded exactly once, in group agent_executions"
        );
    }
    let names: BTreeSet<&str> = records.iter().map(|(_, record)| record.as_str()).collect();
    assert_eq!(names.len(), records.len(), "a series is recorded twice");

    let mut exprs = Vec::new();
    for file in yml_files("prometheus/tests") {
        let doc = yaml(&file);
        for group in seq(&doc["tests"]) {
            for case in seq(&group["promql_expr_test"]) {
                exprs.push(case["expr"].as_str().expect("expr").to_owned());
            }
        }
    }
    let untested: Vec<&str> = names
        .into_iter()
        .filter(|record| !exprs.iter().any(|expr| mentions(expr, record)))
        .collect();
    assert!(
        untested.is_empty(),
        "recording rules without a promql_expr_test: {untested:?}"
    );
}
