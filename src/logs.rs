//! One Filebeat-ready JSON line per agent execution: formatted on the agent's thread into a
//! buffer of its own, written in batches on the log thread, never the agent's.
//!
//! ```text
//!  agent threads                                log thread (LogThread, log_thread.rs)
//!  ─────────────                                ─────────────────────────────────────
//!  LineQueue::write_line (line_queue.rs)        on a wake-up, or every few ms while busy:
//!    LineFormat (line.rs) formats the line        take every thread's buffers, oldest
//!    into the thread's buffer (handoff.rs) ───▶   first (under each thread's lock, briefly)
//!    first line or full: Message::Wake ────────▶ LineBatch (writer.rs): one write per batch
//!                                                  ─▶ DailyFiles (daily_files.rs), stdout,
//!                  Message::Flush { stop } ────▶      or the application's writer
//! ```
//!
//! Invariants a change must keep:
//!
//! - every line is written, or counted as dropped: a full queue, a failed or panicking write,
//!   a line formatted after shutdown, a log thread that panicked (it counts what it held);
//! - a thread's lines are written in the order it formatted them;
//! - one complete line per write, ending in `\n`; a write cut short is ended with `\n` before
//!   anything else, so no line ever runs into another;
//! - nothing on an agent's thread waits for the disk: a full queue drops, never blocks;
//! - the full buffers waiting are bounded by `with_log_queue_lines`; the channel carries only
//!   wake-ups and flushes (a wake-up that finds it full is not needed);
//! - lines are never written through a symbolic link, nor to a file no longer at its path.

mod daily_files;
mod handoff;
mod line;
mod line_queue;
mod log_thread;
mod writer;

use std::io::Write;
use std::sync::Arc;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::stats::TelemetryStats;

pub(crate) use line::LineFormat;
pub(crate) use line_queue::LineQueue;
use writer::LineBatch;

/// Starts the log thread: lines go to the application's writer, else daily files
/// `<prefix>.YYYY-MM-DD.log` in the configured directory, else stdout.
///
/// # Errors
///
/// [`Error::LogDir`] when the directory or today's file cannot be opened, [`Error::Thread`]
/// when the log thread cannot be started.
pub(crate) fn start(
    config: &Config,
    custom: Option<Box<dyn Write + Send>>,
    stats: &Arc<TelemetryStats>,
) -> Result<LineQueue> {
    let destination: Box<dyn Write + Send> = match (custom, &config.log_dir) {
        (Some(custom), _) => custom,
        (None, Some(dir)) => Box::new(
            daily_files::DailyFiles::open(dir, &config.log_file_prefix, config.log_file_mode).map_err(|source| {
                Error::LogDir {
                    path: dir.clone(),
                    source,
                }
            })?,
        ),
        (None, None) => Box::new(std::io::stdout()),
    };
    LineQueue::start(
        LineFormat::new(config),
        LineBatch::new(destination, Arc::clone(stats)),
        config.log_queue_lines,
        Arc::clone(stats),
    )
}
