//! Async agents on a tokio multi-thread runtime, monitored by agent-telemetry: agents run as
//! tasks, some calls time out, two agents race in a `select!`, a task panics now and then,
//! and leads hand work to other agents across `.await` and `tokio::spawn`.
//!
//! ```text
//! cargo run --example async_agents -- [--duration SECS] [--rate N] [--linger SECS]
//! ```
//!
//! `--linger` keeps `/metrics` up that long after every execution has ended, for a last
//! scrape that counts them all.
//!
//! Serves `/metrics` on :8000, writes log files to `./logs/`, sends traces to
//! `OTEL_EXPORTER_OTLP_ENDPOINT` when set and prints them on stdout otherwise. A timed-out or
//! raced-away execution is `cancelled` in all three signals, a panic a `failure` of type
//! `panic`. Ctrl-C stops it; it exits 0 when the agents' work went as planned, whatever the
//! telemetry's shutdown says (that is a warning).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use agent_telemetry::{AgentInstrument, AgentTelemetry, TracesExporter};

#[derive(Debug)]
struct AgentError(String);

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AgentError {}

/// The team and the tasks each one takes.
const TEAM: [(&str, &[&str]); 4] = [
    ("researcher", &["Find sources", "Check a claim"]),
    ("writer", &["Draft summary", "Rewrite intro"]),
    ("reviewer", &["Review draft", "Check citations"]),
    ("translator", &["Translate to French", "Translate to German"]),
];

fn pick<T: Copy>(items: &[T]) -> T {
    items[fastrand::usize(..items.len())]
}

/// How long a call to a model takes: mostly quick, sometimes slow.
fn model_latency() -> Duration {
    let millis = if fastrand::f64() < 0.1 {
        fastrand::u64(300..1500)
    } else {
        fastrand::u64(10..150)
    };
    Duration::from_millis(millis)
}

/// One agent doing one task: waits on its model, fails a few percent of the time.
#[agent_telemetry::instrument(skip(latency))]
async fn execute_agent(agent_name: &str, task: &str, latency: Duration) -> Result<usize, AgentError> {
    tokio::time::sleep(latency).await;
    if fastrand::f64() < 0.03 {
        return Err(AgentError(format!(
            "{agent_name} could not {task}: upstream returned 503"
        )));
    }
    Ok(task.len())
}

/// An agent whose parser falls over.
#[agent_telemetry::instrument]
async fn fragile_agent(agent_name: &str, task: &str) -> usize {
    tokio::time::sleep(Duration::from_millis(20)).await;
    panic!("{agent_name} could not parse the model's answer");
}

/// A lead: asks one agent in place, hands another a task of its own, and waits for both.
#[agent_telemetry::instrument]
async fn lead_agent(agent_name: &str, task: &str) -> Result<usize, AgentError> {
    let (member, tasks) = pick(&TEAM);
    let here = execute_agent(member, pick(tasks), model_latency()).await?;
    let (member, tasks) = pick(&TEAM);
    let task = pick(tasks);
    let span = tracing::info_span!("agent_execution", agent_name = member, task);
    let spawned = tokio::spawn(execute_agent(member, task, model_latency()).instrument_agent(span));
    let there = spawned
        .await
        .map_err(|e| AgentError(format!("the delegated task ended badly: {e}")))??;
    Ok(here + there)
}

/// One piece of work, of a kind chosen at random.
async fn one_job() {
    let roll = fastrand::f64();
    let (agent, tasks) = pick(&TEAM);
    if roll < 0.6 {
        let _ = execute_agent(agent, pick(tasks), model_latency()).await;
    } else if roll < 0.75 {
        // A call with a deadline: slow executions time out and are cancelled.
        let call = execute_agent(agent, pick(tasks), model_latency());
        let _ = tokio::time::timeout(Duration::from_millis(250), call).await;
    } else if roll < 0.85 {
        // Two agents race; the loser is cancelled.
        let (rival, rival_tasks) = pick(&TEAM);
        tokio::select! {
            _ = execute_agent(agent, pick(tasks), model_latency()) => {}
            _ = execute_agent(rival, pick(rival_tasks), model_latency()) => {}
        }
    } else if roll < 0.97 {
        let _ = lead_agent("tech-lead", "Ship the report").await;
    } else {
        // A panic inside a task: a failure of type `panic`, the service goes on.
        let _ = tokio::spawn(fragile_agent("parser", "Parse the answer")).await;
    }
}

struct Options {
    duration: Option<Duration>,
    rate: f64,
    linger: Duration,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        duration: None,
        rate: 5.0,
        linger: Duration::ZERO,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<f64, String> {
            args.next()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("{name} takes a number"))
        };
        match arg.as_str() {
            "--duration" => options.duration = Some(Duration::from_secs_f64(number("--duration")?)),
            "--rate" => {
                options.rate = number("--rate")?;
                if options.rate <= 0.0 {
                    return Err("--rate must be greater than 0".into());
                }
            }
            "--linger" => options.linger = Duration::from_secs_f64(number("--linger")?),
            "--help" | "-h" => {
                return Err("usage: async_agents [--duration SECS] [--rate JOBS_PER_SECOND] [--linger SECS]".into())
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let has_collector = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    let telemetry = AgentTelemetry::builder()
        .with_service_name("async-agents")
        .with_log_dir("logs")
        .with_log_file_prefix("async-agents")
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
    println!("async agents: {} jobs/s on a multi-thread runtime", options.rate);
    println!("{}", telemetry.describe());

    runtime.block_on(async {
        let started = Instant::now();
        let mut jobs = tokio::task::JoinSet::new();
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / options.rate));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = ticks.tick() => {
                    if options.duration.is_some_and(|d| started.elapsed() >= d) {
                        break;
                    }
                    jobs.spawn(one_job());
                    while jobs.try_join_next().is_some() {}
                }
            }
        }
        // Let what runs finish for a moment; the rest is cancelled with the runtime.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while jobs.join_next().await.is_some() {}
        })
        .await;
    });
    // Executions still in flight are dropped here, and reported cancelled.
    runtime.shutdown_timeout(Duration::from_secs(1));
    println!("async agents: every execution has ended");
    std::thread::sleep(options.linger);

    if let Err(error) = telemetry.shutdown() {
        eprintln!("async agents: telemetry not fully flushed: {error}");
    }
    println!("async agents: stopped");
    ExitCode::SUCCESS
}
