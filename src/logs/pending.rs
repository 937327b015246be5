//! Lines formatted on the agent's thread, into a buffer of that thread's, where the log
//! thread collects them. Formatting there costs less than handing the execution to another
//! core (see `benches/README.md`), and no two agent threads share a buffer.

use std::mem;

use super::line::LineFormat;
use crate::execution::Execution;
use crate::per_thread::{PerThread, Spares};

/// A thread hands its lines over once they fill about this many bytes ...
const HANDOFF_BYTES: usize = 64 * 1024;

/// ... or this many lines, whichever comes first ...
const HANDOFF_LINES: usize = 256;

/// ... in a buffer with room for the longest usual line past that (the task's and agent's
/// text, escaped), so that the line that fills it does not move it.
const BUFFER_BYTES: usize = HANDOFF_BYTES + 16 * 1024;

/// The lines every agent thread has formatted and the pipeline has not taken yet.
pub(crate) struct PendingLines {
    threads: PerThread<ThreadLines>,
    spare: Spares<Vec<u8>>,
    handoff_lines: usize,
}

/// One thread's lines.
struct ThreadLines {
    format: LineFormat,
    buffer: Vec<u8>,
    lines: u64,
}

/// What became of a line.
pub(crate) enum Appended {
    /// It is the first in its thread's buffer: the log thread needs to hear of it.
    First,
    /// It joined lines the log thread will take anyway.
    More,
    /// It filled its thread's buffer, which was handed over.
    HandedOver,
    /// It filled its thread's buffer, which could not be handed over: the buffer's `lines`
    /// are lost, because the queue was full or, when `gone`, its thread has ended.
    Lost { lines: u64, gone: bool },
    /// The log thread no longer takes lines: it was not written.
    Closed,
}

/// A thread's buffer of complete lines, handed over whole.
pub(crate) struct FullBuffer {
    pub bytes: Vec<u8>,
    pub lines: u64,
}

impl PendingLines {
    /// `queue_lines` bounds how many lines a thread keeps before handing them over.
    pub(crate) fn new(format: LineFormat, queue_lines: usize) -> Self {
        PendingLines {
            threads: PerThread::new(move || ThreadLines {
                format: format.clone(),
                buffer: Vec::with_capacity(BUFFER_BYTES),
                lines: 0,
            }),
            spare: Spares::default(),
            handoff_lines: HANDOFF_LINES.min(queue_lines).max(1),
        }
    }

    /// How many lines a thread keeps before handing them over.
    pub(crate) fn handoff_lines(&self) -> usize {
        self.handoff_lines
    }

    /// Formats the execution's line into the calling thread's buffer. A buffer it fills goes
    /// to `hand_over` (which must not block, log or visit the threads) while the thread's lock
    /// is held, so that once the log thread has closed and collected, no buffer is still on
    /// its way.
    pub(crate) fn append(&self, execution: &Execution, hand_over: impl FnOnce(FullBuffer) -> Appended) -> Appended {
        let appended = self.threads.with_mine(|ThreadLines { format, buffer, lines }| {
            format.write(execution, buffer);
            *lines += 1;
            if *lines >= self.handoff_lines as u64 || buffer.len() >= HANDOFF_BYTES {
                return hand_over(FullBuffer {
                    bytes: mem::replace(buffer, self.spare_buffer()),
                    lines: mem::take(lines),
                });
            }
            if *lines == 1 {
                Appended::First
            } else {
                Appended::More
            }
        });
        appended.unwrap_or(Appended::Closed)
    }

    fn spare_buffer(&self) -> Vec<u8> {
        self.spare.take_or(|| Vec::with_capacity(BUFFER_BYTES))
    }

    /// Keeps a handed-over buffer, once its lines are taken, for another handoff.
    pub(crate) fn recycle(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() == BUFFER_BYTES {
            buffer.clear();
            self.spare.keep(buffer);
        }
    }

    /// Takes every thread's lines, each thread's buffer swapped for an empty one: the
    /// threads' locks are held only for the swap, never while lines are written.
    pub(crate) fn collect(&self) -> Vec<FullBuffer> {
        let mut collected = Vec::new();
        self.threads.visit(|thread| {
            if thread.lines > 0 {
                collected.push(FullBuffer {
                    bytes: mem::replace(&mut thread.buffer, self.spare_buffer()),
                    lines: mem::take(&mut thread.lines),
                });
            }
        });
        collected
    }

    /// Stops taking lines: each one appended from now on comes back [`Appended::Closed`].
    /// What is waiting stays, for a last [`collect`](Self::collect).
    pub(crate) fn close(&self) {
        self.threads.close();
    }

    /// Stops taking lines and empties every thread's buffer unwritten, for a log thread that
    /// has ended; returns how many lines that dropped.
    pub(crate) fn discard(&self) -> u64 {
        self.threads.discard(|thread| {
            thread.buffer.clear();
            mem::take(&mut thread.lines)
        })
    }
}
