//! Settings: their defaults, and how the environment overrides what the builder set.
//!
//! The builder gives the application's choices; the environment is applied second so an
//! operator can change a deployment without a rebuild. Every value is checked here, so a typo becomes an [`Error`] that
//! names the variable instead of a silent default.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opentelemetry_sdk::trace::Sampler;

use crate::error::{Error, Result};
use crate::metrics::series_limits::{SeriesLimits, MAX_SERIES};

pub(crate) mod file;
mod otlp;

pub(crate) use otlp::OtlpConfig;

/// The default mode of log files: the owner reads and writes, the group reads.
pub(crate) const DEFAULT_LOG_FILE_MODE: u32 = 0o640;

/// The guide's histogram buckets, in seconds.
pub const DEFAULT_DURATION_BUCKETS: [f64; 8] = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

/// Where trace spans go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TracesExporter {
    /// OTLP to a collector (HTTP/protobuf unless `OTEL_EXPORTER_OTLP_PROTOCOL` says `grpc`).
    Otlp,
    /// Human-readable spans on standard output, as the guide's `ConsoleSpanExporter`.
    Console,
    /// No traces; metrics and logs still work.
    None,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies: the default, needs no async runtime.
    HttpProtobuf,
    /// OTLP/gRPC: needs the `grpc` cargo feature and a tokio runtime.
    Grpc,
}

/// The shape of the JSON log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// The guide's fields plus trace correlation (see the README).
    #[default]
    Guide,
    /// Elastic Common Schema 8 names (`event.outcome`, `event.duration` in nanoseconds, ...).
    Ecs,
}

/// What of an agent's task the log line and the span carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TaskCapture {
    /// The task text, cut at its limit and scrubbed: the guide's line.
    #[default]
    Full,
    /// `sha256:` and the first 16 hex digits of the SHA-256 of the task as kept (its first
    /// characters up to the limit), so that identical tasks still group; never the text.
    Hash,
    /// No task at all: the line has no `task` field, the span no `task` attribute.
    Off,
}

/// Every setting, resolved.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub service_name: String,
    pub service_version: String,
    pub environment: String,
    pub scale: String,
    pub resource_attributes: BTreeMap<String, String>,
    pub metrics_addr: Option<SocketAddr>,
    /// A file holding the bearer token `/metrics` requests must present.
    pub metrics_token_file: Option<PathBuf>,
    /// Connections the `/metrics` server serves at once.
    pub metrics_max_connections: usize,
    pub log_dir: Option<PathBuf>,
    pub log_file_prefix: String,
    /// The mode of log files this crate creates (directories get search permission too).
    pub log_file_mode: u32,
    pub log_format: LogFormat,
    pub log_queue_lines: usize,
    pub max_task_chars: usize,
    /// Span string attributes and event attributes are cut at this many characters; `None`:
    /// at `max_task_chars`.
    pub attribute_value_chars: Option<usize>,
    pub scrubbing: crate::scrub::Scrubbing,
    pub task_capture: TaskCapture,
    pub agent_span_names: Vec<String>,
    pub duration_buckets: Vec<f64>,
    pub max_agent_names: usize,
    /// The most distinct `model` label values the metrics keep.
    pub max_model_names: usize,
    /// The most distinct pairs of `agent_name` and `model` the metrics keep.
    pub max_agent_models: usize,
    /// `None`: no spend is computed.
    pub model_prices: Option<crate::prices::ModelPrices>,
    pub traces_exporter: TracesExporter,
    pub otlp: OtlpConfig,
    pub batch: BatchSettings,
    pub env_filter: String,
    pub sampler: Sampler,
    pub shutdown_timeout: Duration,
}

/// The batch span processor's settings (`OTEL_BSP_*`), and its bounds in bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchSettings {
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    pub scheduled_delay: Duration,
    /// The spans waiting for the span thread hold at most about this many bytes.
    pub max_queue_bytes: usize,
    /// An export request holds at most about this many bytes of spans, or one span.
    pub max_export_bytes: usize,
}

/// The default of [`BatchSettings::max_queue_bytes`].
pub(crate) const DEFAULT_MAX_QUEUE_BYTES: usize = 32 * 1024 * 1024;

/// The default of [`BatchSettings::max_export_bytes`].
pub(crate) const DEFAULT_MAX_EXPORT_BYTES: usize = 4 * 1024 * 1024;

