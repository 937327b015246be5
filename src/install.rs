//! The builder that wires the layer to the three signals, and the handle that runs them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_core::Subscriber;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, LogFormat, OtlpProtocol, TaskCapture, TracesExporter};
use crate::error::{Error, Result};
use crate::execution::{AgentSpanNames, TextPolicy};
use crate::filter::{ExecutionFilter, LayerFilter, SharedFilter, TracedFilter};
use crate::layer::{ExecutionLayer, Signals};
use crate::logs::LineQueue;
use crate::metrics::server::{BearerToken, MetricsServer, ServerLimits};
use crate::metrics::{Metrics, MetricsHandle};
use crate::panics;
use crate::printer::ScrubbedFields;
use crate::scrub::{Scrubber, Scrubbing};
use crate::stats::TelemetryStats;
use crate::traces::BoxedSpanExporter;

/// The layer [`AgentTelemetryBuilder::build`] returns, ready for `tracing_subscriber::registry().with(..)`.
pub type TelemetryLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;

/// Configures agent telemetry and starts it: one `tracing` layer, three signals. Made by
/// [`AgentTelemetry::builder`]; [`try_init`](Self::try_init) (or [`build`](Self::build))
/// gives the running [`AgentTelemetry`].
///
/// Each setter sets the application's value; the environment is applied over them (see the
/// crate's documentation) unless [`ignore_environment`](Self::ignore_environment) is called.
///
/// # Examples
///
/// ```
/// use agent_telemetry::{AgentTelemetry, TracesExporter};
///
/// # fn main() -> Result<(), agent_telemetry::Error> {
/// let telemetry = AgentTelemetry::builder()
///     .with_service_name("my-name-is-claude")
///     .with_metrics_addr(([127, 0, 0, 1], 0))
///     .with_traces_exporter(TracesExporter::None)
///     .ignore_environment()
///     .try_init()?;
///
/// #[tracing::instrument(name = "agent_execution")]
/// fn execute_agent(agent_name: &str, task: &str) -> &'static str {
///     "done"
/// }
/// execute_agent("backend-engineer", "Implement API");
///
/// let text = telemetry.metrics().render()?;
/// assert!(text.contains(r#"agent_executions_total{agent_name="backend-engineer",status="success"} 1"#));
/// telemetry.shutdown()?;
/// # Ok(())
/// # }
/// ```
pub struct AgentTelemetryBuilder {
    config: Config,
    read_environment: bool,
    span_exporter: Option<BoxedSpanExporter>,
    log_writer: Option<Box<dyn std::io::Write + Send>>,
}

