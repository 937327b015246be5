//! How many series each labelled instrument may hold: every combination of the label values
//! the crate's caps admit. The SDK's own limit (2,000 series a metric, whatever the caps)
//! would fold the rest into one `otel_metric_overflow` series with none of the labels,
//! uncounted; with these limits the caps alone decide, and fold into `__overflow__`, counted.

use opentelemetry_sdk::metrics::{Instrument, Stream};

/// The most series one instrument may be sized for: its table is allocated for all of them
/// up front.
pub(crate) const MAX_SERIES: usize = 1 << 20;

/// The series limits of the caps on agent names, model names and their pairs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeriesLimits {
    /// Label values of `agent_name`: the admitted names and `__overflow__`.
    agents: usize,
    /// Label values of `model`: the admitted names and `__overflow__`.
    models: usize,
    /// Pairs of the two: the admitted pairs, and each agent's `__overflow__` model.
    pairs: usize,
}

/// Values of `status`: `success`, `failure`, `cancelled`.
const STATUSES: usize = 3;
/// Values of `type`: `input`, `output`, `cache_read`.
const TOKEN_TYPES: usize = 3;

impl SeriesLimits {
    pub(crate) fn new(max_agent_names: usize, max_model_names: usize, max_agent_models: usize) -> Self {
        let agents = max_agent_names.saturating_add(1);
        let models = max_model_names.saturating_add(1);
        SeriesLimits {
            agents,
            models,
            pairs: agents
                .saturating_mul(models)
                .min(max_agent_models.saturating_add(agents)),
        }
    }

    /// The most series any instrument needs, for the configuration to refuse caps past
    /// [`MAX_SERIES`].
    pub(crate) fn largest(self) -> usize {
        ["agent_executions", "agent_tokens", "agent_model_calls"]
            .into_iter()
            .filter_map(|name| self.of(name))
            .max()
            .unwrap_or(0)
    }

    /// The series `instrument` may hold, `None` for an instrument with no capped label.
    fn of(self, instrument: &str) -> Option<usize> {
        let pairs = self.pairs;
        match instrument {
            "agent_executions" => Some(self.agents.saturating_mul(STATUSES)),
            "agent_execution_duration" => Some(self.agents),
            "agent_tokens" => Some(pairs.saturating_mul(TOKEN_TYPES)),
            "agent_model_calls" => Some(pairs.saturating_mul(STATUSES)),
            "agent_model_call_duration" | "agent_cost_usd" => Some(pairs),
            "agent_telemetry_unpriced_tokens" => Some(self.models),
            _ => None,
        }
    }

    /// The view that sizes each instrument with a capped label for its series.
    pub(super) fn view(self) -> impl Fn(&Instrument) -> Option<Stream> + Send + Sync + 'static {
        move |instrument| {
            let limit = self.of(instrument.name())?.clamp(1, MAX_SERIES);
            Stream::builder().with_cardinality_limit(limit).build().ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_instrument_holds_every_combination_of_its_capped_labels() {
        let limits = SeriesLimits::new(256, 64, usize::MAX);
        assert_eq!(limits.of("agent_executions"), Some(257 * 3));
        assert_eq!(limits.of("agent_execution_duration"), Some(257));
        assert_eq!(limits.of("agent_tokens"), Some(257 * 65 * 3));
        assert_eq!(limits.of("agent_model_calls"), Some(257 * 65 * 3));
        assert_eq!(limits.of("agent_model_call_duration"), Some(257 * 65));
        assert_eq!(limits.of("agent_cost_usd"), Some(257 * 65));
        assert_eq!(limits.of("agent_telemetry_unpriced_tokens"), Some(65));
        assert_eq!(limits.of("framework_info"), None);
        assert_eq!(limits.largest(), 257 * 65 * 3);
        let paired = SeriesLimits::new(256, 64, 512);
        assert_eq!(
            paired.of("agent_tokens"),
            Some((512 + 257) * 3),
            "the pairs, and each agent's overflow"
        );
        assert_eq!(paired.of("agent_executions"), Some(257 * 3));
        let all = SeriesLimits::new(usize::MAX, usize::MAX, usize::MAX);
        assert_eq!(all.largest(), usize::MAX, "saturates");
    }
}