impl Default for Config {
    fn default() -> Self {
        Config {
            service_name: "agents".to_owned(),
            service_version: env!("CARGO_PKG_VERSION").to_owned(),
            environment: "production".to_owned(),
            scale: "enterprise".to_owned(),
            resource_attributes: BTreeMap::new(),
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 8000))),
            metrics_token_file: None,
            metrics_max_connections: crate::metrics::server::DEFAULT_MAX_CONNECTIONS,
            log_dir: None,
            log_file_prefix: "agents".to_owned(),
            log_file_mode: DEFAULT_LOG_FILE_MODE,
            log_format: LogFormat::Guide,
            log_queue_lines: 8_192,
            max_task_chars: 1024,
            attribute_value_chars: None,
            scrubbing: crate::scrub::Scrubbing::default(),
            task_capture: TaskCapture::Full,
            agent_span_names: vec!["agent_execution".to_owned()],
            duration_buckets: DEFAULT_DURATION_BUCKETS.to_vec(),
            max_agent_names: 256,
            max_model_names: 64,
            max_agent_models: 512,
            model_prices: None,
            traces_exporter: TracesExporter::Otlp,
            otlp: OtlpConfig::new(),
            batch: BatchSettings {
                // Not the SDK's 2048: 100 ms at the 20,000 executions a second this crate is
                // built for, less than one stalled export. As many as the log queue.
                max_queue_size: 8192,
                max_export_batch_size: 512,
                scheduled_delay: Duration::from_secs(5),
                max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
                max_export_bytes: DEFAULT_MAX_EXPORT_BYTES,
            },
            env_filter: "info".to_owned(),
            sampler: Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// The variables whose blank value is an error rather than an unset variable, with what to
/// set instead.
const BLANK_IS_AN_ERROR: [(&str, &str); 3] = [
    (
        "AGENT_TELEMETRY_METRICS_TOKEN_FILE",
        "name the file holding the bearer token /metrics requires",
    ),
    (
        "AGENT_TELEMETRY_METRICS_ADDR",
        "give the address to serve /metrics on, or off",
    ),
    ("AGENT_TELEMETRY_TASK_CAPTURE", "give full, hash or off"),
];

impl Config {
    /// The most characters of a span string attribute or event attribute.
    pub(crate) fn attribute_value_chars(&self) -> usize {
        self.attribute_value_chars.unwrap_or(self.max_task_chars)
    }