impl std::fmt::Debug for AgentTelemetryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTelemetryBuilder")
            .field("config", &self.config)
            .field("read_environment", &self.read_environment)
            .field("span_exporter", &self.span_exporter)
            .field("log_writer", &self.log_writer.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl Default for AgentTelemetryBuilder {
    fn default() -> Self {
        AgentTelemetryBuilder::new()
    }
}

impl AgentTelemetryBuilder {
    /// The defaults of the guide: metrics on `0.0.0.0:8000`, OTLP/HTTP traces to
    /// `localhost:4318`, log lines on stdout.
    #[must_use]
    pub fn new() -> Self {
        AgentTelemetryBuilder {
            config: Config::default(),
            read_environment: true,
            span_exporter: None,
            log_writer: None,
        }
    }

    /// `service.name` of spans and log lines. Default `agents`; `OTEL_SERVICE_NAME`, else
    /// `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, overrides it.
    #[must_use]
    pub fn with_service_name(mut self, name: impl Into<String>) -> Self {
        self.config.service_name = name.into();
        self
    }

    /// `service.version` of spans, and the `version` label of `framework_info`. Default: this
    /// crate's version; `service.version` in `OTEL_RESOURCE_ATTRIBUTES` overrides it.
    #[must_use]
    pub fn with_service_version(mut self, version: impl Into<String>) -> Self {
        self.config.service_version = version.into();
        self
    }

    /// The `environment` label of `framework_info`, and `deployment.environment.name`. Default
    /// `production`; `AGENT_TELEMETRY_ENVIRONMENT` overrides it.
    #[must_use]
    pub fn with_environment(mut self, environment: impl Into<String>) -> Self {
        self.config.environment = environment.into();
        self
    }

    /// An extra resource attribute on every span, such as `openinference.project.name` (a
    /// Phoenix project). Default: none; `OTEL_RESOURCE_ATTRIBUTES` adds to them.
    #[must_use]
    pub fn with_resource_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.resource_attributes.insert(key.into(), value.into());
        self
    }

    /// The `scale` label of `framework_info`. Default `enterprise`; `AGENT_TELEMETRY_SCALE`
    /// overrides it.
    #[must_use]
    pub fn with_scale(mut self, scale: impl Into<String>) -> Self {
        self.config.scale = scale.into();
        self
    }

    /// Where `GET /metrics` is served; port 0 picks a free one
    /// ([`AgentTelemetry::metrics_addr`] tells which). Default `0.0.0.0:8000`;
    /// `AGENT_TELEMETRY_METRICS_ADDR` overrides it.
    #[must_use]
    pub fn with_metrics_addr(mut self, addr: impl Into<SocketAddr>) -> Self {
        self.config.metrics_addr = Some(addr.into());
        self
    }

    /// Requires `Authorization: Bearer <token>` on `/metrics`, the token read from `path` at
    /// start. Default: no token; `AGENT_TELEMETRY_METRICS_TOKEN_FILE` overrides it.
    #[must_use]
    pub fn with_metrics_bearer_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.metrics_token_file = Some(path.into());
        self
    }

    /// How many connections `/metrics` serves at once. Default 64;
    /// `AGENT_TELEMETRY_METRICS_MAX_CONNECTIONS` overrides it.
    #[must_use]
    pub fn with_metrics_max_connections(mut self, connections: usize) -> Self {
        self.config.metrics_max_connections = connections;
        self
    }

    /// Serves no `/metrics`; [`AgentTelemetry::metrics`] still renders the text. Default:
    /// served; `AGENT_TELEMETRY_METRICS_ADDR` overrides it.
    #[must_use]
    pub fn without_metrics_server(mut self) -> Self {
        self.config.metrics_addr = None;
        self
    }

    /// Writes log lines to daily files `<prefix>.YYYY-MM-DD.log` in `dir`. Default: stdout;
    /// `AGENT_TELEMETRY_LOG_DIR` overrides it.
    #[must_use]
    pub fn with_log_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.log_dir = Some(dir.into());
        self
    }

    /// Writes log lines to `writer`, on the log thread, instead of stdout or files; its
    /// failures and panics are counted as dropped lines. Default: none; no variable overrides
    /// it.
    #[must_use]
    pub fn with_log_writer(mut self, writer: impl std::io::Write + Send + 'static) -> Self {
        self.log_writer = Some(Box::new(writer));
        self.config.log_dir = None;
        self
    }

    /// The file name prefix of the daily log files. Default `agents`; no variable overrides it.
    #[must_use]
    pub fn with_log_file_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.log_file_prefix = prefix.into();
        self
    }

    /// The permissions of log files this crate creates, whatever the umask; directories get
    /// search permission where read is granted. Default `0o640`; no variable overrides it.
    #[must_use]
    pub fn with_log_file_mode(mut self, mode: u32) -> Self {
        self.config.log_file_mode = mode;
        self
    }

    /// How many formatted log lines may wait for the log thread before new ones are dropped and
    /// counted. Default 8192; no variable overrides it.
    #[must_use]
    pub fn with_log_queue_lines(mut self, lines: usize) -> Self {
        self.config.log_queue_lines = lines;
        self
    }

    /// The shape of the log line: the guide's, or ECS 8 names. Default [`LogFormat::Guide`];
    /// `AGENT_TELEMETRY_LOG_FORMAT` overrides it.
    #[must_use]
    pub fn with_log_format(mut self, format: LogFormat) -> Self {
        self.config.log_format = format;
        self
    }

    /// The longest `task` (and error message) a log line keeps, in characters. Default 1024; no
    /// variable overrides it.
    #[must_use]
    pub fn with_max_task_chars(mut self, chars: usize) -> Self {
        self.config.max_task_chars = chars;
        self
    }

    /// The longest span string attribute or event attribute, in characters. Default: the task
    /// limit; `OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT`, else
    /// `OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`, overrides it.
    #[must_use]
    pub fn with_attribute_value_length_limit(mut self, chars: usize) -> Self {
        self.config.attribute_value_chars = Some(chars);
        self
    }

    /// What scrubbing redacts from every signal: sensitive field names and secret patterns,
    /// more of them, or nothing. Default: on, the built-in rules;
    /// `AGENT_TELEMETRY_SCRUBBING=off` (or `on`) overrides it.
    #[must_use]
    pub fn with_scrubbing(mut self, scrubbing: Scrubbing) -> Self {
        self.config.scrubbing = scrubbing;
        self
    }

    /// What of the task the log line and the span carry: the text, a short stable hash, or
    /// nothing. Default [`TaskCapture::Full`]; `AGENT_TELEMETRY_TASK_CAPTURE` overrides it.
    #[must_use]
    pub fn with_task_capture(mut self, capture: TaskCapture) -> Self {
        self.config.task_capture = capture;
        self
    }

    /// Where spans go. Default [`TracesExporter::Otlp`]; `OTEL_TRACES_EXPORTER` overrides it.
    #[must_use]
    pub fn with_traces_exporter(mut self, exporter: TracesExporter) -> Self {
        self.config.traces_exporter = exporter;
        self
    }

    /// Sends spans to `exporter` (any OpenTelemetry `SpanExporter`, such as an in-memory one in
    /// tests) instead of the configured one; its failures and panics are counted. Default:
    /// none; no variable overrides it.
    #[must_use]
    pub fn with_span_exporter<E>(mut self, exporter: E) -> Self
    where
        E: opentelemetry_sdk::trace::SpanExporter + 'static,
    {
        self.span_exporter = Some(Box::new(exporter));
        self
    }

    /// The OTLP transport. Default [`OtlpProtocol::HttpProtobuf`];
    /// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`, overrides it.
    #[must_use]
    pub fn with_otlp_protocol(mut self, protocol: OtlpProtocol) -> Self {
        self.config.otlp.protocol = protocol;
        self
    }

    /// The OTLP endpoint: the full URL for HTTP, the base URL for gRPC; user-info is sent as
    /// HTTP Basic auth. Default `http://localhost:4318/v1/traces`;
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`, overrides it.
    #[must_use]
    pub fn with_otlp_endpoint(mut self, url: impl Into<String>) -> Self {
        self.config.otlp.endpoint = Some(url.into());
        self
    }

    /// A header sent with every OTLP export, such as an API key, its value never printed.
    /// Default: none; `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, else `OTEL_EXPORTER_OTLP_HEADERS`,
    /// adds to them.
    #[must_use]
    pub fn with_otlp_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.otlp.headers.push((name.into(), value.into()));
        self
    }

    /// The OTLP export timeout, per attempt, from 1 ms to 10 minutes. Default 10 s;
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT`, overrides it.
    #[must_use]
    pub fn with_otlp_timeout(mut self, timeout: Duration) -> Self {
        self.config.otlp.timeout = timeout;
        self
    }

    /// How many spans may wait for the span thread before new ones are dropped and counted (it
    /// is also bounded at 32 MiB). Default 8192; `OTEL_BSP_MAX_QUEUE_SIZE` overrides it.
    #[must_use]
    pub fn with_span_queue_size(mut self, spans: usize) -> Self {
        self.config.batch.max_queue_size = spans;
        self
    }

    /// The most spans an export request holds (it is also bounded at 4 MiB). Default 512;
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` overrides it.
    #[must_use]
    pub fn with_span_export_batch_size(mut self, spans: usize) -> Self {
        self.config.batch.max_export_batch_size = spans;
        self
    }

    /// The longest a span waits before it is exported; zero exports spans as they come. Default
    /// 5 s; `OTEL_BSP_SCHEDULE_DELAY` overrides it.
    #[must_use]
    pub fn with_span_export_delay(mut self, delay: Duration) -> Self {
        self.config.batch.scheduled_delay = delay;
        self
    }

    /// Which traces are sampled, agent spans and the spans `tracing-opentelemetry` builds
    /// alike. Default: parent-based, always on; `OTEL_TRACES_SAMPLER` and
    /// `OTEL_TRACES_SAMPLER_ARG` override it.
    #[must_use]
    pub fn with_sampler(mut self, sampler: opentelemetry_sdk::trace::Sampler) -> Self {
        self.config.sampler = sampler;
        self
    }

    /// The span names that are agent executions. Default `agent_execution`; no variable
    /// overrides it.
    #[must_use]
    pub fn with_agent_span_names<I, N>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        self.config.agent_span_names = names.into_iter().map(Into::into).collect();
        self
    }

    /// The duration histogram's bucket bounds, in seconds. Default the guide's 0.1, 0.5, 1, 2,
    /// 5, 10, 30, 60; no variable overrides it.
    #[must_use]
    pub fn with_duration_buckets(mut self, bounds: impl Into<Vec<f64>>) -> Self {
        self.config.duration_buckets = bounds.into();
        self
    }

    /// How many distinct `agent_name` label values the metrics keep; the rest are folded into
    /// `__overflow__` and counted. Default 256; no variable overrides it.
    #[must_use]
    pub fn with_max_agent_names(mut self, max: usize) -> Self {
        self.config.max_agent_names = max;
        self
    }

    /// How many distinct `model` label values the GenAI metrics keep; the rest are folded into
    /// `__overflow__` and counted. Default 64; no variable overrides it.
    #[must_use]
    pub fn with_max_model_names(mut self, max: usize) -> Self {
        self.config.max_model_names = max;
        self
    }

    /// How many distinct pairs of `agent_name` and `model` label values the GenAI metrics
    /// keep; the model of a pair past it is folded into `__overflow__`, under its agent, and
    /// counted. Default 512; no variable overrides it.
    #[must_use]
    pub fn with_max_agent_models(mut self, max: usize) -> Self {
        self.config.max_agent_models = max;
        self
    }

    /// Prices per model, for `agent_cost_usd_total` and the log line's `cost_usd`. Default
    /// none (no spend is computed); `AGENT_TELEMETRY_PRICES` names a TOML file that replaces
    /// them (see [`ModelPrices`](crate::ModelPrices)).
    #[must_use]
    pub fn with_model_prices(mut self, prices: crate::ModelPrices) -> Self {
        self.config.model_prices = Some(prices);
        self
    }

    /// Which other spans and events are traced and printed, in `RUST_LOG` syntax. Default
    /// `info`; `RUST_LOG` overrides it.
    #[must_use]
    pub fn with_env_filter(mut self, directives: impl Into<String>) -> Self {
        self.config.env_filter = directives.into();
        self
    }

    /// The bound on each part of shutdown and of a flush. Default 5 s; no variable overrides
    /// it.
    #[must_use]
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Uses the builder's values only: no environment variable is read. Default: the
    /// environment is read.
    #[must_use]
    pub fn ignore_environment(mut self) -> Self {
        self.read_environment = false;
        self
    }

    /// Starts the signals and returns the layer, for applications that compose their own
    /// subscriber, with the running telemetry that shuts the signals down.
    ///
    /// # Errors
    ///
    /// A bad setting, a `/metrics` port in use, an unusable log directory or an exporter that
    /// cannot be built: each error names the setting.
    ///
    /// # Examples
    ///
    /// ```
    /// use agent_telemetry::{AgentTelemetry, TracesExporter};
    /// use tracing_subscriber::layer::SubscriberExt;
    ///
    /// # fn main() -> Result<(), agent_telemetry::Error> {
    /// let (layer, telemetry) = AgentTelemetry::builder()
    ///     .without_metrics_server()
    ///     .with_traces_exporter(TracesExporter::None)
    ///     .ignore_environment()
    ///     .build()?;
    /// let subscriber = tracing_subscriber::registry().with(layer);
    /// tracing::subscriber::with_default(subscriber, || {
    ///     tracing::info_span!("agent_execution", agent_name = "qa-engineer", task = "Test").in_scope(|| {});
    /// });
    /// assert!(telemetry.metrics().render()?.contains(r#"agent_name="qa-engineer""#));
    /// # Ok(())
    /// # }
    /// ```
    pub fn build<S>(self) -> Result<(TelemetryLayer<S>, AgentTelemetry)>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let mut config = self.config;
        if self.read_environment {
            config.apply_env(&|name| std::env::var_os(name))?;
        } else {
            config.validate()?;
        }
        let names = Arc::new(AgentSpanNames::new(&config.agent_span_names));
        let stats = Arc::new(TelemetryStats::default());
        let resource = resource(&config);
        // One filter per layer that uses it; parsed before anything starts.
        let (traced_spans, traced_events) = (
            parse_env_filter(&config.env_filter)?,
            parse_env_filter(&config.env_filter)?,
        );

        let scrubber = Arc::new(config.scrubbing.build()?);
        let metrics = Arc::new(Metrics::new(&config, resource.clone(), Arc::clone(&stats))?);
        let traces = crate::traces::build(&config, self.span_exporter, &resource, &stats, &scrubber)?;
        let agent_tracer = traces.as_ref().map(|traces| Arc::clone(&traces.agents));
        let lines = Arc::new(crate::logs::start(&config, self.log_writer, &stats)?);
        let server = match config.metrics_addr {
            Some(addr) => {
                let token = config
                    .metrics_token_file
                    .as_deref()
                    .map(|path| BearerToken::from_file(path, "AGENT_TELEMETRY_METRICS_TOKEN_FILE"))
                    .transpose()?;
                let limits = ServerLimits {
                    token,
                    max_connections: config.metrics_max_connections,
                };
                Some(MetricsServer::start(
                    addr,
                    metrics.handle(),
                    limits,
                    Arc::clone(&stats),
                )?)
            }
            None => None,
        };

        let signals = Signals {
            metrics: Arc::clone(&metrics),
            lines: Arc::clone(&lines),
            tracer: agent_tracer,
        };
        let (execution_filter, otel) = match &traces {
            Some(traces) => {
                // Events `RUST_LOG` selects reach the execution side too: those directly
                // inside an agent span become its span events.
                let events = Some((traced_events, config.env_filter.as_str()));
                let otel_layer = tracing_opentelemetry::layer()
                    .with_tracer(traces.provider.tracer("agent_telemetry"))
                    .with_threads(false)
                    .with_tracked_inactivity(false);
                let otel_filter = TracedFilter::new(Arc::clone(&names), traced_spans, &config.env_filter);
                (
                    ExecutionFilter::new(Arc::clone(&names), events),
                    Some((otel_layer, otel_filter)),
                )
            }
            None => (ExecutionFilter::new(Arc::clone(&names), None), None),
        };
        let (otel_layer, otel_filter) = otel.unzip();
        let filter = Arc::new(LayerFilter::new(execution_filter, otel_filter));
        let executions = ExecutionLayer::new(
            signals,
            TextPolicy::new(&config, Arc::clone(&scrubber)),
            names,
            config.model_prices.clone(),
            otel_layer,
            Arc::clone(&filter),
        );
        let layer: TelemetryLayer<S> = Box::new(executions.with_filter(SharedFilter(filter)));

        let telemetry = AgentTelemetry {
            metrics,
            lines,
            tracer_provider: traces.map(|traces| traces.provider),
            server,
            config: Arc::new(config),
            scrubber,
            done: false,
        };
        Ok((layer, telemetry))
    }

    /// Builds the layer and installs it as the global default subscriber, with a formatter
    /// that prints the other events `RUST_LOG` selects to stderr, their fields and their
    /// spans' scrubbed as every signal's are.
    ///
    /// # Errors
    ///
    /// Everything [`build`](Self::build) reports, and [`Error::GlobalSubscriber`] when a
    /// global subscriber is already installed.
    pub fn try_init(self) -> Result<AgentTelemetry> {
        let directives = if self.read_environment {
            std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty())
        } else {
            None
        };
        let print_filter = parse_env_filter(directives.as_deref().unwrap_or(&self.config.env_filter))?;
        let (layer, telemetry) = self.build()?;
        let printer = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .fmt_fields(ScrubbedFields::new(Arc::clone(&telemetry.scrubber)))
            .with_filter(print_filter);
        tracing_subscriber::registry()
            .with(layer)
            .with(printer)
            .try_init()
            .map_err(|e| Error::GlobalSubscriber { source: Box::new(e) })?;
        Ok(telemetry)
    }

    /// Like [`try_init`](Self::try_init), for `main`: panics with the error's message.
    ///
    /// # Panics
    ///
    /// When [`try_init`](Self::try_init) returns an error.
    pub fn init(self) -> AgentTelemetry {
        match self.try_init() {
            Ok(telemetry) => telemetry,
            Err(error) => panic!("agent-telemetry could not be installed: {error}"),
        }
    }
}

