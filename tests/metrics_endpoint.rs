//! The `/metrics` endpoint under attack: each test runs the main job in a process of its own,
//! attacks its endpoint from hostile clients on loopback while a scraper keeps scraping beside
//! them, and checks that the process lives, every scrape is answered, memory stays bounded,
//! and the attack shows in the `agent_telemetry_metrics_*` counters.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use support::{scrape_request, try_http, ExampleProcess};

/// The endpoint's limits, as documented in `src/metrics/server.rs`.
const MAX_CONNECTIONS: usize = 64;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The main job at a gentle rate, its endpoint on a free loopback port.
fn target() -> ExampleProcess {
    ExampleProcess::start(&["--rate", "20"], &[], None)
}

/// Scrapes every `interval` until finished, as Prometheus would, each scrape bounded by 5 s.
struct Scraper {
    stop: Arc<AtomicBool>,
    /// Scrapes done so far.
    done: Arc<AtomicUsize>,
    thread: JoinHandle<Vec<Result<(), String>>>,
}

impl Scraper {
    fn start(addr: SocketAddr, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let done = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&done);
        let thread = std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                let result = match try_http(addr, &scrape_request(addr), Duration::from_secs(5)) {
                    Ok((200, body)) if body.contains("# TYPE framework_info gauge") => Ok(()),
                    Ok((status, body)) => Err(format!("status {status}: {body:.200}")),
                    Err(error) => Err(error),
                };
                results.push(result);
                counted.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(interval);
            }
            results
        });
        Scraper { stop, done, thread }
    }

    /// Lets scraping go on until there were at least `at_least` scrapes (a loaded machine
    /// makes each slower; each is bounded all the same), then stops; asserts that there were
    /// and that every one was answered.
    fn every_scrape_answered(self, at_least: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.done.load(Ordering::Relaxed) < at_least && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop.store(true, Ordering::Relaxed);
        let results = self.thread.join().expect("the scraper thread");
        let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failures.is_empty(),
            "{} of {} scrapes failed: {failures:?}",
            failures.len(),
            results.len()
        );
        assert!(results.len() >= at_least, "only {} scrapes", results.len());
    }
}

/// Reads whatever the server sends until it closes the connection, for at most `timeout`:
/// the bytes, and whether the connection ended (EOF or reset) within it.
fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    let mut chunk = [0; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (received, false);
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => return (received, true),
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return (received, false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return (received, true),
        }
    }
}

/// Repeats `attack` for at least `length`, so that the scraper beside it scrapes many times.
fn for_at_least(length: Duration, mut attack: impl FnMut()) {
    let started = Instant::now();
    while started.elapsed() < length {
        attack();
    }
}

