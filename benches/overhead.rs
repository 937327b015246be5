//! What agent-telemetry costs, side by side with what a user would assemble by hand, in one
//! run: every ratio is between cases measured in the same run on the same machine.
//!
//! Stacks: no subscriber; a bare `tracing_subscriber::registry()` (with the no-op `Identity`
//! layer, without which it never frees closed spans); the hand-assembled stack
//! (`tracing-subscriber`'s JSON formatter with span-close events to a sink,
//! `tracing-opentelemetry` with a batch processor and a discarding exporter, and a small layer
//! that observes a Prometheus histogram and counter on span close); and ours (all three
//! signals: log lines to a sink, spans to a discarding exporter, metrics on a registry).
//!
//! Workloads: one agent execution (create, enter, exit, close, with `agent_name` and `task`);
//! a span no signal selects; an agent execution with one child span; one whose task is a
//! prompt of about 1,000 characters; one whose task carries a bearer token (ours scrubs it, on
//! by default); agent executions from two threads at once;
//! async agent executions, 100 to a task on a two-worker tokio runtime, annotated with
//! `agent_telemetry::instrument` (and, in ours, with `tracing::instrument` alone, for what
//! reporting cancellation costs). `cargo bench` ends with one line per ratio, each judged against its
//! target. A shared VM's capacity drifts between criterion's cases, seconds apart, so the
//! ratios judged come from interleaved runs: the one-thread ones from brief processes of
//! each stack run one after another, 15 rounds; the two-thread one from pairs of runs, one
//! thread then two, in the stack's process. Criterion's means are printed beside them.
//!
//! Each stack is measured in a process of its own (this binary, run again), installed as the
//! global default subscriber as an application installs it.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_telemetry::AgentTelemetry;
use criterion::Criterion;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::Dispatch;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::{Identity, SubscriberExt};

/// Exports nothing, instantly: the benches measure the application side.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

// ---- the workloads ------------------------------------------------------------------------

#[inline(never)]
fn agent_execution() {
    let span = tracing::info_span!(
        "agent_execution",
        agent_name = "backend-engineer",
        task = "Implement API"
    );
    let _entered = span.enter();
    black_box(&span);
}

/// An agent execution whose task carries a bearer token, which scrubbing replaces (on by
/// default in ours; the hand-assembled stack has no scrubbing and writes the token out).
#[inline(never)]
fn agent_with_secret() {
    let span = tracing::info_span!(
        "agent_execution",
        agent_name = "devops-engineer",
        task = "Rotate the key, then call with Authorization: Bearer 3f9a1c77e2b44f0d9a1c3f9a"
    );
    let _entered = span.enter();
    black_box(&span);
}

/// A task as agents get them: a prompt of about 1,000 characters, with no secret in it
/// (within the 1,024 characters ours keeps of a task by default).
const PROMPT: &str = "Review the pull request that moves the billing service to the new queue. \
    Check that every consumer acknowledges messages only after the write to the ledger has \
    committed, that retries are idempotent, and that the dead-letter queue keeps the original \
    headers. Summarise the risks for the on-call engineer, list the tests that are missing, and \
    propose a rollout plan with a canary stage, a metric to watch and a rollback step. Keep the \
    answer under four hundred words and cite the files you looked at by path. The customer asked \
    for this by Friday, so flag anything that would block the release, and say which parts of the \
    change you could not verify from the diff alone. Compare the new consumer's batching with the \
    old one's: the batch size, the flush interval, and what happens to a half-full batch when the \
    process stops. Note any place where an exception is swallowed or logged without context, any \
    configuration value that differs between staging and production, and any migration that \
    cannot be rolled back.";

/// An agent execution whose task is a prompt of realistic length: what scrubbing and the
/// line's escaping cost per character.
#[inline(never)]
fn agent_with_prompt() {
    let span = tracing::info_span!("agent_execution", agent_name = "reviewer", task = PROMPT);
    let _entered = span.enter();
    black_box(&span);
}