    /// Applies the environment over the builder's values, then checks the result. A variable
    /// whose value is not UTF-8 is an error naming it, never an unset one: a token file's
    /// path left unread would serve `/metrics` to anyone. So is a blank value of one of
    /// [`BLANK_IS_AN_ERROR`]; any other blank variable is an unset one.
    pub(crate) fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<OsString>) -> Result<()> {
        // Set but blank, these would be unset, and their default is the less guarded one:
        // `/metrics` served to anyone, on every interface, and tasks captured in full. An
        // operator who set one meant something (a secret missing from the deployment, say).
        for (name, meant) in BLANK_IS_AN_ERROR {
            if env(name).is_some_and(|value| value.to_str().is_some_and(|v| v.trim().is_empty())) {
                return Err(Error::invalid(
                    name,
                    "",
                    format!("set but empty: {meant}, or unset the variable for the default"),
                ));
            }
        }
        let not_unicode = RefCell::new(None);
        // An empty variable is an unset one, as the OpenTelemetry specification says.
        let var = |name: &str| {
            let Ok(value) = env(name)?.into_string() else {
                not_unicode.borrow_mut().get_or_insert_with(|| name.to_owned());
                return None;
            };
            Some(value).filter(|v| !v.trim().is_empty())
        };
        self.apply_agent_telemetry_env(&var)?;
        self.apply_resource_env(&var)?;
        self.apply_traces_env(&var)?;
        if let Some(v) = var("RUST_LOG") {
            self.env_filter = v;
        }
        if let Some(name) = not_unicode.into_inner() {
            return Err(Error::invalid(name, "[not UTF-8]", "the value is not valid UTF-8"));
        }
        self.validate()
    }

    /// The crate's own `AGENT_TELEMETRY_*` variables.
    fn apply_agent_telemetry_env(&mut self, var: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = var("AGENT_TELEMETRY_METRICS_ADDR") {
            self.metrics_addr = parse_metrics_addr("AGENT_TELEMETRY_METRICS_ADDR", &v)?;
        }
        if let Some(v) = var("AGENT_TELEMETRY_METRICS_TOKEN_FILE") {
            self.metrics_token_file = Some(PathBuf::from(v));
        }
        if let Some(v) = var("AGENT_TELEMETRY_METRICS_MAX_CONNECTIONS") {
            self.metrics_max_connections = parse_count("AGENT_TELEMETRY_METRICS_MAX_CONNECTIONS", &v)?;
        }
        if let Some(v) = var("AGENT_TELEMETRY_LOG_DIR") {
            self.log_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = var("AGENT_TELEMETRY_LOG_FORMAT") {
            self.log_format = match v.trim().to_ascii_lowercase().as_str() {
                "guide" | "json" => LogFormat::Guide,
                "ecs" => LogFormat::Ecs,
                _ => return Err(Error::invalid("AGENT_TELEMETRY_LOG_FORMAT", v, "expected guide or ecs")),
            };
        }
        if let Some(v) = var("AGENT_TELEMETRY_SCRUBBING") {
            match v.trim().to_ascii_lowercase().as_str() {
                "off" | "false" | "0" | "none" => self.scrubbing = crate::scrub::Scrubbing::off(),
                "on" | "true" | "1" => {
                    if !self.scrubbing.is_enabled() {
                        self.scrubbing = crate::scrub::Scrubbing::default();
                    }
                }
                _ => return Err(Error::invalid("AGENT_TELEMETRY_SCRUBBING", v, "expected on or off")),
            }
        }
        if let Some(v) = var("AGENT_TELEMETRY_TASK_CAPTURE") {
            self.task_capture = match v.trim().to_ascii_lowercase().as_str() {
                "full" => TaskCapture::Full,
                "hash" => TaskCapture::Hash,
                "off" | "none" => TaskCapture::Off,
                _ => {
                    return Err(Error::invalid(
                        "AGENT_TELEMETRY_TASK_CAPTURE",
                        v,
                        "expected full, hash or off",
                    ))
                }
            };
        }
        if let Some(v) = var("AGENT_TELEMETRY_PRICES") {
            let prices = crate::prices::ModelPrices::read_file(Path::new(&v), Some("AGENT_TELEMETRY_PRICES"))?;
            self.model_prices = Some(prices);
        }
        if let Some(v) = var("AGENT_TELEMETRY_ENVIRONMENT") {
            self.environment = v;
        }
        if let Some(v) = var("AGENT_TELEMETRY_SCALE") {
            self.scale = v;
        }
        Ok(())
    }

    /// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`, which wins over it.
    fn apply_resource_env(&mut self, var: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = var("OTEL_RESOURCE_ATTRIBUTES") {
            let attributes = parse_resource_attributes(&v)?;
            if let Some(name) = attributes.get("service.name") {
                self.service_name.clone_from(name);
            }
            if let Some(version) = attributes.get("service.version") {
                self.service_version.clone_from(version);
            }
            if let Some(environment) = attributes.get("deployment.environment.name") {
                self.environment.clone_from(environment);
            }
            self.resource_attributes.extend(attributes);
        }
        if let Some(v) = var("OTEL_SERVICE_NAME") {
            self.service_name = v;
        }
        Ok(())
    }

    /// The exporter, OTLP, batching, attribute limit and sampler variables.
    fn apply_traces_env(&mut self, var: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = var("OTEL_TRACES_EXPORTER") {
            self.traces_exporter = parse_traces_exporter(&v)?;
        }
        self.apply_otlp_env(var)?;
        if let Some(v) = var("OTEL_BSP_MAX_QUEUE_SIZE") {
            self.batch.max_queue_size = parse_count("OTEL_BSP_MAX_QUEUE_SIZE", &v)?;
        }
        if let Some(v) = var("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
            self.batch.max_export_batch_size = parse_count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", &v)?;
        }
        if let Some(v) = var("OTEL_BSP_SCHEDULE_DELAY") {
            self.batch.scheduled_delay = parse_millis("OTEL_BSP_SCHEDULE_DELAY", &v)?;
        }
        // The span limit replaces the general one, as the specification says.
        if let Some((name, v)) = first_set(
            var,
            &[
                "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
                "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
            ],
        ) {
            self.attribute_value_chars = Some(parse_count(name, &v)?);
        }
        if let Some(v) = var("OTEL_TRACES_SAMPLER") {
            self.sampler = parse_sampler(&v, var("OTEL_TRACES_SAMPLER_ARG").as_deref())?;
        }
        Ok(())
    }

    /// `OTEL_EXPORTER_OTLP_*`: each signal's variable replaces the general one.
    fn apply_otlp_env(&mut self, var: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        if let Some((name, v)) = first_set(
            var,
            &["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"],
        ) {
            self.otlp.protocol = parse_protocol(name, &v)?;
        }
        if let Some(v) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            self.otlp.endpoint = Some(v);
            self.otlp.target("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")?;
        } else if let Some(v) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            otlp::parse_url("OTEL_EXPORTER_OTLP_ENDPOINT", &v)?;
            self.otlp.endpoint = Some(match self.otlp.protocol {
                // The spec: the signal path is appended to the base endpoint for HTTP only.
                OtlpProtocol::HttpProtobuf => with_traces_path(&v),
                OtlpProtocol::Grpc => v,
            });
            self.otlp.target("OTEL_EXPORTER_OTLP_ENDPOINT")?;
        }
        if let Some((name, v)) = first_set(
            var,
            &["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"],
        ) {
            self.otlp.headers.extend(otlp::parse_headers(name, &v)?);
        }
        if let Some((name, v)) = first_set(
            var,
            &["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"],
        ) {
            self.otlp.timeout = parse_millis(name, &v)?;
            self.otlp.check_timeout(name)?;
        }
        Ok(())
    }

    /// Checks the values the builder can set to something unusable.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(prices) = &self.model_prices {
            prices.check()?;
        }
        if self.agent_span_names.is_empty() {
            return Err(Error::invalid(
                "with_agent_span_names",
                "[]",
                "at least one span name is needed to recognise agent executions",
            ));
        }
        let buckets = &self.duration_buckets;
        let increasing = buckets.windows(2).all(|pair| pair[0] < pair[1]);
        if buckets.is_empty() || !increasing || buckets.iter().any(|b| !b.is_finite()) {
            return Err(Error::invalid(
                "with_duration_buckets",
                format!("{buckets:?}"),
                "bucket bounds must be finite and strictly increasing",
            ));
        }
        if self.max_agent_names == 0 {
            return Err(Error::invalid(
                "with_max_agent_names",
                "0",
                "at least one agent_name label value must be allowed",
            ));
        }
        let series = SeriesLimits::new(self.max_agent_names, self.max_model_names, self.max_agent_models).largest();
        if series > MAX_SERIES {
            return Err(Error::invalid(
                "with_max_agent_names",
                self.max_agent_names.to_string(),
                format!(
                    "the caps let a metric hold {series} series, past the {MAX_SERIES} its table is sized for up front: lower with_max_agent_names, with_max_model_names or with_max_agent_models"
                ),
            ));
        }
        if self.batch.max_queue_size == 0 || self.batch.max_export_batch_size == 0 {
            return Err(Error::invalid(
                "with_span_queue_size",
                "0",
                "the span queue and export batches need room for a span",
            ));
        }
        if self.metrics_max_connections == 0 {
            return Err(Error::invalid(
                "with_metrics_max_connections",
                "0",
                "the /metrics server needs room for a connection",
            ));
        }
        if self.log_queue_lines == 0 {
            return Err(Error::invalid(
                "with_log_queue_lines",
                "0",
                "the queue needs room for a line",
            ));
        }
        if self.log_file_prefix.is_empty() || self.log_file_prefix.contains(['/', '\\']) {
            return Err(Error::invalid(
                "with_log_file_prefix",
                &self.log_file_prefix,
                "a file name prefix must be non-empty and contain no path separator",
            ));
        }
        if self.batch.max_export_batch_size > self.batch.max_queue_size {
            return Err(Error::invalid(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                self.batch.max_export_batch_size.to_string(),
                "must not exceed OTEL_BSP_MAX_QUEUE_SIZE",
            ));
        }
        let wants_grpc = self.traces_exporter == TracesExporter::Otlp && self.otlp.protocol == OtlpProtocol::Grpc;
        if wants_grpc && !cfg!(feature = "grpc") {
            return Err(Error::invalid(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "grpc",
                "OTLP/gRPC needs agent-telemetry's `grpc` cargo feature",
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err(Error::invalid(
                "with_service_name",
                &self.service_name,
                "service.name must not be empty",
            ));
        }
        self.otlp.validate("with_otlp_endpoint", "with_otlp_timeout")
    }
}

