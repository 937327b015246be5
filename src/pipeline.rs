//! The pipeline thread: the agent's thread hands each closed execution over in one queue
//! push; this thread formats its log line and builds its span. A full queue drops the
//! execution's line and span, never the agent's time, and counts both.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::execution::Execution;
use crate::logs::LogLines;
use crate::stats::{first_time, TelemetryStats};
use crate::traces::{AgentSpan, AgentTracer};

/// How long the thread lets executions gather after it emptied the queue: bounds its
/// wake-ups to about 200 a second under load, and delays a line or span by at most this much.
const LINGER: Duration = Duration::from_millis(5);

/// A closed execution and, when it is sampled, its span.
pub(crate) struct Closed {
    pub execution: Execution,
    pub span: Option<AgentSpan>,
}

// The size is the point: see the variant.
#[allow(clippy::large_enum_variant)]
enum Message {
    /// Not boxed: an allocation made here and freed on the pipeline's thread would contend
    /// for the allocator's lock on every execution.
    Closed(Closed),
    /// Finish everything queued before this message, then acknowledge (and stop).
    Flush { ack: SyncSender<()>, stop: bool },
}

/// The sending side, held by the layer.
pub(crate) struct Pipeline {
    sender: SyncSender<Message>,
    stats: Arc<TelemetryStats>,
    tracer: Option<Arc<AgentTracer>>,
    capacity: usize,
    /// Whether the first full-queue drop was reported.
    warned_full: AtomicBool,
    /// Whether the first drop after shutdown was reported.
    warned_shut_down: AtomicBool,
    /// Set when shutdown asks the thread to stop: a thread gone before that has crashed.
    stopping: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Pipeline {
    pub(crate) fn start(
        logs: LogLines,
        tracer: Option<Arc<AgentTracer>>,
        capacity: usize,
        stats: Arc<TelemetryStats>,
    ) -> Result<Self> {
        let (sender, receiver) = sync_channel(capacity);
        let worker = Worker {
            logs,
            tracer: tracer.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("agent-telemetry".into())
            .spawn(move || worker.run(&receiver))
            .map_err(|source| Error::Thread {
                name: "agent-telemetry",
                source,
            })?;
        Ok(Pipeline {
            sender,
            stats,
            tracer,
            capacity,
            warned_full: AtomicBool::new(false),
            warned_shut_down: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a closed execution; never blocks. A full queue drops its line and span, and so
    /// does a pipeline whose thread has ended.
    pub(crate) fn send(&self, closed: Closed) {
        let (closed, ended) = match self.sender.try_send(Message::Closed(closed)) {
            Err(TrySendError::Full(Message::Closed(closed))) => (closed, false),
            Err(TrySendError::Disconnected(Message::Closed(closed))) => (closed, true),
            // Sent, or (never) not an execution.
            Ok(()) | Err(_) => return,
        };
        TelemetryStats::add(&self.stats.log_lines_dropped, 1);
        if ended {
            if first_time(&self.warned_shut_down) {
                if self.stopping.load(Ordering::Relaxed) {
                    tracing::warn!(
                        target: "agent_telemetry::logs",
                        "an agent execution closed after agent-telemetry shut down; dropping its log line and span and counting them in agent_telemetry_log_lines_dropped_total and agent_telemetry_spans_dropped_total"
                    );
                } else {
                    tracing::error!(
                        target: "agent_telemetry::logs",
                        "the agent-telemetry pipeline thread has ended unexpectedly; dropping every log line and span from now on and counting them in agent_telemetry_log_lines_dropped_total and agent_telemetry_spans_dropped_total"
                    );
                }
            }
        } else if first_time(&self.warned_full) {
            tracing::warn!(
                target: "agent_telemetry::logs",
                capacity = self.capacity,
                "pipeline queue full (with_log_queue_lines): executions arrive faster than their lines are written and spans built; dropping both and counting them in agent_telemetry_log_lines_dropped_total and agent_telemetry_spans_dropped_total"
            );
        }
        if let (Some(tracer), Some(_)) = (&self.tracer, &closed.span) {
            tracer.count_dropped();
        }
    }

    /// Waits until every execution queued so far is written and handed to the span
    /// processor, or `timeout` passes; with `stop`, the thread then ends.
    pub(crate) fn flush(&self, timeout: Duration, stop: bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if stop {
            self.stopping.store(true, Ordering::Relaxed);
        }
        let (ack, acknowledged) = sync_channel(1);
        let mut message = Message::Flush { ack, stop };
        loop {
            match self.sender.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return Ok(()), // already shut down
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(TrySendError::Full(_)) => return Err(timed_out(timeout)),
            }
        }
        match acknowledged.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(()) if !stop => Ok(()),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
                if let Some(thread) = thread {
                    // The thread has acknowledged; joining only reaps it.
                    let _ = thread.join();
                }
                Ok(())
            }
            Err(RecvTimeoutError::Timeout) => Err(timed_out(timeout)),
        }
    }
}

fn timed_out(timeout: Duration) -> Error {
    Error::Shutdown {
        signal: "logs",
        reason: format!("lines were still being written after {timeout:?}"),
    }
}

/// The receiving side, on its own thread.
struct Worker {
    logs: LogLines,
    tracer: Option<Arc<AgentTracer>>,
}

impl Worker {
    fn run(mut self, receiver: &Receiver<Message>) {
        while let Ok(first) = receiver.recv() {
            let mut next = Some(first);
            let mut flush = None;
            // Take what is queued now, without waiting.
            while let Some(message) = next.take() {
                match message {
                    Message::Closed(closed) => self.handle(closed),
                    Message::Flush { ack, stop } => {
                        flush = Some((ack, stop));
                        break;
                    }
                }
                next = receiver.try_recv().ok();
            }
            self.logs.write_out();
            match flush {
                Some((ack, stop)) => {
                    let _ = ack.send(());
                    if stop {
                        return;
                    }
                }
                // Let executions gather instead of parking on the channel, where every new
                // one would wake this thread: a wake-up costs the agent's thread a system call.
                None => std::thread::sleep(LINGER),
            }
        }
    }

    fn handle(&mut self, closed: Closed) {
        self.logs.append(&closed.execution);
        if let (Some(tracer), Some(span)) = (&self.tracer, closed.span) {
            tracer.export(span, closed.execution);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::SystemTime;

    use super::*;
    use crate::config::Config;
    use crate::execution::Status;
    use crate::test_support::Warnings;

    /// A pipeline writing to `destination` through a queue of `capacity`, sent `executions`.
    fn send(destination: Box<dyn Write + Send>, capacity: usize, executions: usize) -> (Pipeline, Arc<TelemetryStats>) {
        let stats = Arc::new(TelemetryStats::default());
        let logs = LogLines::new(&Config::default(), Some(destination), Arc::clone(&stats)).unwrap();
        let pipeline = Pipeline::start(logs, None, capacity, Arc::clone(&stats)).unwrap();
        send_more(&pipeline, executions);
        (pipeline, stats)
    }

    /// Sends `executions` more closed executions, untraced.
    fn send_more(pipeline: &Pipeline, executions: usize) {
        for _ in 0..executions {
            pipeline.send(Closed {
                execution: execution(),
                span: None,
            });
        }
    }

    fn execution() -> Execution {
        Execution {
            agent_name: "a".into(),
            task: "t".into(),
            duration: Duration::from_millis(1),
            status: Status::Success,
            failure: None,
            finished_at: SystemTime::now(),
            trace: None,
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        /// A disk that takes its time, so the queue fills.
        struct SlowDisk;
        impl Write for SlowDisk {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_millis(20));
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let warnings = Warnings::with_target("agent_telemetry::logs");
        let (pipeline, stats) =
            tracing::dispatcher::with_default(&warnings.dispatch(), || send(Box::new(SlowDisk), 4, 1000));
        pipeline.flush(Duration::from_secs(30), true).unwrap();
        let written = TelemetryStats::get(&stats.log_lines_written);
        let dropped = TelemetryStats::get(&stats.log_lines_dropped);
        assert_eq!(written + dropped, 1000, "every line is written or counted");
        assert!(dropped > 0, "a 4-execution queue cannot hold 1000");
        let warnings = warnings.messages();
        assert_eq!(warnings.len(), 1, "the first drop warns, once: {warnings:?}");
        assert!(warnings[0].starts_with("pipeline queue full"), "{warnings:?}");
    }

    #[test]
    fn executions_after_shutdown_are_counted_and_the_warning_says_why() {
        let warnings = Warnings::with_target("agent_telemetry::logs");
        let dispatch = warnings.dispatch();
        let (pipeline, stats) = tracing::dispatcher::with_default(&dispatch, || {
            let (pipeline, stats) = send(Box::new(std::io::sink()), 64, 2);
            pipeline.flush(Duration::from_secs(5), true).unwrap();
            (pipeline, stats)
        });
        tracing::dispatcher::with_default(&dispatch, || {
            send_more(&pipeline, 3);
        });
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 2);
        assert_eq!(TelemetryStats::get(&stats.log_lines_dropped), 3);
        let warnings = warnings.messages();
        assert_eq!(warnings.len(), 1, "one warning for the three: {warnings:?}");
        assert!(warnings[0].contains("after agent-telemetry shut down"), "{warnings:?}");
        assert!(!warnings[0].contains("queue full"), "{warnings:?}");
    }

    #[test]
    fn a_pipeline_thread_that_died_says_so_not_shutdown() {
        let errors = Warnings::with_target("agent_telemetry::logs").at_level(tracing::Level::ERROR);
        let (pipeline, stats) = send(Box::new(std::io::sink()), 64, 1);
        // The thread ends as if it had crashed: shutdown never asked it to (`stopping` unset).
        let (ack, acknowledged) = sync_channel(1);
        pipeline.sender.send(Message::Flush { ack, stop: true }).unwrap();
        acknowledged.recv().unwrap();
        pipeline.thread.lock().unwrap().take().unwrap().join().unwrap();
        tracing::dispatcher::with_default(&errors.dispatch(), || {
            send_more(&pipeline, 3);
        });
        let messages = errors.messages();
        assert_eq!(messages.len(), 1, "one error for the three: {messages:?}");
        assert!(
            messages[0].contains("pipeline thread has ended unexpectedly"),
            "{messages:?}"
        );
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 1);
        assert_eq!(TelemetryStats::get(&stats.log_lines_dropped), 3);
    }

    #[test]
    fn a_log_writer_that_panics_does_not_end_the_pipeline() {
        /// A log writer that panics on every write, as a broken one of a user's might.
        struct Panics;
        impl Write for Panics {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                panic!("the disk writer broke");
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let errors = Warnings::with_target("agent_telemetry::logs").at_level(tracing::Level::ERROR);
        let (pipeline, stats) = tracing::dispatcher::with_default(&errors.dispatch(), || {
            let (pipeline, stats) = send(Box::new(Panics), 64, 2);
            pipeline.flush(Duration::from_secs(5), false).unwrap();
            send_more(&pipeline, 3);
            (pipeline, stats)
        });
        pipeline.flush(Duration::from_secs(5), true).unwrap();
        assert_eq!(TelemetryStats::get(&stats.log_lines_dropped), 5, "every line counted");
        assert!(
            TelemetryStats::get(&stats.log_write_errors) >= 2,
            "the thread lived to write again"
        );
        assert_eq!(errors.messages(), Vec::<String>::new(), "the thread did not end");
    }

    #[test]
    fn flush_writes_everything_queued_before_it() {
        let (pipeline, stats) = send(Box::new(std::io::sink()), 64, 50);
        pipeline.flush(Duration::from_secs(5), false).unwrap();
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 50);
        pipeline.flush(Duration::from_secs(5), true).unwrap();
    }
}
