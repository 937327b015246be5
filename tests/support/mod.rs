//! Shared test helpers: a telemetry instance scoped to one test, and readers for what each
//! signal really produced (the scraped text, the log file's bytes, the exported spans).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_telemetry::{AgentTelemetry, AgentTelemetryBuilder};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData, SpanExporter};
use tracing::Dispatch;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

pub mod phoenix;

/// One telemetry instance with an in-memory span exporter and a temporary log directory,
/// installed as the default subscriber only where a test runs code through it.
pub struct Harness {
    pub running: Option<AgentTelemetry>,
    /// What the harness's subscriber printed at WARN and above.
    pub printed: Arc<Mutex<Vec<u8>>>,
    pub exporter: InMemorySpanExporter,
    pub dispatch: Dispatch,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn new() -> Self {
        Self::with(|builder| builder)
    }

    pub fn with(configure: impl FnOnce(AgentTelemetryBuilder) -> AgentTelemetryBuilder) -> Self {
        let exporter = InMemorySpanExporter::default();
        let in_memory = KeepOnShutdown(exporter.clone());
        Self::build(exporter, |builder| configure(builder.with_span_exporter(in_memory)))
    }

    /// Traces off: no span exporter at all (`self.exporter` stays empty). `with` cannot turn
    /// them off: its in-memory exporter is used whatever `with_traces_exporter` says.
    pub fn untraced() -> Self {
        Self::build(InMemorySpanExporter::default(), |builder| {
            builder.with_traces_exporter(agent_telemetry::TracesExporter::None)
        })
    }

    /// Spans go to a real OTLP/HTTP endpoint (`self.exporter` stays empty).
    pub fn otlp(endpoint: &str, configure: impl FnOnce(AgentTelemetryBuilder) -> AgentTelemetryBuilder) -> Self {
        let endpoint = endpoint.to_owned();
        Self::build(InMemorySpanExporter::default(), |builder| {
            configure(builder.with_otlp_endpoint(endpoint))
        })
    }

    fn build(
        exporter: InMemorySpanExporter,
        configure: impl FnOnce(AgentTelemetryBuilder) -> AgentTelemetryBuilder,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let builder = AgentTelemetry::builder()
            .ignore_environment()
            .with_service_name("test-service")
            .with_metrics_addr(([127, 0, 0, 1], 0))
            .with_log_dir(dir.path())
            .with_log_file_prefix("agents");
        let (layer, telemetry) = configure(builder).build().expect("telemetry builds");
        let printed = Arc::new(Mutex::new(Vec::new()));
        let printer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(SharedBuffer(Arc::clone(&printed)))
            .with_filter(tracing_subscriber::filter::LevelFilter::WARN);
        let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer).with(printer));
        Harness {
            running: Some(telemetry),
            printed,
            exporter,
            dispatch,
            dir,
        }
    }

    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        tracing::dispatcher::with_default(&self.dispatch, f)
    }

    /// A multi-thread tokio runtime of `workers` threads, each with the harness's subscriber
    /// as its default, so that spans move between worker threads as in an async service.
    pub fn runtime(&self, workers: usize) -> tokio::runtime::Runtime {
        let dispatch = self.dispatch.clone();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .on_thread_start(move || {
                // For the worker's whole life: the guard would reset it when dropped.
                std::mem::forget(tracing::dispatcher::set_default(&dispatch));
            })
            .build()
            .expect("a tokio runtime")
    }

    pub fn telemetry(&self) -> &AgentTelemetry {
        self.running.as_ref().expect("not shut down yet")
    }

    pub fn scrape(&self) -> Scrape {
        let addr = self.telemetry().metrics_addr().expect("metrics are served");
        let (status, body) = http(addr, "GET", "/metrics");
        assert_eq!(status, 200, "{body}");
        Scrape::parse(&body)
    }

    /// Flushes, then returns the spans the exporter received.
    pub fn spans(&self) -> Vec<SpanData> {
        self.telemetry().flush().expect("flush");
        self.exporter.get_finished_spans().expect("in-memory spans")
    }

    /// Flushes, then returns the log file's lines.
    pub fn log_lines(&self) -> Vec<String> {
        if let Some(telemetry) = &self.running {
            // Both signals are flushed; only a trace flush can fail (a broken collector).
            let _ = telemetry.flush();
        }
        read_log_lines(self.dir.path())
    }

    /// How often the harness's subscriber printed `text`.
    pub fn printed_count(&self, text: &str) -> usize {
        String::from_utf8_lossy(&self.printed.lock().unwrap())
            .matches(text)
            .count()
    }

    /// Shuts down (flushing everything) and returns the spans and the log file's bytes.
    pub fn shutdown(&mut self) -> (Vec<SpanData>, String) {
        self.running
            .take()
            .expect("shut down once")
            .shutdown()
            .expect("clean shutdown");
        let spans = self.exporter.get_finished_spans().expect("in-memory spans");
        (spans, read_log_text(self.dir.path()))
    }
}

