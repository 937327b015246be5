//! When to warn about a destination that fails (the log writer, the span exporter, the
//! `/metrics` listener): once when an outage starts and once when it ends, not per batch. One
//! that fails and recovers again and again is warned about at most once a minute, and an
//! outage that outlasts the minute always is; the counters still count every loss.

use std::time::{Duration, Instant};

/// The shortest time between two warnings about the same destination.
const QUIET_FOR: Duration = Duration::from_secs(60);

/// The failing outages of one destination.
#[derive(Debug)]
pub(crate) struct OutageWarnings {
    failing: bool,
    /// Whether the start of the current outage was warned about: only then is its end told.
    warned: bool,
    last_warning: Option<Instant>,
    quiet_for: Duration,
}

impl Default for OutageWarnings {
    fn default() -> Self {
        OutageWarnings::quiet_for(QUIET_FOR)
    }
}

impl OutageWarnings {
    pub(crate) fn quiet_for(quiet_for: Duration) -> Self {
        OutageWarnings {
            failing: false,
            warned: false,
            last_warning: None,
            quiet_for,
        }
    }

    /// Notes a failure: true when it is the one to warn about: the first of a outage, or, for a
    /// outage that began within the quiet minute, the first once the minute is over.
    pub(crate) fn failed(&mut self) -> bool {
        if !std::mem::replace(&mut self.failing, true) {
            self.warned = false;
        }
        if self.warned {
            return false;
        }
        let now = Instant::now();
        self.warned = self
            .last_warning
            .is_none_or(|last| now.saturating_duration_since(last) >= self.quiet_for);
        if self.warned {
            self.last_warning = Some(now);
        }
        self.warned
    }

    /// Notes a success: true when it ends a outage that was warned about.
    pub(crate) fn succeeded(&mut self) -> bool {
        let ended = std::mem::replace(&mut self.failing, false);
        ended && std::mem::replace(&mut self.warned, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_told_when_it_starts_and_ends() {
        let mut outages = OutageWarnings::quiet_for(Duration::ZERO);
        assert!(!outages.succeeded(), "nothing failed yet");
        assert!(outages.failed());
        assert!(!outages.failed(), "the same outage");
        assert!(outages.succeeded());
        assert!(!outages.succeeded());
        assert!(outages.failed(), "a new outage");
    }

    #[test]
    fn an_outage_that_began_within_the_quiet_time_is_warned_about_when_it_outlasts_it() {
        let quiet = Duration::from_millis(50);
        let mut outages = OutageWarnings::quiet_for(quiet);
        assert!(outages.failed());
        assert!(outages.succeeded());
        assert!(!outages.failed(), "within the quiet time");
        assert!(!outages.failed());
        std::thread::sleep(quiet * 2);
        assert!(outages.failed(), "still failing after it");
        assert!(!outages.failed());
        assert!(outages.succeeded(), "and its end is told");
    }

    #[test]
    fn a_flapping_destination_is_warned_about_once_a_minute() {
        let mut outages = OutageWarnings::default();
        assert!(outages.failed());
        assert!(outages.succeeded());
        for _ in 0..100 {
            assert!(!outages.failed(), "within the minute");
            assert!(!outages.succeeded(), "a outage not warned about ends quietly");
        }
    }
}
