//! Text bounded in characters, as every signal bounds what it carries: label values, span
//! attributes and log fields are cut at a character boundary, `…` marking the cut.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use crate::scrub::HELD_LABEL_CHARS;

/// The `agent_name` label value that executions beyond the cardinality cap are folded into;
/// `model` folds into it likewise.
pub const OVERFLOW_AGENT_NAME: &str = "__overflow__";

/// The most characters a metric label value keeps (`agent_name`, the `framework_info`
/// labels), and the log line's `agent_name` and `error.type`.
pub(crate) const MAX_LABEL_CHARS: usize = 256;

/// At most `max` characters of `text`, then `…` where text was cut.
pub(crate) fn cut(text: &str, max: usize) -> Cow<'_, str> {
    // A character takes at least a byte: short text needs no walk over its characters.
    if text.len() <= max {
        return text.into();
    }
    match text.char_indices().nth(max) {
        None => text.into(),
        Some((at, _)) => format!("{}…", &text[..at]).into(),
    }
}

/// `value`'s `Debug` text, at most `max` characters of it then `…` where it was cut; or as
/// much as it wrote before it failed or panicked. Formatting stops at the cut, so a value whose
/// text would be huge costs no more than the kept part (`format!` would also panic on an
/// `Err`). A panic in the value's `Debug` (the application's code) goes no further: out of a
/// layer's callback it would leave a span that was opening open for ever, its parents with it.
pub(crate) fn debug_text(value: &dyn fmt::Debug, max: usize) -> String {
    /// Takes characters until it has `left` none left to take, then refuses the rest.
    struct Bounded {
        text: String,
        left: usize,
        cut: bool,
    }
    impl fmt::Write for Bounded {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            if s.len() <= self.left {
                // At most one character per byte: all of it fits.
                self.left -= s.chars().count();
                self.text.push_str(s);
                return Ok(());
            }
            for c in s.chars() {
                if self.left == 0 {
                    self.cut = true;
                    return Err(fmt::Error);
                }
                self.text.push(c);
                self.left -= 1;
            }
            Ok(())
        }
    }
    let mut bounded = Bounded {
        text: String::new(),
        left: max,
        cut: false,
    };
    let _ = crate::panics::catching(|| fmt::Write::write_fmt(&mut bounded, format_args!("{value:?}")));
    if bounded.cut {
        bounded.text.push('…');
    }
    bounded.text
}

/// A name (an agent's, a model's, a provider's) as a span's fields hold it until it becomes a
/// label: `None` when empty or blank, as a missing one; else held to [`HELD_LABEL_CHARS`] and
/// shared ([`shared_name`]).
pub(crate) fn held_name(text: &str) -> Option<Arc<str>> {
    (!text.trim().is_empty()).then(|| shared_name(&cut(text, HELD_LABEL_CHARS)))
}

/// Names (agents', models', providers') are few and repeat: each thread keeps the ones it
/// saw last and hands out a shared copy, so a span costs no allocation for its names. The copies are the calling
/// thread's own: no other thread's core writes their reference counts.
pub(crate) fn shared_name(name: &str) -> Arc<str> {
    const KEPT: usize = 32;
    thread_local! {
        static RECENT: RefCell<Vec<Arc<str>>> = const { RefCell::new(Vec::new()) };
    }
    // Not `with`: during the thread's thread-local destructors the list may be gone.
    RECENT
        .try_with(|recent| {
            let mut recent = recent.try_borrow_mut().ok()?;
            if let Some(known) = recent.iter().find(|known| ***known == *name) {
                return Some(Arc::clone(known));
            }
            let new: Arc<str> = Arc::from(name);
            if recent.len() == KEPT {
                recent.remove(0);
            }
            recent.push(Arc::clone(&new));
            Some(new)
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| Arc::from(name))
}

/// `?name` records `"backend"` with quotes and escapes; the signals want the text itself.
pub(crate) fn unquote_debug(text: String) -> String {
    let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
        return text;
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('u') => {
                // `\u{1f600}`: hex digits between braces.
                let hex: String = chars.by_ref().skip(1).take_while(|&c| c != '}').collect();
                out.extend(u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32));
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_at_a_character_boundary() {
        assert_eq!(cut("Implement API", 10), "Implement …");
        assert_eq!(cut("Implement", 10), "Implement");
        assert_eq!(cut("ééééé", 3), "ééé…");
        assert_eq!(cut("ééé", 3), "ééé", "6 bytes, but 3 characters");
        assert_eq!(cut("abc", 0), "…");
        // A cut text cut again at the same place or later is unchanged but for the mark.
        assert_eq!(cut(&cut("abcdefgh", 4), 4), "abcd…");
        assert_eq!(cut(&cut("abcdefgh", 6), 4), "abcd…");
    }

    /// Would write forever.
    struct Endless;

    impl fmt::Debug for Endless {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            loop {
                f.write_str("more ")?;
            }
        }
    }

    /// Fails after writing a little.
    struct Fails;

    impl fmt::Debug for Fails {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("partial")?;
            Err(fmt::Error)
        }
    }

    #[test]
    fn debug_text_stops_formatting_at_the_cut() {
        assert_eq!(debug_text(&"abc", 10), "\"abc\"");
        assert_eq!(debug_text(&"abcdef", 4), "\"abc…");
        assert_eq!(debug_text(&"éé", 2), "\"é…");
        assert_eq!(debug_text(&Endless, 7), "more mo…");
        assert_eq!(debug_text(&Fails, 100), "partial");
    }
}