fn status_of(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn counter(process: &ExampleProcess, name: &str) -> f64 {
    process
        .scrape()
        .value(name, &[])
        .unwrap_or_else(|| panic!("{name} is exposed"))
}

#[test]
fn get_and_head_metrics_404_405_and_connection_close_are_as_before() {
    let process = target();
    let addr = process.metrics;
    let timeout = Duration::from_secs(10);
    let request = |head: &str| {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let (response, closed) = read_until_closed(&mut stream, timeout);
        assert!(closed, "the server closes after one answer: {head:?}");
        String::from_utf8(response).unwrap()
    };
    let get = request("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(get.as_bytes()), Some(200), "{get}");
    let head = get.to_ascii_lowercase();
    assert!(
        head.contains("content-type: text/plain; version=0.0.4\r\n"),
        "{get:.400}"
    );
    assert!(head.contains("connection: close\r\n"), "{get:.400}");
    assert!(get.contains("framework_info{"), "{get:.400}");

    let head_only = request("HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(head_only.as_bytes()), Some(200));
    assert!(head_only.ends_with("\r\n\r\n"), "no body for HEAD: {head_only}");

    let post = request("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status_of(post.as_bytes()), Some(405), "{post}");
    assert!(post.to_ascii_lowercase().contains("allow: get, head\r\n"), "{post}");

    let elsewhere = request("GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(elsewhere.as_bytes()), Some(404));
    assert!(
        elsewhere.ends_with("not found: metrics are at /metrics\n"),
        "{elsewhere}"
    );

    let query = try_http(addr, "GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", timeout).unwrap();
    assert_eq!(query.0, 200);
}

#[test]
fn a_huge_content_length_on_any_path_is_answered_without_reading_a_body() {
    let mut process = target();
    let addr = process.metrics;
    let scraper = Scraper::start(addr, Duration::from_millis(50));
    let mut round = 0;
    for_at_least(Duration::from_secs(2), || {
        round += 1;
        for (method, path, expected) in [
            ("GET", "/favicon.ico", 404),
            ("GET", "/metrics", 200),
            ("POST", "/metrics", 405),
            ("PUT", "/", 404),
            ("GET", "/metrics/../x?y=%00", 404),
        ] {
            let mut stream = TcpStream::connect(addr).unwrap();
            let head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n");
            stream.write_all(head.as_bytes()).unwrap();
            if round % 2 == 1 {
                // Some body follows, far less than announced.
                stream.write_all(&[b'x'; 4096]).unwrap();
            }
            let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(5));
            assert_eq!(status_of(&response), Some(expected), "{method} {path}");
            assert!(closed, "{method} {path}: closed after the answer, no body awaited");
        }
    });
    scraper.every_scrape_answered(10);
    assert!(process.alive(), "the process lives: {}", process.stderr());
}

#[test]
fn bodies_never_sent_and_pipelined_requests_never_read_hold_nothing() {
    let mut process = target();
    let addr = process.metrics;
    let scraper = Scraper::start(addr, Duration::from_millis(50));
    // Announced bodies that never come, from more clients than the endpoint serves at once.
    let mut silent: Vec<TcpStream> = (0..2 * MAX_CONNECTIONS)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
                .unwrap();
            stream
        })
        .collect();
    // Hundreds of requests in one go on each of a few connections, whose answers are never read.
    let pipelined = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
    let mut deaf: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(pipelined.as_bytes()).unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    scraper.every_scrape_answered(10);
    for stream in &mut silent {
        let (response, closed) = read_until_closed(stream, Duration::from_secs(5));
        assert_eq!(
            status_of(&response),
            Some(405),
            "answered without the body: {:?} {closed}",
            String::from_utf8_lossy(&response)
        );
        assert!(closed);
    }
    for stream in &mut deaf {
        let (response, closed) = read_until_closed(stream, Duration::from_secs(5));
        let answers = String::from_utf8_lossy(&response)
            .matches("HTTP/1.1 200 OK\r\n")
            .count();
        assert!(answers <= 1, "one request per connection, {answers} answered");
        assert!(closed, "the rest of the pipeline is not served");
    }
    assert!(process.alive(), "{}", process.stderr());
}

#[test]
fn an_endless_header_line_is_cut_at_the_head_limit_and_memory_stays_flat() {
    let mut process = target();
    let addr = process.metrics;
    let scraper = Scraper::start(addr, Duration::from_millis(50));
    let before = process.rss_bytes();
    let mut sent_by_client = Vec::new();
    for_at_least(Duration::from_secs(2), || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nX-Endless: ").unwrap();
        let chunk = [b'a'; 64 * 1024];
        let mut sent = 0usize;
        // Up to 256 MiB: the server must cut it off long before.
        while sent < 256 << 20 {
            match stream.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent_by_client.push(sent);
    });
    scraper.every_scrape_answered(10);
    for sent in &sent_by_client {
        // What the two sockets' buffers absorb before the server's close reaches the client.
        assert!(*sent < 64 << 20, "the server kept reading: {sent} bytes taken");
    }
    let grown = process.rss_bytes().saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "resident set grew {grown} bytes under {} endless header lines",
        sent_by_client.len()
    );
    assert!(
        counter(&process, "agent_telemetry_metrics_requests_malformed_total") >= sent_by_client.len() as f64,
        "each oversized head is counted"
    );
    assert!(process.alive(), "{}", process.stderr());
}

#[test]
fn an_oversized_head_gets_431() {
    let process = target();
    let addr = process.metrics;
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(12 * 1024)
    );
    stream.write_all(head.as_bytes()).unwrap();
    let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(5));
    assert_eq!(
        status_of(&response),
        Some(431),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert!(closed);
    let many_headers: String = (0..100).map(|n| format!("X-{n}: y\r\n")).collect();
    let answer = try_http(
        addr,
        &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(answer.0, 431, "more headers than allowed");
}

#[test]
fn slowloris_clients_cannot_starve_scrapes() {
    let mut process = target();
    let addr = process.metrics;
    let scraper = Scraper::start(addr, Duration::from_millis(100));
    let stop = Arc::new(AtomicBool::new(false));
    // Twice as many clients as the endpoint serves at once, each trickling a header byte every
    // 100 ms and reconnecting whenever it is cut off, for longer than the head timeout.
    let attackers: Vec<JoinHandle<()>> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let connect = || {
                    let mut stream = TcpStream::connect(addr).ok()?;
                    stream.write_all(b"GET /metrics HTTP/1.1\r\nX-a: ").ok()?;
                    Some(stream)
                };
                let mut streams: Vec<Option<TcpStream>> = (0..MAX_CONNECTIONS / 2).map(|_| connect()).collect();
                while !stop.load(Ordering::Relaxed) {
                    for stream in &mut streams {
                        let alive = stream.as_mut().is_some_and(|s| s.write_all(b"a").is_ok());
                        if !alive {
                            *stream = connect();
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    std::thread::sleep(HEAD_TIMEOUT + Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.join().unwrap();
    }
    scraper.every_scrape_answered(10);
    let scrape = process.scrape();
    let refused = scrape
        .value("agent_telemetry_metrics_connections_refused_total", &[])
        .unwrap();
    let timed_out = scrape
        .value("agent_telemetry_metrics_connections_timed_out_total", &[])
        .unwrap();
    assert!(
        refused > 0.0,
        "beyond the limit, trickling clients are closed and counted"
    );
    assert!(
        refused + timed_out >= MAX_CONNECTIONS as f64,
        "refused {refused}, timed out {timed_out}"
    );
    assert!(process.alive(), "{}", process.stderr());
}

/// Telemetry in this process whose answers are about 6 MB (2,000 agents of 200-character
/// names), more than the kernel buffers for a client that does not read.
fn harness_with_large_answers(
    configure: impl FnOnce(agent_telemetry::AgentTelemetryBuilder) -> agent_telemetry::AgentTelemetryBuilder,
) -> support::Harness {
    let harness = support::Harness::with(|builder| {
        configure(
            builder
                .with_max_agent_names(2_000)
                .with_traces_exporter(agent_telemetry::TracesExporter::None),
        )
    });
    harness.run(|| {
        for n in 0..2_000 {
            let name = format!("{n:0>200}");
            tracing::info_span!("agent_execution", agent_name = name.as_str(), task = "t").in_scope(|| {});
        }
    });
    harness
}

/// `count` clients that send a scrape request to `addr` and never read the answer.
fn deaf_clients(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(scrape_request(addr).as_bytes()).unwrap();
            stream
        })
        .collect()
}

/// `count` clients that send a scrape request to `addr` and never read the answer, each
/// sending its request once the one before has its answer: a render each.
fn deaf_clients_one_by_one(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let client = deaf_clients(addr, 1).remove(0);
            client.set_read_timeout(Some(HEAD_TIMEOUT)).unwrap();
            assert!(matches!(client.peek(&mut [0; 1]), Ok(1)), "answered");
            client
        })
        .collect()
}