/// Agent executions awaited inside an async task, per workload iteration: enough to make the
/// task's spawn and join a small part of the time.
const ASYNC_BATCH: usize = 100;

/// The runtime the async workloads run on: two workers, as a small async service has.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// An async agent execution, instrumented so that a cancellation would be reported.
#[agent_telemetry::instrument]
async fn async_agent(agent_name: &str, task: &str) -> usize {
    tokio::task::yield_now().await;
    black_box(task.len())
}

/// The same, with `tracing`'s attribute alone: what reporting cancellation costs is the
/// difference.
#[tracing::instrument(name = "agent_execution")]
async fn async_agent_plain(agent_name: &str, task: &str) -> usize {
    tokio::task::yield_now().await;
    black_box(task.len())
}

/// [`ASYNC_BATCH`] async agent executions in a task on the two-worker runtime; each yields
/// once, so it is polled twice, as an execution that awaits anything is.
#[inline(never)]
fn async_agent_execution() {
    let task = runtime().spawn(async {
        for _ in 0..ASYNC_BATCH {
            black_box(async_agent("backend-engineer", "Implement API").await);
        }
    });
    runtime().block_on(task).expect("the task completes");
}

/// [`async_agent_execution`] with `tracing::instrument` alone.
#[inline(never)]
fn async_agent_execution_plain() {
    let task = runtime().spawn(async {
        for _ in 0..ASYNC_BATCH {
            black_box(async_agent_plain("backend-engineer", "Implement API").await);
        }
    });
    runtime().block_on(task).expect("the task completes");
}

#[inline(never)]
fn unselected_span() {
    let span = tracing::debug_span!("parse_config", path = "agents.toml");
    let _entered = span.enter();
    black_box(&span);
}

#[inline(never)]
fn agent_with_child() {
    let span = tracing::info_span!("agent_execution", agent_name = "tech-lead", task = "Ship feature");
    let _entered = span.enter();
    let child = tracing::info_span!("tool_call", tool = "search");
    let _child = child.enter();
    black_box(&child);
}

/// An agent execution with two model calls, each a `chat` span with its model and usage.
#[inline(never)]
fn agent_with_model_calls() {
    let span = tracing::info_span!("agent_execution", agent_name = "planner", task = "Plan the release");
    let _entered = span.enter();
    for (input, output) in [(1_200_u64, 300_u64), (800, 200)] {
        let call = tracing::info_span!(
            "chat",
            gen_ai.request.model = "gpt-4o",
            gen_ai.usage.input_tokens = input,
            gen_ai.usage.output_tokens = output
        );
        let _call = call.enter();
        black_box(&call);
    }
}

// ---- the stacks ---------------------------------------------------------------------------

enum Stack {
    None,
    Registry,
    Hand(Box<HandAssembled>),
    Ours {
        dispatch: Box<Dispatch>,
        guard: AgentTelemetry,
    },
}

impl Stack {
    fn dispatch(&self) -> Dispatch {
        match self {
            Stack::None => Dispatch::none(),
            // With a layer that does nothing: a registry with no layer at all never frees the
            // spans it closes (tokio-rs/tracing#900), so it measures its slab growing.
            Stack::Registry => Dispatch::new(tracing_subscriber::registry().with(Identity::new())),
            Stack::Hand(hand) => hand.dispatch.clone(),
            Stack::Ours { dispatch, .. } => (**dispatch).clone(),
        }
    }
}

fn ours() -> Stack {
    let (layer, guard) = AgentTelemetry::builder()
        .ignore_environment()
        .without_metrics_server()
        .with_log_writer(std::io::sink())
        .with_span_exporter(Discard)
        .build()
        .expect("telemetry");
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
    Stack::Ours {
        dispatch: Box::new(dispatch),
        guard,
    }
}

/// The stack a user would put together today for the same three outputs.
struct HandAssembled {
    dispatch: Dispatch,
    provider: SdkTracerProvider,
    registry: prometheus::Registry,
}