/// The first of `names` that is set, with its value.
fn first_set<'n>(var: &dyn Fn(&str) -> Option<String>, names: &[&'n str]) -> Option<(&'n str, String)> {
    names.iter().find_map(|&name| var(name).map(|value| (name, value)))
}

/// Parses a `/metrics` address: `host:port`, `:port`, a bare port, or `off`.
pub(crate) fn parse_metrics_addr(setting: &str, value: &str) -> Result<Option<SocketAddr>> {
    let value = value.trim();
    if ["off", "none", "false", "disabled"]
        .iter()
        .any(|off| value.eq_ignore_ascii_case(off))
    {
        return Ok(None);
    }
    let reason = "expected host:port (such as 0.0.0.0:8000 or 127.0.0.1:0), :port, a port, or `off`";
    if let Ok(port) = value.trim_start_matches(':').parse::<u16>() {
        return Ok(Some(SocketAddr::from(([0, 0, 0, 0], port))));
    }
    let value = value
        .strip_prefix("localhost:")
        .map_or_else(|| value.to_owned(), |port| format!("127.0.0.1:{port}"));
    value
        .parse()
        .map(Some)
        .map_err(|_| Error::invalid(setting, value, reason))
}

fn parse_traces_exporter(value: &str) -> Result<TracesExporter> {
    // The spec allows a comma-separated list; one exporter is all this crate runs.
    match value.trim().to_ascii_lowercase().as_str() {
        "otlp" => Ok(TracesExporter::Otlp),
        "console" | "stdout" | "logging" => Ok(TracesExporter::Console),
        "none" => Ok(TracesExporter::None),
        _ => Err(Error::invalid(
            "OTEL_TRACES_EXPORTER",
            value,
            "expected otlp, console or none",
        )),
    }
}

