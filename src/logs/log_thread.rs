//! The log thread: on each wake-up, or every few milliseconds while lines keep coming, takes
//! every thread's lines (oldest first, each thread's lock held only for a swap) and writes them
//! in batches; answers flushes, and on shutdown writes what is left and ends.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::handoff::{FullBuffer, Handoff, Message};
use super::writer::LineBatch;
use crate::background::Pacing;
use crate::stats::TelemetryStats;

/// The log thread: collects the threads' lines and writes them.
pub(super) struct LogThread {
    batch: LineBatch,
    linger: Pacing,
    lines: Arc<Handoff>,
    /// This round's buffers not yet taken (the `Vec` kept for its room).
    collected: Vec<FullBuffer>,
    stats: Arc<TelemetryStats>,
}

impl LogThread {
    pub(super) fn new(batch: LineBatch, capacity: usize, lines: Arc<Handoff>, stats: Arc<TelemetryStats>) -> Self {
        LogThread {
            batch,
            linger: Pacing::new(capacity),
            lines,
            collected: Vec::new(),
            stats,
        }
    }

    pub(super) fn run(mut self, receiver: &Receiver<Message>) {
        // Whatever writing emits is not telemetry to export.
        let _suppressed = opentelemetry::Context::enter_telemetry_suppressed_scope();
        block_file_size_signal();
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
            self.batch.write_out();
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
            self.batch.next_line().extend_from_slice(&buffer.bytes);
            self.batch.lines_done(buffer.lines);
            self.lines.recycle(buffer.bytes);
            taken += buffer.lines;
        }
        taken
    }
}

/// Blocks `SIGXFSZ` on the calling thread: a write past the process's file-size limit
/// (`ulimit -f`) then fails with `EFBIG`, counted and warned about as a full disk is, where
/// the signal's default action would end the whole process.
#[cfg(unix)]
#[allow(unsafe_code)]
fn block_file_size_signal() {
    // SAFETY: `set` is a plain C struct, zeroed then initialised by `sigemptyset` before use;
    // `pthread_sigmask` reads it and changes the calling thread's mask only. A failure (none
    // is possible with these arguments) leaves the default, as before.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGXFSZ);
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
    }
}

#[cfg(not(unix))]
fn block_file_size_signal() {}

impl Drop for LogThread {
    fn drop(&mut self) {
        // A thread that panicked takes no more lines: count the ones it held, the ones
        // waiting, and the ones appended from now on.
        if std::thread::panicking() {
            let held: u64 = self.collected.iter().map(|buffer| buffer.lines).sum();
            TelemetryStats::add(&self.stats.log_lines_dropped, held + self.lines.discard());
        }
    }
}
