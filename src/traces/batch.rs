//! What crosses from an agent's thread to the span thread: a thread's finished spans, gathered
//! in a batch of its own and handed over whole. These types know nothing of queues or threads.

use std::ops::Range;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Event, Link, SpanId, SpanKind, TraceFlags, TraceId, TraceState};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SpanData;
use tracing_core::Metadata;

use super::span_size;
use crate::execution::{Failure, SpanRole};
use crate::prices::Tokens;
use crate::status::Status;

/// A closed agent span, as it crosses to the span processor's thread: what building it needs.
/// Keep it under two cache lines when the span has nothing rare: what is rare goes in
/// [`RareParts`], behind one pointer. Its text (the agent's name and the task) is in its
/// batch's buffer.
pub(crate) struct FinishedSpan {
    pub(super) trace_id: TraceId,
    pub(super) span_id: SpanId,
    pub(super) parent_span_id: SpanId,
    pub(super) flags: TraceFlags,
    pub(super) parent_is_remote: bool,
    pub(super) kind: SpanKind,
    /// Which fixed attributes it gets: an agent execution's, a model call's, none.
    pub(super) role: SpanRole,
    pub(super) status: Status,
    pub(super) metadata: &'static Metadata<'static>,
    /// Where the agent's name and then the task are in the batch's text.
    pub(super) text: Range<usize>,
    /// Whether the task is captured: without, the span has no `task` attribute.
    pub(super) has_task: bool,
    /// Whether its GenAI usage is in its batch's usages, in the order of the spans that have
    /// one.
    pub(super) has_usage: bool,
    pub(super) agent_name_len: usize,
    pub(super) end_time: SystemTime,
    pub(super) duration: Duration,
    pub(super) rare: Option<Box<RareParts>>,
}

/// A span's GenAI usage as the agent's thread gives it: the model and provider (empty when
/// none was recorded) and the tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct UsageText<'a> {
    pub(crate) model: &'a str,
    pub(crate) provider: &'a str,
    pub(crate) tokens: Tokens,
    /// Whether any token field was recorded (zero tokens are still shown then).
    pub(crate) has_tokens: bool,
}

/// What an agent span's ids, times and the attributes the crate sets weigh with their
/// framing, from above, besides their text that varies.
const AGENT_SPAN_OVERHEAD: usize = 512;

/// What a usage's attributes weigh with their framing and numbers, from above, besides the
/// names.
const USAGE_OVERHEAD: usize = 512;

impl UsageText<'_> {
    /// What the usage adds to a span: its names and the attributes' keys and numbers.
    fn weight(&self) -> usize {
        2 * (self.model.len() + self.provider.len()) + USAGE_OVERHEAD
    }
}

/// A usage in a batch: its numbers, its names' lengths in the batch's text.
struct UsageParts {
    model_len: usize,
    provider_len: usize,
    tokens: Tokens,
    has_tokens: bool,
}

/// A thread's finished agent spans, with their text in one buffer. Invariant: no text crosses
/// as an allocation of the agent's thread for the span thread to free; the batch itself goes
/// back to the agent's thread for reuse.
pub(crate) struct AgentBatch {
    spans: Vec<FinishedSpan>,
    /// The usages of the spans that have one, in their order.
    usages: Vec<UsageParts>,
    text: String,
}

impl AgentBatch {
    /// Text kept by an emptied batch for reuse; a batch that grew past it is not reused.
    const KEPT_TEXT_BYTES: usize = 16 * 1024;

    /// Room for `spans` spans with names and tasks of usual length.
    pub(crate) fn with_capacity(spans: usize) -> Self {
        AgentBatch {
            spans: Vec::with_capacity(spans),
            usages: Vec::new(),
            text: String::with_capacity(spans.saturating_mul(64).min(Self::KEPT_TEXT_BYTES)),
        }
    }

    /// Adds a finished span with its text and its usage.
    pub(crate) fn push(&mut self, mut span: FinishedSpan, agent_name: &str, task: &str, usage: Option<UsageText<'_>>) {
        let start = self.text.len();
        self.text.push_str(agent_name);
        self.text.push_str(task);
        if let Some(usage) = usage {
            self.text.push_str(usage.model);
            self.text.push_str(usage.provider);
            self.usages.push(UsageParts {
                model_len: usage.model.len(),
                provider_len: usage.provider.len(),
                tokens: usage.tokens,
                has_tokens: usage.has_tokens,
            });
        }
        span.text = start..self.text.len();
        span.agent_name_len = agent_name.len();
        span.has_usage = usage.is_some();
        self.spans.push(span);
    }

    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Empties the batch, keeping its room.
    pub(crate) fn clear(&mut self) {
        self.spans.clear();
        self.usages.clear();
        self.text.clear();
    }

