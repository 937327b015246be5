//! The JSON line: fixed key order, no duplicate keys, stable types, bounded size.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, LogFormat};
use std::io::Write as _;

use crate::execution::{Execution, TraceIds};
use crate::gen_ai::Usage;
use crate::status::Status;
use crate::text::{cut as truncate, MAX_LABEL_CHARS as MAX_AGENT_NAME_CHARS};

/// A line's bytes besides its text fields, with room to spare.
const LINE_BYTES: usize = 512;

/// Everything about the line that is fixed at start-up.
#[derive(Clone)]
pub(crate) struct LineFormat {
    format: LogFormat,
    max_task_chars: usize,
    /// The closing fields (`,"service.name":"..."}` and the like), escaped once.
    tail: Vec<u8>,
    /// The line's start for the last second formatted: lines come many to a second.
    prefix: Prefix,
}

impl LineFormat {
    pub(crate) fn new(config: &Config) -> Self {
        let mut tail = br#","service.name":"#.to_vec();
        write_str(&mut tail, &config.service_name);
        if config.log_format == LogFormat::Ecs {
            tail.extend_from_slice(br#","service.environment":"#);
            write_str(&mut tail, &config.environment);
        }
        tail.extend_from_slice(b"}\n");
        LineFormat {
            format: config.log_format,
            max_task_chars: config.max_task_chars,
            tail,
            prefix: Prefix::new(config.log_format),
        }
    }

    /// Appends one complete line, `\n` included, to `out`.
    pub(crate) fn write(&mut self, e: &Execution, out: &mut Vec<u8>) {
        // Room for the whole line at once in the usual case (text that needs no escaping),
        // and no more than the kept text takes: a task of a gigabyte writes a short line.
        let kept = |text: &str, chars: usize| text.len().min(chars.saturating_mul(4).saturating_add(3));
        out.reserve(
            (LINE_BYTES + self.tail.len())
                .saturating_add(kept(&e.agent_name, MAX_AGENT_NAME_CHARS))
                .saturating_add(e.task.as_deref().map_or(0, |task| kept(task, self.max_task_chars))),
        );
        match self.format {
            LogFormat::Guide => self.write_guide(e, out),
            LogFormat::Ecs => self.write_ecs(e, out),
        }
        if let Some(ids) = e.trace {
            out.extend_from_slice(&ids_text(ids));
        }
        out.extend_from_slice(&self.tail);
    }

    /// The guide's six fields, with `@timestamp` and `log.level` for Filebeat.
    fn write_guide(&mut self, e: &Execution, out: &mut Vec<u8>) {
        self.prefix.write(e.finished_at, out);
        out.extend_from_slice(match e.status {
            Status::Success => br#""INFO","event":"agent_execution","agent_name":"#.as_slice(),
            Status::Failure => br#""ERROR","event":"agent_execution","agent_name":"#.as_slice(),
            Status::Cancelled => br#""WARN","event":"agent_execution","agent_name":"#.as_slice(),
        });
        write_str(out, truncate(&e.agent_name, MAX_AGENT_NAME_CHARS));
        if let Some(task) = &e.task {
            out.extend_from_slice(br#","task":"#);
            write_str(out, truncate(task, self.max_task_chars));
        }
        out.extend_from_slice(br#","duration_seconds":"#);
        write_seconds(out, e.duration);
        out.extend_from_slice(match e.status {
            Status::Success => br#","status":"success""#.as_slice(),
            Status::Failure => br#","status":"failure""#.as_slice(),
            Status::Cancelled => br#","status":"cancelled""#.as_slice(),
        });
        if let Some(usage) = &e.usage {
            write_usage(usage, &GUIDE_USAGE_KEYS, out);
        }
        self.write_failure(e, out);
    }

    /// ECS 8 names: `event.*` for the outcome and duration (nanoseconds), `gen_ai.*` for the
    /// agent, and nothing Filebeat owns (`agent.*`, `ecs.*`, `host.*`, `input.*`, `log.file`).
    fn write_ecs(&mut self, e: &Execution, out: &mut Vec<u8>) {
        let agent_name = truncate(&e.agent_name, MAX_AGENT_NAME_CHARS);
        self.prefix.write(e.finished_at, out);
        out.extend_from_slice(match e.status {
            Status::Success => br#""info""#.as_slice(),
            Status::Failure => br#""error""#.as_slice(),
            Status::Cancelled => br#""warn""#.as_slice(),
        });
        out.extend_from_slice(br#","message":"agent_execution "#);
        write_str_contents(out, &agent_name);
        out.push(b' ');
        out.extend_from_slice(e.status.as_str().as_bytes());
        out.push(b'"');
        out.extend_from_slice(br#","event.kind":"event","event.action":"agent_execution","event.outcome":"#);
        // ECS allows `success`, `failure` and `unknown`: a cancelled execution did not succeed
        // (its `error.type` says `cancelled`).
        out.extend_from_slice(match e.status {
            Status::Success => br#""success""#.as_slice(),
            Status::Failure | Status::Cancelled => br#""failure""#.as_slice(),
        });
        out.extend_from_slice(br#","event.duration":"#);
        let nanos = u64::try_from(e.duration.as_nanos()).unwrap_or(u64::MAX);
        out.extend_from_slice(itoa::Buffer::new().format(nanos).as_bytes());
        out.extend_from_slice(br#","gen_ai.agent.name":"#);
        write_str(out, &agent_name);
        out.extend_from_slice(br#","gen_ai.operation.name":"invoke_agent""#);
        if let Some(task) = &e.task {
            out.extend_from_slice(br#","agent_execution.task":"#);
            write_str(out, truncate(task, self.max_task_chars));
        }
        if let Some(usage) = &e.usage {
            write_usage(usage, &ECS_USAGE_KEYS, out);
        }
        self.write_failure(e, out);
    }

    fn write_failure(&self, e: &Execution, out: &mut Vec<u8>) {
        if let Some(failure) = &e.failure {
            out.extend_from_slice(br#","error.type":"#);
            write_str(out, truncate(failure.error_type(), MAX_AGENT_NAME_CHARS));
            out.extend_from_slice(br#","error.message":"#);
            write_str(out, truncate(failure.description(), self.max_task_chars));
        }
    }
}

/// The keys of the usage fields, in order: model, input, output and cache-read tokens, cost.
type UsageKeys = [&'static [u8]; 5];

const GUIDE_USAGE_KEYS: UsageKeys = [
    br#","model":"#,
    br#","input_tokens":"#,
    br#","output_tokens":"#,
    br#","cache_read_tokens":"#,
    br#","cost_usd":"#,
];

const ECS_USAGE_KEYS: UsageKeys = [
    br#","gen_ai.request.model":"#,
    br#","gen_ai.usage.input_tokens":"#,
    br#","gen_ai.usage.output_tokens":"#,
    br#","gen_ai.usage.cache_read.input_tokens":"#,
    br#","gen_ai.usage.cost_usd":"#,
];

/// The execution's model, tokens (when any was recorded) and cost (when any was priced),
/// numbers as numbers; the cost always with a fraction or an exponent, so it maps as a float.
fn write_usage(usage: &Usage, keys: &UsageKeys, out: &mut Vec<u8>) {
    if let Some(model) = &usage.model {
        out.extend_from_slice(keys[0]);
        write_str(out, truncate(model, MAX_AGENT_NAME_CHARS));
    }
    if usage.has_tokens {
        let tokens = usage.tokens;
        for (key, count) in [
            (keys[1], tokens.input),
            (keys[2], tokens.output),
            (keys[3], tokens.cache_read),
        ] {
            out.extend_from_slice(key);
            out.extend_from_slice(itoa::Buffer::new().format(count).as_bytes());
        }
    }
    if let Some(cost) = usage.cost_usd {
        out.extend_from_slice(keys[4]);
        // Debug of a finite f64: the shortest text that reads back the same, never `1` for 1.0.
        let _ = write!(out, "{cost:?}");
    }
}

/// A JSON string: quotes, backslashes and control characters escaped (`serde_json`'s rules).
fn write_str(out: &mut Vec<u8>, text: impl AsRef<str>) {
    out.push(b'"');
    write_str_contents(out, text.as_ref());
    out.push(b'"');
}

/// The inside of a JSON string, escaped as [`write_str`] escapes it.
fn write_str_contents(out: &mut Vec<u8>, text: &str) {
    // Names and tasks rarely need escaping: one scan and one copy then, not serde_json's
    // run-by-run writes through `io::Write`.
    if needs_escape(text) {
        let start = out.len();
        // Writing a `str` into a `Vec` cannot fail; serde_json quotes the string, and the
        // quotes are the caller's.
        if serde_json::to_writer(&mut *out, text).is_ok() && out.len() >= start + 2 {
            out.pop();
            out.remove(start);
        }
    } else {
        out.extend_from_slice(text.as_bytes());
    }
}

/// Whether JSON needs any byte of `text` escaped: a control character, a quote or a backslash.
#[allow(
    clippy::needless_bitwise_bool,
    reason = "no branch per byte, so that a chunk is checked as one vector"
)]
fn needs_escape(text: &str) -> bool {
    let special = |byte: u8| (byte < 0x20) | (byte == b'"') | (byte == b'\\');
    // Without a branch per byte in whole chunks, so that each is checked 16 bytes at a time.
    let mut chunks = text.as_bytes().chunks_exact(16);
    chunks
        .by_ref()
        .any(|chunk| chunk.iter().fold(false, |found, &byte| found | special(byte)))
        || chunks.remainder().iter().any(|&byte| special(byte))
}

/// The exact decimal of the duration, always with a fraction (`45.0`, never `45`, so
/// Elasticsearch maps the field as a float) and never an exponent (`0.000001`).
fn write_seconds(out: &mut Vec<u8>, duration: Duration) {
    out.extend_from_slice(itoa::Buffer::new().format(duration.as_secs()).as_bytes());
    let mut nanos = *b".000000000";
    put_digits(&mut nanos[1..], duration.subsec_nanos());
    // Trailing zeros go; the `.` and at least one digit stay.
    let digits = nanos[1..]
        .iter()
        .rposition(|&digit| digit != b'0')
        .map_or(1, |last| last + 1);
    out.extend_from_slice(&nanos[..=digits]);
}

/// `,"trace.id":"…","span.id":"…"`, the ids in lowercase hex.
fn ids_text(ids: TraceIds) -> [u8; 75] {
    const TRACE_ID: &[u8; 13] = br#","trace.id":""#;
    const SPAN_ID: &[u8; 13] = br#"","span.id":""#;
    let mut text = [b'"'; 75];
    text[..13].copy_from_slice(TRACE_ID);
    put_hex(&mut text[13..45], &ids.trace_id.to_bytes());
    text[45..58].copy_from_slice(SPAN_ID);
    put_hex(&mut text[58..74], &ids.span_id.to_bytes());
    text
}

/// Lowercase hex of `bytes`, two characters each.
fn put_hex(slot: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    const PAIRS: [[u8; 2]; 256] = {
        let mut pairs = [[0; 2]; 256];
        let mut byte = 0;
        while byte < 256 {
            pairs[byte] = [HEX[byte >> 4], HEX[byte & 0xf]];
            byte += 1;
        }
        pairs
    };
    for (pair, &byte) in slot.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&PAIRS[usize::from(byte)]);
    }
}

/// The start of a line, `{` through `"log.level":`, for the last whole UTC second asked for:
/// its date and time are formatted once a second, and each line's fraction digits put in place.
#[derive(Clone)]
struct Prefix {
    format: LogFormat,
    unix_second: Option<u64>,
    text: Vec<u8>,
    /// Where the `@timestamp`'s three digits of milliseconds are ...
    millis_at: usize,
    /// ... and the guide's `timestamp`'s six digits of microseconds.
    micros_at: Option<usize>,
}

impl Prefix {
    fn new(format: LogFormat) -> Self {
        Prefix {
            format,
            unix_second: None,
            text: Vec::new(),
            millis_at: 0,
            micros_at: None,
        }
    }

    /// Appends the start of the line of an execution that ended `at`.
    fn write(&mut self, at: SystemTime, out: &mut Vec<u8>) {
        let micros = if let Ok(since_epoch) = at.duration_since(UNIX_EPOCH) {
            let second = since_epoch.as_secs();
            if self.unix_second != Some(second) {
                self.unix_second = Some(second);
                self.build(utc(UNIX_EPOCH + Duration::from_secs(second)));
            }
            since_epoch.subsec_micros()
        } else {
            // Before 1970: a clock gone wrong, formatted as it is, not cached.
            let at = utc(at);
            self.unix_second = None;
            self.build(at);
            at.microsecond()
        };
        let start = out.len();
        out.extend_from_slice(&self.text);
        // Within the text just appended, where `build` left the digits' places.
        if let Some(millis) = out.get_mut(start + self.millis_at..start + self.millis_at + 3) {
            put_digits(millis, micros / 1000);
        }
        if let Some(micros_at) = self.micros_at {
            if let Some(digits) = out.get_mut(start + micros_at..start + micros_at + 6) {
                put_digits(digits, micros);
            }
        }
    }

    /// The prefix of the whole second of `at`, with zeros for the fraction.
    fn build(&mut self, at: time::OffsetDateTime) {
        let second = format_second(at);
        let text = &mut self.text;
        text.clear();
        text.extend_from_slice(br#"{"@timestamp":""#);
        text.extend_from_slice(&second);
        text.push(b'.');
        self.millis_at = text.len();
        text.extend_from_slice(b"000Z");
        self.micros_at = None;
        if self.format == LogFormat::Guide {
            text.extend_from_slice(br#"","timestamp":""#);
            text.extend_from_slice(&second);
            text.push(b'.');
            self.micros_at = Some(text.len());
            text.extend_from_slice(b"000000Z");
        }
        text.extend_from_slice(br#"","log.level":"#);
    }
}

/// `at` in UTC. A clock so wrong that it is past the years `time` represents (±9999) reads as
/// the nearest one it does, where `OffsetDateTime::from` would panic.
fn utc(at: SystemTime) -> time::OffsetDateTime {
    let nanos = match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).unwrap_or(i128::MAX),
        Err(before) => i128::try_from(before.duration().as_nanos()).map_or(i128::MIN, |nanos| -nanos),
    };
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(if nanos < 0 {
        time::PrimitiveDateTime::MIN.assume_utc()
    } else {
        time::PrimitiveDateTime::MAX.assume_utc()
    })
}

fn format_second(at: time::OffsetDateTime) -> [u8; 19] {
    let mut text = *b"0000-00-00T00:00:00";
    put_digits(
        &mut text[0..4],
        u32::try_from(at.year().clamp(0, 9999)).unwrap_or_default(),
    );
    put_digits(&mut text[5..7], u32::from(u8::from(at.month())));
    put_digits(&mut text[8..10], u32::from(at.day()));
    put_digits(&mut text[11..13], u32::from(at.hour()));
    put_digits(&mut text[14..16], u32::from(at.minute()));
    put_digits(&mut text[17..19], u32::from(at.second()));
    text
}

fn put_digits(slot: &mut [u8], mut value: u32) {
    for digit in slot.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execution::{Failure, TraceIds};
    use crate::test_support::execution;
    use std::time::{Duration, UNIX_EPOCH};

    fn line(task: &str, duration: Duration, failure: Option<&Failure>) -> String {
        let config = Config {
            service_name: "svc \"x\"".into(),
            max_task_chars: 10,
            ..Config::default()
        };
        let execution = Execution {
            agent_name: "backend-engineer".into(),
            task: Some(task.into()),
            duration,
            status: if failure.is_some() {
                Status::Failure
            } else {
                Status::Success
            },
            failure: failure.cloned(),
            finished_at: UNIX_EPOCH + Duration::from_micros(1_795_000_530_123_456),
            trace: Some(TraceIds {
                trace_id: opentelemetry::TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                span_id: opentelemetry::SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            }),
            usage: None,
        };
        let mut out = Vec::new();
        LineFormat::new(&config).write(&execution, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_contract_line() {
        let text = line("Implement API", Duration::from_millis(45_200), None);
        assert_eq!(
            text,
            concat!(
                r#"{"@timestamp":"2026-11-18T11:15:30.123Z","timestamp":"2026-11-18T11:15:30.123456Z","#,
                r#""log.level":"INFO","event":"agent_execution","agent_name":"backend-engineer","#,
                r#""task":"Implement …","duration_seconds":45.2,"status":"success","#,
                r#""trace.id":"4bf92f3577b34da6a3ce929d0e0e4736","span.id":"00f067aa0ba902b7","#,
                r#""service.name":"svc \"x\""}"#,
                "\n"
            )
        );
    }

    #[test]
    fn a_huge_task_takes_room_for_what_the_line_keeps_of_it() {
        let task = "x".repeat(64 << 20);
        let mut out = Vec::new();
        LineFormat::new(&Config::default()).write(
            &Execution {
                task: Some(task),
                ..execution()
            },
            &mut out,
        );
        assert!(out.len() < 4096, "{} bytes", out.len());
        assert!(out.capacity() < 64 * 1024, "{} bytes reserved", out.capacity());
    }

    #[test]
    fn the_ecs_profile() {
        let config = Config {
            log_format: LogFormat::Ecs,
            ..Config::default()
        };
        let failure = Failure::Panic;
        let execution = Execution {
            agent_name: "qa-engineer".into(),
            task: Some("Test API".into()),
            duration: Duration::from_millis(1500),
            status: Status::Failure,
            failure: Some(failure),
            finished_at: UNIX_EPOCH + Duration::from_micros(1_795_000_530_123_456),
            trace: None,
            usage: None,
        };
        let mut out = Vec::new();
        LineFormat::new(&config).write(&execution, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            concat!(
                r#"{"@timestamp":"2026-11-18T11:15:30.123Z","log.level":"error","#,
                r#""message":"agent_execution qa-engineer failure","event.kind":"event","#,
                r#""event.action":"agent_execution","event.outcome":"failure","event.duration":1500000000,"#,
                r#""gen_ai.agent.name":"qa-engineer","gen_ai.operation.name":"invoke_agent","#,
                r#""agent_execution.task":"Test API","error.type":"panic","error.message":"the agent panicked","#,
                r#""service.name":"agents","service.environment":"production"}"#,
                "\n"
            )
        );
    }

    #[test]
    fn a_clock_past_the_years_a_date_can_hold_gives_the_nearest_one() {
        for (at, timestamp) in [
            (
                UNIX_EPOCH + Duration::from_secs(400_000_000_000),
                "9999-12-31T23:59:59.",
            ),
            (
                UNIX_EPOCH - Duration::from_secs(400_000_000_000),
                "0000-01-01T00:00:00.",
            ),
            (UNIX_EPOCH - Duration::from_millis(1_500), "1969-12-31T23:59:58.5"),
        ] {
            let execution = Execution {
                duration: Duration::ZERO,
                finished_at: at,
                ..execution()
            };
            let mut out = Vec::new();
            LineFormat::new(&Config::default()).write(&execution, &mut out);
            let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let logged = value["@timestamp"].as_str().unwrap();
            assert!(logged.starts_with(timestamp), "{logged}");
        }
    }

    #[test]
    fn whole_seconds_stay_floats_and_failures_say_why() {
        let failure = Failure::ErrorEvent("bad\nthing".into());
        let text = line("t", Duration::from_secs(45), Some(&failure));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(text.contains(r#""duration_seconds":45.0,"#), "{text}");
        assert_eq!(value["status"], "failure");
        assert_eq!(value["log.level"], "ERROR");
        assert_eq!(value["error.message"], "bad\nthing");
    }

    #[test]
    fn durations_are_exact_decimals_without_exponents() {
        for (duration, text) in [
            (Duration::from_secs(45), "45.0"),
            (Duration::from_millis(45_200), "45.2"),
            (Duration::from_nanos(1_234), "0.000001234"),
            (Duration::ZERO, "0.0"),
            (Duration::new(3, 100_000_000), "3.1"),
            (Duration::new(u64::MAX, 999_999_999), "18446744073709551615.999999999"),
        ] {
            let mut out = Vec::new();
            write_seconds(&mut out, duration);
            assert_eq!(String::from_utf8(out).unwrap(), text);
        }
    }

    mod properties {
        use super::*;
        use crate::execution::{Failure, TraceIds};
        use crate::test_support::execution;
        use proptest::prelude::*;

        /// Text that tries to break a line: control characters, quotes, backslashes,
        /// escape-looking sequences, non-ASCII, and lengths far past the bound.
        fn hostile_text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[\\\"\\u{0}-\\u{1f}\\u{7f}\\\\]{0,64}",
                proptest::collection::vec(
                    prop_oneof![
                        Just("\\u0041".to_owned()),
                        Just("é".to_owned()),
                        Just("\n".to_owned()),
                        any::<char>().prop_map(String::from)
                    ],
                    0..3000
                )
                .prop_map(|parts| parts.concat()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn strings_are_written_as_serde_json_writes_them(text in hostile_text()) {
                let mut out = Vec::new();
                write_str(&mut out, &text);
                prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&text).unwrap());
            }

            #[test]
            fn timestamps_and_ids_are_exact_line_after_line(
                micros in 0u64..4_102_444_800_000_000,
                later in prop_oneof![0u64..1_000, 0u64..3_000_000],
                trace_id in any::<u128>(),
                span_id in any::<u64>(),
                ecs in any::<bool>(),
            ) {
                let config = Config {
                    log_format: if ecs { LogFormat::Ecs } else { LogFormat::Guide },
                    ..Config::default()
                };
                let mut format = LineFormat::new(&config);
                // Two lines from one format: the second may fall in the first's second.
                for micros in [micros, micros + later] {
                    let finished_at = UNIX_EPOCH + Duration::from_micros(micros);
                    let execution = Execution {
                        finished_at,
                        trace: Some(TraceIds {
                            trace_id: opentelemetry::TraceId::from_bytes(trace_id.to_be_bytes()),
                            span_id: opentelemetry::SpanId::from_bytes(span_id.to_be_bytes()),
                        }),
                        ..execution()
                    };
                    let mut out = Vec::new();
                    format.write(&execution, &mut out);
                    let value: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
                    let at = time::OffsetDateTime::from(finished_at);
                    let second = format!(
                        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                        at.year(), u8::from(at.month()), at.day(), at.hour(), at.minute(), at.second()
                    );
                    let millis = format!("{second}.{:03}Z", at.millisecond());
                    prop_assert_eq!(value["@timestamp"].as_str(), Some(millis.as_str()));
                    if !ecs {
                        let micros = format!("{second}.{:06}Z", at.microsecond());
                        prop_assert_eq!(value["timestamp"].as_str(), Some(micros.as_str()));
                    }
                    let trace = format!("{trace_id:032x}");
                    let span = format!("{span_id:016x}");
                    prop_assert_eq!(value["trace.id"].as_str(), Some(trace.as_str()));
                    prop_assert_eq!(value["span.id"].as_str(), Some(span.as_str()));
                }
            }

            #[test]
            fn every_line_is_one_bounded_json_object(
                agent_name in hostile_text(),
                task in hostile_text(),
                millis in any::<u32>(),
                failed in any::<bool>(),
                ecs in any::<bool>(),
            ) {
                let max_task_chars = 100;
                let config = Config {
                    max_task_chars,
                    log_format: if ecs { LogFormat::Ecs } else { LogFormat::Guide },
                    ..Config::default()
                };
                let failure = Failure::ErrorEvent(task.clone());
                let execution = Execution {
                    agent_name: agent_name.as_str().into(),
                    task: Some(task.clone()),
                    duration: Duration::from_millis(u64::from(millis)),
                    status: if failed { Status::Failure } else { Status::Success },
                    failure: failed.then_some(failure),
                    finished_at: SystemTime::now(),
                    trace: None,
                    usage: None,
                };
                let mut out = Vec::new();
                LineFormat::new(&config).write(&execution, &mut out);

                // One line: a single `\n`, at the end.
                prop_assert_eq!(out.split(|&b| b == b'\n').count(), 2, "exactly one newline");
                prop_assert_eq!(out.last(), Some(&b'\n'));
                // Within the bound: each kept character escapes to at most 6 bytes (\u00XX) or is
                // at most 4 bytes of UTF-8; task and error message each keep max_task_chars.
                let bound = 600 + 6 * (MAX_AGENT_NAME_CHARS * 3 + max_task_chars * 2 + 2);
                prop_assert!(out.len() <= bound, "{} bytes", out.len());
                let value: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
                let object = value.as_object().expect("an object");
                if ecs {
                    prop_assert!(object["event.duration"].is_u64());
                    prop_assert!(object["event.outcome"].is_string());
                    prop_assert!(object["agent_execution.task"].is_string());
                    let name = object["gen_ai.agent.name"].as_str().unwrap();
                    let status = if failed { "failure" } else { "success" };
                    prop_assert_eq!(
                        object["message"].as_str().unwrap(),
                        format!("agent_execution {name} {status}"),
                        "the name escaped inside the message as in its own field"
                    );
                } else {
                    prop_assert!(object["duration_seconds"].is_f64());
                    prop_assert!(object["status"].is_string());
                    let kept: String = task.chars().take(max_task_chars).collect();
                    let logged = object["task"].as_str().unwrap();
                    prop_assert!(logged.starts_with(&kept), "the kept part is exact");
                    let name: String = agent_name.chars().take(MAX_AGENT_NAME_CHARS).collect();
                    prop_assert!(object["agent_name"].as_str().unwrap().starts_with(&name));
                }
            }
        }
    }
}
