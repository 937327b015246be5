//! Where and how OTLP spans are sent: the endpoint URL, its credentials and the headers.
//!
//! Contracts:
//! - a URL's user-info (`http://user:password@host`) is never printed and never sent in the
//!   URL: it becomes an `Authorization: Basic` header, and descriptions and errors show the
//!   URL without it (`http://[REDACTED]@host`);
//! - header values are never printed, in errors or descriptions;
//! - `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_EXPORTER_OTLP_TRACES_HEADERS` are parsed here, as
//!   the W3C Baggage format the specification names (`key=value,...`, values
//!   percent-encoded), so that a malformed value is an error and `ignore_environment()`
//!   means what it says (the exporter is given exactly these headers).

use std::time::Duration;

use base64::Engine as _;
use percent_encoding::percent_decode_str;

use super::OtlpProtocol;
use crate::error::{Error, Result};

/// The longest an export may wait for the collector.
pub(crate) const MAX_EXPORT_TIMEOUT: Duration = Duration::from_secs(600);

/// Where and how OTLP spans are sent, as set by the builder and the environment.
#[derive(Clone)]
pub(crate) struct OtlpConfig {
    pub protocol: OtlpProtocol,
    /// The full URL for HTTP (`.../v1/traces`), the base URL for gRPC; `None`: the spec
    /// default. May hold user-info: never print it, print [`OtlpConfig::display_endpoint`].
    pub endpoint: Option<String>,
    /// Headers sent with every export, in order; a later one replaces an earlier one with
    /// the same name. Never print their values.
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

/// An OTLP endpoint ready for the exporter: the URL without user-info, and every header to
/// send, the user-info's `Authorization` among them.
#[derive(Clone)]
pub(crate) struct OtlpTarget {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for OtlpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("OtlpTarget")
            .field("url", &redact_url(&self.url))
            .field("header_names", &names)
            .finish()
    }
}

impl std::fmt::Debug for OtlpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("OtlpConfig")
            .field("protocol", &self.protocol)
            .field("endpoint", &self.display_endpoint())
            .field("header_names", &names)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl OtlpConfig {
    pub(crate) fn new() -> Self {
        OtlpConfig {
            protocol: OtlpProtocol::HttpProtobuf,
            endpoint: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }

    fn endpoint_or_default(&self) -> &str {
        match (&self.endpoint, self.protocol) {
            (Some(endpoint), _) => endpoint,
            (None, OtlpProtocol::HttpProtobuf) => "http://localhost:4318/v1/traces",
            (None, OtlpProtocol::Grpc) => "http://localhost:4317",
        }
    }

    /// The endpoint as it may be printed: user-info and query redacted.
    pub(crate) fn display_endpoint(&self) -> String {
        redact_url(self.endpoint_or_default())
    }

    /// The URL and headers to export with; `setting` names the endpoint's setting in errors.
    pub(crate) fn target(&self, setting: &str) -> Result<OtlpTarget> {
        let mut url = parse_url(setting, self.endpoint_or_default())?;
        let mut headers = self.headers.clone();
        for (name, value) in &headers {
            check_header("with_otlp_header", name, value)?;
        }
        if !url.username().is_empty() || url.password().is_some() {
            let decode = |text: &str| percent_decode_str(text).decode_utf8_lossy().into_owned();
            let credentials = format!(
                "{}:{}",
                decode(url.username()),
                decode(url.password().unwrap_or_default())
            );
            if headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("authorization"))
            {
                return Err(Error::invalid(
                    setting,
                    redact_url(url.as_str()),
                    "the URL's user-info and an Authorization header both give credentials; keep one",
                ));
            }
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            headers.push(("authorization".to_owned(), format!("Basic {encoded}")));
            // Cannot fail on an http(s) URL with a host, which `parse_url` ensured.
            let _ = url.set_username("");
            let _ = url.set_password(None);
        }
        Ok(OtlpTarget {
            url: url.into(),
            headers,
        })
    }

    /// Checks what the builder or the environment set.
    pub(crate) fn validate(&self, endpoint_setting: &str, timeout_setting: &str) -> Result<()> {
        self.check_timeout(timeout_setting)?;
        self.target(endpoint_setting).map(drop)
    }

    /// Refuses a timeout of zero (every export would fail) or past ten minutes.
    pub(crate) fn check_timeout(&self, setting: &str) -> Result<()> {
        if self.timeout.is_zero() || self.timeout > MAX_EXPORT_TIMEOUT {
            return Err(Error::invalid(
                setting,
                format!("{} ms", self.timeout.as_millis()),
                "the export timeout must be from 1 ms to 10 minutes",
            ));
        }
        Ok(())
    }
}

