//! The outcome of an agent execution or a model call, as every signal names it.

use std::fmt;

/// The outcome of one agent execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// The agent finished its task.
    Success,
    /// The agent failed: an explicit status, an `ERROR` event, or a panic.
    Failure,
    /// The agent's future was dropped before it completed: a timeout that ran out, a
    /// `select!` branch that lost, an aborted task, a runtime shut down with it in flight (see
    /// [`instrument`](crate::instrument)); or an explicit `cancelled` status.
    Cancelled,
}

impl Status {
    /// The label value: `success`, `failure` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Failure => "failure",
            Status::Cancelled => "cancelled",
        }
    }

    /// Normalises a user's status text: the usual words for success, `cancelled` (or
    /// `canceled`), anything else failure.
    pub(crate) fn from_text(text: &str) -> Status {
        const SUCCESS: [&str; 7] = ["success", "succeeded", "successful", "ok", "completed", "done", "true"];
        let text = text.trim();
        if SUCCESS.iter().any(|s| text.eq_ignore_ascii_case(s)) {
            Status::Success
        } else if text.eq_ignore_ascii_case("cancelled") || text.eq_ignore_ascii_case("canceled") {
            Status::Cancelled
        } else {
            Status::Failure
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Status;

    #[test]
    fn status_words() {
        for s in ["success", "OK", " Completed ", "true"] {
            assert_eq!(Status::from_text(s), Status::Success, "{s}");
        }
        for s in ["failure", "error", "timeout", ""] {
            assert_eq!(Status::from_text(s), Status::Failure, "{s}");
        }
        for s in ["cancelled", "Canceled "] {
            assert_eq!(Status::from_text(s), Status::Cancelled, "{s}");
        }
    }
}
