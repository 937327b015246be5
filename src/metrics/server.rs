//! The `/metrics` endpoint: HTTP/1.1 by hyper, on a current-thread tokio runtime that lives on
//! the server's own thread, so the application needs no async runtime.
//!
//! The port faces the network, so everything a client controls is bounded:
//!
//! - **Connections**: at most the configured number at once (default
//!   [`DEFAULT_MAX_CONNECTIONS`]); the next ones wait in the kernel's accept queue
//!   ([`ACCEPT_BACKLOG`] long). To make room, a connection that holds its slot for nothing is
//!   closed: one still sending its head after 50 ms, else one whose answer has not moved for
//!   1 s (`open_connections.rs`), counted in
//!   `agent_telemetry_metrics_connections_refused_total`.
//! - **The request head**: at most [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`] headers; beyond
//!   that hyper answers 431 and closes. Malformed heads get 400 (or nothing, for an HTTP/2
//!   preface) and count in `agent_telemetry_metrics_requests_malformed_total`.
//! - **Time**: the head within [`HEAD_TIMEOUT`], the whole exchange within
//!   [`EXCHANGE_TIMEOUT`] (a client that does not read its answer is dropped then), counted in
//!   `agent_telemetry_metrics_connections_timed_out_total`.
//! - **Bodies**: never read, whatever `Content-Length` or `Transfer-Encoding` say.
//! - **Answers held**: past
//!   [`MAX_HELD_ANSWER_BYTES`](super::held_answers::MAX_HELD_ANSWER_BYTES) of answers being
//!   sent at once (clients that do not read hold theirs), a request is sent the latest
//!   answer, shared, rather than a new render, if it is still held and at most 10 s old
//!   (`held_answers.rs`), counted in `agent_telemetry_metrics_answers_shared_total`.
//! - **Renders**: a request waits for the next render, which every request waiting when it
//!   starts is sent, and a render starts no sooner after the last than that one took
//!   (`coalesced_renders.rs`): however fast requests come, renders of up to 1 s take at most
//!   half the thread, and a scrape waits for a render or two, not for every request before
//!   it. The requests sent a render another led count in
//!   `agent_telemetry_metrics_requests_coalesced_total`.
//! - **Panics**: a render that panics (in a collector the application registered) gets its
//!   requests `500`, and a connection's slot is freed however its task ends.
//! - **One request per connection**: every HTTP/1.1 answer says `Connection: close` (an
//!   HTTP/1.0 one closes without saying so), so pipelined requests queue no work. A client
//!   that half-closes after its request still gets its answer.
//! - **Accept errors** (out of file descriptors and the like): a connection that holds its
//!   slot for nothing is closed to free a descriptor, else accepting backs off from
//!   [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`] (or until one does); one warning per
//!   spell, counted in `agent_telemetry_metrics_accept_errors_total`, and serving resumes by
//!   itself.
//! - **Authorization**: with a bearer token configured, a request without
//!   `Authorization: Bearer <token>` gets 401, counted in
//!   `agent_telemetry_metrics_requests_unauthorized_total`. Only the token's SHA-256 is kept,
//!   and digests are compared in constant time: neither the token nor its length shows.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, Notify};

use super::coalesced_renders::CoalescedRenders;
use super::held_answers::{Answer, HeldAnswers};
use super::open_connections::{OpenConnections, Progress, Watched};
use super::MetricsHandle;
use crate::error::{Error, Result};
use crate::outages::OutageWarnings;
use crate::stats::TelemetryStats;

/// Connections served at once, unless configured otherwise.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Connections the kernel queues for accepting (capped by the system's `somaxconn`).
pub(crate) const ACCEPT_BACKLOG: u32 = 1024;

/// The longest request head (request line and headers): hyper's smallest read buffer.
pub(crate) const MAX_HEAD_BYTES: usize = 8 * 1024;

/// The most headers a request may carry.
pub(crate) const MAX_HEADERS: usize = 64;

/// How long a client has to send its request head.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection lives in all, from accept to the last byte of the answer.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first and the longest pause after an accept error.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The thread's name, for errors and debuggers.
const THREAD_NAME: &str = "agent-tel-metrics";

