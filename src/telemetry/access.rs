//! The access log: one line per request, target `tiergate::access`, at info.
//!
//! Written straight into the batched log writer, in the same text or JSON layout the
//! fmt layer gives the same event (a test holds the two to the same bytes). Through
//! tracing's formatter it was, even after cheaper field formatting, about a twentieth of
//! a reply-cache hit's CPU: the event's dispatch, the span scope walk, and field visits
//! through `dyn` calls, for a line whose fields are always the same. It still obeys the
//! filter (`RUST_LOG=tiergate::access=off` silences it); with colours on (a person at a
//! terminal) or under another subscriber (tests), it goes through tracing as before.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::format::{write_debug_str, write_timestamp};
use super::Batch;

/// The access log's target.
pub const TARGET: &str = "tiergate::access";

/// What one request's access line says.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    /// The reply's id, also its request span's.
    pub id: &'a str,
    /// The HTTP status, or `stream_error` / `client_closed` after streaming began.
    pub status: &'a str,
    pub finish_reason: &'a str,
    pub rule: &'a str,
    pub tier: &'a str,
    pub model: &'a str,
    pub degraded: Option<&'a str>,
    pub endpoint: Option<&'a str>,
    pub cache: Option<&'a str>,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    pub ttft_ms: Option<u64>,
    pub total_ms: u64,
}

/// Where the fast path writes, set by `telemetry::init` when its subscriber is the one
/// installed and writes without colours.
static WRITER: OnceLock<AccessWriter> = OnceLock::new();

pub(super) struct AccessWriter {
    pub(super) batch: Arc<Batch>,
    pub(super) json: bool,
}

pub(super) fn install(writer: AccessWriter) {
    // A second init (tests) keeps the first subscriber, and so the first writer.
    let _ = WRITER.set(writer);
}

impl AccessLine<'_> {
    /// Logs the line; `span` is the request's, for the tracing path.
    pub fn log(&self, span: &tracing::Span) {
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return;
        }
        let Some(writer) = WRITER.get().filter(|_| direct_is_exact(span)) else {
            return self.event(span);
        };
        thread_local! {
            static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        LINE.with_borrow_mut(|line| {
            line.clear();
            self.format(line, writer.json, Some(now));
            // The batch takes whole lines and cannot fail.
            let _ = (&*writer.batch).write_all(line);
        });
    }

    /// The same line as an event, for the fmt layer to format.
    fn event(&self, span: &tracing::Span) {
        tracing::info!(
            target: TARGET,
            parent: span,
            status = %self.status,
            finish_reason = self.finish_reason,
            rule = self.rule,
            tier = self.tier,
            model = self.model,
            degraded = self.degraded,
            endpoint = self.endpoint,
            cache = self.cache,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            ttft_ms = self.ttft_ms,
            total_ms = self.total_ms,
            "request"
        );
    }

    /// The fields after `status`, in the event's order, in either layout.
    fn fields(&self, line: &mut impl FieldSink) {
        line.string("finish_reason", Some(self.finish_reason));
        line.string("rule", Some(self.rule));
        line.string("tier", Some(self.tier));
        line.string("model", Some(self.model));
        line.string("degraded", self.degraded);
        line.string("endpoint", self.endpoint);
        line.string("cache", self.cache);
        line.number("prompt_tokens", self.prompt_tokens.map(u64::from));
        line.number("completion_tokens", self.completion_tokens.map(u64::from));
        line.number("ttft_ms", self.ttft_ms);
        line.number("total_ms", Some(self.total_ms));
    }

    /// The line as the fmt layer writes the event, text or JSON, with the timestamp
    /// `now` (none: no timestamp, as `without_time` writes it).
    fn format(&self, out: &mut Vec<u8>, json: bool, now: Option<Duration>) {
        if json {
            self.format_json(out, now);
        } else {
            self.format_text(out, now);
        }
        out.push(b'\n');
    }

    fn format_text(&self, out: &mut Vec<u8>, now: Option<Duration>) {
        let mut line = TextLine(out);
        if let Some(now) = now {
            line.timestamp(now);
            line.raw(" ");
        }
        // The fmt layer's `Full` layout: level, span with its fields, target, message.
        line.raw(" INFO request{id=");
        line.raw(self.id);
        line.raw("}: ");
        line.raw(TARGET);
        line.raw(": request status=");
        line.raw(self.status);
        self.fields(&mut line);
    }

    fn format_json(&self, out: &mut Vec<u8>, now: Option<Duration>) {
        let mut line = JsonLine(out);
        line.raw("{");
        if let Some(now) = now {
            line.raw("\"timestamp\":\"");
            TextLine(&mut *line.0).timestamp(now);
            line.raw("\",");
        }
        line.raw("\"level\":\"INFO\",\"fields\":{\"message\":\"request\"");
        line.string("status", Some(self.status));
        self.fields(&mut line);
        line.raw("},\"target\":\"");
        line.raw(TARGET);
        line.raw("\",\"span\":{\"id\":");
        line.quoted(self.id);
        // The spans entered where the line fires: none (see `direct_is_exact`).
        line.raw(",\"name\":\"request\"},\"spans\":[]}");
    }
}

