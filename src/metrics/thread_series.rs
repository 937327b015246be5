//! What a thread records, kept on the thread and handed to the SDK in runs. Two threads
//! recording one agent's executions straight into the SDK would take turns on the series'
//! histogram lock and counter, whose cache lines would cross cores on every execution.

use std::cell::Cell;
use std::sync::Arc;

use opentelemetry::metrics::{Counter, Histogram};

use super::AgentSeries;
use crate::status::Status;

/// The instruments executions are recorded into.
pub(super) struct Instruments {
    pub(super) executions: Counter<u64>,
    pub(super) duration: Histogram<f64>,
}

thread_local! {
    static HOLDING: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as holding some thread's series, until dropped.
pub(super) struct Holding(());

impl Holding {
    /// `None` if the calling thread already holds some thread's series: whatever it records
    /// meanwhile (a subscriber may close an agent span on an event the SDK emits) must go
    /// straight to the SDK, as waiting for a lock this thread holds would never end.
    pub(super) fn take() -> Option<Holding> {
        HOLDING.with(|holding| (!holding.replace(true)).then_some(Holding(())))
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        HOLDING.with(|holding| holding.set(false));
    }
}

/// One thread's recently used series, and the executions it recorded into them that the SDK
/// has not seen yet: they are handed over when enough wait, and before every collection.
#[derive(Default)]
pub(super) struct ThreadSeries {
    /// The series of the last few agent names this thread recorded, by name.
    recent: Vec<(Arc<str>, Arc<AgentSeries>)>,
    /// Waiting for the SDK, each for the series in `recent` at its index.
    pending: Vec<Observation>,
}

struct Observation {
    series: usize,
    status: Status,
    seconds: f64,
}

impl ThreadSeries {
    /// How many agent names a thread keeps the series of.
    const KEPT: usize = 8;

    /// How many executions wait before the thread hands them over itself: a series' cache
    /// lines then cross cores once per this many executions, not once per execution.
    const PENDING: usize = 64;

    /// Where `agent_name`'s series is kept, if this thread recorded it lately.
    pub(super) fn find(&self, agent_name: &Arc<str>) -> Option<usize> {
        // The name is kept alive in `recent`, so its address cannot be reused by another.
        self.recent.iter().position(|(name, _)| Arc::ptr_eq(name, agent_name))
    }

    /// Keeps `series` as `agent_name`'s, in place of the one kept longest; returns where.
    pub(super) fn remember(&mut self, agent_name: Arc<str>, series: Arc<AgentSeries>, to: &Instruments) -> usize {
        // What waits names series by where they are kept, which is about to change.
        self.hand_over(to);
        if self.recent.len() == Self::KEPT {
            self.recent.remove(0);
        }
        self.recent.push((agent_name, series));
        self.recent.len() - 1
    }

    /// Records an execution into the series kept at `series`.
    pub(super) fn record(&mut self, series: usize, status: Status, seconds: f64, to: &Instruments) {
        self.pending.push(Observation {
            series,
            status,
            seconds,
        });
        if self.pending.len() >= Self::PENDING {
            self.hand_over(to);
        }
    }

    /// Records every waiting execution into the SDK's instruments.
    pub(super) fn hand_over(&mut self, to: &Instruments) {
        for Observation {
            series,
            status,
            seconds,
        } in self.pending.drain(..)
        {
            // Always kept: `recent` changes only after a hand-over.
            if let Some((_, series)) = self.recent.get(series) {
                series.record(to, status, seconds);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::SdkMeterProvider;
    use prometheus::{Encoder, TextEncoder};

    use super::*;

    /// Instruments on a provider whose only reader is a Prometheus registry, and no callback:
    /// what the SDK shows is what the thread handed over.
    fn instruments() -> (Instruments, prometheus::Registry, SdkMeterProvider) {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .unwrap();
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("test");
        let instruments = Instruments {
            executions: meter.u64_counter("agent_executions").build(),
            duration: meter.f64_histogram("agent_execution_duration").build(),
        };
        (instruments, registry, provider)
    }

    /// `agent_executions_total` of `agent_name` and `status`, 0 when the SDK has none.
    fn count(registry: &prometheus::Registry, agent_name: &str, status: &str) -> u64 {
        let mut text = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut text).unwrap();
        let series = format!("agent_executions_total{{agent_name=\"{agent_name}\",status=\"{status}\"}} ");
        String::from_utf8(text)
            .unwrap()
            .lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .map_or(0, |value| value.parse().unwrap())
    }

    fn name(agent_name: &str) -> Arc<str> {
        Arc::from(agent_name)
    }

    #[test]
    fn a_thread_holds_series_once_at_a_time() {
        let holding = Holding::take();
        assert!(holding.is_some());
        assert!(Holding::take().is_none(), "not again while held");
        drop(holding);
        assert!(Holding::take().is_some(), "again once let go");
    }

    #[test]
    fn executions_wait_until_enough_do() {
        let (to, registry, _provider) = instruments();
        let mut thread = ThreadSeries::default();
        let backend = name("backend");
        let kept = thread.remember(Arc::clone(&backend), Arc::new(AgentSeries::new("backend")), &to);
        assert_eq!(thread.find(&backend), Some(kept));
        assert_eq!(
            thread.find(&name("backend")),
            None,
            "found by the name kept, not its text"
        );

        for _ in 1..ThreadSeries::PENDING {
            thread.record(kept, Status::Success, 0.2, &to);
        }
        assert_eq!(count(&registry, "backend", "success"), 0, "still waiting");
        thread.record(kept, Status::Success, 0.2, &to);
        assert_eq!(count(&registry, "backend", "success"), ThreadSeries::PENDING as u64);

        thread.record(kept, Status::Failure, 0.2, &to);
        thread.hand_over(&to);
        assert_eq!(count(&registry, "backend", "failure"), 1);
        thread.hand_over(&to);
        assert_eq!(count(&registry, "backend", "failure"), 1, "handed over once");
    }

    #[test]
    fn what_waits_is_handed_over_to_its_own_series_when_another_is_kept() {
        let (to, registry, _provider) = instruments();
        let mut thread = ThreadSeries::default();
        let names: Vec<String> = (0..=ThreadSeries::KEPT).map(|n| format!("agent-{n}")).collect();
        // Each name once, the first again last: by then it was no longer kept.
        for (n, agent_name) in names.iter().chain(&names[..1]).enumerate() {
            let series = Arc::new(AgentSeries::new(agent_name));
            let kept = thread.remember(name(agent_name), series, &to);
            for _ in 0..=n {
                thread.record(kept, Status::Success, 0.2, &to);
            }
        }
        thread.hand_over(&to);
        for (n, agent_name) in names.iter().enumerate() {
            let again = if n == 0 { names.len() + 1 } else { 0 };
            assert_eq!(
                count(&registry, agent_name, "success"),
                (n + 1 + again) as u64,
                "{agent_name}"
            );
        }
        assert_eq!(thread.recent.len(), ThreadSeries::KEPT);
    }
}
