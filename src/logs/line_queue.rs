//! The log queue's sending side, which agent threads feed: a line is formatted into the
//! thread's buffer (`handoff.rs`), the log thread is woken when a buffer has its first line or
//! fills, and a full queue drops (and counts) lines, never the agent's time. Flush and shutdown
//! are asked of the log thread (`log_thread.rs`) and answered.

use crossbeam_channel::{bounded, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::handoff::{Appended, Handoff, Message, QUEUE_MESSAGES};
use super::line::LineFormat;
use super::log_thread::LogThread;
use super::writer::LineBatch;
use crate::background;
use crate::error::{Error, Result};
use crate::execution::Execution;
use crate::stats::{first_time, TelemetryStats};

/// Why lines were lost.
#[derive(Clone, Copy)]
enum LossCause {
    /// The queue was full.
    Full,
    /// The log thread stopped taking lines.
    Closed,
    /// The log thread has ended.
    Gone,
}

/// The log queue's sending side, held by the layer.
pub(crate) struct LineQueue {
    sender: Sender<Message>,
    lines: Arc<Handoff>,
    stats: Arc<TelemetryStats>,
    capacity: usize,
    /// Whether the first full-queue drop was reported.
    warned_full: AtomicBool,
    /// Whether the first drop after shutdown was reported.
    warned_shut_down: AtomicBool,
    /// Set when shutdown asks the thread to stop: a thread gone before that has crashed.
    stopping: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl LineQueue {
    /// Starts the log thread, writing to `batch` the lines formatted by `format`; `capacity`
    /// bounds the lines waiting.
    pub(crate) fn start(
        format: LineFormat,
        batch: LineBatch,
        capacity: usize,
        stats: Arc<TelemetryStats>,
    ) -> Result<Self> {
        let (sender, receiver) = bounded(QUEUE_MESSAGES);
        let lines = Arc::new(Handoff::new(format, capacity));
        let log_thread = LogThread::new(batch, capacity, Arc::clone(&lines), Arc::clone(&stats));
        let thread = background::spawn("agent-tel-logs", move || log_thread.run(&receiver))?;
        Ok(LineQueue {
            sender,
            lines,
            stats,
            capacity,
            warned_full: AtomicBool::new(false),
            warned_shut_down: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Formats the execution's line on the calling thread; never blocks. Lines a full queue
    /// or a queue whose log thread has ended cannot take are dropped and counted.
    pub(crate) fn write_line(&self, execution: &Execution) {
        match self.lines.append(execution) {
            Appended::More => {}
            // A full queue holds messages that wake the thread anyway.
            Appended::First | Appended::Filled => {
                if let Err(TrySendError::Disconnected(_)) = self.sender.try_send(Message::Wake) {
                    self.lost(0, LossCause::Gone);
                }
            }
            Appended::Lost { lines } => self.lost(lines, LossCause::Full),
            Appended::Closed => self.lost(1, LossCause::Closed),
        }
    }

    /// Counts lost lines, and warns the first time, saying why.
    fn lost(&self, mut lines: u64, cause: LossCause) {
        if let LossCause::Gone = cause {
            // A thread that has ended takes no more lines: the ones waiting are lost too.
            lines += self.lines.discard();
        }
        TelemetryStats::add(&self.stats.log_lines_dropped, lines);
        if let LossCause::Full = cause {
            if first_time(&self.warned_full) {
                tracing::warn!(
                    target: "agent_telemetry::logs",
                    capacity = self.capacity,
                    "log queue full (with_log_queue_lines): lines are formatted faster than they are written; dropping the ones that do not fit and counting them in agent_telemetry_log_lines_dropped_total"
                );
            }
        } else if first_time(&self.warned_shut_down) {
            if self.stopping.load(Ordering::Relaxed) {
                tracing::warn!(
                    target: "agent_telemetry::logs",
                    "an agent execution closed after agent-telemetry shut down; dropping its log line and counting it in agent_telemetry_log_lines_dropped_total"
                );
            } else {
                tracing::error!(
                    target: "agent_telemetry::logs",
                    "the agent-telemetry log thread has ended unexpectedly; dropping every log line from now on and counting them in agent_telemetry_log_lines_dropped_total"
                );
            }
        }
    }

    /// Waits until every line formatted so far is written, or `timeout` passes.
    ///
    /// # Errors
    ///
    /// [`Error::Shutdown`] when the lines were still being written after `timeout`, or the log
    /// thread has ended before a shutdown asked it to (its lines, and every one since, counted
    /// as dropped).
    pub(crate) fn flush(&self, timeout: Duration) -> Result<()> {
        self.ask(timeout, false)
    }

    /// Writes every line formatted so far, then stops the log thread, within `timeout`; lines
    /// formatted after it are dropped and counted.
    ///
    /// # Errors
    ///
    /// [`Error::Shutdown`] when the lines were still being written after `timeout`, or the log
    /// thread had ended before it was asked to stop (its lines counted as dropped).
    pub(crate) fn shutdown(&self, timeout: Duration) -> Result<()> {
        self.ask(timeout, true)
    }

    /// Sends a flush, with `stop` a shutdown, and waits for its answer until `timeout`.
    fn ask(&self, timeout: Duration, stop: bool) -> Result<()> {
        let deadline = background::deadline_after(timeout);
        if stop {
            self.stopping.store(true, Ordering::Relaxed);
        }
        let (ack, acknowledged) = bounded(1);
        // A thread gone before it answered a shutdown has ended unexpectedly (a panic).
        let gone = || {
            if background::ended_unexpectedly(&self.thread) {
                Err(ended_unexpectedly())
            } else {
                Ok(())
            }
        };
        match self.sender.send_deadline(Message::Flush { ack, stop }, deadline) {
            Ok(()) => {}
            Err(SendTimeoutError::Disconnected(_)) => return gone(),
            Err(SendTimeoutError::Timeout(_)) => return Err(timed_out(timeout)),
        }
        match background::answer(&acknowledged, deadline, &self.thread) {
            Ok(()) if !stop => Ok(()),
            Ok(()) => {
                // The thread has acknowledged; joining only reaps it.
                background::join_answered(&self.thread);
                Ok(())
            }
            Err(RecvTimeoutError::Disconnected) => gone(),
            Err(RecvTimeoutError::Timeout) => Err(timed_out(timeout)),
        }
    }
}

fn ended_unexpectedly() -> Error {
    Error::Shutdown {
        signal: "logs",
        reason: "the log thread has ended unexpectedly; its lines and every one since are counted in agent_telemetry_log_lines_dropped_total".to_owned(),
    }
}

fn timed_out(timeout: Duration) -> Error {
    Error::Shutdown {
        signal: "logs",
        reason: format!("lines were still being written after {timeout:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::config::Config;
    use crate::test_support::{execution, Warnings};

    /// A queue of `capacity` lines writing to `destination`, sent `executions`.
    fn send(
        destination: Box<dyn Write + Send>,
        capacity: usize,
        executions: usize,
    ) -> (LineQueue, Arc<TelemetryStats>) {
        let stats = Arc::new(TelemetryStats::default());
        let batch = LineBatch::new(destination, Arc::clone(&stats));
        let queue = LineQueue::start(LineFormat::new(&Config::default()), batch, capacity, Arc::clone(&stats)).unwrap();
        send_more(&queue, executions);
        (queue, stats)
    }

    /// Sends `executions` more closed executions, untraced.
    fn send_more(queue: &LineQueue, executions: usize) {
        for _ in 0..executions {
            queue.write_line(&execution());
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
        let (queue, stats) =
            tracing::dispatcher::with_default(&warnings.dispatch(), || send(Box::new(SlowDisk), 4, 1000));
        queue.shutdown(Duration::from_secs(30)).unwrap();
        let written = TelemetryStats::get(&stats.log_lines_written);
        let dropped = TelemetryStats::get(&stats.log_lines_dropped);
        assert_eq!(written + dropped, 1000, "every line is written or counted");
        assert!(dropped > 0, "a 4-execution queue cannot hold 1000");
        let warnings = warnings.messages();
        assert_eq!(warnings.len(), 1, "the first drop warns, once: {warnings:?}");
        assert!(warnings[0].starts_with("log queue full"), "{warnings:?}");
    }

    #[test]
    fn executions_after_shutdown_are_counted_and_the_warning_says_why() {
        let warnings = Warnings::with_target("agent_telemetry::logs");
        let dispatch = warnings.dispatch();
        let (queue, stats) = tracing::dispatcher::with_default(&dispatch, || {
            let (queue, stats) = send(Box::new(std::io::sink()), 64, 2);
            queue.shutdown(Duration::from_secs(5)).unwrap();
            (queue, stats)
        });
        tracing::dispatcher::with_default(&dispatch, || {
            send_more(&queue, 3);
        });
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 2);
        assert_eq!(TelemetryStats::get(&stats.log_lines_dropped), 3);
        let warnings = warnings.messages();
        assert_eq!(warnings.len(), 1, "one warning for the three: {warnings:?}");
        assert!(warnings[0].contains("after agent-telemetry shut down"), "{warnings:?}");
        assert!(!warnings[0].contains("queue full"), "{warnings:?}");
    }

    #[test]
    fn a_log_thread_that_died_says_so_and_counts_what_was_waiting() {
        let errors = Warnings::with_target("agent_telemetry::logs").at_level(tracing::Level::ERROR);
        let (mut queue, stats) = send(Box::new(std::io::sink()), 64, 1);
        queue.flush(Duration::from_secs(5)).unwrap();
        // The thread's queue is gone as if it had crashed: shutdown never asked it to stop
        // (`stopping` unset), and nothing closed the threads' buffers.
        let (dead, _) = bounded(1);
        queue.sender = dead;
        tracing::dispatcher::with_default(&errors.dispatch(), || {
            send_more(&queue, 3);
        });
        let messages = errors.messages();
        assert_eq!(messages.len(), 1, "one error for the three: {messages:?}");
        assert!(
            messages[0].contains("log thread has ended unexpectedly"),
            "{messages:?}"
        );
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 1);
        assert_eq!(
            TelemetryStats::get(&stats.log_lines_dropped),
            3,
            "the one waiting, then each"
        );
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
        let (queue, stats) = tracing::dispatcher::with_default(&errors.dispatch(), || {
            let (queue, stats) = send(Box::new(Panics), 64, 2);
            queue.flush(Duration::from_secs(5)).unwrap();
            send_more(&queue, 3);
            (queue, stats)
        });
        queue.shutdown(Duration::from_secs(5)).unwrap();
        assert_eq!(TelemetryStats::get(&stats.log_lines_dropped), 5, "every line counted");
        assert!(
            TelemetryStats::get(&stats.log_write_errors) >= 2,
            "the thread lived to write again"
        );
        assert_eq!(errors.messages(), Vec::<String>::new(), "the thread did not end");
    }

    #[test]
    fn each_threads_lines_are_written_in_the_order_it_formatted_them() {
        /// Everything written, for reading back.
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        const THREADS: usize = 4;
        const LINES: usize = 20_000;
        let captured = Captured::default();
        // Room for a few handoffs: the log thread collects while threads fill and hand over.
        let (queue, stats) = send(Box::new(captured.clone()), 1024, 0);
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let queue = &queue;
                scope.spawn(move || {
                    for line in 0..LINES {
                        queue.write_line(&Execution {
                            task: Some(format!("{thread}-{line}")),
                            ..execution()
                        });
                    }
                });
            }
        });
        queue.shutdown(Duration::from_secs(30)).unwrap();
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let mut last = [None; THREADS];
        let mut written = 0;
        for line in text.lines() {
            let line: serde_json::Value = serde_json::from_str(line).unwrap();
            let (thread, n) = line["task"].as_str().unwrap().split_once('-').unwrap();
            let (thread, n): (usize, usize) = (thread.parse().unwrap(), n.parse().unwrap());
            assert!(
                last[thread] < Some(n),
                "thread {thread}: line {n} after {:?}",
                last[thread]
            );
            last[thread] = Some(n);
            written += 1;
        }
        let dropped = TelemetryStats::get(&stats.log_lines_dropped);
        assert_eq!(
            written + dropped,
            (THREADS * LINES) as u64,
            "every line written or counted"
        );
    }

    #[test]
    fn flush_writes_everything_queued_before_it() {
        let (queue, stats) = send(Box::new(std::io::sink()), 64, 50);
        queue.flush(Duration::from_secs(5)).unwrap();
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 50);
        queue.shutdown(Duration::from_secs(5)).unwrap();
    }
}
