//! What an agent execution is: which spans count, which fields they carry, how the status is
//! decided, and the record each closed execution becomes.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use thread_local::ThreadLocal;
use tracing_core::field::{Field, Visit};

use crate::config::{Config, TaskCapture};
use crate::gen_ai::{Rollup, Usage, UsageFields};
use crate::scrub::{Scrubber, HELD_LABEL_CHARS, SCRUB_MARGIN};
use crate::status::Status;
use crate::text::{cut, debug_text, held_name, unquote_debug, MAX_LABEL_CHARS};

/// The `agent_name` recorded when a span carries none: the execution is still counted.
pub(crate) const UNKNOWN_AGENT: &str = "unknown";

/// Why an execution failed, in the order DESIGN.md ranks the sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// An explicit `status` field with a non-success value (kept as written).
    Explicit(String),
    /// An `ERROR` event inside the span, with its `error` or `message` text.
    ErrorEvent(String),
    /// The thread panicked while the span was exited or closed.
    Panic,
    /// The execution's future was dropped before it completed.
    Cancelled,
}

impl Failure {
    /// The `error.type` attribute: low-cardinality, as the semantic conventions ask.
    pub(crate) fn error_type(&self) -> &str {
        match self {
            Failure::Explicit(status) => status,
            Failure::ErrorEvent(_) => "error",
            Failure::Panic => "panic",
            Failure::Cancelled => "cancelled",
        }
    }

    /// The span status description.
    pub(crate) fn description(&self) -> &str {
        match self {
            Failure::Explicit(status) => status,
            Failure::ErrorEvent(message) => message,
            Failure::Panic => "the agent panicked",
            Failure::Cancelled => "its future was dropped before it completed: timed out, raced away or aborted",
        }
    }
}

/// What the layer keeps of an execution's text, the same for every signal.
#[derive(Debug)]
pub(crate) struct TextPolicy {
    /// The most characters of a task or an error message any signal keeps: the log line's
    /// limit or the span attributes', whichever is larger. Each signal cuts to its own.
    pub task_chars: usize,
    pub scrubber: Arc<Scrubber>,
    pub task_capture: TaskCapture,
    names: ScrubbedNames,
}

/// The names each thread scrubbed last, with what scrubbing made of them (`None`: left as
/// they were). Names repeat, so a name is scrubbed once per thread, not per execution. Only
/// names within the label limit in bytes are remembered: a slot outlives its thread.
#[derive(Debug, Default)]
struct ScrubbedNames(ThreadLocal<RefCell<NamesScrubbed>>);

/// Names as they came, each with what scrubbing made of it.
type NamesScrubbed = Vec<(Arc<str>, Option<Arc<str>>)>;

impl ScrubbedNames {
    /// How many names each thread remembers.
    const KEPT: usize = 32;
}

impl TextPolicy {
    /// What `config` asks to keep, scrubbed by `scrubber`.
    pub(crate) fn new(config: &Config, scrubber: Arc<Scrubber>) -> Self {
        TextPolicy {
            task_chars: config.max_task_chars.max(config.attribute_value_chars()),
            scrubber,
            task_capture: config.task_capture,
            names: ScrubbedNames::default(),
        }
    }

    /// `name` (an agent's, a model's or a provider's, held to [`HELD_LABEL_CHARS`]) as the
    /// signals carry it: scrubbed as every string value is, then cut to [`MAX_LABEL_CHARS`].
    pub(crate) fn scrub_name(&self, name: &mut Arc<str>) {
        let scrub = |name: &str| match self.scrubber.scrub_and_cut(name, MAX_LABEL_CHARS) {
            Cow::Borrowed(_) => None,
            Cow::Owned(scrubbed) => Some(Arc::<str>::from(scrubbed)),
        };
        let long = name.len() > MAX_LABEL_CHARS;
        if long || !self.scrubber.is_on() {
            // A long name (rare) is scrubbed and cut each time, not remembered; with scrubbing
            // off, a name within the limit in bytes is within it in characters.
            if long {
                if let Some(scrubbed) = scrub(name) {
                    *name = scrubbed;
                }
            }
            return;
        }
        let memo = self.names.0.get_or_default();
        let Ok(mut memo) = memo.try_borrow_mut() else {
            if let Some(scrubbed) = scrub(name) {
                *name = scrubbed;
            }
            return;
        };
        let known = memo
            .iter()
            .rfind(|(seen, _)| Arc::ptr_eq(seen, name) || **seen == **name);
        let scrubbed = if let Some((_, scrubbed)) = known {
            scrubbed.clone()
        } else {
            let scrubbed = scrub(name);
            if memo.len() == ScrubbedNames::KEPT {
                memo.remove(0);
            }
            memo.push((Arc::clone(name), scrubbed.clone()));
            scrubbed
        };
        if let Some(scrubbed) = scrubbed {
            *name = scrubbed;
        }
    }