/// Parses `RUST_LOG`-style directives, each trimmed first: `tracing-subscriber` splits on
/// commas as is, so it rejects `info, app=debug` (tokio-rs/tracing#2452) and panics on a space
/// before a non-ASCII target (`info, é=debug`). A panic left in its parser is an error too.
/// A field filter's value matches the field's text exactly (a string field's, or another's
/// `Debug` text), never as a regular expression: the filter compiles one into a full DFA,
/// exponential in the pattern, so each is escaped into a literal first.
fn parse_env_filter(directives: &str) -> Result<EnvFilter> {
    let trimmed: Vec<&str> = directives.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    let literal = literal_field_values(&trimmed.join(","));
    match panics::catching(|| EnvFilter::builder().parse(&literal)) {
        Ok(Ok(filter)) => Ok(filter),
        Ok(Err(error)) => Err(Error::invalid("RUST_LOG", directives, error.to_string())),
        Err(panic) => Err(Error::invalid(
            "RUST_LOG",
            directives,
            format!("the filter's parser panicked: {panic}"),
        )),
    }
}

/// `directives` with every field filter's value (`[span{field=value}]`) that is not a number or
/// a boolean made a regular expression matching exactly its text: a string field's, or the
/// `Debug` text of a field recorded with `?`. A value in quotes (`"alice"`, as tracing's
/// literal form writes it) stands for the text between them.
fn literal_field_values(directives: &str) -> String {
    let literal = |field: &str| match field.split_once('=') {
        Some((name, value))
            if value.parse::<bool>().is_err() && value.parse::<i64>().is_err() && value.parse::<f64>().is_err() =>
        {
            let text = value
                .strip_prefix('"')
                .and_then(|inner| inner.strip_suffix('"'))
                .unwrap_or(value);
            // A `}` (`Debug` writes some characters as `\u{…}`) would end the directive's
            // field list: written as `\x7D`, which the pattern reads as the same character.
            let debug = regex::escape(&format!("{text:?}")).replace(r"\}", r"\x7D");
            format!("{name}=^(?:{}|{debug})$", regex::escape(text))
        }
        _ => field.to_owned(),
    };
    let mut out = String::with_capacity(directives.len());
    // The field being read, while inside `{…}`.
    let mut field: Option<String> = None;
    for c in directives.chars() {
        match (field.as_mut(), c) {
            (None, '{') => {
                out.push(c);
                field = Some(String::new());
            }
            (None, c) => out.push(c),
            (Some(text), ',' | '}') => {
                out.push_str(&literal(text));
                out.push(c);
                if c == '}' {
                    field = None;
                } else {
                    text.clear();
                }
            }
            (Some(text), c) => text.push(c),
        }
    }
    // An unclosed `{`: left to the parser to refuse.
    out.push_str(field.as_deref().unwrap_or_default());
    out
}

