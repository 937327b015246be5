//! The main job: a team of agents executing tasks, monitored by agent-telemetry.
//!
//! ```text
//! cargo run --example agents -- [--duration SECS] [--rate N] [--failure-burst START:SECS]
//!                               [--prices FILE]
//! ```
//!
//! `--failure-burst 60:120` makes 80% of executions fail from the 60th to the 180th second,
//! to see the failure alerts fire.
//!
//! Each execution calls a model one to three times (two providers, three models, token
//! counts of realistic size, a failed call now and then, retried), so tokens and spend show
//! per agent and model. Spend is priced from `--prices`, by default `examples/prices.toml`
//! beside this file: illustrative prices, not any provider's (`AGENT_TELEMETRY_PRICES`
//! overrides both).
//!
//! Serves `/metrics` on :8000, writes log files to `./logs/`, sends traces to
//! `OTEL_EXPORTER_OTLP_ENDPOINT` when set and prints them on stdout otherwise. Ctrl-C or
//! SIGTERM stops it: running agents are cancelled, every signal is flushed, exit code 0.

use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agent_telemetry::{AgentTelemetry, ModelPrices, TracesExporter};

/// The framework's team, with the tasks each one takes.
const TEAM: [(&str, &[&str]); 8] = [
    (
        "backend-engineer",
        &["Implement API", "Design schema", "Fix N+1 query", "Add pagination"],
    ),
    (
        "frontend-engineer",
        &["Build dashboard", "Fix layout bug", "Add dark mode"],
    ),
    (
        "qa-engineer",
        &["Write integration tests", "Run regression suite", "Verify bug fix"],
    ),
    (
        "devops-engineer",
        &["Deploy to staging", "Rotate certificates", "Tune autoscaling"],
    ),
    ("security-engineer", &["Audit dependencies", "Review auth flow"]),
    ("data-engineer", &["Backfill events", "Build ETL job"]),
    ("technical-writer", &["Document API", "Write release notes"]),
    ("code-reviewer", &["Review pull request", "Check style"]),
];

/// Agents that plan and hand parts of their task to the team.
const LEADS: [(&str, &str); 2] = [("tech-lead", "Ship feature"), ("product-manager", "Plan sprint")];

/// Share of executions per histogram bucket, so every bucket of the guide sees traffic, while
/// a healthy team stays inside the shipped latency objective (95% within 10 s; here 97%).
const DURATIONS: [(f64, f64, f64); 8] = [
    (0.30, 0.01, 0.1),
    (0.25, 0.1, 0.5),
    (0.16, 0.5, 1.0),
    (0.12, 1.0, 2.0),
    (0.09, 2.0, 5.0),
    (0.05, 5.0, 10.0),
    (0.025, 10.0, 30.0),
    (0.005, 30.0, 60.0),
];

/// The models the agents call: two providers, three models.
const MODELS: [(&str, &str); 3] = [
    ("gpt-4o", "openai"),
    ("gpt-4o-mini", "openai"),
    ("claude-sonnet-4", "anthropic"),
];

/// A model call fails now and then (rate limits, timeouts); the agent retries it once.
const MODEL_CALL_FAILURE_RATE: f64 = 0.03;

/// A few percent of executions fail in normal operation.
const FAILURE_RATE: f64 = 0.02;
const BURST_FAILURE_RATE: f64 = 0.8;

/// The share of executions that fail: the usual few percent, more during a burst.
struct FailureRate {
    started: Instant,
    burst: Option<(Duration, Duration)>,
}

impl FailureRate {
    fn now(&self) -> f64 {
        let elapsed = self.started.elapsed();
        match self.burst {
            Some((start, length)) if elapsed >= start && elapsed < start + length => BURST_FAILURE_RATE,
            _ => FAILURE_RATE,
        }
    }
}

#[derive(Debug)]
struct AgentError(String);

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AgentError {}

/// Set once on Ctrl-C or SIGTERM; agents waiting on their work wake up and stop.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl Stop {
    fn trigger(&self) {
        *self.stopped.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        self.changed.notify_all();
    }

    /// Waits `duration`; `false` if stopped first.
    fn wait(&self, duration: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (stopped, _) = self
            .changed
            .wait_timeout_while(stopped, duration, |stopped| !*stopped)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        !*stopped
    }
}