    /// How many characters of a task or error text to hold until the span closes: what is
    /// kept, and the margin scrubbing searches past it.
    pub(crate) fn held_chars(&self) -> usize {
        self.task_chars.saturating_add(SCRUB_MARGIN)
    }

    /// The task the signals carry, from the text held: scrubbed and cut, its hash, or none.
    pub(crate) fn task(&self, held: Option<String>) -> Option<String> {
        let held = held.unwrap_or_default();
        match self.task_capture {
            TaskCapture::Full => match self.scrubber.scrub_and_cut(&held, self.task_chars) {
                // Kept whole (the usual case): the held text itself, no copy.
                Cow::Borrowed(kept) if kept.len() == held.len() => Some(held),
                kept => Some(kept.into_owned()),
            },
            TaskCapture::Hash => Some(task_hash(&cut(&held, self.task_chars))),
            TaskCapture::Off => None,
        }
    }

    /// An explicit status as the signals carry it (a label: `error.type`), from the text held:
    /// scrubbed and cut.
    pub(crate) fn status_text(&self, held: &str) -> String {
        self.scrubber.scrub_and_cut(held, MAX_LABEL_CHARS).into_owned()
    }

    /// An error message the signals carry, from the text held: scrubbed and cut.
    pub(crate) fn error_text(&self, held: &str) -> String {
        self.scrubber.scrub_and_cut(held, self.task_chars).into_owned()
    }
}

/// `sha256:` and the first 16 hex digits of the SHA-256 of `task`: stable across processes
/// and versions, so identical tasks group.
pub(crate) fn task_hash(task: &str) -> String {
    use sha2::Digest;
    use std::fmt::Write;
    let digest = sha2::Sha256::digest(task.as_bytes());
    let mut hash = String::with_capacity(23);
    hash.push_str("sha256:");
    for byte in &digest[..8] {
        // Writing to a String cannot fail.
        let _ = write!(hash, "{byte:02x}");
    }
    hash
}

/// What a span the execution layer follows is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanRole {
    /// An agent execution: one of the agent span names.
    Agent,
    /// A model call, with its operation.
    ModelCall(crate::gen_ai::ModelCallOperation),
    /// Another GenAI span (its `gen_ai.operation.name` names no model call): traced only.
    GenAi,
}

/// The set of span names that are agent executions.
#[derive(Debug, Clone)]
pub(crate) struct AgentSpanNames(Box<[Box<str>]>);

impl AgentSpanNames {
    pub(crate) fn new(names: &[String]) -> Self {
        AgentSpanNames(names.iter().map(|n| n.as_str().into()).collect())
    }

    #[inline]
    pub(crate) fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|n| **n == *name)
    }

    /// Whether the execution layer follows (and builds) spans of this callsite: agent
    /// executions, and spans that may be GenAI spans ([`crate::gen_ai::may_be_gen_ai`]).
    #[inline]
    pub(crate) fn follows(&self, metadata: &tracing_core::Metadata<'_>) -> bool {
        self.matches(metadata.name()) || crate::gen_ai::may_be_gen_ai(metadata)
    }
}

/// The fields of an agent span that the signals use, as recorded so far: the agent's name and
/// the status held to [`HELD_LABEL_CHARS`], the task to `task_chars` characters, so that no
/// signal holds more of them than it keeps and scrubs before it cuts.
#[derive(Debug)]
pub(crate) struct ExecutionFields {
    pub agent_name: Option<Arc<str>>,
    pub task: Option<String>,
    pub status: Option<String>,
    /// Model, provider and tokens ([`crate::gen_ai`]), out of line: most executions have none,
    /// and the state is moved several times on its way.
    usage: Option<Box<UsageFields>>,
    task_chars: usize,
}

impl ExecutionFields {
    /// No fields yet; a task will be kept to `task_chars` characters.
    pub(crate) fn new(task_chars: usize) -> Self {
        ExecutionFields {
            agent_name: None,
            task: None,
            status: None,
            usage: None,
            task_chars,
        }
    }

