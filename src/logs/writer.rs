//! Lines gathered into one buffer and written with one call, every loss counted.

use std::io::{self, Write};
use std::sync::Arc;

use crate::outages::OutageWarnings;
use crate::panics;
use crate::stats::TelemetryStats;

/// Lines are written in batches of about this many bytes.
const BATCH_BYTES: usize = 64 * 1024;

/// Complete lines waiting to be written together.
pub(crate) struct LineBatch {
    destination: Box<dyn Write + Send>,
    buffer: Vec<u8>,
    lines: u64,
    /// The buffer starts with a `\n` that ends a line a failed write left half-written, so
    /// that the next line starts clean.
    mends_torn_line: bool,
    stats: Arc<TelemetryStats>,
    outages: OutageWarnings,
}

impl LineBatch {
    pub(crate) fn new(destination: Box<dyn Write + Send>, stats: Arc<TelemetryStats>) -> Self {
        LineBatch {
            destination,
            buffer: Vec::with_capacity(BATCH_BYTES),
            lines: 0,
            mends_torn_line: false,
            stats,
            outages: OutageWarnings::default(),
        }
    }

    /// The buffer the next line is appended to, in place: no copy per line.
    pub(crate) fn next_line(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    /// Marks one complete line appended; a large batch is written out at once.
    #[cfg(test)]
    pub(crate) fn line_done(&mut self) {
        self.lines_done(1);
    }

    /// Marks `lines` complete lines appended.
    pub(crate) fn lines_done(&mut self, lines: u64) {
        self.lines += lines;
        if self.buffer.len() >= BATCH_BYTES {
            self.write_out();
        }
    }

    /// One write for the whole batch, so a line is never split between writes of ours. The
    /// lines the writer took count as written (even when its `flush` then fails: a buffering
    /// writer still holds them), the rest of a failed batch as dropped. A writer that panics
    /// fails this batch only: the lines after it, and every span, still go out. The batch is
    /// counted and emptied before the outage is warned about, so a subscriber that panics on
    /// the warning loses no count.
    pub(crate) fn write_out(&mut self) {
        // A pending mend goes out on its own too, so that the cut line is ended before a
        // quiet spell or shutdown (the next process appends to the same file).
        if self.lines == 0 && !self.mends_torn_line {
            return;
        }
        let mut written = 0;
        let (destination, buffer, progress) = (&mut self.destination, &self.buffer, &mut written);
        let result = panics::catching(|| write_until_error(destination, buffer, progress))
            .unwrap_or_else(|panic| Err(io::Error::other(format!("the log writer panicked: {panic}"))));
        let lines_written = if result.is_ok() {
            self.lines
        } else {
            self.lines_in(written)
        };
        TelemetryStats::add(&self.stats.log_lines_written, lines_written);
        if result.is_err() {
            TelemetryStats::add(&self.stats.log_write_errors, 1);
            TelemetryStats::add(&self.stats.log_lines_dropped, self.lines.saturating_sub(lines_written));
        }
        // A cut line stays cut until a `\n` after it is written. (A writer that panics inside
        // `write` may have taken bytes it never reported; those cannot be known.)
        let cut = written > 0 && self.buffer[written - 1] != b'\n';
        self.mends_torn_line = cut || (self.mends_torn_line && written == 0);
        self.buffer.clear();
        self.lines = 0;
        if self.mends_torn_line {
            self.buffer.push(b'\n');
        }
        match result {
            Ok(()) => {
                if self.outages.succeeded() {
                    tracing::info!(target: "agent_telemetry::logs", "agent execution log writing recovered");
                }
            }
            Err(error) => {
                if self.outages.failed() {
                    tracing::warn!(target: "agent_telemetry::logs", %error, "cannot write agent execution log lines; counting those not written in agent_telemetry_log_lines_dropped_total until writing recovers");
                }
            }
        }
    }

    /// The lines of this batch within its first `bytes` bytes.
    // Only after a failed write: not worth a byte-counting dependency.
    #[allow(clippy::naive_bytecount)]
    fn lines_in(&self, bytes: usize) -> u64 {
        // Lines hold no raw `\n` (JSON escapes it): each one ends with one.
        let ends = self.buffer[..bytes].iter().filter(|&&byte| byte == b'\n').count() as u64;
        let mend = u64::from(self.mends_torn_line && bytes > 0);
        ends.saturating_sub(mend)
    }
}

/// Writes `bytes` and flushes, stopping at the first error; `written` counts the bytes the
/// writer took, kept even if it panics.
fn write_until_error(destination: &mut dyn Write, bytes: &[u8], written: &mut usize) -> io::Result<()> {
    while *written < bytes.len() {
        match destination.write(&bytes[*written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            // `min`: a writer that claims more than it was given cannot move us past the end.
            Ok(n) => *written += n.min(bytes.len() - *written),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    destination.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Warnings;

    #[test]
    fn failed_writes_are_counted_as_dropped_lines() {
        let stats = Arc::new(TelemetryStats::default());
        // No room: every write fails.
        let mut batch = LineBatch::new(Box::new(SmallDisk::default()), Arc::clone(&stats));
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
    fn a_subscriber_that_panics_on_the_warning_loses_no_count() {
        use tracing_subscriber::layer::{Context, SubscriberExt};
        /// An alerting hook that breaks on the outage warning.
        struct PanicsOnWarnings;
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PanicsOnWarnings {
            fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
                assert!(
                    *event.metadata().level() != tracing::Level::WARN,
                    "the alerting hook broke"
                );
            }
        }
        crate::test_support::keep_interest_dynamic();
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(PanicsOnWarnings));
        let stats = Arc::new(TelemetryStats::default());
        let mut batch = LineBatch::new(Box::new(SmallDisk::default()), Arc::clone(&stats));
        for _ in 0..10 {
            batch.next_line().extend_from_slice(b"{}\n");
            batch.line_done();
        }
        let panicked = tracing::dispatcher::with_default(&dispatch, || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batch.write_out())).is_err()
        });
        assert!(panicked, "the warning was emitted");
        assert_eq!(TelemetryStats::get(&stats.log_lines_dropped), 10);
        assert_eq!(TelemetryStats::get(&stats.log_write_errors), 1);
        // Emptied before the warning: nothing is counted twice by whoever holds it next.
        assert_eq!((batch.lines, batch.buffer.len()), (0, 0));
    }

