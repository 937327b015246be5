//! What agents spend, as the OpenTelemetry GenAI conventions name it: the model, provider and
//! token fields a span carries, the spans that are model calls, and an execution's usage
//! rolled up from its own fields and its model calls'.
//!
//! Contracts:
//! - a field is read in its short form or its GenAI form (`input_tokens` or
//!   `gen_ai.usage.input_tokens`); the last value recorded wins;
//! - token fields are non-negative integers; any other value is ignored and counted;
//! - cache reads are part of the input tokens, as the conventions say: the total is input plus
//!   output;
//! - a model call's usage belongs to the nearest enclosing agent execution only, so a nested
//!   agent's usage is never counted in its parent's.

use std::fmt;
use std::sync::Arc;

use tracing_core::field::{Field, Visit};
use tracing_core::Metadata;

use crate::prices::ModelPrices;
use crate::text::{cut, debug_text, shared_name, unquote_debug, MAX_LABEL_CHARS};

/// The model label and field value when a span with tokens names no model.
pub(crate) const UNKNOWN_MODEL: &str = "unknown";

/// The field that marks a span as a GenAI operation.
pub(crate) const OPERATION_FIELD: &str = "gen_ai.operation.name";

/// The operations that are model calls: a span whose [`OPERATION_FIELD`] (or, without one,
/// whose name) is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelCallOperation {
    Chat,
    TextCompletion,
    GenerateContent,
    Embeddings,
}

impl ModelCallOperation {
    const ALL: [ModelCallOperation; 4] = [
        ModelCallOperation::Chat,
        ModelCallOperation::TextCompletion,
        ModelCallOperation::GenerateContent,
        ModelCallOperation::Embeddings,
    ];

    /// The conventions' value of [`OPERATION_FIELD`].
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ModelCallOperation::Chat => "chat",
            ModelCallOperation::TextCompletion => "text_completion",
            ModelCallOperation::GenerateContent => "generate_content",
            ModelCallOperation::Embeddings => "embeddings",
        }
    }
}

/// The model-call operation `text` names, if it names one.
pub(crate) fn model_call_operation(text: &str) -> Option<ModelCallOperation> {
    ModelCallOperation::ALL
        .into_iter()
        .find(|operation| operation.as_str() == text)
}

/// Whether spans of this callsite may be GenAI spans: named as a model-call operation, or
/// with an [`OPERATION_FIELD`] field whose value decides.
pub(crate) fn may_be_gen_ai(metadata: &Metadata<'_>) -> bool {
    model_call_operation(metadata.name()).is_some() || metadata.fields().field(OPERATION_FIELD).is_some()
}

pub(crate) use crate::prices::Tokens;

/// The GenAI fields of a span, as recorded so far: model and provider cut at
/// [`MAX_LABEL_CHARS`], tokens as the last valid value recorded.
#[derive(Debug, Default)]
pub(crate) struct UsageFields {
    pub model: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    /// The [`OPERATION_FIELD`] value, cut at [`MAX_LABEL_CHARS`].
    pub operation: Option<Box<str>>,
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    /// Token fields whose value was not a non-negative integer.
    pub invalid: u32,
}

/// Which token count a field sets.
#[derive(Clone, Copy)]
enum TokenField {
    Input,
    Output,
    CacheRead,
}

impl UsageFields {
    /// Whether `field` is one of the GenAI fields this module reads.
    pub(crate) fn owns(name: &str) -> bool {
        matches!(
            name,
            "model"
                | "gen_ai.request.model"
                | "provider"
                | "gen_ai.provider.name"
                | OPERATION_FIELD
                | "input_tokens"
                | "gen_ai.usage.input_tokens"
                | "output_tokens"
                | "gen_ai.usage.output_tokens"
                | "cache_read_tokens"
                | "gen_ai.usage.cache_read.input_tokens"
        )
    }

    fn token_field(field: &Field) -> Option<TokenField> {
        match field.name() {
            "input_tokens" | "gen_ai.usage.input_tokens" => Some(TokenField::Input),
            "output_tokens" | "gen_ai.usage.output_tokens" => Some(TokenField::Output),
            "cache_read_tokens" | "gen_ai.usage.cache_read.input_tokens" => Some(TokenField::CacheRead),
            _ => None,
        }
    }

    /// Whether any token field was recorded.
    pub(crate) fn has_tokens(&self) -> bool {
        self.input.is_some() || self.output.is_some() || self.cache_read.is_some()
    }

