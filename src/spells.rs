//! When to warn about a destination that fails (the log writer, the span exporter): once when
//! it starts failing and once when it recovers, not per batch. One that fails and recovers
//! again and again is warned about at most once a minute, and a spell that outlasts the minute
//! always is; the counters still count every loss.

use std::time::{Duration, Instant};

/// The shortest time between two warnings about the same destination.
const QUIET_FOR: Duration = Duration::from_secs(60);

/// The failing spells of one destination.
#[derive(Debug)]
pub(crate) struct FailureSpells {
    failing: bool,
    /// Whether the start of the current spell was warned about: only then is its end told.
    warned: bool,
    last_warning: Option<Instant>,
    quiet_for: Duration,
}

impl Default for FailureSpells {
    fn default() -> Self {
        FailureSpells::quiet_for(QUIET_FOR)
    }
}

impl FailureSpells {
    pub(crate) fn quiet_for(quiet_for: Duration) -> Self {
        FailureSpells {
            failing: false,
            warned: false,
            last_warning: None,
            quiet_for,
        }
    }

    /// Notes a failure: true when it is the one to warn about: the first of a spell, or, for a
    /// spell that began within the quiet minute, the first once the minute is over.
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
            .map_or(true, |last| now.saturating_duration_since(last) >= self.quiet_for);
        if self.warned {
            self.last_warning = Some(now);
        }
        self.warned
    }

    /// Notes a success: true when it ends a spell that was warned about.
    pub(crate) fn succeeded(&mut self) -> bool {
        let ended = std::mem::replace(&mut self.failing, false);
        ended && std::mem::replace(&mut self.warned, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spell_is_told_when_it_starts_and_ends() {
        let mut spells = FailureSpells::quiet_for(Duration::ZERO);
        assert!(!spells.succeeded(), "nothing failed yet");
        assert!(spells.failed());
        assert!(!spells.failed(), "the same spell");
        assert!(spells.succeeded());
        assert!(!spells.succeeded());
        assert!(spells.failed(), "a new spell");
    }

    #[test]
    fn a_spell_that_began_within_the_quiet_time_is_warned_about_when_it_outlasts_it() {
        let quiet = Duration::from_millis(50);
        let mut spells = FailureSpells::quiet_for(quiet);
        assert!(spells.failed());
        assert!(spells.succeeded());
        assert!(!spells.failed(), "within the quiet time");
        assert!(!spells.failed());
        std::thread::sleep(quiet * 2);
        assert!(spells.failed(), "still failing after it");
        assert!(!spells.failed());
        assert!(spells.succeeded(), "and its end is told");
    }

    #[test]
    fn a_flapping_destination_is_warned_about_once_a_minute() {
        let mut spells = FailureSpells::default();
        assert!(spells.failed());
        assert!(spells.succeeded());
        for _ in 0..100 {
            assert!(!spells.failed(), "within the minute");
            assert!(!spells.succeeded(), "a spell not warned about ends quietly");
        }
    }
}