#[test]
fn clients_that_never_read_a_large_answer_cannot_hold_every_slot() {
    // Room for 4 connections: 8 clients that do not read would hold every slot for 10 s.
    let harness = harness_with_large_answers(|builder| builder.with_metrics_max_connections(4));
    let addr = harness.telemetry().metrics_addr().unwrap();
    let deaf = deaf_clients(addr, 8);
    std::thread::sleep(Duration::from_millis(500));
    let scraper = Scraper::start(addr, Duration::from_millis(300));
    std::thread::sleep(Duration::from_secs(4));
    scraper.every_scrape_answered(5);
    let refused = harness
        .scrape()
        .value("agent_telemetry_metrics_connections_refused_total", &[]);
    assert!(
        refused.unwrap() >= 4.0,
        "stalled answers closed to make room: {refused:?}"
    );
    drop(deaf);
}

#[test]
fn clients_hammering_requests_share_renders_and_scrapes_are_still_answered() {
    // Rendered anew for each request, 60 clients asking for a 6 MB answer again as soon as
    // they have its first byte queue each scrape behind 60 renders.
    let harness = harness_with_large_answers(|builder| builder);
    let addr = harness.telemetry().metrics_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicUsize::new(0));
    let hammers: Vec<JoinHandle<()>> = (0..60)
        .map(|_| {
            let (stop, requests) = (Arc::clone(&stop), Arc::clone(&requests));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = TcpStream::connect(addr) else {
                        continue;
                    };
                    let _ = stream.set_read_timeout(Some(EXCHANGE_TIMEOUT));
                    if stream.write_all(scrape_request(addr).as_bytes()).is_ok() && stream.read(&mut [0; 1]).is_ok() {
                        requests.fetch_add(1, Ordering::Relaxed);
                    }
                    // Dropped unread: the connection is reset.
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let scraper = Scraper::start(addr, Duration::from_millis(300));
    std::thread::sleep(Duration::from_secs(4));
    scraper.every_scrape_answered(5);
    stop.store(true, Ordering::Relaxed);
    for hammer in hammers {
        hammer.join().unwrap();
    }
    let requests = requests.load(Ordering::Relaxed) as f64;
    let scrape = harness.scrape();
    let coalesced = scrape
        .value("agent_telemetry_metrics_requests_coalesced_total", &[])
        .unwrap();
    assert!(
        requests >= 60.0 && coalesced >= requests / 2.0,
        "{coalesced} of {requests} requests sent a render another led"
    );
    let stale = scrape.value("agent_telemetry_metrics_answers_shared_total", &[]);
    assert_eq!(stale, Some(0.0), "every answer as fresh as its request");
}

#[test]
fn past_64_mib_of_answers_held_a_scrape_is_sent_the_latest_one_shared() {
    // 24 clients that do not read, inside the connection limit, one after another (requests
    // at once would share renders): each answered anew, they would hold 24 answers (about
    // 150 MB) for the exchange's 10 s.
    let harness = harness_with_large_answers(|builder| builder);
    let addr = harness.telemetry().metrics_addr().unwrap();
    let deaf = deaf_clients_one_by_one(addr, 24);
    let deadline = Instant::now() + Duration::from_secs(8);
    let answered = || {
        deaf.iter()
            .filter(|stream| {
                stream.set_nonblocking(true).unwrap();
                matches!(stream.peek(&mut [0; 1]), Ok(n) if n > 0)
            })
            .count()
    };
    while answered() < deaf.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(answered(), deaf.len(), "every client answered at once");
    // One more execution of an agent the answers count once.
    let agent = format!("{:0>200}", 0);
    harness.run(|| {
        tracing::info_span!("agent_execution", agent_name = agent.as_str(), task = "t").in_scope(|| {});
    });
    let executions = |scrape: &support::Scrape| {
        scrape.value(
            "agent_executions_total",
            &[("agent_name", agent.as_str()), ("status", "success")],
        )
    };
    let shared = harness.scrape();
    assert_eq!(
        executions(&shared),
        Some(1.0),
        "past the limit, the latest answer is shared, not rendered anew"
    );
    let counted = shared.value("agent_telemetry_metrics_answers_shared_total", &[]);
    let deaf_count = deaf.len();
    drop(deaf);
    // The clients' answers are released as the server sees them gone.
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    let mut fresh = harness.scrape();
    while executions(&fresh) == Some(1.0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        fresh = harness.scrape();
    }
    assert_eq!(executions(&fresh), Some(2.0), "rendered anew once there is room");
    // The shared answer was rendered before the requests it went to; a new one counts them
    // all: the clients answered past the limit and the scrape.
    let shared_count = fresh
        .value("agent_telemetry_metrics_answers_shared_total", &[])
        .unwrap();
    let rendered = (64 << 20) / shared.text.len();
    assert!(
        shared_count >= (deaf_count - rendered + 1) as f64,
        "{shared_count} answers counted as shared, {rendered} rendered (the shared answer said {counted:?})"
    );
}

#[test]
fn idle_connections_faster_than_they_time_out_do_not_starve_scrapes() {
    let mut process = target();
    let addr = process.metrics;
    let stop = Arc::new(AtomicBool::new(false));
    // Four times the connection limit, each connecting, sending nothing, and reconnecting as
    // soon as it is closed.
    let attackers: Vec<JoinHandle<usize>> = (0..4 * MAX_CONNECTIONS)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut connections = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut stream) = TcpStream::connect(addr) {
                        connections += 1;
                        read_until_closed(&mut stream, Duration::from_secs(1));
                    }
                }
                connections
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let scraper = Scraper::start(addr, Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(5));
    scraper.every_scrape_answered(10);
    stop.store(true, Ordering::Relaxed);
    let connections: usize = attackers.into_iter().map(|a| a.join().unwrap()).sum();
    assert!(connections > 1_000, "the flood made {connections} connections");
    assert!(process.alive(), "{}", process.stderr());
}

