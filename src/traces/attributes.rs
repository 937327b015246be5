//! The keys of the span attributes the crate sets, and their fixed values: the guide's, the
//! OpenTelemetry semantic conventions' (GenAI, code, errors, exceptions) and OpenInference's.
//! A user's field with one of these keys never replaces the crate's attribute.

/// The guide's: the agent's name.
pub(crate) const AGENT_NAME: &str = "agent.name";
/// The guide's: the task, as captured.
pub(crate) const TASK: &str = "task";
/// The guide's: `success`, `failure` or `cancelled`.
pub(crate) const RESULT_STATUS: &str = "result.status";

/// GenAI conventions: what the span does ([`INVOKE_AGENT`] for an agent execution).
pub(crate) const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
/// GenAI conventions: the agent's name.
pub(crate) const GEN_AI_AGENT_NAME: &str = "gen_ai.agent.name";
/// The GenAI operation of an agent execution.
pub(crate) const INVOKE_AGENT: &str = "invoke_agent";

/// GenAI conventions: the model asked for.
pub(crate) const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
/// GenAI conventions: the model's provider.
pub(crate) const GEN_AI_PROVIDER_NAME: &str = "gen_ai.provider.name";
/// GenAI conventions: input tokens, cache reads included.
pub(crate) const GEN_AI_USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
/// GenAI conventions: output tokens.
pub(crate) const GEN_AI_USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
/// GenAI conventions: input tokens read from the provider's cache.
pub(crate) const GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: &str = "gen_ai.usage.cache_read.input_tokens";

/// OpenInference: the model of an LLM span.
pub(crate) const LLM_MODEL_NAME: &str = "llm.model_name";
/// OpenInference: the model's provider.
pub(crate) const LLM_PROVIDER: &str = "llm.provider";
/// OpenInference: input tokens.
pub(crate) const LLM_TOKEN_COUNT_PROMPT: &str = "llm.token_count.prompt";
/// OpenInference: output tokens.
pub(crate) const LLM_TOKEN_COUNT_COMPLETION: &str = "llm.token_count.completion";
/// OpenInference: input plus output tokens.
pub(crate) const LLM_TOKEN_COUNT_TOTAL: &str = "llm.token_count.total";
/// OpenInference: input tokens read from the cache.
pub(crate) const LLM_TOKEN_COUNT_PROMPT_CACHE_READ: &str = "llm.token_count.prompt_details.cache_read";

/// OpenInference: how Phoenix and its peers show the span ([`AGENT_SPAN_KIND`]).
pub(crate) const OPENINFERENCE_SPAN_KIND: &str = "openinference.span.kind";
/// The OpenInference kind of an agent execution.
pub(crate) const AGENT_SPAN_KIND: &str = "AGENT";
/// The OpenInference kind of a model call.
pub(crate) const LLM_SPAN_KIND: &str = "LLM";

/// Error conventions: low-cardinality cause of a failure (`error`, `panic`, `cancelled`, ...).
pub(crate) const ERROR_TYPE: &str = "error.type";
/// Exception conventions: an event's `error` field.
pub(crate) const EXCEPTION_MESSAGE: &str = "exception.message";

/// Code conventions: where the span or event was created, as `tracing-opentelemetry` sets.
pub(crate) const CODE_FILE_PATH: &str = "code.file.path";
pub(crate) const CODE_MODULE_NAME: &str = "code.module.name";
pub(crate) const CODE_LINE_NUMBER: &str = "code.line.number";
