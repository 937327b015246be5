//! Model prices, in USD per million tokens, from the application or a TOML file. There is no
//! built-in price list: prices change, and differ by contract.
//!
//! ```toml
//! # USD per million tokens.
//! [models."gpt-4o"]
//! input = 2.50
//! output = 10.00
//! cache_read = 1.25   # optional: the input price when absent
//! ```

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::error::{Error, Result};
use crate::text::{MAX_LABEL_CHARS, OVERFLOW_AGENT_NAME};

/// The largest prices file read: a price list of thousands of models fits many times over.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The most tokens a sum keeps: what every signal carries as an integer (a span attribute is
/// an `i64`).
const MAX_TOKEN_SUM: u64 = i64::MAX as u64;

/// Token counts, as priced (and counted by `crate::gen_ai`). `cache_read` is part of `input`.
/// Sums stop at `i64::MAX`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
}

impl Tokens {
    pub(crate) fn add(&mut self, other: Tokens) {
        self.input = sum(self.input, other.input);
        self.output = sum(self.output, other.output);
        self.cache_read = sum(self.cache_read, other.cache_read);
    }

    /// Input plus output: cache reads are already in the input.
    pub(crate) fn total(self) -> u64 {
        sum(self.input, self.output)
    }
}

/// `a + b`, up to [`MAX_TOKEN_SUM`].
fn sum(a: u64, b: u64) -> u64 {
    a.saturating_add(b).min(MAX_TOKEN_SUM)
}

/// The price of one model's tokens, in USD per million.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelPrice {
    input: f64,
    output: f64,
    cache_read: Option<f64>,
}

impl ModelPrice {
    /// Input and output tokens at these prices, in USD per million; cache reads at the input
    /// price.
    pub fn per_million_tokens(input: f64, output: f64) -> Self {
        ModelPrice {
            input,
            output,
            cache_read: None,
        }
    }

    /// Cache reads (part of the input tokens) at this price instead, in USD per million.
    #[must_use]
    pub fn with_cache_read(mut self, usd_per_million: f64) -> Self {
        self.cache_read = Some(usd_per_million);
        self
    }

    /// What `tokens` cost: the uncached input, the cache reads and the output, each at its
    /// price.
    fn cost_usd(&self, tokens: Tokens) -> f64 {
        let cache_read = tokens.cache_read.min(tokens.input);
        #[allow(clippy::cast_precision_loss, reason = "token counts are far below 2^52")]
        let usd = (tokens.input - cache_read) as f64 * self.input
            + cache_read as f64 * self.cache_read.unwrap_or(self.input)
            + tokens.output as f64 * self.output;
        (usd / 1_000_000.0).min(f64::MAX)
    }

    fn check(&self) -> std::result::Result<(), &'static str> {
        let prices = [Some(self.input), Some(self.output), self.cache_read];
        if prices.into_iter().flatten().all(is_price) {
            Ok(())
        } else {
            Err("prices are finite non-negative numbers of USD per million tokens")
        }
    }
}

/// Prices per model, for `agent_cost_usd_total` and the log line's `cost_usd`: set with
/// [`with_model_prices`](crate::AgentTelemetryBuilder::with_model_prices) or from the TOML
/// file `AGENT_TELEMETRY_PRICES` names. A model is matched by its exact name.
///
/// # Examples
///
/// ```
/// use agent_telemetry::{ModelPrice, ModelPrices};
///
/// # fn main() -> Result<(), agent_telemetry::Error> {
/// let in_code = ModelPrices::new()
///     .with_model("gpt-4o", ModelPrice::per_million_tokens(2.5, 10.0).with_cache_read(1.25));
/// let from_toml = ModelPrices::from_toml(
///     "[models.\"gpt-4o\"]\ninput = 2.5\noutput = 10.0\ncache_read = 1.25\n",
/// )?;
/// assert_eq!(in_code, from_toml);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelPrices {
    models: HashMap<Box<str>, ModelPrice>,
}

impl ModelPrices {
    /// No prices.
    pub fn new() -> Self {
        ModelPrices::default()
    }