#[test]
fn a_client_that_half_closes_after_its_request_gets_its_answer() {
    let process = target();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(process.metrics).unwrap();
        stream.write_all(scrape_request(process.metrics).as_bytes()).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(5));
        assert!(closed);
        assert_eq!(
            status_of(&response),
            Some(200),
            "{}",
            String::from_utf8_lossy(&response)
        );
    }
}

#[test]
fn a_silent_client_is_closed_after_the_head_timeout() {
    let process = target();
    let mut silent = TcpStream::connect(process.metrics).unwrap();
    let started = Instant::now();
    let (response, closed) = read_until_closed(&mut silent, EXCHANGE_TIMEOUT + Duration::from_secs(5));
    assert!(closed, "still open after {:?}", started.elapsed());
    assert!(response.is_empty() || status_of(&response).is_some_and(|s| s >= 400));
    assert!(
        counter(&process, "agent_telemetry_metrics_connections_timed_out_total") >= 1.0,
        "counted as timed out"
    );
}

#[test]
fn an_http2_preface_is_refused_and_serving_goes_on() {
    let mut process = target();
    let addr = process.metrics;
    let scraper = Scraper::start(addr, Duration::from_millis(50));
    let mut prefaces = 0;
    for_at_least(Duration::from_secs(2), || {
        prefaces += 1;
        let mut stream = TcpStream::connect(addr).unwrap();
        // The client preface, then an empty SETTINGS frame.
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
        let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(5));
        assert!(closed, "an HTTP/2 client is not served");
        assert!(!String::from_utf8_lossy(&response).contains("agent_executions_total"));
    });
    scraper.every_scrape_answered(10);
    assert!(counter(&process, "agent_telemetry_metrics_requests_malformed_total") >= f64::from(prefaces));
    assert!(process.alive(), "{}", process.stderr());
}