/// Whether the direct line is the one the fmt layer would write: the request's span is
/// enabled (a filter can turn spans off and leave the access target on; the event is then
/// a root, with no span part), and no span is entered where the line fires (JSON lists
/// the entered spans: a budget refusal ends the request inside its span, and so does a
/// client leaving while it is routed). Those cases go through tracing.
fn direct_is_exact(span: &tracing::Span) -> bool {
    !span.is_disabled()
        && tracing::dispatcher::get_default(|dispatch| dispatch.current_span().id().is_none())
}

/// Fields as `TextFields` writes them.
struct TextLine<'a>(&'a mut Vec<u8>);

impl TextLine<'_> {
    fn raw(&mut self, text: &str) {
        self.0.extend_from_slice(text.as_bytes());
    }

    fn timestamp(&mut self, now: Duration) {
        // Writing to a Vec cannot fail.
        let _ = write_timestamp(self, now);
    }
}

/// A field written if it has a value; `None` is left out, as tracing leaves out `None`.
trait FieldSink {
    fn string(&mut self, name: &str, value: Option<&str>);
    fn number(&mut self, name: &str, value: Option<u64>);
}

impl FieldSink for TextLine<'_> {
    fn string(&mut self, name: &str, value: Option<&str>) {
        let Some(value) = value else { return };
        self.raw(" ");
        self.raw(name);
        self.raw("=");
        // Writing to a Vec cannot fail.
        let _ = write_debug_str(self, value);
    }

    fn number(&mut self, name: &str, value: Option<u64>) {
        let Some(value) = value else { return };
        self.raw(" ");
        self.raw(name);
        self.raw("=");
        self.raw(itoa::Buffer::new().format(value));
    }
}

impl std::fmt::Write for TextLine<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.raw(text);
        Ok(())
    }
}

/// Fields of a JSON object after its first.
struct JsonLine<'a>(&'a mut Vec<u8>);

impl JsonLine<'_> {
    fn raw(&mut self, text: &str) {
        self.0.extend_from_slice(text.as_bytes());
    }

    fn quoted(&mut self, value: &str) {
        // Serializing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.0, value);
    }

    fn key(&mut self, name: &str) {
        self.raw(",\"");
        self.raw(name);
        self.raw("\":");
    }
}