    #[test]
    fn a_writer_that_panics_loses_its_batch_only() {
        let warnings = Warnings::with_target("agent_telemetry::logs");
        let stats = Arc::new(TelemetryStats::default());
        // Panics on its first write (no room), and works from then on.
        let disk = SmallDisk {
            panics_when_full: true,
            ..SmallDisk::default()
        };
        let mut batch = LineBatch::new(Box::new(disk.clone()), Arc::clone(&stats));
        tracing::dispatcher::with_default(&warnings.dispatch(), || {
            write_lines(&mut batch, 1..=3);
            disk.room.store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
            write_lines(&mut batch, 4..=8);
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
        use tracing_subscriber::layer::SubscriberExt;
        let warnings = Warnings::with_target("agent_telemetry::logs");
        let infos = Warnings::with_target("agent_telemetry::logs").at_level(tracing::Level::INFO);
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::registry()
                .with(warnings.clone())
                .with(infos.clone()),
        );
        let disk = SmallDisk::default();
        let stats = Arc::new(TelemetryStats::default());
        let mut batch = LineBatch::new(Box::new(disk.clone()), Arc::clone(&stats));
        // No minute between warnings here (`outages.rs` tests that one).
        batch.outages = OutageWarnings::quiet_for(std::time::Duration::ZERO);
        tracing::dispatcher::with_default(&dispatch, || {
            // Two outages of two failing batches each, between batches that are written.
            for (n, disk_full) in (1..).zip([false, true, true, false, true, true, false]) {
                let room = if disk_full { 0 } else { usize::MAX };
                disk.room.store(room, std::sync::atomic::Ordering::Relaxed);
                write_lines(&mut batch, n..=n);
            }
        });
        assert_eq!(counts(&stats), (3, 4, 4), "(written, dropped, errors)");
        let warnings = warnings.messages();
        assert_eq!(warnings.len(), 2, "one per spell: {warnings:?}");
        assert!(warnings[0].contains("error=No space left on device"), "{warnings:?}");
        assert_eq!(infos.messages(), ["agent execution log writing recovered"; 2]);
    }

    /// A disk with room for `room` more bytes, shared with the test. When full, its write
    /// fails, or panics; its flush fails while `flush_fails` is set.
    #[derive(Clone, Default)]
    struct SmallDisk {
        bytes: Arc<std::sync::Mutex<Vec<u8>>>,
        room: Arc<std::sync::atomic::AtomicUsize>,
        panics_when_full: bool,
        flush_fails: Arc<std::sync::atomic::AtomicBool>,
    }

    impl SmallDisk {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for SmallDisk {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let room = self.room.load(std::sync::atomic::Ordering::Relaxed);
            if room == 0 {
                assert!(!self.panics_when_full, "the disk writer broke");
                return Err(std::io::Error::other("No space left on device"));
            }
            let taken = bytes.len().min(room);
            self.room.fetch_sub(taken, std::sync::atomic::Ordering::Relaxed);
            self.bytes.lock().unwrap().extend_from_slice(&bytes[..taken]);
            Ok(taken)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            if self.flush_fails.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(std::io::Error::other("the pipe is broken"));
            }
            Ok(())
        }
    }