impl Drop for HandAssembled {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
        black_box(self.registry.gather());
    }
}

mod hand {
    use std::time::Instant;

    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id};
    use tracing::Subscriber;
    use tracing_subscriber::layer::Context;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    /// What a user writes: observe a histogram and a counter when an agent span closes, and
    /// count a model call's tokens under its agent when it closes.
    pub struct PrometheusLayer {
        pub duration: HistogramVec,
        pub executions: IntCounterVec,
        pub tokens: IntCounterVec,
        pub calls: IntCounterVec,
    }

    impl PrometheusLayer {
        pub fn new(registry: &prometheus::Registry) -> Self {
            let buckets = vec![0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];
            let duration = HistogramVec::new(
                HistogramOpts::new("agent_execution_duration_seconds", "Agent execution duration").buckets(buckets),
                &["agent_name"],
            )
            .unwrap();
            let executions = IntCounterVec::new(
                Opts::new("agent_executions_total", "Total agent executions"),
                &["agent_name", "status"],
            )
            .unwrap();
            let tokens = IntCounterVec::new(
                Opts::new("agent_tokens_total", "Tokens"),
                &["agent_name", "model", "type"],
            )
            .unwrap();
            let calls = IntCounterVec::new(
                Opts::new("agent_model_calls_total", "Model calls"),
                &["agent_name", "model", "status"],
            )
            .unwrap();
            registry.register(Box::new(duration.clone())).unwrap();
            registry.register(Box::new(executions.clone())).unwrap();
            registry.register(Box::new(tokens.clone())).unwrap();
            registry.register(Box::new(calls.clone())).unwrap();
            PrometheusLayer {
                duration,
                executions,
                tokens,
                calls,
            }
        }
    }

    struct Timing {
        started: Instant,
        agent_name: String,
    }

    #[derive(Default)]
    struct AgentName(Option<String>);

    impl Visit for AgentName {
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "agent_name" {
                self.0 = Some(value.to_owned());
            }
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "agent_name" {
                self.0 = Some(format!("{value:?}"));
            }
        }
    }

    #[derive(Default)]
    struct Usage {
        model: String,
        input: u64,
        output: u64,
    }

    impl Visit for Usage {
        fn record_u64(&mut self, field: &Field, value: u64) {
            match field.name() {
                "gen_ai.usage.input_tokens" => self.input = value,
                "gen_ai.usage.output_tokens" => self.output = value,
                _ => {}
            }
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "gen_ai.request.model" {
                self.model = value.to_owned();
            }
        }
        fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for PrometheusLayer {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            if attrs.metadata().name() == "chat" {
                let mut usage = Usage::default();
                attrs.record(&mut usage);
                ctx.span(id).unwrap().extensions_mut().insert(usage);
                return;
            }
            if attrs.metadata().name() != "agent_execution" {
                return;
            }
            let mut name = AgentName::default();
            attrs.record(&mut name);
            let timing = Timing {
                started: Instant::now(),
                agent_name: name.0.unwrap_or_else(|| "unknown".into()),
            };
            ctx.span(id).unwrap().extensions_mut().insert(timing);
        }

        fn on_close(&self, id: Id, ctx: Context<'_, S>) {
            let span = ctx.span(&id).unwrap();
            let usage = span.extensions_mut().remove::<Usage>();
            if let Some(usage) = usage {
                let agent = span
                    .scope()
                    .skip(1)
                    .find_map(|parent| parent.extensions().get::<Timing>().map(|t| t.agent_name.clone()))
                    .unwrap_or_else(|| "unknown".into());
                let model = usage.model.as_str();
                self.tokens
                    .with_label_values(&[agent.as_str(), model, "input"])
                    .inc_by(usage.input);
                self.tokens
                    .with_label_values(&[agent.as_str(), model, "output"])
                    .inc_by(usage.output);
                self.calls.with_label_values(&[agent.as_str(), model, "success"]).inc();
                return;
            }
            let Some(timing) = span.extensions_mut().remove::<Timing>() else {
                return;
            };
            self.duration
                .with_label_values(&[timing.agent_name.as_str()])
                .observe(timing.started.elapsed().as_secs_f64());
            self.executions
                .with_label_values(&[timing.agent_name.as_str(), "success"])
                .inc();
        }
    }
}

