//! Telling a cancelled async execution from a completed one.
//!
//! A dropped future looks like a finished one to a `tracing` layer: its span is entered,
//! exited and closed either way. So the future itself says so: [`ReportsCancellation`] wraps
//! an execution's future and, when it is dropped before it completed (and not by a panic out
//! of its own poll), marks its execution as cancelled. The layer then reports the execution
//! with status `cancelled`; one whose own future was dropped lasts until that drop.
//!
//! [`instrument`](crate::instrument) (the attribute) wraps an `async fn`'s body in it;
//! [`AgentInstrument::instrument_agent`] wraps a future and instruments it with an agent span.
//! An agent span that closes without ever having been entered never ran, and is cancelled
//! too (a future dropped unpolled is entered to be dropped: its `ReportsCancellation` tells).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tracing::instrument::Instrumented;
use tracing::{dispatcher, Dispatch, Instrument, Span};

use crate::layer::{AgentSpanHook, Dropped};

pin_project! {
    /// A future that, dropped before it completed, marks its agent execution cancelled.
    ///
    /// Made by [`instrument`](crate::instrument) and [`AgentInstrument`]; which execution it
    /// marks, each constructor says. Dropped while a panic unwinds out of its own poll, it
    /// reports nothing: the panic is reported as one. Dropped while a panic that began
    /// elsewhere unwinds (a sibling in `join!` panicked), it marks its span's own execution
    /// only, never one above: the panic may be unwinding through that one.
    #[must_use = "futures do nothing unless polled"]
    pub struct ReportsCancellation<F> {
        #[pin]
        inner: F,
        execution: Execution,
        progress: Progress,
        // The dispatcher its span is current in: the default where it was first polled. It
        // may be dropped where another is the default, or none.
        dispatch: Option<Dispatch>,
    }

    impl<F> PinnedDrop for ReportsCancellation<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // `Polling` here: a panic unwound out of the inner future's poll.
            if *this.progress == Progress::Pending {
                match this.dispatch {
                    Some(dispatch) => dispatcher::with_default(dispatch, || this.execution.report_cancelled()),
                    None => this.execution.report_cancelled(),
                }
            }
        }
    }
}

/// Which execution a dropped [`ReportsCancellation`] reports.
#[derive(Debug)]
enum Execution {
    /// The nearest agent span or model call at or above this span.
    AtOrAbove(Span),
    /// The nearest agent span or model call at or above the span current when dropped.
    AtOrAboveCurrent,
    /// The span current when dropped, if it has this name and is an agent span or model call.
    CurrentNamed(&'static str),
    /// This span, if it has this name and is an agent span or model call.
    Named(Span, &'static str),
}

/// How far the inner future got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Pending,
    /// Inside the inner future's poll: still so when a panic unwinds out of it.
    Polling,
    Completed,
}

impl<F> ReportsCancellation<F> {
    /// Wraps `inner`, whose execution is the nearest agent span or model call at or above the
    /// span current when it is dropped: a future inside that execution, which ends as it
    /// closes. Dropped while a panic unwinds, it marks none.
    pub fn new(inner: F) -> Self {
        Self::reporting(inner, Execution::AtOrAboveCurrent)
    }

    /// Wraps `inner`, whose execution is `span`, ended by the drop (or else the agent span
    /// above it, which ends as it closes; dropped while a panic unwinds, `span` only).
    pub fn in_span(inner: F, span: Span) -> Self {
        Self::reporting(inner, Execution::AtOrAbove(span))
    }

    /// Wraps the body of a function `#[instrument]` instruments with a span named `name`,
    /// which is current when the body is dropped: that span is the execution, when it is an
    /// agent span or a model call; a dropped tool call or other step cancels nothing. The span
    /// is known by its name: when the function's own span is not enabled (a level filter in
    /// front of the layer), the span around it is current instead, and is taken for the
    /// function's if it has the same name.
    pub fn of_span_named(inner: F, name: &'static str) -> Self {
        Self::reporting(inner, Execution::CurrentNamed(name))
    }