#[test]
fn an_idle_flood_past_the_fd_limit_is_survived_and_serving_resumes() {
    // 64 descriptors in all for the process: fewer than the endpoint's connection limit, so
    // the flood exhausts the process's descriptors before the endpoint's slots.
    let mut process = ExampleProcess::start(&["--rate", "20"], &[], Some(64));
    let addr = process.metrics;
    let flood: Vec<TcpStream> = (0..400).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    assert!(flood.len() > 100, "the kernel queues the flood: {}", flood.len());
    // During the spell, scrapes still get through: idle connections are closed to free
    // descriptors for them.
    let scraper = Scraper::start(addr, Duration::from_millis(200));
    std::thread::sleep(Duration::from_secs(6));
    scraper.every_scrape_answered(5);
    drop(flood);
    // After it, serving goes on as before.
    let scrape = process.scrape();
    let accept_errors = scrape
        .value("agent_telemetry_metrics_accept_errors_total", &[])
        .unwrap();
    assert!(accept_errors > 0.0, "the process ran out of descriptors");
    let warnings = process
        .stderr()
        .matches("the /metrics server cannot accept connections")
        .count();
    assert_eq!(warnings, 1, "one warning per spell:\n{}", process.stderr());
    for _ in 0..20 {
        process.scrape();
    }
    assert!(process.alive(), "{}", process.stderr());
}

