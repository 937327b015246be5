//! One Filebeat-ready JSON line per agent execution, written off the agent's thread.

mod line;
mod writer;

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
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
    /// The application's writer, else daily files `<prefix>.YYYY-MM-DD.log` in the configured
    /// directory, else stdout.
    pub(crate) fn new(
        config: &Config,
        custom: Option<Box<dyn Write + Send>>,
        stats: Arc<TelemetryStats>,
    ) -> Result<Self> {
        let destination: Box<dyn Write + Send> = match (custom, &config.log_dir) {
            (Some(custom), _) => custom,
            (None, Some(dir)) => Box::new(daily_files(dir, &config.log_file_prefix)?),
            (None, None) => Box::new(std::io::stdout()),
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

fn daily_files(dir: &Path, prefix: &str) -> Result<DailyFiles> {
    let appender = open_appender(dir, prefix).map_err(|source| Error::LogDir {
        path: dir.to_owned(),
        source,
    })?;
    Ok(DailyFiles {
        dir: dir.to_owned(),
        prefix: prefix.to_owned(),
        appender,
    })
}

fn open_appender(dir: &Path, prefix: &str) -> std::io::Result<RollingFileAppender> {
    std::fs::create_dir_all(dir)?;
    RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(prefix)
        .filename_suffix("log")
        .build(dir)
        .map_err(std::io::Error::other)
}

/// Daily files that survive their directory or today's file being removed: the appender
/// keeps writing into an unlinked file otherwise, and every line would vanish unnoticed.
struct DailyFiles {
    dir: PathBuf,
    prefix: String,
    appender: RollingFileAppender,
}

impl DailyFiles {
    /// Today's file, named as the appender names it (UTC dates).
    fn todays_file(&self) -> PathBuf {
        let today = time::OffsetDateTime::now_utc().date();
        let (year, month, day) = (today.year(), u8::from(today.month()), today.day());
        self.dir
            .join(format!("{}.{year:04}-{month:02}-{day:02}.log", self.prefix))
    }
}

impl Write for DailyFiles {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        // One stat per batch of lines, on the writer thread, so a removal loses nothing.
        if !self.todays_file().exists() {
            self.appender = open_appender(&self.dir, &self.prefix)?;
        }
        self.appender.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.appender.flush()
    }
}
