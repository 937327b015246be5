//! Settings: their defaults, and how the environment overrides what the builder set.
//!
//! The builder gives the application's choices; the environment is applied second so an
//! operator can change a deployment without a rebuild (the OpenTelemetry convention for
//! `OTEL_*` variables). Every value is checked here, so a typo becomes an [`Error`] that
//! names the variable instead of a silent default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use opentelemetry_sdk::trace::Sampler;

use crate::error::{Error, Result};

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
    pub log_dir: Option<PathBuf>,
    pub log_file_prefix: String,
    pub log_format: LogFormat,
    pub log_queue_lines: usize,
    pub max_task_chars: usize,
    pub agent_span_names: Vec<String>,
    pub duration_buckets: Vec<f64>,
    pub max_agent_names: usize,
    pub traces_exporter: TracesExporter,
    pub otlp: OtlpConfig,
    pub batch: BatchSettings,
    pub env_filter: String,
    pub sampler: Sampler,
    pub shutdown_timeout: Duration,
}

/// Where and how OTLP spans are sent.
#[derive(Debug, Clone)]
pub(crate) struct OtlpConfig {
    pub protocol: OtlpProtocol,
    /// The full URL for HTTP (`.../v1/traces`), the base URL for gRPC; `None`: the spec default.
    pub endpoint: Option<String>,
    pub timeout: Duration,
}

impl OtlpConfig {
    pub(crate) fn resolved_endpoint(&self) -> String {
        match (&self.endpoint, self.protocol) {
            (Some(endpoint), _) => endpoint.clone(),
            (None, OtlpProtocol::HttpProtobuf) => "http://localhost:4318/v1/traces".to_owned(),
            (None, OtlpProtocol::Grpc) => "http://localhost:4317".to_owned(),
        }
    }
}

