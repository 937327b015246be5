//! The log pipeline: each agent thread formats its executions' lines into a buffer of its own
//! (`pending.rs`); one thread collects the buffers and writes them. A full queue drops the
//! lines that do not fit, never the agent's time, and counts them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Appended, FullBuffer, LogLines, PendingLines};
use crate::background::{self, Linger, Refused, Sent};
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

enum Message {
    /// A thread's full buffer of lines.
    Lines(FullBuffer),
    /// A thread's buffer has its first line: collect it.
    Wake,
    /// Finish everything queued before this message, then acknowledge (and stop).
    Flush { ack: SyncSender<()>, stop: bool },
}

/// The sending side, held by the layer.
pub(crate) struct Pipeline {
    sender: SyncSender<Message>,
    lines: Arc<PendingLines>,
    /// Full line buffers queued and not yet written, and how many may be.
    buffers_queued: Arc<AtomicUsize>,
    max_buffers_queued: usize,
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
        let (sender, receiver) = sync_channel(capacity);
        let lines = Arc::new(PendingLines::new(logs.format().clone(), capacity));
        let buffers_queued = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            logs,
            linger: Linger::new(capacity),
            lines: Arc::clone(&lines),
            buffers_queued: Arc::clone(&buffers_queued),
            stats: Arc::clone(&stats),
        };
        let thread = background::spawn("agent-tel-logs", move || worker.run(&receiver))?;
        Ok(Pipeline {
            sender,
            max_buffers_queued: capacity.div_ceil(lines.handoff_lines()).max(1),
            lines,
            buffers_queued,
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
        match self.lines.append(execution, |buffer| self.hand_over(buffer)) {
            Appended::More | Appended::HandedOver => {}
            // A full queue holds messages that wake the thread anyway.
            Appended::First => {
                if let Err(TrySendError::Disconnected(_)) = self.sender.try_send(Message::Wake) {
                    self.lost(0, Why::Gone);
                }
            }
            Appended::Lost { lines, gone: false } => self.lost(lines, Why::Full),
            Appended::Lost { lines, gone: true } => self.lost(lines, Why::Gone),
            Appended::Closed => self.lost(1, Why::Closed),
        }
    }

    /// Queues a thread's full buffer; called under that thread's lock, so it only sends.
    fn hand_over(&self, buffer: FullBuffer) -> Appended {
        let lines = buffer.lines;
        let queued = &self.buffers_queued;
        match background::send_counted(&self.sender, Message::Lines(buffer), queued, 1, self.max_buffers_queued) {
            Ok(()) => Appended::HandedOver,
            Err(Refused::Full) => Appended::Lost { lines, gone: false },
            Err(Refused::Gone) => Appended::Lost { lines, gone: true },
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
    buffers_queued: Arc<AtomicUsize>,
    stats: Arc<TelemetryStats>,
}

impl Worker {
    fn run(mut self, receiver: &Receiver<Message>) {
        // Whatever writing emits is not telemetry to export.
        let _suppressed = opentelemetry::Context::enter_telemetry_suppressed_scope();
        while let Ok(first) = receiver.recv() {
            let mut next = Some(first);
            let mut flush = None;
            let mut taken = 0;
            // Take what is queued now, without waiting.
            while let Some(message) = next.take() {
                match message {
                    Message::Lines(buffer) => taken += self.take_queued(buffer),
                    Message::Wake => {}
                    Message::Flush { ack, stop } => {
                        flush = Some((ack, stop));
                        break;
                    }
                }
                next = receiver.try_recv().ok();
            }
            let stop = matches!(flush, Some((_, true)));
            if stop {
                // Lines appended after this are counted as dropped, not left unwritten.
                self.lines.close();
            }
            for buffer in self.lines.collect() {
                taken += self.take(buffer);
            }
            if stop {
                // Buffers are handed over under their thread's lock, which the collection
                // took after closing: every one handed over is queued by now.
                while let Ok(message) = receiver.try_recv() {
                    if let Message::Lines(buffer) = message {
                        self.take_queued(buffer);
                    }
                }
            }
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

    /// Adds a buffer's lines to the batch; returns how many.
    fn take(&mut self, buffer: FullBuffer) -> u64 {
        self.logs.append_lines(&buffer.bytes, buffer.lines);
        self.lines.recycle(buffer.bytes);
        buffer.lines
    }

    /// [`take`](Self::take) for a buffer that came through the queue.
    fn take_queued(&mut self, buffer: FullBuffer) -> u64 {
        self.buffers_queued.fetch_sub(1, Ordering::Relaxed);
        self.take(buffer)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A thread that panicked takes no more lines: count the ones waiting, and the ones
        // appended from now on.
        if std::thread::panicking() {
            TelemetryStats::add(&self.stats.log_lines_dropped, self.lines.discard());
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
    fn flush_writes_everything_queued_before_it() {
        let (pipeline, stats) = send(Box::new(std::io::sink()), 64, 50);
        pipeline.flush(Duration::from_secs(5), false).unwrap();
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 50);
        pipeline.flush(Duration::from_secs(5), true).unwrap();
    }
}
