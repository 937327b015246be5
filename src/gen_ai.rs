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

use crate::prices::{ModelPrices, Tokens};
use crate::scrub::HELD_LABEL_CHARS;
use crate::status::Status;
use crate::text::{cut, debug_text, held_name, unquote_debug, MAX_LABEL_CHARS, OVERFLOW_AGENT_NAME};

/// The largest token count a field may carry: past 2^53 a Prometheus sample (a float) is no
/// longer exact. A larger one is ignored and counted, as any invalid value.
pub(crate) const MAX_TOKENS: u64 = 1 << 53;

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

/// The GenAI fields of a span, as recorded so far: model and provider held to
/// [`HELD_LABEL_CHARS`] (scrubbed and cut to a label as the execution closes), tokens as the
/// last valid value recorded.
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
    /// No field recorded.
    pub(crate) const NONE: UsageFields = UsageFields {
        model: None,
        provider: None,
        operation: None,
        input: None,
        output: None,
        cache_read: None,
        invalid: 0,
    };

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

    /// An integer field: a token count, or a model or provider name as its text.
    fn record_integer<I: itoa::Integer + TryInto<u64>>(&mut self, field: &Field, value: I) {
        let Some(which) = Self::token_field(field) else {
            return self.record_text(field, itoa::Buffer::new().format(value));
        };
        let Some(value) = value.try_into().ok().filter(|value| *value <= MAX_TOKENS) else {
            self.invalid = self.invalid.saturating_add(1);
            return;
        };
        match which {
            TokenField::Input => self.input = Some(value),
            TokenField::Output => self.output = Some(value),
            TokenField::CacheRead => self.cache_read = Some(value),
        }
    }

    /// A field's text value: a name (none when empty or blank), or an invalid token count.
    fn record_text(&mut self, field: &Field, text: &str) {
        match field.name() {
            "model" | "gen_ai.request.model" => self.model = held_name(text),
            "provider" | "gen_ai.provider.name" => self.provider = held_name(text),
            OPERATION_FIELD => self.operation = Some(cut(text, MAX_LABEL_CHARS).into()),
            _ => self.invalid = self.invalid.saturating_add(1),
        }
    }
}

