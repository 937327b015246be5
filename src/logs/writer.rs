//! Lines gathered into one buffer and written with one call, every loss counted.

use std::io::Write;
use std::sync::Arc;

use crate::panics;
use crate::stats::TelemetryStats;

/// Lines are written in batches of about this many bytes.
const BATCH_BYTES: usize = 64 * 1024;

/// Complete lines waiting to be written together.
pub(crate) struct LineBatch {
    destination: Box<dyn Write + Send>,
    buffer: Vec<u8>,
    lines: u64,
    stats: Arc<TelemetryStats>,
    /// Whether the last write failed: a failing spell is warned once, and its end logged.
    failing: bool,
}

impl LineBatch {
    pub(crate) fn new(destination: Box<dyn Write + Send>, stats: Arc<TelemetryStats>) -> Self {
        LineBatch {
            destination,
            buffer: Vec::with_capacity(BATCH_BYTES),
            lines: 0,
            stats,
            failing: false,
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

    /// One write for the whole batch, so a line is never split between writes of ours. A
    /// writer that panics fails this batch only: the lines after it, and every span, still go
    /// out through the same pipeline.
    pub(crate) fn write_out(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let (destination, buffer) = (&mut self.destination, &self.buffer);
        let written = panics::catching(|| destination.write_all(buffer).and_then(|()| destination.flush()))
            .unwrap_or_else(|panic| Err(std::io::Error::other(format!("the log writer panicked: {panic}"))));
        match written {
            Ok(()) => {
                TelemetryStats::add(&self.stats.log_lines_written, self.lines);
                if std::mem::replace(&mut self.failing, false) {
                    tracing::info!(target: "agent_telemetry::logs", "agent execution log lines are written again");
                }
            }
            Err(error) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(target: "agent_telemetry::logs", %error, "cannot write agent execution log lines; counting them in agent_telemetry_log_lines_dropped_total until writing recovers");
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
    use crate::test_support::Warnings;

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
    fn a_writer_that_panics_loses_its_batch_only() {
        /// A writer that panics on its first write and works from then on.
        struct PanicsOnce(bool);
        impl Write for PanicsOnce {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                let broke_before = std::mem::replace(&mut self.0, true);
                assert!(broke_before, "the disk writer broke");
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let warnings = Warnings::with_target("agent_telemetry::logs");
        let stats = Arc::new(TelemetryStats::default());
        let mut batch = LineBatch::new(Box::new(PanicsOnce(false)), Arc::clone(&stats));
        tracing::dispatcher::with_default(&warnings.dispatch(), || {
            for lines in [3, 5] {
                for _ in 0..lines {
                    batch.next_line().extend_from_slice(b"{}\n");
                    batch.line_done();
                }
                batch.write_out();
            }
        });
        assert_eq!(
            TelemetryStats::get(&stats.log_lines_dropped),
            3,
            "the batch the panic broke"
        );
        assert_eq!(TelemetryStats::get(&stats.log_write_errors), 1);
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 5, "the next batch");
        let warnings = warnings.messages();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("error=the log writer panicked: the disk writer broke"),
            "{warnings:?}"
        );
    }

    #[test]
    fn each_failing_spell_is_warned_once_and_its_end_logged() {
        /// A disk whose writes fail while `full` is set.
        struct Disk(Arc<std::sync::atomic::AtomicBool>);
        impl Write for Disk {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                if self.0.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(std::io::Error::other("No space left on device"));
                }
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        use tracing_subscriber::layer::SubscriberExt;
        let warnings = Warnings::with_target("agent_telemetry::logs");
        let infos = Warnings::with_target("agent_telemetry::logs").at_level(tracing::Level::INFO);
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::registry()
                .with(warnings.clone())
                .with(infos.clone()),
        );
        let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stats = Arc::new(TelemetryStats::default());
        let mut batch = LineBatch::new(Box::new(Disk(Arc::clone(&full))), Arc::clone(&stats));
        tracing::dispatcher::with_default(&dispatch, || {
            // Two spells of two failing batches each, between batches that are written.
            for disk_full in [false, true, true, false, true, true, false] {
                full.store(disk_full, std::sync::atomic::Ordering::Relaxed);
                batch.next_line().extend_from_slice(b"{}\n");
                batch.line_done();
                batch.write_out();
            }
        });
        assert_eq!(TelemetryStats::get(&stats.log_write_errors), 4);
        assert_eq!(TelemetryStats::get(&stats.log_lines_dropped), 4);
        assert_eq!(TelemetryStats::get(&stats.log_lines_written), 3);
        let warnings = warnings.messages();
        assert_eq!(warnings.len(), 2, "one per spell: {warnings:?}");
        assert!(warnings[0].contains("error=No space left on device"), "{warnings:?}");
        assert_eq!(infos.messages(), ["agent execution log lines are written again"; 2]);
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