/// A `MakeWriter` into shared memory.
#[derive(Clone)]
pub struct SharedBuffer(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SharedBuffer {
    type Writer = SharedBuffer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The in-memory exporter forgets its spans on shutdown; tests count what shutdown flushed.
#[derive(Debug)]
pub struct KeepOnShutdown(pub InMemorySpanExporter);

impl SpanExporter for KeepOnShutdown {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.export(batch).await
    }
}

/// The single daily log file `agents.YYYY-MM-DD.log` in `dir`.
pub fn log_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("log dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    assert_eq!(files.len(), 1, "one daily file expected: {files:?}");
    files.into_iter().next().unwrap()
}

pub fn read_log_text(dir: &Path) -> String {
    std::fs::read_to_string(log_file(dir)).expect("log file is UTF-8")
}

pub fn read_log_lines(dir: &Path) -> Vec<String> {
    read_log_text(dir).lines().map(str::to_owned).collect()
}

/// The log line, among `lines`, of the execution of agent `agent`; panics, showing them all,
/// when none is.
pub fn agent_line<'a, L: AsRef<str>>(lines: &'a [L], agent: &str) -> &'a str {
    let key = format!(r#""agent_name":"{agent}""#);
    let lines = lines.iter().map(AsRef::as_ref);
    lines
        .clone()
        .find(|line| line.contains(&key))
        .unwrap_or_else(|| panic!("no log line for {agent} in {:?}", lines.collect::<Vec<_>>()))
}

/// The exported span, among `spans`, of the execution of agent `agent`; panics when none is.
pub fn agent_span<'a>(spans: &'a [SpanData], agent: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|span| {
            span.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "agent.name" && kv.value.as_str() == agent)
        })
        .unwrap_or_else(|| panic!("no span for {agent}"))
}

/// The top-level keys and values of a JSON object line, in order, duplicates kept.
pub fn json_pairs(line: &str) -> Vec<(String, serde_json::Value)> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Pairs;
    impl<'de> Visitor<'de> for Pairs {
        type Value = Vec<(String, serde_json::Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut pairs = Vec::new();
            while let Some(pair) = map.next_entry()? {
                pairs.push(pair);
            }
            Ok(pairs)
        }
    }
    let mut de = serde_json::Deserializer::from_str(line);
    let pairs = de
        .deserialize_map(Pairs)
        .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
    de.end().unwrap_or_else(|e| panic!("trailing data ({e}): {line}"));
    pairs
}

/// A minimal HTTP/1.1 client: method, path, and the status and body of the answer.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to /metrics");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    (status, body)
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").expect("chunk end");
    }
    out
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
    pub help: BTreeMap<String, String>,
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut scrape = Scrape {
            text: text.to_owned(),
            samples: vec![],
            help: BTreeMap::new(),
            types: BTreeMap::new(),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                scrape.help.insert(name.into(), help.into());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                scrape.types.insert(name.into(), kind.into());
            } else {
                scrape.samples.push(parse_sample(line));
            }
        }
        scrape
    }

    /// The value of the one sample with this name and exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    pub fn with_name<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// Sum over every sample of a name.
    pub fn sum(&self, name: &str) -> f64 {
        self.with_name(name).map(|s| s.value).sum()
    }
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line.rsplit_once(' ').expect("sample line");
    let value = match value {
        "+Inf" => f64::INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
    };
    let Some((name, labels)) = series.split_once('{') else {
        return Sample {
            name: series.into(),
            labels: BTreeMap::new(),
            value,
        };
    };
    let mut map = BTreeMap::new();
    let mut rest = labels.strip_suffix('}').expect("closing brace");
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        map.insert(key.trim_start_matches(',').to_owned(), value);
        rest = after[end..].trim_start_matches(',');
    }
    Sample {
        name: name.into(),
        labels: map,
        value,
    }
}

/// A tool the test needs from the machine. Under `CI=true` a missing tool fails the test;
/// elsewhere the test says loudly that it did not run.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("{name} is required under CI=true but is not on PATH (.ci/run installs it)");
        }
        eprintln!("SKIPPED: {name} is not installed; this check did not run (CI=true makes it fail)");
    }
    found
}

/// The main job's binary: tests run from `target/<profile>/deps`, and cargo builds examples
/// into `target/<profile>/examples`.
pub fn example_binary() -> PathBuf {
    example_binary_named("agents")
}

/// The binary of the example `name` (see [`example_binary`]).
pub fn example_binary_named(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().and_then(Path::parent).unwrap().join("examples").join(name);
    assert!(
        binary.is_file(),
        "{} missing: build it with `cargo test` or `cargo build --examples`",
        binary.display()
    );
    binary
}

/// `promtool check metrics` on an exposition text: `None` when promtool is not installed
/// (outside CI), else whether it passed without a word, and what it said.
pub fn promtool_check_metrics(text: &str) -> Option<(bool, String)> {
    let promtool = require_tool("promtool")?;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some((output.status.success() && report.trim().is_empty(), report))
}

/// The keys of a successful execution's log line, in their contract order.
pub const LOG_LINE_KEYS: [&str; 11] = [
    "@timestamp",
    "timestamp",
    "log.level",
    "event",
    "agent_name",
    "task",
    "duration_seconds",
    "status",
    "trace.id",
    "span.id",
    "service.name",
];