impl Visit for UsageFields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record_integer(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_integer(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.record_integer(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.record_integer(field, value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_text(field, value);
    }

    /// Anything else: a name as its text (`?model` unquoted), a token count as invalid.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if Self::token_field(field).is_some() {
            self.invalid = self.invalid.saturating_add(1);
        } else {
            let text = debug_text(value, HELD_LABEL_CHARS.saturating_mul(2).saturating_add(2));
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
#[derive(Debug, Clone, Default, PartialEq)]
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
    /// The model calls that ended inside the execution, under their model as resolved when
    /// it ended: counted then, under its final agent name.
    pub calls: Vec<EndedCall<Arc<str>>>,
}

/// A model call that ended: its model (`M` is `Option` until resolved), its outcome and its
/// duration.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EndedCall<M> {
    pub model: M,
    pub status: Status,
    pub seconds: f64,
}

/// The most model calls an execution holds until it ends; later ones are counted as they
/// end, under the execution's name and model as recorded by then.
pub(crate) const MAX_HELD_CALLS: usize = 4096;

/// The most models an execution, or a model call with calls inside it, keeps tokens of
/// apart; the tokens of further models are kept under [`OVERFLOW_AGENT_NAME`], unpriced.
pub(crate) const MAX_MODELS_APART: usize = 256;

/// Tokens under a model; `None` until the enclosing span's model decides.
type Part = (Option<Arc<str>>, Tokens);

/// What an agent execution, or a model call with calls inside it, gathers from the model
/// calls inside it as they end.
#[derive(Debug, Default)]
pub(crate) struct Rollup {
    parts: Vec<Part>,
    first_model: Option<Arc<str>>,
    first_provider: Option<Arc<str>>,
    has_tokens: bool,
    calls: Vec<EndedCall<Option<Arc<str>>>>,
}

/// What a model call hands to the span it ends in: its model and provider, and its tokens by
/// model (its own when it recorded any, else those of the calls inside it).
#[derive(Debug, Default)]
pub(crate) struct CallUsage {
    pub model: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    pub has_tokens: bool,
    parts: Vec<Part>,
}

impl CallUsage {
    /// Whether the call recorded anything GenAI.
    fn is_empty(&self) -> bool {
        !self.has_tokens && self.model.is_none() && self.provider.is_none()
    }

    /// The call's usage for its own span: its model, provider and total tokens. `None` when
    /// it recorded nothing GenAI.
    pub(crate) fn span_usage(&self) -> Option<Box<Usage>> {
        if self.is_empty() {
            return None;
        }
        let mut tokens = Tokens::default();
        for (_, part) in &self.parts {
            tokens.add(*part);
        }
        Some(Box::new(Usage {
            model: self.model.clone(),
            provider: self.provider.clone(),
            has_tokens: self.has_tokens,
            tokens,
            ..Usage::default()
        }))
    }

    /// The call's usage for its span and for the metrics, by model (no model: `unknown`) and
    /// priced by `prices`: for a call that ended in no execution. `None` when it recorded
    /// nothing GenAI.
    pub(crate) fn counted_usage(&self, prices: Option<&ModelPrices>) -> Option<Box<Usage>> {
        if self.is_empty() {
            return None;
        }
        let mut rollup = Rollup::default();
        rollup.add(self);
        let fields = UsageFields {
            model: self.model.clone(),
            provider: self.provider.clone(),
            ..UsageFields::default()
        };
        let mut usage = rollup.finish(&fields, prices)?;
        usage.model.clone_from(&self.model);
        Some(usage)
    }
}

impl Rollup {
    /// Adds what a model call inside it hands over.
    pub(crate) fn add(&mut self, call: &CallUsage) {
        if let Some(model) = &call.model {
            self.first_model.get_or_insert_with(|| Arc::clone(model));
        }
        if let Some(provider) = &call.provider {
            self.first_provider.get_or_insert_with(|| Arc::clone(provider));
        }
        self.has_tokens |= call.has_tokens;
        for (model, tokens) in &call.parts {
            add_to(&mut self.parts, model.as_ref(), *tokens);
        }
    }

    /// Holds a model call that ended inside it until it ends itself; gives the call back when
    /// [`MAX_HELD_CALLS`] are held.
    pub(crate) fn hold(&mut self, call: EndedCall<Option<Arc<str>>>) -> Option<EndedCall<Option<Arc<str>>>> {
        if self.calls.len() >= MAX_HELD_CALLS {
            return Some(call);
        }
        self.calls.push(call);
        None
    }

    /// What a model call with these `fields` hands over as it ends: its own tokens when it
    /// recorded any (the calls inside it then reported the same request), under its model,
    /// else the first the calls inside it named; else what the calls inside it gathered,
    /// under its model where they named none.
    pub(crate) fn into_call(self, fields: &UsageFields) -> CallUsage {
        let model = fields.model.clone().or(self.first_model);
        let provider = fields.provider.clone().or(self.first_provider);
        if fields.has_tokens() {
            return CallUsage {
                parts: vec![(model.clone(), fields.tokens())],
                model,
                provider,
                has_tokens: true,
            };
        }
        let mut parts = self.parts;
        for (unnamed, _) in parts.iter_mut().filter(|(model, _)| model.is_none()) {
            unnamed.clone_from(&fields.model);
        }
        CallUsage {
            model,
            provider,
            has_tokens: self.has_tokens,
            parts,
        }
    }

    /// The execution's usage: its own `fields` plus its calls', each under its model, else the
    /// execution's, else `unknown`; priced by `prices`. `None` when nothing GenAI was recorded.
    pub(crate) fn finish(self, fields: &UsageFields, prices: Option<&ModelPrices>) -> Option<Box<Usage>> {
        let Rollup {
            mut parts,
            first_model,
            first_provider,
            has_tokens,
            calls,
        } = self;
        if fields.has_tokens() {
            add_to(&mut parts, None, fields.tokens());
        }
        let has_tokens = has_tokens || fields.has_tokens();
        let own_model = fields.model.clone();
        let model = own_model.clone().or(first_model);
        let provider = fields.provider.clone().or(first_provider);
        if !has_tokens && model.is_none() && provider.is_none() && calls.is_empty() {
            return None;
        }
        let resolve = |model: Option<Arc<str>>| {
            model
                .or_else(|| own_model.clone())
                .unwrap_or_else(|| Arc::from(UNKNOWN_MODEL))
        };
        let mut by_model: Vec<ModelUsage> = Vec::with_capacity(parts.len());
        for (model, tokens) in parts {
            let model = resolve(model);
            match by_model.iter_mut().find(|known| known.model == model) {
                Some(known) => known.tokens.add(tokens),
                None => by_model.push(ModelUsage {
                    model,
                    tokens,
                    cost_usd: None,
                }),
            }
        }
        let mut total = Tokens::default();
        let mut cost_usd = None::<f64>;
        for used in &mut by_model {
            total.add(used.tokens);
            used.cost_usd = prices.and_then(|prices| prices.cost_usd(&used.model, used.tokens));
            if let Some(cost) = used.cost_usd {
                let sum = cost_usd.get_or_insert(0.0);
                *sum = (*sum + cost).min(f64::MAX);
            }
        }
        let calls = calls
            .into_iter()
            .map(|call| EndedCall {
                model: resolve(call.model),
                status: call.status,
                seconds: call.seconds,
            })
            .collect();
        Some(Box::new(Usage {
            model,
            provider,
            has_tokens,
            tokens: total,
            by_model,
            cost_usd,
            calls,
        }))
    }
}

/// Adds `tokens` under `model` to `parts`: under [`OVERFLOW_AGENT_NAME`] once
/// [`MAX_MODELS_APART`] models are kept (the part without a model is not counted among them).
fn add_to(parts: &mut Vec<Part>, model: Option<&Arc<str>>, tokens: Tokens) {
    if let Some((_, sum)) = parts.iter_mut().find(|(known, _)| known.as_ref() == model) {
        return sum.add(tokens);
    }
    let named = parts.iter().filter(|(known, _)| known.is_some()).count();
    if model.is_none() || named < MAX_MODELS_APART {
        return parts.push((model.cloned(), tokens));
    }
    let overflow = |(known, _): &&mut Part| known.as_deref() == Some(OVERFLOW_AGENT_NAME);
    match parts.iter_mut().find(overflow) {
        Some((_, sum)) => sum.add(tokens),
        None => parts.push((Some(Arc::from(OVERFLOW_AGENT_NAME)), tokens)),
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
        fields.record_integer(&field("input_tokens"), 10_u64);
        fields.record_integer(&field("gen_ai.usage.input_tokens"), 12_u64);
        fields.record_integer(&field("output_tokens"), 3_u64);
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
        fields.record_u64(&field("input_tokens"), MAX_TOKENS + 1);
        fields.record_debug(&field("model"), &"gpt-4o");
        assert_eq!(fields.model.as_deref(), Some("gpt-4o"), "unquoted");
        assert!(!fields.has_tokens());
        assert_eq!(fields.invalid, 4);
    }

    #[test]
    fn usage_rolls_up_by_model_and_is_priced() {
        let call = |model: &str| {
            let mut fields = UsageFields::default();
            fields.record_text(&field("model"), model);
            fields.record_integer(&field("input_tokens"), 1_000_000_u64);
            fields.record_integer(&field("output_tokens"), 10_u64);
            fields.record_integer(&field("cache_read_tokens"), 400_000_u64);
            Rollup::default().into_call(&fields)
        };
        let mut rollup = Rollup::default();
        for model in ["gpt-4o", "gpt-4o", "claude"] {
            rollup.add(&call(model));
        }
        let prices =
            ModelPrices::new().with_model("gpt-4o", ModelPrice::per_million_tokens(2.0, 8.0).with_cache_read(1.0));
        let usage = rollup
            .finish(&UsageFields::default(), Some(&prices))
            .expect("usage was recorded");
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
    fn a_call_inside_a_call_is_part_of_it_and_counted_once() {
        let tokens = |input| {
            let mut fields = UsageFields::default();
            fields.record_integer(&field("input_tokens"), input);
            fields
        };
        // The outer call recorded its tokens: the inner one's are the same request.
        let mut outer = Rollup::default();
        outer.add(&Rollup::default().into_call(&tokens(100)));
        let reported = outer.into_call(&tokens(100));
        // It recorded none: the inner one's are its own, under its model.
        let mut quiet = Rollup::default();
        quiet.add(&Rollup::default().into_call(&tokens(70)));
        let mut named = UsageFields::default();
        named.record_text(&field("model"), "gpt-4o");
        let quiet = quiet.into_call(&named);
        let mut agent = Rollup::default();
        agent.add(&reported);
        agent.add(&quiet);
        let usage = agent.finish(&UsageFields::default(), None).unwrap();
        assert_eq!(usage.tokens.input, 170);
        let by_model: Vec<(&str, u64)> = usage
            .by_model
            .iter()
            .map(|used| (&*used.model, used.tokens.input))
            .collect();
        assert_eq!(by_model, [(UNKNOWN_MODEL, 100), ("gpt-4o", 70)]);
    }

    #[test]
    fn calls_are_held_until_the_execution_ends_and_resolved_to_its_model() {
        let mut agent = Rollup::default();
        for _ in 0..MAX_HELD_CALLS {
            let held = agent.hold(EndedCall {
                model: None,
                status: Status::Success,
                seconds: 0.5,
            });
            assert!(held.is_none());
        }
        let full = EndedCall {
            model: None,
            status: Status::Failure,
            seconds: 1.0,
        };
        assert_eq!(agent.hold(full.clone()), Some(full), "given back once full");
        let mut own = UsageFields::default();
        own.record_text(&field("model"), "recorded-late");
        let usage = agent.finish(&own, None).unwrap();
        assert_eq!(usage.calls.len(), MAX_HELD_CALLS);
        assert_eq!(&*usage.calls[0].model, "recorded-late");
    }

    #[test]
    fn tokens_of_models_past_the_cap_are_kept_under_overflow_and_the_totals_stay_exact() {
        let call = |model: String, input: u64| {
            let mut fields = UsageFields::default();
            fields.record_text(&field("model"), &model);
            fields.record_integer(&field("input_tokens"), input);
            Rollup::default().into_call(&fields)
        };
        let mut agent = Rollup::default();
        for round in 0..2 {
            for n in 0..MAX_MODELS_APART + 10 {
                agent.add(&call(format!("model-{n}"), 1 + round));
            }
        }
        // Without a model, the agent's own: not counted among the kept models.
        agent.add(&Rollup::default().into_call(&{
            let mut fields = UsageFields::default();
            fields.record_integer(&field("input_tokens"), 1000_u64);
            fields
        }));
        let prices = ModelPrices::new().with_model("model-0", ModelPrice::per_million_tokens(1.0, 1.0));
        let usage = agent.finish(&UsageFields::default(), Some(&prices)).unwrap();
        assert_eq!(usage.tokens.input, 3 * (MAX_MODELS_APART as u64 + 10) + 1000);
        assert_eq!(
            usage.by_model.len(),
            MAX_MODELS_APART + 2,
            "the kept, unknown and overflow"
        );
        let input = |model: &str| {
            let used = usage.by_model.iter().find(|used| &*used.model == model).unwrap();
            (used.tokens.input, used.cost_usd)
        };
        assert_eq!(input("model-0"), (3, Some(3.0 / 1e6)));
        assert_eq!(input(&format!("model-{}", MAX_MODELS_APART - 1)), (3, None));
        assert_eq!(input(UNKNOWN_MODEL), (1000, None));
        assert_eq!(input(OVERFLOW_AGENT_NAME), (30, None));
    }

    #[test]
    fn an_execution_with_tokens_and_no_model_counts_under_unknown() {
        let mut own = UsageFields::default();
        own.record_integer(&field("input_tokens"), 5_u64);
        let usage = Rollup::default().finish(&own, None).expect("tokens were recorded");
        assert_eq!(&*usage.by_model[0].model, UNKNOWN_MODEL);
        assert_eq!(usage.model, None);
        assert!(Rollup::default().finish(&UsageFields::default(), None).is_none());
    }
}
