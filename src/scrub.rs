//! Scrubbing: secrets in what leaves the process become `[REDACTED]`, on by default, as
//! Logfire does for its users.
//!
//! Two rules, applied to the log line and the span alike:
//!
//! - **Names**: a span or event field whose name looks sensitive is sent as `[REDACTED]`. A
//!   name is split into segments at `.`, `_`, `-`, spaces and lower-to-upper case changes,
//!   and matches when a segment is one of [`SENSITIVE_SEGMENTS`] or two adjacent segments
//!   join into one of [`SENSITIVE_PAIRS`] (`api_key`, `apiKey`, `db.password`,
//!   `access_token`), so that counts such as `input_tokens` or `gen_ai.usage.*` never do.
//!   The attributes the crate sets itself are never scrubbed.
//! - **Values**: in task text, error messages and every other string value, what matches a
//!   secret pattern (bearer tokens, JWTs, `sk-`/`pk-` style API keys, AWS access key ids,
//!   GitHub, Slack, Google, Hugging Face, Groq, Replicate, Perplexity, GitLab and npm
//!   tokens, PEM private key blocks, `password=…` and the like, a URL's password) is
//!   replaced. A text is scrubbed before it is cut to its limit, with a margin
//!   ([`SCRUB_MARGIN`]), so a secret that straddles the cut is caught whole.
//!
//! Texts without any of the patterns' literal triggers (most tasks) are checked with one
//! Aho-Corasick pass (vectorised, on a lowercase copy, for texts of 32 bytes or more) and no
//! regular expression.

use std::borrow::Cow;
use std::ops::Range;

use aho_corasick::{packed, AhoCorasick};
use regex::Regex;
use regex_automata::{meta, Anchored, Input};

use crate::error::{Error, Result};
use crate::text::{cut, MAX_LABEL_CHARS};

/// What a scrubbed value or name becomes.
pub const REDACTED: &str = "[REDACTED]";

/// How many characters past its limit a text is scrubbed before it is cut.
pub(crate) const SCRUB_MARGIN: usize = 4096;

/// How many characters of a name (an agent's, a model's, a provider's, a status) are held
/// until it is scrubbed and cut to [`MAX_LABEL_CHARS`].
pub(crate) const HELD_LABEL_CHARS: usize = MAX_LABEL_CHARS + SCRUB_MARGIN;

/// Field name segments that make a field sensitive.
pub(crate) const SENSITIVE_SEGMENTS: [&str; 22] = [
    "password",
    "passwd",
    "pwd",
    "passphrase",
    "secret",
    "secrets",
    "token",
    "apikey",
    "auth",
    "authorization",
    "credential",
    "credentials",
    "privatekey",
    "session",
    "sessionid",
    "cookie",
    "cookies",
    "jwt",
    "bearer",
    "ssn",
    "csrf",
    "xsrf",
];

/// Two adjacent segments that make a field sensitive, joined (`api` + `key`).
pub(crate) const SENSITIVE_PAIRS: [&str; 4] = ["apikey", "privatekey", "accesskey", "creditcard"];

/// A secret pattern: what it matches, the literals every match contains (compared ASCII
/// case-insensitively), how many bytes before its trigger a match may start (where a word
/// or a `Debug` string's escape begins), and the start of a match that is kept (`Bearer `,
/// `password=`), an anchored pattern; the rest of the match is replaced.
struct SecretPattern {
    pattern: &'static str,
    triggers: &'static [&'static str],
    before_trigger: usize,
    keep: Option<&'static str>,
    /// How many bytes at the end of a match stay (the `@` after a URL's password).
    kept_at_end: usize,
    /// Where an unquoted value after `keep` ends: at a key inside it.
    inner_keys: Option<InnerKeys>,
}

/// The keys an unquoted value never hides: the value ends before one (`credentials:
/// password: …`, `Credentials(password='…')`), and a key of the rule's own is matched in turn.
struct InnerKeys {
    /// A key and its separator: the rule's own, `Authorization` (another rule's), or any name
    /// at the start of a line of a `Debug` string (`\nHOME=`).
    ends_value: &'static str,
    /// Of those, the rule's own keys, whose values it redacts.
    own: &'static str,
}

/// One character of a JSON string as JSON writes it: a character but `"` and `\`, or an
/// escape (`\"`, `\\`, `\n`, `\u0041`'s first two).
macro_rules! json_char {
    () => {
        r#"(?u:[^"\\]|\\(?s:.))"#
    };
}

/// [`json_char!`] inside a `Debug` string, whose escapes double its backslashes and escape
/// its quotes (`\\\"` is JSON's `\"`, `\\\\` JSON's `\\`), besides its own (`\n`).
macro_rules! json_char_escaped_once {
    () => {
        r#"(?:\\{4}|\\{3}"|\\{1,3}(?u:[^"\\])|(?u:[^"\\]))"#
    };
}

/// [`json_char_escaped_once!`] inside a `Debug` string in turn.
macro_rules! json_char_escaped_twice {
    () => {
        r#"(?:\\{8}|\\{7}"|\\{1,7}(?u:[^"\\])|(?u:[^"\\]))"#
    };
}

/// Where a token starts: where a word begins, or right after a `Debug` string's escape of a
/// line break or tab (`\n`), whose letter `\b` takes for a word's.
macro_rules! token_start {
    () => {
        r"(?:(?-i:\\[nrt])|\b)"
    };
}

/// A token's pattern: `$pattern` (ASCII) where a token may start ([`token_start!`]), tried
/// from up to the two bytes of an escape before its `$triggers`, the escape kept.
macro_rules! token_pattern {
    ($pattern:literal, $triggers:expr) => {
        SecretPattern {
            pattern: concat!("(?-u)", token_start!(), $pattern),
            triggers: $triggers,
            before_trigger: 2,
            keep: Some(r"^\\[nrt]"),
            kept_at_end: 0,
            inner_keys: None,
        }
    };
}

/// The keys of the key rule: a password, secret, API key, private key, credential or session
/// token anywhere in a longer key, a kubeconfig's client key; `pwd` and the token keys where
/// a token may start ([`token_start!`]); all with `key` after them.
macro_rules! secret_key {
    () => {
        concat!(
            r"(?:(?:password|passwd|passphrase|secret|client[_-]?secret|api[_-]?key|private[_-]?key|credentials?|session[_-]?token|client-key-data)|",
            token_start!(),
            r"(?:pwd|access[_-]?token|refresh[_-]?token|auth[_-]?token|token))(?:[_.-]?(?:access[_.-]?)?key)?"
        )
    };
}