    /// Whether `field` is one of the execution's own (the rest are span attributes only).
    /// `gen_ai.operation.name` is read here and stays a span attribute.
    pub(crate) fn owns(field: &Field) -> bool {
        Self::owns_itself(field) || (UsageFields::owns(field.name()) && field.name() != crate::gen_ai::OPERATION_FIELD)
    }

    /// The GenAI fields recorded so far.
    pub(crate) fn usage(&self) -> &UsageFields {
        self.usage.as_deref().unwrap_or(&UsageFields::NONE)
    }

    /// The GenAI names recorded (model, provider), for the layer to make labels of as the
    /// span closes.
    pub(crate) fn usage_names_mut(&mut self) -> impl Iterator<Item = &mut Arc<str>> {
        self.usage
            .iter_mut()
            .flat_map(|usage| usage.model.iter_mut().chain(usage.provider.iter_mut()))
    }

    fn usage_mut(&mut self) -> &mut UsageFields {
        self.usage.get_or_insert_with(Box::default)
    }

    /// The most characters of a value's `Debug` text these fields format, the GenAI ones'
    /// included: room for the quotes and an escape per character kept.
    pub(crate) fn formatted_chars(&self) -> usize {
        self.task_chars
            .max(HELD_LABEL_CHARS)
            .saturating_mul(2)
            .saturating_add(2)
    }

    /// Whether these fields read `field`'s value when given it: their own, and the GenAI
    /// ones (`gen_ai.operation.name` too).
    pub(crate) fn reads(field: &Field) -> bool {
        Self::owns_itself(field) || UsageFields::owns(field.name())
    }

    /// The guide's fields: the agent's name, the task and the status.
    fn owns_itself(field: &Field) -> bool {
        matches!(
            field.name(),
            "agent_name" | "agent.name" | "task" | "status" | "result.status"
        )
    }

    fn set(&mut self, field: &Field, value: &str) {
        match field.name() {
            "agent_name" | "agent.name" => self.agent_name = held_name(value),
            "task" => self.task = Some(cut(value, self.task_chars).into_owned()),
            "status" | "result.status" => {
                self.status = (!value.trim().is_empty()).then(|| cut(value, HELD_LABEL_CHARS).into_owned());
            }
            _ => {}
        }
    }
}

