//! One Filebeat-ready JSON line per agent execution: formatted on the agent's thread into a
//! buffer of its own, written in batches on the log thread, never the agent's.

mod line;
mod pending;
mod pipeline;
mod writer;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing_appender::rolling::{RollingFileAppender, Rotation};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::stats::TelemetryStats;

pub(crate) use line::LineFormat;
use pending::{Appended, FullBuffer, PendingLines};
pub(crate) use pipeline::Pipeline;
use writer::LineBatch;

/// Writes formatted lines to the destination in batches.
pub(crate) struct LogLines {
    format: LineFormat,
    batch: LineBatch,
}

impl LogLines {
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
        Ok(LogLines {
            format: LineFormat::new(config),
            batch: LineBatch::new(destination, stats),
        })
    }

    /// The line format, for the threads that format lines.
    pub(crate) fn format(&self) -> &LineFormat {
        &self.format
    }

    /// Adds `lines` complete lines, formatted elsewhere, to the batch.
    pub(crate) fn append_lines(&mut self, bytes: &[u8], lines: u64) {
        self.batch.next_line().extend_from_slice(bytes);
        self.batch.lines_done(lines);
    }

    /// Writes out the lines appended so far; a failed write counts them as dropped.
    pub(crate) fn write_out(&mut self) {
        self.batch.write_out();
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
        // One stat per batch of lines, on the log thread, so a removal loses nothing.
        if !self.todays_file().exists() {
            self.appender = open_appender(&self.dir, &self.prefix)?;
        }
        self.appender.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.appender.flush()
    }
}