#[test]
fn a_client_that_does_not_read_a_large_answer_is_dropped_after_the_exchange_timeout() {
    // Thousands of long agent names make an answer larger than the socket buffers take.
    let harness = support::Harness::with(|builder| builder.with_max_agent_names(20_000));
    harness.run(|| {
        for n in 0..6_000 {
            let name = format!("{n:0>200}");
            tracing::info_span!("agent_execution", agent_name = name.as_str(), task = "t").in_scope(|| {});
        }
    });
    let addr = harness.telemetry().metrics_addr().unwrap();
    let mut deaf = TcpStream::connect(addr).unwrap();
    deaf.write_all(scrape_request(addr).as_bytes()).unwrap();
    let timed_out = || {
        harness
            .scrape()
            .value("agent_telemetry_metrics_connections_timed_out_total", &[])
    };
    assert_eq!(timed_out(), Some(0.0));
    let deadline = Instant::now() + EXCHANGE_TIMEOUT + Duration::from_secs(10);
    while timed_out() == Some(0.0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(timed_out(), Some(1.0), "the deaf client was dropped");
    let (received, closed) = read_until_closed(&mut deaf, Duration::from_secs(5));
    assert!(closed, "closed by the server");
    assert!(received.len() < 30 << 20, "{} bytes", received.len());
}

/// An application's collector that panics while `panics` is set.
struct PanickingCollector {
    panics: Arc<AtomicBool>,
    desc: prometheus::core::Desc,
}

impl prometheus::core::Collector for PanickingCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        assert!(!self.panics.load(Ordering::Relaxed), "the collector panics");
        Vec::new()
    }
}

#[test]
fn a_collector_that_panics_gets_500_and_frees_its_slot() {
    // Two slots: each panic used to take one with it for good, and the endpoint went silent.
    let harness = support::Harness::with(|builder| {
        builder
            .with_metrics_max_connections(2)
            .with_traces_exporter(agent_telemetry::TracesExporter::None)
    });
    let panics = Arc::new(AtomicBool::new(true));
    let desc = prometheus::core::Desc::new("app_panicky".into(), "panics".into(), vec![], Default::default()).unwrap();
    let collector = PanickingCollector {
        panics: Arc::clone(&panics),
        desc,
    };
    let telemetry = harness.telemetry();
    telemetry.metrics().registry().register(Box::new(collector)).unwrap();
    let addr = telemetry.metrics_addr().unwrap();
    for _ in 0..4 {
        let answer = try_http(addr, &scrape_request(addr), Duration::from_secs(5));
        assert!(matches!(answer, Ok((500, _))), "{answer:?}");
    }
    panics.store(false, Ordering::Relaxed);
    let answer = try_http(addr, &scrape_request(addr), Duration::from_secs(5));
    assert!(
        matches!(&answer, Ok((200, body)) if body.contains("agent_telemetry_log_lines_written_total")),
        "{answer:?}"
    );
}