    /// The tokens recorded, zero where none was.
    pub(crate) fn tokens(&self) -> Tokens {
        Tokens {
            input: self.input.unwrap_or(0),
            output: self.output.unwrap_or(0),
            cache_read: self.cache_read.unwrap_or(0),
        }
    }

    /// A field's integer value; `None` for a negative one.
    fn record_count(&mut self, field: &Field, value: Option<u64>) {
        let Some(which) = Self::token_field(field) else {
            // An integer model or provider name: kept as its text.
            if let Some(value) = value {
                self.record_text(field, itoa::Buffer::new().format(value));
            }
            return;
        };
        let Some(value) = value else {
            self.invalid = self.invalid.saturating_add(1);
            return;
        };
        match which {
            TokenField::Input => self.input = Some(value),
            TokenField::Output => self.output = Some(value),
            TokenField::CacheRead => self.cache_read = Some(value),
        }
    }

    /// A field's text value: a name, or an invalid token count.
    fn record_text(&mut self, field: &Field, text: &str) {
        let label = || shared_name(&cut(text, MAX_LABEL_CHARS));
        match field.name() {
            "model" | "gen_ai.request.model" => self.model = Some(label()),
            "provider" | "gen_ai.provider.name" => self.provider = Some(label()),
            OPERATION_FIELD => self.operation = Some(cut(text, MAX_LABEL_CHARS).into()),
            _ => self.invalid = self.invalid.saturating_add(1),
        }
    }
}

impl Visit for UsageFields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record_count(field, Some(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_count(field, u64::try_from(value).ok());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_text(field, value);
    }

    /// Anything else: a name as its text (`?model` unquoted), a token count as invalid.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if Self::token_field(field).is_some() {
            self.invalid = self.invalid.saturating_add(1);
        } else {
            let text = debug_text(value, MAX_LABEL_CHARS.saturating_mul(2).saturating_add(2));
            self.record_text(field, &unquote_debug(text));
        }
    }
}

/// The tokens of one model in one execution, and what they cost.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelUsage {
    pub model: Arc<str>,
    pub tokens: Tokens,
    /// `None` when the model has no price.
    pub cost_usd: Option<f64>,
}

/// What a closed agent execution used: its own fields plus its model calls'.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Usage {
    /// The execution's own model, else its first model call's.
    pub model: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    /// Whether any token field was recorded, on the execution or a model call.
    pub has_tokens: bool,
    pub tokens: Tokens,
    pub by_model: Vec<ModelUsage>,
    /// The cost of the priced models' tokens; `None` when none was priced.
    pub cost_usd: Option<f64>,
}

/// An agent execution's usage as its model calls end, by model.
#[derive(Debug, Default)]
pub(crate) struct Rollup {
    /// By model, priced when finished.
    calls: Vec<ModelUsage>,
    first_model: Option<Arc<str>>,
    first_provider: Option<Arc<str>>,
    has_tokens: bool,
}

impl Rollup {
    /// Adds a model call's usage under `model` (already resolved).
    pub(crate) fn add_call(&mut self, model: &Arc<str>, provider: Option<&Arc<str>>, fields: &UsageFields) {
        self.first_model.get_or_insert_with(|| Arc::clone(model));
        if let Some(provider) = provider {
            self.first_provider.get_or_insert_with(|| Arc::clone(provider));
        }
        if !fields.has_tokens() {
            return;
        }
        self.has_tokens = true;
        add_to(&mut self.calls, model, fields.tokens());
    }

    /// The execution's usage: its own `fields` (under its model, else `unknown`) plus its
    /// calls', priced by `prices`. `None` when nothing GenAI was recorded.
    pub(crate) fn finish(self, fields: &UsageFields, prices: Option<&ModelPrices>) -> Option<Box<Usage>> {
        let Rollup {
            mut calls,
            first_model,
            first_provider,
            has_tokens,
        } = self;
        let own_model = fields.model.clone();
        if fields.has_tokens() {
            let model = own_model.clone().unwrap_or_else(|| Arc::from(UNKNOWN_MODEL));
            add_to(&mut calls, &model, fields.tokens());
        }
        let has_tokens = has_tokens || fields.has_tokens();
        let model = own_model.or(first_model);
        let provider = fields.provider.clone().or(first_provider);
        if !has_tokens && model.is_none() && provider.is_none() {
            return None;
        }
        let mut tokens = Tokens::default();
        let mut cost_usd = None::<f64>;
        for used in &mut calls {
            tokens.add(used.tokens);
            used.cost_usd = prices.and_then(|prices| prices.cost_usd(&used.model, used.tokens));
            if let Some(cost) = used.cost_usd {
                *cost_usd.get_or_insert(0.0) += cost;
            }
        }
        Some(Box::new(Usage {
            model,
            provider,
            has_tokens,
            tokens,
            by_model: calls,
            cost_usd,
        }))
    }
}