    /// Whether the emptied batch is worth keeping for another thread's spans.
    pub(crate) fn reusable(&self) -> bool {
        self.is_empty() && self.text.capacity() <= Self::KEPT_TEXT_BYTES
    }

    /// Takes the spans out, in order, each with its agent's name, task and usage. The text
    /// and usages stay until [`clear`](Self::clear), which every batch goes through before it
    /// is used again.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Drained<'_>> + '_ {
        let text = &self.text;
        let mut usages = self.usages.iter();
        self.spans.drain(..).map(move |span| {
            // `push` set the ranges in this text, at char boundaries: a range that is not
            // would be a bug, and gives empty text rather than a panic.
            let own = text.get(span.text.clone()).unwrap_or_default();
            let (agent_name, rest) = own.split_at_checked(span.agent_name_len).unwrap_or_default();
            let parts = if span.has_usage { usages.next() } else { None };
            let Some(parts) = parts else {
                return (span, agent_name, rest, None);
            };
            let names = parts.model_len + parts.provider_len;
            let (task, names) = rest
                .split_at_checked(rest.len().saturating_sub(names))
                .unwrap_or_default();
            let (model, provider) = names.split_at_checked(parts.model_len).unwrap_or_default();
            let usage = UsageText {
                model,
                provider,
                tokens: parts.tokens,
                has_tokens: parts.has_tokens,
            };
            (span, agent_name, task, Some(usage))
        })
    }
}

/// A span taken out of its batch: the span, its agent's name, its task and its usage.
pub(crate) type Drained<'a> = (FinishedSpan, &'a str, &'a str, Option<UsageText<'a>>);

/// What a span weighs as queued: [`FinishedSpan::weight`], its agent's name (which it carries
/// twice), its task and its usage.
pub(crate) fn queued_weight(span: &FinishedSpan, agent_name: &str, task: &str, usage: Option<&UsageText<'_>>) -> usize {
    span.weight() + 2 * agent_name.len() + task.len() + usage.map_or(0, UsageText::weight)
}

/// The parts most agent spans do not have, boxed only when one does.
pub(super) struct RareParts {
    /// An `otel.name` field's.
    pub(super) name: Option<String>,
    pub(super) trace_state: TraceState,
    pub(super) attributes: Vec<KeyValue>,
    pub(super) events: Vec<Event>,
    pub(super) dropped_events: u32,
    pub(super) links: Vec<Link>,
    pub(super) dropped_links: u32,
    pub(super) failure: Option<Failure>,
}

impl FinishedSpan {
    /// What the span weighs besides its agent's name (which it carries twice) and its task
    /// (`span_size`): the overhead, the keys and values of the attributes the crate sets, the
    /// code location, and the rare parts.
    pub(crate) fn weight(&self) -> usize {
        let location = self.metadata.file().map_or(0, str::len) + self.metadata.module_path().map_or(0, str::len);
        let rare = self.rare.as_ref().map_or(0, |rare| {
            rare.name.as_ref().map_or(0, String::len)
                + span_size::of_trace_state(&rare.trace_state)
                + span_size::of_attributes(&rare.attributes)
                + span_size::of_events(&rare.events)
                + span_size::of_links(&rare.links)
                + rare.failure.as_ref().map_or(0, |failure| failure.description().len())
        });
        AGENT_SPAN_OVERHEAD + location + rare
    }
}

/// The spans one thread finished: agent spans as their parts, to be built on the span thread,
/// and the spans `tracing-opentelemetry` built. They cross together, and no span crosses
/// alone through the queue every thread writes to.
pub(crate) struct ThreadSpans {
    pub(super) agents: AgentBatch,
    pub(super) built: Vec<SpanData>,
    /// What the spans weigh (`span_size`), for the queue's bound in bytes.
    pub(super) bytes: usize,
}

impl ThreadSpans {
    pub(super) fn with_capacity(spans: usize) -> Self {
        ThreadSpans {
            agents: AgentBatch::with_capacity(spans),
            // Most threads finish agent spans only: room is made on the first other one.
            built: Vec::new(),
            bytes: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.agents.len() + self.built.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.built.is_empty()
    }

    pub(super) fn clear(&mut self) {
        self.agents.clear();
        self.built.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::FinishedSpan;

    #[test]
    fn a_finished_span_fits_two_cache_lines() {
        assert!(
            std::mem::size_of::<FinishedSpan>() <= 128,
            "{}",
            std::mem::size_of::<FinishedSpan>()
        );
    }
}