/// A running `/metrics` server; stopped by [`MetricsServer::stop`] or on drop.
pub(crate) struct MetricsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A bearer token that `/metrics` requests must present, kept as its SHA-256 only.
#[derive(Clone)]
pub(crate) struct BearerToken(Arc<[u8; 32]>);

/// The largest token file read: a token is a line, not a document.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken([REDACTED])")
    }
}

impl BearerToken {
    /// Reads the token from `path`, surrounding whitespace trimmed; `setting` names the
    /// setting in errors. The token must be printable ASCII without spaces, as an HTTP header
    /// carries it. Errors never contain the file's contents.
    pub(crate) fn from_file(path: &Path, setting: &str) -> Result<Self> {
        let invalid = |reason: String| Error::invalid(setting, path.display().to_string(), reason);
        let bytes = crate::config::file::read_regular(path, MAX_TOKEN_FILE_BYTES)
            .map_err(|e| invalid(format!("cannot read the token file: {e}")))?;
        let token = bytes.trim_ascii();
        if token.is_empty() {
            return Err(invalid("the token file is empty".to_owned()));
        }
        if !token.iter().all(u8::is_ascii_graphic) {
            return Err(invalid(
                "the token must be printable ASCII without spaces or control characters".to_owned(),
            ));
        }
        Ok(BearerToken(Arc::new(Sha256::digest(token).into())))
    }