/// The recording rules of `deploy/prometheus/rules/recording.yml` that dashboards and alerts
/// share, by exact name.
pub const SHARED_RECORDING_RULES: [&str; 8] = [
    "agent_name_status:agent_executions:rate5m",
    "agent_name:agent_executions:rate5m",
    "agent_name:agent_execution_failure_ratio:rate5m",
    "job:agent_executions:rate5m",
    "job:agent_execution_failure_ratio:rate5m",
    "agent_name:agent_execution_duration_seconds:p50_5m",
    "agent_name:agent_execution_duration_seconds:p95_5m",
    "agent_name:agent_execution_duration_seconds:p99_5m",
];

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP/1.1 request to `addr` that fails instead of panicking, bounded by `timeout` for
/// connecting and for each read: the status and body of the answer.
pub fn try_http(addr: SocketAddr, request: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read after {} bytes: {e}", response.len()))?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {response:?}"))?;
    let (_, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Ok((status, body.to_owned()))
}

/// `GET /metrics` on `addr` as a scraper sends it.
pub fn scrape_request(addr: SocketAddr) -> String {
    format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n")
}

/// The main job, `examples/agents.rs`, running in a process of its own with its `/metrics` on
/// a free loopback port and traces off; killed when dropped.
pub struct ExampleProcess {
    child: std::process::Child,
    pub metrics: SocketAddr,
    /// What it printed at start, through its `traces:` line.
    pub banner: String,
    pub work: tempfile::TempDir,
}

impl ExampleProcess {
    /// Starts the example with `args` and extra environment `vars`; with `max_fds`, under
    /// that limit of open file descriptors (`ulimit -n`). Its stderr goes to `stderr.log` in
    /// its working directory.
    pub fn start(args: &[&str], vars: &[(&str, &str)], max_fds: Option<u32>) -> Self {
        use std::io::BufRead;
        let work = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(work.path().join("stderr.log")).unwrap();
        let binary = example_binary();
        let mut command = match max_fds {
            Some(limit) => {
                let mut shell = std::process::Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(binary);
                shell
            }
            None => std::process::Command::new(binary),
        };
        command
            .args(args)
            .current_dir(work.path())
            .env("AGENT_TELEMETRY_METRICS_ADDR", "127.0.0.1:0")
            .env("OTEL_TRACES_EXPORTER", "none")
            .env("RUST_LOG", "warn")
            .envs(vars.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::from(stderr));
        let mut child = command.spawn().expect("start the example");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        while !banner.contains("\ntraces:") {
            if stdout.read_line(&mut banner).unwrap() == 0 {
                let _ = child.kill();
                let stderr = std::fs::read_to_string(work.path().join("stderr.log")).unwrap_or_default();
                panic!("the example exited before serving metrics: {banner}{stderr}");
            }
        }
        let metrics = banner
            .lines()
            .find_map(|line| line.strip_prefix("metrics: http://")?.strip_suffix("/metrics"))
            .expect("a metrics line")
            .parse()
            .unwrap();
        // Keep reading stdout so the example never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        ExampleProcess {
            child,
            metrics,
            banner,
            work,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.work.path().join("stderr.log")).unwrap_or_default()
    }

    /// Its resident set size, from `/proc`.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    /// Scrapes `/metrics`, panicking unless it answers 200 within 10 s.
    pub fn scrape(&self) -> Scrape {
        let (status, body) =
            try_http(self.metrics, &scrape_request(self.metrics), Duration::from_secs(10)).expect("scrape");
        assert_eq!(status, 200, "{body}");
        Scrape::parse(&body)
    }
}

impl Drop for ExampleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OTLP/HTTP endpoint that answers 200 to everything and keeps each request's head and
/// body length: for what reaches a collector beyond the spans (headers, request sizes).
pub struct RecordingCollector {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<(String, usize)>>>,
}

impl RecordingCollector {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
        let kept = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let kept = Arc::clone(&kept);
                std::thread::spawn(move || record_requests(stream, &kept));
            }
        });
        RecordingCollector { addr, requests }
    }

    /// The traces endpoint URL, `http://127.0.0.1:PORT/v1/traces`.
    pub fn traces_url(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// Each request's head (request line and headers, as sent) and body length so far.
    pub fn requests(&self) -> Vec<(String, usize)> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for at least `count` requests; returns them all.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> Vec<(String, usize)> {
        let deadline = std::time::Instant::now() + timeout;
        while self.requests().len() < count && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.requests()
    }
}

fn record_requests(mut stream: TcpStream, kept: &Mutex<Vec<(String, usize)>>) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    while let Some((head, body)) = read_request(&mut stream) {
        kept.lock().unwrap().push((head, body.len()));
        let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Reads one HTTP/1.1 request from `stream`: its head as sent (request line and headers) and
/// its body, `Content-Length` bytes of it. `None` once the client closes, stalls past the
/// stream's read timeout, or sends less body than it announced.
pub fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).ok()?;
    Some((head, body))
}
