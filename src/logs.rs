//! One Filebeat-ready JSON line per agent execution: formatted on the agent's thread into a
//! buffer of its own, written in batches on the log thread, never the agent's.

mod daily_files;
mod line;
mod pending;
mod pipeline;
mod writer;

use std::io::Write;
use std::sync::Arc;

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
            (None, Some(dir)) => Box::new(
                daily_files::DailyFiles::open(dir, &config.log_file_prefix, config.log_file_mode).map_err(
                    |source| Error::LogDir {
                        path: dir.clone(),
                        source,
                    },
                )?,
            ),
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
