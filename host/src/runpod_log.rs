//! Log lines in the shape the Runpod console groups by request:
//! `{"requestId": "<job id or null>", "message": "...", "level": "INFO"}`, used when
//! `RUNPOD_ENDPOINT_ID` is set (i.e. on Runpod). The job id comes from an event's `job` field;
//! other fields are appended to the message as `key=value`.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Longest message kept; longer ones lose their middle, as the Python SDK does.
const MAX_MESSAGE: usize = 4096;

/// The Runpod JSON line formatter.
pub struct RunpodFormat;

#[derive(Default)]
struct Fields {
    message: String,
    job: Option<String>,
    rest: Vec<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "job" | "requestId" => self.job = Some(value.to_string()),
            name => self.rest.push(format!("{name}={value}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text,
            "job" | "requestId" => self.job = Some(text.trim_matches('"').to_string()),
            name => self.rest.push(format!("{name}={text}")),
        }
    }
}

fn cut_middle(s: String) -> String {
    if s.len() <= MAX_MESSAGE {
        return s;
    }
    let half = MAX_MESSAGE / 2;
    let mut head = half;
    while !s.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = s.len() - half;
    while !s.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} ... {}", &s[..head], &s[tail..])
}

impl<S, N> FormatEvent<S, N> for RunpodFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut f = Fields::default();
        event.record(&mut f);
        let mut message = f.message;
        if !f.rest.is_empty() {
            message = format!("{message} {}", f.rest.join(" "));
        }
        let line = serde_json::json!({
            "requestId": f.job,
            "message": cut_middle(message),
            "level": event.metadata().level().as_str(),
        });
        writeln!(writer, "{line}")
    }
}