fn hand_assembled() -> Stack {
    let provider = SdkTracerProvider::builder().with_batch_exporter(Discard).build();
    let registry = prometheus::Registry::new();
    let subscriber = tracing_subscriber::registry()
        .with(EnvFilter::new("info"))
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_span_events(FmtSpan::CLOSE)
                .with_writer(std::io::sink),
        )
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("hand")))
        .with(hand::PrometheusLayer::new(&registry));
    Stack::Hand(Box::new(HandAssembled {
        dispatch: Dispatch::new(subscriber),
        provider,
        registry,
    }))
}

// ---- measuring ----------------------------------------------------------------------------

const WORKLOADS: [(&str, fn()); 8] = [
    ("agent_execution", agent_execution),
    ("agent_with_prompt", agent_with_prompt),
    ("agent_with_model_calls", agent_with_model_calls),
    ("unselected_span", unselected_span),
    ("agent_with_child", agent_with_child),
    ("agent_with_secret", agent_with_secret),
    ("async_agent_execution", async_agent_execution),
    ("async_agent_execution_plain", async_agent_execution_plain),
];

fn bench_stack(c: &mut Criterion, name: &str) {
    let mut group = c.benchmark_group(name);
    for (workload, run) in WORKLOADS {
        group.bench_function(workload, |b| b.iter(run));
    }
    // Two threads, each running agent executions: the time of one iteration is one
    // execution on each thread.
    let workers = Workers::start(2, agent_execution);
    group.bench_function("two_threads", |b| b.iter_custom(|iters| workers.run(iters)));
    group.finish();
    // Not in `cargo test --benches` (criterion's test mode), nor for the stack without
    // telemetry, whose ratio the summary does not show.
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    if benchmarking && name != "none" {
        save_scaling(name, &workers);
    }
}

/// Interleaved pairs of measurements for the two-thread ratio, each pair one thread alone
/// then both, a fraction of a second apart.
const SCALING_PAIRS: usize = 15;

/// How long each thread runs in one measurement of a pair.
const SCALING_RUN: Duration = Duration::from_millis(25);