fn pick<T: Copy>(items: &[T]) -> T {
    items[fastrand::usize(..items.len())]
}

fn work_duration() -> Duration {
    let mut roll = fastrand::f64();
    for (share, low, high) in DURATIONS {
        if roll < share {
            return Duration::from_secs_f64(low + fastrand::f64() * (high - low));
        }
        roll -= share;
    }
    Duration::from_millis(50)
}

/// One model call, annotated with the GenAI conventions' fields; the usage is recorded when
/// the answer comes, as a client library reports it. `false` if stopped first.
#[tracing::instrument(
    name = "chat",
    skip_all,
    fields(
        gen_ai.request.model = model,
        gen_ai.provider.name = provider,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        gen_ai.usage.cache_read.input_tokens = tracing::field::Empty,
    ),
    err
)]
fn call_model(model: &str, provider: &str, duration: Duration, stop: &Stop) -> Result<bool, AgentError> {
    if !stop.wait(duration) {
        return Ok(false);
    }
    if fastrand::f64() < MODEL_CALL_FAILURE_RATE {
        return Err(AgentError(format!("{provider} returned 429 for {model}")));
    }
    let input = fastrand::u64(400..6_000);
    // Half the calls reuse a cached prompt prefix; cache reads are part of the input.
    let cache_read = if fastrand::bool() {
        input * fastrand::u64(10..60) / 100
    } else {
        0
    };
    let span = tracing::Span::current();
    span.record("gen_ai.usage.input_tokens", input);
    span.record("gen_ai.usage.output_tokens", fastrand::u64(50..1_200));
    span.record("gen_ai.usage.cache_read.input_tokens", cache_read);
    Ok(true)
}

/// The agent's work: one to three model calls with one model, a failed call retried once.
/// `false` if stopped first.
fn think(stop: &Stop) -> bool {
    let (model, provider) = pick(&MODELS);
    let calls = fastrand::u32(1..=3);
    let each = work_duration() / calls;
    for _ in 0..calls {
        let answered = match call_model(model, provider, each, stop) {
            Ok(answered) => answered,
            Err(_) => matches!(call_model(model, provider, Duration::ZERO, stop), Ok(true)),
        };
        if !answered && !stop.wait(Duration::ZERO) {
            return false;
        }
    }
    true
}

/// One agent doing one task: waits for its work, fails now and then, stops when asked.
#[tracing::instrument(name = "agent_execution", skip(stop, failure_rate), fields(status = tracing::field::Empty), err)]
fn execute_agent(agent_name: &str, task: &str, stop: &Stop, failure_rate: f64) -> Result<(), AgentError> {
    if !think(stop) {
        // Shut down mid-task: an explicit status, so it is not mistaken for a crash.
        tracing::Span::current().record("status", "cancelled");
        return Ok(());
    }
    if fastrand::f64() < failure_rate {
        return Err(AgentError(format!(
            "{agent_name} could not finish {task:?}: upstream returned 503"
        )));
    }
    Ok(())
}

/// A lead splits its task and delegates the parts: nested agent spans in one trace.
#[tracing::instrument(name = "agent_execution", skip(stop, failure_rate), err)]
fn lead_agent(agent_name: &str, task: &str, stop: &Stop, failure_rate: f64) -> Result<(), AgentError> {
    // Plans with a model of its own: those tokens are the lead's, its members' are theirs.
    let (model, provider) = pick(&MODELS);
    let _ = call_model(model, provider, Duration::from_millis(fastrand::u64(50..500)), stop);
    let mut failed = 0;
    for _ in 0..fastrand::usize(2..=3) {
        let (member, tasks) = pick(&TEAM);
        failed += usize::from(execute_agent(member, pick(tasks), stop, failure_rate).is_err());
    }
    if failed > 1 {
        return Err(AgentError(format!("{failed} sub-tasks of {task:?} failed")));
    }
    Ok(())
}