fn resource(config: &Config) -> Resource {
    let extra = config
        .resource_attributes
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()));
    Resource::builder_empty()
        .with_attributes(extra)
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", config.service_version.clone()))
        .with_attribute(KeyValue::new("deployment.environment.name", config.environment.clone()))
        .build()
}

/// The running telemetry: its metrics, where it sends what, and its shutdown. Dropping it (or
/// [`shutdown`](Self::shutdown)) flushes the queued spans and log lines and stops the
/// `/metrics` server, each within the shutdown timeout.
///
/// Made by [`AgentTelemetryBuilder::try_init`] or [`AgentTelemetryBuilder::build`], from
/// [`AgentTelemetry::builder`].
#[must_use = "dropping the telemetry shuts it down at once"]
pub struct AgentTelemetry {
    metrics: Arc<Metrics>,
    lines: Arc<LineQueue>,
    tracer_provider: Option<SdkTracerProvider>,
    server: Option<MetricsServer>,
    config: Arc<Config>,
    /// The scrubber every signal uses, for the stderr printer `try_init` installs.
    scrubber: Arc<Scrubber>,
    done: bool,
}

impl std::fmt::Debug for AgentTelemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTelemetry")
            .field("metrics_addr", &self.metrics_addr())
            .field("traces", &self.config.traces_exporter)
            .field("log_dir", &self.config.log_dir)
            .finish_non_exhaustive()
    }
}