/// Throughput of two threads over one, the median of interleaved pairs: criterion measures
/// its one-thread and two-thread cases seconds apart, and a shared VM's capacity drifts in
/// between; a pair's two measurements see the same machine.
fn scaling(workers: &Workers) -> f64 {
    let calibration = 1_000;
    let once = workers.run_on(1, calibration);
    let per_execution = once.as_secs_f64() / calibration as f64;
    let iters = ((SCALING_RUN.as_secs_f64() / per_execution.max(1e-9)) as u64).max(calibration);
    let mut ratios: Vec<f64> = (0..SCALING_PAIRS)
        .map(|_| {
            let one = workers.run_on(1, iters);
            let two = workers.run_on(2, iters);
            2.0 * one.as_secs_f64() / two.as_secs_f64()
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[SCALING_PAIRS / 2]
}

/// Where the measuring process leaves a stack's two-thread ratio for the summary.
fn scaling_path(stack: &str) -> PathBuf {
    criterion_dir().join(stack).join("scaling.txt")
}

fn save_scaling(stack: &str, workers: &Workers) {
    let ratio = scaling(workers);
    let path = scaling_path(stack);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("the scaling file's directory is made");
    }
    std::fs::write(path, format!("{ratio}\n")).expect("the scaling file is written");
}

/// Set, with `STACK_VAR`, in a process that times the one-thread workloads briefly for
/// [`interleaved`] and prints them, instead of running criterion; set to a workload's name,
/// it times that workload alone (for a profiler).
const BRIEF_VAR: &str = "AGENT_TELEMETRY_BENCH_BRIEF";

/// Rounds of [`interleaved`]: each runs one brief process of each stack it compares.
const INTERLEAVED_ROUNDS: usize = 15;

/// The stacks [`interleaved`] compares: ours and its two baselines.
const INTERLEAVED_STACKS: [&str; 3] = ["none", "hand-assembled", "ours"];

/// The one-thread targets: workload, the stack ours is compared with (and how the summary
/// names it), and the most ours may cost as a share of it.
const ONE_THREAD_TARGETS: [(&str, &str, &str, f64); 5] = [
    ("agent_execution", "hand-assembled", "hand-assembled", 0.20),
    ("agent_with_model_calls", "hand-assembled", "hand-assembled", 0.20),
    ("agent_with_child", "hand-assembled", "hand-assembled", 0.20),
    ("unselected_span", "none", "no subscriber", 1.20),
    ("async_agent_execution", "hand-assembled", "hand-assembled", 0.20),
];

/// One-thread ratios measured in the interleaved rounds too, printed for reference, each
/// under its label.
const ONE_THREAD_REFERENCES: [(&str, &str, &str); 2] = [
    (
        "agent_with_prompt",
        "hand-assembled",
        "agent_with_prompt: ours (scrubbing the prompt) / hand-assembled",
    ),
    (
        "agent_with_secret",
        "hand-assembled",
        "agent_with_secret: ours (scrubbing the token) / hand-assembled (writing it out)",
    ),
];

/// How long a brief process warms each workload up, and then times it.
const BRIEF_WARM_UP: Duration = Duration::from_millis(60);
const BRIEF_RUN: Duration = Duration::from_millis(120);

/// Times each one-thread workload for [`BRIEF_RUN`] after a warm-up, printing
/// `workload nanoseconds-per-execution` lines.
fn time_briefly() {
    let only = std::env::var(BRIEF_VAR).ok().filter(|value| value != "1");
    for (workload, run) in WORKLOADS {
        if only.as_deref().is_some_and(|only| only != workload) {
            continue;
        }
        time_for(run, BRIEF_WARM_UP);
        println!("{workload} {}", time_for(run, BRIEF_RUN));
    }
}

/// Runs `workload` for about `length`; returns nanoseconds per execution.
fn time_for(workload: fn(), length: Duration) -> f64 {
    const BATCH: u64 = 1_000;
    let started = Instant::now();
    let mut executions = 0;
    while started.elapsed() < length {
        (0..BATCH).for_each(|_| workload());
        executions += BATCH;
    }
    started.elapsed().as_secs_f64() * 1e9 / executions as f64
}

/// Per workload and baseline: the median of the rounds' ratios `ours / baseline`, and how
/// many rounds gave one.
type InterleavedRatios = Vec<((&'static str, &'static str), f64, usize)>;

/// The one-thread ratios from interleaved brief processes: criterion measures one stack's
/// cases, then the next stack's, seconds apart, and a shared VM's capacity drifts in between
/// (the hand-assembled execution has measured 6.3 to 13.7 µs from run to run). Each round
/// runs a brief process of every stack, one after another, the order turned round every
/// other round; each ratio is the median of the rounds'.
fn interleaved(bench: &std::path::Path) -> InterleavedRatios {
    let mut per_round: Vec<((&str, &str), Vec<f64>)> = Vec::new();
    for round in 0..INTERLEAVED_ROUNDS {
        let mut order = INTERLEAVED_STACKS;
        if round % 2 == 1 {
            order.reverse();
        }
        let times: Vec<(&str, Vec<(String, f64)>)> =
            order.iter().map(|&stack| (stack, time_brief(bench, stack))).collect();
        let time = |stack: &str, workload: &str| {
            let (_, workloads) = times.iter().find(|(name, _)| *name == stack)?;
            workloads.iter().find(|(name, _)| name == workload).map(|(_, ns)| *ns)
        };
        let compared = ONE_THREAD_TARGETS
            .iter()
            .map(|&(workload, baseline, _, _)| (workload, baseline))
            .chain(ONE_THREAD_REFERENCES.map(|(workload, baseline, _)| (workload, baseline)));
        for (workload, baseline) in compared {
            let Some(ratio) = time("ours", workload)
                .zip(time(baseline, workload))
                .map(|(ours, base)| ours / base)
            else {
                continue;
            };
            match per_round.iter_mut().find(|(key, _)| *key == (workload, baseline)) {
                Some((_, ratios)) => ratios.push(ratio),
                None => per_round.push(((workload, baseline), vec![ratio])),
            }
        }
    }
    per_round
        .into_iter()
        .map(|(key, mut ratios)| {
            ratios.sort_by(f64::total_cmp);
            (key, ratios[ratios.len() / 2], ratios.len())
        })
        .collect()
}

/// One brief process of `stack`: its nanoseconds per execution, per workload.
fn time_brief(bench: &std::path::Path, stack: &str) -> Vec<(String, f64)> {
    let output = std::process::Command::new(bench)
        .env(STACK_VAR, stack)
        .env(BRIEF_VAR, "1")
        .output()
        .expect("the bench binary runs");
    assert!(
        output.status.success(),
        "timing {stack} briefly failed: {}",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (workload, ns) = line.split_once(' ')?;
            Some((workload.to_owned(), ns.parse().ok()?))
        })
        .collect()
}

