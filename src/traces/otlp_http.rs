//! The HTTP client under the OTLP/HTTP exporter: reqwest's blocking client (no async runtime
//! needed), sending exactly the headers this crate was configured with.
//!
//! opentelemetry-otlp adds the headers of `OTEL_EXPORTER_OTLP_HEADERS` and
//! `OTEL_EXPORTER_OTLP_TRACES_HEADERS` to every request on its own, whatever it was told. This
//! crate parses those variables itself (strictly, and not at all after `ignore_environment`),
//! so the client replaces every header but the two the exporter sets for the body
//! (`content-type`, `content-encoding`) with the configured ones.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use http::{Request, Response};
use opentelemetry_http::{HttpClient, HttpError};

use crate::error::{Error, Result};

/// reqwest's blocking client with a fixed set of headers.
pub(crate) struct ExactHeaders {
    client: reqwest::blocking::Client,
    headers: HeaderMap,
}

impl std::fmt::Debug for ExactHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values may be credentials: only the names are shown.
        f.debug_struct("ExactHeaders")
            .field("header_names", &self.headers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ExactHeaders {
    /// A client whose requests time out after `timeout` and carry `headers` (already checked
    /// by the configuration).
    pub(crate) fn new(timeout: Duration, headers: &[(String, String)]) -> Result<Self> {
        let failed = |reason: String| Error::TraceExporter {
            exporter: "otlp",
            source: reason.into(),
        };
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| failed("a header name is not an HTTP header name".to_owned()))?;
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| failed(format!("the value of header {name:?} is not a header value")))?;
            value.set_sensitive(true);
            map.insert(name, value);
        }
        // Built on a thread of its own, as opentelemetry-otlp builds it: reqwest's blocking
        // client cannot be built or dropped inside an async runtime, where `build` may run.
        let client = std::thread::Builder::new()
            .name("agent-tel-http-client".into())
            .spawn(move || reqwest::blocking::Client::builder().timeout(timeout).build())
            .map_err(|e| failed(format!("cannot start a thread to build the HTTP client: {e}")))?
            .join()
            .map_err(|_| failed("building the HTTP client panicked".to_owned()))?
            .map_err(|e| failed(format!("cannot build the HTTP client: {e}")))?;
        Ok(ExactHeaders { client, headers: map })
    }

    /// `request` with only the body's headers kept, then the configured ones.
    fn with_exact_headers(&self, mut request: Request<Bytes>) -> Request<Bytes> {
        let headers = request.headers_mut();
        let body_headers: Vec<(HeaderName, HeaderValue)> = [CONTENT_TYPE, CONTENT_ENCODING]
            .into_iter()
            .filter_map(|name| headers.get(&name).cloned().map(|value| (name, value)))
            .collect();
        headers.clear();
        headers.extend(body_headers);
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        request
    }
}

#[async_trait::async_trait]
impl HttpClient for ExactHeaders {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        self.client.send_bytes(self.with_exact_headers(request)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_headers_and_the_bodys_are_sent() {
        let client = ExactHeaders::new(
            Duration::from_secs(1),
            &[
                ("x-tenant".to_owned(), "acme".to_owned()),
                ("authorization".to_owned(), "Basic c2VjcmV0".to_owned()),
            ],
        )
        .unwrap();
        let request = Request::post("http://collector.local/v1/traces")
            .header(CONTENT_TYPE, "application/x-protobuf")
            .header("x-tenant", "from-the-environment")
            .header("x-from-env", "1")
            .body(Bytes::new())
            .unwrap();
        let sent = client.with_exact_headers(request);
        let mut headers: Vec<(String, String)> = sent
            .headers()
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect();
        headers.sort();
        assert_eq!(
            headers,
            [
                ("authorization".to_owned(), "Basic c2VjcmV0".to_owned()),
                ("content-type".to_owned(), "application/x-protobuf".to_owned()),
                ("x-tenant".to_owned(), "acme".to_owned()),
            ]
        );
        assert!(!format!("{client:?}").contains("c2VjcmV0"));
    }
}