fn add_to(calls: &mut Vec<ModelUsage>, model: &Arc<str>, tokens: Tokens) {
    match calls.iter_mut().find(|known| known.model == *model) {
        Some(known) => known.tokens.add(tokens),
        None => calls.push(ModelUsage {
            model: Arc::clone(model),
            tokens,
            cost_usd: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prices::{ModelPrice, ModelPrices};

    fn field(name: &'static str) -> Field {
        struct Callsite;
        impl tracing_core::Callsite for Callsite {
            fn set_interest(&self, _: tracing_core::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!("the test reads field names only")
            }
        }
        static CALLSITE: Callsite = Callsite;
        let names: &'static [&'static str] = Box::leak(Box::new([name]));
        tracing_core::field::FieldSet::new(names, tracing_core::identify_callsite!(&CALLSITE))
            .field(name)
            .expect("the field was just named")
    }

    #[test]
    fn both_forms_are_read_and_the_last_value_wins() {
        let mut fields = UsageFields::default();
        fields.record_count(&field("input_tokens"), Some(10));
        fields.record_count(&field("gen_ai.usage.input_tokens"), Some(12));
        fields.record_count(&field("output_tokens"), Some(3));
        fields.record_text(&field("gen_ai.request.model"), "gpt-4o");
        assert_eq!(
            fields.tokens(),
            Tokens {
                input: 12,
                output: 3,
                cache_read: 0
            }
        );
        assert_eq!(fields.model.as_deref(), Some("gpt-4o"));
        assert_eq!(fields.invalid, 0);
    }

    #[test]
    fn anything_but_a_non_negative_integer_is_ignored_and_counted() {
        let mut fields = UsageFields::default();
        fields.record_i64(&field("input_tokens"), -1);
        fields.record_str(&field("output_tokens"), "12");
        fields.record_f64(&field("cache_read_tokens"), 1.5);
        fields.record_debug(&field("model"), &"gpt-4o");
        assert_eq!(fields.model.as_deref(), Some("gpt-4o"), "unquoted");
        assert!(!fields.has_tokens());
        assert_eq!(fields.invalid, 3);
    }

    #[test]
    fn usage_rolls_up_by_model_and_is_priced() {
        let (gpt, claude): (Arc<str>, Arc<str>) = (Arc::from("gpt-4o"), Arc::from("claude"));
        let mut call = UsageFields::default();
        call.record_count(&field("input_tokens"), Some(1_000_000));
        call.record_count(&field("output_tokens"), Some(10));
        call.record_count(&field("cache_read_tokens"), Some(400_000));
        let mut rollup = Rollup::default();
        rollup.add_call(&gpt, None, &call);
        rollup.add_call(&gpt, None, &call);
        rollup.add_call(&claude, None, &call);
        let own = UsageFields::default();
        let prices =
            ModelPrices::new().with_model("gpt-4o", ModelPrice::per_million_tokens(2.0, 8.0).with_cache_read(1.0));
        let usage = rollup.finish(&own, Some(&prices)).expect("usage was recorded");
        assert_eq!(usage.model.as_deref(), Some("gpt-4o"), "the first call's");
        assert_eq!(usage.tokens.input, 3_000_000);
        assert_eq!(usage.tokens.total(), 3_000_030, "cache reads are part of the input");
        assert_eq!(usage.by_model.len(), 2);
        // 2 × (600k × 2 + 400k × 1 + 10 × 8) / 1M
        let cost = 2.0 * (0.6 * 2.0 + 0.4 * 1.0 + 10.0 * 8.0 / 1e6);
        assert!((usage.cost_usd.unwrap() - cost).abs() < 1e-12, "{usage:?}");
        assert_eq!(usage.by_model[1].cost_usd, None, "claude has no price");
    }

    #[test]
    fn an_execution_with_tokens_and_no_model_counts_under_unknown() {
        let mut own = UsageFields::default();
        own.record_count(&field("input_tokens"), Some(5));
        let usage = Rollup::default().finish(&own, None).expect("tokens were recorded");
        assert_eq!(&*usage.by_model[0].model, UNKNOWN_MODEL);
        assert_eq!(usage.model, None);
        assert!(Rollup::default().finish(&UsageFields::default(), None).is_none());
    }
}
