//! The log line format: tracing's full format, with a fast path for access
//! lines.
//!
//! An access line is one event per connection or request. Given as fields,
//! tracing's formatter visits each one and escapes it character by
//! character; at a high connection rate that was 14 % of a ztunnel's user
//! time. ztunnel's events of [`ACCESS_TARGET`] instead carry the whole line,
//! already formatted, as their only field, and are written here as they are:
//! same text, no per-field or per-character work. Whoever formats such a line
//! escapes what a peer could have put in it ([`Escaped`]). Access events with
//! fields (the waypoint's) get the full format like any other.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of access-log events. One whose only field is its message (the
/// line, preformatted) is written as it is; one with fields as any event is.
pub const ACCESS_TARGET: &str = "access";

/// tracing's full format for every event, access lines written as given.
#[derive(Default)]
pub struct LineFormat {
    full: Format<Full, SystemTime>,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // Inside a span the full format names it first; leave that to it.
        let preformatted = meta.target() == ACCESS_TARGET
            && meta.fields().len() == 1
            && meta.fields().field("message").is_some()
            && ctx.event_scope().is_none();
        if !preformatted {
            return self.full.format_event(ctx, writer, event);
        }
        // What `Full` writes ahead of the fields, without ANSI (which the
        // subscriber turns off): time, padded level, target.
        SystemTime.format_time(&mut writer)?;
        write!(writer, " {:>5} {}: ", meta.level().as_str(), meta.target())?;
        let mut message = Message {
            writer: &mut writer,
            result: Ok(()),
        };
        event.record(&mut message);
        message.result?;
        writer.write_char('\n')
    }
}

/// Writes an event's message as it is (no quoting, no escaping).
struct Message<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Visit for Message<'_, '_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" && self.result.is_ok() {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

/// Formats the inner value with control characters escaped (`\n`, `\u{1b}`):
/// text a peer chose (an error it sent, a name it gave) can neither break a
/// log line in two nor reach a terminal as an escape sequence.
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapeControl(f), "{}", self.0)
    }
}

struct EscapeControl<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapeControl<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Almost always nothing to escape: then the text goes out in one piece.
        let mut rest = s;
        while let Some(at) = rest.find(char::is_control) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            write!(self.0, "{}", c.escape_default())?;
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_keeps_plain_text_and_escapes_control_characters() {
        assert_eq!(Escaped("stream reset").to_string(), "stream reset");
        assert_eq!(
            Escaped("bad\nline\u{1b}[31m red").to_string(),
            "bad\\nline\\u{1b}[31m red"
        );
        assert_eq!(Escaped("é\tü").to_string(), "é\\tü");
    }

    /// A preformatted access line reads exactly as tracing's own format
    /// would print the same event; an access event with fields (the
    /// waypoint's) and any other event are tracing's own format.
    #[test]
    fn access_lines_match_the_full_format() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .map_err(|_| std::io::ErrorKind::Other)?
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = |format: Option<LineFormat>| {
            let buf = Buf::default();
            let writer = buf.clone();
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_ansi(false);
            let emit = || {
                tracing::info!(target: "access", "{}", "connection complete a=\"b\" c=d");
                tracing::info!(target: "access", status = 200, path = "/a b", "request");
                tracing::warn!(target: "other", reason = "x", "refused: {}", 7);
            };
            match format {
                Some(f) => tracing::subscriber::with_default(
                    tracing_subscriber::registry().with(layer.event_format(f)),
                    emit,
                ),
                None => tracing::subscriber::with_default(
                    tracing_subscriber::registry().with(layer),
                    emit,
                ),
            }
            let text = String::from_utf8(buf.0.lock().map(|b| b.clone()).unwrap_or_default())
                .unwrap_or_default();
            // Strip the timestamps, which differ between the two runs.
            text.lines()
                .map(|l| l.split_once(' ').map_or("", |(_, rest)| rest).to_string())
                .collect::<Vec<_>>()
        };
        let ours = lines(Some(LineFormat::default()));
        assert_eq!(ours, lines(None));
        assert_eq!(
            ours,
            [
                " INFO access: connection complete a=\"b\" c=d",
                " INFO access: request status=200 path=\"/a b\"",
                " WARN other: refused: 7 reason=\"x\"",
            ]
        );
    }
}
