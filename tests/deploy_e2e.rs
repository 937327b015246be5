//! End to end: the example app scraped by a real Prometheus with our rule files loaded; every
//! recording rule and every dashboard panel query evaluated through Prometheus' HTTP API,
//! and a failure burst driving the failure-ratio alert to pending or firing.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{free_port, require_tool, ExampleProcess};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

fn files(dir: &str, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.{extension} in deploy/{dir}");
    files
}

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The example, healthy for 15 s, then with 80% of executions failing.
fn start_example() -> ExampleProcess {
    ExampleProcess::start(
        &["--duration", "600", "--rate", "12", "--failure-burst", "15:600"],
        &[("RUST_LOG", "off")],
        None,
    )
}

struct Prometheus {
    _process: Running,
    port: u16,
}

impl Prometheus {
    fn start(prometheus: &Path, work: &Path, target: SocketAddr) -> Self {
        let rule_files: Vec<String> = files("prometheus/rules", "yml")
            .iter()
            .map(|p| format!("  - {}", p.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n  - job_name: my-name-is-claude\n    static_configs:\n      - targets: ['{target}']\n        labels:\n          environment: production\n          project: my-name-is-claude\n",
            rule_files.join("\n")
        );
        Self::with_config(prometheus, work, &config)
    }

    /// Starts Prometheus with `config`, written to `prometheus.yml` in `work`.
    fn with_config(prometheus: &Path, work: &Path, config: &str) -> Self {
        let config_file = work.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(work.join("prometheus.log")).unwrap();
        let process = Command::new(prometheus)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", work.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus {
            _process: Running(process),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while ureq::get(&prometheus.url("/-/ready")).call().is_err() {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready: {}",
                read(&work.join("prometheus.log"))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let mut request = ureq::get(&self.url(path));
        for (key, value) in query {
            request = request.query(key, value);
        }
        let body = match request.call() {
            Ok(response) => response.into_string().unwrap(),
            Err(ureq::Error::Status(code, response)) => {
                panic!(
                    "{path} {query:?}: HTTP {code}: {}",
                    response.into_string().unwrap_or_default()
                )
            }
            Err(error) => panic!("{path}: {error}"),
        };
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["status"], "success", "{body}");
        value["data"].clone()
    }

    /// An instant query's sample values.
    fn query(&self, expr: &str) -> Vec<f64> {
        let data = self.get("/api/v1/query", &[("query", expr)]);
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|sample| sample["value"][1].as_str().unwrap().parse::<f64>().unwrap())
                .collect(),
            Some("scalar") => vec![data["result"][1].as_str().unwrap().parse().unwrap()],
            other => panic!("{expr}: unexpected result type {other:?}"),
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Every panel query of every dashboard, with the dashboard variables filled in as Grafana
/// would for "All".
fn panel_queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for file in files("grafana/dashboards", "json") {
        let dashboard: Value = serde_json::from_str(&read(&file)).unwrap();
        let mut panels: Vec<Value> = dashboard["panels"].as_array().cloned().unwrap_or_default();
        while let Some(panel) = panels.pop() {
            panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
            for target in panel["targets"].as_array().into_iter().flatten() {
                let Some(expr) = target["expr"].as_str() else {
                    continue;
                };
                let expr = expr
                    .replace("$agent_name", ".*")
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "1h");
                assert!(!expr.contains('$'), "unknown variable in {expr}");
                let name = format!("{} / {}", file.file_name().unwrap().to_string_lossy(), panel["title"]);
                queries.push((name, expr));
            }
        }
    }
    queries
}

fn recording_rules() -> Vec<String> {
    let mut names = Vec::new();
    for file in files("prometheus/rules", "yml") {
        let rules: serde_yaml::Value = serde_yaml::from_str(&read(&file)).unwrap();
        for group in rules["groups"].as_sequence().into_iter().flatten() {
            for rule in group["rules"].as_sequence().into_iter().flatten() {
                if let Some(record) = rule["record"].as_str() {
                    names.push(record.to_owned());
                }
            }
        }
    }
    assert!(!names.is_empty(), "recording rules exist");
    names
}

