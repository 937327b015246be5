//! Counters of what the telemetry itself did and lost, shown as `agent_telemetry_*` metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Shared by the signals (which count) and the metrics (which expose the counts).
#[derive(Debug, Default)]
pub(crate) struct TelemetryStats {
    pub log_lines_written: AtomicU64,
    pub log_lines_dropped: AtomicU64,
    pub log_write_errors: AtomicU64,
    pub spans_dropped: AtomicU64,
    pub spans_exported: AtomicU64,
    pub spans_export_failed: AtomicU64,
    pub agent_names_overflowed: AtomicU64,
    pub model_names_overflowed: AtomicU64,
    pub usage_fields_invalid: AtomicU64,
    pub metrics_connections_refused: AtomicU64,
    pub metrics_connections_timed_out: AtomicU64,
    pub metrics_requests_malformed: AtomicU64,
    pub metrics_requests_unauthorized: AtomicU64,
    pub metrics_accept_errors: AtomicU64,
    pub metrics_answers_shared: AtomicU64,
    pub metrics_requests_coalesced: AtomicU64,
}

impl TelemetryStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// True the first time it is called on `flag`, for a warning given once. A load first, so
/// later calls, one per dropped execution, do not write to a line threads share.
pub(crate) fn first_time(flag: &AtomicBool) -> bool {
    !flag.load(Ordering::Relaxed) && !flag.swap(true, Ordering::Relaxed)
}
