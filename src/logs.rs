//! One Filebeat-ready JSON line per agent execution, written off the agent's thread.

mod line;
mod writer;

use std::cell::RefCell;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tracing_appender::rolling::{RollingFileAppender, Rotation};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::execution::Execution;
use crate::stats::TelemetryStats;

pub(crate) use line::LineFormat;
use writer::LineWriter;

/// Formats executions into lines and queues them for the writer thread.
pub(crate) struct LogWriter {
    format: LineFormat,
    writer: LineWriter,
}

thread_local! {
    // One buffer per thread, reused for every line it formats.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

impl LogWriter {
    /// Daily files `<prefix>.YYYY-MM-DD.log` in the configured directory, else stdout.
    pub(crate) fn new(config: &Config, stats: Arc<TelemetryStats>) -> Result<Self> {
        let destination: Box<dyn Write + Send> = match &config.log_dir {
            Some(dir) => Box::new(daily_files(dir, &config.log_file_prefix)?),
            None => Box::new(std::io::stdout()),
        };
        Ok(LogWriter {
            format: LineFormat::new(config),
            writer: LineWriter::start(destination, config.log_queue_lines, stats)?,
        })
    }

    pub(crate) fn write(&self, execution: &Execution<'_>) {
        let format_and_send = |line: &mut Vec<u8>| {
            line.clear();
            self.format.write(execution, line);
            self.writer.send(line);
        };
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => format_and_send(&mut line),
            // Re-entered from inside formatting (a `Debug` impl that logs): a fresh buffer.
            Err(_) => format_and_send(&mut Vec::new()),
        });
    }

    /// Writes out every line queued so far, waiting at most `timeout`.
    pub(crate) fn flush(&self, timeout: Duration) -> Result<()> {
        self.writer.flush(timeout, false)
    }

    /// Writes out every queued line, waiting at most `timeout`, and stops the writer.
    pub(crate) fn shutdown(&self, timeout: Duration) -> Result<()> {
        self.writer.flush(timeout, true)
    }
}

fn daily_files(dir: &std::path::Path, prefix: &str) -> Result<RollingFileAppender> {
    let failed = |source| Error::LogDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(prefix)
        .filename_suffix("log")
        .build(dir)
        .map_err(|e| failed(std::io::Error::other(e)))
}