    /// Appends lines `{"n":N}` (8 bytes each) and writes the batch out.
    fn write_lines(batch: &mut LineBatch, numbers: std::ops::RangeInclusive<u8>) {
        for n in numbers {
            batch
                .next_line()
                .extend_from_slice(format!("{{\"n\":{n}}}\n").as_bytes());
            batch.line_done();
        }
        batch.write_out();
    }

    /// (written, dropped, write errors)
    fn counts(stats: &TelemetryStats) -> (u64, u64, u64) {
        (
            TelemetryStats::get(&stats.log_lines_written),
            TelemetryStats::get(&stats.log_lines_dropped),
            TelemetryStats::get(&stats.log_write_errors),
        )
    }

    #[test]
    fn a_write_that_fails_halfway_counts_the_lines_it_finished_and_the_next_line_starts_clean() {
        for panics_when_full in [false, true] {
            let disk = SmallDisk {
                panics_when_full,
                ..SmallDisk::default()
            };
            // The first line fits, the second is cut after 4 bytes.
            disk.room.store(12, std::sync::atomic::Ordering::Relaxed);
            let stats = Arc::new(TelemetryStats::default());
            let mut batch = LineBatch::new(Box::new(disk.clone()), Arc::clone(&stats));
            write_lines(&mut batch, 1..=3);
            assert_eq!(counts(&stats), (1, 2, 1), "panics: {panics_when_full}");
            write_lines(&mut batch, 4..=4);
            assert_eq!(counts(&stats), (1, 3, 2), "a full disk writes nothing");
            disk.room.store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
            write_lines(&mut batch, 5..=6);
            assert_eq!(counts(&stats), (3, 3, 2));
            assert_eq!(
                disk.text(),
                "{\"n\":1}\n{\"n\"\n{\"n\":5}\n{\"n\":6}\n",
                "the cut line ends before the next (panics: {panics_when_full})"
            );
        }
    }

    #[test]
    fn a_cut_line_is_ended_even_when_no_line_follows() {
        let disk = SmallDisk::default();
        disk.room.store(12, std::sync::atomic::Ordering::Relaxed);
        let stats = Arc::new(TelemetryStats::default());
        let mut batch = LineBatch::new(Box::new(disk.clone()), Arc::clone(&stats));
        write_lines(&mut batch, 1..=2);
        disk.room.store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
        // What the log thread does after each drain of its queue, and on shutdown.
        batch.write_out();
        assert_eq!(disk.text(), "{\"n\":1}\n{\"n\"\n");
        assert_eq!(counts(&stats), (1, 1, 1), "the mend is no line");
        batch.write_out();
        assert_eq!(disk.text(), "{\"n\":1}\n{\"n\"\n", "mended once");
    }

    #[test]
    fn lines_a_writer_took_count_as_written_when_its_flush_fails() {
        let disk = SmallDisk::default();
        disk.room.store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
        disk.flush_fails.store(true, std::sync::atomic::Ordering::Relaxed);
        let stats = Arc::new(TelemetryStats::default());
        let mut batch = LineBatch::new(Box::new(disk.clone()), Arc::clone(&stats));
        write_lines(&mut batch, 1..=3);
        assert_eq!(counts(&stats), (3, 0, 1));
        disk.flush_fails.store(false, std::sync::atomic::Ordering::Relaxed);
        write_lines(&mut batch, 4..=4);
        assert_eq!(counts(&stats), (4, 0, 1));
        assert_eq!(disk.text().lines().count(), 4, "no mend after whole lines");
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