    /// `model`'s tokens at `price`, replacing any price it had.
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>, price: ModelPrice) -> Self {
        self.models.insert(model.into().into_boxed_str(), price);
        self
    }

    /// How many models have a price.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether no model has a price.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// Prices from TOML text: a `[models."name"]` table per model with `input`, `output` and
    /// optionally `cache_read`, in USD per million tokens.
    ///
    /// # Errors
    ///
    /// [`Error::Prices`] naming the line, for text that is not TOML, an unknown key, a missing
    /// price, or a price that is not a finite non-negative number.
    pub fn from_toml(text: &str) -> Result<Self> {
        parse(text).map_err(|(line, reason)| Error::Prices {
            origin: "ModelPrices::from_toml".to_owned(),
            line,
            reason,
        })
    }

    /// Prices from a TOML file, as [`from_toml`](Self::from_toml) reads them.
    ///
    /// # Errors
    ///
    /// [`Error::PricesFile`] when the file cannot be read, is not a regular file or is larger
    /// than 1 MiB; [`Error::Prices`] naming the file and the line for what `from_toml` refuses.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::read_file(path.as_ref(), None)
    }

    /// Reads `path`; `setting` is the variable that named it, for the error.
    pub(crate) fn read_file(path: &Path, setting: Option<&str>) -> Result<Self> {
        let origin = match setting {
            Some(setting) => format!("{} ({setting})", path.display()),
            None => path.display().to_string(),
        };
        let failed = |source: std::io::Error| Error::PricesFile {
            origin: origin.clone(),
            source,
        };
        let bytes = crate::config::file::read_regular(path, MAX_FILE_BYTES).map_err(failed)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| failed(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8")))?;
        parse(&text).map_err(|(line, reason)| Error::Prices { origin, line, reason })
    }

    /// What `tokens` of `model` cost in USD; `None` when the model has no price, and for the
    /// tokens of models past those an execution keeps apart (`__overflow__`), whatever the
    /// prices say.
    pub(crate) fn cost_usd(&self, model: &str, tokens: Tokens) -> Option<f64> {
        if model == OVERFLOW_AGENT_NAME {
            return None;
        }
        self.models.get(model).map(|price| price.cost_usd(tokens))
    }

    /// Checks every price, for a builder's prices.
    pub(crate) fn check(&self) -> Result<()> {
        for (model, price) in &self.models {
            price
                .check()
                .map_err(|reason| Error::invalid("with_model_prices", format!("{model}: {price:?}"), reason))?;
        }
        Ok(())
    }
}

/// The line (from 1) and the reason of a refusal.
type Refusal = (usize, String);

fn parse(text: &str) -> std::result::Result<ModelPrices, Refusal> {
    let line = |span: Range<usize>| {
        text.get(..span.start)
            .map_or(1, |before| before.matches('\n').count() + 1)
    };
    let table = DeTable::parse(text).map_err(|e| (e.span().map_or(1, line), e.message().to_owned()))?;
    let mut prices = ModelPrices::new();
    for (key, value) in table.get_ref() {
        if key.get_ref().as_ref() != "models" {
            return Err((
                line(key.span()),
                format!("unknown key {:?}: expected [models.\"name\"] tables", key.get_ref()),
            ));
        }
        let Some(models) = value.get_ref().as_table() else {
            return Err((line(value.span()), "models is a table of models".to_owned()));
        };
        for (model, price) in models {
            let name = model.get_ref();
            if name.is_empty() || name.chars().count() > MAX_LABEL_CHARS {
                return Err((
                    line(model.span()),
                    format!("a model name has 1 to {MAX_LABEL_CHARS} characters"),
                ));
            }
            let price = model_price(price, &line)?;
            prices.models.insert(name.as_ref().into(), price);
        }
    }
    Ok(prices)
}

fn model_price(
    value: &Spanned<DeValue<'_>>,
    line: &impl Fn(Range<usize>) -> usize,
) -> std::result::Result<ModelPrice, Refusal> {
    let Some(table) = value.get_ref().as_table() else {
        return Err((
            line(value.span()),
            "a model's prices are a table: input, output, cache_read".to_owned(),
        ));
    };
    let (mut input, mut output, mut cache_read) = (None, None, None);
    for (key, price) in table {
        let slot = match key.get_ref().as_ref() {
            "input" => &mut input,
            "output" => &mut output,
            "cache_read" => &mut cache_read,
            other => {
                return Err((
                    line(key.span()),
                    format!("unknown key {other:?}: expected input, output or cache_read"),
                ))
            }
        };
        *slot = Some(usd(price).ok_or_else(|| {
            (
                line(price.span()),
                "a price is a finite non-negative number of USD per million tokens".to_owned(),
            )
        })?);
    }
    let missing = |which: &str| (line(value.span()), format!("the {which} price is missing"));
    Ok(ModelPrice {
        input: input.ok_or_else(|| missing("input"))?,
        output: output.ok_or_else(|| missing("output"))?,
        cache_read,
    })
}