impl Visit for ExecutionFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if UsageFields::owns(field.name()) {
            return self.usage_mut().record_str(field, value);
        }
        self.set(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if UsageFields::owns(field.name()) {
            return self.usage_mut().record_bool(field, value);
        }
        self.set(field, if value { "success" } else { "failure" });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if UsageFields::owns(field.name()) {
            return self.usage_mut().record_u64(field, value);
        }
        self.record_debug(field, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if UsageFields::owns(field.name()) {
            return self.usage_mut().record_i64(field, value);
        }
        self.record_debug(field, &value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        if UsageFields::owns(field.name()) {
            return self.usage_mut().record_u128(field, value);
        }
        self.record_debug(field, &value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        if UsageFields::owns(field.name()) {
            return self.usage_mut().record_i128(field, value);
        }
        self.record_debug(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if UsageFields::owns(field.name()) {
            return self.usage_mut().record_debug(field, value);
        }
        if Self::owns_itself(field) {
            self.set(field, &unquote_debug(debug_text(value, self.formatted_chars())));
        }
    }
}

/// The text of an `ERROR` event: its `error` field (what `#[instrument(err)]` writes), else
/// its message, at most `max_chars` characters of it.
pub(crate) struct ErrorText {
    error: Option<String>,
    message: Option<String>,
    max_chars: usize,
}

impl ErrorText {
    pub(crate) fn new(max_chars: usize) -> Self {
        ErrorText {
            error: None,
            message: None,
            max_chars,
        }
    }

    pub(crate) fn into_text(self) -> String {
        self.error.or(self.message).unwrap_or_else(|| "error event".to_owned())
    }
}

impl Visit for ErrorText {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &format_args!("{value}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_debug(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "error" | "exception.message" => self.error = Some(debug_text(value, self.max_chars)),
            "message" => self.message = Some(debug_text(value, self.max_chars)),
            _ => {}
        }
    }
}

/// Per-span state, kept in the span's extensions from creation to close.
#[derive(Debug)]
pub(crate) struct ExecutionState {
    /// For the duration: monotonic.
    pub started: Instant,
    /// For timestamps: the wall clock, read once; the end is `started_at + duration`.
    pub started_at: SystemTime,
    pub fields: ExecutionFields,
    pub error_event: Option<String>,
    pub panicked: bool,
    /// Its future was dropped before it completed (`cancellation.rs`).
    pub cancelled: bool,
    /// When its own future was dropped, this long after it started: its end.
    pub dropped_after: Option<Duration>,
    /// It was entered at least once: it ran.
    pub entered: bool,
    /// Its model calls' usage, as they end; out of line as the fields' usage is.
    rollup: Option<Box<Rollup>>,
}

impl ExecutionState {
    /// An execution starting now, whose task is kept to `task_chars` characters.
    pub(crate) fn new(task_chars: usize) -> Self {
        let (started, started_at) = now();
        ExecutionState {
            started,
            started_at,
            fields: ExecutionFields::new(task_chars),
            error_event: None,
            panicked: false,
            cancelled: false,
            dropped_after: None,
            entered: false,
            rollup: None,
        }
    }

    /// Marks it cancelled, unless a panic through it is its outcome already. `dropped`: its
    /// own future was dropped now, which ends it (the first drop counts); else a future inside
    /// it was, and it ends when it closes.
    pub(crate) fn cancel(&mut self, dropped: bool) {
        if self.panicked {
            return;
        }
        self.cancelled = true;
        if dropped && self.dropped_after.is_none() {
            self.dropped_after = Some(self.started.elapsed());
        }
    }

    /// How long it ran: until its own future was dropped, else until now.
    pub(crate) fn duration(&self) -> Duration {
        self.dropped_after.unwrap_or_else(|| self.started.elapsed())
    }

    /// What the model calls inside it gathered, for adding more.
    pub(crate) fn rollup_mut(&mut self) -> &mut Rollup {
        self.rollup.get_or_insert_with(Box::default)
    }

    /// What the model calls inside it gathered, taken as it ends.
    pub(crate) fn take_rollup(&mut self) -> Rollup {
        self.rollup.take().map(|rollup| *rollup).unwrap_or_default()
    }

    /// First match wins: explicit field, cancellation, `ERROR` event, panic, else success.
    pub(crate) fn outcome(&self) -> (Status, Option<Failure>) {
        if let Some(text) = &self.fields.status {
            return match Status::from_text(text) {
                Status::Success => (Status::Success, None),
                other => (other, Some(Failure::Explicit(text.trim().to_owned()))),
            };
        }
        if self.cancelled {
            return (Status::Cancelled, Some(Failure::Cancelled));
        }
        if let Some(message) = &self.error_event {
            return (Status::Failure, Some(Failure::ErrorEvent(message.clone())));
        }
        if self.panicked {
            return (Status::Failure, Some(Failure::Panic));
        }
        (Status::Success, None)
    }
}

/// How long a thread's reading of both clocks stands in for reading the wall clock again.
/// Slewed by NTP, the two clocks drift apart by at most 0.05%: 5 µs over this. A step of the
/// wall clock (or a suspend) shows in start times up to this much later.
const WALL_CLOCK_REREAD: Duration = Duration::from_millis(10);

/// The monotonic clock and the wall clock now, with one clock read where the thread read both
/// less than [`WALL_CLOCK_REREAD`] ago. Executions come many to 10 ms on a busy thread.
fn now() -> (Instant, SystemTime) {
    thread_local! {
        static BOTH: Cell<Option<(Instant, SystemTime)>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    if let Ok(Some(wall)) = BOTH.try_with(|both| wall_clock_at(now, both.get())) {
        return (now, wall);
    }
    let wall = SystemTime::now();
    // A thread being torn down keeps no reading.
    let _ = BOTH.try_with(|both| both.set(Some((now, wall))));
    (now, wall)
}

/// The wall time at `now` from a reading of both clocks, if that reading is recent enough:
/// its wall time plus the monotonic time since.
fn wall_clock_at(now: Instant, both: Option<(Instant, SystemTime)>) -> Option<SystemTime> {
    let (instant, wall) = both?;
    let since = now.checked_duration_since(instant)?;
    if since < WALL_CLOCK_REREAD {
        wall.checked_add(since)
    } else {
        None
    }
}

/// The ids that correlate a log line with its exported span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceIds {
    pub trace_id: opentelemetry::TraceId,
    pub span_id: opentelemetry::SpanId,
}

/// One closed agent execution, as every signal receives it. Owned: the log line and the
/// span are made from it off the agent's thread.
#[derive(Debug)]
pub(crate) struct Execution {
    pub agent_name: Arc<str>,
    /// `None` when the task is not captured ([`TaskCapture::Off`]).
    pub task: Option<String>,
    pub duration: Duration,
    pub status: Status,
    pub failure: Option<Failure>,
    pub finished_at: SystemTime,
    pub trace: Option<TraceIds>,
    /// Model, provider, tokens and cost, when any was recorded.
    pub usage: Option<Box<Usage>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_strings_are_unquoted() {
        assert_eq!(unquote_debug(format!("{:?}", "qa-engineer")), "qa-engineer");
        let tricky = "a \"quoted\"\\ line\nwith\ttabs and \u{7} bell and ü";
        assert_eq!(unquote_debug(format!("{tricky:?}")), tricky);
        assert_eq!(unquote_debug("plain".to_owned()), "plain");
    }

    #[test]
    fn the_wall_clock_is_derived_from_a_recent_reading_of_both_clocks_only() {
        let (instant, wall) = (Instant::now(), SystemTime::now());
        let both = Some((instant, wall));
        let later = |ms| instant + Duration::from_millis(ms);
        assert_eq!(wall_clock_at(instant, both), Some(wall));
        assert_eq!(wall_clock_at(later(7), both), Some(wall + Duration::from_millis(7)));
        assert_eq!(wall_clock_at(later(10), both), None, "too old: read again");
        assert_eq!(wall_clock_at(later(7), None), None, "nothing read yet");
        if let Some(earlier) = instant.checked_sub(Duration::from_millis(1)) {
            assert_eq!(wall_clock_at(earlier, both), None, "a reading from the future");
        }
    }

    #[test]
    fn an_execution_starts_at_the_wall_clock_time_of_its_start() {
        let tolerance = Duration::from_millis(1);
        for _ in 0..1000 {
            let before = SystemTime::now();
            let state = ExecutionState::new(1024);
            let after = SystemTime::now();
            assert!(
                state.started_at + tolerance >= before,
                "{:?} < {before:?}",
                state.started_at
            );
            assert!(
                state.started_at <= after + tolerance,
                "{:?} > {after:?}",
                state.started_at
            );
        }
    }

    #[test]
    fn the_task_hash_is_stable_and_short() {
        assert_eq!(task_hash(""), "sha256:e3b0c44298fc1c14");
        assert_eq!(task_hash("Implement API"), task_hash("Implement API"));
        assert_ne!(task_hash("Implement API"), task_hash("Implement API."));
    }

    #[test]
    fn first_matching_status_source_wins() {
        let mut state = ExecutionState::new(1024);
        assert_eq!(state.outcome(), (Status::Success, None));
        state.panicked = true;
        assert_eq!(state.outcome(), (Status::Failure, Some(Failure::Panic)));
        state.error_event = Some("boom".into());
        assert_eq!(state.outcome().1, Some(Failure::ErrorEvent("boom".into())));
        state.cancelled = true;
        assert_eq!(
            state.outcome(),
            (Status::Cancelled, Some(Failure::Cancelled)),
            "before the error event"
        );
        state.fields.status = Some("success".into());
        assert_eq!(state.outcome(), (Status::Success, None));
    }

    #[test]
    fn its_own_drop_ends_a_cancelled_execution_and_a_panic_stays_its_outcome() {
        let mut inner = ExecutionState::new(1024);
        inner.cancel(false);
        assert!(inner.cancelled);
        assert_eq!(inner.dropped_after, None, "ends as it closes");

        let mut own = ExecutionState::new(1024);
        own.cancel(true);
        let dropped = own.dropped_after.expect("ends at the drop");
        std::thread::sleep(Duration::from_millis(5));
        own.cancel(true);
        assert_eq!(own.dropped_after, Some(dropped), "the first drop counts");
        assert_eq!(own.duration(), dropped);

        let mut panicked = ExecutionState::new(1024);
        panicked.panicked = true;
        panicked.cancel(true);
        assert!(!panicked.cancelled);
        assert_eq!(panicked.outcome(), (Status::Failure, Some(Failure::Panic)));
    }
}