#[test]
fn dashboards_and_rules_work_on_real_scrapes_and_failures_alert() {
    let Some(prometheus_binary) = require_tool("prometheus") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let example = start_example();
    let prometheus = Prometheus::start(&prometheus_binary, work.path(), example.metrics);

    // Several scrapes and rule evaluations, partly into the failure burst.
    let deadline = Instant::now() + Duration::from_secs(90);
    while prometheus
        .query("count(agent_executions_total)")
        .first()
        .copied()
        .unwrap_or(0.0)
        < 5.0
        || prometheus
            .query("count_over_time(up[1m])")
            .first()
            .copied()
            .unwrap_or(0.0)
            < 20.0
    {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the example: {}",
            read(&work.path().join("prometheus.log"))
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(prometheus.query("up{job=\"my-name-is-claude\"}"), vec![1.0]);

    let mut failures = Vec::new();
    for record in recording_rules() {
        check(&prometheus, &record, &record, &mut failures);
    }
    for (panel, expr) in panel_queries() {
        check(&prometheus, &panel, &expr, &mut failures);
    }
    assert!(
        failures.is_empty(),
        "queries without a finite result:\n{}",
        failures.join("\n")
    );

    // The burst started 15 s in: the failure-ratio alert reaches pending or firing.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let alerts = prometheus.get("/api/v1/alerts", &[]);
        let state = alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == "AgentFailureRatioHigh")
            .map(|a| a["state"].as_str().unwrap().to_owned())
            .next();
        if matches!(state.as_deref(), Some("pending" | "firing")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "AgentFailureRatioHigh never became active: {alerts}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn check(prometheus: &Prometheus, name: &str, expr: &str, failures: &mut Vec<String>) {
    // Rules are evaluated every second; give a just-loaded rule a few evaluations.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let values = prometheus.query(expr);
        if !values.is_empty() && values.iter().all(|v| v.is_finite()) {
            return;
        }
        if Instant::now() > deadline {
            failures.push(format!("{name}: {expr} -> {values:?}"));
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `deploy/prometheus/prometheus-token.yml` as shipped, pointed at `target` and its token file
/// `token_file`, scraping every second, without Alertmanager.
fn token_config(target: SocketAddr, token_file: &Path) -> String {
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&read(&deploy("prometheus/prometheus-token.yml"))).unwrap();
    config["global"]["scrape_interval"] = "1s".into();
    let mapping = config.as_mapping_mut().unwrap();
    mapping.remove("alerting");
    mapping.remove("rule_files");
    let job = &mut config["scrape_configs"][0];
    assert_eq!(job["authorization"]["type"], "Bearer", "{job:?}");
    assert_eq!(job["authorization"]["credentials_file"], "agent-telemetry.token");
    job["authorization"]["credentials_file"] = token_file.display().to_string().into();
    job["static_configs"][0]["targets"] = vec![target.to_string()].into();
    serde_yaml::to_string(&config).unwrap()
}

#[test]
fn the_token_variant_scrapes_an_endpoint_that_requires_a_bearer_token() {
    let Some(prometheus_binary) = require_tool("prometheus") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("agent-telemetry.token");
    std::fs::write(&token_file, "a9f3c0e1d2b44f7e9a1c\n").unwrap();
    let example = ExampleProcess::start(
        &["--rate", "5"],
        &[("AGENT_TELEMETRY_METRICS_TOKEN_FILE", token_file.to_str().unwrap())],
        None,
    );
    let config = token_config(example.metrics, &token_file);
    let prometheus = Prometheus::with_config(&prometheus_binary, work.path(), &config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus.query("up{job=\"my-name-is-claude\"}") != vec![1.0]
        || prometheus.query("count(framework_info)").is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped with the token: {}",
            read(&work.path().join("prometheus.log"))
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The endpoint counted no unauthorized request: Prometheus sent the token every time.
    assert_eq!(
        prometheus.query("agent_telemetry_metrics_requests_unauthorized_total"),
        vec![0.0]
    );

    // With another token, the same scrape fails: the target is down.
    std::fs::write(&token_file, "not-the-token\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus.query("up{job=\"my-name-is-claude\"}") != vec![0.0] {
        assert!(Instant::now() < deadline, "a wrong token was accepted");
        std::thread::sleep(Duration::from_millis(500));
    }
}