/// A price: a finite non-negative float or decimal integer.
fn usd(value: &Spanned<DeValue<'_>>) -> Option<f64> {
    let text = match value.get_ref() {
        DeValue::Float(float) => float.as_str().replace('_', ""),
        DeValue::Integer(integer) if integer.radix() == 10 => integer.as_str().replace('_', ""),
        _ => return None,
    };
    text.parse::<f64>().ok().filter(|usd| is_price(*usd))
}

/// Whether `usd` can be a price: finite and not negative.
fn is_price(usd: f64) -> bool {
    usd.is_finite() && usd >= 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(text: &str) -> (usize, String) {
        match ModelPrices::from_toml(text) {
            Err(Error::Prices { line, reason, .. }) => (line, reason),
            other => panic!("{text:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn sums_stop_where_every_signal_still_carries_them() {
        let mut tokens = Tokens {
            input: u64::MAX - 1,
            output: MAX_TOKEN_SUM,
            cache_read: 1,
        };
        tokens.add(Tokens {
            input: 5,
            output: 1,
            cache_read: 2,
        });
        assert_eq!(
            (tokens.input, tokens.output, tokens.cache_read),
            (MAX_TOKEN_SUM, MAX_TOKEN_SUM, 3)
        );
        assert_eq!(tokens.total(), MAX_TOKEN_SUM);
    }

    #[test]
    fn overflowed_models_are_never_priced() {
        let prices = ModelPrices::new().with_model(OVERFLOW_AGENT_NAME, ModelPrice::per_million_tokens(1.0, 1.0));
        let million = Tokens {
            input: 1_000_000,
            ..Tokens::default()
        };
        assert_eq!(prices.cost_usd(OVERFLOW_AGENT_NAME, million), None);
    }

    #[test]
    fn a_price_list_is_read() {
        let prices = ModelPrices::from_toml(
            "# comment\n[models.\"gpt-4o\"]\ninput = 2.5\noutput = 10\n\n[models.claude-sonnet]\ninput = 3.0\noutput = 1_5.0\ncache_read = 0.3\n",
        )
        .unwrap();
        assert_eq!(prices.len(), 2);
        let tokens = Tokens {
            input: 2_000_000,
            output: 1_000_000,
            cache_read: 1_000_000,
        };
        assert_eq!(prices.cost_usd("gpt-4o", tokens), Some(2.5 * 2.0 + 10.0));
        assert_eq!(prices.cost_usd("claude-sonnet", tokens), Some(3.0 + 0.3 + 15.0));
        assert_eq!(prices.cost_usd("gpt-4", tokens), None);
    }

    #[test]
    fn a_bad_file_names_the_line() {
        assert_eq!(refusal("[models.a]\ninput = 1\noutput = -2\n").0, 3);
        assert_eq!(refusal("[models.a]\ninput = 1\noutput = \"2\"\n").0, 3);
        assert_eq!(refusal("[models.a]\ninput = 1\n\ninptu = 2\noutput = 1\n").0, 4);
        assert_eq!(refusal("[models.a]\ninput = 1\noutput = inf\n").0, 3);
        assert_eq!(refusal("\n\n[models.a\ninput = 1\n").0, 3);
        assert!(refusal("[models.a]\ninput = 1\n").1.contains("output"));
        assert_eq!(refusal("[pricing]\n").0, 1);
    }

    #[test]
    fn a_file_that_is_not_a_regular_file_or_too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ModelPrices::read_file(dir.path(), Some("AGENT_TELEMETRY_PRICES")),
            Err(Error::PricesFile { .. })
        ));
        let big = dir.path().join("big.toml");
        std::fs::write(&big, "#".repeat(2 * 1024 * 1024)).unwrap();
        let error = ModelPrices::read_file(&big, Some("AGENT_TELEMETRY_PRICES")).unwrap_err();
        assert!(error.to_string().contains("AGENT_TELEMETRY_PRICES"), "{error}");
        assert!(error.to_string().contains("1 MiB"), "{error}");
    }

    #[test]
    fn builder_prices_are_checked() {
        assert!(ModelPrices::new()
            .with_model("a", ModelPrice::per_million_tokens(f64::NAN, 1.0))
            .check()
            .is_err());
        assert!(ModelPrices::new()
            .with_model("a", ModelPrice::per_million_tokens(1.0, 1.0).with_cache_read(-1.0))
            .check()
            .is_err());
        assert!(ModelPrices::new()
            .with_model("a", ModelPrice::per_million_tokens(1.0, 1.0))
            .check()
            .is_ok());
    }
}