fn parse_protocol(setting: &str, value: &str) -> Result<OtlpProtocol> {
    match value.trim() {
        "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
        "grpc" => Ok(OtlpProtocol::Grpc),
        _ => Err(Error::invalid(setting, value, "expected http/protobuf or grpc")),
    }
}

/// `base` with the traces' path appended, as the specification builds the HTTP endpoint from
/// `OTEL_EXPORTER_OTLP_ENDPOINT`: after the path, before any query.
fn with_traces_path(base: &str) -> String {
    let (base, query) = base.split_once('?').map_or((base, None), |(b, q)| (b, Some(q)));
    let path = format!("{}/v1/traces", base.trim_end_matches('/'));
    match query {
        Some(query) => format!("{path}?{query}"),
        None => path,
    }
}

fn parse_millis(setting: &str, value: &str) -> Result<Duration> {
    value
        .trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| Error::invalid(setting, value, "expected a whole number of milliseconds"))
}

fn parse_count(setting: &str, value: &str) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::invalid(setting, value, "expected a whole number greater than 0")),
    }
}

/// The spec's sampler names; the ratio defaults to 1 when `OTEL_TRACES_SAMPLER_ARG` is unset.
fn parse_sampler(value: &str, arg: Option<&str>) -> Result<Sampler> {
    let ratio = match arg {
        None => 1.0,
        Some(arg) => match arg.trim().parse::<f64>() {
            Ok(ratio) if (0.0..=1.0).contains(&ratio) => ratio,
            _ => {
                return Err(Error::invalid(
                    "OTEL_TRACES_SAMPLER_ARG",
                    arg,
                    "expected a ratio from 0 to 1",
                ))
            }
        },
    };
    Ok(match value.trim() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
        _ => {
            return Err(Error::invalid(
                "OTEL_TRACES_SAMPLER",
                value,
                "expected one of always_on, always_off, traceidratio, parentbased_always_on, \
                 parentbased_always_off, parentbased_traceidratio",
            ))
        }
    })
}

