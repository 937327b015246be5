//! A real OTLP receiver: Arize Phoenix, started on free loopback ports for one test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_port, require_tool};

/// A running `phoenix serve`, killed on drop.
pub struct Phoenix {
    child: Child,
    pub http_port: u16,
    pub grpc_port: u16,
    _dir: tempfile::TempDir,
}

impl Phoenix {
    /// Starts Phoenix and waits until it answers; `None` only outside CI when it is missing.
    pub fn start() -> Option<Self> {
        let phoenix = require_tool("phoenix")?;
        let dir = tempfile::tempdir().unwrap();
        let (http_port, grpc_port) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("phoenix.log")).unwrap();
        let child = Command::new(phoenix)
            .arg("serve")
            .env("PHOENIX_WORKING_DIR", dir.path())
            .env("PHOENIX_HOST", "127.0.0.1")
            .env("PHOENIX_PORT", http_port.to_string())
            .env("PHOENIX_GRPC_PORT", grpc_port.to_string())
            .env("PHOENIX_TELEMETRY_ENABLED", "false")
            .env("DO_NOT_TRACK", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start phoenix");
        let mut phoenix = Phoenix {
            child,
            http_port,
            grpc_port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if ureq::get(&phoenix.url("/healthz")).call().is_ok() {
                return Some(phoenix);
            }
            if let Ok(Some(status)) = phoenix.child.try_wait() {
                panic!("phoenix exited with {status}: {}", phoenix.log());
            }
            assert!(Instant::now() < deadline, "phoenix did not come up: {}", phoenix.log());
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// The base endpoint for `OTEL_EXPORTER_OTLP_ENDPOINT` (OTLP/HTTP).
    pub fn otlp_http_endpoint(&self) -> String {
        self.url("")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("phoenix.log")).unwrap_or_default()
    }

    /// Every span Phoenix has stored in the default project.
    pub fn spans(&self) -> Vec<Value> {
        self.project_spans("default")
    }

    /// Every span Phoenix has stored in `project` (the `openinference.project.name` resource
    /// attribute picks it).
    pub fn project_spans(&self, project: &str) -> Vec<Value> {
        let mut spans = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut request = ureq::get(&self.url(&format!("/v1/projects/{project}/spans"))).query("limit", "1000");
            if let Some(cursor) = &cursor {
                request = request.query("cursor", cursor);
            }
            let body = match request.call() {
                Ok(response) => response.into_string().expect("span page"),
                // The project appears with the first span.
                Err(ureq::Error::Status(404, _)) => return spans,
                Err(error) => panic!("phoenix spans API: {error}"),
            };
            let page: Value = serde_json::from_str(&body).expect("JSON span page");
            spans.extend(page["data"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return spans,
            }
        }
    }

    /// Polls until `count` spans are stored (storage is asynchronous), then returns them.
    pub fn wait_for_spans(&self, count: usize, timeout: Duration) -> Vec<Value> {
        self.wait_for_project_spans("default", count, timeout)
    }

    /// Polls `project` until `count` spans are stored, then returns them.
    pub fn wait_for_project_spans(&self, project: &str, count: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.project_spans(project);
            if spans.len() >= count || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Phoenix {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