struct Options {
    duration: Option<Duration>,
    rate: f64,
    burst: Option<(Duration, Duration)>,
    prices: std::path::PathBuf,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        duration: None,
        rate: 2.0,
        burst: None,
        prices: concat!(env!("CARGO_MANIFEST_DIR"), "/examples/prices.toml").into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--duration" => {
                let secs: f64 = value("--duration")?
                    .parse()
                    .map_err(|_| "--duration takes seconds".to_owned())?;
                options.duration = Some(Duration::from_secs_f64(secs.max(0.0)));
            }
            "--rate" => {
                let rate: f64 = value("--rate")?
                    .parse()
                    .map_err(|_| "--rate takes executions per second".to_owned())?;
                if !(rate > 0.0 && rate.is_finite()) {
                    return Err("--rate must be greater than 0".into());
                }
                options.rate = rate;
            }
            "--failure-burst" => {
                let spec = value("--failure-burst")?;
                let parsed = spec
                    .split_once(':')
                    .and_then(|(start, length)| Some((start.parse::<f64>().ok()?, length.parse::<f64>().ok()?)));
                match parsed {
                    Some((start, length)) if start >= 0.0 && length >= 0.0 => {
                        options.burst = Some((Duration::from_secs_f64(start), Duration::from_secs_f64(length)));
                    }
                    _ => return Err("--failure-burst takes START:SECS, such as 60:120".into()),
                }
            }
            "--prices" => options.prices = value("--prices")?.into(),
            "--help" | "-h" => {
                return Err(
                    "usage: agents [--duration SECS] [--rate EXECUTIONS_PER_SECOND] [--failure-burst START:SECS] [--prices FILE]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?}; try --help")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let has_collector = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    let prices = match ModelPrices::from_file(&options.prices) {
        Ok(prices) => prices,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    let telemetry = AgentTelemetry::builder()
        .with_model_prices(prices)
        .with_service_name("my-name-is-claude")
        .with_service_version("3.3.0")
        .with_log_dir("logs")
        .with_log_file_prefix("my-name-is-claude")
        .with_traces_exporter(if has_collector {
            TracesExporter::Otlp
        } else {
            TracesExporter::Console
        })
        .try_init();
    let telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("cannot start telemetry: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "agents: {} executions/s, {}",
        options.rate,
        match options.duration {
            Some(d) => format!("for {}s", d.as_secs_f64()),
            None => "until Ctrl-C".to_owned(),
        }
    );
    println!("{}", telemetry.describe());

    let stop = Arc::new(Stop::default());
    let (signalled, signal) = mpsc::channel();
    if let Err(error) = ctrlc::set_handler(move || {
        let _ = signalled.send(());
    }) {
        eprintln!("cannot handle Ctrl-C: {error}");
        return ExitCode::FAILURE;
    }
    run(&options, &stop, &signal);

    // The agents' work succeeded; telemetry that cannot be flushed (the collector gone) is
    // worth a warning, not a failed exit.
    match telemetry.shutdown() {
        Ok(()) => println!("agents: stopped; metrics, logs and traces flushed"),
        Err(error) => eprintln!("agents: stopped; warning: telemetry not fully flushed: {error}"),
    }
    ExitCode::SUCCESS
}

/// Starts executions at the requested rate until the duration ends or a signal arrives,
/// then stops the running ones and waits for them.
fn run(options: &Options, stop: &Arc<Stop>, signal: &Receiver<()>) {
    let started = Instant::now();
    let failures = FailureRate {
        started,
        burst: options.burst,
    };
    let mut running = Vec::new();
    let mut next = started;
    loop {
        if options.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        match signal.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        // Poisson arrivals at the requested rate.
        next += Duration::from_secs_f64(-fastrand::f64().max(1e-9).ln() / options.rate);
        let stop = Arc::clone(stop);
        let failure_rate = failures.now();
        running.retain(|handle: &std::thread::JoinHandle<()>| !handle.is_finished());
        running.push(std::thread::spawn(move || {
            if fastrand::f64() < 0.1 {
                let (lead, task) = pick(&LEADS);
                let _ = lead_agent(lead, task, &stop, failure_rate);
            } else {
                let (agent, tasks) = pick(&TEAM);
                let _ = execute_agent(agent, pick(tasks), &stop, failure_rate);
            }
        }));
    }
    stop.trigger();
    for handle in running {
        let _ = handle.join();
    }
}
