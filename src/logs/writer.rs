//! The writer thread: a bounded queue of complete lines, written in batches, every loss counted.

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::stats::TelemetryStats;

/// Lines are written in batches of about this many bytes.
const BATCH_BYTES: usize = 64 * 1024;

/// How long the writer lets lines gather after it emptied the queue: bounds the wake-ups to
/// about 200 a second under load, and delays a line by at most this much.
const LINGER: Duration = Duration::from_millis(5);

enum Message {
    Line(Vec<u8>),
    /// Write out everything queued before this message, then acknowledge (and stop).
    Flush {
        ack: SyncSender<()>,
        stop: bool,
    },
}

/// The sending side; the agent's thread only formats and enqueues.
pub(crate) struct LineWriter {
    sender: SyncSender<Message>,
    stats: Arc<TelemetryStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl LineWriter {
    pub(crate) fn start(
        destination: Box<dyn Write + Send>,
        capacity: usize,
        stats: Arc<TelemetryStats>,
    ) -> Result<Self> {
        let (sender, receiver) = sync_channel(capacity);
        let thread = std::thread::Builder::new()
            .name("agent-telemetry-logs".into())
            .spawn({
                let stats = Arc::clone(&stats);
                move || write_lines(&receiver, destination, &stats)
            })
            .map_err(|source| Error::Thread {
                name: "agent-telemetry-logs",
                source,
            })?;
        Ok(LineWriter {
            sender,
            stats,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues one complete line; never blocks. A full queue drops the line and counts it.
    pub(crate) fn send(&self, line: &[u8]) {
        if self.sender.try_send(Message::Line(line.to_vec())).is_err() {
            TelemetryStats::add(&self.stats.log_lines_dropped, 1);
        }
    }

    /// Waits until every line queued so far is written, or `timeout` passes; with `stop`,
    /// the writer thread then ends.
    pub(crate) fn flush(&self, timeout: Duration, stop: bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
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
                    // The writer has acknowledged; joining only reaps the finished thread.
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

fn write_lines(receiver: &Receiver<Message>, mut destination: Box<dyn Write + Send>, stats: &TelemetryStats) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut lines = 0u64;
    let mut flush_ack = None;
    while let Ok(first) = receiver.recv() {
        let mut next = Some(first);
        let mut drained = false;
        // Take what is queued now, up to a batch, without waiting.
        while let Some(message) = next.take() {
            match message {
                Message::Line(line) => {
                    batch.extend_from_slice(&line);
                    lines += 1;
                }
                Message::Flush { ack, stop } => {
                    flush_ack = Some((ack, stop));
                    break;
                }
            }
            if batch.len() < BATCH_BYTES {
                next = receiver.try_recv().ok();
                drained = next.is_none();
            }
        }
        flush(&mut destination, &mut batch, &mut lines, stats);
        if let Some((ack, stop)) = flush_ack.take() {
            let _ = ack.send(());
            if stop {
                return;
            }
        } else if drained {
            // Let lines gather instead of parking on the channel, where every new line would
            // wake this thread: a wake-up per line costs the agent's thread a system call.
            std::thread::sleep(LINGER);
        }
    }
}

fn flush(destination: &mut Box<dyn Write + Send>, batch: &mut Vec<u8>, lines: &mut u64, stats: &TelemetryStats) {
    if batch.is_empty() {
        return;
    }
    match destination.write_all(batch).and_then(|()| destination.flush()) {
        Ok(()) => TelemetryStats::add(&stats.log_lines_written, *lines),
        Err(error) => {
            if TelemetryStats::get(&stats.log_write_errors) == 0 {
                tracing::warn!(target: "agent_telemetry::logs", %error, "cannot write agent execution log lines; counting them in agent_telemetry_log_lines_dropped_total");
            }
            TelemetryStats::add(&stats.log_write_errors, 1);
            TelemetryStats::add(&stats.log_lines_dropped, *lines);
        }
    }
    batch.clear();
    *lines = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that fails every write.
    struct FullDisk;

    impl Write for FullDisk {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("No space left on device"))
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_writes_are_counted_as_dropped_lines() {
        let stats = Arc::new(TelemetryStats::default());
        let writer = LineWriter::start(Box::new(FullDisk), 16, Arc::clone(&stats)).unwrap();
        for _ in 0..10 {
            writer.send(b"{}\n");
        }
        writer.flush(Duration::from_secs(5), true).unwrap();
        assert_eq!(TelemetryStats::get(&stats.log_lines_dropped), 10);
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 0);
        assert!(TelemetryStats::get(&stats.log_write_errors) >= 1);
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
        let stats = Arc::new(TelemetryStats::default());
        let writer = LineWriter::start(Box::new(SlowDisk), 4, Arc::clone(&stats)).unwrap();
        for _ in 0..1000 {
            writer.send(b"{}\n");
        }
        writer.flush(Duration::from_secs(30), true).unwrap();
        let written = TelemetryStats::get(&stats.log_lines_written);
        let dropped = TelemetryStats::get(&stats.log_lines_dropped);
        assert_eq!(written + dropped, 1000, "every line is written or counted");
        assert!(dropped > 0, "a 4-line queue cannot hold 1000 lines");
    }
}