/// The built-in secret patterns. They are ASCII patterns (`(?-u)`), which the regex engine
/// runs on its DFA; a text is searched only with the patterns whose triggers it contains.
const SECRET_PATTERNS: [SecretPattern; 12] = [
    // Bearer tokens: the token after the scheme.
    SecretPattern {
        pattern: concat!("(?i-u)", token_start!(), r"bearer\s+[A-Za-z0-9\-._~+/]{16,}=*"),
        triggers: &["bearer"],
        before_trigger: 2,
        keep: Some(r"(?i-u)^(?:(?-i:\\[nrt]))?bearer\s+"),
        kept_at_end: 0,
        inner_keys: None,
    },
    // JWTs: three base64url parts, the header's JSON starting `{"`.
    token_pattern!(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*", &["eyj"]),
    // OpenAI, Anthropic, Stripe style keys: sk-…, sk-proj-…, sk-ant-…, pk_live_…, rk_test_….
    token_pattern!(
        r"(?:sk|pk|rk)[-_][A-Za-z0-9_-]{16,}",
        &["sk-", "sk_", "pk-", "pk_", "rk-", "rk_"]
    ),
    // AWS access key ids.
    token_pattern!(
        r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{16}\b",
        &["akia", "asia", "abia", "acca", "agpa", "aida", "aipa", "anpa", "anva", "apka", "aroa", "asca"]
    ),
    // GitHub tokens.
    token_pattern!(
        r"(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})",
        &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"]
    ),
    // Slack tokens.
    token_pattern!(r"xox[abposr]-[A-Za-z0-9-]{10,}", &["xox"]),
    // Hugging Face, Groq, Replicate, Perplexity, GitLab (personal, project and group access,
    // CI job, deploy, runner, pipeline trigger tokens and OAuth application secrets; a routable
    // token with its version and check suffix) and npm tokens.
    token_pattern!(
        r"(?:hf_[A-Za-z0-9]{30,}|gsk_[A-Za-z0-9]{40,}|r8_[A-Za-z0-9]{30,}|pplx-[A-Za-z0-9]{40,}|gl(?:pat|ptt|dt|rt|cbt|oas)-[A-Za-z0-9_-]{20,}(?:\.[A-Za-z0-9]{2}\.[A-Za-z0-9]+)?|npm_[A-Za-z0-9]{36,})",
        &["hf_", "gsk_", "r8_", "pplx-", "glpat-", "glptt-", "gldt-", "glrt-", "glcbt-", "gloas-", "npm_"]
    ),
    // Google API keys.
    token_pattern!(r"AIza[0-9A-Za-z_-]{35}", &["aiza"]),
    // PEM private key blocks, to their end or the end of the text (a Unicode pattern, so
    // that `.` is any character).
    SecretPattern {
        pattern: r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----(?s:.*?)(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\z)",
        triggers: &["-----begin"],
        before_trigger: 0,
        keep: None,
        kept_at_end: 0,
        inner_keys: None,
    },
    // `password=…`, `api_key: …`, `token=…`; a password, secret, API key, private key,
    // credential or session token also inside a longer key (`DB_PASSWORD=…`,
    // `WALLET_PRIVATE_KEY=…`, `AWS_SESSION_TOKEN=…`; another token is data there: `max_token`,
    // `eos_token`), all with `key` after them (`AWS_SECRET_ACCESS_KEY=…`, `secret_key: …`,
    // `SecretAccessKey`); a kubeconfig's `client-key-data`: the value (quoted, to the next
    // quote; as a `Debug` string escapes it; `Some("…")`; unquoted, up to where a key inside
    // it starts, `inner_keys`); as a JSON or `Debug` map writes them (`"password": "…"`), a
    // quoted value only (a number or `true` there is data); and as JSON reads inside a `Debug`
    // string, once or twice escaped (`\"password\": \"…\"`). A JSON value is read in its
    // escapes to its closing quote, or as far as it reads.
    SecretPattern {
        pattern: concat!(
            "(?i-u)",
            secret_key!(),
            r#"(?:\s*[=:]\s*(?:(?u:"[^"]*"?|'[^']*')|\\""#,
            json_char_escaped_once!(),
            r#"*(?:\\")?|Some\(""#,
            json_char!(),
            r#"*(?:"\))?|(?u:[^\s&,;"']+))"#,
            r#"|["']\s*[=:]\s*(?:""#,
            json_char!(),
            r#"*"?|Some\(""#,
            json_char!(),
            r#"*(?:"\))?|(?u:'[^']*'))"#,
            r#"|\\"\s*[=:]\s*\\""#,
            json_char_escaped_once!(),
            r#"*(?:\\")?"#,
            r#"|\\{3}"\s*[=:]\s*\\{3}""#,
            json_char_escaped_twice!(),
            r#"*(?:\\{3}")?)"#,
        ),
        triggers: &[
            "password",
            "passwd",
            "pwd",
            "passphrase",
            "secret",
            "api_key",
            "api-key",
            "apikey",
            "private_key",
            "private-key",
            "privatekey",
            "credential",
            "client-key-data",
            "token",
        ],
        // `refresh_` and an escape, or `session_`, before `token`; `client_`, `access_` and
        // `auth_` are shorter.
        before_trigger: 10,
        keep: Some(r#"(?i-u)^(?:(?-i:\\[nrt]))?[a-z0-9_.-]+(?:\\*["'])?\s*[=:]\s*"#),
        kept_at_end: 0,
        inner_keys: Some(InnerKeys {
            ends_value: concat!(
                "(?i-u)(?:",
                secret_key!(),
                "|",
                token_start!(),
                r#"authorization|(?-i:\\[nrt])[a-z_][a-z0-9_.-]*)(?:\\*["'])?[ \t]{0,16}[=:]"#
            ),
            own: concat!("(?i-u)", secret_key!(), r#"(?:\\*["'])?[ \t]{0,16}[=:]"#),
        }),
    },
    // `Authorization: Basic …` and the like: the credentials; quoted (the value read as a
    // JSON string), in `Some("…")`, as a JSON or `Debug` map writes them, or escaped as
    // above, to the value's closing quote, which stays.
    SecretPattern {
        pattern: concat!(
            "(?i-u)",
            token_start!(),
            r#"authorization(?:\s*[:=]\s*(?:"(?:(?:basic|bearer|digest|token)\s+)?"#,
            json_char!(),
            r#"+|Some\("(?:(?:basic|bearer|digest|token)\s+)?"#,
            json_char!(),
            r#"+|(?:(?:basic|bearer|digest|token)\s+)?(?u:(?:[^\s,;\\]|(?-i:\\[^nrt"]))+))"#,
            r#"|["']\s*[:=]\s*(?:"(?:(?:basic|bearer|digest|token)\s+)?"#,
            json_char!(),
            r#"+|Some\("(?:(?:basic|bearer|digest|token)\s+)?"#,
            json_char!(),
            r#"+|'(?:(?:basic|bearer|digest|token)\s+)?(?u:[^']+))"#,
            r#"|\\"\s*[:=]\s*\\"(?:(?:basic|bearer|digest|token)\s+)?"#,
            json_char_escaped_once!(),
            r#"+|\\{3}"\s*[:=]\s*\\{3}"(?:(?:basic|bearer|digest|token)\s+)?"#,
            json_char_escaped_twice!(),
            r#"+)"#,
        ),
        triggers: &["authorization"],
        // A `Debug` string's escape before it.
        before_trigger: 2,
        keep: Some(
            r#"(?i-u)^(?:(?-i:\\[nrt]))?authorization(?:\\*["'])?\s*[:=]\s*(?:\\*["']|Some\(")?(?:(?:basic|bearer|digest|token)\s+)?"#,
        ),
        kept_at_end: 0,
        inner_keys: None,
    },
    // A URL's password: `postgres://user:password@host`, `redis://:password@host`; neither
    // part runs through a quote, a comma or a bracket (JSON, CSV, `<…>` lists).
    SecretPattern {
        pattern: r#"(?i-u)\b(?:[a-z][a-z0-9+]{0,23})://(?u:[^\s:/?#@"'<>{},;`]*):(?u:[^\s/?#@"'<>{},;`]+)@"#,
        triggers: &["://"],
        // The scheme: `postgresql`, `mongodb+srv`, `postgresql+psycopg2`.
        before_trigger: 24,
        keep: Some(r#"(?i-u)^[a-z][a-z0-9+]*://(?u:[^\s:/?#@"'<>{},;`]*):"#),
        kept_at_end: 1,
        inner_keys: None,
    },
];

/// What scrubbing does, for [`with_scrubbing`](crate::AgentTelemetryBuilder::with_scrubbing): on with
/// the built-in names and patterns by default, more of each added, or off.
///
/// # Examples
///
/// ```
/// use agent_telemetry::Scrubbing;
///
/// let scrubbing = Scrubbing::default()
///     .with_field_names(["customer_id"])
///     .with_patterns([r"\bACME-[0-9]{8}\b"]);
/// # let _ = scrubbing;
/// ```
#[derive(Debug, Clone)]
pub struct Scrubbing {
    enabled: bool,
    field_names: Vec<String>,
    patterns: Vec<String>,
}

impl Default for Scrubbing {
    fn default() -> Self {
        Scrubbing {
            enabled: true,
            field_names: Vec::new(),
            patterns: Vec::new(),
        }
    }
}

impl Scrubbing {
    /// No scrubbing at all: every name and value leaves as it is.
    pub fn off() -> Self {
        Scrubbing {
            enabled: false,
            ..Scrubbing::default()
        }
    }

    /// Whether scrubbing is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Adds field names to redact: each matches a field whose segments contain its own
    /// (`customer_id` matches `customer_id`, `billing.customer_id` and `customerId`).
    #[must_use]
    pub fn with_field_names<I, N>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        self.field_names.extend(names.into_iter().map(Into::into));
        self
    }

    /// Adds patterns (the `regex` crate's syntax) whose matches are redacted. They are
    /// searched in every text, so each costs a scan per task and error message.
    #[must_use]
    pub fn with_patterns<I, P>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.patterns.extend(patterns.into_iter().map(Into::into));
        self
    }

    /// The compiled rules.
    ///
    /// # Errors
    ///
    /// A pattern that is not a valid regular expression, naming `with_scrubbing`.
    pub(crate) fn build(&self) -> Result<Scrubber> {
        if !self.enabled {
            return Ok(Scrubber::off());
        }
        let compile =
            |pattern: &str| Regex::new(pattern).map_err(|e| Error::invalid("with_scrubbing", pattern, e.to_string()));
        let compile_built_in = |pattern: &str| {
            meta::Regex::new(pattern).map_err(|e| Error::invalid("with_scrubbing", pattern, e.to_string()))
        };
        let built_in = SECRET_PATTERNS
            .iter()
            .map(|secret| {
                Ok(BuiltIn {
                    regex: compile_built_in(secret.pattern)?,
                    keep: secret.keep.map(compile).transpose()?,
                    before_trigger: secret.before_trigger,
                    kept_at_end: secret.kept_at_end,
                    inner_keys: secret
                        .inner_keys
                        .as_ref()
                        .map(|inner| -> Result<_> {
                            Ok((compile_built_in(inner.ends_value)?, compile_built_in(inner.own)?))
                        })
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let added = self
            .patterns
            .iter()
            .map(|pattern| compile(pattern))
            .collect::<Result<Vec<_>>>()?;
        let triggers =
            Triggers::built_in().map_err(|e| Error::invalid("with_scrubbing", "built-in triggers", e.to_string()))?;
        Ok(Scrubber {
            rules: Some(Rules {
                triggers,
                built_in,
                added,
                field_names: self.field_names.iter().map(|name| segments(name)).collect(),
            }),
        })
    }
}

/// Scrubbing's compiled rules, shared by the signals.
#[derive(Debug)]
pub(crate) struct Scrubber {
    rules: Option<Rules>,
}

#[derive(Debug)]
struct Rules {
    triggers: Triggers,
    built_in: Vec<BuiltIn>,
    /// The added patterns, searched in every text, their whole matches replaced.
    added: Vec<Regex>,
    /// The added names, each as its segments.
    field_names: Vec<Vec<String>>,
}

/// The built-in patterns' triggers, found ASCII case-insensitively.
#[derive(Debug)]
struct Triggers {
    /// Every trigger, any case: for short texts, and for every text where `lowercase` could
    /// not be built.
    any_case: AhoCorasick,
    /// Every trigger (lowercase already), searched in a lowercase copy of the text: a
    /// vectorised searcher (Teddy), where the CPU has the instructions it needs.
    lowercase: Option<packed::Searcher>,
    /// For each trigger, the index of its pattern in [`SECRET_PATTERNS`]; both searchers
    /// number the triggers in the order they were given, this one's.
    pattern_of: Vec<usize>,
}

impl Triggers {
    /// Texts shorter than this are searched by `any_case`: a lowercase copy costs more than
    /// it saves.
    const COPY_FROM_LEN: usize = 32;

    /// The triggers of [`SECRET_PATTERNS`].
    fn built_in() -> std::result::Result<Self, aho_corasick::BuildError> {
        let triggers = || SECRET_PATTERNS.iter().flat_map(|secret| secret.triggers);
        let pattern_of = SECRET_PATTERNS
            .iter()
            .enumerate()
            .flat_map(|(index, secret)| secret.triggers.iter().map(move |_| index))
            .collect();
        let any_case = AhoCorasick::builder().ascii_case_insensitive(true).build(triggers())?;
        let lowercase = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder()
            .extend(triggers())
            .build();
        Ok(Triggers {
            any_case,
            lowercase,
            pattern_of,
        })
    }

    /// Where triggers start in `text`: for each, the index of its pattern in
    /// [`SECRET_PATTERNS`] and its start, in the order of the starts.
    fn hits(&self, text: &str) -> Vec<(usize, usize)> {
        // Empty, and unallocated, for most texts; room for a few words when there are any.
        let mut hits = Vec::new();
        let mut push = |hit| {
            if hits.capacity() == 0 {
                hits.reserve(8);
            }
            hits.push(hit);
        };
        match &self.lowercase {
            Some(lowercase) if text.len() >= Self::COPY_FROM_LEN => {
                let text = text.to_ascii_lowercase();
                let text = text.as_bytes();
                // Leftmost-first finds one trigger per start, so each search resumes one
                // byte after the last match's start: no two patterns' triggers share a start
                // (`no_trigger_starts_another_patterns_trigger`).
                let mut from = 0;
                while let Some(hit) = lowercase.find_in(text, aho_corasick::Span::from(from..text.len())) {
                    push((self.pattern_of[hit.pattern().as_usize()], hit.start()));
                    from = hit.start() + 1;
                }
            }
            _ => {
                for hit in self.any_case.find_overlapping_iter(text) {
                    push((self.pattern_of[hit.pattern().as_usize()], hit.start()));
                }
                // Overlapping hits come in the order they end.
                hits.sort_unstable_by_key(|&(_, start)| start);
            }
        }
        hits
    }
}

#[cfg(test)]
impl Triggers {
    /// Which of [`SECRET_PATTERNS`] have a trigger in `text`.
    fn patterns_in(&self, text: &str) -> [bool; SECRET_PATTERNS.len()] {
        let mut found = [false; SECRET_PATTERNS.len()];
        for (pattern, _) in self.hits(text) {
            found[pattern] = true;
        }
        found
    }
}

/// A compiled built-in secret pattern.
#[derive(Debug)]
struct BuiltIn {
    regex: meta::Regex,
    keep: Option<Regex>,
    before_trigger: usize,
    kept_at_end: usize,
    /// [`InnerKeys`]: where a value ends, and which of those keys are the rule's own.
    inner_keys: Option<(meta::Regex, meta::Regex)>,
}

impl BuiltIn {
    /// Above this many of its triggers in a text, a pattern searches the whole text rather
    /// than try where each trigger is.
    const MAX_TRIED_TRIGGERS: usize = 16;

    /// How far past a match's end a key inside its value may end: its separator may lie
    /// beyond (`…\naws_session_token = …`).
    const INNER_KEY_REACH: usize = 64;

    /// `text` with this pattern's matches redacted, `None` when it has none, found by
    /// trying the pattern only where a match can start: at each of its triggers' `starts`
    /// (ascending), and where a word or an escape begins up to
    /// [`SecretPattern::before_trigger`] bytes before (anywhere there, for a key rule). Every
    /// match contains a trigger, so these are all the matches a search of the whole text
    /// finds.
    fn redact_at(&self, text: &str, starts: impl Iterator<Item = usize>) -> Option<String> {
        let bytes = text.as_bytes();
        // Positions below this were tried already, or are inside the last match.
        let mut untried = 0;
        // A key rule's keys start anywhere, `SESSION_TOKEN` inside `AWS_SESSION_TOKEN`.
        let anywhere = self.inner_keys.is_some();
        let matches = starts
            .flat_map(|start| {
                (start.saturating_sub(self.before_trigger)..=start).filter(move |&at| {
                    at == start || anywhere || begins_ascii_word(bytes, at) || begins_escape(bytes, at)
                })
            })
            .filter_map(|at| {
                if at < untried || !text.is_char_boundary(at) {
                    return None;
                }
                untried = at + 1;
                // Anchored at `at`, the text before it still seen by `\b`.
                let input = Input::new(text).range(at..).anchored(Anchored::Yes);
                let found = self.regex.search(&input)?;
                let (parts, next) = self.redacted_parts(text, found.range());
                untried = next;
                Some(parts)
            })
            .flatten();
        redact(text, self.keep.as_ref(), matches)
    }

    /// The parts of a match redacted, each from a key (which `keep` keeps) to the end of its
    /// value, and where the search goes on. All but the match's last
    /// [`SecretPattern::kept_at_end`] bytes (ASCII, as the patterns that keep any end in),
    /// the search going on at its end; but an unquoted value ends where a key inside it
    /// starts ([`SecretPattern::inner_keys`]), the whitespace and line-break escapes before
    /// that key kept, and so on for that key's value inside the match; the search goes on at
    /// the first key whose value is quoted or runs past the match.
    fn redacted_parts(&self, text: &str, found: Range<usize>) -> (Parts, usize) {
        let whole = found.start..found.end.saturating_sub(self.kept_at_end).max(found.start);
        let Some((ends_value, own_keys)) = &self.inner_keys else {
            return (Parts::One(Some(whole)), found.end);
        };
        let kept = self
            .keep
            .as_ref()
            .and_then(|keep| keep.find(&text[found.clone()]))
            .map_or(0, |kept| kept.end());
        // The key whose value is being redacted: none after a key not the rule's own.
        let (mut key, mut value) = (Some(found.start), found.start + kept);
        if is_quoted(&text[value..]) {
            return (Parts::One(Some(whole)), found.end);
        }
        let mut reach = found.end.saturating_add(Self::INNER_KEY_REACH).min(text.len());
        while !text.is_char_boundary(reach) {
            reach -= 1;
        }
        let mut parts = Vec::new();
        let mut from = value;
        while let Some(inner) = ends_value
            .search(&Input::new(text).range(from..reach))
            .filter(|inner| inner.start() < found.end)
        {
            if inside_a_word(text, inner.start()) {
                from = inner.start() + 1;
                continue;
            }
            if let Some(key) = key {
                let cut = value + trim_line_ends(&text[value..inner.start()]).len();
                if cut > value {
                    parts.push(key..cut);
                }
            }
            let own = own_keys
                .search(&Input::new(text).range(inner.range()))
                .is_some_and(|own| own.end() == inner.end());
            if !own {
                (key, from) = (None, inner.end());
                continue;
            }
            let after = &text[inner.end()..];
            let inner_value = inner.end() + (after.len() - after.trim_start().len());
            if inner_value >= found.end || is_quoted(&text[inner_value..]) {
                return (Parts::Many(parts.into_iter()), inner.start());
            }
            (key, value, from) = (Some(inner.start()), inner_value, inner_value);
        }
        if let Some(key) = key {
            parts.push(key..whole.end);
        }
        (Parts::Many(parts.into_iter()), found.end)
    }

    /// `text` with this pattern's matches redacted, `None` when it has none, found by a
    /// search of the whole text.
    fn redact_all(&self, text: &str) -> Option<String> {
        let mut from = 0;
        let matches = std::iter::from_fn(|| {
            let found = self.regex.search(&Input::new(text).range(from..))?;
            let (parts, next) = self.redacted_parts(text, found.range());
            from = next;
            Some(parts)
        })
        .flatten();
        redact(text, self.keep.as_ref(), matches)
    }
}

impl Scrubber {
    /// Scrubs nothing.
    pub(crate) fn off() -> Self {
        Scrubber { rules: None }
    }

    /// Whether it scrubs anything.
    pub(crate) fn is_on(&self) -> bool {
        self.rules.is_some()
    }

    /// Whether a field named `name` is sent as [`REDACTED`].
    pub(crate) fn redacts_field(&self, name: &str) -> bool {
        let Some(rules) = &self.rules else {
            return false;
        };
        if has_sensitive_segment(name) {
            return true;
        }
        if rules.field_names.is_empty() {
            return false;
        }
        let segments = segments(name);
        rules
            .field_names
            .iter()
            .any(|added| !added.is_empty() && segments.windows(added.len()).any(|run| run == added.as_slice()))
    }

    /// `text` with every secret replaced by [`REDACTED`]; borrowed when there is none.
    pub(crate) fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let Some(rules) = &self.rules else {
            return text.into();
        };
        let hits = rules.triggers.hits(text);
        let mut text = Cow::Borrowed(text);
        if !hits.is_empty() {
            for (index, pattern) in rules.built_in.iter().enumerate() {
                let starts = hits.iter().filter(|&&(hit, _)| hit == index).map(|&(_, start)| start);
                let redacted = match (starts.clone().count(), &text) {
                    (0, _) => continue,
                    (1..=BuiltIn::MAX_TRIED_TRIGGERS, Cow::Borrowed(original)) => pattern.redact_at(original, starts),
                    // Many triggers (a text that repeats one cheaply, say): one search of
                    // the whole text costs less than a try at each.
                    (_, Cow::Borrowed(original)) => pattern.redact_all(original),
                    // The starts are the original text's; a redaction has moved them.
                    (_, Cow::Owned(redacted)) => pattern.redact_all(redacted),
                };
                if let Some(redacted) = redacted {
                    text = Cow::Owned(redacted);
                }
            }
        }
        for pattern in &rules.added {
            let matches = pattern.find_iter(&text).map(|found| found.range());
            if let Some(redacted) = redact(&text, None, matches) {
                text = Cow::Owned(redacted);
            }
        }
        text
    }

    /// At most `max` characters of `text`, scrubbed: scrubbed with [`SCRUB_MARGIN`] more
    /// characters first, so that a secret straddling the cut is caught whole, then cut.
    pub(crate) fn scrub_and_cut<'a>(&self, text: &'a str, max: usize) -> Cow<'a, str> {
        if self.rules.is_none() {
            return cut(text, max);
        }
        match self.scrub(&cut(text, max.saturating_add(SCRUB_MARGIN))) {
            // Unchanged by scrubbing: cut the original, borrowing it when short.
            Cow::Borrowed(_) => cut(text, max),
            Cow::Owned(scrubbed) => cut(&scrubbed, max).into_owned().into(),
        }
    }
}

/// Whether an ASCII word (`[0-9A-Za-z_]`, as `(?-u)\b` sees words) begins at `at`, a
/// position inside `bytes`.
fn begins_ascii_word(bytes: &[u8], at: usize) -> bool {
    let word = |byte: &u8| byte.is_ascii_alphanumeric() || *byte == b'_';
    bytes.get(at).is_some_and(word) && !at.checked_sub(1).and_then(|before| bytes.get(before)).is_some_and(word)
}

/// The parts of a match redacted ([`BuiltIn::redacted_parts`]): nearly always one.
enum Parts {
    One(Option<Range<usize>>),
    Many(std::vec::IntoIter<Range<usize>>),
}

impl Iterator for Parts {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        match self {
            Parts::One(part) => part.take(),
            Parts::Many(parts) => parts.next(),
        }
    }
}

/// `value` without the whitespace and the `Debug` string's escapes of line breaks and tabs
/// (`\n`) at its end: what separates it from the key after it.
fn trim_line_ends(mut value: &str) -> &str {
    loop {
        value = value.trim_end();
        match value
            .strip_suffix(['n', 'r', 't'])
            .and_then(|rest| rest.strip_suffix('\\'))
        {
            Some(rest) => value = rest,
            None => return value,
        }
    }
}

/// Whether a key starting at `at` is inside a word, part of a value (`SuperSecret:123`): it
/// starts with a letter right after a letter or digit that is not a `Debug` string's escape's
/// (`\n`). A key that starts with an escape never is.
fn inside_a_word(text: &str, at: usize) -> bool {
    let bytes = text.as_bytes();
    let after_alphanumeric = at
        .checked_sub(1)
        .is_some_and(|before| bytes[before].is_ascii_alphanumeric());
    !begins_escape(bytes, at)
        && after_alphanumeric
        && !at.checked_sub(2).is_some_and(|escape| begins_escape(bytes, escape))
}

/// Whether a value starts quoted (`"…"`, `'…'`, escaped `\"…\"`, `Some("…")`): it is read to
/// its closing quote, keys and all.
fn is_quoted(value: &str) -> bool {
    value.trim_start_matches('\\').starts_with(['"', '\'']) || value.starts_with("Some(")
}

/// Whether a `Debug` string's escape of a line break or tab (`\n`, `\r`, `\t`) begins at
/// `at`: a token may start there ([`token_start!`]).
fn begins_escape(bytes: &[u8], at: usize) -> bool {
    bytes.get(at) == Some(&b'\\') && matches!(bytes.get(at + 1), Some(b'n' | b'r' | b't'))
}

/// `text` with each of `matches` (ascending, apart) replaced by [`REDACTED`] but the start
/// `keep` finds in it; `None` when there are none.
fn redact(text: &str, keep: Option<&Regex>, matches: impl Iterator<Item = Range<usize>>) -> Option<String> {
    let mut redacted: Option<String> = None;
    let mut copied = 0;
    for found in matches {
        let out = redacted.get_or_insert_with(|| String::with_capacity(text.len()));
        let kept = keep
            .and_then(|keep| keep.find(&text[found.clone()]))
            .map_or(0, |kept| kept.end());
        out.push_str(&text[copied..found.start + kept]);
        out.push_str(REDACTED);
        copied = found.end;
    }
    let mut out = redacted?;
    out.push_str(&text[copied..]);
    Some(out)
}

/// Whether a segment of `name` is one of [`SENSITIVE_SEGMENTS`], or two adjacent ones join
/// into one of [`SENSITIVE_PAIRS`]; split as [`segments`] splits, without allocating.
fn has_sensitive_segment(name: &str) -> bool {
    let (mut previous, mut current) = (Segment::EMPTY, Segment::EMPTY);
    let mut previous_lower = false;
    for c in name.chars() {
        // ASCII first: names are nearly always ASCII, and its checks need no tables.
        let (alphanumeric, uppercase, lowercase) = if c.is_ascii() {
            (
                c.is_ascii_alphanumeric(),
                c.is_ascii_uppercase(),
                c.is_ascii_lowercase(),
            )
        } else {
            (c.is_alphanumeric(), c.is_uppercase(), c.is_lowercase())
        };
        let boundary = !alphanumeric || (uppercase && previous_lower);
        if boundary && !current.is_empty() {
            if current.is_listed(&previous) {
                return true;
            }
            previous = current;
            current = Segment::EMPTY;
        }
        if alphanumeric {
            previous_lower = lowercase || c.is_ascii_digit();
            current.push(c);
        } else {
            previous_lower = false;
        }
    }
    current.is_listed(&previous)
}

/// A name's segment, lowercase, as far as listed segments go: none is longer than 16 bytes
/// or has a character beyond ASCII, so a segment that has is only known not to be listed.
#[derive(Clone, Copy)]
struct Segment {
    bytes: [u8; 16],
    len: usize,
    /// Past 16 bytes, or beyond ASCII.
    unlisted: bool,
}

impl Segment {
    const EMPTY: Segment = Segment {
        bytes: [0; 16],
        len: 0,
        unlisted: false,
    };

    fn is_empty(&self) -> bool {
        self.len == 0 && !self.unlisted
    }

    fn push(&mut self, c: char) {
        match (u8::try_from(c), self.bytes.get_mut(self.len)) {
            (Ok(byte), Some(slot)) if byte.is_ascii() => {
                *slot = byte.to_ascii_lowercase();
                self.len += 1;
            }
            _ => self.unlisted = true,
        }
    }

    fn text(&self) -> Option<&[u8]> {
        (!self.unlisted && self.len > 0).then_some(&self.bytes[..self.len])
    }

    /// Whether this segment, or `previous` joined with it, is listed.
    fn is_listed(&self, previous: &Segment) -> bool {
        let Some(text) = self.text() else {
            return false;
        };
        // Listed segments are 3 to 13 bytes: most segments are not even compared.
        if (3..=13).contains(&text.len()) && SENSITIVE_SEGMENTS.iter().any(|listed| listed.as_bytes() == text) {
            return true;
        }
        previous.text().is_some_and(|before| {
            SENSITIVE_PAIRS.iter().any(|pair| {
                let pair = pair.as_bytes();
                pair.len() == before.len() + text.len() && pair.starts_with(before) && pair.ends_with(text)
            })
        })
    }
}

/// `name`'s segments, lowercase: split at non-alphanumeric characters and where a lowercase
/// letter or digit is followed by an uppercase one.
fn segments(name: &str) -> Vec<String> {
    let mut segments = Vec::new();
    let mut current = String::new();
    let mut previous_lower = false;
    for c in name.chars() {
        if !c.is_alphanumeric() {
            if !current.is_empty() {
                segments.push(std::mem::take(&mut current));
            }
            previous_lower = false;
            continue;
        }
        if c.is_uppercase() && previous_lower && !current.is_empty() {
            segments.push(std::mem::take(&mut current));
        }
        previous_lower = c.is_lowercase() || c.is_ascii_digit();
        current.extend(c.to_lowercase());
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> Scrubber {
        Scrubbing::default().build().unwrap()
    }

    #[test]
    fn sensitive_names_match_by_whole_segment() {
        let scrubber = on();
        for name in [
            "password",
            "db.password",
            "access_token",
            "api_key",
            "apiKey",
            "X-Api-Key",
            "authorization",
            "session.id",
            "private_key",
            "client_secret",
            "AWS_SECRET_ACCESS_KEY",
            "cookie",
            "jwt",
        ] {
            assert!(scrubber.redacts_field(name), "{name}");
        }
        for name in [
            "input_tokens",
            "gen_ai.usage.output_tokens",
            "inputTokens",
            "author",
            "authenticated",
            "task",
            "agent_name",
            "keyboard",
            "monkey",
            "tokenizer",
        ] {
            assert!(!scrubber.redacts_field(name), "{name}");
        }
        assert!(!Scrubber::off().redacts_field("password"));
        let added = Scrubbing::default().with_field_names(["Customer_ID"]).build().unwrap();
        for name in ["customer_id", "billing.customer_id", "customerId"] {
            assert!(added.redacts_field(name), "{name}");
        }
        assert!(!added.redacts_field("customer"));
    }

    #[test]
    fn secrets_in_json_are_replaced_however_often_debug_escaped_it() {
        let scrubber = on();
        let json = [
            r#"{"password": "hunter2tail7", "keep": "visible"}"#,
            r#"{"keep": "visible", "api_key": "a \"quoted\" hunter2tail7\\"}"#,
            r#"{"token": "hunter2tail7\\", "keep": "visible"}"#,
            r#"{"authorization": "Digest username=\"bob\", response=\"hunter2tail7\"", "keep": "visible"}"#,
            r#"{"keep": "visible", "authorization": "Basic hunter2tail7\\"}"#,
        ];
        for text in json {
            let once = format!("{text:?}");
            let twice = format!("{:?}", Some(&once));
            for text in [text.to_owned(), once, twice] {
                let out = scrubber.scrub(&text);
                assert!(!out.contains("tail7"), "{text} became {out}");
                assert!(out.contains("visible"), "{text} became {out}");
            }
        }
        for (text, scrubbed) in [
            // A value cut off before its closing quote, to the end.
            (r#"{"password": "hunter2tail7"#, r#"{"password": [REDACTED]"#),
            (
                r#"body: "{\"password\": \"hunter2tail7"#,
                r#"body: "{\"password\": [REDACTED]"#,
            ),
            // A bare key: its value as a `Debug` string or an `Option` shows it.
            (
                r#"Cfg { password: "hunter2tail7", api_key: Some("hunter3tail7") }"#,
                "Cfg { password: [REDACTED], api_key: [REDACTED] }",
            ),
            (
                r#""login password=\"hunter2tail7\" failed""#,
                r#""login password=[REDACTED] failed""#,
            ),
            // Variables: words before the key, `key` after it; a URL's password.
            (
                "export POSTGRES_PASSWORD='hunter2' DB_PASSWORD=hunter3 MY_APP_API_KEY=abc123",
                "export POSTGRES_PASSWORD=[REDACTED] DB_PASSWORD=[REDACTED] MY_APP_API_KEY=[REDACTED]",
            ),
            (
                "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY secret_key: abc",
                "AWS_SECRET_ACCESS_KEY=[REDACTED] secret_key: [REDACTED]",
            ),
            (
                r#"WALLET_PRIVATE_KEY=0x4c0883a6 {"private_key": "k1", "credentials": "c1"} credential=c2"#,
                r#"WALLET_PRIVATE_KEY=[REDACTED] {"private_key": [REDACTED], "credentials": [REDACTED]} credential=[REDACTED]"#,
            ),
            (
                "private_keys_count: 3 credentials_path=/etc/app/creds.json",
                "private_keys_count: 3 credentials_path=/etc/app/creds.json",
            ),
            (
                "DATABASE_URL=postgres://admin:hunter2@db:5432/app and redis://:hunter3@cache:6379/0",
                "DATABASE_URL=postgres://admin:[REDACTED]@db:5432/app and redis://:[REDACTED]@cache:6379/0",
            ),
            // Data: a URL without a password, a port, counts and names of tokens, a URL and
            // an address in JSON, CSV and a list.
            (
                "https://db:5432/app ssh://git@github.com:22/x max_tokens=5 num_tokens: 7",
                "https://db:5432/app ssh://git@github.com:22/x max_tokens=5 num_tokens: 7",
            ),
            (
                r#"max_token: 512 eos_token: "</s>" OLDPWD=/home/x next_page_token=abc"#,
                r#"max_token: 512 eos_token: "</s>" OLDPWD=/home/x next_page_token=abc"#,
            ),
            (
                r#"{"base_url":"http://localhost:11434","user":"bob@example.com"} url,http://db:5432,admin@example.com <http://h:8080>;rel=next,<mailto:me@x.com>"#,
                r#"{"base_url":"http://localhost:11434","user":"bob@example.com"} url,http://db:5432,admin@example.com <http://h:8080>;rel=next,<mailto:me@x.com>"#,
            ),
            // Cut off: as far as the value reads.
            (r#""{\"password\": \"hunter2""#, r#""{\"password\": [REDACTED]""#),
            (r#"{"password": "hunter2\"#, r#"{"password": [REDACTED]\"#),
            (r#"password: "hunter2 tail7"#, "password: [REDACTED]"),
            // `Some` with a quote in it; Authorization quoted after a bare key.
            (
                r#"Cfg { password: Some("a\"b tail7"), n: 1 }"#,
                "Cfg { password: [REDACTED], n: 1 }",
            ),
            (
                r#"Headers { authorization: "Basic dXNlcjpwYXNz" }"#,
                r#"Headers { authorization: "Basic [REDACTED]" }"#,
            ),
            (
                r#"Proxy { authorization: Some("Basic dXNlcjpwYXNz") }"#,
                r#"Proxy { authorization: Some("Basic [REDACTED]") }"#,
            ),
            // Not JSON: a bare key's quoted value ends at the next quote.
            (
                r#"password: "C:\Temp\" and the file "notes.txt" is missing"#,
                r#"password: [REDACTED] and the file "notes.txt" is missing"#,
            ),
        ] {
            assert_eq!(scrubber.scrub(text), scrubbed, "{text}");
        }
    }

    #[test]
    fn secrets_in_text_are_replaced_and_the_rest_kept() {
        let scrubber = on();
        for (text, scrubbed) in [
            ("Implement API", "Implement API"),
            (
                "call with Authorization: Bearer abcdef0123456789abcdef please",
                "call with Authorization: Bearer [REDACTED] please",
            ),
            ("use bearer zyxwvu9876543210zyxw now", "use bearer [REDACTED] now"),
            ("the bearer of bad news", "the bearer of bad news"),
            (
                "key sk-proj-AbCdEf0123456789XyZ and sk-ant-api03-abcdefghij0123456789 done",
                "key [REDACTED] and [REDACTED] done",
            ),
            ("stripe pk_live_51Habcdefghijklmnop", "stripe [REDACTED]"),
            ("aws AKIAIOSFODNN7EXAMPLE here", "aws [REDACTED] here"),
            (
                "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sig_abc-123 end",
                "jwt [REDACTED] end",
            ),
            (
                "login with password=hunter2 then",
                "login with password=[REDACTED] then",
            ),
            ("PASSWORD: 'open sesame' ok", "PASSWORD: [REDACTED] ok"),
            (
                r#"{"password": "map-secret", "api_key":"k-1", "authorization": "Basic dXNlcjpwYXNz"}"#,
                r#"{"password": [REDACTED], "api_key":[REDACTED], "authorization": "Basic [REDACTED]"}"#,
            ),
            // JSON inside a `Debug` string: escaped quotes, an escaped quote inside the value.
            (
                r#""{\"password\": \"a b\\\"c\\\\\", \"api_key\":\"k-1\", \"n\": 1}""#,
                r#""{\"password\": [REDACTED], \"api_key\":[REDACTED], \"n\": 1}""#,
            ),
            (
                r#"Err(Status { body: "{\"authorization\": \"Basic dXNlcjpwYXNz\"}" })"#,
                r#"Err(Status { body: "{\"authorization\": \"Basic [REDACTED]\"}" })"#,
            ),
            (
                r#"Some("{\\\"token\\\": \\\"a\\\\\\\"b\\\", \\\"authorization\\\": \\\"Bearer x\\\"}")"#,
                r#"Some("{\\\"token\\\": [REDACTED], \\\"authorization\\\": \\\"Bearer [REDACTED]\\\"}")"#,
            ),
            (r#"{"password": "a\"b", "n": 1}"#, r#"{"password": [REDACTED], "n": 1}"#),
            (
                r#""{\"secret\": true, \"token\": 5, \"input_tokens\": 5}""#,
                r#""{\"secret\": true, \"token\": 5, \"input_tokens\": 5}""#,
            ),
            // Data, not secrets: an unquoted value of a quoted key, and token counts.
            (
                r#"{"secret": true, "token": 5, "input_tokens": 5}"#,
                r#"{"secret": true, "token": 5, "input_tokens": 5}"#,
            ),
            (
                r#"Authorization: Basic dXNl"cjpwYXNz and Digest username="bob""#,
                "Authorization: Basic [REDACTED] and Digest username=\"bob\"",
            ),
            ("url?api_key=abc123&x=1", "url?api_key=[REDACTED]&x=1"),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY----- after",
                "[REDACTED] after",
            ),
            ("cut -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg", "cut [REDACTED]"),
            ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", "gh [REDACTED]"),
            (
                "HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567 GROQ_API_KEY=gsk_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGhIjKlMnOp",
                "HF_TOKEN=[REDACTED] GROQ_API_KEY=[REDACTED]",
            ),
            (
                "r8_AbCdEfGhIjKlMnOpQrStUvWxYz0123456 pplx-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGh glpat-AbCdEfGhIjKlMnOpQrSt npm_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
                "[REDACTED] [REDACTED] [REDACTED] [REDACTED]",
            ),
            ("shf_x, gsk_short, npm_ci and r8_y are words", "shf_x, gsk_short, npm_ci and r8_y are words"),
            (
                "CI_JOB_TOKEN=glcbt-64_AbCdEfGhIjKlMnOpQrSt gldt-AbCdEfGhIjKlMnOpQrSt glpat-AbCdEfGhIjKlMnOpQrStUvWxYz0.01.0w1234567 end",
                "CI_JOB_TOKEN=[REDACTED] [REDACTED] [REDACTED] end",
            ),
            (
                r"gloas-AbCdEfGhIjKlMnOpQrSt glrt-AbCdEfGhIjKlMnOpQrSt.\nglptt-AbCdEfGhIjKlMnOpQrSt",
                r"[REDACTED] [REDACTED].\n[REDACTED]",
            ),
            (
                "see glpat-AbCdEfGhIjKlMnOpQrSt. A global glance at English, toast-oas-x",
                "see [REDACTED]. A global glance at English, toast-oas-x",
            ),
            // A token at the start of a line of a `Debug` string, after `\n`.
            (
                r#"Output { stdout: "tokens:\nhf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567\r\nsk-proj-AbCdEf0123456789XyZ\tghp_abcdefghijklmnopqrstuvwxyz0123456789\nBearer abcdef0123456789abcdef" }"#,
                r#"Output { stdout: "tokens:\n[REDACTED]\r\n[REDACTED]\t[REDACTED]\nBearer [REDACTED]" }"#,
            ),
            ("C:\\new\\tasks and \\nskills", "C:\\new\\tasks and \\nskills"),
            (
                "sklearn is not a key, nor is sk-short",
                "sklearn is not a key, nor is sk-short",
            ),
            (
                "input_tokens=512 output_tokens: 20",
                "input_tokens=512 output_tokens: 20",
            ),
        ] {
            assert_eq!(scrubber.scrub(text), scrubbed, "{text:?}");
            assert_eq!(Scrubber::off().scrub(text), text);
        }
    }

    /// The key rule's keys: inside longer keys, as AWS's SDKs and a kubeconfig name them, and
    /// over a value that is a key and value in turn.
    #[test]
    fn values_under_keys_are_replaced_wherever_the_key_is() {
        let scrubber = on();
        for (text, scrubbed) in [
            // An unquoted value ends where a key inside it starts, which is matched on its own.
            (
                "registry:\n  credentials:\n    password: hunter2tail7\n  url: r",
                "registry:\n  credentials:\n    password: [REDACTED]\n  url: r",
            ),
            (
                "signer:\n  private_key:\n    passphrase: \"open sesame\"\n",
                "signer:\n  private_key:\n    passphrase: [REDACTED]\n",
            ),
            (
                "Settings(credentials=Credentials(password='hunter2 tail7')) and credentials=dict(token=\"abc tail7\")",
                "Settings(credentials=[REDACTED]password=[REDACTED])) and credentials=[REDACTED]token=[REDACTED])",
            ),
            (
                "Invalid credentials: password='hunter2 tail7'",
                "Invalid credentials: password=[REDACTED]",
            ),
            (
                r#""[default]\naws_secret_access_key = wJalrXUt\naws_session_token = FwoGZXIvYXdzEJr""#,
                r#""[default]\naws_secret_access_key = [REDACTED]\naws_session_token = [REDACTED]""#,
            ),
            ("token=abc:def&x=1", "token=[REDACTED]&x=1"),
            // Any name at the start of a line of a `Debug` string ends a value, its own kept.
            (
                r#""PATH=/usr/bin\naccess_token=abc\nHOME=/root\nPGPASSWORD=\nUSER=bob\tSHELL=/bin/sh""#,
                r#""PATH=/usr/bin\naccess_token=[REDACTED]\nHOME=/root\nPGPASSWORD=\nUSER=bob\tSHELL=/bin/sh""#,
            ),
            // A key inside a word is the value's, and an Authorization header ends a value.
            (
                "DB_PASSWORD=SuperSecret:123 password=MyPassword:2024!",
                "DB_PASSWORD=[REDACTED] password=[REDACTED]",
            ),
            (
                r#""GET / HTTP/1.1\r\nX-Api-Key: k1\r\nAuthorization: Basic dXNlcjpwYXNz\r\nHost: x\r\n""#,
                r#""GET / HTTP/1.1\r\nX-Api-Key: [REDACTED]\r\nAuthorization: Basic [REDACTED]\r\nHost: x\r\n""#,
            ),
            // An Authorization value runs through a backslash that is not a line break's.
            (
                r"authorization=CORP\jdoe:Passw0rd and Authorization: Bearer abc\/def0123456789abcdef",
                r"authorization=[REDACTED] and Authorization: Bearer [REDACTED]",
            ),
            // Keys at the start of a line of a `Debug` string, after its `\n`.
            (
                r#""GET / HTTP/1.1\r\nAuthorization: Basic dXNlcjpwYXNz\r\nHost: x\r\n""#,
                r#""GET / HTTP/1.1\r\nAuthorization: Basic [REDACTED]\r\nHost: x\r\n""#,
            ),
            (
                r#""HOME=/root\naccess_token=xyz\nrefresh_token=abc\ntoken=t\npassword=p\tpwd=w""#,
                r#""HOME=/root\naccess_token=[REDACTED]\nrefresh_token=[REDACTED]\ntoken=[REDACTED]\npassword=[REDACTED]\tpwd=[REDACTED]""#,
            ),
            (
                r"C:\new\tokens and \ttoken_count=5 \nauthorization_url=x",
                r"C:\new\tokens and \ttoken_count=5 \nauthorization_url=x",
            ),
            // A value ending in `=` or `:` before another key or a quote takes neither.
            (
                "echo \"TOKEN=YWJjZA==\" && mysql -u root --password=\"hunter 2\" db",
                "echo \"TOKEN=[REDACTED]\" && mysql -u root --password=[REDACTED] db",
            ),
            (
                "token=abc: password='hunter2 tail' api_key=c2VjcmV0== status=401",
                "token=[REDACTED] password=[REDACTED] api_key=[REDACTED] status=401",
            ),
            (
                r#"{"cmd": "export API_KEY=YWJj==", "exit_code": 0}"#,
                r#"{"cmd": "export API_KEY=[REDACTED]", "exit_code": 0}"#,
            ),
            // AWS's temporary credentials as its CLI and SDKs print them, and a kubeconfig's
            // client key.
            (
                r#"{"Credentials": {"AccessKeyId": "ASIAIOSFODNN7EXAMPLE", "SecretAccessKey": "wJalrXUtnFEMI", "SessionToken": "FwoGZXIvYXdz"}}"#,
                r#"{"Credentials": {"AccessKeyId": "[REDACTED]", "SecretAccessKey": [REDACTED], "SessionToken": [REDACTED]}}"#,
            ),
            (
                "secretAccessKey: 'wJalrXUtnFEMI', AWS_SESSION_TOKEN=FwoGZXIvYXdz client-key-data: LS0tLS1CRUdJTi",
                "secretAccessKey: [REDACTED], AWS_SESSION_TOKEN=[REDACTED] client-key-data: [REDACTED]",
            ),
            (
                "session_count=3 sessions: 4 client-key-data-path=/k",
                "session_count=3 sessions: 4 client-key-data-path=/k",
            ),
        ] {
            assert_eq!(scrubber.scrub(text), scrubbed, "{text:?}");
        }
    }

    #[test]
    fn a_secret_straddling_the_cut_is_caught_whole() {
        let scrubber = on();
        let text = format!("{} sk-abcdefghijklmnopqrstuvwxyz", "x".repeat(94));
        let kept = scrubber.scrub_and_cut(&text, 100);
        assert_eq!(kept, format!("{} [REDA…", "x".repeat(94)));
        assert!(!kept.contains("sk-ab"));
        assert_eq!(
            Scrubber::off().scrub_and_cut(&text, 100),
            format!("{} sk-ab…", "x".repeat(94))
        );
    }

    #[test]
    fn added_patterns_are_searched_and_bad_ones_name_the_setting() {
        let scrubber = Scrubbing::default()
            .with_patterns([r"\bACME-[0-9]{8}\b", r"\bbob\b"])
            .build()
            .unwrap();
        assert_eq!(
            scrubber.scrub("order ACME-12345678 for customer=bob"),
            "order [REDACTED] for customer=[REDACTED]"
        );
        let error = Scrubbing::default().with_patterns(["("]).build().unwrap_err();
        assert!(error.to_string().contains("with_scrubbing"), "{error}");
    }

    #[test]
    fn the_quick_check_agrees_with_the_segments() {
        let reference = |name: &str| {
            let segments = segments(name);
            segments
                .iter()
                .any(|segment| SENSITIVE_SEGMENTS.contains(&segment.as_str()))
                || segments
                    .windows(2)
                    .any(|pair| SENSITIVE_PAIRS.contains(&format!("{}{}", pair[0], pair[1]).as_str()))
        };
        for name in [
            "password",
            "db.password",
            "api_key",
            "apiKey",
            "X-Api-Key",
            "input_tokens",
            "AWS_SECRET_ACCESS_KEY",
            "ünïcode_token",
            "token_ü",
            "ü",
            "a..b__token",
            "averyveryverylongsegmentname_password",
            "averyveryverylongsegmentnametoken",
            "HTTPToken",
            "oauth2Token",
            "api.key",
            "apikeyx",
            "",
            "_",
            "credit-card",
            "ü_key",
            "apiüKey",
        ] {
            assert_eq!(has_sensitive_segment(name), reference(name), "{name:?}");
        }
    }

    #[test]
    fn names_split_into_segments_as_written() {
        assert_eq!(segments("apiKey"), ["api", "key"]);
        assert_eq!(segments("X-Api-Key"), ["x", "api", "key"]);
        assert_eq!(
            segments("gen_ai.usage.input_tokens"),
            ["gen", "ai", "usage", "input", "tokens"]
        );
        assert_eq!(segments("HTTPHeader"), ["httpheader"]);
        assert_eq!(segments("oauth2Token"), ["oauth2", "token"]);
    }

    #[test]
    fn triggers_are_lowercase_ascii() {
        for trigger in SECRET_PATTERNS.iter().flat_map(|secret| secret.triggers) {
            assert!(trigger.is_ascii(), "{trigger:?}");
            assert_eq!(*trigger, trigger.to_ascii_lowercase(), "{trigger:?}");
        }
    }

    #[test]
    fn a_text_of_repeated_triggers_is_scrubbed_whole() {
        let scrubber = on();
        let text = format!("{}password=hunter2 {}", "pwd ".repeat(1_280), "token ".repeat(20));
        let kept = scrubber.scrub(&text);
        assert!(kept.contains("password=[REDACTED]"), "{kept}");
        assert!(!kept.contains("hunter2"));
        let few = format!("{}password=hunter2", "pwd ".repeat(3));
        assert_eq!(scrubber.scrub(&few), format!("{}password=[REDACTED]", "pwd ".repeat(3)));
    }

    /// A match may start before its trigger only where an ASCII word or an escape begins
    /// (the search tries no other place there), or it is a key's, which may start anywhere: a
    /// match from its trigger on keeps the same key and redacts the same value.
    #[test]
    fn patterns_that_start_before_their_triggers_start_at_a_word() {
        for secret in &SECRET_PATTERNS {
            let after_flags = secret.pattern.split_once(')').map_or("", |(_, rest)| rest);
            let at_a_word = after_flags.starts_with(r"\b(?:") || after_flags.starts_with(token_start!());
            let a_key = secret.pattern.starts_with("(?i-u)(?:(?:password|") && secret.keep.is_some();
            assert!(secret.before_trigger == 0 || at_a_word || a_key, "{}", secret.pattern);
        }
    }

    /// The lowercase search finds one trigger per start: a trigger that began another
    /// pattern's would hide that pattern.
    #[test]
    fn no_trigger_starts_another_patterns_trigger() {
        for (index, secret) in SECRET_PATTERNS.iter().enumerate() {
            for (other_index, other) in SECRET_PATTERNS.iter().enumerate() {
                if index == other_index {
                    continue;
                }
                for trigger in secret.triggers {
                    for longer in other.triggers {
                        assert!(!longer.starts_with(trigger), "{trigger:?} starts {longer:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn long_texts_are_searched_for_triggers_in_any_case() {
        let triggers = Triggers::built_in().unwrap();
        let filler = "x".repeat(Triggers::COPY_FROM_LEN);
        for (text, pattern) in [
            ("Authorization: Basic", 10),
            ("BEARER", 0),
            ("eYj", 1),
            ("-----Begin", 8),
            ("PassPhrase", 9),
            ("GITHUB_PAT_", 4),
            ("GLPAT-", 6),
            ("HTTPS://", 11),
        ] {
            let expected: Vec<bool> = (0..SECRET_PATTERNS.len()).map(|index| index == pattern).collect();
            // Inside the text, and in its last bytes, which are too few for the vectorised
            // search and are searched by its fallback (Rabin-Karp).
            for padded in [format!("{filler}{text}{filler}"), format!("{filler}{text}")] {
                assert_eq!(triggers.patterns_in(&padded).as_slice(), expected, "{padded:?}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn long_texts_get_the_vectorised_search_on_x86_64() {
        if std::is_x86_feature_detected!("ssse3") {
            assert!(Triggers::built_in().unwrap().lowercase.is_some());
        }
    }

    /// `text` with the case of its ASCII letters flipped where `cases` has a bit set (bit
    /// `n % 64` for the `n`th character).
    fn flip_ascii_case(text: &str, cases: u64) -> String {
        text.chars()
            .enumerate()
            .map(|(at, c)| match cases >> (at % 64) & 1 {
                1 if c.is_ascii_lowercase() => c.to_ascii_uppercase(),
                1 => c.to_ascii_lowercase(),
                _ => c,
            })
            .collect()
    }

    mod against_whole_text_search {
        use std::sync::LazyLock;

        use proptest::prelude::*;

        use super::super::{Scrubber, Scrubbing};
        use super::flip_ascii_case;

        static SCRUBBER: LazyLock<Scrubber> = LazyLock::new(|| Scrubbing::default().build().unwrap());

        /// What scrubbing must give: every pattern in turn, searched in the whole text.
        fn whole_text_scrubbed(text: &str) -> String {
            let rules = SCRUBBER.rules.as_ref().unwrap();
            rules.built_in.iter().fold(text.to_owned(), |text, pattern| {
                pattern.redact_all(&text).unwrap_or(text)
            })
        }

        /// Secrets of every kind, near misses, triggers alone, and what may stand before a
        /// secret (a word character, which `\b` must see), in mixed case.
        fn text() -> impl Strategy<Value = String> {
            let pieces = vec![
                "Bearer abcdefghijklmnop0123",
                "bearer  ABCdef1234567890xyz==",
                "Bearer short",
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_nature-x",
                "eyJ",
                "sk-proj-abcdefghijklmnop1234",
                "pk_live_ABCDEFGHIJKLMNOP12",
                "rk_test_0123456789abcdefgh",
                "task-force",
                "AKIAIOSFODNN7EXAMPLE",
                "ASIA1234567890ABCDEF",
                "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
                "github_pat_11ABCDEFG0123456789abcdefghijklmnop",
                "xoxb-1234567890-abcdef",
                "AIzaSyA1234567890abcdefghijklmnopqrstuv",
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----",
                "-----BEGIN PRIVATE KEY-----",
                "-----BEGIN CERTIFICATE-----",
                "password=hunter2",
                "client_secret: 's3cr3t'",
                "clientsecret=abc",
                "refresh-token = abc.def",
                "access_token=xyz",
                "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
                "gsk_",
                "DB_PASSWORD=x",
                "WALLET_PRIVATE_KEY=0xab",
                "credentials: c",
                "Credentials(password=",
                "credentials:\n  token: t",
                "TOKEN=YWJj==\"",
                "password=password=",
                "SuperSecret:",
                "\\nHOME=/root",
                "PGPASSWORD=\\n",
                "\\r\\nX-Api-Key: k\\r\\n",
                "Basic ab\\/cd",
                "\\ntoken=t\\n",
                "\\r\\nAuthorization: Basic dXNl\\r\\n",
                "api_key: pwd:\\\"",
                "SessionToken\": \"",
                "AWS_SESSION_TOKEN=",
                "secretAccessKey: '",
                "client-key-data: ",
                "glcbt-64_AbCdEfGhIjKlMnOpQrSt",
                "gloas-AbCdEfGhIjKlMnOpQrSt",
                "xgloas-AbCdEfGhIjKlMnOpQrSt",
                "\\n",
                "\\t",
                "secret_access_key: k",
                "postgres://u:p@h",
                "redis://:p@",
                "://",
                "@",
                ":",
                "auth_token:\"q w\"",
                "api-key: k1",
                "apikey=K",
                "pwd=x",
                "passphrase: \"a long one\"",
                "Authorization: Basic dXNlcjpwYXNz",
                "authorization=Bearer abc",
                "secret",
                "tokens",
                "Token:",
                "x",
                "_",
                " ",
                "\n",
                "=",
                "é",
                "日本",
            ];
            let piece = (proptest::sample::select(pieces), any::<u64>())
                .prop_map(|(piece, cases): (&str, u64)| flip_ascii_case(piece, cases));
            // Pieces kept as written half the time: a mixed-case secret rarely matches.
            let piece = prop_oneof![
                proptest::sample::select(vec![
                    "Bearer abcdefghijklmnop0123",
                    "client_secret: 's3cr3t'",
                    "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI",
                    "mysql://root:hunter2@db:3306",
                    "refresh-token = abc.def",
                    "-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----",
                    "sk-proj-abcdefghijklmnop1234",
                    "x",
                    " "
                ])
                .prop_map(str::to_owned),
                piece,
            ];
            (proptest::collection::vec(piece, 0..16), any::<bool>()).prop_map(|(pieces, long)| {
                // Long texts take the vectorised trigger search, short ones the other.
                let padding = if long { " ".repeat(40) } else { String::new() };
                format!("{padding}{}", pieces.concat())
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]
            #[test]
            fn scrubbing_redacts_what_a_whole_text_search_finds(text in text()) {
                prop_assert_eq!(SCRUBBER.scrub(&text).into_owned(), whole_text_scrubbed(&text));
            }
        }
    }

    mod both_searches {
        use proptest::prelude::*;

        use super::super::{Triggers, SECRET_PATTERNS};
        use super::flip_ascii_case;

        /// Texts of triggers, their tails (so that triggers overlap: `akia` + `iza`) and
        /// their heads (near misses: `passwor`), in mixed case, with filler.
        fn text() -> impl Strategy<Value = String> {
            let pieces: Vec<&'static str> = SECRET_PATTERNS
                .iter()
                .flat_map(|secret| secret.triggers.iter().copied())
                .flat_map(|trigger| {
                    let tails = (0..trigger.len()).map(move |from| &trigger[from..]);
                    tails.chain((1..trigger.len()).map(move |to| &trigger[..to]))
                })
                .chain([" ", "é"])
                .collect();
            proptest::collection::vec((proptest::sample::select(pieces), any::<u64>()), 0..24).prop_map(|parts| {
                parts
                    .into_iter()
                    .map(|(piece, cases)| flip_ascii_case(piece, cases))
                    .collect()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn the_lowercase_search_finds_what_the_any_case_search_finds(text in text()) {
                let triggers = Triggers::built_in().unwrap();
                let any_case = Triggers { lowercase: None, ..Triggers::built_in().unwrap() };
                // Long enough for the lowercase search, the text's triggers in its last bytes
                // as often as not.
                let padded = format!("{}{text}", " ".repeat(Triggers::COPY_FROM_LEN));
                prop_assert_eq!(triggers.patterns_in(&padded), any_case.patterns_in(&padded));
            }
        }
    }
}
