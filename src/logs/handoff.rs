//! The state agent threads and the log thread share: each thread's lines, formatted on that
//! thread into a buffer of its own, where the log thread collects them; and the messages the
//! log thread's channel carries. A thread's lines stay with it, full buffers and the one it
//! fills, until the log thread takes them all at once: written in the order they were
//! formatted.

use std::mem;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::Sender;

use super::line::LineFormat;
use crate::execution::Execution;
use crate::per_thread::{PerThread, Recycled};

/// Messages the queue holds at once. The lines wait with their threads, so the queue carries
/// only wake-ups and flushes: a wake-up that finds it full is not needed, as the messages
/// there wake the thread anyway, and a flush waits for room.
pub(super) const QUEUE_MESSAGES: usize = 64;

pub(super) enum Message {
    /// A thread's buffer has its first line, or filled: collect.
    Wake,
    /// Finish everything queued before this message, then acknowledge (and stop).
    Flush { ack: Sender<()>, stop: bool },
}

/// A thread hands its lines over once they fill about this many bytes ...
const HANDOFF_BYTES: usize = 64 * 1024;

/// ... or this many lines, whichever comes first ...
const HANDOFF_LINES: usize = 256;

/// ... in a buffer with room for the longest usual line past that (the task's and agent's
/// text, escaped), so that the line that fills it does not move it.
const BUFFER_BYTES: usize = HANDOFF_BYTES + 16 * 1024;

/// The lines every agent thread has formatted and the log thread has not taken yet.
pub(crate) struct Handoff {
    threads: PerThread<ThreadLines>,
    spare: Recycled<Vec<u8>>,
    lines_per_buffer: usize,
    /// Full buffers waiting in all threads, and how many may.
    full_buffers: AtomicUsize,
    max_full_buffers: usize,
}

/// One thread's lines.
struct ThreadLines {
    format: LineFormat,
    /// The buffer being filled (without room until the thread's next line: a thread that
    /// has ended holds none) ...
    buffer: Vec<u8>,
    lines: u64,
    /// ... after the buffers it filled before, oldest first.
    full: Vec<FullBuffer>,
}

/// What became of a line.
pub(crate) enum Appended {
    /// It is the first in its thread's buffer: the log thread needs to hear of it.
    First,
    /// It joined lines the log thread will take anyway.
    More,
    /// It filled its thread's buffer, which waits whole: the log thread needs to hear of it.
    Filled,
    /// It filled its thread's buffer while as many full buffers waited as may: the
    /// buffer's `lines` are lost.
    Lost { lines: u64 },
    /// The log thread no longer takes lines: it was not written.
    Closed,
}

/// A thread's buffer of complete lines, handed over whole.
pub(crate) struct FullBuffer {
    pub bytes: Vec<u8>,
    pub lines: u64,
}

impl Handoff {
    /// `queue_lines` bounds how many lines wait, in full buffers, for the log thread.
    pub(crate) fn new(format: LineFormat, queue_lines: usize) -> Self {
        let lines_per_buffer = HANDOFF_LINES.min(queue_lines).max(1);
        Handoff {
            threads: PerThread::new(move || ThreadLines {
                format: format.clone(),
                buffer: Vec::new(),
                lines: 0,
                full: Vec::new(),
            }),
            spare: Recycled::default(),
            lines_per_buffer,
            full_buffers: AtomicUsize::new(0),
            max_full_buffers: queue_lines.div_ceil(lines_per_buffer).max(1),
        }
    }

    /// Formats the execution's line into the calling thread's buffer.
    pub(crate) fn append(&self, execution: &Execution) -> Appended {
        let appended = self.threads.with_mine(|thread| {
            let ThreadLines {
                format,
                buffer,
                lines,
                full,
            } = thread;
            if buffer.capacity() == 0 {
                *buffer = self.spare_buffer();
            }
            format.write(execution, buffer);
            *lines += 1;
            if *lines < self.lines_per_buffer as u64 && buffer.len() < HANDOFF_BYTES {
                return if *lines == 1 { Appended::First } else { Appended::More };
            }
            let waiting = self.full_buffers.fetch_add(1, Ordering::Relaxed);
            if waiting >= self.max_full_buffers {
                self.full_buffers.fetch_sub(1, Ordering::Relaxed);
                buffer.clear();
                return Appended::Lost {
                    lines: mem::take(lines),
                };
            }
            full.push(FullBuffer {
                bytes: mem::take(buffer),
                lines: mem::take(lines),
            });
            Appended::Filled
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

    /// Takes every thread's lines into `collected`, each thread's in the order they were
    /// formatted, its buffer taken whole (the thread takes a spare one with its next line):
    /// the threads' locks are held only for the swap, never while lines are written.
    pub(crate) fn collect(&self, collected: &mut Vec<FullBuffer>) {
        self.threads.visit(|thread| {
            self.full_buffers.fetch_sub(thread.full.len(), Ordering::Relaxed);
            collected.append(&mut thread.full);
            if thread.lines > 0 {
                collected.push(FullBuffer {
                    bytes: mem::take(&mut thread.buffer),
                    lines: mem::take(&mut thread.lines),
                });
            }
        });
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
            self.full_buffers.fetch_sub(thread.full.len(), Ordering::Relaxed);
            let full: u64 = thread.full.drain(..).map(|buffer| buffer.lines).sum();
            thread.buffer = Vec::new();
            full + mem::take(&mut thread.lines)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::test_support::execution;

    /// Appends lines until one fills the thread's buffer (by lines or bytes): what became of
    /// that one, and how many lines the buffer held.
    fn fill(pending: &Handoff) -> (Appended, u64) {
        let mut lines = 0;
        loop {
            lines += 1;
            match pending.append(&execution()) {
                Appended::First | Appended::More => {}
                filled => return (filled, lines),
            }
        }
    }

    #[test]
    fn full_buffers_wait_up_to_the_bound_and_make_room_once_collected() {
        // Room for two full buffers.
        let pending = Handoff::new(LineFormat::new(&Config::default()), 2 * HANDOFF_LINES);
        let (first, full) = fill(&pending);
        assert!(matches!(first, Appended::Filled));
        assert!(matches!(fill(&pending), (Appended::Filled, lines) if lines == full));
        assert!(matches!(fill(&pending), (Appended::Lost { lines }, _) if lines == full));
        assert!(matches!(pending.append(&execution()), Appended::First));

        let mut collected = Vec::new();
        pending.collect(&mut collected);
        let lines: Vec<u64> = collected.iter().map(|buffer| buffer.lines).collect();
        assert_eq!(
            lines,
            [full, full, 1],
            "the full buffers, oldest first, then the one filling"
        );

        assert!(matches!(fill(&pending).0, Appended::Filled), "room again");
        assert!(matches!(fill(&pending).0, Appended::Filled));
        assert_eq!(pending.discard(), 2 * full, "the waiting buffers' lines");
        assert!(matches!(pending.append(&execution()), Appended::Closed));
    }
}