#[test]
fn a_bearer_token_guards_metrics_and_is_never_printed() {
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("metrics.token");
    std::fs::write(&token_file, "tok-3f9a1c77e2\n").unwrap();
    let process = ExampleProcess::start(
        &["--rate", "20"],
        &[("AGENT_TELEMETRY_METRICS_TOKEN_FILE", token_file.to_str().unwrap())],
        None,
    );
    let addr = process.metrics;
    let timeout = Duration::from_secs(5);
    for authorization in [
        "",
        "Authorization: Bearer wrong\r\n",
        "Authorization: Basic dG9rLTNm\r\n",
    ] {
        let (status, body) = try_http(
            addr,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{authorization}\r\n"),
            timeout,
        )
        .unwrap();
        assert_eq!(status, 401, "{authorization:?}");
        assert!(!body.contains("tok-3f9a1c77e2") && !body.contains("agent_executions_total"));
    }
    let (status, body) = try_http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-3f9a1c77e2\r\n\r\n",
        timeout,
    )
    .unwrap();
    assert_eq!(status, 200);
    let scrape = support::Scrape::parse(&body);
    assert_eq!(
        scrape.value("agent_telemetry_metrics_requests_unauthorized_total", &[]),
        Some(3.0)
    );
    assert!(!process.stderr().contains("tok-3f9a1c77e2"));
}

#[test]
fn a_missing_or_empty_token_file_is_an_error_naming_the_variable() {
    let work = tempfile::tempdir().unwrap();
    let empty = work.path().join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    for path in [empty, work.path().join("missing.token")] {
        let result = agent_telemetry::AgentTelemetry::builder()
            .ignore_environment()
            .with_metrics_addr(([127, 0, 0, 1], 0))
            .with_metrics_bearer_token_file(&path)
            .with_traces_exporter(agent_telemetry::TracesExporter::None)
            .build::<tracing_subscriber::Registry>();
        let error = result.err().expect("a bad token file is an error").to_string();
        assert!(error.contains("AGENT_TELEMETRY_METRICS_TOKEN_FILE"), "{error}");
    }
}

/// Bytes a hostile client might send: anything, or a request line followed by anything.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let anything = proptest::collection::vec(any::<u8>(), 0..4096);
    let after_request_line = proptest::collection::vec(any::<u8>(), 0..2048).prop_map(|rest| {
        let mut bytes = b"GET /metrics HTTP/1.1\r\n".to_vec();
        bytes.extend(rest);
        bytes
    });
    prop_oneof![anything, after_request_line]
}

#[test]
fn random_bytes_never_take_the_endpoint_down() {
    // One process for every generated case: it must outlive them all.
    let mut process = target();
    let addr = process.metrics;
    let config = proptest::test_runner::Config {
        cases: 64,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let outcome = runner.run(&hostile_bytes(), |bytes| {
        let mut stream = TcpStream::connect(addr).unwrap();
        // The server may close before taking everything: that is an answer too.
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(Shutdown::Write);
        let (_, closed) = read_until_closed(&mut stream, EXCHANGE_TIMEOUT + Duration::from_secs(5));
        prop_assert!(closed, "the server ends every connection");
        let (status, body) = try_http(addr, &scrape_request(addr), Duration::from_secs(5)).unwrap();
        prop_assert_eq!(status, 200);
        prop_assert!(body.contains("# TYPE framework_info gauge"));
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}\n{}", process.stderr());
    }
    assert!(process.alive(), "{}", process.stderr());
}