impl AgentTelemetry {
    /// A builder with the defaults of the guide: metrics on `0.0.0.0:8000`, OTLP/HTTP traces
    /// to `localhost:4318`, log lines on stdout.
    pub fn builder() -> AgentTelemetryBuilder {
        AgentTelemetryBuilder::new()
    }

    /// The address `/metrics` is served on (with the real port when port 0 was asked for).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(MetricsServer::local_addr)
    }

    /// The metrics, to render the exposition text in an application's own HTTP server.
    pub fn metrics(&self) -> MetricsHandle {
        self.metrics.handle()
    }

    /// Exports the spans and writes the log lines queued so far, without stopping anything.
    ///
    /// # Errors
    ///
    /// [`Error::Shutdown`] naming the signal that could not be flushed within the timeout.
    pub fn flush(&self) -> Result<()> {
        // Lines, then spans: each waits for its own thread.
        let logs = self.lines.flush(self.config.shutdown_timeout);
        let traces = match &self.tracer_provider {
            Some(provider) => provider.force_flush().map_err(|e| Error::Shutdown {
                signal: "traces",
                reason: e.to_string(),
            }),
            None => Ok(()),
        };
        logs.and(traces)
    }

    /// One line per signal saying where it goes, for a program to print at start.
    pub fn describe(&self) -> String {
        let config = &self.config;
        let metrics = match self.metrics_addr() {
            Some(addr) => format!("metrics: http://{addr}/metrics"),
            None => "metrics: not served (AgentTelemetry::metrics renders them)".to_owned(),
        };
        let logs = match &config.log_dir {
            Some(dir) => format!("logs:    {}/{}.YYYY-MM-DD.log", dir.display(), config.log_file_prefix),
            None => "logs:    stdout".to_owned(),
        };
        let traces = match config.traces_exporter {
            TracesExporter::Otlp => format!(
                "traces:  OTLP/{} to {}",
                match config.otlp.protocol {
                    OtlpProtocol::HttpProtobuf => "HTTP",
                    OtlpProtocol::Grpc => "gRPC",
                },
                config.otlp.display_endpoint()
            ),
            TracesExporter::Console => "traces:  console (stdout)".to_owned(),
            TracesExporter::None => "traces:  off".to_owned(),
        };
        format!("{metrics}\n{logs}\n{traces}")
    }

    /// Flushes spans and log lines and stops the server, each within the shutdown timeout.
    ///
    /// # Errors
    ///
    /// [`Error::Shutdown`] naming the signal that could not finish in time; the others are
    /// still shut down.
    pub fn shutdown(mut self) -> Result<()> {
        self.shutdown_all()
    }

    fn shutdown_all(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.done, true) {
            return Ok(());
        }
        let timeout = self.config.shutdown_timeout;
        // Lines, then spans: each thread finishes what it was handed, and counts what comes
        // after.
        let logs = self.lines.shutdown(timeout);
        let traces = match self.tracer_provider.take() {
            Some(provider) => provider.shutdown_with_timeout(timeout).map_err(|e| Error::Shutdown {
                signal: "traces",
                reason: e.to_string(),
            }),
            None => Ok(()),
        };
        if let Some(mut server) = self.server.take() {
            server.stop();
        }
        let metrics = self.metrics.shutdown();
        traces.and(logs).and(metrics)
    }
}