    /// Whether an `Authorization` header value presents this token as `Bearer <token>`.
    fn admits(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some((scheme, credentials)) = authorization.and_then(|value| {
            let value = value.as_bytes();
            let space = value.iter().position(|&byte| byte == b' ')?;
            Some((&value[..space], value[space + 1..].trim_ascii()))
        }) else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(credentials).into();
        scheme.eq_ignore_ascii_case(b"bearer") && bool::from(presented.ct_eq(&*self.0))
    }
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port) and serves `GET /metrics` from `metrics` on a
    /// thread of its own.
    ///
    /// # Errors
    ///
    /// [`Error::MetricsBind`] when the address cannot be bound, [`Error::Thread`] when the
    /// thread or its runtime cannot be started.
    pub(crate) fn start(
        addr: SocketAddr,
        metrics: MetricsHandle,
        limits: ServerLimits,
        stats: Arc<TelemetryStats>,
    ) -> Result<Self> {
        let bind_error = |source| Error::MetricsBind { addr, source };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|source| Error::Thread {
                name: THREAD_NAME,
                source,
            })?;
        let listener = {
            let _entered = runtime.enter();
            listen(addr).map_err(bind_error)?
        };
        let bound = listener.local_addr().map_err(bind_error)?;
        let (stop, stopped) = oneshot::channel();
        let server = Arc::new(Server {
            metrics,
            token: limits.token,
            max_connections: limits.max_connections.max(1),
            stats,
            open: Mutex::default(),
            ended: Notify::new(),
            answers: Arc::default(),
            renders: CoalescedRenders::default(),
        });
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                runtime.block_on(accept_loop(&listener, stopped, &server));
                // Dropping the runtime drops every connection still open.
            })
            .map_err(|source| Error::Thread {
                name: THREAD_NAME,
                source,
            })?;
        Ok(MetricsServer {
            addr: bound,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address the server is listening on (the real port when port 0 was asked for).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every connection and waits for the thread to end.
    pub(crate) fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The thread may have ended already; then there is nothing to stop.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The thread only serves; a panic there has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the server allows its clients.
#[derive(Debug, Clone)]
pub(crate) struct ServerLimits {
    /// The bearer token requests must present, if any.
    pub token: Option<BearerToken>,
    /// Connections served at once.
    pub max_connections: usize,
}

/// A listener on `addr` with an accept queue of [`ACCEPT_BACKLOG`] (the standard library's
/// is 128: a burst of idle connections would fill it, and the kernel would then drop a
/// scraper's connection attempts, which retry only after a second).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As the standard library's listener does: a restarted process may bind at once.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// What every connection of the server shares.
struct Server {
    metrics: MetricsHandle,
    token: Option<BearerToken>,
    max_connections: usize,
    stats: Arc<TelemetryStats>,
    open: Mutex<OpenConnections>,
    /// Notified when a connection ends: room for the next.
    ended: Notify,
    /// The answers being sent, bounded in bytes.
    answers: Arc<HeldAnswers>,
    /// The renders, each sent to the requests waiting when it started.
    renders: CoalescedRenders,
}

impl Server {
    fn open(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        // Only the server's thread takes it, one task at a time: it is never poisoned by
        // another thread, and a panic here leaves the list as consistent as a removal is.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes the connection that holds its slot for nothing the longest, counting it; `Err`
    /// as [`OpenConnections::close_idlest`].
    fn make_room(&self) -> Result<(), Option<Instant>> {
        self.open().close_idlest(Instant::now())?;
        TelemetryStats::add(&self.stats.metrics_connections_refused, 1);
        Ok(())
    }

    /// Waits until a slot is free, making room when a connection holds one for nothing;
    /// `false` if stopped meanwhile. Until then new connections wait in the kernel's accept
    /// queue, costing nothing here.
    async fn room(&self, stopped: &mut oneshot::Receiver<()>) -> bool {
        loop {
            if self.open().len() < self.max_connections {
                return true;
            }
            match self.make_room() {
                // The closed connection's task is dropped on the next turn.
                Ok(()) => tokio::task::yield_now().await,
                Err(idle_at) => {
                    let until = idle_at.unwrap_or_else(|| Instant::now() + EXCHANGE_TIMEOUT);
                    if !self.wait_for_an_end(until, stopped).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Waits until a connection ends or `until`; `false` if stopped meanwhile.
    async fn wait_for_an_end(&self, until: Instant, stopped: &mut oneshot::Receiver<()>) -> bool {
        tokio::select! {
            _ = stopped => false,
            () = self.ended.notified() => true,
            () = tokio::time::sleep_until(until.into()) => true,
        }
    }

    /// Serves `stream` in a task of its own.
    fn admit(self: &Arc<Self>, stream: TcpStream) {
        let mut open = self.open();
        let id = open.next_id();
        let progress = Arc::new(Progress::default());
        let task = tokio::spawn(Arc::clone(self).serve(stream, id, Arc::clone(&progress)));
        open.push(id, progress, task.abort_handle());
    }

    /// Serves one request on `stream`, within the time limits, and counts how it ended.
    async fn serve(self: Arc<Self>, stream: TcpStream, id: u64, progress: Arc<Progress>) {
        let _slot = Slot { server: &self, id };
        let server = Arc::clone(&self);
        let head_received = Arc::clone(&progress);
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            head_received.head_received();
            let server = Arc::clone(&server);
            // The body is dropped unread with the request.
            async move { Ok::<_, Infallible>(server.answer(&request).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS)
            .keep_alive(false)
            .half_close(true)
            .serve_connection(TokioIo::new(Watched::new(stream, progress)), service);
        let stats = &self.stats;
        match tokio::time::timeout(EXCHANGE_TIMEOUT, connection).await {
            Err(_elapsed) => TelemetryStats::add(&stats.metrics_connections_timed_out, 1),
            Ok(Err(error)) if error.is_timeout() => TelemetryStats::add(&stats.metrics_connections_timed_out, 1),
            Ok(Err(error)) if error.is_parse() || error.is_parse_too_large() || error.is_parse_version_h2() => {
                TelemetryStats::add(&stats.metrics_requests_malformed, 1);
            }
            // A client that went away before its answer was written: nothing to count.
            Ok(Err(_) | Ok(())) => {}
        }
    }

    /// The answer to one request.
    async fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(token) = &self.token {
            if !token.admits(request.headers().get(AUTHORIZATION)) {
                TelemetryStats::add(&self.stats.metrics_requests_unauthorized, 1);
                let mut response = text(StatusCode::UNAUTHORIZED, "a bearer token is required for /metrics\n");
                response
                    .headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"metrics\""));
                return response;
            }
        }
        if request.uri().path() != "/metrics" {
            return text(StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n");
        }
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics is served\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let render = || match catch_unwind(AssertUnwindSafe(|| self.answers.answer(|| self.metrics.render()))) {
            Ok(Ok(answer)) => Some(answer),
            Ok(Err(error)) => {
                tracing::warn!(target: "agent_telemetry::metrics", %error, "cannot render /metrics");
                None
            }
            Err(_panic) => {
                tracing::warn!(target: "agent_telemetry::metrics", "a collector panicked rendering /metrics");
                None
            }
        };
        let Some((answer, joined)) = self.renders.answer(render).await else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics\n");
        };
        if matches!(answer, Answer::Shared(_)) {
            TelemetryStats::add(&self.stats.metrics_answers_shared, 1);
        } else if joined {
            TelemetryStats::add(&self.stats.metrics_requests_coalesced, 1);
        }
        let mut response = Response::new(Full::new(answer.into_body()));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(prometheus::TEXT_FORMAT));
        response
    }
}

/// A connection's slot, freed however its task ends: answered, aborted, or unwound by a
/// panic.
struct Slot<'a> {
    server: &'a Server,
    id: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.server.open().remove(self.id);
        self.server.ended.notify_one();
    }
}

/// A plain-text answer.
fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Accepts connections until `stopped`, surviving accept errors.
async fn accept_loop(listener: &TcpListener, mut stopped: oneshot::Receiver<()>, server: &Arc<Server>) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut outages = OutageWarnings::default();
    loop {
        if !server.room(&mut stopped).await {
            return;
        }
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let error = match accepted {
            Ok((stream, _peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                if outages.succeeded() {
                    tracing::info!(target: "agent_telemetry::metrics", "the /metrics server accepts connections again");
                }
                server.admit(stream);
                // Lets the new connection read the head it sent before the next accept.
                tokio::task::yield_now().await;
                continue;
            }
            Err(error) => error,
        };
        if is_per_connection(&error) {
            continue;
        }
        TelemetryStats::add(&server.stats.metrics_accept_errors, 1);
        if outages.failed() {
            tracing::warn!(
                target: "agent_telemetry::metrics",
                %error,
                "the /metrics server cannot accept connections (out of file descriptors?); closing connections that hold their slot for nothing and retrying, counted in agent_telemetry_metrics_accept_errors_total"
            );
        }
        let until = match server.make_room() {
            Ok(()) => {
                // The closed connection's task is dropped on the next turn, freeing its
                // descriptor.
                tokio::task::yield_now().await;
                continue;
            }
            Err(idle_at) => {
                let backed_off = Instant::now() + backoff;
                idle_at.map_or(backed_off, |idle_at| idle_at.min(backed_off))
            }
        };
        if !server.wait_for_an_end(until, &mut stopped).await {
            return;
        }
        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
    }
}

/// Errors of one connection that ended before it was accepted: the next accept is unaffected.
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted, WouldBlock};
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> BearerToken {
        BearerToken(Arc::new(Sha256::digest(text.as_bytes()).into()))
    }

    #[test]
    fn only_the_exact_bearer_token_is_admitted() {
        let token = token("s3cret-T0ken");
        let admits = |value: &str| token.admits(Some(&HeaderValue::from_str(value).unwrap()));
        assert!(admits("Bearer s3cret-T0ken"));
        assert!(admits("bearer s3cret-T0ken "), "the scheme is case-insensitive");
        assert!(!admits("Bearer s3cret-T0ke"));
        assert!(!admits("Bearer s3cret-T0kenX"));
        assert!(!admits("Bearer S3CRET-T0KEN"), "the token is not");
        assert!(!admits("Basic s3cret-T0ken"));
        assert!(!admits("Bearer"));
        assert!(!admits("s3cret-T0ken"));
        assert!(!token.admits(None));
    }

    #[test]
    fn a_token_file_is_trimmed_and_checked_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  hunter2-token\n").unwrap();
        let read = BearerToken::from_file(&path, "AGENT_TELEMETRY_METRICS_TOKEN_FILE").unwrap();
        assert!(read.admits(Some(&HeaderValue::from_static("Bearer hunter2-token"))));
        assert_eq!(format!("{read:?}"), "BearerToken([REDACTED])");
        for (contents, reason) in [("\n", "empty"), ("hunter2 two", "printable ASCII")] {
            std::fs::write(&path, contents).unwrap();
            let error = BearerToken::from_file(&path, "AGENT_TELEMETRY_METRICS_TOKEN_FILE")
                .unwrap_err()
                .to_string();
            assert!(error.contains("AGENT_TELEMETRY_METRICS_TOKEN_FILE"), "{error}");
            assert!(error.contains(reason), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
        let missing = BearerToken::from_file(&dir.path().join("none"), "X").unwrap_err();
        assert!(missing.to_string().contains("cannot read the token file"), "{missing}");
    }
}