/// An http(s) URL with a host.
pub(crate) fn parse_url(setting: &str, value: &str) -> Result<url::Url> {
    let invalid = |reason: String| Error::invalid(setting, redact_url(value), reason);
    let url = url::Url::parse(value.trim()).map_err(|e| invalid(format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("expected an http:// or https:// URL".to_owned()));
    }
    if url.host_str().unwrap_or_default().is_empty() {
        return Err(invalid("the URL has no host".to_owned()));
    }
    Ok(url)
}

/// `value` with its user-info and query replaced by `[REDACTED]`, whether or not it parses.
/// Everything before the last `@` counts as user-info: a password may hold an unencoded `/`,
/// `?` or `#`, which would otherwise end the authority before it.
pub(crate) fn redact_url(value: &str) -> String {
    let (scheme, rest) = value.split_once("://").unwrap_or(("", value));
    let (user_info, rest) = match rest.rfind('@') {
        Some(at) => (true, &rest[at + 1..]),
        None => (false, rest),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = if user_info {
        format!("[REDACTED]@{authority}")
    } else {
        authority.to_owned()
    };
    let path = match path.find('?') {
        Some(query) => format!("{}?[REDACTED]", &path[..query]),
        None => path.to_owned(),
    };
    if scheme.is_empty() && !value.contains("://") {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

/// Parses `key=value,...` with percent-encoded values, as `OTEL_EXPORTER_OTLP_HEADERS` is
/// written. Errors name `variable` and the entry's position, never a value.
pub(crate) fn parse_headers(variable: &str, text: &str) -> Result<Vec<(String, String)>> {
    let invalid = |reason: String| Error::invalid(variable, "[REDACTED]", reason);
    let mut headers = Vec::new();
    let entries: Vec<&str> = text.split(',').collect();
    for (n, entry) in entries.iter().enumerate() {
        let entry = entry.trim();
        let position = format!("entry {} of {}", n + 1, entries.len());
        if entry.is_empty() {
            return Err(invalid(format!("{position} is empty")));
        }
        let Some((name, value)) = entry.split_once('=') else {
            return Err(invalid(format!("{position} is not key=value")));
        };
        let (name, value) = (name.trim(), value.trim());
        let value = decode_percent(value).ok_or_else(|| {
            invalid(format!(
                "{position}: the value has a bad %-escape or is not UTF-8 once decoded"
            ))
        })?;
        check_header(variable, name, &value)?;
        headers.push((name.to_ascii_lowercase(), value));
    }
    Ok(headers)
}

/// Checks that `name` is an HTTP header name and `value` a header value; errors name
/// `setting` and a valid header's name (names are not secret), never the value, nor a name
/// that is not one (`Authorization: Basic …` written as a name is all credential).
pub(crate) fn check_header(setting: &str, name: &str, value: &str) -> Result<()> {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(Error::invalid(
            setting,
            "[REDACTED]",
            "a header name is not an HTTP header name (`name=value`, with no space, `:` or other separator in the name)",
        ));
    }
    // Visible ASCII, spaces and tabs only: no CR, LF or other control characters.
    if !value.bytes().all(|byte| byte == b'\t' || (b' '..=b'~').contains(&byte)) {
        return Err(Error::invalid(
            setting,
            "[REDACTED]",
            format!("the value of header {name:?} holds a control or non-ASCII character"),
        ));
    }
    Ok(())
}

/// `text` percent-decoded; `None` if a `%` is not followed by two hex digits, or the result
/// is not UTF-8.
pub(crate) fn decode_percent(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(at, &byte)| {
        byte != b'%'
            || bytes
                .get(at + 1..at + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str) -> OtlpConfig {
        OtlpConfig {
            endpoint: Some(endpoint.to_owned()),
            ..OtlpConfig::new()
        }
    }

    #[test]
    fn user_info_becomes_basic_auth_and_leaves_the_url() {
        let target = config("http://user:hunter%212@collector.local:4318/v1/traces")
            .target("X")
            .unwrap();
        assert_eq!(target.url, "http://collector.local:4318/v1/traces");
        // base64("user:hunter!2")
        assert_eq!(
            target.headers,
            [("authorization".to_owned(), "Basic dXNlcjpodW50ZXIhMg==".to_owned())]
        );
        assert!(!format!("{target:?}").contains("dXNlcjpodW50ZXIhMg"), "{target:?}");
        let without_port = config("https://user:pw@collector.local/v1/traces").target("X").unwrap();
        assert_eq!(without_port.url, "https://collector.local/v1/traces");
    }

    #[test]
    fn urls_are_printed_without_user_info_or_query() {
        for (url, shown) in [
            (
                "http://user:hunter2@host:4318/v1/traces",
                "http://[REDACTED]@host:4318/v1/traces",
            ),
            (
                "http://host:4318/v1/traces?key=s3cr3t",
                "http://host:4318/v1/traces?[REDACTED]",
            ),
            ("http://a:b@c@host", "http://[REDACTED]@host"),
            ("user:pw@host:4318", "[REDACTED]@host:4318"),
            ("http://host:4318", "http://host:4318"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
            assert_eq!(config(url).display_endpoint(), shown);
        }
    }

    #[test]
    fn bad_urls_are_errors_that_do_not_echo_credentials() {
        for bad in [
            "collector:4318",
            "http://",
            "http://user:hunter2@host:port",
            "ftp://user:hunter2@x",
            "http://user:hunter2@",
            // A password with an unencoded `#`, `?` or `/` does not parse.
            "http://agent:hunter2#x@collector:4318",
            "http://agent:hunter2?x@collector:4318",
            "http://agent:hunter2/x@collector:4318",
        ] {
            let error = config(bad)
                .target("OTEL_EXPORTER_OTLP_ENDPOINT")
                .unwrap_err()
                .to_string();
            assert!(error.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{bad}: {error}");
            assert!(!error.contains("hunter2"), "{bad}: {error}");
        }
    }

    #[test]
    fn debug_output_shows_no_credentials() {
        let mut secret = config("http://user:hunter2@host:4318");
        secret.headers.push(("x-api-key".to_owned(), "hunter3".to_owned()));
        let debug = format!("{secret:?}");
        assert!(!debug.contains("hunter"), "{debug}");
        assert!(debug.contains("x-api-key"), "{debug}");
    }

    #[test]
    fn credentials_twice_are_an_error() {
        let mut twice = config("http://user:pw@host:4318");
        twice.headers.push(("Authorization".to_owned(), "Bearer x".to_owned()));
        let error = twice.target("X").unwrap_err().to_string();
        assert!(error.contains("both give credentials"), "{error}");
    }

    #[test]
    fn headers_are_parsed_as_the_specification_writes_them() {
        let headers = parse_headers("V", "api-key=a%20b%2Cc , X-Tenant=acme,empty=").unwrap();
        assert_eq!(
            headers,
            [
                ("api-key".to_owned(), "a b,c".to_owned()),
                ("x-tenant".to_owned(), "acme".to_owned()),
                ("empty".to_owned(), String::new()),
            ]
        );
    }

    #[test]
    fn malformed_headers_name_the_variable_and_never_echo_a_value() {
        for bad in [
            "garbage",
            "=hunter2",
            "bad key=hunter2",
            "k=hunter2%0D%0Ainjected: 1",
            "k=hunter2\r\nx: y",
            "k=hunter2%zz",
            "k=hunter2%ff",
            "a=1,,b=hunter2",
            // Written as an HTTP header: all of it before the base64 padding is the "name".
            "Authorization: Basic hunter2aHVudGVy=",
        ] {
            let error = parse_headers("OTEL_EXPORTER_OTLP_HEADERS", bad)
                .unwrap_err()
                .to_string();
            assert!(error.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{bad:?}: {error}");
            assert!(!error.contains("hunter2"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn a_timeout_of_zero_or_past_ten_minutes_is_refused() {
        for (timeout, ok) in [
            (Duration::ZERO, false),
            (Duration::from_millis(1), true),
            (MAX_EXPORT_TIMEOUT, true),
            (MAX_EXPORT_TIMEOUT + Duration::from_millis(1), false),
        ] {
            let config = OtlpConfig {
                timeout,
                ..OtlpConfig::new()
            };
            let result = config.validate("E", "OTEL_EXPORTER_OTLP_TIMEOUT");
            assert_eq!(result.is_ok(), ok, "{timeout:?}: {result:?}");
        }
    }
}