impl Drop for AgentTelemetry {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown_all() {
            eprintln!("agent-telemetry: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::literal_field_values;

    #[test]
    fn field_filter_values_become_literals_and_the_rest_is_kept() {
        assert_eq!(literal_field_values("info,app=debug"), "info,app=debug");
        assert_eq!(
            literal_field_values("warn,app[request{user=a.b*,id=42,ok=true,ratio=0.5}]=debug"),
            r#"warn,app[request{user=^(?:a\.b\*|"a\.b\*")$,id=42,ok=true,ratio=0.5}]=debug"#
        );
        assert_eq!(
            literal_field_values("[{x=[ab]*}]=info"),
            r#"[{x=^(?:\[ab\]\*|"\[ab\]\*")$}]=info"#
        );
        assert_eq!(
            literal_field_values(r#"[{user="alice"}]=info"#),
            r#"[{user=^(?:alice|"alice")$}]=info"#
        );
        // Its `Debug` text escapes the zero-width space as `\u{200b}`, whose `}` would end the
        // field list.
        assert_eq!(
            literal_field_values("[{user=a\u{200b}b}]=info"),
            "[{user=^(?:a\u{200b}b|\"a\\\\u\\{200b\\x7Db\")$}]=info"
        );
        assert_eq!(literal_field_values("[{present}]=info"), "[{present}]=info");
        assert_eq!(literal_field_values("[{unclosed=a.b"), "[{unclosed=a.b");
    }
}