/// The batch span processor's settings (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchSettings {
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    pub scheduled_delay: Duration,
}

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
            log_dir: None,
            log_file_prefix: "agents".to_owned(),
            log_format: LogFormat::Guide,
            log_queue_lines: 8_192,
            max_task_chars: 1024,
            agent_span_names: vec!["agent_execution".to_owned()],
            duration_buckets: DEFAULT_DURATION_BUCKETS.to_vec(),
            max_agent_names: 256,
            traces_exporter: TracesExporter::Otlp,
            otlp: OtlpConfig {
                protocol: OtlpProtocol::HttpProtobuf,
                endpoint: None,
                timeout: Duration::from_secs(10),
            },
            batch: BatchSettings {
                // Not the SDK's 2048: 100 ms at the 20,000 executions a second this crate is
                // built for, less than one stalled export. As many as the log queue.
                max_queue_size: 8192,
                max_export_batch_size: 512,
                scheduled_delay: Duration::from_secs(5),
            },
            env_filter: "info".to_owned(),
            sampler: Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// Applies the environment over the builder's values, then checks the result.
    pub(crate) fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());

        if let Some(v) = var("AGENT_TELEMETRY_METRICS_ADDR") {
            self.metrics_addr = parse_metrics_addr("AGENT_TELEMETRY_METRICS_ADDR", &v)?;
        }
        if let Some(v) = var("AGENT_TELEMETRY_METRICS_TOKEN_FILE") {
            self.metrics_token_file = Some(PathBuf::from(v));
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
        if let Some(v) = var("AGENT_TELEMETRY_ENVIRONMENT") {
            self.environment = v;
        }
        if let Some(v) = var("AGENT_TELEMETRY_SCALE") {
            self.scale = v;
        }
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
        if let Some(v) = var("OTEL_TRACES_EXPORTER") {
            self.traces_exporter = parse_traces_exporter(&v)?;
        }
        let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .map(|v| ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", v))
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL").map(|v| ("OTEL_EXPORTER_OTLP_PROTOCOL", v)));
        if let Some((name, v)) = protocol {
            self.otlp.protocol = parse_protocol(name, &v)?;
        }
        if let Some(v) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            check_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &v)?;
            self.otlp.endpoint = Some(v);
        } else if let Some(v) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            check_url("OTEL_EXPORTER_OTLP_ENDPOINT", &v)?;
            self.otlp.endpoint = Some(match self.otlp.protocol {
                // The spec: the signal path is appended to the base endpoint for HTTP only.
                OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", v.trim_end_matches('/')),
                OtlpProtocol::Grpc => v,
            });
        }
        for name in ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"] {
            if let Some(v) = var(name) {
                self.otlp.timeout = parse_millis(name, &v)?;
                break;
            }
        }
        if let Some(v) = var("OTEL_BSP_MAX_QUEUE_SIZE") {
            self.batch.max_queue_size = parse_count("OTEL_BSP_MAX_QUEUE_SIZE", &v)?;
        }
        if let Some(v) = var("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
            self.batch.max_export_batch_size = parse_count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", &v)?;
        }
        if let Some(v) = var("OTEL_BSP_SCHEDULE_DELAY") {
            self.batch.scheduled_delay = parse_millis("OTEL_BSP_SCHEDULE_DELAY", &v)?;
        }
        if let Some(v) = var("OTEL_TRACES_SAMPLER") {
            self.sampler = parse_sampler(&v, var("OTEL_TRACES_SAMPLER_ARG").as_deref())?;
        }
        if let Some(v) = var("RUST_LOG") {
            self.env_filter = v;
        }
        self.validate()
    }

    /// Checks the values the builder can set to something unusable.
    pub(crate) fn validate(&self) -> Result<()> {
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
        if self.batch.max_queue_size == 0 || self.batch.max_export_batch_size == 0 {
            return Err(Error::invalid(
                "with_span_queue_size",
                "0",
                "the span queue and export batches need room for a span",
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
        if let Some(endpoint) = &self.otlp.endpoint {
            check_url("with_otlp_endpoint", endpoint)?;
        }
        Ok(())
    }
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

/// Rejects what the OTLP client would fail on later, with the variable's name.
pub(crate) fn check_url(setting: &str, value: &str) -> Result<()> {
    let rest = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
        .ok_or_else(|| Error::invalid(setting, value, "expected an http:// or https:// URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once(':').map_or(
        authority,
        |(host, port)| {
            if port.parse::<u16>().is_ok() {
                host
            } else {
                authority
            }
        },
    );
    if host.is_empty() || authority.contains(char::is_whitespace) || authority.ends_with(':') {
        return Err(Error::invalid(setting, value, "the URL has no valid host[:port]"));
    }
    if let Some((_, port)) = authority.rsplit_once(':') {
        if !authority.ends_with(']') && port.parse::<u16>().is_err() {
            return Err(Error::invalid(
                setting,
                value,
                "the port is not a number from 0 to 65535",
            ));
        }
    }
    Ok(())
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
    let mut attributes = BTreeMap::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, val) = pair
            .split_once('=')
            .ok_or_else(|| Error::invalid("OTEL_RESOURCE_ATTRIBUTES", value, format!("`{pair}` is not key=value")))?;
        let decoded = percent_decode(val.trim())
            .ok_or_else(|| Error::invalid("OTEL_RESOURCE_ATTRIBUTES", value, format!("`{val}` has a bad %-escape")))?;
        attributes.insert(key.trim().to_owned(), decoded);
    }
    Ok(attributes)
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(vars: &[(&str, &str)]) -> Result<Config> {
        let vars: BTreeMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let mut config = Config::default();
        config.apply_env(&|name| vars.get(name).cloned())?;
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
        assert_eq!(config.otlp.resolved_endpoint(), "http://localhost:4318/v1/traces");
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
        assert_eq!(c.otlp.resolved_endpoint(), "http://collector:4318/v1/traces");
        let c = apply(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:1/x"),
        ])
        .unwrap();
        assert_eq!(c.otlp.resolved_endpoint(), "http://other:1/x");
        for bad in ["collector:4318", "http://", "http://host:port", "ftp://x"] {
            let err = apply(&[("OTEL_EXPORTER_OTLP_ENDPOINT", bad)]).unwrap_err();
            assert!(err.to_string().contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{bad}: {err}");
        }
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
