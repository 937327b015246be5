//! Lines gathered into one buffer and written with one call, every loss counted.

use std::io::Write;
use std::sync::Arc;

use crate::stats::TelemetryStats;

/// Lines are written in batches of about this many bytes.
const BATCH_BYTES: usize = 64 * 1024;

/// Complete lines waiting to be written together.
pub(crate) struct LineBatch {
    destination: Box<dyn Write + Send>,
    buffer: Vec<u8>,
    lines: u64,
    stats: Arc<TelemetryStats>,
}

impl LineBatch {
    pub(crate) fn new(destination: Box<dyn Write + Send>, stats: Arc<TelemetryStats>) -> Self {
        LineBatch {
            destination,
            buffer: Vec::with_capacity(BATCH_BYTES),
            lines: 0,
            stats,
        }
    }

    /// The buffer the next line is appended to, in place: no copy per line.
    pub(crate) fn next_line(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    /// Marks one complete line appended; a large batch is written out at once.
    pub(crate) fn line_done(&mut self) {
        self.lines += 1;
        if self.buffer.len() >= BATCH_BYTES {
            self.write_out();
        }
    }

    /// One write for the whole batch, so a line is never split between writes of ours.
    pub(crate) fn write_out(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let destination = &mut self.destination;
        match destination.write_all(&self.buffer).and_then(|()| destination.flush()) {
            Ok(()) => TelemetryStats::add(&self.stats.log_lines_written, self.lines),
            Err(error) => {
                if TelemetryStats::get(&self.stats.log_write_errors) == 0 {
                    tracing::warn!(target: "agent_telemetry::logs", %error, "cannot write agent execution log lines; counting them in agent_telemetry_log_lines_dropped_total");
                }
                TelemetryStats::add(&self.stats.log_write_errors, 1);
                TelemetryStats::add(&self.stats.log_lines_dropped, self.lines);
            }
        }
        self.buffer.clear();
        self.lines = 0;
    }
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
        let mut batch = LineBatch::new(Box::new(FullDisk), Arc::clone(&stats));
        for _ in 0..10 {
            batch.next_line().extend_from_slice(b"{}\n");
            batch.line_done();
        }
        batch.write_out();
        assert_eq!(TelemetryStats::get(&stats.log_lines_dropped), 10);
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 0);
        assert_eq!(TelemetryStats::get(&stats.log_write_errors), 1);
    }

    #[test]
    fn large_batches_are_written_as_they_fill() {
        let stats = Arc::new(TelemetryStats::default());
        let mut batch = LineBatch::new(Box::new(std::io::sink()), Arc::clone(&stats));
        let line = [b'x'; 1023];
        for _ in 0..200 {
            batch.next_line().extend_from_slice(&line);
            batch.next_line().push(b'\n');
            batch.line_done();
        }
        assert_eq!(
            TelemetryStats::get(&stats.log_lines_written),
            192,
            "written each time 64 KiB gathered"
        );
        batch.write_out();
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 200);
    }
}
