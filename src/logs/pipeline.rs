//! The log pipeline: each agent thread formats its executions' lines into a buffer of its own
//! (`pending.rs`); one thread collects the buffers and writes them. A full queue drops the
//! lines that do not fit, never the agent's time, and counts them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Appended, FullBuffer, LogLines, PendingLines};
use crate::background::{self, Linger, Sent};
use crate::error::{Error, Result};
use crate::execution::Execution;
use crate::stats::{first_time, TelemetryStats};

/// Why lines were lost.
#[derive(Clone, Copy)]
enum Why {
    /// The queue was full.
    Full,
    /// The log thread stopped taking lines.
    Closed,
    /// The log thread has ended.
    Gone,
}

/// Messages the queue holds at once. The lines wait with their threads, so the queue carries
/// only wake-ups and flushes: a wake-up that finds it full is not needed, as the messages
/// there wake the thread anyway, and a flush waits for room.
const QUEUE_MESSAGES: usize = 64;

enum Message {
    /// A thread's buffer has its first line, or filled: collect.
    Wake,
    /// Finish everything queued before this message, then acknowledge (and stop).
    Flush { ack: SyncSender<()>, stop: bool },
}

/// The sending side, held by the layer.
pub(crate) struct Pipeline {
    sender: SyncSender<Message>,
    lines: Arc<PendingLines>,
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

impl Pipeline {
    /// `capacity` bounds the lines waiting.
    pub(crate) fn start(logs: LogLines, capacity: usize, stats: Arc<TelemetryStats>) -> Result<Self> {
        let (sender, receiver) = sync_channel(QUEUE_MESSAGES);
        let lines = Arc::new(PendingLines::new(logs.format().clone(), capacity));
        let worker = Worker {
            logs,
            linger: Linger::new(capacity),
            lines: Arc::clone(&lines),
            collected: Vec::new(),
            stats: Arc::clone(&stats),
        };
        let thread = background::spawn("agent-tel-logs", move || worker.run(&receiver))?;
        Ok(Pipeline {
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
    /// or a pipeline whose thread has ended cannot take are dropped and counted.
    pub(crate) fn write_line(&self, execution: &Execution) {
        match self.lines.append(execution) {
            Appended::More => {}
            // A full queue holds messages that wake the thread anyway.
            Appended::First | Appended::Filled => {
                if let Err(TrySendError::Disconnected(_)) = self.sender.try_send(Message::Wake) {
                    self.lost(0, Why::Gone);
                }
            }
            Appended::Lost { lines } => self.lost(lines, Why::Full),
            Appended::Closed => self.lost(1, Why::Closed),
        }
    }

    /// Counts lost lines, and warns the first time, saying why.
    fn lost(&self, mut lines: u64, why: Why) {
        if let Why::Gone = why {
            // A thread that has ended takes no more lines: the ones waiting are lost too.
            lines += self.lines.discard();
        }
        TelemetryStats::add(&self.stats.log_lines_dropped, lines);
        if let Why::Full = why {
            if first_time(&self.warned_full) {
                tracing::warn!(
                    target: "agent_telemetry::logs",
                    capacity = self.capacity,
                    "pipeline queue full (with_log_queue_lines): lines are formatted faster than they are written; dropping the ones that do not fit and counting them in agent_telemetry_log_lines_dropped_total"
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

    /// Waits until every line formatted so far is written, or `timeout` passes; with `stop`,
    /// the thread then ends.
    pub(crate) fn flush(&self, timeout: Duration, stop: bool) -> Result<()> {
        let deadline = background::deadline_after(timeout);
        if stop {
            self.stopping.store(true, Ordering::Relaxed);
        }
        let (ack, acknowledged) = sync_channel(1);
        match background::send_by(&self.sender, Message::Flush { ack, stop }, deadline) {
            Sent::Yes => {}
            Sent::Gone => return Ok(()), // already shut down
            Sent::TimedOut => return Err(timed_out(timeout)),
        }
        match acknowledged.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(()) if !stop => Ok(()),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                // The thread has acknowledged; joining only reaps it.
                background::reap(&self.thread);
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
    linger: Linger,
    lines: Arc<PendingLines>,
    /// This round's buffers not yet taken (the `Vec` kept for its room).
    collected: Vec<FullBuffer>,
    stats: Arc<TelemetryStats>,
}

impl Worker {
    fn run(mut self, receiver: &Receiver<Message>) {
        // Whatever writing emits is not telemetry to export.
        let _suppressed = opentelemetry::Context::enter_telemetry_suppressed_scope();
        while let Ok(first) = receiver.recv() {
            let mut next = Some(first);
            let mut flush = None;
            // Every wake-up queued now is answered by this round's collection.
            while let Some(message) = next.take() {
                if let Message::Flush { ack, stop } = message {
                    flush = Some((ack, stop));
                    break;
                }
                next = receiver.try_recv().ok();
            }
            let stop = matches!(flush, Some((_, true)));
            if stop {
                // Lines appended after this are counted as dropped, not left unwritten: a
                // thread appends under its lock, which the collection takes after closing.
                self.lines.close();
            }
            let taken = self.take_collected();
            self.logs.write_out();
            match flush {
                Some((ack, stop)) => {
                    let _ = ack.send(());
                    if stop {
                        return;
                    }
                }
                None => self
                    .linger
                    .sleep(usize::try_from(taken).unwrap_or(usize::MAX), Duration::MAX),
            }
        }
    }

    /// Adds every thread's lines to the batch; returns how many.
    fn take_collected(&mut self) -> u64 {
        self.lines.collect(&mut self.collected);
        // Taken from the end, so that the buffers not yet taken stay in `collected`, for
        // `drop` to count, should writing panic (a subscriber of the writer's warning may).
        self.collected.reverse();
        let mut taken = 0;
        while let Some(buffer) = self.collected.pop() {
            self.logs.append_lines(&buffer.bytes, buffer.lines);
            self.lines.recycle(buffer.bytes);
            taken += buffer.lines;
        }
        taken
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A thread that panicked takes no more lines: count the ones it held, the ones
        // waiting, and the ones appended from now on.
        if std::thread::panicking() {
            let held: u64 = self.collected.iter().map(|buffer| buffer.lines).sum();
            TelemetryStats::add(&self.stats.log_lines_dropped, held + self.lines.discard());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::config::Config;
    use crate::test_support::{execution, Warnings};

    /// A pipeline writing to `destination` through a queue of `capacity`, sent `executions`.
    fn send(destination: Box<dyn Write + Send>, capacity: usize, executions: usize) -> (Pipeline, Arc<TelemetryStats>) {
        let stats = Arc::new(TelemetryStats::default());
        let logs = LogLines::new(&Config::default(), Some(destination), Arc::clone(&stats)).unwrap();
        let pipeline = Pipeline::start(logs, capacity, Arc::clone(&stats)).unwrap();
        send_more(&pipeline, executions);
        (pipeline, stats)
    }

    /// Sends `executions` more closed executions, untraced.
    fn send_more(pipeline: &Pipeline, executions: usize) {
        for _ in 0..executions {
            pipeline.write_line(&execution());
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
    fn a_log_thread_that_died_says_so_and_counts_what_was_waiting() {
        let errors = Warnings::with_target("agent_telemetry::logs").at_level(tracing::Level::ERROR);
        let (mut pipeline, stats) = send(Box::new(std::io::sink()), 64, 1);
        pipeline.flush(Duration::from_secs(5), false).unwrap();
        // The thread's queue is gone as if it had crashed: shutdown never asked it to stop
        // (`stopping` unset), and nothing closed the threads' buffers.
        let (dead, _) = sync_channel(1);
        pipeline.sender = dead;
        tracing::dispatcher::with_default(&errors.dispatch(), || {
            send_more(&pipeline, 3);
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
        let (pipeline, stats) = send(Box::new(captured.clone()), 1024, 0);
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let pipeline = &pipeline;
                scope.spawn(move || {
                    for line in 0..LINES {
                        pipeline.write_line(&Execution {
                            task: Some(format!("{thread}-{line}")),
                            ..execution()
                        });
                    }
                });
            }
        });
        pipeline.flush(Duration::from_secs(30), true).unwrap();
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
        let (pipeline, stats) = send(Box::new(std::io::sink()), 64, 50);
        pipeline.flush(Duration::from_secs(5), false).unwrap();
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 50);
        pipeline.flush(Duration::from_secs(5), true).unwrap();
    }
}
