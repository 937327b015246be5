//! The `/metrics` HTTP endpoint: a small blocking server on its own thread, so the
//! application needs no async runtime.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tiny_http::{Header, Method, Request, Response, Server};

use super::MetricsHandle;
use crate::error::{Error, Result};

/// A running `/metrics` server; stopped by [`MetricsServer::stop`] or on drop.
pub(crate) struct MetricsServer {
    server: Arc<Server>,
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port) and serves `GET /metrics` from `metrics`.
    pub(crate) fn start(addr: SocketAddr, metrics: MetricsHandle) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|source| Error::MetricsBind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| Error::MetricsBind { addr, source })?;
        let server = Server::from_listener(listener, None).map_err(|source| Error::MetricsBind {
            addr,
            source: std::io::Error::other(source),
        })?;
        let server = Arc::new(server);
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("agent-telemetry-metrics".into())
            .spawn({
                let server = Arc::clone(&server);
                let stopping = Arc::clone(&stopping);
                move || serve(&server, &stopping, &metrics)
            })
            .map_err(|source| Error::Thread {
                name: "agent-telemetry-metrics",
                source,
            })?;
        Ok(MetricsServer {
            server,
            addr: bound,
            stopping,
            thread: Some(thread),
        })
    }

    /// The address the server is listening on (the real port when port 0 was asked for).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.server.unblock();
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

fn serve(server: &Server, stopping: &AtomicBool, metrics: &MetricsHandle) {
    while !stopping.load(Ordering::SeqCst) {
        match server.recv() {
            Ok(request) => respond(request, metrics),
            // `unblock` (shutdown) or a closed listener.
            Err(_) => break,
        }
    }
}

fn respond(request: Request, metrics: &MetricsHandle) {
    let path = request.url().split('?').next().unwrap_or_default();
    let response = match (request.method(), path) {
        (Method::Get | Method::Head, "/metrics") => match metrics.render() {
            Ok(text) => Response::from_string(text).with_header(header("Content-Type", metrics.content_type())),
            Err(error) => Response::from_string(format!("cannot render metrics: {error}\n")).with_status_code(500),
        },
        (_, "/metrics") => Response::from_string("only GET /metrics is served\n")
            .with_status_code(405)
            .with_header(header("Allow", "GET, HEAD")),
        _ => Response::from_string("not found: metrics are at /metrics\n").with_status_code(404),
    };
    // A client that went away gets nothing; the next request is served as usual.
    let _ = request.respond(response);
}

fn header(name: &'static str, value: &'static str) -> Header {
    // Only ASCII literals are passed here, and `from_bytes` rejects nothing else.
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header literal")
}