impl FieldSink for JsonLine<'_> {
    fn string(&mut self, name: &str, value: Option<&str>) {
        let Some(value) = value else { return };
        self.key(name);
        self.quoted(value);
    }

    fn number(&mut self, name: &str, value: Option<u64>) {
        let Some(value) = value else { return };
        self.key(name);
        self.raw(itoa::Buffer::new().format(value));
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use tracing_subscriber::EnvFilter;

    use super::{direct_is_exact, AccessLine};
    use crate::telemetry::captured::Lines;
    use crate::telemetry::{subscriber, LogFormat};

    const HIT: AccessLine<'static> = AccessLine {
        id: "chatcmpl-5b0cc3e1f5a54bd1a1d7b6a0c0ffee00",
        status: "200",
        finish_reason: "stop",
        rule: "default",
        tier: "fast",
        model: "smollm2-135m-instruct",
        degraded: None,
        endpoint: None,
        cache: Some("hit"),
        prompt_tokens: Some(16),
        completion_tokens: Some(7),
        ttft_ms: Some(0),
        total_ms: 0,
    };

    /// Every optional field set, strings that need escaping, the largest numbers.
    const AWKWARD: AccessLine<'static> = AccessLine {
        id: "chatcmpl-1",
        status: "client_closed",
        finish_reason: "abort",
        rule: "say \"hi\" \\ café ☕\n\u{1b}[0m",
        tier: "full",
        model: "gemma-3-270m",
        degraded: Some("full->fast; reason=ttft_budget"),
        endpoint: Some("http://127.0.0.1:8081"),
        cache: Some("stale"),
        prompt_tokens: Some(u32::MAX),
        completion_tokens: Some(0),
        ttft_ms: Some(u64::MAX),
        total_ms: 12_345,
    };

    /// A request refused before routing finished: no tier, tokens or first token.
    const BARE: AccessLine<'static> = AccessLine {
        id: "chatcmpl-2",
        status: "503",
        finish_reason: "none",
        rule: "",
        tier: "",
        model: "",
        degraded: None,
        endpoint: None,
        cache: None,
        prompt_tokens: None,
        completion_tokens: None,
        ttft_ms: None,
        total_ms: 3,
    };

    /// The line the installed fmt layer writes for the event, and the one written
    /// directly, each with its timestamp cut out (they are taken moments apart).
    fn both(line: &AccessLine<'_>, format: LogFormat) -> (String, String) {
        let captured = Lines::default();
        let filter = EnvFilter::new("info");
        let fmt_layer = subscriber(format, filter, false, captured.clone());
        tracing::subscriber::with_default(fmt_layer, || {
            let span = tracing::info_span!("request", id = %line.id);
            line.event(&span);
        });
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut direct = Vec::new();
        line.format(&mut direct, format == LogFormat::Json, Some(now));
        let direct = String::from_utf8(direct).expect("UTF-8");
        (
            without_timestamp(&captured.text()),
            without_timestamp(&direct),
        )
    }

    /// The line with its `2026-12-03T10:11:15.123456Z`, checked for shape, cut out.
    fn without_timestamp(line: &str) -> String {
        let at = usize::from(line.starts_with('{')) * "{\"timestamp\":\"".len();
        let stamp = &line[at..at + 27];
        let shape = stamp.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            19 => c == '.',
            26 => c == 'Z',
            _ => c.is_ascii_digit(),
        });
        assert!(shape, "no timestamp where expected in {line}");
        format!("{}{}", &line[..at], &line[at + 27..])
    }

    #[test]
    fn the_direct_line_is_the_fmt_layers_line_in_text_and_json() {
        for format in [LogFormat::Text, LogFormat::Json] {
            for line in [HIT, AWKWARD, BARE] {
                let (through_tracing, direct) = both(&line, format);
                assert!(
                    through_tracing.contains("tiergate::access"),
                    "{through_tracing}"
                );
                assert_eq!(direct, through_tracing, "{format:?}");
            }
        }
    }

    /// Found in review: the direct JSON line said `"spans":[]` for a line fired inside
    /// the request's span, and both layouts named a span the filter had turned off.
    #[test]
    fn lines_inside_the_span_or_without_it_go_through_tracing() {
        let captured = Lines::default();
        let json = subscriber(
            LogFormat::Json,
            EnvFilter::new("info"),
            false,
            captured.clone(),
        );
        tracing::subscriber::with_default(json, || {
            let span = tracing::info_span!("request", id = %HIT.id);
            assert!(direct_is_exact(&span));
            span.in_scope(|| {
                assert!(!direct_is_exact(&span));
                HIT.event(&span);
            });
        });
        assert!(
            captured.text().contains(r#""spans":[{"id":"#),
            "{}",
            captured.text()
        );

        let captured = Lines::default();
        let spans_off = EnvFilter::new("warn,tiergate::access=info");
        let text = subscriber(LogFormat::Text, spans_off, false, captured.clone());
        tracing::subscriber::with_default(text, || {
            let span = tracing::info_span!("request", id = %HIT.id);
            assert!(!direct_is_exact(&span));
            HIT.event(&span);
        });
        let line = captured.text();
        assert!(
            line.contains(" INFO tiergate::access: request status=200"),
            "{line}"
        );
    }

    #[test]
    fn json_lines_parse_with_numbers_as_numbers() {
        let (_, direct) = both(&AWKWARD, LogFormat::Json);
        let parsed: serde_json::Value = serde_json::from_str(&direct).expect("one JSON line");
        assert_eq!(parsed["fields"]["ttft_ms"], u64::MAX);
        assert_eq!(parsed["fields"]["rule"], AWKWARD.rule);
        assert_eq!(parsed["span"]["id"], AWKWARD.id);
    }
}
