//! Cheaper formatting for the text log, byte for byte what tracing-subscriber's defaults
//! write. An access line per request made tracing's formatting a tenth of a reply-cache
//! hit's CPU: each field went through `core::fmt` (a string's `Debug` escapes it a
//! character at a time) and the whole date was formatted for every line.

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput as _};
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::FormatFields;

/// The default timestamp, `2026-12-03T10:11:15.123456Z` (UTC, microseconds), with the part
/// up to the second formatted once a second on each thread.
pub(super) struct UtcMicros;

impl FormatTime for UtcMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        write_timestamp(w, since_epoch)
    }
}

pub(super) fn write_timestamp(w: &mut impl fmt::Write, since_epoch: Duration) -> fmt::Result {
    thread_local! {
        /// The last second formatted here, and its text up to the seconds.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let second = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(formatted, text)| {
        if *formatted != second || text.is_empty() {
            *text = format_second(second);
            *formatted = second;
        }
        w.write_str(text)
    })?;
    let mut fraction = *b".000000Z";
    let mut micros = since_epoch.subsec_micros();
    for digit in fraction[1..7].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    // ASCII by construction.
    w.write_str(std::str::from_utf8(&fraction).unwrap_or(".000000Z"))
}

/// `2026-12-03T10:11:15`; a second beyond `time`'s range (past the year 9999) prints as
/// its count since the epoch rather than failing the line.
fn format_second(second: u64) -> String {
    let Ok(at) = i64::try_from(second)
        .map_err(|_| ())
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).map_err(|_| ()))
    else {
        return second.to_string();
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// `DefaultFields` with plain strings and integers written directly; everything else, and
/// every field when the writer paints ANSI colours, goes to `DefaultFields`' own visitor.
pub(super) struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut visitor = TextVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    /// The space before a field (not a message: `delegate` writes those) and its name as
    /// `DefaultVisitor` writes them; `None` for the fields it leaves out (the `log` crate's
    /// metadata).
    fn start<'f>(&mut self, field: &'f Field) -> Option<&'f str> {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return None;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        if !self.is_empty {
            self.result = self.writer.write_char(' ');
        }
        self.is_empty = false;
        Some(name)
    }

    /// Hands one field to `DefaultVisitor`, which writes the space before it.
    fn delegate(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        // It leaves these out, and then writes no space either.
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        self.is_empty = false;
    }

    fn write_integer(&mut self, field: &Field, value: impl itoa::Integer + fmt::Debug) {
        if field.name() == "message" {
            return self.delegate(field, |visitor| visitor.record_debug(field, &value));
        }
        if let Some(name) = self.start(field) {
            let mut digits = itoa::Buffer::new();
            self.result = write_all(&mut self.writer, &[name, "=", digits.format(value)]);
        }
    }
}

fn write_all(w: &mut Writer<'_>, parts: &[&str]) -> fmt::Result {
    parts.iter().try_for_each(|part| w.write_str(part))
}

/// `value` as `str`'s `Debug` writes it, without running `Debug` (which escapes a
/// character at a time) when it would print the string unchanged between quotes.
pub(super) fn write_debug_str(w: &mut impl fmt::Write, value: &str) -> fmt::Result {
    let verbatim = value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
    if verbatim {
        w.write_char('"')?;
        w.write_str(value)?;
        w.write_char('"')
    } else {
        write!(w, "{value:?}")
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.delegate(field, |visitor| visitor.record_str(field, value));
        }
        if let Some(name) = self.start(field) {
            self.result = write_all(&mut self.writer, &[name, "="])
                .and_then(|()| write_debug_str(&mut self.writer, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write_integer(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write_integer(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(field, |visitor| visitor.record_error(field, value));
    }

    /// `name=` written here (what `DefaultVisitor` writes through `nu_ansi_term` when
    /// colours are off), then the value's `Debug` as it writes it.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            return self.delegate(field, |visitor| visitor.record_debug(field, value));
        }
        if let Some(name) = self.start(field) {
            self.result = write_all(&mut self.writer, &[name, "="])
                .and_then(|()| write!(self.writer, "{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tracing_subscriber::fmt::format::DefaultFields;
    use tracing_subscriber::fmt::FormatFields;

    use super::{write_timestamp, TextFields};
    use crate::telemetry::captured::Lines;

    fn timestamp(since_epoch: Duration) -> String {
        let mut text = String::new();
        write_timestamp(&mut text, since_epoch).expect("a String takes any text");
        text
    }

    #[test]
    fn timestamps_are_rfc3339_utc_micros_across_seconds() {
        // In order: the same second twice, then the next (the cached part must move on),
        // then a leap day.
        let cases = [
            (Duration::ZERO, "1970-01-01T00:00:00.000000Z"),
            (
                Duration::new(1_700_000_000, 123_456_789),
                "2023-11-14T22:13:20.123456Z",
            ),
            (
                Duration::new(1_700_000_000, 999_999_999),
                "2023-11-14T22:13:20.999999Z",
            ),
            (
                Duration::new(1_700_000_001, 1_000),
                "2023-11-14T22:13:21.000001Z",
            ),
            (Duration::new(951_782_400, 0), "2000-02-29T00:00:00.000000Z"),
        ];
        for (since_epoch, expected) in cases {
            assert_eq!(timestamp(since_epoch), expected, "{since_epoch:?}");
        }
    }

    /// Every kind of field and value, in spans and events, as `fields` formats them.
    fn log_with<N>(fields: N) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_writer(lines.clone())
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let id = "chatcmpl-0123";
            let span = tracing::info_span!("request", id = %id, tokens = 3u32, note = "a \"b\"");
            let _entered = span.enter();
            span.record("tokens", 4u32);
            tracing::info!(
                status = %200,
                plain = "default",
                quoted = "say \"hi\"",
                backslash = r"a\b",
                newline = "two\nlines",
                escape = "\u{1b}[31mred",
                unicode = "café ☕",
                empty = "",
                unsigned = 42u64,
                negative = -7i64,
                flag = true,
                ratio = 0.25f64,
                absent = Option::<u32>::None,
                present = Some(5u32),
                debug = ?vec![1, 2],
                r#type = "raw",
                "request {} done", 1
            );
            tracing::warn!(message = "a plain message \u{1b}[0m", extra = 1u64);
            tracing::info!(first = 1u64, "message last");
            tracing::info!(message = 7u64, more = "x");
            let err = std::io::Error::other("disk full");
            tracing::error!(error = &err as &(dyn std::error::Error + 'static), "failed");
        });
        lines.text()
    }

    #[test]
    fn text_fields_write_what_default_fields_write() {
        let expected = log_with(DefaultFields::new());
        let written = log_with(TextFields);
        assert!(
            expected.lines().count() >= 6,
            "the reference wrote:\n{expected}"
        );
        for (line, (want, got)) in expected.lines().zip(written.lines()).enumerate() {
            assert_eq!(got, want, "line {line} differs");
        }
        assert_eq!(written.lines().count(), expected.lines().count());
    }
}
