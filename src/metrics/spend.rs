//! The GenAI metrics: tokens, model calls and spend per agent and model.
//!
//! Each `(agent_name, model)` pair has its series bound on first use, so recording is an
//! atomic add (a histogram update under its series' lock), with no attribute lookup. Both
//! labels are capped: `agent_name` by the executions' cap, `model` by its own; values past a
//! cap are folded into `__overflow__` and counted.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use thread_local::ThreadLocal;

use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter, Histogram, Meter};
use opentelemetry::KeyValue;

use super::capped_names::CappedNames;
use super::OVERFLOW_AGENT_NAME;
use crate::gen_ai::{ModelUsage, Usage};
use crate::stats::TelemetryStats;
use crate::status::Status;

/// The GenAI conventions' bucket bounds for `gen_ai.client.operation.duration`, in seconds.
pub(crate) const MODEL_CALL_DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

/// Token counters count in `f64`, as Prometheus stores them: exact to 2^53, and past that
/// they stop growing rather than wrap round to a reset, as a `u64` sum would past 2^64.
struct SpendInstruments {
    tokens: Counter<f64>,
    calls: Counter<u64>,
    call_duration: Histogram<f64>,
    cost: Counter<f64>,
    unpriced: Counter<f64>,
}

/// The series of one agent and one model, each bound on first use.
struct ModelSeries {
    labels: [KeyValue; 2],
    input: OnceLock<BoundCounter<f64>>,
    output: OnceLock<BoundCounter<f64>>,
    cache_read: OnceLock<BoundCounter<f64>>,
    cost: OnceLock<BoundCounter<f64>>,
    succeeded: OnceLock<BoundCounter<u64>>,
    failed: OnceLock<BoundCounter<u64>>,
    cancelled: OnceLock<BoundCounter<u64>>,
    duration: OnceLock<BoundHistogram<f64>>,
}

impl ModelSeries {
    fn new(agent_name: KeyValue, model: &str) -> Self {
        ModelSeries {
            labels: [agent_name, KeyValue::new("model", model.to_owned())],
            input: OnceLock::new(),
            output: OnceLock::new(),
            cache_read: OnceLock::new(),
            cost: OnceLock::new(),
            succeeded: OnceLock::new(),
            failed: OnceLock::new(),
            cancelled: OnceLock::new(),
            duration: OnceLock::new(),
        }
    }

    fn add_tokens(&self, to: &Counter<f64>, slot: &OnceLock<BoundCounter<f64>>, kind: &'static str, tokens: u64) {
        if tokens > 0 {
            slot.get_or_init(|| to.bind(&self.with(KeyValue::new("type", kind))))
                .add(as_count(tokens));
        }
    }

    fn with(&self, third: KeyValue) -> [KeyValue; 3] {
        [self.labels[0].clone(), self.labels[1].clone(), third]
    }
}

/// `tokens` as a counter adds them: exact to 2^53, the most a token field carries.
#[allow(
    clippy::cast_precision_loss,
    reason = "exact to 2^53; a sum past that is kept approximately"
)]
fn as_count(tokens: u64) -> f64 {
    tokens as f64
}

/// One agent's series, by model.
type ByModel = HashMap<Box<str>, Arc<ModelSeries>>;

/// Every agent's series, and how many pairs of an agent and a model (not `__overflow__`)
/// they hold.
#[derive(Default)]
struct ByAgent {
    agents: HashMap<Box<str>, ByModel>,
    pairs: usize,
}

/// A series a thread used lately, by the agent name and model it was asked for.
struct Recent {
    agent: Box<str>,
    model: Box<str>,
    series: Arc<ModelSeries>,
}

/// How many series each thread keeps at hand.
const RECENT: usize = 16;

/// Turns an agent name into its label, capped.
pub(crate) type AdmitAgent<'a> = &'a dyn Fn(&str) -> KeyValue;

/// Tokens, model calls and spend, by agent and model.
pub(crate) struct SpendMetrics {
    instruments: SpendInstruments,
    /// Agents and models are few and repeat: each thread finds its series here without a lock.
    recent: ThreadLocal<RefCell<Vec<Recent>>>,
    /// By agent name, then model.
    series: RwLock<ByAgent>,
    /// The model names admitted under the cap.
    models: CappedNames<()>,
    /// The most pairs of an agent and a model (not `__overflow__`) kept apart.
    max_pairs: usize,
    /// Whether prices are configured: only then are unpriced tokens counted.
    priced: bool,
    stats: Arc<TelemetryStats>,
}

impl SpendMetrics {
    pub(crate) fn new(
        meter: &Meter,
        max_models: usize,
        max_pairs: usize,
        priced: bool,
        stats: Arc<TelemetryStats>,
    ) -> Self {
        let instruments = SpendInstruments {
            tokens: meter
                .f64_counter("agent_tokens")
                .with_description(
                    "Tokens used by agent executions, by type: input (cache reads included), output, cache_read",
                )
                .build(),
            calls: meter
                .u64_counter("agent_model_calls")
                .with_description("Model calls made by agent executions")
                .build(),
            call_duration: meter
                .f64_histogram("agent_model_call_duration")
                .with_description("Model call duration")
                .with_unit("s")
                .with_boundaries(MODEL_CALL_DURATION_BUCKETS.to_vec())
                .build(),
            cost: meter
                .f64_counter("agent_cost_usd")
                .with_description("Spend of agent executions in USD, at the configured model prices")
                .build(),
            unpriced: meter
                .f64_counter("agent_telemetry_unpriced_tokens")
                .with_description("Tokens (input and output) of models without a configured price")
                .build(),
        };
        SpendMetrics {
            instruments,
            recent: ThreadLocal::new(),
            series: RwLock::default(),
            models: CappedNames::new(max_models),
            max_pairs,
            priced,
            stats,
        }
    }