    /// Wraps the future a function `#[instrument]` instruments with a span named `name`
    /// returns, `span` being the span current in its body: the function's span, or the one
    /// around it when the function's is not enabled. That span is the execution when it has
    /// the name and is an agent span or a model call.
    pub fn of_named_span(inner: F, span: Span, name: &'static str) -> Self {
        Self::reporting(inner, Execution::Named(span, name))
    }

    fn reporting(inner: F, execution: Execution) -> Self {
        ReportsCancellation {
            inner,
            execution,
            progress: Progress::Pending,
            dispatch: None,
        }
    }
}

impl<F: Future> Future for ReportsCancellation<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if this.dispatch.is_none() {
            *this.dispatch = Some(dispatcher::get_default(Dispatch::clone));
        }
        *this.progress = Progress::Polling;
        let polled = this.inner.poll(cx);
        *this.progress = if polled.is_ready() {
            Progress::Completed
        } else {
            Progress::Pending
        };
        polled
    }
}

impl Execution {
    /// While a panic unwinds, only a span's own execution is marked: the one above it may be
    /// what the panic is unwinding through, which is then a panic.
    fn report_cancelled(&self) {
        let panicking = std::thread::panicking();
        match self {
            Execution::AtOrAbove(span) if panicking => report_cancelled(span, Dropped::Own),
            Execution::AtOrAbove(span) => report_cancelled(span, Dropped::OwnOrAbove),
            Execution::AtOrAboveCurrent if panicking => {}
            Execution::AtOrAboveCurrent => report_cancelled(&Span::current(), Dropped::Inside),
            Execution::CurrentNamed(name) => {
                let current = Span::current();
                if current.metadata().is_some_and(|metadata| metadata.name() == *name) {
                    report_cancelled(&current, Dropped::Own);
                }
            }
            Execution::Named(span, name) => {
                if span.metadata().is_some_and(|metadata| metadata.name() == *name) {
                    report_cancelled(span, Dropped::Own);
                }
            }
        }
    }
}

/// Marks the execution of `span` cancelled, as `dropped` says, through the layer that traces
/// it.
fn report_cancelled(span: &Span, dropped: Dropped) {
    span.with_subscriber(|(id, dispatch)| {
        if let Some(hook) = dispatch.downcast_ref::<AgentSpanHook>() {
            hook.cancel(dispatch, id, dropped);
        }
    });
}

/// Instruments futures as agent executions whose cancellation is reported: the
/// [`tracing::Instrument`] of agent spans.
///
/// # Examples
///
/// ```
/// use agent_telemetry::AgentInstrument;
///
/// async fn answer(question: &str) -> usize {
///     question.len()
/// }
///
/// # fn main() {
/// let span = tracing::info_span!("agent_execution", agent_name = "support", task = "Answer");
/// let execution = answer("How do I reset my password?").instrument_agent(span);
/// // Dropped unfinished (a timeout, a lost `select!` branch, an aborted task), the execution
/// // is reported with status `cancelled`; finished, with its own status.
/// # drop(execution);
/// # }
/// ```
pub trait AgentInstrument: Future + Sized {
    /// Runs `self` in `span`, as [`tracing::Instrument::instrument`] does, and reports the
    /// execution cancelled if it is dropped before it completed.
    fn instrument_agent(self, span: Span) -> Instrumented<ReportsCancellation<Self>> {
        ReportsCancellation::in_span(self, span.clone()).instrument(span)
    }

    /// Reports the execution of the agent span current when `self` is dropped as cancelled,
    /// if it is dropped before it completed; for a future inside an instrumented agent
    /// future.
    fn reports_cancellation(self) -> ReportsCancellation<Self> {
        ReportsCancellation::new(self)
    }
}

impl<F: Future> AgentInstrument for F {}