/// Parses `key=value,key2=value2` with percent-encoded values, as the spec writes them.
fn parse_resource_attributes(value: &str) -> Result<BTreeMap<String, String>> {
    const NAME: &str = "OTEL_RESOURCE_ATTRIBUTES";
    let mut attributes = BTreeMap::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, val) = pair
            .split_once('=')
            .ok_or_else(|| Error::invalid(NAME, value, format!("`{pair}` is not key=value")))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(Error::invalid(NAME, value, format!("`{pair}` has an empty key")));
        }
        let decoded = otlp::decode_percent(val.trim())
            .ok_or_else(|| Error::invalid(NAME, value, format!("`{val}` has a bad %-escape")))?;
        if key == "service.name" && decoded.trim().is_empty() {
            return Err(Error::invalid(NAME, value, "service.name must not be empty"));
        }
        attributes.insert(key.to_owned(), decoded);
    }
    Ok(attributes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(vars: &[(&str, &str)]) -> Result<Config> {
        let vars: BTreeMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let mut config = Config::default();
        config.apply_env(&|name| vars.get(name).map(OsString::from))?;
        Ok(config)
    }

    #[test]
    fn defaults_are_the_guides() {
        let config = apply(&[]).unwrap();
        assert_eq!(config.metrics_addr, Some("0.0.0.0:8000".parse().unwrap()));
        assert_eq!(config.duration_buckets, DEFAULT_DURATION_BUCKETS);
        assert_eq!(
            (config.environment.as_str(), config.scale.as_str()),
            ("production", "enterprise")
        );
        assert_eq!(config.otlp.display_endpoint(), "http://localhost:4318/v1/traces");
    }

    #[test]
    fn metrics_addr_forms() {
        let parse = |v| parse_metrics_addr("X", v).unwrap();
        assert_eq!(parse("off"), None);
        assert_eq!(parse(":9100"), Some("0.0.0.0:9100".parse().unwrap()));
        assert_eq!(parse("127.0.0.1:0"), Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(parse("localhost:9"), Some("127.0.0.1:9".parse().unwrap()));
        let err = parse_metrics_addr("AGENT_TELEMETRY_METRICS_ADDR", "nope:x").unwrap_err();
        assert!(err.to_string().contains("AGENT_TELEMETRY_METRICS_ADDR"), "{err}");
    }

    #[test]
    fn endpoint_rules_follow_the_spec() {
        let c = apply(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        assert_eq!(c.otlp.display_endpoint(), "http://collector:4318/v1/traces");
        let c = apply(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:1/x"),
        ])
        .unwrap();
        assert_eq!(c.otlp.display_endpoint(), "http://other:1/x");
        for bad in ["collector:4318", "http://", "http://host:port", "ftp://x"] {
            let err = apply(&[("OTEL_EXPORTER_OTLP_ENDPOINT", bad)]).unwrap_err();
            assert!(err.to_string().contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{bad}: {err}");
        }
        let c = apply(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://user:pw@collector.local?k=v")]).unwrap();
        assert_eq!(
            c.otlp.target("X").unwrap().url,
            "http://collector.local/v1/traces?k=v",
            "the path goes before the query; user-info is valid"
        );
    }

    #[test]
    fn nonsense_is_refused_naming_its_variable() {
        for (name, value) in [
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "86400000"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name="),
            ("OTEL_RESOURCE_ATTRIBUTES", "=x"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "garbage"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "k=v%0A"),
        ] {
            let err = apply(&[(name, value)]).unwrap_err();
            assert!(err.to_string().contains(name), "{name}={value}: {err}");
        }
        let empty_name = Config {
            service_name: " ".into(),
            ..Config::default()
        };
        assert!(empty_name
            .validate()
            .unwrap_err()
            .to_string()
            .contains("with_service_name"));
    }

    #[test]
    fn the_traces_headers_replace_the_general_ones() {
        let c = apply(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
        ])
        .unwrap();
        assert_eq!(c.otlp.headers, [("b".to_owned(), "2".to_owned())]);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "-1"),
            ("OTEL_BSP_SCHEDULE_DELAY", "5s"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "ten"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
            ("OTEL_RESOURCE_ATTRIBUTES", "novalue"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("AGENT_TELEMETRY_LOG_FORMAT", "xml"),
        ] {
            let err = apply(&[(name, value)]).unwrap_err();
            assert!(err.to_string().contains(name), "{name}={value}: {err}");
        }
    }

    #[test]
    fn service_name_prefers_otel_service_name() {
        let c = apply(&[("OTEL_RESOURCE_ATTRIBUTES", "service.name=a,team=x%2Cy")]).unwrap();
        assert_eq!(c.service_name, "a");
        assert_eq!(c.resource_attributes["team"], "x,y");
        let c = apply(&[
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=a"),
            ("OTEL_SERVICE_NAME", "b"),
        ])
        .unwrap();
        assert_eq!(c.service_name, "b");
    }
}