    /// Counts an execution's tokens and spend under `agent_name`, its label made by `admit`.
    pub(crate) fn record_usage(&self, agent_name: &str, admit: AdmitAgent<'_>, usage: &Usage) {
        let to = &self.instruments;
        for ModelUsage {
            model,
            tokens,
            cost_usd,
        } in &usage.by_model
        {
            let series = self.recent_series(agent_name, model, admit);
            series.add_tokens(&to.tokens, &series.input, "input", tokens.input);
            series.add_tokens(&to.tokens, &series.output, "output", tokens.output);
            series.add_tokens(&to.tokens, &series.cache_read, "cache_read", tokens.cache_read);
            match cost_usd {
                Some(cost) => series.cost.get_or_init(|| to.cost.bind(&series.labels)).add(*cost),
                None if self.priced && tokens.total() > 0 => {
                    to.unpriced.add(as_count(tokens.total()), &series.labels[1..]);
                }
                None => {}
            }
        }
    }

    /// Counts a model call that ended with `status` after `seconds`.
    pub(crate) fn record_call(
        &self,
        agent_name: &str,
        admit: AdmitAgent<'_>,
        model: &str,
        status: Status,
        seconds: f64,
    ) {
        let to = &self.instruments;
        let series = self.recent_series(agent_name, model, admit);
        let slot = match status {
            Status::Success => &series.succeeded,
            Status::Failure => &series.failed,
            Status::Cancelled => &series.cancelled,
        };
        slot.get_or_init(|| to.calls.bind(&series.with(KeyValue::new("status", status.as_str()))))
            .add(1);
        series
            .duration
            .get_or_init(|| to.call_duration.bind(&series.labels))
            .record(seconds);
    }

    /// The series of `agent_name` and `model`, from those the calling thread used lately.
    fn recent_series(&self, agent_name: &str, model: &str, admit: AdmitAgent<'_>) -> Arc<ModelSeries> {
        let recent = self.recent.get_or_default();
        // Not borrowed: recording never calls back into itself.
        if let Ok(recent) = recent.try_borrow() {
            let found = recent
                .iter()
                .find(|known| *known.agent == *agent_name && *known.model == *model);
            if let Some(known) = found {
                return Arc::clone(&known.series);
            }
        }
        let series = self.series(&admit(agent_name), model);
        // Folded models are not kept: `model_label` counts each of their recordings.
        let folded = series.labels[1].value.as_str() == OVERFLOW_AGENT_NAME && model != OVERFLOW_AGENT_NAME;
        if folded {
            return series;
        }
        if let Ok(mut recent) = recent.try_borrow_mut() {
            if recent.len() == RECENT {
                recent.remove(0);
            }
            recent.push(Recent {
                agent: agent_name.into(),
                model: model.into(),
                series: Arc::clone(&series),
            });
        }
        series
    }

    /// The series of `agent_name` (its label) and `model`; past the model cap, or the cap on
    /// pairs, the model's label is [`OVERFLOW_AGENT_NAME`].
    fn series(&self, agent_name: &KeyValue, model: &str) -> Arc<ModelSeries> {
        let model = self.model_label(model);
        let agent = agent_name.value.as_str();
        // A poisoned lock only means another thread panicked mid-insert; the map is intact.
        let found = self
            .series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .agents
            .get(agent.as_ref())
            .and_then(|models| models.get(model))
            .map(Arc::clone);
        found.unwrap_or_else(|| {
            let mut series = self.series.write().unwrap_or_else(PoisonError::into_inner);
            let ByAgent { agents, pairs } = &mut *series;
            let models = agents.entry(agent.as_ref().into()).or_default();
            let model = if model != OVERFLOW_AGENT_NAME && !models.contains_key(model) && *pairs >= self.max_pairs {
                TelemetryStats::add(&self.stats.model_names_overflowed, 1);
                OVERFLOW_AGENT_NAME
            } else {
                model
            };
            Arc::clone(models.entry(model.into()).or_insert_with(|| {
                if model != OVERFLOW_AGENT_NAME {
                    *pairs += 1;
                }
                Arc::new(ModelSeries::new(agent_name.clone(), model))
            }))
        })
    }

    /// `model`, or [`OVERFLOW_AGENT_NAME`] once `max_models` other names were admitted.
    fn model_label<'a>(&self, model: &'a str) -> &'a str {
        if self.models.get_or_admit(model, || ()).is_some() {
            return model;
        }
        TelemetryStats::add(&self.stats.model_names_overflowed, 1);
        OVERFLOW_AGENT_NAME
    }
}