fn saved_scaling(stack: &str) -> Option<f64> {
    std::fs::read_to_string(scaling_path(stack)).ok()?.trim().parse().ok()
}

/// Threads that run a workload on demand and stay up for the whole measurement, as an agent
/// service's workers do: spawned per sample, each sample would also time two thread starts
/// and the first, cold, executions of each thread.
struct Workers {
    starts: Vec<SyncSender<u64>>,
    done: Receiver<()>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    fn start(count: usize, workload: fn()) -> Self {
        let (finished, done) = sync_channel(count);
        let (starts, threads) = (0..count)
            .map(|_| {
                let (start, iterations) = sync_channel::<u64>(1);
                let finished = finished.clone();
                let thread = std::thread::spawn(move || {
                    while let Ok(iters) = iterations.recv() {
                        (0..iters).for_each(|_| workload());
                        if finished.send(()).is_err() {
                            return;
                        }
                    }
                });
                (start, thread)
            })
            .unzip();
        Workers { starts, done, threads }
    }

    /// Runs `iters` executions on every thread at once; the time until the last one ends.
    fn run(&self, iters: u64) -> Duration {
        self.run_on(self.starts.len(), iters)
    }

    /// Runs `iters` executions on each of the first `threads` threads at once.
    fn run_on(&self, threads: usize, iters: u64) -> Duration {
        let started = Instant::now();
        for start in &self.starts[..threads] {
            start.send(iters).expect("the worker is running");
        }
        for _ in 0..threads {
            self.done.recv().expect("the worker finishes");
        }
        started.elapsed()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Closing the start channels ends the threads.
        self.starts.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Where criterion keeps its results.
fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    target.join("criterion")
}

/// The mean time per iteration criterion recorded in this run, in nanoseconds.
fn mean_ns(group: &str, function: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(function)
        .join("new")
        .join("estimates.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

/// Where the measuring process leaves our stack's own counters for the summary.
fn counters_path() -> PathBuf {
    criterion_dir().join("ours").join("counters.txt")
}

/// Our stack's self-metrics after the run, flushed: back to back, executions can outpace the
/// pipeline thread, and the summary says how many lines and spans that cost.
fn save_counters(guard: &AgentTelemetry) {
    let _ = guard.flush();
    let text = guard.metrics().render().expect("the metrics render");
    let counters: String = text
        .lines()
        .filter(|line| line.starts_with("agent_telemetry_") && line.contains("_total "))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(counters_path(), counters).expect("the counters file is written");
}

/// A counter saved by `save_counters`.
fn counter(counters: &str, name: &str) -> Option<f64> {
    counters
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix("_total ")?.parse().ok())
}

fn drops_summary() {
    let Ok(counters) = std::fs::read_to_string(counters_path()) else {
        return println!("ours: drops not measured in this run");
    };
    let count = |name| counter(&counters, name).unwrap_or(0.0);
    let (written, lines_dropped) = (
        count("agent_telemetry_log_lines_written"),
        count("agent_telemetry_log_lines_dropped"),
    );
    let (exported, spans_dropped) = (
        count("agent_telemetry_spans_exported"),
        count("agent_telemetry_spans_dropped"),
    );
    let share = |dropped: f64, kept: f64| 100.0 * dropped / (dropped + kept).max(1.0);
    println!(
        "ours, back to back: {:.1}% of log lines and {:.1}% of spans dropped and counted, of {:.0} executions \
         (queue full: executions outpace the background threads; `--bench soak` runs a sustained 20,000/s)",
        share(lines_dropped, written),
        share(spans_dropped, exported),
        written + lines_dropped,
    );
}

/// What a ratio is held to, judged on its exact value (the summary prints three decimals).
#[derive(Clone, Copy)]
enum Target {
    AtMost(f64),
    AtLeast(f64),
    /// Printed for comparison, with what it is.
    Reference(&'static str),
}

impl Target {
    /// `Some(met)` for a target, `None` for a reference.
    fn met(self, value: f64) -> Option<bool> {
        match self {
            Target::AtMost(limit) => Some(value <= limit),
            Target::AtLeast(limit) => Some(value >= limit),
            Target::Reference(_) => None,
        }
    }

    fn describe(self, value: f64) -> String {
        let verdict = if self.met(value) == Some(true) { "met" } else { "MISSED" };
        match self {
            Target::AtMost(limit) => format!("target <= {limit:.2}: {verdict}"),
            Target::AtLeast(limit) => format!("target >= {limit:.2}: {verdict}"),
            Target::Reference(what) => format!("for reference{what}"),
        }
    }
}

fn summary(interleaved: &InterleavedRatios) {
    let ratio = |a: (&str, &str), b: (&str, &str)| Some(mean_ns(a.0, a.1)? / mean_ns(b.0, b.1)?);
    // The interleaved median where there is one, and criterion's means beside it.
    let one_thread = |workload: &str, baseline: &str| {
        let means = ratio(("ours", workload), (baseline, workload));
        match interleaved.iter().find(|(key, ..)| *key == (workload, baseline)) {
            Some((_, median, rounds)) => {
                let means = means.map_or_else(|| "nothing".to_owned(), |r| format!("{r:.3}"));
                let note = format!("; median of {rounds} interleaved brief runs, criterion's means give {means}");
                (Some(*median), note)
            }
            None => (means, "; criterion's means: no interleaved runs".to_owned()),
        }
    };
    let (mut targets, mut met) = (0, 0);
    let mut line = |label: &str, value: Option<f64>, target: Target, note: &str| {
        if !matches!(target, Target::Reference(_)) {
            targets += 1;
        }
        match value {
            Some(value) => {
                met += usize::from(target.met(value) == Some(true));
                println!("{label} = {value:.3}   ({}{note})", target.describe(value));
            }
            None => println!("{label} = not measured in this run"),
        }
    };
    println!("\nsummary (medians of interleaved runs, criterion's means beside them):");
    for (workload, baseline, baseline_name, target) in ONE_THREAD_TARGETS {
        let (value, note) = one_thread(workload, baseline);
        line(
            &format!("{workload}: ours / {baseline_name}"),
            value,
            Target::AtMost(target),
            &note,
        );
    }
    line(
        "unselected_span: ours / bare registry",
        ratio(("ours", "unselected_span"), ("registry", "unselected_span")),
        Target::Reference(""),
        "",
    );
    for (workload, baseline, label) in ONE_THREAD_REFERENCES {
        let (value, note) = one_thread(workload, baseline);
        line(label, value, Target::Reference(""), &note);
    }
    if let Some((reporting, plain)) =
        mean_ns("ours", "async_agent_execution").zip(mean_ns("ours", "async_agent_execution_plain"))
    {
        println!(
            "reporting cancellation (agent_telemetry::instrument over tracing::instrument): {:.0} ns per async execution (criterion's means, ours)",
            (reporting - plain) / ASYNC_BATCH as f64
        );
    }
    if let Some(scrubbing) = mean_ns("ours", "agent_with_secret").zip(mean_ns("ours", "agent_execution")) {
        println!(
            "scrubbing a bearer token out of a task: {:.0} ns per execution (criterion's means, ours)",
            scrubbing.0 - scrubbing.1
        );
    }
    // Throughput of two threads over one, from interleaved pairs (see `scaling`); and from
    // criterion's means, two executions per two-thread iteration, for comparison.
    let means = |stack| ratio((stack, "agent_execution"), (stack, "two_threads")).map(|r| 2.0 * r);
    for (stack, label, target) in [
        ("ours", "ours", Target::AtLeast(1.40)),
        ("hand-assembled", "hand-assembled", Target::Reference("")),
        ("registry", "bare registry", Target::Reference(": no telemetry at all")),
    ] {
        line(
            &format!("two threads: {label}, throughput 2 threads / 1 thread"),
            saved_scaling(stack),
            target,
            &format!(
                "; median of {SCALING_PAIRS} interleaved pairs, criterion's means give {}",
                means(stack).map_or_else(|| "nothing".to_owned(), |r| format!("{r:.3}"))
            ),
        );
    }
    drops_summary();
    println!("targets met in this run: {met} of {targets} (`--bench soak` judges its own)");
}

/// Set in the process that measures one stack.
const STACK_VAR: &str = "AGENT_TELEMETRY_BENCH_STACK";

/// A stack's name and how it is built.
type StackBuilder = (&'static str, fn() -> Stack);

const STACKS: [StackBuilder; 4] = [
    ("none", || Stack::None),
    ("registry", || Stack::Registry),
    ("hand-assembled", hand_assembled),
    ("ours", ours),
];

fn main() {
    // One process per stack, each installed as the global default, as an application
    // installs it (`init()`): a scoped default (`with_default`) would add a shared reference
    // count to every span, which two threads contend for, whatever the stack.
    let Ok(name) = std::env::var(STACK_VAR) else {
        let bench = std::env::current_exe().expect("the bench binary's path");
        for (name, _) in STACKS {
            // A ratio from an earlier run is not this run's.
            let _ = std::fs::remove_file(scaling_path(name));
        }
        for (name, _) in STACKS {
            let status = std::process::Command::new(&bench)
                .args(std::env::args_os().skip(1))
                .env(STACK_VAR, name)
                .status()
                .expect("the bench binary runs");
            assert!(status.success(), "measuring {name} failed: {status}");
        }
        // Not in `cargo test --benches` (criterion's test mode).
        let benchmarking = std::env::args().any(|arg| arg == "--bench");
        let paired = if benchmarking { interleaved(&bench) } else { Vec::new() };
        summary(&paired);
        return;
    };
    let Some((name, build)) = STACKS.into_iter().find(|(stack, _)| *stack == name) else {
        panic!("{STACK_VAR}={name} is not a stack");
    };
    let stack = build();
    if !matches!(stack, Stack::None) {
        tracing::dispatcher::set_global_default(stack.dispatch()).expect("the only subscriber");
    }
    if std::env::var_os(BRIEF_VAR).is_some() {
        time_briefly();
        return drop(stack);
    }
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_stack(&mut criterion, name);
    criterion.final_summary();
    if let Stack::Ours { guard, .. } = &stack {
        save_counters(guard);
    }
    // Flushes what is still queued and stops the stack's threads.
    drop(stack);
}
